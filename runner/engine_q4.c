/* engine_q4.c — the 24 GB mode's 4-bit expert store (see engine_q4.h for
 * why and the two tiers).
 *
 * Correctness rests on two facts: kn_deq4_fuse_t produces exactly the bytes
 * bnbfs serves for a fused expert tensor (the kernel is bit-identical to the
 * CPU reference, tests/gpu/test_kn_dequant.c), and the store holds exactly
 * the source's bytes (copied once, every scale checked finite, the file's
 * identity checked first). eng_q4_verify checks the pairing at load: two
 * experts dequantized here must equal the model dir's F16 bytes.
 *
 * Not here: which slot an expert goes to (engine_cache.c), the budget
 * arithmetic (engine_load.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "engine_q4.h"

#define Q4_ALIGN 256
#define Q4_XATTR "user.bnbfs.source"
#define Q4_MAX_THREADS 8

static size_t up(size_t v) { return (v + Q4_ALIGN - 1) & ~(size_t)(Q4_ALIGN - 1); }
static double gib(size_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Why the store cannot serve the model: -ENOTSUP (INFO) when the source was
 * found on its own, the error (-EINVAL) when the user named it. */
static int unusable(bool named, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int unusable(bool named, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (named) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "--expert-source: %s", msg);
        return -EINVAL;
    }
    dq_log(DQ_LOG_INFO, ENG_TAG, "no 4-bit expert store (%s): cache misses copy F16 experts",
           msg);
    return -ENOTSUP;
}

/* Lays out matrix m of one expert from the plan's source s, whose logical
 * Linear must be [C, R]. */
static int mat_layout(struct q4_mat *M, const struct dq_out *o, const struct dq_src *s,
                      uint64_t C, uint64_t R, size_t *at, bool named)
{
    const struct dq_qstate *q = s->q;
    if (!q)
        return unusable(named, "%s: '%s' is not a 4-bit weight", s->t->file->path, s->t->name);
    if (s->rows != C || s->cols != R || R % 2)
        return unusable(named, "%s: '%s' is [%" PRIu64 ", %" PRIu64 "], the model's %s needs "
                        "[%" PRIu64 ", %" PRIu64 "]", s->t->file->path, s->t->name, s->rows,
                        s->cols, o->name, C, R);
    *M = (struct q4_mat){.qtype = q->qtype, .blocksize = q->blocksize, .nested = q->nested,
                         .nested_blocksize = q->nested_blocksize,
                         .nested_offset = q->nested_offset, .C = C, .R = R, .o = o, .src = s};
    M->codes_len = (size_t)(C * R / 2);
    M->abs_len = (size_t)q->nblocks * (q->nested ? 1 : 4);
    M->nabs_len = q->nested ? (size_t)q->nested_nblocks * 4 : 0;
    if (s->t->nbytes < M->codes_len)
        return unusable(named, "%s: '%s' holds %" PRIu64 " bytes of codes, %zu needed",
                        s->t->file->path, s->t->name, s->t->nbytes, M->codes_len);
    M->codes_off = *at;
    *at += up(M->codes_len);
    M->abs_off = *at;
    *at += up(M->abs_len);
    if (q->nested) {
        M->nabs_off = *at;
        *at += up(M->nabs_len);
        M->nmap_off = *at;
        *at += up(256 * sizeof(float));
    }
    return 0;
}

