/* lora.c - PEFT LoRA adapters read from a folder (adapter_config.json +
 * adapter_model.safetensors) into plain per-module pairs, and the two products that use them:
 * the on-the-fly update y += scaling (x A^T) B^T and the weight merge w += sign scaling B A.
 *
 * What is accepted follows PEFT's LoraConfig / LoraLayer (inference):
 *   - peft_type "LORA"; r (default 8) and lora_alpha (default 8); scaling = alpha / r, or
 *     alpha / sqrt(r) with use_rslora. rank_pattern / alpha_pattern override r / alpha for the
 *     modules they name, matched as PEFT's get_pattern_key does: the first key, in the file's
 *     order, for which re.match(r"(.*\.)?(KEY)$", module) succeeds (KEY is a regular expression;
 *     PCRE2 stands in for Python's re, whose syntax it shares for such patterns).
 *   - lora_dropout is the identity at inference; target_modules / exclude_modules /
 *     layers_to_transform only chose the modules, which the weights file lists itself.
 *   - fan_in_fan_out is accepted: PEFT resets it to false for nn.Linear targets (the only kind
 *     the decoders here have), and lora_A / lora_B are stored as [r,in] / [out,r] either way.
 *   - Everything else that changes the computed function is refused with QF_ERR_UNSUPPORTED
 *     naming the key (see must_be_off and check_init): DoRA, lora_bias, bias != "none",
 *     modules_to_save, target_parameters, trainable_token_indices, layer_replication, QA-LoRA,
 *     aLoRA, Arrow, BD-LoRA, KaSA, MonteCLoRA, VeLoRA, and initialisations that rewrote the base
 *     weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) unless PEFT converted the adapter back to a
 *     plain one (it then writes init_lora_weights true).
 *   - Tensor keys: "base_model.model.<module>.lora_A.weight" [r,in] and ".lora_B.weight"
 *     [out,r], also with an adapter-name infix (".lora_A.<name>.weight"); any float dtype
 *     (converted to float32). Any other key is refused naming the tensor.
 *
 * Invariants: a loaded qf_lora is complete (every module has one A and one B, ranks agree with
 * each other and with the config) and immutable; all A/B floats live in one allocation; module
 * names are the base model's ("model.layers.0.self_attn.q_proj").
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "models/lora.h"
#include "io/io_internal.h"
#include <cblas.h>
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LORA_MAX_CONFIG ((size_t)16 << 20)
#define LORA_PREFIX "base_model.model."

struct qf_lora {
    qf_lora_pair *pairs;
    int n;
    float *data;            /* every A and B, one allocation */
    char base_class[128];   /* auto_mapping.base_model_class or "" */
};

/* ---- adapter_config.json ------------------------------------------------------------------ */

/* Absent, null, false, "" or an empty array/object: the feature is off. */
static int is_off(const cJSON *v) {
    if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 1;
    if ((cJSON_IsArray(v) || cJSON_IsObject(v)) && !v->child) return 1;
    if (cJSON_IsString(v) && v->valuestring && !v->valuestring[0]) return 1;
    return 0;
}

/* Config keys whose non-default value changes the adapted function (PEFT 0.21 names). */
static const struct {
    const char *key, *what;
} must_be_off[] = {
    {"use_dora", "DoRA (a learned magnitude vector rescales every output)"},
    {"lora_bias", "a trained bias on lora_B"},
    {"modules_to_save", "fully trained copies of other modules"},
    {"target_parameters", "LoRA on bare nn.Parameter targets"},
    {"trainable_token_indices", "trained rows of the token embeddings"},
    {"layer_replication", "replicated decoder layers"},
    {"use_qalora", "QA-LoRA (inputs pooled in groups before lora_A)"},
    {"alora_invocation_tokens", "activated LoRA (applied only after the invocation tokens)"},
    {"arrow_config", "Arrow routing among several LoRA experts"},
    {"use_bdlora", "block-diagonal LoRA"},
    {"kasa_config", "KaSA (singular-value adaptation of the base weights)"},
    {"monteclora_config", "MonteCLoRA (sampled LoRA weights)"},
    {"velora_config", "VeLoRA"},
};

