/* llm_gemv.cu — the plain GEMV of one token (lm_head; o_proj alone in the
 * kernel benchmark), the greedy pick over its logits, and the decode step's
 * embedding row; the PDL switch of the decode launches.
 *
 * Not here: the layer's decode items and their two drivers (llm_decode.cuh,
 * llm_decode_steps.cu, llm_decode.cu), prefill (llm_batch.cu, llm_attn.cu).
 *
 * Invariant: every weight byte is read once with 16-byte loads; each row's
 * sum has a fixed order.
 */
#include "llm_decode.cuh"

int kn_llm_pdl_on;

extern "C" void kn_llm_set_pdl(int on) { kn_llm_pdl_on = on; }

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

/* ------------------------------------------------------ greedy pick */

/* Orders (value, index) as the CPU sampler does: a larger finite value
 * first, then the lower index. The value's bits are mapped to an unsigned
 * order (negative: all bits flipped; positive: sign set), -0 taken as +0;
 * the index is stored inverted, so the maximum key is the pick. 0 (no
 * finite value) is below every real key: a finite value's high word is
 * at least ~0xff7fffff = 0x00800000. */
__device__ __forceinline__ unsigned long long pick_key(float v, int i)
{
    if (!isfinite(v))
        return 0ull;
    unsigned u = __float_as_uint(v == 0.f ? 0.f : v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(0xffffffffu - (unsigned)i);
}

#define PICK_THREADS 256
#define PICK_VECS 4         /* float4 a thread: one round of loads */

/* Each block reduces its slice to one key and merges it with atomicMax;
 * the last block to arrive publishes the id and clears the scratch. The
 * maximum of the keys does not depend on the order: same id every run. */
__global__ void __launch_bounds__(PICK_THREADS)
argmax_kernel(const float *__restrict__ logits, int n, kn_pick *p)
{
    __shared__ unsigned long long red[PICK_THREADS / 32];
    pdl_wait();
    pdl_launch_dependents();
    const int n4 = n >> 2;
    const float4 *l4 = reinterpret_cast<const float4 *>(logits);
    unsigned long long best = 0ull;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
        const float4 v = __ldcg(l4 + i);
        best = max(best, pick_key(v.x, 4 * i));
        best = max(best, pick_key(v.y, 4 * i + 1));
        best = max(best, pick_key(v.z, 4 * i + 2));
        best = max(best, pick_key(v.w, 4 * i + 3));
    }
    if (blockIdx.x == 0)
        for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x)
            best = max(best, pick_key(__ldcg(logits + i), i));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0)
        red[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < PICK_THREADS / 32; w++)
            best = max(best, red[w]);
        if (best)
            atomicMax(&p->key, best);
        __threadfence();
        if (atomicAdd(&p->arrived, 1) == (int)gridDim.x - 1) {
            __threadfence();
            const unsigned long long k = atomicExch(&p->key, 0ull);
            p->arrived = 0;
            p->id = k ? (int32_t)(0xffffffffu - (unsigned)(k & 0xffffffffu)) : -1;
        }
    }
}

extern "C" int kn_llm_argmax(const float *logits, int n, struct kn_pick *p, cudaStream_t s)
{
    if (n < 1)
        return -EINVAL;
    int blocks = kn_div_up(kn_div_up(n, 4), PICK_THREADS * PICK_VECS);
    return kn_launch_pdl("argmax", argmax_kernel, dim3(blocks), dim3(PICK_THREADS), 0, s, logits,
                         n, p);
}
