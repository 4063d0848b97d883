/* qstate.c — bitsandbytes 4-bit quant states: the JSON blob saved as
 * `X.weight.quant_state.bitsandbytes__{nf4,fp4}`, its companion tensors, and
 * the per-block fp32 scales (formats.md §2).
 *
 * bitsandbytes' CUDA kernels dequantize NF4/FP4 with built-in code tables,
 * not with the stored quant_map; we do the same and treat a stored map that
 * differs from the built-in one as corruption (-EIO), since no reading of
 * such a file can be right for both. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "dq_internal.h"

#define TAG "quant"
#define QS_KEY ".quant_state.bitsandbytes__"

/* float32 literals exactly as bitsandbytes' kernels (dDequantizeNF4). */
const float dq_nf4_table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};
/* dDequantizeFP4Tree: bit 3 is the sign; these literals equal float32(c/12). */
const float dq_fp4_table[16] = {
    0.0f, 5.208333333e-03f, 0.66666667f, 1.0f, 0.33333333f, 0.5f, 0.16666667f, 0.25f,
    -0.0f, -5.208333333e-03f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f,
};

static const char *const companions[] = {
    ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
};

bool dq_is_quant_companion(const char *name)
{
    if (strstr(name, QS_KEY))
        return true;
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof companions / sizeof *companions; i++) {
        size_t k = strlen(companions[i]);
        /* "X.weight.absmax": the suffix follows ".weight" */
        if (n > k + 7 && strcmp(name + n - k, companions[i]) == 0 &&
            strncmp(name + n - k - 7, ".weight", 7) == 0)
            return true;
    }
    return false;
}

static const struct dq_tensor *find_companion(const struct dq_ckpt *ck, const char *w,
                                              const char *suffix)
{
    char key[1024];
    if (snprintf(key, sizeof key, "%s%s", w, suffix) >= (int)sizeof key)
        return NULL;
    return dq_ckpt_find(ck, key);
}

static int need(const struct dq_ckpt *ck, const char *w, const char *suffix, enum dq_dtype dt,
                uint64_t numel, const struct dq_tensor **out)
{
    const struct dq_tensor *t = find_companion(ck, w, suffix);
    if (!t) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': 4-bit companion '%s%s' is missing", ck->dir,
               w, w, suffix);
        return -EINVAL;
    }
    if (t->dtype != dt || t->numel != numel) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s%s': expected %s with %llu elements, found %s "
               "with %llu", t->file->path, w, suffix, dq_dtype_name(dt), (unsigned long long)numel,
               dq_dtype_name(t->dtype), (unsigned long long)t->numel);
        return -EINVAL;
    }
    *out = t;
    return 0;
}

static bool pow2_in(double v, unsigned lo, unsigned hi)
{
    if (!(v >= lo && v <= hi) || floor(v) != v)
        return false;
    unsigned u = (unsigned)v;
    return (u & (u - 1)) == 0;
}

