/* tokenizer.c - Hugging Face tokenizer.json byte-level BPE and BERT WordPiece: load, encode,
 * decode (qfuse_text.h). The BERT stages themselves (BertNormalizer, BertPreTokenizer, the
 * WordPiece model on one word, the WordPiece decoder's rule) are src/io/wordpiece.c; this file
 * reads their settings and runs them in the pipeline.
 *
 * Encode pipeline, as the `tokenizers` library runs it (each stage works on the pieces the
 * previous one left, in order, and drops empty pieces):
 *   1. added tokens that are not `normalized` are cut out of the raw text (leftmost, longest);
 *   2. each remaining piece is normalized (NFC and/or BertNormalizer steps, in order), then
 *      `normalized` added tokens are cut out of it;
 *   3. the pre-tokenizer steps split each plain piece (Split regexes, ByteLevel's GPT-2 regex,
 *      ByteLevel's optional prefix space, BertPreTokenizer), ByteLevel maps every byte to its
 *      printable char;
 *   4. the model: BPE: chars -> vocab ids, then pair merges by rank, lowest rank first and
 *      leftmost on ties (a binary heap of candidate merges, checked for staleness when popped,
 *      as tokenizers' Word::merge_all does), O(n log n) per piece; or WordPiece: greedy longest
 *      vocab match from the left (wordpiece.c);
 *   5. the post-processor template adds its special ids around the sequence.
 * The pipeline is run depth-first: a piece is taken through every later stage before the next
 * piece, so the ids come out in order and only one piece per stage is alive at a time.
 *
 * Invariants:
 * - After load the handle is read-only (encode/decode keep their state on the stack or in
 *   per-call buffers), so one handle serves many threads.
 * - All strings (vocab, added tokens) live in one pool, NUL-terminated, valid UTF-8, addressed
 *   by 32-bit offsets; by_id[id] gives the string of every id (added tokens win over the model).
 * - Text reaching PCRE2 is valid UTF-8 and every piece starts and ends on a char boundary
 *   (input is validated, added tokens are valid UTF-8, regex matches are char-aligned), which
 *   is why pcre2_match runs with PCRE2_NO_UTF_CHECK.
 */
#include "io_internal.h"
#include "wordpiece.h"
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#define TOK_MAX_FILE ((size_t)256 << 20)
#define TOK_MAX_ID (1 << 24)
#define TOK_MAX_STEPS 16
#define TOK_MAX_NORM 8
#define NO_STR UINT32_MAX

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

typedef struct {
    uint32_t off, len;
} str_ref;

typedef struct {
    str_ref s;
    int32_t id;
    uint8_t special, lstrip, rstrip, single_word, normalized;
} added_token;

/* Added tokens of one kind (normalized or not), bucketed by first byte for the scan. */
typedef struct {
    int32_t *idx;      /* indices into t->added, grouped by first byte */
    uint32_t start[257];
    int count;
} added_set;

enum { STEP_SPLIT, STEP_BYTELEVEL, STEP_BERT };
enum { NORM_NFC, NORM_BERT };
enum { DEC_NONE, DEC_BYTELEVEL, DEC_WORDPIECE };
enum { B_REMOVED, B_ISOLATED, B_PREV, B_NEXT, B_CONTIGUOUS };

typedef struct {
    int kind;
    pcre2_code *re;    /* Split pattern, or ByteLevel's GPT-2 regex (NULL: use_regex false) */
    int behavior, invert, add_prefix_space;
} pretok_step;

typedef struct {
    uint64_t key;      /* (a << 32) | b, a and b ids; UINT64_MAX = empty slot */
    uint32_t rank;
    int32_t new_id;
} merge_slot;

typedef struct {
    uint32_t off, len;   /* NO_STR: no token has this id */
    int32_t added;       /* index into t->added or -1 */
} id_entry;

struct qf_tokenizer {
    char *label;
    char *pool;
    size_t pool_len, pool_cap;
    /* model vocab: token strings and ids; hash table of indices (-1 empty) */
    str_ref *voc;
    int32_t *voc_id;
    size_t n_voc;
    int32_t *vhash;
    size_t vhash_mask;
    merge_slot *merges;
    size_t merge_mask, n_merges;
    id_entry *by_id;
    size_t id_limit, vocab_with_added;
    added_token *added;
    int n_added;
    int32_t *ahash;      /* content -> index into added (-1 empty) */
    size_t ahash_mask;
    added_set set_raw, set_norm;
    pcre2_code *alnum;   /* Rust regex's \w (single_word's test), NULL if no token needs it */
    /* model options */
    int32_t unk_id;      /* -1: none */
    int fuse_unk, byte_fallback, ignore_merges;
    str_ref prefix, suffix; /* continuing_subword_prefix, end_of_word_suffix (len 0 = none) */
    int wordpiece;          /* model: 0 BPE, 1 WordPiece (settings in wp; wp.prefix = prefix) */
    qf_wordpiece wp;
    struct {
        int kind;
        qf_bert_normalizer bert;
    } norm[TOK_MAX_NORM];   /* normalizer steps, applied in order */
    int n_norm;
    pretok_step steps[TOK_MAX_STEPS];
    int n_steps, byte_level;
    int decoder;            /* DEC_*; WordPiece's prefix and cleanup below */
    str_ref dec_prefix;
    int dec_cleanup;
    int32_t *tmpl_pre, *tmpl_post;
    size_t n_pre, n_post;
    uint8_t byte_len[256];
    char byte_utf8[256][2];
    int16_t cp_byte[324]; /* byte-level char (code point < 324) -> byte, or -1 */
};

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                      */

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else return 0;
    if (n < 2 || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (i >= n || s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* Length of the maximal subpart of an ill-formed sequence at s (>= 1): the bytes that start a
 * valid sequence before it breaks. Unicode's "substitution of maximal subparts". */
static size_t utf8_bad_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else return 1;
    if (n < 2 || s[1] < lo || s[1] > hi) return 1;
    size_t i = 2;
    while (i < len && i < n && s[i] >= 0x80 && s[i] <= 0xBF) i++;
    return i; /* i < len here, else the sequence was valid */
}

/* 1 if s[0..n) is valid UTF-8; else 0 with *bad = offset of the first ill-formed byte. */
static int utf8_valid(const unsigned char *s, size_t n, size_t *bad) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        size_t k = utf8_seq(s + i, n - i);
        if (!k) {
            if (bad) *bad = i;
            return 0;
        }
        i += k;
    }
    return 1;
}

/* Decodes the char at s (valid UTF-8 assumed); *len receives its byte length. */
static uint32_t utf8_decode(const unsigned char *s, size_t *len) {
    unsigned c = s[0];
    if (c < 0x80) { *len = 1; return c; }
    if (c < 0xE0) { *len = 2; return ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu); }
    if (c < 0xF0) { *len = 3; return ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu); }
    *len = 4;
    return ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
}

/* Rust's char::is_whitespace: the White_Space property. */
static int is_white(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* ------------------------------------------------------------------------------------------ */
/* hashing and lookups                                                                        */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t hash_pair(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    return k ^ (k >> 33);
}

static size_t table_size(size_t n) {
    size_t c = 16;
    while (c < 2 * n + 1) c <<= 1;
    return c;
}

static int str_eq(const qf_tokenizer *t, str_ref r, const char *s, size_t n) {
    return r.len == n && !memcmp(t->pool + r.off, s, n);
}

/* Index into t->voc of token s[0..n), or -1. */
static int64_t vocab_find(const qf_tokenizer *t, const char *s, size_t n) {
    if (!t->vhash) return -1;
    for (size_t h = hash_bytes(s, n) & t->vhash_mask;; h = (h + 1) & t->vhash_mask) {
        int32_t i = t->vhash[h];
        if (i < 0) return -1;
        if (str_eq(t, t->voc[i], s, n)) return i;
    }
}

static int32_t vocab_id(const qf_tokenizer *t, const char *s, size_t n) {
    int64_t i = vocab_find(t, s, n);
    return i < 0 ? -1 : t->voc_id[i];
}

static int64_t added_find(const qf_tokenizer *t, const char *s, size_t n) {
    if (!t->ahash) return -1;
    for (size_t h = hash_bytes(s, n) & t->ahash_mask;; h = (h + 1) & t->ahash_mask) {
        int32_t i = t->ahash[h];
        if (i < 0) return -1;
        const id_entry *e = &t->by_id[t->added[i].id];
        if (e->len == n && !memcmp(t->pool + e->off, s, n)) return i;
    }
}

static const merge_slot *merge_find(const qf_tokenizer *t, int32_t a, int32_t b) {
    if (!t->merges) return NULL;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t h = hash_pair(key) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        const merge_slot *m = &t->merges[h];
        if (m->key == UINT64_MAX) return NULL;
        if (m->key == key) return m;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* loading                                                                                    */

typedef struct {
    qf_tokenizer *t;
    const char *label;
} loader;

static qf_status pool_add(loader *L, const char *s, size_t n, str_ref *out) {
    qf_tokenizer *t = L->t;
    if (t->pool_len + n + 1 > (size_t)UINT32_MAX)
        return qf_fail(QF_ERR_FORMAT, "%s: token strings exceed 4 GiB", L->label);
    if (t->pool_len + n + 1 > t->pool_cap) {
        size_t c = t->pool_cap ? t->pool_cap : 4096;
        while (c < t->pool_len + n + 1) c *= 2;
        char *p = realloc(t->pool, c);
        if (!p) return qf_fail(QF_ERR_NOMEM, "%s: no memory for token strings (%zu bytes)", L->label, c);
        t->pool = p;
        t->pool_cap = c;
    }
    memcpy(t->pool + t->pool_len, s, n);
    t->pool[t->pool_len + n] = '\0';
    out->off = (uint32_t)t->pool_len;
    out->len = (uint32_t)n;
    t->pool_len += n + 1;
    return QF_OK;
}

static qf_status check_utf8(loader *L, const char *s, const char *where) {
    size_t bad;
    if (!utf8_valid((const unsigned char *)s, strlen(s), &bad))
        return qf_fail(QF_ERR_FORMAT, "%s: %s is not valid UTF-8 (bad byte at offset %zu)", L->label,
                       where, bad);
    return QF_OK;
}

static const char *jtype(const cJSON *x) {
    if (!x) return "missing";
    if (cJSON_IsNull(x)) return "null";
    if (cJSON_IsBool(x)) return "a boolean";
    if (cJSON_IsNumber(x)) return "a number";
    if (cJSON_IsString(x)) return "a string";
    if (cJSON_IsArray(x)) return "an array";
    if (cJSON_IsObject(x)) return "an object";
    return "of an unknown type";
}

/* Optional boolean member: absent or null -> def. */
static qf_status get_bool(loader *L, const cJSON *obj, const char *key, const char *where, int def,
                          int *out) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!x || cJSON_IsNull(x)) {
        *out = def;
        return QF_OK;
    }
    if (!cJSON_IsBool(x))
        return qf_fail(QF_ERR_FORMAT, "%s: %s.%s is %s, expected true or false", L->label, where, key,
                       jtype(x));
    *out = cJSON_IsTrue(x);
    return QF_OK;
}

