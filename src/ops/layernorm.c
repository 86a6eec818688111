/* layernorm.c - layer norm over the last dim, forward and backward (torch.nn.functional.layer_norm).
 * Per row: mean, biased variance (two passes over the row: no cancellation from E[x^2]-E[x]^2),
 * rstd = 1/sqrt(var + eps), out = (x - mean) * rstd * w + b.
 * Backward per row, with xhat = (x - mean) * rstd and g = d_out * w:
 *   d_x = rstd * (g - mean(g) - xhat * mean(g * xhat)),  d_w += d_out * xhat,  d_b += d_out.
 * Rows run in parallel; d_w/d_b are summed into per-thread partial rows in scratch memory and
 * reduced once at the end, so no two threads ever add to the same address.
 * Invariants: a missing weight/bias is replaced by a scratch row of ones/zeros so every path
 * sees the same arguments; the AVX paths differ from the scalar one only in summation order. */
#include "internal.h"
#include "backend/backend.h"
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

typedef void (*ln_fwd_fn)(float *y, const float *x, const float *w, const float *b, int64_t C,
                          float eps, float *mean_out, float *rstd_out);
/* dx may be NULL (only d_w/d_b partials wanted). */
typedef void (*ln_bwd_fn)(float *dx, float *dw_acc, float *db_acc, const float *dy, const float *x,
                          const float *w, float mean, float rstd, int64_t C);

/* ---- scalar ---- */
static void ln_fwd_row_scalar(float *y, const float *x, const float *w, const float *b, int64_t C,
                              float eps, float *mean_out, float *rstd_out) {
    float s = 0.0f;
    for (int64_t c = 0; c < C; c++) s += x[c];
    float mean = s / (float)C, v = 0.0f;
    for (int64_t c = 0; c < C; c++) { float d = x[c] - mean; v += d * d; }
    float rstd = 1.0f / sqrtf(v / (float)C + eps);
    for (int64_t c = 0; c < C; c++) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
    *mean_out = mean;
    *rstd_out = rstd;
}

static void ln_bwd_row_scalar(float *dx, float *dw_acc, float *db_acc, const float *dy,
                              const float *x, const float *w, float mean, float rstd, int64_t C) {
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = 0; c < C; c++) {
        float xhat = (x[c] - mean) * rstd, g = dy[c] * w[c];
        s1 += g;
        s2 += g * xhat;
        dw_acc[c] += dy[c] * xhat;
        db_acc[c] += dy[c];
    }
    if (!dx) return;
    s1 /= (float)C;
    s2 /= (float)C;
    for (int64_t c = 0; c < C; c++) {
        float xhat = (x[c] - mean) * rstd;
        dx[c] = (dy[c] * w[c] - s1 - xhat * s2) * rstd;
    }
}

/* ---- AVX2 (8 lanes, scalar tail) ---- */
QF_TARGET_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

QF_TARGET_AVX2 static void ln_fwd_row_avx2(float *y, const float *x, const float *w, const float *b,
                                           int64_t C, float eps, float *mean_out, float *rstd_out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + c));
    float s = hsum256(acc);
    for (; c < C; c++) s += x[c];
    float mean = s / (float)C;
    __m256 mv = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (c = 0; c + 8 <= C; c += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + c), mv);
        acc = _mm256_fmadd_ps(d, d, acc);
    }
    float v = hsum256(acc);
    for (; c < C; c++) { float d = x[c] - mean; v += d * d; }
    float rstd = 1.0f / sqrtf(v / (float)C + eps);
    __m256 rv = _mm256_set1_ps(rstd);
    for (c = 0; c + 8 <= C; c += 8) {
        __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), mv), rv);
        _mm256_storeu_ps(y + c, _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
    }
    for (; c < C; c++) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
    *mean_out = mean;
    *rstd_out = rstd;
}

