/* llm.c - decoder-only LLMs: configuration and loading (the forward is llm_forward.c).
 * Families: transformers 5.x LlamaForCausalLM, Qwen2ForCausalLM and OPTForCausalLM, from a
 * Hugging Face folder or from inside a composite checkpoint (BLIP-2's language_model). The
 * contract is include/qfuse_llm.h; the layout is src/models/llm_internal.h.
 *
 * Semantics followed (modeling_llama.py, modeling_qwen2.py, modeling_opt.py):
 *   - LLaMA/Qwen2: RMSNorm, RoPE "default" with the config's theta, GQA, SwiGLU; Qwen2 has
 *     q/k/v biases and no o_proj bias; LLaMA's attention_bias adds q/k/v/o biases, mlp_bias
 *     gate/up/down biases.
 *   - OPT: learned positions (table of max_position_embeddings + 2 rows, offset 2), LayerNorm
 *     (eps 1e-5) before (do_layer_norm_before) or after each block, ReLU FFN fc1/fc2, biases
 *     everywhere (enable_bias), project_in/project_out when word_embed_proj_dim != hidden_size,
 *     a final LayerNorm unless post-LN or _remove_final_layer_norm.
 *   - Tied embeddings (tie_word_embeddings) use embed_tokens as lm_head whatever the file holds.
 *
 * Invariants:
 *   - Every tensor is read by name with its shape checked, so a loaded model is complete;
 *     config fields that change the math and are not implemented are refused by name.
 *   - Norms, biases and embedding tables live in m->params (one allocation). Each linear's
 *     float32 weight is its own allocation (freed when quantized at load: with a reduced format
 *     the float32 copy of a layer exists only while that layer is being quantized).
 */
#include "models/llm_internal.h"
#include "io/io_internal.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- config ------------------------------------------------------------------------------- */

typedef struct {
    const qf_config *c;
    const char *prefix;  /* "" or "text_config." */
    const char *path;    /* for messages */
    char key[256];
} cfg_reader;

static const char *K(cfg_reader *r, const char *name) {
    snprintf(r->key, sizeof r->key, "%s%s", r->prefix, name);
    return r->key;
}

/* Booleans: absent or null -> def. */
static qf_status cfg_bool_or(cfg_reader *r, const char *name, int def, int *out) {
    const char *key = K(r, name);
    *out = def;
    if (!qf_config_has(r->c, key)) return QF_OK;
    if (qf_config_bool(r->c, key, out) == QF_OK) return QF_OK;
    double d = NAN;
    qf_clear_error();
    if (qf_config_float_or(r->c, key, NAN, &d) == QF_OK && isnan(d)) {
        *out = def;
        return QF_OK;
    }
    return qf_config_bool(r->c, key, out); /* sets the message again */
}

/* A string key's value, or NULL when absent, null or not a string. */
static const char *cfg_string_or_null(cfg_reader *r, const char *name) {
    const char *key = K(r, name), *v = NULL;
    if (!qf_config_has(r->c, key)) return NULL;
    if (qf_config_string(r->c, key, &v) != QF_OK) {
        qf_clear_error();
        return NULL;
    }
    return v;
}

/* A token id: absent, null or not an integer (a list of eos ids) -> -1. */
static int64_t cfg_token_id(cfg_reader *r, const char *name) {
    int64_t v = -1;
    if (qf_config_int_or(r->c, K(r, name), -1, &v) != QF_OK) {
        qf_clear_error();
        v = -1;
    }
    return v;
}

static qf_status need_positive(const cfg_reader *r, const char *name, int64_t v) {
    if (v < 1 || v > ((int64_t)1 << 31))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: %s%s = %lld must be in [1, 2^31]", r->path, r->prefix, name,
                       (long long)v);
    return QF_OK;
}

