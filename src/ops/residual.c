/* residual.c - residual add out = a + b and its (trivial) backward, elementwise over n floats.
 * out may alias a or b; d_a/d_b may alias d_out. Backward overwrites (input gradients). */
#include "internal.h"
#include <string.h>

qf_status qf_residual_forward(float *out, const float *a, const float *b, int64_t n) {
    const char *fn = "qf_residual_forward";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: a is NULL", fn);
    if (!b) return qf_fail(QF_ERR_ARG, "%s: b is NULL", fn);
    if (n <= 0) return qf_fail(QF_ERR_ARG, "%s: n must be >= 1, got %lld", fn, (long long)n);
#pragma omp parallel for num_threads(qf_threads()) if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
    return QF_OK;
}

qf_status qf_residual_backward(float *d_a, float *d_b, const float *d_out, int64_t n) {
    const char *fn = "qf_residual_backward";
    if (!d_out) return qf_fail(QF_ERR_ARG, "%s: d_out is NULL", fn);
    if (n <= 0) return qf_fail(QF_ERR_ARG, "%s: n must be >= 1, got %lld", fn, (long long)n);
    if (d_a && d_a != d_out) memmove(d_a, d_out, (size_t)n * sizeof(float));
    if (d_b && d_b != d_out) memmove(d_b, d_out, (size_t)n * sizeof(float));
    return QF_OK;
}
