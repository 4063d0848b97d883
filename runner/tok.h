/* tok.h — the gpt-oss tokenizer (private to runner/): byte-level BPE read
 * from a Hugging Face tokenizer.json, plus the small byte/id buffers the
 * runner passes around and a streaming UTF-8 decoder.
 *
 * What it is: encoding of plain text exactly as the `tokenizers` library
 * does with encode_special_tokens=True (special-token strings inside text are
 * ordinary text), and decoding ids to bytes. What it is not: special tokens
 * are never produced by rn_tok_encode; callers insert them by id
 * (rn_tok_find_special). No normalizers, no byte fallback: a tokenizer.json
 * asking for features this file does not implement is rejected at open with
 * an error naming the key.
 *
 * Threads: a struct rn_tok is immutable after open except for its pre-token
 * cache and regex scratch, so rn_tok_encode must not run concurrently on one
 * tokenizer (open one per thread). The decoding functions are read-only and
 * may run from any thread.
 */
#ifndef BNBFS_RN_TOK_H
#define BNBFS_RN_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ------------------------------------------------------------ buffers */

/* A growable array of token ids. Zero-initialise; free with rn_ids_free. */
struct rn_ids {
    int32_t *v;                 /* owned; [n], capacity cap */
    size_t n, cap;
};
int rn_ids_push(struct rn_ids *a, int32_t id);                      /* 0 or -ENOMEM */
int rn_ids_append(struct rn_ids *a, const int32_t *ids, size_t n);  /* 0 or -ENOMEM */
void rn_ids_free(struct rn_ids *a);

/* A growable byte buffer (not NUL-terminated unless you push one). */
struct rn_buf {
    char *p;                    /* owned; [n], capacity cap */
    size_t n, cap;
};
int rn_buf_append(struct rn_buf *b, const void *data, size_t n);    /* 0 or -ENOMEM */
void rn_buf_free(struct rn_buf *b);

/* ---------------------------------------------------------- tokenizer */

struct rn_tok;

/* Reads and validates tokenizer.json at `path`. Logs one line naming the
 * file and the offending key on failure: -ENOENT (missing), -EINVAL
 * (malformed or unsupported), -ENOMEM. */
int rn_tok_open(const char *path, struct rn_tok **out);
void rn_tok_free(struct rn_tok *t);

/* One past the largest token id the file defines (vocab and added tokens). */
int32_t rn_tok_n_ids(const struct rn_tok *t);
/* Number of regular (BPE) vocab entries and merges, for --version/--stats. */
size_t rn_tok_vocab_size(const struct rn_tok *t);
size_t rn_tok_merges_count(const struct rn_tok *t);

/* Appends the ids of `text` (len bytes of UTF-8; NUL bytes allowed) to out.
 * -EILSEQ (logged with the byte offset, `what` names the input, e.g.
 * "stdin") on invalid UTF-8; -ENOMEM; -EIO when the regex engine fails (its
 * match limits), logged with the offset. Never emits special tokens. */
int rn_tok_encode(struct rn_tok *t, const char *text, size_t len, const char *what,
                  struct rn_ids *out);

/* The bytes of token `id` (a special token's bytes are its content, e.g.
 * "<|end|>"), borrowed from t, or NULL when the id is not a token. */
const uint8_t *rn_tok_bytes(const struct rn_tok *t, int32_t id, size_t *len);
/* True when id is an added token marked special. */
bool rn_tok_is_special(const struct rn_tok *t, int32_t id);
/* Id of the added token whose content is `content` ("<|start|>"), or
 * -ENOENT. */
int32_t rn_tok_find_added(const struct rn_tok *t, const char *content);

/* Appends the bytes of ids[0..n) to out: -EINVAL (logged with the position
 * and id) for an id that is not a token. The bytes need not be UTF-8. */
int rn_tok_decode(const struct rn_tok *t, const int32_t *ids, size_t n, struct rn_buf *out);

/* -------------------------------------------------- streaming UTF-8 */

/* Turns a byte stream that may split characters anywhere (token bytes) into
 * complete UTF-8: a partial sequence at the end is held back until the next
 * feed; malformed bytes become U+FFFD (as Rust's from_utf8_lossy does: one
 * replacement per maximal invalid prefix). Zero-initialise. */
struct rn_utf8_stream {
    uint8_t pend[4];            /* a started, incomplete sequence */
    int npend;                  /* 0..3 */
};
/* Appends the complete characters of pend + in[0..n) to out. */
int rn_utf8_stream_feed(struct rn_utf8_stream *s, const void *in, size_t n, struct rn_buf *out);
/* End of stream: an incomplete held sequence becomes U+FFFD. */
int rn_utf8_stream_flush(struct rn_utf8_stream *s, struct rn_buf *out);

/* Length of the longest valid UTF-8 prefix of p[0..n) (n when all valid).
 * Surrogates and overlong forms are invalid, as in Rust and PCRE2. */
size_t rn_utf8_valid_prefix(const void *p, size_t n);

#endif
