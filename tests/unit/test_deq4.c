/* test_deq4.c — the arithmetic of dequant/deq4.c: known answers for every
 * NF4/FP4 code (values computed independently with numpy), nibble order,
 * block boundaries, the saturation rule, conversions against the CPU's own
 * F16C instructions, and every SIMD level giving the scalar path's bits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"
#include "tu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

static const uint16_t nf4_f16[16] = {0xbc00, 0xb992, 0xb833, 0xb652, 0xb48d, 0xb1ea, 0xadd4, 0x0000,
                                     0x2d18, 0x3126, 0x33e0, 0x3568, 0x370d, 0x3880, 0x39c9, 0x3c00};
static const uint16_t fp4_f16[16] = {0x0000, 0x1d55, 0x3955, 0x3c00, 0x3555, 0x3800, 0x3155, 0x3400,
                                     0x8000, 0x9d55, 0xb955, 0xbc00, 0xb555, 0xb800, 0xb155, 0xb400};
static const uint16_t nf4_s_f16[16] = {0xa24c, 0xa062, 0x9e9d, 0x9cf9, 0x9b2a, 0x98a8, 0x9496, 0x0000,
                                       0x1402, 0x180e, 0x1a33, 0x1c42, 0x1d8d, 0x1f16, 0x208e, 0x224c};
static const uint32_t nf4_s_f32[16] = {
    0xbc4985f0, 0xbc0c4c8b, 0xbbd3a0f9, 0xbb9f2b89, 0xbb654941, 0xbb14f1cd, 0xba92ca20, 0x00000000,
    0x3a804c57, 0x3b01b984, 0x3b4663ac, 0x3b88320d, 0x3bb1a063, 0x3be2c2c1, 0x3c11b14c, 0x3c4985f0};

static const enum dq_simd levels[] = {DQ_SIMD_SCALAR, DQ_SIMD_AVX2, DQ_SIMD_AVX512};

/* 64 elements: codes 0..15 four times, packed high nibble first. */
static void all_codes(uint8_t packed[32])
{
    for (int j = 0; j < 32; j++)
        packed[j] = (uint8_t)((((2 * j) & 15) << 4) | ((2 * j + 1) & 15));
}

static void test_known_codes(void)
{
    uint8_t packed[32];
    all_codes(packed);
    for (size_t l = 0; l < 3; l++) {
        dq_simd_set(levels[l]);
        uint16_t out[64];
        float one = 1.0f, s = 0.0123f;
        dq_deq4_span(DQ_NF4, packed, 0, 64, &one, 64, DQ_F16, out, NULL);
        for (int k = 0; k < 64; k++)
            CHECK_EQ_U64(out[k], nf4_f16[k & 15]);
        dq_deq4_span(DQ_FP4, packed, 0, 64, &one, 64, DQ_F16, out, NULL);
        for (int k = 0; k < 64; k++)
            CHECK_EQ_U64(out[k], fp4_f16[k & 15]);
        dq_deq4_span(DQ_NF4, packed, 0, 64, &s, 64, DQ_F16, out, NULL);
        for (int k = 0; k < 64; k++)
            CHECK_EQ_U64(out[k], nf4_s_f16[k & 15]);
        uint32_t o32[64];
        dq_deq4_span(DQ_NF4, packed, 0, 64, &s, 64, DQ_F32, o32, NULL);
        for (int k = 0; k < 64; k++)
            CHECK_EQ_U64(o32[k], nf4_s_f32[k & 15]);
        /* bf16 = the f32 bits rounded to nearest even at bit 16 */
        uint16_t ob[64];
        dq_deq4_span(DQ_NF4, packed, 0, 64, &s, 64, DQ_BF16, ob, NULL);
        for (int k = 0; k < 64; k++) {
            uint32_t x = nf4_s_f32[k & 15];
            CHECK_EQ_U64(ob[k], (x + 0x7fff + ((x >> 16) & 1)) >> 16);
        }
    }
    dq_simd_set(DQ_SIMD_AUTO);
}

static void test_fp4_table_is_c_over_12(void)
{
    static const float c[16] = {0, 0.0625f, 8, 12, 4, 6, 2, 3, -0.0f, -0.0625f, -8, -12, -4, -6, -2, -3};
    for (int i = 0; i < 16; i++) {
        float v = c[i] / 12.0f;
        CHECK(memcmp(&v, &dq_fp4_table[i], 4) == 0);
    }
}

static void test_nibble_order(void)
{
    /* byte 0x1F: element 0 is the HIGH nibble (code 1), element 1 the low (15). */
    uint8_t b[32] = {0x1F};
    float one = 1.0f;
    uint16_t out[2];
    dq_deq4_span(DQ_NF4, b, 0, 2, &one, 64, DQ_F16, out, NULL);
    CHECK_EQ_U64(out[0], nf4_f16[1]);
    CHECK_EQ_U64(out[1], nf4_f16[15]);
    /* an odd start reads the low nibble first */
    dq_deq4_span(DQ_NF4, b, 1, 1, &one, 64, DQ_F16, out, NULL);
    CHECK_EQ_U64(out[0], nf4_f16[15]);
}

