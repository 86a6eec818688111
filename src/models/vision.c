/* vision.c - the BLIP-2 / InstructBLIP ViT vision tower (transformers' Blip2VisionModel =
 * InstructBlipVisionModel), forward and backward, on qf_linear/qf_layernorm/qf_gelu/qf_sdpa.
 *
 * Semantics, settled against transformers' modeling_blip_2.py (eval mode):
 *   patches = Conv2d(C -> hidden, kernel = stride = patch_size, bias)(pixel_values), done as an
 *             im2col (cols [B*P, C*p*p], column c*p*p + ky*p + kx) and one GEMM with the weight
 *             viewed as [hidden, C*p*p]; P = (image_size / patch_size)^2 in row-major order.
 *   x = [class_embedding ; patches] + position_embedding          [B, N = 1 + P, hidden]
 *   per layer: x = x + projection(MHA(layer_norm1(x)))
 *              x = x + fc2(act(fc1(layer_norm2(x))))
 *   MHA: qkv = h Wqkv^T + b (columns: q, then k, then v, each split into heads), softmax(q k^T *
 *        head_dim^-0.5) v, no mask. transformers (since 4.4x) stores the bias as one parameter
 *        "self_attn.qkv.bias" [3*hidden], initialised to (q_bias, 0, v_bias) but trained as a
 *        whole, so its k part may be nonzero: it is used as stored (a constant added to every key
 *        does not change softmax, and its gradient is zero up to rounding). Older checkpoints with
 *        separate "self_attn.q_bias"/"self_attn.v_bias" load as (q_bias, 0, v_bias) and are
 *        reported under the qkv.bias name. qkv_bias = false in the config: no bias at all.
 *   last_hidden_state = post_layernorm(x).
 *
 * Invariants:
 *   - Parameters live in one buffer, gradients in another, laid out by ptab (llm.c style), in
 *     the checkpoint's names without the tensor prefix. Gradients accumulate in backward and are
 *     zeroed only by qf_vision_zero_grad; while frozen, backward touches no parameter gradient
 *     and qf_vision_param shows grad = NULL.
 *   - fwd and bwd are grow-only planned blocks: a forward/backward with the B of an earlier one
 *     allocates nothing. fwd keeps every activation backward needs (the im2col columns stand in
 *     for the pixels), so the caller may reuse its buffers after forward.
 *   - have_fwd is set only after a forward fully succeeded; backward refuses without one.
 *   - Load either fully succeeds or frees everything; each failure names a config key or tensor.
 *   - On a device (qf_vision_to_device): the parameters (and a bf16 copy read by the GEMMs) live
 *     there once, with the embedding table etab; host views (cls, layers[i].wqkv, ...) stay the
 *     CPU's and a device pointer is dparams + (view - params). The forward is the "forward on a
 *     device" section below; it keeps the activations backward needs only for a trainable
 *     float32 tower (kept = 1), and a backward after a forward that kept none runs it again from
 *     the host columns hcols. The backward is one code for both backends (over the backend
 *     table); on the GPU the parameter gradients accumulate in dgrads and reach grads only when
 *     shown (qf_vision_param) or when the model moves back to the CPU; bf16 weights are refused
 *     by backward (float32 products only). */
#include "models_internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char name[96];           /* checkpoint name without the tensor prefix                     */
    int ndim;
    int64_t shape[4];
    size_t off, n;           /* in floats, into params / grads                                */
} vision_ptab;

typedef struct {
    const float *ln1_w, *ln1_b, *wqkv, *bqkv, *wo, *bo, *ln2_w, *ln2_b, *w1, *b1, *w2, *b2;
    float *g_ln1_w, *g_ln1_b, *g_wqkv, *g_bqkv, *g_wo, *g_bo, *g_ln2_w, *g_ln2_b, *g_w1, *g_b1,
        *g_w2, *g_b2;
} vision_layer;

typedef struct {             /* activations of one layer; x_in is the previous layer's x_out  */
    float *ln1, *ln1_mean, *ln1_rstd;       /* layer_norm1(x_in)                              */
    float *qh, *kh, *vh, *oh, *lse;         /* heads [B,nh,N,hd] (CPU), lse [B,nh,N]          */
    float *qkv;                             /* device: packed q|k|v rows [T,3H] (no heads)    */
    float *merged;                          /* [T,H] projection input                         */
    float *x_mid;                           /* x_in + projection(...)                         */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *pre, *act;                       /* fc1 output, act(fc1) [T,I]                     */
    float *x_out;
} vision_acts;

struct qf_vision {
    qf_vision_config cfg;
    int64_t hd, G, P, N, K;  /* head dim, patches per side, patches, tokens, C*p*p            */
    int has_qkv_bias;
    int np;
    vision_ptab *ptab;
    float *params, *grads;
    size_t nparams;
    const float *cls, *patch_w, *patch_b, *pos, *post_w, *post_b;
    float *g_cls, *g_patch_w, *g_patch_b, *g_pos, *g_post_w, *g_post_b;
    vision_layer *layers;
    int frozen;

    float *fwd;
    size_t fwd_cap;
    float *cols, *x0, *tmp, *post_mean, *post_rstd;
    vision_acts *acts;
    float *bwd;
    size_t bwd_cap;
    int64_t B;
    int have_fwd;

    /* placement (qf_vision_to_device): on a device, dparams holds the parameters followed by
     * etab [N, H] (row 0 = class_embedding + position 0, row i = patch bias + position i), dbf16
     * a bf16 copy of the parameters (weights QF_BF16) or NULL; dfwd the planned device block;
     * hcols the host im2col buffer [B*N, K] (a zero row where each item's class token goes). */
    const qf_backend *be;
    int on_device;
    float *dparams, *etab;
    uint16_t *dbf16;
    float *dfwd;
    size_t dfwd_cap;
    float *dcols, *dx, *dln, *dqkv, *dmerged, *dmid, *dact, *dout;
    int64_t *dscreen;
    float *hcols;
    size_t hcols_cap;
    qf_model_graph graph;
    int kept;                /* the last device forward kept the activations (plan_device keep) */
    /* GPU backward: parameter gradients accumulate in the device block dgrads (parallel to
     * dparams, made from grads at the first GPU backward that wants them); grads_on_device = 1
     * while it is newer than grads, which qf_vision_param and moving back to the CPU download
     * first (sync_grads). hgrad: host staging of the pixel gradient (col2im runs on the host). */
    float *dgrads;
    int grads_on_device;
    float *hgrad;
    size_t hgrad_cap;
};

/* ---- parameters ---- */

