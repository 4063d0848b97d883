/* test_plan.c — quant states and the tensor plan on small checkpoints
 * written by the test: companions missing or mis-sized, corrupt scales and
 * code tables (-EIO at compute time, logged with the tensor), sources that
 * change or shrink under us (-ESTALE / -EIO, never SIGBUS), and FUSE_T /
 * STACK / COPY slices of awkward shapes against a naive element-by-element
 * reference, at several slice sizes. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dequant.h"
#include "stw.h"
#include "tu.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint32_t rnd(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* A random 4-bit Linear [rows, cols] kept in memory for the naive reference. */
struct q4 {
    struct q4_spec s;
    uint8_t *nib, *au8;
    float *absmax, *nabs, nmap[256];
};

static void q4_make(struct q4 *q, const char *qt, uint32_t bs, uint64_t rows, uint64_t cols,
                    uint32_t nested)
{
    memset(q, 0, sizeof *q);
    uint64_t n = rows * cols, nb = (n + bs - 1) / bs;
    q->nib = malloc(n);
    for (uint64_t k = 0; k < n; k++)
        q->nib[k] = (uint8_t)(rnd() & 15);
    q->absmax = malloc(nb * sizeof(float));
    q->au8 = malloc(nb);
    for (uint64_t b = 0; b < nb; b++) {
        q->absmax[b] = 0.01f + (float)(rnd() % 1000) * 1e-4f;
        q->au8[b] = (uint8_t)rnd();
    }
    uint64_t nn = nested ? (nb + nested - 1) / nested : 0;
    q->nabs = malloc((nn ? nn : 1) * sizeof(float));
    for (uint64_t i = 0; i < nn; i++)
        q->nabs[i] = 0.02f + (float)(rnd() % 100) * 1e-4f;
    for (int i = 0; i < 256; i++)
        q->nmap[i] = (float)(i - 128) / 128.0f;
    q->s = (struct q4_spec){qt, bs, rows, cols, q->nib, q->absmax, nested, q->au8, q->nabs, q->nmap,
                            0.031f};
}

static void q4_free(struct q4 *q)
{
    free(q->nib), free(q->absmax), free(q->au8), free(q->nabs);
}

/* The definition, element by element (formats.md §2). */
static float q4_value(const struct q4 *q, uint64_t k)
{
    const float *tab = strcmp(q->s.qtype, "nf4") ? dq_fp4_table : dq_nf4_table;
    uint64_t b = k / q->s.blocksize;
    float a;
    if (q->s.nested_bs) {
        float p = q->nmap[q->au8[b]] * q->nabs[b / q->s.nested_bs];
        a = p + q->s.nested_offset;
    } else {
        a = q->absmax[b];
    }
    return tab[q->nib[k]] * a;
}

static uint16_t to_f16(float v)
{
    uint16_t h;
    dq_convert(DQ_F32, &v, 1, DQ_F16, &h, NULL);
    return h;
}

static int open_plan(const char *dir, uint64_t slice, struct dq_ckpt **ck, struct dq_plan **p)
{
    int rc = dq_ckpt_open(dir, ck);
    if (rc)
        return rc;
    rc = dq_plan_build(*ck, DQ_F16, slice, p);
    if (rc) {
        dq_ckpt_close(*ck);
        *ck = NULL;
    }
    return rc;
}

/* E experts of a fused Linear [C, R] with awkward sizes, plus biases, a
 * router to rename and a plain tensor; companions of expert 1 in a second
 * shard. Checks every output element against the definition. */
