/* modality_qformer.c - the siblings of AffectGPT's pre-fusion (prefusion.c), in one file:
 *   1. the per-modality Q-Formers (model_type "affectgpt_video_qformer" / "affectgpt_audio_qformer"):
 *      one modality's frame features -> frame position embedding -> a 2-layer Q-Former read by
 *      learned queries -> projection to the LLM width;
 *   2. the "attention" multi-fusion type (model_type "affectgpt_attention_fusion"): time-mean
 *      features of face and audio -> two modality weights from an MLP -> weighted sum -> LLM width.
 * Forward and backward side by side, on the Q-Former core (qformer.c) and the backend table
 * (m->be): each model may be placed on the GPU (qf_modality_qformer_to_device /
 * qf_attn_fusion_to_device, as prefusion.c): the per-modality forward stages its frames there and
 * runs the position rows, queries, Q-Former and projection as one graph per shape; its backward,
 * and the attention fusion's forward and backward, are one code path for both backends.
 *
 * Semantics followed: AffectGPT my_affectgpt/models/affectgpt.py (read in a public fork,
 * ouyangjutian/AffectGPT; the structure is Video-LLaMA's video/audio branch, which AffectGPT
 * inherits):
 *   encode_video_qformer / encode_audio_qformer (video_fusion_type / audio_fusion_type "qformer"):
 *     X[b, t] = frames[b, t] + frame_position_embedding[t]        t = 0 .. T-1 (T <= table rows)
 *       - the table is nn.Embedding(32 video / 8 audio, input_dim): it lives in the INPUT width,
 *         added before the Q-Former (whose encoder width is input_dim);
 *       - 4-D video input [B,T,K,input_dim] (K tokens per frame, Video-LLaMA's image-Q-Former
 *         outputs): row t is added to all K tokens of frame t, then flattened to [B,T*K,...];
 *     Q = Qformer.bert(query_embeds = query_tokens (broadcast), encoder_hidden_states = X,
 *                      encoder_attention_mask = ones)    2 layers, cross-attention every layer,
 *                      query FFN only (AffectGPT sets the text FFN "output"/"intermediate" to None)
 *     out = proj(Q)  [B, num_query_token, llm_hidden_size]
 *   encode_multi_attention (multi_fusion_type "attention"):
 *     v = multi_video_embs(mean_t face) [B,M]     a = multi_audio_embs(mean_t audio) [B,M]
 *     w = fc_att(attention_mlp([v ; a]))  [B,2]    (two plain Linears: no activation, no softmax)
 *     fused = w0 * v + w1 * a             [B,M]
 *     out[b, j] = multi_llama_proj(fused[b])  for j = 0 .. num_multi_query_token-1 (expand)
 *
 * Checkpoint names (AffectGPT's own; LAVIS names for the Q-Former, transformers names accepted):
 *   video: video_frame_position_embedding.weight [P,D], video_query_tokens [1,nq,H],
 *          video_Qformer.bert.*, affectgpt_proj.{weight,bias} (AffectGPT's name for the video
 *          projection; Video-LLaMA's "video_llama_proj.*" is accepted when affectgpt_proj is absent)
 *   audio: audio_position_embedding.weight [P,D], audio_query_tokens, audio_Qformer.bert.*,
 *          audio_llama_proj.{weight,bias}
 *   attention fusion: multi_video_embs.*, multi_audio_embs.*, attention_mlp.* [M,2M],
 *          fc_att.* [2,M], multi_llama_proj.*
 *
 * qfuse's extensions (AffectGPT itself passes all-ones masks and full-length sequences):
 *   - frame_mask [B,T] (nonzero = real frame) removes padded frames from the cross-attention keys
 *     (all K tokens of a frame); positions still run over the padded layout; a padded frame's
 *     values must be finite and its input gradient comes out 0. An item without any real frame
 *     follows the Q-Former core's rule (uniform weights over the keys).
 *   - attention fusion: audio_mask / face_mask make the time means run over real frames only;
 *     an item with no real frame of a modality is an error (the mean is undefined).
 *
 * Invariants:
 *   - Own parameters in one float buffer, gradients in another, laid out by a table (llm.c); the
 *     Q-Former keeps its own. Parameter gradients accumulate until *_zero_grad.
 *   - Activations are grow-only planned blocks (a call with earlier shapes allocates nothing);
 *     the forward keeps what backward needs, so callers may reuse their buffers.
 *   - have_fwd is set only after a forward fully succeeded; backward refuses without one.
 *   - Load fully succeeds or frees everything; every failure names the file and key/tensor.
 *   - Placement (as prefusion.c): run_params is p.params on the CPU or its device copy (with a
 *     bf16 copy for QF_BF16 weights, read by the forward's GEMMs; backward refuses bf16); on the
 *     GPU the inputs are staged and screened (a non-finite value is named by its flat index) and
 *     the parameter gradients accumulate in the device block dgrads, downloaded into p.grads
 *     when shown (*_param) or when the model moves back to the CPU. */
#include "models_internal.h"
#include "qformer_internal.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- shared helpers ---- */

enum { MQ_MAXP = 10 };

typedef struct {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t off, n;
} mq_ptab;

typedef struct {
    int np;
    mq_ptab t[MQ_MAXP];
    float *params, *grads;
    size_t total;
} mq_params;

static void add_param(mq_params *p, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2) {
    mq_ptab *e = &p->t[p->np++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->ndim = ndim;
    e->shape[0] = d0;
    e->shape[1] = d1;
    e->shape[2] = d2;
    e->n = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    e->off = p->total;
    p->total += qf_align_up(e->n, 16);
}

/* Allocates the parameter/gradient buffers and reads every tensor of the table. */
static qf_status read_params(mq_params *p, const qf_safetensors *st, const char *fn, const char *what) {
    if (posix_memalign((void **)&p->params, 64, p->total * sizeof(float)) ||
        posix_memalign((void **)&p->grads, 64, p->total * sizeof(float)))
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * p->total);
    memset(p->grads, 0, p->total * sizeof(float));
    for (int i = 0; i < p->np; i++) {
        const mq_ptab *e = &p->t[i];
        qf_status s = qf_st_read_f32(st, e->name, e->ndim, e->shape, p->params + e->off);
        if (s != QF_OK) return qf_fail_prefix(s, "%s (%s)", fn, what);
    }
    return QF_OK;
}

static qf_status param_view(mq_params *p, int i, qf_param *out) {
    const mq_ptab *e = &p->t[i];
    memset(out, 0, sizeof *out);
    out->name = e->name;
    out->data = p->params + e->off;
    out->grad = p->grads + e->off;
    out->ndim = e->ndim;
    for (int d = 0; d < e->ndim; d++) out->shape[d] = e->shape[d];
    return QF_OK;
}

static float *pdata(mq_params *p, int i) { return p->params + p->t[i].off; }

static qf_status cfg_int(const qf_config *cfg, const char *fn, const char *path, const char *key, int64_t lo,
                         int64_t hi, int has_def, int64_t def, int64_t *out) {
    qf_status s = has_def ? qf_config_int_or(cfg, key, def, out) : qf_config_int(cfg, key, out);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    if (*out < lo || *out > hi)
        return qf_fail(QF_ERR_FORMAT, "%s: %s: config key \"%s\" = %lld is out of range [%lld, %lld]", fn, path, key,
                       (long long)*out, (long long)lo, (long long)hi);
    return QF_OK;
}

static qf_status read_text(const char *fn, const char *path, char **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return qf_fail(QF_ERR_IO, "%s: cannot open %s", fn, path);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        if (cap >= ((size_t)64 << 20)) {
            free(buf);
            fclose(f);
            return qf_fail(QF_ERR_FORMAT, "%s: %s is larger than 64 MiB", fn, path);
        }
        cap *= 2;
        char *nb = realloc(buf, cap + 1);
        if (!nb) free(buf);
        buf = nb;
    }
    fclose(f);
    if (!buf) return qf_fail(QF_ERR_NOMEM, "%s: cannot read %s", fn, path);
    buf[len] = 0;
    *out = buf;
    return QF_OK;
}

