/* bench_qformer.c - times whole fusion models in qfuse against a PyTorch peer on the same machine,
 * same threads, same checkpoint: the BLIP-2 Q-Former (forward at batch 1 and 8, forward+backward
 * at batch 8) and the AffectGPT pre-fusion (forward at batch 1 and 32). A benchmark, not a test:
 * it checks only that each call succeeds and gives finite numbers.
 *
 *   bench_qformer [--threads N] [--quick] [--rounds R] [--model DIR] [--prefusion-model DIR]
 *                 [--no-peer] [--python PY] [--peer bench/qformer_peer.py] [--keep] [--only SUBSTR]
 *                 [--profile]     (then qfuse's time per op kind of each Q-Former case)
 *   bench_qformer [--threads N] --gemm-shapes     (few-rows products: qfuse's kernel vs the BLAS)
 *
 * Checkpoints: unless --model / --prefusion-model name folders, random-weight ones are written to a
 * temporary folder (config.json + model.safetensors through qf_st_write; removed at exit unless
 * --keep): the BLIP-2 Q-Former (12 layers, hidden 768, 12 heads, FFN 3072, cross-attention every
 * 2nd layer, encoder width 1408; 32 queries read 257 image tokens) and the AffectGPT pre-fusion
 * (audio and face 1024 -> 1024, 16 queries, 2 layers 768/12/3072 with cross-attention in both,
 * 4096 out; 8 audio + 32 face frames).
 * Peer: bench/qformer_peer.py --serve (transformers' Blip2QFormerModel.from_pretrained on the same
 * folder when transformers imports, else a PyTorch reimplementation, labelled so), started once and
 * kept running. Each round measures the sgemm ceiling, then times every case on both sides, qfuse
 * first in even rounds and the peer first in odd ones, so a slow spell of a shared machine lands on
 * both sides of a ratio. Timing rule per case and side: warm-up until 0.2 s (at least one run), then
 * 3..25 runs of about 1.5 s in all (--quick: a fifth), median.
 * Table: medians over rounds of the per-round medians; speedup = median over rounds of
 * (peer ms / qfuse ms) of the same round; % ceil = qfuse GFLOP/s / the best sgemm rate of the run.
 * FLOPs: every GEMM (2*M*N*K: projections, FFN, modality and output projections) plus attention
 * (4*B*heads*L*S*D: Q K^T and P V; softmax not counted). Backward counts 2x the forward GEMMs and
 * 2.5x the forward attention (bench/README.md's SDPA convention), so fwd+bwd = 3x GEMM + 3.5x attn. */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <qfuse.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ops/gemm_small.h" /* internal (src/): --gemm-shapes times the kernel itself */

extern char *openblas_get_config(void) __attribute__((weak));
extern char *openblas_get_corename(void) __attribute__((weak));
/* qfuse's internal op profile (src/models/qformer_internal.h), for --profile */
extern void qf_qformer_profile_enable(int on) __attribute__((weak));
extern int qf_qformer_profile_read(double *seconds, const char **names, int cap) __attribute__((weak));

static double quick_factor = 1.0;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    if (n <= 0) return -1;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

typedef int (*bench_fn)(void *ctx);

/* Median seconds of fn's timed runs (bench_attention's rule), or -1 if a run failed. */
static double time_median(bench_fn fn, void *ctx) {
    double t0 = now_s(), first = 0;
    int warm = 0;
    do {
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
    return median(t, reps);
}

/* ---- random checkpoints ------------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float uniform(void) { /* xorshift64*, [-1, 1) */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (float)((double)((rng_state * 2685821657736338717ull) >> 11) / 4503599627370496.0 - 1.0);
}

static float *random_floats(size_t n, float scale) {
    float *x = malloc(n * sizeof *x + 1);
    if (x)
        for (size_t i = 0; i < n; i++) x[i] = scale * uniform();
    return x;
}

enum { MAX_TENSORS = 512 };
typedef struct {
    qf_tensor_ref t[MAX_TENSORS];
    char *names[MAX_TENSORS];
    int n;
} tensor_list;

/* Adds a tensor of uniform values with std `std` (LayerNorm weights: 1 + small noise). */
static int add_tensor(tensor_list *l, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2, float std,
                      float offset) {
    if (l->n >= MAX_TENSORS) return -1;
    int64_t shape[3] = {d0, d1, d2};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    float *x = random_floats(n, std * 1.7320508f);
    char *nm = strdup(name);
    if (!x || !nm) { free(x); free(nm); return -1; }
    for (size_t i = 0; i < n && offset != 0; i++) x[i] += offset;
    qf_tensor_ref *t = &l->t[l->n];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = QF_F32;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->data = x;
    l->names[l->n++] = nm;
    return 0;
}

