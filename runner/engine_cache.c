/* engine_cache.c — the 24 GB mode's expert cache: a fixed number of GPU
 * slots, each holding one expert's gate_up and down matrices, filled from
 * host memory on a copy stream, or dequantized from the 4-bit store
 * (engine_q4.c).
 *
 * Policy: each layer owns an equal share of the slots (when every layer can
 * get at least topk) and replaces its least recently used expert; with fewer
 * slots, one LRU over all layers. A global LRU would be the worst policy for
 * prefill, which sweeps every expert of every layer in order (a cyclic scan
 * larger than the cache: each expert is evicted just before it is needed
 * again); per-layer shares keep each layer's share resident across chunks
 * and tokens. An expert the layer being computed still needs is pinned.
 * Decode needs the topk routed experts at once; prefill walks the layer's
 * experts hits first, copying misses ahead into the layer's free slots while
 * earlier experts compute.
 *
 * Ordering (two streams, no host waits except reading the routing):
 *  - a copy into a slot waits for the slot's `freed` event, recorded on the
 *    compute stream after the last kernel that read the slot;
 *  - the compute stream waits for the slot's `ready` event before using it.
 * Every wait names an event recorded earlier in host order, so the streams
 * cannot deadlock.
 *
 * Not here: which kernels run (engine.c), memory layout (engine_load.c).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine_priv.h"
#include "engine_q4.h"

int eng_cache_init(struct rn_engine *e)
{
    const struct rn_config *c = &e->c;
    const size_t n = (size_t)c->nlayers * c->nexperts;
    e->slot_of = malloc(n * sizeof *e->slot_of);
    if (!e->slot_of)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        e->slot_of[i] = -1;
    const bool shares = e->nslots >= c->nlayers * c->topk;
    for (int s = 0; s < e->nslots; s++) {
        struct eng_slot *sl = &e->slots[s];
        sl->owner = shares ? s % c->nlayers : -1;
        sl->layer = sl->expert = -1;
        CU(cudaEventCreateWithFlags(&sl->ready, cudaEventDisableTiming));
        CU(cudaEventCreateWithFlags(&sl->freed, cudaEventDisableTiming));
        CU(cudaEventRecord(sl->freed, e->st));
        CU(cudaEventRecord(sl->ready, e->cst));
    }
    return 0;
}

void eng_cache_free(struct rn_engine *e)
{
    for (int s = 0; e->slots && s < e->nslots; s++) {
        if (e->slots[s].ready)
            cudaEventDestroy(e->slots[s].ready);
        if (e->slots[s].freed)
            cudaEventDestroy(e->slots[s].freed);
    }
    free(e->slots);
    e->slots = NULL;
    free(e->slot_of);
    e->slot_of = NULL;
}

/* An unpinned slot layer l may use: an empty one first, else the least
 * recently used. */
static int victim(struct rn_engine *e, int l)
{
    int best = -1;
    for (int s = 0; s < e->nslots; s++) {
        const struct eng_slot *sl = &e->slots[s];
        if (sl->pinned || (sl->owner >= 0 && sl->owner != l))
            continue;
        if (sl->layer < 0)
            return s;
        if (best < 0 || sl->last_use < e->slots[best].last_use)
            best = s;
    }
    return best;
}

/* Queues the copy of expert (l, x) into slot s on the copy stream. */
static int fill(struct rn_engine *e, int s, int l, int x)
{
    const struct rn_config *c = &e->c;
    const size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    struct eng_slot *sl = &e->slots[s];
    if (sl->layer >= 0)
        e->slot_of[(size_t)sl->layer * c->nexperts + sl->expert] = -1;
    if (e->q4) {
        TRY(eng_q4_fill(e, l, x, sl->gu, sl->dn, sl->freed, sl->ready));
    } else {
        CU(cudaStreamWaitEvent(e->cst, sl->freed, 0));
        CU(cudaMemcpyAsync(sl->gu, e->L[l].h_gate_up + (size_t)x * H * 2 * I,
                           H * 2 * I * sizeof(kn_half), cudaMemcpyHostToDevice, e->cst));
        CU(cudaMemcpyAsync(sl->dn, e->L[l].h_down + (size_t)x * I * H, I * H * sizeof(kn_half),
                           cudaMemcpyHostToDevice, e->cst));
        CU(cudaEventRecord(sl->ready, e->cst));
        e->stats.bytes_moved += e->expert_bytes;
    }
    sl->layer = l;
    sl->expert = x;
    e->slot_of[(size_t)l * c->nexperts + x] = s;
    e->stats.expert_misses++;
    return 0;
}

/* expert_nocache: forget what layer l's slots hold (they are refilled). */
static void forget_layer(struct rn_engine *e, int l)
{
    if (!e->opts.expert_nocache)
        return;
    for (int s = 0; s < e->nslots; s++) {
        struct eng_slot *sl = &e->slots[s];
        if (sl->layer == l && !sl->pinned) {
            e->slot_of[(size_t)l * e->c.nexperts + sl->expert] = -1;
            sl->layer = sl->expert = -1;
        }
    }
}

static void use(struct rn_engine *e, int s)
{
    e->slots[s].pinned = true;
    e->slots[s].last_use = e->tick;
}

