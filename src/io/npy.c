/* npy.c - reads and writes NumPy .npy files (format versions 1.0, 2.0, 3.0).
 *
 * Layout: "\x93NUMPY", major, minor, header length (u16 LE for 1.0, u32 LE for 2.0/3.0), then a
 * Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with
 * spaces and ended by '\n', then the raw data. The header is a Python literal, not JSON, so a
 * small parser below accepts exactly the subset numpy writes: quoted strings without escapes,
 * True/False, tuples of non-negative integers.
 *
 * Invariants: a successful parse yields a known little-endian dtype, C order, 0..QF_MAX_DIMS
 * dims whose product x element size equals the number of data bytes present (no more, no less),
 * and out->data owned by the caller (never NULL, even for an empty array). On failure *out is
 * zeroed and nothing is allocated. Writing produces version 1.0 with the data 64-byte aligned,
 * the same bytes numpy 1.24's np.save writes. */
#include "io_internal.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAX_FILE ((size_t)1 << 40)

static const struct { const char *descr; qf_dtype dtype; } npy_types[] = {
    {"<f4", QF_F32}, {"<f8", QF_F64}, {"<f2", QF_F16}, {"<i8", QF_I64}, {"<i4", QF_I32},
    {"<i2", QF_I16}, {"|i1", QF_I8},  {"|u1", QF_U8},  {"|b1", QF_BOOL},
    /* one-byte types carry no byte order; accept the other spellings numpy may read */
    {"<i1", QF_I8},  {"<u1", QF_U8},  {"<b1", QF_BOOL}, {">i1", QF_I8}, {">u1", QF_U8}, {">b1", QF_BOOL},
};

typedef struct {
    const char *p, *end, *label;
} cursor;

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* A single- or double-quoted string without escapes; (*s, *n) point into the header. */
static qf_status parse_str(cursor *c, const char *what, const char **s, size_t *n) {
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return qf_fail(QF_ERR_FORMAT, "%s: npy header: expected a quoted string for %s", c->label, what);
    char q = *c->p++;
    const char *start = c->p;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\')
            return qf_fail(QF_ERR_FORMAT, "%s: npy header: escapes in %s are not supported", c->label, what);
        c->p++;
    }
    if (c->p >= c->end) return qf_fail(QF_ERR_FORMAT, "%s: npy header: unterminated string in %s", c->label, what);
    *s = start;
    *n = (size_t)(c->p - start);
    c->p++;
    return QF_OK;
}

static int match_word(cursor *c, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0) return 0;
    c->p += n;
    return 1;
}

static qf_status parse_descr(cursor *c, qf_dtype *dt) {
    skip_ws(c);
    if (c->p < c->end && *c->p == '[')
        return qf_fail(QF_ERR_DTYPE, "%s: npy: structured dtypes (descr is a list) are not supported", c->label);
    const char *s;
    size_t n;
    QF_TRY(parse_str(c, "'descr'", &s, &n));
    for (size_t i = 0; i < sizeof npy_types / sizeof npy_types[0]; i++)
        if (strlen(npy_types[i].descr) == n && !memcmp(npy_types[i].descr, s, n)) {
            *dt = npy_types[i].dtype;
            return QF_OK;
        }
    if (n >= 2 && s[1] == 'O')
        return qf_fail(QF_ERR_DTYPE, "%s: npy: object dtype '%.*s' is not supported (pickled Python objects)",
                       c->label, (int)(n > 16 ? 16 : n), s);
    if (n >= 2 && s[0] == '>')
        return qf_fail(QF_ERR_DTYPE, "%s: npy: big-endian dtype '%.*s' is not supported (save little-endian)",
                       c->label, (int)(n > 16 ? 16 : n), s);
    return qf_fail(QF_ERR_DTYPE, "%s: npy: dtype '%.*s' is not supported (known: <f4 <f8 <f2 <i8 <i4 <i2 |i1 |u1 |b1)",
                   c->label, (int)(n > 16 ? 16 : n), s);
}

static qf_status parse_shape(cursor *c, int *ndim, int64_t *shape) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '(')
        return qf_fail(QF_ERR_FORMAT, "%s: npy header: 'shape' is not a tuple", c->label);
    c->p++;
    int nd = 0;
    for (;;) {
        skip_ws(c);
        if (c->p < c->end && *c->p == ')') { c->p++; break; }
        if (c->p >= c->end || *c->p < '0' || *c->p > '9')
            return qf_fail(QF_ERR_FORMAT, "%s: npy header: shape[%d] is not a non-negative integer", c->label, nd);
        if (nd >= QF_MAX_DIMS)
            return qf_fail(QF_ERR_FORMAT, "%s: npy header: shape has more than QF_MAX_DIMS = %d dims", c->label,
                           QF_MAX_DIMS);
        uint64_t v = 0;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            unsigned dgt = (unsigned)(*c->p++ - '0');
            if (v > (uint64_t)(INT64_MAX - dgt) / 10)
                return qf_fail(QF_ERR_FORMAT, "%s: npy header: shape[%d] overflows int64", c->label, nd);
            v = v * 10 + dgt;
        }
        if (c->p < c->end && *c->p == 'L') c->p++; /* Python 2 long literal */
        shape[nd++] = (int64_t)v;
        skip_ws(c);
        if (c->p < c->end && *c->p == ',') { c->p++; continue; }
        if (c->p < c->end && *c->p == ')') { c->p++; break; }
        return qf_fail(QF_ERR_FORMAT, "%s: npy header: expected ',' or ')' in 'shape'", c->label);
    }
    *ndim = nd;
    return QF_OK;
}

