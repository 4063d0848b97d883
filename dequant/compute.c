/* compute.c — computing one slice of an output tensor from mapped source
 * bytes: COPY and STACK slices are flat element ranges of one source;
 * FUSE_T slices are whole output rows [r0, r1) of one expert, i.e. a band of
 * source columns, dequantized row by row into a small tile and transposed.
 *
 * Safety: every slice first checks the identity of the files it reads
 * (-ESTALE when one changed since open) and then runs under dq_guard, so a
 * file truncated under us gives -EIO instead of SIGBUS. Errors are logged
 * once with file and tensor.
 *
 * Scratch memory is per thread (grown on demand, freed at thread exit), so
 * slices compute concurrently without locks.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "dq_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define TAG "compute"
#define TILE_C 32     /* source rows per transpose tile */
#define BAND_R 512    /* output rows per pass over a tile */

/* BNBFS_FUSE_T=tile forces the general tile path (tests compare the two). */
static bool getenv_tile_path(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("BNBFS_FUSE_T");
        v = e && strcmp(e, "tile") == 0;
    }
    return v;
}

/* ------------------------------------------------------------ scratch */

struct scratch {
    void *buf;
    size_t cap;
};

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p)
{
    struct scratch *s = p;
    free(s->buf);
    free(s);
}

static void scratch_init(void) { pthread_key_create(&g_scratch_key, scratch_free); }

static void *scratch_get(size_t need)
{
    pthread_once(&g_scratch_once, scratch_init);
    struct scratch *s = pthread_getspecific(g_scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s)
            return NULL;
        pthread_setspecific(g_scratch_key, s);
    }
    if (s->cap < need) {
        free(s->buf);
        s->buf = aligned_alloc(64, (need + 63) & ~(size_t)63);
        s->cap = s->buf ? need : 0;
    }
    return s->buf;
}

/* ----------------------------------------------------------- transpose */

/* dst[j * dstride + i] = src[i * sstride + j] for i < rows, j < cols. */
/* 8x8 block of 16-bit elements: dst row j gets src column j. */
static inline void tr8x8_u16(const uint16_t *s, size_t sstride, uint16_t *d, size_t dstride)
{
#if defined(__x86_64__)
    __m128i r0 = _mm_loadu_si128((const __m128i *)(s + 0 * sstride));
    __m128i r1 = _mm_loadu_si128((const __m128i *)(s + 1 * sstride));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * sstride));
    __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * sstride));
    __m128i r4 = _mm_loadu_si128((const __m128i *)(s + 4 * sstride));
    __m128i r5 = _mm_loadu_si128((const __m128i *)(s + 5 * sstride));
    __m128i r6 = _mm_loadu_si128((const __m128i *)(s + 6 * sstride));
    __m128i r7 = _mm_loadu_si128((const __m128i *)(s + 7 * sstride));
    __m128i t0 = _mm_unpacklo_epi16(r0, r1), t1 = _mm_unpackhi_epi16(r0, r1);
    __m128i t2 = _mm_unpacklo_epi16(r2, r3), t3 = _mm_unpackhi_epi16(r2, r3);
    __m128i t4 = _mm_unpacklo_epi16(r4, r5), t5 = _mm_unpackhi_epi16(r4, r5);
    __m128i t6 = _mm_unpacklo_epi16(r6, r7), t7 = _mm_unpackhi_epi16(r6, r7);
    __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    _mm_storeu_si128((__m128i *)(d + 0 * dstride), _mm_unpacklo_epi64(u0, u4));
    _mm_storeu_si128((__m128i *)(d + 1 * dstride), _mm_unpackhi_epi64(u0, u4));
    _mm_storeu_si128((__m128i *)(d + 2 * dstride), _mm_unpacklo_epi64(u1, u5));
    _mm_storeu_si128((__m128i *)(d + 3 * dstride), _mm_unpackhi_epi64(u1, u5));
    _mm_storeu_si128((__m128i *)(d + 4 * dstride), _mm_unpacklo_epi64(u2, u6));
    _mm_storeu_si128((__m128i *)(d + 5 * dstride), _mm_unpackhi_epi64(u2, u6));
    _mm_storeu_si128((__m128i *)(d + 6 * dstride), _mm_unpacklo_epi64(u3, u7));
    _mm_storeu_si128((__m128i *)(d + 7 * dstride), _mm_unpackhi_epi64(u3, u7));
