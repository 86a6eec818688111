/* prefusion.c - AffectGPT's multimodal pre-fusion (encode_multi_qformer): audio and face features
 * -> one token sequence -> a 2-layer Q-Former read by learned queries -> LLM-width tokens.
 * Forward and backward side by side, on qf_linear_* and the Q-Former core (qformer.c); the
 * backward runs through the backend table (m->be), so one code differentiates on the CPU and,
 * for a model placed with qf_prefusion_to_device, on the GPU.
 *
 * Semantics (AffectGPT my_affectgpt/models/affectgpt.py, multi_fusion_type "qformer"):
 *   A = multi_audio_embs(audio)  [B,ta,M]     F = multi_video_embs(face)  [B,tf,M]
 *   X = concat_time(F, A) (fusion_order ["face","audio"], the code's order; ["audio","face"] swaps)
 *   X[b,j] += multi_position_embedding[j]      j = 0 .. tf+ta-1 (S = tf+ta <= position_embedding_size)
 *   Q = multi_Qformer(query_embeds = multi_query_tokens (broadcast over B),
 *                     encoder_hidden_states = X, encoder_attention_mask = the frame masks)
 *   out = multi_llama_proj(Q)                  [B,nq,llm_hidden_size]
 * M = max_hidden_size = max(audio_dim, video_dim); the Q-Former's encoder_hidden_size is M.
 *
 * Padded frames (qfuse's extension: AffectGPT itself passes an all-ones mask): batch items may
 * carry fewer real frames than ta / tf; audio_mask [B,ta] / face_mask [B,tf] say which (nonzero =
 * real). The layout is NOT compacted: position ids run over the padded layout 0..tf+ta-1, so a
 * real audio frame's position depends on tf, not on the item's own face count. A padded frame is
 * only masked out of the cross-attention keys; its projection is still computed (so its values
 * must be finite) and its input gradient comes out 0. A missing mask means all frames are real.
 * An item with no real frame at all gets the Q-Former core's rule (uniform weights over S keys).
 *
 * Checkpoint (config.json model_type "affectgpt_prefusion", model.safetensors): multi_audio_embs.*,
 * multi_video_embs.*, multi_position_embedding.weight [264,M], multi_query_tokens [1,nq,hidden],
 * multi_llama_proj.*, and the Q-Former under "multi_Qformer." (transformers or LAVIS names; the
 * core probes). qformer_config usually lacks encoder_hidden_size (LAVIS calls it encoder_width and
 * sets it to M at build time): the loader then hands the core a copy of qformer_config with
 * encoder_hidden_size = max_hidden_size added; a present value must equal max_hidden_size.
 *
 * Invariants:
 *   - Own parameters in one float buffer, gradients in another, laid out by ptab (llm.c); the
 *     Q-Former keeps its own. Parameter gradients accumulate until qf_prefusion_zero_grad.
 *   - fwd/bwd are grow-only planned blocks (a forward/backward with earlier shapes allocates
 *     nothing). fwd keeps copies of the inputs, so the caller may reuse its buffers.
 *   - have_fwd is set only after a forward fully succeeded; backward refuses without one.
 *   - On the GPU the parameter gradients accumulate in the device block dgrads and reach grads
 *     only when shown (qf_prefusion_param) or when the model moves back to the CPU; bf16
 *     weights are refused by backward (float32 products only).
 *   - Load fully succeeds or frees everything; every failure names the file and key/tensor. */
#include "models_internal.h"
#include "qformer_internal.h"
#include <math.h>
#include <stdint.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { PF_NP = 9 };

typedef struct {
    const char *name;
    int ndim;
    int64_t shape[3];
    size_t off, n;
} pf_ptab;

struct qf_prefusion {
    qf_prefusion_config cfg;
    int64_t H;                      /* Q-Former hidden size */
    qf_qformer *qf;
    int np;
    pf_ptab ptab[PF_NP];
    float *params, *grads;
    const float *wa, *ba, *wv, *bv, *pos, *qtok, *wl, *bl;
    int nq_params;                  /* Q-Former parameters, reported as "multi_Qformer." + name */
    char **q_names;

    float *fwd;
    size_t fwd_cap;
    float *audio_in, *face_in;      /* input copies [B*ta, audio_dim], [B*tf, video_dim] */
    float *proj;                    /* [B*max(ta,tf), M] projection scratch */
    float *enc;                     /* [B, S, M] */
    uint8_t *mask;                  /* [B, S] 1 = real frame (when has_mask) */
    float *queries;                 /* [B*nq, H] */
    float *qout;                    /* [B*nq, H] Q-Former output, input of multi_llama_proj */
    float *bwd;                     /* on be (device memory on the GPU)                        */
    size_t bwd_cap;
    float *g_qout, *g_query, *g_enc, *g_seg;
    float *g_out, *g_in;            /* GPU only: grad_out and an input gradient staged in bwd  */
    int64_t B, ta, tf;
    int has_mask, have_fwd;