/* The Q-Former's config: the config's qformer_config with encoder_hidden_size = D (the input
 * width; LAVIS sets encoder_width at build time, so checkpoints' configs usually lack it). A
 * present value must equal D. */
static qf_status qformer_config(const char *fn, const char *path, int64_t D, qf_config **out) {
    char *text = NULL;
    QF_TRY(read_text(fn, path, &text));
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!root) return qf_fail(QF_ERR_FORMAT, "%s: %s is not valid JSON", fn, path);
    qf_status s = QF_OK;
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "qformer_config");
    cJSON *copy = NULL;
    char *txt = NULL;
    if (!cJSON_IsObject(qc))
        s = qf_fail(qc ? QF_ERR_FORMAT : QF_ERR_NOT_FOUND, "%s: %s: config key \"qformer_config\" %s", fn, path,
                    qc ? "is not an object" : "is absent");
    if (s == QF_OK) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(qc, "encoder_hidden_size");
        if (e && !cJSON_IsNull(e) && (!cJSON_IsNumber(e) || e->valuedouble != (double)D))
            s = qf_fail(QF_ERR_FORMAT, "%s: %s: config key \"qformer_config.encoder_hidden_size\" must equal input_dim "
                        "= %lld (the Q-Former reads the frame features)", fn, path, (long long)D);
    }
    if (s == QF_OK) {
        copy = cJSON_Duplicate(qc, 1);
        if (copy) cJSON_DeleteItemFromObjectCaseSensitive(copy, "encoder_hidden_size");
        if (!copy || !cJSON_AddNumberToObject(copy, "encoder_hidden_size", (double)D) ||
            !(txt = cJSON_PrintUnformatted(copy)))
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot extend qformer_config", fn);
    }
    if (s == QF_OK) {
        char label[4200];
        snprintf(label, sizeof label, "%s [qformer_config, encoder_hidden_size = input_dim]", path);
        s = qf_config_parse(txt, strlen(txt), label, out);
    }
    free(txt);
    cJSON_Delete(copy);
    cJSON_Delete(root);
    return s;
}

static float *carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}

static int st_has(const qf_safetensors *st, const char *name) {
    for (int i = 0, n = qf_st_count(st); i < n; i++) {
        qf_tensor_view v;
        if (qf_st_get(st, i, &v) == QF_OK && !strcmp(v.name, name)) return 1;
    }
    return 0;
}

static qf_status open_folder(const char *fn, const char *folder, char *path, char *stpath, size_t cap) {
    if (snprintf(path, cap, "%s/config.json", folder) >= (int)cap ||
        snprintf(stpath, cap, "%s/model.safetensors", folder) >= (int)cap)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    return QF_OK;
}

/* ======================================================================================== */
/* 1. per-modality Q-Former                                                                  */

enum { MQ_POS, MQ_QTOK, MQ_PW, MQ_PB, MQ_NOWN };

struct qf_modality_qformer {
    qf_modality_qformer_config cfg;
    int64_t H;
    qf_qformer *qf;
    mq_params p;
    int nq_params;
    char **q_names;                 /* "video_Qformer." / "audio_Qformer." + the core's names */

    float *fwd;                     /* CPU planned block                                       */
    size_t fwd_cap;
    float *enc;                     /* [B, T*K, D] frames + position rows (CPU)                */
    uint8_t *mask;                  /* [B, T*K] when has_mask (CPU)                            */
    float *queries, *qout;          /* [B*nq, H] (qout: on the GPU the Q-Former's result)      */
    int32_t *ids;                   /* [B*T*K] position row of every token (on be)            */
    float *bwd;                     /* on be (device memory on the GPU)                        */
    size_t bwd_cap;
    float *g_qout, *g_query, *g_enc;
    float *g_out;                   /* GPU only: grad_out staged in bwd                        */
    int64_t B, T, K;
    int has_mask, have_fwd;

    /* placement (qf_modality_qformer_to_device), as prefusion.c: be holds run_params (p.params
     * on the CPU, a device copy on the GPU) and, on the GPU, params_bf16, the planned device
     * block dfwd (frames_in, ids, out_buf, dscreen) and the captured graph; hmask / hids are
     * host copies of the expanded mask (handed to the Q-Former) and the position ids. */
    const qf_backend *be;
    int on_device;
    float *run_params;
    uint16_t *params_bf16;
    float *dfwd;
    size_t dfwd_cap;
    float *frames_in;               /* [B*T*K, D] staged frames                                */
    float *out_buf;                 /* [B*nq, llm_hidden_size]                                 */
    int64_t *dscreen;               /* [1] first non-finite index of frames_in                 */
    uint8_t *hmask;
    int32_t *hids;
    size_t hcap;                    /* entries of hmask and of hids                            */
    qf_model_graph graph;
    /* A GPU model's own parameter gradients (placement.c): dgrads parallel to run_params,
     * grads_on_device = 1 while newer than p.grads (downloaded when shown or moved back). */
    float *dgrads;
    int grads_on_device;
};

/* parameter i's view in run_params (host or device) and its gradient (grads, dgrads on the GPU) */
static const float *mq_w(const qf_modality_qformer *m, int i) { return m->run_params + m->p.t[i].off; }
static float *mq_g(const qf_modality_qformer *m, int i) {
    return (m->on_device ? m->dgrads : m->p.grads) + m->p.t[i].off;
}

static qf_status mq_load_into(qf_modality_qformer *m, const char *folder) {
    const char *fn = "qf_modality_qformer_load";
    char path[4096], stpath[4096];
    QF_TRY(open_folder(fn, folder, path, stpath, sizeof path));
    qf_config *cfg = NULL, *qcfg = NULL;
    qf_safetensors *st = NULL;
    qf_status s = qf_config_load(path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    const char *mt = NULL;
    qf_modality_qformer_config *c = &m->cfg;
    s = qf_config_string(cfg, "model_type", &mt);
    if (s != QF_OK) {
        s = qf_fail_prefix(s, "%s", fn);
    } else if (!strcmp(mt, "affectgpt_video_qformer")) {
        c->modality = QF_MODALITY_VIDEO;
    } else if (!strcmp(mt, "affectgpt_audio_qformer")) {
        c->modality = QF_MODALITY_AUDIO;
    } else {
        s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not \"affectgpt_video_qformer\" or "
                    "\"affectgpt_audio_qformer\"", fn, path, mt);
    }
    const int video = c->modality == QF_MODALITY_VIDEO;
    const char *mod = video ? "video" : "audio";
    const int64_t big = 1 << 20;
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "input_dim", 1, big, 0, 0, &c->input_dim);
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "num_query_token", 1, big, 0, 0, &c->num_query_token);
    if (s == QF_OK)
        s = cfg_int(cfg, fn, path, "frame_position_size", 1, big, 1, video ? 32 : 8, &c->frame_position_size);
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "llm_hidden_size", 1, big, 0, 0, &c->llm_hidden_size);
    if (s == QF_OK) s = qformer_config(fn, path, c->input_dim, &qcfg);
    if (s == QF_OK) {
        s = qf_st_open(stpath, &st);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", fn);
    }
    char qprefix[32];
    snprintf(qprefix, sizeof qprefix, "%s_Qformer.", mod);
    if (s == QF_OK) {
        s = qf_qformer_load_parts(qcfg, "", st, qprefix, &m->qf);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s: %s", fn, folder);
    }
    qf_qformer_config qc;
    if (s == QF_OK) s = qf_qformer_get_config(m->qf, &qc);
    if (s == QF_OK) {
        m->H = qc.hidden_size;
        const char *proj = "audio_llama_proj";
        if (video) {
            proj = "affectgpt_proj";
            if (!st_has(st, "affectgpt_proj.weight") && st_has(st, "video_llama_proj.weight")) proj = "video_llama_proj";
        }
        char name[96];
        snprintf(name, sizeof name, "%s.weight", video ? "video_frame_position_embedding" : "audio_position_embedding");
        add_param(&m->p, name, 2, c->frame_position_size, c->input_dim, 0);
        snprintf(name, sizeof name, "%s_query_tokens", mod);
        add_param(&m->p, name, 3, 1, c->num_query_token, m->H);
        snprintf(name, sizeof name, "%s.weight", proj);
        add_param(&m->p, name, 2, c->llm_hidden_size, m->H, 0);
        snprintf(name, sizeof name, "%s.bias", proj);
        add_param(&m->p, name, 1, c->llm_hidden_size, 0, 0);
        char what[160];
        snprintf(what, sizeof what, "AffectGPT %s Q-Former, input_dim %lld, frame_position_size %lld", mod,
                 (long long)c->input_dim, (long long)c->frame_position_size);
        s = read_params(&m->p, st, fn, what);
    }
    if (s == QF_OK) {
        m->nq_params = qf_qformer_num_params(m->qf);
        s = qf_model_prefixed_qformer_names(m->qf, qprefix, fn, &m->q_names);
    }
    if (s == QF_OK) {
        m->be = qf_backend_cpu();
        m->run_params = m->p.params;
    }
    qf_st_close(st);
    qf_config_free(qcfg);
    qf_config_free(cfg);
    return s;
}

