/* llm_attn.cu — prefill attention with per-head sinks over the fp16 KV
 * cache: 64-query tiles on the tensor cores (mma.sync), online softmax in
 * registers.
 *
 * Not here: decode attention (llm_decode.cuh, with the rest of the decode
 * step, so the persistent decode kernel runs the same code), projections
 * and RoPE (llm_decode.cuh, llm_batch.cu).
 *
 * Semantics (gpt-oss): scores q.k * scale; a query at position q sees keys
 * max(0, q-window+1)..q on sliding layers, 0..q otherwise; the sink logit of
 * head h joins the softmax denominator only:
 *   p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)).
 * The kernel starts the running max at the sink (so it is never -inf) and
 * zeroes every key row outside the visible range before it can reach a
 * product: the cache beyond the written positions is never trusted.
 */

#include "llm_common.cuh"

/* ------------------------------------------------------------ prefill */

#define PF_Q 64                 /* queries per block (16 per warp) */
#define PF_K 64                 /* keys per tile */
#define PF_THREADS 128

/* D += A B for one m16n8k16 tile: A 16x16 fp16 (row), B 16x8 fp16 (col),
 * D fp32. Fragments as the PTX ISA lays them out for a lane with
 * g = lane / 4, t = lane % 4: A {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
 * (g+8, 2t+8..)}, B {(k 2t..2t+1, n g), (k 2t+8.., n g)}, D {(g, 2t),
 * (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}. */
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi)
{
    __half2 h = __halves2half2(__float2half_rn(lo), __float2half_rn(hi));
    return *reinterpret_cast<uint32_t *>(&h);
}

/* 16-byte global -> shared copy that bypasses registers (sm_80+); a row
 * that is not valid is zero-filled (src-size 0: nothing is read). */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid)
{
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* Two B fragments (n-tiles d0 and d0+8, keys k0..k0+15) of V stored
 * row-major [key][dim] in shared memory, transposed by ldmatrix: lane L
 * names row k0 + L%8 + 8*((L/8)&1) at column d0 + 8*(L/16). */
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const __half *p)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

template <int HD>
struct pf_layout {
    static constexpr int LDQ = HD + 8;      /* halves; Q, K and V rows (conflict-free 32-bit
                                             * reads and ldmatrix rows; 16-byte aligned) */
    static constexpr size_t tile = (size_t)PF_K * LDQ * 2;
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + (size_t)PF_Q * LDQ * 2;   /* [2] K tiles */
    static constexpr size_t v_off = k_off + 2 * tile;                 /* [2] V tiles */
    static constexpr size_t bytes = v_off + 2 * tile;
};

/* Issues the cp.async copies of key tile kt (K and V rows kt..kt+63, rows
 * past qp_last zero-filled) into buffer `buf`. */
template <int HD>
__device__ __forceinline__ void load_kv_tile(__half *Ks, __half *Vs, const __half *kb,
                                             const __half *vb, int kt, int qp_last, int tid)
{
    using L = pf_layout<HD>;
    constexpr int V8 = HD / 8;
    for (int idx = tid; idx < PF_K * V8; idx += PF_THREADS) {
        const int r = idx / V8, c = idx % V8, kp = kt + r;
        const bool ok = kp <= qp_last;
        const size_t src = (size_t)(ok ? kp : 0) * HD + c * 8;
        cp_async16(Ks + r * L::LDQ + c * 8, kb + src, ok);
        cp_async16(Vs + r * L::LDQ + c * 8, vb + src, ok);
    }
}

/* grid (ceil(n / 64), nheads); 4 warps of 16 query rows; keys in tiles of
 * 64, double-buffered through shared memory by cp.async (the next tile
 * loads while this one computes). Scores, probabilities and the output
 * stay in registers: S = Q K^T (fp32 accumulators) becomes P (fp16) in the
 * A-fragment layout of the next MMA directly, each row's max and sum take
 * two shuffles (a row lives in 4 lanes), and O is rescaled in place; V's
 * B fragments come transposed out of ldmatrix. Per key: scale, mask,
 * running max from the sink, exp, P rounded to fp16 for the product and
 * summed in fp32. (It replaced a wmma kernel that kept S and O in shared
 * memory: 11.8 -> 4.7 ms of attention a 2048-token chunk on an H100.) */
