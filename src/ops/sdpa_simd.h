/* sdpa_simd.h - SIMD building blocks of the fused attention kernels (forward and backward).
 *
 * Everything here is a static inline function compiled for one ISA (QF_TARGET_AVX512 or
 * QF_TARGET_AVX2); callers pick by qf_get_isa(). The pieces:
 *   - qf_sdpa_exp512 / qf_sdpa_exp256: expf on vectors for x <= 88 (softmax feeds x <= 0).
 *     Range reduction x = n*ln2 + r with ln2 split in two (Cody-Waite), |r| <= ln2/2, then a
 *     degree-6 polynomial (Cephes' expf coefficients); 2^n is applied by adding n to the
 *     exponent bits. Relative error <= 1.2e-7 on [-87, 10] (measured against double exp).
 *     Inputs below -87.3 (-inf included) give exactly 0, so masked scores vanish without a test.
 *   - K panels: keys are packed transposed in panels of W keys, panel p = kt[p][d][w] =
 *     k[p*W + w][d] (zero for keys >= S). W = QF_SDPA_W512 (64) / QF_SDPA_W256 (16). A panel is
 *     contiguous and 64-byte aligned when the buffer is, so the score kernel streams it.
 *   - qf_sdpa_scores512/256: C[r][j] = scale * (A_r . Kt[:, j]) for r < nrows, j < nk (nk <=
 *     what the panels hold); A rows have stride lda. Writes whole 16-lane (8-lane) groups: C
 *     rows need round_up(nk, 16) floats (the extra lanes are finite; callers ignore them).
 *     Register tile: 6 rows x 64 keys (AVX-512, 24 zmm accumulators) / 6 x 16 (AVX2, 12 ymm).
 *     qf_sdpa_scores_dot512 computes the same from K in its natural layout (for decoding, where
 *     packing would cost more than it saves).
 *   - qf_sdpa_pv_*: O[r][0:Dv] = alpha[r] * O[r][0:Dv] + sum_{j<nk} P[r][j] * V[j][0:Dv]
 *     (alpha may be NULL: 1). Register tile 6 rows x 64 columns (AVX-512) / 6 x 16 (AVX2); the
 *     Dv tail uses masked loads/stores, so O and V need no padding. Applying alpha while
 *     loading O makes the online-softmax rescale free.
 *   - qf_sdpa_row_mask512/256 + qf_sdpa_mask_lanes512/256: which keys of a score row may be
 *     attended (causal/size limit, bool mask) and the float mask to add; shared by the
 *     forward's softmax and the backward's P rows, so both read a mask the same way.
 *   - qf_sdpa_softmax_row512/256: one online-softmax step on one row of a score tile (mask,
 *     causal limit, running max/sum, exp in place); qf_sdpa_softmax_block512/256 the same on
 *     the rows of a tile, 16 at a time (row reductions by transposes, one vector exp for the
 *     rescale factors).
 *   - qf_sdpa_dropout512: the Philox dropout mask of a run of elements, 64 at a time.
 *   - qf_sdpa_pack_kt512 (16x16 register transposes) / qf_sdpa_pack_kt256 build the K panels;
 *     qf_sdpa_pack_kt512_screen also reports NaN/Inf among the keys it packs, and
 *     qf_sdpa_any_nonfinite512 screens a run of floats (the forward's fused input screen).
 * Nothing here allocates or reads outside the stated extents. */
#ifndef QF_SDPA_SIMD_H
#define QF_SDPA_SIMD_H

#include "internal.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QF_SDPA_W512 64
#define QF_SDPA_W256 16
#define QF_SDPA_ALWAYS_INLINE inline __attribute__((always_inline))

/* ---- packing (plain C: memory bound) ----
 * Packs keys [0, S) of k (row stride ldk) into npanel = ceil(S/W) panels of W keys. */
static inline void qf_sdpa_pack_kt(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D, int W) {
    for (int64_t p0 = 0; p0 < S; p0 += W) {
        float *dst = kt + p0 * D;
        int64_t n = S - p0 < W ? S - p0 : W;
        for (int64_t w = 0; w < n; w++) {
            const float *src = k + (p0 + w) * ldk;
            for (int64_t d = 0; d < D; d++) dst[d * W + w] = src[d];
        }
        for (int64_t w = n; w < W; w++)
            for (int64_t d = 0; d < D; d++) dst[d * W + w] = 0.0f;
    }
}

/* ---- software prefetch stream (per thread) ----
 * The AVX-512 score and P.V tile kernels issue one prefetch (to L2) of the stream's next
 * 64-byte line per inner iteration while it has lines left, so memory reads that the caller
 * knows it will need next overlap this tile's arithmetic instead of stalling a later packing
 * pass. Up to QF_SDPA_PF_RANGES byte ranges are walked in order. The stream is per thread and
 * per translation unit (static _Thread_local): empty unless that file's driver fills it (the
 * forward's whole-pair mode: the next pair's K, V and Q rows). A prefetch never faults and
 * changes no value, so a stale stream costs bandwidth, never correctness. */
#define QF_SDPA_PF_RANGES 4
typedef struct {
    const char *cur, *end;                 /* the range being walked */
    const char *rb[QF_SDPA_PF_RANGES], *re[QF_SDPA_PF_RANGES];
    int next, n;                           /* ranges rb/re[next..n) still to come */
} qf_sdpa_pf_stream;
static _Thread_local qf_sdpa_pf_stream qf_sdpa_pf;

