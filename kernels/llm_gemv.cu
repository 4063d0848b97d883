/* llm_gemv.cu — the memory-bound matrix-vector kernels of one decode step:
 * plain/residual GEMV (o_proj, lm_head), the fused norm + q/k/v + RoPE +
 * KV-store kernel, the router with top-k, and the two expert GEMVs of the
 * chosen experts with their fused epilogues (SwiGLU; weighted sum into the
 * residual).
 *
 * Not here: attention (llm_attn.cu), batched prefill steps (llm_batch.cu).
 *
 * Invariants: every weight byte is read once with 16-byte loads; sums over
 * split-K partials and over experts happen in a fixed order in the last
 * block to arrive, so results do not depend on block scheduling.
 */
#include "llm_common.cuh"

int kn_llm_pdl_on;

extern "C" void kn_llm_set_pdl(int on) { kn_llm_pdl_on = on; }

#define GEMV_THREADS 128  /* small blocks: one wave even at ~90 registers a thread */
/* Lines of 128 bytes of each row a GEMV block prefetches into L2 before
 * waiting for the previous kernel (PDL). Matrices that fit L2 (q/k/v 29 MB,
 * o_proj 24 MB) are prefetched whole, so they stream in while the previous
 * kernel (the down GEMV; latency-bound attention) finishes; for lm_head,
 * 2 KB a row keeps the first wave's prefetch inside L2. */
#define PF_LINES 16

/* Prefetch `lines` 128-byte lines of a row, spread over the warp's lanes. */
__device__ __forceinline__ void prefetch_row(const void *row, int bytes, int lines, int lane)
{
    const char *p = static_cast<const char *>(row);
    for (int i = lane; i < lines && i * 128 < bytes; i += 32)
        prefetch_l2(p + i * 128);
}
#define MOE_THREADS 256

/* ---------------------------------------------------- shared prologue */

/* Copies in[K] (fp32) into shared memory and, when norm_w is set, applies
 * RMSNorm (x * rsqrt(mean(x^2) + eps) * norm_w) in place. Ends with a
 * barrier. K % 4 == 0. */
