/* qfuse_text.h - text side of libqfuse: the Hugging Face tokenizer.json tokenizer, byte-level BPE
 * (GPT-2, LLaMA-3, Qwen2, OPT) and BERT WordPiece (InstructBLIP's Q-Former) (included by qfuse.h;
 * do not include it alone). Owned by src/io/tokenizer.c (BERT stages: src/io/wordpiece.c).
 *
 * USAGE
 *
 *   qf_tokenizer *tok;
 *   if (qf_tokenizer_load("tokenizer.json", &tok) != QF_OK) { puts(qf_last_error()); return 1; }
 *   const char *text = "<image> describe the emotion";
 *   size_t n;                                   // 1st call: ids = NULL, cap = 0 asks the size
 *   qf_tokenizer_encode(tok, text, strlen(text), 1, NULL, 0, &n);
 *   int32_t *ids = malloc(n * sizeof *ids);
 *   qf_tokenizer_encode(tok, text, strlen(text), 1, ids, n, &n);
 *   char out[256];
 *   size_t len;                                 // out is NUL-terminated; len excludes the NUL
 *   if (qf_tokenizer_decode(tok, ids, n, 1, out, sizeof out, &len) != QF_OK) ...;
 *   qf_tokenizer_free(tok);
 *
 * WHAT IS SUPPORTED (anything else in the file is refused at load with QF_ERR_UNSUPPORTED naming it)
 *   model        BPE: vocab, merges ("a b" strings or ["a","b"] pairs), unk_token, fuse_unk,
 *                byte_fallback, ignore_merges, continuing_subword_prefix, end_of_word_suffix;
 *                dropout null or 0.
 *                WordPiece: vocab, unk_token (must be in the vocab), continuing_subword_prefix,
 *                max_input_chars_per_word (greedy longest match first; an unsplittable or too
 *                long word is the one unk id).
 *   added_tokens special or not, matched in the raw text before pre-tokenization (leftmost,
 *                longest first), honouring lstrip, rstrip, single_word and normalized.
 *   normalizer   null, NFC, BertNormalizer (clean_text, handle_chinese_chars, strip_accents with
 *                null = follow lowercase, lowercase), or a Sequence of those. Character classes
 *                come from utf8proc's Unicode tables (see src/io/wordpiece.c).
 *                A `normalized` added token is held in its normalized form (matched, decoded and
 *                looked up so), as tokenizers 0.23 does.
 *   pre_tokenizer ByteLevel (add_prefix_space, use_regex: the GPT-2 pattern), Split (String or
 *                Regex pattern, behaviors Removed / Isolated / MergedWithPrevious /
 *                MergedWithNext / Contiguous, invert), BertPreTokenizer (whitespace, then each
 *                punctuation char alone), a Sequence of those with ByteLevel last (Qwen2,
 *                LLaMA-3), or null.
 *   post_processor null, ByteLevel, TemplateProcessing (single sequence), BertProcessing
 *                ([CLS] $A [SEP]), Sequence of those.
 *   decoder      ByteLevel, WordPiece (prefix, cleanup), or null (tokens joined by spaces, as
 *                tokenizers does).
 *   truncation and padding settings are ignored: encode returns the ids of the whole text.
 *
 * SEMANTICS follow the `tokenizers` library (0.2x): encode(text, add_special_tokens) and
 * decode(ids, skip_special_tokens). Regexes run on PCRE2 (UTF + Unicode properties) where
 * tokenizers uses Oniguruma; they agree on the patterns real tokenizers use (\s also matches
 * U+180E under PCRE2, Oniguruma's does not).
 * Text must be valid UTF-8 (QF_ERR_ARG names the first bad byte's offset otherwise): the
 * reference takes Rust strings, which cannot hold anything else. decode returns valid UTF-8:
 * byte sequences the ids spell that are not UTF-8 become U+FFFD, one per maximal invalid
 * subpart (Rust's String::from_utf8_lossy, which tokenizers uses).
 * A handle is read-only after load: encode/decode may run on several threads at once.
 */
#ifndef QFUSE_TEXT_H
#define QFUSE_TEXT_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qf_tokenizer qf_tokenizer;

/* Reads and validates a tokenizer.json: JSON well-formed, every string valid UTF-8, every id an
 * integer in [0, 2^24), vocab tokens and ids unique, every merge's parts and result in the vocab,
 * every regex compiles. Errors name the file, the JSON path and the rule. */
qf_status qf_tokenizer_load(const char *path, qf_tokenizer **out);
/* Same on JSON text in memory; `label` names it in messages. */
qf_status qf_tokenizer_load_memory(const char *json, size_t len, const char *label,
                                   qf_tokenizer **out);
