/* llm_decode.cuh — private to kernels/llm*.cu: the decode step's building
 * blocks (one token): the shared prologue (input vector into shared memory,
 * RMSNorm), the batched row dot products, the last-arrival counter, and the
 * work items of a layer (q/k/v + RoPE, attention, o_proj, router, expert
 * GEMVs) that both decode drivers run: the per-step launches
 * (llm_decode_steps.cu) and the persistent kernel (llm_decode.cu).
 *
 * Not here: the drivers themselves, the plain GEMV (llm_gemv.cu), prefill.
 *
 * Invariants: every weight byte is read once with 16-byte loads; every sum
 * has a fixed order (partials over K splits and experts are added in order
 * by the last warp or block to finish), and both drivers run this item code with the
 * same kn_decode_plan, so they give the same bits. Activations written
 * during the step are read with ld.global.cg (L2): inside the persistent
 * kernel another multiprocessor's L1 may hold an older copy.
 */
#ifndef BNBFS_KERNELS_LLM_DECODE_CUH
#define BNBFS_KERNELS_LLM_DECODE_CUH

#include "llm_common.cuh"

#define DEC_THREADS 256     /* every decode block: block-wide sums have one order */
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_BPS 3           /* blocks a multiprocessor the persistent kernel is built for */
#define MAX_TOPK 32
#define MAX_NSPLIT 32       /* attention splits a head: one per lane in the combine */
#define DEC_MAX_DPL 4       /* head_dim <= 128: dims per lane */
/* Lines of 128 bytes of each row a GEMV block prefetches into L2 before
 * waiting for the previous kernel (PDL); for lm_head, 2 KB a row keeps the
 * first wave's prefetch inside L2. */
#define PF_LINES 16

__host__ __device__ static inline int round4(int n) { return (n + 3) & ~3; }
__host__ __device__ static inline int div_up(int a, int b) { return (a + b - 1) / b; }

/* Prefetch `lines` 128-byte lines of a row, spread over the warp's lanes. */
__device__ __forceinline__ void prefetch_row(const void *row, int bytes, int lines, int lane)
{
    const char *p = static_cast<const char *>(row);
    for (int i = lane; i < lines && i * 128 < bytes; i += 32)
        prefetch_l2(p + i * 128);
}

/* ---------------------------------------------------- shared prologue */

/* Copies in[K] (fp32, read past L1) into shared memory and, when norm_w is
 * set, applies RMSNorm (x * rsqrt(mean(x^2) + eps) * norm_w) in place.
 * Ends with a barrier. K % 4 == 0. */
__device__ __forceinline__ void load_vec_norm(float4 *xs4, const float *__restrict__ in,
                                              const float *__restrict__ norm_w, float eps,
                                              int K, float *red)
{
    const int K4 = K >> 2;
    const float4 *in4 = reinterpret_cast<const float4 *>(in);
    float ss = 0.f;
    for (int i = threadIdx.x; i < K4; i += blockDim.x) {
        float4 v = __ldcg(in4 + i);
        xs4[i] = v;
        /* explicit fmas: no contraction left to the compiler, so every
         * kernel inlining this rounds alike */
        ss = fmaf(v.x, v.x, ss);
        ss = fmaf(v.y, v.y, ss);
        ss = fmaf(v.z, v.z, ss);
        ss = fmaf(v.w, v.w, ss);
    }
    if (norm_w) {
        ss = block_sum(ss, red);
        const float r = rsqrtf(ss / (float)K + eps);
        const float4 *w4 = reinterpret_cast<const float4 *>(norm_w);
        for (int i = threadIdx.x; i < K4; i += blockDim.x) {
            float4 v = xs4[i], w = w4[i];
            xs4[i] = make_float4(v.x * r * w.x, v.y * r * w.y, v.z * r * w.z, v.w * r * w.w);
        }
    }
    __syncthreads();
}

