/* fs_int.h — private structures shared by the libfscore sources (tree.c,
 * cache.c, read.c, watch.c, stats.c, core.c, cpu_backend.c). Not installed,
 * not for the FUSE adapter (which sees only fs.h).
 *
 * Locks, outermost first: fs_file.lock -> fs_cache.lock. xxh_lock[] are
 * taken with nothing else held. Counters in fs_stats are atomics. */
#ifndef BNBFS_FS_INT_H
#define BNBFS_FS_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "fs.h"

#define FS_TAG "fs"
#define FS_SHARD_MAX_BYTES (2ull << 30)   /* split a layer's shard past 2 GiB */

enum fs_kind {
    FS_K_DIR = 0, FS_K_CONFIG, FS_K_PASSTHRU, FS_K_SHARD, FS_K_INDEX, FS_K_TENSOR,
    FS_K_STATS,
};

/* One source file under SRC that virtual files depend on: a safetensors
 * shard (st != NULL) or a passthrough / config file (fd >= 0). */
struct fs_src {
    char *name;                 /* basename in SRC; owned */
    char *path;                 /* absolute; owned */
    struct dq_stfile *st;       /* safetensors shard (ckpt-owned), or NULL */
    int fd;                     /* O_RDONLY for passthrough files; owned; else -1 */
    struct stat id;             /* identity at mount (dev, ino, size, mtime) */
    int wd;                     /* inotify watch of the file itself, or -1 */
    atomic_bool stale;          /* changed since the mount: serve EIO */
    uint32_t *tensors;          /* indices into core->tensors backed by it; owned */
    uint32_t ntensors;
    uint64_t node;              /* passthrough/config: the virtual node's ino; else 0 */
};

/* One output tensor of the plan as the mount serves it. */
struct fs_tensor {
    const struct dq_out *o;     /* plan-owned */
    uint32_t idx;               /* index in core->tensors == in plan->out */
    uint64_t id_hash;           /* XXH3 of the sources' identity + dtype + name */
    uint32_t *srcs;             /* indices into core->srcs (distinct); owned */
    uint32_t nsrcs;
    uint64_t shard_ino;         /* virtual shard holding it */
    uint64_t file_ino;          /* tensors/NAME, or 0 when the name can't be a file */
    uint64_t shard_off;         /* offset of its data in the shard */
    atomic_bool stale;          /* a source changed: every read fails with EIO */
    atomic_bool err_logged;     /* one log line per tensor for failing reads */
};

/* A range of tensor data in a virtual file (shard or tensors/NAME). */
struct fs_extent {
    uint64_t off;               /* byte offset in the virtual file */
    uint64_t len;               /* == tensor nbytes (never 0) */
    uint32_t tensor;
};

struct fs_node {
    char *name;                 /* owned ("" for the root) */
    uint64_t ino, parent;
    enum fs_kind kind;
    uint64_t size;              /* bytes; 0 for directories and stats */
    struct timespec mtime;
    uint64_t *child;            /* DIR: child inos sorted by name; owned */
    uint32_t nchild;
    uint8_t *mem;               /* CONFIG/INDEX: content; SHARD: 8-byte length + header; owned */
    uint64_t memlen;
    struct fs_extent *ext;      /* SHARD/TENSOR: data extents, by offset; owned */
    uint32_t next;
    int32_t src;                /* CONFIG/PASSTHRU: index into core->srcs, else -1 */
    bool have_xxh;              /* guarded by the node's xxh_lock stripe */
    uint8_t xxh[16];            /* canonical (big-endian) XXH3-128 */
    atomic_bool inval_pending;  /* the watcher must drop its page cache */
};

/* Cache entry: one computed slice. The job view comes first so a struct
 * fs_job * handed to an engine converts back. */
enum fs_slice_state { FS_SL_QUEUED = 0, FS_SL_RUNNING, FS_SL_READY, FS_SL_FAILED };

