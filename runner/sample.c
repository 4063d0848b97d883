/* sample.c — next-token selection: greedy, temperature, top-k, top-p with a
 * reproducible PRNG. The exact procedure is specified in sample.h; keep the
 * two in step, since reproducibility across versions depends on it.
 *
 * Speed matters: at ~400 tok/s decode the whole per-token budget is 2.5 ms,
 * so one pass over the 201k logits must cost tens of microseconds. Hence the
 * float polynomial exp (vectorizes), eight fixed partial sums (the order is
 * fixed, so the result does not depend on the machine) and no sort unless
 * top-p asks for one, and then only of the tokens that can be in the
 * nucleus.
 */
#include "sample.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"

/* ---------------------------------------------------------------- PRNG */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void rn_rng_seed(struct rn_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rn_rng_next(struct rn_rng *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

double rn_rng_uniform(struct rn_rng *r) { return (double)(rn_rng_next(r) >> 11) * 0x1.0p-53; }

/* ------------------------------------------------------------- sampler */

#define BLK 64                      /* tokens per block sum */

struct cand {
    float w;                        /* logit, then weight exp((l - max) / T) */
    int32_t id;
};

struct rn_sampler {
    int n;                          /* vocab length */
    struct rn_sample_opts o;
    struct rn_rng rng;
    float *w;                       /* owned; [n] weights */
    double *bsum;                   /* owned; [ceil(n / BLK)] block sums of w */
    struct cand *c;                 /* owned; [n] candidates */
    bool avx2;                      /* use the AVX2 loops (same bits, twice as wide) */
};

int rn_sampler_new(int n_vocab, const struct rn_sample_opts *o, struct rn_sampler **out)
{
    *out = NULL;
    if (n_vocab <= 0 || !isfinite(o->temperature) || o->temperature < 0 ||
        !(o->top_p > 0 && o->top_p <= 1) || o->top_k < 0)
        return -EINVAL;
    struct rn_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->n = n_vocab;
    s->o = *o;
    rn_rng_seed(&s->rng, o->seed);
    /* dq_simd_get honours BNBFS_SIMD=scalar, which the tests use to check
     * that both paths pick the same ids */
    s->avx2 = dq_simd_get() >= DQ_SIMD_AVX2;
    s->w = malloc(((size_t)n_vocab + BLK) * sizeof *s->w);
    s->bsum = malloc(((size_t)n_vocab / BLK + 1) * sizeof *s->bsum);
    s->c = malloc((size_t)n_vocab * sizeof *s->c);
    if (!s->w || !s->bsum || !s->c) {
        rn_sampler_free(s);
        return -ENOMEM;
    }
    *out = s;
    return 0;
}

void rn_sampler_free(struct rn_sampler *s)
{
    if (!s)
        return;
    free(s->w);
    free(s->bsum);
    free(s->c);
    free(s);
}

/* True for finite x, without branches (x - x is NaN for inf and NaN). */
static inline bool finite_f(float x) { return x - x == 0.0f; }

/* exp(x) for -87 <= x <= 0 in float (Cephes' expf): x = k ln2 + r with k
 * the nearest integer, a degree-7 polynomial for exp(r), 2^k by exponent
 * bits. Plain arithmetic only, so every machine computes the same bits (the
 * build turns FMA contraction off). Callers clamp x to [-87, 0]. */
static inline float exp_neg(float x)
{
    int32_t ki = -(int32_t)(0.5f - x * 1.44269504088896341f);   /* round(x / ln2) */
    float k = (float)ki;
    float r = x - k * 0.693359375f;               /* ln2 = C1 - C2, C1 exact in float */
    r = r + k * 2.12194440e-4f;
    float z = r * r;
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    uint32_t bits = (uint32_t)(ki + 127) << 23;  /* ki >= -126 for x >= -87 */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* Weight of logit l given the max and 1/T: 0 for non-finite l. */
static inline float weight(float l, float mx, float inv_t)
{
    bool ok = finite_f(l);
    float x = ok ? (l - mx) * inv_t : -87.0f;
    x = x < -87.0f ? -87.0f : x;    /* exp(-87) ~ 1.6e-38: negligible, still normal */
    float e = exp_neg(x);
    return ok ? e : 0.0f;
}

/* The same arithmetic four lanes at a time with GCC vector extensions (one
 * SSE2 register on baseline x86-64): each lane performs exactly the scalar
 * operations, so both give the same bits. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef double v2d __attribute__((vector_size(16)));

static inline v4f load4(const float *p)
{
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v4f blend(v4i mask, v4f a, v4f b)   /* mask ? a : b */
{
    return (v4f)(((v4i)a & mask) | ((v4i)b & ~mask));
}

static inline v4f weight4(v4f l, float mx, float inv_t)
{
    const v4f lo = {-87.0f, -87.0f, -87.0f, -87.0f};
    v4i ok = (l - l) == 0.0f;
    v4f x = blend(ok, (l - mx) * inv_t, lo);
    x = blend(x < lo, lo, x);
    v4i ki = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, v4i);
    v4f k = __builtin_convertvector(ki, v4f);
    v4f r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    v4f z = r * r;
    v4f p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
              4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    v4f scale = (v4f)((ki + 127) << 23);
    return (v4f)((v4i)(p * scale) & ok);
}

/* Index of the largest finite logit (lowest index among equals), or -1.
 * Four lanes; each keeps its first maximum. */
static int32_t argmax(const float *l, int n, float *max)
{
    v4f mx = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v4i ix = {-1, -1, -1, -1};
    v4i lane = {0, 1, 2, 3};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        v4f v = load4(l + i);
        v4i take = ((v - v) == 0.0f) & ((v > mx) | (ix < 0));
        mx = blend(take, v, mx);
        ix = (take & (lane + i)) | (~take & ix);
    }
    float m[4];
    int32_t x[4];
    memcpy(m, &mx, sizeof m);
    memcpy(x, &ix, sizeof x);
    for (int j = 0; i < n; i++, j++)
        if (finite_f(l[i]) && (l[i] > m[j] || x[j] < 0)) {
            m[j] = l[i];
            x[j] = i;
        }
    int32_t best = -1;
    float bv = 0;
    for (int j = 0; j < 4; j++)
        if (x[j] >= 0 && (best < 0 || m[j] > bv || (m[j] == bv && x[j] < best))) {
            best = x[j];
            bv = m[j];
        }
    *max = bv;
    return best;
}

/* Candidate order for top-k selection and top-p sorting: larger value
 * first, then lower id. */
static inline bool better(float av, int32_t ai, float bv, int32_t bi)
{
    return av > bv || (av == bv && ai < bi);
}

/* Min-heap on "better": the root is the worst kept candidate. */
static void topk_sift_down(struct cand *h, int n, int i)
{
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && better(h[c].w, h[c].id, h[c + 1].w, h[c + 1].id))
            c++;
        if (!better(h[i].w, h[i].id, h[c].w, h[c].id))
            break;
        struct cand t = h[i];
        h[i] = h[c];
        h[c] = t;
        i = c;
    }
}

