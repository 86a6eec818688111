/* qformer.c - the Q-Former core (transformers' Blip2QFormerModel / InstructBlipQFormerModel, LAVIS
 * BertModel Q-Former): loading by probing the checkpoint's names, forward with instruction-text
 * tokens and a KV prefix, and the cross-attention maps. Backward is in qformer_backward.c; both
 * share qformer_internal.h.
 *
 * Semantics, settled against transformers' modeling_blip_2.py / modeling_instructblip.py (eval):
 *   x = LN([query_embeds ; word_emb(ids) + pos_emb(0..Lt-1)])     ("layernorm" / "embeddings.layernorm")
 *   each layer i:
 *     a = attention.output.LayerNorm(x + dense(MHA(x, x)))   text_attention_mask on text keys
 *     q = a[:, :Lq]; t = a[:, Lq:]
 *     if i % cross_attention_frequency == 0:
 *       q = crossattention.output.LayerNorm(q + dense(MHA(q, [prefix ; enc])))
 *     q = output_query.LayerNorm(q + dense(act(intermediate_query.dense(q))))
 *     t = output.LayerNorm(t + dense(act(intermediate.dense(t))))
 *     x = [q ; t]
 *   MHA(x, y): heads of query(x), key(y), value(y); softmax(q k^T / sqrt(hd) + mask) v. The KV
 *   prefix [B,P,hidden] is split into heads and put before the layer's own K/V; prefix keys are
 *   always attended. transformers adds finfo.min on masked keys: weight 0 after the softmax, the
 *   same as blocking, except for an item whose every encoder key is padding (and no prefix):
 *   there finfo.min swamps the scores and the weights are uniform over the S keys. qfuse gives
 *   that item the mean of V (forward) and autograd's gradient through the uniform softmax
 *   (backward), computed apart from SDPA (which yields zeros for fully masked rows).
 *
 * Invariants:
 *   - Parameters live in one float buffer laid out by ptab (llm.c style) and their gradients in a
 *     parallel buffer at the same offsets; ptab names are transformers names, ptab file_names the
 *     checkpoint's (what qf_qformer_param reports). The per-layer structs hold views into params; the gradient of a view p is
 *     grads + (p - params). Packed projections (plan_params): each self-attention block's
 *     wq|wk|wv are adjacent rows of one [3H, H] matrix (biases one [3H] vector); the wk|wv of
 *     all cross layers are adjacent rows of one [ncross*2H, E] matrix (enc_kv_w, enc_kv_b).
 *   - fwd is a grow-only planned block: a forward with the shapes of an earlier one allocates
 *     nothing. It holds every activation backward needs and copies of the inputs and masks, so
 *     the caller may reuse its buffers after forward.
 *   - have_fwd is set only after a forward fully succeeded.
 *   - Load either fully succeeds or frees everything; every failure names a key or a tensor. */
#include "qformer_internal.h"
#include "ops/gemm_small.h"
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- parameters ---- */

/* Appends a table entry at float offset `at` (the caller lays out where tensors go). */
static qf_status add_param_at(qf_qformer *m, const char *name, int64_t d0, int64_t d1, size_t at) {
    if (m->np == m->np_cap) {
        int cap = m->np_cap ? 2 * m->np_cap : 64;
        qformer_ptab *p = realloc(m->ptab, (size_t)cap * sizeof *p);
        if (!p) return qf_fail(QF_ERR_NOMEM, "qf_qformer_load: cannot grow the parameter table");
        m->ptab = p;
        m->np_cap = cap;
    }
    qformer_ptab *p = &m->ptab[m->np];
    p->name = strdup(name);
    p->file_name = NULL;
    if (!p->name) return qf_fail(QF_ERR_NOMEM, "qf_qformer_load: cannot copy a tensor name");
    m->np++;
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    p->off = at;
    return QF_OK;
}

/* Appends a table entry at *off and moves *off past it (padded to 16 floats). */
static qf_status add_param(qf_qformer *m, const char *name, int64_t d0, int64_t d1, size_t *off) {
    QF_TRY(add_param_at(m, name, d0, d1, *off));
    *off += qf_align_up((size_t)d0 * (size_t)(d1 ? d1 : 1), 16);
    return QF_OK;
}

/* The parameter table in a fixed order; view_params() walks it in the same order. The table
 * order is the checkpoint-facing one (query, key, value each weight then bias), but the buffer
 * layout packs the projections so that fewer, larger GEMMs do the same work (no padding inside
 * a packed group):
 *   - self-attention: query, key, value weights are consecutive rows of one [3H, H] matrix,
 *     their biases one [3H] vector: one GEMM projects all three;
 *   - cross-attention: every cross layer reads the same encoder rows, so the key and value
 *     weights of ALL cross layers are consecutive rows of one [ncross*2H, E] matrix (cross layer
 *     c: rows 2H*c.. key, 2H*c+H.. value) at the front of the buffer, biases one [ncross*2H]
 *     vector: one GEMM per forward projects the encoder for every layer (and backward needs
 *     one weight-gradient GEMM and one encoder-gradient GEMM, which sums the layers itself). */
static qf_status plan_params(qf_qformer *m, size_t *total) {
    const qf_qformer_config *c = &m->cfg;
    const int64_t H = c->hidden_size, E = c->encoder_hidden_size, I = c->intermediate_size;
    size_t off = 0;
    char s[256];
    const char *ln = c->has_text ? "embeddings.layernorm" : "layernorm";
    if (m->ln_embeddings_name) ln = "embeddings.layernorm";
    snprintf(s, sizeof s, "%s.weight", ln);
    QF_TRY(add_param(m, s, H, 0, &off));
    snprintf(s, sizeof s, "%s.bias", ln);
    QF_TRY(add_param(m, s, H, 0, &off));
    if (c->has_text) {
        QF_TRY(add_param(m, "embeddings.word_embeddings.weight", c->vocab_size, H, &off));
        QF_TRY(add_param(m, "embeddings.position_embeddings.weight", c->max_position_embeddings, H, &off));
    }
    const size_t ncross = (size_t)((c->num_hidden_layers + c->cross_attention_frequency - 1) /
                                   c->cross_attention_frequency);
    const size_t kv_w = off, kv_b = kv_w + qf_align_up(ncross * 2 * (size_t)H * (size_t)E, 16);
    off = kv_b + qf_align_up(ncross * 2 * (size_t)H, 16);
    for (int i = 0; i < (int)c->num_hidden_layers; i++) {
#define QP(fmt, arg, d0, d1)                                                                        \
    do {                                                                                            \
        snprintf(s, sizeof s, "encoder.layer.%d." fmt, i, arg);                                     \
        QF_TRY(add_param(m, s, d0, d1, &off));                                                      \
    } while (0)
        for (int x = 0; x < 2; x++) {
            if (x == 1 && i % c->cross_attention_frequency) continue;
            const int64_t kin = x ? E : H;
            const char *blk = x ? "crossattention" : "attention";
            const size_t hh = (size_t)H * (size_t)H, hk = (size_t)H * (size_t)kin;
            const size_t cross_i = (size_t)(i / c->cross_attention_frequency);
            size_t w0, b0, kw, kb; /* query weight and bias; key weight and bias (value follows each) */
            if (!x) {
                w0 = off;
                b0 = w0 + qf_align_up(hh + 2 * hk, 16);
                off = b0 + qf_align_up(3 * (size_t)H, 16);
                kw = w0 + hh;
                kb = b0 + (size_t)H;
            } else {
                w0 = off;
                b0 = w0 + qf_align_up(hh, 16);
                off = b0 + qf_align_up((size_t)H, 16);
                kw = kv_w + cross_i * 2 * hk;
                kb = kv_b + cross_i * 2 * (size_t)H;
            }
#define QPAT(fmt, arg, d0, d1, at)                                                                  \
    do {                                                                                            \
        snprintf(s, sizeof s, "encoder.layer.%d." fmt, i, arg);                                     \
        QF_TRY(add_param_at(m, s, d0, d1, at));                                                     \
    } while (0)
            QPAT("%s.attention.query.weight", blk, H, H, w0);
            QPAT("%s.attention.query.bias", blk, H, 0, b0);
            QPAT("%s.attention.key.weight", blk, H, kin, kw);
            QPAT("%s.attention.key.bias", blk, H, 0, kb);
            QPAT("%s.attention.value.weight", blk, H, kin, kw + hk);
            QPAT("%s.attention.value.bias", blk, H, 0, kb + (size_t)H);
#undef QPAT
            QP("%s.output.dense.weight", blk, H, H);
            QP("%s.output.dense.bias", blk, H, 0);
            QP("%s.output.LayerNorm.weight", blk, H, 0);
            QP("%s.output.LayerNorm.bias", blk, H, 0);
        }
        for (int x = 0; x < (c->has_text ? 2 : 1); x++) {
            const char *sfx = x ? "" : "_query";
            QP("intermediate%s.dense.weight", sfx, I, H);
            QP("intermediate%s.dense.bias", sfx, I, 0);
            QP("output%s.dense.weight", sfx, H, I);
            QP("output%s.dense.bias", sfx, H, 0);
            QP("output%s.LayerNorm.weight", sfx, H, 0);
            QP("output%s.LayerNorm.bias", sfx, H, 0);
        }
#undef QP
    }
    *total = off;
    return QF_OK;
}

