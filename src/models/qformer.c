/* qformer.c - the BLIP-2 Q-Former (transformers' Blip2QFormerModel), loaded from a Hugging Face
 * folder by the checkpoint's tensor names; forward on qf_linear/qf_layernorm/qf_gelu/qf_residual
 * and qf_sdpa_forward. (Backward is the next step: the forward already keeps what it needs.)
 *
 * Semantics, settled against transformers' modeling_blip_2.py (query-only path, eval mode):
 *   h0 = layernorm(query_embeds)                      (the embedding dropout is off in eval)
 *   each layer i:
 *     a = attention.output.LayerNorm(h + attention.output.dense(MHA(h, h)))
 *     if i % cross_attention_frequency == 0:
 *       a = crossattention.output.LayerNorm(a + crossattention.output.dense(MHA(a, enc)))
 *     h = output_query.LayerNorm(a + output_query.dense(act(intermediate_query.dense(a))))
 *   MHA(x, y): q = query(x), k = key(y), v = value(y) split into heads [B,H,len,hd],
 *   softmax(q k^T / sqrt(hd) + mask) v, heads merged back. The self-attention has no mask (the
 *   Q-Former's own attention_mask defaults to all ones). encoder_attention_mask [B,S] becomes an
 *   SDPA bool mask [B,1,1,S] (transformers adds finfo.min on padding: weight exactly 0 after the
 *   softmax, the same as blocking). A batch item whose every encoder token is padding gets, as in
 *   transformers, equal scores on all S keys (finfo.min swamps them): its cross-attention output
 *   is the plain mean of V over the S keys, written over SDPA's zeros.
 *
 * Invariants:
 *   - Parameters live in one float buffer laid out by ptab (llm.c style), in the checkpoint's
 *     names without the tensor prefix; the per-layer structs hold views into it.
 *   - fwd is a grow-only planned block: a forward with the shapes of an earlier one allocates
 *     nothing. It holds every activation (per layer) that backward will need, plus copies of
 *     the inputs and the mask, so the caller may reuse its buffers after forward.
 *   - have_fwd is set only after a forward fully succeeded.
 *   - Load either fully succeeds or frees everything; every failure names a key or a tensor. */
#include "internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parameters ---- */

typedef struct {
    char *name;              /* checkpoint name without the tensor prefix (owned)           */
    int ndim;
    int64_t shape[2];
    size_t off, n;           /* in floats, into params                                        */
} qformer_ptab;

typedef struct {             /* one attention block: MultiHeadAttention + SelfOutput          */
    const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *ln_w, *ln_b;
} qformer_attn;

typedef struct {
    int has_cross;
    qformer_attn self, cross;
    const float *w_in, *b_in, *w_out, *b_out, *ln_w, *ln_b; /* intermediate_query, output_query */
} qformer_layer;

typedef struct {             /* activations of one attention block, per layer                 */
    float *qh, *kh, *vh, *oh, *lse, *merged, *sum, *mean, *rstd, *out;
} attn_acts;

typedef struct {
    attn_acts self, cross;   /* cross.* NULL on layers without cross-attention               */
    float *pre, *act, *sum, *mean, *rstd, *out;  /* FFN: out is the layer's output            */
} layer_acts;

struct qf_qformer {
    qf_qformer_config cfg;
    int64_t hd;
    int np, np_cap;
    qformer_ptab *ptab;
    float *params;
    const float *ln_w, *ln_b;       /* layernorm.* on the query embeddings */
    qformer_layer *layers;

    /* forward planned block */
    float *fwd;
    size_t fwd_cap;                 /* floats */
    float *x_in, *enc, *emb_mean, *emb_rstd, *emb, *tmp;
    uint8_t *mask;                  /* [B,S] 1 = attend (NULL without a mask) */
    uint8_t *dead;                  /* [B] 1 = every encoder token is padding */
    layer_acts *acts;               /* [num_hidden_layers] */
    int64_t B, Lq, S;
    int have_fwd, has_mask;
};

