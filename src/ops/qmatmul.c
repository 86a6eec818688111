/* qmatmul.c - reduced-precision linear weights (bf16, int8, q4) and y = x W^T on them
 * (contract: qmatmul.h). Activations and accumulators stay float32.
 *
 * Storage of W [out,in] (row-major, torch layout), one array of codes + one of float32 scales:
 *   BF16  uint16 [out*in]: the high half of the float32 rounded to nearest, ties to even
 *         (torch's float->bfloat16: u + 0x7FFF + ((u >> 16) & 1), >> 16). No scales.
 *   INT8  int8 [out*in], scales float [out * in/block] (block = in when per output row).
 *         scale = max|w| over the block / 127 (float32 division), q = nearbyint(w * (1/scale))
 *         with the float32 reciprocal and round-half-to-even, clamped to [-127, 127]: the rule
 *         of torch.quantize_per_channel(w, scales, zero_points=0, axis=0, dtype=torch.qint8)
 *         (fbgemm's Quantize multiplies by 1.0f/scale). An all-zero block has scale 0, q 0.
 *   Q4    uint8 [out*in/2] + scales float [out * in/block], block even (default 32). Within a
 *         block of b values stored in b/2 bytes, byte j holds element j in its low nibble and
 *         element j + b/2 in its high nibble, each as q + 8 (0..15). This is ggml's Q4_0
 *         arrangement: one 16-byte load of a 32-block unpacks, with one AND and one shift, into
 *         the two 16-lane halves of the block, already in x's order. Scale: m = the element of
 *         largest |w| (the first on ties), scale = m / -8 (float32), so m itself becomes -8 and
 *         all 16 levels are used; q = clamp(nearbyint(w * (1/scale)), -8, 7). scale 0 when the
 *         block is zero. (Symmetric amax/7 uses 15 levels: 13% larger error on Gaussian blocks, measured.)
 *   Dequantized: w = (float)q * scale (bf16: the bits << 16), one float32 multiply: the value
 *   qf_qweight_dequantize returns and the kernels use (q4 through a 16-entry table of the block's
 *   values), except int8 with one scale per row, whose SIMD kernels sum q * x and scale the
 *   row's sum once (a multiply fewer per 16 weights; the same bound).
 *   Weights must be finite (QF_ERR_NONFINITE naming the element).
 *
 * Matmul, y[N,out] = x[N,in] W^T (+ bias):
 *   N < 16 (decoding): memory- or instruction-bound. Tasks are row ranges of 2-16 KiB of codes,
 *     scheduled guided over one parallel region (qf_qweight_matmul_multi / _glu put several
 *     weights sharing x in that one region); a row is read once, dequantized in registers
 *     (w = q * scale) and FMA'd into up to 8 float32 accumulator vectors (two sets, to hide FMA
 *     latency), reduced at the row's end. N is a compile-time constant in each instantiation
 *     so the accumulators live in registers; 9 <= N < 16 in chunks of 8 rows of x per task.
 *   N >= 16 (prefill): panels of W rows are dequantized into a float32 scratch panel (OpenMP)
 *     and multiplied with cblas_sgemm (threaded by the BLAS), about 4 MiB per panel.
 *   Paths: scalar, AVX2+FMA (8 lanes, scalar tails), AVX-512 (16 lanes, masked tails), picked by
 *   qf_get_isa() per call. They differ only in summation order: the bound against float64
 *   x @ dequant(W)^T is float32 accumulation error, max|y - ref| / max|ref| <= 1e-5 tested on
 *   every path. int8 with one scale per row at N <= 2 on AVX-512 VNNI cores uses integer dot
 *   products on an exact 3-byte split of x rounded to 24 bits (the "VNNI path" section states
 *   and the tests check its bound, 2^-24 max|x_n| sum|w_o|): on the device's Xeon the float path
 *   widened, converted and multiplied every weight and was instruction-bound at batch 1.
 *   q4 with block 32 at N <= 8 on AVX-512 VNNI cores rounds the activations to int8 per block
 *   of 32 (as llama.cpp's q8_0; the "q4 VNNI" section states the bound, max|x_blk|/254 times
 *   the block's sum|w|, ~30x below q4's own weight error) and uses vpdpbusd: 4x the float q4
 *   kernel per core. bf16 and int8 activations stay float32 / 24-bit (AVX512-BF16 is not used).
 *
 * Invariants: a qf_qweight is immutable after quantize (so matmuls may run concurrently);
 * nothing is allocated after quantize except through qf_scratch; every error names `what`.
 */
#include "ops/qmatmul.h"
#include "qfuse_llm.h"
#include <cblas.h>
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct qf_qweight {
    int format;
    int64_t out, in;
    int64_t block;    /* inputs per scale (int8 per row: in); bf16: in (no scales)        */
    int64_t nblocks;  /* scales per row = in / block; 0 for bf16                           */
    void *codes;      /* bf16: uint16 [out*in]; int8: int8 [out*in]; q4: uint8 [out*in/2]  */
    float *scales;    /* [out * nblocks] or NULL                                          */
    int32_t *qsum;    /* int8 with one scale per row: each row's sum of codes (the VNNI
                         path's offset term); else NULL                                     */
    size_t bytes;     /* codes + scales + qsum                                             */
    char what[96];
};

enum { QMM_NR = 8, QMM_GEMM_MIN_N = 16 };
#define QMM_PANEL_BYTES ((size_t)4 << 20)

static const char *fmt_name(int f) {
    switch (f) {
    case QF_WEIGHTS_F32: return "f32";
    case QF_WEIGHTS_BF16: return "bf16";
    case QF_WEIGHTS_INT8: return "int8";
    case QF_WEIGHTS_Q4: return "q4";
    }
    return "unknown";
}

static size_t row_code_bytes(const qf_qweight *q) {
    switch (q->format) {
    case QF_WEIGHTS_BF16: return (size_t)q->in * 2;
    case QF_WEIGHTS_INT8: return (size_t)q->in;
    default: return (size_t)q->in / 2;
    }
}

/* ---- quantization (scalar, once per weight) ------------------------------------------- */

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void quantize_row_int8(const float *w, int64_t in, int64_t block, int8_t *q, float *sc) {
    for (int64_t k = 0; k < in / block; k++) {
        const float *wk = w + k * block;
        float amax = 0.0f;
        for (int64_t i = 0; i < block; i++) amax = fmaxf(amax, fabsf(wk[i]));
        float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        sc[k] = s;
        for (int64_t i = 0; i < block; i++) {
            float r = nearbyintf(wk[i] * inv);
            q[k * block + i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r);
        }
    }
}

static void quantize_row_q4(const float *w, int64_t in, int64_t block, uint8_t *q, float *sc) {
    const int64_t half = block / 2;
    for (int64_t k = 0; k < in / block; k++) {
        const float *wk = w + k * block;
        float m = 0.0f;
        for (int64_t i = 0; i < block; i++)
            if (fabsf(wk[i]) > fabsf(m)) m = wk[i];
        float s = m / -8.0f, inv = s != 0.0f ? 1.0f / s : 0.0f;
        sc[k] = s;
        uint8_t *qk = q + k * half;
        for (int64_t j = 0; j < half; j++) {
            int c[2];
            for (int h = 0; h < 2; h++) {
                float r = nearbyintf(wk[j + h * half] * inv);
                c[h] = (r > 7.0f ? 7 : r < -8.0f ? -8 : (int)r) + 8;
            }
            qk[j] = (uint8_t)(c[0] | (c[1] << 4));
        }
    }
}

