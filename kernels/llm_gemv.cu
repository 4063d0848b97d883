/* llm_gemv.cu — the decode step (one token): the memory-bound kernels of a
 * layer, each as a work item (a warp's or a block's share) that two drivers
 * run:
 *   - per-kernel launches, one per step of a layer (kn_llm_qkv_decode,
 *     kn_llm_attn_decode, kn_llm_oproj_route, kn_llm_moe_*_decode): the
 *     24 GB mode, whose host picks the expert slots between routing and the
 *     expert GEMVs;
 *   - one persistent cooperative kernel for every layer of a resident step
 *     (kn_llm_decode_layers), the phases separated by grid-wide barriers, so
 *     no launch, ramp and drain a kernel (~10 us each on an H200,
 *     tests/bench/NOTES-engine.md).
 * Also the plain GEMV (lm_head, o_proj alone), the embedding row and the
 * stand-alone router.
 *
 * Not here: prefill (llm_batch.cu, llm_attn.cu).
 *
 * Invariants: every weight byte is read once with 16-byte loads; every sum
 * has a fixed order (partials over K splits and experts are added in order
 * by the last warp to finish), and both drivers run the same item code with
 * the same kn_decode_plan, so they give the same bits. Activations written
 * during the step are read with ld.global.cg (L2): inside the persistent
 * kernel another multiprocessor's L1 may hold an older copy.
 */
#include "llm_common.cuh"

int kn_llm_pdl_on;

extern "C" void kn_llm_set_pdl(int on) { kn_llm_pdl_on = on; }

#define DEC_THREADS 256     /* every decode block: block-wide sums have one order */
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_BPS 3           /* blocks a multiprocessor the persistent kernel is built for */
#define MAX_TOPK 32
#define MAX_NSPLIT 32       /* attention splits a head: one per lane in the combine */
#define MOE_TW 64           /* output columns of an expert-GEMV item: 8 lanes x 8 */
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

/* ------------------------------------------------------------- GEMV */

template <int R, int T>
__global__ void __launch_bounds__(T)
gemv_kernel(const __half *__restrict__ W, const float *__restrict__ bias, int N, int K,
            const float *__restrict__ in, const float *__restrict__ norm_w, float eps, int mode,
            float *__restrict__ out)
{
    extern __shared__ float4 xs4[];
    __shared__ float red[32];
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const int row0 = warp * R;
    if (row0 < N) {
        const int lines = (size_t)N * K * 2 <= (32u << 20) ? (K * 2 + 127) / 128 : PF_LINES;
#pragma unroll
        for (int r = 0; r < R; r++)
            prefetch_row(W + (size_t)min(row0 + r, N - 1) * K, K * 2, lines, lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(xs4, in, norm_w, eps, K, red);
    if (row0 >= N)
        return;
    const uint4 *w[R];
#pragma unroll
    for (int r = 0; r < R; r++)
        w[r] = reinterpret_cast<const uint4 *>(W + (size_t)min(row0 + r, N - 1) * K);
    float acc[R];
    rows_dot<R>(w, xs4, K >> 3, lane, acc);
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < R; r++)
        if (lane == r)
            v = acc[r];
    const int row = row0 + lane;
    if (lane < R && row < N) {
        if (bias)
            v += bias[row];
        if (mode)
            out[row] += v;
        else
            out[row] = v;
    }
}

static int vec_smem(int K, const void *fn)
{
    int bytes = K * (int)sizeof(float);
    if (bytes > 48 * 1024)
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    return bytes;
}

extern "C" int kn_llm_gemv(const kn_half *W, const float *bias, int N, int K, const float *in,
                           const float *norm_w, float eps, int mode, float *out,
                           cudaStream_t s)
{
    const __half *Wh = reinterpret_cast<const __half *>(W);
    /* Rows per warp: more rows amortize the shared-vector reads, fewer rows
     * give small matrices enough blocks to keep every SM streaming. Block
     * sizes as measured best on an H200: 128 threads for 2-4 rows a warp
     * (~90 registers: one wave), 256 for one row a warp. */
    if (N >= 32768) {
        int smem = vec_smem(K, (const void *)gemv_kernel<4, 128>);
        return kn_launch_pdl("gemv", gemv_kernel<4, 128>, dim3(kn_div_up(N, 4 * 4)), dim3(128),
                             smem, s, Wh, bias, N, K, in, norm_w, eps, mode, out);
    } else if (N >= 8192) {
        int smem = vec_smem(K, (const void *)gemv_kernel<2, 128>);
        return kn_launch_pdl("gemv", gemv_kernel<2, 128>, dim3(kn_div_up(N, 2 * 4)), dim3(128),
                             smem, s, Wh, bias, N, K, in, norm_w, eps, mode, out);
    }
    int smem = vec_smem(K, (const void *)gemv_kernel<1, 256>);
    return kn_launch_pdl("gemv", gemv_kernel<1, 256>, dim3(kn_div_up(N, 8)), dim3(256), smem, s,
                         Wh, bias, N, K, in, norm_w, eps, mode, out);
}

/* --------------------------------------------------------- embedding */

__global__ void embed_decode_kernel(const __half *__restrict__ E, int H,
                                    const kn_step *__restrict__ step, float *__restrict__ x)
{
    pdl_wait();
    pdl_launch_dependents();
    const __half *row = E + (size_t)step->id * H;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H; i += gridDim.x * blockDim.x)
        x[i] = __half2float(row[i]);
}

