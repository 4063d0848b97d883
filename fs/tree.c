/* tree.c — the virtual tree of a bnbfs mount: which files exist, their
 * sizes and times, the bytes it synthesizes (config.json rewrite, shard
 * headers, the index), and name lookup.
 *
 * Not the read path (read.c) and not caching (cache.c).
 * Invariant: built once by fs_core_open() and immutable afterwards; only
 * the atomics and the xxh fields of nodes change while mounted.
 *
 * Sharding (docs/DESIGN.md "The mount"): shard 1 holds
 * model.embed_tokens.weight; then one shard per decoder layer, split greedily
 * when it would pass 2 GiB; the last holds every other model-level tensor
 * (model.norm.weight, lm_head.weight, ...). Within a shard tensors are sorted
 * by name and tile the data buffer; the header is padded with spaces to a
 * multiple of 8 and carries __metadata__ {"format":"pt"}.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <xxhash.h>

#include "fs_int.h"

/* ------------------------------------------------------ string builder */

struct sbuf { char *p; size_t len, cap; bool oom; };

static void sb_grow(struct sbuf *b, size_t add)
{
    if (b->oom) return;
    if (b->len + add + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + add + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = true; return; }
    b->p = p; b->cap = cap;
}

static void sb_put(struct sbuf *b, const char *s, size_t n)
{
    sb_grow(b, n);
    if (b->oom) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_puts(struct sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3)))
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) { b->oom = true; return; }
    if ((size_t)n < sizeof tmp) { sb_put(b, tmp, (size_t)n); return; }
    sb_grow(b, (size_t)n);
    if (b->oom) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* A JSON string literal (names come from the source header: escape them). */
static void sb_json_str(struct sbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') { sb_put(b, "\\", 1); sb_put(b, s, 1); }
        else if (ch < 0x20) sb_printf(b, "\\u%04x", ch);
        else sb_put(b, s, 1);
    }
    sb_put(b, "\"", 1);
}

/* --------------------------------------------------------------- nodes */

struct fs_node *fs_node_get(struct fs_core *c, uint64_t ino)
{
    if (ino < 1 || ino > c->nnodes) return NULL;
    return &c->nodes[ino - 1];
}

int fs_src_index_of(const struct fs_core *c, const struct dq_stfile *f)
{
    for (uint32_t i = 0; i < c->nsrcs; i++)
        if (c->srcs[i].st == f) return (int)i;
    return -1;
}

static uint64_t node_add(struct fs_core *c, uint64_t cap, uint64_t parent, const char *name,
                         enum fs_kind kind)
{
    if (c->nnodes >= cap) return 0;
    struct fs_node *n = &c->nodes[c->nnodes];
    memset(n, 0, sizeof *n);
    n->name = strdup(name);
    if (!n->name) return 0;
    n->ino = ++c->nnodes;
    n->parent = parent ? parent : n->ino;
    n->kind = kind;
    n->src = -1;
    n->mtime = c->mount_time;
    return n->ino;
}

static struct fs_node *N(struct fs_core *c, uint64_t ino) { return &c->nodes[ino - 1]; }

static int child_cmp(const void *a, const void *b, void *ctx)
{
    struct fs_core *c = ctx;
    return strcmp(N(c, *(const uint64_t *)a)->name, N(c, *(const uint64_t *)b)->name);
}

/* Fills every directory's sorted child list from the parent links. */
static int link_children(struct fs_core *c)
{
    for (uint64_t i = 1; i <= c->nnodes; i++) {
        struct fs_node *n = N(c, i);
        if (n->ino == FS_ROOT_INO) continue;
        N(c, n->parent)->nchild++;
    }
    for (uint64_t i = 1; i <= c->nnodes; i++) {
        struct fs_node *d = N(c, i);
        if (d->kind != FS_K_DIR) continue;
        d->child = calloc(d->nchild ? d->nchild : 1, sizeof *d->child);
        if (!d->child) return -ENOMEM;
        d->nchild = 0;
    }
    for (uint64_t i = 1; i <= c->nnodes; i++) {
        struct fs_node *n = N(c, i);
        if (n->ino == FS_ROOT_INO) continue;
        struct fs_node *d = N(c, n->parent);
        d->child[d->nchild++] = n->ino;
    }
    for (uint64_t i = 1; i <= c->nnodes; i++) {
        struct fs_node *d = N(c, i);
        if (d->kind == FS_K_DIR && d->nchild > 1)
            qsort_r(d->child, d->nchild, sizeof *d->child, child_cmp, c);
    }
    return 0;
}

static void ts_max(struct timespec *a, const struct timespec *b)
{
    if (b->tv_sec > a->tv_sec || (b->tv_sec == a->tv_sec && b->tv_nsec > a->tv_nsec)) *a = *b;
}

