#include "hist.h"

#include <string.h>

void hist_init(struct hist *h)
{
    memset(h, 0, sizeof(*h));
}

size_t hist_index(uint64_t v)
{
    if (v < 2u * HIST_SUB)
        return (size_t)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v); /* e >= HIST_SUB_BITS + 1 */
    unsigned shift = e - HIST_SUB_BITS;
    uint64_t sub = (v >> shift) - HIST_SUB; /* 0 .. HIST_SUB - 1 */
    return 2u * HIST_SUB + (size_t)(e - HIST_SUB_BITS - 1u) * HIST_SUB + (size_t)sub;
}

uint64_t hist_bucket_low(size_t idx)
{
    if (idx < 2u * HIST_SUB)
        return idx;
    size_t k = idx - 2u * HIST_SUB;
    unsigned e = (unsigned)(k / HIST_SUB) + HIST_SUB_BITS + 1u;
    uint64_t sub = k % HIST_SUB + HIST_SUB;
    return sub << (e - HIST_SUB_BITS);
}

static uint64_t bucket_mid(size_t idx)
{
    if (idx < 2u * HIST_SUB)
        return idx;
    uint64_t lo = hist_bucket_low(idx);
    uint64_t width = hist_bucket_low(idx + 1 < HIST_BUCKETS ? idx + 1 : idx) - lo;
    return lo + width / 2;
}

void hist_record(struct hist *h, uint64_t v)
{
    h->b[hist_index(v)]++;
    if (h->count == 0 || v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
    h->count++;
    h->sum += (long double)v;
}

bool hist_add_bucket(struct hist *h, size_t idx, uint64_t n, uint64_t lo_seen, uint64_t hi_seen)
{
    if (idx >= HIST_BUCKETS || n == 0)
        return idx < HIST_BUCKETS;
    h->b[idx] += n;
    if (h->count == 0 || lo_seen < h->min)
        h->min = lo_seen;
    if (hi_seen > h->max)
        h->max = hi_seen;
    h->count += n;
    h->sum += (long double)bucket_mid(idx) * (long double)n;
    return true;
}

void hist_merge(struct hist *into, const struct hist *from)
{
    if (from->count == 0)
        return;
    for (size_t i = 0; i < HIST_BUCKETS; i++)
        into->b[i] += from->b[i];
    if (into->count == 0 || from->min < into->min)
        into->min = from->min;
    if (from->max > into->max)
        into->max = from->max;
    into->count += from->count;
    into->sum += from->sum;
}

uint64_t hist_quantile(const struct hist *h, double q)
{
    if (h->count == 0)
        return 0;
    if (q <= 0)
        return h->min;
    if (q >= 1)
        return h->max;
    /* The smallest value with at least ceil(q * count) samples at or below. */
    uint64_t rank = (uint64_t)(q * (double)h->count);
    if ((double)rank < q * (double)h->count)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= rank) {
            uint64_t v = bucket_mid(i);
            return v < h->min ? h->min : v > h->max ? h->max : v;
        }
    }
    return h->max;
}

double hist_mean(const struct hist *h)
{
    return h->count ? (double)(h->sum / (long double)h->count) : 0.0;
}