static void check_fused(uint32_t E, uint64_t C, uint64_t R, uint32_t bs, uint32_t nested,
                        uint64_t slice_bytes)
{
    const char *dir = tu_tmpdir();
    struct q4 *q = calloc(E, sizeof *q);
    struct stw *w1 = stw_new(), *w2 = stw_new();
    uint16_t *bias = malloc(E * C * 2);
    for (uint64_t i = 0; i < E * C; i++)
        bias[i] = (uint16_t)(0x3c00 + (rnd() % 512)); /* BF16 bits, 0.5..2 range-ish */
    char name[256];
    for (uint32_t e = 0; e < E; e++) {
        q4_make(&q[e], e % 3 == 2 ? "fp4" : "nf4", bs, C, R, nested);
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.gate_up_projs.%u.weight", e);
        stw_add_q4(e == 1 ? w2 : w1, name, &q[e].s);
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.gate_up_projs.%u.bias", e);
        stw_add(w1, name, "BF16", 1, &C, bias + e * C, C * 2);
    }
    uint16_t rw[6] = {1, 2, 3, 4, 5, 6};
    uint64_t rsh[2] = {2, 3};
    stw_add(w2, "model.layers.0.mlp.router.linear.weight", "BF16", 2, rsh, rw, sizeof rw);
    stw_write(w1, dir, "a.safetensors");
    stw_write(w2, dir, "b.safetensors");
    /* index: everything in a except expert 1's tensors and the router */
    struct dq_stfile *fa, *fb;
    char pa[512], pb[512];
    snprintf(pa, sizeof pa, "%s/a.safetensors", dir);
    snprintf(pb, sizeof pb, "%s/b.safetensors", dir);
    CHECK(dq_stfile_open(pa, &fa) == 0 && dq_stfile_open(pb, &fb) == 0);
    size_t cap = 1 << 20, len = 0;
    char *idx = malloc(cap);
    len += (size_t)snprintf(idx, cap, "{\"metadata\":{},\"weight_map\":{");
    for (int f = 0; f < 2; f++) {
        struct dq_stfile *sf = f ? fb : fa;
        for (size_t i = 0; i < sf->ntensors; i++)
            len += (size_t)snprintf(idx + len, cap - len, "%s\"%s\":\"%s\"", len > 30 ? "," : "",
                                    sf->tensors[i].name, f ? "b.safetensors" : "a.safetensors");
    }
    len += (size_t)snprintf(idx + len, cap - len, "}}");
    write_file(dir, "model.safetensors.index.json", idx, len);
    free(idx);
    dq_stfile_close(fa);
    dq_stfile_close(fb);

    struct dq_ckpt *ck;
    struct dq_plan *p;
    if (open_plan(dir, slice_bytes, &ck, &p)) {
        CHECK(!"plan failed");
        fprintf(stderr, "%s", tu_log());
        return;
    }
    const struct dq_out *o = dq_plan_find(p, "model.layers.0.mlp.experts.gate_up_proj");
    const struct dq_out *ob = dq_plan_find(p, "model.layers.0.mlp.experts.gate_up_proj_bias");
    CHECK(dq_plan_find(p, "model.layers.0.mlp.router.weight") != NULL);
    CHECK(o && ob);
    if (o && ob) {
        CHECK(o->op == DQ_OP_FUSE_T && o->shape[0] == E && o->shape[1] == R && o->shape[2] == C);
        uint16_t *got = malloc(o->nbytes);
        memset(got, 0xa5, o->nbytes); /* poison: an unwritten element fails */
        CHECK(dq_out_compute_range(o, 0, o->nbytes, got, 2, NULL) == 0);
        uint64_t bad = 0;
        for (uint32_t e = 0; e < E; e++)
            for (uint64_t r = 0; r < R; r++)
                for (uint64_t c = 0; c < C; c++) {
                    uint16_t want = to_f16(q4_value(&q[e], c * R + r));
                    bad += got[(e * R + r) * C + c] != want;
                }
        CHECK_EQ_U64(bad, 0);
        /* slices tile the tensor exactly, each within one expert */
        uint64_t total = 0;
        for (uint64_t s = 0; s < o->nslices; s++) {
            uint64_t off, l;
            dq_out_slice_range(o, s, &off, &l);
            CHECK_EQ_U64(off, total);
            CHECK_EQ_U64(dq_out_slice_at(o, off), s);
            CHECK(off / (R * C * 2) == (off + l - 1) / (R * C * 2));
            total += l;
        }
        CHECK_EQ_U64(total, o->nbytes);
        /* an odd byte range in the middle */
        uint64_t off = o->nbytes / 3 + 1, l = o->nbytes / 4 + 3;
        uint8_t *part = malloc(l);
        CHECK(dq_out_compute_range(o, off, l, part, 1, NULL) == 0);
        CHECK(memcmp(part, (uint8_t *)got + off, l) == 0);
        free(part);
        free(got);
        uint16_t *gb = malloc(ob->nbytes);
        CHECK(dq_out_compute_range(ob, 0, ob->nbytes, gb, 2, NULL) == 0);
        bad = 0;
        for (uint64_t i = 0; i < E * C; i++) {
            float f;
            uint32_t u = (uint32_t)bias[i] << 16;
            memcpy(&f, &u, 4);
            bad += gb[i] != to_f16(f);
        }
        CHECK_EQ_U64(bad, 0);
        free(gb);
    }
    dq_plan_free(p);
    dq_ckpt_close(ck);
    for (uint32_t e = 0; e < E; e++)
        q4_free(&q[e]);
    free(q);
    free(bias);
}