qf_status qf_qweight_quantize(int format, int64_t block, const float *w, int64_t out, int64_t in,
                              const char *what, qf_qweight **qout) {
    const char *fn = "qf_qweight_quantize";
    if (!what) what = "(unnamed weight)";
    if (!qout) return qf_fail(QF_ERR_ARG, "%s: %s: q (the output pointer) is NULL", fn, what);
    *qout = NULL;
    if (!w) return qf_fail(QF_ERR_ARG, "%s: %s: w is NULL", fn, what);
    if (format != QF_WEIGHTS_BF16 && format != QF_WEIGHTS_INT8 && format != QF_WEIGHTS_Q4)
        return qf_fail(QF_ERR_ARG,
                       "%s: %s: format %d (%s) is not a quantized format (QF_WEIGHTS_BF16 = 1, "
                       "QF_WEIGHTS_INT8 = 2, QF_WEIGHTS_Q4 = 3)", fn, what, format, fmt_name(format));
    if (out <= 0 || in <= 0)
        return qf_fail(QF_ERR_ARG, "%s: %s: sizes must be >= 1, got out = %lld, in = %lld", fn, what,
                       (long long)out, (long long)in);
    if (in > INT_MAX)
        return qf_fail(QF_ERR_ARG, "%s: %s: in = %lld must fit in int (BLAS)", fn, what, (long long)in);
    int64_t eff = in;
    if (format == QF_WEIGHTS_INT8) {
        if (block < 0 || (block > 0 && in % block != 0))
            return qf_fail(QF_ERR_ARG, "int8: block %lld does not divide in = %lld of %s (0 = one scale "
                           "per output row, else a positive divisor of in)", (long long)block, (long long)in, what);
        if (block > 0) eff = block;
    } else if (format == QF_WEIGHTS_Q4) {
        if (block == 0) block = 32;
        if (block < 0 || block % 2 != 0)
            return qf_fail(QF_ERR_ARG, "q4: block %lld of %s must be a positive even number (0 = 32)",
                           (long long)block, what);
        if (in % block != 0)
            return qf_fail(QF_ERR_ARG, "q4: block %lld does not divide in = %lld of %s", (long long)block,
                           (long long)in, what);
        eff = block;
    }
    size_t n_el, code_bytes, n_sc = 0;
    QF_TRY(qf_mul_size((size_t)out, (size_t)in, what, &n_el));
    code_bytes = format == QF_WEIGHTS_BF16 ? n_el * 2 : format == QF_WEIGHTS_INT8 ? n_el : n_el / 2;
    if (format == QF_WEIGHTS_BF16 && code_bytes / 2 != n_el)
        return qf_fail(QF_ERR_ARG, "%s: %s: size overflows (%lld x %lld bf16)", fn, what, (long long)out,
                       (long long)in);
    if (format != QF_WEIGHTS_BF16) n_sc = (size_t)out * (size_t)(in / eff);

    /* Non-finite weights have no scale: refuse, naming the first (row-major) offender. */
    int64_t bad = INT64_MAX;
#pragma omp parallel for num_threads(qf_threads()) reduction(min : bad) if (n_el > (1u << 18))
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++)
            if (!isfinite(w[o * in + i])) {
                if (o * in + i < bad) bad = o * in + i;
                break;
            }
    if (bad != INT64_MAX)
        return qf_fail(QF_ERR_NONFINITE, "%s: %s[%lld,%lld] = %g: weights must be finite to quantize (%s)",
                       fn, what, (long long)(bad / in), (long long)(bad % in), (double)w[bad], fmt_name(format));

    qf_qweight *q = calloc(1, sizeof *q);
    if (!q) return qf_fail(QF_ERR_NOMEM, "%s: %s: cannot allocate the weight header", fn, what);
    void *codes = NULL;
    if (posix_memalign(&codes, 64, qf_align_up(code_bytes, 64)) != 0) {
        free(q);
        return qf_fail(QF_ERR_NOMEM, "%s: %s: cannot allocate %zu bytes of %s codes", fn, what, code_bytes,
                       fmt_name(format));
    }
    if (n_sc && !(q->scales = malloc(n_sc * sizeof(float)))) {
        free(codes);
        free(q);
        return qf_fail(QF_ERR_NOMEM, "%s: %s: cannot allocate %zu scales", fn, what, n_sc);
    }
    if (format == QF_WEIGHTS_INT8 && eff == in && !(q->qsum = malloc((size_t)out * sizeof(int32_t)))) {
        free(q->scales);
        free(codes);
        free(q);
        return qf_fail(QF_ERR_NOMEM, "%s: %s: cannot allocate %lld row sums", fn, what, (long long)out);
    }
    q->format = format;
    q->out = out;
    q->in = in;
    q->block = eff;
    q->nblocks = format == QF_WEIGHTS_BF16 ? 0 : in / eff;
    q->codes = codes;
    q->bytes = code_bytes + n_sc * sizeof(float) + (q->qsum ? (size_t)out * sizeof(int32_t) : 0);
    snprintf(q->what, sizeof q->what, "%s", what);

#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (n_el > (1u << 16))
    for (int64_t o = 0; o < out; o++) {
        const float *wr = w + o * in;
        if (format == QF_WEIGHTS_BF16) {
            uint16_t *c = (uint16_t *)codes + o * in;
            for (int64_t i = 0; i < in; i++) c[i] = bf16_rne(wr[i]);
        } else if (format == QF_WEIGHTS_INT8) {
            const int8_t *c = (int8_t *)codes + o * in;
            quantize_row_int8(wr, in, eff, (int8_t *)codes + o * in, q->scales + o * q->nblocks);
            if (q->qsum) {
                int32_t t = 0;
                for (int64_t i = 0; i < in; i++) t += c[i];
                q->qsum[o] = t;
            }
        } else {
            quantize_row_q4(wr, in, eff, (uint8_t *)codes + o * (in / 2), q->scales + o * q->nblocks);
        }
    }
    *qout = q;
    return QF_OK;
}

void qf_qweight_free(qf_qweight *q) {
    if (!q) return;
    free(q->codes);
    free(q->scales);
    free(q->qsum);
    free(q);
}

int qf_qweight_format(const qf_qweight *q) { return q ? q->format : -1; }
size_t qf_qweight_bytes(const qf_qweight *q) { return q ? q->bytes : 0; }

/* ---- scalar path ------------------------------------------------------------------------- */

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* dst[0:in] = dequantized row o. */
static void dequant_row_scalar(const qf_qweight *q, int64_t o, float *dst) {
    const int64_t in = q->in, b = q->block, half = b / 2;
    if (q->format == QF_WEIGHTS_BF16) {
        const uint16_t *c = (const uint16_t *)q->codes + o * in;
        for (int64_t i = 0; i < in; i++) dst[i] = bf16_f32(c[i]);
    } else if (q->format == QF_WEIGHTS_INT8) {
        const int8_t *c = (const int8_t *)q->codes + o * in;
        const float *sc = q->scales + o * q->nblocks;
        for (int64_t i = 0; i < in; i++) dst[i] = (float)c[i] * sc[i / b];
    } else {
        const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
        const float *sc = q->scales + o * q->nblocks;
        for (int64_t k = 0; k < q->nblocks; k++)
            for (int64_t j = 0; j < half; j++) {
                uint8_t byte = c[k * half + j];
                dst[k * b + j] = (float)((int)(byte & 15) - 8) * sc[k];
                dst[k * b + half + j] = (float)((int)(byte >> 4) - 8) * sc[k];
            }
    }
}

