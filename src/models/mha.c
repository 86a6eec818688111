/* mha.c - torch.nn.MultiheadAttention (torch 2.x F.multi_head_attention_forward semantics),
 * forward and backward, on the CPU or the GPU: one code path over the backend table
 * (src/backend/backend.h), m->be being the CPU's or, after qf_mha_to_device(m, "cuda", ..), the
 * GPU's.
 *
 * Forward: q = query Wq^T + bq, k = key Wk^T + bk, v = value Wv^T + bv (one GEMM each, on the
 * tokens in the caller's layout), attention per head with one combined mask, out = merged Wo^T +
 * bo. Because the projections act on tokens, batch_first only changes how a token index maps to
 * (b, position): tok(b,i) = b*L + i (batch_first) or i*B + b. Heads are split out of the
 * projection rows (and merged back) by the backend's split/merge_heads; for the seq-first layout
 * one call does it by seeing [L, B*E] rows as B*H heads of one item. On a backend whose SDPA
 * reads strided views (the GPU) and when no weights are asked for, attention reads its heads in
 * place from the projection rows and writes the merged rows (no split/merge); backward then
 * splits the heads it needs first (the CUDA SDPA backward takes contiguous heads only).
 *
 * Masks (torch's MHA conventions in, SDPA conventions out): key_padding_mask [B,S] nonzero =
 * ignore; bool attn_mask nonzero = NOT allowed; float attn_mask is added; attn_mask is [L,S] or
 * [B*H,L,S]; is_causal adds "key j > query i is blocked". They are combined on the host into one
 * planned buffer of shape [B, H or 1, L, S] (uploaded on the GPU): float (blocked = -inf) when
 * attn_mask is float, else bool (1 = attend). Only is_causal alone goes to SDPA as its flag.
 * Masks are always host memory.
 *
 * Averaged weights: the per-head weights [B,H,L,S] are transposed to [B*L*S, H] (split_heads with
 * head dim 1) and multiplied by a row of 1/H (one GEMM), so the average runs on either backend.
 *
 * A query row whose every key is blocked gives zero output and zero weights (torch gives NaN).
 * NaN/Inf in query, key, value (forward) or grad_out (backward) is refused (QF_ERR_NONFINITE,
 * naming the tensor and the first bad element), as is NaN/+Inf in a float attn_mask.
 *
 * Invariants:
 *   - Parameters live in one host buffer and their gradients in another, laid out by ptab (llm.c).
 *     On the GPU run_params is their device copy (and params_bf16 its bf16 copy with bf16
 *     weights; same offsets) and dgrads the device gradients; grads_on_device = 1 while the host
 *     grads are stale (qf_mha_param downloads them once). Parameter gradients are accumulated by
 *     backward and zeroed only by qf_mha_zero_grad. Parameter edits through qf_mha_param after
 *     placing are not uploaded.
 *   - fwd/bwd are grow-only planned blocks in the backend's memory: a forward/backward with the
 *     shapes of an earlier one allocates nothing (hmask, the host side of the mask, likewise).
 *     fwd holds copies of the inputs and every activation backward needs, so the caller may
 *     reuse its input buffers after forward.
 *   - On the GPU, inputs and outputs may be host memory (copied through planned device buffers)
 *     or GPU memory (used in place; qf_backend_for decides); a forward or backward waits for the
 *     GPU once, at its end.
 *   - have_fwd is set only after a forward fully succeeded; backward refuses without one.
 *   - Self-attention (query == key == value): backward still returns three separate input
 *     gradients; the caller sums them, as autograd does for one tensor used three times. */
