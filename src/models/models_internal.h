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

#endif
