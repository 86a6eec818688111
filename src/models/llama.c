/* llama.c - decoder-only LLMs of the LLaMA family (transformers 5.x LlamaForCausalLM and
 * Qwen2ForCausalLM), float32 inference forward: embedding lookup, pre-norm decoder layers
 * (RMSNorm, RoPE, grouped-query causal attention on qf_sdpa_forward, SwiGLU MLP), final RMSNorm
 * and the output projection. The contract is in include/qfuse_llm.h.
 *
 * Semantics followed (transformers modeling_llama.py / modeling_qwen2.py):
 *   - RMSNorm in float32: weight * (x * rsqrt(mean(x^2) + eps)).
 *   - RoPE "default": inv_freq[i] = 1 / theta^(2i/head_dim) in float32, angle = pos * inv_freq[i]
 *     (float32 product), cos/sin of the angle; rotate_half pairs element i with i + head_dim/2:
 *       out[i]          = x[i] cos - x[i+hd/2] sin
 *       out[i+hd/2]     = x[i+hd/2] cos + x[i] sin
 *   - Qwen2: q/k/v projections carry biases, o_proj does not. LLaMA: attention_bias adds biases
 *     to q/k/v/o, mlp_bias to gate/up/down.
 *   - Tied embeddings (tie_word_embeddings true) use embed_tokens as lm_head whatever the file
 *     holds; untied models need lm_head.weight.
 *
 * Invariants:
 *   - Parameters live in one float buffer laid out by a table built at load (llm.c style); every
 *     tensor is read by name with its shape checked, so a loaded model is complete.
 *   - Activations live in one grow-only workspace (m->ws): forward with shapes no larger than an
 *     earlier call allocates nothing. It is m's own (not qf_scratch) because the ops it calls use
 *     qf_scratch themselves.
 *   - The residual stream x is the only value carried between layers; every other buffer is
 *     rewritten before it is read in each layer.
 */
#include "internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *in_norm, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
    float *post_norm, *wg, *bg, *wu, *bu, *wd, *bd;
} llm_layer;

typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    float **dst;
    size_t off;
} llm_tensor;

struct qf_llm {
    qf_llm_config cfg;
    int is_qwen2;
    float *params;
    float *embed, *final_norm, *lm_head;   /* lm_head == embed when tied */
    llm_layer *layers;

    float *ws;                             /* grow-only activation workspace */
    size_t ws_cap;                         /* floats */
};

/* ---- config ------------------------------------------------------------------------------- */

static qf_status cfg_bool_or(const qf_config *c, const char *key, int def, int *out) {
    *out = def;
    if (!qf_config_has(c, key)) return QF_OK;
    if (qf_config_bool(c, key, out) == QF_OK) return QF_OK;
    /* null means "not set" in transformers configs: the _or readers treat it as absent. */
    double d = NAN;
    qf_clear_error();
    if (qf_config_float_or(c, key, NAN, &d) == QF_OK && isnan(d)) {
        *out = def;
        return QF_OK;
    }
    return qf_config_bool(c, key, out);  /* sets the message again */
}

/* The value of a string key, or NULL when absent or null. */
static const char *cfg_string_or_null(const qf_config *c, const char *key) {
    const char *v = NULL;
    if (!qf_config_has(c, key)) return NULL;
    if (qf_config_string(c, key, &v) != QF_OK) {
        qf_clear_error();
        return NULL;
    }
    return v;
}

