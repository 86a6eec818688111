/* cpu.c - the CPU backend's entry table. The kernels live in src/ops; the entries here are the
 * thin adapters a model needs to call them through the table (backend.h), plus the data-movement
 * loops (heads, 2-D copies) that have no public op of their own.
 *
 * Invariants: every entry is synchronous (the work is done when it returns), so
 * screen_nonfinite's result can be read at once; the loops are parallel only above ~64k
 * elements, below which thread start-up costs more than the copy. */
#include "backend.h"

#include <limits.h>
#include <math.h>
#include <string.h>

static qf_status cpu_gemm_nt(const qf_gemm_nt_args *g) {
    if (g->w_bf16) return qf_fail(QF_ERR_UNSUPPORTED, "gemm: the CPU backend takes float32 weights only here");
    if (g->M > INT_MAX || g->N > INT_MAX || g->K > INT_MAX || g->ldx > INT_MAX || g->ldo > INT_MAX ||
        g->ldr > INT_MAX)
        return qf_fail(QF_ERR_ARG, "gemm: M = %lld, N = %lld, K = %lld: sizes and strides must fit in int (BLAS)",
                       (long long)g->M, (long long)g->N, (long long)g->K);
    qf_gemm_nt(g);
    return QF_OK;
}

static qf_status cpu_add(float *out, const float *a, const float *b, int64_t n) {
    return qf_cpu_residual_forward(out, a, b, n);
}

static qf_status cpu_embedding(float *out, const int32_t *ids, const float *table, const float *pos,
                               int64_t pos_rows, int64_t N, int64_t C) {
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 65536)
    for (int64_t i = 0; i < N; i++) {
        float *o = out + i * C;
        const float *t = table + (int64_t)ids[i] * C;
        if (pos) {
            const float *p = pos + (i % pos_rows) * C;
            for (int64_t c = 0; c < C; c++) o[c] = t[c] + p[c];
        } else {
            memcpy(o, t, (size_t)C * sizeof(float));
        }
    }
    return QF_OK;
}

static qf_status cpu_split_heads(float *heads, const float *tok, int64_t ld, const float *bias, int64_t B,
                                 int64_t nh, int64_t tot, int64_t off, int64_t len, int64_t hd) {
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * nh * hd > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++)
            for (int64_t h = 0; h < nh; h++) {
                float *d = heads + ((b * nh + h) * tot + off + i) * hd;
                const float *s = tok + (b * len + i) * ld + h * hd;
                if (bias) {
                    const float *bh = bias + h * hd;
#pragma omp simd
                    for (int64_t c = 0; c < hd; c++) d[c] = s[c] + bh[c];
                } else {
                    memcpy(d, s, (size_t)hd * sizeof(float));
                }
            }
    return QF_OK;
}

static qf_status cpu_merge_heads(float *tok, int64_t ld, const float *heads, int64_t B, int64_t nh, int64_t tot,
                                 int64_t off, int64_t len, int64_t hd, int acc) {
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * nh * hd > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++)
            for (int64_t h = 0; h < nh; h++) {
                float *d = tok + (b * len + i) * ld + h * hd;
                const float *s = heads + ((b * nh + h) * tot + off + i) * hd;
                if (acc)
                    for (int64_t c = 0; c < hd; c++) d[c] += s[c];
                else
                    memcpy(d, s, (size_t)hd * sizeof(float));
            }
    return QF_OK;
}

static qf_status cpu_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t rows) {
#pragma omp parallel for num_threads(qf_threads()) if (rows * width > 262144)
    for (size_t r = 0; r < rows; r++) memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return QF_OK;
}

static qf_status cpu_dead_rows_mean(float *out, const float *v, const uint8_t *dead, int64_t B, int64_t nh,
                                    int64_t L, int64_t S, int64_t hd) {
    for (int64_t b = 0; b < B; b++) {
        if (!dead[b]) continue;
        for (int64_t h = 0; h < nh; h++) {
            const float *vb = v + (b * nh + h) * S * hd;
            float *o = out + (b * nh + h) * L * hd;
            for (int64_t d = 0; d < hd; d++) {
                double acc = 0.0;
                for (int64_t j = 0; j < S; j++) acc += vb[j * hd + d];
                o[d] = (float)(acc / (double)S);
            }
            for (int64_t i = 1; i < L; i++) memcpy(o + i * hd, o, (size_t)hd * sizeof(float));
        }
    }
    return QF_OK;
}

static qf_status cpu_add_periodic(float *out, const float *a, const float *b, int64_t rows, int64_t period,
                                  int64_t C) {
#pragma omp parallel for num_threads(qf_threads()) if (rows * C > 65536)
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * C;
        const float *x = a ? a + r * C : NULL, *y = b + (r % period) * C;
        for (int64_t c = 0; c < C; c++) o[c] = (x ? x[c] : 0.0f) + y[c];
    }
    return QF_OK;
}

static qf_status cpu_screen_nonfinite(const float *x, int64_t n, int64_t *first) {
    size_t bad = qf_first_nonfinite(x, (size_t)n);
    if ((int64_t)bad < n && (int64_t)bad < *first) *first = (int64_t)bad;
    return QF_OK;
}

