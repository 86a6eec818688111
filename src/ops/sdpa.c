/* sdpa.c - public entry points of scaled dot-product attention: argument validation, mask
 * broadcasting, NaN/Inf screening, then the backend's kernel (sdpa_forward.c, sdpa_backward.c).
 *
 * Every rule a caller can break is checked here, once, with a message naming the field; the
 * kernels then run on a qf_sdpa_problem whose invariants are listed in sdpa_internal.h. */
#include "sdpa_internal.h"
#include "backend/backend.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Dimensions beyond these would make per-row kernel buffers unreasonable; far above any model. */
#define QF_SDPA_MAX_HEAD_DIM 1024

qf_sdpa_params qf_sdpa_defaults(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D) {
    qf_sdpa_params p;
    memset(&p, 0, sizeof p);
    p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.L = L; p.S = S; p.D = D; p.Dv = D;
    p.scale = NAN;
    p.enable_gqa = Hq != Hkv;
    p.check_finite = 1;
    p.mask.kind = QF_MASK_NONE;
    return p;
}

static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* Right-aligns the mask shape on [B,Hq,L,S] (numpy broadcasting) and derives element strides:
 * 0 where the mask has extent 1, the contiguous stride otherwise. */
static qf_status resolve_mask(const qf_sdpa_params *p, qf_sdpa_problem *pr) {
    const qf_mask *m = &p->mask;
    pr->mask_kind = m->kind;
    pr->mask = NULL;
    pr->ms_b = pr->ms_h = pr->ms_i = pr->ms_j = 0;
    if (m->kind == QF_MASK_NONE) return QF_OK;
    if (m->kind != QF_MASK_BOOL && m->kind != QF_MASK_FLOAT)
        return qf_fail(QF_ERR_ARG, "sdpa: attn_mask kind %d is not NONE, BOOL or FLOAT", (int)m->kind);
    if (!m->data) return qf_fail(QF_ERR_ARG, "sdpa: attn_mask data is NULL");
    if (m->ndim < 0 || m->ndim > 4)
        return qf_fail(QF_ERR_SHAPE, "sdpa: attn_mask has %d dims; at most 4 (broadcast to [B,Hq,L,S])", m->ndim);
    const int64_t target[4] = {p->B, p->Hq, p->L, p->S};
    int64_t full[4] = {1, 1, 1, 1}, stride[4] = {0, 0, 0, 0};
    for (int d = 0; d < m->ndim; d++) full[4 - m->ndim + d] = m->shape[d];
    int64_t st = 1;
    for (int d = 3; d >= 0; d--) {
        if (full[d] != 1 && full[d] != target[d]) {
            char ms[96], ts[96];
            fmt_shape(ms, sizeof ms, m->ndim, m->shape);
            fmt_shape(ts, sizeof ts, 4, target);
            static const char *names[4] = {"B", "Hq", "L", "S"};
            return qf_fail(QF_ERR_SHAPE,
                           "sdpa: attn_mask shape %s does not broadcast to [B,Hq,L,S] = %s (%s: %lld vs %lld)",
                           ms, ts, names[d], (long long)full[d], (long long)target[d]);
        }
        if (full[d] < 1) return qf_fail(QF_ERR_SHAPE, "sdpa: attn_mask has an empty dimension");
        stride[d] = full[d] == 1 ? 0 : st;
        st *= full[d];
    }
    pr->mask = m->data;
    pr->ms_b = stride[0]; pr->ms_h = stride[1]; pr->ms_i = stride[2]; pr->ms_j = stride[3];
    return QF_OK;
}

