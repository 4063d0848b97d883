/* log.c — the one log sink of bnbfs: leveled, tagged lines, one write per
 * line so concurrent threads never interleave. Not a general logger: no
 * files, no rotation; the daemon's stderr is redirected by its caller. */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>

#include "dequant.h"

static _Atomic int g_level = DQ_LOG_INFO;
static _Atomic uint64_t g_errors;
static pthread_mutex_t g_sink_lock = PTHREAD_MUTEX_INITIALIZER;
static dq_log_sink_fn g_sink;   /* guarded by g_sink_lock */
static void *g_sink_ctx;        /* guarded by g_sink_lock */

static const char *level_name(enum dq_log_level l)
{
    switch (l) {
    case DQ_LOG_ERROR: return "error";
    case DQ_LOG_WARN: return "warning";
    case DQ_LOG_INFO: return "info";
    default: return "debug";
    }
}

void dq_log_set_level(enum dq_log_level max_level) { atomic_store(&g_level, (int)max_level); }
enum dq_log_level dq_log_get_level(void) { return (enum dq_log_level)atomic_load(&g_level); }
uint64_t dq_log_error_count(void) { return atomic_load(&g_errors); }

void dq_log_set_sink(dq_log_sink_fn sink, void *ctx)
{
    pthread_mutex_lock(&g_sink_lock);
    g_sink = sink;
    g_sink_ctx = ctx;
    pthread_mutex_unlock(&g_sink_lock);
}

void dq_log(enum dq_log_level lvl, const char *tag, const char *fmt, ...)
{
    if (lvl == DQ_LOG_ERROR)
        atomic_fetch_add(&g_errors, 1);
    if ((int)lvl > atomic_load(&g_level))
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    pthread_mutex_lock(&g_sink_lock);
    if (g_sink) {
        g_sink(g_sink_ctx, lvl, tag, msg);
    } else {
        char line[1200];
        int n = snprintf(line, sizeof line, "bnbfs[%s] %s: %s\n", tag, level_name(lvl), msg);
        if (n > (int)sizeof line - 1)
            n = (int)sizeof line - 1, line[n - 1] = '\n';
        ssize_t w = write(STDERR_FILENO, line, (size_t)n);
        (void)w;
    }
    pthread_mutex_unlock(&g_sink_lock);
}
