/* run.c - `qfuse run`: an image and a prompt in, streamed text out, through a whole BLIP-2 /
 * InstructBLIP folder (qf_vlm); without --image, a prompt in and streamed text out through a
 * decoder LLM folder (LLaMA / Qwen2 / OPT: qf_llm). The image steps are the ones transformers'
 * Blip2Processor + generate take:
 *   pixels    = BlipImageProcessor(image)      per MODEL/preprocessor_config.json (defaults:
 *                                              bicubic to vision_config.image_size, CLIP mean/std)
 *   input_ids = [image_token_id] * num_query_tokens + tokenizer(prompt, add_special_tokens)
 *               (the image tokens go before BOS, as the processor puts them)
 *   InstructBLIP: qformer_input_ids = MODEL/qformer_tokenizer/tokenizer.json(prompt, add_special_tokens)
 *               (BERT WordPiece: [CLS] prompt [SEP], the Q-Former attention mask all ones, as
 *               InstructBlipProcessor saves and calls its qformer_tokenizer)
 *   ids       = generate(...), decoded as they come (qf_text_stream: whole UTF-8 characters,
 *               special tokens skipped, --stop strings cut)
 * The answer goes to stdout as it is produced; timings go to stderr (--print-ids adds the token
 * ids: qformer_input_ids, input_ids, generated_ids). Exit status: 0 done, 1 a library error (its
 * message on stderr), 2 a usage error. */
#include "qfuse.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int cmd_run(int argc, char **argv);

static const char *run_help =
    "usage: qfuse run MODEL --image IMAGE [--prompt TEXT] [options]\n"
    "       qfuse run LLM --prompt TEXT [options]\n"
    "\n"
    "Describes IMAGE with a BLIP-2 / InstructBLIP model folder (config.json model_type \"blip-2\" or\n"
    "\"instructblip\", model.safetensors or a sharded index, tokenizer.json; optional\n"
    "preprocessor_config.json and generation_config.json), streaming the answer to stdout.\n"
    "The prompt is tokenized with MODEL/tokenizer.json and placed after the model's image tokens,\n"
    "as Blip2Processor does (image tokens, BOS, prompt). InstructBLIP's Q-Former also reads the\n"
    "prompt, through MODEL/qformer_tokenizer/tokenizer.json (BERT WordPiece, as\n"
    "InstructBlipProcessor.save_pretrained writes it). Timings (tokens/s) go to stderr.\n"
    "Without --image, MODEL is a decoder LLM folder (model_type \"llama\", \"qwen2\" or \"opt\"):\n"
    "the prompt is tokenized as tokenizer(prompt) does and continued.\n"
    "\n"
    "options:\n"
    "  --image FILE            PNG / JPEG / BMP / TGA / GIF, resized and normalized like\n"
    "                          BlipImageProcessor (MODEL/preprocessor_config.json when present)\n"
    "  --prompt TEXT           the text after the image (default: empty: the model captions)\n"
    "  --max-new-tokens N      at most N new tokens (default 32; capped by the context length)\n"
    "  --temperature T         sample with temperature T (0 = greedy, the default)\n"
    "  --top-k K               sample among the K most likely tokens (implies sampling)\n"
    "  --top-p P               sample from the smallest set of mass >= P (implies sampling)\n"
    "  --repetition-penalty R  divide the logits of already-seen tokens by R (greedy too)\n"
    "  --seed S                sampling seed (default 0; the same seed gives the same text)\n"
    "  --stop STR              stop when STR appears (not printed); may be repeated\n"
    "  --weights FMT           language model weights: f32 (default), bf16, int8, q4\n"
    "  --adapter DIR           apply a PEFT LoRA adapter (adapter_config.json +\n"
    "                          adapter_model.safetensors) to the language model, on the fly\n"
    "  --threads N             worker threads\n"
    "  --device cpu|cuda       where image -> tokens runs (default cpu): cuda puts the BLIP-2 /\n"
    "                          InstructBLIP vision tower, Q-Former and language_projection on the GPU.\n"
    "                          It needs a libqfuse built with make CUDA=1 and a GPU (otherwise it fails\n"
    "                          with the reason); the language model stays on the CPU (it runs on the\n"
    "                          CPU only, so an LLM folder without --image takes --device cpu only)\n"
    "  --dtype float32|bfloat16  the GPU weights (--device cuda only; default float32):\n"
    "                          bfloat16 GEMM weights, float32 accumulation and activations\n"
    "  --quiet                 no timings on stderr\n"
    "  --print-ids             print the token ids on stderr (qformer_input_ids, input_ids,\n"
    "                          generated_ids), one line each\n"
    "\n"
    "Generation ends at the model's eos token (generation_config.json), a --stop string, or\n"
    "--max-new-tokens.\n"
    "\n"
    "examples:\n"
    "  qfuse run models/default --image data/chelsea.png --prompt \"Question: what is this? Answer:\"\n"
    "  qfuse run instructblip/ --image cat.jpg --prompt \"What is in the picture?\" --device cuda\n"
    "  qfuse run blip2-opt-2.7b/ --image cat.jpg --max-new-tokens 20 --temperature 0.7 --top-p 0.9 --seed 1\n"
    "  qfuse run Qwen2.5-0.5B/ --prompt \"The capital of France is\" --weights int8 --adapter my-lora/\n";

