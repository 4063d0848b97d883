/* cpu_backend.c — the CPU compute engine: nthreads threads that pull one
 * job at a time from the core's queue and compute it with dq_out_compute()
 * (bit-exact CPU reference, SIMD inside).
 *
 * Not a scheduler: ordering (demand before read-ahead) and the policy of
 * leaving shallow queues to a GPU engine live in cache.c
 * (fs_sched_pull with FS_PULL_CPU_POLICY).
 * Invariant: every job pulled is finished exactly once.
 */
#include <errno.h>
#include <stdlib.h>

#include "fs_int.h"

struct cpu_engine {
    unsigned n;                 /* threads started */
    pthread_t *th;              /* [n]; owned */
};

static void *cpu_main(void *arg)
{
    struct fs_core *c = arg;
    struct fs_job *job;
    for (;;) {
        int n = fs_sched_pull(c, 1, FS_PULL_CPU_POLICY, &job);
        if (n <= 0) break;
        struct dq_sat sat = {0};
        int err = dq_out_compute(job->out, job->slice, job->dst, &sat);
        if (sat.count)
            atomic_fetch_add_explicit(&c->stats.saturated, sat.count, memory_order_relaxed);
        fs_job_finish(c, job, err, FS_ENGINE_CPU);
    }
    return NULL;
}

static void cpu_stop(struct fs_core *c, void *ctx)
{
    (void)c;
    struct cpu_engine *e = ctx;
    for (unsigned i = 0; i < e->n; i++) pthread_join(e->th[i], NULL);
    e->n = 0;
}

static int cpu_start(struct fs_core *c, void *ctx)
{
    struct cpu_engine *e = ctx;
    e->th = calloc(c->nthreads, sizeof *e->th);
    if (!e->th) return -ENOMEM;
    for (unsigned i = 0; i < c->nthreads; i++) {
        int err = fs_thread_create(&e->th[i], cpu_main, c, "bnbfs-cpu");
        if (err) {
            if (!e->n) return err;
            dq_log(DQ_LOG_WARN, FS_TAG, "started %u of %u compute threads", e->n, c->nthreads);
            break;
        }
        e->n++;
    }
    return 0;
}

static void cpu_destroy(void *ctx)
{
    struct cpu_engine *e = ctx;
    if (!e) return;
    free(e->th);
    free(e);
}

int fs_cpu_backend_make(struct fs_core *c, struct fs_backend *b)
{
    (void)c;
    struct cpu_engine *e = calloc(1, sizeof *e);
    if (!e) return -ENOMEM;
    *b = (struct fs_backend){ .name = "cpu", .engine = FS_ENGINE_CPU, .start = cpu_start,
                              .stop = cpu_stop, .destroy = cpu_destroy, .ctx = e };
    return 0;
}
