/* llm_batch.cu — the element-wise and small steps of the prefill path that
 * sit between cuBLAS GEMMs: embedding, RMSNorm, bias + RoPE + KV store,
 * residual adds, the router with top-k for n tokens, the stable grouping of
 * (token, expert) pairs, row gathers, SwiGLU and the weighted combine. Also
 * the dtype conversion used while uploading weights.
 *
 * Not here: GEMMs (cuBLAS, in runner/engine.c), attention (llm_attn.cu).
 *
 * Invariant: every reduction has a fixed order (no float atomics), so a
 * prompt gives bit-identical logits run after run.
 */
#include <cuda_bf16.h>

#include "llm_common.cuh"

/* ------------------------------------------------------------ embed */

__global__ void embed_kernel(const __half *__restrict__ E, int H, const int32_t *__restrict__ ids,
                             float *__restrict__ x)
{
    const __half *row = E + (size_t)ids[blockIdx.x] * H;
    float *xr = x + (size_t)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        xr[i] = __half2float(row[i]);
}

extern "C" int kn_llm_embed(const kn_half *embed, int H, const int32_t *ids, int n, float *x,
                            cudaStream_t s)
{
    embed_kernel<<<n, 256, 0, s>>>(reinterpret_cast<const __half *>(embed), H, ids, x);
    return KN_LAUNCHED("embed");
}

/* ---------------------------------------------------------- RMSNorm */

__device__ __forceinline__ float sq4(float4 v)
{
    return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
}

/* The second half of an RMSNorm of one row, for the elements this thread
 * holds final values of (i = threadIdx.x + k*blockDim.x, float4s):
 * ss is its partial sum of squares; writes x*r*w to out16 and/or out32.
 * Every thread of the block calls it. */
__device__ __forceinline__ void norm_row_out(const float4 *__restrict__ x4, int H, float ss,
                                             const float4 *__restrict__ w4, float eps,
                                             __half2 *__restrict__ o16,
                                             float4 *__restrict__ o32, float *red)
{
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / (float)H + eps);
    for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x) {
        const float4 v = x4[i], w = w4[i];
        const float4 y = make_float4(v.x * r * w.x, v.y * r * w.y, v.z * r * w.z, v.w * r * w.w);
        if (o16) {
            o16[2 * i] = __floats2half2_rn(y.x, y.y);
            o16[2 * i + 1] = __floats2half2_rn(y.z, y.w);
        }
        if (o32)
            o32[i] = y;
    }
}

/* One block a row: x's RMSNorm with weight w into out16 and/or out32. */
__global__ void rmsnorm_kernel(const float *__restrict__ x, const float *__restrict__ w,
                               float eps, int H, __half *__restrict__ out16,
                               float *__restrict__ out32)
{
    __shared__ float red[32];
    pdl_wait();
    pdl_launch_dependents();
    const size_t row = (size_t)blockIdx.x * H;
    const float4 *x4 = reinterpret_cast<const float4 *>(x + row);
    float ss = 0.f;
    for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x)
        ss += sq4(x4[i]);
    norm_row_out(x4, H, ss, reinterpret_cast<const float4 *>(w), eps,
                 out16 ? reinterpret_cast<__half2 *>(out16 + row) : NULL,
                 out32 ? reinterpret_cast<float4 *>(out32 + row) : NULL, red);
}

extern "C" int kn_llm_rmsnorm(const float *x, const float *w, float eps, int n, int H,
                              kn_half *out16, float *out32, cudaStream_t s)
{
    if (H % 4)
        return -EINVAL;
    return kn_launch_pdl("rmsnorm", rmsnorm_kernel, dim3(n), dim3(256), 0, s, x, w, eps, H,
                         reinterpret_cast<__half *>(out16), out32);
}

/* ------------------------------------------- bias + RoPE + KV store */

