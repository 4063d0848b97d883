/* read.c — the read path: opening virtual files, turning (file, offset,
 * length) into header bytes and slices of output tensors, read-ahead, the
 * XXH3-128 of whole files, and the extended attributes.
 *
 * Not the cache itself (cache.c) and not FUSE (fuse_ll.c answers with the
 * iovec built here).
 *
 * Invariants: a reply holds references on the slices its iovec points
 * into until fs_reply_release(); a reader holding references never waits
 * for cache memory (it copies into a bounce buffer and lets go instead);
 * bytes of a tensor whose source changed are never handed out, even if
 * they were computed before the change was noticed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "fs_int.h"

struct fs_file {
    struct fs_core *c;
    struct fs_node *n;
    bool internal;              /* xxh3 / fs_pread: not a client read */
    pthread_mutex_t lock;       /* guards ra_* */
    uint64_t ra_next;           /* end of the furthest sequential read */
    uint64_t ra_issued;         /* read-ahead queued up to this file offset */
    uint64_t ra_win;            /* current window, bytes (0: not sequential) */
    char *snap;                 /* STATS: the JSON as of open; owned */
    size_t snaplen;
    struct fs_file *prev, *next;    /* core->files; under core->files_lock */
};

#define RA_SLACK (4u << 20)     /* out-of-order kernel requests still count as sequential */

/* ---------------------------------------------------------------- open */

static void file_init(struct fs_file *f, struct fs_core *c, struct fs_node *n, bool internal)
{
    memset(f, 0, sizeof *f);
    f->c = c;
    f->n = n;
    f->internal = internal;
    pthread_mutex_init(&f->lock, NULL);
}

int fs_open(struct fs_core *c, uint64_t ino, int flags, struct fs_file **out, bool *direct_io)
{
    struct fs_node *n = fs_node_get(c, ino);
    if (!n) return -ENOENT;
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_TRUNC | O_CREAT))) return -EROFS;
    if (n->kind == FS_K_DIR) return -EISDIR;
    struct fs_file *f = malloc(sizeof *f);
    if (!f) return -ENOMEM;
    file_init(f, c, n, false);
    *direct_io = false;
    if (n->kind == FS_K_STATS) {
        int err = fs_stats_json(c, &f->snap, &f->snaplen);
        if (err) { pthread_mutex_destroy(&f->lock); free(f); return err; }
        *direct_io = true;
    }
    pthread_mutex_lock(&c->files_lock);
    f->next = c->files;
    if (c->files) c->files->prev = f;
    c->files = f;
    pthread_mutex_unlock(&c->files_lock);
    *out = f;
    return 0;
}