/* Optional string member: absent or null -> NULL. */
static qf_status get_str(loader *L, const cJSON *obj, const char *key, const char *where,
                         const char **out) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(obj, key);
    *out = NULL;
    if (!x || cJSON_IsNull(x)) return QF_OK;
    if (!cJSON_IsString(x))
        return qf_fail(QF_ERR_FORMAT, "%s: %s.%s is %s, expected a string", L->label, where, key,
                       jtype(x));
    char w[160];
    snprintf(w, sizeof w, "%s.%s", where, key);
    QF_TRY(check_utf8(L, x->valuestring, w));
    *out = x->valuestring;
    return QF_OK;
}

static qf_status get_id(loader *L, const cJSON *x, const char *what, const char *name, int32_t *out) {
    if (!cJSON_IsNumber(x))
        return qf_fail(QF_ERR_FORMAT, "%s: %s of \"%s\" is %s, expected an integer id", L->label, what,
                       name, jtype(x));
    double d = x->valuedouble;
    if (!(d >= 0 && d < TOK_MAX_ID) || floor(d) != d)
        return qf_fail(QF_ERR_FORMAT, "%s: %s of \"%s\" is %g; ids must be integers in [0, %d)",
                       L->label, what, name, d, TOK_MAX_ID);
    *out = (int32_t)d;
    return QF_OK;
}

/* White_Space, which Oniguruma's and Rust's \s match; PCRE2's \s adds U+180E. */
#define WHITE_SPACE_SET                                                                           \
    "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

/* Copies pattern p[0..n) with \s and \S spelled as White_Space sets (inside a class \s becomes
 * the set's members; \S inside a class is left alone). Returns a malloc'd string or NULL. */
static char *rewrite_ws(const char *p, size_t n, size_t *outn) {
    size_t setlen = strlen(WHITE_SPACE_SET), k = 0;
    char *o = malloc(n * (setlen + 4) + 1);
    if (!o) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\\' && i + 1 < n) {
            char nx = p[i + 1];
            if (nx == 's' || (nx == 'S' && !in_class)) {
                if (!in_class) o[k++] = '[';
                if (nx == 'S') o[k++] = '^';
                memcpy(o + k, WHITE_SPACE_SET, setlen);
                k += setlen;
                if (!in_class) o[k++] = ']';
            } else {
                o[k++] = ch;
                o[k++] = nx;
            }
            i++;
            continue;
        }
        if (!in_class && ch == '[') {
            in_class = 1;
            o[k++] = ch;
            /* a ']' right after '[' or '[^' is a literal member */
            if (i + 1 < n && p[i + 1] == '^') o[k++] = p[++i];
            if (i + 1 < n && p[i + 1] == ']') o[k++] = p[++i];
            continue;
        }
        if (in_class && ch == '[' && i + 1 < n && p[i + 1] == ':') { /* POSIX [:name:] */
            const char *end = NULL;
            for (size_t j = i + 2; j + 1 < n; j++)
                if (p[j] == ':' && p[j + 1] == ']') { end = p + j + 2; break; }
            if (end) {
                size_t m = (size_t)(end - (p + i));
                memcpy(o + k, p + i, m);
                k += m;
                i += m - 1;
                continue;
            }
        }
        if (in_class && ch == ']') in_class = 0;
        o[k++] = ch;
    }
    o[k] = '\0';
    *outn = k;
    return o;
}

static qf_status compile_re(loader *L, const char *pat, size_t n, uint32_t extra, const char *where,
                            pcre2_code **out) {
    int err;
    PCRE2_SIZE at;
    char *rw = NULL;
    if (!(extra & PCRE2_LITERAL)) {
        if (n == PCRE2_ZERO_TERMINATED) n = strlen(pat);
        rw = rewrite_ws(pat, n, &n);
        if (!rw) return qf_fail(QF_ERR_NOMEM, "%s: no memory for a regex", L->label);
        pat = rw;
    }
    uint32_t opts = PCRE2_UTF | extra | ((extra & PCRE2_LITERAL) ? 0 : PCRE2_UCP); /* LITERAL refuses UCP */
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, n, opts, &err, &at, NULL);
    free(rw);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return qf_fail(QF_ERR_FORMAT, "%s: %s: regex does not compile at offset %zu: %s", L->label,
                       where, (size_t)at, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* interpreter if JIT is unavailable */
    *out = re;
    return QF_OK;
}

static qf_status load_vocab(loader *L, const cJSON *vocab) {
    qf_tokenizer *t = L->t;
    if (!cJSON_IsObject(vocab))
        return qf_fail(QF_ERR_FORMAT, "%s: model.vocab is %s, expected an object of token: id",
                       L->label, jtype(vocab));
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    t->voc = calloc(n ? n : 1, sizeof *t->voc);
    t->voc_id = calloc(n ? n : 1, sizeof *t->voc_id);
    size_t ts = table_size(n);
    t->vhash = malloc(ts * sizeof *t->vhash);
    if (!t->voc || !t->voc_id || !t->vhash)
        return qf_fail(QF_ERR_NOMEM, "%s: no memory for a vocab of %zu tokens", L->label, n);
    memset(t->vhash, 0xff, ts * sizeof *t->vhash);
    t->vhash_mask = ts - 1;
    for (const cJSON *x = vocab->child; x; x = x->next) {
        const char *s = x->string;
        QF_TRY(check_utf8(L, s, "a model.vocab token"));
        int32_t id;
        QF_TRY(get_id(L, x, "model.vocab id", s, &id));
        size_t len = strlen(s);
        size_t h = hash_bytes(s, len) & t->vhash_mask;
        for (; t->vhash[h] >= 0; h = (h + 1) & t->vhash_mask)
            if (str_eq(t, t->voc[t->vhash[h]], s, len))
                return qf_fail(QF_ERR_FORMAT, "%s: model.vocab lists the token \"%s\" twice", L->label, s);
        QF_TRY(pool_add(L, s, len, &t->voc[t->n_voc]));
        t->voc_id[t->n_voc] = id;
        t->vhash[h] = (int32_t)t->n_voc;
        t->n_voc++;
    }
    return QF_OK;
}

