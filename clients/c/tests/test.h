/* A tiny test harness: every test is a function; the run ends "N passed, N failed". */
#ifndef SLB_TEST_H
#define SLB_TEST_H
#include <stdio.h>

extern int t_current_failed;
extern const char *t_vectors_path;
#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            t_current_failed = 1;                                                    \
        }                                                                            \
    } while (0)

typedef struct { const char *name; void (*fn)(void); } test_case;
extern const test_case codec_tests[], live_tests[];
#endif
