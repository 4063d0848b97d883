/* fs.h — libfscore: the bnbfs virtual tree, read planning, slice cache and
 * compute scheduling. No FUSE headers: fs/fuse_ll.c and fs/main.c put this
 * core behind libfuse's low-level API; anything else (a test, `bnbfs --cat`)
 * can read the same virtual files without mounting.
 *
 * The tree under a mount (see docs/DESIGN.md "The mount"):
 *   config.json                        rewritten (quantization_config removed,
 *                                      torch_dtype/dtype = output dtype)
 *   <every other non-weight file>      passthrough, byte-identical
 *   model-0000K-of-0000N.safetensors   virtual shards of HF-canonical tensors
 *   model.safetensors.index.json       synthesized to match
 *   tensors/NAME                       raw little-endian data of one tensor
 *   .bnbfs/stats                       live JSON counters
 *
 * Invariants: virtual files never change while mounted (sizes are fixed at
 * open time); bytes are never served from a source file that changed after
 * the mount (such reads fail with -EIO); the source directory is opened
 * read-only and never written.
 *
 * Threads: fs_core_open() starts none (safe before fork/daemonize);
 * fs_core_start() starts the compute backends and the source watcher.
 * Every function below is thread-safe once the core is open.
 * Errors: 0 or -errno; failures were logged once (dq_log) with the file and
 * tensor they concern.
 */
#ifndef BNBFS_FS_H
#define BNBFS_FS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>

#include "dequant.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FS_ROOT_INO 1

/* ------------------------------------------------------------- options */

enum { FS_GPU_AUTO = -1, FS_GPU_OFF = -2 };  /* else a CUDA device index */
#define FS_READAHEAD_AUTO UINT64_MAX

struct fs_opts {
    enum dq_dtype dtype;        /* DQ_F16 (default), DQ_BF16 or DQ_F32 */
    uint64_t cache_bytes;       /* bound on RAM for computed slices (default 2 GiB) */
    unsigned threads;           /* CPU compute threads; 0 = all cores */
    int gpu;                    /* FS_GPU_AUTO (default), FS_GPU_OFF or device N */
    uint64_t slice_bytes;       /* 0 = the plan's default (about 2 MiB) */
    uint64_t readahead_bytes;   /* largest prefetch window per open file; 0 = none,
                                   FS_READAHEAD_AUTO (default) = 4 slices per thread */
};

void fs_opts_init(struct fs_opts *o);
/* Parses one bnbfs option: key "dtype" (f16|bf16|f32), "cache" (SIZE, e.g.
 * 512M), "threads" (N >= 1), "gpu" (auto|off|N), "readahead" (SIZE).
 * -EINVAL (logged, naming the option) on a bad value, -ENOENT for a key
 * that is not a bnbfs option. */
int fs_opts_set(struct fs_opts *o, const char *key, const char *val);
const char *fs_gpu_name(int gpu, char *buf, size_t len);   /* "auto", "off", "0" */

/* ---------------------------------------------------------------- core */

struct fs_core;

/* Opens SRC (resolved to an absolute path), validates every shard and
 * quant state (dq_ckpt_open + dq_plan_build), reads config.json and lists
 * the passthrough files, and builds the virtual tree. Reads headers only.
 * Starts no thread. On error nothing is left open. */
int fs_core_open(const char *src, const struct fs_opts *opts, struct fs_core **out);
/* Starts the compute backends and the source watcher. */
int fs_core_start(struct fs_core *c);
/* Stops and joins them; pending reads fail with -ESHUTDOWN. Idempotent. */
void fs_core_stop(struct fs_core *c);
void fs_core_close(struct fs_core *c);

const struct dq_plan *fs_core_plan(const struct fs_core *c);
const struct fs_opts *fs_core_opts(const struct fs_core *c);
const char *fs_core_src(const struct fs_core *c);    /* absolute SRC */

/* The adapter's hook for dropping the kernel's page cache of a virtual
 * file whose source changed. Called from the watcher thread only (never
 * from a thread a read is waiting on), so it may block. */
typedef void (*fs_inval_fn)(void *ctx, uint64_t ino);
void fs_core_set_inval(struct fs_core *c, fs_inval_fn fn, void *ctx);