/* One thread per RoPE pair (token t, head hg of q|k|v, i < hd/2). */
__global__ void qkv_prefill_kernel(const float *__restrict__ qkv, const float *__restrict__ bias,
                                   int n, int pos0, kn_attn_geom g,
                                   const float2 *__restrict__ rope, __half *__restrict__ q16,
                                   __half *__restrict__ kc, __half *__restrict__ vc)
{
    const int hd = g.head_dim, half_hd = hd >> 1;
    const int nhg = g.nheads + 2 * g.nkv, width = nhg * hd;
    const long total = (long)n * nhg * half_hd;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        const int t = (int)(idx / ((long)nhg * half_hd));
        const int rem = (int)(idx % ((long)nhg * half_hd));
        const int hg = rem / half_hd, i = rem % half_hd;
        const int c0 = hg * hd + i, c1 = c0 + half_hd;
        const int pos = pos0 + t;
        float y0 = qkv[(size_t)t * width + c0] + bias[c0];
        float y1 = qkv[(size_t)t * width + c1] + bias[c1];
        if (hg < g.nheads + g.nkv) {
            const float2 cs = rope[(size_t)pos * half_hd + i];
            const float o0 = y0 * cs.x - y1 * cs.y, o1 = y1 * cs.x + y0 * cs.y;
            y0 = o0;
            y1 = o1;
        }
        __half *dst;
        if (hg < g.nheads) {
            dst = q16 + ((size_t)t * g.nheads + hg) * hd;
        } else {
            const bool is_k = hg < g.nheads + g.nkv;
            const int kvh = is_k ? hg - g.nheads : hg - g.nheads - g.nkv;
            dst = (is_k ? kc : vc) + ((size_t)kvh * g.max_ctx + pos) * hd;
        }
        dst[i] = __float2half_rn(y0);
        dst[i + half_hd] = __float2half_rn(y1);
    }
}

extern "C" int kn_llm_qkv_prefill(const float *qkv, const float *bias, int n, int pos0,
                                  const struct kn_attn_geom *g, const float *rope, kn_half *q16,
                                  kn_half *kc, kn_half *vc, cudaStream_t s)
{
    const long total = (long)n * (g->nheads + 2 * g->nkv) * (g->head_dim / 2);
    const int blocks = (int)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    qkv_prefill_kernel<<<blocks, 256, 0, s>>>(qkv, bias, n, pos0, *g,
                                               reinterpret_cast<const float2 *>(rope),
                                               reinterpret_cast<__half *>(q16),
                                               reinterpret_cast<__half *>(kc),
                                               reinterpret_cast<__half *>(vc));
    return KN_LAUNCHED("qkv_prefill");
}

/* --------------------------------------------------------- residual */

/* x4[i] += d; returns the new value's sum of squares (for the row's norm). */
__device__ __forceinline__ float add_row4(float4 *x4, int i, float4 d)
{
    float4 v = x4[i];
    v.x += d.x;
    v.y += d.y;
    v.z += d.z;
    v.w += d.w;
    x4[i] = v;
    return sq4(v);
}

/* One block a token: x += bias (the o_proj GEMM already added its output
 * into x), then the MLP's RMSNorm of x into out16 and out32. */
__global__ void __launch_bounds__(256)
bias_resid_norm_kernel(float *__restrict__ x, const float *__restrict__ bias,
                       const float *__restrict__ w, float eps, int H, __half *__restrict__ out16,
                       float *__restrict__ out32)
{
    __shared__ float red[32];
    const size_t row = (size_t)blockIdx.x * H;
    float4 *x4 = reinterpret_cast<float4 *>(x + row);
    const float4 *b4 = reinterpret_cast<const float4 *>(bias);
    float ss = 0.f;
    for (int i = threadIdx.x; i < (H >> 2); i += blockDim.x)
        ss += add_row4(x4, i, b4[i]);
    norm_row_out(x4, H, ss, reinterpret_cast<const float4 *>(w), eps,
                 out16 ? reinterpret_cast<__half2 *>(out16 + row) : NULL,
                 out32 ? reinterpret_cast<float4 *>(out32 + row) : NULL, red);
}

