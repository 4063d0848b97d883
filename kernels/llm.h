/* llm.h — CUDA kernels of the gpt-oss forward pass (bnbfs-run's engine).
 *
 * What this is: launchers taking raw device pointers and an explicit stream,
 * one per fused step of the decode (one token) and prefill (n tokens) paths.
 * What it is not: memory management, weight loading, cuBLAS GEMMs or the
 * expert cache (runner/engine.c owns those). The math is formats.md §3.
 *
 * Conventions: every launcher returns 0 or -EIO (a launch error, logged with
 * the kernel's name). Weights are IEEE fp16 (kn_half, 2 bytes), row-major
 * with the shapes given; biases, norms, sinks and the residual stream are
 * fp32; accumulation is fp32. All pointers are device pointers unless said.
 * Dimensions that index 16-byte vectors (every K of a GEMV, every expert
 * width) must be multiples of 8; the engine checks this once at load.
 *
 * Launches that end in a "last block" reduction use `counters` (device ints,
 * zero before the first launch, left zero by every launch), so they are
 * deterministic (a fixed summation order) and may be captured in a graph.
 */
#ifndef BNBFS_KERNELS_LLM_H
#define BNBFS_KERNELS_LLM_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t kn_half;       /* IEEE binary16 bits */

/* Per-step scalars the decode kernels read on the device, so one captured
 * graph replays for every position. */
struct kn_step {
    int32_t id;                 /* token id */
    int32_t pos;                /* its position (KV slot) */
};

/* Geometry shared by the attention kernels. */
struct kn_attn_geom {
    int nheads, nkv, head_dim;
    int max_ctx;                /* KV cache positions per head */
    int window;                 /* sliding window (keys q-window+1..q); 0 = full */
    float scale;                /* score scale, 1/sqrt(head_dim) */
};

/* ------------------------------------------------------------ decode */

/* x[H] (fp32) = embed[step->id] (fp16 row of [V, H]). */
int kn_llm_embed_decode(const kn_half *embed, int H, const struct kn_step *step, float *x,
                        cudaStream_t s);

/* RMSNorm(x) then y = W q/k/v + bias with RoPE, for one position:
 * W [(nh+2nkv)*hd, H] (q rows, then k, then v), bias [(nh+2nkv)*hd].
 * q_out [nh*hd] fp32 (rotated); k (rotated) and v are stored as fp16 into
 * kc/vc [nkv][max_ctx][hd] at step->pos. rope [max_ctx][hd/2] float2
 * (cos, sin) with the YaRN attention factor already applied. */
int kn_llm_qkv_decode(const float *x, const float *norm_w, float eps, const kn_half *W,
                      const float *bias, int H, const struct kn_attn_geom *g,
                      const float *rope, const struct kn_step *step, float *q_out,
                      kn_half *kc, kn_half *vc, cudaStream_t s);

/* Decode attention of one position over the cache: each head's visible
 * keys are split over nsplit warps (nsplit <= 32), combined in split order
 * by the last warp of the head to finish: out [nh*hd] fp32. Sinks [nh] join
 * the softmax denominator only. partial: [nh * nsplit * (hd + 2)] floats;
 * counters: [nh] ints. */
int kn_llm_attn_decode(const float *q, const kn_half *kc, const kn_half *vc,
                       const float *sinks, const struct kn_attn_geom *g,
                       const struct kn_step *step, int nsplit, float *partial, int *counters,
                       float *out, cudaStream_t s);

/* y = W in + bias (W [N, K] fp16, in [K] fp32): mode 0 stores y into out[N],
 * mode 1 adds it (out += y, the residual update). bias may be NULL.
 * norm_w non-NULL: `in` is first RMS-normalized (eps) and scaled by norm_w. */
int kn_llm_gemv(const kn_half *W, const float *bias, int N, int K, const float *in,
                const float *norm_w, float eps, int mode, float *out, cudaStream_t s);

/* MoE routing of one token: hn = RMSNorm(x) * norm_w (written, fp32 [H]);
 * logits = Wr hn + br (Wr [E, H]); the top-k logits (ties: lower index
 * first) softmaxed into w[topk]; their indices into ids[topk]. */
