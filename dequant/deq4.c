/* deq4.c — the arithmetic: 4-bit codes × block scales → F16/BF16/F32, and
 * plain float conversions, on the CPU.
 *
 * Bit-exactness contract (formats.md §2): each value is one fp32 product
 * table[nibble] * a[block], rounded once, to nearest even, into the output
 * dtype. Finite values too large for the output dtype are clamped to its
 * largest finite value of that sign and counted (struct dq_sat); inf and NaN
 * pass through. The scalar path is the definition; the AVX2 (F16C) and
 * AVX-512 paths must give the same bits and are tested against it.
 *
 * Not here: reading files, scales (qstate.c), layouts and transposes
 * (compute.c).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dq_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define DQ_X86 1
#endif

/* ------------------------------------------------------ scalar rounding */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> fp16, round to nearest even, saturating finite overflow. */
static inline uint16_t f32_to_f16(float f, uint64_t *sat)
{
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) /* inf, NaN (quieted, top payload bits kept) */
        return sign | (ax > 0x7f800000 ? (uint16_t)(0x7e00 | ((ax >> 13) & 0x3ff)) : 0x7c00);
    if (ax >= 0x477ff000) { /* >= 65520 would round to inf */
        (*sat)++;
        return sign | 0x7bff;
    }
    if (ax >= 0x38800000) { /* normal half: rebias, round 23 -> 10 mantissa bits */
        uint32_t r = ax - 0x38000000;
        r += 0xfff + ((r >> 13) & 1);
        return sign | (uint16_t)(r >> 13);
    }
    if (ax <= 0x33000000) /* <= 2^-25: rounds to zero (the tie goes to even 0) */
        return sign;
    uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e; /* 14..24: value in units of 2^-24 is m >> shift */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1)))
        q++;
    return sign | (uint16_t)q;
}

/* fp32 -> bf16, round to nearest even, saturating finite overflow. */
static inline uint16_t f32_to_bf16(float f, uint64_t *sat)
{
    uint32_t x = f32_bits(f);
    uint32_t ax = x & 0x7fffffff;
    if (ax > 0x7f800000)
        return (uint16_t)((x >> 16) | 0x40);
    if (ax == 0x7f800000)
        return (uint16_t)(x >> 16);
    if (ax >= 0x7f7f8000) {
        (*sat)++;
        return (uint16_t)(((x >> 16) & 0x8000) | 0x7f7f);
    }
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f)
        return bits_f32(sign | 0x7f800000 | (m << 13));
    if (e == 0) {
        if (m == 0)
            return bits_f32(sign);
        float v = (float)m * 0x1p-24f; /* exact */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline float bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

/* fp64 -> fp32 rounding to odd, so that a second rounding to F16/BF16 gives
 * the correctly rounded result (24 >= 11 + 2 and 8 + 2 bits). Overflow maps
 * to +-inf only for real infinities; finite huge values become FLT_MAX
 * (they saturate later anyway). */
static inline float f64_to_f32_odd(double d, bool keep_exact_f32, uint64_t *sat)
{
    if (isnan(d) || isinf(d))
        return (float)d;
    /* 2^128 - 2^103: FLT_MAX plus half an ulp, where round-to-nearest-even
     * reaches inf. Values just above FLT_MAX still round to it (no
     * saturation); for F16/BF16 outputs they saturate later anyway. */
    if (fabs(d) >= 3.4028235677973366e38) {
        if (keep_exact_f32)
            (*sat)++;
        return d < 0 ? -3.40282347e38f : 3.40282347e38f;
    }
    float f = (float)d;
    if (keep_exact_f32 || (double)f == d)
        return f;
    if (fabs((double)f) > fabs(d))
        f = nextafterf(f, 0.0f);
    uint32_t u = f32_bits(f) | 1;
    return bits_f32(u);
}

/* ------------------------------------------------------------- scalar */

static inline void store_one(enum dq_dtype out, void *dst, uint64_t i, float v, uint64_t *sat)
{
    if (out == DQ_F16)
        ((uint16_t *)dst)[i] = f32_to_f16(v, sat);
    else if (out == DQ_BF16)
        ((uint16_t *)dst)[i] = f32_to_bf16(v, sat);
    else
        ((float *)dst)[i] = v;
}

static inline unsigned nibble(const uint8_t *codes, uint64_t k)
{
    uint8_t b = codes[k >> 1];
    return (k & 1) ? (b & 0xf) : (b >> 4);
}

static void deq4_scalar(const float *tab, const uint8_t *codes, uint64_t k0, uint64_t n,
                        const float *a, uint32_t bs, enum dq_dtype out, void *dst, uint64_t *sat)
{
    const unsigned bsh = (unsigned)__builtin_ctz(bs); /* blocksize is a power of two */
    uint64_t b0 = k0 >> bsh;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t k = k0 + i;
        float v = tab[nibble(codes, k)] * a[(k >> bsh) - b0];
        store_one(out, dst, i, v, sat);
    }
}

