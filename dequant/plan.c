/* plan.c — the tensor plan: which HF-canonical tensors a checkpoint shows
 * and how each is computed from source tensors (see dequant.h, enum dq_op).
 *
 * Works from what the files say: layer and expert counts, dims and quant
 * types are read, never assumed. The Unsloth per-expert layout is
 *   P.gate_up_projs.E.weight [C, R] (4-bit or plain)  -> P.gate_up_proj   [E, R, C]
 *   P.gate_up_projs.E.bias   [C]                      -> P.gate_up_proj_bias [E, C]
 *   (same for down_projs -> down_proj / down_proj_bias)
 *   X.mlp.router.linear.{weight,bias}                 -> X.mlp.router.{weight,bias}
 * and every other non-companion tensor maps 1:1. An already canonical or
 * un-split checkpoint therefore passes through the same code.
 *
 * Not here: the arithmetic (deq4.c) and slice computation (compute.c).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dq_internal.h"

#define TAG "plan"
#define DEFAULT_SLICE (2u << 20)

struct group {            /* one expert group being collected */
    char *out_name;       /* owned until moved into the dq_out */
    bool is_weight;
    uint32_t cap, n;      /* experts seen */
    const struct dq_tensor **t; /* [cap] by expert index; NULL = missing */
};

struct builder {
    struct dq_plan *p;
    size_t cap;
    struct group *g;
    size_t ng;
};

static char *xstrdup_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xstrdup_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    return s;
}

static uint32_t layer_of(const char *name)
{
    const char *p = strstr(name, "layers.");
    if (!p)
        return UINT32_MAX;
    char *end;
    unsigned long v = strtoul(p + 7, &end, 10);
    return (end != p + 7 && *end == '.' && v < UINT32_MAX) ? (uint32_t)v : UINT32_MAX;
}

static struct dq_out *new_out(struct builder *b)
{
    struct dq_plan *p = b->p;
    if (p->nout == b->cap) {
        size_t nc = b->cap ? 2 * b->cap : 64;
        struct dq_out *no = realloc(p->out, nc * sizeof *no);
        if (!no)
            return NULL;
        p->out = no;
        b->cap = nc;
    }
    struct dq_out *o = &p->out[p->nout++];
    memset(o, 0, sizeof *o);
    return o;
}

/* Parse "<P>.gate_up_projs.<E>.<weight|bias>" (or down_projs). On match
 * sets the output name and expert index. */
static bool parse_expert(const char *name, char **out_name, uint32_t *e, bool *is_weight)
{
    static const char *const kinds[2][2] = {{".gate_up_projs.", "gate_up_proj"},
                                            {".down_projs.", "down_proj"}};
    for (int k = 0; k < 2; k++) {
        const char *p = strstr(name, kinds[k][0]);
        if (!p)
            continue;
        const char *num = p + strlen(kinds[k][0]);
        char *end;
        unsigned long v = strtoul(num, &end, 10);
        if (end == num || *end != '.' || v >= 65536)
            continue;
        bool w = strcmp(end, ".weight") == 0, bias = strcmp(end, ".bias") == 0;
        if (!w && !bias)
            continue;
        *out_name = xstrdup_printf("%.*s.%s%s", (int)(p - name), name, kinds[k][1],
                                   w ? "" : "_bias");
        *e = (uint32_t)v;
        *is_weight = w;
        return *out_name != NULL;
    }
    return false;
}

static int group_add(struct builder *b, char *out_name, uint32_t e, bool w,
                     const struct dq_tensor *t)
{
    struct group *g = NULL;
    for (size_t i = 0; i < b->ng; i++)
        if (strcmp(b->g[i].out_name, out_name) == 0)
            g = &b->g[i];
    if (g) {
        free(out_name);
    } else {
        struct group *ng = realloc(b->g, (b->ng + 1) * sizeof *ng);
        if (!ng) {
            free(out_name);
            return -ENOMEM;
        }
        b->g = ng;
        g = &b->g[b->ng++];
        memset(g, 0, sizeof *g);
        g->out_name = out_name;
        g->is_weight = w;
    }
    if (e >= g->cap) {
        uint32_t nc = e + 1 > 2 * g->cap ? e + 1 : 2 * g->cap;
        const struct dq_tensor **nt = realloc(g->t, nc * sizeof *nt);
        if (!nt)
            return -ENOMEM;
        memset(nt + g->cap, 0, (nc - g->cap) * sizeof *nt);
        g->t = nt;
        g->cap = nc;
    }
    g->t[e] = t;
    if (e + 1 > g->n)
        g->n = e + 1;
    return 0;
}

