/* engine_load.c — where every byte of the engine lives, and getting the
 * weights there.
 *
 * The memory plan: one device allocation (the pool) laid out by a single
 * function run twice — first to measure, then to assign pointers — so the
 * budget check and the real layout cannot disagree. If everything fits the
 * VRAM budget the model is resident; otherwise the experts stay in host
 * memory (a pinned F16 mirror, or the mmap when pinning fails) and the pool
 * holds as many expert slots as fit.
 *
 * The upload: the checkpoint is read with rn_read_items (8 MiB preads from
 * several threads, so a cold bnbfs mount runs at its throughput); each
 * thread copies its chunks to the GPU on its own stream, converting on the
 * host when the file's dtype is not the target's.
 *
 * Not here: the forward pass (engine.c), slot replacement (engine_cache.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine_priv.h"
#include "engine_q4.h"
#include "model_read.h"

#define POOL_ALIGN 256
/* The CUDA context, cuBLAS and fragmentation live outside the pool. */
#define CTX_RESERVE (512ull << 20)
#define DEFAULT_MARGIN (768ull << 20)

int eng_cuda_fail(cudaError_t e, const char *call, const char *file, int line)
{
    dq_log(DQ_LOG_ERROR, ENG_TAG, "%s: %s (%s:%d)", call, cudaGetErrorString(e), file, line);
    return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

void *eng_alloc(struct rn_engine *e, size_t bytes)
{
    size_t off = (e->pool_used + POOL_ALIGN - 1) & ~(size_t)(POOL_ALIGN - 1);
    e->pool_used = off + bytes;
    if (!e->pool)
        return (void *)(uintptr_t)(off + POOL_ALIGN);   /* measuring: non-NULL, never used */
    return (uint8_t *)e->pool + off;
}

#define ALLOC(ptr, n) ((ptr) = eng_alloc(e, (size_t)(n) * sizeof *(ptr)))

/* Assigns every device pointer from the pool (or only counts, when the pool
 * is NULL). with_experts: the stacked expert weights are resident;
 * otherwise nslots cache slots are laid out. */
static void layout(struct rn_engine *e, bool with_experts, bool embed_on_gpu, int nslots)
{
    const struct rn_config *c = &e->c;
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate, E = (size_t)c->nexperts,
                 V = (size_t)c->vocab, hd = (size_t)c->head_dim,
                 Q = (size_t)c->nheads * hd, KV = (size_t)c->nkv * hd, NQKV = Q + 2 * KV,
                 K = (size_t)c->topk, C = (size_t)e->chunk, T = (size_t)e->max_ctx;
    e->pool_used = 0;
    ALLOC(e->lm_head, V * H);
    e->embed = NULL;
    if (embed_on_gpu)
        ALLOC(e->embed, V * H);
    ALLOC(e->final_norm, H);
    ALLOC(e->rope, T * hd);                     /* [T][hd/2] float2 */
    for (int l = 0; l < c->nlayers; l++) {
        struct eng_layer *L = &e->L[l];
        ALLOC(L->wqkv, NQKV * H);
        ALLOC(L->bqkv, NQKV);
        ALLOC(L->wo, H * Q);
        ALLOC(L->bo, H);
        ALLOC(L->sinks, (size_t)c->nheads);
        ALLOC(L->attn_norm, H);
        ALLOC(L->mlp_norm, H);
        ALLOC(L->wr, E * H);
        ALLOC(L->wr32, E * H);
        ALLOC(L->br, E);
        ALLOC(L->gate_up_b, E * 2 * I);
        ALLOC(L->down_b, E * H);
        ALLOC(L->kc, (size_t)c->nkv * T * hd);
        ALLOC(L->vc, (size_t)c->nkv * T * hd);
        L->gate_up = L->down = NULL;
        if (with_experts) {
            ALLOC(L->gate_up, E * H * 2 * I);
            ALLOC(L->down, E * I * H);
        }
    }
    if (e->q4 && e->q4->on_gpu) {
        ALLOC(e->q4->d_store, eng_q4_device_bytes(e, true));
    } else if (e->q4) {
        for (int i = 0; i < 2; i++)
            ALLOC(e->q4->d_stage[i], eng_q4_device_bytes(e, false) / 2);
    }
    for (int s = 0; s < nslots; s++) {
        kn_half *gu, *dn;
        ALLOC(gu, H * 2 * I);
        ALLOC(dn, I * H);
        if (e->slots) {
            e->slots[s].gu = gu;
            e->slots[s].dn = dn;
        }
    }
    /* decode */
    ALLOC(e->d_step, 1);
    ALLOC(e->x, H);
    ALLOC(e->q, Q);
    ALLOC(e->attn, Q);
    ALLOC(e->hn, H);
    ALLOC(e->act, K * I);
    ALLOC(e->wts, K);
    ALLOC(e->hfin, H);
    ALLOC(e->logits, V);
    ALLOC(e->ids, K);
    ALLOC(e->attn_partial, (size_t)c->nheads * e->plan.nsplit * (hd + 2));
    size_t pf = kn_llm_moe_partial_floats(2 * c->intermediate, c->topk, e->plan.ks_gu, 0);
    size_t pd = kn_llm_moe_partial_floats(c->hidden, c->topk, e->plan.ks_dn, 1);
    ALLOC(e->moe_partial, pf > pd ? pf : pd);
    ALLOC(e->attn_counters, (size_t)c->nheads);
    ALLOC(e->gu_counters, kn_llm_moe_counters(2 * c->intermediate, c->topk, 0));
    ALLOC(e->dn_counters, kn_llm_moe_counters(c->hidden, c->topk, 1));
    ALLOC(e->or_counter, 1);
    /* the persistent decode kernel (laid out in both modes, so the 24 GB
     * mode's base is the resident layout less the experts) */
    ALLOC(e->rlogits, E);
    ALLOC(e->barrier, 1);
    ALLOC(e->d_layers, (size_t)c->nlayers);
    ALLOC(e->d_wptr, (size_t)c->nlayers * 2 * K);
    /* prefill */
    ALLOC(e->d_tok, C);
    ALLOC(e->X, C * H);
    ALLOC(e->hn32, C * H);
    ALLOC(e->hn16, C * H);
    ALLOC(e->qkv32, C * NQKV);
    ALLOC(e->q16, C * Q);
    ALLOC(e->attn16, C * Q);
    ALLOC(e->rids, C * K);
    ALLOC(e->rw, C * K);
    ALLOC(e->offsets, E + 1);
    ALLOC(e->rows_tok, C * K);
    ALLOC(e->row_of, C * K);
    ALLOC(e->Xg, C * K * H);
    ALLOC(e->rlog, C * E);
    for (int i = 0; i < (with_experts ? ENG_PF_STREAMS : 1); i++) {
        ALLOC(e->GU[i], C * 2 * I);            /* one expert at a time: <= C rows */
        ALLOC(e->act16[i], C * I);
    }
    ALLOC(e->Y, C * K * H);
}

static double gib(size_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

int eng_plan_and_alloc(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    size_t free_b = 0, total_b = 0;
    CU(cudaMemGetInfo(&free_b, &total_b));
    size_t avail;
    if (e->opts.vram_budget) {
        avail = e->opts.vram_budget > CTX_RESERVE ? e->opts.vram_budget - CTX_RESERVE : 0;
        if (avail + (256ull << 20) > free_b)
            avail = free_b > (256ull << 20) ? free_b - (256ull << 20) : 0;
    } else {
        avail = free_b > DEFAULT_MARGIN ? free_b - DEFAULT_MARGIN : 0;
    }
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    e->expert_bytes = (H * 2 * I + I * H) * sizeof(kn_half);

    layout(e, true, true, 0);
    const size_t resident_need = e->pool_used;
    int nslots = 0;
    if (resident_need <= avail && e->opts.expert_slots <= 0) {
        e->resident = true;
    } else {
        e->resident = false;
        const int want = e->opts.expert_store;
        if (want != RN_STORE_F16_HOST) {
            int rc = eng_q4_open(e);
            if (rc == -ENOTSUP)
                eng_q4_free(e);
            else if (rc)
                return rc;
            if (!e->q4 && want) {
                dq_log(DQ_LOG_ERROR, ENG_TAG, "a 4-bit expert store was asked for and %s "
                       "names no usable source (--expert-source)", e->m->dir);
                return -EINVAL;
            }
        }
        struct eng_q4 *q4 = e->q4;
        e->q4 = NULL;
        layout(e, false, false, 0);
        e->q4 = q4;
        const size_t base = e->pool_used;
        const size_t slot_b = ((H * 2 * I * sizeof(kn_half) + POOL_ALIGN - 1) & ~(size_t)255) +
                              ((I * H * sizeof(kn_half) + POOL_ALIGN - 1) & ~(size_t)255);
        const int total_experts = c->nlayers * c->nexperts;
        /* The 4-bit store goes on the GPU when it leaves room for at least
         * topk slots: a miss is then a ~50 MB dequantization at memory
         * speed instead of a 13 MB copy over PCIe, which beats the extra
         * slots a host store would leave at any hit rate. */
        size_t extra = 0;
        bool q4_gpu = false;
        if (q4) {
            const int min_slots = e->opts.expert_slots > 0 ? e->opts.expert_slots : c->topk;
            const size_t dev = eng_q4_device_bytes(e, true) + 2 * POOL_ALIGN;
            q4_gpu = want != RN_STORE_Q4_HOST &&
                     base + dev + (size_t)min_slots * slot_b <= avail;
            if (!q4_gpu && want == RN_STORE_Q4_GPU) {
                dq_log(DQ_LOG_ERROR, ENG_TAG, "the 4-bit expert store (%.2f GiB) and %d expert "
                       "slots do not fit %.2f GiB next to %.2f GiB of other data",
                       gib(dev), min_slots, gib(avail), gib(base));
                return -ENOMEM;
            }
            extra = q4_gpu ? dev : eng_q4_device_bytes(e, false) + 3 * POOL_ALIGN;
        }
        if (e->opts.expert_slots > 0)
            nslots = e->opts.expert_slots;
        else
            nslots = base + extra < avail ? (int)((avail - base - extra) / slot_b) : 0;
        if (nslots > total_experts)
            nslots = total_experts;
        if (nslots < c->topk) {
            dq_log(DQ_LOG_ERROR, ENG_TAG,
                   "VRAM budget too small: %.2f GiB available; non-expert weights, KV cache "
                   "(%d positions) and workspace need %.2f GiB plus at least %d experts of "
                   "%.1f MiB (all resident: %.2f GiB)", gib(avail), e->max_ctx, gib(base + extra),
                   c->topk, (double)slot_b / (1 << 20), gib(resident_need));
            return -ENOMEM;
        }
        if (q4)
            TRY(eng_q4_place(e, q4_gpu));
        e->stats.store = !q4 ? RN_STORE_F16_HOST : q4_gpu ? RN_STORE_Q4_GPU : RN_STORE_Q4_HOST;
        e->nslots = nslots;
        e->slots = calloc((size_t)nslots, sizeof *e->slots);
        if (!e->slots)
            return -ENOMEM;
        layout(e, false, false, nslots);
    }
    e->pool_bytes = e->pool_used;
    cudaError_t ce = cudaMalloc(&e->pool, e->pool_bytes);
    if (ce != cudaSuccess) {
        e->pool = NULL;
        dq_log(DQ_LOG_ERROR, ENG_TAG, "cudaMalloc of %.2f GiB failed: %s (free %.2f GiB)",
               gib(e->pool_bytes), cudaGetErrorString(ce), gib(free_b));
        return -ENOMEM;
    }
    layout(e, e->resident, e->resident, nslots);
    /* Zeroed once: attention never reads unwritten cache rows, and the
     * last-arrival counters and the grid barrier must start at zero. */
    CU(cudaMemset(e->pool, 0, e->pool_bytes));
    dq_log(DQ_LOG_INFO, ENG_TAG, "%s: %s, %.2f GiB on the GPU (budget %.2f GiB, card free "
           "%.2f of %.2f GiB)", e->dev_name, e->resident ? "all weights resident" : "24 GB mode",
           gib(e->pool_bytes), gib(avail), gib(free_b), gib(total_b));
    static const char *const store[] = {
        [RN_STORE_F16_HOST] = "misses copy F16 from host memory",
        [RN_STORE_Q4_HOST] = "misses copy 4-bit from host memory and dequantize on the GPU",
        [RN_STORE_Q4_GPU] = "misses dequantize the GPU's 4-bit copy",
    };
    if (!e->resident)
        dq_log(DQ_LOG_INFO, ENG_TAG, "expert cache: %d of %d experts on the GPU (%.1f MiB "
               "each); %s", nslots, c->nlayers * c->nexperts,
               (double)e->expert_bytes / (1 << 20), store[e->stats.store]);
    return 0;
}

/* ------------------------------------------------------------- upload */

enum upl_kind { UPL_DEV_F16, UPL_DEV_F32, UPL_HOST_F16 };

struct upl {
    void *dst;                  /* destination of element 0 of the tensor */
    enum upl_kind kind;
};

struct upl_ctx {
    struct rn_engine *e;
    unsigned nthreads;
    cudaStream_t *streams;      /* [nthreads] */
    void **conv;                /* [nthreads] pinned, 2 x chunk bytes */
    uint64_t chunk;
    struct dq_sat sat;          /* values saturated converting (per-thread races are benign
                                 * for a count reported once; summed under no lock) */
};

/* Reader threads start on device 0: make the engine's device current. */
static void upl_thread_device(const struct upl_ctx *u)
{
    static __thread int cur = -1;
    if (cur != u->e->dev) {
        cudaSetDevice(u->e->dev);
        cur = u->e->dev;
    }
}

static void *upl_buf_alloc(void *ctx, uint64_t n)
{
    upl_thread_device(ctx);
    void *p = NULL;
    return cudaHostAlloc(&p, n, cudaHostAllocDefault) == cudaSuccess ? p : NULL;
}

static void upl_buf_free(void *ctx, void *p)
{
    (void)ctx;
    cudaFreeHost(p);
}

static int upl_sink(void *vctx, unsigned tid, const struct rn_read_item *it, uint64_t off,
                    const void *data, uint64_t len)
{
    struct upl_ctx *u = vctx;
    const struct upl *d = it->user;
    upl_thread_device(u);
    const enum dq_dtype sd = it->t->dtype;
    const size_t es = dq_dtype_size(sd);
    const uint64_t elem0 = (it->off + off) / es, nel = len / es;
    if (d->kind == UPL_HOST_F16) {
        if (it->host_dst)
            return 0;           /* read straight into the mirror */
        struct dq_sat sat = {0};
        dq_convert(sd, data, nel, DQ_F16, (kn_half *)d->dst + elem0, &sat);
        __atomic_fetch_add(&u->sat.count, sat.count, __ATOMIC_RELAXED);
        return 0;
    }
    const enum dq_dtype td = d->kind == UPL_DEV_F32 ? DQ_F32 : DQ_F16;
    const size_t tes = dq_dtype_size(td);
    const void *src = data;
    if (sd != td) {
        struct dq_sat sat = {0};
        dq_convert(sd, data, nel, td, u->conv[tid], &sat);
        __atomic_fetch_add(&u->sat.count, sat.count, __ATOMIC_RELAXED);
        src = u->conv[tid];
    }
    cudaError_t ce = cudaMemcpyAsync((uint8_t *)d->dst + elem0 * tes, src, nel * tes,
                                     cudaMemcpyHostToDevice, u->streams[tid]);
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(u->streams[tid]);
    if (ce != cudaSuccess) {
        dq_log(DQ_LOG_ERROR, ENG_TAG, "%s: upload to the GPU failed: %s", it->t->name,
               cudaGetErrorString(ce));
        return -EIO;
    }
    return 0;
}

struct item_list {
    struct rn_read_item *it;
    struct upl *u;
    size_t n, cap;
};

static int add_item(struct item_list *l, const struct rn_tensor *t, void *dst,
                    enum upl_kind kind, void *host_dst)
{
    if (l->n == l->cap)
        return -ENOMEM;         /* capacity is computed exactly up front */
    l->u[l->n] = (struct upl){.dst = dst, .kind = kind};
    l->it[l->n] = (struct rn_read_item){.t = t->src, .off = 0, .len = t->nbytes,
                                        .host_dst = host_dst, .user = &l->u[l->n]};
    l->n++;
    return 0;
}

int eng_hostmem_map(struct eng_hostmem *h, size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED)
        return -ENOMEM;
    madvise(p, bytes, MADV_HUGEPAGE);   /* fewer faults and pinned pages */
    *h = (struct eng_hostmem){.p = p, .bytes = bytes};
    return 0;
}

void eng_hostmem_pin(struct eng_hostmem *h, const char *what)
{
    cudaError_t ce = cudaHostRegister(h->p, h->bytes, cudaHostRegisterDefault);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        dq_log(DQ_LOG_WARN, ENG_TAG, "cannot page-lock the %.2f GiB %s (%s); copies from "
               "pageable memory are slower", gib(h->bytes), what, cudaGetErrorString(ce));
        return;
    }
    h->pinned = true;
}

