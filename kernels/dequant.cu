/* dequant.cu — CUDA kernels for the mount's output bytes: 4-bit NF4/FP4 ->
 * F16/BF16/F32 as a flat element range (COPY/STACK) or as rows of the
 * transposed expert-fused layout (FUSE_T), and plain float conversion.
 * Each op has three layers (ggml style): a static kernel, a launcher taking
 * raw pointers and an explicit stream, and the public kn_* entry that checks
 * its arguments (kernels.h).
 *
 * Not here: staging, streams and buffers (kn_ctx.c), LLM kernels (llm*.cu).
 *
 * Invariant (the point of this file): every value is bit-identical to the
 * CPU reference in dequant/deq4.c and qstate.c:
 *   scale  a = f32(f32(nested_map[u8] * nested_absmax[b / nbs]) + offset)
 *   value  v = f32(table[nibble] * a), rounded once to nearest even,
 * with the products and the sum written as __fmul_rn/__fadd_rn so nvcc can
 * never contract them into an FMA, and with the CPU's treatment of
 * saturation (finite overflow -> largest finite, counted) and NaN payloads.
 * Do not build this file with --use_fast_math (it would flush subnormals).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kn_internal.h"

/* ------------------------------------------------------------ errors */

extern "C" int kn_cuda_fail(const char *call, cudaError_t err, const char *file, int line)
{
    dq_log(DQ_LOG_ERROR, KN_TAG, "%s failed: %s (%s) at %s:%d", call, cudaGetErrorName(err),
           cudaGetErrorString(err), file, line);
    return -EIO;
}

