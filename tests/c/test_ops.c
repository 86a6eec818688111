/* test_ops.c - the basic ops of qfuse_ops.h: every backward against central finite differences
 * of its forward (loss = sum(out * g), accumulated in double, h = 1e-3 on small sizes,
 * tolerance 1e-2 relative to the largest gradient), on every SIMD path this CPU has; the SIMD
 * paths against the scalar path; accumulate-vs-overwrite contracts; argument errors.
 * (Comparisons with PyTorch itself are in tests/python/test_ops.py.) */
#include "testutil.h"
#include <stdint.h>

/* ---- small helpers ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static void fill(float *x, int n, float scale) { for (int i = 0; i < n; i++) x[i] = frand() * scale; }

typedef double (*loss_fn)(void *ctx);

/* Central differences of loss() with respect to x[0..n), compared with `analytic`. */
static double fd_err(float *x, int n, const float *analytic, loss_fn loss, void *ctx) {
    const float h = 1e-3f;
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        float save = x[i];
        x[i] = save + h;
        double lp = loss(ctx);
        x[i] = save - h;
        double lm = loss(ctx);
        x[i] = save;
        double d = (lp - lm) / (2.0 * (double)h);
        if (fabs(d - analytic[i]) > num) num = fabs(d - analytic[i]);
        if (fabs(analytic[i]) > den) den = fabs(analytic[i]);
    }
    return den > 0 ? num / den : num;
}