static void test_fused_awkward_shapes(void)
{
    check_fused(3, 70, 45, 64, 256, 0);      /* odd R: nibbles flip per row */
    check_fused(5, 33, 96, 32, 0, 1000);     /* tiny slices, no double quant */
    check_fused(1, 130, 129, 128, 32, 4096); /* blocks cross rows; many nested blocks */
    check_fused(7, 16, 600, 64, 256, 1 << 20); /* R above the band width */
    /* codes-first fast path (R a multiple of the blocksize, even bands), with
     * ragged 16x16 edges in both directions */
    check_fused(3, 48, 128, 64, 256, 0);
    check_fused(4, 37, 192, 64, 256, 3000);
    check_fused(2, 100, 96, 32, 0, 2000);
}

/* One 4-bit weight in its own checkpoint for corruption tests. */
static const char *one_weight_dir(struct q4 *q, uint32_t nested)
{
    const char *dir = tu_tmpdir();
    q4_make(q, "nf4", 64, 8, 64, nested);
    struct stw *w = stw_new();
    stw_add_q4(w, "w.weight", &q->s);
    stw_write(w, dir, "model.safetensors");
    return dir;
}

/* Overwrite `n` bytes of tensor `name` in dir/model.safetensors. */
static void poke(const char *dir, const char *name, const void *bytes, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct dq_stfile *f;
    if (dq_stfile_open(path, &f))
        return;
    const struct dq_tensor *t = dq_stfile_find(f, name);
    off_t off = t ? (off_t)t->offset : 0;
    dq_stfile_close(f);
    int fd = open(path, O_WRONLY);
    CHECK(t && fd >= 0 && pwrite(fd, bytes, n, off) == (ssize_t)n);
    close(fd);
}

static int compute_all(const char *dir, const char *out)
{
    struct dq_ckpt *ck;
    struct dq_plan *p;
    int rc = open_plan(dir, 0, &ck, &p);
    if (rc)
        return rc;
    const struct dq_out *o = dq_plan_find(p, out);
    uint8_t *buf = malloc(o->nbytes);
    rc = dq_out_compute_range(o, 0, o->nbytes, buf, 1, NULL);
    free(buf);
    dq_plan_free(p);
    dq_ckpt_close(ck);
    return rc;
}

