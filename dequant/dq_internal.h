/* dq_internal.h — private to dequant/: pieces shared between its files. */
#ifndef BNBFS_DQ_INTERNAL_H
#define BNBFS_DQ_INTERNAL_H

#include "dequant.h"

/* dq_qstate_check_map without the guard (callers already run under it). */
int dq_qstate_check_map_raw(const struct dq_qstate *q);
/* Scales a[0..n) of blocks [b0, b0+n) from mapped bytes. Must run under
 * dq_guard. -EIO (logged) on a non-finite scale. */
int dq_qstate_scales_raw(const struct dq_qstate *q, uint64_t b0, uint64_t n, float *a);

/* Scales of the blocks b0, b0+stride, ..., (n of them) into a[]. Must run
 * under dq_guard; -EIO (logged) on a non-finite scale. */
int dq_qstate_scales_strided(const struct dq_qstate *q, uint64_t b0, uint64_t stride, uint64_t n,
                             float *a);

/* out[i] = table[codes[i]] * scales[i] for one code per byte; the vector
 * paths run only when !may_saturate (no |scale| reaches the dtype's max). */
void dq_deq_codes_scaled(enum dq_qtype qt, const uint8_t *codes, const float *scales, size_t n,
                         enum dq_dtype out, void *dst, bool may_saturate, struct dq_sat *sat);

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
