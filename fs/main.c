/* main.c — the bnbfs command: `bnbfs SRC MNT [-o opts] [-f] [-d]` mounts,
 * `bnbfs --ls SRC` and `bnbfs --cat SRC PATH` use the same core without
 * mounting (for inspection, and proof that the core needs no FUSE).
 *
 * Not the filesystem: fs/fuse_ll.c answers requests, libfscore does the work.
 * Invariants: SRC is validated completely before anything is mounted (a bad
 * SRC or MNT exits non-zero with nothing mounted); compute threads start
 * only after fuse_daemonize() forked; the process exits 0 after a clean
 * unmount (fusermount3 -u, or SIGINT/SIGTERM/SIGHUP in the foreground).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "fuse_ll.h"

struct cli {
    char *src, *mnt;            /* owned */
    char **path;                /* --cat PATHs; owned */
    int npath;
    int mode;                   /* MODE_* */
    bool help, version, bad_opt, user_max_threads;
    uint64_t kernel_ra;         /* -o kernel_readahead=SIZE (bytes; 0 leaves the kernel's) */
    int nonopt;
    struct fs_opts opts;
};

enum { MODE_MOUNT = 0, MODE_LS, MODE_CAT };
enum { K_HELP, K_VERSION, K_LS, K_CAT, K_OPT, K_MAXTHREADS, K_KRA };

static const struct fuse_opt spec[] = {
    FUSE_OPT_KEY("-h", K_HELP),
    FUSE_OPT_KEY("--help", K_HELP),
    FUSE_OPT_KEY("-V", K_VERSION),
    FUSE_OPT_KEY("--version", K_VERSION),
    FUSE_OPT_KEY("--ls", K_LS),
    FUSE_OPT_KEY("--cat", K_CAT),
    FUSE_OPT_KEY("dtype=", K_OPT),
    FUSE_OPT_KEY("cache=", K_OPT),
    FUSE_OPT_KEY("threads=", K_OPT),
    FUSE_OPT_KEY("gpu=", K_OPT),
    FUSE_OPT_KEY("readahead=", K_OPT),
    FUSE_OPT_KEY("max_threads=", K_MAXTHREADS),
    FUSE_OPT_KEY("kernel_readahead=", K_KRA),
    FUSE_OPT_END
};

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *out)
{
    (void)out;
    struct cli *c = data;
    switch (key) {
    case K_HELP: c->help = true; return 0;
    case K_VERSION: c->version = true; return 0;
    case K_LS: c->mode = MODE_LS; return 0;
    case K_CAT: c->mode = MODE_CAT; return 0;
    case K_MAXTHREADS: c->user_max_threads = true; return 1;
    case K_KRA: {
        const char *v = strchr(arg, '=') + 1;
        if (dq_parse_size(v, &c->kernel_ra) || c->kernel_ra > (1ull << 30)) {
            fprintf(stderr, "bnbfs: option kernel_readahead=%s: expected a size such as 4M, or 0\n",
                    v);
            c->bad_opt = true;
        }
        return 0;
    }
    case K_OPT: {
        char k[32];
        const char *eq = strchr(arg, '=');
        size_t n = (size_t)(eq - arg);
        if (n >= sizeof k) n = sizeof k - 1;
        memcpy(k, arg, n);
        k[n] = 0;
        if (fs_opts_set(&c->opts, k, eq + 1)) c->bad_opt = true;
        return 0;
    }
    case FUSE_OPT_KEY_NONOPT:
        c->nonopt++;
        if (!c->src) { c->src = strdup(arg); return 0; }
        if (c->mode == MODE_CAT) {
            char **p = realloc(c->path, (size_t)(c->npath + 1) * sizeof *p);
            if (!p || !(p[c->npath] = strdup(arg))) { c->path = p; c->bad_opt = true; return 0; }
            c->path = p;
            c->npath++;
            return 0;
        }
        if (!c->mnt) { c->mnt = strdup(arg); return 1; }     /* fuse_parse_cmdline wants it */
        fprintf(stderr, "bnbfs: unexpected argument '%s' (try --help)\n", arg);
        c->bad_opt = true;
        return 0;
    default:
        return 1;
    }
}

