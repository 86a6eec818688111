/* main.c - the `qfuse` command-line tool: a thin layer over the public API.
 * Every subcommand parses its flags, calls libqfuse, and prints either its result or the
 * library's error message (exit status 1 for runtime errors, 2 for usage errors). */
#include "qfuse.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *usage_text =
    "qfuse " QFUSE_VERSION " - attention-based multimodal fusion engine (CPU; CUDA for the fusion models)\n"
    "\n"
    "usage: qfuse [--threads N] [--isa scalar|avx2|avx512] COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  info                      version, threads, SIMD path chosen for this CPU\n"
    "  inspect FILE              list the tensors of a .safetensors file or the array of a .npy file\n"
    "                            (dtype, shape, bytes) after validating the whole file\n"
    "  sdpa --q Q.npy --k K.npy --v V.npy [options]\n"
    "                            scaled dot-product attention, torch.nn.functional semantics:\n"
    "                            q [B,H,L,D], k/v [B,Hkv,S,D] (3-D [H,L,D] also accepted)\n"
    "      --mask M.npy          bool mask (1 = attend) or float mask (added), numpy-broadcastable\n"
    "      --causal              query i sees keys j <= i (top-left aligned)\n"
    "      --scale X             score scale (default 1/sqrt(D))\n"
    "      --out OUT.npy         write the output (default: print shape and a checksum only)\n"
    "      --weights W.npy       also write the attention probabilities [B,H,L,S]\n"
    "  fuse MODEL [options]      run a fusion model (Q-Former, BLIP-2, AffectGPT pre-fusion / video and\n"
    "                            audio Q-Formers / attention fusion, KV-prefix)\n"
    "                            on .npy features or an image; `qfuse fuse --help` for the options\n"
    "                            (--device cuda: on the GPU, in a libqfuse built with make CUDA=1)\n"
    "  run MODEL --image X [--prompt TEXT]\n"
    "                            BLIP-2 / InstructBLIP: describe an image, streaming the answer\n"
    "                            (`qfuse run --help` for sampling, stop strings, weights, and\n"
    "                            --device cuda: image -> tokens on the GPU, the LLM on the CPU)\n"
    "  help                      this text\n"
    "\n"
    "environment:\n"
    "  QFUSE_THREADS=N           worker threads (default: all cores)\n"
    "  QFUSE_ISA=scalar|avx2     force a slower SIMD path (for testing)\n"
    "\n"
    "examples:\n"
    "  qfuse inspect model.safetensors\n"
    "  qfuse sdpa --q q.npy --k k.npy --v v.npy --causal --out o.npy\n"
    "  qfuse fuse blip2/ --image cat.png --out tokens.npy --attn-png map.png\n"
    "\n"
    "The attention benchmark (qfuse vs PyTorch) is `make bench`; see README.md.\n";

int cmd_run(int argc, char **argv); /* src/cli/run.c */

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "qfuse: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(run `qfuse help` for usage)\n");
    return 2;
}

static int fail(const char *what) {
    fprintf(stderr, "qfuse: %s: %s\n", what, qf_last_error());
    return 1;
}

static void print_shape(const int64_t *shape, int ndim) {
    printf("[");
    for (int i = 0; i < ndim; i++) printf(i ? ",%lld" : "%lld", (long long)shape[i]);
    printf("]");
}

#ifndef QF_BLAS_BLIS
extern char *openblas_get_corename(void); /* the Makefile links OpenBLAS unless BLAS=blis */
#endif

static int cmd_info(void) {
    printf("qfuse %s\n", QFUSE_VERSION);
    printf("threads: %d\n", qf_get_num_threads());
    printf("simd:    %s\n", qf_isa_name(qf_get_isa()));
#ifndef QF_BLAS_BLIS
    {
        const char *core = openblas_get_corename();
        printf("blas:    OpenBLAS, %s kernels\n", core);
        int avx512_core = !strcasecmp(core, "SkylakeX") || !strcasecmp(core, "Cooperlake") ||
                          !strcasecmp(core, "SapphireRapids");
        if (qf_get_isa() == QF_ISA_AVX512 && !avx512_core)
            printf("note:    this CPU has AVX-512 but OpenBLAS runs %s kernels (linear layers up to 5x\n"
                   "         slower); export OPENBLAS_CORETYPE=SkylakeX before starting (docs/blas.md)\n", core);
    }
#endif
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static int cmd_inspect(int argc, char **argv) {
    if (argc != 1) return usage_error("inspect takes one FILE%s", "");
    const char *path = argv[0];
    if (ends_with(path, ".npy")) {
        qf_npy a;
        if (qf_npy_read(path, &a) != QF_OK) return fail("inspect");
        printf("%s: %s ", path, qf_dtype_name(a.dtype));
        print_shape(a.shape, a.ndim);
        printf(" %zu bytes\n", a.nbytes);
        qf_npy_free(&a);
        return 0;
    }
    qf_safetensors *f;
    if (qf_st_open(path, &f) != QF_OK) return fail("inspect");
    int n = qf_st_count(f);
    size_t total = 0;
    printf("%s: %d tensors\n", path, n);
    for (int i = 0; i < n; i++) {
        qf_tensor_view t;
        if (qf_st_get(f, i, &t) != QF_OK) { qf_st_close(f); return fail("inspect"); }
        printf("  %-48s %-5s ", t.name, qf_dtype_name(t.dtype));
        print_shape(t.shape, t.ndim);
        printf("\n");
        total += t.nbytes;
    }
    printf("total %zu bytes of tensor data\n", total);
    qf_st_close(f);
    return 0;
}

/* Loads a float array as float32 (converting F64/F16/BF16); bool/u8 stay as bytes. */
static int load_npy(const char *flag, const char *path, qf_npy *a) {
    if (!path) return usage_error("sdpa needs %s", flag);
    if (qf_npy_read(path, a) != QF_OK) return fail(flag);
    if (a->dtype == QF_F64 || a->dtype == QF_F16 || a->dtype == QF_BF16) {
        size_t n = a->nbytes / qf_dtype_size(a->dtype);
        float *f = malloc(n * sizeof *f + 1);
        if (!f) { fprintf(stderr, "qfuse: out of memory\n"); return 1; }
        qf_to_f32(a->dtype, a->data, f, n);
        free(a->data);
        a->data = f;
        a->dtype = QF_F32;
        a->nbytes = n * sizeof *f;
    }
    return 0;
}

static void as_4d(const qf_npy *a, int64_t s[4]) {
    if (a->ndim == 3) { s[0] = 1; s[1] = a->shape[0]; s[2] = a->shape[1]; s[3] = a->shape[2]; }
    else memcpy(s, a->shape, 4 * sizeof *s);
}

static int cmd_sdpa(int argc, char **argv) {
    const char *qp = NULL, *kp = NULL, *vp = NULL, *mp = NULL, *op = NULL, *wp = NULL;
    int causal = 0;
    float scale = NAN;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = !strcmp(a, "--q") ? &qp : !strcmp(a, "--k") ? &kp : !strcmp(a, "--v") ? &vp
                         : !strcmp(a, "--mask") ? &mp : !strcmp(a, "--out") ? &op : !strcmp(a, "--weights") ? &wp : NULL;
        if (dst) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            *dst = argv[++i];
        } else if (!strcmp(a, "--causal")) causal = 1;
        else if (!strcmp(a, "--scale")) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            char *end;
            scale = strtof(argv[++i], &end);
            if (*end) return usage_error("--scale: not a number: %s", argv[i]);
        } else return usage_error("sdpa: unknown option %s", a);
    }
    qf_npy q = {0}, k = {0}, v = {0}, m = {0};
    int rc = load_npy("--q", qp, &q);
    if (!rc) rc = load_npy("--k", kp, &k);
    if (!rc) rc = load_npy("--v", vp, &v);
    if (!rc && mp) rc = load_npy("--mask", mp, &m);
    float *out = NULL, *weights = NULL;
    if (rc) goto done;
    for (const qf_npy *t = &q; t; t = t == &q ? &k : t == &k ? &v : NULL)
        if (t->dtype != QF_F32 || (t->ndim != 3 && t->ndim != 4)) {
            rc = usage_error("sdpa: q, k and v must be float arrays of 3 or 4 dims%s", "");
            goto done;
        }
    if (q.ndim != k.ndim || q.ndim != v.ndim) { rc = usage_error("sdpa: q, k, v must have the same rank%s", ""); goto done; }
    int64_t qs[4], ks[4], vs[4];
    as_4d(&q, qs); as_4d(&k, ks); as_4d(&v, vs);
    qf_sdpa_params p = qf_sdpa_defaults(qs[0], qs[1], ks[1], qs[2], ks[2], qs[3]);
    p.Dv = vs[3];
    p.is_causal = causal;
    p.scale = scale;
    if (ks[0] != qs[0] || vs[0] != qs[0] || vs[1] != ks[1] || vs[2] != ks[2] || ks[3] != qs[3]) {
        fprintf(stderr, "qfuse: sdpa: shapes do not agree: q [%lld,%lld,%lld,%lld] k [%lld,%lld,%lld,%lld] v [%lld,%lld,%lld,%lld]\n",
                (long long)qs[0], (long long)qs[1], (long long)qs[2], (long long)qs[3], (long long)ks[0], (long long)ks[1],
                (long long)ks[2], (long long)ks[3], (long long)vs[0], (long long)vs[1], (long long)vs[2], (long long)vs[3]);
        rc = 1;
        goto done;
    }
    if (mp) {
        p.mask.kind = m.dtype == QF_F32 ? QF_MASK_FLOAT : (m.dtype == QF_BOOL || m.dtype == QF_U8) ? QF_MASK_BOOL : QF_MASK_NONE;
        if (p.mask.kind == QF_MASK_NONE) { rc = usage_error("--mask must be bool, uint8 or float%s", ""); goto done; }
        p.mask.data = m.data;
        p.mask.ndim = m.ndim;
        memcpy(p.mask.shape, m.shape, sizeof p.mask.shape);
        if (m.ndim > 4) { rc = usage_error("--mask has more than 4 dims%s", ""); goto done; }
    }
    size_t n_out = (size_t)(p.B * p.Hq * p.L * p.Dv);
    out = malloc(n_out * sizeof *out);
    if (wp) weights = malloc((size_t)(p.B * p.Hq * p.L * p.S) * sizeof *weights);
    if (!out || (wp && !weights)) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (qf_sdpa_forward(&p, q.data, k.data, v.data, out, NULL, weights) != QF_OK) { rc = fail("sdpa"); goto done; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6, sum = 0;
    for (size_t i = 0; i < n_out; i++) sum += out[i];
    printf("sdpa: out [%lld,%lld,%lld,%lld]  %.3f ms  %d threads  %s  sum %.6g\n", (long long)p.B, (long long)p.Hq,
           (long long)p.L, (long long)p.Dv, ms, qf_get_num_threads(), qf_isa_name(qf_get_isa()), sum);
    int64_t oshape[4] = {p.B, p.Hq, p.L, p.Dv}, wshape[4] = {p.B, p.Hq, p.L, p.S};
    int off = q.ndim == 3; /* 3-D in, 3-D out */
    if (op && qf_npy_write(op, QF_F32, q.ndim, oshape + off, out) != QF_OK) { rc = fail("--out"); goto done; }
    if (wp && qf_npy_write(wp, QF_F32, q.ndim, wshape + off, weights) != QF_OK) { rc = fail("--weights"); goto done; }
done:
    qf_npy_free(&q); qf_npy_free(&k); qf_npy_free(&v); qf_npy_free(&m);
    free(out);
    free(weights);
    return rc;
}