int eng_q4_open(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    const bool named = e->opts.expert_source != NULL;
    char buf[PATH_MAX];
    const char *dir = e->opts.expert_source;
    if (!named) {
        ssize_t n = getxattr(e->m->dir, Q4_XATTR, buf, sizeof buf - 1);
        if (n <= 0)
            return unusable(false, "%s is not a bnbfs mount", e->m->dir);
        buf[n] = '\0';
        dir = buf;
    }
    for (int l = 0; l < c->nlayers; l++)
        if (e->m->layers[l].gate_up.dtype != DQ_F16 || e->m->layers[l].down.dtype != DQ_F16)
            return unusable(named, "the experts of %s are %s, not F16", e->m->dir,
                            dq_dtype_name(e->m->layers[l].gate_up.dtype));
    struct eng_q4 *q = calloc(1, sizeof *q);
    const size_t nrec = (size_t)c->nlayers * c->nexperts;
    if (!q || !(q->rec = calloc(nrec, sizeof *q->rec)) || !(q->src_dir = strdup(dir))) {
        if (q)
            free(q->rec);
        free(q);
        return -ENOMEM;
    }
    e->q4 = q;      /* freed by eng_q4_free on every path from here */
    /* A mount made by another user may name a source this one cannot
     * read: that is a quiet fallback, not an error line from dequant. */
    if (!named && access(dir, R_OK | X_OK))
        return unusable(false, "%s: %s", dir, strerror(errno));
    int rc = dq_ckpt_open(dir, &q->ck);
    if (rc)
        return named ? rc : unusable(false, "%s cannot be opened", dir);
    if ((rc = dq_plan_build(q->ck, DQ_F16, 0, &q->plan)))
        return named ? rc : unusable(false, "%s has no bnbfs plan", dir);
    const uint64_t H = (uint64_t)c->hidden, I = (uint64_t)c->intermediate;
    size_t at = 0;
    for (int l = 0; l < c->nlayers; l++) {
        char n_gu[128], n_dn[128];
        snprintf(n_gu, sizeof n_gu, "model.layers.%d.mlp.experts.gate_up_proj", l);
        snprintf(n_dn, sizeof n_dn, "model.layers.%d.mlp.experts.down_proj", l);
        const struct dq_out *gu = dq_plan_find(q->plan, n_gu), *dn = dq_plan_find(q->plan, n_dn);
        if (!gu || !dn)
            return unusable(named, "%s has no %s", dir, gu ? n_dn : n_gu);
        if (gu->op != DQ_OP_FUSE_T || dn->op != DQ_OP_FUSE_T ||
            gu->nsrc != (size_t)c->nexperts || dn->nsrc != (size_t)c->nexperts)
            return unusable(named, "%s: layer %d's experts are not %d per-expert Linears", dir,
                            l, c->nexperts);
        for (int x = 0; x < c->nexperts; x++) {
            struct q4_rec *r = &q->rec[(size_t)l * c->nexperts + x];
            size_t len = 0;
            if ((rc = mat_layout(&r->m[0], gu, &gu->src[x], 2 * I, H, &len, named)) ||
                (rc = mat_layout(&r->m[1], dn, &dn->src[x], H, I, &len, named)))
                return rc;
            r->off = at;
            r->bytes = len;
            at += len;
            if (len > q->rec_max)
                q->rec_max = len;
            for (int m = 0; m < 2; m++)
                if (r->m[m].src->q->nblocks > q->max_blocks)
                    q->max_blocks = r->m[m].src->q->nblocks;
        }
    }
    q->store_bytes = at;
    return 0;
}

size_t eng_q4_device_bytes(const struct rn_engine *e, bool on_gpu)
{
    const struct eng_q4 *q = e->q4;
    return on_gpu ? q->store_bytes : 2 * up(q->rec_max);
}

int eng_q4_place(struct rn_engine *e, bool on_gpu)
{
    struct eng_q4 *q = e->q4;
    q->on_gpu = on_gpu;
    CU(cudaMalloc((void **)&q->d_cnt, sizeof *q->d_cnt));
    TRY(kn_counters_reset(q->d_cnt, e->cst));
    if (on_gpu)
        return 0;
    CU(cudaStreamCreateWithFlags(&q->kst, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++) {
        CU(cudaEventCreateWithFlags(&q->stage_full[i], cudaEventDisableTiming));
        CU(cudaEventCreateWithFlags(&q->stage_free[i], cudaEventDisableTiming));
        CU(cudaEventRecord(q->stage_free[i], q->kst));
    }
    if (eng_hostmem_map(&q->host, q->store_bytes)) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "cannot map %.2f GiB of host memory for the 4-bit experts",
               gib(q->store_bytes));
        return -ENOMEM;
    }
    return 0;
}

/* ------------------------------------------------------------- loading */

struct load_ctx {
    struct rn_engine *e;
    atomic_size_t next;
    atomic_int rc;
};

