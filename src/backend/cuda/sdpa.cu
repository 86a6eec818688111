/* sdpa.cu - fused scaled dot-product attention on the GPU, float32, forward and backward
 * (flash-attention style: scores never reach device memory). SIMT FMA kernels, no tensor cores.
 *
 * Forward (sdpa_fwd): one block of 128 threads per 64 query rows of one (batch, head). Q and the
 * 64-key tiles of K, then V, arrive in shared memory by cp.async (K and V share one buffer);
 * an online softmax keeps each row's running max m and sum l in log2 units (exp2 of
 * scale*log2(e)*q.k). Causal blocks stop at the last key tile any of their rows can see, and
 * the heaviest query tiles are scheduled first. When the grid is too small to fill the GPU
 * (the Q-Former's 32 queries), the key tiles are split over up to 16 blocks per query tile whose
 * partial (o, m, l) sdpa_combine merges.
 * Backward (sdpa_bwd): one block per 64 keys of one (batch, kv head); K and V stay in shared
 * memory while the block walks the query tiles of every query head of its group (GQA), recomputes
 * P = exp(s - lse) from the forward's lse, accumulates dK and dV in registers, and adds its share
 * of dQ with atomics (dq is zeroed first). Delta_i = dO_i . O_i comes from sdpa_delta.
 *
 * Thread layout (both kernels): warp w, lane l -> row group rg = 4w + l/8 (rows R*rg..R*rg+R-1
 * of the tile, R = RR query rows in the forward, KR keys in the backward, 4 by default: measured
 * best on the H100) and column group cg = l%8 (score columns cg + 8c; head-dim float4 chunks
 * cg + 8t). The 8 lanes of a row group are consecutive, so row reductions are 3 xor-shuffles;
 * shared tiles have a row stride of DP+4 floats (4 mod 32 words) so the 8 lanes of a quarter-warp
 * read 8 different rows or 8 consecutive chunks without bank conflicts.
 *
 * Invariants shared with the CPU kernels (sdpa_internal.h): a key is attendable iff j < S, i < L,
 * not (causal and j > i), and the mask allows it (bool: nonzero; float: added, -inf blocks);
 * rows with no attendable key give out = 0, lse = -inf and zero gradients. DP (the padded head
 * dim: 32, 64 or 128) >= D and Dv; padding columns are zero in shared memory and never stored.
 * Dropout and head dims above 128 are not implemented here (QF_ERR_UNSUPPORTED). */
#include "cuda_internal.h"

#include <math.h>
#include <stdint.h>

