/* sdpa_bf16.cu - fused scaled dot-product attention on the GPU in bfloat16, forward and backward,
 * on tensor cores (FlashAttention-2 scheme: mma.sync m16n8k16 bf16 with ldmatrix, float32
 * accumulation, online softmax; scores never reach device memory).
 *
 * Forward (fwd_bf16): one block of 4 warps per 64 query rows of one (batch, head); warp w owns
 * rows 16w..16w+15 and keeps its Q fragments in registers. Per 64-key tile: S = Q K^T (K by
 * ldmatrix), scale, mask, online softmax in registers (running max m and sum l in log2 units),
 * P rounded to bf16 straight from the accumulators into A fragments, O += P V (V by
 * ldmatrix.trans). K of the next tile streams in (cp.async) during P V, V during Q K^T.
 * Causal blocks stop at the last key tile their rows can see; the heaviest query tiles run first.
 * The output goes through shared memory for coalesced 16-byte stores; lse is float32.
 * Forward on Hopper (fwd_bf16_wgmma2, the default where it applies: D = Dv in {64, 128},
 * 16-byte aligned tensors, L > 64, and the library compiled for sm_90a, e.g. make CUDA=1
 * CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90"):
 * the same algorithm with warpgroup MMA (wgmma), 128 query rows x 128-key tiles, and the softmax
 * of one tile overlapping P V of the previous one; described at the kernel. Built for plain
 * sm_90 (cuda.mk's default), fwd_bf16 runs every shape. Measured on an H100 (torch 2.11 in the
 * same run, bench/bench_cuda_attention.py): 8x16x4096x4096 forward 307 TFLOP/s at D=128 causal,
 * 258 at D=64 (fwd_bf16: 201 / 155).
 * Backward (bwd_bf16): one block of 4 warps per 64 keys of one (batch, kv head); warp w owns keys
 * 16w..16w+15 and accumulates their dK, dV in registers while the block walks the 64-row query
 * tiles of every query head of its group (GQA), with the next tile's Q and dO (double buffer)
 * arriving during the current one. Per tile: S^T = K Q^T, P^T = exp2(S^T - lse) from the
 * forward's lse, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q; dS^T goes
 * to shared memory and dQ (fp32, scratch) += dS K by vector atomics, warp w then owning 16 query
 * rows. delta_i = dO_i . O_i comes from a pre-pass (bf16_delta), dq = bf16(scale * dq_acc) from a
 * post-pass (bf16_dq_store).
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4g + t; A regs a0..a3 hold (row g, cols 2t..),
 * (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B regs b0, b1 hold (k 2t.., col g), (k 2t+8.., col g);
 * C holds (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). A C tile pair is therefore an A fragment
 * (P needs no trip through shared memory). Shared tiles are row-major with a row stride of DP+8
 * elements (16 bytes more than a row) so the 8 row addresses of one ldmatrix hit 8 different
 * 16-byte bank groups: no bank conflicts without a swizzle.
 *
 * Invariants (shared with the float32 kernels, sdpa_internal.h): key j is attendable for query i
 * iff j < S, i < L, not (causal and j > i) and the mask allows it (bool nonzero; float added,
 * -inf blocks); a row without attendable keys gives out = 0, lse = -inf and zero gradients.
 * DP (64 or 128) >= D, Dv; padding rows and columns are zero in shared memory (0 * garbage could
 * be NaN) and never stored. Inputs are bf16 bit patterns (uint16_t), everything accumulates in
 * float32. Not implemented here (QF_ERR_UNSUPPORTED, said by make_args): dropout, head dims above
 * 128, the optional weights output. Every launch and copy is queued on qf_cuda_stream(). */
#include "cuda_internal.h"

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int BM = 64;   /* query rows per tile */
constexpr int BN = 64;   /* keys per tile */
constexpr int NT = 128;  /* threads per block: 4 warps of 16 rows (forward) / keys (backward) */
constexpr int LDD = BM + 8; /* row stride of the dS^T tile [key][query] */
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Args {
    const uint16_t *q, *k, *v, *o, *dout;
    const float *lse_in, *delta;
    uint16_t *out, *dq, *dk, *dv;
    float *lse, *dq_acc;
    int64_t B, Hq, Hkv, L, S, D, Dv, group;
    float scale, scale_log2;
    int causal, mask_kind;
    int vec_q, vec_k, vec_v, vec_o, vec_do; /* 16-byte copies possible: columns % 8 == 0, aligned */
    const void *mask;
    int64_t ms_b, ms_h, ms_i, ms_j;
    /* element strides (batch, head, row) of q, k, v, out as fwd_bf16 reads them: the contiguous
     * [B, H, len, D] ones, or a strided problem's views (qf_sdpa_problem.strided: heads read in
     * place from packed projection rows, output written merged); the other kernels are contiguous */
    int64_t q_sb, q_sh, q_si, k_sb, k_sh, k_si, v_sb, v_sh, v_si, o_sb, o_sh, o_si;
};

