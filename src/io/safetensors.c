/* safetensors.c - reads and writes the safetensors format (Hugging Face).
 *
 * Layout: u64 little-endian N, then N bytes of JSON header, then the data section. The header
 * maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
 * data section) plus an optional "__metadata__" object of string values.
 *
 * Invariants of an open handle (established by validate(), relied on everywhere else):
 *   - every tensor has a known dtype, 0..QF_MAX_DIMS non-negative dims, and
 *     nbytes = prod(shape) * dtype size = end - begin, with the whole range inside the data section;
 *   - tensors sorted by begin neither overlap nor leave gaps, and the last one ends exactly at the
 *     end of the file (the Rust reference implementation's rule), so every data byte is owned;
 *   - names are unique; names and metadata strings are copies owned by the handle, so the cJSON
 *     tree is freed before qf_st_open returns.
 * Errors name the file (path or label), the tensor and the rule broken. */
#include "io_internal.h"
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000ull /* the Rust implementation's limit */

struct qf_safetensors {
    char *label;
    unsigned char *bytes; /* whole file: mmap'd (is_mapped) or malloc'd copy */
    size_t len;
    int is_mapped;
    int n;
    qf_tensor_view *t;    /* in header order */
    int *by_name;         /* indices into t sorted by name, for qf_st_find */
    int n_meta;
    char **meta;          /* n_meta key, value pairs */
};

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static void format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t at = 0;
    at += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, i ? ",%" PRId64 : "%" PRId64, shape[i]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

/* A JSON number that is a non-negative integer exactly representable as a double (< 2^53). */
static int json_uint(const cJSON *x, uint64_t *out) {
    if (!cJSON_IsNumber(x)) return 0;
    double d = x->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d) return 0;
    *out = (uint64_t)d;
    return 1;
}

void qf_st_close(qf_safetensors *f) {
    if (!f) return;
    if (f->t)
        for (int i = 0; i < f->n; i++) free((char *)f->t[i].name);
    if (f->meta)
        for (int i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->t);
    free(f->by_name);
    free(f->meta);
    if (f->bytes) {
        if (f->is_mapped) munmap(f->bytes, f->len);
        else free(f->bytes);
    }
    free(f->label);
    free(f);
}

/* qsort comparators get no context; the arrays being sorted carry what they need. */
typedef struct { uint64_t begin, end; int idx; } span;
static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx - y->idx;
}
typedef struct { const char *name; int idx; } named;
static int cmp_named(const void *a, const void *b) {
    const named *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : x->idx - y->idx;
}

static qf_status parse_entry(qf_safetensors *f, const cJSON *e, size_t data_len, uint64_t *begin_out,
                             uint64_t *end_out) {
    const char *L = f->label, *name = e->string;
    qf_tensor_view *v = &f->t[f->n];
    if (!cJSON_IsObject(e))
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": header entry is not a JSON object", L, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": \"dtype\" is missing or not a string", L, name);
    if (qf_dtype_parse(dt->valuestring, &v->dtype) != QF_OK)
        return qf_fail_prefix(QF_ERR_DTYPE, "%s: tensor \"%s\"", L, name);
    if (!cJSON_IsArray(sh))
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": \"shape\" is missing or not an array", L, name);
    int nd = cJSON_GetArraySize(sh);
    if (nd > QF_MAX_DIMS)
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": shape has %d dims, more than QF_MAX_DIMS = %d",
                       L, name, nd, QF_MAX_DIMS);
    v->ndim = nd;
    uint64_t count = 1;
    int overflow = 0, d = 0;
    for (const cJSON *x = sh->child; x; x = x->next, d++) {
        uint64_t dim;
        if (!json_uint(x, &dim))
            return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": shape[%d] is not a non-negative integer", L, name, d);
        v->shape[d] = (int64_t)dim;
        if (dim != 0 && count > UINT64_MAX / dim) overflow = 1;
        else count *= dim;
    }
    size_t esize = qf_dtype_size(v->dtype);
    /* a zero dim makes the product 0 even if earlier dims overflowed */
    for (int i = 0; i < nd; i++) if (v->shape[i] == 0) { overflow = 0; count = 0; }
    if (overflow || count > UINT64_MAX / esize || count * esize > SIZE_MAX)
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": shape x dtype size overflows", L, name);
    uint64_t need = count * esize, b, en;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !json_uint(off->child, &b) ||
        !json_uint(off->child->next, &en))
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": \"data_offsets\" is missing or not [begin, end] "
                       "non-negative integers", L, name);
    if (b > en)
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": data_offsets begin %" PRIu64 " > end %" PRIu64,
                       L, name, b, en);
    if (en > data_len)
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": data_offsets end %" PRIu64
                       " is outside the data section (%zu bytes)", L, name, en, data_len);
    if (en - b != need) {
        char s[160];
        format_shape(s, sizeof s, nd, v->shape);
        return qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": shape %s x %s (%zu bytes) = %" PRIu64
                       " bytes but data_offsets span %" PRIu64 " bytes", L, name, s,
                       qf_dtype_name(v->dtype), esize, need, en - b);
    }
    v->nbytes = (size_t)need;
    *begin_out = b;
    *end_out = en;
    v->name = dup_str(name);
    if (!v->name) return qf_fail(QF_ERR_NOMEM, "%s: no memory for tensor name", L);
    f->n++;
    return QF_OK;
}

