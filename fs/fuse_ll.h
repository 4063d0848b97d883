/* fuse_ll.h — the FUSE low-level adapter over libfscore (fuse_ll.c) and
 * what main.c hands it. Private to fs/: only fuse_ll.c and main.c include
 * FUSE headers. */
#ifndef BNBFS_FUSE_LL_H
#define BNBFS_FUSE_LL_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdatomic.h>

#include "fs.h"

/* Session userdata. Owned by main.c; outlives the session. */
struct fs_fuse {
    struct fs_core *core;
    struct fuse_session *se;                 /* set before the loop runs */
    struct fuse_conn_info_opts *conn_opts;   /* user's -o max_background=... etc., or NULL */
    unsigned max_threads;                    /* of the loop, for the stats */
    bool clone_fd;
    bool splice;                             /* set by init: reply with fuse_reply_data */
    const char *mountpoint;                  /* absolute; borrowed */
    unsigned kernel_ra_kb;                   /* read_ahead_kb to set on our bdi; 0: leave */
    atomic_bool bdi_done;
};

const struct fuse_lowlevel_ops *fs_fuse_ops(void);
/* fs_inval_fn for fs_core_set_inval(): drops the kernel's page cache of ino. */
void fs_fuse_inval(void *ctx, uint64_t ino);

#endif
