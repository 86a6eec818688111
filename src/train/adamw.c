/* adamw.c - the AdamW optimizer (torch.optim.AdamW's single-tensor path) and its state file.
 *
 * Invariants:
 *   - State is per parameter name: states[] holds name, shape, step count and one allocation of
 *     2 (3 with amsgrad) * numel floats (exp_avg, exp_avg_sq[, max_exp_avg_sq]); `table` is an
 *     open-addressing hash (linear probing, power-of-two capacity >= 2 * count) of indices into
 *     states[], rebuilt when states[] grows.
 *   - qf_adamw_step checks every parameter (name, shape vs state, duplicates, finite gradient)
 *     before it changes anything, then creates missing states, then updates. So a failing step
 *     leaves every parameter and every existing state as it was. A state created by a step is
 *     kept even when a later allocation of the same step fails; it has step 0 and is not saved.
 *   - Once every parameter has state, a step allocates nothing (slot[] is grow-only).
 *   - The element update is the same float32 expression on every ISA path (no contraction other
 *     than the explicit fused multiply-adds of the m and v updates), so scalar, AVX2 and AVX-512 agree bit
 *     for bit, and a resumed run equals an uninterrupted one bit for bit (the file holds the
 *     moments exactly and the hyperparameters as %.17g, which round-trips a double).
 */
#include "internal.h"
#include <errno.h>
#include <immintrin.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *name;
    int ndim;
    int64_t shape[4];
    size_t numel;
    int64_t step;
    float *exp_avg, *exp_avg_sq, *max_exp_avg_sq; /* one block: exp_avg owns it */
    uint64_t stamp;                               /* last step call that named it */
} adamw_state;

struct qf_adamw {
    qf_adamw_config c;
    adamw_state *states;
    int n_states, cap_states;
    int *table;          /* -1 = empty; else index into states */
    size_t table_cap;
    int *slot;           /* per param of the current step: state index, -1 new, -2 skipped */
    int cap_slot;
    uint64_t calls;
};

qf_adamw_config qf_adamw_defaults(void) {
    qf_adamw_config c = {1e-3, 0.9, 0.999, 1e-8, 1e-2, 0};
    return c;
}

static qf_status check_config(const qf_adamw_config *c, const char *fn) {
    if (!c) return qf_fail(QF_ERR_ARG, "%s: config is NULL", fn);
    if (!(c->lr >= 0) || isinf(c->lr))
        return qf_fail(QF_ERR_ARG, "%s: lr = %g; must be finite and >= 0", fn, c->lr);
    if (!(c->beta1 >= 0 && c->beta1 < 1))
        return qf_fail(QF_ERR_ARG, "%s: beta1 = %g; must be in [0, 1)", fn, c->beta1);
    if (!(c->beta2 >= 0 && c->beta2 < 1))
        return qf_fail(QF_ERR_ARG, "%s: beta2 = %g; must be in [0, 1)", fn, c->beta2);
    if (!(c->eps >= 0) || isinf(c->eps))
        return qf_fail(QF_ERR_ARG, "%s: eps = %g; must be finite and >= 0", fn, c->eps);
    if (!(c->weight_decay >= 0) || isinf(c->weight_decay))
        return qf_fail(QF_ERR_ARG, "%s: weight_decay = %g; must be finite and >= 0", fn, c->weight_decay);
    if (c->amsgrad != 0 && c->amsgrad != 1)
        return qf_fail(QF_ERR_ARG, "%s: amsgrad = %d; must be 0 or 1", fn, c->amsgrad);
    return QF_OK;
}

qf_status qf_adamw_new(const qf_adamw_config *c, qf_adamw **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_adamw_new: out is NULL");
    *out = NULL;
    QF_TRY(check_config(c, "qf_adamw_new"));
    qf_adamw *o = calloc(1, sizeof *o);
    if (!o) return qf_fail(QF_ERR_NOMEM, "qf_adamw_new: out of memory");
    o->c = *c;
    *out = o;
    return QF_OK;
}

