/* test_sdpa.c - qf_sdpa_forward on every ISA path against a naive double-precision reference
 * written here from the definition (softmax(scale*QK^T + mask) V, torch's semantics as listed in
 * sdpa_internal.h). The authoritative comparison with PyTorch is tests/python/test_sdpa.py; this
 * test sweeps many more shapes (head dims, lengths off the tile sizes, GQA, causal with L < S and
 * L > S, bool/float masks with broadcast strides, fully masked rows, dropout, weights, key splits
 * for decoding) quickly, for each of the scalar, AVX2 and AVX-512 kernels.
 * The dropout keep decision uses qf_philox_uniform, which test_core checks against the Philox
 * known-answer vectors; the vectorised generator and exp of sdpa_simd.h are checked against it
 * and libm's double exp directly (simd_helpers). */
#include "sdpa_testutil.h"
#include "ops/sdpa_simd.h"
#include <stdint.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) { return tu_lcg_uniform(&rng_state); } /* uniform in [-1, 1) */

typedef struct {
    const char *name;
    int64_t B, Hq, Hkv, L, S, D, Dv;
    int causal;
    qf_mask_kind mask_kind;
    int mask_ndim;
    int64_t mask_shape[4];
    int mask_dead_rows;   /* make some rows fully masked */
    float dropout;
    int want_weights, want_lse;
    float qscale;         /* spread of q (larger = peakier softmax) */
    float scale;          /* NaN = default */
} sdpa_case;

/* Reference: out, lse, weights in double, from the definition. */
static void reference(const qf_sdpa_params *p, const float *q, const float *k, const float *v,
                      const void *mask, double *out, double *lse, double *w) {
    const int64_t B = p->B, Hq = p->Hq, L = p->L, S = p->S, D = p->D, Dv = p->Dv;
    const int64_t group = p->Hq / p->Hkv;
    const double scale = isnan(p->scale) ? (double)(1.0f / sqrtf((float)D)) : (double)p->scale;
    int64_t st[4] = {0, 0, 0, 0};
    if (p->mask.kind != QF_MASK_NONE) tu_mask_strides(p->mask.ndim, p->mask.shape, st);
    double *sc = malloc((size_t)S * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < L; i++) {
                const int64_t row = (b * Hq + h) * L + i, hk = h / group;
                double mx = -INFINITY;
                for (int64_t j = 0; j < S; j++) {
                    double s = -INFINITY;
                    int ok = !(p->is_causal && j > i);
                    int64_t mi = b * st[0] + h * st[1] + i * st[2] + j * st[3];
                    if (ok && p->mask.kind == QF_MASK_BOOL) ok = ((const uint8_t *)mask)[mi] != 0;
                    if (ok) {
                        double acc = 0;
                        for (int64_t d = 0; d < D; d++)
                            acc += (double)q[row * D + d] * k[((b * p->Hkv + hk) * S + j) * D + d];
                        s = acc * scale;
                        if (p->mask.kind == QF_MASK_FLOAT) s += ((const float *)mask)[mi];
                    }
                    sc[j] = s;
                    if (s > mx) mx = s;
                }
                for (int64_t d = 0; d < Dv; d++) out[row * Dv + d] = 0;
                if (mx == -INFINITY) {
                    lse[row] = -INFINITY;
                    for (int64_t j = 0; j < S; j++) w[row * S + j] = 0;
                    continue;
                }
                double sum = 0;
                for (int64_t j = 0; j < S; j++) sum += exp(sc[j] - mx);
                lse[row] = mx + log(sum);
                for (int64_t j = 0; j < S; j++) {
                    double pj = exp(sc[j] - mx) / sum;
                    if (p->dropout_p > 0)
                        pj = qf_philox_uniform(p->seed, p->offset, (uint64_t)(row * S + j)) >= p->dropout_p
                                 ? pj / (1.0 - (double)p->dropout_p) : 0.0;
                    w[row * S + j] = pj;
                    for (int64_t d = 0; d < Dv; d++)
                        out[row * Dv + d] += pj * v[((b * p->Hkv + hk) * S + j) * Dv + d];
                }
            }
    free(sc);
}

static double lse_err(const float *a, const double *b, size_t n) {
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        if (isinf(b[i]) || isinf(a[i])) { if (!(a[i] == b[i])) return INFINITY; continue; }
        double d = fabs(a[i] - b[i]) / (1.0 + fabs(b[i]));
        if (d > e || d != d) e = d;
    }
    return e;
}

static double worst_out, worst_lse, worst_w;

