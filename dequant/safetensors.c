/* safetensors.c — opening and validating one .safetensors file.
 *
 * Validation follows the reference reader (huggingface/safetensors): the
 * header is UTF-8 JSON starting with '{', at most 100,000,000 bytes; every
 * entry has a known dtype, a shape of non-negative integers and data_offsets
 * [begin, end]; sorted by offset the tensors tile the data buffer exactly
 * (no gaps, no overlaps), each size equals numel x element size (overflow
 * checked), and 8 + N + buffer end == file size. Anything else is -EINVAL
 * with one log line naming the file and, where there is one, the tensor.
 *
 * Invariant: after a successful open, every tensor's [offset, offset+nbytes)
 * lies inside the mapping; later readers rely on it (and on dq_stfile_check
 * plus the SIGBUS guard for files that change afterwards).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "dequant.h"

#define TAG "safetensors"
#define MAX_HEADER 100000000ull

static bool utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
        else return false;
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* A JSON number that is a non-negative integer exactly representable. */
static bool json_u64(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return false;
    double v = j->valuedouble;
    if (!(v >= 0) || v > 9007199254740992.0 || floor(v) != v)
        return false;
    *out = (uint64_t)v;
    return true;
}

static int cmp_offset(const void *a, const void *b)
{
    const struct dq_tensor *x = a, *y = b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    /* zero-sized tensors share offsets with their neighbour; keep it stable */
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int parse_entry(const char *path, const cJSON *e, struct dq_tensor *t)
{
    const char *name = e->string;
    if (!cJSON_IsObject(e)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': entry is not a JSON object", path, name);
        return -EINVAL;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': missing or non-string \"dtype\"", path, name);
        return -EINVAL;
    }
    if (dq_dtype_parse(dt->valuestring, &t->dtype)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': unknown dtype \"%s\"", path, name,
               dt->valuestring);
        return -EINVAL;
    }
    if (!cJSON_IsArray(sh)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': missing or non-array \"shape\"", path, name);
        return -EINVAL;
    }
    int nd = cJSON_GetArraySize(sh);
    if (nd > DQ_MAX_DIMS) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': %d dimensions (at most %d supported)", path,
               name, nd, DQ_MAX_DIMS);
        return -EINVAL;
    }
    t->ndim = nd;
    uint64_t numel = 1;
    for (int i = 0; i < nd; i++) {
        if (!json_u64(cJSON_GetArrayItem(sh, i), &t->shape[i])) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': shape[%d] is not a non-negative integer",
                   path, name, i);
            return -EINVAL;
        }
        if (__builtin_mul_overflow(numel, t->shape[i], &numel)) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': shape overflows 64-bit element count",
                   path, name);
            return -EINVAL;
        }
    }
    t->numel = numel;
    if (__builtin_mul_overflow(numel, (uint64_t)dq_dtype_size(t->dtype), &t->nbytes)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': byte size overflows 64 bits", path, name);
        return -EINVAL;
    }
    uint64_t b, en;
    if (!cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2 ||
        !json_u64(cJSON_GetArrayItem(of, 0), &b) || !json_u64(cJSON_GetArrayItem(of, 1), &en)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': \"data_offsets\" must be [begin, end] integers",
               path, name);
        return -EINVAL;
    }
    if (en < b) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': data_offsets end %llu before begin %llu", path,
               name, (unsigned long long)en, (unsigned long long)b);
        return -EINVAL;
    }
    if (en - b != t->nbytes) {
        dq_log(DQ_LOG_ERROR, TAG,
               "%s: tensor '%s': data_offsets span %llu bytes but %s%s needs %llu", path, name,
               (unsigned long long)(en - b), dq_dtype_name(t->dtype), " of its shape",
               (unsigned long long)t->nbytes);
        return -EINVAL;
    }
    t->offset = b; /* relative for now; made absolute after tiling checks */
    t->name = strdup(name);
    return t->name ? 0 : -ENOMEM;
}