qf_status qf_modality_qformer_load(const char *folder, qf_modality_qformer **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_load: out is NULL");
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_load: folder is NULL");
    qf_modality_qformer *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "qf_modality_qformer_load: cannot allocate the model");
    qf_status s = mq_load_into(m, folder);
    if (s != QF_OK) {
        qf_modality_qformer_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

static void mq_release_device(qf_modality_qformer *m);

void qf_modality_qformer_free(qf_modality_qformer *m) {
    if (!m) return;
    if (m->be) mq_release_device(m);
    qf_qformer_free(m->qf);
    free(m->q_names);               /* one block (models_internal.h) */
    free(m->p.params);
    free(m->p.grads);
    free(m->fwd);
    free(m);
}

qf_status qf_modality_qformer_get_config(const qf_modality_qformer *m, qf_modality_qformer_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

qf_qformer *qf_modality_qformer_qformer(qf_modality_qformer *m) { return m ? m->qf : NULL; }

static size_t mq_plan_forward(qf_modality_qformer *m, float *base, int64_t B, int64_t S) {
    const size_t T = (size_t)(B * m->cfg.num_query_token), H = (size_t)m->H;
    size_t off = 0;
    m->enc = carve(base, &off, (size_t)(B * S * m->cfg.input_dim));
    m->mask = (uint8_t *)carve(base, &off, ((size_t)(B * S) + 3) / 4);
    m->queries = carve(base, &off, T * H);
    m->qout = carve(base, &off, T * H);
    m->ids = (int32_t *)carve(base, &off, (size_t)(B * S));
    return off;
}

static size_t mq_plan_backward(qf_modality_qformer *m, float *base) {
    const size_t T = (size_t)(m->B * m->cfg.num_query_token), H = (size_t)m->H;
    size_t off = 0;
    m->g_qout = carve(base, &off, T * H);
    m->g_query = carve(base, &off, T * H);
    m->g_enc = carve(base, &off, (size_t)(m->B * m->T * m->K * m->cfg.input_dim));
    m->g_out = m->on_device ? carve(base, &off, T * (size_t)m->cfg.llm_hidden_size) : NULL;
    return off;
}

/* position row of every token: ids[b*S + i] = i / K (host) */
static void mq_fill_ids(int32_t *ids, int64_t B, int64_t S, int64_t K) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < S; i++) ids[b * S + i] = (int32_t)(i / K);
}

/* ---- forward on a device (qf_modality_qformer_to_device) ----
 * The CPU forward below as backend calls: the frames are staged and screened, the position rows
 * added by embedding_forward (table row ids[i] + staged frame row i, into the Q-Former's encoder
 * buffer), the query tokens broadcast by add_periodic, the Q-Former's layers and the projection
 * follow; everything after the input copies is one graph per key (graph.c). */

/* out = in . w^T + b on m's backend (the bf16 copy of w when placed so) */
static qf_status mq_linear(const qf_modality_qformer *m, float *out, const float *in, int wi, int bi, int64_t rows,
                           int64_t Cin, int64_t Cout) {
    const float *w = mq_w(m, wi);
    const uint16_t *w16 = m->params_bf16 ? m->params_bf16 + (w - m->run_params) : NULL;
    return qf_model_linear(m->be, out, in, w, w16, mq_w(m, bi), NULL, rows, Cin, Cout);
}

static size_t mq_plan_device(qf_modality_qformer *m, float *base, int64_t B, int64_t S) {
    size_t off = 0;
    m->frames_in = carve(base, &off, (size_t)(B * S * m->cfg.input_dim));
    m->out_buf = carve(base, &off, (size_t)(B * m->cfg.num_query_token * m->cfg.llm_hidden_size));
    m->ids = (int32_t *)carve(base, &off, (size_t)(B * S));
    m->dscreen = (int64_t *)carve(base, &off, 2);
    return off;
}

static qf_status mq_device_body(void *ctx) {
    qf_modality_qformer *m = ctx;
    const qf_backend *be = m->be;
    qf_qformer *qf = m->qf;
    const int64_t B = m->B, S = m->T * m->K, D = m->cfg.input_dim, nq = m->cfg.num_query_token, H = m->H;
    QF_TRY(be->embedding_forward(qf->enc, m->ids, mq_w(m, MQ_POS), m->frames_in, B * S, B * S, D));
    QF_TRY(be->add_periodic(qf->qin, NULL, mq_w(m, MQ_QTOK), B * nq, nq, H));
    QF_TRY(qf_qformer_run(qf));
    return mq_linear(m, m->out_buf, qf_qformer_result(qf), MQ_PW, MQ_PB, B * nq, H, m->cfg.llm_hidden_size);
}