    /* placement (qf_prefusion_to_device): be holds run_params (params itself on the CPU, a
     * device copy on the GPU) and, on the GPU, params_bf16 (bf16 weights), the planned device
     * block dfwd and the captured graph; hmask is the host mask handed to the Q-Former there. */
    const qf_backend *be;
    int on_device;
    size_t params_total;
    float *run_params;
    uint16_t *params_bf16;
    float *dfwd;
    size_t dfwd_cap;
    float *out_buf;                 /* [B*nq, llm_hidden_size] on the device                   */
    int64_t *dscreen;               /* [2] first non-finite index of audio_in, face_in        */
    uint8_t *hmask;
    size_t hmask_cap;
    qf_model_graph graph;
    /* A GPU model's parameter gradients (the Q-Former's pattern, qformer_internal.h): a device
     * block parallel to run_params, allocated at the first GPU backward from grads and
     * accumulated there; grads_on_device = 1 while it is newer than grads, which
     * qf_prefusion_param and moving the model back to the CPU download first (sync_grads). */
    float *dgrads;
    int grads_on_device;
};

static void add_param(qf_prefusion *m, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2,
                      size_t *off) {
    pf_ptab *p = &m->ptab[m->np++];
    p->name = name;
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->shape[2] = d2;
    p->n = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    p->off = *off;
    *off += qf_align_up(p->n, 16);
}

/* ---- config ---- */

static qf_status cfg_int(const qf_config *cfg, const char *path, const char *key, int64_t lo, int64_t hi,
                         int64_t *out) {
    qf_status s = qf_config_int(cfg, key, out);
    if (s != QF_OK) return qf_fail_prefix(s, "qf_prefusion_load");
    if (*out < lo || *out > hi)
        return qf_fail(QF_ERR_FORMAT, "qf_prefusion_load: %s: config key \"%s\" = %lld is out of range [%lld, %lld]",
                       path, key, (long long)*out, (long long)lo, (long long)hi);
    return QF_OK;
}

static qf_status read_fusion_order(const char *path, const cJSON *root, int *face_first) {
    *face_first = 1;
    const cJSON *fo = cJSON_GetObjectItemCaseSensitive(root, "fusion_order");
    if (!fo || cJSON_IsNull(fo)) return QF_OK;
    const char *a = NULL, *b = NULL;
    if (cJSON_IsArray(fo) && cJSON_GetArraySize(fo) == 2) {
        const cJSON *x = cJSON_GetArrayItem(fo, 0), *y = cJSON_GetArrayItem(fo, 1);
        if (cJSON_IsString(x) && cJSON_IsString(y)) {
            a = x->valuestring;
            b = y->valuestring;
        }
    }
    if (a && b && !strcmp(a, "face") && !strcmp(b, "audio")) return QF_OK;
    if (a && b && !strcmp(a, "audio") && !strcmp(b, "face")) {
        *face_first = 0;
        return QF_OK;
    }
    return qf_fail(QF_ERR_FORMAT, "qf_prefusion_load: %s: config key \"fusion_order\" must be [\"face\",\"audio\"] "
                                  "or [\"audio\",\"face\"]", path);
}

/* The Q-Former's config: qformer_config, with encoder_hidden_size = M added when absent. */
static qf_status qformer_config(const char *path, const cJSON *root, int64_t M, qf_config **out) {
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "qformer_config");
    if (!cJSON_IsObject(qc))
        return qf_fail(qc ? QF_ERR_FORMAT : QF_ERR_NOT_FOUND, "qf_prefusion_load: %s: config key \"qformer_config\" "
                       "%s", path, qc ? "is not an object" : "is absent");
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(qc, "encoder_hidden_size");
    if (e && !cJSON_IsNull(e)) {
        if (!cJSON_IsNumber(e) || e->valuedouble != (double)M)
            return qf_fail(QF_ERR_FORMAT, "qf_prefusion_load: %s: config key \"qformer_config.encoder_hidden_size\" "
                           "must equal max_hidden_size = %lld (the Q-Former reads the fused sequence)", path,
                           (long long)M);
    }
    cJSON *copy = cJSON_Duplicate(qc, 1);
    if (!copy) return qf_fail(QF_ERR_NOMEM, "qf_prefusion_load: cannot copy qformer_config");
    cJSON_DeleteItemFromObjectCaseSensitive(copy, "encoder_hidden_size");
    if (!cJSON_AddNumberToObject(copy, "encoder_hidden_size", (double)M)) {
        cJSON_Delete(copy);
        return qf_fail(QF_ERR_NOMEM, "qf_prefusion_load: cannot extend qformer_config");
    }
    char *txt = cJSON_PrintUnformatted(copy);
    cJSON_Delete(copy);
    if (!txt) return qf_fail(QF_ERR_NOMEM, "qf_prefusion_load: cannot print qformer_config");
    char label[4200];
    snprintf(label, sizeof label, "%s [qformer_config, encoder_hidden_size = max_hidden_size]", path);
    qf_status s = qf_config_parse(txt, strlen(txt), label, out);
    free(txt);
    return s;
}

