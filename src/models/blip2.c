/* blip2.c - BLIP-2 / InstructBLIP image -> LLM-space tokens (transformers'
 * Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration up to, not including, the
 * language model): vision tower (vision.c) -> Q-Former (qformer.c) -> language_projection.
 *
 *   vis  = vision_model(pixel_values)                                  [B, N, vision hidden]
 *   q    = qformer(query_tokens expanded over B [; instruction ids], encoder = vis, no mask)
 *   out  = language_projection(q[:, :num_query_tokens])                [B, nq, text hidden]
 * (transformers passes an all-ones image attention mask, the same as none.)
 *
 * Loading: FOLDER/config.json (model_type "blip-2" or "instructblip"; sub-configs under
 * "vision_config." and "qformer_config.") and FOLDER/model.safetensors, or a sharded checkpoint
 * (FOLDER/model.safetensors.index.json, whose "weight_map" names the shard of each tensor): the
 * tensors this file needs (vision_model.*, qformer.*, query_tokens, language_projection.*) are
 * gathered from the shards into one in-memory safetensors image. The LLM's tensors are ignored.
 *
 * Invariants:
 *   - The query tokens and the projection live in one parameter buffer (with a gradient buffer
 *     of the same layout); the vision tower and the Q-Former own theirs. Parameters are reported
 *     by checkpoint name (prefix + the part's own name), in the order vision, Q-Former,
 *     query_tokens, language_projection.weight, language_projection.bias.
 *   - A frozen group gets no parameter gradient (its grad view is NULL); backward still carries
 *     the gradient through it when something before it needs it (grad_pixel_values, or an
 *     unfrozen vision tower behind a frozen Q-Former).
 *   - fwd/bwd are grow-only planned blocks: a fuse with the shapes of an earlier one allocates
 *     nothing here (the parts keep their own planned blocks).
 *   - have_fwd is set only after a fuse fully succeeded; backward refuses without one.
 *   - On a device (qf_blip2_to_device) the parts are placed by their own *_to_device and the own
 *     parameters are uploaded once (dparams, dbf16 for bf16 weights); the fuse then keeps every
 *     intermediate in device memory (see "fuse on a device"); the CPU fuse is untouched by it.
 *     Backward is one code for both backends (the parts' own backwards, the own ops over the
 *     backend table); on the GPU the own gradients accumulate in dgrads and reach grads only when
 *     shown (qf_blip2_param) or when the model moves back to the CPU; bf16 weights are refused. */
#include "models_internal.h"
#include "qformer_internal.h"
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { OWN_QUERY = 0, OWN_PROJ_W = 1, OWN_PROJ_B = 2, OWN_COUNT = 3 };

struct qf_blip2 {
    qf_vision *vision;
    qf_qformer *qformer;
    int instruct;                 /* model_type "instructblip" */
    int64_t nq, qh, D, Hv, N;     /* queries, Q-Former hidden, projection dim, vision hidden, tokens */
    float *params, *grads;        /* query_tokens [nq*qh], proj_w [D*qh], proj_b [D] (16-aligned) */
    size_t own_off[OWN_COUNT], own_n;
    int nv, nqf;                  /* parameter counts of the parts */
    char **names;                 /* checkpoint names of all parameters */
    unsigned frozen;              /* qf_param_group bits */

    float *fwd;
    size_t fwd_cap;
    float *vis, *qexp, *qout, *qrows;
    float *bwd;
    size_t bwd_cap;
    int64_t B, Lt;
    int have_fwd;

    /* placement: on a device, dparams (own parameters, own_off layout) and dbf16 (their bf16
     * copy, or NULL) live there; dfwd is the planned device block; dq_B is the B whose
     * broadcast query tokens dqexp holds (0: none). */
    const qf_backend *be;
    int on_device;
    float *dparams;
    uint16_t *dbf16;
    float *dfwd;
    size_t dfwd_cap;
    float *dvis, *dqexp, *dqout, *dqrows, *dout;
    int64_t dq_B;
    /* GPU backward: the own parameters' gradients accumulate in the device block dgrads (own_off
     * layout, made from grads at the first GPU backward); grads_on_device = 1 while it is newer
     * than grads, which qf_blip2_param and moving back to the CPU download first (sync_grads). */
    float *dgrads;
    int grads_on_device;
};

