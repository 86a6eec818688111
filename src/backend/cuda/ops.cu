/* ops.cu - the CUDA backend's model ops (backend.h): gemm_nt on cuBLAS, and the kernels of
 * layer norm, GELU, add, periodic add, embedding, head split/merge, 2-D copies, the dead-row mean and the
 * NaN/Inf screen. qformer.c calls them through the table; qf_linear_forward, qf_layernorm_forward,
 * qf_gelu_forward and qf_residual_forward reach them for tensors in GPU memory.
 *
 * Invariants:
 *   - Arguments are validated by the callers (the public ops or the model); these functions only
 *     queue work on qf_cuda_stream() and never synchronise, so a sequence of them can be captured
 *     as a CUDA graph. The only allocations are gemm_nt's bf16 copy of a float32 x (scratch slot
 *     QF_CUDA_SCRATCH_GEMM_X16) and its float32 product for a bf16 out when cuBLASLt has no
 *     algorithm (QF_CUDA_SCRATCH_GEMM_OUT32), grow-only, refused while a capture is open.
 *   - bf16 activations (the _x16 entries, gemm_nt's x_bf16 / out_bf16): values are rounded to
 *     nearest even once, where they are produced; every sum stays float32.
 *   - Numerics follow the CPU backend: layer norm in float32 with a two-pass variance (tree
 *     reduction over the row), GELU with erfcf / the exp form of tanh (cpu: gelu.c), the dead-row
 *     mean summed in double in key order (bit-identical to cpu.c), float32 products without TF32
 *     unless qf_cuda_set_tf32(1), bf16 products with float32 accumulation (CUBLAS_COMPUTE_32F).
 *   - float4 paths are taken only when every pointer is 16-byte aligned and every count and
 *     stride they step by is a multiple of 4; otherwise the scalar kernels run (same results). */
#include "cuda_internal.h"

#include <cuda_bf16.h>

#include <atomic>
#include <mutex>
#include <stdint.h>
#include <string.h>

namespace {

constexpr int kThreads = 256;

inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed. */
inline unsigned grid_for(int64_t n, int threads = kThreads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 8192) b = 8192;
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- gemm prologue: out = [out] + bias + res, so the GEMM can add onto it (beta = 1) ---------- */

__global__ void gemm_prologue(float *out, int64_t ldo, const float *bias, const float *res, int64_t ldr, int64_t M,
                              int64_t N, int acc) {
    const int64_t n = M * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t m = i / N, c = i - m * N;
        float v = acc ? out[m * ldo + c] : 0.0f;
        if (bias) v += bias[c];
        if (res) v += res[m * ldr + c];
        out[m * ldo + c] = v;
    }
}

/* xb [M, K] (row stride ldxb) = bf16(x [M, K], row stride ldx), round to nearest even (torch's
 * .bfloat16()). */
__global__ void to_bf16(__nv_bfloat16 *xb, int64_t ldxb, const float *x, int64_t ldx, int64_t M, int64_t K) {
    const int64_t n = M * K;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t m = i / K, k = i - m * K;
        xb[m * ldxb + k] = __float2bfloat16_rn(x[m * ldx + k]);
    }
}

/* four floats rounded to bf16 into 8 bytes at p (8-byte aligned) */
__device__ __forceinline__ void store_bf16x4(__nv_bfloat16 *p, float4 v) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    memcpy(&u.x, &lo, 4);
    memcpy(&u.y, &hi, 4);
    *(uint2 *)p = u;
}

/* ---- layer norm: one block per row (any C), or one warp per row (C = 128 NV: the row lives in
 * registers, NV float4 per lane, and every reduction is a warp shuffle; 4 rows per block) -------- */

template <int NV>
__global__ void __launch_bounds__(128) layernorm_fwd_warp(float *out, __nv_bfloat16 *out16, float *mean_out,
                                                          float *rstd_out, const float *x, const float *w,
                                                          const float *b, int64_t rows, float eps) {
    constexpr int C = 128 * NV;
    const int64_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float4 *xr = (const float4 *)(x + row * C);
    float4 v[NV];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        v[i] = xr[lane + 32 * i];
        s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float mean = s / (float)C;
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const float d0 = v[i].x - mean, d1 = v[i].y - mean, d2 = v[i].z - mean, d3 = v[i].w - mean;
        q += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    const float rstd = 1.0f / sqrtf(q / (float)C + eps);
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int c = lane + 32 * i;
        const float4 wv = w ? ((const float4 *)w)[c] : make_float4(1.f, 1.f, 1.f, 1.f);
        const float4 bv = b ? ((const float4 *)b)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        float4 r;
        r.x = (v[i].x - mean) * rstd * wv.x + bv.x;
        r.y = (v[i].y - mean) * rstd * wv.y + bv.y;
        r.z = (v[i].z - mean) * rstd * wv.z + bv.z;
        r.w = (v[i].w - mean) * rstd * wv.w + bv.w;
        ((float4 *)(out + row * C))[c] = r;
        if (out16) store_bf16x4(out16 + row * C + 4 * c, r);
    }
    if (lane == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

constexpr int kLnThreads = 128;

__device__ float block_sum(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads(); /* sh may still be read by the previous reduction */
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < kLnThreads / 32; i++) s += sh[i];
    return s;
}