struct fs_slice {
    struct fs_job job;          /* out, slice, off, len, dst (== buf) */
    uint64_t key;               /* XXH3(tensor id_hash, slice) */
    uint32_t tensor;
    size_t cap;                 /* bytes reserved against the cache bound */
    void *buf;                  /* cap bytes, or NULL until an engine takes the job */
    enum fs_slice_state state;
    int err;                    /* FAILED: -errno */
    uint32_t refs;              /* readers holding or waiting for it */
    bool demand;                /* a reader waits: on the demand queue */
    uint64_t bytes_read;        /* bytes readers copied out of it so far */
    bool consumed;              /* every byte was read once: recycle it first */
    bool dead;                  /* removed from the table; freed on last put */
    bool in_hash;
    struct fs_slice *hnext;     /* hash chain */
    struct fs_slice *prev, *next;   /* links of the list `on` */
    struct fs_list *on;         /* LRU (READY, refs 0), a queue (QUEUED), or NULL */
    pthread_cond_t cv;          /* state changes */
};

struct fs_list { struct fs_slice *head, *tail; size_t n; };

/* An idle buffer, its header written into its first bytes. */
struct fs_pool_buf { struct fs_pool_buf *next; size_t cap; bool pinned; };

/* All fields under lock. */
struct fs_cache {
    pthread_mutex_t lock;
    /* Jobs queued or stopping. Engines that pull with their own min_queued
     * (the GPU's threads) wait on eng_cv, CPU threads (FS_PULL_CPU_POLICY)
     * on cpu_cv; a new job wakes one of each, a CPU thread only when the
     * queue is at least cpu_min_queued deep, so idle CPU threads are not
     * woken for every job an engine will take anyway. */
    pthread_cond_t eng_cv, cpu_cv;
    unsigned eng_waiters, cpu_waiters;
    pthread_cond_t mem_cv;      /* memory released */
    uint64_t limit;             /* bytes (the -o cache bound) */
    uint64_t reserved;          /* bytes reserved by entries (computed or in flight) */
    uint64_t pooled;            /* bytes of idle buffers kept for reuse */
    uint64_t peak;              /* max of reserved + pooled */
    uint64_t demand_margin;     /* prefetch leaves this much for readers */
    struct fs_slice **bucket;   /* hash table; owned */
    size_t nbucket;             /* power of two */
    size_t nentries;
    struct fs_list lru;         /* head = least recently used */
    struct fs_list qdemand, qprefetch;
    struct fs_pool_buf *pool;
    unsigned mem_waiters;
    unsigned cpu_min_queued;
    bool stopping;
};

/* Histogram of read latencies: bucket i covers [lo(i), lo(i+1)) µs. */
#define FS_LAT_BUCKETS 320
#define FS_REQ_BUCKETS 32       /* request sizes, powers of two */

struct fs_stats {
    _Atomic uint64_t requests, bytes_served, bytes_internal;
    _Atomic uint64_t bytes_computed[FS_ENGINE_COUNT], slices_computed[FS_ENGINE_COUNT];
    _Atomic uint64_t hits, joins, misses, prefetch_issued, evictions, mem_waits;
    _Atomic uint64_t err_eio, err_other, stale_events, saturated, bounce_reads;
    _Atomic uint64_t wakeups_engine, wakeups_cpu;  /* returns from waiting for jobs */
    _Atomic uint64_t lat[FS_LAT_BUCKETS];
    _Atomic uint64_t req_size[FS_REQ_BUCKETS];
    _Atomic uint64_t lat_max_ns, req_max;
    struct timespec t0;         /* mount time (CLOCK_MONOTONIC) */
    pthread_mutex_t conn_lock;  /* guards conn */
    struct fs_conn_info conn;   /* from the adapter's init */
    bool have_conn;
};

#define FS_XXH_STRIPES 64

struct fs_core {
    char *src;                  /* absolute SRC; owned */
    struct fs_opts opts;
    unsigned nthreads;          /* resolved CPU threads */
    struct dq_ckpt *ck;         /* owned */
    struct dq_plan *plan;       /* owned */
    struct fs_tensor *tensors;  /* [plan->nout]; owned */
    struct fs_src *srcs;        /* owned */
    uint32_t nsrcs;
    struct fs_node *nodes;      /* nodes[ino - 1]; owned */
    uint64_t nnodes;
    uint64_t tensors_dir, meta_dir;     /* inos of tensors/ and .bnbfs/ */
    uint64_t max_slice;         /* largest slice in bytes */
    uint64_t total_slices;
    uint64_t ra_max;            /* prefetch window per open file, bytes */
    struct timespec mount_time; /* CLOCK_REALTIME at open */
    struct fs_cache cache;
    struct fs_stats stats;
    pthread_mutex_t xxh_lock[FS_XXH_STRIPES];

