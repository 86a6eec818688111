/* sdpa_forward.c - CPU forward of scaled dot-product attention (float32): fused, tiled,
 * online softmax (the FlashAttention recurrence), parallel over (batch, head, query block).
 *
 * For each query block of Br rows and each key block of Bc keys, one thread computes the score
 * tile S = scale * Q_blk K_blk^T (+ mask) in its scratch slice, updates the running row max m,
 * row sum l and the output accumulator O (rescaled by exp(m_old - m_new) as the max moves), and
 * after the last key block writes out = O / l (times 1/(1-p) under dropout) and lse = m + log l.
 * Only one Br x Bc tile per thread ever exists; the L x S matrix is materialised only when the
 * caller asks for the weights (a second pass recomputes the tiles and writes exp(s - lse)).
 *
 * Invariants and choices:
 *   - K of every (batch, kv head) pair is packed once per call into panels of W transposed keys
 *     (sdpa_simd.h). With at least 4 pairs per thread a task is a whole pair: it packs K into
 *     its own buffer (still in cache for its query blocks) and runs every query block of every
 *     head of the group. Otherwise all threads pack a chunk of pairs (under KT_CHUNK_BYTES)
 *     and then share its (pair, head, query block, key split) units, largest causal ones
 *     first. Query heads h of a group share the pair h / group (GQA).
 *   - NaN/Inf screen asked (pr->screen, see sdpa_internal.h): in the whole-pair mode with
 *     AVX-512 it is folded into the pair's packing of K plus a pass over its V and Q rows just
 *     before use (the separate screen pass cost ~25% of the cross-attention shape at 2 threads);
 *     elsewhere the caller screens after the kernel.
 *   - Key block Bc: 256 / 128 / 64 keys for D <= 64 / 128 / larger, widened to cover all keys
 *     when S is at most 1.25 Bc (S = 257: one block, not a 1-key tail block).
 *   - Few query rows per key (L * group <= 4, decoding; AVX-512): no packing, the scores are
 *     dot products straight from K, since packing would cost more than the scores.
 *   - Causal: a key block entirely right of the diagonal of the query block is never visited
 *     (the key loop stops at the block's last row + 1); on the diagonal block each group of 6
 *     rows computes only keys up to its last row, and rows see keys < i + 1 through `nvalid`.
 *   - Dropout masks P after the row sum was taken (l is the undropped normaliser); element
 *     (b,h,i,j) uses Philox index ((b*Hq+h)*L+i)*S+j, so any tiling draws the same mask (the
 *     AVX-512 generator is bit-exact with qf_philox_uniform).
 *   - Few query blocks but many keys (decoding: L = 1): the key range of each block is split
 *     across threads and the partial (m, l, O) are merged with log-sum-exp weights.
 *   - A row with no attendable key keeps m = -inf, l = 0: out = 0, lse = -inf, weights = 0.
 *   - The scalar path is a plain per-row loop (the reference the SIMD paths are tested beside);
 *     AVX2 and AVX-512 share the driver below and differ only in the kernels. */
#include "sdpa_internal.h"
#include "sdpa_simd.h"
#include <math.h>
#include <omp.h>
#include <string.h>

#define KT_CHUNK_BYTES ((size_t)128 << 20)
#define QF_SDPA_BR 48 /* query rows per block */
#define QF_SDPA_PREFETCH_BYTES ((size_t)1 << 20) /* largest next pair streamed in by prefetch */

typedef struct {
    int W; /* key panel width of the packed K */
    void (*pack)(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D);
    void (*scores)(const float *a, int64_t lda, int64_t nrows, const float *kt, int64_t nk,
                   int64_t D, float scale, float *c, int64_t ldc);
    /* scores from unpacked K (row stride ldk); NULL where the ISA has none */
    void (*scores_dot)(const float *a, int64_t lda, int64_t nrows, const float *k, int64_t ldk,
                       int64_t nk, int64_t D, float scale, float *c, int64_t ldc);
    void (*softmax_row)(float *s, int64_t nk, int64_t nvalid, const qf_sdpa_maskrow *mk,
                        float *m, float *l, float *alpha);
    void (*softmax_block)(float *tile, int64_t ldt, int64_t nrows, const int64_t *nk,
                          const int64_t *nvalid, const qf_sdpa_maskrow *mk, float *m, float *l,
                          float *alpha);
    void (*pv)(const float *p, int64_t ldp, int64_t nrows, int64_t nk, const float *v, int64_t ldv,
               int64_t Dv, const float *alpha, float *o, int64_t ldo);
    /* pack that also screens for NaN/Inf, and a plain screen; NULL where the ISA has none */
    int (*pack_screen)(float *kt, const float *k, int64_t ldk, int64_t S, int64_t D);
    int (*any_nonfinite)(const float *x, int64_t n);
} fwd_isa;