static void file_free(struct fs_file *f)
{
    free(f->snap);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

void fs_close(struct fs_file *f)
{
    if (!f) return;
    struct fs_core *c = f->c;
    pthread_mutex_lock(&c->files_lock);
    if (f->prev) f->prev->next = f->next; else c->files = f->next;
    if (f->next) f->next->prev = f->prev;
    pthread_mutex_unlock(&c->files_lock);
    file_free(f);
}

void fs_files_close_all(struct fs_core *c)
{
    pthread_mutex_lock(&c->files_lock);
    struct fs_file *f = c->files;
    c->files = NULL;
    pthread_mutex_unlock(&c->files_lock);
    while (f) {
        struct fs_file *n = f->next;
        file_free(f);
        f = n;
    }
}

/* --------------------------------------------------------------- reply */

static void reply_init(struct fs_reply *r, struct fs_core *c)
{
    r->niov = 0;
    r->len = 0;
    r->c = c;
    r->nref = 0;
    r->bounce = NULL;
    r->bounce_cap = 0;
}

void fs_reply_release(struct fs_reply *r)
{
    for (int i = 0; i < r->nref; i++) fs_slice_put(r->c, r->ref[i], r->ref_bytes[i]);
    r->nref = 0;
    free(r->bounce);
    r->bounce = NULL;
    r->niov = 0;
}

/* Switches a reply to one bounce buffer of `cap` bytes: copies what the
 * iovec holds and drops the references. */
static int to_bounce(struct fs_reply *r, size_t cap)
{
    char *b = malloc(cap ? cap : 1);
    if (!b) return -ENOMEM;
    size_t pos = 0;
    for (int i = 0; i < r->niov; i++) {
        memcpy(b + pos, r->iov[i].iov_base, r->iov[i].iov_len);
        pos += r->iov[i].iov_len;
    }
    for (int i = 0; i < r->nref; i++) fs_slice_put(r->c, r->ref[i], r->ref_bytes[i]);
    r->nref = 0;
    r->bounce = b;
    r->bounce_cap = cap;
    r->iov[0].iov_base = b;
    r->iov[0].iov_len = pos;
    r->niov = 1;
    return 0;
}

static int add_mem(struct fs_reply *r, const void *p, size_t n, size_t total)
{
    if (!n) return 0;
    if (!r->bounce && r->niov == FS_REPLY_MAXIOV) {
        int err = to_bounce(r, total);
        if (err) return err;
        atomic_fetch_add_explicit(&r->c->stats.bounce_reads, 1, memory_order_relaxed);
    }
    if (r->bounce) {
        memcpy((char *)r->bounce + r->iov[0].iov_len, p, n);
        r->iov[0].iov_len += n;
    } else {
        r->iov[r->niov].iov_base = (void *)p;
        r->iov[r->niov].iov_len = n;
        r->niov++;
    }
    r->len += n;
    return 0;
}

/* Appends bytes [in_off, in_off + n) of slice s of a tensor. */
static int add_slice(struct fs_reply *r, uint32_t tensor, uint64_t s, uint64_t in_off, size_t n,
                     size_t total)
{
    struct fs_core *c = r->c;
    struct fs_slice *e;
    int err;
    if (!r->bounce && r->niov < FS_REPLY_MAXIOV) {
        err = fs_slice_get(c, tensor, s, r->nref ? FS_GET_NOWAIT_MEM : FS_GET_WAIT, &e);
        if (!err) {
            r->ref[r->nref] = e;
            r->ref_bytes[r->nref] = (uint32_t)n;
            r->nref++;
            r->iov[r->niov].iov_base = (char *)e->buf + in_off;
            r->iov[r->niov].iov_len = n;
            r->niov++;
            r->len += n;
            return 0;
        }
        if (err != -EAGAIN) return err;
    }
    if (!r->bounce) {
        if ((err = to_bounce(r, total))) return err;
        atomic_fetch_add_explicit(&c->stats.bounce_reads, 1, memory_order_relaxed);
    }
    if ((err = fs_slice_get(c, tensor, s, FS_GET_WAIT, &e))) return err;
    memcpy((char *)r->bounce + r->iov[0].iov_len, (char *)e->buf + in_off, n);
    r->iov[0].iov_len += n;
    r->len += n;
    fs_slice_put(c, e, n);
    return 0;
}

/* ---------------------------------------------------------- read-ahead */

/* First extent whose data ends after pos. */
static uint32_t ext_at(const struct fs_node *n, uint64_t pos)
{
    uint32_t lo = 0, hi = n->next;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (n->ext[mid].off + n->ext[mid].len <= pos) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Queues the slices covering [from, to) of the file; returns where it
 * stopped (to, or the start of the first slice there was no room for). */
static uint64_t prefetch_range(struct fs_core *c, struct fs_node *n, uint64_t from, uint64_t to)
{
    if (from < n->memlen) from = n->memlen;
    for (uint32_t i = ext_at(n, from); i < n->next && from < to; i++) {
        const struct fs_extent *x = &n->ext[i];
        if (x->off >= to) break;
        const struct dq_out *o = c->tensors[x->tensor].o;
        if (atomic_load(&c->tensors[x->tensor].stale)) { from = x->off + x->len; continue; }
        uint64_t a = from > x->off ? from - x->off : 0;
        uint64_t b = to - x->off < x->len ? to - x->off : x->len;
        while (a < b) {
            uint64_t s = dq_out_slice_at(o, a), soff, slen;
            dq_out_slice_range(o, s, &soff, &slen);
            if (fs_slice_prefetch(c, x->tensor, s)) return x->off + soff;
            a = soff + slen;
        }
        from = x->off + b;
    }
    return to > from ? to : from;
}

static void read_ahead(struct fs_file *f, uint64_t off, uint64_t end)
{
    struct fs_core *c = f->c;
    struct fs_node *n = f->n;
    if (!c->ra_max) return;
    pthread_mutex_lock(&f->lock);
    bool seq = off <= f->ra_next + RA_SLACK && end + RA_SLACK >= f->ra_next;
    if (!seq) {
        f->ra_win = 0;
        f->ra_next = f->ra_issued = end;
        pthread_mutex_unlock(&f->lock);
        return;
    }
    if (end > f->ra_next) f->ra_next = end;
    uint64_t first = 4 * c->max_slice;
    f->ra_win = f->ra_win ? f->ra_win * 2 : first;
    if (f->ra_win > c->ra_max) f->ra_win = c->ra_max;
    uint64_t target = f->ra_next + f->ra_win;
    if (target > n->size) target = n->size;
    uint64_t from = f->ra_issued > f->ra_next ? f->ra_issued : f->ra_next;
    if (from < target) f->ra_issued = prefetch_range(c, n, from, target);
    pthread_mutex_unlock(&f->lock);
}

/* ---------------------------------------------------------------- read */

static int tensor_fail(struct fs_core *c, struct fs_node *n, struct fs_tensor *t, int err)
{
    if (err == -ESHUTDOWN) return err;
    if (!atomic_exchange(&t->err_logged, true)) {
        char path[512];
        fs_node_path(c, n->ino, path, sizeof path);
        if (atomic_load(&t->stale))
            dq_log(DQ_LOG_ERROR, FS_TAG, "read %s: tensor %s: a source file changed under the "
                   "mount; failing with EIO (remount to serve the new file)", path, t->o->name);
        else
            dq_log(DQ_LOG_ERROR, FS_TAG, "read %s: tensor %s: cannot be computed (%s); failing "
                   "with EIO, other tensors stay readable", path, t->o->name, strerror(-err));
    }
    return -EIO;
}

static int read_data(struct fs_file *f, uint64_t off, uint64_t end, struct fs_reply *r)
{
    struct fs_core *c = f->c;
    struct fs_node *n = f->n;
    size_t total = (size_t)(end - off);
    int err = 0;

    read_ahead(f, off, end);

    uint64_t pos = off;
    if (pos < n->memlen) {
        uint64_t e = end < n->memlen ? end : n->memlen;
        if ((err = add_mem(r, n->mem + pos, (size_t)(e - pos), total))) return err;
        pos = e;
    }
    uint32_t first = ext_at(n, pos), i = first;
    for (; pos < end && i < n->next; i++) {
        const struct fs_extent *x = &n->ext[i];
        struct fs_tensor *t = &c->tensors[x->tensor];
        if (atomic_load(&t->stale)) { err = tensor_fail(c, n, t, -ESTALE); break; }
        uint64_t a = pos - x->off;
        uint64_t b = end - x->off < x->len ? end - x->off : x->len;
        while (a < b) {
            uint64_t s = dq_out_slice_at(t->o, a), soff, slen;
            dq_out_slice_range(t->o, s, &soff, &slen);
            uint64_t piece = (b < soff + slen ? b : soff + slen) - a;
            err = add_slice(r, x->tensor, s, a - soff, (size_t)piece, total);
            if (err) { err = tensor_fail(c, n, t, err); break; }
            a += piece;
        }
        if (err) break;
        pos = x->off + b;
    }
    /* A change noticed while we computed: nothing of it leaves. */
    for (uint32_t k = first; !err && k < i; k++) {
        struct fs_tensor *t = &c->tensors[n->ext[k].tensor];
        if (atomic_load(&t->stale)) err = tensor_fail(c, n, t, -ESTALE);
    }
    if (!err && pos < end) err = -EIO;      /* extents must tile the data */
    return err;
}

static int read_passthru(struct fs_core *c, struct fs_node *n, uint64_t off, uint64_t end,
                         struct fs_reply *r)
{
    struct fs_src *s = &c->srcs[n->src];
    if (fs_src_check(c, (uint32_t)n->src)) return -EIO;
    size_t len = (size_t)(end - off);
    char *b = malloc(len ? len : 1);
    if (!b) return -ENOMEM;
    size_t got = 0;
    while (got < len) {
        ssize_t k = pread(s->fd, b + got, len - got, (off_t)(off + got));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            int err = k < 0 ? -errno : -EIO;
            dq_log(DQ_LOG_ERROR, FS_TAG, "%s: read at %" PRIu64 ": %s", s->path, off + got,
                   k < 0 ? strerror(-err) : "file shrank");
            free(b);
            return -EIO;
        }
        got += (size_t)k;
    }
    /* Re-check: a write racing with the pread must not leak out. */
    if (fs_src_check(c, (uint32_t)n->src)) { free(b); return -EIO; }
    r->bounce = b;
    r->bounce_cap = len;
    r->iov[0].iov_base = b;
    r->iov[0].iov_len = len;
    r->niov = 1;
    r->len = len;
    return 0;
}

int fs_read(struct fs_file *f, uint64_t off, size_t len, struct fs_reply *r)
{
    struct fs_core *c = f->c;
    struct fs_node *n = f->n;
    reply_init(r, c);
    uint64_t size = n->kind == FS_K_STATS ? f->snaplen : n->size;
    if (off >= size || !len) return 0;
    uint64_t end = len > size - off ? size : off + len;
    int err;
    switch (n->kind) {
    case FS_K_STATS:
        /* Copied: the snapshot belongs to the open file, which the kernel
         * may release as soon as it has the reply, before writev returns. */
        if ((err = to_bounce(r, (size_t)(end - off)))) return err;
        return add_mem(r, f->snap + off, (size_t)(end - off), (size_t)(end - off));
    case FS_K_CONFIG:
        if (fs_src_check(c, (uint32_t)n->src)) return -EIO;
        return add_mem(r, n->mem + off, (size_t)(end - off), (size_t)(end - off));
    case FS_K_INDEX:
        return add_mem(r, n->mem + off, (size_t)(end - off), (size_t)(end - off));
    case FS_K_PASSTHRU:
        return read_passthru(c, n, off, end, r);
    case FS_K_SHARD:
    case FS_K_TENSOR:
        err = read_data(f, off, end, r);
        if (err) fs_reply_release(r);
        return err;
    default:
        return -EISDIR;
    }
}

int fs_pread(struct fs_core *c, uint64_t ino, void *dst, size_t len, uint64_t off, size_t *got)
{
    struct fs_node *n = fs_node_get(c, ino);
    *got = 0;
    if (!n) return -ENOENT;
    if (n->kind == FS_K_DIR) return -EISDIR;
    struct fs_file f;
    file_init(&f, c, n, true);
    if (n->kind == FS_K_STATS) {
        int err = fs_stats_json(c, &f.snap, &f.snaplen);
        if (err) { pthread_mutex_destroy(&f.lock); return err; }
    }
    int err = 0;
    while (*got < len) {
        size_t want = len - *got < (4u << 20) ? len - *got : (4u << 20);
        struct fs_reply r;
        if ((err = fs_read(&f, off + *got, want, &r))) break;
        size_t k = 0;
        for (int i = 0; i < r.niov; i++) {
            memcpy((char *)dst + *got + k, r.iov[i].iov_base, r.iov[i].iov_len);
            k += r.iov[i].iov_len;
        }
        fs_reply_release(&r);
        *got += k;
        if (k < want) break;    /* EOF */
    }
    free(f.snap);
    pthread_mutex_destroy(&f.lock);
    return err;
}

/* ---------------------------------------------------------------- xxh3 */

int fs_node_xxh3(struct fs_core *c, struct fs_node *n, uint8_t out[16])
{
    pthread_mutex_t *lk = &c->xxh_lock[n->ino % FS_XXH_STRIPES];
    pthread_mutex_lock(lk);
    if (n->have_xxh) {
        memcpy(out, n->xxh, 16);
        pthread_mutex_unlock(lk);
        return 0;
    }
    XXH3_state_t *h = XXH3_createState();
    if (!h) { pthread_mutex_unlock(lk); return -ENOMEM; }
    XXH3_128bits_reset(h);
    struct fs_file f;
    file_init(&f, c, n, true);
    int err = 0;
    const size_t chunk = 8u << 20;
    for (uint64_t off = 0; off < n->size;) {
        struct fs_reply r;
        if ((err = fs_read(&f, off, chunk, &r))) break;
        for (int i = 0; i < r.niov; i++) XXH3_128bits_update(h, r.iov[i].iov_base, r.iov[i].iov_len);
        size_t k = r.len;
        fs_reply_release(&r);
        if (!k) { err = -EIO; break; }
        off += k;
        atomic_fetch_add_explicit(&c->stats.bytes_internal, k, memory_order_relaxed);
    }
    pthread_mutex_destroy(&f.lock);
    if (!err) {
        XXH128_canonical_t canon;
        XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(h));
        memcpy(n->xxh, canon.digest, 16);
        n->have_xxh = true;
        memcpy(out, n->xxh, 16);
    }
    XXH3_freeState(h);
    pthread_mutex_unlock(lk);
    return err;
}