/* init_lora_weights values whose training started from rewritten base weights. */
static qf_status check_init(const cJSON *root, const char *label) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "init_lora_weights");
    if (!v || !cJSON_IsString(v) || !v->valuestring) return QF_OK;
    static const char *const rewrites[] = {"pissa", "olora", "corda", "loftq", "lora_ga"};
    for (size_t i = 0; i < sizeof rewrites / sizeof rewrites[0]; i++)
        if (!strncmp(v->valuestring, rewrites[i], strlen(rewrites[i])))
            return qf_fail(QF_ERR_UNSUPPORTED,
                           "%s: init_lora_weights is \"%s\": that initialisation rewrote the base model's weights, "
                           "so the adapter does not apply to the original model (convert it to a plain LoRA with "
                           "PEFT's path_initial_model_for_weight_conversion first)",
                           label, v->valuestring);
    return QF_OK;
}

/* A JSON number that is an integer in [lo, hi]. */
static int as_int(const cJSON *v, int64_t lo, int64_t hi, int64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d)) return 0;
    *out = (int64_t)d;
    return 1;
}

/* One rank_pattern / alpha_pattern entry, compiled. */
typedef struct {
    const char *key;
    double value;
    pcre2_code *re;
} lora_pattern;

typedef struct {
    int64_t r;
    double alpha;
    int rslora;
    lora_pattern *rank_pat, *alpha_pat;
    int n_rank_pat, n_alpha_pat;
    pcre2_match_data *md;
} lora_config;

static void config_clear(lora_config *c) {
    for (int i = 0; i < c->n_rank_pat; i++) pcre2_code_free(c->rank_pat[i].re);
    for (int i = 0; i < c->n_alpha_pat; i++) pcre2_code_free(c->alpha_pat[i].re);
    free(c->rank_pat);
    free(c->alpha_pat);
    pcre2_match_data_free(c->md);
    memset(c, 0, sizeof *c);
}

static qf_status read_patterns(const cJSON *root, const char *name, int is_rank, const char *label,
                               lora_pattern **out, int *n_out) {
    *out = NULL;
    *n_out = 0;
    const cJSON *obj = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!obj || cJSON_IsNull(obj)) return QF_OK;
    if (!cJSON_IsObject(obj))
        return qf_fail(QF_ERR_FORMAT, "%s: %s must be an object {module pattern: %s}", label, name,
                       is_rank ? "rank" : "alpha");
    int n = cJSON_GetArraySize(obj);
    if (!n) return QF_OK;
    lora_pattern *p = calloc((size_t)n, sizeof *p);
    if (!p) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %s", label, name);
    *out = p;
    int i = 0;
    for (const cJSON *e = obj->child; e; e = e->next, i++) {
        int64_t r;
        if (is_rank) {
            if (!as_int(e, 1, INT_MAX, &r))
                return qf_fail(QF_ERR_FORMAT, "%s: %s[\"%s\"] must be a positive integer rank", label, name,
                               e->string);
            p[i].value = (double)r;
        } else {
            if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble))
                return qf_fail(QF_ERR_FORMAT, "%s: %s[\"%s\"] must be a finite number", label, name, e->string);
            p[i].value = e->valuedouble;
        }
        p[i].key = e->string;
        /* PEFT: re.match(rf"(.*\.)?({key})$", module); anchored at the start by the match call */
        size_t kl = strlen(e->string);
        char *pat = malloc(kl + 16);
        if (!pat) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %s", label, name);
        snprintf(pat, kl + 16, "(.*\\.)?(%s)$", e->string);
        int err;
        PCRE2_SIZE at;
        p[i].re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, 0, &err, &at, NULL);
        free(pat);
        *n_out = i + 1; /* so config_clear frees what was compiled */
        if (!p[i].re) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(err, msg, sizeof msg);
            return qf_fail(QF_ERR_FORMAT, "%s: %s key \"%s\" is not a valid regular expression (%s)", label, name,
                           e->string, (const char *)msg);
        }
    }
    return QF_OK;
}