void qf_adamw_free(qf_adamw *o) {
    if (!o) return;
    for (int i = 0; i < o->n_states; i++) {
        free(o->states[i].name);
        free(o->states[i].exp_avg);
    }
    free(o->states);
    free(o->table);
    free(o->slot);
    free(o);
}

qf_status qf_adamw_get_config(const qf_adamw *o, qf_adamw_config *out) {
    if (!o || !out) return qf_fail(QF_ERR_ARG, "qf_adamw_get_config: %s is NULL", o ? "out" : "opt");
    *out = o->c;
    return QF_OK;
}

qf_status qf_adamw_set_lr(qf_adamw *o, double lr) {
    if (!o) return qf_fail(QF_ERR_ARG, "qf_adamw_set_lr: opt is NULL");
    qf_adamw_config c = o->c;
    c.lr = lr;
    QF_TRY(check_config(&c, "qf_adamw_set_lr"));
    o->c = c;
    return QF_OK;
}

/* ---- name -> state ------------------------------------------------------------------------ */

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static int find_state(const qf_adamw *o, const char *name) {
    if (!o->table_cap) return -1;
    size_t mask = o->table_cap - 1;
    for (size_t at = hash_name(name) & mask;; at = (at + 1) & mask) {
        int k = o->table[at];
        if (k < 0) return -1;
        if (strcmp(o->states[k].name, name) == 0) return k;
    }
}

static void table_insert(qf_adamw *o, int k) {
    size_t mask = o->table_cap - 1;
    size_t at = hash_name(o->states[k].name) & mask;
    while (o->table[at] >= 0) at = (at + 1) & mask;
    o->table[at] = k;
}

/* Room for `more` new states (states[] and the table). */
static qf_status reserve_states(qf_adamw *o, int more, const char *fn) {
    int need = o->n_states + more;
    if (need > o->cap_states) {
        int cap = o->cap_states ? o->cap_states : 16;
        while (cap < need) cap *= 2;
        adamw_state *s = realloc(o->states, (size_t)cap * sizeof *s);
        if (!s) return qf_fail(QF_ERR_NOMEM, "%s: out of memory for %d optimizer states", fn, cap);
        o->states = s;
        o->cap_states = cap;
    }
    if ((size_t)need * 2 > o->table_cap) {
        size_t cap = o->table_cap ? o->table_cap : 32;
        while (cap < (size_t)need * 2) cap *= 2;
        int *t = malloc(cap * sizeof *t);
        if (!t) return qf_fail(QF_ERR_NOMEM, "%s: out of memory for the state table", fn);
        free(o->table);
        o->table = t;
        o->table_cap = cap;
        for (size_t i = 0; i < cap; i++) t[i] = -1;
        for (int k = 0; k < o->n_states; k++) table_insert(o, k);
    }
    return QF_OK;
}

/* Appends a zeroed state (step 0). shape[0..ndim) already validated. */
static qf_status add_state(qf_adamw *o, const char *name, int ndim, const int64_t *shape,
                           const char *fn, int *index) {
    QF_TRY(reserve_states(o, 1, fn));
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) numel *= (size_t)shape[d];
    size_t nbuf = o->c.amsgrad ? 3 : 2;
    float *buf = calloc(numel ? numel * nbuf : 1, sizeof(float));
    size_t len = strlen(name) + 1;
    char *nm = malloc(len);
    if (!buf || !nm) {
        free(buf);
        free(nm);
        return qf_fail(QF_ERR_NOMEM, "%s: out of memory for the state of '%s' (%zu elements)", fn, name, numel);
    }
    memcpy(nm, name, len);
    adamw_state *s = &o->states[o->n_states];
    memset(s, 0, sizeof *s);
    s->name = nm;
    s->ndim = ndim;
    for (int d = 0; d < ndim; d++) s->shape[d] = shape[d];
    s->numel = numel;
    s->exp_avg = buf;
    s->exp_avg_sq = buf + numel;
    s->max_exp_avg_sq = o->c.amsgrad ? buf + 2 * numel : NULL;
    *index = o->n_states++;
    table_insert(o, *index);
    return QF_OK;
}