extern "C" int kn_llm_embed_decode(const kn_half *embed, int H, const struct kn_step *step,
                                   float *x, cudaStream_t s)
{
    return kn_launch_pdl("embed_decode", embed_decode_kernel, dim3(kn_div_up(H, 256)), dim3(256),
                         0, s, reinterpret_cast<const __half *>(embed), H, step, x);
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
__device__ void attn_item(int it, const float *q, const __half *kc, const __half *vc,
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

/* Top-k of logits[E] by one warp, ties to the lower index (a NaN never
 * wins over a number); writes ids[topk] and the softmax of the chosen
 * logits into w[topk]. chosen_val/chosen_idx: shared scratch [topk]. */
__device__ void warp_topk_softmax(const float *logits, int E, int topk, int *ids, float *w,
                                  float *chosen_val, int *chosen_idx)
{
    const int lane = threadIdx.x & 31;
    for (int k = 0; k < topk; k++) {
        float bv = 0.f;
        int bi = INT_MAX;
        for (int e = lane; e < E; e += 32) {   /* e grows: strict > keeps the lower index */
            bool taken = false;
            for (int j = 0; j < k; j++)
                taken |= chosen_idx[j] == e;
            const float v = logits[e];
            if (!taken && (bi == INT_MAX || v > bv))
                bv = v, bi = e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != INT_MAX && (bi == INT_MAX || ov > bv || (ov == bv && oi < bi)))
                bv = ov, bi = oi;
        }
        if (lane == 0) {
            chosen_val[k] = bv;
            chosen_idx[k] = bi;
        }
        __syncwarp();
    }
    if (lane == 0) {
        const float m = chosen_val[0];
        float sum = 0.f;
        for (int k = 0; k < topk; k++)
            sum += expf(chosen_val[k] - m);
        for (int k = 0; k < topk; k++) {
            ids[k] = chosen_idx[k];
            w[k] = expf(chosen_val[k] - m) / sum;
        }
    }
}

/* Block-wide routing of x as both drivers do it: hn = RMSNorm(x) * norm_w
 * into vec4 (and hn_out when non-NULL), the E logits by the block's warps,
 * then top-k and softmax into ids/w. logits: shared [E]. */
__device__ void route_block(float4 *vec4, float *logits, const float *x,
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

/* Item it of an expert GEMV out[j] = x[j] @ W[e_j] (W [K, N], x @ W
 * layout) for one warp, so no warp of a block waits on another (block
 * items, 128/64 columns a block, measured 3.20 against 2.86 ms a token in
 * the persistent kernel on an H200 with 11 splits: NOTES-engine.md, run 6):
 * MOE_TW output columns (lane & 7 owns 8 of them) of chosen
 * expert j over one of ks row splits; the warp's four row groups (lane >> 3)
 * stride down the split's rows and are summed by shuffles. Items are
 * numbered tile fastest, so a block's warps read neighbouring columns of
 * the same rows. The partial goes to partial[j][s][N]; the last split of
 * (j, tile) to finish adds the bias and the splits in order, then
 *   MODE 0 (gate_up): SwiGLU into out = act[j][N/2];
 *   MODE 1 (down): y into ybuf[j] (after the partials); the last expert of
 *   the tile adds sum_j w[j] * y[j] into out = x, in expert order.
 * xsrc: MODE 0 hn [K] (in shared memory when XS_SMEM), MODE 1 act [topk][K];
 * xw: the warp's shared scratch for its input slice (>= ceil(K/ks) floats).
 * counters: MODE 0 [topk * tiles], MODE 1 [topk * tiles + tiles]. */
template <int MODE, bool XS_SMEM>
__device__ __forceinline__ void moe_item(int it, const float *xsrc, float *xw,
                                         const __half *base, const __half *const *ptrs,
                                         const int *ids, const float *wts, int K, int N, int topk,
                                         int ks, float *partial, int *counters,
                                         const float *__restrict__ b, float limit, float alpha,
                                         float *out, int lane)
{
    const int tiles = (N + MOE_TW - 1) / MOE_TW;
    const int tile = it % tiles, js = it / tiles, s = js % ks, j = js / ks;
    const int kc = (K + ks - 1) / ks, k0 = s * kc, k1 = min(K, k0 + kc);
    const int rg = lane >> 3, col = tile * MOE_TW + (lane & 7) * 8;
    const __half *W = ptrs ? ptrs[j] : base + (size_t)ids[j] * K * N;
    /* The first rows of the slab start towards L2 while the input is staged. */
    if (k0 + lane < k1)
        prefetch_l2(W + (size_t)(k0 + lane) * N + tile * MOE_TW);
    const float *xs;
    if (XS_SMEM) {
        xs = xsrc + k0;
    } else {
        const float *src = MODE == 0 ? xsrc + k0 : xsrc + (size_t)j * K + k0;
        for (int i = lane; i < k1 - k0; i += 32)
            xw[i] = __ldcg(src + i);
        __syncwarp();
        xs = xw;
    }
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (col < N) {
        const size_t rs = (size_t)(N >> 3);      /* uint4 per row */
        const uint4 *wp = reinterpret_cast<const uint4 *>(W + (size_t)(k0 + rg) * N + col);
        int k = k0 + rg;
        /* Eight rows in flight per lane (32 per warp) before the first use;
         * the rest one at a time. */
        for (; k + 28 < k1; k += 32) {
            uint4 wv[8];
#pragma unroll
            for (int u = 0; u < 8; u++)
                wv[u] = ld_stream(wp + (size_t)u * 4 * rs);
#pragma unroll
            for (int u = 0; u < 8; u++)
                axpy8(acc, xs[k - k0 + 4 * u], wv[u]);
            wp += 32 * rs;
        }
        for (; k < k1; k += 4) {
            axpy8(acc, xs[k - k0], ld_stream(wp));
            wp += 4 * rs;
        }
    }
    /* Sum the four row groups: every lane ends with the same bits (float
     * addition commutes: a0+a1 == a1+a0). */
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 8);
        acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 16);
    }
    if (lane < 8 && col < N) {
        float4 *pp = reinterpret_cast<float4 *>(partial + ((size_t)j * ks + s) * N + col);
        pp[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        pp[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    if (!warp_arrive_last(counters + j * tiles + tile, ks, lane))
        return;
    const int e = ids[j];
    const int c_end = min(N, (tile + 1) * MOE_TW);
    if (MODE == 0) {
        const int c = tile * MOE_TW + 2 * lane;
        if (c < c_end) {
            float gte = b[(size_t)e * N + c], up = b[(size_t)e * N + c + 1];
            for (int q = 0; q < ks; q++) {
                const float *pp = partial + ((size_t)j * ks + q) * N + c;
                gte += __ldcg(pp);
                up += __ldcg(pp + 1);
            }
            gte = fminf(gte, limit);
            up = fminf(fmaxf(up, -limit), limit);
            const float glu = gte / (1.f + expf(-alpha * gte));
            out[(size_t)j * (N >> 1) + (c >> 1)] = (up + 1.f) * glu;
        }
        return;
    }
    float *ybuf = partial + (size_t)topk * ks * N;
    for (int c = tile * MOE_TW + lane; c < c_end; c += 32) {
        float y = b[(size_t)e * N + c];
        for (int q = 0; q < ks; q++)
            y += __ldcg(partial + ((size_t)j * ks + q) * N + c);
        ybuf[(size_t)j * N + c] = y;
    }
    if (!warp_arrive_last(counters + topk * tiles + tile, topk, lane))
        return;
    for (int c = tile * MOE_TW + lane; c < c_end; c += 32) {
        float sum = 0.f;
        for (int jj = 0; jj < topk; jj++)
            sum += wts[jj] * __ldcg(ybuf + (size_t)jj * N + c);
        out[c] = __ldcg(out + c) + sum;
    }
}

/* Streams the first rows of a down item's slab into L2 (one 128-byte line a
 * row: MOE_TW fp16 columns) while other warps finish the gate_up phase. */
__device__ __forceinline__ void moe_prefetch(int it, const __half *base, const int *ids, int K,
                                             int N, int ks, int lane)
{
    const int tiles = (N + MOE_TW - 1) / MOE_TW;
    const int tile = it % tiles, js = it / tiles, s = js % ks, j = js / ks;
    const int kc = (K + ks - 1) / ks, k0 = s * kc, k1 = min(K, k0 + kc);
    const __half *W = base + (size_t)ids[j] * K * N + tile * MOE_TW;
    for (int k = k0 + lane; k < k1 && k < k0 + 64; k += 32)
        prefetch_l2(W + (size_t)k * N);
}

/* ================================================================
 * Driver 1: one launch per step of a layer (the 24 GB mode).
 * ================================================================ */

__global__ void __launch_bounds__(DEC_THREADS)
qkv_decode_kernel(const float *__restrict__ x, const float *__restrict__ norm_w, float eps,
                  const __half *__restrict__ W, const float *__restrict__ bias, int H,
                  kn_attn_geom g, const float2 *__restrict__ rope,
                  const kn_step *__restrict__ step, float *__restrict__ q_out,
                  __half *__restrict__ kc, __half *__restrict__ vc)
{
    extern __shared__ float4 xs4[];
    __shared__ float red[32];
    const int npairs = (g.nheads + 2 * g.nkv) * (g.head_dim >> 1);
    const int p = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (p < npairs)
        qkv_prefetch(p, W, H, g, lane);
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(xs4, x, norm_w, eps, H, red);
    if (p < npairs)
        qkv_item<8>(p, xs4, W, bias, H, g, rope, step->pos, q_out, kc, vc, lane);
}

extern "C" int kn_llm_qkv_decode(const float *x, const float *norm_w, float eps,
                                 const kn_half *W, const float *bias, int H,
                                 const struct kn_attn_geom *g, const float *rope,
                                 const struct kn_step *step, float *q_out, kn_half *kc,
                                 kn_half *vc, cudaStream_t s)
{
    const int npairs = (g->nheads + 2 * g->nkv) * (g->head_dim / 2);
    const int smem = vec_smem(H, (const void *)qkv_decode_kernel);
    return kn_launch_pdl("qkv_decode", qkv_decode_kernel, dim3(kn_div_up(npairs, DEC_WARPS)),
                         dim3(DEC_THREADS), smem, s, x, norm_w, eps,
                         reinterpret_cast<const __half *>(W), bias, H, *g,
                         reinterpret_cast<const float2 *>(rope), step, q_out,
                         reinterpret_cast<__half *>(kc), reinterpret_cast<__half *>(vc));
}

__global__ void __launch_bounds__(DEC_THREADS)
attn_decode_kernel(const float *__restrict__ q, const __half *__restrict__ kc,
                   const __half *__restrict__ vc, const float *__restrict__ sinks,
                   kn_attn_geom g, const kn_step *__restrict__ step, int nsplit,
                   float *__restrict__ partial, int *__restrict__ counters,
                   float *__restrict__ out)
{
    const int it = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    pdl_wait();
    pdl_launch_dependents();
    if (it < g.nheads * nsplit)
        attn_item(it, q, kc, vc, sinks, g, step->pos, nsplit, partial, counters, out, lane);
}

extern "C" int kn_llm_attn_decode(const float *q, const kn_half *kc, const kn_half *vc,
                                  const float *sinks, const struct kn_attn_geom *g,
                                  const struct kn_step *step, int nsplit, float *partial,
                                  int *counters, float *out, cudaStream_t s)
{
    if (g->head_dim > 32 * DEC_MAX_DPL || nsplit < 1 || nsplit > MAX_NSPLIT)
        return -EINVAL;
    return kn_launch_pdl("attn_decode", attn_decode_kernel,
                         dim3(kn_div_up(g->nheads * nsplit, DEC_WARPS)), dim3(DEC_THREADS), 0, s,
                         q, reinterpret_cast<const __half *>(kc),
                         reinterpret_cast<const __half *>(vc), sinks, *g, step, nsplit, partial,
                         counters, out);
}

/* Stand-alone router (llm-bench-kernels): route_block on one block. */
__global__ void __launch_bounds__(DEC_THREADS)
route_decode_kernel(const float *__restrict__ x, const float *__restrict__ norm_w, float eps,
                    const __half *__restrict__ Wr, const float *__restrict__ br, int H, int E,
                    int topk, float *__restrict__ hn, int *__restrict__ ids,
                    float *__restrict__ w)
{
    extern __shared__ float4 sm4[];     /* [H/4], then logits[E] */
    __shared__ float red[32];
    __shared__ float cval[MAX_TOPK];
    __shared__ int cidx[MAX_TOPK];
    for (size_t off = (size_t)threadIdx.x * 128; off < (size_t)E * H * 2; off += blockDim.x * 128)
        prefetch_l2(reinterpret_cast<const char *>(Wr) + off);
    pdl_wait();
    pdl_launch_dependents();
    route_block(sm4, reinterpret_cast<float *>(sm4) + H, x, norm_w, eps, Wr, br, H, E, topk, hn,
                ids, w, red, cval, cidx);
}

extern "C" int kn_llm_route_decode(const float *x, const float *norm_w, float eps,
                                   const kn_half *Wr, const float *br, int H, int E, int topk,
                                   float *hn, int *ids, float *w, cudaStream_t s)
{
    if (topk > MAX_TOPK)
        return -EINVAL;
    const int smem = (H + E) * (int)sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)route_decode_kernel,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    return kn_launch_pdl("route_decode", route_decode_kernel, dim3(1), dim3(DEC_THREADS), smem,
                         s, x, norm_w, eps, reinterpret_cast<const __half *>(Wr), br, H, E, topk,
                         hn, ids, w);
}

/* x += Wo attn + bo (one row a warp), then the last block to finish routes
 * the updated x (route_block). The router weights are prefetched into L2 by
 * all blocks while the previous kernel finishes (PDL). */
__global__ void __launch_bounds__(DEC_THREADS)
oproj_route_kernel(const __half *__restrict__ Wo, const float *__restrict__ bo, int H, int Q,
                   const float *__restrict__ attn, float *__restrict__ x,
                   const float *__restrict__ norm_w, float eps, const __half *__restrict__ Wr,
                   const float *__restrict__ br, int E, int topk, float *__restrict__ hn,
                   int *__restrict__ ids, float *__restrict__ w, int *__restrict__ counter)
{
    extern __shared__ float4 sm4[];     /* max(Q, H + E) floats */
    __shared__ float red[32];
    __shared__ float cval[MAX_TOPK];
    __shared__ int cidx[MAX_TOPK];
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.x * DEC_WARPS + warp;
    if (row < H)
        prefetch_row(Wo + (size_t)row * Q, Q * 2, (Q * 2 + 127) / 128, lane);
    for (size_t off = ((size_t)blockIdx.x * blockDim.x + tid) * 128; off < (size_t)E * H * 2;
         off += (size_t)gridDim.x * blockDim.x * 128)
        prefetch_l2(reinterpret_cast<const char *>(Wr) + off);
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(sm4, attn, NULL, 0.f, Q, red);
    if (row < H)
        oproj_item<4>(row, sm4, Wo, bo, Q, x, lane);
    __threadfence();
    __syncthreads();
    if (tid == 0)
        last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    if (tid == 0)
        *counter = 0;
    route_block(sm4, reinterpret_cast<float *>(sm4) + H, x, norm_w, eps, Wr, br, H, E, topk, hn,
                ids, w, red, cval, cidx);
}

extern "C" int kn_llm_oproj_route(const kn_half *Wo, const float *bo, int H, int Q,
                                  const float *attn, float *x, const float *norm_w, float eps,
                                  const kn_half *Wr, const float *br, int E, int topk, float *hn,
                                  int *ids, float *w, int *counter, cudaStream_t s)
{
    if (topk > MAX_TOPK)
        return -EINVAL;
    const int fl = Q > H + E ? Q : H + E;
    const int smem = fl * (int)sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)oproj_route_kernel,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    return kn_launch_pdl("oproj_route", oproj_route_kernel, dim3(kn_div_up(H, DEC_WARPS)),
                         dim3(DEC_THREADS), smem, s, reinterpret_cast<const __half *>(Wo), bo, H,
                         Q, attn, x, norm_w, eps, reinterpret_cast<const __half *>(Wr), br, E,
                         topk, hn, ids, w, counter);
}