template <bool VEC>
__global__ void __launch_bounds__(kLnThreads) layernorm_fwd(float *out, __nv_bfloat16 *out16, float *mean_out,
                                                            float *rstd_out, const float *x, const float *w,
                                                            const float *b, int64_t C, float eps) {
    __shared__ float sh[kLnThreads / 32];
    const int64_t row = blockIdx.x;
    const float *xr = x + row * C;
    float *yr = out + row * C;
    float s = 0.0f;
    if (VEC) {
        for (int64_t c = threadIdx.x; c < C / 4; c += kLnThreads) {
            float4 v = ((const float4 *)xr)[c];
            s += (v.x + v.y) + (v.z + v.w);
        }
    } else {
        for (int64_t c = threadIdx.x; c < C; c += kLnThreads) s += xr[c];
    }
    const float mean = block_sum(s, sh) / (float)C;
    float q = 0.0f;
    if (VEC) {
        for (int64_t c = threadIdx.x; c < C / 4; c += kLnThreads) {
            float4 v = ((const float4 *)xr)[c];
            float d0 = v.x - mean, d1 = v.y - mean, d2 = v.z - mean, d3 = v.w - mean;
            q += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    } else {
        for (int64_t c = threadIdx.x; c < C; c += kLnThreads) {
            float d = xr[c] - mean;
            q += d * d;
        }
    }
    const float rstd = 1.0f / sqrtf(block_sum(q, sh) / (float)C + eps);
    if (VEC) {
        for (int64_t c = threadIdx.x; c < C / 4; c += kLnThreads) {
            float4 v = ((const float4 *)xr)[c];
            float4 wv = w ? ((const float4 *)w)[c] : make_float4(1.f, 1.f, 1.f, 1.f);
            float4 bv = b ? ((const float4 *)b)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 r;
            r.x = (v.x - mean) * rstd * wv.x + bv.x;
            r.y = (v.y - mean) * rstd * wv.y + bv.y;
            r.z = (v.z - mean) * rstd * wv.z + bv.z;
            r.w = (v.w - mean) * rstd * wv.w + bv.w;
            ((float4 *)yr)[c] = r;
            if (out16) store_bf16x4(out16 + row * C + 4 * c, r);
        }
    } else {
        for (int64_t c = threadIdx.x; c < C; c += kLnThreads) {
            const float r = (xr[c] - mean) * rstd * (w ? w[c] : 1.0f) + (b ? b[c] : 0.0f);
            yr[c] = r;
            if (out16) out16[row * C + c] = __float2bfloat16_rn(r);
        }
    }
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

/* ---- elementwise -------------------------------------------------------------------------------- */

__device__ __forceinline__ float gelu1(float v, int tanh_form) {
    if (tanh_form) { /* 0.5 v (1 + tanh(u)) = v e/(e+1), e = exp(2u) (clamped as gelu.c does) */
        float u2 = 2.0f * 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float e = expf(u2 < 80.0f ? u2 : 80.0f);
        return v * (e / (e + 1.0f));
    }
    return v * (0.5f * erfcf(-v * 0.7071067811865476f));
}

__global__ void gelu_kernel(float *y, const float *x, int64_t n, int tanh_form) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = gelu1(x[i], tanh_form);
}

__global__ void gelu_kernel4(float4 *y, const float4 *x, int64_t n4, int tanh_form) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float4 v = x[i];
        y[i] = make_float4(gelu1(v.x, tanh_form), gelu1(v.y, tanh_form), gelu1(v.z, tanh_form), gelu1(v.w, tanh_form));
    }
}

__global__ void gelu_x16_kernel(__nv_bfloat16 *y, const __nv_bfloat16 *x, int64_t n, int tanh_form) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(gelu1(__bfloat162float(x[i]), tanh_form));
}

/* 8 values per thread: one 16-byte load and store */
__global__ void gelu_x16_kernel8(uint4 *y, const uint4 *x, int64_t n8, int tanh_form) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
        uint4 u = x[i];
        __nv_bfloat162 h[4];
        memcpy(h, &u, 16);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float2 f = __bfloat1622float2(h[j]);
            h[j] = __floats2bfloat162_rn(gelu1(f.x, tanh_form), gelu1(f.y, tanh_form));
        }
        memcpy(&u, h, 16);
        y[i] = u;
    }
}

