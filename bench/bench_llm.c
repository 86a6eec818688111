/* bench_llm.c - decoder LLM speed per weight format (f32, bf16, int8, q4) in one run, same threads:
 * prefill and decode tokens/s, weight bytes, peak RSS, and decode's fraction of the memory-
 * bandwidth bound, with the bandwidth measured in the same run. A benchmark, not a test: it checks
 * only that every call succeeds (bench/README.md has the recorded tables).
 *
 *   bench_llm FOLDER [--threads N] [--formats f32,bf16,int8,q4] [--prompt 128] [--prompt8 16]
 *                    [--steps 16] [--reps 1] [--bw-mib 1024] [--kernels]
 *
 * Per format (the model is loaded with qf_llm_load_ex, timed, freed before the next format):
 *   prefill     B=1, a `prompt`-token prompt through one qf_llm_decode call (logits of the last
 *               position only), after a 16-token warm-up; best of `reps`; tokens/s = prompt / s.
 *   decode B=1  after that prompt, one warm-up step, then `steps` greedy steps (argmax, embed,
 *               qf_llm_decode with T = 1); tokens/s = steps / s.
 *   decode B=8  a fresh cache of 8 rows, an untimed `prompt8`-token prompt per row (a short one:
 *               decode time hardly depends on it), one warm-up step, then `steps` steps; tokens/s
 *               = 8 * steps / s.
 *   weights MB  qf_llm_weight_bytes (linear layers as stored, scales included; the float32
 *               embedding table is not counted unless it is also an untied lm_head).
 *   read/tok    bytes a decode step must stream: every linear's weight as stored, lm_head
 *               included even when it is the (tied) float32 embedding table.
 *   peak RSS    VmHWM, reset (/proc/self/clear_refs "5") before the format's load: load,
 *               quantization and both caches included. '*' marks a kernel that refused the reset
 *               (then it is the process's peak so far).
 *   bw frac     (read/tok / bandwidth) / measured seconds per decode step: 1.0 = the step ran as
 *               fast as streaming its weights once. Bandwidth: the best of 5 multi-threaded
 *               sequential reads (64-bit adds of AVX-512 loads, AVX2 without it) of a `bw-mib` buffer (>> last-level cache),
 *               same threads, measured first.
 *   mm_B1/B8    (bench_llm only) the time of one pass over every linear layer's matmul alone
 *               (qf_qweight_matmul(_multi) / qf_linear_forward on zeros, N = 1 / 8 rows, grouped
 *               as the decoder groups them, best of 3) over the measured step: the share of a
 *               decode step spent in matmuls.
 * --kernels adds a table of qf_qweight_matmul alone (GB/s of weights at N = 1 and 8) on a
 * [4864, 896] weight (Qwen2-0.5B's up_proj) and a [151936, 896] one (its lm_head).
 * Token ids are a fixed pseudo-random sequence (no tokenizer needed). */
#include "qfuse.h"
#include "models/llm_internal.h"
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "bench_llm: %s: %s\n", what, qf_last_error());
    exit(1);
}

/* ---- memory bandwidth ---------------------------------------------------------------------- */

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 12)));
    }
    uint64_t t[4], s = 0;
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    for (int k = 0; k < 4; k++) s += t[k];
    for (; i < n; i++) s += p[i];
    return s;
}

__attribute__((target("avx512f"))) static uint64_t sum_avx512(const uint64_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
    }
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
    for (; i < n; i++) s += p[i];
    return s;
}

/* Best-of-5 read bandwidth in bytes/s; each thread reads (and first touched) its own slice. */
static double measure_bandwidth(size_t bytes, int threads) {
    size_t n = bytes / 8 / 64 * 64;
    uint64_t *buf = aligned_alloc(64, n * 8);
    if (!buf) {
        fprintf(stderr, "bench_llm: cannot allocate the %zu-byte bandwidth buffer\n", n * 8);
        exit(1);
    }
    double best = 1e30;
    uint64_t total = 0;
    const int wide = __builtin_cpu_supports("avx512f");
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t lo = n / 64 * (size_t)t / (size_t)nt * 64, hi = n / 64 * (size_t)(t + 1) / (size_t)nt * 64;
        for (size_t i = lo; i < hi; i++) buf[i] = i;
    }
    for (int rep = 0; rep < 5; rep++) {
        uint64_t s = 0;
        double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : s)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t lo = n / 64 * (size_t)t / (size_t)nt * 64, hi = n / 64 * (size_t)(t + 1) / (size_t)nt * 64;
            s += wide ? sum_avx512(buf + lo, hi - lo) : sum_avx2(buf + lo, hi - lo);
        }
        double dt = now_s() - t0;
        if (dt < best) best = dt;
        total += s;
    }
    if (total == 42) puts(""); /* keep the sums alive */
    free(buf);
    return (double)(n * 8) / best;
}

