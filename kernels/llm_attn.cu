/* llm_attn.cu — prefill attention with per-head sinks over the fp16 KV
 * cache: 64-query tiles on the tensor cores, online softmax.
 *
 * Not here: decode attention (llm_gemv.cu, with the rest of the decode
 * step, so the persistent decode kernel runs the same code), projections
 * and RoPE (llm_gemv.cu, llm_batch.cu).
 *
 * Semantics (gpt-oss): scores q.k * scale; a query at position q sees keys
 * max(0, q-window+1)..q on sliding layers, 0..q otherwise; the sink logit of
 * head h joins the softmax denominator only:
 *   p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)).
 * The kernel starts the running max at the sink (so it is never -inf) and
 * zeroes every key row outside the visible range before it can reach a
 * product: the cache beyond the written positions is never trusted.
 */
#include <mma.h>

#include "llm_common.cuh"

/* ------------------------------------------------------------ prefill */

using namespace nvcuda;

#define PF_Q 64                 /* queries per block (16 per warp) */
#define PF_K 64                 /* keys per tile */
#define PF_THREADS 128

template <int HD>
struct pf_layout {
    static constexpr int LDH = HD + 8;      /* halves; rows stay 16-byte aligned */
    static constexpr int LDS = PF_K + 4;    /* floats of the score tile */
    static constexpr int LDO = HD + 4;      /* floats of the output tile */
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + (size_t)PF_Q * LDH * 2;
    static constexpr size_t v_off = k_off + (size_t)PF_K * LDH * 2;
    static constexpr size_t s_off = v_off + (size_t)PF_K * LDH * 2;
    static constexpr size_t o_off = s_off + (size_t)PF_Q * LDS * 4;
    static constexpr size_t ml_off = o_off + (size_t)PF_Q * LDO * 4;
    static constexpr size_t bytes = ml_off + 2 * PF_Q * 4;
};

/* grid (ceil(n / 64), nheads). Each warp owns 16 query rows: S = Q K^T on
 * the tensor cores, online softmax on its rows in fp32, P (fp16, written
 * over its own S rows) times V accumulated into O in shared memory. */
