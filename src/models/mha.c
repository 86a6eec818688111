/* mha.c - torch.nn.MultiheadAttention (torch 2.x F.multi_head_attention_forward semantics),
 * forward and backward, on qf_linear_* and qf_sdpa_*.
 *
 * Forward: q = query Wq^T + bq, k = key Wk^T + bk, v = value Wv^T + bv (one GEMM each, on the
 * tokens in the caller's layout), split into heads [B,H,*,hd], qf_sdpa_forward with one combined
 * mask, merge heads back to tokens, out = merged Wo^T + bo. Because the projections act on
 * tokens, batch_first only changes how a token index maps to (b, position): tok(b,i) = b*L + i
 * (batch_first) or i*B + b. No transposes of the inputs or the output are needed.
 *
 * Masks (torch's MHA conventions in, SDPA conventions out): key_padding_mask [B,S] nonzero =
 * ignore; bool attn_mask nonzero = NOT allowed; float attn_mask is added; attn_mask is [L,S] or
 * [B*H,L,S]; is_causal adds "key j > query i is blocked". They are combined into one planned
 * buffer of shape [B, H or 1, L, S]: float (blocked = -inf) when attn_mask is float, else bool
 * (1 = attend). Only is_causal alone goes to SDPA as its is_causal flag.
 *
 * A query row whose every key is blocked gives zero output and zero weights (torch gives NaN).
 *
 * Invariants:
 *   - Parameters live in one buffer and their gradients in another, laid out by ptab (llm.c).
 *     Parameter gradients are accumulated by backward and zeroed only by qf_mha_zero_grad.
 *   - fwd/bwd are grow-only planned blocks: a forward/backward with the shapes of an earlier one
 *     allocates nothing. fwd holds copies of the inputs and every activation backward needs, so
 *     the caller may reuse its input buffers after forward.
 *   - have_fwd is set only after a forward fully succeeded; backward refuses without one.
 *   - Self-attention (query == key == value): backward still returns three separate input
 *     gradients; the caller sums them, as autograd does for one tensor used three times. */
#include "internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { P_MAX = 6 };

typedef struct {
    const char *name;
    int ndim;
    int64_t shape[2];
    size_t off, n;  /* in floats, into params / grads */
} mha_ptab;

struct qf_mha {
    qf_mha_config cfg;          /* kdim/vdim resolved */
    int64_t E, H, hd, kdim, vdim;
    int packed;                 /* in_proj_weight [3E,E] vs q/k/v_proj_weight */
    int np;
    mha_ptab ptab[P_MAX];
    float *params, *grads;
    /* views into params/grads (NULL when absent) */
    const float *wq, *wk, *wv, *bq, *bk, *bv, *wo, *bo;
    float *gwq, *gwk, *gwv, *gbq, *gbk, *gbv, *gwo, *gbo;

    /* forward planned block */
    float *fwd;
    size_t fwd_cap;             /* floats */
    float *xq, *xk, *xv;        /* input copies [tokens, E|kdim|vdim] */
    float *qh, *kh, *vh, *oh;   /* [B,H,L|S,hd] */
    float *lse;                 /* [B,H,L] */
    float *merged;              /* [B*L tokens, E] input of out_proj */
    float *tmp;                 /* [max(B*L,B*S), E] token-major projection scratch */
    void *mask;                 /* [B,Hm,L,S] float or uint8 */
    float *wbuf;                /* [B,H,L,S] when weights are averaged */
    /* backward planned block */
    float *bwd;
    size_t bwd_cap;
    int64_t B, L, S;
    int have_fwd;
    qf_sdpa_params sp;
};

/* ---- parameters ---- */

static void add_param(qf_mha *m, const char *name, int64_t d0, int64_t d1, size_t *off) {
    mha_ptab *p = &m->ptab[m->np++];
    p->name = name;
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    p->off = *off;
    *off += qf_align_up(p->n, 16);
}

static const mha_ptab *find_param(const qf_mha *m, const char *name) {
    for (int i = 0; i < m->np; i++)
        if (!strcmp(m->ptab[i].name, name)) return &m->ptab[i];
    return NULL;
}

