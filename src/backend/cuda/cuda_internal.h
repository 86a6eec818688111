/* cuda_internal.h - what the CUDA backend's .cu files share (C++; never included from C).
 *
 * Invariants:
 *   - Every CUDA runtime error is turned into a qfuse status right where it happens, through
 *     qf_cuda_check (QF_ERR_NOMEM for out-of-memory, QF_ERR_INTERNAL otherwise, the message
 *     naming the call and cudaGetErrorString); nothing here prints, aborts or throws.
 *   - Device memory is owned by whoever allocated it: callers' tensors by the caller
 *     (qf_cuda_malloc/qf_cuda_free), temporaries by the per-thread grow-only scratch below,
 *     which the backend reuses across calls (no allocation once it is large enough).
 *   - Kernels, copies and cuBLAS calls run on qf_cuda_stream(), in order; host code synchronises
 *     only where it must read a result back (the NaN/Inf screen, downloads). */
#ifndef QF_CUDA_INTERNAL_H
#define QF_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "backend/backend.h"
}

/* QF_OK if e == cudaSuccess, else qf_fail naming `what`. Clears the runtime's sticky last error
 * for non-sticky failures so the next call does not report it again. */
qf_status qf_cuda_check(cudaError_t e, const char *what);

/* The stream every kernel, cuBLAS call and copy of the backend is queued on (created by
 * qf_cuda_init; a non-default stream, so a model's calls can be captured as a CUDA graph). */
cudaStream_t qf_cuda_stream(void);

/* The launch error of the kernel just queued (cudaGetLastError), as qf_cuda_check. */
qf_status qf_cuda_launched(const char *kernel);

/* A device buffer of at least `bytes`, owned by this host thread, valid until the next call of
 * qf_cuda_scratch with the same slot on this thread. Grow-only. One slot per use, so buffers of
 * kernels still queued are never reallocated under them by another use. */
enum {
    QF_CUDA_SCRATCH_LSE = 0,     /* sdpa forward: lse when only weights were asked for     */
    QF_CUDA_SCRATCH_PART_O,      /* sdpa forward split: partial outputs                     */
    QF_CUDA_SCRATCH_PART_ML,     /* sdpa forward split: partial (max, sum)                  */
    QF_CUDA_SCRATCH_DELTA,       /* sdpa backward: rowwise dO . O                           */
    QF_CUDA_SCRATCH_SCREEN,      /* NaN/Inf screen: the first bad index                     */
    QF_CUDA_SCRATCH_GEMM_X16,    /* gemm_nt with bf16 weights: x rounded to bf16 [M, K]     */
    QF_CUDA_SCRATCH_DEAD_MEAN,   /* dead_rows_backward: per-row means (double) [B, nh, L]   */
    QF_CUDA_SCRATCH_GEMM_OUT32,  /* gemm_nt to a bf16 out without cuBLASLt: float32 [M, N]  */
    QF_CUDA_SCRATCH_SLOTS
};
/* While a graph is being captured on the stream, a slot that would have to grow is refused
 * (QF_ERR_INTERNAL saying so) instead of freeing memory a queued call may use. Every growth bumps
 * a process-wide generation; a graph captured before it is stale (graph_launch says so). */
qf_status qf_cuda_scratch(int slot, size_t bytes, void **out);

/* The process's cuBLAS handle, bound to qf_cuda_stream() with a preallocated workspace (so its
 * calls can be captured) and the math mode qf_cuda_set_tf32 chose. Created at the first call,
 * which must not be inside a capture. */
qf_status qf_cuda_blas(cublasHandle_t *out);
/* The cuBLASLt handle created with it, and the workspace both use (the calls are stream-ordered). */
qf_status qf_cuda_blaslt(cublasLtHandle_t *out, void **workspace, size_t *workspace_bytes);
/* 1 when qf_cuda_set_tf32(1) is in force. */
int qf_cuda_tf32(void);
/* QF_OK if s == CUBLAS_STATUS_SUCCESS, else qf_fail naming `what` (QF_ERR_NOMEM for ALLOC_FAILED). */
qf_status qf_cuda_blas_check(cublasStatus_t s, const char *what);

