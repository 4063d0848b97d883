/* tok.c — byte-level BPE tokenizer read from a Hugging Face tokenizer.json.
 *
 * What it is: the `tokenizers` library's BPE model (with ignore_merges), its
 * Split pre-tokenizer (behavior Isolated; regex run by PCRE2, JIT-compiled
 * when available) and ByteLevel (no prefix space), for encoding text into ids
 * and ids back into bytes. What it is not: a general tokenizers.json engine —
 * normalizers, byte fallback, word prefixes/suffixes, non-special added
 * tokens and other pre-tokenizers are rejected at open.
 *
 * The invariant: rn_tok_encode(x) equals tokenizers' encode(x) with
 * encode_special_tokens=True for every valid UTF-8 x. Vocab strings are
 * byte-level symbols in the file; they are turned into raw bytes once at
 * open, so encoding hashes raw pre-token bytes directly and never builds the
 * byte-level string.
 *
 * Speed: pre-tokens found whole in the vocab (ignore_merges) cost one hash
 * lookup; others go through BPE (a rank array for short pre-tokens, a heap
 * with a linked list for long ones, so a megabyte of one pre-token is
 * O(n log n)) and their result is cached by pre-token bytes.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#define XXH_INLINE_ALL

#include "tok.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "dequant.h"

#define TAG "tok"

/* ------------------------------------------------------------ buffers */

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return -ENOMEM;
        ncap *= 2;
    }
    size_t bytes;
    if (__builtin_mul_overflow(ncap, elem, &bytes))
        return -ENOMEM;
    void *np = realloc(*p, bytes);
    if (!np)
        return -ENOMEM;
    *p = np;
    *cap = ncap;
    return 0;
}

int rn_ids_push(struct rn_ids *a, int32_t id)
{
    if (a->n == a->cap && grow((void **)&a->v, &a->cap, a->n + 1, sizeof(int32_t)))
        return -ENOMEM;
    a->v[a->n++] = id;
    return 0;
}

int rn_ids_append(struct rn_ids *a, const int32_t *ids, size_t n)
{
    if (n > SIZE_MAX - a->n || grow((void **)&a->v, &a->cap, a->n + n, sizeof(int32_t)))
        return -ENOMEM;
    if (n)
        memcpy(a->v + a->n, ids, n * sizeof(int32_t));
    a->n += n;
    return 0;
}

void rn_ids_free(struct rn_ids *a)
{
    free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

int rn_buf_append(struct rn_buf *b, const void *data, size_t n)
{
    if (n > SIZE_MAX - b->n || grow((void **)&b->p, &b->cap, b->n + n, 1))
        return -ENOMEM;
    if (n)
        memcpy(b->p + b->n, data, n);
    b->n += n;
    return 0;
}

void rn_buf_free(struct rn_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* -------------------------------------------------------------- UTF-8 */

/* One step of UTF-8 decoding at p[0..n), n >= 1. Returns 1 with *len the
 * length of a valid character; 0 when p is a valid but incomplete prefix of
 * a character (more bytes needed); -1 with *len the length of the maximal
 * ill-formed subpart (Unicode §3.9, what Rust's from_utf8_lossy replaces by
 * one U+FFFD). */
static int utf8_step(const uint8_t *p, size_t n, size_t *len)
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

/* --------------------------------------------------------- hash tables */

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
};

struct mslot {
    uint64_t key;                   /* left << 32 | right; UINT64_MAX: empty */
    uint32_t rank;                  /* merge index in the file */
    int32_t new_id;
};

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
    struct mslot *mtab;             /* owned; [mmask + 1] */
    uint64_t mmask;
    size_t merges_n;
    int32_t byte_id[256];           /* id of the single-byte token */
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
    int32_t *s_new;
    size_t s_cap;
    struct hent *heap;
    size_t heap_cap;
};

static const uint8_t *tok_bytes(const struct rn_tok *t, int32_t id, size_t *len)
{
    const struct tokb *b = &t->tokb[id];
    *len = b->len;
    return t->arena + b->off;
}