static qf_status read_text(const char *path, char **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return qf_fail(QF_ERR_IO, "qf_prefusion_load: cannot open %s", path);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (len < cap) break;
        if (cap >= ((size_t)64 << 20)) {
            free(buf);
            fclose(f);
            return qf_fail(QF_ERR_FORMAT, "qf_prefusion_load: %s is larger than 64 MiB", path);
        }
        cap *= 2;
        char *nb = realloc(buf, cap + 1);
        if (!nb) free(buf);
        buf = nb;
    }
    fclose(f);
    if (!buf) return qf_fail(QF_ERR_NOMEM, "qf_prefusion_load: cannot read %s", path);
    buf[len] = 0;
    *out = buf;
    return QF_OK;
}

/* ---- loading ---- */

/* Points the parameter views into run_params (host or device). */
static void bind_params(qf_prefusion *m) {
    const pf_ptab *t = m->ptab;
    const float *p = m->run_params;
    m->wa = p + t[0].off;
    m->ba = p + t[1].off;
    m->wv = p + t[2].off;
    m->bv = p + t[3].off;
    m->pos = p + t[4].off;
    m->qtok = p + t[5].off;
    m->wl = p + t[6].off;
    m->bl = p + t[7].off;
}

/* The gradient of parameter view p: in grads on the CPU, in dgrads on the GPU. */
static float *pf_grad(const qf_prefusion *m, const float *p) {
    return (m->on_device ? m->dgrads : m->grads) + (p - m->run_params);
}

static qf_status load_into(qf_prefusion *m, const char *folder) {
    const char *fn = "qf_prefusion_load";
    char path[4096], stpath[4096];
    if (snprintf(path, sizeof path, "%s/config.json", folder) >= (int)sizeof path ||
        snprintf(stpath, sizeof stpath, "%s/model.safetensors", folder) >= (int)sizeof stpath)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    qf_config *cfg = NULL, *qcfg = NULL;
    qf_safetensors *st = NULL;
    cJSON *root = NULL;
    char *text = NULL;
    qf_status s = qf_config_load(path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    const char *mt = NULL;
    s = qf_config_string(cfg, "model_type", &mt);
    if (s != QF_OK) {
        s = qf_fail_prefix(s, "%s", fn);
    } else if (strcmp(mt, "affectgpt_prefusion")) {
        s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not \"affectgpt_prefusion\"", fn, path, mt);
    }
    qf_prefusion_config *c = &m->cfg;
    const int64_t big = 1 << 20;
    if (s == QF_OK) s = cfg_int(cfg, path, "audio_dim", 1, big, &c->audio_dim);
    if (s == QF_OK) s = cfg_int(cfg, path, "video_dim", 1, big, &c->video_dim);
    if (s == QF_OK) s = cfg_int(cfg, path, "max_hidden_size", 1, big, &c->max_hidden_size);
    if (s == QF_OK) s = cfg_int(cfg, path, "num_multi_query_token", 1, big, &c->num_multi_query_token);
    if (s == QF_OK) s = cfg_int(cfg, path, "position_embedding_size", 1, big, &c->position_embedding_size);
    if (s == QF_OK) s = cfg_int(cfg, path, "llm_hidden_size", 1, big, &c->llm_hidden_size);
    if (s == QF_OK && c->max_hidden_size != (c->audio_dim > c->video_dim ? c->audio_dim : c->video_dim))
        s = qf_fail(QF_ERR_FORMAT, "%s: %s: max_hidden_size = %lld must be max(audio_dim = %lld, video_dim = %lld)",
                    fn, path, (long long)c->max_hidden_size, (long long)c->audio_dim, (long long)c->video_dim);
    if (s == QF_OK) s = read_text(path, &text);
    if (s == QF_OK) {
        root = cJSON_Parse(text);
        if (!root) s = qf_fail(QF_ERR_FORMAT, "%s: %s is not valid JSON", fn, path);
    }
    if (s == QF_OK) s = read_fusion_order(path, root, &c->face_first);
    if (s == QF_OK) s = qformer_config(path, root, c->max_hidden_size, &qcfg);
    if (s == QF_OK) {
        s = qf_st_open(stpath, &st);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", fn);
    }
    if (s == QF_OK) {
        s = qf_qformer_load_parts(qcfg, "", st, "multi_Qformer.", &m->qf);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s: %s", fn, folder);
    }
    qf_qformer_config qc;
    if (s == QF_OK) s = qf_qformer_get_config(m->qf, &qc);
    if (s == QF_OK) {
        const int64_t M = c->max_hidden_size, H = qc.hidden_size, nq = c->num_multi_query_token;
        m->H = H;
        size_t off = 0;
        add_param(m, "multi_audio_embs.weight", 2, M, c->audio_dim, 0, &off);
        add_param(m, "multi_audio_embs.bias", 1, M, 0, 0, &off);
        add_param(m, "multi_video_embs.weight", 2, M, c->video_dim, 0, &off);
        add_param(m, "multi_video_embs.bias", 1, M, 0, 0, &off);
        add_param(m, "multi_position_embedding.weight", 2, c->position_embedding_size, M, 0, &off);
        add_param(m, "multi_query_tokens", 3, 1, nq, H, &off);
        add_param(m, "multi_llama_proj.weight", 2, c->llm_hidden_size, H, 0, &off);
        add_param(m, "multi_llama_proj.bias", 1, c->llm_hidden_size, 0, 0, &off);
        m->params_total = off;
        if (posix_memalign((void **)&m->params, 64, off * sizeof(float)) ||
            posix_memalign((void **)&m->grads, 64, off * sizeof(float)))
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * off);
        else
            memset(m->grads, 0, off * sizeof(float));
    }
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const pf_ptab *p = &m->ptab[i];
        s = qf_st_read_f32(st, p->name, p->ndim, p->shape, m->params + p->off);
        if (s != QF_OK)
            s = qf_fail_prefix(s, "%s (AffectGPT pre-fusion, audio_dim %lld, video_dim %lld, max_hidden_size %lld)", fn,
                               (long long)c->audio_dim, (long long)c->video_dim, (long long)c->max_hidden_size);
    }
    if (s == QF_OK) {
        m->nq_params = qf_qformer_num_params(m->qf);
        s = qf_model_prefixed_qformer_names(m->qf, "multi_Qformer.", fn, &m->q_names);
    }
    if (s == QF_OK) {
        m->be = qf_backend_cpu();
        m->run_params = m->params;
        bind_params(m);
    }
    free(text);
    cJSON_Delete(root);
    qf_st_close(st);
    qf_config_free(qcfg);
    qf_config_free(cfg);
    return s;
}

