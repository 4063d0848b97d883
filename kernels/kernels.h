/* kernels.h — libkn, dequantization part: CUDA kernels that produce the
 * mount's output bytes on a GPU, bit-identical to the CPU reference in
 * dequant/ (dq_deq4_span, dq_convert, dq_out_compute):
 *   - 4-bit NF4/FP4 weights (double-quantized or not, blocksize 32..4096)
 *     into F16/BF16/F32, as a flat element range (COPY/STACK) or as rows of
 *     the transposed expert-fused layout (FUSE_T) in one pass;
 *   - plain float conversion (F16/BF16/F32/F64 -> F16/BF16/F32) with the
 *     saturation rule: a finite value whose rounding overflows becomes the
 *     largest finite value of that sign and is counted; inf and NaN pass
 *     through (NaN payloads as the CPU code keeps them).
 * and a context (kn_ctx) that computes slices of a plan output (struct
 * dq_out) from the mapped source files into host memory.
 *
 * What this is not: the LLM kernels (kernels/llm.h), or any policy of when
 * the GPU is used (fs/ decides; kn_ctx_compute only says -EBUSY/-ENOTSUP).
 *
 * Two levels:
 *  - Ops (kn_deq4_flat, kn_deq4_fuse_t, kn_convert): device pointers, an
 *    explicit stream, asynchronous. They check their arguments (-EINVAL,
 *    logged) and the launch (-EIO, logged with the CUDA call, file, line).
 *    Results that need the host (saturation count, non-finite scales) are
 *    accumulated into a struct kn_counters in device memory.
 *  - kn_ctx: one device, its streams and its pinned/device staging buffers,
 *    all allocated once in kn_ctx_new; nothing is allocated per call.
 *
 * Conventions: 0 or -errno; every failure is logged once (dq_log, tag "gpu").
 * Never aborts: a CUDA failure becomes -EIO (ops) or -ENODEV (kn_ctx).
 */
#ifndef BNBFS_KERNELS_H
#define BNBFS_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dequant.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cudaStream_t without the CUDA headers (the same type: cudaStream_t is
 * `struct CUstream_st *`); NULL is the legacy default stream. */
typedef struct CUstream_st *kn_stream;

/* ------------------------------------------------------------ devices */

/* Number of usable CUDA devices into *n. With no driver or no device, *n
 * is 0, the function still returns 0 and `why` (if given) says why, e.g.
 * "cudaGetDeviceCount: no CUDA-capable device is detected". Logs nothing. */
int kn_device_count(int *n, char *why, size_t whylen);

/* ---------------------------------------------------------- counters */

/* Device-side results of ops, accumulated atomically (device memory). */
struct kn_counters {
    unsigned long long saturated;  /* values clamped by the saturation rule */
    unsigned long long bad_scales; /* 4-bit blocks whose scale is not finite (>= 1 per block seen) */
    unsigned long long first_bad;  /* smallest such block index; ~0 when none */
};

/* Sets *c (device memory) to "nothing seen yet", asynchronously on st. */
int kn_counters_reset(struct kn_counters *c, kn_stream st);

/* ------------------------------------------------------------- 4-bit */

/* A 4-bit weight's data on the device (formats.md §2). Every pointer is
 * device memory; bases let a caller upload only part of each array. */
struct kn_q4 {
    enum dq_qtype qtype;
    uint32_t blocksize;           /* power of two, 32..4096 */
    const uint8_t *codes;         /* packed codes: byte 0 holds element code_base
                                   * (even) in its high nibble (kn_deq4_flat only) */
    uint64_t code_base;
    bool nested;                  /* double quantization */
    const void *absmax;           /* U8 codes (nested) or F32 scales; entry 0 is block absmax_base */
    uint64_t absmax_base;
    uint32_t nested_blocksize;    /* power of two, 32..4096 (nested only) */
    float nested_offset;          /* (nested only) */
    const float *nested_absmax;   /* F32; entry 0 is nested block nested_base (nested only) */
    uint64_t nested_base;
    const float *nested_map;      /* F32 [256] (nested only) */
};

/* dst[i] = w[k0 + i] for i < n, w the flat (row-major) weight, in `out`
 * (DQ_F16, DQ_BF16 or DQ_F32). Reads codes of elements [k0, k0+n) and the
 * absmax (and nested) entries of their blocks. Fastest when k0 is even,
 * q->codes + (k0 - code_base)/2 and dst are 16-byte aligned. */
int kn_deq4_flat(const struct kn_q4 *q, uint64_t k0, uint64_t n, enum dq_dtype out, void *dst,
                 struct kn_counters *cnt, kn_stream st);

/* Rows [r0, r1) of the transposed layout of one Linear W [C, R] (flat
 * k = c*R + r): dst[(r - r0) * C + c] = W[c][r] for r0 <= r < r1, c < C.
 * q->codes holds a band of columns [rb, re) of every source row, pitched:
 * element (c, r) is in byte  c*pitch + ((c*R + r) >> 1) - ((c*R + rb) >> 1),
 * so a whole weight with R even, uploaded as is, is rb 0, re R, pitch R/2.
 * Needs rb <= r0 < r1 <= re <= R. Aligned shapes (the fast case of
 * kn_deq4_fuse_t in dequant.cu: R and rb multiples of 32, pitch of 16,
 * 16-byte aligned pointers, C a multiple of the vector width) transpose in
 * registers (k_deq4_fuse_rt: a lane takes 8 source rows x 16 columns for
 * F16/BF16 and 4 rows x 32 columns for F32, whole 32-byte code sectors,
 * one 16-byte store per output row segment); the
 * rest goes through a shared-memory tile. q->code_base is not used. */
