/* bench_kn_dequant.c — GPU dequantization throughput (a benchmark, not a
 * test; tests/bench/bench_gpu_dequant.py runs it and appends its table to
 * tests/bench/RESULTS.md).
 *
 * Measures, on one device, with CUDA events, medians of several runs after
 * a warm-up, on random data (never zeros), buffers far larger than L2:
 *   - the card's device-to-device copy bandwidth (bytes read + written);
 *   - pinned host-to-device and device-to-host bandwidth;
 *   - each kernel's throughput, bytes read + written per second, and its
 *     fraction of the copy bandwidth: flat NF4 (double-quantized, bs 64,
 *     gpt-oss' format) to F16/BF16/F32, FUSE_T of gpt-oss-20b's expert
 *     shapes (gate_up C 5760 x R 2880, down 2880 x 2880), BF16 -> F16;
 *   - with --ckpt DIR: kn_ctx_compute over every GPU-computable output of a
 *     checkpoint, host memory to host memory, with --threads callers, next
 *     to the CPU (dq_out_compute on all cores), GB/s of output.
 * Prints "RESULT <key> <value>" lines for the script, then a table. With
 * --hash, also an XXH3 hash of each FUSE_T output (all experts of the last
 * timed run): the data is the same every run, so kernel variants can be
 * compared at these shapes (tests/gpu/fuse_t_session.sh).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "dequant.h"
#include "kernels.h"
#include "kn_prog.h"

#define CK(call) KN_PROG_CUDA(call)
#define OK(x)                                                                                 \
    do {                                                                                      \
        int r_ = (x);                                                                         \
        if (r_) {                                                                             \
            fprintf(stderr, "%s:%d: %s = %d\n", __FILE__, __LINE__, #x, r_);                  \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static uint64_t g_rng = 0x243f6a8885a308d3ull;
static uint64_t rnd(void) { return kn_prog_splitmix(&g_rng); }

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Device buffer of n random bytes (a host pattern tiled by device copies). */
static void *dev_random(size_t n)
{
    uint8_t *d, *h;
    size_t chunk = (size_t)64 << 20;
    CK(cudaMalloc((void **)&d, n));
    CK(cudaMallocHost((void **)&h, chunk));
    for (size_t i = 0; i + 8 <= chunk; i += 8) {
        uint64_t v = rnd();
        memcpy(h + i, &v, 8);
    }
    for (size_t off = 0; off < n; off += chunk)
        CK(cudaMemcpy(d + off, h, n - off < chunk ? n - off : chunk, cudaMemcpyHostToDevice));
    CK(cudaFreeHost(h));
    return d;
}

/* Device buffer of n BF16 values like weights: random signs, magnitudes
 * 2^-12 .. 4 (no NaN, no inf, never zero). */
static void *dev_bf16(size_t n)
{
    uint16_t *d, *h;
    size_t chunk = (size_t)32 << 20; /* elements */
    CK(cudaMalloc((void **)&d, n * 2));
    CK(cudaMallocHost((void **)&h, chunk * 2));
    for (size_t i = 0; i < chunk; i++) {
        uint64_t r = rnd();
        uint32_t e = 115 + (uint32_t)(r % 14), m = (uint32_t)(r >> 8) & 0x7f;
        h[i] = (uint16_t)(((r >> 20) & 1) << 15 | e << 7 | m);
    }
    for (size_t off = 0; off < n; off += chunk)
        CK(cudaMemcpy(d + off, h, (n - off < chunk ? n - off : chunk) * 2, cudaMemcpyHostToDevice));
    CK(cudaFreeHost(h));
    return d;
}

/* Median milliseconds of `reps` runs of fn (after 2 warm-ups). */
typedef void (*run_fn)(void *arg, cudaStream_t st);
static double time_ms(run_fn fn, void *arg, int reps)
{
    cudaStream_t st;
    cudaEvent_t a, b;
    CK(cudaStreamCreate(&st));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 2; i++)
        fn(arg, st);
    CK(cudaStreamSynchronize(st));
    double *ms = malloc((size_t)reps * sizeof *ms);
    for (int i = 0; i < reps; i++) {
        float m;
        CK(cudaEventRecord(a, st));
        fn(arg, st);
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&m, a, b));
        ms[i] = m;
    }
    CK(cudaGetLastError());
    qsort(ms, (size_t)reps, sizeof *ms, cmpd);
    double med = ms[reps / 2];
    free(ms);
    cudaEventDestroy(a), cudaEventDestroy(b), cudaStreamDestroy(st);
    return med;
}