/* Replaces the stream by ranges [b[i], b[i] + bytes[i]) (bytes 0: skipped). */
static inline void qf_sdpa_pf_set(const void *const *b, const size_t *bytes, int n) {
    qf_sdpa_pf.n = 0;
    for (int i = 0; i < n && qf_sdpa_pf.n < QF_SDPA_PF_RANGES; i++) {
        if (!bytes[i]) continue;
        qf_sdpa_pf.rb[qf_sdpa_pf.n] = (const char *)b[i];
        qf_sdpa_pf.re[qf_sdpa_pf.n++] = (const char *)b[i] + bytes[i];
    }
    qf_sdpa_pf.next = 0;
    qf_sdpa_pf.cur = qf_sdpa_pf.end = NULL;
}

static inline void qf_sdpa_pf_clear(void) { qf_sdpa_pf_set(NULL, NULL, 0); }

/* A kernel hands back its cursor; an exhausted range gives way to the next one. */
static QF_SDPA_ALWAYS_INLINE void qf_sdpa_pf_put(const char *cur) {
    qf_sdpa_pf.cur = cur;
    if (cur >= qf_sdpa_pf.end && qf_sdpa_pf.next < qf_sdpa_pf.n) {
        qf_sdpa_pf.cur = qf_sdpa_pf.rb[qf_sdpa_pf.next];
        qf_sdpa_pf.end = qf_sdpa_pf.re[qf_sdpa_pf.next++];
    }
}

/* ====================================== AVX-512 ====================================== */

QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __m512 qf_sdpa_exp512(__m512 x) {
    /* t = x*log2(e) + 1.5*2^23 rounds to an integer n held in t's low mantissa bits, so
     * n << 23 (an integer shift of t) is the exponent increment that multiplies by 2^n. */
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    /* no clamping: -inf (and NaN) turn into NaN below but `live` zeroes them; x <= 88 assumed */
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
    __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* below -87.3 (and -inf, NaN) the result is exactly 0 */
    __m512i e = _mm512_maskz_add_epi32(live, _mm512_castps_si512(y), _mm512_slli_epi32(_mm512_castps_si512(t), 23));
    return _mm512_castsi512_ps(e);
}

/* 16 x 16 transpose of r[0..15] in place (r[c] becomes column c): pairs, quads, lanes. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* u[4g+c], 128-bit lane L: rows 4g..4g+3 of column 4L+c */
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

/* NaN/Inf lanes of x (exponent bits all ones), for the screens fused into the passes below. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __mmask16 qf_sdpa_nonfinite_lanes512(__m512 x) {
    const __m512i em = _mm512_set1_epi32(0x7f800000);
    return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), em), em);
}

/* Whether any of x[0:n) is NaN or Inf. */
QF_TARGET_AVX512 static inline int qf_sdpa_any_nonfinite512(const float *x, int64_t n) {
    __mmask16 bad = 0, bad2 = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        bad |= qf_sdpa_nonfinite_lanes512(_mm512_loadu_ps(x + i));
        bad2 |= qf_sdpa_nonfinite_lanes512(_mm512_loadu_ps(x + i + 16));
    }
    for (; i < n; i += 16) {
        const __mmask16 in = (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        bad |= qf_sdpa_nonfinite_lanes512(_mm512_maskz_loadu_ps(in, x + i));
    }
    return (bad | bad2) != 0;
}

/* qf_sdpa_pack_kt for W = QF_SDPA_W512 with 16 x 16 register transposes. With `screen`, also
 * returns whether any packed key value is NaN or Inf (0 otherwise). */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE int qf_sdpa_pack_kt512_body(float *kt, const float *k, int64_t ldk,
                                                                         int64_t S, int64_t D, const int screen) {
    __mmask16 bad = 0;
    for (int64_t p0 = 0; p0 < S; p0 += QF_SDPA_W512) {
        float *dst = kt + p0 * D;
        for (int64_t w0 = 0; w0 < QF_SDPA_W512; w0 += 16) {
            const int64_t nkeys = S - p0 - w0 < 0 ? 0 : S - p0 - w0 >= 16 ? 16 : S - p0 - w0;
            for (int64_t d0 = 0; d0 < D; d0 += 16) {
                const int64_t nd = D - d0 >= 16 ? 16 : D - d0;
                const __mmask16 dm = (__mmask16)(nd == 16 ? 0xFFFF : (1u << nd) - 1);
                __m512 r[16];
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++)
                    r[t] = t < nkeys ? _mm512_maskz_loadu_ps(dm, k + (p0 + w0 + t) * ldk + d0) : _mm512_setzero_ps();
                if (screen)
#pragma GCC unroll 16
                    for (int t = 0; t < 16; t++) bad |= qf_sdpa_nonfinite_lanes512(r[t]);
                qf_sdpa_transpose16(r);
                if (nd == 16) {
#pragma GCC unroll 16
                    for (int c = 0; c < 16; c++) _mm512_store_ps(dst + (d0 + c) * QF_SDPA_W512 + w0, r[c]);
                } else {
                    for (int64_t c = 0; c < nd; c++) _mm512_store_ps(dst + (d0 + c) * QF_SDPA_W512 + w0, r[c]);
                }
            }
        }
    }
    return bad != 0;
}