static int run_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "qfuse: run: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(see `qfuse run --help`)\n");
    return 2;
}

static int run_fail(const char *what) {
    fprintf(stderr, "qfuse: run: %s: %s\n", what, qf_last_error());
    return 1;
}

static double run_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static int file_exists(const char *path) {
    struct stat s;
    return stat(path, &s) == 0 && S_ISREG(s.st_mode);
}

static int parse_double(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !(v >= lo && v <= hi)) {
        fprintf(stderr, "qfuse: run: %s expects a number in [%g, %g], got \"%s\"\n(see `qfuse run --help`)\n",
                flag, lo, hi, s);
        return 2;
    }
    *out = v;
    return 0;
}

static int parse_int(const char *flag, const char *s, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "qfuse: run: %s expects an integer in [%lld, %lld], got \"%s\"\n(see `qfuse run --help`)\n",
                flag, lo, hi, s);
        return 2;
    }
    *out = v;
    return 0;
}

enum { RUN_MAX_STOPS = 16 };

typedef struct {
    const char *model, *image, *prompt, *weights, *adapter, *device, *dtype;
    long long max_new, top_k, seed, threads;
    double temperature, top_p, repetition_penalty;
    int sample, quiet, print_ids;
    const char *stops[RUN_MAX_STOPS];
    int n_stops;
} run_opts;

/* The streaming state the token callback updates. */
typedef struct {
    qf_text_stream *ts;
    double t_start, t_first;
    int64_t n_tokens;
    int stopped, error;
} run_stream;

static int on_token(void *user, int64_t row, int32_t id) {
    (void)row;
    run_stream *rs = user;
    if (rs->n_tokens++ == 0) rs->t_first = run_now();
    const char *txt;
    size_t n;
    int stopped = 0;
    if (qf_text_stream_push(rs->ts, id, &txt, &n, &stopped) != QF_OK) {
        rs->error = 1;
        return 1;
    }
    fwrite(txt, 1, n, stdout);
    fflush(stdout);
    if (stopped) rs->stopped = 1;
    return stopped;
}

