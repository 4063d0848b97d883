/* main.c — bnbfs-run: command line front end of the gpt-oss runner.
 *
 * What it is: the dispatcher over the runner's parts — the CPU tools of
 * cli_tools.c (--tokenize, --detokenize, --render, --parse-ids: need just
 * MODEL/tokenizer.json; --sample-logits), --check (model loading, CPU only),
 * and generation (one answer or --chat) on the CUDA engine, which lives
 * here. What it is not: no model math; see engine.c and kernels/llm*.cu.
 *
 * Build switches (set by runner/meson.build): RN_HAVE_MODEL when model.c
 * (rn_model_*) is part of librn, RN_HAVE_ENGINE when the CUDA engine
 * (rn_engine_*) is linked; without them the corresponding modes print one
 * line saying this build lacks them. RN_HAVE_LIBEDIT adds line editing to
 * --chat (libedit only: GNU readline's GPL does not fit an MIT binary).
 *
 * Output contract: the final channel goes to stdout as it is generated
 * (flushed per token, whole UTF-8 characters only); everything else
 * (reasoning with --show-reasoning, stats, errors) goes to stderr. Errors are
 * one "bnbfs[run] error: ..." line (or the failing part's own line) and a
 * non-zero exit: 2 for usage errors, 1 otherwise.
 */
#include <errno.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "dequant.h"
#include "harmony.h"
#include "opts.h"
#include "runner.h"
#include "sample.h"
#include "tok.h"

#ifndef RN_HAVE_MODEL
#define RN_HAVE_MODEL 0
#endif
#ifndef RN_HAVE_ENGINE
#define RN_HAVE_ENGINE 0
#endif
#if defined(RN_HAVE_LIBEDIT) && RN_HAVE_LIBEDIT
#include <editline/readline.h>
#define RN_LINE_EDITING "libedit"
#endif

#define TAG RN_CLI_TAG

#if RN_HAVE_MODEL
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif

/* ------------------------------------------------------- model check */

#if RN_HAVE_MODEL
static uint64_t tensor_bytes(const struct rn_tensor *t) { return t->data ? t->nbytes : 0; }

static uint64_t model_bytes(const struct rn_model *m)
{
    uint64_t s = tensor_bytes(&m->embed) + tensor_bytes(&m->final_norm) + tensor_bytes(&m->lm_head);
    for (int l = 0; l < m->cfg.nlayers; l++) {
        const struct rn_layer *L = &m->layers[l];
        const struct rn_tensor *ts[] = {&L->attn_norm, &L->q_w, &L->q_b, &L->k_w, &L->k_b,
                                        &L->v_w, &L->v_b, &L->o_w, &L->o_b, &L->sinks,
                                        &L->mlp_norm, &L->router_w, &L->router_b, &L->gate_up,
                                        &L->gate_up_b, &L->down, &L->down_b};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
            s += tensor_bytes(ts[i]);
    }
    return s;
}
#endif

/* The tokenizer's ids must all be rows of the model's embedding. */
#if RN_HAVE_MODEL
static int check_vocab(const struct rn_tok *t, const struct rn_model *m, const char *tokpath)
{
    if (rn_tok_n_ids(t) > m->cfg.vocab)
        return rn_cli_err("%s defines ids up to %d but the model's vocab (embedding rows) is %d",
                          tokpath, rn_tok_n_ids(t) - 1, m->cfg.vocab);
    return 0;
}
#endif

static int do_check(const struct rn_opts *o, const struct rn_tok *t, const char *tokpath)
{
#if RN_HAVE_MODEL
    struct rn_model *m;
    double t0 = now_s();
    if (rn_model_open(o->model, &m))
        return 1;
    double t1 = now_s();
    int rc = check_vocab(t, m, tokpath);
    if (!rc) {
        const struct rn_config *c = &m->cfg;
        int nsliding = 0;
        for (int l = 0; l < c->nlayers && l < RN_MAX_LAYERS; l++)
            nsliding += c->sliding[l];
        char sz[32];
        printf("%s: gpt-oss, %d layers (%d sliding, window %d), hidden %d, %d experts (top %d), "
               "intermediate %d, %d heads / %d kv heads x %d, vocab %d, max positions %d, "
               "rope theta %g%s; weights %s (%s); tokenizer %zu tokens + %zu merges; opened in "
               "%.2f s\n",
               o->model, c->nlayers, nsliding, c->sliding_window, c->hidden, c->nexperts, c->topk,
               c->intermediate, c->nheads, c->nkv, c->head_dim, c->vocab, c->max_position,
               c->rope_theta, c->yarn ? " (YaRN)" : "", dq_fmt_size(model_bytes(m), sz, sizeof sz),
               dq_dtype_name(m->embed.dtype), rn_tok_vocab_size(t), rn_tok_merges_count(t),
               t1 - t0);
        rc = rn_cli_flush(stdout, "stdout");
    }
    rn_model_close(m);
    return rc;
#else
    (void)o;
    (void)t;
    (void)tokpath;
    return rn_cli_err("this build of bnbfs-run has no model loader (runner/model.c was not built)");
#endif
}

