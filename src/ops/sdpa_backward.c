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
 * qf_philox_uniform(seed, offset, ((b*Hq+h)*L+i)*S+j) >= p, exactly the forward's (the AVX-512
 * generator of sdpa_simd.h is bit-exact with it).
 *
 * Tiled path (AVX-512 and AVX2: the same driver, ISA-specific kernels in a bwd_isa table):
 *   - Pass 1, per query row: D_i = dO_i . out_i, lse' = lse (+inf for dead rows, so that
 *     exp(s - lse') is 0 without a test), dq row zeroed.
 *   - Pass 2, a work item = (batch, kv head) pair and a split s of its key super-blocks (KB <= 4
 *     key blocks of Bc = 64 keys; super-blocks s, s + nsplit, ...). The item owns the dk/dv rows
 *     of its blocks. Per super-block it packs K^T and V^T panels once, then for every query head
 *     of the group and every query block of Br = 64 rows (causal: blocks right of the diagonal
 *     are skipped) runs, per key block, 5 block GEMMs as register-tiled microkernels (6 rows x
 *     64 columns AVX-512 / 6 x 16 AVX2, broadcast-FMA):
 *         S = Q K^T (scores kernel, packed K^T)      P = exp(S + mask - lse')
 *         dP = dO V^T (scores kernel, packed V^T)    dS = scale * P * (Z dP - D)
 *         dV += (Z P)^T dO, dK += dS^T Q  (tn kernel: reads P / dS transposed by broadcast,
 *                                          so no tile is ever transposed in memory)
 *         dQ += dS K (pv kernel, K in its natural layout).
 *     The super-block makes a query block's Q, dO and dq rows serve KB tiles per read, while
 *     the super-block's panels and dk/dv rows stay in L2. On a causal diagonal tile each group
 *     of 6 rows computes only keys up to its last row, and the dK/dV sums start at the diagonal.
 *     dQ of split 0 goes straight to dq; split s > 0 accumulates into its own full-size partial
 *     buffer, added into dq in pass 3. nsplit > 1 only when there are too few pairs to keep
 *     every thread busy (and the partials stay under QF_SDPA_BWD_PARTIAL_BYTES), or fewer
 *     than QF_SDPA_BWD_ITEMS_PER_THREAD items per thread (partials under
 *     QF_SDPA_BWD_BALANCE_BYTES): 1 x 16 heads on 16 threads as one item a thread put every
 *     thread's slowest spell on the critical path. Items run split-major (split 0, which
 *     holds the largest causal super-block, first) under dynamic scheduling.
 *   - Lanes of a score tile that a kernel did not write (tails, trimmed diagonal groups) may
 *     hold anything; prob_row and ds_row zero every key at or past the row's limit, and the
 *     GEMMs read only rows < nr and keys < nk.
 * Scalar path: parallel over (batch, kv head) pairs; each pair walks its query heads and rows
 * in order, so it owns its dk/dv rows and the dq rows of its heads (no atomics). It is the
 * plain reference the tiled path is tested beside. */
#include "sdpa_internal.h"
#include "sdpa_simd.h"
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

/* ---------------------------------- tiled path (AVX-512) ---------------------------------- */

#define BWD_BR 64 /* query rows per block */
#define BWD_BC 64 /* keys per block = one packed panel of QF_SDPA_W512 */
#define QF_SDPA_BWD_PARTIAL_BYTES ((size_t)256 << 20)
#define NO_TRIM (INT64_MIN / 2) /* causal_off of a tile without causal trimming */
#define QF_SDPA_BWD_SUPER_BYTES ((size_t)512 << 10)
#define QF_SDPA_BWD_ITEMS_PER_THREAD 4
#define QF_SDPA_BWD_BALANCE_BYTES ((size_t)64 << 20)

/* One register tile of O[j][c] += sum_{i<ni} P[i*ldp + j] X[i*ldx + c]: R rows j (<= 6) x NV*16
 * columns c (the last vector masked by tail). P is read transposed, one broadcast per (i, j). */
QF_TARGET_AVX512 static QF_SDPA_ALWAYS_INLINE void tn_tile512(const float *p, int64_t ldp, int64_t ni,
                                                             const float *x, int64_t ldx, float *o, int64_t ldo,
                                                             __mmask16 tail, const int R, const int NV) {
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV) acc[r][c] = _mm512_maskz_loadu_ps(c == NV - 1 ? tail : (__mmask16)0xFFFF, o + r * ldo + 16 * c);
    }
    for (int64_t i = 0; i < ni; i++) {
        const float *xi = x + i * ldx, *pi = p + i * ldp;
        __m512 b[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV) b[c] = _mm512_maskz_loadu_ps(c == NV - 1 ? tail : (__mmask16)0xFFFF, xi + 16 * c);
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m512 a = _mm512_set1_ps(pi[r]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                if (c < NV) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < NV) _mm512_mask_storeu_ps(o + r * ldo + 16 * c, c == NV - 1 ? tail : (__mmask16)0xFFFF, acc[r][c]);
    }
}