QF_TARGET_AVX512 static inline void qf_sdpa_pack_kt512(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D) {
    qf_sdpa_pack_kt512_body(kt, k, ldk, S, D, 0);
}

/* qf_sdpa_pack_kt512 that also screens: returns whether any key value is NaN or Inf. */
QF_TARGET_AVX512 static inline int qf_sdpa_pack_kt512_screen(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D) {
    return qf_sdpa_pack_kt512_body(kt, k, ldk, S, D, 1);
}

/* One register tile of scores: R rows (<= 6) x NV*16 keys (NV <= 4) of one panel. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_scores_tile512(
    const float *a, int64_t lda, const float *kt, int64_t D, float scale, float *c, int64_t ldc,
    const int R, const int NV) {
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    const char *pf = qf_sdpa_pf.cur, *const pfe = qf_sdpa_pf.end;
    for (int64_t d = 0; d < D; d++) {
        if (pf < pfe) { _mm_prefetch(pf, _MM_HINT_T1); pf += 64; }
        __m512 b[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
            if (v < NV) b[v] = _mm512_load_ps(kt + d * QF_SDPA_W512 + 16 * v);
        const float *rows[6] = {a0, a1, a2, a3, a4, a5};
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m512 x = _mm512_set1_ps(rows[r][d]);
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++)
                if (v < NV) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
        }
    }
    qf_sdpa_pf_put(pf);
    const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
            if (v < NV) _mm512_storeu_ps(c + r * ldc + 16 * v, _mm512_mul_ps(acc[r][v], s));
    }
}

#define QF_SDPA_SCORES512_CASE(R)                                                               \
    case R:                                                                                     \
        switch (nv) {                                                                           \
        case 1: qf_sdpa_scores_tile512(ar, lda, kp, D, scale, cr, ldc, R, 1); break;            \
        case 2: qf_sdpa_scores_tile512(ar, lda, kp, D, scale, cr, ldc, R, 2); break;            \
        case 3: qf_sdpa_scores_tile512(ar, lda, kp, D, scale, cr, ldc, R, 3); break;            \
        default: qf_sdpa_scores_tile512(ar, lda, kp, D, scale, cr, ldc, R, 4); break;           \
        }                                                                                       \
        break;

/* C[r][j] = scale * a_r . k_j, r < nrows, j < nk; kt = the first panel of keys 0..nk-1. */
QF_TARGET_AVX512 static inline void qf_sdpa_scores512(const float *a, int64_t lda, int64_t nrows,
                                                      const float *kt, int64_t nk, int64_t D,
                                                      float scale, float *c, int64_t ldc) {
    for (int64_t p0 = 0; p0 < nk; p0 += QF_SDPA_W512) {
        const float *kp = kt + p0 * D;
        int64_t left = nk - p0;
        int nv = left >= QF_SDPA_W512 ? 4 : (int)((left + 15) / 16);
        for (int64_t r0 = 0; r0 < nrows; r0 += 6) {
            const float *ar = a + r0 * lda;
            float *cr = c + r0 * ldc + p0;
            switch (nrows - r0 >= 6 ? 6 : (int)(nrows - r0)) {
                QF_SDPA_SCORES512_CASE(1)
                QF_SDPA_SCORES512_CASE(2)
                QF_SDPA_SCORES512_CASE(3)
                QF_SDPA_SCORES512_CASE(4)
                QF_SDPA_SCORES512_CASE(5)
                default: QF_SDPA_SCORES512_CASE(6)
            }
        }
    }
}

/* Lane t of the result = sum of the 16 lanes of x[t] (a transpose folded into the adds). */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __m512 qf_sdpa_hsum16x16(const __m512 x[16]) {
    __m512 t[8], v[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: partial sums of x[4i..4i+3] */
        __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        v[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x88), _mm512_shuffle_f32x4(v[2], v[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* Scores without packed keys, for few query rows per key (decoding): C[r][j] = scale * a_r . k_j
 * with k in its natural layout (row stride ldk), 16 keys per step reduced by
 * qf_sdpa_hsum16x16. Writes round_up(nk, 16) lanes per row like qf_sdpa_scores512; lanes past
 * nk repeat key nk-1 (finite, ignored). */
QF_TARGET_AVX512 static inline void qf_sdpa_scores_dot512(const float *a, int64_t lda, int64_t nrows,
                                                          const float *k, int64_t ldk, int64_t nk,
                                                          int64_t D, float scale, float *c, int64_t ldc) {
    const int64_t dfull = D & ~(int64_t)15;
    const __mmask16 dt = (__mmask16)((1u << (D & 15)) - 1);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < nk; j0 += 16) {
        const float *kr[16];
        for (int t = 0; t < 16; t++) kr[t] = k + (j0 + t < nk ? j0 + t : nk - 1) * ldk;
        for (int64_t r = 0; r < nrows; r++) {
            const float *ar = a + r * lda;
            __m512 acc[16];
#pragma GCC unroll 16
            for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t d = 0; d < dfull; d += 16) {
                __m512 qa = _mm512_loadu_ps(ar + d);
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) acc[t] = _mm512_fmadd_ps(qa, _mm512_loadu_ps(kr[t] + d), acc[t]);
            }
            if (dt) {
                __m512 qa = _mm512_maskz_loadu_ps(dt, ar + dfull);
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) acc[t] = _mm512_fmadd_ps(qa, _mm512_maskz_loadu_ps(dt, kr[t] + dfull), acc[t]);
            }
            _mm512_storeu_ps(c + r * ldc + j0, _mm512_mul_ps(qf_sdpa_hsum16x16(acc), sc));
        }
    }
}