static qf_status add_param(qf_qformer *m, const char *fmt_layer, int layer, const char *suffix, int64_t d0,
                           int64_t d1, size_t *off) {
    if (m->np == m->np_cap) {
        int cap = m->np_cap ? 2 * m->np_cap : 64;
        qformer_ptab *p = realloc(m->ptab, (size_t)cap * sizeof *p);
        if (!p) return qf_fail(QF_ERR_NOMEM, "qf_qformer_load: cannot grow the parameter table");
        m->ptab = p;
        m->np_cap = cap;
    }
    char name[256];
    if (layer >= 0)
        snprintf(name, sizeof name, fmt_layer, layer, suffix);
    else
        snprintf(name, sizeof name, "%s", suffix);
    qformer_ptab *p = &m->ptab[m->np];
    p->name = strdup(name);
    if (!p->name) return qf_fail(QF_ERR_NOMEM, "qf_qformer_load: cannot copy a tensor name");
    m->np++;
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    p->off = *off;
    *off += qf_align_up(p->n, 16);
    return QF_OK;
}

/* The parameter table in a fixed order; view() below walks it in the same order. */
static qf_status plan_params(qf_qformer *m, size_t *total) {
    const qf_qformer_config *c = &m->cfg;
    const int64_t H = c->hidden_size, E = c->encoder_hidden_size, I = c->intermediate_size;
    const char *L = "encoder.layer.%d.%s";
    size_t off = 0;
    QF_TRY(add_param(m, NULL, -1, "layernorm.weight", H, 0, &off));
    QF_TRY(add_param(m, NULL, -1, "layernorm.bias", H, 0, &off));
    for (int i = 0; i < (int)c->num_hidden_layers; i++) {
        for (int x = 0; x < 2; x++) {
            if (x == 1 && i % c->cross_attention_frequency) continue;
            const int64_t kin = x ? E : H;
            const char *blk = x ? "crossattention" : "attention";
            char s[96];
#define QP(sfx, d0, d1)                                                                             \
    do {                                                                                            \
        snprintf(s, sizeof s, "%s.%s", blk, sfx);                                                   \
        QF_TRY(add_param(m, L, i, s, d0, d1, &off));                                                \
    } while (0)
            QP("attention.query.weight", H, H);
            QP("attention.query.bias", H, 0);
            QP("attention.key.weight", H, kin);
            QP("attention.key.bias", H, 0);
            QP("attention.value.weight", H, kin);
            QP("attention.value.bias", H, 0);
            QP("output.dense.weight", H, H);
            QP("output.dense.bias", H, 0);
            QP("output.LayerNorm.weight", H, 0);
            QP("output.LayerNorm.bias", H, 0);
#undef QP
        }
        QF_TRY(add_param(m, L, i, "intermediate_query.dense.weight", I, H, &off));
        QF_TRY(add_param(m, L, i, "intermediate_query.dense.bias", I, 0, &off));
        QF_TRY(add_param(m, L, i, "output_query.dense.weight", H, I, &off));
        QF_TRY(add_param(m, L, i, "output_query.dense.bias", H, 0, &off));
        QF_TRY(add_param(m, L, i, "output_query.LayerNorm.weight", H, 0, &off));
        QF_TRY(add_param(m, L, i, "output_query.LayerNorm.bias", H, 0, &off));
    }
    *total = off;
    return QF_OK;
}

static void view_params(qf_qformer *m) {
    int k = 0;
#define NEXT (m->params + m->ptab[k++].off)
    m->ln_w = NEXT;
    m->ln_b = NEXT;
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        qformer_layer *l = &m->layers[i];
        l->has_cross = i % m->cfg.cross_attention_frequency == 0;
        for (int x = 0; x < 2; x++) {
            if (x == 1 && !l->has_cross) continue;
            qformer_attn *a = x ? &l->cross : &l->self;
            a->wq = NEXT; a->bq = NEXT; a->wk = NEXT; a->bk = NEXT; a->wv = NEXT; a->bv = NEXT;
            a->wo = NEXT; a->bo = NEXT; a->ln_w = NEXT; a->ln_b = NEXT;
        }
        l->w_in = NEXT; l->b_in = NEXT; l->w_out = NEXT; l->b_out = NEXT; l->ln_w = NEXT; l->ln_b = NEXT;
    }
#undef NEXT
}

/* ---- config ---- */

