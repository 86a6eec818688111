/* gemm_small.c - out = x · wᵀ + bias + res for few rows M (gemm_small.h says when and why).
 *
 * Blocking: the output columns are cut into tiles of 4 (weight rows); each OpenMP thread owns a
 * contiguous run of tiles, so the weight is streamed once, in order, over all threads. K is cut
 * into chunks of at most kc floats so that a tile's 4 weight rows and 4 rows of x stay in L1
 * (2 x 4 x kc x 4 B <= 3/4 of L1d: kc = 1024 with a 48 KB L1d, 768 with 32 KB); within a chunk
 * every row tile of x (4 rows; AVX2: 2) is taken against the weight tile, which stays in L1 while
 * x (M x kc) cycles through L2. (kc 256..4096 measured on the Q-Former shapes on a 48 KB-L1d
 * Zen 5: 1024 best; the lane sums cost ~10% at 512. On the device's Xeon kc = 1024 lost to the
 * BLAS exactly on the K >= 1024 shapes (32 KB tile working set) and won on K = 768 (24 KB), as a
 * 32 KB L1d would make it; this rule is not yet measured there.) While the first row tile runs,
 * the thread's next weight chunk is prefetched to L2.
 * Micro-kernel (AVX-512): a 4 x 4 block of dot products, 16 accumulators of 16 lanes, each step
 * 4 loads of x, 4 of w, 16 FMAs; K tails by masked loads. The 16 accumulators are then summed
 * across lanes in one tree (45 shuffles/adds) that leaves out[r][c] in lane 4r + c. AVX2: a 2 x 4
 * block (8 accumulators of 8 lanes: 16 registers), the same idea. Scalar: plain dot products.
 * Invariants: the first K chunk writes (or, accumulating, adds) bias + res + its partial sums;
 * later chunks add theirs, so every output element is finished when its tile is. Rows or columns
 * past M or N in a partial tile reuse the last valid row's pointer and are never stored. */
#include "gemm_small.h"
#include <cblas.h>
#include <immintrin.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* K chunk length in floats: a tile's 32*kc bytes in 3/4 of L1d, multiple of 64, in [256, 1024];
 * 512 where the size is unknown. Computed once (sysconf may run CPUID, slow in a VM). */
static int64_t chunk_floats(void) {
    static int kc_cached;
    int kc = __atomic_load_n(&kc_cached, __ATOMIC_RELAXED);
    if (kc) return kc;
    long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    kc = l1 > 0 ? (int)(l1 * 3 / 4 / 32) & ~63 : 512;
    if (kc < 256) kc = 256;
    if (kc > 1024) kc = 1024;
    __atomic_store_n(&kc_cached, kc, __ATOMIC_RELAXED);
    return kc;
}

/* pf: the 4 weight rows of the chunk this thread takes next (pf_len floats each), prefetched to L2
 * during the first row tile so the stream from memory overlaps the arithmetic */
typedef void (*tile_run_fn)(const qf_gemm_nt_args *a, int64_t n0, int nr, int64_t k0, int64_t kn, int first,
                            const float *const *pf, int64_t pf_len);

/* Writes one finished value set of a tile: v[r*4 + c] for rows m0.., columns n0.. */
static inline void store_tile(const qf_gemm_nt_args *a, int64_t m0, int mr, int64_t n0, int nr, const float *v,
                              int first) {
    for (int r = 0; r < mr; r++) {
        float *o = a->out + (m0 + r) * a->ldo + n0;
        const float *res = a->res ? a->res + (m0 + r) * a->ldr + n0 : NULL;
        for (int c = 0; c < nr; c++) {
            float s = v[r * 4 + c];
            if (first) {
                if (a->bias) s += a->bias[n0 + c];
                if (res) s += res[c];
                o[c] = a->accumulate ? o[c] + s : s;
            } else {
                o[c] += s;
            }
        }
    }
}

/* ---- scalar ---- */