__global__ void add_kernel(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

__global__ void add_kernel4(float4 *out, const float4 *a, const float4 *b, int64_t n4) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float4 u = a[i], v = b[i];
        out[i] = make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w);
    }
}

/* ---- embedding: one block per output row; W = C (scalar) or C/4 (float4) ----------------------- */

template <typename T>
__device__ __forceinline__ T add_t(T a, T b);
template <>
__device__ __forceinline__ float add_t(float a, float b) { return a + b; }
template <>
__device__ __forceinline__ float4 add_t(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

template <typename T>
__global__ void embedding_kernel(T *out, const int32_t *ids, const T *table, const T *pos, int64_t pos_rows, int64_t W) {
    const int64_t i = blockIdx.x;
    const T *t = table + (int64_t)ids[i] * W;
    const T *p = pos ? pos + (i % pos_rows) * W : nullptr;
    T *o = out + i * W;
    for (int64_t c = threadIdx.x; c < W; c += blockDim.x) o[c] = p ? add_t(t[c], p[c]) : t[c];
}

/* out[r, :] = (a ? a[r, :] : 0) + b[r % period, :], W columns of T */
template <typename T>
__global__ void add_periodic_kernel(T *out, const T *a, const T *b, int64_t rows, int64_t period, int64_t W) {
    const int64_t n = rows * W;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / W, c = i - r * W;
        T v = b[(r % period) * W + c];
        out[i] = a ? add_t(a[i], v) : v;
    }
}

/* ---- heads: tok rows [B*len, nh*hd] (stride ld) <-> rows [off, off+len) of heads [B, nh, tot, hd].
 * Counted in units of T (float, or float4 with hd, ld, bias all in units of 4 floats). ---------- */

template <typename T>
__global__ void split_heads_kernel(T *heads, const T *tok, int64_t ld, const T *bias, int64_t B, int64_t nh,
                                   int64_t tot, int64_t off, int64_t len, int64_t hd) {
    const int64_t n = B * len * nh * hd;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t c = idx % hd, t = idx / hd;
        int64_t h = t % nh;
        t /= nh;
        int64_t i = t % len, b = t / len;
        T v = tok[(b * len + i) * ld + h * hd + c];
        if (bias) v = add_t(v, bias[h * hd + c]);
        heads[((b * nh + h) * tot + off + i) * hd + c] = v;
    }
}

template <typename T>
__global__ void merge_heads_kernel(T *tok, int64_t ld, const T *heads, int64_t B, int64_t nh, int64_t tot,
                                   int64_t off, int64_t len, int64_t hd, int acc) {
    const int64_t n = B * len * nh * hd;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t c = idx % hd, t = idx / hd;
        int64_t h = t % nh;
        t /= nh;
        int64_t i = t % len, b = t / len;
        T v = heads[((b * nh + h) * tot + off + i) * hd + c];
        T *d = tok + (b * len + i) * ld + h * hd + c;
        *d = acc ? add_t(*d, v) : v;
    }
}

/* ---- dead rows: one block per (b, h); the mean in double, keys in order (as cpu.c) -------------- */

__global__ void dead_rows_mean_kernel(float *out, const float *v, const uint8_t *dead, int64_t nh, int64_t L,
                                      int64_t S, int64_t hd) {
    const int64_t bh = blockIdx.x, b = bh / nh;
    if (!dead[b]) return;
    const float *vb = v + bh * S * hd;
    float *o = out + bh * L * hd;
    for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
        double acc = 0.0;
        for (int64_t j = 0; j < S; j++) acc += vb[j * hd + d];
        const float m = (float)(acc / (double)S);
        for (int64_t i = 0; i < L; i++) o[i * hd + d] = m;
    }
}

/* ---- NaN/Inf screen: per-thread minimum, warp minimum, one atomicMin per warp that found one ---- */

__global__ void screen_kernel(const uint32_t *x, int64_t n, long long *first) {
    long long best = LLONG_MAX;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if ((x[i] & 0x7f800000u) == 0x7f800000u) { /* NaN or +-Inf; the first hit is this thread's smallest */
            best = i;
            break;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other < best ? other : best;
    }
    if ((threadIdx.x & 31) == 0 && best != LLONG_MAX) atomicMin(first, best);
}

/* dst = bf16(src) and the screen above in the same pass: V = 4 values per step (float4 in, 8 bytes
 * out; n4 steps) or 1. A thread's first hit is its smallest bad index (its steps ascend). */
template <int V>
__global__ void stage_x16_kernel(__nv_bfloat16 *dst, const float *src, int64_t steps, long long *first) {
    long long best = LLONG_MAX;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < steps; i += (int64_t)gridDim.x * blockDim.x) {
        if (V == 4) {
            const float4 v = ((const float4 *)src)[i];
            store_bf16x4(dst + 4 * i, v);
            if (best == LLONG_MAX) {
                const float c[4] = {v.x, v.y, v.z, v.w};
                for (int j = 0; j < 4; j++)
                    if (!isfinite(c[j])) {
                        best = 4 * i + j;
                        break;
                    }
            }
        } else {
            const float v = src[i];
            dst[i] = __float2bfloat16_rn(v);
            if (best == LLONG_MAX && !isfinite(v)) best = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other < best ? other : best;
    }
    if ((threadIdx.x & 31) == 0 && best != LLONG_MAX) atomicMin(first, best);
}

} // namespace