static void format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t at = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, i ? ",%" PRId64 : "%" PRId64, shape[i]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

/* ---- the element update ------------------------------------------------------------------- */

typedef struct {
    float decay;     /* 1 - lr*wd                        */
    float b1, a1;    /* beta1, 1 - beta1                 */
    float b2, a2;    /* beta2, 1 - beta2                 */
    float bc2_sqrt;  /* sqrt(1 - beta2^t)                */
    float eps;
    float neg_step;  /* -lr / (1 - beta1^t)              */
} adamw_consts;

/* torch: param.mul_(decay); exp_avg.mul_(b1).add_(grad, alpha=a1) (vectorized add_ is
 * fmadd(grad, alpha, self)); exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=a2) (self + value*g*g,
 * which torch's build contracts to fma(value*g, g, self): matched bit for bit on the 1.13 wheel);
 * denom = (sqrt(v) / bc2_sqrt).add_(eps); param.addcdiv_(m, denom, value=neg_step) (self + value*m/d). */
static inline void adamw_one(float *p, const float *g, float *m, float *v, float *vmax, size_t i,
                             const adamw_consts *k) {
    float gi = g[i];
    float pi = p[i] * k->decay;
    float mi = fmaf(gi, k->a1, m[i] * k->b1);
    float vi = fmaf(k->a2 * gi, gi, v[i] * k->b2);
    m[i] = mi;
    v[i] = vi;
    if (vmax) {
        float x = vmax[i];
        vi = vi > x ? vi : x;  /* torch.maximum; v, vmax are finite here */
        vmax[i] = vi;
    }
    float denom = sqrtf(vi) / k->bc2_sqrt + k->eps;
    p[i] = pi + k->neg_step * mi / denom;
}

static void adamw_scalar(float *p, const float *g, float *m, float *v, float *vmax, size_t lo,
                         size_t hi, const adamw_consts *k) {
    for (size_t i = lo; i < hi; i++) adamw_one(p, g, m, v, vmax, i, k);
}

QF_TARGET_AVX2 static void adamw_avx2(float *p, const float *g, float *m, float *v, float *vmax,
                                      size_t lo, size_t hi, const adamw_consts *k) {
    const __m256 decay = _mm256_set1_ps(k->decay), b1 = _mm256_set1_ps(k->b1),
                 a1 = _mm256_set1_ps(k->a1), b2 = _mm256_set1_ps(k->b2), a2 = _mm256_set1_ps(k->a2),
                 bc2 = _mm256_set1_ps(k->bc2_sqrt), eps = _mm256_set1_ps(k->eps),
                 ns = _mm256_set1_ps(k->neg_step);
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        __m256 gi = _mm256_loadu_ps(g + i);
        __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
        __m256 mi = _mm256_fmadd_ps(gi, a1, _mm256_mul_ps(_mm256_loadu_ps(m + i), b1));
        __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(a2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        if (vmax) {
            vi = _mm256_max_ps(vi, _mm256_loadu_ps(vmax + i));
            _mm256_storeu_ps(vmax + i, vi);
        }
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
        _mm256_storeu_ps(p + i, _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(ns, mi), denom)));
    }
    adamw_scalar(p, g, m, v, vmax, i, hi, k);
}

