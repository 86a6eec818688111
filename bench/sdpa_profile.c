/* sdpa_profile.c - private timing tool for the fused attention forward (not a test, not the
 * official benchmark: that is bench/bench_attention.c). Prints GFLOP/s of qf_sdpa_forward on
 * the shapes the issue names and its ratio to a large cblas_sgemm on the same thread count.
 * Flops: 4*B*H*L*S*D for the pairs actually computed (causal with L == S: L*(L+1)/2 pairs).
 *
 *   cc -O2 -fopenmp -march=native -Iinclude bench/sdpa_profile.c BUILD/libqfuse.a \
 *      -lcjson -lopenblas -lm -o sdpa_profile
 *   ./sdpa_profile [threads] [filter]      (CHECK=1 in the environment: keep check_finite on) */
#include "qfuse.h"
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double now(void) { return omp_get_wtime(); }

static double sgemm_gflops(int n) {
    float *a = malloc((size_t)n * n * 4), *b = malloc((size_t)n * n * 4), *c = malloc((size_t)n * n * 4);
    for (size_t i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 7) * 0.1f; b[i] = (float)(i % 5) * 0.1f; }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    double best = 1e30;
    for (int r = 0; r < 5; r++) {
        double t = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        t = now() - t;
        if (t < best) best = t;
    }
    free(a); free(b); free(c);
    return 2.0 * n * n * (double)n / best * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    const char *filter = argc > 2 ? argv[2] : NULL;
    qf_set_num_threads(threads);
    double peak = sgemm_gflops(2048);
    printf("threads %d, isa %s, sgemm 2048^3: %.1f GFLOP/s\n", threads, qf_isa_name(qf_get_isa()), peak);
    static const struct { const char *name; int64_t B, H, L, S, D; int causal; } shapes[] = {
        {"cross 8x12x32x257x64", 8, 12, 32, 257, 64, 0},
        {"cross-b1 1x12x32x257x64", 1, 12, 32, 257, 64, 0},
        {"cross-b64 64x12x32x257x64", 64, 12, 32, 257, 64, 0},
        {"self 8x12x512x512x64", 8, 12, 512, 512, 64, 0},
        {"causal 8x12x512x512x64", 8, 12, 512, 512, 64, 1},
        {"causal 1x16x2048x2048x128", 1, 16, 2048, 2048, 128, 1},
        {"self 1x16x2048x2048x128", 1, 16, 2048, 2048, 128, 0},
        {"decode 1x16x1x4096x128", 1, 16, 1, 4096, 128, 0},
    };
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        if (filter && !strstr(shapes[s].name, filter)) continue;
        qf_sdpa_params p = qf_sdpa_defaults(shapes[s].B, shapes[s].H, shapes[s].H, shapes[s].L, shapes[s].S, shapes[s].D);
        p.is_causal = shapes[s].causal;
        p.check_finite = getenv("CHECK") != NULL;
        size_t nq = (size_t)(p.B * p.Hq * p.L * p.D), nk = (size_t)(p.B * p.Hkv * p.S * p.D);
        float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nk * 4), *o = malloc(nq * 4);
        float *lse = malloc((size_t)(p.B * p.Hq * p.L) * 4);
        for (size_t i = 0; i < nq; i++) q[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < nk; i++) { k[i] = (float)((i * 40503u) % 997) * 1e-3f - 0.5f; v[i] = (float)(i % 13) * 0.1f; }
        if (qf_sdpa_forward(&p, q, k, v, o, lse, NULL) != QF_OK) { printf("error: %s\n", qf_last_error()); return 1; }
        const int bwd = getenv("BWD") != NULL;
        float *go = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
        if (bwd) {
            go = malloc(nq * 4); dq = malloc(nq * 4); dk = malloc(nk * 4); dv = malloc(nk * 4);
            for (size_t i = 0; i < nq; i++) go[i] = (float)((i * 7919u) % 101) * 1e-2f - 0.5f;
        }
        double best = 1e30, total = 0;
        int reps = 0;
        const double budget = getenv("SECS") ? atof(getenv("SECS")) : 1.0;
        while (reps < 3 || (total < budget && reps < 50)) {
            double t = now();
            if (bwd) qf_sdpa_backward(&p, q, k, v, o, lse, go, dq, dk, dv);
            else qf_sdpa_forward(&p, q, k, v, o, lse, NULL);
            t = now() - t;
            total += t;
            reps++;
            if (t < best) best = t;
        }
        double pairs = p.is_causal && p.L == p.S ? p.L * (p.L + 1) / 2.0 : (double)p.L * p.S;
        double fl = 4.0 * p.B * p.Hq * pairs * p.D * (bwd ? 2.5 : 1.0);
        printf("%-28s %9.3f ms  %7.1f GFLOP/s  %5.1f%% of sgemm\n", shapes[s].name, best * 1e3, fl / best * 1e-9,
               100.0 * fl / best * 1e-9 / peak);
        free(q); free(k); free(v); free(o); free(lse); free(go); free(dq); free(dk); free(dv);
    }
    return 0;
}