static qf_status read_llama_config(cfg_reader *r, qf_llm_config *o, int is_qwen2) {
    const char *path = r->path;
    QF_TRY(qf_config_int(r->c, K(r, "vocab_size"), &o->vocab_size));
    QF_TRY(qf_config_int(r->c, K(r, "hidden_size"), &o->hidden_size));
    QF_TRY(qf_config_int(r->c, K(r, "intermediate_size"), &o->intermediate_size));
    QF_TRY(qf_config_int(r->c, K(r, "num_hidden_layers"), &o->num_hidden_layers));
    QF_TRY(qf_config_int(r->c, K(r, "num_attention_heads"), &o->num_attention_heads));
    QF_TRY(qf_config_int_or(r->c, K(r, "num_key_value_heads"), o->num_attention_heads, &o->num_key_value_heads));
    QF_TRY(qf_config_int_or(r->c, K(r, "max_position_embeddings"), 2048, &o->max_position_embeddings));
    QF_TRY(need_positive(r, "vocab_size", o->vocab_size));
    QF_TRY(need_positive(r, "hidden_size", o->hidden_size));
    QF_TRY(need_positive(r, "intermediate_size", o->intermediate_size));
    QF_TRY(need_positive(r, "num_hidden_layers", o->num_hidden_layers));
    QF_TRY(need_positive(r, "num_attention_heads", o->num_attention_heads));
    QF_TRY(need_positive(r, "num_key_value_heads", o->num_key_value_heads));
    QF_TRY(need_positive(r, "max_position_embeddings", o->max_position_embeddings));
    if (o->num_attention_heads % o->num_key_value_heads)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
                       path, (long long)o->num_attention_heads, (long long)o->num_key_value_heads);
    if (o->hidden_size % o->num_attention_heads && !qf_config_has(r->c, K(r, "head_dim")))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: hidden_size %lld is not a multiple of num_attention_heads %lld and no head_dim is given",
                       path, (long long)o->hidden_size, (long long)o->num_attention_heads);
    QF_TRY(qf_config_int_or(r->c, K(r, "head_dim"), o->hidden_size / o->num_attention_heads, &o->head_dim));
    if (o->head_dim < 2 || o->head_dim % 2 || o->head_dim > 4096)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: head_dim %lld must be even and in [2, 4096] (RoPE rotates half-pairs)",
                       path, (long long)o->head_dim);
    QF_TRY(qf_config_float_or(r->c, K(r, "rms_norm_eps"), 1e-6, &o->norm_eps));
    if (!(o->norm_eps >= 0) || !isfinite(o->norm_eps))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: rms_norm_eps must be finite and >= 0", path);

    /* transformers 5 keeps RoPE settings under rope_parameters; 4.x used rope_theta/rope_scaling. */
    double theta = 10000.0;
    QF_TRY(qf_config_float_or(r->c, K(r, "rope_theta"), theta, &theta));
    QF_TRY(qf_config_float_or(r->c, K(r, "rope_parameters.rope_theta"), theta, &theta));
    if (!(theta > 0) || !isfinite(theta))
        return qf_fail(QF_ERR_FORMAT, "llm: %s: rope_theta must be finite and > 0", path);
    o->rope_theta = theta;
    static const char *const rope_keys[] = {"rope_parameters.rope_type", "rope_parameters.type",
                                            "rope_scaling.rope_type", "rope_scaling.type"};
    for (size_t i = 0; i < sizeof rope_keys / sizeof rope_keys[0]; i++) {
        const char *rt = cfg_string_or_null(r, rope_keys[i]);
        if (rt && strcmp(rt, "default"))
            return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: %s%s \"%s\" is not supported (only \"default\" RoPE)", path,
                           r->prefix, rope_keys[i], rt);
    }
    double partial = 1.0;
    QF_TRY(qf_config_float_or(r->c, K(r, "partial_rotary_factor"), 1.0, &partial));
    QF_TRY(qf_config_float_or(r->c, K(r, "rope_parameters.partial_rotary_factor"), partial, &partial));
    if (partial != 1.0)
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: partial_rotary_factor %g is not supported (only 1)", path, partial);
    const char *act = cfg_string_or_null(r, "hidden_act");
    if (act && strcmp(act, "silu"))
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: hidden_act \"%s\" is not supported (only \"silu\")", path, act);
    int sliding = 0;
    QF_TRY(cfg_bool_or(r, "use_sliding_window", 0, &sliding));
    if (sliding) return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: use_sliding_window true is not supported", path);
    if (is_qwen2) {
        o->attention_bias = 1;
        o->mlp_bias = 0;
    } else {
        QF_TRY(cfg_bool_or(r, "attention_bias", 0, &o->attention_bias));
        QF_TRY(cfg_bool_or(r, "mlp_bias", 0, &o->mlp_bias));
    }
    QF_TRY(cfg_bool_or(r, "tie_word_embeddings", 0, &o->tie_word_embeddings));
    o->word_embed_proj_dim = o->hidden_size;
    o->do_layer_norm_before = 1;
    return QF_OK;
}

