/* sdpa_backward.c - CPU backward of scaled dot-product attention (float32) for
 * loss = sum(out * grad_out): the FlashAttention-2 backward, recomputing P from the forward's lse.
 *
 * Math, per (batch, query head h, row i, key j) with kv head g = h / group:
 *   s_ij = scale * q_i.k_j + mask_ij (pairs excluded by causal / bool mask have P = 0),
 *   P_ij = exp(s_ij - lse_i), Z_ij = dropout keep factor (0 or 1/(1-p), 1 without dropout),
 *   D_i = dO_i . out_i          (= sum_j P_ij dP_ij, since out_i = sum_j Z_ij P_ij v_j),
 *   dP_ij = Z_ij (dO_i . v_j),  dS_ij = P_ij (dP_ij - D_i),
 *   dV_j += Z_ij P_ij dO_i,  dQ_i = scale sum_j dS_ij k_j,  dK_j += scale sum_i dS_ij q_i.
 * GQA: dk/dv of kv head g sum over the group's query heads. A row with lse = -inf (no
 * attendable key) contributes nothing and gets dq = 0.
 *
 * Invariants: dq, dk, dv are overwritten; the dropout decision of element (b,h,i,j) is
 * qf_philox_uniform(seed, offset, ((b*Hq+h)*L+i)*S+j) >= p, exactly the forward's.
 *
 * Scalar path: parallel over (batch, kv head) pairs; each pair walks its query heads and rows
 * in order, so it owns its dk/dv rows and the dq rows of its heads (no atomics). */
#include "sdpa_internal.h"
#include <math.h>
#include <omp.h>
#include <string.h>

/* ---------------------------------- scalar path ---------------------------------- */

static qf_status backward_scalar(const qf_sdpa_problem *pr, const float *q, const float *k,
                                 const float *v, const float *out, const float *lse,
                                 const float *grad_out, float *dq, float *dk, float *dv) {
    const int64_t B = pr->B, Hq = pr->Hq, Hkv = pr->Hkv, L = pr->L, S = pr->S, D = pr->D, Dv = pr->Dv;
    const int nt = qf_threads();
    const size_t row = qf_align_up((size_t)S * sizeof(float), 64);
    void *scr;
    QF_TRY(qf_scratch(2 * row * (size_t)nt, &scr));
    const float keep_scale = pr->dropout_p > 0 ? 1.0f / (1.0f - pr->dropout_p) : 1.0f;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t pair = 0; pair < B * Hkv; pair++) {
        float *p = (float *)((char *)scr + 2 * row * (size_t)omp_get_thread_num());
        float *z = (float *)((char *)p + row);
        const int64_t b = pair / Hkv, g = pair % Hkv;
        const float *kb = k + pair * S * D, *vb = v + pair * S * Dv;
        float *dkb = dk + pair * S * D, *dvb = dv + pair * S * Dv;
        memset(dkb, 0, (size_t)(S * D) * sizeof(float));
        memset(dvb, 0, (size_t)(S * Dv) * sizeof(float));
        for (int64_t h = g * pr->group; h < (g + 1) * pr->group; h++) {
            for (int64_t i = 0; i < L; i++) {
                const int64_t r = (b * Hq + h) * L + i;
                const float *qi = q + r * D, *oi = out + r * Dv, *doi = grad_out + r * Dv;
                float *dqi = dq + r * D;
                memset(dqi, 0, (size_t)D * sizeof(float));
                const float li = lse[r];
                if (li == -INFINITY) continue;
                float Di = 0;
                for (int64_t d = 0; d < Dv; d++) Di += doi[d] * oi[d];
                for (int64_t j = 0; j < S; j++) {
                    p[j] = 0;
                    z[j] = 0;
                    if (pr->is_causal && j > i) continue;
                    const int64_t mi = b * pr->ms_b + h * pr->ms_h + i * pr->ms_i + j * pr->ms_j;
                    if (pr->mask_kind == QF_MASK_BOOL && !((const uint8_t *)pr->mask)[mi]) continue;
                    float acc = 0;
                    for (int64_t d = 0; d < D; d++) acc += qi[d] * kb[j * D + d];
                    float s = acc * pr->scale;
                    if (pr->mask_kind == QF_MASK_FLOAT) s += ((const float *)pr->mask)[mi];
                    p[j] = expf(s - li);
                    z[j] = keep_scale;
                    if (pr->dropout_p > 0 &&
                        qf_philox_uniform(pr->seed, pr->offset, (uint64_t)(r * S + j)) < pr->dropout_p)
                        z[j] = 0;
                }
                for (int64_t j = 0; j < S; j++) {
                    if (p[j] == 0) continue;
                    const float *vj = vb + j * Dv, *kj = kb + j * D;
                    float *dvj = dvb + j * Dv, *dkj = dkb + j * D;
                    float dpj = 0;
                    if (z[j] != 0) {
                        const float zp = z[j] * p[j];
                        for (int64_t d = 0; d < Dv; d++) {
                            dpj += doi[d] * vj[d];
                            dvj[d] += zp * doi[d];
                        }
                        dpj *= z[j];
                    }
                    const float ds = p[j] * (dpj - Di) * pr->scale;
                    for (int64_t d = 0; d < D; d++) {
                        dqi[d] += ds * kj[d];
                        dkj[d] += ds * qi[d];
                    }
                }
            }
        }
    }
    return QF_OK;
}

qf_status qf_cpu_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *grad_out, float *dq, float *dk, float *dv) {
    return backward_scalar(pr, q, k, v, out, lse, grad_out, dq, dk, dv);
}