/* ------------------------------------------------------------- sources */

static int src_add(struct fs_core *c, uint32_t cap, const char *name, const char *path,
                   struct dq_stfile *st, int fd, const struct stat *id)
{
    if (c->nsrcs >= cap) return -EOVERFLOW;
    struct fs_src *s = &c->srcs[c->nsrcs];
    memset(s, 0, sizeof *s);
    s->name = strdup(name);
    s->path = strdup(path);
    if (!s->name || !s->path) { free(s->name); free(s->path); return -ENOMEM; }
    s->st = st;
    s->fd = fd;
    s->id = *id;
    s->wd = -1;
    atomic_init(&s->stale, false);
    c->nsrcs++;
    return 0;
}

static bool is_virtual_name(const char *name)
{
    size_t n = strlen(name);
    if (!strcmp(name, "tensors") || !strcmp(name, ".bnbfs")) return true;
    if (!strcmp(name, "model.safetensors.index.json")) return true;
    /* Any other safetensors file would be a second, conflicting set of weights. */
    return n > 12 && !strcmp(name + n - 12, ".safetensors");
}

/* ------------------------------------------------- config.json rewrite */

static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static const char *skip_string(const char *p, const char *e)
{
    if (p >= e || *p != '"') return NULL;
    for (p++; p < e; p++) {
        if (*p == '\\') { p++; continue; }
        if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *e)
{
    if (p >= e) return NULL;
    if (*p == '"') return skip_string(p, e);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < e) {
            if (*p == '"') { p = skip_string(p, e); if (!p) return NULL; continue; }
            if (*p == '{' || *p == '[') depth++;
            else if (*p == '}' || *p == ']') { if (--depth == 0) return p + 1; }
            p++;
        }
        return NULL;
    }
    while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
           *p != '\r' && *p != '\t')
        p++;
    return p;
}

struct member { const char *key, *key_end, *val, *val_end; };
struct edit { size_t from, to; const char *text; };

static int edit_cmp(const void *a, const void *b)
{
    const struct edit *x = a, *y = b;
    return (x->from > y->from) - (x->from < y->from);
}

/* Rewrites the text of config.json without reformatting it: the
 * quantization_config member is cut out, the values of torch_dtype and
 * dtype are replaced (torch_dtype is appended when neither exists); every
 * other byte stays as it was, so numbers keep their spelling. The document
 * is validated with cJSON first. */