/* --------------------------------------------------------- generation */

#if RN_HAVE_MODEL && RN_HAVE_ENGINE
static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

/* Everything one generation session holds. */
struct gen {
    const struct rn_opts *o;
    struct rn_tok *tok;                 /* borrowed */
    const struct rn_harmony *h;         /* borrowed; NULL with --raw */
    struct rn_model *m;                 /* owned */
    struct rn_engine *e;                /* owned */
    struct rn_sampler *smp;             /* owned */
    float *logits;                      /* owned; [vocab] */
    int vocab;
    int ctx;                            /* KV positions available */
    struct rn_ids kv;                   /* ids in the KV cache, in order */
    FILE *logits_f;                     /* owned; --logits */
    int32_t eos[RN_MAX_EOS];            /* stop ids besides harmony's */
    int neos;
    uint64_t seed;
    /* output state */
    struct rn_utf8_stream raw_u8;       /* --raw (or non-harmony output) */
    struct rn_buf obuf;                 /* scratch for complete characters */
    char last_out, last_err;            /* last byte written to stdout / stderr */
    bool err_tty, dim_open;
    /* timing */
    double t_open, t_engine, t_sample;
    uint64_t nsampled;
};

static void out_write(struct gen *g, FILE *f, const char *p, size_t n)
{
    if (!n)
        return;
    fwrite(p, 1, n, f);
    fflush(f);
    if (f == stdout)
        g->last_out = p[n - 1];
    else
        g->last_err = p[n - 1];
}

/* Where a message's text goes: the answer (final, commentary to the user)
 * to stdout; reasoning to stderr with --show-reasoning; tool calls to
 * stderr, since nothing here can answer them. */
static FILE *msg_dest(const struct gen *g, const struct rn_msg *m)
{
    if (m->recipient)
        return stderr;
    if (m->channel && strcmp(m->channel, "analysis") == 0)
        return g->o->show_reasoning ? stderr : NULL;
    return stdout;
}

static void cb_header(void *ctx, const struct rn_msg *m)
{
    struct gen *g = ctx;
    FILE *f = msg_dest(g, m);
    if (f == stderr && m->recipient) {
        char head[256];
        int n = snprintf(head, sizeof head, "[tool call to %s%s%s] ", m->recipient,
                         m->content_type ? ", " : "", m->content_type ? m->content_type : "");
        out_write(g, stderr, head, (size_t)n < sizeof head ? (size_t)n : sizeof head - 1);
    } else if (f == stderr && g->err_tty) {
        fputs("\033[2m", stderr);   /* reasoning in dim text on a terminal */
        g->dim_open = true;
    }
}

static void cb_text(void *ctx, const struct rn_msg *m, const char *delta, size_t len)
{
    struct gen *g = ctx;
    FILE *f = msg_dest(g, m);
    if (f)
        out_write(g, f, delta, len);
}

static void cb_done(void *ctx, const struct rn_msg *m, int32_t end_id)
{
    struct gen *g = ctx;
    FILE *f = msg_dest(g, m);
    if (f == stderr) {
        if (g->dim_open) {
            fputs("\033[0m", stderr);
            g->dim_open = false;
        }
        if (g->last_err != '\n')
            out_write(g, stderr, "\n", 1);
    }
}

static bool is_eos(const struct gen *g, int32_t id)
{
    for (int i = 0; i < g->neos; i++)
        if (g->eos[i] == id)
            return true;
    return false;
}

