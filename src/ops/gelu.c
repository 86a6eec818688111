/* gelu.c - GELU, erf form and tanh form (torch approximate='tanh'), forward and backward.
 *   erf:  y = x Phi(x),  Phi(x) = 0.5 erfc(-x / sqrt 2);       y' = Phi(x) + x phi(x)
 *   tanh: y = 0.5 x (1 + t),  t = tanh(u),  u = k0 (x + k1 x^3);
 *         y' = 0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2)
 * The tanh form is evaluated from e = exp(2u) as 1 + t = 2 e/(e+1) and 1 - t^2 = 4 e/(e+1)^2,
 * which keeps full relative precision in both tails (1 - tanh(u)^2 from a rounded tanh is 0 or
 * off by 30% once |u| > 8). 2u is clamped to <= 80 so e+1 stays a normal float.
 * The scalar path uses libm (erfcf, expf). The SIMD paths use the degree-7 polynomial exp of
 * simd_math.h (relative error ~1e-7) and Abramowitz-Stegun 7.1.26 for erfc (absolute error <= 1.5e-7), so
 * they agree with the scalar path to ~2e-7 relative to max|y|. erfc is evaluated on |x| and
 * mirrored, so Phi(x) for x << 0 has no cancellation.
 * Arrays are cut into blocks processed in parallel; elementwise, so in place is fine. */
#include "internal.h"
#include "backend/backend.h"
#include "simd_math.h"
#include <immintrin.h>
#include <math.h>

#define GELU_K0 0.7978845608028654f   /* sqrt(2/pi) */
#define GELU_K1 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f
#define AS_P 0.3275911f
#define AS_A1 0.254829592f
#define AS_A2 -0.284496736f
#define AS_A3 1.421413741f
#define AS_A4 -1.453152027f
#define AS_A5 1.061405429f

/* kind: 0 erf / 1 tanh; backward when dy != NULL (then y is d_in). */
typedef void (*gelu_fn)(float *y, const float *x, const float *dy, int64_t n, int tanh_form);

/* ---- scalar ---- */
static void gelu_scalar(float *y, const float *x, const float *dy, int64_t n, int tanh_form) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i], r;
        if (tanh_form) {
            float u2 = 2.0f * GELU_K0 * (v + GELU_K1 * v * v * v);
            float e = expf(u2 < 80.0f ? u2 : 80.0f), rcp = 1.0f / (e + 1.0f), er = e * rcp;
            float one_plus_t = 2.0f * er, sech2 = 4.0f * er * rcp;
            r = dy ? dy[i] * (0.5f * one_plus_t +
                              0.5f * v * sech2 * GELU_K0 * (1.0f + 3.0f * GELU_K1 * v * v))
                   : 0.5f * v * one_plus_t;
        } else {
            float phi_cdf = 0.5f * erfcf(-v * INV_SQRT2);
            r = dy ? dy[i] * (phi_cdf + v * INV_SQRT_2PI * expf(-0.5f * v * v)) : v * phi_cdf;
        }
        y[i] = r;
    }
}

/* ---- AVX2 ---- */
/* Phi(x) and exp(-x^2/2) */
QF_TARGET_AVX2 static inline __m256 phi256(__m256 x, __m256 *gauss) {
    __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(INV_SQRT2));
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(AS_P), _mm256_set1_ps(1.0f)));
    __m256 q = _mm256_set1_ps(AS_A5);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(AS_A4));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(AS_A3));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(AS_A2));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(AS_A1));
    __m256 g = qf_exp256(_mm256_mul_ps(_mm256_set1_ps(-1.0f), _mm256_mul_ps(z, z)));
    *gauss = g;
    __m256 half_erfc = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_mul_ps(_mm256_mul_ps(q, t), g));
    __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_blendv_ps(half_erfc, _mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), pos);
}

