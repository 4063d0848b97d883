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

__global__ void rmsnorm_kernel(const float *__restrict__ x, const float *__restrict__ w,
                               float eps, int H, __half *__restrict__ out16,
                               float *__restrict__ out32)
{
    __shared__ float red[32];
    pdl_wait();
    pdl_launch_dependents();
    const float *xr = x + (size_t)blockIdx.x * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / (float)H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = xr[i] * r * w[i];
        if (out16)
            out16[(size_t)blockIdx.x * H + i] = __float2half_rn(v);
        if (out32)
            out32[(size_t)blockIdx.x * H + i] = v;
    }
}

extern "C" int kn_llm_rmsnorm(const float *x, const float *w, float eps, int n, int H,
                              kn_half *out16, float *out32, cudaStream_t s)
{
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

__global__ void add_bias_resid_kernel(const float *__restrict__ y, const float *__restrict__ b,
                                      long total, int H, float *__restrict__ x)
{
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x)
        x[i] += y[i] + (b ? b[i % H] : 0.f);
}

extern "C" int kn_llm_add_bias_resid(const float *y, const float *bias, int n, int H, float *x,
                                     cudaStream_t s)
{
    const long total = (long)n * H;
    const int blocks = (int)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    add_bias_resid_kernel<<<blocks, 256, 0, s>>>(y, bias, total, H, x);
    return KN_LAUNCHED("add_bias_resid");
}

/* ----------------------------------------------------------- router */

#define ROUTE_TOK 8             /* tokens per block: the router weight is read once per 8 */
#define ROUTE_MAX_E 256
#define ROUTE_MAX_TOPK 32

/* Logits in fp32 from fp32 activations: the top-k choice is discrete, so
 * the router is computed at full precision (no fp16 rounding of hn). */
__global__ void __launch_bounds__(256)
route_kernel(const float *__restrict__ hn, const __half *__restrict__ Wr,
             const float *__restrict__ br, int n, int H, int E, int topk, int *__restrict__ ids,
             float *__restrict__ w)
{
    __shared__ float logits[ROUTE_TOK][ROUTE_MAX_E];
    __shared__ float cval[ROUTE_TOK][ROUTE_MAX_TOPK];
    __shared__ int cidx[ROUTE_TOK][ROUTE_MAX_TOPK];
    const int t0 = blockIdx.x * ROUTE_TOK, nt = min(ROUTE_TOK, n - t0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int e = warp; e < E; e += nw) {
        const uint4 *wr = reinterpret_cast<const uint4 *>(Wr + (size_t)e * H);
        float acc[ROUTE_TOK];
#pragma unroll
        for (int t = 0; t < ROUTE_TOK; t++)
            acc[t] = 0.f;
        for (int c = lane; c < (H >> 3); c += 32) {
            const uint4 wv = wr[c];
#pragma unroll
            for (int t = 0; t < ROUTE_TOK; t++) {
                if (t < nt) {
                    const float4 *x4 = reinterpret_cast<const float4 *>(hn + (size_t)(t0 + t) * H);
                    acc[t] += dot8(wv, x4[2 * c], x4[2 * c + 1]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < ROUTE_TOK; t++) {
            const float v = warp_sum(acc[t]);
            if (lane == 0 && t < nt)
                logits[t][e] = v + br[e];
        }
    }
    __syncthreads();
    if (warp >= nt)
        return;
    /* One warp per token (warp_topk_softmax, as decode routes). */
    const int t = warp;
    warp_topk_softmax(logits[t], E, topk, ids + (size_t)(t0 + t) * topk,
                      w + (size_t)(t0 + t) * topk, cval[t], cidx[t]);
}

extern "C" int kn_llm_route(const float *hn, const kn_half *Wr, const float *br, int n, int H,
                            int E, int topk, int *ids, float *w, cudaStream_t s)
{
    if (E > ROUTE_MAX_E || topk > ROUTE_MAX_TOPK)
        return -EINVAL;
    route_kernel<<<kn_div_up(n, ROUTE_TOK), 256, 0, s>>>(
        hn, reinterpret_cast<const __half *>(Wr), br, n, H, E, topk, ids, w);
    return KN_LAUNCHED("route");
}

/* --------------------------------------------------------- grouping */

#define GROUP_THREADS 1024

/* One block: histogram of expert ids, then the exclusive prefix. */
__global__ void __launch_bounds__(GROUP_THREADS)
moe_count_kernel(const int *__restrict__ ids, int m, int E, int *__restrict__ offsets)
{
    extern __shared__ int cnt[];
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < m; i += blockDim.x)
        atomicAdd(&cnt[ids[i]], 1);     /* integer counts: order does not matter */
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = acc;
            acc += cnt[e];
        }
        offsets[E] = acc;
    }
}

