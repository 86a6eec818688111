/* fake_device.c - a stand-in "GPU" for testing the models' device code paths on a machine without
 * one: the CPU backend's table in host memory, with an allocator, a synchronize, a strided SDPA
 * forward (gathered into contiguous heads), bf16 weights (widened per call) and the bf16-activation
 * entries (backend.h; values widened to float32, computed by the CPU ops, rounded back to bf16
 * where the GPU rounds them), so a bf16 model takes the same path it takes on the GPU. Compiled only
 * with -DQF_FAKE_DEVICE (`make fakedev`, which also turns on ASan/UBSan): never in the library
 * users get. Placement (placement.c) then accepts "cuda" and places models on this table, so the
 * host-side code of qf_*_to_device, input staging, planned device blocks and device gradients runs
 * as it does on a GPU, where a sanitizer can see it (it found a use-after-free in
 * qf_qformer_free). What it cannot show: the CUDA kernels, graphs (no capture: every forward runs
 * eagerly), device pointers the library tells apart from host ones (everything is host memory).
 *
 * Invariants: every block it hands out is filled with 0xff bytes (NaN as floats), so a read of
 * memory nothing wrote shows in the results; each call finishes before it returns. */
#ifdef QF_FAKE_DEVICE
#include "backend/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static qf_backend fake;
static const qf_backend *cpu;

static void gather(float *dst, const float *src, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sb, int64_t sh,
                   int64_t si) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < L; i++)
                memcpy(dst + ((b * H + h) * L + i) * D, src + b * sb + h * sh + i * si, (size_t)D * sizeof(float));
}

static qf_status fake_sdpa(const qf_sdpa_problem *pr, const float *q, const float *k, const float *v, float *out,
                           float *lse, float *w) {
    if (!pr->strided) return cpu->sdpa_forward(pr, q, k, v, out, lse, w);
    qf_sdpa_problem p = *pr;
    p.strided = 0;
    const size_t nq = (size_t)(pr->B * pr->Hq * pr->L), nk = (size_t)(pr->B * pr->Hkv * pr->S);
    float *qc = malloc(nq * (size_t)pr->D * 4), *kc = malloc(nk * (size_t)pr->D * 4);
    float *vc = malloc(nk * (size_t)pr->Dv * 4), *oc = malloc(nq * (size_t)pr->Dv * 4);
    qf_status s = QF_OK;
    if (!qc || !kc || !vc || !oc) s = qf_fail(QF_ERR_NOMEM, "fake device: sdpa gather buffers");
    if (s == QF_OK) {
        gather(qc, q, pr->B, pr->Hq, pr->L, pr->D, pr->q_sb, pr->q_sh, pr->q_si);
        gather(kc, k, pr->B, pr->Hkv, pr->S, pr->D, pr->k_sb, pr->k_sh, pr->k_si);
        gather(vc, v, pr->B, pr->Hkv, pr->S, pr->Dv, pr->v_sb, pr->v_sh, pr->v_si);
        s = cpu->sdpa_forward(&p, qc, kc, vc, oc, lse, w);
    }
    if (s == QF_OK)
        for (int64_t b = 0; b < pr->B; b++)
            for (int64_t h = 0; h < pr->Hq; h++)
                for (int64_t i = 0; i < pr->L; i++)
                    memcpy(out + b * pr->o_sb + h * pr->o_sh + i * pr->o_si,
                           oc + ((b * pr->Hq + h) * pr->L + i) * pr->Dv, (size_t)pr->Dv * 4);
    free(qc);
    free(kc);
    free(vc);
    free(oc);
    return s;
}

/* rows x cols bf16 <-> float32 between row strides ld16 and ld32 */
static qf_status widen(float *dst, int64_t ld32, const uint16_t *src, int64_t ld16, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++) QF_TRY(qf_to_f32(QF_BF16, src + r * ld16, dst + r * ld32, (size_t)cols));
    return QF_OK;
}
static qf_status narrow(uint16_t *dst, int64_t ld16, const float *src, int64_t ld32, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++) QF_TRY(qf_from_f32(QF_BF16, src + r * ld32, dst + r * ld16, (size_t)cols));
    return QF_OK;
}

static qf_status fake_gemm(const qf_gemm_nt_args *g) {
    if (!g->w_bf16) return cpu->gemm_nt(g);
    if (g->out_bf16 && (g->res || g->accumulate))
        return qf_fail(QF_ERR_ARG, "gemm (fake device): a bf16 out takes no residual and no accumulation");
    qf_gemm_nt_args a = *g;
    float *w = malloc((size_t)(g->N * g->K) * 4), *x = NULL, *o = NULL;
    qf_status s = w ? qf_to_f32(QF_BF16, g->w_bf16, w, (size_t)(g->N * g->K))
                    : qf_fail(QF_ERR_NOMEM, "fake device: bf16 weight buffer");
    a.w = w;
    a.w_bf16 = a.x_bf16 = a.bias_bf16 = NULL;
    a.out_bf16 = NULL;
    if (s == QF_OK && g->x_bf16) {
        x = malloc((size_t)(g->M * g->K) * 4);
        s = x ? widen(x, g->K, g->x_bf16, g->ldx, g->M, g->K) : qf_fail(QF_ERR_NOMEM, "fake device: x buffer");
        a.x = x;
        a.ldx = g->K;
    }
    if (s == QF_OK && g->out_bf16) {
        o = malloc((size_t)(g->M * g->N) * 4);
        if (!o) s = qf_fail(QF_ERR_NOMEM, "fake device: out buffer");
        a.out = o;
        a.ldo = g->N;
    }
    if (s == QF_OK) s = cpu->gemm_nt(&a);
    if (s == QF_OK && g->out_bf16) s = narrow(g->out_bf16, g->ldo, o, g->N, g->M, g->N);
    free(w);
    free(x);
    free(o);
    return s;
}