void eng_hostmem_free(struct eng_hostmem *h)
{
    if (!h->p)
        return;
    if (h->pinned)
        cudaHostUnregister(h->p);
    munmap(h->p, h->bytes);
    *h = (struct eng_hostmem){0};
}

/* The F16 host mirror of the experts (24 GB mode without a 4-bit store).
 * Without the memory, the experts are used from the files' mmap (F16 files
 * only). */
static int setup_host_experts(struct rn_engine *e, bool *need_mirror_fill)
{
    const struct rn_config *c = &e->c;
    const size_t per_layer = (size_t)c->nexperts * e->expert_bytes;
    bool all_f16 = true;
    for (int l = 0; l < c->nlayers; l++)
        all_f16 &= e->m->layers[l].gate_up.dtype == DQ_F16 && e->m->layers[l].down.dtype == DQ_F16;
    const size_t bytes = per_layer * (size_t)c->nlayers;
    if (eng_hostmem_map(&e->mirror, bytes)) {
        if (!all_f16) {
            dq_log(DQ_LOG_ERROR, ENG_TAG, "cannot map %.1f GiB of host memory for the experts "
                   "and the checkpoint's experts are not F16", gib(bytes));
            return -ENOMEM;
        }
        dq_log(DQ_LOG_WARN, ENG_TAG, "cannot map %.1f GiB of host memory; expert copies come "
               "from the mapped files (slower)", gib(bytes));
        for (int l = 0; l < c->nlayers; l++) {
            e->L[l].h_gate_up = e->m->layers[l].gate_up.data;
            e->L[l].h_down = e->m->layers[l].down.data;
        }
        *need_mirror_fill = false;
        return 0;
    }
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate, E = (size_t)c->nexperts;
    for (int l = 0; l < c->nlayers; l++) {
        kn_half *base = (kn_half *)((uint8_t *)e->mirror.p + per_layer * (size_t)l);
        e->L[l].h_gate_up = base;
        e->L[l].h_down = base + E * H * 2 * I;
    }
    *need_mirror_fill = true;
    return 0;
}