static const fwd_isa isa512 = {QF_SDPA_W512, qf_sdpa_pack_kt512, qf_sdpa_scores512, qf_sdpa_scores_dot512, qf_sdpa_softmax_row512, qf_sdpa_softmax_block512, qf_sdpa_pv512, qf_sdpa_pack_kt512_screen, qf_sdpa_any_nonfinite512};
static const fwd_isa isa256 = {QF_SDPA_W256, qf_sdpa_pack_kt256, qf_sdpa_scores256, NULL, qf_sdpa_softmax_row256, qf_sdpa_softmax_block256, qf_sdpa_pv256, NULL, NULL};

/* ---------------------------------- scalar path ---------------------------------- */

static qf_status forward_scalar(const qf_sdpa_problem *pr, const float *q, const float *k,
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

/* ---------------------------------- tiled driver ---------------------------------- */

typedef struct {
    const qf_sdpa_problem *pr;
    const fwd_isa *isa;
    const float *q, *k, *v;
    int64_t Br, Bc, nqb, ldo, npanel, pair_floats;
    float keep_scale;
    int nopack; /* few query rows per key: scores straight from K, no packed copy */
} fwd_plan;

/* Score tile of nrows query rows (from a) against keys [j0, j0+nk) of one pair, whose K is
 * kbase: the packed panels, or K itself when nopack. */
static void block_scores(const fwd_plan *pl, const float *a, int64_t nrows, const float *kbase,
                         int64_t j0, int64_t nk, float *c, int64_t ldc) {
    const int64_t D = pl->pr->D;
    if (pl->nopack) pl->isa->scores_dot(a, D, nrows, kbase + j0 * D, D, nk, D, pl->pr->scale, c, ldc);
    else pl->isa->scores(a, D, nrows, kbase + j0 * D, nk, D, pl->pr->scale, c, ldc);
}

static void mask_row(const qf_sdpa_problem *pr, int64_t b, int64_t h, int64_t i, int64_t j0,
                     qf_sdpa_maskrow *mk) {
    mk->kind = pr->mask_kind;
    mk->sj = pr->ms_j;
    mk->row = NULL;
    if (pr->mask_kind == QF_MASK_NONE) return;
    int64_t e = b * pr->ms_b + h * pr->ms_h + i * pr->ms_i + j0 * pr->ms_j;
    mk->row = pr->mask_kind == QF_MASK_BOOL ? (const void *)((const uint8_t *)pr->mask + e)
                                            : (const void *)((const float *)pr->mask + e);
}

/* Zeroes the dropped entries of p[0:n) (element j has Philox index idx0 + j). Philox yields
 * four words per counter, so one call serves four consecutive keys. */
static void dropout_row(float *p, int64_t n, const qf_sdpa_problem *pr, uint64_t idx0) {
    if (qf_get_isa() == QF_ISA_AVX512) {
        qf_sdpa_dropout512(p, n, pr->seed, pr->offset, idx0, pr->dropout_p);
        return;
    }
    uint32_t w[4];
    uint64_t have = UINT64_MAX;
    for (int64_t j = 0; j < n; j++) {
        if (p[j] == 0.0f) continue;
        uint64_t idx = idx0 + (uint64_t)j;
        if (idx >> 2 != have) { have = idx >> 2; qf_philox4x32(pr->seed, pr->offset, have, w); }
        float u = (float)(w[idx & 3] >> 8) * (1.0f / 16777216.0f); /* = qf_philox_uniform */
        if (u < pr->dropout_p) p[j] = 0.0f;
    }
}

/* Online softmax of query rows [i0, i0+nr) of head (b,h) over keys [j_begin, j_end) (j_begin a
 * multiple of Bc): leaves the unnormalised O (nr x ldo), the row max m and row sum l. */
static void attend_rows(const fwd_plan *pl, const float *kt_pair, int64_t b, int64_t h, int64_t i0,
                        int64_t nr, int64_t j_begin, int64_t j_end, float *tile, float *o, float *m,
                        float *l, float *alpha) {
    const qf_sdpa_problem *pr = pl->pr;
    const int64_t D = pr->D, Dv = pr->Dv, S = pr->S, Bc = pl->Bc;
    const int64_t hk = h / pr->group;
    const float *qb = pl->q + ((b * pr->Hq + h) * pr->L + i0) * D;
    const float *vb = pl->v + (b * pr->Hkv + hk) * S * Dv;
    for (int64_t r = 0; r < nr; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(o, 0, (size_t)(nr * pl->ldo) * sizeof(float));
    int64_t nkr[QF_SDPA_BR], nvalid[QF_SDPA_BR];
    qf_sdpa_maskrow mk[QF_SDPA_BR];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += Bc) {
        const int64_t nk = j_end - j0 < Bc ? j_end - j0 : Bc;
        /* On a causal diagonal block, row group g only needs keys j <= its last row: groups of
         * 6 rows (the register tile height) each get their own key count, so the masked
         * triangle is (almost) never computed. Elsewhere the whole block is one group. */
        const int diag = pr->is_causal && j0 + nk > i0 + 1;
        const int64_t G = diag ? 6 : nr;
        for (int64_t r0 = 0; r0 < nr; r0 += G) {
            const int64_t rr = nr - r0 < G ? nr - r0 : G;
            int64_t nkg = nk;
            if (diag && i0 + r0 + rr - j0 < nkg) nkg = i0 + r0 + rr - j0;
            if (nkg < 0) nkg = 0;  /* these rows see no key of the block: state unchanged */
            if (nkg > 0) block_scores(pl, qb + r0 * D, rr, kt_pair, j0, nkg, tile + r0 * Bc, Bc);
            for (int64_t r = r0; r < r0 + rr; r++) {
                nkr[r] = nkg;
                nvalid[r] = pr->is_causal ? i0 + r + 1 - j0 : nkg;
                mask_row(pr, b, h, i0 + r, j0, &mk[r]);
            }
        }
        pl->isa->softmax_block(tile, Bc, nr, nkr, nvalid, mk, m, l, alpha);
        if (pr->dropout_p > 0)
            for (int64_t r = 0; r < nr; r++)
                dropout_row(tile + r * Bc, nkr[r], pr, (uint64_t)(((b * pr->Hq + h) * pr->L + i0 + r) * S + j0));
        for (int64_t r0 = 0; r0 < nr; r0 += G) {
            const int64_t rr = nr - r0 < G ? nr - r0 : G;
            if (nkr[r0] > 0)
                pl->isa->pv(tile + r0 * Bc, Bc, rr, nkr[r0], vb + j0 * Dv, Dv, Dv, alpha + r0, o + r0 * pl->ldo, pl->ldo);
        }
    }
}

/* out = O * keep / l, lse = m + log l; rows that saw no key get zeros and -inf. */
static void finish_rows(const fwd_plan *pl, int64_t row0, int64_t nr, const float *o, const float *m,
                        const float *l, float *out, float *lse) {
    const int64_t Dv = pl->pr->Dv;
    for (int64_t r = 0; r < nr; r++) {
        float *dst = out + (row0 + r) * Dv;
        if (m[r] == -INFINITY) {
            memset(dst, 0, (size_t)Dv * sizeof(float));
            if (lse) lse[row0 + r] = -INFINITY;
            continue;
        }
        const float inv = pl->keep_scale / l[r];
        const float *src = o + r * pl->ldo;
        for (int64_t d = 0; d < Dv; d++) dst[d] = src[d] * inv;
        if (lse) lse[row0 + r] = m[r] + logf(l[r]);
    }
}

/* weights rows [i0, i0+nr) of head (b,h): exp(s - lse), dropped and scaled; lse is final. */
static void weight_rows(const fwd_plan *pl, const float *kt_pair, int64_t b, int64_t h, int64_t i0,
                        int64_t nr, const float *lse, float *tile, float *weights) {
    const qf_sdpa_problem *pr = pl->pr;
    const int64_t D = pr->D, S = pr->S, Bc = pl->Bc;
    const int64_t row0 = (b * pr->Hq + h) * pr->L + i0;
    const float *qb = pl->q + row0 * D;
    for (int64_t j0 = 0; j0 < S; j0 += Bc) {
        const int64_t nk = S - j0 < Bc ? S - j0 : Bc;
        if (pr->is_causal && j0 > i0 + nr - 1) {
            for (int64_t r = 0; r < nr; r++) memset(weights + (row0 + r) * S + j0, 0, (size_t)nk * sizeof(float));
            continue;
        }
        block_scores(pl, qb, nr, kt_pair, j0, nk, tile, Bc);
        for (int64_t r = 0; r < nr; r++) {
            const int64_t i = i0 + r;
            float *t = tile + r * Bc, *w = weights + (row0 + r) * S + j0;
            qf_sdpa_maskrow mk;
            mask_row(pr, b, h, i, j0, &mk);
            float m = lse[row0 + r], l = 0.0f, alpha;
            pl->isa->softmax_row(t, nk, pr->is_causal ? i + 1 - j0 : nk, &mk, &m, &l, &alpha);
            if (pr->dropout_p > 0) dropout_row(t, nk, pr, (uint64_t)((row0 + r) * S + j0));
            for (int64_t j = 0; j < nk; j++) w[j] = t[j] * pl->keep_scale;
        }
    }
}

/* K of pair `pair` as the score kernels read it: packed slot `slot` of kt, or K itself. */
static const float *pair_k(const fwd_plan *pl, const float *kt, int64_t pair, int64_t slot) {
    return pl->nopack ? pl->k + pair * pl->pr->S * pl->pr->D : kt + slot * pl->pair_floats;
}

static qf_status forward_tiled(const qf_sdpa_problem *pr, const fwd_isa *isa, const float *q,
                               const float *k, const float *v, float *out, float *lse, float *weights) {
    const int64_t B = pr->B, Hq = pr->Hq, Hkv = pr->Hkv, L = pr->L, S = pr->S, D = pr->D, Dv = pr->Dv;
    const int64_t group = pr->group;
    const int nt = qf_threads();
    fwd_plan pl = {.pr = pr, .isa = isa, .q = q, .k = k, .v = v};
    pl.Br = QF_SDPA_BR;
    pl.Bc = D <= 64 ? 256 : D <= 128 ? 128 : 64;
    if (pl.Bc < isa->W) pl.Bc = isa->W;
    /* A few keys past one block (S = 257 with Bc = 256) would cost a whole extra key step (a
     * softmax pass over every row, the O rescale) for those keys: one wider block takes them. */
    if (S > pl.Bc && S <= pl.Bc + pl.Bc / 4) pl.Bc = (S + isa->W - 1) / isa->W * isa->W;
    if (pl.Br > L) pl.Br = L;
    pl.nqb = (L + pl.Br - 1) / pl.Br;
    pl.ldo = (int64_t)qf_align_up((size_t)Dv, 16);
    pl.npanel = (S + isa->W - 1) / isa->W;
    pl.pair_floats = pl.npanel * isa->W * D;
    pl.keep_scale = pr->dropout_p > 0 ? 1.0f / (1.0f - pr->dropout_p) : 1.0f;
    /* Packing K costs about a pass over K; it pays off once several query rows reuse each key. */
    pl.nopack = isa->scores_dot && L * group <= 4;
    if (pl.nopack) pl.pair_floats = 0;

    /* Pairs per chunk of packed K, and the key split for work too coarse for the threads. */
    const int64_t npairs = B * Hkv;
    int64_t chunk = pl.nopack ? npairs : (int64_t)(KT_CHUNK_BYTES / ((size_t)pl.pair_floats * sizeof(float)));
    if (chunk < 1) chunk = 1;
    if (chunk > npairs) chunk = npairs;
    const int64_t nkb = (S + pl.Bc - 1) / pl.Bc;
    int64_t nsplit = 1;
    const int64_t tasks_all = B * Hq * pl.nqb;
    if (!weights && tasks_all < 2 * (int64_t)nt && nkb > 1) {
        nsplit = (2 * (int64_t)nt + tasks_all - 1) / tasks_all;
        if (nsplit > nkb) nsplit = nkb;
    }
    const int64_t kb_per_split = (nkb + nsplit - 1) / nsplit;

    /* Enough (batch, kv head) pairs to keep every thread busy with whole pairs: a task packs
     * its pair's K into the thread's own buffer (still in cache when the query blocks read it)
     * and runs every query block of every head of the group. Pairs are handed out one at a
     * time (a shared counter: dynamic balance), each thread claiming its next pair before it
     * runs the current one; it streams that next pair's K, V and Q into L2 with software
     * prefetches spread over the current pair's tile kernels (sdpa_simd.h), which hides the
     * memory reads that dominated small pairs (Q-Former cross attention: 32 queries over 257
     * keys). Otherwise (few pairs, or a packed pair too big to stay in
     * cache) K is packed in chunks by all threads, then the (pair, head, query block, key
     * split) units run. */
    const size_t pair_bytes = qf_align_up((size_t)pl.pair_floats * sizeof(float), 64);
    const int pair_mode = nsplit == 1 && npairs >= 4 * (int64_t)nt && pair_bytes <= ((size_t)4 << 20);

    /* Scratch: packed K (chunk or per-thread) | per-thread slices | split partials | lse. */
    const size_t kt_bytes = pair_mode ? pair_bytes * (size_t)nt
                                      : qf_align_up((size_t)(chunk * pl.pair_floats) * sizeof(float), 64);
    const size_t tile_f = (size_t)(pl.Br * pl.Bc), o_f = (size_t)(pl.Br * pl.ldo), vec_f = qf_align_up((size_t)pl.Br, 16);
    const size_t slice_bytes = (tile_f + o_f + 3 * vec_f) * sizeof(float);
    const size_t part_row_f = (size_t)pl.ldo + 2;
    const size_t part_bytes = nsplit > 1 ? qf_align_up((size_t)(tasks_all * nsplit * pl.Br) * part_row_f * sizeof(float), 64) : 0;
    const size_t lse_bytes = weights && !lse ? qf_align_up((size_t)(B * Hq * L) * sizeof(float), 64) : 0;
    void *scr;
    QF_TRY(qf_scratch(kt_bytes + slice_bytes * (size_t)nt + part_bytes + lse_bytes, &scr));
    float *kt = (float *)scr;
    char *slices = (char *)scr + kt_bytes;
    float *parts = (float *)(slices + slice_bytes * (size_t)nt);
    float *lse_out = lse ? lse : (float *)((char *)parts + part_bytes);
    if (!weights) lse_out = lse;

    if (pair_mode) {
        /* NaN/Inf screen (pr->screen): K through the packing pass, V and the group's Q rows in
         * a pass just before the pair's attention needs them, so no separate pass over the
         * inputs (their only other read) goes to memory. */
        const int fuse = pr->screen && !pl.nopack && isa->pack_screen;
        int bad = 0;
        /* Only pairs small enough that the next one's inputs sit in L2 beside the current one's
         * packed K (1 MB); bigger pairs stream long enough for the hardware prefetchers. */
        const size_t next_bytes = (size_t)(S * (D + Dv) + group * L * D) * sizeof(float);
        const int prefetch = isa == &isa512 && !pl.nopack && next_bytes <= QF_SDPA_PREFETCH_BYTES;
        int64_t claimed = 0; /* pairs handed out so far */
        #pragma omp parallel num_threads(nt)
        {
        const int tid = omp_get_thread_num();
        int64_t pair, next;
        #pragma omp atomic capture
        pair = claimed++;
        for (; pair < npairs; pair = next) {
            /* claim the next pair before this one runs, so that its inputs can be streamed in */
            #pragma omp atomic capture
            next = claimed++;
            if (prefetch && next < npairs) {
                /* the next pair's K, V and Q rows stream into L2 during this pair's tiles */
                const int64_t nx = next, bx = nx / Hkv;
                const void *at[3] = {k + nx * S * D, v + nx * S * Dv, q + (bx * Hq + (nx % Hkv) * group) * L * D};
                const size_t len[3] = {(size_t)(S * D) * sizeof(float), (size_t)(S * Dv) * sizeof(float),
                                       (size_t)(group * L * D) * sizeof(float)};
                qf_sdpa_pf_set(at, len, 3);
            } else if (prefetch) {
                qf_sdpa_pf_clear();
            }
            float *ktp = (float *)((char *)kt + pair_bytes * (size_t)tid);
            float *tile = (float *)(slices + slice_bytes * (size_t)tid);
            float *o = tile + tile_f, *m = o + o_f, *l = m + vec_f, *alpha = l + vec_f;
            const int64_t b = pair / Hkv;
            if (pl.nopack) ktp = (float *)(k + pair * S * D); /* read only */
            else if (fuse) {
                int hit = isa->pack_screen(ktp, k + pair * S * D, D, S, D);
                hit |= isa->any_nonfinite(v + pair * S * Dv, S * Dv);
                hit |= isa->any_nonfinite(q + (b * Hq + (pair % Hkv) * group) * L * D, group * L * D);
                if (hit) {
                    #pragma omp atomic write
                    bad = 1;
                }
            } else isa->pack(ktp, k + pair * S * D, D, S, D);
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = (pair % Hkv) * group + g;
                for (int64_t qbk = 0; qbk < pl.nqb; qbk++) {
                    const int64_t i0 = qbk * pl.Br, nr = L - i0 < pl.Br ? L - i0 : pl.Br;
                    const int64_t kv_end = pr->is_causal && i0 + nr < S ? i0 + nr : S;
                    attend_rows(&pl, ktp, b, h, i0, nr, 0, kv_end, tile, o, m, l, alpha);
                    finish_rows(&pl, (b * Hq + h) * L + i0, nr, o, m, l, out, lse_out);
                }
                if (weights)
                    for (int64_t qbk = 0; qbk < pl.nqb; qbk++) {
                        const int64_t i0 = qbk * pl.Br, nr = L - i0 < pl.Br ? L - i0 : pl.Br;
                        weight_rows(&pl, ktp, b, h, i0, nr, lse_out, tile, weights);
                    }
            }
        }
        }
        if (fuse) *pr->screen = bad ? QF_SDPA_NONFINITE : QF_SDPA_FINITE;
        return QF_OK;
    }

    for (int64_t p0 = 0; p0 < npairs; p0 += chunk) {
        const int64_t np = npairs - p0 < chunk ? npairs - p0 : chunk;
        /* 1. pack K of the chunk's pairs, one panel per iteration */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t u = 0; u < (pl.nopack ? 0 : np * pl.npanel); u++) {
            const int64_t pp = u / pl.npanel, pan = u % pl.npanel, j0 = pan * isa->W;
            const int64_t nkeys = S - j0 < isa->W ? S - j0 : isa->W;
            isa->pack(kt + pp * pl.pair_floats + j0 * D, k + ((p0 + pp) * S + j0) * D, D, nkeys, D);
        }
        /* 2. attention: (pair, head of its group, query block descending, key split) */
        const int64_t units = np * group * pl.nqb * nsplit;
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            char *sl = slices + slice_bytes * (size_t)omp_get_thread_num();
            float *tile = (float *)sl, *o = tile + tile_f, *m = o + o_f, *l = m + vec_f, *alpha = l + vec_f;
            const int64_t split = u % nsplit, t = u / nsplit;
            const int64_t pp = t / (group * pl.nqb), g = (t / pl.nqb) % group, qbi = t % pl.nqb;
            const int64_t qbk = pr->is_causal ? pl.nqb - 1 - qbi : qbi;
            const int64_t pair = p0 + pp, b = pair / Hkv, h = (pair % Hkv) * group + g;
            const int64_t i0 = qbk * pl.Br, nr = L - i0 < pl.Br ? L - i0 : pl.Br;
            const int64_t kv_end = pr->is_causal && i0 + nr < S ? i0 + nr : S;
            int64_t jb = split * kb_per_split * pl.Bc, je = jb + kb_per_split * pl.Bc;
            if (je > kv_end) je = kv_end;
            const int64_t row0 = (b * Hq + h) * L + i0;
            if (jb >= je) { /* an empty split (causal): contributes nothing */
                for (int64_t r = 0; r < nr; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
            } else {
                attend_rows(&pl, pair_k(&pl, kt, p0 + pp, pp), b, h, i0, nr, jb, je, tile, o, m, l, alpha);
            }
            if (nsplit == 1) {
                finish_rows(&pl, row0, nr, o, m, l, out, lse_out);
            } else {
                float *pt = parts + (size_t)((((b * Hq + h) * pl.nqb + qbk) * nsplit + split) * pl.Br) * part_row_f;
                for (int64_t r = 0; r < nr; r++) {
                    float *dst = pt + (size_t)r * part_row_f;
                    dst[0] = m[r]; dst[1] = l[r];
                    if (m[r] == -INFINITY) memset(dst + 2, 0, (size_t)Dv * sizeof(float));
                    else memcpy(dst + 2, o + r * pl.ldo, (size_t)Dv * sizeof(float));
                }
            }
        }
        /* 3. merge the key splits: weights exp(m_s - M) bring every partial to a common max */
        if (nsplit > 1) {
            const int64_t rows = np * group * L;
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t u = 0; u < rows; u++) {
                const int64_t pair = p0 + u / (group * L), g = (u / L) % group, i = u % L;
                const int64_t b = pair / Hkv, h = (pair % Hkv) * group + g, row = (b * Hq + h) * L + i;
                const int64_t qbk = i / pl.Br, r = i % pl.Br;
                const float *pt = parts + (size_t)((((b * Hq + h) * pl.nqb + qbk) * nsplit) * pl.Br + r) * part_row_f;
                const size_t sstride = (size_t)pl.Br * part_row_f;
                float M = -INFINITY;
                for (int64_t s = 0; s < nsplit; s++) if (pt[s * sstride] > M) M = pt[s * sstride];
                float *dst = out + row * Dv;
                if (M == -INFINITY) {
                    memset(dst, 0, (size_t)Dv * sizeof(float));
                    if (lse_out) lse_out[row] = -INFINITY;
                    continue;
                }
                float lsum = 0.0f;
                memset(dst, 0, (size_t)Dv * sizeof(float));
                for (int64_t s = 0; s < nsplit; s++) {
                    const float *ps = pt + s * sstride;
                    if (ps[0] == -INFINITY) continue;
                    const float w = expf(ps[0] - M);
                    lsum += ps[1] * w;
                    for (int64_t d = 0; d < Dv; d++) dst[d] += ps[2 + d] * w;
                }
                const float inv = pl.keep_scale / lsum;
                for (int64_t d = 0; d < Dv; d++) dst[d] *= inv;
                if (lse_out) lse_out[row] = M + logf(lsum);
            }
        }
        /* 4. optional weights: recompute the tiles, P = exp(s - lse) */
        if (weights) {
            const int64_t wunits = np * group * pl.nqb;
            #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
            for (int64_t u = 0; u < wunits; u++) {
                float *tile = (float *)(slices + slice_bytes * (size_t)omp_get_thread_num());
                const int64_t pp = u / (group * pl.nqb), g = (u / pl.nqb) % group, qbk = u % pl.nqb;
                const int64_t pair = p0 + pp, b = pair / Hkv, h = (pair % Hkv) * group + g;
                const int64_t i0 = qbk * pl.Br, nr = L - i0 < pl.Br ? L - i0 : pl.Br;
                weight_rows(&pl, pair_k(&pl, kt, p0 + pp, pp), b, h, i0, nr, lse_out, tile, weights);
            }
        }
    }
    return QF_OK;
}

qf_status qf_cpu_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                              const float *v, float *out, float *lse, float *weights) {
    if (pr->strided) return qf_fail(QF_ERR_INTERNAL, "sdpa (cpu): strided tensors are taken by the CUDA forward only");
    switch (qf_get_isa()) {
    case QF_ISA_AVX512: return forward_tiled(pr, &isa512, q, k, v, out, lse, weights);
    case QF_ISA_AVX2: return forward_tiled(pr, &isa256, q, k, v, out, lse, weights);
    default: return forward_scalar(pr, q, k, v, out, lse, weights);
    }
}