/* acc[r] = dot(row r, xs) over K8 groups of 8, lanes striding. Loads go in
 * batches of U groups per row, all issued before the first is used. Each
 * lane adds its groups in increasing order whatever U is, so U changes the
 * speed (registers, round trips) and never the bits. */
template <int R, int U = (R == 2 ? 8 : 4)>
__device__ __forceinline__ void rows_dot(const uint4 *const (&w)[R], const float4 *xs4, int K8,
                                         int lane, float (&acc)[R])
{
#pragma unroll
    for (int r = 0; r < R; r++)
        acc[r] = 0.f;
    for (int c0 = 0; c0 < K8; c0 += 32 * U) {
        uint4 wv[U][R];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + lane + 32 * u;
#pragma unroll
            for (int r = 0; r < R; r++)
                wv[u][r] = c < K8 ? ld_stream(w[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + lane + 32 * u;
            if (c < K8) {
                const float4 a = xs4[2 * c], b = xs4[2 * c + 1];
#pragma unroll
                for (int r = 0; r < R; r++)
                    acc[r] += dot8(wv[u][r], a, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
        acc[r] = warp_sum(acc[r]);
}

/* Last-arrival test of a warp that has just written its share: its writes
 * are made visible, then lane 0 counts it in; the warp that completes the
 * count gets true (every lane), resets the counter for the next use and
 * may read all shares. */
__device__ __forceinline__ bool warp_arrive_last(int *counter, int expect, int lane)
{
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0)
        last = atomicAdd(counter, 1) == expect - 1;
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {
        __threadfence();
        if (lane == 0)
            *counter = 0;
    }
    return last;
}

static inline int vec_smem(int K, const void *fn)
{
    int bytes = K * (int)sizeof(float);
    if (bytes > 48 * 1024)
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    return bytes;
}

/* ================================================================
 * Work items of a layer. Each is run by whole warps (or, for the
 * block-wide prologues, whole DEC_THREADS blocks) of either driver.
 * ================================================================ */

/* ------------------------------------------------- q/k/v + RoPE + KV */

/* RoPE pair p: rows (head*hd + i, head*hd + i + hd/2) of the fused [q; k; v]
 * weight, so the rotation happens in registers. */
__device__ __forceinline__ void qkv_rows(int p, const kn_attn_geom &g, int &hg, int &i, int &r0,
                                         int &r1)
{
    const int half_hd = g.head_dim >> 1;
    hg = p / half_hd;
    i = p % half_hd;
    r0 = hg * g.head_dim + i;
    r1 = r0 + half_hd;
}

__device__ __forceinline__ void qkv_prefetch(int p, const __half *W, int H, const kn_attn_geom &g,
                                             int lane)
{
    int hg, i, r0, r1;
    qkv_rows(p, g, hg, i, r0, r1);
    const int lines = (H * 2 + 127) / 128;      /* the whole q/k/v matrix fits L2 */
    prefetch_row(W + (size_t)r0 * H, H * 2, lines, lane);
    prefetch_row(W + (size_t)r1 * H, H * 2, lines, lane);
}

/* xs4: the normalized input [H] in shared memory. */
template <int U>
__device__ __forceinline__ void qkv_item(int p, const float4 *xs4, const __half *__restrict__ W,
                                         const float *__restrict__ bias, int H,
                                         const kn_attn_geom &g, const float2 *__restrict__ rope,
                                         int pos, float *q_out, __half *kc, __half *vc, int lane)
{
    int hg, i, r0, r1;
    qkv_rows(p, g, hg, i, r0, r1);
    const uint4 *w[2] = {reinterpret_cast<const uint4 *>(W + (size_t)r0 * H),
                         reinterpret_cast<const uint4 *>(W + (size_t)r1 * H)};
    float acc[2];
    rows_dot<2, U>(w, xs4, H >> 3, lane, acc);
    if (lane != 0)
        return;
    const int half_hd = g.head_dim >> 1;
    float y0 = acc[0] + bias[r0], y1 = acc[1] + bias[r1];
    if (hg < g.nheads + g.nkv) {
        /* explicit fmas, as in load_vec_norm */
        const float2 cs = rope[(size_t)pos * half_hd + i];
        const float o0 = fmaf(y0, cs.x, -(y1 * cs.y)), o1 = fmaf(y1, cs.x, y0 * cs.y);
        y0 = o0;
        y1 = o1;
    }
    if (hg < g.nheads) {
        q_out[r0] = y0;
        q_out[r1] = y1;
        return;
    }
    const bool is_k = hg < g.nheads + g.nkv;
    const int kvh = is_k ? hg - g.nheads : hg - g.nheads - g.nkv;
    __half *dst = (is_k ? kc : vc) + ((size_t)kvh * g.max_ctx + pos) * g.head_dim;
    dst[i] = __float2half_rn(y0);
    dst[i + half_hd] = __float2half_rn(y1);
}

/* --------------------------------------------------------- attention */

/* Attention of head h = it / nsplit over split sp = it % nsplit of its
 * visible keys (gpt-oss: a query at pos sees max(0, pos-window+1)..pos on
 * sliding layers, 0..pos otherwise). The last warp of the head to finish
 * combines the splits in order with the sink, which joins the softmax
 * denominator only: p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k)). Keys
 * outside the range are never read. */
static __device__ void attn_item(int it, const float *q, const __half *kc, const __half *vc,
                                       const float *__restrict__ sinks, const kn_attn_geom &g,
                                       int pos, int nsplit, float *partial, int *counters,
                                       float *out, int lane)
{
    const int h = it / nsplit, sp = it % nsplit;
    const int kvh = h / (g.nheads / g.nkv), hd = g.head_dim;
    const int lo = g.window ? max(0, pos - g.window + 1) : 0;
    const int len = pos - lo + 1;
    const int chunk = (len + nsplit - 1) / nsplit;
    const int p0 = lo + sp * chunk, p1 = min(pos + 1, p0 + chunk);

    float qv[DEC_MAX_DPL], acc[DEC_MAX_DPL];
#pragma unroll
    for (int j = 0; j < DEC_MAX_DPL; j++) {
        const int d = lane + 32 * j;
        qv[j] = d < hd ? __ldcg(q + h * hd + d) * g.scale : 0.f;
        acc[j] = 0.f;
    }
    const __half *kb = kc + (size_t)kvh * g.max_ctx * hd;
    const __half *vb = vc + (size_t)kvh * g.max_ctx * hd;
    float m = -INFINITY, l = 0.f;
    int p = p0;
    /* Four keys per round: four independent reductions in flight (eight
     * measured slower on an H200: 14.6 vs 11.6 us at 256 positions). */
    for (; p + 3 < p1; p += 4) {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int j = 0; j < DEC_MAX_DPL; j++) {
                const int d = lane + 32 * j;
                if (d < hd)
                    s[u] = fmaf(qv[j], __half2float(__ldcg(kb + (size_t)(p + u) * hd + d)), s[u]);
            }
#pragma unroll
        for (int u = 0; u < 4; u++)
            s[u] = warp_sum(s[u]);
        const float mn = fmaxf(m, fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3])));
        const float corr = __expf(m - mn);
        float e[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
            e[u] = __expf(s[u] - mn);
        l = l * corr + ((e[0] + e[1]) + (e[2] + e[3]));
#pragma unroll
        for (int j = 0; j < DEC_MAX_DPL; j++) {
            const int d = lane + 32 * j;
            if (d < hd) {
                float a = acc[j] * corr;
#pragma unroll
                for (int u = 0; u < 4; u++)
                    a = fmaf(e[u], __half2float(__ldcg(vb + (size_t)(p + u) * hd + d)), a);
                acc[j] = a;
            }
        }
        m = mn;
    }
    for (; p < p1; p++) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < DEC_MAX_DPL; j++) {
            const int d = lane + 32 * j;
            if (d < hd)
                s = fmaf(qv[j], __half2float(__ldcg(kb + (size_t)p * hd + d)), s);
        }
        s = warp_sum(s);
        const float mn = fmaxf(m, s), corr = __expf(m - mn), e = __expf(s - mn);
        l = l * corr + e;
#pragma unroll
        for (int j = 0; j < DEC_MAX_DPL; j++) {
            const int d = lane + 32 * j;
            if (d < hd)
                acc[j] = fmaf(e, __half2float(__ldcg(vb + (size_t)p * hd + d)), acc[j] * corr);
        }
        m = mn;
    }
    float *pp = partial + ((size_t)h * nsplit + sp) * (hd + 2);
    if (lane == 0) {
        pp[0] = m;
        pp[1] = l;
    }
