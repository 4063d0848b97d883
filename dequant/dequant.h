/* dequant.h — the bnbfs core: safetensors files, bitsandbytes 4-bit quant
 * states, bit-exact CPU dequantization and the Unsloth→HF tensor plan.
 *
 * What this is not: no FUSE, no CUDA, no threads of its own beyond
 * dq_parallel_for. fs/, kernels/ and runner/ build on it; its CPU results
 * are the reference every other path is compared with.
 *
 * Conventions: functions return 0 or -errno; on failure they have already
 * logged one line naming the file (and tensor). Sizes taken from files are
 * overflow-checked. Source files are opened O_RDONLY and mapped PROT_READ;
 * nothing here ever writes to them.
 *
 * Reading source data: sources are mmap'd. A file truncated while mapped
 * raises SIGBUS; every function that touches mapped source bytes runs under
 * dq_guard (a per-thread sigsetjmp) and turns that into -EIO instead of a
 * crash. Before computing, dq_stfile_check() compares the file's identity
 * (dev, ino, size, mtime) with what was seen at open and fails with -ESTALE
 * when it changed.
 */
#ifndef BNBFS_DEQUANT_H
#define BNBFS_DEQUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DQ_VERSION "0.1.0"

/* ------------------------------------------------------------------ log */

enum dq_log_level { DQ_LOG_ERROR = 0, DQ_LOG_WARN, DQ_LOG_INFO, DQ_LOG_DEBUG };

/* One line "bnbfs[tag] level: message" to the sink (stderr by default).
 * Thread-safe; lines are never interleaved. */