static void view_params(qf_qformer *m) {
    int k = 0;
#define NEXT (m->run_params + m->ptab[k++].off)
    m->ln_w = NEXT;
    m->ln_b = NEXT;
    if (m->cfg.has_text) {
        m->word_emb = NEXT;
        m->pos_emb = NEXT;
    }
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        qformer_layer *l = &m->layers[i];
        l->has_cross = i % m->cfg.cross_attention_frequency == 0;
        for (int x = 0; x < 2; x++) {
            if (x == 1 && !l->has_cross) continue;
            qformer_attn *a = x ? &l->cross : &l->self;
            a->wq = NEXT; a->bq = NEXT; a->wk = NEXT; a->bk = NEXT; a->wv = NEXT; a->bv = NEXT;
            a->wo = NEXT; a->bo = NEXT; a->ln_w = NEXT; a->ln_b = NEXT;
        }
        for (int x = 0; x < (m->cfg.has_text ? 2 : 1); x++) {
            qformer_ffn *f = x ? &l->ft : &l->fq;
            f->w_in = NEXT; f->b_in = NEXT; f->w_out = NEXT; f->b_out = NEXT; f->ln_w = NEXT; f->ln_b = NEXT;
        }
    }
#undef NEXT
    m->ncross = qf_qformer_num_cross_layers(m);
    m->enc_kv_w = m->layers[0].cross.wk; /* layer 0 always has cross-attention */
    m->enc_kv_b = m->layers[0].cross.bk;
}

/* transformers name -> the name in a LAVIS (BertModel) checkpoint:
 * "bert." + name, ".attention.attention." -> ".attention.self.", ".crossattention.attention." ->
 * ".crossattention.self.", "(embeddings.)layernorm" -> "embeddings.LayerNorm". */
static void lavis_name(char *dst, size_t cap, const char *name) {
    if (!strncmp(name, "layernorm.", 10)) {
        snprintf(dst, cap, "bert.embeddings.LayerNorm.%s", name + 10);
        return;
    }
    if (!strncmp(name, "embeddings.layernorm.", 21)) {
        snprintf(dst, cap, "bert.embeddings.LayerNorm.%s", name + 21);
        return;
    }
    char buf[256];
    snprintf(buf, sizeof buf, "%s", name);
    char *p = strstr(buf, "attention.attention.");
    if (p) {
        /* "xxxattention.attention.rest" -> "xxxattention.self.rest" */
        char rest[256];
        snprintf(rest, sizeof rest, "%s", p + 20);
        snprintf(p, sizeof buf - (size_t)(p - buf), "attention.self.%s", rest);
    }
    snprintf(dst, cap, "bert.%.240s", buf);
}

static int st_has(const qf_safetensors *st, const char *prefix, const char *name, qf_tensor_view *tv) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    int n = qf_st_count(st);
    for (int i = 0; i < n; i++) {
        qf_tensor_view v;
        if (qf_st_get(st, i, &v) == QF_OK && !strcmp(v.name, full)) {
            if (tv) *tv = v;
            return 1;
        }
    }
    return 0;
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

static qf_status read_config(const qf_config *cfg, const char *p, qf_qformer_config *c, int64_t *pad) {
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
    /* relative position embeddings would change the scores; only "absolute" is accepted */
    snprintf(key, sizeof key, "%sposition_embedding_type", p);
    if (qf_config_has(cfg, key)) {
        const char *pe;
        QF_TRY(qf_config_string(cfg, key, &pe));
        if (strcmp(pe, "absolute"))
            return qf_fail(QF_ERR_UNSUPPORTED, "qf_qformer_load: config key \"%s\" = \"%s\" is not supported "
                                               "(only \"absolute\")", key, pe);
    }
    snprintf(key, sizeof key, "%svocab_size", p);
    QF_TRY(qf_config_int_or(cfg, key, 0, &c->vocab_size));
    snprintf(key, sizeof key, "%smax_position_embeddings", p);
    QF_TRY(qf_config_int_or(cfg, key, 0, &c->max_position_embeddings));
    snprintf(key, sizeof key, "%spad_token_id", p);
    QF_TRY(qf_config_int_or(cfg, key, 0, pad));
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
    int64_t cfg_vocab = 0, cfg_maxpos = 0;
    qf_status s = read_config(cfg, cfg_prefix, &m->cfg, &m->pad_token_id);
    if (s == QF_OK) {
        cfg_vocab = m->cfg.vocab_size;
        cfg_maxpos = m->cfg.max_position_embeddings;
        /* naming scheme and text parts, by probing */
        qf_tensor_view tv;
        m->lavis = st_has(st, tensor_prefix, "bert.embeddings.LayerNorm.weight", NULL);
        m->ln_embeddings_name = !m->lavis && st_has(st, tensor_prefix, "embeddings.layernorm.weight", NULL);
        const char *wname = m->lavis ? "bert.embeddings.word_embeddings.weight" : "embeddings.word_embeddings.weight";
        const char *pname = m->lavis ? "bert.embeddings.position_embeddings.weight"
                                     : "embeddings.position_embeddings.weight";
        m->cfg.has_text = st_has(st, tensor_prefix, wname, &tv);
        if (m->cfg.has_text) {
            if (tv.ndim != 2 || tv.shape[1] != m->cfg.hidden_size)
                s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s%s\" has %d dims (first %lld); expected [vocab_size, %lld]",
                            fn, tensor_prefix, wname, tv.ndim, (long long)(tv.ndim ? tv.shape[0] : 0),
                            (long long)m->cfg.hidden_size);
            else if (cfg_vocab && tv.shape[0] != cfg_vocab)
                s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s%s\" has %lld rows but config vocab_size = %lld", fn,
                            tensor_prefix, wname, (long long)tv.shape[0], (long long)cfg_vocab);
            else
                m->cfg.vocab_size = tv.shape[0];
            if (s == QF_OK && !st_has(st, tensor_prefix, pname, &tv))
                s = qf_fail(QF_ERR_NOT_FOUND, "%s: the checkpoint has \"%s%s\" but no \"%s%s\" (text tokens need both)",
                            fn, tensor_prefix, wname, tensor_prefix, pname);
            if (s == QF_OK) {
                if (tv.ndim != 2 || tv.shape[1] != m->cfg.hidden_size)
                    s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s%s\" must be [max_position_embeddings, %lld]", fn,
                                tensor_prefix, pname, (long long)m->cfg.hidden_size);
                else if (cfg_maxpos && tv.shape[0] != cfg_maxpos)
                    s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s%s\" has %lld rows but config max_position_embeddings = %lld",
                                fn, tensor_prefix, pname, (long long)tv.shape[0], (long long)cfg_maxpos);
                else
                    m->cfg.max_position_embeddings = tv.shape[0];
            }
            if (s == QF_OK && (m->pad_token_id < 0 || m->pad_token_id >= m->cfg.vocab_size))
                m->pad_token_id = -1; /* no padding row */
        } else {
            m->cfg.vocab_size = 0;
            m->cfg.max_position_embeddings = 0;
        }
    }
    if (s == QF_OK) {
        m->hd = m->cfg.hidden_size / m->cfg.num_attention_heads;
        m->layers = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->layers);
        m->acts = calloc((size_t)m->cfg.num_hidden_layers, sizeof *m->acts);
        if (!m->layers || !m->acts) s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the layer tables", fn);
    }
    if (s == QF_OK) s = plan_params(m, &total);
    if (s == QF_OK && (posix_memalign((void **)&m->params, 64, total * sizeof(float)) ||
                       posix_memalign((void **)&m->grads, 64, total * sizeof(float))))
        s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu parameter floats", fn, 2 * total);
    if (s == QF_OK) memset(m->grads, 0, total * sizeof(float));
    for (int i = 0; i < m->np && s == QF_OK; i++) {
        const qformer_ptab *p = &m->ptab[i];
        char name[256], full[512];
        if (m->lavis)
            lavis_name(name, sizeof name, p->name);
        else
            snprintf(name, sizeof name, "%s", p->name);
        snprintf(full, sizeof full, "%s%s", tensor_prefix, name);
        m->ptab[i].file_name = strdup(name);
        if (!m->ptab[i].file_name) {
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot copy a tensor name", fn);
            break;
        }
        s = qf_st_read_f32(st, full, p->ndim, p->shape, m->params + p->off);
        if (s != QF_OK)
            s = qf_fail_prefix(s, "%s (%s Q-Former, %lld layers, hidden %lld, encoder_hidden %lld, "
                                  "cross-attention every %lld, %s)", fn, m->lavis ? "LAVIS" : "transformers",
                               (long long)m->cfg.num_hidden_layers, (long long)m->cfg.hidden_size,
                               (long long)m->cfg.encoder_hidden_size, (long long)m->cfg.cross_attention_frequency,
                               m->cfg.has_text ? "with text embeddings" : "no text embeddings");
    }
    if (s != QF_OK) {
        qf_qformer_free(m);
        return s;
    }
    m->params_total = total;
    m->be = qf_backend_cpu();
    m->run_params = m->params;
    view_params(m);
    *out = m;
    return QF_OK;
}