/* ---- PTX helpers ---------------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared without registers; valid = false writes zeros and reads nothing */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
/* waits until at most N of this thread's committed groups are pending */
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}
/* c += a b (16x16 bf16 times 16x8 bf16, float32 accumulators) */
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* two floats -> bf16x2, round to nearest even; lo in the low half (the lower column) */
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
__device__ __forceinline__ float bf16_to_float(uint16_t u) { return __uint_as_float((uint32_t)u << 16); }
__device__ __forceinline__ uint16_t float_to_bf16(float x) {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    return *reinterpret_cast<uint16_t *>(&h);
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* The mask's term for (i, j) in log2 units: 0 / -inf for bool, value*log2(e) for float. */
__device__ __forceinline__ float mask_log2(const Args &a, int64_t base, int64_t i, int64_t j) {
    const int64_t at = base + i * a.ms_i + j * a.ms_j;
    if (a.mask_kind == QF_MASK_BOOL) return ((const uint8_t *)a.mask)[at] ? 0.0f : -INFINITY;
    return ((const float *)a.mask)[at] * LOG2E;
}

/* Rows [row0, row0+64) x cols [0, DP) of the row-major [nrows, ncols] bf16 matrix src (row stride
 * ld elements) into tile (row stride DP+8). vec: ncols % 8 == 0, ld % 8 == 0 and src 16-byte
 * aligned: asynchronous 16-byte copies
 * (cp.async; commit, wait and __syncthreads before use); else plain element copies (visible
 * after the next __syncthreads). Rows >= nrows and cols >= ncols become 0. */
template <int DP>
__device__ __forceinline__ void load_tile(uint16_t *tile, const uint16_t *src, int64_t row0, int64_t nrows,
                                          int64_t ncols, int vec, int64_t ld) {
    constexpr int LDS = DP + 8;
    if (vec) {
        constexpr int C8 = DP / 8;
#pragma unroll
        for (int idx = threadIdx.x; idx < 64 * C8; idx += NT) {
            const int r = idx / C8, c = (idx % C8) * 8;
            const bool ok = row0 + r < nrows && c < ncols;
            cp_async16(tile + r * LDS + c, ok ? src + (row0 + r) * ld + c : src, ok);
        }
    } else {
        for (int idx = threadIdx.x; idx < 64 * DP; idx += NT) {
            const int r = idx / DP, c = idx % DP;
            const bool ok = row0 + r < nrows && c < ncols;
            tile[r * LDS + c] = ok ? src[(row0 + r) * ld + c] : (uint16_t)0;
        }
    }
}

template <int DP>
constexpr size_t fwd_smem_bytes() { return sizeof(uint16_t) * (size_t)(3 * 64 * (DP + 8)); }
template <int DP>
constexpr size_t bwd_smem_bytes() {
    return sizeof(uint16_t) * (size_t)(6 * 64 * (DP + 8) + 64 * LDD) + sizeof(float) * 4 * 64;
}

/* ---- forward -------------------------------------------------------------------------------- */

/* out[b,h,rows] (bf16), lse[b,h,rows] (float, optional). grid (ceil(L/64), Hq, B), 128 threads.
 * ALL (few keys: every K and V tile fits in shared memory, kResidentTiles at most): every tile is
 * requested at once before the first product, so a block waits for memory once instead of once
 * per tile - what decides the time when each (batch, head) has a single query tile (the
 * Q-Former's 32 queries over 257 keys). */
template <int DP, bool ALL>
__global__ void __launch_bounds__(NT, 2) fwd_bf16(Args a) {
    constexpr int LDS = DP + 8, KT = DP / 16, NO = DP / 8, TILE = 64 * LDS;
    extern __shared__ uint4 smem_fwd[];
    const int64_t ntiles = (a.S + BN - 1) / BN; /* ALL: K tiles at Ks, V tiles after them */
    uint16_t *Qs = (uint16_t *)smem_fwd, *Ks = Qs + TILE, *Vs = Ks + (ALL ? ntiles : 1) * TILE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int64_t qb = a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x; /* heaviest first */
    const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / a.group, row0 = qb * BM;
    const int64_t bh = b * a.Hq + h;
    const uint16_t *q = a.q + b * a.q_sb + h * a.q_sh, *k = a.k + b * a.k_sb + hk * a.k_sh;
    const uint16_t *v = a.v + b * a.v_sb + hk * a.v_sh;
    const int64_t mbase = b * a.ms_b + h * a.ms_h;
    const int wrow = warp * 16;                     /* this warp's first row in the tile */
    const bool active = row0 + wrow < a.L;          /* any of its rows exists */

    int64_t nkb = (a.S + BN - 1) / BN;
    if (a.causal) {
        const int64_t last = (row0 + BM < a.L ? row0 + BM : a.L) - 1;
        if (last / BN + 1 < nkb) nkb = last / BN + 1;
    }
    load_tile<DP>(Qs, q, row0, a.L, a.D, a.vec_q, a.q_si);
    load_tile<DP>(Ks, k, 0, a.S, a.D, a.vec_k, a.k_si);
    if (ALL)
        for (int64_t kb = 0; kb < nkb; kb++) {
            if (kb) load_tile<DP>(Ks + kb * TILE, k, kb * BN, a.S, a.D, a.vec_k, a.k_si);
            load_tile<DP>(Vs + kb * TILE, v, kb * BN, a.S, a.Dv, a.vec_v, a.v_si);
        }
    cp_async_commit();

    uint32_t qf[KT][4];
    float o[NO][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    for (int64_t kb = 0; kb < nkb; kb++) {
        const int64_t col0 = kb * BN;
        cp_async_wait<0>();
        __syncthreads(); /* K tile kb (and Q) ready; every warp is done with V of kb-1 */
        if (kb == 0) {
#pragma unroll
            for (int kk = 0; kk < KT; kk++)
                ldsm4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                      Qs + (wrow + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + kk * 16 + 8 * (lane >> 4));
        }
        const uint16_t *Kt = ALL ? Ks + kb * TILE : Ks, *Vt = ALL ? Vs + kb * TILE : Vs;
        if (!ALL) {
            load_tile<DP>(Vs, v, col0, a.S, a.Dv, a.vec_v, a.v_si);
            cp_async_commit();
        }
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        if (active) {
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm4(b0, b1, b2, b3, Kt + (16 * np + (lane & 7) + 8 * (lane >> 4)) * LDS + kk * 16 + 8 * ((lane >> 3) & 1));
                    mma(s[2 * np], qf[kk], b0, b1);
                    mma(s[2 * np + 1], qf[kk], b2, b3);
                }
            }
        }
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] *= a.scale_log2;
        const bool edge = col0 + BN > a.S || row0 + BM > a.L || (a.causal && col0 + BN - 1 > row0) || a.mask_kind;
        if (edge) {
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int64_t qi = row0 + wrow + g + 8 * (e >> 1), kj = col0 + 8 * n + 2 * t + (e & 1);
                    if (kj >= a.S || qi >= a.L || (a.causal && kj > qi)) s[n][e] = -INFINITY;
                    else if (a.mask_kind) s[n][e] += mask_log2(a, mbase, qi, kj);
                }
        }
        /* online softmax: rows g (e = 0, 1) and g + 8 (e = 2, 3) */
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 8; n++) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[r], mx);
            const float base = mnew == -INFINITY ? 0.f : mnew; /* no key yet: keep exp2 finite */
            const float alpha = fast_exp2(m[r] - base);
            m[r] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
                s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
                sum += s[n][2 * r] + s[n][2 * r + 1];
            }
            l[r] = l[r] * alpha + sum; /* this lane's part of the row sum; reduced at the end */
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][2 * r] *= alpha;
                o[n][2 * r + 1] *= alpha;
            }
        }
        uint32_t pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        cp_async_wait<0>();
        __syncthreads(); /* V tile kb ready; every warp is done with K tile kb */
        if (!ALL && kb + 1 < nkb) {
            load_tile<DP>(Ks, k, col0 + BN, a.S, a.D, a.vec_k, a.k_si);
            cp_async_commit();
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
#pragma unroll
                for (int dp = 0; dp < NO / 2; dp++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm4t(b0, b1, b2, b3, Vt + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + 16 * dp + 8 * (lane >> 4));
                    mma(o[2 * dp], pa[kk], b0, b1);
                    mma(o[2 * dp + 1], pa[kk], b2, b3);
                }
            }
        }
    }
    /* epilogue: normalise, round to bf16 into this warp's own rows of Qs (its Q is in registers
     * since kb = 0, no other warp reads those rows), then coalesced stores */
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.f ? 1.f / sum : 0.f;
        const int64_t qi = row0 + wrow + g + 8 * r;
        if (a.lse && t == 0 && qi < a.L) a.lse[bh * a.L + qi] = sum > 0.f ? m[r] * LN2 + logf(sum) : -INFINITY;
    }
    if (!active) return;
    uint16_t *Os = Qs + wrow * LDS;