/* y[n*ldy + o] = x_n . W_o for n < nr, o in [o0,o1). */
static void rows_scalar(const qf_qweight *q, const float *x, int nr, float *y, int64_t ldy, int64_t o0,
                        int64_t o1) {
    const int64_t in = q->in, b = q->block, half = b / 2;
    for (int64_t o = o0; o < o1; o++) {
        float acc[QMM_NR] = {0};
        if (q->format == QF_WEIGHTS_BF16) {
            const uint16_t *c = (const uint16_t *)q->codes + o * in;
            for (int64_t i = 0; i < in; i++) {
                float w = bf16_f32(c[i]);
                for (int n = 0; n < nr; n++) acc[n] += w * x[n * in + i];
            }
        } else if (q->format == QF_WEIGHTS_INT8) {
            const int8_t *c = (const int8_t *)q->codes + o * in;
            const float *sc = q->scales + o * q->nblocks;
            for (int64_t i = 0; i < in; i++) {
                float w = (float)c[i] * sc[i / b];
                for (int n = 0; n < nr; n++) acc[n] += w * x[n * in + i];
            }
        } else {
            const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
            const float *sc = q->scales + o * q->nblocks;
            for (int64_t k = 0; k < q->nblocks; k++)
                for (int64_t j = 0; j < half; j++) {
                    uint8_t byte = c[k * half + j];
                    float wl = (float)((int)(byte & 15) - 8) * sc[k];
                    float wh = (float)((int)(byte >> 4) - 8) * sc[k];
                    for (int n = 0; n < nr; n++)
                        acc[n] += wl * x[n * in + k * b + j] + wh * x[n * in + k * b + half + j];
                }
        }
        for (int n = 0; n < nr; n++) y[n * ldy + o] = acc[n];
    }
}

/* ---- AVX-512 path -------------------------------------------------------------------------
 * Loaders return 16 dequantized-but-unscaled codes ((float)q) from p; the _m variants load only
 * the lanes of mask m (others 0). Kernels scale them (w = q * s, the same product as the scalar
 * dequantization) and FMA into acc sets A (first 16 of each 32) and B. */
#define QA512 static inline __attribute__((always_inline)) QF_TARGET_AVX512

QA512 __m512 ld_bf16_512(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
QA512 __m512 ld_i8_512(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
/* 16 bytes of q4 codes -> the low-nibble and high-nibble values minus 8. */
QA512 void ld_q4_512(const uint8_t *p, __mmask16 m, __m512 *lo, __m512 *hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
    const __m512i f = _mm512_set1_epi32(15), e = _mm512_set1_epi32(8);
    *lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, f), e));
    *hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), e));
}

#define FMA_ROWS512(ACC, W, XP)                                                                 \
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) ACC[n] =                                \
        _mm512_fmadd_ps(W, _mm512_maskz_loadu_ps(mk, (XP) + n * in), ACC[n])

QA512 void row512(const qf_qweight *q, int64_t o, const float *x, const int NR, float *res) {
    const int64_t in = q->in, b = q->block;
    float post = 1.0f;
    __m512 A[QMM_NR], B[QMM_NR];
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) A[n] = B[n] = _mm512_setzero_ps();
    if (q->format == QF_WEIGHTS_Q4) {
        const int64_t half = b / 2;
        const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
        const float *sc = q->scales + o * q->nblocks;
        if (half % 16 == 0) { /* whole vectors (block 32, 64, ...): no masks */
            /* lut[u] = (u - 8) * s, the 16 dequantized values of this block (the same float
             * products as the scalar path); vpermps picks lane values by the low 4 bits of each
             * index lane, so the zero-extended code bytes need no AND, only a shift for the
             * high nibbles. */
            const __m512 base = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
            const __mmask16 mk = 0xFFFF;
            for (int64_t k = 0; k < q->nblocks; k++) {
                const __m512 lut = _mm512_mul_ps(base, _mm512_set1_ps(sc[k]));
                const float *xk = x + k * b;
                for (int64_t j = 0; j < half; j += 16) {
                    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + k * half + j)));
                    __m512 lo = _mm512_permutexvar_ps(v, lut);
                    __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
                    FMA_ROWS512(A, lo, xk + j);
                    FMA_ROWS512(B, hi, xk + half + j);
                }
            }
        } else
        for (int64_t k = 0; k < q->nblocks; k++) {
            const __m512 s = _mm512_set1_ps(sc[k]);
            const float *xk = x + k * b;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 mk = half - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - j)) - 1);
                __m512 lo, hi;
                ld_q4_512(c + k * half + j, mk, &lo, &hi);
                lo = _mm512_mul_ps(lo, s);
                hi = _mm512_mul_ps(hi, s);
                FMA_ROWS512(A, lo, xk + j);
                FMA_ROWS512(B, hi, xk + half + j);
            }
        }
    } else {
        /* bf16 / int8: blocks of b inputs (bf16: one block, scale 1), 32 per step. int8 with one
         * scale per row accumulates q * x and scales the row's sum once (post). */
        const int isbf = q->format == QF_WEIGHTS_BF16;
        const int64_t nb = isbf ? 1 : q->nblocks;
        const int scaled = !isbf && nb > 1;
        if (!isbf && nb == 1) post = q->scales[o];
        const uint16_t *cb = (const uint16_t *)q->codes + o * in;
        const int8_t *ci = (const int8_t *)q->codes + o * in;
        for (int64_t k = 0; k < nb; k++) {
            const __m512 s = _mm512_set1_ps(scaled ? q->scales[o * nb + k] : 1.0f);
            const int64_t base = k * b;
            int64_t i = 0;
            __mmask16 mk = 0xFFFF;
            for (; i + 32 <= b; i += 32) {
                __m512 w0, w1;
                if (isbf) {
                    w0 = ld_bf16_512(cb + base + i, mk);
                    w1 = ld_bf16_512(cb + base + i + 16, mk);
                } else {
                    w0 = ld_i8_512(ci + base + i, mk);
                    w1 = ld_i8_512(ci + base + i + 16, mk);
                    if (scaled) {
                        w0 = _mm512_mul_ps(w0, s);
                        w1 = _mm512_mul_ps(w1, s);
                    }
                }
                FMA_ROWS512(A, w0, x + base + i);
                FMA_ROWS512(B, w1, x + base + i + 16);
            }
            for (; i < b; i += 16) {
                mk = b - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b - i)) - 1);
                __m512 w0 = isbf ? ld_bf16_512(cb + base + i, mk) : ld_i8_512(ci + base + i, mk);
                if (scaled) w0 = _mm512_mul_ps(w0, s);
                FMA_ROWS512(A, w0, x + base + i);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) res[n] = _mm512_reduce_add_ps(_mm512_add_ps(A[n], B[n])) * post;
}

