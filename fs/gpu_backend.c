/* gpu_backend.c — the GPU compute engine (issue 4): a few threads that pull
 * batches of jobs from the core's queue (about one lane's worth each, so a
 * burst of read-ahead spreads over the threads), group them into runs of
 * consecutive slices of one tensor (a whole expert of a fused tensor goes up
 * as one batch), and compute each run with kn_ctx_compute (kernels/kernels.h):
 * source bytes up through pinned staging buffers, one kernel, results down
 * straight into the cache's slice buffers, which this engine page-locks the
 * first time it meets them (they stay locked while the cache reuses them;
 * the cache calls buf_unpin before freeing one). A buffer that cannot be
 * locked gets the results through the lane's staging buffer and a copy.
 * The threads run on separate lanes (streams), so uploads, kernels and
 * downloads of different runs overlap. Runs are computed in the order their
 * first job was pulled, so what a reader waits for goes first. The bytes
 * are identical to the CPU engine's (the kernels are tested bit for bit
 * against dequant/).
 *
 * Not a scheduler: cache.c orders the queue (demand first). While this
 * engine runs it raises the CPU threads' min_queued, so CPU threads take
 * slices only when many wait (the GPU is behind); otherwise they sleep.
 *
 * Failures: no driver or no device -> the engine starts no thread and says
 * so once (INFO for gpu=auto, WARN for gpu=N); the CPU engine serves
 * everything. A GPU that fails while mounted -> kn logs it once, the jobs in
 * hand are computed on the CPU here, the CPU threads' threshold drops back
 * to 0 and these threads exit. Source errors (-EIO, -ESTALE) fail the jobs
 * they concern exactly as the CPU engine would.
 *
 * Invariant: every job pulled is finished exactly once. The CUDA context is
 * created in start(), after the FUSE adapter daemonized (it would not
 * survive fork()).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs_int.h"
#include "kernels.h"

#define GPU_THREADS 8   /* submitting threads = kn lanes: while one waits for
                         * its download, the others keep the link and the GPU busy */
#define GPU_PULL_MAX 32 /* jobs per pull at most; a pull takes about one lane's output */
#define GPU_LANE_IN (16u << 20)   /* a whole gpt-oss gate_up expert's codes + scales fit */
#define GPU_LANE_OUT (32u << 20)  /* and its F16 output (31.6 MiB) */
#define CPU_HELP_QUEUED 256       /* CPU threads take slices past this many queued */
#define PIN_MIN (256u << 10)      /* smaller buffers are not worth a registration */

struct gpu_engine;

struct gpu_thread_arg {
    struct fs_core *c;
    struct gpu_engine *e;
};

struct gpu_engine {
    int device;                 /* CUDA ordinal; -1 = first (gpu=auto) */
    struct kn_ctx *kn;          /* owned; created by start, freed by destroy (pinned
                                 * cache buffers are unpinned through it until then) */
    unsigned n;                 /* threads started */
    unsigned pull;              /* jobs per pull */
    pthread_t th[GPU_THREADS];
    struct gpu_thread_arg args[GPU_THREADS];
    atomic_bool down;           /* the GPU failed: threads leave */
    atomic_bool no_pin;         /* a registration failed: stage every result */
    atomic_uint_fast64_t pins;  /* buffers pinned so far */
};

/* Computes jobs on this thread with the CPU reference (unsupported outputs,
 * or after the GPU failed). */
static void cpu_finish(struct fs_core *c, struct fs_job **jobs, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        struct dq_sat sat = {0};
        int err = dq_out_compute(jobs[i]->out, jobs[i]->slice, jobs[i]->dst, &sat);
        if (sat.count)
            atomic_fetch_add_explicit(&c->stats.saturated, sat.count, memory_order_relaxed);
        fs_job_finish(c, jobs[i], err, FS_ENGINE_CPU);
    }
}

static void gpu_failed(struct fs_core *c, struct gpu_engine *e)
{
    if (!atomic_exchange(&e->down, true))
        fs_sched_set_cpu_min_queued(c, 0); /* the CPU threads take everything again */
}

/* Page-locks the job's buffer unless it is already; false when it stays
 * pageable (small, or registration failed). The job is ours while it runs,
 * so nobody else touches its buffer or flag meanwhile. */
static bool pin_dst(struct gpu_engine *e, struct fs_job *j)
{
    if (j->dst_pinned)
        return true;
    if (atomic_load_explicit(&e->no_pin, memory_order_relaxed) || j->dst_cap < PIN_MIN ||
        ((uintptr_t)j->dst | j->dst_cap) & 4095u)
        return false;
    if (kn_host_register(e->kn, j->dst, j->dst_cap)) {
        atomic_store(&e->no_pin, true); /* logged once by kn */
        return false;
    }
    atomic_fetch_add_explicit(&e->pins, 1, memory_order_relaxed);
    j->dst_pinned = true;
    return true;
}

