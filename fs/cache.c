/* cache.c — computed slices: a bounded, reference-counted, single-flight
 * cache, and the job queue that compute engines pull from.
 *
 * Not the read planning (read.c) and not the computing (cpu_backend.c and,
 * later, a GPU engine): an engine takes jobs with fs_sched_pull() and hands
 * them back with fs_job_finish().
 *
 * Invariants (all under cache.lock):
 *  - reserved + pooled <= limit, always: memory is reserved when an entry is
 *    created (before it is queued), so computing never needs more; a reader
 *    that finds the cache full of referenced or in-flight entries waits on
 *    mem_cv instead of overshooting.
 *  - an entry is freed only when refs == 0: eviction never frees bytes a
 *    reader is still copying out.
 *  - one entry per (tensor, slice): concurrent readers of a slice join the
 *    entry that computes it (single flight).
 *  - a reader holding references never waits for memory (FS_GET_NOWAIT_MEM
 *    makes it copy what it holds and let go first), so waiting cannot
 *    deadlock as long as the bound holds two of the largest slices.
 * Keys are XXH3 of the tensor's identity hash (source file path, dev, ino,
 * offset, size and mtime of every source tensor, output dtype, name) and the
 * slice index; the entry also stores (tensor, slice) so a hash collision
 * can never serve the wrong bytes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <xxhash.h>

#include "fs_int.h"

/* ---------------------------------------------------------------- lists */

static void list_remove(struct fs_slice *e)
{
    struct fs_list *l = e->on;
    if (!l) return;
    if (e->prev) e->prev->next = e->next; else l->head = e->next;
    if (e->next) e->next->prev = e->prev; else l->tail = e->prev;
    e->prev = e->next = NULL;
    e->on = NULL;
    l->n--;
}

static void list_push_tail(struct fs_list *l, struct fs_slice *e)
{
    e->prev = l->tail;
    e->next = NULL;
    if (l->tail) l->tail->next = e; else l->head = e;
    l->tail = e;
    e->on = l;
    l->n++;
}

static void list_push_head(struct fs_list *l, struct fs_slice *e)
{
    e->next = l->head;
    e->prev = NULL;
    if (l->head) l->head->prev = e; else l->tail = e;
    l->head = e;
    e->on = l;
    l->n++;
}

static struct fs_slice *list_pop_head(struct fs_list *l)
{
    struct fs_slice *e = l->head;
    if (e) list_remove(e);
    return e;
}

/* ----------------------------------------------------------------- hash */

uint64_t fs_slice_key(const struct fs_tensor *t, uint64_t slice)
{
    uint64_t v[2] = { t->id_hash, slice };
    return XXH3_64bits(v, sizeof v);
}

static struct fs_slice *hash_find(struct fs_cache *k, uint64_t key, uint32_t tensor,
                                  uint64_t slice)
{
    for (struct fs_slice *e = k->bucket[key & (k->nbucket - 1)]; e; e = e->hnext)
        if (e->key == key && e->tensor == tensor && e->job.slice == slice) return e;
    return NULL;
}

static void hash_insert(struct fs_cache *k, struct fs_slice *e)
{
    struct fs_slice **b = &k->bucket[e->key & (k->nbucket - 1)];
    e->hnext = *b;
    *b = e;
    e->in_hash = true;
    k->nentries++;
}

static void hash_remove(struct fs_cache *k, struct fs_slice *e)
{
    if (!e->in_hash) return;
    struct fs_slice **p = &k->bucket[e->key & (k->nbucket - 1)];
    while (*p && *p != e) p = &(*p)->hnext;
    if (*p) *p = e->hnext;
    e->hnext = NULL;
    e->in_hash = false;
    k->nentries--;
}

/* --------------------------------------------------------------- memory */

/* Bytes a slice's buffer takes. Slices of more than half the largest one
 * (nearly all of them in a real checkpoint: full slices and most expert
 * tails) share one capacity, so every freed buffer fits the next slice and
 * the pool recycles memory that is already faulted in; small ones round up. */