QF_TARGET_AVX512 static void rows_avx512(const qf_qweight *q, const float *x, int nr, float *y, int64_t ldy,
                                         int64_t o0, int64_t o1) {
    float r[QMM_NR];
    for (int64_t o = o0; o < o1; o++) {
        switch (nr) { /* constant NR per case: the accumulators stay in registers */
        case 1: row512(q, o, x, 1, r); break;
        case 2: row512(q, o, x, 2, r); break;
        case 3: row512(q, o, x, 3, r); break;
        case 4: row512(q, o, x, 4, r); break;
        case 5: row512(q, o, x, 5, r); break;
        case 6: row512(q, o, x, 6, r); break;
        case 7: row512(q, o, x, 7, r); break;
        default: row512(q, o, x, 8, r); break;
        }
        for (int n = 0; n < nr; n++) y[n * ldy + o] = r[n];
    }
}

QF_TARGET_AVX512 static void dequant_row_avx512(const qf_qweight *q, int64_t o, float *dst) {
    const int64_t in = q->in, b = q->block;
    if (q->format == QF_WEIGHTS_Q4) {
        const int64_t half = b / 2;
        const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
        for (int64_t k = 0; k < q->nblocks; k++) {
            const __m512 s = _mm512_set1_ps(q->scales[o * q->nblocks + k]);
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 mk = half - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - j)) - 1);
                __m512 lo, hi;
                ld_q4_512(c + k * half + j, mk, &lo, &hi);
                _mm512_mask_storeu_ps(dst + k * b + j, mk, _mm512_mul_ps(lo, s));
                _mm512_mask_storeu_ps(dst + k * b + half + j, mk, _mm512_mul_ps(hi, s));
            }
        }
        return;
    }
    const int isbf = q->format == QF_WEIGHTS_BF16;
    const int64_t nb = isbf ? 1 : q->nblocks;
    for (int64_t k = 0; k < nb; k++) {
        const __m512 s = _mm512_set1_ps(isbf ? 1.0f : q->scales[o * nb + k]);
        for (int64_t i = k * b; i < (k + 1) * b; i += 16) {
            const int64_t left = (k + 1) * b - i;
            const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 w = isbf ? ld_bf16_512((const uint16_t *)q->codes + o * in + i, mk)
                            : _mm512_mul_ps(ld_i8_512((const int8_t *)q->codes + o * in + i, mk), s);
            _mm512_mask_storeu_ps(dst + i, mk, w);
        }
    }
}

/* ---- AVX2 path (8 lanes; tails of a block scalar) -------------------------------------- */
#define QA256 static inline __attribute__((always_inline)) QF_TARGET_AVX2

QA256 __m256 ld_bf16_256(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
QA256 __m256 ld_i8_256(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
QA256 void ld_q4_256(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i f = _mm256_set1_epi32(15), e = _mm256_set1_epi32(8);
    *lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, f), e));
    *hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), e));
}
QA256 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define FMA_ROWS256(ACC, W, XP)                                                                 \
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) ACC[n] =                                \
        _mm256_fmadd_ps(W, _mm256_loadu_ps((XP) + n * in), ACC[n])

QA256 void row256(const qf_qweight *q, int64_t o, const float *x, const int NR, float *res) {
    const int64_t in = q->in, b = q->block;
    float post = 1.0f;
    __m256 A[QMM_NR], B[QMM_NR];
    float tail[QMM_NR] = {0};
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) A[n] = B[n] = _mm256_setzero_ps();
    if (q->format == QF_WEIGHTS_Q4) {
        const int64_t half = b / 2;
        const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
        const float *sc = q->scales + o * q->nblocks;
        for (int64_t k = 0; k < q->nblocks; k++) {
            const __m256 s = _mm256_set1_ps(sc[k]);
            const float *xk = x + k * b;
            const uint8_t *ck = c + k * half;
            int64_t j = 0;
            for (; j + 8 <= half; j += 8) {
                __m256 lo, hi;
                ld_q4_256(ck + j, &lo, &hi);
                lo = _mm256_mul_ps(lo, s);
                hi = _mm256_mul_ps(hi, s);
                FMA_ROWS256(A, lo, xk + j);
                FMA_ROWS256(B, hi, xk + half + j);
            }
            for (; j < half; j++) {
                float wl = (float)((int)(ck[j] & 15) - 8) * sc[k], wh = (float)((int)(ck[j] >> 4) - 8) * sc[k];
                for (int n = 0; n < NR; n++) tail[n] += wl * xk[n * in + j] + wh * xk[n * in + half + j];
            }
        }
    } else {
        const int isbf = q->format == QF_WEIGHTS_BF16;
        const int64_t nb = isbf ? 1 : q->nblocks;
        const int scaled = !isbf && nb > 1;
        if (!isbf && nb == 1) post = q->scales[o];
        const uint16_t *cb = (const uint16_t *)q->codes + o * in;
        const int8_t *ci = (const int8_t *)q->codes + o * in;
        for (int64_t k = 0; k < nb; k++) {
            const float sf = scaled ? q->scales[o * nb + k] : 1.0f;
            const __m256 s = _mm256_set1_ps(sf);
            const int64_t base = k * b;
            int64_t i = 0;
            for (; i + 16 <= b; i += 16) {
                __m256 w0, w1;
                if (isbf) {
                    w0 = ld_bf16_256(cb + base + i);
                    w1 = ld_bf16_256(cb + base + i + 8);
                } else {
                    w0 = ld_i8_256(ci + base + i);
                    w1 = ld_i8_256(ci + base + i + 8);
                    if (scaled) {
                        w0 = _mm256_mul_ps(w0, s);
                        w1 = _mm256_mul_ps(w1, s);
                    }
                }
                FMA_ROWS256(A, w0, x + base + i);
                FMA_ROWS256(B, w1, x + base + i + 8);
            }
            for (; i + 8 <= b; i += 8) {
                __m256 w0 = isbf ? ld_bf16_256(cb + base + i) : ld_i8_256(ci + base + i);
                if (scaled) w0 = _mm256_mul_ps(w0, s);
                FMA_ROWS256(A, w0, x + base + i);
            }
            for (; i < b; i++) {
                float w = isbf ? bf16_f32(cb[base + i]) : (float)ci[base + i] * sf;
                for (int n = 0; n < NR; n++) tail[n] += w * x[n * in + base + i];
            }
        }
    }
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) res[n] = (hsum256(_mm256_add_ps(A[n], B[n])) + tail[n]) * post;
}

QF_TARGET_AVX2 static void rows_avx2(const qf_qweight *q, const float *x, int nr, float *y, int64_t ldy,
                                     int64_t o0, int64_t o1) {
    float r[QMM_NR];
    for (int64_t o = o0; o < o1; o++) {
        switch (nr) {
        case 1: row256(q, o, x, 1, r); break;
        case 2: row256(q, o, x, 2, r); break;
        case 3: row256(q, o, x, 3, r); break;
        case 4: row256(q, o, x, 4, r); break;
        case 5: row256(q, o, x, 5, r); break;
        case 6: row256(q, o, x, 6, r); break;
        case 7: row256(q, o, x, 7, r); break;
        default: row256(q, o, x, 8, r); break;
        }
        for (int n = 0; n < nr; n++) y[n * ldy + o] = r[n];
    }
}