/* ---------------------------------------------------------- copies */

struct copy_arg {
    void *dst;
    const void *src;
    size_t n;
    enum cudaMemcpyKind kind;
};

static void run_copy(void *p, cudaStream_t st)
{
    struct copy_arg *c = p;
    CK(cudaMemcpyAsync(c->dst, c->src, c->n, c->kind, st));
}

/* ---------------------------------------------------------- kernels */

struct flat_arg {
    struct kn_q4 q;
    uint64_t n;
    enum dq_dtype out;
    void *dst;
    struct kn_counters *cnt;
};

static void run_flat(void *p, cudaStream_t st)
{
    struct flat_arg *f = p;
    OK(kn_deq4_flat(&f->q, 0, f->n, f->out, f->dst, f->cnt, st));
}

struct fuse_arg {
    struct kn_q4 q;       /* codes/absmax of expert 0; experts follow at fixed strides */
    uint64_t C, R, E;
    enum dq_dtype out;
    uint8_t *dst;
    struct kn_counters *cnt;
};

/* One launch per expert (as the mount does), round-robin on 4 streams (as
 * its lanes do), forked from and joined back into st. */
#define FUSE_STREAMS 4
static cudaStream_t g_fs[FUSE_STREAMS];
static cudaEvent_t g_fork, g_join[FUSE_STREAMS];

static void run_fuse(void *p, cudaStream_t st)
{
    struct fuse_arg *f = p;
    size_t esz = dq_dtype_size(f->out);
    uint64_t numel = f->C * f->R, nb = numel / 64;
    CK(cudaEventRecord(g_fork, st));
    for (int i = 0; i < FUSE_STREAMS; i++)
        CK(cudaStreamWaitEvent(g_fs[i], g_fork, 0));
    for (uint64_t e = 0; e < f->E; e++) {
        struct kn_q4 q = f->q;
        q.codes += e * (numel / 2);
        q.absmax = (const uint8_t *)q.absmax + e * nb;
        q.nested_absmax += e * ((nb + 255) / 256);
        OK(kn_deq4_fuse_t(&q, f->C, f->R, 0, f->R, f->R / 2, 0, f->R, f->out,
                          f->dst + e * numel * esz, f->cnt, g_fs[e % FUSE_STREAMS]));
    }
    for (int i = 0; i < FUSE_STREAMS; i++) {
        CK(cudaEventRecord(g_join[i], g_fs[i]));
        CK(cudaStreamWaitEvent(st, g_join[i], 0));
    }
}

struct conv_arg {
    const void *src;
    uint64_t n;
    void *dst;
    struct kn_counters *cnt;
};

static void run_conv(void *p, cudaStream_t st)
{
    struct conv_arg *c = p;
    OK(kn_convert(DQ_BF16, c->src, c->n, DQ_F16, c->dst, c->cnt, st));
}

/* XXH3 of n device bytes, through the pinned buffer hp of hn bytes. */
static unsigned long long dev_hash(const void *d, size_t n, void *hp, size_t hn)
{
    XXH3_state_t *s = XXH3_createState();
    XXH3_64bits_reset(s);
    for (size_t off = 0; off < n; off += hn) {
        size_t len = n - off < hn ? n - off : hn;
        CK(cudaMemcpy(hp, (const uint8_t *)d + off, len, cudaMemcpyDeviceToHost));
        XXH3_64bits_update(s, hp, len);
    }
    unsigned long long h = XXH3_64bits_digest(s);
    XXH3_freeState(s);
    return h;
}

/* ------------------------------------------------- kn_ctx over a ckpt */

struct job {
    const struct dq_out *o;
    uint64_t s;       /* first slice */
    uint64_t ns;
};

struct ckpt_run {
    struct kn_ctx *ctx;
    struct job *jobs;
    size_t njobs;
    atomic_size_t next;
    uint8_t **bufs;   /* per thread: one batch of output */
    atomic_int err;
};

struct thr {
    struct ckpt_run *r;
    int id;
};