#include "models_internal.h"
#include <math.h>
#include <stdint.h>
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
    size_t params_total;        /* floats in params / grads */
    float *params, *grads;      /* host */
    float *inv_h;               /* host: H copies of 1/H (the averaging row, uploaded per use) */

    /* placement */
    const qf_backend *be;       /* the CPU table, or the GPU's after qf_mha_to_device(.., "cuda") */
    int on_device;
    qf_dtype wdtype;            /* QF_F32, or QF_BF16 (GPU: GEMMs read params_bf16) */
    float *run_params;          /* params, or their device copy */
    uint16_t *params_bf16;      /* device bf16 copy of params, or NULL */
    float *dgrads;              /* device gradients (GPU), else NULL */
    int grads_on_device;

    /* views into run_params / the running gradients (NULL when absent) */
    const float *wq, *wk, *wv, *bq, *bk, *bv, *wo, *bo;
    const uint16_t *wq16, *wk16, *wv16, *wo16;
    float *gwq, *gwk, *gwv, *gbq, *gbk, *gbv, *gwo, *gbo;

    /* forward planned block (backend memory) */
    float *fwd;
    size_t fwd_cap;             /* floats */
    float *xq, *xk, *xv;        /* input copies [tokens, E|kdim|vdim] */
    float *qp, *kp, *vp;        /* projections, token-major [tokens, E] */
    float *qh, *kh, *vh, *oh;   /* [B,H,L|S,hd] */
    float *lse;                 /* [B,H,L] */
    float *merged;              /* [B*L tokens, E] input of out_proj */
    void *mask;                 /* [B,Hm,L,S] float or uint8 */
    float *wbuf;                /* [B,H,L,S] per-head weights when averaged or downloaded */
    float *wt;                  /* [B*L*S, H] their transpose (averaging) */
    float *wavg;                /* [B,L,S] averaged weights before their download */
    float *ones;                /* [H] 1/H */
    float *outd;                /* [B*L, E] out before its download */
    int64_t *screen;            /* [3] first NaN/Inf of xq, xk, xv (INT64_MAX: none) */
    /* host side of the mask (GPU) */
    void *hmask;
    size_t hmask_cap;
    /* backward planned block (backend memory) */
    float *bwd;
    size_t bwd_cap;
    int64_t B, L, S;
    int have_fwd;
    int strided;                /* the last forward read its heads in place (qh..oh not filled) */
    qf_sdpa_params sp;
};

static void view_params(qf_mha *m);

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

    m->params_total = off;
    if (posix_memalign((void **)&m->params, 64, off * sizeof(float)) ||
        posix_memalign((void **)&m->grads, 64, off * sizeof(float)) || !(m->inv_h = malloc((size_t)H * sizeof(float)))) {
        qf_mha_free(m);
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * off);
    }
    memset(m->grads, 0, off * sizeof(float));
    for (int64_t h = 0; h < H; h++) m->inv_h[h] = 1.0f / (float)H;

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

    m->be = qf_backend_cpu();
    m->run_params = m->params;
    m->wdtype = QF_F32;
    view_params(m);
    *out = m;
    return QF_OK;
}

static void release_device(qf_mha *m);

void qf_mha_free(qf_mha *m) {
    if (!m) return;
    release_device(m);
    free(m->hmask);
    free(m->params);
    free(m->grads);
    free(m->inv_h);
    free(m);
}

int qf_mha_num_params(const qf_mha *m) { return m ? m->np : 0; }

/* The newest parameter gradients into the host grads (one download after a GPU backward). */
static qf_status sync_grads(qf_mha *m) {
    if (!m->grads_on_device || !m->dgrads) return QF_OK;
    const size_t bytes = m->params_total * sizeof(float);
    QF_TRY(m->be->copy2d(m->grads, bytes, m->dgrads, bytes, bytes, 1));
    QF_TRY(m->be->synchronize());
    m->grads_on_device = 0;
    return QF_OK;
}