#else
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            d[j * dstride + i] = s[i * sstride + j];
#endif
}

/* dst[j * dstride + i] = src[i * sstride + j] for i < rows, j < cols.
 * The source row blocks are the inner loop so each destination row's
 * cache line is filled by consecutive stores (the destination is the
 * large, strided side). */
static void transpose_u16(const uint16_t *src, size_t sstride, uint16_t *dst, size_t dstride,
                          size_t rows, size_t cols)
{
    size_t rows8 = rows & ~(size_t)7, cols8 = cols & ~(size_t)7;
    for (size_t j = 0; j < cols8; j += 8)
        for (size_t i = 0; i < rows8; i += 8)
            tr8x8_u16(src + i * sstride + j, sstride, dst + j * dstride + i, dstride);
    for (size_t j = 0; j < cols; j++)
        for (size_t i = (j < cols8 ? rows8 : 0); i < rows; i++)
            dst[j * dstride + i] = src[i * sstride + j];
}

static void transpose_u32(const uint32_t *src, size_t sstride, uint32_t *dst, size_t dstride,
                          size_t rows, size_t cols)
{
    size_t i = 0;
#if defined(__x86_64__)
    for (; i + 4 <= rows; i += 4) {
        size_t j = 0;
        for (; j + 4 <= cols; j += 4) {
            const float *s = (const float *)src + i * sstride + j;
            __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + sstride);
            __m128 r2 = _mm_loadu_ps(s + 2 * sstride), r3 = _mm_loadu_ps(s + 3 * sstride);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            float *d = (float *)dst + j * dstride + i;
            _mm_storeu_ps(d, r0);
            _mm_storeu_ps(d + dstride, r1);
            _mm_storeu_ps(d + 2 * dstride, r2);
            _mm_storeu_ps(d + 3 * dstride, r3);
        }
        for (; j < cols; j++)
            for (size_t k = 0; k < 4; k++)
                dst[j * dstride + i + k] = src[(i + k) * sstride + j];
    }
#endif
    for (; i < rows; i++)
        for (size_t j = 0; j < cols; j++)
            dst[j * dstride + i] = src[i * sstride + j];
}

/* ------------------------------------------------------- flat element runs */

/* Elements [k0, k0+n) of source s into dst (o's dtype). Under the guard. */
static int src_span(const struct dq_out *o, const struct dq_src *s, uint64_t k0, uint64_t n,
                    void *dst, float *scales, struct dq_sat *sat)
{
    if (n == 0)
        return 0;
    if (s->q) {
        const struct dq_qstate *q = s->q;
        const unsigned bsh = (unsigned)__builtin_ctz(q->blocksize);
        uint64_t b0 = k0 >> bsh, b1 = (k0 + n - 1) >> bsh;
        int rc = dq_qstate_scales_raw(q, b0, b1 - b0 + 1, scales);
        if (rc)
            return rc;
        dq_deq4_span(q->qtype, dq_tensor_bytes(q->codes), k0, n, scales, q->blocksize, o->dtype,
                     dst, sat);
        return 0;
    }
    size_t isz = dq_dtype_size(s->t->dtype);
    const uint8_t *p = dq_tensor_bytes(s->t) + k0 * isz;
    if (!dq_dtype_is_float(s->t->dtype) || s->t->dtype == o->dtype)
        memcpy(dst, p, n * isz);
    else
        dq_convert(s->t->dtype, p, n, o->dtype, dst, sat);
    return 0;
}

/* ----------------------------------------------------------- one slice */

struct job {
    const struct dq_out *o;
    uint64_t s;
    void *dst;
    struct dq_sat *sat;
};

static size_t scales_needed(const struct dq_src *s, uint64_t span)
{
    return s->q ? (size_t)(span / s->q->blocksize + 2) : 0;
}

static int compute_flat(const struct job *j)
{
    const struct dq_out *o = j->o;
    uint64_t off, len;
    dq_out_slice_range(o, j->s, &off, &len);
    size_t osz = dq_dtype_size(o->dtype);
    uint64_t per_src = o->numel / o->nsrc;
    uint64_t el = off / osz, n = len / osz;
    const struct dq_src *s = &o->src[el / per_src];
    float *scales = NULL;
    if (s->q) {
        if (dq_qstate_check_map_raw(s->q))
            return -EIO;
        scales = scratch_get(scales_needed(s, n) * sizeof(float));
        if (!scales)
            return -ENOMEM;
    }
    return src_span(o, s, el % per_src, n, j->dst, scales, j->sat);
}


