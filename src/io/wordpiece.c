/* wordpiece.c - the BERT stages of a Hugging Face tokenizer.json (see wordpiece.h): the
 * BertNormalizer, the BertPreTokenizer, the WordPiece model on one word and the WordPiece
 * decoder's per-token rule, with the semantics of the `tokenizers` library (0.2x):
 *   normalizers/bert.rs, pre_tokenizers/bert.rs, models/wordpiece/mod.rs, decoders/wordpiece.rs.
 *
 * Character classes come from utf8proc (its Unicode version, 15.0 for utf8proc 2.8), where
 * tokenizers uses Rust's std (White_Space, lowercase) and the unicode_categories crate (control,
 * punctuation, nonspacing mark). Measured against tokenizers 0.23.2: unassigned code points
 * (Cn) are not controls there (kept), private use (Co) is (dropped), and a character's lowercase
 * is taken alone (no final-sigma rule). Characters whose category changed between the Unicode
 * versions may be classed differently.
 *
 * Invariants: every function maps whole characters to whole characters of valid UTF-8 and keeps
 * no state between calls (many threads may call at once); the input is valid UTF-8 (the
 * tokenizer validates the text it is given, and every stage before this one keeps it valid). */
#include "wordpiece.h"
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* Decodes the char at s (valid UTF-8); *len receives its byte length. */
static uint32_t wp_decode(const unsigned char *s, size_t *len) {
    unsigned c = s[0];
    if (c < 0x80) { *len = 1; return c; }
    if (c < 0xE0) { *len = 2; return ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu); }
    if (c < 0xF0) { *len = 3; return ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu); }
    *len = 4;
    return ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
}

