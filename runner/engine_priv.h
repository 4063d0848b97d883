/* engine_priv.h — private to runner/engine*.c: the engine's state.
 *
 * engine.c       forward pass orchestration (decode: the persistent kernel or
 *                per-step launches, captured as a graph; prefill GEMMs)
 * engine_load.c  memory plan (what is resident under the VRAM budget) and
 *                the parallel upload of the weights
 * engine_cache.c the 24 GB mode: expert slots on the GPU, misses copied from
 *                host memory on a second stream
 *
 * Threads: an engine is used from one thread at a time (the caller's);
 * engine_load.c runs reader threads only inside rn_engine_new.
 */
#ifndef BNBFS_RUNNER_ENGINE_PRIV_H
#define BNBFS_RUNNER_ENGINE_PRIV_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "llm.h"
#include "runner.h"

#define ENG_TAG "engine"
#define ENG_PF_STREAMS 4
#define ENG_PF_MARKS 12        /* prefill profile: events a layer */

/* A CUDA failure: logged with the call, file and line, then -EIO. */
int eng_cuda_fail(cudaError_t e, const char *call, const char *file, int line);
#define CU(call)                                                         \
    do {                                                                 \
        cudaError_t e_ = (call);                                         \
        if (e_ != cudaSuccess)                                           \
            return eng_cuda_fail(e_, #call, __FILE__, __LINE__);         \
    } while (0)
#define TRY(expr)                                                        \
    do {                                                                 \
        int rc_ = (expr);                                                \
        if (rc_)                                                         \
            return rc_;                                                  \
    } while (0)

struct eng_layer {
    kn_half *wqkv;              /* device; [(nh+2nkv)*hd, H]: q rows, k rows, v rows */
    float *bqkv;                /* device; [(nh+2nkv)*hd] */
    kn_half *wo;                /* device; [H, nh*hd] */
    float *bo;                  /* device; [H] */
    float *sinks;               /* device; [nh] */
    float *attn_norm, *mlp_norm;/* device; [H] */
    kn_half *wr;                /* device; [E, H] */
    float *wr32;                /* device; [E, H]: wr in fp32 for the prefill router GEMM */
    float *br;                  /* device; [E] */
    kn_half *gate_up;           /* device; [E, H, 2I]; NULL in the 24 GB mode */
    kn_half *down;              /* device; [E, I, H]; NULL in the 24 GB mode */
    float *gate_up_b;           /* device; [E, 2I] */
    float *down_b;              /* device; [E, H] */
    kn_half *kc, *vc;           /* device; [nkv, max_ctx, hd] KV cache */
    const kn_half *h_gate_up;   /* host; [E, H, 2I] F16 (pinned mirror or mmap); 24 GB mode */
    const kn_half *h_down;      /* host; [E, I, H] */
};

/* Host memory for the experts the GPU cache lacks (the 24 GB mode's F16
 * mirror or 4-bit store): an anonymous mapping the reader threads fill side
 * by side (their page faults run in parallel, which cudaHostAlloc's
 * single-threaded pinning does not: ~18 s for 38 GB on the H200 machine),
 * page-locked afterwards so copies from it run at full PCIe speed. */
struct eng_hostmem {
    void *p;                    /* NULL when not mapped */
    size_t bytes;
    bool pinned;                /* registered with CUDA */
};

/* One GPU cache slot holding both matrices of one expert. */
struct eng_slot {
    int owner;                  /* layer whose experts it caches, or -1: any layer */
    int layer, expert;          /* what it holds; -1 when empty */
    uint64_t last_use;          /* LRU tick */
    bool pinned;                /* needed by the layer being computed: not a victim */
    kn_half *gu, *dn;           /* device; [H, 2I], [I, H] */
    cudaEvent_t ready;          /* recorded on the copy stream after the fill */
    cudaEvent_t freed;          /* recorded on the compute stream after the last use */
};

struct rn_engine {
    const struct rn_model *m;   /* borrowed */
    struct rn_config c;
    struct rn_engine_opts opts;
    int dev, nsm;
    char dev_name[256];
    cudaStream_t st;            /* compute */
    cudaStream_t cst;           /* expert copies (24 GB mode) */
    cublasHandle_t blas;
    bool resident;              /* every weight on the GPU */
    int max_ctx;                /* KV positions */
    int chunk;                  /* prefill tokens per pass */

    void *pool;                 /* device; one allocation holding everything below */
    size_t pool_bytes, pool_used;

    kn_half *embed;             /* device [V, H], or NULL: rows come from the host */
    kn_half *lm_head;           /* device [V, H] */
    float *final_norm;          /* device [H] */
    float *rope;                /* device [max_ctx, hd/2] (cos, sin) x attention factor */
    struct eng_layer *L;        /* [nlayers] */

    /* decode workspace (device unless h_) */
    struct kn_step *d_step, *h_step;
    float *x, *q, *attn, *hn, *act, *wts, *hfin, *logits;
    int *ids;                   /* [topk] */
    float *attn_partial, *moe_partial;
    int *attn_counters, *gu_counters, *dn_counters, *or_counter;
    struct kn_decode_plan plan; /* work splits, shared by both decode drivers */
    /* Resident decode runs every layer in one persistent kernel
     * (kn_llm_decode_layers) where cooperative launches work; the 24 GB
     * mode launches the layer's steps one by one (same plan, same bits). */
    bool persistent;
    struct kn_decode_layer *d_layers;   /* device [nlayers] */
    float *rlogits;             /* device [E] */
    unsigned *barrier;          /* device; the persistent kernel's grid barrier */
    struct kn_decode_args dargs;
    float *h_logits;            /* pinned [V] */
    bool h_logits_valid;        /* h_logits holds the last forward's logits */
    struct kn_pick *d_pick;     /* device; greedy pick of the last logits (own cudaMalloc:
                                 * 16 bytes, zeroed at creation; kn_llm_argmax) */
    int32_t *h_pick;            /* pinned [1]: the picked id */
    float *h_x;                 /* pinned [chunk, H]: embedding rows from the host */
    int *h_ids;                 /* pinned [topk] */
    const kn_half **d_wptr;     /* device [nlayers][2][topk]: slot pointers */
    const kn_half **h_wptr;     /* pinned, same shape */
    cudaEvent_t ev_route;

    /* prefill workspace */
    int32_t *d_tok, *h_tok;     /* [chunk] */
    float *X, *hn32, *qkv32, *Y, *rw;
    float *rlog;                /* [chunk, E] router logits */
    kn_half *hn16, *q16, *attn16, *Xg;
    /* Prefill experts run on ENG_PF_STREAMS side streams when resident (one
     * expert GEMM of ~C*topk/E rows cannot fill the GPU), each with its own
     * cuBLAS handle and scratch; the 24 GB mode uses index 0 on `st`. */
    int npf;                    /* side streams in use (1 in the 24 GB mode) */
    cudaStream_t pst[ENG_PF_STREAMS];
    cublasHandle_t pblas[ENG_PF_STREAMS];
    cudaEvent_t ev_fork, ev_join[ENG_PF_STREAMS];
    kn_half *GU[ENG_PF_STREAMS];        /* device; [chunk, 2I]: one expert's rows */
    kn_half *act16[ENG_PF_STREAMS];     /* device; [chunk, I] */
    /* BNBFS_PF_PROFILE=1 (diagnostic): events around each prefill layer's
     * phases, summed from the second chunk on (the first pays cuBLAS's
     * per-shape setup) and logged when the engine is freed. */
    bool pf_profile;
    cudaEvent_t pf_ev[ENG_PF_MARKS];
    double pf_t[ENG_PF_MARKS - 1], pf_host_s;  /* summed ms per phase; host seconds issuing
                                                * experts */
    int pf_chunks;              /* prefill chunks run while profiling */
    int *rids, *offsets, *rows_tok, *row_of;
    int *h_offsets;             /* pinned [E+1] */
    cudaEvent_t ev_counts;      /* h_offsets has arrived */

    cudaGraphExec_t graph;      /* resident decode step, captured on first use */

    /* 24 GB mode */
    struct eng_slot *slots;
    int nslots;
    int *slot_of;               /* [nlayers * E]: slot index or -1 */
    uint64_t tick;
    int cur_slots[32];          /* decode: slots of the layer between prepare and done */
    struct eng_hostmem mirror;  /* F16 copy of every expert, or p NULL (the files' mmap is
                                 * used, or the 4-bit store serves misses); owned */
    size_t expert_bytes;        /* one expert: gate_up + down, bytes */
    struct eng_q4 *q4;          /* 4-bit expert store (engine_q4.c), or NULL; owned */

    int pos;
    struct rn_engine_stats stats;
};

/* engine_load.c */
/* -ENOMEM (nothing logged: the caller says what for) when it cannot map. */
int eng_hostmem_map(struct eng_hostmem *h, size_t bytes);
/* Page-locks h; without it copies run from pageable memory (warned once,
 * naming `what`). */
void eng_hostmem_pin(struct eng_hostmem *h, const char *what);
void eng_hostmem_free(struct eng_hostmem *h);
int eng_plan_and_alloc(struct rn_engine *e);
int eng_upload(struct rn_engine *e);
void *eng_alloc(struct rn_engine *e, size_t bytes);
void eng_host_experts_free(struct rn_engine *e);

/* engine_cache.c */
int eng_cache_init(struct rn_engine *e);
void eng_cache_free(struct rn_engine *e);
/* Decode: makes the topk experts routed at layer l (ids on the device,
 * copied back here) resident; fills the layer's pointer table and makes the
 * compute stream wait for their copies. */
int eng_cache_decode_prepare(struct rn_engine *e, int l, struct kn_expert_src *gu,
                             struct kn_expert_src *dn);
/* After the layer's expert kernels were queued. */
int eng_cache_decode_done(struct rn_engine *e, int l);
/* Prefill: for every expert of layer l with rows (offsets on the host) calls
 * fn(ctx, expert, gate_up, down) with device pointers valid on the compute
 * stream, copying misses ahead while earlier experts compute. */
typedef int (*eng_expert_fn)(struct rn_engine *e, void *ctx, int expert, const kn_half *gu,
                             const kn_half *dn);
int eng_cache_prefill_layer(struct rn_engine *e, int l, const int *h_offsets, eng_expert_fn fn,
                            void *ctx);

#endif