QF_TARGET_AVX512 static void adamw_avx512(float *p, const float *g, float *m, float *v, float *vmax,
                                          size_t lo, size_t hi, const adamw_consts *k) {
    const __m512 decay = _mm512_set1_ps(k->decay), b1 = _mm512_set1_ps(k->b1),
                 a1 = _mm512_set1_ps(k->a1), b2 = _mm512_set1_ps(k->b2), a2 = _mm512_set1_ps(k->a2),
                 bc2 = _mm512_set1_ps(k->bc2_sqrt), eps = _mm512_set1_ps(k->eps),
                 ns = _mm512_set1_ps(k->neg_step);
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        __m512 gi = _mm512_loadu_ps(g + i);
        __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay);
        __m512 mi = _mm512_fmadd_ps(gi, a1, _mm512_mul_ps(_mm512_loadu_ps(m + i), b1));
        __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(a2, gi), gi, _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
        if (vmax) {
            vi = _mm512_max_ps(vi, _mm512_loadu_ps(vmax + i));
            _mm512_storeu_ps(vmax + i, vi);
        }
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
        _mm512_storeu_ps(p + i, _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi), denom)));
    }
    adamw_scalar(p, g, m, v, vmax, i, hi, k);
}

typedef void (*adamw_fn)(float *, const float *, float *, float *, float *, size_t, size_t,
                         const adamw_consts *);

#define ADAMW_BLOCK 16384 /* elements per parallel chunk (a multiple of 16) */

static void update_param(adamw_fn fn, float *p, const float *g, adamw_state *s, const adamw_consts *k) {
    size_t n = s->numel;
    long nblk = (long)((n + ADAMW_BLOCK - 1) / ADAMW_BLOCK);
#pragma omp parallel for num_threads(qf_threads()) if (nblk > 1)
    for (long b = 0; b < nblk; b++) {
        size_t lo = (size_t)b * ADAMW_BLOCK, hi = lo + ADAMW_BLOCK < n ? lo + ADAMW_BLOCK : n;
        fn(p, g, s->exp_avg, s->exp_avg_sq, s->max_exp_avg_sq, lo, hi, k);
    }
}

/* ---- step ---------------------------------------------------------------------------------- */

