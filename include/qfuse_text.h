/* qfuse_text.h - text side of libqfuse: the Hugging Face tokenizer.json byte-level BPE tokenizer
 * (included by qfuse.h; do not include it alone). Owned by src/io/tokenizer.c. */
#ifndef QFUSE_TEXT_H
#define QFUSE_TEXT_H

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_TEXT_H */