#pragma unroll
    for (int j = 0; j < DEC_MAX_DPL; j++) {
        const int d = lane + 32 * j;
        if (d < hd)
            pp[2 + d] = acc[j];
    }
    if (!warp_arrive_last(counters + h, nsplit, lane))
        return;
    /* Combine: lane t holds split t's (m, l); the sink starts the max, so M
     * is finite and an empty split (m = -inf) weighs exp(-inf) = 0. */
    const float *ph = partial + (size_t)h * nsplit * (hd + 2);
    const float sink = sinks[h];
    float mt = -INFINITY, lt = 0.f;
    if (lane < nsplit) {
        mt = __ldcg(ph + (size_t)lane * (hd + 2));
        lt = __ldcg(ph + (size_t)lane * (hd + 2) + 1);
    }
    const float M = fmaxf(sink, warp_max(mt));
    const float ft = lane < nsplit ? __expf(mt - M) : 0.f;
    const float L = __expf(sink - M) + warp_sum(lt * ft);
    float o[DEC_MAX_DPL] = {0.f, 0.f, 0.f, 0.f};
    for (int t = 0; t < nsplit; t++) {
        const float f = __shfl_sync(0xffffffffu, ft, t);
        const float *pt = ph + (size_t)t * (hd + 2) + 2;
#pragma unroll
        for (int j = 0; j < DEC_MAX_DPL; j++) {
            const int d = lane + 32 * j;
            if (d < hd)
                o[j] = fmaf(__ldcg(pt + d), f, o[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < DEC_MAX_DPL; j++) {
        const int d = lane + 32 * j;
        if (d < hd)
            out[h * hd + d] = o[j] / L;
    }
}

/* ----------------------------------------------------- o_proj, router */

/* x[row] += Wo[row] . attn + bo[row]; vec4: attn [Q] in shared memory. */
template <int U>
__device__ __forceinline__ void oproj_item(int row, const float4 *vec4,
                                           const __half *__restrict__ Wo,
                                           const float *__restrict__ bo, int Q, float *x, int lane)
{
    const uint4 *w[1] = {reinterpret_cast<const uint4 *>(Wo + (size_t)row * Q)};
    float acc[1];
    rows_dot<1, U>(w, vec4, Q >> 3, lane, acc);
    if (lane == 0)
        x[row] = __ldcg(x + row) + (acc[0] + bo[row]);
}

/* Router logit e of hn (vec4, shared memory). */
__device__ __forceinline__ float route_logit(const __half *__restrict__ Wr,
                                             const float *__restrict__ br, int e, int H,
                                             const float4 *vec4, int lane)
{
    const uint4 *w[1] = {reinterpret_cast<const uint4 *>(Wr + (size_t)e * H)};
    float acc[1];
    rows_dot<1, 8>(w, vec4, H >> 3, lane, acc);
    return acc[0] + br[e];
}

/* Block-wide routing of x as both drivers do it: hn = RMSNorm(x) * norm_w
 * into vec4 (and hn_out when non-NULL), the E logits by the block's warps,
 * then top-k and softmax into ids/w. logits: shared [E]. */
static __device__ void route_block(float4 *vec4, float *logits, const float *x,
                            const float *__restrict__ norm_w, float eps,
                            const __half *__restrict__ Wr, const float *__restrict__ br, int H,
                            int E, int topk, float *hn_out, int *ids, float *w, float *red,
                            float *cval, int *cidx)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    load_vec_norm(vec4, x, norm_w, eps, H, red);
    if (hn_out) {
        float4 *hn4 = reinterpret_cast<float4 *>(hn_out);
        for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x)
            hn4[i] = vec4[i];
    }
    for (int e = warp; e < E; e += nw) {
        const float v = route_logit(Wr, br, e, H, vec4, lane);
        if (lane == 0)
            logits[e] = v;
    }
    __syncthreads();
    if (warp == 0)
        warp_topk_softmax(logits, E, topk, ids, w, cval, cidx);
}

