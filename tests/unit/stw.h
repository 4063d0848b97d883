/* stw.h — writes small .safetensors files for tests: tensors are added
 * with their bytes; stw_write lays them out as the reference writer does
 * (header padded with spaces to a multiple of 8). Raw writers for
 * malformed files live in the tests themselves. */
#ifndef BNBFS_STW_H
#define BNBFS_STW_H

#include <stddef.h>
#include <stdint.h>

struct stw;
struct stw *stw_new(void);
/* shape has ndim entries; data has the tensor's bytes (copied). */
void stw_add(struct stw *w, const char *name, const char *dtype, int ndim, const uint64_t *shape,
             const void *data, size_t nbytes);
/* Writes dir/file; frees w. Returns 0 or -1. */
int stw_write(struct stw *w, const char *dir, const char *file);
/* Writes raw bytes to dir/file. */
int write_file(const char *dir, const char *file, const void *data, size_t n);

/* Appends a bitsandbytes 4-bit weight `name` of logical shape [rows, cols]
 * made from the given codes (one nibble per element, 0..15) and per-block
 * scales: F32 absmax when nested_bs == 0, otherwise double-quantized with
 * the given u8 codes/nested absmax/offset. The quant_map and JSON follow
 * bitsandbytes. */
struct q4_spec {
    const char *qtype;        /* "nf4" | "fp4" */
    uint32_t blocksize;
    uint64_t rows, cols;
    const uint8_t *nibbles;   /* [rows*cols] values 0..15 */
    const float *absmax;      /* [nblocks] when not nested */
    uint32_t nested_bs;       /* 0 = no double quant */
    const uint8_t *absmax_u8; /* [nblocks] when nested */
    const float *nested_absmax; /* [ceil(nblocks/nested_bs)] */
    const float *nested_map;  /* [256] */
    float nested_offset;
};
void stw_add_q4(struct stw *w, const char *name, const struct q4_spec *s);

#endif
