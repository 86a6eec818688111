/* fuzz_tokenizer.c - libFuzzer target for the tokenizer.json loader, encode and decode.
 *
 * The first input byte picks what the rest is:
 *   0: a tokenizer.json. It must be rejected with a message and no handle, or load into a
 *      handle on which encode/decode of a few texts, and decode of ids taken from the input,
 *      return a status (never crash) and decode output is valid UTF-8.
 *   1: text for a built-in GPT-2-style byte-level tokenizer (full byte alphabet, some merges,
 *      plain added tokens). Valid UTF-8 must encode, the size query must agree with the real
 *      call, and decode(encode(text)) must give the text back byte for byte; invalid UTF-8
 *      must fail with QF_ERR_ARG.
 *   2: text for a built-in Qwen2-style tokenizer (NFC, Split regex, ByteLevel without regex,
 *      lstrip/rstrip/single_word added tokens, a BOS template). Valid UTF-8 must encode and
 *      decode to valid UTF-8.
 *   4: text for a built-in BERT WordPiece tokenizer (BertNormalizer lowercasing with accents
 *      stripped, BertPreTokenizer, ## pieces, max_input_chars_per_word 6, a normalized added
 *      token, [CLS] $A [SEP] template, WordPiece decoder with cleanup). Valid UTF-8 must encode,
 *      the size query must agree, decode must give valid UTF-8; then the same bytes are decoded
 *      as ids.
 *   other: ids (int32 little-endian) to decode with the Qwen2-style tokenizer.
 * The seed corpus also holds WordPiece tokenizer.json files for mode 0 (wordpiece_*.json).
 * ASan/UBSan turn any memory error into a crash. */
#include "qfuse.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static qf_tokenizer *tok_gpt2, *tok_qwen, *tok_bert;

static const char BERT_JSON[] =
    "{\"added_tokens\": [{\"id\": 0, \"content\": \"[PAD]\", \"special\": true},"
    " {\"id\": 1, \"content\": \"[UNK]\", \"special\": true}, {\"id\": 2, \"content\": \"[CLS]\", \"special\": true},"
    " {\"id\": 3, \"content\": \"[SEP]\", \"special\": true},"
    " {\"id\": 40, \"content\": \"New York\", \"special\": false, \"normalized\": true}],"
    " \"normalizer\": {\"type\": \"BertNormalizer\", \"clean_text\": true, \"handle_chinese_chars\": true,"
    " \"strip_accents\": null, \"lowercase\": true},"
    " \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"},"
    " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"[CLS]\"}},"
    " {\"Sequence\": {\"id\": \"A\"}}, {\"SpecialToken\": {\"id\": \"[SEP]\"}}], \"special_tokens\":"
    " {\"[CLS]\": {\"id\": \"[CLS]\", \"ids\": [2]}, \"[SEP]\": {\"id\": \"[SEP]\", \"ids\": [3]}}},"
    " \"decoder\": {\"type\": \"WordPiece\", \"prefix\": \"##\", \"cleanup\": true},"
    " \"model\": {\"type\": \"WordPiece\", \"unk_token\": \"[UNK]\", \"continuing_subword_prefix\": \"##\","
    " \"max_input_chars_per_word\": 6, \"vocab\": {\"[PAD]\": 0, \"[UNK]\": 1, \"[CLS]\": 2, \"[SEP]\": 3,"
    " \"a\": 4, \"##a\": 5, \"b\": 6, \"##b\": 7, \"c\": 8, \"##c\": 9, \"e\": 10, \"##e\": 11, \"the\": 12,"
    " \"##s\": 13, \".\": 14, \",\": 15, \"!\": 16, \"'\": 17, \"s\": 18, \"n't\": 19, \"do not\": 20,"
    " \"caf\": 21, \"\u4f60\": 22, \"\u597d\": 23, \"\u00df\": 24, \"##\u00df\": 25, \"i\u0307\": 26,"
    " \"\xf0\x9f\x98\x80\": 27, \"##\xf0\x9f\x98\x80\": 28, \"x\": 29, \"##x\": 30, \" ' \": 31}}}";