static size_t slice_cap(const struct fs_core *c, uint64_t len)
{
    size_t big = (size_t)fs_round_up(c->max_slice, 4096);
    if (len > c->max_slice / 2 && len >= (256u << 10)) return big;
    if (len < 64) return 64;
    return len < (64u << 10) ? fs_round_up(len, 64) : fs_round_up(len, 4096);
}

#define HUGE_PAGE (2u << 20)

/* Large buffers are aligned to and advised as transparent huge pages: one
 * fault instead of 512 the first time, and fewer TLB misses when the kernel
 * copies replies out of them. */
static void *buf_alloc(size_t cap)
{
    void *p = NULL;
    size_t align = cap >= HUGE_PAGE ? HUGE_PAGE : cap >= 4096 ? 4096 : 64;
    if (posix_memalign(&p, align, cap)) return NULL;
    if (cap >= HUGE_PAGE) madvise(p, cap & ~(size_t)(HUGE_PAGE - 1), MADV_HUGEPAGE);
    return p;
}

static void note_peak(struct fs_cache *k)
{
    uint64_t h = k->reserved + k->pooled;
    if (h > k->peak) k->peak = h;
}

static void *pool_take(struct fs_cache *k, size_t cap, bool *pinned)
{
    for (struct fs_pool_buf **p = &k->pool; *p; p = &(*p)->next)
        if ((*p)->cap == cap) {
            struct fs_pool_buf *b = *p;
            *p = b->next;
            k->pooled -= cap;
            *pinned = b->pinned;
            return b;
        }
    return NULL;
}

static void pool_put(struct fs_cache *k, void *buf, size_t cap, bool pinned)
{
    struct fs_pool_buf *b = buf;
    b->cap = cap;
    b->pinned = pinned;
    b->next = k->pool;
    k->pool = b;
    k->pooled += cap;
}

/* Frees a buffer, first undoing an engine's pinning of it. */
static void buf_free(struct fs_core *c, void *buf, size_t cap, bool pinned)
{
    if (pinned && c->pinner) c->pinner->buf_unpin(c->pinner->ctx, buf, cap);
    free(buf);
}

/* Frees an idle buffer to make room: an unpinned one when there is one;
 * a pinned one only when `any` (over the hard bound), since pinning it
 * again costs more than faulting in a fresh buffer. False: none to free. */
static bool pool_trim_one(struct fs_core *c, bool any)
{
    struct fs_cache *k = &c->cache;
    for (struct fs_pool_buf **p = &k->pool; *p; p = &(*p)->next)
        if (any || !(*p)->pinned) {
            struct fs_pool_buf *b = *p;
            *p = b->next;
            k->pooled -= b->cap;
            buf_free(c, b, b->cap, b->pinned);
            return true;
        }
    return false;
}

static void wake_mem(struct fs_cache *k)
{
    if (k->mem_waiters) pthread_cond_broadcast(&k->mem_cv);
}

/* Gives the entry's reservation back; its buffer goes to the pool. */
static void entry_release_mem(struct fs_cache *k, struct fs_slice *e)
{
    if (e->buf) pool_put(k, e->buf, e->cap, e->job.dst_pinned);
    k->reserved -= e->cap;
    e->buf = NULL;
    e->job.dst = NULL;
    e->job.dst_pinned = false;
    e->cap = 0;
    wake_mem(k);
}

static void entry_free(struct fs_cache *k, struct fs_slice *e)
{
    list_remove(e);
    hash_remove(k, e);
    entry_release_mem(k, e);
    pthread_cond_destroy(&e->cv);
    free(e);
}

/* Reserves cap bytes below `limit` (reusing an idle buffer of that size
 * when one is pooled), evicting unreferenced slices least recently used
 * first. 0: reserved (*buf is a pooled buffer, *pinned its pinning, or
 * NULL); -EAGAIN: no room and may_wait is false; 1: waited for memory, the
 * caller must look its slice up again since the lock was dropped. */
