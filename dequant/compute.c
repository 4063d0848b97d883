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
#include <string.h>

#include "dq_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define TAG "compute"
#define TILE_C 32     /* source rows per transpose tile */
#define BAND_R 512    /* output rows per pass over a tile */

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
        if (dq_qstate_check_map(s->q))
            return -EIO;
        scales = scratch_get(scales_needed(s, n) * sizeof(float));
        if (!scales)
            return -ENOMEM;
    }
    return src_span(o, s, el % per_src, n, j->dst, scales, j->sat);
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
    if (s->q && dq_qstate_check_map(s->q))
        return -EIO;
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
static int check_sources(const struct dq_out *o, const struct dq_src *s)
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
    int rc = check_sources(o, src);
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
