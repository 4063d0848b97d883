/* stw.c — see stw.h. Test support only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"
#include "stw.h"

struct ent {
    char *name;
    char dtype[16];
    int ndim;
    uint64_t shape[8];
    uint8_t *data;
    size_t n;
};

struct stw {
    struct ent *e;
    size_t n;
};

struct stw *stw_new(void) { return calloc(1, sizeof(struct stw)); }

void stw_add(struct stw *w, const char *name, const char *dtype, int ndim, const uint64_t *shape,
             const void *data, size_t nbytes)
{
    w->e = realloc(w->e, (w->n + 1) * sizeof *w->e);
    struct ent *e = &w->e[w->n++];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    snprintf(e->dtype, sizeof e->dtype, "%s", dtype);
    e->ndim = ndim;
    memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    e->data = malloc(nbytes ? nbytes : 1);
    memcpy(e->data, data, nbytes);
    e->n = nbytes;
}

int write_file(const char *dir, const char *file, const void *data, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

int stw_write(struct stw *w, const char *dir, const char *file)
{
    size_t cap = 1 << 16, len = 0;
    char *h = malloc(cap);
    len += (size_t)snprintf(h + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        struct ent *e = &w->e[i];
        if (cap - len < 1024)
            h = realloc(h, cap *= 2);
        len += (size_t)snprintf(h + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", e->name,
                                e->dtype);
        for (int d = 0; d < e->ndim; d++)
            len += (size_t)snprintf(h + len, cap - len, "%s%llu", d ? "," : "",
                                    (unsigned long long)e->shape[d]);
        len += (size_t)snprintf(h + len, cap - len, "],\"data_offsets\":[%llu,%llu]}",
                                (unsigned long long)off, (unsigned long long)(off + e->n));
        off += e->n;
    }
    len += (size_t)snprintf(h + len, cap - len, "}");
    while (len % 8)
        h[len++] = ' ';
    size_t total = 8 + len + off;
    uint8_t *buf = malloc(total);
    uint64_t hl = len;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(hl >> (8 * i));
    memcpy(buf + 8, h, len);
    size_t p = 8 + len;
    for (size_t i = 0; i < w->n; i++) {
        memcpy(buf + p, w->e[i].data, w->e[i].n);
        p += w->e[i].n;
        free(w->e[i].data);
        free(w->e[i].name);
    }
    int rc = write_file(dir, file, buf, total);
    free(buf);
    free(h);
    free(w->e);
    free(w);
    return rc;
}

void stw_add_q4(struct stw *w, const char *name, const struct q4_spec *s)
{
    char key[512];
    uint64_t n = s->rows * s->cols, nb = (n + s->blocksize - 1) / s->blocksize;
    uint8_t *packed = calloc((n + 1) / 2, 1);
    for (uint64_t k = 0; k < n; k++)
        packed[k / 2] |= (uint8_t)((k & 1) ? (s->nibbles[k] & 0xf) : (s->nibbles[k] << 4));
    uint64_t sh[2] = {(n + 1) / 2, 1};
    stw_add(w, name, "U8", 2, sh, packed, (n + 1) / 2);
    free(packed);
    const float *tab = !strcmp(s->qtype, "nf4") ? dq_nf4_table : dq_fp4_table;
    float qm[16];
    for (int i = 0; i < 16; i++)
        qm[i] = tab[i] == 0 ? 0.0f : tab[i]; /* bnb stores +0 for both zeros */
    uint64_t s16 = 16;
    snprintf(key, sizeof key, "%s.quant_map", name);
    stw_add(w, key, "F32", 1, &s16, qm, sizeof qm);
    snprintf(key, sizeof key, "%s.absmax", name);
    if (s->nested_bs) {
        stw_add(w, key, "U8", 1, &nb, s->absmax_u8, nb);
        uint64_t nn = (nb + s->nested_bs - 1) / s->nested_bs, s256 = 256;
        snprintf(key, sizeof key, "%s.nested_absmax", name);
        stw_add(w, key, "F32", 1, &nn, s->nested_absmax, nn * 4);
        snprintf(key, sizeof key, "%s.nested_quant_map", name);
        stw_add(w, key, "F32", 1, &s256, s->nested_map, 256 * 4);
    } else {
        stw_add(w, key, "F32", 1, &nb, s->absmax, nb * 4);
    }
    char js[512];
    if (s->nested_bs)
        snprintf(js, sizeof js, "{\"quant_type\": \"%s\", \"blocksize\": %u, \"dtype\": \"bfloat16\", "
                 "\"shape\": [%llu, %llu], \"nested_blocksize\": %u, \"nested_dtype\": \"float32\", "
                 "\"nested_offset\": %.9g}", s->qtype, s->blocksize, (unsigned long long)s->rows,
                 (unsigned long long)s->cols, s->nested_bs, (double)s->nested_offset);
    else
        snprintf(js, sizeof js, "{\"quant_type\": \"%s\", \"blocksize\": %u, \"dtype\": \"bfloat16\", "
                 "\"shape\": [%llu, %llu]}", s->qtype, s->blocksize, (unsigned long long)s->rows,
                 (unsigned long long)s->cols);
    uint64_t jl = strlen(js);
    snprintf(key, sizeof key, "%s.quant_state.bitsandbytes__%s", name, s->qtype);
    stw_add(w, key, "U8", 1, &jl, js, jl);
}