namespace {

/* ---------------------------------------------------- output rounding */

enum : int { OUT_F16 = 0, OUT_BF16 = 1, OUT_F32 = 2 };

template <int OUT> struct out_t { typedef uint16_t type; };
template <> struct out_t<OUT_F32> { typedef float type; };

/* f32 -> F16 bits exactly as deq4.c's f32_to_f16: NaN keeps sign and top
 * payload bits (quieted), values that would round to inf saturate. */
__device__ __forceinline__ uint16_t to_f16(float f, unsigned &sat)
{
    uint32_t x = __float_as_uint(f), ax = x & 0x7fffffffu;
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    if (ax >= 0x477ff000u) { /* >= 65520: inf/NaN, or rounds past 65504 */
        if (ax > 0x7f800000u)
            return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
        if (ax == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        sat++;
        return (uint16_t)(sign | 0x7bffu);
    }
    return __half_as_ushort(__float2half_rn(f));
}

/* f32 -> BF16 bits exactly as deq4.c's f32_to_bf16. */
__device__ __forceinline__ uint16_t to_bf16(float f, unsigned &sat)
{
    uint32_t x = __float_as_uint(f), ax = x & 0x7fffffffu;
    if (ax >= 0x7f7f8000u) {
        if (ax > 0x7f800000u)
            return (uint16_t)((x >> 16) | 0x40u);
        if (ax == 0x7f800000u)
            return (uint16_t)(x >> 16);
        sat++;
        return (uint16_t)(((x >> 16) & 0x8000u) | 0x7f7fu);
    }
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

template <int OUT>
__device__ __forceinline__ typename out_t<OUT>::type round_out(float v, unsigned &sat)
{
    if constexpr (OUT == OUT_F16)
        return to_f16(v, sat);
    else if constexpr (OUT == OUT_BF16)
        return to_bf16(v, sat);
    else
        return v;
}

/* True when no product table[n] * a (|table| <= 1) can reach the output's
 * saturation edge (F16 65520, BF16 0x7f7f8000), so a fast path may round
 * without per-value checks; false for NaN. F32 never saturates here. */
template <int OUT>
__device__ __forceinline__ bool no_sat(float a)
{
    if constexpr (OUT == OUT_F16)
        return fabsf(a) < 65504.0f;
    else if constexpr (OUT == OUT_BF16)
        return fabsf(a) < 3.38953139e38f;
    else
        return true;
}

/* Bits below which an f32 rounds to a finite, unsaturated F16/BF16. */
template <int OUT> __host__ __device__ constexpr uint32_t fin_lim() { return OUT == OUT_F16 ? 0x477ff000u : 0x7f7f8000u; }

/* Two finite, unsaturated values rounded to nearest even in one paired
 * conversion (cvt.rn.{f16,bf16}x2.f32): x in the low half, as in memory. */
template <int OUT>
__device__ __forceinline__ uint32_t pack2(float x, float y)
{
    uint32_t u;
    if constexpr (OUT == OUT_F16) {
        __half2 h = __floats2half2_rn(x, y);
        memcpy(&u, &h, 4);
    } else {
        __nv_bfloat162 b = __floats2bfloat162_rn(x, y);
        memcpy(&u, &b, 4);
    }
    return u;
}

/* Adds the threads' saturation counts to the counters: one atomic per warp
 * (every lane of the warp must call it; blocks are multiples of 32). */
__device__ __forceinline__ void flush_sat(kn_counters *cnt, unsigned sat)
{
    const unsigned tot = __reduce_add_sync(0xffffffffu, sat);
    if ((threadIdx.x & 31) == 0 && tot)
        atomicAdd(&cnt->saturated, (unsigned long long)tot);
}

/* ---------------------------------------------------------- 4-bit data */

/* Kernel-side copy of struct kn_q4 (by value, in the parameter bank). */
struct q4p {
    const uint8_t *codes;
    uint64_t code_base;
    const void *absmax;
    uint64_t absmax_base;
    const float *nabs;
    uint64_t nbase;
    const float *nmap;
    float noff;
    uint32_t lbs;   /* log2 blocksize */
    uint32_t lnbs;  /* log2 nested blocksize */
    int nested;
    float table[16];
};

__device__ __forceinline__ void report_bad(kn_counters *cnt, uint64_t b)
{
    atomicAdd(&cnt->bad_scales, 1ull);
    atomicMin(&cnt->first_bad, (unsigned long long)b);
}

/* Scale of block b (formats.md §2); flags a non-finite one. */
__device__ __forceinline__ float scale_of(const q4p &q, uint64_t b, kn_counters *cnt)
{
    float a;
    if (q.nested) {
        unsigned u = __ldg((const uint8_t *)q.absmax + (b - q.absmax_base));
        float m = __ldg(q.nmap + u);
        float na = __ldg(q.nabs + ((b >> q.lnbs) - q.nbase));
        a = __fadd_rn(__fmul_rn(m, na), q.noff);
    } else {
        a = __ldg((const float *)q.absmax + (b - q.absmax_base));
    }
    if (!isfinite(a))
        report_bad(cnt, b);
    return a;
}

/* Nibble i (0..31) of a 16-byte group: byte i/2, high nibble first. */
__device__ __forceinline__ unsigned nib32(const uint4 &v, int i)
{
    uint32_t w = (i < 8) ? v.x : (i < 16) ? v.y : (i < 24) ? v.z : v.w;
    int byte = (i >> 1) & 3;
    return (w >> (8 * byte + ((i & 1) ? 0 : 4))) & 0xfu;
}

__device__ __forceinline__ uint4 load16_guarded(const uint8_t *p, uint64_t off, uint64_t end)
{
    if (off + 16 <= end)
        return __ldg((const uint4 *)(p + off));
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (off + i < end)
            w[i >> 2] |= (uint32_t)__ldg(p + off + i) << (8 * (i & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* ------------------------------------------------------- flat: kernels */

constexpr int FLAT_THREADS = 128;
constexpr int FLAT_TILE = FLAT_THREADS * 32;          /* elements per tile (one 16 B load each) */
constexpr int FLAT_MAXBLK = FLAT_TILE / 32 + 2;       /* blocks a tile can touch */

/* Any alignment (k0 odd, unaligned pointers): one element per thread. */
template <int OUT>
__global__ void __launch_bounds__(256)
k_deq4_flat_any(q4p q, uint64_t k0, uint64_t n, void *dst, kn_counters *cnt)
{
    typedef typename out_t<OUT>::type T;
    __shared__ float tab[16];
    if (threadIdx.x < 16)
        tab[threadIdx.x] = q.table[threadIdx.x];
    __syncthreads();
    unsigned sat = 0;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t k = k0 + i;
        const uint8_t byte = __ldg(q.codes + ((k - q.code_base) >> 1));
        const unsigned nb = (k & 1) ? (byte & 0xfu) : (byte >> 4);
        const float a = scale_of(q, k >> q.lbs, cnt);
        ((T *)dst)[i] = round_out<OUT>(__fmul_rn(tab[nb], a), sat);
    }
    flush_sat(cnt, sat);
}

/* Fast path: k0 even, codes of k0 and dst 16-byte aligned. One tile of
 * 4096 elements per iteration: 16-byte coalesced loads of the codes into
 * shared memory and the tile's block scales computed once into shared
 * memory; then per thread and step a chunk of VEC elements (one 16-byte
 * coalesced store). A chunk lies in one block whenever k0 % VEC == 0; when
 * its scale cannot saturate, its products are rounded in pairs without
 * per-value checks. Other chunks (a block edge, a saturating scale, the
 * tail) take the exact per-element path. In-tile offsets are 32-bit: the
 * first version's 64-bit index arithmetic per element held it to ~53% of
 * the copy bandwidth for F16 (tests/bench/NOTES-kernels.md). */
template <int OUT>
__global__ void __launch_bounds__(FLAT_THREADS)
k_deq4_flat(q4p q, uint64_t k0, uint64_t n, void *dst, kn_counters *cnt)
{
    typedef typename out_t<OUT>::type T;
    constexpr int VEC = 16 / sizeof(T);
    constexpr int STEPS = FLAT_TILE / VEC / FLAT_THREADS;
    __shared__ float tab[16];
    __shared__ uint4 sc[FLAT_THREADS];
    __shared__ float sa[FLAT_MAXBLK];
    const int t = threadIdx.x;
    if (t < 16)
        tab[t] = q.table[t];
    const uint8_t *codes = q.codes + ((k0 - q.code_base) >> 1);
    const uint64_t nbytes = (n + 1) >> 1;
    const uint64_t ntiles = (n + FLAT_TILE - 1) / FLAT_TILE;
    const uint32_t lbs = q.lbs;
    unsigned sat = 0;
    for (uint64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const uint64_t i0 = tile * FLAT_TILE;
        const uint32_t nin = (uint32_t)(n - i0 < (uint64_t)FLAT_TILE ? n - i0 : FLAT_TILE);
        sc[t] = load16_guarded(codes, i0 / 2 + (uint64_t)t * 16, nbytes);
        const uint64_t b0 = (k0 + i0) >> lbs, b1 = (k0 + i0 + nin - 1) >> lbs;
        for (uint64_t b = b0 + t; b <= b1; b += FLAT_THREADS)
            sa[b - b0] = scale_of(q, b, cnt);
        /* block of tile element e: (off0 + e) >> lbs - b0 */
        const uint32_t off0 = (uint32_t)((k0 + i0) & ((1ull << lbs) - 1));
        __syncthreads();
#pragma unroll
        for (int j = 0; j < STEPS; j++) {
            const uint32_t ch = j * FLAT_THREADS + t, e0 = ch * VEC;
            if (e0 >= nin)
                break;
            const uint32_t w = VEC == 8 ? ((const uint32_t *)sc)[ch] : ((const uint16_t *)sc)[ch];
            const uint32_t ba = (off0 + e0) >> lbs, bb = (off0 + e0 + VEC - 1) >> lbs;
            const float a = sa[ba];
            T *d = (T *)dst + i0 + e0;
            if (e0 + VEC <= nin && ba == bb && no_sat<OUT>(a)) {
                uint4 r;
                if constexpr (OUT == OUT_F32) {
                    r.x = __float_as_uint(__fmul_rn(tab[(w >> 4) & 15], a));
                    r.y = __float_as_uint(__fmul_rn(tab[w & 15], a));
                    r.z = __float_as_uint(__fmul_rn(tab[(w >> 12) & 15], a));
                    r.w = __float_as_uint(__fmul_rn(tab[(w >> 8) & 15], a));
                } else {
                    uint32_t p[4];
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        const uint32_t byte = (w >> (8 * b)) & 0xffu;
                        p[b] = pack2<OUT>(__fmul_rn(tab[byte >> 4], a), __fmul_rn(tab[byte & 15], a));
                    }
                    r = make_uint4(p[0], p[1], p[2], p[3]);
                }
                *(uint4 *)d = r;
            } else {
                for (uint32_t e = 0; e < (uint32_t)VEC && e0 + e < nin; e++) {
                    const unsigned nb = (w >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 0xfu;
                    d[e] = round_out<OUT>(__fmul_rn(tab[nb], sa[(off0 + e0 + e) >> lbs]), sat);
                }
            }
        }
        __syncthreads();
    }
    flush_sat(cnt, sat);
}

/* ----------------------------------------------------- FUSE_T: kernel */

constexpr int FT_THREADS = 128;
constexpr int FT_TR = 128;  /* output rows r per tile (source columns) */
constexpr int FT_TC = 64;   /* output columns c per tile (source rows) */

struct fusep {
    uint64_t C, R, rb, re, pitch, r0, r1;
    uint64_t tiles_y;       /* row tiles from rb to r1 */
    int fast;               /* 16-byte aligned 32-element groups (see kn_deq4_fuse_t) */
    int vstore;             /* 16-byte stores (dst aligned, C % VEC == 0) */
};

/* One 128 (r) x 64 (c) output tile per iteration. Load phase: thread t
 * takes the two adjacent source rows c = ct + 2*(t % 32) + {0, 1} and the
 * 32-column group t / 32 (one warp per group): two 16-byte loads in flight
 * (a group is one block: blocks are >= 32 and groups 32-aligned), and for
 * each r one 4-byte (F16/BF16 pair, rounded together) or 8-byte (F32 pair)
 * shared-memory store; a warp writes consecutive words of one tile row, so
 * no bank conflicts. Store phase: each warp writes 512 consecutive bytes of
 * the tile's output rows with 16-byte stores. Unaligned shapes (odd R, a
 * band not 32-aligned) load element by element. Aligned shapes go to
 * k_deq4_fuse_rt instead (below); this kernel serves the rest. */
template <int OUT>
__global__ void __launch_bounds__(FT_THREADS)
k_deq4_fuse_t(q4p q, fusep f, void *dst, kn_counters *cnt)
{
    typedef typename out_t<OUT>::type T;
    constexpr int VEC = 16 / sizeof(T);
    constexpr int CPR = FT_TC / VEC;
    constexpr int STEPS = FT_TR * CPR / FT_THREADS;
    __shared__ float tab[16];
    __shared__ __align__(16) T tile[FT_TR][FT_TC];
    const int t = threadIdx.x;
    if (t < 16)
        tab[t] = q.table[t];
    __syncthreads();
    unsigned sat = 0;
    const int cp = t & 31, h = t >> 5;
    const uint64_t ct = (uint64_t)blockIdx.x * FT_TC;
    const uint64_t c0 = ct + 2 * cp, c1 = c0 + 1;
    const bool has1 = c1 < f.C;
    for (uint64_t ty = blockIdx.y; ty < f.tiles_y; ty += gridDim.y) {
        const uint64_t rt = f.rb + ty * FT_TR;
        const uint64_t g = rt + 32 * (uint64_t)h;
        if (c0 < f.C && g < f.r1 && g < f.re && g + 32 > f.r0) {
            const int ilo = g >= f.r0 ? 0 : (int)(f.r0 - g);          /* stored rows [ilo, ihi) */
            const int ihi = g + 32 <= f.r1 ? 32 : (int)(f.r1 - g);
            T *row = &tile[32 * h][2 * cp];
            if (f.fast && g + 32 <= f.re) {
                const uint8_t *p0 = q.codes + c0 * f.pitch + ((g - f.rb) >> 1);
                const uint4 x0 = __ldg((const uint4 *)p0);
                const uint4 x1 = has1 ? __ldg((const uint4 *)(p0 + f.pitch)) : make_uint4(0, 0, 0, 0);
                const float a0 = scale_of(q, (c0 * f.R + g) >> q.lbs, cnt);
                const float a1 = has1 ? scale_of(q, (c1 * f.R + g) >> q.lbs, cnt) : 0.0f;
                if (no_sat<OUT>(a0) && no_sat<OUT>(a1)) {
#pragma unroll
                    for (int i = 0; i < 32; i++) {
                        const float y0 = __fmul_rn(tab[nib32(x0, i)], a0);
                        const float y1 = __fmul_rn(tab[nib32(x1, i)], a1);
                        if constexpr (OUT == OUT_F32)
                            *(float2 *)(row + i * FT_TC) = make_float2(y0, y1);
                        else
                            *(uint32_t *)(row + i * FT_TC) = pack2<OUT>(y0, y1);
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 32; i++) {
                        unsigned s0 = 0, s1 = 0;
                        row[i * FT_TC] = round_out<OUT>(__fmul_rn(tab[nib32(x0, i)], a0), s0);
                        row[i * FT_TC + 1] = round_out<OUT>(__fmul_rn(tab[nib32(x1, i)], a1), s1);
                        sat += i >= ilo && i < ihi ? s0 + s1 : 0;
                    }
                }
            } else {
                for (int k = 0; k < 2; k++) {
                    const uint64_t c = c0 + k;
                    if (c >= f.C)
                        break;
                    const uint64_t kc = c * f.R;
                    const uint64_t rowbyte = c * f.pitch - ((kc + f.rb) >> 1);
                    uint64_t lastb = ~0ull;
                    float a = 0.0f;
                    for (int i = 0; i < 32 && g + i < f.re; i++) {
                        const uint64_t kk = kc + g + i;
                        const uint8_t byte = __ldg(q.codes + rowbyte + (kk >> 1));
                        const unsigned nb = (kk & 1) ? (byte & 0xfu) : (byte >> 4);
                        if ((kk >> q.lbs) != lastb) {
                            lastb = kk >> q.lbs;
                            a = scale_of(q, lastb, cnt);
                        }
                        unsigned s1 = 0;
                        row[i * FT_TC + k] = round_out<OUT>(__fmul_rn(tab[nb], a), s1);
                        sat += i >= ilo && i < ihi ? s1 : 0;
                    }
                }
            }
        }
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < STEPS; j++) {
            const int ch = j * FT_THREADS + t;
            const int rl = ch / CPR, cc = (ch % CPR) * VEC;
            const uint64_t r = rt + rl, cs = ct + cc;
            if (r < f.r0 || r >= f.r1 || cs >= f.C)
                continue;
            T *d = (T *)dst + (r - f.r0) * f.C + cs;
            if (f.vstore && cs + VEC <= f.C) {
                *(uint4 *)d = *(const uint4 *)&tile[rl][cc];
            } else {
                for (int e = 0; e < VEC && cs + e < f.C; e++)
                    d[e] = tile[rl][cc + e];
            }
        }
        __syncthreads();
    }
    flush_sat(cnt, sat);
}

/* ------------------------------- FUSE_T: register-transposed kernel (rt) */

constexpr int RT_THREADS = 128;
constexpr int RT_WARPS = RT_THREADS / 32;

/* One plain 16-byte global store of w; p is 16-byte aligned. (Written as a
 * uint4 assignment, nvcc split some of these stores into four 4-byte ones.) */
__device__ __forceinline__ void st16(void *p, const uint32_t (&w)[4])
{
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]));
}

/* The work of one lane: ROWS adjacent source rows (the ROWS output columns
 * of one 16-byte store) x one group of COLS columns (32 or 16: one 16- or
 * 8-byte code load per row; COLS/8 code words). LPG = 64 / COLS adjacent
 * lanes share the rows and take consecutive groups, so a warp-wide code
 * load reads whole 32-byte sectors. */
template <int OUT, int ROWS, int COLS> struct rt_shape {
    typedef typename out_t<OUT>::type T;
    static constexpr int LPG = 64 / COLS;
    static constexpr int WORDS = COLS / 8;
    static_assert(COLS == 32 || COLS == 16, "32- or 16-column groups");
    static_assert(ROWS * sizeof(T) == 16, "one 16-byte store per output row segment");
};

/* Where the warps of k_deq4_fuse_rt work: warp tiles of LPG column groups
 * (output rows r) x 32/LPG groups of ROWS source rows (output columns c). */
struct rtp {
    uint64_t g0;    /* first column group, rb + COLS * floor((r0 - rb) / COLS) */
    uint64_t ng;    /* column groups from g0 that reach into [r0, r1) */
    uint64_t ncg;   /* groups of ROWS source rows: C / ROWS */
    uint64_t wtc;   /* warp tiles across C */
    uint64_t nwt;   /* warp tiles in all */
    uint32_t zero;  /* 0, unknown to the compiler: see rt_tile */
};

/* One lane's inputs: ROWS source rows x one column group of codes, and per
 * row the scale's first-level load (U8 code with its nested absmax, or the
 * F32 absmax bits); the nested-map lookup waits until they are used. */
template <int ROWS, int COLS> struct rt_in {
    uint32_t x[ROWS][COLS / 8];
    uint32_t s[ROWS];
    float na[ROWS];
};

/* Lane `lane` of warp tile `tile`: its first source row c0 and group g;
 * false when the lane falls past C or past the rows. */
template <int OUT, int ROWS, int COLS>
__device__ __forceinline__ bool rt_where(const rtp &w, uint64_t tile, int lane, uint64_t &c0,
                                         uint64_t &g)
{
    constexpr int LPG = rt_shape<OUT, ROWS, COLS>::LPG;
    const uint64_t wr = tile / w.wtc, wc = tile - wr * w.wtc;
    const uint64_t cg = wc * (32 / LPG) + lane / LPG, rg = wr * LPG + lane % LPG;
    c0 = cg * ROWS;
    g = w.g0 + COLS * rg;
    return cg < w.ncg && rg < w.ng;
}

/* The COLS/2 code bytes of one row at p into x; with nb < COLS/2 (a group
 * that runs past the band end) only the first nb bytes are read. */
template <int COLS>
__device__ __forceinline__ void rt_codes(const uint8_t *p, uint64_t nb, uint32_t (&x)[COLS / 8])
{
    if constexpr (COLS == 32) {
        const uint4 v = nb >= 16 ? __ldg((const uint4 *)p) : load16_guarded(p, 0, nb);
        x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
    } else if (nb >= 8) {
        const uint2 v = __ldg((const uint2 *)p);
        x[0] = v.x, x[1] = v.y;
    } else {
        x[0] = x[1] = 0;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if ((uint64_t)i < nb)
                x[i >> 2] |= (uint32_t)__ldg(p + i) << (8 * (i & 3));
    }
}

/* Issues the lane's loads (nothing waits on them here). A group that runs
 * past the band end re reads only the band's bytes (the columns beyond are
 * never stored). */
template <int ROWS, int COLS, bool NESTED>
__device__ __forceinline__ void rt_load(const q4p &q, const fusep &f, uint64_t c0, uint64_t g,
                                        rt_in<ROWS, COLS> &in)
{
    const uint8_t *p = q.codes + c0 * f.pitch + ((g - f.rb) >> 1);
    if (g + COLS <= f.re) {
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            rt_codes<COLS>(p + k * f.pitch, COLS / 2, in.x[k]);
    } else {
        const uint64_t nb = ((f.re - 1 - g) >> 1) + 1;
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            rt_codes<COLS>(p + k * f.pitch, nb, in.x[k]);
    }
    const uint64_t k0 = c0 * f.R + g;
#pragma unroll
    for (int k = 0; k < ROWS; k++) {
        const uint64_t b = (k0 + k * f.R) >> q.lbs;
        if constexpr (NESTED) {
            in.s[k] = __ldg((const uint8_t *)q.absmax + (b - q.absmax_base));
            in.na[k] = __ldg(q.nabs + ((b >> q.lnbs) - q.nbase));
        } else {
            in.s[k] = __float_as_uint(__ldg((const float *)q.absmax + (b - q.absmax_base)));
            in.na[k] = 0.0f;
        }
    }
}

/* Table entry at byte offset off (4 * nibble). */
__device__ __forceinline__ float tab_at(const float *tab, uint32_t off)
{
    return *(const float *)((const char *)tab + off);
}

/* Nibble i (0 <= i < 8 * NW) of code words x: byte i/2, high nibble first
 * (selects, not an indexed load: i varies at run time). */
template <int NW>
__device__ __forceinline__ unsigned nibw(const uint32_t (&x)[NW], int i)
{
    uint32_t w;
    if constexpr (NW == 4)
        w = (i < 8) ? x[0] : (i < 16) ? x[1] : (i < 24) ? x[2] : x[3];
    else
        w = (i < 8) ? x[0] : x[1];
    return (w >> (8 * ((i >> 1) & 3) + ((i & 1) ? 0 : 4))) & 0xfu;
}

/* ROWS values y (one output row's segment) as the 16-byte store's words. */
template <int OUT, int ROWS>
__device__ __forceinline__ void rt_pack(const float (&y)[ROWS], uint32_t (&o)[4])
{
    if constexpr (OUT == OUT_F32) {
#pragma unroll
        for (int k = 0; k < 4; k++)
            o[k] = __float_as_uint(y[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; k++)
            o[k] = pack2<OUT>(y[2 * k], y[2 * k + 1]);
    }
}

/* Dequantizes the lane's ROWS x COLS values and stores each output row's
 * ROWS values (rows r0 <= r < r1 only) with one 16-byte store. Scales as scale_of
 * computes them. A whole group with scales that cannot saturate runs
 * without branches: 4 * nibble for the 4 high (low) nibbles of a code word
 * is one shift and one mask, then one byte permute per value. A group cut
 * by r0 or r1, or with a scale that could saturate (or is not finite),
 * takes the exact per-value path, which counts only stored values. */
template <int OUT, int ROWS, int COLS, bool NESTED>
__device__ __forceinline__ void rt_tile(const q4p &q, const fusep &f, const rt_in<ROWS, COLS> &in,
                                        uint64_t c0, uint64_t g, const float *tab,
                                        const float *smap, uint32_t zero, void *dst,
                                        kn_counters *cnt, unsigned &sat)
{
    typedef rt_shape<OUT, ROWS, COLS> S;
    typedef typename S::T T;
    /* Every nested-map lookup depends on all first-level loads (through
     * `zero`, which is 0): otherwise ptxas waits for the first row's U8
     * code before it issues the last rows' loads, two memory round trips
     * per tile instead of one. */
    uint32_t dep = 0;
    if constexpr (NESTED)
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            dep |= in.s[k] | __float_as_uint(in.na[k]);
    const float *sm = smap + (dep & zero);
    float a[ROWS];
    bool easy = true, finite = true;
#pragma unroll
    for (int k = 0; k < ROWS; k++) {
        a[k] = NESTED ? __fadd_rn(__fmul_rn(sm[in.s[k]], in.na[k]), q.noff)
                      : __uint_as_float(in.s[k]);
        finite = finite && isfinite(a[k]);
        easy = easy && no_sat<OUT>(a[k]);
    }
    if (!finite) /* one branch, so the rows' scale arithmetic is one basic block */
#pragma unroll
        for (int k = 0; k < ROWS; k++)
            if (!isfinite(a[k]))
                report_bad(cnt, ((c0 + k) * f.R + g) >> q.lbs);
    const int i0 = g < f.r0 ? (int)(f.r0 - g) : 0;          /* stored rows [i0, i1) */
    const int i1 = f.r1 - g < COLS ? (int)(f.r1 - g) : COLS;
    T *d = (T *)dst + (g + i0 - f.r0) * f.C + c0;           /* output of row g + i0 */
    if (easy && i0 == 0 && i1 == COLS) {
#pragma unroll
        for (int wd = 0; wd < S::WORDS; wd++) {     /* code word wd: rows 8*wd .. 8*wd + 7 */
            uint32_t hi[ROWS], lo[ROWS];
#pragma unroll
            for (int k = 0; k < ROWS; k++) {
                hi[k] = (in.x[k][wd] >> 2) & 0x3c3c3c3cu;
                lo[k] = (in.x[k][wd] << 2) & 0x3c3c3c3cu;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {     /* byte e/2; high nibble first */
                const uint32_t sel = 0x4440u | (uint32_t)(e >> 1);
                float y[ROWS];
#pragma unroll
                for (int k = 0; k < ROWS; k++)
                    y[k] = __fmul_rn(tab_at(tab, __byte_perm(e & 1 ? lo[k] : hi[k], 0, sel)), a[k]);
                uint32_t o[4];
                rt_pack<OUT>(y, o);
                st16(d, o);
                d += f.C;
            }
        }
    } else {
#pragma unroll 1
        for (int i = i0; i < i1; i++, d += f.C) {
            union { uint32_t w[4]; T e[ROWS]; } o;
#pragma unroll
            for (int k = 0; k < ROWS; k++)
                o.e[k] = round_out<OUT>(__fmul_rn(tab[nibw(in.x[k], i)], a[k]), sat);
            st16(d, o.w);
        }
    }
}

/* FUSE_T without a shared-memory tile, for 16-byte aligned groups and
 * stores (fusep.fast and .vstore): each lane dequantizes ROWS adjacent
 * source rows (the ROWS output columns of one 16-byte store) x one group
 * of COLS columns (one code load per row) and transposes in registers:
 * output row r's ROWS values are one 16-byte store. No barrier, no shared
 * stores or reloads; the table and the nested map are read from shared
 * memory. Against the tiled kernel this halves the instructions per value
 * and removes both barriers per tile (tests/bench/NOTES-kernels.md,
 * "FUSE_T v4"); a lane's loads all go out before the first waits on one
 * (rt_tile; "FUSE_T v5"). Instantiated for nested and plain scales, so
 * neither carries the other's loads as predicated pairs. */
template <int OUT, int ROWS, int COLS, bool NESTED>
__global__ void __launch_bounds__(RT_THREADS)
k_deq4_fuse_rt(q4p q, fusep f, rtp w, void *dst, kn_counters *cnt)
{
    __shared__ float tab[16];
    __shared__ float smap[256];
    const int t = threadIdx.x, lane = t & 31;
    if (t < 16)
        tab[t] = q.table[t];
    if (NESTED)
        for (int i = t; i < 256; i += RT_THREADS)
            smap[i] = __ldg(q.nmap + i);
    __syncthreads();
    unsigned sat = 0;
    const uint64_t stride = (uint64_t)gridDim.x * RT_WARPS;
    uint64_t c0 = 0, g = 0;
    rt_in<ROWS, COLS> in;
    for (uint64_t tile = (uint64_t)blockIdx.x * RT_WARPS + (t >> 5); tile < w.nwt; tile += stride)
        if (rt_where<OUT, ROWS, COLS>(w, tile, lane, c0, g)) {
            rt_load<ROWS, COLS, NESTED>(q, f, c0, g, in);
            rt_tile<OUT, ROWS, COLS, NESTED>(q, f, in, c0, g, tab, smap, w.zero, dst, cnt, sat);
        }
    flush_sat(cnt, sat);
}

/* ---------------------------------------------------- plain conversion */

enum : int { IN_F16 = 0, IN_BF16 = 1, IN_F32 = 2, IN_F64 = 3 };

template <int IN> struct in_t;
template <> struct in_t<IN_F16> { typedef uint16_t type; };
template <> struct in_t<IN_BF16> { typedef uint16_t type; };
template <> struct in_t<IN_F32> { typedef float type; };
template <> struct in_t<IN_F64> { typedef double type; };

/* deq4.c's f16_to_f32: exact; NaN payload shifted, not quieted. */
__device__ __forceinline__ float f16_to_f32(uint16_t h)
{
    if ((h & 0x7c00u) == 0x7c00u)
        return __uint_as_float(((uint32_t)(h & 0x8000u) << 16) | 0x7f800000u |
                               ((uint32_t)(h & 0x3ffu) << 13));
    return __half2float(__ushort_as_half(h));
}

/* deq4.c's f64_to_f32_odd: round to odd (so the later rounding to F16/BF16
 * is a single correct rounding), or RNE when the output is F32; finite
 * values that would round past FLT_MAX become FLT_MAX (counted only for F32
 * output). */
__device__ __forceinline__ float f64_to_f32(double d, bool f32_out, unsigned &sat)
{
    const uint64_t u = (uint64_t)__double_as_longlong(d);
    const uint64_t au = u & 0x7fffffffffffffffull;
    const uint32_t sign = (uint32_t)(u >> 32) & 0x80000000u;
    if (au >= 0x7ff0000000000000ull) {
        if (au == 0x7ff0000000000000ull)
            return __uint_as_float(sign | 0x7f800000u);
        /* x86 cvtsd2ss: quiet, keep the top 23 payload bits */
        return __uint_as_float(sign | 0x7fc00000u | (uint32_t)((au >> 29) & 0x7fffffu));
    }
    /* FLT_MAX + half an ulp (2^128 - 2^103) is where RNE reaches inf; just
     * above FLT_MAX still rounds to it and is not a saturation. */
    if (fabs(d) >= 3.4028235677973366e38) {
        if (f32_out)
            sat++;
        return __uint_as_float(sign | 0x7f7fffffu);
    }
    if (fabs(d) > 3.4028234663852886e38) /* rounds (RNE and RZ alike) to FLT_MAX */
        return __uint_as_float(sign | 0x7f7fffffu);
    if (f32_out)
        return __double2float_rn(d);
    float f = __double2float_rz(d);
    if ((double)f != d)
        f = __uint_as_float(__float_as_uint(f) | 1u);
    return f;
}

template <int IN, int OUT>
__device__ __forceinline__ float load_in(const typename in_t<IN>::type x, unsigned &sat)
{
    if constexpr (IN == IN_F16)
        return f16_to_f32(x);
    else if constexpr (IN == IN_BF16)
        return __uint_as_float((uint32_t)x << 16);
    else if constexpr (IN == IN_F32)
        return x;
    else
        return f64_to_f32(x, OUT == OUT_F32, sat);
}

constexpr int CV_THREADS = 256;
constexpr int CV_VEC = 8;   /* elements per thread and step */

/* 8 elements per thread and step; 16-byte loads and stores when src and
 * dst are 16-byte aligned (vec), element by element otherwise and in the
 * tail. When all 8 values of a step are finite and cannot saturate, they
 * are rounded in pairs without per-value checks; otherwise each goes
 * through the exact path. */
template <int IN, int OUT>
__global__ void __launch_bounds__(CV_THREADS)
k_convert(const void *src, uint64_t n, void *dst, int vec, kn_counters *cnt)
{
    typedef typename in_t<IN>::type I;
    typedef typename out_t<OUT>::type T;
    constexpr int OVEC = 16 / sizeof(T);
    constexpr int IVEC = 16 / sizeof(I);
    unsigned sat = 0;
    const uint64_t nch = (n + CV_VEC - 1) / CV_VEC;
    for (uint64_t ch = (uint64_t)blockIdx.x * CV_THREADS + threadIdx.x; ch < nch;
         ch += (uint64_t)gridDim.x * CV_THREADS) {
        const uint64_t i0 = ch * CV_VEC;
        if (vec && i0 + CV_VEC <= n) {
            union { uint4 v[CV_VEC / IVEC]; I e[CV_VEC]; } x;
            union { uint4 v[CV_VEC / OVEC]; T e[CV_VEC]; uint32_t p[CV_VEC / 2]; } o;
#pragma unroll
            for (int k = 0; k < CV_VEC / IVEC; k++)
                x.v[k] = __ldg((const uint4 *)((const I *)src + i0) + k);
            float fv[CV_VEC];
#pragma unroll
            for (int k = 0; k < CV_VEC; k++)
                fv[k] = load_in<IN, OUT>(x.e[k], sat);
            if constexpr (OUT == OUT_F32) {
#pragma unroll
                for (int k = 0; k < CV_VEC; k++)
                    o.e[k] = fv[k];
            } else {
                uint32_t worst = 0;
#pragma unroll
                for (int k = 0; k < CV_VEC; k++)
                    worst = max(worst, __float_as_uint(fv[k]) & 0x7fffffffu);
                if (worst < fin_lim<OUT>()) {
#pragma unroll
                    for (int k = 0; k < CV_VEC / 2; k++)
                        o.p[k] = pack2<OUT>(fv[2 * k], fv[2 * k + 1]);
                } else {
#pragma unroll
                    for (int k = 0; k < CV_VEC; k++)
                        o.e[k] = round_out<OUT>(fv[k], sat);
                }
            }
#pragma unroll
            for (int k = 0; k < CV_VEC / OVEC; k++)
                ((uint4 *)((T *)dst + i0))[k] = o.v[k];
        } else {
            for (uint64_t i = i0; i < i0 + CV_VEC && i < n; i++)
                ((T *)dst)[i] = round_out<OUT>(load_in<IN, OUT>(((const I *)src)[i], sat), sat);
        }
    }
    flush_sat(cnt, sat);
}

/* ---------------------------------------------------------- launchers */

unsigned grid_for(uint64_t items, unsigned per_block)
{
    uint64_t g = (items + per_block - 1) / per_block;
    const uint64_t cap = 1u << 20;   /* grid-stride loops take the rest */
    return (unsigned)(g == 0 ? 1 : g < cap ? g : cap);
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

int out_index(enum dq_dtype out)
{
    return out == DQ_F16 ? OUT_F16 : out == DQ_BF16 ? OUT_BF16 : out == DQ_F32 ? OUT_F32 : -1;
}

int in_index(enum dq_dtype in)
{
    return in == DQ_F16 ? IN_F16 : in == DQ_BF16 ? IN_BF16 : in == DQ_F32 ? IN_F32
         : in == DQ_F64 ? IN_F64 : -1;
}

int launch_deq4_flat(const q4p &p, uint64_t k0, uint64_t n, int out, void *dst, kn_counters *cnt,
                     cudaStream_t st)
{
    const uint8_t *first = p.codes + ((k0 - p.code_base) >> 1);
    const bool fast = (k0 & 1) == 0 && aligned16(first) && aligned16(dst);
    if (fast) {
        const unsigned g = grid_for(n, FLAT_TILE);
        if (out == OUT_F16)
            k_deq4_flat<OUT_F16><<<g, FLAT_THREADS, 0, st>>>(p, k0, n, dst, cnt);
        else if (out == OUT_BF16)
            k_deq4_flat<OUT_BF16><<<g, FLAT_THREADS, 0, st>>>(p, k0, n, dst, cnt);
        else
            k_deq4_flat<OUT_F32><<<g, FLAT_THREADS, 0, st>>>(p, k0, n, dst, cnt);
    } else {
        const unsigned g = grid_for(n, 256);
        if (out == OUT_F16)
            k_deq4_flat_any<OUT_F16><<<g, 256, 0, st>>>(p, k0, n, dst, cnt);
        else if (out == OUT_BF16)
            k_deq4_flat_any<OUT_BF16><<<g, 256, 0, st>>>(p, k0, n, dst, cnt);
        else
            k_deq4_flat_any<OUT_F32><<<g, 256, 0, st>>>(p, k0, n, dst, cnt);
    }
    KN_CUDA(cudaGetLastError());
    return 0;
}

/* Warp tiles of k_deq4_fuse_rt<OUT, ROWS, COLS> for rows [r0, r1). Every
 * count is below C * R. */
template <int OUT, int ROWS, int COLS>
rtp rt_plan(const fusep &f)
{
    constexpr uint64_t LPG = rt_shape<OUT, ROWS, COLS>::LPG;
    rtp w;
    w.g0 = f.rb + (f.r0 - f.rb) / COLS * COLS;
    w.ng = (f.r1 - w.g0 + COLS - 1) / COLS;
    w.ncg = f.C / ROWS;
    w.wtc = (w.ncg + 32 / LPG - 1) / (32 / LPG);
    w.nwt = w.wtc * ((w.ng + LPG - 1) / LPG);
    w.zero = 0;
    return w;
}

template <int OUT, int ROWS, int COLS>
void launch_rt(const q4p &p, const fusep &f, void *dst, kn_counters *cnt, cudaStream_t st)
{
    const rtp w = rt_plan<OUT, ROWS, COLS>(f);
    const uint64_t blocks = (w.nwt + RT_WARPS - 1) / RT_WARPS;
    const unsigned g = (unsigned)(blocks < 0x7fffffffu ? blocks : 0x7fffffffu); /* grid-stride */
    if (p.nested)
        k_deq4_fuse_rt<OUT, ROWS, COLS, true><<<g, RT_THREADS, 0, st>>>(p, f, w, dst, cnt);
    else
        k_deq4_fuse_rt<OUT, ROWS, COLS, false><<<g, RT_THREADS, 0, st>>>(p, f, w, dst, cnt);
}

/* The tile a lane takes, by output type: F16/BF16 8 source rows (one
 * 16-byte store) x 16 columns (one 8-byte code load per row); F32 4 rows
 * (one 16-byte store) x 32 columns. The 16-column tile gives a launch
 * twice the warps of the 32-column one: +4% on gpt-oss' down_proj for
 * 16-bit outputs, while F32 lost 1-2% with it (H100, "FUSE_T v5" in
 * tests/bench/NOTES-kernels.md). */
template <int OUT>
void launch_rt_out(const q4p &p, const fusep &f, void *dst, kn_counters *cnt, cudaStream_t st)
{
    if constexpr (OUT == OUT_F32)
        launch_rt<OUT, 4, 32>(p, f, dst, cnt, st);
    else
        launch_rt<OUT, 8, 16>(p, f, dst, cnt, st);
}

int launch_fuse_rt(const q4p &p, const fusep &f, int out, void *dst, kn_counters *cnt,
                   cudaStream_t st)
{
    if (out == OUT_F16)
        launch_rt_out<OUT_F16>(p, f, dst, cnt, st);
    else if (out == OUT_BF16)
        launch_rt_out<OUT_BF16>(p, f, dst, cnt, st);
    else
        launch_rt_out<OUT_F32>(p, f, dst, cnt, st);
    KN_CUDA(cudaGetLastError());
    return 0;
}

/* Aligned shapes take the register-transposed kernel; the rest (odd R, a
 * band or pitch not 32/16-aligned, unaligned output or C) the tiled one. */
int launch_deq4_fuse_t(const q4p &p, fusep f, int out, void *dst, kn_counters *cnt,
                       cudaStream_t st)
{
    if (f.fast && f.vstore)
        return launch_fuse_rt(p, f, out, dst, cnt, st);
    f.tiles_y = (f.r1 - f.rb + FT_TR - 1) / FT_TR;
    const uint64_t gx = (f.C + FT_TC - 1) / FT_TC;
    const uint64_t gy = f.tiles_y < 65535 ? f.tiles_y : 65535;
    if (gx > 0x7fffffffu)
        return -EINVAL;
    const dim3 grid((unsigned)gx, (unsigned)gy);
    if (out == OUT_F16)
        k_deq4_fuse_t<OUT_F16><<<grid, FT_THREADS, 0, st>>>(p, f, dst, cnt);
    else if (out == OUT_BF16)
        k_deq4_fuse_t<OUT_BF16><<<grid, FT_THREADS, 0, st>>>(p, f, dst, cnt);
    else
        k_deq4_fuse_t<OUT_F32><<<grid, FT_THREADS, 0, st>>>(p, f, dst, cnt);
    KN_CUDA(cudaGetLastError());
    return 0;
}

template <int IN>
void launch_convert_in(const void *src, uint64_t n, int out, void *dst, int vec, kn_counters *cnt,
                       cudaStream_t st)
{
    const unsigned g = grid_for((n + CV_VEC - 1) / CV_VEC, CV_THREADS);
    if (out == OUT_F16)
        k_convert<IN, OUT_F16><<<g, CV_THREADS, 0, st>>>(src, n, dst, vec, cnt);
    else if (out == OUT_BF16)
        k_convert<IN, OUT_BF16><<<g, CV_THREADS, 0, st>>>(src, n, dst, vec, cnt);
    else
        k_convert<IN, OUT_F32><<<g, CV_THREADS, 0, st>>>(src, n, dst, vec, cnt);
}

int launch_convert(int in, const void *src, uint64_t n, int out, void *dst, kn_counters *cnt,
                   cudaStream_t st)
{
    const int vec = aligned16(src) && aligned16(dst);
    switch (in) {
    case IN_F16: launch_convert_in<IN_F16>(src, n, out, dst, vec, cnt, st); break;
    case IN_BF16: launch_convert_in<IN_BF16>(src, n, out, dst, vec, cnt, st); break;
    case IN_F32: launch_convert_in<IN_F32>(src, n, out, dst, vec, cnt, st); break;
    default: launch_convert_in<IN_F64>(src, n, out, dst, vec, cnt, st); break;
    }
    KN_CUDA(cudaGetLastError());
    return 0;
}

/* ----------------------------------------------------- argument checks */

bool pow2_in(uint32_t v, uint32_t lo, uint32_t hi)
{
    return v >= lo && v <= hi && (v & (v - 1)) == 0;
}

uint32_t log2u(uint32_t v) { return 31u - (uint32_t)__builtin_clz(v); }

int make_q4p(const kn_q4 *q, q4p *p, const char *op)
{
    if (!q || (q->qtype != DQ_NF4 && q->qtype != DQ_FP4) || !pow2_in(q->blocksize, 32, 4096) ||
        !q->codes || !q->absmax ||
        (q->nested && (!pow2_in(q->nested_blocksize, 32, 4096) || !q->nested_absmax ||
                       !q->nested_map))) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "%s: invalid 4-bit description (qtype, blocksize 32..4096, "
               "codes/absmax/nested pointers)", op);
        return -EINVAL;
    }
    memset(p, 0, sizeof *p);
    p->codes = q->codes;
    p->code_base = q->code_base;
    p->absmax = q->absmax;
    p->absmax_base = q->absmax_base;
    p->nested = q->nested;
    p->lbs = log2u(q->blocksize);
    if (q->nested) {
        p->nabs = q->nested_absmax;
        p->nbase = q->nested_base;
        p->nmap = q->nested_map;
        p->noff = q->nested_offset;
        p->lnbs = log2u(q->nested_blocksize);
    }
    memcpy(p->table, q->qtype == DQ_NF4 ? dq_nf4_table : dq_fp4_table, sizeof p->table);
    return 0;
}

} /* namespace */

/* ------------------------------------------------------- public entries */

extern "C" int kn_device_count(int *n, char *why, size_t whylen)
{
    int c = 0;
    cudaError_t e = cudaGetDeviceCount(&c);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky "no device" state */
        c = 0;
        if (why && whylen)
            snprintf(why, whylen, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
    } else if (c == 0 && why && whylen) {
        snprintf(why, whylen, "cudaGetDeviceCount: no device");
    }
    *n = c;
    return 0;
}

extern "C" int kn_counters_reset(kn_counters *c, kn_stream st)
{
    if (!c)
        return -EINVAL;
    KN_CUDA(cudaMemsetAsync(c, 0, offsetof(kn_counters, first_bad), st));
    KN_CUDA(cudaMemsetAsync(&c->first_bad, 0xff, sizeof c->first_bad, st));
    return 0;
}

extern "C" int kn_deq4_flat(const kn_q4 *q, uint64_t k0, uint64_t n, enum dq_dtype out, void *dst,
                            kn_counters *cnt, kn_stream st)
{
    q4p p;
    int rc = make_q4p(q, &p, "kn_deq4_flat");
    if (rc)
        return rc;
    const int oi = out_index(out);
    if (oi < 0 || !dst || !cnt || (q->code_base & 1) || k0 < q->code_base ||
        (k0 >> p.lbs) < q->absmax_base || n > UINT64_MAX / 4 - k0) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "kn_deq4_flat: invalid arguments (output dtype %s, k0 %llu, "
               "code_base %llu)", dq_dtype_name(out), (unsigned long long)k0,
               (unsigned long long)q->code_base);
        return -EINVAL;
    }
    if (n == 0)
        return 0;
    return launch_deq4_flat(p, k0, n, oi, dst, cnt, st);
}