static int32_t vocab_find(const struct rn_tok *t, const uint8_t *p, size_t n, uint64_t h)
{
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint64_t i = h & t->vmask;; i = (i + 1) & t->vmask) {
        const struct vslot *s = &t->vtab[i];
        if (s->id < 0)
            return -1;
        if (s->tag == tag) {
            const struct tokb *b = &t->tokb[s->id];
            if (b->len == n && memcmp(t->arena + b->off, p, n) == 0)
                return s->id;
        }
    }
}

/* Inserts id (whose bytes are already in tokb); -EEXIST when the same
 * bytes are present. */
static int vocab_insert(struct rn_tok *t, int32_t id)
{
    size_t n;
    const uint8_t *p = tok_bytes(t, id, &n);
    uint64_t h = hash_bytes(p, n);
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint64_t i = h & t->vmask;; i = (i + 1) & t->vmask) {
        struct vslot *s = &t->vtab[i];
        if (s->id < 0) {
            s->id = id;
            s->tag = tag;
            return 0;
        }
        if (s->tag == tag) {
            size_t m;
            const uint8_t *q = tok_bytes(t, s->id, &m);
            if (m == n && memcmp(p, q, n) == 0)
                return -EEXIST;
        }
    }
}

static inline const struct mslot *merge_find(const struct rn_tok *t, int32_t a, int32_t b)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint64_t i = hash_u64(key) & t->mmask;; i = (i + 1) & t->mmask) {
        const struct mslot *s = &t->mtab[i];
        if (s->key == key)
            return s;
        if (s->key == UINT64_MAX)
            return NULL;
    }
}

/* A later duplicate of a pair replaces the earlier one, as tokenizers'
 * HashMap collect does. */
static void merge_insert(struct rn_tok *t, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint64_t i = hash_u64(key) & t->mmask;; i = (i + 1) & t->mmask) {
        struct mslot *s = &t->mtab[i];
        if (s->key == UINT64_MAX || s->key == key) {
            s->key = key;
            s->rank = rank;
            s->new_id = new_id;
            return;
        }
    }
}

static uint64_t pow2_at_least(uint64_t n)
{
    uint64_t c = 1024;
    while (c < n)
        c <<= 1;
    return c;
}

/* -------------------------------------------------------- byte level */

/* GPT-2's bytes_to_unicode: printable bytes (! .. ~, ¡ .. ¬, ® .. ÿ) stand
 * for themselves; the other 68 bytes map, in increasing order, to U+0100..
 * So every code point of a vocab string is below 0x144. */
static void byte_level_inverse(int16_t inv[0x144])
{
    for (int i = 0; i < 0x144; i++)
        inv[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        inv[printable ? b : 256 + extra++] = (int16_t)b;
    }
}

/* Decodes a byte-level vocab string into raw bytes appended to t->arena. */
static int byte_level_decode(struct rn_tok *t, const int16_t *inv, const char *s, size_t *len)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t n = strlen(s), start = t->arena_n;
    if (grow((void **)&t->arena, &t->arena_cap, t->arena_n + n, 1))
        return -ENOMEM;
    size_t i = 0;
    while (i < n) {
        size_t cl;
        if (utf8_step(p + i, n - i, &cl) != 1)
            return -EILSEQ;
        uint32_t cp;
        if (cl == 1)
            cp = p[i];
        else if (cl == 2)
            cp = (uint32_t)(p[i] & 0x1F) << 6 | (p[i + 1] & 0x3F);
        else
            return -EINVAL;         /* every symbol is below U+0800 */
        if (cp >= 0x144 || inv[cp] < 0)
            return -EINVAL;
        t->arena[t->arena_n++] = (uint8_t)inv[cp];
        i += cl;
    }
    *len = t->arena_n - start;
    return 0;
}

/* --------------------------------------------------------------- open */

static int read_file(const char *path, char **data, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s", path, strerror(e));
        close(fd);
        return -e;
    }
    if (!S_ISREG(st.st_mode)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a regular file", path);
        close(fd);
        return S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
    }
    /* tokenizer.json of a 200k vocab is ~13 MB; refuse absurd sizes */
    if (st.st_size > (off_t)1 << 30) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: %lld bytes is too large for a tokenizer", path,
               (long long)st.st_size);
        close(fd);
        return -EFBIG;
    }
    size_t n = (size_t)st.st_size, got = 0;
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            dq_log(DQ_LOG_ERROR, TAG, "%s: read: %s", path, r < 0 ? strerror(e) : "short file");
            free(buf);
            close(fd);
            return -e;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    *data = buf;
    *len = n;
    return 0;
}