void qf_tokenizer_free(qf_tokenizer *t);

/* Encodes text[0..len) (UTF-8; may contain NUL bytes). add_special: apply the post_processor's
 * template (e.g. LLaMA-3's <|begin_of_text|>), as tokenizers' add_special_tokens=True does.
 * *n receives the number of ids the text needs in every case. ids = NULL with cap = 0 is a size
 * query (QF_OK); otherwise when cap < *n the first cap ids are written and QF_ERR_ARG says how
 * many are needed. */
qf_status qf_tokenizer_encode(const qf_tokenizer *t, const char *text, size_t len, int add_special,
                              int32_t *ids, size_t cap, size_t *n);

/* Decodes ids[0..n) into out (NUL-terminated, UTF-8); *len receives the byte length without the
 * NUL in every case. skip_special drops special added tokens. out = NULL with cap = 0 is a size
 * query; cap <= *len gives QF_ERR_ARG with the size needed. An id that names no token gives
 * QF_ERR_ARG naming its index and value (tokenizers silently drops it). */
qf_status qf_tokenizer_decode(const qf_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                              char *out, size_t cap, size_t *len);

/* Id of a token string (added tokens first, then the model vocab); QF_ERR_NOT_FOUND if none. */
qf_status qf_tokenizer_token_to_id(const qf_tokenizer *t, const char *token, size_t len,
                                   int32_t *id);
/* The token string of an id (NUL-terminated, valid until qf_tokenizer_free); QF_ERR_NOT_FOUND. */
qf_status qf_tokenizer_id_to_token(const qf_tokenizer *t, int32_t id, const char **token);
/* with_added = 0: the model's vocab size; 1: distinct tokens of vocab and added tokens together
 * (tokenizers' get_vocab_size(with_added_tokens)). Ids are below qf_tokenizer_id_limit. */
size_t qf_tokenizer_vocab_size(const qf_tokenizer *t, int with_added);
/* 1 + the largest id of any token (the embedding table needs at least this many rows). */
size_t qf_tokenizer_id_limit(const qf_tokenizer *t);
/* 1 if id is a special added token, else 0. */
int qf_tokenizer_is_special(const qf_tokenizer *t, int32_t id);

/* ---- streaming detokenizer (src/io/text_stream.c) ----------------------------------------
 * Turns ids arriving one at a time (generation) into text as it becomes final:
 *
 *   qf_text_stream *ts;
 *   const char *stops[] = {"\nUser:"};
 *   qf_text_stream_new(tok, stops, 1, 1, &ts);          // skip_special = 1
 *   for (each generated id) {
 *       const char *txt; size_t n; int stopped;
 *       qf_text_stream_push(ts, id, &txt, &n, &stopped); // txt: the newly final text
 *       fwrite(txt, 1, n, stdout);
 *       if (stopped) break;                              // a stop string completed
 *   }
 *   qf_text_stream_flush(ts, &txt, &n);                  // whatever was held back
 *   qf_text_stream_free(ts);
 *
 * Contract: the concatenation of every push's text and the flush's text equals
 * qf_tokenizer_decode(all ids pushed, skip_special), cut before the first occurrence of any stop
 * string (the stop string itself and everything after it are never returned). Each returned
 * piece is whole UTF-8 characters: bytes of a character split across byte-level tokens are held
 * until it completes. Text that could still be the start of a stop string is held until the
 * next ids settle it (or until flush). Once a stop string has completed, push reports
 * stopped = 1 with empty text and ignores further ids. flush returns the held text and resets
 * the stream for a new sequence (reset does the same, dropping the held text).
 * Cost: each push decodes a short window of recent ids (those since the last point where the
 * text ended on a whole character, plus the previous such stretch as context). The tokenizer
 * must outlive the stream; a stream is used by one thread at a time. Returned text is
 * NUL-terminated and valid until the next call on the stream. */
typedef struct qf_text_stream qf_text_stream;

/* stop[0..n_stop): non-empty, valid UTF-8, NUL-terminated (copied). skip_special: as decode's. */
qf_status qf_text_stream_new(const qf_tokenizer *t, const char *const *stop, size_t n_stop,
                             int skip_special, qf_text_stream **out);
void qf_text_stream_free(qf_text_stream *s);
void qf_text_stream_reset(qf_text_stream *s);
/* An id that names no token: QF_ERR_ARG naming it, stream unchanged. */
qf_status qf_text_stream_push(qf_text_stream *s, int32_t id, const char **text, size_t *len,
                              int *stopped);
qf_status qf_text_stream_flush(qf_text_stream *s, const char **text, size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_TEXT_H */