/* Model ops (ops.cu): the table entries of backend.h, arguments validated by the caller. */
qf_status qf_cuda_gemm_nt(const qf_gemm_nt_args *g);
/* gemm_skinny.cu: the same product by qfuse's own kernel for few rows (M small: the Q-Former's
 * queries at batch 1), where cuBLAS leaves most SMs idle. *done = false (nothing queued) for a
 * shape or argument combination it does not take; qf_cuda_gemm_nt then runs cuBLAS. */
qf_status qf_cuda_gemm_skinny(const qf_gemm_nt_args *g, bool *done);
qf_status qf_cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                                    const float *b, int64_t rows, int64_t C, float eps);
qf_status qf_cuda_gelu_forward(float *out, const float *x, int64_t n, qf_gelu_kind kind);
qf_status qf_cuda_layernorm_forward_x16(float *out, uint16_t *out16, float *mean, float *rstd, const float *x,
                                        const float *w, const float *b, int64_t rows, int64_t C, float eps);
qf_status qf_cuda_gelu_forward_x16(uint16_t *out16, const uint16_t *x16, int64_t n, qf_gelu_kind kind);
qf_status qf_cuda_stage_x16(uint16_t *dst16, const float *src, int64_t n, int64_t *first);
qf_status qf_cuda_add(float *out, const float *a, const float *b, int64_t n);
qf_status qf_cuda_embedding_forward(float *out, const int32_t *ids, const float *table, const float *pos,
                                    int64_t pos_rows, int64_t N, int64_t C);
qf_status qf_cuda_add_periodic(float *out, const float *a, const float *b, int64_t rows, int64_t period, int64_t C);
qf_status qf_cuda_split_heads(float *heads, const float *tok, int64_t ld, const float *bias, int64_t B, int64_t nh,
                              int64_t tot, int64_t off, int64_t len, int64_t hd);
qf_status qf_cuda_merge_heads(float *tok, int64_t ld, const float *heads, int64_t B, int64_t nh, int64_t tot,
                              int64_t off, int64_t len, int64_t hd, int acc);
qf_status qf_cuda_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t rows);
qf_status qf_cuda_dead_rows_mean(float *out, const float *v, const uint8_t *dead, int64_t B, int64_t nh, int64_t L,
                                 int64_t S, int64_t hd);
qf_status qf_cuda_screen_nonfinite(const float *x, int64_t n, int64_t *first);

/* Backward ops (ops_backward.cu): the table entries of backend.h, arguments validated by the caller. */
qf_status qf_cuda_linear_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                  const float *weight, int64_t N, int64_t Cin, int64_t Cout);
qf_status qf_cuda_layernorm_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                     const float *weight, const float *mean, const float *rstd, int64_t N, int64_t C);
qf_status qf_cuda_gelu_backward(float *d_in, const float *d_out, const float *in, int64_t n, qf_gelu_kind kind);
qf_status qf_cuda_dead_rows_backward(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                     const float *dout, const uint8_t *dead, int64_t B, int64_t nh, int64_t L,
                                     int64_t S, int64_t hd, float scale);
qf_status qf_cuda_embedding_backward(float *d_table, float *d_pos, const float *d_out, const int32_t *ids,
                                     int64_t skip_id, int64_t N, int64_t period, int64_t C);
qf_status qf_cuda_zero(void *p, size_t bytes);

/* SDPA kernels (sdpa.cu): pr validated by sdpa.c, every pointer device memory. */
qf_status qf_cuda_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, float *out, float *lse, float *weights);
qf_status qf_cuda_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                                const float *v, const float *out, const float *lse,
                                const float *grad_out, float *dq, float *dk, float *dv);

#endif
