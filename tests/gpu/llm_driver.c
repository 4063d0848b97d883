/* llm_driver.c — a small program over librn + the CUDA engine for the GPU
 * correctness tests (tests/test_runner_gpu.py) and the runner benchmark
 * (tests/bench/bench_runner.py): exact control over how tokens are fed
 * (one prefill, pieces, or one token at a time), greedy generation,
 * float32 logits out, timed prefill/decode runs and the card's measured
 * memory bandwidth. Not a user tool: bnbfs-run is.
 *
 *   llm-driver MODEL --ids "1 2 3" [--feed K | --stepwise] [--greedy N]
 *              [--logits FILE] [--vram-budget SIZE] [--expert-slots N]
 *              [--max-context N] [--no-graphs] [--device D] [--progress]
 *              [--expert-nocache] [--expert-store auto|f16-host|q4-host|q4-gpu]
 *              [--expert-source DIR]
 *   llm-driver MODEL --bench-prefill N [--bench-decode P:G] [--repeat R] [--bandwidth]
 *              [--host-pick]
 *   llm-driver --pick-selftest
 *
 * Greedy picks (--greedy) use bnbfs-run's sampler at temperature 0 on the
 * logits; the engine's GPU pick of the same logits (rn_engine_forward_pick)
 * is compared with it at every step ("pick_mismatches"). The timed decode
 * loop picks as bnbfs-run does at temperature 0: on the GPU (4 bytes back
 * a token), or with --host-pick through the sampler on the engine's pinned
 * logits (to compare). --pick-selftest runs kn_llm_argmax on crafted logits
 * (ties, -0/+0, NaN, +-inf, denormals, odd lengths) against the sampler.
 * Logits rows (float32, vocab each): one per forward call (the last
 * position of each piece; every position with --stepwise), then one after
 * each generated token but the last — as tests/ref/gptoss_ref.py writes.
 * Prints one JSON object on stdout. Exit 0, or 1 with one error line; 77
 * (skip) with "no GPU: ..." when there is no CUDA device.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "runner.h"
#include "llm.h"
#include "sample.h"

struct args {
    const char *model, *ids, *logits, *expert_source;
    enum rn_expert_store expert_store;
    int feed, greedy, max_context, expert_slots, device, repeat;
    bool stepwise, no_graphs, progress, bandwidth, nocache, host_pick, pick_selftest;
    uint64_t vram_budget;
    int bench_prefill, bench_p, bench_g;
    uint64_t seed;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int die(const char *msg, const char *arg)
{
    fprintf(stderr, "llm-driver: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    return 1;
}

static int parse_ids(const char *s, int32_t **out, int *n)
{
    int cap = 16, k = 0;
    int32_t *v = malloc((size_t)cap * sizeof *v);
    while (v && *s) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (end == s)
            break;
        if (errno || x < 0 || x > INT32_MAX) {
            free(v);
            return -EINVAL;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (size_t)(cap *= 2) * sizeof *v);
            if (!nv) {
                free(v);
                return -ENOMEM;
            }
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = end;
    }
    if (!v)
        return -ENOMEM;
    *out = v;
    *n = k;
    return 0;
}

/* Greedy picks go through bnbfs-run's sampler at temperature 0 (its
 * vectorized argmax: lowest id among equal largest finite logits), so the
 * timed decode loop costs what bnbfs-run's does (a scalar loop took ~0.2 ms
 * a token over 201k logits). */
static struct rn_sampler *greedy_new(int V)
{
    const struct rn_sample_opts o = {.temperature = 0, .top_p = 1, .top_k = 0, .seed = 1};
    struct rn_sampler *s = NULL;
    return rn_sampler_new(V, &o, &s) ? NULL : s;
}

static int32_t greedy(struct rn_sampler *s, const float *logits)
{
    int32_t id = 0;
    return rn_sampler_pick(s, logits, &id) ? 0 : id;
}