/* In a whole BLIP-2 / InstructBLIP checkpoint only the Q-Former's tensors are gathered. */
static int want_qformer_tensor(const char *name) {
    return !strncmp(name, "qformer.", 8) || !strcmp(name, "query_tokens");
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
        if (!strcmp(mt, "blip-2") || !strcmp(mt, "instructblip")) {
            cfg_prefix = "qformer_config.";
            tensor_prefix = "qformer.";
        } else if (strcmp(mt, "blip_2_qformer") && strcmp(mt, "instructblip_qformer")) {
            s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: model_type \"%s\" is not a Q-Former (expected "
                                            "\"blip_2_qformer\", \"instructblip_qformer\", \"blip-2\" or "
                                            "\"instructblip\")", fn, path, mt);
        }
    }
    qf_safetensors *st = NULL;
    if (s == QF_OK) {
        s = qf_open_checkpoint(folder, *tensor_prefix ? want_qformer_tensor : NULL, &st);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", fn);
    }
    if (s == QF_OK) {
        s = qf_qformer_load_parts(cfg, cfg_prefix, st, tensor_prefix, out);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s", path);
    }
    qf_st_close(st);
    qf_config_free(cfg);
    return s;
}

static void release_forward(qf_qformer *m);

void qf_qformer_free(qf_qformer *m) {
    if (!m) return;
    /* device memory first, while the host blocks still exist (release_forward may write grads);
     * gradients still on the device are dropped with the model, not downloaded */
    m->grads_on_device = 0;
    release_forward(m);
    for (int i = 0; i < m->np; i++) {
        free(m->ptab[i].name);
        free(m->ptab[i].file_name);
    }
    free(m->ptab);
    free(m->params);
    free(m->grads);
    free(m->layers);
    free(m->acts);
    free(m);
}

/* ---- placement ---- */

/* Frees the planned forward blocks and everything the model holds on a device; the model is
 * then a CPU model again (views rebased onto params). */
static void release_forward(qf_qformer *m) {
    if (m->on_device) {
        const qf_backend *be = m->be;
        qf_model_graph_drop(be, &m->graph);
        be->free(m->fwd);
        be->free(m->mir);
        free(m->hmir);
        be->free(m->run_params);
        be->free(m->params_bf16);
        be->free(m->bwd);
        (void)qf_qformer_sync_grads(m); /* grads keeps the newest gradients */
        be->free(m->dgrads);
    } else {
        free(m->fwd);
        free(m->mir);
        free(m->bwd);
    }
    m->fwd = NULL;
    m->bwd = m->dgrads = NULL;
    m->grads_on_device = 0;
    m->bwd_cap = 0;
    m->mir = m->hmir = NULL;
    m->params_bf16 = NULL;
    m->fwd_cap = m->mir_cap = 0;
    m->on_device = 0;
    m->have_fwd = 0;
    m->be = qf_backend_cpu();
    m->run_params = m->params;
}

qf_status qf_qformer_to_device(qf_qformer *m, const char *device, qf_dtype weights) {
    const char *fn = "qf_qformer_to_device";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    int cuda;
    QF_TRY(qf_model_check_device(fn, "Q-Former", device, weights, &cuda)); /* a failure leaves m as it was */
    release_forward(m);
    view_params(m);
    if (!cuda) return QF_OK;
    const qf_backend *be = qf_model_cuda_backend();
    float *dp;
    uint16_t *db;
    QF_TRY(qf_model_upload_params(be, m->params, m->params_total, 0, weights, &dp, &db, fn));
    m->be = be;
    m->on_device = 1;
    m->graph.off = qf_model_graphs_off();
    m->run_params = dp;
    m->params_bf16 = db;
    view_params(m);
    return QF_OK;
}

qf_status qf_qformer_get_config(const qf_qformer *m, qf_qformer_config *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_qformer_get_config: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_qformer_get_config: out is NULL");
    *out = m->cfg;
    return QF_OK;
}

int qf_qformer_num_params(const qf_qformer *m) { return m ? m->np : 0; }

static void fill_param(qf_qformer *m, int i, qf_param *out) {
    const qformer_ptab *p = &m->ptab[i];
    out->name = p->file_name ? p->file_name : p->name;
    out->data = m->params + p->off;
    out->grad = m->frozen ? NULL : m->grads + p->off;
    out->ndim = p->ndim;
    out->shape[0] = p->shape[0];
    out->shape[1] = p->ndim == 2 ? p->shape[1] : 0;
    out->shape[2] = out->shape[3] = 0;
}

qf_status qf_qformer_sync_grads(qf_qformer *m) {
    return qf_model_sync_grads(m->be, m->grads, m->dgrads, m->params_total, &m->grads_on_device);
}

qf_status qf_qformer_param(qf_qformer *m, int i, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_qformer_param: m is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_qformer_param: out is NULL");
    if (i < 0 || i >= m->np)
        return qf_fail(QF_ERR_ARG, "qf_qformer_param: index %d is out of range (the model has %d parameters)", i,
                       m->np);
    QF_TRY(qf_qformer_sync_grads(m));
    fill_param(m, i, out);
    return QF_OK;
}