__device__ __forceinline__ void load_vec_norm(float4 *xs4, const float *__restrict__ in,
                                              const float *__restrict__ norm_w, float eps,
                                              int K, float *red)
{
    const int K4 = K >> 2;
    const float4 *in4 = reinterpret_cast<const float4 *>(in);
    float ss = 0.f;
    for (int i = threadIdx.x; i < K4; i += blockDim.x) {
        float4 v = in4[i];
        xs4[i] = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
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
 * batches of U groups per row, all issued before the first is used, so a
 * short row costs one or two memory round trips, not one per group. */
template <int R>
__device__ __forceinline__ void rows_dot(const uint4 *const (&w)[R], const float4 *xs4, int K8,
                                         int lane, float (&acc)[R])
{
    constexpr int U = R == 2 ? 8 : 4;   /* measured on an H200 (NOTES-engine.md) */
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

/* ------------------------------------------------- q/k/v + RoPE + KV */

/* One warp per RoPE pair: rows (head*hd + i, head*hd + i + hd/2) of the
 * fused [q; k; v] weight, so the rotation happens in registers. */
__global__ void __launch_bounds__(GEMV_THREADS)
qkv_decode_kernel(const float *__restrict__ x, const float *__restrict__ norm_w, float eps,
                  const __half *__restrict__ W, const float *__restrict__ bias, int H,
                  kn_attn_geom g, const float2 *__restrict__ rope,
                  const kn_step *__restrict__ step, float *__restrict__ q_out,
                  __half *__restrict__ kc, __half *__restrict__ vc)
{
    extern __shared__ float4 xs4[];
    __shared__ float red[32];
    const int half_hd = g.head_dim >> 1;
    const int npairs = (g.nheads + 2 * g.nkv) * half_hd;
    const int p = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const int hg = p / half_hd, i = p % half_hd;
    const int r0 = hg * g.head_dim + i, r1 = r0 + half_hd;
    if (p < npairs) {
        const int lines = (H * 2 + 127) / 128;     /* the whole q/k/v matrix fits L2 */
        prefetch_row(W + (size_t)r0 * H, H * 2, lines, lane);
        prefetch_row(W + (size_t)r1 * H, H * 2, lines, lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(xs4, x, norm_w, eps, H, red);
    if (p >= npairs)
        return;
    const uint4 *w[2] = {reinterpret_cast<const uint4 *>(W + (size_t)r0 * H),
                         reinterpret_cast<const uint4 *>(W + (size_t)r1 * H)};
    float acc[2];
    rows_dot<2>(w, xs4, H >> 3, lane, acc);
    if (lane != 0)
        return;
    const int pos = step->pos;
    float y0 = acc[0] + bias[r0], y1 = acc[1] + bias[r1];
    if (hg < g.nheads + g.nkv) {
        const float2 cs = rope[(size_t)pos * half_hd + i];
        const float o0 = y0 * cs.x - y1 * cs.y, o1 = y1 * cs.x + y0 * cs.y;
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

extern "C" int kn_llm_qkv_decode(const float *x, const float *norm_w, float eps,
                                 const kn_half *W, const float *bias, int H,
                                 const struct kn_attn_geom *g, const float *rope,
                                 const struct kn_step *step, float *q_out, kn_half *kc,
                                 kn_half *vc, cudaStream_t s)
{
    const int npairs = (g->nheads + 2 * g->nkv) * (g->head_dim / 2);
    const int smem = vec_smem(H, (const void *)qkv_decode_kernel);
    return kn_launch_pdl("qkv_decode", qkv_decode_kernel,
                         dim3(kn_div_up(npairs, GEMV_THREADS / 32)), dim3(GEMV_THREADS), smem, s,
                         x, norm_w, eps, reinterpret_cast<const __half *>(W), bias, H, *g,
                         reinterpret_cast<const float2 *>(rope), step, q_out,
                         reinterpret_cast<__half *>(kc), reinterpret_cast<__half *>(vc));
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

/* ------------------------------------------------------------ router */

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

#define ROUTE_THREADS 512
#define MAX_TOPK 32

__global__ void __launch_bounds__(ROUTE_THREADS)
route_decode_kernel(const float *__restrict__ x, const float *__restrict__ norm_w, float eps,
                    const __half *__restrict__ Wr, const float *__restrict__ br, int H, int E,
                    int topk, float *__restrict__ hn, int *__restrict__ ids,
                    float *__restrict__ w)
{
    extern __shared__ float4 xs4[];     /* [H/4], then logits[E] */
    __shared__ float red[32];
    __shared__ float cval[MAX_TOPK];
    __shared__ int cidx[MAX_TOPK];
    for (size_t off = (size_t)threadIdx.x * 128; off < (size_t)E * H * 2; off += blockDim.x * 128)
        prefetch_l2(reinterpret_cast<const char *>(Wr) + off);
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(xs4, x, norm_w, eps, H, red);
    float *logits = reinterpret_cast<float *>(xs4) + H;
    float4 *hn4 = reinterpret_cast<float4 *>(hn);
    for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x)
        hn4[i] = xs4[i];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int e = 2 * warp; e < E; e += 2 * nw) {    /* two rows a warp, one round trip */
        const int e1 = e + 1 < E ? e + 1 : e;
        const uint4 *wr[2] = {reinterpret_cast<const uint4 *>(Wr + (size_t)e * H),
                              reinterpret_cast<const uint4 *>(Wr + (size_t)e1 * H)};
        float acc[2];
        rows_dot<2>(wr, xs4, H >> 3, lane, acc);
        if (lane == 0) {
            logits[e] = acc[0] + br[e];
            if (e + 1 < E)
                logits[e + 1] = acc[1] + br[e + 1];
        }
    }
    __syncthreads();
    if (warp == 0)
        warp_topk_softmax(logits, E, topk, ids, w, cval, cidx);
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
    return kn_launch_pdl("route_decode", route_decode_kernel, dim3(1), dim3(ROUTE_THREADS), smem,
                         s, x, norm_w, eps, reinterpret_cast<const __half *>(Wr), br, H, E, topk,
                         hn, ids, w);
}

/* ---------------------------------------------- o_proj + routing */

#define OR_THREADS 256

/* x += Wo attn + bo (one row a warp), then the last block to finish routes
 * the updated x: RMSNorm into hn, router logits, top-k and softmax. One
 * launch instead of two a layer; the router weights are prefetched into L2
 * by all blocks while the previous kernel finishes (PDL). */
__global__ void __launch_bounds__(OR_THREADS)
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
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int row = blockIdx.x * nw + warp;
    if (row < H)
        prefetch_row(Wo + (size_t)row * Q, Q * 2, (Q * 2 + 127) / 128, lane);
    for (size_t off = ((size_t)blockIdx.x * blockDim.x + tid) * 128; off < (size_t)E * H * 2;
         off += (size_t)gridDim.x * blockDim.x * 128)
        prefetch_l2(reinterpret_cast<const char *>(Wr) + off);
    pdl_wait();
    pdl_launch_dependents();
    load_vec_norm(sm4, attn, NULL, 0.f, Q, red);
    if (row < H) {
        const uint4 *wrow[1] = {reinterpret_cast<const uint4 *>(Wo + (size_t)row * Q)};
        float acc[1];
        rows_dot<1>(wrow, sm4, Q >> 3, lane, acc);
        if (lane == 0)
            x[row] += acc[0] + bo[row];
    }
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
    /* x was written by every block: read it past L1. */
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    const float4 *w4 = reinterpret_cast<const float4 *>(norm_w);
    float ss = 0.f;
    for (int i = tid; i < (H >> 2); i += blockDim.x) {
        const float4 v = __ldcg(x4 + i);
        sm4[i] = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / (float)H + eps);
    float4 *hn4 = reinterpret_cast<float4 *>(hn);
    for (int i = tid; i < (H >> 2); i += blockDim.x) {
        const float4 v = sm4[i], g = w4[i];
        const float4 o = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        sm4[i] = o;
        hn4[i] = o;
    }
    __syncthreads();
    float *logits = reinterpret_cast<float *>(sm4) + H;
    for (int e = 2 * warp; e < E; e += 2 * nw) {
        const int e1 = e + 1 < E ? e + 1 : e;
        const uint4 *wr[2] = {reinterpret_cast<const uint4 *>(Wr + (size_t)e * H),
                              reinterpret_cast<const uint4 *>(Wr + (size_t)e1 * H)};
        float acc[2];
        rows_dot<2>(wr, sm4, H >> 3, lane, acc);
        if (lane == 0) {
            logits[e] = acc[0] + br[e];
            if (e + 1 < E)
                logits[e + 1] = acc[1] + br[e + 1];
        }
    }
    __syncthreads();
    if (warp == 0)
        warp_topk_softmax(logits, E, topk, ids, w, cval, cidx);
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
    return kn_launch_pdl("oproj_route", oproj_route_kernel,
                         dim3(kn_div_up(H, OR_THREADS / 32)), dim3(OR_THREADS), smem, s,
                         reinterpret_cast<const __half *>(Wo), bo, H, Q, attn, x, norm_w, eps,
                         reinterpret_cast<const __half *>(Wr), br, E, topk, hn, ids, w, counter);
}

/* ---------------------------------------------------- expert GEMVs */

/* One block: TW output columns of one chosen expert over one K-split.
 * Thread layout: TW/8 lanes x 8 columns cover the TW columns of a row
 * (TW = 64: one 128-byte line); 256/(TW/8) row groups stride down the rows. The last block of a
 * column tile reduces every (expert, split) partial in order and runs the
 * epilogue: MODE 0 SwiGLU into act, MODE 1 weighted sum into x. */
template <int MODE, int TW>
__global__ void __launch_bounds__(MOE_THREADS)
moe_cols_kernel(const float *__restrict__ xin, const __half *base,
                const __half *const *__restrict__ ptrs, const int *__restrict__ ids, int K,
                int N, int topk, int ksplit, float *__restrict__ partial,
                int *__restrict__ counters, const float *__restrict__ b,
                const float *__restrict__ wts, float limit, float alpha,
                float *__restrict__ out)
{
    extern __shared__ float4 sm4[];
    float *sm = reinterpret_cast<float *>(sm4);
    __shared__ int last;
    const int tile = blockIdx.x, j = blockIdx.y / ksplit, ks = blockIdx.y % ksplit;
    const int tid = threadIdx.x;
    const int kc = (K + ksplit - 1) / ksplit;
    const int k0 = ks * kc, k1 = min(K, k0 + kc);
    const int kcp = (kc + 3) & ~3;
    constexpr int LPR = TW / 8, MOE_ROWGROUPS = MOE_THREADS / LPR, MOE_TILE = TW;
    const int rg = tid / LPR, cl = tid % LPR, col = tile * MOE_TILE + cl * 8;
    if (MODE == 1) {
        /* The routing was written two launches back (PDL rule 3): stream
         * the first rows of this block's slab into L2 while the gate_up
         * kernel still runs. */
        const __half *Wp = ptrs ? ptrs[j] : base + (size_t)ids[j] * K * N;
        if (cl == 0 && col < N)
            for (int k = k0 + rg, n = 0; k < k1 && n < 8; k += MOE_ROWGROUPS, n++)
                prefetch_l2(Wp + (size_t)k * N + tile * MOE_TILE);
    }
    pdl_wait();
    pdl_launch_dependents();
    const int eid = ids[j];
    const __half *W = ptrs ? ptrs[j] : base + (size_t)eid * K * N;
    float *xs = sm, *red = sm + kcp;
    const float *x = MODE == 0 ? xin : xin + (size_t)j * K;
    for (int i = tid; i < k1 - k0; i += MOE_THREADS)
        xs[i] = x[k0 + i];
    __syncthreads();

    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (col < N) {
        const size_t rstride = (size_t)(N >> 3);  /* uint4 per row */
        const uint4 *wp = reinterpret_cast<const uint4 *>(W + (size_t)(k0 + rg) * N + col);
        /* Four rows in flight per thread before the first use (batches of
         * eight with predication measured slower: 48.5 vs 41.0 us). */
        int k = k0 + rg;
        for (; k + 3 * MOE_ROWGROUPS < k1; k += 4 * MOE_ROWGROUPS) {
            const uint4 w0 = ld_stream(wp);
            const uint4 w1 = ld_stream(wp + rstride * MOE_ROWGROUPS);
            const uint4 w2 = ld_stream(wp + 2 * rstride * MOE_ROWGROUPS);
            const uint4 w3 = ld_stream(wp + 3 * rstride * MOE_ROWGROUPS);
            axpy8(acc, xs[k - k0], w0);
            axpy8(acc, xs[k - k0 + MOE_ROWGROUPS], w1);
            axpy8(acc, xs[k - k0 + 2 * MOE_ROWGROUPS], w2);
            axpy8(acc, xs[k - k0 + 3 * MOE_ROWGROUPS], w3);
            wp += 4 * rstride * MOE_ROWGROUPS;
        }
        for (; k < k1; k += MOE_ROWGROUPS) {
            axpy8(acc, xs[k - k0], ld_stream(wp));
            wp += rstride * MOE_ROWGROUPS;
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        red[rg * MOE_TILE + cl * 8 + i] = acc[i];
    __syncthreads();
    if (tid < MOE_TILE) {
        float sum = 0.f;
        for (int r = 0; r < MOE_ROWGROUPS; r++)
            sum += red[r * MOE_TILE + tid];
        const int c = tile * MOE_TILE + tid;
        if (c < N)
            partial[((size_t)j * ksplit + ks) * N + c] = sum;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0)
        last = atomicAdd(&counters[tile], 1) == topk * ksplit - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    if (tid == 0)
        counters[tile] = 0;     /* ready for the next launch (or graph replay) */

    if (MODE == 0) {
        const int I = N >> 1;
        for (int t = tid; t < (MOE_TILE / 2) * topk; t += MOE_THREADS) {
            const int jj = t / (MOE_TILE / 2), c = tile * MOE_TILE + 2 * (t % (MOE_TILE / 2));
            if (c >= N)
                continue;
            const int e = ids[jj];
            float gte = b[(size_t)e * N + c], up = b[(size_t)e * N + c + 1];
            for (int q = 0; q < ksplit; q++) {
                const float *pp = partial + ((size_t)jj * ksplit + q) * N + c;
                gte += __ldcg(pp);
                up += __ldcg(pp + 1);
            }
            gte = fminf(gte, limit);
            up = fminf(fmaxf(up, -limit), limit);
            const float glu = gte / (1.f + expf(-alpha * gte));
            out[(size_t)jj * I + (c >> 1)] = (up + 1.f) * glu;
        }
    } else {
        if (tid < MOE_TILE) {
            const int c = tile * MOE_TILE + tid;
            if (c < N) {
                float sum = 0.f;
                for (int jj = 0; jj < topk; jj++) {
                    const int e = ids[jj];
                    float y = b[(size_t)e * N + c];
                    for (int q = 0; q < ksplit; q++)
                        y += __ldcg(partial + ((size_t)jj * ksplit + q) * N + c);
                    sum += wts[jj] * y;
                }
                out[c] += sum;
            }
        }
    }
}

/* Output columns per expert-GEMV block. Measured on an H200 with
 * llm-bench-kernels (tests/bench/NOTES-engine.md): gate_up (N = 5760) 41 us
 * with 128 columns vs 52 us with 64; down (N = 2880) 28 us with 64 vs 29
 * with 128. */
static int moe_tile(int mode) { return mode == 0 ? 128 : 64; }

extern "C" int kn_llm_moe_counters(int N) { return kn_div_up(N, 64); }

extern "C" int kn_llm_moe_ksplit(int K, int N, int topk, int nsm, int mode)
{
    const int tiles = kn_div_up(N, moe_tile(mode));
    int ks = kn_div_up(4L * nsm, (long)tiles * topk);
    const int maxks = K / 64 > 1 ? K / 64 : 1;   /* at least 64 rows per split */
    if (ks > maxks)
        ks = maxks;
    if (ks < 1)
        ks = 1;
    return ks;
}

extern "C" size_t kn_llm_moe_partial_floats(int N, int topk, int ksplit)
{
    return (size_t)N * topk * ksplit;
}

template <int MODE, int TW>
static int moe_launch_tw(const float *xin, struct kn_expert_src W, const int *ids, int K, int N,
                      int topk, int ksplit, float *partial, int *counters, const float *b,
                      const float *wts, float limit, float alpha, float *out, cudaStream_t s)
{
    const int kc = kn_div_up(K, ksplit);
    const int smem = (((kc + 3) & ~3) + MOE_THREADS * 8) * (int)sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)moe_cols_kernel<MODE, TW>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    dim3 grid(kn_div_up(N, TW), topk * ksplit);
    return kn_launch_pdl(MODE == 0 ? "moe_gate_up_decode" : "moe_down_decode",
                         moe_cols_kernel<MODE, TW>, grid, dim3(MOE_THREADS), smem, s, xin,
                         reinterpret_cast<const __half *>(W.base),
                         reinterpret_cast<const __half *const *>(W.ptrs), ids, K, N, topk, ksplit,
                         partial, counters, b, wts, limit, alpha, out);
}

template <int MODE>
static int moe_launch(const float *xin, struct kn_expert_src W, const int *ids, int K, int N,
                      int topk, int ksplit, float *partial, int *counters, const float *b,
                      const float *wts, float limit, float alpha, float *out, cudaStream_t s)
{
    if (moe_tile(MODE) == 128)
        return moe_launch_tw<MODE, 128>(xin, W, ids, K, N, topk, ksplit, partial, counters, b,
                                        wts, limit, alpha, out, s);
    return moe_launch_tw<MODE, 64>(xin, W, ids, K, N, topk, ksplit, partial, counters, b, wts,
                                   limit, alpha, out, s);
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
