/* llm_batch.cu — the element-wise and small steps of the prefill path that
 * sit between cuBLAS GEMMs: embedding, RMSNorm, bias + RoPE + KV store,
 * residual adds, the router with top-k for n tokens, the stable grouping of
 * (token, expert) pairs, row gathers, the experts' grouped GEMMs (own
 * tensor-core kernel, SwiGLU in the gate/up epilogue), SwiGLU alone and the
 * weighted combine. Also the dtype conversion used while uploading weights.
 *
 * Not here: the dense projections' GEMMs (cuBLAS, in runner/engine.c),
 * attention (llm_attn.cu).
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

/* ------------------------------------------- grouped expert GEMMs */

/* The prefill experts' two GEMMs over every expert's grouped rows in one
 * launch each, on the tensor cores (mma.sync m16n8k16, fp16 in, fp32
 * accumulation), reading the row offsets on the device: no host round trip
 * and one launch a layer instead of one a non-empty expert. A block computes
 * a 128-row x 128-column tile of one expert, staging 32-deep k slices
 * through shared memory with cp.async (4 stages). Eight warps, 2 x 4, each
 * 64 x 32. A tile's rows never cross into the next expert (zero-filled), so
 * a row's result does not depend on how the experts are grouped: one expert
 * launched alone (the 24 GB mode) gives the same bits as the grouped launch.
 * Block (n-tile, slot): slot s is the s-th 128-row tile in expert order; the
 * grid has an upper bound of slots and the surplus blocks return at once. */
#define XG_BM 128
#define XG_BN 128
#define XG_BK 32
#define XG_STAGES 4
#define XG_THREADS 256
#define XG_LDA (XG_BK + 8)      /* halves a staged A row: 80 bytes, ldmatrix conflict-free */
#define XG_LDB (XG_BN + 8)      /* halves a staged B row: 272 bytes */
#define XG_STAGE_HALVES (XG_BM * XG_LDA + XG_BK * XG_LDB)
#define XG_SMEM ((size_t)XG_STAGES * XG_STAGE_HALVES * sizeof(__half))

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid)
{
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const __half *p)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const __half *p)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct xg_args {
    const __half *A;            /* [rows, K] grouped rows */
    const int *off;             /* device [nexp + 1] */
    int nexp;
    const __half *W;            /* expert x: W + x * wstride, [K, N] row-major (x @ W) */
    size_t wstride;             /* halves */
    const float *b;             /* SwiGLU: expert x's [N] at b + x * N */
    int N, K;
    float limit, alpha;
    void *out;                  /* SwiGLU: fp16 [rows, N/2]; else fp32 [rows, N] */
};

/* SWIGLU true: out = SwiGLU(A W + b) (columns 2i, 2i+1 are gate i, up i: a
 * thread's accumulator pair); false: out = A W in fp32. */