/* The k best finite logits into c[0..k) (.w holds the logit). Returns how
 * many were found (fewer when few are finite). */
static int select_topk(const float *l, int n, int k, struct cand *c)
{
    int m = 0, i = 0;
    for (; i < n; i++) {
        if (m == k && i + 4 <= n && (i & 3) == 0) {
            /* Once the heap is full, four at a time: none can enter unless
             * one is above the worst kept (ids only grow, so an equal value
             * never beats it; NaN compares false and is never kept). */
            v4f th = {c[0].w, c[0].w, c[0].w, c[0].w};
            v4i gt = load4(l + i) > th;
            if (!(gt[0] | gt[1] | gt[2] | gt[3])) {
                i += 3;
                continue;
            }
        }
        if (!finite_f(l[i]))
            continue;
        if (m < k) {
            c[m++] = (struct cand){l[i], i};
            if (m == k)
                for (int j = k / 2 - 1; j >= 0; j--)
                    topk_sift_down(c, k, j);
        } else if (better(l[i], i, c[0].w, c[0].id)) {
            c[0] = (struct cand){l[i], i};
            topk_sift_down(c, k, 0);
        }
    }
    return m;
}

static int cmp_id(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

static int cmp_weight(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (better(x->w, x->id, y->w, y->id))
        return -1;
    return better(y->w, y->id, x->w, x->id) ? 1 : 0;
}

/* Top-p over candidates c[0..m) with weights summing to total: sorts them
 * and returns the length of the nucleus; *kept is its weight. */
static int nucleus(struct cand *c, int m, double total, double top_p, double *kept)
{
    qsort(c, (size_t)m, sizeof *c, cmp_weight);
    double want = top_p * total, run = 0;
    int k = 0;
    while (k < m) {
        run += c[k++].w;
        if (run >= want)
            break;
    }
    *kept = run;
    return k;
}

/* Draw over c[0..m) in order; total is their weight. */
static int32_t draw_list(struct rn_sampler *s, const struct cand *c, int m, double total)
{
    double u = rn_rng_uniform(&s->rng) * total, run = 0;
    for (int i = 0; i < m; i++) {
        run += c[i].w;
        if (u < run)
            return c[i].id;
    }
    for (int i = m - 1; i >= 0; i--)    /* rounding put u at the very end */
        if (c[i].w > 0)
            return c[i].id;
    return c[0].id;
}

/* Pick among the top k logits. */
static int pick_topk(struct rn_sampler *s, const float *logits, float inv_t, int32_t *id)
{
    struct cand *c = s->c;
    int m = select_topk(logits, s->n, s->o.top_k, c);
    if (m == 0)
        return -EDOM;
    qsort(c, (size_t)m, sizeof *c, cmp_id);
    float mx = c[0].w;
    for (int i = 1; i < m; i++)
        mx = c[i].w > mx ? c[i].w : mx;
    double total = 0;
    for (int i = 0; i < m; i++) {
        c[i].w = weight(c[i].w, mx, inv_t);
        total += c[i].w;
    }
    if (s->o.top_p < 1)
        m = nucleus(c, m, total, s->o.top_p, &total);
    *id = draw_list(s, c, m, total);
    return 0;
}

/* The whole vocab's weights into s->w (zero-padded to whole blocks), the
 * block sums into s->bsum; returns their total. Eight double lanes per
 * block: lane j sums tokens j, j+8, j+16, ... (sample.h). */
static double weigh_sse(struct rn_sampler *s, const float *logits, float mx, float inv_t)
{
    const int n = s->n, nb = (n + BLK - 1) / BLK;
    float *w = s->w;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        v4f v = weight4(load4(logits + i), mx, inv_t);
        memcpy(w + i, &v, sizeof v);
    }
    for (; i < n; i++)
        w[i] = weight(logits[i], mx, inv_t);
    for (i = n; i < nb * BLK; i++)
        w[i] = 0;
    double total = 0;
    for (int b = 0; b < nb; b++) {
        const float *p = w + (size_t)b * BLK;
        v2d l0 = {0, 0}, l1 = {0, 0}, l2 = {0, 0}, l3 = {0, 0};
        for (int k = 0; k < BLK; k += 8) {
            v4f a = load4(p + k), c = load4(p + k + 4);
            l0 += (v2d){a[0], a[1]};
            l1 += (v2d){a[2], a[3]};
            l2 += (v2d){c[0], c[1]};
            l3 += (v2d){c[2], c[3]};
        }
        s->bsum[b] = ((l0[0] + l0[1]) + (l1[0] + l1[1])) + ((l2[0] + l2[1]) + (l3[0] + l3[1]));
        total += s->bsum[b];
    }
    return total;
}