int kn_llm_route_decode(const float *x, const float *norm_w, float eps, const kn_half *Wr,
                        const float *br, int H, int E, int topk, float *hn, int *ids, float *w,
                        cudaStream_t s);

/* kn_llm_gemv(Wo, bo, H, Q, attn, NULL, 0, 1, x) followed by
 * kn_llm_route_decode(x, norm_w, ...), fused: the last block of the o_proj
 * GEMV routes. counter: one device int. */
int kn_llm_oproj_route(const kn_half *Wo, const float *bo, int H, int Q, const float *attn,
                       float *x, const float *norm_w, float eps, const kn_half *Wr,
                       const float *br, int E, int topk, float *hn, int *ids, float *w,
                       int *counter, cudaStream_t s);

/* Expert weights of the chosen experts: slot j uses ptrs[j] when ptrs is
 * non-NULL (the 24 GB mode's cache slots, device array), else
 * base + ids[j] * per-expert stride. */
struct kn_expert_src {
    const kn_half *base;        /* [E, K, N] stacked, or NULL */
    const kn_half *const *ptrs; /* device [topk] pointers to [K, N], or NULL */
};

/* act[j][i] = SwiGLU of gu = hn @ gate_up[e_j] + b[e_j] for the topk chosen
 * experts: gate = gu[2i] clamped above at limit, up = gu[2i+1] clamped to
 * [-limit, limit], act = (up + 1) * gate * sigmoid(alpha * gate).
 * gate_up per expert [H, 2I] (x @ W), b [E, 2I]. act [topk, I] fp32.
 * Items and K split from the plan (kn_llm_decode_plan). partial:
 * kn_llm_moe_partial_floats(2I, topk, plan->ks_gu, 0) floats; counters:
 * kn_llm_moe_counters(2I, topk, 0) ints. */
struct kn_decode_plan;
int kn_llm_moe_gate_up_decode(const float *hn, struct kn_expert_src W, const float *b,
                              const int *ids, int H, int I, int topk,
                              const struct kn_decode_plan *plan, float limit, float alpha,
                              float *partial, int *counters, float *act, cudaStream_t s);

/* x[H] += sum_j w[j] * (act[j] @ down[e_j] + b[e_j]), in expert order j.
 * down per expert [I, H], b [E, H]. partial: kn_llm_moe_partial_floats(H,
 * topk, plan->ks_dn, 1); counters: kn_llm_moe_counters(H, topk, 1). */
int kn_llm_moe_down_decode(const float *act, struct kn_expert_src W, const float *b,
                           const int *ids, const float *w, int I, int H, int topk,
                           const struct kn_decode_plan *plan, float *partial, int *counters,
                           float *x, cudaStream_t s);

/* Work split of a decode step for this card and model, shared by the
 * persistent kernel and the per-kernel launches (the same splits give the
 * same sums, so both compute the same bits):
 *   blocks  grid of kn_llm_decode_layers (all resident at once: a
 *           cooperative launch), as many blocks a multiprocessor as fit, at
 *           most 3 (2 measured 4% slower on an H200);
 *           0 when the kernel cannot run on this device (the splits still
 *           serve the per-step launches);
 *   ks_gu, ks_dn  K splits of the expert GEMVs (mode 0 gate_up, 1 down),
 *           chosen by a cost model (rounds x (rows + an item's fixed cost))
 *           for the grid's blocks (one item a block);
 *   nsplit  warps a head's attention is split over;
 *   smem    dynamic shared memory of the persistent kernel, bytes. */
struct kn_decode_plan {
    int blocks, ks_gu, ks_dn, nsplit;
    size_t smem;
};
int kn_llm_decode_plan(int nsm, int H, int I, int E, int topk, int nheads, int head_dim,
                       struct kn_decode_plan *p);     /* 0 or -EINVAL */
/* Workspace (floats) and counters (ints) of the expert GEMVs for an output
 * width N (mode 0 gate_up, 1 down). */