static qf_status read_config(const qf_config *c, const char *path, qf_llm_config *o, int *is_qwen2) {
    memset(o, 0, sizeof *o);
    const char *mt = cfg_string_or_null(c, "model_type");
    if (!mt) return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s has no model_type; expected \"llama\" or \"qwen2\"", path);
    if (strcmp(mt, "llama") && strcmp(mt, "qwen2"))
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: model_type \"%s\" is not a decoder qfuse runs; expected \"llama\" or \"qwen2\"",
                       path, mt);
    *is_qwen2 = !strcmp(mt, "qwen2");
    snprintf(o->model_type, sizeof o->model_type, "%s", mt);

    QF_TRY(qf_config_int(c, "vocab_size", &o->vocab_size));
    QF_TRY(qf_config_int(c, "hidden_size", &o->hidden_size));
    QF_TRY(qf_config_int(c, "intermediate_size", &o->intermediate_size));
    QF_TRY(qf_config_int(c, "num_hidden_layers", &o->num_hidden_layers));
    QF_TRY(qf_config_int(c, "num_attention_heads", &o->num_attention_heads));
    QF_TRY(qf_config_int_or(c, "num_key_value_heads", o->num_attention_heads, &o->num_key_value_heads));
    if (o->vocab_size < 1 || o->hidden_size < 1 || o->intermediate_size < 1 || o->num_hidden_layers < 1 ||
        o->num_attention_heads < 1 || o->num_key_value_heads < 1)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: vocab_size, hidden_size, intermediate_size, num_hidden_layers, "
                       "num_attention_heads and num_key_value_heads must be >= 1", path);
    if (o->num_attention_heads % o->num_key_value_heads)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
                       path, (long long)o->num_attention_heads, (long long)o->num_key_value_heads);
    if (o->hidden_size % o->num_attention_heads && !qf_config_has(c, "head_dim"))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: hidden_size %lld is not a multiple of num_attention_heads %lld and no head_dim is given",
                       path, (long long)o->hidden_size, (long long)o->num_attention_heads);
    QF_TRY(qf_config_int_or(c, "head_dim", o->hidden_size / o->num_attention_heads, &o->head_dim));
    if (o->head_dim < 2 || o->head_dim % 2)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: head_dim %lld must be even and >= 2 (RoPE rotates half-pairs)",
                       path, (long long)o->head_dim);
    QF_TRY(qf_config_float_or(c, "rms_norm_eps", 1e-6, &o->rms_norm_eps));
    if (!(o->rms_norm_eps >= 0) || !isfinite(o->rms_norm_eps))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: rms_norm_eps must be finite and >= 0", path);

    /* transformers 5 keeps RoPE settings under rope_parameters; 4.x used rope_theta/rope_scaling. */
    double theta = 10000.0;
    QF_TRY(qf_config_float_or(c, "rope_theta", theta, &theta));
    QF_TRY(qf_config_float_or(c, "rope_parameters.rope_theta", theta, &theta));
    if (!(theta > 0) || !isfinite(theta))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: rope_theta must be finite and > 0", path);
    o->rope_theta = theta;
    static const char *const rope_keys[] = {"rope_parameters.rope_type", "rope_parameters.type",
                                            "rope_scaling.rope_type", "rope_scaling.type"};
    for (size_t i = 0; i < sizeof rope_keys / sizeof rope_keys[0]; i++) {
        const char *rt = cfg_string_or_null(c, rope_keys[i]);
        if (rt && strcmp(rt, "default"))
            return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: %s \"%s\" is not supported (only \"default\" RoPE)",
                           path, rope_keys[i], rt);
    }
    double partial = 1.0;
    QF_TRY(qf_config_float_or(c, "partial_rotary_factor", 1.0, &partial));
    QF_TRY(qf_config_float_or(c, "rope_parameters.partial_rotary_factor", partial, &partial));
    if (partial != 1.0)
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: partial_rotary_factor %g is not supported (only 1)", path, partial);

    const char *act = cfg_string_or_null(c, "hidden_act");
    if (act && strcmp(act, "silu"))
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: hidden_act \"%s\" is not supported (only \"silu\")", path, act);

    int sliding = 0;
    QF_TRY(cfg_bool_or(c, "use_sliding_window", 0, &sliding));
    if (sliding)
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: use_sliding_window true is not supported", path);

    if (*is_qwen2) {
        o->attention_bias = 1;
        o->mlp_bias = 0;
    } else {
        QF_TRY(cfg_bool_or(c, "attention_bias", 0, &o->attention_bias));
        QF_TRY(cfg_bool_or(c, "mlp_bias", 0, &o->mlp_bias));
    }
    QF_TRY(cfg_bool_or(c, "tie_word_embeddings", 0, &o->tie_word_embeddings));
    return QF_OK;
}

/* ---- load --------------------------------------------------------------------------------- */

static void add(llm_tensor *t, int *n, size_t *total, float **dst, int ndim, int64_t d0, int64_t d1,
                const char *fmt, int layer, const char *leaf) {
    llm_tensor *e = &t[(*n)++];
    if (layer >= 0) snprintf(e->name, sizeof e->name, fmt, layer, leaf);
    else snprintf(e->name, sizeof e->name, "%s", fmt);
    e->ndim = ndim;
    e->shape[0] = d0;
    e->shape[1] = d1;
    e->dst = dst;
    e->off = *total;
    *total += (size_t)d0 * (size_t)(ndim == 2 ? d1 : 1);
}

