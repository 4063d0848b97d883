/* opts.c — bnbfs-run's option parsing and usage text.
 *
 * Invariant: anything rn_opts_parse accepts is in range, so later code can
 * trust it; numbers must be consumed whole ("1.5x" is an error, not 1.5).
 */
#include "opts.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"

void rn_opts_usage(FILE *f)
{
    fputs(
"Usage: bnbfs-run MODEL [PROMPT] [OPTIONS]\n"
"Runs gpt-oss on one CUDA GPU. MODEL is a directory holding an HF-canonical\n"
"gpt-oss checkpoint (usually a bnbfs mount) with tokenizer.json. The answer\n"
"(final channel) streams to stdout; PROMPT '-' reads the prompt from stdin.\n"
"\n"
"Chat template (harmony):\n"
"  --system TEXT          developer instructions (\"# Instructions\" message)\n"
"  --date YYYY-MM-DD      add \"Current date:\" to the system message\n"
"  --reasoning LEVEL      low, medium (default) or high\n"
"  --show-reasoning       print the analysis channel to stderr\n"
"  --chat                 interactive multi-turn chat (/reset, /exit); PROMPT, if\n"
"                         given, is the first message\n"
"  --conversation FILE    earlier messages, one JSON object per line as\n"
"                         --parse-ids prints them ({\"role\": \"user\", \"content\": ..});\n"
"                         PROMPT, if given, is added as the next user message\n"
"  --raw                  PROMPT is plain text: no template, all output printed\n"
"  --ids \"1 2 3\"          exact input token ids instead of PROMPT (output is\n"
"                         parsed as harmony unless --raw)\n"
"\n"
"Sampling:\n"
"  --temperature T        0 = greedy (default 1.0)\n"
"  --top-p P              nucleus sampling, 0 < P <= 1 (default 1.0 = off)\n"
"  --top-k K              keep the K most likely tokens (default 0 = off)\n"
"  --seed N               PRNG seed (default: random); same seed, same output\n"
"  --max-tokens N         stop after N generated tokens (default: end of turn)\n"
"  --max-context N        KV cache length in tokens (default 8192, capped by the\n"
"                         model); longer prompts are refused\n"
"\n"
"GPU:\n"
"  --device N             CUDA device index (default 0)\n"
"  --vram-budget SIZE     GPU memory to use, e.g. 24G (default: free memory less\n"
"                         a margin); experts beyond it are cached and streamed\n"
"  --expert-store WHERE   with a budget: where experts outside the GPU cache live:\n"
"                         auto (default: q4-gpu if it fits, else q4-host, else\n"
"                         f16-host), q4-gpu, q4-host (4-bit, dequantized on the\n"
"                         GPU on a miss), f16-host (F16 copied on a miss)\n"
"  --expert-source DIR    the bitsandbytes 4-bit checkpoint behind MODEL's experts\n"
"                         (default: the one a bnbfs mount names; none otherwise)\n"
"  --no-graphs            do not use CUDA graphs (debugging)\n"
"\n"
"Output and diagnostics:\n"
"  --stats                print load time, prefill/decode tokens/s, expert cache\n"
"                         hit rate and bytes moved per token to stderr\n"
"  --logits FILE          write float32 logits (vocab of them per step) for the\n"
"                         prompt's last position and every generated step\n"
"  --check                open and validate MODEL (config, every tensor's dtype\n"
"                         and shape), print a summary; needs no GPU\n"
"  --sample-logits FILE   replay sampling: read float32 logits as --logits\n"
"                         writes them (vocab_size of MODEL/config.json per step)\n"
"                         and print the id picked for each step with the\n"
"                         sampling options above; needs no GPU\n"
"\n"
"Tokenizer tools (need only MODEL/tokenizer.json, no GPU):\n"
"  --tokenize             stdin as plain text -> ids on one line\n"
"  --detokenize           ids on stdin -> text (bytes exactly)\n"
"  -z, --null             with --tokenize: NUL-separated texts in, one line of ids\n"
"                         per text; with --detokenize: one line of ids per text,\n"
"                         each text followed by a NUL byte\n"
"  --render               print the ids of the chat prompt for PROMPT\n"
"  --parse-ids            generated ids on stdin -> one JSON object per message\n"
"                         ({\"role\",\"channel\",\"recipient\",\"content_type\",\"content\"})\n"
"                         and a last line {\"stop\": \"return\"|\"call\"|\"truncated\"}\n"
"\n"
"  -h, --help             this text\n"
"  -V, --version          version and build features\n", f);
}