static void run_scalar(const qf_gemm_nt_args *a, int64_t n0, int nr, int64_t k0, int64_t kn, int first,
                       const float *const *pf, int64_t pf_len) {
    (void)pf;
    (void)pf_len;
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        const int mr = a->M - m0 < 4 ? (int)(a->M - m0) : 4;
        float v[16] = {0};
        for (int r = 0; r < mr; r++) {
            const float *x = a->x + (m0 + r) * a->ldx + k0;
            for (int c = 0; c < nr; c++) {
                const float *w = a->w + (n0 + c) * a->K + k0;
                float s = 0.0f;
                for (int64_t k = 0; k < kn; k++) s += x[k] * w[k];
                v[r * 4 + c] = s;
            }
        }
        store_tile(a, m0, mr, n0, nr, v, first);
    }
}

/* ---- AVX2: 2 x 4 tiles ---- */

QF_TARGET_AVX2 static void run_avx2(const qf_gemm_nt_args *a, int64_t n0, int nr, int64_t k0, int64_t kn,
                                    int first, const float *const *pf, int64_t pf_len) {
    (void)pf;
    (void)pf_len;
    const float *w0 = a->w + (n0 + 0) * a->K + k0;
    const float *w1 = a->w + (n0 + (nr > 1 ? 1 : 0)) * a->K + k0;
    const float *w2 = a->w + (n0 + (nr > 2 ? 2 : 0)) * a->K + k0;
    const float *w3 = a->w + (n0 + (nr > 3 ? 3 : 0)) * a->K + k0;
    const int64_t kfull = kn & ~(int64_t)7;
    const int tail = (int)(kn - kfull);
    int32_t mbits[8];
    for (int i = 0; i < 8; i++) mbits[i] = i < tail ? -1 : 0;
    const __m256i tmask = _mm256_loadu_si256((const __m256i *)mbits);
    for (int64_t m0 = 0; m0 < a->M; m0 += 2) {
        const int mr = a->M - m0 < 2 ? (int)(a->M - m0) : 2;
        const float *x0 = a->x + m0 * a->ldx + k0, *x1 = mr > 1 ? x0 + a->ldx : x0;
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
        __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
        int64_t k = 0;
        for (; k < kfull; k += 8) {
            const __m256 a0 = _mm256_loadu_ps(x0 + k), a1 = _mm256_loadu_ps(x1 + k);
            __m256 b = _mm256_loadu_ps(w0 + k);
            c00 = _mm256_fmadd_ps(a0, b, c00); c10 = _mm256_fmadd_ps(a1, b, c10);
            b = _mm256_loadu_ps(w1 + k);
            c01 = _mm256_fmadd_ps(a0, b, c01); c11 = _mm256_fmadd_ps(a1, b, c11);
            b = _mm256_loadu_ps(w2 + k);
            c02 = _mm256_fmadd_ps(a0, b, c02); c12 = _mm256_fmadd_ps(a1, b, c12);
            b = _mm256_loadu_ps(w3 + k);
            c03 = _mm256_fmadd_ps(a0, b, c03); c13 = _mm256_fmadd_ps(a1, b, c13);
        }
        if (tail) {
            const __m256 a0 = _mm256_maskload_ps(x0 + k, tmask), a1 = _mm256_maskload_ps(x1 + k, tmask);
            __m256 b = _mm256_maskload_ps(w0 + k, tmask);
            c00 = _mm256_fmadd_ps(a0, b, c00); c10 = _mm256_fmadd_ps(a1, b, c10);
            b = _mm256_maskload_ps(w1 + k, tmask);
            c01 = _mm256_fmadd_ps(a0, b, c01); c11 = _mm256_fmadd_ps(a1, b, c11);
            b = _mm256_maskload_ps(w2 + k, tmask);
            c02 = _mm256_fmadd_ps(a0, b, c02); c12 = _mm256_fmadd_ps(a1, b, c12);
            b = _mm256_maskload_ps(w3 + k, tmask);
            c03 = _mm256_fmadd_ps(a0, b, c03); c13 = _mm256_fmadd_ps(a1, b, c13);
        }
        /* hadd twice gives, per 128-bit half, [s0 s1 s2 s3] partials of four accumulators */
        const __m256 r0 = _mm256_hadd_ps(_mm256_hadd_ps(c00, c01), _mm256_hadd_ps(c02, c03));
        const __m256 r1 = _mm256_hadd_ps(_mm256_hadd_ps(c10, c11), _mm256_hadd_ps(c12, c13));
        float v[16];
        _mm_storeu_ps(v, _mm_add_ps(_mm256_castps256_ps128(r0), _mm256_extractf128_ps(r0, 1)));
        _mm_storeu_ps(v + 4, _mm_add_ps(_mm256_castps256_ps128(r1), _mm256_extractf128_ps(r1, 1)));
        store_tile(a, m0, mr, n0, nr, v, first);
    }
}

