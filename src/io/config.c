/* config.c - Hugging Face config.json access by dotted path ("text_config.hidden_size").
 *
 * A key is looked up segment by segment; at each object the whole remaining path is tried as a
 * literal key first, so keys that themselves contain dots still resolve. Typed getters never
 * convert between JSON types (a string "12" is not an int); integers are JSON numbers with no
 * fractional part. JSON null counts as absent for the *_or getters (Hugging Face writes null for
 * "use the default"), but is a type error for the plain getters.
 * Invariants: the handle owns the cJSON tree and its label; strings returned by
 * qf_config_string point into that tree and live until qf_config_free. */
#include "io_internal.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_MAX_FILE ((size_t)64 << 20)

struct qf_config {
    cJSON *root;
    char *label;
};

const char *qf_config_label(const qf_config *c) { return c && c->label ? c->label : "config"; }

qf_status qf_io_parse_json_object(const char *json, size_t len, const char *label, const char *what,
                                  cJSON **out) {
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json ? json : "", len, &end, 0);
    if (!root) {
        size_t at = end && json && end >= json && end <= json + len ? (size_t)(end - json) : 0;
        return qf_fail(QF_ERR_FORMAT, "%s: %s is not valid JSON (error near byte %zu of %zu)", label, what, at, len);
    }
    for (const char *p = end; p && p < json + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            cJSON_Delete(root);
            return qf_fail(QF_ERR_FORMAT, "%s: %s is not valid JSON (trailing text at byte %zu)", label, what,
                           (size_t)(p - json));
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return qf_fail(QF_ERR_FORMAT, "%s: %s is not a JSON object", label, what);
    }
    *out = root;
    return QF_OK;
}

qf_status qf_config_parse(const char *json, size_t len, const char *label, qf_config **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_config_parse: out is NULL");
    *out = NULL;
    if (!label) label = "<config>";
    if (!json && len) return qf_fail(QF_ERR_ARG, "%s: config text is NULL", label);
    cJSON *root = NULL;
    QF_TRY(qf_io_parse_json_object(json, len, label, "config", &root));
    qf_config *c = calloc(1, sizeof *c);
    size_t ln = strlen(label) + 1;
    char *lab = malloc(ln);
    if (!c || !lab) {
        free(c);
        free(lab);
        cJSON_Delete(root);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory for the config handle", label);
    }
    memcpy(lab, label, ln);
    c->root = root;
    c->label = lab;
    *out = c;
    return QF_OK;
}

qf_status qf_config_load(const char *path, qf_config **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_config_load: out is NULL");
    *out = NULL;
    unsigned char *buf;
    size_t len;
    QF_TRY(qf_io_read_file(path, CONFIG_MAX_FILE, "config", &buf, &len));
    qf_status s = qf_config_parse((const char *)buf, len, path, out);
    free(buf);
    return s;
}

void qf_config_free(qf_config *c) {
    if (!c) return;
    cJSON_Delete(c->root);
    free(c->label);
    free(c);
}

/* The child of obj whose key is exactly key[0..n). */
static const cJSON *child_n(const cJSON *obj, const char *key, size_t n) {
    for (const cJSON *x = obj->child; x; x = x->next)
        if (x->string && strlen(x->string) == n && !memcmp(x->string, key, n)) return x;
    return NULL;
}

static const cJSON *lookup(const cJSON *obj, const char *path, int depth) {
    if (!cJSON_IsObject(obj) || depth > 64) return NULL;
    size_t n = strlen(path);
    const cJSON *x = child_n(obj, path, n);
    if (x) return x;
    for (const char *dot = strchr(path, '.'); dot; dot = strchr(dot + 1, '.')) {
        const cJSON *sub = child_n(obj, path, (size_t)(dot - path));
        if (sub && cJSON_IsObject(sub)) {
            const cJSON *r = lookup(sub, dot + 1, depth + 1);
            if (r) return r;
        }
    }
    return NULL;
}

static qf_status find(const qf_config *c, const char *key, const cJSON **out) {
    if (!c || !key) return qf_fail(QF_ERR_ARG, "qf_config: NULL config or key");
    *out = lookup(c->root, key, 0);
    if (!*out) return qf_fail(QF_ERR_NOT_FOUND, "%s: key \"%s\" not found", c->label, key);
    return QF_OK;
}

static const char *type_name(const cJSON *x) {
    if (cJSON_IsNull(x)) return "null";
    if (cJSON_IsBool(x)) return "a boolean";
    if (cJSON_IsNumber(x)) return "a number";
    if (cJSON_IsString(x)) return "a string";
    if (cJSON_IsArray(x)) return "an array";
    if (cJSON_IsObject(x)) return "an object";
    return "of an unknown type";
}

int qf_config_has(const qf_config *c, const char *key) {
    return c && key && lookup(c->root, key, 0) != NULL;
}

qf_status qf_config_int(const qf_config *c, const char *key, int64_t *out) {
    const cJSON *x;
    QF_TRY(find(c, key, &x));
    if (!cJSON_IsNumber(x))
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" is %s, expected an integer", c->label, key, type_name(x));
    double d = x->valuedouble;
    /* -2^63 is exact in double; 2^63 is not representable in int64 */
    if (floor(d) != d || !(d >= -9223372036854775808.0 && d < 9223372036854775808.0))
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" = %g is not an integer in int64 range", c->label, key, d);
    if (out) *out = (int64_t)d;
    return QF_OK;
}

qf_status qf_config_float(const qf_config *c, const char *key, double *out) {
    const cJSON *x;
    QF_TRY(find(c, key, &x));
    if (!cJSON_IsNumber(x))
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" is %s, expected a number", c->label, key, type_name(x));
    if (out) *out = x->valuedouble;
    return QF_OK;
}

qf_status qf_config_bool(const qf_config *c, const char *key, int *out) {
    const cJSON *x;
    QF_TRY(find(c, key, &x));
    if (!cJSON_IsBool(x))
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" is %s, expected true or false", c->label, key, type_name(x));
    if (out) *out = cJSON_IsTrue(x) ? 1 : 0;
    return QF_OK;
}

qf_status qf_config_string(const qf_config *c, const char *key, const char **out) {
    const cJSON *x;
    QF_TRY(find(c, key, &x));
    if (!cJSON_IsString(x))
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" is %s, expected a string", c->label, key, type_name(x));
    if (out) *out = x->valuestring;
    return QF_OK;
}

/* absent or null -> 1 (use the default) */
static int absent(const qf_config *c, const char *key) {
    const cJSON *x = lookup(c->root, key, 0);
    return !x || cJSON_IsNull(x);
}

qf_status qf_config_int_or(const qf_config *c, const char *key, int64_t def, int64_t *out) {
    if (!c || !key) return qf_fail(QF_ERR_ARG, "qf_config: NULL config or key");
    if (absent(c, key)) {
        if (out) *out = def;
        return QF_OK;
    }
    return qf_config_int(c, key, out);
}

qf_status qf_config_float_or(const qf_config *c, const char *key, double def, double *out) {
    if (!c || !key) return qf_fail(QF_ERR_ARG, "qf_config: NULL config or key");
    if (absent(c, key)) {
        if (out) *out = def;
        return QF_OK;
    }
    return qf_config_float(c, key, out);
}
