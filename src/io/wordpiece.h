/* wordpiece.h - the BERT stages of a tokenizer.json, for src/io/tokenizer.c only: the
 * BertNormalizer, the BertPreTokenizer, the WordPiece model on one word and the WordPiece
 * decoder's rule for one token (src/io/wordpiece.c). tokenizer.c owns the pipeline, the vocab and
 * the added tokens; these functions see the vocab only through a lookup callback, so they keep
 * no state and are safe on many threads at once.
 * All text in and out is valid UTF-8 (tokenizer.c validates the input; every stage maps whole
 * characters to whole characters). */
#ifndef QF_WORDPIECE_H
#define QF_WORDPIECE_H

#include "internal.h"

/* tokenizers' BertNormalizer. strip_accents is already resolved (JSON null = lowercase). */
typedef struct {
    uint8_t clean_text, handle_chinese_chars, strip_accents, lowercase;
} qf_bert_normalizer;

/* Normalizes s[0..n) into a malloc'd buffer *out (NUL-terminated; *out_len excludes the NUL):
 * clean_text (drop NUL, U+FFFD and controls other than \t \n \r, i.e. categories Cc Cf Co Cs;
 * map White_Space and \t \n \r to ' '), then spaces around CJK ideographs, then NFD with
 * nonspacing marks (Mn) dropped, then per-character full lowercase (Rust's char::to_lowercase:
 * simple mappings plus U+0130 -> "i\u0307"). The caller frees *out. */
qf_status qf_bert_normalize(const qf_bert_normalizer *bn, const char *s, size_t n, char **out,
                            size_t *out_len);

/* tokenizers' BertPreTokenizer on s[0..n): splits on White_Space (removed), then every
 * punctuation character (ASCII punctuation or a P* category) is a piece of its own. Calls
 * piece(ctx, start, len) for each non-empty piece in order; stops at the first error. */
typedef qf_status (*qf_piece_fn)(void *ctx, const char *s, size_t n);
qf_status qf_bert_pretokenize(const char *s, size_t n, qf_piece_fn piece, void *ctx);

/* The WordPiece model's settings. max_token_len: the longest vocab token in bytes (bounds the
 * search; no longer substring can match). */
typedef struct {
    const char *prefix;    /* continuing_subword_prefix, e.g. "##" */
    size_t prefix_len;
    size_t max_chars;      /* max_input_chars_per_word */
    size_t max_token_len;
    int32_t unk_id;        /* the unk_token's id (always in the vocab: the loader checks) */
} qf_wordpiece;

/* Id of s[0..n) in the model vocab, or -1. */
typedef int32_t (*qf_vocab_fn)(const void *ctx, const char *s, size_t n);

/* WordPiece on one word w[0..n) (n > 0): greedy longest match first from the left, pieces after
 * the first looked up with the prefix; a word longer than max_chars characters, or one with a
 * position where no piece matches, becomes the single unk id. Writes the ids to ids[] (room for
 * n ids is enough: every piece covers at least one byte), *n_ids their count. tmp: a buffer of
 * at least prefix_len + n bytes for the prefixed lookups. */
void qf_wordpiece_word(const qf_wordpiece *wp, const char *w, size_t n, qf_vocab_fn lookup,
                       const void *vctx, char *tmp, int32_t *ids, size_t *n_ids);

/* tokenizers' WordPiece decoder on one token tok[0..n), the i-th kept token (first = i == 0):
 * after the first, a token starting with prefix loses it, any other gets a leading space; then
 * with cleanup the fixed replacements (" ." -> "." ... " do not" -> " don't") run over the
 * token's text. Writes to out (room for n + 1 bytes is enough: no rule lengthens the text) and
 * returns the length. */
size_t qf_wordpiece_decode_token(const char *tok, size_t n, int first, const char *prefix,
                                 size_t prefix_len, int cleanup, char *out);

#endif
