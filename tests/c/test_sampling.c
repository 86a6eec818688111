/* test_sampling.c - the C side of qf_sample_token and qf_text_stream: defaults, argument errors
 * (each message names the argument), properties that need no reference (greedy = argmax found
 * by a plain loop; top_k = 1 draws the argmax for every counter; the draw repeats for a repeated
 * (seed, counter)), and a long stream whose pieces must join to qf_tokenizer_decode of all ids
 * (the decoder is checked against the `tokenizers` library in test_tokenizer.c). The processed
 * logits and the draw distribution are checked against PyTorch in tests/python/test_sampling.py. */
#include "testutil.h"

#define BPE_JSON "tests/fixtures/tokenizer_bpe/tokenizer.json"

static void test_defaults_and_errors(void) {
    qf_sampling s = qf_sampling_defaults();
    CHECK(s.do_sample == 0 && s.temperature == 1.0f && s.top_k == 0 && s.top_p == 1.0f &&
          s.repetition_penalty == 1.0f && s.seed == 0);
    float x[4] = {0.1f, 0.3f, -2.0f, 0.3f};
    int32_t id = 7, h[2] = {1, 4};
    CHECK_ERR(qf_sample_token(NULL, x, 4, NULL, 0, 0, &id), QF_ERR_ARG, "s is NULL");
    CHECK_ERR(qf_sample_token(&s, NULL, 4, NULL, 0, 0, &id), QF_ERR_ARG, "logits is NULL");
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, NULL), QF_ERR_ARG, "out_id is NULL");
    CHECK_ERR(qf_sample_token(&s, x, 0, NULL, 0, 0, &id), QF_ERR_ARG, "V = 0");
    CHECK(id == -1);
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 2, 0, &id), QF_ERR_ARG, "history is NULL");
    CHECK_ERR(qf_sample_token(&s, x, 4, h, 2, 0, &id), QF_ERR_ARG, "history[1] = 4");
    CHECK_ERR(qf_sample_token(&s, x, 4, h, -1, 0, &id), QF_ERR_ARG, "n_history");
    s.temperature = -1.0f;
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, &id), QF_ERR_ARG, "temperature = -1");
    s = qf_sampling_defaults();
    s.top_p = 0.0f;
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, &id), QF_ERR_ARG, "top_p = 0");
    s = qf_sampling_defaults();
    s.top_k = -3;
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, &id), QF_ERR_ARG, "top_k = -3");
    s = qf_sampling_defaults();
    s.repetition_penalty = INFINITY;
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, &id), QF_ERR_ARG, "repetition_penalty = inf");
    s = qf_sampling_defaults();
    x[2] = NAN;
    CHECK_ERR(qf_sample_token(&s, x, 4, NULL, 0, 0, &id), QF_ERR_NONFINITE, "logits[2] is NaN");
    x[2] = -INFINITY;
    CHECK_OK(qf_sample_token(&s, x, 4, NULL, 0, 0, &id));
    CHECK(id == 1); /* the first of the two maxima */
}

static void test_properties(void) {
    enum { V = 5000 };
    static float x[V], y[V];
    uint32_t r = 12345;
    for (int i = 0; i < V; i++) {
        r = r * 1103515245u + 12345u;
        x[i] = (float)((r >> 8) % 20000) / 1000.0f - 10.0f; /* ties likely */
    }
    int best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    qf_sampling s = qf_sampling_defaults();
    int32_t id;
    memcpy(y, x, sizeof x);
    CHECK_OK(qf_sample_token(&s, y, V, NULL, 0, 0, &id));
    CHECK(id == best);
    CHECK(!memcmp(x, y, sizeof x)); /* greedy without a penalty leaves the logits as they were */
    s.do_sample = 1;
    s.top_k = 1;
    s.temperature = 3.0f;
    int same = 1;
    for (uint64_t c = 0; c < 50; c++) {
        memcpy(y, x, sizeof x);
        CHECK_OK(qf_sample_token(&s, y, V, NULL, 0, c, &id));
        same &= id == best;
    }
    CHECK(same);
    s = qf_sampling_defaults();
    s.do_sample = 1;
    s.seed = 99;
    int32_t a, b;
    memcpy(y, x, sizeof x);
    CHECK_OK(qf_sample_token(&s, y, V, NULL, 0, 1234, &a));
    memcpy(y, x, sizeof x);
    CHECK_OK(qf_sample_token(&s, y, V, NULL, 0, 1234, &b));
    CHECK(a == b);
}

static void test_stream(void) {
    qf_tokenizer *t = NULL;
    CHECK_OK(qf_tokenizer_load(BPE_JSON, &t));
    if (!t) return;
    qf_text_stream *ts = NULL;
    const char *bad[] = {"ok", "\xC3("};
    CHECK_ERR(qf_text_stream_new(t, bad, 2, 1, &ts), QF_ERR_ARG, "stop[1] is not valid UTF-8");
    CHECK(ts == NULL);
    CHECK_ERR(qf_text_stream_new(NULL, NULL, 0, 1, &ts), QF_ERR_ARG, "tokenizer is NULL");
    CHECK_OK(qf_text_stream_new(t, NULL, 0, 1, &ts));
    if (!ts) {
        qf_tokenizer_free(t);
        return;
    }
    /* a long text: the window must not grow, and the pieces must join to decode(all) */
    const char *para = "Streaming 文本 with émojis 😀 and <image> tokens, repeated. ";
    size_t plen = strlen(para), reps = 300, n = 0;
    char *text = malloc(plen * reps + 1);
    for (size_t i = 0; i < reps; i++) memcpy(text + i * plen, para, plen);
    text[plen * reps] = '\0';
    CHECK_OK(qf_tokenizer_encode(t, text, plen * reps, 0, NULL, 0, &n));
    int32_t *ids = malloc(n * sizeof *ids);
    CHECK_OK(qf_tokenizer_encode(t, text, plen * reps, 0, ids, n, &n));
    size_t dlen = 0;
    CHECK_OK(qf_tokenizer_decode(t, ids, n, 1, NULL, 0, &dlen));
    char *want = malloc(dlen + 1), *got = malloc(dlen + 1);
    CHECK_OK(qf_tokenizer_decode(t, ids, n, 1, want, dlen + 1, &dlen));
    size_t glen = 0;
    int ok = 1;
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t l;
        int stopped;
        CHECK_OK(qf_text_stream_push(ts, ids[i], &p, &l, &stopped));
        ok &= !stopped && glen + l <= dlen && strlen(p) == l;
        if (glen + l <= dlen) memcpy(got + glen, p, l);
        glen += l;
    }
    const char *p;
    size_t l;
    CHECK_OK(qf_text_stream_flush(ts, &p, &l));
    if (glen + l <= dlen) memcpy(got + glen, p, l);
    glen += l;
    CHECK(ok);
    CHECK(glen == dlen && !memcmp(got, want, dlen));
    int stopped;
    CHECK_ERR(qf_text_stream_push(ts, 1 << 20, &p, &l, &stopped), QF_ERR_ARG, "names no token");
    CHECK_ERR(qf_text_stream_push(ts, 5, NULL, &l, &stopped), QF_ERR_ARG, "NULL text");
    printf("test_sampling: streamed %zu ids into %zu bytes\n", n, dlen);
    free(text);
    free(ids);
    free(want);
    free(got);
    qf_text_stream_free(ts);
    qf_tokenizer_free(t);
}

int main(void) {
    test_defaults_and_errors();
    test_properties();
    test_stream();
    TEST_MAIN_END("test_sampling");
}
