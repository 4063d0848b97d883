/* tok_int.h — the tokenizer's internals, shared by tok.c (loading,
 * decoding) and tok_encode.c (UTF-8, pre-tokenization, BPE). Private to
 * runner/: nothing outside these two files includes it.
 *
 * Ownership: a struct rn_tok owns every table below; after rn_tok_open
 * only the pre-token cache and the BPE scratch change (rn_tok_encode), which
 * is why one tokenizer must not encode on two threads at once.
 */
#ifndef BNBFS_RN_TOK_INT_H
#define BNBFS_RN_TOK_INT_H

#define PCRE2_CODE_UNIT_WIDTH 8
#define XXH_INLINE_ALL

#include <pcre2.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <xxhash.h>

#include "tok.h"

#define TOK_TAG "tok"

struct hent;                        /* tok_encode.c's BPE heap entry */

static inline uint64_t hash_bytes(const void *p, size_t n) { return XXH3_64bits(p, n); }

/* Integer mixer for the merge table's (left, right) keys (splitmix64's
 * finaliser: cheap and well distributed). */
static inline uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Token bytes: tokb[id] = [off, off+len) of t->arena; len == UINT32_MAX
 * when id is not a token. */
struct tokb {
    uint32_t off, len;
};

/* Vocab: raw bytes -> id, open addressing. */
struct vslot {
    uint32_t tag;                   /* high 32 bits of the hash */
    int32_t id;                     /* -1: empty */
    uint32_t off, len;              /* the token's bytes (a copy of tokb[id]: one miss less) */
};

/* The merge table: open addressing over one word per merge,
 * left << (B + R) | right << R | rank, with B bits per id and R bits per rank
 * (gpt-oss: 18 + 18 + 19); the merged token's id is merge_new[rank]. One word
 * instead of a 16-byte slot halves the table every BPE step probes at random
 * (8 MiB for gpt-oss). Empty slots are all ones, which no merge can be since
 * 2B + R <= 63. BPE compares ranks only and reads merge_new once per merge
 * done, not per pair looked up: each read is another cache miss. */

/* Pre-token cache: bytes -> ids of BPE results. Cleared wholesale when
 * full; only pre-tokens of at most CACHE_MAX_KEY bytes are cached. */
#define CACHE_BITS 16
#define CACHE_MAX_FILL (1u << (CACHE_BITS - 1))
#define CACHE_MAX_KEY 255
struct cslot {
    uint64_t hash;
    uint32_t key_off;               /* in cache_keys */
    uint32_t ids_off;               /* in cache_ids */
    uint16_t key_len;               /* 0: empty (empty pre-tokens are never cached) */
    uint16_t nids;
};

struct added {
    char *content;                  /* owned */
    size_t len;
    int32_t id;
    bool special;
};

struct rn_tok {
    char *path;                     /* owned */
    /* token bytes */
    uint8_t *arena;                 /* owned; all token bytes */
    size_t arena_n, arena_cap;
    struct tokb *tokb;              /* owned; [n_ids] */
    int32_t n_ids;
    bool *special;                  /* owned; [n_ids] */
    size_t vocab_n;
    /* vocab hash */
    struct vslot *vtab;             /* owned; [vmask + 1] */
    uint64_t vmask;
    /* merges hash */
    uint64_t *mtab;                 /* owned; [mmask + 1] merge words */
    int32_t *merge_new;             /* owned; [merges cap] merged id by rank */
    unsigned cb, cr;                /* bits per id (B) and per rank (R) */
    uint64_t mmask;
    size_t merges_n;
    int32_t byte_id[256];           /* id of the single-byte token */
    uint32_t *byte_pair;            /* owned; [65536]: rank of byte a + byte b at [a << 8 | b]
                                     * (no hashing: every BPE starts with n-1 of these) */
    bool ignore_merges;
    /* added tokens */
    struct added *added;            /* owned; [n_added] */
    size_t n_added;
    /* regex */
    pcre2_code *re;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
    bool jit;
    /* pre-token cache (mutable: see tok.h on threads) */
    struct cslot *cache;            /* owned; [1 << CACHE_BITS] */
    uint32_t cache_fill;
    struct rn_buf cache_keys;
    struct rn_ids cache_ids;
    /* BPE scratch (mutable) */
    int32_t *s_id, *s_prev, *s_next;
    uint32_t *s_rank;
    size_t s_cap;
    struct hent *heap;
    size_t heap_cap;
};

static inline const uint8_t *tok_bytes(const struct rn_tok *t, int32_t id, size_t *len)
{
    const struct tokb *b = &t->tokb[id];
    *len = b->len;
    return t->arena + b->off;
}

static inline int32_t vocab_find(const struct rn_tok *t, const uint8_t *p, size_t n, uint64_t h)
{
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint64_t i = h & t->vmask;; i = (i + 1) & t->vmask) {
        const struct vslot *s = &t->vtab[i];
        if (s->id < 0)
            return -1;
        if (s->tag == tag && s->len == n && memcmp(t->arena + s->off, p, n) == 0)
            return s->id;
    }
}

/* Rank of the merge of tokens a and b (lower merges first), or UINT32_MAX
 * when they do not merge. */
static inline uint32_t merge_find(const struct rn_tok *t, int32_t a, int32_t b)
{
    uint64_t key = (uint64_t)(uint32_t)a << t->cb | (uint32_t)b;
    for (uint64_t i = hash_u64(key) & t->mmask;; i = (i + 1) & t->mmask) {
        uint64_t s = t->mtab[i];
        if (s >> t->cr == key)
            return (uint32_t)(s & ((UINT64_C(1) << t->cr) - 1));
        if (s == UINT64_MAX)
            return UINT32_MAX;
    }
}

/* One step of UTF-8 decoding at p[0..n), n >= 1. Returns 1 with *len the
 * length of a valid character; 0 when p is a valid but incomplete prefix of
 * a character (more bytes needed); -1 with *len the length of the maximal
 * ill-formed subpart (Unicode §3.9, what Rust's from_utf8_lossy replaces by
 * one U+FFFD). */
static inline int utf8_step(const uint8_t *p, size_t n, size_t *len)
{
    uint8_t b = p[0];
    if (b < 0x80) {
        *len = 1;
        return 1;
    }
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;   /* allowed range of the second byte */
    if (b >= 0xC2 && b <= 0xDF) {
        need = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0)
            lo = 0xA0;              /* overlong */
        else if (b == 0xED)
            hi = 0x9F;              /* surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0)
            lo = 0x90;              /* overlong */
        else if (b == 0xF4)
            hi = 0x8F;              /* > U+10FFFF */
    } else {
        *len = 1;
        return -1;
    }
    for (size_t k = 1; k < need; k++) {
        if (k >= n)
            return 0;
        uint8_t c = p[k];
        uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (c < l || c > h) {
            *len = k;
            return -1;
        }
    }
    *len = need;
    return 1;
}

/* tok_encode.c: frees the BPE scratch and cache buffers of t. */
void rn_tok_encode_free(struct rn_tok *t);

#endif