/* ---- entries ------------------------------------------------------------------------------------ */

qf_status qf_cuda_stage_x16(uint16_t *dst16, const float *src, int64_t n, int64_t *first) {
    if (n <= 0) return QF_OK;
    __nv_bfloat16 *d = (__nv_bfloat16 *)dst16;
    if (n % 4 == 0 && aligned16(src) && ((uintptr_t)dst16 & 7u) == 0)
        stage_x16_kernel<4><<<grid_for(n / 4), kThreads, 0, qf_cuda_stream()>>>(d, src, n / 4, (long long *)first);
    else
        stage_x16_kernel<1><<<grid_for(n), kThreads, 0, qf_cuda_stream()>>>(d, src, n, (long long *)first);
    return qf_cuda_launched("stage_x16");
}

/* ---- gemm_nt ------------------------------------------------------------------------------------
 * Row-major out[M, N] is column-major outᵀ [N, M]: outᵀ = w · xᵀ, w read as the column-major [K, N]
 * matrix transposed, x as column-major [K, M] (row stride ldx). Two paths:
 *   - cuBLASLt (default): one call, the bias as its epilogue and the residual as its C matrix
 *     (D = w·xᵀ + C + bias; C = out when accumulating). Its plans (descriptors and the heuristic's
 *     algorithm, chosen for the pointers' actual alignment) are cached per shape, 64 at most.
 *   - classic: a prologue kernel writes [out +] bias + res, then cublasSgemm / cublasGemmEx add
 *     the product onto it (beta = 1). Used when accumulate and res come together, when res has
 *     another row stride than out, when the heuristic finds no algorithm, and when
 *     qf_cuda_test_gemm_lt(0) forces it (tests, timing).
 * Measured on the H100 (bench/device_cuda.sh gemm: with bias, per call in a replayed graph of 20;
 * Lt / classic / torch 2.11 F.linear in a CUDA graph): 32x2304x768 fp32 12.8 / 15.2 / 22.8 us,
 * bf16 weights 5.3 / 7.0 / 5.0 us (torch's output is bf16, ours float32); 257x9216x1408 fp32
 * 217 / 234 / 229 us, bf16 21.1 / 37.6 / 17.3 us. */

namespace {

std::atomic<int> g_lt_on{1};

unsigned align_of(const void *p) { /* the largest power of two <= 256 dividing the address */
    uintptr_t a = (uintptr_t)p;
    unsigned al = 256;
    while (al > 1 && (a & (al - 1))) al >>= 1;
    return al;
}

struct LtKey {
    int64_t M, N, K, ldb, ldc, ldd;
    int bf16, bias, cmode, tf32; /* cmode: 0 no C (beta 0), 1 C = res, 2 C = out (accumulate) */
    int out_bf16;                /* D (and the unused C) bf16: only with cmode 0 */
    int bias_bf16;               /* the bias is bf16 (with out_bf16) */
    unsigned al_a, al_b, al_c, al_d, al_bias;
};

struct LtPlan {
    LtKey key;
    bool used, ok;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c, d;
    cublasLtMatmulAlgo_t algo;
};

constexpr int kLtPlans = 64;
LtPlan g_plans[kLtPlans];
int g_plan_next;
std::mutex g_plan_mu;

void lt_destroy(LtPlan *p) {
    if (p->op) cublasLtMatmulDescDestroy(p->op);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    if (p->d) cublasLtMatrixLayoutDestroy(p->d);
    memset(p, 0, sizeof *p);
}

/* Descriptors and the heuristic's first algorithm for k; p->ok = false when any step fails or no
 * algorithm fits (the caller then takes the classic path, which reports real errors). */
void lt_build(cublasLtHandle_t lt, const LtKey &k, const void *bias, size_t ws_bytes, LtPlan *p) {
    memset(p, 0, sizeof *p);
    p->key = k;
    p->used = true;
    const cublasComputeType_t ct = !k.bf16 && k.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const cudaDataType_t ab = k.bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasStatus_t st = cublasLtMatmulDescCreate(&p->op, ct, CUDA_R_32F);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (st == CUBLAS_STATUS_SUCCESS && k.bias) {
        const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        const int32_t bt = k.bias_bf16 ? CUDA_R_16BF : CUDA_R_32F;
        st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt);
        if (st == CUBLAS_STATUS_SUCCESS) /* the heuristic reads its alignment */
            st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    }
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->a, ab, (uint64_t)k.K, (uint64_t)k.N, k.K);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->b, ab, (uint64_t)k.K, (uint64_t)k.M, k.ldb);
    const cudaDataType_t dt = k.out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->c, dt, (uint64_t)k.N, (uint64_t)k.M, k.ldc);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&p->d, dt, (uint64_t)k.N, (uint64_t)k.M, k.ldd);
    cublasLtMatmulPreference_t pref = nullptr;
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceCreate(&pref);
    const uint64_t ws = ws_bytes;
    const uint32_t al[4] = {k.al_a, k.al_b, k.al_c, k.al_d};
    const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; i++)
        st = cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof al[i]);
    cublasLtMatmulHeuristicResult_t r;
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(lt, p->op, p->a, p->b, p->c, p->d, pref, 1, &r, &found);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    p->ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (p->ok) p->algo = r.algo;
}