static int reserve(struct fs_core *c, size_t cap, uint64_t limit, void **buf, bool *pinned,
                   bool may_wait)
{
    struct fs_cache *k = &c->cache;
    *pinned = false;
    for (;;) {
        void *b = pool_take(k, cap, pinned);
        if (b) {
            k->reserved += cap;
            *buf = b;
            return 0;
        }
        /* Past a quarter of the bound, slices that were read through go
         * first even with room to spare, and idle buffers of other sizes
         * are freed: recycled buffers are faulted in and likely still in
         * the CPU caches, and a streaming read (its bytes now in the
         * kernel's page cache) stops growing the cache. */
        bool soft = k->reserved + k->pooled + cap > k->limit / 4;
        if (soft && k->lru.head && k->lru.head->consumed) {
            entry_free(k, k->lru.head);
            atomic_fetch_add_explicit(&c->stats.evictions, 1, memory_order_relaxed);
            continue;
        }
        bool over = k->reserved + k->pooled + cap > limit;
        if ((soft || over) && k->pool && pool_trim_one(c, over)) continue;
        if (k->reserved + k->pooled + cap <= limit) {
            k->reserved += cap;
            note_peak(k);
            *buf = NULL;
            return 0;
        }
        if (k->lru.head) {
            entry_free(k, k->lru.head);
            atomic_fetch_add_explicit(&c->stats.evictions, 1, memory_order_relaxed);
            continue;
        }
        if (!may_wait) return -EAGAIN;
        atomic_fetch_add_explicit(&c->stats.mem_waits, 1, memory_order_relaxed);
        k->mem_waiters++;
        pthread_cond_wait(&k->mem_cv, &k->lock);
        k->mem_waiters--;
        return 1;
    }
}

static struct fs_slice *entry_new(struct fs_core *c, uint32_t tensor, uint64_t slice, uint64_t key,
                                  size_t cap, void *buf, bool pinned)
{
    struct fs_slice *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    const struct dq_out *o = c->tensors[tensor].o;
    e->job.out = o;
    e->job.slice = slice;
    dq_out_slice_range(o, slice, &e->job.off, &e->job.len);
    e->job.dst = buf;
    e->job.dst_cap = cap;
    e->job.dst_pinned = buf && pinned;
    e->key = key;
    e->tensor = tensor;
    e->cap = cap;
    e->buf = buf;
    e->state = FS_SL_QUEUED;
    pthread_cond_init(&e->cv, NULL);
    return e;
}

/* One more job is queued (or jobs are left after a pull): one engine
 * thread, and one CPU thread if the queue is deep enough for them. Each
 * addition signals again, so no job waits for a wakeup that went to a
 * thread that took something else. */
static void wake_workers(struct fs_cache *k)
{
    size_t queued = k->qdemand.n + k->qprefetch.n;
    if (k->eng_waiters) pthread_cond_signal(&k->eng_cv);
    if (k->cpu_waiters && queued >= (k->cpu_min_queued ? k->cpu_min_queued : 1))
        pthread_cond_signal(&k->cpu_cv);
}

/* ----------------------------------------------------------------- API */

int fs_cache_init(struct fs_core *c)
{
    struct fs_cache *k = &c->cache;
    memset(k, 0, sizeof *k);
    pthread_mutex_init(&k->lock, NULL);
    pthread_cond_init(&k->eng_cv, NULL);
    pthread_cond_init(&k->cpu_cv, NULL);
    pthread_cond_init(&k->mem_cv, NULL);
    k->limit = c->opts.cache_bytes;
    /* Read-ahead leaves room for a demand slice per compute thread. */
    k->demand_margin = (uint64_t)(c->nthreads + 2) * slice_cap(c, c->max_slice);
    size_t want = c->total_slices < (1u << 22) ? (size_t)c->total_slices : (1u << 22);
    k->nbucket = 1024;
    while (k->nbucket < want) k->nbucket *= 2;
    k->bucket = calloc(k->nbucket, sizeof *k->bucket);
    return k->bucket ? 0 : -ENOMEM;
}

void fs_cache_stop(struct fs_core *c)
{
    struct fs_cache *k = &c->cache;
    pthread_mutex_lock(&k->lock);
    k->stopping = true;
    struct fs_slice *e;
    while ((e = list_pop_head(&k->qdemand)) || (e = list_pop_head(&k->qprefetch))) {
        e->state = FS_SL_FAILED;
        e->err = -ESHUTDOWN;
        entry_release_mem(k, e);
        pthread_cond_broadcast(&e->cv);
        if (!e->refs) {
            entry_free(k, e);
        } else {            /* its waiters free it with their last put */
            hash_remove(k, e);
            e->dead = true;
        }
    }
    pthread_cond_broadcast(&k->eng_cv);
    pthread_cond_broadcast(&k->cpu_cv);
    pthread_cond_broadcast(&k->mem_cv);
    pthread_mutex_unlock(&k->lock);
}