qf_status qf_sdpa_resolve(const qf_sdpa_params *p, qf_sdpa_problem *pr) {
    if (!p) return qf_fail(QF_ERR_ARG, "sdpa: params is NULL");
    const struct { const char *name; int64_t v; } dims[] = {
        {"B", p->B}, {"Hq", p->Hq}, {"Hkv", p->Hkv}, {"L", p->L}, {"S", p->S}, {"D", p->D}, {"Dv", p->Dv}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v < 1) return qf_fail(QF_ERR_SHAPE, "sdpa: %s = %lld, must be >= 1", dims[i].name, (long long)dims[i].v);
    if (p->D > QF_SDPA_MAX_HEAD_DIM || p->Dv > QF_SDPA_MAX_HEAD_DIM)
        return qf_fail(QF_ERR_UNSUPPORTED, "sdpa: head dim D = %lld / Dv = %lld exceeds %d",
                       (long long)p->D, (long long)p->Dv, QF_SDPA_MAX_HEAD_DIM);
    if (p->Hq != p->Hkv) {
        if (!p->enable_gqa)
            return qf_fail(QF_ERR_SHAPE, "sdpa: q has %lld heads but k/v have %lld and enable_gqa is false",
                           (long long)p->Hq, (long long)p->Hkv);
        if (p->Hq % p->Hkv)
            return qf_fail(QF_ERR_SHAPE, "sdpa: grouped-query attention needs Hq (%lld) to be a multiple of Hkv (%lld)",
                           (long long)p->Hq, (long long)p->Hkv);
    }
    /* Largest tensor: the optional weights [B,Hq,L,S]; keep every index well inside int64/size_t. */
    double biggest = (double)p->B * (double)p->Hq * (double)p->L * (double)(p->S > p->D ? p->S : p->D);
    if ((double)p->B * p->Hq * p->L * p->Dv > biggest) biggest = (double)p->B * p->Hq * p->L * p->Dv;
    if (biggest > 9.0e15) return qf_fail(QF_ERR_SHAPE, "sdpa: tensors too large (%.3g elements)", biggest);
    if (isnan(p->scale)) pr->scale = 1.0f / sqrtf((float)p->D);
    else if (!isfinite(p->scale)) return qf_fail(QF_ERR_ARG, "sdpa: scale is infinite");
    else pr->scale = p->scale;
    if (!(p->dropout_p >= 0.0f && p->dropout_p < 1.0f))
        return qf_fail(QF_ERR_ARG, "sdpa: dropout_p = %g, must be in [0, 1)", (double)p->dropout_p);
    pr->B = p->B; pr->Hq = p->Hq; pr->Hkv = p->Hkv; pr->L = p->L; pr->S = p->S; pr->D = p->D; pr->Dv = p->Dv;
    pr->group = p->Hq / p->Hkv;
    pr->is_causal = p->is_causal != 0;
    pr->dropout_p = p->dropout_p;
    pr->seed = p->seed;
    pr->offset = p->offset;
    pr->screen = NULL;
    /* contiguous tensors; a strided view is set by the caller (sdpa_internal.h) */
    pr->strided = 0;
    pr->q_si = pr->D, pr->q_sh = pr->L * pr->D, pr->q_sb = pr->Hq * pr->L * pr->D;
    pr->k_si = pr->D, pr->k_sh = pr->S * pr->D, pr->k_sb = pr->Hkv * pr->S * pr->D;
    pr->v_si = pr->Dv, pr->v_sh = pr->S * pr->Dv, pr->v_sb = pr->Hkv * pr->S * pr->Dv;
    pr->o_si = pr->Dv, pr->o_sh = pr->L * pr->Dv, pr->o_sb = pr->Hq * pr->L * pr->Dv;
    return resolve_mask(p, pr);
}

qf_status qf_sdpa_check(const qf_sdpa_params *p) {
    qf_sdpa_problem pr;
    return qf_sdpa_resolve(p, &pr);
}

/* True if any of x[0..n) is NaN or Inf: exponent bits all ones. Branch-free so it vectorises;
 * this pass costs about one read of the tensor, a small fraction of attention's time. */
