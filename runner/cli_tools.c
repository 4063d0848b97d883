/* cli_tools.c — bnbfs-run's CPU-only modes and the helpers main.c shares:
 * --tokenize, --detokenize (-z batches), --render, --parse-ids,
 * --sample-logits, reading prompts and --conversation files.
 *
 * What it is not: nothing here needs model weights or a GPU; generation
 * and chat are in main.c. Each tool reads all of stdin (or its file), writes
 * its whole answer, and reports failures as one error line.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "dequant.h"
#include "sample.h"

int rn_cli_err(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dq_log(DQ_LOG_ERROR, RN_CLI_TAG, "%s", msg);
    return 1;
}

/* ------------------------------------------------------------- stdio */

int rn_cli_read_all(FILE *f, struct rn_buf *b)
{
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (rn_buf_append(b, chunk, n))
            return -ENOMEM;
    return ferror(f) ? -EIO : 0;
}

/* fwrite that accepts an empty (NULL) buffer. */
void rn_cli_put(FILE *f, const void *p, size_t n)
{
    if (n)
        fwrite(p, 1, n, f);
}

/* Appends ids as decimal numbers separated by spaces (no printf: a
 * megabyte of text is a quarter million ids). */
int rn_cli_format_ids(struct rn_buf *b, const int32_t *ids, size_t n)
{
    char chunk[4096];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (k > sizeof chunk - 16) {
            if (rn_buf_append(b, chunk, k))
                return -ENOMEM;
            k = 0;
        }
        if (i)
            chunk[k++] = ' ';
        int64_t v = ids[i];
        if (v < 0) {
            chunk[k++] = '-';
            v = -v;
        }
        char d[12];
        int nd = 0;
        do {
            d[nd++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        while (nd)
            chunk[k++] = d[--nd];
    }
    return rn_buf_append(b, chunk, k);
}

int rn_cli_flush(FILE *f, const char *what)
{
    if (fflush(f) != 0 || ferror(f))
        return rn_cli_err("writing %s: %s", what, strerror(errno ? errno : EIO));
    return 0;
}

/* ------------------------------------------------------ tokenizer tools */

int rn_cli_tokenize(struct rn_tok *t, const struct rn_opts *o)
{
    struct rn_buf in = {0}, out = {0};
    struct rn_ids ids = {0};
    int rc = 0;
    if (rn_cli_read_all(stdin, &in)) {
        rc = rn_cli_err("reading stdin: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    size_t pos = 0, rec = 0;
    do {
        size_t end = in.n;
        if (o->nul) {
            if (pos == in.n)
                break;              /* no record after a final NUL */
            const char *z = memchr(in.p + pos, 0, in.n - pos);
            end = z ? (size_t)(z - in.p) : in.n;
        }
        char what[64];
        snprintf(what, sizeof what, o->nul ? "stdin record %zu" : "stdin", rec);
        ids.n = 0;
        if (rn_tok_encode(t, in.p ? in.p + pos : "", end - pos, what, &ids)) {
            rc = 1;
            goto done;
        }
        out.n = 0;
        if (rn_cli_format_ids(&out, ids.v, ids.n) || rn_buf_append(&out, "\n", 1)) {
            rc = rn_cli_err("out of memory");
            goto done;
        }
        rn_cli_put(stdout, out.p, out.n);
        pos = end + 1;
        rec++;
    } while (o->nul && pos <= in.n);
    rc = rn_cli_flush(stdout, "stdout");
done:
    rn_buf_free(&in);
    rn_buf_free(&out);
    rn_ids_free(&ids);
    return rc;
}

int rn_cli_detokenize(struct rn_tok *t, const struct rn_opts *o)
{
    struct rn_buf in = {0}, out = {0};
    struct rn_ids ids = {0};
    int rc = 0;
    if (rn_cli_read_all(stdin, &in)) {
        rc = rn_cli_err("reading stdin: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    size_t pos = 0, line = 1;
    while (pos < in.n || (!o->nul && pos == 0)) {
        size_t end = in.n;
        if (o->nul) {
            const char *nl = memchr(in.p + pos, '\n', in.n - pos);
            end = nl ? (size_t)(nl - in.p) : in.n;
        }
        char err[256];
        ids.n = 0;
        if (rn_parse_ids(in.p ? in.p + pos : "", end - pos, &ids, err, sizeof err)) {
            rc = rn_cli_err("stdin%s%.0zu: %s", o->nul ? " line " : "", o->nul ? line : 0, err);
            goto done;
        }
        out.n = 0;
        if (rn_tok_decode(t, ids.v, ids.n, &out)) {
            rc = 1;
            goto done;
        }
        if (o->nul && rn_buf_append(&out, "", 1)) {
            rc = rn_cli_err("out of memory");
            goto done;
        }
        rn_cli_put(stdout, out.p, out.n);
        pos = end + 1;
        line++;
    }
    rc = rn_cli_flush(stdout, "stdout");
done:
    rn_buf_free(&in);
    rn_buf_free(&out);
    rn_ids_free(&ids);
    return rc;
}

/* PROMPT as given, or all of stdin for "-"; NUL-terminated in b. */
int rn_cli_prompt_text(const struct rn_opts *o, struct rn_buf *b)
{
    if (strcmp(o->prompt, "-") == 0) {
        if (rn_cli_read_all(stdin, b))
            return rn_cli_err("reading the prompt from stdin: %s", strerror(errno ? errno : EIO));
    } else if (rn_buf_append(b, o->prompt, strlen(o->prompt))) {
        return rn_cli_err("out of memory");
    }
    if (rn_buf_append(b, "", 1))
        return rn_cli_err("out of memory");
    b->n--;
    return 0;
}

/* Reads --conversation: one JSON object per line with "role" and
 * "content" (strings) and optionally "channel", "recipient",
 * "content_type", "name"; lines with "stop" (the last line of --parse-ids)
 * and blank lines are skipped. */
static int load_conversation(const char *path, struct rn_conv *c)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f)
        return rn_cli_err("--conversation %s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t n;
    int rc = 0;
    while (!rc && (n = getline(&line, &cap, f)) >= 0) {
        lineno++;
        size_t k = 0;
        while (k < (size_t)n && (line[k] == ' ' || line[k] == '\t' || line[k] == '\n' ||
                                 line[k] == '\r'))
            k++;
        if (k == (size_t)n)
            continue;
        cJSON *j = cJSON_ParseWithLength(line, (size_t)n);
        if (!cJSON_IsObject(j)) {
            rc = rn_cli_err("--conversation %s line %zu: not a JSON object", path, lineno);
        } else if (!cJSON_GetObjectItemCaseSensitive(j, "stop")) {
            struct rn_msg m = {0};
            const char *keys[] = {"role", "content", "channel", "recipient", "content_type",
                                  "name"};
            char **dst[] = {&m.role, &m.text, &m.channel, &m.recipient, &m.content_type,
                            &m.name};
            for (int i = 0; i < 6 && !rc; i++) {
                cJSON *v = cJSON_GetObjectItemCaseSensitive(j, keys[i]);
                if (cJSON_IsString(v))
                    *dst[i] = v->valuestring;
                else if ((v && !cJSON_IsNull(v)) || i < 2)
                    rc = rn_cli_err("--conversation %s line %zu: \"%s\" must be a string", path,
                                    lineno, keys[i]);
            }
            if (!rc) {
                m.len = strlen(m.text);
                if (rn_utf8_valid_prefix(m.text, m.len) != m.len)
                    rc = rn_cli_err("--conversation %s line %zu: content is not valid UTF-8", path,
                                    lineno);
                else if (rn_conv_add_msg(c, &m))
                    rc = rn_cli_err("out of memory");
            }
        }
        cJSON_Delete(j);
    }
    free(line);
    if (!rc && ferror(f))
        rc = rn_cli_err("--conversation %s: read error", path);
    if (f != stdin)
        fclose(f);
    return rc;
}

int rn_cli_conv_from_opts(const struct rn_opts *o, struct rn_conv *c)
{
    rn_conv_init(c);
    c->effort = o->effort;
    snprintf(c->date, sizeof c->date, "%s", o->date);
    if (o->system && !(c->instructions = strdup(o->system)))
        return rn_cli_err("out of memory");
    if (o->conversation)
        return load_conversation(o->conversation, c);
    return 0;
}

/* The chat prompt into ids: --conversation's messages, then PROMPT (if
 * any) as a user message, then <|start|>assistant. */
int rn_cli_render_prompt(const struct rn_opts *o, const struct rn_harmony *h, struct rn_ids *ids)
{
    struct rn_buf text = {0};
    struct rn_conv c;
    int rc = rn_cli_conv_from_opts(o, &c);
    if (!rc && o->prompt) {
        rc = rn_cli_prompt_text(o, &text);
        if (!rc && rn_conv_add(&c, "user", NULL, text.p, text.n))
            rc = rn_cli_err("out of memory");
    }
    if (!rc && rn_harmony_render(h, &c, ids))
        rc = 1;                     /* logged by the tokenizer (invalid UTF-8) */
    rn_buf_free(&text);
    rn_conv_free(&c);
    return rc;
}

int rn_cli_render(const struct rn_opts *o, const struct rn_harmony *h)
{
    struct rn_ids ids = {0};
    struct rn_buf out = {0};
    int rc = rn_cli_render_prompt(o, h, &ids);
    if (!rc) {
        if (rn_cli_format_ids(&out, ids.v, ids.n) || rn_buf_append(&out, "\n", 1))
            rc = rn_cli_err("out of memory");
        else
            rn_cli_put(stdout, out.p, out.n);
    }
    if (!rc)
        rc = rn_cli_flush(stdout, "stdout");
    rn_ids_free(&ids);
    rn_buf_free(&out);
    return rc;
}

/* JSON string literal of s[0..n) (UTF-8 passes through). */
static int json_str(struct rn_buf *b, const char *s, size_t n)
{
    if (!s)
        return rn_buf_append(b, "null", 4);
    int r = rn_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n && !r; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            r = rn_buf_append(b, esc, 2);
        } else if (c == '\n') {
            r = rn_buf_append(b, "\\n", 2);
        } else if (c == '\t') {
            r = rn_buf_append(b, "\\t", 2);
        } else if (c == '\r') {
            r = rn_buf_append(b, "\\r", 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            r = rn_buf_append(b, esc, 6);
        } else {
            r = rn_buf_append(b, &s[i], 1);
        }
    }
    return r ? r : rn_buf_append(b, "\"", 1);
}

static int json_field(struct rn_buf *b, const char *key, const char *s, size_t n, bool last)
{
    char k[64];
    int kn = snprintf(k, sizeof k, "\"%s\": ", key);
    int r = rn_buf_append(b, k, (size_t)kn);
    if (!r)
        r = json_str(b, s, s ? n : 0);
    if (!r && !last)
        r = rn_buf_append(b, ", ", 2);
    return r;
}

static int msg_json(struct rn_buf *b, const struct rn_msg *m)
{
    int r = rn_buf_append(b, "{", 1);
#define F(key, s, last) if (!r) r = json_field(b, key, s, (s) ? strlen(s) : 0, last)
    F("role", m->role, false);
    if (m->name)
        F("name", m->name, false);
    F("channel", m->channel, false);
    F("recipient", m->recipient, false);
    F("content_type", m->content_type, false);
#undef F
    if (!r)
        r = json_field(b, "content", m->text, m->len, !m->cut);
    if (!r && m->cut)
        r = rn_buf_append(b, "\"truncated\": true", 17);
    return r ? r : rn_buf_append(b, "}\n", 2);
}

int rn_cli_parse_ids(const struct rn_harmony *h)
{
    struct rn_buf in = {0}, out = {0};
    struct rn_ids ids = {0};
    struct rn_hparser p;
    char err[256];
    int rc = 0, r = 0;
    if (rn_hparser_init(&p, h, "assistant", NULL))
        return rn_cli_err("out of memory");
    if (rn_cli_read_all(stdin, &in)) {
        rc = rn_cli_err("reading stdin: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    if (rn_parse_ids(in.p ? in.p : "", in.n, &ids, err, sizeof err)) {
        rc = rn_cli_err("stdin: %s", err);
        goto done;
    }
    for (size_t i = 0; i < ids.n && r == 0; i++)
        r = rn_hparser_feed(&p, ids.v[i]);
    if (r == 1 && p.ntokens < ids.n) {
        /* ids after <|return|>/<|call|>: the parser reports it */
        r = rn_hparser_feed(&p, ids.v[p.ntokens]);
    }
    if (r >= 0)
        r = rn_hparser_finish(&p);
    for (size_t i = 0; i < p.n; i++)
        if (msg_json(&out, &p.msgs[i])) {
            rc = rn_cli_err("out of memory");
            goto done;
        }
    if (r >= 0) {
        char stop[64];
        int k = snprintf(stop, sizeof stop, "{\"stop\": \"%s\"}\n", rn_hstop_name(p.stop));
        if (rn_buf_append(&out, stop, (size_t)k)) {
            rc = rn_cli_err("out of memory");
            goto done;
        }
    } else {
        rc = r == -EBADMSG ? rn_cli_err("stdin: not harmony: %s", p.err)
                           : rn_cli_err("out of memory");
    }
    rn_cli_put(stdout, out.p, out.n);
    if (rn_cli_flush(stdout, "stdout"))
        rc = 1;
done:
    rn_hparser_free(&p);
    rn_buf_free(&in);
    rn_buf_free(&out);
    rn_ids_free(&ids);
    return rc;
}

/* ------------------------------------------------------ sample replay */

/* vocab_size from MODEL/config.json (the length of one logits vector). */
static int model_vocab(const char *model, int *vocab)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", model);
    FILE *f = fopen(path, "rb");
    if (!f)
        return rn_cli_err("%s: %s", path, strerror(errno));
    struct rn_buf b = {0};
    int rc = rn_cli_read_all(f, &b) ? rn_cli_err("%s: read error", path) : 0;
    fclose(f);
    cJSON *j = rc ? NULL : cJSON_ParseWithLength(b.p ? b.p : "", b.n);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "vocab_size");
    if (!rc && (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > INT32_MAX / 4 ||
                v->valuedouble != (double)v->valueint))
        rc = rn_cli_err("%s: no positive integer \"vocab_size\"", path);
    if (!rc)
        *vocab = v->valueint;
    cJSON_Delete(j);
    rn_buf_free(&b);
    return rc;
}

uint64_t rn_cli_random_seed(void)
{
    uint64_t s;
    if (getrandom(&s, sizeof s, 0) != sizeof s)
        s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return s;
}

/* --sample-logits: the sampler over saved logits, one id per step. */
int rn_cli_sample(const struct rn_opts *o)
{
    int vocab = 0;
    if (model_vocab(o->model, &vocab))
        return 1;
    bool std = strcmp(o->sample_path, "-") == 0;
    FILE *f = std ? stdin : fopen(o->sample_path, "rb");
    if (!f)
        return rn_cli_err("--sample-logits %s: %s", o->sample_path, strerror(errno));
    struct rn_buf in = {0}, out = {0};
    struct rn_ids ids = {0};
    struct rn_sampler *smp = NULL;
    int rc = 0;
    if (rn_cli_read_all(f, &in))
        rc = rn_cli_err("--sample-logits %s: read error", o->sample_path);
    if (!std)
        fclose(f);
    size_t step = (size_t)vocab * sizeof(float);
    if (!rc && in.n % step)
        rc = rn_cli_err("--sample-logits %s: %zu bytes is not a whole number of steps of %d "
                        "float32 logits (vocab_size)", o->sample_path, in.n, vocab);
    struct rn_sample_opts so = o->sample;
    so.seed = o->seed_set ? o->sample.seed : rn_cli_random_seed();
    if (!rc && rn_sampler_new(vocab, &so, &smp))
        rc = rn_cli_err("out of memory");
    float *l = rc ? NULL : malloc(step);
    if (!rc && !l)
        rc = rn_cli_err("out of memory");
    for (size_t k = 0; !rc && k < in.n / step; k++) {
        memcpy(l, in.p + k * step, step);       /* the buffer need not be aligned */
        int32_t id;
        if (rn_sampler_pick(smp, l, &id))
            rc = rn_cli_err("--sample-logits %s: step %zu has no finite logit", o->sample_path, k);
        else if (rn_ids_push(&ids, id))
            rc = rn_cli_err("out of memory");
    }
    if (!rc) {
        if (rn_cli_format_ids(&out, ids.v, ids.n) || rn_buf_append(&out, "\n", 1))
            rc = rn_cli_err("out of memory");
        else
            rn_cli_put(stdout, out.p, out.n);
        rc = rc ? rc : rn_cli_flush(stdout, "stdout");
    }
    free(l);
    rn_sampler_free(smp);
    rn_buf_free(&in);
    rn_buf_free(&out);
    rn_ids_free(&ids);
    return rc;
}
