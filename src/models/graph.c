/* graph.c - replaying a model's forward as one captured graph per input shape (models_internal.h).
 *
 * Invariants: a graph is replayed only for the exact key it was captured with and only while
 * the backend says its scratch buffers are the ones it captured (graph_launch's stale flag);
 * the first call for a key runs the body eagerly (so every scratch buffer reaches its size
 * before capture) and then captures it for the next call. A backend without graphs, a capture
 * that fails (the body then simply keeps running eagerly) or *off set means eager every time. */
#include "models_internal.h"

#include <string.h>

qf_status qf_model_graph_run(const qf_backend *be, qf_model_graph *g, const int64_t *key, int nkey,
                             qf_status (*body)(void *ctx), void *ctx) {
    if (nkey > QF_MODEL_GRAPH_KEY) nkey = QF_MODEL_GRAPH_KEY;
    int64_t k[QF_MODEL_GRAPH_KEY] = {0};
    memcpy(k, key, (size_t)nkey * sizeof *k);
    if (g->graph && !memcmp(k, g->key, sizeof k)) {
        int stale = 0;
        QF_TRY(be->graph_launch(g->graph, &stale));
        if (!stale) return QF_OK;
    }
    qf_model_graph_drop(be, g);
    QF_TRY(body(ctx));
    if (g->off || !be->capture_begin) return QF_OK;
    if (be->capture_begin() != QF_OK) {
        g->off = 1; /* cannot capture here: eager from now on */
        return QF_OK;
    }
    qf_status s = body(ctx);
    void *graph = NULL;
    qf_status e = be->capture_end(&graph);
    if (s != QF_OK || e != QF_OK) {
        if (graph) be->graph_free(graph);
        g->off = 1;
        return QF_OK; /* the eager run above already produced this call's result */
    }
    g->graph = graph;
    memcpy(g->key, k, sizeof k);
    return QF_OK;
}

void qf_model_graph_drop(const qf_backend *be, qf_model_graph *g) {
    if (g->graph && be && be->graph_free) be->graph_free(g->graph);
    g->graph = NULL;
}