template <int MODE>
__global__ void __launch_bounds__(DEC_THREADS)
moe_decode_kernel(const float *__restrict__ xin, const __half *base,
                  const __half *const *__restrict__ ptrs, const int *__restrict__ ids,
                  const float *__restrict__ wts, int K, int N, int topk, int ks,
                  float *__restrict__ partial, int *__restrict__ counters,
                  const float *__restrict__ b, float limit, float alpha, float *__restrict__ out)
{
    extern __shared__ float xw_all[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int it = blockIdx.x * DEC_WARPS + warp;
    const int items = div_up(N, MOE_TW) * topk * ks;
    const int kcp = round4(div_up(K, ks));
    pdl_wait();
    pdl_launch_dependents();
    if (it < items)
        moe_item<MODE, false>(it, xin, xw_all + warp * kcp, base, ptrs, ids, wts, K, N, topk, ks,
                              partial, counters, b, limit, alpha, out, lane);
}

template <int MODE>
static int moe_launch(const float *xin, struct kn_expert_src W, const int *ids, int K, int N,
                      int topk, int ksplit, float *partial, int *counters, const float *b,
                      const float *wts, float limit, float alpha, float *out, cudaStream_t s)
{
    if (topk > MAX_TOPK || ksplit < 1)
        return -EINVAL;
    const int smem = DEC_WARPS * round4(kn_div_up(K, ksplit)) * (int)sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)moe_decode_kernel<MODE>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    const int items = kn_div_up(N, MOE_TW) * topk * ksplit;
    return kn_launch_pdl(MODE == 0 ? "moe_gate_up_decode" : "moe_down_decode",
                         moe_decode_kernel<MODE>, dim3(kn_div_up(items, DEC_WARPS)),
                         dim3(DEC_THREADS), smem, s, xin,
                         reinterpret_cast<const __half *>(W.base),
                         reinterpret_cast<const __half *const *>(W.ptrs), ids, wts, K, N, topk,
                         ksplit, partial, counters, b, limit, alpha, out);
}