static void *ctx_worker(void *p)
{
    struct thr *t = p;
    struct ckpt_run *r = t->r;
    void *dst[4096];
    for (;;) {
        size_t j = atomic_fetch_add(&r->next, 1);
        if (j >= r->njobs)
            break;
        const struct job *jb = &r->jobs[j];
        uint64_t base, len;
        dq_out_slice_range(jb->o, jb->s, &base, &len);
        for (uint64_t i = 0; i < jb->ns; i++) {
            uint64_t off;
            dq_out_slice_range(jb->o, jb->s + i, &off, &len);
            dst[i] = r->bufs[t->id] + (off - base);
        }
        int rc = kn_ctx_compute(r->ctx, jb->o, jb->s, jb->ns, dst, 0, NULL);
        if (rc)
            atomic_store(&r->err, rc);
    }
    return NULL;
}

static void bench_ckpt(const char *dir, unsigned threads, unsigned lanes)
{
    struct dq_ckpt *ck;
    struct dq_plan *p;
    OK(dq_ckpt_open(dir, &ck));
    OK(dq_plan_build(ck, DQ_F16, 0, &p));
    struct kn_ctx_opts opts = {.device = -1, .nlanes = lanes, .lane_out_bytes = 40u << 20};
    struct ckpt_run r = {0};
    OK(kn_ctx_new(&opts, &r.ctx));
    /* jobs: one expert (all its slices) or up to 16 slices of a tensor */
    size_t cap = 1024;
    r.jobs = malloc(cap * sizeof *r.jobs);
    uint64_t total = 0, maxbatch = 0;
    for (size_t i = 0; i < p->nout; i++) {
        const struct dq_out *o = &p->out[i];
        if (!kn_out_supported(o))
            continue;
        uint64_t step = o->op == DQ_OP_COPY ? 16 : o->slices_per_src;
        for (uint64_t s = 0; s < o->nslices; s += step) {
            uint64_t ns = o->nslices - s < step ? o->nslices - s : step;
            if (r.njobs == cap)
                r.jobs = realloc(r.jobs, (cap *= 2) * sizeof *r.jobs);
            r.jobs[r.njobs++] = (struct job){o, s, ns};
            uint64_t a, la, b, lb;
            dq_out_slice_range(o, s, &a, &la);
            dq_out_slice_range(o, s + ns - 1, &b, &lb);
            total += b + lb - a;
            if (b + lb - a > maxbatch)
                maxbatch = b + lb - a;
        }
    }
    r.bufs = malloc(threads * sizeof *r.bufs);
    for (unsigned t = 0; t < threads; t++) {
        r.bufs[t] = malloc(maxbatch);
        memset(r.bufs[t], 1, maxbatch); /* fault the pages in before timing */
    }
    pthread_t th[256];
    struct thr ta[256];
    double t0 = now();
    for (unsigned t = 0; t < threads; t++) {
        ta[t] = (struct thr){&r, (int)t};
        pthread_create(&th[t], NULL, ctx_worker, &ta[t]);
    }
    for (unsigned t = 0; t < threads; t++)
        pthread_join(th[t], NULL);
    double gpu_s = now() - t0;
    if (atomic_load(&r.err))
        fprintf(stderr, "kn_ctx_compute failed: %d\n", atomic_load(&r.err));
    /* CPU: the same outputs with dq_out_compute_range on all cores, one
     * expert or 16 slices at a time (same jobs) */
    uint8_t *buf = malloc(maxbatch);
    memset(buf, 1, maxbatch);
    double t1 = now();
    for (size_t j = 0; j < r.njobs; j++) {
        uint64_t a, la, b, lb;
        dq_out_slice_range(r.jobs[j].o, r.jobs[j].s, &a, &la);
        dq_out_slice_range(r.jobs[j].o, r.jobs[j].s + r.jobs[j].ns - 1, &b, &lb);
        OK(dq_out_compute_range(r.jobs[j].o, a, b + lb - a, buf, 0, NULL));
    }
    double cpu_s = now() - t1;
    printf("RESULT ckpt_bytes %.0f\n", (double)total);
    printf("RESULT ctx_gbs %.2f\n", total / gpu_s / 1e9);
    printf("RESULT ctx_threads %u\n", threads);
    printf("RESULT ctx_lanes %u\n", lanes);
    printf("RESULT cpu_gbs %.2f\n", total / cpu_s / 1e9);
    printf("RESULT cpu_threads %u\n", dq_ncpus());
    fprintf(stderr, "ckpt %s: %.2f GB of F16 output: kn_ctx %u threads %.2f GB/s, CPU %u cores "
            "%.2f GB/s\n", dir, total / 1e9, threads, total / gpu_s / 1e9, dq_ncpus(),
            total / cpu_s / 1e9);
    for (unsigned t = 0; t < threads; t++)
        free(r.bufs[t]);
    free(r.bufs), free(r.jobs), free(buf);
    kn_ctx_free(r.ctx);
    dq_plan_free(p);
    dq_ckpt_close(ck);
}