static void free_tensors(tensor_list *l) {
    for (int i = 0; i < l->n; i++) { free(l->names[i]); free((void *)l->t[i].data); }
    l->n = 0;
}

typedef struct { int64_t layers, hidden, heads, inter, freq, enc; } qf_shape;

/* The tensors of a Q-Former under transformers' names (Blip2QFormerModel, no text branch). */
static int add_qformer(tensor_list *l, const char *pre, qf_shape s) {
    char nm[256];
    int rc = 0;
#define T1(fmt, n, std, off) (snprintf(nm, sizeof nm, fmt, pre), rc |= add_tensor(l, nm, 1, n, 0, 0, std, off))
    T1("%slayernorm.weight", s.hidden, 0.05f, 1.0f);
    T1("%slayernorm.bias", s.hidden, 0.01f, 0.0f);
#undef T1
    for (int64_t i = 0; i < s.layers; i++) {
        const char *blocks[2] = {"attention", "crossattention"};
        for (int b = 0; b < (i % s.freq == 0 ? 2 : 1); b++) {
            int64_t kin = b ? s.enc : s.hidden;
            const char *w[3] = {"query", "key", "value"};
            for (int j = 0; j < 3; j++) {
                snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.attention.%s.weight", pre, (long long)i, blocks[b], w[j]);
                rc |= add_tensor(l, nm, 2, s.hidden, j ? kin : s.hidden, 0, 0.02f, 0);
                snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.attention.%s.bias", pre, (long long)i, blocks[b], w[j]);
                rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.01f, 0);
            }
            snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.output.dense.weight", pre, (long long)i, blocks[b]);
            rc |= add_tensor(l, nm, 2, s.hidden, s.hidden, 0, 0.02f, 0);
            snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.output.dense.bias", pre, (long long)i, blocks[b]);
            rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.01f, 0);
            snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.output.LayerNorm.weight", pre, (long long)i, blocks[b]);
            rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.05f, 1.0f);
            snprintf(nm, sizeof nm, "%sencoder.layer.%lld.%s.output.LayerNorm.bias", pre, (long long)i, blocks[b]);
            rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.01f, 0);
        }
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.intermediate_query.dense.weight", pre, (long long)i);
        rc |= add_tensor(l, nm, 2, s.inter, s.hidden, 0, 0.02f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.intermediate_query.dense.bias", pre, (long long)i);
        rc |= add_tensor(l, nm, 1, s.inter, 0, 0, 0.01f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.output_query.dense.weight", pre, (long long)i);
        rc |= add_tensor(l, nm, 2, s.hidden, s.inter, 0, 0.02f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.output_query.dense.bias", pre, (long long)i);
        rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.01f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.output_query.LayerNorm.weight", pre, (long long)i);
        rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.05f, 1.0f);
        snprintf(nm, sizeof nm, "%sencoder.layer.%lld.output_query.LayerNorm.bias", pre, (long long)i);
        rc |= add_tensor(l, nm, 1, s.hidden, 0, 0, 0.01f, 0);
    }
    return rc;
}

static void fprint_qformer_config(FILE *f, qf_shape s, const char *indent) {
    fprintf(f, "%s\"model_type\": \"blip_2_qformer\", \"architectures\": [\"Blip2QFormerModel\"],\n"
               "%s\"num_hidden_layers\": %lld, \"hidden_size\": %lld, \"num_attention_heads\": %lld,\n"
               "%s\"intermediate_size\": %lld, \"cross_attention_frequency\": %lld, \"encoder_hidden_size\": %lld,\n"
               "%s\"hidden_act\": \"gelu\", \"layer_norm_eps\": 1e-12, \"hidden_dropout_prob\": 0.0,\n"
               "%s\"attention_probs_dropout_prob\": 0.0, \"max_position_embeddings\": 512, \"vocab_size\": 30522,\n"
               "%s\"pad_token_id\": 0, \"use_qformer_text_input\": false, \"initializer_range\": 0.02\n",
            indent, indent, (long long)s.layers, (long long)s.hidden, (long long)s.heads, indent, (long long)s.inter,
            (long long)s.freq, (long long)s.enc, indent, indent, indent);
}

static int write_file_status(const char *what, const char *path, FILE *f) {
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "bench_qformer: cannot write %s %s\n", what, path);
        return -1;
    }
    return 0;
}

