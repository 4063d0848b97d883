/* test_kn_dequant.c — the GPU dequantization (kernels/kernels.h) against the
 * CPU reference (dequant/), bit for bit, on random data (never zeros):
 *   - ops on device memory: kn_deq4_flat over odd starts, tails and
 *     unaligned outputs; kn_deq4_fuse_t over whole weights and pitched
 *     column bands, aligned and not, odd R and C; kn_convert over every
 *     F16 and BF16 bit pattern, a sweep of F32 patterns and F64 specials;
 *   - kn_ctx_compute over every output of generated checkpoints, for every
 *     format (nf4/fp4, double-quantized or not), blocksize 32..4096, output
 *     dtype (f16/bf16/f32) and several slicings (aligned, odd starts, rows
 *     not multiples of 32), in whole-tensor, per-slice and random batches,
 *     through roomy lanes and lanes small enough to split batches;
 *   - the error contract: non-finite scales and a wrong quant_map give -EIO
 *     with a log line naming the tensor, a changed source -ESTALE, bad
 *     arguments -ERANGE/-ENOTSUP/-ENODEV.
 * Every output buffer is poisoned before each run, and compared past its
 * end, so an unwritten or overwritten element fails. Saturation counts are
 * compared too.
 *
 * With no GPU (CI) it prints "no GPU: <why>" and exits 77, meson's skip.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "dequant.h"
#include "kernels.h"
#include "kn_prog.h"
#include "stw.h"
#include "tu.h"

/* ------------------------------------------------------------- helpers */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { return kn_prog_splitmix(&g_rng); }

static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() >> 40) / 16777216.0f; }

#define CUDA_OK(call) KN_PROG_CUDA(call)

static const enum dq_dtype OUTS[3] = {DQ_F16, DQ_BF16, DQ_F32};