static qf_status add_merge(loader *L, const char *a, size_t na, const char *b, size_t nb, size_t rank) {
    qf_tokenizer *t = L->t;
    int32_t ia = vocab_id(t, a, na), ib = vocab_id(t, b, nb);
    if (ia < 0 || ib < 0)
        return qf_fail(QF_ERR_FORMAT, "%s: model.merges[%zu] (\"%.*s\" \"%.*s\"): \"%.*s\" is not in model.vocab",
                       L->label, rank, (int)na, a, (int)nb, b, ia < 0 ? (int)na : (int)nb, ia < 0 ? a : b);
    /* tokenizers cuts prefix-length bytes off b without checking they are the prefix */
    size_t pl = t->prefix.len;
    if (nb < pl)
        return qf_fail(QF_ERR_FORMAT, "%s: model.merges[%zu]: \"%.*s\" is shorter than the continuing_subword_prefix",
                       L->label, rank, (int)nb, b);
    char stackbuf[256];
    size_t nn = na + nb - pl;
    char *cat = nn <= sizeof stackbuf ? stackbuf : malloc(nn);
    if (!cat) return qf_fail(QF_ERR_NOMEM, "%s: no memory for a merge", L->label);
    memcpy(cat, a, na);
    memcpy(cat + na, b + pl, nb - pl);
    int32_t inew = vocab_id(t, cat, nn);
    if (inew < 0) {
        qf_status s = qf_fail(QF_ERR_FORMAT,
                              "%s: model.merges[%zu] (\"%.*s\" \"%.*s\"): the merged token \"%.*s\" is not in model.vocab",
                              L->label, rank, (int)na, a, (int)nb, b, (int)nn, cat);
        if (cat != stackbuf) free(cat);
        return s;
    }
    if (cat != stackbuf) free(cat);
    uint64_t key = ((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib;
    size_t h = hash_pair(key) & t->merge_mask;
    while (t->merges[h].key != UINT64_MAX && t->merges[h].key != key) h = (h + 1) & t->merge_mask;
    if (t->merges[h].key == UINT64_MAX) t->n_merges++;
    /* a repeated pair takes its later rank, as tokenizers' HashMap collect does */
    t->merges[h].key = key;
    t->merges[h].rank = (uint32_t)rank;
    t->merges[h].new_id = inew;
    return QF_OK;
}

static qf_status load_merges(loader *L, const cJSON *merges) {
    qf_tokenizer *t = L->t;
    if (!merges || cJSON_IsNull(merges)) merges = NULL;
    else if (!cJSON_IsArray(merges))
        return qf_fail(QF_ERR_FORMAT, "%s: model.merges is %s, expected an array", L->label, jtype(merges));
    size_t n = merges ? (size_t)cJSON_GetArraySize(merges) : 0;
    size_t ts = table_size(n);
    t->merges = malloc(ts * sizeof *t->merges);
    if (!t->merges) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %zu merges", L->label, n);
    for (size_t i = 0; i < ts; i++) t->merges[i].key = UINT64_MAX;
    t->merge_mask = ts - 1;
    size_t rank = 0;
    for (const cJSON *m = merges ? merges->child : NULL; m; m = m->next, rank++) {
        if (cJSON_IsString(m)) {
            const char *s = m->valuestring;
            const char *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' '))
                return qf_fail(QF_ERR_FORMAT, "%s: model.merges[%zu] = \"%s\" is not two tokens separated by one space",
                               L->label, rank, s);
            QF_TRY(check_utf8(L, s, "a model.merges entry"));
            QF_TRY(add_merge(L, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank));
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
                   cJSON_IsString(m->child->next)) {
            const char *a = m->child->valuestring, *b = m->child->next->valuestring;
            QF_TRY(check_utf8(L, a, "a model.merges entry"));
            QF_TRY(check_utf8(L, b, "a model.merges entry"));
            QF_TRY(add_merge(L, a, strlen(a), b, strlen(b), rank));
        } else {
            return qf_fail(QF_ERR_FORMAT, "%s: model.merges[%zu] is %s; expected \"a b\" or [\"a\", \"b\"]",
                           L->label, rank, jtype(m));
        }
    }
    return QF_OK;
}

/* Refuses any member of obj not named in known[0..n) (a setting qfuse would otherwise ignore). */
static qf_status only_keys(loader *L, const cJSON *obj, const char *where, const char *const *known, size_t n) {
    for (const cJSON *x = obj->child; x; x = x->next) {
        size_t i = 0;
        while (i < n && strcmp(x->string, known[i])) i++;
        if (i < n) continue;
        char list[256];
        size_t k = 0;
        list[0] = '\0';
        for (i = 0; i < n && k < sizeof list; i++)
            k += (size_t)snprintf(list + k, sizeof list - k, "%s%s", i ? ", " : "", known[i]);
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: %s.%s is not supported (qfuse reads %s)", L->label, where,
                       x->string, list);
    }
    return QF_OK;
}

/* model.type "WordPiece" (BERT): vocab, unk_token, continuing_subword_prefix and
 * max_input_chars_per_word, absent ones taking tokenizers' defaults ("[UNK]", "##", 100). The
 * unk token must be in the vocab (tokenizers fails later, on the first word it cannot split). */
static qf_status load_wordpiece(loader *L, const cJSON *model) {
    qf_tokenizer *t = L->t;
    static const char *const known[] = {"type", "vocab", "unk_token", "continuing_subword_prefix",
                                        "max_input_chars_per_word"};
    QF_TRY(only_keys(L, model, "model (WordPiece)", known, sizeof known / sizeof *known));
    const char *unk, *prefix;
    QF_TRY(get_str(L, model, "unk_token", "model", &unk));
    QF_TRY(get_str(L, model, "continuing_subword_prefix", "model", &prefix));
    if (!unk) unk = "[UNK]";
    if (!prefix) prefix = "##";
    const cJSON *mc = cJSON_GetObjectItemCaseSensitive(model, "max_input_chars_per_word");
    double max_chars = 100;
    if (mc && !cJSON_IsNull(mc)) {
        if (!cJSON_IsNumber(mc) || !(mc->valuedouble >= 0 && mc->valuedouble <= 9007199254740992.0) ||
            floor(mc->valuedouble) != mc->valuedouble)
            return qf_fail(QF_ERR_FORMAT, "%s: model.max_input_chars_per_word is %s; expected a non-negative integer",
                           L->label, cJSON_IsNumber(mc) ? "not a non-negative integer" : jtype(mc));
        max_chars = mc->valuedouble;
    }
    QF_TRY(load_vocab(L, cJSON_GetObjectItemCaseSensitive(model, "vocab")));
    QF_TRY(pool_add(L, prefix, strlen(prefix), &t->prefix));
    t->unk_id = vocab_id(t, unk, strlen(unk));
    if (t->unk_id < 0)
        return qf_fail(QF_ERR_FORMAT, "%s: model.unk_token \"%s\" is not in model.vocab (WordPiece gives it to every "
                       "word it cannot split)", L->label, unk);
    size_t longest = 0;
    for (size_t i = 0; i < t->n_voc; i++)
        if (t->voc[i].len > longest) longest = t->voc[i].len;
    t->wordpiece = 1;
    t->wp.prefix_len = t->prefix.len; /* wp.prefix is set once the pool stops moving (load_root) */
    t->wp.max_chars = (size_t)max_chars;
    t->wp.max_token_len = longest;
    t->wp.unk_id = t->unk_id;
    return QF_OK;
}

static qf_status load_model(loader *L, const cJSON *model) {
    qf_tokenizer *t = L->t;
    if (!model)
        return qf_fail(QF_ERR_FORMAT, "%s: no \"model\" key: a tokenizer.json needs a model", L->label);
    if (!cJSON_IsObject(model))
        return qf_fail(QF_ERR_FORMAT, "%s: model is %s, expected an object", L->label, jtype(model));
    const char *type;
    QF_TRY(get_str(L, model, "type", "model", &type));
    if (!type && !cJSON_GetObjectItemCaseSensitive(model, "merges"))
        return qf_fail(QF_ERR_FORMAT, "%s: model has no \"type\" (and no merges to show it is BPE)", L->label);
    if (type && !strcmp(type, "WordPiece")) return load_wordpiece(L, model);
    if (type && strcmp(type, "BPE"))
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: model.type \"%s\" is not supported (only \"BPE\" and \"WordPiece\")",
                       L->label, type);
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: model.dropout is set: BPE dropout is not supported", L->label);
    QF_TRY(get_bool(L, model, "fuse_unk", "model", 0, &t->fuse_unk));
    QF_TRY(get_bool(L, model, "byte_fallback", "model", 0, &t->byte_fallback));
    QF_TRY(get_bool(L, model, "ignore_merges", "model", 0, &t->ignore_merges));
    const char *prefix, *suffix, *unk;
    QF_TRY(get_str(L, model, "continuing_subword_prefix", "model", &prefix));
    QF_TRY(get_str(L, model, "end_of_word_suffix", "model", &suffix));
    QF_TRY(get_str(L, model, "unk_token", "model", &unk));
    QF_TRY(load_vocab(L, cJSON_GetObjectItemCaseSensitive(model, "vocab")));
    if (prefix) QF_TRY(pool_add(L, prefix, strlen(prefix), &t->prefix));
    if (suffix) QF_TRY(pool_add(L, suffix, strlen(suffix), &t->suffix));
    t->unk_id = -1;
    if (unk) {
        t->unk_id = vocab_id(t, unk, strlen(unk));
        if (t->unk_id < 0)
            return qf_fail(QF_ERR_FORMAT, "%s: model.unk_token \"%s\" is not in model.vocab", L->label, unk);
    }
    return load_merges(L, cJSON_GetObjectItemCaseSensitive(model, "merges"));
}

static qf_status load_added(loader *L, const cJSON *arr) {
    qf_tokenizer *t = L->t;
    if (!arr || cJSON_IsNull(arr)) return QF_OK;
    if (!cJSON_IsArray(arr))
        return qf_fail(QF_ERR_FORMAT, "%s: added_tokens is %s, expected an array", L->label, jtype(arr));
    int n = cJSON_GetArraySize(arr);
    t->added = calloc(n ? (size_t)n : 1, sizeof *t->added);
    size_t ts = table_size((size_t)n);
    t->ahash = malloc(ts * sizeof *t->ahash);
    if (!t->added || !t->ahash) return qf_fail(QF_ERR_NOMEM, "%s: no memory for %d added tokens", L->label, n);
    memset(t->ahash, 0xff, ts * sizeof *t->ahash);
    t->ahash_mask = ts - 1;
    int i = 0;
    for (const cJSON *x = arr->child; x; x = x->next, i++) {
        char where[48];
        snprintf(where, sizeof where, "added_tokens[%d]", i);
        if (!cJSON_IsObject(x))
            return qf_fail(QF_ERR_FORMAT, "%s: %s is %s, expected an object", L->label, where, jtype(x));
        const char *content;
        QF_TRY(get_str(L, x, "content", where, &content));
        if (!content || !content[0])
            return qf_fail(QF_ERR_FORMAT, "%s: %s.content is missing or empty", L->label, where);
        int32_t id;
        QF_TRY(get_id(L, cJSON_GetObjectItemCaseSensitive(x, "id"), "added token id", content, &id));
        int special, lstrip, rstrip, single_word, normalized;
        QF_TRY(get_bool(L, x, "special", where, 0, &special));
        QF_TRY(get_bool(L, x, "lstrip", where, 0, &lstrip));
        QF_TRY(get_bool(L, x, "rstrip", where, 0, &rstrip));
        QF_TRY(get_bool(L, x, "single_word", where, 0, &single_word));
        QF_TRY(get_bool(L, x, "normalized", where, !special, &normalized));
        size_t len = strlen(content);
        int32_t vid = vocab_id(t, content, len);
        if (vid >= 0 && vid != id)
            return qf_fail(QF_ERR_FORMAT, "%s: %s \"%s\" has id %d but model.vocab gives it id %d",
                           L->label, where, content, id, vid);
        size_t h = hash_bytes(content, len) & t->ahash_mask;
        for (; t->ahash[h] >= 0; h = (h + 1) & t->ahash_mask)
            if (str_eq(t, t->added[t->ahash[h]].s, content, len))
                return qf_fail(QF_ERR_FORMAT, "%s: %s repeats the added token \"%s\"", L->label, where, content);
        added_token *a = &t->added[t->n_added];
        QF_TRY(pool_add(L, content, len, &a->s));
        a->id = id;
        a->special = (uint8_t)special;
        a->lstrip = (uint8_t)lstrip;
        a->rstrip = (uint8_t)rstrip;
        a->single_word = (uint8_t)single_word;
        a->normalized = (uint8_t)normalized;
        t->ahash[h] = t->n_added++;
        if (single_word && !t->alnum)
            QF_TRY(compile_re(L, "[\\p{Alphabetic}\\p{M}\\p{Pc}\\p{Nd}\\x{200C}\\x{200D}]", PCRE2_ZERO_TERMINATED,
                              PCRE2_ANCHORED, "single_word's word class", &t->alnum));
    }
    return QF_OK;
}

