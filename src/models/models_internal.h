/* models_internal.h - helpers the models in src/models share (not installed). */
#ifndef QF_MODELS_INTERNAL_H
#define QF_MODELS_INTERNAL_H

#include "internal.h"
#include "backend/backend.h"

/* The names of every parameter of qf, in qf_qformer_param order, each with `prefix` in front
 * ("qformer.", "multi_Qformer."): how a model that embeds a Q-Former reports the checkpoint's
 * own names. *names is one allocation (the pointer array followed by the strings): free() it
 * once. fn names the caller in messages. */
qf_status qf_model_prefixed_qformer_names(qf_qformer *qf, const char *prefix, const char *fn, char ***names);

/* 1 when the vision tower runs on a device (qf_vision_to_device), for blip2.c (vision.c). */
int qf_vision_on_device(const qf_vision *m);

/* ---- one captured graph per input shape (graph.c) ----
 * A model placed on a backend with graphs (the GPU) runs the part of its forward that only
 * queues backend calls through qf_model_graph_run: the body runs eagerly and is captured the
 * first time a key (the shape and every flag that changes which calls are made) is seen, and
 * replayed while the key stays the same. off = 1: always eager (QFUSE_CUDA_GRAPHS=0, or a
 * capture failed). */
enum { QF_MODEL_GRAPH_KEY = 8 };
typedef struct {
    void *graph;
    int64_t key[QF_MODEL_GRAPH_KEY];
    int off;
} qf_model_graph;
qf_status qf_model_graph_run(const qf_backend *be, qf_model_graph *g, const int64_t *key, int nkey,
                             qf_status (*body)(void *ctx), void *ctx);
/* Frees the captured graph (when a planned buffer it uses moves, or at free). */
void qf_model_graph_drop(const qf_backend *be, qf_model_graph *g);

/* ---- placing a model on a device (placement.c), for the qf_*_to_device functions ----
 * qf_model_check_device: device "cpu" or "cuda", weights QF_F32 (or QF_BF16 on cuda; `what`
 * names the CPU model in that refusal); starts the GPU for "cuda" and sets *cuda. Changes
 * nothing on failure.
 * qf_model_cuda_backend: the CUDA table (NULL in a build without CUDA).
 * qf_model_upload_params: a device copy of the n-float block host in a new block of n + extra
 * floats (*dev; the extra floats are the caller's) and, for QF_BF16, a bfloat16 copy (*dev_bf16,
 * else NULL), copies finished; on failure nothing stays allocated.
 * qf_model_graphs_off: QFUSE_CUDA_GRAPHS=0 (run every forward eagerly).
 * qf_model_linear: out = in · wᵀ + b (+ res, same row stride as out) on be; w16, when not NULL,
 * is w's bfloat16 copy, which the GEMM reads instead.
 * qf_model_linear_x16: the same with bf16 activations (backend.h, gemm_nt's x_bf16 / out_bf16;
 * only with w16): in16, when not NULL, is read instead of in; out16, when not NULL, receives the
 * result instead of out (then res must be NULL) and b16, b's bf16 copy, is its bias. */
qf_status qf_model_check_device(const char *fn, const char *what, const char *device, qf_dtype weights, int *cuda);
const qf_backend *qf_model_cuda_backend(void);
qf_status qf_model_upload_params(const qf_backend *be, const float *host, size_t n, size_t extra, qf_dtype weights,
                                 float **dev, uint16_t **dev_bf16, const char *fn);
int qf_model_graphs_off(void);
/* A grow-only block of `floats` floats (contents not kept): host memory, 64-byte aligned, when
 * be is NULL or has no allocator (the CPU table); be's memory otherwise (the old block is freed
 * first: the backend waits for queued work that may still read it). `what` names the caller. */
qf_status qf_model_grow(const qf_backend *be, float **buf, size_t *cap, size_t floats, const char *what);
/* A GPU model's parameter gradients (models keep them on the device between backwards and show
 * them on demand): qf_model_device_grads makes *dgrads [n] at the first backward from the host
 * grads (nothing when on_device is 0 or it exists; *grads_on_device = 0 then);
 * qf_model_sync_grads copies dgrads into grads when *grads_on_device (one download and a wait)
 * and clears the flag. */
qf_status qf_model_device_grads(const qf_backend *be, int on_device, float **dgrads, const float *grads, size_t n,
                                int *grads_on_device, const char *fn);
qf_status qf_model_sync_grads(const qf_backend *be, float *grads, const float *dgrads, size_t n, int *grads_on_device);
qf_status qf_model_linear(const qf_backend *be, float *out, const float *in, const float *w, const uint16_t *w16,
                          const float *b, const float *res, int64_t rows, int64_t Cin, int64_t Cout);
qf_status qf_model_linear_x16(const qf_backend *be, float *out, uint16_t *out16, const float *in, const uint16_t *in16,
                              const float *w, const uint16_t *w16, const float *b, const uint16_t *b16,
                              const float *res, int64_t rows, int64_t Cin, int64_t Cout);

#endif
