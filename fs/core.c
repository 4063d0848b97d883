/* core.c — the life of a bnbfs core: options, open (validate SRC, build
 * the tree, size the cache), start/stop of the compute engines and the
 * source watcher, close.
 *
 * Not the tree (tree.c), the cache (cache.c) or the read path (read.c).
 * Invariant: fs_core_open() starts no thread, so the caller may fork
 * (fuse_daemonize) between open and start.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fs_int.h"

/* ------------------------------------------------------------- options */

void fs_opts_init(struct fs_opts *o)
{
    memset(o, 0, sizeof *o);
    o->dtype = DQ_F16;
    o->cache_bytes = 2ull << 30;
    o->gpu = FS_GPU_AUTO;
    o->readahead_bytes = FS_READAHEAD_AUTO;
}

const char *fs_gpu_name(int gpu, char *buf, size_t len)
{
    if (gpu == FS_GPU_AUTO) snprintf(buf, len, "auto");
    else if (gpu == FS_GPU_OFF) snprintf(buf, len, "off");
    else snprintf(buf, len, "%d", gpu);
    return buf;
}

static int parse_uint(const char *s, unsigned long long max, unsigned long long *out)
{
    if (!s || !*s) return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || s[0] == '-' || v > max) return -EINVAL;
    *out = v;
    return 0;
}

int fs_opts_set(struct fs_opts *o, const char *key, const char *val)
{
    unsigned long long v;
    if (!strcmp(key, "dtype")) {
        if (!val || dq_out_dtype_parse(val, &o->dtype)) {
            dq_log(DQ_LOG_ERROR, FS_TAG, "option dtype=%s: expected f16, bf16 or f32",
                   val ? val : "");
            return -EINVAL;
        }
        return 0;
    }
    if (!strcmp(key, "cache") || !strcmp(key, "readahead")) {
        uint64_t b;
        if (!val || dq_parse_size(val, &b) || (!strcmp(key, "cache") && !b)) {
            dq_log(DQ_LOG_ERROR, FS_TAG, "option %s=%s: expected a size such as 512M or 2G",
                   key, val ? val : "");
            return -EINVAL;
        }
        if (!strcmp(key, "cache")) o->cache_bytes = b;
        else o->readahead_bytes = b;
        return 0;
    }
    if (!strcmp(key, "threads")) {
        if (parse_uint(val, 4096, &v) || !v) {
            dq_log(DQ_LOG_ERROR, FS_TAG, "option threads=%s: expected a number from 1 to 4096",
                   val ? val : "");
            return -EINVAL;
        }
        o->threads = (unsigned)v;
        return 0;
    }
    if (!strcmp(key, "gpu")) {
        if (val && !strcasecmp(val, "auto")) o->gpu = FS_GPU_AUTO;
        else if (val && !strcasecmp(val, "off")) o->gpu = FS_GPU_OFF;
        else if (!parse_uint(val, 255, &v)) o->gpu = (int)v;
        else {
            dq_log(DQ_LOG_ERROR, FS_TAG, "option gpu=%s: expected auto, off or a device number",
                   val ? val : "");
            return -EINVAL;
        }
        return 0;
    }
    return -ENOENT;
}

/* ------------------------------------------------------------- threads */

int fs_thread_create(pthread_t *th, void *(*fn)(void *), void *arg, const char *name)
{
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int r = pthread_create(th, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!r) pthread_setname_np(*th, name);     /* a name is only a label: failure is harmless */
    return -r;
}

/* ---------------------------------------------------------------- core */

const struct dq_plan *fs_core_plan(const struct fs_core *c) { return c->plan; }
const struct fs_opts *fs_core_opts(const struct fs_core *c) { return &c->opts; }
const char *fs_core_src(const struct fs_core *c) { return c->src; }

void fs_core_set_inval(struct fs_core *c, fs_inval_fn fn, void *ctx)
{
    c->inval = fn;
    c->inval_ctx = ctx;
}

int fs_core_add_backend(struct fs_core *c, const struct fs_backend *b)
{
    if (c->started || c->nbackend >= FS_MAX_BACKENDS || (b->buf_unpin && c->pinner))
        return -EBUSY;
    c->backend[c->nbackend] = *b;
    if (b->buf_unpin) c->pinner = &c->backend[c->nbackend];
    c->nbackend++;
    return 0;
}

