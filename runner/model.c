/* model.c — opens a gpt-oss checkpoint for bnbfs-run: config.json and
 * generation_config.json read with cJSON into struct rn_config, the weights
 * found through the safetensors index (dq_ckpt), and every tensor the forward
 * pass needs checked for presence, dtype and shape before anything runs.
 *
 * Not here: reading the weight bytes (model_read.c), the GPU (engine.c).
 *
 * Invariant: every dimension comes from the files. Nothing below knows that
 * gpt-oss-20b has 24 layers or 2880 hidden units, so the tiny fixture runs
 * the same code. The checkpoint directory is only ever opened read-only.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "model_read.h"
#include "runner.h"

#define TAG "model"
/* Upper bound for any single dimension read from config.json: keeps every
 * product of three dimensions far inside 64 bits and rejects nonsense early. */
#define DIM_MAX (1 << 24)

struct model_priv {
    struct dq_ckpt *ck;
    char *config_path;              /* owned; for error messages */
};

/* ----------------------------------------------------------- json utils */

static int load_json(const char *path, bool optional, cJSON **out)
{
    char *text = NULL;
    int rc = dq_read_file(path, 16u << 20, &text, NULL);
    if (rc == -ENOENT && optional) {
        *out = NULL;
        return 0;
    }
    if (rc) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: cannot read: %s", path, strerror(-rc));
        return rc;
    }
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!j || !cJSON_IsObject(j)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a JSON object", path);
        cJSON_Delete(j);
        return -EINVAL;
    }
    *out = j;
    return 0;
}

/* The value of key (absent or null: -ENOENT, or -EINVAL logged when
 * required). */
static int get_item(const cJSON *o, const char *path, const char *key, bool required,
                    const cJSON **out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (!required)
            return -ENOENT;
        dq_log(DQ_LOG_ERROR, TAG, "%s: missing key \"%s\"", path, key);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

/* Fetch a number that must be an integer in [lo, hi]. */
static int get_int(const cJSON *o, const char *path, const char *key, bool required,
                   long lo, long hi, int *out)
{
    const cJSON *v;
    int rc = get_item(o, path, key, required, &v);
    if (rc)
        return rc;
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || d != floor(d) || d < (double)lo || d > (double)hi) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: \"%s\" must be an integer in [%ld, %ld]", path, key,
               lo, hi);
        return -EINVAL;
    }
    *out = (int)d;
    return 0;
}

static int get_num(const cJSON *o, const char *path, const char *key, bool required,
                   double *out)
{
    const cJSON *v;
    int rc = get_item(o, path, key, required, &v);
    if (rc)
        return rc;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: \"%s\" must be a finite number", path, key);
        return -EINVAL;
    }
    *out = v->valuedouble;
    return 0;
}

/* eos_token_id may be an int or a list of ints. Returns -ENOENT when absent. */
static int get_eos(const cJSON *o, const char *path, struct rn_config *c)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "eos_token_id");
    if (!v || cJSON_IsNull(v))
        return -ENOENT;
    int n = 0;
    if (cJSON_IsNumber(v)) {
        if (v->valuedouble < 0 || v->valuedouble >= c->vocab) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: eos_token_id %g outside the vocabulary", path,
                   v->valuedouble);
            return -EINVAL;
        }
        c->eos[n++] = (int)v->valuedouble;
    } else if (cJSON_IsArray(v)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, v) {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= c->vocab ||
                e->valuedouble != floor(e->valuedouble)) {
                dq_log(DQ_LOG_ERROR, TAG, "%s: eos_token_id holds a non-id", path);
                return -EINVAL;
            }
            if (n == RN_MAX_EOS) {
                dq_log(DQ_LOG_WARN, TAG, "%s: more than %d eos ids; keeping the first %d",
                       path, RN_MAX_EOS, RN_MAX_EOS);
                break;
            }
            c->eos[n++] = (int)e->valuedouble;
        }
    } else {
        dq_log(DQ_LOG_ERROR, TAG, "%s: eos_token_id must be an id or a list of ids", path);
        return -EINVAL;
    }
    c->neos = n;
    return 0;
}

/* ------------------------------------------------------------- config */

