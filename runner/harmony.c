/* harmony.c — rendering and parsing of the harmony chat format (gpt-oss).
 *
 * What it is: the renderer of openai/harmony for the messages bnbfs-run
 * produces (system with identity, cutoff, date, effort and channels;
 * developer instructions; user, assistant and tool messages) and its
 * streaming parser. What it is not: tool definitions ("# Tools" sections)
 * are not rendered; nothing here runs a model.
 *
 * The invariant: rendering a conversation gives the same ids as harmony's
 * render_conversation_for_completion (and as the tokenizers library
 * encoding the same text pieces), e.g. the 57 ids of formats.md §4 for
 * "Hello". Parsing follows harmony's StreamableParser: header text is the
 * decoded header tokens (formatting tokens as their strings), split as
 * harmony splits it.
 */
#include "harmony.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"

#define TAG "harmony"

/* ------------------------------------------------------------- basics */

const char *rn_effort_name(enum rn_effort e)
{
    switch (e) {
    case RN_EFFORT_LOW: return "low";
    case RN_EFFORT_HIGH: return "high";
    default: return "medium";
    }
}

int rn_effort_parse(const char *s, enum rn_effort *out)
{
    if (strcmp(s, "low") == 0)
        *out = RN_EFFORT_LOW;
    else if (strcmp(s, "medium") == 0)
        *out = RN_EFFORT_MEDIUM;
    else if (strcmp(s, "high") == 0)
        *out = RN_EFFORT_HIGH;
    else
        return -EINVAL;
    return 0;
}

const char *rn_hstop_name(enum rn_hstop s)
{
    switch (s) {
    case RN_HSTOP_RETURN: return "return";
    case RN_HSTOP_CALL: return "call";
    case RN_HSTOP_TRUNCATED: return "truncated";
    default: return "none";
    }
}

int rn_harmony_init(struct rn_harmony *h, struct rn_tok *tok)
{
    static const struct {
        const char *s;
        size_t off;
    } need[] = {
        {"<|start|>", offsetof(struct rn_harmony, start)},
        {"<|end|>", offsetof(struct rn_harmony, end)},
        {"<|message|>", offsetof(struct rn_harmony, message)},
        {"<|channel|>", offsetof(struct rn_harmony, channel)},
        {"<|constrain|>", offsetof(struct rn_harmony, constrain)},
        {"<|return|>", offsetof(struct rn_harmony, ret)},
        {"<|call|>", offsetof(struct rn_harmony, call)},
    };
    memset(h, 0, sizeof *h);
    h->tok = tok;
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        int32_t id = rn_tok_find_added(tok, need[i].s);
        if (id < 0) {
            dq_log(DQ_LOG_ERROR, TAG, "tokenizer has no %s token: not a harmony (gpt-oss) "
                   "tokenizer", need[i].s);
            return -EINVAL;
        }
        memcpy((char *)h + need[i].off, &id, sizeof id);
    }
    return 0;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static char *dup_mem(const char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        if (n)
            memcpy(s, p, n);
        s[n] = 0;
    }
    return s;
}

void rn_msg_free(struct rn_msg *m)
{
    free(m->role);
    free(m->name);
    free(m->recipient);
    free(m->channel);
    free(m->content_type);
    free(m->text);
    memset(m, 0, sizeof *m);
}

static int msg_copy(struct rn_msg *dst, const struct rn_msg *src)
{
    memset(dst, 0, sizeof *dst);
    dst->role = dup_or_null(src->role);
    dst->name = dup_or_null(src->name);
    dst->recipient = dup_or_null(src->recipient);
    dst->channel = dup_or_null(src->channel);
    dst->content_type = dup_or_null(src->content_type);
    dst->text = dup_mem(src->text ? src->text : "", src->text ? src->len : 0);
    dst->len = src->text ? src->len : 0;
    dst->cut = src->cut;
    if (!dst->role || !dst->text || (src->name && !dst->name) ||
        (src->recipient && !dst->recipient) || (src->channel && !dst->channel) ||
        (src->content_type && !dst->content_type)) {
        rn_msg_free(dst);
        return -ENOMEM;
    }
    return 0;
}

