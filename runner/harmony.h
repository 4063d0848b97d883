/* harmony.h — the gpt-oss "harmony" chat format (private to runner/):
 * rendering a conversation into prompt ids and parsing generated ids back
 * into messages, as openai/harmony does for HarmonyGptOss.
 *
 * Rendering: every text piece (role, header, content) is encoded on its own
 * with rn_tok_encode (so special-token strings in user text stay text);
 * formatting tokens (<|start|>, <|channel|>, <|message|>, <|end|>, ...) are
 * inserted by id. A message is
 *   <|start|>ROLE[ to=RECIPIENT][<|channel|>CHANNEL][ CONTENT_TYPE]<|message|>TEXT<|end|>
 * with <|call|> instead of <|end|> for an assistant message with a
 * recipient. The prompt for completion ends with <|start|>assistant.
 *
 * Parsing: a streaming state machine fed one generated id at a time.
 * Messages end at <|end|>; the turn ends at <|return|> or <|call|>. Text
 * callbacks receive complete UTF-8 only (a character split across tokens is
 * held back until it is whole).
 */
#ifndef BNBFS_RN_HARMONY_H
#define BNBFS_RN_HARMONY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tok.h"

enum rn_effort { RN_EFFORT_LOW = 0, RN_EFFORT_MEDIUM, RN_EFFORT_HIGH };
const char *rn_effort_name(enum rn_effort e);           /* "low", "medium", "high" */
int rn_effort_parse(const char *s, enum rn_effort *out); /* 0 or -EINVAL */

/* The formatting tokens, resolved from the tokenizer's added tokens. */
struct rn_harmony {
    struct rn_tok *tok;             /* borrowed; encoding mutates its cache */
    int32_t start, end, message, channel, constrain, ret, call;
};
/* -EINVAL (logged, naming the missing token) when the tokenizer lacks one. */
int rn_harmony_init(struct rn_harmony *h, struct rn_tok *tok);

/* One message. All strings owned, NUL-terminated; optional ones NULL. */
struct rn_msg {
    char *role;                     /* "system", "developer", "user", "assistant", "tool" */
    char *name;                     /* tool messages: the tool's name (author) */
    char *recipient;                /* "functions.get_weather" */
    char *channel;                  /* "analysis", "commentary", "final" */
    char *content_type;             /* "<|constrain|>json", "json" */
    char *text;                     /* content, NUL-terminated; may hold NUL bytes: see len */
    size_t len;
    bool cut;                       /* parsing: the ids ended inside this message */
};
void rn_msg_free(struct rn_msg *m);

/* A conversation: the system message's settings, optional developer
 * instructions, then the messages in order. */
struct rn_conv {
    enum rn_effort effort;          /* "Reasoning: ..." */
    char date[16];                  /* "Current date: ..." line; "" for none */
    char *instructions;             /* developer "# Instructions"; owned; NULL for none */
    struct rn_msg *msgs;            /* owned; [n] */
    size_t n, cap;
};
void rn_conv_init(struct rn_conv *c);
void rn_conv_free(struct rn_conv *c);
/* Copies the strings. role/text required; the others may be NULL. */
int rn_conv_add(struct rn_conv *c, const char *role, const char *channel,
                const char *text, size_t len);
int rn_conv_add_msg(struct rn_conv *c, const struct rn_msg *m);
/* Forgets the messages (keeps system settings and instructions). */
void rn_conv_clear(struct rn_conv *c);

/* The system message's text (model identity, knowledge cutoff, optional
 * date, reasoning effort, valid channels) into out, NUL-terminated. */
int rn_harmony_system_text(const struct rn_conv *c, struct rn_buf *out);

/* Renders c for completion by the assistant, appending to out: system,
 * developer (when instructions), the messages, <|start|>assistant.
 * Analysis messages that come before the last user message (those of
 * finished turns) are dropped, as gpt-oss's chat template does. Errors from
 * rn_tok_encode (-EILSEQ for invalid UTF-8 text) propagate. */
int rn_harmony_render(const struct rn_harmony *h, const struct rn_conv *c, struct rn_ids *out);
/* Renders one message (no dropping rules). */
int rn_harmony_render_msg(const struct rn_harmony *h, const struct rn_msg *m, struct rn_ids *out);

/* ------------------------------------------------------------ parsing */

enum rn_hstop {
    RN_HSTOP_NONE = 0,              /* still going */
    RN_HSTOP_RETURN,                /* <|return|>: the turn is done */
    RN_HSTOP_CALL,                  /* <|call|>: a tool call awaits its result */
    RN_HSTOP_TRUNCATED,             /* ids ran out before the turn ended */
};
const char *rn_hstop_name(enum rn_hstop s); /* "none", "return", "call", "truncated" */

/* Callbacks (each may be NULL). The message passed has role, channel,
 * recipient and content type set; its text grows as deltas arrive. */
struct rn_hparser_cb {
    void (*header)(void *ctx, const struct rn_msg *m);
    void (*text)(void *ctx, const struct rn_msg *m, const char *delta, size_t len);
    /* end_id: <|end|>, <|return|> or <|call|>; -1 when cut off (truncated) */
    void (*done)(void *ctx, const struct rn_msg *m, int32_t end_id);
    void *ctx;
};

struct rn_hparser {
    const struct rn_harmony *h;     /* borrowed */
    struct rn_hparser_cb cb;
    int state;                      /* private: EXPECT_START, HEADER, CONTENT, DONE */
    char *next_role;                /* owned; the role the prompt's <|start|>ROLE gave, or NULL */
    struct rn_buf header;           /* decoded header tokens */
    struct rn_msg cur;              /* the message being read */
    struct rn_buf text;             /* cur's text so far */
    struct rn_utf8_stream u8;
    struct rn_msg *msgs;            /* owned; [n] finished messages */
    size_t n, cap;
    enum rn_hstop stop;
    size_t ntokens;                 /* ids fed so far */
    char err[320];                  /* why the last feed returned -EBADMSG */
};

/* role: the role already given by the prompt ("assistant" after
 * <|start|>assistant), or NULL when the ids begin with <|start|>. Even with
 * a role, a leading <|start|> is accepted. */
int rn_hparser_init(struct rn_hparser *p, const struct rn_harmony *h, const char *role,
                    const struct rn_hparser_cb *cb);
void rn_hparser_free(struct rn_hparser *p);
/* Feeds one id. Returns 0 to continue, 1 when the turn ended (p->stop is
 * RETURN or CALL), -EBADMSG when the ids are not harmony (a token other than
 * <|start|> between messages, an unparsable header, anything after the turn
 * ended): nothing is logged, p->err says why and where, for the caller to
 * report as an error (--parse-ids) or a warning (generation). -ENOMEM. */
int rn_hparser_feed(struct rn_hparser *p, int32_t id);
/* End of ids: a message cut off in its content is kept (done callback with
 * end_id -1) and stop becomes TRUNCATED unless the turn had ended. */
int rn_hparser_finish(struct rn_hparser *p);

#endif