static void add_param(qf_vision *m, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2,
                      int64_t d3, size_t *off) {
    vision_ptab *p = &m->ptab[m->np++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    int64_t d[4] = {d0, d1, d2, d3};
    p->n = 1;
    for (int i = 0; i < 4; i++) {
        p->shape[i] = i < ndim ? d[i] : 0;
        if (i < ndim) p->n *= (size_t)d[i];
    }
    p->off = *off;
    *off += qf_align_up(p->n, 16);
}

static int count_params(const qf_vision *m) {
    return 6 + (int)m->cfg.num_hidden_layers * (m->has_qkv_bias ? 12 : 11);
}

/* The table in a fixed order; view_params walks the same order. */
static void plan_params(qf_vision *m, size_t *total) {
    const qf_vision_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, p = c->patch_size;
    size_t off = 0;
    add_param(m, "embeddings.class_embedding", 3, 1, 1, H, 0, &off);
    add_param(m, "embeddings.patch_embedding.weight", 4, H, c->num_channels, p, p, &off);
    add_param(m, "embeddings.patch_embedding.bias", 1, H, 0, 0, 0, &off);
    add_param(m, "embeddings.position_embedding", 3, 1, m->N, H, 0, &off);
    for (int64_t i = 0; i < c->num_hidden_layers; i++) {
        char s[96];
#define VP(sfx, nd, a, b)                                                                           \
    do {                                                                                            \
        snprintf(s, sizeof s, "encoder.layers.%lld.%s", (long long)i, sfx);                         \
        add_param(m, s, nd, a, b, 0, 0, &off);                                                      \
    } while (0)
        VP("layer_norm1.weight", 1, H, 0);
        VP("layer_norm1.bias", 1, H, 0);
        VP("self_attn.qkv.weight", 2, 3 * H, H);
        if (m->has_qkv_bias) VP("self_attn.qkv.bias", 1, 3 * H, 0);
        VP("self_attn.projection.weight", 2, H, H);
        VP("self_attn.projection.bias", 1, H, 0);
        VP("layer_norm2.weight", 1, H, 0);
        VP("layer_norm2.bias", 1, H, 0);
        VP("mlp.fc1.weight", 2, I, H);
        VP("mlp.fc1.bias", 1, I, 0);
        VP("mlp.fc2.weight", 2, H, I);
        VP("mlp.fc2.bias", 1, H, 0);
#undef VP
    }
    add_param(m, "post_layernorm.weight", 1, H, 0, 0, 0, &off);
    add_param(m, "post_layernorm.bias", 1, H, 0, 0, 0, &off);
    *total = off;
}

static void view_params(qf_vision *m) {
    int k = 0;
#define NEXT(w, g)                                                                                  \
    do {                                                                                            \
        w = m->params + m->ptab[k].off;                                                             \
        g = m->grads + m->ptab[k].off;                                                              \
        k++;                                                                                        \
    } while (0)
    NEXT(m->cls, m->g_cls);
    NEXT(m->patch_w, m->g_patch_w);
    NEXT(m->patch_b, m->g_patch_b);
    NEXT(m->pos, m->g_pos);
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        vision_layer *l = &m->layers[i];
        NEXT(l->ln1_w, l->g_ln1_w);
        NEXT(l->ln1_b, l->g_ln1_b);
        NEXT(l->wqkv, l->g_wqkv);
        if (m->has_qkv_bias)
            NEXT(l->bqkv, l->g_bqkv);
        else
            l->bqkv = l->g_bqkv = NULL;
        NEXT(l->wo, l->g_wo);
        NEXT(l->bo, l->g_bo);
        NEXT(l->ln2_w, l->g_ln2_w);
        NEXT(l->ln2_b, l->g_ln2_b);
        NEXT(l->w1, l->g_w1);
        NEXT(l->b1, l->g_b1);
        NEXT(l->w2, l->g_w2);
        NEXT(l->b2, l->g_b2);
    }
    NEXT(m->post_w, m->g_post_w);
    NEXT(m->post_b, m->g_post_b);
#undef NEXT
}

/* ---- config ---- */

static qf_status cfg_int(const qf_config *cfg, const char *prefix, const char *key, int64_t def, int64_t lo,
                         int64_t hi, int64_t *out) {
    char full[256];
    snprintf(full, sizeof full, "%s%s", prefix, key);
    QF_TRY(qf_config_int_or(cfg, full, def, out));
    if (*out < lo || *out > hi)
        return qf_fail(QF_ERR_FORMAT, "qf_vision_load: config key \"%s\" = %lld is out of range [%lld, %lld]", full,
                       (long long)*out, (long long)lo, (long long)hi);
    return QF_OK;
}

/* Absent keys take Blip2VisionConfig's defaults, as transformers does. */
static qf_status read_config(const qf_config *cfg, const char *p, qf_vision_config *c, int *qkv_bias) {
    const int64_t big = 1 << 20;
    QF_TRY(cfg_int(cfg, p, "hidden_size", 1408, 1, big, &c->hidden_size));
    QF_TRY(cfg_int(cfg, p, "intermediate_size", 6144, 1, big, &c->intermediate_size));
    QF_TRY(cfg_int(cfg, p, "num_hidden_layers", 39, 1, 1024, &c->num_hidden_layers));
    QF_TRY(cfg_int(cfg, p, "num_attention_heads", 16, 1, big, &c->num_attention_heads));
    QF_TRY(cfg_int(cfg, p, "image_size", 224, 1, 1 << 16, &c->image_size));
    QF_TRY(cfg_int(cfg, p, "patch_size", 14, 1, 1 << 16, &c->patch_size));
    QF_TRY(cfg_int(cfg, p, "num_channels", 3, 1, 1024, &c->num_channels));
    char key[256];
    if (c->hidden_size % c->num_attention_heads)
        return qf_fail(QF_ERR_FORMAT,
                       "qf_vision_load: config key \"%shidden_size\" = %lld is not a multiple of "
                       "\"%snum_attention_heads\" = %lld", p, (long long)c->hidden_size, p,
                       (long long)c->num_attention_heads);
    if (c->patch_size > c->image_size)
        return qf_fail(QF_ERR_FORMAT, "qf_vision_load: config key \"%spatch_size\" = %lld exceeds \"%simage_size\" = %lld",
                       p, (long long)c->patch_size, p, (long long)c->image_size);
    snprintf(key, sizeof key, "%slayer_norm_eps", p);
    QF_TRY(qf_config_float_or(cfg, key, 1e-6, &c->layer_norm_eps));
    if (!(c->layer_norm_eps >= 0.0 && c->layer_norm_eps < 1.0))
        return qf_fail(QF_ERR_FORMAT, "qf_vision_load: config key \"%s\" = %g, expected 0 <= eps < 1", key,
                       c->layer_norm_eps);
    snprintf(key, sizeof key, "%shidden_act", p);
    const char *act = "gelu";
    if (qf_config_has(cfg, key)) QF_TRY(qf_config_string(cfg, key, &act));
    if (!strcmp(act, "gelu"))
        c->hidden_act = QF_GELU_ERF;
    else if (!strcmp(act, "gelu_new") || !strcmp(act, "gelu_pytorch_tanh"))
        c->hidden_act = QF_GELU_TANH;
    else
        return qf_fail(QF_ERR_UNSUPPORTED,
                       "qf_vision_load: config key \"%s\" = \"%s\" is not supported (expected \"gelu\", "
                       "\"gelu_new\" or \"gelu_pytorch_tanh\")", key, act);
    snprintf(key, sizeof key, "%sqkv_bias", p);
    *qkv_bias = 1;
    if (qf_config_has(cfg, key)) QF_TRY(qf_config_bool(cfg, key, qkv_bias));
    return QF_OK;
}

