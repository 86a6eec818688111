/* text_stream.c - incremental detokenizer with stop strings (qfuse_text.h, qf_text_stream_*),
 * built on the public qf_tokenizer_decode only.
 *
 * Why a window: decode(ids) is not the concatenation of decode(id) per id. Byte-level tokens can
 * split a UTF-8 character (decode renders an unfinished one as U+FFFD), and the null decoder
 * joins tokens with spaces. So each push decodes a window ids[p..n) and takes the difference.
 *
 * Invariants (p = window start, q = a point inside it, n = ids pushed; all of ids[0..p+q) are
 * "clean points": there the text so far ends on a whole character):
 * - decode(ids[0..n)) = (text committed so far) + win_text[done..], win_text = decode(window).
 * - win_text[0..done) is final: later ids only append to it. It is everything but a trailing
 *   U+FFFD (the one place where more bytes can still change the rendering: an unfinished
 *   character is one U+FFFD until it completes). A window text without that trailing U+FFFD
 *   ends on a whole character, so n becomes a clean point.
 * - At a clean point the window drops ids[p..p+q) and keeps ids[p+q..n) as context (its text is
 *   committed, done = its length), so the next difference carries the null decoder's joining
 *   space; the drop waits while the context would decode to nothing (skipped special tokens),
 *   for the same reason. A stream of tokens that all end in U+FFFD keeps growing the window
 *   (correct, only slower).
 * - Committed text goes through the stop matcher: `held` keeps the longest suffix that is a
 *   proper prefix of a stop string (a suffix, so it starts on a character boundary: UTF-8 is
 *   self-synchronizing); the rest is returned. The first full occurrence of a stop string ends
 *   the stream; nothing at or after it is ever returned.
 * - Buffers grow only; the decode buffer is sized from the tokens' string lengths (each byte of
 *   a token string yields at most 3 output bytes, plus a joining space), so decode never fails
 *   for lack of room.
 */
#include "io_internal.h"
#include <stdlib.h>
#include <string.h>

struct qf_text_stream {
    const qf_tokenizer *tok;
    int skip_special;
    char **stop;
    size_t *stop_len, n_stop, max_stop;
    int32_t *win;           /* window ids */
    size_t n_win, cap_win, q;
    size_t *bound, cap_bound; /* per window id: upper bound of its decoded bytes */
    char *dec;              /* decode(window) */
    size_t dec_len, dec_cap, done;
    char *held;             /* committed text not yet returned (possible stop prefix) */
    size_t held_len, held_cap;
    char *out;              /* text returned by the last call */
    size_t out_cap;
    int stopped;
};

static qf_status grow(void **p, size_t *cap, size_t need, size_t elsize, const char *what) {
    if (need <= *cap) return QF_OK;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elsize);
    if (!q) return qf_fail(QF_ERR_NOMEM, "qf_text_stream: no memory for %zu %s", c, what);
    *p = q;
    *cap = c;
    return QF_OK;
}

/* Well-formed UTF-8 (no overlongs, no surrogates, <= U+10FFFF)? *bad = offset of the first bad byte. */
static int utf8_ok(const unsigned char *s, size_t n, size_t *bad) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t l;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) l = 2;
        else if (c >= 0xE0 && c <= 0xEF) { l = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { l = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else { *bad = i; return 0; }
        if (i + l > n || s[i + 1] < lo || s[i + 1] > hi) { *bad = i; return 0; }
        for (size_t k = 2; k < l; k++)
            if ((s[i + k] & 0xC0) != 0x80) { *bad = i; return 0; }
        i += l;
    }
    return 1;
}

void qf_text_stream_free(qf_text_stream *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n_stop; i++) free(s->stop[i]);
    free(s->stop);
    free(s->stop_len);
    free(s->win);
    free(s->bound);
    free(s->dec);
    free(s->held);
    free(s->out);
    free(s);
}

static void clear(qf_text_stream *s) {
    s->n_win = s->q = s->dec_len = s->done = s->held_len = 0;
    s->stopped = 0;
}

void qf_text_stream_reset(qf_text_stream *s) {
    if (!s) return;
    clear(s);
    if (s->out) s->out[0] = '\0';
}