/* ---- backward entries: the ops of src/ops, and the two loops qformer_backward.c had inline ---- */

static qf_status cpu_linear_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                     const float *weight, int64_t N, int64_t Cin, int64_t Cout) {
    return qf_linear_backward(d_in, d_weight, d_bias, d_out, in, weight, N, Cin, Cout);
}

/* Autograd's gradient for one dead item (uniform weights 1/K over K keys): dv_j = sum_i do_i / K;
 * ds_ij = (do_i.v_j - mean_j' do_i.v_j') / K; dq = scale ds k; dk = scale ds^T q. */
static void dead_item_backward(const float *q, const float *k, const float *v, const float *dout, float *dq, float *dk,
                               float *dv, int64_t L, int64_t K, int64_t hd, float scale) {
    memset(dq, 0, (size_t)(L * hd) * sizeof(float));
    memset(dk, 0, (size_t)(K * hd) * sizeof(float));
    memset(dv, 0, (size_t)(K * hd) * sizeof(float));
    const double invK = 1.0 / (double)K;
    for (int64_t i = 0; i < L; i++) {
        const float *g = dout + i * hd;
        double mean = 0.0;
        for (int64_t j = 0; j < K; j++) {
            double dp = 0.0;
            for (int64_t d = 0; d < hd; d++) dp += (double)g[d] * v[j * hd + d];
            mean += dp;
        }
        mean *= invK;
        for (int64_t j = 0; j < K; j++) {
            double dp = 0.0;
            for (int64_t d = 0; d < hd; d++) dp += (double)g[d] * v[j * hd + d];
            const float ds = (float)((dp - mean) * invK) * scale;
            for (int64_t d = 0; d < hd; d++) {
                dq[i * hd + d] += ds * k[j * hd + d];
                dk[j * hd + d] += ds * q[i * hd + d];
                dv[j * hd + d] += (float)(g[d] * invK);
            }
        }
    }
}

static qf_status cpu_dead_rows_backward(float *dq, float *dk, float *dv, const float *q, const float *k,
                                        const float *v, const float *dout, const uint8_t *dead, int64_t B,
                                        int64_t nh, int64_t L, int64_t S, int64_t hd, float scale) {
    for (int64_t b = 0; b < B; b++) {
        if (!dead[b]) continue;
        for (int64_t h = 0; h < nh; h++) {
            const int64_t qo = (b * nh + h) * L * hd, ko = (b * nh + h) * S * hd;
            dead_item_backward(q + qo, k + ko, v + ko, dout + qo, dq + qo, dk + ko, dv + ko, L, S, hd, scale);
        }
    }
    return QF_OK;
}

static qf_status cpu_embedding_backward(float *d_table, float *d_pos, const float *d_out, const int32_t *ids,
                                        int64_t skip_id, int64_t N, int64_t period, int64_t C) {
    if (d_pos) /* one period of rows at a time, in order (as qf_residual_forward adds) */
        for (int64_t r0 = 0; r0 < N; r0 += period) {
            const int64_t n = (N - r0 < period ? N - r0 : period) * C;
            const float *src = d_out + r0 * C;
#pragma omp parallel for num_threads(qf_threads()) if (n > 65536)
            for (int64_t i = 0; i < n; i++) d_pos[i] += src[i];
        }
    if (!d_table) return QF_OK;
    /* column blocks (qf_embedding_backward): no two threads add to one row of d_table */
    const int64_t blk = 64, nblk = (C + blk - 1) / blk;
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 65536)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t c0 = b * blk, c1 = c0 + blk < C ? c0 + blk : C;
        for (int64_t n = 0; n < N; n++) {
            if (ids[n] == skip_id) continue;
            float *dst = d_table + (int64_t)ids[n] * C;
            const float *src = d_out + n * C;
            for (int64_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
    return QF_OK;
}

static qf_status cpu_zero(void *p, size_t bytes) {
    if (bytes) memset(p, 0, bytes);
    return QF_OK;
}

static const qf_backend cpu = {
    .name = "cpu",
    .sdpa_forward = qf_cpu_sdpa_forward,
    .sdpa_backward = qf_cpu_sdpa_backward,
    .gemm_nt = cpu_gemm_nt,
    .layernorm_forward = qf_cpu_layernorm_forward,
    .gelu_forward = qf_cpu_gelu_forward,
    .add = cpu_add,
    .embedding_forward = cpu_embedding,
    .split_heads = cpu_split_heads,
    .merge_heads = cpu_merge_heads,
    .copy2d = cpu_copy2d,
    .dead_rows_mean = cpu_dead_rows_mean,
    .add_periodic = cpu_add_periodic,
    .screen_nonfinite = cpu_screen_nonfinite,
    .linear_backward = cpu_linear_backward,
    .layernorm_backward = qf_layernorm_backward,
    .gelu_backward = qf_gelu_backward,
    .dead_rows_backward = cpu_dead_rows_backward,
    .embedding_backward = cpu_embedding_backward,
    .zero = cpu_zero,
};

const qf_backend *qf_backend_cpu(void) { return &cpu; }
