/* engine.c — the gpt-oss forward pass on the GPU: rn_engine_* of runner.h.
 *
 * Decode (one token): the memory-bound kernels of kernels/llm_gemv.cu, all
 * reading the token id and position from device memory. Resident, every
 * layer runs in one persistent kernel (phases between grid-wide barriers)
 * and the step is captured once as a CUDA graph and replayed; the 24 GB mode
 * launches each layer's five steps, the host choosing expert slots between
 * routing and the expert GEMVs. Both use one work split and give the same
 * bits. The greedy pick (argmax) of the logits runs on the GPU after
 * lm_head, so a greedy caller gets 4 bytes back a token
 * (rn_engine_forward_pick). Prefill (n tokens, in chunks): cuBLAS GEMMs (fp16 in, fp32 out)
 * for the projections and for each expert's grouped tokens (the router's in
 * fp32), tensor-core attention, and small fused kernels between them (the
 * residual adds carry the next RMSNorm).
 *
 * Not here: memory plan and upload (engine_load.c), the expert cache of the
 * 24 GB mode (engine_cache.c), tokens and sampling (main.c and friends).
 *
 * Invariants: the residual stream is fp32 and every sum has a fixed order,
 * so the same tokens give the same logits whether the experts are resident
 * or cached, and whether a graph or eager launches ran them. KV positions
 * >= pos are never read.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_priv.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int blas_fail(cublasStatus_t st, const char *what)
{
    dq_log(DQ_LOG_ERROR, ENG_TAG, "cuBLAS %s failed: status %d", what, (int)st);
    return -EIO;
}

/* C[m, N] = A[m, K] (fp16) @ B[K, N] (fp16), all row-major, fp32
 * accumulation; C fp32 (c16 false) or fp16: the "x @ W" layout of the
 * expert weights. */
static int gemm_xw(cublasHandle_t h, const kn_half *A, const kn_half *B, void *C, bool c16,
                   int m, int N, int K)
{
    const float one = 1.f, zero = 0.f;
    cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, N, m, K, &one, B,
                                     CUDA_R_16F, N, A, CUDA_R_16F, K, &zero, C,
                                     c16 ? CUDA_R_16F : CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : blas_fail(st, "gemm x@W");
}

/* C[m, N] (fp32) = A[m, K] (fp16) @ W^T + beta * C, W [N, K] row-major:
 * nn.Linear (beta 1 adds into a residual stream). */