/* -------------------------------------------------------------- xattrs */

static const char *const XA_XXH3 = "user.bnbfs.xxh3";
static const char *const XA_TENSOR[] = { "user.bnbfs.dtype", "user.bnbfs.shape",
                                         "user.bnbfs.source", "user.bnbfs.quant" };
/* On the root: the absolute path of SRC, so a reader that can use the 4-bit
 * data itself (bnbfs-run's 24 GB mode) finds it from the mount alone. */
static const char *const XA_ROOT_SOURCE = "user.bnbfs.source";

static int xa_reply(const char *val, size_t vlen, char *buf, size_t size, size_t *len)
{
    *len = vlen;
    if (!size) return 0;
    if (size < vlen) return -ERANGE;
    memcpy(buf, val, vlen);
    return 0;
}

static struct fs_tensor *node_tensor(struct fs_core *c, struct fs_node *n)
{
    return n->kind == FS_K_TENSOR && n->next ? &c->tensors[n->ext[0].tensor] : NULL;
}

int fs_xattr_list(struct fs_core *c, uint64_t ino, char *buf, size_t size, size_t *len)
{
    struct fs_node *n = fs_node_get(c, ino);
    if (!n) return -ENOENT;
    char names[256];
    size_t k = 0;
    if (n->kind != FS_K_DIR && n->kind != FS_K_STATS) {
        memcpy(names + k, XA_XXH3, strlen(XA_XXH3) + 1);
        k += strlen(XA_XXH3) + 1;
    }
    if (n->ino == FS_ROOT_INO) {
        memcpy(names + k, XA_ROOT_SOURCE, strlen(XA_ROOT_SOURCE) + 1);
        k += strlen(XA_ROOT_SOURCE) + 1;
    }
    if (n->kind == FS_K_TENSOR)
        for (size_t i = 0; i < 4; i++) {
            memcpy(names + k, XA_TENSOR[i], strlen(XA_TENSOR[i]) + 1);
            k += strlen(XA_TENSOR[i]) + 1;
        }
    return xa_reply(names, k, buf, size, len);
}

