/* bench_attention.c - times qfuse's attention (SDPA forward and backward) and the Q-Former's
 * GEMMs against the machine's GEMM ceiling, at one thread count. A benchmark, not a test: it
 * checks only that each call succeeds and gives finite numbers.
 *
 *   bench_attention [--threads N] [--quick] [--only sdpa|gemm] [--table]
 *   bench_attention --blas-info      prints the linked BLAS and the kernel core it chose, exits
 *
 * Threads: --threads N, else QFUSE_THREADS, else all cores (qfuse and the BLAS use the same count).
 * Each case: warm-up runs (at least one, until 0.2 s), then timed runs (at least 3, at most 25,
 * about 1.5 s in total; --quick: 0.3 s), median reported.
 *
 * Output (stdout), one line per fact, tab-separated, read by bench/run.sh:
 *   M <key> <value>                 metadata: threads, blas, isa, ceiling_gflops, ceiling_shape
 *   R <case> <median ms> <flop>     a result; GFLOP/s = flop / ms / 1e6
 *   E <case> <message>              a case that failed (qf_last_error()); the exit status is 1
 * --table prints a readable table instead (qfuse columns only).
 *
 * FLOP conventions (also in bench/README.md): SDPA forward = 4*B*H*L*S*D (two GEMMs of 2*L*S*D
 * per head); causal with L == S counts only the computed pairs, L*(L+1)/2 instead of L*S;
 * SDPA backward = 2.5 x forward (FlashAttention-2's convention: five GEMMs to the forward's two);
 * GEMM = 2*M*N*K.
 *
 * Built with -DQF_BENCH_GEMM_ONLY it needs no libqfuse (only cblas): docs/blas.md compares
 * BLAS libraries with that build. Case names are shared with bench/torch_peer.py. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef QF_BENCH_GEMM_ONLY
#include <qfuse.h>
#endif

/* Whichever BLAS is linked provides some of these; the others stay NULL. */
extern void openblas_set_num_threads(int n) __attribute__((weak));
extern char *openblas_get_config(void) __attribute__((weak));
extern char *openblas_get_corename(void) __attribute__((weak));
extern void bli_thread_set_num_threads(long n) __attribute__((weak));
extern const char *bli_info_get_version_str(void) __attribute__((weak));
extern const char *bli_arch_string(int id) __attribute__((weak));
extern int bli_arch_query_id(void) __attribute__((weak));

static double quick_factor = 1.0;
static int failures = 0;
static int table_mode = 0;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One timed case: fn(ctx) returns 0 on success. Returns the median seconds, or -1 on failure. */
typedef int (*bench_fn)(void *ctx);