size_t kn_llm_moe_partial_floats(int N, int topk, int ksplit, int mode);
int kn_llm_moe_counters(int N, int topk, int mode);

/* One decoder layer's device pointers (resident weights) for the
 * persistent decode kernel. */
struct kn_decode_layer {
    const kn_half *wqkv;        /* [(nh+2nkv)*hd, H] */
    const float *bqkv;
    const kn_half *wo;          /* [H, nh*hd] */
    const float *bo, *sinks, *attn_norm, *mlp_norm;
    const kn_half *wr;          /* [E, H] */
    const float *br;
    const kn_half *gate_up;     /* [E, H, 2I] */
    const kn_half *down;        /* [E, I, H] */
    const float *gate_up_b, *down_b;
    kn_half *kc, *vc;           /* [nkv, max_ctx, hd] */
    int window;                 /* sliding window, 0 = full attention */
};

/* Everything kn_llm_decode_layers reads or writes; every pointer is device
 * memory, fixed for the engine's life (the position comes from step). */
struct kn_decode_args {
    const struct kn_decode_layer *layers;  /* [nlayers] */
    int nlayers, H, I, E, topk;
    struct kn_attn_geom g;      /* window: per layer, from layers[] */
    float eps, limit, alpha;
    const float *rope;          /* as kn_llm_qkv_decode */
    const struct kn_step *step;
    float *x;                   /* [H] residual stream, updated in place */
    float *q, *attn;            /* [nh*hd] */
    float *act;                 /* [topk, I] */
    float *rlogits;             /* [E] router logits */
    float *attn_partial;        /* as kn_llm_attn_decode */
    float *moe_partial;         /* max of both expert GEMVs' partial floats */
    int *attn_counters, *gu_counters, *dn_counters;
    unsigned *barrier;          /* one, zero before the first launch */
    struct kn_decode_plan plan;
    uint64_t *phase_ns;         /* NULL, or [1 + 6 * nlayers]: the start, then the end of
                                 * each layer's six phases (global timer, ns; diagnostic) */
};

/* Every decoder layer of one decode step in one persistent cooperative
 * kernel (plan.blocks blocks), its phases separated by grid-wide barriers:
 * the same computation as, per layer, kn_llm_qkv_decode,
 * kn_llm_attn_decode, kn_llm_oproj_route, kn_llm_moe_gate_up_decode and
 * kn_llm_moe_down_decode with the same plan, bit for bit. Not launched with
 * PDL; a kernel after it waits for its end. Returns 0 or -EIO. */
int kn_llm_decode_layers(const struct kn_decode_args *a, cudaStream_t s);

/* Greedy pick on the GPU, so only 4 bytes come back a token. */
struct kn_pick {
    unsigned long long key;     /* scratch: the best (value, index) key; 0 between launches */
    int32_t arrived;            /* scratch: blocks done; 0 between launches */
    int32_t id;                 /* result: the picked index, or -1 */
};
/* p->id = the lowest index among the largest finite values of logits[n]
 * (NaN and +-inf are never picked, -0 equals +0): what bnbfs-run's sampler
 * picks at temperature 0 (runner/sample.c); -1 when no value is finite.
 * p: device memory, zero before the first launch, its scratch left zero by
 * every launch (graph-capturable). Launched with PDL like the decode
 * kernels. */
int kn_llm_argmax(const float *logits, int n, struct kn_pick *p, cudaStream_t s);

/* ----------------------------------------------------------- prefill */

/* x[i] = embed[ids[i]] (fp32 rows of H), i < n. */
int kn_llm_embed(const kn_half *embed, int H, const int32_t *ids, int n, float *x,
                 cudaStream_t s);

/* Row-wise RMSNorm of x [n, H] scaled by w: out16 (fp16, may be NULL) and
 * out32 (fp32, may be NULL); one block a row, the same code as the fused
 * norms of kn_llm_bias_resid_norm and kn_llm_moe_combine. H % 4 == 0. */
int kn_llm_rmsnorm(const float *x, const float *w, float eps, int n, int H, kn_half *out16,
                   float *out32, cudaStream_t s);