/* ---- qfuse fuse ------------------------------------------------------------------------------
 * Loads MODEL (a Hugging Face folder), dispatches on config.json's model_type, checks every input
 * array's shape against the model's config before a pointer reaches the library (the model
 * calls take raw buffers), runs one forward, prints shapes and timing, and writes the tokens
 * (.npy) and the head-averaged cross-attention of one layer for the first batch item (.png). */

static const char *fuse_help =
    "usage: qfuse fuse MODEL [options]\n"
    "\n"
    "MODEL is a folder with config.json + model.safetensors; its model_type picks the path:\n"
    "  blip_2_qformer, instructblip_qformer   bare Q-Former: --features and --queries\n"
    "  blip-2, instructblip                   image -> vision tower -> Q-Former -> language_projection:\n"
    "                                         --image or --pixels (or --features: Q-Former output only)\n"
    "  affectgpt_prefusion                    AffectGPT pre-fusion: --audio and/or --face\n"
    "  affectgpt_video_qformer                AffectGPT video Q-Former: --face (or --features), frames\n"
    "                                         [B,T,input_dim] or [B,T,K,input_dim] (K tokens per frame)\n"
    "  affectgpt_audio_qformer                AffectGPT audio Q-Former: --audio (or --features) [B,T,input_dim]\n"
    "  affectgpt_attention_fusion             AffectGPT attention fusion: --audio and --face; prints the two\n"
    "                                         modality weights per item (it has no attention map)\n"
    "  blip2_kv_prefix                        KV-prefix BLIP-2: --features and --global\n"
    "\n"
    "inputs (.npy, float32/float64/float16; a leading batch dim B is optional):\n"
    "  --features F.npy      encoder hidden states [B,S,encoder_hidden_size] (video/audio Q-Former: the frames)\n"
    "  --mask M.npy          encoder attention mask [B,S] (nonzero = real token; with --features of a\n"
    "                        video/audio Q-Former: the frame mask [B,T])\n"
    "  --queries Q.npy       query embeddings [B or 1,Lq,hidden] (KV-prefix: default its query_tokens)\n"
    "  --image X.png         PNG/JPEG, preprocessed like BlipImageProcessor (MODEL/preprocessor_config.json\n"
    "                        when present, else bicubic to vision_config.image_size, CLIP mean/std)\n"
    "  --pixels P.npy        already preprocessed pixel_values [B,3,H,W]\n"
    "  --text-ids T.npy      InstructBLIP instruction token ids [B,Lt] (integers), --text-mask M.npy\n"
    "  --audio A.npy         audio frame features [B,ta,audio_dim]   (--audio-mask [B,ta])\n"
    "  --face F.npy          face frame features [B,tf,video_dim]    (--face-mask [B,tf]); the video\n"
    "                        Q-Former also takes [B,tf,K,video_dim] (mask per frame, all K tokens)\n"
    "  --global G.npy        global feature [B,prefix_feature_dim] for the KV prefix\n"
    "outputs:\n"
    "  --out T.npy           the fused tokens, float32 [B,tokens,width]\n"
    "  --project             KV-prefix: map the tokens through language_projection\n"
    "  --attn-png MAP.png    cross-attention of one layer (first batch item, averaged over heads): queries\n"
    "                        down, keys across, viridis min..max; white columns separate modalities\n"
    "                        (face|audio in fusion order for the pre-fusion, prefix|features for KV-prefix;\n"
    "                        none for the video/audio Q-Formers, whose keys are T*K frame tokens);\n"
    "                        not for affectgpt_attention_fusion (no attention map: its weights are printed)\n"
    "  --layer N             which cross-attention layer (0-based, counting cross-attention layers only;\n"
    "                        default: the last)\n"
    "  --cell PX             heatmap cell size in pixels (default 8)\n"
    "  --threads N           worker threads (also: qfuse --threads N fuse ...)\n"
    "\n"
    "device (a libqfuse built with make CUDA=1 and a GPU; otherwise --device cuda fails with the reason):\n"
    "  --device cpu|cuda     where the fusion model runs (default cpu). cuda runs the whole forward on\n"
    "                        the GPU: BLIP-2 / InstructBLIP (vision tower, Q-Former, language_projection),\n"
    "                        a bare Q-Former, affectgpt_prefusion, blip2_kv_prefix (and --project), the\n"
    "                        video/audio Q-Formers (frame projection and position rows too) and\n"
    "                        affectgpt_attention_fusion (its time means and MLP). Not with --attn-png\n"
    "                        (the attention maps are computed on the CPU). The first forward of a shape\n"
    "                        also captures it as a CUDA graph, so its time includes the capture.\n"
    "  --dtype float32|bfloat16   GPU weights (cuda only; default float32): bfloat16 GEMM weights with\n"
    "                        float32 accumulation and activations\n"
    "\n"
    "examples:\n"
    "  qfuse fuse qformer/ --features vit.npy --queries q.npy --out tokens.npy --attn-png map.png\n"
    "  qfuse fuse blip2/ --image cat.jpg --out tokens.npy\n"
    "  qfuse fuse affectgpt/ --audio a.npy --face f.npy --out tokens.npy --attn-png map.png --layer 0\n"
    "  qfuse fuse video_qformer/ --face frames.npy --face-mask fm.npy --out tokens.npy --attn-png map.png\n"
    "  qfuse fuse attention_fusion/ --audio a.npy --face f.npy --out tokens.npy\n"
    "  qfuse fuse kv_prefix/ --features f.npy --global g.npy --project --out tokens.npy --device cuda\n";