qf_status qf_text_stream_new(const qf_tokenizer *t, const char *const *stop, size_t n_stop,
                             int skip_special, qf_text_stream **out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_text_stream_new: out is NULL");
    *out = NULL;
    if (!t) return qf_fail(QF_ERR_ARG, "qf_text_stream_new: tokenizer is NULL");
    if (n_stop && !stop) return qf_fail(QF_ERR_ARG, "qf_text_stream_new: stop is NULL but n_stop = %zu", n_stop);
    for (size_t i = 0; i < n_stop; i++) {
        size_t bad;
        if (!stop[i]) return qf_fail(QF_ERR_ARG, "qf_text_stream_new: stop[%zu] is NULL", i);
        if (!stop[i][0]) return qf_fail(QF_ERR_ARG, "qf_text_stream_new: stop[%zu] is empty", i);
        if (!utf8_ok((const unsigned char *)stop[i], strlen(stop[i]), &bad))
            return qf_fail(QF_ERR_ARG, "qf_text_stream_new: stop[%zu] is not valid UTF-8 (byte %zu)", i, bad);
    }
    qf_text_stream *s = calloc(1, sizeof *s);
    if (!s) return qf_fail(QF_ERR_NOMEM, "qf_text_stream_new: no memory");
    s->tok = t;
    s->skip_special = skip_special ? 1 : 0;
    if (n_stop) {
        s->stop = calloc(n_stop, sizeof *s->stop);
        s->stop_len = calloc(n_stop, sizeof *s->stop_len);
        if (!s->stop || !s->stop_len) {
            qf_text_stream_free(s);
            return qf_fail(QF_ERR_NOMEM, "qf_text_stream_new: no memory for %zu stop strings", n_stop);
        }
        for (size_t i = 0; i < n_stop; i++) {
            size_t l = strlen(stop[i]);
            s->stop[i] = malloc(l + 1);
            if (!s->stop[i]) {
                s->n_stop = i;
                qf_text_stream_free(s);
                return qf_fail(QF_ERR_NOMEM, "qf_text_stream_new: no memory for stop[%zu]", i);
            }
            memcpy(s->stop[i], stop[i], l + 1);
            s->stop_len[i] = l;
            if (l > s->max_stop) s->max_stop = l;
        }
        s->n_stop = n_stop;
    }
    qf_status st = grow((void **)&s->out, &s->out_cap, 1, 1, "bytes of output");
    if (st != QF_OK) {
        qf_text_stream_free(s);
        return st;
    }
    s->out[0] = '\0';
    *out = s;
    return QF_OK;
}

/* decode(window[from..n_win)) into s->dec */
static qf_status decode_window(qf_text_stream *s, size_t from) {
    size_t need = 1;
    for (size_t i = from; i < s->n_win; i++) need += s->bound[i];
    QF_TRY(grow((void **)&s->dec, &s->dec_cap, need, 1, "bytes of decoded text"));
    return qf_tokenizer_decode(s->tok, s->win + from, s->n_win - from, s->skip_special, s->dec, s->dec_cap,
                               &s->dec_len);
}

static int is_stop_prefix(const qf_text_stream *s, const char *p, size_t n) {
    for (size_t i = 0; i < s->n_stop; i++)
        if (s->stop_len[i] > n && !memcmp(s->stop[i], p, n)) return 1;
    return 0;
}

/* Position of the first complete stop string in held (SIZE_MAX if none). */
static size_t first_stop(const qf_text_stream *s) {
    size_t best = SIZE_MAX;
    if (!s->held_len) return best;
    for (size_t i = 0; i < s->n_stop; i++) {
        const char *m = memmem(s->held, s->held_len, s->stop[i], s->stop_len[i]);
        if (m && (size_t)(m - s->held) < best) best = (size_t)(m - s->held);
    }
    return best;
}

/* Moves the returnable part of held into out: up to a stop (then stopped), else all but the
 * longest stop-prefix suffix (final: hold nothing back). */