/* ------------------------------------------------- the expert GEMVs */

/* An expert-GEMV item is a whole block's, as the run-4 kernels
 * (NOTES-engine.md): 128 output columns for gate_up (N = 2I), 64 for down
 * (41 and 28 us per-step on an H200, the fastest widths measured). Items a
 * warp each (64 columns, ks 8/17) measured slower inside the persistent
 * kernel: 140.4 against 133.6 us a layer, gate_up phase 59.3 against 53.3
 * (H100, run 7). */
template <int MODE> struct moe_tw {
    static constexpr int v = MODE == 0 ? 128 : 64;
};

/* Shared memory a block item needs, floats: its input slice and the row
 * groups' sums. */
__host__ __device__ static inline int moe_scratch_floats(int K, int ks)
{
    return round4(div_up(K, ks)) + DEC_THREADS * 8;
}

/* Item it of an expert GEMV out[j] = x[j] @ W[e_j] (W [K, N], x @ W
 * layout) for a whole block: TW output columns of chosen expert j over one
 * of ks row splits. TW/8 threads x 8 columns cover a row's TW columns; the
 * DEC_THREADS/(TW/8) row groups stride down the split's rows, four rows in
 * flight a thread (batches of eight with predication measured slower: 48.5
 * vs 41.0 us). Items are numbered tile fastest (neighbouring blocks read
 * neighbouring columns of the same rows). The block's sum goes to
 * partial[j][s][N]; the last block of the tile to finish adds every
 * (expert, split) partial in order with the bias:
 *   MODE 0 (gate_up): SwiGLU into out = act [topk][N/2];
 *   MODE 1 (down): out (= x) += sum_j w[j] * y[j], in expert order.
 * xsrc: MODE 0 hn [K] (already in shared memory when XS_SMEM), MODE 1 act
 * [topk][K]. scratch: moe_scratch_floats(K, ks) of shared memory; last_flag:
 * a shared int. counters: [tiles]. Called by every thread of the block. */