static void run_case(const sdpa_case *c, const char *isa) {
    qf_sdpa_params p = qf_sdpa_defaults(c->B, c->Hq, c->Hkv, c->L, c->S, c->D);
    p.Dv = c->Dv ? c->Dv : c->D;
    p.is_causal = c->causal;
    p.dropout_p = c->dropout;
    p.seed = 1234;
    p.offset = 77;
    p.scale = c->scale;
    const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, L = p.L, S = p.S, D = p.D, Dv = p.Dv;
    size_t nq = (size_t)(B * Hq * L * D), nk = (size_t)(B * Hkv * S * D), nv = (size_t)(B * Hkv * S * Dv);
    size_t no = (size_t)(B * Hq * L * Dv), nl = (size_t)(B * Hq * L), nw = (size_t)(B * Hq * L * S);
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4);
    for (size_t i = 0; i < nq; i++) q[i] = frand() * c->qscale;
    for (size_t i = 0; i < nk; i++) k[i] = frand();
    for (size_t i = 0; i < nv; i++) v[i] = frand();
    void *mask = NULL;
    if (c->mask_kind != QF_MASK_NONE) {
        mask = tu_sdpa_mask(c->mask_kind, c->mask_ndim, c->mask_shape, c->mask_dead_rows, &rng_state);
        p.mask.kind = c->mask_kind;
        p.mask.data = mask;
        p.mask.ndim = c->mask_ndim;
        for (int d = 0; d < c->mask_ndim; d++) p.mask.shape[d] = c->mask_shape[d];
    }
    float *out = malloc(no * 4), *lse = malloc(nl * 4), *w = c->want_weights ? malloc(nw * 4) : NULL;
    for (size_t i = 0; i < no; i++) out[i] = NAN; /* the kernel must overwrite everything */
    for (size_t i = 0; i < nl; i++) lse[i] = NAN;
    if (w) for (size_t i = 0; i < nw; i++) w[i] = NAN;
    double *ro = malloc(no * 8), *rl = malloc(nl * 8), *rw = malloc(nw * 8);
    reference(&p, q, k, v, mask, ro, rl, rw);
    qf_status s = qf_sdpa_forward(&p, q, k, v, out, c->want_lse ? lse : NULL, w);
    CHECK_OK(s);
    if (s == QF_OK) {
        double eo = tu_rel_err(out, ro, no);
        double el = c->want_lse ? lse_err(lse, rl, nl) : 0;
        double ew = w ? tu_rel_err(w, rw, nw) : 0;
        if (eo > worst_out) worst_out = eo;
        if (el > worst_lse) worst_lse = el;
        if (ew > worst_w) worst_w = ew;
        int bad = !(eo < 2e-5) || !(el < 2e-6) || !(ew < 2e-5);
        tu_checks++;
        if (bad) {
            tu_failures++;
            fprintf(stderr, "FAIL %-28s isa=%-6s B%lld Hq%lld Hkv%lld L%lld S%lld D%lld Dv%lld: out %.2e lse %.2e w %.2e\n",
                    c->name, isa, (long long)B, (long long)Hq, (long long)Hkv, (long long)L, (long long)S,
                    (long long)D, (long long)Dv, eo, el, ew);
        }
    }
    free(q); free(k); free(v); free(mask); free(out); free(lse); free(w); free(ro); free(rl); free(rw);
}

/* qf_sdpa_dropout512 must reproduce qf_philox_uniform bit for bit (any start, any length,
 * counters whose low word wraps); qf_sdpa_exp512 must stay within 2e-7 of exp and give 0 for
 * -inf and far-negative inputs. */
QF_TARGET_AVX512 static void simd_helpers(void) {
    static const uint64_t starts[] = {0, 1, 3, 63, 64, 77, 1000003, ((uint64_t)1 << 34) - 37, ((uint64_t)1 << 34) - 64};
    float p[300];
    for (size_t s = 0; s < sizeof starts / sizeof *starts; s++)
        for (int64_t n = 1; n <= 300; n += 37) {
            for (int64_t j = 0; j < n; j++) p[j] = 1.0f + (float)j;
            qf_sdpa_dropout512(p, n, 99, 5, starts[s], 0.3f);
            int bad = 0;
            for (int64_t j = 0; j < n; j++) {
                int keep = qf_philox_uniform(99, 5, starts[s] + (uint64_t)j) >= 0.3f;
                if (p[j] != (keep ? 1.0f + (float)j : 0.0f)) bad++;
            }
            CHECK(bad == 0);
        }
    double worst = 0;
    for (double x = -87.0; x <= 1.0; x += 0.0013) {
        float in[16], out[16];
        for (int t = 0; t < 16; t++) in[t] = (float)(x + t * 1e-4);
        _mm512_storeu_ps(out, qf_sdpa_exp512(_mm512_loadu_ps(in)));
        for (int t = 0; t < 16; t++) {
            double e = fabs(out[t] - exp((double)in[t])) / exp((double)in[t]);
            if (e > worst) worst = e;
        }
    }
    CHECK(worst < 2e-7);
    float in[16] = {-INFINITY, -88.0f, -1000.0f, -87.5f}, out[16];
    _mm512_storeu_ps(out, qf_sdpa_exp512(_mm512_loadu_ps(in)));
    CHECK(out[0] == 0.0f && out[1] == 0.0f && out[2] == 0.0f && out[3] == 0.0f && out[4] == 1.0f);
    printf("test_sdpa: simd helpers: dropout512 bit-exact, exp512 worst rel err %.2e\n", worst);
}