static qf_status read_opt_config(cfg_reader *r, qf_llm_config *o) {
    const char *path = r->path;
    QF_TRY(qf_config_int(r->c, K(r, "vocab_size"), &o->vocab_size));
    QF_TRY(qf_config_int(r->c, K(r, "hidden_size"), &o->hidden_size));
    QF_TRY(qf_config_int(r->c, K(r, "ffn_dim"), &o->intermediate_size));
    QF_TRY(qf_config_int(r->c, K(r, "num_hidden_layers"), &o->num_hidden_layers));
    QF_TRY(qf_config_int(r->c, K(r, "num_attention_heads"), &o->num_attention_heads));
    QF_TRY(qf_config_int(r->c, K(r, "max_position_embeddings"), &o->max_position_embeddings));
    QF_TRY(qf_config_int_or(r->c, K(r, "word_embed_proj_dim"), o->hidden_size, &o->word_embed_proj_dim));
    QF_TRY(need_positive(r, "vocab_size", o->vocab_size));
    QF_TRY(need_positive(r, "hidden_size", o->hidden_size));
    QF_TRY(need_positive(r, "ffn_dim", o->intermediate_size));
    QF_TRY(need_positive(r, "num_hidden_layers", o->num_hidden_layers));
    QF_TRY(need_positive(r, "num_attention_heads", o->num_attention_heads));
    QF_TRY(need_positive(r, "max_position_embeddings", o->max_position_embeddings));
    QF_TRY(need_positive(r, "word_embed_proj_dim", o->word_embed_proj_dim));
    if (o->hidden_size % o->num_attention_heads)
        return qf_fail(QF_ERR_FORMAT, "llm: %s: hidden_size %lld is not a multiple of num_attention_heads %lld", path,
                       (long long)o->hidden_size, (long long)o->num_attention_heads);
    o->num_key_value_heads = o->num_attention_heads;
    o->head_dim = o->hidden_size / o->num_attention_heads;
    o->norm_eps = 1e-5; /* nn.LayerNorm's default: OPT does not pass one */
    const char *act = cfg_string_or_null(r, "activation_function");
    if (act && strcmp(act, "relu"))
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: activation_function \"%s\" is not supported (only \"relu\")",
                       path, act);
    int affine = 1, enable_bias = 1, remove_final = 0;
    QF_TRY(cfg_bool_or(r, "layer_norm_elementwise_affine", 1, &affine));
    if (!affine)
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: layer_norm_elementwise_affine false is not supported", path);
    QF_TRY(cfg_bool_or(r, "enable_bias", 1, &enable_bias));
    QF_TRY(cfg_bool_or(r, "do_layer_norm_before", 1, &o->do_layer_norm_before));
    QF_TRY(cfg_bool_or(r, "_remove_final_layer_norm", 0, &remove_final));
    o->has_final_norm = o->do_layer_norm_before && !remove_final;
    o->attention_bias = o->mlp_bias = enable_bias;
    QF_TRY(cfg_bool_or(r, "tie_word_embeddings", 1, &o->tie_word_embeddings));
    return QF_OK;
}