static qf_status cfg_int(const qf_config *cfg, const char *prefix, const char *key, int64_t lo, int64_t hi,
                         int64_t *out) {
    char full[256];
    snprintf(full, sizeof full, "%s%s", prefix, key);
    QF_TRY(qf_config_int(cfg, full, out));
    if (*out < lo || *out > hi)
        return qf_fail(QF_ERR_FORMAT, "qf_qformer_load: config key \"%s\" = %lld is out of range [%lld, %lld]", full,
                       (long long)*out, (long long)lo, (long long)hi);
    return QF_OK;
}

static qf_status read_config(const qf_config *cfg, const char *p, qf_qformer_config *c) {
    const int64_t big = 1 << 20;
    QF_TRY(cfg_int(cfg, p, "num_hidden_layers", 1, 1024, &c->num_hidden_layers));
    QF_TRY(cfg_int(cfg, p, "hidden_size", 1, big, &c->hidden_size));
    QF_TRY(cfg_int(cfg, p, "num_attention_heads", 1, big, &c->num_attention_heads));
    QF_TRY(cfg_int(cfg, p, "intermediate_size", 1, big, &c->intermediate_size));
    QF_TRY(cfg_int(cfg, p, "cross_attention_frequency", 1, 1024, &c->cross_attention_frequency));
    QF_TRY(cfg_int(cfg, p, "encoder_hidden_size", 1, big, &c->encoder_hidden_size));
    char key[256];
    if (c->hidden_size % c->num_attention_heads)
        return qf_fail(QF_ERR_FORMAT,
                       "qf_qformer_load: config key \"%shidden_size\" = %lld is not a multiple of "
                       "\"%snum_attention_heads\" = %lld", p, (long long)c->hidden_size, p,
                       (long long)c->num_attention_heads);
    snprintf(key, sizeof key, "%slayer_norm_eps", p);
    QF_TRY(qf_config_float(cfg, key, &c->layer_norm_eps));
    if (!(c->layer_norm_eps >= 0.0 && c->layer_norm_eps < 1.0))
        return qf_fail(QF_ERR_FORMAT, "qf_qformer_load: config key \"%s\" = %g, expected 0 <= eps < 1", key,
                       c->layer_norm_eps);
    snprintf(key, sizeof key, "%shidden_act", p);
    const char *act;
    QF_TRY(qf_config_string(cfg, key, &act));
    if (!strcmp(act, "gelu"))
        c->hidden_act = QF_GELU_ERF;
    else if (!strcmp(act, "gelu_new") || !strcmp(act, "gelu_pytorch_tanh"))
        c->hidden_act = QF_GELU_TANH;
    else
        return qf_fail(QF_ERR_UNSUPPORTED,
                       "qf_qformer_load: config key \"%s\" = \"%s\" is not supported (expected \"gelu\", "
                       "\"gelu_new\" or \"gelu_pytorch_tanh\")", key, act);
    /* relative position embeddings would change the scores; only "absolute" (unused by the
     * query-only path) is accepted */
    snprintf(key, sizeof key, "%sposition_embedding_type", p);
    if (qf_config_has(cfg, key)) {
        const char *pe;
        QF_TRY(qf_config_string(cfg, key, &pe));
        if (strcmp(pe, "absolute"))
            return qf_fail(QF_ERR_UNSUPPORTED, "qf_qformer_load: config key \"%s\" = \"%s\" is not supported "
                                               "(only \"absolute\")", key, pe);
    }
    return QF_OK;
}

/* ---- loading ---- */

