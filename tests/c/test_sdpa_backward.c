/* test_sdpa_backward.c - qf_sdpa_backward on every ISA path against gradients computed here in
 * double precision, for loss = sum(out * grad_out).
 *
 * The reference gradient is the textbook softmax backward written from the definition (full
 * softmax per row, no lse, no tiling), and it is itself checked by central finite differences
 * of a naive double forward on sampled entries of q, k and v of every case, so the comparison
 * does not rest on a formula shared with the kernel. The authoritative comparison with PyTorch
 * is tests/python/test_sdpa.py; this test sweeps many shapes and options quickly: head dims,
 * lengths off the tile sizes, GQA, causal with L < S and L > S, bool/float masks with
 * broadcast strides, fully masked rows (zero gradients), dropout (the mask regenerated from
 * qf_philox_uniform, which test_core checks against Philox known-answer vectors), for each of
 * the scalar, AVX2 and AVX-512 kernels and several thread counts. Outputs are pre-filled with
 * NaN so a gradient the kernel forgets to write fails. */
#include "sdpa_testutil.h"
#include <stdint.h>

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static float frand(void) { return tu_lcg_uniform(&rng_state); } /* uniform in [-1, 1) */

typedef struct {
    const char *name;
    int64_t B, Hq, Hkv, L, S, D, Dv;
    int causal;
    qf_mask_kind mask_kind;
    int mask_ndim;
    int64_t mask_shape[4];
    int mask_dead_rows; /* every 3rd mask row fully blocked */
    float dropout;
    float qscale;       /* spread of q (larger = peakier softmax) */
} bwd_case;

/* The problem in double, with the mask expanded to element strides on [B,Hq,L,S]. */
typedef struct {
    int64_t B, Hq, Hkv, L, S, D, Dv, group;
    double scale;
    int causal;
    qf_mask_kind mk;
    const void *mask;
    int64_t st[4];
    float p;
    uint64_t seed, offset;
    const double *q, *k, *v, *g; /* g = grad_out */
} ref_problem;

/* Score of (b,h,i,j), or -inf when causal/bool mask excludes it (a float -inf too). */
static double score(const ref_problem *r, int64_t b, int64_t h, int64_t i, int64_t j) {
    if (r->causal && j > i) return -INFINITY;
    int64_t mi = b * r->st[0] + h * r->st[1] + i * r->st[2] + j * r->st[3];
    if (r->mk == QF_MASK_BOOL && !((const uint8_t *)r->mask)[mi]) return -INFINITY;
    const double *qi = r->q + ((b * r->Hq + h) * r->L + i) * r->D;
    const double *kj = r->k + ((b * r->Hkv + h / r->group) * r->S + j) * r->D;
    double acc = 0;
    for (int64_t d = 0; d < r->D; d++) acc += qi[d] * kj[d];
    acc *= r->scale;
    if (r->mk == QF_MASK_FLOAT) acc += ((const float *)r->mask)[mi];
    return acc;
}

static double keep(const ref_problem *r, int64_t b, int64_t h, int64_t i, int64_t j) {
    if (r->p <= 0) return 1.0;
    uint64_t idx = (uint64_t)(((b * r->Hq + h) * r->L + i) * r->S + j);
    return qf_philox_uniform(r->seed, r->offset, idx) >= r->p ? 1.0 / (1.0 - (double)r->p) : 0.0;
}

/* Softmax row (b,h,i) into pr[0:S); returns 0 if no key is attendable (pr all 0). */
static int softmax_row(const ref_problem *r, int64_t b, int64_t h, int64_t i, double *pr) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < r->S; j++) { pr[j] = score(r, b, h, i, j); if (pr[j] > mx) mx = pr[j]; }
    if (mx == -INFINITY) { for (int64_t j = 0; j < r->S; j++) pr[j] = 0; return 0; }
    for (int64_t j = 0; j < r->S; j++) { pr[j] = exp(pr[j] - mx); sum += pr[j]; }
    for (int64_t j = 0; j < r->S; j++) pr[j] /= sum;
    return 1;
}