static void usage(FILE *f, const char *prog)
{
    char n[16];
    snprintf(n, sizeof n, "%u", dq_ncpus());
    fprintf(f,
"usage: %s SRC MNT [-o opt,...] [-f] [-d]\n"
"       %s --ls SRC [-o dtype=...]        list the tree MNT would show, without mounting\n"
"       %s --cat SRC PATH... [-o opt,...] write files of that tree to stdout\n"
"\n"
"Mounts the Unsloth bitsandbytes 4-bit checkpoint directory SRC at MNT as an\n"
"ordinary Hugging Face checkpoint (config.json, model-0000K-of-0000N.safetensors,\n"
"index, tokenizer files) whose tensors are dequantized only when read. Also\n"
"under MNT: tensors/NAME (raw data of one tensor, with user.bnbfs.* xattrs),\n"
".bnbfs/stats (live counters), and MNT's own xattr user.bnbfs.source (SRC's\n"
"absolute path). SRC is opened read-only and never written.\n"
"\n"
"bnbfs options:\n"
"    -o dtype=f16|bf16|f32  dtype of the float tensors (default f16)\n"
"    -o cache=SIZE          RAM for computed slices, never exceeded (default 2G)\n"
"    -o threads=N           CPU threads that compute slices (default %s: all cores)\n"
#if BNBFS_HAVE_CUDA
"    -o gpu=auto|off|N      where 4-bit slices are computed: auto (default) uses\n"
"                           CUDA device 0 when it works and the CPU otherwise; N\n"
"                           picks device N; off computes on the CPU only\n"
#else
"    -o gpu=auto|off|N      this build has no CUDA: auto and off compute on the\n"
"                           CPU, N is refused\n"
#endif
"    -o readahead=SIZE      read-ahead window per open file (default: 4 slices per\n"
"                           thread, 16M..256M; 0 turns read-ahead off)\n"
"    -o kernel_readahead=SIZE  the kernel's read-ahead for this mount (default 4M;\n"
"                           needs root, else the kernel's 128K stays; 0: leave it).\n"
"                           FUSE gets 128K at mount, which caps requests at 128K\n"
"    -f                     stay in the foreground (log to stderr; else syslog)\n"
"    -d                     debug output (implies -f)\n"
"    -h, --help             this help\n"
"    -V, --version          versions of bnbfs and libfuse\n"
"\n"
"Unmount with: fusermount3 -u MNT\n"
"\n", prog, prog, prog, n);
}

static void syslog_sink(void *ctx, enum dq_log_level lvl, const char *tag, const char *msg)
{
    (void)ctx;
    int prio = lvl == DQ_LOG_ERROR ? LOG_ERR : lvl == DQ_LOG_WARN ? LOG_WARNING
             : lvl == DQ_LOG_INFO ? LOG_INFO : LOG_DEBUG;
    syslog(prio, "[%s] %s", tag, msg);
}

/* ------------------------------------------------------------ --ls --cat */

static void ls_walk(struct fs_core *c, uint64_t dir)
{
    for (uint64_t i = 2;; i++) {
        const char *name;
        struct stat st;
        if (fs_dir_entry(c, dir, i, &name, &st)) break;
        char path[1024];
        fs_node_path(c, st.st_ino, path, sizeof path);
        if (S_ISDIR(st.st_mode)) {
            printf("%14s  %s/\n", "-", path);
            ls_walk(c, st.st_ino);
        } else {
            printf("%14" PRIu64 "  %s\n", (uint64_t)st.st_size, path);
        }
    }
}

