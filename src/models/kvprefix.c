/* kvprefix.c - BLIP-2 Q-Former with KV-prefix modulation (model_type "blip2_kv_prefix"): a global
 * feature g steers every cross-attention layer through P extra key/value tokens. Forward and
 * backward side by side: the CPU forward on qf_linear_*, qf_gelu_*, the GPU forward and the
 * backward (both devices) on the backend table, and the Q-Former core (qformer.c).
 * docs/kv_prefix.md states the design and the choices made where the spec is silent.
 *
 *   h   = feature_proj.2(GELU_erf(feature_proj.0(g)))         g [B,F] -> h [B,hidden]
 *   p   = prefix_tokens[0] (broadcast over B) + h[:,None,:]    [B,P,hidden]
 *   pk  = k_proj(p), pv = v_proj(p)                            [B,P,hidden] (heads split by the core)
 *   out = Q-Former(query_embeds or query_tokens, encoder_hidden_states, prefix_k = pk, prefix_v = pv)
 * The same pk/pv are prepended (before the layer's own encoder keys/values) in EVERY
 * cross-attention layer and are always attended (the encoder mask is extended with ones).
 * language_projection (optional in the checkpoint) is applied by qf_kvprefix_project; its backward,
 * qf_kvprefix_project_backward, is separate because the projection sits after the Q-Former output
 * that qf_kvprefix_backward starts from (a caller chains the two).
 *
 * Checkpoint: query_tokens [1,nq,hidden]; Q-Former under "qformer." (config "qformer_config");
 * kv_prefix.feature_proj.0.{weight [F,F],bias}, kv_prefix.feature_proj.2.{weight [hidden,F],bias},
 * kv_prefix.prefix_tokens [1,P,hidden], kv_prefix.k_proj.*, kv_prefix.v_proj.* [hidden,hidden];
 * optional language_projection.{weight [D,hidden],bias [D]}.
 *
 * Invariants:
 *   - Own parameters in one float buffer and their gradients in another (ptab, llm.c style); the
 *     Q-Former keeps its own. Gradients accumulate until qf_kvprefix_zero_grad (language_projection's
 *     only through qf_kvprefix_project_backward).
 *   - fwd/bwd are grow-only planned blocks; fwd keeps copies of the inputs.
 *   - have_fwd only after a fully successful forward; backward refuses without one.
 *   - Placement (qf_kvprefix_to_device): be holds run_params, the block every parameter view
 *     points into (params itself on the CPU, a device copy on the GPU); the Q-Former is placed
 *     with the model. On the GPU the forward after its input copies is one captured graph per
 *     key (every shape and flag that changes the calls, and the planned blocks' addresses).
 *   - Backward runs through the backend table (m->be), one code on the CPU and the GPU. On the
 *     GPU the parameter gradients accumulate in the device block dgrads and reach grads only
 *     when shown (qf_kvprefix_param) or when the model moves back to the CPU; bf16 weights are
 *     refused by backward (float32 products only). */
#include "models_internal.h"
#include "qformer_internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KV_NP = 13 };

typedef struct {
    const char *name;
    int ndim;
    int64_t shape[3];
    size_t off, n;
    int trained;                    /* 0: reported with grad NULL */
} kv_ptab;

struct qf_kvprefix {
    int64_t H, F, P, nq, D;         /* hidden, prefix_feature_dim, prefix tokens, queries, proj dim (0 = none) */
    qf_qformer *qf;
    int np;
    kv_ptab ptab[KV_NP];
    float *params, *grads;
    const float *qtok, *w0, *b0, *w2, *b2, *ptok, *wk, *bk, *wv, *bv, *wp, *bp;
    int nq_params;
    char **q_names;                 /* "qformer." + the core's name */

    float *fwd;
    size_t fwd_cap;
    float *g_in, *pre0, *act0, *h, *pt, *pk, *pv, *queries;
    float *bwd;                     /* on be (device memory on the GPU)                        */
    size_t bwd_cap;
    float *g_pk, *g_pv, *g_pt, *g_tmp, *g_h, *g_act, *g_query;
    float *g_feat;                  /* GPU only: grad_global_feature staged in bwd             */
    int32_t *item_of;               /* [B*P] b of prefix row b*P+i (its item), in bwd          */
    int32_t *hitem;                 /* the same rows built on the host, then copied            */
    size_t hitem_cap;
    int64_t B, Lq;
    int own_queries, have_fwd;