static int parse_args(int argc, char **argv, run_opts *o) {
    memset(o, 0, sizeof *o);
    o->prompt = "";
    o->weights = "f32";
    o->max_new = 32;
    o->temperature = 1.0;
    o->top_p = 1.0;
    o->repetition_penalty = 1.0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return -1;
        if (!strcmp(a, "--quiet")) { o->quiet = 1; continue; }
        if (!strcmp(a, "--print-ids")) { o->print_ids = 1; continue; }
        if (a[0] != '-') {
            if (o->model) return run_usage("one MODEL folder only; extra argument %s", a);
            o->model = a;
            continue;
        }
        static const char *const valued[] = {"--image", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                                             "--top-p", "--repetition-penalty", "--seed", "--stop", "--weights",
                                             "--threads", "--adapter", "--device", "--dtype"};
        int known = 0;
        for (size_t k = 0; k < sizeof valued / sizeof *valued; k++) known |= !strcmp(a, valued[k]);
        if (!known) return run_usage("unknown option %s", a);
        if (i + 1 >= argc) return run_usage("%s needs a value", a);
        const char *v = argv[++i];
        int rc = 0;
        double d;
        if (!strcmp(a, "--image")) o->image = v;
        else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--weights")) o->weights = v;
        else if (!strcmp(a, "--adapter")) o->adapter = v;
        else if (!strcmp(a, "--device")) o->device = v;
        else if (!strcmp(a, "--dtype")) o->dtype = v;
        else if (!strcmp(a, "--max-new-tokens")) rc = parse_int(a, v, 1, 1 << 20, &o->max_new);
        else if (!strcmp(a, "--top-k")) { rc = parse_int(a, v, 0, 1LL << 31, &o->top_k); o->sample |= o->top_k > 0; }
        else if (!strcmp(a, "--seed")) rc = parse_int(a, v, 0, INT64_MAX, &o->seed);
        else if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, 4096, &o->threads);
        else if (!strcmp(a, "--temperature")) {
            rc = parse_double(a, v, 0.0, 1e6, &d);
            if (!rc && d > 0) { o->temperature = d; o->sample = 1; }
        } else if (!strcmp(a, "--top-p")) {
            rc = parse_double(a, v, 1e-9, 1.0, &o->top_p);
            o->sample |= !rc && o->top_p < 1.0;
        } else if (!strcmp(a, "--repetition-penalty")) rc = parse_double(a, v, 1e-6, 1e6, &o->repetition_penalty);
        else if (!strcmp(a, "--stop")) {
            if (!*v) return run_usage("--stop needs a non-empty string%s", "");
            if (o->n_stops == RUN_MAX_STOPS) return run_usage("at most 16 --stop strings%s", "");
            o->stops[o->n_stops++] = v;
        }
        if (rc) return rc;
    }
    if (!o->model) return run_usage("missing MODEL folder%s", "");
    if (!o->device) o->device = "cpu";
    if (strcmp(o->device, "cpu") && strcmp(o->device, "cuda"))
        return run_usage("--device: expected cpu or cuda, got %s", o->device);
    if (!o->dtype || !strcmp(o->dtype, "f32")) o->dtype = "float32";
    if (!strcmp(o->dtype, "bf16")) o->dtype = "bfloat16";
    if (strcmp(o->dtype, "float32") && strcmp(o->dtype, "bfloat16"))
        return run_usage("--dtype: expected float32 or bfloat16, got %s", o->dtype);
    if (!strcmp(o->dtype, "bfloat16") && strcmp(o->device, "cuda"))
        return run_usage("--dtype bfloat16 needs --device cuda (the CPU Q-Former runs float32 weights)%s", "");
    if (!strcmp(o->device, "cuda") && !o->image)
        return run_usage("--device cuda places a BLIP-2 / InstructBLIP Q-Former (with --image); a decoder LLM "
                         "runs on the CPU only%s", "");
    if (!o->image && !*o->prompt) return run_usage("give --image FILE (a BLIP-2 folder) or --prompt TEXT (an LLM)%s", "");
    return 0;
}

static int weights_format(const char *s, int *out) {
    static const struct { const char *name; int v; } f[] = {{"f32", QF_WEIGHTS_F32}, {"bf16", QF_WEIGHTS_BF16},
                                                            {"int8", QF_WEIGHTS_INT8}, {"q4", QF_WEIGHTS_Q4}};
    for (size_t i = 0; i < sizeof f / sizeof *f; i++)
        if (!strcmp(s, f[i].name)) { *out = f[i].v; return 0; }
    return run_usage("--weights: expected f32, bf16, int8 or q4, got %s", s);
}