static qf_status mq_forward_device(qf_modality_qformer *m, const qf_modality_qformer_args *a, const float *frames,
                                   float *out) {
    const char *fn = "qf_modality_qformer_forward";
    const qf_backend *be = m->be;
    const int64_t B = a->B, T = a->frames, K = a->tokens_per_frame ? a->tokens_per_frame : 1, S = T * K;
    const int64_t D = m->cfg.input_dim, nq = m->cfg.num_query_token;
    const size_t need = mq_plan_device(m, NULL, B, S);
    if (need > m->dfwd_cap) {
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        m->dfwd = NULL;
        m->dfwd_cap = 0;
        QF_TRY(be->alloc((void **)&m->dfwd, need * sizeof(float)));
        m->dfwd_cap = need;
    }
    mq_plan_device(m, m->dfwd, B, S);
    if ((size_t)(B * S) > m->hcap) {
        uint8_t *hm = malloc((size_t)(B * S));
        int32_t *hi = malloc((size_t)(B * S) * sizeof(int32_t));
        if (!hm || !hi) {
            free(hm);
            free(hi);
            return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the frame mask and position ids", fn);
        }
        free(m->hmask);
        free(m->hids);
        m->hmask = hm;
        m->hids = hi;
        m->hcap = (size_t)(B * S);
    }
    m->B = B;
    m->T = T;
    m->K = K;
    m->has_mask = a->frame_mask != NULL;
    if (m->has_mask)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < S; i++) m->hmask[b * S + i] = a->frame_mask[b * T + i / K] != 0;
    qf_qformer_args qa;
    memset(&qa, 0, sizeof qa);
    qa.B = B;
    qa.num_queries = nq;
    qa.encoder_len = S;
    qa.encoder_attention_mask = m->has_mask ? m->hmask : NULL;
    const char *qname = m->cfg.modality == QF_MODALITY_VIDEO ? "video" : "audio";
    qf_status s = qf_qformer_stage(m->qf, &qa, fn);
    if (s != QF_OK) return qf_fail_prefix(s, "%s (%s_Qformer)", fn, qname);

    mq_fill_ids(m->hids, B, S, K);
    QF_TRY(be->copy2d(m->ids, (size_t)(B * S) * sizeof(int32_t), m->hids, (size_t)(B * S) * sizeof(int32_t),
                      (size_t)(B * S) * sizeof(int32_t), 1));
    int64_t screen = INT64_MAX;
    QF_TRY(be->copy2d(m->dscreen, sizeof screen, &screen, sizeof screen, sizeof screen, 1));
    const size_t n = (size_t)(B * S * D) * sizeof(float);
    QF_TRY(be->copy2d(m->frames_in, n, frames, n, n, 1));
    QF_TRY(be->screen_nonfinite(m->frames_in, B * S * D, m->dscreen));
    /* the key: every shape and flag that changes the calls, and the planned blocks' addresses
     * (the Q-Former's may move when its plan grows) */
    int64_t qkey[6];
    qf_qformer_key(m->qf, qkey);
    const int64_t key[8] = {B, S, m->has_mask, qkey[5], (int64_t)(intptr_t)m->qf->fwd, (int64_t)(intptr_t)m->qf->mir,
                            (int64_t)(intptr_t)m->dfwd, 0};
    QF_TRY(qf_model_graph_run(be, &m->graph, key, 8, mq_device_body, m));
    m->qout = (float *)qf_qformer_result(m->qf); /* the projection's input, for backward */
    const size_t no = (size_t)(B * nq * m->cfg.llm_hidden_size) * sizeof(float);
    QF_TRY(be->copy2d(out, no, m->out_buf, no, no, 1));
    QF_TRY(be->synchronize());
    QF_TRY(be->copy2d(&screen, sizeof screen, m->dscreen, sizeof screen, sizeof screen, 1));
    if (screen != INT64_MAX) {
        float v = NAN;
        (void)be->copy2d(&v, sizeof v, m->frames_in + screen, sizeof v, sizeof v, 1);
        return qf_fail(QF_ERR_NONFINITE, "%s: frames[%lld] = %g is not finite", fn, (long long)screen, (double)v);
    }
    /* the staged Q-Former forward (qf_qformer_stage leaves its have_fwd 0) is complete and
     * screened: its backward may differentiate it */
    m->qf->have_fwd = 1;
    m->have_fwd = 1;
    return QF_OK;
}

static qf_status mq_device_grads(qf_modality_qformer *m, const char *fn) {
    return qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->p.grads, m->p.total, &m->grads_on_device, fn);
}

static qf_status mq_sync_grads(qf_modality_qformer *m) {
    return qf_model_sync_grads(m->be, m->p.grads, m->dgrads, m->p.total, &m->grads_on_device);
}

/* Frees what the model holds on a device (the gradients downloaded first) and the planned
 * backward block on either side; the model is a CPU model again. */
static void mq_release_device(qf_modality_qformer *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->dfwd);
        be->free(m->run_params);
        be->free(m->params_bf16);
        be->free(m->bwd);
        (void)mq_sync_grads(m); /* p.grads keeps the newest gradients */
        be->free(m->dgrads);
    } else {
        free(m->bwd);
    }
    m->bwd = m->dgrads = NULL;
    m->bwd_cap = 0;
    m->grads_on_device = 0;
    free(m->hmask);
    free(m->hids);
    m->hmask = NULL;
    m->hids = NULL;
    m->hcap = 0;
    m->dfwd = NULL;
    m->dfwd_cap = 0;
    m->params_bf16 = NULL;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = qf_backend_cpu();
    m->run_params = m->p.params;
}

qf_status qf_modality_qformer_to_device(qf_modality_qformer *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_modality_qformer_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    /* the Q-Former first: it checks device and weights and starts the GPU */
    qf_status s = qf_qformer_to_device(m->qf, device, weights);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    mq_release_device(m);
    free(m->fwd); /* the CPU's planned block is not used on a device */
    m->fwd = NULL;
    m->fwd_cap = 0;
    if (strcmp(device, "cuda")) return QF_OK;
    const qf_backend *be = m->qf->be;
    float *dp;
    uint16_t *db;
    s = qf_model_upload_params(be, m->p.params, m->p.total, 0, weights, &dp, &db, fn);
    if (s != QF_OK) {
        (void)qf_qformer_to_device(m->qf, "cpu", QF_F32);
        return s;
    }
    m->be = be;
    m->on_device = 1;
    m->graph.off = qf_model_graphs_off();
    m->run_params = dp;
    m->params_bf16 = db;
    return QF_OK;
}

qf_status qf_modality_qformer_forward(qf_modality_qformer *m, const qf_modality_qformer_args *a,
                                      const float *frames, float *out) {
    const char *fn = "qf_modality_qformer_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!frames) return qf_fail(QF_ERR_ARG, "%s: frames is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    const int64_t B = a->B, T = a->frames, K = a->tokens_per_frame ? a->tokens_per_frame : 1;
    if (B < 1 || B > (1 << 24)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 .. 2^24", fn, (long long)B);
    if (T < 1) return qf_fail(QF_ERR_ARG, "%s: frames = %lld, expected >= 1", fn, (long long)T);
    if (K < 1 || K > (1 << 20))
        return qf_fail(QF_ERR_ARG, "%s: tokens_per_frame = %lld, expected 0 or 1 .. 2^20", fn, (long long)K);
    const char *table = m->cfg.modality == QF_MODALITY_VIDEO ? "video_frame_position_embedding"
                                                             : "audio_position_embedding";
    if (T > m->cfg.frame_position_size)
        return qf_fail(QF_ERR_SHAPE, "%s: frames = %lld exceeds frame_position_size = %lld (%s has that many rows)",
                       fn, (long long)T, (long long)m->cfg.frame_position_size, table);
    const int64_t D = m->cfg.input_dim, S = T * K, nq = m->cfg.num_query_token, H = m->H;
    if (B * S > ((int64_t)1 << 31) / D)
        return qf_fail(QF_ERR_ARG, "%s: B*frames*tokens_per_frame*input_dim = %lld*%lld*%lld*%lld is too large", fn,
                       (long long)B, (long long)T, (long long)K, (long long)D);
    m->have_fwd = 0;
    if (m->on_device) return mq_forward_device(m, a, frames, out);
    QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, mq_plan_forward(m, NULL, B, S), fn));
    mq_plan_forward(m, m->fwd, B, S);
    m->B = B;
    m->T = T;
    m->K = K;
    mq_fill_ids(m->ids, B, S, K);
    const float *pos = pdata(&m->p, MQ_POS);
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * S * D > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < S; i++) {
            const float *src = frames + (b * S + i) * D, *pe = pos + (i / K) * D;
            float *dst = m->enc + (b * S + i) * D;
            for (int64_t c = 0; c < D; c++) dst[c] = src[c] + pe[c];
        }
    m->has_mask = a->frame_mask != NULL;
    if (m->has_mask)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < S; i++) m->mask[b * S + i] = a->frame_mask[b * T + i / K] != 0;
    for (int64_t b = 0; b < B; b++)
        memcpy(m->queries + b * nq * H, pdata(&m->p, MQ_QTOK), (size_t)(nq * H) * sizeof(float));
    qf_qformer_args qa;
    memset(&qa, 0, sizeof qa);
    qa.B = B;
    qa.num_queries = nq;
    qa.encoder_len = S;
    qa.encoder_attention_mask = m->has_mask ? m->mask : NULL;
    qf_status s = qf_qformer_forward(m->qf, &qa, m->queries, m->enc, m->qout);
    if (s != QF_OK)
        return qf_fail_prefix(s, "%s (%s_Qformer)", fn, m->cfg.modality == QF_MODALITY_VIDEO ? "video" : "audio");
    QF_TRY(qf_linear_forward(out, m->qout, pdata(&m->p, MQ_PW), pdata(&m->p, MQ_PB), B * nq, H,
                             m->cfg.llm_hidden_size));
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward ----
 * One code path for both backends (as prefusion.c): every op goes through m->be, the parameter
 * gradients into mq_g (p.grads, or dgrads on the GPU). On the GPU grad_out is staged into bwd
 * first and grad_frames is copied out of it (host or device pointer); the call returns after the
 * GPU has finished. */