    /* placement (qf_kvprefix_to_device): on the GPU, run_params and params_bf16 (bf16 weights)
     * are device copies, dfwd the planned device block (g_in, pre0, act0, h, pt and dscreen
     * point into it there; pk/pv/queries are the Q-Former's own buffers), dproj the block of
     * qf_kvprefix_project, graph the captured forward. */
    const qf_backend *be;
    int on_device;
    size_t params_total;
    float *run_params;
    uint16_t *params_bf16;
    float *dfwd, *dproj;
    size_t dfwd_cap, dproj_cap;
    int64_t *dscreen;               /* [1] first non-finite index of global_feature           */
    qf_model_graph graph;
    /* A GPU model's parameter gradients (the Q-Former's pattern, qformer_internal.h): a device
     * block parallel to run_params, allocated at the first GPU backward from grads and
     * accumulated there; grads_on_device = 1 while it is newer than grads, which
     * qf_kvprefix_param and moving the model back to the CPU download first (sync_grads). */
    float *dgrads;
    int grads_on_device;
};

static void add_param(qf_kvprefix *m, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2,
                      int trained, size_t *off) {
    kv_ptab *p = &m->ptab[m->np++];
    p->name = name;
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->shape[2] = d2;
    p->n = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    p->off = *off;
    p->trained = trained;
    *off += qf_align_up(p->n, 16);
}

/* Points the parameter views into run_params (host or device). */
static void bind_params(qf_kvprefix *m) {
    const kv_ptab *t = m->ptab;
    const float *P_ = m->run_params;
    m->qtok = P_ + t[0].off;
    m->w0 = P_ + t[1].off;
    m->b0 = P_ + t[2].off;
    m->w2 = P_ + t[3].off;
    m->b2 = P_ + t[4].off;
    m->ptok = P_ + t[5].off;
    m->wk = P_ + t[6].off;
    m->bk = P_ + t[7].off;
    m->wv = P_ + t[8].off;
    m->bv = P_ + t[9].off;
    if (m->D) {
        m->wp = P_ + t[10].off;
        m->bp = P_ + t[11].off;
    }
}

/* The gradient of parameter view p: in grads on the CPU, in dgrads on the GPU. */
static float *kv_grad(const qf_kvprefix *m, const float *p) {
    return (m->on_device ? m->dgrads : m->grads) + (p - m->run_params);
}

static qf_status cfg_int(const qf_config *cfg, const char *path, const char *key, int64_t *out) {
    qf_status s = qf_config_int(cfg, key, out);
    if (s != QF_OK) return qf_fail_prefix(s, "qf_kvprefix_load");
    if (*out < 1 || *out > (1 << 20))
        return qf_fail(QF_ERR_FORMAT, "qf_kvprefix_load: %s: config key \"%s\" = %lld is out of range [1, 2^20]",
                       path, key, (long long)*out);
    return QF_OK;
}

static qf_status load_into(qf_kvprefix *m, const char *folder) {
    const char *fn = "qf_kvprefix_load";
    char path[4096], stpath[4096];
    if (snprintf(path, sizeof path, "%s/config.json", folder) >= (int)sizeof path ||
        snprintf(stpath, sizeof stpath, "%s/model.safetensors", folder) >= (int)sizeof stpath)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    qf_config *cfg = NULL;
    qf_safetensors *st = NULL;
    qf_status s = qf_config_load(path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    const char *mt = NULL;
    s = qf_config_string(cfg, "model_type", &mt);
    if (s != QF_OK)
        s = qf_fail_prefix(s, "%s", fn);
    else if (strcmp(mt, "blip2_kv_prefix"))
        s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not \"blip2_kv_prefix\"", fn, path, mt);
    if (s == QF_OK) s = cfg_int(cfg, path, "num_query_tokens", &m->nq);
    if (s == QF_OK) s = cfg_int(cfg, path, "num_prefix_tokens", &m->P);
    if (s == QF_OK) s = cfg_int(cfg, path, "prefix_feature_dim", &m->F);
    if (s == QF_OK) {
        s = qf_st_open(stpath, &st);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", fn);
    }
    if (s == QF_OK) {
        s = qf_qformer_load_parts(cfg, "qformer_config.", st, "qformer.", &m->qf);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s: %s", fn, folder);
    }
    qf_qformer_config qc;
    if (s == QF_OK) s = qf_qformer_get_config(m->qf, &qc);
    qf_tensor_view lp;
    int has_proj = 0;
    if (s == QF_OK) {
        has_proj = qf_st_find(st, "language_projection.weight", &lp) == QF_OK;
        qf_clear_error();
        if (has_proj && lp.ndim != 2)
            s = qf_fail(QF_ERR_SHAPE, "%s: %s: tensor \"language_projection.weight\" has %d dims, expected 2 "
                        "[text_hidden, %lld]", fn, stpath, lp.ndim, (long long)qc.hidden_size);
    }
    if (s == QF_OK) {
        const int64_t H = qc.hidden_size, F = m->F, P = m->P;
        m->H = H;
        m->D = has_proj ? lp.shape[0] : 0;
        size_t off = 0;
        add_param(m, "query_tokens", 3, 1, m->nq, H, 1, &off);
        add_param(m, "kv_prefix.feature_proj.0.weight", 2, F, F, 0, 1, &off);
        add_param(m, "kv_prefix.feature_proj.0.bias", 1, F, 0, 0, 1, &off);
        add_param(m, "kv_prefix.feature_proj.2.weight", 2, H, F, 0, 1, &off);
        add_param(m, "kv_prefix.feature_proj.2.bias", 1, H, 0, 0, 1, &off);
        add_param(m, "kv_prefix.prefix_tokens", 3, 1, P, H, 1, &off);
        add_param(m, "kv_prefix.k_proj.weight", 2, H, H, 0, 1, &off);
        add_param(m, "kv_prefix.k_proj.bias", 1, H, 0, 0, 1, &off);
        add_param(m, "kv_prefix.v_proj.weight", 2, H, H, 0, 1, &off);
        add_param(m, "kv_prefix.v_proj.bias", 1, H, 0, 0, 1, &off);
        if (has_proj) {
            add_param(m, "language_projection.weight", 2, m->D, H, 0, 1, &off);
            add_param(m, "language_projection.bias", 1, m->D, 0, 0, 1, &off);
        }
        m->params_total = off;
        if (posix_memalign((void **)&m->params, 64, off * sizeof(float)) ||
            posix_memalign((void **)&m->grads, 64, off * sizeof(float)))
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * off);
        else
            memset(m->grads, 0, off * sizeof(float));
    }
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const kv_ptab *p = &m->ptab[i];
        s = qf_st_read_f32(st, p->name, p->ndim, p->shape, m->params + p->off);
        if (s != QF_OK)
            s = qf_fail_prefix(s, "%s (blip2_kv_prefix, hidden %lld, %lld prefix tokens, prefix_feature_dim %lld)", fn,
                               (long long)m->H, (long long)m->P, (long long)m->F);
    }
    if (s == QF_OK) {
        m->nq_params = qf_qformer_num_params(m->qf);
        s = qf_model_prefixed_qformer_names(m->qf, "qformer.", fn, &m->q_names);
    }
    if (s == QF_OK) {
        m->be = qf_backend_cpu();
        m->run_params = m->params;
        bind_params(m);
    }
    qf_st_close(st);
    qf_config_free(cfg);
    return s;
}

