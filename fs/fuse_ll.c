/* fuse_ll.c — bnbfs behind libfuse's low-level API: each handler maps one
 * kernel request onto libfscore and replies exactly once; errors are the
 * core's -errno, negated into fuse_reply_err.
 *
 * Not policy: what files exist, what they hold and how reads are computed
 * live in the core (fs.h). This file only knows FUSE: entry/attribute
 * timeouts (files never change, so they are long and the page cache is
 * kept across opens, which also makes mmap work), connection parameters,
 * and zero-copy replies (fuse_reply_iov straight from cache slices).
 * Invariant: the mount is read-only; every request that would modify it
 * gets EROFS.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fuse_ll.h"

#define TIMEOUT 86400.0     /* seconds: the tree and its attributes never change */
#define MAX_BACKGROUND 64   /* kernel read-ahead requests in flight per mount */

static struct fs_fuse *F(fuse_req_t req) { return fuse_req_userdata(req); }

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The kernel offers FUSE at most 128 KiB of read-ahead at INIT (its bdi
 * default), so sequential reads arrive as 128 KiB requests although a
 * request may carry 1 MiB. The bdi's read_ahead_kb (root only) lifts that;
 * INIT resets it, so it is set once the first request after INIT arrives. */
static unsigned read_uint_file(const char *path)
{
    FILE *f = fopen(path, "re");
    unsigned v = 0;
    if (f) {
        if (fscanf(f, "%u", &v) != 1) v = 0;
        fclose(f);
    }
    return v;
}

static void unescape_mountinfo(char *s)
{
    char *o = s;
    for (char *p = s; *p; p++) {
        if (p[0] == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' &&
            p[3] >= '0' && p[3] <= '7') {
            *o++ = (char)((p[1] - '0') * 64 + (p[2] - '0') * 8 + (p[3] - '0'));
            p += 3;
        } else {
            *o++ = *p;
        }
    }
    *o = 0;
}

static void bdi_tune(struct fs_fuse *f)
{
    if (atomic_load_explicit(&f->bdi_done, memory_order_relaxed) ||
        atomic_exchange(&f->bdi_done, true) || !f->mountpoint)
        return;
    FILE *m = fopen("/proc/self/mountinfo", "re");
    if (!m) return;
    char line[4096], dev[64] = "";
    while (fgets(line, sizeof line, m)) {
        char mm[64], mp[4096];
        if (sscanf(line, "%*u %*u %63s %*s %4095s", mm, mp) != 2) continue;
        unescape_mountinfo(mp);
        if (!strcmp(mp, f->mountpoint)) snprintf(dev, sizeof dev, "%s", mm);  /* last one wins */
    }
    fclose(m);
    if (!dev[0]) return;
    char path[128];
    snprintf(path, sizeof path, "/sys/class/bdi/%s/read_ahead_kb", dev);
    unsigned before = read_uint_file(path), now = before;
    if (f->kernel_ra_kb && f->kernel_ra_kb != before) {
        FILE *w = fopen(path, "we");
        bool ok = w && fprintf(w, "%u\n", f->kernel_ra_kb) > 0;
        if (w && fclose(w)) ok = false;
        now = read_uint_file(path);
        dq_log(DQ_LOG_DEBUG, "fuse", "%s: kernel read-ahead %u KiB -> %u KiB%s", f->mountpoint,
               before, now, ok ? "" : " (not permitted: run as root to raise it)");
    }
    fs_stats_set_kernel_readahead(f->core, now);
}