static qf_status read_config(cfg_reader *r, qf_llm_config *o, int *arch) {
    memset(o, 0, sizeof *o);
    const char *mt = cfg_string_or_null(r, "model_type");
    if (!mt)
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s has no %smodel_type; expected \"llama\", \"qwen2\" or \"opt\"",
                       r->path, r->prefix);
    if (!strcmp(mt, "llama")) *arch = LLM_ARCH_LLAMA;
    else if (!strcmp(mt, "qwen2")) *arch = LLM_ARCH_QWEN2;
    else if (!strcmp(mt, "opt")) *arch = LLM_ARCH_OPT;
    else
        return qf_fail(QF_ERR_UNSUPPORTED, "llm: %s: %smodel_type \"%s\" is not a decoder qfuse runs; expected "
                                           "\"llama\", \"qwen2\" or \"opt\"", r->path, r->prefix, mt);
    snprintf(o->model_type, sizeof o->model_type, "%s", mt);
    o->has_final_norm = 1;
    if (*arch == LLM_ARCH_OPT) QF_TRY(read_opt_config(r, o));
    else QF_TRY(read_llama_config(r, o, *arch == LLM_ARCH_QWEN2));
    o->bos_token_id = cfg_token_id(r, "bos_token_id");
    o->eos_token_id = cfg_token_id(r, "eos_token_id");
    o->pad_token_id = cfg_token_id(r, "pad_token_id");
    return QF_OK;
}

/* ---- load --------------------------------------------------------------------------------- */

/* Reads a float32 tensor `prefix`+name of the given shape into dst. */
static qf_status read_tensor(const qf_safetensors *st, const char *prefix, const char *name, int ndim,
                             int64_t d0, int64_t d1, float *dst) {
    char full[320];
    if (snprintf(full, sizeof full, "%s%s", prefix, name) >= (int)sizeof full)
        return qf_fail(QF_ERR_ARG, "llm: tensor name %s%s is too long", prefix, name);
    int64_t shape[2] = {d0, d1};
    return qf_st_read_f32(st, full, ndim, shape, dst);
}

typedef struct {
    const qf_safetensors *st;
    const char *prefix;
    const qf_llm_options *opt;
    float *params;   /* next free float in m->params (NULL in the sizing pass) */
    size_t used;     /* floats used by m->params */
    float *tmp;      /* float32 staging for a quantized weight */
} loader;

/* Places a norm/bias/table of n floats in params and reads it (sizing pass: counts only). */
static qf_status take(loader *ld, float **dst, const char *name, int ndim, int64_t d0, int64_t d1) {
    size_t n = (size_t)d0 * (size_t)(ndim == 2 ? d1 : 1);
    if (!ld->params) {
        ld->used += n;
        return QF_OK;
    }
    *dst = ld->params + ld->used;
    ld->used += n;
    return read_tensor(ld->st, ld->prefix, name, ndim, d0, d1, *dst);
}

/* A linear layer "module" [out,in] with an optional bias. */
static qf_status take_linear(loader *ld, qf_llm *m, llm_linear *L, const char *module, int64_t out, int64_t in,
                             int has_bias) {
    char name[160];
    if (ld->params) {
        if (snprintf(L->name, sizeof L->name, "%s", module) >= (int)sizeof L->name)
            return qf_fail(QF_ERR_ARG, "llm: module name %s is too long", module);
        L->in = in;
        L->out = out;
        m->linears[m->n_linears++] = L;
    }
    if (has_bias) {
        snprintf(name, sizeof name, "%s.bias", module);
        QF_TRY(take(ld, &L->bias, name, 1, out, 0));
    }
    if (!ld->params) return QF_OK;
    snprintf(name, sizeof name, "%s.weight", module);
    size_t bytes;
    QF_TRY(qf_mul_size((size_t)out * (size_t)in, sizeof(float), module, &bytes));
    if (ld->opt->weights == QF_WEIGHTS_F32) {
        L->w = malloc(bytes);
        if (!L->w) return qf_fail(QF_ERR_NOMEM, "llm: cannot allocate %zu bytes for %s", bytes, name);
        return read_tensor(ld->st, ld->prefix, name, 2, out, in, L->w);
    }
    QF_TRY(read_tensor(ld->st, ld->prefix, name, 2, out, in, ld->tmp));
    return qf_qweight_quantize(ld->opt->weights, ld->opt->block, ld->tmp, out, in, name, &L->q);
}