static bool block_has_nonfinite(const float *x, size_t n) {
    const uint32_t *u = (const uint32_t *)(const void *)x;
    uint32_t bad = 0;
    #pragma omp simd reduction(| : bad)
    for (size_t i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    return bad != 0;
}

typedef struct { const char *name; const float *x; int64_t dims[4]; } finite_arg;

/* The error for element `bad` (flat index) of a, whose value is NaN or Inf. */
static qf_status report_nonfinite(const finite_arg *a, size_t bad, float value) {
    const int64_t *d = a->dims;
    int64_t i3 = (int64_t)(bad % (size_t)d[3]), r = (int64_t)(bad / (size_t)d[3]);
    int64_t i2 = r % d[2], i1 = (r / d[2]) % d[1], i0 = r / d[2] / d[1];
    return qf_fail(QF_ERR_NONFINITE, "sdpa: %s contains %s at [%lld,%lld,%lld,%lld]", a->name,
                   isnan(value) ? "NaN" : "Inf", (long long)i0, (long long)i1, (long long)i2, (long long)i3);
}

/* Screens all tensors in one parallel pass; on a hit, rescans the first bad block serially to
 * report the first NaN/Inf with its 4-D index. */
static qf_status check_finite(const finite_arg *args, int count) {
    enum { BLOCK = 16384 };
    size_t nblocks[4], total = 0;
    for (int t = 0; t < count; t++) {
        size_t n = (size_t)(args[t].dims[0] * args[t].dims[1] * args[t].dims[2] * args[t].dims[3]);
        nblocks[t] = (n + BLOCK - 1) / BLOCK;
        total += nblocks[t];
    }
    size_t first_bad = (size_t)-1;
    #pragma omp parallel for num_threads(qf_threads()) reduction(min : first_bad) schedule(static)
    for (size_t g = 0; g < total; g++) {
        size_t blk = g;
        int t = 0;
        while (blk >= nblocks[t]) blk -= nblocks[t++];
        size_t n = (size_t)(args[t].dims[0] * args[t].dims[1] * args[t].dims[2] * args[t].dims[3]);
        size_t lo = blk * BLOCK, len = n - lo < BLOCK ? n - lo : BLOCK;
        if (block_has_nonfinite(args[t].x + lo, len) && g < first_bad) first_bad = g;
    }
    if (first_bad == (size_t)-1) return QF_OK;
    size_t blk = first_bad;
    int t = 0;
    while (blk >= nblocks[t]) blk -= nblocks[t++];
    const finite_arg *a = &args[t];
    size_t bad = blk * BLOCK;
    while (isfinite(a->x[bad])) bad++;
    return report_nonfinite(a, bad, a->x[bad]);
}

static qf_status float_mask_error(size_t i, float value) {
    return qf_fail(QF_ERR_NONFINITE, "sdpa: attn_mask contains %s at flat index %zu (only finite values and -inf are allowed)",
                   isnan(value) ? "NaN" : "+Inf", i);
}

/* check_finite and check_float_mask for tensors in a device backend's memory (the GPU kernels do
 * not screen): the backend finds the first bad value, the message is the CPU path's. */
static qf_status check_finite_on(const qf_backend *be, const finite_arg *args, int count,
                                 const qf_sdpa_params *p, const qf_sdpa_problem *pr) {
    size_t bad;
    float value;
    for (int t = 0; t < count; t++) {
        const int64_t *d = args[t].dims;
        size_t n = (size_t)(d[0] * d[1] * d[2] * d[3]);
        QF_TRY(be->find_nonfinite(args[t].x, n, 0, &bad, &value));
        if (bad < n) return report_nonfinite(&args[t], bad, value);
    }
    if (p->mask.kind != QF_MASK_FLOAT) return QF_OK;
    size_t n = 1;
    for (int d = 0; d < p->mask.ndim; d++) n *= (size_t)p->mask.shape[d];
    QF_TRY(be->find_nonfinite((const float *)pr->mask, n, 1, &bad, &value));
    return bad < n ? float_mask_error(bad, value) : QF_OK;
}

/* A float mask may hold -inf (blocked) but not NaN or +inf (softmax would turn it into NaN). */
static qf_status check_float_mask(const qf_sdpa_params *p) {
    if (p->mask.kind != QF_MASK_FLOAT) return QF_OK;
    size_t n = 1;
    for (int d = 0; d < p->mask.ndim; d++) n *= (size_t)p->mask.shape[d];
    const float *m = p->mask.data;
    for (size_t i = 0; i < n; i++)
        if (isnan(m[i]) || m[i] == INFINITY) return float_mask_error(i, m[i]);
    return QF_OK;
}

qf_status qf_sdpa_forward(const qf_sdpa_params *p, const float *q, const float *k, const float *v,
                          float *out, float *lse, float *weights) {
    qf_sdpa_problem pr;
    QF_TRY(qf_sdpa_resolve(p, &pr));
    if (!q || !k || !v || !out)
        return qf_fail(QF_ERR_ARG, "sdpa: %s is NULL", !q ? "q" : !k ? "k" : !v ? "v" : "out");
    /* The screen of q, k, v runs inside the kernel where it can (folded into the passes that
     * read them anyway); otherwise, or when it saw a NaN/Inf, check_finite names the first one.
     * On an error the outputs hold garbage (their contents are unspecified). */
    const void *ptrs[7] = {q, k, v, out, lse, weights, pr.mask};
    static const char *const names[7] = {"q", "k", "v", "out", "lse", "weights", "attn_mask"};
    const qf_backend *be;
    QF_TRY(qf_backend_for("sdpa", ptrs, names, 7, &be));
    int screen = QF_SDPA_UNSCREENED;
    if (p->check_finite && be == qf_backend_cpu()) pr.screen = &screen;
    QF_TRY(be->sdpa_forward(&pr, q, k, v, out, lse, weights));
    if (p->check_finite) {
        const finite_arg args[3] = {{"q", q, {pr.B, pr.Hq, pr.L, pr.D}}, {"k", k, {pr.B, pr.Hkv, pr.S, pr.D}},
                                    {"v", v, {pr.B, pr.Hkv, pr.S, pr.Dv}}};
        if (be != qf_backend_cpu()) return check_finite_on(be, args, 3, p, &pr);
        if (screen != QF_SDPA_FINITE) QF_TRY(check_finite(args, 3));
        QF_TRY(check_float_mask(p));
    }
    return QF_OK;
}

qf_status qf_sdpa_backward(const qf_sdpa_params *p, const float *q, const float *k, const float *v,
                           const float *out, const float *lse, const float *grad_out,
                           float *dq, float *dk, float *dv) {
    qf_sdpa_problem pr;
    QF_TRY(qf_sdpa_resolve(p, &pr));
    const char *null_name = !q ? "q" : !k ? "k" : !v ? "v" : !out ? "out" : !lse ? "lse"
                          : !grad_out ? "grad_out" : !dq ? "dq" : !dk ? "dk" : !dv ? "dv" : NULL;
    if (null_name) return qf_fail(QF_ERR_ARG, "sdpa_backward: %s is NULL", null_name);
    /* screen as in qf_sdpa_forward: inside the kernel where it can, check_finite names the value */
    const void *ptrs[10] = {q, k, v, out, lse, grad_out, dq, dk, dv, pr.mask};
    static const char *const names[10] = {"q", "k", "v", "out", "lse", "grad_out", "dq", "dk", "dv", "attn_mask"};
    const qf_backend *be;
    QF_TRY(qf_backend_for("sdpa_backward", ptrs, names, 10, &be));
    int screen = QF_SDPA_UNSCREENED;
    if (p->check_finite && be == qf_backend_cpu()) pr.screen = &screen;
    QF_TRY(be->sdpa_backward(&pr, q, k, v, out, lse, grad_out, dq, dk, dv));
    if (p->check_finite) {
        const finite_arg args[4] = {{"q", q, {pr.B, pr.Hq, pr.L, pr.D}}, {"k", k, {pr.B, pr.Hkv, pr.S, pr.D}},
                                    {"v", v, {pr.B, pr.Hkv, pr.S, pr.Dv}}, {"grad_out", grad_out, {pr.B, pr.Hq, pr.L, pr.Dv}}};
        if (be != qf_backend_cpu()) return check_finite_on(be, args, 4, p, &pr);
        if (screen != QF_SDPA_FINITE) QF_TRY(check_finite(args, 4));
        QF_TRY(check_float_mask(p));
    }
    return QF_OK;
}

/* ---- bfloat16 entry points (CUDA backend only) ------------------------------------------------
 * The same validation as above (qf_sdpa_resolve, NULLs, one side for every tensor), then the
 * bf16 kernels of src/backend/cuda/sdpa_bf16.cu. Host tensors, or a build without CUDA, get
 * QF_ERR_UNSUPPORTED: there is no CPU bf16 attention. */

static qf_status bf16_on_gpu(const char *fn, const void *const *ptrs, const char *const *names, int n) {
#ifdef QF_HAVE_CUDA
    const qf_backend *be;
    QF_TRY(qf_backend_for(fn, ptrs, names, n, &be));
    if (be == qf_backend_cpu())
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: q is host memory (or qf_cuda_init has not run): bfloat16 SDPA "
                       "runs on the CUDA backend only; pass GPU pointers", fn);
    return QF_OK;
#else
    (void)ptrs; (void)names; (void)n;
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: bfloat16 SDPA runs on the CUDA backend only, and this libqfuse "
                   "was built without it (make CUDA=1)", fn);