/* PEFT's get_pattern_key: the first pattern (file order) naming the module, or NULL. */
static const lora_pattern *match_pattern(const lora_config *c, const lora_pattern *p, int n, const char *module) {
    for (int i = 0; i < n; i++)
        if (pcre2_match(p[i].re, (PCRE2_SPTR)module, strlen(module), 0, PCRE2_ANCHORED, c->md, NULL) >= 0)
            return &p[i];
    return NULL;
}

static qf_status parse_config(const cJSON *root, const char *label, lora_config *c, char *base_class,
                              size_t base_class_len) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
    if (!v) return qf_fail(QF_ERR_FORMAT, "%s: peft_type is missing (a PEFT LoRA adapter has \"LORA\")", label);
    if (!cJSON_IsString(v) || strcmp(v->valuestring, "LORA") != 0)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: peft_type is %s%s%s: only LoRA adapters (\"LORA\") are supported",
                       label, cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : "not a string",
                       cJSON_IsString(v) ? "\"" : "");
    for (size_t i = 0; i < sizeof must_be_off / sizeof must_be_off[0]; i++)
        if (!is_off(cJSON_GetObjectItemCaseSensitive(root, must_be_off[i].key)))
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: %s is set: %s is not supported (only plain LoRA)", label,
                           must_be_off[i].key, must_be_off[i].what);
    v = cJSON_GetObjectItemCaseSensitive(root, "bias");
    if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "none")))
        return qf_fail(QF_ERR_UNSUPPORTED,
                       "%s: bias is %s%s%s: trained biases of the base model are not supported (only \"none\")", label,
                       cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : "not a string",
                       cJSON_IsString(v) ? "\"" : "");
    QF_TRY(check_init(root, label));

    c->r = 8;
    v = cJSON_GetObjectItemCaseSensitive(root, "r");
    if (v && !as_int(v, 1, INT_MAX, &c->r))
        return qf_fail(QF_ERR_FORMAT, "%s: r must be a positive integer", label);
    c->alpha = 8;
    v = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
    if (v) {
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return qf_fail(QF_ERR_FORMAT, "%s: lora_alpha must be a number", label);
        c->alpha = v->valuedouble;
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "use_rslora");
    if (v && !cJSON_IsNull(v) && !cJSON_IsBool(v))
        return qf_fail(QF_ERR_FORMAT, "%s: use_rslora must be true or false", label);
    c->rslora = v && cJSON_IsTrue(v);
    QF_TRY(read_patterns(root, "rank_pattern", 1, label, &c->rank_pat, &c->n_rank_pat));
    QF_TRY(read_patterns(root, "alpha_pattern", 0, label, &c->alpha_pat, &c->n_alpha_pat));
    if (c->n_rank_pat || c->n_alpha_pat) {
        c->md = pcre2_match_data_create(8, NULL);
        if (!c->md) return qf_fail(QF_ERR_NOMEM, "%s: no memory for pattern matching", label);
    }

    base_class[0] = 0;
    const cJSON *am = cJSON_GetObjectItemCaseSensitive(root, "auto_mapping");
    if (cJSON_IsObject(am)) {
        v = cJSON_GetObjectItemCaseSensitive(am, "base_model_class");
        if (cJSON_IsString(v)) snprintf(base_class, base_class_len, "%s", v->valuestring);
    }
    return QF_OK;
}

/* ---- adapter_model.safetensors ------------------------------------------------------------ */

/* While loading: where each module's A and B are in the file. */
typedef struct {
    char module[128];
    int a, b;   /* tensor indices, -1 if not seen */
} lora_slot;