static int config_rewrite(const char *path, const char *text, size_t len, const char *dtype,
                          uint8_t **out, uint64_t *outlen)
{
    cJSON *j = cJSON_ParseWithLength(text, len);
    if (!j || !cJSON_IsObject(j)) {
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: not a JSON object%s", path,
               j ? "" : " (parse error)");
        cJSON_Delete(j);
        return -EINVAL;
    }
    cJSON_Delete(j);

    const char *b = text, *e = text + len;
    const char *p = skip_ws(b, e);
    if (p >= e || *p != '{') return -EINVAL;
    const char *open = p;
    p = skip_ws(p + 1, e);
    size_t nm = 0, capm = 16;
    struct member *m = malloc(capm * sizeof *m);
    if (!m) return -ENOMEM;
    const char *close = NULL;
    while (p < e) {
        if (*p == '}') { close = p; break; }
        if (nm == capm) {
            struct member *m2 = realloc(m, (capm *= 2) * sizeof *m);
            if (!m2) { free(m); return -ENOMEM; }
            m = m2;
        }
        struct member *x = &m[nm++];
        x->key = p;
        x->key_end = skip_string(p, e);
        if (!x->key_end) break;
        p = skip_ws(x->key_end, e);
        if (p >= e || *p != ':') break;
        x->val = skip_ws(p + 1, e);
        x->val_end = skip_value(x->val, e);
        if (!x->val_end) break;
        p = skip_ws(x->val_end, e);
        if (p < e && *p == ',') p = skip_ws(p + 1, e);
    }
    if (!close) {
        free(m);
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: cannot scan the top-level object", path);
        return -EINVAL;
    }

    char dtq[32];
    snprintf(dtq, sizeof dtq, "\"%s\"", dtype);
    struct edit ed[64];
    size_t ne = 0;
    bool have_dtype = false;
    for (size_t i = 0; i < nm && ne + 2 < 64; i++) {
        size_t klen = (size_t)(m[i].key_end - m[i].key);
        if (klen == 21 && !memcmp(m[i].key, "\"quantization_config\"", 21)) {
            if (i > 0)          /* from the end of the previous value */
                ed[ne++] = (struct edit){ (size_t)(m[i - 1].val_end - b),
                                          (size_t)(m[i].val_end - b), "" };
            else if (nm > 1)    /* first member: up to the next key */
                ed[ne++] = (struct edit){ (size_t)(m[i].key - b), (size_t)(m[i + 1].key - b), "" };
            else
                ed[ne++] = (struct edit){ (size_t)(m[i].key - b), (size_t)(m[i].val_end - b), "" };
        } else if ((klen == 13 && !memcmp(m[i].key, "\"torch_dtype\"", 13)) ||
                   (klen == 7 && !memcmp(m[i].key, "\"dtype\"", 7))) {
            ed[ne++] = (struct edit){ (size_t)(m[i].val - b), (size_t)(m[i].val_end - b), dtq };
            have_dtype = true;
        }
    }
    char add[128];
    if (!have_dtype) {
        /* Append after the last member kept, with its indentation. */
        const struct member *last = NULL;
        for (size_t i = nm; i-- > 0;) {
            size_t klen = (size_t)(m[i].key_end - m[i].key);
            if (!(klen == 21 && !memcmp(m[i].key, "\"quantization_config\"", 21))) {
                last = &m[i];
                break;
            }
        }
        if (last) {
            const char *ind = last->key;
            while (ind > open + 1 && (ind[-1] == ' ' || ind[-1] == '\t')) ind--;
            bool nl = ind > open + 1 && ind[-1] == '\n';
            snprintf(add, sizeof add, ",%s%.*s\"torch_dtype\": %s", nl ? "\n" : " ",
                     (int)(last->key - ind > 32 ? 32 : last->key - ind), ind, dtq);
            ed[ne++] = (struct edit){ (size_t)(last->val_end - b), (size_t)(last->val_end - b), add };
        } else {
            snprintf(add, sizeof add, "\"torch_dtype\": %s", dtq);
            ed[ne++] = (struct edit){ (size_t)(close - b), (size_t)(close - b), add };
        }
    }
    free(m);
    qsort(ed, ne, sizeof ed[0], edit_cmp);

    struct sbuf o = {0};
    size_t pos = 0;
    for (size_t i = 0; i < ne; i++) {
        if (ed[i].from < pos) continue;     /* overlapping edits cannot happen; be safe */
        sb_put(&o, b + pos, ed[i].from - pos);
        sb_puts(&o, ed[i].text);
        pos = ed[i].to;
    }
    sb_put(&o, b + pos, len - pos);
    if (o.oom) { free(o.p); return -ENOMEM; }
    *out = (uint8_t *)o.p;
    *outlen = o.len;
    return 0;
}

static const char *dtype_hf_name(enum dq_dtype t)
{
    switch (t) {
    case DQ_BF16: return "bfloat16";
    case DQ_F32: return "float32";
    default: return "float16";
    }
}

static int read_small_file(int fd, const char *path, uint64_t size, char **out)
{
    if (size > (64u << 20)) {
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %" PRIu64 " bytes is too large for a config file",
               path, size);
        return -EFBIG;
    }
    char *buf = malloc(size + 1);
    if (!buf) return -ENOMEM;
    uint64_t got = 0;
    while (got < size) {
        ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int err = r < 0 ? -errno : -EIO;
            dq_log(DQ_LOG_ERROR, FS_TAG, "%s: read: %s", path, strerror(-err));
            free(buf);
            return err;
        }
        got += (uint64_t)r;
    }
    buf[size] = 0;
    *out = buf;
    return 0;
}

/* ------------------------------------------------------ tensor records */

static void hash_tensor_identity(XXH3_state_t *h, const struct dq_tensor *t)
{
    if (!t) return;
    const struct dq_stfile *f = t->file;
    XXH3_64bits_update(h, f->path, strlen(f->path) + 1);
    uint64_t v[6] = { (uint64_t)f->st.st_dev, (uint64_t)f->st.st_ino, t->offset, t->nbytes,
                      (uint64_t)f->st.st_mtim.tv_sec, (uint64_t)f->st.st_mtim.tv_nsec };
    XXH3_64bits_update(h, v, sizeof v);
}

static void add_src_file(uint32_t *set, uint32_t *n, int idx)
{
    if (idx < 0) return;
    for (uint32_t i = 0; i < *n; i++)
        if (set[i] == (uint32_t)idx) return;
    set[(*n)++] = (uint32_t)idx;
}