enum {
    O_SYSTEM = 256, O_DATE, O_REASONING, O_SHOW_REASONING, O_CHAT, O_RAW, O_IDS,
    O_TEMPERATURE, O_TOP_P, O_TOP_K, O_SEED, O_MAX_TOKENS, O_MAX_CONTEXT, O_DEVICE,
    O_VRAM_BUDGET, O_NO_GRAPHS, O_STATS, O_LOGITS, O_CHECK, O_TOKENIZE, O_DETOKENIZE,
    O_RENDER, O_PARSE_IDS, O_CONVERSATION, O_SAMPLE, O_EXPERT_STORE, O_EXPERT_SOURCE,
};

static const struct option k_long[] = {
    {"system", required_argument, NULL, O_SYSTEM},
    {"conversation", required_argument, NULL, O_CONVERSATION},
    {"date", required_argument, NULL, O_DATE},
    {"reasoning", required_argument, NULL, O_REASONING},
    {"show-reasoning", no_argument, NULL, O_SHOW_REASONING},
    {"chat", no_argument, NULL, O_CHAT},
    {"raw", no_argument, NULL, O_RAW},
    {"ids", required_argument, NULL, O_IDS},
    {"temperature", required_argument, NULL, O_TEMPERATURE},
    {"top-p", required_argument, NULL, O_TOP_P},
    {"top-k", required_argument, NULL, O_TOP_K},
    {"seed", required_argument, NULL, O_SEED},
    {"max-tokens", required_argument, NULL, O_MAX_TOKENS},
    {"max-context", required_argument, NULL, O_MAX_CONTEXT},
    {"device", required_argument, NULL, O_DEVICE},
    {"vram-budget", required_argument, NULL, O_VRAM_BUDGET},
    {"expert-store", required_argument, NULL, O_EXPERT_STORE},
    {"expert-source", required_argument, NULL, O_EXPERT_SOURCE},
    {"no-graphs", no_argument, NULL, O_NO_GRAPHS},
    {"stats", no_argument, NULL, O_STATS},
    {"logits", required_argument, NULL, O_LOGITS},
    {"check", no_argument, NULL, O_CHECK},
    {"sample-logits", required_argument, NULL, O_SAMPLE},
    {"tokenize", no_argument, NULL, O_TOKENIZE},
    {"detokenize", no_argument, NULL, O_DETOKENIZE},
    {"null", no_argument, NULL, 'z'},
    {"render", no_argument, NULL, O_RENDER},
    {"parse-ids", no_argument, NULL, O_PARSE_IDS},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {NULL, 0, NULL, 0},
};

static const char *const k_store[] = {
    [RN_STORE_RESIDENT] = "resident", [RN_STORE_F16_HOST] = "f16-host",
    [RN_STORE_Q4_HOST] = "q4-host", [RN_STORE_Q4_GPU] = "q4-gpu",
};

const char *rn_expert_store_name(enum rn_expert_store s)
{
    return (unsigned)s < sizeof k_store / sizeof *k_store ? k_store[s] : "?";
}

int rn_expert_store_parse(const char *s, enum rn_expert_store *out)
{
    if (!strcmp(s, "auto")) {
        *out = RN_STORE_RESIDENT;
        return 0;
    }
    for (unsigned i = RN_STORE_F16_HOST; i < sizeof k_store / sizeof *k_store; i++)
        if (!strcmp(s, k_store[i])) {
            *out = (enum rn_expert_store)i;
            return 0;
        }
    return -EINVAL;
}

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

static bool parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v))
        return false;
    *out = v;
    return true;
}

static bool parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    while (*s == ' ')
        s++;
    if (*s < '0' || *s > '9')       /* strtoull would accept "-1" */
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno)
        return false;
    *out = v;
    return true;
}

/* YYYY-MM-DD with a real month and a day that month can have. */
static bool valid_date(const char *s)
{
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return false;
    for (int i = 0; i < 10; i++)
        if (i != 4 && i != 7 && (s[i] < '0' || s[i] > '9'))
            return false;
    int y = atoi(s), m = atoi(s + 5), d = atoi(s + 8);
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m < 1 || m > 12 || d < 1 || d > mdays[m - 1])
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return !(m == 2 && d == 29 && !leap);
}

