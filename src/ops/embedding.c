/* embedding.c - embedding lookup (torch.nn.functional.embedding) and its scatter-add backward.
 * ids are int32. Every id is validated before anything is written, so a bad id leaves the
 * output untouched. Backward gives each thread a block of columns of d_table, so repeated ids
 * add into the same row without races or atomics. */
#include "internal.h"
#include <string.h>

static qf_status check(const char *fn, const int32_t *ids, int64_t N, int64_t V, int64_t C) {
    if (N <= 0 || V <= 0 || C <= 0)
        return qf_fail(QF_ERR_ARG, "%s: sizes must be >= 1, got N = %lld, V = %lld, C = %lld", fn,
                       (long long)N, (long long)V, (long long)C);
    size_t tmp;
    QF_TRY(qf_mul_size((size_t)V, (size_t)C, fn, &tmp));
    QF_TRY(qf_mul_size((size_t)N, (size_t)C, fn, &tmp));
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V)
            return qf_fail(QF_ERR_ARG, "%s: ids[%lld] = %d is out of range for a table of %lld rows",
                           fn, (long long)n, (int)ids[n], (long long)V);
    return QF_OK;
}

qf_status qf_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N,
                               int64_t V, int64_t C) {
    const char *fn = "qf_embedding_forward";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!ids) return qf_fail(QF_ERR_ARG, "%s: ids is NULL", fn);
    if (!table) return qf_fail(QF_ERR_ARG, "%s: table is NULL", fn);
    QF_TRY(check(fn, ids, N, V, C));
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 65536)
    for (int64_t n = 0; n < N; n++)
        memcpy(out + n * C, table + (int64_t)ids[n] * C, (size_t)C * sizeof(float));
    return QF_OK;
}

qf_status qf_embedding_backward(float *d_table, const float *d_out, const int32_t *ids, int64_t N,
                                int64_t V, int64_t C) {
    const char *fn = "qf_embedding_backward";
    if (!d_table) return qf_fail(QF_ERR_ARG, "%s: d_table is NULL", fn);
    if (!d_out) return qf_fail(QF_ERR_ARG, "%s: d_out is NULL", fn);
    if (!ids) return qf_fail(QF_ERR_ARG, "%s: ids is NULL", fn);
    QF_TRY(check(fn, ids, N, V, C));
    const int64_t blk = 64, nblk = (C + blk - 1) / blk;
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 65536)
    for (int64_t b = 0; b < nblk; b++) {
        int64_t c0 = b * blk, c1 = c0 + blk < C ? c0 + blk : C;
        for (int64_t n = 0; n < N; n++) {
            float *dst = d_table + (int64_t)ids[n] * C;
            const float *src = d_out + n * C;
            for (int64_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
    return QF_OK;
}
