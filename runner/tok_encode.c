/* tok_encode.c — encoding text into token ids, and the UTF-8 helpers.
 *
 * What it is: UTF-8 validation, the pre-tokenizer loop (PCRE2 matches,
 * behavior Isolated: matches and the gaps between them are pre-tokens), the
 * BPE of one pre-token and the pre-token cache; also the streaming UTF-8
 * decoder, which shares the UTF-8 step. What it is not: reading
 * tokenizer.json (tok.c).
 *
 * The invariant: rn_tok_encode(x) equals the `tokenizers` library's
 * encode(x) with encode_special_tokens=True. BPE merges the lowest-ranked
 * adjacent pair first, the leftmost among equals, exactly as its heap does.
 *
 * Speed: pre-tokens found whole in the vocab (ignore_merges) cost one hash
 * lookup, grouped so their cache misses overlap; others go through BPE (a
 * rank array for short pre-tokens, a heap with a linked list for long ones,
 * so a megabyte of one pre-token is O(n log n)) and their result is cached
 * by pre-token bytes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"
#include "tok_int.h"

#define TAG TOK_TAG

/* -------------------------------------------------------------- UTF-8 */

size_t rn_utf8_valid_prefix(const void *data, size_t n)
{
    const uint8_t *p = data;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path: 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (w & 0x8080808080808080ull)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        size_t len;
        if (utf8_step(p + i, n - i, &len) != 1)
            return i;
        i += len;
    }
    return n;
}