template <int MODE, bool XS_SMEM>
__device__ __forceinline__ void moe_item(int it, const float *xsrc, float *scratch,
                                         const __half *base, const __half *const *ptrs,
                                         const int *ids, const float *wts, int K, int N, int topk,
                                         int ks, float *partial, int *counters,
                                         const float *__restrict__ b, float limit, float alpha,
                                         float *out, int *last_flag)
{
    constexpr int TW = moe_tw<MODE>::v, LPR = TW / 8, RG = DEC_THREADS / LPR;
    const int tiles = div_up(N, TW);
    const int tile = it % tiles, js = it / tiles, s = js % ks, j = js / ks;
    const int tid = threadIdx.x;
    const int kc = div_up(K, ks), k0 = s * kc, k1 = min(K, k0 + kc);
    const int rg = tid / LPR, cl = tid % LPR, col = tile * TW + cl * 8;
    const __half *W = ptrs ? ptrs[j] : base + (size_t)ids[j] * K * N;
    float *red = scratch + round4(kc);
    const float *xs;
    __syncthreads();            /* the previous item is done with the scratch */
    if (XS_SMEM) {
        xs = xsrc + k0;
    } else {
        const float *x = MODE == 0 ? xsrc : xsrc + (size_t)j * K;
        for (int i = tid; i < k1 - k0; i += DEC_THREADS)
            scratch[i] = __ldcg(x + k0 + i);
        __syncthreads();
        xs = scratch;
    }
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (col < N) {
        const size_t rstride = (size_t)(N >> 3);  /* uint4 per row */
        const uint4 *wp = reinterpret_cast<const uint4 *>(W + (size_t)(k0 + rg) * N + col);
        int k = k0 + rg;
        for (; k + 3 * RG < k1; k += 4 * RG) {
            const uint4 w0 = ld_stream(wp);
            const uint4 w1 = ld_stream(wp + rstride * RG);
            const uint4 w2 = ld_stream(wp + 2 * rstride * RG);
            const uint4 w3 = ld_stream(wp + 3 * rstride * RG);
            axpy8(acc, xs[k - k0], w0);
            axpy8(acc, xs[k - k0 + RG], w1);
            axpy8(acc, xs[k - k0 + 2 * RG], w2);
            axpy8(acc, xs[k - k0 + 3 * RG], w3);
            wp += 4 * rstride * RG;
        }
        for (; k < k1; k += RG) {
            axpy8(acc, xs[k - k0], ld_stream(wp));
            wp += rstride * RG;
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        red[rg * TW + cl * 8 + i] = acc[i];
    __syncthreads();
    if (tid < TW) {
        float sum = 0.f;
        for (int r = 0; r < RG; r++)
            sum += red[r * TW + tid];
        const int c = tile * TW + tid;
        if (c < N)
            partial[((size_t)j * ks + s) * N + c] = sum;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0)
        *last_flag = atomicAdd(&counters[tile], 1) == topk * ks - 1;
    __syncthreads();
    if (!*last_flag)
        return;
    __threadfence();
    if (tid == 0)
        counters[tile] = 0;     /* ready for the next layer, launch or replay */
    if (MODE == 0) {
        for (int t = tid; t < (TW / 2) * topk; t += DEC_THREADS) {
            const int jj = t / (TW / 2), c = tile * TW + 2 * (t % (TW / 2));
            if (c >= N)
                continue;
            const int e = ids[jj];
            float gte = b[(size_t)e * N + c], up = b[(size_t)e * N + c + 1];
            for (int q = 0; q < ks; q++) {
                const float *pp = partial + ((size_t)jj * ks + q) * N + c;
                gte += __ldcg(pp);
                up += __ldcg(pp + 1);
            }
            out[(size_t)jj * (N >> 1) + (c >> 1)] = swiglu1(gte, up, limit, alpha);
        }
    } else if (tid < TW) {
        const int c = tile * TW + tid;
        if (c < N) {
            float sum = 0.f;
            for (int jj = 0; jj < topk; jj++) {
                const int e = ids[jj];
                float y = b[(size_t)e * N + c];
                for (int q = 0; q < ks; q++)
                    y += __ldcg(partial + ((size_t)jj * ks + q) * N + c);
                sum += wts[jj] * y;
            }
            out[c] = __ldcg(out + c) + sum;
        }
    }
}

/* Streams the first 64 rows of a down item's slab into L2 (one
 * 128-byte line a row: 64 fp16 columns) while other blocks finish the
 * gate_up phase. */
__device__ __forceinline__ void moe_prefetch_down(int it, const __half *base, const int *ids,
                                                  int K, int N, int ks)
{
    constexpr int TW = moe_tw<1>::v;
    const int tiles = div_up(N, TW);
    const int tile = it % tiles, js = it / tiles, s = js % ks, j = js / ks;
    const int kc = div_up(K, ks), k0 = s * kc, k1 = min(K, k0 + min(kc, 64));
    const __half *W = base + (size_t)ids[j] * K * N + tile * TW;
    for (int k = k0 + threadIdx.x; k < k1; k += DEC_THREADS)
        prefetch_l2(W + (size_t)k * N);
}

#endif