int rn_parse_ids(const char *s, size_t len, struct rn_ids *out, char *err, size_t errlen)
{
    size_t i = 0;
    while (i < len) {
        char c = s[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ',') {
            i++;
            continue;
        }
        if (c < '0' || c > '9')
            return fail(err, errlen, "ids: expected a non-negative integer at byte %zu, got '%c'",
                        i, c >= 0x20 && c < 0x7f ? c : '?');
        int64_t v = 0;
        size_t start = i;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            v = v * 10 + (s[i] - '0');
            if (v > INT32_MAX)
                return fail(err, errlen, "ids: %.*s... at byte %zu is out of range",
                            (int)(i - start + 1), s + start, start);
            i++;
        }
        if (i < len && !(s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' ||
                         s[i] == ','))
            return fail(err, errlen, "ids: expected a non-negative integer at byte %zu", start);
        if (rn_ids_push(out, (int32_t)v))
            return fail(err, errlen, "ids: out of memory");
    }
    return 0;
}

static void defaults(struct rn_opts *o)
{
    memset(o, 0, sizeof *o);
    o->effort = RN_EFFORT_MEDIUM;
    o->sample.temperature = 1.0;
    o->sample.top_p = 1.0;
}

void rn_opts_free(struct rn_opts *o)
{
    rn_ids_free(&o->ids);
}