static qf_status mq_backward_body(qf_modality_qformer *m, const float *grad_out, float *grad_frames) {
    const char *fn = "qf_modality_qformer_backward";
    const qf_backend *be = m->be;
    const int64_t B = m->B, S = m->T * m->K, D = m->cfg.input_dim;
    const int64_t nq = m->cfg.num_query_token, H = m->H, L = m->cfg.llm_hidden_size;
    const float *gout = grad_out;
    if (m->on_device) {
        const size_t n = (size_t)(B * nq * L) * sizeof(float);
        QF_TRY(be->copy2d(m->g_out, n, grad_out, n, n, 1));
        gout = m->g_out;
    }
    QF_TRY(be->linear_backward(m->g_qout, mq_g(m, MQ_PW), mq_g(m, MQ_PB), gout, m->qout, mq_w(m, MQ_PW), B * nq, H,
                               L));
    qf_status s = qf_qformer_backward(m->qf, m->g_qout, m->g_query, m->g_enc, NULL, NULL);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    /* the query tokens are one parameter broadcast over the batch (a period of nq rows); position
     * row t is shared by every item and by the K tokens of frame t (ids[i] = t) */
    QF_TRY(be->embedding_backward(NULL, mq_g(m, MQ_QTOK), m->g_query, NULL, -1, B * nq, nq, H));
    QF_TRY(be->embedding_backward(mq_g(m, MQ_POS), NULL, m->g_enc, m->ids, -1, B * S, B * S, D));
    /* frames enter X by identity */
    if (grad_frames) {
        const size_t n = (size_t)(B * S * D) * sizeof(float);
        QF_TRY(be->copy2d(grad_frames, n, m->g_enc, n, n, 1));
    }
    return QF_OK;
}

qf_status qf_modality_qformer_backward(qf_modality_qformer *m, const float *grad_out, float *grad_frames) {
    const char *fn = "qf_modality_qformer_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_modality_qformer_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_modality_qformer_forward to differentiate", fn);
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, mq_plan_backward(m, NULL), fn));
    mq_plan_backward(m, m->bwd);
    QF_TRY(mq_device_grads(m, fn));
    qf_status s = mq_backward_body(m, grad_out, grad_frames);
    if (m->on_device) {
        m->grads_on_device = 1; /* dgrads may have changed, even after a failure; downloaded when shown */
        qf_status s2 = m->be->synchronize(); /* nothing may still run on bwd or the caller's buffers */
        if (s == QF_OK) s = s2;
    }
    return s;
}

int qf_modality_qformer_num_params(const qf_modality_qformer *m) { return m ? m->p.np + m->nq_params : 0; }

qf_status qf_modality_qformer_param(qf_modality_qformer *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_modality_qformer_param: out is NULL");
    if (i < 0 || i >= m->p.np + m->nq_params)
        return qf_fail(QF_ERR_ARG, "qf_modality_qformer_param: index %d is out of range [0, %d)", i,
                       m->p.np + m->nq_params);
    if (i >= m->p.np) {
        QF_TRY(qf_qformer_param(m->qf, i - m->p.np, out));
        out->name = m->q_names[i - m->p.np];
        return QF_OK;
    }
    QF_TRY(mq_sync_grads(m));
    return param_view(&m->p, i, out);
}

void qf_modality_qformer_zero_grad(qf_modality_qformer *m) {
    if (!m) return;
    qf_qformer_zero_grad(m->qf);
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->p.total * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    memset(m->p.grads, 0, m->p.total * sizeof(float));
}

/* ======================================================================================== */
/* 2. attention fusion (multi_fusion_type "attention")                                        */

enum { AF_VW, AF_VB, AF_AW, AF_AB, AF_MW, AF_MB, AF_FW, AF_FB, AF_LW, AF_LB, AF_N };

struct qf_attn_fusion {
    qf_attn_fusion_config cfg;
    mq_params p;
    float *fwd;                     /* planned forward block on be (device memory on the GPU)  */
    size_t fwd_cap;
    const float *audio_x, *face_x;  /* the inputs read: the caller's (CPU) or staged copies     */
    float *audio_in, *face_in;      /* GPU only: staged inputs [B*ta,Da], [B*tf,Dv]            */
    float *wts_a, *wts_f;           /* [B*ta], [B*tf]: 1 / real count for a real frame, else 0  */
    float *vbar, *abar;             /* [B,Dv], [B,Da] time means */
    float *cat;                     /* [B,2M] = [v ; a] (row b: v_b then a_b, a [2,M] matrix)  */
    float *hid;                     /* [B,M] attention_mlp output */
    float *w;                       /* [B,2] modality weights (fc_att output) */
    float *fused;                   /* [B,M] */
    float *o;                       /* [B,llm] */
    float *out_buf;                 /* GPU only: [B*nq, llm] */
    int64_t *dscreen;               /* GPU only: [2] first non-finite index of audio_in, face_in */
    float *bwd;                     /* planned backward block on be */
    size_t bwd_cap;
    float *g_out, *g_in;            /* GPU only: grad_out staged, an input gradient made there  */
    float *g_o, *g_fused, *g_w, *g_hid, *g_cat, *g_v, *g_a, *g_vbar, *g_abar;
    float *hwts;                    /* host [B*(ta+tf)]: the weights built before an upload     */
    size_t hwts_cap;
    int64_t B, ta, tf;
    int have_fwd;

    /* placement (qf_attn_fusion_to_device), as prefusion.c: be holds run_params (p.params on
     * the CPU, a device copy on the GPU), params_bf16 and the captured graph; dgrads is the
     * device gradient block, grads_on_device = 1 while newer than p.grads. */
    const qf_backend *be;
    int on_device;
    float *run_params;
    uint16_t *params_bf16;
    qf_model_graph graph;
    float *dgrads;
    int grads_on_device;
};