/* Logs "PATH: what" and returns -EINVAL. */
__attribute__((format(printf, 2, 3)))
static int bad(const struct rn_tok *t, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dq_log(DQ_LOG_ERROR, TAG, "%s: %s", t->path, msg);
    return -EINVAL;
}

static bool json_is_null_or_missing(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return !v || cJSON_IsNull(v);
}

static const char *json_type_str(const cJSON *o)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

/* Sets the id's bytes (appending them to the arena when p is not already
 * there) and grows tokb/special. */
static int set_token(struct rn_tok *t, int32_t id, size_t off, size_t len)
{
    if (id < 0 || id == INT32_MAX)
        return -EINVAL;
    if (off > UINT32_MAX || len >= UINT32_MAX || off + len > UINT32_MAX)
        return -EFBIG;
    if (id >= t->n_ids) {
        size_t cap = (size_t)t->n_ids, need = (size_t)id + 1;
        struct tokb *nb = realloc(t->tokb, need * sizeof *nb);
        if (!nb)
            return -ENOMEM;
        t->tokb = nb;
        bool *ns = realloc(t->special, need);
        if (!ns)
            return -ENOMEM;
        t->special = ns;
        for (size_t i = cap; i < need; i++) {
            t->tokb[i] = (struct tokb){0, UINT32_MAX};
            t->special[i] = false;
        }
        t->n_ids = id + 1;
    }
    t->tokb[id] = (struct tokb){(uint32_t)off, (uint32_t)len};
    return 0;
}

static int load_vocab(struct rn_tok *t, const cJSON *vocab, const int16_t *inv)
{
    if (!cJSON_IsObject(vocab))
        return bad(t, "model.vocab: expected an object");
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    if (n == 0)
        return bad(t, "model.vocab is empty");
    /* ids are usually dense: size the id table once */
    int32_t max_id = -1;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= INT32_MAX ||
            e->valuedouble != (double)(int32_t)e->valuedouble)
            return bad(t, "model.vocab[\"%.60s\"]: id is not a non-negative integer", e->string);
        if (e->valueint > max_id)
            max_id = e->valueint;
    }
    if (set_token(t, max_id, 0, 0))
        return -ENOMEM;
    t->tokb[max_id].len = UINT32_MAX;
    t->vmask = pow2_at_least((uint64_t)n * 2) - 1;
    t->vtab = malloc((t->vmask + 1) * sizeof *t->vtab);
    if (!t->vtab)
        return -ENOMEM;
    memset(t->vtab, 0xFF, (t->vmask + 1) * sizeof *t->vtab);
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id = e->valueint;
        if (t->tokb[id].len != UINT32_MAX)
            return bad(t, "model.vocab: id %d is used twice", id);
        size_t off = t->arena_n, len;
        int r = byte_level_decode(t, inv, e->string, &len);
        if (r == -ENOMEM)
            return r;
        if (r)
            return bad(t, "model.vocab[\"%.60s\"]: not a byte-level string", e->string);
        if (len == 0)
            return bad(t, "model.vocab: empty token string (id %d)", id);
        if ((r = set_token(t, id, off, len)))
            return r == -ENOMEM ? r : bad(t, "model.vocab: token bytes exceed 4 GiB");
        if (vocab_insert(t, id))
            return bad(t, "model.vocab[\"%.60s\"]: the same bytes appear twice", e->string);
    }
    t->vocab_n = n;
    for (int b = 0; b < 256; b++) {
        uint8_t c = (uint8_t)b;
        t->byte_id[b] = vocab_find(t, &c, 1, hash_bytes(&c, 1));
        if (t->byte_id[b] < 0)
            return bad(t, "model.vocab: no token for byte 0x%02x (byte-level BPE needs all 256)",
                       b);
    }
    return 0;
}

