/* kn_prog.h — what the GPU kernel programs (test_kn_dequant.c,
 * bench_kn_dequant.c) share: a CUDA call check that ends the program, and
 * a seeded splitmix64 generator (each program keeps its own state, so its
 * inputs stay what they were). Header-only: both are single-file programs. */
#ifndef BNBFS_TESTS_KN_PROG_H
#define BNBFS_TESTS_KN_PROG_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime_api.h>

#define KN_PROG_CUDA(call)                                                                    \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                     \
                    cudaGetErrorString(e_));                                                  \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static inline uint64_t kn_prog_splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#endif