QF_TARGET_AVX2 static void dequant_row_avx2(const qf_qweight *q, int64_t o, float *dst) {
    const int64_t in = q->in, b = q->block;
    if (q->format == QF_WEIGHTS_Q4) {
        const int64_t half = b / 2;
        const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
        for (int64_t k = 0; k < q->nblocks; k++) {
            const float sf = q->scales[o * q->nblocks + k];
            const __m256 s = _mm256_set1_ps(sf);
            int64_t j = 0;
            for (; j + 8 <= half; j += 8) {
                __m256 lo, hi;
                ld_q4_256(c + k * half + j, &lo, &hi);
                _mm256_storeu_ps(dst + k * b + j, _mm256_mul_ps(lo, s));
                _mm256_storeu_ps(dst + k * b + half + j, _mm256_mul_ps(hi, s));
            }
            for (; j < half; j++) {
                uint8_t byte = c[k * half + j];
                dst[k * b + j] = (float)((int)(byte & 15) - 8) * sf;
                dst[k * b + half + j] = (float)((int)(byte >> 4) - 8) * sf;
            }
        }
        return;
    }
    const int isbf = q->format == QF_WEIGHTS_BF16;
    const int64_t nb = isbf ? 1 : q->nblocks;
    const uint16_t *cb = (const uint16_t *)q->codes + o * in;
    const int8_t *ci = (const int8_t *)q->codes + o * in;
    for (int64_t k = 0; k < nb; k++) {
        const float sf = isbf ? 1.0f : q->scales[o * nb + k];
        const __m256 s = _mm256_set1_ps(sf);
        int64_t i = k * b;
        for (; i + 8 <= (k + 1) * b; i += 8)
            _mm256_storeu_ps(dst + i, isbf ? ld_bf16_256(cb + i) : _mm256_mul_ps(ld_i8_256(ci + i), s));
        for (; i < (k + 1) * b; i++) dst[i] = isbf ? bf16_f32(cb[i]) : (float)ci[i] * sf;
    }
}

/* ---- AVX-512 VNNI path: int8 with one scale per row, N <= 2 ------------------------------
 * Decoding at batch 1 is bound by the float path's instruction count (widen, convert, FMA per 16
 * weights), not by memory, on 2-port AVX-512 cores. Here x is split exactly enough that integer
 * dot products (vpdpbusd: 64 u8 x s8 products per instruction) do the work: each row of x is
 * quantized to 24 bits, xi = nearbyint(x / sx) with sx = max|x_n| / (2^23 - 1), and u = xi + 2^23
 * in [1, 2^24) is split into three byte planes u = u0 + 2^8 u1 + 2^16 u2. Then for output o
 *   sum_i q_oi u_i = S0 + 2^8 S1 + 2^16 S2, each S_k one int32 vpdpbusd accumulation, and
 *   y_no = scale_o * sx * (S0 + 2^8 S1 + 2^16 S2 - 2^23 * qsum_o)
 * evaluated in double (every term is an integer below 2^53) and rounded once. The only error
 * is x's rounding to 24 bits: |y - x.dequant(W)_o| <= 2^-24 max|x_n| sum_i |w_oi| (+ one float
 * rounding), the same order as float32 accumulation (tested with outlier-heavy x too). Rows
 * whose max|x| is not finite take the float path. Needs in <= 65536 so the int32 sums cannot
 * overflow (|S_k| <= in * 127 * 255). */
#define QF_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
enum { QMM_VNNI_MAX_N = 2, QMM_VNNI_MAX_IN = 65536 };

static int have_vnni(void) {
    static int v = -1;
    if (v < 0) v = __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    return v;
}

/* planes [N][3][ld] bytes, sx[N]; returns 0 when some row of x has a non-finite maximum.
 * Vectorized (the scalar form cost ~10 ns per input, serial before every int8 matmul: about a
 * millisecond per Qwen2-0.5B step); the same values as lrint((double)x * inv) + 2^23 clamped:
 * vcvtpd2dq rounds to nearest even under the default MXCSR, as lrint does. */
QF_TARGET_VNNI static int vnni_prep(const float *x, int64_t N, int64_t in, int64_t ld, uint8_t *planes, double *sx) {
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * in;
        __m512 mv = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) mv = _mm512_max_ps(mv, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
        float m = _mm512_reduce_max_ps(mv);
        for (; i < in; i++) m = fmaxf(m, fabsf(xr[i]));
        if (!isfinite(m)) return 0;
        const double s = (double)m / 8388607.0, inv = s > 0 ? 1.0 / s : 0.0;
        uint8_t *p0 = planes + (n * 3) * ld, *p1 = p0 + ld, *p2 = p1 + ld;
        const __m512d vinv = _mm512_set1_pd(inv);
        const __m512i off = _mm512_set1_epi32(8388608), lo = _mm512_set1_epi32(1), hi = _mm512_set1_epi32(16777215);
        for (i = 0; i + 16 <= in; i += 16) {
            const __m256i a = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + i)), vinv));
            const __m256i b = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + i + 8)), vinv));
            __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            v = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, off), lo), hi);
            _mm_storeu_si128((__m128i *)(p0 + i), _mm512_cvtepi32_epi8(v));
            _mm_storeu_si128((__m128i *)(p1 + i), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
            _mm_storeu_si128((__m128i *)(p2 + i), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 16)));
        }
        for (; i < in; i++) {
            long v = lrint((double)xr[i] * inv) + 8388608L;
            v = v < 1 ? 1 : v > 16777215L ? 16777215L : v;
            p0[i] = (uint8_t)(v & 255);
            p1[i] = (uint8_t)((v >> 8) & 255);
            p2[i] = (uint8_t)(v >> 16);
        }
        for (i = in; i < ld; i++) p0[i] = p1[i] = p2[i] = 0;
        sx[n] = s;
    }
    return 1;
}

static inline __attribute__((always_inline)) QF_TARGET_VNNI void
row_vnni(const qf_qweight *q, int64_t o, const uint8_t *planes, int64_t ld, const double *sx, const int NR,
         float *res) {
    const int64_t in = q->in;
    const int8_t *w = (const int8_t *)q->codes + o * in;
    __m512i a[QMM_VNNI_MAX_N][3];
    _Pragma("GCC unroll 2") for (int n = 0; n < NR; n++) a[n][0] = a[n][1] = a[n][2] = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {
        const __m512i wv = _mm512_loadu_si512(w + i);
        _Pragma("GCC unroll 2") for (int n = 0; n < NR; n++) {
            const uint8_t *p = planes + n * 3 * ld + i;
            a[n][0] = _mm512_dpbusd_epi32(a[n][0], _mm512_loadu_si512(p), wv);
            a[n][1] = _mm512_dpbusd_epi32(a[n][1], _mm512_loadu_si512(p + ld), wv);
            a[n][2] = _mm512_dpbusd_epi32(a[n][2], _mm512_loadu_si512(p + 2 * ld), wv);
        }
    }
    if (i < in) { /* weights past the row are masked to 0; the planes are padded to ld */
        const __m512i wv = _mm512_maskz_loadu_epi8(_cvtu64_mask64(~0ull >> (64 - (in - i))), w + i);
        _Pragma("GCC unroll 2") for (int n = 0; n < NR; n++) {
            const uint8_t *p = planes + n * 3 * ld + i;
            a[n][0] = _mm512_dpbusd_epi32(a[n][0], _mm512_loadu_si512(p), wv);
            a[n][1] = _mm512_dpbusd_epi32(a[n][1], _mm512_loadu_si512(p + ld), wv);
            a[n][2] = _mm512_dpbusd_epi32(a[n][2], _mm512_loadu_si512(p + 2 * ld), wv);
        }
    }
    _Pragma("GCC unroll 2") for (int n = 0; n < NR; n++) {
        const double S0 = _mm512_reduce_add_epi32(a[n][0]), S1 = _mm512_reduce_add_epi32(a[n][1]),
                     S2 = _mm512_reduce_add_epi32(a[n][2]);
        res[n] = (float)((double)q->scales[o] * sx[n] * (S0 + 256.0 * S1 + 65536.0 * S2 - 8388608.0 * (double)q->qsum[o]));
    }
}

