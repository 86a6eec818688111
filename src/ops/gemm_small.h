/* gemm_small.h - out = x · wᵀ (+ bias, + residual) for products with few rows, the shape of a
 * linear layer applied to a handful of tokens (the Q-Former's 32 queries at batch 1).
 *
 * Why not the BLAS: OpenBLAS packs the whole weight for every call; with few rows the packing
 * costs about as much as the arithmetic, and its thread split leaves threads idle on such shapes.
 * Measured (bench_qformer --gemm-shapes, cold weights, bench/results/h100-cpu-gemm-small.txt): at
 * M = 16 and 32 this kernel is 1.1-3.8x faster than OpenBLAS 0.3.21 on the device's Xeon at 16
 * threads and 1.2-1.8x at 2 (one shape 0.90x), 1.3-2.4x on the Zen 5 VM at 2; at M = 64 it was
 * 0.35-1.7x on the Xeon, at M >= 128 even or behind: hence the cut at 32 rows. This kernel reads the weight in place ([N, K]
 * rows, as torch stores it), takes dot products along K, and splits the output columns over the
 * OpenMP threads, so every weight element is read from memory once per call.
 *
 * Contract: no argument checking (callers validate); never fails; out must not alias x, w, bias.
 * res may equal out only when accumulate == 0 (each element is read before it is written).
 * Numerics: float32 accumulation in 16 (AVX-512) / 8 (AVX2) lanes over K, summed at the end;
 * the scalar path sums in order. */
#ifndef QF_GEMM_SMALL_H
#define QF_GEMM_SMALL_H

#include "internal.h"

typedef struct {
    const float *x;     /* [M, K], row stride ldx                                               */
    int64_t ldx;
    const float *w;     /* [N, K], row stride K                                                 */
    const float *bias;  /* [N] or NULL                                                          */
    const float *res;   /* [M, N], row stride ldr, or NULL: added once (a residual connection)  */
    int64_t ldr;
    float *out;         /* [M, N], row stride ldo                                               */
    int64_t ldo;
    int64_t M, N, K;
    int accumulate;     /* 1: out += x·wᵀ + ..., 0: out = x·wᵀ + ...                           */
    const uint16_t *w_bf16; /* NULL, or the weight as bfloat16 [N, K] in place of w: only the
                             * backend table's gemm_nt reads it (CUDA); qf_gemm_nt ignores it */
    /* bf16 activations (CUDA backend only, with w_bf16; qf_gemm_nt ignores both): */
    const uint16_t *x_bf16; /* NULL, or the input as bfloat16 [M, K] (row stride ldx) in place of x */
    uint16_t *out_bf16;     /* NULL, or the result rounded to bfloat16 [M, N] (row stride ldo),
                             * written in place of out (then res == NULL and accumulate == 0) */
    const uint16_t *bias_bf16; /* NULL, or bias as bfloat16: with out_bf16 the bias cuBLASLt's
                                * bf16 epilogue reads (it takes a bias of the output's type) */
} qf_gemm_nt_args;

/* Rows up to which qf_gemm_nt_small is used in place of the BLAS (see gemm_small.c). */
#define QF_GEMM_SMALL_MAX_M 32

/* out = [out +] x·wᵀ + bias + res, threaded over output columns with qf_threads(). */
void qf_gemm_nt_small(const qf_gemm_nt_args *a);

/* The same product for any M: qf_gemm_nt_small when qf_gemm_small_wanted, else one pass
 * writing [out +] bias + res and the BLAS's sgemm adding x·wᵀ onto it (beta = 1). M, N, K and
 * the strides must fit in int. */
void qf_gemm_nt(const qf_gemm_nt_args *a);

/* 1 when qf_gemm_nt_small is the faster choice for an M x N x K product on this build. */
static inline int qf_gemm_small_wanted(int64_t M, int64_t N, int64_t K) {
    (void)N;
    (void)K;
    return M >= 2 && M <= QF_GEMM_SMALL_MAX_M;
}

#endif