/* sum over rows i of heads [h0,h1) of batch b of out_i . g_i (the loss restricted to rows a
 * perturbation can change). */
static double partial_loss(const ref_problem *r, int64_t b, int64_t h0, int64_t h1, int64_t i0, int64_t i1, double *pr) {
    double loss = 0;
    for (int64_t h = h0; h < h1; h++)
        for (int64_t i = i0; i < i1; i++) {
            if (!softmax_row(r, b, h, i, pr)) continue;
            const double *gi = r->g + ((b * r->Hq + h) * r->L + i) * r->Dv;
            const double *vb = r->v + (b * r->Hkv + h / r->group) * r->S * r->Dv;
            for (int64_t j = 0; j < r->S; j++) {
                if (pr[j] == 0) continue;
                double w = pr[j] * keep(r, b, h, i, j), dot = 0;
                for (int64_t d = 0; d < r->Dv; d++) dot += gi[d] * vb[j * r->Dv + d];
                loss += w * dot;
            }
        }
    return loss;
}

/* Analytic gradients in double: per row, out = sum_j Z P v, dP_j = Z g.v_j, dS = P (dP - g.out). */
static void reference_grads(const ref_problem *r, double *dq, double *dk, double *dv) {
    const int64_t S = r->S, D = r->D, Dv = r->Dv;
    memset(dq, 0, (size_t)(r->B * r->Hq * r->L * D) * sizeof(double));
    memset(dk, 0, (size_t)(r->B * r->Hkv * S * D) * sizeof(double));
    memset(dv, 0, (size_t)(r->B * r->Hkv * S * Dv) * sizeof(double));
    double *pr = malloc((size_t)S * sizeof(double)), *dp = malloc((size_t)S * sizeof(double));
    double *o = malloc((size_t)Dv * sizeof(double));
    for (int64_t b = 0; b < r->B; b++)
        for (int64_t h = 0; h < r->Hq; h++)
            for (int64_t i = 0; i < r->L; i++) {
                if (!softmax_row(r, b, h, i, pr)) continue;
                const int64_t row = (b * r->Hq + h) * r->L + i, kv = b * r->Hkv + h / r->group;
                const double *gi = r->g + row * Dv, *qi = r->q + row * D;
                for (int64_t d = 0; d < Dv; d++) o[d] = 0;
                for (int64_t j = 0; j < S; j++) {
                    double z = keep(r, b, h, i, j), dot = 0;
                    const double *vj = r->v + (kv * S + j) * Dv;
                    for (int64_t d = 0; d < Dv; d++) { o[d] += z * pr[j] * vj[d]; dot += gi[d] * vj[d]; }
                    dp[j] = z * dot;
                    for (int64_t d = 0; d < Dv; d++) dv[(kv * S + j) * Dv + d] += z * pr[j] * gi[d];
                }
                double Di = 0;
                for (int64_t d = 0; d < Dv; d++) Di += gi[d] * o[d];
                for (int64_t j = 0; j < S; j++) {
                    double ds = pr[j] * (dp[j] - Di) * r->scale;
                    const double *kj = r->k + (kv * S + j) * D;
                    for (int64_t d = 0; d < D; d++) {
                        dq[row * D + d] += ds * kj[d];
                        dk[(kv * S + j) * D + d] += ds * qi[d];
                    }
                }
            }
    free(pr); free(dp); free(o);
}

/* Central differences on a few entries of x (q, k or v) vs the analytic gradient. Returns the
 * worst |fd - an| / (max|an| over the tensor), so a wrong reference formula fails the case. */