/* qkv [n, (nh+2nkv)*hd] fp32 (GEMM output without bias) for positions
 * pos0..pos0+n-1: adds bias, rotates q and k, writes q16 [n, nh*hd] and
 * k, v into the cache at their positions. */
int kn_llm_qkv_prefill(const float *qkv, const float *bias, int n, int pos0,
                       const struct kn_attn_geom *g, const float *rope, kn_half *q16,
                       kn_half *kc, kn_half *vc, cudaStream_t s);

/* Causal (or sliding-window) attention with sinks for n queries at
 * pos0..pos0+n-1 over cache positions 0..pos0+n-1, tensor cores (fp16 in,
 * fp32 softmax and accumulation): out16 [n, nh*hd]. head_dim must be a
 * multiple of 16 and at most 128. */
int kn_llm_attn_prefill(const kn_half *q16, const kn_half *kc, const kn_half *vc,
                        const float *sinks, const struct kn_attn_geom *g, int n, int pos0,
                        kn_half *out16, cudaStream_t s);

/* x[t] += bias (the o_proj GEMM added its output into x), then the MLP's
 * RMSNorm of x[t] with weight w into out16 (fp16) and out32 (fp32; either
 * may be NULL), one block a token. H % 4 == 0. */
int kn_llm_bias_resid_norm(float *x, const float *bias, const float *w, float eps, int n, int H,
                           kn_half *out16, float *out32, cudaStream_t s);

/* Router top-k for n tokens from logits [n, E] fp32 (hn @ Wr^T, computed
 * by the caller in fp32): adds br, takes the top-k, softmax over the
 * chosen: ids [n, topk], w [n, topk]. */
int kn_llm_route_topk(const float *logits, const float *br, int n, int E, int topk, int *ids,
                      float *w, cudaStream_t s);

/* Groups the n*topk (token, slot) pairs by expert, stable in token order:
 * offsets [E+1] (rows of each expert in the grouped order), rows_tok
 * [n*topk] (token of each grouped row), row_of [n*topk] (grouped row of
 * pair t*topk+j). */
int kn_llm_moe_group(const int *ids, int n, int topk, int E, int *offsets, int *rows_tok,
                     int *row_of, cudaStream_t s);

/* dst[r] = src[rows[r]] for r < m (fp16 rows of H). */
int kn_llm_gather_rows(const kn_half *src, const int *rows, int m, int H, kn_half *dst,
                       cudaStream_t s);

/* act[r, i] = SwiGLU(gu[r] + b) for rows r < m of one expert:
 * gu [m, 2I] fp16 (GEMM output, fp32-accumulated), b [2I] fp32, act [m, I]
 * fp16. */
int kn_llm_swiglu(const kn_half *gu, const float *b, int m, int I, float limit, float alpha,
                  kn_half *act, cudaStream_t s);

/* x[t] += sum_j w[t,j] * (y[row_of[t,j]] + b[ids[t,j]]) for t < n, j in order.
 * y [n*topk, H] fp32 grouped rows, b [E, H]. With norm_w (the next
 * layer's attention norm), also its RMSNorm of x[t] into out16 [n, H].
 * H % 4 == 0. */
int kn_llm_moe_combine(const float *y, const float *b, const int *ids, const float *w,
                       const int *row_of, int n, int topk, int H, float *x, const float *norm_w,
                       float eps, kn_half *out16, cudaStream_t s);

/* ------------------------------------------------------------- misc */

/* Decode launches use programmatic dependent launch (sm_90+) when on:
 * each kernel streams its first weights while the previous one finishes.
 * The engine turns it on for cards of compute capability 9.0 and up unless
 * BNBFS_PDL=0 is in the environment. Not thread-safe: set before launching. */
void kn_llm_set_pdl(int on);

/* dst (fp16 or fp32) = src converted; src_dtype 0 F16, 1 BF16, 2 F32. */
int kn_llm_convert(const void *src, int src_dtype, size_t n, int dst_f32, void *dst,
                   cudaStream_t s);

/* Fills n floats with v (poisoning outputs in tests, clearing buffers). */
int kn_llm_fill_f32(float *p, size_t n, float v, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