static const char k_replacement[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Appends the complete characters of p[0..n) to out, replacing ill-formed
 * subparts; returns in *rest the length of an incomplete tail (not
 * appended). */
static int utf8_lossy(const uint8_t *p, size_t n, struct rn_buf *out, size_t *rest)
{
    size_t i = 0, run = 0;          /* run: start of the pending valid span */
    while (i < n) {
        size_t len;
        int r = utf8_step(p + i, n - i, &len);
        if (r == 1) {
            i += len;
            continue;
        }
        if (rn_buf_append(out, p + run, i - run))
            return -ENOMEM;
        if (r == 0) {
            *rest = n - i;
            return 0;
        }
        if (rn_buf_append(out, k_replacement, 3))
            return -ENOMEM;
        i += len;
        run = i;
    }
    *rest = 0;
    return rn_buf_append(out, p + run, n - run);
}

int rn_utf8_stream_feed(struct rn_utf8_stream *s, const void *in, size_t n, struct rn_buf *out)
{
    const uint8_t *p = in;
    /* First complete (or reject) the held sequence, byte by byte. */
    while (s->npend > 0 && n > 0) {
        s->pend[s->npend++] = *p++;
        n--;
        size_t len;
        int r = utf8_step(s->pend, (size_t)s->npend, &len);
        if (r == 0)
            continue;               /* still incomplete (npend <= 3 here) */
        if (r == 1) {
            if (rn_buf_append(out, s->pend, len))
                return -ENOMEM;
            s->npend = 0;
        } else {
            /* The ill-formed subpart is pend[0..len); the bytes after it are
             * re-examined as the start of new input. */
            if (rn_buf_append(out, k_replacement, 3))
                return -ENOMEM;
            uint8_t tmp[4];
            int left = s->npend - (int)len;
            memcpy(tmp, s->pend + len, (size_t)left);
            s->npend = 0;
            struct rn_utf8_stream sub = {{0}, 0};
            if (left > 0 && rn_utf8_stream_feed(&sub, tmp, (size_t)left, out))
                return -ENOMEM;
            *s = sub;
        }
    }
    if (n == 0)
        return 0;
    size_t rest;
    if (utf8_lossy(p, n, out, &rest))
        return -ENOMEM;
    memcpy(s->pend, p + n - rest, rest);
    s->npend = (int)rest;
    return 0;
}

int rn_utf8_stream_flush(struct rn_utf8_stream *s, struct rn_buf *out)
{
    if (s->npend == 0)
        return 0;
    s->npend = 0;
    return rn_buf_append(out, k_replacement, 3);
}

/* ---------------------------------------------------------------- BPE */

/* Heap entry of the long-word BPE: a candidate merge of the symbol at pos
 * (left_id) with its right neighbour (right_id). Stale entries (either side
 * changed) are skipped when popped. */
struct hent {
    uint32_t rank;
    int32_t pos, left_id, right_id;
};

static inline bool hent_less(const struct hent *a, const struct hent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct hent *h, size_t *n, struct hent e)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!hent_less(&e, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static struct hent heap_pop(struct hent *h, size_t *n)
{
    struct hent top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && hent_less(&h[c + 1], &h[c]))
            c++;
        if (!hent_less(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (*n)
        h[i] = last;
    return top;
}

static int scratch(struct rn_tok *t, size_t n)
{
    if (n <= t->s_cap)
        return 0;
    size_t cap = t->s_cap ? t->s_cap : 64;
    while (cap < n)
        cap *= 2;
    int32_t *a = realloc(t->s_id, cap * sizeof *a);
    if (a)
        t->s_id = a;
    int32_t *b = realloc(t->s_prev, cap * sizeof *b);
    if (b)
        t->s_prev = b;
    int32_t *c = realloc(t->s_next, cap * sizeof *c);
    if (c)
        t->s_next = c;
    uint32_t *d = realloc(t->s_rank, cap * sizeof *d);
    if (d)
        t->s_rank = d;
    if (!a || !b || !c || !d)
        return -ENOMEM;
    t->s_cap = cap;
    return 0;
}

#define BPE_SHORT 64

/* Short words: symbols in an array, the pair ranks beside them; each step
 * merges the lowest-ranked, leftmost pair. O(n^2) for n <= BPE_SHORT. */
static size_t bpe_short(struct rn_tok *t, const uint8_t *p, size_t n)
{
    int32_t *id = t->s_id;
    uint32_t *rk = t->s_rank;
    for (size_t i = 0; i < n; i++)
        id[i] = t->byte_id[p[i]];
    for (size_t i = 0; i + 1 < n; i++)
        rk[i] = t->byte_pair[p[i] << 8 | p[i + 1]];
    while (n > 1) {
        size_t best = 0;
        uint32_t br = UINT32_MAX;
        for (size_t i = 0; i + 1 < n; i++)
            if (rk[i] < br) {
                br = rk[i];
                best = i;
            }
        if (br == UINT32_MAX)
            break;
        id[best] = t->merge_new[br];
        size_t tail = n - best - 2;     /* elements after best+1 */
        memmove(id + best + 1, id + best + 2, tail * sizeof *id);
        if (tail)
            memmove(rk + best + 1, rk + best + 2, (tail - 1) * sizeof *rk);
        n--;
        for (size_t i = best ? best - 1 : 0; i <= best && i + 1 < n; i++)
            rk[i] = merge_find(t, id[i], id[i + 1]);
    }
    return n;                       /* result in t->s_id[0..n) */
}

/* Long words: a linked list of symbols and a heap of candidate merges,
 * O(n log n). Same order as bpe_short: lowest rank, then leftmost. */
static int bpe_long(struct rn_tok *t, const uint8_t *p, size_t n, size_t *nout)
{
    if (n > INT32_MAX)
        return -EFBIG;
    if (t->heap_cap < 2 * n) {
        struct hent *h = realloc(t->heap, 2 * n * sizeof *h);
        if (!h)
            return -ENOMEM;
        t->heap = h;
        t->heap_cap = 2 * n;
    }
    int32_t *id = t->s_id, *prev = t->s_prev, *next = t->s_next;
    struct hent *h = t->heap;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        id[i] = t->byte_id[p[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        uint32_t rank = t->byte_pair[p[i] << 8 | p[i + 1]];
        if (rank != UINT32_MAX)
            heap_push(h, &hn, (struct hent){rank, (int32_t)i, id[i], id[i + 1]});
    }
    /* A dead symbol is marked by id -1. Each merge kills one symbol and
     * pushes at most two entries, so the heap never exceeds 2n. */
    while (hn) {
        struct hent e = heap_pop(h, &hn);
        int32_t r = next[e.pos];
        if (id[e.pos] != e.left_id || r < 0 || id[r] != e.right_id)
            continue;
        id[e.pos] = t->merge_new[e.rank];
        id[r] = -1;
        next[e.pos] = next[r];
        if (next[r] >= 0)
            prev[next[r]] = e.pos;
        int32_t l = prev[e.pos], nx = next[e.pos];
        uint32_t rank;
        if (l >= 0 && (rank = merge_find(t, id[l], id[e.pos])) != UINT32_MAX)
            heap_push(h, &hn, (struct hent){rank, l, id[l], id[e.pos]});
        if (nx >= 0 && (rank = merge_find(t, id[e.pos], id[nx])) != UINT32_MAX)
            heap_push(h, &hn, (struct hent){rank, e.pos, id[e.pos], id[nx]});
    }
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = next[i])
        id[k++] = id[i];
    *nout = k;
    return 0;
}

static struct cslot *cache_slot(struct rn_tok *t, const uint8_t *p, size_t n, uint64_t h)
{
    const uint64_t mask = ((uint64_t)1 << CACHE_BITS) - 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        struct cslot *s = &t->cache[i];
        if (s->key_len == 0)
            return s;
        if (s->hash == h && s->key_len == n &&
            memcmp(t->cache_keys.p + s->key_off, p, n) == 0)
            return s;
    }
}

static void cache_clear(struct rn_tok *t)
{
    memset(t->cache, 0, ((size_t)1 << CACHE_BITS) * sizeof *t->cache);
    t->cache_fill = 0;
    t->cache_keys.n = 0;
    t->cache_ids.n = 0;
}

/* Encodes one pre-token (n >= 1 bytes) and appends its ids. */
static int encode_pretoken(struct rn_tok *t, const uint8_t *p, size_t n, uint64_t h,
                           struct rn_ids *out)
{
    if (t->ignore_merges || n == 1) {
        int32_t id = vocab_find(t, p, n, h);
        if (id >= 0)
            return rn_ids_push(out, id);
    }
    struct cslot *s = NULL;
    if (n <= CACHE_MAX_KEY) {
        s = cache_slot(t, p, n, h);
        if (s->key_len)
            return rn_ids_append(out, t->cache_ids.v + s->ids_off, s->nids);
    }
    int r = scratch(t, n);
    if (r)
        return r;
    size_t k;
    if (n <= BPE_SHORT)
        k = bpe_short(t, p, n);
    else if ((r = bpe_long(t, p, n, &k)))
        return r;
    if ((r = rn_ids_append(out, t->s_id, k)))
        return r;
    if (s) {
        if (t->cache_fill >= CACHE_MAX_FILL || t->cache_keys.n + n > UINT32_MAX ||
            t->cache_ids.n + k > UINT32_MAX) {
            cache_clear(t);
            s = cache_slot(t, p, n, h);
        }
        uint32_t koff = (uint32_t)t->cache_keys.n, ioff = (uint32_t)t->cache_ids.n;
        if (rn_buf_append(&t->cache_keys, p, n) || rn_ids_append(&t->cache_ids, t->s_id, k))
            return 0;               /* caching is optional; the ids are out already */
        *s = (struct cslot){h, koff, ioff, (uint16_t)n, (uint16_t)k};
        t->cache_fill++;
    }
    return 0;
}

/* Pre-tokens are encoded in groups: the regex finds up to SPANS of them,
 * their vocab slots are prefetched, then they are looked up in order. Each
 * lookup is a cache miss in an 8 MiB table; in a group they overlap. */
#define SPANS 16
struct span {
    size_t off, len;
    uint64_t hash;
};

static int flush_spans(struct rn_tok *t, const uint8_t *p, struct span *sp, int n,
                       struct rn_ids *out)
{
    for (int i = 0; i < n; i++) {
        int r = encode_pretoken(t, p + sp[i].off, sp[i].len, sp[i].hash, out);
        if (r)
            return r;
    }
    return 0;
}

static inline void add_span(const struct rn_tok *t, const uint8_t *p, struct span *sp, int *n,
                            size_t off, size_t len)
{
    uint64_t h = hash_bytes(p + off, len);
    __builtin_prefetch(&t->vtab[h & t->vmask]);
    sp[(*n)++] = (struct span){off, len, h};
}

int rn_tok_encode(struct rn_tok *t, const char *text, size_t len, const char *what,
                  struct rn_ids *out)
{
    size_t valid = rn_utf8_valid_prefix(text, len);
    if (valid != len) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: invalid UTF-8 at byte offset %zu (byte 0x%02x)",
               what ? what : "text", valid, (unsigned)(uint8_t)text[valid]);
        return -EILSEQ;
    }
    const uint8_t *p = (const uint8_t *)text;
    size_t pos = 0;                 /* start of text not yet emitted */
    size_t search = 0;              /* where the next match may start */
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(t->md);
    struct span sp[SPANS + 1];
    int nsp = 0, r;
    while (search < len) {
        int rc = t->jit ? pcre2_jit_match(t->re, p, len, search, 0, t->md, t->mctx)
                        : pcre2_match(t->re, p, len, search, PCRE2_NO_UTF_CHECK, t->md, t->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            dq_log(DQ_LOG_ERROR, TAG, "%s: pre-tokenizer regex failed at byte offset %zu: %s",
                   what ? what : "text", search, (const char *)msg);
            return -EIO;
        }
        size_t s = ov[0], e = ov[1];
        if (e == s) {
            /* empty match: nothing to split off; step one character */
            size_t cl = 1;
            utf8_step(p + s, len - s, &cl);
            search = s + cl;
            continue;
        }
        if (s > pos)
            add_span(t, p, sp, &nsp, pos, s - pos);     /* gap between matches */
        add_span(t, p, sp, &nsp, s, e - s);
        pos = search = e;
        if (nsp >= SPANS) {
            if ((r = flush_spans(t, p, sp, nsp, out)))
                return r;
            nsp = 0;
        }
    }
    if (pos < len)
        add_span(t, p, sp, &nsp, pos, len - pos);
    return flush_spans(t, p, sp, nsp, out);
}

void rn_tok_encode_free(struct rn_tok *t)
{
    free(t->cache);
    rn_buf_free(&t->cache_keys);
    rn_ids_free(&t->cache_ids);
    free(t->s_id);
    free(t->s_prev);
    free(t->s_next);
    free(t->s_rank);
    free(t->heap);
}
