/* llm_bench_kernels.c — times each decode kernel of kernels/llm*.cu alone at
 * gpt-oss-20b shapes on random fp16 weights, in bytes read per second, next
 * to the card's copy bandwidth; the persistent decode kernel over 8 layers
 * (time a layer); and the ways of getting pinned host memory for the 24 GB
 * mode's expert mirror. A diagnostic for the runner benchmark
 * (tests/bench/NOTES-engine.md), not a test.
 *
 *   llm-bench-kernels [--pin-gib N]
 * Weights rotate over copies larger than the L2 cache, so every launch
 * reads from device memory as in a real decode step. Prints one JSON line.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "llm.h"

#define CK(x)                                                                   \
    do {                                                                        \
        cudaError_t e_ = (x);                                                   \
        if (e_ != cudaSuccess) {                                                \
            fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *dev_random(size_t bytes, unsigned seed)
{
    /* fp16 values in about [-0.06, 0.06]: exponent bits fixed, mantissa and
     * sign random, so no inf/NaN. */
    uint16_t *h = malloc(bytes);
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < bytes / 2; i++) {
        s = s * 1664525u + 1013904223u;
        h[i] = (uint16_t)(((s >> 16) & 0x83ffu) | 0x2800u);
    }
    void *d;
    CK(cudaMalloc(&d, bytes));
    CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