qf_status qf_qformer_find_param(qf_qformer *m, const char *name, qf_param *out) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_qformer_find_param: m is NULL");
    if (!name) return qf_fail(QF_ERR_ARG, "qf_qformer_find_param: name is NULL");
    if (!out) return qf_fail(QF_ERR_ARG, "qf_qformer_find_param: out is NULL");
    for (int i = 0; i < m->np; i++)
        if (!strcmp(m->ptab[i].name, name) || (m->ptab[i].file_name && !strcmp(m->ptab[i].file_name, name))) {
            QF_TRY(qf_qformer_sync_grads(m));
            fill_param(m, i, out);
            return QF_OK;
        }
    return qf_fail(QF_ERR_NOT_FOUND, "qf_qformer_find_param: the Q-Former has no parameter \"%s\" (names are "
                                     "the checkpoint's or transformers', e.g. \"encoder.layer.0.attention.attention.query.weight\")",
                   name);
}

void qf_qformer_zero_grad(qf_qformer *m) {
    if (!m) return;
    if (m->dgrads) {
        /* queued on the device's stream, ahead of the next backward (a failure there is reported
         * by the next call that waits); the host copy is refreshed when next shown */
        if (m->be->zero(m->dgrads, m->params_total * sizeof(float)) == QF_OK) {
            m->grads_on_device = 1;
            return;
        }
    }
    if (m->grads) memset(m->grads, 0, m->params_total * sizeof(float));
}

void qf_qformer_set_frozen(qf_qformer *m, int frozen) {
    if (m) m->frozen = frozen ? 1 : 0;
}

int qf_qformer_num_cross_layers(const qf_qformer *m) {
    if (!m) return 0;
    const int64_t f = m->cfg.cross_attention_frequency;
    return (int)((m->cfg.num_hidden_layers + f - 1) / f);
}

/* ---- planned buffers ---- */

float *qf_qformer_carve(float *base, size_t *off, size_t n) {
    float *p = base ? base + *off : NULL;
    *off += qf_align_up(n ? n : 1, 16);
    return p;
}
#define carve qf_qformer_carve

/* n bf16 values from the float block (rounded up to whole floats; 64-byte aligned as carve) */
static uint16_t *carve16(float *base, size_t *off, size_t n) { return (uint16_t *)carve(base, off, (n + 1) / 2); }

/* strided_self: a self-attention block that runs strided (qf_qformer_strided): qh holds its
 * packed [rows, 3H] q|k|v projection (kept for backward), no heads */
static void carve_attn(attn_acts *t, float *base, size_t *off, size_t rows, size_t kv_rows, size_t H, size_t nh,
                       int strided_self) {
    t->qh = carve(base, off, rows * H * (strided_self ? 3 : 1));
    t->kh = strided_self ? NULL : carve(base, off, kv_rows * H);
    t->vh = strided_self ? NULL : carve(base, off, kv_rows * H);
    t->oh = strided_self ? NULL : carve(base, off, rows * H);
    t->lse = carve(base, off, rows * nh);
    t->merged = carve(base, off, rows * H);
    t->sum = carve(base, off, rows * H);
    t->mean = carve(base, off, rows);
    t->rstd = carve(base, off, rows);
    t->out = carve(base, off, rows * H);
}

static void carve_ffn(ffn_acts *f, float *base, size_t *off, size_t rows, size_t H, size_t I) {
    f->pre = carve(base, off, rows * I);
    f->act = carve(base, off, rows * I);
    f->sum = carve(base, off, rows * H);
    f->mean = carve(base, off, rows);
    f->rstd = carve(base, off, rows);
    f->out = carve(base, off, rows * H);
}

/* Lays out every forward buffer for the shapes in m (B, Lq, Lt, S, P); base NULL only counts. */
static size_t plan_forward(qf_qformer *m, float *base) {
    const size_t H = (size_t)m->cfg.hidden_size, E = (size_t)m->cfg.encoder_hidden_size;
    const size_t I = (size_t)m->cfg.intermediate_size, nh = (size_t)m->cfg.num_attention_heads;
    const size_t B = (size_t)m->B, N = (size_t)(m->Lq + m->Lt), P = (size_t)m->P;
    const size_t T = B * N, Tq = B * (size_t)m->Lq, Tt = B * (size_t)m->Lt, Te = B * (size_t)m->S;
    const size_t Tkv = B * (P + (size_t)m->S);
    size_t off = 0;
    m->x_in = carve(base, &off, T * H);
    m->qin = m->Lt ? carve(base, &off, Tq * H) : m->x_in;
    m->txt = m->Lt ? carve(base, &off, Tt * H) : NULL;
    m->enc = carve(base, &off, Te * E);
    m->pk = carve(base, &off, B * P * H);
    m->pv = carve(base, &off, B * P * H);
    m->emb_mean = carve(base, &off, T);
    m->emb_rstd = carve(base, &off, T);
    m->emb = carve(base, &off, T * H);
    m->tmp = carve(base, &off, 3 * T * H);                    /* packed q|k|v rows */
    m->enc_kv = carve(base, &off, Te * 2 * H * (size_t)m->ncross); /* every cross layer's k|v rows */
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        layer_acts *a = &m->acts[i];
        memset(a, 0, sizeof *a);
        carve_attn(&a->self, base, &off, T, T, H, nh, m->be->sdpa_strided);
        if (m->Lt) {
            a->aq = carve(base, &off, Tq * H);
            a->at = carve(base, &off, Tt * H);
        }
        if (m->layers[i].has_cross) carve_attn(&a->cross, base, &off, Tq, Tkv, H, nh, 0);
        carve_ffn(&a->fq, base, &off, Tq, H, I);
        if (m->Lt) {
            carve_ffn(&a->ft, base, &off, Tt, H, I);
            a->out = carve(base, &off, T * H);
        }
        if (base) {
            if (!m->Lt) {
                a->aq = a->self.out;
                a->out = a->fq.out;
            }
        }
    }
    /* the bf16 activations (qf_qformer_act16), carved after the float32 ones */
    const int p16 = qf_qformer_plan16(m);
    m->emb16 = p16 ? carve16(base, &off, T * H) : NULL;
    m->enc_kv16 = p16 ? carve16(base, &off, Te * 2 * H * (size_t)m->ncross) : NULL;
    m->enc16 = p16 ? carve16(base, &off, Te * E) : NULL;
    for (int64_t i = 0; p16 && i < m->cfg.num_hidden_layers; i++) {
        layer_acts *a = &m->acts[i];
        attn_acts *blocks[2] = {&a->self, m->layers[i].has_cross ? &a->cross : NULL};
        for (int c = 0; c < 2; c++) {
            if (!blocks[c]) continue;
            const size_t rows = c ? Tq : T;
            blocks[c]->proj16 = carve16(base, &off, rows * H * (c ? 1 : 3));
            blocks[c]->merged16 = carve16(base, &off, rows * H);
            blocks[c]->out16 = carve16(base, &off, rows * H);
        }
        a->fq.act16 = carve16(base, &off, Tq * I);
        a->fq.out16 = carve16(base, &off, Tq * H);
    }
    return off;
}

/* The small-integer block mir: [screen int64 x4][ids int32 Tt][self_mask T][cross_mask B(P+S)]
 * [dead B]; base NULL only counts (bytes). */
static size_t plan_mirror(qf_qformer *m, char *base) {
    const size_t B = (size_t)m->B, T = B * (size_t)(m->Lq + m->Lt), Tt = B * (size_t)m->Lt;
    const size_t Tkv = B * (size_t)(m->P + m->S);
    size_t off = 0;
#define MCARVE(type, field, n)                                                                      \
    do {                                                                                            \
        if (base) m->field = (type *)(base + off);                                                  \
        off += qf_align_up((n) * sizeof(type), 64);                                                 \
    } while (0)
    MCARVE(int64_t, screen, 4);
    MCARVE(int32_t, ids, Tt ? Tt : 1);
    MCARVE(uint8_t, self_mask, T);
    MCARVE(uint8_t, cross_mask, Tkv);
    MCARVE(uint8_t, dead, B);
#undef MCARVE
    return off;
}

/* Grows m's planned blocks for the shapes in m, on its backend, and points the activations into
 * them. A reallocation on the GPU drops the captured graph (it holds the old addresses). */