/* *done = false when the plan has no algorithm (nothing queued then). */
qf_status lt_gemm(const qf_gemm_nt_args *g, const void *B, int64_t ldb, bool *done) {
    *done = false;
    cublasLtHandle_t lt;
    void *ws;
    size_t ws_bytes;
    QF_TRY(qf_cuda_blaslt(&lt, &ws, &ws_bytes));
    const void *A = g->w_bf16 ? (const void *)g->w_bf16 : (const void *)g->w;
    const int cmode = g->res ? 1 : g->accumulate ? 2 : 0;
    void *D = g->out_bf16 ? (void *)g->out_bf16 : (void *)g->out;
    const void *C = cmode == 1 ? (const void *)g->res : (const void *)D;
    LtKey k;
    memset(&k, 0, sizeof k); /* padding too: keys are compared with memcmp */
    k.M = g->M; k.N = g->N; k.K = g->K; k.ldb = ldb; k.ldc = cmode == 1 ? g->ldr : g->ldo; k.ldd = g->ldo;
    k.bf16 = g->w_bf16 != nullptr; k.bias = g->bias != nullptr; k.cmode = cmode; k.tf32 = qf_cuda_tf32();
    k.out_bf16 = g->out_bf16 != nullptr;
    /* cuBLASLt's bf16-out bias epilogue wants a bf16 bias: the caller's copy when it has one */
    const void *bias = g->out_bf16 && g->bias_bf16 ? (const void *)g->bias_bf16 : (const void *)g->bias;
    k.bias_bf16 = bias && bias == (const void *)g->bias_bf16;
    k.al_a = align_of(A); k.al_b = align_of(B); k.al_c = align_of(C); k.al_d = align_of(D);
    k.al_bias = bias ? align_of(bias) : 256;
    std::lock_guard<std::mutex> lock(g_plan_mu);
    LtPlan *p = nullptr;
    for (int i = 0; i < kLtPlans && !p; i++)
        if (g_plans[i].used && !memcmp(&g_plans[i].key, &k, sizeof k)) p = &g_plans[i];
    if (!p) { /* a new shape: replace the oldest plan (its calls are already queued with their own copies) */
        p = &g_plans[g_plan_next];
        g_plan_next = (g_plan_next + 1) % kLtPlans;
        lt_destroy(p);
        lt_build(lt, k, bias, ws_bytes, p);
    }
    if (!p->ok) return QF_OK;
    if (bias)
        QF_TRY(qf_cuda_blas_check(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                                 sizeof bias),
                                  "gemm (cuda): setting the bias pointer"));
    const float alpha = 1.0f, beta = cmode ? 1.0f : 0.0f;
    QF_TRY(qf_cuda_blas_check(cublasLtMatmul(lt, p->op, &alpha, A, p->a, B, p->b, &beta, C, p->c, D, p->d, &p->algo,
                                             ws, ws_bytes, qf_cuda_stream()),
                              "gemm (cuda): cublasLtMatmul"));
    *done = true;
    return QF_OK;
}

} // namespace

/* Test hook (not in a public header): 0 forces the classic path, 1 (default) lets cuBLASLt run. */
extern "C" void qf_cuda_test_gemm_lt(int on) { g_lt_on.store(on ? 1 : 0); }

namespace {
std::atomic<int> g_skinny_on{1};
}
/* Test hook: 0 keeps gemm_nt off qf_cuda_gemm_skinny (comparisons with cuBLAS), 1 (default) lets it run. */
extern "C" void qf_cuda_test_gemm_skinny(int on) { g_skinny_on.store(on ? 1 : 0); }

