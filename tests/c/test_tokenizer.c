/* test_tokenizer.c - the C API of the tokenizer (qfuse_text.h) against the `tokenizers` library.
 *
 * References: tests/fixtures/tokenizer_bpe (tokenizer.json + case.json with texts, ids and decoded
 * strings from tokenizers 0.23), and tests/fixtures/tokenizer_variants/expected.json for the
 * LLaMA-3-style template (BOS id). Checked here: exact ids and decoded strings, the buffer
 * protocol (size query, short buffers), invalid UTF-8, bad ids, every load error's message,
 * round trips on random UTF-8, and concurrent encodes on one handle. */
#include "testutil.h"
#include <cjson/cJSON.h>
#include <omp.h>

#define BPE_JSON "tests/fixtures/tokenizer_bpe/tokenizer.json"
#define BPE_CASE "tests/fixtures/tokenizer_bpe/case.json"

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[n] = '\0';
    if (len) *len = (size_t)n;
    return b;
}

static void test_fixture(qf_tokenizer *t) {
    char *js = read_all(BPE_CASE, NULL);
    CHECK(js != NULL);
    if (!js) return;
    cJSON *c = cJSON_Parse(js);
    free(js);
    cJSON *texts = cJSON_GetObjectItem(c, "texts"), *ids = cJSON_GetObjectItem(c, "ids");
    cJSON *dec = cJSON_GetObjectItem(c, "decoded");
    CHECK(cJSON_GetArraySize(texts) == 6);
    for (int i = 0; i < cJSON_GetArraySize(texts); i++) {
        const char *text = cJSON_GetArrayItem(texts, i)->valuestring;
        cJSON *want = cJSON_GetArrayItem(ids, i);
        int32_t got[256];
        size_t n = 0;
        CHECK_OK(qf_tokenizer_encode(t, text, strlen(text), 1, got, 256, &n));
        CHECK(n == (size_t)cJSON_GetArraySize(want));
        int same = n == (size_t)cJSON_GetArraySize(want);
        for (size_t k = 0; same && k < n; k++) same = got[k] == cJSON_GetArrayItem(want, (int)k)->valueint;
        CHECK(same);
        if (!same) fprintf(stderr, "  text %d (\"%s\") ids differ\n", i, text);
        char out[512];
        size_t len;
        CHECK_OK(qf_tokenizer_decode(t, got, n, 1, out, sizeof out, &len));
        CHECK(!strcmp(out, cJSON_GetArrayItem(dec, i)->valuestring) && len == strlen(out));
    }
    cJSON_Delete(c);
}

static void test_buffers(qf_tokenizer *t) {
    const char *text = "<image> describe the emotion <audio>"; /* 14 ids in the fixture */
    size_t n = 99;
    CHECK_OK(qf_tokenizer_encode(t, text, strlen(text), 1, NULL, 0, &n));
    CHECK(n == 14);
    int32_t ids[14], few[5] = {-7, -7, -7, -7, -7};
    CHECK_ERR(qf_tokenizer_encode(t, text, strlen(text), 1, few, 4, &n), QF_ERR_ARG, "needs 14 ids but cap is 4");
    CHECK(n == 14 && few[0] == 1 && few[2] == 86 && few[3] == 70 && few[4] == -7); /* first cap ids written, no more */
    CHECK_OK(qf_tokenizer_encode(t, text, strlen(text), 1, ids, 14, &n));
    CHECK(ids[0] == 1 && ids[13] == 2);
    size_t len = 0;
    CHECK_OK(qf_tokenizer_decode(t, ids, 14, 0, NULL, 0, &len));
    CHECK(len == strlen(text));
    char small[10];
    CHECK_ERR(qf_tokenizer_decode(t, ids, 14, 0, small, sizeof small, &len), QF_ERR_ARG, "needs 36 bytes");
    CHECK(small[9] == '\0');
    char exact[37];
    CHECK_OK(qf_tokenizer_decode(t, ids, 14, 0, exact, sizeof exact, &len));
    CHECK(!strcmp(exact, text));
    /* NUL bytes are text like any other */
    const char nul[] = {'a', '\0', 'b'};
    CHECK_OK(qf_tokenizer_encode(t, nul, 3, 0, ids, 14, &n));
    CHECK_OK(qf_tokenizer_decode(t, ids, n, 0, exact, sizeof exact, &len));
    CHECK(len == 3 && !memcmp(exact, nul, 3));
    CHECK_OK(qf_tokenizer_encode(t, "", 0, 1, NULL, 0, &n));
    CHECK(n == 0);
    CHECK_ERR(qf_tokenizer_encode(t, NULL, 3, 1, ids, 14, &n), QF_ERR_ARG, "text is NULL");
}