static int gemm_lin(struct rn_engine *e, const kn_half *A, const kn_half *W, float *C, int m,
                    int N, int K, float beta)
{
    const float one = 1.f;
    cublasStatus_t st = cublasGemmEx(e->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &one, W,
                                     CUDA_R_16F, K, A, CUDA_R_16F, K, &beta, C, CUDA_R_32F, N,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : blas_fail(st, "gemm linear");
}

/* Router logits [m, E] (fp32) = hn32 [m, H] @ Wr32^T: fp32 throughout (the
 * handle's default math mode has no TF32), since the top-k is discrete. */
static int gemm_router(struct rn_engine *e, const float *hn, const float *Wr, float *C, int m,
                       int E, int H)
{
    const float one = 1.f, zero = 0.f;
    cublasStatus_t st = cublasGemmEx(e->blas, CUBLAS_OP_T, CUBLAS_OP_N, E, m, H, &one, Wr,
                                     CUDA_R_32F, H, hn, CUDA_R_32F, H, &zero, C, CUDA_R_32F, E,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : blas_fail(st, "gemm router");
}

static struct kn_attn_geom geom(const struct rn_engine *e, int l)
{
    const struct rn_config *c = &e->c;
    return (struct kn_attn_geom){
        .nheads = c->nheads, .nkv = c->nkv, .head_dim = c->head_dim, .max_ctx = e->max_ctx,
        .window = c->sliding[l] ? c->sliding_window : 0,
        .scale = (float)(1.0 / sqrt((double)c->head_dim)),
    };
}

/* ---------------------------------------------------------------- RoPE */

/* transformers' find_correction_dim / _compute_yarn_parameters. */
static double yarn_corr_dim(double rot, int dim, double base, int max_pos)
{
    return (dim * log(max_pos / (rot * 2.0 * M_PI))) / (2.0 * log(base));
}

/* cos/sin table [max_ctx][hd/2], times the YaRN attention factor. inv_freq
 * and the angle are computed in fp32 the way transformers does in torch. */
static int rope_table(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    const int dim = c->head_dim, half = dim / 2;
    float *inv = malloc((size_t)half * sizeof *inv);
    float *tab = malloc((size_t)e->max_ctx * dim * sizeof *tab);
    if (!inv || !tab) {
        free(inv);
        free(tab);
        return -ENOMEM;
    }
    double attn_factor = 1.0;
    double low = 0, high = 0;
    if (c->yarn) {
        low = yarn_corr_dim(c->yarn_beta_fast, dim, c->rope_theta, c->yarn_orig_max_pos);
        high = yarn_corr_dim(c->yarn_beta_slow, dim, c->rope_theta, c->yarn_orig_max_pos);
        if (c->yarn_truncate) {
            low = floor(low);
            high = ceil(high);
        }
        if (low < 0)
            low = 0;
        if (high > dim - 1)
            high = dim - 1;
        if (low == high)
            high += 0.001;
        if (c->yarn_factor > 1.0)
            attn_factor = 0.1 * log(c->yarn_factor) + 1.0;
    }
    for (int j = 0; j < half; j++) {
        const float pos_freq = powf((float)c->rope_theta, (float)(2 * j) / (float)dim);
        const float extrap = 1.0f / pos_freq;
        float f = extrap;
        if (c->yarn) {
            const float interp = 1.0f / ((float)c->yarn_factor * pos_freq);
            float ramp = ((float)j - (float)low) / ((float)high - (float)low);
            ramp = ramp < 0.f ? 0.f : ramp > 1.f ? 1.f : ramp;
            const float extrap_factor = 1.0f - ramp;
            f = interp * (1.0f - extrap_factor) + extrap * extrap_factor;
        }
        inv[j] = f;
    }
    const float af = (float)attn_factor;
    for (int p = 0; p < e->max_ctx; p++)
        for (int j = 0; j < half; j++) {
            const float ang = (float)p * inv[j];
            tab[((size_t)p * half + j) * 2] = (float)cos((double)ang) * af;
            tab[((size_t)p * half + j) * 2 + 1] = (float)sin((double)ang) * af;
        }
    cudaError_t ce = cudaMemcpy(e->rope, tab, (size_t)e->max_ctx * dim * sizeof *tab,
                                cudaMemcpyHostToDevice);
    free(inv);
    free(tab);
    if (ce != cudaSuccess)
        return eng_cuda_fail(ce, "cudaMemcpy(rope)", __FILE__, __LINE__);
    return 0;
}

/* ------------------------------------------------------- embeddings */

struct embed_job {
    const struct rn_engine *e;
    const int32_t *ids;
    int n;
    float *dst;
};

static int embed_rows_guarded(void *ctx)
{
    const struct embed_job *j = ctx;
    const struct rn_tensor *t = &j->e->m->embed;
    const size_t H = (size_t)j->e->c.hidden, rowb = H * dq_dtype_size(t->dtype);
    for (int i = 0; i < j->n; i++)
        dq_convert(t->dtype, (const uint8_t *)t->data + (size_t)j->ids[i] * rowb, H, DQ_F32,
                   j->dst + (size_t)i * H, NULL);
    return 0;
}

/* 24 GB mode: embedding rows from the mapped file (a vanished mount gives
 * -EIO, not a SIGBUS). */
static int host_embed_rows(const struct rn_engine *e, const int32_t *ids, int n, float *dst)
{
    struct embed_job j = {e, ids, n, dst};
    int rc = dq_guard(embed_rows_guarded, &j);
    if (rc)
        dq_log(DQ_LOG_ERROR, ENG_TAG, "%s: reading embedding rows failed", e->m->embed.name);
    return rc;
}

/* --------------------------------------------------------------- decode */

static int decode_body(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    const int H = c->hidden, I = c->intermediate, E = c->nexperts, K = c->topk;
    const int Q = c->nheads * c->head_dim;
    cudaStream_t st = e->st;
    if (e->embed)
        TRY(kn_llm_embed_decode(e->embed, H, e->d_step, e->x, st));
    if (e->persistent)
        TRY(kn_llm_decode_layers(&e->dargs, st));
    for (int l = 0; !e->persistent && l < c->nlayers; l++) {
        struct eng_layer *L = &e->L[l];
        const struct kn_attn_geom g = geom(e, l);
        TRY(kn_llm_qkv_decode(e->x, L->attn_norm, c->rms_eps, L->wqkv, L->bqkv, H, &g, e->rope,
                              e->d_step, e->q, L->kc, L->vc, st));
        TRY(kn_llm_attn_decode(e->q, L->kc, L->vc, L->sinks, &g, e->d_step, e->plan.nsplit,
                               e->attn_partial, e->attn_counters, e->attn, st));
        TRY(kn_llm_oproj_route(L->wo, L->bo, H, Q, e->attn, e->x, L->mlp_norm, c->rms_eps,
                               L->wr, L->br, E, K, e->hn, e->ids, e->wts, e->or_counter, st));
        struct kn_expert_src gu = {L->gate_up, NULL}, dn = {L->down, NULL};
        if (!e->resident)
            TRY(eng_cache_decode_prepare(e, l, &gu, &dn));
        TRY(kn_llm_moe_gate_up_decode(e->hn, gu, L->gate_up_b, e->ids, H, I, K, &e->plan,
                                      c->swiglu_limit, c->swiglu_alpha, e->moe_partial,
                                      e->gu_counters, e->act, st));
        TRY(kn_llm_moe_down_decode(e->act, dn, L->down_b, e->ids, e->wts, I, H, K, &e->plan,
                                   e->moe_partial, e->dn_counters, e->x, st));
        if (!e->resident)
            TRY(eng_cache_decode_done(e, l));
    }
    TRY(kn_llm_rmsnorm(e->x, e->final_norm, c->rms_eps, 1, H, NULL, e->hfin, st));
    TRY(kn_llm_gemv(e->lm_head, NULL, c->vocab, H, e->hfin, NULL, 0.f, 0, e->logits, st));
    /* The greedy pick, in the graph with the step (a few us, from L2), so a
     * greedy caller needs 4 bytes back instead of the 804 KB of logits. */
    TRY(kn_llm_argmax(e->logits, c->vocab, e->d_pick, st));
    return 0;
}

/* Captures the resident decode step. On failure graphs are switched off
 * and the step runs eagerly (same kernels, same results). */
static int capture_graph(struct rn_engine *e)
{
    cudaGraph_t g = NULL;
    CU(cudaStreamBeginCapture(e->st, cudaStreamCaptureModeThreadLocal));
    int rc = decode_body(e);
    cudaError_t ce = cudaStreamEndCapture(e->st, &g);
    if (!rc && ce == cudaSuccess)
        ce = cudaGraphInstantiate(&e->graph, g, 0);
    if (g)
        cudaGraphDestroy(g);
    if (rc || ce != cudaSuccess) {
        cudaGetLastError();
        e->graph = NULL;
        e->opts.no_graphs = true;
        dq_log(DQ_LOG_WARN, ENG_TAG, "CUDA graph capture failed (%s); decoding without graphs",
               rc ? "kernel launch" : cudaGetErrorString(ce));
    }
    return 0;
}

static int decode_step(struct rn_engine *e, int32_t id)
{
    e->h_step->id = id;
    e->h_step->pos = e->pos;
    CU(cudaMemcpyAsync(e->d_step, e->h_step, sizeof *e->h_step, cudaMemcpyHostToDevice, e->st));
    if (!e->embed) {
        TRY(host_embed_rows(e, &id, 1, e->h_x));
        CU(cudaMemcpyAsync(e->x, e->h_x, (size_t)e->c.hidden * sizeof(float),
                           cudaMemcpyHostToDevice, e->st));
    }
    /* The first step runs eagerly (module loading, attribute setup), later
     * resident steps replay one graph. */
    const bool graphs = e->resident && !e->opts.no_graphs;
    if (graphs && !e->graph && e->stats.decode_tokens > 0)
        TRY(capture_graph(e));
    if (graphs && e->graph)
        CU(cudaGraphLaunch(e->graph, e->st));
    else
        TRY(decode_body(e));
    return 0;
}

/* -------------------------------------------------------------- prefill */

struct pf_ctx {
    int l;
    const int *off;             /* host offsets [E+1] */
};

/* One expert's grouped rows on side stream si: gate_up GEMM, SwiGLU, down
 * GEMM into its rows of Y. */
static int expert_rows_on(struct rn_engine *e, int si, cudaStream_t s, const struct pf_ctx *p,
                          int x, const kn_half *gu, const kn_half *dn)
{
    const struct rn_config *c = &e->c;
    const int H = c->hidden, I = c->intermediate;
    const int r0 = p->off[x], m = p->off[x + 1] - r0;
    if (m == 0)
        return 0;
    cublasHandle_t h = si < 0 ? e->blas : e->pblas[si];
    const int b = si < 0 ? 0 : si;
    /* gate/up pre-activations in fp16 (half the bytes of the largest
     * prefill intermediate); the bias joins in fp32 in the SwiGLU. */
    TRY(gemm_xw(h, e->Xg + (size_t)r0 * H, gu, e->GU[b], true, m, 2 * I, H));
    TRY(kn_llm_swiglu(e->GU[b], e->L[p->l].gate_up_b + (size_t)x * 2 * I, m, I, c->swiglu_limit,
                      c->swiglu_alpha, e->act16[b], s));
    TRY(gemm_xw(h, e->act16[b], dn, e->Y + (size_t)r0 * H, false, m, H, I));
    return 0;
}

/* The 24 GB mode's callback: on the compute stream, after the slot's copy. */
static int expert_rows(struct rn_engine *e, void *vctx, int x, const kn_half *gu,
                       const kn_half *dn)
{
    return expert_rows_on(e, -1, e->st, vctx, x, gu, dn);
}

/* Resident: the layer's experts spread over the side streams, largest
 * first onto the least loaded stream; the compute stream waits for all. */
static int experts_resident(struct rn_engine *e, const struct pf_ctx *p)
{
    const struct rn_config *c = &e->c;
    const int E = c->nexperts;
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    const struct eng_layer *L = &e->L[p->l];
    CU(cudaEventRecord(e->ev_fork, e->st));
    for (int i = 0; i < e->npf; i++)
        CU(cudaStreamWaitEvent(e->pst[i], e->ev_fork, 0));
    long load[ENG_PF_STREAMS] = {0};
    bool done[256] = {false};
    for (int k = 0; k < E; k++) {
        int x = -1;
        for (int y = 0; y < E; y++)
            if (!done[y] && (x < 0 || p->off[y + 1] - p->off[y] > p->off[x + 1] - p->off[x]))
                x = y;
        done[x] = true;
        if (p->off[x + 1] == p->off[x])
            break;                      /* the rest have no rows */
        int si = 0;
        for (int i = 1; i < e->npf; i++)
            if (load[i] < load[si])
                si = i;
        load[si] += p->off[x + 1] - p->off[x];
        TRY(expert_rows_on(e, si, e->pst[si], p, x, L->gate_up + (size_t)x * H * 2 * I,
                           L->down + (size_t)x * I * H));
    }
    for (int i = 0; i < e->npf; i++) {
        CU(cudaEventRecord(e->ev_join[i], e->pst[i]));
        CU(cudaStreamWaitEvent(e->st, e->ev_join[i], 0));
    }
    return 0;
}

static int prefill_chunk(struct rn_engine *e, const int32_t *ids, int n, bool want_logits)
{
    const struct rn_config *c = &e->c;
    const int H = c->hidden, E = c->nexperts, K = c->topk;
    const int Q = c->nheads * c->head_dim, NQKV = Q + 2 * c->nkv * c->head_dim;
    const int pos0 = e->pos;
    cudaStream_t st = e->st;
    memcpy(e->h_tok, ids, (size_t)n * sizeof *ids);
    CU(cudaMemcpyAsync(e->d_tok, e->h_tok, (size_t)n * sizeof *ids, cudaMemcpyHostToDevice, st));
    if (e->embed) {
        TRY(kn_llm_embed(e->embed, H, e->d_tok, n, e->X, st));
    } else {
        TRY(host_embed_rows(e, ids, n, e->h_x));
        CU(cudaMemcpyAsync(e->X, e->h_x, (size_t)n * H * sizeof(float), cudaMemcpyHostToDevice,
                           st));
    }
    if (e->pf_profile)
        e->pf_chunks++;
    /* BNBFS_PF_PROFILE=1: an event at each phase boundary (mark i ends
     * phase i-1 of pf_names) */
#define MARK(i)                                                                                \
    do {                                                                                       \
        if (e->pf_profile)                                                                     \
            CU(cudaEventRecord(e->pf_ev[i], st));                                              \
    } while (0)
    /* The first layer's attention norm; each later one comes out of the
     * previous layer's combine (hn16 is free by then: the experts read Xg). */
    TRY(kn_llm_rmsnorm(e->X, e->L[0].attn_norm, c->rms_eps, n, H, e->hn16, NULL, st));
    for (int l = 0; l < c->nlayers; l++) {
        struct eng_layer *L = &e->L[l];
        const struct kn_attn_geom g = geom(e, l);
        MARK(0);
        TRY(gemm_lin(e, e->hn16, L->wqkv, e->qkv32, n, NQKV, H, 0.f));
        TRY(kn_llm_qkv_prefill(e->qkv32, L->bqkv, n, pos0, &g, e->rope, e->q16, L->kc, L->vc,
                               st));
        MARK(1);
        TRY(kn_llm_attn_prefill(e->q16, L->kc, L->vc, L->sinks, &g, n, pos0, e->attn16, st));
        MARK(2);
        TRY(gemm_lin(e, e->attn16, L->wo, e->X, n, H, Q, 1.f));
        MARK(3);
        TRY(kn_llm_bias_resid_norm(e->X, L->bo, L->mlp_norm, c->rms_eps, n, H, e->hn16, e->hn32,
                                   st));
        MARK(4);
        TRY(gemm_router(e, e->hn32, L->wr32, e->rlog, n, E, H));
        TRY(kn_llm_route_topk(e->rlog, L->br, n, E, K, e->rids, e->rw, st));
        MARK(5);
        TRY(kn_llm_moe_group(e->rids, n, K, E, e->offsets, e->rows_tok, e->row_of, st));
        MARK(6);
        /* GEMM sizes are per expert: the host needs the counts. It waits for
         * them while the GPU gathers the rows. */
        CU(cudaMemcpyAsync(e->h_offsets, e->offsets, (size_t)(E + 1) * sizeof(int),
                           cudaMemcpyDeviceToHost, st));
        CU(cudaEventRecord(e->ev_counts, st));
        MARK(7);
        TRY(kn_llm_gather_rows(e->hn16, e->rows_tok, n * K, H, e->Xg, st));
        MARK(8);
        CU(cudaEventSynchronize(e->ev_counts));
        MARK(9);                        /* > 0: the GPU idled after the gather until now */
        const double th = e->pf_profile ? now_s() : 0;
        struct pf_ctx p = {.l = l, .off = e->h_offsets};
        if (e->resident) {
            TRY(experts_resident(e, &p));
        } else {
            TRY(eng_cache_prefill_layer(e, l, e->h_offsets, expert_rows, &p));
        }
        if (e->pf_profile && e->pf_chunks > 1)
            e->pf_host_s += now_s() - th;
        MARK(10);
        const bool last = l + 1 == c->nlayers;
        TRY(kn_llm_moe_combine(e->Y, L->down_b, e->rids, e->rw, e->row_of, n, K, H, e->X,
                               last ? NULL : e->L[l + 1].attn_norm, c->rms_eps,
                               last ? NULL : e->hn16, st));
        MARK(11);
        if (e->pf_profile) {
            CU(cudaEventSynchronize(e->pf_ev[ENG_PF_MARKS - 1]));
            for (int k = 0; k + 1 < ENG_PF_MARKS && e->pf_chunks > 1; k++) {
                float ms = 0;
                CU(cudaEventElapsedTime(&ms, e->pf_ev[k], e->pf_ev[k + 1]));
                e->pf_t[k] += ms;
            }
        }
    }
#undef MARK
    if (want_logits) {
        TRY(kn_llm_rmsnorm(e->X + (size_t)(n - 1) * H, e->final_norm, c->rms_eps, 1, H, NULL,
                           e->hfin, st));
        TRY(kn_llm_gemv(e->lm_head, NULL, c->vocab, H, e->hfin, NULL, 0.f, 0, e->logits, st));
        TRY(kn_llm_argmax(e->logits, c->vocab, e->d_pick, st));
    }
    return 0;
}

/* ------------------------------------------------------------------ API */

static int check_dims(const struct rn_config *c)
{
    const char *why = NULL;
    if (c->hidden % 8 || c->intermediate % 8 || (c->nheads * c->head_dim) % 8)
        why = "hidden_size, intermediate_size and heads x head_dim must be multiples of 8";
    else if (c->head_dim % 16 || c->head_dim > 128)
        why = "head_dim must be a multiple of 16, at most 128";
    else if (c->nheads / c->nkv > 32)
        why = "more than 32 query heads per kv head";
    else if (c->nexperts > 256 || c->topk > 32)
        why = "more than 256 experts or 32 experts per token";
    if (why) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "unsupported model shape: %s", why);
        return -ENOTSUP;
    }
    return 0;
}