/* Splits a tensor name into module and A/B; QF_ERR_* naming the tensor if it is no LoRA weight. */
static qf_status parse_key(const char *name, const char *label, char *module, size_t module_len, int *is_b) {
    const size_t pl = strlen(LORA_PREFIX);
    if (strstr(name, "lora_magnitude_vector"))
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: tensor \"%s\" is a DoRA magnitude: DoRA is not supported", label, name);
    if (strstr(name, "lora_embedding_A") || strstr(name, "lora_embedding_B"))
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: tensor \"%s\": LoRA on an embedding layer is not supported", label,
                       name);
    if (strstr(name, ".modules_to_save.") || strstr(name, ".trainable_tokens_"))
        return qf_fail(QF_ERR_UNSUPPORTED,
                       "%s: tensor \"%s\" is a trained copy of a base module (modules_to_save / trainable "
                       "tokens): not supported",
                       label, name);
    /* the last ".lora_A." / ".lora_B." splits module from suffix */
    const char *hit = NULL;
    for (const char *p = name; (p = strstr(p, ".lora_")) != NULL; p++)
        if ((p[6] == 'A' || p[6] == 'B') && p[7] == '.') hit = p;
    const char *rest = hit ? hit + 8 : NULL;
    /* rest: "weight" or "<adapter name>.weight" (the name holds no dot) */
    int ok = hit && !strncmp(name, LORA_PREFIX, pl) && hit > name + pl;
    if (ok && strcmp(rest, "weight") != 0) {
        const char *dot = strchr(rest, '.');
        ok = dot && dot > rest && !strcmp(dot + 1, "weight");
    }
    if (!ok) {
        if (hit && rest && strstr(rest, "bias"))
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: tensor \"%s\" is a LoRA bias: lora_bias is not supported", label,
                           name);
        return qf_fail(QF_ERR_FORMAT,
                       "%s: tensor \"%s\" is not a LoRA weight (expected \"" LORA_PREFIX
                       "<module>.lora_A.weight\" or \".lora_B.weight\")",
                       label, name);
    }
    size_t ml = (size_t)(hit - (name + pl));
    if (ml >= module_len)
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": module name longer than %zu characters", label, name,
                       module_len - 1);
    memcpy(module, name + pl, ml);
    module[ml] = 0;
    *is_b = hit[6] == 'B';
    return QF_OK;
}