static double time_median(bench_fn fn, void *ctx) {
    double t0 = now_s(), first = 0;
    int warm = 0;
    do { /* warm-up: at least once, until 0.2 s have passed (page faults, BLAS thread start) */
        double a = now_s();
        if (fn(ctx) != 0) return -1;
        first = now_s() - a;
        warm++;
    } while (now_s() - t0 < 0.2 * quick_factor && warm < 50);
    int reps = (int)ceil(1.5 * quick_factor / (first > 1e-6 ? first : 1e-6));
    if (reps < 3) reps = 3;
    if (reps > 25) reps = 25;
    double t[25];
    for (int r = 0; r < reps; r++) {
        double a = now_s();
        if (fn(ctx) != 0) return -1;
        t[r] = now_s() - a;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    return reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
}

static double ceiling_gflops = 0; /* best GEMM rate of this run, for the table's "% ceiling" */

static void report(const char *name, double sec, double flop) {
    if (sec < 0) return;
    double ms = sec * 1e3, gf = flop / sec * 1e-9;
    if (table_mode) {
        if (ceiling_gflops > 0 && strncmp(name, "gemm ceiling", 12) != 0)
            printf("%-44s %10.3f %10.1f %8.1f%%\n", name, ms, gf, 100.0 * gf / ceiling_gflops);
        else
            printf("%-44s %10.3f %10.1f %9s\n", name, ms, gf, "-");
    } else {
        printf("R\t%s\t%.6f\t%.6g\n", name, ms, flop);
    }
    fflush(stdout);
}

static void report_error(const char *name, const char *msg) {
    failures++;
    if (table_mode) printf("%-44s FAILED: %s\n", name, msg);
    else printf("E\t%s\t%s\n", name, msg);
    fflush(stdout);
}

static float *alloc_random(size_t n, unsigned seed) {
    float *x = malloc(n * sizeof *x);
    if (!x) return NULL;
    unsigned s = seed * 2654435761u + 1u;
    for (size_t i = 0; i < n; i++) { /* xorshift: values in [-1, 1), cheap and reproducible */
        s ^= s << 13; s ^= s >> 17; s ^= s << 5;
        x[i] = (float)((double)s / 2147483648.0 - 1.0);
    }
    return x;
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ---- GEMM: out[M,N] = a[M,K] @ w[N,K]^T, exactly the call qf_linear_forward makes ---------- */

typedef struct { int M, N, K; float *a, *w, *c; } gemm_ctx;

static int run_gemm(void *p) {
    gemm_ctx *g = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g->M, g->N, g->K, 1.0f, g->a, g->K, g->w,
                g->K, 0.0f, g->c, g->N);
    return 0;
}

static double bench_gemm(const char *name, int M, int N, int K, int print) {
    gemm_ctx g = {M, N, K, alloc_random((size_t)M * K, 1), alloc_random((size_t)N * K, 2),
                  malloc((size_t)M * N * sizeof(float))};
    double sec = -1, flop = 2.0 * M * N * K;
    if (!g.a || !g.w || !g.c) report_error(name, "out of memory");
    else {
        sec = time_median(run_gemm, &g);
        if (!all_finite(g.c, (size_t)M * N)) { report_error(name, "non-finite output"); sec = -1; }
        else if (print) report(name, sec, flop);
    }
    free(g.a); free(g.w); free(g.c);
    return sec < 0 ? 0 : flop / sec * 1e-9;
}

/* The ceiling: the best sgemm rate of a few large square sizes, same threads, same run. 4096^3
 * is skipped where 2048^3 already takes over 150 ms (a slow BLAS: it would only cost time). */
static void bench_ceiling(void) {
    static const int sizes[] = {1024, 2048, 4096};
    int best_n = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char name[64];
        if (sizes[i] == 4096 && ceiling_gflops > 0 && 2.0 * 2048 * 2048 * 2048 / ceiling_gflops * 1e-9 > 0.150)
            break;
        snprintf(name, sizeof name, "gemm ceiling %dx%dx%d", sizes[i], sizes[i], sizes[i]);
        double gf = bench_gemm(name, sizes[i], sizes[i], sizes[i], 1);
        if (gf > ceiling_gflops) { ceiling_gflops = gf; best_n = sizes[i]; }
    }
    if (!table_mode) printf("M\tceiling_gflops\t%.1f\nM\tceiling_shape\t%d^3\n", ceiling_gflops, best_n);
    else printf("# GEMM ceiling: %.1f GFLOP/s (sgemm %d^3)\n", ceiling_gflops, best_n);
}

/* Q-Former (BLIP-2: hidden 768, 12 heads, FFN 3072, vision width 1408, 32 queries, 257 image
 * tokens, batch 8) linear layers; M = batch * tokens. */
static void bench_qformer_gemms(void) {
    bench_gemm("linear q/k/v/out 256x768 . 768x768^T", 256, 768, 768, 1);
    bench_gemm("linear cross k/v 2056x1408 . 768x1408^T", 2056, 768, 1408, 1);
    bench_gemm("linear ffn up 256x768 . 3072x768^T", 256, 3072, 768, 1);
    bench_gemm("linear ffn down 256x3072 . 768x3072^T", 256, 768, 3072, 1);
}

#ifndef QF_BENCH_GEMM_ONLY
/* ---- SDPA ---------------------------------------------------------------------------------- */

typedef struct {
    qf_sdpa_params p;
    float *q, *k, *v, *out, *lse, *dout, *dq, *dk, *dv;
} sdpa_ctx;