/* ---------------------------------------------------------------- x86 */

#ifdef DQ_X86

/* One 32-element chunk starting at an even k (byte-aligned), all in one
 * block (the caller guarantees: chunks are 32-aligned and blocks >= 32). */

__attribute__((target("avx2,f16c")))
static inline __m256 lut8_avx2(__m256 tlo, __m256 thi, __m128i idx8)
{
    __m256i idx = _mm256_cvtepu8_epi32(idx8);
    __m256 lo = _mm256_permutevar8x32_ps(tlo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(thi, idx);
    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* bit 3 -> sign bit */
    return _mm256_blendv_ps(lo, hi, sel);
}

__attribute__((target("avx2,f16c")))
static inline __m256i bf16_round_avx2(__m256 v)
{
    /* finite inputs only (checked per block): x + 0x7fff + lsb, >> 16 */
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    x = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_srli_epi32(x, 16);
}

__attribute__((target("avx2,f16c")))
static void deq4_chunks_avx2(const float *tab, const uint8_t *codes, uint64_t k, uint64_t nch,
                             const float *a, uint64_t ablk0, unsigned bsh, enum dq_dtype out,
                             void *dst)
{
    const __m256 tlo = _mm256_loadu_ps(tab), thi = _mm256_loadu_ps(tab + 8);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (uint64_t c = 0; c < nch; c++, k += 32) {
        __m256 s = _mm256_set1_ps(a[(k >> bsh) - ablk0]);
        __m128i raw = _mm_loadu_si128((const __m128i *)(codes + (k >> 1)));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        __m128i lo = _mm_and_si128(raw, m4);
        __m128i i0 = _mm_unpacklo_epi8(hi, lo); /* elements 0..15 */
        __m128i i1 = _mm_unpackhi_epi8(hi, lo); /* elements 16..31 */
        __m256 v[4];
        v[0] = _mm256_mul_ps(lut8_avx2(tlo, thi, i0), s);
        v[1] = _mm256_mul_ps(lut8_avx2(tlo, thi, _mm_srli_si128(i0, 8)), s);
        v[2] = _mm256_mul_ps(lut8_avx2(tlo, thi, i1), s);
        v[3] = _mm256_mul_ps(lut8_avx2(tlo, thi, _mm_srli_si128(i1, 8)), s);
        uint64_t o = c * 32;
        if (out == DQ_F16) {
            uint16_t *d = (uint16_t *)dst + o;
            for (int j = 0; j < 4; j++)
                _mm_storeu_si128((__m128i *)(d + 8 * j),
                                 _mm256_cvtps_ph(v[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else if (out == DQ_BF16) {
            uint16_t *d = (uint16_t *)dst + o;
            for (int j = 0; j < 4; j += 2) {
                __m256i p = _mm256_packus_epi32(bf16_round_avx2(v[j]), bf16_round_avx2(v[j + 1]));
                p = _mm256_permute4x64_epi64(p, 0xd8);
                _mm256_storeu_si256((__m256i *)(d + 8 * j), p);
            }
        } else {
            float *d = (float *)dst + o;
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(d + 8 * j, v[j]);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
static void deq4_chunks_avx512(const float *tab, const uint8_t *codes, uint64_t k, uint64_t nch,
                               const float *a, uint64_t ablk0, unsigned bsh, enum dq_dtype out,
                               void *dst)
{
    const __m512 t = _mm512_loadu_ps(tab);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (uint64_t c = 0; c < nch; c++, k += 32) {
        __m512 s = _mm512_set1_ps(a[(k >> bsh) - ablk0]);
        __m128i raw = _mm_loadu_si128((const __m128i *)(codes + (k >> 1)));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        __m128i lo = _mm_and_si128(raw, m4);
        __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), t), s);
        __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), t), s);
        uint64_t o = c * 32;
        if (out == DQ_F16) {
            uint16_t *d = (uint16_t *)dst + o;
            _mm256_storeu_si256((__m256i *)d, _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            _mm256_storeu_si256((__m256i *)(d + 16), _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else if (out == DQ_BF16) {
            uint16_t *d = (uint16_t *)dst + o;
            const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
            __m512i x0 = _mm512_castps_si512(v0), x1 = _mm512_castps_si512(v1);
            x0 = _mm512_add_epi32(x0, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(x0, 16), one)));
            x1 = _mm512_add_epi32(x1, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(x1, 16), one)));
            _mm256_storeu_si256((__m256i *)d, _mm512_cvtepi32_epi16(_mm512_srli_epi32(x0, 16)));
            _mm256_storeu_si256((__m256i *)(d + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x1, 16)));
        } else {
            float *d = (float *)dst + o;
            _mm512_storeu_ps(d, v0);
            _mm512_storeu_ps(d + 16, v1);
        }
    }
}
#endif /* DQ_X86 */