static int tensors_build(struct fs_core *c)
{
    const struct dq_plan *p = c->plan;
    c->tensors = calloc(p->nout ? p->nout : 1, sizeof *c->tensors);
    if (!c->tensors) return -ENOMEM;
    XXH3_state_t *h = XXH3_createState();
    if (!h) return -ENOMEM;
    uint32_t *set = calloc(c->nsrcs ? c->nsrcs : 1, sizeof *set);
    if (!set) { XXH3_freeState(h); return -ENOMEM; }
    int err = 0;
    for (size_t i = 0; i < p->nout && !err; i++) {
        const struct dq_out *o = &p->out[i];
        struct fs_tensor *t = &c->tensors[i];
        t->o = o;
        t->idx = (uint32_t)i;
        atomic_init(&t->stale, false);
        atomic_init(&t->err_logged, false);
        XXH3_64bits_reset(h);
        uint32_t ns = 0;
        for (uint32_t k = 0; k < o->nsrc; k++) {
            const struct dq_src *s = &o->src[k];
            const struct dq_tensor *parts[7] = { s->t };
            if (s->q) {
                parts[1] = s->q->absmax; parts[2] = s->q->quant_map; parts[3] = s->q->state;
                parts[4] = s->q->nested_absmax; parts[5] = s->q->nested_quant_map;
                parts[6] = s->q->codes;
            }
            for (int j = 0; j < 7; j++) {
                if (!parts[j]) continue;
                hash_tensor_identity(h, parts[j]);
                add_src_file(set, &ns, fs_src_index_of(c, parts[j]->file));
            }
        }
        uint32_t dt = (uint32_t)o->dtype;
        XXH3_64bits_update(h, &dt, sizeof dt);
        XXH3_64bits_update(h, o->name, strlen(o->name) + 1);
        t->id_hash = XXH3_64bits_digest(h);
        t->srcs = malloc((ns ? ns : 1) * sizeof *t->srcs);
        if (!t->srcs) { err = -ENOMEM; break; }
        memcpy(t->srcs, set, ns * sizeof *set);
        t->nsrcs = ns;
        for (uint32_t k = 0; k < ns; k++) {
            struct fs_src *s = &c->srcs[set[k]];
            uint32_t *nt = realloc(s->tensors, (s->ntensors + 1) * sizeof *nt);
            if (!nt) { err = -ENOMEM; break; }
            s->tensors = nt;
            s->tensors[s->ntensors++] = (uint32_t)i;
        }
        /* Largest slice, for the cache bound: every expert repeats the
         * first one's slicing, so looking at those is enough. */
        uint64_t first = o->slices_per_src < o->nslices ? o->slices_per_src : o->nslices;
        for (uint64_t s = 0; s < first; s++) {
            uint64_t off, len;
            dq_out_slice_range(o, s, &off, &len);
            if (len > c->max_slice) c->max_slice = len;
        }
        c->total_slices += o->nslices;
    }
    free(set);
    XXH3_freeState(h);
    return err;
}

/* -------------------------------------------------------------- shards */

struct shard { uint32_t *t; uint32_t n; uint64_t bytes; };

static int name_idx_cmp(const void *a, const void *b, void *ctx)
{
    const struct fs_core *c = ctx;
    return strcmp(c->plan->out[*(const uint32_t *)a].name, c->plan->out[*(const uint32_t *)b].name);
}

static int shard_push(struct shard **sh, uint32_t *nsh, uint32_t *cap)
{
    if (*nsh == *cap) {
        uint32_t nc = *cap ? *cap * 2 : 32;
        struct shard *s2 = realloc(*sh, nc * sizeof **sh);
        if (!s2) return -ENOMEM;
        *sh = s2;
        *cap = nc;
    }
    memset(&(*sh)[*nsh], 0, sizeof **sh);
    (*nsh)++;
    return 0;
}

/* Splits one group (already sorted by name) greedily at FS_SHARD_MAX_BYTES. */
static int shard_group(struct fs_core *c, const uint32_t *g, uint32_t ng, struct shard **sh,
                       uint32_t *nsh, uint32_t *cap)
{
    if (!ng) return 0;
    int err = shard_push(sh, nsh, cap);
    if (err) return err;
    for (uint32_t i = 0; i < ng; i++) {
        uint64_t nb = c->plan->out[g[i]].nbytes;
        struct shard *cur = &(*sh)[*nsh - 1];
        if (cur->n && cur->bytes + nb > FS_SHARD_MAX_BYTES) {
            if ((err = shard_push(sh, nsh, cap))) return err;
            cur = &(*sh)[*nsh - 1];
        }
        uint32_t *t2 = realloc(cur->t, (cur->n + 1) * sizeof *t2);
        if (!t2) return -ENOMEM;
        cur->t = t2;
        cur->t[cur->n++] = g[i];
        cur->bytes += nb;
    }
    return 0;
}