qf_status qf_mha_param(qf_mha *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_mha_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_mha_param: out is NULL");
    if (i < 0 || i >= m->np)
        return qf_fail(QF_ERR_ARG, "qf_mha_param: index %d is out of range (the module has %d parameters)", i, m->np);
    QF_TRY(sync_grads(m));
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
    /* the device copy is zeroed on the stream, ahead of the next backward (a failure there is
     * reported by the next call that waits); the host copy at once, so neither is stale */
    if (m->dgrads) (void)m->be->zero(m->dgrads, m->params_total * sizeof(float));
    m->grads_on_device = 0;
    memset(m->grads, 0, m->params_total * sizeof(float));
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


/* ---- placement ---- */

/* Views of the weights, biases and gradients into the running blocks (run_params, params_bf16,
 * dgrads on the GPU; params, grads on the CPU). */
static void view_params(qf_mha *m) {
    const int64_t E = m->E;
    float *P = m->run_params, *G = m->on_device ? m->dgrads : m->grads;
    const uint16_t *W16 = m->params_bf16;
    const mha_ptab *p;
#define VIEW(w, w16, gw, name)                  \
    p = find_param(m, name);                    \
    m->w = P + p->off;                          \
    m->w16 = W16 ? W16 + p->off : NULL;         \
    m->gw = G + p->off;
    if (m->packed) {
        VIEW(wq, wq16, gwq, "in_proj_weight");
        m->wk = m->wq + E * E; m->wv = m->wk + E * E;
        m->wk16 = W16 ? m->wq16 + E * E : NULL; m->wv16 = W16 ? m->wk16 + E * E : NULL;
        m->gwk = m->gwq + E * E; m->gwv = m->gwk + E * E;
    } else {
        VIEW(wq, wq16, gwq, "q_proj_weight");
        VIEW(wk, wk16, gwk, "k_proj_weight");
        VIEW(wv, wv16, gwv, "v_proj_weight");
    }
    VIEW(wo, wo16, gwo, "out_proj.weight");
#undef VIEW
    if (m->cfg.bias) {
        p = find_param(m, "in_proj_bias");
        m->bq = P + p->off; m->bk = m->bq + E; m->bv = m->bk + E;
        m->gbq = G + p->off; m->gbk = m->gbq + E; m->gbv = m->gbk + E;
        p = find_param(m, "out_proj.bias");
        m->bo = P + p->off; m->gbo = G + p->off;
    } else {
        m->bq = m->bk = m->bv = m->bo = NULL;
        m->gbq = m->gbk = m->gbv = m->gbo = NULL;
    }
}

/* Frees the planned blocks and everything the module holds on a device (the newest gradients
 * are kept in grads first); the module is then a CPU module again. The caller re-views. */
static void release_device(qf_mha *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        (void)sync_grads(m);
        be->free(m->fwd);
        be->free(m->bwd);
        be->free(m->run_params);
        be->free(m->params_bf16);
        be->free(m->dgrads);
    } else {
        free(m->fwd);
        free(m->bwd);
    }
    m->fwd = m->bwd = NULL;
    m->fwd_cap = m->bwd_cap = 0;
    m->dgrads = NULL;
    m->params_bf16 = NULL;
    m->grads_on_device = 0;
    m->on_device = 0;
    m->have_fwd = 0;
    m->wdtype = QF_F32;
    m->be = qf_backend_cpu();
    m->run_params = m->params;
}

qf_status qf_mha_to_device(qf_mha *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_mha_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    int cuda;
    QF_TRY(qf_model_check_device(fn, "MultiheadAttention", device, weights, &cuda)); /* failure: m unchanged */
    release_device(m);
    view_params(m);
    if (!cuda) return QF_OK;
    const qf_backend *be = qf_model_cuda_backend();
    float *dp;
    uint16_t *db;
    QF_TRY(qf_model_upload_params(be, m->params, m->params_total, 0, weights, &dp, &db, fn));
    /* the gradients keep accumulating on the device from where the host ones are */
    float *dg = NULL;
    const size_t bytes = m->params_total * sizeof(float);
    qf_status s = be->alloc((void **)&dg, bytes);
    if (s == QF_OK) s = be->copy2d(dg, bytes, m->grads, bytes, bytes, 1);
    if (s == QF_OK) s = be->synchronize();
    if (s != QF_OK) {
        be->free(dp);
        be->free(db);
        be->free(dg);
        view_params(m);
        return qf_fail_prefix(s, "%s (gradients)", fn);
    }
    m->be = be;
    m->on_device = 1;
    m->wdtype = weights;
    m->run_params = dp;
    m->params_bf16 = db;
    m->dgrads = dg;
    view_params(m);
    return QF_OK;
}