/* ---- sharded checkpoints ---- */


static int wanted_tensor(const char *name) {
    return !strncmp(name, "vision_model.", 13) || !strncmp(name, "qformer.", 8) || !strcmp(name, "query_tokens") ||
           !strncmp(name, "language_projection.", 20);
}

/* ---- loading ---- */

static void release_device(qf_blip2 *m);
static qf_status sync_grads(qf_blip2 *m);

void qf_blip2_free(qf_blip2 *m) {
    if (!m) return;
    release_device(m);
    qf_vision_free(m->vision);
    qf_qformer_free(m->qformer);
    if (m->names)
        for (int i = 0; i < m->nv + m->nqf + OWN_COUNT; i++) free(m->names[i]);
    free(m->names);
    free(m->params);
    free(m->grads);
    free(m->fwd);
    free(m->bwd);
    free(m);
}

static qf_status load_parts(qf_blip2 *m, const qf_config *cfg, const qf_safetensors *st, const char *cfg_path) {
    const char *fn = "qf_blip2_load";
    QF_TRY(qf_vision_load_parts(cfg, "vision_config.", st, "vision_model.", &m->vision));
    QF_TRY(qf_qformer_load_parts(cfg, "qformer_config.", st, "qformer.", &m->qformer));
    qf_vision_config vc;
    qf_qformer_config qc;
    QF_TRY(qf_vision_get_config(m->vision, &vc));
    QF_TRY(qf_qformer_get_config(m->qformer, &qc));
    m->Hv = vc.hidden_size;
    m->N = qf_vision_num_tokens(m->vision);
    m->qh = qc.hidden_size;
    if (qc.encoder_hidden_size != m->Hv)
        return qf_fail(QF_ERR_FORMAT, "%s: %s: qformer_config.encoder_hidden_size = %lld but vision_config.hidden_size "
                                      "= %lld: the Q-Former must read the vision tower's width",
                       fn, cfg_path, (long long)qc.encoder_hidden_size, (long long)m->Hv);
    QF_TRY(qf_config_int_or(cfg, "num_query_tokens", 32, &m->nq));
    if (m->nq < 1 || m->nq > (1 << 20))
        return qf_fail(QF_ERR_FORMAT, "%s: %s: num_query_tokens = %lld is out of range [1, 2^20]", fn, cfg_path,
                       (long long)m->nq);
    qf_tensor_view tv;
    QF_TRY(qf_st_find(st, "language_projection.weight", &tv));
    if (tv.ndim != 2 || tv.shape[1] != m->qh || tv.shape[0] < 1 || tv.shape[0] > (1 << 20))
        return qf_fail(QF_ERR_SHAPE, "%s: tensor \"language_projection.weight\" has %d dims (first %lld); expected "
                                     "[text hidden, qformer hidden = %lld]",
                       fn, tv.ndim, (long long)(tv.ndim ? tv.shape[0] : 0), (long long)m->qh);
    m->D = tv.shape[0];
    if (qf_config_has(cfg, "text_config.hidden_size")) {
        int64_t th;
        QF_TRY(qf_config_int(cfg, "text_config.hidden_size", &th));
        if (th != m->D)
            return qf_fail(QF_ERR_SHAPE, "%s: tensor \"language_projection.weight\" maps to %lld features but %s has "
                                         "text_config.hidden_size = %lld", fn, (long long)m->D, cfg_path, (long long)th);
    }
    size_t off = 0;
    m->own_off[OWN_QUERY] = off;
    off += qf_align_up((size_t)(m->nq * m->qh), 16);
    m->own_off[OWN_PROJ_W] = off;
    off += qf_align_up((size_t)(m->D * m->qh), 16);
    m->own_off[OWN_PROJ_B] = off;
    off += qf_align_up((size_t)m->D, 16);
    m->own_n = off;
    if (posix_memalign((void **)&m->params, 64, off * sizeof(float)) ||
        posix_memalign((void **)&m->grads, 64, off * sizeof(float)))
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * off);
    memset(m->grads, 0, off * sizeof(float));
    int64_t qshape[3] = {1, m->nq, m->qh}, wshape[2] = {m->D, m->qh};
    QF_TRY(qf_st_read_f32(st, "query_tokens", 3, qshape, m->params + m->own_off[OWN_QUERY]));
    QF_TRY(qf_st_read_f32(st, "language_projection.weight", 2, wshape, m->params + m->own_off[OWN_PROJ_W]));
    QF_TRY(qf_st_read_f32(st, "language_projection.bias", 1, &m->D, m->params + m->own_off[OWN_PROJ_B]));

    /* checkpoint names of every parameter */
    m->nv = qf_vision_num_params(m->vision);
    m->nqf = qf_qformer_num_params(m->qformer);
    const int total = m->nv + m->nqf + OWN_COUNT;
    m->names = calloc((size_t)total, sizeof *m->names);
    if (!m->names) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the parameter names", fn);
    for (int i = 0; i < total; i++) {
        const char *prefix = "", *own = NULL;
        qf_param p;
        if (i < m->nv) {
            QF_TRY(qf_vision_param(m->vision, i, &p));
            prefix = "vision_model.";
            own = p.name;
        } else if (i < m->nv + m->nqf) {
            QF_TRY(qf_qformer_param(m->qformer, i - m->nv, &p));
            prefix = "qformer.";
            own = p.name;
        } else {
            static const char *const own_names[OWN_COUNT] = {"query_tokens", "language_projection.weight",
                                                             "language_projection.bias"};
            own = own_names[i - m->nv - m->nqf];
        }
        size_t n = strlen(prefix) + strlen(own) + 1;
        m->names[i] = malloc(n);
        if (!m->names[i]) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the parameter names", fn);
        snprintf(m->names[i], n, "%s%s", prefix, own);
    }
    return QF_OK;
}