qf_status qf_kvprefix_load(const char *folder, qf_kvprefix **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_kvprefix_load: out is NULL");
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "qf_kvprefix_load: folder is NULL");
    qf_kvprefix *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "qf_kvprefix_load: cannot allocate the model");
    qf_status s = load_into(m, folder);
    if (s != QF_OK) {
        qf_kvprefix_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

static void release_device(qf_kvprefix *m);

void qf_kvprefix_free(qf_kvprefix *m) {
    if (!m) return;
    release_device(m);
    qf_qformer_free(m->qf);
    free(m->q_names);               /* one block (models_internal.h) */
    free(m->params);
    free(m->grads);
    free(m->fwd);
    free(m->hitem);
    free(m);
}

qf_qformer *qf_kvprefix_qformer(qf_kvprefix *m) { return m ? m->qf : NULL; }

qf_status qf_kvprefix_get_shape(const qf_kvprefix *m, qf_kvprefix_shape *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_kvprefix_get_shape: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_kvprefix_get_shape: out is NULL");
    out->hidden_size = m->H;
    out->num_query_tokens = m->nq;
    out->num_prefix_tokens = m->P;
    out->prefix_feature_dim = m->F;
    out->projection_dim = m->D;
    return QF_OK;
}

/* ---- planned buffers ---- */

static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

static size_t plan_forward(qf_kvprefix *m, float *base, int64_t B, int64_t Lq) {
    const size_t H = (size_t)m->H, F = (size_t)m->F, BP = (size_t)(B * m->P);
    size_t off = 0;
    m->g_in = carve(base, &off, (size_t)B * F);
    m->pre0 = carve(base, &off, (size_t)B * F);
    m->act0 = carve(base, &off, (size_t)B * F);
    m->h = carve(base, &off, (size_t)B * H);
    m->pt = carve(base, &off, BP * H);
    m->pk = carve(base, &off, BP * H);
    m->pv = carve(base, &off, BP * H);
    m->queries = carve(base, &off, (size_t)(B * Lq) * H);
    return off;
}

static size_t plan_backward(qf_kvprefix *m, float *base) {
    const size_t H = (size_t)m->H, F = (size_t)m->F, B = (size_t)m->B, BP = B * (size_t)m->P;
    size_t off = 0;
    m->g_pk = carve(base, &off, BP * H);
    m->g_pv = carve(base, &off, BP * H);
    m->g_pt = carve(base, &off, BP * H);
    m->g_tmp = carve(base, &off, BP * H);
    m->g_h = carve(base, &off, B * H);
    m->g_act = carve(base, &off, B * F);
    m->g_query = carve(base, &off, B * (size_t)m->Lq * H);
    m->item_of = (int32_t *)carve(base, &off, BP); /* int32 and float are both 4 bytes */
    m->g_feat = m->on_device ? carve(base, &off, B * F) : NULL;
    return off;
}

/* After a backward's work is queued: on the GPU, dgrads is the newest copy (even after a
 * failure: it may have changed) and the call waits, so nothing still runs on bwd or the
 * caller's buffers. */
static qf_status finish_backward(qf_kvprefix *m, qf_status s) {
    if (!m->on_device) return s;
    m->grads_on_device = 1;
    qf_status s2 = m->be->synchronize();
    return s == QF_OK ? s2 : s;
}

/* ---- forward on a device (qf_kvprefix_to_device) ----
 * The same computation as the CPU forward below, written as backend calls: the MLP on the
 * global feature, the prefix tokens (h copied into each of the P rows of its item, then the
 * prefix_tokens table added by add_periodic), the prefix K/V projections written straight into
 * the Q-Former's prefix buffers, the model's query tokens broadcast into its query buffer, then
 * the Q-Former's layers; everything after the input copies is one graph per key.
 * Measured (H100 + 16-core Xeon, 2026-11-23; BLIP-2-size random model: 12 layers, cross every 2,
 * 257 x 1408 encoder tokens, 32 queries, 8 prefix tokens, global feature 1408; numpy in and
 * out, so the copies and the final wait are included): B=1 CPU 20.9 ms, GPU f32 1.70 ms, bf16
 * 1.09 ms; B=8 138 / 4.82 / 2.32 ms; B=32 483 / 17.4 / 9.70 ms. */

/* out = in · wᵀ + b on m's backend (bf16 weights when placed so) */
static qf_status kv_linear(const qf_kvprefix *m, float *out, const float *in, const float *w, const float *b,
                           int64_t rows, int64_t Cin, int64_t Cout) {
    const uint16_t *w16 = m->params_bf16 ? m->params_bf16 + (w - m->run_params) : NULL;
    return qf_model_linear(m->be, out, in, w, w16, b, NULL, rows, Cin, Cout);
}

static size_t plan_device(qf_kvprefix *m, float *base, int64_t B) {
    const size_t H = (size_t)m->H, F = (size_t)m->F, BP = (size_t)(B * m->P);
    size_t off = 0;
    m->g_in = carve(base, &off, (size_t)B * F);
    m->pre0 = carve(base, &off, (size_t)B * F);
    m->act0 = carve(base, &off, (size_t)B * F);
    m->h = carve(base, &off, (size_t)B * H);
    m->pt = carve(base, &off, BP * H);
    m->dscreen = (int64_t *)carve(base, &off, 4);
    return off;
}

static qf_status device_body(void *ctx) {
    qf_kvprefix *m = ctx;
    const qf_backend *be = m->be;
    qf_qformer *qf = m->qf;
    const int64_t B = m->B, F = m->F, H = m->H, P = m->P;
    QF_TRY(kv_linear(m, m->pre0, m->g_in, m->w0, m->b0, B, F, F));
    QF_TRY(be->gelu_forward(m->act0, m->pre0, B * F, QF_GELU_ERF));
    QF_TRY(kv_linear(m, m->h, m->act0, m->w2, m->b2, B, F, H));
    /* pt[b, i, :] = h[b, :] + prefix_tokens[i, :]: h into row i of every item (one strided copy
     * per prefix row), then the table added over each group of P rows */
    const size_t row = (size_t)H * sizeof(float);
    for (int64_t i = 0; i < P; i++) QF_TRY(be->copy2d(m->pt + i * H, (size_t)P * row, m->h, row, row, (size_t)B));
    QF_TRY(be->add_periodic(m->pt, m->pt, m->ptok, B * P, P, H));
    QF_TRY(kv_linear(m, qf->pk, m->pt, m->wk, m->bk, B * P, H, H));
    QF_TRY(kv_linear(m, qf->pv, m->pt, m->wv, m->bv, B * P, H, H));
    /* the CPU Q-Former screens its prefix inputs; so does this (an overflow in the projections) */
    QF_TRY(be->screen_nonfinite(qf->pk, B * P * H, qf->screen + 2));
    QF_TRY(be->screen_nonfinite(qf->pv, B * P * H, qf->screen + 3));
    if (m->own_queries) QF_TRY(be->add_periodic(qf->qin, NULL, m->qtok, B * m->Lq, m->Lq, H));
    return qf_qformer_run(qf);
}

static qf_status forward_device(qf_kvprefix *m, const qf_qformer_args *a, const float *global_feature,
                                const float *query_embeds, const float *encoder_hidden_states, float *out) {
    const char *fn = "qf_kvprefix_forward";
    const qf_backend *be = m->be;
    qf_qformer *qf = m->qf;
    const int64_t B = a->B, Lq = a->num_queries, S = a->encoder_len, H = m->H, F = m->F;
    const int64_t E = qf->cfg.encoder_hidden_size;
    if (!encoder_hidden_states) return qf_fail(QF_ERR_ARG, "%s: encoder_hidden_states is NULL", fn);
    const size_t need = plan_device(m, NULL, B);
    if (need > m->dfwd_cap) {
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        m->dfwd = NULL;
        m->dfwd_cap = 0;
        QF_TRY(be->alloc((void **)&m->dfwd, need * sizeof(float)));
        m->dfwd_cap = need;
    }
    plan_device(m, m->dfwd, B);
    /* the prefix is written by the graph; stage only needs non-NULL prefix pointers (it ignores
     * the float pointers of its args) */
    qf_qformer_args qa = *a;
    qa.prefix_len = m->P;
    qa.prefix_k = qa.prefix_v = global_feature;
    qf_status s = qf_qformer_stage(qf, &qa, fn);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    m->B = B;
    m->Lq = Lq;
    m->own_queries = !query_embeds;

    /* inputs into the planned buffers (host or device pointers), screened on the way in; the
     * Q-Former's screen slots (reset by stage) hold the verdicts on its query and encoder rows */
    int64_t screen = INT64_MAX;
    QF_TRY(be->copy2d(m->dscreen, sizeof screen, &screen, sizeof screen, sizeof screen, 1));
    size_t n = (size_t)(B * F) * sizeof(float);
    QF_TRY(be->copy2d(m->g_in, n, global_feature, n, n, 1));
    QF_TRY(be->screen_nonfinite(m->g_in, B * F, m->dscreen));
    n = (size_t)(B * S * E) * sizeof(float);
    QF_TRY(be->copy2d(qf->enc, n, encoder_hidden_states, n, n, 1));
    QF_TRY(be->screen_nonfinite(qf->enc, B * S * E, qf->screen + 1));
    if (query_embeds) {
        n = (size_t)(B * Lq * H) * sizeof(float);
        QF_TRY(be->copy2d(qf->qin, n, query_embeds, n, n, 1));
        QF_TRY(be->screen_nonfinite(qf->qin, B * Lq * H, qf->screen + 0));
    }
    /* the key: every shape and flag that changes the calls (P, text_len = 0 and no dead item
     * are fixed for this model), and the planned blocks' addresses (the Q-Former's move when
     * its plan grows) */
    const int64_t key[8] = {B, S, Lq, qf->has_enc_mask, m->own_queries, (int64_t)(intptr_t)qf->fwd,
                            (int64_t)(intptr_t)qf->mir, (int64_t)(intptr_t)m->dfwd};
    QF_TRY(qf_model_graph_run(be, &m->graph, key, 8, device_body, m));
    n = (size_t)(B * Lq * H) * sizeof(float);
    QF_TRY(be->copy2d(out, n, qf_qformer_result(qf), n, n, 1));
    /* the one wait: the output is final, then the screens' verdicts */
    QF_TRY(be->synchronize());
    int64_t qs[4];
    QF_TRY(be->copy2d(&screen, sizeof screen, m->dscreen, sizeof screen, sizeof screen, 1));
    QF_TRY(be->copy2d(qs, sizeof qs, qf->screen, sizeof qs, sizeof qs, 1));
    static const char *const names[5] = {"global_feature", "query_embeds", "encoder_hidden_states",
                                         "prefix_k (from global_feature)", "prefix_v (from global_feature)"};
    const int64_t at[5] = {screen, qs[0], qs[1], qs[2], qs[3]};
    const float *bufs[5] = {m->g_in, qf->qin, qf->enc, qf->pk, qf->pv};
    for (int i = 0; i < 5; i++) {
        if (at[i] == INT64_MAX) continue;
        float v = NAN;
        (void)be->copy2d(&v, sizeof v, bufs[i] + at[i], sizeof v, sizeof v, 1);
        return qf_fail(QF_ERR_NONFINITE, "%s: %s[%lld] = %g is not finite", fn, names[i], (long long)at[i],
                       (double)v);
    }
    /* the staged Q-Former forward (qf_qformer_stage leaves its have_fwd 0) is complete and
     * screened: its backward may differentiate it */
    m->qf->have_fwd = 1;
    m->have_fwd = 1;
    return QF_OK;
}

/* in [rows, H] -> out [rows, D] through language_projection on the device (host or device
 * pointers); its own block, so the forward's graph is untouched. */
static qf_status grow_dproj(qf_kvprefix *m, size_t need) {
    if (need <= m->dproj_cap) return QF_OK;
    m->be->free(m->dproj);
    m->dproj = NULL;
    m->dproj_cap = 0;
    QF_TRY(m->be->alloc((void **)&m->dproj, need * sizeof(float)));
    m->dproj_cap = need;
    return QF_OK;
}

static qf_status project_device(qf_kvprefix *m, int64_t rows, const float *in, float *out) {
    const qf_backend *be = m->be;
    QF_TRY(grow_dproj(m, (size_t)rows * (size_t)(m->H + m->D)));
    float *din = m->dproj, *dout = m->dproj + rows * m->H;
    size_t n = (size_t)(rows * m->H) * sizeof(float);
    QF_TRY(be->copy2d(din, n, in, n, n, 1));
    QF_TRY(kv_linear(m, dout, din, m->wp, m->bp, rows, m->H, m->D));
    n = (size_t)(rows * m->D) * sizeof(float);
    QF_TRY(be->copy2d(out, n, dout, n, n, 1));
    return be->synchronize();
}

/* the device gradient block at the first GPU backward (placement.c) */
static qf_status device_grads(qf_kvprefix *m, const char *fn) {
    return qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->grads, m->params_total, &m->grads_on_device, fn);
}

