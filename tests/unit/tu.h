/* tu.h — the unit-test helper: CHECK macros that count failures and say
 * where, a captured log for asserting on error messages, and scratch
 * directories. Each test program is a list of TEST functions run by
 * tu_main; it exits 1 when any check failed. */
#ifndef BNBFS_TU_H
#define BNBFS_TU_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

extern int tu_failures;
extern const char *tu_current;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            tu_failures++;                                                                   \
            fprintf(stderr, "FAIL %s (%s:%d): %s\n", tu_current, __FILE__, __LINE__, #cond); \
        }                                                                                    \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                                    \
    do {                                                                                      \
        unsigned long long va_ = (unsigned long long)(a), vb_ = (unsigned long long)(b);      \
        if (va_ != vb_) {                                                                     \
            tu_failures++;                                                                    \
            fprintf(stderr, "FAIL %s (%s:%d): %s == %s: %llu != %llu (0x%llx != 0x%llx)\n",    \
                    tu_current, __FILE__, __LINE__, #a, #b, va_, vb_, va_, vb_);              \
        }                                                                                     \
    } while (0)

/* The log lines of the current test, joined by '\n'. */
const char *tu_log(void);
void tu_log_clear(void);
bool tu_log_has(const char *needle);
/* A fresh empty directory for the current test; path valid until the next call. */
const char *tu_tmpdir(void);

typedef void (*tu_fn)(void);
struct tu_case { const char *name; tu_fn fn; };
int tu_main(const struct tu_case *cases, int argc, char **argv);

#endif