    /* Files still open: the kernel sends no RELEASE for files open when
     * the session ends, so fs_core_close frees what is left. */
    pthread_mutex_t files_lock;
    struct fs_file *files;      /* list through fs_file.prev/next; guarded by files_lock */

    struct fs_backend backend[FS_MAX_BACKENDS];
    unsigned nbackend;
    const struct fs_backend *pinner;   /* the backend with buf_unpin, or NULL */
    bool backend_started[FS_MAX_BACKENDS];
    bool started, stopped;

    /* source watcher (watch.c) */
    int ifd, efd, dir_wd;
    pthread_t watch_thread;
    bool watch_running;
    atomic_bool watch_stop;
    fs_inval_fn inval;
    void *inval_ctx;
};

/* tree.c */
int fs_tree_build(struct fs_core *c);
void fs_tree_free(struct fs_core *c);
struct fs_node *fs_node_get(struct fs_core *c, uint64_t ino);
int fs_src_index_of(const struct fs_core *c, const struct dq_stfile *f);

/* cache.c */
int fs_cache_init(struct fs_core *c);
void fs_cache_fini(struct fs_core *c);
void fs_cache_stop(struct fs_core *c);
enum { FS_GET_WAIT = 0, FS_GET_NOWAIT_MEM = 1 };
/* A referenced, READY slice (may compute it); -EAGAIN with NOWAIT_MEM when
 * getting it would mean waiting for memory. */
int fs_slice_get(struct fs_core *c, uint32_t tensor, uint64_t slice, int flags,
                 struct fs_slice **out);
/* bytes_read: how much the reader copied out; once a slice's every byte
 * was read (sequential readers), it is the first to be recycled. */
void fs_slice_put(struct fs_core *c, struct fs_slice *e, uint64_t bytes_read);
/* Queues a read-ahead computation if the slice is absent and memory is
 * free; -EAGAIN when it is not (stop prefetching), 0 otherwise. */
int fs_slice_prefetch(struct fs_core *c, uint32_t tensor, uint64_t slice);
/* Drops every cached slice of a tensor (its source changed). */
void fs_cache_purge_tensor(struct fs_core *c, uint32_t tensor);
uint64_t fs_slice_key(const struct fs_tensor *t, uint64_t slice);
void fs_cache_snapshot(struct fs_core *c, uint64_t *reserved, uint64_t *pooled, uint64_t *peak,
                       size_t *entries, size_t *queued);

/* cpu_backend.c: the default engine, c->nthreads threads. */
int fs_cpu_backend_make(struct fs_core *c, struct fs_backend *b);
/* gpu_backend.c (built when CUDA is on, BNBFS_HAVE_CUDA): the GPU engine. */
int fs_gpu_backend_make(struct fs_core *c, struct fs_backend *b);

/* watch.c */
int fs_watch_start(struct fs_core *c);
void fs_watch_stop(struct fs_core *c);
/* Compares a source's identity with the mount-time one; marks it stale
 * (logging, purging, invalidating) when it changed. 0 or -ESTALE. */
int fs_src_check(struct fs_core *c, uint32_t src);
void fs_src_mark_stale(struct fs_core *c, uint32_t src, const char *why);

/* stats.c */
void fs_stats_init(struct fs_stats *s);
void fs_stats_fini(struct fs_stats *s);
uint64_t fs_now_ns(void);

/* core.c: threads started by the core block the signals libfuse handles
 * (SIGINT, SIGTERM, SIGHUP), so those always reach a FUSE thread. They are
 * named (at most 15 characters), so per-thread CPU time in /proc tells the
 * engines and the FUSE workers apart. */
int fs_thread_create(pthread_t *th, void *(*fn)(void *), void *arg, const char *name);

/* read.c */
int fs_node_xxh3(struct fs_core *c, struct fs_node *n, uint8_t out[16]);
void fs_files_close_all(struct fs_core *c);

/* small helpers */
static inline uint64_t fs_round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

#endif