/* Looks up a merge side given as a byte-level string. */
static int merge_side(struct rn_tok *t, const int16_t *inv, const char *s, int32_t *id)
{
    size_t mark = t->arena_n, len;
    int r = byte_level_decode(t, inv, s, &len);
    t->arena_n = mark;              /* scratch only */
    if (r)
        return r == -ENOMEM ? r : -EINVAL;
    const uint8_t *p = t->arena + mark;
    *id = vocab_find(t, p, len, hash_bytes(p, len));
    return *id < 0 ? -ENOENT : 0;
}

static int load_merges(struct rn_tok *t, const cJSON *merges, const int16_t *inv)
{
    if (!cJSON_IsArray(merges))
        return bad(t, "model.merges: expected an array");
    size_t n = (size_t)cJSON_GetArraySize(merges);
    t->mmask = pow2_at_least((uint64_t)n * 2 + 1) - 1;
    t->mtab = malloc((t->mmask + 1) * sizeof *t->mtab);
    if (!t->mtab)
        return -ENOMEM;
    for (uint64_t i = 0; i <= t->mmask; i++)
        t->mtab[i].key = UINT64_MAX;
    uint8_t *cat = NULL;
    size_t cat_cap = 0;
    uint32_t rank = 0;
    int r = 0;
    for (const cJSON *e = merges->child; e; e = e->next, rank++) {
        char *buf = NULL;
        const char *a, *b;
        if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
            cJSON_IsString(e->child->next)) {
            a = e->child->valuestring;
            b = e->child->next->valuestring;
        } else if (cJSON_IsString(e)) {
            /* "a b": byte-level strings never contain a space (it is Ġ) */
            const char *sp = strchr(e->valuestring, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                r = bad(t, "model.merges[%u]: \"%.60s\" is not \"left right\"", rank,
                        e->valuestring);
                break;
            }
            buf = strdup(e->valuestring);
            if (!buf) {
                r = -ENOMEM;
                break;
            }
            buf[sp - e->valuestring] = 0;
            a = buf;
            b = buf + (sp - e->valuestring) + 1;
        } else {
            r = bad(t, "model.merges[%u]: expected [\"left\", \"right\"] or \"left right\"", rank);
            break;
        }
        int32_t ia, ib;
        if ((r = merge_side(t, inv, a, &ia)) || (r = merge_side(t, inv, b, &ib))) {
            if (r != -ENOMEM)
                r = bad(t, "model.merges[%u]: \"%.40s\" + \"%.40s\": a side is not in the vocab",
                        rank, a, b);
            free(buf);
            break;
        }
        size_t la, lb;
        const uint8_t *pa = tok_bytes(t, ia, &la), *pb = tok_bytes(t, ib, &lb);
        if (grow((void **)&cat, &cat_cap, la + lb, 1)) {
            r = -ENOMEM;
            free(buf);
            break;
        }
        memcpy(cat, pa, la);
        memcpy(cat + la, pb, lb);
        int32_t nid = vocab_find(t, cat, la + lb, hash_bytes(cat, la + lb));
        if (nid < 0) {
            r = bad(t, "model.merges[%u]: \"%.40s%.40s\" (the merged token) is not in the vocab",
                    rank, a, b);
            free(buf);
            break;
        }
        free(buf);
        merge_insert(t, ia, ib, rank, nid);
    }
    free(cat);
    t->merges_n = rank;
    return r;
}

static int load_added(struct rn_tok *t, const cJSON *added)
{
    if (!added || cJSON_IsNull(added))
        return 0;
    if (!cJSON_IsArray(added))
        return bad(t, "added_tokens: expected an array");
    size_t n = (size_t)cJSON_GetArraySize(added);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added)
        return -ENOMEM;
    size_t i = 0;
    for (const cJSON *e = added->child; e; e = e->next, i++) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(e, "special");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= INT32_MAX ||
            id->valuedouble != (double)id->valueint || !cJSON_IsString(content) ||
            !content->valuestring[0])
            return bad(t, "added_tokens[%zu]: needs an integer \"id\" and a non-empty \"content\"",
                       i);
        if (!cJSON_IsTrue(special))
            return bad(t, "added_tokens[%zu] \"%.60s\": non-special added tokens are not supported",
                       i, content->valuestring);
        size_t len = strlen(content->valuestring);
        struct added *a = &t->added[t->n_added++];
        a->content = strdup(content->valuestring);
        if (!a->content)
            return -ENOMEM;
        a->len = len;
        a->id = id->valueint;
        a->special = true;
        /* an added token overrides the vocab's bytes for decoding, as the
         * tokenizers library's id_to_token consults added tokens first */
        size_t off = t->arena_n;
        if (grow((void **)&t->arena, &t->arena_cap, t->arena_n + len, 1))
            return -ENOMEM;
        memcpy(t->arena + off, a->content, len);
        t->arena_n += len;
        int r = set_token(t, a->id, off, len);
        if (r)
            return r == -ENOMEM ? r : bad(t, "added_tokens[%zu]: bad id", i);
        t->special[a->id] = true;
    }
    return 0;
}