static void test_bad_input(qf_tokenizer *t) {
    int32_t ids[16];
    size_t n;
    CHECK_ERR(qf_tokenizer_encode(t, "ab\xff", 3, 1, ids, 16, &n), QF_ERR_ARG, "byte 0xff at offset 2");
    CHECK_ERR(qf_tokenizer_encode(t, "\xed\xa0\x80", 3, 1, ids, 16, &n), QF_ERR_ARG, "offset 0"); /* surrogate */
    CHECK_ERR(qf_tokenizer_encode(t, "xy\xe4\xbd", 4, 1, ids, 16, &n), QF_ERR_ARG, "offset 2"); /* truncated */
    const int32_t bad[] = {43, 295, 600};
    char out[64];
    size_t len;
    CHECK_ERR(qf_tokenizer_decode(t, bad, 3, 0, out, sizeof out, &len), QF_ERR_ARG, "ids[2] = 600 is not a token id");
    const int32_t neg[] = {-1};
    CHECK_ERR(qf_tokenizer_decode(t, neg, 1, 0, out, sizeof out, &len), QF_ERR_ARG, "ids[0] = -1");
    /* byte tokens that spell broken UTF-8 decode to U+FFFD per maximal subpart: the first two
     * bytes of a 3-byte char, then 'a' -> one U+FFFD then 'a' */
    int32_t zh[8];
    CHECK_OK(qf_tokenizer_encode(t, "\xe4\xbd\xa0", 3, 0, zh, 8, &n)); /* U+4F60: 3 byte tokens here */
    CHECK(n == 3);
    int32_t broken[3] = {zh[0], zh[1], 0};
    CHECK_OK(qf_tokenizer_token_to_id(t, "a", 1, &broken[2]));
    CHECK_OK(qf_tokenizer_decode(t, broken, 3, 0, out, sizeof out, &len));
    CHECK(!strcmp(out, "\xef\xbf\xbd" "a"));
    int32_t id;
    CHECK_ERR(qf_tokenizer_token_to_id(t, "nope!", 5, &id), QF_ERR_NOT_FOUND, "no token \"nope!\"");
    const char *s;
    CHECK_OK(qf_tokenizer_id_to_token(t, 1, &s));
    CHECK(!strcmp(s, "<image>"));
    CHECK_ERR(qf_tokenizer_id_to_token(t, 600, &s), QF_ERR_NOT_FOUND, "no token has id 600");
    CHECK(qf_tokenizer_vocab_size(t, 0) == 600 && qf_tokenizer_id_limit(t) == 600);
    CHECK(qf_tokenizer_is_special(t, 2) && !qf_tokenizer_is_special(t, 43));
}

/* xorshift; random UTF-8 from a pool of ASCII, whitespace runs, accents, CJK, emoji */
static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(uint32_t n) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

static void test_round_trip(qf_tokenizer *t) {
    static const char *pool[] = {"a", "Z", "q", "7", " ", "  ", "\t", "\n", "\r\n", "'s", "!", "...",
                                 "\xc3\xa9", "e\xcc\x81", "\xe4\xbd\xa0", "\xe5\xa5\xbd", "\xf0\x9f\x98\x80",
                                 "\xe2\x80\x8d", "\xc2\xa0", "\xe3\x80\x80", "<image>", "<video", "the", "\x7f"};
    int npool = (int)(sizeof pool / sizeof pool[0]);
    int fails = 0;
    int iters = getenv("QFUSE_TEST_QUICK") ? 200 : 2000;
    char text[512], back[2048];
    int32_t ids[512];
    for (int it = 0; it < iters; it++) {
        size_t len = 0;
        int k = (int)rnd(40);
        for (int j = 0; j < k; j++) {
            const char *p = pool[rnd((uint32_t)npool)];
            memcpy(text + len, p, strlen(p));
            len += strlen(p);
        }
        size_t n, blen;
        if (qf_tokenizer_encode(t, text, len, 1, ids, 512, &n) != QF_OK ||
            qf_tokenizer_decode(t, ids, n, 0, back, sizeof back, &blen) != QF_OK || blen != len ||
            memcmp(back, text, len))
            fails++;
    }
    CHECK(fails == 0);
}