int main(void) {
    const qf_isa isa0 = qf_get_isa();
    if (qf_set_isa(QF_ISA_AVX512) == QF_OK) simd_helpers();
    qf_set_isa(isa0);
    static const int64_t dims[] = {8, 24, 40, 64, 72, 128, 200, 256};
    static const int64_t lens[] = {1, 7, 16, 33, 128, 300};
    sdpa_case cases[256];
    int n = 0;
    /* head dims x a few length pairs */
    for (size_t d = 0; d < sizeof dims / sizeof *dims; d++) {
        cases[n++] = (sdpa_case){"dims", 1, 2, 2, 33, 300, dims[d], 0, 0, 0, 0, {0}, 0, 0, 0, 1, 1.0f, NAN};
        cases[n++] = (sdpa_case){"dims causal", 1, 1, 1, 128, 128, dims[d], 0, 1, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    }
    /* lengths: every L x S pair of the list, small heads */
    for (size_t a = 0; a < sizeof lens / sizeof *lens; a++)
        for (size_t b = 0; b < sizeof lens / sizeof *lens; b++) {
            cases[n++] = (sdpa_case){"lens", 2, 3, 3, lens[a], lens[b], 24, 40, 0, 0, 0, {0}, 0, 0, 0, 1, 1.5f, NAN};
            cases[n++] = (sdpa_case){"lens causal", 1, 2, 1, lens[a], lens[b], 16, 0, 1, 0, 0, {0}, 0, 0, 0, 1, 1.5f, NAN};
        }
    /* B*H sizes, GQA, Dv != D, explicit scale */
    cases[n++] = (sdpa_case){"batch", 5, 3, 3, 16, 33, 64, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"gqa", 2, 6, 2, 33, 128, 40, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"gqa causal", 1, 8, 2, 130, 130, 72, 24, 1, 0, 0, {0}, 0, 0, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"scale", 1, 2, 2, 7, 300, 64, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 1.0f, 0.7f};
    cases[n++] = (sdpa_case){"peaky", 1, 2, 2, 64, 200, 64, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 12.0f, NAN};
    cases[n++] = (sdpa_case){"no lse", 1, 2, 2, 50, 70, 32, 0, 0, 0, 0, {0}, 0, 0, 0, 0, 1.0f, NAN};
    cases[n++] = (sdpa_case){"causal L>S", 1, 2, 2, 300, 33, 64, 0, 1, 0, 0, {0}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"causal L<S", 1, 2, 2, 33, 300, 64, 0, 1, 0, 0, {0}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"big head", 1, 1, 1, 9, 40, 1024, 600, 0, 0, 0, {0}, 0, 0, 0, 1, 0.3f, NAN};
    cases[n++] = (sdpa_case){"big head causal", 1, 1, 1, 40, 40, 333, 1024, 1, 0, 0, {0}, 0, 0, 0, 1, 0.3f, NAN};
    /* decoding: few rows, many keys (exercises the key split) */
    cases[n++] = (sdpa_case){"decode", 1, 1, 1, 1, 4100, 64, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode gqa", 1, 4, 1, 1, 1500, 128, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode causal", 1, 1, 1, 3, 2000, 40, 0, 1, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode mask", 1, 1, 1, 2, 3000, 64, 0, 0, QF_MASK_BOOL, 2, {2, 3000}, 1, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode tiny head", 1, 3, 3, 1, 100, 8, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode weights", 2, 4, 2, 2, 300, 24, 0, 0, QF_MASK_FLOAT, 2, {2, 300}, 0, 0.1f, 1, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode batch", 9, 2, 2, 1, 200, 72, 0, 0, 0, 0, {0}, 0, 0, 0, 1, 2.0f, NAN};
    cases[n++] = (sdpa_case){"decode dropout", 1, 1, 1, 1, 3000, 64, 0, 0, 0, 0, {0}, 0, 0.3f, 0, 1, 2.0f, NAN};
    /* masks: full, per-(L,S), key padding [B,1,1,S], per-row broadcast over keys [L,1], scalar */
    cases[n++] = (sdpa_case){"bool full", 2, 3, 3, 33, 70, 40, 0, 0, QF_MASK_BOOL, 4, {2, 3, 33, 70}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"bool LS", 2, 3, 3, 33, 300, 64, 0, 0, QF_MASK_BOOL, 2, {33, 300}, 0, 0, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"bool pad", 2, 3, 3, 17, 300, 64, 0, 0, QF_MASK_BOOL, 4, {2, 1, 1, 300}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"bool rows", 2, 3, 3, 33, 70, 24, 0, 0, QF_MASK_BOOL, 2, {33, 1}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"bool dead rows", 1, 2, 2, 33, 77, 24, 0, 1, QF_MASK_BOOL, 2, {33, 77}, 1, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"float full", 2, 2, 1, 33, 70, 40, 0, 0, QF_MASK_FLOAT, 4, {2, 2, 33, 70}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"float heads", 2, 2, 2, 40, 257, 64, 0, 1, QF_MASK_FLOAT, 3, {2, 40, 257}, 0, 0, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"float rows", 2, 3, 3, 33, 70, 24, 0, 0, QF_MASK_FLOAT, 2, {33, 1}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"float scalar", 1, 2, 2, 20, 70, 24, 0, 0, QF_MASK_FLOAT, 1, {1}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"float dead rows", 1, 2, 2, 33, 300, 24, 0, 0, QF_MASK_FLOAT, 2, {33, 300}, 1, 0, 1, 1, 1.0f, NAN};
    /* dropout, with and without weights and masks */
    cases[n++] = (sdpa_case){"dropout", 2, 2, 2, 33, 300, 64, 0, 0, 0, 0, {0}, 0, 0.2f, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"dropout causal", 1, 2, 1, 70, 70, 40, 0, 1, 0, 0, {0}, 0, 0.5f, 0, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"dropout mask", 1, 2, 2, 33, 33, 8, 0, 0, QF_MASK_BOOL, 2, {33, 33}, 1, 0.1f, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"weights causal", 2, 2, 2, 128, 300, 72, 0, 1, 0, 0, {0}, 0, 0, 1, 1, 1.0f, NAN};
    cases[n++] = (sdpa_case){"weights no lse", 1, 2, 2, 50, 70, 32, 0, 0, 0, 0, {0}, 0, 0, 1, 0, 1.0f, NAN};

    static const struct { qf_isa isa; const char *name; } isas[] = {
        {QF_ISA_SCALAR, "scalar"}, {QF_ISA_AVX2, "avx2"}, {QF_ISA_AVX512, "avx512"}};
    const qf_isa saved = qf_get_isa();
    const int saved_threads = qf_get_num_threads();
    for (size_t t = 0; t < sizeof isas / sizeof *isas; t++) {
        if (qf_set_isa(isas[t].isa) != QF_OK) { printf("test_sdpa: %s not available, skipped\n", isas[t].name); continue; }
        worst_out = worst_lse = worst_w = 0;
        for (int c = 0; c < n; c++) {
            /* alternate 1 and 2 threads: the key split and scheduling depend on the count */
            qf_set_num_threads(1 + (c & 1));
            run_case(&cases[c], isas[t].name);
        }
        printf("test_sdpa: %-6s %d cases, worst rel err out %.2e lse %.2e weights %.2e\n", isas[t].name, n,
               worst_out, worst_lse, worst_w);
    }
    qf_set_isa(saved);
    qf_set_num_threads(saved_threads);

    /* The test itself must be able to fail: a wrong scale must be caught by the comparison. */
    {
        qf_sdpa_params p = qf_sdpa_defaults(1, 1, 1, 4, 5, 8);
        float q[32], k[40], v[40], out[32];
        double ro[32], rl[4], rw[20];
        for (int i = 0; i < 32; i++) q[i] = frand();
        for (int i = 0; i < 40; i++) { k[i] = frand(); v[i] = frand(); }
        reference(&p, q, k, v, NULL, ro, rl, rw);
        p.scale = 0.5f; /* default would be 1/sqrt(8) */
        CHECK_OK(qf_sdpa_forward(&p, q, k, v, out, NULL, NULL));
        CHECK(tu_rel_err(out, ro, 32) > 1e-3);
    }
    TEST_MAIN_END("test_sdpa");
}