/* The pre-tokenizer: returns the Split regex (borrowed from the tree). */
static int load_pretok(struct rn_tok *t, const cJSON *pre, const char **pattern)
{
    static const char *gpt2 =
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
    const cJSON *items[8];
    int n = 0;
    const char *ty = pre ? json_type_str(pre) : NULL;
    if (!ty)
        return bad(t, "pre_tokenizer: missing (expected Split + ByteLevel)");
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        if (!cJSON_IsArray(seq))
            return bad(t, "pre_tokenizer.pretokenizers: expected an array");
        for (const cJSON *e = seq->child; e; e = e->next) {
            if (n == 8)
                return bad(t, "pre_tokenizer: too many steps");
            items[n++] = e;
        }
    } else {
        items[n++] = pre;
    }
    *pattern = NULL;
    bool byte_level = false;
    for (int i = 0; i < n; i++) {
        const char *ity = json_type_str(items[i]);
        if (ity && strcmp(ity, "Split") == 0 && !byte_level && !*pattern) {
            const cJSON *pat = cJSON_GetObjectItemCaseSensitive(items[i], "pattern");
            const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
            const cJSON *beh = cJSON_GetObjectItemCaseSensitive(items[i], "behavior");
            const cJSON *inv = cJSON_GetObjectItemCaseSensitive(items[i], "invert");
            if (!cJSON_IsString(re))
                return bad(t, "pre_tokenizer Split: only {\"Regex\": ...} patterns are supported");
            if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated") != 0)
                return bad(t, "pre_tokenizer Split: behavior must be \"Isolated\"");
            if (cJSON_IsTrue(inv))
                return bad(t, "pre_tokenizer Split: invert is not supported");
            *pattern = re->valuestring;
        } else if (ity && strcmp(ity, "ByteLevel") == 0 && !byte_level) {
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(items[i], "add_prefix_space")))
                return bad(t, "pre_tokenizer ByteLevel: add_prefix_space is not supported");
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(items[i], "use_regex"))) {
                if (*pattern)
                    return bad(t, "pre_tokenizer: Split followed by ByteLevel(use_regex) is "
                                  "not supported");
                *pattern = gpt2;
            }
            byte_level = true;
        } else {
            return bad(t, "pre_tokenizer: step %d (%s) is not supported (expected Split then "
                          "ByteLevel)", i, ity ? ity : "no type");
        }
    }
    if (!byte_level)
        return bad(t, "pre_tokenizer: no ByteLevel step (only byte-level BPE is supported)");
    if (!*pattern)
        return bad(t, "pre_tokenizer: no Split regex");
    return 0;
}

static int compile_regex(struct rn_tok *t, const char *pattern)
{
    int err;
    PCRE2_SIZE erroff;
    t->re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                          &err, &erroff, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return bad(t, "pre_tokenizer regex: %s at offset %zu", (const char *)msg, (size_t)erroff);
    }
    /* JIT is an optimisation: without it (no JIT support on this CPU or
     * build) the interpreter gives the same matches. */
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    t->md = pcre2_match_data_create(1, NULL);
    t->mctx = pcre2_match_context_create(NULL);
    if (!t->md || !t->mctx)
        return -ENOMEM;
    if (t->jit) {
        /* A long run of one class (a megabyte of spaces) may backtrack over
         * the whole run; the JIT stack grows on demand up to this bound. */
        t->jstack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, NULL);
        if (!t->jstack)
            return -ENOMEM;
        pcre2_jit_stack_assign(t->mctx, NULL, t->jstack);
    }
    return 0;
}