/* Prints a token's bytes as text (raw mode): whole characters only. */
static int raw_print(struct gen *g, int32_t id)
{
    size_t len;
    const uint8_t *b = rn_tok_bytes(g->tok, id, &len);
    if (!b) {
        char tmp[32];
        int n = snprintf(tmp, sizeof tmp, "<|id %d|>", id);    /* reserved id: show it */
        b = (const uint8_t *)tmp;
        len = (size_t)n;
        g->obuf.n = 0;
        if (rn_utf8_stream_feed(&g->raw_u8, b, len, &g->obuf))
            return -ENOMEM;
    } else {
        g->obuf.n = 0;
        if (rn_utf8_stream_feed(&g->raw_u8, b, len, &g->obuf))
            return -ENOMEM;
    }
    out_write(g, stdout, g->obuf.p, g->obuf.n);
    return 0;
}

static int write_logits(struct gen *g)
{
    if (!g->logits_f)
        return 0;
    if (fwrite(g->logits, sizeof(float), (size_t)g->vocab, g->logits_f) != (size_t)g->vocab)
        return rn_cli_err("--logits %s: %s", g->o->logits_path, strerror(errno ? errno : EIO));
    return 0;
}

static size_t common_prefix(const struct rn_ids *a, const struct rn_ids *b)
{
    size_t n = a->n < b->n ? a->n : b->n, i = 0;
    while (i < n && a->v[i] == b->v[i])
        i++;
    return i;
}

/* Runs one turn: brings the KV cache to `prompt` (re-running only what
 * changed since the last turn), then samples until the turn ends, the
 * token limit, a full context or Ctrl-C. p == NULL: raw output. */
static int run_turn(struct gen *g, const struct rn_ids *prompt, struct rn_hparser *p)
{
    const struct rn_opts *o = g->o;
    if (prompt->n == 0)
        return rn_cli_err("the prompt is empty");
    if (prompt->n >= (size_t)g->ctx)
        return rn_cli_err("the prompt is %zu tokens but the context holds %d (--max-context %d): "
                          "shorten it or raise --max-context", prompt->n, g->ctx, g->ctx);
    for (size_t i = 0; i < prompt->n; i++)
        if (prompt->v[i] < 0 || prompt->v[i] >= g->vocab)
            return rn_cli_err("prompt id %d at position %zu is outside the model's vocab (0..%d)",
                              prompt->v[i], i, g->vocab - 1);
    size_t k = common_prefix(&g->kv, prompt);
    if (k == prompt->n)
        k--;                        /* re-run the last id: its logits are needed */
    if (k < g->kv.n) {
        if (rn_engine_truncate(g->e, (int)k))
            return 1;
        g->kv.n = k;
    }
    /* Greedy without --logits: the engine picks on the GPU and returns the
     * id, not the 804 KB of logits (same pick as the sampler at
     * temperature 0). */
    const bool gpu_pick = o->sample.temperature == 0 && !g->logits_f;
    int32_t gid = -1;
    if (rn_engine_forward_pick(g->e, prompt->v + k, (int)(prompt->n - k),
                               gpu_pick ? NULL : g->logits, gpu_pick ? &gid : NULL))
        return 1;
    if (rn_ids_append(&g->kv, prompt->v + k, prompt->n - k))
        return rn_cli_err("out of memory");
    g->raw_u8 = (struct rn_utf8_stream){{0}, 0};
    bool harmony = p != NULL;
    const char *why = NULL;
    long produced = 0;
    struct sigaction sa = {.sa_handler = on_sigint}, old;
    sigemptyset(&sa.sa_mask);
    g_interrupted = 0;
    sigaction(SIGINT, &sa, &old);
    int rc = 0;
    for (;;) {
        if ((rc = write_logits(g)))
            break;
        int32_t id;
        double t0 = now_s();
        int r = gpu_pick ? (gid < 0 ? -EDOM : (id = gid, 0))
                         : rn_sampler_pick(g->smp, g->logits, &id);
        g->t_sample += now_s() - t0;
        g->nsampled++;
        if (r) {
            rc = rn_cli_err("step %ld: no finite logit to sample from (the engine produced "
                            "NaN/inf)", produced);
            break;
        }
        produced++;
        if (harmony) {
            if (is_eos(g, id)) {
                why = "end of text";
                break;
            }
            r = rn_hparser_feed(p, id);
            if (r == 1)
                break;              /* <|return|> or <|call|> */
            if (r == -ENOMEM) {
                rc = rn_cli_err("out of memory");
                break;
            }
            if (r < 0) {
                dq_log(DQ_LOG_WARN, TAG, "the model's output is not in the harmony format "
                       "(%s); printing the rest as plain text", p->err);
                harmony = false;
                if (id == g->h->ret || id == g->h->call)
                    break;          /* it still ended the turn */
                if (raw_print(g, id)) {
                    rc = rn_cli_err("out of memory");
                    break;
                }
            }
        } else {
            if (is_eos(g, id) || (p && (id == g->h->ret || id == g->h->call)))
                break;
            if (raw_print(g, id)) {
                rc = rn_cli_err("out of memory");
                break;
            }
        }
        if (o->max_tokens && produced >= o->max_tokens) {
            why = "--max-tokens reached";
            break;
        }
        if (g->kv.n >= (size_t)g->ctx) {
            why = "context full (--max-context)";
            break;
        }
        if (g_interrupted) {
            why = "interrupted";
            break;
        }
        if (rn_engine_forward_pick(g->e, &id, 1, gpu_pick ? NULL : g->logits,
                                   gpu_pick ? &gid : NULL)) {
            rc = 1;
            break;
        }
        if (rn_ids_push(&g->kv, id)) {
            rc = rn_cli_err("out of memory");
            break;
        }
    }
    sigaction(SIGINT, &old, NULL);
    if (p && harmony && rn_hparser_finish(p) == -ENOMEM)
        rc = rn_cli_err("out of memory");
    g->obuf.n = 0;
    if (!rn_utf8_stream_flush(&g->raw_u8, &g->obuf))
        out_write(g, stdout, g->obuf.p, g->obuf.n);
    if (g->dim_open) {
        fputs("\033[0m", stderr);
        g->dim_open = false;
    }
    if (g->last_out && g->last_out != '\n')
        out_write(g, stdout, "\n", 1);
    g->last_out = 0;
    if (why && !rc)
        dq_log(DQ_LOG_WARN, TAG, "stopped before the end of the turn: %s (%ld tokens)", why,
               produced);
    if (p && p->stop == RN_HSTOP_CALL)
        dq_log(DQ_LOG_WARN, TAG, "the model called a tool; bnbfs-run has no tools to answer it");
    return rc;
}

