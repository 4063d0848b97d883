/* llm_decode.cu — decode driver 2: every layer of a resident step in one
 * persistent cooperative kernel (kn_llm_decode_layers), the phases separated
 * by grid-wide barriers, so no launch, ramp and drain a kernel (~10 us each
 * on an H200, tests/bench/NOTES-engine.md); and the work split of a decode
 * step (kn_llm_decode_plan) that both drivers share.
 *
 * Not here: the work items (llm_decode.cuh), the per-step launches
 * (llm_decode_steps.cu).
 *
 * Invariant: the same items with the same plan as the per-step launches, so
 * both give the same bits.
 */
#include "llm_decode.cuh"

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
 * (normalized x, attn or hn) and the router logits, then the expert
 * items' scratch (input slice and row-group sums). */
__host__ __device__ static int dec_vec_floats(int H, int Q, int E)
{
    return round4(H > Q ? H : Q) + round4(E);
}

static int dec_smem_floats(int H, int I, int Q, int E, int ks_gu, int ks_dn)
{
    const int gu = moe_scratch_floats(H, ks_gu), dn = moe_scratch_floats(I, ks_dn);
    return dec_vec_floats(H, Q, E) + (gu > dn ? gu : dn);
}

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
    __shared__ int last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gw = blockIdx.x * DEC_WARPS + warp, W = gridDim.x * DEC_WARPS;
    const int H = a.H, I = a.I, E = a.E, K = a.topk, Q = a.g.nheads * a.g.head_dim;
    const int vecf = dec_vec_floats(H, Q, E);
    float4 *vec4 = sm4;
    float *logits = reinterpret_cast<float *>(sm4) + round4(H > Q ? H : Q);
    float *scratch = reinterpret_cast<float *>(sm4) + vecf;
    const int pos = a.step->pos;
    const int npairs = (a.g.nheads + 2 * a.g.nkv) * (a.g.head_dim >> 1);
    const int n_att = a.g.nheads * a.plan.nsplit;
    const int n_gu = div_up(2 * I, moe_tw<0>::v) * K * a.plan.ks_gu;
    const int n_dn = div_up(H, moe_tw<1>::v) * K * a.plan.ks_dn;
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
         * the first E warps of the grid compute one logit each. (The last
         * o_proj block computing them instead, one barrier less, measured
         * slower: 133.6 against 126.6 us a layer, H100, run 7: the one
         * block's serial norm and 4 rows a warp cost more than the
         * barrier.) */
        load_vec_norm(vec4, a.x, L->mlp_norm, a.eps, H, red);
        for (int e = gw; e < E; e += W) {
            const float v = route_logit(wr, L->br, e, H, vec4, lane);
            if (lane == 0)
                a.rlogits[e] = v;
        }
        phase_end<TIMED>(a, l, 3);

        /* 5. top-k (every block, same bits), gate_up + SwiGLU; then the
         * first rows of this block's down items start towards L2. */
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            logits[e] = __ldcg(a.rlogits + e);
        __syncthreads();
        if (warp == 0)
            warp_topk_softmax(logits, E, K, sids, sw, cval, cidx);
        __syncthreads();
        const __half *gu = reinterpret_cast<const __half *>(L->gate_up);
        const __half *dn = reinterpret_cast<const __half *>(L->down);
        for (int it = blockIdx.x; it < n_gu; it += gridDim.x)
            moe_item<0, true>(it, reinterpret_cast<const float *>(vec4), scratch, gu, NULL, sids,
                              sw, H, 2 * I, K, a.plan.ks_gu, a.moe_partial, a.gu_counters,
                              L->gate_up_b, a.limit, a.alpha, a.act, &last);
        for (int it = blockIdx.x; it < n_dn; it += gridDim.x)
            moe_prefetch_down(it, dn, sids, I, H, a.plan.ks_dn);
        phase_end<TIMED>(a, l, 4);

        /* 6. down, weighted sum into x; the next layer's q/k/v rows start
         * towards L2. */
        for (int it = blockIdx.x; it < n_dn; it += gridDim.x)
            moe_item<1, false>(it, a.act, scratch, dn, NULL, sids, sw, I, H, K, a.plan.ks_dn,
                               a.moe_partial, a.dn_counters, L->down_b, 0.f, 0.f, a.x, &last);
        if (l + 1 < a.nlayers)
            for (int p = gw; p < npairs; p += W)
                qkv_prefetch(p, reinterpret_cast<const __half *>(a.layers[l + 1].wqkv), H, g,
                             lane);
        phase_end<TIMED>(a, l, 5);
    }
}

/* An expert item's fixed cost (stage its input, sum its row groups, write
 * the partial, arrive; the last one also reduces), in rows streamed. Run 6
 * measured the items at ks 11 (5 rounds on 396 blocks) at 49.5 us for
 * gate_up and 30.5 us for down, against 31.6 and 15.8 us of bytes at
 * 4.2 TB/s: ~3.6 and ~2.9 us a round over the bytes, i.e. ~150 and ~240
 * rows at the rate each round streamed. With 200, ks 2 (360 items, one
 * round) wins for both; the 32 used before chose ks 11 by 2 rows. */
#define MOE_ITEM_COST 200

/* ksplit for an expert GEMV whose items (tiles of TW columns x topk, a
 * split each) run on `units` blocks: the fewest rounds x (rows a split +
 * the item's fixed cost); at least 64 rows a split. */
static int moe_ksplit(int K, int N, int TW, int topk, int units, int item_cost)
{
    const long per = (long)kn_div_up(N, TW) * topk;
    int maxks = K / 64;
    maxks = maxks < 1 ? 1 : maxks > 64 ? 64 : maxks;
    int best = 1;
    long bestc = -1;
    for (int ks = 1; ks <= maxks; ks++) {
        const long rounds = (per * ks + units - 1) / units;
        const long c = rounds * (kn_div_up(K, ks) + item_cost);
        if (bestc < 0 || c < bestc) {
            bestc = c;
            best = ks;
        }
    }
    return best;
}

/* Whether the persistent kernel can launch with smem bytes of shared
 * memory a block; *occ: its blocks a multiprocessor. */
static bool dec_fits(size_t smem, int *occ)
{
    if (smem > 48 * 1024 &&
        (cudaFuncSetAttribute((const void *)decode_layers_kernel<false>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)smem) != cudaSuccess ||
         cudaFuncSetAttribute((const void *)decode_layers_kernel<true>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)smem) != cudaSuccess))
        return false;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(occ, decode_layers_kernel<false>,
                                                         DEC_THREADS, smem) == cudaSuccess &&
           *occ >= 1;
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
        p->ks_gu = moe_ksplit(H, 2 * I, moe_tw<0>::v, topk, p->blocks, MOE_ITEM_COST);
        p->ks_dn = moe_ksplit(I, H, moe_tw<1>::v, topk, p->blocks, MOE_ITEM_COST);
        const int ns = nw / (2 * nheads);
        p->nsplit = ns < 1 ? 1 : ns > MAX_NSPLIT ? MAX_NSPLIT : ns;
        p->smem = (size_t)dec_smem_floats(H, I, Q, E, p->ks_gu, p->ks_dn) * sizeof(float);
        int occ = 0;
        if (!dec_fits(p->smem, &occ)) {
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
