/* model_read.h — private to runner/: reading weight bytes from the
 * checkpoint files in large chunks from several threads, with progress.
 *
 * Why not the mmap: on a cold bnbfs mount every page fault is one small
 * FUSE request served one after another; pread() of 8 MiB chunks from
 * several threads keeps many large requests in flight, so the mount is read
 * at its throughput. The page cache filled this way also backs the mmap.
 */
#ifndef BNBFS_RUNNER_MODEL_READ_H
#define BNBFS_RUNNER_MODEL_READ_H

#include <stdbool.h>
#include <stdint.h>

#include "runner.h"

/* One byte range of one tensor to read. */
struct rn_read_item {
    const struct dq_tensor *t;  /* source (file, absolute offset); borrowed */
    uint64_t off, len;          /* range within the tensor's bytes */
    void *host_dst;             /* non-NULL: read straight into host_dst[0..len) */
    void *user;                 /* for the sink */
};

/* Called once per chunk, on worker thread `tid` (0..nthreads-1), with the
 * chunk's bytes: `off` is relative to the item's range; `data` is valid
 * until the sink returns (a per-thread buffer, or host_dst + off). Returns 0
 * or -errno (logged by the sink); an error stops the read. */
typedef int (*rn_read_sink_fn)(void *ctx, unsigned tid, const struct rn_read_item *it,
                               uint64_t off, const void *data, uint64_t len);

struct rn_read_opts {
    unsigned nthreads;          /* worker threads; 0 = default (min(16, 2 x cores), >= 4) */
    uint64_t chunk;             /* bytes per pread; 0 = 8 MiB */
    bool progress;              /* print progress even when stderr is not a terminal */
    const char *what;           /* verb for the progress line ("loading") */
    /* Per-thread chunk buffers (the engine hands out pinned memory); NULL:
     * malloc/free. Not called for items with host_dst. */
    void *(*buf_alloc)(void *ctx, uint64_t n);
    void (*buf_free)(void *ctx, void *p);
    rn_read_sink_fn sink;       /* may be NULL (prefetch: bytes are dropped) */
    void *ctx;
};

/* Reads every item, chunk by chunk in item order, on o->nthreads threads.
 * Returns 0 or the first -errno (read errors are logged with file, tensor
 * and offset). */
int rn_read_items(const struct rn_read_item *items, size_t n, const struct rn_read_opts *o);
unsigned rn_read_default_threads(void);

/* Total bytes of every tensor of the checkpoint (what a prefetch reads). */
uint64_t rn_model_weight_bytes(const struct rn_model *m);
/* The opened checkpoint behind the model; borrowed. */
const struct dq_ckpt *rn_model_ckpt(const struct rn_model *m);

#endif