/* ---- peak RSS ------------------------------------------------------------------------------ */

static int reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return 0;
    int ok = fputs("5", f) >= 0;
    ok = (fclose(f) == 0) && ok;
    return ok;
}

static double status_mib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    double v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':') {
            v = strtod(line + kl + 1, NULL) / 1024.0; /* kB */
            break;
        }
    fclose(f);
    return v;
}

/* ---- the model ------------------------------------------------------------------------------- */

static size_t linear_read_bytes(const llm_linear *L) {
    if (L->q) return qf_qweight_bytes(L->q);
    return L->w ? (size_t)L->in * (size_t)L->out * sizeof(float) : 0;
}

static size_t read_bytes_per_token(const qf_llm *m) {
    size_t n = 0;
    for (int i = 0; i < m->n_linears; i++) n += linear_read_bytes(m->linears[i]);
    return n;
}

static int32_t argmax(const float *v, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return (int32_t)best;
}

static uint64_t lcg = 0x9E3779B97F4A7C15ull;
static int32_t next_id(int64_t vocab) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (int32_t)((lcg >> 33) % (uint64_t)vocab);
}

typedef struct {
    double prefill_tps, dec1_tps, dec8_tps, weights_mb, read_mb, rss_mb, frac1, frac8, mm1, mm8;
    int rss_exact;
} row_result;

typedef struct {
    const char *folder;
    int threads, prompt, prompt8, steps, reps;
} bench_opts;

/* `steps` greedy steps on every row of c after a warm-up step; returns seconds for the steps. */
static double decode_steps(qf_llm *m, qf_llm_cache *c, int64_t B, int steps, float *logits, float *emb,
                           int32_t *ids, int64_t V, int64_t E) {
    double t0 = 0;
    for (int s = 0; s <= steps; s++) {
        if (s == 1) t0 = now_s();
        for (int64_t b = 0; b < B; b++) ids[b] = argmax(logits + b * V, V);
        if (qf_llm_embed(m, ids, B, 1, emb) != QF_OK) die("embed");
        if (qf_llm_decode(m, c, emb, 1, NULL, logits, 1) != QF_OK) die("decode step");
    }
    (void)E;
    return now_s() - t0;
}

/* One linear group's matmuls as qf_llm_decode runs them: quantized q/k/v share one
 * qf_qweight_matmul_multi call at decoding sizes (gate/up: qf_qweight_matmul_glu, silu*up
 * included), everything else one call per linear. */
static void replay_group(const llm_linear *const *Ls, int n, float *y, const float *x, int64_t N, int64_t maxd) {
    const qf_qweight *qs[4];
    const float *bs[4];
    float *ys[4];
    int k = 0, fuse = N < 16;
    for (int i = 0; i < n; i++) {
        if (!Ls[i]->q && !Ls[i]->w) continue; /* absent (OPT has no gate) */
        fuse &= Ls[i]->q != NULL;
        qs[k] = Ls[i]->q;
        bs[k] = Ls[i]->bias;
        ys[k] = y + k * N * maxd;
        k++;
    }
    if (fuse && k > 0) {
        if (qf_qweight_matmul_multi(k, ys, x, qs, bs, N) != QF_OK) die("replay");
        return;
    }
    for (int i = 0; i < n; i++) {
        const llm_linear *L = Ls[i];
        if (!L->q && !L->w) continue;
        qf_status st = L->q ? qf_qweight_matmul(y, x, L->q, L->bias, N)
                            : qf_linear_forward(y, x, L->w, L->bias, N, L->in, L->out);
        if (st != QF_OK) die("replay");
    }
}

/* Seconds of one pass over every linear layer's matmul alone (x zero, N rows, layer order: the
 * weights stream as in a decode step, grouped as qf_llm_decode groups them), best of 3: the
 * matmul part of a step. */