#pragma unroll
    for (int n = 0; n < NO; n++) {
        *(uint32_t *)(Os + g * LDS + 8 * n + 2 * t) = pack_bf16(o[n][0] * inv[0], o[n][1] * inv[0]);
        *(uint32_t *)(Os + (g + 8) * LDS + 8 * n + 2 * t) = pack_bf16(o[n][2] * inv[1], o[n][3] * inv[1]);
    }
    __syncwarp();
    uint16_t *out = a.out + b * a.o_sb + h * a.o_sh + (row0 + wrow) * a.o_si;
    const int64_t nrows = a.L - (row0 + wrow) < 16 ? a.L - (row0 + wrow) : 16;
    if (a.vec_o) {
        const int c8 = (int)(a.Dv / 8);
        for (int idx = lane; idx < nrows * c8; idx += 32) {
            const int r = idx / c8, c = (idx % c8) * 8;
            *(uint4 *)(out + r * a.o_si + c) = *(const uint4 *)(Os + r * LDS + c);
        }
    } else {
        for (int64_t idx = lane; idx < nrows * a.Dv; idx += 32) {
            const int64_t r = idx / a.Dv, c = idx % a.Dv;
            out[r * a.o_si + c] = Os[r * LDS + c];
        }
    }
}

/* ---- forward on Hopper warpgroup MMA (wgmma, sm_90a) ----------------------------------------
 * fwd_bf16_wgmma: one block of 2 warpgroups per 128 query rows (warpgroup w: rows 64w..64w+63,
 * warp j of it rows 16j..16j+15 of those), 128-key tiles. S = Q K^T is one chain of m64n128k16
 * wgmma per warpgroup with Q and K from shared memory; the online softmax runs on the
 * accumulators in registers (the wgmma accumulator layout is the mma.m16n8 C layout per warp, so
 * P becomes A fragments without shared memory) and O += P V is a chain of register-A wgmma with V
 * from shared memory (N-major). K and V tiles are double buffered: tile kb+1 streams in (cp.async)
 * while tile kb is computed. Shared tiles use the 128-byte swizzle wgmma reads: a tile of R rows
 * and D columns is D/64 blocks of R x 128 bytes; 16-byte chunk c of row r sits at chunk c ^ (r%8)
 * of its row (base 1024-byte aligned). Taken only for D = Dv in {64, 128}, 16-byte aligned
 * tensors and L > 64, and only when the library was compiled for sm_90a (wgmma does not exist in
 * plain sm_90 code; wgmma_built() asks the device once); otherwise fwd_bf16 above runs. */

/* wgmma wrappers: the accumulator registers are listed one by one (PTX takes no arrays). Only in
 * the sm_90a device pass (and the host pass), where fwd_bf16_wgmma's body uses them. */
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
/* d = A B (accumulate = 0) or d += A B: A [64 x 16], B [16 x 128] from shared memory, both K-major */
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
/* d += A B: A [64 x 16] bf16 in registers (per warp the mma.m16n8k16 A layout), B [16 x %d] from shared
 * memory, N-major (imm-trans-b = 1) */
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
/* d += A B: A [64 x 16] bf16 in registers (per warp the mma.m16n8k16 A layout), B [16 x %d] from shared
 * memory, N-major (imm-trans-b = 1) */
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
/* keeps the compiler from reading (or writing) accumulators across the asynchronous wgmma */
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
/* generic-proxy writes (cp.async, st.shared) made visible to wgmma's async proxy */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* shared memory matrix descriptor, 128-byte swizzle; byte offsets lbo (leading) and sbo (stride) */
__device__ __forceinline__ uint64_t gmma_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

#endif

constexpr int WM = 128; /* query rows per block: 2 warpgroups of 64 */
constexpr int WN = 128; /* keys per tile */
constexpr int WT = 256; /* threads per block */

/* Rows [row0, row0+ROWS) of the row-major [nrows, D] matrix src into the swizzled tile (layout
 * above) by cp.async; rows >= nrows become zeros. src is 16-byte aligned, D % 64 == 0. */
template <int D, int ROWS>
__device__ __forceinline__ void load_swizzled(uint8_t *tile, const uint16_t *src, int64_t row0, int64_t nrows) {
    constexpr int C = D / 8;
#pragma unroll 4
    for (int idx = threadIdx.x; idx < ROWS * C; idx += WT) {
        const int r = idx / C, c = idx % C;
        const bool ok = row0 + r < nrows;
        cp_async16(tile + (c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4),
                   ok ? src + (row0 + r) * D + c * 8 : src, ok);
    }
}

template <int D>
constexpr size_t wgmma_smem_bytes() { return 1024 + (size_t)(WM + 4 * WN) * D * 2; }

template <int D>
__global__ void __launch_bounds__(WT, 1) fwd_bf16_wgmma(Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NO = D / 2, TK = WN * D * 2, LDO = D + 8;
    extern __shared__ uint8_t smem_wg[];
    uint8_t *Qs = smem_wg + ((1024 - (smem_addr(smem_wg) & 1023)) & 1023);
    uint8_t *Ks = Qs + WM * D * 2, *Vs = Ks + 2 * TK; /* [2] tiles each */
    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wrow = wg * 64 + ((tid >> 5) & 3) * 16; /* this warp's first row in the tile */
    const int64_t qb = a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x; /* heaviest first */
    const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / a.group, row0 = qb * WM;
    const int64_t bh = b * a.Hq + h, bhk = b * a.Hkv + hk;
    const uint16_t *q = a.q + bh * a.L * D, *k = a.k + bhk * a.S * D, *v = a.v + bhk * a.S * D;
    const int64_t mbase = b * a.ms_b + h * a.ms_h;

    int64_t nkb = (a.S + WN - 1) / WN;
    if (a.causal) {
        const int64_t last = (row0 + WM < a.L ? row0 + WM : a.L) - 1;
        if (last / WN + 1 < nkb) nkb = last / WN + 1;
    }
    load_swizzled<D, WM>(Qs, q, row0, a.L);
    load_swizzled<D, WN>(Ks, k, 0, a.S);
    load_swizzled<D, WN>(Vs, v, 0, a.S);
    cp_async_commit();

    float o[NO], s[64], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 64; i++) s[i] = 0.f;
    const uint32_t q_addr = smem_addr(Qs) + wg * 64 * 128;

    for (int64_t kb = 0; kb < nkb; kb++) {
        const int64_t col0 = kb * WN;
        const int buf = (int)(kb & 1);
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads(); /* tile kb landed; both warpgroups are done with tile kb-1's buffers */
        if (kb + 1 < nkb) {
            load_swizzled<D, WN>(Ks + (buf ^ 1) * TK, k, col0 + WN, a.S);
            load_swizzled<D, WN>(Vs + (buf ^ 1) * TK, v, col0 + WN, a.S);
            cp_async_commit();
        }
        const uint32_t k_addr = smem_addr(Ks + buf * TK), v_addr = smem_addr(Vs + buf * TK);
        /* S = Q K^T: D/16 steps of k16; within a 64-column block a step moves 32 bytes */
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma_ss_n128(s, gmma_desc(q_addr + (kk >> 2) * WM * 128 + (kk & 3) * 32, 16, 1024),
                          gmma_desc(k_addr + (kk >> 2) * WN * 128 + (kk & 3) * 32, 16, 1024), kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        reg_fence(s);
        /* element 4i+e of s: row wrow + g + 8(e>>1), key col0 + 8i + 2t + (e&1) */
#pragma unroll
        for (int i = 0; i < 64; i++) s[i] *= a.scale_log2;
        const bool edge = col0 + WN > a.S || row0 + WM > a.L || (a.causal && col0 + WN - 1 > row0) || a.mask_kind;
        if (edge) {
#pragma unroll
            for (int i = 0; i < 16; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int64_t qi = row0 + wrow + g + 8 * (e >> 1), kj = col0 + 8 * i + 2 * t + (e & 1);
                    if (kj >= a.S || qi >= a.L || (a.causal && kj > qi)) s[4 * i + e] = -INFINITY;
                    else if (a.mask_kind) s[4 * i + e] += mask_log2(a, mbase, qi, kj);
                }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < 16; i++) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[r], mx);
            const float base = mnew == -INFINITY ? 0.f : mnew;
            const float alpha = fast_exp2(m[r] - base);
            m[r] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                s[4 * i + 2 * r] = fast_exp2(s[4 * i + 2 * r] - base);
                s[4 * i + 2 * r + 1] = fast_exp2(s[4 * i + 2 * r + 1] - base);
                sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
            }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                o[4 * j + 2 * r] *= alpha;
                o[4 * j + 2 * r + 1] *= alpha;
            }
        }
        uint32_t pa[8][4];
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
            pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
        }
        /* O += P V: 8 steps of 16 keys (2048 bytes each); N = D spans D/64 column blocks WN*128 apart */
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            if constexpr (D == 128) wgmma_rs_n128(o, pa[kk], gmma_desc(v_addr + kk * 2048, WN * 128, 1024));
            else wgmma_rs_n64(o, pa[kk], gmma_desc(v_addr + kk * 2048, WN * 128, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();
        reg_fence(o);
    }
    /* epilogue: lse; O normalised and rounded into a plain [128][D+8] staging tile over the K
     * buffers (after a barrier: the other warpgroup may still read them), then 16-byte stores */
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.f ? 1.f / sum : 0.f;
        const int64_t qi = row0 + wrow + g + 8 * r;
        if (a.lse && t == 0 && qi < a.L) a.lse[bh * a.L + qi] = sum > 0.f ? m[r] * LN2 + logf(sum) : -INFINITY;
    }
    __syncthreads();
    if (row0 + wrow >= a.L) return;
    uint16_t *Os = (uint16_t *)Ks + wrow * LDO;
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        *(uint32_t *)(Os + g * LDO + 8 * j + 2 * t) = pack_bf16(o[4 * j] * inv[0], o[4 * j + 1] * inv[0]);
        *(uint32_t *)(Os + (g + 8) * LDO + 8 * j + 2 * t) = pack_bf16(o[4 * j + 2] * inv[1], o[4 * j + 3] * inv[1]);
    }
    __syncwarp();
    uint16_t *out = a.out + (bh * a.L + row0 + wrow) * D;
    const int nrows = (int)(a.L - (row0 + wrow) < 16 ? a.L - (row0 + wrow) : 16);
    for (int idx = lane; idx < nrows * (D / 8); idx += 32) {
        const int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
        *(uint4 *)(out + r * D + c) = *(const uint4 *)(Os + r * LDO + c);
    }