qf_status qf_llm_load(const char *folder, qf_llm **out) {
    if (!folder || !out) return qf_fail(QF_ERR_ARG, "qf_llm_load: NULL folder or out");
    *out = NULL;
    char cfg_path[4096], st_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", folder) >= (int)sizeof cfg_path ||
        snprintf(st_path, sizeof st_path, "%s/model.safetensors", folder) >= (int)sizeof st_path)
        return qf_fail(QF_ERR_ARG, "qf_llm_load: folder path is too long");

    qf_config *cfg = NULL;
    QF_TRY(qf_config_load(cfg_path, &cfg));
    qf_llm *m = calloc(1, sizeof *m);
    if (!m) {
        qf_config_free(cfg);
        return qf_fail(QF_ERR_NOMEM, "qf_llm_load: out of memory");
    }
    qf_status s = read_config(cfg, cfg_path, &m->cfg, &m->is_qwen2);
    qf_config_free(cfg);
    if (s != QF_OK) {
        free(m);
        return s;
    }
    const qf_llm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
    const int64_t QD = c->num_attention_heads * c->head_dim, KD = c->num_key_value_heads * c->head_dim;
    const int nl = (int)c->num_hidden_layers;

    qf_safetensors *st = NULL;
    llm_tensor *tab = NULL;
    m->layers = calloc((size_t)nl, sizeof *m->layers);
    tab = calloc((size_t)nl * 16 + 3, sizeof *tab);
    if (!m->layers || !tab) {
        s = qf_fail(QF_ERR_NOMEM, "qf_llm_load: out of memory");
        goto fail;
    }
    int n = 0;
    size_t total = 0;
    add(tab, &n, &total, &m->embed, 2, V, H, "model.embed_tokens.weight", -1, NULL);
    const char *lf = "model.layers.%d.%s";
    for (int l = 0; l < nl; l++) {
        llm_layer *L = &m->layers[l];
        add(tab, &n, &total, &L->in_norm, 1, H, 0, lf, l, "input_layernorm.weight");
        add(tab, &n, &total, &L->wq, 2, QD, H, lf, l, "self_attn.q_proj.weight");
        add(tab, &n, &total, &L->wk, 2, KD, H, lf, l, "self_attn.k_proj.weight");
        add(tab, &n, &total, &L->wv, 2, KD, H, lf, l, "self_attn.v_proj.weight");
        add(tab, &n, &total, &L->wo, 2, H, QD, lf, l, "self_attn.o_proj.weight");
        if (c->attention_bias) {
            add(tab, &n, &total, &L->bq, 1, QD, 0, lf, l, "self_attn.q_proj.bias");
            add(tab, &n, &total, &L->bk, 1, KD, 0, lf, l, "self_attn.k_proj.bias");
            add(tab, &n, &total, &L->bv, 1, KD, 0, lf, l, "self_attn.v_proj.bias");
            if (!m->is_qwen2) add(tab, &n, &total, &L->bo, 1, H, 0, lf, l, "self_attn.o_proj.bias");
        }
        add(tab, &n, &total, &L->post_norm, 1, H, 0, lf, l, "post_attention_layernorm.weight");
        add(tab, &n, &total, &L->wg, 2, I, H, lf, l, "mlp.gate_proj.weight");
        add(tab, &n, &total, &L->wu, 2, I, H, lf, l, "mlp.up_proj.weight");
        add(tab, &n, &total, &L->wd, 2, H, I, lf, l, "mlp.down_proj.weight");
        if (c->mlp_bias) {
            add(tab, &n, &total, &L->bg, 1, I, 0, lf, l, "mlp.gate_proj.bias");
            add(tab, &n, &total, &L->bu, 1, I, 0, lf, l, "mlp.up_proj.bias");
            add(tab, &n, &total, &L->bd, 1, H, 0, lf, l, "mlp.down_proj.bias");
        }
    }
    add(tab, &n, &total, &m->final_norm, 1, H, 0, "model.norm.weight", -1, NULL);
    if (!c->tie_word_embeddings) add(tab, &n, &total, &m->lm_head, 2, V, H, "lm_head.weight", -1, NULL);

    size_t bytes;
    if ((s = qf_mul_size(total, sizeof(float), "llm parameters", &bytes)) != QF_OK) goto fail;
    m->params = malloc(bytes);
    if (!m->params) {
        s = qf_fail(QF_ERR_NOMEM, "qf_llm_load: cannot allocate %zu bytes of parameters", bytes);
        goto fail;
    }
    if ((s = qf_st_open(st_path, &st)) != QF_OK) goto fail;
    for (int i = 0; i < n; i++) {
        *tab[i].dst = m->params + tab[i].off;
        s = qf_st_read_f32(st, tab[i].name, tab[i].ndim, tab[i].shape, *tab[i].dst);
        if (s != QF_OK) {
            if (s == QF_ERR_NOT_FOUND && !strcmp(tab[i].name, "lm_head.weight"))
                qf_fail_prefix(s, "llm: tie_word_embeddings is false in %s", cfg_path);
            goto fail;
        }
    }
    if (c->tie_word_embeddings) m->lm_head = m->embed;
    qf_st_close(st);
    free(tab);
    *out = m;
    return QF_OK;