namespace {

constexpr int BM = 64;       /* query rows per tile */
constexpr int BN = 64;       /* keys per tile */
constexpr int NT = 128;      /* threads per block */
constexpr int LDP = BM + 4;  /* row stride of the P / dS tiles */
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
#ifndef QF_SDPA_FWD_RR
#define QF_SDPA_FWD_RR 4 /* query rows per thread in the forward: 4 (128 threads) or 2 (256) */
#endif
#ifndef QF_SDPA_BWD_KR
#define QF_SDPA_BWD_KR 4 /* keys per thread in the backward: 4 (128 threads) or 2 (256; slower on the H100) */
#endif

struct Args {
    const float *q, *k, *v, *o, *dout, *lse_in, *delta;
    float *out, *lse, *dq, *dk, *dv, *weights;
    int64_t B, Hq, Hkv, L, S, D, Dv, group;
    float scale, scale_log2;
    int causal, mask_kind, vec_d, vec_dv;
    /* forward split over keys (grid z = B * nsplit): partial unnormalised outputs part_o
     * [nsplit][B*Hq*L][Dv] and (m in log2 units, l) pairs part_ml [nsplit][B*Hq*L][2], merged by
     * sdpa_combine. nsplit = 1: no split, out/lse written directly. */
    int nsplit;
    float *part_o, *part_ml;
    const void *mask;
    int64_t ms_b, ms_h, ms_i, ms_j;
    /* forward only: element strides (batch, head, row) of q, k, v and out; contiguous unless the
     * problem is strided (qf_sdpa_problem.strided) */
    int64_t q_sb, q_sh, q_si, k_sb, k_sh, k_si, v_sb, v_sh, v_si, o_sb, o_sh, o_si;
};

/* The mask's term for (i, j) in log2 units: 0 / -inf for bool, value*log2(e) for float. */
__device__ __forceinline__ float mask_log2(const Args &a, int64_t base, int64_t i, int64_t j) {
    int64_t at = base + i * a.ms_i + j * a.ms_j;
    if (a.mask_kind == QF_MASK_BOOL) return ((const uint8_t *)a.mask)[at] ? 0.0f : -INFINITY;
    return ((const float *)a.mask)[at] * LOG2E;
}

/* cp.async (sm_80+): global -> shared without registers, so every load of a tile is in flight at
 * once; src_bytes 0 writes zeros (the padding rows/cols) without reading gmem. */
__device__ __forceinline__ void cp_async16(float *dst, const float *src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(float *dst, const float *src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
}
/* Waits for this thread's cp.async copies; a __syncthreads must follow before others read. */
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/* Rows [row0, row0+ROWS) x cols [0, DP) of the row-major [nrows, ncols] matrix src into tile (row
 * stride DP+4), asynchronously: issue here, then cp_async_wait + __syncthreads before use. Rows
 * >= nrows and cols >= ncols become 0. vec: ncols % 4 == 0 and src 16-byte aligned (float4
 * copies). NTH: the block's thread count. */
template <int DP, int NTH = NT, int ROWS = 64>
__device__ __forceinline__ void load_tile_async(float *tile, const float *src, int64_t row0, int64_t nrows,
                                                int64_t ncols, int vec, int64_t ld = -1) {
    if (ld < 0) ld = ncols; /* row stride: contiguous rows unless given */
    constexpr int LD = DP + 4;
    if (vec) {
        constexpr int C4 = DP / 4;
#pragma unroll 4
        for (int idx = threadIdx.x; idx < ROWS * C4; idx += NTH) {
            const int r = idx / C4, c = (idx % C4) * 4;
            const bool ok = row0 + r < nrows && c < ncols;
            cp_async16(tile + r * LD + c, ok ? src + (row0 + r) * ld + c : src, ok);
        }
    } else {
#pragma unroll 4
        for (int idx = threadIdx.x; idx < ROWS * DP; idx += NTH) {
            const int r = idx / DP, c = idx % DP;
            const bool ok = row0 + r < nrows && c < ncols;
            cp_async4(tile + r * LD + c, ok ? src + (row0 + r) * ld + c : src, ok);
        }
    }
}

template <int DP, int QM>
constexpr size_t fwd_smem_bytes() { return sizeof(float) * (size_t)((QM + BN) * (DP + 4) + BN * (QM + 4)); }
template <int DP>
constexpr size_t bwd_smem_bytes() { return sizeof(float) * (size_t)(4 * 64 * (DP + 4) + 2 * BM * LDP + 2 * BM); }

template <int KR>
__device__ __forceinline__ void store_kr(float *dst, const float (&x)[KR]) {
    if constexpr (KR == 4) *(float4 *)dst = make_float4(x[0], x[1], x[2], x[3]);
    else *(float2 *)dst = make_float2(x[0], x[1]);
}
template <int KR>
__device__ __forceinline__ void load_kr(const float *src, float (&x)[KR]) {
    if constexpr (KR == 4) {
        const float4 v = *(const float4 *)src;
        x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
    } else {
        const float2 v = *(const float2 *)src;
        x[0] = v.x; x[1] = v.y;
    }
}

/* out[b,h,rows], lse[b,h,rows]. grid (ceil(L/QM), Hq, B * nsplit). QM query rows per block (64,
 * or 32 for short queries), RR per thread: QM/RR row groups of 8 lanes, 8*QM/RR threads. */
template <int DP, int RR, int QM>
__global__ void __launch_bounds__(QM / RR * 8, QM == 32 ? 4 : DP >= 128 ? 2 : 3) sdpa_fwd(Args a) {
    constexpr int LD = DP + 4, NC = DP / 32, NTH = QM / RR * 8, LDQ = QM + 4;
    extern __shared__ float4 smem4[];
    float *Qs = (float *)smem4, *KVs = Qs + QM * LD, *Ps = KVs + BN * LD;
    const int tid = threadIdx.x, lane = tid & 31;
    const int rg = (tid >> 5) * 4 + (lane >> 3), cg = lane & 7;
    /* causal: the heaviest query tiles (the last ones) start first */
    const int64_t qb = a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z / a.nsplit, split = blockIdx.z % a.nsplit;
    const int64_t hk = h / a.group, row0 = qb * QM;
    const int64_t bh = b * a.Hq + h, bhk = b * a.Hkv + hk;
    const float *k = a.k + b * a.k_sb + hk * a.k_sh, *v = a.v + b * a.v_sb + hk * a.v_sh;
    const int64_t mbase = b * a.ms_b + h * a.ms_h;
    (void)bhk;

    /* Q arrives asynchronously with the first K tile (one wait for both); the scale is applied
     * to the scores, not to Q, so nothing has to pass through registers here. */
    load_tile_async<DP, NTH, QM>(Qs, a.q + b * a.q_sb + h * a.q_sh, row0, a.L, a.D, a.vec_d, a.q_si);

    float o[RR][4 * NC], m[RR], l[RR];
#pragma unroll
    for (int i = 0; i < RR; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < 4 * NC; c++) o[i][c] = 0.f;
    }
    int64_t nkb = (a.S + BN - 1) / BN;
    if (a.causal) {
        int64_t last_row = (row0 + QM < a.L ? row0 + QM : a.L) - 1;
        if (last_row / BN + 1 < nkb) nkb = last_row / BN + 1;
    }
    int64_t kb_begin = 0;
    if (a.nsplit > 1) { /* this block's share of the key tiles (possibly none) */
        const int64_t per = (nkb + a.nsplit - 1) / a.nsplit;
        kb_begin = split * per;
        nkb = kb_begin + per < nkb ? kb_begin + per : nkb;
    }
    for (int64_t kb = kb_begin; kb < nkb; kb++) {
        const int64_t col0 = kb * BN;
        __syncthreads(); /* the previous tile's P.V is done with KVs and Ps */
        load_tile_async<DP, NTH>(KVs, k, col0, a.S, a.D, a.vec_d, a.k_si);
        cp_async_wait();
        __syncthreads();
        float s[RR][8];
#pragma unroll
        for (int i = 0; i < RR; i++)
#pragma unroll
            for (int c = 0; c < 8; c++) s[i][c] = 0.f;
#pragma unroll 4
        for (int d = 0; d < DP; d += 4) {
            float4 qv[RR], kv[8];
#pragma unroll
            for (int i = 0; i < RR; i++) qv[i] = *(const float4 *)(Qs + (rg * RR + i) * LD + d);
#pragma unroll
            for (int c = 0; c < 8; c++) kv[c] = *(const float4 *)(KVs + (cg + 8 * c) * LD + d);
#pragma unroll
            for (int i = 0; i < RR; i++)
#pragma unroll
                for (int c = 0; c < 8; c++)
                    s[i][c] += qv[i].x * kv[c].x + qv[i].y * kv[c].y + qv[i].z * kv[c].z + qv[i].w * kv[c].w;
        }
#pragma unroll
        for (int i = 0; i < RR; i++)
#pragma unroll
            for (int c = 0; c < 8; c++) s[i][c] *= a.scale_log2;
        const bool edge = col0 + BN > a.S || row0 + QM > a.L || (a.causal && col0 + BN - 1 > row0) || a.mask_kind;
        if (edge) {
#pragma unroll
            for (int i = 0; i < RR; i++) {
                const int64_t qi = row0 + rg * RR + i;
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    const int64_t kj = col0 + cg + 8 * c;
                    if (kj >= a.S || qi >= a.L || (a.causal && kj > qi)) s[i][c] = -INFINITY;
                    else if (a.mask_kind) s[i][c] += mask_log2(a, mbase, qi, kj);
                }
            }
        }
        /* online softmax: new row max, rescale the running sum and output */
#pragma unroll
        for (int i = 0; i < RR; i++) {
            float mx = s[i][0];
#pragma unroll
            for (int c = 1; c < 8; c++) mx = fmaxf(mx, s[i][c]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float mnew = fmaxf(m[i], mx);
            const float base = mnew == -INFINITY ? 0.f : mnew; /* no key yet: keep exp2 finite */
            const float alpha = exp2f(m[i] - base);
            m[i] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < 8; c++) {
                s[i][c] = exp2f(s[i][c] - base);
                sum += s[i][c];
            }
            l[i] = l[i] * alpha + sum; /* this lane's part of the row sum; reduced at the end */
#pragma unroll
            for (int c = 0; c < 4 * NC; c++) o[i][c] *= alpha;
        }
#pragma unroll
        for (int c = 0; c < 8; c++) {
            float pc[RR];
#pragma unroll
            for (int i = 0; i < RR; i++) pc[i] = s[i][c];
            store_kr<RR>(Ps + (cg + 8 * c) * LDQ + rg * RR, pc);
        }
        __syncthreads(); /* all lanes are done reading K */
        load_tile_async<DP, NTH>(KVs, v, col0, a.S, a.Dv, a.vec_dv, a.v_si);
        cp_async_wait();
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < BN; j++) {
            float p[RR];
            load_kr<RR>(Ps + j * LDQ + rg * RR, p);
#pragma unroll
            for (int t = 0; t < NC; t++) {
                const float4 x = *(const float4 *)(KVs + j * LD + (cg + 8 * t) * 4);
#pragma unroll
                for (int i = 0; i < RR; i++) {
                    o[i][4 * t + 0] += p[i] * x.x; o[i][4 * t + 1] += p[i] * x.y;
                    o[i][4 * t + 2] += p[i] * x.z; o[i][4 * t + 3] += p[i] * x.w;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RR; i++) {
        float sum = l[i];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        const int64_t qi = row0 + rg * RR + i;
        if (qi >= a.L) continue;
        float inv = sum > 0.f ? 1.f / sum : 0.f;
        float *dst = a.out + b * a.o_sb + h * a.o_sh + qi * a.o_si;
        if (a.nsplit > 1) { /* partial: unnormalised, with its (m, l) for sdpa_combine */
            const int64_t at = split * a.B * a.Hq * a.L + bh * a.L + qi;
            dst = a.part_o + at * a.Dv;
            inv = 1.f;
            if (cg == 0) {
                a.part_ml[2 * at] = m[i];
                a.part_ml[2 * at + 1] = sum;
            }
        }
#pragma unroll
        for (int t = 0; t < NC; t++) {
            const int d = (cg + 8 * t) * 4;
            if (a.vec_dv) {
                if (d < a.Dv)
                    *(float4 *)(dst + d) = make_float4(o[i][4 * t] * inv, o[i][4 * t + 1] * inv, o[i][4 * t + 2] * inv,
                                                       o[i][4 * t + 3] * inv);
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (d + e < a.Dv) dst[d + e] = o[i][4 * t + e] * inv;
            }
        }
        if (a.nsplit == 1 && a.lse && cg == 0) a.lse[bh * a.L + qi] = sum > 0.f ? m[i] * LN2 + logf(sum) : -INFINITY;
    }
}

/* Merges the nsplit partial results of each row: M = max m_s, l = sum l_s 2^(m_s - M),
 * out = sum o_s 2^(m_s - M) / l, lse = M ln 2 + ln l (-inf and zeros for a row without keys).
 * One warp per row of B*Hq*L. */
__global__ void sdpa_combine(Args a) {
    const int64_t rows = a.B * a.Hq * a.L;
    const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float M = -INFINITY;
    for (int s = 0; s < a.nsplit; s++) M = fmaxf(M, a.part_ml[2 * (s * rows + r)]);
    const float base = M == -INFINITY ? 0.f : M;
    float l = 0.f;
    for (int s = 0; s < a.nsplit; s++) l += a.part_ml[2 * (s * rows + r) + 1] * exp2f(a.part_ml[2 * (s * rows + r)] - base);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t d = lane; d < a.Dv; d += 32) {
        float acc = 0.f;
        for (int s = 0; s < a.nsplit; s++)
            acc += a.part_o[(s * rows + r) * a.Dv + d] * exp2f(a.part_ml[2 * (s * rows + r)] - base);
        a.out[(r / a.L / a.Hq) * a.o_sb + (r / a.L % a.Hq) * a.o_sh + (r % a.L) * a.o_si + d] = acc * inv;
    }
    if (lane == 0 && a.lse) a.lse[r] = l > 0.f ? M * LN2 + logf(l) : -INFINITY;
}

/* delta[r] = sum_d dout[r,d] * o[r,d], one warp per row r of B*Hq*L. */
__global__ void sdpa_delta(const float *dout, const float *o, float *delta, int64_t rows, int64_t Dv) {
    const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float acc = 0.f;
    for (int64_t d = lane; d < Dv; d += 32) acc += dout[r * Dv + d] * o[r * Dv + d];
#pragma unroll
    for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[r] = acc;
}

/* dk, dv for 64 keys of (b, kv head); dq += via atomics. grid (ceil(S/64), Hkv, B).
 * KR keys (and, for dQ, queries) per thread: 64/KR row groups of 8 lanes, 8*64/KR threads
 * (KR = 2: 256 threads, two warps per scheduler even when shared memory allows one block). */
template <int DP, int KR>
__global__ void __launch_bounds__(512 / KR) sdpa_bwd(Args a) {
    constexpr int LD = DP + 4, NC = DP / 32, NTH = 512 / KR;
    extern __shared__ float4 smem4[];
    float *Ks = (float *)smem4, *Vs = Ks + BN * LD, *Qs = Vs + BN * LD, *dOs = Qs + BM * LD;
    float *Pt = dOs + BM * LD, *dSt = Pt + BM * LDP, *lse2 = dSt + BM * LDP, *dels = lse2 + BM;
    const int tid = threadIdx.x, lane = tid & 31;
    const int rg = (tid >> 5) * 4 + (lane >> 3), cg = lane & 7;
    const int64_t kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, col0 = kb * BN;
    const int64_t bhk = b * a.Hkv + hk;

    load_tile_async<DP, NTH>(Ks, a.k + bhk * a.S * a.D, col0, a.S, a.D, a.vec_d);
    load_tile_async<DP, NTH>(Vs, a.v + bhk * a.S * a.Dv, col0, a.S, a.Dv, a.vec_dv);

    float dk[KR][4 * NC], dv[KR][4 * NC];
#pragma unroll
    for (int r = 0; r < KR; r++)
#pragma unroll
        for (int c = 0; c < 4 * NC; c++) dk[r][c] = dv[r][c] = 0.f;

    const int64_t nqb = (a.L + BM - 1) / BM;
    const int64_t qb0 = a.causal ? col0 / BM : 0; /* earlier query tiles cannot see these keys */
    for (int64_t hh = 0; hh < a.group; hh++) {
        const int64_t h = hk * a.group + hh, bh = b * a.Hq + h;
        const int64_t mbase = b * a.ms_b + h * a.ms_h;
        const float *q = a.q + bh * a.L * a.D, *dout = a.dout + bh * a.L * a.Dv;
        float *dq = a.dq + bh * a.L * a.D;
        for (int64_t qb = qb0; qb < nqb; qb++) {
            const int64_t row0 = qb * BM;
            __syncthreads(); /* the previous tile is done with Qs, dOs, Pt, dSt */
            load_tile_async<DP, NTH>(Qs, q, row0, a.L, a.D, a.vec_d);
            load_tile_async<DP, NTH>(dOs, dout, row0, a.L, a.Dv, a.vec_dv);
            if (tid < BM) {
                const int64_t qi = row0 + tid;
                const float ls = qi < a.L ? a.lse_in[bh * a.L + qi] : -INFINITY;
                lse2[tid] = ls == -INFINITY ? INFINITY : ls * LOG2E; /* +inf: P = 0 on empty rows */
                dels[tid] = qi < a.L ? a.delta[bh * a.L + qi] : 0.f;
            }
            cp_async_wait(); /* this thread's Q/dO (and, the first time, K/V) copies */
            __syncthreads();
            /* P^T and dP^T for keys KR*rg + r, queries cg + 8c */
            float p[KR][8], dp[KR][8];
#pragma unroll
            for (int r = 0; r < KR; r++)
#pragma unroll
                for (int c = 0; c < 8; c++) p[r][c] = dp[r][c] = 0.f;
#pragma unroll 2
            for (int d = 0; d < DP; d += 4) {
                float4 kv[KR], qv[8];
#pragma unroll
                for (int r = 0; r < KR; r++) kv[r] = *(const float4 *)(Ks + (rg * KR + r) * LD + d);
#pragma unroll
                for (int c = 0; c < 8; c++) qv[c] = *(const float4 *)(Qs + (cg + 8 * c) * LD + d);
#pragma unroll
                for (int r = 0; r < KR; r++)
#pragma unroll
                    for (int c = 0; c < 8; c++)
                        p[r][c] += kv[r].x * qv[c].x + kv[r].y * qv[c].y + kv[r].z * qv[c].z + kv[r].w * qv[c].w;
            }
#pragma unroll 2
            for (int d = 0; d < DP; d += 4) {
                float4 vv[KR], gv[8];
#pragma unroll
                for (int r = 0; r < KR; r++) vv[r] = *(const float4 *)(Vs + (rg * KR + r) * LD + d);
#pragma unroll
                for (int c = 0; c < 8; c++) gv[c] = *(const float4 *)(dOs + (cg + 8 * c) * LD + d);
#pragma unroll
                for (int r = 0; r < KR; r++)
#pragma unroll
                    for (int c = 0; c < 8; c++)
                        dp[r][c] += vv[r].x * gv[c].x + vv[r].y * gv[c].y + vv[r].z * gv[c].z + vv[r].w * gv[c].w;
            }
#pragma unroll
            for (int r = 0; r < KR; r++) {
                const int64_t kj = col0 + rg * KR + r;
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    const int64_t qi = row0 + cg + 8 * c;
                    float x = p[r][c] * a.scale_log2;
                    const bool ok = kj < a.S && qi < a.L && !(a.causal && kj > qi);
                    if (ok && a.mask_kind) x += mask_log2(a, mbase, qi, kj);
                    const float pr = ok ? exp2f(x - lse2[cg + 8 * c]) : 0.f;
                    p[r][c] = pr;
                    dp[r][c] = pr * (dp[r][c] - dels[cg + 8 * c]);
                }
            }
#pragma unroll
            for (int c = 0; c < 8; c++) {
                float pc[KR], sc[KR];
#pragma unroll
                for (int r = 0; r < KR; r++) {
                    pc[r] = p[r][c];
                    sc[r] = dp[r][c];
                }
                store_kr<KR>(Pt + (cg + 8 * c) * LDP + rg * KR, pc);
                store_kr<KR>(dSt + (cg + 8 * c) * LDP + rg * KR, sc);
            }
            __syncthreads();
            /* dV += P^T dO, dK += dS^T Q (scale applied at the end) */
#pragma unroll 2
            for (int i = 0; i < BM; i++) {
                float pv[KR], sv[KR];
                load_kr<KR>(Pt + i * LDP + rg * KR, pv);
                load_kr<KR>(dSt + i * LDP + rg * KR, sv);
#pragma unroll
                for (int t = 0; t < NC; t++) {
                    const float4 g = *(const float4 *)(dOs + i * LD + (cg + 8 * t) * 4);
                    const float4 x = *(const float4 *)(Qs + i * LD + (cg + 8 * t) * 4);
#pragma unroll
                    for (int r = 0; r < KR; r++) {
                        dv[r][4 * t + 0] += pv[r] * g.x; dv[r][4 * t + 1] += pv[r] * g.y;
                        dv[r][4 * t + 2] += pv[r] * g.z; dv[r][4 * t + 3] += pv[r] * g.w;
                        dk[r][4 * t + 0] += sv[r] * x.x; dk[r][4 * t + 1] += sv[r] * x.y;
                        dk[r][4 * t + 2] += sv[r] * x.z; dk[r][4 * t + 3] += sv[r] * x.w;
                    }
                }
            }
            /* dQ[KR*rg+r][chunk t] += scale * sum_j dS[i][j] K[j][:], one float4 chunk at a time */
#pragma unroll
            for (int t = 0; t < NC; t++) {
                float acc[KR][4];
#pragma unroll
                for (int r = 0; r < KR; r++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[r][e] = 0.f;
#pragma unroll 2
                for (int j = 0; j < BN; j += 4) {
                    float4 sr[KR], kr[4];
#pragma unroll
                    for (int r = 0; r < KR; r++) sr[r] = *(const float4 *)(dSt + (rg * KR + r) * LDP + j);
#pragma unroll
                    for (int u = 0; u < 4; u++) kr[u] = *(const float4 *)(Ks + (j + u) * LD + (cg + 8 * t) * 4);
#pragma unroll
                    for (int r = 0; r < KR; r++) {
                        acc[r][0] += sr[r].x * kr[0].x + sr[r].y * kr[1].x + sr[r].z * kr[2].x + sr[r].w * kr[3].x;
                        acc[r][1] += sr[r].x * kr[0].y + sr[r].y * kr[1].y + sr[r].z * kr[2].y + sr[r].w * kr[3].y;
                        acc[r][2] += sr[r].x * kr[0].z + sr[r].y * kr[1].z + sr[r].z * kr[2].z + sr[r].w * kr[3].z;
                        acc[r][3] += sr[r].x * kr[0].w + sr[r].y * kr[1].w + sr[r].z * kr[2].w + sr[r].w * kr[3].w;
                    }
                }
                const int d = (cg + 8 * t) * 4;
#pragma unroll
                for (int r = 0; r < KR; r++) {
                    const int64_t qi = row0 + rg * KR + r;
                    if (qi >= a.L) continue;
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (d + e < a.D) atomicAdd(dq + qi * a.D + d + e, acc[r][e] * a.scale);
                }
            }
        }
    }
    cp_async_wait(); /* K/V copies are still pending when no query tile could see these keys */
#pragma unroll
    for (int r = 0; r < KR; r++) {
        const int64_t kj = col0 + rg * KR + r;
        if (kj >= a.S) continue;
        float *dkr = a.dk + (bhk * a.S + kj) * a.D, *dvr = a.dv + (bhk * a.S + kj) * a.Dv;
#pragma unroll
        for (int t = 0; t < NC; t++) {
            const int d = (cg + 8 * t) * 4;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                if (d + e < a.D) dkr[d + e] = dk[r][4 * t + e] * a.scale;
                if (d + e < a.Dv) dvr[d + e] = dv[r][4 * t + e];
            }
        }
    }
}