qf_status qf_prefusion_load(const char *folder, qf_prefusion **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_prefusion_load: out is NULL");
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "qf_prefusion_load: folder is NULL");
    qf_prefusion *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "qf_prefusion_load: cannot allocate the model");
    qf_status s = load_into(m, folder);
    if (s != QF_OK) {
        qf_prefusion_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

static void release_device(qf_prefusion *m);

void qf_prefusion_free(qf_prefusion *m) {
    if (!m) return;
    release_device(m);
    qf_qformer_free(m->qf);
    free(m->q_names);               /* one block (models_internal.h) */
    free(m->params);
    free(m->grads);
    free(m->fwd);
    free(m);
}

qf_status qf_prefusion_get_config(const qf_prefusion *m, qf_prefusion_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_prefusion_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_prefusion_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

qf_qformer *qf_prefusion_qformer(qf_prefusion *m) { return m ? m->qf : NULL; }

/* ---- planned buffers ---- */

static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

static size_t plan_forward(qf_prefusion *m, float *base, int64_t B, int64_t ta, int64_t tf) {
    const size_t M = (size_t)m->cfg.max_hidden_size, S = (size_t)(ta + tf);
    const size_t T = (size_t)(B * m->cfg.num_multi_query_token), H = (size_t)m->H;
    const size_t tmax = (size_t)(ta > tf ? ta : tf);
    size_t off = 0;
    m->audio_in = carve(base, &off, (size_t)(B * ta * m->cfg.audio_dim));
    m->face_in = carve(base, &off, (size_t)(B * tf * m->cfg.video_dim));
    m->proj = carve(base, &off, (size_t)B * tmax * M);
    m->enc = carve(base, &off, (size_t)B * S * M);
    m->mask = (uint8_t *)carve(base, &off, ((size_t)B * S + 3) / 4);
    m->queries = carve(base, &off, T * H);
    m->qout = carve(base, &off, T * H);
    return off;
}

static size_t plan_backward(qf_prefusion *m, float *base) {
    const size_t M = (size_t)m->cfg.max_hidden_size, S = (size_t)(m->ta + m->tf), B = (size_t)m->B;
    const size_t T = B * (size_t)m->cfg.num_multi_query_token, H = (size_t)m->H;
    const size_t tmax = (size_t)(m->ta > m->tf ? m->ta : m->tf);
    const size_t D = (size_t)(m->cfg.audio_dim > m->cfg.video_dim ? m->cfg.audio_dim : m->cfg.video_dim);
    size_t off = 0;
    m->g_qout = carve(base, &off, T * H);
    m->g_query = carve(base, &off, T * H);
    m->g_enc = carve(base, &off, B * S * M);
    m->g_seg = carve(base, &off, B * tmax * M);
    m->g_out = m->g_in = NULL;
    if (m->on_device) {
        m->g_out = carve(base, &off, T * (size_t)m->cfg.llm_hidden_size);
        m->g_in = carve(base, &off, B * tmax * D);
    }
    return off;
}

/* Offsets of the two modalities inside the fused sequence. */
static void segment_offsets(const qf_prefusion *m, int64_t ta, int64_t tf, int64_t *off_a, int64_t *off_f) {
    *off_f = m->cfg.face_first ? 0 : ta;
    *off_a = m->cfg.face_first ? tf : 0;
}

/* ---- forward on a device (qf_prefusion_to_device) ----
 * The same computation as the CPU forward below, written as backend calls: the two projections
 * (GEMMs) land in the Q-Former's encoder buffer at their segment offsets, the position rows and
 * the broadcast queries are added by add_periodic, the Q-Former's layers and the LLM projection
 * follow; everything after the input copies is one graph per key. */

/* out = in · wᵀ + b on m's backend (bf16 weights when placed so) */
static qf_status pf_linear(const qf_prefusion *m, float *out, const float *in, const float *w, const float *b,
                           int64_t rows, int64_t Cin, int64_t Cout) {
    const uint16_t *w16 = m->params_bf16 ? m->params_bf16 + (w - m->run_params) : NULL;
    return qf_model_linear(m->be, out, in, w, w16, b, NULL, rows, Cin, Cout);
}

static size_t plan_device(qf_prefusion *m, float *base, int64_t B, int64_t ta, int64_t tf) {
    const size_t M = (size_t)m->cfg.max_hidden_size, tmax = (size_t)(ta > tf ? ta : tf);
    size_t off = 0;
    m->audio_in = carve(base, &off, (size_t)(B * ta * m->cfg.audio_dim));
    m->face_in = carve(base, &off, (size_t)(B * tf * m->cfg.video_dim));
    m->proj = carve(base, &off, (size_t)B * tmax * M);
    m->out_buf = carve(base, &off, (size_t)(B * m->cfg.num_multi_query_token * m->cfg.llm_hidden_size));
    m->dscreen = (int64_t *)carve(base, &off, 4);
    return off;
}

static qf_status device_body(void *ctx) {
    qf_prefusion *m = ctx;
    const qf_backend *be = m->be;
    qf_qformer *qf = m->qf;
    const int64_t B = m->B, ta = m->ta, tf = m->tf, S = ta + tf, M = m->cfg.max_hidden_size;
    const int64_t nq = m->cfg.num_multi_query_token, H = m->H;
    int64_t off_a, off_f;
    segment_offsets(m, ta, tf, &off_a, &off_f);
    for (int mod = 0; mod < 2; mod++) {
        const int64_t t = mod ? ta : tf, D = mod ? m->cfg.audio_dim : m->cfg.video_dim, seg = mod ? off_a : off_f;
        if (!t) continue;
        QF_TRY(pf_linear(m, m->proj, mod ? m->audio_in : m->face_in, mod ? m->wa : m->wv, mod ? m->ba : m->bv,
                         B * t, D, M));
        const size_t w = (size_t)(t * M) * sizeof(float);
        QF_TRY(be->copy2d(qf->enc + seg * M, (size_t)(S * M) * sizeof(float), m->proj, w, w, (size_t)B));
    }
    QF_TRY(be->add_periodic(qf->enc, qf->enc, m->pos, B * S, S, M));
    QF_TRY(be->add_periodic(qf->qin, NULL, m->qtok, B * nq, nq, H));
    QF_TRY(qf_qformer_run(qf));
    return pf_linear(m, m->out_buf, qf_qformer_result(qf), m->wl, m->bl, B * nq, H, m->cfg.llm_hidden_size);
}

static qf_status forward_device(qf_prefusion *m, const qf_prefusion_args *a, const float *audio, const float *face,
                                float *out) {
    const char *fn = "qf_prefusion_forward";
    const qf_backend *be = m->be;
    const int64_t B = a->B, ta = a->audio_len, tf = a->face_len, S = ta + tf;
    const int64_t nq = m->cfg.num_multi_query_token, Da = m->cfg.audio_dim, Dv = m->cfg.video_dim;
    const size_t need = plan_device(m, NULL, B, ta, tf);
    if (need > m->dfwd_cap) {
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        m->dfwd = NULL;
        m->dfwd_cap = 0;
        QF_TRY(be->alloc((void **)&m->dfwd, need * sizeof(float)));
        m->dfwd_cap = need;
    }
    plan_device(m, m->dfwd, B, ta, tf);
    if ((size_t)(B * S) > m->hmask_cap) {
        uint8_t *p = malloc((size_t)(B * S));
        if (!p) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the frame mask", fn);
        free(m->hmask);
        m->hmask = p;
        m->hmask_cap = (size_t)(B * S);
    }
    m->B = B;
    m->ta = ta;
    m->tf = tf;
    int64_t off_a, off_f;
    segment_offsets(m, ta, tf, &off_a, &off_f);
    m->has_mask = a->audio_mask || a->face_mask;
    if (m->has_mask)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < tf; i++)
                m->hmask[b * S + off_f + i] = a->face_mask ? (a->face_mask[b * tf + i] != 0) : 1;
            for (int64_t i = 0; i < ta; i++)
                m->hmask[b * S + off_a + i] = a->audio_mask ? (a->audio_mask[b * ta + i] != 0) : 1;
        }
    qf_qformer_args qa;
    memset(&qa, 0, sizeof qa);
    qa.B = B;
    qa.num_queries = nq;
    qa.encoder_len = S;
    qa.encoder_attention_mask = m->has_mask ? m->hmask : NULL;
    qf_status s = qf_qformer_stage(m->qf, &qa, fn);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (multi_Qformer)", fn);

    int64_t screen[2] = {INT64_MAX, INT64_MAX};
    QF_TRY(be->copy2d(m->dscreen, sizeof screen, screen, sizeof screen, sizeof screen, 1));
    if (ta) {
        const size_t n = (size_t)(B * ta * Da) * sizeof(float);
        QF_TRY(be->copy2d(m->audio_in, n, audio, n, n, 1));
        QF_TRY(be->screen_nonfinite(m->audio_in, B * ta * Da, m->dscreen));
    }
    if (tf) {
        const size_t n = (size_t)(B * tf * Dv) * sizeof(float);
        QF_TRY(be->copy2d(m->face_in, n, face, n, n, 1));
        QF_TRY(be->screen_nonfinite(m->face_in, B * tf * Dv, m->dscreen + 1));
    }
    /* the key: every shape and flag that changes the calls, and the planned blocks' addresses
     * (the Q-Former's may move when its plan grows) */
    int64_t qkey[6];
    qf_qformer_key(m->qf, qkey);
    const int64_t key[8] = {B, ta, tf, m->has_mask, qkey[5], (int64_t)(intptr_t)m->qf->fwd,
                            (int64_t)(intptr_t)m->qf->mir, (int64_t)(intptr_t)m->dfwd};
    QF_TRY(qf_model_graph_run(be, &m->graph, key, 8, device_body, m));
    m->qout = (float *)qf_qformer_result(m->qf); /* the LLM projection's input, for backward */
    const size_t n = (size_t)(B * nq * m->cfg.llm_hidden_size) * sizeof(float);
    QF_TRY(be->copy2d(out, n, m->out_buf, n, n, 1));
    QF_TRY(be->synchronize());
    QF_TRY(be->copy2d(screen, sizeof screen, m->dscreen, sizeof screen, sizeof screen, 1));
    for (int i = 0; i < 2; i++) {
        if (screen[i] == INT64_MAX) continue;
        float v = NAN;
        const float *src = (i ? m->face_in : m->audio_in) + screen[i];
        (void)be->copy2d(&v, sizeof v, src, sizeof v, sizeof v, 1);
        return qf_fail(QF_ERR_NONFINITE, "%s: %s[%lld] = %g is not finite", fn, i ? "face" : "audio",
                       (long long)screen[i], (double)v);
    }
    /* the staged Q-Former forward (qf_qformer_stage leaves its have_fwd 0) is complete and
     * screened: its backward may differentiate it */
    m->qf->have_fwd = 1;
    m->have_fwd = 1;
    return QF_OK;
}