int rn_opts_parse(int argc, char **argv, struct rn_opts *o, char *err, size_t errlen)
{
    defaults(o);
    bool help = false, version = false;
    const char *mode_flag = NULL;
    long l;
    optind = 1;
    opterr = 0;                     /* we word the errors ourselves */
    int c;
    while ((c = getopt_long(argc, argv, ":hVz", k_long, NULL)) != -1) {
        const char *arg = optarg;
        enum rn_mode m = RN_MODE_GENERATE;
        const char *flag = NULL;
        switch (c) {
        case 'h': help = true; break;
        case 'V': version = true; break;
        case 'z': o->nul = true; break;
        case O_SYSTEM: o->system = arg; break;
        case O_CONVERSATION: o->conversation = arg; break;
        case O_DATE:
            if (!valid_date(arg))
                return fail(err, errlen, "--date: expected a date as YYYY-MM-DD, got '%s'", arg);
            snprintf(o->date, sizeof o->date, "%s", arg);
            break;
        case O_REASONING:
            if (rn_effort_parse(arg, &o->effort))
                return fail(err, errlen, "--reasoning: expected low, medium or high, got '%s'",
                            arg);
            break;
        case O_SHOW_REASONING: o->show_reasoning = true; break;
        case O_CHAT: m = RN_MODE_CHAT; flag = "--chat"; break;
        case O_RAW: o->raw = true; break;
        case O_IDS: {
            char e2[200];
            if (o->have_ids)
                return fail(err, errlen, "--ids given twice");
            if (rn_parse_ids(arg, strlen(arg), &o->ids, e2, sizeof e2))
                return fail(err, errlen, "--%s", e2);
            if (o->ids.n == 0)
                return fail(err, errlen, "--ids: no ids given");
            o->have_ids = true;
            break;
        }
        case O_TEMPERATURE:
            if (!parse_double(arg, &o->sample.temperature) || o->sample.temperature < 0)
                return fail(err, errlen, "--temperature: expected a number >= 0, got '%s'", arg);
            break;
        case O_TOP_P:
            if (!parse_double(arg, &o->sample.top_p) || !(o->sample.top_p > 0) ||
                o->sample.top_p > 1)
                return fail(err, errlen, "--top-p: expected a number in (0, 1], got '%s'", arg);
            break;
        case O_TOP_K:
            if (!parse_long(arg, 0, INT_MAX, &l))
                return fail(err, errlen, "--top-k: expected an integer >= 0, got '%s'", arg);
            o->sample.top_k = (int)l;
            break;
        case O_SEED:
            if (!parse_u64(arg, &o->sample.seed))
                return fail(err, errlen, "--seed: expected an integer in [0, 2^64), got '%s'",
                            arg);
            o->seed_set = true;
            break;
        case O_MAX_TOKENS:
            if (!parse_long(arg, 1, LONG_MAX, &o->max_tokens))
                return fail(err, errlen, "--max-tokens: expected an integer >= 1, got '%s'", arg);
            break;
        case O_MAX_CONTEXT:
            if (!parse_long(arg, 2, INT32_MAX, &l))
                return fail(err, errlen, "--max-context: expected an integer >= 2, got '%s'", arg);
            o->max_context = (int)l;
            break;
        case O_DEVICE:
            if (!parse_long(arg, 0, 1023, &l))
                return fail(err, errlen, "--device: expected a CUDA device index, got '%s'", arg);
            o->device = (int)l;
            break;
        case O_VRAM_BUDGET:
            if (dq_parse_size(arg, &o->vram_budget) || o->vram_budget == 0)
                return fail(err, errlen, "--vram-budget: expected a size like 24G or 512M, "
                            "got '%s'", arg);
            break;
        case O_EXPERT_STORE:
            if (rn_expert_store_parse(arg, &o->expert_store))
                return fail(err, errlen, "--expert-store: expected auto, q4-gpu, q4-host or "
                            "f16-host, got '%s'", arg);
            break;
        case O_EXPERT_SOURCE:
            if (!*arg)
                return fail(err, errlen, "--expert-source: expected a directory");
            o->expert_source = arg;
            break;
        case O_NO_GRAPHS: o->no_graphs = true; break;
        case O_STATS: o->stats = true; break;
        case O_LOGITS:
            if (!*arg)
                return fail(err, errlen, "--logits: expected a file name");
            o->logits_path = arg;
            break;
        case O_CHECK: m = RN_MODE_CHECK; flag = "--check"; break;
        case O_SAMPLE: m = RN_MODE_SAMPLE; flag = "--sample-logits"; o->sample_path = arg; break;
        case O_TOKENIZE: m = RN_MODE_TOKENIZE; flag = "--tokenize"; break;
        case O_DETOKENIZE: m = RN_MODE_DETOKENIZE; flag = "--detokenize"; break;
        case O_RENDER: m = RN_MODE_RENDER; flag = "--render"; break;
        case O_PARSE_IDS: m = RN_MODE_PARSE_IDS; flag = "--parse-ids"; break;
        case ':':
            return fail(err, errlen, "%s needs a value", argv[optind - 1]);
        default:
            if (optopt)
                return fail(err, errlen, "unknown option '-%c'", optopt);
            return fail(err, errlen, "unknown option '%s'", argv[optind - 1]);
        }
        if (flag) {
            if (mode_flag && o->mode != m)
                return fail(err, errlen, "%s and %s cannot be combined", mode_flag, flag);
            o->mode = m;
            mode_flag = flag;
        }
    }
    if (help || version) {
        o->mode = help ? RN_MODE_HELP : RN_MODE_VERSION;
        return 0;
    }
    int npos = argc - optind;
    if (npos < 1)
        return fail(err, errlen, "missing MODEL (a gpt-oss model directory)");
    o->model = argv[optind];
    if (npos > 2)
        return fail(err, errlen, "unexpected argument '%s' (quote a PROMPT with spaces)",
                    argv[optind + 2]);
    o->prompt = npos == 2 ? argv[optind + 1] : NULL;
    const char *mf = mode_flag;
    switch (o->mode) {
    case RN_MODE_GENERATE:
        if (o->have_ids && (o->prompt || o->conversation))
            return fail(err, errlen, "--ids replaces the prompt: not with PROMPT or "
                        "--conversation");
        if (!o->prompt && !o->have_ids && !o->conversation)
            return fail(err, errlen, "missing PROMPT (an argument, '-' for stdin, --ids, "
                        "--conversation or --chat)");
        if (o->raw && (o->system || o->date[0] || o->conversation))
            return fail(err, errlen, "--raw has no template: --system, --date and "
                        "--conversation do not apply");
        if (o->raw && o->show_reasoning)
            return fail(err, errlen, "--raw prints everything: --show-reasoning does not apply");
        break;
    case RN_MODE_CHAT:
        if (o->raw || o->have_ids)
            return fail(err, errlen, "--chat uses the chat template: not with --raw or --ids");
        break;
    case RN_MODE_RENDER:
        if (!o->prompt && !o->conversation)
            return fail(err, errlen, "--render needs a PROMPT or --conversation");
        if (o->raw || o->have_ids)
            return fail(err, errlen, "--render renders the chat template: not with --raw or "
                        "--ids");
        break;
    case RN_MODE_TOKENIZE:
    case RN_MODE_DETOKENIZE:
    case RN_MODE_PARSE_IDS:
    case RN_MODE_CHECK:
    case RN_MODE_SAMPLE:
        if (o->prompt)
            return fail(err, errlen, "%s takes no PROMPT (%s)", mf,
                        o->mode == RN_MODE_CHECK ? "it only opens MODEL" : "it reads its input");
        break;
    default:
        break;
    }
    if (o->nul && o->mode != RN_MODE_TOKENIZE && o->mode != RN_MODE_DETOKENIZE)
        return fail(err, errlen, "-z/--null applies to --tokenize and --detokenize only");
    return 0;
}