int fs_xattr_get(struct fs_core *c, uint64_t ino, const char *name, char *buf, size_t size,
                 size_t *len)
{
    struct fs_node *n = fs_node_get(c, ino);
    if (!n) return -ENOENT;
    if (!strcmp(name, XA_XXH3) && n->kind != FS_K_DIR && n->kind != FS_K_STATS) {
        uint8_t h[16];
        int err = fs_node_xxh3(c, n, h);
        if (err) return err;
        char hex[33];
        for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", h[i]);
        return xa_reply(hex, 32, buf, size, len);
    }
    if (n->ino == FS_ROOT_INO && !strcmp(name, XA_ROOT_SOURCE))
        return xa_reply(c->src, strlen(c->src), buf, size, len);
    struct fs_tensor *t = node_tensor(c, n);
    if (!t && n->kind == FS_K_TENSOR) {
        /* A zero-size tensor has no extent: find it by name. */
        for (size_t i = 0; i < c->plan->nout; i++)
            if (c->tensors[i].file_ino == n->ino) t = &c->tensors[i];
    }
    if (!t || strncmp(name, "user.bnbfs.", 11)) return -ENODATA;
    const struct dq_out *o = t->o;
    const char *key = name + 11;
    if (!strcmp(key, "dtype")) {
        const char *v = dq_dtype_name(o->dtype);
        return xa_reply(v, strlen(v), buf, size, len);
    }
    if (!strcmp(key, "shape")) {
        char v[256];
        size_t k = 0;
        v[k++] = '[';
        for (int d = 0; d < o->ndim && k < sizeof v - 32; d++)
            k += (size_t)snprintf(v + k, sizeof v - k, "%s%" PRIu64, d ? ", " : "", o->shape[d]);
        v[k++] = ']';
        return xa_reply(v, k, buf, size, len);
    }
    if (!strcmp(key, "source") && o->source_desc)
        return xa_reply(o->source_desc, strlen(o->source_desc), buf, size, len);
    if (!strcmp(key, "quant") && o->quant_desc)
        return xa_reply(o->quant_desc, strlen(o->quant_desc), buf, size, len);
    return -ENODATA;
}