static const qf_shape BLIP2 = {12, 768, 12, 3072, 2, 1408};
static const qf_shape AFFECT = {2, 768, 12, 3072, 1, 1024};
enum { AFF_AUDIO = 1024, AFF_VIDEO = 1024, AFF_NQ = 16, AFF_LLM = 4096, AFF_POS = 264, AFF_TA = 8, AFF_TF = 32 };
enum { BLIP2_NQ = 32, BLIP2_S = 257 };

static int make_qformer_folder(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "bench_qformer: cannot create %s: %s\n", path, strerror(errno)); return -1; }
    fprintf(f, "{\n");
    fprint_qformer_config(f, BLIP2, "  ");
    fprintf(f, "}\n");
    if (write_file_status("config", path, f)) return -1;
    tensor_list l = {.n = 0};
    int rc = add_qformer(&l, "", BLIP2);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (!rc && qf_st_write(path, l.t, l.n, NULL) != QF_OK) {
        fprintf(stderr, "bench_qformer: %s\n", qf_last_error());
        rc = -1;
    }
    free_tensors(&l);
    return rc ? -1 : 0;
}

static int make_prefusion_folder(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "bench_qformer: cannot create %s: %s\n", path, strerror(errno)); return -1; }
    fprintf(f, "{\n  \"model_type\": \"affectgpt_prefusion\", \"audio_dim\": %d, \"video_dim\": %d,\n"
               "  \"max_hidden_size\": %lld, \"num_multi_query_token\": %d, \"position_embedding_size\": %d,\n"
               "  \"llm_hidden_size\": %d, \"fusion_order\": [\"face\", \"audio\"],\n  \"qformer_config\": {\n",
            AFF_AUDIO, AFF_VIDEO, (long long)AFFECT.enc, AFF_NQ, AFF_POS, AFF_LLM);
    fprint_qformer_config(f, AFFECT, "    ");
    fprintf(f, "  }\n}\n");
    if (write_file_status("config", path, f)) return -1;
    tensor_list l = {.n = 0};
    int64_t M = AFFECT.enc, H = AFFECT.hidden;
    int rc = add_tensor(&l, "multi_audio_embs.weight", 2, M, AFF_AUDIO, 0, 0.02f, 0) |
             add_tensor(&l, "multi_audio_embs.bias", 1, M, 0, 0, 0.01f, 0) |
             add_tensor(&l, "multi_video_embs.weight", 2, M, AFF_VIDEO, 0, 0.02f, 0) |
             add_tensor(&l, "multi_video_embs.bias", 1, M, 0, 0, 0.01f, 0) |
             add_tensor(&l, "multi_position_embedding.weight", 2, AFF_POS, M, 0, 0.02f, 0) |
             add_tensor(&l, "multi_query_tokens", 3, 1, AFF_NQ, H, 0.02f, 0) |
             add_tensor(&l, "multi_llama_proj.weight", 2, AFF_LLM, H, 0, 0.02f, 0) |
             add_tensor(&l, "multi_llama_proj.bias", 1, AFF_LLM, 0, 0, 0.01f, 0) |
             add_qformer(&l, "multi_Qformer.", AFFECT);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (!rc && qf_st_write(path, l.t, l.n, NULL) != QF_OK) {
        fprintf(stderr, "bench_qformer: %s\n", qf_last_error());
        rc = -1;
    }
    free_tensors(&l);
    return rc ? -1 : 0;
}

/* ---- FLOPs ------------------------------------------------------------------------------- */

typedef struct { double gemm, attn; } flops;

static flops qformer_flops(qf_shape s, double B, double Lq, double S) {
    double hid = (double)s.hidden, ffn = (double)s.inter, enc = (double)s.enc;
    flops f = {0, 0};
    for (int64_t i = 0; i < s.layers; i++) {
        f.gemm += 2 * B * Lq * hid * hid * 4 + 4 * B * Lq * hid * ffn;   /* self q,k,v,out; FFN up, down */
        f.attn += 4 * B * Lq * Lq * hid;
        if (i % s.freq == 0) {
            f.gemm += 2 * B * Lq * hid * hid * 2 + 2 * B * S * enc * hid * 2; /* cross q, out; k, v of S tokens */
            f.attn += 4 * B * Lq * S * hid;
        }
    }
    return f;
}

static flops prefusion_flops(double B) {
    flops f = qformer_flops(AFFECT, B, AFF_NQ, AFF_TA + AFF_TF);
    f.gemm += 2 * B * AFF_TA * AFF_AUDIO * (double)AFFECT.enc + 2 * B * AFF_TF * AFF_VIDEO * (double)AFFECT.enc;
    f.gemm += 2 * B * AFF_NQ * (double)AFFECT.hidden * AFF_LLM;
    return f;
}

/* ---- cases ------------------------------------------------------------------------------- */