/* Names torch's MultiheadAttention can put in a state dict, and why this config rejects them. */
static qf_status reject_tensor(const qf_mha *m, const char *file, const char *name) {
    if (!strcmp(name, "bias_k") || !strcmp(name, "bias_v"))
        return qf_fail(QF_ERR_UNSUPPORTED,
                       "qf_mha_load: %s has tensor \"%s\": add_bias_kv=True is not supported", file, name);
    if (!strcmp(name, "in_proj_weight"))
        return qf_fail(QF_ERR_FORMAT,
                       "qf_mha_load: %s has tensor \"in_proj_weight\" but kdim = %lld, vdim = %lld "
                       "differ from embed_dim = %lld, which needs q/k/v_proj_weight instead",
                       file, (long long)m->kdim, (long long)m->vdim, (long long)m->E);
    if (!strcmp(name, "q_proj_weight") || !strcmp(name, "k_proj_weight") || !strcmp(name, "v_proj_weight"))
        return qf_fail(QF_ERR_FORMAT,
                       "qf_mha_load: %s has tensor \"%s\" but kdim = vdim = embed_dim = %lld, "
                       "which uses the packed in_proj_weight (pass kdim/vdim if they differ)",
                       file, name, (long long)m->E);
    if (!strcmp(name, "in_proj_bias") || !strcmp(name, "out_proj.bias"))
        return qf_fail(QF_ERR_FORMAT, "qf_mha_load: %s has tensor \"%s\" but the config says bias = 0",
                       file, name);
    return qf_fail(QF_ERR_FORMAT,
                   "qf_mha_load: %s has unexpected tensor \"%s\" (a MultiheadAttention state dict "
                   "holds only in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj.weight, "
                   "out_proj.bias)", file, name);
}