static int shards_plan(struct fs_core *c, struct shard **out, uint32_t *nout)
{
    const struct dq_plan *p = c->plan;
    uint32_t n = (uint32_t)p->nout;
    uint32_t *order = malloc((n ? n : 1) * sizeof *order);
    uint32_t *g = malloc((n ? n : 1) * sizeof *g);
    struct shard *sh = NULL;
    uint32_t nsh = 0, cap = 0;
    int err = 0;
    if (!order || !g) { err = -ENOMEM; goto out; }
    for (uint32_t i = 0; i < n; i++) order[i] = i;
    qsort_r(order, n, sizeof *order, name_idx_cmp, c);

    /* embeddings */
    uint32_t ng = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!strcmp(p->out[order[i]].name, "model.embed_tokens.weight")) g[ng++] = order[i];
    if ((err = shard_group(c, g, ng, &sh, &nsh, &cap))) goto out;
    /* decoder layers in order */
    uint32_t maxl = 0;
    bool any_layer = false;
    for (uint32_t i = 0; i < n; i++)
        if (p->out[i].layer != UINT32_MAX) {
            any_layer = true;
            if (p->out[i].layer > maxl) maxl = p->out[i].layer;
        }
    for (uint32_t l = 0; any_layer && l <= maxl; l++) {
        ng = 0;
        for (uint32_t i = 0; i < n; i++)
            if (p->out[order[i]].layer == l) g[ng++] = order[i];
        if ((err = shard_group(c, g, ng, &sh, &nsh, &cap))) goto out;
    }
    /* model-level rest: final norm, lm_head, ... */
    ng = 0;
    for (uint32_t i = 0; i < n; i++)
        if (p->out[order[i]].layer == UINT32_MAX &&
            strcmp(p->out[order[i]].name, "model.embed_tokens.weight"))
            g[ng++] = order[i];
    err = shard_group(c, g, ng, &sh, &nsh, &cap);
out:
    free(order);
    free(g);
    if (err) {
        for (uint32_t i = 0; i < nsh; i++) free(sh[i].t);
        free(sh);
        return err;
    }
    *out = sh;
    *nout = nsh;
    return 0;
}

static void shape_json(struct sbuf *b, const struct dq_out *o, const char *sep)
{
    sb_put(b, "[", 1);
    for (int d = 0; d < o->ndim; d++) sb_printf(b, "%s%" PRIu64, d ? sep : "", o->shape[d]);
    sb_put(b, "]", 1);
}

/* Builds the shard's 8-byte length + JSON header (space-padded so the data
 * starts at a multiple of 8) and its extents. */
static int shard_header(struct fs_core *c, struct fs_node *n, const struct shard *s)
{
    struct sbuf b = {0};
    sb_puts(&b, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t off = 0;
    for (uint32_t i = 0; i < s->n; i++) {
        const struct dq_out *o = &c->plan->out[s->t[i]];
        sb_put(&b, ",", 1);
        sb_json_str(&b, o->name);
        sb_printf(&b, ":{\"dtype\":\"%s\",\"shape\":", dq_dtype_name(o->dtype));
        shape_json(&b, o, ",");
        sb_printf(&b, ",\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + o->nbytes);
        off += o->nbytes;
    }
    sb_put(&b, "}", 1);
    while (b.len % 8) sb_put(&b, " ", 1);
    if (b.oom) { free(b.p); return -ENOMEM; }
    n->memlen = 8 + b.len;
    n->mem = malloc(n->memlen);
    if (!n->mem) { free(b.p); return -ENOMEM; }
    uint64_t hl = b.len;
    for (int k = 0; k < 8; k++) n->mem[k] = (uint8_t)(hl >> (8 * k));
    memcpy(n->mem + 8, b.p, b.len);
    free(b.p);
    n->size = n->memlen + off;

    n->ext = calloc(s->n ? s->n : 1, sizeof *n->ext);
    if (!n->ext) return -ENOMEM;
    uint64_t pos = n->memlen;
    for (uint32_t i = 0; i < s->n; i++) {
        struct fs_tensor *t = &c->tensors[s->t[i]];
        t->shard_ino = n->ino;
        t->shard_off = pos;
        if (t->o->nbytes) n->ext[n->next++] = (struct fs_extent){ pos, t->o->nbytes, t->idx };
        pos += t->o->nbytes;
        for (uint32_t k = 0; k < t->nsrcs; k++) ts_max(&n->mtime, &c->srcs[t->srcs[k]].id.st_mtim);
    }
    return 0;
}

static int index_json(struct fs_core *c, struct fs_node *n, const struct shard *sh, uint32_t nsh,
                      char (*names)[48])
{
    const struct dq_plan *p = c->plan;
    uint32_t nt = (uint32_t)p->nout;
    uint32_t *order = malloc((nt ? nt : 1) * sizeof *order);
    const char **where = calloc(nt ? nt : 1, sizeof *where);
    if (!order || !where) { free(order); free(where); return -ENOMEM; }
    for (uint32_t k = 0; k < nsh; k++)
        for (uint32_t i = 0; i < sh[k].n; i++) where[sh[k].t[i]] = names[k];
    for (uint32_t i = 0; i < nt; i++) order[i] = i;
    qsort_r(order, nt, sizeof *order, name_idx_cmp, c);
    struct sbuf b = {0};
    sb_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %" PRIu64 "\n  },\n"
              "  \"weight_map\": {", p->total_bytes);
    for (uint32_t i = 0; i < nt; i++) {
        sb_puts(&b, i ? ",\n    " : "\n    ");
        sb_json_str(&b, p->out[order[i]].name);
        sb_puts(&b, ": ");
        sb_json_str(&b, where[order[i]]);
    }
    sb_puts(&b, "\n  }\n}\n");
    free(order);
    free(where);
    if (b.oom) { free(b.p); return -ENOMEM; }
    n->mem = (uint8_t *)b.p;
    n->memlen = n->size = b.len;
    return 0;
}