/* ------------------------------------------ FUSE_T fast path: codes first */

/* 16x16 bytes: d row j = s column j. */
static void tr16x16_u8(const uint8_t *s, size_t ss, uint8_t *d, size_t ds)
{
#if defined(__x86_64__)
    __m128i x[16], L[8], H[8], A[4][4], B[2][8];
    for (int k = 0; k < 16; k++)
        x[k] = _mm_loadu_si128((const __m128i *)(s + (size_t)k * ss));
    for (int p = 0; p < 8; p++) { /* rows 2p, 2p+1: cols 0..7 and 8..15 */
        L[p] = _mm_unpacklo_epi8(x[2 * p], x[2 * p + 1]);
        H[p] = _mm_unpackhi_epi8(x[2 * p], x[2 * p + 1]);
    }
    for (int q = 0; q < 4; q++) { /* rows 4q..4q+3, four cols per register */
        A[q][0] = _mm_unpacklo_epi16(L[2 * q], L[2 * q + 1]);
        A[q][1] = _mm_unpackhi_epi16(L[2 * q], L[2 * q + 1]);
        A[q][2] = _mm_unpacklo_epi16(H[2 * q], H[2 * q + 1]);
        A[q][3] = _mm_unpackhi_epi16(H[2 * q], H[2 * q + 1]);
    }
    for (int o = 0; o < 2; o++) /* rows 8o..8o+7, two cols per register */
        for (int cg = 0; cg < 4; cg++) {
            B[o][2 * cg] = _mm_unpacklo_epi32(A[2 * o][cg], A[2 * o + 1][cg]);
            B[o][2 * cg + 1] = _mm_unpackhi_epi32(A[2 * o][cg], A[2 * o + 1][cg]);
        }
    for (int m = 0; m < 8; m++) {
        _mm_storeu_si128((__m128i *)(d + (size_t)(2 * m) * ds), _mm_unpacklo_epi64(B[0][m], B[1][m]));
        _mm_storeu_si128((__m128i *)(d + (size_t)(2 * m + 1) * ds), _mm_unpackhi_epi64(B[0][m], B[1][m]));
    }
#else
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            d[(size_t)j * ds + i] = s[(size_t)i * ss + j];
#endif
}

/* 16 codes of one source row from 8 packed bytes, element order. */
static inline void expand16(const uint8_t *p, uint8_t out[16])
{
#if defined(__x86_64__)
    __m128i x = _mm_loadl_epi64((const __m128i *)p);
    __m128i m4 = _mm_set1_epi8(0x0f);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), m4), lo = _mm_and_si128(x, m4);
    _mm_storeu_si128((__m128i *)out, _mm_unpacklo_epi8(hi, lo));
#else
    for (int i = 0; i < 8; i++)
        out[2 * i] = p[i] >> 4, out[2 * i + 1] = p[i] & 15;
#endif
}

/* Can slice rows [r0, r1) of a 4-bit expert take the codes-first path?
 * Needs blocks that never cross source rows (R a multiple of the
 * blocksize) and byte-aligned row bands (R and r0 even). gpt-oss always. */
static bool fuse_t_fast_ok(const struct dq_src *s, uint64_t r0)
{
    return s->q && s->cols % s->q->blocksize == 0 && s->cols % 2 == 0 && r0 % 2 == 0 &&
           dq_simd_get() != DQ_SIMD_SCALAR;
}

/* Two passes instead of tile + transpose of the outputs: first transpose the
 * 4-bit codes of the band (a quarter of the output's bytes) into T[r][c],
 * one code per byte; then each output row is a contiguous run: out[r][c] =
 * table[T[r][c]] * S[c], with S the scales of block column (r0+r)/bs. The
 * output is written strictly sequentially, which the strided tile path could
 * not do (measured 1.6-1.9 GB/s a core at gate_up's [5760, 2880]). */
