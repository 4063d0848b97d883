/* watch.c — source change detection: an inotify watcher on SRC (and on
 * each source file, which catches writes through symlinked HF-cache blobs),
 * the identity check every compute and passthrough read runs, and what
 * happens when a source changed: its tensors and files fail with EIO, their
 * cached slices are dropped, and the kernel's page cache of the virtual
 * files they feed is invalidated.
 *
 * Not a way to follow changes: a changed source stays failed until remount
 * (the virtual files' sizes and headers were fixed at mount time).
 *
 * Invariant: the adapter's inval callback runs on the watcher thread only;
 * read handlers never wait for this thread, so it may block in the kernel
 * while pages are locked by reads in flight.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "fs_int.h"

#define DIR_MASK (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | \
                  IN_DELETE | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF)
#define FILE_MASK (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF)

static bool same_identity(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

static void wake(struct fs_core *c)
{
    if (c->efd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(c->efd, &one, sizeof one);
        (void)r;    /* the counter can only saturate, which still wakes */
    }
}

void fs_src_mark_stale(struct fs_core *c, uint32_t i, const char *why)
{
    struct fs_src *s = &c->srcs[i];
    if (atomic_exchange(&s->stale, true)) return;
    atomic_fetch_add_explicit(&c->stats.stale_events, 1, memory_order_relaxed);
    if (s->st) {
        char names[512] = "";
        size_t k = 0;
        for (uint32_t j = 0; j < s->ntensors && j < 3; j++)
            k += (size_t)snprintf(names + k, sizeof names - k, "%s%s", j ? ", " : "",
                                  c->tensors[s->tensors[j]].o->name);
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s while mounted; the %u tensor%s computed from it (%s%s) "
               "now fail with EIO; remount to serve the new file", s->path, why, s->ntensors,
               s->ntensors == 1 ? "" : "s", names, s->ntensors > 3 ? ", ..." : "");
    } else {
        dq_log(DQ_LOG_ERROR, FS_TAG, "%s: %s while mounted; %s under the mount now fails with "
               "EIO; remount to serve the new file", s->path, why, s->name);
    }
    for (uint32_t j = 0; j < s->ntensors; j++) {
        struct fs_tensor *t = &c->tensors[s->tensors[j]];
        atomic_store(&t->stale, true);
        fs_cache_purge_tensor(c, t->idx);
        if (t->shard_ino) atomic_store(&fs_node_get(c, t->shard_ino)->inval_pending, true);
        if (t->file_ino) atomic_store(&fs_node_get(c, t->file_ino)->inval_pending, true);
    }
    if (s->node) atomic_store(&fs_node_get(c, s->node)->inval_pending, true);
    wake(c);
}

int fs_src_check(struct fs_core *c, uint32_t i)
{
    struct fs_src *s = &c->srcs[i];
    if (atomic_load(&s->stale)) return -ESTALE;
    struct stat st;
    if (stat(s->path, &st)) {
        fs_src_mark_stale(c, i, errno == ENOENT ? "was removed" : "cannot be checked");
        return -ESTALE;
    }
    if (!same_identity(&st, &s->id)) {
        fs_src_mark_stale(c, i, st.st_ino != s->id.st_ino ? "was replaced" : "was modified");
        return -ESTALE;
    }
    return 0;
}

static void check_all(struct fs_core *c)
{
    for (uint32_t i = 0; i < c->nsrcs; i++) fs_src_check(c, i);
}

static void do_invals(struct fs_core *c)
{
    for (uint64_t ino = 1; ino <= c->nnodes; ino++) {
        struct fs_node *n = fs_node_get(c, ino);
        if (atomic_load_explicit(&n->inval_pending, memory_order_relaxed) &&
            atomic_exchange(&n->inval_pending, false) && c->inval)
            c->inval(c->inval_ctx, ino);
    }
}

static void handle_events(struct fs_core *c, const char *buf, ssize_t len)
{
    for (const char *p = buf; p < buf + len;) {
        const struct inotify_event *ev = (const struct inotify_event *)p;
        p += sizeof *ev + ev->len;
        if (ev->mask & IN_Q_OVERFLOW) { check_all(c); continue; }
        if (ev->wd == c->dir_wd) {
            if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF)) { check_all(c); continue; }
            if (!ev->len) continue;
            for (uint32_t i = 0; i < c->nsrcs; i++)
                if (!strcmp(c->srcs[i].name, ev->name)) fs_src_check(c, i);
            continue;
        }
        for (uint32_t i = 0; i < c->nsrcs; i++)
            if (c->srcs[i].wd == ev->wd) fs_src_check(c, i);
    }
}

static void *watch_main(void *arg)
{
    struct fs_core *c = arg;
    char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    struct pollfd pf[2] = { { .fd = c->ifd, .events = POLLIN }, { .fd = c->efd, .events = POLLIN } };
    while (!atomic_load(&c->watch_stop)) {
        int r = poll(pf, 2, -1);
        if (r < 0) {
            if (errno == EINTR) continue;
            dq_log(DQ_LOG_ERROR, FS_TAG, "source watcher: poll: %s", strerror(errno));
            break;
        }
        if (pf[1].revents & POLLIN) {
            uint64_t v;
            ssize_t k = read(c->efd, &v, sizeof v);
            (void)k;
        }
        if (pf[0].revents & POLLIN) {
            ssize_t k = read(c->ifd, buf, sizeof buf);
            if (k > 0) handle_events(c, buf, k);
        }
        if (!atomic_load(&c->watch_stop)) do_invals(c);
    }
    return NULL;
}

int fs_watch_start(struct fs_core *c)
{
    c->ifd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->ifd < 0 || c->efd < 0) {
        int err = -errno;
        dq_log(DQ_LOG_WARN, FS_TAG, "%s: cannot watch for changes (%s); a changed source is "
               "still caught before each computation", c->src, strerror(-err));
        return err;
    }
    c->dir_wd = inotify_add_watch(c->ifd, c->src, DIR_MASK);
    if (c->dir_wd < 0)
        dq_log(DQ_LOG_WARN, FS_TAG, "%s: inotify: %s", c->src, strerror(errno));
    for (uint32_t i = 0; i < c->nsrcs; i++) {
        /* Follows symlinks: an HF cache snapshot links to blobs elsewhere. */
        c->srcs[i].wd = inotify_add_watch(c->ifd, c->srcs[i].path, FILE_MASK);
    }
    atomic_store(&c->watch_stop, false);
    int err = fs_thread_create(&c->watch_thread, watch_main, c, "bnbfs-watch");
    if (err) {
        dq_log(DQ_LOG_WARN, FS_TAG, "source watcher: %s", strerror(-err));
        return err;
    }
    c->watch_running = true;
    /* A change between the mount-time stat and the watches being set. */
    check_all(c);
    return 0;
}

void fs_watch_stop(struct fs_core *c)
{
    if (c->watch_running) {
        atomic_store(&c->watch_stop, true);
        wake(c);
        pthread_join(c->watch_thread, NULL);
        c->watch_running = false;
    }
    if (c->ifd >= 0) close(c->ifd);
    if (c->efd >= 0) close(c->efd);
    c->ifd = c->efd = -1;
}