/* The decode step's work split (kn_llm_decode_plan) for this card, and
 * whether a resident step may run as one persistent kernel: cooperative
 * launches must be supported (otherwise resident decode launches each step,
 * as the 24 GB mode does). */
static int decode_plan(struct rn_engine *e, const struct cudaDeviceProp *prop)
{
    const struct rn_config *c = &e->c;
    if (kn_llm_decode_plan(e->nsm, c->hidden, c->intermediate, c->nexperts, c->topk, c->nheads,
                           c->head_dim, &e->plan)) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "unsupported model shape for the decode kernels");
        return -ENOTSUP;
    }
    e->persistent = e->plan.blocks > 0 && prop->cooperativeLaunch;
    return 0;
}

/* The persistent kernel's arguments: every layer's resident weights (the
 * 24 GB mode does not use it: its experts are not resident). */
static int decode_args(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    e->persistent = e->persistent && e->resident;
    if (!e->persistent) {
        dq_log(DQ_LOG_INFO, ENG_TAG, "decode: one launch per layer step, expert splits %d/%d, "
               "attention splits %d", e->plan.ks_gu, e->plan.ks_dn, e->plan.nsplit);
        return 0;
    }
    struct kn_decode_layer *hl = calloc((size_t)c->nlayers, sizeof *hl);
    if (!hl)
        return -ENOMEM;
    for (int l = 0; l < c->nlayers; l++) {
        const struct eng_layer *L = &e->L[l];
        hl[l] = (struct kn_decode_layer){
            .wqkv = L->wqkv, .bqkv = L->bqkv, .wo = L->wo, .bo = L->bo, .sinks = L->sinks,
            .attn_norm = L->attn_norm, .mlp_norm = L->mlp_norm, .wr = L->wr, .br = L->br,
            .gate_up = L->gate_up, .down = L->down, .gate_up_b = L->gate_up_b,
            .down_b = L->down_b, .kc = L->kc, .vc = L->vc,
            .window = c->sliding[l] ? c->sliding_window : 0,
        };
    }
    cudaError_t ce = cudaMemcpy(e->d_layers, hl, (size_t)c->nlayers * sizeof *hl,
                                cudaMemcpyHostToDevice);
    free(hl);
    if (ce != cudaSuccess)
        return eng_cuda_fail(ce, "cudaMemcpy(decode layers)", __FILE__, __LINE__);
    struct kn_attn_geom g = geom(e, 0);
    g.window = 0;
    e->dargs = (struct kn_decode_args){
        .layers = e->d_layers, .nlayers = c->nlayers, .H = c->hidden, .I = c->intermediate,
        .E = c->nexperts, .topk = c->topk, .g = g, .eps = c->rms_eps, .limit = c->swiglu_limit,
        .alpha = c->swiglu_alpha, .rope = e->rope, .step = e->d_step, .x = e->x, .q = e->q,
        .attn = e->attn, .act = e->act, .rlogits = e->rlogits, .attn_partial = e->attn_partial,
        .moe_partial = e->moe_partial, .attn_counters = e->attn_counters,
        .gu_counters = e->gu_counters, .dn_counters = e->dn_counters, .barrier = e->barrier,
        .plan = e->plan,
    };
    dq_log(DQ_LOG_INFO, ENG_TAG, "decode: one persistent kernel a token, %d blocks (%d a "
           "multiprocessor), expert splits %d/%d, attention splits %d", e->plan.blocks,
           e->plan.blocks / e->nsm, e->plan.ks_gu, e->plan.ks_dn, e->plan.nsplit);
    return 0;
}

