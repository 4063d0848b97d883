/* kn_ctx.c — computing slices of plan outputs (struct dq_out) on one GPU:
 * the device, its lanes (a stream, a blocking-sync event, pinned host and
 * device staging buffers, device counters), and kn_ctx_compute, which turns
 * a run of slices into batches: source bytes copied from the mapped files
 * into a lane's pinned buffer (under dq_guard), one upload, one kernel, and
 * the download: into the lane's pinned buffer and from there copied to the
 * caller's buffers, or, when the caller registered them (kn_host_register,
 * KN_DST_PINNED), straight into them, which saves the host one copy of
 * every output byte.
 *
 * Not here: the kernels (dequant.cu), and any choice between GPU and CPU
 * (fs/ makes it: -EBUSY, -ENOTSUP and -ENODEV tell it to use the CPU).
 *
 * Invariants: all device and pinned memory is allocated in kn_ctx_new and
 * freed in kn_ctx_free, never per call; a lane is used by one call at a time
 * (ctx->mu guards the busy flags); a CUDA failure marks the context dead
 * (logged once) and every later call answers -ENODEV, so the caller's CPU
 * path serves the same bytes. Source errors (-ESTALE, -EIO) are reported
 * exactly as dq_out_compute reports them, the GPU staying usable.
 *
 * CUDA contexts do not survive fork(): create the kn_ctx after daemonizing.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "kn_internal.h"

#define DEF_LANES 4
#define DEF_OUT (32u << 20)
#define DEF_IN (24u << 20)
#define ALIGN 256u /* sub-buffer alignment inside a lane's staging buffer */

struct kn_lane {
    cudaStream_t st;           /* non-blocking stream; owned */
    cudaEvent_t done;          /* blocking-sync event: waiters sleep, not spin; owned */
    cudaEvent_t t_up, t_in, t_kern; /* timing: before and after the upload, after the
                                     * kernel; owned */
    uint8_t *h_in, *h_out;     /* pinned host staging [in_cap], [out_cap]; owned */
    uint8_t *d_in, *d_out;     /* device staging [in_cap], [out_cap]; owned */
    struct kn_counters *d_cnt; /* device counters; owned */
    struct kn_counters *h_cnt; /* pinned copy of d_cnt after each batch; owned */
    bool busy;                 /* a call holds this lane; under kn_ctx.mu */
};