/* ---- loading ---- */

/* The qkv bias: "self_attn.qkv.bias" [3H], or legacy q_bias/v_bias [H] each as (q, 0, v). */
static qf_status read_qkv_bias(const qf_safetensors *st, const char *prefix, int64_t layer, int64_t H,
                               float *dst) {
    char name[512], qn[512], vn[512];
    snprintf(name, sizeof name, "%sencoder.layers.%lld.self_attn.qkv.bias", prefix, (long long)layer);
    qf_tensor_view tv;
    snprintf(qn, sizeof qn, "%sencoder.layers.%lld.self_attn.q_bias", prefix, (long long)layer);
    snprintf(vn, sizeof vn, "%sencoder.layers.%lld.self_attn.v_bias", prefix, (long long)layer);
    if (qf_st_find(st, name, &tv) != QF_OK && qf_st_find(st, qn, &tv) == QF_OK) {
        qf_clear_error();
        QF_TRY(qf_st_read_f32(st, qn, 1, &H, dst));
        memset(dst + H, 0, (size_t)H * sizeof(float));
        return qf_st_read_f32(st, vn, 1, &H, dst + 2 * H);
    }
    int64_t n3 = 3 * H;
    return qf_st_read_f32(st, name, 1, &n3, dst);
}

qf_status qf_vision_load_parts(const qf_config *cfg, const char *cfg_prefix, const qf_safetensors *st,
                               const char *tensor_prefix, qf_vision **out) {
    const char *fn = "qf_vision_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!cfg) return qf_fail(QF_ERR_ARG, "%s: cfg is NULL", fn);
    if (!st) return qf_fail(QF_ERR_ARG, "%s: st is NULL", fn);
    if (!cfg_prefix) cfg_prefix = "";
    if (!tensor_prefix) tensor_prefix = "";
    if (strlen(cfg_prefix) > 128 || strlen(tensor_prefix) > 128)
        return qf_fail(QF_ERR_ARG, "%s: cfg_prefix/tensor_prefix longer than 128 characters", fn);

    qf_vision *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the model", fn);
    size_t total = 0;
    qf_status s = read_config(cfg, cfg_prefix, &m->cfg, &m->has_qkv_bias);
    if (s == QF_OK) {
        const qf_vision_config *c = &m->cfg;
        m->hd = c->hidden_size / c->num_attention_heads;
        m->G = c->image_size / c->patch_size;
        m->P = m->G * m->G;
        m->N = 1 + m->P;
        m->K = c->num_channels * c->patch_size * c->patch_size;
        if (m->N > (1 << 24) || m->K > (1 << 24))
            s = qf_fail(QF_ERR_FORMAT, "%s: image_size/patch_size/num_channels give %lld tokens of %lld inputs; "
                                       "above 2^24 is not supported", fn, (long long)m->N, (long long)m->K);
    }
    if (s == QF_OK) {
        m->layers = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->layers);
        m->acts = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->acts);
        m->ptab = calloc((size_t)count_params(m), sizeof *m->ptab);
        if (!m->layers || !m->acts || !m->ptab) s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the layer tables", fn);
    }
    if (s == QF_OK) {
        plan_params(m, &total);
        m->nparams = total;
        if (posix_memalign((void **)&m->params, 64, total * sizeof(float)) ||
            posix_memalign((void **)&m->grads, 64, total * sizeof(float)))
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * total);
        else
            memset(m->grads, 0, total * sizeof(float));
    }
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const vision_ptab *p = &m->ptab[i];
        char full[512];
        const char *qkvb = strstr(p->name, "self_attn.qkv.bias");
        if (qkvb) {
            long long layer = strtoll(p->name + strlen("encoder.layers."), NULL, 10);
            s = read_qkv_bias(st, tensor_prefix, layer, m->cfg.hidden_size, m->params + p->off);
        } else {
            snprintf(full, sizeof full, "%s%s", tensor_prefix, p->name);
            s = qf_st_read_f32(st, full, p->ndim, p->shape, m->params + p->off);
        }
        if (s != QF_OK)
            s = qf_fail_prefix(s, "%s (Blip2VisionModel, %lld layers, hidden %lld, image %lld, patch %lld, "
                                  "%lld channels)", fn, (long long)m->cfg.num_hidden_layers,
                               (long long)m->cfg.hidden_size, (long long)m->cfg.image_size,
                               (long long)m->cfg.patch_size, (long long)m->cfg.num_channels);
    }
    if (s != QF_OK) {
        qf_vision_free(m);
        return s;
    }
    view_params(m);
    *out = m;
    return QF_OK;
}

static void release_device(qf_vision *m);
static qf_status sync_grads(qf_vision *m);

void qf_vision_free(qf_vision *m) {
    if (!m) return;
    release_device(m);
    free(m->ptab);
    free(m->params);
    free(m->grads);
    free(m->layers);
    free(m->acts);
    free(m->fwd);
    free(m->bwd);
    free(m);
}

qf_status qf_vision_get_config(const qf_vision *m, qf_vision_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_vision_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_vision_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

int64_t qf_vision_num_tokens(const qf_vision *m) { return m ? m->N : 0; }

int qf_vision_num_params(const qf_vision *m) { return m ? m->np : 0; }

qf_status qf_vision_param(qf_vision *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_vision_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_vision_param: out is NULL");
    if (i < 0 || i >= m->np)
        return qf_fail(QF_ERR_ARG, "qf_vision_param: index %d is out of range (the model has %d parameters)", i, m->np);
    QF_TRY(sync_grads(m));
    const vision_ptab *p = &m->ptab[i];
    out->name = p->name;
    out->data = m->params + p->off;
    out->grad = m->frozen ? NULL : m->grads + p->off;
    out->ndim = p->ndim;
    for (int d = 0; d < 4; d++) out->shape[d] = p->shape[d];
    return QF_OK;
}

void qf_vision_zero_grad(qf_vision *m) {
    if (!m) return;
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->nparams * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    memset(m->grads, 0, m->nparams * sizeof(float));
}

void qf_vision_set_frozen(qf_vision *m, int frozen) {
    if (m) m->frozen = frozen ? 1 : 0;
}

/* ---- planned buffers ---- */

static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

/* Lays out the forward block for batch B; base NULL only counts. */
static size_t plan_forward(qf_vision *m, float *base, int64_t B) {
    const size_t H = (size_t)m->cfg.hidden_size, I = (size_t)m->cfg.intermediate_size;
    const size_t T = (size_t)(B * m->N), BP = (size_t)(B * m->P), nh = (size_t)m->cfg.num_attention_heads;
    size_t off = 0;
    m->cols = carve(base, &off, BP * (size_t)m->K);
    m->x0 = carve(base, &off, T * H);
    m->tmp = carve(base, &off, T * 3 * H);   /* patch GEMM output [BP,H] or qkv [T,3H] */
    m->post_mean = carve(base, &off, T);
    m->post_rstd = carve(base, &off, T);
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        vision_acts *a = &m->acts[i];
        a->ln1 = carve(base, &off, T * H);
        a->ln1_mean = carve(base, &off, T);
        a->ln1_rstd = carve(base, &off, T);
        a->qkv = NULL;
        a->qh = carve(base, &off, T * H);
        a->kh = carve(base, &off, T * H);
        a->vh = carve(base, &off, T * H);
        a->oh = carve(base, &off, T * H);
        a->lse = carve(base, &off, T * nh);
        a->merged = carve(base, &off, T * H);
        a->x_mid = carve(base, &off, T * H);
        a->ln2 = carve(base, &off, T * H);
        a->ln2_mean = carve(base, &off, T);
        a->ln2_rstd = carve(base, &off, T);
        a->pre = carve(base, &off, T * I);
        a->act = carve(base, &off, T * I);
        a->x_out = carve(base, &off, T * H);
    }
    return off;
}