#define TN512_CASE(R)                                                                           \
    case R:                                                                                     \
        switch (nv) {                                                                           \
        case 1: tn_tile512(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 1); break;                   \
        case 2: tn_tile512(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 2); break;                   \
        case 3: tn_tile512(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 3); break;                   \
        default: tn_tile512(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 4); break;                  \
        }                                                                                       \
        break;

/* O[j][0:ncols] += sum_{i<ni} P[i][j] X[i][0:ncols] for j < nj (P^T X without transposing P). */
/* causal_off trims a causal diagonal tile: P[i][j] is zero for i < j + causal_off, so the sum
 * for row group j0.. starts at i = j0 + causal_off (NO_TRIM: from 0). */
QF_TARGET_AVX512 static void tn512(const float *p, int64_t ldp, int64_t ni, int64_t nj, const float *x,
                                   int64_t ldx, int64_t ncols, float *o, int64_t ldo, int64_t causal_off) {
    for (int64_t c0 = 0; c0 < ncols; c0 += 64) {
        const int64_t left = ncols - c0;
        const int nv = left >= 64 ? 4 : (int)((left + 15) / 16);
        const int last = (int)(left >= 64 ? 16 : left - 16 * (nv - 1));
        const __mmask16 tail = (__mmask16)(last == 16 ? 0xFFFF : (1u << last) - 1);
        for (int64_t j0 = 0; j0 < nj; j0 += 6) {
            const int64_t i_begin = j0 + causal_off > 0 ? j0 + causal_off : 0;
            if (i_begin >= ni) break;
            const float *pj = p + i_begin * ldp + j0, *xc = x + i_begin * ldx + c0;
            const int64_t ni_g = ni - i_begin;
            float *oc = o + j0 * ldo + c0;
            switch (nj - j0 >= 6 ? 6 : (int)(nj - j0)) {
                TN512_CASE(1)
                TN512_CASE(2)
                TN512_CASE(3)
                TN512_CASE(4)
                TN512_CASE(5)
                default: TN512_CASE(6)
            }
        }
    }
}

/* P row (AVX-512): s[0:nk) = exp(s + mask - lse) on attendable keys (< nvalid, not blocked),
 * 0 elsewhere; s holds round_up(nk, 16) floats, 64-byte aligned. */
QF_TARGET_AVX512 static void prob_row512(float *s, int64_t nk, int64_t nvalid, const qf_sdpa_problem *pr,
                                         const void *mrow, float lse) {
    const __m512 l = _mm512_set1_ps(lse);
    const qf_sdpa_maskrow mk = {pr->mask_kind, mrow, pr->ms_j};
    __m512 fadd;
    const int per_key = qf_sdpa_row_mask512(&mk, &nvalid, &fadd);
    for (int64_t jv = 0; jv < nk; jv += 16) {
        __m512 x = _mm512_load_ps(s + jv);
        const __mmask16 k = qf_sdpa_mask_lanes512(&mk, per_key, fadd, nvalid, jv, &x);
        _mm512_store_ps(s + jv, _mm512_maskz_mov_ps(k, qf_sdpa_exp512(_mm512_sub_ps(x, l))));
    }
}