/* weights[b,h,i,j] = P_ij (0 where not attendable), one thread per element; needs lse. Only
 * for the optional weights output: simple, not fast. */
__global__ void sdpa_weights(Args a) {
    const int64_t n = a.B * a.Hq * a.L * a.S;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = idx % a.S, i = (idx / a.S) % a.L, bh = idx / a.S / a.L;
        const int64_t h = bh % a.Hq, b = bh / a.Hq, hk = h / a.group;
        const float ls = a.lse[bh * a.L + i];
        float w = 0.f;
        if (ls != -INFINITY && !(a.causal && j > i)) {
            const float *qr = a.q + (bh * a.L + i) * a.D, *kr = a.k + ((b * a.Hkv + hk) * a.S + j) * a.D;
            float dot = 0.f;
            for (int64_t d = 0; d < a.D; d++) dot += qr[d] * kr[d];
            float x = dot * a.scale_log2;
            if (a.mask_kind) x += mask_log2(a, b * a.ms_b + h * a.ms_h, i, j);
            w = exp2f(x - ls * LOG2E);
        }
        a.weights[idx] = w;
    }
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Shared setup of both directions; QF_ERR_UNSUPPORTED for what these kernels do not cover. */
qf_status make_args(const char *fn, const qf_sdpa_problem *pr, Args *a, int *dp) {
    if (pr->dropout_p > 0.0f)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: dropout_p = %g is not implemented on the CUDA backend (CPU only)",
                       fn, (double)pr->dropout_p);
    const int64_t dmax = pr->D > pr->Dv ? pr->D : pr->Dv;
    if (dmax > 128)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: head dim D = %lld / Dv = %lld: the CUDA kernels take at most 128 "
                       "(the CPU backend takes up to 1024)", fn, (long long)pr->D, (long long)pr->Dv);
    if (pr->B > 65535 || pr->Hq > 65535 || (pr->L + BM - 1) / BM > 0x7fffffff || (pr->S + BN - 1) / BN > 0x7fffffff)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: B = %lld or Hq = %lld exceeds the CUDA grid's 65535", fn,
                       (long long)pr->B, (long long)pr->Hq);
    *dp = dmax <= 32 ? 32 : dmax <= 64 ? 64 : 128;
    *a = Args{};
    a->B = pr->B; a->Hq = pr->Hq; a->Hkv = pr->Hkv; a->L = pr->L; a->S = pr->S; a->D = pr->D; a->Dv = pr->Dv;
    a->group = pr->group;
    a->scale = pr->scale;
    a->scale_log2 = pr->scale * LOG2E;
    a->causal = pr->is_causal;
    a->mask_kind = pr->mask ? (int)pr->mask_kind : (int)QF_MASK_NONE;
    a->mask = pr->mask;
    a->ms_b = pr->ms_b; a->ms_h = pr->ms_h; a->ms_i = pr->ms_i; a->ms_j = pr->ms_j;
    /* the contiguous tensors' strides unless the problem is strided (qf_sdpa_resolve) */
    a->q_sb = pr->q_sb; a->q_sh = pr->q_sh; a->q_si = pr->q_si;
    a->k_sb = pr->k_sb; a->k_sh = pr->k_sh; a->k_si = pr->k_si;
    a->v_sb = pr->v_sb; a->v_sh = pr->v_sh; a->v_si = pr->v_si;
    a->o_sb = pr->o_sb; a->o_sh = pr->o_sh; a->o_si = pr->o_si;
    return QF_OK;
}

