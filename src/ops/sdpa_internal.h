/* sdpa_internal.h - the resolved form of an attention problem that the kernels consume.
 *
 * qf_sdpa_forward/backward (sdpa.c) validate the public qf_sdpa_params once and turn them into a
 * qf_sdpa_problem: every size is checked, the scale is decided, the mask is reduced to a base
 * pointer plus four element strides (0 on broadcast dimensions). Kernels may therefore assume:
 *   - all sizes >= 1, Hq = group * Hkv, element counts fit in int64 and size_t;
 *   - element (b,h,i,j) of the mask is mask[b*ms_b + h*ms_h + i*ms_i + j*ms_j] (h is the query
 *     head); for BOOL, nonzero = attend; for FLOAT the value is added to the scaled score;
 *   - is_causal: query i may attend key j iff j <= i (top-left alignment, torch's convention);
 *   - dropout (p > 0): element (b,h,i,j) is kept iff
 *       qf_philox_uniform(seed, offset, ((b*Hq + h)*L + i)*S + j) >= p, kept values scaled 1/(1-p);
 *   - a row with no attendable key gives out = 0, lse = -INFINITY, weights = 0, and zero gradients.
 * Softmax statistics: lse[b,h,i] = log(sum_j exp(scale*q_i.k_j + mask_ij)) over attendable j,
 * i.e. before dropout. P_ij = exp(s_ij - lse_i). */
#ifndef QF_SDPA_INTERNAL_H
#define QF_SDPA_INTERNAL_H

#include "internal.h"

typedef struct {
    int64_t B, Hq, Hkv, L, S, D, Dv, group;
    float scale;
    int is_causal;
    float dropout_p;
    uint64_t seed, offset;
    qf_mask_kind mask_kind;
    const void *mask;
    int64_t ms_b, ms_h, ms_i, ms_j;
    /* NaN/Inf screen of the inputs (q, k, v; and grad_out in backward) fused into the kernels:
     * NULL when not asked; else the caller sets *screen = QF_SDPA_UNSCREENED and a kernel that
     * read every input value through its screen sets QF_SDPA_FINITE or QF_SDPA_NONFINITE (the
     * caller then names the value). */
    int *screen;
    /* The element strides (batch, head, row) of q, k, v and out, unit stride inside a row:
     * qf_sdpa_resolve sets those of the contiguous [B, H, len, D] tensors and strided = 0. A
     * caller sets strided = 1 with strides of views, e.g. heads read straight from packed
     * projection rows [B, len, H*D]; taken only by the CUDA forwards without weights (the
     * models on the GPU); every other kernel requires strided == 0. */
    int strided;
    int64_t q_sb, q_sh, q_si, k_sb, k_sh, k_si, v_sb, v_sh, v_si, o_sb, o_sh, o_si;
} qf_sdpa_problem;

enum { QF_SDPA_UNSCREENED = 0, QF_SDPA_FINITE = 1, QF_SDPA_NONFINITE = 2 };

/* Validates p (sizes, gqa, scale, dropout, mask broadcast) into *out. */
qf_status qf_sdpa_resolve(const qf_sdpa_params *p, qf_sdpa_problem *out);

/* CPU kernels (sdpa_forward.c, sdpa_backward.c). Inputs already validated; they may fail only
 * for scratch memory (QF_ERR_NOMEM). */
qf_status qf_cpu_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                              const float *v, float *out, float *lse, float *weights);
qf_status qf_cpu_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *grad_out, float *dq, float *dk, float *dv);

#endif