/* Fill src from a source tensor: 4-bit (with its quant state) or plain. */
static int fill_src(struct dq_plan *p, const struct dq_tensor *t, struct dq_src *s)
{
    memset(s, 0, sizeof *s);
    s->t = t;
    struct dq_qstate q;
    int rc = dq_qstate_load(p->ck, t->name, &q);
    if (rc == -ENOENT) {
        s->numel = t->numel;
        return 0;
    }
    if (rc)
        return rc;
    s->q = malloc(sizeof *s->q);
    if (!s->q)
        return -ENOMEM;
    *s->q = q;
    s->numel = q.numel;
    return 0;
}

/* Logical shape of a source (the quant state's for 4-bit). */
static void src_shape(const struct dq_src *s, int *nd, const uint64_t **shape)
{
    if (s->q) {
        *nd = s->q->ndim;
        *shape = s->q->shape;
    } else {
        *nd = s->t->ndim;
        *shape = s->t->shape;
    }
}

static char *quant_desc(const struct dq_src *s)
{
    if (!s->q)
        return xstrdup_printf("none (%s)", dq_dtype_name(s->t->dtype));
    if (s->q->nested)
        return xstrdup_printf("%s bs=%u nested=%u", s->q->qtype == DQ_NF4 ? "nf4" : "fp4",
                              s->q->blocksize, s->q->nested_blocksize);
    return xstrdup_printf("%s bs=%u", s->q->qtype == DQ_NF4 ? "nf4" : "fp4", s->q->blocksize);
}

static enum dq_dtype out_dtype_for(const struct dq_plan *p, const struct dq_src *s)
{
    return (s->q || dq_dtype_is_float(s->t->dtype)) ? p->out_dtype : s->t->dtype;
}

static void set_slicing(struct dq_out *o, uint64_t target)
{
    uint64_t osz = dq_dtype_size(o->dtype);
    uint64_t per_src = o->numel / (o->nsrc ? o->nsrc : 1);
    if (o->op == DQ_OP_FUSE_T) {
        uint64_t R = o->src[0].cols, C = o->src[0].rows;
        uint64_t rows = C * osz > 0 ? target / (C * osz) : 1;
        if (rows >= 64)
            rows &= ~(uint64_t)31; /* keeps source column bands 32-aligned */
        if (rows == 0)
            rows = 1;
        if (rows > R)
            rows = R;
        o->slice_elems = rows * C;
    } else {
        uint64_t el = target / osz;
        if (el >= 8192)
            el &= ~(uint64_t)4095; /* whole blocks: vector paths stay aligned */
        if (el == 0)
            el = 1;
        if (el > per_src)
            el = per_src ? per_src : 1;
        o->slice_elems = el;
    }
    o->slices_per_src = per_src ? (per_src + o->slice_elems - 1) / o->slice_elems : 0;
    o->nslices = o->slices_per_src * o->nsrc;
}

static int add_single(struct builder *b, const struct dq_tensor *t, uint64_t target)
{
    struct dq_plan *p = b->p;
    char *name;
    const char *r = strstr(t->name, ".mlp.router.linear.");
    if (r)
        name = xstrdup_printf("%.*s.mlp.router.%s", (int)(r - t->name), t->name,
                              r + strlen(".mlp.router.linear."));
    else
        name = strdup(t->name);
    struct dq_out *o = name ? new_out(b) : NULL;
    if (!o) {
        free(name);
        return -ENOMEM;
    }
    o->name = name;
    o->op = DQ_OP_COPY;
    o->nsrc = 1;
    o->src = calloc(1, sizeof *o->src);
    if (!o->src)
        return -ENOMEM;
    int rc = fill_src(p, t, &o->src[0]);
    if (rc)
        return rc;
    int nd;
    const uint64_t *shape;
    src_shape(&o->src[0], &nd, &shape);
    o->ndim = nd;
    memcpy(o->shape, shape, (size_t)nd * sizeof *shape);
    o->numel = o->src[0].numel;
    o->dtype = out_dtype_for(p, &o->src[0]);
    o->nbytes = o->numel * dq_dtype_size(o->dtype);
    o->layer = layer_of(o->name);
    o->source_desc = xstrdup_printf("%s%s", t->name, o->src[0].q ? " (4-bit)" : "");
    o->quant_desc = quant_desc(&o->src[0]);
    set_slicing(o, target);
    return o->source_desc && o->quant_desc ? 0 : -ENOMEM;
}