/* Buckets the added tokens with normalized == norm by first byte. With an NFC normalizer the
 * normalized tokens are matched in their NFC form, as tokenizers normalizes them too. */
static qf_status build_set(loader *L, int norm, added_set *set) {
    qf_tokenizer *t = L->t;
    set->idx = malloc((size_t)(t->n_added ? t->n_added : 1) * sizeof *set->idx);
    if (!set->idx) return qf_fail(QF_ERR_NOMEM, "%s: no memory for added tokens", L->label);
    uint32_t count[257] = {0};
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == norm) count[(unsigned char)t->pool[t->added[i].s.off]]++;
    set->start[0] = 0;
    for (int b = 0; b < 256; b++) set->start[b + 1] = set->start[b] + count[b];
    uint32_t fill[256];
    memcpy(fill, set->start, sizeof fill);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == norm) set->idx[fill[(unsigned char)t->pool[t->added[i].s.off]]++] = i;
    set->count = (int)set->start[256];
    return QF_OK;
}

static qf_status load_normalizer(loader *L, const cJSON *n, int depth) {
    if (!n || cJSON_IsNull(n)) return QF_OK;
    const char *type;
    if (!cJSON_IsObject(n)) return qf_fail(QF_ERR_FORMAT, "%s: normalizer is %s, expected an object", L->label, jtype(n));
    QF_TRY(get_str(L, n, "type", "normalizer", &type));
    if (!type) return qf_fail(QF_ERR_FORMAT, "%s: normalizer has no \"type\"", L->label);
    qf_tokenizer *t = L->t;
    if (!strcmp(type, "NFC") || !strcmp(type, "BertNormalizer")) {
        if (t->n_norm == TOK_MAX_NORM)
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: more than %d normalizer steps", L->label, TOK_MAX_NORM);
        int k = t->n_norm++;
        t->norm[k].kind = NORM_NFC;
        if (!strcmp(type, "NFC")) return QF_OK;
        /* BertNormalizer: strip_accents null (or absent) follows lowercase, as tokenizers does */
        static const char *const known[] = {"type", "clean_text", "handle_chinese_chars", "strip_accents", "lowercase"};
        QF_TRY(only_keys(L, n, "normalizer BertNormalizer", known, sizeof known / sizeof *known));
        int clean, chinese, strip, lower;
        QF_TRY(get_bool(L, n, "clean_text", "normalizer BertNormalizer", 1, &clean));
        QF_TRY(get_bool(L, n, "handle_chinese_chars", "normalizer BertNormalizer", 1, &chinese));
        QF_TRY(get_bool(L, n, "lowercase", "normalizer BertNormalizer", 1, &lower));
        QF_TRY(get_bool(L, n, "strip_accents", "normalizer BertNormalizer", lower, &strip));
        t->norm[k].kind = NORM_BERT;
        t->norm[k].bert = (qf_bert_normalizer){(uint8_t)clean, (uint8_t)chinese, (uint8_t)strip, (uint8_t)lower};
        return QF_OK;
    }
    if (!strcmp(type, "Sequence") && depth < 8) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list))
            return qf_fail(QF_ERR_FORMAT, "%s: normalizer Sequence has no \"normalizers\" array", L->label);
        for (const cJSON *x = list->child; x; x = x->next) QF_TRY(load_normalizer(L, x, depth + 1));
        return QF_OK;
    }
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: normalizer \"%s\" is not supported (NFC, BertNormalizer, a Sequence of "
                   "those, or null)", L->label, type);
}

static qf_status load_pretok(loader *L, const cJSON *p, int depth) {
    qf_tokenizer *t = L->t;
    if (!p || cJSON_IsNull(p)) return QF_OK;
    if (!cJSON_IsObject(p))
        return qf_fail(QF_ERR_FORMAT, "%s: pre_tokenizer is %s, expected an object", L->label, jtype(p));
    const char *type;
    QF_TRY(get_str(L, p, "type", "pre_tokenizer", &type));
    if (!type) return qf_fail(QF_ERR_FORMAT, "%s: a pre_tokenizer has no \"type\"", L->label);
    if (!strcmp(type, "Sequence") && depth < 8) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(list))
            return qf_fail(QF_ERR_FORMAT, "%s: pre_tokenizer Sequence has no \"pretokenizers\" array", L->label);
        for (const cJSON *x = list->child; x; x = x->next) QF_TRY(load_pretok(L, x, depth + 1));
        return QF_OK;
    }
    if (t->byte_level)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: pre_tokenizer %s after ByteLevel: ByteLevel must be the last step",
                       L->label, type);
    if (t->n_steps == TOK_MAX_STEPS)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: more than %d pre_tokenizer steps", L->label, TOK_MAX_STEPS);
    pretok_step *st = &t->steps[t->n_steps];
    memset(st, 0, sizeof *st);
    if (!strcmp(type, "ByteLevel")) {
        int use_regex;
        QF_TRY(get_bool(L, p, "add_prefix_space", "pre_tokenizer ByteLevel", 1, &st->add_prefix_space));
        QF_TRY(get_bool(L, p, "use_regex", "pre_tokenizer ByteLevel", 1, &use_regex));
        st->kind = STEP_BYTELEVEL;
        if (use_regex)
            QF_TRY(compile_re(L, GPT2_PATTERN, sizeof GPT2_PATTERN - 1, 0, "ByteLevel's GPT-2 regex", &st->re));
        t->byte_level = 1;
        t->n_steps++;
        return QF_OK;
    }
    if (!strcmp(type, "BertPreTokenizer")) {
        static const char *const known[] = {"type"};
        QF_TRY(only_keys(L, p, "pre_tokenizer BertPreTokenizer", known, 1));
        st->kind = STEP_BERT;
        t->n_steps++;
        return QF_OK;
    }
    if (!strcmp(type, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const char *re_src = NULL, *lit = NULL, *beh;
        if (cJSON_IsObject(pat)) {
            QF_TRY(get_str(L, pat, "Regex", "pre_tokenizer Split.pattern", &re_src));
            QF_TRY(get_str(L, pat, "String", "pre_tokenizer Split.pattern", &lit));
        }
        if (!re_src && !lit)
            return qf_fail(QF_ERR_FORMAT, "%s: pre_tokenizer Split.pattern is not {\"Regex\": ...} or {\"String\": ...}",
                           L->label);
        QF_TRY(get_str(L, p, "behavior", "pre_tokenizer Split", &beh));
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        st->behavior = -1;
        for (int i = 0; i < 5; i++)
            if (beh && !strcmp(beh, names[i])) st->behavior = i;
        if (st->behavior < 0)
            return qf_fail(QF_ERR_FORMAT,
                           "%s: pre_tokenizer Split.behavior is \"%s\"; expected Removed, Isolated, "
                           "MergedWithPrevious, MergedWithNext or Contiguous",
                           L->label, beh ? beh : "(missing)");
        QF_TRY(get_bool(L, p, "invert", "pre_tokenizer Split", 0, &st->invert));
        st->kind = STEP_SPLIT;
        if (re_src) QF_TRY(compile_re(L, re_src, strlen(re_src), 0, "pre_tokenizer Split.pattern.Regex", &st->re));
        else QF_TRY(compile_re(L, lit, strlen(lit), PCRE2_LITERAL, "pre_tokenizer Split.pattern.String", &st->re));
        t->n_steps++;
        return QF_OK;
    }
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: pre_tokenizer \"%s\" is not supported (ByteLevel, Split, BertPreTokenizer, "
                   "Sequence)",
                   L->label, type);
}