/* ------------------------------------------------------------ dispatch */

static _Atomic int g_simd = DQ_SIMD_AUTO;

static enum dq_simd detect(void)
{
    const char *env = getenv("BNBFS_SIMD");
    enum dq_simd best = DQ_SIMD_SCALAR;
#ifdef DQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        best = DQ_SIMD_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        best = DQ_SIMD_AVX512;
#endif
    if (env) {
        enum dq_simd want = !strcasecmp(env, "avx512") ? DQ_SIMD_AVX512
                          : !strcasecmp(env, "avx2")   ? DQ_SIMD_AVX2
                                                       : DQ_SIMD_SCALAR;
        if (want < best)
            best = want;
    }
    return best;
}

void dq_simd_set(enum dq_simd level)
{
    enum dq_simd best = detect();
    atomic_store(&g_simd, (int)(level == DQ_SIMD_AUTO || level > best ? best : level));
}

enum dq_simd dq_simd_get(void)
{
    int s = atomic_load(&g_simd);
    if (s == DQ_SIMD_AUTO) {
        s = (int)detect();
        atomic_store(&g_simd, s);
    }
    return (enum dq_simd)s;
}

const char *dq_simd_name(enum dq_simd l)
{
    switch (l) {
    case DQ_SIMD_AVX512: return "avx512";
    case DQ_SIMD_AVX2: return "avx2";
    case DQ_SIMD_SCALAR: return "scalar";
    default: return "auto";
    }
}

