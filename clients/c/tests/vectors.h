/* The shared wire vectors (tests/wire_vectors/vectors.json) through libsoftlb's codec. */
#ifndef SLB_TEST_VECTORS_H
#define SLB_TEST_VECTORS_H
#include <stddef.h>
#include <stdio.h>

typedef struct vectors_outcome {
    int passed;
    size_t nfailed;
    char **failed;     /* names; free with vectors_outcome_free */
} vectors_outcome;

/* -1 if the file cannot be read or parsed; else 0 with out filled. Explains failures on log. */
int vectors_check(const char *path, vectors_outcome *out, FILE *log);
void vectors_outcome_free(vectors_outcome *o);
#endif
