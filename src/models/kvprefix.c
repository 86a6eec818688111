/* kvprefix.c - BLIP-2 Q-Former with KV-prefix modulation (model_type "blip2_kv_prefix"): a global
 * feature g steers every cross-attention layer through P extra key/value tokens. Forward and
 * backward side by side, on qf_linear_*, qf_gelu_* and the Q-Former core (qformer.c).
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
 *   - have_fwd only after a fully successful forward; backward refuses without one. */
#include "models_internal.h"
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
    float *gqtok, *gw0, *gb0, *gw2, *gb2, *gptok, *gwk, *gbk, *gwv, *gbv, *gwp, *gbp;
    int nq_params;
    char **q_names;                 /* "qformer." + the core's name */

    float *fwd;
    size_t fwd_cap;
    float *g_in, *pre0, *act0, *h, *pt, *pk, *pv, *queries;
    float *bwd;
    size_t bwd_cap;
    float *g_pk, *g_pv, *g_pt, *g_tmp, *g_h, *g_act, *g_query;
    int64_t B, Lq;
    int own_queries, have_fwd;
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
        const kv_ptab *t = m->ptab;
        float *P_ = m->params, *G = m->grads;
        m->qtok = P_ + t[0].off;  m->gqtok = G + t[0].off;
        m->w0 = P_ + t[1].off;    m->gw0 = G + t[1].off;
        m->b0 = P_ + t[2].off;    m->gb0 = G + t[2].off;
        m->w2 = P_ + t[3].off;    m->gw2 = G + t[3].off;
        m->b2 = P_ + t[4].off;    m->gb2 = G + t[4].off;
        m->ptok = P_ + t[5].off;  m->gptok = G + t[5].off;
        m->wk = P_ + t[6].off;    m->gwk = G + t[6].off;
        m->bk = P_ + t[7].off;    m->gbk = G + t[7].off;
        m->wv = P_ + t[8].off;    m->gwv = G + t[8].off;
        m->bv = P_ + t[9].off;    m->gbv = G + t[9].off;
        if (has_proj) {
            m->wp = P_ + t[10].off;   m->gwp = G + t[10].off;
            m->bp = P_ + t[11].off;   m->gbp = G + t[11].off;
        }
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

void qf_kvprefix_free(qf_kvprefix *m) {
    if (!m) return;
    qf_qformer_free(m->qf);
    free(m->q_names);               /* one block (models_internal.h) */
    free(m->params);
    free(m->grads);
    free(m->fwd);
    free(m->bwd);
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

static qf_status grow(float **buf, size_t *cap, size_t floats, const char *what) {
    if (floats <= *cap) return QF_OK;
    void *p = NULL;
    if (posix_memalign(&p, 64, floats * sizeof(float)))
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of activations", what, floats * sizeof(float));
    free(*buf);
    *buf = p;
    *cap = floats;
    return QF_OK;
}

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
    return off;
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
    size_t need = plan_forward(m, NULL, B, Lq);
    QF_TRY(grow(&m->fwd, &m->fwd_cap, need, fn));
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
    return qf_linear_forward(out, in, m->wp, m->bp, rows, m->H, m->D);
}

qf_status qf_kvprefix_project_backward(qf_kvprefix *m, int64_t rows, const float *in, const float *grad_out,
                                       float *grad_in) {
    const char *fn = "qf_kvprefix_project_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!in || !grad_out) return qf_fail(QF_ERR_ARG, "%s: in/grad_out is NULL", fn);
    if (!m->D)
        return qf_fail(QF_ERR_NOT_FOUND, "%s: the checkpoint has no language_projection.weight", fn);
    return qf_linear_backward(grad_in, m->gwp, m->gbp, grad_out, in, m->wp, rows, m->H, m->D);
}

/* ---- backward ---- */

qf_status qf_kvprefix_backward(qf_kvprefix *m, const float *grad_out, float *grad_global_feature,
                               float *grad_query_embeds, float *grad_encoder) {
    const char *fn = "qf_kvprefix_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_kvprefix_forward to differentiate", fn);
    const int64_t B = m->B, Lq = m->Lq, H = m->H, F = m->F, P = m->P;
    size_t need = plan_backward(m, NULL);
    QF_TRY(grow(&m->bwd, &m->bwd_cap, need, fn));
    plan_backward(m, m->bwd);

    qf_status s = qf_qformer_backward(m->qf, grad_out, m->g_query, grad_encoder, m->g_pk, m->g_pv);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    if (grad_query_embeds) memcpy(grad_query_embeds, m->g_query, (size_t)(B * Lq * H) * sizeof(float));
    if (m->own_queries)
        for (int64_t b = 0; b < B; b++) {
            const float *g = m->g_query + b * Lq * H;
            for (int64_t j = 0; j < Lq * H; j++) m->gqtok[j] += g[j];
        }
    QF_TRY(qf_linear_backward(m->g_pt, m->gwk, m->gbk, m->g_pk, m->pt, m->wk, B * P, H, H));
    QF_TRY(qf_linear_backward(m->g_tmp, m->gwv, m->gbv, m->g_pv, m->pt, m->wv, B * P, H, H));
    memset(m->g_h, 0, (size_t)(B * H) * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < P; i++) {
            float *g = m->g_pt + (b * P + i) * H;
            const float *g2 = m->g_tmp + (b * P + i) * H;
            float *gt = m->gptok + i * H, *gh = m->g_h + b * H;
            for (int64_t c = 0; c < H; c++) {
                const float v = g[c] + g2[c];
                gt[c] += v;
                gh[c] += v;
            }
        }
    QF_TRY(qf_linear_backward(m->g_act, m->gw2, m->gb2, m->g_h, m->act0, m->w2, B, F, H));
    QF_TRY(qf_gelu_backward(m->g_act, m->g_act, m->pre0, B * F, QF_GELU_ERF));
    QF_TRY(qf_linear_backward(grad_global_feature, m->gw0, m->gb0, m->g_act, m->g_in, m->w0, B, F, F));
    return QF_OK;
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
    const kv_ptab *last = &m->ptab[m->np - 1];
    memset(m->grads, 0, (last->off + last->n) * sizeof(float));
    qf_qformer_zero_grad(m->qf);
}