/* 1 + tanh(u) and 1 - tanh(u)^2 (see the file comment) */
QF_TARGET_AVX2 static inline __m256 tanh256(__m256 u, __m256 *sech2) {
    __m256 e = qf_exp256(_mm256_min_ps(_mm256_set1_ps(80.0f), _mm256_add_ps(u, u)));
    __m256 rcp = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
    __m256 er = _mm256_mul_ps(e, rcp);
    *sech2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(4.0f), er), rcp);
    return _mm256_mul_ps(_mm256_set1_ps(2.0f), er);
}

QF_TARGET_AVX2 static void gelu_avx2(float *y, const float *x, const float *dy, int64_t n, int tanh_form) {
    int64_t i = 0;
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), r;
        if (tanh_form) {
            __m256 v2 = _mm256_mul_ps(v, v);
            __m256 u = _mm256_mul_ps(_mm256_set1_ps(GELU_K0),
                                     _mm256_fmadd_ps(_mm256_mul_ps(v2, v), _mm256_set1_ps(GELU_K1), v));
            __m256 sech2, opt = tanh256(u, &sech2);
            if (dy) {
                __m256 du = _mm256_mul_ps(_mm256_set1_ps(GELU_K0),
                                          _mm256_fmadd_ps(v2, _mm256_set1_ps(3.0f * GELU_K1), one));
                r = _mm256_fmadd_ps(_mm256_mul_ps(half, v), _mm256_mul_ps(sech2, du),
                                    _mm256_mul_ps(half, opt));
                r = _mm256_mul_ps(r, _mm256_loadu_ps(dy + i));
            } else {
                r = _mm256_mul_ps(_mm256_mul_ps(half, v), opt);
            }
        } else {
            __m256 g, p = phi256(v, &g);
            if (dy) {
                r = _mm256_fmadd_ps(_mm256_mul_ps(v, _mm256_set1_ps(INV_SQRT_2PI)), g, p);
                r = _mm256_mul_ps(r, _mm256_loadu_ps(dy + i));
            } else {
                r = _mm256_mul_ps(v, p);
            }
        }
        _mm256_storeu_ps(y + i, r);
    }
    if (i < n) gelu_scalar(y + i, x + i, dy ? dy + i : NULL, n - i, tanh_form);
}

/* ---- AVX-512 ---- */
QF_TARGET_AVX512 static inline __m512 phi512(__m512 x, __m512 *gauss) {
    __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(INV_SQRT2));
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(AS_P), _mm512_set1_ps(1.0f)));
    __m512 q = _mm512_set1_ps(AS_A5);
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(AS_A4));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(AS_A3));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(AS_A2));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(AS_A1));
    __m512 g = qf_exp512(_mm512_mul_ps(_mm512_set1_ps(-1.0f), _mm512_mul_ps(z, z)));
    *gauss = g;
    __m512 half_erfc = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(_mm512_mul_ps(q, t), g));
    __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_mask_sub_ps(half_erfc, pos, _mm512_set1_ps(1.0f), half_erfc);
}

QF_TARGET_AVX512 static inline __m512 tanh512(__m512 u, __m512 *sech2) {
    __m512 e = qf_exp512(_mm512_min_ps(_mm512_set1_ps(80.0f), _mm512_add_ps(u, u)));
    __m512 rcp = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
    __m512 er = _mm512_mul_ps(e, rcp);
    *sech2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(4.0f), er), rcp);
    return _mm512_mul_ps(_mm512_set1_ps(2.0f), er);
}