qf_status qf_blip2_load(const char *folder, qf_blip2 **out) {
    const char *fn = "qf_blip2_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "%s: folder is NULL", fn);
    char cfg_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", folder) >= (int)sizeof cfg_path - 40)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    qf_config *cfg = NULL;
    qf_status s = qf_config_load(cfg_path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    qf_blip2 *m = calloc(1, sizeof *m);
    if (!m) {
        qf_config_free(cfg);
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the model", fn);
    }
    const char *mt = NULL;
    s = qf_config_string(cfg, "model_type", &mt);
    if (s == QF_OK) {
        if (!strcmp(mt, "instructblip"))
            m->instruct = 1;
        else if (strcmp(mt, "blip-2"))
            s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not supported here (expected \"blip-2\" or "
                                            "\"instructblip\")", fn, cfg_path, mt);
    }
    qf_safetensors *st = NULL;
    if (s == QF_OK) s = qf_open_checkpoint(folder, wanted_tensor, &st);
    if (s == QF_OK) {
        s = load_parts(m, cfg, st, cfg_path);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s: %s", fn, folder);
    }
    qf_st_close(st);
    qf_config_free(cfg);
    if (s != QF_OK) {
        qf_blip2_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

qf_vision *qf_blip2_vision(qf_blip2 *m) { return m ? m->vision : NULL; }
qf_qformer *qf_blip2_qformer(qf_blip2 *m) { return m ? m->qformer : NULL; }
int64_t qf_blip2_num_query_tokens(const qf_blip2 *m) { return m ? m->nq : 0; }
int64_t qf_blip2_projection_dim(const qf_blip2 *m) { return m ? m->D : 0; }

/* ---- parameters ---- */

int qf_blip2_num_params(const qf_blip2 *m) { return m ? m->nv + m->nqf + OWN_COUNT : 0; }

qf_status qf_blip2_param(qf_blip2 *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_blip2_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_blip2_param: out is NULL");
    const int total = m->nv + m->nqf + OWN_COUNT;
    if (i < 0 || i >= total)
        return qf_fail(QF_ERR_ARG, "qf_blip2_param: index %d is out of range (the model has %d parameters)", i, total);
    if (i < m->nv) {
        QF_TRY(qf_vision_param(m->vision, i, out));
    } else if (i < m->nv + m->nqf) {
        QF_TRY(qf_qformer_param(m->qformer, i - m->nv, out));
    } else {
        QF_TRY(sync_grads(m));
        const int k = i - m->nv - m->nqf;
        const unsigned group = k == OWN_QUERY ? QF_GROUP_QUERY_TOKENS : QF_GROUP_PROJECTION;
        out->data = m->params + m->own_off[k];
        out->grad = (m->frozen & group) ? NULL : m->grads + m->own_off[k];
        out->shape[0] = out->shape[1] = out->shape[2] = out->shape[3] = 0;
        if (k == OWN_QUERY) {
            out->ndim = 3;
            out->shape[0] = 1;
            out->shape[1] = m->nq;
            out->shape[2] = m->qh;
        } else if (k == OWN_PROJ_W) {
            out->ndim = 2;
            out->shape[0] = m->D;
            out->shape[1] = m->qh;
        } else {
            out->ndim = 1;
            out->shape[0] = m->D;
        }
    }
    out->name = m->names[i];
    return QF_OK;
}

void qf_blip2_zero_grad(qf_blip2 *m) {
    if (!m) return;
    qf_vision_zero_grad(m->vision);
    qf_qformer_zero_grad(m->qformer);
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->own_n * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    memset(m->grads, 0, m->own_n * sizeof(float));
}

void qf_blip2_set_frozen(qf_blip2 *m, unsigned groups, int frozen) {
    if (!m) return;
    if (frozen)
        m->frozen |= groups;
    else
        m->frozen &= ~groups;
    if (groups & QF_GROUP_VISION) qf_vision_set_frozen(m->vision, frozen);
    if (groups & QF_GROUP_QFORMER) qf_qformer_set_frozen(m->qformer, frozen);
}

/* ---- forward ---- */

static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

/* ---- fuse on a device (qf_blip2_to_device) ----
 * vision forward (its own graph) into dvis -> the Q-Former reads dvis and the broadcast query
 * tokens dqexp (device pointers; it copies them into its planned block) and writes dqout ->
 * the query rows (gathered when instruction text follows them) -> language_projection GEMM ->
 * out. Each part waits for the GPU once at its end (its NaN verdict); the projection adds one
 * more wait for the output. */

static size_t plan_device(qf_blip2 *m, float *base, int64_t B, int64_t Lq) {
    size_t off = 0;
    m->dvis = carve(base, &off, (size_t)(B * m->N * m->Hv));
    m->dqexp = carve(base, &off, (size_t)(B * m->nq * m->qh));
    m->dqout = carve(base, &off, (size_t)(B * Lq * m->qh));
    m->dqrows = carve(base, &off, (size_t)(B * m->nq * m->qh));
    m->dout = carve(base, &off, (size_t)(B * m->nq * m->D));
    return off;
}

static qf_status fuse_device(qf_blip2 *m, int64_t B, const float *pixel_values, int64_t text_len,
                             const int32_t *text_ids, const uint8_t *text_mask, float *out) {
    const char *fn = "qf_blip2_fuse";
    const qf_backend *be = m->be;
    const int64_t nq = m->nq, qh = m->qh, Lq = nq + text_len;
    if (!qf_vision_on_device(m->vision) || !m->qformer->on_device)
        return qf_fail(QF_ERR_ARG, "%s: the %s was moved to the CPU alone after qf_blip2_to_device; place the whole "
                                   "model with qf_blip2_to_device", fn,
                       qf_vision_on_device(m->vision) ? "Q-Former" : "vision tower");
    const size_t need = plan_device(m, NULL, B, Lq);
    if (need > m->dfwd_cap) {
        be->free(m->dfwd);
        m->dfwd = NULL;
        m->dfwd_cap = 0;
        m->dq_B = 0;
        QF_TRY(be->alloc((void **)&m->dfwd, need * sizeof(float)));
        m->dfwd_cap = need;
    }
    plan_device(m, m->dfwd, B, Lq);
    if (m->dq_B != B) { /* carving moves dqexp with B: broadcast again */
        QF_TRY(be->add_periodic(m->dqexp, NULL, m->dparams + m->own_off[OWN_QUERY], B * nq, nq, qh));
        m->dq_B = B;
    }
    qf_status s = qf_vision_forward(m->vision, B, pixel_values, m->dvis);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (vision_model)", fn);
    qf_qformer_args a;
    memset(&a, 0, sizeof a);
    a.B = B;
    a.num_queries = nq;
    a.encoder_len = m->N;
    a.text_len = text_len;
    a.text_ids = text_len ? text_ids : NULL;
    a.text_attention_mask = text_len ? text_mask : NULL;
    s = qf_qformer_forward(m->qformer, &a, m->dqexp, m->dvis, m->dqout);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    const float *rows = m->dqout;
    if (text_len) {
        const size_t w = (size_t)(nq * qh) * sizeof(float);
        QF_TRY(be->copy2d(m->dqrows, w, m->dqout, (size_t)(Lq * qh) * sizeof(float), w, (size_t)B));
        rows = m->dqrows;
    }
    m->qrows = (float *)rows; /* the projection's input, for backward */
    s = qf_model_linear(be, m->dout, rows, m->dparams + m->own_off[OWN_PROJ_W],
                        m->dbf16 ? m->dbf16 + m->own_off[OWN_PROJ_W] : NULL, m->dparams + m->own_off[OWN_PROJ_B], NULL,
                        B * nq, qh, m->D);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (language_projection)", fn);
    const size_t n = (size_t)(B * nq * m->D) * sizeof(float);
    QF_TRY(be->copy2d(out, n, m->dout, n, n, 1));
    QF_TRY(be->synchronize());
    m->B = B;
    m->Lt = text_len;
    m->have_fwd = 1;
    return QF_OK;
}

/* Frees the own device memory (the gradients downloaded first, so grads keeps the newest); the
 * planned backward block too, on either side. */
static void release_device(qf_blip2 *m) {
    if (m->on_device) {
        m->be->free(m->dfwd);
        m->be->free(m->dparams);
        m->be->free(m->dbf16);
        m->be->free(m->bwd);
        (void)sync_grads(m);
        m->be->free(m->dgrads);
    } else {
        free(m->bwd);
    }
    m->bwd = m->dgrads = NULL;
    m->bwd_cap = 0;
    m->grads_on_device = 0;
    m->dfwd = m->dparams = NULL;
    m->dbf16 = NULL;
    m->dfwd_cap = 0;
    m->dq_B = 0;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = NULL;
}

qf_status qf_blip2_to_device(qf_blip2 *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_blip2_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    /* the vision tower first: it checks device and weights and starts the GPU */
    qf_status s = qf_vision_to_device(m->vision, device, weights);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (vision_model)", fn);
    s = qf_qformer_to_device(m->qformer, device, weights);
    if (s != QF_OK) {
        (void)qf_vision_to_device(m->vision, "cpu", QF_F32);
        return qf_fail_prefix(s, "%s (qformer)", fn);
    }
    release_device(m);
    if (strcmp(device, "cuda")) return QF_OK;
    const qf_backend *be = qf_model_cuda_backend();
    float *dp;
    uint16_t *db;
    s = qf_model_upload_params(be, m->params, m->own_n, 0, weights, &dp, &db, fn);
    if (s != QF_OK) {
        (void)qf_vision_to_device(m->vision, "cpu", QF_F32);
        (void)qf_qformer_to_device(m->qformer, "cpu", QF_F32);
        return s;
    }
    m->be = be;
    m->on_device = 1;
    m->dparams = dp;
    m->dbf16 = db;
    return QF_OK;
}

qf_status qf_blip2_fuse(qf_blip2 *m, int64_t B, const float *pixel_values, int64_t text_len,
                        const int32_t *text_ids, const uint8_t *text_mask, float *out) {
    const char *fn = "qf_blip2_fuse";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!pixel_values) return qf_fail(QF_ERR_ARG, "%s: pixel_values is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    if (B < 1 || B > (1 << 20)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 <= B <= 2^20", fn, (long long)B);
    if (text_len < 0 || text_len > (1 << 20))
        return qf_fail(QF_ERR_ARG, "%s: text_len = %lld, expected 0 <= text_len <= 2^20", fn, (long long)text_len);
    if (text_len > 0 && !m->instruct)
        return qf_fail(QF_ERR_ARG, "%s: text_len = %lld but this is a BLIP-2 model (model_type \"blip-2\"), whose "
                                   "Q-Former takes no instruction text; pass text_len = 0", fn, (long long)text_len);
    if (text_len > 0 && !text_ids)
        return qf_fail(QF_ERR_ARG, "%s: text_ids is NULL but text_len = %lld", fn, (long long)text_len);
    m->have_fwd = 0;
    if (m->on_device) return fuse_device(m, B, pixel_values, text_len, text_ids, text_mask, out);
    const int64_t nq = m->nq, qh = m->qh, Lq = nq + text_len;
    float *base = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        m->vis = carve(base, &off, (size_t)(B * m->N * m->Hv));
        m->qexp = carve(base, &off, (size_t)(B * nq * qh));
        m->qout = carve(base, &off, (size_t)(B * Lq * qh));
        m->qrows = carve(base, &off, (size_t)(B * nq * qh));
        if (pass == 0) {
            QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, off, fn));
            base = m->fwd;
        }
    }
    QF_TRY(qf_vision_forward(m->vision, B, pixel_values, m->vis));
    const float *qt = m->params + m->own_off[OWN_QUERY];
    for (int64_t b = 0; b < B; b++) memcpy(m->qexp + b * nq * qh, qt, (size_t)(nq * qh) * sizeof(float));
    qf_qformer_args a;
    memset(&a, 0, sizeof a);
    a.B = B;
    a.num_queries = nq;
    a.encoder_len = m->N;
    a.text_len = text_len;
    a.text_ids = text_len ? text_ids : NULL;
    a.text_attention_mask = text_len ? text_mask : NULL;
    QF_TRY(qf_qformer_forward(m->qformer, &a, m->qexp, m->vis, m->qout));
    for (int64_t b = 0; b < B; b++)
        memcpy(m->qrows + b * nq * qh, m->qout + b * Lq * qh, (size_t)(nq * qh) * sizeof(float));
    QF_TRY(qf_linear_forward(out, m->qrows, m->params + m->own_off[OWN_PROJ_W], m->params + m->own_off[OWN_PROJ_B],
                             B * nq, qh, m->D));
    m->B = B;
    m->Lt = text_len;
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward ----
 * One code path for both backends: every op goes through the backend that holds the model (the
 * CPU table, or m->be on the GPU), the own parameters' gradients into grads (dgrads on the GPU).
 * language_projection -> Q-Former (its own backward, which takes host or device pointers) ->
 * vision tower (its own backward). On the GPU grad_out is staged into bwd and the intermediate
 * gradients stay there; the call returns after the GPU has finished. */

