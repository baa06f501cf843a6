/* A small HDR-style histogram: logarithmic buckets with a bounded relative
 * error. Values below 2^HIST_SUB_BITS+1 are exact; above, each power of two is
 * split into 2^HIST_SUB_BITS buckets, so a reported value is within
 * 1/2^(HIST_SUB_BITS+1) (0.4 %) of the true one. Fixed size, no allocation:
 * recording is a few instructions on the hot path. */
#ifndef EMX_BENCH_HIST_H
#define EMX_BENCH_HIST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HIST_SUB_BITS 7
#define HIST_SUB      (1u << HIST_SUB_BITS)
/* Exact below 2 * HIST_SUB, then (64 - HIST_SUB_BITS - 1) powers of two. */
#define HIST_BUCKETS (2u * HIST_SUB + (64u - HIST_SUB_BITS - 1u) * HIST_SUB)

struct hist {
    uint64_t count, min, max;
    long double sum; /* for the mean; 64-bit ns sums overflow on long runs */
    uint64_t b[HIST_BUCKETS];
};

void hist_init(struct hist *h);
void hist_record(struct hist *h, uint64_t v);
/* Add `n` samples whose value falls in bucket `idx` (merging); false if the
 * index is out of range. */
bool hist_add_bucket(struct hist *h, size_t idx, uint64_t n, uint64_t lo_seen, uint64_t hi_seen);
void hist_merge(struct hist *into, const struct hist *from);
/* The value at quantile q (0..1): the middle of its bucket, clamped to
 * [min, max]. 0 when empty. */
uint64_t hist_quantile(const struct hist *h, double q);
double hist_mean(const struct hist *h);
size_t hist_index(uint64_t v);
/* Lowest value of bucket idx. */
uint64_t hist_bucket_low(size_t idx);

#endif