static int run_fwd(void *c) {
    sdpa_ctx *s = c;
    return qf_sdpa_forward(&s->p, s->q, s->k, s->v, s->out, s->lse, NULL) == QF_OK ? 0 : 1;
}

static int run_bwd(void *c) {
    sdpa_ctx *s = c;
    return qf_sdpa_backward(&s->p, s->q, s->k, s->v, s->out, s->lse, s->dout, s->dq, s->dk, s->dv) == QF_OK ? 0 : 1;
}

/* Times forward and backward of one shape; returns the forward's median seconds (or -1). */
static double bench_sdpa(int64_t B, int64_t H, int64_t L, int64_t S, int64_t D, int causal) {
    char fwd_name[96], bwd_name[96];
    const char *kind = L == S ? "self" : "cross";
    snprintf(fwd_name, sizeof fwd_name, "sdpa fwd %s%s %lldx%lldx%lldx%lldx%lld", kind,
             causal ? " causal" : "", (long long)B, (long long)H, (long long)L, (long long)S, (long long)D);
    snprintf(bwd_name, sizeof bwd_name, "sdpa bwd %s%s %lldx%lldx%lldx%lldx%lld", kind,
             causal ? " causal" : "", (long long)B, (long long)H, (long long)L, (long long)S, (long long)D);
    sdpa_ctx s;
    memset(&s, 0, sizeof s);
    s.p = qf_sdpa_defaults(B, H, H, L, S, D);
    s.p.is_causal = causal;
    double sec = -1;
    if (qf_sdpa_check(&s.p) != QF_OK) { /* shapes are validated before any buffer is touched */
        report_error(fwd_name, qf_last_error());
        return -1;
    }
    size_t nq = (size_t)(B * H * L * D), nk = (size_t)(B * H * S * D);
    s.q = alloc_random(nq, 11); s.k = alloc_random(nk, 12); s.v = alloc_random(nk, 13);
    s.dout = alloc_random(nq, 14);
    s.out = malloc(nq * sizeof(float)); s.lse = malloc((size_t)(B * H * L) * sizeof(float));
    s.dq = malloc(nq * sizeof(float)); s.dk = malloc(nk * sizeof(float)); s.dv = malloc(nk * sizeof(float));
    if (!s.q || !s.k || !s.v || !s.dout || !s.out || !s.lse || !s.dq || !s.dk || !s.dv) {
        report_error(fwd_name, "out of memory");
        goto done;
    }
    /* Pairs of (query, key) the kernel computes: all, or the lower triangle when causal. */
    double pairs = causal && L == S ? (double)L * (double)(L + 1) / 2.0 : (double)L * (double)S;
    double fwd_flop = 4.0 * (double)(B * H) * pairs * (double)D;
    sec = time_median(run_fwd, &s);
    if (sec < 0) { report_error(fwd_name, qf_last_error()); goto done; }
    if (!all_finite(s.out, nq)) { report_error(fwd_name, "non-finite output"); sec = -1; goto done; }
    report(fwd_name, sec, fwd_flop);
    /* backward reuses out and lse of the last forward, as training does */
    double bsec = time_median(run_bwd, &s);
    if (bsec < 0) report_error(bwd_name, qf_last_error());
    else if (!all_finite(s.dq, nq) || !all_finite(s.dk, nk) || !all_finite(s.dv, nk))
        report_error(bwd_name, "non-finite gradient");
    else report(bwd_name, bsec, 2.5 * fwd_flop);
done:
    free(s.q); free(s.k); free(s.v); free(s.dout); free(s.out); free(s.lse);
    free(s.dq); free(s.dk); free(s.dv);
    return sec;
}