#endif
}

#ifdef QF_HAVE_CUDA
typedef struct { const char *name; const uint16_t *x; int64_t dims[4]; } bf16_arg;

/* check_finite_on for bf16 tensors in GPU memory; the float mask goes through the backend's
 * float32 screen (NaN or +Inf refused, -inf allowed). */
static qf_status check_finite_bf16(const bf16_arg *args, int count, const qf_sdpa_params *p,
                                   const qf_sdpa_problem *pr) {
    size_t bad;
    float value;
    for (int t = 0; t < count; t++) {
        const int64_t *d = args[t].dims;
        size_t n = (size_t)(d[0] * d[1] * d[2] * d[3]);
        QF_TRY(qf_cuda_find_nonfinite_bf16(args[t].x, n, &bad, &value));
        if (bad < n) {
            const finite_arg fa = {args[t].name, NULL, {d[0], d[1], d[2], d[3]}};
            return report_nonfinite(&fa, bad, value);
        }
    }
    if (p->mask.kind != QF_MASK_FLOAT) return QF_OK;
    size_t n = 1;
    for (int d = 0; d < p->mask.ndim; d++) n *= (size_t)p->mask.shape[d];
    QF_TRY(qf_backend_cuda()->find_nonfinite((const float *)pr->mask, n, 1, &bad, &value));
    return bad < n ? float_mask_error(bad, value) : QF_OK;
}
#endif

