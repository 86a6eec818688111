/* internal.h - what every qfuse source file shares: error reporting, threading, scratch memory,
 * CPU feature dispatch. Not installed; the public contract is include/qfuse.h.
 *
 * Error rule: a function that fails calls qf_fail(status, fmt, ...) exactly once, at the place
 * that knows what broke, and returns its status; callers pass the status up unchanged (QF_TRY).
 * The message therefore names the innermost cause; callers that know more (a file name) may
 * prefix it with qf_fail_prefix. */
#ifndef QF_INTERNAL_H
#define QF_INTERNAL_H

#include "qfuse.h"
#include <stdarg.h>
#include <stdbool.h>

#if defined(__GNUC__)
#define QF_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define QF_UNUSED __attribute__((unused))
#else
#define QF_PRINTF(a, b)
#define QF_UNUSED
#endif

/* Stores the message for qf_last_error() and returns s. */
qf_status qf_fail(qf_status s, const char *fmt, ...) QF_PRINTF(2, 3);
/* Prepends "prefix: " to the current message (for adding a file or tensor name); returns s. */
qf_status qf_fail_prefix(qf_status s, const char *fmt, ...) QF_PRINTF(2, 3);

#define QF_TRY(expr)                                                                            \
    do {                                                                                        \
        qf_status qf_try_s_ = (expr);                                                           \
        if (qf_try_s_ != QF_OK) return qf_try_s_;                                               \
    } while (0)

/* ---- threads (src/core/threads.c) ----
 * Parallel regions use OpenMP with num_threads(qf_threads()). The count comes from
 * qf_set_num_threads, else QFUSE_THREADS, else the number of online CPUs. */
int qf_threads(void);

/* ---- instruction-set dispatch (src/core/cpu.c) ----
 * Kernels are compiled for several ISAs with function target attributes and picked by
 * qf_get_isa() at call time, so one binary runs everywhere and tests can force each path. */
bool qf_cpu_has(qf_isa isa);
#define QF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

/* ---- scratch memory (src/core/scratch.c) ----
 * A per-calling-thread, grow-only workspace: ops that need temporary buffers ask for the total
 * size once per call and carve it up (e.g. one slice per OpenMP worker). Memory is allocated
 * only when a call needs more than any earlier call on this thread, so steady-state
 * inference/training steps do not allocate. The pointer is 64-byte aligned and stays valid
 * until the next qf_scratch call on the same thread. */
qf_status qf_scratch(size_t bytes, void **out);
/* Frees this thread's scratch (tests; long-lived threads that want memory back). */
void qf_scratch_release(void);

/* ---- helpers ---- */
static inline size_t qf_align_up(size_t n, size_t a) { return (n + a - 1) & ~(a - 1); }
/* n elements of size `size`, or QF_ERR_ARG naming `what` on size_t overflow. */
qf_status qf_mul_size(size_t a, size_t b, const char *what, size_t *out);

/* Index of the first NaN/Inf in x[0..n), or n (src/core/finite.c; parallel for large n). */
size_t qf_first_nonfinite(const float *x, size_t n);

/* ---- checkpoints and configs (src/io/checkpoint.c, src/io/config.c) ----
 * FOLDER/model.safetensors, or the shards of FOLDER/model.safetensors.index.json gathered into
 * one in-memory image holding the tensors `want` accepts (NULL: all). */
qf_status qf_open_checkpoint(const char *folder, int (*want)(const char *name), qf_safetensors **out);
/* The label (path) a config was loaded or parsed under, for messages. */
const char *qf_config_label(const qf_config *c);

#endif