/* Block e: compacts the pairs routed to expert e in pair order (stable). */
__global__ void __launch_bounds__(GROUP_THREADS)
moe_scatter_kernel(const int *__restrict__ ids, int m, int topk,
                   const int *__restrict__ offsets, int *__restrict__ rows_tok,
                   int *__restrict__ row_of)
{
    __shared__ int wsum[32];
    __shared__ int base;
    const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0)
        base = offsets[e];
    __syncthreads();
    for (int c0 = 0; c0 < m; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const bool mine = i < m && ids[i] == e;
        const unsigned bal = __ballot_sync(0xffffffffu, mine);
        const int before = __popc(bal & ((1u << lane) - 1u));
        if (lane == 0)
            wsum[warp] = __popc(bal);
        __syncthreads();
        int woff = 0, total = 0;
        for (int k = 0; k < (int)(blockDim.x >> 5); k++) {
            woff += k < warp ? wsum[k] : 0;
            total += wsum[k];
        }
        if (mine) {
            const int r = base + woff + before;
            rows_tok[r] = i / topk;
            row_of[i] = r;
        }
        __syncthreads();
        if (threadIdx.x == 0)
            base += total;
        __syncthreads();
    }
}

extern "C" int kn_llm_moe_group(const int *ids, int n, int topk, int E, int *offsets,
                                int *rows_tok, int *row_of, cudaStream_t s)
{
    const int m = n * topk;
    moe_count_kernel<<<1, GROUP_THREADS, (size_t)E * sizeof(int), s>>>(ids, m, E, offsets);
    int rc = KN_LAUNCHED("moe_count");
    if (rc)
        return rc;
    moe_scatter_kernel<<<E, GROUP_THREADS, 0, s>>>(ids, m, topk, offsets, rows_tok, row_of);
    return KN_LAUNCHED("moe_scatter");
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

__global__ void swiglu_kernel(const __half *__restrict__ gu, const float *__restrict__ b,
                              long total, int I, float limit, float alpha,
                              __half *__restrict__ act)
{
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        const long r = idx / I;
        const int i = (int)(idx % I);
        const float2 v =
            __half22float2(*reinterpret_cast<const __half2 *>(gu + r * 2 * I + 2 * i));
        float g = v.x + b[2 * i], u = v.y + b[2 * i + 1];
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        const float glu = g / (1.f + expf(-alpha * g));
        act[idx] = __float2half_rn((u + 1.f) * glu);
    }
}

extern "C" int kn_llm_swiglu(const kn_half *gu, const float *b, int m, int I, float limit,
                             float alpha, kn_half *act, cudaStream_t s)
{
    const long total = (long)m * I;
    if (total == 0)
        return 0;
    const int blocks = (int)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    swiglu_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<const __half *>(gu), b, total, I,
                                         limit, alpha, reinterpret_cast<__half *>(act));
    return KN_LAUNCHED("swiglu");
}

/* --------------------------------------------------------- combine */

__global__ void moe_combine_kernel(const float *__restrict__ y, const float *__restrict__ b,
                                   const int *__restrict__ ids, const float *__restrict__ w,
                                   const int *__restrict__ row_of, int topk, int H,
                                   float *__restrict__ x)
{
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float sum = 0.f;
        for (int j = 0; j < topk; j++) {
            const int p = t * topk + j;
            sum += w[p] * (y[(size_t)row_of[p] * H + c] + b[(size_t)ids[p] * H + c]);
        }
        x[(size_t)t * H + c] += sum;
    }
}

extern "C" int kn_llm_moe_combine(const float *y, const float *b, const int *ids,
                                  const float *w, const int *row_of, int n, int topk, int H,
                                  float *x, cudaStream_t s)
{
    moe_combine_kernel<<<n, 256, 0, s>>>(y, b, ids, w, row_of, topk, H, x);
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
