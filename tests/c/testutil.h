/* testutil.h - a tiny test harness: CHECK records a failure with file:line and goes on, so one
 * run reports every broken expectation; TEST_MAIN_END returns nonzero if any failed. */
#ifndef QF_TESTUTIL_H
#define QF_TESTUTIL_H
#include "qfuse.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tu_failures, tu_checks;

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        tu_checks++;                                                                            \
        if (!(cond)) {                                                                          \
            tu_failures++;                                                                      \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);            \
        }                                                                                       \
    } while (0)

/* Expects status `want`; on mismatch prints the library's message. */
#define CHECK_STATUS(expr, want)                                                                \
    do {                                                                                        \
        qf_status tu_s_ = (expr);                                                               \
        tu_checks++;                                                                            \
        if (tu_s_ != (want)) {                                                                  \
            tu_failures++;                                                                      \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (message: %s)\n", __FILE__,     \
                    __LINE__, #expr, qf_status_name(tu_s_), qf_status_name(want), qf_last_error()); \
        }                                                                                       \
    } while (0)
#define CHECK_OK(expr) CHECK_STATUS(expr, QF_OK)

/* Expects failure with `want` and a message containing `needle`. */
#define CHECK_ERR(expr, want, needle)                                                           \
    do {                                                                                        \
        CHECK_STATUS(expr, want);                                                               \
        tu_checks++;                                                                            \
        if (!strstr(qf_last_error(), (needle))) {                                               \
            tu_failures++;                                                                      \
            fprintf(stderr, "%s:%d: message \"%s\" lacks \"%s\"\n", __FILE__, __LINE__,        \
                    qf_last_error(), (needle));                                                 \
        }                                                                                       \
    } while (0)

#define TEST_MAIN_END(name)                                                                     \
    do {                                                                                        \
        printf("%s: %d checks, %d failed\n", (name), tu_checks, tu_failures);                   \
        return tu_failures ? 1 : 0;                                                             \
    } while (0)

/* max |a-b| / max |b| (b the reference); 0 if b is all zero and a equals it. */
static inline double tu_rel_err(const float *a, const double *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || d != d) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}
#endif
