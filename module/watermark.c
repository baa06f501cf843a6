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

void emx_stall_init(struct emx_stall *s)
{
    s->received = 0;
}

void emx_stall_received(struct emx_stall *s)
{
    s->received++;
}

bool emx_stall_is_stalled(const struct emx_stall *s, bool answerable, uint64_t oldest,
                          uint64_t mark, uint64_t now, uint64_t after)
{
    if (after == 0 || !answerable || now < oldest || now - oldest < after)
        return false;
    /* Anything received since the oldest answerable request went out shows
     * the platform reads and answers: a slow answer is not a stall. */
    return s->received == mark;
}