static size_t wp_encode(uint32_t c, char *o) {
    if (c < 0x80) { o[0] = (char)c; return 1; }
    if (c < 0x800) { o[0] = (char)(0xC0 | (c >> 6)); o[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | (c >> 12));
        o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (c >> 18));
    o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* Rust's char::is_whitespace: the White_Space property. */
static int wp_white(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* bert.rs is_control: Cc Cf Co Cs, except \t \n \r (which count as whitespace). */
static int wp_control(uint32_t c) {
    if (c == '\t' || c == '\n' || c == '\r') return 0;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_CC || k == UTF8PROC_CATEGORY_CF || k == UTF8PROC_CATEGORY_CO ||
           k == UTF8PROC_CATEGORY_CS;
}

/* bert.rs is_chinese_char: the CJK ideograph blocks. */
static int wp_chinese(uint32_t c) {
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

/* pre_tokenizers/bert.rs is_bert_punc: ASCII punctuation or a P* category. */
static int wp_punct(uint32_t c) {
    if (c < 0x80)
        return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
               (c >= 0x7B && c <= 0x7E);
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

qf_status qf_bert_normalize(const qf_bert_normalizer *bn, const char *s, size_t n, char **out,
                            size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    /* worst case: every char a CJK ideograph (3 bytes -> 5), or U+0130 (2 bytes -> 3) */
    size_t cap = 2 * n + 1;
    char *a = malloc(cap);
    if (!a) return qf_fail(QF_ERR_NOMEM, "BertNormalizer: no memory for a %zu-byte piece", n);
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t cl;
        uint32_t c = wp_decode((const unsigned char *)s + i, &cl);
        i += cl;
        if (bn->clean_text) {
            if (c == 0 || c == 0xFFFD || wp_control(c)) continue;
            if (c == '\t' || c == '\n' || c == '\r' || wp_white(c)) c = ' ';
        }
        if (bn->handle_chinese_chars && wp_chinese(c)) {
            a[k++] = ' ';
            k += wp_encode(c, a + k);
            a[k++] = ' ';
        } else {
            k += wp_encode(c, a + k);
        }
    }
    a[k] = '\0';
    if (bn->strip_accents && k) {
        utf8proc_uint8_t *nfd = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)a, (utf8proc_ssize_t)k, &nfd,
                                          UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
        free(a);
        if (r < 0) {
            free(nfd);
            return qf_fail(QF_ERR_ARG, "BertNormalizer: NFD failed: %s", utf8proc_errmsg(r));
        }
        /* drop nonspacing marks in place (the text only shrinks) */
        size_t w = 0;
        for (size_t i = 0; i < (size_t)r;) {
            size_t cl;
            uint32_t c = wp_decode(nfd + i, &cl);
            if (utf8proc_category((utf8proc_int32_t)c) != UTF8PROC_CATEGORY_MN) {
                memmove(nfd + w, nfd + i, cl);
                w += cl;
            }
            i += cl;
        }
        a = malloc(w + 1);
        if (!a) {
            free(nfd);
            return qf_fail(QF_ERR_NOMEM, "BertNormalizer: no memory for a %zu-byte piece", w);
        }
        memcpy(a, nfd, w);
        free(nfd);
        k = w;
        a[k] = '\0';
    }
    if (bn->lowercase) {
        /* a lowercase is at most 1.5x the bytes of its char (U+0130 -> "i\u0307" and
         * U+023A -> U+2C65 are 2 -> 3), so 2x is room enough */
        char *b = malloc(2 * k + 1);
        if (!b) {
            free(a);
            return qf_fail(QF_ERR_NOMEM, "BertNormalizer: no memory for a %zu-byte piece", k);
        }
        size_t m = 0;
        for (size_t i = 0; i < k;) {
            size_t cl;
            uint32_t c = wp_decode((const unsigned char *)a + i, &cl);
            i += cl;
            if (c == 0x130) {
                b[m++] = 'i';
                m += wp_encode(0x307, b + m);
            } else {
                m += wp_encode((uint32_t)utf8proc_tolower((utf8proc_int32_t)c), b + m);
            }
        }
        free(a);
        a = b;
        k = m;
        a[k] = '\0';
    }
    *out = a;
    *out_len = k;
    return QF_OK;
}

qf_status qf_bert_pretokenize(const char *s, size_t n, qf_piece_fn piece, void *ctx) {
    size_t word = 0; /* start of the current word */
    for (size_t i = 0; i < n;) {
        size_t cl;
        uint32_t c = wp_decode((const unsigned char *)s + i, &cl);
        int white = wp_white(c), punct = !white && wp_punct(c);
        if (white || punct) {
            if (i > word) QF_TRY(piece(ctx, s + word, i - word));
            if (punct) QF_TRY(piece(ctx, s + i, cl));
            word = i + cl;
        }
        i += cl;
    }
    if (n > word) QF_TRY(piece(ctx, s + word, n - word));
    return QF_OK;
}

void qf_wordpiece_word(const qf_wordpiece *wp, const char *w, size_t n, qf_vocab_fn lookup,
                       const void *vctx, char *tmp, int32_t *ids, size_t *n_ids) {
    *n_ids = 0;
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) chars += ((unsigned char)w[i] & 0xC0) != 0x80;
    if (chars > wp->max_chars) {
        ids[(*n_ids)++] = wp->unk_id;
        return;
    }
    memcpy(tmp, wp->prefix, wp->prefix_len);
    size_t start = 0, k = 0;
    while (start < n) {
        size_t pl = start ? wp->prefix_len : 0;
        /* the longest candidate a vocab token could match, cut back to a char boundary */
        size_t end = n;
        if (wp->max_token_len < pl + (n - start)) {
            end = wp->max_token_len > pl ? start + (wp->max_token_len - pl) : start;
            while (end > start && ((unsigned char)w[end] & 0xC0) == 0x80) end--;
        }
        int32_t id = -1;
        while (end > start) {
            if (pl) {
                memcpy(tmp + pl, w + start, end - start);
                id = lookup(vctx, tmp, pl + end - start);
            } else {
                id = lookup(vctx, w + start, end - start);
            }
            if (id >= 0) break;
            do end--; /* drop the last char */
            while (end > start && ((unsigned char)w[end] & 0xC0) == 0x80);
        }
        if (id < 0) { /* no piece matches here: the whole word is unknown */
            ids[0] = wp->unk_id;
            *n_ids = 1;
            return;
        }
        ids[k++] = id;
        start = end;
    }
    *n_ids = k;
}

/* Replaces every from (non-overlapping, left to right, as Rust's str::replace) by to, in place;
 * to is never longer than from, so writing never overtakes reading. Returns the new length. */
static size_t replace_all(char *b, size_t n, const char *from, const char *to) {
    size_t fl = strlen(from), tl = strlen(to), r = 0, w = 0;
    while (r < n) {
        if (n - r >= fl && !memcmp(b + r, from, fl)) {
            memmove(b + w, to, tl);
            w += tl;
            r += fl;
        } else {
            b[w++] = b[r++];
        }
    }
    return w;
}

size_t qf_wordpiece_decode_token(const char *tok, size_t n, int first, const char *prefix,
                                 size_t prefix_len, int cleanup, char *out) {
    size_t k = 0;
    if (!first && n >= prefix_len && !memcmp(tok, prefix, prefix_len)) {
        tok += prefix_len;
        n -= prefix_len;
    } else if (!first) {
        out[k++] = ' ';
    }
    memcpy(out + k, tok, n);
    k += n;
    if (cleanup) {
        static const char *const rules[][2] = {{" .", "."},       {" ?", "?"},   {" !", "!"},   {" ,", ","},
                                               {" ' ", "'"},      {" n't", "n't"}, {" 'm", "'m"},
                                               {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"},
                                               {" 're", "'re"}};
        for (size_t i = 0; i < sizeof rules / sizeof *rules; i++) k = replace_all(out, k, rules[i][0], rules[i][1]);
    }
    return k;
}