/* ---- AVX-512: 4 x 4 tiles ---- */

/* 2-operand combine of the lane reduction: 128-bit lane shuffles, then in-lane shuffles */
#define SH4(a, b, i) _mm512_shuffle_f32x4((a), (b), (i))

QF_TARGET_AVX512 static inline __m512 reduce16(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5,
                                               __m512 v6, __m512 v7, __m512 v8, __m512 v9, __m512 v10,
                                               __m512 v11, __m512 v12, __m512 v13, __m512 v14, __m512 v15) {
    /* stage 1: [a0+a2, a1+a3 | b0+b2, b1+b3] in 128-bit chunks: 8 partials of a, 8 of b */
#define S1(a, b) _mm512_add_ps(SH4(a, b, 0x44), SH4(a, b, 0xEE))
    const __m512 t0 = S1(v0, v1), t1 = S1(v2, v3), t2 = S1(v4, v5), t3 = S1(v6, v7);
    const __m512 t4 = S1(v8, v9), t5 = S1(v10, v11), t6 = S1(v12, v13), t7 = S1(v14, v15);
#undef S1
    /* stage 2: chunk j of u holds 4 partials of accumulator (4 per u) number j */
#define S2(a, b) _mm512_add_ps(SH4(a, b, 0x88), SH4(a, b, 0xDD))
    const __m512 u0 = S2(t0, t1), u1 = S2(t2, t3), u2 = S2(t4, t5), u3 = S2(t6, t7);
#undef S2
    /* stage 3: chunk j: [A0 B0 A1 B1] with A = v(j of u_a), B = v(j of u_b), 2 partials each */
    const __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(u0, u1), _mm512_unpackhi_ps(u0, u1));
    const __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(u2, u3), _mm512_unpackhi_ps(u2, u3));
    /* stage 4: chunk j = [v_j, v_(4+j), v_(8+j), v_(12+j)] summed: lane 4j + i = sum(v_(4i + j)) */
    return _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x44), _mm512_shuffle_ps(w0, w1, 0xEE));
}
#undef SH4

