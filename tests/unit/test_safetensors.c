/* test_safetensors.c — the reader against a corpus of malformed files:
 * each must fail with -EINVAL and one log line naming the file (and the
 * tensor where there is one) and saying what is wrong; none may crash.
 * Also the valid cases: metadata, scalars, zero-size tensors, checkpoint
 * directories with and without an index. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dequant.h"
#include "stw.h"
#include "tu.h"

/* header JSON + data bytes -> file; hl overrides the length prefix when != 0 */
static const char *raw_file(const char *json, size_t datalen, uint64_t hl_override)
{
    static char path[512];
    const char *dir = tu_tmpdir();
    size_t jl = strlen(json);
    size_t total = 8 + jl + datalen;
    uint8_t *buf = calloc(1, total);
    uint64_t hl = hl_override ? hl_override : jl;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(hl >> (8 * i));
    memcpy(buf + 8, json, jl);
    write_file(dir, "x.safetensors", buf, total);
    free(buf);
    snprintf(path, sizeof path, "%s/x.safetensors", dir);
    return path;
}

static void expect_bad(const char *json, size_t datalen, uint64_t hl, const char *msg)
{
    const char *path = raw_file(json, datalen, hl);
    tu_log_clear();
    struct dq_stfile *f = (struct dq_stfile *)0x1;
    int rc = dq_stfile_open(path, &f);
    CHECK_EQ_U64(-rc, EINVAL);
    CHECK(f == NULL);
    if (!tu_log_has(msg) || !tu_log_has(path)) {
        tu_failures++;
        fprintf(stderr, "FAIL %s: wanted a log line with '%s' and the path; got:\n%s", tu_current,
                msg, tu_log());
    }
}

#define T(name) "\"" name "\""
static void test_malformed_corpus(void)
{
    expect_bad("", 0, 0, "header does not start");
    expect_bad("{}", 0, 1000, "runs past the end");
    expect_bad("{}", 0, 200000000ull, "exceeds the 100000000-byte limit");
    expect_bad("[1,2]    ", 0, 0, "does not start with '{'");
    expect_bad("{\"a\": \xff}", 0, 0, "not valid UTF-8");
    expect_bad("{\"a\": {\"dtype\": ", 0, 0, "not a JSON object");
    expect_bad("{} x", 0, 0, "trailing bytes after the header");
    expect_bad("{\"w\": 3}", 0, 0, "tensor 'w': entry is not a JSON object");
    expect_bad("{\"w\": {\"shape\": [1], \"data_offsets\": [0, 2]}}", 2, 0, "tensor 'w': missing or non-string \"dtype\"");
    expect_bad("{\"w\": {\"dtype\": 7, \"shape\": [1], \"data_offsets\": [0, 2]}}", 2, 0, "non-string \"dtype\"");
    expect_bad("{\"w\": {\"dtype\": \"F17\", \"shape\": [1], \"data_offsets\": [0, 2]}}", 2, 0, "unknown dtype \"F17\"");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"data_offsets\": [0, 2]}}", 2, 0, "non-array \"shape\"");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [-1], \"data_offsets\": [0, 2]}}", 2, 0, "shape[0] is not a non-negative integer");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [1.5], \"data_offsets\": [0, 2]}}", 2, 0, "shape[0] is not a non-negative integer");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 2]}}", 2, 0, "9 dimensions");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [4294967296, 4294967296, 4], \"data_offsets\": [0, 2]}}", 2, 0, "overflows 64-bit element count");
    expect_bad("{\"w\": {\"dtype\": \"F64\", \"shape\": [2147483648, 2147483648], \"data_offsets\": [0, 2]}}", 2, 0, "byte size overflows");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [1]}}", 2, 0, "\"data_offsets\" must be [begin, end]");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [0]}}", 2, 0, "\"data_offsets\" must be [begin, end]");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [2, 0]}}", 2, 0, "end 0 before begin 2");
    expect_bad("{\"w\": {\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [0, 2]}}", 2, 0, "tensor 'w': data_offsets span 2 bytes");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},"
               " \"b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [3, 5]}}", 5, 0, "tensor 'b': data starts at 3 but the previous tensor ends at 2 (gap)");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},"
               " \"b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [1, 3]}}", 3, 0, "(overlap)");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [1, 3]}}", 3, 0, "tensor 'a': data starts at 1 but the buffer start ends at 0");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]}}", 5, 0, "(trailing bytes)");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]}}", 4, 0, "(truncated)");
    expect_bad("{\"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
               " \"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}", 2, 0, "tensor 'a' appears twice");
    expect_bad("{\"__metadata__\": [1]}", 0, 0, "\"__metadata__\" is not an object");
    expect_bad("{\"__metadata__\": {\"format\": 1}}", 0, 0, "value of 'format' is not a string");
    /* a short file */
    const char *dir = tu_tmpdir();
    write_file(dir, "short.safetensors", "abc", 3);
    char p[512];
    snprintf(p, sizeof p, "%s/short.safetensors", dir);
    struct dq_stfile *f;
    tu_log_clear();
    CHECK_EQ_U64(-dq_stfile_open(p, &f), EINVAL);
    CHECK(tu_log_has("too small"));
    snprintf(p, sizeof p, "%s/missing.safetensors", dir);
    CHECK_EQ_U64(-dq_stfile_open(p, &f), ENOENT);
}