static qf_status load_weights(const qf_safetensors *st, const char *label, const lora_config *c, qf_lora *a) {
    int nt = qf_st_count(st);
    if (nt <= 0) return qf_fail(QF_ERR_FORMAT, "%s: holds no tensors (an adapter has lora_A/lora_B pairs)", label);
    lora_slot *slots = calloc((size_t)nt, sizeof *slots);
    if (!slots) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %d tensor slots", label, nt);
    int ns = 0;
    qf_status s = QF_OK;
    for (int t = 0; t < nt && s == QF_OK; t++) {
        qf_tensor_view v;
        if ((s = qf_st_get(st, t, &v)) != QF_OK) break;
        char module[sizeof slots[0].module];
        int is_b = 0;
        if ((s = parse_key(v.name, label, module, sizeof module, &is_b)) != QF_OK) break;
        int k = 0;
        while (k < ns && strcmp(slots[k].module, module) != 0) k++;
        if (k == ns) {
            memcpy(slots[k].module, module, sizeof module);
            slots[k].a = slots[k].b = -1;
            ns++;
        }
        int *idx = is_b ? &slots[k].b : &slots[k].a;
        if (*idx >= 0) {
            qf_tensor_view w;
            qf_st_get(st, *idx, &w);
            s = qf_fail(QF_ERR_FORMAT, "%s: tensors \"%s\" and \"%s\" are both lora_%c of module %s (two adapters "
                        "in one file?)", label, w.name, v.name, is_b ? 'B' : 'A', module);
            break;
        }
        *idx = t;
    }
    if (s != QF_OK) {
        free(slots);
        return s;
    }

    /* shapes: A [r,in], B [out,r], r as configured */
    a->pairs = calloc((size_t)ns, sizeof *a->pairs);
    if (!a->pairs) {
        free(slots);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory for %d pairs", label, ns);
    }
    size_t total = 0;
    for (int k = 0; k < ns && s == QF_OK; k++) {
        qf_tensor_view va, vb;
        if (slots[k].a < 0 || slots[k].b < 0) {
            int have = slots[k].a >= 0 ? slots[k].a : slots[k].b;
            qf_st_get(st, have, &va);
            s = qf_fail(QF_ERR_NOT_FOUND, "%s: tensor \"%s\" has no lora_%c partner for module %s", label, va.name,
                        slots[k].a >= 0 ? 'B' : 'A', slots[k].module);
            break;
        }
        qf_st_get(st, slots[k].a, &va);
        qf_st_get(st, slots[k].b, &vb);
        if (va.ndim != 2 || va.shape[0] < 1 || va.shape[1] < 1) {
            s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\" must be a 2-D [r, in] matrix with r, in >= 1", label, va.name);
            break;
        }
        if (vb.ndim != 2 || vb.shape[0] < 1 || vb.shape[1] < 1) {
            s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\" must be a 2-D [out, r] matrix with out, r >= 1", label,
                        vb.name);
            break;
        }
        if (va.shape[0] != vb.shape[1]) {
            s = qf_fail(QF_ERR_SHAPE, "%s: rank mismatch in module %s: \"%s\" is [%lld, %lld] (r = %lld) but \"%s\" is "
                        "[%lld, %lld] (r = %lld)", label, slots[k].module, va.name, (long long)va.shape[0],
                        (long long)va.shape[1], (long long)va.shape[0], vb.name, (long long)vb.shape[0],
                        (long long)vb.shape[1], (long long)vb.shape[1]);
            break;
        }
        const lora_pattern *rp = match_pattern(c, c->rank_pat, c->n_rank_pat, slots[k].module);
        const lora_pattern *ap = match_pattern(c, c->alpha_pat, c->n_alpha_pat, slots[k].module);
        int64_t r = rp ? (int64_t)rp->value : c->r;
        double alpha = ap ? ap->value : c->alpha;
        if (va.shape[0] != r) {
            char from[200];
            if (rp) snprintf(from, sizeof from, "rank_pattern[\"%s\"]", rp->key);
            else snprintf(from, sizeof from, "r");
            s = qf_fail(QF_ERR_SHAPE, "%s: rank mismatch in module %s: \"%s\" has rank %lld but the config's %s is %lld",
                        label, slots[k].module, va.name, (long long)va.shape[0], from, (long long)r);
            break;
        }
        if (va.shape[1] > INT_MAX || vb.shape[0] > INT_MAX || r > INT_MAX) {
            s = qf_fail(QF_ERR_SHAPE, "%s: module %s: dimensions must fit in int (BLAS)", label, slots[k].module);
            break;
        }
        qf_lora_pair *p = &a->pairs[k];
        memcpy(p->module, slots[k].module, sizeof p->module);
        p->r = r;
        p->in = va.shape[1];
        p->out = vb.shape[0];
        p->scaling = (float)(c->rslora ? alpha / sqrt((double)r) : alpha / (double)r);
        size_t na, nb;
        if ((s = qf_mul_size((size_t)r, (size_t)p->in, "lora_A", &na)) != QF_OK) break;
        if ((s = qf_mul_size((size_t)r, (size_t)p->out, "lora_B", &nb)) != QF_OK) break;
        total += na + nb;
    }
    if (s == QF_OK) {
        size_t bytes;
        s = qf_mul_size(total, sizeof(float), "adapter weights", &bytes);
        if (s == QF_OK && !(a->data = malloc(bytes ? bytes : 1)))
            s = qf_fail(QF_ERR_NOMEM, "%s: no memory for %zu bytes of adapter weights", label, bytes);
    }
    float *at = a->data;
    for (int k = 0; k < ns && s == QF_OK; k++) {
        qf_lora_pair *p = &a->pairs[k];
        qf_tensor_view va, vb;
        qf_st_get(st, slots[k].a, &va);
        qf_st_get(st, slots[k].b, &vb);
        int64_t sa[2] = {p->r, p->in}, sb[2] = {p->out, p->r};
        p->A = at;
        at += p->r * p->in;
        p->B = at;
        at += p->out * p->r;
        if ((s = qf_st_read_f32(st, va.name, 2, sa, p->A)) != QF_OK) break;
        s = qf_st_read_f32(st, vb.name, 2, sb, p->B);
    }
    free(slots);
    if (s == QF_OK) a->n = ns;
    return s;
}

/* ---- public (internal) API ---------------------------------------------------------------- */