static void ll_init(void *ud, struct fuse_conn_info *conn)
{
    struct fs_fuse *f = ud;
    /* Parallel readers each keep read-ahead requests in flight; the kernel's
     * default of 12 background requests would serialize them. */
    conn->max_background = MAX_BACKGROUND;
    conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
    /* Our bytes live in memory: splicing them would add a copy (libfuse
     * writes memory buffers into a pipe). writev from the slices is the
     * one copy there has to be. -o splice_write still turns it on. */
    conn->want &= ~(unsigned)FUSE_CAP_SPLICE_WRITE;
    if (f->conn_opts) fuse_apply_conn_info_opts(f->conn_opts, conn);
    f->splice = conn->want & FUSE_CAP_SPLICE_WRITE;
    struct fs_conn_info ci = {
        .proto_major = conn->proto_major, .proto_minor = conn->proto_minor,
        .max_write = conn->max_write, .max_read = conn->max_read,
        .max_readahead = conn->max_readahead, .max_background = conn->max_background,
        .congestion_threshold = conn->congestion_threshold, .max_threads = f->max_threads,
        .splice_write = f->splice, .clone_fd = f->clone_fd,
    };
    fs_stats_set_conn(f->core, &ci);
    dq_log(DQ_LOG_DEBUG, "fuse", "init: protocol %u.%u, max_write %u, max_readahead %u, "
           "max_background %u, splice_write %d", conn->proto_major, conn->proto_minor,
           conn->max_write, conn->max_readahead, conn->max_background, f->splice);
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    bdi_tune(F(req));
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    int err = fs_lookup(F(req)->core, parent, name, &e.attr);
    if (err == -ENOENT) {
        /* Negative entry: the tree never changes, let the kernel remember. */
        e.ino = 0;
        e.entry_timeout = TIMEOUT;
        fuse_reply_entry(req, &e);
        return;
    }
    if (err) { fuse_reply_err(req, -err); return; }
    e.ino = e.attr.st_ino;
    e.generation = 1;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    fuse_reply_entry(req, &e);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    (void)ino; (void)nlookup;     /* inodes are static */
    fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    (void)count; (void)forgets;
    fuse_reply_none(req);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    bdi_tune(F(req));
    (void)fi;
    struct stat st;
    int err = fs_getattr(F(req)->core, ino, &st);
    if (err) fuse_reply_err(req, -err);
    else fuse_reply_attr(req, &st, TIMEOUT);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    bdi_tune(F(req));
    struct fs_file *file;
    bool direct;
    int err = fs_open(F(req)->core, ino, fi->flags, &file, &direct);
    if (err) { fuse_reply_err(req, -err); return; }
    fi->fh = (uintptr_t)file;
    fi->keep_cache = !direct;
    fi->direct_io = direct;
    fi->noflush = 1;
    if (fuse_reply_open(req, fi)) fs_close(file);     /* the open was interrupted */
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)ino;
    struct fs_fuse *f = F(req);
    uint64_t t0 = now_ns();
    struct fs_reply r;
    int err = off < 0 ? -EINVAL : fs_read((struct fs_file *)(uintptr_t)fi->fh, (uint64_t)off,
                                          size, &r);
    if (err) {
        fuse_reply_err(req, -err);
        fs_stats_request(f->core, size, 0, now_ns() - t0, err);
        return;
    }
    if (!r.niov) {
        fuse_reply_buf(req, NULL, 0);
    } else if (f->splice) {
        /* struct fuse_bufvec ends in buf[1]: allocate room for niov. */
        size_t sz = offsetof(struct fuse_bufvec, buf) + (size_t)r.niov * sizeof(struct fuse_buf);
        struct fuse_bufvec *bv = calloc(1, sz);
        if (!bv) {
            fuse_reply_iov(req, r.iov, r.niov);
        } else {
            struct fuse_buf *b = (struct fuse_buf *)((char *)bv + offsetof(struct fuse_bufvec, buf));
            bv->count = (size_t)r.niov;
            for (int i = 0; i < r.niov; i++) {
                b[i].mem = r.iov[i].iov_base;
                b[i].size = r.iov[i].iov_len;
            }
            fuse_reply_data(req, bv, FUSE_BUF_SPLICE_MOVE);
            free(bv);
        }
    } else {
        fuse_reply_iov(req, r.iov, r.niov);
    }
    size_t served = r.len;
    fs_reply_release(&r);
    fs_stats_request(f->core, size, served, now_ns() - t0, 0);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    fs_close((struct fs_file *)(uintptr_t)fi->fh);
    fuse_reply_err(req, 0);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    int err = fs_getattr(F(req)->core, ino, &st);
    if (!err && !S_ISDIR(st.st_mode)) err = -ENOTDIR;
    if (err) { fuse_reply_err(req, -err); return; }
    if ((fi->flags & O_ACCMODE) != O_RDONLY) { fuse_reply_err(req, EROFS); return; }
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    (void)fi;
    struct fs_core *c = F(req)->core;
    char *buf = malloc(size ? size : 1);
    if (!buf) { fuse_reply_err(req, ENOMEM); return; }
    size_t used = 0;
    int err = 0;
    for (uint64_t idx = off < 0 ? 0 : (uint64_t)off;; idx++) {
        const char *name;
        struct stat st;
        err = fs_dir_entry(c, ino, idx, &name, &st);
        if (err == -ENOENT) { err = 0; break; }
        if (err) break;
        size_t need = fuse_add_direntry(req, buf + used, size - used, name, &st, (off_t)idx + 1);
        if (need > size - used) break;
        used += need;
    }
    if (err) fuse_reply_err(req, -err);
    else fuse_reply_buf(req, buf, used);
    free(buf);
}

