/* stats.c — the counters behind .bnbfs/stats and their JSON.
 *
 * Not where counting happens: cache.c, read.c and the adapter bump the
 * atomics in struct fs_stats; this file keeps the latency histogram math
 * and renders a consistent-enough snapshot (each counter is read once;
 * counters are not frozen together).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs_int.h"

uint64_t fs_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

void fs_stats_init(struct fs_stats *s)
{
    memset(s, 0, sizeof *s);
    clock_gettime(CLOCK_MONOTONIC, &s->t0);
    pthread_mutex_init(&s->conn_lock, NULL);
}

void fs_stats_fini(struct fs_stats *s)
{
    pthread_mutex_destroy(&s->conn_lock);
}

/* Latency buckets in µs: exact below 16, then 8 per power of two. */
static unsigned lat_bucket(uint64_t us)
{
    if (us < 16) return (unsigned)us;
    unsigned e = 63u - (unsigned)__builtin_clzll(us);
    unsigned i = 16 + (e - 4) * 8 + (unsigned)((us >> (e - 3)) & 7);
    return i < FS_LAT_BUCKETS ? i : FS_LAT_BUCKETS - 1;
}

static uint64_t lat_upper(unsigned i)
{
    if (i < 16) return i + 1;
    unsigned e = 4 + (i - 16) / 8, m = (i - 16) % 8;
    return (uint64_t)(8 + m + 1) << (e - 3);
}

void fs_stats_request(struct fs_core *c, size_t req_len, size_t served, uint64_t ns, int err)
{
    struct fs_stats *s = &c->stats;
    atomic_fetch_add_explicit(&s->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->bytes_served, served, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->lat[lat_bucket(ns / 1000)], 1, memory_order_relaxed);
    uint64_t m = atomic_load_explicit(&s->lat_max_ns, memory_order_relaxed);
    while (ns > m && !atomic_compare_exchange_weak(&s->lat_max_ns, &m, ns)) {}
    unsigned b = req_len ? 63u - (unsigned)__builtin_clzll(req_len) : 0;
    if (b >= FS_REQ_BUCKETS) b = FS_REQ_BUCKETS - 1;
    atomic_fetch_add_explicit(&s->req_size[b], 1, memory_order_relaxed);
    uint64_t r = atomic_load_explicit(&s->req_max, memory_order_relaxed);
    while (req_len > r && !atomic_compare_exchange_weak(&s->req_max, &r, req_len)) {}
    if (err == -EIO) atomic_fetch_add_explicit(&s->err_eio, 1, memory_order_relaxed);
    else if (err) atomic_fetch_add_explicit(&s->err_other, 1, memory_order_relaxed);
}

void fs_stats_set_conn(struct fs_core *c, const struct fs_conn_info *ci)
{
    pthread_mutex_lock(&c->stats.conn_lock);
    unsigned kb = c->stats.conn.kernel_readahead_kb;
    c->stats.conn = *ci;
    if (!ci->kernel_readahead_kb) c->stats.conn.kernel_readahead_kb = kb;
    c->stats.have_conn = true;
    pthread_mutex_unlock(&c->stats.conn_lock);
}

void fs_stats_set_kernel_readahead(struct fs_core *c, unsigned kb)
{
    pthread_mutex_lock(&c->stats.conn_lock);
    c->stats.conn.kernel_readahead_kb = kb;
    pthread_mutex_unlock(&c->stats.conn_lock);
}

static uint64_t ld(_Atomic uint64_t *p) { return atomic_load_explicit(p, memory_order_relaxed); }

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