qf_status qf_cuda_gemm_nt(const qf_gemm_nt_args *g) {
    if (g->M > INT32_MAX || g->N > INT32_MAX || g->K > INT32_MAX || g->ldx > INT32_MAX || g->ldo > INT32_MAX ||
        g->ldr > INT32_MAX)
        return qf_fail(QF_ERR_ARG, "gemm (cuda): M = %lld, N = %lld, K = %lld: sizes and strides must fit in int (cuBLAS)",
                       (long long)g->M, (long long)g->N, (long long)g->K);
    if ((g->x_bf16 || g->out_bf16) && !g->w_bf16)
        return qf_fail(QF_ERR_ARG, "gemm (cuda): a bf16 %s needs bf16 weights (w_bf16)", g->x_bf16 ? "x" : "out");
    if (g->out_bf16 && (g->res || g->accumulate))
        return qf_fail(QF_ERR_ARG, "gemm (cuda): a bf16 out takes no residual and no accumulation");
    if (g->M <= 0 || g->N <= 0) return QF_OK;
    if (g_skinny_on.load() && g->K > 0) {
        bool done;
        QF_TRY(qf_cuda_gemm_skinny(g, &done));
        if (done) return QF_OK;
    }
    cudaStream_t st = qf_cuda_stream();
    const void *B = g->x_bf16 ? (const void *)g->x_bf16 : (const void *)g->x;
    int64_t ldb = g->ldx;
    if (g->w_bf16 && !g->x_bf16 && g->K > 0) { /* x rounded to bf16, contiguous */
        void *buf;
        QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_GEMM_X16, sizeof(__nv_bfloat16) * (size_t)g->M * (size_t)g->K, &buf));
        to_bf16<<<grid_for(g->M * g->K), kThreads, 0, st>>>((__nv_bfloat16 *)buf, g->K, g->x, g->ldx, g->M, g->K);
        QF_TRY(qf_cuda_launched("to_bf16"));
        B = buf;
        ldb = g->K;
    }
    /* cuBLASLt takes one C: not both the old out and a residual; a residual C with the row stride of
     * out only (the layouts cuBLASLt documents for C and D together) */
    if (g->K > 0 && g_lt_on.load() && !(g->accumulate && g->res) && !(g->res && g->ldr != g->ldo)) {
        bool done;
        QF_TRY(lt_gemm(g, B, ldb, &done));
        if (done) return QF_OK;
    }
    if (g->out_bf16) { /* without cuBLASLt: the float32 product in scratch, then rounded into out_bf16 */
        void *buf;
        QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_GEMM_OUT32, sizeof(float) * (size_t)g->M * (size_t)g->N, &buf));
        qf_gemm_nt_args f = *g;
        f.out_bf16 = nullptr;
        f.bias_bf16 = nullptr;
        f.out = (float *)buf;
        f.ldo = g->N;
        f.x_bf16 = (const uint16_t *)B; /* already bf16: not converted twice */
        f.ldx = ldb;
        QF_TRY(qf_cuda_gemm_nt(&f));
        to_bf16<<<grid_for(g->M * g->N), kThreads, 0, st>>>((__nv_bfloat16 *)g->out_bf16, g->ldo, (const float *)buf,
                                                            g->N, g->M, g->N);
        return qf_cuda_launched("to_bf16");
    }
    float beta = g->accumulate ? 1.0f : 0.0f;
    if (g->bias || g->res) {
        gemm_prologue<<<grid_for(g->M * g->N), kThreads, 0, st>>>(g->out, g->ldo, g->bias, g->res, g->ldr, g->M,
                                                                   g->N, g->accumulate);
        QF_TRY(qf_cuda_launched("gemm_prologue"));
        beta = 1.0f;
    }
    if (g->K <= 0) { /* an empty product: out holds [out +] bias + res already */
        if (beta == 0.0f)
            QF_TRY(qf_cuda_check(cudaMemset2DAsync(g->out, sizeof(float) * (size_t)g->ldo, 0, sizeof(float) * (size_t)g->N,
                                                   (size_t)g->M, st), "gemm (cuda): zeroing out"));
        return QF_OK;
    }
    cublasHandle_t h;
    QF_TRY(qf_cuda_blas(&h));
    const float alpha = 1.0f;
    const int M = (int)g->M, N = (int)g->N, K = (int)g->K;
    if (!g->w_bf16)
        return qf_cuda_blas_check(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, g->w, K, g->x, (int)g->ldx,
                                              &beta, g->out, (int)g->ldo),
                                  "gemm (cuda): cublasSgemm");
    return qf_cuda_blas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, g->w_bf16, CUDA_R_16BF, K, B,
                                           CUDA_R_16BF, (int)ldb, &beta, g->out, CUDA_R_32F, (int)g->ldo,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                              "gemm (cuda): cublasGemmEx (bf16 weights)");
}