static qf_status parse_metadata(qf_safetensors *f, const cJSON *m) {
    if (!cJSON_IsObject(m))
        return qf_fail(QF_ERR_FORMAT, "%s: __metadata__ is not a JSON object", f->label);
    int n = cJSON_GetArraySize(m);
    f->meta = calloc((size_t)n * 2 + 1, sizeof *f->meta);
    if (!f->meta) return qf_fail(QF_ERR_NOMEM, "%s: no memory for __metadata__", f->label);
    for (const cJSON *x = m->child; x; x = x->next) {
        if (!cJSON_IsString(x))
            return qf_fail(QF_ERR_FORMAT, "%s: __metadata__ value of key \"%s\" is not a string", f->label, x->string);
        for (int i = 0; i < f->n_meta; i++)
            if (!strcmp(f->meta[2 * i], x->string))
                return qf_fail(QF_ERR_FORMAT, "%s: __metadata__ has duplicate key \"%s\"", f->label, x->string);
        f->meta[2 * f->n_meta] = dup_str(x->string);
        f->meta[2 * f->n_meta + 1] = dup_str(x->valuestring);
        f->n_meta++;
        if (!f->meta[2 * f->n_meta - 2] || !f->meta[2 * f->n_meta - 1])
            return qf_fail(QF_ERR_NOMEM, "%s: no memory for __metadata__", f->label);
    }
    return QF_OK;
}

/* Checks the whole file in f->bytes[0..len) and fills the tensor table. */
static qf_status validate(qf_safetensors *f) {
    const char *L = f->label;
    if (f->len < 8)
        return qf_fail(QF_ERR_FORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length", L, f->len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f->bytes[i];
    if (hlen > ST_MAX_HEADER)
        return qf_fail(QF_ERR_FORMAT, "%s: header length %" PRIu64 " exceeds the %llu-byte limit", L, hlen,
                       ST_MAX_HEADER);
    if (hlen > f->len - 8)
        return qf_fail(QF_ERR_FORMAT, "%s: header length %" PRIu64 " exceeds the %zu bytes after the length field",
                       L, hlen, f->len - 8);
    const char *text = (const char *)f->bytes + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, (size_t)hlen, &end, 0);
    if (!root) {
        size_t at = end && end >= text && end <= text + hlen ? (size_t)(end - text) : 0;
        return qf_fail(QF_ERR_FORMAT, "%s: header is not valid JSON (error near header byte %zu)", L, at);
    }
    /* only whitespace may follow the JSON value (the writer pads with spaces) */
    for (const char *p = end; p && p < text + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return qf_fail(QF_ERR_FORMAT, "%s: header is not valid JSON (trailing bytes after the object at "
                           "header byte %zu)", L, (size_t)(p - text));
        }
    qf_status s = QF_OK;
    span *spans = NULL;
    named *names = NULL;
    if (!cJSON_IsObject(root)) {
        s = qf_fail(QF_ERR_FORMAT, "%s: header is not a JSON object", L);
        goto done;
    }
    size_t data_len = f->len - 8 - (size_t)hlen;
    int n = cJSON_GetArraySize(root);
    f->t = calloc((size_t)n + 1, sizeof *f->t);
    spans = calloc((size_t)n + 1, sizeof *spans);
    names = calloc((size_t)n + 1, sizeof *names);
    if (!f->t || !spans || !names) {
        s = qf_fail(QF_ERR_NOMEM, "%s: no memory for %d header entries", L, n);
        goto done;
    }
    int seen_meta = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) {
            if (seen_meta++) {
                s = qf_fail(QF_ERR_FORMAT, "%s: __metadata__ appears twice", L);
                goto done;
            }
            if ((s = parse_metadata(f, e)) != QF_OK) goto done;
            continue;
        }
        int i = f->n;
        if ((s = parse_entry(f, e, data_len, &spans[i].begin, &spans[i].end)) != QF_OK) goto done;
        spans[i].idx = i;
        names[i].name = f->t[i].name;
        names[i].idx = i;
        f->t[i].data = f->bytes + 8 + hlen + spans[i].begin;
    }
    /* unique names */
    qsort(names, (size_t)f->n, sizeof *names, cmp_named);
    for (int i = 1; i < f->n; i++)
        if (!strcmp(names[i].name, names[i - 1].name)) {
            s = qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": duplicate tensor name in the header", L, names[i].name);
            goto done;
        }
    /* no overlap, no gap, nothing after the last tensor */
    qsort(spans, (size_t)f->n, sizeof *spans, cmp_span);
    uint64_t covered = 0; /* every byte below this belongs to a tensor */
    const char *last = NULL;
    for (int i = 0; i < f->n; i++) {
        const span *sp = &spans[i];
        const char *nm = f->t[sp->idx].name;
        if (sp->begin < covered) {
            s = qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": bytes [%" PRIu64 ",%" PRIu64 ") overlap tensor \"%s\" "
                        "(which ends at %" PRIu64 ")", L, nm, sp->begin, sp->end, last, covered);
            goto done;
        }
        if (sp->begin > covered) {
            s = qf_fail(QF_ERR_FORMAT, "%s: tensor \"%s\": gap of %" PRIu64 " unused bytes [%" PRIu64 ",%" PRIu64
                        ") in the data section before it", L, nm, sp->begin - covered, covered, sp->begin);
            goto done;
        }
        if (sp->end > covered || !last) { covered = sp->end; last = nm; }
    }
    if (covered != data_len) {
        s = qf_fail(QF_ERR_FORMAT, "%s: gap: the data section has %zu bytes but tensors cover only %" PRIu64
                    " (unused bytes at the end%s%s%s)", L, data_len, covered, last ? ", after tensor \"" : "",
                    last ? last : "", last ? "\"" : "");
        goto done;
    }
    f->by_name = malloc(((size_t)f->n + 1) * sizeof *f->by_name);
    if (!f->by_name) {
        s = qf_fail(QF_ERR_NOMEM, "%s: no memory for the name index", L);
        goto done;
    }
    for (int i = 0; i < f->n; i++) f->by_name[i] = names[i].idx;