/* Both passes: the sizing pass (ld->params NULL) counts m->params floats; the second reads. */
static qf_status load_tensors(loader *ld, qf_llm *m) {
    const qf_llm_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size, E = c->word_embed_proj_dim;
    const int64_t QD = c->num_attention_heads * c->head_dim, KD = c->num_key_value_heads * c->head_dim;
    const int opt = m->arch == LLM_ARCH_OPT, ab = c->attention_bias, mb = c->mlp_bias;
    const char *base = opt ? "model.decoder." : "model.";
    char n[160], mod[160];
#define NAME(...) (snprintf(n, sizeof n, __VA_ARGS__), n)
#define MOD(...) (snprintf(mod, sizeof mod, __VA_ARGS__), mod)
    QF_TRY(take(ld, &m->embed, NAME("%sembed_tokens.weight", base), 2, V, E));
    if (opt) {
        QF_TRY(take(ld, &m->pos_embed, "model.decoder.embed_positions.weight", 2, c->max_position_embeddings + 2, H));
        if (E != H) {
            QF_TRY(take_linear(ld, m, &m->project_in, "model.decoder.project_in", H, E, 0));
            QF_TRY(take_linear(ld, m, &m->project_out, "model.decoder.project_out", E, H, 0));
        }
    }
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        llm_layer *L = &m->layers[l];
        if (opt) {
            QF_TRY(take(ld, &L->in_norm, NAME("model.decoder.layers.%lld.self_attn_layer_norm.weight", (long long)l), 1, H, 0));
            QF_TRY(take(ld, &L->in_norm_b, NAME("model.decoder.layers.%lld.self_attn_layer_norm.bias", (long long)l), 1, H, 0));
            QF_TRY(take_linear(ld, m, &L->q, MOD("model.decoder.layers.%lld.self_attn.q_proj", (long long)l), QD, H, ab));
            QF_TRY(take_linear(ld, m, &L->k, MOD("model.decoder.layers.%lld.self_attn.k_proj", (long long)l), KD, H, ab));
            QF_TRY(take_linear(ld, m, &L->v, MOD("model.decoder.layers.%lld.self_attn.v_proj", (long long)l), KD, H, ab));
            QF_TRY(take_linear(ld, m, &L->o, MOD("model.decoder.layers.%lld.self_attn.out_proj", (long long)l), H, QD, ab));
            QF_TRY(take(ld, &L->post_norm, NAME("model.decoder.layers.%lld.final_layer_norm.weight", (long long)l), 1, H, 0));
            QF_TRY(take(ld, &L->post_norm_b, NAME("model.decoder.layers.%lld.final_layer_norm.bias", (long long)l), 1, H, 0));
            QF_TRY(take_linear(ld, m, &L->up, MOD("model.decoder.layers.%lld.fc1", (long long)l), I, H, mb));
            QF_TRY(take_linear(ld, m, &L->down, MOD("model.decoder.layers.%lld.fc2", (long long)l), H, I, mb));
        } else {
            const int qwen = m->arch == LLM_ARCH_QWEN2;
            QF_TRY(take(ld, &L->in_norm, NAME("model.layers.%lld.input_layernorm.weight", (long long)l), 1, H, 0));
            QF_TRY(take_linear(ld, m, &L->q, MOD("model.layers.%lld.self_attn.q_proj", (long long)l), QD, H, ab));
            QF_TRY(take_linear(ld, m, &L->k, MOD("model.layers.%lld.self_attn.k_proj", (long long)l), KD, H, ab));
            QF_TRY(take_linear(ld, m, &L->v, MOD("model.layers.%lld.self_attn.v_proj", (long long)l), KD, H, ab));
            QF_TRY(take_linear(ld, m, &L->o, MOD("model.layers.%lld.self_attn.o_proj", (long long)l), H, QD, ab && !qwen));
            QF_TRY(take(ld, &L->post_norm, NAME("model.layers.%lld.post_attention_layernorm.weight", (long long)l), 1, H, 0));
            QF_TRY(take_linear(ld, m, &L->gate, MOD("model.layers.%lld.mlp.gate_proj", (long long)l), I, H, mb));
            QF_TRY(take_linear(ld, m, &L->up, MOD("model.layers.%lld.mlp.up_proj", (long long)l), I, H, mb));
            QF_TRY(take_linear(ld, m, &L->down, MOD("model.layers.%lld.mlp.down_proj", (long long)l), H, I, mb));
        }
    }
    if (c->has_final_norm) {
        QF_TRY(take(ld, &m->final_norm, NAME("%s%s.weight", base, opt ? "final_layer_norm" : "norm"), 1, H, 0));
        if (opt) QF_TRY(take(ld, &m->final_norm_b, "model.decoder.final_layer_norm.bias", 1, H, 0));
    }
    /* lm_head: the embedding table when tied (quantized from it for reduced formats). */
    if (!c->tie_word_embeddings) return take_linear(ld, m, &m->lm_head, "lm_head", V, E, 0);
    if (!ld->params) return QF_OK;
    snprintf(m->lm_head.name, sizeof m->lm_head.name, "lm_head");
    m->lm_head.in = E;
    m->lm_head.out = V;
    m->linears[m->n_linears++] = &m->lm_head;
    if (ld->opt->weights == QF_WEIGHTS_F32) {
        m->lm_head.w = m->embed;
        m->lm_head_tied = 1;
        return QF_OK;
    }
    return qf_qweight_quantize(ld->opt->weights, ld->opt->block, m->embed, V, E, "lm_head (tied to embed_tokens)",
                               &m->lm_head.q);
