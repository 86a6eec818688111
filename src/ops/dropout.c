/* dropout.c - inverted dropout on qfuse's counter-based Philox stream, forward and backward.
 * Element i is kept iff qf_philox_uniform(seed, offset, i) >= p and then scaled by 1/(1-p).
 * Because the mask is a pure function of (seed, offset, i), backward regenerates it instead of
 * storing it, and the result does not depend on the thread count or block split.
 * Invariant: p in [0,1); p = 0 is an exact copy (every uniform is >= 0). */
#include "internal.h"
#include <math.h>

static qf_status run(const char *fn, float *y, const float *x, int64_t n, float p, uint64_t seed,
                     uint64_t offset) {
    if (n <= 0) return qf_fail(QF_ERR_ARG, "%s: n must be >= 1, got %lld", fn, (long long)n);
    if (!(p >= 0.0f && p < 1.0f))
        return qf_fail(QF_ERR_ARG, "%s: p = %g, expected 0 <= p < 1", fn, (double)p);
    const float scale = 1.0f / (1.0f - p);
    const int64_t blk = 4096, nblk = (n + blk - 1) / blk;
#pragma omp parallel for num_threads(qf_threads()) if (nblk > 1)
    for (int64_t b = 0; b < nblk; b++) {
        int64_t i0 = b * blk, i1 = i0 + blk < n ? i0 + blk : n;
        if (p == 0.0f) {
            for (int64_t i = i0; i < i1; i++) y[i] = x[i];
            continue;
        }
        for (int64_t i = i0; i < i1; i++) {
            float u = qf_philox_uniform(seed, offset, (uint64_t)i);
            y[i] = u >= p ? x[i] * scale : 0.0f;
        }
    }
    return QF_OK;
}

qf_status qf_dropout_forward(float *out, const float *in, int64_t n, float p, uint64_t seed,
                             uint64_t offset) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_dropout_forward: out is NULL");
    if (!in) return qf_fail(QF_ERR_ARG, "qf_dropout_forward: in is NULL");
    return run("qf_dropout_forward", out, in, n, p, seed, offset);
}

qf_status qf_dropout_backward(float *d_in, const float *d_out, int64_t n, float p, uint64_t seed,
                              uint64_t offset) {
    if (!d_in) return qf_fail(QF_ERR_ARG, "qf_dropout_backward: d_in is NULL");
    if (!d_out) return qf_fail(QF_ERR_ARG, "qf_dropout_backward: d_out is NULL");
    return run("qf_dropout_backward", d_in, d_out, n, p, seed, offset);
}
