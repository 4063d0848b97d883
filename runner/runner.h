/* runner.h — bnbfs-run: the gpt-oss runner's public pieces.
 *
 * Three parts, each in its own files:
 *  - model (model.c): config.json/generation_config.json read with cJSON,
 *    weights opened through the index and mmap'd read-only, every tensor
 *    checked for presence, dtype and shape before anything runs.
 *  - tokenizer + harmony + sampling (tok.c, harmony.c, sample.c): CPU only.
 *  - engine (engine.c + kernels/llm*.cu): the CUDA forward pass with KV cache.
 * main.c ties them together. Nothing gpt-oss-20b-specific is hard-coded:
 * every dimension comes from the files, so the tiny fixture runs the same code.
 */
#ifndef BNBFS_RUNNER_H
#define BNBFS_RUNNER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dequant.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- config */

#define RN_MAX_LAYERS 256
#define RN_MAX_EOS 8

struct rn_config {
    int hidden;               /* 2880 */
    int intermediate;         /* 2880 (per expert) */
    int nlayers;              /* 24 */
    int nexperts;             /* 32 */
    int topk;                 /* 4 (experts_per_token / num_experts_per_tok) */
    int nheads;               /* 64 query heads */
    int nkv;                  /* 8 kv heads */
    int head_dim;             /* 64 */
    int vocab;                /* 201088 (embedding rows) */
    int sliding_window;       /* 128 */
    bool sliding[RN_MAX_LAYERS]; /* layer_types[L] == "sliding_attention" */
    float rms_eps;            /* 1e-5 */
    double rope_theta;        /* 150000 */
    /* YaRN (rope_scaling.rope_type == "yarn"); factor 1 and no yarn = plain RoPE */
    bool yarn;
    double yarn_factor, yarn_beta_fast, yarn_beta_slow;
    int yarn_orig_max_pos;
    bool yarn_truncate;
    float swiglu_limit;       /* 7.0 */
    float swiglu_alpha;       /* 1.702 */
    int max_position;         /* max_position_embeddings */
    int eos[RN_MAX_EOS];      /* generation_config eos ids (config's when absent) */
    int neos;
    int pad_id;
    bool tie_embeddings;      /* tie_word_embeddings: lm_head may be absent (= embed) */
};

/* ------------------------------------------------------------ weights */

/* A weight as mapped from the HF-canonical checkpoint (dtype F16, BF16 or
 * F32 as the files hold it; the engine converts once when uploading). */
struct rn_tensor {
    const void *data;         /* mmap'd, read-only; NULL when absent and optional */
    enum dq_dtype dtype;
    int ndim;
    uint64_t shape[4];
    uint64_t nbytes;
    const char *name;         /* borrowed from the model */
    const struct dq_tensor *src; /* safetensors entry (file, absolute offset) for
                                  * pread-based loading; borrowed; NULL when absent */
};

struct rn_layer {
    struct rn_tensor attn_norm;     /* input_layernorm.weight [H] */
    struct rn_tensor q_w, q_b;      /* [nheads*hd, H], [nheads*hd] */
    struct rn_tensor k_w, k_b;      /* [nkv*hd, H], [nkv*hd] */
    struct rn_tensor v_w, v_b;      /* [nkv*hd, H], [nkv*hd] */
    struct rn_tensor o_w, o_b;      /* [H, nheads*hd], [H] */
    struct rn_tensor sinks;         /* [nheads] */
    struct rn_tensor mlp_norm;      /* post_attention_layernorm.weight [H] */
    struct rn_tensor router_w, router_b; /* [E, H], [E] */
    struct rn_tensor gate_up, gate_up_b; /* [E, H, 2I] (x @ W; gate = even cols), [E, 2I] */
    struct rn_tensor down, down_b;       /* [E, I, H], [E, H] */
};

struct rn_model {
    char *dir;                      /* owned */
    struct rn_config cfg;
    struct rn_tensor embed;         /* model.embed_tokens.weight [V, H] */
    struct rn_tensor final_norm;    /* model.norm.weight [H] */
    struct rn_tensor lm_head;       /* lm_head.weight [V, H] */
    struct rn_layer *layers;        /* owned; [nlayers] */
    void *priv;                     /* owned: mappings, index */
};

/* Opens MODEL (a directory holding an HF-canonical gpt-oss checkpoint, usually
 * a bnbfs mount): reads the config, maps every weight, checks names, dtypes
 * and shapes. One clear error line naming the file/tensor and -errno on
 * failure. */
int rn_model_open(const char *dir, struct rn_model **out);
void rn_model_close(struct rn_model *m);
/* Touches every mapped byte from several threads with large reads so a cold
 * bnbfs mount is read at its throughput; progress (bytes, GB/s, ETA) on
 * stderr when it is a terminal (or when progress is true). */