int eng_cache_decode_prepare(struct rn_engine *e, int l, struct kn_expert_src *gu,
                             struct kn_expert_src *dn)
{
    const struct rn_config *c = &e->c;
    const int K = c->topk;
    CU(cudaMemcpyAsync(e->h_ids, e->ids, (size_t)K * sizeof(int), cudaMemcpyDeviceToHost,
                       e->st));
    CU(cudaEventRecord(e->ev_route, e->st));
    CU(cudaEventSynchronize(e->ev_route));
    e->tick++;
    forget_layer(e, l);
    for (int j = 0; j < K; j++) {
        const int x = e->h_ids[j];
        if (x < 0 || x >= c->nexperts) {
            dq_log(DQ_LOG_ERROR, ENG_TAG, "layer %d: router chose expert %d of %d", l, x,
                   c->nexperts);
            return -EIO;
        }
        const int s = e->slot_of[(size_t)l * c->nexperts + x];
        e->cur_slots[j] = s;
        if (s >= 0) {
            use(e, s);
            e->stats.expert_hits++;
        }
    }
    for (int j = 0; j < K; j++) {
        if (e->cur_slots[j] >= 0)
            continue;
        const int s = victim(e, l);
        if (s < 0) {
            dq_log(DQ_LOG_ERROR, ENG_TAG, "expert cache: no free slot (%d slots, %d needed)",
                   e->nslots, K);
            return -ENOMEM;
        }
        TRY(fill(e, s, l, e->h_ids[j]));
        use(e, s);
        e->cur_slots[j] = s;
    }
    const kn_half **hp = e->h_wptr + (size_t)l * 2 * K;
    for (int j = 0; j < K; j++) {
        const struct eng_slot *sl = &e->slots[e->cur_slots[j]];
        CU(cudaStreamWaitEvent(e->st, sl->ready, 0));
        hp[j] = sl->gu;
        hp[K + j] = sl->dn;
    }
    /* h_wptr rows are per layer: this row is not rewritten before the next
     * token, and every token ends with a stream synchronization. */
    CU(cudaMemcpyAsync(e->d_wptr + (size_t)l * 2 * K, hp, 2 * (size_t)K * sizeof(*hp),
                       cudaMemcpyHostToDevice, e->st));
    gu->base = dn->base = NULL;
    gu->ptrs = (const kn_half *const *)(e->d_wptr + (size_t)l * 2 * K);
    dn->ptrs = gu->ptrs + K;
    return 0;
}

int eng_cache_decode_done(struct rn_engine *e, int l)
{
    (void)l;
    for (int j = 0; j < e->c.topk; j++) {
        struct eng_slot *sl = &e->slots[e->cur_slots[j]];
        CU(cudaEventRecord(sl->freed, e->st));
        sl->pinned = false;
    }
    return 0;
}

int eng_cache_prefill_layer(struct rn_engine *e, int l, const int *h_offsets, eng_expert_fn fn,
                            void *ctx)
{
    const struct rn_config *c = &e->c;
    const int E = c->nexperts;
    int *hit = malloc(2 * (size_t)E * sizeof *hit);
    if (!hit)
        return -ENOMEM;
    int *miss = hit + E, nhit = 0, nmiss = 0, issued = 0, rc = 0;
    e->tick++;
    forget_layer(e, l);
    for (int x = 0; x < E; x++) {
        if (h_offsets[x + 1] == h_offsets[x])
            continue;
        const int s = e->slot_of[(size_t)l * E + x];
        if (s >= 0) {
            hit[nhit++] = x;
            use(e, s);
            e->stats.expert_hits++;
        } else {
            miss[nmiss++] = x;
        }
    }
    /* Copy ahead into every slot this layer does not need. */
    while (!rc && issued < nmiss) {
        const int s = victim(e, l);
        if (s < 0)
            break;
        rc = fill(e, s, l, miss[issued]);
        if (!rc)
            use(e, s);
        issued++;
    }
    for (int i = 0; !rc && i < nhit + nmiss; i++) {
        const int x = i < nhit ? hit[i] : miss[i - nhit];
        if (i >= nhit && i - nhit >= issued) {
            /* Not copied yet: a slot freed by an earlier expert takes it. */
            const int s = victim(e, l);
            if (s < 0) {
                dq_log(DQ_LOG_ERROR, ENG_TAG, "expert cache: no free slot");
                rc = -ENOMEM;
                break;
            }
            if ((rc = fill(e, s, l, x)))
                break;
            use(e, s);
            issued++;
        }
        const int s = e->slot_of[(size_t)l * E + x];
        struct eng_slot *sl = &e->slots[s];
        cudaError_t ce = cudaStreamWaitEvent(e->st, sl->ready, 0);
        if (ce != cudaSuccess) {
            rc = eng_cuda_fail(ce, "cudaStreamWaitEvent", __FILE__, __LINE__);
            break;
        }
        if ((rc = fn(e, ctx, x, sl->gu, sl->dn)))
            break;
        ce = cudaEventRecord(sl->freed, e->st);
        if (ce != cudaSuccess) {
            rc = eng_cuda_fail(ce, "cudaEventRecord", __FILE__, __LINE__);
            break;
        }
        sl->pinned = false;
        /* Keep one copy in flight ahead of the compute. */
        if (issued < nmiss) {
            const int v = victim(e, l);
            if (v >= 0) {
                if ((rc = fill(e, v, l, miss[issued])))
                    break;
                use(e, v);
                issued++;
            }
        }
    }
    for (int s = 0; s < e->nslots; s++)
        e->slots[s].pinned = false;
    free(hit);
    return rc;
}