static qf_status fake_layernorm_x16(float *out, uint16_t *out16, float *mean, float *rstd, const float *x,
                                    const float *w, const float *b, int64_t rows, int64_t C, float eps) {
    QF_TRY(cpu->layernorm_forward(out, mean, rstd, x, w, b, rows, C, eps));
    return out16 ? narrow(out16, C, out, C, rows, C) : QF_OK;
}

static qf_status fake_gelu_x16(uint16_t *out16, const uint16_t *x16, int64_t n, qf_gelu_kind kind) {
    float *t = malloc((size_t)(n > 0 ? n : 1) * 4);
    if (!t) return qf_fail(QF_ERR_NOMEM, "fake device: gelu buffer");
    qf_status s = widen(t, n, x16, n, 1, n);
    if (s == QF_OK) s = cpu->gelu_forward(t, t, n, kind);
    if (s == QF_OK) s = narrow(out16, n, t, n, 1, n);
    free(t);
    return s;
}

static qf_status fake_stage_x16(uint16_t *dst16, const float *src, int64_t n, int64_t *first) {
    for (int64_t i = 0; i < n && i < *first; i++)
        if (!isfinite(src[i])) {
            *first = i;
            break;
        }
    return narrow(dst16, n, src, n, 1, n);
}

/* bf16 strided views widened into float32 ones with the same strides over one block each */
static qf_status fake_sdpa_x16(const qf_sdpa_problem *pr, const uint16_t *q, const uint16_t *k, const uint16_t *v,
                               uint16_t *out, float *lse) {
    if (!pr->strided) return qf_fail(QF_ERR_UNSUPPORTED, "fake device: contiguous bf16 sdpa is not emulated");
    /* the extent of each view: its last element + 1 */
    const int64_t nq = (pr->B - 1) * pr->q_sb + (pr->Hq - 1) * pr->q_sh + (pr->L - 1) * pr->q_si + pr->D;
    const int64_t nk = (pr->B - 1) * pr->k_sb + (pr->Hkv - 1) * pr->k_sh + (pr->S - 1) * pr->k_si + pr->D;
    const int64_t nv = (pr->B - 1) * pr->v_sb + (pr->Hkv - 1) * pr->v_sh + (pr->S - 1) * pr->v_si + pr->Dv;
    const int64_t no = (pr->B - 1) * pr->o_sb + (pr->Hq - 1) * pr->o_sh + (pr->L - 1) * pr->o_si + pr->Dv;
    float *qf = malloc((size_t)nq * 4), *kf = malloc((size_t)nk * 4), *vf = malloc((size_t)nv * 4);
    float *of = malloc((size_t)no * 4);
    qf_status s = qf && kf && vf && of ? QF_OK : qf_fail(QF_ERR_NOMEM, "fake device: bf16 sdpa buffers");
    if (s == QF_OK) s = widen(qf, nq, q, nq, 1, nq);
    if (s == QF_OK) s = widen(kf, nk, k, nk, 1, nk);
    if (s == QF_OK) s = widen(vf, nv, v, nv, 1, nv);
    if (s == QF_OK) s = widen(of, no, out, no, 1, no); /* keeps what lies between the output rows */
    if (s == QF_OK) s = fake_sdpa(pr, qf, kf, vf, of, lse, NULL);
    for (int64_t b = 0; s == QF_OK && b < pr->B; b++)
        for (int64_t h = 0; s == QF_OK && h < pr->Hq; h++)
            for (int64_t i = 0; s == QF_OK && i < pr->L; i++) {
                const int64_t at = b * pr->o_sb + h * pr->o_sh + i * pr->o_si;
                s = narrow(out + at, pr->Dv, of + at, pr->Dv, 1, pr->Dv);
            }
    free(qf);
    free(kf);
    free(vf);
    free(of);
    return s;
}

static qf_status fake_alloc(void **out, size_t bytes) {
    *out = NULL;
    if (posix_memalign(out, 64, bytes ? bytes : 64)) return qf_fail(QF_ERR_NOMEM, "fake device: %zu bytes", bytes);
    memset(*out, 0xff, bytes);
    return QF_OK;
}

static void fake_free(void *p) { free(p); }

static qf_status fake_synchronize(void) { return QF_OK; }

const qf_backend *qf_backend_fake(void) {
    if (!cpu) { /* first call from placement, on the caller's thread */
        cpu = qf_backend_cpu();
        fake = *cpu;
        fake.name = "fakegpu";
        fake.sdpa_strided = 1;
        fake.sdpa_forward = fake_sdpa;
        fake.gemm_nt = fake_gemm;
        fake.alloc = fake_alloc;
        fake.free = fake_free;
        fake.synchronize = fake_synchronize;
        fake.layernorm_forward_x16 = fake_layernorm_x16;
        fake.gelu_forward_x16 = fake_gelu_x16;
        fake.sdpa_forward_x16 = fake_sdpa_x16;
        fake.stage_x16 = fake_stage_x16;
    }
    return &fake;
}
#else
typedef int qf_fake_device_not_built; /* ISO C wants a declaration in every translation unit */
#endif