QF_TARGET_AVX512 static void gelu_avx512(float *y, const float *x, const float *dy, int64_t n, int tanh_form) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i), r;
        if (tanh_form) {
            __m512 v2 = _mm512_mul_ps(v, v);
            __m512 u = _mm512_mul_ps(_mm512_set1_ps(GELU_K0),
                                     _mm512_fmadd_ps(_mm512_mul_ps(v2, v), _mm512_set1_ps(GELU_K1), v));
            __m512 sech2, opt = tanh512(u, &sech2);
            if (dy) {
                __m512 du = _mm512_mul_ps(_mm512_set1_ps(GELU_K0),
                                          _mm512_fmadd_ps(v2, _mm512_set1_ps(3.0f * GELU_K1), one));
                r = _mm512_fmadd_ps(_mm512_mul_ps(half, v), _mm512_mul_ps(sech2, du),
                                    _mm512_mul_ps(half, opt));
                r = _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, dy + i));
            } else {
                r = _mm512_mul_ps(_mm512_mul_ps(half, v), opt);
            }
        } else {
            __m512 g, p = phi512(v, &g);
            if (dy) {
                r = _mm512_fmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(INV_SQRT_2PI)), g, p);
                r = _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, dy + i));
            } else {
                r = _mm512_mul_ps(v, p);
            }
        }
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

/* ---- dispatch ---- */
static qf_status check_n_kind(const char *fn, int64_t n, qf_gelu_kind kind) {
    if (n <= 0) return qf_fail(QF_ERR_ARG, "%s: n must be >= 1, got %lld", fn, (long long)n);
    if (kind != QF_GELU_ERF && kind != QF_GELU_TANH)
        return qf_fail(QF_ERR_ARG, "%s: kind = %d, expected QF_GELU_ERF (0) or QF_GELU_TANH (1)", fn,
                       (int)kind);
    return QF_OK;
}

static qf_status run(const char *fn, float *y, const float *x, const float *dy, int64_t n,
                     qf_gelu_kind kind) {
    QF_TRY(check_n_kind(fn, n, kind));
    qf_isa isa = qf_get_isa();
    gelu_fn f = isa == QF_ISA_AVX512 ? gelu_avx512 : isa == QF_ISA_AVX2 ? gelu_avx2 : gelu_scalar;
    const int64_t blk = 4096, nblk = (n + blk - 1) / blk;
    int tf = kind == QF_GELU_TANH;
#pragma omp parallel for num_threads(qf_threads()) if (nblk > 1)
    for (int64_t b = 0; b < nblk; b++) {
        int64_t i0 = b * blk, len = i0 + blk < n ? blk : n - i0;
        f(y + i0, x + i0, dy ? dy + i0 : NULL, len, tf);
    }
    return QF_OK;
}

/* Validates, then runs on the backend holding the tensors; the CPU path is qf_cpu_gelu_forward. */
qf_status qf_gelu_forward(float *out, const float *in, int64_t n, qf_gelu_kind kind) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_gelu_forward: out is NULL");
    if (!in) return qf_fail(QF_ERR_ARG, "qf_gelu_forward: in is NULL");
    QF_TRY(check_n_kind("qf_gelu_forward", n, kind));
    const void *ptrs[2] = {out, in};
    static const char *const names[2] = {"out", "in"};
    const qf_backend *be;
    QF_TRY(qf_backend_for("qf_gelu_forward", ptrs, names, 2, &be));
    if (be != qf_backend_cpu()) return be->gelu_forward(out, in, n, kind);
    return run("qf_gelu_forward", out, in, NULL, n, kind);
}

qf_status qf_cpu_gelu_forward(float *out, const float *in, int64_t n, qf_gelu_kind kind) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_gelu_forward: out is NULL");
    if (!in) return qf_fail(QF_ERR_ARG, "qf_gelu_forward: in is NULL");
    return run("qf_gelu_forward", out, in, NULL, n, kind);
}

qf_status qf_gelu_backward(float *d_in, const float *d_out, const float *in, int64_t n,
                           qf_gelu_kind kind) {
    if (!d_in) return qf_fail(QF_ERR_ARG, "qf_gelu_backward: d_in is NULL");
    if (!d_out) return qf_fail(QF_ERR_ARG, "qf_gelu_backward: d_out is NULL");
    if (!in) return qf_fail(QF_ERR_ARG, "qf_gelu_backward: in is NULL");
    return run("qf_gelu_backward", d_in, in, d_out, n, kind);
}
