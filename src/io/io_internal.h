/* io_internal.h - helpers the file-format readers and writers share (src/io only).
 * qf_io_read_file reads a whole regular file; qf_io_write_atomic writes a file so that readers
 * see either the old content or the complete new one, never a torn file. */
#ifndef QF_IO_INTERNAL_H
#define QF_IO_INTERNAL_H

#include "internal.h"

/* One piece of a file being written; pieces are written back to back. */
typedef struct {
    const void *data;
    size_t len;
} qf_io_chunk;

/* Reads all of `path` into a malloc'd buffer with one extra NUL byte after the data (so text
 * parsers may treat it as a string). Refuses files larger than max_len. `what` names the format
 * in messages ("npy", "config"). The caller frees *buf. */
qf_status qf_io_read_file(const char *path, size_t max_len, const char *what, unsigned char **buf,
                          size_t *len);

/* Writes chunks[0..n) to "<path>.tmp.XXXXXX" in path's directory, fsyncs it, renames it over
 * path and fsyncs the directory. On failure the temporary file is removed and path is left as
 * it was; the message carries the errno text. */
qf_status qf_io_write_atomic(const char *path, const qf_io_chunk *chunks, int n, const char *what);

/* Parses json[0..len) with cJSON into *root, which must be a JSON object with nothing but
 * whitespace after it. `what` names the document in messages ("config", "tokenizer"):
 * "<label>: <what> is not valid JSON (error near byte N of LEN)" / "(trailing text at byte N)" /
 * "<what> is not a JSON object". The caller cJSON_Delete()s *root. */
struct cJSON;
qf_status qf_io_parse_json_object(const char *json, size_t len, const char *label, const char *what,
                                  struct cJSON **root);

#endif