/* the device gradient block at the first GPU backward (placement.c) */
static qf_status device_grads(qf_prefusion *m, const char *fn) {
    return qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->grads, m->params_total, &m->grads_on_device, fn);
}

/* grads = dgrads when the device copy is newer (placement.c) */
static qf_status sync_grads(qf_prefusion *m) {
    return qf_model_sync_grads(m->be, m->grads, m->dgrads, m->params_total, &m->grads_on_device);
}

/* Frees what the model holds on a device (the gradients downloaded first) and the planned
 * backward block on either side; the model is a CPU model again. */
static void release_device(qf_prefusion *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
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
    free(m->hmask);
    m->hmask = NULL;
    m->hmask_cap = 0;
    m->dfwd = NULL;
    m->dfwd_cap = 0;
    m->params_bf16 = NULL;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = qf_backend_cpu();
    m->run_params = m->params;
    if (m->params) bind_params(m);
}

qf_status qf_prefusion_to_device(qf_prefusion *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_prefusion_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    /* the Q-Former first: it checks device and weights and starts the GPU */
    qf_status s = qf_qformer_to_device(m->qf, device, weights);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    release_device(m);
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

qf_status qf_prefusion_forward(qf_prefusion *m, const qf_prefusion_args *a, const float *audio, const float *face,
                               float *out) {
    const char *fn = "qf_prefusion_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    const int64_t B = a->B, ta = a->audio_len, tf = a->face_len;
    if (B < 1 || B > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 .. 2^24", fn, (long long)B);
    if (ta < 0 || tf < 0 || ta + tf < 1)
        return qf_fail(QF_ERR_ARG, "%s: audio_len = %lld, face_len = %lld: each must be >= 0 and not both 0", fn,
                       (long long)ta, (long long)tf);
    if (ta + tf > m->cfg.position_embedding_size)
        return qf_fail(QF_ERR_ARG, "%s: face_len + audio_len = %lld exceeds position_embedding_size = %lld "
                       "(multi_position_embedding has that many rows)", fn, (long long)(ta + tf),
                       (long long)m->cfg.position_embedding_size);
    if (ta && !audio) return qf_fail(QF_ERR_ARG, "%s: audio is NULL but audio_len = %lld", fn, (long long)ta);
    if (tf && !face) return qf_fail(QF_ERR_ARG, "%s: face is NULL but face_len = %lld", fn, (long long)tf);
    m->have_fwd = 0;
    if (m->on_device) return forward_device(m, a, audio, face, out);
    const int64_t M = m->cfg.max_hidden_size, S = ta + tf, nq = m->cfg.num_multi_query_token, H = m->H;
    const int64_t Da = m->cfg.audio_dim, Dv = m->cfg.video_dim;
    size_t need = plan_forward(m, NULL, B, ta, tf);
    QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, need, fn));
    plan_forward(m, m->fwd, B, ta, tf);
    m->B = B;
    m->ta = ta;
    m->tf = tf;
    int64_t off_a, off_f;
    segment_offsets(m, ta, tf, &off_a, &off_f);

    /* each modality: project, then place at its offset with its position rows added */
    for (int mod = 0; mod < 2; mod++) {
        const int64_t t = mod ? ta : tf, D = mod ? Da : Dv, seg = mod ? off_a : off_f;
        if (!t) continue;
        float *in = mod ? m->audio_in : m->face_in;
        memcpy(in, mod ? audio : face, (size_t)(B * t * D) * sizeof(float));
        QF_TRY(qf_linear_forward(m->proj, in, mod ? m->wa : m->wv, mod ? m->ba : m->bv, B * t, D, M));
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * t * M > 65536)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < t; i++) {
                const float *src = m->proj + (b * t + i) * M, *pe = m->pos + (seg + i) * M;
                float *dst = m->enc + (b * S + seg + i) * M;
                for (int64_t c = 0; c < M; c++) dst[c] = src[c] + pe[c];
            }
    }
    m->has_mask = a->audio_mask || a->face_mask;
    if (m->has_mask) {
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < tf; i++)
                m->mask[b * S + off_f + i] = a->face_mask ? (a->face_mask[b * tf + i] != 0) : 1;
            for (int64_t i = 0; i < ta; i++)
                m->mask[b * S + off_a + i] = a->audio_mask ? (a->audio_mask[b * ta + i] != 0) : 1;
        }
    }
    for (int64_t b = 0; b < B; b++) memcpy(m->queries + b * nq * H, m->qtok, (size_t)(nq * H) * sizeof(float));

    qf_qformer_args qa;
    memset(&qa, 0, sizeof qa);
    qa.B = B;
    qa.num_queries = nq;
    qa.encoder_len = S;
    qa.encoder_attention_mask = m->has_mask ? m->mask : NULL;
    qf_status s = qf_qformer_forward(m->qf, &qa, m->queries, m->enc, m->qout);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (multi_Qformer)", fn);
    QF_TRY(qf_linear_forward(out, m->qout, m->wl, m->bl, B * nq, H, m->cfg.llm_hidden_size));
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward ----
 * One code path for both backends: every op goes through m->be, the gradients of the
 * parameters into pf_grad (grads, or dgrads on the GPU). On the GPU grad_out is staged into
 * bwd first and each input gradient is made there and copied out (the caller's pointers may be
 * host or device memory); the call returns after the GPU has finished. */