struct copy_args {
    const struct q4_mat *M;
    uint8_t *rec;               /* the record's bytes (host) */
};

static const uint8_t *tbytes(const struct dq_tensor *t) { return t->file->map + t->offset; }

static int copy_thunk(void *p)
{
    const struct copy_args *a = p;
    const struct q4_mat *M = a->M;
    const struct dq_qstate *q = M->src->q;
    memcpy(a->rec + M->codes_off, tbytes(M->src->t), M->codes_len);
    memcpy(a->rec + M->abs_off, tbytes(q->absmax), M->abs_len);
    if (M->nested) {
        memcpy(a->rec + M->nabs_off, tbytes(q->nested_absmax), M->nabs_len);
        memcpy(a->rec + M->nmap_off, tbytes(q->nested_quant_map), 256 * sizeof(float));
    }
    return 0;
}

/* Checks and copies one matrix into rec (host memory). scales: room for
 * every block's scale. */
static int load_mat(const struct q4_mat *M, uint8_t *rec, float *scales)
{
    int rc = dq_src_check(M->o, M->src);
    if (rc)
        return rc;
    /* Every scale finite (a corrupt block fails the mount's read of it:
     * it must fail here too, not give other numbers) and the stored
     * quant_map the built-in table; both logged by dequant, naming the
     * file and tensor. */
    if ((rc = dq_qstate_scales(M->src->q, 0, M->src->q->nblocks, scales)))
        return rc;
    struct copy_args a = {M, rec};
    if ((rc = dq_guard(copy_thunk, &a)))
        dq_log(DQ_LOG_ERROR, ENG_TAG, "%s: tensor '%s': read failed (file truncated?)",
               M->src->t->file->path, M->src->t->name);
    return rc;
}

static void *load_thread(void *p)
{
    struct load_ctx *L = p;
    struct rn_engine *e = L->e;
    struct eng_q4 *q = e->q4;
    const size_t nrec = (size_t)e->c.nlayers * e->c.nexperts;
    float *scales = malloc(q->max_blocks * sizeof *scales);
    uint8_t *stage = NULL;
    cudaStream_t st = NULL;
    int rc = scales ? 0 : -ENOMEM;
    if (!rc && q->on_gpu) {
        cudaError_t ce = cudaSetDevice(e->dev);
        if (ce == cudaSuccess)
            ce = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
        if (ce == cudaSuccess)
            ce = cudaHostAlloc((void **)&stage, q->rec_max, cudaHostAllocDefault);
        if (ce != cudaSuccess)
            rc = eng_cuda_fail(ce, "4-bit store staging", __FILE__, __LINE__);
    }
    while (!rc && !atomic_load(&L->rc)) {
        const size_t i = atomic_fetch_add(&L->next, 1);
        if (i >= nrec)
            break;
        const struct q4_rec *r = &q->rec[i];
        /* The host tier fills the store in place; the GPU tier goes
         * through this thread's pinned record. */
        uint8_t *rec = q->on_gpu ? stage : (uint8_t *)q->host.p + r->off;
        for (int m = 0; !rc && m < 2; m++)
            rc = load_mat(&r->m[m], rec, scales);
        if (!rc && q->on_gpu) {
            cudaError_t ce = cudaMemcpyAsync(q->d_store + r->off, stage, r->bytes,
                                             cudaMemcpyHostToDevice, st);
            if (ce == cudaSuccess)
                ce = cudaStreamSynchronize(st);
            if (ce != cudaSuccess)
                rc = eng_cuda_fail(ce, "4-bit store upload", __FILE__, __LINE__);
        }
    }
    if (rc) {
        int zero = 0;
        atomic_compare_exchange_strong(&L->rc, &zero, rc);
    }
    if (stage)
        cudaFreeHost(stage);
    if (st)
        cudaStreamDestroy(st);
    free(scales);
    return NULL;
}