static double dot(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

#define FD_TOL 1e-2
#define CHECK_FD(name, x, n, an, loss, ctx)                                                      \
    do {                                                                                         \
        double e_ = fd_err((x), (n), (an), (loss), (ctx));                                      \
        CHECK(e_ < FD_TOL);                                                                      \
        if (!(e_ < FD_TOL)) fprintf(stderr, "  %s [%s]: finite-difference rel err %.3g\n", (name), \
                                    qf_isa_name(qf_get_isa()), e_);                              \
    } while (0)

/* ---- linear ---- */
enum { LN = 3, LI = 5, LO = 4 };
typedef struct { float in[LN * LI], w[LO * LI], b[LO], out[LN * LO], g[LN * LO]; } lin_ctx;
static double lin_loss(void *p) {
    lin_ctx *c = p;
    qf_linear_forward(c->out, c->in, c->w, c->b, LN, LI, LO);
    return dot(c->out, c->g, LN * LO);
}
static void test_linear(void) {
    lin_ctx c;
    fill(c.in, LN * LI, 1); fill(c.w, LO * LI, 1); fill(c.b, LO, 1); fill(c.g, LN * LO, 1);
    float d_in[LN * LI], d_w[LO * LI] = {0}, d_b[LO] = {0};
    CHECK_OK(qf_linear_backward(d_in, d_w, d_b, c.g, c.in, c.w, LN, LI, LO));
    CHECK_FD("linear d_in", c.in, LN * LI, d_in, lin_loss, &c);
    CHECK_FD("linear d_weight", c.w, LO * LI, d_w, lin_loss, &c);
    CHECK_FD("linear d_bias", c.b, LO, d_b, lin_loss, &c);
    /* parameter grads accumulate: a second call doubles them; d_in is overwritten */
    float d_w2[LO * LI], d_b2[LO], d_in2[LN * LI];
    memcpy(d_w2, d_w, sizeof d_w);
    memcpy(d_b2, d_b, sizeof d_b);
    for (int i = 0; i < LN * LI; i++) d_in2[i] = 1e30f;
    CHECK_OK(qf_linear_backward(d_in2, d_w2, d_b2, c.g, c.in, c.w, LN, LI, LO));
    int ok = 1;
    for (int i = 0; i < LO * LI; i++) ok &= fabsf(d_w2[i] - 2 * d_w[i]) <= 1e-5f * (1 + fabsf(d_w[i]));
    for (int i = 0; i < LO; i++) ok &= fabsf(d_b2[i] - 2 * d_b[i]) <= 1e-5f * (1 + fabsf(d_b[i]));
    for (int i = 0; i < LN * LI; i++) ok &= d_in2[i] == d_in[i];
    CHECK(ok);
    /* NULL bias forward = no bias; NULL outputs in backward are skipped */
    CHECK_OK(qf_linear_forward(c.out, c.in, c.w, NULL, LN, LI, LO));
    CHECK_OK(qf_linear_backward(NULL, NULL, NULL, c.g, NULL, NULL, LN, LI, LO));
    CHECK_ERR(qf_linear_forward(NULL, c.in, c.w, NULL, LN, LI, LO), QF_ERR_ARG, "out is NULL");
    CHECK_ERR(qf_linear_forward(c.out, c.in, c.w, NULL, LN, 0, LO), QF_ERR_ARG, "Cin = 0");
    CHECK_ERR(qf_linear_forward(c.out, c.in, c.w, NULL, (int64_t)1 << 40, LI, LO), QF_ERR_ARG, "fit in int");
    CHECK_ERR(qf_linear_backward(d_in, NULL, NULL, c.g, c.in, NULL, LN, LI, LO), QF_ERR_ARG, "weight is NULL");
}

/* ---- layer norm ---- */
enum { NN = 3, NC = 21 }; /* C not a multiple of 8 or 16: exercises the SIMD tails */
typedef struct { float in[NN * NC], w[NC], b[NC], out[NN * NC], g[NN * NC], mean[NN], rstd[NN]; } ln_ctx;
static double ln_loss(void *p) {
    ln_ctx *c = p;
    qf_layernorm_forward(c->out, c->mean, c->rstd, c->in, c->w, c->b, NN, NC, 1e-5f);
    return dot(c->out, c->g, NN * NC);
}
static void test_layernorm(void) {
    ln_ctx c;
    fill(c.in, NN * NC, 2); fill(c.w, NC, 1); fill(c.b, NC, 1); fill(c.g, NN * NC, 1);
    CHECK_OK(qf_layernorm_forward(c.out, c.mean, c.rstd, c.in, c.w, c.b, NN, NC, 1e-5f));
    float d_in[NN * NC], d_w[NC] = {0}, d_b[NC] = {0};
    CHECK_OK(qf_layernorm_backward(d_in, d_w, d_b, c.g, c.in, c.w, c.mean, c.rstd, NN, NC));
    CHECK_FD("layernorm d_in", c.in, NN * NC, d_in, ln_loss, &c);
    CHECK_FD("layernorm d_weight", c.w, NC, d_w, ln_loss, &c);
    CHECK_FD("layernorm d_bias", c.b, NC, d_b, ln_loss, &c);
    CHECK_ERR(qf_layernorm_forward(c.out, NULL, NULL, c.in, NULL, NULL, NN, NC, NAN), QF_ERR_ARG, "eps");
    CHECK_ERR(qf_layernorm_backward(d_in, NULL, NULL, c.g, c.in, NULL, NULL, c.rstd, NN, NC), QF_ERR_ARG,
              "mean is NULL");
}

/* ---- gelu ---- */
enum { GN = 37 };
typedef struct { float in[GN], out[GN], g[GN]; qf_gelu_kind kind; } gelu_ctx;
static double gelu_loss(void *p) {
    gelu_ctx *c = p;
    qf_gelu_forward(c->out, c->in, GN, c->kind);
    return dot(c->out, c->g, GN);
}
static void test_gelu(void) {
    for (int k = 0; k < 2; k++) {
        gelu_ctx c;
        c.kind = (qf_gelu_kind)k;
        fill(c.in, GN, 4); fill(c.g, GN, 1);
        float d_in[GN];
        CHECK_OK(qf_gelu_backward(d_in, c.g, c.in, GN, c.kind));
        CHECK_FD(k ? "gelu(tanh) d_in" : "gelu(erf) d_in", c.in, GN, d_in, gelu_loss, &c);
    }
    float x[4] = {1, 2, 3, 4};
    CHECK_ERR(qf_gelu_forward(x, x, 4, (qf_gelu_kind)5), QF_ERR_ARG, "kind = 5");
    CHECK_ERR(qf_gelu_forward(x, NULL, 4, QF_GELU_ERF), QF_ERR_ARG, "in is NULL");
    CHECK_ERR(qf_gelu_backward(x, x, x, -3, QF_GELU_TANH), QF_ERR_ARG, "n must be >= 1");
}

/* ---- softmax ---- */
enum { SN = 4, SC = 19 };
typedef struct { float in[SN * SC], out[SN * SC], g[SN * SC]; } sm_ctx;
static double sm_loss(void *p) {
    sm_ctx *c = p;
    qf_softmax_forward(c->out, c->in, SN, SC);
    return dot(c->out, c->g, SN * SC);
}
static void test_softmax(void) {
    sm_ctx c;
    fill(c.in, SN * SC, 3); fill(c.g, SN * SC, 1);
    CHECK_OK(qf_softmax_forward(c.out, c.in, SN, SC));
    float d_in[SN * SC];
    CHECK_OK(qf_softmax_backward(d_in, c.g, c.out, SN, SC));
    CHECK_FD("softmax d_in", c.in, SN * SC, d_in, sm_loss, &c);
    /* rows sum to 1; -inf gets 0; an all -inf row gives zeros */
    float x[2 * 5] = {-INFINITY, 1, 2, -INFINITY, 0, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    float y[10];
    CHECK_OK(qf_softmax_forward(y, x, 2, 5));
    CHECK(y[0] == 0 && y[3] == 0 && fabsf(y[1] + y[2] + y[4] - 1) < 1e-6f);
    int zeros = 1;
    for (int i = 5; i < 10; i++) zeros &= y[i] == 0;
    CHECK(zeros);
    CHECK_ERR(qf_softmax_forward(y, x, 0, 5), QF_ERR_ARG, "N = 0");
}

/* ---- dropout ---- */
static void test_dropout(void) {
    enum { n = 1000 };
    static float x[n], y[n], g[n], d[n];
    fill(x, n, 1); fill(g, n, 1);
    const float p = 0.3f;
    CHECK_OK(qf_dropout_forward(y, x, n, p, 1234, 7));
    CHECK_OK(qf_dropout_backward(d, g, n, p, 1234, 7));
    int ok = 1, kept = 0;
    for (int i = 0; i < n; i++) {
        int keep = qf_philox_uniform(1234, 7, (uint64_t)i) >= p;
        kept += keep;
        ok &= y[i] == (keep ? x[i] * (1.0f / (1.0f - p)) : 0.0f);
        ok &= d[i] == (keep ? g[i] * (1.0f / (1.0f - p)) : 0.0f);
    }
    CHECK(ok);
    CHECK(kept > 620 && kept < 780); /* 700 expected; 5 sigma is ~72 */
    CHECK_OK(qf_dropout_forward(y, x, n, 0.0f, 1, 2));
    CHECK(memcmp(x, y, sizeof x) == 0);
    CHECK_ERR(qf_dropout_forward(y, x, n, 1.0f, 1, 2), QF_ERR_ARG, "p = 1");
    CHECK_ERR(qf_dropout_backward(d, g, n, -0.5f, 1, 2), QF_ERR_ARG, "p = -0.5");
    CHECK_ERR(qf_dropout_forward(y, x, n, NAN, 1, 2), QF_ERR_ARG, "expected 0 <= p < 1");
}

/* ---- embedding ---- */
enum { EV = 6, EC = 5, EN = 7 };
typedef struct { float table[EV * EC], out[EN * EC], g[EN * EC]; int32_t ids[EN]; } emb_ctx;
static double emb_loss(void *p) {
    emb_ctx *c = p;
    qf_embedding_forward(c->out, c->ids, c->table, EN, EV, EC);
    return dot(c->out, c->g, EN * EC);
}
static void test_embedding(void) {
    emb_ctx c = {.ids = {0, 3, 3, 5, 1, 3, 0}};
    fill(c.table, EV * EC, 1); fill(c.g, EN * EC, 1);
    float d_t[EV * EC] = {0};
    CHECK_OK(qf_embedding_backward(d_t, c.g, c.ids, EN, EV, EC));
    CHECK_FD("embedding d_table", c.table, EV * EC, d_t, emb_loss, &c);
    float out[EN * EC];
    for (int i = 0; i < EN * EC; i++) out[i] = 42.0f;
    c.ids[4] = 6;
    CHECK_ERR(qf_embedding_forward(out, c.ids, c.table, EN, EV, EC), QF_ERR_ARG,
              "ids[4] = 6 is out of range for a table of 6 rows");
    CHECK(out[0] == 42.0f); /* nothing written before the check */
    c.ids[4] = -2;
    CHECK_ERR(qf_embedding_backward(d_t, c.g, c.ids, EN, EV, EC), QF_ERR_ARG, "ids[4] = -2");
}

/* ---- residual ---- */
static void test_residual(void) {
    float a[5] = {1, 2, 3, 4, 5}, b[5] = {5, 4, 3, 2, 1}, g[5] = {1, -1, 2, -2, 3}, da[5], db[5];
    CHECK_OK(qf_residual_forward(a, a, b, 5)); /* in place */
    int ok = 1;
    for (int i = 0; i < 5; i++) ok &= a[i] == 6.0f;
    CHECK(ok);
    CHECK_OK(qf_residual_backward(da, db, g, 5));
    CHECK(memcmp(da, g, sizeof g) == 0 && memcmp(db, g, sizeof g) == 0);
    CHECK_OK(qf_residual_backward(NULL, g, g, 5));
    CHECK_ERR(qf_residual_forward(a, NULL, b, 5), QF_ERR_ARG, "a is NULL");
    CHECK_ERR(qf_residual_forward(a, a, b, 0), QF_ERR_ARG, "n must be >= 1");
}

/* ---- SIMD paths vs scalar on larger, ragged sizes ---- */
static double max_rel(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (d > num || d != d) num = d;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    return den > 0 ? num / den : num;
}

static void run_all(float *outs[8], const float *x, const float *w, const float *b, const float *g,
                    int N, int C) {
    float mean[64], rstd[64];
    memset(outs[2], 0, (size_t)C * 4);
    memset(outs[3], 0, (size_t)C * 4);
    qf_layernorm_forward(outs[0], mean, rstd, x, w, b, N, C, 1e-5f);
    qf_layernorm_backward(outs[1], outs[2], outs[3], g, x, w, mean, rstd, N, C);
    qf_softmax_forward(outs[4], x, N, C);
    qf_softmax_backward(outs[5], g, outs[4], N, C);
    qf_gelu_forward(outs[6], x, (int64_t)N * C, QF_GELU_ERF);
    qf_gelu_backward(outs[7], g, x, (int64_t)N * C, QF_GELU_TANH);
}

static void test_paths_agree(void) {
    enum { N = 64, C = 203 };
    static float x[N * C], w[C], b[C], g[N * C], ref[8][N * C], got[8][N * C];
    fill(x, N * C, 4); fill(w, C, 1); fill(b, C, 1); fill(g, N * C, 1);
    const size_t n[8] = {N * C, N * C, C, C, N * C, N * C, N * C, N * C};
    static const char *names[8] = {"layernorm out", "layernorm d_in", "layernorm d_weight", "layernorm d_bias",
                                   "softmax out", "softmax d_in", "gelu(erf) out", "gelu(tanh) d_in"};
    float *r[8], *o[8];
    for (int i = 0; i < 8; i++) { r[i] = ref[i]; o[i] = got[i]; }
    qf_isa best = qf_get_isa();
    CHECK_OK(qf_set_isa(QF_ISA_SCALAR));
    run_all(r, x, w, b, g, N, C);
    for (int isa = QF_ISA_AVX2; isa <= QF_ISA_AVX512; isa++) {
        if (qf_set_isa((qf_isa)isa) != QF_OK) continue; /* CPU lacks it */
        run_all(o, x, w, b, g, N, C);
        for (int i = 0; i < 8; i++) {
            double e = max_rel(o[i], r[i], n[i]);
            CHECK(e < 2e-6);
            if (!(e < 2e-6)) fprintf(stderr, "  %s: %s vs scalar rel err %.3g\n", names[i], qf_isa_name((qf_isa)isa), e);
        }
    }
    qf_set_isa(best);
}

int main(void) {
    qf_isa best = qf_get_isa();
    for (int isa = QF_ISA_SCALAR; isa <= QF_ISA_AVX512; isa++) {
        if (qf_set_isa((qf_isa)isa) != QF_OK) continue;
        test_layernorm();
        test_gelu();
        test_softmax();
    }
    qf_set_isa(best);
    test_linear();
    test_dropout();
    test_embedding();
    test_residual();
    test_paths_agree();
    TEST_MAIN_END("test_ops");
}
