/* qmatmul.h - reduced-precision weight formats for linear layers and their matmuls (not
 * installed). A weight W [out,in] (torch layout) is stored as one of:
 *   QF_WEIGHTS_BF16  bfloat16, round-to-nearest-even from float32;
 *   QF_WEIGHTS_INT8  int8 symmetric, one float32 scale per output row (block = 0) or per
 *                    `block` consecutive inputs of a row; w = scale * q, q in [-127, 127];
 *   QF_WEIGHTS_Q4    4-bit symmetric, one float32 scale per `block` (default 32) consecutive
 *                    inputs of a row; w = scale * q, q in [-8, 7] (details in qmatmul.c).
 * (the QF_WEIGHTS_* values are in include/qfuse_llm.h). Activations stay float32.
 *
 * Invariants: a qf_qweight is immutable after qf_qweight_quantize; matmul never allocates
 * except through qf_scratch; y = x W^T computed from the dequantized W to float32 rounding
 * (the bound per format is stated and tested in qmatmul.c / tests).
 */
#ifndef QF_QMATMUL_H
#define QF_QMATMUL_H

#include "internal.h"

typedef struct qf_qweight qf_qweight;

/* Quantizes w [out,in] float32 into *q (allocated). block: int8 0 = per output row, else a
 * positive divisor of in; q4: 0 = default 32, else a positive even divisor of in. Errors name
 * `what` (e.g. the tensor name) and the broken rule. */
qf_status qf_qweight_quantize(int format, int64_t block, const float *w, int64_t out, int64_t in,
                              const char *what, qf_qweight **q);
void qf_qweight_free(qf_qweight *q);
int qf_qweight_format(const qf_qweight *q);
size_t qf_qweight_bytes(const qf_qweight *q);          /* bytes of weights + scales */
/* w [out,in] float32 = the dequantized weight. */
qf_status qf_qweight_dequantize(const qf_qweight *q, float *w);
/* y[N,out] = x[N,in] W^T (+ bias[out] when bias != NULL). */
qf_status qf_qweight_matmul(float *y, const float *x, const qf_qweight *q, const float *bias, int64_t N);

/* y[i][N,out_i] = x[N,in] W_i^T (+ bias[i]) for the n (1..8) weights q[0..n-1], which must share
 * `in` (formats may differ). bias may be NULL (no biases) or hold NULLs. The same results as n
 * calls of qf_qweight_matmul; at N < 16 (decoding) all rows of all weights are one parallel
 * region and x is prepared once (q/k/v or gate/up of a layer). */
qf_status qf_qweight_matmul_multi(int n, float *const *y, const float *x, const qf_qweight *const *q,
                                  const float *const *bias, int64_t N);
/* g[N,out] = silu(x Wgate^T + gate_bias) * (x Wup^T + up_bias) (LLaMA/Qwen2's MLP input), silu(a)
 * = a / (1 + expf(-a)) in float32; u[N,out] is overwritten with the up projection. gate and up
 * have one shape; biases may be NULL. At N < 16 one parallel region: each task computes the
 * same rows of both and multiplies them. */
qf_status qf_qweight_matmul_glu(float *g, float *u, const float *x, const qf_qweight *gate, const qf_qweight *up,
                                const float *gate_bias, const float *up_bias, int64_t N);

#endif