enum case_kind { QF_FWD, QF_FWDBWD, PF_FWD };
typedef struct {
    const char *name;
    enum case_kind kind;
    int64_t B;
    double flop;
} bench_case;

typedef struct {
    qf_qformer *qf;
    qf_prefusion *pf;
    float *queries, *features, *out, *grad_out, *grad_q, *grad_enc; /* sized for B = 8 */
    float *audio, *face, *pf_out;                                    /* sized for B = 32 */
    int64_t B;
} bench_ctx;

static int run_qf_fwd(void *p) {
    bench_ctx *c = p;
    qf_qformer_args a = {.B = c->B, .num_queries = BLIP2_NQ, .encoder_len = BLIP2_S};
    return qf_qformer_forward(c->qf, &a, c->queries, c->features, c->out) == QF_OK ? 0 : 1;
}

static int run_qf_fwdbwd(void *p) {
    bench_ctx *c = p;
    if (run_qf_fwd(p)) return 1;
    return qf_qformer_backward(c->qf, c->grad_out, c->grad_q, c->grad_enc, NULL, NULL) == QF_OK ? 0 : 1;
}

static int run_pf_fwd(void *p) {
    bench_ctx *c = p;
    qf_prefusion_args a = {.B = c->B, .audio_len = AFF_TA, .face_len = AFF_TF};
    return qf_prefusion_forward(c->pf, &a, c->audio, c->face, c->pf_out) == QF_OK ? 0 : 1;
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* qfuse's median ms of one case, or -1 (message on stderr). */
static double run_qfuse_case(bench_ctx *c, const bench_case *bc) {
    c->B = bc->B;
    bench_fn fn = bc->kind == QF_FWD ? run_qf_fwd : bc->kind == QF_FWDBWD ? run_qf_fwdbwd : run_pf_fwd;
    if (bc->kind == QF_FWDBWD) qf_qformer_zero_grad(c->qf);
    double sec = time_median(fn, c);
    if (sec < 0) { fprintf(stderr, "bench_qformer: %s: %s\n", bc->name, qf_last_error()); return -1; }
    int ok = bc->kind == PF_FWD ? all_finite(c->pf_out, (size_t)(bc->B * AFF_NQ * AFF_LLM))
                                : all_finite(c->out, (size_t)(bc->B * BLIP2_NQ * BLIP2.hidden));
    if (ok && bc->kind == QF_FWDBWD) ok = all_finite(c->grad_enc, (size_t)(bc->B * BLIP2_S * BLIP2.enc));
    if (!ok) { fprintf(stderr, "bench_qformer: %s: non-finite output\n", bc->name); return -1; }
    return sec * 1e3;
}

typedef struct { int M; float *a, *b, *c; } gemm_ctx;
static int run_gemm(void *p) {
    gemm_ctx *g = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g->M, g->M, g->M, 1.0f, g->a, g->M, g->b, g->M, 0.0f, g->c, g->M);
    return 0;
}

/* Best sgemm GFLOP/s of 2048^3 and 4096^3 (4096 skipped where 2048 takes over 150 ms). */
static double gemm_ceiling(int *best_n) {
    double best = 0;
    static const int sizes[] = {2048, 4096};
    for (int i = 0; i < 2; i++) {
        int M = sizes[i];
        gemm_ctx g = {M, random_floats((size_t)M * M, 1), random_floats((size_t)M * M, 1), malloc((size_t)M * M * 4)};
        if (g.a && g.b && g.c) {
            double sec = time_median(run_gemm, &g), gf = 2.0 * M * M * M / sec * 1e-9;
            if (gf > best) { best = gf; *best_n = M; }
            if (M == 2048 && sec > 0.150) i = 2;
        }
        free(g.a); free(g.b); free(g.c);
    }
    return best;
}

/* ---- --gemm-shapes: few-rows products, qfuse's kernel against the BLAS ------------------- */

/* The Q-Former's projection shapes (and the pre-fusion's 1024 x 1024) at few rows: qfuse's own
 * kernel (qf_gemm_nt_small, src/ops/gemm_small.c, called directly at every M; qf_linear_forward
 * uses it up to QF_GEMM_SMALL_MAX_M rows) against cblas_sgemm(NoTrans, Trans), what the linear
 * layers call otherwise. Weights are cold, as in a forward over a 400 MB model: each call takes the
 * next of several copies (>= 128 MB in all). Median per call of 5 sweeps over the copies. */