/* One register tile of P.V: R rows (<= 6) x NV*16 columns (NV <= 4; the last vector masked
 * by `tail`). */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_pv_tile512(
    const float *p, int64_t ldp, int64_t nk, const float *v, int64_t ldv, const float *alpha,
    float *o, int64_t ldo, __mmask16 tail, const int R, const int NV) {
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
        __m512 al = _mm512_set1_ps(alpha ? alpha[r] : 1.0f);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV)
                acc[r][c] = _mm512_mul_ps(al, _mm512_maskz_loadu_ps(c == NV - 1 ? tail : (__mmask16)0xFFFF,
                                                                    o + r * ldo + 16 * c));
    }
    const float *p0 = p, *p1 = p + ldp, *p2 = p + 2 * ldp, *p3 = p + 3 * ldp, *p4 = p + 4 * ldp, *p5 = p + 5 * ldp;
    const char *pf = qf_sdpa_pf.cur, *const pfe = qf_sdpa_pf.end;
    for (int64_t j = 0; j < nk; j++) {
        if (pf < pfe) { _mm_prefetch(pf, _MM_HINT_T1); pf += 64; }
        __m512 b[4];
        const float *vj = v + j * ldv;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV) b[c] = _mm512_maskz_loadu_ps(c == NV - 1 ? tail : (__mmask16)0xFFFF, vj + 16 * c);
        const float *rows[6] = {p0, p1, p2, p3, p4, p5};
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m512 x = _mm512_set1_ps(rows[r][j]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                if (c < NV) acc[r][c] = _mm512_fmadd_ps(x, b[c], acc[r][c]);
        }
    }
    qf_sdpa_pf_put(pf);
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV)
                _mm512_mask_storeu_ps(o + r * ldo + 16 * c, c == NV - 1 ? tail : (__mmask16)0xFFFF, acc[r][c]);
    }
}

#define QF_SDPA_PV512_CASE(R)                                                                   \
    case R:                                                                                     \
        switch (nv) {                                                                           \
        case 1: qf_sdpa_pv_tile512(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 1); break;      \
        case 2: qf_sdpa_pv_tile512(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 2); break;      \
        case 3: qf_sdpa_pv_tile512(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 3); break;      \
        default: qf_sdpa_pv_tile512(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 4); break;     \
        }                                                                                       \
        break;

/* O[r][:Dv] = alpha[r] * O[r][:Dv] + sum_{j<nk} P[r][j] V[j][:Dv] for r < nrows. */
QF_TARGET_AVX512 static inline void qf_sdpa_pv512(const float *p, int64_t ldp, int64_t nrows, int64_t nk,
                                                  const float *v, int64_t ldv, int64_t Dv,
                                                  const float *alpha, float *o, int64_t ldo) {
    for (int64_t c0 = 0; c0 < Dv; c0 += 64) {
        int64_t left = Dv - c0;
        int nv = left >= 64 ? 4 : (int)((left + 15) / 16);
        int last = (int)(left >= 64 ? 16 : left - 16 * (nv - 1));
        __mmask16 tail = (__mmask16)(last == 16 ? 0xFFFF : (1u << last) - 1);
        const float *vc = v + c0;
        for (int64_t r0 = 0; r0 < nrows; r0 += 6) {
            const float *pr_ = p + r0 * ldp;
            const float *al = alpha ? alpha + r0 : NULL;
            float *oc = o + r0 * ldo + c0;
            switch (nrows - r0 >= 6 ? 6 : (int)(nrows - r0)) {
                QF_SDPA_PV512_CASE(1)
                QF_SDPA_PV512_CASE(2)
                QF_SDPA_PV512_CASE(3)
                QF_SDPA_PV512_CASE(4)
                QF_SDPA_PV512_CASE(5)
                default: QF_SDPA_PV512_CASE(6)
            }
        }
    }
}


/* Where a row's mask lives: element (b,h,i,j0) of the mask and its key stride (0 or 1). */
typedef struct {
    qf_mask_kind kind;
    const void *row;
    int64_t sj;
} qf_sdpa_maskrow;

/* First half of a softmax step on one row s[0:nk) (in place): keys >= nvalid (the causal
 * limit) and keys the mask blocks become -inf, a float mask is added. Returns the lane-wise
 * max (reduce it for the row max). s must be 64-byte aligned with round_up(nk, 16) floats. */