static int valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c == 0xE0) len = 3, lo = 0xA0;
        else if (c == 0xED) len = 3, hi = 0x9F;
        else if (c >= 0xE1 && c <= 0xEF) len = 3;
        else if (c == 0xF0) len = 4, lo = 0x90;
        else if (c == 0xF4) len = 4, hi = 0x8F;
        else if (c >= 0xF1 && c <= 0xF3) len = 4;
        else return 0;
        if (i + len > n || s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t k = 2; k < len; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
        i += len;
    }
    return 1;
}

/* JSON of a tokenizer whose vocab is the 256 byte-level chars (ids 0..255) plus merges. */
static char *build_json(int qwen) {
    size_t cap = 1 << 16, k = 0;
    char *j = malloc(cap);
    char ch[256][3];
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        int cp = printable ? b : 256 + n++;
        if (cp < 0x80) ch[b][0] = (char)cp, ch[b][1] = 0;
        else ch[b][0] = (char)(0xC0 | (cp >> 6)), ch[b][1] = (char)(0x80 | (cp & 0x3F)), ch[b][2] = 0;
    }
    k += (size_t)snprintf(j + k, cap - k, "{\"model\": {\"type\": \"BPE\", \"vocab\": {");
    for (int b = 0; b < 256; b++) {
        if (b == '"' || b == '\\') k += (size_t)snprintf(j + k, cap - k, "\"\\%c\": %d, ", b, b);
        else k += (size_t)snprintf(j + k, cap - k, "\"%s\": %d, ", ch[b], b);
    }
    /* merges: Ġt, he, Ġthe, in, ĠĠ, ĠĠĠĠ, e\xcc (start of a combining acute) */
    k += (size_t)snprintf(j + k, cap - k,
                          "\"\xc4\xa0t\": 256, \"he\": 257, \"\xc4\xa0the\": 258, \"in\": 259, "
                          "\"\xc4\xa0\xc4\xa0\": 260, \"\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\": 261, \"<s>\": 262},"
                          " \"merges\": [\"\xc4\xa0 t\", \"h e\", \"\xc4\xa0t he\", \"i n\", "
                          "[\"\xc4\xa0\", \"\xc4\xa0\"], [\"\xc4\xa0\xc4\xa0\", \"\xc4\xa0\xc4\xa0\"]]},");
    if (!qwen) {
        k += (size_t)snprintf(j + k, cap - k,
                              " \"added_tokens\": [{\"id\": 262, \"content\": \"<s>\", \"special\": true},"
                              " {\"id\": 263, \"content\": \"<image>\", \"special\": true},"
                              " {\"id\": 264, \"content\": \"<image><audio>\", \"special\": false}],"
                              " \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false},"
                              " \"decoder\": {\"type\": \"ByteLevel\"}}");
    } else {
        k += (size_t)snprintf(
            j + k, cap - k,
            " \"added_tokens\": [{\"id\": 262, \"content\": \"<s>\", \"special\": true},"
            " {\"id\": 263, \"content\": \"<image>\", \"special\": true, \"lstrip\": true},"
            " {\"id\": 264, \"content\": \"<im_end>\", \"special\": true, \"rstrip\": true},"
            " {\"id\": 265, \"content\": \"the\", \"special\": false, \"single_word\": true},"
            " {\"id\": 266, \"content\": \"cafe\xcc\x81\", \"special\": false, \"normalized\": true}],"
            " \"normalizer\": {\"type\": \"NFC\"},"
            " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
            "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?"
            "\\\\p{L}+|\\\\p{N}{1,3}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},"
            " \"behavior\": \"Isolated\", \"invert\": false},"
            "{\"type\": \"Split\", \"pattern\": {\"String\": \"x\"}, \"behavior\": \"MergedWithNext\"},"
            "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"use_regex\": false}]},"
            " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\"}},"
            " {\"Sequence\": {\"id\": \"A\"}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [262]}}},"
            " \"decoder\": {\"type\": \"ByteLevel\"}}");
    }
    return j;
}