static qf_status backward_body(qf_blip2 *m, const float *grad_out, float *grad_pixel_values) {
    const char *fn = "qf_blip2_backward";
    const qf_backend *be = m->on_device ? m->be : qf_backend_cpu();
    const int64_t B = m->B, nq = m->nq, qh = m->qh, Lq = nq + m->Lt, D = m->D;
    const int proj_g = !(m->frozen & QF_GROUP_PROJECTION);
    const int query_g = !(m->frozen & QF_GROUP_QUERY_TOKENS);
    const int qformer_g = !(m->frozen & QF_GROUP_QFORMER);
    const int vision_g = !(m->frozen & QF_GROUP_VISION) || grad_pixel_values;
    /* how far back the gradient must travel */
    const int need_qformer = qformer_g || query_g || vision_g;
    float *const gbase = m->on_device ? m->dgrads : m->grads;
    const float *const pbase = m->on_device ? m->dparams : m->params;

    float *base = NULL, *d_rows = NULL, *d_qout = NULL, *d_query = NULL, *d_vis = NULL, *gout = NULL;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        d_rows = carve(base, &off, (size_t)(B * nq * qh));
        d_qout = carve(base, &off, (size_t)(B * Lq * qh));
        d_query = carve(base, &off, (size_t)(B * nq * qh));
        d_vis = carve(base, &off, (size_t)(B * m->N * m->Hv));
        gout = carve(base, &off, m->on_device ? (size_t)(B * nq * D) : 0);
        if (pass == 0) {
            if (!m->on_device) {
                QF_TRY(qf_model_grow(NULL, &m->bwd, &m->bwd_cap, off, fn));
            } else if (off > m->bwd_cap) {
                m->be->free(m->bwd);
                m->bwd = NULL;
                m->bwd_cap = 0;
                qf_status s = m->be->alloc((void **)&m->bwd, off * sizeof(float));
                if (s != QF_OK) return qf_fail_prefix(s, "%s (%zu bytes of backward buffers)", fn, off * sizeof(float));
                m->bwd_cap = off;
            }
            base = m->bwd;
        }
    }
    const float *g = grad_out;
    if (m->on_device) {
        const size_t n = (size_t)(B * nq * D) * sizeof(float);
        QF_TRY(be->copy2d(gout, n, grad_out, n, n, 1));
        g = gout;
    }
    QF_TRY(be->linear_backward(need_qformer ? d_rows : NULL, proj_g ? gbase + m->own_off[OWN_PROJ_W] : NULL,
                               proj_g ? gbase + m->own_off[OWN_PROJ_B] : NULL, g, m->qrows,
                               pbase + m->own_off[OWN_PROJ_W], B * nq, qh, D));
    if (!need_qformer) return QF_OK;
    /* the Q-Former's output rows: the query rows get d_rows, the instruction rows nothing */
    if (m->Lt) QF_TRY(be->zero(d_qout, (size_t)(B * Lq * qh) * sizeof(float)));
    const size_t w = (size_t)(nq * qh) * sizeof(float);
    QF_TRY(be->copy2d(d_qout, (size_t)(Lq * qh) * sizeof(float), d_rows, w, w, (size_t)B));
    qf_status s = qf_qformer_backward(m->qformer, d_qout, query_g ? d_query : NULL, vision_g ? d_vis : NULL, NULL, NULL);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (qformer)", fn);
    /* the query tokens are one [nq, qh] table broadcast over the batch: their gradient sums over B */
    if (query_g) QF_TRY(be->embedding_backward(NULL, gbase + m->own_off[OWN_QUERY], d_query, NULL, -1, B * nq, nq, qh));
    if (vision_g) {
        s = qf_vision_backward(m->vision, d_vis, grad_pixel_values);
        if (s != QF_OK) return qf_fail_prefix(s, "%s (vision_model)", fn);
    }
    return QF_OK;
}

/* the device gradient block at the first GPU backward (placement.c) */
static qf_status device_grads(qf_blip2 *m, const char *fn) {
    return qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->grads, m->own_n, &m->grads_on_device, fn);
}

/* grads = dgrads when the device copy is newer (placement.c) */
static qf_status sync_grads(qf_blip2 *m) {
    return qf_model_sync_grads(m->be, m->grads, m->dgrads, m->own_n, &m->grads_on_device);
}

qf_status qf_blip2_backward(qf_blip2 *m, const float *grad_out, float *grad_pixel_values) {
    const char *fn = "qf_blip2_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->dbf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_blip2_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_blip2_fuse on this model to differentiate", fn);
    QF_TRY(device_grads(m, fn));
    qf_status s = backward_body(m, grad_out, grad_pixel_values);
    if (m->on_device) {
        m->grads_on_device = 1; /* dgrads may have changed, even after a failure; downloaded when shown */
        qf_status s2 = m->be->synchronize(); /* nothing may still run on bwd or the caller's buffers */
        if (s == QF_OK) s = s2;
    }
    return s;
}