qf_status qf_mha_load(const char *path, const qf_mha_config *cfg, qf_mha **out) {
    const char *fn = "qf_mha_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!path) return qf_fail(QF_ERR_ARG, "%s: path is NULL", fn);
    if (!cfg) return qf_fail(QF_ERR_ARG, "%s: cfg is NULL", fn);
    int64_t E = cfg->embed_dim, H = cfg->num_heads;
    if (E < 1) return qf_fail(QF_ERR_ARG, "%s: embed_dim = %lld, expected >= 1", fn, (long long)E);
    if (H < 1) return qf_fail(QF_ERR_ARG, "%s: num_heads = %lld, expected >= 1", fn, (long long)H);
    if (E % H)
        return qf_fail(QF_ERR_ARG, "%s: embed_dim = %lld is not divisible by num_heads = %lld", fn,
                       (long long)E, (long long)H);
    if (cfg->kdim < 0) return qf_fail(QF_ERR_ARG, "%s: kdim = %lld, expected >= 0 (0 = embed_dim)", fn, (long long)cfg->kdim);
    if (cfg->vdim < 0) return qf_fail(QF_ERR_ARG, "%s: vdim = %lld, expected >= 0 (0 = embed_dim)", fn, (long long)cfg->vdim);
    if (!(cfg->dropout >= 0.0f && cfg->dropout < 1.0f))
        return qf_fail(QF_ERR_ARG, "%s: dropout = %g, expected 0 <= dropout < 1", fn, (double)cfg->dropout);
    if (E > (1 << 20) || cfg->kdim > (1 << 20) || cfg->vdim > (1 << 20))
        return qf_fail(QF_ERR_ARG, "%s: embed_dim/kdim/vdim above 2^20 are not supported", fn);

    qf_mha *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the module", fn);
    m->cfg = *cfg;
    m->E = E;
    m->H = H;
    m->hd = E / H;
    m->kdim = cfg->kdim ? cfg->kdim : E;
    m->vdim = cfg->vdim ? cfg->vdim : E;
    m->cfg.kdim = m->kdim;
    m->cfg.vdim = m->vdim;
    m->cfg.bias = cfg->bias ? 1 : 0;
    m->packed = m->kdim == E && m->vdim == E; /* torch's _qkv_same_embed_dim */

    size_t off = 0;
    if (m->packed) {
        add_param(m, "in_proj_weight", 3 * E, E, &off);
    } else {
        add_param(m, "q_proj_weight", E, E, &off);
        add_param(m, "k_proj_weight", E, m->kdim, &off);
        add_param(m, "v_proj_weight", E, m->vdim, &off);
    }
    if (m->cfg.bias) add_param(m, "in_proj_bias", 3 * E, 0, &off);
    add_param(m, "out_proj.weight", E, E, &off);
    if (m->cfg.bias) add_param(m, "out_proj.bias", E, 0, &off);

    if (posix_memalign((void **)&m->params, 64, off * sizeof(float)) ||
        posix_memalign((void **)&m->grads, 64, off * sizeof(float))) {
        qf_mha_free(m);
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * off);
    }
    memset(m->grads, 0, off * sizeof(float));

    qf_safetensors *f = NULL;
    qf_status s = qf_st_open(path, &f);
    if (s != QF_OK) {
        qf_mha_free(m);
        return qf_fail_prefix(s, "%s", fn);
    }
    /* every tensor in the file must be one this config expects */
    int n = qf_st_count(f);
    for (int i = 0; i < n && s == QF_OK; i++) {
        qf_tensor_view tv;
        s = qf_st_get(f, i, &tv);
        if (s == QF_OK && !find_param(m, tv.name)) s = reject_tensor(m, path, tv.name);
    }
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const mha_ptab *p = &m->ptab[i];
        s = qf_st_read_f32(f, p->name, p->ndim, p->shape, m->params + p->off);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s (%s MultiheadAttention, embed_dim %lld, kdim %lld, vdim %lld)", fn,
                                           m->packed ? "packed" : "separate-projection", (long long)E,
                                           (long long)m->kdim, (long long)m->vdim);
    }
    qf_st_close(f);
    if (s != QF_OK) {
        qf_mha_free(m);
        return s;
    }

    /* views */
    const mha_ptab *p;
    if (m->packed) {
        p = find_param(m, "in_proj_weight");
        m->wq = m->params + p->off;
        m->wk = m->wq + E * E;
        m->wv = m->wk + E * E;
        m->gwq = m->grads + p->off;
        m->gwk = m->gwq + E * E;
        m->gwv = m->gwk + E * E;
    } else {
        p = find_param(m, "q_proj_weight"); m->wq = m->params + p->off; m->gwq = m->grads + p->off;
        p = find_param(m, "k_proj_weight"); m->wk = m->params + p->off; m->gwk = m->grads + p->off;
        p = find_param(m, "v_proj_weight"); m->wv = m->params + p->off; m->gwv = m->grads + p->off;
    }
    if (m->cfg.bias) {
        p = find_param(m, "in_proj_bias");
        m->bq = m->params + p->off; m->bk = m->bq + E; m->bv = m->bk + E;
        m->gbq = m->grads + p->off; m->gbk = m->gbq + E; m->gbv = m->gbk + E;
        p = find_param(m, "out_proj.bias");
        m->bo = m->params + p->off; m->gbo = m->grads + p->off;
    }
    p = find_param(m, "out_proj.weight");
    m->wo = m->params + p->off;
    m->gwo = m->grads + p->off;
    *out = m;
    return QF_OK;
}

void qf_mha_free(qf_mha *m) {
    if (!m) return;
    free(m->params);
    free(m->grads);
    free(m->fwd);
    free(m->bwd);
    free(m);
}

int qf_mha_num_params(const qf_mha *m) { return m ? m->np : 0; }

qf_status qf_mha_param(qf_mha *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_mha_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_mha_param: out is NULL");
    if (i < 0 || i >= m->np)
        return qf_fail(QF_ERR_ARG, "qf_mha_param: index %d is out of range (the module has %d parameters)", i, m->np);
    const mha_ptab *p = &m->ptab[i];
    out->name = p->name;
    out->data = m->params + p->off;
    out->grad = m->grads + p->off;
    out->ndim = p->ndim;
    out->shape[0] = p->shape[0];
    out->shape[1] = p->ndim == 2 ? p->shape[1] : 0;
    out->shape[2] = out->shape[3] = 0;
    return QF_OK;
}

void qf_mha_zero_grad(qf_mha *m) {
    if (!m) return;
    for (int i = 0; i < m->np; i++) memset(m->grads + m->ptab[i].off, 0, m->ptab[i].n * sizeof(float));
}

qf_status qf_mha_get_config(const qf_mha *m, qf_mha_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_mha_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_mha_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

qf_status qf_mha_last_shape(const qf_mha *m, int64_t *B, int64_t *L, int64_t *S) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_mha_last_shape: m is NULL");
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "qf_mha_last_shape: no successful qf_mha_forward yet");
    if (B) *B = m->B;
    if (L) *L = m->L;
    if (S) *S = m->S;
    return QF_OK;
}