static qf_status backward_body(qf_prefusion *m, const float *grad_out, float *grad_audio, float *grad_face) {
    const char *fn = "qf_prefusion_backward";
    const qf_backend *be = m->be;
    const int64_t B = m->B, ta = m->ta, tf = m->tf, S = ta + tf, M = m->cfg.max_hidden_size;
    const int64_t nq = m->cfg.num_multi_query_token, H = m->H, T = B * nq, L = m->cfg.llm_hidden_size;
    const float *gout = grad_out;
    if (m->on_device) {
        const size_t n = (size_t)(T * L) * sizeof(float);
        QF_TRY(be->copy2d(m->g_out, n, grad_out, n, n, 1));
        gout = m->g_out;
    }
    QF_TRY(be->linear_backward(m->g_qout, pf_grad(m, m->wl), pf_grad(m, m->bl), gout, m->qout, m->wl, T, H, L));
    qf_status s = qf_qformer_backward(m->qf, m->g_qout, m->g_query, m->g_enc, NULL, NULL);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (multi_Qformer)", fn);
    /* the queries are one [nq, H] table broadcast over the batch and the position rows 0..S-1
     * are shared by every item: each gradient sums its rows over B (a period of nq, S rows) */
    QF_TRY(be->embedding_backward(NULL, pf_grad(m, m->qtok), m->g_query, NULL, -1, T, nq, H));
    QF_TRY(be->embedding_backward(NULL, pf_grad(m, m->pos), m->g_enc, NULL, -1, B * S, S, M));
    int64_t off_a, off_f;
    segment_offsets(m, ta, tf, &off_a, &off_f);
    for (int mod = 0; mod < 2; mod++) {
        const int64_t t = mod ? ta : tf, D = mod ? m->cfg.audio_dim : m->cfg.video_dim, seg = mod ? off_a : off_f;
        float *gin = mod ? grad_audio : grad_face;
        if (!t) continue;
        /* the modality's rows of every item, contiguous */
        const size_t w = (size_t)(t * M) * sizeof(float);
        QF_TRY(be->copy2d(m->g_seg, w, m->g_enc + seg * M, (size_t)(S * M) * sizeof(float), w, (size_t)B));
        float *din = gin && m->on_device ? m->g_in : gin;
        QF_TRY(be->linear_backward(din, pf_grad(m, mod ? m->wa : m->wv), pf_grad(m, mod ? m->ba : m->bv), m->g_seg,
                                   mod ? m->audio_in : m->face_in, mod ? m->wa : m->wv, B * t, D, M));
        if (din != gin) {
            const size_t n = (size_t)(B * t * D) * sizeof(float);
            QF_TRY(be->copy2d(gin, n, din, n, n, 1));
        }
    }
    return QF_OK;
}