static int add_group(struct builder *b, struct group *g, uint64_t target)
{
    struct dq_plan *p = b->p;
    const char *dir = p->ck->dir;
    for (uint32_t e = 0; e < g->n; e++)
        if (!g->t[e]) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: expert %u of '%s' is missing (experts 0..%u present "
                   "otherwise)", dir, e, g->out_name, g->n - 1);
            return -EINVAL;
        }
    struct dq_out *o = new_out(b);
    if (!o)
        return -ENOMEM;
    o->name = g->out_name;
    g->out_name = NULL;
    o->nsrc = g->n;
    o->src = calloc(g->n, sizeof *o->src);
    if (!o->src)
        return -ENOMEM;
    o->layer = layer_of(o->name);
    int nd0 = 0;
    const uint64_t *sh0 = NULL;
    char *qd = NULL;
    for (uint32_t e = 0; e < g->n; e++) {
        struct dq_src *s = &o->src[e];
        int rc = fill_src(p, g->t[e], s);
        if (rc) {
            free(qd);
            return rc;
        }
        int nd;
        const uint64_t *sh;
        src_shape(s, &nd, &sh);
        if (e == 0) {
            nd0 = nd, sh0 = sh;
            o->dtype = out_dtype_for(p, s);
            qd = quant_desc(s);
            if (!qd)
                return -ENOMEM;
        } else {
            if (nd != nd0 || memcmp(sh, sh0, (size_t)nd * sizeof *sh) != 0) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': shape differs from expert 0's (%s)",
                       g->t[e]->file->path, g->t[e]->name, g->t[0]->name);
                free(qd);
                return -EINVAL;
            }
            if (out_dtype_for(p, s) != o->dtype) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': dtype kind differs from expert 0's",
                       g->t[e]->file->path, g->t[e]->name);
                free(qd);
                return -EINVAL;
            }
            char *d = quant_desc(s);
            if (!d) {
                free(qd);
                return -ENOMEM;
            }
            if (strcmp(d, qd) != 0 && strncmp(qd, "mixed", 5) != 0) {
                char *m = xstrdup_printf("mixed (expert 0: %s)", qd);
                free(qd);
                qd = m;
            }
            free(d);
            if (!qd)
                return -ENOMEM;
        }
    }
    o->quant_desc = qd;
    if (g->is_weight) {
        if (nd0 != 2) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s': expert weight must be 2-D [out, in], has "
                   "%d dimensions", g->t[0]->file->path, g->t[0]->name, nd0);
            return -EINVAL;
        }
        o->op = DQ_OP_FUSE_T;
        for (uint32_t e = 0; e < g->n; e++)
            o->src[e].rows = sh0[0], o->src[e].cols = sh0[1];
        o->ndim = 3;
        o->shape[0] = g->n, o->shape[1] = sh0[1], o->shape[2] = sh0[0];
    } else {
        o->op = DQ_OP_STACK;
        o->ndim = nd0 + 1;
        if (o->ndim > DQ_MAX_DIMS)
            return -EINVAL;
        o->shape[0] = g->n;
        memcpy(o->shape + 1, sh0, (size_t)nd0 * sizeof *sh0);
    }
    o->numel = o->src[0].numel * g->n;
    o->nbytes = o->numel * dq_dtype_size(o->dtype);
    const char *t0 = g->t[0]->name;
    const char *dot = strstr(t0, g->is_weight ? ".weight" : ".bias");
    /* "P.gate_up_projs.0.weight" -> "P.gate_up_projs.{0..E-1}.weight" */
    const char *num = dot;
    while (num > t0 && num[-1] != '.')
        num--;
    o->source_desc = xstrdup_printf("%.*s{0..%u}%s%s", (int)(num - t0), t0, g->n - 1, dot,
                                    o->src[0].q ? " (4-bit)" : "");
    set_slicing(o, target);
    return o->source_desc ? 0 : -ENOMEM;
}

/* HF order: embeddings, then layers by number, then the rest by name. */
static int cmp_out(const void *a, const void *b)
{
    const struct dq_out *x = a, *y = b;
    int gx = strstr(x->name, "embed_tokens") ? 0 : x->layer != UINT32_MAX ? 1 : 2;
    int gy = strstr(y->name, "embed_tokens") ? 0 : y->layer != UINT32_MAX ? 1 : 2;
    if (gx != gy)
        return gx - gy;
    if (x->layer != y->layer)
        return x->layer < y->layer ? -1 : 1;
    return strcmp(x->name, y->name);
}

