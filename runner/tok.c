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
 * This file: reading tokenizer.json into the tables of tok_int.h, the id
 * and byte lookups, decoding, and the byte/id buffers. Encoding (UTF-8
 * checks, pre-tokenization, BPE) is in tok_encode.c.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dequant.h"
#include "tok_int.h"

#define TAG TOK_TAG

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

/* ------------------------------------------------------- big tables */

/* The vocab and merge tables (8 and 16 MB for gpt-oss) are probed at random
 * for every pre-token; on 4 KiB pages nearly every probe is also a TLB miss.
 * They live in anonymous mappings the kernel may back with 2 MiB pages
 * (MADV_HUGEPAGE; a hint, harmless where transparent huge pages are off). */
#define BIG_ALIGN ((size_t)2 << 20)

static void *big_alloc(size_t bytes)
{
    size_t len = (bytes + BIG_ALIGN - 1) & ~(BIG_ALIGN - 1);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, len, MADV_HUGEPAGE);
    return p;
}

static void big_free(void *p, size_t bytes)
{
    if (p)
        munmap(p, (bytes + BIG_ALIGN - 1) & ~(BIG_ALIGN - 1));
}

/* --------------------------------------------------------- hash tables */

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
            *s = (struct vslot){tag, id, t->tokb[id].off, t->tokb[id].len};
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

/* A later duplicate of a pair replaces the earlier one, as tokenizers'
 * HashMap collect does. */
static void merge_insert(struct rn_tok *t, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
    uint64_t key = (uint64_t)(uint32_t)a << t->cb | (uint32_t)b;
    for (uint64_t i = hash_u64(key) & t->mmask;; i = (i + 1) & t->mmask) {
        uint64_t s = t->mtab[i];
        if (s == UINT64_MAX || s >> t->cr == key) {
            t->mtab[i] = key << t->cr | rank;
            t->merge_new[rank] = new_id;
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

/* tokenizer.json of a 200k vocab is ~13 MB; anything past 1 GiB is refused. */
static int read_file(const char *path, char **data, size_t *len)
{
    int r = dq_read_file(path, (uint64_t)1 << 30, data, len);
    if (r == -EFBIG)
        dq_log(DQ_LOG_ERROR, TAG, "%s: too large for a tokenizer (over 1 GiB)", path);
    else if (r == -EINVAL)
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a regular file", path);
    else if (r)
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s", path, strerror(-r));
    return r;
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
    t->vtab = big_alloc((t->vmask + 1) * sizeof *t->vtab);
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

static unsigned bits_for(uint64_t n)   /* bits to hold 0..n-1 */
{
    unsigned b = 1;
    while (b < 64 && (UINT64_C(1) << b) < n)
        b++;
    return b;
}

static int load_merges(struct rn_tok *t, const cJSON *merges, const int16_t *inv)
{
    if (!cJSON_IsArray(merges))
        return bad(t, "model.merges: expected an array");
    size_t n = (size_t)cJSON_GetArraySize(merges);
    t->cb = bits_for((uint64_t)t->n_ids);
    t->cr = bits_for((uint64_t)n + 1);
    if (2 * t->cb + t->cr > 63)
        return bad(t, "model: %d ids and %zu merges are more than this tokenizer supports",
                   t->n_ids, n);
    t->mmask = pow2_at_least((uint64_t)n * 2 + 1) - 1;
    t->mtab = big_alloc((t->mmask + 1) * sizeof *t->mtab);
    t->merge_new = malloc((n ? n : 1) * sizeof *t->merge_new);
    if (!t->mtab || !t->merge_new)
        return -ENOMEM;
    memset(t->mtab, 0xFF, (t->mmask + 1) * sizeof *t->mtab);
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
    if (r)
        return r;
    t->byte_pair = malloc(65536 * sizeof *t->byte_pair);
    if (!t->byte_pair)
        return -ENOMEM;
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++) {
            t->byte_pair[a << 8 | b] = merge_find(t, t->byte_id[a], t->byte_id[b]);
        }
    return 0;
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
    if (dropout && !cJSON_IsNull(dropout) &&
        !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return bad(t, "model.dropout is not supported");
    if (!json_is_null_or_missing(model, "continuing_subword_prefix") ||
        !json_is_null_or_missing(model, "end_of_word_suffix"))
        return bad(t, "model: continuing_subword_prefix/end_of_word_suffix are not supported");
    if (!json_is_null_or_missing(root, "normalizer"))
        return bad(t, "normalizer: not supported (expected null)");
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec) &&
        (!json_type_str(dec) || strcmp(json_type_str(dec), "ByteLevel")))
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
    const char *pattern = NULL;
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
    rn_tok_encode_free(t);
    if (t->vtab)
        big_free(t->vtab, (t->vmask + 1) * sizeof *t->vtab);
    if (t->mtab)
        big_free(t->mtab, (t->mmask + 1) * sizeof *t->mtab);
    free(t->merge_new);
    free(t->byte_pair);
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