#undef NAME
#undef MOD
}

qf_status qf_llm_load_parts(const qf_config *cfg, const char *cfg_prefix, const qf_safetensors *st,
                            const char *tensor_prefix, const qf_llm_options *opt, qf_llm **out) {
    const char *fn = "qf_llm_load_parts";
    if (!cfg || !st || !out) return qf_fail(QF_ERR_ARG, "%s: NULL config, safetensors or out", fn);
    *out = NULL;
    qf_llm_options defaults = {0};
    if (!opt) opt = &defaults;
    if (opt->weights < QF_WEIGHTS_F32 || opt->weights > QF_WEIGHTS_Q4)
        return qf_fail(QF_ERR_ARG, "%s: options.weights = %d is not a QF_WEIGHTS_* format", fn, opt->weights);
    if (!cfg_prefix) cfg_prefix = "";
    if (!tensor_prefix) tensor_prefix = "";
    if (strlen(cfg_prefix) > 128 || strlen(tensor_prefix) > 128)
        return qf_fail(QF_ERR_ARG, "%s: cfg_prefix/tensor_prefix longer than 128 characters", fn);
    qf_llm *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "%s: out of memory", fn);
    m->active_adapter = m->merged_adapter = -1;
    m->gen_pad = -1;
    cfg_reader r = {.c = cfg, .prefix = cfg_prefix, .path = qf_config_label(cfg)};
    qf_status s = read_config(&r, &m->cfg, &m->arch);
    if (s != QF_OK) goto fail;
    m->cfg_eos = (int32_t)m->cfg.eos_token_id;
    const qf_llm_config *c = &m->cfg;
    m->layers = calloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    m->linears = calloc((size_t)c->num_hidden_layers * 7 + 3, sizeof *m->linears);
    if (!m->layers || !m->linears) {
        s = qf_fail(QF_ERR_NOMEM, "%s: out of memory", fn);
        goto fail;
    }
    loader ld = {.st = st, .prefix = tensor_prefix, .opt = opt};
    if ((s = load_tensors(&ld, m)) != QF_OK) goto fail; /* sizing pass */
    size_t bytes;
    if ((s = qf_mul_size(ld.used, sizeof(float), "llm parameters", &bytes)) != QF_OK) goto fail;
    m->params = malloc(bytes);
    if (!m->params) {
        s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of parameters", fn, bytes);
        goto fail;
    }
    if (opt->weights != QF_WEIGHTS_F32) {
        /* staging for the largest linear weight (lm_head or an FFN matrix) */
        const int64_t big = c->vocab_size * c->word_embed_proj_dim,
                      ffn = c->intermediate_size * c->hidden_size,
                      qd = c->num_attention_heads * c->head_dim * c->hidden_size;
        int64_t mx = big > ffn ? big : ffn;
        if (qd > mx) mx = qd;
        if ((s = qf_mul_size((size_t)mx, sizeof(float), "llm staging", &bytes)) != QF_OK) goto fail;
        ld.tmp = malloc(bytes);
        if (!ld.tmp) {
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of staging", fn, bytes);
            goto fail;
        }
    }
    ld.params = m->params;
    ld.used = 0;
    s = load_tensors(&ld, m);
    free(ld.tmp);
    if (s != QF_OK) {
        if (s == QF_ERR_NOT_FOUND && !c->tie_word_embeddings && strstr(qf_last_error(), "lm_head"))
            qf_fail_prefix(s, "llm: tie_word_embeddings is false in %s", r.path);
        goto fail;
    }
    *out = m;
    return QF_OK;
