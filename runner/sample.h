/* sample.h — choosing the next token from logits (private to runner/).
 *
 * Temperature (0 = greedy argmax), top-k, top-p (nucleus) and a seeded PRNG,
 * so a run with the same seed, options and logits picks the same tokens on
 * every machine (plain C arithmetic, no libm, no FMA contraction).
 *
 * The PRNG is xoshiro256** (Blackman and Vigna, 2018), its 256-bit state
 * filled from the 64-bit seed by splitmix64; a uniform double in [0, 1) is
 * the top 53 bits of one output times 2^-53. Each non-greedy pick draws
 * exactly one number.
 *
 * Candidates: every token with a finite logit, or with top-k the k largest
 * logits (ties keep the lower id). Weights w_i = exp(max(-87, (l_i - max) *
 * (float)(1/T))) in float (Cephes' polynomial, relative error < 1e-7),
 * summed in double. Sums, in this order:
 *  - top-k: sequentially in ascending id;
 *  - whole vocab: per block of 64 ids, eight double lanes (lane j adds ids
 *    j, j+8, ...; lanes combined as ((0+1)+(2+3))+((4+5)+(6+7))), then the
 *    block sums sequentially.
 * Top-p then keeps the shortest prefix of the candidates sorted by weight
 * (descending; ties by lower id) whose sequential sum reaches top_p of the
 * total (the whole vocab is first filtered to w >= 0.5 (1 - top_p) total /
 * vocab, which cannot drop a nucleus member). The draw u * total walks the
 * kept candidates in that order and picks the first whose running sum
 * exceeds it; with top-p off and the whole vocab, it first skips whole
 * blocks by their sums. Non-finite logits (NaN, +-inf) are never picked.
 * tests/test_runner_cli.py re-implements this and checks it id for id.
 */
#ifndef BNBFS_RN_SAMPLE_H
#define BNBFS_RN_SAMPLE_H

#include <stdint.h>

struct rn_rng {
    uint64_t s[4];
};
void rn_rng_seed(struct rn_rng *r, uint64_t seed);
uint64_t rn_rng_next(struct rn_rng *r);
double rn_rng_uniform(struct rn_rng *r);   /* [0, 1), 53 random bits */

struct rn_sample_opts {
    double temperature;         /* 0 = greedy; finite, >= 0 */
    double top_p;               /* (0, 1]; 1 = off */
    int top_k;                  /* 0 = off */
    uint64_t seed;
};

struct rn_sampler;

/* n_vocab: the length of every logits vector passed to rn_sampler_pick.
 * -EINVAL for options outside the ranges above, -ENOMEM. */
int rn_sampler_new(int n_vocab, const struct rn_sample_opts *o, struct rn_sampler **out);
void rn_sampler_free(struct rn_sampler *s);
/* Picks a token id in [0, n_vocab). -EDOM when no logit is finite. Not
 * thread-safe per sampler. */
int rn_sampler_pick(struct rn_sampler *s, const float *logits, int32_t *id);

#endif
