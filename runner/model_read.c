/* model_read.c — parallel, chunked pread of checkpoint tensors with a
 * progress line (bytes, GB/s, ETA), and rn_model_prefetch built on it.
 *
 * Not here: what happens to the bytes (the sink decides: dropped for a
 * prefetch, copied to the GPU or into a pinned mirror by the engine).
 *
 * Invariant: chunks are handed out in file order from one atomic counter, so
 * reads sweep each file front to back with nthreads requests in flight; a
 * failed read stops every worker at its next chunk.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "model_read.h"

#define TAG "load"
#define DEFAULT_CHUNK (8ull << 20)

struct reader {
    const struct rn_read_item *items;
    size_t nitems;
    const struct rn_read_opts *o;
    uint64_t chunk;
    uint64_t *first_chunk;          /* [nitems + 1]: prefix sums of chunks per item */
    uint64_t nchunks;
    _Atomic uint64_t next;          /* next chunk index to hand out */
    _Atomic uint64_t done_bytes;
    _Atomic int err;                /* first error, 0 while fine */
    _Atomic unsigned running;       /* workers still running */
};

struct worker {
    struct reader *r;
    unsigned tid;
    pthread_t th;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

unsigned rn_read_default_threads(void)
{
    /* Readers mostly wait on the mount (whose daemon does the computing), so
     * more threads than cores keeps more requests in flight. */
    unsigned n = 2 * dq_ncpus();
    if (n < 4)
        n = 4;
    if (n > 16)
        n = 16;
    return n;
}

static int pread_full(const struct dq_tensor *t, uint64_t toff, void *dst, uint64_t len)
{
    uint8_t *d = dst;
    uint64_t got = 0, pos = t->offset + toff;
    while (got < len) {
        size_t want = (size_t)(len - got);
        ssize_t n = pread(t->file->fd, d + got, want, (off_t)(pos + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int rc = n < 0 ? -errno : -EIO;
            dq_log(DQ_LOG_ERROR, TAG, "%s: %s: read of %" PRIu64 " bytes at offset %" PRIu64
                   " failed: %s", t->file->path, t->name, len - got, pos + got,
                   n < 0 ? strerror(-rc) : "unexpected end of file");
            return rc;
        }
        got += (uint64_t)n;
    }
    return 0;
}

static size_t item_of_chunk(const struct reader *r, uint64_t c)
{
    size_t lo = 0, hi = r->nitems;          /* first_chunk[lo] <= c < first_chunk[hi] */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->first_chunk[mid] <= c)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct reader *r = w->r;
    const struct rn_read_opts *o = r->o;
    void *buf = NULL;
    for (;;) {
        if (atomic_load(&r->err))
            break;
        uint64_t c = atomic_fetch_add(&r->next, 1);
        if (c >= r->nchunks)
            break;
        size_t i = item_of_chunk(r, c);
        const struct rn_read_item *it = &r->items[i];
        uint64_t off = (c - r->first_chunk[i]) * r->chunk;
        uint64_t len = it->len - off < r->chunk ? it->len - off : r->chunk;
        void *dst;
        if (it->host_dst) {
            dst = (uint8_t *)it->host_dst + off;
        } else {
            if (!buf) {
                buf = o->buf_alloc ? o->buf_alloc(o->ctx, r->chunk) : malloc(r->chunk);
                if (!buf) {
                    dq_log(DQ_LOG_ERROR, TAG, "cannot allocate a %" PRIu64 "-byte read buffer",
                           r->chunk);
                    int z = 0;
                    atomic_compare_exchange_strong(&r->err, &z, -ENOMEM);
                    break;
                }
            }
            dst = buf;
        }
        int rc = pread_full(it->t, it->off + off, dst, len);
        if (!rc && o->sink)
            rc = o->sink(o->ctx, w->tid, it, off, dst, len);
        if (rc) {
            int z = 0;
            atomic_compare_exchange_strong(&r->err, &z, rc);
            break;
        }
        atomic_fetch_add(&r->done_bytes, len);
    }
    if (buf) {
        if (o->buf_free)
            o->buf_free(o->ctx, buf);
        else
            free(buf);
    }
    atomic_fetch_sub(&r->running, 1);
    return NULL;
}

static void print_progress(const char *what, uint64_t done, uint64_t total, double t0,
                           bool final)
{
    double el = now_s() - t0;
    double gbs = el > 0 ? (double)done / el / 1e9 : 0;
    if (final) {
        fprintf(stderr, "\r%s %.2f GB in %.1f s (%.2f GB/s)%20s\n", what, (double)done / 1e9,
                el, gbs, "");
        return;
    }
    double eta = gbs > 0 ? (double)(total - done) / 1e9 / gbs : 0;
    fprintf(stderr, "\r%s %.2f / %.2f GB  %.2f GB/s  ETA %.0f s   ", what, (double)done / 1e9,
            (double)total / 1e9, gbs, eta);
    fflush(stderr);
}

int rn_read_items(const struct rn_read_item *items, size_t n, const struct rn_read_opts *o)
{
    struct reader r = {.items = items, .nitems = n, .o = o};
    r.chunk = o->chunk ? o->chunk : DEFAULT_CHUNK;
    unsigned nt = o->nthreads ? o->nthreads : rn_read_default_threads();
    r.first_chunk = malloc((n + 1) * sizeof *r.first_chunk);
    if (!r.first_chunk)
        return -ENOMEM;
    uint64_t total = 0;
    r.first_chunk[0] = 0;
    for (size_t i = 0; i < n; i++) {
        r.first_chunk[i + 1] = r.first_chunk[i] + (items[i].len + r.chunk - 1) / r.chunk;
        total += items[i].len;
    }
    r.nchunks = r.first_chunk[n];
    if (nt > r.nchunks)
        nt = r.nchunks ? (unsigned)r.nchunks : 1;
    struct worker *ws = calloc(nt, sizeof *ws);
    if (!ws) {
        free(r.first_chunk);
        return -ENOMEM;
    }
    bool show = o->progress || isatty(STDERR_FILENO);
    const char *what = o->what ? o->what : "reading";
    double t0 = now_s();
    atomic_store(&r.running, nt);
    unsigned started = 0;
    int rc = 0;
    for (; started < nt; started++) {
        ws[started] = (struct worker){.r = &r, .tid = started};
        int e = pthread_create(&ws[started].th, NULL, worker_main, &ws[started]);
        if (e) {
            dq_log(DQ_LOG_ERROR, TAG, "pthread_create: %s", strerror(e));
            atomic_fetch_sub(&r.running, nt - started);
            rc = -e;
            int z = 0;
            atomic_compare_exchange_strong(&r.err, &z, rc);
            break;
        }
    }
    if (show) {
        while (atomic_load(&r.running) > 0) {
            struct timespec ts = {0, 250 * 1000 * 1000};
            nanosleep(&ts, NULL);
            if (atomic_load(&r.running) > 0)
                print_progress(what, atomic_load(&r.done_bytes), total, t0, false);
        }
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(ws[i].th, NULL);
    if (!rc)
        rc = atomic_load(&r.err);
    if (show && !rc)
        print_progress(what, atomic_load(&r.done_bytes), total, t0, true);
    else if (show)
        fputc('\n', stderr);
    free(ws);
    free(r.first_chunk);
    return rc;
}

int rn_model_prefetch(struct rn_model *m, unsigned nthreads, bool progress)
{
    const struct dq_ckpt *ck = rn_model_ckpt(m);
    /* Files in order, tensors in file order (dq_stfile keeps them sorted by
     * offset): one front-to-back sweep per file. */
    size_t n = 0;
    for (size_t f = 0; f < ck->nfiles; f++)
        n += ck->files[f]->ntensors;
    struct rn_read_item *items = calloc(n ? n : 1, sizeof *items);
    if (!items)
        return -ENOMEM;
    size_t k = 0;
    for (size_t f = 0; f < ck->nfiles; f++)
        for (size_t t = 0; t < ck->files[f]->ntensors; t++) {
            const struct dq_tensor *dt = &ck->files[f]->tensors[t];
            if (dt->nbytes)
                items[k++] = (struct rn_read_item){.t = dt, .off = 0, .len = dt->nbytes};
        }
    struct rn_read_opts o = {.nthreads = nthreads, .progress = progress, .what = "prefetch"};
    int rc = rn_read_items(items, k, &o);
    free(items);
    return rc;
}
