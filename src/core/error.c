/* error.c - the per-thread error message behind qf_last_error().
 * Invariant: the message buffer always holds a NUL-terminated string (possibly empty); writing
 * it never allocates, so reporting an out-of-memory error cannot itself fail. */
#include "internal.h"
#include <stdio.h>
#include <string.h>

#define QF_MSG_CAP 1024
static _Thread_local char qf_msg[QF_MSG_CAP];

qf_status qf_fail(qf_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(qf_msg, sizeof qf_msg, fmt, ap);
    va_end(ap);
    return s;
}

qf_status qf_fail_prefix(qf_status s, const char *fmt, ...) {
    char prefix[512], old[QF_MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, qf_msg, sizeof old);
    /* truncation is intended: a message is capped at QF_MSG_CAP - 1 characters */
    size_t n = strlen(prefix);
    if (n > QF_MSG_CAP - 3) n = QF_MSG_CAP - 3;
    memcpy(qf_msg, prefix, n);
    memcpy(qf_msg + n, ": ", 2);
    size_t rest = QF_MSG_CAP - 1 - (n + 2), m = strlen(old);
    if (m > rest) m = rest;
    memcpy(qf_msg + n + 2, old, m);
    qf_msg[n + 2 + m] = '\0';
    return s;
}

const char *qf_last_error(void) { return qf_msg; }
void qf_clear_error(void) { qf_msg[0] = '\0'; }

const char *qf_status_name(qf_status s) {
    switch (s) {
    case QF_OK: return "QF_OK";
    case QF_ERR_ARG: return "QF_ERR_ARG";
    case QF_ERR_SHAPE: return "QF_ERR_SHAPE";
    case QF_ERR_DTYPE: return "QF_ERR_DTYPE";
    case QF_ERR_NONFINITE: return "QF_ERR_NONFINITE";
    case QF_ERR_IO: return "QF_ERR_IO";
    case QF_ERR_FORMAT: return "QF_ERR_FORMAT";
    case QF_ERR_NOT_FOUND: return "QF_ERR_NOT_FOUND";
    case QF_ERR_NOMEM: return "QF_ERR_NOMEM";
    case QF_ERR_UNSUPPORTED: return "QF_ERR_UNSUPPORTED";
    case QF_ERR_INTERNAL: return "QF_ERR_INTERNAL";
    }
    return "QF_ERR_UNKNOWN";
}

qf_status qf_mul_size(size_t a, size_t b, const char *what, size_t *out) {
    if (a != 0 && b > (size_t)-1 / a) return qf_fail(QF_ERR_ARG, "%s: size overflows (%zu x %zu)", what, a, b);
    *out = a * b;
    return QF_OK;
}