static double fd_check(ref_problem *r, double *x, const double *an, size_t n, int which, double gmax) {
    double worst = 0, *pr = malloc((size_t)r->S * sizeof(double));
    for (int t = 0; t < 5; t++) {
        size_t e = (size_t)((frand() + 1.0f) * 0.5f * (float)n);
        if (e >= n) e = n - 1;
        int64_t b, h0, h1, i0 = 0, i1 = r->L;
        if (which == 0) { /* q [B,Hq,L,D]: only row (b,h,i) */
            int64_t row = (int64_t)e / r->D;
            i0 = row % r->L; i1 = i0 + 1; h0 = (row / r->L) % r->Hq; h1 = h0 + 1; b = row / r->L / r->Hq;
        } else { /* k, v [B,Hkv,S,*]: the group's query heads */
            int64_t row = (int64_t)e / (which == 1 ? r->D : r->Dv);
            int64_t g = (row / r->S) % r->Hkv;
            b = row / r->S / r->Hkv; h0 = g * r->group; h1 = h0 + r->group;
        }
        const double h = 1e-4, x0 = x[e];
        x[e] = x0 + h;
        double lp = partial_loss(r, b, h0, h1, i0, i1, pr);
        x[e] = x0 - h;
        double lm = partial_loss(r, b, h0, h1, i0, i1, pr);
        x[e] = x0;
        double err = fabs((lp - lm) / (2 * h) - an[e]) / (gmax > 0 ? gmax : 1.0);
        if (err > worst) worst = err;
    }
    free(pr);
    return worst;
}

static double maxabs(const double *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) if (fabs(x[i]) > m) m = fabs(x[i]);
    return m;
}

static double worst_grad, worst_fd;

static void run_case(const bwd_case *c, const qf_isa *isas, int nisa, const int *threads, int nthr) {
    qf_sdpa_params p = qf_sdpa_defaults(c->B, c->Hq, c->Hkv, c->L, c->S, c->D);
    p.Dv = c->Dv ? c->Dv : c->D;
    p.is_causal = c->causal;
    p.dropout_p = c->dropout;
    p.seed = 4321;
    p.offset = 11;
    const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, L = p.L, S = p.S, D = p.D, Dv = p.Dv;
    size_t nq = (size_t)(B * Hq * L * D), nk = (size_t)(B * Hkv * S * D), nv = (size_t)(B * Hkv * S * Dv);
    size_t no = (size_t)(B * Hq * L * Dv), nl = (size_t)(B * Hq * L);
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4), *g = malloc(no * 4);
    double *qd = malloc(nq * 8), *kd = malloc(nk * 8), *vd = malloc(nv * 8), *gd = malloc(no * 8);
    for (size_t i = 0; i < nq; i++) qd[i] = q[i] = frand() * c->qscale;
    for (size_t i = 0; i < nk; i++) kd[i] = k[i] = frand();
    for (size_t i = 0; i < nv; i++) vd[i] = v[i] = frand();
    for (size_t i = 0; i < no; i++) gd[i] = g[i] = frand();
    void *mask = NULL;
    ref_problem r = {B, Hq, Hkv, L, S, D, Dv, Hq / Hkv, 1.0 / sqrt((double)D), c->causal, c->mask_kind,
                     NULL, {0, 0, 0, 0}, c->dropout, p.seed, p.offset, qd, kd, vd, gd};
    r.scale = (double)(1.0f / sqrtf((float)D)); /* the float scale the kernel uses */
    if (c->mask_kind != QF_MASK_NONE) {
        mask = tu_sdpa_mask(c->mask_kind, c->mask_ndim, c->mask_shape, c->mask_dead_rows, &rng_state);
        p.mask.kind = c->mask_kind;
        p.mask.data = mask;
        p.mask.ndim = c->mask_ndim;
        for (int d = 0; d < c->mask_ndim; d++) p.mask.shape[d] = c->mask_shape[d];
        tu_mask_strides(c->mask_ndim, c->mask_shape, r.st);
        r.mask = mask;
    }
    double *rdq = malloc(nq * 8), *rdk = malloc(nk * 8), *rdv = malloc(nv * 8);
    reference_grads(&r, rdq, rdk, rdv);
    /* the reference itself, by finite differences */
    double fq = fd_check(&r, qd, rdq, nq, 0, maxabs(rdq, nq));
    double fk = fd_check(&r, kd, rdk, nk, 1, maxabs(rdk, nk));
    double fv = fd_check(&r, vd, rdv, nv, 2, maxabs(rdv, nv));
    double fw = fq > fk ? fq : fk;
    if (fv > fw) fw = fv;
    if (fw > worst_fd) worst_fd = fw;
    tu_checks++;
    if (!(fw < 1e-6)) {
        tu_failures++;
        fprintf(stderr, "FAIL %s: reference gradient vs finite differences %.2e\n", c->name, fw);
    }
    float *out = malloc(no * 4), *lse = malloc(nl * 4);
    float *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nv * 4);
    const int thr0 = qf_get_num_threads();
    for (int ii = 0; ii < nisa; ii++)
        for (int tt = 0; tt < nthr; tt++) {
            if (qf_set_isa(isas[ii]) != QF_OK) continue;
            qf_set_num_threads(threads[tt]);
            CHECK_OK(qf_sdpa_forward(&p, q, k, v, out, lse, NULL));
            for (size_t i = 0; i < nq; i++) dq[i] = NAN;
            for (size_t i = 0; i < nk; i++) dk[i] = NAN;
            for (size_t i = 0; i < nv; i++) dv[i] = NAN;
            qf_status s = qf_sdpa_backward(&p, q, k, v, out, lse, g, dq, dk, dv);
            CHECK_OK(s);
            if (s != QF_OK) continue;
            double eq = tu_rel_err(dq, rdq, nq), ek = tu_rel_err(dk, rdk, nk), ev = tu_rel_err(dv, rdv, nv);
            double e = eq > ek ? eq : ek;
            if (ev > e || ev != ev) e = ev;
            if (e > worst_grad || e != e) worst_grad = e;
            tu_checks++;
            if (!(e < 3e-5)) {
                tu_failures++;
                fprintf(stderr, "FAIL %-20s isa=%-6s thr=%d B%lld Hq%lld Hkv%lld L%lld S%lld D%lld Dv%lld: dq %.2e dk %.2e dv %.2e\n",
                        c->name, qf_isa_name(isas[ii]), threads[tt], (long long)B, (long long)Hq, (long long)Hkv,
                        (long long)L, (long long)S, (long long)D, (long long)Dv, eq, ek, ev);
            }
        }
    qf_set_num_threads(thr0);
    free(q); free(k); free(v); free(g); free(qd); free(kd); free(vd); free(gd); free(mask);
    free(rdq); free(rdk); free(rdv); free(out); free(lse); free(dq); free(dk); free(dv);
}