int eng_q4_load(struct rn_engine *e)
{
    struct eng_q4 *q = e->q4;
    const double t0 = now_s();
    /* The pool's clearing (legacy stream) must land before the readers'
     * non-blocking streams write the store. */
    CU(cudaDeviceSynchronize());
    struct load_ctx L = {.e = e};
    unsigned nt = dq_ncpus();
    if (nt > Q4_MAX_THREADS)
        nt = Q4_MAX_THREADS;
    if (nt < 1)
        nt = 1;
    pthread_t th[Q4_MAX_THREADS];
    unsigned started = 0;
    for (; started < nt; started++)
        if (pthread_create(&th[started], NULL, load_thread, &L))
            break;
    if (!started)
        load_thread(&L);
    for (unsigned i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    int rc = atomic_load(&L.rc);
    dq_plan_free(q->plan);
    q->plan = NULL;
    dq_ckpt_close(q->ck);
    q->ck = NULL;
    for (size_t i = 0; i < (size_t)e->c.nlayers * e->c.nexperts; i++)
        for (int m = 0; m < 2; m++) {
            q->rec[i].m[m].src = NULL;
            q->rec[i].m[m].o = NULL;
        }
    if (rc) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "cannot load the 4-bit experts from %s", q->src_dir);
        return rc;
    }
    if (!q->on_gpu)
        eng_hostmem_pin(&q->host, "4-bit expert store");
    dq_log(DQ_LOG_INFO, ENG_TAG, "4-bit expert store: %.2f GiB from %s in %.1f s, %s",
           gib(q->store_bytes), q->src_dir, now_s() - t0,
           q->on_gpu ? "on the GPU (a miss is a dequantization kernel)"
                     : "in host memory (a miss copies its 4-bit record)");
    return 0;
}

/* --------------------------------------------------------------- fills */

static int deq(const struct eng_q4 *q, const struct q4_mat *M, const uint8_t *rec, kn_half *dst,
               cudaStream_t st)
{
    struct kn_q4 kq = {.qtype = M->qtype, .blocksize = M->blocksize,
                       .codes = rec + M->codes_off, .nested = M->nested,
                       .absmax = rec + M->abs_off};
    if (M->nested) {
        kq.nested_blocksize = M->nested_blocksize;
        kq.nested_offset = M->nested_offset;
        kq.nested_absmax = (const float *)(rec + M->nabs_off);
        kq.nested_map = (const float *)(rec + M->nmap_off);
    }
    /* The whole weight as stored: band [0, R), R/2 bytes a row; output
     * [R, C] = the fused tensor's slice of this expert. */
    return kn_deq4_fuse_t(&kq, M->C, M->R, 0, M->R, M->R / 2, 0, M->R, DQ_F16, dst, q->d_cnt,
                          (kn_stream)st);
}

int eng_q4_fill(struct rn_engine *e, int l, int x, kn_half *gu, kn_half *dn, cudaEvent_t freed,
                cudaEvent_t ready)
{
    struct eng_q4 *q = e->q4;
    const struct q4_rec *r = &q->rec[(size_t)l * e->c.nexperts + x];
    if (q->on_gpu) {
        const uint8_t *rec = q->d_store + r->off;
        CU(cudaStreamWaitEvent(e->cst, freed, 0));
        TRY(deq(q, &r->m[0], rec, gu, e->cst));
        TRY(deq(q, &r->m[1], rec, dn, e->cst));
        CU(cudaEventRecord(ready, e->cst));
    } else {
        /* Copy on cst into a staging buffer, dequantize on kst: the next
         * record's copy overlaps these kernels. */
        const int i = q->next_stage;
        q->next_stage ^= 1;
        CU(cudaStreamWaitEvent(e->cst, q->stage_free[i], 0));
        CU(cudaMemcpyAsync(q->d_stage[i], (const uint8_t *)q->host.p + r->off, r->bytes,
                           cudaMemcpyHostToDevice, e->cst));
        CU(cudaEventRecord(q->stage_full[i], e->cst));
        CU(cudaStreamWaitEvent(q->kst, q->stage_full[i], 0));
        CU(cudaStreamWaitEvent(q->kst, freed, 0));
        TRY(deq(q, &r->m[0], q->d_stage[i], gu, q->kst));
        TRY(deq(q, &r->m[1], q->d_stage[i], dn, q->kst));
        CU(cudaEventRecord(q->stage_free[i], q->kst));
        CU(cudaEventRecord(ready, q->kst));
        e->stats.bytes_moved += r->bytes;
    }
    e->stats.bytes_dequant += e->expert_bytes;
    return 0;
}