typedef struct {
    const char *model, *features, *mask, *queries, *image, *pixels, *text_ids, *text_mask;
    const char *audio, *face, *audio_mask, *face_mask, *global, *out, *attn_png;
    const char *device, *dtype;     /* "cpu" | "cuda"; "float32" | "bfloat16" (checked in cmd_fuse) */
    int layer, cell, project;
} fuse_opts;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Reads a float array as float32 [B, d1, d2] (ndim 3) or [B, d1] (ndim 2); the leading batch dim
 * may be missing (B = 1). ndim FRAMES_NDIM reads frames: a 4-D file as [B,T,K,D], anything else
 * as ndim 3 (so a 3-D file is [B,T,D], never [T,K,D]). dims[] receives B and the rest. */
enum { FRAMES_NDIM = -1 };
static int fuse_read_f32(const char *flag, const char *path, int ndim, qf_npy *a, int64_t dims[4]) {
    if (qf_npy_read(path, a) != QF_OK) return fail(flag);
    if (a->dtype == QF_F64 || a->dtype == QF_F16 || a->dtype == QF_BF16) {
        size_t n = a->nbytes / qf_dtype_size(a->dtype);
        float *f = malloc(n * sizeof *f + 1);
        if (!f) { fprintf(stderr, "qfuse: out of memory\n"); return 1; }
        qf_to_f32(a->dtype, a->data, f, n);
        free(a->data);
        a->data = f;
        a->dtype = QF_F32;
        a->nbytes = n * sizeof *f;
    }
    if (a->dtype != QF_F32) {
        fprintf(stderr, "qfuse: fuse: %s %s holds %s: expected a float array\n", flag, path, qf_dtype_name(a->dtype));
        return 2;
    }
    if (ndim == FRAMES_NDIM) ndim = a->ndim == 4 ? 4 : 3; /* [B,T,K,D] or [B,T,D] (or [T,D]) */
    if (a->ndim != ndim && a->ndim != ndim - 1) {
        fprintf(stderr, "qfuse: fuse: %s %s has %d dims: expected %d (or %d without the batch dim)\n", flag, path,
                a->ndim, ndim, ndim - 1);
        return 2;
    }
    int off = ndim - a->ndim;
    dims[0] = 1;
    for (int i = 0; i < a->ndim; i++) dims[i + off] = a->shape[i];
    return 0;
}

/* Reads an integer/bool array as uint8 (nonzero -> 1) or int32 (ids), 2-D [B,T] or 1-D [T]. */
static int fuse_read_int(const char *flag, const char *path, int as_u8, qf_npy *a, int64_t dims[2]) {
    if (qf_npy_read(path, a) != QF_OK) return fail(flag);
    size_t n = 1;
    for (int i = 0; i < a->ndim; i++) n *= (size_t)a->shape[i];
    if (a->ndim != 1 && a->ndim != 2) {
        fprintf(stderr, "qfuse: fuse: %s %s has %d dims: expected [B,T] or [T]\n", flag, path, a->ndim);
        return 2;
    }
    void *dst = malloc(n * (as_u8 ? 1 : 4) + 1);
    if (!dst) { fprintf(stderr, "qfuse: out of memory\n"); return 1; }
    for (size_t i = 0; i < n; i++) {
        int64_t v;
        switch (a->dtype) {
        case QF_BOOL: case QF_U8: v = ((const uint8_t *)a->data)[i]; break;
        case QF_I8: v = ((const int8_t *)a->data)[i]; break;
        case QF_I16: v = ((const int16_t *)a->data)[i]; break;
        case QF_I32: v = ((const int32_t *)a->data)[i]; break;
        case QF_I64: v = ((const int64_t *)a->data)[i]; break;
        case QF_F32: v = (int64_t)((const float *)a->data)[i]; break;
        case QF_F64: v = (int64_t)((const double *)a->data)[i]; break;
        default:
            free(dst);
            fprintf(stderr, "qfuse: fuse: %s %s holds %s: expected integers or booleans\n", flag, path,
                    qf_dtype_name(a->dtype));
            return 2;
        }
        if (as_u8) ((uint8_t *)dst)[i] = v != 0;
        else ((int32_t *)dst)[i] = (int32_t)v;
    }
    free(a->data);
    a->data = dst;
    a->dtype = as_u8 ? QF_U8 : QF_I32;
    a->nbytes = n * (as_u8 ? 1 : 4);
    dims[0] = a->ndim == 2 ? a->shape[0] : 1;
    dims[1] = a->shape[a->ndim - 1];
    return 0;
}

static int fuse_shape_error(const char *what, const char *path, const int64_t *got, int n, const char *want) {
    fprintf(stderr, "qfuse: fuse: %s %s has shape [", what, path);
    for (int i = 0; i < n; i++) fprintf(stderr, i ? ",%lld" : "%lld", (long long)got[i]);
    fprintf(stderr, "] but the model needs %s\n", want);
    return 2;
}

/* An option that this model type does not read is a usage error, not silently ignored. */
static int fuse_reject(const char *flag, const char *value, const char *model_type) {
    if (!value) return 0;
    fprintf(stderr, "qfuse: fuse: %s is not used by %s models (see `qfuse fuse --help`)\n", flag, model_type);
    return 2;
}

static void print_dims(const char *label, const int64_t *d, int n) {
    printf("  %-10s [", label);
    for (int i = 0; i < n; i++) printf(i ? ",%lld" : "%lld", (long long)d[i]);
    printf("]\n");
}

/* The head-averaged cross-attention of `layer` for item 0 as a PNG. keys = prefix + encoder. */
static int fuse_heatmap(qf_qformer *qf, const fuse_opts *o, int64_t B, int64_t Lq, int64_t keys,
                        const int64_t *bounds, int nb) {
    int n_cross = qf_qformer_num_cross_layers(qf);
    int layer = o->layer < 0 ? n_cross - 1 : o->layer;
    if (layer < 0 || layer >= n_cross) {
        fprintf(stderr, "qfuse: fuse: --layer %d: the model has %d cross-attention layers (0..%d)\n", o->layer,
                n_cross, n_cross - 1);
        return 2;
    }
    float *w = malloc((size_t)(B * Lq * keys) * sizeof *w);
    if (!w) { fprintf(stderr, "qfuse: out of memory\n"); return 1; }
    int rc = 0;
    if (qf_qformer_cross_attention(qf, layer, 1, w) != QF_OK) rc = fail("--attn-png");
    else if (qf_heatmap_png(o->attn_png, w, Lq, keys, o->cell, bounds, nb) != QF_OK) rc = fail("--attn-png");
    else {
        printf("attention: cross-attention layer %d of %d, item 0, [%lld queries x %lld keys]", layer, n_cross,
               (long long)Lq, (long long)keys);
        for (int i = 0; i < nb; i++) printf("%s%lld", i ? "," : ", separators before key ", (long long)bounds[i]);
        printf(" -> %s\n", o->attn_png);
    }
    free(w);
    return rc;
}