static void test_corrupt_scales_and_maps(void)
{
    struct q4 q;
    float nan = NAN, bad_map = 0.5f;
    const char *dir = one_weight_dir(&q, 256);
    CHECK(compute_all(dir, "w.weight") == 0);
    poke(dir, "w.weight.nested_absmax", &nan, 4);
    tu_log_clear();
    CHECK(compute_all(dir, "w.weight") == -EIO);
    CHECK(tu_log_has("w.weight.absmax") && tu_log_has("non-finite scale"));
    q4_free(&q);

    dir = one_weight_dir(&q, 0);
    poke(dir, "w.weight.absmax", &nan, 4);
    tu_log_clear();
    CHECK(compute_all(dir, "w.weight") == -EIO);
    CHECK(tu_log_has("non-finite scale"));
    q4_free(&q);

    dir = one_weight_dir(&q, 256);
    poke(dir, "w.weight.quant_map", &bad_map, 4);
    tu_log_clear();
    CHECK(compute_all(dir, "w.weight") == -EIO);
    CHECK(tu_log_has("w.weight.quant_map") && tu_log_has("is not the nf4 code table"));
    q4_free(&q);
}

static void expect_plan_error(const char *dir, const char *msg)
{
    struct dq_ckpt *ck;
    struct dq_plan *p;
    tu_log_clear();
    int rc = open_plan(dir, 0, &ck, &p);
    CHECK(rc == -EINVAL);
    if (!rc) {
        dq_plan_free(p);
        dq_ckpt_close(ck);
    }
    if (!tu_log_has(msg)) {
        tu_failures++;
        fprintf(stderr, "FAIL %s: wanted '%s' in:\n%s", tu_current, msg, tu_log());
    }
}

static void test_bad_quant_states(void)
{
    struct q4 q;
    q4_make(&q, "nf4", 64, 8, 64, 256);
    struct {
        const char *json, *msg;
    } cases[] = {
        {"{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 64]}", "quant_type must be \"nf4\""},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", \"shape\": [8, 64]}", "blocksize must be a power of two"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [8, 64]}", "unsupported dtype \"int8\""},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 0]}", "shape[1] is not a positive size"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 128]}", "256 packed bytes, but shape needs 512"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 64], \"nested_blocksize\": 256}", "double quantization needs"},
        {"[1]", "quant state is not a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *dir = tu_tmpdir();
        /* a valid weight with F32 absmax, and the JSON blob of the case */
        struct stw *w2 = stw_new();
        uint64_t n = 8 * 64, nb = n / 64, s16 = 16, pk[2] = {n / 2, 1};
        uint8_t *packed = calloc(n / 2, 1);
        stw_add(w2, "w.weight", "U8", 2, pk, packed, n / 2);
        stw_add(w2, "w.weight.absmax", "F32", 1, &nb, q.absmax, nb * 4);
        stw_add(w2, "w.weight.quant_map", "F32", 1, &s16, dq_nf4_table, 64);
        uint64_t jl = strlen(cases[i].json);
        stw_add(w2, "w.weight.quant_state.bitsandbytes__nf4", "U8", 1, &jl, cases[i].json, jl);
        stw_write(w2, dir, "model.safetensors");
        free(packed);
        expect_plan_error(dir, cases[i].msg);
    }
    /* missing and mis-sized companions */
    const char *dir = tu_tmpdir();
    struct stw *w = stw_new();
    uint64_t n = 8 * 64, nb = n / 64 - 1, s16 = 16, pk[2] = {n / 2, 1};
    uint8_t *packed = calloc(n / 2, 1);
    const char *js = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [8, 64]}";
    uint64_t jl = strlen(js);
    stw_add(w, "w.weight", "U8", 2, pk, packed, n / 2);
    stw_add(w, "w.weight.absmax", "F32", 1, &nb, q.absmax, nb * 4);
    stw_add(w, "w.weight.quant_map", "F32", 1, &s16, dq_nf4_table, 64);
    stw_add(w, "w.weight.quant_state.bitsandbytes__nf4", "U8", 1, &jl, js, jl);
    stw_write(w, dir, "model.safetensors");
    expect_plan_error(dir, "'w.weight.absmax': expected F32 with 8 elements, found F32 with 7");
    dir = tu_tmpdir();
    w = stw_new();
    stw_add(w, "w.weight", "U8", 2, pk, packed, n / 2);
    stw_add(w, "w.weight.quant_state.bitsandbytes__nf4", "U8", 1, &jl, js, jl);
    stw_write(w, dir, "model.safetensors");
    expect_plan_error(dir, "companion 'w.weight.absmax' is missing");
    dir = tu_tmpdir();
    w = stw_new();
    stw_add(w, "w.weight.quant_state.bitsandbytes__nf4", "U8", 1, &jl, js, jl);
    stw_write(w, dir, "model.safetensors");
    expect_plan_error(dir, "has no weight 'w.weight'");
    free(packed);
    q4_free(&q);
}

