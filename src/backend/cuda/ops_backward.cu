/* ops_backward.cu - the CUDA backend's backward ops (backend.h): the two products of a linear
 * layer's backward on cuBLAS plus its bias gradient, layer norm, GELU (erf and tanh forms), the
 * uniform-softmax gradient of all-padding cross-attention items, the embedding / position
 * gradient, and zeroing. qformer_backward.c calls them through the table for a GPU model.
 *
 * Invariants:
 *   - Arguments are validated by the caller; these functions only queue work on
 *     qf_cuda_stream() and never synchronise. The only temporary is the dead-row backward's
 *     per-row means (scratch slot QF_CUDA_SCRATCH_DEAD_MEAN, grow-only).
 *   - Numerics follow the CPU backend: float32 products without TF32 unless qf_cuda_set_tf32(1)
 *     (the handle's math mode); column sums (bias, layer-norm weight/bias gradients) are summed
 *     in float32 by one thread per column over the rows, then added once to the accumulated
 *     gradient (deterministic: no atomics); GELU's derivative uses the formulas of gelu.c's
 *     scalar path; the dead-row gradient uses double dot products as cpu.c does. Only the
 *     embedding gradient adds with atomics (repeated token ids), so its low bits may vary
 *     from run to run. */
#include "cuda_internal.h"

#include <stdint.h>

namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n, int threads = kThreads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 8192) b = 8192;
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- column sums: dst[c] += sum over N rows of x[r, c] (x row stride C); blocks of 32 columns,
 * 8 row lanes per column, combined in shared memory ------------------------------------------ */

constexpr int kColX = 32, kColY = 8;

__global__ void colsum_kernel(float *dst, const float *x, int64_t N, int64_t C) {
    __shared__ float sh[kColY][kColX + 1];
    const int64_t c = blockIdx.x * (int64_t)kColX + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int64_t r = threadIdx.y; r < N; r += kColY) s += x[r * C + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0.0f;
        for (int i = 0; i < kColY; i++) t += sh[i][threadIdx.x];
        dst[c] += t;
    }
}

/* ---- layer norm backward ------------------------------------------------------------------------
 * d_in row = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = d_out * w: one block per row.
 * d_weight[c] += sum_r d_out * xhat, d_bias[c] += sum_r d_out: column blocks as colsum. */

constexpr int kLnThreads = 128;

__device__ float block_sum(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < kLnThreads / 32; i++) s += sh[i];
    return s;
}

__global__ void __launch_bounds__(kLnThreads) ln_bwd_rows(float *d_in, const float *d_out, const float *x,
                                                          const float *w, const float *mean, const float *rstd,
                                                          int64_t C) {
    __shared__ float sh[kLnThreads / 32];
    const int64_t row = blockIdx.x;
    const float *dy = d_out + row * C, *xr = x + row * C;
    const float mu = mean[row], rs = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += kLnThreads) {
        const float g = dy[c] * (w ? w[c] : 1.0f), xh = (xr[c] - mu) * rs;
        sg += g;
        sgx += g * xh;
    }
    const float mg = block_sum(sg, sh) / (float)C;
    const float mgx = block_sum(sgx, sh) / (float)C;
    float *dx = d_in + row * C;
    for (int64_t c = threadIdx.x; c < C; c += kLnThreads) {
        const float g = dy[c] * (w ? w[c] : 1.0f), xh = (xr[c] - mu) * rs;
        dx[c] = rs * (g - mg - xh * mgx);
    }
}

__global__ void ln_bwd_params(float *d_w, float *d_b, const float *d_out, const float *x, const float *mean,
                              const float *rstd, int64_t N, int64_t C) {
    __shared__ float shw[kColY][kColX + 1], shb[kColY][kColX + 1];
    const int64_t c = blockIdx.x * (int64_t)kColX + threadIdx.x;
    float sw = 0.0f, sb = 0.0f;
    if (c < C)
        for (int64_t r = threadIdx.y; r < N; r += kColY) {
            const float dy = d_out[r * C + c];
            sw += dy * (x[r * C + c] - mean[r]) * rstd[r];
            sb += dy;
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
        for (int i = 0; i < kColY; i++) {
            tw += shw[i][threadIdx.x];
            tb += shb[i][threadIdx.x];
        }
        if (d_w) d_w[c] += tw;
        if (d_b) d_b[c] += tb;
    }
}

/* ---- GELU backward (gelu.c's scalar formulas) ---------------------------------------------------- */

__global__ void gelu_bwd_kernel(float *d_in, const float *d_out, const float *x, int64_t n, int tanh_form) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        float dydx;
        if (tanh_form) {
            const float k0 = 0.7978845608028654f, k1 = 0.044715f;
            const float u2 = 2.0f * k0 * (v + k1 * v * v * v);
            const float e = expf(u2 < 80.0f ? u2 : 80.0f), rcp = 1.0f / (e + 1.0f), er = e * rcp;
            const float one_plus_t = 2.0f * er, sech2 = 4.0f * er * rcp;
            dydx = 0.5f * one_plus_t + 0.5f * v * sech2 * k0 * (1.0f + 3.0f * k1 * v * v);
        } else {
            dydx = 0.5f * erfcf(-v * 0.7071067811865476f) + v * 0.3989422804014327f * expf(-0.5f * v * v);
        }
        d_in[i] = d_out[i] * dydx;
    }
}