int fs_core_open(const char *src, const struct fs_opts *opts, struct fs_core **out)
{
    struct fs_core *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    c->opts = *opts;
    c->ifd = c->efd = c->dir_wd = -1;
    fs_stats_init(&c->stats);
    pthread_mutex_init(&c->files_lock, NULL);
    for (int i = 0; i < FS_XXH_STRIPES; i++) pthread_mutex_init(&c->xxh_lock[i], NULL);
    int err;
    char buf[64];

    c->src = realpath(src, NULL);
    if (!c->src) {
        err = -errno;
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s", src, strerror(-err));
        goto fail;
    }
    struct stat st;
    if (stat(c->src, &st) || !S_ISDIR(st.st_mode)) {
        err = -ENOTDIR;
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: not a directory (SRC must be a checkpoint directory)",
               c->src);
        goto fail;
    }
    if (!BNBFS_HAVE_CUDA && opts->gpu >= 0) {
        /* Without CUDA only auto and off are honest. */
        err = -ENODEV;
        dq_log(DQ_LOG_ERROR, FS_TAG, "option gpu=%d: this build has no GPU engine; use gpu=auto "
               "or gpu=off (both compute on the CPU)", opts->gpu);
        goto fail;
    }
    c->nthreads = opts->threads ? opts->threads : dq_ncpus();
    if (!c->nthreads) c->nthreads = 1;
    clock_gettime(CLOCK_REALTIME, &c->mount_time);

    if ((err = dq_ckpt_open(c->src, &c->ck))) goto fail;
    if ((err = dq_plan_build(c->ck, opts->dtype, opts->slice_bytes, &c->plan))) goto fail;
    if ((err = fs_tree_build(c))) goto fail;

    /* Two of the largest slices must fit, or a reader could wait forever. */
    uint64_t need = 2 * fs_round_up(c->max_slice ? c->max_slice : 1, 4096);
    if (c->opts.cache_bytes < need) {
        char b2[64];
        dq_log(DQ_LOG_ERROR, FS_TAG, "option cache=%s: must hold at least two slices (%s)",
               dq_fmt_size(c->opts.cache_bytes, buf, sizeof buf), dq_fmt_size(need, b2, sizeof b2));
        err = -EINVAL;
        goto fail;
    }
    if (c->opts.readahead_bytes != FS_READAHEAD_AUTO) {
        c->ra_max = c->opts.readahead_bytes;
    } else {
        c->ra_max = 4ull * c->nthreads * c->max_slice;
        if (c->ra_max < (16u << 20)) c->ra_max = 16u << 20;
        if (c->ra_max > (256u << 20)) c->ra_max = 256u << 20;
    }
    if (c->ra_max > c->opts.cache_bytes / 4) c->ra_max = c->opts.cache_bytes / 4;
    if ((err = fs_cache_init(c))) goto fail;

    struct fs_backend cpu;
    if ((err = fs_cpu_backend_make(c, &cpu))) goto fail;
    if ((err = fs_core_add_backend(c, &cpu))) {
        cpu.destroy(cpu.ctx);
        goto fail;
    }
#if BNBFS_HAVE_CUDA
    if (opts->gpu != FS_GPU_OFF) {
        struct fs_backend gpu;
        if ((err = fs_gpu_backend_make(c, &gpu))) goto fail;
        if ((err = fs_core_add_backend(c, &gpu))) {
            gpu.destroy(gpu.ctx);
            goto fail;
        }
    }
#endif
    *out = c;
    return 0;
fail:
    fs_core_close(c);
    return err;
}

int fs_core_start(struct fs_core *c)
{
    if (c->started) return 0;
    c->started = true;
    for (unsigned i = 0; i < c->nbackend; i++) {
        int err = c->backend[i].start(c, c->backend[i].ctx);
        if (err == -ENODEV && c->backend[i].engine != FS_ENGINE_CPU)
            continue;   /* no device for it: the engine said so itself, the CPU serves */
        if (err) {
            dq_log(DQ_LOG_ERROR, FS_TAG, "compute engine %s: cannot start: %s",
                   c->backend[i].name, strerror(-err));
            if (c->backend[i].engine == FS_ENGINE_CPU) return err;
            continue;
        }
        c->backend_started[i] = true;
    }
    fs_watch_start(c);      /* without it, the identity checks still catch changes */
    return 0;
}

void fs_core_stop(struct fs_core *c)
{
    if (!c || !c->started || c->stopped) return;
    c->stopped = true;
    fs_watch_stop(c);
    fs_cache_stop(c);
    for (unsigned i = c->nbackend; i-- > 0;)
        if (c->backend_started[i]) c->backend[i].stop(c, c->backend[i].ctx);
}

void fs_core_close(struct fs_core *c)
{
    if (!c) return;
    fs_core_stop(c);
    if (c->ifd >= 0 || c->efd >= 0) fs_watch_stop(c);
    fs_files_close_all(c);
    pthread_mutex_destroy(&c->files_lock);
    /* before the engines go: freeing a pinned buffer asks its engine to unpin it */
    if (c->cache.bucket) fs_cache_fini(c);
    for (unsigned i = 0; i < c->nbackend; i++)
        if (c->backend[i].destroy) c->backend[i].destroy(c->backend[i].ctx);
    fs_tree_free(c);
    if (c->plan) dq_plan_free(c->plan);
    if (c->ck) dq_ckpt_close(c->ck);
    for (int i = 0; i < FS_XXH_STRIPES; i++) pthread_mutex_destroy(&c->xxh_lock[i]);
    fs_stats_fini(&c->stats);
    free(c->src);
    free(c);
}