/* ---------------------------------------------------------------- tree */

/* st_ino is the node's inode number; sizes and times never change. */
int fs_getattr(struct fs_core *c, uint64_t ino, struct stat *st);
/* -ENOENT when parent has no such child, -ENOTDIR when parent is a file. */
int fs_lookup(struct fs_core *c, uint64_t parent, const char *name, struct stat *st);
/* Entry idx of directory dir ("." and ".." first, then children sorted by
 * name): *name borrows from the core. -ENOENT past the last entry. */
int fs_dir_entry(struct fs_core *c, uint64_t dir, uint64_t idx, const char **name,
                 struct stat *st);
/* Path of a node relative to the mount ("tensors/lm_head.weight"); borrows. */
const char *fs_node_path(struct fs_core *c, uint64_t ino, char *buf, size_t len);
/* Resolves a relative path ("tensors/x", "config.json") to an inode. */
int fs_resolve(struct fs_core *c, const char *path, uint64_t *ino);
void fs_statfs(struct fs_core *c, struct statvfs *sv);

/* -------------------------------------------------------------- xattrs */

/* user.bnbfs.xxh3 on every regular virtual file (XXH3-128 of the whole
 * content as 32 hex digits, computed through the read path on first ask,
 * then remembered); user.bnbfs.{dtype,shape,source,quant} on tensors/NAME.
 * Both follow getxattr(2): size 0 asks for the length (in *len); -ERANGE
 * when size is too small; -ENODATA for an attribute the node lacks. */
int fs_xattr_list(struct fs_core *c, uint64_t ino, char *buf, size_t size, size_t *len);
int fs_xattr_get(struct fs_core *c, uint64_t ino, const char *name, char *buf, size_t size,
                 size_t *len);

/* --------------------------------------------------------------- reads */

struct fs_file;     /* one open: read-ahead state, stats snapshot */

/* flags are open(2) flags: anything but O_RDONLY is -EROFS; directories are
 * -EISDIR. *direct_io is set for files whose content is generated per open
 * (.bnbfs/stats), which must bypass the page cache. */
int fs_open(struct fs_core *c, uint64_t ino, int flags, struct fs_file **out, bool *direct_io);
void fs_close(struct fs_file *f);

#define FS_REPLY_MAXIOV 32

/* The answer to one read: iov[0..niov) point into header memory and cache
 * slices that stay referenced until fs_reply_release(); when a read spans
 * more pieces than FS_REPLY_MAXIOV, or must wait for cache memory while
 * holding slices, the bytes are copied into one bounce buffer instead.
 * Callers send iov (e.g. writev) and then release. */
struct fs_reply {
    struct iovec iov[FS_REPLY_MAXIOV];
    int niov;
    size_t len;                         /* bytes in iov (short only at EOF) */
    /* private */
    struct fs_core *c;
    int nref;
    struct fs_slice *ref[FS_REPLY_MAXIOV];
    uint32_t ref_bytes[FS_REPLY_MAXIOV]; /* bytes read from ref[i] */
    void *bounce;                       /* owned, or NULL */
    size_t bounce_cap;
};

/* Reads [off, off + len) of an open file (clamped at EOF). -EIO when the
 * range touches a corrupt source tensor or a source that changed. */
int fs_read(struct fs_file *f, uint64_t off, size_t len, struct fs_reply *r);
void fs_reply_release(struct fs_reply *r);
/* Copies [off, off+len) of a virtual file into dst, slice by slice; returns
 * the byte count in *got (short only at EOF). For tools and tests. */
int fs_pread(struct fs_core *c, uint64_t ino, void *dst, size_t len, uint64_t off, size_t *got);

/* ---------------------------------------------------------------- stats */

/* The JSON of .bnbfs/stats (malloc'd, NUL-terminated; caller frees). */
int fs_stats_json(struct fs_core *c, char **out, size_t *len);
/* Counts one request answered by the adapter (bytes, latency). */
void fs_stats_request(struct fs_core *c, size_t req_len, size_t served, uint64_t ns, int err);
/* What the adapter negotiated with the kernel, shown under "fuse" in the stats. */
struct fs_conn_info {
    unsigned proto_major, proto_minor;
    unsigned max_write, max_read, max_readahead, max_background, congestion_threshold;
    unsigned max_threads;
    unsigned kernel_readahead_kb;   /* the mount's bdi read_ahead_kb (0: unknown) */
    bool splice_write, clone_fd;
};
void fs_stats_set_conn(struct fs_core *c, const struct fs_conn_info *ci);
void fs_stats_set_kernel_readahead(struct fs_core *c, unsigned kb);