qf_status qf_cuda_layernorm_forward_x16(float *out, uint16_t *out16, float *mean, float *rstd, const float *x,
                                        const float *w, const float *b, int64_t rows, int64_t C, float eps) {
    if (rows <= 0 || C <= 0) return QF_OK;
    if (rows > INT32_MAX) return qf_fail(QF_ERR_ARG, "layernorm (cuda): %lld rows: at most 2^31-1", (long long)rows);
    cudaStream_t st = qf_cuda_stream();
    __nv_bfloat16 *o16 = (__nv_bfloat16 *)out16;
    const bool vec = C % 4 == 0 && aligned16(out) && aligned16(x) && aligned16(w) && aligned16(b) &&
                     ((uintptr_t)out16 & 7u) == 0;
    /* measured on the H100 (C = 768): 2048 rows 5.6 us warp / 6.0 us block kernel; 32 rows 4.0 us
     * warp (even at one warp per block) / 2.9 us block: the warp kernel only for many rows */
    if (vec && C % 128 == 0 && C <= 1024 && rows >= 1024) {
        const int per = 4;
        const unsigned grid = (unsigned)((rows + per - 1) / per);
        switch (C / 128) {
#define QF_LN_WARP(nv) case nv: layernorm_fwd_warp<nv><<<grid, 32 * per, 0, st>>>(out, o16, mean, rstd, x, w, b, rows, eps); break;
        QF_LN_WARP(1) QF_LN_WARP(2) QF_LN_WARP(3) QF_LN_WARP(4) QF_LN_WARP(5) QF_LN_WARP(6) QF_LN_WARP(7) QF_LN_WARP(8)
#undef QF_LN_WARP
        }
        return qf_cuda_launched("layernorm_fwd_warp");
    }
    if (vec) layernorm_fwd<true><<<(unsigned)rows, kLnThreads, 0, st>>>(out, o16, mean, rstd, x, w, b, C, eps);
    else layernorm_fwd<false><<<(unsigned)rows, kLnThreads, 0, st>>>(out, o16, mean, rstd, x, w, b, C, eps);
    return qf_cuda_launched("layernorm_fwd");
}

qf_status qf_cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                                    int64_t rows, int64_t C, float eps) {
    return qf_cuda_layernorm_forward_x16(out, nullptr, mean, rstd, x, w, b, rows, C, eps);
}

qf_status qf_cuda_gelu_forward_x16(uint16_t *out16, const uint16_t *x16, int64_t n, qf_gelu_kind kind) {
    if (n <= 0) return QF_OK;
    const int tf = kind == QF_GELU_TANH;
    if (n % 8 == 0 && aligned16(out16) && aligned16(x16))
        gelu_x16_kernel8<<<grid_for(n / 8), kThreads, 0, qf_cuda_stream()>>>((uint4 *)out16, (const uint4 *)x16, n / 8, tf);
    else
        gelu_x16_kernel<<<grid_for(n), kThreads, 0, qf_cuda_stream()>>>((__nv_bfloat16 *)out16,
                                                                        (const __nv_bfloat16 *)x16, n, tf);
    return qf_cuda_launched("gelu_x16");
}

qf_status qf_cuda_gelu_forward(float *out, const float *x, int64_t n, qf_gelu_kind kind) {
    if (n <= 0) return QF_OK;
    const int tf = kind == QF_GELU_TANH;
    if (n % 4 == 0 && aligned16(out) && aligned16(x))
        gelu_kernel4<<<grid_for(n / 4), kThreads, 0, qf_cuda_stream()>>>((float4 *)out, (const float4 *)x, n / 4, tf);
    else
        gelu_kernel<<<grid_for(n), kThreads, 0, qf_cuda_stream()>>>(out, x, n, tf);
    return qf_cuda_launched("gelu");
}