static int engine_init(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    TRY(check_dims(c));
    int ndev = 0;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev == 0) {
        cudaGetLastError();
        dq_log(DQ_LOG_ERROR, ENG_TAG, "no usable CUDA GPU: %s",
               ce != cudaSuccess ? cudaGetErrorString(ce) : "no device found");
        return -ENODEV;
    }
    if (e->opts.device < 0 || e->opts.device >= ndev) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "GPU %d does not exist (%d found)", e->opts.device, ndev);
        return -ENODEV;
    }
    e->dev = e->opts.device;
    CU(cudaSetDevice(e->dev));
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, e->dev));
    snprintf(e->dev_name, sizeof e->dev_name, "%s", prop.name);
    e->nsm = prop.multiProcessorCount;
    /* Programmatic dependent launch for the decode kernels on sm_90+
     * (BNBFS_PDL=0 turns it off, to compare). */
    const char *pdl = getenv("BNBFS_PDL");
    kn_llm_set_pdl(prop.major >= 9 && !(pdl && strcmp(pdl, "0") == 0));

    int ctx = e->opts.max_context > 0 ? e->opts.max_context : 8192;
    if (ctx > c->max_position) {
        if (e->opts.max_context > 0)
            dq_log(DQ_LOG_WARN, ENG_TAG, "max context %d capped to max_position_embeddings %d",
                   ctx, c->max_position);
        ctx = c->max_position;
    }
    e->max_ctx = ctx;
    e->chunk = ctx < 2048 ? ctx : 2048;
    TRY(decode_plan(e, &prop));

    e->L = calloc((size_t)c->nlayers, sizeof *e->L);
    if (!e->L)
        return -ENOMEM;
    CU(cudaStreamCreateWithFlags(&e->st, cudaStreamNonBlocking));
    CU(cudaStreamCreateWithFlags(&e->cst, cudaStreamNonBlocking));
    CU(cudaEventCreateWithFlags(&e->ev_route, cudaEventDisableTiming));
    CU(cudaEventCreateWithFlags(&e->ev_counts, cudaEventDisableTiming));
    cublasStatus_t bs = cublasCreate(&e->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        e->blas = NULL;
        return blas_fail(bs, "create");
    }
    bs = cublasSetStream(e->blas, e->st);
    if (bs != CUBLAS_STATUS_SUCCESS)
        return blas_fail(bs, "set stream");

    const char *pfp = getenv("BNBFS_PF_PROFILE");
    e->pf_profile = pfp && *pfp == '1';
    for (int i = 0; e->pf_profile && i < ENG_PF_MARKS; i++)
        CU(cudaEventCreate(&e->pf_ev[i]));
    TRY(eng_plan_and_alloc(e));
    TRY(decode_args(e));
    e->npf = e->resident ? ENG_PF_STREAMS : 1;
    CU(cudaEventCreateWithFlags(&e->ev_fork, cudaEventDisableTiming));
    for (int i = 0; i < e->npf; i++) {
        CU(cudaStreamCreateWithFlags(&e->pst[i], cudaStreamNonBlocking));
        CU(cudaEventCreateWithFlags(&e->ev_join[i], cudaEventDisableTiming));
        bs = cublasCreate(&e->pblas[i]);
        if (bs != CUBLAS_STATUS_SUCCESS) {
            e->pblas[i] = NULL;
            return blas_fail(bs, "create");
        }
        if ((bs = cublasSetStream(e->pblas[i], e->pst[i])) != CUBLAS_STATUS_SUCCESS)
            return blas_fail(bs, "set stream");
    }
    TRY(rope_table(e));
    CU(cudaHostAlloc((void **)&e->h_step, sizeof *e->h_step, cudaHostAllocDefault));
    CU(cudaHostAlloc((void **)&e->h_pick, sizeof *e->h_pick, cudaHostAllocDefault));
    CU(cudaMalloc((void **)&e->d_pick, sizeof *e->d_pick));
    CU(cudaMemset(e->d_pick, 0, sizeof *e->d_pick));
    CU(cudaHostAlloc((void **)&e->h_logits, (size_t)c->vocab * sizeof(float),
                     cudaHostAllocDefault));
    CU(cudaHostAlloc((void **)&e->h_tok, (size_t)e->chunk * sizeof(int32_t),
                     cudaHostAllocDefault));
    CU(cudaHostAlloc((void **)&e->h_offsets, (size_t)(c->nexperts + 1) * sizeof(int),
                     cudaHostAllocDefault));
    if (!e->resident) {
        CU(cudaHostAlloc((void **)&e->h_x, (size_t)e->chunk * c->hidden * sizeof(float),
                         cudaHostAllocDefault));
        CU(cudaHostAlloc((void **)&e->h_ids, (size_t)c->topk * sizeof(int),
                         cudaHostAllocDefault));
        CU(cudaHostAlloc((void **)&e->h_wptr,
                         (size_t)c->nlayers * 2 * c->topk * sizeof(*e->h_wptr),
                         cudaHostAllocDefault));
        TRY(eng_cache_init(e));
    }
    const double t0 = now_s();
    TRY(eng_upload(e));
    CU(cudaDeviceSynchronize());
    for (int l = 0; l < c->nlayers; l++)
        TRY(kn_llm_convert(e->L[l].wr, 0, (size_t)c->nexperts * c->hidden, 1, e->L[l].wr32,
                           e->st));
    CU(cudaStreamSynchronize(e->st));
    e->stats.load_s = now_s() - t0;
    e->stats.resident = e->resident;
    e->stats.expert_slots = e->resident ? 0 : e->nslots;
    e->stats.vram_bytes = e->pool_bytes;
    return 0;
}