qf_status qf_adamw_step(qf_adamw *o, const qf_param *params, int n) {
    const char *fn = "qf_adamw_step";
    if (!o) return qf_fail(QF_ERR_ARG, "%s: opt is NULL", fn);
    if (n < 0) return qf_fail(QF_ERR_ARG, "%s: n = %d; must be >= 0", fn, n);
    if (n > 0 && !params) return qf_fail(QF_ERR_ARG, "%s: params is NULL with n = %d", fn, n);
    if (n > o->cap_slot) {
        int *s = realloc(o->slot, (size_t)n * sizeof *s);
        if (!s) return qf_fail(QF_ERR_NOMEM, "%s: out of memory for %d parameter slots", fn, n);
        o->slot = s;
        o->cap_slot = n;
    }
    uint64_t stamp = ++o->calls;
    int n_new = 0;
    /* 1. Check everything; change nothing. New names are checked for duplicates among
     *    themselves by a quadratic scan only over the new ones (the first step). */
    for (int i = 0; i < n; i++) {
        const qf_param *p = &params[i];
        if (!p->grad) { o->slot[i] = -2; continue; }
        if (!p->name) return qf_fail(QF_ERR_ARG, "%s: params[%d] has no name", fn, i);
        if (!p->data) return qf_fail(QF_ERR_ARG, "%s: parameter '%s' has data NULL", fn, p->name);
        if (p->ndim < 0 || p->ndim > 4)
            return qf_fail(QF_ERR_ARG, "%s: parameter '%s' has ndim %d; must be 0..4", fn, p->name, p->ndim);
        size_t numel = 1;
        for (int d = 0; d < p->ndim; d++) {
            if (p->shape[d] < 0)
                return qf_fail(QF_ERR_ARG, "%s: parameter '%s' has shape[%d] = %" PRId64 " < 0", fn,
                               p->name, d, p->shape[d]);
            numel *= (size_t)p->shape[d];
        }
        int k = find_state(o, p->name);
        if (k >= 0) {
            adamw_state *s = &o->states[k];
            if (s->stamp == stamp)
                return qf_fail(QF_ERR_ARG, "%s: parameter '%s' is listed twice (params[%d] again)", fn, p->name, i);
            int same = s->ndim == p->ndim;
            for (int d = 0; same && d < p->ndim; d++) same = s->shape[d] == p->shape[d];
            if (!same) {
                char a[96], b[96];
                format_shape(a, sizeof a, p->ndim, p->shape);
                format_shape(b, sizeof b, s->ndim, s->shape);
                return qf_fail(QF_ERR_SHAPE, "%s: parameter '%s' has shape %s but its optimizer state %s", fn,
                               p->name, a, b);
            }
            s->stamp = stamp;
            o->slot[i] = k;
        } else {
            for (int j = 0; j < i; j++)
                if (o->slot[j] == -1 && strcmp(params[j].name, p->name) == 0)
                    return qf_fail(QF_ERR_ARG, "%s: parameter '%s' is listed twice (params[%d] and [%d])", fn,
                                   p->name, j, i);
            o->slot[i] = -1;
            n_new++;
        }
        size_t bad = qf_first_nonfinite(p->grad, numel);
        if (bad < numel)
            return qf_fail(QF_ERR_NONFINITE, "%s: the gradient of parameter '%s' is %g at element %zu; "
                           "nothing was updated", fn, p->name, (double)p->grad[bad], bad);
    }
    /* 2. States for new names (the only allocation). */
    if (n_new) {
        QF_TRY(reserve_states(o, n_new, fn));
        for (int i = 0; i < n; i++) {
            if (o->slot[i] != -1) continue;
            int k;
            QF_TRY(add_state(o, params[i].name, params[i].ndim, params[i].shape, fn, &k));
            o->states[k].stamp = stamp;
            o->slot[i] = k;
        }
    }
    /* 3. Update. */
    qf_isa isa = qf_get_isa();
    adamw_fn kern = isa == QF_ISA_AVX512 ? adamw_avx512 : isa == QF_ISA_AVX2 ? adamw_avx2 : adamw_scalar;
    const qf_adamw_config *c = &o->c;
    for (int i = 0; i < n; i++) {
        if (o->slot[i] < 0) continue;
        adamw_state *s = &o->states[o->slot[i]];
        s->step++;
        double t = (double)s->step;
        double bc1 = 1.0 - pow(c->beta1, t), bc2 = 1.0 - pow(c->beta2, t);
        adamw_consts k = {
            .decay = (float)(1.0 - c->lr * c->weight_decay),
            .b1 = (float)c->beta1, .a1 = (float)(1.0 - c->beta1),
            .b2 = (float)c->beta2, .a2 = (float)(1.0 - c->beta2),
            .bc2_sqrt = (float)sqrt(bc2),
            .eps = (float)c->eps,
            .neg_step = (float)(-(c->lr / bc1)),
        };
        update_param(kern, params[i].data, params[i].grad, s, &k);
    }
    return QF_OK;
}

int64_t qf_adamw_param_step(const qf_adamw *o, const char *name) {
    if (!o || !name) return 0;
    int k = find_state(o, name);
    return k < 0 ? 0 : o->states[k].step;
}

int qf_adamw_num_states(const qf_adamw *o) {
    if (!o) return 0;
    int n = 0;
    for (int k = 0; k < o->n_states; k++) n += o->states[k].step > 0;
    return n;
}

/* ---- save / load --------------------------------------------------------------------------- */

static const char *const SUFFIX[3] = {".exp_avg", ".exp_avg_sq", ".max_exp_avg_sq"};