static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
    bdi_tune(F(req));
    (void)ino;
    struct statvfs sv;
    fs_statfs(F(req)->core, &sv);
    fuse_reply_statfs(req, &sv);
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    char stackbuf[4096];
    char *buf = size <= sizeof stackbuf ? stackbuf : malloc(size);
    if (!buf) { fuse_reply_err(req, ENOMEM); return; }
    size_t len;
    int err = fs_xattr_get(F(req)->core, ino, name, buf, size, &len);
    if (err) fuse_reply_err(req, -err);
    else if (!size) fuse_reply_xattr(req, len);
    else fuse_reply_buf(req, buf, len);
    if (buf != stackbuf) free(buf);
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    char buf[512];
    size_t len;
    int err = fs_xattr_list(F(req)->core, ino, buf, size < sizeof buf ? size : sizeof buf, &len);
    if (err) fuse_reply_err(req, -err);
    else if (!size) fuse_reply_xattr(req, len);
    else fuse_reply_buf(req, buf, len);
}

static void ll_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
    struct stat st;
    int err = fs_getattr(F(req)->core, ino, &st);
    if (!err && (mask & W_OK)) err = -EROFS;
    fuse_reply_err(req, -err);
}

/* ------------------------------------------------- read-only: EROFS */

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    (void)ino; (void)attr; (void)to_set; (void)fi;
    fuse_reply_err(req, EROFS);
}

static void ll_mknod(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, dev_t d)
{
    (void)p; (void)n; (void)m; (void)d;
    fuse_reply_err(req, EROFS);
}

static void ll_mkdir(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m)
{
    (void)p; (void)n; (void)m;
    fuse_reply_err(req, EROFS);
}

static void ll_unlink(fuse_req_t req, fuse_ino_t p, const char *n)
{
    (void)p; (void)n;
    fuse_reply_err(req, EROFS);
}

static void ll_symlink(fuse_req_t req, const char *l, fuse_ino_t p, const char *n)
{
    (void)l; (void)p; (void)n;
    fuse_reply_err(req, EROFS);
}

static void ll_rename(fuse_req_t req, fuse_ino_t p, const char *n, fuse_ino_t np,
                      const char *nn, unsigned int flags)
{
    (void)p; (void)n; (void)np; (void)nn; (void)flags;
    fuse_reply_err(req, EROFS);
}

static void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t np, const char *nn)
{
    (void)ino; (void)np; (void)nn;
    fuse_reply_err(req, EROFS);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)ino; (void)buf; (void)size; (void)off; (void)fi;
    fuse_reply_err(req, EROFS);
}

static void ll_create(fuse_req_t req, fuse_ino_t p, const char *n, mode_t m,
                      struct fuse_file_info *fi)
{
    (void)p; (void)n; (void)m; (void)fi;
    fuse_reply_err(req, EROFS);
}

static void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    (void)ino; (void)name; (void)value; (void)size; (void)flags;
    fuse_reply_err(req, EROFS);
}

static void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    (void)ino; (void)name;
    fuse_reply_err(req, EROFS);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    (void)ino; (void)mode; (void)off; (void)len; (void)fi;
    fuse_reply_err(req, EROFS);
}

static const struct fuse_lowlevel_ops ops = {
    .init = ll_init,
    .lookup = ll_lookup,
    .forget = ll_forget,
    .forget_multi = ll_forget_multi,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .mknod = ll_mknod,
    .mkdir = ll_mkdir,
    .unlink = ll_unlink,
    .rmdir = ll_unlink,
    .symlink = ll_symlink,
    .rename = ll_rename,
    .link = ll_link,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_flush,
    .release = ll_release,
    .opendir = ll_opendir,
    .readdir = ll_readdir,
    .releasedir = ll_releasedir,
    .statfs = ll_statfs,
    .setxattr = ll_setxattr,
    .getxattr = ll_getxattr,
    .listxattr = ll_listxattr,
    .removexattr = ll_removexattr,
    .access = ll_access,
    .create = ll_create,
    .fallocate = ll_fallocate,
};

const struct fuse_lowlevel_ops *fs_fuse_ops(void) { return &ops; }

void fs_fuse_inval(void *ctx, uint64_t ino)
{
    struct fs_fuse *f = ctx;
    /* Once the loop is ending nobody answers the reads whose pages the
     * kernel would wait for, so skip; the cache dies with the mount. */
    if (!f->se || fuse_session_exited(f->se)) return;
    int err = fuse_lowlevel_notify_inval_inode(f->se, ino, 0, 0);
    /* -ENOENT: the kernel never looked it up, so it caches nothing. */
    if (err && err != -ENOENT)
        dq_log(DQ_LOG_WARN, "fuse", "cannot drop the kernel cache of inode %llu: %s",
               (unsigned long long)ino, strerror(-err));
}