static void test_missing_expert(void)
{
    const char *dir = tu_tmpdir();
    struct stw *w = stw_new();
    uint16_t v[4] = {0};
    uint64_t sh[2] = {2, 2};
    stw_add(w, "m.experts.down_projs.0.weight", "BF16", 2, sh, v, 8);
    stw_add(w, "m.experts.down_projs.2.weight", "BF16", 2, sh, v, 8);
    stw_write(w, dir, "model.safetensors");
    expect_plan_error(dir, "expert 1 of 'm.experts.down_proj' is missing");
}

static void test_truncated_under_us(void)
{
    struct q4 q;
    const char *dir = one_weight_dir(&q, 256);
    struct dq_ckpt *ck;
    struct dq_plan *p;
    CHECK(open_plan(dir, 0, &ck, &p) == 0);
    if (!ck)
        return;
    const struct dq_out *o = dq_plan_find(p, "w.weight");
    uint8_t buf[8 * 64 * 2];
    CHECK(dq_out_compute(o, 0, buf, NULL) == 0);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(truncate(path, 8) == 0);
    tu_log_clear();
    CHECK(dq_out_compute(o, 0, buf, NULL) == -ESTALE);
    CHECK(tu_log_has("source file changed") && tu_log_has("model.safetensors"));
    /* Bypassing the identity check, a read of the vanished pages must be
     * -EIO from the SIGBUS guard, not a crash. */
    float a[8];
    CHECK(dq_qstate_scales(o->src[0].q, 0, 8, a) == -EIO);
    dq_plan_free(p);
    dq_ckpt_close(ck);
    q4_free(&q);
}

static void test_canonical_passthrough(void)
{
    /* An already-canonical checkpoint: fused tensors stay 1:1. */
    const char *dir = tu_tmpdir();
    struct stw *w = stw_new();
    uint16_t v[2 * 3 * 4];
    for (int i = 0; i < 24; i++)
        v[i] = (uint16_t)(0x3f80 + i);
    uint64_t sh[3] = {2, 3, 4};
    stw_add(w, "model.layers.0.mlp.experts.gate_up_proj", "BF16", 3, sh, v, sizeof v);
    stw_write(w, dir, "model.safetensors");
    struct dq_ckpt *ck;
    struct dq_plan *p;
    CHECK(open_plan(dir, 0, &ck, &p) == 0);
    if (!ck)
        return;
    CHECK_EQ_U64(p->nout, 1);
    CHECK(p->out[0].op == DQ_OP_COPY && p->out[0].ndim == 3 && p->out[0].dtype == DQ_F16);
    dq_plan_free(p);
    dq_ckpt_close(ck);
}

int main(int argc, char **argv)
{
    static const struct tu_case cases[] = {
        {"fused_awkward_shapes", test_fused_awkward_shapes},
        {"corrupt_scales_and_maps", test_corrupt_scales_and_maps},
        {"bad_quant_states", test_bad_quant_states},
        {"missing_expert", test_missing_expert},
        {"truncated_under_us", test_truncated_under_us},
        {"canonical_passthrough", test_canonical_passthrough},
        {0, 0},
    };
    return tu_main(cases, argc, argv);
}