template <int HD>
__global__ void __launch_bounds__(PF_THREADS)
attn_prefill_kernel(const __half *__restrict__ q16, const __half *__restrict__ kc,
                       const __half *__restrict__ vc, const float *__restrict__ sinks,
                       kn_attn_geom g, int n, int pos0, __half *__restrict__ out16)
{
    using L = pf_layout<HD>;
    extern __shared__ __align__(128) unsigned char smraw[];
    __half *Qs = reinterpret_cast<__half *>(smraw + L::q_off);
    __half *Kbuf = reinterpret_cast<__half *>(smraw + L::k_off);
    __half *Vbuf = reinterpret_cast<__half *>(smraw + L::v_off);
    constexpr int TILE_H = PF_K * L::LDQ;   /* halves a K or V tile */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t4 = lane & 3;
    const int qfirst = blockIdx.x * PF_Q, h = blockIdx.y;
    const int kvh = h / (g.nheads / g.nkv);
    const int nq = min(PF_Q, n - qfirst);
    constexpr int V8 = HD / 8;
    const int qp_first = pos0 + qfirst, qp_last = pos0 + qfirst + nq - 1;
    const int klo = g.window ? max(0, qp_first - g.window + 1) : 0;
    const __half *kb = kc + (size_t)kvh * g.max_ctx * HD;
    const __half *vbase = vc + (size_t)kvh * g.max_ctx * HD;

    for (int idx = tid; idx < PF_Q * V8; idx += PF_THREADS) {
        const int r = idx / V8, c = idx % V8;
        const bool ok = r < nq;
        cp_async16(Qs + r * L::LDQ + c * 8,
                   q16 + ((size_t)(qfirst + (ok ? r : 0)) * g.nheads + h) * HD + c * 8, ok);
    }
    load_kv_tile<HD>(Kbuf, Vbuf, kb, vbase, klo, qp_last, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const int r0 = warp * 16, ra = r0 + gq, rb = ra + 8;
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int k = 0; k < HD / 16; k++) {
        const __half *p0 = Qs + ra * L::LDQ + k * 16 + t4 * 2;
        const __half *p1 = Qs + rb * L::LDQ + k * 16 + t4 * 2;
        qa[k][0] = *reinterpret_cast<const uint32_t *>(p0);
        qa[k][1] = *reinterpret_cast<const uint32_t *>(p1);
        qa[k][2] = *reinterpret_cast<const uint32_t *>(p0 + 8);
        qa[k][3] = *reinterpret_cast<const uint32_t *>(p1 + 8);
    }
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
        o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float ma = sinks[h], mb = ma, la = 1.f, lb = 1.f;   /* the sink: a key with a zero value */
    const int qpa = pos0 + qfirst + ra, qpb = pos0 + qfirst + rb;
    const bool va = ra < nq, vb = rb < nq;

    int buf = 0;
    for (int kt = klo; kt <= qp_last; kt += PF_K, buf ^= 1) {
        const __half *Ks = Kbuf + buf * TILE_H, *Vs = Vbuf + buf * TILE_H;
        /* the other buffer was last read in the previous round, which ended
         * in a barrier: start the next tile's copies, then wait for this
         * tile's */
        if (kt + PF_K <= qp_last) {
            load_kv_tile<HD>(Kbuf + (buf ^ 1) * TILE_H, Vbuf + (buf ^ 1) * TILE_H, kb, vbase,
                             kt + PF_K, qp_last, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[PF_K / 8][4];
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int k = 0; k < HD / 16; k++) {
                const __half *kp = Ks + (nt * 8 + gq) * L::LDQ + k * 16 + t4 * 2;
                const uint32_t b[2] = {*reinterpret_cast<const uint32_t *>(kp),
                                       *reinterpret_cast<const uint32_t *>(kp + 8)};
                mma16816(s[nt], qa[k], b);
            }
        }
        float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int key = kt + nt * 8 + t4 * 2 + i;
                const bool oka = va && key <= qpa && (!g.window || key > qpa - g.window);
                const bool okb = vb && key <= qpb && (!g.window || key > qpb - g.window);
                s[nt][i] = oka ? s[nt][i] * g.scale : -INFINITY;
                s[nt][2 + i] = okb ? s[nt][2 + i] * g.scale : -INFINITY;
                xa = fmaxf(xa, s[nt][i]);
                xb = fmaxf(xb, s[nt][2 + i]);
            }
        }
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
        const float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
        const float ca = __expf(ma - na), cb = __expf(mb - nb);
        float suma = 0.f, sumb = 0.f;
        uint32_t pa[PF_K / 16][4];
