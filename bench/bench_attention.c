/* bench_attention.c - times qfuse's attention (SDPA forward and backward) and the Q-Former's
 * GEMMs against the machine's GEMM ceiling, at one thread count. A benchmark, not a test: it
 * checks only that each call succeeds and gives finite numbers.
 *
 *   bench_attention [--threads N] [--quick] [--only sdpa|gemm] [--table]
 *   bench_attention [--threads N] [--quick | --scale F] [--min-reps N] --serve   (compare.py)
 *   bench_attention --blas-info      prints the linked BLAS and the kernel core it chose, exits
 *
 * Threads: --threads N, else QFUSE_THREADS, else all cores (qfuse and the BLAS use the same count).
 * Each case: warm-up runs (at least one, until 0.2 s), then timed runs (at least 3, at most 25,
 * about 1.5 s in total), median reported; --quick scales both times by 0.2, --scale F by F;
 * --min-reps N lowers or raises the least number of timed runs (compare.py's rounds repeat too).
 * Every case sets up its own buffers (a backward case runs one untimed forward first for out and
 * lse), so a case can be timed alone, in any order, as often as asked.
 *
 * Output (stdout), one line per fact, tab-separated, read by bench/run.sh and bench/compare.py:
 *   M <key> <value>                 metadata: threads, blas, isa, ceiling_gflops, ceiling_shape
 *   R <case> <median ms> <flop>     a result; GFLOP/s = flop / ms / 1e6
 *   E <case> <message>              a case that failed (qf_last_error()); the exit status is 1
 * --table prints a readable table instead (qfuse columns only).
 * --serve prints the M lines and "D\t" (ready), then reads requests from stdin, one a line:
 *   <case name>   runs that case: its R or E line, then "D\t<case name>"
 *   list          "C\t<case name>" for every case in table order, then "D\tlist"
 *   quit or EOF   exits (status 1 if a case failed)
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
#include <stdint.h>
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
static int min_reps = 3;
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
    if (reps < min_reps) reps = min_reps;
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

/* ---- the cases ---------------------------------------------------------------------------- */

enum case_kind { CASE_CEILING, CASE_GEMM, CASE_SDPA_FWD, CASE_SDPA_BWD };

typedef struct {
    char name[96];
    enum case_kind kind;
    int M, N, K;                 /* GEMM cases */
    int64_t B, H, L, S, D;       /* SDPA cases */
    int causal;
} bench_case;

enum { MAX_CASES = 32 };
static bench_case cases[MAX_CASES];
static int n_cases = 0;

static void add_gemm(enum case_kind kind, const char *name, int M, int N, int K) {
    bench_case *c = &cases[n_cases++];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->kind = kind; c->M = M; c->N = N; c->K = K;
}

static void add_sdpa_pair(int64_t B, int64_t H, int64_t L, int64_t S, int64_t D, int causal) {
    for (int bwd = 0; bwd < 2; bwd++) {
        bench_case *c = &cases[n_cases++];
        memset(c, 0, sizeof *c);
        snprintf(c->name, sizeof c->name, "sdpa %s %s%s %lldx%lldx%lldx%lldx%lld", bwd ? "bwd" : "fwd",
                 L == S ? "self" : "cross", causal ? " causal" : "", (long long)B, (long long)H,
                 (long long)L, (long long)S, (long long)D);
        c->kind = bwd ? CASE_SDPA_BWD : CASE_SDPA_FWD;
        c->B = B; c->H = H; c->L = L; c->S = S; c->D = D; c->causal = causal;
    }
}

/* Table order: the ceiling's sizes, the Q-Former (BLIP-2: hidden 768, 12 heads, FFN 3072, vision
 * width 1408, 32 queries, 257 image tokens, batch 8) linear layers with M = batch * tokens, then
 * attention: Q-Former cross attention, mid-size self attention, long self attention. */
static void make_cases(int with_sdpa) {
    static const int sizes[] = {1024, 2048, 4096};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "gemm ceiling %dx%dx%d", sizes[i], sizes[i], sizes[i]);
        add_gemm(CASE_CEILING, name, sizes[i], sizes[i], sizes[i]);
    }
    add_gemm(CASE_GEMM, "linear q/k/v/out 256x768 . 768x768^T", 256, 768, 768);
    add_gemm(CASE_GEMM, "linear cross k/v 2056x1408 . 768x1408^T", 2056, 768, 1408);
    add_gemm(CASE_GEMM, "linear ffn up 256x768 . 3072x768^T", 256, 3072, 768);
    add_gemm(CASE_GEMM, "linear ffn down 256x3072 . 768x3072^T", 256, 768, 3072);
    if (!with_sdpa) return;
    add_sdpa_pair(8, 12, 32, 257, 64, 0);
    add_sdpa_pair(8, 12, 512, 512, 64, 0);
    add_sdpa_pair(8, 12, 512, 512, 64, 1);
    add_sdpa_pair(1, 16, 2048, 2048, 128, 0);
    add_sdpa_pair(1, 16, 2048, 2048, 128, 1);
}