done:
    free(spans);
    free(names);
    cJSON_Delete(root);
    return s;
}

static qf_status new_handle(const char *label, qf_safetensors **out) {
    qf_safetensors *f = calloc(1, sizeof *f);
    if (!f || !(f->label = dup_str(label))) {
        free(f);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory for the file handle", label);
    }
    *out = f;
    return QF_OK;
}

qf_status qf_st_open(const char *path, qf_safetensors **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_st_open: out is NULL");
    *out = NULL;
    if (!path) return qf_fail(QF_ERR_ARG, "qf_st_open: path is NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qf_fail(QF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return qf_fail(QF_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return qf_fail(QF_ERR_IO, "%s: not a regular file", path);
    }
    qf_safetensors *f;
    qf_status s = new_handle(path, &f);
    if (s != QF_OK) { close(fd); return s; }
    f->len = (size_t)st.st_size;
    if (f->len >= 8) {
        void *p = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            qf_st_close(f);
            return qf_fail(QF_ERR_IO, "%s: cannot mmap %zu bytes: %s", path, (size_t)st.st_size, strerror(e));
        }
        f->bytes = p;
        f->is_mapped = 1;
    }
    close(fd);
    if ((s = validate(f)) != QF_OK) {
        qf_st_close(f);
        return s;
    }
    *out = f;
    return QF_OK;
}

qf_status qf_st_open_memory(const void *buf, size_t len, const char *label, qf_safetensors **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_st_open_memory: out is NULL");
    *out = NULL;
    if (!label) label = "<memory>";
    if (!buf && len) return qf_fail(QF_ERR_ARG, "%s: buffer is NULL", label);
    qf_safetensors *f;
    QF_TRY(new_handle(label, &f));
    f->bytes = malloc(len ? len : 1);
    if (!f->bytes) {
        qf_st_close(f);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory to copy %zu bytes", label, len);
    }
    if (len) memcpy(f->bytes, buf, len);
    f->len = len;
    qf_status s = validate(f);
    if (s != QF_OK) {
        qf_st_close(f);
        return s;
    }
    *out = f;
    return QF_OK;
}

int qf_st_count(const qf_safetensors *f) { return f ? f->n : 0; }