/* ---- planned buffers ---- */

/* Carves n floats (64-byte aligned) from a running offset. */
static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

/* ---- head split / merge: tokens [B*len, E] in the module's layout <-> heads [B,H,len,hd] ---- */

static qf_status to_heads(const qf_mha *m, float *heads, const float *tok, int64_t B, int64_t len) {
    if (m->cfg.batch_first) return m->be->split_heads(heads, tok, m->E, NULL, B, m->H, len, 0, len, m->hd);
    /* seq-first: row i of [len, B*E] holds the B*H heads of position i */
    return m->be->split_heads(heads, tok, B * m->E, NULL, 1, B * m->H, len, 0, len, m->hd);
}

static qf_status from_heads(const qf_mha *m, float *tok, const float *heads, int64_t B, int64_t len) {
    if (m->cfg.batch_first) return m->be->merge_heads(tok, m->E, heads, B, m->H, len, 0, len, m->hd, 0);
    return m->be->merge_heads(tok, B * m->E, heads, 1, B * m->H, len, 0, len, m->hd, 0);
}

/* ---- which side a caller's tensor is on ---- */

/* *dev = 1 when p is memory of m's device backend (used in place), 0 for host memory (copied
 * through a planned buffer on the GPU; used in place on the CPU). GPU memory given to a CPU
 * module, or a mask in GPU memory, is refused. */
static qf_status tensor_side(const qf_mha *m, const void *p, const char *name, const char *fn, int host_only,
                             int *dev) {
    *dev = 0;
    if (!p) return QF_OK;
    const void *ptrs[1] = {p};
    const char *names[1] = {name};
    const qf_backend *be;
    QF_TRY(qf_backend_for(fn, ptrs, names, 1, &be));
    if (be == qf_backend_cpu()) {
        *dev = !m->on_device; /* host memory is the CPU module's own */
        return QF_OK;
    }
    if (!m->on_device)
        return qf_fail(QF_ERR_ARG, "%s: %s is GPU memory but the module runs on the CPU (place it with "
                                   "qf_mha_to_device(m, \"cuda\", ..) or pass host memory)", fn, name);
    if (host_only)
        return qf_fail(QF_ERR_ARG, "%s: %s is GPU memory; masks are read on the host (pass host memory)", fn, name);
    *dev = 1;
    return QF_OK;
}

/* The verdict of the NaN/Inf screen (first[i] read on the host; INT64_MAX = clean): the first
 * bad element of the first tensor that has one. bufs are the screened copies (backend memory). */
static qf_status report_screen(const qf_mha *m, const char *fn, const int64_t *first, const float *const *bufs,
                               const char *const *names, const int64_t *cols, int n) {
    for (int i = 0; i < n; i++) {
        if (first[i] == INT64_MAX) continue;
        float v = NAN;
        (void)m->be->copy2d(&v, sizeof v, bufs[i] + first[i], sizeof v, sizeof v, 1);
        if (m->be->synchronize) (void)m->be->synchronize();
        return qf_fail(QF_ERR_NONFINITE, "%s: %s contains %s at flat index %lld (token row %lld, column %lld)", fn,
                       names[i], isnan(v) ? "NaN" : "Inf", (long long)first[i], (long long)(first[i] / cols[i]),
                       (long long)(first[i] % cols[i]));
    }
    return QF_OK;
}

static const int64_t screen_clean[4] = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};

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
    if (am->kind == QF_MASK_FLOAT) { /* -inf blocks; NaN or +inf would turn softmax into NaN */
        const float *x = am->data;
        const size_t n = (size_t)(am->ndim == 3 ? am->shape[0] : 1) * (size_t)a->L * (size_t)a->S;
        for (size_t i = 0; i < n; i++)
            if (isnan(x[i]) || x[i] == INFINITY)
                return qf_fail(QF_ERR_NONFINITE, "%s: attn_mask contains %s at flat index %zu (only finite values "
                                                 "and -inf are allowed)", fn, isnan(x[i]) ? "NaN" : "+Inf", i);
    }
    return QF_OK;
}