static qf_status af_load_into(qf_attn_fusion *m, const char *folder) {
    const char *fn = "qf_attn_fusion_load";
    char path[4096], stpath[4096];
    QF_TRY(open_folder(fn, folder, path, stpath, sizeof path));
    qf_config *cfg = NULL;
    qf_safetensors *st = NULL;
    qf_status s = qf_config_load(path, &cfg);
    if (s != QF_OK) return qf_fail_prefix(s, "%s", fn);
    const char *mt = NULL;
    qf_attn_fusion_config *c = &m->cfg;
    s = qf_config_string(cfg, "model_type", &mt);
    if (s != QF_OK)
        s = qf_fail_prefix(s, "%s", fn);
    else if (strcmp(mt, "affectgpt_attention_fusion"))
        s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not \"affectgpt_attention_fusion\"", fn, path,
                    mt);
    const int64_t big = 1 << 20;
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "audio_dim", 1, big, 0, 0, &c->audio_dim);
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "video_dim", 1, big, 0, 0, &c->video_dim);
    const int64_t M0 = c->audio_dim > c->video_dim ? c->audio_dim : c->video_dim;
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "max_hidden_size", 1, big, 1, M0, &c->max_hidden_size);
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "num_multi_query_token", 1, big, 0, 0, &c->num_multi_query_token);
    if (s == QF_OK) s = cfg_int(cfg, fn, path, "llm_hidden_size", 1, big, 0, 0, &c->llm_hidden_size);
    if (s == QF_OK && c->max_hidden_size != M0)
        s = qf_fail(QF_ERR_FORMAT, "%s: %s: max_hidden_size = %lld must be max(audio_dim = %lld, video_dim = %lld)", fn,
                    path, (long long)c->max_hidden_size, (long long)c->audio_dim, (long long)c->video_dim);
    if (s == QF_OK) {
        s = qf_st_open(stpath, &st);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", fn);
    }
    if (s == QF_OK) {
        const int64_t M = c->max_hidden_size;
        mq_params *p = &m->p;
        add_param(p, "multi_video_embs.weight", 2, M, c->video_dim, 0);
        add_param(p, "multi_video_embs.bias", 1, M, 0, 0);
        add_param(p, "multi_audio_embs.weight", 2, M, c->audio_dim, 0);
        add_param(p, "multi_audio_embs.bias", 1, M, 0, 0);
        add_param(p, "attention_mlp.weight", 2, M, 2 * M, 0);
        add_param(p, "attention_mlp.bias", 1, M, 0, 0);
        add_param(p, "fc_att.weight", 2, 2, M, 0);
        add_param(p, "fc_att.bias", 1, 2, 0, 0);
        add_param(p, "multi_llama_proj.weight", 2, c->llm_hidden_size, M, 0);
        add_param(p, "multi_llama_proj.bias", 1, c->llm_hidden_size, 0, 0);
        char what[160];
        snprintf(what, sizeof what, "AffectGPT attention fusion, audio_dim %lld, video_dim %lld, max_hidden_size %lld",
                 (long long)c->audio_dim, (long long)c->video_dim, (long long)M);
        s = read_params(p, st, fn, what);
    }
    if (s == QF_OK) {
        m->be = qf_backend_cpu();
        m->run_params = m->p.params;
    }
    qf_st_close(st);
    qf_config_free(cfg);
    return s;
}