static int tok_load(struct rn_tok *t, const cJSON *root)
{
    if (!cJSON_IsObject(root))
        return bad(t, "top level is not a JSON object");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model))
        return bad(t, "missing \"model\"");
    const char *mty = json_type_str(model);
    if (mty && strcmp(mty, "BPE") != 0)
        return bad(t, "model.type is \"%s\"; only BPE is supported", mty);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")))
        return bad(t, "model.byte_fallback is not supported");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return bad(t, "model.dropout is not supported");
    if (!json_is_null_or_missing(model, "continuing_subword_prefix") ||
        !json_is_null_or_missing(model, "end_of_word_suffix"))
        return bad(t, "model: continuing_subword_prefix/end_of_word_suffix are not supported");
    if (!json_is_null_or_missing(root, "normalizer"))
        return bad(t, "normalizer: not supported (expected null)");
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec) && (!json_type_str(dec) || strcmp(json_type_str(dec), "ByteLevel")))
        return bad(t, "decoder: only ByteLevel is supported");
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));

    int16_t inv[0x144];
    byte_level_inverse(inv);
    int r;
    if ((r = load_vocab(t, cJSON_GetObjectItemCaseSensitive(model, "vocab"), inv)))
        return r;
    if ((r = load_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"), inv)))
        return r;
    if ((r = load_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"))))
        return r;
    const char *pattern;
    if ((r = load_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), &pattern)))
        return r;
    return compile_regex(t, pattern);
}

int rn_tok_open(const char *path, struct rn_tok **out)
{
    *out = NULL;
    struct rn_tok *t = calloc(1, sizeof *t);
    if (!t)
        return -ENOMEM;
    t->path = strdup(path);
    t->cache = calloc((size_t)1 << CACHE_BITS, sizeof *t->cache);
    if (!t->path || !t->cache) {
        rn_tok_free(t);
        return -ENOMEM;
    }
    char *data = NULL;
    size_t len = 0;
    int r = read_file(path, &data, &len);
    if (r) {
        rn_tok_free(t);
        return r;
    }
    cJSON *root = cJSON_ParseWithLength(data, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= data && at <= data + len ? (size_t)(at - data) : 0;
        free(data);
        r = bad(t, "invalid JSON near byte %zu", off);
        rn_tok_free(t);
        return r;
    }
    free(data);
    r = tok_load(t, root);
    cJSON_Delete(root);
    if (r) {
        if (r == -ENOMEM)
            dq_log(DQ_LOG_ERROR, TAG, "%s: out of memory", path);
        rn_tok_free(t);
        return r;
    }
    *out = t;
    return 0;
}

void rn_tok_free(struct rn_tok *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n_added; i++)
        free(t->added[i].content);
    free(t->added);
    pcre2_match_data_free(t->md);
    pcre2_match_context_free(t->mctx);
    pcre2_jit_stack_free(t->jstack);
    pcre2_code_free(t->re);
    free(t->cache);
    rn_buf_free(&t->cache_keys);
    rn_ids_free(&t->cache_ids);
    free(t->s_id);
    free(t->s_prev);
    free(t->s_next);
    free(t->s_rank);
    free(t->s_new);
    free(t->heap);
    free(t->vtab);
    free(t->mtab);
    free(t->tokb);
    free(t->special);
    free(t->arena);
    free(t->path);
    free(t);
}

int32_t rn_tok_n_ids(const struct rn_tok *t) { return t->n_ids; }
size_t rn_tok_vocab_size(const struct rn_tok *t) { return t->vocab_n; }
size_t rn_tok_merges_count(const struct rn_tok *t) { return t->merges_n; }

const uint8_t *rn_tok_bytes(const struct rn_tok *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_ids || t->tokb[id].len == UINT32_MAX)
        return NULL;
    return tok_bytes(t, id, len);
}

bool rn_tok_is_special(const struct rn_tok *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && t->special[id];
}

int32_t rn_tok_find_added(const struct rn_tok *t, const char *content)
{
    for (size_t i = 0; i < t->n_added; i++)
        if (strcmp(t->added[i].content, content) == 0)
            return t->added[i].id;
    return -ENOENT;
}

