/* backend.h - the boundary between what an op means and where it runs.
 *
 * Public entry points (the .c files of src/ops) validate arguments once, then call the backend's function
 * for the device that holds the tensors (qf_backend_for). The CPU backend is always built; the
 * CUDA backend (src/backend/cuda/, make CUDA=1) fills the same table for GPU pointers, and
 * tests/python/test_cuda.py runs each of its entries against the CPU one (ggml's
 * test-backend-ops pattern). An op enters this table when a second backend implements it. */
#ifndef QF_BACKEND_H
#define QF_BACKEND_H

#include "ops/gemm_small.h"
#include "ops/sdpa_internal.h"
#include "qfuse_ops.h"

typedef struct {
    const char *name;
    /* 1: sdpa_forward takes strided problems (qf_sdpa_problem.strided), so a model may skip
     * splitting heads out of packed projection rows and merging them back */
    int sdpa_strided;
    qf_status (*sdpa_forward)(const qf_sdpa_problem *pr, const float *q, const float *k,
                              const float *v, float *out, float *lse, float *weights);
    qf_status (*sdpa_backward)(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *grad_out, float *dq, float *dk, float *dv);
    /* Where the kernels do not screen for NaN/Inf themselves, sdpa.c asks the backend that holds
     * a tensor: *index = the first i in x[0..n) whose value is NaN or Inf (nan_or_posinf_only:
     * NaN or +Inf, the rule for float masks), or n if none; *value = x[*index]. NULL in the CPU
     * backend, whose tensors sdpa.c scans directly. */
    qf_status (*find_nonfinite)(const float *x, size_t n, int nan_or_posinf_only, size_t *index,
                                float *value);

    /* ---- the ops of a model whose parameters and planned buffers live on this backend
     * (qformer.c runs the same code on either: it calls these through m->be). Arguments are
     * validated by the caller; every pointer is this backend's memory unless a comment says
     * otherwise; they return QF_OK or a status with a message and never print. A GPU backend
     * only queues work on its stream (no host synchronisation), so a sequence of these calls
     * can be captured as one CUDA graph; a backend that needs temporaries takes them from its
     * grow-only scratch. Semantics are those of the public ops in qfuse_ops.h. */

    /* out = [out +] x·wᵀ + bias + res (qf_gemm_nt_args, gemm_small.h). When g->w_bf16 is set,
     * the weight is that bfloat16 [N, K] matrix instead of g->w (float32 accumulation);
     * backends without bf16 weights return QF_ERR_UNSUPPORTED then. */
    qf_status (*gemm_nt)(const qf_gemm_nt_args *g);
    /* qf_layernorm_forward (mean, rstd may be NULL) */
    qf_status (*layernorm_forward)(float *out, float *mean, float *rstd, const float *x, const float *w,
                                   const float *b, int64_t rows, int64_t C, float eps);
    /* qf_gelu_forward; out may equal x */
    qf_status (*gelu_forward)(float *out, const float *x, int64_t n, qf_gelu_kind kind);
    /* out = a + b over n floats; out may equal a or b */
    qf_status (*add)(float *out, const float *a, const float *b, int64_t n);
    /* out[i, :] = table[ids[i], :] + (pos ? pos[i % pos_rows, :] : 0) for i < N, C columns;
     * ids already range-checked by the caller */
    qf_status (*embedding_forward)(float *out, const int32_t *ids, const float *table, const float *pos,
                                   int64_t pos_rows, int64_t N, int64_t C);
    /* rows [off, off+len) of heads [B, nh, tot, hd] = tok rows [B*len, nh*hd] (row stride ld)
     * + bias[h*hd + c] (bias NULL: none) */
    qf_status (*split_heads)(float *heads, const float *tok, int64_t ld, const float *bias, int64_t B,
                             int64_t nh, int64_t tot, int64_t off, int64_t len, int64_t hd);
    /* tok rows [B*len, nh*hd] (row stride ld) = (acc: +=) rows [off, off+len) of heads [B, nh, tot, hd] */
    qf_status (*merge_heads)(float *tok, int64_t ld, const float *heads, int64_t B, int64_t nh, int64_t tot,
                             int64_t off, int64_t len, int64_t hd, int acc);
    /* rows x width_bytes: dst + r*dpitch <- src + r*spitch. Either side may also be host memory
     * (an upload or download, ordered with the backend's queued work). */
    qf_status (*copy2d)(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width_bytes,
                        size_t rows);
    /* For each b with dead[b] != 0 (a cross-attention item whose every key is padding), every
     * query row i < L of out [B, nh, L, hd] = the mean over the S keys of v [B, nh, S, hd]
     * (transformers' uniform weights after adding finfo.min to every score); other items untouched. */
    qf_status (*dead_rows_mean)(float *out, const float *v, const uint8_t *dead, int64_t B, int64_t nh,
                                int64_t L, int64_t S, int64_t hd);
    /* out[r, :] = (a ? a[r, :] : 0) + b[r % period, :] for r < rows, C columns: a table of
     * `period` rows added to (or broadcast into) every group of rows (position embeddings,
     * query tokens broadcast over the batch). out may equal a. */
    qf_status (*add_periodic)(float *out, const float *a, const float *b, int64_t rows, int64_t period,
                              int64_t C);
    /* *first = the smallest i < n with x[i] NaN or ±Inf, folded into *first (min with its old
     * value; the caller sets it to n or more beforehand). `first` is this backend's memory too, so
     * the check queues like a kernel; the caller reads *first after the work has finished. */
    qf_status (*screen_nonfinite)(const float *x, int64_t n, int64_t *first);

    /* ---- bf16 activations (NULL in the CPU table): a model placed with bf16 weights keeps the
     * inputs of its GEMMs in bfloat16 (gemm_nt's x_bf16 / out_bf16), written by the op that
     * produces them, so no GEMM converts its input. Same rules as above. */
    /* layernorm_forward that also writes out16 = bf16(out) [rows, C] */
    qf_status (*layernorm_forward_x16)(float *out, uint16_t *out16, float *mean, float *rstd, const float *x,
                                       const float *w, const float *b, int64_t rows, int64_t C, float eps);
    /* out16 = bf16(gelu(x16)) over n bf16 values; out16 may equal x16 */
    qf_status (*gelu_forward_x16)(uint16_t *out16, const uint16_t *x16, int64_t n, qf_gelu_kind kind);
    /* dst16 = bf16(src) over n values, and src screened as screen_nonfinite does (the first NaN
     * or ±Inf index folded into *first): a model input taken into bf16 in one pass */
    qf_status (*stage_x16)(uint16_t *dst16, const float *src, int64_t n, int64_t *first);
    /* sdpa_forward on bf16 q, k, v (strided problems allowed), bf16 out; lse may be NULL */
    qf_status (*sdpa_forward_x16)(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k,
                                  const uint16_t *v, uint16_t *out, float *lse);

    /* ---- backward ops (qformer_backward.c; same rules as above) ---- */

    /* qf_linear_backward on contiguous rows: d_in [N, Cin] = d_out·W (written), d_weight
     * [Cout, Cin] += d_outᵀ·in, d_bias [Cout] += column sums of d_out (each NULL skips) */
    qf_status (*linear_backward)(float *d_in, float *d_weight, float *d_bias, const float *d_out, const float *in,
                                 const float *weight, int64_t N, int64_t Cin, int64_t Cout);
    /* qf_layernorm_backward: d_in written, d_weight / d_bias accumulated (each NULL skips) */
    qf_status (*layernorm_backward)(float *d_in, float *d_weight, float *d_bias, const float *d_out,
                                    const float *in, const float *weight, const float *mean, const float *rstd,
                                    int64_t N, int64_t C);
    /* qf_gelu_backward: d_in = d_out * gelu'(in); d_in may equal d_out */
    qf_status (*gelu_backward)(float *d_in, const float *d_out, const float *in, int64_t n, qf_gelu_kind kind);
    /* Backward of dead_rows_mean's uniform softmax: for each b with dead[b] != 0 and every head,
     * dq [B, nh, L, hd], dk, dv [B, nh, S, hd] are OVERWRITTEN with autograd's gradient of
     * softmax(scale q kᵀ + c) v at uniform weights 1/S (dout [B, nh, L, hd] the output's
     * gradient); other items untouched. */
    qf_status (*dead_rows_backward)(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                    const float *dout, const uint8_t *dead, int64_t B, int64_t nh, int64_t L,
                                    int64_t S, int64_t hd, float scale);
    /* Backward of embedding_forward with position rows: d_pos[r % period, :] += d_out[r, :]
     * (d_pos NULL skips) and d_table[ids[r], :] += d_out[r, :] except for rows whose id is
     * skip_id (-1: none), for r < N, C columns; ids range-checked by the forward. */
    qf_status (*embedding_backward)(float *d_table, float *d_pos, const float *d_out, const int32_t *ids,
                                    int64_t skip_id, int64_t N, int64_t period, int64_t C);
    /* bytes of p set to zero */
    qf_status (*zero)(void *p, size_t bytes);

    /* ---- memory and graphs of a model placed on this backend (NULL in the CPU table, whose
     * models use host memory and run every call directly) */
    qf_status (*alloc)(void **out, size_t bytes);     /* *out = NULL on failure                  */
    void (*free)(void *p);                            /* NULL allowed                            */
    /* Waits for the queued work; reports the first asynchronous error. */
    qf_status (*synchronize)(void);
    /* The calls made between capture_begin and capture_end (on this host thread) are recorded,
     * not run, into *graph (opaque). graph_launch queues a replay; it sets *stale = 1 and
     * queues nothing when a scratch buffer the graph uses has been reallocated since it was
     * captured (the caller then captures again). A failed capture leaves no capture open. */
    qf_status (*capture_begin)(void);
    qf_status (*capture_end)(void **graph);
    qf_status (*graph_launch)(void *graph, int *stale);
    void (*graph_free)(void *graph);
} qf_backend;