void fs_cache_fini(struct fs_core *c)
{
    struct fs_cache *k = &c->cache;

    if (k->bucket) {
        for (size_t i = 0; i < k->nbucket; i++) {
            struct fs_slice *e = k->bucket[i];
            while (e) {
                struct fs_slice *n = e->hnext;
                if (e->buf) buf_free(c, e->buf, e->cap, e->job.dst_pinned);
                pthread_cond_destroy(&e->cv);
                free(e);
                e = n;
            }
        }
        free(k->bucket);
        k->bucket = NULL;
    }
    while (k->pool) {
        struct fs_pool_buf *p = k->pool;
        k->pool = p->next;
        buf_free(c, p, p->cap, p->pinned);
    }
    pthread_mutex_destroy(&k->lock);
    pthread_cond_destroy(&k->eng_cv);
    pthread_cond_destroy(&k->cpu_cv);
    pthread_cond_destroy(&k->mem_cv);
}

static void put_locked(struct fs_core *c, struct fs_slice *e, uint64_t bytes_read)
{
    struct fs_cache *k = &c->cache;
    /* Counted over every reader: the kernel's requests for the head and
     * the tail of a slice may arrive and finish in any order. */
    e->bytes_read += bytes_read;
    if (e->bytes_read >= e->job.len) e->consumed = true;
    if (--e->refs) return;
    if (e->dead) {
        if (e->state != FS_SL_RUNNING) entry_free(k, e);
        return;
    }
    if (e->state == FS_SL_READY) {
        if (e->consumed) list_push_head(&k->lru, e);
        else list_push_tail(&k->lru, e);
        wake_mem(k);
    } else if (e->state == FS_SL_FAILED && e->err != -EIO) {
        entry_free(k, e);       /* transient (shutdown, no memory): forget it */
    }
}

void fs_slice_put(struct fs_core *c, struct fs_slice *e, uint64_t bytes_read)
{
    pthread_mutex_lock(&c->cache.lock);
    put_locked(c, e, bytes_read);
    pthread_mutex_unlock(&c->cache.lock);
}

int fs_slice_get(struct fs_core *c, uint32_t tensor, uint64_t slice, int flags,
                 struct fs_slice **out)
{
    struct fs_cache *k = &c->cache;
    struct fs_tensor *t = &c->tensors[tensor];
    uint64_t key = fs_slice_key(t, slice);
    struct fs_slice *e;
    int err;

    pthread_mutex_lock(&k->lock);
    for (;;) {
        if (k->stopping) { pthread_mutex_unlock(&k->lock); return -ESHUTDOWN; }
        e = hash_find(k, key, tensor, slice);
        if (e) {
            if (e->state == FS_SL_READY) {
                if (e->refs++ == 0) list_remove(e);
                atomic_fetch_add_explicit(&c->stats.hits, 1, memory_order_relaxed);
                pthread_mutex_unlock(&k->lock);
                *out = e;
                return 0;
            }
            if (e->state == FS_SL_FAILED) {
                err = e->err;
                pthread_mutex_unlock(&k->lock);
                return err;
            }
            e->refs++;
            atomic_fetch_add_explicit(&c->stats.joins, 1, memory_order_relaxed);
            if (e->state == FS_SL_QUEUED && !e->demand) {
                /* A reader now waits for a read-ahead job: move it up. */
                list_remove(e);
                e->demand = true;
                list_push_tail(&k->qdemand, e);
                wake_workers(k);
            }
            break;
        }
        uint64_t off, len;
        dq_out_slice_range(t->o, slice, &off, &len);
        size_t cap = slice_cap(c, len);
        void *buf;
        bool pinned;
        int r = reserve(c, cap, k->limit, &buf, &pinned, !(flags & FS_GET_NOWAIT_MEM));
        if (r < 0) { pthread_mutex_unlock(&k->lock); return r; }
        if (r == 1) continue;
        e = entry_new(c, tensor, slice, key, cap, buf, pinned);
        if (!e) {
            if (buf) pool_put(k, buf, cap, pinned);
            k->reserved -= cap;
            pthread_mutex_unlock(&k->lock);
            return -ENOMEM;
        }
        e->refs = 1;
        e->demand = true;
        hash_insert(k, e);
        list_push_tail(&k->qdemand, e);
        atomic_fetch_add_explicit(&c->stats.misses, 1, memory_order_relaxed);
        wake_workers(k);
        break;
    }
    while (e->state == FS_SL_QUEUED || e->state == FS_SL_RUNNING)
        pthread_cond_wait(&e->cv, &k->lock);
    if (e->state == FS_SL_READY && !e->dead) {
        pthread_mutex_unlock(&k->lock);
        *out = e;
        return 0;
    }
    err = e->state == FS_SL_FAILED ? e->err : -EIO;
    put_locked(c, e, 0);
    pthread_mutex_unlock(&k->lock);
    return err;
}