extern "C" int kn_llm_moe_gate_up_decode(const float *hn, struct kn_expert_src W,
                                         const float *b, const int *ids, int H, int I, int topk,
                                         int ksplit, float limit, float alpha, float *partial,
                                         int *counters, float *act, cudaStream_t s)
{
    return moe_launch<0>(hn, W, ids, H, 2 * I, topk, ksplit, partial, counters, b, NULL, limit,
                         alpha, act, s);
}

extern "C" int kn_llm_moe_down_decode(const float *act, struct kn_expert_src W, const float *b,
                                      const int *ids, const float *w, int I, int H, int topk,
                                      int ksplit, float *partial, int *counters, float *x,
                                      cudaStream_t s)
{
    return moe_launch<1>(act, W, ids, I, H, topk, ksplit, partial, counters, b, w, 0.f, 0.f, x,
                         s);
}

extern "C" int kn_llm_moe_counters(int N, int topk, int mode)
{
    return kn_div_up(N, MOE_TW) * (mode == 0 ? topk : topk + 1);
}

extern "C" size_t kn_llm_moe_partial_floats(int N, int topk, int ksplit, int mode)
{
    return (size_t)N * topk * (mode == 0 ? ksplit : ksplit + 1);
}

/* ================================================================
 * Driver 2: every layer in one persistent cooperative kernel.
 * ================================================================ */