static bool all_finite(const float *x, int n)
{
    for (int i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return false;
    return true;
}

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9e3779b97f4a7c15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Device-to-device copy bandwidth, bytes read + written per second. */
static double measure_bandwidth(void)
{
    const size_t n = 1ull << 30;
    void *a = NULL, *b = NULL;
    if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess) {
        cudaFree(a);
        return 0;
    }
    cudaMemset(a, 1, n);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double t[10];
    for (int r = -2; r < 10; r++) {
        cudaEventRecord(e0, 0);
        cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (r >= 0)
            t[r] = ms * 1e-3;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * (double)n / median(t, 10);
}

/* Pinned host-to-device copy bandwidth (the 24 GB mode's expert path). */
static double measure_h2d(void)
{
    const size_t n = 1ull << 30;
    void *h = NULL, *d = NULL;
    if (cudaHostAlloc(&h, n, cudaHostAllocDefault) != cudaSuccess)
        return 0;
    if (cudaMalloc(&d, n) != cudaSuccess) {
        cudaFreeHost(h);
        return 0;
    }
    memset(h, 1, n);
    double t[5];
    for (int r = -1; r < 5; r++) {
        double t0 = now_s();
        cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
        if (r >= 0)
            t[r] = now_s() - t0;
    }
    cudaFree(d);
    cudaFreeHost(h);
    return (double)n / median(t, 5);
}

/* Bytes a decode step reads at position pos: every non-expert layer weight,
 * topk experts per layer, lm_head, one embedding row, and the KV rows
 * attended (fp16). */
static double decode_bytes(const struct rn_model *m, int pos, double *weights_only)
{
    const struct rn_config *c = &m->cfg;
    double w = (double)m->lm_head.nbytes + (double)m->final_norm.nbytes +
               (double)m->embed.nbytes / c->vocab;
    double kv = 0;
    for (int l = 0; l < c->nlayers; l++) {
        const struct rn_layer *L = &m->layers[l];
        const struct rn_tensor *ts[] = {&L->attn_norm, &L->q_w, &L->q_b, &L->k_w, &L->k_b,
                                        &L->v_w, &L->v_b, &L->o_w, &L->o_b, &L->sinks,
                                        &L->mlp_norm, &L->router_w, &L->router_b};
        for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
            w += (double)ts[i]->nbytes;
        w += (double)c->topk / c->nexperts *
             (double)(L->gate_up.nbytes + L->gate_up_b.nbytes + L->down.nbytes + L->down_b.nbytes);
        int span = pos + 1;
        if (c->sliding[l] && span > c->sliding_window)
            span = c->sliding_window;
        kv += 2.0 * span * c->nkv * c->head_dim * 2;
    }
    *weights_only = w;
    return w + kv;
}

static void print_stats(const struct rn_engine *e)
{
    struct rn_engine_stats s;
    rn_engine_get_stats(e, &s);
    printf("\"stats\": {\"load_s\": %.3f, \"prefill_tokens\": %" PRIu64 ", \"prefill_s\": %.6f, "
           "\"decode_tokens\": %" PRIu64 ", \"decode_s\": %.6f, \"expert_hits\": %" PRIu64
           ", \"expert_misses\": %" PRIu64 ", \"bytes_moved\": %" PRIu64 ", \"resident\": %s, "
           "\"expert_slots\": %d, \"vram_bytes\": %" PRIu64 ", \"bytes_dequant\": %" PRIu64
           ", \"store\": \"%s\"}",
           s.load_s, s.prefill_tokens, s.prefill_s, s.decode_tokens, s.decode_s, s.expert_hits,
           s.expert_misses, s.bytes_moved, s.resident ? "true" : "false", s.expert_slots,
           s.vram_bytes, s.bytes_dequant, rn_expert_store_name(s.store));
}

static int run_ids(const struct args *a, struct rn_model *m, struct rn_engine *e)
{
    const int V = m->cfg.vocab;
    int32_t *ids = NULL;
    int n = 0;
    if (parse_ids(a->ids, &ids, &n) || n == 0)
        return die("--ids: expected space-separated token ids", a->ids);
    float *lg = malloc((size_t)V * sizeof *lg);
    struct rn_sampler *gs = greedy_new(V);
    if (!lg || !gs) {
        free(ids);
        free(lg);
        rn_sampler_free(gs);
        return die("out of memory", NULL);
    }
    FILE *f = a->logits ? fopen(a->logits, "wb") : NULL;
    if (a->logits && !f) {
        free(ids);
        free(lg);
        rn_sampler_free(gs);
        return die("cannot open", a->logits);
    }
    int rc = 0, rows = 0, picks = 0, mismatches = 0;
    int32_t gid = -1;           /* the engine's GPU pick of the last logits */
    const int piece = a->stepwise ? 1 : a->feed > 0 ? a->feed : n;
    for (int i = 0; !rc && i < n; i += piece) {
        const int len = n - i < piece ? n - i : piece;
        if (rn_engine_forward_pick(e, ids + i, len, lg, &gid)) {
            rc = 1;
            break;
        }
        if (!all_finite(lg, V)) {
            fprintf(stderr, "llm-driver: non-finite logits after position %d\n", i + len - 1);
            rc = 1;
        }
        if (f && fwrite(lg, sizeof *lg, (size_t)V, f) != (size_t)V)
            rc = die("write failed", a->logits);
        rows++;
    }
    printf("{\"prompt\": %d, \"rows\": %d, \"generated\": [", n, rows);
    for (int g = 0; !rc && g < a->greedy; g++) {
        int32_t t = greedy(gs, lg);
        picks++;
        if (t != gid) {
            fprintf(stderr, "llm-driver: generated token %d: GPU pick %d, sampler %d\n", g, gid,
                    t);
            mismatches++;
        }
        printf("%s%d", g ? ", " : "", t);
        if (g == a->greedy - 1)
            break;
        if (rn_engine_forward_pick(e, &t, 1, lg, &gid)) {
            rc = 1;
            break;
        }
        if (!all_finite(lg, V)) {
            fprintf(stderr, "llm-driver: non-finite logits at generated token %d\n", g);
            rc = 1;
        }
        if (f && fwrite(lg, sizeof *lg, (size_t)V, f) != (size_t)V)
            rc = die("write failed", a->logits);
    }
    printf("], \"picks\": %d, \"pick_mismatches\": %d, ", picks, mismatches);
    print_stats(e);
    printf("}\n");
    if (f && fclose(f) != 0)
        rc = die("write failed", a->logits);
    rn_sampler_free(gs);
    free(lg);
    free(ids);
    return rc;
}

/* One crafted logits vector: kn_llm_argmax's id (twice: the second launch
 * checks that the first left its scratch clear) against the sampler's
 * temperature-0 pick (-1 for its -EDOM). Returns 1 on a mismatch. */
static int pick_case(const char *name, const float *l, int n, float *d_l, struct kn_pick *d_p)
{
    const struct rn_sample_opts o = {.temperature = 0, .top_p = 1, .top_k = 0, .seed = 1};
    struct rn_sampler *s = NULL;
    int32_t want = -1, got[2] = {-2, -2};
    if (rn_sampler_new(n, &o, &s) || cudaMemcpy(d_l, l, (size_t)n * sizeof *l,
                                                cudaMemcpyHostToDevice) != cudaSuccess) {
        rn_sampler_free(s);
        return die("pick self-test: setup failed", name);
    }
    if (rn_sampler_pick(s, l, &want))
        want = -1;
    rn_sampler_free(s);
    for (int r = 0; r < 2; r++)
        if (kn_llm_argmax(d_l, n, d_p, 0) ||
            cudaMemcpy(&got[r], &d_p->id, sizeof got[r], cudaMemcpyDeviceToHost) != cudaSuccess)
            return die("pick self-test: kernel failed", name);
    if (got[0] == want && got[1] == want)
        return 0;
    fprintf(stderr, "llm-driver: pick self-test %s (n %d): GPU %d then %d, sampler %d\n", name,
            n, got[0], got[1], want);
    return 1;
}

/* kn_llm_argmax against the sampler on vectors that probe its order: ties
 * across blocks, -0 against +0, NaN and +-inf ahead of the maximum, no
 * finite value at all, denormals, lengths that are not multiples of 4. */
static int pick_selftest(int device)
{
    const int V = 201088;
    float *l = malloc((size_t)V * sizeof *l), *d_l = NULL;
    struct kn_pick *d_p = NULL;
    if (!l || cudaSetDevice(device) != cudaSuccess ||
        cudaMalloc((void **)&d_l, (size_t)V * sizeof *l) != cudaSuccess ||
        cudaMalloc((void **)&d_p, sizeof *d_p) != cudaSuccess ||
        cudaMemset(d_p, 0, sizeof *d_p) != cudaSuccess) {
        free(l);
        return die("pick self-test: out of memory", NULL);
    }
    uint64_t seed = 7;
    int cases = 0, bad = 0;
#define CASE(name, n) (cases++, bad += pick_case(name, l, n, d_l, d_p))
    for (int i = 0; i < V; i++)
        l[i] = (float)(rng_next(&seed) % 2000001) * 1e-5f - 10.f;
    CASE("random", V);
    l[199999] = l[150001] = l[70000] = 20.f;
    CASE("ties across blocks", V);
    l[7] = NAN;
    l[8] = INFINITY;
    l[9] = -INFINITY;
    l[200000] = NAN;
    CASE("NaN and +inf before the maximum", V);
    for (int i = 0; i < V; i++)
        l[i] = -1.f;
    l[5000] = 0.f;
    l[3000] = -0.f;
    CASE("-0 before +0", V);
    for (int i = 0; i < V; i++)
        l[i] = 3.f;
    CASE("all equal", V);
    for (int i = 0; i < V; i++)
        l[i] = 0.f;
    l[77] = 1e-45f;             /* the smallest denormal */
    l[78] = -1e-45f;
    CASE("denormal", V);
    for (int i = 0; i < 4096; i++)
        l[i] = -INFINITY;
    l[123] = -3.4028235e38f;
    CASE("one finite among -inf", 4096);
    for (int i = 0; i < 1000; i++)
        l[i] = NAN;
    CASE("no finite value", 1000);
    for (int i = 0; i < 1001; i++)
        l[i] = (float)(i % 97);
    l[1000] = 1000.f;
    CASE("maximum in the tail (n 1001)", 1001);
    l[0] = NAN;
    for (int i = 1; i < 7; i++)
        l[i] = -INFINITY;
    l[6] = -5.f;
    CASE("n 7", 7);
    l[0] = 5.f;
    CASE("n 1", 1);
#undef CASE
    cudaFree(d_l);
    cudaFree(d_p);
    free(l);
    printf("{\"pick_cases\": %d, \"pick_mismatches\": %d}\n", cases, bad);
    return bad ? 1 : 0;
}

static int run_bench(const struct args *a, struct rn_model *m, struct rn_engine *e)
{
    const int V = m->cfg.vocab;
    const int R = a->repeat > 0 ? a->repeat : 3;
    uint64_t seed = a->seed;
    const int maxn = a->bench_prefill > a->bench_p ? a->bench_prefill : a->bench_p;
    int32_t *ids = malloc((size_t)(maxn > 0 ? maxn : 1) * sizeof *ids);
    float *lg = malloc((size_t)V * sizeof *lg);
    double *t = calloc((size_t)R + 1, sizeof *t);
    struct rn_sampler *gs = greedy_new(V);
    if (!ids || !lg || !t || !gs)
        return die("out of memory", NULL);
    for (int i = 0; i < maxn; i++)
        ids[i] = (int32_t)(rng_next(&seed) % (uint64_t)(V < 199998 ? V : 199998));
    int rc = 0;
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, a->device) != cudaSuccess)
        return die("cudaGetDeviceProperties failed", NULL);
    printf("{\"device\": \"%s\", \"sms\": %d, ", prop.name, prop.multiProcessorCount);
    if (a->bandwidth)
        printf("\"bandwidth_copy_Bps\": %.6e, \"h2d_pinned_Bps\": %.6e, ", measure_bandwidth(),
               measure_h2d());
    if (a->bench_prefill > 0) {
        for (int r = -1; r < R && !rc; r++) {       /* r = -1: warm-up */
            rn_engine_truncate(e, 0);
            double t0 = now_s();
            rc = rn_engine_forward(e, ids, a->bench_prefill, lg) ? 1 : 0;
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        if (!rc)
            printf("\"prefill_tokens\": %d, \"prefill_s\": %.6f, \"prefill_tok_s\": %.1f, ",
                   a->bench_prefill, median(t, R), a->bench_prefill / median(t, R));
    }
    if (a->bench_g > 0 && !rc) {
        struct rn_engine_stats s0 = {0}, s1 = {0};
        for (int r = -1; r < R && !rc; r++) {
            rn_engine_truncate(e, 0);
            int32_t tok = -1;
            rc = rn_engine_forward_pick(e, ids, a->bench_p, NULL, a->host_pick ? NULL : &tok)
                     ? 1 : 0;
            rn_engine_get_stats(e, &s0);
            double t0 = now_s();
            /* Greedy as bnbfs-run decodes at temperature 0: the GPU's pick,
             * 4 bytes back a token; --host-pick: the sampler on the engine's
             * pinned logits, 804 KB back a token (the comparison). */
            for (int g = 0; g < a->bench_g && !rc; g++) {
                if (a->host_pick) {
                    tok = greedy(gs, rn_engine_last_logits(e));
                    rc = rn_engine_forward(e, &tok, 1, NULL) ? 1 : 0;
                } else {
                    rc = tok < 0 || rn_engine_forward_pick(e, &tok, 1, NULL, &tok) ? 1 : 0;
                }
            }
            if (r >= 0)
                t[r] = now_s() - t0;
            rn_engine_get_stats(e, &s1);
        }
        /* Expert traffic and the time inside rn_engine_forward (engine
         * alone, without the host's pick) of the last timed decode run. */
        printf("\"decode_moved_per_token\": %.6e, \"decode_dequant_per_token\": %.6e, "
               "\"decode_hits\": %" PRIu64
               ", \"decode_misses\": %" PRIu64 ", \"decode_engine_s_per_token\": %.6e, ",
               (double)(s1.bytes_moved - s0.bytes_moved) / a->bench_g,
               (double)(s1.bytes_dequant - s0.bytes_dequant) / a->bench_g,
               s1.expert_hits - s0.expert_hits, s1.expert_misses - s0.expert_misses,
               (s1.decode_s - s0.decode_s) / a->bench_g);
        if (!rc) {
            double w = 0, b = 0;
            for (int p = a->bench_p; p < a->bench_p + a->bench_g; p++)
                b += decode_bytes(m, p, &w);
            b /= a->bench_g;
            printf("\"decode_prompt\": %d, \"decode_tokens\": %d, \"decode_s\": %.6f, "
                   "\"decode_tok_s\": %.2f, \"decode_bytes_per_token\": %.6e, "
                   "\"decode_weight_bytes_per_token\": %.6e, \"decode_pick\": \"%s\", ",
                   a->bench_p, a->bench_g, median(t, R), a->bench_g / median(t, R), b, w,
                   a->host_pick ? "host" : "gpu");
        }
    }
    print_stats(e);
    printf("}\n");
    rn_sampler_free(gs);
    free(ids);
    free(lg);
    free(t);
    return rc;
}