static double matmul_replay(const qf_llm *m, int64_t N) {
    int64_t maxd = 0;
    for (int i = 0; i < m->n_linears; i++) {
        const llm_linear *L = m->linears[i];
        if (L->in > maxd) maxd = L->in;
        if (L->out > maxd) maxd = L->out;
    }
    float *x = calloc((size_t)(N * maxd), sizeof *x), *y = malloc((size_t)(3 * N * maxd) * sizeof *y);
    if (!x || !y) {
        fprintf(stderr, "bench_llm: out of memory (replay)\n");
        exit(1);
    }
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        for (int64_t l = 0; l < m->cfg.num_hidden_layers; l++) {
            const llm_layer *L = &m->layers[l];
            const llm_linear *qkv[3] = {&L->q, &L->k, &L->v}, *o[1] = {&L->o}, *gu[2] = {&L->gate, &L->up},
                             *down[1] = {&L->down};
            replay_group(qkv, 3, y, x, N, maxd);
            replay_group(o, 1, y, x, N, maxd);
            if (L->gate.q && L->up.q && L->gate.out == L->up.out) { /* as qf_llm_decode (no adapter) */
                if (qf_qweight_matmul_glu(y, y + N * maxd, x, L->gate.q, L->up.q, L->gate.bias, L->up.bias, N) != QF_OK)
                    die("replay");
            } else {
                replay_group(gu, 2, y, x, N, maxd);
            }
            replay_group(down, 1, y, x, N, maxd);
        }
        const llm_linear *head[1] = {&m->lm_head};
        replay_group(head, 1, y, x, N, maxd);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    free(x);
    free(y);
    return best;
}

