/* engine_q4.h — private to runner/engine*.c: the 24 GB mode's 4-bit expert
 * store.
 *
 * Why: a bnbfs mount serves F16 experts computed from 4-bit codes. An expert
 * that misses the GPU cache costs 49.8 MB of F16 over PCIe, but only ~12.8 MB
 * as the 4-bit codes and scales it was computed from — and all 768 experts
 * of gpt-oss-20b in 4 bits (9.9 GB) fit next to the non-expert weights and a
 * useful cache on a 24 GB card. So when the source is known (a bnbfs mount
 * names it in the user.bnbfs.source xattr of its root; --expert-source names
 * it for any other directory), the engine keeps the experts' 4-bit data on
 * the GPU (or, when that does not fit, in pinned host memory) and fills a
 * cache slot by running the mount's own CUDA kernel (kn_deq4_fuse_t), which
 * gives the mount's bytes bit for bit: results equal the resident engine's.
 *
 * Tiers (chosen by eng_plan_and_alloc, engine_load.c):
 *   RN_STORE_Q4_GPU   the store is part of the engine's device pool; a miss
 *                     is two kernels on the copy stream;
 *   RN_STORE_Q4_HOST  the store is pinned host memory; a miss copies its
 *                     record into one of two device staging buffers (copy
 *                     stream) and dequantizes it from there (kernel stream),
 *                     so the next copy overlaps the previous kernels.
 *
 * Ownership: struct eng_q4 is owned by the engine (e->q4); it holds the
 * source checkpoint open only between eng_q4_open and the end of
 * eng_q4_load. Threads: the engine's thread only, except eng_q4_load's
 * reader threads (each on its own records and staging).
 */
#ifndef BNBFS_RUNNER_ENGINE_Q4_H
#define BNBFS_RUNNER_ENGINE_Q4_H

#include "engine_priv.h"
#include "kernels.h"

/* One expert matrix inside a record (a 4-bit Linear [C = out, R = in]). */
struct q4_mat {
    enum dq_qtype qtype;
    uint32_t blocksize;
    bool nested;
    uint32_t nested_blocksize;
    float nested_offset;
    uint64_t C, R;
    size_t codes_off, abs_off, nabs_off, nmap_off;  /* within the record */
    size_t codes_len, abs_len, nabs_len;
    const struct dq_out *o;     /* the plan's output and source (valid until the */
    const struct dq_src *src;   /* load ends; NULL afterwards) */
};

/* The 4-bit data of one expert: gate_up then down, each array 256-aligned. */
struct q4_rec {
    size_t off, bytes;          /* within the store */
    struct q4_mat m[2];         /* 0: gate_up [2I, H], 1: down [H, I] */
};

struct eng_q4 {
    char *src_dir;              /* owned; absolute */
    struct dq_ckpt *ck;         /* owned until eng_q4_load ends */
    struct dq_plan *plan;       /* owned until eng_q4_load ends */
    struct q4_rec *rec;         /* owned; [nlayers * nexperts] */
    size_t store_bytes, rec_max;
    uint64_t max_blocks;        /* the most 4-bit blocks of one matrix */
    bool on_gpu;
    uint8_t *d_store;           /* device (pool), RN_STORE_Q4_GPU */
    struct eng_hostmem host;    /* the store in host memory, RN_STORE_Q4_HOST; owned */
    uint8_t *d_stage[2];        /* device (pool), RN_STORE_Q4_HOST: [rec_max] each */
    cudaEvent_t stage_full[2], stage_free[2];
    int next_stage;
    cudaStream_t kst;           /* RN_STORE_Q4_HOST: dequantization stream */
    struct kn_counters *d_cnt;  /* device; saturations (counted, like the mount's) */
};

/* Finds and opens the 4-bit source of the model's experts and lays out the
 * store (e->q4 set on success). -ENOTSUP (logged at INFO with the reason)
 * when the model dir names no source or the source cannot serve every
 * expert bit-exactly: the caller keeps the F16 path. Other -errno (logged):
 * a source given with --expert-source that cannot be used. */
int eng_q4_open(struct rn_engine *e);
/* Chooses the tier (before layout() assigns d_store / d_stage) and creates
 * the streams and events it needs. */
int eng_q4_place(struct rn_engine *e, bool on_gpu);
/* Device bytes layout() reserves for the store (GPU tier) or the staging. */
size_t eng_q4_device_bytes(const struct rn_engine *e, bool on_gpu);
/* Copies every expert's 4-bit data from the source files into the store
 * (parallel readers; every scale checked finite, source identity checked),
 * then closes the source. */
int eng_q4_load(struct rn_engine *e);
/* Queues the dequantization of expert (l, x) into gu [H, 2I] and dn [I, H]:
 * after `freed` (recorded on the compute stream), recording `ready`. */
int eng_q4_fill(struct rn_engine *e, int l, int x, kn_half *gu, kn_half *dn, cudaEvent_t freed,
                cudaEvent_t ready);
/* Dequantizes the first and the last expert into slot 0 and compares them
 * with the model dir's F16 bytes: a source that is not the model's fails
 * here (-EINVAL, logged with the first differing element). */
int eng_q4_verify(struct rn_engine *e);
void eng_q4_free(struct rn_engine *e);

#endif