int main(int argc, char **argv)
{
    struct args a = {.seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) return die("missing value for", s); i++; } while (0)
        if (!strcmp(s, "--ids")) { NEEDV(); a.ids = v; }
        else if (!strcmp(s, "--feed")) { NEEDV(); a.feed = atoi(v); }
        else if (!strcmp(s, "--stepwise")) a.stepwise = true;
        else if (!strcmp(s, "--greedy")) { NEEDV(); a.greedy = atoi(v); }
        else if (!strcmp(s, "--logits")) { NEEDV(); a.logits = v; }
        else if (!strcmp(s, "--vram-budget")) {
            NEEDV();
            if (dq_parse_size(v, &a.vram_budget))
                return die("bad size", v);
        }
        else if (!strcmp(s, "--expert-slots")) { NEEDV(); a.expert_slots = atoi(v); }
        else if (!strcmp(s, "--max-context")) { NEEDV(); a.max_context = atoi(v); }
        else if (!strcmp(s, "--device")) { NEEDV(); a.device = atoi(v); }
        else if (!strcmp(s, "--no-graphs")) a.no_graphs = true;
        else if (!strcmp(s, "--expert-nocache")) a.nocache = true;
        else if (!strcmp(s, "--expert-source")) { NEEDV(); a.expert_source = v; }
        else if (!strcmp(s, "--expert-store")) {
            NEEDV();
            if (rn_expert_store_parse(v, &a.expert_store))
                return die("--expert-store: expected auto, f16-host, q4-host or q4-gpu", v);
        }
        else if (!strcmp(s, "--progress")) a.progress = true;
        else if (!strcmp(s, "--bandwidth")) a.bandwidth = true;
        else if (!strcmp(s, "--host-pick")) a.host_pick = true;
        else if (!strcmp(s, "--pick-selftest")) a.pick_selftest = true;
        else if (!strcmp(s, "--repeat")) { NEEDV(); a.repeat = atoi(v); }
        else if (!strcmp(s, "--seed")) { NEEDV(); a.seed = strtoull(v, NULL, 10); }
        else if (!strcmp(s, "--bench-prefill")) { NEEDV(); a.bench_prefill = atoi(v); }
        else if (!strcmp(s, "--bench-decode")) {
            NEEDV();
            if (sscanf(v, "%d:%d", &a.bench_p, &a.bench_g) != 2 || a.bench_p < 2 || a.bench_g < 1)
                return die("--bench-decode: expected PROMPT:GENERATED (prompt >= 2)", v);
        }
        else if (s[0] == '-') return die("unknown option", s);
        else if (!a.model) a.model = s;
        else return die("unexpected argument", s);