/* ---- layout helpers ---- */

/* cols[b*P + gy*G + gx, c*p*p + ky*p + kx] = pix[b, c, gy*p + ky, gx*p + kx] (kernel = stride:
 * every pixel of the covered area lands in exactly one column). */
static void im2col(float *cols, const float *pix, int64_t B, int64_t C, int64_t S, int64_t p, int64_t G) {
    const int64_t K = C * p * p;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * G * G * K > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t gy = 0; gy < G; gy++)
            for (int64_t gx = 0; gx < G; gx++) {
                float *dst = cols + ((b * G + gy) * G + gx) * K;
                for (int64_t c = 0; c < C; c++)
                    for (int64_t ky = 0; ky < p; ky++)
                        memcpy(dst + (c * p + ky) * p, pix + ((b * C + c) * S + gy * p + ky) * S + gx * p,
                               (size_t)p * sizeof(float));
            }
}

/* The inverse scatter; pixels beyond G*p (image_size not a multiple of p) get zero. */
static void col2im(float *pix, const float *cols, int64_t B, int64_t C, int64_t S, int64_t p, int64_t G) {
    const int64_t K = C * p * p;
    if (G * p != S) memset(pix, 0, (size_t)(B * C * S * S) * sizeof(float));
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * G * G * K > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t gy = 0; gy < G; gy++)
            for (int64_t gx = 0; gx < G; gx++) {
                const float *src = cols + ((b * G + gy) * G + gx) * K;
                for (int64_t c = 0; c < C; c++)
                    for (int64_t ky = 0; ky < p; ky++)
                        memcpy(pix + ((b * C + c) * S + gy * p + ky) * S + gx * p, src + (c * p + ky) * p,
                               (size_t)p * sizeof(float));
            }
}

/* qkv [T, 3H] (q | k | v) -> heads [B, nh, N, hd] of part `part` (0 q, 1 k, 2 v). */
static void qkv_to_heads(float *heads, const float *qkv, int part, int64_t B, int64_t nh, int64_t N, int64_t hd) {
    const int64_t H = nh * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * N * H > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++)
            for (int64_t h = 0; h < nh; h++)
                memcpy(heads + ((b * nh + h) * N + i) * hd, qkv + (b * N + i) * 3 * H + part * H + h * hd,
                       (size_t)hd * sizeof(float));
}

/* heads [B, nh, N, hd] -> tokens [B*N, H] */
static void merge_heads(float *tok, const float *heads, int64_t B, int64_t nh, int64_t N, int64_t hd) {
    const int64_t H = nh * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * N * H > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++)
            for (int64_t h = 0; h < nh; h++)
                memcpy(tok + (b * N + i) * H + h * hd, heads + ((b * nh + h) * N + i) * hd, (size_t)hd * sizeof(float));
}

/* A NaN/Inf pixel is named as pixel_values[b,c,y,x] (the first in memory order), not as
 * "q contains NaN" deep inside layer 0. */
static qf_status check_pixels(const qf_vision *m, int64_t B, const float *pixel_values, const char *fn) {
    const qf_vision_config *c = &m->cfg;
    const int64_t S = c->image_size, C = c->num_channels, n = B * C * S * S;
    const int64_t i = (int64_t)qf_first_nonfinite(pixel_values, (size_t)n);
    if (i < n)
        return qf_fail(QF_ERR_NONFINITE, "%s: pixel_values[%lld,%lld,%lld,%lld] = %g: pixels must be finite", fn,
                       (long long)(i / (C * S * S)), (long long)(i / (S * S) % C), (long long)(i / S % S),
                       (long long)(i % S), (double)pixel_values[i]);
    return QF_OK;
}

/* ---- forward on a device (qf_vision_to_device) ----
 * The CPU forward's computation as backend calls. The im2col stays on the host (input
 * preparation: the backend table has no gather that fits) into hcols [B*N, K], whose row b*N is
 * zero: the patch GEMM over all B*N rows then leaves 0 where each class token goes, and one
 * add_periodic of etab (class token + position 0; patch bias + position i) completes the
 * embeddings, so the whole input is one upload, one GEMM and one add. Per layer: LN1 -> qkv GEMM
 * (packed [T,3H], the bias as stored) -> SDPA reading q/k/v in place from the packed rows and
 * writing merged [T,H] -> projection GEMM with the residual -> LN2 -> fc1 -> GELU -> fc2 with
 * the residual (x and mid alternate, so no GEMM writes its own residual); then post-LN.
 * Everything after the upload is one captured graph per key (B, the planned block's address).
 * Association differs from the CPU only in where the patch bias is added (with the position
 * row, not in the GEMM): float32 rounding. */

#define DEV(p) (m->dparams + ((p) - m->params))

/* out = in · wᵀ + b (+ res) on the device; w, b are host views (their device copies are used),
 * the bf16 copy of w when placed with QF_BF16 */
static qf_status dev_linear(const qf_vision *m, float *out, const float *in, const float *w, const float *b,
                            const float *res, int64_t rows, int64_t Cin, int64_t Cout) {
    const uint16_t *w16 = m->dbf16 ? m->dbf16 + (w - m->params) : NULL;
    return qf_model_linear(m->be, out, in, DEV(w), w16, b ? DEV(b) : NULL, res, rows, Cin, Cout);
}

/* Lays out the device block for batch B; base NULL only counts (floats). keep = 0 (inference):
 * every layer writes the same few buffers (x and mid alternate, GELU in place, no LayerNorm
 * statistics, no lse). keep = 1 (a backward may follow): every layer's activations get their own
 * buffers, as the CPU forward keeps them, except that the attention's heads are not split out:
 * the layer keeps its packed qkv rows and merged output, and backward splits the heads from
 * them. The views go into m->acts / x0 / post_mean / post_rstd, which backward reads on either
 * backend (qh..oh NULL here, qkv NULL on the CPU). */