static void *dev_f32(size_t n, float v)
{
    float *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = v * (float)((i * 7919) % 101) / 101.f;
    void *d;
    CK(cudaMalloc(&d, n * sizeof *h));
    CK(cudaMemcpy(d, h, n * sizeof *h, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define REPS 21
typedef int (*launch_fn)(void *ctx, int copy);

/* Median time of one launch, over REPS launches rotating `ncopies` inputs. */
static double time_kernel(launch_fn fn, void *ctx, int ncopies, cudaStream_t s)
{
    cudaEvent_t ev[REPS + 1];
    for (int i = 0; i <= REPS; i++)
        CK(cudaEventCreate(&ev[i]));
    for (int w = 0; w < 3; w++)
        if (fn(ctx, w % ncopies))
            exit(1);
    CK(cudaEventRecord(ev[0], s));
    for (int i = 0; i < REPS; i++) {
        if (fn(ctx, i % ncopies))
            exit(1);
        CK(cudaEventRecord(ev[i + 1], s));
    }
    CK(cudaEventSynchronize(ev[REPS]));
    double t[REPS];
    for (int i = 0; i < REPS; i++) {
        float ms;
        CK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
        t[i] = ms * 1e-3;
    }
    for (int i = 0; i <= REPS; i++)
        cudaEventDestroy(ev[i]);
    qsort(t, REPS, sizeof *t, cmpd);
    return t[REPS / 2];
}

/* gpt-oss-20b */
enum { H = 2880, I = 2880, E = 32, K = 4, NH = 64, NKV = 8, HD = 64, V = 201088, NCOPY = 8 };

/* counters: gate_up from 0, down from CT_DN, o_proj + route at CT_OR */
enum { CT_DN = 1024, CT_OR = 2048, NCOUNT = 2056, NL = 8 };

struct ctx {
    cudaStream_t s;
    kn_half *wqkv[NCOPY], *wo[NCOPY], *wr[NCOPY], *gu[2], *dn[2], *lm;
    float *bqkv, *bo, *br, *gub, *dnb, *norm, *sinks, *rope;
    float *x, *q, *attn, *hn, *act, *wts, *logits, *partial, *apartial, *rlogits;
    int *ids, *counters, *acounters;
    unsigned *barrier;
    struct kn_pick *pick;
    kn_half *kc, *vc;
    struct kn_step *step;
    struct kn_attn_geom g;
    struct kn_decode_plan plan;
    struct kn_decode_args dargs;
    int ks_gu, ks_dn, nsplit, nsm;
};

static int k_qkv(void *v, int c)
{
    struct ctx *x = v;
    return kn_llm_qkv_decode(x->x, x->norm, 1e-5f, x->wqkv[c], x->bqkv, H, &x->g, x->rope,
                             x->step, x->q, x->kc, x->vc, x->s);
}
static int k_o(void *v, int c)
{
    struct ctx *x = v;
    return kn_llm_gemv(x->wo[c], x->bo, H, NH * HD, x->attn, NULL, 0, 1, x->hn, x->s);
}
static int k_route(void *v, int c)
{
    struct ctx *x = v;
    return kn_llm_route_decode(x->x, x->norm, 1e-5f, x->wr[c], x->br, H, E, K, x->hn, x->ids,
                               x->wts, x->s);
}
static int k_oroute(void *v, int c)
{
    struct ctx *x = v;
    return kn_llm_oproj_route(x->wo[c], x->bo, H, NH * HD, x->attn, x->x, x->norm, 1e-5f,
                              x->wr[c], x->br, E, K, x->hn, x->ids, x->wts, x->counters + CT_OR,
                              x->s);
}
static int k_gu(void *v, int c)
{
    struct ctx *x = v;
    struct kn_expert_src src = {x->gu[c & 1], NULL};
    return kn_llm_moe_gate_up_decode(x->hn, src, x->gub, x->ids, H, I, K, &x->plan, 7.f, 1.702f,
                                     x->partial, x->counters, x->act, x->s);
}

static int k_dn(void *v, int c)
{
    struct ctx *x = v;
    struct kn_expert_src src = {x->dn[c & 1], NULL};
    return kn_llm_moe_down_decode(x->act, src, x->dnb, x->ids, x->wts, I, H, K, &x->plan,
                                  x->partial, x->counters + CT_DN, x->x, x->s);
}

static int k_argmax(void *v, int c)
{
    struct ctx *x = v;
    (void)c;
    return kn_llm_argmax(x->logits, V, x->pick, x->s);
}
static int k_lm(void *v, int c)
{
    struct ctx *x = v;
    (void)c;
    return kn_llm_gemv(x->lm, NULL, V, H, x->hn, NULL, 0, 0, x->logits, x->s);
}
static int k_attn(void *v, int c)
{
    struct ctx *x = v;
    (void)c;
    return kn_llm_attn_decode(x->q, x->kc, x->vc, x->sinks, &x->g, x->step, x->nsplit,
                              x->apartial, x->acounters, x->attn, x->s);
}
static int k_layers(void *v, int c)
{
    struct ctx *x = v;
    (void)c;
    return kn_llm_decode_layers(&x->dargs, x->s);
}
static int k_norm(void *v, int c)
{
    struct ctx *x = v;
    (void)c;
    return kn_llm_rmsnorm(x->x, x->norm, 1e-5f, 1, H, NULL, x->hn, x->s);
}

struct pin_job {
    size_t bytes;
    void *p;
};

static void *pin_thread(void *arg)
{
    struct pin_job *j = arg;
    if (cudaHostAlloc(&j->p, j->bytes, cudaHostAllocDefault) != cudaSuccess)
        j->p = NULL;
    return NULL;
}

int main(int argc, char **argv)
{
    double pin_gib = 8;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--pin-gib") && i + 1 < argc)
            pin_gib = atof(argv[++i]);
    struct ctx x = {0};
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    x.nsm = prop.multiProcessorCount;
    CK(cudaStreamCreate(&x.s));
    const size_t QKV = (size_t)(NH + 2 * NKV) * HD;
    for (int c = 0; c < NCOPY; c++) {
        x.wqkv[c] = dev_random(QKV * H * 2, 1 + c);
        x.wo[c] = dev_random((size_t)H * NH * HD * 2, 20 + c);
        x.wr[c] = dev_random((size_t)E * H * 2, 40 + c);
    }
    for (int c = 0; c < 2; c++) {
        x.gu[c] = dev_random((size_t)E * H * 2 * I * 2, 60 + c);
        x.dn[c] = dev_random((size_t)E * I * H * 2, 70 + c);
    }
    x.lm = dev_random((size_t)V * H * 2, 80);
    x.bqkv = dev_f32(QKV, 0.01f);
    x.bo = dev_f32(H, 0.01f);
    x.br = dev_f32(E, 0.01f);
    x.gub = dev_f32((size_t)E * 2 * I, 0.01f);
    x.dnb = dev_f32((size_t)E * H, 0.01f);
    x.norm = dev_f32(H, 1.f);
    x.sinks = dev_f32(NH, 0.5f);
    const int ctxlen = 8192;
    x.rope = dev_f32((size_t)ctxlen * HD, 0.5f);
    x.x = dev_f32(H, 1.f);
    x.q = dev_f32((size_t)NH * HD, 0.1f);
    x.attn = dev_f32((size_t)NH * HD, 0.1f);
    x.hn = dev_f32(H, 0.1f);
    x.act = dev_f32((size_t)K * I, 0.1f);
    x.wts = dev_f32(K, 0.25f);
    x.logits = dev_f32(V, 0);
    if (kn_llm_decode_plan(x.nsm, H, I, E, K, NH, HD, &x.plan))
        return 1;
    x.ks_gu = x.plan.ks_gu;
    x.ks_dn = x.plan.ks_dn;
    x.partial = dev_f32(kn_llm_moe_partial_floats(2 * I, K, x.ks_gu, 0) +
                        kn_llm_moe_partial_floats(H, K, x.ks_dn, 1), 0);
    x.nsplit = x.plan.nsplit;
    x.apartial = dev_f32((size_t)NH * x.nsplit * (HD + 2), 0);
    x.rlogits = dev_f32(E, 0);
    if (kn_llm_moe_counters(2 * I, K, 0) > CT_DN || kn_llm_moe_counters(H, K, 1) > CT_OR - CT_DN)
        return 1;
    CK(cudaMalloc((void **)&x.counters, NCOUNT * sizeof(int)));
    CK(cudaMemset(x.counters, 0, NCOUNT * sizeof(int)));
    CK(cudaMalloc((void **)&x.acounters, NH * sizeof(int)));
    CK(cudaMemset(x.acounters, 0, NH * sizeof(int)));
    CK(cudaMalloc((void **)&x.barrier, sizeof(unsigned)));
    CK(cudaMemset(x.barrier, 0, sizeof(unsigned)));
    CK(cudaMalloc((void **)&x.pick, sizeof *x.pick));
    CK(cudaMemset(x.pick, 0, sizeof *x.pick));
    int hids[K] = {3, 17, 9, 28};
    CK(cudaMalloc((void **)&x.ids, sizeof hids));
    CK(cudaMemcpy(x.ids, hids, sizeof hids, cudaMemcpyHostToDevice));
    x.kc = dev_random((size_t)NKV * ctxlen * HD * 2, 90);
    x.vc = dev_random((size_t)NKV * ctxlen * HD * 2, 91);
    x.g = (struct kn_attn_geom){NH, NKV, HD, ctxlen, 0, 0.125f};
    CK(cudaMalloc((void **)&x.step, sizeof *x.step));
    /* The persistent kernel over NL layers, each with its own attention,
     * router and o_proj weights and one of two expert stacks. */
    struct kn_decode_layer hl[NL];
    for (int l = 0; l < NL; l++)
        hl[l] = (struct kn_decode_layer){
            .wqkv = x.wqkv[l % NCOPY], .bqkv = x.bqkv, .wo = x.wo[l % NCOPY], .bo = x.bo,
            .sinks = x.sinks, .attn_norm = x.norm, .mlp_norm = x.norm, .wr = x.wr[l % NCOPY],
            .br = x.br, .gate_up = x.gu[l & 1], .down = x.dn[l & 1], .gate_up_b = x.gub,
            .down_b = x.dnb, .kc = x.kc, .vc = x.vc, .window = 0};
    struct kn_decode_layer *dl;
    CK(cudaMalloc((void **)&dl, sizeof hl));
    CK(cudaMemcpy(dl, hl, sizeof hl, cudaMemcpyHostToDevice));
    x.dargs = (struct kn_decode_args){
        .layers = dl, .nlayers = NL, .H = H, .I = I, .E = E, .topk = K, .g = x.g, .eps = 1e-5f,
        .limit = 7.f, .alpha = 1.702f, .rope = x.rope, .step = x.step, .x = x.x, .q = x.q,
        .attn = x.attn, .act = x.act, .rlogits = x.rlogits, .attn_partial = x.apartial,
        .moe_partial = x.partial, .attn_counters = x.acounters, .gu_counters = x.counters,
        .dn_counters = x.counters + CT_DN, .barrier = x.barrier, .plan = x.plan};

    /* copy bandwidth */
    void *a, *b;
    const size_t cb = 1ull << 30;
    CK(cudaMalloc(&a, cb));
    CK(cudaMalloc(&b, cb));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double best = 1e9;
    for (int r = 0; r < 8; r++) {
        cudaEventRecord(e0, x.s);
        cudaMemcpyAsync(b, a, cb, cudaMemcpyDeviceToDevice, x.s);
        cudaEventRecord(e1, x.s);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        if (r > 1 && ms * 1e-3 < best)
            best = ms * 1e-3;
    }
    cudaFree(a);
    cudaFree(b);
    printf("{\"device\": \"%s\", \"copy_rw_Bps\": %.4e, \"ks_gu\": %d, \"ks_dn\": %d, "
           "\"nsplit\": %d, \"blocks\": %d, \"kernels\": {", prop.name, 2.0 * cb / best,
           x.ks_gu, x.ks_dn, x.nsplit, x.plan.blocks);
    struct kn_step st = {1, 255};
    CK(cudaMemcpy(x.step, &st, sizeof st, cudaMemcpyHostToDevice));
    struct { const char *name; launch_fn fn; int ncopy; double bytes; } ks[] = {
        {"qkv_decode", k_qkv, NCOPY, (double)QKV * H * 2},
        {"o_proj", k_o, NCOPY, (double)H * NH * HD * 2},
        {"route", k_route, NCOPY, (double)E * H * 2},
        {"oproj_route", k_oroute, NCOPY, (double)H * NH * HD * 2 + (double)E * H * 2},
        {"gate_up_4", k_gu, 2, 4.0 * H * 2 * I * 2},
        {"down_4", k_dn, 2, 4.0 * I * H * 2},
        {"lm_head", k_lm, 1, (double)V * H * 2},
        {"argmax", k_argmax, 1, (double)V * 4},
        {"attn_256", k_attn, 1, 2.0 * NKV * 256 * HD * 2},
        {"rmsnorm", k_norm, 1, H * 4.0},
    };
    double sum = 0;
    for (size_t i = 0; i < sizeof ks / sizeof *ks; i++) {
        double t = time_kernel(ks[i].fn, &x, ks[i].ncopy, x.s);
        printf("%s\"%s\": {\"us\": %.2f, \"GBps\": %.1f}", i ? ", " : "", ks[i].name, t * 1e6,
               ks[i].bytes / t / 1e9);
        if (i >= 3 && i < 6)        /* oproj_route, gate_up, down; qkv below */
            sum += t;
        if (i == 0)
            sum += t;
    }
    if (x.plan.blocks > 0) {
        /* bytes of a layer: q/k/v, o_proj, router, 4 experts (KV at 256
         * positions is noise) */
        const double lb = ((double)QKV * H + (double)H * NH * HD + (double)E * H +
                           4.0 * (H * 2.0 * I + (double)I * H)) * 2;
        double tl = time_kernel(k_layers, &x, 1, x.s) / NL;
        printf(", \"decode_layer\": {\"us\": %.2f, \"GBps\": %.1f}", tl * 1e6, lb / tl / 1e9);
        /* where a layer's time goes: block 0's clock at each phase's end */
        uint64_t *dts, hts[1 + 6 * NL];
        CK(cudaMalloc((void **)&dts, sizeof hts));
        x.dargs.phase_ns = dts;
        double ph[6] = {0};
        for (int r = 0; r < 5; r++) {
            if (kn_llm_decode_layers(&x.dargs, x.s))
                return 1;
            CK(cudaMemcpy(hts, dts, sizeof hts, cudaMemcpyDeviceToHost));
            for (int l = 0; r > 0 && l < NL; l++)       /* r = 0: warm-up */
                for (int k = 0; k < 6; k++)
                    ph[k] += (double)(hts[1 + 6 * l + k] - hts[6 * l + k]) / (4.0 * NL);
        }
        x.dargs.phase_ns = NULL;
        cudaFree(dts);
        printf(", \"decode_phases_us\": {\"qkv\": %.2f, \"attn\": %.2f, \"o_proj\": %.2f, "
               "\"router\": %.2f, \"gate_up\": %.2f, \"down\": %.2f}", ph[0] / 1e3,
               ph[1] / 1e3, ph[2] / 1e3, ph[3] / 1e3, ph[4] / 1e3, ph[5] / 1e3);
    }
    st.pos = 8191;
    CK(cudaMemcpy(x.step, &st, sizeof st, cudaMemcpyHostToDevice));
    double ta = time_kernel(k_attn, &x, 1, x.s);
    printf(", \"attn_8192\": {\"us\": %.2f, \"GBps\": %.1f}", ta * 1e6,
           2.0 * NKV * 8192 * HD * 2 / ta / 1e9);
    printf("}, \"layer_sum_us\": %.1f", sum * 1e6 + 0);

    /* pinned host memory: one cudaHostAlloc, 16 in parallel, mmap +
     * populate + cudaHostRegister */
    const size_t pb = (size_t)(pin_gib * (1ull << 30));
    double t0 = now_s();
    void *p1 = NULL;
    cudaError_t pe = cudaHostAlloc(&p1, pb, cudaHostAllocDefault);
    double t_one = now_s() - t0;
    if (pe == cudaSuccess)
        cudaFreeHost(p1);
    struct pin_job jobs[16];
    pthread_t th[16];
    t0 = now_s();
    for (int i = 0; i < 16; i++) {
        jobs[i].bytes = pb / 16;
        pthread_create(&th[i], NULL, pin_thread, &jobs[i]);
    }
    for (int i = 0; i < 16; i++)
        pthread_join(th[i], NULL);
    double t_par = now_s() - t0;
    for (int i = 0; i < 16; i++)
        if (jobs[i].p)
            cudaFreeHost(jobs[i].p);
    t0 = now_s();
    void *m = mmap(NULL, pb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    double t_pop = now_s() - t0;
    cudaError_t re = m == MAP_FAILED ? cudaErrorMemoryAllocation
                                     : cudaHostRegister(m, pb, cudaHostRegisterDefault);
    double t_reg = now_s() - t0 - t_pop;
    if (re == cudaSuccess)
        cudaHostUnregister(m);
    if (m != MAP_FAILED)
        munmap(m, pb);
    printf(", \"pin_gib\": %.1f, \"hostalloc_s\": %.2f, \"hostalloc16_s\": %.2f, "
           "\"mmap_populate_s\": %.2f, \"host_register_s\": %.2f, \"register_ok\": %s}\n",
           pin_gib, t_one, t_par, t_pop, t_reg, re == cudaSuccess ? "true" : "false");
    return 0;
}
