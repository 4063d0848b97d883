/* dq_internal.h — private to dequant/: pieces shared between its files. */
#ifndef BNBFS_DQ_INTERNAL_H
#define BNBFS_DQ_INTERNAL_H

#include "dequant.h"

/* The stored quant_map must be the built-in code table (-EIO, logged).
 * Must run under dq_guard. */
int dq_qstate_check_map(const struct dq_qstate *q);
/* Scales a[0..n) of blocks [b0, b0+n) from mapped bytes. Must run under
 * dq_guard. -EIO (logged) on a non-finite scale. */
int dq_qstate_scales_raw(const struct dq_qstate *q, uint64_t b0, uint64_t n, float *a);

/* Mapped bytes of a tensor (valid while its file is open). */
static inline const uint8_t *dq_tensor_bytes(const struct dq_tensor *t)
{
    return t->file->map + t->offset;
}

/* Largest finite magnitude of an output dtype, as float. */
static inline float dq_dtype_max(enum dq_dtype t)
{
    return t == DQ_F16 ? 65504.0f : t == DQ_BF16 ? 3.38953139e38f : 3.40282347e38f;
}

#endif