/* The backend for host pointers. */
const qf_backend *qf_backend_cpu(void);
/* The CPU bodies of the public forward ops that dispatch on qf_backend_for (layernorm.c, gelu.c,
 * residual.c): same arguments, checks and results, host memory only; the CPU table calls these. */
qf_status qf_cpu_layernorm_forward(float *out, float *mean, float *rstd, const float *in, const float *weight,
                                   const float *bias, int64_t N, int64_t C, float eps);
qf_status qf_cpu_gelu_forward(float *out, const float *in, int64_t n, qf_gelu_kind kind);
qf_status qf_cpu_residual_forward(float *out, const float *a, const float *b, int64_t n);

/* The backend whose memory holds the n tensors ptrs[i] (NULL entries are skipped), names[i] for
 * the message: the CPU unless the CUDA backend is built, initialised (qf_cuda_init) and the
 * pointers are in GPU memory; QF_ERR_ARG naming two tensors on different sides. (dispatch.c) */
qf_status qf_backend_for(const char *op, const void *const *ptrs, const char *const *names, int n,
                         const qf_backend **out);

#ifdef QF_FAKE_DEVICE
/* fake_device.c: the test-only stand-in GPU (host memory), which placement uses for "cuda" */
const qf_backend *qf_backend_fake(void);
#endif