struct kn_ctx {
    int dev;                   /* CUDA ordinal */
    char name[288];            /* "NVIDIA H100 80GB HBM3 (device 0)" */
    unsigned nlanes;
    size_t in_cap, out_cap;    /* bytes per lane */
    struct kn_lane *lanes;     /* [nlanes]; owned */
    pthread_mutex_t mu;        /* guards lanes[].busy */
    pthread_cond_t cv;         /* signalled when a lane is released */
    atomic_bool dead;          /* a CUDA call failed: -ENODEV from now on */
    atomic_bool reg_logged;    /* a kn_host_register failure was logged */
    atomic_uint_fast64_t calls, slices, bytes_out, bytes_up, bytes_direct, busy, registered;
    atomic_uint_fast64_t batches, ns_stage, ns_wait, ns_copyout, ns_register;
    atomic_uint_fast64_t ns_h2d, ns_kernel, ns_d2h;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* --------------------------------------------------------- lifecycle */

static void lane_free(struct kn_lane *l)
{
    if (l->st)
        cudaStreamSynchronize(l->st);
    if (l->done)
        cudaEventDestroy(l->done);
    if (l->t_up)
        cudaEventDestroy(l->t_up);
    if (l->t_in)
        cudaEventDestroy(l->t_in);
    if (l->t_kern)
        cudaEventDestroy(l->t_kern);
    if (l->st)
        cudaStreamDestroy(l->st);
    cudaFreeHost(l->h_in);
    cudaFreeHost(l->h_out);
    cudaFreeHost(l->h_cnt);
    cudaFree(l->d_in);
    cudaFree(l->d_out);
    cudaFree(l->d_cnt);
    memset(l, 0, sizeof *l);
}

static int lane_init(struct kn_ctx *ctx, struct kn_lane *l)
{
    int rc = 0;
    KN_CUDA_GOTO(cudaStreamCreateWithFlags(&l->st, cudaStreamNonBlocking), rc, fail);
    KN_CUDA_GOTO(cudaEventCreateWithFlags(&l->done, cudaEventBlockingSync), rc, fail);
    KN_CUDA_GOTO(cudaEventCreate(&l->t_up), rc, fail);
    KN_CUDA_GOTO(cudaEventCreate(&l->t_in), rc, fail);
    KN_CUDA_GOTO(cudaEventCreate(&l->t_kern), rc, fail);
    KN_CUDA_GOTO(cudaHostAlloc((void **)&l->h_in, ctx->in_cap, cudaHostAllocDefault), rc, fail);
    KN_CUDA_GOTO(cudaHostAlloc((void **)&l->h_out, ctx->out_cap, cudaHostAllocDefault), rc, fail);
    KN_CUDA_GOTO(cudaHostAlloc((void **)&l->h_cnt, sizeof *l->h_cnt, cudaHostAllocDefault), rc,
                 fail);
    KN_CUDA_GOTO(cudaMalloc((void **)&l->d_in, ctx->in_cap), rc, fail);
    KN_CUDA_GOTO(cudaMalloc((void **)&l->d_out, ctx->out_cap), rc, fail);
    KN_CUDA_GOTO(cudaMalloc((void **)&l->d_cnt, sizeof *l->d_cnt), rc, fail);
    return 0;
fail:
    lane_free(l);
    return rc;
}

int kn_ctx_new(const struct kn_ctx_opts *opts, struct kn_ctx **out)
{
    *out = NULL;
    int ndev = 0;
    char why[160] = "";
    kn_device_count(&ndev, why, sizeof why);
    int dev = opts && opts->device >= 0 ? opts->device : 0;
    if (ndev == 0) {
        dq_log(DQ_LOG_INFO, KN_TAG, "no GPU: %s", why);
        return -ENODEV;
    }
    if (dev >= ndev) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "GPU %d asked for, but only %d device%s present", dev, ndev,
               ndev == 1 ? " is" : "s are");
        return -ENODEV;
    }
    struct kn_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return -ENOMEM;
    ctx->dev = dev;
    ctx->nlanes = opts && opts->nlanes ? opts->nlanes : DEF_LANES;
    ctx->out_cap = (opts && opts->lane_out_bytes ? opts->lane_out_bytes : DEF_OUT);
    ctx->in_cap = (opts && opts->lane_in_bytes ? opts->lane_in_bytes : DEF_IN);
    ctx->out_cap = (ctx->out_cap + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    ctx->in_cap = (ctx->in_cap + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    pthread_mutex_init(&ctx->mu, NULL);
    pthread_cond_init(&ctx->cv, NULL);
    int rc = 0;
    struct cudaDeviceProp prop;
    KN_CUDA_GOTO(cudaSetDevice(dev), rc, fail);
    KN_CUDA_GOTO(cudaGetDeviceProperties(&prop, dev), rc, fail);
    snprintf(ctx->name, sizeof ctx->name, "%s (device %d)", prop.name, dev);
    ctx->lanes = calloc(ctx->nlanes, sizeof *ctx->lanes);
    if (!ctx->lanes) {
        rc = -ENOMEM;
        goto fail;
    }
    for (unsigned i = 0; i < ctx->nlanes; i++) {
        rc = lane_init(ctx, &ctx->lanes[i]);
        if (rc) {
            dq_log(DQ_LOG_ERROR, KN_TAG, "%s: cannot allocate %u lanes of %zu + %zu bytes",
                   ctx->name, ctx->nlanes, ctx->in_cap, ctx->out_cap);
            goto fail;
        }
    }
    *out = ctx;
    return 0;
fail:
    kn_ctx_free(ctx);
    return rc;
}

void kn_ctx_free(struct kn_ctx *ctx)
{
    if (!ctx)
        return;
    if (ctx->lanes) {
        cudaSetDevice(ctx->dev);
        for (unsigned i = 0; i < ctx->nlanes; i++)
            lane_free(&ctx->lanes[i]);
    }
    free(ctx->lanes);
    pthread_cond_destroy(&ctx->cv);
    pthread_mutex_destroy(&ctx->mu);
    free(ctx);
}

const char *kn_ctx_name(const struct kn_ctx *ctx) { return ctx->name; }

bool kn_ctx_usable(const struct kn_ctx *ctx) { return !atomic_load(&ctx->dead); }

void kn_ctx_stats_get(const struct kn_ctx *ctx, struct kn_ctx_stats *st)
{
    st->calls = atomic_load(&ctx->calls);
    st->slices = atomic_load(&ctx->slices);
    st->bytes_out = atomic_load(&ctx->bytes_out);
    st->bytes_up = atomic_load(&ctx->bytes_up);
    st->bytes_direct = atomic_load(&ctx->bytes_direct);
    st->busy = atomic_load(&ctx->busy);
    st->registered = atomic_load(&ctx->registered);
    st->batches = atomic_load(&ctx->batches);
    st->ns_stage = atomic_load(&ctx->ns_stage);
    st->ns_wait = atomic_load(&ctx->ns_wait);
    st->ns_copyout = atomic_load(&ctx->ns_copyout);
    st->ns_register = atomic_load(&ctx->ns_register);
    st->ns_h2d = atomic_load(&ctx->ns_h2d);
    st->ns_kernel = atomic_load(&ctx->ns_kernel);
    st->ns_d2h = atomic_load(&ctx->ns_d2h);
}

/* ------------------------------------------------- registered memory */

int kn_host_register(struct kn_ctx *ctx, void *p, size_t len)
{
    if (((uintptr_t)p | len) & 4095u || !len)
        return -EINVAL;
    uint64_t t0 = now_ns();
    cudaError_t err = cudaSetDevice(ctx->dev);
    if (err == cudaSuccess)
        err = cudaHostRegister(p, len, cudaHostRegisterPortable);
    atomic_fetch_add(&ctx->ns_register, now_ns() - t0);
    if (err != cudaSuccess) {
        cudaGetLastError(); /* not sticky: keep it from a later launch check */
        if (!atomic_exchange(&ctx->reg_logged, true))
            dq_log(DQ_LOG_WARN, KN_TAG, "%s: cudaHostRegister(%zu bytes): %s; results go "
                   "through pinned staging instead", ctx->name, len, cudaGetErrorString(err));
        return -EIO;
    }
    atomic_fetch_add(&ctx->registered, len);
    return 0;
}

void kn_host_unregister(struct kn_ctx *ctx, void *p, size_t len)
{
    cudaSetDevice(ctx->dev);
    if (cudaHostUnregister(p) != cudaSuccess)
        cudaGetLastError(); /* a failed GPU may refuse; the memory is freed anyway */
    atomic_fetch_sub(&ctx->registered, len);
}

/* ------------------------------------------------------------- lanes */

static struct kn_lane *lane_get(struct kn_ctx *ctx, bool wait)
{
    pthread_mutex_lock(&ctx->mu);
    for (;;) {
        for (unsigned i = 0; i < ctx->nlanes; i++)
            if (!ctx->lanes[i].busy) {
                ctx->lanes[i].busy = true;
                pthread_mutex_unlock(&ctx->mu);
                return &ctx->lanes[i];
            }
        if (!wait)
            break;
        pthread_cond_wait(&ctx->cv, &ctx->mu);
    }
    pthread_mutex_unlock(&ctx->mu);
    return NULL;
}

static void lane_put(struct kn_ctx *ctx, struct kn_lane *l)
{
    pthread_mutex_lock(&ctx->mu);
    l->busy = false;
    pthread_cond_signal(&ctx->cv);
    pthread_mutex_unlock(&ctx->mu);
}

/* ---------------------------------------------------------- batches */

static bool is_float_in(enum dq_dtype t)
{
    return t == DQ_F16 || t == DQ_BF16 || t == DQ_F32 || t == DQ_F64;
}

bool kn_out_supported(const struct dq_out *o)
{
    if (o->dtype != DQ_F16 && o->dtype != DQ_BF16 && o->dtype != DQ_F32)
        return false;
    for (uint32_t i = 0; i < o->nsrc; i++) {
        const struct dq_src *s = &o->src[i];
        if (s->q)
            continue;
        /* plain sources: conversions only (identity copies are the CPU's
         * memcpy; a plain transpose has no GPU kernel) */
        if (o->op == DQ_OP_FUSE_T || !is_float_in(s->t->dtype) || s->t->dtype == o->dtype)
            return false;
    }
    return true;
}

static size_t up(size_t v) { return (v + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

static const uint8_t *tbytes(const struct dq_tensor *t) { return t->file->map + t->offset; }

/* One batch: consecutive slices of one source, and where their source
 * bytes go in the lane's input buffer. */
struct batch {
    const struct dq_out *o;
    const struct dq_src *s;
    uint64_t e;                 /* source (expert) index */
    uint64_t s0, ns;            /* slices */
    uint64_t k0, k1;            /* flat: element range within the source */
    uint64_t r0, r1, rb, re;    /* FUSE_T: output rows, source column band */
    uint64_t pitch;             /* FUSE_T: bytes per source row in the band */
    uint64_t b0, b1;            /* 4-bit: blocks [b0, b1] */
    uint64_t n0, n1;            /* nested: nested blocks [n0, n1] */
    size_t codes_off, codes_len;/* in the input buffer: codes or plain data */
    size_t abs_off, abs_len, nabs_off, nabs_len, nmap_off;
    size_t in_bytes, out_bytes;
};

/* Source of slice s, and its element range [*k0, *k1) within that source. */
static uint64_t slice_elems(const struct dq_out *o, uint64_t s, uint64_t *k0, uint64_t *k1)
{
    uint64_t osz = dq_dtype_size(o->dtype), per_src = o->numel / o->nsrc;
    uint64_t off, len;
    dq_out_slice_range(o, s, &off, &len);
    *k0 = (off / osz) % per_src;
    *k1 = *k0 + len / osz;
    return (off / osz) / per_src;
}

/* Fills the layout of a batch; false when a size overflows. */
static bool batch_layout(struct batch *b)
{
    const struct dq_out *o = b->o;
    const struct dq_src *s = b->s;
    const uint64_t osz = dq_dtype_size(o->dtype);
    size_t at = 0;
    b->codes_off = 0;
    if (o->op == DQ_OP_FUSE_T) {
        const struct dq_qstate *q = s->q;
        const uint64_t C = s->rows, R = s->cols;
        b->r0 = b->k0 / C;
        b->r1 = b->k1 / C;
        b->rb = b->r0 & ~(uint64_t)31;
        b->re = (b->r1 + 31) & ~(uint64_t)31;
        if (b->re > R)
            b->re = R;
        uint64_t w = b->re - b->rb;
        if (b->rb == 0 && b->re == R && R % 2 == 0)
            b->pitch = R / 2; /* the whole weight as stored */
        else
            b->pitch = ((w / 2 + 1) + 15) & ~(uint64_t)15;
        if (__builtin_mul_overflow(C, b->pitch, &b->codes_len))
            return false;
        b->b0 = b->rb >> __builtin_ctz(q->blocksize);
        b->b1 = ((C - 1) * R + b->re - 1) / q->blocksize;
        b->out_bytes = (b->r1 - b->r0) * C * osz;
    } else if (s->q) {
        b->codes_len = (b->k1 + 1) / 2 - b->k0 / 2;
        b->b0 = b->k0 / s->q->blocksize;
        b->b1 = (b->k1 - 1) / s->q->blocksize;
        b->out_bytes = (b->k1 - b->k0) * osz;
    } else {
        b->codes_len = (b->k1 - b->k0) * dq_dtype_size(s->t->dtype);
        b->out_bytes = (b->k1 - b->k0) * osz;
    }
    at = up(b->codes_len);
    if (s->q) {
        const struct dq_qstate *q = s->q;
        b->abs_off = at;
        b->abs_len = (b->b1 - b->b0 + 1) * (q->nested ? 1 : 4);
        at += up(b->abs_len);
        if (q->nested) {
            b->n0 = b->b0 / q->nested_blocksize;
            b->n1 = b->b1 / q->nested_blocksize;
            b->nabs_off = at;
            b->nabs_len = (b->n1 - b->n0 + 1) * 4;
            at += up(b->nabs_len);
            b->nmap_off = at;
            at += up(256 * 4);
        }
    }
    b->in_bytes = at;
    return true;
}

/* Copies the batch's source bytes from the mapped files into h_in. Runs
 * under dq_guard (a truncated file raises SIGBUS -> -EIO). */
struct stage_args {
    const struct batch *b;
    uint8_t *h_in;
};

static int stage_thunk(void *p)
{
    const struct stage_args *a = p;
    const struct batch *b = a->b;
    const struct dq_src *s = b->s;
    uint8_t *in = a->h_in;
    if (b->o->op == DQ_OP_FUSE_T) {
        const uint8_t *codes = tbytes(s->t);
        const uint64_t C = s->rows, R = s->cols;
        if (b->pitch * 2 == R && b->rb == 0) {
            memcpy(in, codes, C * b->pitch);
        } else {
            for (uint64_t c = 0; c < C; c++) {
                uint64_t lo = (c * R + b->rb) >> 1, hi = (c * R + b->re - 1) >> 1;
                memcpy(in + c * b->pitch, codes + lo, hi - lo + 1);
            }
        }
    } else if (s->q) {
        memcpy(in, tbytes(s->t) + b->k0 / 2, b->codes_len);
    } else {
        memcpy(in, tbytes(s->t) + b->k0 * dq_dtype_size(s->t->dtype), b->codes_len);
    }
    if (s->q) {
        const struct dq_qstate *q = s->q;
        memcpy(in + b->abs_off, tbytes(q->absmax) + b->b0 * (q->nested ? 1 : 4), b->abs_len);
        if (q->nested) {
            memcpy(in + b->nabs_off, tbytes(q->nested_absmax) + b->n0 * 4, b->nabs_len);
            memcpy(in + b->nmap_off, tbytes(q->nested_quant_map), 256 * 4);
        }
    }
    return 0;
}

/* Upload, kernel, download and wait; GPU failures only (-EIO, logged).
 * The results go to the lane's h_out, or with dst (registered memory)
 * straight to dst[i], slice by slice. */
static int batch_gpu(struct kn_lane *l, const struct batch *b, void *const *dst)
{
    const struct dq_out *o = b->o;
    const struct dq_src *s = b->s;
    cudaStream_t st = l->st;
    KN_CUDA(cudaEventRecord(l->t_up, st));
    KN_CUDA(cudaMemcpyAsync(l->d_in, l->h_in, b->in_bytes, cudaMemcpyHostToDevice, st));
    KN_CUDA(cudaEventRecord(l->t_in, st));
    int rc = kn_counters_reset(l->d_cnt, st);
    if (rc)
        return rc;
    if (s->q) {
        const struct dq_qstate *q = s->q;
        struct kn_q4 kq = {
            .qtype = q->qtype, .blocksize = q->blocksize, .codes = l->d_in,
            .code_base = b->k0 & ~(uint64_t)1, .nested = q->nested,
            .absmax = l->d_in + b->abs_off, .absmax_base = b->b0,
        };
        if (q->nested) {
            kq.nested_blocksize = q->nested_blocksize;
            kq.nested_offset = q->nested_offset;
            kq.nested_absmax = (const float *)(l->d_in + b->nabs_off);
            kq.nested_base = b->n0;
            kq.nested_map = (const float *)(l->d_in + b->nmap_off);
        }
        if (o->op == DQ_OP_FUSE_T)
            rc = kn_deq4_fuse_t(&kq, s->rows, s->cols, b->rb, b->re, b->pitch, b->r0, b->r1,
                                o->dtype, l->d_out, l->d_cnt, st);
        else
            rc = kn_deq4_flat(&kq, b->k0, b->k1 - b->k0, o->dtype, l->d_out, l->d_cnt, st);
    } else {
        rc = kn_convert(s->t->dtype, l->d_in, b->k1 - b->k0, o->dtype, l->d_out, l->d_cnt, st);
    }
    if (rc)
        return rc;
    KN_CUDA(cudaEventRecord(l->t_kern, st));
    KN_CUDA(cudaMemcpyAsync(l->h_cnt, l->d_cnt, sizeof *l->h_cnt, cudaMemcpyDeviceToHost, st));
    if (dst) {
        uint64_t base, len;
        dq_out_slice_range(o, b->s0, &base, &len);
        for (uint64_t i = 0; i < b->ns; i++) {
            uint64_t off;
            dq_out_slice_range(o, b->s0 + i, &off, &len);
            KN_CUDA(cudaMemcpyAsync(dst[i], l->d_out + (off - base), len, cudaMemcpyDeviceToHost,
                                    st));
        }
    } else {
        KN_CUDA(cudaMemcpyAsync(l->h_out, l->d_out, b->out_bytes, cudaMemcpyDeviceToHost, st));
    }
    KN_CUDA(cudaEventRecord(l->done, st));
    KN_CUDA(cudaEventSynchronize(l->done));
    return 0;
}

/* Adds the device-side times of the batch that just finished (stats only:
 * a failure here loses a sample, nothing else). */
static void batch_times(struct kn_ctx *ctx, struct kn_lane *l)
{
    float up = 0, kern = 0, down = 0;
    if (cudaEventElapsedTime(&up, l->t_up, l->t_in) != cudaSuccess ||
        cudaEventElapsedTime(&kern, l->t_in, l->t_kern) != cudaSuccess ||
        cudaEventElapsedTime(&down, l->t_kern, l->done) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    /* each span includes waiting for the copy engine or the SMs that
     * other lanes hold: a lane's view, not the engines' busy time */
    atomic_fetch_add(&ctx->ns_h2d, (uint64_t)((double)up * 1e6));
    atomic_fetch_add(&ctx->ns_kernel, (uint64_t)((double)kern * 1e6));
    atomic_fetch_add(&ctx->ns_d2h, (uint64_t)((double)down * 1e6));
}

/* The kernels saw a non-finite scale: let the CPU reference say so in its
 * own words (it logs file, tensor and block) and fail like it does. */
static int bad_scales(const struct batch *b)
{
    const struct dq_qstate *q = b->s->q;
    uint64_t n = b->b1 - b->b0 + 1;
    float *a = malloc(n * sizeof *a);
    if (!a)
        return -ENOMEM;
    int rc = dq_qstate_scales(q, b->b0, n, a);
    free(a);
    if (rc == 0) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "%s: tensor '%s': the GPU saw a non-finite scale that the "
               "CPU does not: treating the GPU as failed", b->s->t->file->path, b->s->t->name);
        return -ENODEV;
    }
    dq_log(DQ_LOG_ERROR, KN_TAG, "%s: tensor '%s': cannot compute slice %llu of %s",
           b->s->t->file->path, b->s->t->name, (unsigned long long)b->s0, b->o->name);
    return rc;
}

static int run_batch(struct kn_ctx *ctx, struct kn_lane *l, struct batch *b, void *const dst[],
                     bool direct, struct dq_sat *sat)
{
    int rc = dq_src_check(b->o, b->s);
    if (rc)
        return rc;
    if (b->s->q) {
        /* the stored quant_map must be the built-in table (dequant's own
         * check and log line, by asking the reference for one scale) */
        float a0;
        rc = dq_qstate_scales(b->s->q, b->b0, 1, &a0);
        if (rc) {
            dq_log(DQ_LOG_ERROR, KN_TAG, "%s: tensor '%s': cannot compute slice %llu of %s",
                   b->s->t->file->path, b->s->t->name, (unsigned long long)b->s0, b->o->name);
            return rc;
        }
    }
    struct stage_args sa = {b, l->h_in};
    uint64_t t0 = now_ns();
    rc = dq_guard(stage_thunk, &sa);
    uint64_t t1 = now_ns();
    atomic_fetch_add(&ctx->ns_stage, t1 - t0);
    if (rc) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "%s: tensor '%s': read failed (file truncated?) while "
               "computing %s", b->s->t->file->path, b->s->t->name, b->o->name);
        return rc;
    }
    if (batch_gpu(l, b, direct ? dst : NULL)) {
        if (!atomic_exchange(&ctx->dead, true))
            dq_log(DQ_LOG_ERROR, KN_TAG, "%s failed; slices are computed on the CPU from now on",
                   ctx->name);
        return -ENODEV;
    }
    uint64_t t2 = now_ns();
    atomic_fetch_add(&ctx->ns_wait, t2 - t1);
    atomic_fetch_add(&ctx->batches, 1);
    batch_times(ctx, l);
    if (l->h_cnt->bad_scales) {
        rc = bad_scales(b);
        if (rc == -ENODEV)
            atomic_store(&ctx->dead, true);
        return rc;
    }
    if (direct) {
        atomic_fetch_add(&ctx->bytes_direct, b->out_bytes);
    } else { /* scatter the batch's output to the callers' slice buffers */
        uint64_t base, len0;
        dq_out_slice_range(b->o, b->s0, &base, &len0);
        for (uint64_t i = 0; i < b->ns; i++) {
            uint64_t off, len;
            dq_out_slice_range(b->o, b->s0 + i, &off, &len);
            memcpy(dst[i], l->h_out + (off - base), len);
        }
        atomic_fetch_add(&ctx->ns_copyout, now_ns() - t2);
    }
    if (sat && l->h_cnt->saturated)
        __atomic_fetch_add(&sat->count, (uint64_t)l->h_cnt->saturated, __ATOMIC_RELAXED);
    atomic_fetch_add(&ctx->slices, b->ns);
    atomic_fetch_add(&ctx->bytes_out, b->out_bytes);
    atomic_fetch_add(&ctx->bytes_up, b->in_bytes);
    return 0;
}