#undef NEEDV
    }
    if (!a.pick_selftest && (!a.model || (!a.ids && !a.bench_prefill && !a.bench_g)))
        return die("usage: llm-driver MODEL (--ids \"...\" | --bench-prefill N | "
                   "--bench-decode P:G) [options] | --pick-selftest", NULL);
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("no GPU: no CUDA device\n");
        return 77;
    }
    if (a.pick_selftest)
        return pick_selftest(a.device);
    struct rn_model *m;
    if (rn_model_open(a.model, &m))
        return 1;
    struct rn_engine_opts eo = {.device = a.device, .vram_budget = a.vram_budget,
                                .max_context = a.max_context, .no_graphs = a.no_graphs,
                                .expert_slots = a.expert_slots, .progress = a.progress,
                                .expert_nocache = a.nocache,
                                .expert_source = a.expert_source,
                                .expert_store = (int)a.expert_store};
    struct rn_engine *e;
    double t0 = now_s();
    if (rn_engine_new(m, &eo, &e)) {
        rn_model_close(m);
        return 1;
    }
    fprintf(stderr, "llm-driver: engine ready in %.2f s\n", now_s() - t0);
    int rc = a.ids ? run_ids(&a, m, e) : run_bench(&a, m, e);
    rn_engine_free(e);
    rn_model_close(m);
    return rc;
}