/* ---- planned buffers ---- */

/* Grow-only block of `floats` floats; contents are not kept. */
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

/* Carves n floats (64-byte aligned) from a running offset. */
static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

/* ---- head split / merge: tokens [T,E] <-> heads [B,H,len,hd] ---- */

static void split_heads(float *heads, const float *tok, int64_t B, int64_t H, int64_t len, int64_t hd,
                        int batch_first) {
    const int64_t E = H * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * E > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++) {
            int64_t t = batch_first ? b * len + i : i * B + b;
            for (int64_t h = 0; h < H; h++)
                memcpy(heads + ((b * H + h) * len + i) * hd, tok + t * E + h * hd, (size_t)hd * sizeof(float));
        }
}

static void merge_heads(float *tok, const float *heads, int64_t B, int64_t H, int64_t len, int64_t hd,
                        int batch_first) {
    const int64_t E = H * hd;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * len * E > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < len; i++) {
            int64_t t = batch_first ? b * len + i : i * B + b;
            for (int64_t h = 0; h < H; h++)
                memcpy(tok + t * E + h * hd, heads + ((b * H + h) * len + i) * hd, (size_t)hd * sizeof(float));
        }
}

/* ---- forward ---- */

static qf_status check_args(const qf_mha *m, const qf_mha_args *a) {
    const char *fn = "qf_mha_forward";
    if (a->B < 1 || a->L < 1 || a->S < 1)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, L = %lld, S = %lld; each must be >= 1", fn,
                       (long long)a->B, (long long)a->L, (long long)a->S);
    if (a->B > (1 << 24) || a->L > (1 << 24) || a->S > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: B, L, S above 2^24 are not supported", fn);
    const qf_mask *am = &a->attn_mask;
    if (am->kind == QF_MASK_NONE) return QF_OK;
    if (am->kind != QF_MASK_BOOL && am->kind != QF_MASK_FLOAT)
        return qf_fail(QF_ERR_ARG, "%s: attn_mask kind %d is not NONE, BOOL or FLOAT", fn, (int)am->kind);
    if (!am->data) return qf_fail(QF_ERR_ARG, "%s: attn_mask data is NULL", fn);
    if (am->ndim == 2) {
        if (am->shape[0] != a->L || am->shape[1] != a->S)
            return qf_fail(QF_ERR_SHAPE, "%s: attn_mask has shape [%lld,%lld]; a 2-D mask must be [L,S] = [%lld,%lld]",
                           fn, (long long)am->shape[0], (long long)am->shape[1], (long long)a->L, (long long)a->S);
    } else if (am->ndim == 3) {
        if (am->shape[0] != a->B * m->H || am->shape[1] != a->L || am->shape[2] != a->S)
            return qf_fail(QF_ERR_SHAPE,
                           "%s: attn_mask has shape [%lld,%lld,%lld]; a 3-D mask must be [B*num_heads,L,S] = [%lld,%lld,%lld]",
                           fn, (long long)am->shape[0], (long long)am->shape[1], (long long)am->shape[2],
                           (long long)(a->B * m->H), (long long)a->L, (long long)a->S);
    } else {
        return qf_fail(QF_ERR_SHAPE, "%s: attn_mask has %d dims; expected 2 ([L,S]) or 3 ([B*num_heads,L,S])", fn, am->ndim);
    }
    return QF_OK;
}