fail:
    qf_llm_free(m);
    return s;
}

/* FOLDER/generation_config.json (optional): eos_token_id (an integer or a list) and
 * pad_token_id, which transformers' generate prefers over config.json's. */
qf_status llm_read_generation_config(qf_llm *m, const char *folder) {
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", folder);
    FILE *f = fopen(path, "rb");
    if (!f) return QF_OK;
    fclose(f);
    unsigned char *buf = NULL;
    size_t len = 0;
    QF_TRY(qf_io_read_file(path, (size_t)1 << 20, "generation_config", &buf, &len));
    cJSON *root = NULL;
    qf_status s = qf_io_parse_json_object((const char *)buf, len, path, "generation config", &root);
    free(buf);
    if (s != QF_OK) return s;
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id"), *e;
    if (cJSON_IsNumber(eos)) {
        m->gen_eos[m->n_gen_eos++] = (int32_t)eos->valuedouble;
    } else if (cJSON_IsArray(eos)) {
        cJSON_ArrayForEach(e, eos) {
            if (!cJSON_IsNumber(e) || m->n_gen_eos == LLM_MAX_EOS) {
                s = qf_fail(QF_ERR_FORMAT, "%s: eos_token_id must be an integer or a list of at most %d integers",
                            path, LLM_MAX_EOS);
                break;
            }
            m->gen_eos[m->n_gen_eos++] = (int32_t)e->valuedouble;
        }
    } else if (eos && !cJSON_IsNull(eos)) {
        s = qf_fail(QF_ERR_FORMAT, "%s: eos_token_id must be an integer or a list of integers", path);
    }
    const cJSON *pad = cJSON_GetObjectItemCaseSensitive(root, "pad_token_id");
    if (s == QF_OK && cJSON_IsNumber(pad)) m->gen_pad = (int32_t)pad->valuedouble;
    else if (s == QF_OK && pad && !cJSON_IsNull(pad))
        s = qf_fail(QF_ERR_FORMAT, "%s: pad_token_id must be an integer", path);
    for (int i = 0; s == QF_OK && i < m->n_gen_eos; i++)
        if (m->gen_eos[i] < 0 || m->gen_eos[i] >= m->cfg.vocab_size)
            s = qf_fail(QF_ERR_FORMAT, "%s: eos_token_id %d is outside the vocabulary of %lld", path,
                        (int)m->gen_eos[i], (long long)m->cfg.vocab_size);
    if (s == QF_OK && (m->gen_pad < -1 || m->gen_pad >= m->cfg.vocab_size))
        s = qf_fail(QF_ERR_FORMAT, "%s: pad_token_id %d is outside the vocabulary of %lld", path, (int)m->gen_pad,
                    (long long)m->cfg.vocab_size);
    cJSON_Delete(root);
    return s;
}