static int fuse_write(const char *path, const float *out, int64_t B, int64_t T, int64_t W) {
    int64_t shape[3] = {B, T, W};
    print_dims("out", shape, 3);
    double sum = 0;
    for (int64_t i = 0; i < B * T * W; i++) sum += out[i];
    printf("  checksum   %.6g\n", sum);
    if (path) {
        if (qf_npy_write(path, QF_F32, 3, shape, out) != QF_OK) return fail("--out");
        printf("wrote %s\n", path);
    }
    return 0;
}

/* --device cuda: places the model (through its *_to_device, given as place(model, device,
 * weights)) and says what runs where; --device cpu: nothing to do. */
static int fuse_place(const fuse_opts *o, const char *what, qf_status (*place)(void *, const char *, qf_dtype),
                      void *model) {
    if (strcmp(o->device, "cuda")) return 0;
    const qf_dtype w = strcmp(o->dtype, "bfloat16") ? QF_F32 : QF_BF16;
    if (place(model, "cuda", w) != QF_OK) return fail("--device cuda");
    printf("device: %s on the GPU (cuda), %s weights\n", what, o->dtype);
    return 0;
}
static qf_status place_qformer(void *m, const char *d, qf_dtype w) { return qf_qformer_to_device(m, d, w); }
static qf_status place_prefusion(void *m, const char *d, qf_dtype w) { return qf_prefusion_to_device(m, d, w); }
static qf_status place_kvprefix(void *m, const char *d, qf_dtype w) { return qf_kvprefix_to_device(m, d, w); }
static qf_status place_blip2(void *m, const char *d, qf_dtype w) { return qf_blip2_to_device(m, d, w); }
static qf_status place_modality(void *m, const char *d, qf_dtype w) { return qf_modality_qformer_to_device(m, d, w); }
static qf_status place_attn_fusion(void *m, const char *d, qf_dtype w) { return qf_attn_fusion_to_device(m, d, w); }

