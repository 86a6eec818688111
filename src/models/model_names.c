/* model_names.c - parameter names of an embedded Q-Former under its checkpoint prefix
 * (see models_internal.h). Invariant: the returned block holds n pointers, then n
 * NUL-terminated strings they point to; one free() releases it. */
#include "models_internal.h"
#include <stdlib.h>
#include <string.h>

qf_status qf_model_prefixed_qformer_names(qf_qformer *qf, const char *prefix, const char *fn, char ***names) {
    *names = NULL;
    const int n = qf_qformer_num_params(qf);
    const size_t plen = strlen(prefix);
    size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(char *);
    for (int i = 0; i < n; i++) {
        qf_param p;
        QF_TRY(qf_qformer_param(qf, i, &p));
        bytes += plen + strlen(p.name) + 1;
    }
    char **table = malloc(bytes);
    if (!table) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the parameter name table", fn);
    char *at = (char *)(table + (n > 0 ? n : 1));
    for (int i = 0; i < n; i++) {
        qf_param p;
        qf_qformer_param(qf, i, &p); /* succeeded above */
        const size_t len = strlen(p.name);
        table[i] = at;
        memcpy(at, prefix, plen);
        memcpy(at + plen, p.name, len + 1);
        at += plen + len + 1;
    }
    *names = table;
    return QF_OK;
}