QF_TARGET_VNNI static void rows_vnni(const qf_qweight *q, const uint8_t *planes, int64_t ld, const double *sx, int nr,
                                     float *y, int64_t ldy, int64_t o0, int64_t o1) {
    float r[QMM_VNNI_MAX_N];
    for (int64_t o = o0; o < o1; o++) {
        if (nr == 1) row_vnni(q, o, planes, ld, sx, 1, r);
        else row_vnni(q, o, planes, ld, sx, 2, r);
        for (int n = 0; n < nr; n++) y[n * ldy + o] = r[n];
    }
}

/* ---- AVX-512 VNNI path: q4 with block 32, N <= 8 (decoding) ------------------------------
 * The float q4 kernel is instruction-bound (table lookups and FMAs per 16 weights; ~8
 * Gweights/s per core on the device's Xeon, below its share of the memory bandwidth). Here the
 * activations are quantized like llama.cpp's q8_0: per block of 32 inputs, sx = max|x_blk| / 127
 * and xi = nearbyint(x * (1/sx)) in [-127, 127] (float32, round half to even), so one vpdpbusd
 * multiplies 64 code nibbles (as unsigned 0..15 = q + 8) by 64 int8 activations. Per group of
 * 128 inputs (4 blocks, 64 code bytes) the low and the high nibbles give two vpdpbusd into one
 * int32 vector whose lane l holds block l/4; it starts at -8 * (the lane's sum of xi), which
 * turns q + 8 back into q. Its integer sum is exact (|S| < 2^15), converted to float and FMA'd
 * with scale_w * sx per lane: y = sum_blocks scale_w * sx * sum_i q_i xi.
 * Error (stated; tests/python/test_qmatmul.py checks it with outlier rows): x's rounding, at
 * most sx/2 per input, so |y - x.dequant(W)_o| <= sum_blocks (max|x_blk| / 254) sum_blk |w_oi|
 * <= max|x| sum_i |w_oi| / 254, plus float32 rounding of the block terms (~2^-23 relative).
 * This is about 2^-8 of the row's weight mass, ~30x smaller than q4's own weight error
 * (relative 9% per weight, test_format_error_vs_float32). Used when block == 32 and in % 128
 * == 0 (every q4 weight of the supported LLMs); a row of x whose max|x| is not finite takes
 * the float path. Prepared x, per row (stride 2 * in bytes): xi [in] int8 (in each group of 128:
 * the 4 blocks' first 16 values, then their last 16: the order of the code nibbles), then the
 * lane offsets int32 [in/128][16], then sx per lane float [in/128][16]. */
enum { QMM_Q8_MAX_N = 8 };

static int q4_vnni_ok(const qf_qweight *q, int64_t N) {
    return q->format == QF_WEIGHTS_Q4 && q->block == 32 && q->in % 128 == 0 && N <= QMM_Q8_MAX_N &&
           qf_get_isa() == QF_ISA_AVX512 && have_vnni();
}

/* Returns 0 when some block of x has a non-finite maximum (then the float path is used). */
QF_TARGET_VNNI static int q8_prep(const float *x, int64_t N, int64_t in, uint8_t *prep) {
    const int64_t G = in / 128, stride = 2 * in;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * in;
        int8_t *xq = (int8_t *)(prep + n * stride);
        int32_t *off = (int32_t *)(prep + n * stride + in);
        float *sxp = (float *)(prep + n * stride + in + G * 64);
        for (int64_t g = 0; g < G; g++) {
            for (int b = 0; b < 4; b++) {
                const float *xb = xr + g * 128 + b * 32;
                const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
                const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
                if (!isfinite(m) || (m > 0.0f && m < 1e-30f)) return 0; /* 1/sx would overflow */
                const float s = m / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
                const __m512 vi = _mm512_set1_ps(inv);
                const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
                /* cvtps_epi32 rounds to nearest even (MXCSR default), as nearbyintf */
                __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, vi)), ic = _mm512_cvtps_epi32(_mm512_mul_ps(c, vi));
                ia = _mm512_max_epi32(_mm512_min_epi32(ia, lim), nlim);
                ic = _mm512_max_epi32(_mm512_min_epi32(ic, lim), nlim);
                _mm_storeu_si128((__m128i *)(xq + g * 128 + b * 16), _mm512_cvtepi32_epi8(ia));
                _mm_storeu_si128((__m128i *)(xq + g * 128 + 64 + b * 16), _mm512_cvtepi32_epi8(ic));
                for (int l = 0; l < 4; l++) sxp[g * 16 + b * 4 + l] = s;
            }
            /* lane sums of xi over its 4 low-half and 4 high-half bytes, times -8 */
            const __m512i lo = _mm512_loadu_si512(xq + g * 128), hi = _mm512_loadu_si512(xq + g * 128 + 64);
            __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo);
            t = _mm512_dpbusd_epi32(t, ones, hi);
            _mm512_storeu_si512(off + g * 16, _mm512_mullo_epi32(t, _mm512_set1_epi32(-8)));
        }
    }
    return 1;
}

static inline __attribute__((always_inline)) QF_TARGET_VNNI void
row_q4_vnni(const qf_qweight *q, int64_t o, const uint8_t *prep, const int NR, float *res) {
    const int64_t in = q->in, G = in / 128, stride = 2 * in;
    const uint8_t *c = (const uint8_t *)q->codes + o * (in / 2);
    const float *sc = q->scales + o * q->nblocks;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i sidx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 F[QMM_Q8_MAX_N];
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) F[n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512i v = _mm512_loadu_si512(c + g * 64);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const __m512 sw = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_loadu_ps(sc + 4 * g)));
        _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) {
            const uint8_t *xp = prep + n * stride;
            const int32_t *off = (const int32_t *)(xp + in) + g * 16;
            const float *sxp = (const float *)(xp + in + G * 64) + g * 16;
            __m512i S = _mm512_dpbusd_epi32(_mm512_loadu_si512(off), lo, _mm512_loadu_si512(xp + g * 128));
            S = _mm512_dpbusd_epi32(S, hi, _mm512_loadu_si512(xp + g * 128 + 64));
            F[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), _mm512_mul_ps(sw, _mm512_loadu_ps(sxp)), F[n]);
        }
    }
    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) res[n] = _mm512_reduce_add_ps(F[n]);
}