qf_status qf_adamw_save(const qf_adamw *o, const char *path) {
    const char *fn = "qf_adamw_save";
    if (!o || !path) return qf_fail(QF_ERR_ARG, "%s: %s is NULL", fn, o ? "path" : "opt");
    int nbuf = o->c.amsgrad ? 3 : 2, per = nbuf + 1;
    int live = qf_adamw_num_states(o);
    qf_tensor_ref *refs = calloc((size_t)live * per + 1, sizeof *refs);
    char **names = calloc((size_t)live * per + 1, sizeof *names);
    qf_status st = QF_OK;
    int nt = 0;
    if (!refs || !names) { st = qf_fail(QF_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    for (int k = 0; k < o->n_states; k++) {
        const adamw_state *s = &o->states[k];
        if (s->step <= 0) continue;
        const float *bufs[3] = {s->exp_avg, s->exp_avg_sq, s->max_exp_avg_sq};
        size_t len = strlen(s->name);
        for (int b = 0; b <= nbuf; b++) {
            const char *suf = b < nbuf ? SUFFIX[b] : ".step";
            char *nm = malloc(len + strlen(suf) + 1);
            if (!nm) { st = qf_fail(QF_ERR_NOMEM, "%s: out of memory", fn); goto done; }
            memcpy(nm, s->name, len);
            strcpy(nm + len, suf);
            names[nt] = nm;
            qf_tensor_ref *r = &refs[nt++];
            r->name = nm;
            if (b < nbuf) {
                r->dtype = QF_F32;
                r->ndim = s->ndim;
                for (int d = 0; d < s->ndim; d++) r->shape[d] = s->shape[d];
                r->data = bufs[b];
            } else {
                r->dtype = QF_I64;
                r->ndim = 0;
                r->data = &s->step;
            }
        }
    }
    {
        char v[6][32];
        snprintf(v[0], sizeof v[0], "%.17g", o->c.lr);
        snprintf(v[1], sizeof v[1], "%.17g", o->c.beta1);
        snprintf(v[2], sizeof v[2], "%.17g", o->c.beta2);
        snprintf(v[3], sizeof v[3], "%.17g", o->c.eps);
        snprintf(v[4], sizeof v[4], "%.17g", o->c.weight_decay);
        snprintf(v[5], sizeof v[5], "%d", o->c.amsgrad);
        const char *meta[] = {"format", "qfuse.adamw", "version", "1", "lr", v[0], "beta1", v[1],
                              "beta2", v[2], "eps", v[3], "weight_decay", v[4], "amsgrad", v[5], NULL};
        st = qf_st_write(path, refs, nt, meta);
    }
done:
    if (names)
        for (int i = 0; i < nt; i++) free(names[i]);
    free(names);
    free(refs);
    return st;
}

static qf_status meta_double(const qf_safetensors *f, const char *path, const char *key, double *out) {
    const char *s = qf_st_metadata(f, key);
    if (!s) return qf_fail(QF_ERR_FORMAT, "qf_adamw_load: %s: metadata key '%s' is missing", path, key);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno == ERANGE)
        return qf_fail(QF_ERR_FORMAT, "qf_adamw_load: %s: metadata '%s' = '%s' is not a number", path, key, s);
    *out = v;
    return QF_OK;
}

/* The state tensor of `pname` with suffix `suf`: F32, ndim <= 4, shape equal to the first one
 * read for this parameter (ndim < 0: take this one's). */
static qf_status load_moment(const qf_safetensors *f, const char *path, const char *pname, const char *suf,
                             int *ndim, int64_t *shape, qf_tensor_view *out) {
    size_t len = strlen(pname);
    char nm[1024];
    if (len + strlen(suf) + 1 > sizeof nm)
        return qf_fail(QF_ERR_FORMAT, "qf_adamw_load: %s: parameter name '%.64s...' is too long", path, pname);
    memcpy(nm, pname, len);
    strcpy(nm + len, suf);
    if (qf_st_find(f, nm, out) != QF_OK)
        return qf_fail(QF_ERR_NOT_FOUND, "qf_adamw_load: %s: parameter '%s' has a step but no tensor '%s'",
                       path, pname, nm);
    if (out->dtype != QF_F32)
        return qf_fail(QF_ERR_FORMAT, "qf_adamw_load: %s: tensor '%s' has dtype %s; must be F32", path, nm,
                       qf_dtype_name(out->dtype));
    if (out->ndim > 4)
        return qf_fail(QF_ERR_FORMAT, "qf_adamw_load: %s: tensor '%s' has %d dims; a parameter has at most 4",
                       path, nm, out->ndim);
    if (*ndim < 0) {
        *ndim = out->ndim;
        for (int d = 0; d < out->ndim; d++) shape[d] = out->shape[d];
        return QF_OK;
    }
    int same = out->ndim == *ndim;
    for (int d = 0; same && d < *ndim; d++) same = out->shape[d] == shape[d];
    if (!same) {
        char a[96], b[96];
        format_shape(a, sizeof a, out->ndim, out->shape);
        format_shape(b, sizeof b, *ndim, shape);
        return qf_fail(QF_ERR_SHAPE, "qf_adamw_load: %s: tensor '%s' has shape %s but '%s.exp_avg' %s", path,
                       nm, a, pname, b);
    }
    return QF_OK;
}

static qf_status load_states(qf_adamw *o, const qf_safetensors *f, const char *path) {
    const char *fn = "qf_adamw_load";
    int nbuf = o->c.amsgrad ? 3 : 2, per = nbuf + 1;
    int nt = qf_st_count(f), n_params = 0;
    for (int i = 0; i < nt; i++) {
        qf_tensor_view t;
        QF_TRY(qf_st_get(f, i, &t));
        size_t len = strlen(t.name);
        if (len <= 5 || strcmp(t.name + len - 5, ".step") != 0) continue;
        if (len - 5 >= 1000) return qf_fail(QF_ERR_FORMAT, "%s: %s: tensor name '%.64s...' is too long", fn, path, t.name);
        char pname[1000];
        memcpy(pname, t.name, len - 5);
        pname[len - 5] = 0;
        /* shape [1] is accepted too: writers built on numpy's ascontiguousarray give 0-d arrays 1 dim */
        if (t.dtype != QF_I64 || !(t.ndim == 0 || (t.ndim == 1 && t.shape[0] == 1)))
            return qf_fail(QF_ERR_FORMAT, "%s: %s: tensor '%s' must be an I64 scalar (shape [] or [1]), got %s "
                           "with %d dims", fn, path, t.name, qf_dtype_name(t.dtype), t.ndim);
        int64_t step;
        memcpy(&step, t.data, 8);
        if (step < 1)
            return qf_fail(QF_ERR_FORMAT, "%s: %s: parameter '%s' has step %" PRId64 "; must be >= 1", fn, path,
                           pname, step);
        int ndim = -1;
        int64_t shape[QF_MAX_DIMS] = {0};
        qf_tensor_view mv[3];
        for (int b = 0; b < nbuf; b++) QF_TRY(load_moment(f, path, pname, SUFFIX[b], &ndim, shape, &mv[b]));
        int k;
        QF_TRY(add_state(o, pname, ndim, shape, fn, &k));
        adamw_state *s = &o->states[k];
        s->step = step;
        float *dst[3] = {s->exp_avg, s->exp_avg_sq, s->max_exp_avg_sq};
        for (int b = 0; b < nbuf; b++) {
            memcpy(dst[b], mv[b].data, s->numel * sizeof(float));
            for (size_t e = 0; e < s->numel; e++) {
                float x = dst[b][e];
                if (!isfinite(x) || (b > 0 && x < 0))
                    return qf_fail(QF_ERR_FORMAT, "%s: %s: '%s%s' element %zu is %g; must be finite%s", fn, path,
                                   pname, SUFFIX[b], e, (double)x, b > 0 ? " and >= 0" : "");
                if (b == 2 && x < s->exp_avg_sq[e])
                    return qf_fail(QF_ERR_FORMAT, "%s: %s: '%s.max_exp_avg_sq' element %zu is %g < exp_avg_sq %g",
                                   fn, path, pname, e, (double)x, (double)s->exp_avg_sq[e]);
            }
        }
        n_params++;
    }
    if (n_params * per != nt) {
        /* Name the first tensor that belongs to no parameter. */
        for (int i = 0; i < nt; i++) {
            qf_tensor_view t;
            QF_TRY(qf_st_get(f, i, &t));
            int owned = 0;
            size_t len = strlen(t.name);
            for (int b = 0; b <= nbuf && !owned; b++) {
                const char *suf = b < nbuf ? SUFFIX[b] : ".step";
                size_t sl = strlen(suf);
                if (len > sl && strcmp(t.name + len - sl, suf) == 0) {
                    char pname[1000];
                    if (len - sl >= sizeof pname) continue;
                    memcpy(pname, t.name, len - sl);
                    pname[len - sl] = 0;
                    owned = find_state(o, pname) >= 0;
                }
            }
            if (!owned)
                return qf_fail(QF_ERR_FORMAT, "%s: %s: tensor '%s' is not part of an AdamW%s state "
                               "(expected <param>.step, .exp_avg, .exp_avg_sq%s)", fn, path, t.name,
                               o->c.amsgrad ? " (amsgrad)" : "", o->c.amsgrad ? ", .max_exp_avg_sq" : "");
        }
        return qf_fail(QF_ERR_FORMAT, "%s: %s: %d tensors for %d parameters (expected %d each)", fn, path, nt,
                       n_params, per);
    }
    return QF_OK;
}

qf_status qf_adamw_load(const char *path, qf_adamw **out) {
    const char *fn = "qf_adamw_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!path) return qf_fail(QF_ERR_ARG, "%s: path is NULL", fn);
    qf_safetensors *f;
    QF_TRY(qf_st_open(path, &f));
    qf_adamw *o = NULL;
    qf_status st = QF_OK;
    const char *fmt = qf_st_metadata(f, "format"), *ver = qf_st_metadata(f, "version");
    if (!fmt || strcmp(fmt, "qfuse.adamw") != 0) {
        st = qf_fail(QF_ERR_FORMAT, "%s: %s: metadata 'format' is %s%s%s; expected 'qfuse.adamw' "
                     "(not an optimizer state written by qf_adamw_save)", fn, path, fmt ? "'" : "",
                     fmt ? fmt : "missing", fmt ? "'" : "");
        goto fail;
    }
    if (!ver || strcmp(ver, "1") != 0) {
        st = qf_fail(QF_ERR_FORMAT, "%s: %s: metadata 'version' is '%s'; this build reads version 1", fn, path,
                     ver ? ver : "(missing)");
        goto fail;
    }
    qf_adamw_config c;
    double ams;
    if ((st = meta_double(f, path, "lr", &c.lr)) || (st = meta_double(f, path, "beta1", &c.beta1)) ||
        (st = meta_double(f, path, "beta2", &c.beta2)) || (st = meta_double(f, path, "eps", &c.eps)) ||
        (st = meta_double(f, path, "weight_decay", &c.weight_decay)) ||
        (st = meta_double(f, path, "amsgrad", &ams)))
        goto fail;
    if (ams != 0 && ams != 1) {
        st = qf_fail(QF_ERR_FORMAT, "%s: %s: metadata 'amsgrad' = %g; must be 0 or 1", fn, path, ams);
        goto fail;
    }
    c.amsgrad = (int)ams;
    if ((st = check_config(&c, "qf_adamw_load"))) {
        st = qf_fail_prefix(st, "%s", path);
        goto fail;
    }
    if ((st = qf_adamw_new(&c, &o))) goto fail;
    if ((st = load_states(o, f, path))) goto fail;
    qf_st_close(f);
    *out = o;
    return QF_OK;
fail:
    qf_adamw_free(o);
    qf_st_close(f);
    return st;
}
