/* llm_model_check.c — opens a model directory with rn_model_open (CPU only)
 * and prints what config.json and generation_config.json gave as one JSON
 * object; with --prefetch, reads every weight with rn_model_prefetch and
 * reports the bytes the process read (from /proc/self/io), so tests can
 * check the prefetch reads the whole checkpoint. For tests and benchmarks
 * (cold-mount read throughput); users have `bnbfs-run MODEL --check`.
 *
 *   llm-model-check MODEL [--prefetch] [--threads N] [--progress]
 * Exit 0, or 1 after the loader's error line.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runner.h"

static uint64_t rchar(void)
{
    FILE *f = fopen("/proc/self/io", "r");
    char line[128];
    uint64_t v = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "rchar: %" SCNu64, &v) == 1)
            break;
    if (f)
        fclose(f);
    return v;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    bool prefetch = false, progress = false;
    unsigned threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--prefetch"))
            prefetch = true;
        else if (!strcmp(argv[i], "--progress"))
            progress = true;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (unsigned)atoi(argv[++i]);
        else if (argv[i][0] != '-' && !dir)
            dir = argv[i];
        else {
            fprintf(stderr, "usage: llm-model-check MODEL [--prefetch] [--threads N] "
                            "[--progress]\n");
            return 1;
        }
    }
    if (!dir) {
        fprintf(stderr, "usage: llm-model-check MODEL [--prefetch] [--threads N] [--progress]\n");
        return 1;
    }
    struct rn_model *m;
    if (rn_model_open(dir, &m))
        return 1;
    const struct rn_config *c = &m->cfg;
    printf("{\"layers\": %d, \"hidden\": %d, \"intermediate\": %d, \"experts\": %d, \"topk\": %d, "
           "\"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"vocab\": %d, "
           "\"sliding_window\": %d, \"rms_eps\": %.9g, \"rope_theta\": %.17g, "
           "\"swiglu_limit\": %.9g, \"swiglu_alpha\": %.9g, \"max_position\": %d, \"sliding\": [",
           c->nlayers, c->hidden, c->intermediate, c->nexperts, c->topk, c->nheads, c->nkv,
           c->head_dim, c->vocab, c->sliding_window, c->rms_eps, c->rope_theta, c->swiglu_limit,
           c->swiglu_alpha, c->max_position);
    for (int l = 0; l < c->nlayers; l++)
        printf("%s%s", l ? ", " : "", c->sliding[l] ? "true" : "false");
    printf("], \"yarn\": ");
    if (c->yarn)
        printf("{\"factor\": %.17g, \"beta_fast\": %.17g, \"beta_slow\": %.17g, "
               "\"original_max_position_embeddings\": %d, \"truncate\": %s}",
               c->yarn_factor, c->yarn_beta_fast, c->yarn_beta_slow, c->yarn_orig_max_pos,
               c->yarn_truncate ? "true" : "false");
    else
        printf("null");
    printf(", \"eos\": [");
    for (int i = 0; i < c->neos; i++)
        printf("%s%d", i ? ", " : "", c->eos[i]);
    printf("], \"pad\": %d, \"dtype\": \"%s\"", c->pad_id, dq_dtype_name(m->embed.dtype));
    int rc = 0;
    if (prefetch) {
        uint64_t r0 = rchar();
        double t0 = now_s();
        rc = rn_model_prefetch(m, threads, progress) ? 1 : 0;
        double dt = now_s() - t0;
        printf(", \"prefetch_bytes\": %" PRIu64 ", \"prefetch_s\": %.3f", rchar() - r0, dt);
    }
    printf("}\n");
    rn_model_close(m);
    return rc;
}