__device__ __forceinline__ unsigned ld_acquire(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_ns()
{
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* Grid-wide barrier (every block resident: a cooperative launch). Block 0
 * adds 2^31 - (blocks - 1), the others 1: when all have arrived the count's
 * low bits are back where they were and its top bit has flipped, so it
 * needs no reset between barriers or launches. Writes before the barrier
 * are visible after it to loads that bypass L1. A barrier not passed in 5 s
 * traps (a launch error) rather than hang the GPU. */
__device__ __forceinline__ void grid_sync(unsigned *bar)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        const unsigned old = atomicAdd(bar, add);
        const uint64_t t0 = global_ns();
        while (((old ^ ld_acquire(bar)) & 0x80000000u) == 0)
            if (global_ns() - t0 > 5000000000ull)
                __trap();
        __threadfence();
    }
    __syncthreads();
}

/* Shared memory of the persistent kernel, floats: the block's vector
 * (normalized x, attn or hn) and the router logits, then one input slice
 * per warp for the down items. */
__host__ __device__ static int dec_vec_floats(int H, int Q, int E)
{
    return round4(H > Q ? H : Q) + round4(E);
}

__host__ __device__ static int dec_xw_floats(int I, int ks_dn) { return round4(div_up(I, ks_dn)); }

/* The grid barrier ending phase k of layer l, timed by block 0 in the TIMED
 * instance (llm-bench-kernels; the check alone costs the untimed kernel a
 * register spill, so it is compiled out there). */