/* blip_2_qformer / instructblip_qformer */
static int fuse_qformer(const fuse_opts *o, const char *type) {
    int rc = fuse_reject("--image", o->image, type) | fuse_reject("--pixels", o->pixels, type) |
             fuse_reject("--audio", o->audio, type) | fuse_reject("--face", o->face, type) |
             fuse_reject("--global", o->global, type) | fuse_reject("--project", o->project ? "" : NULL, type) |
             fuse_reject("--text-ids", o->text_ids, type);
    if (rc) return rc;
    if (!o->features || !o->queries)
        return usage_error("fuse: a bare Q-Former needs --features F.npy and --queries Q.npy (it has no query "
                           "tokens of its own)%s", "");
    qf_npy f = {0}, q = {0}, m = {0};
    int64_t fd[4], qd[4], md[2];
    float *out = NULL, *qb = NULL;
    qf_qformer *qf = NULL;
    double t0 = now_ms();
    if (qf_qformer_load(o->model, &qf) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_qformer_config c;
    qf_qformer_get_config(qf, &c);
    if ((rc = fuse_place(o, "the Q-Former", place_qformer, qf))) goto done;
    if ((rc = fuse_read_f32("--features", o->features, 3, &f, fd))) goto done;
    if ((rc = fuse_read_f32("--queries", o->queries, 3, &q, qd))) goto done;
    if (fd[2] != c.encoder_hidden_size) {
        char want[64];
        snprintf(want, sizeof want, "[B,S,%lld] (encoder_hidden_size)", (long long)c.encoder_hidden_size);
        rc = fuse_shape_error("--features", o->features, fd, 3, want);
        goto done;
    }
    int64_t B = fd[0], S = fd[1], Lq = qd[1];
    if (qd[2] != c.hidden_size || (qd[0] != B && qd[0] != 1)) {
        char want[80];
        snprintf(want, sizeof want, "[%lld or 1,Lq,%lld] (hidden_size)", (long long)B, (long long)c.hidden_size);
        rc = fuse_shape_error("--queries", o->queries, qd, 3, want);
        goto done;
    }
    if (o->mask) {
        if ((rc = fuse_read_int("--mask", o->mask, 1, &m, md))) goto done;
        if (md[0] != B || md[1] != S) {
            char want[64];
            snprintf(want, sizeof want, "[%lld,%lld] like the features", (long long)B, (long long)S);
            rc = fuse_shape_error("--mask", o->mask, md, 2, want);
            goto done;
        }
    }
    qb = malloc((size_t)(B * Lq * c.hidden_size) * sizeof *qb);
    out = malloc((size_t)(B * Lq * c.hidden_size) * sizeof *out);
    if (!qb || !out) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    for (int64_t b = 0; b < B; b++) /* queries [1,Lq,H] are shared by every item */
        memcpy(qb + b * Lq * c.hidden_size, (const float *)q.data + (qd[0] == 1 ? 0 : b) * Lq * c.hidden_size,
               (size_t)(Lq * c.hidden_size) * sizeof *qb);
    qf_qformer_args a = {.B = B, .num_queries = Lq, .encoder_len = S, .encoder_attention_mask = m.data};
    t0 = now_ms();
    if (qf_qformer_forward(qf, &a, qb, f.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
    double t_fwd = now_ms() - t0;
    printf("%s: %lld layers, hidden %lld, %lld heads, cross-attention every %lld; load %.1f ms, forward %.3f ms, "
           "%d threads\n", type, (long long)c.num_hidden_layers, (long long)c.hidden_size,
           (long long)c.num_attention_heads, (long long)c.cross_attention_frequency, t_load, t_fwd,
           qf_get_num_threads());
    print_dims("features", fd, 3);
    print_dims("queries", qd, 3);
    if ((rc = fuse_write(o->out, out, B, Lq, c.hidden_size))) goto done;
    if (o->attn_png) rc = fuse_heatmap(qf, o, B, Lq, S, NULL, 0);
done:
    qf_npy_free(&f); qf_npy_free(&q); qf_npy_free(&m);
    free(out); free(qb);
    qf_qformer_free(qf);
    return rc;
}

/* blip-2 / instructblip: image or pixels through the whole model; features: Q-Former only */
static int fuse_blip2(const fuse_opts *o, const char *type) {
    int rc = fuse_reject("--audio", o->audio, type) | fuse_reject("--face", o->face, type) |
             fuse_reject("--global", o->global, type) | fuse_reject("--project", o->project ? "" : NULL, type) |
             fuse_reject("--queries", o->queries, type);
    if (rc) return rc;
    if (!!o->image + !!o->pixels + !!o->features != 1)
        return usage_error("fuse: %s models need exactly one of --image, --pixels, --features", type);
    qf_npy px = {0}, f = {0}, m = {0}, ids = {0}, tm = {0};
    float *pixels = NULL, *out = NULL, *qb = NULL;
    uint8_t *rgb = NULL;
    qf_blip2 *model = NULL;
    double t0 = now_ms();
    if (qf_blip2_load(o->model, &model) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_qformer *qf = qf_blip2_qformer(model);
    qf_vision_config vc;
    qf_qformer_config c;
    qf_vision_get_config(qf_blip2_vision(model), &vc);
    qf_qformer_get_config(qf, &c);
    if ((rc = fuse_place(o, "the whole BLIP-2 fuse (vision tower, Q-Former, language_projection)", place_blip2,
                         model)))
        goto done;
    int64_t nq = qf_blip2_num_query_tokens(model), D = qf_blip2_projection_dim(model), B = 1, Lt = 0;
    int64_t S = qf_vision_num_tokens(qf_blip2_vision(model)), d4[4];
    if (o->text_ids) {
        int64_t td[2];
        if ((rc = fuse_read_int("--text-ids", o->text_ids, 0, &ids, td))) goto done;
        Lt = td[1];
        if (o->text_mask && (rc = fuse_read_int("--text-mask", o->text_mask, 1, &tm, td))) goto done;
    }
    if (o->image) {
        char cfg[4096];
        snprintf(cfg, sizeof cfg, "%s/preprocessor_config.json", o->model);
        FILE *probe = fopen(cfg, "r");
        if (probe) fclose(probe);
        qf_image_preproc pp;
        int64_t w, h;
        if (qf_image_preproc_load(probe ? cfg : NULL, vc.image_size, &pp) != QF_OK) { rc = fail("--image"); goto done; }
        if (pp.size_h != vc.image_size || pp.size_w != vc.image_size) {
            fprintf(stderr, "qfuse: fuse: %s resizes to %lldx%lld but vision_config.image_size is %lld\n", cfg,
                    (long long)pp.size_h, (long long)pp.size_w, (long long)vc.image_size);
            rc = 1;
            goto done;
        }
        if (qf_image_load(o->image, &w, &h, &rgb) != QF_OK) { rc = fail("--image"); goto done; }
        pixels = malloc((size_t)(3 * vc.image_size * vc.image_size) * sizeof *pixels);
        if (!pixels) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
        t0 = now_ms();
        if (qf_image_preprocess(&pp, rgb, w, h, pixels) != QF_OK) { rc = fail("--image"); goto done; }
        printf("image: %s %lldx%lld -> pixel_values [1,3,%lld,%lld] (%s, %.1f ms)\n", o->image, (long long)w,
               (long long)h, (long long)vc.image_size, (long long)vc.image_size,
               probe ? "preprocessor_config.json" : "BlipImageProcessor defaults", now_ms() - t0);
    } else if (o->pixels) {
        if ((rc = fuse_read_f32("--pixels", o->pixels, 4, &px, d4))) goto done;
        if (d4[1] != vc.num_channels || d4[2] != vc.image_size || d4[3] != vc.image_size) {
            char want[64];
            snprintf(want, sizeof want, "[B,%lld,%lld,%lld]", (long long)vc.num_channels, (long long)vc.image_size,
                     (long long)vc.image_size);
            rc = fuse_shape_error("--pixels", o->pixels, d4, 4, want);
            goto done;
        }
        B = d4[0];
        pixels = px.data;
        px.data = NULL;
    }
    if (Lt && ids.ndim == 2 && ids.shape[0] != B && !o->features) {
        fprintf(stderr, "qfuse: fuse: --text-ids has %lld rows but the batch is %lld\n", (long long)ids.shape[0],
                (long long)B);
        rc = 2;
        goto done;
    }
    if (!o->features) {
        out = malloc((size_t)(B * nq * D) * sizeof *out);
        if (!out) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
        t0 = now_ms();
        if (qf_blip2_fuse(model, B, pixels, Lt, ids.data, tm.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
        double t_fwd = now_ms() - t0;
        printf("%s: vision %lld layers (%lld tokens of %lld), Q-Former %lld layers, %lld queries -> %lld; load %.1f "
               "ms, forward %.3f ms, %d threads\n", type, (long long)vc.num_hidden_layers, (long long)S,
               (long long)vc.hidden_size, (long long)c.num_hidden_layers, (long long)nq, (long long)D, t_load, t_fwd,
               qf_get_num_threads());
        int64_t pd[4] = {B, vc.num_channels, vc.image_size, vc.image_size};
        print_dims("pixels", pd, 4);
        if ((rc = fuse_write(o->out, out, B, nq, D))) goto done;
    } else { /* the Q-Former alone on given encoder states, with the model's query tokens */
        if (Lt) { rc = usage_error("fuse: --text-ids goes with --image or --pixels%s", ""); goto done; }
        if ((rc = fuse_read_f32("--features", o->features, 3, &f, d4))) goto done;
        if (d4[2] != c.encoder_hidden_size) {
            char want[64];
            snprintf(want, sizeof want, "[B,S,%lld] (encoder_hidden_size)", (long long)c.encoder_hidden_size);
            rc = fuse_shape_error("--features", o->features, d4, 3, want);
            goto done;
        }
        B = d4[0];
        S = d4[1];
        qf_param qt = {0};
        for (int i = 0; i < qf_blip2_num_params(model); i++)
            if (qf_blip2_param(model, i, &qt) == QF_OK && !strcmp(qt.name, "query_tokens")) break;
            else qt.name = NULL;
        if (!qt.name) { fprintf(stderr, "qfuse: fuse: %s has no query_tokens parameter\n", o->model); rc = 1; goto done; }
        if (o->mask) {
            int64_t md[2];
            if ((rc = fuse_read_int("--mask", o->mask, 1, &m, md))) goto done;
            if (md[0] != B || md[1] != S) { rc = fuse_shape_error("--mask", o->mask, md, 2, "[B,S] like the features"); goto done; }
        }
        size_t per = (size_t)(nq * c.hidden_size);
        qb = malloc((size_t)B * per * sizeof *qb);
        out = malloc((size_t)B * per * sizeof *out);
        if (!qb || !out) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
        for (int64_t b = 0; b < B; b++) memcpy(qb + b * per, qt.data, per * sizeof *qb);
        qf_qformer_args a = {.B = B, .num_queries = nq, .encoder_len = S, .encoder_attention_mask = m.data};
        t0 = now_ms();
        if (qf_qformer_forward(qf, &a, qb, f.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
        printf("%s: Q-Former alone on --features (no vision tower, no language_projection); forward %.3f ms, %d "
               "threads\n", type, now_ms() - t0, qf_get_num_threads());
        print_dims("features", d4, 3);
        if ((rc = fuse_write(o->out, out, B, nq, c.hidden_size))) goto done;
    }
    if (o->attn_png) rc = fuse_heatmap(qf, o, B, nq, S, NULL, 0);
done:
    qf_npy_free(&px); qf_npy_free(&f); qf_npy_free(&m); qf_npy_free(&ids); qf_npy_free(&tm);
    free(pixels); free(out); free(qb); free(rgb);
    qf_blip2_free(model);
    return rc;
}

/* affectgpt_prefusion */
static int fuse_prefusion(const fuse_opts *o, const char *type) {
    int rc = fuse_reject("--image", o->image, type) | fuse_reject("--pixels", o->pixels, type) |
             fuse_reject("--features", o->features, type) | fuse_reject("--global", o->global, type) |
             fuse_reject("--queries", o->queries, type) | fuse_reject("--mask", o->mask, type) |
             fuse_reject("--project", o->project ? "" : NULL, type) | fuse_reject("--text-ids", o->text_ids, type);
    if (rc) return rc;
    if (!o->audio && !o->face) return usage_error("fuse: %s models need --audio and/or --face", type);
    qf_npy au = {0}, fa = {0}, am = {0}, fm = {0};
    int64_t ad[4] = {0}, fd[4] = {0};
    float *out = NULL;
    qf_prefusion *model = NULL;
    double t0 = now_ms();
    if (qf_prefusion_load(o->model, &model) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_prefusion_config c;
    qf_prefusion_get_config(model, &c);
    if ((rc = fuse_place(o, "the whole pre-fusion (projections, Q-Former, LLM projection)", place_prefusion, model)))
        goto done;
    if (o->audio) {
        if ((rc = fuse_read_f32("--audio", o->audio, 3, &au, ad))) goto done;
        if (ad[2] != c.audio_dim) { rc = fuse_shape_error("--audio", o->audio, ad, 3, "[B,ta,audio_dim]"); goto done; }
    }
    if (o->face) {
        if ((rc = fuse_read_f32("--face", o->face, 3, &fa, fd))) goto done;
        if (fd[2] != c.video_dim) { rc = fuse_shape_error("--face", o->face, fd, 3, "[B,tf,video_dim]"); goto done; }
    }
    int64_t B = o->audio ? ad[0] : fd[0], ta = o->audio ? ad[1] : 0, tf = o->face ? fd[1] : 0;
    if (o->audio && o->face && ad[0] != fd[0]) {
        fprintf(stderr, "qfuse: fuse: --audio has batch %lld but --face %lld\n", (long long)ad[0], (long long)fd[0]);
        rc = 2;
        goto done;
    }
    if (o->audio_mask) {
        int64_t md[2];
        if ((rc = fuse_read_int("--audio-mask", o->audio_mask, 1, &am, md))) goto done;
        if (md[0] != B || md[1] != ta) { rc = fuse_shape_error("--audio-mask", o->audio_mask, md, 2, "[B,ta]"); goto done; }
    }
    if (o->face_mask) {
        int64_t md[2];
        if ((rc = fuse_read_int("--face-mask", o->face_mask, 1, &fm, md))) goto done;
        if (md[0] != B || md[1] != tf) { rc = fuse_shape_error("--face-mask", o->face_mask, md, 2, "[B,tf]"); goto done; }
    }
    out = malloc((size_t)(B * c.num_multi_query_token * c.llm_hidden_size) * sizeof *out);
    if (!out) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    qf_prefusion_args a = {.B = B, .audio_len = ta, .face_len = tf, .audio_mask = am.data, .face_mask = fm.data};
    t0 = now_ms();
    if (qf_prefusion_forward(model, &a, au.data, fa.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
    double t_fwd = now_ms() - t0;
    printf("%s: %lld queries over %s (%lld face + %lld audio frames) -> %lld; load %.1f ms, forward %.3f ms, %d "
           "threads\n", type, (long long)c.num_multi_query_token, c.face_first ? "face|audio" : "audio|face",
           (long long)tf, (long long)ta, (long long)c.llm_hidden_size, t_load, t_fwd, qf_get_num_threads());
    if (o->audio) print_dims("audio", ad, 3);
    if (o->face) print_dims("face", fd, 3);
    if ((rc = fuse_write(o->out, out, B, c.num_multi_query_token, c.llm_hidden_size))) goto done;
    if (o->attn_png) {
        int64_t bound = c.face_first ? tf : ta;
        rc = fuse_heatmap(qf_prefusion_qformer(model), o, B, c.num_multi_query_token, ta + tf, &bound,
                          ta > 0 && tf > 0);
    }
done:
    qf_npy_free(&au); qf_npy_free(&fa); qf_npy_free(&am); qf_npy_free(&fm);
    free(out);
    qf_prefusion_free(model);
    return rc;
}

/* affectgpt_video_qformer / affectgpt_audio_qformer: one modality's frames. The frames come from
 * --face (video) or --audio (audio), or --features for either; the mask from the matching
 * --face-mask / --audio-mask (or --mask next to --features). */
static int fuse_modality(const fuse_opts *o, const char *type, int video) {
    const char *own = video ? "--face" : "--audio", *own_mask = video ? "--face-mask" : "--audio-mask";
    const char *frames = video ? o->face : o->audio, *fmask = video ? o->face_mask : o->audio_mask;
    int rc = fuse_reject("--image", o->image, type) | fuse_reject("--pixels", o->pixels, type) |
             fuse_reject("--global", o->global, type) | fuse_reject("--queries", o->queries, type) |
             fuse_reject("--project", o->project ? "" : NULL, type) | fuse_reject("--text-ids", o->text_ids, type) |
             fuse_reject(video ? "--audio" : "--face", video ? o->audio : o->face, type) |
             fuse_reject(video ? "--audio-mask" : "--face-mask", video ? o->audio_mask : o->face_mask, type);
    if (rc) return rc;
    if (frames && o->features) {
        fprintf(stderr, "qfuse: fuse: give the frames once: %s or --features, not both\n", own);
        return 2;
    }
    if (fmask && o->mask) {
        fprintf(stderr, "qfuse: fuse: give the frame mask once: %s or --mask, not both\n", own_mask);
        return 2;
    }
    const char *flag = frames ? own : "--features", *mflag = fmask ? own_mask : "--mask";
    if (!frames) frames = o->features;
    if (!fmask) fmask = o->mask;
    if (!frames) {
        fprintf(stderr, "qfuse: fuse: %s models need %s F.npy (or --features F.npy): frames [B,T,input_dim]%s\n",
                type, own, video ? " or [B,T,K,input_dim]" : "");
        return 2;
    }
    qf_npy x = {0}, m = {0};
    int64_t d[4] = {0}, md[2];
    float *out = NULL;
    qf_modality_qformer *model = NULL;
    double t0 = now_ms();
    if (qf_modality_qformer_load(o->model, &model) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_modality_qformer_config c;
    qf_modality_qformer_get_config(model, &c);
    if ((rc = fuse_place(o, "the whole modality Q-Former (frame projection, position rows, Q-Former, LLM "
                            "projection)", place_modality, model)))
        goto done;
    if ((rc = fuse_read_f32(flag, frames, video ? FRAMES_NDIM : 3, &x, d))) goto done;
    int nd = x.ndim == 4 ? 4 : 3;
    int64_t B = d[0], T = d[1], K = nd == 4 ? d[2] : 1;
    if (d[nd - 1] != c.input_dim || T < 1 || K < 1) {
        char want[96];
        snprintf(want, sizeof want, "[B,T,%s%lld] (input_dim)", video ? "(K,)" : "", (long long)c.input_dim);
        rc = fuse_shape_error(flag, frames, d, nd, want);
        goto done;
    }
    if (T > c.frame_position_size) {
        char want[96];
        snprintf(want, sizeof want, "T <= %lld frames (frame_position_size: rows of its position table)",
                 (long long)c.frame_position_size);
        rc = fuse_shape_error(flag, frames, d, nd, want);
        goto done;
    }
    if (fmask) {
        if ((rc = fuse_read_int(mflag, fmask, 1, &m, md))) goto done;
        if (md[0] != B || md[1] != T) {
            char want[64];
            snprintf(want, sizeof want, "[%lld,%lld]: one flag per frame", (long long)B, (long long)T);
            rc = fuse_shape_error(mflag, fmask, md, 2, want);
            goto done;
        }
    }
    out = malloc((size_t)(B * c.num_query_token * c.llm_hidden_size) * sizeof *out);
    if (!out) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    qf_modality_qformer_args a = {.B = B, .frames = T, .tokens_per_frame = K, .frame_mask = m.data};
    t0 = now_ms();
    if (qf_modality_qformer_forward(model, &a, x.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
    double t_fwd = now_ms() - t0;
    printf("%s: %lld queries over %lld %s frames x %lld tokens -> %lld; load %.1f ms, forward %.3f ms, %d threads\n",
           type, (long long)c.num_query_token, (long long)T, video ? "video" : "audio", (long long)K,
           (long long)c.llm_hidden_size, t_load, t_fwd, qf_get_num_threads());
    print_dims(video ? "face" : "audio", d, nd);
    if ((rc = fuse_write(o->out, out, B, c.num_query_token, c.llm_hidden_size))) goto done;
    if (o->attn_png) rc = fuse_heatmap(qf_modality_qformer_qformer(model), o, B, c.num_query_token, T * K, NULL, 0);
done:
    qf_npy_free(&x); qf_npy_free(&m);
    free(out);
    qf_modality_qformer_free(model);
    return rc;
}

/* affectgpt_attention_fusion: time means of --audio and --face, weighted by two learned scalars
 * per item; there is no attention map, so the weights are printed instead. */
static int fuse_attention(const fuse_opts *o, const char *type) {
    int rc = fuse_reject("--image", o->image, type) | fuse_reject("--pixels", o->pixels, type) |
             fuse_reject("--features", o->features, type) | fuse_reject("--global", o->global, type) |
             fuse_reject("--queries", o->queries, type) | fuse_reject("--mask", o->mask, type) |
             fuse_reject("--project", o->project ? "" : NULL, type) | fuse_reject("--text-ids", o->text_ids, type);
    if (rc) return rc;
    if (o->attn_png) {
        fprintf(stderr, "qfuse: fuse: --attn-png: %s models have no cross-attention to draw (the fusion is two "
                "learned modality weights per item, printed by every run); drop --attn-png\n", type);
        return 2;
    }
    if (!o->audio || !o->face) return usage_error("fuse: %s models need both --audio and --face", type);
    qf_npy au = {0}, fa = {0}, am = {0}, fm = {0};
    int64_t ad[4] = {0}, fd[4] = {0}, md[2];
    float *out = NULL, *w = NULL;
    qf_attn_fusion *model = NULL;
    double t0 = now_ms();
    if (qf_attn_fusion_load(o->model, &model) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_attn_fusion_config c;
    qf_attn_fusion_get_config(model, &c);
    if ((rc = fuse_place(o, "the whole attention fusion (time means, MLP, weighted sum)", place_attn_fusion, model)))
        goto done;
    if ((rc = fuse_read_f32("--audio", o->audio, 3, &au, ad))) goto done;
    if (ad[2] != c.audio_dim) { rc = fuse_shape_error("--audio", o->audio, ad, 3, "[B,ta,audio_dim]"); goto done; }
    if ((rc = fuse_read_f32("--face", o->face, 3, &fa, fd))) goto done;
    if (fd[2] != c.video_dim) { rc = fuse_shape_error("--face", o->face, fd, 3, "[B,tf,video_dim]"); goto done; }
    int64_t B = ad[0], ta = ad[1], tf = fd[1];
    if (fd[0] != B) {
        fprintf(stderr, "qfuse: fuse: --audio has batch %lld but --face %lld\n", (long long)B, (long long)fd[0]);
        rc = 2;
        goto done;
    }
    if (ta < 1 || tf < 1) {
        fprintf(stderr, "qfuse: fuse: %s needs at least one frame of each modality (audio %lld, face %lld)\n", type,
                (long long)ta, (long long)tf);
        rc = 2;
        goto done;
    }
    if (o->audio_mask) {
        if ((rc = fuse_read_int("--audio-mask", o->audio_mask, 1, &am, md))) goto done;
        if (md[0] != B || md[1] != ta) { rc = fuse_shape_error("--audio-mask", o->audio_mask, md, 2, "[B,ta]"); goto done; }
    }
    if (o->face_mask) {
        if ((rc = fuse_read_int("--face-mask", o->face_mask, 1, &fm, md))) goto done;
        if (md[0] != B || md[1] != tf) { rc = fuse_shape_error("--face-mask", o->face_mask, md, 2, "[B,tf]"); goto done; }
    }
    out = malloc((size_t)(B * c.num_multi_query_token * c.llm_hidden_size) * sizeof *out);
    w = malloc((size_t)(2 * B) * sizeof *w);
    if (!out || !w) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    qf_prefusion_args a = {.B = B, .audio_len = ta, .face_len = tf, .audio_mask = am.data, .face_mask = fm.data};
    t0 = now_ms();
    if (qf_attn_fusion_forward(model, &a, au.data, fa.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
    double t_fwd = now_ms() - t0;
    if (qf_attn_fusion_weights(model, w) != QF_OK) { rc = fail("fuse"); goto done; }
    printf("%s: time means of %lld face + %lld audio frames, weighted sum -> %lld x %lld (rows equal); load %.1f "
           "ms, forward %.3f ms, %d threads\n", type, (long long)tf, (long long)ta,
           (long long)c.num_multi_query_token, (long long)c.llm_hidden_size, t_load, t_fwd, qf_get_num_threads());
    print_dims("audio", ad, 3);
    print_dims("face", fd, 3);
    if ((rc = fuse_write(o->out, out, B, c.num_multi_query_token, c.llm_hidden_size))) goto done;
    printf("modality weights (fc_att output, no softmax):\n");
    for (int64_t b = 0; b < B; b++)
        printf("  item %lld: face %.6g audio %.6g\n", (long long)b, (double)w[2 * b], (double)w[2 * b + 1]);
done:
    qf_npy_free(&au); qf_npy_free(&fa); qf_npy_free(&am); qf_npy_free(&fm);
    free(out); free(w);
    qf_attn_fusion_free(model);
    return rc;
}

/* blip2_kv_prefix */
static int fuse_kvprefix(const fuse_opts *o, const char *type) {
    int rc = fuse_reject("--image", o->image, type) | fuse_reject("--pixels", o->pixels, type) |
             fuse_reject("--audio", o->audio, type) | fuse_reject("--face", o->face, type) |
             fuse_reject("--text-ids", o->text_ids, type);
    if (rc) return rc;
    if (!o->features || !o->global) return usage_error("fuse: %s models need --features and --global", type);
    qf_npy f = {0}, g = {0}, q = {0}, m = {0};
    int64_t fd[4], gd[4], qd[4], md[2];
    float *out = NULL, *proj = NULL, *qb = NULL;
    qf_kvprefix *model = NULL;
    double t0 = now_ms();
    if (qf_kvprefix_load(o->model, &model) != QF_OK) return fail("fuse");
    double t_load = now_ms() - t0;
    qf_kvprefix_shape sh;
    qf_qformer_config c;
    qf_kvprefix_get_shape(model, &sh);
    qf_qformer_get_config(qf_kvprefix_qformer(model), &c);
    if ((rc = fuse_place(o, "the whole KV-prefix model (prefix MLP and K/V, Q-Former, language_projection)",
                         place_kvprefix, model)))
        goto done;
    if ((rc = fuse_read_f32("--features", o->features, 3, &f, fd))) goto done;
    if (fd[2] != c.encoder_hidden_size) { rc = fuse_shape_error("--features", o->features, fd, 3, "[B,S,encoder_hidden_size]"); goto done; }
    int64_t B = fd[0], S = fd[1], nq = sh.num_query_tokens, H = sh.hidden_size, P = sh.num_prefix_tokens;
    if ((rc = fuse_read_f32("--global", o->global, 2, &g, gd))) goto done;
    if (gd[0] != B || gd[1] != sh.prefix_feature_dim) { rc = fuse_shape_error("--global", o->global, gd, 2, "[B,prefix_feature_dim]"); goto done; }
    if (o->queries) {
        if ((rc = fuse_read_f32("--queries", o->queries, 3, &q, qd))) goto done;
        if ((qd[0] != B && qd[0] != 1) || qd[2] != H) { rc = fuse_shape_error("--queries", o->queries, qd, 3, "[B or 1,Lq,hidden]"); goto done; }
        nq = qd[1];
        qb = malloc((size_t)(B * nq * H) * sizeof *qb);
        if (!qb) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
        for (int64_t b = 0; b < B; b++)
            memcpy(qb + b * nq * H, (const float *)q.data + (qd[0] == 1 ? 0 : b) * nq * H, (size_t)(nq * H) * sizeof *qb);
    }
    if (o->mask) {
        if ((rc = fuse_read_int("--mask", o->mask, 1, &m, md))) goto done;
        if (md[0] != B || md[1] != S) { rc = fuse_shape_error("--mask", o->mask, md, 2, "[B,S] like the features"); goto done; }
    }
    if (o->project && sh.projection_dim <= 0) {
        fprintf(stderr, "qfuse: fuse: --project: %s has no language_projection\n", o->model);
        rc = 1;
        goto done;
    }
    out = malloc((size_t)(B * nq * H) * sizeof *out);
    if (o->project) proj = malloc((size_t)(B * nq * sh.projection_dim) * sizeof *proj);
    if (!out || (o->project && !proj)) { fprintf(stderr, "qfuse: out of memory\n"); rc = 1; goto done; }
    qf_qformer_args a = {.B = B, .num_queries = nq, .encoder_len = S, .encoder_attention_mask = m.data};
    t0 = now_ms();
    if (qf_kvprefix_forward(model, &a, g.data, qb, f.data, out) != QF_OK) { rc = fail("fuse"); goto done; }
    if (o->project && qf_kvprefix_project(model, B * nq, out, proj) != QF_OK) { rc = fail("fuse"); goto done; }
    double t_fwd = now_ms() - t0;
    printf("%s: %lld prefix tokens in every cross-attention layer, %lld queries; load %.1f ms, forward %.3f ms, %d "
           "threads\n", type, (long long)P, (long long)nq, t_load, t_fwd, qf_get_num_threads());
    print_dims("features", fd, 3);
    print_dims("global", gd, 2);
    if ((rc = o->project ? fuse_write(o->out, proj, B, nq, sh.projection_dim) : fuse_write(o->out, out, B, nq, H)))
        goto done;
    if (o->attn_png) rc = fuse_heatmap(qf_kvprefix_qformer(model), o, B, nq, P + S, &P, P > 0);
done:
    qf_npy_free(&f); qf_npy_free(&g); qf_npy_free(&q); qf_npy_free(&m);
    free(out); free(proj); free(qb);
    qf_kvprefix_free(model);
    return rc;
}

static int cmd_fuse(int argc, char **argv) {
    fuse_opts o;
    memset(&o, 0, sizeof o);
    o.layer = -1;
    o.cell = 8;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(fuse_help, stdout); return 0; }
        const char **dst = !strcmp(a, "--features") ? &o.features : !strcmp(a, "--mask") ? &o.mask
                         : !strcmp(a, "--queries") ? &o.queries : !strcmp(a, "--image") ? &o.image
                         : !strcmp(a, "--pixels") ? &o.pixels : !strcmp(a, "--text-ids") ? &o.text_ids
                         : !strcmp(a, "--text-mask") ? &o.text_mask : !strcmp(a, "--audio") ? &o.audio
                         : !strcmp(a, "--face") ? &o.face : !strcmp(a, "--audio-mask") ? &o.audio_mask
                         : !strcmp(a, "--face-mask") ? &o.face_mask : !strcmp(a, "--global") ? &o.global
                         : !strcmp(a, "--out") ? &o.out : !strcmp(a, "--attn-png") ? &o.attn_png
                         : !strcmp(a, "--device") ? &o.device : !strcmp(a, "--dtype") ? &o.dtype : NULL;
        if (dst) {
            if (i + 1 >= argc) return usage_error("fuse: %s needs a value", a);
            *dst = argv[++i];
        } else if (!strcmp(a, "--project")) o.project = 1;
        else if (!strcmp(a, "--layer") || !strcmp(a, "--cell") || !strcmp(a, "--threads")) {
            if (i + 1 >= argc) return usage_error("fuse: %s needs a value", a);
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0 || v > 1000000) return usage_error("fuse: expected a count, got %s", argv[i]);
            if (!strcmp(a, "--layer")) o.layer = (int)v;
            else if (!strcmp(a, "--cell")) o.cell = (int)v;
            else if (qf_set_num_threads((int)v) != QF_OK) return fail("--threads");
        } else if (a[0] == '-') return usage_error("fuse: unknown option %s (see `qfuse fuse --help`)", a);
        else if (!o.model) o.model = a;
        else return usage_error("fuse: one MODEL folder only; extra argument %s", a);
    }
    if (!o.model) { fputs(fuse_help, stderr); return 2; }
    if (!o.device) o.device = "cpu";
    if (strcmp(o.device, "cpu") && strcmp(o.device, "cuda"))
        return usage_error("fuse: --device: expected cpu or cuda, got %s", o.device);
    if (o.dtype) {
        if (!strcmp(o.dtype, "bf16")) o.dtype = "bfloat16";
        if (!strcmp(o.dtype, "f32")) o.dtype = "float32";
        if (strcmp(o.dtype, "float32") && strcmp(o.dtype, "bfloat16"))
            return usage_error("fuse: --dtype: expected float32 or bfloat16, got %s", o.dtype);
        if (!strcmp(o.dtype, "bfloat16") && strcmp(o.device, "cuda"))
            return usage_error("fuse: --dtype bfloat16 needs --device cuda (the CPU runs float32 weights)%s", "");
    } else o.dtype = "float32";
    if (o.attn_png && !strcmp(o.device, "cuda"))
        return usage_error("fuse: --attn-png needs --device cpu: the attention maps are computed on the CPU "
                           "(a GPU model keeps none)%s", "");
    /* before any model is loaded: a build without CUDA or a machine without a GPU says so at once */
    if (!strcmp(o.device, "cuda") && qf_cuda_init() != QF_OK) return fail("--device cuda");
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", o.model);
    qf_config *cfg;
    if (qf_config_load(path, &cfg) != QF_OK) return fail("fuse");
    const char *mt = NULL;
    if (qf_config_string(cfg, "model_type", &mt) != QF_OK) { qf_config_free(cfg); return fail("fuse"); }
    char type[64];
    snprintf(type, sizeof type, "%s", mt);
    qf_config_free(cfg);
    if (!strcmp(type, "blip_2_qformer") || !strcmp(type, "instructblip_qformer")) return fuse_qformer(&o, type);
    if (!strcmp(type, "blip-2") || !strcmp(type, "instructblip")) return fuse_blip2(&o, type);
    if (!strcmp(type, "affectgpt_prefusion")) return fuse_prefusion(&o, type);
    if (!strcmp(type, "blip2_kv_prefix")) return fuse_kvprefix(&o, type);
    if (!strcmp(type, "affectgpt_video_qformer")) return fuse_modality(&o, type, 1);
    if (!strcmp(type, "affectgpt_audio_qformer")) return fuse_modality(&o, type, 0);
    if (!strcmp(type, "affectgpt_attention_fusion")) return fuse_attention(&o, type);
    fprintf(stderr, "qfuse: fuse: %s: model_type \"%s\" is not a fusion model qfuse runs (blip_2_qformer, "
            "instructblip_qformer, blip-2, instructblip, affectgpt_prefusion, blip2_kv_prefix, "
            "affectgpt_video_qformer, affectgpt_audio_qformer, affectgpt_attention_fusion)\n", path, type);
    return 1;
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { fputs(usage_text, stdout); return 0; }
        if (!strcmp(argv[i], "--version")) { printf("qfuse %s\n", QFUSE_VERSION); return 0; }
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || qf_set_num_threads((int)n) != QF_OK) return usage_error("--threads: expected a count >= 1, got %s", argv[i]);
        } else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            const char *s = argv[++i];
            qf_isa isa = !strcmp(s, "scalar") ? QF_ISA_SCALAR : !strcmp(s, "avx2") ? QF_ISA_AVX2 : !strcmp(s, "avx512") ? QF_ISA_AVX512 : (qf_isa)-1;
            if ((int)isa < 0) return usage_error("--isa: expected scalar, avx2 or avx512, got %s", s);
            if (qf_set_isa(isa) != QF_OK) return fail("--isa");
        } else return usage_error("unknown option %s", argv[i]);
    }
    if (i >= argc) { fputs(usage_text, stderr); return 2; }
    const char *cmd = argv[i++];
    if (!strcmp(cmd, "help")) { fputs(usage_text, stdout); return 0; }
    if (!strcmp(cmd, "info")) return cmd_info();
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - i, argv + i);
    if (!strcmp(cmd, "sdpa")) return cmd_sdpa(argc - i, argv + i);
    if (!strcmp(cmd, "fuse")) return cmd_fuse(argc - i, argv + i);
    if (!strcmp(cmd, "run")) return cmd_run(argc - i, argv + i);     /* src/cli/run.c */
    return usage_error("unknown command '%s'", cmd);
}
