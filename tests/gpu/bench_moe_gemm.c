/* bench_moe_gemm.c — diagnostic: the prefill expert GEMMs of one gpt-oss
 * layer (32 experts, ~256 grouped rows each for a 2048-token chunk, top-4),
 * timed as the engine issues them (cublasGemmEx, 4 side streams) and with
 * each of cuBLASLt's heuristic algorithms, so the engine can pick by
 * measurement. Prints one JSON object.
 *
 *   bench-moe-gemm [--rows 256] [--reps 20] [--algos 8]
 *
 * Shapes (column-major view of x @ W, as runner/engine.c): gate_up
 * C[2I, m] fp16 = W[2I, H] X[H, m]; down C[H, m] fp32 = W[H, I] A[I, m].
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* cublasLt.h declares one function without a prototype */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <cublasLt.h>
#pragma GCC diagnostic pop
#include <cublas_v2.h>

#include "kn_prog.h"

#define NE 32
#define NS 4
#define H 2880
#define I 2880

#define BLAS(call)                                                                            \
    do {                                                                                      \
        cublasStatus_t s_ = (call);                                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                    \
            fprintf(stderr, "%s:%d: %s: status %d\n", __FILE__, __LINE__, #call, (int)s_);    \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

typedef uint16_t half_t;

static void fill_half(half_t *d, size_t n, uint64_t seed)
{
    _Float16 *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) {
        const double u = (double)(kn_prog_splitmix(&seed) >> 11) / 9007199254740992.0;
        h[i] = (_Float16)((u - 0.5) * 0.1);
    }
    KN_PROG_CUDA(cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice));
    free(h);
}

struct lt_shape {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulHeuristicResult_t res[32];
    int nres;
};

static void lt_shape_init(cublasLtHandle_t lt, struct lt_shape *s, int N, int m, int K,
                          cudaDataType_t ct, size_t ws, int want)
{
    BLAS(cublasLtMatmulDescCreate(&s->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    BLAS(cublasLtMatrixLayoutCreate(&s->a, CUDA_R_16F, N, K, N));
    BLAS(cublasLtMatrixLayoutCreate(&s->b, CUDA_R_16F, K, m, K));
    BLAS(cublasLtMatrixLayoutCreate(&s->c, ct, N, m, N));
    cublasLtMatmulPreference_t pref;
    BLAS(cublasLtMatmulPreferenceCreate(&pref));
    BLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                              sizeof ws));
    BLAS(cublasLtMatmulAlgoGetHeuristic(lt, s->desc, s->a, s->b, s->c, s->c, pref, want, s->res,
                                        &s->nres));
    cublasLtMatmulPreferenceDestroy(pref);
}

static void lt_shape_free(struct lt_shape *s)
{
    cublasLtMatrixLayoutDestroy(s->a);
    cublasLtMatrixLayoutDestroy(s->b);
    cublasLtMatrixLayoutDestroy(s->c);
    cublasLtMatmulDescDestroy(s->desc);
}