void eng_host_experts_free(struct rn_engine *e)
{
    eng_q4_free(e);
    eng_hostmem_free(&e->mirror);
}

int eng_upload(struct rn_engine *e)
{
    const struct rn_model *m = e->m;
    const struct rn_config *c = &e->c;
    const size_t H = (size_t)c->hidden, Q = (size_t)c->nheads * c->head_dim,
                 KV = (size_t)c->nkv * c->head_dim;
    bool mirror = false;
    if (e->q4) {
        TRY(eng_q4_load(e));
        TRY(eng_q4_verify(e));
    } else if (!e->resident) {
        TRY(setup_host_experts(e, &mirror));
    }

    struct item_list l = {0};
    l.cap = 3 + (size_t)c->nlayers * 17;
    l.it = calloc(l.cap, sizeof *l.it);
    l.u = calloc(l.cap, sizeof *l.u);
    int rc = (!l.it || !l.u) ? -ENOMEM : 0;
    if (!rc && e->embed)
        rc = add_item(&l, &m->embed, e->embed, UPL_DEV_F16, NULL);
    if (!rc)
        rc = add_item(&l, &m->lm_head, e->lm_head, UPL_DEV_F16, NULL);
    if (!rc)
        rc = add_item(&l, &m->final_norm, e->final_norm, UPL_DEV_F32, NULL);
    for (int i = 0; !rc && i < c->nlayers; i++) {
        const struct rn_layer *S = &m->layers[i];
        struct eng_layer *L = &e->L[i];
        struct { const struct rn_tensor *t; void *dst; enum upl_kind k; } v[] = {
            {&S->attn_norm, L->attn_norm, UPL_DEV_F32},
            {&S->q_w, L->wqkv, UPL_DEV_F16},
            {&S->k_w, L->wqkv + Q * H, UPL_DEV_F16},
            {&S->v_w, L->wqkv + (Q + KV) * H, UPL_DEV_F16},
            {&S->q_b, L->bqkv, UPL_DEV_F32},
            {&S->k_b, L->bqkv + Q, UPL_DEV_F32},
            {&S->v_b, L->bqkv + Q + KV, UPL_DEV_F32},
            {&S->o_w, L->wo, UPL_DEV_F16},
            {&S->o_b, L->bo, UPL_DEV_F32},
            {&S->sinks, L->sinks, UPL_DEV_F32},
            {&S->mlp_norm, L->mlp_norm, UPL_DEV_F32},
            {&S->router_w, L->wr, UPL_DEV_F16},
            {&S->router_b, L->br, UPL_DEV_F32},
            {&S->gate_up_b, L->gate_up_b, UPL_DEV_F32},
            {&S->down_b, L->down_b, UPL_DEV_F32},
        };
        for (size_t k = 0; !rc && k < sizeof v / sizeof *v; k++)
            rc = add_item(&l, v[k].t, v[k].dst, v[k].k, NULL);
        if (rc)
            break;
        if (e->resident) {
            rc = add_item(&l, &S->gate_up, L->gate_up, UPL_DEV_F16, NULL);
            if (!rc)
                rc = add_item(&l, &S->down, L->down, UPL_DEV_F16, NULL);
        } else if (mirror) {
            void *gu = (void *)L->h_gate_up, *dn = (void *)L->h_down;
            rc = add_item(&l, &S->gate_up, gu, UPL_HOST_F16,
                          S->gate_up.dtype == DQ_F16 ? gu : NULL);
            if (!rc)
                rc = add_item(&l, &S->down, dn, UPL_HOST_F16, S->down.dtype == DQ_F16 ? dn : NULL);
        }
    }
    struct upl_ctx u = {.e = e, .chunk = 8ull << 20};
    u.nthreads = rn_read_default_threads();
    u.streams = calloc(u.nthreads, sizeof *u.streams);
    u.conv = calloc(u.nthreads, sizeof *u.conv);
    if (!rc && (!u.streams || !u.conv))
        rc = -ENOMEM;
    for (unsigned t = 0; !rc && t < u.nthreads; t++) {
        cudaError_t ce = cudaStreamCreateWithFlags(&u.streams[t], cudaStreamNonBlocking);
        if (ce == cudaSuccess)
            ce = cudaHostAlloc(&u.conv[t], 2 * u.chunk, cudaHostAllocDefault);
        if (ce != cudaSuccess)
            rc = eng_cuda_fail(ce, "upload buffers", __FILE__, __LINE__);
    }
    if (!rc) {
        struct rn_read_opts o = {.nthreads = u.nthreads, .chunk = u.chunk,
                                 .progress = e->opts.progress, .what = "loading",
                                 .buf_alloc = upl_buf_alloc, .buf_free = upl_buf_free,
                                 .sink = upl_sink, .ctx = &u};
        rc = rn_read_items(l.it, l.n, &o);
    }
    if (!rc && mirror)
        eng_hostmem_pin(&e->mirror, "F16 expert mirror");
    if (!rc && u.sat.count)
        dq_log(DQ_LOG_WARN, ENG_TAG, "%" PRIu64 " weight values did not fit F16 and were "
               "saturated", u.sat.count);
    for (unsigned t = 0; u.streams && t < u.nthreads; t++) {
        if (u.streams[t])
            cudaStreamDestroy(u.streams[t]);
        if (u.conv && u.conv[t])
            cudaFreeHost(u.conv[t]);
    }
    free(u.streams);
    free(u.conv);
    free(l.it);
    free(l.u);
    return rc;
}
