/* sdpa_forward.c - CPU forward of scaled dot-product attention (float32).
 *
 * STEP 1 (placeholder): a plain per-row scalar version, obviously correct, so the API can be
 * exercised. Per (b,h,i): scores s_j = scale*q_i.k_j (+mask), causal j <= i, max, exp, sum,
 * dropout, out. Uses a per-thread scratch row of S floats. Invariants: see sdpa_internal.h. */
#include "sdpa_internal.h"
#include <math.h>
#include <omp.h>
#include <string.h>

qf_status qf_cpu_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                              const float *v, float *out, float *lse, float *weights) {
    const int64_t B = pr->B, Hq = pr->Hq, L = pr->L, S = pr->S, D = pr->D, Dv = pr->Dv;
    const int nt = qf_threads();
    size_t row = qf_align_up((size_t)S * sizeof(float), 64);
    void *scr;
    QF_TRY(qf_scratch(row * (size_t)nt, &scr));
    const float keep_scale = pr->dropout_p > 0 ? 1.0f / (1.0f - pr->dropout_p) : 1.0f;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
    for (int64_t r = 0; r < B * Hq * L; r++) {
        float *s = (float *)((char *)scr + row * (size_t)omp_get_thread_num());
        const int64_t i = r % L, h = (r / L) % Hq, b = r / L / Hq, hk = h / pr->group;
        const float *qi = q + r * D;
        const float *kb = k + (b * pr->Hkv + hk) * S * D, *vb = v + (b * pr->Hkv + hk) * S * Dv;
        float mx = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            float sc = -INFINITY;
            int ok = !(pr->is_causal && j > i);
            const int64_t mi = b * pr->ms_b + h * pr->ms_h + i * pr->ms_i + j * pr->ms_j;
            if (ok && pr->mask_kind == QF_MASK_BOOL) ok = ((const uint8_t *)pr->mask)[mi] != 0;
            if (ok) {
                float acc = 0;
                for (int64_t d = 0; d < D; d++) acc += qi[d] * kb[j * D + d];
                sc = acc * pr->scale;
                if (pr->mask_kind == QF_MASK_FLOAT) sc += ((const float *)pr->mask)[mi];
            }
            s[j] = sc;
            if (sc > mx) mx = sc;
        }
        float *o = out + r * Dv;
        memset(o, 0, (size_t)Dv * sizeof(float));
        float *w = weights ? weights + r * S : NULL;
        if (mx == -INFINITY) {
            if (lse) lse[r] = -INFINITY;
            if (w) memset(w, 0, (size_t)S * sizeof(float));
            continue;
        }
        float sum = 0;
        for (int64_t j = 0; j < S; j++) { s[j] = expf(s[j] - mx); sum += s[j]; }
        if (lse) lse[r] = mx + logf(sum);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < S; j++) {
            float pj = s[j] * inv;
            if (pr->dropout_p > 0) {
                float u = qf_philox_uniform(pr->seed, pr->offset, (uint64_t)(r * S + j));
                pj = u >= pr->dropout_p ? pj * keep_scale : 0.0f;
            }
            if (w) w[j] = pj;
            if (pj != 0)
                for (int64_t d = 0; d < Dv; d++) o[d] += pj * vb[j * Dv + d];
        }
    }
    return QF_OK;
}