/* grads = dgrads when the device copy is newer (placement.c) */
static qf_status sync_grads(qf_kvprefix *m) {
    return qf_model_sync_grads(m->be, m->grads, m->dgrads, m->params_total, &m->grads_on_device);
}

/* Frees what the model holds on a device (the Q-Former's are its own; the gradients are
 * downloaded first) and the planned backward block on either side; views are rebound by the
 * caller. */
static void release_device(qf_kvprefix *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        be->free(m->dproj);
        be->free(m->run_params);
        be->free(m->params_bf16);
        be->free(m->bwd);
        (void)sync_grads(m); /* grads keeps the newest gradients */
        be->free(m->dgrads);
    } else {
        free(m->bwd);
    }
    m->bwd = m->dgrads = NULL;
    m->bwd_cap = 0;
    m->grads_on_device = 0;
    m->dfwd = m->dproj = NULL;
    m->dfwd_cap = m->dproj_cap = 0;
    m->params_bf16 = NULL;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = qf_backend_cpu();
    m->run_params = m->params;
}

qf_status qf_kvprefix_to_device(qf_kvprefix *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_kvprefix_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    /* the Q-Former first: it checks device and weights and starts the GPU */
    qf_status s = qf_qformer_to_device(m->qf, device, weights);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    release_device(m);
    bind_params(m);
    free(m->fwd); /* the CPU's planned block is not used on a device */
    m->fwd = NULL;
    m->fwd_cap = 0;
    if (strcmp(device, "cuda")) return QF_OK;
    const qf_backend *be = m->qf->be;
    float *dp;
    uint16_t *db;
    s = qf_model_upload_params(be, m->params, m->params_total, 0, weights, &dp, &db, fn);
    if (s != QF_OK) {
        (void)qf_qformer_to_device(m->qf, "cpu", QF_F32);
        return s;
    }
    m->be = be;
    m->on_device = 1;
    m->graph.off = qf_model_graphs_off();
    m->run_params = dp;
    m->params_bf16 = db;
    bind_params(m);
    return QF_OK;
}