static int compute_fuse_t_codes(const struct job *j, const struct dq_src *s, uint64_t r0,
                                uint64_t r1)
{
    const struct dq_out *o = j->o;
    const struct dq_qstate *q = s->q;
    const size_t osz = dq_dtype_size(o->dtype);
    const uint64_t C = s->rows, R = s->cols, w = r1 - r0;
    const unsigned bsh = (unsigned)__builtin_ctz(q->blocksize);
    const uint64_t jc0 = r0 >> bsh, nj = ((r1 - 1) >> bsh) - jc0 + 1;
    size_t tbytes = (size_t)((w * C + 63) & ~(uint64_t)63);
    uint8_t *T = scratch_get(tbytes + (size_t)(nj * C) * sizeof(float) + 256);
    if (!T)
        return -ENOMEM;
    float *S = (float *)(T + tbytes);
    uint8_t *tmp = (uint8_t *)(S + nj * C);
    /* scales: one row of C per block column */
    float amax = 0;
    for (uint64_t jj = 0; jj < nj; jj++) {
        int rc = dq_qstate_scales_strided(q, jc0 + jj, R >> bsh, C, S + jj * C);
        if (rc)
            return rc;
        for (uint64_t c = 0; c < C; c++)
            amax = fmaxf(amax, fabsf(S[jj * C + c]));
    }
    const uint8_t *codes = dq_tensor_bytes(q->codes);
    /* pass 1: T[r][c] = code(c, r0 + r) */
    uint64_t c16 = C & ~(uint64_t)15, w16 = w & ~(uint64_t)15;
    for (uint64_t c = 0; c < c16; c += 16)
        for (uint64_t r = 0; r < w16; r += 16) {
            for (int i = 0; i < 16; i++)
                expand16(codes + ((c + (uint64_t)i) * R + r0 + r) / 2, tmp + 16 * i);
            tr16x16_u8(tmp, 16, T + r * C + c, C);
        }
    for (uint64_t c = 0; c < C; c++) /* ragged edges */
        for (uint64_t r = (c < c16 ? w16 : 0); r < w; r++) {
            uint64_t k = c * R + r0 + r;
            uint8_t b = codes[k >> 1];
            T[r * C + c] = (k & 1) ? (b & 15) : (b >> 4);
        }
    /* pass 2: each output row from its codes and its block column's scales */
    bool may_sat = o->dtype != DQ_F32 && !(amax < dq_dtype_max(o->dtype));
    uint8_t *dst = j->dst;
    for (uint64_t r = 0; r < w; r++)
        dq_deq_codes_scaled(q->qtype, T + r * C, S + (((r0 + r) >> bsh) - jc0) * C, C, o->dtype,
                            dst + r * C * osz, may_sat, j->sat);
    return 0;
}

static int compute_fuse_t(const struct job *j)
{
    const struct dq_out *o = j->o;
    const size_t osz = dq_dtype_size(o->dtype);
    const uint64_t e = j->s / o->slices_per_src, sj = j->s % o->slices_per_src;
    const struct dq_src *s = &o->src[e];
    const uint64_t C = s->rows, R = s->cols;
    const uint64_t rows = o->slice_elems / C;
    const uint64_t r0 = sj * rows, r1 = r0 + rows < R ? r0 + rows : R;
    if (s->q && dq_qstate_check_map_raw(s->q))
        return -EIO;
    if (fuse_t_fast_ok(s, r0) && !getenv_tile_path())
        return compute_fuse_t_codes(j, s, r0, r1);
    size_t band = BAND_R < r1 - r0 ? BAND_R : (size_t)(r1 - r0);
    size_t tile_bytes = (size_t)TILE_C * band * osz;
    size_t nsc = scales_needed(s, band);
    uint8_t *tile = scratch_get(tile_bytes + nsc * sizeof(float) + 64);
    if (!tile)
        return -ENOMEM;
    float *scales = (float *)(tile + ((tile_bytes + 63) & ~(size_t)63));
    uint8_t *dst = j->dst;
    for (uint64_t rb = r0; rb < r1; rb += band) {
        size_t w = r1 - rb < band ? (size_t)(r1 - rb) : band;
        for (uint64_t c0 = 0; c0 < C; c0 += TILE_C) {
            size_t tc = C - c0 < TILE_C ? (size_t)(C - c0) : TILE_C;
            /* source rows c0..c0+tc, columns rb..rb+w -> tile[tc][w] */
            for (size_t c = 0; c < tc; c++) {
                int rc = src_span(o, s, (c0 + c) * R + rb, w, tile + c * w * osz, scales, j->sat);
                if (rc)
                    return rc;
            }
            /* tile[c][r] -> out[(rb - r0 + r)][c0 + c] */
            uint8_t *d = dst + ((rb - r0) * C + c0) * osz;
            if (osz == 2)
                transpose_u16((const uint16_t *)tile, w, (uint16_t *)d, C, tc, w);
            else if (osz == 4)
                transpose_u32((const uint32_t *)tile, w, (uint32_t *)d, C, tc, w);
            else
                for (size_t c = 0; c < tc; c++)
                    for (size_t r = 0; r < w; r++)
                        memcpy(d + (r * C + c) * osz, tile + (c * w + r) * osz, osz);
        }
    }
    return 0;
}