extern "C" int kn_llm_bias_resid_norm(float *x, const float *bias, const float *w, float eps,
                                      int n, int H, kn_half *out16, float *out32,
                                      cudaStream_t s)
{
    if (H % 4)
        return -EINVAL;
    bias_resid_norm_kernel<<<n, 256, 0, s>>>(x, bias, w, eps, H,
                                              reinterpret_cast<__half *>(out16), out32);
    return KN_LAUNCHED("bias_resid_norm");
}

/* ----------------------------------------------------------- router */

#define ROUTE_TOK 8             /* tokens (warps) a block */
#define ROUTE_MAX_E 256
#define ROUTE_MAX_TOPK 32

/* Top-k of the router logits (a cuBLAS fp32 GEMM in the engine: the top-k
 * choice is discrete, so the router runs at full precision from fp32
 * activations): one warp a token, the bias added first. */
__global__ void __launch_bounds__(256)
route_topk_kernel(const float *__restrict__ lg, const float *__restrict__ br, int n, int E,
                  int topk, int *__restrict__ ids, float *__restrict__ w)
{
    __shared__ float logits[ROUTE_TOK][ROUTE_MAX_E];
    __shared__ float cval[ROUTE_TOK][ROUTE_MAX_TOPK];
    __shared__ int cidx[ROUTE_TOK][ROUTE_MAX_TOPK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_TOK + warp;
    if (t >= n)
        return;
    for (int e = lane; e < E; e += 32)
        logits[warp][e] = lg[(size_t)t * E + e] + br[e];
    __syncwarp();
    warp_topk_softmax(logits[warp], E, topk, ids + (size_t)t * topk, w + (size_t)t * topk,
                      cval[warp], cidx[warp]);
}

extern "C" int kn_llm_route_topk(const float *logits, const float *br, int n, int E, int topk,
                                 int *ids, float *w, cudaStream_t s)
{
    if (E > ROUTE_MAX_E || topk > ROUTE_MAX_TOPK)
        return -EINVAL;
    route_topk_kernel<<<kn_div_up(n, ROUTE_TOK), 256, 0, s>>>(logits, br, n, E, topk, ids, w);
    return KN_LAUNCHED("route_topk");
}

/* --------------------------------------------------------- grouping */

#define GROUP_THREADS 1024

/* One block: the histogram of expert ids, its exclusive prefix, then a
 * stable scatter in chunks of blockDim pairs. Within a warp, lanes holding
 * the same expert are ranked by __match_any_sync; across warps, by a
 * per-chunk prefix of the warps' counts (shared [nwarps][E], one warp
 * scanning each expert's column). blockDim.x is a multiple of 32, <= 1024. */
__global__ void __launch_bounds__(GROUP_THREADS)
moe_group_kernel(const int *__restrict__ ids, int m, int E, int topk, int *__restrict__ offsets,
                 int *__restrict__ rows_tok, int *__restrict__ row_of)
{
    extern __shared__ int sh[];
    int *base = sh, *wcnt = sh + E;     /* [E], [nw][E] */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    for (int e = tid; e < E; e += blockDim.x)
        base[e] = 0;
    __syncthreads();
    for (int i = tid; i < m; i += blockDim.x)
        atomicAdd(&base[ids[i]], 1);    /* integer counts: order does not matter */
    __syncthreads();
    if (tid == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) {
            const int c = base[e];
            base[e] = acc;
            offsets[e] = acc;
            acc += c;
        }
        offsets[E] = acc;
    }
    for (int c0 = 0; c0 < m; c0 += blockDim.x) {
        for (int k = tid; k < nw * E; k += blockDim.x)
            wcnt[k] = 0;
        __syncthreads();
        const int i = c0 + tid;
        const int v = i < m ? ids[i] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, v);
        const int rank = __popc(same & ((1u << lane) - 1u));
        if (v >= 0 && rank == 0)
            wcnt[warp * E + v] = __popc(same);
        __syncthreads();
        for (int e = warp; e < E; e += nw) {   /* lane w scans warp w's count of e */
            const int c = lane < nw ? wcnt[lane * E + e] : 0;
            int incl = c;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o)
                    incl += t;
            }
            const int b0 = base[e];
            __syncwarp();
            if (lane < nw)
                wcnt[lane * E + e] = b0 + incl - c;
            if (lane == 31)
                base[e] = b0 + incl;
        }
        __syncthreads();
        if (v >= 0) {
            const int r = wcnt[warp * E + v] + rank;
            rows_tok[r] = i / topk;
            row_of[i] = r;
        }
        __syncthreads();
    }
}