static qf_status plan(qf_qformer *m, const char *fn) {
    const size_t need = plan_forward(m, NULL), mir = plan_mirror(m, NULL);
    if (!m->on_device) {
        QF_TRY(qf_model_grow(NULL, &m->fwd, &m->fwd_cap, need, fn));
        if (mir > m->mir_cap) {
            void *p = NULL;
            if (posix_memalign(&p, 64, mir)) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of masks", fn, mir);
            free(m->mir);
            m->mir = m->hmir = p;
            m->mir_cap = mir;
        }
    } else {
        const qf_backend *be = m->be;
        if (need > m->fwd_cap || mir > m->mir_cap) qf_model_graph_drop(be, &m->graph);
        if (need > m->fwd_cap) {
            be->free(m->fwd);
            m->fwd = NULL;
            m->fwd_cap = 0;
            QF_TRY(be->alloc((void **)&m->fwd, need * sizeof(float)));
            m->fwd_cap = need;
        }
        if (mir > m->mir_cap) {
            be->free(m->mir);
            free(m->hmir);
            m->mir = m->hmir = NULL;
            m->mir_cap = 0;
            if (posix_memalign(&m->hmir, 64, mir))
                return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of masks", fn, mir);
            QF_TRY(be->alloc(&m->mir, mir));
            m->mir_cap = mir;
        }
    }
    plan_forward(m, m->fwd);
    plan_mirror(m, m->mir);
    m->mir_bytes = mir;
    return QF_OK;
}

/* bytes from src to dst on the model's backend (either may be host memory on the GPU) */
qf_status qf_qformer_copy(const qf_qformer *m, void *dst, const void *src, size_t bytes) {
    return m->be->copy2d(dst, bytes, src, bytes, bytes, 1);
}

qf_status qf_qformer_rows_gather(const qf_qformer *m, float *dst, const float *src, int64_t tot, int64_t r0,
                                 int64_t len, int64_t C) {
    const size_t w = (size_t)(len * C) * sizeof(float);
    return m->be->copy2d(dst, w, src + r0 * C, (size_t)(tot * C) * sizeof(float), w, (size_t)m->B);
}

qf_status qf_qformer_rows_scatter(const qf_qformer *m, float *dst, const float *src, int64_t tot, int64_t r0,
                                  int64_t len, int64_t C) {
    const size_t w = (size_t)(len * C) * sizeof(float);
    return m->be->copy2d(dst + r0 * C, (size_t)(tot * C) * sizeof(float), src, w, w, (size_t)m->B);
}

/* The SDPA call of a block: self-attention over N tokens (text mask when given) or
 * cross-attention of the Lq queries over P+S keys (encoder mask, prefix always attended). */
qf_sdpa_params qf_qformer_sdpa_params(const qf_qformer *m, int cross) {
    const int64_t B = m->B, nh = m->cfg.num_attention_heads;
    const int64_t L = cross ? m->Lq : m->Lq + m->Lt, S = cross ? m->P + m->S : m->Lq + m->Lt;
    qf_sdpa_params sp = qf_sdpa_defaults(B, nh, nh, L, S, m->hd);
    const int masked = cross ? m->has_enc_mask : m->has_text_mask;
    if (masked) {
        sp.mask.kind = QF_MASK_BOOL;
        sp.mask.data = cross ? m->cross_mask : m->self_mask;
        sp.mask.ndim = 4;
        sp.mask.shape[0] = B;
        sp.mask.shape[1] = 1;
        sp.mask.shape[2] = 1;
        sp.mask.shape[3] = S;
    }
    return sp;
}

/* out = in · wᵀ + b (+ res: a projection and its residual connection in one sweep over out) on
 * the model's backend; with bf16 weights the GEMM reads w's bfloat16 copy. */
static qf_status linear(const qf_qformer *m, float *out, const float *in, const float *w, const float *b,
                        const float *res, int64_t rows, int64_t Cin, int64_t Cout) {
    const uint16_t *w16 = m->params_bf16 ? m->params_bf16 + (w - m->run_params) : NULL;
    return qf_model_linear(m->be, out, in, w, w16, b, res, rows, Cin, Cout);
}

/* linear with bf16 activations (qf_qformer_act16): reads in16 when given, writes out16 instead
 * of out when given */
static qf_status linear_x16(const qf_qformer *m, float *out, uint16_t *out16, const float *in, const uint16_t *in16,
                            const float *w, const float *b, const float *res, int64_t rows, int64_t Cin, int64_t Cout) {
    const uint16_t *b16 = b ? m->params_bf16 + (b - m->run_params) : NULL;
    return qf_model_linear_x16(m->be, out, out16, in, in16, w, m->params_bf16 + (w - m->run_params), b, b16, res,
                               rows, Cin, Cout);
}

/* out = LN(x); with out16 also bf16(out) */
static qf_status layernorm(const qf_qformer *m, float *out, uint16_t *out16, float *mean, float *rstd, const float *x,
                           const float *w, const float *b, int64_t rows) {
    const int64_t H = m->cfg.hidden_size;
    const float eps = (float)m->cfg.layer_norm_eps;
    if (out16) return m->be->layernorm_forward_x16(out, out16, mean, rstd, x, w, b, rows, H, eps);
    return m->be->layernorm_forward(out, mean, rstd, x, w, b, rows, H, eps);
}

/* One attention block: t->out = LN(x + dense(MHA(x, [prefix ; kv]))). x has Lx tokens per item.
 * Self-attention projects x itself (kv unused); cross-attention reads its keys and values,
 * already projected but without their biases (added here), from kv: kv_len rows per item of
 * [k | v] with row stride kv_ld floats. */
/* The same block on a backend whose SDPA reads strided views (the GPU): the heads are read in
 * place from the packed projection rows (q|k|v of self-attention, the encoder's k|v with their
 * biases already added by the enc_kv GEMM) and the output is written merged, so no head is
 * split or merged. Not for a prefix (its keys come first) or an all-padding item. */
/* With bf16 activations (x16 given: qf_qformer_act16) the projection, keys and values (kv16) and
 * the attention output are bf16 and x16 = bf16(x) feeds the projection; the block writes t->out
 * and t->out16. */
static qf_status attention_block_strided(qf_qformer *m, const qformer_attn *w, attn_acts *t, const float *x,
                                         const uint16_t *x16, int64_t Lx, const float *kv, const uint16_t *kv16,
                                         int64_t kv_len, int64_t kv_ld, int cross) {
    const qf_backend *be = m->be;
    const int64_t B = m->B, H = m->cfg.hidden_size, hd = m->hd, T = B * Lx;
    const int64_t qld = cross ? H : 3 * H;
    float *proj = t->qh; /* this block's own buffer: backward reads the projection again */
    if (x16) QF_TRY(linear_x16(m, NULL, t->proj16, x, x16, w->wq, w->bq, NULL, T, H, qld));
    else QF_TRY(linear(m, proj, x, w->wq, w->bq, NULL, T, H, qld));
    const float *k = cross ? kv : proj + H, *v = cross ? kv + H : proj + 2 * H;
    const int64_t kld = cross ? kv_ld : 3 * H;
    qf_sdpa_params sp = qf_qformer_sdpa_params(m, cross);
    sp.check_finite = 0;
    qf_sdpa_problem pr;
    qf_status s = qf_sdpa_resolve(&sp, &pr);
    if (s == QF_OK) {
        pr.strided = 1;
        pr.q_sb = Lx * qld, pr.q_sh = hd, pr.q_si = qld;
        pr.k_sb = pr.v_sb = kv_len * kld, pr.k_sh = pr.v_sh = hd, pr.k_si = pr.v_si = kld;
        pr.o_sb = Lx * H, pr.o_sh = hd, pr.o_si = H;
        if (x16) {
            const uint16_t *k16 = cross ? kv16 : t->proj16 + H, *v16 = cross ? kv16 + H : t->proj16 + 2 * H;
            s = be->sdpa_forward_x16(&pr, t->proj16, k16, v16, t->merged16, NULL);
        } else {
            s = be->sdpa_forward(&pr, proj, k, v, t->merged, t->lse, NULL);
        }
    }
    if (s != QF_OK) return qf_fail_prefix(s, "qf_qformer_forward (%s-attention)", cross ? "cross" : "self");
    if (x16) QF_TRY(linear_x16(m, t->sum, NULL, NULL, t->merged16, w->wo, w->bo, x, T, H, H));
    else QF_TRY(linear(m, t->sum, t->merged, w->wo, w->bo, x, T, H, H));
    return layernorm(m, t->out, x16 ? t->out16 : NULL, t->mean, t->rstd, t->sum, w->ln_w, w->ln_b, T);
}