int dq_qstate_load(const struct dq_ckpt *ck, const char *w, struct dq_qstate *q)
{
    memset(q, 0, sizeof *q);
    char key[1024];
    const struct dq_tensor *st = NULL;
    enum dq_qtype qt = DQ_NF4;
    static const char *const names[2] = {"nf4", "fp4"};
    for (int i = 0; i < 2 && !st; i++) {
        if (snprintf(key, sizeof key, "%s%s%s", w, QS_KEY, names[i]) >= (int)sizeof key)
            return -ENAMETOOLONG;
        st = dq_ckpt_find(ck, key);
        qt = (enum dq_qtype)i;
    }
    if (!st)
        return -ENOENT;
    const char *path = st->file->path;
    if (st->dtype != DQ_U8 || st->nbytes == 0 || st->nbytes > 65536) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': quant state must be a U8 JSON blob of "
               "1..65536 bytes", path, st->name);
        return -EINVAL;
    }
    cJSON *j = cJSON_ParseWithLength((const char *)dq_tensor_bytes(st), st->nbytes);
    if (!j || !cJSON_IsObject(j)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': quant state is not a JSON object", path,
               st->name);
        cJSON_Delete(j);
        return -EINVAL;
    }
    int rc = -EINVAL;
    const cJSON *qtj = cJSON_GetObjectItemCaseSensitive(j, "quant_type");
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(j, "blocksize");
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *nbs = cJSON_GetObjectItemCaseSensitive(j, "nested_blocksize");
    const cJSON *nof = cJSON_GetObjectItemCaseSensitive(j, "nested_offset");
    const cJSON *ndt = cJSON_GetObjectItemCaseSensitive(j, "nested_dtype");
    if (!cJSON_IsString(qtj) || strcmp(qtj->valuestring, names[qt]) != 0) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': quant_type must be \"%s\" as the key says",
               path, st->name, names[qt]);
        goto out;
    }
    q->qtype = qt;
    if (!cJSON_IsNumber(bs) || !pow2_in(bs->valuedouble, 32, 4096)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': blocksize must be a power of two in 32..4096",
               path, st->name);
        goto out;
    }
    q->blocksize = (uint32_t)bs->valuedouble;
    if (!cJSON_IsString(dt)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': missing \"dtype\"", path, st->name);
        goto out;
    }
    const char *d = dt->valuestring;
    if (!strncmp(d, "torch.", 6))
        d += 6;
    if (!strcmp(d, "bfloat16")) q->orig_dtype = DQ_BF16;
    else if (!strcmp(d, "float16")) q->orig_dtype = DQ_F16;
    else if (!strcmp(d, "float32")) q->orig_dtype = DQ_F32;
    else {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': unsupported dtype \"%s\"", path, st->name,
               dt->valuestring);
        goto out;
    }
    if (!cJSON_IsArray(sh) || cJSON_GetArraySize(sh) < 1 || cJSON_GetArraySize(sh) > DQ_MAX_DIMS) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': \"shape\" must be a list of 1..%d sizes", path,
               st->name, DQ_MAX_DIMS);
        goto out;
    }
    q->ndim = cJSON_GetArraySize(sh);
    q->numel = 1;
    for (int i = 0; i < q->ndim; i++) {
        const cJSON *v = cJSON_GetArrayItem(sh, i);
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1) || v->valuedouble > 9007199254740992.0 ||
            floor(v->valuedouble) != v->valuedouble ||
            __builtin_mul_overflow(q->numel, (uint64_t)v->valuedouble, &q->numel)) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': shape[%d] is not a positive size (or the "
                   "size overflows)", path, st->name, i);
            goto out;
        }
        q->shape[i] = (uint64_t)v->valuedouble;
    }
    if (q->numel > (UINT64_MAX >> 2)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': absurd element count", path, st->name);
        goto out;
    }
    q->nblocks = (q->numel + q->blocksize - 1) / q->blocksize;
    q->state = st;
    q->nested = nbs != NULL || nof != NULL;
    if (q->nested) {
        if (!cJSON_IsNumber(nbs) || !pow2_in(nbs->valuedouble, 32, 4096) || !cJSON_IsNumber(nof) ||
            !isfinite(nof->valuedouble) || (ndt && (!cJSON_IsString(ndt) ||
                                                   (strcmp(ndt->valuestring, "float32") &&
                                                    strcmp(ndt->valuestring, "torch.float32"))))) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': double quantization needs "
                   "nested_blocksize (power of two), a finite nested_offset and nested_dtype "
                   "float32", path, st->name);
            goto out;
        }
        q->nested_blocksize = (uint32_t)nbs->valuedouble;
        q->nested_offset = (float)nof->valuedouble;
        q->nested_nblocks = (q->nblocks + q->nested_blocksize - 1) / q->nested_blocksize;
    }
    /* The codes: (numel+1)/2 bytes in whatever storage dtype. */
    const struct dq_tensor *codes = dq_ckpt_find(ck, w);
    if (!codes) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': quant state without its packed weight", path, w);
        goto out;
    }
    if (codes->nbytes != (q->numel + 1) / 2) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': %llu packed bytes, but shape needs %llu",
               codes->file->path, w, (unsigned long long)codes->nbytes,
               (unsigned long long)((q->numel + 1) / 2));
        goto out;
    }
    q->codes = codes;
    if (need(ck, w, ".absmax", q->nested ? DQ_U8 : DQ_F32, q->nblocks, &q->absmax) ||
        need(ck, w, ".quant_map", DQ_F32, 16, &q->quant_map))
        goto out;
    if (q->nested && (need(ck, w, ".nested_absmax", DQ_F32, q->nested_nblocks, &q->nested_absmax) ||
                      need(ck, w, ".nested_quant_map", DQ_F32, 256, &q->nested_quant_map)))
        goto out;
    rc = 0;
out:
    cJSON_Delete(j);
    return rc;
}

static float load_f32(const uint8_t *p)
{
    float v;
    memcpy(&v, p, 4);
    return v;
}