QF_TARGET_AVX2 static void ln_bwd_row_avx2(float *dx, float *dw_acc, float *db_acc, const float *dy,
                                           const float *x, const float *w, float mean, float rstd,
                                           int64_t C) {
    __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
    __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
        __m256 d = _mm256_loadu_ps(dy + c);
        __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), mv), rv);
        __m256 g = _mm256_mul_ps(d, _mm256_loadu_ps(w + c));
        a1 = _mm256_add_ps(a1, g);
        a2 = _mm256_fmadd_ps(g, xh, a2);
        _mm256_storeu_ps(dw_acc + c, _mm256_fmadd_ps(d, xh, _mm256_loadu_ps(dw_acc + c)));
        _mm256_storeu_ps(db_acc + c, _mm256_add_ps(d, _mm256_loadu_ps(db_acc + c)));
    }
    float s1 = hsum256(a1), s2 = hsum256(a2);
    for (; c < C; c++) {
        float xhat = (x[c] - mean) * rstd, g = dy[c] * w[c];
        s1 += g;
        s2 += g * xhat;
        dw_acc[c] += dy[c] * xhat;
        db_acc[c] += dy[c];
    }
    if (!dx) return;
    s1 /= (float)C;
    s2 /= (float)C;
    __m256 s1v = _mm256_set1_ps(s1), s2v = _mm256_set1_ps(s2);
    for (c = 0; c + 8 <= C; c += 8) {
        __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), mv), rv);
        __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dy + c), _mm256_loadu_ps(w + c));
        __m256 t = _mm256_sub_ps(_mm256_sub_ps(g, s1v), _mm256_mul_ps(xh, s2v));
        _mm256_storeu_ps(dx + c, _mm256_mul_ps(t, rv));
    }
    for (; c < C; c++) {
        float xhat = (x[c] - mean) * rstd;
        dx[c] = (dy[c] * w[c] - s1 - xhat * s2) * rstd;
    }
}

/* ---- AVX-512 (16 lanes, masked tail) ---- */
QF_TARGET_AVX512 static void ln_fwd_row_avx512(float *y, const float *x, const float *w,
                                               const float *b, int64_t C, float eps,
                                               float *mean_out, float *rstd_out) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, x + c));
    }
    float mean = _mm512_reduce_add_ps(acc) / (float)C;
    __m512 mv = _mm512_set1_ps(mean);
    acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + c), mv);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)C + eps);
    __m512 rv = _mm512_set1_ps(rstd);
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mv), rv);
        __m512 r = _mm512_fmadd_ps(xh, _mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, b + c));
        _mm512_mask_storeu_ps(y + c, m, r);
    }
    *mean_out = mean;
    *rstd_out = rstd;
}

QF_TARGET_AVX512 static void ln_bwd_row_avx512(float *dx, float *dw_acc, float *db_acc,
                                               const float *dy, const float *x, const float *w,
                                               float mean, float rstd, int64_t C) {
    __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 d = _mm512_maskz_loadu_ps(m, dy + c);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mv), rv);
        __m512 g = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, w + c));
        a1 = _mm512_add_ps(a1, g);
        a2 = _mm512_fmadd_ps(g, xh, a2); /* g = 0 in the tail lanes */
        _mm512_mask_storeu_ps(dw_acc + c, m, _mm512_fmadd_ps(d, xh, _mm512_maskz_loadu_ps(m, dw_acc + c)));
        _mm512_mask_storeu_ps(db_acc + c, m, _mm512_add_ps(d, _mm512_maskz_loadu_ps(m, db_acc + c)));
    }
    if (!dx) return;
    __m512 s1v = _mm512_set1_ps(_mm512_reduce_add_ps(a1) / (float)C);
    __m512 s2v = _mm512_set1_ps(_mm512_reduce_add_ps(a2) / (float)C);
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 m = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mv), rv);
        __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + c), _mm512_maskz_loadu_ps(m, w + c));
        __m512 t = _mm512_sub_ps(_mm512_sub_ps(g, s1v), _mm512_mul_ps(xh, s2v));
        _mm512_mask_storeu_ps(dx + c, m, _mm512_mul_ps(t, rv));
    }
}

/* ---- dispatch ---- */
static qf_status check_sizes(const char *fn, int64_t N, int64_t C) {
    if (N <= 0 || C <= 0)
        return qf_fail(QF_ERR_ARG, "%s: sizes must be >= 1, got N = %lld, C = %lld", fn,
                       (long long)N, (long long)C);
    size_t tmp;
    return qf_mul_size((size_t)N, (size_t)C, fn, &tmp);
}

static qf_status check_forward(const char *fn, const float *out, const float *in, int64_t N, int64_t C,
                               float eps) {
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!in) return qf_fail(QF_ERR_ARG, "%s: in is NULL", fn);
    QF_TRY(check_sizes(fn, N, C));
    if (!(eps >= 0.0f) || isinf(eps))
        return qf_fail(QF_ERR_ARG, "%s: eps = %g, expected a finite value >= 0", fn, (double)eps);
    return QF_OK;
}

