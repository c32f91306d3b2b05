#include "json.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const char *p; int bad; } rd;

static void ws(rd *r) { while (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t') r->p++; }

static void put_utf8(char *out, size_t *n, unsigned cp) {
    if (cp < 0x80) out[(*n)++] = (char)cp;
    else if (cp < 0x800) out[(*n)++] = (char)(0xc0 | cp >> 6), out[(*n)++] = (char)(0x80 | (cp & 0x3f));
    else if (cp < 0x10000)
        out[(*n)++] = (char)(0xe0 | cp >> 12), out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f)),
        out[(*n)++] = (char)(0x80 | (cp & 0x3f));
    else
        out[(*n)++] = (char)(0xf0 | cp >> 18), out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3f)),
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f)), out[(*n)++] = (char)(0x80 | (cp & 0x3f));
}

static char *str(rd *r, size_t *len) {
    r->p++;   /* the opening quote */
    const char *end = r->p;
    while (*end && *end != '"') end += (*end == '\\' && end[1]) ? 2 : 1;
    if (*end != '"') return r->bad = 1, NULL;
    char *out = malloc((size_t)(end - r->p) + 1);
    size_t n = 0;
    while (r->p < end) {
        char c = *r->p++;
        if (c != '\\') {
            out[n++] = c;
            continue;
        }
        c = *r->p++;
        switch (c) {
        case 'n': out[n++] = '\n'; break;
        case 't': out[n++] = '\t'; break;
        case 'r': out[n++] = '\r'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'u': {
            unsigned cp = (unsigned)strtoul((char[5]){r->p[0], r->p[1], r->p[2], r->p[3], 0}, NULL, 16);
            r->p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && r->p[0] == '\\' && r->p[1] == 'u') {
                unsigned lo = (unsigned)strtoul((char[5]){r->p[2], r->p[3], r->p[4], r->p[5], 0}, NULL, 16);
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                r->p += 6;
            }
            put_utf8(out, &n, cp);
            break;
        }
        default: out[n++] = c;
        }
    }
    r->p = end + 1;
    out[n] = 0;
    *len = n;
    return out;
}

static void value(rd *r, jval *v);

static void push(jval *v, size_t *cap, char *key, rd *r) {
    if (v->n == *cap) {
        *cap = *cap ? *cap * 2 : 4;
        v->items = realloc(v->items, *cap * sizeof *v->items);
        if (v->t == J_OBJ) v->keys = realloc(v->keys, *cap * sizeof *v->keys);
    }
    memset(&v->items[v->n], 0, sizeof *v->items);
    if (v->t == J_OBJ) v->keys[v->n] = key;
    v->n++;
    value(r, &v->items[v->n - 1]);
}

static void value(rd *r, jval *v) {
    memset(v, 0, sizeof *v);
    ws(r);
    const char *p = r->p;
    if (*p == '{' || *p == '[') {
        v->t = *p == '{' ? J_OBJ : J_ARR;
        char close = *p == '{' ? '}' : ']';
        size_t cap = 0;
        r->p++;
        ws(r);
        if (*r->p == close) {
            r->p++;
            return;
        }
        for (;;) {
            char *key = NULL;
            if (v->t == J_OBJ) {
                ws(r);
                size_t kl;
                if (*r->p != '"' || !(key = str(r, &kl))) return (void)(r->bad = 1);
                ws(r);
                if (*r->p++ != ':') return (void)(free(key), r->bad = 1);
            }
            push(v, &cap, key, r);
            if (r->bad) return;
            ws(r);
            if (*r->p == ',') {
                r->p++;
                continue;
            }
            if (*r->p == close) {
                r->p++;
                return;
            }
            r->bad = 1;
            return;
        }
    }
    if (*p == '"') {
        v->t = J_STR;
        v->s = str(r, &v->n);
        return;
    }
    if (!strncmp(p, "true", 4)) return (void)(v->t = J_BOOL, v->b = 1, r->p += 4);
    if (!strncmp(p, "false", 5)) return (void)(v->t = J_BOOL, r->p += 5);
    if (!strncmp(p, "null", 4)) return (void)(v->t = J_NULL, r->p += 4);
    char *end;
    v->t = J_NUM;
    v->num = strtod(p, &end);
    if (end == p) return (void)(r->bad = 1);
    v->is_int = !memchr(p, '.', (size_t)(end - p)) && !memchr(p, 'e', (size_t)(end - p)) && !memchr(p, 'E', (size_t)(end - p));
    if (v->is_int) v->i = strtoll(p, NULL, 10);
    r->p = end;
}

static void release(jval *v) {
    for (size_t i = 0; (v->t == J_ARR || v->t == J_OBJ) && i < v->n; i++) {
        release(&v->items[i]);
        if (v->t == J_OBJ) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->s);
}

jval *json_parse(const char *text) {
    rd r = {text, 0};
    jval *v = calloc(1, sizeof *v);
    value(&r, v);
    ws(&r);
    if (r.bad || *r.p) {
        json_free(v);
        return NULL;
    }
    return v;
}

void json_free(jval *v) {
    if (!v) return;
    release(v);
    free(v);
}

const jval *json_get(const jval *o, const char *key) {
    if (!o || o->t != J_OBJ) return NULL;
    for (size_t i = 0; i < o->n; i++)
        if (o->keys[i] && !strcmp(o->keys[i], key)) return &o->items[i];
    return NULL;
}

int json_equal(const jval *a, const jval *b) {
    if (a->t != b->t) return 0;
    switch (a->t) {
    case J_NULL: return 1;
    case J_BOOL: return a->b == b->b;
    case J_NUM: return a->is_int && b->is_int ? a->i == b->i : a->num == b->num;
    case J_STR: return a->n == b->n && !memcmp(a->s, b->s, a->n);
    case J_ARR:
        if (a->n != b->n) return 0;
        for (size_t i = 0; i < a->n; i++)
            if (!json_equal(&a->items[i], &b->items[i])) return 0;
        return 1;
    case J_OBJ:
        if (a->n != b->n) return 0;
        for (size_t i = 0; i < a->n; i++) {
            const jval *o = json_get(b, a->keys[i]);
            if (!o || !json_equal(&a->items[i], o)) return 0;
        }
        return 1;
    }
    return 0;
}

void json_write_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

char *json_read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    buf[n] = 0;
    fclose(f);
    return buf;
}