qf_status qf_qformer_load_parts(const qf_config *cfg, const char *cfg_prefix, const qf_safetensors *st,
                                const char *tensor_prefix, qf_qformer **out) {
    const char *fn = "qf_qformer_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!cfg) return qf_fail(QF_ERR_ARG, "%s: cfg is NULL", fn);
    if (!st) return qf_fail(QF_ERR_ARG, "%s: st is NULL", fn);
    if (!cfg_prefix) cfg_prefix = "";
    if (!tensor_prefix) tensor_prefix = "";
    if (strlen(cfg_prefix) > 128 || strlen(tensor_prefix) > 128)
        return qf_fail(QF_ERR_ARG, "%s: cfg_prefix/tensor_prefix longer than 128 characters", fn);

    qf_qformer *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the model", fn);
    size_t total = 0;
    qf_status s = read_config(cfg, cfg_prefix, &m->cfg);
    if (s == QF_OK) {
        m->hd = m->cfg.hidden_size / m->cfg.num_attention_heads;
        m->layers = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->layers);
        m->acts = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->acts);
        if (!m->layers || !m->acts) s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the layer tables", fn);
    }
    if (s == QF_OK) s = plan_params(m, &total);
    if (s == QF_OK && posix_memalign((void **)&m->params, 64, total * sizeof(float)))
        s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, total);
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const qformer_ptab *p = &m->ptab[i];
        char full[512];
        snprintf(full, sizeof full, "%s%s", tensor_prefix, p->name);
        s = qf_st_read_f32(st, full, p->ndim, p->shape, m->params + p->off);
        if (s != QF_OK)
            s = qf_fail_prefix(s, "%s (Blip2QFormerModel, %lld layers, hidden %lld, encoder_hidden %lld, "
                                  "cross-attention every %lld)", fn, (long long)m->cfg.num_hidden_layers,
                               (long long)m->cfg.hidden_size, (long long)m->cfg.encoder_hidden_size,
                               (long long)m->cfg.cross_attention_frequency);
    }
    if (s != QF_OK) {
        qf_qformer_free(m);
        return s;
    }
    view_params(m);
    *out = m;
    return QF_OK;
}

qf_status qf_qformer_load(const char *folder, qf_qformer **out) {
    const char *fn = "qf_qformer_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "%s: folder is NULL", fn);
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", folder) >= (int)sizeof path)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    qf_config *cfg = NULL;
    qf_status s = qf_config_load(path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);

    const char *cfg_prefix = "", *tensor_prefix = "";
    const char *mt = NULL;
    if (qf_config_has(cfg, "model_type")) s = qf_config_string(cfg, "model_type", &mt);
    if (s == QF_OK && mt) {
        if (!strcmp(mt, "blip-2")) {
            cfg_prefix = "qformer_config.";
            tensor_prefix = "qformer.";
        } else if (strcmp(mt, "blip_2_qformer")) {
            s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not a BLIP-2 Q-Former (expected "
                                            "\"blip_2_qformer\" or \"blip-2\")", fn, path, mt);
        }
    }
    qf_safetensors *st = NULL;
    if (s == QF_OK) {
        snprintf(path, sizeof path, "%s/model.safetensors", folder);
        s = qf_st_open(path, &st);
        if (s != QF_OK) {
            char idx[4096];
            snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", folder);
            FILE *f = fopen(idx, "rb");
            if (f) {
                fclose(f);
                s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s is a sharded checkpoint (model.safetensors.index.json); "
                                                "sharded loading is not implemented yet", fn, folder);
            } else {
                s = qf_fail_prefix(s, "%s", fn);
            }
        }
    }
    if (s == QF_OK) s = qf_qformer_load_parts(cfg, cfg_prefix, st, tensor_prefix, out);
    qf_st_close(st);
    qf_config_free(cfg);
    return s;
}

void qf_qformer_free(qf_qformer *m) {
    if (!m) return;
    for (int i = 0; i < m->np; i++) free(m->ptab[i].name);
    free(m->ptab);
    free(m->params);
    free(m->layers);
    free(m->acts);
    free(m->fwd);
    free(m);
}

qf_status qf_qformer_get_config(const qf_qformer *m, qf_qformer_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_qformer_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_qformer_get_config: out is NULL");
    *out = m->cfg;
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

/* Lays out every forward buffer for (B, Lq, S); base NULL only counts. */
static size_t plan_forward(qf_qformer *m, float *base, int64_t B, int64_t Lq, int64_t S, int with_mask) {
    const size_t H = (size_t)m->cfg.hidden_size, E = (size_t)m->cfg.encoder_hidden_size;
    const size_t I = (size_t)m->cfg.intermediate_size, nh = (size_t)m->cfg.num_attention_heads;
    const size_t T = (size_t)(B * Lq), Te = (size_t)(B * S);
    size_t off = 0;
    m->x_in = carve(base, &off, T * H);
    m->enc = carve(base, &off, Te * E);
    m->emb_mean = carve(base, &off, T);
    m->emb_rstd = carve(base, &off, T);
    m->emb = carve(base, &off, T * H);
    m->tmp = carve(base, &off, (T > Te ? T : Te) * H);
    m->mask = (uint8_t *)carve(base, &off, with_mask ? (Te + 3) / 4 : 0);
    m->dead = (uint8_t *)carve(base, &off, ((size_t)B + 3) / 4);
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        layer_acts *a = &m->acts[i];
        for (int x = 0; x < 2; x++) {
            attn_acts *t = x ? &a->cross : &a->self;
            if (x == 1 && !m->layers[i].has_cross) {
                memset(t, 0, sizeof *t);
                continue;
            }
            const size_t kv = x ? Te * H : T * H;
            t->qh = carve(base, &off, T * H);
            t->kh = carve(base, &off, kv);
            t->vh = carve(base, &off, kv);
            t->oh = carve(base, &off, T * H);
            t->lse = carve(base, &off, T * nh);
            t->merged = carve(base, &off, T * H);
            t->sum = carve(base, &off, T * H);
            t->mean = carve(base, &off, T);
            t->rstd = carve(base, &off, T);
            t->out = carve(base, &off, T * H);
        }
        a->pre = carve(base, &off, T * I);
        a->act = carve(base, &off, T * I);
        a->sum = carve(base, &off, T * H);
        a->mean = carve(base, &off, T);
        a->rstd = carve(base, &off, T);
        a->out = carve(base, &off, T * H);
    }
    return off;
}