fail:
    if (st) qf_st_close(st);
    free(tab);
    qf_llm_free(m);
    return s;
}

void qf_llm_free(qf_llm *m) {
    if (!m) return;
    free(m->params);
    free(m->layers);
    free(m->ws);
    free(m);
}

qf_status qf_llm_get_config(const qf_llm *m, qf_llm_config *out) {
    if (!m || !out) return qf_fail(QF_ERR_ARG, "qf_llm_get_config: NULL model or out");
    *out = m->cfg;
    return QF_OK;
}

/* ---- forward ------------------------------------------------------------------------------ */

static qf_status check_bt(const char *fn, int64_t B, int64_t T) {
    if (B < 1 || T < 1)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld and T = %lld must both be >= 1", fn, (long long)B, (long long)T);
    if (B > (int64_t)1 << 24 || T > (int64_t)1 << 24)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, T = %lld is too large", fn, (long long)B, (long long)T);
    return QF_OK;
}

qf_status qf_llm_embed(qf_llm *m, const int32_t *ids, int64_t B, int64_t T, float *out) {
    if (!m || !ids || !out) return qf_fail(QF_ERR_ARG, "qf_llm_embed: NULL model, input_ids or out");
    QF_TRY(check_bt("qf_llm_embed", B, T));
    const int64_t V = m->cfg.vocab_size;
    for (int64_t i = 0; i < B * T; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return qf_fail(QF_ERR_ARG, "llm embed: input_ids[%lld,%lld] = %d is outside [0, vocab_size = %lld)",
                           (long long)(i / T), (long long)(i % T), (int)ids[i], (long long)V);
    return qf_embedding_forward(out, ids, m->embed, B * T, V, m->cfg.hidden_size);
}

/* out[n,:] = w * x[n,:] / sqrt(mean(x[n,:]^2) + eps); mean accumulated in double. */
static void rmsnorm(float *out, const float *x, const float *w, int64_t N, int64_t C, float eps) {
#pragma omp parallel for num_threads(qf_threads()) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        float *o = out + n * C;
        double ss = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
        float r = (float)(1.0 / sqrt(ss / (double)C + (double)eps));
        for (int64_t i = 0; i < C; i++) o[i] = w[i] * (xr[i] * r);
    }
}

/* Token-major [B*T, Hh*hd] -> head-major [B,Hh,T,hd], rotating by RoPE when cs != NULL
 * (cs = cos [T,hd/2] followed by sin [T,hd/2]). */
static void to_heads(float *dst, const float *src, const float *cs, int64_t B, int64_t T, int64_t Hh,
                     int64_t hd) {
    const int64_t half = hd / 2;
#pragma omp parallel for collapse(2) num_threads(qf_threads()) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hh; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *x = src + ((b * T + t) * Hh + h) * hd;
                float *o = dst + ((b * Hh + h) * T + t) * hd;
                if (!cs) {
                    memcpy(o, x, (size_t)hd * sizeof *o);
                    continue;
                }
                const float *co = cs + t * half, *si = cs + T * half + t * half;
                for (int64_t i = 0; i < half; i++) {
                    float x1 = x[i], x2 = x[i + half];
                    o[i] = x1 * co[i] - x2 * si[i];
                    o[i + half] = x2 * co[i] + x1 * si[i];
                }
            }
}

/* Head-major [B,Hh,T,hd] -> token-major [B*T, Hh*hd]. */
static void from_heads(float *dst, const float *src, int64_t B, int64_t T, int64_t Hh, int64_t hd) {
#pragma omp parallel for collapse(2) num_threads(qf_threads()) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < Hh; h++)
                memcpy(dst + ((b * T + t) * Hh + h) * hd, src + ((b * Hh + h) * T + t) * hd,
                       (size_t)hd * sizeof *dst);
}

