#include "watermark.h"

static bool reevaluate(struct emx_watermark *wm)
{
    bool was = wm->writable;
    if (wm->writable && wm->queued > wm->high)
        wm->writable = false;
    else if (!wm->writable && wm->queued <= wm->low)
        wm->writable = true;
    return was != wm->writable;
}

void emx_wm_init(struct emx_watermark *wm, uint64_t low, uint64_t high)
{
    wm->low = low;
    wm->high = high;
    wm->queued = 0;
    wm->writable = true;
}

bool emx_wm_set_queued(struct emx_watermark *wm, uint64_t queued)
{
    wm->queued = queued;
    return reevaluate(wm);
}

bool emx_wm_set_marks(struct emx_watermark *wm, uint64_t low, uint64_t high)
{
    wm->low = low;
    wm->high = high;
    return reevaluate(wm);
}

void emx_stall_init(struct emx_stall *s, uint64_t now)
{
    s->since = now;
    s->pending = 0;
}

void emx_stall_request_sent(struct emx_stall *s, uint64_t now)
{
    /* An idle pipe is not stalled: its clock starts with the first request. */
    if (s->pending++ == 0)
        s->since = now;
}

void emx_stall_request_done(struct emx_stall *s)
{
    if (s->pending > 0)
        s->pending--;
}

void emx_stall_received(struct emx_stall *s, uint64_t now)
{
    s->since = now;
}

bool emx_stall_is_stalled(const struct emx_stall *s, uint64_t now, uint64_t after)
{
    return after > 0 && s->pending > 0 && now >= s->since && now - s->since >= after;
}