int kn_deq4_fuse_t(const struct kn_q4 *q, uint64_t C, uint64_t R, uint64_t rb, uint64_t re,
                   uint64_t pitch, uint64_t r0, uint64_t r1, enum dq_dtype out, void *dst,
                   struct kn_counters *cnt, kn_stream st);

/* ------------------------------------------------------------- plain */

/* n elements of `in` (F16, BF16, F32, F64) into `out` (F16, BF16, F32),
 * rounding once to nearest even, with the saturation rule. in == out is a
 * copy. */
int kn_convert(enum dq_dtype in, const void *src, uint64_t n, enum dq_dtype out, void *dst,
               struct kn_counters *cnt, kn_stream st);

/* ----------------------------------------------------------- context */

struct kn_ctx;

struct kn_ctx_opts {
    int device;             /* CUDA ordinal; -1 picks device 0 */
    unsigned nlanes;        /* independent pipelines (stream + staging); 0 = 4 */
    size_t lane_out_bytes;  /* output staging per lane, pinned host + device; 0 = 32 MiB */
    size_t lane_in_bytes;   /* source staging per lane, pinned host + device; 0 = 24 MiB */
};

/* Opens device opts->device (opts may be NULL) and allocates every lane.
 * -ENODEV when there is no usable device (logged at INFO, with the reason),
 * -EIO/-ENOMEM when allocation fails (logged). */
int kn_ctx_new(const struct kn_ctx_opts *opts, struct kn_ctx **out);
void kn_ctx_free(struct kn_ctx *ctx);
/* "NVIDIA H100 80GB HBM3 (device 0)"; valid while ctx lives. */
const char *kn_ctx_name(const struct kn_ctx *ctx);
/* False once the GPU failed (kn_ctx_compute then returns -ENODEV at once). */
bool kn_ctx_usable(const struct kn_ctx *ctx);

/* Whether kn_ctx_compute can compute output o: 4-bit or float sources into
 * F16/BF16/F32, any op except FUSE_T of plain (non-4-bit) sources. */
bool kn_out_supported(const struct dq_out *o);

#define KN_NOWAIT 1u      /* kn_ctx_compute: -EBUSY instead of waiting for a lane */
#define KN_DST_PINNED 2u  /* kn_ctx_compute: every dst[i] lies in memory registered with
                           * kn_host_register; results are copied there straight from the
                           * device (no pinned staging, no host copy) */

/* Page-locks [p, p + len) for this context's device (cudaHostRegister,
 * portable), so kn_ctx_compute can copy results into it directly
 * (KN_DST_PINNED). p and len must be multiples of 4096; the range must not
 * overlap one already registered. 0, or -EIO (logged once per context,
 * later failures silent: the caller keeps using staged copies); never marks
 * the context failed. kn_host_unregister undoes it; call it before the
 * memory is freed, at the latest before kn_ctx_free. Thread-safe. */
int kn_host_register(struct kn_ctx *ctx, void *p, size_t len);
void kn_host_unregister(struct kn_ctx *ctx, void *p, size_t len);

/* Computes slices [s0, s0 + ns) of o on the GPU; dst[i] receives slice
 * s0 + i (its dq_out_slice_range length). Several slices of one expert or
 * one tensor go up and come back as one batch (larger batches are split to
 * fit a lane). Results come back through the lane's pinned staging buffer
 * and are copied into dst on this thread, or, with KN_DST_PINNED, straight
 * into dst by the device. The contract of dq_out_compute holds: -ESTALE when a source
 * file changed, -EIO (logged naming file and tensor) for a corrupt or
 * vanished source, saturations added to *sat (may be NULL). Besides:
 *   -EBUSY   flags has KN_NOWAIT and every lane is busy (nothing logged);
 *   -ENOTSUP not kn_out_supported, or one slice does not fit a lane;
 *   -ENODEV  the GPU failed (logged once; the context stays unusable):
 *            compute on the CPU instead.
 * Thread-safe: concurrent callers run on different lanes, so their uploads,
 * kernels and downloads overlap. dst may be any host memory. */
int kn_ctx_compute(struct kn_ctx *ctx, const struct dq_out *o, uint64_t s0, uint64_t ns,
                   void *const dst[], unsigned flags, struct dq_sat *sat);

/* Cumulative counters of a context (read without locks; approximate while
 * calls run). */
struct kn_ctx_stats {
    uint64_t calls;          /* kn_ctx_compute calls that computed */
    uint64_t slices;         /* slices computed */
    uint64_t bytes_out;      /* output bytes computed */
    uint64_t bytes_up;       /* source bytes uploaded */
    uint64_t bytes_direct;   /* of bytes_out: copied straight into dst (KN_DST_PINNED) */
    uint64_t busy;           /* -EBUSY answers */
    uint64_t registered;     /* bytes registered with kn_host_register now */
    uint64_t batches;        /* upload + kernel + download rounds */
    /* Time, ns, summed over lanes (lanes overlap, so sums may exceed the
     * wall time). Host side, per batch: */
    uint64_t ns_stage;       /* copying source bytes into pinned staging */
    uint64_t ns_wait;        /* from the upload's issue to the download's end */
    uint64_t ns_copyout;     /* copying staged results into dst (0 with KN_DST_PINNED) */
    uint64_t ns_register;    /* in kn_host_register */
    /* Device side, from events on the lane's stream: */
    uint64_t ns_h2d, ns_kernel, ns_d2h;
};
void kn_ctx_stats_get(const struct kn_ctx *ctx, struct kn_ctx_stats *st);

#ifdef __cplusplus
}
#endif
#endif
