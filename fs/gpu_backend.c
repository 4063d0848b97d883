/* gpu_backend.c — the GPU compute engine (issue 4): a few threads that pull
 * batches of jobs from the core's queue, group them into runs of
 * consecutive slices of one tensor (a whole expert of a fused tensor goes up
 * as one batch), and compute each run with kn_ctx_compute (kernels/kernels.h):
 * source bytes up through pinned staging buffers, one kernel, results down;
 * the threads run on separate lanes (streams), so uploads, kernels and
 * downloads of different runs overlap. The bytes are identical to the CPU
 * engine's (the kernels are tested bit for bit against dequant/).
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs_int.h"
#include "kernels.h"

#define GPU_THREADS 8   /* submitting threads = kn lanes: while one waits for
                         * its download or copies out, the others keep the
                         * link and the GPU busy */
#define GPU_PULL 32     /* jobs per pull (about 64 MiB of F16 slices) */
#define GPU_LANE_IN (16u << 20)   /* a whole gpt-oss gate_up expert's codes + scales fit */
#define GPU_LANE_OUT (32u << 20)  /* and its F16 output (31.6 MiB) */

struct gpu_engine;

struct gpu_thread_arg {
    struct fs_core *c;
    struct gpu_engine *e;
};

struct gpu_engine {
    int device;                 /* CUDA ordinal; -1 = first (gpu=auto) */
    struct kn_ctx *kn;          /* owned; created by start, freed by stop */
    unsigned n;                 /* threads started */
    pthread_t th[GPU_THREADS];
    struct gpu_thread_arg args[GPU_THREADS];
    atomic_bool down;           /* the GPU failed: threads leave */
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

/* A run: consecutive slices of one tensor. */
static void run_jobs(struct fs_core *c, struct gpu_engine *e, struct fs_job **jobs, unsigned n)
{
    void *dst[GPU_PULL];
    for (unsigned i = 0; i < n; i++)
        dst[i] = jobs[i]->dst;
    struct dq_sat sat = {0};
    int rc = kn_ctx_compute(e->kn, jobs[0]->out, jobs[0]->slice, n, dst, 0, &sat);
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

static int cmp_job(const void *a, const void *b)
{
    const struct fs_job *x = *(struct fs_job *const *)a, *y = *(struct fs_job *const *)b;
    if (x->out != y->out)
        return (uintptr_t)x->out < (uintptr_t)y->out ? -1 : 1;
    return x->slice < y->slice ? -1 : x->slice > y->slice;
}

static void *gpu_main(void *arg)
{
    struct gpu_thread_arg *a = arg;
    struct fs_core *c = a->c;
    struct gpu_engine *e = a->e;
    struct fs_job *jobs[GPU_PULL];
    while (!atomic_load(&e->down)) {
        int n = fs_sched_pull(c, GPU_PULL, 1, jobs);
        if (n <= 0)
            break;
        if (atomic_load(&e->down)) {
            cpu_finish(c, jobs, (unsigned)n);
            break;
        }
        qsort(jobs, (size_t)n, sizeof *jobs, cmp_job);
        unsigned i = 0;
        while (i < (unsigned)n) {
            unsigned j = i + 1;
            while (j < (unsigned)n && jobs[j]->out == jobs[i]->out &&
                   jobs[j]->slice == jobs[j - 1]->slice + 1)
                j++;
            if (atomic_load(&e->down))
                cpu_finish(c, jobs + i, j - i);
            else
                run_jobs(c, e, jobs + i, j - i);
            i = j;
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
    kn_ctx_free(e->kn);
    e->kn = NULL;
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
    for (unsigned i = 0; i < GPU_THREADS; i++) {
        e->args[i] = (struct gpu_thread_arg){c, e};
        if (fs_thread_create(&e->th[i], gpu_main, &e->args[i]))
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
    fs_sched_set_cpu_min_queued(c, GPU_THREADS * GPU_PULL);
    dq_log(DQ_LOG_INFO, "gpu", "computing slices on %s (%u lanes); %u CPU threads take slices "
           "when more than %u wait", kn_ctx_name(e->kn), e->n, c->nthreads,
           GPU_THREADS * GPU_PULL);
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
                             .stop = gpu_stop, .destroy = gpu_destroy, .ctx = e};
    return 0;
}