static void print_stats(const struct gen *g)
{
    struct rn_engine_stats s;
    rn_engine_get_stats(g->e, &s);
    char b1[32];
    fprintf(stderr, "bnbfs-run stats:\n");
    fprintf(stderr, "  load       %.2f s (open and check %.2f s, weights to the GPU %.2f s)\n",
            g->t_open + g->t_engine, g->t_open, g->t_engine);
    fprintf(stderr, "  prefill    %llu tokens in %.3f s (%.1f tok/s)\n",
            (unsigned long long)s.prefill_tokens, s.prefill_s,
            s.prefill_s > 0 ? (double)s.prefill_tokens / s.prefill_s : 0.0);
    fprintf(stderr, "  decode     %llu tokens in %.3f s (%.1f tok/s)\n",
            (unsigned long long)s.decode_tokens, s.decode_s,
            s.decode_s > 0 ? (double)s.decode_tokens / s.decode_s : 0.0);
    uint64_t lookups = s.expert_hits + s.expert_misses;
    if (s.resident)
        fprintf(stderr, "  experts    all resident on the GPU\n");
    else
    {
        const uint64_t ntok = s.decode_tokens + s.prefill_tokens;
        char b2[32];
        fprintf(stderr, "  experts    %d cached on the GPU, the rest %s; hit rate %.1f%% "
                "(%llu of %llu), per token %s over PCIe, %s dequantized\n", s.expert_slots,
                s.store == RN_STORE_Q4_GPU    ? "4-bit on the GPU"
                : s.store == RN_STORE_Q4_HOST ? "4-bit in host memory"
                                              : "F16 in host memory",
                lookups ? 100.0 * (double)s.expert_hits / (double)lookups : 0.0,
                (unsigned long long)s.expert_hits, (unsigned long long)lookups,
                dq_fmt_size(ntok ? s.bytes_moved / ntok : 0, b1, sizeof b1),
                dq_fmt_size(ntok ? s.bytes_dequant / ntok : 0, b2, sizeof b2));
    }
    fprintf(stderr, "  sampling   %.3f ms/token (%llu picks), seed %llu\n",
            g->nsampled ? 1e3 * g->t_sample / (double)g->nsampled : 0.0,
            (unsigned long long)g->nsampled, (unsigned long long)g->seed);
}