qf_status qf_cuda_add(float *out, const float *a, const float *b, int64_t n) {
    if (n <= 0) return QF_OK;
    if (n % 4 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
        add_kernel4<<<grid_for(n / 4), kThreads, 0, qf_cuda_stream()>>>((float4 *)out, (const float4 *)a,
                                                                         (const float4 *)b, n / 4);
    else
        add_kernel<<<grid_for(n), kThreads, 0, qf_cuda_stream()>>>(out, a, b, n);
    return qf_cuda_launched("add");
}

qf_status qf_cuda_embedding_forward(float *out, const int32_t *ids, const float *table, const float *pos, int64_t pos_rows,
                                    int64_t N, int64_t C) {
    if (N <= 0 || C <= 0) return QF_OK;
    if (N > INT32_MAX) return qf_fail(QF_ERR_ARG, "embedding (cuda): %lld rows: at most 2^31-1", (long long)N);
    if (pos && pos_rows <= 0) return qf_fail(QF_ERR_ARG, "embedding (cuda): pos_rows = %lld with pos given", (long long)pos_rows);
    cudaStream_t st = qf_cuda_stream();
    if (C % 4 == 0 && aligned16(out) && aligned16(table) && aligned16(pos)) {
        const int64_t W = C / 4;
        const int threads = W >= 256 ? 256 : (int)((W + 31) / 32 * 32);
        embedding_kernel<float4><<<(unsigned)N, threads, 0, st>>>((float4 *)out, ids, (const float4 *)table,
                                                                  (const float4 *)pos, pos_rows, W);
    } else {
        const int threads = C >= 256 ? 256 : (int)((C + 31) / 32 * 32);
        embedding_kernel<float><<<(unsigned)N, threads, 0, st>>>(out, ids, table, pos, pos_rows, C);
    }
    return qf_cuda_launched("embedding");
}

qf_status qf_cuda_add_periodic(float *out, const float *a, const float *b, int64_t rows, int64_t period, int64_t C) {
    const int64_t n = rows * C;
    if (n <= 0) return QF_OK;
    if (period <= 0) return qf_fail(QF_ERR_ARG, "add_periodic (cuda): period = %lld, expected >= 1", (long long)period);
    cudaStream_t st = qf_cuda_stream();
    if (C % 4 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
        add_periodic_kernel<float4><<<grid_for(n / 4), kThreads, 0, st>>>((float4 *)out, (const float4 *)a,
                                                                          (const float4 *)b, rows, period, C / 4);
    else
        add_periodic_kernel<float><<<grid_for(n), kThreads, 0, st>>>(out, a, b, rows, period, C);
    return qf_cuda_launched("add_periodic");
}

qf_status qf_cuda_split_heads(float *heads, const float *tok, int64_t ld, const float *bias, int64_t B, int64_t nh,
                              int64_t tot, int64_t off, int64_t len, int64_t hd) {
    const int64_t n = B * len * nh * hd;
    if (n <= 0) return QF_OK;
    cudaStream_t st = qf_cuda_stream();
    if (hd % 4 == 0 && ld % 4 == 0 && aligned16(heads) && aligned16(tok) && aligned16(bias))
        split_heads_kernel<float4><<<grid_for(n / 4), kThreads, 0, st>>>((float4 *)heads, (const float4 *)tok, ld / 4,
                                                                         (const float4 *)bias, B, nh, tot, off, len, hd / 4);
    else
        split_heads_kernel<float><<<grid_for(n), kThreads, 0, st>>>(heads, tok, ld, bias, B, nh, tot, off, len, hd);
    return qf_cuda_launched("split_heads");
}

qf_status qf_cuda_merge_heads(float *tok, int64_t ld, const float *heads, int64_t B, int64_t nh, int64_t tot, int64_t off,
                              int64_t len, int64_t hd, int acc) {
    const int64_t n = B * len * nh * hd;
    if (n <= 0) return QF_OK;
    cudaStream_t st = qf_cuda_stream();
    if (hd % 4 == 0 && ld % 4 == 0 && aligned16(heads) && aligned16(tok))
        merge_heads_kernel<float4><<<grid_for(n / 4), kThreads, 0, st>>>((float4 *)tok, ld / 4, (const float4 *)heads, B,
                                                                         nh, tot, off, len, hd / 4, acc);
    else
        merge_heads_kernel<float><<<grid_for(n), kThreads, 0, st>>>(tok, ld, heads, B, nh, tot, off, len, hd, acc);
    return qf_cuda_launched("merge_heads");
}

qf_status qf_cuda_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t rows) {
    if (!width || !rows) return QF_OK;
    /* cudaMemcpyDefault: either side may be host memory (unified addressing); a copy to pageable
     * host memory returns once it is done, one from it once the source has been staged */
    return qf_cuda_check(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDefault, qf_cuda_stream()),
                         "copy2d (cuda): cudaMemcpy2DAsync");
}

qf_status qf_cuda_dead_rows_mean(float *out, const float *v, const uint8_t *dead, int64_t B, int64_t nh, int64_t L,
                                 int64_t S, int64_t hd) {
    if (B <= 0 || nh <= 0 || L <= 0 || hd <= 0) return QF_OK;
    if (S <= 0) return qf_fail(QF_ERR_ARG, "dead_rows_mean (cuda): S = %lld, expected >= 1", (long long)S);
    if (B * nh > INT32_MAX) return qf_fail(QF_ERR_ARG, "dead_rows_mean (cuda): B*nh = %lld: at most 2^31-1", (long long)(B * nh));
    const int threads = hd >= 128 ? 128 : (int)((hd + 31) / 32 * 32);
    dead_rows_mean_kernel<<<(unsigned)(B * nh), threads, 0, qf_cuda_stream()>>>(out, v, dead, nh, L, S, hd);
    return qf_cuda_launched("dead_rows_mean");
}

qf_status qf_cuda_screen_nonfinite(const float *x, int64_t n, int64_t *first) {
    if (n <= 0) return QF_OK;
    unsigned blocks = grid_for(n);
    if (blocks > 1024) blocks = 1024;
    screen_kernel<<<blocks, kThreads, 0, qf_cuda_stream()>>>((const uint32_t *)x, n, (long long *)first);
    return qf_cuda_launched("screen_nonfinite");
}