/* ------------------------------------------------------- compute engines
 *
 * Slices are computed by engines that pull jobs from the core's queue.
 * The CPU pool (fs/cpu_backend.c) is one; a GPU engine (issue 4) is another:
 * it registers a struct fs_backend before fs_core_start(), its threads call
 * fs_sched_pull() for batches and fs_job_finish() for each job. Jobs that
 * a reader waits for come before read-ahead jobs. While a GPU engine is
 * active it may raise the CPU threads' min_queued (fs_sched_set_cpu_min_queued)
 * so that CPU threads take slices only when the GPU queue is deep.
 */
enum fs_engine { FS_ENGINE_CPU = 0, FS_ENGINE_GPU = 1, FS_ENGINE_COUNT };

struct fs_job {
    const struct dq_out *out;   /* tensor to compute (plan-owned) */
    uint64_t slice;             /* slice index within out */
    uint64_t off, len;          /* the slice's byte range in the tensor's data */
    void *dst;                  /* host buffer of len bytes, cache-owned, 64-byte aligned */
    size_t dst_cap;             /* the whole buffer at dst (>= len); large ones are
                                 * page-aligned, a multiple of 4096 bytes */
    bool dst_pinned;            /* the buffer is page-locked by the engine with a buf_unpin
                                 * hook: that engine may set it (and then must have pinned
                                 * [dst, dst + dst_cap)); it stays with the buffer when the
                                 * cache reuses it, and buf_unpin runs before it is freed */
};

/* min_queued for fs_sched_pull: the CPU policy (fs_sched_set_cpu_min_queued). */
#define FS_PULL_CPU_POLICY (~0u)

/* Waits until at least max(min_queued, 1) jobs are queued, then takes up to
 * max of them (demand first). Returns how many (0 when the core is
 * stopping) or -errno. Each job taken must be passed to fs_job_finish. */
int fs_sched_pull(struct fs_core *c, unsigned max, unsigned min_queued, struct fs_job **jobs);
/* Publishes a computed job (err 0) or fails it (err < 0: readers get -EIO).
 * Checks that the job's source files did not change while it ran. */
void fs_job_finish(struct fs_core *c, struct fs_job *job, int err, enum fs_engine who);
/* Queue depth below which CPU threads leave jobs to another engine (default 0). */
void fs_sched_set_cpu_min_queued(struct fs_core *c, unsigned n);
unsigned fs_sched_cpu_min_queued(struct fs_core *c);

struct fs_backend {
    const char *name;
    enum fs_engine engine;
    /* Starts the engine's threads; 0 or -errno (the core then carries on
     * without it, logging why). */
    int (*start)(struct fs_core *c, void *ctx);
    /* Joins them; called after the queue was closed (pulls return 0). */
    void (*stop)(struct fs_core *c, void *ctx);
    /* Frees ctx (may be NULL); called by fs_core_close, started or not,
     * after the cache is gone. */
    void (*destroy)(void *ctx);
    /* Optional (one engine at most): undoes the engine's pinning of a cache
     * buffer (fs_job.dst_pinned) before the cache frees it; called with the
     * cache lock held, from any thread, also after stop. */
    void (*buf_unpin)(void *ctx, void *buf, size_t cap);
    /* Optional: the engine's counters as the body of a JSON object (no
     * braces), shown under "engine_<name>" in .bnbfs/stats. */
    void (*stats_json)(void *ctx, FILE *f);
    void *ctx;
};
/* At most FS_MAX_BACKENDS, registered before fs_core_start(); -EBUSY after
 * it, or for a second engine with buf_unpin. */
#define FS_MAX_BACKENDS 4
int fs_core_add_backend(struct fs_core *c, const struct fs_backend *b);

#ifdef __cplusplus
}
#endif
#endif