int main(int argc, char **argv)
{
    int rows = 256, reps = 20, want = 8;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rows"))
            rows = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--algos"))
            want = atoi(argv[i + 1]);
    }
    if (want > 32)
        want = 32;
    /* per-expert rows: rows +- up to 40%, fixed seed, total NE*rows */
    int m[NE], off[NE + 1];
    uint64_t seed = 7;
    off[0] = 0;
    for (int x = 0; x < NE; x++) {
        const double u = (double)(kn_prog_splitmix(&seed) >> 11) / 9007199254740992.0;
        m[x] = (int)(rows * (0.6 + 0.8 * u));
        off[x + 1] = off[x] + m[x];
    }
    const int R = off[NE];
    half_t *Wgu, *Wdn, *X, *GU, *A;
    float *Y;
    KN_PROG_CUDA(cudaMalloc((void **)&Wgu, (size_t)NE * H * 2 * I * sizeof(half_t)));
    KN_PROG_CUDA(cudaMalloc((void **)&Wdn, (size_t)NE * I * H * sizeof(half_t)));
    KN_PROG_CUDA(cudaMalloc((void **)&X, (size_t)R * H * sizeof(half_t)));
    KN_PROG_CUDA(cudaMalloc((void **)&GU, (size_t)R * 2 * I * sizeof(half_t)));
    KN_PROG_CUDA(cudaMalloc((void **)&A, (size_t)R * I * sizeof(half_t)));
    KN_PROG_CUDA(cudaMalloc((void **)&Y, (size_t)R * H * sizeof(float)));
    fill_half(Wgu, (size_t)NE * H * 2 * I, 1);
    fill_half(Wdn, (size_t)NE * I * H, 2);
    fill_half(X, (size_t)R * H, 3);
    fill_half(A, (size_t)R * I, 4);

    cudaStream_t st[NS];
    cublasHandle_t bh[NS];
    const size_t wsb = 32u << 20;
    void *ws[NS];
    for (int i = 0; i < NS; i++) {
        KN_PROG_CUDA(cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking));
        BLAS(cublasCreate(&bh[i]));
        BLAS(cublasSetStream(bh[i], st[i]));
        KN_PROG_CUDA(cudaMalloc(&ws[i], wsb));
    }
    cublasLtHandle_t lt;
    BLAS(cublasLtCreate(&lt));
    cudaStream_t main_st;
    KN_PROG_CUDA(cudaStreamCreateWithFlags(&main_st, cudaStreamNonBlocking));
    cudaEvent_t t0, t1, fork, join[NS];
    KN_PROG_CUDA(cudaEventCreate(&t0));
    KN_PROG_CUDA(cudaEventCreate(&t1));
    KN_PROG_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int i = 0; i < NS; i++)
        KN_PROG_CUDA(cudaEventCreateWithFlags(&join[i], cudaEventDisableTiming));

    /* Lt heuristics per expert (m differs) */
    static struct lt_shape sg[NE], sd[NE];
    int nalg = want;
    for (int x = 0; x < NE; x++) {
        lt_shape_init(lt, &sg[x], 2 * I, m[x], H, CUDA_R_16F, wsb, want);
        lt_shape_init(lt, &sd[x], H, m[x], I, CUDA_R_32F, wsb, want);
        if (sg[x].nres < nalg)
            nalg = sg[x].nres;
        if (sd[x].nres < nalg)
            nalg = sd[x].nres;
    }
    const double flop = 2.0 * R * ((double)H * 2 * I + (double)I * H);
    const double wbytes = (double)NE * (H * 2.0 * I + I * (double)H) * 2;
    const float one = 1.f, zero = 0.f;
    printf("{\"rows\": %d, \"R\": %d, \"layer_gflop\": %.1f, \"layer_weight_gb\": %.3f", rows, R,
           flop * 1e-9, wbytes * 1e-9);
    /* method -1: cublasGemmEx (the engine); method k >= 0: Lt algo k of
     * each expert's heuristic list (gate_up and down alike) */
    for (int meth = -1; meth < nalg; meth++) {
        float best = 1e30f, sum = 0.f;
        int okrun = 1;
        for (int r = 0; r < reps + 2 && okrun; r++) {
            KN_PROG_CUDA(cudaEventRecord(t0, main_st));
            KN_PROG_CUDA(cudaEventRecord(fork, main_st));
            for (int i = 0; i < NS; i++)
                KN_PROG_CUDA(cudaStreamWaitEvent(st[i], fork, 0));
            long load[NS] = {0};
            for (int x = 0; x < NE; x++) {
                int si = 0;
                for (int i = 1; i < NS; i++)
                    if (load[i] < load[si])
                        si = i;
                load[si] += m[x];
                const half_t *wg = Wgu + (size_t)x * H * 2 * I, *wd = Wdn + (size_t)x * I * H;
                const half_t *xx = X + (size_t)off[x] * H, *aa = A + (size_t)off[x] * I;
                half_t *gu = GU + (size_t)off[x] * 2 * I;
                float *y = Y + (size_t)off[x] * H;
                if (meth < 0) {
                    BLAS(cublasGemmEx(bh[si], CUBLAS_OP_N, CUBLAS_OP_N, 2 * I, m[x], H, &one, wg,
                                      CUDA_R_16F, 2 * I, xx, CUDA_R_16F, H, &zero, gu,
                                      CUDA_R_16F, 2 * I, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
                    BLAS(cublasGemmEx(bh[si], CUBLAS_OP_N, CUBLAS_OP_N, H, m[x], I, &one, wd,
                                      CUDA_R_16F, H, aa, CUDA_R_16F, I, &zero, y, CUDA_R_32F, H,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
                } else {
                    cublasStatus_t s1 = cublasLtMatmul(
                        lt, sg[x].desc, &one, wg, sg[x].a, xx, sg[x].b, &zero, gu, sg[x].c, gu,
                        sg[x].c, &sg[x].res[meth].algo, ws[si], wsb, st[si]);
                    cublasStatus_t s2 = cublasLtMatmul(
                        lt, sd[x].desc, &one, wd, sd[x].a, aa, sd[x].b, &zero, y, sd[x].c, y,
                        sd[x].c, &sd[x].res[meth].algo, ws[si], wsb, st[si]);
                    if (s1 != CUBLAS_STATUS_SUCCESS || s2 != CUBLAS_STATUS_SUCCESS)
                        okrun = 0;
                }
            }
            for (int i = 0; i < NS; i++) {
                KN_PROG_CUDA(cudaEventRecord(join[i], st[i]));
                KN_PROG_CUDA(cudaStreamWaitEvent(main_st, join[i], 0));
            }
            KN_PROG_CUDA(cudaEventRecord(t1, main_st));
            KN_PROG_CUDA(cudaEventSynchronize(t1));
            float ms;
            KN_PROG_CUDA(cudaEventElapsedTime(&ms, t0, t1));
            if (r >= 2) {
                sum += ms;
                if (ms < best)
                    best = ms;
            }
        }
        if (!okrun) {
            printf(", \"%s%d\": \"failed\"", meth < 0 ? "gemmex" : "lt", meth);
            continue;
        }
        const float mean = sum / reps;
        printf(", \"%s%d\": {\"mean_ms\": %.4f, \"best_ms\": %.4f, \"tflops\": %.1f, "
               "\"weight_tbs\": %.2f}",
               meth < 0 ? "gemmex" : "lt", meth < 0 ? 0 : meth, mean, best, flop / mean * 1e-9,
               wbytes / mean * 1e-9);
        fflush(stdout);
    }
    /* which tiles the heuristic offers for the middle expert */
    printf(", \"gate_up_algos\": [");
    for (int k = 0; k < sg[NE / 2].nres; k++) {
        int tile = -1, splitk = -1, stages = -1;
        size_t w;
        cublasLtMatmulAlgoConfigGetAttribute(&sg[NE / 2].res[k].algo, CUBLASLT_ALGO_CONFIG_TILE_ID,
                                             &tile, sizeof tile, &w);
        cublasLtMatmulAlgoConfigGetAttribute(&sg[NE / 2].res[k].algo,
                                             CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                             sizeof splitk, &w);
        cublasLtMatmulAlgoConfigGetAttribute(&sg[NE / 2].res[k].algo,
                                             CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                             sizeof stages, &w);
        printf("%s[%d, %d, %d, %.3g]", k ? ", " : "", tile, splitk, stages,
               (double)sg[NE / 2].res[k].wavesCount);
    }
    printf("]}\n");
    for (int x = 0; x < NE; x++) {
        lt_shape_free(&sg[x]);
        lt_shape_free(&sd[x]);
    }
    return 0;
}