static void bench_attention_shapes(void) {
    bench_sdpa(8, 12, 32, 257, 64, 0);    /* Q-Former cross attention: 32 queries read 257 tokens */
    double t_full = bench_sdpa(8, 12, 512, 512, 64, 0);
    double t_causal = bench_sdpa(8, 12, 512, 512, 64, 1);
    if (t_full > 0 && t_causal > 0) {
        if (table_mode) printf("# causal/unmasked time 8x12x512x512x64: %.2f\n", t_causal / t_full);
        else printf("M\tcausal_ratio 8x12x512x512x64\t%.3f\n", t_causal / t_full);
    }
    t_full = bench_sdpa(1, 16, 2048, 2048, 128, 0);
    t_causal = bench_sdpa(1, 16, 2048, 2048, 128, 1);
    if (t_full > 0 && t_causal > 0) {
        if (table_mode) printf("# causal/unmasked time 1x16x2048x2048x128: %.2f\n", t_causal / t_full);
        else printf("M\tcausal_ratio 1x16x2048x2048x128\t%.3f\n", t_causal / t_full);
    }
}
#endif

static const char *blas_name(void) {
    static char buf[256];
    if (openblas_get_config) {
        snprintf(buf, sizeof buf, "OpenBLAS %s (core %s)", openblas_get_config(),
                 openblas_get_corename ? openblas_get_corename() : "?");
        return buf;
    }
    if (bli_info_get_version_str) {
        snprintf(buf, sizeof buf, "BLIS %s (arch %s)", bli_info_get_version_str(),
                 bli_arch_string && bli_arch_query_id ? bli_arch_string(bli_arch_query_id()) : "?");
        return buf;
    }
    return "unknown cblas";
}

static void usage(void) {
    fprintf(stderr, "usage: bench_attention [--threads N] [--quick] [--only sdpa|gemm] [--table] | --blas-info\n"
                    "  times qfuse SDPA forward/backward and Q-Former GEMMs; see bench/README.md\n");
}

int main(int argc, char **argv) {
    int threads = 0, do_sdpa = 1, do_gemm = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
            if (threads < 1) { fprintf(stderr, "bench_attention: --threads %s: expected a count >= 1\n", argv[i]); return 2; }
        } else if (!strcmp(argv[i], "--quick")) quick_factor = 0.2;
        else if (!strcmp(argv[i], "--table")) table_mode = 1;
        else if (!strcmp(argv[i], "--blas-info")) { puts(blas_name()); return 0; }
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            i++;
            do_sdpa = !strcmp(argv[i], "sdpa");
            do_gemm = !strcmp(argv[i], "gemm");
            if (!do_sdpa && !do_gemm) { usage(); return 2; }
        } else { usage(); return 2; }
    }
    if (!threads) {
        const char *env = getenv("QFUSE_THREADS");
        threads = env && *env ? atoi(env) : 0;
    }
#ifdef QF_BENCH_GEMM_ONLY
    do_sdpa = 0;
    if (threads < 1) threads = 1;
    if (openblas_set_num_threads) openblas_set_num_threads(threads);
    if (bli_thread_set_num_threads) bli_thread_set_num_threads(threads);
#else
    if (threads >= 1 && qf_set_num_threads(threads) != QF_OK) {
        fprintf(stderr, "bench_attention: %s\n", qf_last_error());
        return 2;
    }
    threads = qf_get_num_threads(); /* also hands the count to the BLAS */
#endif
    if (table_mode) {
        printf("# threads %d, BLAS %s\n", threads, blas_name());
#ifndef QF_BENCH_GEMM_ONLY
        printf("# qfuse %s, ISA %s\n", QFUSE_VERSION, qf_isa_name(qf_get_isa()));
#endif
        printf("# FLOPs: SDPA fwd 4*B*H*L*S*D (causal: L*(L+1)/2 pairs); bwd 2.5x fwd; GEMM 2*M*N*K\n");
        printf("%-44s %10s %10s %9s\n", "case", "ms", "GFLOP/s", "%ceiling");
    } else {
        printf("M\tthreads\t%d\nM\tblas\t%s\n", threads, blas_name());
#ifndef QF_BENCH_GEMM_ONLY
        printf("M\tqfuse\t%s\nM\tisa\t%s\n", QFUSE_VERSION, qf_isa_name(qf_get_isa()));
#endif
    }
    fflush(stdout);
    bench_ceiling();
    if (do_gemm) bench_qformer_gemms();
#ifndef QF_BENCH_GEMM_ONLY
    if (do_sdpa) bench_attention_shapes();
#endif
    return failures ? 1 : 0;
}