static size_t plan_device(qf_vision *m, float *base, int64_t B, int keep) {
    const size_t H = (size_t)m->cfg.hidden_size, I = (size_t)m->cfg.intermediate_size, T = (size_t)(B * m->N);
    const size_t nh = (size_t)m->cfg.num_attention_heads;
    size_t off = 0;
    m->dcols = carve(base, &off, T * (size_t)m->K);
    m->dx = carve(base, &off, T * H);
    m->dout = carve(base, &off, T * H);
    m->dscreen = (int64_t *)carve(base, &off, 2);
    m->cols = NULL;
    m->tmp = NULL;
    m->x0 = m->dx;
    m->post_mean = keep ? carve(base, &off, T) : NULL;
    m->post_rstd = keep ? carve(base, &off, T) : NULL;
    float *ln = NULL, *qkv = NULL, *merged = NULL, *mid = NULL, *act = NULL;
    if (!keep) {
        ln = carve(base, &off, T * H);
        qkv = carve(base, &off, T * 3 * H);
        merged = carve(base, &off, T * H);
        mid = carve(base, &off, T * H);
        act = carve(base, &off, T * I);
    }
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        vision_acts *a = &m->acts[i];
        a->qh = a->kh = a->vh = a->oh = NULL;
        if (!keep) {
            a->ln1 = a->ln2 = ln;
            a->qkv = qkv;
            a->merged = merged;
            a->x_mid = mid;
            a->pre = a->act = act;
            a->x_out = m->dx;
            a->ln1_mean = a->ln1_rstd = a->ln2_mean = a->ln2_rstd = a->lse = NULL;
            continue;
        }
        a->ln1 = carve(base, &off, T * H);
        a->ln1_mean = carve(base, &off, T);
        a->ln1_rstd = carve(base, &off, T);
        a->qkv = carve(base, &off, T * 3 * H);
        a->lse = carve(base, &off, T * nh);
        a->merged = carve(base, &off, T * H);
        a->x_mid = carve(base, &off, T * H);
        a->ln2 = carve(base, &off, T * H);
        a->ln2_mean = carve(base, &off, T);
        a->ln2_rstd = carve(base, &off, T);
        a->pre = carve(base, &off, T * I);
        a->act = carve(base, &off, T * I);
        a->x_out = carve(base, &off, T * H);
    }
    return off;
}

static qf_status device_body(void *ctx) {
    qf_vision *m = ctx;
    const qf_backend *be = m->be;
    const qf_vision_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, nh = c->num_attention_heads, hd = m->hd;
    const int64_t B = m->B, N = m->N, T = B * N;
    const float eps = (float)c->layer_norm_eps;
    QF_TRY(dev_linear(m, m->x0, m->dcols, m->patch_w, NULL, NULL, T, m->K, H));
    QF_TRY(be->add_periodic(m->x0, m->x0, m->etab, T, N, H));
    const float *x = m->x0;
    for (int64_t li = 0; li < c->num_hidden_layers; li++) {
        const vision_layer *l = &m->layers[li];
        const vision_acts *a = &m->acts[li];
        QF_TRY(be->layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, DEV(l->ln1_w), DEV(l->ln1_b), T, H, eps));
        QF_TRY(dev_linear(m, a->qkv, a->ln1, l->wqkv, l->bqkv, NULL, T, H, 3 * H));
        qf_sdpa_params sp = qf_sdpa_defaults(B, nh, nh, N, N, hd);
        sp.check_finite = 0; /* the pixels were screened; the weights are finite */
        qf_sdpa_problem pr;
        qf_status s = qf_sdpa_resolve(&sp, &pr);
        if (s == QF_OK) {
            pr.strided = 1;
            pr.q_sb = pr.k_sb = pr.v_sb = N * 3 * H;
            pr.q_sh = pr.k_sh = pr.v_sh = hd;
            pr.q_si = pr.k_si = pr.v_si = 3 * H;
            pr.o_sb = N * H, pr.o_sh = hd, pr.o_si = H;
            s = be->sdpa_forward(&pr, a->qkv, a->qkv + H, a->qkv + 2 * H, a->merged, a->lse, NULL);
        }
        if (s != QF_OK) return qf_fail_prefix(s, "qf_vision_forward (layer %lld self-attention)", (long long)li);
        QF_TRY(dev_linear(m, a->x_mid, a->merged, l->wo, l->bo, x, T, H, H));
        QF_TRY(be->layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->x_mid, DEV(l->ln2_w), DEV(l->ln2_b), T, H,
                                     eps));
        QF_TRY(dev_linear(m, a->pre, a->ln2, l->w1, l->b1, NULL, T, H, I));
        QF_TRY(be->gelu_forward(a->act, a->pre, T * I, c->hidden_act));
        QF_TRY(dev_linear(m, a->x_out, a->act, l->w2, l->b2, a->x_mid, T, I, H));
        x = a->x_out;
    }
    return be->layernorm_forward(m->dout, m->post_mean, m->post_rstd, x, DEV(m->post_w), DEV(m->post_b), T, H, eps);
}

/* Plans the device block for m->B (keep as plan_device), uploads the host columns hcols and
 * queues the forward (one graph per key). Nothing waits for the GPU here. */
static qf_status device_pass(qf_vision *m, int keep) {
    const qf_backend *be = m->be;
    const size_t need = plan_device(m, NULL, m->B, keep);
    if (need > m->dfwd_cap) {
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        m->dfwd = NULL;
        m->dfwd_cap = 0;
        QF_TRY(be->alloc((void **)&m->dfwd, need * sizeof(float)));
        m->dfwd_cap = need;
    }
    plan_device(m, m->dfwd, m->B, keep);
    m->kept = keep;
    const size_t ncols = (size_t)(m->B * m->N) * (size_t)m->K;
    QF_TRY(be->copy2d(m->dcols, ncols * sizeof(float), m->hcols, ncols * sizeof(float), ncols * sizeof(float), 1));
    const int64_t key[3] = {m->B, (int64_t)(intptr_t)m->dfwd, keep};
    return qf_model_graph_run(be, &m->graph, key, 3, device_body, m);
}