/* RoPE parameters live in "rope_scaling" (transformers 4.x, the gpt-oss
 * release) or "rope_parameters" (transformers 5, which also moves
 * rope_theta inside). Accept both. */
static int parse_rope(const cJSON *j, const char *path, struct rn_config *c)
{
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(j, "rope_scaling");
    if (!rs || cJSON_IsNull(rs))
        rs = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    if (rs && !cJSON_IsNull(rs) && !cJSON_IsObject(rs)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rope_scaling must be an object", path);
        return -EINVAL;
    }
    if (rs && cJSON_IsNull(rs))
        rs = NULL;

    int rc = get_num(j, path, "rope_theta", !rs, &c->rope_theta);
    if (rc == -ENOENT)
        rc = get_num(rs, path, "rope_theta", true, &c->rope_theta);
    if (rc)
        return rc;
    if (c->rope_theta <= 1.0) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rope_theta must be > 1", path);
        return -EINVAL;
    }

    c->yarn = false;
    c->yarn_factor = 1.0;
    c->yarn_beta_fast = 32.0;
    c->yarn_beta_slow = 1.0;
    c->yarn_orig_max_pos = c->max_position;
    c->yarn_truncate = true;
    if (!rs)
        return 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!type)
        type = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!cJSON_IsString(type)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rope_scaling.rope_type missing", path);
        return -EINVAL;
    }
    if (strcmp(type->valuestring, "default") == 0)
        return 0;
    if (strcmp(type->valuestring, "yarn") != 0) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rope_type \"%s\" is not supported (default, yarn)",
               path, type->valuestring);
        return -ENOTSUP;
    }
    c->yarn = true;
    rc = get_int(rs, path, "original_max_position_embeddings", false, 1, INT32_MAX,
                 &c->yarn_orig_max_pos);
    if (rc && rc != -ENOENT)
        return rc;
    /* An explicit factor wins (transformers 5); without one, the ratio of
     * the post- and pre-YaRN context lengths (as transformers does). */
    rc = get_num(rs, path, "factor", false, &c->yarn_factor);
    if (rc == -ENOENT && c->max_position != INT32_MAX) {
        c->yarn_factor = (double)c->max_position / c->yarn_orig_max_pos;
        rc = 0;
    } else if (rc == -ENOENT) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: missing key \"factor\" in rope_scaling", path);
        return -EINVAL;
    }
    if (rc)
        return rc;
    if (c->yarn_factor < 1.0) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rope_scaling.factor must be >= 1", path);
        return -EINVAL;
    }
    /* transformers' defaults for absent beta_fast/beta_slow are 32 and 1. */
    rc = get_num(rs, path, "beta_fast", false, &c->yarn_beta_fast);
    if (rc && rc != -ENOENT)
        return rc;
    rc = get_num(rs, path, "beta_slow", false, &c->yarn_beta_slow);
    if (rc && rc != -ENOENT)
        return rc;
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(rs, "truncate");
    if (tr && !cJSON_IsNull(tr)) {
        if (!cJSON_IsBool(tr)) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: rope_scaling.truncate must be a boolean", path);
            return -EINVAL;
        }
        c->yarn_truncate = cJSON_IsTrue(tr);
    }
    /* attention_factor / mscale override the 0.1*ln(factor)+1 default in
     * transformers; the engine implements only the default, so refuse them
     * rather than silently computing something else. */
    static const char *const unsupported[] = {"attention_factor", "mscale", "mscale_all_dim"};
    for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(rs, unsupported[i]);
        if (u && !cJSON_IsNull(u)) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: rope_scaling.%s is not supported", path,
                   unsupported[i]);
            return -ENOTSUP;
        }
    }
    return 0;
}