int fs_slice_prefetch(struct fs_core *c, uint32_t tensor, uint64_t slice)
{
    struct fs_cache *k = &c->cache;
    struct fs_tensor *t = &c->tensors[tensor];
    uint64_t key = fs_slice_key(t, slice);
    int err = 0;

    pthread_mutex_lock(&k->lock);
    if (k->stopping) { err = -ESHUTDOWN; goto out; }
    if (hash_find(k, key, tensor, slice)) goto out;
    uint64_t off, len;
    dq_out_slice_range(t->o, slice, &off, &len);
    size_t cap = slice_cap(c, len);
    uint64_t limit = k->limit > k->demand_margin ? k->limit - k->demand_margin : 0;
    void *buf;
    bool pinned;
    if (reserve(c, cap, limit, &buf, &pinned, false)) { err = -EAGAIN; goto out; }
    struct fs_slice *e = entry_new(c, tensor, slice, key, cap, buf, pinned);
    if (!e) {
        if (buf) pool_put(k, buf, cap, pinned);
        k->reserved -= cap;
        err = -ENOMEM;
        goto out;
    }
    hash_insert(k, e);
    list_push_tail(&k->qprefetch, e);
    atomic_fetch_add_explicit(&c->stats.prefetch_issued, 1, memory_order_relaxed);
    wake_workers(k);
out:
    pthread_mutex_unlock(&k->lock);
    return err;
}

void fs_cache_purge_tensor(struct fs_core *c, uint32_t tensor)
{
    struct fs_cache *k = &c->cache;
    pthread_mutex_lock(&k->lock);
    for (size_t i = 0; i < k->nbucket; i++) {
        struct fs_slice *e = k->bucket[i];
        while (e) {
            struct fs_slice *n = e->hnext;
            if (e->tensor == tensor) {
                hash_remove(k, e);
                e->dead = true;
                if (e->state == FS_SL_QUEUED) {
                    list_remove(e);
                    e->state = FS_SL_FAILED;
                    e->err = -EIO;
                    entry_release_mem(k, e);
                    pthread_cond_broadcast(&e->cv);
                }
                if (!e->refs && e->state != FS_SL_RUNNING) entry_free(k, e);
                /* RUNNING: fs_job_finish frees it; referenced: the last put. */
            }
            e = n;
        }
    }
    pthread_mutex_unlock(&k->lock);
}

void fs_cache_snapshot(struct fs_core *c, uint64_t *reserved, uint64_t *pooled, uint64_t *peak,
                       size_t *entries, size_t *queued)
{
    struct fs_cache *k = &c->cache;
    pthread_mutex_lock(&k->lock);
    *reserved = k->reserved;
    *pooled = k->pooled;
    *peak = k->peak;
    *entries = k->nentries;
    *queued = k->qdemand.n + k->qprefetch.n;
    pthread_mutex_unlock(&k->lock);
}

/* ------------------------------------------------------------ scheduler */