static int cat_file(struct fs_core *c, const char *path)
{
    uint64_t ino;
    int err = fs_resolve(c, path, &ino);
    if (err) {
        fprintf(stderr, "bnbfs: %s: %s\n", path, strerror(-err));
        return 1;
    }
    struct stat st;
    fs_getattr(c, ino, &st);
    if (S_ISDIR(st.st_mode)) {
        fprintf(stderr, "bnbfs: %s: %s\n", path, strerror(EISDIR));
        return 1;
    }
    const size_t chunk = 8u << 20;
    char *buf = malloc(chunk);
    if (!buf) return 1;
    int rc = 0;
    for (uint64_t off = 0;;) {
        size_t got;
        if ((err = fs_pread(c, ino, buf, chunk, off, &got))) {
            fprintf(stderr, "bnbfs: %s at %" PRIu64 ": %s\n", path, off, strerror(-err));
            rc = 1;
            break;
        }
        if (!got) break;
        if (fwrite(buf, 1, got, stdout) != got) { perror("bnbfs: stdout"); rc = 1; break; }
        off += got;
    }
    free(buf);
    if (fflush(stdout)) rc = 1;
    return rc;
}

/* ----------------------------------------------------------------- main */

static double since_ms(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) * 1e3 + (double)(t.tv_nsec - t0->tv_nsec) / 1e6;
}

static int run_mount(struct cli *cli, struct fuse_args *args)
{
    struct fuse_cmdline_opts co;
    struct fs_core *core = NULL;
    struct fuse_session *se = NULL;
    struct fuse_loop_config *cfg = NULL;
    struct fs_fuse fa = {0};
    int rc = 1;
    char *fsname = NULL;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    memset(&co, 0, sizeof co);
    if (!cli->src || !cli->mnt) {
        fprintf(stderr, "bnbfs: need SRC and MNT (try --help)\n");
        return 2;
    }
    struct stat st;
    if (stat(cli->mnt, &st)) {
        fprintf(stderr, "bnbfs: mount point %s: %s; nothing was mounted\n", cli->mnt,
                strerror(errno));
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "bnbfs: mount point %s: not a directory; nothing was mounted\n", cli->mnt);
        return 1;
    }
    if (fuse_parse_cmdline(args, &co)) return 1;       /* libfuse said why */
    if (co.debug) dq_log_set_level(DQ_LOG_DEBUG);

    if (fs_core_open(cli->src, &cli->opts, &core)) {
        fprintf(stderr, "bnbfs: %s is not a usable checkpoint; nothing was mounted\n", cli->src);
        goto out;
    }
    fa.core = core;
    fa.clone_fd = co.clone_fd;
    fa.mountpoint = co.mountpoint;
    fa.kernel_ra_kb = (unsigned)(cli->kernel_ra / 1024);
    fa.max_threads = cli->user_max_threads ? co.max_threads
                   : (fs_core_opts(core)->threads ? fs_core_opts(core)->threads : dq_ncpus()) * 2;
    if (!cli->user_max_threads) {
        if (fa.max_threads < 16) fa.max_threads = 16;
        if (fa.max_threads > 64) fa.max_threads = 64;
    }
    fa.conn_opts = fuse_parse_conn_info_opts(args);
    if (!fa.conn_opts) goto out;
    /* Read-only at the VFS and named after SRC; options the user gave come
     * later on the command line and win. */
    {
        size_t n = strlen(fs_core_src(core)) + 16;
        char *v = malloc(n), *o = NULL;
        if (!v) goto out;
        snprintf(v, n, "fsname=%s", fs_core_src(core));
        int e = fuse_opt_add_opt_escaped(&o, v);
        free(v);
        if (e || asprintf(&fsname, "-o%s", o) < 0) { free(o); fsname = NULL; goto out; }
        free(o);
        if (fuse_opt_insert_arg(args, 1, "-oro") || fuse_opt_insert_arg(args, 1, "-osubtype=bnbfs") ||
            fuse_opt_insert_arg(args, 1, fsname))
            goto out;
    }

    se = fuse_session_new(args, fs_fuse_ops(), sizeof *fs_fuse_ops(), &fa);
    if (!se) {
        fprintf(stderr, "bnbfs: invalid FUSE options; nothing was mounted\n");
        goto out;
    }
    fa.se = se;
    if (fuse_set_signal_handlers(se)) goto out_destroy;
    if (fuse_session_mount(se, co.mountpoint)) {
        fprintf(stderr, "bnbfs: cannot mount at %s\n", co.mountpoint);
        goto out_signals;
    }
    double mount_ms = since_ms(&t0);
    if (fuse_daemonize(co.foreground)) goto out_unmount;
    if (!co.foreground) {
        openlog("bnbfs", LOG_PID, LOG_DAEMON);
        dq_log_set_sink(syslog_sink, NULL);
    }
    fs_core_set_inval(core, fs_fuse_inval, &fa);
    if (fs_core_start(core)) goto out_unmount;
    {
        const struct dq_plan *p = fs_core_plan(core);
        char sz[64];
        const struct fs_opts *o = fs_core_opts(core);
        char gname[32];
        dq_log(DQ_LOG_INFO, "main", "mounted %s at %s: %zu tensors, %s of %s, computed on %u CPU "
               "threads, gpu=%s%s; ready in %.0f ms", fs_core_src(core), co.mountpoint, p->nout,
               dq_fmt_size(p->total_bytes, sz, sizeof sz), dq_dtype_name(p->out_dtype),
               o->threads ? o->threads : dq_ncpus(), fs_gpu_name(o->gpu, gname, sizeof gname),
               BNBFS_HAVE_CUDA ? "" : " (this build has no GPU engine)", mount_ms);
    }

    int lr;
    if (co.singlethread) {
        lr = fuse_session_loop(se);
    } else {
        cfg = fuse_loop_cfg_create();
        if (!cfg) goto out_unmount;
        fuse_loop_cfg_set_clone_fd(cfg, (unsigned)co.clone_fd);
        fuse_loop_cfg_set_max_threads(cfg, fa.max_threads);
        if (co.max_idle_threads != UINT_MAX)     /* libfuse's default: never reap */
            fuse_loop_cfg_set_idle_threads(cfg, co.max_idle_threads);
        lr = fuse_session_loop_mt(se, cfg);
    }
    /* 0: unmounted; > 0: the signal that asked us to stop. Both are clean. */
    if (lr < 0) dq_log(DQ_LOG_ERROR, "main", "FUSE session ended: %s", strerror(-lr));
    else rc = 0;