/* every stride a multiple of 4 floats (float4 rows stay 16-byte aligned) */
static bool strides4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t e, int64_t f) {
    return a % 4 == 0 && b % 4 == 0 && c % 4 == 0 && d % 4 == 0 && e % 4 == 0 && f % 4 == 0;
}

template <int DP, int RR, int QM>
qf_status launch_fwd(const Args &a) {
    static bool attr_set = false; /* idempotent, so a race between threads is harmless */
    const size_t smem = fwd_smem_bytes<DP, QM>();
    if (!attr_set) {
        QF_TRY(qf_cuda_check(cudaFuncSetAttribute(sdpa_fwd<DP, RR, QM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                             "sdpa forward: cudaFuncSetAttribute"));
        attr_set = true;
    }
    dim3 grid((unsigned)((a.L + QM - 1) / QM), (unsigned)a.Hq, (unsigned)(a.B * a.nsplit));
    sdpa_fwd<DP, RR, QM><<<grid, QM / RR * 8, smem, qf_cuda_stream()>>>(a);
    QF_TRY(qf_cuda_launched("sdpa_fwd"));
    if (a.nsplit > 1) {
        const int64_t rows = a.B * a.Hq * a.L;
        sdpa_combine<<<(unsigned)((rows * 32 + 255) / 256), 256, 0, qf_cuda_stream()>>>(a);
        QF_TRY(qf_cuda_launched("sdpa_combine"));
    }
    return QF_OK;
}

template <int DP>
qf_status launch_bwd(const Args &a) {
    constexpr int KR = QF_SDPA_BWD_KR;
    static bool attr_set = false;
    const size_t smem = bwd_smem_bytes<DP>();
    if (!attr_set) {
        QF_TRY(qf_cuda_check(cudaFuncSetAttribute(sdpa_bwd<DP, KR>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                             "sdpa backward: cudaFuncSetAttribute"));
        attr_set = true;
    }
    dim3 grid((unsigned)((a.S + BN - 1) / BN), (unsigned)a.Hkv, (unsigned)a.B);
    sdpa_bwd<DP, KR><<<grid, 512 / KR, smem, qf_cuda_stream()>>>(a);
    return qf_cuda_launched("sdpa_bwd");
}

} // namespace

qf_status qf_cuda_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k, const float *v,
                               float *out, float *lse, float *weights) {
    Args a;
    int dp;
    QF_TRY(make_args("sdpa (cuda)", pr, &a, &dp));
    a.q = q; a.k = k; a.v = v; a.out = out; a.lse = lse; a.weights = weights;
    a.vec_d = pr->D % 4 == 0 && aligned16(q) && aligned16(k) && strides4(a.q_sb, a.q_sh, a.q_si, a.k_sb, a.k_sh, a.k_si);
    a.vec_dv = pr->Dv % 4 == 0 && aligned16(v) && aligned16(out) &&
               strides4(a.v_sb, a.v_sh, a.v_si, a.o_sb, a.o_sh, a.o_si);
    if (pr->strided && weights)
        return qf_fail(QF_ERR_UNSUPPORTED, "sdpa (cuda): strided q/k/v/out with attention weights is not implemented");
    if (weights && !lse) { /* the weights pass needs every row's lse */
        void *buf;
        QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_LSE, sizeof(float) * (size_t)(pr->B * pr->Hq * pr->L), &buf));
        a.lse = (float *)buf;
    }
    /* Too few blocks to fill the GPU (short queries: the Q-Former's 32): split the keys so each
     * SM gets several blocks, then merge (sdpa_combine). */
    static int sms = 0;
    if (!sms && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess) {
        (void)cudaGetLastError();
        sms = 1;
    }
    /* Short queries (L <= 32, the Q-Former's): 32-row query tiles, half the padded work. */
    const int64_t qm = pr->L <= 32 ? 32 : BM;
    const int64_t blocks = (pr->L + qm - 1) / qm * pr->Hq * pr->B, nkb = (pr->S + BN - 1) / BN;
    a.nsplit = 1;
    if (blocks < 2 * sms && nkb > 1) {
        int64_t want = (4 * sms + blocks - 1) / blocks;
        want = want < nkb ? want : nkb;
        want = want < 16 ? want : 16;
        if (pr->B * want <= 65535) a.nsplit = (int)want;
    }
    if (a.nsplit > 1) {
        const size_t rows = (size_t)(pr->B * pr->Hq * pr->L);
        void *po, *pm;
        QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_PART_O, sizeof(float) * rows * (size_t)pr->Dv * (size_t)a.nsplit, &po));
        QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_PART_ML, sizeof(float) * rows * 2 * (size_t)a.nsplit, &pm));
        a.part_o = (float *)po;
        a.part_ml = (float *)pm;
    }
    constexpr int RR = QF_SDPA_FWD_RR;
    qf_status st;
    if (qm == 32) st = dp == 32 ? launch_fwd<32, 2, 32>(a) : dp == 64 ? launch_fwd<64, 2, 32>(a) : launch_fwd<128, 2, 32>(a);
    else st = dp == 32 ? launch_fwd<32, RR, 64>(a) : dp == 64 ? launch_fwd<64, RR, 64>(a) : launch_fwd<128, RR, 64>(a);
    QF_TRY(st);
    if (weights) {
        const int64_t n = pr->B * pr->Hq * pr->L * pr->S;
        int64_t blocks = (n + 255) / 256;
        if (blocks > 65536) blocks = 65536;
        sdpa_weights<<<(unsigned)blocks, 256, 0, qf_cuda_stream()>>>(a);
        QF_TRY(qf_cuda_launched("sdpa_weights"));
    }
    return QF_OK;
}