/* Row-wide part of a mask row (one value for the whole row, sj == 0): a bool mask that blocks
 * the row sets *nvalid = 0, a float mask's value goes to *fadd (0 otherwise). Returns whether
 * the mask is per key, i.e. left to qf_sdpa_mask_lanes512. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE int qf_sdpa_row_mask512(const qf_sdpa_maskrow *mk, int64_t *nvalid,
                                                                     __m512 *fadd) {
    *fadd = _mm512_setzero_ps();
    if (mk->kind != QF_MASK_NONE && mk->sj == 0) {
        if (mk->kind == QF_MASK_BOOL) { if (!*(const uint8_t *)mk->row) *nvalid = 0; }
        else *fadd = _mm512_set1_ps(*(const float *)mk->row);
    }
    return mk->kind != QF_MASK_NONE && mk->sj != 0;
}

/* Keys [j, j+16) of a row: returns the lanes that may be attended (below nvalid, not blocked
 * by a per-key bool mask) and adds the float mask (per key, or the row's fadd) to *x. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __mmask16 qf_sdpa_mask_lanes512(const qf_sdpa_maskrow *mk, int per_key,
                                                                           __m512 fadd, int64_t nvalid, int64_t j,
                                                                           __m512 *x) {
    int64_t left = nvalid - j;
    __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    if (per_key) {
        if (mk->kind == QF_MASK_BOOL) {
            __m128i b = _mm_maskz_loadu_epi8(k, (const uint8_t *)mk->row + j);
            k = _mm_test_epi8_mask(b, b);
        } else {
            *x = _mm512_add_ps(*x, _mm512_maskz_loadu_ps(k, (const float *)mk->row + j));
        }
    } else {
        *x = _mm512_add_ps(*x, fadd);
    }
    return k;
}

QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __m512 qf_sdpa_mask_max512(float *s, int64_t nk, int64_t nvalid,
                                                                      const qf_sdpa_maskrow *mk) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 fadd;
    const int per_key = qf_sdpa_row_mask512(mk, &nvalid, &fadd);
    if (nvalid > nk) nvalid = nk;
    if (nvalid < 0) nvalid = 0;
    __m512 mx = ninf;
    int64_t j0 = 0;
    if (mk->kind == QF_MASK_NONE) /* nothing to mask before nvalid: max only, no store */
        for (; j0 + 16 <= nvalid; j0 += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j0));
    for (int64_t j = j0; j < nk; j += 16) {
        __m512 x = _mm512_load_ps(s + j);
        const __mmask16 k = qf_sdpa_mask_lanes512(mk, per_key, fadd, nvalid, j, &x);
        x = _mm512_mask_blend_ps(k, ninf, x);
        _mm512_store_ps(s + j, x);
        mx = _mm512_max_ps(mx, x);
    }
    return mx;
}

/* Second half: s = exp(s - m) in place (0 past nk), returns the lane-wise sum. m = -inf (no
 * attendable key yet) zeroes the row. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __m512 qf_sdpa_exp_sum512(float *s, int64_t nk, float m) {
    if (m == -INFINITY) {
        for (int64_t j = 0; j < nk; j += 16) _mm512_store_ps(s + j, _mm512_setzero_ps());
        return _mm512_setzero_ps();
    }
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps(), sum2 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= nk; j += 32) { /* two independent chains for the out-of-order core */
        __m512 e0 = qf_sdpa_exp512(_mm512_sub_ps(_mm512_load_ps(s + j), mv));
        __m512 e1 = qf_sdpa_exp512(_mm512_sub_ps(_mm512_load_ps(s + j + 16), mv));
        _mm512_store_ps(s + j, e0);
        _mm512_store_ps(s + j + 16, e1);
        sum = _mm512_add_ps(sum, e0);
        sum2 = _mm512_add_ps(sum2, e1);
    }
    for (; j < nk; j += 16) {
        __m512 e = qf_sdpa_exp512(_mm512_sub_ps(_mm512_load_ps(s + j), mv));
        if (nk - j < 16) e = _mm512_maskz_mov_ps((__mmask16)((1u << (nk - j)) - 1), e);
        _mm512_store_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_add_ps(sum, sum2);
}

/* Online-softmax step on one row of scores s[0:nk) (in place): masking as in
 * qf_sdpa_mask_max512; then with the running max *m and sum *l: m' = max(*m, max s),
 * s = exp(s - m') (0 where blocked), *alpha = exp(*m - m'), *l = *l * alpha + sum s, *m = m'.
 * While m' = -inf (nothing attendable yet) s = 0 and *alpha = 1. */
QF_TARGET_AVX512 static inline void qf_sdpa_softmax_row512(float *s, int64_t nk, int64_t nvalid,
                                                           const qf_sdpa_maskrow *mk, float *m,
                                                           float *l, float *alpha) {
    float mnew = _mm512_reduce_max_ps(qf_sdpa_mask_max512(s, nk, nvalid, mk));
    if (*m > mnew) mnew = *m;
    __m512 sum = qf_sdpa_exp_sum512(s, nk, mnew);
    if (mnew == -INFINITY) { *alpha = 1.0f; return; }
    float a = *m == -INFINITY ? 0.0f : expf(*m - mnew);
    *alpha = a;
    *l = *l * a + _mm512_reduce_add_ps(sum);
    *m = mnew;
}

/* Lane t of the result = max of the 16 lanes of x[t] (qf_sdpa_hsum16x16 with max). */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE __m512 qf_sdpa_hmax16x16(const __m512 x[16]) {
    __m512 t[8], v[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_max_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        v[i] = _mm512_max_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 w0 = _mm512_max_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
    __m512 w1 = _mm512_max_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x88), _mm512_shuffle_f32x4(v[2], v[3], 0xDD));
    return _mm512_max_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* qf_sdpa_softmax_row512 on rows r < nrows of a tile (row stride ldt), row r with nk[r] keys,
 * limit nvalid[r] and mask mk[r]; m, l, alpha indexed by row. Sixteen rows at a time, so the
 * row reductions are transposes and the rescale factors one vector exp. */