static void init(void) {
    if (tok_gpt2) return;
    char *a = build_json(0), *b = build_json(1);
    if (qf_tokenizer_load_memory(a, strlen(a), "gpt2", &tok_gpt2) != QF_OK ||
        qf_tokenizer_load_memory(b, strlen(b), "qwen", &tok_qwen) != QF_OK ||
        qf_tokenizer_load_memory(BERT_JSON, sizeof BERT_JSON - 1, "bert", &tok_bert) != QF_OK) {
        fprintf(stderr, "fuzz_tokenizer: built-in tokenizer does not load: %s\n", qf_last_error());
        abort();
    }
    free(a);
    free(b);
}

/* encode then decode; returns the decoded length or -1 if encode failed. */
static long encode_decode(qf_tokenizer *t, const char *text, size_t len, int add_special, int skip,
                          char **out) {
    size_t n = 0, n2 = 0;
    if (qf_tokenizer_encode(t, text, len, add_special, NULL, 0, &n) != QF_OK) {
        if (!qf_last_error()[0]) abort();
        return -1;
    }
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (qf_tokenizer_encode(t, text, len, add_special, ids, n, &n2) != QF_OK || n2 != n) abort();
    size_t dl = 0;
    if (qf_tokenizer_decode(t, ids, n, skip, NULL, 0, &dl) != QF_OK) abort();
    char *d = malloc(dl + 1);
    size_t dl2 = 0;
    if (qf_tokenizer_decode(t, ids, n, skip, d, dl + 1, &dl2) != QF_OK || dl2 != dl || d[dl] != '\0') abort();
    if (!valid_utf8((const unsigned char *)d, dl)) abort();
    free(ids);
    *out = d;
    return (long)dl;
}

static void decode_ids(qf_tokenizer *t, const uint8_t *data, size_t size) {
    size_t n = size / 4;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    size_t limit = qf_tokenizer_id_limit(t) + 4;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 |
                     (uint32_t)data[4 * i + 2] << 16 | (uint32_t)data[4 * i + 3] << 24;
        ids[i] = (data[4 * i + 3] & 0x80) ? (int32_t)v : (int32_t)(v % limit);
    }
    size_t len = 0;
    if (qf_tokenizer_decode(t, ids, n, (int)(size & 1), NULL, 0, &len) == QF_OK) {
        char *d = malloc(len + 1);
        size_t len2;
        if (qf_tokenizer_decode(t, ids, n, (int)(size & 1), d, len + 1, &len2) != QF_OK || len2 != len) abort();
        if (!valid_utf8((const unsigned char *)d, len)) abort();
        free(d);
    } else if (!qf_last_error()[0]) {
        abort();
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init();
    if (size < 1) return 0;
    int mode = data[0];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    if (mode == 0) {
        qf_tokenizer *t = NULL;
        if (qf_tokenizer_load_memory(text, len, "fuzz", &t) != QF_OK) {
            if (t || !qf_last_error()[0]) abort();
            return 0;
        }
        static const char *samples[] = {"", "Hello world!", "  spaces\tand\nnewlines  ",
                                        "caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80",
                                        "<image> describe <audio>", "x'S 12345 ..."};
        for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
            char *d = NULL;
            if (encode_decode(t, samples[i], strlen(samples[i]), (int)(i & 1), (int)(i & 2), &d) >= 0) free(d);
        }
        decode_ids(t, data + 1, len > 256 ? 256 : len);
        qf_tokenizer_free(t);
        return 0;
    }
    if (mode == 1 || mode == 2) {
        qf_tokenizer *t = mode == 1 ? tok_gpt2 : tok_qwen;
        char *d = NULL;
        long dl = encode_decode(t, text, len, 1, 0, &d);
        int valid = valid_utf8((const unsigned char *)text, len);
        if ((dl >= 0) != valid) abort(); /* valid text always encodes; invalid never does */
        if (dl >= 0 && mode == 1 && ((size_t)dl != len || memcmp(d, text, len))) abort(); /* round trip */
        free(d);
        return 0;
    }
    if (mode == 4) {
        char *d = NULL;
        long dl = encode_decode(tok_bert, text, len, (int)(len & 1), (int)(len & 2), &d);
        if ((dl >= 0) != valid_utf8((const unsigned char *)text, len)) abort();
        free(d);
        decode_ids(tok_bert, data + 1, len);
        return 0;
    }
    decode_ids(tok_qwen, data + 1, len);
    return 0;
}