/* A run: consecutive slices of one tensor. */
static void run_jobs(struct fs_core *c, struct gpu_engine *e, struct fs_job **jobs, unsigned n)
{
    void *dst[GPU_PULL_MAX];
    bool pinned = kn_out_supported(jobs[0]->out);   /* else the CPU computes it */
    for (unsigned i = 0; i < n; i++) {
        dst[i] = jobs[i]->dst;
        pinned = pinned && pin_dst(e, jobs[i]);
    }
    struct dq_sat sat = {0};
    int rc = kn_ctx_compute(e->kn, jobs[0]->out, jobs[0]->slice, n, dst,
                            pinned ? KN_DST_PINNED : 0, &sat);
    if (rc == 0) {
        if (sat.count)
            atomic_fetch_add_explicit(&c->stats.saturated, sat.count, memory_order_relaxed);
        for (unsigned i = 0; i < n; i++)
            fs_job_finish(c, jobs[i], 0, FS_ENGINE_GPU);
        return;
    }
    if (rc == -ENODEV)
        gpu_failed(c, e);
    if (rc == -ENODEV || rc == -ENOTSUP) {
        cpu_finish(c, jobs, n);
        return;
    }
    if (n > 1) { /* a source error: find out which slices it concerns */
        for (unsigned i = 0; i < n; i++)
            run_jobs(c, e, jobs + i, 1);
        return;
    }
    fs_job_finish(c, jobs[0], rc, FS_ENGINE_GPU);
}

/* A pulled job and its position in the pull (demand jobs come first). */
struct pulled {
    struct fs_job *job;
    unsigned pos;
};

static int cmp_job(const void *a, const void *b)
{
    const struct fs_job *x = ((const struct pulled *)a)->job, *y = ((const struct pulled *)b)->job;
    if (x->out != y->out)
        return (uintptr_t)x->out < (uintptr_t)y->out ? -1 : 1;
    return x->slice < y->slice ? -1 : x->slice > y->slice;
}

/* A run of p[first, first + n) after sorting; key: its earliest pull position. */
struct run {
    unsigned first, n, key;
};

static int cmp_run(const void *a, const void *b)
{
    unsigned x = ((const struct run *)a)->key, y = ((const struct run *)b)->key;
    return x < y ? -1 : x > y;
}

static void *gpu_main(void *arg)
{
    struct gpu_thread_arg *a = arg;
    struct fs_core *c = a->c;
    struct gpu_engine *e = a->e;
    struct fs_job *jobs[GPU_PULL_MAX];
    struct pulled p[GPU_PULL_MAX];
    struct run runs[GPU_PULL_MAX];
    while (!atomic_load(&e->down)) {
        int n = fs_sched_pull(c, e->pull, 1, jobs);
        if (n <= 0)
            break;
        if (atomic_load(&e->down)) {
            cpu_finish(c, jobs, (unsigned)n);
            break;
        }
        for (unsigned i = 0; i < (unsigned)n; i++)
            p[i] = (struct pulled){jobs[i], i};
        qsort(p, (size_t)n, sizeof *p, cmp_job);
        unsigned nr = 0;
        for (unsigned i = 0; i < (unsigned)n;) {
            struct run r = {i, 1, p[i].pos};
            while (i + r.n < (unsigned)n && p[i + r.n].job->out == p[i].job->out &&
                   p[i + r.n].job->slice == p[i + r.n - 1].job->slice + 1) {
                if (p[i + r.n].pos < r.key)
                    r.key = p[i + r.n].pos;
                r.n++;
            }
            runs[nr++] = r;
            i += r.n;
        }
        qsort(runs, nr, sizeof *runs, cmp_run);
        for (unsigned k = 0; k < nr; k++) {
            struct fs_job *rj[GPU_PULL_MAX];
            for (unsigned i = 0; i < runs[k].n; i++)
                rj[i] = p[runs[k].first + i].job;
            if (atomic_load(&e->down))
                cpu_finish(c, rj, runs[k].n);
            else
                run_jobs(c, e, rj, runs[k].n);
        }
    }
    return NULL;
}

static void gpu_stop(struct fs_core *c, void *ctx)
{
    (void)c;
    struct gpu_engine *e = ctx;
    for (unsigned i = 0; i < e->n; i++)
        pthread_join(e->th[i], NULL);
    e->n = 0;
}

static void gpu_buf_unpin(void *ctx, void *buf, size_t cap)
{
    struct gpu_engine *e = ctx;
    if (e->kn)
        kn_host_unregister(e->kn, buf, cap);
}