qf_status qf_cuda_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k, const float *v,
                                const float *out, const float *lse, const float *grad_out, float *dq, float *dk,
                                float *dv) {
    Args a;
    int dp;
    if (pr->strided) return qf_fail(QF_ERR_INTERNAL, "sdpa_backward (cuda): strided tensors are forward-only");
    QF_TRY(make_args("sdpa_backward (cuda)", pr, &a, &dp));
    a.nsplit = 1;
    a.q = q; a.k = k; a.v = v; a.o = out; a.lse_in = lse; a.dout = grad_out;
    a.dq = dq; a.dk = dk; a.dv = dv;
    a.vec_d = pr->D % 4 == 0 && aligned16(q) && aligned16(k);
    a.vec_dv = pr->Dv % 4 == 0 && aligned16(v) && aligned16(grad_out);
    const int64_t rows = pr->B * pr->Hq * pr->L;
    void *buf;
    QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_DELTA, sizeof(float) * (size_t)rows, &buf));
    a.delta = (const float *)buf;
    sdpa_delta<<<(unsigned)((rows * 32 + 255) / 256), 256, 0, qf_cuda_stream()>>>(grad_out, out, (float *)buf, rows, pr->Dv);
    QF_TRY(qf_cuda_launched("sdpa_delta"));
    QF_TRY(qf_cuda_check(cudaMemsetAsync(dq, 0, sizeof(float) * (size_t)(rows * pr->D), qf_cuda_stream()), "sdpa backward: zeroing dq"));
    return dp == 32 ? launch_bwd<32>(a) : dp == 64 ? launch_bwd<64>(a) : launch_bwd<128>(a);
}
