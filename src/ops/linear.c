/* linear.c - torch.nn.functional.linear forward and backward on the linked BLAS (the forward
 * runs on the backend holding the tensors: qf_backend_for; the CPU path is below).
 * Layouts are torch's: in [N,Cin], weight [Cout,Cin], bias [Cout], out [N,Cout]. Every product is one SGEMM;
 * the BLAS threads itself with the count qf_set_num_threads gave it. Exceptions in the forward: one
 * row goes to SGEMV, and 2..QF_GEMM_SMALL_MAX_M (32) rows to qf_gemm_nt_small (gemm_small.h).
 * Invariants: d_in is overwritten, d_weight and d_bias are accumulated (see qfuse_ops.h);
 * nothing is written before all arguments have been checked. */
#include "internal.h"
#include "backend/backend.h"
#include "gemm_small.h"
#include <cblas.h>
#include <limits.h>

static qf_status check_sizes(const char *fn, int64_t N, int64_t Cin, int64_t Cout) {
    if (N <= 0 || Cin <= 0 || Cout <= 0)
        return qf_fail(QF_ERR_ARG, "%s: sizes must be >= 1, got N = %lld, Cin = %lld, Cout = %lld", fn,
                       (long long)N, (long long)Cin, (long long)Cout);
    if (N > INT_MAX || Cin > INT_MAX || Cout > INT_MAX)
        return qf_fail(QF_ERR_ARG, "%s: N = %lld, Cin = %lld, Cout = %lld: each must fit in int (BLAS)",
                       fn, (long long)N, (long long)Cin, (long long)Cout);
    return QF_OK;
}

qf_status qf_linear_forward(float *out, const float *in, const float *weight, const float *bias,
                            int64_t N, int64_t Cin, int64_t Cout) {
    const char *fn = "qf_linear_forward";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!in) return qf_fail(QF_ERR_ARG, "%s: in is NULL", fn);
    if (!weight) return qf_fail(QF_ERR_ARG, "%s: weight is NULL", fn);
    QF_TRY(check_sizes(fn, N, Cin, Cout));
    const void *ptrs[4] = {out, in, weight, bias};
    static const char *const names[4] = {"out", "in", "weight", "bias"};
    const qf_backend *be;
    QF_TRY(qf_backend_for(fn, ptrs, names, 4, &be));
    if (be != qf_backend_cpu()) {
        qf_gemm_nt_args g = {.x = in, .ldx = Cin, .w = weight, .bias = bias, .out = out, .ldo = Cout,
                             .M = N, .N = Cout, .K = Cin};
        return be->gemm_nt(&g);
    }
    if (qf_gemm_small_wanted(N, Cout, Cin)) { /* a few rows: gemm_small.h says why */
        qf_gemm_nt_args g = {.x = in, .ldx = Cin, .w = weight, .bias = bias, .out = out, .ldo = Cout,
                             .M = N, .N = Cout, .K = Cin};
        qf_gemm_nt_small(&g);
        return QF_OK;
    }
    float beta = 0.0f;
    if (bias) { /* start from the bias rows so the GEMM adds onto them (beta = 1) */
#pragma omp parallel for num_threads(qf_threads()) if (N * Cout > 65536)
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < Cout; o++) out[n * Cout + o] = bias[o];
        beta = 1.0f;
    }
    if (N == 1) /* one row (a decoding step): GEMV streams the weight once, GEMM would pack it */
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)Cout, (int)Cin, 1.0f, weight, (int)Cin, in, 1, beta, out, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)Cout, (int)Cin, 1.0f, in, (int)Cin,
                    weight, (int)Cin, beta, out, (int)Cout);
    return QF_OK;
}

qf_status qf_linear_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out,
                             const float *in, const float *weight, int64_t N, int64_t Cin, int64_t Cout) {
    const char *fn = "qf_linear_backward";
    if (!d_out) return qf_fail(QF_ERR_ARG, "%s: d_out is NULL", fn);
    if (d_in && !weight) return qf_fail(QF_ERR_ARG, "%s: weight is NULL but d_in is requested", fn);
    if (d_weight && !in) return qf_fail(QF_ERR_ARG, "%s: in is NULL but d_weight is requested", fn);
    QF_TRY(check_sizes(fn, N, Cin, Cout));
    if (d_in) /* d_in[N,Cin] = d_out[N,Cout] @ weight[Cout,Cin] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)Cin, (int)Cout, 1.0f, d_out,
                    (int)Cout, weight, (int)Cin, 0.0f, d_in, (int)Cin);
    if (d_weight) /* d_weight[Cout,Cin] += d_out^T[Cout,N] @ in[N,Cin] */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)Cout, (int)Cin, (int)N, 1.0f, d_out,
                    (int)Cout, in, (int)Cin, 1.0f, d_weight, (int)Cin);
    if (d_bias) {
        /* Column blocks: each thread owns whole columns, so no two threads add to one d_bias. */
        const int64_t blk = 64, nblk = (Cout + blk - 1) / blk;
#pragma omp parallel for num_threads(qf_threads()) if (N * Cout > 65536)
        for (int64_t b = 0; b < nblk; b++) {
            int64_t o0 = b * blk, o1 = o0 + blk < Cout ? o0 + blk : Cout;
            float acc[64] = {0};
            for (int64_t n = 0; n < N; n++) {
                const float *row = d_out + n * Cout;
                for (int64_t o = o0; o < o1; o++) acc[o - o0] += row[o];
            }
            for (int64_t o = o0; o < o1; o++) d_bias[o] += acc[o - o0];
        }
    }
    return QF_OK;
}