static qf_status forward_device(qf_vision *m, int64_t B, const float *pixel_values, float *out) {
    const char *fn = "qf_vision_forward";
    const qf_backend *be = m->be;
    const qf_vision_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, N = m->N, K = m->K, T = B * N;
    const int64_t C = c->num_channels, S = c->image_size, p = c->patch_size, G = m->G;
#ifdef QF_HAVE_CUDA
    if (qf_cuda_is_device_ptr(pixel_values))
        return qf_fail(QF_ERR_ARG, "%s: pixel_values is GPU memory; on the GPU the vision tower takes the pixels in "
                                   "host memory (their im2col runs on the host)", fn);
#endif
    if ((double)T * (double)(3 * H > I ? 3 * H : I) > 2147483647.0 || (double)T * K > 2147483647.0)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld gives activations above the BLAS's int range", fn, (long long)B);
    /* pixels beyond G*p (image_size not a multiple of patch_size) reach no column, so the device
     * screen cannot see them: the whole image is checked here then (rare configurations) */
    if (G * p != S) QF_TRY(check_pixels(m, B, pixel_values, fn));

    const size_t ncols = (size_t)T * (size_t)K;
    if (ncols > m->hcols_cap) {
        void *h = NULL;
        if (posix_memalign(&h, 64, ncols * sizeof(float)))
            return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes for the im2col columns", fn,
                           ncols * sizeof(float));
        free(m->hcols);
        m->hcols = h;
        m->hcols_cap = ncols;
    }
    m->B = B;
    for (int64_t b = 0; b < B; b++) {
        float *rows = m->hcols + (size_t)(b * N) * (size_t)K;
        memset(rows, 0, (size_t)K * sizeof(float)); /* the class token's row */
        im2col(rows + K, pixel_values + b * C * S * S, 1, C, S, p, G);
    }
    /* a trainable float32 tower keeps what backward needs; a frozen one (or bf16) does not, and
     * its backward, when a pixel gradient is asked, runs the forward again from hcols */
    QF_TRY(device_pass(m, !m->frozen && !m->dbf16));
    int64_t screen = INT64_MAX;
    QF_TRY(be->copy2d(m->dscreen, sizeof screen, &screen, sizeof screen, sizeof screen, 1));
    QF_TRY(be->screen_nonfinite(m->dcols, (int64_t)ncols, m->dscreen));
    const size_t n = (size_t)(T * H) * sizeof(float);
    QF_TRY(be->copy2d(out, n, m->dout, n, n, 1));
    QF_TRY(be->synchronize());
    QF_TRY(be->copy2d(&screen, sizeof screen, m->dscreen, sizeof screen, sizeof screen, 1));
    if (screen != INT64_MAX) {
        /* named as the CPU names it: the first non-finite pixel in memory order */
        QF_TRY(check_pixels(m, B, pixel_values, fn));
        return qf_fail(QF_ERR_INTERNAL, "%s: the device found a non-finite im2col value at %lld but the host "
                                        "pixels are finite (were they changed during the call?)", fn, (long long)screen);
    }
    m->have_fwd = 1;
    return QF_OK;
}

/* Frees what the model holds on a device (the gradients downloaded first, so grads keeps the
 * newest) and the host staging buffers; the model is a CPU model again. */
static void release_device(qf_vision *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        be->free(m->dparams);
        be->free(m->dbf16);
        be->free(m->bwd);
        (void)sync_grads(m);
        be->free(m->dgrads);
        m->bwd = NULL;
        m->bwd_cap = 0;
    }
    m->dgrads = NULL;
    m->grads_on_device = 0;
    m->kept = 0;
    free(m->hcols);
    free(m->hgrad);
    m->hcols = m->hgrad = NULL;
    m->hcols_cap = m->hgrad_cap = 0;
    m->dfwd = m->dparams = m->etab = NULL;
    m->dfwd_cap = 0;
    m->dbf16 = NULL;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = NULL;
}

qf_status qf_vision_to_device(qf_vision *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_vision_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    int cuda;
    QF_TRY(qf_model_check_device(fn, "vision tower", device, weights, &cuda)); /* a failure leaves m as it was */
    release_device(m);
    if (!cuda) return QF_OK;
    const qf_backend *be = qf_model_cuda_backend();
    if (!be->sdpa_strided || !be->alloc)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: the %s backend lacks strided attention or device memory", fn, be->name);
    /* the CPU's planned blocks are not used on a device */
    free(m->fwd);
    free(m->bwd);
    m->fwd = m->bwd = NULL;
    m->fwd_cap = m->bwd_cap = 0;
    /* the device block: the parameters, then the embedding table [N, H] of the device forward
     * (class token + position 0; patch bias + position i) */
    const size_t n = m->nparams, H = (size_t)m->cfg.hidden_size, N = (size_t)m->N, at = qf_align_up(n, 16);
    float *dp = NULL, *tab = malloc(N * H * sizeof(float));
    uint16_t *db = NULL;
    if (!tab) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the embedding table", fn);
    for (size_t j = 0; j < H; j++) tab[j] = m->cls[j] + m->pos[j];
    for (size_t i = 1; i < N; i++)
        for (size_t j = 0; j < H; j++) tab[i * H + j] = m->patch_b[j] + m->pos[i * H + j];
    qf_status s = qf_model_upload_params(be, m->params, n, at - n + N * H, weights, &dp, &db, fn);
    if (s == QF_OK) s = be->copy2d(dp + at, N * H * sizeof(float), tab, N * H * sizeof(float), N * H * sizeof(float), 1);
    if (s == QF_OK) s = be->synchronize(); /* tab is host memory freed below */
    free(tab);
    if (s != QF_OK) {
        be->free(dp); /* NULL when the upload itself failed */
        be->free(db);
        return s;
    }
    m->be = be;
    m->on_device = 1;
    m->graph.off = qf_model_graphs_off();
    m->dparams = dp;
    m->etab = dp + at;
    m->dbf16 = db;
    return QF_OK;
}

int qf_vision_on_device(const qf_vision *m) { return m && m->on_device; }

/* ---- forward ---- */

