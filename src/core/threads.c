/* threads.c - the thread count every parallel region uses.
 * Order of precedence: qf_set_num_threads() > QFUSE_THREADS > online CPUs. The BLAS gets the
 * same count, so a GEMM issued outside our parallel regions uses the cores we were told to. */
#include "internal.h"
#include <stdlib.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Weak: whichever BLAS is linked provides its own setter; absent ones stay NULL. */
extern void openblas_set_num_threads(int n) __attribute__((weak));
extern void bli_thread_set_num_threads(long n) __attribute__((weak));

static int n_threads; /* 0 = not decided yet */

static void tell_blas(int n) {
    if (openblas_set_num_threads) openblas_set_num_threads(n);
    if (bli_thread_set_num_threads) bli_thread_set_num_threads(n);
}

int qf_threads(void) {
    int n = __atomic_load_n(&n_threads, __ATOMIC_RELAXED);
    if (n > 0) return n;
    const char *env = getenv("QFUSE_THREADS");
    if (env && *env) {
        char *end = NULL;
        long v = strtol(env, &end, 10);
        if (end && *end == '\0' && v >= 1 && v <= 4096) n = (int)v;
    }
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c >= 1 ? (int)c : 1;
    }
    __atomic_store_n(&n_threads, n, __ATOMIC_RELAXED);
    tell_blas(n);
    return n;
}

qf_status qf_set_num_threads(int n) {
    if (n < 1 || n > 4096) return qf_fail(QF_ERR_ARG, "qf_set_num_threads: n = %d, expected 1..4096", n);
    __atomic_store_n(&n_threads, n, __ATOMIC_RELAXED);
    tell_blas(n);
    return QF_OK;
}

int qf_get_num_threads(void) { return qf_threads(); }