template <int HD>
__global__ void __launch_bounds__(PF_THREADS)
attn_prefill_kernel(const __half *__restrict__ q16, const __half *__restrict__ kc,
                    const __half *__restrict__ vc, const float *__restrict__ sinks,
                    kn_attn_geom g, int n, int pos0, __half *__restrict__ out16)
{
    using L = pf_layout<HD>;
    extern __shared__ __align__(128) unsigned char smraw[];
    __half *Qs = reinterpret_cast<__half *>(smraw + L::q_off);
    __half *Ks = reinterpret_cast<__half *>(smraw + L::k_off);
    __half *Vs = reinterpret_cast<__half *>(smraw + L::v_off);
    float *Ss = reinterpret_cast<float *>(smraw + L::s_off);
    float *Os = reinterpret_cast<float *>(smraw + L::o_off);
    float *rowm = reinterpret_cast<float *>(smraw + L::ml_off), *rowl = rowm + PF_Q;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int qfirst = blockIdx.x * PF_Q, h = blockIdx.y;
    const int kvh = h / (g.nheads / g.nkv);
    const int nq = min(PF_Q, n - qfirst);
    constexpr int V8 = HD / 8;  /* uint4 per row */

    for (int idx = tid; idx < PF_Q * V8; idx += PF_THREADS) {
        const int r = idx / V8, c = idx % V8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < nq)
            v = *reinterpret_cast<const uint4 *>(q16 + ((size_t)(qfirst + r) * g.nheads + h) * HD +
                                                 c * 8);
        *reinterpret_cast<uint4 *>(Qs + r * L::LDH + c * 8) = v;
    }
    for (int idx = tid; idx < PF_Q * HD; idx += PF_THREADS)
        Os[(idx / HD) * L::LDO + idx % HD] = 0.f;
    if (tid < PF_Q) {
        rowm[tid] = sinks[h];   /* the sink as a key with a zero value */
        rowl[tid] = 1.f;
    }
    const int qp_first = pos0 + qfirst, qp_last = pos0 + qfirst + nq - 1;
    const int klo = g.window ? max(0, qp_first - g.window + 1) : 0;
    const __half *kb = kc + (size_t)kvh * g.max_ctx * HD;
    const __half *vb = vc + (size_t)kvh * g.max_ctx * HD;
    __syncthreads();

    for (int kt = klo; kt <= qp_last; kt += PF_K) {
        for (int idx = tid; idx < PF_K * V8; idx += PF_THREADS) {
            const int r = idx / V8, c = idx % V8, kp = kt + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (kp <= qp_last) {
                kv = *reinterpret_cast<const uint4 *>(kb + (size_t)kp * HD + c * 8);
                vv = *reinterpret_cast<const uint4 *>(vb + (size_t)kp * HD + c * 8);
            }
            *reinterpret_cast<uint4 *>(Ks + r * L::LDH + c * 8) = kv;
            *reinterpret_cast<uint4 *>(Vs + r * L::LDH + c * 8) = vv;
        }
        __syncthreads();

        const int r0 = warp * 16;
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[PF_K / 16];
#pragma unroll
            for (int j = 0; j < PF_K / 16; j++)
                wmma::fill_fragment(sacc[j], 0.f);
#pragma unroll
            for (int kk = 0; kk < HD; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::load_matrix_sync(a, Qs + r0 * L::LDH + kk, L::LDH);
#pragma unroll
                for (int j = 0; j < PF_K / 16; j++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf;
                    wmma::load_matrix_sync(bf, Ks + j * 16 * L::LDH + kk, L::LDH);
                    wmma::mma_sync(sacc[j], a, bf, sacc[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < PF_K / 16; j++)
                wmma::store_matrix_sync(Ss + r0 * L::LDS + j * 16, sacc[j], L::LDS,
                                        wmma::mem_row_major);
        }
        __syncwarp();

        /* Online softmax of the warp's 16 rows; P overwrites S row by row
         * (fp16, row stride 2*LDS halves), each row read before written. */
        for (int r = 0; r < 16; r++) {
            const int row = r0 + r, qpos = pos0 + qfirst + row;
            float *srow = Ss + row * L::LDS;
            float s0 = srow[lane] * g.scale, s1 = srow[lane + 32] * g.scale;
            const int kp0 = kt + lane, kp1 = kt + lane + 32;
            const bool v0 = row < nq && kp0 <= qpos && (!g.window || kp0 > qpos - g.window);
            const bool v1 = row < nq && kp1 <= qpos && (!g.window || kp1 > qpos - g.window);
            s0 = v0 ? s0 : -INFINITY;
            s1 = v1 ? s1 : -INFINITY;
            const float mo = rowm[row];
            const float mn = fmaxf(mo, warp_max(fmaxf(s0, s1)));
            const float e0 = __expf(s0 - mn), e1 = __expf(s1 - mn);
            const float sum = warp_sum(e0 + e1);
            const float corr = __expf(mo - mn);
            __half *prow = reinterpret_cast<__half *>(srow);
            prow[lane] = __float2half_rn(e0);
            prow[lane + 32] = __float2half_rn(e1);
            if (lane == 0) {
                rowm[row] = mn;
                rowl[row] = rowl[row] * corr + sum;
            }
            float *orow = Os + row * L::LDO;
            for (int d = lane; d < HD; d += 32)
                orow[d] *= corr;
        }
        __syncwarp();

        {
            const __half *Ps = reinterpret_cast<const __half *>(Ss);
            constexpr int LDP = 2 * L::LDS;
#pragma unroll
            for (int j = 0; j < HD / 16; j++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> oacc;
                wmma::load_matrix_sync(oacc, Os + r0 * L::LDO + j * 16, L::LDO,
                                       wmma::mem_row_major);
#pragma unroll
                for (int kk = 0; kk < PF_K; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> bf;
                    wmma::load_matrix_sync(a, Ps + r0 * LDP + kk, LDP);
                    wmma::load_matrix_sync(bf, Vs + kk * L::LDH + j * 16, L::LDH);
                    wmma::mma_sync(oacc, a, bf, oacc);
                }
                wmma::store_matrix_sync(Os + r0 * L::LDO + j * 16, oacc, L::LDO,
                                        wmma::mem_row_major);
            }
        }
        __syncthreads();        /* K/V tiles are reloaded next round */
    }

    for (int idx = tid; idx < nq * HD; idx += PF_THREADS) {
        const int r = idx / HD, d = idx % HD;
        out16[((size_t)(qfirst + r) * g.nheads + h) * HD + d] =
            __float2half_rn(Os[r * L::LDO + d] / rowl[r]);
    }
}

template <int HD>
static int attn_prefill_launch(const kn_half *q16, const kn_half *kc, const kn_half *vc,
                               const float *sinks, const struct kn_attn_geom *g, int n,
                               int pos0, kn_half *out16, cudaStream_t s)
{
    const size_t smem = pf_layout<HD>::bytes;
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)attn_prefill_kernel<HD>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    dim3 grid(kn_div_up(n, PF_Q), g->nheads);
    attn_prefill_kernel<HD><<<grid, PF_THREADS, smem, s>>>(
        reinterpret_cast<const __half *>(q16), reinterpret_cast<const __half *>(kc),
        reinterpret_cast<const __half *>(vc), sinks, *g, n, pos0,
        reinterpret_cast<__half *>(out16));
    return KN_LAUNCHED("attn_prefill");
}

extern "C" int kn_llm_attn_prefill(const kn_half *q16, const kn_half *kc, const kn_half *vc,
                                   const float *sinks, const struct kn_attn_geom *g, int n,
                                   int pos0, kn_half *out16, cudaStream_t s)
{
    switch (g->head_dim) {
    case 16: return attn_prefill_launch<16>(q16, kc, vc, sinks, g, n, pos0, out16, s);
    case 32: return attn_prefill_launch<32>(q16, kc, vc, sinks, g, n, pos0, out16, s);
    case 64: return attn_prefill_launch<64>(q16, kc, vc, sinks, g, n, pos0, out16, s);
    case 128: return attn_prefill_launch<128>(q16, kc, vc, sinks, g, n, pos0, out16, s);
    default: return -EINVAL;
    }
}
