/* Per-pipe writability (DESIGN §4 rule 2): watermarks with hysteresis on the
 * bytes queued to a pipe, and the stall signal of a pipe that has requests
 * pending but has received nothing for stall_after. */
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

struct emx_stall {
    uint64_t since;    /* last receive, or when the first pending request was sent */
    uint32_t pending;  /* requests sent and not yet answered */
};

void emx_stall_init(struct emx_stall *s, uint64_t now);
void emx_stall_request_sent(struct emx_stall *s, uint64_t now);
void emx_stall_request_done(struct emx_stall *s);
void emx_stall_received(struct emx_stall *s, uint64_t now);
/* Stalled: requests pending and nothing received for `after` ms (0: never). */
bool emx_stall_is_stalled(const struct emx_stall *s, uint64_t now, uint64_t after);

#endif