static int gemm_shapes(int threads) {
    static const int Ms[] = {16, 32, 64, 128, 256};
    static const int NK[][2] = {{2304, 768}, {768, 768}, {3072, 768}, {768, 3072}, {1024, 1024}};
    printf("# gemm shapes, %d threads: qfuse = qf_gemm_nt_small (gemm_small.c; qf_linear_forward uses it for 2..%d rows), "
           "blas = cblas_sgemm\n", threads, QF_GEMM_SMALL_MAX_M);
    printf("%-22s %10s %8s %10s %8s %8s\n", "M x N x K", "qfuse ms", "GFLOP/s", "blas ms", "GFLOP/s", "blas/qf");
    for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++)
        for (size_t j = 0; j < sizeof NK / sizeof NK[0]; j++) {
            const int M = Ms[i], N = NK[j][0], K = NK[j][1];
            const size_t wn = (size_t)N * K;
            int copies = (int)((128u << 20) / (wn * 4)) + 1;
            if (copies > 64) copies = 64;
            float *w = random_floats(wn * (size_t)copies, 0.05f), *x = random_floats((size_t)M * K, 1.0f);
            float *o = malloc((size_t)M * N * sizeof *o);
            double *t = malloc(sizeof *t * 5 * (size_t)copies);
            if (!w || !x || !o || !t) { free(w); free(x); free(o); free(t); return 1; }
            double med[2];
            for (int v = 0; v < 2; v++) {
                int n = 0;
                for (int r = -1; r < 5; r++) /* r = -1: warm-up sweep */
                    for (int c = 0; c < copies; c++) {
                        const float *wc = w + wn * (size_t)c;
                        double a = now_s();
                        if (v == 0) {
                            qf_gemm_nt_args g = {.x = x, .ldx = K, .w = wc, .out = o, .ldo = N, .M = M, .N = N, .K = K};
                            qf_gemm_nt_small(&g);
                        } else {
                            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, K, wc, K, 0.0f, o, N);
                        }
                        if (r >= 0) t[n++] = now_s() - a;
                    }
                med[v] = median(t, n);
            }
            const double gf = 2.0 * M * N * K * 1e-9;
            char name[64];
            snprintf(name, sizeof name, "%d x %d x %d", M, N, K);
            printf("%-22s %10.3f %8.1f %10.3f %8.1f %7.2fx\n", name, med[0] * 1e3, gf / med[0], med[1] * 1e3,
                   gf / med[1], med[1] / med[0]);
            fflush(stdout);
            free(w); free(x); free(o); free(t);
        }
    return 0;
}

/* ---- --profile: where the Q-Former's time goes -------------------------------------------- */

/* Runs each Q-Former case `reps` times with qfuse's op profile on and prints, per op kind, ms per
 * call and its share of the wall time of those calls (the rest: loop overhead, unprofiled ops). */
static int print_profile(bench_ctx *c, const bench_case *cases, int nc, int reps) {
    if (!qf_qformer_profile_enable || !qf_qformer_profile_read) {
        printf("# profile: not available in this build\n");
        return 0;
    }
    enum { MAXK = 32 };
    for (int k = 0; k < nc; k++) {
        if (cases[k].kind == PF_FWD) continue;
        c->B = cases[k].B;
        bench_fn fn = cases[k].kind == QF_FWD ? run_qf_fwd : run_qf_fwdbwd;
        if (fn(c)) return 1; /* warm */
        qf_qformer_profile_enable(1);
        double t0 = now_s();
        for (int r = 0; r < reps; r++)
            if (fn(c)) return 1;
        double wall = (now_s() - t0) / reps;
        double sec[MAXK];
        const char *names[MAXK];
        int n = qf_qformer_profile_read(sec, names, MAXK);
        qf_qformer_profile_enable(0);
        printf("# profile %s, %d threads: %.3f ms per call\n", cases[k].name, qf_get_num_threads(), wall * 1e3);
        double sum = 0;
        for (int i = 0; i < n && i < MAXK; i++) {
            if (sec[i] <= 0) continue;
            sum += sec[i] / reps;
            printf("#   %-40s %9.3f ms %5.1f%%\n", names[i], sec[i] / reps * 1e3, 100 * sec[i] / reps / wall);
        }
        printf("#   %-40s %9.3f ms %5.1f%%\n", "(not in an op above)", (wall - sum) * 1e3, 100 * (wall - sum) / wall);
    }
    fflush(stdout);
    return 0;
}

/* ---- the peer process ----------------------------------------------------------------------- */

typedef struct {
    pid_t pid;
    FILE *to, *from;
    char label[1024];
    char why[1024];   /* why there is no peer, when pid == 0 */
} peer_proc;