/* Parses the header dict in [p, end). */
static qf_status parse_header(cursor *c, qf_npy *a) {
    int have_descr = 0, have_fortran = 0, have_shape = 0, fortran = 0;
    skip_ws(c);
    if (c->p >= c->end || *c->p != '{')
        return qf_fail(QF_ERR_FORMAT, "%s: npy header is not a Python dict (no '{')", c->label);
    c->p++;
    for (;;) {
        skip_ws(c);
        if (c->p < c->end && *c->p == '}') { c->p++; break; }
        const char *k;
        size_t kn;
        QF_TRY(parse_str(c, "a key", &k, &kn));
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':')
            return qf_fail(QF_ERR_FORMAT, "%s: npy header: expected ':' after a key", c->label);
        c->p++;
        skip_ws(c);
        if (kn == 5 && !memcmp(k, "descr", 5)) {
            if (have_descr++) return qf_fail(QF_ERR_FORMAT, "%s: npy header: key 'descr' appears twice", c->label);
            QF_TRY(parse_descr(c, &a->dtype));
        } else if (kn == 13 && !memcmp(k, "fortran_order", 13)) {
            if (have_fortran++)
                return qf_fail(QF_ERR_FORMAT, "%s: npy header: key 'fortran_order' appears twice", c->label);
            if (match_word(c, "True")) fortran = 1;
            else if (match_word(c, "False")) fortran = 0;
            else return qf_fail(QF_ERR_FORMAT, "%s: npy header: 'fortran_order' is not True or False", c->label);
        } else if (kn == 5 && !memcmp(k, "shape", 5)) {
            if (have_shape++) return qf_fail(QF_ERR_FORMAT, "%s: npy header: key 'shape' appears twice", c->label);
            QF_TRY(parse_shape(c, &a->ndim, a->shape));
        } else {
            return qf_fail(QF_ERR_FORMAT, "%s: npy header: unexpected key '%.*s' (expected descr, fortran_order, shape)",
                           c->label, (int)(kn > 32 ? 32 : kn), k);
        }
        skip_ws(c);
        if (c->p < c->end && *c->p == ',') { c->p++; continue; }
        if (c->p < c->end && *c->p == '}') { c->p++; break; }
        return qf_fail(QF_ERR_FORMAT, "%s: npy header: expected ',' or '}' after a value", c->label);
    }
    skip_ws(c);
    if (c->p != c->end)
        return qf_fail(QF_ERR_FORMAT, "%s: npy header: unexpected text after the dict", c->label);
    if (!have_descr || !have_fortran || !have_shape)
        return qf_fail(QF_ERR_FORMAT, "%s: npy header lacks key '%s'", c->label,
                       !have_descr ? "descr" : !have_fortran ? "fortran_order" : "shape");
    if (fortran)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: npy: fortran_order True (column-major) arrays are not supported; "
                       "save with np.ascontiguousarray", c->label);
    return QF_OK;
}

