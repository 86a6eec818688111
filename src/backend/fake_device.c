/* fake_device.c - a stand-in "GPU" for testing the models' device code paths on a machine without
 * one: the CPU backend's table in host memory, with an allocator, a synchronize, a strided SDPA
 * forward (gathered into contiguous heads) and bf16 weights (widened per call). Compiled only
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

static qf_status fake_gemm(const qf_gemm_nt_args *g) {
    if (!g->w_bf16) return cpu->gemm_nt(g);
    if (g->x_bf16 || g->out_bf16) return qf_fail(QF_ERR_UNSUPPORTED, "fake device: no bf16 activations");
    qf_gemm_nt_args a = *g;
    float *w = malloc((size_t)(g->N * g->K) * 4);
    if (!w) return qf_fail(QF_ERR_NOMEM, "fake device: bf16 weight buffer");
    qf_status s = qf_to_f32(QF_BF16, g->w_bf16, w, (size_t)(g->N * g->K));
    a.w = w;
    a.w_bf16 = NULL;
    if (s == QF_OK) s = cpu->gemm_nt(&a);
    free(w);
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
    }
    return &fake;
}
#else
typedef int qf_fake_device_not_built; /* ISO C wants a declaration in every translation unit */
#endif