void dq_log(enum dq_log_level lvl, const char *tag, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void dq_log_set_level(enum dq_log_level max_level);
enum dq_log_level dq_log_get_level(void);
typedef void (*dq_log_sink_fn)(void *ctx, enum dq_log_level lvl, const char *tag,
                               const char *msg);
/* sink == NULL restores stderr. */
void dq_log_set_sink(dq_log_sink_fn sink, void *ctx);
/* Number of DQ_LOG_ERROR lines logged so far (for stats). */
uint64_t dq_log_error_count(void);

/* --------------------------------------------------------------- dtypes */

enum dq_dtype {
    DQ_BOOL, DQ_U8, DQ_I8, DQ_I16, DQ_U16, DQ_F16, DQ_BF16, DQ_I32, DQ_U32,
    DQ_F32, DQ_F64, DQ_I64, DQ_U64, DQ_F8_E4M3, DQ_F8_E5M2,
    DQ_DTYPE_COUNT
};

size_t dq_dtype_size(enum dq_dtype t);          /* bytes per element */
const char *dq_dtype_name(enum dq_dtype t);     /* "F16", as safetensors spells it */
int dq_dtype_parse(const char *s, enum dq_dtype *out);  /* 0 or -EINVAL */
bool dq_dtype_is_float(enum dq_dtype t);        /* F16, BF16, F32, F64 (F8 not) */
/* Output dtypes the plan can produce: "f16", "bf16", "f32" (any case). */
int dq_out_dtype_parse(const char *s, enum dq_dtype *out);

/* ---------------------------------------------------------- safetensors */

#define DQ_MAX_DIMS 8

struct dq_stfile;

struct dq_tensor {
    char *name;                     /* owned */
    enum dq_dtype dtype;
    int ndim;                       /* 0..DQ_MAX_DIMS */
    uint64_t shape[DQ_MAX_DIMS];
    uint64_t numel;                 /* product of shape (1 for ndim 0) */
    uint64_t offset;                /* absolute byte offset in the file */
    uint64_t nbytes;                /* numel * dtype size */
    struct dq_stfile *file;         /* not owned */
};

struct dq_stfile {
    char *path;                     /* owned */
    int fd;                         /* O_RDONLY, owned */
    struct stat st;                 /* identity at open (dev, ino, size, mtime) */
    const uint8_t *map;             /* PROT_READ mapping of the whole file; owned */
    uint64_t size;                  /* file size at open */
    uint64_t header_len;            /* N of the u64 prefix */
    uint64_t data_start;            /* 8 + N */
    size_t ntensors;
    struct dq_tensor *tensors;      /* owned, sorted by offset */
    char *metadata_json;            /* owned: "__metadata__" object as JSON, or NULL */
};

/* Opens, maps and fully validates one .safetensors file (formats.md §1):
 * -EINVAL (logged, naming file and tensor) on any malformed header. */
int dq_stfile_open(const char *path, struct dq_stfile **out);
void dq_stfile_close(struct dq_stfile *f);
/* 0 when the file on disk still has the identity seen at open, -ESTALE
 * otherwise (not logged: the caller knows which tensor it wanted). Cheap:
 * one fstat + one stat. */
int dq_stfile_check(struct dq_stfile *f);
const struct dq_tensor *dq_stfile_find(const struct dq_stfile *f, const char *name);

/* --------------------------------------------------------- checkpoint */

/* A checkpoint directory: model.safetensors.index.json (sharded) or a
 * single model.safetensors. Tensor names are unique across shards. */
struct dq_ckpt {
    char *dir;                      /* owned */
    char *index_file;               /* owned; basename of the index, or NULL */
    size_t nfiles;
    struct dq_stfile **files;       /* owned */
    size_t ntensors;
    const struct dq_tensor **tensors; /* all tensors, sorted by name; not owned */
};

int dq_ckpt_open(const char *dir, struct dq_ckpt **out);
void dq_ckpt_close(struct dq_ckpt *ck);
const struct dq_tensor *dq_ckpt_find(const struct dq_ckpt *ck, const char *name);
/* True when name is a weight's safetensors file or index (hidden under MNT). */
bool dq_ckpt_is_weight_file(const struct dq_ckpt *ck, const char *basename);

/* ------------------------------------------------------- quant states */

enum dq_qtype { DQ_NF4 = 0, DQ_FP4 = 1 };

/* The 16 fp32 code values bitsandbytes' CUDA kernels use (formats.md §2). */
extern const float dq_nf4_table[16];
extern const float dq_fp4_table[16];

/* One bitsandbytes 4-bit weight X.weight: quant state JSON + companions.
 * All pointers borrow from the checkpoint. */
struct dq_qstate {
    enum dq_qtype qtype;
    uint32_t blocksize;             /* power of two 32..4096 */
    enum dq_dtype orig_dtype;       /* "dtype" of the JSON: BF16, F16 or F32 */
    int ndim;
    uint64_t shape[DQ_MAX_DIMS];    /* logical shape, [out, in] for a Linear */
    uint64_t numel;
    uint64_t nblocks;               /* ceil(numel / blocksize) */
    const struct dq_tensor *codes;  /* U8 [(numel+1)/2, 1] (any shape of that numel) */
    const struct dq_tensor *absmax; /* U8 [nblocks] when nested, else F32 [nblocks] */
    const struct dq_tensor *quant_map;  /* F32 [16] */
    const struct dq_tensor *state;  /* U8 JSON blob */
    bool nested;
    uint32_t nested_blocksize;      /* 256 as bnb writes it */
    float nested_offset;
    uint64_t nested_nblocks;        /* ceil(nblocks / nested_blocksize) */
    const struct dq_tensor *nested_absmax;     /* F32 [nested_nblocks] */
    const struct dq_tensor *nested_quant_map;  /* F32 [256] */
};

/* weight_name is "X.weight". Returns -ENOENT when the tensor is not 4-bit
 * (no quant_state.bitsandbytes__* companion), -EINVAL (logged) when the
 * state is malformed or a companion is missing or mis-sized. */
int dq_qstate_load(const struct dq_ckpt *ck, const char *weight_name, struct dq_qstate *out);
/* True for the companion tensors of 4-bit weights (absmax, quant_map, nested_*,
 * quant_state.*): hidden from the output. */
bool dq_is_quant_companion(const char *name);

/* 0 when the stored quant_map is the built-in table of its quant type,
 * -EIO (logged) otherwise. Reads mapped bytes under the SIGBUS guard. */
int dq_qstate_check_map(const struct dq_qstate *q);

/* Per-block fp32 scales a[b] for blocks [b0, b0+n) (formats.md §2).
 * Reads mapped source bytes under the SIGBUS guard; -EIO (logged with the
 * tensor) on a non-finite scale, a quant_map that is not the standard
 * table, or a source that vanished. */
int dq_qstate_scales(const struct dq_qstate *q, uint64_t b0, uint64_t n, float *a);

/* ----------------------------------------------------- dequantization */

/* Saturation counter: values that do not fit the output dtype are clamped to
 * its largest finite magnitude and counted here. inf and NaN pass through. */
struct dq_sat { uint64_t count; };

/* Dequantize flat elements [k0, k0+n) of a 4-bit weight into dst (n
 * elements of out_dtype: DQ_F16, DQ_BF16 or DQ_F32). `codes` points at the
 * packed byte holding element 0; `a` holds the scales of blocks
 * [k0/bs, (k0+n-1)/bs] (a[0] is block k0/bs). Pure memory; no I/O. */
void dq_deq4_span(enum dq_qtype qt, const uint8_t *codes, uint64_t k0, uint64_t n,
                  const float *a, uint32_t blocksize, enum dq_dtype out_dtype,
                  void *dst, struct dq_sat *sat);

/* Convert n plain elements (F16, BF16, F32 or F64) into out_dtype. */
void dq_convert(enum dq_dtype in, const void *src, uint64_t n, enum dq_dtype out,
                void *dst, struct dq_sat *sat);

/* SIMD level used by the CPU paths. DQ_SIMD_AUTO picks the best the CPU has;
 * BNBFS_SIMD=scalar|avx2|avx512 in the environment forces one. All levels
 * give the same bits. */
enum dq_simd { DQ_SIMD_AUTO = 0, DQ_SIMD_SCALAR, DQ_SIMD_AVX2, DQ_SIMD_AVX512 };
void dq_simd_set(enum dq_simd level);
enum dq_simd dq_simd_get(void);
const char *dq_simd_name(enum dq_simd level);

/* ------------------------------------------------------------- plan */

/* How an output tensor is computed:
 *  COPY   out = src[0] (dequantized if 4-bit, converted otherwise)
 *  STACK  out[e, ...] = src[e]       (expert biases)
 *  FUSE_T out[e, r, c] = src[e][c, r] (expert weights: the transpose of each
 *         per-expert Linear [C=out_features, R=in_features]; out [E, R, C]) */
enum dq_op { DQ_OP_COPY = 0, DQ_OP_STACK, DQ_OP_FUSE_T };

struct dq_src {
    const struct dq_tensor *t;      /* plain data, or the packed codes when 4-bit */
    struct dq_qstate *q;            /* NULL when plain; owned by the plan */
    uint64_t numel;                 /* logical elements */
    uint64_t rows, cols;            /* FUSE_T: logical [C, R] of the Linear */
};

struct dq_out {
    char *name;                     /* HF-canonical name; owned */
    enum dq_dtype dtype;            /* output dtype (plain non-float tensors keep theirs) */
    int ndim;
    uint64_t shape[DQ_MAX_DIMS];
    uint64_t numel, nbytes;
    enum dq_op op;
    uint32_t nsrc;
    struct dq_src *src;             /* owned; [nsrc], expert order for STACK/FUSE_T */
    /* Slicing: slices are the unit of computation and caching. All slices
     * hold slice_elems elements except the last one of each expert (FUSE_T,
     * STACK) or of the tensor (COPY). */
    uint64_t slice_elems;
    uint64_t slices_per_src;        /* STACK/FUSE_T: slices per expert; COPY: nslices */
    uint64_t nslices;
    char *source_desc;              /* owned: "a.weight (4-bit) + ..." for inspect/xattrs */
    char *quant_desc;               /* owned: "nf4 bs=64 nested=256" / "none" / "mixed: ..." */
    uint32_t layer;                 /* decoder layer, or UINT32_MAX for model-level tensors */
};

struct dq_plan {
    struct dq_ckpt *ck;             /* not owned */
    enum dq_dtype out_dtype;
    size_t nout;
    struct dq_out *out;             /* owned; HF order: embed, layers 0.., norm, lm_head */
    uint32_t nlayers;               /* decoder layers seen (0 if none) */
    uint32_t nexperts;              /* experts per layer (0 if no MoE) */
    uint64_t total_bytes;           /* sum of out[].nbytes */
};

/* Build the plan for a checkpoint. target_slice_bytes 0 means the default
 * (about 2 MiB). Validates every quant state and every expert group. */
int dq_plan_build(struct dq_ckpt *ck, enum dq_dtype out_dtype, uint64_t target_slice_bytes,
                  struct dq_plan **out);
void dq_plan_free(struct dq_plan *p);
const struct dq_out *dq_plan_find(const struct dq_plan *p, const char *name);

/* Byte range [*off, *off + *len) of slice s within the tensor's data. */
void dq_out_slice_range(const struct dq_out *o, uint64_t s, uint64_t *off, uint64_t *len);
/* Slice holding byte `off` of the tensor's data (off < nbytes). */
uint64_t dq_out_slice_at(const struct dq_out *o, uint64_t off);

/* 0 when every file source s of o reads from (its data, or the codes and
 * quant companions) still has the identity seen at open; -ESTALE otherwise,
 * with a log line naming the file, the tensor and o. Every engine calls it
 * before computing from s. */
int dq_src_check(const struct dq_out *o, const struct dq_src *s);

/* Compute slice s of o into dst (at least its length in bytes, 8-byte
 * aligned). Checks the
 * source file identity first (-ESTALE), reads mapped source bytes under the
 * SIGBUS guard (-EIO), logs once with file and tensor. Thread-safe; uses
 * per-thread scratch memory. */
int dq_out_compute(const struct dq_out *o, uint64_t s, void *dst, struct dq_sat *sat);

/* Compute the byte range [off, off+len) of o into dst, slice by slice, on
 * nthreads threads (0 = all cores). Used by bnbfs-inspect --dump and tests. */
int dq_out_compute_range(const struct dq_out *o, uint64_t off, uint64_t len, void *dst,
                         unsigned nthreads, struct dq_sat *sat);

/* ------------------------------------------------------------ threads */

/* Run fn(ctx, i) for i in [0, n) on nthreads threads (0 = all cores).
 * Returns the first non-zero fn result (remaining items still run). */
int dq_parallel_for(unsigned nthreads, uint64_t n, int (*fn)(void *ctx, uint64_t i), void *ctx);
unsigned dq_ncpus(void);

/* ----------------------------------------------------------- guard */

/* Run fn(ctx) with SIGBUS on mapped files turned into -EIO for this
 * thread. Installs the process-wide handler on first use; a SIGBUS outside
 * a guard keeps its default (fatal) action. */
int dq_guard(int (*fn)(void *ctx), void *ctx);

/* --------------------------------------------------------------- misc */

/* Reads a whole regular file of at most max_bytes into *out (malloc'd,
 * NUL-terminated; *len its size when len is not NULL). Not logged: callers
 * say what the file was for. -errno from open/read, -EISDIR or -EINVAL for
 * a directory or other non-regular file, -EFBIG past max_bytes, -EIO when
 * the file shrank while read. */
int dq_read_file(const char *path, uint64_t max_bytes, char **out, size_t *len);

/* Parse "2G", "512M", "1.5G", "4096" (bytes; K/M/G/T are powers of 1024). */
int dq_parse_size(const char *s, uint64_t *out);
/* Format bytes as "1.50 GiB" into buf. */
const char *dq_fmt_size(uint64_t bytes, char *buf, size_t buflen);

#ifdef __cplusplus
}
#endif
#endif