qf_status qf_st_get(const qf_safetensors *f, int index, qf_tensor_view *out) {
    if (!f || !out) return qf_fail(QF_ERR_ARG, "qf_st_get: NULL file or out");
    if (index < 0 || index >= f->n)
        return qf_fail(QF_ERR_ARG, "%s: tensor index %d out of range [0,%d)", f->label, index, f->n);
    *out = f->t[index];
    return QF_OK;
}

qf_status qf_st_find(const qf_safetensors *f, const char *name, qf_tensor_view *out) {
    if (!f || !name || !out) return qf_fail(QF_ERR_ARG, "qf_st_find: NULL file, name or out");
    int lo = 0, hi = f->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(f->t[f->by_name[mid]].name, name);
        if (c == 0) { *out = f->t[f->by_name[mid]]; return QF_OK; }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return qf_fail(QF_ERR_NOT_FOUND, "%s: no tensor named \"%s\"", f->label, name);
}

const char *qf_st_metadata(const qf_safetensors *f, const char *key) {
    if (!f || !key) return NULL;
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta[2 * i], key)) return f->meta[2 * i + 1];
    return NULL;
}

qf_status qf_st_read_f32(const qf_safetensors *f, const char *name, int ndim, const int64_t *shape,
                         float *dst) {
    if (!f || !name) return qf_fail(QF_ERR_ARG, "qf_st_read_f32: NULL file or name");
    if (ndim < 0 || ndim > QF_MAX_DIMS || (ndim > 0 && !shape))
        return qf_fail(QF_ERR_ARG, "%s: tensor \"%s\": expected ndim %d is not in 0..%d (or shape is NULL)",
                       f->label, name, ndim, QF_MAX_DIMS);
    qf_tensor_view v;
    QF_TRY(qf_st_find(f, name, &v));
    int same = v.ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = v.shape[i] == shape[i];
    if (!same) {
        char want[160], got[160];
        format_shape(want, sizeof want, ndim, shape);
        format_shape(got, sizeof got, v.ndim, v.shape);
        return qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\": expected shape %s but the file has %s", f->label, name,
                       want, got);
    }
    size_t n = v.nbytes / qf_dtype_size(v.dtype);
    if (n && !dst) return qf_fail(QF_ERR_ARG, "%s: tensor \"%s\": destination is NULL", f->label, name);
    if (v.dtype != QF_F32 && v.dtype != QF_F64 && v.dtype != QF_F16 && v.dtype != QF_BF16)
        return qf_fail(QF_ERR_DTYPE, "%s: tensor \"%s\": dtype %s is not a float type (F64/F32/F16/BF16)",
                       f->label, name, qf_dtype_name(v.dtype));
    /* n == 0 skips the call: memmove(NULL, ..., 0) inside it would be undefined behaviour */
    if (n && qf_to_f32(v.dtype, v.data, dst, n) != QF_OK)
        return qf_fail_prefix(QF_ERR_DTYPE, "%s: tensor \"%s\"", f->label, name);
    return QF_OK;
}

/* ---- writing ---------------------------------------------------------------------------- */

static qf_status add_raw_int_array(cJSON *obj, const char *key, const int64_t *v, int n) {
    char buf[QF_MAX_DIMS * 24 + 4];
    size_t at = 0;
    buf[at++] = '[';
    for (int i = 0; i < n; i++)
        at += (size_t)snprintf(buf + at, sizeof buf - at, i ? ",%" PRId64 : "%" PRId64, v[i]);
    buf[at++] = ']';
    buf[at] = '\0';
    /* raw text keeps 64-bit integers exact; cJSON numbers are doubles */
    if (!cJSON_AddRawToObject(obj, key, buf)) return QF_ERR_NOMEM;
    return QF_OK;
}