/* The same loops eight floats wide for CPUs with AVX2 (chosen at run time;
 * the build targets baseline x86-64). Per element the operations are the
 * scalar ones, so the bits are those of weigh_sse and argmax. */
#if defined(__x86_64__) && defined(__GNUC__)
#define AVX2 __attribute__((target("avx2")))
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v4f_ __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));

AVX2 static inline v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

AVX2 static inline v8f blend8(v8i mask, v8f a, v8f b)
{
    return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask));
}

AVX2 static inline v8f weight8(v8f l, float mx, float inv_t)
{
    const v8f lo = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    v8i ok = (l - l) == 0.0f;
    v8f x = blend8(ok, (l - mx) * inv_t, lo);
    x = blend8(x < lo, lo, x);
    v8i ki = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, v8i);
    v8f k = __builtin_convertvector(ki, v8f);
    v8f r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    v8f z = r * r;
    v8f p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
              4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    v8f scale = (v8f)((ki + 127) << 23);
    return (v8f)((v8i)(p * scale) & ok);
}

AVX2 static double weigh_avx2(struct rn_sampler *s, const float *logits, float mx, float inv_t)
{
    const int n = s->n, nb = (n + BLK - 1) / BLK;
    float *w = s->w;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v = weight8(load8(logits + i), mx, inv_t);
        memcpy(w + i, &v, sizeof v);
    }
    for (; i < n; i++)
        w[i] = weight(logits[i], mx, inv_t);
    for (i = n; i < nb * BLK; i++)
        w[i] = 0;
    double total = 0;
    for (int b = 0; b < nb; b++) {
        const float *p = w + (size_t)b * BLK;
        v4d lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};     /* lanes 0-3 and 4-7 */
        for (int k = 0; k < BLK; k += 8) {
            v8f a = load8(p + k);
            lo += __builtin_convertvector((v4f_){a[0], a[1], a[2], a[3]}, v4d);
            hi += __builtin_convertvector((v4f_){a[4], a[5], a[6], a[7]}, v4d);
        }
        s->bsum[b] = ((lo[0] + lo[1]) + (lo[2] + lo[3])) + ((hi[0] + hi[1]) + (hi[2] + hi[3]));
        total += s->bsum[b];
    }
    return total;
}