QF_TARGET_AVX512 static inline void qf_sdpa_softmax_block512(float *tile, int64_t ldt, int64_t nrows,
                                                             const int64_t *nk, const int64_t *nvalid,
                                                             const qf_sdpa_maskrow *mk, float *m,
                                                             float *l, float *alpha) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t r0 = 0; r0 < nrows; r0 += 16) {
        const int nr = nrows - r0 >= 16 ? 16 : (int)(nrows - r0);
        const __mmask16 rows = (__mmask16)(nr == 16 ? 0xFFFF : (1u << nr) - 1);
        __m512 v[16];
        for (int t = 0; t < 16; t++)
            v[t] = t < nr ? qf_sdpa_mask_max512(tile + (r0 + t) * ldt, nk[r0 + t], nvalid[r0 + t], &mk[r0 + t]) : ninf;
        const __m512 mold = _mm512_mask_loadu_ps(ninf, rows, m + r0);
        const __m512 mnew = _mm512_max_ps(mold, qf_sdpa_hmax16x16(v));
        /* exp(m_old - m_new): 0 when m_old = -inf < m_new; 1 while both are -inf */
        const __mmask16 dead = _mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ);
        const __m512 a = _mm512_mask_blend_ps(dead, qf_sdpa_exp512(_mm512_sub_ps(mold, mnew)), _mm512_set1_ps(1.0f));
        float mrow[16];
        _mm512_storeu_ps(mrow, mnew);
        for (int t = 0; t < 16; t++)
            v[t] = t < nr ? qf_sdpa_exp_sum512(tile + (r0 + t) * ldt, nk[r0 + t], mrow[t]) : _mm512_setzero_ps();
        const __m512 lold = _mm512_maskz_loadu_ps(rows, l + r0);
        _mm512_mask_storeu_ps(l + r0, rows, _mm512_fmadd_ps(lold, a, qf_sdpa_hsum16x16(v)));
        _mm512_mask_storeu_ps(m + r0, rows, mnew);
        _mm512_mask_storeu_ps(alpha + r0, rows, a);
    }
}

/* 32 x 32 -> 64-bit products of the 16 lanes of a with m: low and high halves. */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_mulhilo512(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i pe = _mm512_mul_epu32(a, m);                        /* products of even lanes */
    __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m); /* products of odd lanes */
    *lo = _mm512_mask_blend_epi32((__mmask16)0xAAAA, pe, _mm512_slli_epi64(po, 32));
    *hi = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

/* Dropout on p[0:n) whose element j has Philox index idx0 + j: zeroes p[j] unless
 * qf_philox_uniform(seed, offset, idx0 + j) >= prob (no 1/(1-prob) scaling here). Bit-exact
 * with the scalar generator: Philox4x32-10 on 16 counters at once (64 elements), the four
 * output words interleaved back into element order by a 4 x 16 transpose. */
QF_TARGET_AVX512 static inline void qf_sdpa_dropout512(float *p, int64_t n, uint64_t seed, uint64_t offset,
                                                       uint64_t idx0, float prob) {
    const __m512 thr = _mm512_set1_ps(prob * 16777216.0f); /* u >= prob  <=>  (w >> 8) >= prob * 2^24 */
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u), M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    const uint64_t end = idx0 + (uint64_t)n;
    for (uint64_t base = idx0 & ~(uint64_t)63; base < end; base += 64) {
        const uint64_t ctr = base >> 2;
        const __m512i lo0 = _mm512_set1_epi32((int)(uint32_t)ctr);
        __m512i c0 = _mm512_add_epi32(lo0, iota);
        const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo0);
        __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(ctr >> 32)), carry,
                                           _mm512_set1_epi32((int)(uint32_t)(ctr >> 32)), _mm512_set1_epi32(1));
        __m512i c2 = _mm512_set1_epi32((int)(uint32_t)offset), c3 = _mm512_set1_epi32((int)(uint32_t)(offset >> 32));
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < 10; r++) {
            __m512i h0, l0, h1, l1;
            qf_sdpa_mulhilo512(c0, M0, &h0, &l0);
            qf_sdpa_mulhilo512(c2, M1, &h1, &l1);
            c0 = _mm512_xor_si512(_mm512_xor_si512(h1, c1), _mm512_set1_epi32((int)k0));
            c1 = l1;
            c2 = _mm512_xor_si512(_mm512_xor_si512(h0, c3), _mm512_set1_epi32((int)k1));
            c3 = l0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        /* element 4t + w of the 64 is word w of counter t */
        __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
        __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
        __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
        __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
        __m512i a0 = _mm512_shuffle_i32x4(u0, u1, 0x88), a1 = _mm512_shuffle_i32x4(u0, u1, 0xDD);
        __m512i b0 = _mm512_shuffle_i32x4(u2, u3, 0x88), b1 = _mm512_shuffle_i32x4(u2, u3, 0xDD);
        __m512i w[4] = {_mm512_shuffle_i32x4(a0, b0, 0x88), _mm512_shuffle_i32x4(a1, b1, 0x88),
                        _mm512_shuffle_i32x4(a0, b0, 0xDD), _mm512_shuffle_i32x4(a1, b1, 0xDD)};
        for (int v = 0; v < 4; v++) {
            const uint64_t g = base + 16 * (uint64_t)v; /* global index of lane 0 */
            if (g + 16 <= idx0 || g >= end) continue;
            __mmask16 in = 0xFFFF;
            if (g < idx0) in &= (__mmask16)(0xFFFFu << (idx0 - g));
            if (g + 16 > end) in &= (__mmask16)((1u << (end - g)) - 1);
            __mmask16 keep = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(_mm512_srli_epi32(w[v], 8)), thr, _CMP_GE_OQ);
            float *pv = p + ((int64_t)(g - idx0)); /* lanes before p are masked off */
            _mm512_mask_storeu_ps(pv, in, _mm512_maskz_mov_ps(keep, _mm512_maskz_loadu_ps(in, pv)));
        }
    }
}