static void test_threads(qf_tokenizer *t) {
    const char *text = "The speaker sounds happy, and the face shows a smile. \xe4\xbd\xa0\xe5\xa5\xbd";
    int32_t ref[64];
    size_t nref;
    CHECK_OK(qf_tokenizer_encode(t, text, strlen(text), 1, ref, 64, &nref));
    int bad = 0;
#pragma omp parallel for num_threads(4) reduction(+ : bad)
    for (int i = 0; i < 64; i++) {
        int32_t ids[64];
        size_t n;
        if (qf_tokenizer_encode(t, text, strlen(text), 1, ids, 64, &n) != QF_OK || n != nref ||
            memcmp(ids, ref, n * sizeof *ids))
            bad++;
    }
    CHECK(bad == 0);
}

static void test_template(void) {
    qf_tokenizer *t = NULL;
    CHECK_OK(qf_tokenizer_load("tests/fixtures/tokenizer_variants/llama3.json", &t));
    if (!t) return;
    int32_t ids[8];
    size_t n, m;
    CHECK_OK(qf_tokenizer_encode(t, "a", 1, 1, ids, 8, &n));
    CHECK(n == 2 && ids[0] == 0); /* expected.json: [0, 68] */
    CHECK_OK(qf_tokenizer_encode(t, "a", 1, 0, ids, 8, &m));
    CHECK(m == 1 && ids[0] == 68);
    qf_tokenizer_free(t);
}

static void expect_load_error(const char *json, size_t len, qf_status want, const char *needle) {
    qf_tokenizer *t = (qf_tokenizer *)&t; /* must come back NULL */
    CHECK_ERR(qf_tokenizer_load_memory(json, len, "case.json", &t), want, needle);
    CHECK(t == NULL);
    CHECK(strstr(qf_last_error(), "case.json") != NULL);
}

static void test_load_errors(void) {
    size_t len;
    char *full = read_all(BPE_JSON, &len);
    CHECK(full != NULL);
    if (!full) return;
    expect_load_error(full, len / 2, QF_ERR_FORMAT, "not valid JSON (error near byte"); /* truncated */
    expect_load_error("{\"model\": {", 11, QF_ERR_FORMAT, "not valid JSON");
    expect_load_error("[]", 2, QF_ERR_FORMAT, "not a JSON object");
    expect_load_error("{\"version\": \"1.0\"}", 18, QF_ERR_FORMAT, "no \"model\" key");
    const char *wp = "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}";
    expect_load_error(wp, strlen(wp), QF_ERR_FORMAT, "model.unk_token \"[UNK]\" is not in model.vocab");
    const char *ug = "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}";
    expect_load_error(ug, strlen(ug), QF_ERR_UNSUPPORTED, "model.type \"Unigram\" is not supported");
    const char *um = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a c\"]}}";
    expect_load_error(um, strlen(um), QF_ERR_FORMAT, "model.merges[0] (\"a\" \"c\"): \"c\" is not in model.vocab");
    const char *mm = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [[\"a\", \"b\"]]}}";
    expect_load_error(mm, strlen(mm), QF_ERR_FORMAT, "the merged token \"ab\" is not in model.vocab");
    const char *big = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 99999999}, \"merges\": []}}";
    expect_load_error(big, strlen(big), QF_ERR_FORMAT, "ids must be integers in [0, 16777216)");
    const char *bad8 = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\xff\": 0}, \"merges\": []}}";
    expect_load_error(bad8, strlen(bad8), QF_ERR_FORMAT, "a model.vocab token is not valid UTF-8");
    const char *re = "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, \"pre_tokenizer\": "
                     "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"[a\"}, \"behavior\": \"Isolated\"}}";
    expect_load_error(re, strlen(re), QF_ERR_FORMAT, "Split.pattern.Regex: regex does not compile");
    qf_tokenizer *t = NULL;
    CHECK_ERR(qf_tokenizer_load("tests/fixtures/tokenizer_bpe/absent.json", &t), QF_ERR_IO, "absent.json");
    CHECK(t == NULL);
    /* a minimal valid one: no pre-tokenizer, no decoder */
    const char *ok = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}}";
    CHECK_OK(qf_tokenizer_load_memory(ok, strlen(ok), "mini", &t));
    int32_t ids[4];
    size_t n;
    CHECK_OK(qf_tokenizer_encode(t, "abab", 4, 1, ids, 4, &n));
    CHECK(n == 2 && ids[0] == 2 && ids[1] == 2);
    qf_tokenizer_free(t);
    free(full);
}

int main(void) {
    qf_tokenizer *t = NULL;
    CHECK_OK(qf_tokenizer_load(BPE_JSON, &t));
    if (t) {
        test_fixture(t);
        test_buffers(t);
        test_bad_input(t);
        test_round_trip(t);
        test_threads(t);
        qf_tokenizer_free(t);
    }
    test_template();
    test_load_errors();
    TEST_MAIN_END("test_tokenizer");
}