static const bench_case *find_case(const char *name) {
    for (int i = 0; i < n_cases; i++)
        if (!strcmp(cases[i].name, name)) return &cases[i];
    return NULL;
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

/* Times one GEMM case and reports it; returns the median seconds, or -1 on failure. */
static double bench_gemm(const bench_case *bc) {
    int M = bc->M, N = bc->N, K = bc->K;
    gemm_ctx g = {M, N, K, alloc_random((size_t)M * K, 1), alloc_random((size_t)N * K, 2),
                  malloc((size_t)M * N * sizeof(float))};
    double sec = -1, flop = 2.0 * M * N * K;
    if (!g.a || !g.w || !g.c) report_error(bc->name, "out of memory");
    else {
        sec = time_median(run_gemm, &g);
        if (!all_finite(g.c, (size_t)M * N)) { report_error(bc->name, "non-finite output"); sec = -1; }
        else report(bc->name, sec, flop);
    }
    free(g.a); free(g.w); free(g.c);
    return sec;
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

/* Times the forward or the backward of one shape and reports it; returns the median seconds, or
 * -1. The backward is given the out and lse of one untimed forward on the same inputs, as
 * training does. */
static double bench_sdpa(const bench_case *bc) {
    int64_t B = bc->B, H = bc->H, L = bc->L, S = bc->S, D = bc->D;
    int bwd = bc->kind == CASE_SDPA_BWD;
    sdpa_ctx s;
    memset(&s, 0, sizeof s);
    s.p = qf_sdpa_defaults(B, H, H, L, S, D);
    s.p.is_causal = bc->causal;
    double sec = -1;
    if (qf_sdpa_check(&s.p) != QF_OK) { /* shapes are validated before any buffer is touched */
        report_error(bc->name, qf_last_error());
        return -1;
    }
    size_t nq = (size_t)(B * H * L * D), nk = (size_t)(B * H * S * D);
    s.q = alloc_random(nq, 11); s.k = alloc_random(nk, 12); s.v = alloc_random(nk, 13);
    s.dout = alloc_random(nq, 14);
    s.out = malloc(nq * sizeof(float)); s.lse = malloc((size_t)(B * H * L) * sizeof(float));
    s.dq = malloc(nq * sizeof(float)); s.dk = malloc(nk * sizeof(float)); s.dv = malloc(nk * sizeof(float));
    if (!s.q || !s.k || !s.v || !s.dout || !s.out || !s.lse || !s.dq || !s.dk || !s.dv) {
        report_error(bc->name, "out of memory");
        goto done;
    }
    /* Pairs of (query, key) the kernel computes: all, or the lower triangle when causal. */
    double pairs = bc->causal && L == S ? (double)L * (double)(L + 1) / 2.0 : (double)L * (double)S;
    double fwd_flop = 4.0 * (double)(B * H) * pairs * (double)D;
    if (bwd) {
        if (run_fwd(&s) != 0) { report_error(bc->name, qf_last_error()); goto done; }
        sec = time_median(run_bwd, &s);
        if (sec < 0) report_error(bc->name, qf_last_error());
        else if (!all_finite(s.dq, nq) || !all_finite(s.dk, nk) || !all_finite(s.dv, nk)) {
            report_error(bc->name, "non-finite gradient");
            sec = -1;
        } else report(bc->name, sec, 2.5 * fwd_flop);
    } else {
        sec = time_median(run_fwd, &s);
        if (sec < 0) report_error(bc->name, qf_last_error());
        else if (!all_finite(s.out, nq)) { report_error(bc->name, "non-finite output"); sec = -1; }
        else report(bc->name, sec, fwd_flop);
    }
done:
    free(s.q); free(s.k); free(s.v); free(s.dout); free(s.out); free(s.lse);
    free(s.dq); free(s.dk); free(s.dv);
    return sec;
}
#endif

/* Runs one case; returns its median seconds, or -1 when it failed (already reported). */
static double run_case(const bench_case *bc) {
#ifndef QF_BENCH_GEMM_ONLY
    if (bc->kind == CASE_SDPA_FWD || bc->kind == CASE_SDPA_BWD) return bench_sdpa(bc);
#endif
    return bench_gemm(bc);
}

/* The whole table in one pass. The ceiling is the best sgemm rate of its sizes; 4096^3 is
 * skipped where 2048^3 already takes over 150 ms (a slow BLAS: it would only cost time). */
static void run_all(int do_gemm, int do_sdpa) {
    int best_n = 0;
    double t_2048 = -1;
    for (int i = 0; i < n_cases; i++) {
        const bench_case *bc = &cases[i];
        if (bc->kind != CASE_CEILING) continue;
        if (bc->M == 4096 && t_2048 > 0.150) continue;
        double sec = run_case(bc);
        if (sec <= 0) continue;
        if (bc->M == 2048) t_2048 = sec;
        double gf = 2.0 * bc->M * bc->N * bc->K / sec * 1e-9;
        if (gf > ceiling_gflops) { ceiling_gflops = gf; best_n = bc->M; }
    }
    if (!table_mode) printf("M\tceiling_gflops\t%.1f\nM\tceiling_shape\t%d^3\n", ceiling_gflops, best_n);
    else printf("# GEMM ceiling: %.1f GFLOP/s (sgemm %d^3)\n", ceiling_gflops, best_n);
    const char *full_name = NULL;
    double t_full = -1;
    for (int i = 0; i < n_cases; i++) {
        const bench_case *bc = &cases[i];
        if (bc->kind == CASE_CEILING) continue;
        if (bc->kind == CASE_GEMM ? !do_gemm : !do_sdpa) continue;
        double sec = run_case(bc);
        if (bc->kind != CASE_SDPA_FWD || bc->L != bc->S) continue;
        if (!bc->causal) { full_name = bc->name; t_full = sec; continue; }
        /* a causal forward follows the unmasked forward of its shape: their time ratio */
        if (full_name && t_full > 0 && sec > 0) {
            const char *shape = strrchr(bc->name, ' ') + 1;
            if (table_mode) printf("# causal/unmasked time %s: %.2f\n", shape, sec / t_full);
            else printf("M\tcausal_ratio %s\t%.3f\n", shape, sec / t_full);
            fflush(stdout);
        }
    }
}

/* --serve: one case per request line, until "quit" or end of input. */
static void serve(void) {
    char line[256];
    printf("D\t\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (!strcmp(line, "quit")) break;
        if (!strcmp(line, "list")) {
            for (int i = 0; i < n_cases; i++) printf("C\t%s\n", cases[i].name);
        } else if (line[0]) {
            const bench_case *bc = find_case(line);
            if (bc) run_case(bc);
            else report_error(line, "no such case (send 'list' for the names)");
        }
        printf("D\t%s\n", line);
        fflush(stdout);
    }
}

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
    fprintf(stderr, "usage: bench_attention [--threads N] [--quick | --scale F] [--min-reps N] [--only sdpa|gemm]\n"
                    "                       [--table | --serve] | --blas-info\n"
                    "  times qfuse SDPA forward/backward and Q-Former GEMMs; see bench/README.md\n");
}

int main(int argc, char **argv) {
    int threads = 0, do_sdpa = 1, do_gemm = 1, serve_mode = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
            if (threads < 1) { fprintf(stderr, "bench_attention: --threads %s: expected a count >= 1\n", argv[i]); return 2; }
        } else if (!strcmp(argv[i], "--quick")) quick_factor = 0.2;
        else if (!strcmp(argv[i], "--scale") && i + 1 < argc) {
            quick_factor = atof(argv[++i]);
            if (!(quick_factor > 0 && quick_factor <= 10)) {
                fprintf(stderr, "bench_attention: --scale %s: expected a factor in (0, 10]\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--min-reps") && i + 1 < argc) {
            min_reps = atoi(argv[++i]);
            if (min_reps < 1 || min_reps > 25) {
                fprintf(stderr, "bench_attention: --min-reps %s: expected 1 to 25\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--table")) table_mode = 1;
        else if (!strcmp(argv[i], "--serve")) serve_mode = 1;
        else if (!strcmp(argv[i], "--blas-info")) { puts(blas_name()); return 0; }
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            i++;
            do_sdpa = !strcmp(argv[i], "sdpa");
            do_gemm = !strcmp(argv[i], "gemm");
            if (!do_sdpa && !do_gemm) { usage(); return 2; }
        } else { usage(); return 2; }
    }
    if (serve_mode && table_mode) { usage(); return 2; }
    if (!threads) {
        const char *env = getenv("QFUSE_THREADS");
        threads = env && *env ? atoi(env) : 0;
    }
#ifdef QF_BENCH_GEMM_ONLY
    do_sdpa = 0;
    if (threads < 1) threads = 1;
    if (openblas_set_num_threads) openblas_set_num_threads(threads);
    if (bli_thread_set_num_threads) bli_thread_set_num_threads(threads);
    make_cases(0);
#else
    if (threads >= 1 && qf_set_num_threads(threads) != QF_OK) {
        fprintf(stderr, "bench_attention: %s\n", qf_last_error());
        return 2;
    }
    threads = qf_get_num_threads(); /* also hands the count to the BLAS */
    make_cases(1);
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
    if (serve_mode) serve();
    else run_all(do_gemm, do_sdpa);
    return failures ? 1 : 0;
}
