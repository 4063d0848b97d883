/* bench_dequant.c — CPU dequantization throughput at gpt-oss-20b's expert
 * shapes (gate_up Linear [5760, 2880], down [2880, 2880], NF4, blocksize
 * 64, double quant), into F16, with the fusing transpose (FUSE_T slices of
 * gate_up_proj/down_proj) and without it (the same weights as plain COPY
 * slices), on one thread and on all cores. Prints one table row per case in
 * GB/s of output. Not a test: it never fails on a timing.
 *   bench_dequant [DIR [EXPERTS [REPEATS]]]   (DIR: scratch, default /tmp) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#include "dequant.h"
#include "stw.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void add_weight(struct stw *w, const char *name, uint64_t rows, uint64_t cols)
{
    uint64_t n = rows * cols, nb = n / 64, nn = (nb + 255) / 256;
    uint8_t *nib = malloc(n), *au8 = malloc(nb);
    float *nabs = malloc(nn * 4), nmap[256];
    for (uint64_t k = 0; k < n; k++)
        nib[k] = (uint8_t)(rnd() & 15);
    for (uint64_t b = 0; b < nb; b++)
        au8[b] = (uint8_t)rnd();
    for (uint64_t i = 0; i < nn; i++)
        nabs[i] = 0.02f;
    for (int i = 0; i < 256; i++)
        nmap[i] = (float)(i - 128) / 128.0f;
    struct q4_spec s = {"nf4", 64, rows, cols, nib, NULL, 256, au8, nabs, nmap, 0.03f};
    stw_add_q4(w, name, &s);
    free(nib), free(au8), free(nabs);
}

struct run { const struct dq_out *o; uint8_t *buf; uint64_t slice_bytes; };

static int one(void *ctx, uint64_t s)
{
    struct run *r = ctx;
    uint64_t off, len;
    dq_out_slice_range(r->o, s, &off, &len);
    return dq_out_compute(r->o, s, r->buf + off, NULL);
}

static double bench(const struct dq_out *o, unsigned threads, int reps)
{
    /* 2 MiB-aligned, huge-page backed where the kernel allows: the fused
     * layout writes strided rows, and 4 KiB pages would thrash the TLB. */
    size_t sz = (o->nbytes + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
    struct run r = {o, aligned_alloc(2u << 20, sz), 0};
    if (getenv("BENCH_HUGE"))
        madvise(r.buf, sz, MADV_HUGEPAGE);
    double best = 1e30;
    for (int i = 0; i < reps; i++) {
        double t0 = now();
        if (dq_parallel_for(threads, o->nslices, one, &r) != 0) {
            fprintf(stderr, "compute failed\n");
            exit(1);
        }
        double t = now() - t0;
        if (t < best)
            best = t;
    }
    free(r.buf);
    return (double)o->nbytes / best / 1e9;
}

int main(int argc, char **argv)
{
    const char *base = argc > 1 ? argv[1] : "/tmp";
    unsigned E = argc > 2 ? (unsigned)atoi(argv[2]) : 4;
    int reps = argc > 3 ? atoi(argv[3]) : 3;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/bnbfs-bench-dq-%d", base, (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    if (system(cmd) != 0)
        return 1;
    /* experts (FUSE_T) and the same shapes as standalone weights (COPY) */
    struct stw *w = stw_new();
    char name[128];
    for (unsigned e = 0; e < E; e++) {
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.gate_up_projs.%u.weight", e);
        add_weight(w, name, getenv("BENCH_GATE_C") ? (uint64_t)atoi(getenv("BENCH_GATE_C")) : 5760, 2880);
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.down_projs.%u.weight", e);
        add_weight(w, name, 2880, 2880);
    }
    add_weight(w, "flat.gate_up.weight", 5760, 2880);
    add_weight(w, "flat.down.weight", 2880, 2880);
    if (stw_write(w, dir, "model.safetensors"))
        return 1;
    struct dq_ckpt *ck;
    struct dq_plan *p;
    uint64_t slice = 0; /* BENCH_SLICE: target slice bytes (default: the plan's) */
    if (getenv("BENCH_SLICE") && dq_parse_size(getenv("BENCH_SLICE"), &slice))
        return 2;
    if (dq_ckpt_open(dir, &ck) || dq_plan_build(ck, DQ_F16, slice, &p))
        return 1;
    const struct { const char *name, *label; } cases[] = {
        {"model.layers.0.mlp.experts.gate_up_proj", "gate_up, fused+transposed"},
        {"flat.gate_up.weight", "gate_up, plain (no transpose)"},
        {"model.layers.0.mlp.experts.down_proj", "down, fused+transposed"},
        {"flat.down.weight", "down, plain (no transpose)"},
    };
    unsigned all = dq_ncpus();
    printf("| case | simd | threads | GB/s F16 out | GB/s per thread |\n|---|---|---|---|---|\n");
    const char *only = getenv("BENCH_ONLY"); /* substring of a case label */
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        if (only && !strstr(cases[i].label, only))
            continue;
        const struct dq_out *o = dq_plan_find(p, cases[i].name);
        unsigned th[2] = {1, all};
        int nk = all > 1 ? 2 : 1;
        if (getenv("BENCH_THREADS")) /* one thread count only */
            th[0] = (unsigned)atoi(getenv("BENCH_THREADS")), nk = 1;
        for (int k = 0; k < nk; k++) {
            double g = bench(o, th[k], reps);
            printf("| %s | %s | %u | %.2f | %.2f |\n", cases[i].label, dq_simd_name(dq_simd_get()),
                   th[k], g, g / th[k]);
            fflush(stdout);
        }
    }
    dq_plan_free(p);
    dq_ckpt_close(ck);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : 1;
}