/* -------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    const char *ckpt = NULL;
    unsigned threads = 8, lanes = 4;
    int hash = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ckpt") && i + 1 < argc)
            ckpt = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--lanes") && i + 1 < argc)
            lanes = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hash"))
            hash = 1;
        else {
            fprintf(stderr, "usage: %s [--ckpt DIR] [--threads N] [--lanes N] [--hash]\n", argv[0]);
            return 2;
        }
    }
    if (threads < 1 || threads > 256)
        threads = 8;
    int ndev = 0;
    char why[256];
    kn_device_count(&ndev, why, sizeof why);
    if (!ndev) {
        printf("no GPU: %s\n", why);
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("RESULT device %s\n", prop.name);
    const int reps = 20;

    /* copies */
    const size_t big = (size_t)1 << 30;
    void *da = dev_random(big), *db;
    CK(cudaMalloc(&db, big));
    struct copy_arg cp = {db, da, big, cudaMemcpyDeviceToDevice};
    double d2d = 2.0 * big / (time_ms(run_copy, &cp, reps) * 1e-3) / 1e9;
    void *hp;
    const size_t hn = (size_t)256 << 20;
    CK(cudaMallocHost(&hp, hn));
    memset(hp, 0x5c, hn);
    struct copy_arg h2d = {da, hp, hn, cudaMemcpyHostToDevice};
    struct copy_arg d2h = {hp, da, hn, cudaMemcpyDeviceToHost};
    double up = hn / (time_ms(run_copy, &h2d, reps) * 1e-3) / 1e9;
    double down = hn / (time_ms(run_copy, &d2h, reps) * 1e-3) / 1e9;
    printf("RESULT d2d_gbs %.1f\nRESULT h2d_gbs %.1f\nRESULT d2h_gbs %.1f\n", d2d, up, down);

    /* flat NF4, nested, bs 64: 2^29 elements */
    struct kn_counters *cnt;
    CK(cudaMalloc((void **)&cnt, sizeof *cnt));
    OK(kn_counters_reset(cnt, NULL));
    const uint64_t n = (uint64_t)1 << 29, nb = n / 64, nn = (nb + 255) / 256;
    uint8_t *codes = dev_random(n / 2), *am = dev_random(nb);
    float *nabs, *nmap, hm[256], *hna = malloc(nn * 4);
    for (int i = 0; i < 256; i++)
        hm[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
    for (uint64_t i = 0; i < nn; i++)
        hna[i] = 0.5f + (float)(rnd() % 1000) / 1000.0f;
    CK(cudaMalloc((void **)&nmap, 1024));
    CK(cudaMalloc((void **)&nabs, nn * 4));
    CK(cudaMemcpy(nmap, hm, 1024, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(nabs, hna, nn * 4, cudaMemcpyHostToDevice));
    free(hna);
    struct kn_q4 q = {.qtype = DQ_NF4, .blocksize = 64, .codes = codes, .nested = true,
                      .absmax = am, .nested_blocksize = 256, .nested_offset = 0.03f,
                      .nested_absmax = nabs, .nested_map = nmap};
    void *out;
    CK(cudaMalloc(&out, n * 4));
    CK(cudaEventCreateWithFlags(&g_fork, cudaEventDisableTiming));
    for (int i = 0; i < FUSE_STREAMS; i++) {
        CK(cudaStreamCreateWithFlags(&g_fs[i], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&g_join[i], cudaEventDisableTiming));
    }
    static const enum dq_dtype outs[3] = {DQ_F16, DQ_BF16, DQ_F32};
    static const char *const oname[3] = {"f16", "bf16", "f32"};
    static const uint64_t shapes[2][2] = {{5760, 2880}, {2880, 2880}};
    static const char *const sname[2] = {"gate_up", "down"};
    double flat_gbs[3], fuse_gbs[2][3], conv;
    const double in_bytes = n / 2.0 + nb + nn * 4.0;
    void *bf = dev_bf16(big / 2);
    for (int o = 0; o < 3; o++) {
        struct flat_arg fa = {q, n, outs[o], out, cnt};
        double ms = time_ms(run_flat, &fa, reps);
        flat_gbs[o] = (in_bytes + (double)n * dq_dtype_size(outs[o])) / (ms * 1e-3) / 1e9;
        printf("RESULT flat_nf4_%s_gbs %.1f\n", oname[o], flat_gbs[o]);
    }
    /* FUSE_T, gpt-oss-20b expert shapes, as many experts as fit in 2^29 */
    for (int s = 0; s < 2; s++) {
        uint64_t C = shapes[s][0], R = shapes[s][1], E = n / (C * R);
        for (int o = 0; o < 3; o++) {
            struct fuse_arg fa = {q, C, R, E, outs[o], out, cnt};
            double ms = time_ms(run_fuse, &fa, reps);
            uint64_t el = C * R, bl = el / 64; /* per expert */
            double bytes = (double)E * (el / 2.0 + bl + ((bl + 255) / 256) * 4.0 +
                                        (double)el * dq_dtype_size(outs[o]));
            fuse_gbs[s][o] = bytes / (ms * 1e-3) / 1e9;
            printf("RESULT fuse_%s_%s_gbs %.1f\n", sname[s], oname[o], fuse_gbs[s][o]);
            if (hash)
                printf("RESULT fuse_%s_%s_xxh3 %016llx\n", sname[s], oname[o],
                       dev_hash(out, E * el * dq_dtype_size(outs[o]), hp, hn));
        }
    }
    /* BF16 -> F16, weight-like values */
    struct conv_arg ca = {bf, (uint64_t)big / 2, db, cnt};
    conv = 2.0 * big / (time_ms(run_conv, &ca, reps) * 1e-3) / 1e9;
    printf("RESULT convert_bf16_f16_gbs %.1f\n", conv);
    cudaFree(bf);
    struct kn_counters hc;
    CK(cudaMemcpy(&hc, cnt, sizeof hc, cudaMemcpyDeviceToHost));
    if (hc.bad_scales)
        fprintf(stderr, "note: %llu non-finite scales in the random data\n", hc.bad_scales);

    printf("\n%s: device-to-device copy %.0f GB/s (read + written), pinned H2D %.1f GB/s, "
           "D2H %.1f GB/s\n", prop.name, d2d, up, down);
    printf("%-34s %10s %8s\n", "kernel (bytes read + written)", "GB/s", "of copy");
    for (int o = 0; o < 3; o++) {
        char lbl[64];
        snprintf(lbl, sizeof lbl, "flat nf4 bs64 nested -> %s", oname[o]);
        printf("%-34s %10.0f %7.0f%%\n", lbl, flat_gbs[o], 100 * flat_gbs[o] / d2d);
    }
    for (int s = 0; s < 2; s++)
        for (int o = 0; o < 3; o++) {
            char lbl[64];
            snprintf(lbl, sizeof lbl, "fuse_t %s -> %s", sname[s], oname[o]);
            printf("%-34s %10.0f %7.0f%%\n", lbl, fuse_gbs[s][o], 100 * fuse_gbs[s][o] / d2d);
        }
    printf("%-34s %10.0f %7.0f%%\n", "convert bf16 -> f16", conv, 100 * conv / d2d);
    printf("(flat: one launch over 2^29 elements; fuse_t: one launch per expert, on 4 streams, "
           "all experts that fit in 2^29 elements; medians of %d)\n", reps);
    cudaFree(da), cudaFree(db), cudaFree(out), cudaFree(codes), cudaFree(am), cudaFree(nabs);
    cudaFree(nmap), cudaFree(cnt), cudaFreeHost(hp);
    if (ckpt)
        bench_ckpt(ckpt, threads, lanes);
    return 0;
}
