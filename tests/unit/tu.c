/* tu.c — see tu.h. */
#include <stdlib.h>
#include <unistd.h>

#include "dequant.h"
#include "tu.h"

int tu_failures;
const char *tu_current = "?";
static char g_log[1 << 16];
static size_t g_log_len;

static void sink(void *ctx, enum dq_log_level lvl, const char *tag, const char *msg)
{
    (void)ctx, (void)lvl;
    int n = snprintf(g_log + g_log_len, sizeof g_log - g_log_len, "[%s] %s\n", tag, msg);
    if (n > 0 && (size_t)n < sizeof g_log - g_log_len)
        g_log_len += (size_t)n;
    if (getenv("TU_VERBOSE"))
        fprintf(stderr, "  log: [%s] %s\n", tag, msg);
}

const char *tu_log(void) { return g_log; }
void tu_log_clear(void) { g_log_len = 0, g_log[0] = 0; }
bool tu_log_has(const char *needle) { return strstr(g_log, needle) != NULL; }

const char *tu_tmpdir(void)
{
    static char path[256];
    static char base[128];
    static int n;
    if (!base[0]) {
        snprintf(base, sizeof base, "/tmp/bnbfs-tu-XXXXXX");
        if (!mkdtemp(base)) {
            perror("mkdtemp");
            exit(2);
        }
    }
    snprintf(path, sizeof path, "%s/%d", base, n++);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", path);
    if (system(cmd) != 0)
        exit(2);
    return path;
}

int tu_main(const struct tu_case *cases, int argc, char **argv)
{
    dq_log_set_sink(sink, NULL);
    dq_log_set_level(DQ_LOG_DEBUG);
    int ran = 0;
    for (const struct tu_case *c = cases; c->name; c++) {
        if (argc > 1 && !strstr(c->name, argv[1]))
            continue;
        tu_current = c->name;
        tu_log_clear();
        int before = tu_failures;
        c->fn();
        ran++;
        fprintf(stderr, "%s %s\n", tu_failures == before ? "ok  " : "FAIL", c->name);
    }
    fprintf(stderr, "%d tests, %d failed checks\n", ran, tu_failures);
    return tu_failures ? 1 : 0;
}