void dq_deq4_span(enum dq_qtype qt, const uint8_t *codes, uint64_t k0, uint64_t n,
                  const float *a, uint32_t bs, enum dq_dtype out, void *dst, struct dq_sat *sat)
{
    const float *tab = qt == DQ_NF4 ? dq_nf4_table : dq_fp4_table;
    uint64_t cnt = 0;
    enum dq_simd simd = dq_simd_get();
    size_t osz = dq_dtype_size(out);
    if (simd == DQ_SIMD_SCALAR || n < 64) {
        deq4_scalar(tab, codes, k0, n, a, bs, out, dst, &cnt);
        goto done;
    }
#ifdef DQ_X86
    {
        const unsigned bsh = (unsigned)__builtin_ctz(bs); /* power of two: no divisions */
        const uint64_t ablk0 = k0 >> bsh;
        const float lim = dq_dtype_max(out);
        uint64_t k = k0, end = k0 + n;
        uint64_t head = ((k0 + 31) & ~(uint64_t)31) - k0;
        if (head) {
            deq4_scalar(tab, codes, k, head, a, bs, out, dst, &cnt);
            k += head;
        }
        while (end - k >= 32) {
            /* Chunks of one block run vectorized while no value can exceed
             * the output range (|table| <= 1, so |a| below the limit is
             * enough); a block that might saturate goes through the scalar
             * path, which counts. */
            uint64_t blk_end = ((k >> bsh) + 1) << bsh;
            uint64_t stop = blk_end < end ? blk_end : end;
            uint64_t nch = (stop - k) / 32;
            uint8_t *d = (uint8_t *)dst + (k - k0) * osz;
            float s = a[(k >> bsh) - ablk0];
            if (nch == 0)
                break;
            if (fabsf(s) < lim || out == DQ_F32) {
                if (simd == DQ_SIMD_AVX512)
                    deq4_chunks_avx512(tab, codes, k, nch, a, ablk0, bsh, out, d);
                else
                    deq4_chunks_avx2(tab, codes, k, nch, a, ablk0, bsh, out, d);
            } else {
                /* deq4_scalar indexes a[] from k's block: pass the shifted base */
                deq4_scalar(tab, codes, k, nch * 32, a + ((k >> bsh) - ablk0), bs, out, d, &cnt);
            }
            k += nch * 32;
        }
        if (k < end)
            deq4_scalar(tab, codes, k, end - k, a + ((k >> bsh) - ablk0), bs, out,
                        (uint8_t *)dst + (k - k0) * osz, &cnt);
    }
#else
    deq4_scalar(tab, codes, k0, n, a, bs, out, dst, &cnt);
#endif
done:
    if (sat)
        sat->count += cnt;
}

/* ---------------------------------------------------- plain conversions */

static inline float load_in(enum dq_dtype in, const void *src, uint64_t i, enum dq_dtype out,
                            uint64_t *sat)
{
    /* Source tensors need not be aligned (safetensors does not pad), so
     * elements are loaded with memcpy. */
    uint16_t h;
    switch (in) {
    case DQ_F16: memcpy(&h, (const uint8_t *)src + 2 * i, 2); return f16_to_f32(h);
    case DQ_BF16: memcpy(&h, (const uint8_t *)src + 2 * i, 2); return bf16_to_f32(h);
    case DQ_F32: {
        float f;
        memcpy(&f, (const uint8_t *)src + 4 * i, 4);
        return f;
    }
    default: { /* F64 */
        double d;
        memcpy(&d, (const uint8_t *)src + 8 * i, 8);
        return f64_to_f32_odd(d, out == DQ_F32, sat);
    }
    }
}

#ifdef DQ_X86
/* BF16 -> F16, 16 at a time; lanes that may saturate or are non-finite go
 * through the scalar code so the count and NaN payloads match exactly. */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
static uint64_t bf16_to_f16_avx512(const uint16_t *s, uint16_t *d, uint64_t n)
{
    uint64_t i = 0;
    const __m512 lim = _mm512_set1_ps(65504.0f);
    for (; i + 16 <= n; i += 16) {
        __m512i x = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i))), 16);
        __m512 f = _mm512_castsi512_ps(x);
        __m512 af = _mm512_abs_ps(f);
        if (_mm512_cmp_ps_mask(af, lim, _CMP_NLE_UQ)) /* > max, or NaN */
            break;
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return i;
}

__attribute__((target("avx2,f16c")))
static uint64_t bf16_to_f16_avx2(const uint16_t *s, uint16_t *d, uint64_t n)
{
    uint64_t i = 0;
    const __m256 lim = _mm256_set1_ps(65504.0f);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
        __m256 f = _mm256_castsi256_ps(x);
        __m256 bad = _mm256_cmp_ps(_mm256_and_ps(f, absmask), lim, _CMP_NLE_UQ);
        if (_mm256_movemask_ps(bad))
            break;
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return i;
}
#endif