#endif
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int N>
__device__ __forceinline__ void reg_fence_u(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) asm volatile("" : "+r"(r[i][j])::"memory");
}

/* Online softmax of one 128-key tile for fwd_bf16_wgmma2: s holds raw scores q.k of rows
 * qrow = row0 + wrow + g (e = 0, 1) and qrow + 8 (e = 2, 3), keys col0 + 8i + 2t + (e & 1) at
 * s[4i + e]. On return s holds p = exp2(score * scale * log2(e) - m_new) in float32, m and l are
 * updated and alpha[r] = exp2(m_old - m_new) rescales the running output. Interior tiles fold the
 * scale into one FFMA per element (max commutes with a positive scale); tiles at an edge (tails,
 * causal diagonal, masks, scale <= 0) scale and mask first. */
__device__ __forceinline__ void wg_softmax(const Args &a, float (&s)[64], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                           int64_t row0, int64_t qrow, int64_t col0, int t, int64_t mbase) {
    float mul = a.scale_log2;
    const bool edge = col0 + WN > a.S || row0 + WM > a.L || (a.causal && col0 + WN - 1 > row0) || a.mask_kind ||
                      !(mul > 0.f);
    if (edge) {
        const int64_t kvalid = a.S - col0; /* keys kc < kvalid exist */
        const int kmax = kvalid > WN ? WN : (int)kvalid;
        int qrel[2];
        bool rok[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t qi = qrow + 8 * r, d = qi - col0; /* causal: key kc visible iff kc <= d */
            rok[r] = qi < a.L;
            qrel[r] = d > WN ? WN : d < -1 ? -1 : (int)d;
        }
#pragma unroll
        for (int i = 0; i < 16; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int kc = 8 * i + 2 * t + (e & 1), r = e >> 1;
                const bool ok = kc < kmax && rok[r] && !(a.causal && kc > qrel[r]);
                float x = s[4 * i + e] * mul;
                if (ok && a.mask_kind) x += mask_log2(a, mbase, qrow + 8 * r, col0 + kc);
                s[4 * i + e] = ok ? x : -INFINITY;
            }
        mul = 1.f;
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < 16; i++) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(m[r], mx * mul);
        const float base = mnew == -INFINITY ? 0.f : mnew; /* no key yet: keep exp2 finite */
        alpha[r] = fast_exp2(m[r] - base);
        m[r] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            s[4 * i + 2 * r] = fast_exp2(fmaf(s[4 * i + 2 * r], mul, -base));
            s[4 * i + 2 * r + 1] = fast_exp2(fmaf(s[4 * i + 2 * r + 1], mul, -base));
            sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
        }
        l[r] = l[r] * alpha[r] + sum;
    }
}

/* O += P V over one 128-key tile: 8 register-A wgmma of 16 keys (2048 bytes of V each); N = D
 * spans D/64 column blocks WN*128 bytes apart (the descriptor's leading byte offset) */
template <int D>
__device__ __forceinline__ void pv_chain(float (&o)[D / 2], const uint32_t (&pa)[8][4], uint32_t v_addr) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
        if constexpr (D == 128) wgmma_rs_n128(o, pa[kk], gmma_desc(v_addr + kk * 2048, WN * 128, 1024));
        else wgmma_rs_n64(o, pa[kk], gmma_desc(v_addr + kk * 2048, WN * 128, 1024));
    }
}