static int msgs_push(struct rn_msg **v, size_t *n, size_t *cap, const struct rn_msg *m)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 8;
        struct rn_msg *nv = realloc(*v, nc * sizeof *nv);
        if (!nv)
            return -ENOMEM;
        *v = nv;
        *cap = nc;
    }
    int r = msg_copy(&(*v)[*n], m);
    if (r == 0)
        (*n)++;
    return r;
}

/* -------------------------------------------------------- conversation */

void rn_conv_init(struct rn_conv *c)
{
    memset(c, 0, sizeof *c);
    c->effort = RN_EFFORT_MEDIUM;
}

void rn_conv_clear(struct rn_conv *c)
{
    for (size_t i = 0; i < c->n; i++)
        rn_msg_free(&c->msgs[i]);
    c->n = 0;
}

void rn_conv_free(struct rn_conv *c)
{
    rn_conv_clear(c);
    free(c->msgs);
    free(c->instructions);
    memset(c, 0, sizeof *c);
}

int rn_conv_add_msg(struct rn_conv *c, const struct rn_msg *m)
{
    return msgs_push(&c->msgs, &c->n, &c->cap, m);
}

int rn_conv_add(struct rn_conv *c, const char *role, const char *channel, const char *text,
                size_t len)
{
    struct rn_msg m = {.role = (char *)role, .channel = (char *)channel, .text = (char *)text,
                       .len = len};
    return rn_conv_add_msg(c, &m);
}

/* ---------------------------------------------------------- rendering */

int rn_harmony_system_text(const struct rn_conv *c, struct rn_buf *out)
{
    char s[512];
    int n = snprintf(s, sizeof s,
                     "You are ChatGPT, a large language model trained by OpenAI.\n"
                     "Knowledge cutoff: 2024-06\n"
                     "%s%s%s"
                     "\n"
                     "Reasoning: %s\n"
                     "\n"
                     "# Valid channels: analysis, commentary, final. "
                     "Channel must be included for every message.",
                     c->date[0] ? "Current date: " : "", c->date, c->date[0] ? "\n" : "",
                     rn_effort_name(c->effort));
    if (n < 0 || (size_t)n >= sizeof s)
        return -EINVAL;
    return rn_buf_append(out, s, (size_t)n + 1) ? -ENOMEM : 0;
}

static int text(const struct rn_harmony *h, const char *s, size_t n, struct rn_ids *out)
{
    return rn_tok_encode(h->tok, s, n, "message text", out);
}

static int text_z(const struct rn_harmony *h, const char *s, struct rn_ids *out)
{
    return text(h, s, strlen(s), out);
}

/* Encodes prefix + s as one piece (harmony encodes " to=X" whole). */
static int text_cat(const struct rn_harmony *h, const char *prefix, const char *s,
                    struct rn_ids *out)
{
    struct rn_buf b = {0};
    int r = rn_buf_append(&b, prefix, strlen(prefix));
    if (!r)
        r = rn_buf_append(&b, s, strlen(s));
    if (!r)
        r = text(h, b.p, b.n, out);
    rn_buf_free(&b);
    return r;
}

