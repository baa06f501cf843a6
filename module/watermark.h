/* Per-pipe writability (DESIGN §4 rule 2): watermarks with hysteresis on the
 * bytes queued to a pipe, and the stall signal of a pipe whose platform
 * stays silent with requests it could answer. */
#ifndef EMX_WATERMARK_H
#define EMX_WATERMARK_H

#include <stdbool.h>
#include <stdint.h>

struct emx_watermark {
    uint64_t low;
    uint64_t high;
    uint64_t queued;
    bool writable;
};

void emx_wm_init(struct emx_watermark *wm, uint64_t low, uint64_t high);
/* Set the queued byte count. Returns true when writability changed: it turns
 * off once queued exceeds high, and back on only once it falls to low or
 * below. */
bool emx_wm_set_queued(struct emx_watermark *wm, uint64_t queued);
/* Move the marks; re-evaluates at once. Returns true when writability changed. */
bool emx_wm_set_marks(struct emx_watermark *wm, uint64_t low, uint64_t high);

/* A pipe is stalled when the platform has had stall_after to show life and
 * did not: some request it could answer (sent whole; a multipart request
 * counts from its last chunk) went out `after` ms ago or more, and nothing
 * at all was received since that request went out. Receives are counted
 * rather than timed, so one in the same millisecond as a send is ordered
 * right. The router knows its requests and passes the oldest answerable
 * one's send time and the receive count at that moment. */
struct emx_stall {
    uint64_t received; /* messages received since init */
};

void emx_stall_init(struct emx_stall *s);
void emx_stall_received(struct emx_stall *s);
/* `answerable`: the pipe has requests the platform could answer; `oldest`:
 * when the oldest of them went out, and `mark`: s->received at that moment.
 * `after` 0: never stalled. */
bool emx_stall_is_stalled(const struct emx_stall *s, bool answerable, uint64_t oldest,
                          uint64_t mark, uint64_t now, uint64_t after);

#endif