static qf_status release(qf_text_stream *s, int final, const char **text, size_t *len) {
    size_t cut = first_stop(s), emit;
    if (cut != SIZE_MAX) {
        emit = cut;
        s->stopped = 1;
    } else if (final) {
        emit = s->held_len;
    } else {
        size_t h = s->held_len < s->max_stop ? s->held_len : (s->max_stop ? s->max_stop - 1 : 0);
        for (; h > 0; h--)
            if (is_stop_prefix(s, s->held + s->held_len - h, h)) break;
        emit = s->held_len - h;
    }
    QF_TRY(grow((void **)&s->out, &s->out_cap, emit + 1, 1, "bytes of output"));
    if (emit) memcpy(s->out, s->held, emit);
    s->out[emit] = '\0';
    if (s->stopped) s->held_len = 0;
    else if (emit) {
        memmove(s->held, s->held + emit, s->held_len - emit);
        s->held_len -= emit;
    }
    *text = s->out;
    *len = emit;
    return QF_OK;
}

static qf_status commit(qf_text_stream *s, const char *p, size_t n) {
    QF_TRY(grow((void **)&s->held, &s->held_cap, s->held_len + n, 1, "bytes of held text"));
    memcpy(s->held + s->held_len, p, n);
    s->held_len += n;
    return QF_OK;
}

qf_status qf_text_stream_push(qf_text_stream *s, int32_t id, const char **text, size_t *len, int *stopped) {
    if (!s || !text || !len || !stopped)
        return qf_fail(QF_ERR_ARG, "qf_text_stream_push: NULL %s", !s ? "stream" : !text ? "text" : !len ? "len" : "stopped");
    *text = "";
    *len = 0;
    *stopped = s->stopped;
    if (s->stopped) return QF_OK;
    const char *tokstr;
    if (id < 0 || (size_t)id >= qf_tokenizer_id_limit(s->tok) ||
        qf_tokenizer_id_to_token(s->tok, id, &tokstr) != QF_OK)
        return qf_fail(QF_ERR_ARG, "qf_text_stream_push: id %d names no token (ids are below %zu)", id,
                       qf_tokenizer_id_limit(s->tok));
    QF_TRY(grow((void **)&s->win, &s->cap_win, s->n_win + 1, sizeof *s->win, "window ids"));
    QF_TRY(grow((void **)&s->bound, &s->cap_bound, s->n_win + 1, sizeof *s->bound, "window bounds"));
    s->win[s->n_win] = id;
    s->bound[s->n_win] = 3 * strlen(tokstr) + 1;
    s->n_win++;
    qf_status st = decode_window(s, 0);
    if (st != QF_OK) {
        s->n_win--;
        return st;
    }
    size_t stable = s->dec_len;
    if (stable >= 3 && !memcmp(s->dec + stable - 3, "\xEF\xBF\xBD", 3)) stable -= 3;
    if (stable > s->done) {
        QF_TRY(commit(s, s->dec + s->done, stable - s->done));
        s->done = stable;
    }
    if (stable == s->dec_len) { /* n is a clean point: keep window[q..n) as the context */
        size_t q = s->q;
        if (q > 0) {
            QF_TRY(decode_window(s, q));
            if (s->dec_len > 0) {
                memmove(s->win, s->win + q, (s->n_win - q) * sizeof *s->win);
                memmove(s->bound, s->bound + q, (s->n_win - q) * sizeof *s->bound);
                s->n_win -= q;
                s->done = s->dec_len;
            } else {
                QF_TRY(decode_window(s, 0)); /* keep the old start; restore dec */
            }
        }
        s->q = s->n_win;
    }
    QF_TRY(release(s, 0, text, len));
    *stopped = s->stopped;
    return QF_OK;
}

qf_status qf_text_stream_flush(qf_text_stream *s, const char **text, size_t *len) {
    if (!s || !text || !len) return qf_fail(QF_ERR_ARG, "qf_text_stream_flush: NULL %s", !s ? "stream" : !text ? "text" : "len");
    *text = "";
    *len = 0;
    if (!s->stopped && s->dec_len > s->done) QF_TRY(commit(s, s->dec + s->done, s->dec_len - s->done));
    if (!s->stopped) QF_TRY(release(s, 1, text, len));
    clear(s); /* s->out, which *text may point to, is kept */
    return QF_OK;
}
