/* opts.h — bnbfs-run's command line (private to runner/).
 *
 * rn_opts_parse turns argv into a checked struct rn_opts: every value is
 * range-checked here, so main.c only dispatches. It never exits or prints;
 * errors come back as one line of text.
 */
#ifndef BNBFS_RN_OPTS_H
#define BNBFS_RN_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "harmony.h"
#include "runner.h"
#include "sample.h"
#include "tok.h"

enum rn_mode {
    RN_MODE_GENERATE = 0,           /* MODEL PROMPT (or --ids): one answer */
    RN_MODE_CHAT,                   /* --chat: interactive turns */
    RN_MODE_TOKENIZE,               /* --tokenize: stdin text -> ids */
    RN_MODE_DETOKENIZE,             /* --detokenize: ids on stdin -> text */
    RN_MODE_RENDER,                 /* --render: ids of the chat prompt */
    RN_MODE_PARSE_IDS,              /* --parse-ids: generated ids -> JSON lines */
    RN_MODE_CHECK,                  /* --check: open the model, print a summary */
    RN_MODE_SAMPLE,                 /* --sample-logits FILE: replay sampling on saved logits */
    RN_MODE_HELP,
    RN_MODE_VERSION,
};

struct rn_opts {
    enum rn_mode mode;
    const char *model;              /* MODEL directory (argv, borrowed) */
    const char *prompt;             /* PROMPT, "-" = stdin; NULL when absent */
    /* chat template */
    const char *system;             /* --system: developer instructions */
    const char *conversation;       /* --conversation FILE: earlier messages (JSON lines) */
    char date[16];                  /* --date YYYY-MM-DD, "" when absent */
    enum rn_effort effort;          /* --reasoning */
    bool raw;                       /* --raw: no template, plain output */
    struct rn_ids ids;              /* --ids: owned; valid when have_ids */
    bool have_ids;
    /* output */
    bool show_reasoning;            /* analysis channel to stderr */
    bool stats;                     /* --stats */
    const char *logits_path;        /* --logits FILE */
    const char *sample_path;        /* --sample-logits FILE ("-" = stdin) */
    bool nul;                       /* -z: NUL-separated records (tokenize/detokenize) */
    /* sampling and limits */
    struct rn_sample_opts sample;   /* temperature 1, top_p 1, top_k 0 */
    bool seed_set;                  /* --seed given (else a random seed) */
    long max_tokens;                /* 0 = until the turn ends or the context is full */
    int max_context;                /* 0 = default (8192, capped by the model) */
    /* engine */
    uint64_t vram_budget;           /* bytes; 0 = card's free memory less a margin */
    enum rn_expert_store expert_store;  /* --expert-store; RN_STORE_RESIDENT = auto */
    const char *expert_source;      /* --expert-source DIR, or NULL */
    int device;
    bool no_graphs;
};

/* 0 on success; -EINVAL with one line (no newline) in err otherwise. The
 * struct is filled with defaults first; free it with rn_opts_free. */
int rn_opts_parse(int argc, char **argv, struct rn_opts *o, char *err, size_t errlen);
void rn_opts_free(struct rn_opts *o);
void rn_opts_usage(FILE *f);

/* Parses whitespace- or comma-separated non-negative ids ("1 2, 3") and
 * appends them; -EINVAL with a message in err. Used for --ids and for ids
 * read from stdin. */
int rn_parse_ids(const char *s, size_t len, struct rn_ids *out, char *err, size_t errlen);

#endif