/* tokens [B*len, H] (batch-first) -> heads [B, nh, len, hd] */
static void split_heads(float *heads, const float *tok, int64_t B, int64_t nh, int64_t len, int64_t hd) {
    const int64_t H = nh * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * H > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++)
            for (int64_t h = 0; h < nh; h++)
                memcpy(heads + ((b * nh + h) * len + i) * hd, tok + (b * len + i) * H + h * hd,
                       (size_t)hd * sizeof(float));
}

static void merge_heads(float *tok, const float *heads, int64_t B, int64_t nh, int64_t len, int64_t hd) {
    const int64_t H = nh * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * H > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++)
            for (int64_t h = 0; h < nh; h++)
                memcpy(tok + (b * len + i) * H + h * hd, heads + ((b * nh + h) * len + i) * hd,
                       (size_t)hd * sizeof(float));
}

/* One attention block: t->out = LN(x + dense(MHA(x, kv))). kv has kv_len tokens of width kin per
 * item; cross-attention uses the encoder mask. */
static qf_status attention_block(qf_qformer *m, const qformer_attn *w, attn_acts *t, const float *x,
                                 const float *kv, int64_t kv_len, int64_t kin, int cross) {
    const char *fn = "qf_qformer_forward";
    const int64_t B = m->B, Lq = m->Lq, H = m->cfg.hidden_size, nh = m->cfg.num_attention_heads, hd = m->hd;
    const int64_t T = B * Lq;
    QF_TRY(qf_linear_forward(m->tmp, x, w->wq, w->bq, T, H, H));
    split_heads(t->qh, m->tmp, B, nh, Lq, hd);
    QF_TRY(qf_linear_forward(m->tmp, kv, w->wk, w->bk, B * kv_len, kin, H));
    split_heads(t->kh, m->tmp, B, nh, kv_len, hd);
    QF_TRY(qf_linear_forward(m->tmp, kv, w->wv, w->bv, B * kv_len, kin, H));
    split_heads(t->vh, m->tmp, B, nh, kv_len, hd);

    qf_sdpa_params sp = qf_sdpa_defaults(B, nh, nh, Lq, kv_len, hd);
    if (cross && m->has_mask) {
        sp.mask.kind = QF_MASK_BOOL;
        sp.mask.data = m->mask;
        sp.mask.ndim = 4;
        sp.mask.shape[0] = B;
        sp.mask.shape[1] = 1;
        sp.mask.shape[2] = 1;
        sp.mask.shape[3] = kv_len;
    }
    qf_status s = qf_sdpa_forward(&sp, t->qh, t->kh, t->vh, t->oh, t->lse, NULL);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (%s-attention)", fn, cross ? "cross" : "self");
    if (cross && m->has_mask) {
        /* all-padding items: uniform weights over all keys, as transformers' finfo.min gives */
        for (int64_t b = 0; b < B; b++) {
            if (!m->dead[b]) continue;
            for (int64_t h = 0; h < nh; h++) {
                const float *v = t->vh + (b * nh + h) * kv_len * hd;
                float *o = t->oh + (b * nh + h) * Lq * hd;
                for (int64_t d = 0; d < hd; d++) {
                    double acc = 0.0;
                    for (int64_t j = 0; j < kv_len; j++) acc += v[j * hd + d];
                    o[d] = (float)(acc / (double)kv_len);
                }
                for (int64_t i = 1; i < Lq; i++) memcpy(o + i * hd, o, (size_t)hd * sizeof(float));
            }
        }
    }
    merge_heads(t->merged, t->oh, B, nh, Lq, hd);
    QF_TRY(qf_linear_forward(t->sum, t->merged, w->wo, w->bo, T, H, H));
    QF_TRY(qf_residual_forward(t->sum, t->sum, x, T * H));
    QF_TRY(qf_layernorm_forward(t->out, t->mean, t->rstd, t->sum, w->ln_w, w->ln_b, T, H,
                                (float)m->cfg.layer_norm_eps));
    return QF_OK;
}