static void test_valid_files(void)
{
    const char *path = raw_file("{\"__metadata__\":{\"format\":\"pt\"},"
                                "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                                "\"z\":{\"dtype\":\"BF16\",\"shape\":[0,7],\"data_offsets\":[4,4]},"
                                "\"w\":{\"dtype\":\"F16\",\"shape\":[2,1],\"data_offsets\":[4,8]}}  ",
                                8, 0);
    struct dq_stfile *f;
    CHECK(dq_stfile_open(path, &f) == 0);
    if (!f)
        return;
    CHECK_EQ_U64(f->ntensors, 3);
    CHECK(f->metadata_json && strstr(f->metadata_json, "\"format\":\"pt\""));
    const struct dq_tensor *s = dq_stfile_find(f, "s"), *w = dq_stfile_find(f, "w");
    CHECK(s && s->ndim == 0 && s->numel == 1 && s->offset == f->data_start);
    CHECK(w && w->ndim == 2 && w->nbytes == 4 && w->offset == f->data_start + 4);
    CHECK(dq_stfile_check(f) == 0);
    dq_stfile_close(f);
}

static void write_small(const char *dir, const char *file, const char *name)
{
    struct stw *w = stw_new();
    uint16_t v[4] = {0x3c00, 0x4000, 0x4200, 0x4400};
    uint64_t sh[1] = {4};
    stw_add(w, name, "BF16", 1, sh, v, sizeof v);
    stw_write(w, dir, file);
}

static void test_checkpoint_dirs(void)
{
    struct dq_ckpt *ck;
    const char *d = tu_tmpdir();
    char dir[512];
    snprintf(dir, sizeof dir, "%s", d);
    tu_log_clear();
    CHECK(dq_ckpt_open(dir, &ck) == -ENOENT);
    CHECK(tu_log_has("not a safetensors checkpoint"));
    write_small(dir, "model.safetensors", "a");
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    if (ck) {
        CHECK(dq_ckpt_find(ck, "a") != NULL && dq_ckpt_find(ck, "b") == NULL);
        CHECK(dq_ckpt_is_weight_file(ck, "model-00001-of-00002.safetensors"));
        CHECK(!dq_ckpt_is_weight_file(ck, "config.json"));
        dq_ckpt_close(ck);
    }
    /* sharded: index names two files */
    write_small(dir, "s1.safetensors", "x");
    write_small(dir, "s2.safetensors", "y");
    const char *idx = "{\"metadata\":{\"total_size\":16},\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\"}}";
    write_file(dir, "model.safetensors.index.json", idx, strlen(idx));
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    if (ck) {
        CHECK_EQ_U64(ck->nfiles, 2);
        CHECK(dq_ckpt_find(ck, "y") && strstr(dq_ckpt_find(ck, "y")->file->path, "s2"));
        dq_ckpt_close(ck);
    }
    const char *bad[][2] = {
        {"{\"weight_map\":{\"x\":\"s2.safetensors\"}}", "listed for s2.safetensors but that file has no such tensor"},
        {"{\"weight_map\":{\"x\":\"../s1.safetensors\"}}", "not a file in the checkpoint directory"},
        {"{\"weight_map\":{\"x\":\"nope.safetensors\"}}", "nope.safetensors: cannot open"},
        {"{\"weight_map\":[]}", "not a safetensors index"},
        {"not json", "not a safetensors index"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_file(dir, "model.safetensors.index.json", bad[i][0], strlen(bad[i][0]));
        tu_log_clear();
        CHECK(dq_ckpt_open(dir, &ck) != 0);
        if (!tu_log_has(bad[i][1])) {
            tu_failures++;
            fprintf(stderr, "FAIL %s: wanted '%s' in:\n%s", tu_current, bad[i][1], tu_log());
        }
    }
    /* the same tensor in two shards */
    write_small(dir, "s3.safetensors", "x");
    const char *dup = "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\"}}";
    write_file(dir, "model.safetensors.index.json", dup, strlen(dup));
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    dq_ckpt_close(ck);
    CHECK(dq_ckpt_open("/nonexistent/dir", &ck) != 0);
}

static void test_change_detection(void)
{
    const char *dir = tu_tmpdir();
    write_small(dir, "model.safetensors", "a");
    struct dq_ckpt *ck;
    CHECK(dq_ckpt_open(dir, &ck) == 0);
    if (!ck)
        return;
    CHECK(dq_stfile_check(ck->files[0]) == 0);
    usleep(20000);
    write_small(dir, "model.safetensors", "a"); /* rewritten in place: new mtime */
    CHECK(dq_stfile_check(ck->files[0]) == -ESTALE);
    dq_ckpt_close(ck);
}

int main(int argc, char **argv)
{
    static const struct tu_case cases[] = {
        {"malformed_corpus", test_malformed_corpus},
        {"valid_files", test_valid_files},
        {"checkpoint_dirs", test_checkpoint_dirs},
        {"change_detection", test_change_detection},
        {0, 0},
    };
    return tu_main(cases, argc, argv);
}