/* ---- forward ---- */

qf_status qf_kvprefix_forward(qf_kvprefix *m, const qf_qformer_args *a, const float *global_feature,
                              const float *query_embeds, const float *encoder_hidden_states, float *out) {
    const char *fn = "qf_kvprefix_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!global_feature) return qf_fail(QF_ERR_ARG, "%s: global_feature is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    const int64_t B = a->B, Lq = a->num_queries, H = m->H, F = m->F, P = m->P;
    if (B < 1 || B > (1 << 24)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 .. 2^24", fn, (long long)B);
    if (a->prefix_len || a->prefix_k || a->prefix_v)
        return qf_fail(QF_ERR_ARG, "%s: args.prefix_len/prefix_k/prefix_v must be 0/NULL: the prefix comes from "
                       "global_feature", fn);
    if (a->text_len)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: args.text_len = %lld: a blip2_kv_prefix Q-Former has no text tokens",
                       fn, (long long)a->text_len);
    if (!query_embeds && Lq != m->nq)
        return qf_fail(QF_ERR_ARG, "%s: query_embeds is NULL (use the model's query_tokens) but args.num_queries = "
                       "%lld differs from num_query_tokens = %lld", fn, (long long)Lq, (long long)m->nq);
    if (Lq < 1 || Lq > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: num_queries = %lld, expected 1 .. 2^24", fn, (long long)Lq);
    m->have_fwd = 0;
    if (m->on_device) return forward_device(m, a, global_feature, query_embeds, encoder_hidden_states, out);
    size_t need = plan_forward(m, NULL, B, Lq);
    QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, need, fn));
    plan_forward(m, m->fwd, B, Lq);
    m->B = B;
    m->Lq = Lq;
    m->own_queries = !query_embeds;

    memcpy(m->g_in, global_feature, (size_t)(B * F) * sizeof(float));
    QF_TRY(qf_linear_forward(m->pre0, m->g_in, m->w0, m->b0, B, F, F));
    QF_TRY(qf_gelu_forward(m->act0, m->pre0, B * F, QF_GELU_ERF));
    QF_TRY(qf_linear_forward(m->h, m->act0, m->w2, m->b2, B, F, H));
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < P; i++) {
            float *dst = m->pt + (b * P + i) * H;
            const float *t = m->ptok + i * H, *hb = m->h + b * H;
            for (int64_t c = 0; c < H; c++) dst[c] = t[c] + hb[c];
        }
    QF_TRY(qf_linear_forward(m->pk, m->pt, m->wk, m->bk, B * P, H, H));
    QF_TRY(qf_linear_forward(m->pv, m->pt, m->wv, m->bv, B * P, H, H));
    if (query_embeds)
        memcpy(m->queries, query_embeds, (size_t)(B * Lq * H) * sizeof(float));
    else
        for (int64_t b = 0; b < B; b++) memcpy(m->queries + b * Lq * H, m->qtok, (size_t)(Lq * H) * sizeof(float));

    qf_qformer_args qa = *a;
    qa.prefix_len = P;
    qa.prefix_k = m->pk;
    qa.prefix_v = m->pv;
    qf_status s = qf_qformer_forward(m->qf, &qa, m->queries, encoder_hidden_states, out);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    m->have_fwd = 1;
    return QF_OK;
}