static void test_block_boundaries(void)
{
    /* 200 elements, blocksize 32, every block a different power-of-two
     * scale (exact), code 15 (= 1.0) everywhere: out[k] == scale of k/32. */
    uint8_t packed[100];
    memset(packed, 0xff, sizeof packed);
    float a[7];
    for (int b = 0; b < 7; b++)
        a[b] = ldexpf(1.0f, b - 3);
    for (size_t l = 0; l < 3; l++) {
        dq_simd_set(levels[l]);
        for (uint64_t k0 = 0; k0 < 70; k0 += 7) {
            float out[200];
            uint64_t n = 200 - k0;
            dq_deq4_span(DQ_NF4, packed, k0, n, a + k0 / 32, 32, DQ_F32, out, NULL);
            for (uint64_t i = 0; i < n; i++)
                CHECK(out[i] == a[(k0 + i) / 32]);
        }
    }
    dq_simd_set(DQ_SIMD_AUTO);
}

static void test_saturation(void)
{
    uint8_t packed[32];
    memset(packed, 0xf0, sizeof packed); /* codes 15, 0: +1.0, -1.0 */
    float big = 70000.0f;
    for (size_t l = 0; l < 3; l++) {
        dq_simd_set(levels[l]);
        uint16_t out[64];
        struct dq_sat sat = {0};
        dq_deq4_span(DQ_NF4, packed, 0, 64, &big, 64, DQ_F16, out, &sat);
        CHECK_EQ_U64(sat.count, 64);
        for (int k = 0; k < 64; k++)
            CHECK_EQ_U64(out[k], (k & 1) ? 0xfbff : 0x7bff);
        sat.count = 0;
        dq_deq4_span(DQ_NF4, packed, 0, 64, &big, 64, DQ_BF16, out, &sat);
        CHECK_EQ_U64(sat.count, 0); /* fits bf16 */
        float just = 65519.0f; /* rounds down to 65504: not saturated */
        dq_deq4_span(DQ_NF4, packed, 0, 64, &just, 64, DQ_F16, out, &sat);
        CHECK_EQ_U64(sat.count, 0);
        CHECK_EQ_U64(out[0], 0x7bff);
    }
    dq_simd_set(DQ_SIMD_AUTO);
    /* plain conversions: f32 -> bf16 overflow, inf and NaN pass through */
    float in[5] = {3.4e38f, -3.4e38f, INFINITY, NAN, 1.0f};
    uint16_t ob[5];
    struct dq_sat sat = {0};
    dq_convert(DQ_F32, in, 5, DQ_BF16, ob, &sat);
    CHECK_EQ_U64(sat.count, 2);
    CHECK_EQ_U64(ob[0], 0x7f7f);
    CHECK_EQ_U64(ob[1], 0xff7f);
    CHECK_EQ_U64(ob[2], 0x7f80);
    CHECK((ob[3] & 0x7f80) == 0x7f80 && (ob[3] & 0x7f) != 0);
    CHECK_EQ_U64(ob[4], 0x3f80);
    double dd[3] = {1e300, 1.0000000596046448, 65520.0};
    uint16_t oh[3];
    sat.count = 0;
    dq_convert(DQ_F64, dd, 3, DQ_F16, oh, &sat);
    CHECK_EQ_U64(sat.count, 2);
    CHECK_EQ_U64(oh[0], 0x7bff);
    CHECK_EQ_U64(oh[1], 0x3c00);
    CHECK_EQ_U64(oh[2], 0x7bff);
    /* f64 -> f32: just above FLT_MAX still rounds to it (not saturated);
     * FLT_MAX + half an ulp would round to inf (saturated, counted). */
    double edge[2] = {0x1.fffffefffffffp+127, 0x1.ffffffp+127};
    float of[2];
    sat.count = 0;
    dq_convert(DQ_F64, edge, 2, DQ_F32, of, &sat);
    CHECK_EQ_U64(sat.count, 1);
    CHECK(of[0] == 3.40282347e38f && of[1] == 3.40282347e38f);
    /* f64 needing one rounding, not two: 1 + 2^-11 + 2^-40 rounds up to
     * 1 + 2^-10 in f16, while f64->f32->f16 would tie to even (1.0). */
    double tricky = 1.0 + ldexp(1, -11) + ldexp(1, -40);
    dq_convert(DQ_F64, &tricky, 1, DQ_F16, oh, NULL);
    CHECK_EQ_U64(oh[0], 0x3c01);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

#if defined(__x86_64__)
__attribute__((target("f16c"))) static uint16_t hw_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}
#endif