void dq_convert(enum dq_dtype in, const void *src, uint64_t n, enum dq_dtype out, void *dst,
                struct dq_sat *sat)
{
    uint64_t cnt = 0;
    if (in == out) {
        memcpy(dst, src, n * dq_dtype_size(in));
        return;
    }
    uint64_t i = 0;
#ifdef DQ_X86
    /* The hot case for gpt-oss (embeddings, lm_head): BF16 -> F16. A
     * vector run stops at the first lane that needs care; the scalar
     * loop takes over for a while and hands back. */
    if (in == DQ_BF16 && out == DQ_F16 && dq_simd_get() != DQ_SIMD_SCALAR) {
        const uint16_t *s = src;
        uint16_t *d = dst;
        while (i < n) {
            i += dq_simd_get() == DQ_SIMD_AVX512 ? bf16_to_f16_avx512(s + i, d + i, n - i)
                                                 : bf16_to_f16_avx2(s + i, d + i, n - i);
            uint64_t stop = i + 16 < n ? i + 16 : n;
            for (; i < stop; i++) {
                uint16_t h;
                memcpy(&h, s + i, 2);
                d[i] = f32_to_f16(bf16_to_f32(h), &cnt);
            }
        }
    }
#endif
    for (; i < n; i++)
        store_one(out, dst, i, load_in(in, src, i, out, &cnt), &cnt);
    if (sat)
        sat->count += cnt;
}

/* ------------------------------------------- per-element scales (FUSE_T) */

/* out[i] = table[codes[i]] * scales[i], codes one per byte (0..15). Used by
 * the fused-transpose fast path, where consecutive outputs come from
 * different source rows and so from different blocks. */
static void deq_scaled_scalar(const float *tab, const uint8_t *codes, const float *sc, size_t n,
                              enum dq_dtype out, void *dst, uint64_t *sat)
{
    for (size_t i = 0; i < n; i++)
        store_one(out, dst, i, tab[codes[i] & 15] * sc[i], sat);
}

#ifdef DQ_X86
__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
static size_t deq_scaled_avx512(const float *tab, const uint8_t *codes, const float *sc, size_t n,
                                enum dq_dtype out, void *dst)
{
    const __m512 t = _mm512_loadu_ps(tab);
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
        __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, t), _mm512_loadu_ps(sc + i));
        if (out == DQ_F16) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i),
                                _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else if (out == DQ_BF16) {
            __m512i x = _mm512_castps_si512(v);
            x = _mm512_add_epi32(x, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(x, 16), one)));
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
        } else {
            _mm512_storeu_ps((float *)dst + i, v);
        }
    }
    return i;
}

__attribute__((target("avx2,f16c")))
static size_t deq_scaled_avx2(const float *tab, const uint8_t *codes, const float *sc, size_t n,
                              enum dq_dtype out, void *dst)
{
    const __m256 tlo = _mm256_loadu_ps(tab), thi = _mm256_loadu_ps(tab + 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(lut8_avx2(tlo, thi, _mm_loadl_epi64((const __m128i *)(codes + i))),
                                 _mm256_loadu_ps(sc + i));
        if (out == DQ_F16) {
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                             _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else if (out == DQ_BF16) {
            __m256i r = bf16_round_avx2(v);
            __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), p);
        } else {
            _mm256_storeu_ps((float *)dst + i, v);
        }
    }
    return i;
}
#endif

void dq_deq_codes_scaled(enum dq_qtype qt, const uint8_t *codes, const float *scales, size_t n,
                         enum dq_dtype out, void *dst, bool may_saturate, struct dq_sat *sat)
{
    const float *tab = qt == DQ_NF4 ? dq_nf4_table : dq_fp4_table;
    uint64_t cnt = 0;
    size_t i = 0;
#ifdef DQ_X86
    /* Vector lanes cannot count saturations; callers say when no scale can
     * overflow the output dtype. */
    enum dq_simd simd = dq_simd_get();
    if (!may_saturate && simd == DQ_SIMD_AVX512)
        i = deq_scaled_avx512(tab, codes, scales, n, out, dst);
    else if (!may_saturate && simd == DQ_SIMD_AVX2)
        i = deq_scaled_avx2(tab, codes, scales, n, out, dst);
#else
    (void)may_saturate;
#endif
    deq_scaled_scalar(tab, codes + i, scales + i, n - i, out,
                      (uint8_t *)dst + i * dq_dtype_size(out), &cnt);
    if (sat)
        sat->count += cnt;
}