static int peer_start(peer_proc *p, const char *python, const char *script, int threads, const char *qdir,
                      const char *pdir, int quick) {
    int in[2], out[2];
    memset(p, 0, sizeof *p);
    if (pipe(in) || pipe(out)) { snprintf(p->why, sizeof p->why, "pipe: %s", strerror(errno)); return -1; }
    char th[16];
    snprintf(th, sizeof th, "%d", threads);
    pid_t pid = fork();
    if (pid < 0) { snprintf(p->why, sizeof p->why, "fork: %s", strerror(errno)); return -1; }
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[0]); close(in[1]); close(out[0]); close(out[1]);
        setenv("OMP_NUM_THREADS", th, 1);
        setenv("PYTHONUNBUFFERED", "1", 1);
        const char *argv[16] = {python, script, "--serve", "--threads", th, "--model", qdir};
        int n = 7;
        if (pdir) { argv[n++] = "--prefusion-model"; argv[n++] = pdir; }
        if (quick) argv[n++] = "--quick";
        argv[n] = NULL;
        execvp(python, (char *const *)argv);
        fprintf(stdout, "X\tcannot run %s: %s\n", python, strerror(errno));
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    p->pid = pid;
    p->to = fdopen(in[1], "w");
    p->from = fdopen(out[0], "r");
    /* handshake: "M\tlabel\t..." lines, then "D\t" */
    char line[1024];
    while (fgets(line, sizeof line, p->from)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (!strncmp(line, "M\tlabel\t", 8)) snprintf(p->label, sizeof p->label, "%s", line + 8);
        else if (!strncmp(line, "X\t", 2)) { snprintf(p->why, sizeof p->why, "%s", line + 2); break; }
        else if (!strcmp(line, "D\t")) return 0;
    }
    if (!p->why[0]) snprintf(p->why, sizeof p->why, "%s %s did not start (see its stderr above)", python, script);
    fclose(p->to); fclose(p->from);
    waitpid(pid, NULL, 0);
    p->pid = 0;
    return -1;
}

/* The peer's ms for a case, or -1 (it failed or skipped: reason printed once). */
static double peer_case(peer_proc *p, const char *name) {
    if (!p->pid) return -1;
    fprintf(p->to, "%s\n", name);
    fflush(p->to);
    char line[1024];
    double ms = -1;
    while (fgets(line, sizeof line, p->from)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == 'R' && line[1] == '\t') {
            char *last = strrchr(line, '\t');
            ms = atof(last + 1);
        } else if ((line[0] == 'E' || line[0] == 'S') && line[1] == '\t') {
            fprintf(stderr, "bench_qformer: peer %s: %s\n", line[0] == 'E' ? "failed" : "skipped", line + 2);
        } else if (!strncmp(line, "D\t", 2)) {
            return ms;
        }
    }
    snprintf(p->why, sizeof p->why, "the peer exited during '%s'", name);
    p->pid = 0;
    return -1;
}

static void peer_stop(peer_proc *p) {
    if (!p->pid) return;
    fprintf(p->to, "quit\n");
    fclose(p->to);
    fclose(p->from);
    waitpid(p->pid, NULL, 0);
    p->pid = 0;
}