qf_status qf_prefusion_backward(qf_prefusion *m, const float *grad_out, float *grad_audio, float *grad_face) {
    const char *fn = "qf_prefusion_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_prefusion_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_prefusion_forward to differentiate", fn);
    size_t need = plan_backward(m, NULL);
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, need, fn));
    plan_backward(m, m->bwd);
    QF_TRY(device_grads(m, fn));
    qf_status s = backward_body(m, grad_out, grad_audio, grad_face);
    if (m->on_device) {
        m->grads_on_device = 1; /* dgrads may have changed, even after a failure; downloaded when shown */
        qf_status s2 = m->be->synchronize(); /* nothing may still run on bwd or the caller's buffers */
        if (s == QF_OK) s = s2;
    }
    return s;
}

/* ---- parameters ---- */

int qf_prefusion_num_params(const qf_prefusion *m) { return m ? m->np + m->nq_params : 0; }

qf_status qf_prefusion_param(qf_prefusion *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_prefusion_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_prefusion_param: out is NULL");
    if (i < 0 || i >= m->np + m->nq_params)
        return qf_fail(QF_ERR_ARG, "qf_prefusion_param: index %d is out of range [0, %d)", i, m->np + m->nq_params);
    if (i >= m->np) {
        QF_TRY(qf_qformer_param(m->qf, i - m->np, out));
        out->name = m->q_names[i - m->np];
        return QF_OK;
    }
    QF_TRY(sync_grads(m));
    const pf_ptab *p = &m->ptab[i];
    memset(out, 0, sizeof *out);
    out->name = p->name;
    out->data = m->params + p->off;
    out->grad = m->grads + p->off;
    out->ndim = p->ndim;
    for (int d = 0; d < p->ndim; d++) out->shape[d] = p->shape[d];
    return QF_OK;
}

void qf_prefusion_zero_grad(qf_prefusion *m) {
    if (!m) return;
    qf_qformer_zero_grad(m->qf);
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->params_total * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    if (m->grads) memset(m->grads, 0, m->params_total * sizeof(float));
}
