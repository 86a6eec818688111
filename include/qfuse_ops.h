/* qfuse_ops.h - the basic differentiable ops of libqfuse (included by qfuse.h; do not include
 * it alone). One source file per op in src/ops/, forward and backward side by side.
 *
 * CONVENTIONS (in addition to qfuse.h's)
 *
 *   - float32, contiguous, row-major. "Rows" are all leading dimensions flattened: an op "over
 *     the last dim" of a [B,T,C] tensor takes N = B*T, C.
 *   - Backward of loss = sum(out * d_out). Input gradients (d_in, d_a, ...) are OVERWRITTEN;
 *     parameter gradients (d_weight, d_bias, d_table) are ACCUMULATED (+=), as in llm.c, so
 *     several steps or several uses of a parameter sum without extra buffers. Zero them yourself.
 *   - Optional outputs may be NULL (said per function); then that gradient is not computed.
 *   - Sizes are int64_t and must be >= 1; a NULL required pointer or a size <= 0 gives
 *     QF_ERR_ARG with a message naming the function and the argument.
 *   - Elementwise ops (gelu, dropout, residual) allow out == in (in place); row ops (layernorm,
 *     softmax) allow out == in too. Other overlaps are undefined.
 *   - Rows run in parallel (OpenMP, qf_threads()); layernorm, gelu and softmax have AVX2 and
 *     AVX-512 paths chosen by qf_get_isa(), and a scalar path.
 */
#ifndef QFUSE_OPS_H
#define QFUSE_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- linear (torch.nn.functional.linear) ---------------------------------------------------
 * out[N,Cout] = in[N,Cin] @ weight[Cout,Cin]^T + bias[Cout]. weight in torch's
 * [out_features, in_features] layout; bias may be NULL. One SGEMM (the linked BLAS). Sizes must fit in int (BLAS limit). */
qf_status qf_linear_forward(float *out, const float *in, const float *weight, const float *bias,
                            int64_t N, int64_t Cin, int64_t Cout);
/* d_in[N,Cin] = d_out @ weight (overwritten; NULL skips); d_weight[Cout,Cin] += d_out^T @ in
 * (NULL skips); d_bias[Cout] += column sums of d_out (NULL skips). */
qf_status qf_linear_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out,
                             const float *in, const float *weight, int64_t N, int64_t Cin, int64_t Cout);

/* ---- layer norm over the last dim (torch.nn.functional.layer_norm) -------------------------
 * out = (in - mean) * rstd * weight + bias, mean and biased variance per row,
 * rstd = 1/sqrt(var + eps). weight, bias [C] may be NULL (= 1, = 0). mean, rstd [N] receive the
 * row statistics backward needs (NULL skips: inference). eps must be >= 0 and finite. */
qf_status qf_layernorm_forward(float *out, float *mean, float *rstd, const float *in,
                               const float *weight, const float *bias, int64_t N, int64_t C,
                               float eps);
/* d_in[N,C] overwritten (NULL skips); d_weight[C] += sum_rows d_out * xhat; d_bias[C] +=
 * sum_rows d_out (each NULL skips). mean/rstd from the forward; weight as in the forward. */
qf_status qf_layernorm_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out,
                                const float *in, const float *weight, const float *mean,
                                const float *rstd, int64_t N, int64_t C);

/* ---- GELU (torch.nn.functional.gelu) --------------------------------------------------------
 * ERF: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). TANH (torch approximate='tanh'):
 * 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). The SIMD paths use polynomial exp/erfc with
 * absolute error below 2e-7 in Phi (the scalar path uses libm). n elements. */
typedef enum { QF_GELU_ERF = 0, QF_GELU_TANH = 1 } qf_gelu_kind;
qf_status qf_gelu_forward(float *out, const float *in, int64_t n, qf_gelu_kind kind);
/* d_in = d_out * gelu'(in), overwritten; d_in == d_out allowed. */
qf_status qf_gelu_backward(float *d_in, const float *d_out, const float *in, int64_t n,
                           qf_gelu_kind kind);

/* ---- softmax over the last dim (numerically stable: exp(x - rowmax)) ----------------------
 * -inf entries get probability 0. A row that is entirely -inf gives all zeros (torch gives NaN;
 * zeros keep fully masked rows finite, as qf_sdpa_forward does). */
qf_status qf_softmax_forward(float *out, const float *in, int64_t N, int64_t C);
/* d_in = out * (d_out - sum_row(d_out * out)), overwritten; out is the forward's result. */
qf_status qf_softmax_backward(float *d_in, const float *d_out, const float *out, int64_t N,
                              int64_t C);

/* ---- dropout (counter-based: the mask is a pure function of seed, offset, index) -----------
 * Element i is kept iff qf_philox_uniform(seed, offset, i) >= p; kept values are scaled by
 * 1/(1-p), dropped ones are 0. p in [0,1) (else QF_ERR_ARG); p = 0 copies. The stream is
 * qfuse's own, not torch's: masks match torch's only in distribution. */
qf_status qf_dropout_forward(float *out, const float *in, int64_t n, float p, uint64_t seed,
                             uint64_t offset);
/* Regenerates the same mask: d_in = mask * d_out / (1-p), overwritten. */
qf_status qf_dropout_backward(float *d_in, const float *d_out, int64_t n, float p, uint64_t seed,
                              uint64_t offset);

/* ---- embedding lookup (torch.nn.functional.embedding) ---------------------------------------
 * out[N,C] = table[ids[n], :], table [V,C]. ids are int32 (token ids never need 64 bits here);
 * every id must be in [0,V): otherwise QF_ERR_ARG naming the position, the id and V, and out is
 * left untouched (all ids are checked before anything is written). */