/* ------------------------------------------------------------- verify */

struct cmp_args {
    const kn_half *a, *b;
    size_t n, first;
};

static int cmp_thunk(void *p)
{
    struct cmp_args *a = p;
    a->first = a->n;
    if (!memcmp(a->a, a->b, a->n * sizeof(kn_half)))
        return 0;
    for (size_t i = 0; i < a->n; i++)
        if (a->a[i] != a->b[i]) {
            a->first = i;
            break;
        }
    return 0;
}

int eng_q4_verify(struct rn_engine *e)
{
    struct eng_q4 *q = e->q4;
    const struct rn_config *c = &e->c;
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    const size_t ngu = H * 2 * I, ndn = I * H;
    kn_half *host = malloc((ngu + ndn) * sizeof *host);
    if (!host)
        return -ENOMEM;
    struct eng_slot *sl = &e->slots[0];
    const int which[2][2] = {{0, 0}, {c->nlayers - 1, c->nexperts - 1}};
    int rc = 0;
    for (int k = 0; !rc && k < 2; k++) {
        const int l = which[k][0], x = which[k][1];
        if ((rc = eng_q4_fill(e, l, x, sl->gu, sl->dn, sl->freed, sl->ready)))
            break;
        cudaError_t ce = cudaEventSynchronize(sl->ready);
        if (ce == cudaSuccess)
            ce = cudaMemcpy(host, sl->gu, ngu * sizeof *host, cudaMemcpyDeviceToHost);
        if (ce == cudaSuccess)
            ce = cudaMemcpy(host + ngu, sl->dn, ndn * sizeof *host, cudaMemcpyDeviceToHost);
        if (ce != cudaSuccess) {
            rc = eng_cuda_fail(ce, "4-bit store check", __FILE__, __LINE__);
            break;
        }
        const struct rn_layer *S = &e->m->layers[l];
        const struct {
            const char *name;
            const kn_half *mine, *model;
            size_t n, cols;
        } v[2] = {
            {S->gate_up.name, host, (const kn_half *)S->gate_up.data + (size_t)x * ngu, ngu, 2 * I},
            {S->down.name, host + ngu, (const kn_half *)S->down.data + (size_t)x * ndn, ndn, H},
        };
        for (int m = 0; !rc && m < 2; m++) {
            struct cmp_args a = {v[m].mine, v[m].model, v[m].n, 0};
            if ((rc = dq_guard(cmp_thunk, &a))) {
                dq_log(DQ_LOG_ERROR, ENG_TAG, "%s: cannot read '%s' of the model dir",
                       e->m->dir, v[m].name);
                break;
            }
            if (a.first < a.n) {
                dq_log(DQ_LOG_ERROR, ENG_TAG, "%s does not hold the experts of %s: '%s' expert "
                       "%d differs at [%zu, %zu] (0x%04x from the 4-bit source, 0x%04x in the "
                       "model dir)", q->src_dir, e->m->dir, v[m].name, x, a.first / v[m].cols,
                       a.first % v[m].cols, a.a[a.first], a.b[a.first]);
                rc = -EINVAL;
            }
        }
    }
    free(host);
    /* The check's fills are not the model's traffic. */
    e->stats.bytes_moved = e->stats.bytes_dequant = 0;
    return rc;
}

void eng_q4_free(struct rn_engine *e)
{
    struct eng_q4 *q = e->q4;
    if (!q)
        return;
    if (q->kst) {
        cudaStreamSynchronize(q->kst);
        cudaStreamDestroy(q->kst);
    }
    for (int i = 0; i < 2; i++) {
        if (q->stage_full[i])
            cudaEventDestroy(q->stage_full[i]);
        if (q->stage_free[i])
            cudaEventDestroy(q->stage_free[i]);
    }
    eng_hostmem_free(&q->host);
    if (q->d_cnt)
        cudaFree(q->d_cnt);
    dq_plan_free(q->plan);
    dq_ckpt_close(q->ck);
    free(q->rec);
    free(q->src_dir);
    free(q);
    e->q4 = NULL;
}