QF_TARGET_AVX512 static void run_avx512(const qf_gemm_nt_args *a, int64_t n0, int nr, int64_t k0, int64_t kn,
                                        int first, const float *const *pf, int64_t pf_len) {
    const float *w0 = a->w + (n0 + 0) * a->K + k0;
    const float *w1 = a->w + (n0 + (nr > 1 ? 1 : 0)) * a->K + k0;
    const float *w2 = a->w + (n0 + (nr > 2 ? 2 : 0)) * a->K + k0;
    const float *w3 = a->w + (n0 + (nr > 3 ? 3 : 0)) * a->K + k0;
    const int64_t kfull = kn & ~(int64_t)15;
    const __mmask16 tmask = (__mmask16)((1u << (kn - kfull)) - 1u);
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        const int mr = a->M - m0 < 4 ? (int)(a->M - m0) : 4;
        const float *x0 = a->x + m0 * a->ldx + k0;
        const float *x1 = mr > 1 ? x0 + a->ldx : x0;
        const float *x2 = mr > 2 ? x0 + 2 * a->ldx : x0;
        const float *x3 = mr > 3 ? x0 + 3 * a->ldx : x0;
        /* cRC: row R of x, column C of the tile; reduce16 wants column-major order (4C + R) */
        __m512 c00 = _mm512_setzero_ps(), c10 = c00, c20 = c00, c30 = c00;
        __m512 c01 = c00, c11 = c00, c21 = c00, c31 = c00;
        __m512 c02 = c00, c12 = c00, c22 = c00, c32 = c00;
        __m512 c03 = c00, c13 = c00, c23 = c00, c33 = c00;
#define STEP(LOAD)                                                                                    \
    do {                                                                                              \
        __m512 a0 = LOAD(x0), a1 = LOAD(x1), a2 = LOAD(x2), a3 = LOAD(x3);                            \
        /* keeps the four x vectors in registers: GCC otherwise reloads x for every FMA */           \
        __asm__("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3));                                         \
        __m512 b = LOAD(w0);                                                                          \
        __asm__("" : "+v"(b));                                                                        \
        c00 = _mm512_fmadd_ps(a0, b, c00); c10 = _mm512_fmadd_ps(a1, b, c10);                         \
        c20 = _mm512_fmadd_ps(a2, b, c20); c30 = _mm512_fmadd_ps(a3, b, c30);                         \
        b = LOAD(w1);                                                                                 \
        __asm__("" : "+v"(b));                                                                        \
        c01 = _mm512_fmadd_ps(a0, b, c01); c11 = _mm512_fmadd_ps(a1, b, c11);                         \
        c21 = _mm512_fmadd_ps(a2, b, c21); c31 = _mm512_fmadd_ps(a3, b, c31);                         \
        b = LOAD(w2);                                                                                 \
        __asm__("" : "+v"(b));                                                                        \
        c02 = _mm512_fmadd_ps(a0, b, c02); c12 = _mm512_fmadd_ps(a1, b, c12);                         \
        c22 = _mm512_fmadd_ps(a2, b, c22); c32 = _mm512_fmadd_ps(a3, b, c32);                         \
        b = LOAD(w3);                                                                                 \
        __asm__("" : "+v"(b));                                                                        \
        c03 = _mm512_fmadd_ps(a0, b, c03); c13 = _mm512_fmadd_ps(a1, b, c13);                         \
        c23 = _mm512_fmadd_ps(a2, b, c23); c33 = _mm512_fmadd_ps(a3, b, c33);                         \
    } while (0)
        int64_t k = 0;
#define LD_FULL(p) _mm512_loadu_ps((p) + k)
#define LD_TAIL(p) _mm512_maskz_loadu_ps(tmask, (p) + k)
        if (m0 == 0 && pf) {
            for (; k < kfull; k += 16) {
                if (k < pf_len) {
                    _mm_prefetch((const char *)(pf[0] + k), _MM_HINT_T1);
                    _mm_prefetch((const char *)(pf[1] + k), _MM_HINT_T1);
                    _mm_prefetch((const char *)(pf[2] + k), _MM_HINT_T1);
                    _mm_prefetch((const char *)(pf[3] + k), _MM_HINT_T1);
                }
                STEP(LD_FULL);
            }
        }
        for (; k < kfull; k += 16) STEP(LD_FULL);
        if (tmask) STEP(LD_TAIL);
#undef LD_FULL
#undef LD_TAIL
#undef STEP
        const __m512 s = reduce16(c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33);
        if (mr == 4 && nr == 4) {
            /* lane 4r + c = out[r][c]: finish the four rows with 128-bit operations */
            float *o = a->out + m0 * a->ldo + n0;
            __m128 v[4] = {_mm512_castps512_ps128(s), _mm512_extractf32x4_ps(s, 1), _mm512_extractf32x4_ps(s, 2),
                           _mm512_extractf32x4_ps(s, 3)};
            if (first) {
                const __m128 bias = a->bias ? _mm_loadu_ps(a->bias + n0) : _mm_setzero_ps();
                for (int r = 0; r < 4; r++) {
                    __m128 t = _mm_add_ps(v[r], bias);
                    if (a->res) t = _mm_add_ps(t, _mm_loadu_ps(a->res + (m0 + r) * a->ldr + n0));
                    if (a->accumulate) t = _mm_add_ps(t, _mm_loadu_ps(o + r * a->ldo));
                    _mm_storeu_ps(o + r * a->ldo, t);
                }
            } else {
                for (int r = 0; r < 4; r++) _mm_storeu_ps(o + r * a->ldo, _mm_add_ps(v[r], _mm_loadu_ps(o + r * a->ldo)));
            }
        } else {
            float v[16];
            _mm512_storeu_ps(v, s);
            store_tile(a, m0, mr, n0, nr, v, first);
        }
    }
}

void qf_gemm_nt_small(const qf_gemm_nt_args *a) {
    const qf_isa isa = qf_get_isa();
    const tile_run_fn run = isa == QF_ISA_AVX512 ? run_avx512 : isa == QF_ISA_AVX2 ? run_avx2 : run_scalar;
    const int64_t tiles = (a->N + 3) / 4;
    /* K chunks of equal length (multiples of 16 where K allows), each at most chunk_floats() */
    const int64_t KC = chunk_floats();
    const int64_t nchunk = (a->K + KC - 1) / KC;
    int64_t kc = (a->K + nchunk - 1) / nchunk;
    kc = (kc + 15) & ~(int64_t)15;
    /* threads: at least 4 column tiles and ~1 MFLOP each, else the fork costs more than it saves */
    const double flop = 2.0 * (double)a->M * (double)a->N * (double)a->K;
    int64_t nt = qf_threads();
    if (nt > tiles / 4) nt = tiles / 4;
    if (nt > (int64_t)(flop / 1e6)) nt = (int64_t)(flop / 1e6);
    if (nt < 1) nt = 1;
#pragma omp parallel num_threads((int)nt) if (nt > 1)
    {
        int64_t id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        const int64_t t0 = tiles * id / n, t1 = tiles * (id + 1) / n;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t n0 = t * 4;
            const int nr = a->N - n0 < 4 ? (int)(a->N - n0) : 4;
            for (int64_t k0 = 0; k0 < a->K; k0 += kc) {
                /* the chunk after this one: same tile further along K, else the next tile's first */
                int64_t pn = n0, pk = k0 + kc;
                if (pk >= a->K) { pn = n0 + 4; pk = 0; }
                const float *pf[4];
                int64_t pf_len = 0;
                if (pn < a->N && (pn < t1 * 4)) {
                    pf_len = a->K - pk < kc ? a->K - pk : kc;
                    for (int j = 0; j < 4; j++) pf[j] = a->w + (pn + j < a->N ? pn + j : a->N - 1) * a->K + pk;
                }
                run(a, n0, nr, k0, a->K - k0 < kc ? a->K - k0 : kc, k0 == 0, pf_len ? pf : NULL, pf_len);
            }
        }
    }
}

void qf_gemm_nt(const qf_gemm_nt_args *a) {
    if (qf_gemm_small_wanted(a->M, a->N, a->K)) {
        qf_gemm_nt_small(a);
        return;
    }
    const int64_t M = a->M, N = a->N;
    float beta = 1.0f;
    if (!a->bias && !a->res && !a->accumulate) {
        beta = 0.0f; /* a plain product: nothing to start from */
    } else if (a->bias || a->res || !a->accumulate) {
#pragma omp parallel for num_threads(qf_threads()) if (M * N > 65536)
        for (int64_t m = 0; m < M; m++) {
            float *o = a->out + m * a->ldo;
            const float *r = a->res ? a->res + m * a->ldr : NULL;
            for (int64_t n = 0; n < N; n++) {
                float v = a->accumulate ? o[n] : 0.0f;
                if (a->bias) v += a->bias[n];
                if (r) v += r[n];
                o[n] = v;
            }
        }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)a->K, 1.0f, a->x, (int)a->ldx, a->w,
                (int)a->K, beta, a->out, (int)a->ldo);
}