qf_status qf_kvprefix_project(qf_kvprefix *m, int64_t rows, const float *in, float *out) {
    const char *fn = "qf_kvprefix_project";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!in || !out) return qf_fail(QF_ERR_ARG, "%s: in/out is NULL", fn);
    if (!m->D)
        return qf_fail(QF_ERR_NOT_FOUND, "%s: the checkpoint has no language_projection.weight", fn);
    if (m->on_device) {
        if (rows < 0 || rows > (1 << 24))
            return qf_fail(QF_ERR_ARG, "%s: rows = %lld, expected 0 .. 2^24", fn, (long long)rows);
        return rows ? project_device(m, rows, in, out) : QF_OK;
    }
    return qf_linear_forward(out, in, m->wp, m->bp, rows, m->H, m->D);
}

qf_status qf_kvprefix_project_backward(qf_kvprefix *m, int64_t rows, const float *in, const float *grad_out,
                                       float *grad_in) {
    const char *fn = "qf_kvprefix_project_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!in || !grad_out) return qf_fail(QF_ERR_ARG, "%s: in/grad_out is NULL", fn);
    if (!m->D)
        return qf_fail(QF_ERR_NOT_FOUND, "%s: the checkpoint has no language_projection.weight", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_kvprefix_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (rows < 0 || rows > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: rows = %lld, expected 0 .. 2^24", fn, (long long)rows);
    if (!rows) return QF_OK;
    const qf_backend *be = m->be;
    const int64_t H = m->H, D = m->D;
    const float *x = in, *go = grad_out;
    float *gx = grad_in;
    if (m->on_device) { /* in, grad_out (and grad_in) staged in dproj: [rows, H] | [rows, D] | [rows, H] */
        QF_TRY(grow_dproj(m, (size_t)rows * (size_t)(2 * H + D)));
        float *dx = m->dproj, *dgo = m->dproj + rows * H;
        size_t n = (size_t)(rows * H) * sizeof(float);
        QF_TRY(be->copy2d(dx, n, in, n, n, 1));
        n = (size_t)(rows * D) * sizeof(float);
        QF_TRY(be->copy2d(dgo, n, grad_out, n, n, 1));
        x = dx;
        go = dgo;
        gx = grad_in ? dgo + rows * D : NULL;
    }
    QF_TRY(device_grads(m, fn));
    qf_status s = be->linear_backward(gx, kv_grad(m, m->wp), kv_grad(m, m->bp), go, x, m->wp, rows, H, D);
    if (s == QF_OK && gx != grad_in) {
        const size_t n = (size_t)(rows * H) * sizeof(float);
        s = be->copy2d(grad_in, n, gx, n, n, 1);
    }
    return finish_backward(m, s);
}

/* ---- backward ----
 * One code path for both backends: every op goes through m->be, the parameter gradients into
 * kv_grad (grads, or dgrads on the GPU). grad_out, grad_query_embeds and grad_encoder go to
 * and from the Q-Former's backward and be->copy2d, which take host or device pointers;
 * grad_global_feature is made in bwd and copied out on the GPU. The call returns after the GPU
 * has finished. */

static qf_status backward_body(qf_kvprefix *m, const float *grad_out, float *grad_global_feature,
                               float *grad_query_embeds, float *grad_encoder) {
    const char *fn = "qf_kvprefix_backward";
    const qf_backend *be = m->be;
    const int64_t B = m->B, Lq = m->Lq, H = m->H, F = m->F, P = m->P;
    /* the item of each prefix row (the index embedding_backward sums rows into) */
    if ((size_t)(B * P) > m->hitem_cap) {
        int32_t *p = malloc((size_t)(B * P) * sizeof(int32_t));
        if (!p) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %lld prefix row indices", fn, (long long)(B * P));
        free(m->hitem);
        m->hitem = p;
        m->hitem_cap = (size_t)(B * P);
    }
    for (int64_t r = 0; r < B * P; r++) m->hitem[r] = (int32_t)(r / P);
    const size_t nidx = (size_t)(B * P) * sizeof(int32_t);
    QF_TRY(be->copy2d(m->item_of, nidx, m->hitem, nidx, nidx, 1));

    qf_status s = qf_qformer_backward(m->qf, grad_out, m->g_query, grad_encoder, m->g_pk, m->g_pv);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    if (grad_query_embeds) {
        const size_t n = (size_t)(B * Lq * H) * sizeof(float);
        QF_TRY(be->copy2d(grad_query_embeds, n, m->g_query, n, n, 1));
    }
    /* the model's query tokens, broadcast over the batch: their gradient sums over B */
    if (m->own_queries) QF_TRY(be->embedding_backward(NULL, kv_grad(m, m->qtok), m->g_query, NULL, -1, B * Lq, Lq, H));
    QF_TRY(be->linear_backward(m->g_pt, kv_grad(m, m->wk), kv_grad(m, m->bk), m->g_pk, m->pt, m->wk, B * P, H, H));
    QF_TRY(be->linear_backward(m->g_tmp, kv_grad(m, m->wv), kv_grad(m, m->bv), m->g_pv, m->pt, m->wv, B * P, H, H));
    QF_TRY(be->add(m->g_pt, m->g_pt, m->g_tmp, B * P * H));
    /* pt[b, i] = prefix_tokens[i] + h[b]: prefix_tokens' gradient sums the rows over B (period
     * P), h[b]'s the P rows of item b (table rows item_of) */
    QF_TRY(be->zero(m->g_h, (size_t)(B * H) * sizeof(float)));
    QF_TRY(be->embedding_backward(m->g_h, kv_grad(m, m->ptok), m->g_pt, m->item_of, -1, B * P, P, H));
    QF_TRY(be->linear_backward(m->g_act, kv_grad(m, m->w2), kv_grad(m, m->b2), m->g_h, m->act0, m->w2, B, F, H));
    QF_TRY(be->gelu_backward(m->g_act, m->g_act, m->pre0, B * F, QF_GELU_ERF));
    float *gfeat = grad_global_feature && m->on_device ? m->g_feat : grad_global_feature;
    QF_TRY(be->linear_backward(gfeat, kv_grad(m, m->w0), kv_grad(m, m->b0), m->g_act, m->g_in, m->w0, B, F, F));
    if (gfeat != grad_global_feature) {
        const size_t n = (size_t)(B * F) * sizeof(float);
        QF_TRY(be->copy2d(grad_global_feature, n, gfeat, n, n, 1));
    }
    return QF_OK;
}

qf_status qf_kvprefix_backward(qf_kvprefix *m, const float *grad_out, float *grad_global_feature,
                               float *grad_query_embeds, float *grad_encoder) {
    const char *fn = "qf_kvprefix_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_kvprefix_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_kvprefix_forward to differentiate", fn);
    size_t need = plan_backward(m, NULL);
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, need, fn));
    plan_backward(m, m->bwd);
    QF_TRY(device_grads(m, fn));
    return finish_backward(m, backward_body(m, grad_out, grad_global_feature, grad_query_embeds, grad_encoder));
}