int rn_harmony_render_msg(const struct rn_harmony *h, const struct rn_msg *m, struct rn_ids *out)
{
    int r;
    if ((r = rn_ids_push(out, h->start)))
        return r;
    if (strcmp(m->role, "tool") == 0 && m->name) {
        r = text_z(h, m->name, out);
    } else {
        r = text_z(h, m->role, out);
        if (!r && m->name)
            r = text_cat(h, ":", m->name, out);
    }
    if (r)
        return r;
    if (m->recipient && strcmp(m->recipient, "all") != 0 &&
        (r = text_cat(h, " to=", m->recipient, out)))
        return r;
    if (m->channel && ((r = rn_ids_push(out, h->channel)) || (r = text_z(h, m->channel, out))))
        return r;
    if (m->content_type) {
        static const char mark[] = "<|constrain|>";
        if (strncmp(m->content_type, mark, sizeof mark - 1) == 0) {
            const char *rest = m->content_type + sizeof mark - 1;
            if ((r = text_z(h, " ", out)) || (r = rn_ids_push(out, h->constrain)) ||
                (*rest && (r = text_z(h, rest, out))))
                return r;
        } else if ((r = text_cat(h, " ", m->content_type, out))) {
            return r;
        }
    }
    if ((r = rn_ids_push(out, h->message)) || (r = text(h, m->text, m->len, out)))
        return r;
    bool to_tool = strcmp(m->role, "assistant") == 0 && m->recipient;
    return rn_ids_push(out, to_tool ? h->call : h->end);
}

int rn_harmony_render(const struct rn_harmony *h, const struct rn_conv *c, struct rn_ids *out)
{
    struct rn_buf sys = {0};
    int r = rn_harmony_system_text(c, &sys);
    if (!r) {
        struct rn_msg m = {.role = "system", .text = sys.p, .len = sys.n - 1};
        r = rn_harmony_render_msg(h, &m, out);
    }
    rn_buf_free(&sys);
    if (r)
        return r;
    if (c->instructions) {
        struct rn_buf dev = {0};
        static const char head[] = "# Instructions\n\n";
        r = rn_buf_append(&dev, head, sizeof head - 1);
        if (!r)
            r = rn_buf_append(&dev, c->instructions, strlen(c->instructions));
        if (!r) {
            struct rn_msg m = {.role = "developer", .text = dev.p, .len = dev.n};
            r = rn_harmony_render_msg(h, &m, out);
        }
        rn_buf_free(&dev);
        if (r)
            return r;
    }
    size_t last_user = 0;
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->msgs[i].role, "user") == 0)
            last_user = i;
    for (size_t i = 0; i < c->n; i++) {
        const struct rn_msg *m = &c->msgs[i];
        if (i < last_user && strcmp(m->role, "assistant") == 0 && m->channel &&
            strcmp(m->channel, "analysis") == 0)
            continue;
        if ((r = rn_harmony_render_msg(h, m, out)))
            return r;
    }
    if ((r = rn_ids_push(out, h->start)))
        return r;
    return text_z(h, "assistant", out);
}

/* ------------------------------------------------------------ parsing */

enum { ST_EXPECT_START, ST_HEADER, ST_CONTENT, ST_DONE };

#define HEADER_MAX 65536

int rn_hparser_init(struct rn_hparser *p, const struct rn_harmony *h, const char *role,
                    const struct rn_hparser_cb *cb)
{
    memset(p, 0, sizeof *p);
    p->h = h;
    if (cb)
        p->cb = *cb;
    p->state = role ? ST_HEADER : ST_EXPECT_START;
    if (role && !(p->next_role = strdup(role)))
        return -ENOMEM;
    return 0;
}

void rn_hparser_free(struct rn_hparser *p)
{
    for (size_t i = 0; i < p->n; i++)
        rn_msg_free(&p->msgs[i]);
    free(p->msgs);
    free(p->next_role);
    rn_buf_free(&p->header);
    rn_buf_free(&p->text);
    rn_msg_free(&p->cur);
    memset(p, 0, sizeof *p);
}