/* --------------------------------------------------------------- build */

static int str_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Regular files of SRC that are neither weights nor names the mount makes. */
static int list_passthrough(struct fs_core *c, char ***out, uint32_t *nout)
{
    DIR *d = opendir(c->src);
    if (!d) {
        int err = -errno;
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s", c->src, strerror(-err));
        return err;
    }
    char **v = NULL;
    uint32_t n = 0, cap = 0;
    int err = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *nm = de->d_name;
        if (!strcmp(nm, ".") || !strcmp(nm, "..")) continue;
        if (dq_ckpt_is_weight_file(c->ck, nm) || is_virtual_name(nm)) continue;
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", c->src, nm) >= (int)sizeof path) continue;
        struct stat st;
        if (stat(path, &st) || !S_ISREG(st.st_mode)) continue;   /* dirs, dangling links */
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            char **v2 = realloc(v, cap * sizeof *v);
            if (!v2) { err = -ENOMEM; break; }
            v = v2;
        }
        if (!(v[n] = strdup(nm))) { err = -ENOMEM; break; }
        n++;
    }
    closedir(d);
    if (err) {
        for (uint32_t i = 0; i < n; i++) free(v[i]);
        free(v);
        return err;
    }
    if (n > 1) qsort(v, n, sizeof *v, str_cmp);
    *out = v;
    *nout = n;
    return 0;
}