/* First differing element of two buffers of esz-byte elements, or -1. */
static long long first_diff(const void *a, const void *b, size_t n, size_t esz)
{
    const uint8_t *x = a, *y = b;
    if (memcmp(x, y, n * esz) == 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (memcmp(x + i * esz, y + i * esz, esz))
            return (long long)i;
    return -1;
}

static unsigned long long elem_bits(const void *p, size_t i, size_t esz)
{
    unsigned long long v = 0;
    memcpy(&v, (const uint8_t *)p + i * esz, esz);
    return v;
}

/* Reports a mismatch once per context with the element and both values. */
static bool same(const char *what, const void *gpu, const void *ref, size_t n, size_t esz)
{
    long long d = first_diff(gpu, ref, n, esz);
    if (d < 0)
        return true;
    tu_failures++;
    fprintf(stderr, "FAIL %s: %s: element %lld of %zu: gpu 0x%llx, cpu 0x%llx\n", tu_current, what,
            d, n, elem_bits(gpu, (size_t)d, esz), elem_bits(ref, (size_t)d, esz));
    return false;
}

/* ------------------------------------------------------- checkpoints */

struct fmt {
    const char *qtype;   /* "nf4" | "fp4" */
    uint32_t bs;         /* blocksize */
    uint32_t nested_bs;  /* 0: plain F32 absmax */
};

enum flavor { NORMAL, SATURATING, NAN_SCALE };

/* A random 4-bit weight [rows, cols] (random codes, scales far from 0).
 * SATURATING puts scales past F16's range (and one near FLT_MAX when not
 * nested, past BF16's); NAN_SCALE makes block 3's scale NaN. */
static void add_q4(struct stw *w, const char *name, uint64_t rows, uint64_t cols,
                   const struct fmt *f, enum flavor fl)
{
    uint64_t n = rows * cols, nb = (n + f->bs - 1) / f->bs;
    uint8_t *nib = malloc(n), *u8 = malloc(nb);
    float *absmax = malloc(nb * sizeof *absmax);
    uint32_t nbs = f->nested_bs ? f->nested_bs : 256;
    uint64_t nn = (nb + nbs - 1) / nbs;
    float *nabs = malloc(nn * sizeof *nabs), map[256];
    for (uint64_t k = 0; k < n; k++)
        nib[k] = (uint8_t)(rnd() & 15);
    for (uint64_t b = 0; b < nb; b++) {
        absmax[b] = frand(0.25f, 4.0f);
        u8[b] = (uint8_t)rnd();
    }
    for (uint64_t j = 0; j < nn; j++)
        nabs[j] = frand(0.5f, 2.0f);
    for (int i = 0; i < 256; i++)
        map[i] = frand(-1.0f, 1.0f);
    map[255] = 1.0f;
    if (fl == SATURATING) {
        nabs[0] = 70000.0f; /* |map| near 1: past 65504 in f16 */
        for (uint64_t b = 1; b < nb; b += 3)
            absmax[b] = frand(6.0e4f, 2.0e5f);
        if (nb > 2)
            absmax[2] = 3.4e38f; /* past BF16's 3.3961e38 after rounding */
        for (uint64_t b = 0; b < nb && b < 8; b++)
            u8[b] = 255;         /* map 1.0 */
    } else if (fl == NAN_SCALE) {
        absmax[3 < nb ? 3 : 0] = NAN;
        nabs[nn - 1] = NAN;
    }
    struct q4_spec s = {
        .qtype = f->qtype, .blocksize = f->bs, .rows = rows, .cols = cols, .nibbles = nib,
        .absmax = absmax, .nested_bs = f->nested_bs, .absmax_u8 = u8, .nested_absmax = nabs,
        .nested_map = map, .nested_offset = frand(0.01f, 0.1f),
    };
    stw_add_q4(w, name, &s);
    free(nib), free(u8), free(absmax), free(nabs);
}

/* Plain float tensors: random values plus the awkward ones (NaN with
 * payloads, inf, -0, subnormals, values around every saturation edge). */
static void add_plain(struct stw *w, const char *name, const char *dt, uint64_t n)
{
    static const uint32_t f32s[] = {0x7fc00001, 0xffa00000, 0x7f800001, 0x7f800000, 0xff800000,
                                    0x80000000, 0x00000001, 0x807fffff, 0x477fefff, 0x477ff000,
                                    0xc77ff000, 0x7f7f7fff, 0x7f7f8000, 0xff7fffff, 0x33000000,
                                    0x33000001, 0x387fc000, 0x38800000};
    static const uint16_t h16[] = {0x7c01, 0xfe00, 0x7c00, 0xfc00, 0x8000, 0x0001, 0x83ff, 0x7bff};
    static const uint16_t b16[] = {0x7f81, 0xffc1, 0x7f80, 0x7f7f, 0x477f, 0x4780, 0x8001, 0xc780};
    static const uint64_t f64s[] = {0x7ff8000000000001ull, 0xfff4000000000000ull,
                                    0x7ff0000000000000ull, 0x47efffffe0000000ull,
                                    0x47efffffffffffffull, 0x47f0000000000000ull,
                                    0xc7efffffe0000001ull, 0x0000000000000001ull,
                                    0x36a0000000000001ull, 0x40effe0000000000ull,
                                    0x40effe0000000001ull, 0x3ff0000010000000ull};
    size_t esz = !strcmp(dt, "F64") ? 8 : !strcmp(dt, "F32") ? 4 : 2;
    uint8_t *d = malloc(n * esz);
    for (uint64_t i = 0; i < n; i++) {
        if (esz == 8) {
            double v = (double)frand(-3.0f, 3.0f) * (1.0 + ldexp((double)(rnd() & 0xffff), -40));
            if (i % 7 == 3)
                v = ldexp(v, (int)(rnd() % 300) - 150);
            memcpy(d + 8 * i, &v, 8);
        } else if (esz == 4) {
            float v = frand(-3.0f, 3.0f);
            if (i % 7 == 3)
                v = ldexpf(v, (int)(rnd() % 250) - 125);
            memcpy(d + 4 * i, &v, 4);
        } else {
            uint16_t v = (uint16_t)rnd();
            memcpy(d + 2 * i, &v, 2);
        }
    }
    for (uint64_t i = 0; i < n; i += 5) {
        size_t j = (size_t)(i / 5);
        if (esz == 8 && j < sizeof f64s / sizeof *f64s)
            memcpy(d + 8 * i, &f64s[j], 8);
        else if (esz == 4 && j < sizeof f32s / sizeof *f32s)
            memcpy(d + 4 * i, &f32s[j], 4);
        else if (esz == 2 && !strcmp(dt, "F16") && j < sizeof h16 / sizeof *h16)
            memcpy(d + 2 * i, &h16[j], 2);
        else if (esz == 2 && !strcmp(dt, "BF16") && j < sizeof b16 / sizeof *b16)
            memcpy(d + 2 * i, &b16[j], 2);
    }
    uint64_t sh[1] = {n};
    stw_add(w, name, dt, 1, sh, d, n * esz);
    free(d);
}

/* A small Unsloth-layout checkpoint of one 4-bit format: COPY weights with
 * rows that are not multiples of the block (and one that saturates), expert
 * groups with R a multiple of 32 (vector paths) and odd R and C (generic
 * paths), odd expert counts, STACK biases and plain float tensors. */
static void make_ckpt(const char *dir, const struct fmt *f, enum flavor fl)
{
    struct stw *w = stw_new();
    char name[256];
    add_q4(w, "model.layers.0.self_attn.q_proj.weight", 37, 91, f, fl == NAN_SCALE ? NAN_SCALE : NORMAL);
    add_q4(w, "model.layers.0.self_attn.o_proj.weight", 160, 256, f, SATURATING);
    for (int e = 0; e < 3; e++) {
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.gate_up_projs.%d.weight", e);
        add_q4(w, name, 72, 96, f, NORMAL);
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.gate_up_projs.%d.bias", e);
        add_plain(w, name, "BF16", 72);
    }
    for (int e = 0; e < 5; e++) {
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.down_projs.%d.weight", e);
        add_q4(w, name, 45, 77, f, NORMAL);
    }
    for (int e = 0; e < 2; e++) {
        snprintf(name, sizeof name, "model.layers.1.mlp.experts.gate_up_projs.%d.weight", e);
        add_q4(w, name, 288, 320, f, e == 1 ? SATURATING : NORMAL);
    }
    add_plain(w, "model.embed_tokens.weight", "BF16", 6000);
    add_plain(w, "model.norm.weight", "F32", 333);
    add_plain(w, "model.layers.0.input_layernorm.weight", "F16", 129);
    add_plain(w, "model.layers.0.self_attn.sinks", "F64", 77);
    if (stw_write(w, dir, "model.safetensors")) {
        fprintf(stderr, "cannot write %s/model.safetensors\n", dir);
        exit(2);
    }
}

/* ----------------------------------------------- kn_ctx vs dq_out_compute */

static struct kn_ctx *g_big, *g_small; /* roomy lanes; 64 KiB lanes that split batches */
#define SMALL_CAP (64u << 10)

/* CPU reference of a whole output, slice by slice. */
static uint8_t *cpu_out(const struct dq_out *o, uint64_t *sat)
{
    uint8_t *ref = malloc(o->nbytes + 64);
    struct dq_sat s = {0};
    for (uint64_t i = 0; i < o->nslices; i++) {
        uint64_t off, len;
        dq_out_slice_range(o, i, &off, &len);
        int rc = dq_out_compute(o, i, ref + off, &s);
        if (rc) {
            fprintf(stderr, "FAIL %s: CPU reference failed on %s slice %llu: %d\n", tu_current,
                    o->name, (unsigned long long)i, rc);
            tu_failures++;
        }
    }
    *sat = s.count;
    return ref;
}

/* GPU slices [s0, s0+ns) into buf (the whole tensor's layout), poisoned
 * with `poison` first. Returns kn_ctx_compute's result. */
static int gpu_run(struct kn_ctx *ctx, const struct dq_out *o, uint64_t s0, uint64_t ns,
                   uint8_t *buf, int poison, uint64_t *sat)
{
    memset(buf, poison, o->nbytes + 64);
    void **dst = malloc(ns * sizeof *dst);
    for (uint64_t i = 0; i < ns; i++) {
        uint64_t off, len;
        dq_out_slice_range(o, s0 + i, &off, &len);
        dst[i] = buf + off;
    }
    struct dq_sat s = {0};
    int rc = kn_ctx_compute(ctx, o, s0, ns, dst, 0, &s);
    free(dst);
    *sat = s.count;
    return rc;
}

static uint64_t slices_bytes(const struct dq_out *o, uint64_t s0, uint64_t ns, uint64_t *off)
{
    uint64_t o0, l0, o1, l1;
    dq_out_slice_range(o, s0, &o0, &l0);
    dq_out_slice_range(o, s0 + ns - 1, &o1, &l1);
    *off = o0;
    return o1 + l1 - o0;
}

/* Sat count of slices [s0, s0+ns) on the CPU. */
static uint64_t cpu_sat(const struct dq_out *o, uint64_t s0, uint64_t ns)
{
    uint8_t *tmp = malloc(o->nbytes + 64);
    struct dq_sat s = {0};
    for (uint64_t i = s0; i < s0 + ns; i++) {
        uint64_t off, len;
        dq_out_slice_range(o, i, &off, &len);
        dq_out_compute(o, i, tmp + off, &s);
    }
    free(tmp);
    return s.count;
}

/* One GPU run of [s0, s0+ns) compared with the reference: the slices
 * bit-identical, everything else still the poison, same saturation. */
static void check_run(struct kn_ctx *ctx, const struct dq_out *o, const uint8_t *ref,
                      uint64_t s0, uint64_t ns, int poison, const char *what)
{
    uint8_t *buf = malloc(o->nbytes + 64), *want = malloc(o->nbytes + 64);
    uint64_t gsat = 0;
    int rc = gpu_run(ctx, o, s0, ns, buf, poison, &gsat);
    uint64_t off, len = slices_bytes(o, s0, ns, &off);
    bool too_big = false;
    if (ctx == g_small)
        for (uint64_t i = s0; i < s0 + ns; i++) {
            uint64_t so, sl;
            dq_out_slice_range(o, i, &so, &sl);
            too_big |= sl > SMALL_CAP;
        }
    char ctxt[512];
    snprintf(ctxt, sizeof ctxt, "%s %s slices [%llu, +%llu) of %llu (%s lanes)", what, o->name,
             (unsigned long long)s0, (unsigned long long)ns, (unsigned long long)o->nslices,
             ctx == g_small ? "small" : "big");
    if (too_big) {
        if (rc != -ENOTSUP) {
            tu_failures++;
            fprintf(stderr, "FAIL %s: %s: a slice larger than the lane gave %d, not -ENOTSUP\n",
                    tu_current, ctxt, rc);
        }
    } else if (rc != 0) {
        tu_failures++;
        fprintf(stderr, "FAIL %s: %s: kn_ctx_compute = %d\n", tu_current, ctxt, rc);
    } else {
        memset(want, poison, o->nbytes + 64);
        memcpy(want + off, ref + off, len);
        size_t esz = dq_dtype_size(o->dtype);
        same(ctxt, buf, want, (o->nbytes + 64) / esz, esz);
        uint64_t csat = cpu_sat(o, s0, ns);
        if (gsat != csat) {
            tu_failures++;
            fprintf(stderr, "FAIL %s: %s: saturated gpu %llu cpu %llu\n", tu_current, ctxt,
                    (unsigned long long)gsat, (unsigned long long)csat);
        }
    }
    free(buf);
    free(want);
}

static uint64_t g_compared, g_unsupported;

static void check_plan(struct dq_plan *p)
{
    for (size_t i = 0; i < p->nout; i++) {
        const struct dq_out *o = &p->out[i];
        if (!kn_out_supported(o)) {
            /* only identity copies (plain source already in the output
             * dtype) are left to the CPU's memcpy */
            CHECK(o->src[0].q == NULL && o->src[0].t->dtype == o->dtype);
            void *d = malloc(o->nbytes + 64);
            CHECK(kn_ctx_compute(g_big, o, 0, 1, &d, 0, NULL) == -ENOTSUP);
            free(d);
            g_unsupported++;
            continue;
        }
        uint64_t rsat;
        uint8_t *ref = cpu_out(o, &rsat);
        /* whole tensor in one call, twice with different poisons */
        check_run(g_big, o, ref, 0, o->nslices, 0xa5, "all");
        check_run(g_big, o, ref, 0, o->nslices, 0x5a, "all");
        /* slice by slice: all of them, or the first, the last and 10 others */
        for (uint64_t k = 0; k < o->nslices && k < 12; k++) {
            uint64_t s = o->nslices <= 12 ? k : k == 0 ? 0 : k == 1 ? o->nslices - 1
                                                : rnd() % o->nslices;
            check_run(g_big, o, ref, s, 1, 0xc3, "one");
        }
        /* random batches, including ones that start and end mid-expert */
        for (int k = 0; k < 3; k++) {
            uint64_t s0 = rnd() % o->nslices, ns = 1 + rnd() % (o->nslices - s0);
            check_run(g_big, o, ref, s0, ns, 0x3c, "batch");
            check_run(g_small, o, ref, s0, ns, 0x96, "batch");
        }
        check_run(g_small, o, ref, 0, o->nslices, 0x69, "all");
        free(ref);
        g_compared++;
    }
}

static const uint32_t BLOCKSIZES[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
/* target slice bytes: default (about 2 MiB), 4 KiB, and sizes giving odd or
 * unaligned starts and FUSE_T slices of a few rows */
static const uint64_t SLICINGS[] = {0, 4096, 600, 1002, 24576};

static void test_ctx_formats(void)
{
    for (int qt = 0; qt < 2; qt++)
        for (int nested = 0; nested < 2; nested++)
            for (size_t bi = 0; bi < sizeof BLOCKSIZES / sizeof *BLOCKSIZES; bi++) {
                struct fmt f = {qt ? "fp4" : "nf4", BLOCKSIZES[bi], nested ? 256 : 0};
                if (nested && bi % 3 == 1)
                    f.nested_bs = 64; /* other nested block sizes too */
                const char *dir = tu_tmpdir();
                make_ckpt(dir, &f, NORMAL);
                struct dq_ckpt *ck;
                CHECK(dq_ckpt_open(dir, &ck) == 0);
                for (int d = 0; d < 3; d++)
                    for (size_t si = 0; si < sizeof SLICINGS / sizeof *SLICINGS; si++) {
                        /* every slicing for f16; two per other dtype (time) */
                        if (d && si % 2 == (size_t)d - 1)
                            continue;
                        struct dq_plan *p;
                        CHECK(dq_plan_build(ck, OUTS[d], SLICINGS[si], &p) == 0);
                        check_plan(p);
                        dq_plan_free(p);
                    }
                dq_ckpt_close(ck);
                fprintf(stderr, "  %s bs=%u nested=%u: %llu outputs compared so far\n", f.qtype,
                        f.bs, f.nested_bs, (unsigned long long)g_compared);
            }
    CHECK(g_compared > 0);
}

/* ------------------------------------------------------ ops on device */

struct dev_q4 {
    struct kn_q4 kq;
    const struct dq_qstate *q;
    void *bufs[4];
};

/* Uploads a whole 4-bit weight (codes, absmax, nested) as stored. */
static void upload_q4(const struct dq_qstate *q, struct dev_q4 *d)
{
    memset(d, 0, sizeof *d);
    d->q = q;
    const struct dq_tensor *ts[3] = {q->codes, q->absmax, q->nested ? q->nested_absmax : NULL};
    for (int i = 0; i < 3 && ts[i]; i++) {
        CUDA_OK(cudaMalloc(&d->bufs[i], ts[i]->nbytes));
        CUDA_OK(cudaMemcpy(d->bufs[i], ts[i]->file->map + ts[i]->offset, ts[i]->nbytes,
                           cudaMemcpyHostToDevice));
    }
    d->kq = (struct kn_q4){.qtype = q->qtype, .blocksize = q->blocksize, .codes = d->bufs[0],
                           .nested = q->nested, .absmax = d->bufs[1]};
    if (q->nested) {
        CUDA_OK(cudaMalloc(&d->bufs[3], 1024));
        CUDA_OK(cudaMemcpy(d->bufs[3], q->nested_quant_map->file->map + q->nested_quant_map->offset,
                           1024, cudaMemcpyHostToDevice));
        d->kq.nested_blocksize = q->nested_blocksize;
        d->kq.nested_offset = q->nested_offset;
        d->kq.nested_absmax = d->bufs[2];
        d->kq.nested_map = d->bufs[3];
    }
}

static void free_q4(struct dev_q4 *d)
{
    for (int i = 0; i < 4; i++)
        cudaFree(d->bufs[i]);
}

/* CPU: the whole weight, flat, in dtype out. */
static uint8_t *cpu_flat(const struct dq_qstate *q, enum dq_dtype out, uint64_t *sat)
{
    float *a = malloc(q->nblocks * sizeof *a);
    CHECK(dq_qstate_scales(q, 0, q->nblocks, a) == 0);
    uint8_t *w = malloc(q->numel * dq_dtype_size(out));
    struct dq_sat s = {0};
    dq_deq4_span(q->qtype, q->codes->file->map + q->codes->offset, 0, q->numel, a, q->blocksize,
                 out, w, &s);
    free(a);
    if (sat)
        *sat = s.count;
    return w;
}

static uint64_t read_sat(struct kn_counters *dc)
{
    struct kn_counters c;
    CUDA_OK(cudaMemcpy(&c, dc, sizeof c, cudaMemcpyDeviceToHost));
    CHECK(c.bad_scales == 0);
    return c.saturated;
}

/* kn_deq4_flat on [k0, k0+n) into an output at element offset `shift`
 * (1 = unaligned): compared with the CPU, poison checked around it. */
static void flat_case(struct dev_q4 *d, enum dq_dtype out, uint64_t k0, uint64_t n, int shift,
                      const uint8_t *ref, struct kn_counters *dc, uint8_t *dout)
{
    const struct dq_qstate *q = d->q;
    size_t esz = dq_dtype_size(out), tot = (q->numel + 16) * esz;
    CUDA_OK(cudaMemset(dout, 0xa5, tot));
    CHECK(kn_counters_reset(dc, NULL) == 0);
    CHECK(kn_deq4_flat(&d->kq, k0, n, out, dout + shift * esz, dc, NULL) == 0);
    CUDA_OK(cudaDeviceSynchronize());
    uint8_t *got = malloc(tot), *want = malloc(tot);
    CUDA_OK(cudaMemcpy(got, dout, tot, cudaMemcpyDeviceToHost));
    memset(want, 0xa5, tot);
    memcpy(want + shift * esz, ref + k0 * esz, n * esz);
    char what[160];
    snprintf(what, sizeof what, "flat %s [%llu, +%llu) shift %d", dq_dtype_name(out),
             (unsigned long long)k0, (unsigned long long)n, shift);
    same(what, got, want, tot / esz, esz);
    /* saturation of exactly this range */
    float *a = malloc(q->nblocks * sizeof *a);
    dq_qstate_scales(q, 0, q->nblocks, a);
    struct dq_sat s = {0};
    dq_deq4_span(q->qtype, q->codes->file->map + q->codes->offset, k0, n, a + k0 / q->blocksize,
                 q->blocksize, out, want, &s);
    CHECK_EQ_U64(read_sat(dc), s.count);
    free(a), free(got), free(want);
}

/* Host gather of a pitched band, as kernels.h describes the layout. */
static uint8_t *gather_band(const struct dq_qstate *q, uint64_t C, uint64_t R, uint64_t rb,
                            uint64_t re, uint64_t pitch)
{
    const uint8_t *codes = q->codes->file->map + q->codes->offset;
    uint8_t *b = malloc(C * pitch);
    memset(b, 0xee, C * pitch);
    for (uint64_t c = 0; c < C; c++) {
        uint64_t lo = (c * R + rb) >> 1, hi = (c * R + re - 1) >> 1;
        memcpy(b + c * pitch, codes + lo, hi - lo + 1);
    }
    return b;
}

static void fuse_case(struct dev_q4 *d, enum dq_dtype out, uint64_t rb, uint64_t re,
                      uint64_t pitch, uint64_t r0, uint64_t r1, int shift, const uint8_t *flat,
                      struct kn_counters *dc, uint8_t *dout)
{
    const struct dq_qstate *q = d->q;
    const uint64_t C = q->shape[0], R = q->shape[1];
    size_t esz = dq_dtype_size(out), tot = (q->numel + 16) * esz;
    struct kn_q4 kq = d->kq;
    void *band = NULL;
    if (!(rb == 0 && re == R && pitch * 2 == R)) {
        uint8_t *h = gather_band(q, C, R, rb, re, pitch);
        CUDA_OK(cudaMalloc(&band, C * pitch));
        CUDA_OK(cudaMemcpy(band, h, C * pitch, cudaMemcpyHostToDevice));
        free(h);
        kq.codes = band;
    }
    CUDA_OK(cudaMemset(dout, 0x5a, tot));
    CHECK(kn_counters_reset(dc, NULL) == 0);
    CHECK(kn_deq4_fuse_t(&kq, C, R, rb, re, pitch, r0, r1, out, dout + shift * esz, dc, NULL) == 0);
    CUDA_OK(cudaDeviceSynchronize());
    uint8_t *got = malloc(tot), *want = malloc(tot);
    CUDA_OK(cudaMemcpy(got, dout, tot, cudaMemcpyDeviceToHost));
    memset(want, 0x5a, tot);
    for (uint64_t r = r0; r < r1; r++)
        for (uint64_t c = 0; c < C; c++)
            memcpy(want + (shift + (r - r0) * C + c) * esz, flat + (c * R + r) * esz, esz);
    char what[200];
    snprintf(what, sizeof what, "fuse_t %s C %llu R %llu band [%llu, %llu) pitch %llu rows "
             "[%llu, %llu) shift %d", dq_dtype_name(out), (unsigned long long)C,
             (unsigned long long)R, (unsigned long long)rb, (unsigned long long)re,
             (unsigned long long)pitch, (unsigned long long)r0, (unsigned long long)r1, shift);
    same(what, got, want, tot / esz, esz);
    read_sat(dc);
    cudaFree(band);
    free(got), free(want);
}

static void test_ops_deq4(void)
{
    static const struct fmt fmts[] = {{"nf4", 64, 256}, {"fp4", 32, 0}, {"nf4", 4096, 0},
                                      {"fp4", 128, 64}};
    uint8_t *dout;
    struct kn_counters *dc;
    CUDA_OK(cudaMalloc((void **)&dout, (1u << 20) * 4));
    CUDA_OK(cudaMalloc((void **)&dc, sizeof *dc));
    for (size_t fi = 0; fi < sizeof fmts / sizeof *fmts; fi++) {
        const char *dir = tu_tmpdir();
        make_ckpt(dir, &fmts[fi], NORMAL);
        struct dq_ckpt *ck;
        CHECK(dq_ckpt_open(dir, &ck) == 0);
        static const char *const names[] = {
            "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.experts.gate_up_projs.1.weight",
            "model.layers.0.mlp.experts.down_projs.3.weight",
            "model.layers.0.mlp.experts.gate_up_projs.2.weight"};
        for (size_t ni = 0; ni < sizeof names / sizeof *names; ni++) {
            struct dq_qstate q;
            CHECK(dq_qstate_load(ck, names[ni], &q) == 0);
            struct dev_q4 d;
            upload_q4(&q, &d);
            const uint64_t N = q.numel, C = q.shape[0], R = q.shape[1];
            for (int oi = 0; oi < 3; oi++) {
                uint8_t *ref = cpu_flat(&q, OUTS[oi], NULL);
                const uint64_t ks[][2] = {{0, N}, {1, N - 1}, {2, 7}, {30, N - 31}, {N - 1, 1},
                                          {N / 2 & ~(uint64_t)1, N / 3}, {33, 4097 < N - 33 ? 4097 : N - 33},
                                          {4096 < N ? 4096 : 0, 4096 < N ? N - 4096 : N}};
                for (size_t k = 0; k < sizeof ks / sizeof *ks; k++)
                    for (int shift = 0; shift < 2; shift++)
                        if (ks[k][1] > 0)
                            flat_case(&d, OUTS[oi], ks[k][0], ks[k][1], shift, ref, dc, dout);
                /* transposed: whole weight as stored, and pitched bands */
                if (R % 2 == 0) {
                    fuse_case(&d, OUTS[oi], 0, R, R / 2, 0, R, 0, ref, dc, dout);
                    fuse_case(&d, OUTS[oi], 0, R, R / 2, 3, R - 1 > 3 ? R - 1 : R, 1, ref, dc, dout);
                }
                uint64_t rb = R >= 64 ? 32 : 0, re = R;
                uint64_t pmin = (re - rb) / 2 + 1;
                fuse_case(&d, OUTS[oi], rb, re, (pmin + 15) & ~(uint64_t)15, rb, re, 0, ref, dc, dout);
                fuse_case(&d, OUTS[oi], rb, re, pmin, rb + 1, re - 1, 0, ref, dc, dout);
                fuse_case(&d, OUTS[oi], 5, R - 3, (R - 8) / 2 + 1 + 16, 6, 7, 1, ref, dc, dout);
                fuse_case(&d, OUTS[oi], 0, R, R / 2 + 1, R - 1, R, 0, ref, dc, dout);
                /* aligned shapes and output (the register-transposed kernel): rows that
                 * start and end inside a 16- and a 32-column group, and a band whose
                 * last group runs past its end (guarded code loads) */
                if (R % 32 == 0 && R >= 64 && C % 8 == 0) {
                    const uint64_t e2 = R - 8, p2 = ((e2 - 32) / 2 + 15) & ~(uint64_t)15;
                    fuse_case(&d, OUTS[oi], 0, R, R / 2, 3, R - 5, 0, ref, dc, dout);
                    fuse_case(&d, OUTS[oi], 0, R, R / 2, 17, 40, 0, ref, dc, dout);
                    fuse_case(&d, OUTS[oi], 32, e2, p2, 32, e2, 0, ref, dc, dout);
                    fuse_case(&d, OUTS[oi], 32, e2, p2, 49, e2 - 3, 0, ref, dc, dout);
                }
                free(ref);
            }
            free_q4(&d);
        }
        dq_ckpt_close(ck);
    }
    cudaFree(dout);
    cudaFree(dc);
}

/* kn_convert vs dq_convert: every F16 and BF16 pattern, a sweep of F32
 * patterns (all exponents, both signs, the saturation edges), F64 randoms
 * and specials; aligned (vector path) and shifted by one element. */
static void convert_case(enum dq_dtype in, const void *src, uint64_t n, enum dq_dtype out,
                         int shift)
{
    size_t isz = dq_dtype_size(in), osz = dq_dtype_size(out);
    uint8_t *dsrc, *ddst;
    struct kn_counters *dc;
    CUDA_OK(cudaMalloc((void **)&dsrc, (n + 2) * isz));
    CUDA_OK(cudaMalloc((void **)&ddst, (n + 18) * osz));
    CUDA_OK(cudaMalloc((void **)&dc, sizeof *dc));
    CUDA_OK(cudaMemcpy(dsrc + shift * isz, src, n * isz, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(ddst, 0xa5, (n + 18) * osz));
    CHECK(kn_counters_reset(dc, NULL) == 0);
    CHECK(kn_convert(in, dsrc + shift * isz, n, out, ddst + shift * osz, dc, NULL) == 0);
    CUDA_OK(cudaDeviceSynchronize());
    uint8_t *got = malloc((n + 18) * osz), *want = malloc((n + 18) * osz);
    CUDA_OK(cudaMemcpy(got, ddst, (n + 18) * osz, cudaMemcpyDeviceToHost));
    memset(want, 0xa5, (n + 18) * osz);
    struct dq_sat s = {0};
    dq_convert(in, src, n, out, want + shift * osz, &s);
    char what[96];
    snprintf(what, sizeof what, "convert %s -> %s (%llu values, shift %d)", dq_dtype_name(in),
             dq_dtype_name(out), (unsigned long long)n, shift);
    same(what, got, want, n + 18, osz);
    CHECK_EQ_U64(read_sat(dc), s.count);
    free(got), free(want);
    cudaFree(dsrc), cudaFree(ddst), cudaFree(dc);
}

static void test_ops_convert(void)
{
    /* F16, BF16: all 65536 patterns */
    uint16_t *h = malloc(65536 * 2);
    for (uint32_t i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    for (int oi = 0; oi < 3; oi++)
        for (int shift = 0; shift < 2; shift++) {
            if (OUTS[oi] != DQ_F16)
                convert_case(DQ_F16, h, 65536 - shift, OUTS[oi], shift);
            if (OUTS[oi] != DQ_BF16)
                convert_case(DQ_BF16, h, 65536 - shift, OUTS[oi], shift);
        }
    free(h);
    /* F32: every 4099th pattern (all exponents and signs), plus the edges
     * around 65504/65520 and BF16's maximum, +-1 ulp */
    const uint64_t n32 = (1ull << 32) / 4099 + 64;
    uint32_t *f = malloc(n32 * 4);
    uint64_t k = 0;
    for (uint64_t u = 0; u < (1ull << 32) && k < n32 - 64; u += 4099)
        f[k++] = (uint32_t)u;
    static const uint32_t edges[] = {0x477fe000, 0x477ff000, 0x7f7f8000, 0x7f7f7fff, 0x33000000,
                                     0x387fe000, 0x7f800000, 0x7fc00000, 0x7f800001, 0x00000001};
    for (size_t e = 0; e < sizeof edges / sizeof *edges && k + 6 <= n32; e++)
        for (int dlt = -1; dlt <= 1; dlt++) {
            f[k++] = edges[e] + (uint32_t)dlt;
            f[k++] = (edges[e] + (uint32_t)dlt) | 0x80000000u;
        }
    for (int oi = 0; oi < 2; oi++)
        for (int shift = 0; shift < 2; shift++)
            convert_case(DQ_F32, f, k - shift, OUTS[oi], shift);
    free(f);
    /* F64: random magnitudes across the whole range and specials */
    const uint64_t n64 = 1u << 20;
    uint64_t *d = malloc(n64 * 8);
    for (uint64_t i = 0; i < n64; i++)
        d[i] = rnd();
    for (uint64_t i = 0; i < n64; i += 3) { /* near f32/f16/bf16 ranges */
        double v = ldexp((double)frand(1.0f, 2.0f) + ldexp((double)(rnd() & 0xffffff), -48),
                         (int)(rnd() % 300) - 160);
        if (rnd() & 1)
            v = -v;
        memcpy(&d[i], &v, 8);
    }
    static const uint64_t sp[] = {0x7ff8000000000001ull, 0xfff4000000000000ull,
                                  0x7ff0000000000000ull, 0x47efffffe0000000ull,
                                  0x47efffffefffffffull, 0x47efffffffffffffull,
                                  0x47f0000000000000ull, 0x40effe0000000000ull,
                                  0x40effc0000000000ull, 0x3e70000000000001ull,
                                  0x36a0000000000000ull, 0x0000000000000001ull,
                                  0x8000000000000000ull};
    memcpy(d, sp, sizeof sp);
    for (int oi = 0; oi < 3; oi++)
        for (int shift = 0; shift < 2; shift++)
            convert_case(DQ_F64, d, n64 - shift, OUTS[oi], shift);
    free(d);
}

/* ------------------------------------------------------- error paths */

static void test_errors_bad_scales(void)
{
    static const struct fmt fmts[] = {{"nf4", 64, 0}, {"fp4", 32, 256}};
    for (size_t fi = 0; fi < 2; fi++) {
        const char *dir = tu_tmpdir();
        make_ckpt(dir, &fmts[fi], NAN_SCALE);
        struct dq_ckpt *ck;
        struct dq_plan *p;
        CHECK(dq_ckpt_open(dir, &ck) == 0);
        CHECK(dq_plan_build(ck, DQ_F16, 600, &p) == 0);
        const struct dq_out *o = dq_plan_find(p, "model.layers.0.self_attn.q_proj.weight");
        CHECK(o != NULL);
        uint8_t *cpu = malloc(o->nbytes + 64), *gpu = malloc(o->nbytes + 64);
        int nbad = 0;
        for (uint64_t s = 0; s < o->nslices; s++) {
            uint64_t off, len, gsat;
            dq_out_slice_range(o, s, &off, &len);
            int crc = dq_out_compute(o, s, cpu + off, NULL);
            tu_log_clear();
            int grc = gpu_run(g_big, o, s, 1, gpu, 0x77, &gsat);
            CHECK_EQ_U64(grc, crc);
            if (crc == -EIO) {
                nbad++;
                CHECK(tu_log_has("non-finite scale"));
                CHECK(tu_log_has("q_proj.weight"));
                CHECK(kn_ctx_usable(g_big)); /* a bad source is not a GPU failure */
            } else if (crc == 0) {
                same("slice next to a bad block", gpu + off, cpu + off, len / 2, 2);
            }
        }
        CHECK(nbad > 0);
        free(cpu), free(gpu);
        dq_plan_free(p);
        dq_ckpt_close(ck);
    }
}

static void test_errors_quant_map(void)
{
    struct fmt f = {"nf4", 64, 256};
    const char *dir = tu_tmpdir();
    make_ckpt(dir, &f, NORMAL);
    /* corrupt q_proj's stored quant_map[5] in place */
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct dq_stfile *sf;
    CHECK(dq_stfile_open(path, &sf) == 0);
    const struct dq_tensor *t = dq_stfile_find(sf, "model.layers.0.self_attn.q_proj.weight.quant_map");
    CHECK(t != NULL);
    uint64_t at = t->offset + 5 * 4;
    dq_stfile_close(sf);
    FILE *fp = fopen(path, "r+b");
    float bad = 0.5f;
    CHECK(fp && fseek(fp, (long)at, SEEK_SET) == 0 && fwrite(&bad, 4, 1, fp) == 1);
    fclose(fp);
    struct dq_ckpt *ck;
    struct dq_plan *p;
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    CHECK(dq_plan_build(ck, DQ_BF16, 0, &p) == 0);
    const struct dq_out *o = dq_plan_find(p, "model.layers.0.self_attn.q_proj.weight");
    uint8_t *buf = malloc(o->nbytes + 64);
    uint64_t gsat;
    tu_log_clear();
    CHECK_EQ_U64(gpu_run(g_big, o, 0, o->nslices, buf, 0, &gsat), (uint64_t)-EIO);
    CHECK(tu_log_has("quant_map"));
    CHECK_EQ_U64(dq_out_compute(o, 0, buf, NULL), (uint64_t)-EIO);
    /* other tensors stay readable */
    const struct dq_out *o2 = dq_plan_find(p, "model.layers.0.self_attn.o_proj.weight");
    uint64_t rsat;
    uint8_t *ref = cpu_out(o2, &rsat);
    check_run(g_big, o2, ref, 0, o2->nslices, 0x11, "after a bad tensor");
    free(ref), free(buf);
    dq_plan_free(p);
    dq_ckpt_close(ck);
}

static void test_errors_changed_source(void)
{
    struct fmt f = {"fp4", 64, 256};
    const char *dir = tu_tmpdir();
    make_ckpt(dir, &f, NORMAL);
    struct dq_ckpt *ck;
    struct dq_plan *p;
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    CHECK(dq_plan_build(ck, DQ_F16, 0, &p) == 0);
    const struct dq_out *o = dq_plan_find(p, "model.layers.0.mlp.experts.down_proj");
    CHECK(o != NULL);
    uint8_t *buf = malloc(o->nbytes + 64);
    uint64_t gsat;
    CHECK(gpu_run(g_big, o, 0, o->nslices, buf, 0, &gsat) == 0);
    /* rewrite the file under the open checkpoint: new identity */
    char path[512], cmd[2200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s.new' && mv '%s.new' '%s'", path, path, path, path);
    CHECK(system(cmd) == 0);
    int crc = dq_out_compute(o, 0, buf, NULL);
    CHECK_EQ_U64(crc, (uint64_t)-ESTALE);
    CHECK_EQ_U64(gpu_run(g_big, o, 0, o->nslices, buf, 0, &gsat), (uint64_t)crc);
    CHECK(kn_ctx_usable(g_big));
    free(buf);
    dq_plan_free(p);
    dq_ckpt_close(ck);
}

static void test_errors_arguments(void)
{
    struct fmt f = {"nf4", 64, 256};
    const char *dir = tu_tmpdir();
    make_ckpt(dir, &f, NORMAL);
    struct dq_ckpt *ck;
    struct dq_plan *p;
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    CHECK(dq_plan_build(ck, DQ_F32, 0, &p) == 0);
    const struct dq_out *o = dq_plan_find(p, "model.norm.weight"); /* F32 -> F32: a copy */
    void *d = malloc(o->nbytes);
    CHECK(!kn_out_supported(o));
    CHECK(kn_ctx_compute(g_big, o, 0, 1, &d, 0, NULL) == -ENOTSUP);
    o = dq_plan_find(p, "model.layers.0.self_attn.q_proj.weight");
    CHECK(kn_ctx_compute(g_big, o, o->nslices, 1, &d, 0, NULL) == -ERANGE);
    CHECK(kn_ctx_compute(g_big, o, 0, o->nslices + 1, &d, 0, NULL) == -ERANGE);
    free(d);
    struct kn_ctx *x = NULL;
    struct kn_ctx_opts opts = {.device = 99};
    CHECK(kn_ctx_new(&opts, &x) == -ENODEV && x == NULL);
    struct kn_counters *dc;
    CUDA_OK(cudaMalloc((void **)&dc, sizeof *dc));
    struct kn_q4 kq = {.qtype = DQ_NF4, .blocksize = 48, .codes = (void *)dc, .absmax = dc};
    CHECK(kn_deq4_flat(&kq, 0, 10, DQ_F16, dc, dc, NULL) == -EINVAL);
    kq.blocksize = 64;
    CHECK(kn_deq4_flat(&kq, 0, 10, DQ_F64, dc, dc, NULL) == -EINVAL);
    CHECK(kn_deq4_fuse_t(&kq, 4, 8, 0, 8, 4, 6, 5, DQ_F16, dc, dc, NULL) == -EINVAL);
    CHECK(kn_deq4_fuse_t(&kq, 4, 8, 0, 8, 3, 0, 8, DQ_F16, dc, dc, NULL) == -EINVAL);
    CHECK(kn_convert(DQ_U8, dc, 4, DQ_F16, dc, dc, NULL) == -EINVAL);
    CHECK(tu_log_has("invalid"));
    cudaFree(dc);
    dq_plan_free(p);
    dq_ckpt_close(ck);
}

/* -------------------------------------------------------------- main */

static void test_ctx_info(void)
{
    fprintf(stderr, "  device: %s\n", kn_ctx_name(g_big));
    CHECK(kn_ctx_usable(g_big) && kn_ctx_usable(g_small));
}

static void test_ctx_stats(void)
{
    struct kn_ctx_stats st;
    kn_ctx_stats_get(g_big, &st);
    fprintf(stderr, "  big lanes: %llu calls, %llu slices, %llu bytes out, %llu bytes up\n",
            (unsigned long long)st.calls, (unsigned long long)st.slices,
            (unsigned long long)st.bytes_out, (unsigned long long)st.bytes_up);
    CHECK(st.calls > 0 && st.slices >= st.calls && st.bytes_out > 0 && st.bytes_up > 0);
}

int main(int argc, char **argv)
{
    int n = 0;
    char why[256] = "";
    kn_device_count(&n, why, sizeof why);
    if (n == 0) {
        printf("no GPU: %s\n", why);
        return 77;
    }
    struct kn_ctx_opts big = {.device = -1, .nlanes = 2};
    struct kn_ctx_opts small = {.device = -1, .nlanes = 2, .lane_out_bytes = SMALL_CAP,
                                .lane_in_bytes = SMALL_CAP};
    if (kn_ctx_new(&big, &g_big) || kn_ctx_new(&small, &g_small)) {
        fprintf(stderr, "kn_ctx_new failed with a device present\n");
        return 1;
    }
    static const struct tu_case cases[] = {
        {"ctx_info", test_ctx_info},
        {"ops_convert_bit_patterns", test_ops_convert},
        {"ops_deq4_flat_and_fuse_t", test_ops_deq4},
        {"ctx_every_format_dtype_blocksize_slicing", test_ctx_formats},
        {"errors_non_finite_scales", test_errors_bad_scales},
        {"errors_quant_map", test_errors_quant_map},
        {"errors_changed_source", test_errors_changed_source},
        {"errors_arguments", test_errors_arguments},
        {"ctx_stats", test_ctx_stats},
        {NULL, NULL},
    };
    int rc = tu_main(cases, argc, argv);
    kn_ctx_free(g_small);
    kn_ctx_free(g_big);
    return rc;
}