static int parse_header(struct dq_stfile *f, const char *json, size_t len)
{
    const char *path = f->path;
    if (!utf8_valid((const uint8_t *)json, len)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: header is not valid UTF-8", path);
        return -EINVAL;
    }
    if (len == 0 || json[0] != '{') {
        dq_log(DQ_LOG_ERROR, TAG, "%s: header does not start with '{'", path);
        return -EINVAL;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, false);
    if (!root || !cJSON_IsObject(root)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: header is not a JSON object (parse error near byte %lld)",
               path, (long long)(root ? 0 : (cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - json : -1)));
        cJSON_Delete(root);
        return -EINVAL;
    }
    for (const char *p = end; p && p < json + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            dq_log(DQ_LOG_ERROR, TAG, "%s: trailing bytes after the header's JSON object", path);
            cJSON_Delete(root);
            return -EINVAL;
        }
    int rc = 0;
    size_t n = 0;
    for (const cJSON *e = root->child; e; e = e->next)
        n += strcmp(e->string, "__metadata__") != 0;
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    if (!f->tensors) {
        cJSON_Delete(root);
        return -ENOMEM;
    }
    for (const cJSON *e = root->child; e && !rc; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(e)) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: \"__metadata__\" is not an object", path);
                rc = -EINVAL;
                break;
            }
            for (const cJSON *m = e->child; m; m = m->next)
                if (!cJSON_IsString(m)) {
                    dq_log(DQ_LOG_ERROR, TAG, "%s: \"__metadata__\" value of '%s' is not a string",
                           path, m->string);
                    rc = -EINVAL;
                }
            if (!rc && f->metadata_json == NULL)
                f->metadata_json = cJSON_PrintUnformatted(e);
            continue;
        }
        for (size_t i = 0; i < f->ntensors; i++)
            if (strcmp(f->tensors[i].name, e->string) == 0) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s' appears twice in the header", path,
                       e->string);
                rc = -EINVAL;
            }
        if (!rc) {
            struct dq_tensor *t = &f->tensors[f->ntensors];
            rc = parse_entry(path, e, t);
            if (!rc)
                t->file = f, f->ntensors++;
        }
    }
    cJSON_Delete(root);
    if (rc)
        return rc;

    qsort(f->tensors, f->ntensors, sizeof *f->tensors, cmp_offset);
    uint64_t pos = 0;
    for (size_t i = 0; i < f->ntensors; i++) {
        struct dq_tensor *t = &f->tensors[i];
        if (t->offset != pos) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': data starts at %llu but %s ends at %llu (%s)",
                   path, t->name, (unsigned long long)t->offset,
                   i ? "the previous tensor" : "the buffer start", (unsigned long long)pos,
                   t->offset > pos ? "gap" : "overlap");
            return -EINVAL;
        }
        pos += t->nbytes;
    }
    uint64_t total;
    if (__builtin_add_overflow(f->data_start, pos, &total) || total != f->size) {
        dq_log(DQ_LOG_ERROR, TAG,
               "%s: data buffer ends at byte %llu but the file has %llu bytes (%s)", path,
               (unsigned long long)(f->data_start + pos), (unsigned long long)f->size,
               total > f->size ? "truncated" : "trailing bytes");
        return -EINVAL;
    }
    for (size_t i = 0; i < f->ntensors; i++)
        f->tensors[i].offset += f->data_start;
    return 0;
}

int dq_stfile_open(const char *path, struct dq_stfile **out)
{
    *out = NULL;
    struct dq_stfile *f = calloc(1, sizeof *f);
    if (!f)
        return -ENOMEM;
    f->fd = -1;
    f->path = strdup(path);
    char *hdr = NULL;
    int rc = -ENOMEM;
    if (!f->path)
        goto fail;
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        rc = -errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (fstat(f->fd, &f->st) < 0) {
        rc = -errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    rc = -EINVAL;
    if (!S_ISREG(f->st.st_mode)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a regular file", path);
        goto fail;
    }
    f->size = (uint64_t)f->st.st_size;
    uint8_t lenb[8];
    if (f->size < 8 || pread(f->fd, lenb, 8, 0) != 8) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: file too small for a safetensors header (%llu bytes)",
               path, (unsigned long long)f->size);
        goto fail;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | lenb[i];
    if (n > MAX_HEADER) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: header length %llu exceeds the 100000000-byte limit", path,
               (unsigned long long)n);
        goto fail;
    }
    if (n > f->size - 8) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: header length %llu runs past the end of the file (%llu bytes)",
               path, (unsigned long long)n, (unsigned long long)f->size);
        goto fail;
    }
    f->header_len = n;
    f->data_start = 8 + n;
    hdr = malloc(n + 1);
    if (!hdr) {
        rc = -ENOMEM;
        goto fail;
    }
    if (pread(f->fd, hdr, n, 8) != (ssize_t)n) {
        rc = -EIO;
        dq_log(DQ_LOG_ERROR, TAG, "%s: short read of the header", path);
        goto fail;
    }
    hdr[n] = 0;
    rc = parse_header(f, hdr, n);
    if (rc)
        goto fail;
    free(hdr);
    hdr = NULL;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_SHARED, f->fd, 0);
    if (m == MAP_FAILED) {
        rc = -errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    f->map = m;
    *out = f;
    return 0;
fail:
    free(hdr);
    dq_stfile_close(f);
    return rc;
}

void dq_stfile_close(struct dq_stfile *f)
{
    if (!f)
        return;
    if (f->map)
        munmap((void *)f->map, f->size);
    if (f->fd >= 0)
        close(f->fd);
    for (size_t i = 0; i < f->ntensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    free(f->metadata_json);
    free(f->path);
    free(f);
}

int dq_stfile_check(struct dq_stfile *f)
{
    struct stat a, b;
    /* fstat sees truncation/rewrites in place; stat sees a replaced file
     * (rename over it), which fstat of our old descriptor would not. */
    if (fstat(f->fd, &a) == 0 && stat(f->path, &b) == 0 && a.st_size == f->st.st_size &&
        a.st_mtim.tv_sec == f->st.st_mtim.tv_sec && a.st_mtim.tv_nsec == f->st.st_mtim.tv_nsec &&
        b.st_dev == f->st.st_dev && b.st_ino == f->st.st_ino)
        return 0;
    return -ESTALE;
}

const struct dq_tensor *dq_stfile_find(const struct dq_stfile *f, const char *name)
{
    for (size_t i = 0; i < f->ntensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}