qf_status qf_vision_forward(qf_vision *m, int64_t B, const float *pixel_values, float *out) {
    const char *fn = "qf_vision_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!pixel_values) return qf_fail(QF_ERR_ARG, "%s: pixel_values is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (B < 1 || B > (1 << 20)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 <= B <= 2^20", fn, (long long)B);
    m->have_fwd = 0;
    if (m->on_device) return forward_device(m, B, pixel_values, out);
    const qf_vision_config *c = &m->cfg;
    QF_TRY(check_pixels(m, B, pixel_values, fn));
    const int64_t H = c->hidden_size, I = c->intermediate_size, nh = c->num_attention_heads, hd = m->hd;
    const int64_t N = m->N, P = m->P, T = B * N;
    const float eps = (float)c->layer_norm_eps;
    if ((double)T * (double)(3 * H > I ? 3 * H : I) > 2147483647.0 || (double)B * P * m->K > 2147483647.0)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld gives activations above the BLAS's int range", fn, (long long)B);

    size_t need = plan_forward(m, NULL, B);
    QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, need, fn));
    plan_forward(m, m->fwd, B);
    m->B = B;

    /* embeddings: patches by im2col + GEMM, then class token and position embeddings */
    im2col(m->cols, pixel_values, B, c->num_channels, c->image_size, c->patch_size, m->G);
    QF_TRY(qf_linear_forward(m->tmp, m->cols, m->patch_w, m->patch_b, B * P, m->K, H));
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (T * H > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++) {
            const float *src = i ? m->tmp + (b * P + i - 1) * H : m->cls;
            const float *pos = m->pos + i * H;
            float *dst = m->x0 + (b * N + i) * H;
            for (int64_t j = 0; j < H; j++) dst[j] = src[j] + pos[j];
        }

    const float *x = m->x0;
    for (int64_t li = 0; li < c->num_hidden_layers; li++) {
        const vision_layer *l = &m->layers[li];
        vision_acts *a = &m->acts[li];
        QF_TRY(qf_layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, l->ln1_w, l->ln1_b, T, H, eps));
        QF_TRY(qf_linear_forward(m->tmp, a->ln1, l->wqkv, l->bqkv, T, H, 3 * H));
        qkv_to_heads(a->qh, m->tmp, 0, B, nh, N, hd);
        qkv_to_heads(a->kh, m->tmp, 1, B, nh, N, hd);
        qkv_to_heads(a->vh, m->tmp, 2, B, nh, N, hd);
        qf_sdpa_params sp = qf_sdpa_defaults(B, nh, nh, N, N, hd);
        qf_status s = qf_sdpa_forward(&sp, a->qh, a->kh, a->vh, a->oh, a->lse, NULL);
        if (s != QF_OK) return qf_fail_prefix(s, "%s (layer %lld self-attention)", fn, (long long)li);
        merge_heads(a->merged, a->oh, B, nh, N, hd);
        QF_TRY(qf_linear_forward(a->x_mid, a->merged, l->wo, l->bo, T, H, H));
        QF_TRY(qf_residual_forward(a->x_mid, a->x_mid, x, T * H));
        QF_TRY(qf_layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->x_mid, l->ln2_w, l->ln2_b, T, H, eps));
        QF_TRY(qf_linear_forward(a->pre, a->ln2, l->w1, l->b1, T, H, I));
        QF_TRY(qf_gelu_forward(a->act, a->pre, T * I, c->hidden_act));
        QF_TRY(qf_linear_forward(a->x_out, a->act, l->w2, l->b2, T, I, H));
        QF_TRY(qf_residual_forward(a->x_out, a->x_out, a->x_mid, T * H));
        x = a->x_out;
    }
    QF_TRY(qf_layernorm_forward(out, m->post_mean, m->post_rstd, x, m->post_w, m->post_b, T, H, eps));
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward ----
 * One code path for both backends: every op goes through the backend that holds the model (the
 * CPU table, or m->be on the GPU); parameters are read as PV(view) and their gradients go to
 * GV(view) (grads, or dgrads on the GPU). The forwards keep different things: the CPU forward
 * the attention heads, the device forward the packed qkv rows and merged output, from which the
 * heads are split into bwd here; the device's embedding ran as one GEMM over zero class-token
 * rows (hcols), whose patch rows are compacted here for the patch weight gradient. On the GPU
 * grad_out is staged in bwd (host or device pointer), and the pixel gradient's columns are
 * downloaded for the host col2im (copied to the caller's buffer, host or device); the call
 * returns after the GPU has finished. */

typedef struct {
    float *dx, *dln, *dtmp, *dqkv, *dqh, *dkh, *dvh, *doh, *dpre, *dcols, *drows;
    float *qh, *kh, *vh, *oh, *gout, *cols; /* device only: heads, staged grad_out, patch columns */
} vision_bwd;

static size_t plan_backward(const qf_vision *m, float *base, int pixels, vision_bwd *w) {
    const size_t H = (size_t)m->cfg.hidden_size, I = (size_t)m->cfg.intermediate_size;
    const size_t T = (size_t)(m->B * m->N), BP = (size_t)(m->B * m->P), K = (size_t)m->K;
    size_t off = 0;
    w->dx = carve(base, &off, T * H);
    w->dln = carve(base, &off, T * H);
    w->dtmp = carve(base, &off, T * H);
    w->dqkv = carve(base, &off, T * 3 * H);
    w->dqh = carve(base, &off, T * H);
    w->dkh = carve(base, &off, T * H);
    w->dvh = carve(base, &off, T * H);
    w->doh = carve(base, &off, T * H);
    w->dpre = carve(base, &off, T * I);
    w->dcols = carve(base, &off, pixels ? BP * K : 0);
    w->drows = carve(base, &off, (size_t)m->B * H); /* the class-token rows of dx */
    w->qh = w->kh = w->vh = w->oh = w->gout = w->cols = NULL;
    if (m->on_device) {
        w->qh = carve(base, &off, T * H);
        w->kh = carve(base, &off, T * H);
        w->vh = carve(base, &off, T * H);
        w->oh = carve(base, &off, T * H);
        w->gout = carve(base, &off, T * H);
        w->cols = carve(base, &off, BP * K);
    }
    return off;
}

/* The pixel gradient from its columns gcols [B*P, K] (this backend's memory): col2im on the
 * host, into grad_pixel_values directly when it is host memory. */
static qf_status pixel_grad(qf_vision *m, const float *gcols, float *grad_pixel_values, const char *fn) {
    const qf_vision_config *c = &m->cfg;
    const int64_t B = m->B;
    if (!m->on_device) {
        col2im(grad_pixel_values, gcols, B, c->num_channels, c->image_size, c->patch_size, m->G);
        return QF_OK;
    }
    const size_t ncols = (size_t)(B * m->P) * (size_t)m->K;
    const size_t npix = (size_t)(B * c->num_channels) * (size_t)(c->image_size * c->image_size);
    int dev_dst = 0;
#ifdef QF_HAVE_CUDA
    dev_dst = qf_cuda_is_device_ptr(grad_pixel_values);
#endif
    const size_t need = ncols + (dev_dst ? npix : 0);
    if (need > m->hgrad_cap) {
        void *h = NULL;
        if (posix_memalign(&h, 64, need * sizeof(float)))
            return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes for the pixel gradient", fn,
                           need * sizeof(float));
        free(m->hgrad);
        m->hgrad = h;
        m->hgrad_cap = need;
    }
    QF_TRY(m->be->copy2d(m->hgrad, ncols * sizeof(float), gcols, ncols * sizeof(float), ncols * sizeof(float), 1));
    QF_TRY(m->be->synchronize());
    float *dst = dev_dst ? m->hgrad + ncols : grad_pixel_values;
    col2im(dst, m->hgrad, B, c->num_channels, c->image_size, c->patch_size, m->G);
    if (dev_dst) QF_TRY(m->be->copy2d(grad_pixel_values, npix * sizeof(float), dst, npix * sizeof(float),
                                      npix * sizeof(float), 1));
    return QF_OK;
}