#pragma unroll
        for (int nt = 0; nt < PF_K / 8; nt++) {
            const float e0 = __expf(s[nt][0] - na), e1 = __expf(s[nt][1] - na);
            const float e2 = __expf(s[nt][2] - nb), e3 = __expf(s[nt][3] - nb);
            suma += e0 + e1;
            sumb += e2 + e3;
            /* n-tiles 2k and 2k+1 of S are the two column halves of
             * A-fragment k of P */
            pa[nt / 2][(nt & 1) * 2 + 0] = pack_half2(e0, e1);
            pa[nt / 2][(nt & 1) * 2 + 1] = pack_half2(e2, e3);
        }
        suma += __shfl_xor_sync(0xffffffffu, suma, 1);
        suma += __shfl_xor_sync(0xffffffffu, suma, 2);
        sumb += __shfl_xor_sync(0xffffffffu, sumb, 1);
        sumb += __shfl_xor_sync(0xffffffffu, sumb, 2);
        la = la * ca + suma;
        lb = lb * cb + sumb;
        ma = na;
        mb = nb;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            o[j][0] *= ca;
            o[j][1] *= ca;
            o[j][2] *= cb;
            o[j][3] *= cb;
        }
#pragma unroll
        for (int k = 0; k < PF_K / 16; k++) {
#pragma unroll
            for (int j = 0; j < HD / 8; j += 2) {
                const __half *vp = Vs + (k * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L::LDQ +
                                   j * 8 + (lane >> 4) * 8;
                uint32_t b[4];
                ldsm_x4_trans(b, vp);
                mma16816(o[j], pa[k], b);
                mma16816(o[j + 1], pa[k], b + 2);
            }
        }
        __syncthreads();        /* this buffer is refilled the round after next */
    }

#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        const int d = j * 8 + t4 * 2;
        if (va)
            *reinterpret_cast<__half2 *>(out16 + ((size_t)(qfirst + ra) * g.nheads + h) * HD + d) =
                __halves2half2(__float2half_rn(o[j][0] / la), __float2half_rn(o[j][1] / la));
        if (vb)
            *reinterpret_cast<__half2 *>(out16 + ((size_t)(qfirst + rb) * g.nheads + h) * HD + d) =
                __halves2half2(__float2half_rn(o[j][2] / lb), __float2half_rn(o[j][3] / lb));
    }
}

template <int HD>
static int attn_prefill_launch(const kn_half *q16, const kn_half *kc, const kn_half *vc,
                               const float *sinks, const struct kn_attn_geom *g, int n,
                               int pos0, kn_half *out16, cudaStream_t s)
{
    dim3 grid(kn_div_up(n, PF_Q), g->nheads);
    const size_t smem = pf_layout<HD>::bytes;
    if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void *)attn_prefill_kernel<HD>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
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