/* Validates, then runs on the backend holding the tensors; the CPU path is qf_cpu_layernorm_forward. */
qf_status qf_layernorm_forward(float *out, float *mean, float *rstd, const float *in,
                               const float *weight, const float *bias, int64_t N, int64_t C,
                               float eps) {
    const char *fn = "qf_layernorm_forward";
    QF_TRY(check_forward(fn, out, in, N, C, eps));
    const void *ptrs[6] = {out, mean, rstd, in, weight, bias};
    static const char *const names[6] = {"out", "mean", "rstd", "in", "weight", "bias"};
    const qf_backend *be;
    QF_TRY(qf_backend_for(fn, ptrs, names, 6, &be));
    if (be != qf_backend_cpu()) return be->layernorm_forward(out, mean, rstd, in, weight, bias, N, C, eps);
    return qf_cpu_layernorm_forward(out, mean, rstd, in, weight, bias, N, C, eps);
}

qf_status qf_cpu_layernorm_forward(float *out, float *mean, float *rstd, const float *in,
                                   const float *weight, const float *bias, int64_t N, int64_t C,
                                   float eps) {
    QF_TRY(check_forward("qf_layernorm_forward", out, in, N, C, eps));
    size_t cpad = qf_align_up((size_t)C, 16);
    float *ones = NULL, *zeros = NULL;
    if (!weight || !bias) {
        void *s;
        QF_TRY(qf_scratch(2 * cpad * sizeof(float), &s));
        ones = s;
        zeros = ones + cpad;
        for (int64_t c = 0; c < C; c++) { ones[c] = 1.0f; zeros[c] = 0.0f; }
    }
    const float *w = weight ? weight : ones, *b = bias ? bias : zeros;
    qf_isa isa = qf_get_isa();
    ln_fwd_fn row = isa == QF_ISA_AVX512 ? ln_fwd_row_avx512
                  : isa == QF_ISA_AVX2   ? ln_fwd_row_avx2 : ln_fwd_row_scalar;
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 16384)
    for (int64_t n = 0; n < N; n++) {
        float mu, rs;
        row(out + n * C, in + n * C, w, b, C, eps, &mu, &rs);
        if (mean) mean[n] = mu;
        if (rstd) rstd[n] = rs;
    }
    return QF_OK;
}

qf_status qf_layernorm_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out,
                                const float *in, const float *weight, const float *mean,
                                const float *rstd, int64_t N, int64_t C) {
    const char *fn = "qf_layernorm_backward";
    if (!d_out) return qf_fail(QF_ERR_ARG, "%s: d_out is NULL", fn);
    if (!in) return qf_fail(QF_ERR_ARG, "%s: in is NULL", fn);
    if (!mean) return qf_fail(QF_ERR_ARG, "%s: mean is NULL (save it in the forward)", fn);
    if (!rstd) return qf_fail(QF_ERR_ARG, "%s: rstd is NULL (save it in the forward)", fn);
    QF_TRY(check_sizes(fn, N, C));
    if (!d_in && !d_weight && !d_bias) return QF_OK;
    int nt = qf_threads();
    if (N * C <= 16384) nt = 1;
    size_t cpad = qf_align_up((size_t)C, 16);
    /* scratch: ones[cpad] | per thread: dw[cpad] db[cpad] */
    void *s;
    QF_TRY(qf_scratch((1 + 2 * (size_t)nt) * cpad * sizeof(float), &s));
    float *ones = s, *part = ones + cpad;
    for (int64_t c = 0; c < C; c++) ones[c] = 1.0f;
    memset(part, 0, 2 * (size_t)nt * cpad * sizeof(float));
    const float *w = weight ? weight : ones;
    qf_isa isa = qf_get_isa();
    ln_bwd_fn row = isa == QF_ISA_AVX512 ? ln_bwd_row_avx512
                  : isa == QF_ISA_AVX2   ? ln_bwd_row_avx2 : ln_bwd_row_scalar;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        float *dw = part + 2 * (size_t)t * cpad, *db = dw + cpad;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            row(d_in ? d_in + n * C : NULL, dw, db, d_out + n * C, in + n * C, w, mean[n], rstd[n], C);
    }
    for (int t = 0; t < nt; t++) {
        const float *dw = part + 2 * (size_t)t * cpad, *db = dw + cpad;
        if (d_weight) for (int64_t c = 0; c < C; c++) d_weight[c] += dw[c];
        if (d_bias) for (int64_t c = 0; c < C; c++) d_bias[c] += db[c];
    }
    return QF_OK;
}