extern "C" int kn_llm_moe_group(const int *ids, int n, int topk, int E, int *offsets,
                                int *rows_tok, int *row_of, cudaStream_t s)
{
    if (E > ROUTE_MAX_E)
        return -EINVAL;
    const size_t smem = (size_t)(E + (GROUP_THREADS / 32) * E) * sizeof(int);
    moe_group_kernel<<<1, GROUP_THREADS, smem, s>>>(ids, n * topk, E, topk, offsets, rows_tok,
                                                    row_of);
    return KN_LAUNCHED("moe_group");
}

/* ------------------------------------------------------ gather, glu */

__global__ void gather_rows_kernel(const uint4 *__restrict__ src, const int *__restrict__ rows,
                                   int H8, uint4 *__restrict__ dst)
{
    const uint4 *s = src + (size_t)rows[blockIdx.x] * H8;
    uint4 *d = dst + (size_t)blockIdx.x * H8;
    for (int i = threadIdx.x; i < H8; i += blockDim.x)
        d[i] = s[i];
}

extern "C" int kn_llm_gather_rows(const kn_half *src, const int *rows, int m, int H,
                                  kn_half *dst, cudaStream_t s)
{
    if (m == 0)
        return 0;
    gather_rows_kernel<<<m, 128, 0, s>>>(reinterpret_cast<const uint4 *>(src), rows, H / 8,
                                         reinterpret_cast<uint4 *>(dst));
    return KN_LAUNCHED("gather_rows");
}

/* Two outputs a thread (one 8-byte load of gate, up, gate, up). */
__global__ void swiglu_kernel(const __half2 *__restrict__ gu, const float *__restrict__ b,
                              long pairs, int I, float limit, float alpha,
                              __half2 *__restrict__ act)
{
    const int I2 = I >> 1;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < pairs;
         idx += (long)gridDim.x * blockDim.x) {
        const long r = idx / I2;
        const int i = (int)(idx % I2) * 2;
        const float4 bb = *reinterpret_cast<const float4 *>(b + 2 * i);
        const uint2 raw = *reinterpret_cast<const uint2 *>(gu + r * I + i);
        const float2 v0 = __half22float2(*reinterpret_cast<const __half2 *>(&raw.x));
        const float2 v1 = __half22float2(*reinterpret_cast<const __half2 *>(&raw.y));
        const float o0 = swiglu1(v0.x + bb.x, v0.y + bb.y, limit, alpha);
        const float o1 = swiglu1(v1.x + bb.z, v1.y + bb.w, limit, alpha);
        act[r * I2 + (i >> 1)] = __floats2half2_rn(o0, o1);
    }
}

extern "C" int kn_llm_swiglu(const kn_half *gu, const float *b, int m, int I, float limit,
                             float alpha, kn_half *act, cudaStream_t s)
{
    const long pairs = (long)m * (I / 2);
    if (pairs == 0)
        return 0;
    if (I % 4)
        return -EINVAL;
    const int blocks = (int)(pairs / 256 + 1 < 65536 ? pairs / 256 + 1 : 65536);
    swiglu_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<const __half2 *>(gu), b, pairs, I,
                                         limit, alpha, reinterpret_cast<__half2 *>(act));
    return KN_LAUNCHED("swiglu");
}