/* ---- parameters ---- */

int qf_kvprefix_num_params(const qf_kvprefix *m) { return m ? m->np + m->nq_params : 0; }

qf_status qf_kvprefix_param(qf_kvprefix *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_kvprefix_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_kvprefix_param: out is NULL");
    if (i < 0 || i >= m->np + m->nq_params)
        return qf_fail(QF_ERR_ARG, "qf_kvprefix_param: index %d is out of range [0, %d)", i, m->np + m->nq_params);
    if (i >= m->np) {
        QF_TRY(qf_qformer_param(m->qf, i - m->np, out));
        out->name = m->q_names[i - m->np];
        return QF_OK;
    }
    QF_TRY(sync_grads(m));
    const kv_ptab *p = &m->ptab[i];
    memset(out, 0, sizeof *out);
    out->name = p->name;
    out->data = m->params + p->off;
    out->grad = p->trained ? m->grads + p->off : NULL;
    out->ndim = p->ndim;
    for (int d = 0; d < p->ndim; d++) out->shape[d] = p->shape[d];
    return QF_OK;
}

void qf_kvprefix_zero_grad(qf_kvprefix *m) {
    if (!m) return;
    qf_qformer_zero_grad(m->qf);
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->params_total * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    if (m->grads) memset(m->grads, 0, m->params_total * sizeof(float));
}
