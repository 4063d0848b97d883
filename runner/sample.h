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
 * logits (ties keep the lower id). Weights w_i = exp((l_i - max) / T) in
 * float (a fixed polynomial, relative error < 3e-7), summed in double.
 * Top-p then keeps the shortest prefix of the candidates sorted by weight
 * (descending; ties by lower id) whose weight reaches top_p of the total.
 * The draw u * total walks the kept candidates in that order (ascending id
 * when top-p is off) and picks where the running sum passes it.
 * Non-finite logits (NaN, +-inf) are never picked.
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