static bool name_ok_as_file(const char *s)
{
    size_t n = strlen(s);
    return n && n < 256 && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

int fs_tree_build(struct fs_core *c)
{
    const struct dq_plan *p = c->plan;
    char **pass = NULL;
    uint32_t npass = 0;
    struct shard *sh = NULL;
    uint32_t nsh = 0;
    char (*shname)[48] = NULL;
    int err;

    struct stat dst;
    if (stat(c->src, &dst)) {
        err = -errno;
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s", c->src, strerror(-err));
        return err;
    }
    if ((err = list_passthrough(c, &pass, &npass))) return err;

    /* Sources: every shard of the checkpoint, then the passthrough files. */
    uint32_t srccap = (uint32_t)c->ck->nfiles + npass;
    c->srcs = calloc(srccap ? srccap : 1, sizeof *c->srcs);
    if (!c->srcs) { err = -ENOMEM; goto out; }
    for (size_t i = 0; i < c->ck->nfiles; i++) {
        struct dq_stfile *f = c->ck->files[i];
        const char *base = strrchr(f->path, '/');
        if ((err = src_add(c, srccap, base ? base + 1 : f->path, f->path, f, -1, &f->st))) goto out;
    }
    uint32_t first_pass = c->nsrcs;
    for (uint32_t i = 0; i < npass; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", c->src, pass[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) {
            err = -errno;
            dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s", path, strerror(-err));
            if (fd >= 0) close(fd);
            goto out;
        }
        if ((err = src_add(c, srccap, pass[i], path, NULL, fd, &st))) { close(fd); goto out; }
    }

    if ((err = tensors_build(c))) goto out;
    if ((err = shards_plan(c, &sh, &nsh))) goto out;
    shname = calloc(nsh ? nsh : 1, sizeof *shname);
    if (!shname) { err = -ENOMEM; goto out; }
    for (uint32_t k = 0; k < nsh; k++)
        snprintf(shname[k], sizeof shname[k], "model-%05u-of-%05u.safetensors", k + 1, nsh);

    uint64_t cap = 5 + npass + nsh + p->nout;
    c->nodes = calloc(cap, sizeof *c->nodes);
    if (!c->nodes) { err = -ENOMEM; goto out; }
    uint64_t root = node_add(c, cap, 0, "", FS_K_DIR);
    N(c, root)->mtime = dst.st_mtim;

    for (uint32_t i = 0; i < npass; i++) {
        uint32_t si = first_pass + i;
        struct fs_src *s = &c->srcs[si];
        bool cfg = !strcmp(s->name, "config.json");
        uint64_t ino = node_add(c, cap, root, s->name, cfg ? FS_K_CONFIG : FS_K_PASSTHRU);
        if (!ino) { err = -ENOMEM; goto out; }
        struct fs_node *n = N(c, ino);
        n->src = (int32_t)si;
        n->mtime = s->id.st_mtim;
        n->size = (uint64_t)s->id.st_size;
        s->node = ino;
        if (cfg) {
            char *text = NULL;
            if ((err = read_small_file(s->fd, s->path, (uint64_t)s->id.st_size, &text))) goto out;
            err = config_rewrite(s->path, text, (size_t)s->id.st_size, dtype_hf_name(p->out_dtype),
                                 &n->mem, &n->memlen);
            free(text);
            if (err) goto out;
            n->size = n->memlen;
        }
    }

    for (uint32_t k = 0; k < nsh; k++) {
        uint64_t ino = node_add(c, cap, root, shname[k], FS_K_SHARD);
        if (!ino) { err = -ENOMEM; goto out; }
        N(c, ino)->mtime = (struct timespec){0};
        if ((err = shard_header(c, N(c, ino), &sh[k]))) goto out;
    }
    if (nsh) {
        uint64_t ino = node_add(c, cap, root, "model.safetensors.index.json", FS_K_INDEX);
        if (!ino) { err = -ENOMEM; goto out; }
        if ((err = index_json(c, N(c, ino), sh, nsh, shname))) goto out;
        struct timespec t = {0};
        for (uint64_t i = 1; i < ino; i++)
            if (N(c, i)->kind == FS_K_SHARD) ts_max(&t, &N(c, i)->mtime);
        N(c, ino)->mtime = t;
    }

    c->tensors_dir = node_add(c, cap, root, "tensors", FS_K_DIR);
    if (!c->tensors_dir) { err = -ENOMEM; goto out; }
    N(c, c->tensors_dir)->mtime = dst.st_mtim;
    for (size_t i = 0; i < p->nout; i++) {
        struct fs_tensor *t = &c->tensors[i];
        if (!name_ok_as_file(t->o->name)) {
            dq_log(DQ_LOG_WARN, FS_TAG, "tensor %s: name cannot be a file; not under tensors/",
                   t->o->name);
            continue;
        }
        uint64_t ino = node_add(c, cap, c->tensors_dir, t->o->name, FS_K_TENSOR);
        if (!ino) { err = -ENOMEM; goto out; }
        struct fs_node *n = N(c, ino);
        t->file_ino = ino;
        n->size = t->o->nbytes;
        n->mtime = (struct timespec){0};
        for (uint32_t k = 0; k < t->nsrcs; k++) ts_max(&n->mtime, &c->srcs[t->srcs[k]].id.st_mtim);
        n->ext = calloc(1, sizeof *n->ext);
        if (!n->ext) { err = -ENOMEM; goto out; }
        if (t->o->nbytes) n->ext[n->next++] = (struct fs_extent){ 0, t->o->nbytes, t->idx };
    }
    c->meta_dir = node_add(c, cap, root, ".bnbfs", FS_K_DIR);
    if (!c->meta_dir || !node_add(c, cap, c->meta_dir, "stats", FS_K_STATS)) {
        err = -ENOMEM;
        goto out;
    }
    err = link_children(c);
out:
    for (uint32_t i = 0; i < npass; i++) free(pass[i]);
    free(pass);
    for (uint32_t k = 0; k < nsh; k++) free(sh[k].t);
    free(sh);
    free(shname);
    return err;
}

void fs_tree_free(struct fs_core *c)
{
    for (uint64_t i = 0; i < c->nnodes; i++) {
        free(c->nodes[i].name);
        free(c->nodes[i].child);
        free(c->nodes[i].mem);
        free(c->nodes[i].ext);
    }
    free(c->nodes);
    c->nodes = NULL;
    c->nnodes = 0;
    if (c->tensors && c->plan)
        for (size_t i = 0; i < c->plan->nout; i++) free(c->tensors[i].srcs);
    free(c->tensors);
    c->tensors = NULL;
    for (uint32_t i = 0; i < c->nsrcs; i++) {
        free(c->srcs[i].name);
        free(c->srcs[i].path);
        free(c->srcs[i].tensors);
        if (c->srcs[i].fd >= 0) close(c->srcs[i].fd);
    }
    free(c->srcs);
    c->srcs = NULL;
    c->nsrcs = 0;
}

