/* sdpa_testutil.h - input generation shared by test_sdpa.c and test_sdpa_backward.c: a
 * seedable uniform generator, random attention masks (bool or float, optionally with fully
 * blocked rows) and the element strides of a broadcast mask. Each test keeps its own seed, so
 * its inputs do not depend on the other test. Deterministic: the same state gives the same
 * draws in the same order. */
#ifndef QF_SDPA_TESTUTIL_H
#define QF_SDPA_TESTUTIL_H
#include "testutil.h"
#include <stdint.h>

/* Uniform in [-1, 1) from a 64-bit LCG (Knuth's MMIX constants; the top 24 bits are used). */
static inline float tu_lcg_uniform(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*state >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* A random mask of shape shape[0:ndim] (malloc'd): bool ~70% attend; float ~80% finite values
 * in [-2, 2), the rest -inf. dead_rows: every 3rd row of the last dim fully blocked. */
static inline void *tu_sdpa_mask(qf_mask_kind kind, int ndim, const int64_t *shape, int dead_rows,
                                 uint64_t *state) {
    size_t n = 1;
    for (int d = 0; d < ndim; d++) n *= (size_t)shape[d];
    int64_t last = ndim ? shape[ndim - 1] : 1;
    if (kind == QF_MASK_BOOL) {
        uint8_t *m = malloc(n);
        for (size_t i = 0; i < n; i++) m[i] = tu_lcg_uniform(state) > -0.4f;
        if (dead_rows)
            for (size_t r = 0; r * (size_t)last < n; r += 3) memset(m + r * (size_t)last, 0, (size_t)last);
        return m;
    }
    float *m = malloc(n * 4);
    for (size_t i = 0; i < n; i++) m[i] = tu_lcg_uniform(state) > -0.6f ? tu_lcg_uniform(state) * 2.0f : -INFINITY;
    if (dead_rows)
        for (size_t r = 0; r * (size_t)last < n; r += 3)
            for (int64_t j = 0; j < last; j++) m[r * (size_t)last + (size_t)j] = -INFINITY;
    return m;
}

/* Element strides st[0:4] of a mask of shape shape[0:ndim] broadcast to [B,H,L,S] (0 along
 * broadcast dims). */
static inline void tu_mask_strides(int ndim, const int64_t *shape, int64_t st[4]) {
    int64_t full[4] = {1, 1, 1, 1};
    for (int d = 0; d < ndim; d++) full[4 - ndim + d] = shape[d];
    int64_t s = 1;
    for (int d = 3; d >= 0; d--) { st[d] = full[d] == 1 ? 0 : s; s *= full[d]; }
}

#endif