/* Builds the combined SDPA mask into dst (host); returns its kind (NONE when no buffer is needed). */
static qf_mask_kind build_mask(const qf_mha *m, const qf_mha_args *a, int64_t Hm, void *dst_mask) {
    const qf_mask *am = &a->attn_mask;
    const int use_buf = a->key_padding_mask || am->kind != QF_MASK_NONE;
    if (!use_buf) return QF_MASK_NONE;
    const int64_t B = a->B, L = a->L, S = a->S, H = m->H;
    const uint8_t *kpm = a->key_padding_mask;
    const int causal = a->is_causal;
    const int am3 = am->kind != QF_MASK_NONE && am->ndim == 3;
    if (am->kind == QF_MASK_FLOAT) {
        float *dst = dst_mask;
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
    uint8_t *dst = dst_mask;
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

/* Copies n bytes between two tensors on m's backend or host memory (stream-ordered on the GPU). */
static qf_status copy_bytes(const qf_mha *m, void *dst, const void *src, size_t n) {
    return m->be->copy2d(dst, n, src, n, n, 1);
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
    const qf_backend *be = m->be;
    int q_in_place, k_in_place, v_in_place, out_in_place, w_in_place, unused;
    QF_TRY(tensor_side(m, query, "query", fn, 0, &q_in_place));
    QF_TRY(tensor_side(m, key, "key", fn, 0, &k_in_place));
    QF_TRY(tensor_side(m, value, "value", fn, 0, &v_in_place));
    QF_TRY(tensor_side(m, out, "out", fn, 0, &out_in_place));
    QF_TRY(tensor_side(m, a->need_weights ? weights : NULL, "weights", fn, 0, &w_in_place));
    QF_TRY(tensor_side(m, a->key_padding_mask, "key_padding_mask", fn, 1, &unused));
    QF_TRY(tensor_side(m, a->attn_mask.kind != QF_MASK_NONE ? a->attn_mask.data : NULL, "attn_mask", fn, 1, &unused));
    (void)q_in_place, (void)k_in_place, (void)v_in_place; /* inputs are always copied: backward reads them */

    const int64_t B = a->B, L = a->L, S = a->S, E = m->E, H = m->H, hd = m->hd;
    const int bf = m->cfg.batch_first;
    const int has_mask = a->key_padding_mask || a->attn_mask.kind != QF_MASK_NONE;
    const int64_t Hm = a->attn_mask.kind != QF_MASK_NONE && a->attn_mask.ndim == 3 ? H : 1;
    const int need_w = a->need_weights != 0;
    const int avg = need_w && a->average_attn_weights;
    /* heads read in place from the projection rows (the GPU) unless the weights are wanted */
    const int strided = be->sdpa_strided && !need_w;
    const size_t nq = (size_t)(B * L * E), nk = (size_t)(B * S * E);
    const size_t nmask = has_mask ? (size_t)(B * Hm * L * S) : 0; /* floats >= uint8s */
    const size_t nw = need_w ? (size_t)(B * H * L * S) : 0, nls = (size_t)(B * L * S);
    const size_t mask_bytes = nmask * (a->attn_mask.kind == QF_MASK_FLOAT ? sizeof(float) : 1);

    /* plan: sizes first (base NULL), then carve from the grown block */
    float *base = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        m->xq = carve(base, &off, (size_t)(B * L) * (size_t)E);
        m->xk = carve(base, &off, (size_t)(B * S) * (size_t)m->kdim);
        m->xv = carve(base, &off, (size_t)(B * S) * (size_t)m->vdim);
        m->qp = carve(base, &off, nq);
        m->kp = carve(base, &off, nk);
        m->vp = carve(base, &off, nk);
        m->qh = carve(base, &off, nq);
        m->kh = carve(base, &off, nk);
        m->vh = carve(base, &off, nk);
        m->oh = carve(base, &off, nq);
        m->lse = carve(base, &off, (size_t)(B * H * L));
        m->merged = carve(base, &off, nq);
        m->mask = carve(base, &off, nmask);
        m->wbuf = carve(base, &off, (avg || !w_in_place) ? nw : 0);
        m->wt = carve(base, &off, avg ? nw : 0);
        m->wavg = carve(base, &off, avg && !w_in_place ? nls : 0);
        m->ones = carve(base, &off, avg ? (size_t)H : 0);
        m->outd = carve(base, &off, out_in_place ? 0 : nq);
        m->screen = (int64_t *)carve(base, &off, 8);
        if (pass == 0) {
            QF_TRY(qf_model_grow(be, &m->fwd, &m->fwd_cap, off, fn));
            base = m->fwd;
        }
    }

    /* the inputs into the planned buffers (uploads on the GPU): backward needs them and the
     * caller may reuse its own; then screened for NaN/Inf */
    QF_TRY(copy_bytes(m, m->xq, query, (size_t)(B * L * E) * sizeof(float)));
    QF_TRY(copy_bytes(m, m->xk, key, (size_t)(B * S * m->kdim) * sizeof(float)));
    QF_TRY(copy_bytes(m, m->xv, value, (size_t)(B * S * m->vdim) * sizeof(float)));
    QF_TRY(copy_bytes(m, m->screen, screen_clean, 3 * sizeof(int64_t)));
    QF_TRY(be->screen_nonfinite(m->xq, B * L * E, m->screen + 0));
    QF_TRY(be->screen_nonfinite(m->xk, B * S * m->kdim, m->screen + 1));
    QF_TRY(be->screen_nonfinite(m->xv, B * S * m->vdim, m->screen + 2));
    const float *const sbufs[3] = {m->xq, m->xk, m->xv};
    static const char *const snames[3] = {"query", "key", "value"};
    const int64_t scols[3] = {E, m->kdim, m->vdim};
    if (!m->on_device) QF_TRY(report_screen(m, fn, m->screen, sbufs, snames, scols, 3)); /* before the work */

    qf_sdpa_params sp = qf_sdpa_defaults(B, H, H, L, S, hd);
    sp.dropout_p = a->training ? m->cfg.dropout : 0.0f;
    sp.seed = a->seed;
    sp.offset = a->offset;
    sp.check_finite = 0; /* the inputs were screened above */
    if (has_mask) {
        void *hm = m->mask;
        if (m->on_device) {
            float *h = m->hmask;
            QF_TRY(qf_model_grow(qf_backend_cpu(), &h, &m->hmask_cap, nmask, fn));
            m->hmask = hm = h;
        }
        sp.mask.kind = build_mask(m, a, Hm, hm);
        /* from pageable memory: returns once staged, so hmask may be rebuilt by the next call */
        if (m->on_device) QF_TRY(copy_bytes(m, m->mask, hm, mask_bytes));
        sp.mask.data = m->mask;
        sp.mask.ndim = 4;
        sp.mask.shape[0] = B;
        sp.mask.shape[1] = Hm;
        sp.mask.shape[2] = L;
        sp.mask.shape[3] = S;
    } else {
        sp.is_causal = a->is_causal ? 1 : 0;
    }

    QF_TRY(qf_model_linear(be, m->qp, m->xq, m->wq, m->wq16, m->bq, NULL, B * L, E, E));
    QF_TRY(qf_model_linear(be, m->kp, m->xk, m->wk, m->wk16, m->bk, NULL, B * S, m->kdim, E));
    QF_TRY(qf_model_linear(be, m->vp, m->xv, m->wv, m->wv16, m->bv, NULL, B * S, m->vdim, E));

    qf_sdpa_problem pr;
    qf_status s = qf_sdpa_resolve(&sp, &pr);
    float *wdst = need_w ? (avg || !w_in_place ? m->wbuf : weights) : NULL;
    if (s == QF_OK && strided) {
        /* token (b, i) is row b*len + i (batch_first) or i*B + b of the projections / merged */
        const int64_t sq_b = bf ? L * E : E, sq_i = bf ? E : B * E;
        const int64_t sk_b = bf ? S * E : E, sk_i = bf ? E : B * E;
        pr.strided = 1;
        pr.q_sb = pr.o_sb = sq_b, pr.q_si = pr.o_si = sq_i, pr.q_sh = pr.o_sh = hd;
        pr.k_sb = pr.v_sb = sk_b, pr.k_si = pr.v_si = sk_i, pr.k_sh = pr.v_sh = hd;
        s = be->sdpa_forward(&pr, m->qp, m->kp, m->vp, m->merged, m->lse, NULL);
    } else if (s == QF_OK) {
        QF_TRY(to_heads(m, m->qh, m->qp, B, L));
        QF_TRY(to_heads(m, m->kh, m->kp, B, S));
        QF_TRY(to_heads(m, m->vh, m->vp, B, S));
        s = be->sdpa_forward(&pr, m->qh, m->kh, m->vh, m->oh, m->lse, wdst);
        if (s == QF_OK) s = from_heads(m, m->merged, m->oh, B, L);
    }
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);

    if (avg) { /* mean over heads: [B*L*S, H] transpose times a row of 1/H */
        QF_TRY(be->split_heads(m->wt, m->wbuf, L * S, NULL, B, L * S, H, 0, H, 1));
        QF_TRY(copy_bytes(m, m->ones, m->inv_h, (size_t)H * sizeof(float)));
        qf_gemm_nt_args g = {.x = m->ones, .ldx = H, .w = m->wt, .out = w_in_place ? weights : m->wavg,
                             .ldo = (int64_t)nls, .M = 1, .N = (int64_t)nls, .K = H};
        s = be->gemm_nt(&g);
        if (s != QF_OK) return qf_fail_prefix(s, "%s (averaging the weights over heads)", fn);
    }
    QF_TRY(qf_model_linear(be, out_in_place ? out : m->outd, m->merged, m->wo, m->wo16, m->bo, NULL, B * L, E, E));

    if (m->on_device) { /* downloads, then the one wait, then the screen's verdict */
        if (!out_in_place) QF_TRY(copy_bytes(m, out, m->outd, nq * sizeof(float)));
        if (need_w && !w_in_place)
            QF_TRY(copy_bytes(m, weights, avg ? m->wavg : m->wbuf, (avg ? nls : nw) * sizeof(float)));
        int64_t first[3];
        QF_TRY(copy_bytes(m, first, m->screen, sizeof first));
        QF_TRY(be->synchronize());
        QF_TRY(report_screen(m, fn, first, sbufs, snames, scols, 3));
    }

    m->sp = sp;
    m->strided = strided;
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
    if (m->wdtype != QF_F32)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: the module was placed with bf16 weights; backward needs float32 "
                                           "weights (qf_mha_to_device(m, \"cuda\", QF_F32))", fn);
    const qf_backend *be = m->be;
    int g_in_place, gq_in_place, gk_in_place, gv_in_place;
    QF_TRY(tensor_side(m, grad_out, "grad_out", fn, 0, &g_in_place));
    QF_TRY(tensor_side(m, grad_query, "grad_query", fn, 0, &gq_in_place));
    QF_TRY(tensor_side(m, grad_key, "grad_key", fn, 0, &gk_in_place));
    QF_TRY(tensor_side(m, grad_value, "grad_value", fn, 0, &gv_in_place));
    const int64_t B = m->B, L = m->L, S = m->S, E = m->E;
    const size_t nq = (size_t)(B * L * E), nk = (size_t)(B * S * E);
    const size_t nxk = (size_t)(B * S * m->kdim), nxv = (size_t)(B * S * m->vdim);

    float *base = NULL, *gout = NULL, *d_merged = NULL, *d_oh = NULL, *dqh = NULL, *dkh = NULL, *dvh = NULL,
          *dtmp = NULL, *gq = NULL, *gk = NULL, *gv = NULL;
    int64_t *screen = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        gout = carve(base, &off, g_in_place ? 0 : nq);
        d_merged = carve(base, &off, nq);
        d_oh = carve(base, &off, nq);
        dqh = carve(base, &off, nq);
        dkh = carve(base, &off, nk);
        dvh = carve(base, &off, nk);
        dtmp = carve(base, &off, nq > nk ? nq : nk);
        gq = carve(base, &off, grad_query && !gq_in_place ? nq : 0);
        gk = carve(base, &off, grad_key && !gk_in_place ? nxk : 0);
        gv = carve(base, &off, grad_value && !gv_in_place ? nxv : 0);
        screen = (int64_t *)carve(base, &off, 8);
        if (pass == 0) {
            QF_TRY(qf_model_grow(be, &m->bwd, &m->bwd_cap, off, fn));
            base = m->bwd;
        }
    }
    const float *g = grad_out;
    if (!g_in_place) {
        QF_TRY(copy_bytes(m, gout, grad_out, nq * sizeof(float)));
        g = gout;
    }
    QF_TRY(copy_bytes(m, screen, screen_clean, sizeof(int64_t)));
    QF_TRY(be->screen_nonfinite(g, (int64_t)nq, screen));
    const float *const sbufs[1] = {g};
    static const char *const snames[1] = {"grad_out"};
    const int64_t scols[1] = {E};
    if (!m->on_device) QF_TRY(report_screen(m, fn, screen, sbufs, snames, scols, 1));

    float *dq_dst = grad_query ? (gq_in_place ? grad_query : gq) : NULL;
    float *dk_dst = grad_key ? (gk_in_place ? grad_key : gk) : NULL;
    float *dv_dst = grad_value ? (gv_in_place ? grad_value : gv) : NULL;

    if (m->strided) { /* the forward read its heads in place: the backward kernel takes them split */
        QF_TRY(to_heads(m, m->qh, m->qp, B, L));
        QF_TRY(to_heads(m, m->kh, m->kp, B, S));
        QF_TRY(to_heads(m, m->vh, m->vp, B, S));
        QF_TRY(to_heads(m, m->oh, m->merged, B, L));
    }
    /* out = merged Wo^T + bo */
    QF_TRY(be->linear_backward(d_merged, m->gwo, m->gbo, g, m->merged, m->wo, B * L, E, E));
    QF_TRY(to_heads(m, d_oh, d_merged, B, L));
    qf_sdpa_problem pr;
    qf_status s = qf_sdpa_resolve(&m->sp, &pr);
    if (s == QF_OK) s = be->sdpa_backward(&pr, m->qh, m->kh, m->vh, m->oh, m->lse, d_oh, dqh, dkh, dvh);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    /* q/k/v = x W^T + b */
    QF_TRY(from_heads(m, dtmp, dqh, B, L));
    QF_TRY(be->linear_backward(dq_dst, m->gwq, m->gbq, dtmp, m->xq, m->wq, B * L, E, E));
    QF_TRY(from_heads(m, dtmp, dkh, B, S));
    QF_TRY(be->linear_backward(dk_dst, m->gwk, m->gbk, dtmp, m->xk, m->wk, B * S, m->kdim, E));
    QF_TRY(from_heads(m, dtmp, dvh, B, S));
    QF_TRY(be->linear_backward(dv_dst, m->gwv, m->gbv, dtmp, m->xv, m->wv, B * S, m->vdim, E));

    if (m->on_device) {
        m->grads_on_device = 1;
        if (grad_query && !gq_in_place) QF_TRY(copy_bytes(m, grad_query, gq, nq * sizeof(float)));
        if (grad_key && !gk_in_place) QF_TRY(copy_bytes(m, grad_key, gk, nxk * sizeof(float)));
        if (grad_value && !gv_in_place) QF_TRY(copy_bytes(m, grad_value, gv, nxv * sizeof(float)));
        int64_t first;
        QF_TRY(copy_bytes(m, &first, screen, sizeof first));
        QF_TRY(be->synchronize());
        QF_TRY(report_screen(m, fn, &first, sbufs, snames, scols, 1));
    }
    return QF_OK;
}
