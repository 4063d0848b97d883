/* llm_common.cuh — private helpers of the llm*.cu kernels: the launch-check
 * macro, warp reductions, and the 8-wide fp16 dot products every GEMV uses.
 * Not a public header: include only from kernels/llm*.cu. */
#ifndef BNBFS_KERNELS_LLM_COMMON_CUH
#define BNBFS_KERNELS_LLM_COMMON_CUH

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dequant.h"
#include "llm.h"

/* After a launch: a launch failure becomes -EIO, logged once with the kernel. */
static inline int kn_llm_launch_check(const char *what, const char *file, int line)
{
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        return 0;
    dq_log(DQ_LOG_ERROR, "kernels", "%s: launch failed: %s (%s:%d)", what,
           cudaGetErrorString(e), file, line);
    return -EIO;
}
#define KN_LAUNCHED(name) kn_llm_launch_check(name, __FILE__, __LINE__)

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide sum; every thread gets the result. red: >= 32 floats of shared
 * memory. Ends with a barrier, so red may be reused right after. */
__device__ __forceinline__ float block_sum(float v, float *red)
{
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0)
        red[wid] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

/* Weights are read exactly once per token: bypass L1. */
__device__ __forceinline__ uint4 ld_stream(const uint4 *p)
{
    uint4 r;
    /* not volatile: the compiler may hoist a batch of these above the math */
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ float2 h2f(uint32_t u)
{
    __half2 h = *reinterpret_cast<__half2 *>(&u);
    return __half22float2(h);
}

/* sum_i w[i] * x[i] over 8 fp16 weights and 8 fp32 inputs. */
__device__ __forceinline__ float dot8(uint4 w, const float4 a, const float4 b)
{
    float2 w0 = h2f(w.x), w1 = h2f(w.y), w2 = h2f(w.z), w3 = h2f(w.w);
    float s = w0.x * a.x;
    s = fmaf(w0.y, a.y, s);
    s = fmaf(w1.x, a.z, s);
    s = fmaf(w1.y, a.w, s);
    s = fmaf(w2.x, b.x, s);
    s = fmaf(w2.y, b.y, s);
    s = fmaf(w3.x, b.z, s);
    s = fmaf(w3.y, b.w, s);
    return s;
}

/* acc[i] += x * w[i] for 8 fp16 weights. */
__device__ __forceinline__ void axpy8(float acc[8], float x, uint4 w)
{
    float2 w0 = h2f(w.x), w1 = h2f(w.y), w2 = h2f(w.z), w3 = h2f(w.w);
    acc[0] = fmaf(x, w0.x, acc[0]);
    acc[1] = fmaf(x, w0.y, acc[1]);
    acc[2] = fmaf(x, w1.x, acc[2]);
    acc[3] = fmaf(x, w1.y, acc[3]);
    acc[4] = fmaf(x, w2.x, acc[4]);
    acc[5] = fmaf(x, w2.y, acc[5]);
    acc[6] = fmaf(x, w3.x, acc[6]);
    acc[7] = fmaf(x, w3.y, acc[7]);
}

/* MoE routing of one token by one warp: the top-k of logits[E], ties to
 * the lower index (a NaN never wins over a number), into ids[topk], and the
 * softmax of the chosen logits into w[topk] (ids, w: shared or global).
 * chosen_val/chosen_idx: shared scratch [topk]. Prefill (llm_batch.cu) and
 * decode (llm_decode.cuh) both route through this one function, so they
 * pick the same experts from the same logits. */
__device__ __forceinline__ void warp_topk_softmax(const float *logits, int E, int topk, int *ids,
                                                  float *w, float *chosen_val, int *chosen_idx)
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

/* gpt-oss's clamped SwiGLU of one (gate, up) pair, biases already added
 * (decode and prefill: the same operations, so the same bits). */
__device__ __forceinline__ float swiglu1(float g, float u, float limit, float alpha)
{
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    const float glu = g / (1.f + expf(-alpha * g));
    return (u + 1.f) * glu;
}

static inline int kn_div_up(long a, long b) { return (int)((a + b - 1) / b); }

/* ------------------------------------------ programmatic dependent launch
 * Decode kernels are launched with PDL (sm_90+, when enabled): a kernel may
 * start while the previous one still runs. Each decode kernel therefore
 *   1. touches only immutable data first (weights: prefetched into L2), or
 *      outputs of kernels two or more launches back (see 3);
 *   2. pdl_wait(): waits until the previous kernel completed and its writes
 *      are visible, before reading anything it produced or writing anything;
 *   3. pdl_launch_dependents() right after the wait: the next kernel may
 *      start its step 1, and since every kernel triggers only after its own
 *      wait, whatever ran two launches back has completed by then.
 * Without PDL (older cards, prefill launches) both calls are no-ops. */
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void *p)
{
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* Whether decode launches carry the PDL attribute (kn_llm_set_pdl). */
extern int kn_llm_pdl_on;

template <typename... KArgs, typename... Args>
static int kn_launch_pdl(const char *name, void (*kern)(KArgs...), dim3 grid, dim3 block,
                         size_t smem, cudaStream_t s, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = kn_llm_pdl_on ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, kern, static_cast<KArgs>(args)...);
    if (e != cudaSuccess) {
        cudaGetLastError();
        dq_log(DQ_LOG_ERROR, "kernels", "%s: launch failed: %s", name, cudaGetErrorString(e));
        return -EIO;
    }
    return kn_llm_launch_check(name, __FILE__, __LINE__);
}

#endif
