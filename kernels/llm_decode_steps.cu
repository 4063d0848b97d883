/* llm_decode_steps.cu — decode driver 1: one launch per step of a layer
 * (kn_llm_qkv_decode, kn_llm_attn_decode, kn_llm_oproj_route,
 * kn_llm_moe_*_decode), used by the 24 GB mode, whose host picks the expert
 * slots between routing and the expert GEMVs; also the stand-alone router.
 * Each kernel runs the work items of llm_decode.cuh with the plan's splits,
 * so it computes the persistent kernel's bits (llm_decode.cu).
 *
 * Not here: the items themselves, the persistent kernel, prefill.
 */
#include "llm_decode.cuh"

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

/* One expert-GEMV item a block (moe_item). */
template <int MODE>
__global__ void __launch_bounds__(DEC_THREADS)
moe_decode_kernel(const float *__restrict__ xin, const __half *base,
                  const __half *const *__restrict__ ptrs, const int *__restrict__ ids,
                  const float *__restrict__ wts, int K, int N, int topk, int ks,
                  float *__restrict__ partial, int *__restrict__ counters,
                  const float *__restrict__ b, float limit, float alpha, float *__restrict__ out)
{
    extern __shared__ float scratch[];
    __shared__ int last;
    pdl_wait();
    pdl_launch_dependents();
    moe_item<MODE, false>(blockIdx.x, xin, scratch, base, ptrs, ids, wts, K, N, topk, ks, partial,
                          counters, b, limit, alpha, out, &last);
}

template <int MODE>
static int moe_launch(const float *xin, struct kn_expert_src W, const int *ids, int K, int N,
                      int topk, const struct kn_decode_plan *p, float *partial, int *counters,
                      const float *b, const float *wts, float limit, float alpha, float *out,
                      cudaStream_t s)
{
    const int ksplit = MODE == 0 ? p->ks_gu : p->ks_dn;
    if (topk > MAX_TOPK || ksplit < 1)
        return -EINVAL;
    const int smem = moe_scratch_floats(K, ksplit) * (int)sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)moe_decode_kernel<MODE>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    const int items = kn_div_up(N, moe_tw<MODE>::v) * topk * ksplit;
    return kn_launch_pdl(MODE == 0 ? "moe_gate_up_decode" : "moe_down_decode",
                         moe_decode_kernel<MODE>, dim3(items), dim3(DEC_THREADS), smem, s, xin,
                         reinterpret_cast<const __half *>(W.base),
                         reinterpret_cast<const __half *const *>(W.ptrs), ids, wts, K, N, topk,
                         ksplit, partial, counters, b, limit, alpha, out);
}

extern "C" int kn_llm_moe_gate_up_decode(const float *hn, struct kn_expert_src W,
                                         const float *b, const int *ids, int H, int I, int topk,
                                         const struct kn_decode_plan *plan, float limit,
                                         float alpha, float *partial, int *counters, float *act,
                                         cudaStream_t s)
{
    return moe_launch<0>(hn, W, ids, H, 2 * I, topk, plan, partial, counters, b, NULL, limit,
                         alpha, act, s);
}

extern "C" int kn_llm_moe_down_decode(const float *act, struct kn_expert_src W, const float *b,
                                      const int *ids, const float *w, int I, int H, int topk,
                                      const struct kn_decode_plan *plan, float *partial,
                                      int *counters, float *x, cudaStream_t s)
{
    return moe_launch<1>(act, W, ids, I, H, topk, plan, partial, counters, b, w, 0.f, 0.f, x,
                         s);
}

extern "C" int kn_llm_moe_counters(int N, int topk, int mode)
{
    (void)topk;
    return kn_div_up(N, mode == 0 ? moe_tw<0>::v : moe_tw<1>::v);
}

extern "C" size_t kn_llm_moe_partial_floats(int N, int topk, int ksplit, int mode)
{
    (void)mode;
    return (size_t)N * topk * ksplit;
}