/* 1 when run_layers adds the encoder k|v biases in the enc_kv GEMM (backends with strided SDPA);
 * else they are added as the heads are split (one write of enc_kv on the CPU) */
static int kv_bias_in_gemm(const qf_qformer *m) { return m->be->sdpa_strided; }

static qf_status attention_block(qf_qformer *m, const qformer_attn *w, attn_acts *t, const float *x,
                                 const uint16_t *x16, int64_t Lx, const float *kv, const uint16_t *kv16, int64_t kv_len,
                                 int64_t kv_ld, int cross) {
    const char *fn = "qf_qformer_forward";
    const qf_backend *be = m->be;
    const int64_t B = m->B, H = m->cfg.hidden_size, nh = m->cfg.num_attention_heads, hd = m->hd;
    const int64_t P = cross ? m->P : 0, tot = P + kv_len, T = B * Lx;
    if (qf_qformer_strided(m, cross))
        return attention_block_strided(m, w, t, x, x16, Lx, kv, kv16, kv_len, kv_ld, cross);
    if (!cross) {
        /* one GEMM with the packed [3H, H] weight: rows of tmp are [q | k | v] */
        QF_PROF(QFP_QKV, QF_TRY(linear(m, m->tmp, x, w->wq, w->bq, NULL, T, H, 3 * H)));
        QF_PROF(QFP_HEADS, {
            QF_TRY(be->split_heads(t->qh, m->tmp, 3 * H, NULL, B, nh, Lx, 0, Lx, hd));
            QF_TRY(be->split_heads(t->kh, m->tmp + H, 3 * H, NULL, B, nh, tot, 0, kv_len, hd));
            QF_TRY(be->split_heads(t->vh, m->tmp + 2 * H, 3 * H, NULL, B, nh, tot, 0, kv_len, hd));
        });
    } else {
        QF_PROF(QFP_QKV, QF_TRY(linear(m, m->tmp, x, w->wq, w->bq, NULL, T, H, H)));
        QF_PROF(QFP_HEADS, {
            QF_TRY(be->split_heads(t->qh, m->tmp, H, NULL, B, nh, Lx, 0, Lx, hd));
            const int biased = kv_bias_in_gemm(m);
            QF_TRY(be->split_heads(t->kh, kv, kv_ld, biased ? NULL : w->bk, B, nh, tot, P, kv_len, hd));
            QF_TRY(be->split_heads(t->vh, kv + H, kv_ld, biased ? NULL : w->bv, B, nh, tot, P, kv_len, hd));
        });
        if (P) {
            QF_TRY(be->split_heads(t->kh, m->pk, H, NULL, B, nh, tot, 0, P, hd));
            QF_TRY(be->split_heads(t->vh, m->pv, H, NULL, B, nh, tot, 0, P, hd));
        }
    }
    /* the inputs were screened on entry; the kernels do not screen again */
    qf_sdpa_params sp = qf_qformer_sdpa_params(m, cross);
    sp.check_finite = 0;
    qf_sdpa_problem pr;
    qf_status s = qf_sdpa_resolve(&sp, &pr);
    if (s == QF_OK) QF_PROF(QFP_SDPA, s = be->sdpa_forward(&pr, t->qh, t->kh, t->vh, t->oh, t->lse, NULL));
    if (s != QF_OK) return qf_fail_prefix(s, "%s (%s-attention)", fn, cross ? "cross" : "self");
    /* all-padding items: uniform weights over all keys, as transformers' finfo.min gives */
    if (cross && m->any_dead) QF_TRY(be->dead_rows_mean(t->oh, t->vh, m->dead, B, nh, Lx, tot, hd));
    QF_PROF(QFP_HEADS, QF_TRY(be->merge_heads(t->merged, H, t->oh, B, nh, Lx, 0, Lx, hd, 0)));
    QF_PROF(QFP_OUT_RES, QF_TRY(linear(m, t->sum, t->merged, w->wo, w->bo, x, T, H, H)));
    QF_PROF(QFP_LN, QF_TRY(be->layernorm_forward(t->out, t->mean, t->rstd, t->sum, w->ln_w, w->ln_b, T, H,
                                                 (float)m->cfg.layer_norm_eps)));
    return QF_OK;
}

/* x16 given (qf_qformer_act16): x16 = bf16(x) feeds the first GEMM, which writes its output in
 * bf16 (act16) for GELU to rewrite in place, and the block also writes f->out16 */
static qf_status ffn_block(qf_qformer *m, const qformer_ffn *w, ffn_acts *f, const float *x, const uint16_t *x16,
                           int64_t rows) {
    const qf_backend *be = m->be;
    const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
    if (x16) {
        QF_TRY(linear_x16(m, NULL, f->act16, x, x16, w->w_in, w->b_in, NULL, rows, H, I));
        QF_TRY(be->gelu_forward_x16(f->act16, f->act16, rows * I, m->cfg.hidden_act));
        QF_TRY(linear_x16(m, f->sum, NULL, NULL, f->act16, w->w_out, w->b_out, x, rows, I, H));
        return layernorm(m, f->out, f->out16, f->mean, f->rstd, f->sum, w->ln_w, w->ln_b, rows);
    }
    QF_PROF(QFP_FFN_UP, QF_TRY(linear(m, f->pre, x, w->w_in, w->b_in, NULL, rows, H, I)));
    QF_PROF(QFP_GELU, QF_TRY(be->gelu_forward(f->act, f->pre, rows * I, m->cfg.hidden_act)));
    QF_PROF(QFP_FFN_DOWN_RES, QF_TRY(linear(m, f->sum, f->act, w->w_out, w->b_out, x, rows, I, H)));
    QF_PROF(QFP_LN, QF_TRY(be->layernorm_forward(f->out, f->mean, f->rstd, f->sum, w->ln_w, w->ln_b, rows, H,
                                                 (float)m->cfg.layer_norm_eps)));
    return QF_OK;
}

/* The forward after its inputs are in place (qin, enc, pk, pv, mir): every call on m->be and
 * nothing else, so that on the GPU the whole of it can be captured as one graph. Leaves the
 * output in the last layer's out. */