qf_status qf_qformer_forward(qf_qformer *m, const qf_qformer_args *a, const float *query_embeds,
                             const float *encoder_hidden_states, float *out) {
    const char *fn = "qf_qformer_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!query_embeds) return qf_fail(QF_ERR_ARG, "%s: query_embeds is NULL", fn);
    if (!encoder_hidden_states) return qf_fail(QF_ERR_ARG, "%s: encoder_hidden_states is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    const int64_t B = a->B, Lq = a->num_queries, S = a->encoder_len;
    if (B < 1 || Lq < 1 || S < 1)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, num_queries = %lld, encoder_len = %lld; each must be >= 1", fn,
                       (long long)B, (long long)Lq, (long long)S);
    if (B > (1 << 24) || Lq > (1 << 24) || S > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: B, num_queries, encoder_len above 2^24 are not supported", fn);
    m->have_fwd = 0;
    const int64_t H = m->cfg.hidden_size, E = m->cfg.encoder_hidden_size;
    const int64_t T = B * Lq;
    const int with_mask = a->encoder_attention_mask != NULL;

    size_t need = plan_forward(m, NULL, B, Lq, S, with_mask);
    QF_TRY(grow(&m->fwd, &m->fwd_cap, need, fn));
    plan_forward(m, m->fwd, B, Lq, S, with_mask);
    m->B = B;
    m->Lq = Lq;
    m->S = S;
    m->has_mask = with_mask;

    memcpy(m->x_in, query_embeds, (size_t)(T * H) * sizeof(float));
    memcpy(m->enc, encoder_hidden_states, (size_t)(B * S * E) * sizeof(float));
    memset(m->dead, 0, (size_t)B);
    if (with_mask) {
        for (int64_t b = 0; b < B; b++) {
            int any = 0;
            for (int64_t j = 0; j < S; j++) {
                uint8_t v = a->encoder_attention_mask[b * S + j] ? 1 : 0;
                m->mask[b * S + j] = v;
                any |= v;
            }
            m->dead[b] = !any;
        }
    }

    const float eps = (float)m->cfg.layer_norm_eps;
    QF_TRY(qf_layernorm_forward(m->emb, m->emb_mean, m->emb_rstd, m->x_in, m->ln_w, m->ln_b, T, H, eps));
    const float *h = m->emb;
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        const qformer_layer *l = &m->layers[i];
        layer_acts *t = &m->acts[i];
        QF_TRY(attention_block(m, &l->self, &t->self, h, h, Lq, H, 0));
        h = t->self.out;
        if (l->has_cross) {
            QF_TRY(attention_block(m, &l->cross, &t->cross, h, m->enc, S, E, 1));
            h = t->cross.out;
        }
        const int64_t I = m->cfg.intermediate_size;
        QF_TRY(qf_linear_forward(t->pre, h, l->w_in, l->b_in, T, H, I));
        QF_TRY(qf_gelu_forward(t->act, t->pre, T * I, m->cfg.hidden_act));
        QF_TRY(qf_linear_forward(t->sum, t->act, l->w_out, l->b_out, T, I, H));
        QF_TRY(qf_residual_forward(t->sum, t->sum, h, T * H));
        QF_TRY(qf_layernorm_forward(t->out, t->mean, t->rstd, t->sum, l->ln_w, l->ln_b, T, H, eps));
        h = t->out;
    }
    memcpy(out, h, (size_t)(T * H) * sizeof(float));
    m->have_fwd = 1;
    return QF_OK;
}