static int parse_config(const char *dir, struct rn_config *c, char **cfg_path_out)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    *cfg_path_out = strdup(path);
    if (!*cfg_path_out)
        return -ENOMEM;
    cJSON *j;
    int rc = load_json(path, false, &j);
    if (rc)
        return rc;
    memset(c, 0, sizeof *c);

    const cJSON *q = cJSON_GetObjectItemCaseSensitive(j, "quantization_config");
    if (q && !cJSON_IsNull(q)) {
        dq_log(DQ_LOG_ERROR, TAG,
               "%s: has a quantization_config: this is a quantized checkpoint; mount it "
               "with bnbfs and run on the mount point", path);
        rc = -EINVAL;
        goto out;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    if (cJSON_IsString(mt) && strcmp(mt->valuestring, "gpt_oss") != 0)
        dq_log(DQ_LOG_WARN, TAG, "%s: model_type \"%s\", expected gpt_oss", path,
               mt->valuestring);

    struct { const char *key; int *dst; long lo, hi; } ints[] = {
        {"hidden_size", &c->hidden, 1, DIM_MAX},
        {"intermediate_size", &c->intermediate, 1, DIM_MAX},
        {"num_hidden_layers", &c->nlayers, 1, RN_MAX_LAYERS},
        {"num_local_experts", &c->nexperts, 1, 4096},
        {"num_attention_heads", &c->nheads, 1, 4096},
        {"num_key_value_heads", &c->nkv, 1, 4096},
        {"head_dim", &c->head_dim, 2, 4096},
        {"vocab_size", &c->vocab, 1, DIM_MAX},
    };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        if ((rc = get_int(j, path, ints[i].key, true, ints[i].lo, ints[i].hi, ints[i].dst)))
            goto out;
    /* transformers names it num_experts_per_tok; openai's config experts_per_token. */
    rc = get_int(j, path, "num_experts_per_tok", false, 1, c->nexperts, &c->topk);
    if (rc == -ENOENT)
        rc = get_int(j, path, "experts_per_token", true, 1, c->nexperts, &c->topk);
    if (rc)
        goto out;
    if (c->nheads % c->nkv) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: num_attention_heads %d not a multiple of "
               "num_key_value_heads %d", path, c->nheads, c->nkv);
        rc = -EINVAL;
        goto out;
    }
    if (c->head_dim % 2) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: head_dim %d must be even (RoPE halves)", path,
               c->head_dim);
        rc = -EINVAL;
        goto out;
    }
    rc = get_int(j, path, "max_position_embeddings", false, 1, INT32_MAX, &c->max_position);
    if (rc == -ENOENT) {
        c->max_position = INT32_MAX;
        rc = 0;
    }
    if (rc)
        goto out;

    double d;
    if ((rc = get_num(j, path, "rms_norm_eps", true, &d)))
        goto out;
    if (d <= 0 || d > 1) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: rms_norm_eps must be in (0, 1]", path);
        rc = -EINVAL;
        goto out;
    }
    c->rms_eps = (float)d;
    if ((rc = get_num(j, path, "swiglu_limit", true, &d)))
        goto out;
    if (d <= 0) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: swiglu_limit must be > 0", path);
        rc = -EINVAL;
        goto out;
    }
    c->swiglu_limit = (float)d;
    /* transformers hard-codes alpha = 1.702 in GptOssExperts; accept an
     * explicit value for checkpoints that carry one. */
    c->swiglu_alpha = 1.702f;
    if (get_num(j, path, "swiglu_alpha", false, &d) == 0)
        c->swiglu_alpha = (float)d;

    if ((rc = parse_rope(j, path, c)))
        goto out;

    /* layer_types: transformers' GptOssConfig default, when absent, slides on
     * even layers. */
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(j, "layer_types");
    bool any_sliding = false;
    if (!lt || cJSON_IsNull(lt)) {
        dq_log(DQ_LOG_WARN, TAG, "%s: no layer_types; using transformers' default "
               "(even layers sliding)", path);
        for (int l = 0; l < c->nlayers; l++)
            c->sliding[l] = (l % 2) == 0;
    } else {
        if (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != c->nlayers) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: layer_types must list %d layer types", path,
                   c->nlayers);
            rc = -EINVAL;
            goto out;
        }
        int l = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, lt) {
            if (cJSON_IsString(e) && strcmp(e->valuestring, "sliding_attention") == 0)
                c->sliding[l] = true;
            else if (cJSON_IsString(e) && strcmp(e->valuestring, "full_attention") == 0)
                c->sliding[l] = false;
            else {
                dq_log(DQ_LOG_ERROR, TAG, "%s: layer_types[%d] is not \"sliding_attention\" "
                       "or \"full_attention\"", path, l);
                rc = -EINVAL;
                goto out;
            }
            l++;
        }
    }
    for (int l = 0; l < c->nlayers; l++)
        any_sliding |= c->sliding[l];
    rc = get_int(j, path, "sliding_window", any_sliding, 1, INT32_MAX, &c->sliding_window);
    if (rc == -ENOENT)
        rc = 0;
    if (rc)
        goto out;

    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(j, "tie_word_embeddings");
    c->tie_embeddings = cJSON_IsTrue(tie);

    c->pad_id = -1;
    if (get_int(j, path, "pad_token_id", false, 0, c->vocab - 1, &c->pad_id) == -EINVAL) {
        rc = -EINVAL;
        goto out;
    }
    rc = get_eos(j, path, c);
    if (rc == -ENOENT)
        rc = 0;
    if (rc)
        goto out;

    /* generation_config.json, when present, overrides eos (and pad). */
    cJSON *g = NULL;
    char gpath[4096];
    snprintf(gpath, sizeof gpath, "%s/generation_config.json", dir);
    if ((rc = load_json(gpath, true, &g)))
        goto out;
    if (g) {
        rc = get_eos(g, gpath, c);
        if (rc == -ENOENT)
            rc = 0;
        int pad;
        int prc = get_int(g, gpath, "pad_token_id", false, 0, c->vocab - 1, &pad);
        if (prc == 0)
            c->pad_id = pad;
        else if (prc == -EINVAL && !rc)
            rc = -EINVAL;
        cJSON_Delete(g);
    }