static qf_status push_ids(loader *L, const cJSON *tokens, const cJSON *item, int32_t **arr, size_t *n) {
    const cJSON *tok = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
    const char *name;
    QF_TRY(get_str(L, tok, "id", "post_processor TemplateProcessing SpecialToken", &name));
    if (!name) return qf_fail(QF_ERR_FORMAT, "%s: post_processor template SpecialToken has no id", L->label);
    const cJSON *spec = cJSON_GetObjectItemCaseSensitive(tokens, name);
    const cJSON *ids = spec ? cJSON_GetObjectItemCaseSensitive(spec, "ids") : NULL;
    if (!cJSON_IsArray(ids))
        return qf_fail(QF_ERR_FORMAT, "%s: post_processor template uses \"%s\" but special_tokens has no ids for it",
                       L->label, name);
    size_t k = (size_t)cJSON_GetArraySize(ids);
    int32_t *a = realloc(*arr, (*n + k + 1) * sizeof *a);
    if (!a) return qf_fail(QF_ERR_NOMEM, "%s: no memory for the template", L->label);
    *arr = a;
    for (const cJSON *x = ids->child; x; x = x->next)
        QF_TRY(get_id(L, x, "post_processor special token id", name, &a[(*n)++]));
    return QF_OK;
}

static qf_status load_post(loader *L, const cJSON *p, int depth) {
    qf_tokenizer *t = L->t;
    if (!p || cJSON_IsNull(p)) return QF_OK;
    if (!cJSON_IsObject(p))
        return qf_fail(QF_ERR_FORMAT, "%s: post_processor is %s, expected an object", L->label, jtype(p));
    const char *type;
    QF_TRY(get_str(L, p, "type", "post_processor", &type));
    if (!type) return qf_fail(QF_ERR_FORMAT, "%s: a post_processor has no \"type\"", L->label);
    if (!strcmp(type, "ByteLevel")) return QF_OK; /* offsets only */
    if (!strcmp(type, "Sequence") && depth < 8) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "processors");
        if (!cJSON_IsArray(list))
            return qf_fail(QF_ERR_FORMAT, "%s: post_processor Sequence has no \"processors\" array", L->label);
        for (const cJSON *x = list->child; x; x = x->next) QF_TRY(load_post(L, x, depth + 1));
        return QF_OK;
    }
    if (!strcmp(type, "TemplateProcessing")) {
        if (t->tmpl_pre || t->tmpl_post)
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: more than one TemplateProcessing post_processor", L->label);
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
        const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
        if (!cJSON_IsArray(single))
            return qf_fail(QF_ERR_FORMAT, "%s: post_processor TemplateProcessing has no \"single\" array", L->label);
        int seen_a = 0;
        /* a placeholder allocation so that "has a template" is visible even with no ids */
        t->tmpl_pre = malloc(sizeof(int32_t));
        t->tmpl_post = malloc(sizeof(int32_t));
        if (!t->tmpl_pre || !t->tmpl_post) return qf_fail(QF_ERR_NOMEM, "%s: no memory for the template", L->label);
        for (const cJSON *x = single->child; x; x = x->next) {
            const cJSON *seq = cJSON_GetObjectItemCaseSensitive(x, "Sequence");
            if (seq) {
                const char *sid;
                QF_TRY(get_str(L, seq, "id", "post_processor TemplateProcessing Sequence", &sid));
                if (!sid || strcmp(sid, "A") || seen_a)
                    return qf_fail(QF_ERR_FORMAT, "%s: post_processor template \"single\" must hold sequence A once",
                                   L->label);
                seen_a = 1;
            } else if (cJSON_GetObjectItemCaseSensitive(x, "SpecialToken")) {
                if (seen_a) QF_TRY(push_ids(L, tokens, x, &t->tmpl_post, &t->n_post));
                else QF_TRY(push_ids(L, tokens, x, &t->tmpl_pre, &t->n_pre));
            } else {
                return qf_fail(QF_ERR_FORMAT, "%s: post_processor template item is neither Sequence nor SpecialToken",
                               L->label);
            }
        }
        if (!seen_a)
            return qf_fail(QF_ERR_FORMAT, "%s: post_processor template \"single\" lacks sequence A", L->label);
        return QF_OK;
    }
    if (!strcmp(type, "BertProcessing")) { /* [CLS] $A [SEP] */
        if (t->tmpl_pre || t->tmpl_post)
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: more than one template post_processor", L->label);
        static const char *const known[] = {"type", "sep", "cls"};
        QF_TRY(only_keys(L, p, "post_processor BertProcessing", known, 3));
        int32_t ids[2];
        for (int i = 0; i < 2; i++) {
            const char *key = i ? "sep" : "cls";
            const cJSON *x = cJSON_GetObjectItemCaseSensitive(p, key);
            if (!cJSON_IsArray(x) || cJSON_GetArraySize(x) != 2 || !cJSON_IsString(x->child))
                return qf_fail(QF_ERR_FORMAT, "%s: post_processor BertProcessing.%s is %s; expected [token, id]",
                               L->label, key, jtype(x));
            QF_TRY(get_id(L, x->child->next, "post_processor BertProcessing id", x->child->valuestring, &ids[i]));
        }
        t->tmpl_pre = malloc(sizeof(int32_t));
        t->tmpl_post = malloc(sizeof(int32_t));
        if (!t->tmpl_pre || !t->tmpl_post) return qf_fail(QF_ERR_NOMEM, "%s: no memory for the template", L->label);
        t->tmpl_pre[0] = ids[0];
        t->tmpl_post[0] = ids[1];
        t->n_pre = t->n_post = 1;
        return QF_OK;
    }
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: post_processor \"%s\" is not supported (ByteLevel, TemplateProcessing, "
                   "BertProcessing)",
                   L->label, type);
}

static qf_status load_decoder(loader *L, const cJSON *d) {
    if (!d || cJSON_IsNull(d)) return QF_OK;
    const char *type;
    if (!cJSON_IsObject(d)) return qf_fail(QF_ERR_FORMAT, "%s: decoder is %s, expected an object", L->label, jtype(d));
    QF_TRY(get_str(L, d, "type", "decoder", &type));
    if (type && !strcmp(type, "ByteLevel")) {
        L->t->decoder = DEC_BYTELEVEL;
        return QF_OK;
    }
    if (type && !strcmp(type, "WordPiece")) {
        static const char *const known[] = {"type", "prefix", "cleanup"};
        QF_TRY(only_keys(L, d, "decoder WordPiece", known, 3));
        const char *prefix;
        QF_TRY(get_str(L, d, "prefix", "decoder WordPiece", &prefix));
        QF_TRY(get_bool(L, d, "cleanup", "decoder WordPiece", 1, &L->t->dec_cleanup));
        if (!prefix) prefix = "##";
        QF_TRY(pool_add(L, prefix, strlen(prefix), &L->t->dec_prefix));
        L->t->decoder = DEC_WORDPIECE;
        return QF_OK;
    }
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: decoder \"%s\" is not supported (ByteLevel, WordPiece, or null)", L->label,
                   type ? type : "(no type)");
}

/* by_id: the string of every id, added tokens over the model's. */
static qf_status build_ids(loader *L) {
    qf_tokenizer *t = L->t;
    size_t limit = 0;
    for (size_t i = 0; i < t->n_voc; i++)
        if ((size_t)t->voc_id[i] + 1 > limit) limit = (size_t)t->voc_id[i] + 1;
    for (int i = 0; i < t->n_added; i++)
        if ((size_t)t->added[i].id + 1 > limit) limit = (size_t)t->added[i].id + 1;
    t->id_limit = limit;
    t->by_id = malloc((limit ? limit : 1) * sizeof *t->by_id);
    if (!t->by_id) return qf_fail(QF_ERR_NOMEM, "%s: no memory for an id table of %zu entries", L->label, limit);
    for (size_t i = 0; i < limit; i++) t->by_id[i] = (id_entry){NO_STR, 0, -1};
    for (size_t i = 0; i < t->n_voc; i++) {
        id_entry *e = &t->by_id[t->voc_id[i]];
        if (e->off != NO_STR)
            return qf_fail(QF_ERR_FORMAT, "%s: model.vocab gives id %d to both \"%s\" and \"%s\"", L->label,
                           t->voc_id[i], t->pool + e->off, t->pool + t->voc[i].off);
        e->off = t->voc[i].off;
        e->len = t->voc[i].len;
    }
    t->vocab_with_added = t->n_voc;
    for (int i = 0; i < t->n_added; i++) {
        const added_token *a = &t->added[i];
        id_entry *e = &t->by_id[a->id];
        if (e->added >= 0)
            return qf_fail(QF_ERR_FORMAT, "%s: added tokens \"%s\" and \"%s\" share id %d", L->label,
                           t->pool + t->added[e->added].s.off, t->pool + a->s.off, a->id);
        if (vocab_find(t, t->pool + a->s.off, a->s.len) < 0) t->vocab_with_added++;
        e->off = a->s.off;
        e->len = a->s.len;
        e->added = i;
    }
    return QF_OK;
}

/* GPT-2's byte <-> printable char table: printable Latin-1 bytes map to themselves, the other
 * 68 bytes to U+0100.. in byte order. */
static void build_bytes(qf_tokenizer *t) {
    int n = 0;
    for (int i = 0; i < 324; i++) t->cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : 256 + n++;
        t->cp_byte[cp] = (int16_t)b;
        if (cp < 0x80) {
            t->byte_utf8[b][0] = (char)cp;
            t->byte_len[b] = 1;
        } else {
            t->byte_utf8[b][0] = (char)(0xC0 | (cp >> 6));
            t->byte_utf8[b][1] = (char)(0x80 | (cp & 0x3F));
            t->byte_len[b] = 2;
        }
    }
}

void qf_tokenizer_free(qf_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].re);
    pcre2_code_free(t->alnum);
    free(t->label);
    free(t->pool);
    free(t->voc);
    free(t->voc_id);
    free(t->vhash);
    free(t->merges);
    free(t->by_id);
    free(t->added);
    free(t->ahash);
    free(t->set_raw.idx);
    free(t->set_norm.idx);
    free(t->tmpl_pre);
    free(t->tmpl_post);
    free(t);
}

