/* residual.c - residual add out = a + b and its (trivial) backward, elementwise over n floats
 * (the forward runs on the backend holding the tensors: qf_backend_for).
 * out may alias a or b; d_a/d_b may alias d_out. Backward overwrites (input gradients). */
#include "internal.h"
#include "backend/backend.h"
#include <string.h>

static qf_status check_forward(const char *fn, const float *out, const float *a, const float *b, int64_t n) {
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: a is NULL", fn);
    if (!b) return qf_fail(QF_ERR_ARG, "%s: b is NULL", fn);
    if (n <= 0) return qf_fail(QF_ERR_ARG, "%s: n must be >= 1, got %lld", fn, (long long)n);
    return QF_OK;
}

/* Validates, then runs on the backend holding the tensors; the CPU path is qf_cpu_residual_forward. */
qf_status qf_residual_forward(float *out, const float *a, const float *b, int64_t n) {
    const char *fn = "qf_residual_forward";
    QF_TRY(check_forward(fn, out, a, b, n));
    const void *ptrs[3] = {out, a, b};
    static const char *const names[3] = {"out", "a", "b"};
    const qf_backend *be;
    QF_TRY(qf_backend_for(fn, ptrs, names, 3, &be));
    if (be != qf_backend_cpu()) return be->add(out, a, b, n);
    return qf_cpu_residual_forward(out, a, b, n);
}

qf_status qf_cpu_residual_forward(float *out, const float *a, const float *b, int64_t n) {
    QF_TRY(check_forward("qf_residual_forward", out, a, b, n));
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