AVX2 static int32_t argmax_avx2(const float *l, int n, float *max)
{
    v8f mx;
    v8i ix;
    for (int j = 0; j < 8; j++) {
        mx[j] = -INFINITY;
        ix[j] = -1;
    }
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v = load8(l + i);
        v8i take = ((v - v) == 0.0f) & ((v > mx) | (ix < 0));
        mx = blend8(take, v, mx);
        ix = (take & (lane + i)) | (~take & ix);
    }
    int32_t best = -1;
    float bv = 0;
    for (int j = 0; j < 8; j++)
        if (ix[j] >= 0 && (best < 0 || mx[j] > bv || (mx[j] == bv && ix[j] < best))) {
            best = ix[j];
            bv = mx[j];
        }
    for (; i < n; i++)              /* the tail, after every lane's candidates */
        if (finite_f(l[i]) && (best < 0 || l[i] > bv)) {
            best = i;
            bv = l[i];
        }
    *max = bv;
    return best;
}
#else
static double weigh_avx2(struct rn_sampler *s, const float *logits, float mx, float inv_t)
{
    return weigh_sse(s, logits, mx, inv_t);
}

static int32_t argmax_avx2(const float *l, int n, float *max) { return argmax(l, n, max); }
#endif

int rn_sampler_pick(struct rn_sampler *s, const float *logits, int32_t *id)
{
    const int n = s->n;
    float mx;
    int32_t best = s->avx2 ? argmax_avx2(logits, n, &mx) : argmax(logits, n, &mx);
    if (best < 0)
        return -EDOM;
    if (s->o.temperature == 0) {
        *id = best;
        return 0;
    }
    const float inv_t = (float)(1.0 / s->o.temperature);
    if (s->o.top_k > 0 && s->o.top_k < n)
        return pick_topk(s, logits, inv_t, id);
    float *w = s->w;
    int nb = (n + BLK - 1) / BLK;
    double total = s->avx2 ? weigh_avx2(s, logits, mx, inv_t) : weigh_sse(s, logits, mx, inv_t);
    if (s->o.top_p < 1) {
        /* A nucleus member has probability > (1 - top_p) / n (the tokens
         * outside the nucleus but one, each no likelier than it, carry more
         * than 1 - top_p); only those are sorted. The half keeps the
         * filter safe against rounding. */
        float cut = (float)(0.5 * (1 - s->o.top_p) / n * total);
        struct cand *c = s->c;
        int m = 0;
        for (int t = 0; t < n; t++)
            if (w[t] >= cut && w[t] > 0)
                c[m++] = (struct cand){w[t], t};
        double kept;
        m = nucleus(c, m, total, s->o.top_p, &kept);
        *id = draw_list(s, c, m, kept);
        return 0;
    }
    /* The draw finds its block by the running block sums, then its token by
     * the running sum inside the block. */
    double u = rn_rng_uniform(&s->rng) * total, run = 0;
    int b = 0;
    while (b < nb - 1 && u >= run + s->bsum[b])
        run += s->bsum[b++];
    const float *p = w + (size_t)b * BLK;
    int32_t last = -1;
    for (int t = 0; t < BLK && b * BLK + t < n; t++) {
        if (p[t] > 0)
            last = b * BLK + t;
        run += p[t];
        if (u < run && p[t] > 0) {
            *id = b * BLK + t;
            return 0;
        }
    }
    /* rounding put u past the block's last token: take the last one with
     * weight (there is one: the block's sum was positive or it is the last
     * block, which holds the argmax when nothing else has weight) */
    *id = last >= 0 ? last : best;
    return 0;
}