static qf_status run_layers(qf_qformer *m) {
    const qf_backend *be = m->be;
    const int64_t B = m->B, Lq = m->Lq, Lt = m->Lt, S = m->S, N = Lq + Lt;
    const int64_t H = m->cfg.hidden_size, E = m->cfg.encoder_hidden_size, T = B * N, Tq = B * Lq, Tt = B * Lt;
    if (Lt) { /* x_in = [queries ; word(ids) + pos(0..Lt-1)] per item */
        QF_TRY(be->embedding_forward(m->txt, m->ids, m->word_emb, m->pos_emb, Lt, Tt, H));
        QF_TRY(qf_qformer_rows_scatter(m, m->x_in, m->qin, N, 0, Lq, H));
        QF_TRY(qf_qformer_rows_scatter(m, m->x_in, m->txt, N, Lq, Lt, H));
    }
    /* keys and values of every cross layer: one GEMM over the encoder rows (plan_params); the
     * biases are added as the heads are split (attention_block), so the GEMM writes once */
    const int a16 = qf_qformer_act16(m); /* bf16 activations: every x16 below is non-NULL */
    if (a16) /* from the input's bf16 copy when the forward staged one, else converted in the GEMM */
        QF_TRY(linear_x16(m, NULL, m->enc_kv16, m->enc, m->enc16_staged ? m->enc16 : NULL, m->enc_kv_w, m->enc_kv_b,
                          NULL, B * S, E, 2 * H * m->ncross));
    else
        QF_PROF(QFP_ENC_KV, QF_TRY(linear(m, m->enc_kv, m->enc, m->enc_kv_w, kv_bias_in_gemm(m) ? m->enc_kv_b : NULL,
                                          NULL, B * S, E, 2 * H * m->ncross)));
    QF_PROF(QFP_LN, QF_TRY(layernorm(m, m->emb, a16 ? m->emb16 : NULL, m->emb_mean, m->emb_rstd, m->x_in, m->ln_w,
                                     m->ln_b, T)));
    const float *h = m->emb;
    const uint16_t *h16 = a16 ? m->emb16 : NULL;
    for (int64_t i = 0; i < m->cfg.num_hidden_layers; i++) {
        const qformer_layer *l = &m->layers[i];
        layer_acts *t = &m->acts[i];
        QF_TRY(attention_block(m, &l->self, &t->self, h, h16, N, NULL, NULL, N, 0, 0));
        if (Lt) {
            QF_TRY(qf_qformer_rows_gather(m, t->aq, t->self.out, N, 0, Lq, H));
            QF_TRY(qf_qformer_rows_gather(m, t->at, t->self.out, N, Lq, Lt, H));
        }
        const float *q = t->aq; /* == self.out: a16 implies Lt == 0 */
        const uint16_t *q16 = a16 ? t->self.out16 : NULL;
        if (l->has_cross) {
            const int64_t c = i / m->cfg.cross_attention_frequency, kv_ld = 2 * H * m->ncross;
            QF_TRY(attention_block(m, &l->cross, &t->cross, q, q16, Lq, m->enc_kv + c * 2 * H,
                                   a16 ? m->enc_kv16 + c * 2 * H : NULL, S, kv_ld, 1));
            q = t->cross.out;
            q16 = a16 ? t->cross.out16 : NULL;
        }
        QF_TRY(ffn_block(m, &l->fq, &t->fq, q, q16, Tq));
        h16 = a16 ? t->fq.out16 : NULL;
        if (Lt) {
            QF_TRY(ffn_block(m, &l->ft, &t->ft, t->at, NULL, Tt));
            QF_TRY(qf_qformer_rows_scatter(m, t->out, t->fq.out, N, 0, Lq, H));
            QF_TRY(qf_qformer_rows_scatter(m, t->out, t->ft.out, N, Lq, Lt, H));
        }
        h = t->out;
    }
    return QF_OK;
}

static qf_status run_layers_body(void *m) { return run_layers(m); }

qf_status qf_qformer_run(qf_qformer *m) { return run_layers(m); }

const float *qf_qformer_result(const qf_qformer *m) {
    return m->cfg.num_hidden_layers ? m->acts[m->cfg.num_hidden_layers - 1].out : m->emb;
}

void qf_qformer_key(const qf_qformer *m, int64_t key[6]) {
    key[0] = m->Lq;
    key[1] = m->Lt;
    key[2] = m->P;
    key[3] = m->has_enc_mask;
    key[4] = m->has_text_mask;
    key[5] = m->any_dead;
}

/* The NaN/Inf screen's verdict on the inputs (screen[] read on the host): which one, where, what. */
static qf_status report_screen(qf_qformer *m, const char *fn, const int64_t *screen) {
    static const char *const names[4] = {"query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v"};
    const float *bufs[4] = {m->qin, m->enc_src, m->pk, m->pv};
    for (int i = 0; i < 4; i++) {
        if (screen[i] == INT64_MAX) continue;
        float v = NAN;
        (void)qf_qformer_copy(m, &v, bufs[i] + screen[i], sizeof v);
        return qf_fail(QF_ERR_NONFINITE, "%s: %s[%lld] = %g is not finite", fn, names[i], (long long)screen[i],
                       (double)v);
    }
    return QF_OK;
}