out:
    cJSON_Delete(j);
    return rc;
}

/* ------------------------------------------------------------- tensors */

static void fmt_shape(char *buf, size_t n, int ndim, const uint64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%" PRIu64, i ? ", " : "", shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
}

/* Looks NAME up and checks dtype (F16, BF16, F32) and shape. */
static int bind(const struct rn_model *m, struct rn_tensor *t, const char *name, int ndim,
                uint64_t d0, uint64_t d1, uint64_t d2)
{
    const struct model_priv *p = m->priv;
    const struct dq_tensor *src = dq_ckpt_find(p->ck, name);
    uint64_t want[3] = {d0, d1, d2};
    char ws[96], hs[160];
    if (!src) {
        fmt_shape(ws, sizeof ws, ndim, want);
        dq_log(DQ_LOG_ERROR, TAG, "%s: tensor %s %s is missing from the checkpoint",
               m->dir, name, ws);
        return -ENOENT;
    }
    const char *file = src->file ? src->file->path : m->dir;
    if (src->dtype != DQ_F16 && src->dtype != DQ_BF16 && src->dtype != DQ_F32) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s: dtype %s, expected F16, BF16 or F32%s", file,
               name, dq_dtype_name(src->dtype),
               src->dtype == DQ_U8 ? " (a 4-bit quantized weight? run on the bnbfs mount)"
                                   : "");
        return -EINVAL;
    }
    bool ok = src->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = src->shape[i] == want[i];
    if (!ok) {
        fmt_shape(ws, sizeof ws, ndim, want);
        fmt_shape(hs, sizeof hs, src->ndim, src->shape);
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s: shape %s, expected %s (from config.json)", file,
               name, hs, ws);
        return -EINVAL;
    }
    t->data = src->file->map + src->offset;
    t->dtype = src->dtype;
    t->ndim = ndim;
    memset(t->shape, 0, sizeof t->shape);
    for (int i = 0; i < ndim; i++)
        t->shape[i] = want[i];
    t->nbytes = src->nbytes;
    t->name = src->name;
    t->src = src;
    return 0;
}