/* dS row: dp = scale * (zp * dp - p * di) for keys < nvalid, 0 elsewhere (zp = Z P). */
QF_TARGET_AVX512 static void ds_row512(float *dp, const float *p, const float *zp, int64_t nk, int64_t nvalid,
                                       float di, float scale) {
    const __m512 d = _mm512_set1_ps(di), sc = _mm512_set1_ps(scale);
    for (int64_t jv = 0; jv < nk; jv += 16) {
        const int64_t left = nvalid - jv;
        const __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        __m512 ds = _mm512_fmsub_ps(_mm512_load_ps(zp + jv), _mm512_load_ps(dp + jv), _mm512_mul_ps(_mm512_load_ps(p + jv), d));
        _mm512_store_ps(dp + jv, _mm512_maskz_mul_ps(k, ds, sc));
    }
}

QF_TARGET_AVX512 static void dropout_row512(float *p, int64_t n, const qf_sdpa_problem *pr, uint64_t idx0) {
    qf_sdpa_dropout512(p, n, pr->seed, pr->offset, idx0, pr->dropout_p);
}

/* dot of two rows of n floats */
QF_TARGET_AVX512 static float dot512(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    if (d < n) {
        __mmask16 m = (__mmask16)((1u << (n - d)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* ------------------------------------- AVX2 pieces ------------------------------------- */

/* AVX2 twin of tn_tile512: R rows (<= 6) x NV*8 columns (NV <= 2). */
QF_TARGET_AVX2 static QF_SDPA_ALWAYS_INLINE void tn_tile256(const float *p, int64_t ldp, int64_t ni,
                                                           const float *x, int64_t ldx, float *o, int64_t ldo,
                                                           __m256i tail, const int R, const int NV) {
    const __m256i full = _mm256_set1_epi32(-1);
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        if (r >= R) break;
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            if (c < NV) acc[r][c] = _mm256_maskload_ps(o + r * ldo + 8 * c, c == NV - 1 ? tail : full);
    }
    for (int64_t i = 0; i < ni; i++) {
        const float *xi = x + i * ldx, *pi = p + i * ldp;
        __m256 b[2];
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            if (c < NV) b[c] = _mm256_maskload_ps(xi + 8 * c, c == NV - 1 ? tail : full);
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            if (r >= R) break;
            __m256 a = _mm256_broadcast_ss(pi + r);
#pragma GCC unroll 2
            for (int c = 0; c < 2; c++)
                if (c < NV) acc[r][c] = _mm256_fmadd_ps(a, b[c], acc[r][c]);
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

#define TN256_CASE(R)                                                                           \
    case R:                                                                                     \
        if (nv == 1) tn_tile256(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 1);                   \
        else tn_tile256(pj, ldp, ni_g, xc, ldx, oc, ldo, tail, R, 2);                           \
        break;

/* AVX2 twin of tn512. */
QF_TARGET_AVX2 static void tn256(const float *p, int64_t ldp, int64_t ni, int64_t nj, const float *x,
                                 int64_t ldx, int64_t ncols, float *o, int64_t ldo, int64_t causal_off) {
    for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
        const int64_t left = ncols - c0;
        const int nv = left > 8 ? 2 : 1;
        const __m256i tail = qf_sdpa_lanes256((int)(left >= 16 ? 8 : left - 8 * (nv - 1)));
        for (int64_t j0 = 0; j0 < nj; j0 += 6) {
            const int64_t i_begin = j0 + causal_off > 0 ? j0 + causal_off : 0;
            if (i_begin >= ni) break;
            const float *pj = p + i_begin * ldp + j0, *xc = x + i_begin * ldx + c0;
            const int64_t ni_g = ni - i_begin;
            float *oc = o + j0 * ldo + c0;
            switch (nj - j0 >= 6 ? 6 : (int)(nj - j0)) {
                TN256_CASE(1)
                TN256_CASE(2)
                TN256_CASE(3)
                TN256_CASE(4)
                TN256_CASE(5)
                default: TN256_CASE(6)
            }
        }
    }
}

/* AVX2 twin of prob_row512 (s 32-byte aligned, round_up(nk, 8) floats). */
QF_TARGET_AVX2 static void prob_row256(float *s, int64_t nk, int64_t nvalid, const qf_sdpa_problem *pr,
                                       const void *mrow, float lse) {
    const __m256 l = _mm256_set1_ps(lse);
    const qf_sdpa_maskrow mk = {pr->mask_kind, mrow, pr->ms_j};
    __m256 fadd;
    const int per_key = qf_sdpa_row_mask256(&mk, &nvalid, &fadd);
    for (int64_t jv = 0; jv < nk; jv += 8) {
        __m256 x = _mm256_load_ps(s + jv);
        const __m256i lanes = qf_sdpa_mask_lanes256(&mk, per_key, fadd, nvalid, jv, &x);
        /* lanes off the row may hold anything (even NaN): the and clears them */
        _mm256_store_ps(s + jv, _mm256_and_ps(_mm256_castsi256_ps(lanes), qf_sdpa_exp256(_mm256_sub_ps(x, l))));
    }
}

QF_TARGET_AVX2 static void ds_row256(float *dp, const float *p, const float *zp, int64_t nk, int64_t nvalid,
                                     float di, float scale) {
    const __m256 d = _mm256_set1_ps(di), sc = _mm256_set1_ps(scale);
    for (int64_t jv = 0; jv < nk; jv += 8) {
        const int64_t left = nvalid - jv;
        const __m256 lanes = _mm256_castsi256_ps(qf_sdpa_lanes256(left >= 8 ? 8 : left <= 0 ? 0 : (int)left));
        __m256 ds = _mm256_fmsub_ps(_mm256_load_ps(zp + jv), _mm256_load_ps(dp + jv), _mm256_mul_ps(_mm256_load_ps(p + jv), d));
        _mm256_store_ps(dp + jv, _mm256_and_ps(lanes, _mm256_mul_ps(ds, sc)));
    }
}

/* Zeroes the dropped entries of p[0:n) (element j has Philox index idx0 + j), one Philox call
 * per four consecutive keys; the same decision as qf_philox_uniform(...) >= p. */
static void dropout_row_c(float *p, int64_t n, const qf_sdpa_problem *pr, uint64_t idx0) {
    uint32_t w[4];
    uint64_t have = UINT64_MAX;
    for (int64_t j = 0; j < n; j++) {
        if (p[j] == 0.0f) continue;
        const uint64_t idx = idx0 + (uint64_t)j;
        if (idx >> 2 != have) { have = idx >> 2; qf_philox4x32(pr->seed, pr->offset, have, w); }
        if ((float)(w[idx & 3] >> 8) * (1.0f / 16777216.0f) < pr->dropout_p) p[j] = 0.0f;
    }
}

QF_TARGET_AVX2 static float dot256(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float t[8];
    _mm256_storeu_ps(t, acc);
    float sum = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for (; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* ------------------------------------- tiled driver ------------------------------------- */

typedef struct {
    void (*pack)(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D);
    void (*scores)(const float *a, int64_t lda, int64_t nrows, const float *kt, int64_t nk,
                   int64_t D, float scale, float *c, int64_t ldc);
    void (*pv)(const float *p, int64_t ldp, int64_t nrows, int64_t nk, const float *v, int64_t ldv,
               int64_t Dv, const float *alpha, float *o, int64_t ldo);
    void (*tn)(const float *p, int64_t ldp, int64_t ni, int64_t nj, const float *x, int64_t ldx,
               int64_t ncols, float *o, int64_t ldo, int64_t causal_off);
    void (*prob_row)(float *s, int64_t nk, int64_t nvalid, const qf_sdpa_problem *pr, const void *mrow, float lse);
    void (*ds_row)(float *dp, const float *p, const float *zp, int64_t nk, int64_t nvalid, float di, float scale);
    void (*dropout_row)(float *p, int64_t n, const qf_sdpa_problem *pr, uint64_t idx0);
    float (*dot)(const float *a, const float *b, int64_t n);
    /* pack that also screens for NaN/Inf, and a plain screen; NULL where the ISA has none */
    int (*pack_screen)(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D);
    int (*any_nonfinite)(const float *x, int64_t n);
} bwd_isa;

static const bwd_isa isa512 = {qf_sdpa_pack_kt512, qf_sdpa_scores512, qf_sdpa_pv512, tn512,
                               prob_row512, ds_row512, dropout_row512, dot512,
                               qf_sdpa_pack_kt512_screen, qf_sdpa_any_nonfinite512};
static const bwd_isa isa256 = {qf_sdpa_pack_kt256, qf_sdpa_scores256, qf_sdpa_pv256, tn256,
                               prob_row256, ds_row256, dropout_row_c, dot256, NULL, NULL};

typedef struct {
    const qf_sdpa_problem *pr;
    const bwd_isa *isa;
    const float *q, *k, *v, *grad_out;
    const float *lse2, *Di; /* per query row: lse (+inf when dead), dO . out */
    float *dq, *dk, *dv, *dq_part;
    int64_t nkb, nsplit;
    float keep_scale;
} bwd_plan;

/* One (query block, key block) tile of head (b,h): accumulates into dk/dv (rows of the key
 * block, dkb/dvb) and dq rows dqb. kt/vt: packed panels of the key block; sp, dp, pd: tiles of
 * BWD_BR x BWD_BC floats. */
static void bwd_tile(const bwd_plan *pl, int64_t b, int64_t h, int64_t i0, int64_t nr, int64_t j0, int64_t nk,
                     const float *kt, const float *vt, float *dkb, float *dvb, float *dqb, float *sp,
                     float *dp, float *pd) {
    const qf_sdpa_problem *pr = pl->pr;
    const bwd_isa *isa = pl->isa;
    const int64_t D = pr->D, Dv = pr->Dv, L = pr->L, S = pr->S;
    const int64_t row0 = (b * pr->Hq + h) * L + i0;
    const int64_t kvp = b * pr->Hkv + h / pr->group;
    const float *qb = pl->q + row0 * D, *gb = pl->grad_out + row0 * Dv;
    const float *kb = pl->k + (kvp * S + j0) * D;
    /* A causal tile crossing the diagonal: row group r0.. (6 rows, the register tile height)
     * needs keys below i0 + r0 + 6 - j0 only; key j gets rows i >= j only. Lanes a group does
     * not compute are never read unmasked: prob_row and ds_row zero every key >= nvalid. */
    const int diag = pr->is_causal && j0 + nk - 1 > i0;
    const int64_t G = diag ? 6 : nr;
    int64_t nkg[BWD_BR / 6 + 1];
    for (int64_t r0 = 0, g = 0; r0 < nr; r0 += G, g++) {
        const int64_t rr = nr - r0 < G ? nr - r0 : G;
        nkg[g] = diag && i0 + r0 + rr - j0 < nk ? i0 + r0 + rr - j0 : nk;
        if (nkg[g] < 0) nkg[g] = 0;
    }
    /* S = scale Q K^T, then P = exp(S + mask - lse') in place */
    for (int64_t r0 = 0, g = 0; r0 < nr; r0 += G, g++)
        if (nkg[g] > 0) isa->scores(qb + r0 * D, D, nr - r0 < G ? nr - r0 : G, kt, nkg[g], D, pr->scale, sp + r0 * BWD_BC, BWD_BC);
    for (int64_t r = 0; r < nr; r++) {
        const int64_t i = i0 + r;
        const int64_t nvalid = pr->is_causal ? (i - j0 + 1 < nk ? i - j0 + 1 : nk) : nk;
        const void *mrow = NULL;
        if (pr->mask_kind != QF_MASK_NONE) {
            int64_t e = b * pr->ms_b + h * pr->ms_h + i * pr->ms_i + j0 * pr->ms_j;
            mrow = pr->mask_kind == QF_MASK_BOOL ? (const void *)((const uint8_t *)pr->mask + e)
                                                 : (const void *)((const float *)pr->mask + e);
        }
        isa->prob_row(sp + r * BWD_BC, nk, nvalid, pr, mrow, pl->lse2[row0 + r]);
    }
    /* dP = dO V^T */
    for (int64_t r0 = 0, g = 0; r0 < nr; r0 += G, g++)
        if (nkg[g] > 0) isa->scores(gb + r0 * Dv, Dv, nr - r0 < G ? nr - r0 : G, vt, nkg[g], Dv, 1.0f, dp + r0 * BWD_BC, BWD_BC);
    const float *zp = sp; /* the probabilities dV sees: Z P */
    if (pr->dropout_p > 0) {
        for (int64_t r = 0; r < nr; r++) {
            float *drow = pd + r * BWD_BC;
            const float *srow = sp + r * BWD_BC;
            for (int64_t j = 0; j < nk; j++) drow[j] = srow[j] * pl->keep_scale;
            isa->dropout_row(drow, nk, pr, (uint64_t)((row0 + r) * S + j0));
        }
        zp = pd;
    }
    /* dV += (Z P)^T dO */
    isa->tn(zp, BWD_BC, nr, nk, gb, Dv, Dv, dvb, Dv, diag ? j0 - i0 : NO_TRIM);
    /* dS = scale * (Z P dP - P D) in place of dP */
    for (int64_t r = 0; r < nr; r++) {
        const int64_t nvalid = pr->is_causal ? (i0 + r - j0 + 1 < nk ? i0 + r - j0 + 1 : nk) : nk;
        isa->ds_row(dp + r * BWD_BC, sp + r * BWD_BC, zp + r * BWD_BC, nk, nvalid, pl->Di[row0 + r], pr->scale);
    }
    /* dK += dS^T Q, dQ += dS K */
    isa->tn(dp, BWD_BC, nr, nk, qb, D, D, dkb, D, diag ? j0 - i0 : NO_TRIM);
    for (int64_t r0 = 0, g = 0; r0 < nr; r0 += G, g++)
        if (nkg[g] > 0) isa->pv(dp + r0 * BWD_BC, BWD_BC, nr - r0 < G ? nr - r0 : G, nkg[g], kb, D, D, NULL, dqb + r0 * D, D);
}

/* Fraction of thread time used when `items` equal items run on nt threads. */
static double fill(int64_t items, int nt) {
    int64_t rounds = (items + nt - 1) / nt;
    return (double)items / (double)(rounds * nt);
}

static qf_status backward_tiled(const qf_sdpa_problem *pr, const bwd_isa *isa, const float *q, const float *k,
                                const float *v, const float *out, const float *lse,
                                const float *grad_out, float *dq, float *dk, float *dv) {
    const int64_t B = pr->B, Hq = pr->Hq, Hkv = pr->Hkv, L = pr->L, S = pr->S, D = pr->D, Dv = pr->Dv;
    const int64_t group = pr->group, rows = B * Hq * L, npairs = B * Hkv;
    const int nt = qf_threads();
    bwd_plan pl = {pr, isa, q, k, v, grad_out, NULL, NULL, dq, dk, dv, NULL, (S + BWD_BC - 1) / BWD_BC, 1,
                   pr->dropout_p > 0 ? 1.0f / (1.0f - pr->dropout_p) : 1.0f};
    /* key splits only while threads would idle and the dq partials stay small */
    const size_t dq_bytes = (size_t)rows * (size_t)D * sizeof(float);
    /* KB key blocks form a super-block: a query block's Q, dO and dq rows are read once for
     * KB tiles, while the packed K/V panels and the dk/dv rows of the super-block (about
     * QF_SDPA_BWD_SUPER_BYTES) stay in L2. */
    int64_t KB = (int64_t)(QF_SDPA_BWD_SUPER_BYTES / ((size_t)(D + Dv) * BWD_BC * 2 * sizeof(float)));
    if (KB < 1) KB = 1;
    if (KB > 4) KB = 4;
    const int64_t nsb = (pl.nkb + KB - 1) / KB;
    while (pl.nsplit < nsb && fill(npairs * pl.nsplit, nt) < 0.85 &&
           (size_t)pl.nsplit * dq_bytes <= QF_SDPA_BWD_PARTIAL_BYTES)
        pl.nsplit++;
    /* Few, long items (1 x 16 heads of 2048 keys on 16 threads: one item a thread) leave every
     * thread's slowest moment on the critical path; a few items per thread let dynamic
     * scheduling absorb it, while the extra dq partials stay small. */
    while (pl.nsplit < nsb && npairs * pl.nsplit < QF_SDPA_BWD_ITEMS_PER_THREAD * (int64_t)nt &&
           (size_t)pl.nsplit * dq_bytes <= QF_SDPA_BWD_BALANCE_BYTES)
        pl.nsplit++;
    const size_t vec_bytes = qf_align_up((size_t)rows * sizeof(float), 64);
    const size_t part_bytes = qf_align_up((size_t)(pl.nsplit - 1) * dq_bytes, 64);
    const size_t kt_f = (size_t)(BWD_BC * D), vt_f = (size_t)(BWD_BC * Dv), tile_f = (size_t)(BWD_BR * BWD_BC);
    const size_t slice_bytes = ((kt_f + vt_f) * (size_t)KB + 3 * tile_f) * sizeof(float);
    void *scr;
    QF_TRY(qf_scratch(2 * vec_bytes + part_bytes + slice_bytes * (size_t)nt, &scr));
    float *lse2 = (float *)scr, *Di = (float *)((char *)scr + vec_bytes);
    pl.lse2 = lse2;
    pl.Di = Di;
    pl.dq_part = (float *)((char *)scr + 2 * vec_bytes);
    char *slices = (char *)scr + 2 * vec_bytes + part_bytes;

    /* NaN/Inf screen (pr->screen, see sdpa_internal.h) folded into the passes that read the
     * inputs: q and grad_out rows in pass 1, K and V while pass 2 packs them. */
    const int fuse = pr->screen && isa->pack_screen;
    int bad = 0;
    /* pass 1: per-row statistics, dq (and partials) zeroed */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (fuse && (isa->any_nonfinite(grad_out + r * Dv, Dv) | isa->any_nonfinite(q + r * D, D))) {
            #pragma omp atomic write
            bad = 1;
        }
        lse2[r] = lse[r] == -INFINITY ? INFINITY : lse[r];
        Di[r] = lse[r] == -INFINITY ? 0.0f : isa->dot(grad_out + r * Dv, out + r * Dv, Dv);
        memset(dq + r * D, 0, (size_t)D * sizeof(float));
        for (int64_t s = 1; s < pl.nsplit; s++) memset(pl.dq_part + ((s - 1) * rows + r) * D, 0, (size_t)D * sizeof(float));
    }
    /* pass 2: (pair, split) items */
    const int64_t items = npairs * pl.nsplit;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        float *kt = (float *)(slices + slice_bytes * (size_t)omp_get_thread_num());
        float *vt = kt + kt_f * (size_t)KB, *sp = vt + vt_f * (size_t)KB, *dp = sp + tile_f, *pd = dp + tile_f;
        /* split-major: split 0 holds the first super-block, the largest under causal */
        const int64_t pair = it % npairs, split = it / npairs, b = pair / Hkv, g = pair % Hkv;
        float *dqt = split == 0 ? dq : pl.dq_part + (split - 1) * rows * D;
        for (int64_t sb = split; sb < nsb; sb += pl.nsplit) {
            const int64_t jb_begin = sb * KB, jb_end = jb_begin + KB < pl.nkb ? jb_begin + KB : pl.nkb;
            for (int64_t jb = jb_begin; jb < jb_end; jb++) {
                const int64_t j0 = jb * BWD_BC, nk = S - j0 < BWD_BC ? S - j0 : BWD_BC;
                memset(dk + (pair * S + j0) * D, 0, (size_t)(nk * D) * sizeof(float));
                memset(dv + (pair * S + j0) * Dv, 0, (size_t)(nk * Dv) * sizeof(float));
            }
            /* causal: rows i < j0 see none of these keys */
            const int64_t qb0 = pr->is_causal ? jb_begin * BWD_BC / BWD_BR : 0;
            if (qb0 * BWD_BR >= L) {
                if (fuse) /* keys no row sees still go through the screen */
                    for (int64_t jb = jb_begin; jb < jb_end; jb++) {
                        const int64_t j0 = jb * BWD_BC, nk = S - j0 < BWD_BC ? S - j0 : BWD_BC;
                        if (isa->any_nonfinite(k + (pair * S + j0) * D, nk * D) |
                            isa->any_nonfinite(v + (pair * S + j0) * Dv, nk * Dv)) {
                            #pragma omp atomic write
                            bad = 1;
                        }
                    }
                continue;
            }
            for (int64_t jb = jb_begin; jb < jb_end; jb++) {
                const int64_t j0 = jb * BWD_BC, nk = S - j0 < BWD_BC ? S - j0 : BWD_BC;
                if (fuse) {
                    if (isa->pack_screen(kt + (jb - jb_begin) * kt_f, k + (pair * S + j0) * D, D, nk, D) |
                        isa->pack_screen(vt + (jb - jb_begin) * vt_f, v + (pair * S + j0) * Dv, Dv, nk, Dv)) {
                        #pragma omp atomic write
                        bad = 1;
                    }
                    continue;
                }
                isa->pack(kt + (jb - jb_begin) * kt_f, k + (pair * S + j0) * D, D, nk, D);
                isa->pack(vt + (jb - jb_begin) * vt_f, v + (pair * S + j0) * Dv, Dv, nk, Dv);
            }
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t i0 = qb0 * BWD_BR; i0 < L; i0 += BWD_BR) {
                    const int64_t nr = L - i0 < BWD_BR ? L - i0 : BWD_BR;
                    float *dqb = dqt + ((b * Hq + h) * L + i0) * D;
                    for (int64_t jb = jb_begin; jb < jb_end; jb++) {
                        const int64_t j0 = jb * BWD_BC, nk = S - j0 < BWD_BC ? S - j0 : BWD_BC;
                        if (pr->is_causal && i0 + nr - 1 < j0) break; /* this and later blocks: all masked */
                        bwd_tile(&pl, b, h, i0, nr, j0, nk, kt + (jb - jb_begin) * kt_f, vt + (jb - jb_begin) * vt_f,
                                 dk + (pair * S + j0) * D, dv + (pair * S + j0) * Dv, dqb, sp, dp, pd);
                    }
                }
        }
    }
    /* pass 3: add the key splits' dq partials */
    if (pl.nsplit > 1) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t s = 1; s < pl.nsplit; s++) {
                const float *src = pl.dq_part + ((s - 1) * rows + r) * D;
                float *dst = dq + r * D;
                for (int64_t d = 0; d < D; d++) dst[d] += src[d];
            }
    }
    if (fuse) *pr->screen = bad ? QF_SDPA_NONFINITE : QF_SDPA_FINITE;
    return QF_OK;
}

qf_status qf_cpu_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *grad_out, float *dq, float *dk, float *dv) {
    if (pr->strided) return qf_fail(QF_ERR_INTERNAL, "sdpa_backward (cpu): strided tensors are forward-only");
    switch (qf_get_isa()) {
    case QF_ISA_AVX512: return backward_tiled(pr, &isa512, q, k, v, out, lse, grad_out, dq, dk, dv);
    case QF_ISA_AVX2: return backward_tiled(pr, &isa256, q, k, v, out, lse, grad_out, dq, dk, dv);
    default: return backward_scalar(pr, q, k, v, out, lse, grad_out, dq, dk, dv);
    }
}