out_unmount:
    fs_core_stop(core);
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_destroy:
    fuse_session_destroy(se);
out:
    if (cfg) fuse_loop_cfg_destroy(cfg);
    fs_core_close(core);
    free(fa.conn_opts);
    free(fsname);
    free(co.mountpoint);
    return rc;
}

int main(int argc, char **argv)
{
    struct cli cli;
    memset(&cli, 0, sizeof cli);
    fs_opts_init(&cli.opts);
    cli.kernel_ra = 4u << 20;
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    if (fuse_opt_parse(&args, &cli, spec, opt_proc)) {
        fuse_opt_free_args(&args);
        return 2;
    }
    int rc = 0;
    if (cli.help) {
        usage(stdout, "bnbfs");
        printf("FUSE options:\n");
        fflush(stdout);
        fuse_cmdline_help();
        fuse_lowlevel_help();
        goto out;
    }
    if (cli.version) {
        printf("bnbfs %s (dequant %s)\n", BNBFS_VERSION, DQ_VERSION);
        printf("libfuse %s\n", fuse_pkgversion());
        fflush(stdout);
        fuse_lowlevel_version();
        goto out;
    }
    if (cli.bad_opt) { rc = 2; goto out; }

    if (cli.mode == MODE_MOUNT) {
        rc = run_mount(&cli, &args);
        goto out;
    }
    if (!cli.src || (cli.mode == MODE_CAT && !cli.npath) || cli.mnt) {
        fprintf(stderr, "bnbfs: usage: bnbfs --ls SRC | bnbfs --cat SRC PATH... (try --help)\n");
        rc = 2;
        goto out;
    }
    struct fs_core *core;
    if (fs_core_open(cli.src, &cli.opts, &core)) { rc = 1; goto out; }
    if (cli.mode == MODE_LS) {
        ls_walk(core, FS_ROOT_INO);
    } else if (fs_core_start(core)) {
        rc = 1;
    } else {
        for (int i = 0; i < cli.npath && !rc; i++) rc = cat_file(core, cli.path[i]);
    }
    fs_core_close(core);
out:
    fuse_opt_free_args(&args);
    free(cli.src);
    free(cli.mnt);
    for (int i = 0; i < cli.npath; i++) free(cli.path[i]);
    free(cli.path);
    return rc;
}