static int bind_all(struct rn_model *m)
{
    const struct rn_config *c = &m->cfg;
    const uint64_t H = (uint64_t)c->hidden, I = (uint64_t)c->intermediate,
                   E = (uint64_t)c->nexperts, V = (uint64_t)c->vocab,
                   Q = (uint64_t)c->nheads * (uint64_t)c->head_dim,
                   KV = (uint64_t)c->nkv * (uint64_t)c->head_dim;
    int rc, first = 0;
    /* Check everything and report every problem, then fail with the first. */
#define B(t, name, nd, a, b, d)                                      \
    do {                                                             \
        rc = bind(m, (t), (name), (nd), (a), (b), (d));              \
        if (rc && !first)                                            \
            first = rc;                                              \
    } while (0)
    B(&m->embed, "model.embed_tokens.weight", 2, V, H, 0);
    B(&m->final_norm, "model.norm.weight", 1, H, 0, 0);
    if (c->tie_embeddings && !dq_ckpt_find(((struct model_priv *)m->priv)->ck,
                                            "lm_head.weight"))
        m->lm_head = m->embed;
    else
        B(&m->lm_head, "lm_head.weight", 2, V, H, 0);
    char n[160];
    for (int l = 0; l < c->nlayers; l++) {
        struct rn_layer *L = &m->layers[l];
#define N(suffix) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), n)
        B(&L->attn_norm, N("input_layernorm.weight"), 1, H, 0, 0);
        B(&L->q_w, N("self_attn.q_proj.weight"), 2, Q, H, 0);
        B(&L->q_b, N("self_attn.q_proj.bias"), 1, Q, 0, 0);
        B(&L->k_w, N("self_attn.k_proj.weight"), 2, KV, H, 0);
        B(&L->k_b, N("self_attn.k_proj.bias"), 1, KV, 0, 0);
        B(&L->v_w, N("self_attn.v_proj.weight"), 2, KV, H, 0);
        B(&L->v_b, N("self_attn.v_proj.bias"), 1, KV, 0, 0);
        B(&L->o_w, N("self_attn.o_proj.weight"), 2, H, Q, 0);
        B(&L->o_b, N("self_attn.o_proj.bias"), 1, H, 0, 0);
        B(&L->sinks, N("self_attn.sinks"), 1, (uint64_t)c->nheads, 0, 0);
        B(&L->mlp_norm, N("post_attention_layernorm.weight"), 1, H, 0, 0);
        B(&L->router_w, N("mlp.router.weight"), 2, E, H, 0);
        B(&L->router_b, N("mlp.router.bias"), 1, E, 0, 0);
        B(&L->gate_up, N("mlp.experts.gate_up_proj"), 3, E, H, 2 * I);
        B(&L->gate_up_b, N("mlp.experts.gate_up_proj_bias"), 2, E, 2 * I, 0);
        B(&L->down, N("mlp.experts.down_proj"), 3, E, I, H);
        B(&L->down_b, N("mlp.experts.down_proj_bias"), 2, E, H, 0);
#undef N
    }
#undef B
    return first;
}

/* ---------------------------------------------------------------- API */

int rn_model_open(const char *dir, struct rn_model **out)
{
    *out = NULL;
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        int rc = stat(dir, &st) < 0 ? -errno : -ENOTDIR;
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a model directory: %s", dir, strerror(-rc));
        return rc;
    }
    struct rn_model *m = calloc(1, sizeof *m);
    struct model_priv *p = calloc(1, sizeof *p);
    if (!m || !p || !(m->dir = strdup(dir))) {
        free(m);
        free(p);
        return -ENOMEM;
    }
    m->priv = p;
    int rc = parse_config(dir, &m->cfg, &p->config_path);
    if (rc)
        goto fail;
    if ((rc = dq_ckpt_open(dir, &p->ck)))
        goto fail;
    m->layers = calloc((size_t)m->cfg.nlayers, sizeof *m->layers);
    if (!m->layers) {
        rc = -ENOMEM;
        goto fail;
    }
    if ((rc = bind_all(m)))
        goto fail;
    *out = m;
    return 0;
fail:
    rn_model_close(m);
    return rc;
}

void rn_model_close(struct rn_model *m)
{
    if (!m)
        return;
    struct model_priv *p = m->priv;
    if (p) {
        dq_ckpt_close(p->ck);
        free(p->config_path);
        free(p);
    }
    free(m->layers);
    free(m->dir);
    free(m);
}

uint64_t rn_model_weight_bytes(const struct rn_model *m)
{
    const struct model_priv *p = m->priv;
    uint64_t total = 0;
    for (size_t i = 0; i < p->ck->ntensors; i++)
        total += p->ck->tensors[i]->nbytes;
    return total;
}

const struct dq_ckpt *rn_model_ckpt(const struct rn_model *m)
{
    return ((const struct model_priv *)m->priv)->ck;
}