qf_status qf_npy_parse(const void *buf, size_t len, const char *label, qf_npy *out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_npy_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!label) label = "<memory>";
    if (!buf && len) return qf_fail(QF_ERR_ARG, "%s: npy buffer is NULL", label);
    const unsigned char *b = buf;
    if (len < 10 || memcmp(b, "\x93NUMPY", 6) != 0)
        return qf_fail(QF_ERR_FORMAT, "%s: not an npy file (missing the \\x93NUMPY magic)", label);
    unsigned major = b[6], minor = b[7];
    size_t hlen, hstart;
    if (major == 1) {
        hlen = (size_t)b[8] | (size_t)b[9] << 8;
        hstart = 10;
    } else if (major == 2 || major == 3) {
        if (len < 12) return qf_fail(QF_ERR_FORMAT, "%s: npy file truncated in the header length", label);
        hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
        hstart = 12;
    } else {
        return qf_fail(QF_ERR_FORMAT, "%s: npy format version %u.%u is not supported (1.0, 2.0, 3.0)", label, major,
                       minor);
    }
    if (hlen > len - hstart)
        return qf_fail(QF_ERR_FORMAT, "%s: npy header length %zu exceeds the %zu bytes that follow (truncated)", label,
                       hlen, len - hstart);
    qf_npy a = {0};
    cursor c = {(const char *)b + hstart, (const char *)b + hstart + hlen, label};
    QF_TRY(parse_header(&c, &a));
    size_t nbytes = qf_dtype_size(a.dtype);
    for (int i = 0; i < a.ndim; i++)
        if ((uint64_t)a.shape[i] > SIZE_MAX ||
            (nbytes && (size_t)a.shape[i] > SIZE_MAX / nbytes))
            nbytes = SIZE_MAX; /* marks overflow unless a zero dim follows */
        else
            nbytes *= (size_t)a.shape[i];
    for (int i = 0; i < a.ndim; i++) if (a.shape[i] == 0) nbytes = 0;
    if (nbytes == SIZE_MAX)
        return qf_fail(QF_ERR_FORMAT, "%s: npy shape x dtype size overflows", label);
    size_t have = len - hstart - hlen;
    if (have < nbytes)
        return qf_fail(QF_ERR_FORMAT, "%s: npy data truncated: shape needs %zu bytes, file has %zu", label, nbytes, have);
    if (have > nbytes)
        return qf_fail(QF_ERR_FORMAT, "%s: npy file has %zu trailing bytes after the %zu data bytes", label,
                       have - nbytes, nbytes);
    a.data = malloc(nbytes ? nbytes : 1);
    if (!a.data) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %zu bytes of npy data", label, nbytes);
    if (nbytes) memcpy(a.data, b + hstart + hlen, nbytes);
    a.nbytes = nbytes;
    *out = a;
    return QF_OK;
}

qf_status qf_npy_read(const char *path, qf_npy *out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_npy_read: out is NULL");
    memset(out, 0, sizeof *out);
    unsigned char *buf;
    size_t len;
    QF_TRY(qf_io_read_file(path, NPY_MAX_FILE, "npy", &buf, &len));
    qf_status s = qf_npy_parse(buf, len, path, out);
    free(buf);
    return s;
}

void qf_npy_free(qf_npy *a) {
    if (!a) return;
    free(a->data);
    a->data = NULL;
    a->nbytes = 0;
}

qf_status qf_npy_write(const char *path, qf_dtype dtype, int ndim, const int64_t *shape, const void *data) {
    if (!path || !*path) return qf_fail(QF_ERR_ARG, "qf_npy_write: path is NULL or empty");
    const char *descr = NULL;
    for (size_t i = 0; i < 9; i++) /* the first nine entries are the canonical spellings */
        if (npy_types[i].dtype == dtype) descr = npy_types[i].descr;
    if (!descr)
        return qf_fail(QF_ERR_DTYPE, "%s: npy cannot store dtype %s (numpy has no such type)", path, qf_dtype_name(dtype));
    if (ndim < 0 || ndim > QF_MAX_DIMS || (ndim > 0 && !shape))
        return qf_fail(QF_ERR_SHAPE, "%s: npy: ndim %d is not in 0..%d (or shape is NULL)", path, ndim, QF_MAX_DIMS);
    char head[512];
    int at = snprintf(head + 10, sizeof head - 10, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    size_t nbytes = qf_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return qf_fail(QF_ERR_SHAPE, "%s: npy: shape[%d] = %" PRId64 " is negative", path, i, shape[i]);
        if ((uint64_t)shape[i] > SIZE_MAX || qf_mul_size(nbytes, (size_t)shape[i], "npy", &nbytes) != QF_OK)
            return qf_fail(QF_ERR_SHAPE, "%s: npy: shape x dtype size overflows", path);
        at += snprintf(head + 10 + at, sizeof head - 10 - (size_t)at, i ? ", %" PRId64 : "%" PRId64, shape[i]);
    }
    if (nbytes && !data) return qf_fail(QF_ERR_ARG, "%s: npy: data is NULL for %zu bytes", path, nbytes);
    at += snprintf(head + 10 + at, sizeof head - 10 - (size_t)at, ndim == 1 ? ",), }" : "), }");
    /* Byte-for-byte what numpy >= 1.24 writes: spare spaces so the first dim can grow to 21
     * digits in place, then 1..64 spaces and '\n' so magic + length + header is a multiple of 64. */
    if (ndim > 0) {
        char digits[24];
        int nd = snprintf(digits, sizeof digits, "%" PRId64, shape[0]);
        for (int i = nd; i < 21; i++) head[10 + at++] = ' ';
    }
    size_t pad = 64 - ((10 + (size_t)at + 1) % 64);
    size_t total = 10 + (size_t)at + pad + 1;
    memset(head + 10 + at, ' ', pad);
    head[total - 1] = '\n';
    size_t hlen = total - 10;
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    head[8] = (char)(hlen & 0xff);
    head[9] = (char)(hlen >> 8);
    qf_io_chunk chunks[2] = {{head, total}, {data, nbytes}};
    return qf_io_write_atomic(path, chunks, 2, "npy");
}