/* --------------------------------------------------------- combine */

/* One block a token: x += sum_j w_j (y[row_j] + b[expert_j]), j in order;
 * then, when norm_w is set, the next layer's attention RMSNorm of x into
 * out16. */
__global__ void __launch_bounds__(256)
moe_combine_kernel(const float *__restrict__ y, const float *__restrict__ b,
                   const int *__restrict__ ids, const float *__restrict__ w,
                   const int *__restrict__ row_of, int topk, int H, float *__restrict__ x,
                   const float *__restrict__ norm_w, float eps, __half *__restrict__ out16)
{
    __shared__ float red[32];
    const int t = blockIdx.x;
    const int H4 = H >> 2;
    float4 *x4 = reinterpret_cast<float4 *>(x + (size_t)t * H);
    float ss = 0.f;
    for (int i = threadIdx.x; i < H4; i += blockDim.x) {
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j = 0; j < topk; j++) {
            const int p = t * topk + j;
            const float wp = w[p];
            const float4 yv = reinterpret_cast<const float4 *>(y + (size_t)row_of[p] * H)[i];
            const float4 bv = reinterpret_cast<const float4 *>(b + (size_t)ids[p] * H)[i];
            sum.x += wp * (yv.x + bv.x);
            sum.y += wp * (yv.y + bv.y);
            sum.z += wp * (yv.z + bv.z);
            sum.w += wp * (yv.w + bv.w);
        }
        ss += add_row4(x4, i, sum);
    }
    if (norm_w)                         /* uniform across the block */
        norm_row_out(x4, H, ss, reinterpret_cast<const float4 *>(norm_w), eps,
                     reinterpret_cast<__half2 *>(out16 + (size_t)t * H), NULL, red);
}

extern "C" int kn_llm_moe_combine(const float *y, const float *b, const int *ids,
                                  const float *w, const int *row_of, int n, int topk, int H,
                                  float *x, const float *norm_w, float eps, kn_half *out16,
                                  cudaStream_t s)
{
    if (H % 4)
        return -EINVAL;
    moe_combine_kernel<<<n, 256, 0, s>>>(y, b, ids, w, row_of, topk, H, x, norm_w, eps,
                                         reinterpret_cast<__half *>(out16));
    return KN_LAUNCHED("moe_combine");
}

/* ------------------------------------------------------------- misc */

__global__ void convert_kernel(const void *__restrict__ src, int sd, size_t n, int f32,
                               void *__restrict__ dst)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v;
        if (sd == 0)
            v = __half2float(static_cast<const __half *>(src)[i]);
        else if (sd == 1)
            v = __bfloat162float(static_cast<const __nv_bfloat16 *>(src)[i]);
        else
            v = static_cast<const float *>(src)[i];
        if (f32)
            static_cast<float *>(dst)[i] = v;
        else
            static_cast<__half *>(dst)[i] = __float2half_rn(v);
    }
}

extern "C" int kn_llm_convert(const void *src, int src_dtype, size_t n, int dst_f32, void *dst,
                              cudaStream_t s)
{
    if (n == 0)
        return 0;
    const size_t blocks = n / 256 + 1 < 65536 ? n / 256 + 1 : 65536;
    convert_kernel<<<(unsigned)blocks, 256, 0, s>>>(src, src_dtype, n, dst_f32, dst);
    return KN_LAUNCHED("convert");
}

__global__ void fill_kernel(float *p, size_t n, float v)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

extern "C" int kn_llm_fill_f32(float *p, size_t n, float v, cudaStream_t s)
{
    if (n == 0)
        return 0;
    const size_t blocks = n / 256 + 1 < 65536 ? n / 256 + 1 : 65536;
    fill_kernel<<<(unsigned)blocks, 256, 0, s>>>(p, n, v);
    return KN_LAUNCHED("fill");
}