int main(void) {
    const qf_isa isa0 = qf_get_isa();
    const qf_isa all[3] = {QF_ISA_SCALAR, QF_ISA_AVX2, QF_ISA_AVX512};
    const int one[1] = {2}, many[3] = {1, 2, 3};
    static const int64_t dims[] = {8, 24, 64, 72, 128, 200};
    static const int64_t lens[] = {1, 7, 33, 100, 300};
    bwd_case cases[128];
    int n = 0;
    for (size_t d = 0; d < sizeof dims / sizeof *dims; d++) {
        cases[n++] = (bwd_case){"dims", 1, 2, 2, 40, 150, dims[d], 0, 0, 0, 0, {0}, 0, 0, 1.0f};
        cases[n++] = (bwd_case){"dims causal", 1, 1, 1, 130, 130, dims[d], 0, 1, 0, 0, {0}, 0, 0, 2.0f};
    }
    for (size_t a = 0; a < sizeof lens / sizeof *lens; a++)
        for (size_t b = 0; b < sizeof lens / sizeof *lens; b++) {
            cases[n++] = (bwd_case){"lens", 1, 2, 2, lens[a], lens[b], 24, 40, 0, 0, 0, {0}, 0, 0, 1.5f};
            cases[n++] = (bwd_case){"lens causal", 1, 2, 1, lens[a], lens[b], 16, 0, 1, 0, 0, {0}, 0, 0, 1.5f};
        }
    cases[n++] = (bwd_case){"batch", 3, 3, 3, 16, 33, 64, 0, 0, 0, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"gqa", 2, 6, 2, 33, 100, 40, 0, 0, 0, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"gqa causal Dv", 1, 4, 2, 130, 130, 72, 24, 1, 0, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"peaky", 1, 2, 2, 64, 200, 64, 0, 0, 0, 0, {0}, 0, 0, 10.0f};
    cases[n++] = (bwd_case){"causal L>S", 1, 2, 2, 300, 33, 64, 0, 1, 0, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"causal L<S", 1, 2, 2, 33, 300, 64, 0, 1, 0, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"big head", 1, 1, 1, 9, 40, 1024, 600, 0, 0, 0, {0}, 0, 0, 0.3f};
    cases[n++] = (bwd_case){"long keys", 1, 1, 1, 3, 2000, 40, 0, 0, 0, 0, {0}, 0, 0, 2.0f};
    /* masks: full, [L,S], key padding [B,1,1,S], per-row [L,1], scalar; with dead rows */
    cases[n++] = (bwd_case){"bool full", 2, 2, 2, 40, 70, 24, 0, 0, QF_MASK_BOOL, 4, {2, 2, 40, 70}, 1, 0, 1.0f};
    cases[n++] = (bwd_case){"bool LS causal", 1, 2, 1, 70, 90, 64, 0, 1, QF_MASK_BOOL, 2, {70, 90}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"bool keypad", 2, 3, 3, 33, 129, 64, 0, 0, QF_MASK_BOOL, 4, {2, 1, 1, 129}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"bool rows", 1, 2, 2, 50, 65, 24, 0, 0, QF_MASK_BOOL, 2, {50, 1}, 1, 0, 1.0f};
    cases[n++] = (bwd_case){"float full", 2, 2, 1, 40, 70, 72, 0, 0, QF_MASK_FLOAT, 4, {2, 2, 40, 70}, 1, 0, 1.0f};
    cases[n++] = (bwd_case){"float heads", 1, 3, 3, 65, 65, 64, 0, 1, QF_MASK_FLOAT, 3, {3, 1, 65}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"float scalar", 1, 2, 2, 20, 30, 8, 0, 0, QF_MASK_FLOAT, 0, {0}, 0, 0, 1.0f};
    cases[n++] = (bwd_case){"float rows dead", 1, 2, 2, 50, 80, 40, 0, 0, QF_MASK_FLOAT, 2, {50, 1}, 1, 0, 1.0f};
    /* dropout (with causal, masks, GQA) */
    cases[n++] = (bwd_case){"dropout", 1, 2, 2, 70, 90, 64, 0, 0, 0, 0, {0}, 0, 0.3f, 1.0f};
    cases[n++] = (bwd_case){"dropout causal gqa", 2, 4, 2, 100, 100, 24, 40, 1, 0, 0, {0}, 0, 0.5f, 1.0f};
    cases[n++] = (bwd_case){"dropout mask", 1, 2, 2, 33, 150, 72, 0, 0, QF_MASK_BOOL, 4, {1, 2, 33, 150}, 1, 0.2f, 1.0f};
    for (int i = 0; i < n; i++) run_case(&cases[i], all, 3, one, 1);
    /* work splitting across thread counts on the fast paths */
    bwd_case thr[] = {
        {"threads", 2, 4, 2, 200, 260, 64, 0, 0, 0, 0, {0}, 0, 0, 1.0f},
        {"threads causal", 1, 3, 1, 300, 300, 128, 0, 1, 0, 0, {0}, 0, 0.1f, 1.0f},
        {"threads 1 pair", 1, 1, 1, 260, 300, 64, 0, 0, QF_MASK_BOOL, 2, {260, 300}, 0, 0, 1.0f},
        {"threads super-blocks", 1, 2, 1, 600, 700, 40, 0, 1, QF_MASK_FLOAT, 2, {600, 700}, 1, 0.2f, 1.0f},
    };
    for (size_t i = 0; i < sizeof thr / sizeof *thr; i++) run_case(&thr[i], all + 1, 2, many, 3);
    qf_set_isa(isa0);
    printf("test_sdpa_backward: %d cases; worst gradient rel err %.2e, worst reference-vs-FD %.2e\n",
           n + (int)(sizeof thr / sizeof *thr), worst_grad, worst_fd);
    TEST_MAIN_END("test_sdpa_backward");
}