qf_status qf_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N,
                               int64_t V, int64_t C);
/* d_table[ids[n], :] += d_out[n, :] (scatter-add; repeated ids sum). Same id checks. */
qf_status qf_embedding_backward(float *d_table, const float *d_out, const int32_t *ids, int64_t N,
                                int64_t V, int64_t C);

/* ---- residual add ---------------------------------------------------------------------------
 * out = a + b over n elements; out may equal a or b. */
qf_status qf_residual_forward(float *out, const float *a, const float *b, int64_t n);
/* d_a = d_out, d_b = d_out (overwritten; either may be NULL; may equal d_out). Provided for
 * uniformity: a caller that accumulates into a residual stream can skip it. */
qf_status qf_residual_backward(float *d_a, float *d_b, const float *d_out, int64_t n);

/* ---- MHA introspection (src/models/mha.c; the rest of qf_mha_* is in qfuse.h) --------------
 * The configuration m was loaded with (kdim/vdim resolved: never 0). */
qf_status qf_mha_get_config(const qf_mha *m, qf_mha_config *out);
/* B, L, S of the last successful qf_mha_forward on m; QF_ERR_ARG if there was none. Lets a
 * caller size grad_query [.., E], grad_key [.., kdim], grad_value [.., vdim] for backward. */
qf_status qf_mha_last_shape(const qf_mha *m, int64_t *B, int64_t *L, int64_t *S);

/* ---- CUDA device memory (the CUDA backend; libqfuse built with `make CUDA=1`) -------------
 * The device flag of an op is where its tensors live: qf_sdpa_forward / qf_sdpa_backward,
 * qf_linear_forward, qf_layernorm_forward, qf_gelu_forward and qf_residual_forward run on the
 * GPU when their tensors are in GPU memory (qf_cuda_malloc, or any cudaMalloc'd pointer once
 * qf_cuda_init has succeeded), on the CPU otherwise. Every tensor of one call, the mask's data
 * included, must be on the same side (QF_ERR_ARG naming the two tensors otherwise). GPU calls
 * are queued on the backend's own stream, a blocking stream (it orders with the legacy default
 * stream, so work other libraries queue there is seen in order): they return before the kernels
 * finish, except where a finite check (check_finite) reads its verdict back; qf_cuda_download
 * and qf_cuda_synchronize wait for them. Whole models go to the GPU with qf_qformer_to_device /
 * qf_prefusion_to_device (qfuse_models.h).
 * In a build without CUDA, qf_cuda_init and the others return QF_ERR_UNSUPPORTED saying so. */
/* Picks GPU 0 and checks it is usable (QF_ERR_UNSUPPORTED with the CUDA runtime's reason). */
qf_status qf_cuda_init(void);
qf_status qf_cuda_malloc(void **out, size_t bytes);          /* *out = NULL on failure      */
qf_status qf_cuda_free(void *ptr);                           /* NULL is allowed             */
qf_status qf_cuda_upload(void *dst_device, const void *src_host, size_t bytes);
qf_status qf_cuda_download(void *dst_host, const void *src_device, size_t bytes);
/* Waits for every queued GPU call; reports an error a kernel hit while running. */
qf_status qf_cuda_synchronize(void);
/* float32 products (linear layers) on the GPU: on = 1 lets cuBLAS use TF32 tensor cores (inputs
 * rounded to 10-bit mantissas: ~1e-3 relative error, several times faster); 0 (the default)
 * keeps full float32. Applies to the calls made after it (a captured graph keeps its mode). */
qf_status qf_cuda_set_tf32(int on);

/* ---- bfloat16 scaled dot-product attention (CUDA backend only) -----------------------------
 * qf_sdpa_forward / qf_sdpa_backward (qfuse.h) with q, k, v, out, grad_out, dq, dk, dv in
 * bfloat16 (uint16_t bit patterns, row-major as there) and lse in float32, all in GPU memory;
 * float32 accumulation on tensor cores. Same params and semantics: scale, is_causal (top-left),
 * GQA, bool (uint8) or float32 masks in GPU memory broadcast to [B,Hq,L,S], fully masked rows give
 * out = 0, lse = -inf and zero gradients; check_finite screens q, k, v (grad_out) and a float mask
 * (one extra read each, then a wait for the verdict). Head dims D, Dv <= 128 (64 and 128 fastest);
 * any L, S. Not supported (QF_ERR_UNSUPPORTED): dropout_p > 0, D or Dv > 128, host pointers (bf16
 * SDPA runs on the CUDA backend only), and any call in a build without CUDA (make CUDA=1).
 * Accuracy, measured against float64 on the same bf16 inputs: out and gradients within about 1e-2
 * of the largest magnitude (tests/python/test_cuda_bf16.py states and checks the bounds).
 * Forward: lse [B,Hq,L] optional (NULL skips); backward needs the forward's out and lse.
 * Speed: the forward uses Hopper warpgroup MMA (wgmma) for D = Dv in {64,128}, L > 64 when the
 * library is compiled for sm_90a (CUDA_GENCODE, see src/backend/cuda/sdpa_bf16.cu), mma.sync
 * otherwise; QFUSE_SDPA_BF16_KERNEL=mma forces the mma.sync kernel. */
qf_status qf_sdpa_forward_bf16(const qf_sdpa_params *p, const uint16_t *q, const uint16_t *k,
                               const uint16_t *v, uint16_t *out, float *lse);
qf_status qf_sdpa_backward_bf16(const qf_sdpa_params *p, const uint16_t *q, const uint16_t *k,
                                const uint16_t *v, const uint16_t *out, const float *lse,
                                const uint16_t *grad_out, uint16_t *dq, uint16_t *dk, uint16_t *dv);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_OPS_H */