qf_generate_options qf_llm_generate_defaults(const qf_llm *m) {
    qf_generate_options o = qf_generate_defaults();
    if (!m) return o;
    if (m->n_gen_eos) {
        o.eos_ids = m->gen_eos;
        o.n_eos = m->n_gen_eos;
    } else if (m->cfg.eos_token_id >= 0 && m->cfg.eos_token_id < m->cfg.vocab_size) {
        o.eos_ids = &m->cfg_eos;
        o.n_eos = 1;
    }
    int64_t pad = m->gen_pad >= 0 ? m->gen_pad : m->cfg.pad_token_id;
    if (pad < 0 || pad >= m->cfg.vocab_size) pad = o.n_eos ? o.eos_ids[0] : 0;  /* transformers: pad = eos */
    o.pad_id = (int32_t)pad;
    return o;
}

qf_status qf_llm_load_ex(const char *folder, const qf_llm_options *opt, qf_llm **out) {
    if (!folder || !out) return qf_fail(QF_ERR_ARG, "qf_llm_load: NULL folder or out");
    *out = NULL;
    char cfg_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", folder) >= (int)sizeof cfg_path)
        return qf_fail(QF_ERR_ARG, "qf_llm_load: folder path is too long");
    qf_config *cfg = NULL;
    QF_TRY(qf_config_load(cfg_path, &cfg));
    qf_safetensors *st = NULL;
    qf_status s = qf_open_checkpoint(folder, NULL, &st);
    if (s == QF_OK) s = qf_llm_load_parts(cfg, "", st, "", opt, out);
    qf_st_close(st);
    qf_config_free(cfg);
    if (s == QF_OK && (s = llm_read_generation_config(*out, folder)) != QF_OK) {
        qf_llm_free(*out);
        *out = NULL;
    }
    return s;
}

qf_status qf_llm_load(const char *folder, qf_llm **out) { return qf_llm_load_ex(folder, NULL, out); }

static void free_linear(llm_linear *L, const qf_llm *m) {
    if (L->w && !(L == &m->lm_head && m->lm_head_tied)) free(L->w);
    qf_qweight_free(L->q);
}

void qf_llm_free(qf_llm *m) {
    if (!m) return;
    for (int i = 0; i < m->n_adapters; i++) qf_lora_free(m->adapters[i].lora);
    for (int i = 0; i < m->n_linears; i++) free_linear(m->linears[i], m);
    qf_llm_cache_free(m->tmp_cache);
    free(m->linears);
    free(m->layers);
    free(m->params);
    free(m->ws);
    free(m);
}

qf_status qf_llm_get_config(const qf_llm *m, qf_llm_config *out) {
    if (!m || !out) return qf_fail(QF_ERR_ARG, "qf_llm_get_config: NULL model or out");
    *out = m->cfg;
    return QF_OK;
}

size_t qf_llm_weight_bytes(const qf_llm *m) {
    if (!m) return 0;
    size_t n = 0;
    for (int i = 0; i < m->n_linears; i++) {
        const llm_linear *L = m->linears[i];
        if (L->q) n += qf_qweight_bytes(L->q);
        else if (!(L == &m->lm_head && m->lm_head_tied)) n += (size_t)L->in * (size_t)L->out * sizeof(float);
    }
    return n;
}

llm_linear *llm_find_linear(qf_llm *m, const char *module) {
    if (!m || !module) return NULL;
    for (int i = 0; i < m->n_linears; i++)
        if (!strcmp(m->linears[i]->name, module)) return m->linears[i];
    return NULL;
}