static qf_status backward_body(qf_vision *m, const vision_bwd *w, const float *grad_out, float *grad_pixel_values) {
    const char *fn = "qf_vision_backward";
    const qf_backend *be = m->on_device ? m->be : qf_backend_cpu();
    const qf_vision_config *c = &m->cfg;
    const int64_t B = m->B, H = c->hidden_size, I = c->intermediate_size, nh = c->num_attention_heads, hd = m->hd;
    const int64_t N = m->N, P = m->P, K = m->K, T = B * N, L = c->num_hidden_layers;
    const int pg = !m->frozen; /* parameter gradients wanted */
    float *const gbase = m->on_device ? m->dgrads : m->grads;
    const float *const pbase = m->on_device ? m->dparams : m->params;
#define PV(p) (pbase + ((p) - m->params))
#define GV(p) (pg ? gbase + ((p) - m->params) : NULL)
    const float *gout = grad_out;
    if (m->on_device) {
        const size_t n = (size_t)(T * H) * sizeof(float);
        QF_TRY(be->copy2d(w->gout, n, grad_out, n, n, 1));
        gout = w->gout;
    }
    float *dx = w->dx, *dln = w->dln, *dtmp = w->dtmp;
    QF_TRY(be->layernorm_backward(dx, GV(m->post_w), GV(m->post_b), gout, m->acts[L - 1].x_out, PV(m->post_w),
                                  m->post_mean, m->post_rstd, T, H));
    for (int64_t li = L - 1; li >= 0; li--) {
        const vision_layer *l = &m->layers[li];
        const vision_acts *a = &m->acts[li];
        const float *x_in = li ? m->acts[li - 1].x_out : m->x0;
        /* x_out = x_mid + fc2(act(fc1(ln2(x_mid)))) */
        QF_TRY(be->linear_backward(w->dpre, GV(l->w2), GV(l->b2), dx, a->act, PV(l->w2), T, I, H));
        QF_TRY(be->gelu_backward(w->dpre, w->dpre, a->pre, T * I, c->hidden_act));
        QF_TRY(be->linear_backward(dln, GV(l->w1), GV(l->b1), w->dpre, a->ln2, PV(l->w1), T, H, I));
        QF_TRY(be->layernorm_backward(dtmp, GV(l->ln2_w), GV(l->ln2_b), dln, a->x_mid, PV(l->ln2_w), a->ln2_mean,
                                      a->ln2_rstd, T, H));
        QF_TRY(be->add(dx, dx, dtmp, T * H));
        /* x_mid = x_in + projection(attention(ln1(x_in))) */
        QF_TRY(be->linear_backward(dtmp, GV(l->wo), GV(l->bo), dx, a->merged, PV(l->wo), T, H, H));
        QF_TRY(be->split_heads(w->doh, dtmp, H, NULL, B, nh, N, 0, N, hd));
        const float *qh = a->qh, *kh = a->kh, *vh = a->vh, *oh = a->oh;
        if (!qh) { /* the device forward kept the packed rows: the heads, contiguous */
            QF_TRY(be->split_heads(w->qh, a->qkv, 3 * H, NULL, B, nh, N, 0, N, hd));
            QF_TRY(be->split_heads(w->kh, a->qkv + H, 3 * H, NULL, B, nh, N, 0, N, hd));
            QF_TRY(be->split_heads(w->vh, a->qkv + 2 * H, 3 * H, NULL, B, nh, N, 0, N, hd));
            QF_TRY(be->split_heads(w->oh, a->merged, H, NULL, B, nh, N, 0, N, hd));
            qh = w->qh, kh = w->kh, vh = w->vh, oh = w->oh;
        }
        qf_sdpa_params sp = qf_sdpa_defaults(B, nh, nh, N, N, hd);
        if (m->on_device) sp.check_finite = 0; /* a screen would wait for the GPU at every layer */
        qf_status s = qf_sdpa_backward(&sp, qh, kh, vh, oh, a->lse, w->doh, w->dqh, w->dkh, w->dvh);
        if (s != QF_OK) return qf_fail_prefix(s, "%s (layer %lld self-attention)", fn, (long long)li);
        QF_TRY(be->merge_heads(w->dqkv, 3 * H, w->dqh, B, nh, N, 0, N, hd, 0));
        QF_TRY(be->merge_heads(w->dqkv + H, 3 * H, w->dkh, B, nh, N, 0, N, hd, 0));
        QF_TRY(be->merge_heads(w->dqkv + 2 * H, 3 * H, w->dvh, B, nh, N, 0, N, hd, 0));
        QF_TRY(be->linear_backward(dln, GV(l->wqkv), l->bqkv ? GV(l->bqkv) : NULL, w->dqkv, a->ln1, PV(l->wqkv), T,
                                   H, 3 * H));
        QF_TRY(be->layernorm_backward(dtmp, GV(l->ln1_w), GV(l->ln1_b), dln, x_in, PV(l->ln1_w), a->ln1_mean,
                                      a->ln1_rstd, T, H));
        QF_TRY(be->add(dx, dx, dtmp, T * H));
    }

    /* embeddings: x0[b,i] = (i ? patch(b,i-1) : cls) + pos[i]; position row i sums rows i of
     * every item, the class token rows 0 */
    if (pg) {
        QF_TRY(be->embedding_backward(NULL, GV(m->pos), dx, NULL, -1, T, N, H));
        QF_TRY(be->copy2d(w->drows, (size_t)H * sizeof(float), dx, (size_t)(N * H) * sizeof(float),
                          (size_t)H * sizeof(float), (size_t)B));
        QF_TRY(be->embedding_backward(NULL, GV(m->cls), w->drows, NULL, -1, B, 1, H));
    }
    /* the patch rows, contiguous [B*P, H], into dln (T*H >= B*P*H) */
    const size_t prow = (size_t)(P * H) * sizeof(float);
    QF_TRY(be->copy2d(dln, prow, dx + H, (size_t)(N * H) * sizeof(float), prow, (size_t)B));
    const float *cols = m->cols;
    if (m->on_device) { /* the device columns [B*N, K] have each item's zero class-token row first */
        const size_t crow = (size_t)(P * K) * sizeof(float);
        QF_TRY(be->copy2d(w->cols, crow, m->dcols + K, (size_t)(N * K) * sizeof(float), crow, (size_t)B));
        cols = w->cols;
    }
    float *gcols = grad_pixel_values ? w->dcols : NULL;
    QF_TRY(be->linear_backward(gcols, GV(m->patch_w), GV(m->patch_b), dln, cols, PV(m->patch_w), B * P, K, H));
    if (grad_pixel_values) QF_TRY(pixel_grad(m, gcols, grad_pixel_values, fn));
#undef PV
#undef GV
    return QF_OK;
}

/* the device gradient block at the first GPU backward (placement.c) */
static qf_status device_grads(qf_vision *m, const char *fn) {
    return qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->grads, m->nparams, &m->grads_on_device, fn);
}

/* grads = dgrads when the device copy is newer (placement.c) */
static qf_status sync_grads(qf_vision *m) {
    return qf_model_sync_grads(m->be, m->grads, m->dgrads, m->nparams, &m->grads_on_device);
}

qf_status qf_vision_backward(qf_vision *m, const float *grad_out, float *grad_pixel_values) {
    const char *fn = "qf_vision_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->dbf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_vision_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_vision_forward on this model to differentiate", fn);
    if (m->frozen && !grad_pixel_values) return QF_OK; /* nothing asked for */
    /* a device forward that kept no activations (the tower was frozen then) runs again, keeping
     * them, from the columns it left in hcols (its output is not needed again) */
    if (m->on_device && !m->kept) QF_TRY(device_pass(m, 1));
    vision_bwd w;
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, plan_backward(m, NULL, grad_pixel_values != NULL, &w), fn));
    plan_backward(m, m->bwd, grad_pixel_values != NULL, &w);
    if (!m->frozen) QF_TRY(device_grads(m, fn));
    qf_status s = backward_body(m, &w, grad_out, grad_pixel_values);
    if (m->on_device) {
        if (!m->frozen) m->grads_on_device = 1; /* dgrads may have changed, even after a failure */
        qf_status s2 = m->be->synchronize();   /* nothing may still run on bwd or the caller's buffers */
        if (s == QF_OK) s = s2;
    }
    return s;
}