int kn_ctx_compute(struct kn_ctx *ctx, const struct dq_out *o, uint64_t s0, uint64_t ns,
                   void *const dst[], unsigned flags, struct dq_sat *sat)
{
    if (atomic_load(&ctx->dead))
        return -ENODEV;
    if (!kn_out_supported(o))
        return -ENOTSUP;
    if (ns == 0)
        return 0;
    if (s0 >= o->nslices || ns > o->nslices - s0)
        return -ERANGE;
    struct kn_lane *l = lane_get(ctx, !(flags & KN_NOWAIT));
    if (!l) {
        atomic_fetch_add(&ctx->busy, 1);
        return -EBUSY;
    }
    int rc = 0;
    if (cudaSetDevice(ctx->dev) != cudaSuccess) {
        if (!atomic_exchange(&ctx->dead, true))
            dq_log(DQ_LOG_ERROR, KN_TAG, "%s: cudaSetDevice failed; slices are computed on the "
                   "CPU from now on", ctx->name);
        rc = -ENODEV;
    }
    /* Greedy batches: consecutive slices of one source while they fit. */
    uint64_t i = 0;
    while (!rc && i < ns) {
        struct batch b = {.o = o, .s0 = s0 + i, .ns = 1};
        uint64_t k0, k1;
        b.e = slice_elems(o, b.s0, &b.k0, &b.k1);
        b.s = &o->src[b.e];
        if (!batch_layout(&b) || b.in_bytes > ctx->in_cap || b.out_bytes > ctx->out_cap) {
            rc = -ENOTSUP; /* one slice does not fit a lane: the CPU takes it */
            break;
        }
        while (i + b.ns < ns) {
            struct batch nb = b;
            if (slice_elems(o, nb.s0 + nb.ns, &k0, &k1) != b.e || k0 != nb.k1)
                break;
            nb.ns++;
            nb.k1 = k1;
            if (!batch_layout(&nb) || nb.in_bytes > ctx->in_cap || nb.out_bytes > ctx->out_cap)
                break;
            b = nb;
        }
        rc = run_batch(ctx, l, &b, dst + i, flags & KN_DST_PINNED, sat);
        i += b.ns;
    }
    lane_put(ctx, l);
    if (!rc)
        atomic_fetch_add(&ctx->calls, 1);
    return rc;
}