/* -------------------------------------------------------------- lookup */

static void fill_stat(struct fs_core *c, const struct fs_node *n, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = n->ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_mtim = st->st_ctim = n->mtime;
    st->st_atim = n->mtime;
    if (n->kind == FS_K_DIR) {
        st->st_mode = S_IFDIR | 0555;
        uint32_t sub = 0;
        for (uint32_t i = 0; i < n->nchild; i++) sub += N(c, n->child[i])->kind == FS_K_DIR;
        st->st_nlink = 2 + sub;
    } else {
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = (off_t)n->size;
        st->st_blocks = (blkcnt_t)((n->size + 511) / 512);
    }
    st->st_blksize = 4096;
}

int fs_getattr(struct fs_core *c, uint64_t ino, struct stat *st)
{
    struct fs_node *n = fs_node_get(c, ino);
    if (!n) return -ENOENT;
    fill_stat(c, n, st);
    return 0;
}

static struct fs_node *child_find(struct fs_core *c, struct fs_node *d, const char *name)
{
    uint32_t lo = 0, hi = d->nchild;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        struct fs_node *x = N(c, d->child[mid]);
        int r = strcmp(name, x->name);
        if (!r) return x;
        if (r < 0) hi = mid;
        else lo = mid + 1;
    }
    return NULL;
}

int fs_lookup(struct fs_core *c, uint64_t parent, const char *name, struct stat *st)
{
    struct fs_node *d = fs_node_get(c, parent);
    if (!d) return -ENOENT;
    if (d->kind != FS_K_DIR) return -ENOTDIR;
    struct fs_node *x;
    if (!strcmp(name, ".")) x = d;
    else if (!strcmp(name, "..")) x = N(c, d->parent);
    else x = child_find(c, d, name);
    if (!x) return -ENOENT;
    fill_stat(c, x, st);
    return 0;
}

int fs_dir_entry(struct fs_core *c, uint64_t dir, uint64_t idx, const char **name, struct stat *st)
{
    struct fs_node *d = fs_node_get(c, dir);
    if (!d) return -ENOENT;
    if (d->kind != FS_K_DIR) return -ENOTDIR;
    struct fs_node *x;
    if (idx == 0) { x = d; *name = "."; }
    else if (idx == 1) { x = N(c, d->parent); *name = ".."; }
    else if (idx - 2 < d->nchild) { x = N(c, d->child[idx - 2]); *name = x->name; }
    else return -ENOENT;
    fill_stat(c, x, st);
    return 0;
}

const char *fs_node_path(struct fs_core *c, uint64_t ino, char *buf, size_t len)
{
    if (!len) return buf;
    buf[0] = 0;
    struct fs_node *n = fs_node_get(c, ino);
    if (!n || n->ino == FS_ROOT_INO) return buf;
    const char *parts[8];
    int np = 0;
    while (n && n->ino != FS_ROOT_INO && np < 8) { parts[np++] = n->name; n = N(c, n->parent); }
    size_t pos = 0;
    for (int i = np - 1; i >= 0; i--) {
        int w = snprintf(buf + pos, len - pos, "%s%s", pos ? "/" : "", parts[i]);
        if (w < 0 || (size_t)w >= len - pos) break;
        pos += (size_t)w;
    }
    return buf;
}

int fs_resolve(struct fs_core *c, const char *path, uint64_t *ino)
{
    uint64_t cur = FS_ROOT_INO;
    char part[256];
    while (*path) {
        while (*path == '/') path++;
        if (!*path) break;
        size_t n = strcspn(path, "/");
        if (n >= sizeof part) return -ENAMETOOLONG;
        memcpy(part, path, n);
        part[n] = 0;
        path += n;
        struct stat st;
        int err = fs_lookup(c, cur, part, &st);
        if (err) return err;
        cur = st.st_ino;
    }
    *ino = cur;
    return 0;
}

void fs_statfs(struct fs_core *c, struct statvfs *sv)
{
    memset(sv, 0, sizeof *sv);
    uint64_t bytes = 0;
    for (uint64_t i = 0; i < c->nnodes; i++)
        if (c->nodes[i].kind != FS_K_DIR && c->nodes[i].kind != FS_K_TENSOR) bytes += c->nodes[i].size;
    sv->f_bsize = sv->f_frsize = 4096;
    sv->f_blocks = (bytes + 4095) / 4096;
    sv->f_files = c->nnodes;
    sv->f_namemax = 255;
    sv->f_flag = ST_RDONLY;
}