template <bool TIMED>
__device__ __forceinline__ void phase_end(const kn_decode_args &a, int l, int k)
{
    grid_sync(a.barrier);
    if (TIMED && blockIdx.x == 0 && threadIdx.x == 0)
        a.phase_ns[1 + 6 * l + k] = global_ns();
}

template <bool TIMED>
__global__ void __launch_bounds__(DEC_THREADS, DEC_BPS) decode_layers_kernel(kn_decode_args a)
{
    extern __shared__ float4 sm4[];
    __shared__ float red[32];
    __shared__ float cval[MAX_TOPK], sw[MAX_TOPK];
    __shared__ int cidx[MAX_TOPK], sids[MAX_TOPK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gw = blockIdx.x * DEC_WARPS + warp, W = gridDim.x * DEC_WARPS;
    const int H = a.H, I = a.I, E = a.E, K = a.topk, Q = a.g.nheads * a.g.head_dim;
    const int vecf = dec_vec_floats(H, Q, E);
    float4 *vec4 = sm4;
    float *logits = reinterpret_cast<float *>(sm4) + round4(H > Q ? H : Q);
    float *xw = reinterpret_cast<float *>(sm4) + vecf + warp * dec_xw_floats(I, a.plan.ks_dn);
    const int pos = a.step->pos;
    const int npairs = (a.g.nheads + 2 * a.g.nkv) * (a.g.head_dim >> 1);
    const int n_att = a.g.nheads * a.plan.nsplit;
    const int n_gu = div_up(2 * I, MOE_TW) * K * a.plan.ks_gu;
    const int n_dn = div_up(H, MOE_TW) * K * a.plan.ks_dn;
    const float2 *rope = reinterpret_cast<const float2 *>(a.rope);
    if (TIMED && blockIdx.x == 0 && threadIdx.x == 0)
        a.phase_ns[0] = global_ns();
    for (int l = 0; l < a.nlayers; l++) {
        const kn_decode_layer *L = a.layers + l;
        kn_attn_geom g = a.g;
        g.window = L->window;
        const __half *wqkv = reinterpret_cast<const __half *>(L->wqkv);
        const __half *wo = reinterpret_cast<const __half *>(L->wo);
        const __half *wr = reinterpret_cast<const __half *>(L->wr);
        __half *kc = reinterpret_cast<__half *>(L->kc), *vc = reinterpret_cast<__half *>(L->vc);

        /* 1. RMSNorm, q/k/v, RoPE, K and V into the cache; o_proj's rows
         * start towards L2 behind them. */
        load_vec_norm(vec4, a.x, L->attn_norm, a.eps, H, red);
        for (int p = gw; p < npairs; p += W)
            qkv_item<4>(p, vec4, wqkv, L->bqkv, H, g, rope, pos, a.q, kc, vc, lane);
        for (int r = gw; r < H; r += W)
            prefetch_row(wo + (size_t)r * Q, Q * 2, (Q * 2 + 127) / 128, lane);
        phase_end<TIMED>(a, l, 0);

        /* 2. attention */
        for (int it = gw; it < n_att; it += W)
            attn_item(it, a.q, kc, vc, L->sinks, g, pos, a.plan.nsplit, a.attn_partial,
                      a.attn_counters, a.attn, lane);
        phase_end<TIMED>(a, l, 1);

        /* 3. o_proj into the residual stream */
        load_vec_norm(vec4, a.attn, NULL, 0.f, Q, red);
        for (int r = gw; r < H; r += W)
            oproj_item<8>(r, vec4, wo, L->bo, Q, a.x, lane);
        for (int e = gw; e < E; e += W)
            prefetch_row(wr + (size_t)e * H, H * 2, (H * 2 + 127) / 128, lane);
        phase_end<TIMED>(a, l, 2);

        /* 4. router logits: every block normalizes x (it needs hn next),
         * the first E warps of the grid compute one logit each. */
        load_vec_norm(vec4, a.x, L->mlp_norm, a.eps, H, red);
        for (int e = gw; e < E; e += W) {
            const float v = route_logit(wr, L->br, e, H, vec4, lane);
            if (lane == 0)
                a.rlogits[e] = v;
        }
        phase_end<TIMED>(a, l, 3);

        /* 5. top-k (every block, same bits), gate_up + SwiGLU; then the
         * first rows of this warp's down items start towards L2. */
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            logits[e] = __ldcg(a.rlogits + e);
        __syncthreads();
        if (warp == 0)
            warp_topk_softmax(logits, E, K, sids, sw, cval, cidx);
        __syncthreads();
        const __half *gu = reinterpret_cast<const __half *>(L->gate_up);
        const __half *dn = reinterpret_cast<const __half *>(L->down);
        for (int it = gw; it < n_gu; it += W)
            moe_item<0, true>(it, reinterpret_cast<const float *>(vec4), xw, gu, NULL, sids, sw,
                              H, 2 * I, K, a.plan.ks_gu, a.moe_partial, a.gu_counters,
                              L->gate_up_b, a.limit, a.alpha, a.act, lane);
        for (int it = gw; it < n_dn; it += W)
            moe_prefetch(it, dn, sids, I, H, a.plan.ks_dn, lane);
        phase_end<TIMED>(a, l, 4);

        /* 6. down, weighted sum into x; the next layer's q/k/v rows start
         * towards L2. */
        for (int it = gw; it < n_dn; it += W)
            moe_item<1, false>(it, a.act, xw, dn, NULL, sids, sw, I, H, K, a.plan.ks_dn,
                               a.moe_partial, a.dn_counters, L->down_b, 0.f, 0.f, a.x, lane);
        if (l + 1 < a.nlayers)
            for (int p = gw; p < npairs; p += W)
                qkv_prefetch(p, reinterpret_cast<const __half *>(a.layers[l + 1].wqkv), H, g,
                             lane);
        phase_end<TIMED>(a, l, 5);
    }
}

/* ksplit for an expert GEMV whose items (tiles x topk a split) run on
 * nwarps warps: the least rows a warp streams, counting each item's fixed
 * cost (stage the input, sum, arrive) as 32 rows; at least 64 rows a split. */
static int moe_ksplit(int K, int N, int topk, int nwarps)
{
    const long per = (long)kn_div_up(N, MOE_TW) * topk;
    int maxks = K / 64;
    maxks = maxks < 1 ? 1 : maxks > 64 ? 64 : maxks;
    int best = 1;
    long bestc = -1;
    for (int ks = 1; ks <= maxks; ks++) {
        const long rounds = (per * ks + nwarps - 1) / nwarps;
        const long c = rounds * (kn_div_up(K, ks) + 32);
        if (bestc < 0 || c < bestc) {
            bestc = c;
            best = ks;
        }
    }
    return best;
}

extern "C" int kn_llm_decode_plan(int nsm, int H, int I, int E, int topk, int nheads,
                                  int head_dim, struct kn_decode_plan *p)
{
    if (topk > MAX_TOPK || head_dim > 32 * DEC_MAX_DPL || nsm < 1)
        return -EINVAL;
    const int Q = nheads * head_dim;
    int bps = DEC_BPS;
    /* Fewer warps give bigger splits and more shared memory a block, which
     * may lower the occupancy again: bps only falls, so this ends. */
    for (;;) {
        const int nw = nsm * bps * DEC_WARPS;
        p->blocks = nsm * bps;
        p->ks_gu = moe_ksplit(H, 2 * I, topk, nw);
        p->ks_dn = moe_ksplit(I, H, topk, nw);
        const int ns = nw / (2 * nheads);
        p->nsplit = ns < 1 ? 1 : ns > MAX_NSPLIT ? MAX_NSPLIT : ns;
        p->smem = (size_t)(dec_vec_floats(H, Q, E) + DEC_WARPS * dec_xw_floats(I, p->ks_dn)) *
                  sizeof(float);
        int occ = 0;
        if ((p->smem > 48 * 1024 &&
             (cudaFuncSetAttribute((const void *)decode_layers_kernel<false>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)p->smem) != cudaSuccess ||
              cudaFuncSetAttribute((const void *)decode_layers_kernel<true>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)p->smem) != cudaSuccess)) ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, decode_layers_kernel<false>,
                                                          DEC_THREADS, p->smem) != cudaSuccess ||
            occ < 1) {
            cudaGetLastError();
            p->blocks = 0;      /* the splits still serve the per-step launches */
            return 0;
        }
        if (occ >= bps)
            return 0;
        bps = occ;
    }
}

extern "C" int kn_llm_decode_layers(const struct kn_decode_args *a, cudaStream_t s)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(a->plan.blocks);
    cfg.blockDim = dim3(DEC_THREADS);
    cfg.dynamicSmemBytes = a->plan.smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaError_t e = a->phase_ns ? cudaLaunchKernelEx(&cfg, decode_layers_kernel<true>, *a)
                                : cudaLaunchKernelEx(&cfg, decode_layers_kernel<false>, *a);
    if (e != cudaSuccess) {
        cudaGetLastError();
        dq_log(DQ_LOG_ERROR, "kernels", "decode_layers (%d blocks): launch failed: %s",
               a->plan.blocks, cudaGetErrorString(e));
        return -EIO;
    }
    return KN_LAUNCHED("decode_layers");
}