qf_status qf_sdpa_forward_bf16(const qf_sdpa_params *p, const uint16_t *q, const uint16_t *k,
                               const uint16_t *v, uint16_t *out, float *lse) {
    qf_sdpa_problem pr;
    QF_TRY(qf_sdpa_resolve(p, &pr));
    if (!q || !k || !v || !out)
        return qf_fail(QF_ERR_ARG, "sdpa_forward_bf16: %s is NULL", !q ? "q" : !k ? "k" : !v ? "v" : "out");
    const void *ptrs[6] = {q, k, v, out, lse, pr.mask};
    static const char *const names[6] = {"q", "k", "v", "out", "lse", "attn_mask"};
#ifndef QF_HAVE_CUDA
    return bf16_on_gpu("sdpa_forward_bf16", ptrs, names, 6); /* refuses: no CUDA backend */
#else
    QF_TRY(bf16_on_gpu("sdpa_forward_bf16", ptrs, names, 6));
    QF_TRY(qf_cuda_sdpa_forward_bf16(&pr, q, k, v, out, lse));
    if (!p->check_finite) return QF_OK;
    const bf16_arg args[3] = {{"q", q, {pr.B, pr.Hq, pr.L, pr.D}}, {"k", k, {pr.B, pr.Hkv, pr.S, pr.D}},
                              {"v", v, {pr.B, pr.Hkv, pr.S, pr.Dv}}};
    return check_finite_bf16(args, 3, p, &pr);
#endif
}

qf_status qf_sdpa_backward_bf16(const qf_sdpa_params *p, const uint16_t *q, const uint16_t *k,
                                const uint16_t *v, const uint16_t *out, const float *lse,
                                const uint16_t *grad_out, uint16_t *dq, uint16_t *dk, uint16_t *dv) {
    qf_sdpa_problem pr;
    QF_TRY(qf_sdpa_resolve(p, &pr));
    const char *null_name = !q ? "q" : !k ? "k" : !v ? "v" : !out ? "out" : !lse ? "lse"
                          : !grad_out ? "grad_out" : !dq ? "dq" : !dk ? "dk" : !dv ? "dv" : NULL;
    if (null_name) return qf_fail(QF_ERR_ARG, "sdpa_backward_bf16: %s is NULL", null_name);
    const void *ptrs[10] = {q, k, v, out, lse, grad_out, dq, dk, dv, pr.mask};
    static const char *const names[10] = {"q", "k", "v", "out", "lse", "grad_out", "dq", "dk", "dv", "attn_mask"};
#ifndef QF_HAVE_CUDA
    return bf16_on_gpu("sdpa_backward_bf16", ptrs, names, 10); /* refuses: no CUDA backend */
#else
    QF_TRY(bf16_on_gpu("sdpa_backward_bf16", ptrs, names, 10));
    QF_TRY(qf_cuda_sdpa_backward_bf16(&pr, q, k, v, out, lse, grad_out, dq, dk, dv));
    if (!p->check_finite) return QF_OK;
    const bf16_arg args[4] = {{"q", q, {pr.B, pr.Hq, pr.L, pr.D}}, {"k", k, {pr.B, pr.Hkv, pr.S, pr.D}},
                              {"v", v, {pr.B, pr.Hkv, pr.S, pr.Dv}},
                              {"grad_out", grad_out, {pr.B, pr.Hq, pr.L, pr.Dv}}};
    return check_finite_bf16(args, 4, p, &pr);
#endif
}