int rn_tok_decode(const struct rn_tok *t, const int32_t *ids, size_t n, struct rn_buf *out)
{
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const uint8_t *p = rn_tok_bytes(t, ids[i], &len);
        if (!p) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: id %d (position %zu) is not a token (ids are 0..%d)",
                   t->path, ids[i], i, t->n_ids - 1);
            return -EINVAL;
        }
        if (rn_buf_append(out, p, len))
            return -ENOMEM;
    }
    return 0;
}

/* ---------------------------------------------------------------- BPE */

/* Heap entry of the long-word BPE: a candidate merge of the symbol at pos
 * (left_id) with its right neighbour (right_id). Stale entries (either side
 * changed) are skipped when popped. */
struct hent {
    uint32_t rank;
    int32_t pos, left_id, right_id, new_id;
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
    int32_t *e = realloc(t->s_new, cap * sizeof *e);
    if (e)
        t->s_new = e;
    if (!a || !b || !c || !d || !e)
        return -ENOMEM;
    t->s_cap = cap;
    return 0;
}

#define BPE_SHORT 64

/* Short words: symbols in an array, the pair ranks beside them; each step
 * merges the lowest-ranked, leftmost pair. O(n^2) for n <= BPE_SHORT. */
static size_t bpe_short(struct rn_tok *t, const uint8_t *p, size_t n)
{
    int32_t *id = t->s_id, *nw = t->s_new;
    uint32_t *rk = t->s_rank;
    for (size_t i = 0; i < n; i++)
        id[i] = t->byte_id[p[i]];
    for (size_t i = 0; i + 1 < n; i++) {
        const struct mslot *m = merge_find(t, id[i], id[i + 1]);
        rk[i] = m ? m->rank : UINT32_MAX;
        nw[i] = m ? m->new_id : -1;
    }
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
        id[best] = nw[best];
        size_t tail = n - best - 2;     /* elements after best+1 */
        memmove(id + best + 1, id + best + 2, tail * sizeof *id);
        if (tail) {
            memmove(rk + best + 1, rk + best + 2, (tail - 1) * sizeof *rk);
            memmove(nw + best + 1, nw + best + 2, (tail - 1) * sizeof *nw);
        }
        n--;
        for (size_t i = best ? best - 1 : 0; i <= best && i + 1 < n; i++) {
            const struct mslot *m = merge_find(t, id[i], id[i + 1]);
            rk[i] = m ? m->rank : UINT32_MAX;
            nw[i] = m ? m->new_id : -1;
        }
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
        const struct mslot *m = merge_find(t, id[i], id[i + 1]);
        if (m)
            heap_push(h, &hn, (struct hent){m->rank, (int32_t)i, id[i], id[i + 1], m->new_id});
    }
    /* A dead symbol is marked by id -1. Each merge kills one symbol and
     * pushes at most two entries, so the heap never exceeds 2n. */
    while (hn) {
        struct hent e = heap_pop(h, &hn);
        int32_t r = next[e.pos];
        if (id[e.pos] != e.left_id || r < 0 || id[r] != e.right_id)
            continue;
        id[e.pos] = e.new_id;
        id[r] = -1;
        next[e.pos] = next[r];
        if (next[r] >= 0)
            prev[next[r]] = e.pos;
        int32_t l = prev[e.pos], nx = next[e.pos];
        const struct mslot *m;
        if (l >= 0 && (m = merge_find(t, id[l], id[e.pos])))
            heap_push(h, &hn, (struct hent){m->rank, l, id[l], id[e.pos], m->new_id});
        if (nx >= 0 && (m = merge_find(t, id[e.pos], id[nx])))
            heap_push(h, &hn, (struct hent){m->rank, e.pos, id[e.pos], id[nx], m->new_id});
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
static int encode_pretoken(struct rn_tok *t, const uint8_t *p, size_t n, struct rn_ids *out)
{
    uint64_t h = hash_bytes(p, n);
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
            size_t cl;
            utf8_step(p + s, len - s, &cl);
            search = s + cl;
            continue;
        }
        int r;
        if (s > pos && (r = encode_pretoken(t, p + pos, s - pos, out)))  /* gap */
            return r;
        if ((r = encode_pretoken(t, p + s, e - s, out)))
            return r;
        pos = search = e;
    }
    if (pos < len)
        return encode_pretoken(t, p + pos, len - pos, out);
    return 0;
}