/* ids of text under tok (add_special as the processor does); *ids malloc'd. */
static int tokenize(const qf_tokenizer *tok, const char *text, int add_special, int32_t **ids, size_t *n) {
    size_t len = strlen(text);
    if (qf_tokenizer_encode(tok, text, len, add_special, NULL, 0, n) != QF_OK) return run_fail("--prompt");
    *ids = malloc((*n ? *n : 1) * sizeof **ids);
    if (!*ids) { fprintf(stderr, "qfuse: run: out of memory\n"); return 1; }
    if (qf_tokenizer_encode(tok, text, len, add_special, *ids, *n, n) != QF_OK) return run_fail("--prompt");
    return 0;
}

/* --print-ids: "name: id id ..." on stderr. */
static void print_ids(const run_opts *o, const char *name, const int32_t *ids, size_t n) {
    if (!o->print_ids) return;
    fprintf(stderr, "%s:", name);
    for (size_t i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
    fputc('\n', stderr);
}

/* Prints the timing line shared by both modes. */
static void print_timings(const run_opts *o, const run_stream *rs, double t_load, double t_image, int64_t T,
                          double t_gen0, double t_gen1, int64_t steps, int64_t max_new) {
    if (o->quiet) return;
    const char *why = rs->stopped ? "stop string" : steps < max_new ? "eos" : "max-new-tokens";
    double pre = rs->n_tokens ? rs->t_first - t_gen0 : t_gen1 - t_gen0,
           dec = t_gen1 - (rs->n_tokens ? rs->t_first : t_gen1);
    fprintf(stderr, "\n[qfuse run] load %.2f s | ", t_load);
    if (t_image >= 0) fprintf(stderr, "image (vision + Q-Former) %.1f ms | ", t_image * 1e3);
    fprintf(stderr, "prefill %lld tokens %.1f ms (%.1f tok/s) | decode %lld tokens %.1f ms (%.1f tok/s) | ended by %s "
                    "| %d threads\n", (long long)T, pre * 1e3, pre > 0 ? T / pre : 0.0,
            (long long)(rs->n_tokens > 0 ? rs->n_tokens - 1 : 0), dec * 1e3,
            dec > 0 && rs->n_tokens > 1 ? (rs->n_tokens - 1) / dec : 0.0, why, qf_get_num_threads());
}

/* Loads --adapter onto the language model and makes it active. */
static int apply_adapter(qf_llm *llm, const run_opts *o) {
    if (!o->adapter) return 0;
    if (qf_llm_load_adapter(llm, o->adapter, "cli") != QF_OK || qf_llm_set_adapter(llm, "cli") != QF_OK)
        return run_fail("--adapter");
    return 0;
}

/* Without --image: a decoder LLM folder continues the prompt. */
static int run_text(const run_opts *o, int wfmt) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/tokenizer.json", o->model) >= (int)sizeof path)
        return run_usage("MODEL path is too long: %s", o->model);
    qf_llm *m = NULL;
    qf_tokenizer *tok = NULL;
    qf_text_stream *ts = NULL;
    int32_t *ids = NULL, *out_ids = NULL;
    float *embeds = NULL;
    int rc = 1;
    double t0 = run_now();
    qf_llm_options lo = {wfmt, 0};
    if (qf_llm_load_ex(o->model, &lo, &m) != QF_OK) { rc = run_fail("loading the model"); goto done; }
    if ((rc = apply_adapter(m, o))) goto done;
    rc = 1;
    if (!file_exists(path)) {
        fprintf(stderr, "qfuse: run: %s is missing: qfuse run needs the model's fast-tokenizer file\n", path);
        goto done;
    }
    if (qf_tokenizer_load(path, &tok) != QF_OK) { rc = run_fail("loading the tokenizer"); goto done; }
    qf_llm_config c;
    qf_llm_get_config(m, &c);
    size_t n = 0;
    if ((rc = tokenize(tok, o->prompt, 1, &ids, &n))) goto done;
    rc = 1;
    const int64_t T = (int64_t)n;
    if (T < 1) { fprintf(stderr, "qfuse: run: the prompt has no tokens\n"); goto done; }
    if (T >= c.max_position_embeddings) {
        fprintf(stderr, "qfuse: run: the prompt is %lld tokens; the model's context is %lld\n", (long long)T,
                (long long)c.max_position_embeddings);
        goto done;
    }
    int64_t max_new = o->max_new;
    if (T + max_new > c.max_position_embeddings) {
        max_new = c.max_position_embeddings - T;
        if (!o->quiet)
            fprintf(stderr, "qfuse: run: --max-new-tokens %lld capped to %lld by the context of %lld tokens\n",
                    o->max_new, (long long)max_new, (long long)c.max_position_embeddings);
    }
    out_ids = malloc((size_t)max_new * sizeof *out_ids);
    embeds = malloc((size_t)(T * c.word_embed_proj_dim) * sizeof *embeds);
    if (!out_ids || !embeds) { fprintf(stderr, "qfuse: run: out of memory\n"); goto done; }
    if (qf_llm_embed(m, ids, 1, T, embeds) != QF_OK) { rc = run_fail("--prompt"); goto done; }
    if (qf_text_stream_new(tok, o->stops, (size_t)o->n_stops, 1, &ts) != QF_OK) { rc = run_fail("--stop"); goto done; }
    double t1 = run_now();
    run_stream rs = {.ts = ts, .t_start = t1};
    qf_generate_options go = qf_llm_generate_defaults(m);
    go.max_new_tokens = max_new;
    go.sampling.do_sample = o->sample;
    go.sampling.temperature = (float)o->temperature;
    go.sampling.top_k = o->top_k;
    go.sampling.top_p = (float)o->top_p;
    go.sampling.repetition_penalty = (float)o->repetition_penalty;
    go.sampling.seed = (uint64_t)o->seed;
    go.on_token = on_token;
    go.user = &rs;
    int64_t steps = 0;
    fputs(o->prompt, stdout);
    print_ids(o, "input_ids", ids, n);
    qf_status gs = qf_llm_generate(m, embeds, NULL, 1, T, ids, &go, out_ids, &steps);
    double t2 = run_now();
    if (rs.error) { rc = run_fail("decoding the output"); goto done; }
    if (gs != QF_OK) { rc = run_fail("generate"); goto done; }
    print_ids(o, "generated_ids", out_ids, (size_t)steps);
    const char *txt;
    size_t tn;
    if (!rs.stopped && qf_text_stream_flush(ts, &txt, &tn) == QF_OK) fwrite(txt, 1, tn, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    print_timings(o, &rs, t1 - t0, -1, T, t1, t2, steps, max_new);
    rc = 0;
done:
    qf_text_stream_free(ts);
    qf_tokenizer_free(tok);
    qf_llm_free(m);
    free(ids);
    free(out_ids);
    free(embeds);
    return rc;
}

int cmd_run(int argc, char **argv) {
    run_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc == -1) { fputs(run_help, stdout); return 0; }
    if (rc) return rc;
    int wfmt;
    if ((rc = weights_format(o.weights, &wfmt))) return rc;
    if (o.threads && qf_set_num_threads((int)o.threads) != QF_OK) return run_fail("--threads");
    /* before the model is loaded: a build without CUDA or a machine without a GPU says so at once */
    if (!strcmp(o.device, "cuda") && qf_cuda_init() != QF_OK) return run_fail("--device cuda");
    if (!o.image) return run_text(&o, wfmt);

    char path[4096];
    if (snprintf(path, sizeof path, "%s/tokenizer.json", o.model) >= (int)sizeof path - 64)
        return run_usage("MODEL path is too long: %s", o.model);

    qf_vlm *m = NULL;
    qf_tokenizer *tok = NULL, *qtok = NULL;
    qf_text_stream *ts = NULL;
    uint8_t *rgb = NULL;
    float *pixels = NULL, *embeds = NULL;
    int32_t *prompt_ids = NULL, *qids = NULL, *ids = NULL, *out_ids = NULL;
    rc = 1;

    double t0 = run_now();
    qf_llm_options lo = {wfmt, 0};
    if (qf_vlm_load(o.model, &lo, &m) != QF_OK) { rc = run_fail("loading the model"); goto done; }
    if ((rc = apply_adapter(qf_vlm_llm(m), &o))) goto done;
    rc = 1;
    if (!strcmp(o.device, "cuda")) {
        if (qf_blip2_to_device(qf_vlm_blip2(m), "cuda", strcmp(o.dtype, "bfloat16") ? QF_F32 : QF_BF16) != QF_OK) {
            rc = run_fail("--device cuda");
            goto done;
        }
        if (!o.quiet)
            fprintf(stderr, "[qfuse run] the vision tower, Q-Former and language_projection run on the GPU (cuda, %s "
                            "weights); the language model on the CPU\n", o.dtype);
    }
    qf_vlm_info info;
    qf_vlm_get_info(m, &info);
    if (!file_exists(path)) {
        fprintf(stderr, "qfuse: run: %s is missing: qfuse run needs the model's fast-tokenizer file (what the "
                        "tokenizer's save_pretrained writes next to config.json)\n", path);
        goto done;
    }
    if (qf_tokenizer_load(path, &tok) != QF_OK) { rc = run_fail("loading the tokenizer"); goto done; }
    if (info.instruct) {
        snprintf(path, sizeof path, "%s/qformer_tokenizer/tokenizer.json", o.model);
        if (!file_exists(path)) {
            fprintf(stderr, "qfuse: run: %s is missing: InstructBLIP's Q-Former reads the prompt through its own "
                            "tokenizer (BERT WordPiece), which InstructBlipProcessor.save_pretrained writes there\n", path);
            goto done;
        }
        if (qf_tokenizer_load(path, &qtok) != QF_OK) { rc = run_fail("loading the Q-Former's tokenizer"); goto done; }
    }
    double t_load = run_now();

    /* image -> pixel_values [1,3,S,S] */
    int64_t w = 0, h = 0;
    if (qf_image_load(o.image, &w, &h, &rgb) != QF_OK) { rc = run_fail("--image"); goto done; }
    snprintf(path, sizeof path, "%s/preprocessor_config.json", o.model);
    qf_image_preproc pp;
    if (qf_image_preproc_load(file_exists(path) ? path : NULL, info.image_size, &pp) != QF_OK) {
        rc = run_fail("preprocessor_config.json");
        goto done;
    }
    if (pp.size_h != info.image_size || pp.size_w != info.image_size) {
        fprintf(stderr, "qfuse: run: %s resizes to %lldx%lld but the vision tower takes %lldx%lld images\n", path,
                (long long)pp.size_h, (long long)pp.size_w, (long long)info.image_size, (long long)info.image_size);
        goto done;
    }
    pixels = malloc((size_t)(3 * pp.size_h * pp.size_w) * sizeof *pixels);
    if (!pixels) { fprintf(stderr, "qfuse: run: out of memory\n"); goto done; }
    if (qf_image_preprocess(&pp, rgb, w, h, pixels) != QF_OK) { rc = run_fail("--image"); goto done; }

    /* input_ids = image tokens + tokenizer(prompt) */
    size_t np_ = 0, nq_text = 0;
    if ((rc = tokenize(tok, o.prompt, 1, &prompt_ids, &np_))) goto done;
    rc = 1;
    if (qtok) {
        if ((rc = tokenize(qtok, o.prompt, 1, &qids, &nq_text))) goto done;
        rc = 1;
    }
    const int64_t nq = info.num_query_tokens, T = nq + (int64_t)np_;
    if (T > info.max_positions) {
        fprintf(stderr, "qfuse: run: the prompt is %zu tokens; with the %lld image tokens that is %lld, more than the "
                        "language model's context of %lld\n", np_, (long long)nq, (long long)T,
                (long long)info.max_positions);
        goto done;
    }
    int64_t max_new = o.max_new;
    if (T + max_new > info.max_positions) {
        max_new = info.max_positions - T;
        if (!o.quiet)
            fprintf(stderr, "qfuse: run: --max-new-tokens %lld capped to %lld by the context of %lld tokens\n",
                    o.max_new, (long long)max_new, (long long)info.max_positions);
        if (max_new < 1) {
            fprintf(stderr, "qfuse: run: the prompt fills the whole context: no room to generate\n");
            goto done;
        }
    }
    ids = malloc((size_t)T * sizeof *ids);
    out_ids = malloc((size_t)max_new * sizeof *out_ids);
    embeds = malloc((size_t)(T * info.embed_dim) * sizeof *embeds);
    if (!ids || !out_ids || !embeds) { fprintf(stderr, "qfuse: run: out of memory\n"); goto done; }
    for (int64_t i = 0; i < nq; i++) ids[i] = info.image_token_id;
    memcpy(ids + nq, prompt_ids, np_ * sizeof *ids);
    if (qtok) print_ids(&o, "qformer_input_ids", qids, nq_text);
    print_ids(&o, "input_ids", ids, (size_t)T);

    if (qf_text_stream_new(tok, o.stops, (size_t)o.n_stops, 1, &ts) != QF_OK) { rc = run_fail("--stop"); goto done; }

    /* image + prompt -> inputs_embeds */
    double t1 = run_now();
    qf_vlm_inputs in = {.B = 1, .T = T, .pixel_values = pixels, .input_ids = ids, .attention_mask = NULL,
                        .qformer_len = (int64_t)nq_text, .qformer_ids = qids, .qformer_mask = NULL};
    if (qf_vlm_embed(m, &in, embeds) != QF_OK) { rc = run_fail("image"); goto done; }
    double t2 = run_now();

    /* prefill + decode, streamed */
    run_stream rs = {.ts = ts, .t_start = t2};
    qf_generate_options go = qf_vlm_generate_defaults(m);
    go.max_new_tokens = max_new;
    go.sampling.do_sample = o.sample;
    go.sampling.temperature = (float)o.temperature;
    go.sampling.top_k = o.top_k;
    go.sampling.top_p = (float)o.top_p;
    go.sampling.repetition_penalty = (float)o.repetition_penalty;
    go.sampling.seed = (uint64_t)o.seed;
    go.on_token = on_token;
    go.user = &rs;
    int64_t steps = 0;
    qf_status gs = qf_llm_generate(qf_vlm_llm(m), embeds, NULL, 1, T, ids, &go, out_ids, &steps);
    double t3 = run_now();
    if (rs.error) { rc = run_fail("decoding the output"); goto done; }
    if (gs != QF_OK) { rc = run_fail("generate"); goto done; }
    print_ids(&o, "generated_ids", out_ids, (size_t)steps);
    const char *txt;
    size_t n;
    if (!rs.stopped && qf_text_stream_flush(ts, &txt, &n) == QF_OK) fwrite(txt, 1, n, stdout);
    fputc('\n', stdout);
    fflush(stdout);

    print_timings(&o, &rs, t_load - t0, t2 - t1, T, t2, t3, steps, max_new);
    rc = 0;
done:
    qf_text_stream_free(ts);
    qf_tokenizer_free(tok);
    qf_tokenizer_free(qtok);
    qf_vlm_free(m);
    free(rgb);
    free(pixels);
    free(embeds);
    free(prompt_ids);
    free(qids);
    free(ids);
    free(out_ids);
    return rc;
}