/* Builds the combined SDPA mask into m->mask; returns its kind (NONE when no buffer is needed). */
static qf_mask_kind build_mask(qf_mha *m, const qf_mha_args *a, int64_t Hm) {
    const qf_mask *am = &a->attn_mask;
    const int use_buf = a->key_padding_mask || am->kind != QF_MASK_NONE;
    if (!use_buf) return QF_MASK_NONE;
    const int64_t B = a->B, L = a->L, S = a->S, H = m->H;
    const uint8_t *kpm = a->key_padding_mask;
    const int causal = a->is_causal;
    const int am3 = am->kind != QF_MASK_NONE && am->ndim == 3;
    if (am->kind == QF_MASK_FLOAT) {
        float *dst = m->mask;
        const float *src = am->data;
#pragma omp parallel for collapse(3) num_threads(qf_threads()) if (B * Hm * L * S > 65536)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hm; h++)
                for (int64_t i = 0; i < L; i++) {
                    const float *row = src + ((am3 ? (b * H + h) * L : 0) + i) * S;
                    float *out = dst + ((b * Hm + h) * L + i) * S;
                    for (int64_t j = 0; j < S; j++) {
                        int blocked = (kpm && kpm[b * S + j]) || (causal && j > i);
                        out[j] = blocked ? -INFINITY : row[j];
                    }
                }
        return QF_MASK_FLOAT;
    }
    uint8_t *dst = m->mask;
    const uint8_t *src = am->kind == QF_MASK_BOOL ? am->data : NULL;
#pragma omp parallel for collapse(3) num_threads(qf_threads()) if (B * Hm * L * S > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hm; h++)
            for (int64_t i = 0; i < L; i++) {
                const uint8_t *row = src ? src + ((am3 ? (b * H + h) * L : 0) + i) * S : NULL;
                uint8_t *out = dst + ((b * Hm + h) * L + i) * S;
                for (int64_t j = 0; j < S; j++) {
                    int blocked = (kpm && kpm[b * S + j]) || (causal && j > i) || (row && row[j]);
                    out[j] = blocked ? 0 : 1; /* SDPA: 1 = attend */
                }
            }
    return QF_MASK_BOOL;
}

qf_status qf_mha_forward(qf_mha *m, const qf_mha_args *a, const float *query, const float *key,
                         const float *value, float *out, float *weights) {
    const char *fn = "qf_mha_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!query) return qf_fail(QF_ERR_ARG, "%s: query is NULL", fn);
    if (!key) return qf_fail(QF_ERR_ARG, "%s: key is NULL", fn);
    if (!value) return qf_fail(QF_ERR_ARG, "%s: value is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (a->need_weights && !weights)
        return qf_fail(QF_ERR_ARG, "%s: weights is NULL but need_weights is set", fn);
    m->have_fwd = 0;
    QF_TRY(check_args(m, a));

    const int64_t B = a->B, L = a->L, S = a->S, E = m->E, H = m->H, hd = m->hd;
    const int bf = m->cfg.batch_first;
    const int has_mask = a->key_padding_mask || a->attn_mask.kind != QF_MASK_NONE;
    const int64_t Hm = a->attn_mask.kind != QF_MASK_NONE && a->attn_mask.ndim == 3 ? H : 1;
    const int avg = a->need_weights && a->average_attn_weights;
    const size_t nq = (size_t)(B * L * E), nk = (size_t)(B * S * E);
    const size_t nmask = has_mask ? (size_t)(B * Hm * L * S) : 0; /* floats >= uint8s */
    const size_t nw = avg ? (size_t)(B * H * L * S) : 0;

    /* plan: sizes first (base NULL), then carve from the grown block */
    float *base = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        m->xq = carve(base, &off, (size_t)(B * L) * (size_t)E);
        m->xk = carve(base, &off, (size_t)(B * S) * (size_t)m->kdim);
        m->xv = carve(base, &off, (size_t)(B * S) * (size_t)m->vdim);
        m->qh = carve(base, &off, nq);
        m->kh = carve(base, &off, nk);
        m->vh = carve(base, &off, nk);
        m->oh = carve(base, &off, nq);
        m->lse = carve(base, &off, (size_t)(B * H * L));
        m->merged = carve(base, &off, nq);
        m->tmp = carve(base, &off, nq > nk ? nq : nk);
        m->mask = carve(base, &off, nmask);
        m->wbuf = carve(base, &off, nw);
        if (pass == 0) {
            QF_TRY(grow(&m->fwd, &m->fwd_cap, off, fn));
            base = m->fwd;
        }
    }

    /* the inputs are copied: backward needs them and the caller may reuse its buffers */
    memcpy(m->xq, query, (size_t)(B * L * E) * sizeof(float));
    memcpy(m->xk, key, (size_t)(B * S * m->kdim) * sizeof(float));
    memcpy(m->xv, value, (size_t)(B * S * m->vdim) * sizeof(float));

    QF_TRY(qf_linear_forward(m->tmp, m->xq, m->wq, m->bq, B * L, E, E));
    split_heads(m->qh, m->tmp, B, H, L, hd, bf);
    QF_TRY(qf_linear_forward(m->tmp, m->xk, m->wk, m->bk, B * S, m->kdim, E));
    split_heads(m->kh, m->tmp, B, H, S, hd, bf);
    QF_TRY(qf_linear_forward(m->tmp, m->xv, m->wv, m->bv, B * S, m->vdim, E));
    split_heads(m->vh, m->tmp, B, H, S, hd, bf);

    qf_sdpa_params sp = qf_sdpa_defaults(B, H, H, L, S, hd);
    sp.dropout_p = a->training ? m->cfg.dropout : 0.0f;
    sp.seed = a->seed;
    sp.offset = a->offset;
    sp.mask.kind = build_mask(m, a, Hm);
    if (sp.mask.kind != QF_MASK_NONE) {
        sp.mask.data = m->mask;
        sp.mask.ndim = 4;
        sp.mask.shape[0] = B;
        sp.mask.shape[1] = Hm;
        sp.mask.shape[2] = L;
        sp.mask.shape[3] = S;
    } else {
        sp.is_causal = a->is_causal ? 1 : 0;
    }
    float *wdst = a->need_weights ? (avg ? m->wbuf : weights) : NULL;
    qf_status s = qf_sdpa_forward(&sp, m->qh, m->kh, m->vh, m->oh, m->lse, wdst);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);

    if (avg) {
        const float inv = 1.0f / (float)H;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * H * L * S > 65536)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < L; i++) {
                float *dst = weights + (b * L + i) * S;
                for (int64_t j = 0; j < S; j++) dst[j] = 0.0f;
                for (int64_t h = 0; h < H; h++) {
                    const float *src = m->wbuf + ((b * H + h) * L + i) * S;
                    for (int64_t j = 0; j < S; j++) dst[j] += src[j];
                }
                for (int64_t j = 0; j < S; j++) dst[j] *= inv;
            }
    }
    merge_heads(m->merged, m->oh, B, H, L, hd, bf);
    QF_TRY(qf_linear_forward(out, m->merged, m->wo, m->bo, B * L, E, E));

    m->sp = sp;
    m->B = B;
    m->L = L;
    m->S = S;
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward ---- */