int rn_model_prefetch(struct rn_model *m, unsigned nthreads, bool progress);

/* ------------------------------------------------------------- engine */

struct rn_engine_opts {
    int device;               /* CUDA device index */
    uint64_t vram_budget;     /* bytes; 0 = card's free memory less a margin */
    int max_context;          /* KV cache positions; 0 = default (8192, capped by config) */
    bool no_graphs;           /* disable CUDA graphs (debugging) */
    int expert_slots;         /* tests: force the 24 GB mode with this many expert
                               * slots in the GPU cache; 0 = decide from the budget */
    bool progress;            /* loading progress on stderr even when not a terminal */
    bool expert_nocache;      /* benchmarks: in the 24 GB mode every expert use is a miss
                               * (measures the copy path whatever the routing) */
    const char *expert_source;/* 24 GB mode: the bitsandbytes 4-bit checkpoint behind the
                               * model dir's experts; misses are then dequantized on the GPU
                               * from its 4-bit data (bit-identical to the F16 files). NULL:
                               * ask the model dir (a bnbfs mount names its source in the
                               * user.bnbfs.source xattr of its root); "": none, the F16
                               * experts of the model dir go over PCIe */
    int expert_store;         /* enum rn_expert_store: where the 24 GB mode keeps what
                               * the cache lacks; 0 = the fastest that fits the budget
                               * (tests and benchmarks force a tier) */
};

/* Where the 24 GB mode keeps the experts that are not in the GPU cache. */
enum rn_expert_store {
    RN_STORE_RESIDENT = 0,    /* no cache: every expert is on the GPU */
    RN_STORE_F16_HOST,        /* F16 in host memory; a miss copies 50 MB over PCIe */
    RN_STORE_Q4_HOST,         /* 4-bit in pinned host memory; a miss copies ~13 MB, the
                               * GPU dequantizes it into the slot */
    RN_STORE_Q4_GPU,          /* 4-bit on the GPU; a miss is a dequantization kernel */
};
/* "resident", "f16-host", "q4-host", "q4-gpu" (and "auto" = RN_STORE_RESIDENT
 * when parsing an --expert-store request); -EINVAL for anything else. */
const char *rn_expert_store_name(enum rn_expert_store s);
int rn_expert_store_parse(const char *s, enum rn_expert_store *out);

struct rn_engine_stats {
    double load_s;            /* weights uploaded / prepared */
    uint64_t prefill_tokens, decode_tokens;
    double prefill_s, decode_s;
    uint64_t expert_hits, expert_misses; /* 24 GB mode; 0/0 when fully resident */
    uint64_t bytes_moved;     /* host->device expert bytes since start */
    uint64_t bytes_dequant;   /* F16 expert bytes the GPU dequantized into slots */
    enum rn_expert_store store;
    bool resident;            /* every weight on the GPU */
    int expert_slots;         /* 24 GB mode: experts the GPU cache holds (0 when resident) */
    uint64_t vram_bytes;      /* the engine's device allocation */
};

struct rn_engine;

/* -ENODEV (with a clear message) when no usable GPU; -ENOMEM when even the
 * non-expert weights do not fit the budget. */
int rn_engine_new(const struct rn_model *m, const struct rn_engine_opts *o, struct rn_engine **out);
void rn_engine_free(struct rn_engine *e);
/* Runs ids[0..n) at positions pos()..pos()+n, appending to the KV cache, and
 * writes the fp32 logits of the last position to logits[vocab] (when not
 * NULL; see rn_engine_last_logits). */
int rn_engine_forward(struct rn_engine *e, const int32_t *ids, int n, float *logits);
/* rn_engine_forward, then the greedy pick of the last position on the GPU:
 * *id = the lowest id among the largest finite logits, exactly what
 * rn_sampler_pick picks at temperature 0 (NaN and +-inf never; -1 when no
 * logit is finite). Only the 4-byte id comes back unless logits is not
 * NULL; with logits NULL, rn_engine_last_logits returns NULL until a
 * forward that brings the logits back. */
int rn_engine_forward_pick(struct rn_engine *e, const int32_t *ids, int n, float *logits,
                           int32_t *id);
int rn_engine_pos(const struct rn_engine *e);
/* The fp32 logits [vocab] of the last forward (pinned host memory owned by
 * the engine, valid until the next forward): lets a caller that passed
 * logits == NULL to rn_engine_forward skip a copy. NULL after a
 * rn_engine_forward_pick that left the logits on the GPU. */
const float *rn_engine_last_logits(const struct rn_engine *e);
/* Forget KV positions >= pos (to re-run a changed tail of a chat). */
int rn_engine_truncate(struct rn_engine *e, int pos);
void rn_engine_get_stats(const struct rn_engine *e, struct rn_engine_stats *s);

#ifdef __cplusplus
}
#endif
#endif
