/* kn_internal.h — private to kernels/ (dequantization part): the one CUDA
 * error macro and the helpers shared by dequant.cu (device code) and
 * kn_ctx.c (host code). C and CUDA C++ both include it.
 *
 * Invariant: every CUDA runtime call in libkn's dequant part goes through
 * KN_CUDA / KN_CUDA_GOTO, so a failure is logged once with the call, file
 * and line and becomes -EIO; nothing here aborts.
 */
#ifndef BNBFS_KN_INTERNAL_H
#define BNBFS_KN_INTERNAL_H

#include <cuda_runtime_api.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KN_TAG "gpu"

/* Logs "<call> failed: <cuda error> (<file>:<line>)" and returns -EIO. */
int kn_cuda_fail(const char *call, cudaError_t err, const char *file, int line);

/* Evaluate a CUDA runtime call; on failure log and return -EIO. */
#define KN_CUDA(call)                                                           \
    do {                                                                        \
        cudaError_t kn_err_ = (call);                                           \
        if (kn_err_ != cudaSuccess)                                             \
            return kn_cuda_fail(#call, kn_err_, __FILE__, __LINE__);            \
    } while (0)

/* Same, for functions with cleanup: sets rc and jumps to label. */
#define KN_CUDA_GOTO(call, rc, label)                                           \
    do {                                                                        \
        cudaError_t kn_err_ = (call);                                           \
        if (kn_err_ != cudaSuccess) {                                           \
            (rc) = kn_cuda_fail(#call, kn_err_, __FILE__, __LINE__);            \
            goto label;                                                         \
        }                                                                       \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