/* ---- dead rows (uniform weights 1/S over the S keys of item b, every head) ------------------------
 * mean[bh, i] = (1/S) sum_j do_i . v_j; ds_ij = (do_i . v_j - mean_i) / S * scale;
 * dq_i = sum_j ds_ij k_j; dk_j = sum_i ds_ij q_i; dv_j = sum_i do_i / S. Dot products in double. */

__device__ double dot_d(const float *a, const float *b, int64_t hd) {
    double s = 0.0;
    for (int64_t d = 0; d < hd; d++) s += (double)a[d] * b[d];
    return s;
}

__global__ void dead_mean_kernel(double *mean, const float *dout, const float *v, const uint8_t *dead, int64_t nh,
                                 int64_t L, int64_t S, int64_t hd, int64_t n) {
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t bh = idx / L, i = idx - bh * L;
        if (!dead[bh / nh]) continue;
        const float *g = dout + (bh * L + i) * hd, *vb = v + bh * S * hd;
        double m = 0.0;
        for (int64_t j = 0; j < S; j++) m += dot_d(g, vb + j * hd, hd);
        mean[idx] = m / (double)S;
    }
}

/* one item per element of dq [L, hd] | dk [S, hd] | dv [S, hd] of each (b, h) */
__global__ void dead_grad_kernel(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                 const float *dout, const double *mean, const uint8_t *dead, int64_t nh, int64_t L,
                                 int64_t S, int64_t hd, float scale, int64_t n) {
    const int64_t per = (L + 2 * S) * hd;
    const double invS = 1.0 / (double)S;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t bh = idx / per;
        if (!dead[bh / nh]) continue;
        int64_t e = idx - bh * per;
        const float *qb = q + bh * L * hd, *kb = k + bh * S * hd, *vb = v + bh * S * hd, *gb = dout + bh * L * hd;
        const double *mb = mean + bh * L;
        if (e < L * hd) { /* dq[i, d] */
            const int64_t i = e / hd, d = e - i * hd;
            float acc = 0.0f;
            for (int64_t j = 0; j < S; j++) {
                const float ds = (float)((dot_d(gb + i * hd, vb + j * hd, hd) - mb[i]) * invS) * scale;
                acc += ds * kb[j * hd + d];
            }
            dq[bh * L * hd + e] = acc;
            continue;
        }
        e -= L * hd;
        if (e < S * hd) { /* dk[j, d] */
            const int64_t j = e / hd, d = e - j * hd;
            float acc = 0.0f;
            for (int64_t i = 0; i < L; i++) {
                const float ds = (float)((dot_d(gb + i * hd, vb + j * hd, hd) - mb[i]) * invS) * scale;
                acc += ds * qb[i * hd + d];
            }
            dk[bh * S * hd + e] = acc;
            continue;
        }
        e -= S * hd; /* dv[j, d]: the same for every key */
        const int64_t d = e % hd;
        float acc = 0.0f;
        for (int64_t i = 0; i < L; i++) acc += (float)(gb[i * hd + d] * invS);
        dv[bh * S * hd + e] = acc;
    }
}

/* ---- embedding / position gradients ---------------------------------------------------------------- */

__global__ void pos_grad_kernel(float *d_pos, const float *d_out, int64_t N, int64_t period, int64_t C) {
    const int64_t n = period * C;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = idx / C, c = idx - p * C;
        float s = d_pos[idx];
        for (int64_t r = p; r < N; r += period) s += d_out[r * C + c];
        d_pos[idx] = s;
    }
}

__global__ void table_grad_kernel(float *d_table, const float *d_out, const int32_t *ids, int64_t skip_id, int64_t C) {
    const int64_t r = blockIdx.x;
    const int32_t id = ids[r];
    if (id == skip_id) return;
    float *dst = d_table + (int64_t)id * C;
    const float *src = d_out + r * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(dst + c, src[c]);
}

} // namespace