/* Runs the normalizer steps on s[0..n) into a malloc'd, NUL-terminated *out (the caller frees
 * it). `what` names the text in messages. */
static qf_status normalize_text(const qf_tokenizer *t, const char *s, size_t n, const char *what, char **out,
                                size_t *out_len) {
    char *cur = malloc(n + 1);
    if (!cur) return qf_fail(QF_ERR_NOMEM, "%s: no memory to normalize %s (%zu bytes)", t->label, what, n);
    memcpy(cur, s, n);
    cur[n] = '\0';
    size_t len = n;
    for (int i = 0; i < t->n_norm; i++) {
        char *next = NULL;
        size_t next_len = 0;
        if (t->norm[i].kind == NORM_BERT) {
            qf_status st = qf_bert_normalize(&t->norm[i].bert, cur, len, &next, &next_len);
            free(cur);
            if (st != QF_OK) return st;
        } else {
            utf8proc_uint8_t *nf = NULL;
            utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)cur, (utf8proc_ssize_t)len, &nf,
                                              UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            free(cur);
            if (r < 0) {
                free(nf);
                return qf_fail(QF_ERR_ARG, "%s: NFC normalization of %s failed: %s", t->label, what, utf8proc_errmsg(r));
            }
            next = (char *)nf;
            next_len = (size_t)r;
        }
        cur = next;
        len = next_len;
    }
    *out = cur;
    *out_len = len;
    return QF_OK;
}

/* tokenizers (0.23) holds a `normalized` added token in its normalized form: it is matched in
 * that form, and decode and id_to_token give that form (measured: "New York" under a lowercasing
 * BertNormalizer decodes as "new york"). */
static qf_status load_normalized_added(loader *L) {
    qf_tokenizer *t = L->t;
    if (!t->n_norm) return QF_OK;
    for (int i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        if (!a->normalized) continue;
        char *nf;
        size_t nl;
        QF_TRY(normalize_text(t, t->pool + a->s.off, a->s.len, "an added token", &nf, &nl));
        qf_status s = QF_OK;
        if (nl != a->s.len || memcmp(nf, t->pool + a->s.off, nl)) {
            s = pool_add(L, nf, nl, &a->s);
            t->by_id[a->id].off = a->s.off;
            t->by_id[a->id].len = a->s.len;
        }
        free(nf);
        QF_TRY(s);
    }
    return QF_OK;
}

static qf_status load_root(loader *L, const cJSON *root) {
    qf_tokenizer *t = L->t;
    QF_TRY(load_model(L, cJSON_GetObjectItemCaseSensitive(root, "model")));
    QF_TRY(load_added(L, cJSON_GetObjectItemCaseSensitive(root, "added_tokens")));
    QF_TRY(build_ids(L));
    QF_TRY(build_set(L, 0, &t->set_raw));
    QF_TRY(load_normalizer(L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0));
    QF_TRY(load_normalized_added(L));
    QF_TRY(build_set(L, 1, &t->set_norm));
    QF_TRY(load_pretok(L, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0));
    QF_TRY(load_post(L, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0));
    QF_TRY(load_decoder(L, cJSON_GetObjectItemCaseSensitive(root, "decoder")));
    build_bytes(t);
    t->wp.prefix = t->pool + t->prefix.off; /* the pool no longer moves */
    return QF_OK;
}

qf_status qf_tokenizer_load_memory(const char *json, size_t len, const char *label, qf_tokenizer **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_tokenizer_load_memory: out is NULL");
    *out = NULL;
    if (!label) label = "<tokenizer>";
    if (!json && len) return qf_fail(QF_ERR_ARG, "%s: tokenizer text is NULL", label);
    cJSON *root = NULL;
    QF_TRY(qf_io_parse_json_object(json, len, label, "tokenizer", &root));
    qf_tokenizer *t = calloc(1, sizeof *t);
    size_t ln = strlen(label) + 1;
    char *lab = malloc(ln);
    if (!t || !lab) {
        free(t);
        free(lab);
        cJSON_Delete(root);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory for the tokenizer handle", label);
    }
    memcpy(lab, label, ln);
    t->label = lab;
    loader L = {t, lab};
    qf_status s = load_root(&L, root);
    cJSON_Delete(root);
    if (s != QF_OK) {
        qf_tokenizer_free(t);
        return s;
    }
    *out = t;
    return QF_OK;
}

qf_status qf_tokenizer_load(const char *path, qf_tokenizer **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_tokenizer_load: out is NULL");
    *out = NULL;
    unsigned char *buf;
    size_t len;
    QF_TRY(qf_io_read_file(path, TOK_MAX_FILE, "tokenizer", &buf, &len));
    qf_status s = qf_tokenizer_load_memory((const char *)buf, len, path, out);
    free(buf);
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* encoding                                                                                   */

typedef struct {
    int32_t id;
    int32_t prev, next;
    int alive;
} symbol;

typedef struct {
    uint32_t rank, pos;
    int32_t new_id;
} heap_entry;

typedef struct {
    size_t s, e;
    int match;
} span;

typedef struct {
    const qf_tokenizer *t;
    int32_t *ids;
    size_t cap, n;
    char *word;
    size_t word_cap;
    symbol *sym;
    size_t sym_cap;
    heap_entry *heap;
    size_t heap_cap;
    char *tmp;
    size_t tmp_cap;
    int32_t *wids;       /* WordPiece ids of one word */
    size_t wids_cap;
    pcre2_match_data *md;
} enc_ctx;

static qf_status grow(void **p, size_t *cap, size_t need, size_t elsize) {
    if (need <= *cap) return QF_OK;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elsize);
    if (!q) return qf_fail(QF_ERR_NOMEM, "qf_tokenizer_encode: no memory for %zu work items", c);
    *p = q;
    *cap = c;
    return QF_OK;
}

static void emit(enc_ctx *c, int32_t id) {
    if (c->n < c->cap) c->ids[c->n] = id;
    c->n++;
}