__attribute__((format(printf, 2, 3)))
static int malformed(struct rn_hparser *p, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(p->err, sizeof p->err, "generated token %zu: %s", p->ntokens, msg);
    return -EBADMSG;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool known_role(const char *s)
{
    static const char *roles[] = {"user", "assistant", "system", "developer", "tool"};
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (strcmp(s, roles[i]) == 0)
            return true;
    return false;
}

/* Removes leading/trailing whitespace in place. */
static char *trim(char *s)
{
    while (is_space(*s))
        s++;
    size_t n = strlen(s);
    while (n && is_space(s[n - 1]))
        s[--n] = 0;
    return s;
}

/* Splits the header text the way harmony's parse_header_from_string does:
 * pull out "<|channel|>VALUE", put a space before "<|constrain|>", split on
 * whitespace; then [role] [recipient] [content type], where a lone last
 * part is a recipient unless it starts with <|constrain|>. Fills cur. */
static int parse_header(struct rn_hparser *p, char *hs)
{
    static const char chm[] = "<|channel|>", com[] = "<|constrain|>";
    struct rn_msg *m = &p->cur;
    char *at = strstr(hs, chm);
    if (at) {
        char *v = at + sizeof chm - 1, *e = v;
        while (*e && !is_space(*e) && *e != '<')
            e++;
        if (e == v)
            return malformed(p, "header \"%.80s\": <|channel|> without a channel name", hs);
        if (!(m->channel = dup_mem(v, (size_t)(e - v))))
            return -ENOMEM;
        memmove(at, e, strlen(e) + 1);
    }
    /* a space before every <|constrain|>: room for one per occurrence */
    size_t ncon = 0;
    for (char *q = strstr(hs, com); q; q = strstr(q + 1, com))
        ncon++;
    char *buf = malloc(strlen(hs) + ncon + 1);
    if (!buf)
        return -ENOMEM;
    char *w = buf;
    for (const char *q = hs; *q;) {
        if (strncmp(q, com, sizeof com - 1) == 0) {
            *w++ = ' ';
            memcpy(w, com, sizeof com - 1);
            w += sizeof com - 1;
            q += sizeof com - 1;
        } else {
            *w++ = *q++;
        }
    }
    *w = 0;
    char *parts[8];
    int np = 0;
    int r = 0;
    for (char *q = trim(buf); *q;) {
        char *s = q;
        while (*q && !is_space(*q))
            q++;
        if (*q)
            *q++ = 0;
        while (is_space(*q))
            q++;
        if (np == 8) {
            r = malformed(p, "header \"%.80s\": too many parts", hs);
            goto out;
        }
        parts[np++] = s;
    }
    int first = 0;
    const char *role = p->next_role;
    const char *tool_name = NULL;
    if (!role) {
        if (np == 0) {
            r = malformed(p, "header without a role");
            goto out;
        }
        if (known_role(parts[0])) {
            role = parts[0];
        } else if (np > 1 || strncmp(parts[0], "to=", 3) == 0) {
            role = "tool";          /* an unknown author with a recipient: a tool */
            tool_name = parts[0];
            first = 1;
        } else {
            r = malformed(p, "header \"%.80s\": unknown role \"%s\"", hs, parts[0]);
            goto out;
        }
    }
    if (first < np && strcmp(parts[first], role) == 0)
        first++;
    if (first < np) {
        int nleft = np - first;
        char *last = parts[--np];
        bool oom;
        if (strncmp(last, "to=", 3) == 0) {
            oom = !(m->recipient = strdup(last + 3));
        } else if (nleft == 1 && strncmp(last, com, sizeof com - 1) != 0) {
            oom = !(m->recipient = strdup(last));
        } else {
            oom = !(m->content_type = strdup(last));
            if (!oom && first < np) {
                char *rc = parts[--np];
                oom = !(m->recipient = strdup(strncmp(rc, "to=", 3) == 0 ? rc + 3 : rc));
            }
        }
        if (oom) {
            r = -ENOMEM;
            goto out;
        }
        if (first < np) {
            r = malformed(p, "header \"%.80s\": unexpected \"%s\"", hs, parts[first]);
            goto out;
        }
    }
    m->role = strdup(role);
    if (!m->role || (tool_name && !(m->name = strdup(tool_name))))
        r = -ENOMEM;
out:
    free(buf);
    return r;
}

/* Calls the text callback with cur viewed over the text buffer. */
static void emit_text(struct rn_hparser *p, size_t before)
{
    if (!p->cb.text || p->text.n <= before)
        return;
    struct rn_msg view = p->cur;
    view.text = p->text.p;
    view.len = p->text.n;
    p->cb.text(p->cb.ctx, &view, p->text.p + before, p->text.n - before);
}

static int finish_msg(struct rn_hparser *p, int32_t end_id)
{
    size_t before = p->text.n;
    int r = rn_utf8_stream_flush(&p->u8, &p->text);    /* a cut character: U+FFFD */
    if (r)
        return r;
    emit_text(p, before);
    free(p->cur.text);
    p->cur.text = dup_mem(p->text.p ? p->text.p : "", p->text.n);
    if (!p->cur.text)
        return -ENOMEM;
    p->cur.len = p->text.n;
    p->cur.cut = end_id < 0;
    if ((r = msgs_push(&p->msgs, &p->n, &p->cap, &p->cur)))
        return r;
    if (p->cb.done)
        p->cb.done(p->cb.ctx, &p->msgs[p->n - 1], end_id);
    rn_msg_free(&p->cur);
    p->text.n = 0;
    return 0;
}

int rn_hparser_feed(struct rn_hparser *p, int32_t id)
{
    const struct rn_harmony *h = p->h;
    p->ntokens++;
    size_t len;
    const uint8_t *b = rn_tok_bytes(h->tok, id, &len);
    if (!b)
        return malformed(p, "id %d is not a token", id);
    int r;
    switch (p->state) {
    case ST_DONE:
        return malformed(p, "id %d after the end of the turn (%s)", id, rn_hstop_name(p->stop));
    case ST_EXPECT_START:
        if (id != h->start)
            return malformed(p, "expected <|start|> between messages, got id %d", id);
        p->state = ST_HEADER;
        p->header.n = 0;
        return 0;
    case ST_HEADER:
        if (id == h->start && p->header.n == 0 && p->next_role) {
            /* the ids repeat the <|start|> the prompt already had */
            free(p->next_role);
            p->next_role = NULL;
            return 0;
        }
        if (id == h->message) {
            char *hs = dup_mem(p->header.p ? p->header.p : "", p->header.n);
            if (!hs)
                return -ENOMEM;
            if (rn_utf8_valid_prefix(hs, p->header.n) != p->header.n || strlen(hs) != p->header.n)
                r = malformed(p, "message header is not text");
            else
                r = parse_header(p, hs);
            free(hs);
            free(p->next_role);
            p->next_role = NULL;
            if (r)
                return r;
            p->state = ST_CONTENT;
            p->text.n = 0;
            p->u8 = (struct rn_utf8_stream){{0}, 0};
            if (p->cb.header)
                p->cb.header(p->cb.ctx, &p->cur);
            return 0;
        }
        if (id == h->end || id == h->ret || id == h->call)
            return malformed(p, "message header ended by id %d before <|message|>", id);
        if (p->header.n + len > HEADER_MAX)
            return malformed(p, "message header longer than %d bytes", HEADER_MAX);
        return rn_buf_append(&p->header, b, len);
    case ST_CONTENT:
        if (id == h->end || id == h->ret || id == h->call) {
            if ((r = finish_msg(p, id)))
                return r;
            if (id == h->end) {
                p->state = ST_EXPECT_START;
                return 0;
            }
            p->state = ST_DONE;
            p->stop = id == h->ret ? RN_HSTOP_RETURN : RN_HSTOP_CALL;
            return 1;
        } else {
            size_t before = p->text.n;
            if ((r = rn_utf8_stream_feed(&p->u8, b, len, &p->text)))
                return r;
            emit_text(p, before);
            return 0;
        }
    }
    return -EINVAL;
}

int rn_hparser_finish(struct rn_hparser *p)
{
    if (p->state == ST_DONE)
        return 0;
    int r = 0;
    if (p->state == ST_CONTENT)
        r = finish_msg(p, -1);
    p->state = ST_DONE;
    p->stop = RN_HSTOP_TRUNCATED;
    return r;
}