__device__ __forceinline__ void pack_p(const float (&s)[64], uint32_t (&pa)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
        pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

#endif

/* fwd_bf16_wgmma with the softmax of tile kb+1 overlapping P V of tile kb (FlashAttention-3's
 * intra-warpgroup pipelining): per iteration the warpgroup issues S = Q K_{kb+1}^T, then
 * O += P_kb V_kb, waits for S only, runs the softmax while P V runs on the tensor cores, then
 * waits for P V, rescales O and packs P_{kb+1}. P_kb's registers stay untouched until that wait
 * (reg_fence_u keeps the compiler from reusing them). Buffers: K_i and V_i in slot i % 2; at the
 * top of iteration kb, K_{kb+1} and V_kb have landed and K_{kb+2}, V_{kb+1} start streaming into
 * the slots that K_kb and V_{kb-1} (both consumed in iteration kb-1) leave. Same layouts, limits
 * and results as fwd_bf16_wgmma. */
template <int D>
__global__ void __launch_bounds__(WT, 1) fwd_bf16_wgmma2(Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NO = D / 2, TK = WN * D * 2, LDO = D + 8;
    extern __shared__ uint8_t smem_wg2[];
    uint8_t *Qs = smem_wg2 + ((1024 - (smem_addr(smem_wg2) & 1023)) & 1023);
    uint8_t *Ks = Qs + WM * D * 2, *Vs = Ks + 2 * TK;
    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wrow = wg * 64 + ((tid >> 5) & 3) * 16;
    const int64_t qb = a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / a.group, row0 = qb * WM;
    const int64_t bh = b * a.Hq + h, bhk = b * a.Hkv + hk;
    const uint16_t *q = a.q + bh * a.L * D, *k = a.k + bhk * a.S * D, *v = a.v + bhk * a.S * D;
    const int64_t mbase = b * a.ms_b + h * a.ms_h, qrow = row0 + wrow + g;

    int64_t nkb = (a.S + WN - 1) / WN;
    if (a.causal) {
        const int64_t last = (row0 + WM < a.L ? row0 + WM : a.L) - 1;
        if (last / WN + 1 < nkb) nkb = last / WN + 1;
    }
    load_swizzled<D, WM>(Qs, q, row0, a.L);
    load_swizzled<D, WN>(Ks, k, 0, a.S);
    cp_async_commit(); /* Q, K_0 */
    load_swizzled<D, WN>(Vs, v, 0, a.S);
    if (nkb > 1) load_swizzled<D, WN>(Ks + TK, k, WN, a.S);
    cp_async_commit(); /* V_0, K_1 */

    float o[NO], s[64], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2];
    uint32_t pa[8][4];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 64; i++) s[i] = 0.f;
    const uint32_t q_addr = smem_addr(Qs) + wg * 64 * 128;

    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads(); /* Q and K_0 landed */
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        wgmma_ss_n128(s, gmma_desc(q_addr + (kk >> 2) * WM * 128 + (kk & 3) * 32, 16, 1024),
                      gmma_desc(smem_addr(Ks) + (kk >> 2) * WN * 128 + (kk & 3) * 32, 16, 1024), kk > 0);
    wgmma_commit();
    wgmma_wait_all();
    reg_fence(s);
    wg_softmax(a, s, m, l, alpha, row0, qrow, 0, t, mbase);
    pack_p(s, pa);

    /* every iteration but the last: S of tile kb+1 and P V of tile kb in flight together (no
     * branch around a wgmma: ptxas would serialise them) */
    for (int64_t kb = 0; kb + 1 < nkb; kb++) {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads(); /* V_kb and K_{kb+1} landed; iteration kb-1 is done everywhere */
        if (kb + 2 < nkb) load_swizzled<D, WN>(Ks + (int)(kb & 1) * TK, k, (kb + 2) * WN, a.S);
        load_swizzled<D, WN>(Vs + (int)((kb + 1) & 1) * TK, v, (kb + 1) * WN, a.S);
        cp_async_commit();
        const uint32_t k_addr = smem_addr(Ks + (int)((kb + 1) & 1) * TK), v_addr = smem_addr(Vs + (int)(kb & 1) * TK);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma_ss_n128(s, gmma_desc(q_addr + (kk >> 2) * WM * 128 + (kk & 3) * 32, 16, 1024),
                          gmma_desc(k_addr + (kk >> 2) * WN * 128 + (kk & 3) * 32, 16, 1024), kk > 0);
        wgmma_commit();
        pv_chain<D>(o, pa, v_addr);
        wgmma_commit();
        wgmma_wait_one();
        reg_fence(s);
        wg_softmax(a, s, m, l, alpha, row0, qrow, (kb + 1) * WN, t, mbase);
        wgmma_wait_all();
        reg_fence(o);
        reg_fence_u(pa);
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[4 * j] *= alpha[0];
            o[4 * j + 1] *= alpha[0];
            o[4 * j + 2] *= alpha[1];
            o[4 * j + 3] *= alpha[1];
        }
        pack_p(s, pa);
    }
    /* the last tile: P V only */
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    wgmma_fence();
    pv_chain<D>(o, pa, smem_addr(Vs + (int)((nkb - 1) & 1) * TK));
    wgmma_commit();
    wgmma_wait_all();
    reg_fence(o);
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.f ? 1.f / sum : 0.f;
        const int64_t qi = qrow + 8 * r;
        if (a.lse && t == 0 && qi < a.L) a.lse[bh * a.L + qi] = sum > 0.f ? m[r] * LN2 + logf(sum) : -INFINITY;
    }
    __syncthreads(); /* no warpgroup reads the K buffers any more: they become the staging tile */
    if (row0 + wrow >= a.L) return;
    uint16_t *Os = (uint16_t *)Ks + wrow * LDO;
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        *(uint32_t *)(Os + g * LDO + 8 * j + 2 * t) = pack_bf16(o[4 * j] * inv[0], o[4 * j + 1] * inv[0]);
        *(uint32_t *)(Os + (g + 8) * LDO + 8 * j + 2 * t) = pack_bf16(o[4 * j + 2] * inv[1], o[4 * j + 3] * inv[1]);
    }
    __syncwarp();
    uint16_t *out = a.out + (bh * a.L + row0 + wrow) * D;
    const int nrows = (int)(a.L - (row0 + wrow) < 16 ? a.L - (row0 + wrow) : 16);
    for (int idx = lane; idx < nrows * (D / 8); idx += 32) {
        const int r = idx / (D / 8), c = (idx % (D / 8)) * 8;
        *(uint4 *)(out + r * D + c) = *(const uint4 *)(Os + r * LDO + c);
    }
#endif
}

/* writes 1 when this code was compiled for sm_90a (wgmma available), else 0 */
__global__ void wgmma_probe(int *flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    *flag = 1;
#else
    *flag = 0;
#endif
}

/* ---- backward ------------------------------------------------------------------------------- */

/* delta[r] = sum_d float(dout[r,d]) * float(o[r,d]), one warp per row r of B*Hq*L. */
__global__ void bf16_delta(const uint16_t *dout, const uint16_t *o, float *delta, int64_t rows, int64_t Dv) {
    const int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float acc = 0.f;
    for (int64_t d = lane; d < Dv; d += 32) acc += bf16_to_float(dout[r * Dv + d]) * bf16_to_float(o[r * Dv + d]);
#pragma unroll
    for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[r] = acc;
}

/* dq[i] = bf16(scale * dq_acc[i]) */
__global__ void bf16_dq_store(const float *acc, uint16_t *dq, int64_t n, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dq[i] = float_to_bf16(acc[i] * scale);
}

/* dk, dv of keys [64 kb, 64 kb + 64) of (b, kv head hk), dq_acc += this block's share.
 * grid (ceil(S/64), Hkv, B), 128 threads. */