static int heap_less(const heap_entry *a, const heap_entry *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(heap_entry *h, size_t *n, heap_entry e) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static heap_entry heap_pop(heap_entry *h, size_t *n) {
    heap_entry top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const heap_entry *best = &last;
        if (l < *n && heap_less(&h[l], best)) m = l, best = &h[l];
        if (r < *n && heap_less(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

/* Looks up prefix? + s + suffix? in the vocab. */
static qf_status lookup_affixed(enc_ctx *c, const char *s, size_t n, int first, int last, int32_t *id) {
    const qf_tokenizer *t = c->t;
    size_t pl = first ? 0 : t->prefix.len, sl = last ? t->suffix.len : 0;
    if (!pl && !sl) {
        *id = vocab_id(t, s, n);
        return QF_OK;
    }
    QF_TRY(grow((void **)&c->tmp, &c->tmp_cap, pl + n + sl, 1));
    memcpy(c->tmp, t->pool + t->prefix.off, pl);
    memcpy(c->tmp + pl, s, n);
    memcpy(c->tmp + pl + n, t->pool + t->suffix.off, sl);
    *id = vocab_id(t, c->tmp, pl + n + sl);
    return QF_OK;
}

/* The BPE model on one word (already byte-mapped when the pipeline has ByteLevel). */
static qf_status bpe_word(enc_ctx *c, const char *w, size_t n) {
    const qf_tokenizer *t = c->t;
    if (!n) return QF_OK;
    if (t->ignore_merges) {
        int32_t id = vocab_id(t, w, n);
        if (id >= 0) {
            emit(c, id);
            return QF_OK;
        }
    }
    /* each char yields at most 4 symbols (byte fallback) */
    QF_TRY(grow((void **)&c->sym, &c->sym_cap, 4 * n + 1, sizeof *c->sym));
    symbol *sym = c->sym;
    size_t ns = 0;
    int32_t unk_pending = -1;
    for (size_t i = 0; i < n;) {
        size_t cl;
        (void)utf8_decode((const unsigned char *)w + i, &cl);
        int32_t id;
        QF_TRY(lookup_affixed(c, w + i, cl, i == 0, i + cl == n, &id));
        if (id >= 0) {
            if (unk_pending >= 0) sym[ns++].id = unk_pending, unk_pending = -1;
            sym[ns++].id = id;
        } else {
            int done = 0;
            if (t->byte_fallback) {
                /* tokenizers tries <0xXX> for each byte of the (affixed) char */
                int32_t bid[4];
                int ok = 1;
                for (size_t k = 0; k < cl && ok; k++) {
                    char name[8];
                    snprintf(name, sizeof name, "<0x%02X>", (unsigned char)w[i + k]);
                    bid[k] = vocab_id(t, name, 6);
                    ok = bid[k] >= 0;
                }
                if (ok) {
                    /* as in tokenizers, a pending unk is not flushed before byte tokens */
                    for (size_t k = 0; k < cl; k++) sym[ns++].id = bid[k];
                    done = 1;
                }
            }
            if (!done && t->unk_id >= 0) {
                if (unk_pending >= 0 && !t->fuse_unk) sym[ns++].id = unk_pending;
                unk_pending = t->unk_id;
            }
        }
        i += cl;
    }
    if (unk_pending >= 0) sym[ns++].id = unk_pending;
    if (!ns) return QF_OK;
    for (size_t i = 0; i < ns; i++) {
        sym[i].prev = (int32_t)i - 1;
        sym[i].next = i + 1 < ns ? (int32_t)i + 1 : -1;
        sym[i].alive = 1;
    }
    /* initial pairs, plus at most two new pairs per merge (<= ns - 1 merges) */
    QF_TRY(grow((void **)&c->heap, &c->heap_cap, 3 * ns + 1, sizeof *c->heap));
    heap_entry *h = c->heap;
    size_t nh = 0;
    for (size_t i = 0; i + 1 < ns; i++) {
        const merge_slot *m = merge_find(t, sym[i].id, sym[i + 1].id);
        if (m) heap_push(h, &nh, (heap_entry){m->rank, (uint32_t)i, m->new_id});
    }
    while (nh) {
        heap_entry top = heap_pop(h, &nh);
        symbol *cur = &sym[top.pos];
        if (!cur->alive || cur->next < 0) continue;
        symbol *right = &sym[cur->next];
        /* stale entry? tokenizers compares only the merged id, so do we */
        const merge_slot *m = merge_find(t, cur->id, right->id);
        if (!m || m->new_id != top.new_id) continue;
        cur->id = top.new_id;
        right->alive = 0;
        cur->next = right->next;
        if (right->next >= 0) sym[right->next].prev = (int32_t)top.pos;
        if (cur->prev >= 0) {
            m = merge_find(t, sym[cur->prev].id, cur->id);
            if (m) heap_push(h, &nh, (heap_entry){m->rank, (uint32_t)cur->prev, m->new_id});
        }
        if (cur->next >= 0) {
            m = merge_find(t, cur->id, sym[cur->next].id);
            if (m) heap_push(h, &nh, (heap_entry){m->rank, top.pos, m->new_id});
        }
    }
    for (size_t i = 0; i < ns; i++)
        if (sym[i].alive) emit(c, sym[i].id);
    return QF_OK;
}

static int32_t vocab_lookup(const void *t, const char *s, size_t n) { return vocab_id(t, s, n); }

/* The WordPiece model on one word (wordpiece.c). */
static qf_status wordpiece_word(enc_ctx *c, const char *w, size_t n) {
    const qf_tokenizer *t = c->t;
    if (!n) return QF_OK;
    QF_TRY(grow((void **)&c->tmp, &c->tmp_cap, t->wp.prefix_len + n, 1));
    QF_TRY(grow((void **)&c->wids, &c->wids_cap, n, sizeof *c->wids));
    size_t k;
    qf_wordpiece_word(&t->wp, w, n, vocab_lookup, t, c->tmp, c->wids, &k);
    for (size_t i = 0; i < k; i++) emit(c, c->wids[i]);
    return QF_OK;
}

static qf_status model_word(enc_ctx *c, const char *w, size_t n) {
    return c->t->wordpiece ? wordpiece_word(c, w, n) : bpe_word(c, w, n);
}

/* Maps the bytes of a piece to byte-level chars (if the pipeline has ByteLevel), then the model. */
static qf_status model_piece(enc_ctx *c, const char *s, size_t n) {
    const qf_tokenizer *t = c->t;
    if (!t->byte_level) return model_word(c, s, n);
    QF_TRY(grow((void **)&c->word, &c->word_cap, 2 * n, 1));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        c->word[k++] = t->byte_utf8[b][0];
        if (t->byte_len[b] == 2) c->word[k++] = t->byte_utf8[b][1];
    }
    return model_word(c, c->word, k);
}

/* Next match of re in s[0..n) at or after `from`; *found = 0 when none. Empty matches are
 * skipped (they make empty pieces, which tokenizers drops). */
static qf_status next_match(enc_ctx *c, const pcre2_code *re, const char *s, size_t n, size_t from,
                            size_t *ms, size_t *me, int *found) {
    *found = 0;
    while (from <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, c->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) return QF_OK;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return qf_fail(QF_ERR_UNSUPPORTED, "%s: pre_tokenizer regex failed on a %zu-byte piece: %s",
                           c->t->label, n, (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        if (ov[1] > ov[0]) {
            *ms = ov[0];
            *me = ov[1];
            *found = 1;
            return QF_OK;
        }
        if (ov[0] >= n) return QF_OK;
        size_t cl;
        (void)utf8_decode((const unsigned char *)s + ov[0], &cl);
        from = ov[0] + cl;
    }
    return QF_OK;
}

static qf_status pretok(enc_ctx *c, int step, const char *s, size_t n);

/* One Split step (or ByteLevel's regex) over s: the matches and the text between them, joined
 * per behavior, each non-empty piece sent to the next step. */
static qf_status split_step(enc_ctx *c, int step, const pcre2_code *re, int behavior, int invert,
                            const char *s, size_t n) {
    span *sp = NULL;
    size_t nsp = 0, cap = 0, from = 0, prev = 0;
    qf_status st = QF_OK;
    for (;;) {
        size_t ms, me;
        int found;
        st = next_match(c, re, s, n, from, &ms, &me, &found);
        if (st != QF_OK || !found) break;
        if ((st = grow((void **)&sp, &cap, nsp + 2, sizeof *sp)) != QF_OK) break;
        if (ms > prev) sp[nsp++] = (span){prev, ms, 0};
        sp[nsp++] = (span){ms, me, 1};
        prev = from = me;
    }
    if (st == QF_OK && prev < n) {
        if ((st = grow((void **)&sp, &cap, nsp + 1, sizeof *sp)) == QF_OK) sp[nsp++] = (span){prev, n, 0};
    }
    if (st != QF_OK) {
        free(sp);
        return st;
    }
    if (invert)
        for (size_t i = 0; i < nsp; i++) sp[i].match = !sp[i].match;
    size_t k = 0;
    int prev_match = 0;
    switch (behavior) {
    case B_REMOVED:
        for (size_t i = 0; i < nsp; i++)
            if (!sp[i].match) sp[k++] = sp[i];
        break;
    case B_ISOLATED:
        k = nsp;
        break;
    case B_PREV: /* a match joins the piece before it */
        for (size_t i = 0; i < nsp; i++) {
            if (sp[i].match && !prev_match && k) sp[k - 1].e = sp[i].e;
            else sp[k++] = sp[i];
            prev_match = sp[i].match;
        }
        break;
    case B_NEXT: { /* a match joins the piece after it: the same, walking backwards */
        size_t w = nsp;
        for (size_t i = nsp; i-- > 0;) {
            if (sp[i].match && !prev_match && w < nsp) sp[w].s = sp[i].s;
            else sp[--w] = sp[i];
            prev_match = sp[i].match;
        }
        memmove(sp, sp + w, (nsp - w) * sizeof *sp);
        k = nsp - w;
        break;
    }
    case B_CONTIGUOUS: /* runs of matches, runs of non-matches */
        for (size_t i = 0; i < nsp; i++) {
            if (k && sp[i].match == prev_match) sp[k - 1].e = sp[i].e;
            else sp[k++] = sp[i];
            prev_match = sp[i].match;
        }
        break;
    }
    for (size_t i = 0; i < k && st == QF_OK; i++)
        if (sp[i].e > sp[i].s) st = pretok(c, step + 1, s + sp[i].s, sp[i].e - sp[i].s);
    free(sp);
    return st;
}

typedef struct {
    enc_ctx *c;
    int step;
} bert_step;

static qf_status bert_piece(void *p, const char *s, size_t n) {
    bert_step *b = p;
    return pretok(b->c, b->step + 1, s, n);
}

/* Runs pre-tokenizer steps step.. on a non-empty piece, then the model. */
static qf_status pretok(enc_ctx *c, int step, const char *s, size_t n) {
    const qf_tokenizer *t = c->t;
    if (!n) return QF_OK;
    if (step == t->n_steps) return model_piece(c, s, n);
    const pretok_step *st = &t->steps[step];
    if (st->kind == STEP_BERT) {
        bert_step b = {c, step};
        return qf_bert_pretokenize(s, n, bert_piece, &b);
    }
    if (st->kind == STEP_SPLIT) return split_step(c, step, st->re, st->behavior, st->invert, s, n);
    /* ByteLevel: optional prefix space, optional GPT-2 split (the byte mapping is model_piece's) */
    char *buf = NULL;
    if (st->add_prefix_space && s[0] != ' ') {
        buf = malloc(n + 1);
        if (!buf) return qf_fail(QF_ERR_NOMEM, "qf_tokenizer_encode: no memory for a %zu-byte piece", n + 1);
        buf[0] = ' ';
        memcpy(buf + 1, s, n);
        s = buf;
        n++;
    }
    qf_status r = st->re ? split_step(c, step, st->re, B_ISOLATED, 0, s, n) : pretok(c, step + 1, s, n);
    free(buf);
    return r;
}

/* Rust regex's Unicode \w on the char at s (tokenizers' single_word test). */
static int is_alnum_at(enc_ctx *c, const char *s, size_t n, size_t at) {
    return pcre2_match(c->t->alnum, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, c->md, NULL) >= 0;
}

/* Cuts the added tokens of `set` out of s[0..n) (tokenizers' AddedVocabulary::find_matches):
 * leftmost-longest, non-overlapping; plain pieces go on to `then`. */
static qf_status split_added(enc_ctx *c, const added_set *set, const char *s, size_t n,
                             qf_status (*then)(enc_ctx *, const char *, size_t)) {
    const qf_tokenizer *t = c->t;
    if (!set->count) return then(c, s, n);
    size_t start_offset = 0, i = 0;
    while (i < n) {
        unsigned char b = (unsigned char)s[i];
        int best = -1;
        uint32_t best_len = 0;
        for (uint32_t k = set->start[b]; k < set->start[b + 1]; k++) {
            const added_token *a = &t->added[set->idx[k]];
            if (a->s.len > best_len && a->s.len <= n - i && !memcmp(t->pool + a->s.off, s + i, a->s.len)) {
                best = set->idx[k];
                best_len = a->s.len;
            }
        }
        if (best < 0) {
            i++;
            continue;
        }
        const added_token *a = &t->added[best];
        size_t start = i, stop = i + best_len;
        i = stop; /* the scan goes on after the match even if it is discarded */
        if (a->single_word) {
            int word_before = 0, word_after = 0;
            if (start > 0) {
                size_t p = start - 1;
                while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                word_before = is_alnum_at(c, s, n, p);
            }
            if (stop < n) word_after = is_alnum_at(c, s, n, stop);
            if (word_before || word_after) continue;
        }
        if (a->lstrip) {
            size_t p = start;
            while (p > 0) {
                size_t q = p - 1, cl;
                while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
                if (!is_white(utf8_decode((const unsigned char *)s + q, &cl))) break;
                p = q;
            }
            start = p > start_offset ? p : start_offset;
        }
        if (a->rstrip) {
            size_t cl;
            while (stop < n && is_white(utf8_decode((const unsigned char *)s + stop, &cl))) stop += cl;
        }
        if (start_offset < start) QF_TRY(then(c, s + start_offset, start - start_offset));
        emit(c, a->id);
        start_offset = stop;
        /* an rstrip may have eaten past the scan position: do not match inside what it took */
        if (i < stop) i = stop;
    }
    if (start_offset < n) QF_TRY(then(c, s + start_offset, n - start_offset));
    return QF_OK;
}

static qf_status after_norm_added(enc_ctx *c, const char *s, size_t n) {
    return pretok(c, 0, s, n);
}

/* A piece between non-normalized added tokens: normalize, then cut the normalized ones. */
static qf_status normalize_piece(enc_ctx *c, const char *s, size_t n) {
    const qf_tokenizer *t = c->t;
    if (!n) return QF_OK;
    if (!t->n_norm) return split_added(c, &t->set_norm, s, n, after_norm_added);
    char *nf;
    size_t nl;
    QF_TRY(normalize_text(t, s, n, "the text", &nf, &nl));
    qf_status st = split_added(c, &t->set_norm, nf, nl, after_norm_added);
    free(nf);
    return st;
}

qf_status qf_tokenizer_encode(const qf_tokenizer *t, const char *text, size_t len, int add_special,
                              int32_t *ids, size_t cap, size_t *n) {
    if (n) *n = 0;
    if (!t || !n) return qf_fail(QF_ERR_ARG, "qf_tokenizer_encode: NULL tokenizer or n");
    if (!text && len) return qf_fail(QF_ERR_ARG, "qf_tokenizer_encode: text is NULL but len = %zu", len);
    if (!ids && cap) return qf_fail(QF_ERR_ARG, "qf_tokenizer_encode: ids is NULL but cap = %zu", cap);
    size_t bad;
    if (len && !utf8_valid((const unsigned char *)text, len, &bad))
        return qf_fail(QF_ERR_ARG, "qf_tokenizer_encode: text is not valid UTF-8: byte 0x%02x at offset %zu",
                       (unsigned char)text[bad], bad);
    enc_ctx c = {0};
    c.t = t;
    c.ids = ids;
    c.cap = cap;
    c.md = pcre2_match_data_create(1, NULL);
    if (!c.md) return qf_fail(QF_ERR_NOMEM, "qf_tokenizer_encode: no memory for regex match data");
    if (add_special)
        for (size_t i = 0; i < t->n_pre; i++) emit(&c, t->tmpl_pre[i]);
    qf_status st = len ? split_added(&c, &t->set_raw, text, len, normalize_piece) : QF_OK;
    if (add_special && st == QF_OK)
        for (size_t i = 0; i < t->n_post; i++) emit(&c, t->tmpl_post[i]);
    pcre2_match_data_free(c.md);
    free(c.word);
    free(c.sym);
    free(c.heap);
    free(c.tmp);
    free(c.wids);
    if (st != QF_OK) return st;
    *n = c.n;
    if (c.n > cap && (ids || cap))
        return qf_fail(QF_ERR_ARG, "qf_tokenizer_encode: the text needs %zu ids but cap is %zu", c.n, cap);
    return QF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* decoding, lookups                                                                          */

typedef struct {
    char *out;
    size_t cap, len;
} sink;

static void put(sink *k, const void *p, size_t n) {
    if (k->len < k->cap) {
        size_t m = k->cap - k->len < n ? k->cap - k->len : n;
        memcpy(k->out + k->len, p, m);
    }
    k->len += n;
}

/* Appends bytes, replacing ill-formed UTF-8 by U+FFFD per maximal subpart. */
static void put_lossy(sink *k, const unsigned char *b, size_t n) {
    size_t i = 0, run = 0;
    while (i < n) {
        size_t l = b[i] < 0x80 ? 1 : utf8_seq(b + i, n - i);
        if (l) {
            i += l;
            continue;
        }
        put(k, b + run, i - run);
        put(k, "\xEF\xBF\xBD", 3);
        i += utf8_bad_len(b + i, n - i);
        run = i;
    }
    put(k, b + run, n - run);
}

qf_status qf_tokenizer_decode(const qf_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                              char *out, size_t cap, size_t *len) {
    if (len) *len = 0;
    if (!t || !len) return qf_fail(QF_ERR_ARG, "qf_tokenizer_decode: NULL tokenizer or len");
    if (!ids && n) return qf_fail(QF_ERR_ARG, "qf_tokenizer_decode: ids is NULL but n = %zu", n);
    if (!out && cap) return qf_fail(QF_ERR_ARG, "qf_tokenizer_decode: out is NULL but cap = %zu", cap);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->id_limit || t->by_id[id].off == NO_STR)
            return qf_fail(QF_ERR_ARG, "qf_tokenizer_decode: ids[%zu] = %d is not a token id (ids are 0..%zu)",
                           i, id, t->id_limit ? t->id_limit - 1 : 0);
        total += t->by_id[id].len + 1;
    }
    /* the byte string the tokens spell, before the lossy UTF-8 pass */
    unsigned char *bytes = malloc(total ? total : 1);
    if (!bytes) return qf_fail(QF_ERR_NOMEM, "qf_tokenizer_decode: no memory for %zu bytes", total);
    size_t nb = 0;
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        const id_entry *e = &t->by_id[ids[i]];
        if (skip_special && e->added >= 0 && t->added[e->added].special) continue;
        const unsigned char *s = (const unsigned char *)t->pool + e->off;
        if (t->decoder == DEC_WORDPIECE) { /* at most len + 1 bytes: a space, no rule lengthens */
            nb += qf_wordpiece_decode_token((const char *)s, e->len, first, t->pool + t->dec_prefix.off,
                                            t->dec_prefix.len, t->dec_cleanup, (char *)bytes + nb);
            first = 0;
            continue;
        }
        if (t->decoder == DEC_NONE) { /* no decoder: tokens joined by spaces */
            if (!first) bytes[nb++] = ' ';
            memcpy(bytes + nb, s, e->len);
            nb += e->len;
            first = 0;
            continue;
        }
        /* every char a byte-level char -> its bytes; otherwise the token's own text */
        size_t start = nb, j = 0;
        int mapped = 1;
        while (j < e->len) {
            size_t cl;
            uint32_t cp = utf8_decode(s + j, &cl);
            if (cp >= 324 || t->cp_byte[cp] < 0) {
                mapped = 0;
                break;
            }
            bytes[nb++] = (unsigned char)t->cp_byte[cp];
            j += cl;
        }
        if (!mapped) {
            nb = start;
            memcpy(bytes + nb, s, e->len);
            nb += e->len;
        }
    }
    sink k = {out, cap, 0};
    put_lossy(&k, bytes, nb);
    free(bytes);
    *len = k.len;
    if (out && cap) {
        if (k.len >= cap) {
            out[cap - 1] = '\0';
            return qf_fail(QF_ERR_ARG, "qf_tokenizer_decode: the text needs %zu bytes plus a NUL but cap is %zu",
                           k.len, cap);
        }
        out[k.len] = '\0';
    }
    return QF_OK;
}

qf_status qf_tokenizer_token_to_id(const qf_tokenizer *t, const char *token, size_t len, int32_t *id) {
    if (!t || (!token && len) || !id) return qf_fail(QF_ERR_ARG, "qf_tokenizer_token_to_id: NULL argument");
    if (!token) token = "";
    int64_t a = added_find(t, token, len);
    if (a >= 0) {
        *id = t->added[a].id;
        return QF_OK;
    }
    int32_t v = vocab_id(t, token, len);
    if (v < 0)
        return qf_fail(QF_ERR_NOT_FOUND, "%s: no token \"%.*s\"", t->label, len > 200 ? 200 : (int)len, token);
    *id = v;
    return QF_OK;
}

qf_status qf_tokenizer_id_to_token(const qf_tokenizer *t, int32_t id, const char **token) {
    if (!t || !token) return qf_fail(QF_ERR_ARG, "qf_tokenizer_id_to_token: NULL argument");
    *token = NULL;
    if (id < 0 || (size_t)id >= t->id_limit || t->by_id[id].off == NO_STR)
        return qf_fail(QF_ERR_NOT_FOUND, "%s: no token has id %d", t->label, id);
    *token = t->pool + t->by_id[id].off;
    return QF_OK;
}

size_t qf_tokenizer_vocab_size(const qf_tokenizer *t, int with_added) {
    if (!t) return 0;
    return with_added ? t->vocab_with_added : t->n_voc;
}

size_t qf_tokenizer_id_limit(const qf_tokenizer *t) { return t ? t->id_limit : 0; }

int qf_tokenizer_is_special(const qf_tokenizer *t, int32_t id) {
    if (!t || id < 0 || (size_t)id >= t->id_limit) return 0;
    int32_t a = t->by_id[id].added;
    return a >= 0 && t->added[a].special;
}
