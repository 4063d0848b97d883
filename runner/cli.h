/* cli.h — bnbfs-run's command-line helpers and CPU-only tools, shared by
 * main.c (dispatch, generation, chat) and cli_tools.c. Private to the
 * bnbfs-run executable; not part of librn.
 *
 * Conventions: the rn_cli_* tools return an exit status (0 or 1) after
 * printing their own one-line error; the helpers return 0 or -errno, except
 * rn_cli_err, which logs one "bnbfs[run] error: ..." line and returns 1 so
 * callers can `return rn_cli_err(...)`.
 */
#ifndef BNBFS_RN_CLI_H
#define BNBFS_RN_CLI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "harmony.h"
#include "opts.h"
#include "tok.h"

#define RN_CLI_TAG "run"

int rn_cli_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* stdio */
int rn_cli_read_all(FILE *f, struct rn_buf *b);             /* 0 or -ENOMEM/-EIO */
void rn_cli_put(FILE *f, const void *p, size_t n);          /* fwrite; n may be 0 */
int rn_cli_format_ids(struct rn_buf *b, const int32_t *ids, size_t n); /* "1 2 3" */
int rn_cli_flush(FILE *f, const char *what);                /* exit status */
uint64_t rn_cli_random_seed(void);                          /* getrandom, else time/pid */

/* prompts: PROMPT (or stdin for "-") as text; the conversation of
 * --system/--date/--reasoning/--conversation; the chat prompt ids. Each
 * returns an exit status. */
int rn_cli_prompt_text(const struct rn_opts *o, struct rn_buf *b);
int rn_cli_conv_from_opts(const struct rn_opts *o, struct rn_conv *c);
int rn_cli_render_prompt(const struct rn_opts *o, const struct rn_harmony *h,
                         struct rn_ids *ids);

/* the CPU-only modes */
int rn_cli_tokenize(struct rn_tok *t, const struct rn_opts *o);
int rn_cli_detokenize(struct rn_tok *t, const struct rn_opts *o);
int rn_cli_render(const struct rn_opts *o, const struct rn_harmony *h);
int rn_cli_parse_ids(const struct rn_harmony *h);
int rn_cli_sample(const struct rn_opts *o);

#endif