qf_status qf_qformer_stage(qf_qformer *m, const qf_qformer_args *a, const char *fn) {
    m->have_fwd = 0;
    const int64_t B = a->B, Lq = a->num_queries, S = a->encoder_len, Lt = a->text_len, P = a->prefix_len;
    if (B < 1 || Lq < 1 || S < 1)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, num_queries = %lld, encoder_len = %lld; each must be >= 1", fn,
                       (long long)B, (long long)Lq, (long long)S);
    if (Lt < 0 || P < 0)
        return qf_fail(QF_ERR_ARG, "%s: text_len = %lld, prefix_len = %lld; each must be >= 0", fn, (long long)Lt,
                       (long long)P);
    if (B > (1 << 24) || Lq > (1 << 24) || S > (1 << 24) || Lt > (1 << 24) || P > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: B, num_queries, encoder_len, text_len, prefix_len above 2^24 are not supported",
                       fn);
    if (Lt) {
        if (!m->cfg.has_text)
            return qf_fail(QF_ERR_ARG, "%s: text_len = %lld but this Q-Former has no word/position embeddings "
                                       "(a BLIP-2-style checkpoint takes query tokens only)", fn, (long long)Lt);
        if (!a->text_ids) return qf_fail(QF_ERR_ARG, "%s: text_len = %lld but text_ids is NULL", fn, (long long)Lt);
        if (Lt > m->cfg.max_position_embeddings)
            return qf_fail(QF_ERR_ARG, "%s: text_len = %lld exceeds max_position_embeddings = %lld", fn,
                           (long long)Lt, (long long)m->cfg.max_position_embeddings);
        for (int64_t i = 0; i < B * Lt; i++)
            if (a->text_ids[i] < 0 || a->text_ids[i] >= m->cfg.vocab_size)
                return qf_fail(QF_ERR_ARG, "%s: text_ids[%lld][%lld] = %d is out of range [0, %lld) (vocab_size)", fn,
                               (long long)(i / Lt), (long long)(i % Lt), (int)a->text_ids[i],
                               (long long)m->cfg.vocab_size);
    }
    if (P && (!a->prefix_k || !a->prefix_v))
        return qf_fail(QF_ERR_ARG, "%s: prefix_len = %lld but prefix_%s is NULL", fn, (long long)P,
                       a->prefix_k ? "v" : "k");
    const int64_t N = Lq + Lt, Tt = B * Lt;

    m->B = B;
    m->Lq = Lq;
    m->Lt = Lt;
    m->S = S;
    m->P = P;
    m->has_enc_mask = a->encoder_attention_mask != NULL;
    m->has_text_mask = Lt && a->text_attention_mask != NULL;
    m->enc16_staged = 0;
    m->enc_src = m->enc;
    QF_TRY(plan(m, fn));
    m->enc_src = m->enc;

    /* the small integer inputs, built on the host (in place on the CPU) */
    uint8_t *hm = m->hmir;
    int64_t *hscreen = (int64_t *)(hm + ((uint8_t *)m->screen - (uint8_t *)m->mir));
    int32_t *hids = (int32_t *)(hm + ((uint8_t *)m->ids - (uint8_t *)m->mir));
    uint8_t *hself = hm + (m->self_mask - (uint8_t *)m->mir), *hcross = hm + (m->cross_mask - (uint8_t *)m->mir);
    uint8_t *hdead = hm + (m->dead - (uint8_t *)m->mir);
    for (int i = 0; i < 4; i++) hscreen[i] = INT64_MAX;
    memset(hdead, 0, (size_t)B);
    m->any_dead = 0;
    if (m->has_enc_mask) {
        for (int64_t b = 0; b < B; b++) {
            int any = 0;
            uint8_t *row = hcross + b * (P + S);
            memset(row, 1, (size_t)P);
            for (int64_t j = 0; j < S; j++) {
                uint8_t v = a->encoder_attention_mask[b * S + j] ? 1 : 0;
                row[P + j] = v;
                any |= v;
            }
            hdead[b] = !any && !P;
            m->any_dead |= hdead[b];
        }
    }
    if (Lt) {
        memcpy(hids, a->text_ids, (size_t)Tt * sizeof(int32_t));
        if (m->has_text_mask)
            for (int64_t b = 0; b < B; b++) {
                memset(hself + b * N, 1, (size_t)Lq);
                for (int64_t j = 0; j < Lt; j++) hself[b * N + Lq + j] = a->text_attention_mask[b * Lt + j] ? 1 : 0;
            }
    }

    if (m->on_device) QF_TRY(qf_qformer_copy(m, m->mir, m->hmir, m->mir_bytes));
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
    const double t_in = qf_qformer_prof_on ? qf_qformer_prof_now() : 0.0;
    QF_TRY(qf_qformer_stage(m, a, fn));
    const int64_t B = m->B, Lq = m->Lq, S = m->S, P = m->P, H = m->cfg.hidden_size;
    const int64_t E = m->cfg.encoder_hidden_size, T = B * (Lq + m->Lt), Tq = B * Lq;
    uint8_t *hm = m->hmir;
    int64_t *hscreen = (int64_t *)(hm + ((uint8_t *)m->screen - (uint8_t *)m->mir));

    /* the inputs into the planned buffers (host or device pointers on the GPU), then screened */
    const qf_backend *be = m->be;
    QF_TRY(qf_qformer_copy(m, m->qin, query_embeds, (size_t)(Tq * H) * sizeof(float)));
    /* bf16 activations: the encoder input goes into bf16 in one pass that also screens it, read
     * in place when it is already on this backend (else uploaded into enc first) */
    const int stage16 = qf_qformer_act16(m) && be->stage_x16;
    const float *enc_src = m->enc;
    if (stage16) {
        const qf_backend *enc_be = NULL;
        const void *encp = encoder_hidden_states;
        const char *encn = "encoder_hidden_states";
        QF_TRY(qf_backend_for(fn, &encp, &encn, 1, &enc_be));
        if (enc_be == be) enc_src = encoder_hidden_states;
    }
    if (enc_src == m->enc) QF_TRY(qf_qformer_copy(m, m->enc, encoder_hidden_states, (size_t)(B * S * E) * sizeof(float)));
    if (P) {
        QF_TRY(qf_qformer_copy(m, m->pk, a->prefix_k, (size_t)(B * P * H) * sizeof(float)));
        QF_TRY(qf_qformer_copy(m, m->pv, a->prefix_v, (size_t)(B * P * H) * sizeof(float)));
    }
    QF_TRY(be->screen_nonfinite(m->qin, Tq * H, m->screen + 0));
    if (stage16) {
        QF_TRY(be->stage_x16(m->enc16, enc_src, B * S * E, m->screen + 1));
        m->enc_src = enc_src;
        m->enc16_staged = 1;
    } else {
        QF_TRY(be->screen_nonfinite(m->enc, B * S * E, m->screen + 1));
    }
    if (P) {
        QF_TRY(be->screen_nonfinite(m->pk, B * P * H, m->screen + 2));
        QF_TRY(be->screen_nonfinite(m->pv, B * P * H, m->screen + 3));
    }
    if (!m->on_device) QF_TRY(report_screen(m, fn, m->screen)); /* synchronous: fail before the work */
    if (qf_qformer_prof_on) qf_qformer_prof_s[QFP_INPUT] += qf_qformer_prof_now() - t_in;

    if (m->on_device) {
        int64_t key[8] = {B, S};
        qf_qformer_key(m, key + 2);
        QF_TRY(qf_model_graph_run(be, &m->graph, key, 8, run_layers_body, m));
    } else {
        QF_TRY(run_layers(m));
    }
    const float *h = qf_qformer_result(m);
    QF_TRY(qf_qformer_copy(m, out, h, (size_t)(T * H) * sizeof(float)));
    if (m->on_device) {
        /* the one wait of a GPU forward: the output is final, then the screen's verdict */
        QF_TRY(be->synchronize());
        QF_TRY(qf_qformer_copy(m, hscreen, m->screen, 4 * sizeof(int64_t)));
        QF_TRY(report_screen(m, fn, hscreen));
    }
    m->have_fwd = 1;
    return QF_OK;
}

/* ---- op profile (qformer_internal.h) ---- */

int qf_qformer_prof_on;
double qf_qformer_prof_s[QFP_N];

double qf_qformer_prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void qf_qformer_profile_enable(int on) {
    qf_qformer_prof_on = on != 0;
    memset(qf_qformer_prof_s, 0, sizeof qf_qformer_prof_s);
}

int qf_qformer_profile_read(double *seconds, const char **names, int cap) {
    static const char *const kind[QFP_N] = {
        "fwd enc k|v GEMM (all cross layers)", "fwd q(|k|v) GEMM", "fwd split/merge heads", "fwd sdpa",
        "fwd out proj + residual", "fwd layernorm", "fwd FFN up GEMM", "fwd GELU", "fwd FFN down + residual",
        "fwd input checks and copies", "bwd linear (GEMMs, bias sums)", "bwd sdpa", "bwd layernorm", "bwd GELU",
        "bwd split/merge heads", "bwd residual adds"};
    for (int i = 0; i < cap && i < QFP_N; i++) {
        if (seconds) seconds[i] = qf_qformer_prof_s[i];
        if (names) names[i] = kind[i];
    }
    return QFP_N;
}

/* ---- cross-attention maps ---- */

qf_status qf_qformer_cross_attention(qf_qformer *m, int layer, int average, float *weights) {
    const char *fn = "qf_qformer_cross_attention";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!weights) return qf_fail(QF_ERR_ARG, "%s: weights is NULL", fn);
    if (m->on_device)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: the attention maps are read on the CPU: this model runs on %s "
                                           "(qf_qformer_to_device(m, \"cpu\", QF_F32) first)", fn, m->be->name);
    if (!m->have_fwd) return qf_fail(QF_ERR_ARG, "%s: no successful qf_qformer_forward to read the maps of", fn);
    const int nc = qf_qformer_num_cross_layers(m);
    if (layer < 0 || layer >= nc)
        return qf_fail(QF_ERR_ARG, "%s: layer = %d is out of range [0, %d) (cross-attention layers)", fn, layer, nc);
    const attn_acts *t = &m->acts[(int64_t)layer * m->cfg.cross_attention_frequency].cross;
    const int64_t B = m->B, nh = m->cfg.num_attention_heads, Lq = m->Lq, hd = m->hd, K = m->P + m->S;
    const float scale = 1.0f / sqrtf((float)hd);
    const float inv_h = 1.0f / (float)nh;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) if (B * Lq * K * hd * nh > 65536)
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < Lq; i++) {
            const uint8_t *mask = m->has_enc_mask ? m->cross_mask + b * K : NULL;
            if (average)
                for (int64_t j = 0; j < K; j++) weights[(b * Lq + i) * K + j] = 0.0f;
            for (int64_t h = 0; h < nh; h++) {
                const float *q = t->qh + ((b * nh + h) * Lq + i) * hd;
                const float *k = t->kh + (b * nh + h) * K * hd;
                const float lse = t->lse[(b * nh + h) * Lq + i];
                float *dst = average ? weights + (b * Lq + i) * K : weights + ((b * nh + h) * Lq + i) * K;
                for (int64_t j = 0; j < K; j++) {
                    float w;
                    if (m->dead[b]) {
                        w = 1.0f / (float)K;
                    } else if (mask && !mask[j]) {
                        w = 0.0f;
                    } else {
                        float s = 0.0f;
                        for (int64_t d = 0; d < hd; d++) s += q[d] * k[j * hd + d];
                        w = expf(s * scale - lse);
                    }
                    if (average)
                        dst[j] += w * inv_h;
                    else
                        dst[j] = w;
                }
            }
        }
    return QF_OK;
}