static void gpu_stats_json(void *ctx, FILE *f)
{
    struct gpu_engine *e = ctx;
    if (!e->kn) {
        fprintf(f, "\"device\": null");
        return;
    }
    struct kn_ctx_stats st;
    kn_ctx_stats_get(e->kn, &st);
    fprintf(f, "\"device\": \"%s\", \"lanes\": %u, \"usable\": %s, \"calls\": %" PRIu64
            ", \"batches\": %" PRIu64 ", \"bytes_out\": %" PRIu64 ", \"bytes_up\": %" PRIu64
            ", \"bytes_direct\": %" PRIu64 ",\n    \"buffers_pinned\": %" PRIu64
            ", \"bytes_registered\": %" PRIu64 ", \"lane_s\": {\"stage\": %.3f, \"wait\": %.3f"
            ", \"copyout\": %.3f, \"register\": %.3f, \"h2d\": %.3f, \"kernel\": %.3f"
            ", \"d2h\": %.3f}",
            kn_ctx_name(e->kn), e->n, kn_ctx_usable(e->kn) ? "true" : "false", st.calls,
            st.batches, st.bytes_out, st.bytes_up, st.bytes_direct, (uint64_t)atomic_load(&e->pins),
            st.registered, st.ns_stage / 1e9, st.ns_wait / 1e9, st.ns_copyout / 1e9,
            st.ns_register / 1e9, st.ns_h2d / 1e9, st.ns_kernel / 1e9, st.ns_d2h / 1e9);
}

static int gpu_start(struct fs_core *c, void *ctx)
{
    struct gpu_engine *e = ctx;
    char g[16], why[200] = "";
    int ndev = 0;
    kn_device_count(&ndev, why, sizeof why);
    fs_gpu_name(fs_core_opts(c)->gpu, g, sizeof g);
    if (ndev == 0 || e->device >= ndev) {
        if (ndev)
            snprintf(why, sizeof why, "device %d asked for, %d present", e->device, ndev);
        dq_log(e->device < 0 ? DQ_LOG_INFO : DQ_LOG_WARN, "gpu",
               "gpu=%s: no usable GPU (%s); computing on %u CPU threads", g, why, c->nthreads);
        return -ENODEV; /* not an error: the CPU engine serves every read */
    }
    struct kn_ctx_opts ko = {.device = e->device, .nlanes = GPU_THREADS,
                             .lane_out_bytes = GPU_LANE_OUT, .lane_in_bytes = GPU_LANE_IN};
    int err = kn_ctx_new(&ko, &e->kn);
    if (err) {
        dq_log(DQ_LOG_WARN, "gpu", "gpu=%s: cannot use %s (%s, see above); computing on %u CPU "
               "threads", g, e->device < 0 ? "the GPU" : "that GPU", strerror(-err), c->nthreads);
        return -ENODEV;
    }
    e->pull = c->max_slice ? (unsigned)(GPU_LANE_OUT / c->max_slice) : GPU_PULL_MAX;
    if (e->pull < 1)
        e->pull = 1;
    if (e->pull > GPU_PULL_MAX)
        e->pull = GPU_PULL_MAX;
    for (unsigned i = 0; i < GPU_THREADS; i++) {
        e->args[i] = (struct gpu_thread_arg){c, e};
        if (fs_thread_create(&e->th[i], gpu_main, &e->args[i], "bnbfs-gpu"))
            break;
        e->n++;
    }
    if (!e->n) {
        kn_ctx_free(e->kn);
        e->kn = NULL;
        dq_log(DQ_LOG_WARN, "gpu", "cannot start GPU threads; computing on %u CPU threads",
               c->nthreads);
        return -ENODEV;
    }
    /* CPU threads help only when the GPU is behind by this many slices */
    fs_sched_set_cpu_min_queued(c, CPU_HELP_QUEUED);
    dq_log(DQ_LOG_INFO, "gpu", "computing slices on %s (%u lanes); %u CPU threads take slices "
           "when more than %u wait", kn_ctx_name(e->kn), e->n, c->nthreads, CPU_HELP_QUEUED);
    return 0;
}

static void gpu_destroy(void *ctx)
{
    struct gpu_engine *e = ctx;
    if (!e)
        return;
    kn_ctx_free(e->kn);
    free(e);
}

int fs_gpu_backend_make(struct fs_core *c, struct fs_backend *b)
{
    struct gpu_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    int gpu = fs_core_opts(c)->gpu;
    e->device = gpu >= 0 ? gpu : -1;
    *b = (struct fs_backend){.name = "gpu", .engine = FS_ENGINE_GPU, .start = gpu_start,
                             .stop = gpu_stop, .destroy = gpu_destroy,
                             .buf_unpin = gpu_buf_unpin, .stats_json = gpu_stats_json, .ctx = e};
    return 0;
}