int dq_qstate_check_map_raw(const struct dq_qstate *q)
{
    const float *table = q->qtype == DQ_NF4 ? dq_nf4_table : dq_fp4_table;
    const uint8_t *qm = dq_tensor_bytes(q->quant_map);
    for (int i = 0; i < 16; i++) {
        float v = load_f32(qm + 4 * i), ref = table[i];
        if (!(fabsf(v - ref) <= 1e-6f * fmaxf(1.0f, fabsf(ref)))) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': quant_map[%d] = %g is not the %s code "
                   "table's %g: corrupt", q->quant_map->file->path, q->quant_map->name, i,
                   (double)v, q->qtype == DQ_NF4 ? "nf4" : "fp4", (double)ref);
            return -EIO;
        }
    }
    return 0;
}

int dq_qstate_scales_raw(const struct dq_qstate *q, uint64_t b0, uint64_t n, float *a)
{
    if (b0 > q->nblocks || n > q->nblocks - b0)
        return -ERANGE;
    if (!q->nested) {
        const uint8_t *am = dq_tensor_bytes(q->absmax) + 4 * b0;
        for (uint64_t i = 0; i < n; i++) {
            a[i] = load_f32(am + 4 * i);
            if (!isfinite(a[i]))
                goto bad;
        }
        return 0;
    }
    const uint8_t *codes = dq_tensor_bytes(q->absmax) + b0;
    const uint8_t *nmap = dq_tensor_bytes(q->nested_quant_map);
    const uint8_t *nabs = dq_tensor_bytes(q->nested_absmax);
    const float off = q->nested_offset;
    const unsigned nsh = (unsigned)__builtin_ctz(q->nested_blocksize); /* a power of two */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = b0 + i;
        /* Two fp32 roundings, as bitsandbytes: the 8-bit dequant writes the
         * product, then `absmax += offset` (the build uses -ffp-contract=off,
         * so this never becomes an FMA). */
        float prod = load_f32(nmap + 4 * codes[i]) * load_f32(nabs + 4 * (b >> nsh));
        a[i] = prod + off;
        if (!isfinite(a[i]))
            goto bad;
    }
    return 0;
bad:
    dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': non-finite scale in block %llu: corrupt",
           q->absmax->file->path, q->absmax->name, (unsigned long long)b0);
    return -EIO;
}

int dq_qstate_scales_strided(const struct dq_qstate *q, uint64_t b0, uint64_t stride, uint64_t n,
                             float *a)
{
    if (n == 0)
        return 0;
    if (b0 >= q->nblocks || (n - 1) > (q->nblocks - 1 - b0) / (stride ? stride : 1))
        return -ERANGE;
    const uint8_t *am = dq_tensor_bytes(q->absmax);
    if (!q->nested) {
        for (uint64_t i = 0; i < n; i++) {
            a[i] = load_f32(am + 4 * (b0 + i * stride));
            if (!isfinite(a[i]))
                goto bad;
        }
        return 0;
    }
    const uint8_t *nmap = dq_tensor_bytes(q->nested_quant_map);
    const uint8_t *nabs = dq_tensor_bytes(q->nested_absmax);
    const float off = q->nested_offset;
    const unsigned nsh = (unsigned)__builtin_ctz(q->nested_blocksize);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = b0 + i * stride;
        float prod = load_f32(nmap + 4 * am[b]) * load_f32(nabs + 4 * (b >> nsh));
        a[i] = prod + off;
        if (!isfinite(a[i]))
            goto bad;
    }
    return 0;
bad:
    dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': non-finite scale near block %llu: corrupt",
           q->absmax->file->path, q->absmax->name, (unsigned long long)b0);
    return -EIO;
}

struct scales_args {
    const struct dq_qstate *q;
    uint64_t b0, n;
    float *a;
};

static int scales_thunk(void *p)
{
    struct scales_args *s = p;
    int rc = dq_qstate_check_map_raw(s->q);
    return rc ? rc : dq_qstate_scales_raw(s->q, s->b0, s->n, s->a);
}

int dq_qstate_scales(const struct dq_qstate *q, uint64_t b0, uint64_t n, float *a)
{
    struct scales_args s = {q, b0, n, a};
    return dq_guard(scales_thunk, &s);
}

static int check_map_thunk(void *p) { return dq_qstate_check_map_raw(p); }

int dq_qstate_check_map(const struct dq_qstate *q)
{
    return dq_guard(check_map_thunk, (void *)q);
}
