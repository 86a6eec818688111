/* softmax.c - softmax over the last dim, forward and backward.
 * Forward per row: m = max(x); e = exp(x - m); y = e / sum(e). Subtracting the row max keeps
 * every exponent <= 0 (no overflow) and the largest term equal to 1 (no total underflow).
 * A row whose max is -inf (every entry -inf: fully masked) is written as zeros.
 * Backward per row: d_x = y * (d_y - sum(d_y * y)).
 * The SIMD paths use the degree-7 polynomial exp of simd_math.h (relative error ~1e-7); they
 * differ from the scalar path (libm expf) only in rounding and summation order. Rows run in
 * parallel. */
#include "internal.h"
#include "simd_math.h"
#include <immintrin.h>
#include <math.h>

typedef void (*sm_fwd_fn)(float *y, const float *x, int64_t C);
typedef void (*sm_bwd_fn)(float *dx, const float *dy, const float *y, int64_t C);

/* ---- scalar ---- */
static void sm_fwd_scalar(float *y, const float *x, int64_t C) {
    float m = -INFINITY;
    for (int64_t c = 0; c < C; c++) m = x[c] > m ? x[c] : m;
    if (m == -INFINITY) {
        for (int64_t c = 0; c < C; c++) y[c] = 0.0f;
        return;
    }
    float s = 0.0f;
    for (int64_t c = 0; c < C; c++) { y[c] = expf(x[c] - m); s += y[c]; }
    float inv = 1.0f / s;
    for (int64_t c = 0; c < C; c++) y[c] *= inv;
}

static void sm_bwd_scalar(float *dx, const float *dy, const float *y, int64_t C) {
    float dot = 0.0f;
    for (int64_t c = 0; c < C; c++) dot += dy[c] * y[c];
    for (int64_t c = 0; c < C; c++) dx[c] = y[c] * (dy[c] - dot);
}

/* ---- AVX2 ---- */
QF_TARGET_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

QF_TARGET_AVX2 static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

QF_TARGET_AVX2 static void sm_fwd_avx2(float *y, const float *x, int64_t C) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + c));
    float m = hmax256(mv);
    for (; c < C; c++) m = x[c] > m ? x[c] : m;
    if (m == -INFINITY) {
        for (c = 0; c < C; c++) y[c] = 0.0f;
        return;
    }
    mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (c = 0; c + 8 <= C; c += 8) {
        __m256 e = qf_exp256(_mm256_sub_ps(_mm256_loadu_ps(x + c), mv));
        _mm256_storeu_ps(y + c, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum256(acc);
    for (; c < C; c++) { y[c] = expf(x[c] - m); s += y[c]; }
    __m256 inv = _mm256_set1_ps(1.0f / s);
    for (c = 0; c + 8 <= C; c += 8) _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(y + c), inv));
    for (; c < C; c++) y[c] *= 1.0f / s;
}

QF_TARGET_AVX2 static void sm_bwd_avx2(float *dx, const float *dy, const float *y, int64_t C) {
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(dy + c), _mm256_loadu_ps(y + c), acc);
    float dot = hsum256(acc);
    for (; c < C; c++) dot += dy[c] * y[c];
    __m256 dv = _mm256_set1_ps(dot);
    for (c = 0; c + 8 <= C; c += 8)
        _mm256_storeu_ps(dx + c, _mm256_mul_ps(_mm256_loadu_ps(y + c), _mm256_sub_ps(_mm256_loadu_ps(dy + c), dv)));
    for (; c < C; c++) dx[c] = y[c] * (dy[c] - dot);
}

/* ---- AVX-512 ---- */
QF_TARGET_AVX512 static void sm_fwd_avx512(float *y, const float *x, int64_t C) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 k = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, x + c));
    }
    float m = _mm512_reduce_max_ps(mv);
    if (m == -INFINITY) {
        for (int64_t c = 0; c < C; c++) y[c] = 0.0f;
        return;
    }
    mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 k = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 e = qf_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), mv));
        _mm512_mask_storeu_ps(y + c, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 k = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        _mm512_mask_storeu_ps(y + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + c), inv));
    }
}

QF_TARGET_AVX512 static void sm_bwd_avx512(float *dx, const float *dy, const float *y, int64_t C) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 k = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, dy + c), _mm512_maskz_loadu_ps(k, y + c), acc);
    }
    __m512 dv = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for (int64_t c = 0; c < C; c += 16) {
        __mmask16 k = C - c >= 16 ? 0xFFFF : (__mmask16)((1u << (C - c)) - 1);
        __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + c),
                                 _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dy + c), dv));
        _mm512_mask_storeu_ps(dx + c, k, r);
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

qf_status qf_softmax_forward(float *out, const float *in, int64_t N, int64_t C) {
    const char *fn = "qf_softmax_forward";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (!in) return qf_fail(QF_ERR_ARG, "%s: in is NULL", fn);
    QF_TRY(check_sizes(fn, N, C));
    qf_isa isa = qf_get_isa();
    sm_fwd_fn f = isa == QF_ISA_AVX512 ? sm_fwd_avx512 : isa == QF_ISA_AVX2 ? sm_fwd_avx2 : sm_fwd_scalar;
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 16384)
    for (int64_t n = 0; n < N; n++) f(out + n * C, in + n * C, C);
    return QF_OK;
}

qf_status qf_softmax_backward(float *d_in, const float *d_out, const float *out, int64_t N,
                              int64_t C) {
    const char *fn = "qf_softmax_backward";
    if (!d_in) return qf_fail(QF_ERR_ARG, "%s: d_in is NULL", fn);
    if (!d_out) return qf_fail(QF_ERR_ARG, "%s: d_out is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL (the forward's result)", fn);
    QF_TRY(check_sizes(fn, N, C));
    qf_isa isa = qf_get_isa();
    sm_bwd_fn f = isa == QF_ISA_AVX512 ? sm_bwd_avx512 : isa == QF_ISA_AVX2 ? sm_bwd_avx2 : sm_bwd_scalar;
#pragma omp parallel for num_threads(qf_threads()) if (N * C > 16384)
    for (int64_t n = 0; n < N; n++) f(d_in + n * C, d_out + n * C, out + n * C, C);
    return QF_OK;
}
