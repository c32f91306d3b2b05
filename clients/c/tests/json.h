/* A minimal JSON reader for the tests and the conformance runner (not part of libsoftlb). */
#ifndef SLB_TEST_JSON_H
#define SLB_TEST_JSON_H
#include <stddef.h>
#include <stdio.h>

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jval {
    jtype t;
    int b;
    double num;
    int is_int;          /* the number had no fraction or exponent: i is exact */
    long long i;
    char *s;             /* J_STR (NUL-terminated; n bytes) */
    size_t n;            /* J_STR length, or J_ARR/J_OBJ item count */
    struct jval *items;  /* J_ARR / J_OBJ values */
    char **keys;         /* J_OBJ keys, in document order */
} jval;

jval *json_parse(const char *text);          /* NULL on bad JSON */
void json_free(jval *v);
const jval *json_get(const jval *obj, const char *key);
int json_equal(const jval *a, const jval *b); /* objects: same keys in any order */
void json_write_str(FILE *f, const char *s);
char *json_read_file(const char *path);
#endif