static int job_run(void *p)
{
    const struct job *j = p;
    return j->o->op == DQ_OP_FUSE_T ? compute_fuse_t(j) : compute_flat(j);
}

/* Files a slice reads: the source's data (or codes + companions). */
int dq_src_check(const struct dq_out *o, const struct dq_src *s)
{
    const struct dq_tensor *ts[6] = {s->t};
    int n = 1;
    if (s->q) {
        ts[n++] = s->q->absmax;
        ts[n++] = s->q->quant_map;
        if (s->q->nested) {
            ts[n++] = s->q->nested_absmax;
            ts[n++] = s->q->nested_quant_map;
        }
    }
    for (int i = 0; i < n; i++) {
        struct dq_stfile *f = ts[i]->file;
        int rc = dq_stfile_check(f);
        if (rc) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: source file changed since it was opened; tensor '%s' "
                   "(for %s) is no longer served", f->path, ts[i]->name, o->name);
            return rc;
        }
    }
    return 0;
}

int dq_out_compute(const struct dq_out *o, uint64_t s, void *dst, struct dq_sat *sat)
{
    if (s >= o->nslices)
        return -ERANGE;
    const struct dq_src *src = &o->src[s / o->slices_per_src];
    int rc = dq_src_check(o, src);
    if (rc)
        return rc;
    struct dq_sat local = {0};
    struct job j = {o, s, dst, &local};
    rc = dq_guard(job_run, &j);
    if (rc == -EIO && !src->q)
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': read failed (file truncated?) while "
               "computing %s", src->t->file->path, src->t->name, o->name);
    else if (rc == -EIO && src->q)
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': cannot compute slice %llu of %s",
               src->t->file->path, src->t->name, (unsigned long long)s, o->name);
    if (sat)
        __atomic_fetch_add(&sat->count, local.count, __ATOMIC_RELAXED);
    return rc;
}

/* -------------------------------------------------------- byte ranges */

struct range_ctx {
    const struct dq_out *o;
    uint64_t off, len, s0;
    uint8_t *dst;
    struct dq_sat *sat;
};

static int range_one(void *p, uint64_t i)
{
    struct range_ctx *c = p;
    uint64_t s = c->s0 + i, soff, slen;
    dq_out_slice_range(c->o, s, &soff, &slen);
    uint64_t lo = soff > c->off ? soff : c->off;
    uint64_t hi = soff + slen < c->off + c->len ? soff + slen : c->off + c->len;
    uint8_t *at = c->dst + (lo - c->off);
    /* whole slice at an aligned address: compute in place */
    if (lo == soff && hi == soff + slen && ((uintptr_t)at & 7) == 0)
        return dq_out_compute(c->o, s, at, c->sat);
    uint8_t *tmp = malloc(slen);
    if (!tmp)
        return -ENOMEM;
    int rc = dq_out_compute(c->o, s, tmp, c->sat);
    if (!rc)
        memcpy(c->dst + (lo - c->off), tmp + (lo - soff), hi - lo);
    free(tmp);
    return rc;
}

int dq_out_compute_range(const struct dq_out *o, uint64_t off, uint64_t len, void *dst,
                         unsigned nthreads, struct dq_sat *sat)
{
    if (off > o->nbytes || len > o->nbytes - off)
        return -ERANGE;
    if (len == 0)
        return 0;
    struct range_ctx c = {o, off, len, dq_out_slice_at(o, off), dst, sat};
    uint64_t s1 = dq_out_slice_at(o, off + len - 1);
    return dq_parallel_for(nthreads, s1 - c.s0 + 1, range_one, &c);
}