#ifdef QF_HAVE_CUDA
/* src/backend/cuda/: the GPU backend, and whether the CUDA runtime has been initialised here
 * (until then no pointer is asked about, so CPU-only callers never create a GPU context). */
const qf_backend *qf_backend_cuda(void);
int qf_cuda_active(void);
/* 1 if p is GPU (device or managed) memory, 0 for host memory or unknown pointers. */
int qf_cuda_is_device_ptr(const void *p);
/* bfloat16 SDPA (src/backend/cuda/sdpa_bf16.cu): pr validated by sdpa.c, every pointer device
 * memory, uint16_t elements are bf16 bit patterns; lse float32 (forward: optional). Dropout,
 * head dims above 128: QF_ERR_UNSUPPORTED. */
qf_status qf_cuda_sdpa_forward_bf16(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k,
                                    const uint16_t *v, uint16_t *out, float *lse);
qf_status qf_cuda_sdpa_backward_bf16(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k,
                                     const uint16_t *v, const uint16_t *out, const float *lse,
                                     const uint16_t *grad_out, uint16_t *dq, uint16_t *dk, uint16_t *dv);
/* *index = the first i < n with x[i] (bf16, device memory) NaN or +-Inf, or n; *value = x[*index]. */
qf_status qf_cuda_find_nonfinite_bf16(const uint16_t *x, size_t n, size_t *index, float *value);
#endif

#endif
