/* scratch.c - per-calling-thread grow-only workspace (see internal.h for the contract).
 * Invariant: cap is the size of buf; buf is NULL iff cap == 0. */
#include "internal.h"
#include <stdlib.h>

static _Thread_local void *buf;
static _Thread_local size_t cap;

qf_status qf_scratch(size_t bytes, void **out) {
    if (bytes > cap) {
        size_t want = qf_align_up(bytes + bytes / 4, 4096); /* headroom: fewer regrowths */
        void *p = NULL;
        if (posix_memalign(&p, 64, want) != 0)
            return qf_fail(QF_ERR_NOMEM, "scratch: cannot allocate %zu bytes", want);
        free(buf);
        buf = p;
        cap = want;
    }
    *out = buf;
    return QF_OK;
}

void qf_scratch_release(void) {
    free(buf);
    buf = NULL;
    cap = 0;
}
