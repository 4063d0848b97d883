/* inspect.c — bnbfs-inspect: the tensor plan of a checkpoint without
 * mounting anything (proof that the core stands without FUSE).
 *   bnbfs-inspect [options] SRC             table of output tensors + totals
 *   bnbfs-inspect [options] SRC --dump NAME raw bytes of one output tensor
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dequant.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: bnbfs-inspect [options] SRC\n"
            "Shows how bnbfs presents the bitsandbytes checkpoint in SRC as an HF checkpoint.\n\n"
            "  -t, --dtype f16|bf16|f32  output dtype (default f16)\n"
            "  -d, --dump NAME           write output tensor NAME's bytes to stdout\n"
            "  -j, --threads N           threads for --dump (default: all cores)\n"
            "      --json                plan as JSON lines instead of a table\n"
            "  -q, --quiet               no info lines on stderr\n"
            "  -h, --help, -V, --version\n");
}

static void shape_str(const struct dq_out *o, char *buf, size_t n)
{
    size_t p = 0;
    p += (size_t)snprintf(buf + p, n - p, "[");
    for (int i = 0; i < o->ndim && p < n; i++)
        p += (size_t)snprintf(buf + p, n - p, "%s%llu", i ? ", " : "",
                              (unsigned long long)o->shape[i]);
    if (p < n)
        snprintf(buf + p, n - p, "]");
}

static int dump(const struct dq_plan *p, const char *name, unsigned threads)
{
    const struct dq_out *o = dq_plan_find(p, name);
    if (!o) {
        fprintf(stderr, "bnbfs-inspect: %s: no output tensor named '%s'\n", p->ck->dir, name);
        return 1;
    }
    if (isatty(STDOUT_FILENO)) {
        fprintf(stderr, "bnbfs-inspect: refusing to write binary data to a terminal\n");
        return 1;
    }
    /* In pieces of at most 256 MiB, so a 1 GB tensor needs no 1 GB buffer. */
    const uint64_t piece = 256ull << 20;
    uint8_t *buf = malloc(o->nbytes < piece ? (o->nbytes ? o->nbytes : 1) : piece);
    if (!buf)
        return 1;
    struct dq_sat sat = {0};
    int rc = 0;
    for (uint64_t off = 0; off < o->nbytes && !rc; off += piece) {
        uint64_t len = o->nbytes - off < piece ? o->nbytes - off : piece;
        rc = dq_out_compute_range(o, off, len, buf, threads, &sat);
        if (rc) {
            fprintf(stderr, "bnbfs-inspect: %s: computing '%s' failed: %s\n", p->ck->dir, name,
                    strerror(-rc));
            break;
        }
        if (fwrite(buf, 1, len, stdout) != len) {
            fprintf(stderr, "bnbfs-inspect: write error: %s\n", strerror(errno));
            rc = -EIO;
        }
    }
    free(buf);
    if (fflush(stdout) != 0)
        rc = -EIO;
    if (sat.count)
        fprintf(stderr, "bnbfs-inspect: %s: %llu values did not fit %s and were saturated\n", name,
                (unsigned long long)sat.count, dq_dtype_name(o->dtype));
    return rc ? 1 : 0;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void table(const struct dq_plan *p, bool json)
{
    char sh[128], sz[32];
    const char *opn[] = {"copy", "stack", "fuse_t"};
    if (!json)
        printf("%-52s %-20s %-5s %-6s %-22s %s\n", "output tensor", "shape", "dtype", "op",
               "quant", "source");
    uint64_t quant_src = 0, nq = 0;
    for (size_t i = 0; i < p->nout; i++) {
        const struct dq_out *o = &p->out[i];
        shape_str(o, sh, sizeof sh);
        for (uint32_t s = 0; s < o->nsrc; s++)
            if (o->src[s].q)
                quant_src += o->src[s].q->codes->nbytes, nq++;
        if (json) {
            printf("{\"name\":");
            json_str(o->name);
            printf(",\"shape\":%s,\"dtype\":\"%s\",\"op\":\"%s\",\"bytes\":%llu,\"slices\":%llu,"
                   "\"quant\":",
                   sh, dq_dtype_name(o->dtype), opn[o->op], (unsigned long long)o->nbytes,
                   (unsigned long long)o->nslices);
            json_str(o->quant_desc);
            printf(",\"source\":");
            json_str(o->source_desc);
            printf("}\n");
        } else {
            printf("%-52s %-20s %-5s %-6s %-22s %s\n", o->name, sh, dq_dtype_name(o->dtype),
                   opn[o->op], o->quant_desc, o->source_desc);
        }
    }
    if (!json) {
        uint64_t src_bytes = 0;
        for (size_t f = 0; f < p->ck->nfiles; f++)
            src_bytes += p->ck->files[f]->size;
        printf("\n%zu output tensors, %s of %s", p->nout, dq_fmt_size(p->total_bytes, sh, sizeof sh),
               dq_dtype_name(p->out_dtype));
        printf(" from %zu source files (%s); %llu 4-bit weights (%s packed); %u layers, %u experts\n",
               p->ck->nfiles, dq_fmt_size(src_bytes, sz, sizeof sz), (unsigned long long)nq,
               dq_fmt_size(quant_src, sh, sizeof sh), p->nlayers, p->nexperts);
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"dtype", required_argument, 0, 't'}, {"dump", required_argument, 0, 'd'},
        {"threads", required_argument, 0, 'j'}, {"json", no_argument, 0, 'J'},
        {"quiet", no_argument, 0, 'q'}, {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'}, {0, 0, 0, 0},
    };
    enum dq_dtype dt = DQ_F16;
    const char *dump_name = NULL;
    unsigned threads = 0;
    bool json = false;
    int c;
    while ((c = getopt_long(argc, argv, "t:d:j:qhV", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (dq_out_dtype_parse(optarg, &dt)) {
                fprintf(stderr, "bnbfs-inspect: --dtype must be f16, bf16 or f32, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'd': dump_name = optarg; break;
        case 'j': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 4096) {
                fprintf(stderr, "bnbfs-inspect: --threads must be 1..4096\n");
                return 2;
            }
            threads = (unsigned)v;
            break;
        }
        case 'J': json = true; break;
        case 'q': dq_log_set_level(DQ_LOG_ERROR); break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("bnbfs-inspect %s\n", BNBFS_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 2;
    }
    struct dq_ckpt *ck;
    int rc = dq_ckpt_open(argv[optind], &ck);
    if (rc) {
        fprintf(stderr, "bnbfs-inspect: %s: not a usable checkpoint (%s)\n", argv[optind],
                strerror(-rc));
        return 1;
    }
    struct dq_plan *p;
    rc = dq_plan_build(ck, dt, 0, &p);
    if (rc) {
        fprintf(stderr, "bnbfs-inspect: %s: cannot plan the output (%s)\n", argv[optind],
                strerror(-rc));
        dq_ckpt_close(ck);
        return 1;
    }
    int ret = 0;
    if (dump_name)
        ret = dump(p, dump_name, threads);
    else
        table(p, json);
    dq_plan_free(p);
    dq_ckpt_close(ck);
    return ret;
}