template <bool SWIGLU>
__global__ void __launch_bounds__(XG_THREADS, 2) moe_gemm_kernel(const xg_args a)
{
    extern __shared__ __align__(16) unsigned char xg_smem[];
    __half *sm = reinterpret_cast<__half *>(xg_smem);
    /* which expert and which of its row tiles this block computes */
    int x = 0, slot = blockIdx.y, r0 = 0, r1 = 0;
    for (; x < a.nexp; x++) {
        r0 = a.off[x];
        r1 = a.off[x + 1];
        const int t = (r1 - r0 + XG_BM - 1) / XG_BM;
        if (slot < t)
            break;
        slot -= t;
    }
    if (x == a.nexp)
        return;                             /* surplus block: uniform, before any barrier */
    const int row0 = r0 + slot * XG_BM, mrows = min(XG_BM, r1 - row0);
    const int n0 = blockIdx.x * XG_BN, N = a.N, K = a.K;
    const __half *A = a.A + (size_t)row0 * K;
    const __half *W = a.W + (size_t)x * a.wstride;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    /* m16 row tiles of this warp holding valid rows: the others skip the math */
    const int mv = max(0, min(4, (mrows - wm + 15) / 16));

    auto load = [&](int stage, int kt) {
        __half *sa = sm + (size_t)stage * XG_STAGE_HALVES, *sb = sa + XG_BM * XG_LDA;
        const int k0 = kt * XG_BK;
#pragma unroll
        for (int i = 0; i < 2; i++) {       /* A: 128 rows x 4 chunks of 8 */
            const int c = tid + i * XG_THREADS, r = c >> 2, kc = (c & 3) * 8;
            const bool ok = r < mrows && k0 + kc < K;
            cp_async16(sa + r * XG_LDA + kc, ok ? A + (size_t)r * K + k0 + kc : A, ok);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {       /* B: 32 k rows x 16 chunks of 8 */
            const int c = tid + i * XG_THREADS, kr = c >> 4, nc = (c & 15) * 8;
            const bool ok = k0 + kr < K && n0 + nc < N;
            cp_async16(sb + kr * XG_LDB + nc, ok ? W + (size_t)(k0 + kr) * N + n0 + nc : W, ok);
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int k = 0; k < 4; k++)
                acc[i][j][k] = 0.f;

    const int kts = (K + XG_BK - 1) / XG_BK;
#pragma unroll
    for (int s = 0; s < XG_STAGES - 1; s++) {
        if (s < kts)
            load(s, s);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int kt = 0; kt < kts; kt++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(XG_STAGES - 2));
        __syncthreads();                    /* stage kt landed; stage kt-1 is free */
        if (kt + XG_STAGES - 1 < kts)
            load((kt + XG_STAGES - 1) % XG_STAGES, kt + XG_STAGES - 1);
        asm volatile("cp.async.commit_group;\n" ::);
        const __half *sa = sm + (size_t)(kt % XG_STAGES) * XG_STAGE_HALVES;
        const __half *sb = sa + XG_BM * XG_LDA;
#pragma unroll
        for (int kk = 0; kk < XG_BK; kk += 16) {
            uint32_t bf[4][2];
#pragma unroll
            for (int j = 0; j < 2; j++) {   /* two n16 halves: b0 b1 of n8 tiles 2j, 2j+1 */
                uint32_t r[4];
                ldsm_x4_t(r, sb + (kk + (lane & 15)) * XG_LDB + wn + j * 16 + (lane >> 4) * 8);
                bf[2 * j][0] = r[0];
                bf[2 * j][1] = r[1];
                bf[2 * j + 1][0] = r[2];
                bf[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (i < mv) {
                    uint32_t af[4];
                    ldsm_x4(af, sa + (wm + i * 16 + (lane & 15)) * XG_LDA + kk + (lane >> 4) * 8);
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        mma16816(acc[i][j], af, bf[j][0], bf[j][1]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    /* epilogue: thread holds rows g and g+8 of each m16 tile, columns 2q, 2q+1 */
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = wm + i * 16 + g + h * 8;
            if (r >= mrows)
                continue;
            const size_t row = (size_t)(row0 + r);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int n = n0 + wn + j * 8 + 2 * q;
                if (n >= N)
                    continue;
                const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                if (SWIGLU) {
                    const float *b = a.b + (size_t)x * N;
                    float gt = fminf(v0 + b[n], a.limit);
                    float up = fminf(fmaxf(v1 + b[n + 1], -a.limit), a.limit);
                    const float glu = gt / (1.f + expf(-a.alpha * gt));
                    static_cast<__half *>(a.out)[row * (N / 2) + n / 2] =
                        __float2half_rn((up + 1.f) * glu);
                } else {
                    *reinterpret_cast<float2 *>(static_cast<float *>(a.out) + row * N + n) =
                        make_float2(v0, v1);
                }
            }
        }
    }
}

template <bool SWIGLU>
static int moe_gemm_launch(const xg_args &a, int max_rows, cudaStream_t s, const char *name)
{
    /* More than 48 KiB of dynamic shared memory needs the opt-in, set once
     * a process (an engine is driven from one thread; one device). */
    static bool smem_set;
    if (!smem_set) {
        const cudaError_t e = cudaFuncSetAttribute(
            moe_gemm_kernel<SWIGLU>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)XG_SMEM);
        if (e != cudaSuccess) {
            cudaGetLastError();
            dq_log(DQ_LOG_ERROR, "kernels", "%s: %zu bytes of shared memory refused: %s", name,
                   XG_SMEM, cudaGetErrorString(e));
            return -EIO;
        }
        smem_set = true;
    }
    if (max_rows <= 0 || a.nexp <= 0)
        return 0;
    /* tiles: at most one partial tile an expert beyond max_rows / 128 */
    const int slots = kn_div_up(max_rows, XG_BM) + (a.nexp > 1 ? a.nexp : 0);
    const dim3 grid(kn_div_up(a.N, XG_BN), slots);
    moe_gemm_kernel<SWIGLU><<<grid, XG_THREADS, XG_SMEM, s>>>(a);
    return KN_LAUNCHED(name);
}

extern "C" int kn_llm_moe_gate_up_prefill(const kn_half *A, const int *off, int nexp,
                                          int max_rows, const kn_half *W, size_t wstride,
                                          const float *b, int H, int I, float limit, float alpha,
                                          kn_half *act, cudaStream_t s)
{
    xg_args a = {reinterpret_cast<const __half *>(A), off, nexp,
                 reinterpret_cast<const __half *>(W), wstride, b, 2 * I, H, limit, alpha, act};
    return moe_gemm_launch<true>(a, max_rows, s, "moe_gate_up_prefill");
}

extern "C" int kn_llm_moe_down_prefill(const kn_half *act, const int *off, int nexp,
                                       int max_rows, const kn_half *W, size_t wstride, int I,
                                       int H, float *y, cudaStream_t s)
{
    xg_args a = {reinterpret_cast<const __half *>(act), off, nexp,
                 reinterpret_cast<const __half *>(W), wstride, NULL, H, I, 0.f, 0.f, y};
    return moe_gemm_launch<false>(a, max_rows, s, "moe_down_prefill");
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
