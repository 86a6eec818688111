/* cpu.c - which SIMD path kernels take. Detected once from cpuid; QFUSE_ISA or qf_set_isa()
 * may lower it (never raise it above what the CPU has). */
#include "internal.h"
#include <stdlib.h>
#include <string.h>

static int isa_now = -1; /* -1 = not decided yet */

bool qf_cpu_has(qf_isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
    case QF_ISA_SCALAR: return true;
    case QF_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case QF_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("fma");
    }
    return false;
#else
    return isa == QF_ISA_SCALAR;
#endif
}

static qf_isa best(void) {
    if (qf_cpu_has(QF_ISA_AVX512)) return QF_ISA_AVX512;
    if (qf_cpu_has(QF_ISA_AVX2)) return QF_ISA_AVX2;
    return QF_ISA_SCALAR;
}

qf_isa qf_get_isa(void) {
    int v = __atomic_load_n(&isa_now, __ATOMIC_RELAXED);
    if (v >= 0) return (qf_isa)v;
    qf_isa isa = best();
    const char *env = getenv("QFUSE_ISA");
    if (env) {
        qf_isa want = isa;
        if (!strcmp(env, "scalar")) want = QF_ISA_SCALAR;
        else if (!strcmp(env, "avx2")) want = QF_ISA_AVX2;
        else if (!strcmp(env, "avx512")) want = QF_ISA_AVX512;
        if (want < isa && qf_cpu_has(want)) isa = want; /* an env var may only lower the path */
    }
    __atomic_store_n(&isa_now, (int)isa, __ATOMIC_RELAXED);
    return isa;
}

qf_status qf_set_isa(qf_isa isa) {
    if ((int)isa < QF_ISA_SCALAR || (int)isa > QF_ISA_AVX512)
        return qf_fail(QF_ERR_ARG, "qf_set_isa: unknown isa %d", (int)isa);
    if (!qf_cpu_has(isa))
        return qf_fail(QF_ERR_UNSUPPORTED, "qf_set_isa: this CPU does not support %s", qf_isa_name(isa));
    __atomic_store_n(&isa_now, (int)isa, __ATOMIC_RELAXED);
    return QF_OK;
}

const char *qf_isa_name(qf_isa isa) {
    switch (isa) {
    case QF_ISA_SCALAR: return "scalar";
    case QF_ISA_AVX2: return "avx2";
    case QF_ISA_AVX512: return "avx512";
    }
    return "unknown";
}