/* One line from the user: readline when built with it, else stdin. NULL
 * at end of input. The caller frees the line. */
static char *read_line(bool tty)
{
#ifdef RN_LINE_EDITING
    if (tty) {
        char *l = readline("> ");
        if (l && *l)
            add_history(l);
        return l;
    }
#endif
    if (tty) {
        fputs("> ", stdout);
        fflush(stdout);
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) {
        free(line);
        return NULL;
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = 0;
    return line;
}

/* One chat turn: the user's message, the answer, the history updated. */
static int chat_turn(struct gen *g, struct rn_conv *c, const char *text)
{
    size_t len = strlen(text);
    size_t bad = rn_utf8_valid_prefix(text, len);
    if (bad != len)
        return rn_cli_err("your message is not valid UTF-8 (byte %zu); not sent", bad);
    size_t mark = c->n;
    struct rn_ids prompt = {0};
    struct rn_hparser p;
    struct rn_hparser_cb cb = {cb_header, cb_text, cb_done, g};
    int rc = 0;
    if (rn_conv_add(c, "user", NULL, text, len) || rn_hparser_init(&p, g->h, "assistant", &cb))
        return rn_cli_err("out of memory");
    if (rn_harmony_render(g->h, c, &prompt)) {
        rc = 1;
    } else if (prompt.n >= (size_t)g->ctx) {
        rc = rn_cli_err("the conversation is %zu tokens but the context holds %d: /reset to start "
                        "over (or raise --max-context)", prompt.n, g->ctx);
    } else {
        rc = run_turn(g, &prompt, &p);
    }
    if (rc) {
        while (c->n > mark)         /* forget the failed turn */
            rn_msg_free(&c->msgs[--c->n]);
    } else {
        /* keep every message; rendering drops finished turns' analysis */
        for (size_t i = 0; i < p.n && !rc; i++)
            if (rn_conv_add_msg(c, &p.msgs[i]))
                rc = rn_cli_err("out of memory");
    }
    rn_hparser_free(&p);
    rn_ids_free(&prompt);
    return rc;
}

static int chat_loop(struct gen *g)
{
    struct rn_conv c;
    if (rn_cli_conv_from_opts(g->o, &c))
        return 1;
    bool tty = isatty(0) && isatty(1);
    if (tty)
        fprintf(stderr, "bnbfs-run chat: /reset forgets the conversation, /exit or Ctrl-D "
                "quits.\n");
    int rc = 0;
    if (g->o->prompt) {
        struct rn_buf first = {0};
        rc = rn_cli_prompt_text(g->o, &first);
        if (!rc)
            chat_turn(g, &c, first.p);
        rn_buf_free(&first);
    }
    char *line;
    while (!rc && (line = read_line(tty)) != NULL) {
        if (strcmp(line, "/exit") == 0 || strcmp(line, "/quit") == 0) {
            free(line);
            break;
        }
        if (strcmp(line, "/reset") == 0) {
            rn_conv_clear(&c);
            fprintf(stderr, "(conversation forgotten)\n");
        } else if (line[0]) {
            chat_turn(g, &c, line);     /* a failed turn is reported and forgotten */
        }
        free(line);
    }
    if (tty)
        fputc('\n', stdout);
    rn_conv_free(&c);
    return rc;
}

static void gen_free(struct gen *g)
{
    if (g->logits_f)
        fclose(g->logits_f);
    rn_sampler_free(g->smp);
    if (g->e)
        rn_engine_free(g->e);
    if (g->m)
        rn_model_close(g->m);
    free(g->logits);
    rn_ids_free(&g->kv);
    rn_buf_free(&g->obuf);
}

/* Generation with the prompt already built (empty in chat mode); takes
 * the --logits file. */
static int gen_main(const struct rn_opts *o, struct rn_tok *t, const struct rn_harmony *h,
                    const char *tokpath, const struct rn_ids *prompt, FILE *logits_f)
{
    struct gen g = {.o = o, .tok = t, .h = h, .err_tty = isatty(2), .logits_f = logits_f};
    int rc = 1;
    double t0 = now_s();
    if (rn_model_open(o->model, &g.m))
        goto out;
    g.t_open = now_s() - t0;
    if (check_vocab(t, g.m, tokpath))
        goto out;
    const struct rn_config *cfg = &g.m->cfg;
    g.vocab = cfg->vocab;
    int limit = cfg->max_position > 0 ? cfg->max_position : INT32_MAX;
    g.ctx = o->max_context ? o->max_context : (limit < 8192 ? limit : 8192);
    if (o->max_context > limit) {
        rc = rn_cli_err("--max-context %d is more than the model's max_position_embeddings (%d)",
                        o->max_context, cfg->max_position);
        goto out;
    }
    if (o->mode == RN_MODE_GENERATE && prompt->n >= (size_t)g.ctx) {
        rc = rn_cli_err("the prompt is %zu tokens but the context holds %d (--max-context): "
                        "shorten it or raise --max-context", prompt->n, g.ctx);
        goto out;
    }
    /* With harmony the parser ends the turn at <|return|>/<|call|>, and
     * <|end|> only ends a message; other eos ids (<|endoftext|>) stop. */
    for (int i = 0; i < cfg->neos && i < RN_MAX_EOS; i++)
        if (!h || (cfg->eos[i] != h->end && cfg->eos[i] != h->ret && cfg->eos[i] != h->call))
            g.eos[g.neos++] = cfg->eos[i];
    g.seed = o->seed_set ? o->sample.seed : rn_cli_random_seed();
    struct rn_sample_opts so = o->sample;
    so.seed = g.seed;
    if (rn_sampler_new(g.vocab, &so, &g.smp) ||
        !(g.logits = malloc((size_t)g.vocab * sizeof *g.logits))) {
        rc = rn_cli_err("out of memory");
        goto out;
    }
    /* rn_engine_new reads the weights itself, in large parallel chunks with
     * progress on a terminal; a separate rn_model_prefetch pass would read
     * them twice (and before learning that there is no GPU). */
    struct rn_engine_opts eo = {.device = o->device, .vram_budget = o->vram_budget,
                                .max_context = g.ctx, .no_graphs = o->no_graphs,
                                .expert_store = (int)o->expert_store,
                                .expert_source = o->expert_source};
    t0 = now_s();
    if (rn_engine_new(g.m, &eo, &g.e))
        goto out;
    g.t_engine = now_s() - t0;
    if (o->mode == RN_MODE_CHAT) {
        rc = chat_loop(&g);
    } else {
        struct rn_hparser p;
        struct rn_hparser_cb cb = {cb_header, cb_text, cb_done, &g};
        bool harmony = !o->raw;
        if (harmony && rn_hparser_init(&p, h, "assistant", &cb)) {
            rc = rn_cli_err("out of memory");
            goto out;
        }
        rc = run_turn(&g, prompt, harmony ? &p : NULL);
        if (harmony)
            rn_hparser_free(&p);
    }
    if (!rc && g.logits_f && fflush(g.logits_f) != 0)
        rc = rn_cli_err("--logits %s: %s", o->logits_path, strerror(errno));
    if (o->stats)
        print_stats(&g);
out:
    gen_free(&g);
    return rc;
}
#endif

/* The prompt's ids for generation: --ids, PROMPT as plain text (--raw),
 * or the chat template. */
static int build_prompt(const struct rn_opts *o, struct rn_tok *t, const struct rn_harmony *h,
                        struct rn_ids *prompt)
{
    if (o->have_ids)
        return rn_ids_append(prompt, o->ids.v, o->ids.n) ? rn_cli_err("out of memory") : 0;
    if (o->raw) {
        struct rn_buf text = {0};
        int rc = rn_cli_prompt_text(o, &text);
        if (!rc && rn_tok_encode(t, text.p, text.n, "PROMPT", prompt))
            rc = 1;
        rn_buf_free(&text);
        return rc;
    }
    return rn_cli_render_prompt(o, h, prompt);
}

static int do_generate(const struct rn_opts *o, struct rn_tok *t, const struct rn_harmony *h,
                       const char *tokpath)
{
    /* Everything that can be checked without the model comes first: a bad
     * prompt should not cost a 40 GB load. */
    struct rn_ids prompt = {0};
    int rc = 0;
    if (o->mode == RN_MODE_GENERATE) {
        rc = build_prompt(o, t, h, &prompt);
    } else if (o->conversation) {
        struct rn_conv c;
        rc = rn_cli_conv_from_opts(o, &c);
        rn_conv_free(&c);
    }
    if (!rc && o->max_context && prompt.n >= (size_t)o->max_context)
        rc = rn_cli_err("the prompt is %zu tokens but the context holds %d (--max-context): "
                        "shorten it or raise --max-context", prompt.n, o->max_context);
#if RN_HAVE_MODEL && RN_HAVE_ENGINE
    FILE *lf = NULL;
    if (!rc && o->logits_path && !(lf = fopen(o->logits_path, "wb")))
        rc = rn_cli_err("--logits %s: %s", o->logits_path, strerror(errno));
    if (!rc)
        rc = gen_main(o, t, h, tokpath, &prompt, lf);   /* closes lf */
    else if (lf)
        fclose(lf);
#else
    (void)tokpath;
#if !BNBFS_HAVE_CUDA
    if (!rc)
        rc = rn_cli_err("this build of bnbfs-run has no CUDA (built with -Dcuda=disabled or "
                        "without nvcc): generation is unavailable; --tokenize, --detokenize, "
                        "--render, --parse-ids%s work", RN_HAVE_MODEL ? " and --check" : "");
#else
    if (!rc)
        rc = rn_cli_err("this build of bnbfs-run has no %s: generation is unavailable; --tokenize, "
                        "--detokenize, --render and --parse-ids work",
                        RN_HAVE_MODEL ? "CUDA engine (runner/engine.c)"
                        : "model loader (runner/model.c)");
#endif
#endif
    rn_ids_free(&prompt);
    return rc;
}

/* -------------------------------------------------------------- main */

static void version(void)
{
#ifdef RN_LINE_EDITING
    const char *editing = RN_LINE_EDITING;
#else
    const char *editing = "none";
#endif
    printf("bnbfs-run %s (CUDA engine: %s, model loader: %s, chat line editing: %s)\n",
           BNBFS_VERSION, RN_HAVE_ENGINE ? "yes" : "no", RN_HAVE_MODEL ? "yes" : "no", editing);
}

int main(int argc, char **argv)
{
    struct rn_opts o;
    char err[512];
    if (rn_opts_parse(argc, argv, &o, err, sizeof err)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s", err);
        fprintf(stderr, "Try 'bnbfs-run --help'.\n");
        rn_opts_free(&o);
        return 2;
    }
    if (o.mode == RN_MODE_HELP) {
        rn_opts_usage(stdout);
        return 0;
    }
    if (o.mode == RN_MODE_VERSION) {
        version();
        return 0;
    }
    struct stat st;
    if (stat(o.model, &st) < 0) {
        rn_cli_err("MODEL %s: %s", o.model, strerror(errno));
        rn_opts_free(&o);
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        rn_cli_err("MODEL %s: not a directory (expected a gpt-oss model directory)", o.model);
        rn_opts_free(&o);
        return 1;
    }
    if (o.mode == RN_MODE_SAMPLE) {         /* needs no tokenizer */
        int rc = rn_cli_sample(&o);
        rn_opts_free(&o);
        return rc;
    }
    char tokpath[4096];
    if ((size_t)snprintf(tokpath, sizeof tokpath, "%s/tokenizer.json", o.model) >= sizeof tokpath) {
        rn_cli_err("MODEL path is too long");
        rn_opts_free(&o);
        return 1;
    }
    int rc;
    struct rn_tok *t = NULL;
    struct rn_harmony h;
    if (access(tokpath, F_OK) != 0) {
        rc = rn_cli_err("%s: not found (MODEL must hold the model's tokenizer.json)", tokpath);
        goto out;
    }
    if (rn_tok_open(tokpath, &t)) {
        rc = 1;
        goto out;
    }
    bool need_harmony = o.mode != RN_MODE_TOKENIZE && o.mode != RN_MODE_DETOKENIZE &&
                        o.mode != RN_MODE_CHECK && !(o.mode == RN_MODE_GENERATE && o.raw);
    if (need_harmony && rn_harmony_init(&h, t)) {
        rc = 1;
        goto out;
    }
    switch (o.mode) {
    case RN_MODE_TOKENIZE: rc = rn_cli_tokenize(t, &o); break;
    case RN_MODE_DETOKENIZE: rc = rn_cli_detokenize(t, &o); break;
    case RN_MODE_RENDER: rc = rn_cli_render(&o, &h); break;
    case RN_MODE_PARSE_IDS: rc = rn_cli_parse_ids(&h); break;
    case RN_MODE_CHECK: rc = do_check(&o, t, tokpath); break;
    default: rc = do_generate(&o, t, need_harmony ? &h : NULL, tokpath); break;
    }
out:
    rn_tok_free(t);
    rn_opts_free(&o);
    return rc;
}