static row_result bench_format(const bench_opts *o, int format, double bw) {
    row_result r = {0};
    r.rss_exact = reset_peak_rss();
    qf_llm_options opt = {format, 0};
    qf_llm *m;
    if (qf_llm_load_ex(o->folder, &opt, &m) != QF_OK) die("load");
    qf_llm_config cf;
    qf_llm_get_config(m, &cf);
    const int64_t V = cf.vocab_size, E = cf.word_embed_proj_dim > 0 ? cf.word_embed_proj_dim : cf.hidden_size;
    const int64_t P = o->prompt, P8 = o->prompt8, S = o->steps, Pmax = P > 8 * P8 ? P : 8 * P8;
    int32_t *ids = malloc((size_t)Pmax * sizeof *ids);
    float *emb = malloc((size_t)Pmax * (size_t)E * sizeof *emb), *logits = malloc((size_t)8 * (size_t)V * sizeof *logits);
    if (!ids || !emb || !logits) {
        fprintf(stderr, "bench_llm: out of memory\n");
        exit(1);
    }
    r.weights_mb = (double)qf_llm_weight_bytes(m) / 1048576.0;
    const double read_bytes = (double)read_bytes_per_token(m);
    r.read_mb = read_bytes / 1048576.0;

    /* B = 1: warm-up, prefill (best of reps), decode */
    qf_llm_cache *c1;
    if (qf_llm_cache_new(m, 1, P + S + 1 > 16 ? P + S + 1 : 17, &c1) != QF_OK) die("cache B=1");
    lcg = 0x9E3779B97F4A7C15ull;
    for (int64_t t = 0; t < P; t++) ids[t] = next_id(V);
    if (qf_llm_embed(m, ids, 1, P, emb) != QF_OK) die("embed prompt");
    if (qf_llm_decode(m, c1, emb, P < 16 ? P : 16, NULL, logits, 1) != QF_OK) die("warm-up");
    double best = 1e30;
    for (int rep = 0; rep < o->reps; rep++) {
        qf_llm_cache_reset(c1);
        double t0 = now_s();
        if (qf_llm_decode(m, c1, emb, P, NULL, logits, 1) != QF_OK) die("prefill");
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    r.prefill_tps = (double)P / best;
    double dt1 = decode_steps(m, c1, 1, (int)S, logits, emb, ids, V, E);
    r.dec1_tps = (double)S / dt1;
    r.frac1 = (read_bytes / bw) / (dt1 / (double)S);
    r.mm1 = matmul_replay(m, 1) / (dt1 / (double)S);
    qf_llm_cache_free(c1);

    /* B = 8 */
    qf_llm_cache *c8;
    if (qf_llm_cache_new(m, 8, P8 + S + 1, &c8) != QF_OK) die("cache B=8");
    for (int64_t t = 0; t < 8 * P8; t++) ids[t] = next_id(V);
    if (qf_llm_embed(m, ids, 8, P8, emb) != QF_OK) die("embed prompt B=8");
    if (qf_llm_decode(m, c8, emb, P8, NULL, logits, 1) != QF_OK) die("prefill B=8");
    double dt8 = decode_steps(m, c8, 8, (int)S, logits, emb, ids, V, E);
    r.dec8_tps = 8.0 * (double)S / dt8;
    r.frac8 = (read_bytes / bw) / (dt8 / (double)S);
    r.mm8 = matmul_replay(m, 8) / (dt8 / (double)S);
    qf_llm_cache_free(c8);

    r.rss_mb = status_mib("VmHWM");
    qf_llm_free(m);
    free(ids);
    free(emb);
    free(logits);
    return r;
}

/* ---- qf_qweight_matmul alone ------------------------------------------------------------------ */

static void bench_kernels(int threads) {
    static const int64_t shapes[2][2] = {{4864, 896}, {151936, 896}};
    static const char *fmts[] = {"f32", "bf16", "int8", "q4"};
    printf("\n# qf_qweight_matmul alone (f32: qf_linear_forward), GB/s of weight bytes read, %d threads\n", threads);
    printf("%-8s %-16s %10s %10s %10s\n", "weights", "W [out,in]", "MB", "N=1 GB/s", "N=8 GB/s");
    for (int s = 0; s < 2; s++) {
        const int64_t out = shapes[s][0], in = shapes[s][1];
        float *w = malloc((size_t)(out * in) * sizeof *w), *x = malloc((size_t)(8 * in) * sizeof *x),
              *y = malloc((size_t)(8 * out) * sizeof *y);
        if (!w || !x || !y) {
            fprintf(stderr, "bench_llm: out of memory (kernels)\n");
            exit(1);
        }
        for (int64_t i = 0; i < out * in; i++) w[i] = (float)((int64_t)(next_id(2001)) - 1000) * 1e-3f;
        for (int64_t i = 0; i < 8 * in; i++) x[i] = (float)((int64_t)(next_id(2001)) - 1000) * 1e-3f;
        for (int f = 0; f < 4; f++) {
            qf_qweight *q = NULL;
            if (f && qf_qweight_quantize(f, 0, w, out, in, "bench", &q) != QF_OK) die("quantize");
            double bytes = f ? (double)qf_qweight_bytes(q) : (double)(out * in) * 4.0, gbs[2];
            for (int k = 0; k < 2; k++) {
                const int64_t N = k ? 8 : 1;
                double bestk = 1e30;
                for (int rep = 0; rep < 7; rep++) {
                    double t0 = now_s();
                    qf_status st = f ? qf_qweight_matmul(y, x, q, NULL, N) : qf_linear_forward(y, x, w, NULL, N, in, out);
                    if (st != QF_OK) die("matmul");
                    double dt = now_s() - t0;
                    if (rep && dt < bestk) bestk = dt;
                }
                gbs[k] = bytes / bestk / 1e9;
            }
            char shape[32];
            snprintf(shape, sizeof shape, "[%lld,%lld]", (long long)out, (long long)in);
            printf("%-8s %-16s %10.1f %10.1f %10.1f\n", fmts[f], shape, bytes / 1048576.0, gbs[0], gbs[1]);
            qf_qweight_free(q);
        }
        free(w);
        free(x);
        free(y);
    }
}

/* ---- main ----------------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr, "usage: bench_llm FOLDER [--threads N] [--formats f32,bf16,int8,q4] [--prompt 128] "
                    "[--prompt8 16] [--steps 16] [--reps 1] [--bw-mib 1024] [--kernels]\n");
    exit(2);
}

int main(int argc, char **argv) {
    bench_opts o = {NULL, 0, 128, 16, 16, 1};
    const char *formats = "f32,bf16,int8,q4";
    int bw_mib = 1024, kernels = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--kernels")) kernels = 1;
        else if (a[0] == '-' && a[1] == '-' && !v) usage();
        else if (!strcmp(a, "--threads")) o.threads = atoi(argv[++i]);
        else if (!strcmp(a, "--formats")) formats = argv[++i];
        else if (!strcmp(a, "--prompt")) o.prompt = atoi(argv[++i]);
        else if (!strcmp(a, "--prompt8")) o.prompt8 = atoi(argv[++i]);
        else if (!strcmp(a, "--steps")) o.steps = atoi(argv[++i]);
        else if (!strcmp(a, "--reps")) o.reps = atoi(argv[++i]);
        else if (!strcmp(a, "--bw-mib")) bw_mib = atoi(argv[++i]);
        else if (a[0] == '-') usage();
        else o.folder = a;
    }
    if (!o.folder || o.prompt < 1 || o.prompt8 < 1 || o.steps < 1 || o.reps < 1 || bw_mib < 1) usage();
    if (o.threads > 0 && qf_set_num_threads(o.threads) != QF_OK) die("threads");
    const int threads = o.threads > 0 ? o.threads : omp_get_max_threads();

    double bw = measure_bandwidth((size_t)bw_mib << 20, threads);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", o.folder);
    qf_config *cfg;
    if (qf_config_load(path, &cfg) != QF_OK) die("config");
    const char *mt = "?";
    int64_t nl = 0, hs = 0, is = 0, nh = 0, nkv = 0, vs = 0;
    int tie = 0;
    qf_config_string(cfg, "model_type", &mt);
    qf_config_int_or(cfg, "num_hidden_layers", 0, &nl);
    qf_config_int_or(cfg, "hidden_size", 0, &hs);
    qf_config_int_or(cfg, "intermediate_size", 0, &is);
    qf_config_int_or(cfg, "num_attention_heads", 0, &nh);
    qf_config_int_or(cfg, "num_key_value_heads", nh, &nkv);
    qf_config_int_or(cfg, "vocab_size", 0, &vs);
    if (qf_config_has(cfg, "tie_word_embeddings")) qf_config_bool(cfg, "tie_word_embeddings", &tie);
    printf("# qfuse bench_llm %s: %s, %lld layers, hidden %lld, intermediate %lld, heads %lld/%lld, vocab %lld%s\n",
           o.folder, mt, (long long)nl, (long long)hs, (long long)is, (long long)nh, (long long)nkv, (long long)vs,
           tie ? ", tied embeddings" : "");
    qf_config_free(cfg);
    printf("# %d threads, isa %s; memory read bandwidth %.1f GB/s (%d MiB buffer, best of 5)\n", threads,
           qf_isa_name(qf_get_isa()), bw / 1e9, bw_mib);
    printf("# prefill: B=1, %d-token prompt (best of %d); decode: %d greedy steps after it (B=1) / after a "
           "%d-token prompt per row (B=8)\n", o.prompt, o.reps, o.steps, o.prompt8);
    printf("%-6s %-7s %7s %12s %12s %12s %10s %10s %10s %9s %9s %7s %7s\n", "impl", "weights", "threads", "prefill_t/s",
           "dec_B1_t/s", "dec_B8_t/s", "weights_MB", "read/tok_MB", "peakRSS_MB", "bw_B1", "bw_B8", "mm_B1", "mm_B8");
    fflush(stdout);
    char list[256];
    snprintf(list, sizeof list, "%s", formats);
    for (char *save = NULL, *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        int fmt = !strcmp(f, "f32") ? QF_WEIGHTS_F32 : !strcmp(f, "bf16") ? QF_WEIGHTS_BF16
                : !strcmp(f, "int8") ? QF_WEIGHTS_INT8 : !strcmp(f, "q4") ? QF_WEIGHTS_Q4 : -1;
        if (fmt < 0) {
            fprintf(stderr, "bench_llm: unknown format %s (f32, bf16, int8, q4)\n", f);
            return 2;
        }
        row_result r = bench_format(&o, fmt, bw);
        printf("%-6s %-7s %7d %12.1f %12.2f %12.2f %10.1f %10.1f %9.0f%s %9.2f %9.2f %7.2f %7.2f\n", "qfuse", f,
               threads, r.prefill_tps, r.dec1_tps, r.dec8_tps, r.weights_mb, r.read_mb, r.rss_mb,
               r.rss_exact ? " " : "*", r.frac1, r.frac8, r.mm1, r.mm8);
        fflush(stdout);
    }
    if (kernels) bench_kernels(threads);
    return 0;
}
