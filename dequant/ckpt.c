/* ckpt.c — a checkpoint directory: model.safetensors.index.json with its
 * shards, or a single model.safetensors. Opens and validates every file,
 * checks that the index and the shards agree, and offers name lookup over
 * all tensors. Not here: anything about quantization (qstate.c) or the
 * output layout (plan.c). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "dequant.h"

#define TAG "checkpoint"
#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b + 1);
    }
    return p;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    const struct dq_tensor *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int add_file(struct dq_ckpt *ck, const char *base, struct dq_stfile **out)
{
    for (size_t i = 0; i < ck->nfiles; i++) {
        const char *p = strrchr(ck->files[i]->path, '/');
        if (strcmp(p ? p + 1 : ck->files[i]->path, base) == 0) {
            *out = ck->files[i];
            return 0;
        }
    }
    char *path = path_join(ck->dir, base);
    if (!path)
        return -ENOMEM;
    struct dq_stfile *f;
    int rc = dq_stfile_open(path, &f);
    free(path);
    if (rc)
        return rc;
    struct dq_stfile **nf = realloc(ck->files, (ck->nfiles + 1) * sizeof *nf);
    if (!nf) {
        dq_stfile_close(f);
        return -ENOMEM;
    }
    ck->files = nf;
    ck->files[ck->nfiles++] = f;
    *out = f;
    return 0;
}

static int open_index(struct dq_ckpt *ck, const char *index_path)
{
    char *buf = NULL;
    size_t len = 0;
    int rc = dq_read_file(index_path, 64u << 20, &buf, &len);
    if (rc) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: cannot read: %s", index_path, strerror(-rc));
        return rc;
    }
    cJSON *root = cJSON_ParseWithLength(buf, len);
    free(buf);
    const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!root || !cJSON_IsObject(root) || !cJSON_IsObject(wm)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a safetensors index (needs a \"weight_map\" object)",
               index_path);
        cJSON_Delete(root);
        return -EINVAL;
    }
    size_t n = (size_t)cJSON_GetArraySize(wm);
    ck->tensors = calloc(n ? n : 1, sizeof *ck->tensors);
    if (!ck->tensors) {
        cJSON_Delete(root);
        return -ENOMEM;
    }
    rc = 0;
    for (const cJSON *e = wm->child; e && !rc; e = e->next) {
        if (!cJSON_IsString(e)) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: weight_map entry '%s' is not a file name", index_path,
                   e->string);
            rc = -EINVAL;
            break;
        }
        const char *fname = e->valuestring;
        if (!*fname || strchr(fname, '/') || !strcmp(fname, ".") || !strcmp(fname, "..")) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: weight_map entry '%s' names '%s', not a file in the "
                   "checkpoint directory", index_path, e->string, fname);
            rc = -EINVAL;
            break;
        }
        struct dq_stfile *f;
        rc = add_file(ck, fname, &f);
        if (rc)
            break;
        const struct dq_tensor *t = dq_stfile_find(f, e->string);
        if (!t) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s' is listed for %s but that file has no "
                   "such tensor", index_path, e->string, fname);
            rc = -EINVAL;
            break;
        }
        ck->tensors[ck->ntensors++] = t;
    }
    cJSON_Delete(root);
    if (rc)
        return rc;
    /* Tensors a shard holds but the index does not list are not part of the
     * model as transformers would load it: say so once per file. */
    for (size_t i = 0; i < ck->nfiles; i++) {
        size_t listed = 0;
        for (size_t k = 0; k < ck->ntensors; k++)
            listed += ck->tensors[k]->file == ck->files[i];
        if (listed != ck->files[i]->ntensors)
            dq_log(DQ_LOG_WARN, TAG, "%s: %zu tensors not listed in the index are ignored",
                   ck->files[i]->path, ck->files[i]->ntensors - listed);
    }
    return 0;
}

int dq_ckpt_open(const char *dir, struct dq_ckpt **out)
{
    *out = NULL;
    if (!dir)
        return -EINVAL;
    struct stat st;
    if (stat(dir, &st) < 0) {
        int e = errno;
        dq_log(DQ_LOG_ERROR, TAG, "%s: %s", dir, strerror(e));
        return -e;
    }
    if (!S_ISDIR(st.st_mode)) {
        dq_log(DQ_LOG_ERROR, TAG, "%s: not a directory", dir);
        return -ENOTDIR;
    }
    struct dq_ckpt *ck = calloc(1, sizeof *ck);
    if (!ck)
        return -ENOMEM;
    int rc = -ENOMEM;
    ck->dir = strdup(dir);
    char *index_path = ck->dir ? path_join(dir, INDEX_NAME) : NULL;
    if (!index_path)
        goto fail;
    if (access(index_path, F_OK) == 0) {
        ck->index_file = strdup(INDEX_NAME);
        rc = ck->index_file ? open_index(ck, index_path) : -ENOMEM;
    } else {
        char *single = path_join(dir, SINGLE_NAME);
        if (!single)
            goto fail;
        if (access(single, F_OK) != 0) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: no %s or %s: not a safetensors checkpoint", dir,
                   INDEX_NAME, SINGLE_NAME);
            free(single);
            rc = -ENOENT;
            goto fail;
        }
        free(single);
        struct dq_stfile *f;
        rc = add_file(ck, SINGLE_NAME, &f);
        if (!rc) {
            ck->tensors = calloc(f->ntensors ? f->ntensors : 1, sizeof *ck->tensors);
            if (!ck->tensors)
                rc = -ENOMEM;
            for (size_t i = 0; !rc && i < f->ntensors; i++)
                ck->tensors[ck->ntensors++] = &f->tensors[i];
        }
    }
    if (rc)
        goto fail;
    qsort(ck->tensors, ck->ntensors, sizeof *ck->tensors, cmp_tensor_name);
    for (size_t i = 1; i < ck->ntensors; i++)
        if (strcmp(ck->tensors[i - 1]->name, ck->tensors[i]->name) == 0) {
            dq_log(DQ_LOG_ERROR, TAG, "%s: tensor '%s' is in both %s and %s", dir,
                   ck->tensors[i]->name, ck->tensors[i - 1]->file->path, ck->tensors[i]->file->path);
            rc = -EINVAL;
            goto fail;
        }
    free(index_path);
    *out = ck;
    return 0;
fail:
    free(index_path);
    dq_ckpt_close(ck);
    return rc;
}

void dq_ckpt_close(struct dq_ckpt *ck)
{
    if (!ck)
        return;
    for (size_t i = 0; i < ck->nfiles; i++)
        dq_stfile_close(ck->files[i]);
    free(ck->files);
    free(ck->tensors);
    free(ck->index_file);
    free(ck->dir);
    free(ck);
}

const struct dq_tensor *dq_ckpt_find(const struct dq_ckpt *ck, const char *name)
{
    size_t lo = 0, hi = ck->ntensors;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(ck->tensors[mid]->name, name);
        if (c == 0)
            return ck->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static bool ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

bool dq_ckpt_is_weight_file(const struct dq_ckpt *ck, const char *basename)
{
    (void)ck;
    /* Every safetensors file and index is hidden: the mount shows its own. */
    return ends_with(basename, ".safetensors") || ends_with(basename, ".safetensors.index.json");
}