/* ======================================= AVX2 ======================================= */

QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE __m256 qf_sdpa_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x);
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

/* qf_sdpa_pack_kt for W = QF_SDPA_W256 (plain C; the AVX2 path is the fallback, not tuned). */
static inline void qf_sdpa_pack_kt256(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D) {
    qf_sdpa_pack_kt(kt, k, ldk, S, D, QF_SDPA_W256);
}

/* Lane mask (all-ones for lanes < n, n in 0..8) for maskload/maskstore. */
QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE __m256i qf_sdpa_lanes256(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_scores_tile256(
    const float *a, int64_t lda, const float *kt, int64_t D, float scale, float *c, int64_t ldc,
    const int R, const int NV) {
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++)
#pragma GCC unroll 2
        for (int v = 0; v < 2; v++) acc[r][v] = _mm256_setzero_ps();
    const float *rows[6] = {a, a + lda, a + 2 * lda, a + 3 * lda, a + 4 * lda, a + 5 * lda};
    for (int64_t d = 0; d < D; d++) {
        __m256 b[2];
#pragma GCC unroll 2
        for (int v = 0; v < 2; v++)
            if (v < NV) b[v] = _mm256_load_ps(kt + d * QF_SDPA_W256 + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m256 x = _mm256_broadcast_ss(rows[r] + d);
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++)
                if (v < NV) acc[r][v] = _mm256_fmadd_ps(x, b[v], acc[r][v]);
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 2
        for (int v = 0; v < 2; v++)
            if (v < NV) _mm256_storeu_ps(c + r * ldc + 8 * v, _mm256_mul_ps(acc[r][v], s));
    }
}

#define QF_SDPA_SCORES256_CASE(R)                                                               \
    case R:                                                                                     \
        if (nv == 1) qf_sdpa_scores_tile256(ar, lda, kp, D, scale, cr, ldc, R, 1);              \
        else qf_sdpa_scores_tile256(ar, lda, kp, D, scale, cr, ldc, R, 2);                      \
        break;

QF_TARGET_AVX2 static inline void qf_sdpa_scores256(const float *a, int64_t lda, int64_t nrows,
                                                    const float *kt, int64_t nk, int64_t D,
                                                    float scale, float *c, int64_t ldc) {
    for (int64_t p0 = 0; p0 < nk; p0 += QF_SDPA_W256) {
        const float *kp = kt + p0 * D;
        int nv = nk - p0 > 8 ? 2 : 1;
        for (int64_t r0 = 0; r0 < nrows; r0 += 6) {
            const float *ar = a + r0 * lda;
            float *cr = c + r0 * ldc + p0;
            switch (nrows - r0 >= 6 ? 6 : (int)(nrows - r0)) {
                QF_SDPA_SCORES256_CASE(1)
                QF_SDPA_SCORES256_CASE(2)
                QF_SDPA_SCORES256_CASE(3)
                QF_SDPA_SCORES256_CASE(4)
                QF_SDPA_SCORES256_CASE(5)
                default: QF_SDPA_SCORES256_CASE(6)
            }
        }
    }
}

QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE void qf_sdpa_pv_tile256(
    const float *p, int64_t ldp, int64_t nk, const float *v, int64_t ldv, const float *alpha,
    float *o, int64_t ldo, __m256i tail, const int R, const int NV) {
    const __m256i full = _mm256_set1_epi32(-1);
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
        __m256 al = _mm256_set1_ps(alpha ? alpha[r] : 1.0f);
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            if (c < NV) acc[r][c] = _mm256_mul_ps(al, _mm256_maskload_ps(o + r * ldo + 8 * c, c == NV - 1 ? tail : full));
    }
    const float *rows[6] = {p, p + ldp, p + 2 * ldp, p + 3 * ldp, p + 4 * ldp, p + 5 * ldp};
    for (int64_t j = 0; j < nk; j++) {
        __m256 b[2];
        const float *vj = v + j * ldv;
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            if (c < NV) b[c] = _mm256_maskload_ps(vj + 8 * c, c == NV - 1 ? tail : full);
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m256 x = _mm256_broadcast_ss(rows[r] + j);
#pragma GCC unroll 2
            for (int c = 0; c < 2; c++)
                if (c < NV) acc[r][c] = _mm256_fmadd_ps(x, b[c], acc[r][c]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            if (c < NV) _mm256_maskstore_ps(o + r * ldo + 8 * c, c == NV - 1 ? tail : full, acc[r][c]);
    }
}

#define QF_SDPA_PV256_CASE(R)                                                                   \
    case R:                                                                                     \
        if (nv == 1) qf_sdpa_pv_tile256(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 1);        \
        else qf_sdpa_pv_tile256(pr_, ldp, nk, vc, ldv, al, oc, ldo, tail, R, 2);                \
        break;