qf_status qf_mha_backward(qf_mha *m, const float *grad_out, float *grad_query, float *grad_key,
                          float *grad_value) {
    const char *fn = "qf_mha_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_mha_forward on this module to differentiate", fn);
    const int64_t B = m->B, L = m->L, S = m->S, E = m->E, H = m->H, hd = m->hd;
    const int bf = m->cfg.batch_first;
    const size_t nq = (size_t)(B * L * E), nk = (size_t)(B * S * E);

    float *base = NULL, *d_merged = NULL, *d_oh = NULL, *dqh = NULL, *dkh = NULL, *dvh = NULL, *dtmp = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        d_merged = carve(base, &off, nq);
        d_oh = carve(base, &off, nq);
        dqh = carve(base, &off, nq);
        dkh = carve(base, &off, nk);
        dvh = carve(base, &off, nk);
        dtmp = carve(base, &off, nq > nk ? nq : nk);
        if (pass == 0) {
            QF_TRY(grow(&m->bwd, &m->bwd_cap, off, fn));
            base = m->bwd;
        }
    }

    /* out = merged Wo^T + bo */
    QF_TRY(qf_linear_backward(d_merged, m->gwo, m->gbo, grad_out, m->merged, m->wo, B * L, E, E));
    split_heads(d_oh, d_merged, B, H, L, hd, bf);
    qf_status s = qf_sdpa_backward(&m->sp, m->qh, m->kh, m->vh, m->oh, m->lse, d_oh, dqh, dkh, dvh);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    /* q/k/v = x W^T + b */
    merge_heads(dtmp, dqh, B, H, L, hd, bf);
    QF_TRY(qf_linear_backward(grad_query, m->gwq, m->gbq, dtmp, m->xq, m->wq, B * L, E, E));
    merge_heads(dtmp, dkh, B, H, S, hd, bf);
    QF_TRY(qf_linear_backward(grad_key, m->gwk, m->gbk, dtmp, m->xk, m->wk, B * S, m->kdim, E));
    merge_heads(dtmp, dvh, B, H, S, hd, bf);
    QF_TRY(qf_linear_backward(grad_value, m->gwv, m->gbv, dtmp, m->xv, m->wv, B * S, m->vdim, E));
    return QF_OK;
}