/* g = silu(g) * u, silu(x) = x / (1 + exp(-x)) as torch computes it in float32. */
static void swiglu(float *g, const float *u, int64_t n) {
#pragma omp parallel for num_threads(qf_threads()) schedule(static)
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

qf_status qf_llm_forward(qf_llm *m, const float *inputs_embeds, int64_t B, int64_t T, float *logits) {
    if (!m || !inputs_embeds || !logits)
        return qf_fail(QF_ERR_ARG, "qf_llm_forward: NULL model, inputs_embeds or logits");
    QF_TRY(check_bt("qf_llm_forward", B, T));
    const qf_llm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size, hd = c->head_dim;
    const int64_t Hq = c->num_attention_heads, Hkv = c->num_key_value_heads;
    const int64_t QD = Hq * hd, KD = Hkv * hd, N = B * T, half = hd / 2;
    const float eps = (float)c->rms_norm_eps;

    /* workspace plan (floats) */
    size_t sz_x = (size_t)N * H, sz_h = (size_t)N * (H > QD ? H : QD), sz_q = (size_t)N * QD,
           sz_k = (size_t)N * KD, sz_i = (size_t)N * I, sz_cs = (size_t)T * hd;
    size_t need = sz_x + sz_h + 2 * sz_q + 2 * sz_k + 2 * sz_k + sz_q + 2 * sz_i + sz_cs;
    if (need > m->ws_cap) {
        size_t bytes;
        QF_TRY(qf_mul_size(need, sizeof(float), "llm workspace", &bytes));
        float *w = realloc(m->ws, bytes);
        if (!w) return qf_fail(QF_ERR_NOMEM, "qf_llm_forward: cannot allocate a %zu-byte workspace", bytes);
        m->ws = w;
        m->ws_cap = need;
    }
    float *x = m->ws, *h = x + sz_x, *q = h + sz_h, *qh = q + sz_q, *k = qh + sz_q, *kh = k + sz_k,
          *v = kh + sz_k, *vh = v + sz_k, *oh = vh + sz_k, *g = oh + sz_q, *u = g + sz_i, *cs = u + sz_i;

    /* RoPE tables, float32 as transformers computes them (inv_freq, pos * inv_freq, cos/sin). */
    for (int64_t i = 0; i < half; i++) {
        float inv = 1.0f / powf((float)c->rope_theta, (float)(2 * i) / (float)hd);
        for (int64_t t = 0; t < T; t++) {
            float ang = (float)t * inv;
            cs[t * half + i] = (float)cos((double)ang);
            cs[T * half + t * half + i] = (float)sin((double)ang);
        }
    }

    memcpy(x, inputs_embeds, sz_x * sizeof *x);
    qf_sdpa_params sp = qf_sdpa_defaults(B, Hq, Hkv, T, T, hd);
    sp.is_causal = 1;
    sp.enable_gqa = Hq != Hkv;
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        const llm_layer *L = &m->layers[l];
        rmsnorm(h, x, L->in_norm, N, H, eps);
        QF_TRY(qf_linear_forward(q, h, L->wq, L->bq, N, H, QD));
        QF_TRY(qf_linear_forward(k, h, L->wk, L->bk, N, H, KD));
        QF_TRY(qf_linear_forward(v, h, L->wv, L->bv, N, H, KD));
        to_heads(qh, q, cs, B, T, Hq, hd);
        to_heads(kh, k, cs, B, T, Hkv, hd);
        to_heads(vh, v, NULL, B, T, Hkv, hd);
        QF_TRY(qf_sdpa_forward(&sp, qh, kh, vh, oh, NULL, NULL));
        from_heads(q, oh, B, T, Hq, hd);
        QF_TRY(qf_linear_forward(h, q, L->wo, L->bo, N, QD, H));
        QF_TRY(qf_residual_forward(x, x, h, (int64_t)sz_x));

        rmsnorm(h, x, L->post_norm, N, H, eps);
        QF_TRY(qf_linear_forward(g, h, L->wg, L->bg, N, H, I));
        QF_TRY(qf_linear_forward(u, h, L->wu, L->bu, N, H, I));
        swiglu(g, u, (int64_t)sz_i);
        QF_TRY(qf_linear_forward(h, g, L->wd, L->bd, N, I, H));
        QF_TRY(qf_residual_forward(x, x, h, (int64_t)sz_x));
    }
    rmsnorm(h, x, m->final_norm, N, H, eps);
    return qf_linear_forward(logits, h, m->lm_head, NULL, N, H, V);
}