QF_TARGET_AVX2 static inline void qf_sdpa_pv256(const float *p, int64_t ldp, int64_t nrows, int64_t nk,
                                                const float *v, int64_t ldv, int64_t Dv,
                                                const float *alpha, float *o, int64_t ldo) {
    for (int64_t c0 = 0; c0 < Dv; c0 += 16) {
        int64_t left = Dv - c0;
        int nv = left > 8 ? 2 : 1;
        __m256i tail = qf_sdpa_lanes256((int)(left >= 16 ? 8 : left - 8 * (nv - 1)));
        const float *vc = v + c0;
        for (int64_t r0 = 0; r0 < nrows; r0 += 6) {
            const float *pr_ = p + r0 * ldp;
            const float *al = alpha ? alpha + r0 : NULL;
            float *oc = o + r0 * ldo + c0;
            switch (nrows - r0 >= 6 ? 6 : (int)(nrows - r0)) {
                QF_SDPA_PV256_CASE(1)
                QF_SDPA_PV256_CASE(2)
                QF_SDPA_PV256_CASE(3)
                QF_SDPA_PV256_CASE(4)
                QF_SDPA_PV256_CASE(5)
                default: QF_SDPA_PV256_CASE(6)
            }
        }
    }
}

/* AVX2 twin of qf_sdpa_row_mask512. */
QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE int qf_sdpa_row_mask256(const qf_sdpa_maskrow *mk, int64_t *nvalid,
                                                                   __m256 *fadd) {
    *fadd = _mm256_setzero_ps();
    if (mk->kind != QF_MASK_NONE && mk->sj == 0) {
        if (mk->kind == QF_MASK_BOOL) { if (!*(const uint8_t *)mk->row) *nvalid = 0; }
        else *fadd = _mm256_set1_ps(*(const float *)mk->row);
    }
    return mk->kind != QF_MASK_NONE && mk->sj != 0;
}

/* AVX2 twin of qf_sdpa_mask_lanes512 (keys [j, j+8); the lanes as an all-ones/zero mask). */
QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE __m256i qf_sdpa_mask_lanes256(const qf_sdpa_maskrow *mk, int per_key,
                                                                        __m256 fadd, int64_t nvalid, int64_t j,
                                                                        __m256 *x) {
    int64_t left = nvalid - j;
    int n = left >= 8 ? 8 : left <= 0 ? 0 : (int)left;
    __m256i lanes = qf_sdpa_lanes256(n);
    if (per_key) {
        if (mk->kind == QF_MASK_BOOL) {
            const uint8_t *mb = (const uint8_t *)mk->row + j;
            int32_t att[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int t = 0; t < n; t++) att[t] = mb[t] ? -1 : 0;
            lanes = _mm256_loadu_si256((const __m256i *)att);
        } else {
            *x = _mm256_add_ps(*x, _mm256_maskload_ps((const float *)mk->row + j, lanes));
        }
    } else {
        *x = _mm256_add_ps(*x, fadd);
    }
    return lanes;
}

/* AVX2 twin of qf_sdpa_softmax_row512; s must be 32-byte aligned with round_up(nk, 8) floats. */
QF_TARGET_AVX2 static inline void qf_sdpa_softmax_row256(float *s, int64_t nk, int64_t nvalid,
                                                         const qf_sdpa_maskrow *mk, float *m,
                                                         float *l, float *alpha) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 fadd;
    const int per_key = qf_sdpa_row_mask256(mk, &nvalid, &fadd);
    if (nvalid > nk) nvalid = nk;
    if (nvalid < 0) nvalid = 0;
    __m256 mx = ninf;
    for (int64_t j = 0; j < nk; j += 8) {
        __m256 x = _mm256_load_ps(s + j);
        const __m256i lanes = qf_sdpa_mask_lanes256(mk, per_key, fadd, nvalid, j, &x);
        x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(lanes));
        _mm256_store_ps(s + j, x);
        mx = _mm256_max_ps(mx, x);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float mnew = _mm_cvtss_f32(h);
    if (*m > mnew) mnew = *m;
    if (mnew == -INFINITY) {
        for (int64_t j = 0; j < nk; j += 8) _mm256_store_ps(s + j, _mm256_setzero_ps());
        *alpha = 1.0f;
        return;
    }
    const __m256 mv = _mm256_set1_ps(mnew);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nk; j += 8) {
        __m256 e = qf_sdpa_exp256(_mm256_sub_ps(_mm256_load_ps(s + j), mv));
        if (nk - j < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(qf_sdpa_lanes256((int)(nk - j))));
        _mm256_store_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
    float a = *m == -INFINITY ? 0.0f : expf(*m - mnew);
    *alpha = a;
    *l = *l * a + _mm_cvtss_f32(t);
    *m = mnew;
}

/* AVX2 twin of qf_sdpa_softmax_block512 (row by row). */
QF_TARGET_AVX2 static inline void qf_sdpa_softmax_block256(float *tile, int64_t ldt, int64_t nrows,
                                                           const int64_t *nk, const int64_t *nvalid,
                                                           const qf_sdpa_maskrow *mk, float *m,
                                                           float *l, float *alpha) {
    for (int64_t r = 0; r < nrows; r++)
        qf_sdpa_softmax_row256(tile + r * ldt, nk[r], nvalid[r], &mk[r], &m[r], &l[r], &alpha[r]);
}

#endif