int fs_stats_json(struct fs_core *c, char **out, size_t *len)
{
    struct fs_stats *s = &c->stats;
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return -ENOMEM;

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double up = (double)(now.tv_sec - s->t0.tv_sec) + (double)(now.tv_nsec - s->t0.tv_nsec) / 1e9;
    uint64_t reserved, pooled, peak;
    size_t entries, queued;
    fs_cache_snapshot(c, &reserved, &pooled, &peak, &entries, &queued);
    char gpu[32];
    uint32_t stale = 0;
    for (uint32_t i = 0; i < c->nsrcs; i++) stale += atomic_load(&c->srcs[i].stale);

    fprintf(f, "{\n  \"version\": \"%s\",\n  \"src\": ", BNBFS_VERSION);
    json_str(f, c->src);
    fprintf(f, ",\n  \"dtype\": \"%s\",\n  \"threads\": %u,\n  \"gpu\": \"%s\",\n"
            "  \"engines\": [", dq_dtype_name(c->plan->out_dtype), c->nthreads,
            fs_gpu_name(c->opts.gpu, gpu, sizeof gpu));
    for (unsigned i = 0, shown = 0; i < c->nbackend; i++) /* the engines that run */
        if (c->backend_started[i])
            fprintf(f, "%s\"%s\"", shown++ ? ", " : "", c->backend[i].name);
    fprintf(f, "],\n  \"uptime_s\": %.3f,\n", up);
    fprintf(f, "  \"plan\": {\"tensors\": %zu, \"slices\": %" PRIu64 ", \"bytes\": %" PRIu64
            ", \"max_slice_bytes\": %" PRIu64 ", \"readahead_bytes\": %" PRIu64 "},\n",
            c->plan->nout, c->total_slices, c->plan->total_bytes, c->max_slice, c->ra_max);
    fprintf(f, "  \"requests\": %" PRIu64 ",\n  \"bytes_served\": %" PRIu64 ",\n"
            "  \"bytes_internal\": %" PRIu64 ",\n",
            ld(&s->requests), ld(&s->bytes_served), ld(&s->bytes_internal));
    fprintf(f, "  \"bytes_computed\": {\"cpu\": %" PRIu64 ", \"gpu\": %" PRIu64 "},\n"
            "  \"slices_computed\": {\"cpu\": %" PRIu64 ", \"gpu\": %" PRIu64 "},\n",
            ld(&s->bytes_computed[FS_ENGINE_CPU]), ld(&s->bytes_computed[FS_ENGINE_GPU]),
            ld(&s->slices_computed[FS_ENGINE_CPU]), ld(&s->slices_computed[FS_ENGINE_GPU]));
    fprintf(f, "  \"cache\": {\"limit\": %" PRIu64 ", \"bytes_held\": %" PRIu64
            ", \"bytes_in_slices\": %" PRIu64 ", \"bytes_pooled\": %" PRIu64
            ", \"bytes_held_peak\": %" PRIu64 ", \"entries\": %zu, \"queued\": %zu,\n"
            "            \"hits\": %" PRIu64 ", \"joins\": %" PRIu64 ", \"misses\": %" PRIu64
            ", \"prefetch_issued\": %" PRIu64 ", \"evictions\": %" PRIu64
            ", \"memory_waits\": %" PRIu64 ", \"bounce_reads\": %" PRIu64 "},\n",
            c->cache.limit, reserved + pooled, reserved, pooled, peak, entries, queued,
            ld(&s->hits), ld(&s->joins), ld(&s->misses), ld(&s->prefetch_issued),
            ld(&s->evictions), ld(&s->mem_waits), ld(&s->bounce_reads));

    uint64_t total = 0, cnt[FS_LAT_BUCKETS];
    for (unsigned i = 0; i < FS_LAT_BUCKETS; i++) total += cnt[i] = ld(&s->lat[i]);
    const double q[] = { 0.5, 0.9, 0.99, 0.999 };
    const char *qn[] = { "p50", "p90", "p99", "p999" };
    fprintf(f, "  \"read_latency_us\": {");
    for (int k = 0; k < 4; k++) {
        uint64_t want = (uint64_t)((double)total * q[k] + 0.999999), acc = 0, v = 0;
        for (unsigned i = 0; i < FS_LAT_BUCKETS && total; i++) {
            acc += cnt[i];
            if (acc >= want) { v = lat_upper(i); break; }
        }
        fprintf(f, "\"%s\": %" PRIu64 ", ", qn[k], v);
    }
    fprintf(f, "\"max\": %" PRIu64 "},\n", ld(&s->lat_max_ns) / 1000);
    fprintf(f, "  \"request_sizes\": {");
    bool first = true;
    for (unsigned b = 0; b < FS_REQ_BUCKETS; b++) {
        uint64_t v = ld(&s->req_size[b]);
        if (!v) continue;
        fprintf(f, "%s\"%" PRIu64 "\": %" PRIu64, first ? "" : ", ", (uint64_t)1 << b, v);
        first = false;
    }
    fprintf(f, "},\n  \"max_request\": %" PRIu64 ",\n", ld(&s->req_max));
    fprintf(f, "  \"wakeups\": {\"engine\": %" PRIu64 ", \"cpu\": %" PRIu64 "},\n",
            ld(&s->wakeups_engine), ld(&s->wakeups_cpu));
    fprintf(f, "  \"errors\": {\"eio\": %" PRIu64 ", \"other\": %" PRIu64 ", \"logged\": %" PRIu64
            ", \"stale_sources\": %u, \"stale_events\": %" PRIu64 "},\n  \"saturated\": %" PRIu64,
            ld(&s->err_eio), ld(&s->err_other), dq_log_error_count(), stale,
            ld(&s->stale_events), ld(&s->saturated));
    pthread_mutex_lock(&s->conn_lock);
    if (s->have_conn) {
        const struct fs_conn_info *ci = &s->conn;
        fprintf(f, ",\n  \"fuse\": {\"proto\": \"%u.%u\", \"max_write\": %u, \"max_read\": %u, "
                "\"max_readahead\": %u, \"max_background\": %u, \"congestion_threshold\": %u, "
                "\"max_threads\": %u, \"kernel_readahead_kb\": %u, \"splice_write\": %s, "
                "\"clone_fd\": %s}",
                ci->proto_major, ci->proto_minor, ci->max_write, ci->max_read, ci->max_readahead,
                ci->max_background, ci->congestion_threshold, ci->max_threads,
                ci->kernel_readahead_kb,
                ci->splice_write ? "true" : "false", ci->clone_fd ? "true" : "false");
    }
    pthread_mutex_unlock(&s->conn_lock);
    for (unsigned i = 0; i < c->nbackend; i++)
        if (c->backend_started[i] && c->backend[i].stats_json) {
            fprintf(f, ",\n  \"engine_%s\": {", c->backend[i].name);
            c->backend[i].stats_json(c->backend[i].ctx, f);
            fprintf(f, "}");
        }
    fprintf(f, "\n}\n");
    if (fclose(f)) { free(buf); return -ENOMEM; }
    *out = buf;
    *len = n;
    return 0;
}