void fs_sched_set_cpu_min_queued(struct fs_core *c, unsigned n)
{
    pthread_mutex_lock(&c->cache.lock);
    c->cache.cpu_min_queued = n;
    pthread_cond_broadcast(&c->cache.cpu_cv);
    pthread_mutex_unlock(&c->cache.lock);
}

unsigned fs_sched_cpu_min_queued(struct fs_core *c)
{
    pthread_mutex_lock(&c->cache.lock);
    unsigned n = c->cache.cpu_min_queued;
    pthread_mutex_unlock(&c->cache.lock);
    return n;
}

int fs_sched_pull(struct fs_core *c, unsigned max, unsigned min_queued, struct fs_job **jobs)
{
    struct fs_cache *k = &c->cache;
    if (!max) return -EINVAL;
    bool cpu = min_queued == FS_PULL_CPU_POLICY;
    pthread_mutex_lock(&k->lock);
    for (;;) {
        unsigned need = cpu ? k->cpu_min_queued : min_queued;
        if (k->stopping || k->qdemand.n + k->qprefetch.n >= (need ? need : 1)) break;
        if (cpu) {
            k->cpu_waiters++;
            pthread_cond_wait(&k->cpu_cv, &k->lock);
            k->cpu_waiters--;
            atomic_fetch_add_explicit(&c->stats.wakeups_cpu, 1, memory_order_relaxed);
        } else {
            k->eng_waiters++;
            pthread_cond_wait(&k->eng_cv, &k->lock);
            k->eng_waiters--;
            atomic_fetch_add_explicit(&c->stats.wakeups_engine, 1, memory_order_relaxed);
        }
    }
    unsigned n = 0;
    struct fs_slice *e;
    while (!k->stopping && n < max &&
           ((e = list_pop_head(&k->qdemand)) || (e = list_pop_head(&k->qprefetch)))) {
        e->state = FS_SL_RUNNING;
        jobs[n++] = &e->job;
    }
    if (!k->stopping && k->qdemand.n + k->qprefetch.n) wake_workers(k);   /* the rest */
    pthread_mutex_unlock(&k->lock);

    /* Buffers are allocated outside the lock; pooled ones came with the entry. */
    unsigned kept = 0;
    for (unsigned i = 0; i < n; i++) {
        struct fs_slice *s = (struct fs_slice *)jobs[i];
        if (!s->buf && !(s->buf = buf_alloc(s->cap))) {
            dq_log(DQ_LOG_ERROR, FS_TAG, "tensor %s: slice %llu: out of memory for %zu bytes",
                   s->job.out->name, (unsigned long long)s->job.slice, s->cap);
            fs_job_finish(c, jobs[i], -ENOMEM, FS_ENGINE_CPU);
            continue;
        }
        s->job.dst = s->buf;
        jobs[kept++] = jobs[i];
    }
    return (int)kept;
}

void fs_job_finish(struct fs_core *c, struct fs_job *job, int err, enum fs_engine who)
{
    struct fs_slice *e = (struct fs_slice *)job;
    struct fs_tensor *t = &c->tensors[e->tensor];
    struct fs_cache *k = &c->cache;

    /* Bytes computed from a file that changed meanwhile are not served. */
    if (!err) {
        if (atomic_load(&t->stale)) err = -ESTALE;
        for (uint32_t i = 0; !err && i < t->nsrcs; i++)
            err = fs_src_check(c, t->srcs[i]);
    }
    if (!err) {
        atomic_fetch_add_explicit(&c->stats.bytes_computed[who], job->len, memory_order_relaxed);
        atomic_fetch_add_explicit(&c->stats.slices_computed[who], 1, memory_order_relaxed);
    }

    pthread_mutex_lock(&k->lock);
    if (!err) {
        e->state = FS_SL_READY;
    } else {
        e->state = FS_SL_FAILED;
        e->err = (err == -ESTALE || err == -EIO) ? -EIO : err;
        entry_release_mem(k, e);
    }
    pthread_cond_broadcast(&e->cv);
    if (!e->refs) {
        if (e->dead) entry_free(k, e);
        else if (e->state == FS_SL_READY) { list_push_tail(&k->lru, e); wake_mem(k); }
        else if (e->err != -EIO) entry_free(k, e);
    }
    pthread_mutex_unlock(&k->lock);
}
