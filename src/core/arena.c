/* arena.c - bump allocator for planned buffers.
 * Invariant: 0 <= used <= capacity; every block returned lies in [base, base+capacity) and
 * blocks never overlap. Reset frees all blocks at once; nothing is freed individually. */
#include "internal.h"
#include <stdint.h>
#include <stdlib.h>

struct qf_arena {
    unsigned char *base;
    size_t capacity, used;
};

qf_status qf_arena_create(size_t capacity, qf_arena **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_arena_create: out is NULL");
    *out = NULL;
    qf_arena *a = calloc(1, sizeof *a);
    if (!a) return qf_fail(QF_ERR_NOMEM, "qf_arena_create: no memory for the arena header");
    if (capacity) {
        void *p = NULL;
        if (posix_memalign(&p, 4096, qf_align_up(capacity, 4096)) != 0) {
            free(a);
            return qf_fail(QF_ERR_NOMEM, "qf_arena_create: cannot allocate %zu bytes", capacity);
        }
        a->base = p;
    }
    a->capacity = capacity;
    *out = a;
    return QF_OK;
}

void *qf_arena_alloc(qf_arena *a, size_t bytes, size_t align) {
    if (!a || align == 0 || (align & (align - 1)) || align > 4096) return NULL;
    size_t start = qf_align_up(a->used, align);
    if (start < a->used || start > a->capacity || bytes > a->capacity - start) return NULL;
    a->used = start + bytes;
    return a->base + start;
}

qf_status qf_arena_alloc_checked(qf_arena *a, size_t bytes, size_t align, const char *what, void **out) {
    if (!a || !out) return qf_fail(QF_ERR_ARG, "qf_arena_alloc: NULL arena or out");
    if (align == 0 || (align & (align - 1)) || align > 4096)
        return qf_fail(QF_ERR_ARG, "qf_arena_alloc(%s): alignment %zu is not a power of two <= 4096", what ? what : "?", align);
    *out = qf_arena_alloc(a, bytes, align);
    if (!*out)
        return qf_fail(QF_ERR_NOMEM, "qf_arena_alloc(%s): %zu bytes do not fit (used %zu of %zu)",
                       what ? what : "?", bytes, a->used, a->capacity);
    return QF_OK;
}

size_t qf_arena_used(const qf_arena *a) { return a ? a->used : 0; }
size_t qf_arena_capacity(const qf_arena *a) { return a ? a->capacity : 0; }
void qf_arena_reset(qf_arena *a) { if (a) a->used = 0; }
void qf_arena_destroy(qf_arena *a) {
    if (!a) return;
    free(a->base);
    free(a);
}