static void test_f32_to_f16_matches_hardware(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) {
        fprintf(stderr, "  (no F16C on this CPU: skipped)\n");
        return;
    }
    /* Every 61st bit pattern: all exponents, subnormals, ties. Values that
     * overflow are excluded (the project saturates, hardware gives inf). */
    uint64_t checked = 0;
    for (uint64_t u = 0; u < 0x100000000ull; u += 61) {
        uint32_t x = (uint32_t)u;
        float f;
        memcpy(&f, &x, 4);
        if (!isnan(f) && fabsf(f) >= 65520.0f)
            continue;
        uint16_t got;
        dq_convert(DQ_F32, &f, 1, DQ_F16, &got, NULL);
        uint16_t want = hw_f16(f);
        if (got != want) {
            CHECK_EQ_U64(got, want);
            fprintf(stderr, "  input 0x%08x\n", x);
            break;
        }
        checked++;
    }
    CHECK(checked > 30000000); /* about 39M of the 70M patterns are in range */
#endif
}

static void test_simd_levels_agree(void)
{
    /* Random codes, random scales from tiny (subnormal outputs) to near the
     * f16 limit, odd starts and lengths, every output dtype. */
    enum { N = 5000 };
    uint8_t *packed = malloc(N / 2 + 1);
    float a[N / 32 + 2];
    for (int i = 0; i < N / 2 + 1; i++)
        packed[i] = (uint8_t)rnd();
    for (int round = 0; round < 40; round++) {
        uint32_t bs = 32u << (rnd() % 4);
        for (size_t b = 0; b < sizeof a / sizeof *a; b++) {
            int e = (int)(rnd() % 40) - 30; /* 2^-30 .. 2^9 */
            a[b] = ldexpf(1.0f + (float)(rnd() % 1000) / 1000.0f, e);
            if (rnd() % 17 == 0)
                a[b] = 65000.0f + (float)(rnd() % 2000); /* some saturate in f16 */
        }
        uint64_t k0 = rnd() % 300, n = rnd() % (N - 400);
        const float *ab = a; /* the span's blocks start at k0/bs */
        for (int dt = 0; dt < 3; dt++) {
            enum dq_dtype out = dt == 0 ? DQ_F16 : dt == 1 ? DQ_BF16 : DQ_F32;
            static uint8_t ref[N * 4], got[N * 4];
            struct dq_sat sr = {0}, sg = {0};
            dq_simd_set(DQ_SIMD_SCALAR);
            dq_deq4_span(round & 1 ? DQ_FP4 : DQ_NF4, packed, k0, n, ab, bs, out, ref, &sr);
            for (size_t l = 1; l < 3; l++) {
                dq_simd_set(levels[l]);
                memset(got, 0xa5, sizeof got);
                sg.count = 0;
                dq_deq4_span(round & 1 ? DQ_FP4 : DQ_NF4, packed, k0, n, ab, bs, out, got, &sg);
                CHECK(memcmp(ref, got, n * dq_dtype_size(out)) == 0);
                CHECK_EQ_U64(sg.count, sr.count);
            }
        }
    }
    /* BF16 -> F16 conversion, vector vs scalar, with specials sprinkled in */
    static uint16_t src[N], r1[N], r2[N];
    for (int i = 0; i < N; i++) {
        src[i] = (uint16_t)rnd();
        if (i % 97 == 0) src[i] = 0x7f80; /* inf */
        if (i % 89 == 0) src[i] = 0x7fc1; /* NaN */
    }
    struct dq_sat s1 = {0}, s2 = {0};
    dq_simd_set(DQ_SIMD_SCALAR);
    dq_convert(DQ_BF16, src, N, DQ_F16, r1, &s1);
    for (size_t l = 1; l < 3; l++) {
        dq_simd_set(levels[l]);
        s2.count = 0;
        dq_convert(DQ_BF16, src, N, DQ_F16, r2, &s2);
        CHECK(memcmp(r1, r2, sizeof r1) == 0);
        CHECK_EQ_U64(s1.count, s2.count);
    }
    CHECK(s1.count > 0);
    dq_simd_set(DQ_SIMD_AUTO);
    free(packed);
}

int main(int argc, char **argv)
{
    static const struct tu_case cases[] = {
        {"known_codes", test_known_codes},
        {"fp4_table_is_c_over_12", test_fp4_table_is_c_over_12},
        {"nibble_order", test_nibble_order},
        {"block_boundaries", test_block_boundaries},
        {"saturation", test_saturation},
        {"f32_to_f16_matches_hardware", test_f32_to_f16_matches_hardware},
        {"simd_levels_agree", test_simd_levels_agree},
        {0, 0},
    };
    return tu_main(cases, argc, argv);
}
