/* util.c — small shared pieces of the core: dtype tables, size parsing and
 * formatting, the parallel-for, and the SIGBUS guard that turns a fault on a
 * truncated mapped source into -EIO for the faulting thread only. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dequant.h"

/* ------------------------------------------------------------- dtypes */

static const struct { const char *name; size_t size; } g_dtypes[DQ_DTYPE_COUNT] = {
    [DQ_BOOL] = {"BOOL", 1}, [DQ_U8] = {"U8", 1},   [DQ_I8] = {"I8", 1},
    [DQ_I16] = {"I16", 2},   [DQ_U16] = {"U16", 2}, [DQ_F16] = {"F16", 2},
    [DQ_BF16] = {"BF16", 2}, [DQ_I32] = {"I32", 4}, [DQ_U32] = {"U32", 4},
    [DQ_F32] = {"F32", 4},   [DQ_F64] = {"F64", 8}, [DQ_I64] = {"I64", 8},
    [DQ_U64] = {"U64", 8},   [DQ_F8_E4M3] = {"F8_E4M3", 1}, [DQ_F8_E5M2] = {"F8_E5M2", 1},
};

size_t dq_dtype_size(enum dq_dtype t) { return (unsigned)t < DQ_DTYPE_COUNT ? g_dtypes[t].size : 0; }
const char *dq_dtype_name(enum dq_dtype t) { return (unsigned)t < DQ_DTYPE_COUNT ? g_dtypes[t].name : "?"; }

int dq_dtype_parse(const char *s, enum dq_dtype *out)
{
    for (int i = 0; i < DQ_DTYPE_COUNT; i++)
        if (strcmp(s, g_dtypes[i].name) == 0) {
            *out = (enum dq_dtype)i;
            return 0;
        }
    return -EINVAL;
}

bool dq_dtype_is_float(enum dq_dtype t)
{
    return t == DQ_F16 || t == DQ_BF16 || t == DQ_F32 || t == DQ_F64;
}

int dq_out_dtype_parse(const char *s, enum dq_dtype *out)
{
    if (!strcasecmp(s, "f16") || !strcasecmp(s, "float16") || !strcasecmp(s, "fp16"))
        *out = DQ_F16;
    else if (!strcasecmp(s, "bf16") || !strcasecmp(s, "bfloat16"))
        *out = DQ_BF16;
    else if (!strcasecmp(s, "f32") || !strcasecmp(s, "float32") || !strcasecmp(s, "fp32"))
        *out = DQ_F32;
    else
        return -EINVAL;
    return 0;
}

/* --------------------------------------------------------------- files */

int dq_read_file(const char *path, uint64_t max_bytes, char **out, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    int rc = 0;
    char *buf = NULL;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
        goto out;
    }
    if ((uint64_t)st.st_size > max_bytes) {
        rc = -EFBIG;
        goto out;
    }
    size_t n = (size_t)st.st_size, got = 0;
    if (!(buf = malloc(n + 1))) {
        rc = -ENOMEM;
        goto out;
    }
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            rc = r < 0 ? -errno : -EIO;
            goto out;
        }
        got += (size_t)r;
    }
    buf[n] = 0;
    *out = buf;
    buf = NULL;
    if (len)
        *len = n;
out:
    free(buf);
    close(fd);
    return rc;
}

/* --------------------------------------------------------------- sizes */

int dq_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s)
        return -EINVAL;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || !isfinite(v))
        return -EINVAL;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end == 'i' && mul > 1)
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end)
        return -EINVAL;
    v *= mul;
    if (v >= 18446744073709551615.0)
        return -ERANGE;
    *out = (uint64_t)v;
    return 0;
}

const char *dq_fmt_size(uint64_t b, char *buf, size_t n)
{
    static const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1024 && u < 4)
        v /= 1024, u++;
    if (u == 0)
        snprintf(buf, n, "%llu B", (unsigned long long)b);
    else
        snprintf(buf, n, "%.2f %s", v, unit[u]);
    return buf;
}

/* -------------------------------------------------------- parallel for */

unsigned dq_ncpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0)
            return (unsigned)n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

struct pfor {
    int (*fn)(void *, uint64_t);
    void *ctx;
    uint64_t n;
    _Atomic uint64_t next;
    _Atomic int rc;
};

static void *pfor_worker(void *arg)
{
    struct pfor *p = arg;
    for (;;) {
        uint64_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n)
            break;
        int rc = p->fn(p->ctx, i);
        if (rc) {
            int zero = 0;
            atomic_compare_exchange_strong(&p->rc, &zero, rc);
        }
    }
    return NULL;
}

int dq_parallel_for(unsigned nthreads, uint64_t n, int (*fn)(void *ctx, uint64_t i), void *ctx)
{
    if (nthreads == 0)
        nthreads = dq_ncpus();
    if ((uint64_t)nthreads > n)
        nthreads = n ? (unsigned)n : 1;
    struct pfor p = {.fn = fn, .ctx = ctx, .n = n};
    atomic_init(&p.next, 0);
    atomic_init(&p.rc, 0);
    pthread_t *tid = nthreads > 1 ? calloc(nthreads - 1, sizeof *tid) : NULL;
    unsigned started = 0;
    for (unsigned t = 0; tid && t + 1 < nthreads; t++) {
        if (pthread_create(&tid[t], NULL, pfor_worker, &p) != 0)
            break; /* fewer threads is still correct */
        started++;
    }
    pfor_worker(&p);
    for (unsigned t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    free(tid);
    return atomic_load(&p.rc);
}

/* --------------------------------------------------------------- guard */

/* Per-thread jump target while a guarded function runs; NULL outside. */
static __thread sigjmp_buf *tls_bus_jmp;
static struct sigaction g_old_bus;
static pthread_once_t g_bus_once = PTHREAD_ONCE_INIT;

static void bus_handler(int sig, siginfo_t *si, void *uc)
{
    if (tls_bus_jmp)
        siglongjmp(*tls_bus_jmp, 1);
    /* Not ours: fall back to what was there (default: die with SIGBUS). */
    sigaction(SIGBUS, &g_old_bus, NULL);
    (void)sig, (void)si, (void)uc;
}

static void bus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

int dq_guard(int (*fn)(void *ctx), void *ctx)
{
    pthread_once(&g_bus_once, bus_install);
    sigjmp_buf jb;
    sigjmp_buf *volatile prev = tls_bus_jmp;
    if (sigsetjmp(jb, 1)) {
        tls_bus_jmp = prev;
        return -EIO;
    }
    tls_bus_jmp = &jb;
    int rc = fn(ctx);
    tls_bus_jmp = prev;
    return rc;
}