QF_TARGET_VNNI static void rows_q4_vnni(const qf_qweight *q, const uint8_t *prep, int nr, float *y, int64_t ldy,
                                        int64_t o0, int64_t o1) {
    float r[QMM_Q8_MAX_N];
    for (int64_t o = o0; o < o1; o++) {
        switch (nr) {
        case 1: row_q4_vnni(q, o, prep, 1, r); break;
        case 2: row_q4_vnni(q, o, prep, 2, r); break;
        case 3: row_q4_vnni(q, o, prep, 3, r); break;
        case 4: row_q4_vnni(q, o, prep, 4, r); break;
        case 5: row_q4_vnni(q, o, prep, 5, r); break;
        case 6: row_q4_vnni(q, o, prep, 6, r); break;
        case 7: row_q4_vnni(q, o, prep, 7, r); break;
        default: row_q4_vnni(q, o, prep, 8, r); break;
        }
        for (int n = 0; n < nr; n++) y[n * ldy + o] = r[n];
    }
}

/* ---- dispatch ------------------------------------------------------------------------------ */

typedef void (*rows_fn)(const qf_qweight *, const float *, int, float *, int64_t, int64_t, int64_t);
typedef void (*dequant_fn)(const qf_qweight *, int64_t, float *);

static void pick(rows_fn *rows, dequant_fn *deq) {
    switch (qf_get_isa()) {
    case QF_ISA_AVX512: *rows = rows_avx512; *deq = dequant_row_avx512; return;
    case QF_ISA_AVX2: *rows = rows_avx2; *deq = dequant_row_avx2; return;
    default: *rows = rows_scalar; *deq = dequant_row_scalar; return;
    }
}

/* Rows [o0,o1) of the dequantized weight into dst (row o at dst + (o - o0) * in). */
static void dequant_rows(const qf_qweight *q, dequant_fn deq, int64_t o0, int64_t o1, float *dst) {
    const int64_t in = q->in;
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if ((o1 - o0) * in > (1 << 15))
    for (int64_t o = o0; o < o1; o++) deq(q, o, dst + (o - o0) * in);
}

qf_status qf_qweight_dequantize(const qf_qweight *q, float *w) {
    if (!q) return qf_fail(QF_ERR_ARG, "qf_qweight_dequantize: q is NULL");
    if (!w) return qf_fail(QF_ERR_ARG, "qf_qweight_dequantize: %s: w (the output) is NULL", q->what);
    rows_fn rows;
    dequant_fn deq;
    pick(&rows, &deq);
    dequant_rows(q, deq, 0, q->out, w);
    return QF_OK;
}

/* Decoding (N < QMM_GEMM_MIN_N) of nm weights sharing x and `in`, in ONE parallel region: the
 * tasks are row ranges of every matrix (2-16 KiB of codes each, ~8 per thread over all of them,
 * scheduled guided), so small matrices (a 128-row k_proj) neither get a region of their own
 * nor leave threads idle. x is prepared once for the integer paths. */
enum { QMM_MULTI_MAX = 8 };

/* silu(g) * u in the decoder's float32 form (llm_forward.c's loop computes the same). */
static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* QFUSE_QMM_PREFETCH: bytes of software prefetch ahead of the decode kernels' rows (0 = off,
 * the default; a tuning knob for machines whose prefetchers lose streams at page ends). */
static int64_t qmm_prefetch(void) {
    static int64_t v = -1;
    if (v < 0) {
        const char *e = getenv("QFUSE_QMM_PREFETCH");
        long long p = e ? atoll(e) : 0;
        v = p > 0 && p < (1 << 20) ? ((int64_t)p + 63) & ~(int64_t)63 : 0;
    }
    return v;
}

static qf_status decode_multi(int nm, float *const *ys, const float *x, const qf_qweight *const *qs,
                              const float *const *biases, int64_t N, int glu) {
    const int64_t in = qs[0]->in;
    rows_fn rows;
    dequant_fn deq;
    pick(&rows, &deq);
    int kind[QMM_MULTI_MAX]; /* 0 float rows, 1 int8 VNNI (24-bit x), 2 q4 VNNI (q8 x) */
    int any1 = 0, any2 = 0;
    for (int m = 0; m < nm; m++) {
        const qf_qweight *q = qs[m];
        kind[m] = q4_vnni_ok(q, N) ? 2
                  : (q->qsum && N <= QMM_VNNI_MAX_N && in <= QMM_VNNI_MAX_IN && qf_get_isa() == QF_ISA_AVX512 &&
                     have_vnni()) ? 1 : 0;
        any1 |= kind[m] == 1;
        any2 |= kind[m] == 2;
    }
    const int64_t ld = (in + 63) & ~(int64_t)63;
    const size_t b1 = any1 ? qf_align_up((size_t)(N * 3 * ld) + 64 + (size_t)N * sizeof(double), 64) : 0,
                 b2 = any2 ? (size_t)(N * 2 * in) : 0;
    uint8_t *planes = NULL, *prep = NULL;
    double *sx = NULL;
    if (any1 || any2) {
        void *mem;
        QF_TRY(qf_scratch(b1 + b2 + 64, &mem));
        sx = mem;
        planes = (uint8_t *)mem + 64;
        prep = (uint8_t *)mem + b1;
        if (any1 && !vnni_prep(x, N, in, ld, planes, sx)) any1 = 0;
        if (any2 && !q8_prep(x, N, in, prep)) any2 = 0;
        for (int m = 0; m < nm; m++)
            if ((kind[m] == 1 && !any1) || (kind[m] == 2 && !any2)) kind[m] = 0;
    }
    size_t total = 0;
    for (int m = 0; m < nm; m++) total += (size_t)qs[m]->out * row_code_bytes(qs[m]);
    const int T = qf_threads();
    size_t cb = total / (8 * (size_t)T);
    cb = cb < 2048 ? 2048 : cb > 16384 ? 16384 : cb;
    int64_t chunk[QMM_MULTI_MAX], tstart[QMM_MULTI_MAX + 1];
    tstart[0] = 0;
    const int ntm = glu ? 1 : nm; /* glu: a task is the same rows of gate (0) and up (1) */
    for (int m = 0; m < ntm; m++) {
        const size_t rb = row_code_bytes(qs[m]);
        chunk[m] = (int64_t)((cb + rb - 1) / rb);
        tstart[m + 1] = tstart[m] + (qs[m]->out + chunk[m] - 1) / chunk[m];
    }
    const int64_t ntask = tstart[ntm];
    const int64_t pf = qmm_prefetch();
    /* guided: each thread first takes a long contiguous run of tasks (one sequential stream, as
     * the hardware prefetchers like), then ever smaller ones, so a slow or late thread does not
     * hold the region's end (schedule(static) lost 10x on one device run with a busy core;
     * dynamic, 1 paid an atomic per 16 KiB task: bf16 at N = 1 207 vs 335 GB/s from L3). */
#pragma omp parallel for num_threads(T) schedule(guided) if (total * (size_t)N > (1u << 15))
    for (int64_t t = 0; t < ntask; t++) {
        int m = 0;
        while (t >= tstart[m + 1]) m++;
        const int64_t out = qs[m]->out, o0 = (t - tstart[m]) * chunk[m], o1 = o0 + chunk[m] < out ? o0 + chunk[m] : out;
        for (int mm = m; mm < (glu ? 2 : m + 1); mm++) {
            const qf_qweight *q = qs[mm];
            float *y = ys[mm];
            const size_t rb = row_code_bytes(q);
            /* optional software prefetch pf bytes ahead, a few rows at a time (QFUSE_QMM_PREFETCH) */
            const int64_t sub = pf ? (rb >= 1024 ? 1 : (int64_t)(1024 / rb)) : o1 - o0;
            const char *codes = (const char *)q->codes, *end = codes + (size_t)out * rb;
            for (int64_t a = o0; a < o1; a += sub) {
                const int64_t b = a + sub < o1 ? a + sub : o1;
                if (pf)
                    for (const char *p = codes + (size_t)a * rb + pf, *pe = codes + (size_t)b * rb + pf; p < pe && p < end;
                         p += 64)
                        __builtin_prefetch(p, 0, 2);
                if (kind[mm] == 2) rows_q4_vnni(q, prep, (int)N, y, out, a, b);
                else if (kind[mm] == 1) rows_vnni(q, planes, ld, sx, (int)N, y, out, a, b);
                else
                    for (int64_t n0 = 0; n0 < N; n0 += QMM_NR)
                        rows(q, x + n0 * in, (int)(N - n0 < QMM_NR ? N - n0 : QMM_NR), y + n0 * out, out, a, b);
            }
            const float *bias = biases ? biases[mm] : NULL;
            if (bias)
                for (int64_t n = 0; n < N; n++)
                    for (int64_t o = o0; o < o1; o++) y[n * out + o] += bias[o];
        }
        if (glu)
            for (int64_t n = 0; n < N; n++)
                for (int64_t o = o0; o < o1; o++) {
                    float *g = ys[0] + n * out + o;
                    *g = silu_mul(*g, ys[1][n * out + o]);
                }
    }
    return QF_OK;
}