template <int DP>
__global__ void __launch_bounds__(NT, 2) bwd_bf16(Args a) {
    constexpr int LDS = DP + 8, KT = DP / 16, NO = DP / 8, TILE = 64 * LDS;
    extern __shared__ uint4 smem_bwd[];
    uint16_t *Ks = (uint16_t *)smem_bwd, *Vs = Ks + TILE;
    uint16_t *Qb = Vs + TILE;        /* Q tiles, double buffered: Qb + buf * TILE */
    uint16_t *Ob = Qb + 2 * TILE;    /* dO tiles, double buffered */
    uint16_t *dSs = Ob + 2 * TILE;   /* dS^T [key][query], row stride LDD */
    float *lse2s = (float *)(dSs + 64 * LDD); /* [2][64]: lse * log2(e), +inf for rows without keys */
    float *dels = lse2s + 2 * 64;             /* [2][64]: delta */
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int64_t hk = blockIdx.y, b = blockIdx.z, col0 = (int64_t)blockIdx.x * BN;
    const int64_t bhk = b * a.Hkv + hk;
    const int wk = warp * 16; /* this warp's first key in the tile (and first query row for dQ) */

    load_tile<DP>(Ks, a.k + bhk * a.S * a.D, col0, a.S, a.D, a.vec_k, a.D);
    load_tile<DP>(Vs, a.v + bhk * a.S * a.Dv, col0, a.S, a.Dv, a.vec_v, a.Dv);

    const int64_t nqb = (a.L + BM - 1) / BM;
    const int64_t qb0 = a.causal ? col0 / BM : 0; /* earlier query tiles cannot see these keys */
    const int64_t per = nqb > qb0 ? nqb - qb0 : 0, niter = per * a.group;

    /* queue the Q, dO tiles and lse, delta of iteration it into buffer it & 1 */
    auto issue = [&](int64_t it) {
        const int64_t h = hk * a.group + it / per, row0 = (qb0 + it % per) * BM, bh = b * a.Hq + h;
        const int buf = (int)(it & 1);
        load_tile<DP>(Qb + buf * TILE, a.q + bh * a.L * a.D, row0, a.L, a.D, a.vec_q, a.D);
        load_tile<DP>(Ob + buf * TILE, a.dout + bh * a.L * a.Dv, row0, a.L, a.Dv, a.vec_do, a.Dv);
        if (tid < BM) {
            const int64_t qi = row0 + tid;
            const float ls = qi < a.L ? a.lse_in[bh * a.L + qi] : -INFINITY;
            lse2s[buf * 64 + tid] = ls == -INFINITY ? INFINITY : ls * LOG2E; /* +inf: P = 0 */
            dels[buf * 64 + tid] = qi < a.L ? a.delta[bh * a.L + qi] : 0.f;
        }
    };
    if (niter > 0) issue(0);
    cp_async_commit(); /* group 0: K, V and the first Q, dO */

    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;

    for (int64_t it = 0; it < niter; it++) {
        const int64_t h = hk * a.group + it / per, row0 = (qb0 + it % per) * BM, bh = b * a.Hq + h;
        const int64_t mbase = b * a.ms_b + h * a.ms_h;
        const int buf = (int)(it & 1);
        const uint16_t *Qs = Qb + buf * TILE, *Os = Ob + buf * TILE;
        const float *lse2 = lse2s + buf * 64, *del = dels + buf * 64;
        __syncthreads(); /* every warp is done with buffer buf ^ 1 (iteration it - 1) and dSs */
        if (it + 1 < niter) {
            issue(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* iteration it's tiles are visible */

        /* S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries */
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            uint32_t ka[4], va[4];
            ldsm4(ka[0], ka[1], ka[2], ka[3], Ks + (wk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + kk * 16 + 8 * (lane >> 4));
            ldsm4(va[0], va[1], va[2], va[3], Vs + (wk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + kk * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int np = 0; np < 4; np++) {
                const int off = (16 * np + (lane & 7) + 8 * (lane >> 4)) * LDS + kk * 16 + 8 * ((lane >> 3) & 1);
                uint32_t b0, b1, b2, b3;
                ldsm4(b0, b1, b2, b3, Qs + off);
                mma(st[2 * np], ka, b0, b1);
                mma(st[2 * np + 1], ka, b2, b3);
                ldsm4(b0, b1, b2, b3, Os + off);
                mma(dpt[2 * np], va, b0, b1);
                mma(dpt[2 * np + 1], va, b2, b3);
            }
        }
        /* P^T = exp2(scale_log2 s + mask - lse2), dS^T = P^T (dP^T - delta); element (n, e) is key
         * wk + g + 8 (e >> 1), query 8 n + 2 t + (e & 1) */
        const bool edge = col0 + BN > a.S || row0 + BM > a.L || (a.causal && col0 + BN - 1 > row0) || a.mask_kind;
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qc = 8 * n + 2 * t + (e & 1);
                float x = st[n][e] * a.scale_log2;
                bool ok = true;
                if (edge) {
                    const int64_t kj = col0 + wk + g + 8 * (e >> 1), qi = row0 + qc;
                    ok = kj < a.S && qi < a.L && !(a.causal && kj > qi);
                    if (ok && a.mask_kind) x += mask_log2(a, mbase, qi, kj);
                }
                const float p = ok ? fast_exp2(x - lse2[qc]) : 0.f;
                st[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - del[qc]);
            }
        uint32_t pa[4][4], sa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            pa[kk][0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
            pa[kk][1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
            pa[kk][2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
            sa[kk][0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
            sa[kk][1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
            sa[kk][2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            sa[kk][3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
        }
        /* dS^T to shared memory for dQ (bf16, the same rounding the dK product uses) */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            *(uint32_t *)(dSs + (wk + g) * LDD + 16 * kk + 2 * t) = sa[kk][0];
            *(uint32_t *)(dSs + (wk + g + 8) * LDD + 16 * kk + 2 * t) = sa[kk][1];
            *(uint32_t *)(dSs + (wk + g) * LDD + 16 * kk + 8 + 2 * t) = sa[kk][2];
            *(uint32_t *)(dSs + (wk + g + 8) * LDD + 16 * kk + 8 + 2 * t) = sa[kk][3];
        }
        /* dV += P^T dO, dK += dS^T Q (B operands [query][d] by ldmatrix.trans) */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int dp = 0; dp < NO / 2; dp++) {
                const int off = (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + 16 * dp + 8 * (lane >> 4);
                uint32_t b0, b1, b2, b3;
                ldsm4t(b0, b1, b2, b3, Os + off);
                mma(dv[2 * dp], pa[kk], b0, b1);
                mma(dv[2 * dp + 1], pa[kk], b2, b3);
                ldsm4t(b0, b1, b2, b3, Qs + off);
                mma(dk[2 * dp], sa[kk], b0, b1);
                mma(dk[2 * dp + 1], sa[kk], b2, b3);
            }
        }
        __syncthreads(); /* dS^T complete */
        /* dQ rows wk..wk+15 of this tile += dS K, 64 columns of d at a time; A = dS from dS^T by
         * ldmatrix.trans, B = K [key][d] by ldmatrix.trans */
        if (row0 + wk < a.L) {
            float *dqa = a.dq_acc + (bh * a.L + row0 + wk) * a.D;
#pragma unroll
            for (int dc = 0; dc < DP / 64; dc++) {
                float acc[8][4];
#pragma unroll
                for (int n = 0; n < 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    uint32_t da[4];
                    ldsm4t(da[0], da[1], da[2], da[3], dSs + (16 * kk + (lane & 7) + 8 * (lane >> 4)) * LDD + wk + 8 * ((lane >> 3) & 1));
#pragma unroll
                    for (int dp = 0; dp < 4; dp++) {
                        uint32_t b0, b1, b2, b3;
                        ldsm4t(b0, b1, b2, b3, Ks + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + 64 * dc + 16 * dp + 8 * (lane >> 4));
                        mma(acc[2 * dp], da, b0, b1);
                        mma(acc[2 * dp + 1], da, b2, b3);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int64_t qr = g + 8 * r;
                    if (row0 + wk + qr >= a.L) continue;
#pragma unroll
                    for (int n = 0; n < 8; n++) {
                        const int64_t d = 64 * dc + 8 * n + 2 * t;
                        float *dst = dqa + qr * a.D + d;
                        if (d + 1 < a.D && !(a.D & 1)) {
                            atomicAdd((float2 *)dst, make_float2(acc[n][2 * r], acc[n][2 * r + 1]));
                        } else {
                            if (d < a.D) atomicAdd(dst, acc[n][2 * r]);
                            if (d + 1 < a.D) atomicAdd(dst + 1, acc[n][2 * r + 1]);
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>(); /* K/V copies are still pending when no query tile could see these keys */
    /* dk = scale dS^T Q, dv = P^T dO for keys wk + g (+8) */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int64_t kj = col0 + wk + g + 8 * r;
        if (kj >= a.S) continue;
        uint16_t *dkr = a.dk + (bhk * a.S + kj) * a.D, *dvr = a.dv + (bhk * a.S + kj) * a.Dv;
#pragma unroll
        for (int n = 0; n < NO; n++) {
            const int64_t d = 8 * n + 2 * t;
            if (d < a.D) dkr[d] = float_to_bf16(dk[n][2 * r] * a.scale);
            if (d + 1 < a.D) dkr[d + 1] = float_to_bf16(dk[n][2 * r + 1] * a.scale);
            if (d < a.Dv) dvr[d] = float_to_bf16(dv[n][2 * r]);
            if (d + 1 < a.Dv) dvr[d + 1] = float_to_bf16(dv[n][2 * r + 1]);
        }
    }
}

/* ---- NaN/Inf screen of bf16 tensors --------------------------------------------------------- */

__global__ void bf16_find_nonfinite(const uint16_t *x, size_t n, unsigned long long *first) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if ((x[i] & 0x7f80u) == 0x7f80u) atomicMin(first, (unsigned long long)i);
}

/* ---- host side ------------------------------------------------------------------------------ */

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Shared setup of both directions; QF_ERR_UNSUPPORTED for what these kernels do not cover. */
qf_status make_args(const char *fn, const qf_sdpa_problem *pr, Args *a, int *dp) {
    if (pr->dropout_p > 0.0f)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: dropout_p = %g is not implemented for bfloat16 (only dropout_p = 0; "
                       "the float32 CPU path has dropout)", fn, (double)pr->dropout_p);
    const int64_t dmax = pr->D > pr->Dv ? pr->D : pr->Dv;
    if (dmax > 128)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: head dim D = %lld / Dv = %lld: the bfloat16 kernels take at most 128",
                       fn, (long long)pr->D, (long long)pr->Dv);
    if (pr->B > 65535 || pr->Hq > 65535 || (pr->L + BM - 1) / BM > 0x7fffffff || (pr->S + BN - 1) / BN > 0x7fffffff)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: B = %lld or Hq = %lld exceeds the CUDA grid's 65535", fn,
                       (long long)pr->B, (long long)pr->Hq);
    *dp = dmax <= 64 ? 64 : 128;
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

/* every stride a multiple of 8 elements (16 bytes): each row of a view starts 16-byte aligned
 * when its base pointer is */
bool strides8(int64_t sb, int64_t sh, int64_t si) { return sb % 8 == 0 && sh % 8 == 0 && si % 8 == 0; }

/* fwd_bf16 with every K/V tile resident (ALL) when the keys fit in kResidentTiles tiles (8 x 64
 * keys at D <= 64: 157 KB of shared memory; 4 at D <= 128, the same bytes) and there is a single
 * query tile (each block would otherwise fetch the same keys again per query tile) */
template <int DP>
constexpr int resident_tiles() { return DP == 64 ? 8 : 4; }

template <int DP>
qf_status launch_fwd(const Args &a) {
    static bool attr_set[2] = {false, false}; /* idempotent, so a race between threads is harmless */
    constexpr int kResidentTiles = resident_tiles<DP>();
    const int64_t ntiles = (a.S + BN - 1) / BN;
    const bool all = ntiles <= kResidentTiles && a.L <= BM;
    const size_t tile = sizeof(uint16_t) * 64 * (DP + 8);
    const size_t smem = all ? tile * (1 + 2 * (size_t)ntiles) : fwd_smem_bytes<DP>();
    auto kernel = all ? fwd_bf16<DP, true> : fwd_bf16<DP, false>;
    if (!attr_set[all]) {
        const size_t most = all ? tile * (1 + 2 * kResidentTiles) : smem;
        QF_TRY(qf_cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)most),
                             "sdpa bf16 forward: cudaFuncSetAttribute"));
        attr_set[all] = true;
    }
    dim3 grid((unsigned)((a.L + BM - 1) / BM), (unsigned)a.Hq, (unsigned)a.B);
    kernel<<<grid, NT, smem, qf_cuda_stream()>>>(a);
    return qf_cuda_launched("fwd_bf16");
}

template <int D, int V>
qf_status launch_fwd_wgmma(const Args &a) {
    static bool attr_set = false;
    const size_t smem = wgmma_smem_bytes<D>();
    auto kernel = V == 1 ? fwd_bf16_wgmma<D> : fwd_bf16_wgmma2<D>;
    if (!attr_set) {
        QF_TRY(qf_cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                             "sdpa bf16 forward (wgmma): cudaFuncSetAttribute"));
        attr_set = true;
    }
    dim3 grid((unsigned)((a.L + WM - 1) / WM), (unsigned)a.Hq, (unsigned)a.B);
    kernel<<<grid, WT, smem, qf_cuda_stream()>>>(a);
    return qf_cuda_launched(V == 1 ? "fwd_bf16_wgmma" : "fwd_bf16_wgmma2");
}

/* Which forward kernel runs the wgmma-eligible shapes: 2 (fwd_bf16_wgmma2) when the wgmma kernels
 * were compiled for this device (the library built for sm_90a and running on it), asked once with
 * a probe kernel; 0 (the mma.sync kernel) otherwise, and 0 without asking while the stream is
 * being captured (a probe would have to wait). QFUSE_SDPA_BF16_KERNEL=mma forces 0, =wgmma1 picks
 * fwd_bf16_wgmma (no overlap), for comparisons. */
int wgmma_built() {
    static int known = -1; /* a race only repeats the probe */
    if (known >= 0) return known;
    const char *env = getenv("QFUSE_SDPA_BF16_KERNEL");
    if (env && strcmp(env, "mma") == 0) return known = 0;
    const int version = env && strcmp(env, "wgmma1") == 0 ? 1 : 2;
    cudaStream_t st = qf_cuda_stream();
    cudaStreamCaptureStatus cap;
    if (cudaStreamIsCapturing(st, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) {
        (void)cudaGetLastError();
        return 0;
    }
    void *buf;
    if (qf_cuda_scratch(QF_CUDA_SCRATCH_SCREEN, sizeof(int), &buf) != QF_OK) return 0;
    int flag = 0;
    wgmma_probe<<<1, 1, 0, st>>>((int *)buf);
    if (cudaGetLastError() != cudaSuccess || cudaMemcpyAsync(&flag, buf, sizeof flag, cudaMemcpyDeviceToHost, st) != cudaSuccess ||
        cudaStreamSynchronize(st) != cudaSuccess) {
        (void)cudaGetLastError();
        flag = 0;
    }
    return known = flag ? version : 0;
}

template <int DP>
qf_status launch_bwd(const Args &a) {
    static bool attr_set = false;
    const size_t smem = bwd_smem_bytes<DP>();
    if (!attr_set) {
        QF_TRY(qf_cuda_check(cudaFuncSetAttribute(bwd_bf16<DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                             "sdpa bf16 backward: cudaFuncSetAttribute"));
        attr_set = true;
    }
    dim3 grid((unsigned)((a.S + BN - 1) / BN), (unsigned)a.Hkv, (unsigned)a.B);
    bwd_bf16<DP><<<grid, NT, smem, qf_cuda_stream()>>>(a);
    return qf_cuda_launched("bwd_bf16");
}

} // namespace

qf_status qf_cuda_sdpa_forward_bf16(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k,
                                    const uint16_t *v, uint16_t *out, float *lse) {
    Args a;
    int dp;
    QF_TRY(make_args("sdpa_forward_bf16 (cuda)", pr, &a, &dp));
    a.q = q; a.k = k; a.v = v; a.out = out; a.lse = lse;
    a.vec_q = pr->D % 8 == 0 && aligned16(q) && strides8(a.q_sb, a.q_sh, a.q_si);
    a.vec_k = pr->D % 8 == 0 && aligned16(k) && strides8(a.k_sb, a.k_sh, a.k_si);
    a.vec_v = pr->Dv % 8 == 0 && aligned16(v) && strides8(a.v_sb, a.v_sh, a.v_si);
    a.vec_o = pr->Dv % 8 == 0 && aligned16(out) && strides8(a.o_sb, a.o_sh, a.o_si);
    if (!pr->strided && pr->D == pr->Dv && (pr->D == 64 || pr->D == 128) && a.vec_q && a.vec_k && a.vec_v && a.vec_o && pr->L > 64 &&
        wgmma_built()) {
        if (wgmma_built() == 1) return pr->D == 64 ? launch_fwd_wgmma<64, 1>(a) : launch_fwd_wgmma<128, 1>(a);
        return pr->D == 64 ? launch_fwd_wgmma<64, 2>(a) : launch_fwd_wgmma<128, 2>(a);
    }
    return dp == 64 ? launch_fwd<64>(a) : launch_fwd<128>(a);
}

qf_status qf_cuda_sdpa_backward_bf16(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k,
                                     const uint16_t *v, const uint16_t *out, const float *lse,
                                     const uint16_t *grad_out, uint16_t *dq, uint16_t *dk, uint16_t *dv) {
    Args a;
    int dp;
    if (pr->strided) return qf_fail(QF_ERR_INTERNAL, "sdpa_backward_bf16 (cuda): strided tensors are forward-only");
    QF_TRY(make_args("sdpa_backward_bf16 (cuda)", pr, &a, &dp));
    a.q = q; a.k = k; a.v = v; a.o = out; a.lse_in = lse; a.dout = grad_out;
    a.dq = dq; a.dk = dk; a.dv = dv;
    a.vec_q = pr->D % 8 == 0 && aligned16(q);
    a.vec_k = pr->D % 8 == 0 && aligned16(k);
    a.vec_v = pr->Dv % 8 == 0 && aligned16(v);
    a.vec_do = pr->Dv % 8 == 0 && aligned16(grad_out);
    const int64_t rows = pr->B * pr->Hq * pr->L;
    /* one scratch buffer: delta [rows] floats, then the float32 dQ accumulator [rows, D] at a
     * 256-byte boundary (float2 atomics need 8-byte alignment) */
    const size_t delta_bytes = ((sizeof(float) * (size_t)rows + 255) / 256) * 256;
    const size_t acc_bytes = sizeof(float) * (size_t)rows * (size_t)pr->D;
    void *buf;
    QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_DELTA, delta_bytes + acc_bytes, &buf));
    float *delta = (float *)buf, *acc = (float *)((char *)buf + delta_bytes);
    a.delta = delta;
    a.dq_acc = acc;
    cudaStream_t st = qf_cuda_stream();
    bf16_delta<<<(unsigned)((rows * 32 + 255) / 256), 256, 0, st>>>(grad_out, out, delta, rows, pr->Dv);
    QF_TRY(qf_cuda_launched("bf16_delta"));
    QF_TRY(qf_cuda_check(cudaMemsetAsync(acc, 0, acc_bytes, st), "sdpa bf16 backward: zeroing dq"));
    QF_TRY(dp == 64 ? launch_bwd<64>(a) : launch_bwd<128>(a));
    const int64_t n = rows * pr->D;
    int64_t blocks = (n + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    bf16_dq_store<<<(unsigned)blocks, 256, 0, st>>>(acc, dq, n, pr->scale);
    return qf_cuda_launched("bf16_dq_store");
}

qf_status qf_cuda_find_nonfinite_bf16(const uint16_t *x, size_t n, size_t *index, float *value) {
    *index = n;
    *value = 0.0f;
    if (n == 0) return QF_OK;
    void *buf;
    QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_SCREEN, sizeof(unsigned long long), &buf));
    unsigned long long *first = (unsigned long long *)buf, host = ~0ull;
    cudaStream_t st = qf_cuda_stream();
    QF_TRY(qf_cuda_check(cudaMemsetAsync(first, 0xff, sizeof host, st), "bf16 nan screen: cudaMemsetAsync"));
    size_t blocks = (n + 255) / 256;
    if (blocks > 4096) blocks = 4096;
    bf16_find_nonfinite<<<(unsigned)blocks, 256, 0, st>>>(x, n, first);
    QF_TRY(qf_cuda_launched("bf16_find_nonfinite"));
    QF_TRY(qf_cuda_check(cudaMemcpyAsync(&host, first, sizeof host, cudaMemcpyDeviceToHost, st),
                         "bf16 nan screen: cudaMemcpyAsync"));
    QF_TRY(qf_cuda_check(cudaStreamSynchronize(st), "bf16 nan screen: cudaStreamSynchronize"));
    if (host < n) {
        uint16_t u = 0;
        *index = (size_t)host;
        QF_TRY(qf_cuda_check(cudaMemcpyAsync(&u, x + host, sizeof u, cudaMemcpyDeviceToHost, st),
                             "bf16 nan screen: cudaMemcpyAsync"));
        QF_TRY(qf_cuda_check(cudaStreamSynchronize(st), "bf16 nan screen: cudaStreamSynchronize"));
        const uint32_t bits = (uint32_t)u << 16;
        memcpy(value, &bits, sizeof bits);
    }
    return QF_OK;
}