qf_status qf_cuda_linear_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                  const float *weight, int64_t N, int64_t Cin, int64_t Cout) {
    if (N > INT32_MAX || Cin > INT32_MAX || Cout > INT32_MAX)
        return qf_fail(QF_ERR_ARG, "linear_backward (cuda): N = %lld, Cin = %lld, Cout = %lld must fit in int (cuBLAS)",
                       (long long)N, (long long)Cin, (long long)Cout);
    if (N <= 0 || Cin <= 0 || Cout <= 0) return QF_OK;
    cublasHandle_t h;
    QF_TRY(qf_cuda_blas(&h));
    const float one = 1.0f, zero = 0.0f;
    const int n = (int)N, ci = (int)Cin, co = (int)Cout;
    /* column-major views of the row-major matrices: X [N, C] is Xᵀ [C, N] with leading dim C */
    if (d_in) /* d_inᵀ [Cin, N] = Wᵀ [Cin, Cout] · d_outᵀ [Cout, N] */
        QF_TRY(qf_cuda_blas_check(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, ci, n, co, &one, weight, ci, d_out, co, &zero,
                                              d_in, ci),
                                  "linear_backward (cuda): cublasSgemm d_in"));
    if (d_weight) /* d_Wᵀ [Cin, Cout] += inᵀ [Cin, N] · d_out [N, Cout] */
        QF_TRY(qf_cuda_blas_check(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, ci, co, n, &one, in, ci, d_out, co, &one,
                                              d_weight, ci),
                                  "linear_backward (cuda): cublasSgemm d_weight"));
    if (d_bias) {
        colsum_kernel<<<(unsigned)((Cout + kColX - 1) / kColX), dim3(kColX, kColY), 0, qf_cuda_stream()>>>(d_bias, d_out,
                                                                                                         N, Cout);
        QF_TRY(qf_cuda_launched("colsum_kernel"));
    }
    return QF_OK;
}

qf_status qf_cuda_layernorm_backward(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                     const float *weight, const float *mean, const float *rstd, int64_t N, int64_t C) {
    if (N <= 0 || C <= 0) return QF_OK;
    if (N > INT32_MAX) return qf_fail(QF_ERR_ARG, "layernorm_backward (cuda): %lld rows: at most 2^31-1", (long long)N);
    cudaStream_t st = qf_cuda_stream();
    if (d_in) {
        ln_bwd_rows<<<(unsigned)N, kLnThreads, 0, st>>>(d_in, d_out, in, weight, mean, rstd, C);
        QF_TRY(qf_cuda_launched("ln_bwd_rows"));
    }
    if (d_weight || d_bias) {
        ln_bwd_params<<<(unsigned)((C + kColX - 1) / kColX), dim3(kColX, kColY), 0, st>>>(d_weight, d_bias, d_out, in,
                                                                                          mean, rstd, N, C);
        QF_TRY(qf_cuda_launched("ln_bwd_params"));
    }
    return QF_OK;
}

qf_status qf_cuda_gelu_backward(float *d_in, const float *d_out, const float *in, int64_t n, qf_gelu_kind kind) {
    if (n <= 0) return QF_OK;
    gelu_bwd_kernel<<<grid_for(n), kThreads, 0, qf_cuda_stream()>>>(d_in, d_out, in, n, kind == QF_GELU_TANH);
    return qf_cuda_launched("gelu_bwd_kernel");
}

qf_status qf_cuda_dead_rows_backward(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                     const float *dout, const uint8_t *dead, int64_t B, int64_t nh, int64_t L,
                                     int64_t S, int64_t hd, float scale) {
    if (B <= 0 || nh <= 0 || L <= 0 || S <= 0 || hd <= 0) return QF_OK;
    void *buf;
    QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_DEAD_MEAN, sizeof(double) * (size_t)(B * nh * L), &buf));
    cudaStream_t st = qf_cuda_stream();
    const int64_t nm = B * nh * L, ng = B * nh * (L + 2 * S) * hd;
    dead_mean_kernel<<<grid_for(nm), kThreads, 0, st>>>((double *)buf, dout, v, dead, nh, L, S, hd, nm);
    QF_TRY(qf_cuda_launched("dead_mean_kernel"));
    dead_grad_kernel<<<grid_for(ng), kThreads, 0, st>>>(dq, dk, dv, q, k, v, dout, (const double *)buf, dead, nh, L, S,
                                                        hd, scale, ng);
    return qf_cuda_launched("dead_grad_kernel");
}

qf_status qf_cuda_embedding_backward(float *d_table, float *d_pos, const float *d_out, const int32_t *ids,
                                     int64_t skip_id, int64_t N, int64_t period, int64_t C) {
    if (N <= 0 || C <= 0) return QF_OK;
    if (N > INT32_MAX) return qf_fail(QF_ERR_ARG, "embedding_backward (cuda): %lld rows: at most 2^31-1", (long long)N);
    cudaStream_t st = qf_cuda_stream();
    if (d_pos) {
        const int64_t rows = period < N ? period : N;
        pos_grad_kernel<<<grid_for(rows * C), kThreads, 0, st>>>(d_pos, d_out, N, period, C);
        QF_TRY(qf_cuda_launched("pos_grad_kernel"));
    }
    if (d_table) {
        table_grad_kernel<<<(unsigned)N, kThreads, 0, st>>>(d_table, d_out, ids, skip_id, C);
        QF_TRY(qf_cuda_launched("table_grad_kernel"));
    }
    return QF_OK;
}

qf_status qf_cuda_zero(void *p, size_t bytes) {
    if (!bytes) return QF_OK;
    return qf_cuda_check(cudaMemsetAsync(p, 0, bytes, qf_cuda_stream()), "zero (cuda): cudaMemsetAsync");
}