qf_status qf_qweight_matmul(float *y, const float *x, const qf_qweight *q, const float *bias, int64_t N) {
    const char *fn = "qf_qweight_matmul";
    if (!q) return qf_fail(QF_ERR_ARG, "%s: q (the weight) is NULL", fn);
    if (!y) return qf_fail(QF_ERR_ARG, "%s: %s: y is NULL", fn, q->what);
    if (!x) return qf_fail(QF_ERR_ARG, "%s: %s: x is NULL", fn, q->what);
    if (N <= 0 || N > INT_MAX)
        return qf_fail(QF_ERR_ARG, "%s: %s: N = %lld rows of x: must be in [1, INT_MAX]", fn, q->what, (long long)N);
    const int64_t in = q->in, out = q->out;
    rows_fn rows;
    dequant_fn deq;
    pick(&rows, &deq);

    if (N < QMM_GEMM_MIN_N) return decode_multi(1, &y, x, &q, &bias, N, 0);

    /* Prefill: dequantized panels of W rows through SGEMM. */
    int64_t R = (int64_t)(QMM_PANEL_BYTES / ((size_t)in * sizeof(float)));
    R = R < 16 ? 16 : R & ~(int64_t)15;
    if (R > out) R = out;
    void *mem;
    size_t panel_bytes;
    QF_TRY(qf_mul_size((size_t)R * sizeof(float), (size_t)in, q->what, &panel_bytes));
    QF_TRY(qf_scratch(panel_bytes, &mem));
    float *panel = mem;
    float beta = 0.0f;
    if (bias) {
#pragma omp parallel for num_threads(qf_threads()) if (N * out > 65536)
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < out; o++) y[n * out + o] = bias[o];
        beta = 1.0f;
    }
    for (int64_t o0 = 0; o0 < out; o0 += R) {
        const int64_t r = o0 + R < out ? R : out - o0;
        dequant_rows(q, deq, o0, o0 + r, panel);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)r, (int)in, 1.0f, x, (int)in, panel,
                    (int)in, beta, y + o0, (int)out);
    }
    return QF_OK;
}

qf_status qf_qweight_matmul_multi(int n, float *const *y, const float *x, const qf_qweight *const *q,
                                  const float *const *bias, int64_t N) {
    const char *fn = "qf_qweight_matmul_multi";
    if (n < 1 || n > QMM_MULTI_MAX) return qf_fail(QF_ERR_ARG, "%s: n = %d weights: must be in [1, %d]", fn, n, QMM_MULTI_MAX);
    if (!y || !q) return qf_fail(QF_ERR_ARG, "%s: the y or q array is NULL", fn);
    if (!x) return qf_fail(QF_ERR_ARG, "%s: x is NULL", fn);
    if (N <= 0 || N > INT_MAX) return qf_fail(QF_ERR_ARG, "%s: N = %lld rows of x: must be in [1, INT_MAX]", fn, (long long)N);
    for (int i = 0; i < n; i++) {
        if (!q[i]) return qf_fail(QF_ERR_ARG, "%s: q[%d] (a weight) is NULL", fn, i);
        if (!y[i]) return qf_fail(QF_ERR_ARG, "%s: %s: y[%d] is NULL", fn, q[i]->what, i);
        if (q[i]->in != q[0]->in)
            return qf_fail(QF_ERR_ARG, "%s: %s has in = %lld but %s in = %lld: the weights must share x", fn,
                           q[i]->what, (long long)q[i]->in, q[0]->what, (long long)q[0]->in);
    }
    if (N < QMM_GEMM_MIN_N) return decode_multi(n, y, x, q, bias, N, 0);
    for (int i = 0; i < n; i++) QF_TRY(qf_qweight_matmul(y[i], x, q[i], bias ? bias[i] : NULL, N));
    return QF_OK;
}

qf_status qf_qweight_matmul_glu(float *g, float *u, const float *x, const qf_qweight *gate, const qf_qweight *up,
                                const float *gate_bias, const float *up_bias, int64_t N) {
    const char *fn = "qf_qweight_matmul_glu";
    if (!gate || !up) return qf_fail(QF_ERR_ARG, "%s: gate or up (a weight) is NULL", fn);
    if (!g || !u || !x) return qf_fail(QF_ERR_ARG, "%s: %s: g, u or x is NULL", fn, gate->what);
    if (gate->in != up->in || gate->out != up->out)
        return qf_fail(QF_ERR_ARG, "%s: %s is [%lld,%lld] but %s [%lld,%lld]: gate and up must have one shape", fn,
                       gate->what, (long long)gate->out, (long long)gate->in, up->what, (long long)up->out,
                       (long long)up->in);
    if (N <= 0 || N > INT_MAX) return qf_fail(QF_ERR_ARG, "%s: N = %lld rows of x: must be in [1, INT_MAX]", fn, (long long)N);
    float *const ys[2] = {g, u};
    const qf_qweight *const qs[2] = {gate, up};
    const float *const bs[2] = {gate_bias, up_bias};
    if (N < QMM_GEMM_MIN_N) return decode_multi(2, ys, x, qs, bs, N, 1);
    QF_TRY(qf_qweight_matmul(g, x, gate, gate_bias, N));
    QF_TRY(qf_qweight_matmul(u, x, up, up_bias, N));
    const int64_t n = N * gate->out;
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (n > 2048)
    for (int64_t i = 0; i < n; i++) g[i] = silu_mul(g[i], u[i]);
    return QF_OK;
}