qf_status qf_attn_fusion_load(const char *folder, qf_attn_fusion **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_load: out is NULL");
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_load: folder is NULL");
    qf_attn_fusion *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "qf_attn_fusion_load: cannot allocate the model");
    qf_status s = af_load_into(m, folder);
    if (s != QF_OK) {
        qf_attn_fusion_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

static void af_release_device(qf_attn_fusion *m);

void qf_attn_fusion_free(qf_attn_fusion *m) {
    if (!m) return;
    if (m->be) af_release_device(m);
    free(m->p.params);
    free(m->p.grads);
    free(m->hwts);
    free(m);
}

qf_status qf_attn_fusion_get_config(const qf_attn_fusion *m, qf_attn_fusion_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

static const float *af_w(const qf_attn_fusion *m, int i) { return m->run_params + m->p.t[i].off; }
static float *af_g(const qf_attn_fusion *m, int i) { return (m->on_device ? m->dgrads : m->p.grads) + m->p.t[i].off; }

static size_t af_plan_forward(qf_attn_fusion *m, float *base, int64_t B, int64_t ta, int64_t tf) {
    const size_t M = (size_t)m->cfg.max_hidden_size, b = (size_t)B;
    size_t off = 0;
    m->audio_in = m->face_in = m->out_buf = NULL;
    m->dscreen = NULL;
    if (m->on_device) {
        m->audio_in = carve(base, &off, b * (size_t)(ta * m->cfg.audio_dim));
        m->face_in = carve(base, &off, b * (size_t)(tf * m->cfg.video_dim));
        m->out_buf = carve(base, &off, b * (size_t)(m->cfg.num_multi_query_token * m->cfg.llm_hidden_size));
        m->dscreen = (int64_t *)carve(base, &off, 4);
    }
    m->wts_a = carve(base, &off, b * (size_t)ta);
    m->wts_f = carve(base, &off, b * (size_t)tf);
    m->vbar = carve(base, &off, b * (size_t)m->cfg.video_dim);
    m->abar = carve(base, &off, b * (size_t)m->cfg.audio_dim);
    m->cat = carve(base, &off, b * 2 * M);
    m->hid = carve(base, &off, b * M);
    m->w = carve(base, &off, b * 2);
    m->fused = carve(base, &off, b * M);
    m->o = carve(base, &off, b * (size_t)m->cfg.llm_hidden_size);
    return off;
}

static size_t af_plan_backward(qf_attn_fusion *m, float *base) {
    const size_t M = (size_t)m->cfg.max_hidden_size, b = (size_t)m->B, L = (size_t)m->cfg.llm_hidden_size;
    size_t off = 0;
    m->g_out = m->g_in = NULL;
    if (m->on_device) {
        const size_t na = (size_t)(m->ta * m->cfg.audio_dim), nf = (size_t)(m->tf * m->cfg.video_dim);
        m->g_out = carve(base, &off, b * (size_t)m->cfg.num_multi_query_token * L);
        m->g_in = carve(base, &off, b * (na > nf ? na : nf));
    }
    m->g_o = carve(base, &off, b * L);
    m->g_fused = carve(base, &off, b * M);
    m->g_w = carve(base, &off, b * 2);
    m->g_hid = carve(base, &off, b * M);
    m->g_cat = carve(base, &off, b * 2 * M);
    m->g_v = carve(base, &off, b * M);
    m->g_a = carve(base, &off, b * M);
    m->g_vbar = carve(base, &off, b * (size_t)m->cfg.video_dim);
    m->g_abar = carve(base, &off, b * (size_t)m->cfg.audio_dim);
    return off;
}

/* The time-mean weights of one modality (host): wts[b*t + i] = 1 / (real frames of item b) for a
 * real frame, 0 for a padded one; an item with none is an error. */
static qf_status mean_weights(const char *fn, const char *what, const uint8_t *mask, int64_t B, int64_t t,
                              float *wts) {
    for (int64_t b = 0; b < B; b++) {
        int64_t n = 0;
        for (int64_t i = 0; i < t; i++) n += mask ? (mask[b * t + i] != 0) : 1;
        if (!n)
            return qf_fail(QF_ERR_ARG, "%s: %s_mask: batch item %lld has no real %s frame (the time mean is undefined)",
                           fn, what, (long long)b, what);
        const float inv = 1.0f / (float)n;
        for (int64_t i = 0; i < t; i++) wts[b * t + i] = !mask || mask[b * t + i] ? inv : 0.0f;
    }
    return QF_OK;
}

/* out [rows, Cout] (row stride ldo) = in . w^T + b on m's backend (w's bf16 copy when placed so) */
static qf_status af_linear(const qf_attn_fusion *m, float *out, int64_t ldo, const float *in, int wi, int bi,
                           int64_t rows, int64_t Cin, int64_t Cout) {
    const float *w = af_w(m, wi);
    qf_gemm_nt_args g = {.x = in, .ldx = Cin, .w = w, .bias = af_w(m, bi), .out = out, .ldo = ldo, .M = rows,
                         .N = Cout, .K = Cin,
                         .w_bf16 = m->params_bf16 ? m->params_bf16 + (w - m->run_params) : NULL};
    return m->be->gemm_nt(&g);
}

/* out [M, N] (row stride ldo) (+)= x [M, K] (row stride ldx) . w [N, K]^T: float32 activations */
static qf_status af_gemm(const qf_backend *be, float *out, int64_t ldo, const float *x, int64_t ldx, const float *w,
                         int64_t M, int64_t N, int64_t K, int accumulate) {
    qf_gemm_nt_args g = {.x = x, .ldx = ldx, .w = w, .out = out, .ldo = ldo, .M = M, .N = N, .K = K,
                         .accumulate = accumulate};
    return be->gemm_nt(&g);
}

/* The forward after the inputs and the mean weights are in place, as backend calls only (one
 * code for the CPU and, captured as a graph, the GPU). The per-item products are GEMMs with one
 * side a column: mean_b = wts_bᵀ x_b and fused_b = w_bᵀ [v_b ; a_b] as linear_backward's weight
 * gradient (d_W += d_outᵀ in) into zeroed rows. */
static qf_status af_body(void *ctx) {
    qf_attn_fusion *m = ctx;
    const qf_backend *be = m->be;
    const int64_t B = m->B, ta = m->ta, tf = m->tf, M = m->cfg.max_hidden_size, L = m->cfg.llm_hidden_size;
    const int64_t Da = m->cfg.audio_dim, Dv = m->cfg.video_dim, nq = m->cfg.num_multi_query_token;
    QF_TRY(be->zero(m->vbar, (size_t)(B * Dv) * sizeof(float)));
    QF_TRY(be->zero(m->abar, (size_t)(B * Da) * sizeof(float)));
    QF_TRY(be->zero(m->fused, (size_t)(B * M) * sizeof(float)));
    for (int64_t b = 0; b < B; b++) {
        QF_TRY(be->linear_backward(NULL, m->vbar + b * Dv, NULL, m->wts_f + b * tf, m->face_x + b * tf * Dv, NULL, tf,
                                   Dv, 1));
        QF_TRY(be->linear_backward(NULL, m->abar + b * Da, NULL, m->wts_a + b * ta, m->audio_x + b * ta * Da, NULL, ta,
                                   Da, 1));
    }
    QF_TRY(af_linear(m, m->cat, 2 * M, m->vbar, AF_VW, AF_VB, B, Dv, M));
    QF_TRY(af_linear(m, m->cat + M, 2 * M, m->abar, AF_AW, AF_AB, B, Da, M));
    QF_TRY(af_linear(m, m->hid, M, m->cat, AF_MW, AF_MB, B, 2 * M, M));
    QF_TRY(af_linear(m, m->w, 2, m->hid, AF_FW, AF_FB, B, M, 2));
    for (int64_t b = 0; b < B; b++)
        QF_TRY(be->linear_backward(NULL, m->fused + b * M, NULL, m->w + 2 * b, m->cat + b * 2 * M, NULL, 2, M, 1));
    QF_TRY(af_linear(m, m->o, L, m->fused, AF_LW, AF_LB, B, M, L));
    if (m->out_buf) /* the nq equal rows of every item */
        for (int64_t j = 0; j < nq; j++)
            QF_TRY(be->copy2d(m->out_buf + j * L, (size_t)(nq * L) * sizeof(float), m->o, (size_t)L * sizeof(float),
                              (size_t)L * sizeof(float), (size_t)B));
    return QF_OK;
}

qf_status qf_attn_fusion_forward(qf_attn_fusion *m, const qf_prefusion_args *a, const float *audio,
                                 const float *face, float *out) {
    const char *fn = "qf_attn_fusion_forward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!a) return qf_fail(QF_ERR_ARG, "%s: args is NULL", fn);
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    const int64_t B = a->B, ta = a->audio_len, tf = a->face_len;
    if (B < 1 || B > (1 << 24)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 .. 2^24", fn, (long long)B);
    if (ta < 1 || tf < 1 || ta > (1 << 24) || tf > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: audio_len = %lld, face_len = %lld: the attention fusion needs both "
                       "modalities (each 1 .. 2^24 frames)", fn, (long long)ta, (long long)tf);
    if (!audio || !face) return qf_fail(QF_ERR_ARG, "%s: audio and face are both required", fn);
    m->have_fwd = 0;
    const qf_backend *be = m->be;
    const int64_t L = m->cfg.llm_hidden_size, nq = m->cfg.num_multi_query_token;
    const int64_t Da = m->cfg.audio_dim, Dv = m->cfg.video_dim;
    /* the mean weights first (host): a maskless item check needs no planned block */
    const size_t nw = (size_t)(B * (ta + tf));
    if (nw > m->hwts_cap) {
        float *p = malloc(nw * sizeof(float));
        if (!p) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the time-mean weights", fn);
        free(m->hwts);
        m->hwts = p;
        m->hwts_cap = nw;
    }
    QF_TRY(mean_weights(fn, "face", a->face_mask, B, tf, m->hwts));
    QF_TRY(mean_weights(fn, "audio", a->audio_mask, B, ta, m->hwts + B * tf));
    const size_t need = af_plan_forward(m, NULL, B, ta, tf);
    if (need > m->fwd_cap) qf_model_graph_drop(be, &m->graph);
    QF_TRY(qf_model_grow(be, &m->fwd, &m->fwd_cap, need, fn));
    af_plan_forward(m, m->fwd, B, ta, tf);
    m->B = B;
    m->ta = ta;
    m->tf = tf;
    QF_TRY(be->copy2d(m->wts_f, (size_t)(B * tf) * sizeof(float), m->hwts, (size_t)(B * tf) * sizeof(float),
                      (size_t)(B * tf) * sizeof(float), 1));
    QF_TRY(be->copy2d(m->wts_a, (size_t)(B * ta) * sizeof(float), m->hwts + B * tf, (size_t)(B * ta) * sizeof(float),
                      (size_t)(B * ta) * sizeof(float), 1));
    if (!m->on_device) {
        m->audio_x = audio;
        m->face_x = face;
        QF_TRY(af_body(m));
        for (int64_t j = 0; j < nq; j++) /* the nq equal rows of every item */
            QF_TRY(be->copy2d(out + j * L, (size_t)(nq * L) * sizeof(float), m->o, (size_t)L * sizeof(float),
                              (size_t)L * sizeof(float), (size_t)B));
        m->have_fwd = 1;
        return QF_OK;
    }
    /* GPU: the inputs staged and screened, the rest one graph per shape */
    int64_t screen[2] = {INT64_MAX, INT64_MAX};
    QF_TRY(be->copy2d(m->dscreen, sizeof screen, screen, sizeof screen, sizeof screen, 1));
    const size_t na = (size_t)(B * ta * Da) * sizeof(float), nf = (size_t)(B * tf * Dv) * sizeof(float);
    QF_TRY(be->copy2d(m->audio_in, na, audio, na, na, 1));
    QF_TRY(be->screen_nonfinite(m->audio_in, B * ta * Da, m->dscreen));
    QF_TRY(be->copy2d(m->face_in, nf, face, nf, nf, 1));
    QF_TRY(be->screen_nonfinite(m->face_in, B * tf * Dv, m->dscreen + 1));
    m->audio_x = m->audio_in;
    m->face_x = m->face_in;
    const int64_t key[4] = {B, ta, tf, (int64_t)(intptr_t)m->fwd};
    QF_TRY(qf_model_graph_run(be, &m->graph, key, 4, af_body, m));
    const size_t no = (size_t)(B * nq * L) * sizeof(float);
    QF_TRY(be->copy2d(out, no, m->out_buf, no, no, 1));
    QF_TRY(be->synchronize());
    QF_TRY(be->copy2d(screen, sizeof screen, m->dscreen, sizeof screen, sizeof screen, 1));
    for (int i = 0; i < 2; i++) {
        if (screen[i] == INT64_MAX) continue;
        float v = NAN;
        (void)be->copy2d(&v, sizeof v, (i ? m->face_in : m->audio_in) + screen[i], sizeof v, sizeof v, 1);
        return qf_fail(QF_ERR_NONFINITE, "%s: %s[%lld] = %g is not finite", fn, i ? "face" : "audio",
                       (long long)screen[i], (double)v);
    }
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- backward: one code path over m->be (gradients into af_g: p.grads, or dgrads on the GPU;
 * on the GPU grad_out is staged into bwd and each input gradient is made in g_in and copied out) */
static qf_status af_backward_body(qf_attn_fusion *m, const float *grad_out, float *grad_audio, float *grad_face) {
    const qf_backend *be = m->be;
    const int64_t B = m->B, M = m->cfg.max_hidden_size, L = m->cfg.llm_hidden_size, nq = m->cfg.num_multi_query_token;
    const float *gout = grad_out;
    if (m->on_device) {
        const size_t n = (size_t)(B * nq * L) * sizeof(float);
        QF_TRY(be->copy2d(m->g_out, n, grad_out, n, n, 1));
        gout = m->g_out;
    }
    /* the nq output rows are copies of one row: their gradients sum (column sums per item) */
    QF_TRY(be->zero(m->g_o, (size_t)(B * L) * sizeof(float)));
    for (int64_t b = 0; b < B; b++)
        QF_TRY(be->linear_backward(NULL, NULL, m->g_o + b * L, gout + b * nq * L, NULL, NULL, nq, 1, L));
    QF_TRY(be->linear_backward(m->g_fused, af_g(m, AF_LW), af_g(m, AF_LB), m->g_o, m->fused, af_w(m, AF_LW), B, M, L));
    /* g_w[b, j] = g_fused_b . [v_b ; a_b]_j */
    for (int64_t b = 0; b < B; b++)
        QF_TRY(af_gemm(be, m->g_w + 2 * b, 2, m->g_fused + b * M, M, m->cat + b * 2 * M, 1, 2, M, 0));
    QF_TRY(be->linear_backward(m->g_hid, af_g(m, AF_FW), af_g(m, AF_FB), m->g_w, m->hid, af_w(m, AF_FW), B, M, 2));
    QF_TRY(be->linear_backward(m->g_cat, af_g(m, AF_MW), af_g(m, AF_MB), m->g_hid, m->cat, af_w(m, AF_MW), B, 2 * M,
                               M));
    /* v and a reach the output twice: through the weights' MLP and through the weighted sum:
     * [g_v ; g_a]_b += w_b (a [2,1] column) . g_fused_b */
    for (int64_t b = 0; b < B; b++)
        QF_TRY(af_gemm(be, m->g_cat + b * 2 * M, M, m->w + 2 * b, 1, m->g_fused + b * M, 2, M, 1, 1));
    const size_t row = (size_t)M * sizeof(float);
    QF_TRY(be->copy2d(m->g_v, row, m->g_cat, 2 * row, row, (size_t)B));
    QF_TRY(be->copy2d(m->g_a, row, m->g_cat + M, 2 * row, row, (size_t)B));
    QF_TRY(be->linear_backward(m->g_vbar, af_g(m, AF_VW), af_g(m, AF_VB), m->g_v, m->vbar, af_w(m, AF_VW), B,
                               m->cfg.video_dim, M));
    QF_TRY(be->linear_backward(m->g_abar, af_g(m, AF_AW), af_g(m, AF_AB), m->g_a, m->abar, af_w(m, AF_AW), B,
                               m->cfg.audio_dim, M));
    /* the time mean: frame i of item b gets wts[b,i] g_mean_b (0 for a padded frame) */
    for (int mod = 0; mod < 2; mod++) {
        float *gin = mod ? grad_audio : grad_face;
        if (!gin) continue;
        const int64_t t = mod ? m->ta : m->tf, D = mod ? m->cfg.audio_dim : m->cfg.video_dim;
        const float *gm = mod ? m->g_abar : m->g_vbar, *wts = mod ? m->wts_a : m->wts_f;
        float *din = m->on_device ? m->g_in : gin;
        for (int64_t b = 0; b < B; b++)
            QF_TRY(af_gemm(be, din + b * t * D, D, wts + b * t, 1, gm + b * D, t, D, 1, 0));
        if (din != gin) {
            const size_t n = (size_t)(B * t * D) * sizeof(float);
            QF_TRY(be->copy2d(gin, n, din, n, n, 1));
        }
    }
    return QF_OK;
}

qf_status qf_attn_fusion_backward(qf_attn_fusion *m, const float *grad_out, float *grad_audio, float *grad_face) {
    const char *fn = "qf_attn_fusion_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_attn_fusion_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_attn_fusion_forward to differentiate", fn);
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, af_plan_backward(m, NULL), fn));
    af_plan_backward(m, m->bwd);
    QF_TRY(qf_model_device_grads(m->be, m->on_device, &m->dgrads, m->p.grads, m->p.total, &m->grads_on_device, fn));
    qf_status s = af_backward_body(m, grad_out, grad_audio, grad_face);
    if (m->on_device) {
        m->grads_on_device = 1; /* dgrads may have changed, even after a failure; downloaded when shown */
        qf_status s2 = m->be->synchronize(); /* nothing may still run on bwd or the caller's buffers */
        if (s == QF_OK) s = s2;
    }
    return s;
}

qf_status qf_attn_fusion_weights(const qf_attn_fusion *m, float *weights) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_weights: m is NULL");
    if (!weights) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_weights: weights is NULL");
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_weights: no successful forward yet");
    const size_t n = (size_t)(2 * m->B) * sizeof(float);
    QF_TRY(m->be->copy2d(weights, n, m->w, n, n, 1));
    return m->on_device ? m->be->synchronize() : QF_OK;
}