int rn_engine_new(const struct rn_model *m, const struct rn_engine_opts *o, struct rn_engine **out)
{
    *out = NULL;
    struct rn_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->m = m;
    e->c = m->cfg;
    if (o)
        e->opts = *o;
    int rc = engine_init(e);
    if (rc) {
        rn_engine_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

void rn_engine_free(struct rn_engine *e)
{
    if (!e)
        return;
    if (e->st)
        cudaStreamSynchronize(e->st);
    if (e->cst)
        cudaStreamSynchronize(e->cst);
    if (e->graph)
        cudaGraphExecDestroy(e->graph);
    eng_cache_free(e);
    if (e->blas)
        cublasDestroy(e->blas);
    if (e->pf_profile && e->pf_chunks > 1) {
        static const char *const name[ENG_PF_MARKS - 1] = {
            "q/k/v + rope", "attention", "o_proj", "bias + mlp norm", "router", "grouping",
            "counts download", "gather", "host wait (GPU idle)", "experts",
            "combine + next norm"};
        const double k = 1.0 / (e->pf_chunks - 1);
        char line[1024];
        int len = 0;
        for (int i = 0; i < ENG_PF_MARKS - 1; i++)
            len += snprintf(line + len, sizeof line - (size_t)len, "%s%s %.2f", i ? ", " : "",
                            name[i], k * e->pf_t[i]);
        dq_log(DQ_LOG_INFO, ENG_TAG, "prefill profile, ms a chunk over %d chunks after the "
               "first (%d side streams): %s; host issuing experts %.2f", e->pf_chunks - 1,
               e->npf, line, k * 1e3 * e->pf_host_s);
    }
    for (int i = 0; i < ENG_PF_MARKS; i++)
        if (e->pf_ev[i])
            cudaEventDestroy(e->pf_ev[i]);
    for (int i = 0; i < ENG_PF_STREAMS; i++) {
        if (e->pblas[i])
            cublasDestroy(e->pblas[i]);
        if (e->pst[i])
            cudaStreamDestroy(e->pst[i]);
        if (e->ev_join[i])
            cudaEventDestroy(e->ev_join[i]);
    }
    if (e->ev_fork)
        cudaEventDestroy(e->ev_fork);
    if (e->ev_route)
        cudaEventDestroy(e->ev_route);
    if (e->ev_counts)
        cudaEventDestroy(e->ev_counts);
    if (e->st)
        cudaStreamDestroy(e->st);
    if (e->cst)
        cudaStreamDestroy(e->cst);
    void *pinned[] = {e->h_step, e->h_logits, e->h_tok, e->h_offsets, e->h_x, e->h_ids,
                      (void *)e->h_wptr, e->h_pick};
    for (size_t i = 0; i < sizeof pinned / sizeof *pinned; i++)
        if (pinned[i])
            cudaFreeHost(pinned[i]);
    eng_host_experts_free(e);
    if (e->d_pick)
        cudaFree(e->d_pick);
    if (e->pool)
        cudaFree(e->pool);
    free(e->L);
    free(e);
}

/* Runs ids and brings back the logits (when logits is set or no pick is
 * asked for, so rn_engine_last_logits stays valid for rn_engine_forward's
 * callers) and/or the GPU's greedy pick. */
static int forward(struct rn_engine *e, const int32_t *ids, int n, float *logits, int32_t *id)
{
    const struct rn_config *c = &e->c;
    if (n < 1) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "forward of %d tokens", n);
        return -EINVAL;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab) {
            dq_log(DQ_LOG_ERROR, ENG_TAG, "token id %d (input %d) outside the vocabulary of %d",
                   ids[i], i, c->vocab);
            return -EINVAL;
        }
    if (n > e->max_ctx - e->pos) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "context full: %d positions used + %d new > max context %d",
               e->pos, n, e->max_ctx);
        return -E2BIG;
    }
    const double t0 = now_s();
    if (n == 1) {
        TRY(decode_step(e, ids[0]));
        e->pos++;
    } else {
        for (int done = 0; done < n;) {
            const int len = n - done < e->chunk ? n - done : e->chunk;
            TRY(prefill_chunk(e, ids + done, len, done + len == n));
            e->pos += len;
            done += len;
        }
    }
    e->h_logits_valid = logits || !id;
    if (e->h_logits_valid)
        CU(cudaMemcpyAsync(e->h_logits, e->logits, (size_t)c->vocab * sizeof(float),
                           cudaMemcpyDeviceToHost, e->st));
    if (id)
        CU(cudaMemcpyAsync(e->h_pick, &e->d_pick->id, sizeof *e->h_pick, cudaMemcpyDeviceToHost,
                           e->st));
    CU(cudaStreamSynchronize(e->st));
    if (logits)
        memcpy(logits, e->h_logits, (size_t)c->vocab * sizeof(float));
    if (id)
        *id = *e->h_pick;
    const double dt = now_s() - t0;
    if (n == 1) {
        e->stats.decode_tokens++;
        e->stats.decode_s += dt;
    } else {
        e->stats.prefill_tokens += (uint64_t)n;
        e->stats.prefill_s += dt;
    }
    return 0;
}

int rn_engine_forward(struct rn_engine *e, const int32_t *ids, int n, float *logits)
{
    return forward(e, ids, n, logits, NULL);
}

int rn_engine_forward_pick(struct rn_engine *e, const int32_t *ids, int n, float *logits,
                           int32_t *id)
{
    return forward(e, ids, n, logits, id);
}

int rn_engine_pos(const struct rn_engine *e) { return e->pos; }

const float *rn_engine_last_logits(const struct rn_engine *e)
{
    return e->h_logits_valid ? e->h_logits : NULL;
}

int rn_engine_truncate(struct rn_engine *e, int pos)
{
    if (pos < 0 || pos > e->pos) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "truncate to %d: only %d positions in the cache", pos,
               e->pos);
        return -EINVAL;
    }
    e->pos = pos;
    return 0;
}

void rn_engine_get_stats(const struct rn_engine *e, struct rn_engine_stats *s)
{
    *s = e->stats;
}
