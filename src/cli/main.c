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
    "qfuse " QFUSE_VERSION " - attention-based multimodal fusion engine (CPU)\n"
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
    "  help                      this text\n"
    "\n"
    "environment:\n"
    "  QFUSE_THREADS=N           worker threads (default: all cores)\n"
    "  QFUSE_ISA=scalar|avx2     force a slower SIMD path (for testing)\n"
    "\n"
    "examples:\n"
    "  qfuse inspect model.safetensors\n"
    "  qfuse sdpa --q q.npy --k k.npy --v v.npy --causal --out o.npy\n"
    "\n"
    "The attention benchmark (qfuse vs PyTorch) is `make bench`; see README.md.\n";

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
    return usage_error("unknown command '%s'", cmd);
}