/* Frees what the model holds on a device (the gradients downloaded first) and its planned
 * blocks on either side; the model is a CPU model again. */
static void af_release_device(qf_attn_fusion *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->fwd);
        be->free(m->bwd);
        be->free(m->run_params);
        be->free(m->params_bf16);
        (void)qf_model_sync_grads(be, m->p.grads, m->dgrads, m->p.total, &m->grads_on_device);
        be->free(m->dgrads);
    } else {
        free(m->fwd);
        free(m->bwd);
    }
    m->fwd = m->bwd = m->dgrads = NULL;
    m->fwd_cap = m->bwd_cap = 0;
    m->grads_on_device = 0;
    m->params_bf16 = NULL;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = qf_backend_cpu();
    m->run_params = m->p.params;
}

qf_status qf_attn_fusion_to_device(qf_attn_fusion *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_attn_fusion_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    int cuda = 0;
    QF_TRY(qf_model_check_device(fn, "attention fusion", device, weights, &cuda));
    const qf_backend *be = cuda ? qf_model_cuda_backend() : NULL;
    if (cuda && !be) return qf_fail(QF_ERR_UNSUPPORTED, "%s: this libqfuse has no CUDA backend", fn);
    af_release_device(m);
    if (!cuda) return QF_OK;
    float *dp;
    uint16_t *db;
    QF_TRY(qf_model_upload_params(be, m->p.params, m->p.total, 0, weights, &dp, &db, fn));
    m->be = be;
    m->on_device = 1;
    m->graph.off = qf_model_graphs_off();
    m->run_params = dp;
    m->params_bf16 = db;
    return QF_OK;
}

int qf_attn_fusion_num_params(const qf_attn_fusion *m) { return m ? m->p.np : 0; }

qf_status qf_attn_fusion_param(qf_attn_fusion *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_attn_fusion_param: out is NULL");
    if (i < 0 || i >= m->p.np)
        return qf_fail(QF_ERR_ARG, "qf_attn_fusion_param: index %d is out of range [0, %d)", i, m->p.np);
    QF_TRY(qf_model_sync_grads(m->be, m->p.grads, m->dgrads, m->p.total, &m->grads_on_device));
    return param_view(&m->p, i, out);
}

void qf_attn_fusion_zero_grad(qf_attn_fusion *m) {
    if (!m) return;
    /* on the GPU: queued ahead of the next backward, the host copy refreshed when next shown */
    if (m->dgrads && m->be->zero(m->dgrads, m->p.total * sizeof(float)) == QF_OK) {
        m->grads_on_device = 1;
        return;
    }
    memset(m->p.grads, 0, m->p.total * sizeof(float));
}