extern "C" int kn_deq4_fuse_t(const kn_q4 *q, uint64_t C, uint64_t R, uint64_t rb, uint64_t re,
                              uint64_t pitch, uint64_t r0, uint64_t r1, enum dq_dtype out,
                              void *dst, kn_counters *cnt, kn_stream st)
{
    q4p p;
    int rc = make_q4p(q, &p, "kn_deq4_fuse_t");
    if (rc)
        return rc;
    const int oi = out_index(out);
    uint64_t numel;
    if (oi < 0 || !dst || !cnt || C == 0 || R == 0 || __builtin_mul_overflow(C, R, &numel) ||
        numel > UINT64_MAX / 4 || !(rb <= r0 && r0 < r1 && r1 <= re && re <= R) ||
        pitch < ((R % 2 == 0 && rb % 2 == 0) ? (re - rb + 1) / 2 : (re - rb) / 2 + 1) ||
        (rb >> p.lbs) < q->absmax_base) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "kn_deq4_fuse_t: invalid arguments (output dtype %s, C %llu, "
               "R %llu, band [%llu, %llu) pitch %llu, rows [%llu, %llu))", dq_dtype_name(out),
               (unsigned long long)C, (unsigned long long)R, (unsigned long long)rb,
               (unsigned long long)re, (unsigned long long)pitch, (unsigned long long)r0,
               (unsigned long long)r1);
        return -EINVAL;
    }
    fusep f;
    f.C = C, f.R = R, f.rb = rb, f.re = re, f.pitch = pitch, f.r0 = r0, f.r1 = r1;
    f.fast = R % 32 == 0 && rb % 32 == 0 && pitch % 16 == 0 && aligned16(q->codes);
    const uint64_t vec = out == DQ_F32 ? 4 : 8;
    f.vstore = aligned16(dst) && C % vec == 0;
    return launch_deq4_fuse_t(p, f, oi, dst, cnt, st);
}

extern "C" int kn_convert(enum dq_dtype in, const void *src, uint64_t n, enum dq_dtype out,
                          void *dst, kn_counters *cnt, kn_stream st)
{
    const int ii = in_index(in), oi = out_index(out);
    if (ii < 0 || oi < 0 || !src || !dst || !cnt || n > UINT64_MAX / 8) {
        dq_log(DQ_LOG_ERROR, KN_TAG, "kn_convert: invalid arguments (%s -> %s)",
               dq_dtype_name(in), dq_dtype_name(out));
        return -EINVAL;
    }
    if (n == 0)
        return 0;
    if (in == out) {
        KN_CUDA(cudaMemcpyAsync(dst, src, n * dq_dtype_size(in), cudaMemcpyDeviceToDevice, st));
        return 0;
    }
    return launch_convert(ii, src, n, oi, dst, cnt, st);
}