qf_status qf_st_write(const char *path, const qf_tensor_ref *tensors, int n, const char *const *metadata) {
    if (!path || !*path) return qf_fail(QF_ERR_ARG, "qf_st_write: path is NULL or empty");
    if (n < 0 || (n > 0 && !tensors))
        return qf_fail(QF_ERR_ARG, "%s: qf_st_write: n = %d with tensors %s", path, n, tensors ? "set" : "NULL");
    size_t *sizes = calloc((size_t)n + 1, sizeof *sizes);
    named *names = calloc((size_t)n + 1, sizeof *names);
    qf_io_chunk *chunks = calloc((size_t)n + 2, sizeof *chunks);
    cJSON *root = cJSON_CreateObject();
    char *json = NULL;
    unsigned char *head = NULL;
    qf_status s = QF_OK;
    if (!sizes || !names || !chunks || !root) {
        s = qf_fail(QF_ERR_NOMEM, "%s: no memory to build the header", path);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const qf_tensor_ref *t = &tensors[i];
        if (!t->name || !*t->name) {
            s = qf_fail(QF_ERR_ARG, "%s: tensor %d has a NULL or empty name", path, i);
            goto done;
        }
        if (!strcmp(t->name, "__metadata__")) {
            s = qf_fail(QF_ERR_ARG, "%s: tensor %d: the name \"__metadata__\" is reserved", path, i);
            goto done;
        }
        if ((unsigned)t->dtype >= QF_DTYPE_COUNT) {
            s = qf_fail(QF_ERR_DTYPE, "%s: tensor \"%s\": unknown dtype %d", path, t->name, (int)t->dtype);
            goto done;
        }
        if (t->ndim < 0 || t->ndim > QF_MAX_DIMS) {
            s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\": ndim %d is not in 0..%d", path, t->name, t->ndim, QF_MAX_DIMS);
            goto done;
        }
        size_t bytes = qf_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) {
                s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\": shape[%d] = %" PRId64 " is negative", path, t->name,
                            d, t->shape[d]);
                goto done;
            }
            if ((uint64_t)t->shape[d] > SIZE_MAX ||
                qf_mul_size(bytes, (size_t)t->shape[d], "shape x dtype size", &bytes) != QF_OK) {
                s = qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\": shape x dtype size overflows", path, t->name);
                goto done;
            }
        }
        if (bytes && !t->data) {
            s = qf_fail(QF_ERR_ARG, "%s: tensor \"%s\": data is NULL for %zu bytes", path, t->name, bytes);
            goto done;
        }
        sizes[i] = bytes;
        names[i].name = t->name;
        names[i].idx = i;
    }
    qsort(names, (size_t)n, sizeof *names, cmp_named);
    for (int i = 1; i < n; i++)
        if (!strcmp(names[i].name, names[i - 1].name)) {
            s = qf_fail(QF_ERR_ARG, "%s: tensor \"%s\": duplicate tensor name (tensors %d and %d)", path,
                        names[i].name, names[i - 1].idx, names[i].idx);
            goto done;
        }
    if (metadata && metadata[0]) {
        cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
        if (!m) { s = qf_fail(QF_ERR_NOMEM, "%s: no memory for __metadata__", path); goto done; }
        for (int i = 0; metadata[i]; i += 2) {
            if (!metadata[i + 1]) {
                s = qf_fail(QF_ERR_ARG, "%s: metadata key \"%s\" has no value (list must be key, value, ..., NULL)",
                            path, metadata[i]);
                goto done;
            }
            if (cJSON_GetObjectItemCaseSensitive(m, metadata[i])) {
                s = qf_fail(QF_ERR_ARG, "%s: metadata key \"%s\" appears twice", path, metadata[i]);
                goto done;
            }
            if (!cJSON_AddStringToObject(m, metadata[i], metadata[i + 1])) {
                s = qf_fail(QF_ERR_NOMEM, "%s: no memory for __metadata__", path);
                goto done;
            }
        }
    }
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        const qf_tensor_ref *t = &tensors[i];
        cJSON *e = cJSON_CreateObject();
        int64_t off[2] = {(int64_t)offset, (int64_t)(offset + sizes[i])};
        if (!e || !cJSON_AddItemToObject(root, t->name, e) ||
            !cJSON_AddStringToObject(e, "dtype", qf_dtype_name(t->dtype)) ||
            add_raw_int_array(e, "shape", t->shape, t->ndim) != QF_OK ||
            add_raw_int_array(e, "data_offsets", off, 2) != QF_OK) {
            if (e && !cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(root, t->name))) cJSON_Delete(e);
            s = qf_fail(QF_ERR_NOMEM, "%s: no memory to build the header", path);
            goto done;
        }
        offset += sizes[i];
        chunks[i + 1].data = t->data;
        chunks[i + 1].len = sizes[i];
    }
    json = cJSON_PrintUnformatted(root);
    if (!json) { s = qf_fail(QF_ERR_NOMEM, "%s: no memory to print the header", path); goto done; }
    size_t jlen = strlen(json), hlen = qf_align_up(jlen, 8);
    head = malloc(8 + hlen);
    if (!head) { s = qf_fail(QF_ERR_NOMEM, "%s: no memory for the header", path); goto done; }
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(head + 8, json, jlen);
    memset(head + 8 + jlen, ' ', hlen - jlen); /* pad so the data section starts 8-aligned */
    chunks[0].data = head;
    chunks[0].len = 8 + hlen;
    s = qf_io_write_atomic(path, chunks, n + 1, "safetensors");
done:
    free(head);
    free(json);
    cJSON_Delete(root);
    free(chunks);
    free(names);
    free(sizes);
    return s;
}