static void remove_folder(const char *dir) {
    const char *files[] = {"config.json", "model.safetensors"};
    char path[4096];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static void usage(void) {
    fprintf(stderr, "usage: bench_qformer [--threads N] [--quick] [--rounds R] [--model DIR] [--prefusion-model DIR]\n"
                    "                     [--no-peer] [--python PY] [--peer bench/qformer_peer.py] [--keep] [--only SUBSTR]\n"
                    "                     [--profile]\n"
                    "       bench_qformer [--threads N] --gemm-shapes\n"
                    "  times the BLIP-2 Q-Former and the AffectGPT pre-fusion in qfuse and in PyTorch; see the\n"
                    "  opening comment of bench/bench_qformer.c and bench/README.md\n");
}

int main(int argc, char **argv) {
    int threads = 0, rounds = 3, use_peer = 1, keep = 0;
    const char *only = NULL; /* --only SUBSTR: time only the cases whose name contains SUBSTR */
    int shapes_only = 0;     /* --gemm-shapes: only the few-rows GEMM table (gemm_shapes)       */
    int profile = 0;         /* --profile: after the table, qfuse's time per op (print_profile)  */
    const char *qdir = NULL, *pdir = NULL, *python = getenv("PYTHON"), *script = "bench/qformer_peer.py";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--threads") && more) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--rounds") && more) rounds = atoi(argv[++i]);
        else if (!strcmp(a, "--model") && more) qdir = argv[++i];
        else if (!strcmp(a, "--prefusion-model") && more) pdir = argv[++i];
        else if (!strcmp(a, "--python") && more) python = argv[++i];
        else if (!strcmp(a, "--peer") && more) script = argv[++i];
        else if (!strcmp(a, "--quick")) quick_factor = 0.2;
        else if (!strcmp(a, "--no-peer")) use_peer = 0;
        else if (!strcmp(a, "--keep")) keep = 1;
        else if (!strcmp(a, "--only") && more) only = argv[++i];
        else if (!strcmp(a, "--gemm-shapes")) shapes_only = 1;
        else if (!strcmp(a, "--profile")) profile = 1;
        else { usage(); return 2; }
    }
    if (rounds < 1 || rounds > 20) { fprintf(stderr, "bench_qformer: --rounds must be 1..20\n"); return 2; }
    if (!python || !*python) python = access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
    if (!threads) {
        const char *env = getenv("QFUSE_THREADS");
        threads = env && *env ? atoi(env) : 0;
    }
    if (threads >= 1 && qf_set_num_threads(threads) != QF_OK) { fprintf(stderr, "bench_qformer: %s\n", qf_last_error()); return 2; }
    threads = qf_get_num_threads();
    if (shapes_only) return gemm_shapes(threads);
    signal(SIGPIPE, SIG_IGN);

    bench_ctx c;
    memset(&c, 0, sizeof c);
    char tmp[] = "/tmp/qfuse-bench-XXXXXX", qtmp[4096] = "", ptmp[4096] = "";
    int made = 0;
    if (!qdir || !pdir) {
        if (!mkdtemp(tmp)) { fprintf(stderr, "bench_qformer: mkdtemp: %s\n", strerror(errno)); return 1; }
        made = 1;
    }
    int rc = 0;
    double t0 = now_s();
    if (!qdir) {
        snprintf(qtmp, sizeof qtmp, "%s/blip2-qformer", tmp);
        if (mkdir(qtmp, 0755) || make_qformer_folder(qtmp)) { rc = 1; goto cleanup; }
        qdir = qtmp;
    }
    if (!pdir) {
        snprintf(ptmp, sizeof ptmp, "%s/affectgpt-prefusion", tmp);
        if (mkdir(ptmp, 0755) || make_prefusion_folder(ptmp)) { rc = 1; goto cleanup; }
        pdir = ptmp;
    }
    fprintf(stderr, "bench_qformer: checkpoints ready in %.1f s (%s, %s)\n", now_s() - t0, qdir, pdir);

    if (qf_qformer_load(qdir, &c.qf) != QF_OK || qf_prefusion_load(pdir, &c.pf) != QF_OK) {
        fprintf(stderr, "bench_qformer: %s\n", qf_last_error());
        rc = 1;
        goto cleanup;
    }
    size_t nq = 8 * BLIP2_NQ * BLIP2.hidden, nf = 8 * (size_t)BLIP2_S * BLIP2.enc;
    c.queries = random_floats(nq, 0.5f); c.features = random_floats(nf, 1.0f); c.grad_out = random_floats(nq, 1.0f);
    c.out = malloc(nq * 4); c.grad_q = malloc(nq * 4); c.grad_enc = malloc(nf * 4);
    c.audio = random_floats(32 * AFF_TA * AFF_AUDIO, 1.0f); c.face = random_floats(32 * AFF_TF * AFF_VIDEO, 1.0f);
    c.pf_out = malloc((size_t)32 * AFF_NQ * AFF_LLM * 4);
    if (!c.queries || !c.features || !c.grad_out || !c.out || !c.grad_q || !c.grad_enc || !c.audio || !c.face || !c.pf_out) {
        fprintf(stderr, "bench_qformer: out of memory\n");
        rc = 1;
        goto cleanup;
    }
    flops f1 = qformer_flops(BLIP2, 1, BLIP2_NQ, BLIP2_S), f8 = qformer_flops(BLIP2, 8, BLIP2_NQ, BLIP2_S);
    flops p1 = prefusion_flops(1), p32 = prefusion_flops(32);
    bench_case cases[] = {
        {"qformer fwd B=1 (32q x 257x1408)", QF_FWD, 1, f1.gemm + f1.attn},
        {"qformer fwd B=8", QF_FWD, 8, f8.gemm + f8.attn},
        {"qformer fwd+bwd B=8", QF_FWDBWD, 8, 3 * f8.gemm + 3.5 * f8.attn},
        {"prefusion fwd B=1 (8a+32f x 1024)", PF_FWD, 1, p1.gemm + p1.attn},
        {"prefusion fwd B=32", PF_FWD, 32, p32.gemm + p32.attn},
    };
    enum { NC = sizeof cases / sizeof cases[0] };

    peer_proc peer;
    memset(&peer, 0, sizeof peer);
    if (use_peer) {
        fprintf(stderr, "bench_qformer: starting the peer: %s %s\n", python, script);
        peer_start(&peer, python, script, threads, qdir, pdir, quick_factor < 1);
    } else {
        snprintf(peer.why, sizeof peer.why, "--no-peer");
    }

    double q_ms[NC][20], p_ms[NC][20], ratio[NC][20], ceil_best = 0;
    int nq_ok[NC] = {0}, np_ok[NC] = {0}, nr[NC] = {0}, ceil_n = 0;
    for (int r = 0; r < rounds; r++) {
        int n = 0;
        double cg = gemm_ceiling(&n);
        if (cg > ceil_best) { ceil_best = cg; ceil_n = n; }
        fprintf(stderr, "bench_qformer: round %d/%d (ceiling %.1f GFLOP/s)\n", r + 1, rounds, cg);
        for (int k = 0; k < NC; k++) {
            double qm = -1, pm = -1;
            if (only && !strstr(cases[k].name, only)) continue;
            if (r % 2 == 0) { qm = run_qfuse_case(&c, &cases[k]); pm = peer_case(&peer, cases[k].name); }
            else { pm = peer_case(&peer, cases[k].name); qm = run_qfuse_case(&c, &cases[k]); }
            if (qm > 0) q_ms[k][nq_ok[k]++] = qm;
            else rc = 1;
            if (pm > 0) p_ms[k][np_ok[k]++] = pm;
            if (qm > 0 && pm > 0) { ratio[k][nr[k]++] = pm / qm; }
        }
    }
    peer_stop(&peer);

    printf("# bench_qformer: qfuse %s, %d threads, ISA %s, BLAS %s%s%s\n", QFUSE_VERSION, threads,
           qf_isa_name(qf_get_isa()), openblas_get_config ? openblas_get_config() : "?",
           openblas_get_corename ? " core " : "", openblas_get_corename ? openblas_get_corename() : "");
    printf("# GEMM ceiling: %.1f GFLOP/s (best sgemm %d^3 of %d rounds); %d rounds, qfuse/peer order alternating\n",
           ceil_best, ceil_n, rounds, rounds);
    printf("# peer: %s\n", peer.label[0] ? peer.label : peer.why[0] ? peer.why : "none");
    printf("# FLOPs: GEMMs 2*M*N*K + attention 4*B*H*L*S*D; fwd+bwd = 3x GEMM + 3.5x attention\n");
    printf("%-36s %10s %9s %7s %10s %8s %13s\n", "case", "qfuse ms", "GFLOP/s", "%ceil", "peer ms", "speedup",
           "range");
    for (int k = 0; k < NC; k++) {
        double qm = median(q_ms[k], nq_ok[k]), pm = median(p_ms[k], np_ok[k]);
        double lo = 1e30, hi = 0;
        for (int i = 0; i < nr[k]; i++) { lo = fmin(lo, ratio[k][i]); hi = fmax(hi, ratio[k][i]); }
        double sp = median(ratio[k], nr[k]);
        if (only && !strstr(cases[k].name, only)) continue;
        if (qm <= 0) { printf("%-36s %10s\n", cases[k].name, "FAILED"); continue; }
        double gf = cases[k].flop / qm * 1e-6;
        printf("%-36s %10.3f %9.1f %6.1f%%", cases[k].name, qm, gf, ceil_best > 0 ? 100 * gf / ceil_best : 0);
        if (pm > 0) printf(" %10.3f", pm);
        else printf(" %10s", "-");
        if (nr[k] > 0) printf(" %7.2fx %6.2f..%-5.2f\n", sp, lo, hi);
        else printf(" %8s %13s\n", "-", "-");
    }
    fflush(stdout);
    if (profile && print_profile(&c, cases, NC, quick_factor < 1 ? 2 : 5)) {
        fprintf(stderr, "bench_qformer: profile: %s\n", qf_last_error());
        rc = 1;
    }

cleanup:
    qf_qformer_free(c.qf);
    qf_prefusion_free(c.pf);
    free(c.queries); free(c.features); free(c.grad_out); free(c.out); free(c.grad_q); free(c.grad_enc);
    free(c.audio); free(c.face); free(c.pf_out);
    if (made && !keep) {
        if (qtmp[0]) remove_folder(qtmp);
        if (ptmp[0]) remove_folder(ptmp);
        rmdir(tmp);
    } else if (made) {
        fprintf(stderr, "bench_qformer: kept the checkpoints in %s\n", tmp);
    }
    return rc;
}