qf_status qf_lora_load(const char *folder, qf_lora **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_lora_load: out is NULL");
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "qf_lora_load: folder is NULL");
    size_t fl = strlen(folder);
    char *cfg_path = malloc(fl + 64), *st_path = malloc(fl + 64);
    qf_lora *a = calloc(1, sizeof *a);
    lora_config c;
    memset(&c, 0, sizeof c);
    unsigned char *buf = NULL;
    cJSON *root = NULL;
    qf_safetensors *st = NULL;
    qf_status s = QF_OK;
    if (!cfg_path || !st_path || !a) {
        s = qf_fail(QF_ERR_NOMEM, "qf_lora_load: no memory");
        goto done;
    }
    snprintf(cfg_path, fl + 64, "%s/adapter_config.json", folder);
    snprintf(st_path, fl + 64, "%s/adapter_model.safetensors", folder);
    size_t len;
    if ((s = qf_io_read_file(cfg_path, LORA_MAX_CONFIG, "adapter config", &buf, &len)) != QF_OK) goto done;
    if ((s = qf_io_parse_json_object((const char *)buf, len, cfg_path, "adapter config", &root)) != QF_OK) goto done;
    if ((s = parse_config(root, cfg_path, &c, a->base_class, sizeof a->base_class)) != QF_OK) goto done;
    if ((s = qf_st_open(st_path, &st)) != QF_OK) goto done;
    s = load_weights(st, st_path, &c, a);
done:
    qf_st_close(st);
    config_clear(&c);
    cJSON_Delete(root);
    free(buf);
    free(cfg_path);
    free(st_path);
    if (s != QF_OK) {
        qf_lora_free(a);
        return s;
    }
    *out = a;
    return QF_OK;
}

void qf_lora_free(qf_lora *a) {
    if (!a) return;
    free(a->pairs);
    free(a->data);
    free(a);
}

int qf_lora_num_pairs(const qf_lora *a) { return a ? a->n : 0; }

const qf_lora_pair *qf_lora_pair_at(const qf_lora *a, int i) {
    return a && i >= 0 && i < a->n ? &a->pairs[i] : NULL;
}

const qf_lora_pair *qf_lora_find(const qf_lora *a, const char *module) {
    if (!a || !module) return NULL;
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->pairs[i].module, module)) return &a->pairs[i];
    return NULL;
}

const char *qf_lora_base_class(const qf_lora *a) { return a ? a->base_class : ""; }

qf_status qf_lora_apply(const qf_lora_pair *p, const float *x, int64_t N, float *y) {
    if (!p) return qf_fail(QF_ERR_ARG, "qf_lora_apply: pair is NULL");
    if (N < 0 || N > INT_MAX)
        return qf_fail(QF_ERR_ARG, "qf_lora_apply(%s): N = %lld must be in [0, INT_MAX]", p->module, (long long)N);
    if (N == 0) return QF_OK;
    if (!x || !y) return qf_fail(QF_ERR_ARG, "qf_lora_apply(%s): %s is NULL", p->module, !x ? "x" : "y");
    size_t bytes;
    QF_TRY(qf_mul_size((size_t)N * (size_t)p->r, sizeof(float), "qf_lora_apply temp", &bytes));
    void *tmp;
    QF_TRY(qf_scratch(bytes, &tmp));
    float *t = tmp;
    const int n = (int)N, r = (int)p->r, in = (int)p->in, out = (int)p->out;
    /* t[N,r] = x[N,in] A^T;  y[N,out] += scaling * t B^T  (PEFT: lora_B(lora_A(x)) * scaling) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r, in, 1.0f, x, in, p->A, in, 0.0f, t, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, r, p->scaling, t, r, p->B, r, 1.0f, y, out);
    return QF_OK;
}

qf_status qf_lora_merge(const qf_lora_pair *p, float *w, float sign) {
    if (!p) return qf_fail(QF_ERR_ARG, "qf_lora_merge: pair is NULL");
    if (!w) return qf_fail(QF_ERR_ARG, "qf_lora_merge(%s): w is NULL", p->module);
    if (sign != 1.0f && sign != -1.0f)
        return qf_fail(QF_ERR_ARG, "qf_lora_merge(%s): sign is %g, must be +1 (merge) or -1 (unmerge)", p->module,
                       (double)sign);
    /* w[out,in] += sign * scaling * B[out,r] A[r,in] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)p->out, (int)p->in, (int)p->r, sign * p->scaling,
                p->B, (int)p->r, p->A, (int)p->in, 1.0f, w, (int)p->in);
    return QF_OK;
}