int dq_plan_build(struct dq_ckpt *ck, enum dq_dtype out_dtype, uint64_t target,
                  struct dq_plan **out)
{
    *out = NULL;
    if (out_dtype != DQ_F16 && out_dtype != DQ_BF16 && out_dtype != DQ_F32)
        return -EINVAL;
    if (target == 0)
        target = DEFAULT_SLICE;
    struct dq_plan *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->ck = ck;
    p->out_dtype = out_dtype;
    struct builder b = {.p = p};
    int rc = 0;
    for (size_t i = 0; i < ck->ntensors && !rc; i++) {
        const struct dq_tensor *t = ck->tensors[i];
        if (dq_is_quant_companion(t->name))
            continue;
        char *gname;
        uint32_t e;
        bool w;
        if (parse_expert(t->name, &gname, &e, &w))
            rc = group_add(&b, gname, e, w, t);
        else
            rc = add_single(&b, t, target);
    }
    for (size_t i = 0; i < b.ng && !rc; i++)
        rc = add_group(&b, &b.g[i], target);
    for (size_t i = 0; i < b.ng; i++) {
        free(b.g[i].out_name);
        free(b.g[i].t);
    }
    free(b.g);
    /* Companions whose weight is gone would silently vanish: refuse. */
    for (size_t i = 0; i < ck->ntensors && !rc; i++) {
        const char *n = ck->tensors[i]->name;
        const char *qs = strstr(n, ".quant_state.bitsandbytes__");
        if (qs) {
            char w[1024];
            snprintf(w, sizeof w, "%.*s", (int)(qs - n), n);
            if (!dq_ckpt_find(ck, w)) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: quant state '%s' has no weight '%s'",
                       ck->tensors[i]->file->path, n, w);
                rc = -EINVAL;
            }
        }
    }
    if (rc) {
        dq_plan_free(p);
        return rc;
    }
    qsort(p->out, p->nout, sizeof *p->out, cmp_out);
    for (size_t i = 1; i < p->nout; i++)
        if (strcmp(p->out[i - 1].name, p->out[i].name) == 0) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: two source tensors both become '%s'", ck->dir,
                   p->out[i].name);
            dq_plan_free(p);
            return -EINVAL;
        }
    for (size_t i = 0; i < p->nout; i++) {
        p->total_bytes += p->out[i].nbytes;
        uint32_t l = p->out[i].layer;
        if (l != UINT32_MAX && l + 1 > p->nlayers)
            p->nlayers = l + 1;
        if (p->out[i].op == DQ_OP_FUSE_T && p->out[i].nsrc > p->nexperts)
            p->nexperts = p->out[i].nsrc;
    }
    *out = p;
    return 0;
}

void dq_plan_free(struct dq_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->nout; i++) {
        struct dq_out *o = &p->out[i];
        for (uint32_t s = 0; o->src && s < o->nsrc; s++)
            free(o->src[s].q);
        free(o->src);
        free(o->name);
        free(o->source_desc);
        free(o->quant_desc);
    }
    free(p->out);
    free(p);
}

const struct dq_out *dq_plan_find(const struct dq_plan *p, const char *name)
{
    for (size_t i = 0; i < p->nout; i++)
        if (strcmp(p->out[i].name, name) == 0)
            return &p->out[i];
    return NULL;
}

void dq_out_slice_range(const struct dq_out *o, uint64_t s, uint64_t *off, uint64_t *len)
{
    uint64_t osz = dq_dtype_size(o->dtype);
    uint64_t per_src = o->numel / o->nsrc;
    uint64_t e = s / o->slices_per_src, j = s % o->slices_per_src;
    uint64_t start = j * o->slice_elems;
    uint64_t n = per_src - start < o->slice_elems ? per_src - start : o->slice_elems;
    *off = (e * per_src + start) * osz;
    *len = n * osz;
}

uint64_t dq_out_slice_at(const struct dq_out *o, uint64_t off)
{
    uint64_t el = off / dq_dtype_size(o->dtype);
    uint64_t per_src = o->numel / o->nsrc;
    return (el / per_src) * o->slices_per_src + (el % per_src) / o->slice_elems;
}
