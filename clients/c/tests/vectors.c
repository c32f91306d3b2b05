#include "vectors.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "softlb.h"

static uint8_t *unhex(const char *h, size_t *n) {
    size_t l = strlen(h) / 2;
    uint8_t *b = malloc(l ? l : 1);
    for (size_t i = 0; i < l; i++) sscanf(h + 2 * i, "%2hhx", &b[i]);
    *n = l;
    return b;
}

/* The vector's value as a softlb_request; returns an error text or NULL. */
static const char *to_request(const jval *v, softlb_request *r, int *versions, const char **tags) {
    static const char *const ops[] = {"hello", "resolve", "report", "services", "endpoints", "watch", "unwatch"};
    memset(r, 0, sizeof *r);
    r->report.ok = 1, r->report.latency = -1;
    const jval *op = json_get(v, "op");
    if (!op || op->t != J_STR) return "no op";
    int kind = -1;
    for (int i = 0; i < 7; i++)
        if (!strcmp(op->s, ops[i])) kind = i;
    if (kind < 0) return "unknown op";
    r->kind = (softlb_req_kind)kind;
    for (size_t i = 0; i < v->n; i++) {
        const char *k = v->keys[i];
        const jval *x = &v->items[i];
        if (!strcmp(k, "op")) continue;
        if (!strcmp(k, "id")) {
            if (x->t == J_STR) r->id_str = x->s;
            else r->id = x->i;
        } else if (!strcmp(k, "versions")) {
            for (size_t j = 0; j < x->n && j < 8; j++) versions[j] = (int)x->items[j].i;
            r->versions = versions, r->nversions = x->n;
        } else if (!strcmp(k, "client")) r->client = x->s;
        else if (!strcmp(k, "service") && r->kind == SOFTLB_REQ_REPORT) r->report.service = x->s;
        else if (!strcmp(k, "service")) r->resolve.service = x->s;
        else if (!strcmp(k, "key")) r->resolve.key = x->s;
        else if (!strcmp(k, "tags")) {
            for (size_t j = 0; j < x->n && j < 8; j++) tags[j] = x->items[j].s;
            r->resolve.tags = tags, r->resolve.ntags = x->n;
        } else if (!strcmp(k, "lease") && r->kind == SOFTLB_REQ_RESOLVE) r->resolve.no_lease = !x->b;
        else if (!strcmp(k, "lease")) r->report.has_lease = 1, r->report.lease = x->i;
        else if (!strcmp(k, "ok")) r->report.ok = x->b;
        else if (!strcmp(k, "latency")) r->report.latency = x->num;
        else if (!strcmp(k, "endpoint")) r->report.endpoint = x->s;
        else if (!strcmp(k, "watch")) r->watch = x->i;
        else return "a field this client does not send";
    }
    return NULL;
}

static const char *check_request(const jval *v) {
    softlb_request r;
    int versions[8];
    const char *tags[8];
    const char *why = to_request(json_get(v, "value"), &r, versions, tags);
    if (why) return why;
    uint8_t *frame;
    size_t n;
    softlb_error err;
    if (softlb_encode(&r, &frame, &n, &err) != SOFTLB_OK) return "encode failed";
    size_t wn;
    uint8_t *want = unhex(json_get(v, "hex")->s, &wn);
    int same = n == wn && !memcmp(frame, want, n);
    free(want);
    free(frame);
    return same ? NULL : "encoded bytes differ";
}

static const char *check_response(const jval *v) {
    size_t n, used;
    uint8_t *b = unhex(json_get(v, "hex")->s, &n);
    char *json;
    softlb_error err;
    const char *why = NULL;
    for (size_t cut = 0; cut < n && !why; cut++) {   /* framing must survive any split */
        softlb_status st = softlb_decode(b, cut, &used, &json, &err);
        if (st != SOFTLB_OK || used || json) why = "a partial frame was not left waiting";
        free(json);
    }
    softlb_status st = softlb_decode(b, n, &used, &json, &err);
    free(b);
    if (why) return why;
    const jval *want = json_get(v, "value"), *e = json_get(want, "error");
    jval *got = json ? json_parse(json) : NULL;
    if (!got) why = "did not decode";
    else if (used != n) why = "did not consume the frame";
    else if (!json_equal(got, want)) why = "decoded value differs";
    else if (e && (st == SOFTLB_OK || strcmp(err.code, json_get(e, "code")->s))) why = "error code not surfaced";
    else if (!e && st != SOFTLB_OK) why = "a result surfaced as an error";
    json_free(got);
    free(json);
    return why;
}

static const char *check_invalid(const jval *v) {
    size_t n, used;
    uint8_t *b = unhex(json_get(v, "hex")->s, &n);
    char *json;
    softlb_error err;
    softlb_status st = softlb_decode(b, n, &used, &json, &err);
    free(b);
    free(json);
    const char *expect = json_get(v, "expect")->s;
    if (!strncmp(expect, "no answer", 9)) return st == SOFTLB_OK && !used && !json ? NULL : "a partial frame was not left waiting";
    size_t cl = strcspn(expect, " ,");
    if (st == SOFTLB_OK) return "accepted";
    if (strlen(err.code) != cl || strncmp(err.code, expect, cl)) return "rejected with another code";
    if (strstr(expect, "continues") && used != n) return "the frame was not consumed (the stream cannot go on)";
    return NULL;
}

int vectors_check(const char *path, vectors_outcome *out, FILE *log) {
    memset(out, 0, sizeof *out);
    char *text = json_read_file(path);
    jval *all = text ? json_parse(text) : NULL;
    free(text);
    if (!all || all->t != J_ARR) {
        json_free(all);
        return -1;
    }
    out->failed = calloc(all->n ? all->n : 1, sizeof(char *));
    for (size_t i = 0; i < all->n; i++) {
        const jval *v = &all->items[i];
        const jval *kind = json_get(v, "kind"), *name = json_get(v, "name");
        const char *why = !kind || !name || !json_get(v, "hex") ? "malformed vector"
                          : !strcmp(kind->s, "request")         ? check_request(v)
                          : !strcmp(kind->s, "response")        ? check_response(v)
                          : !strcmp(kind->s, "invalid")         ? check_invalid(v)
                                                                : "unknown kind";
        if (!why) {
            out->passed++;
            continue;
        }
        out->failed[out->nfailed++] = strdup(name && name->t == J_STR ? name->s : "?");
        if (log) fprintf(log, "vector %s: %s\n", name && name->t == J_STR ? name->s : "?", why);
    }
    json_free(all);
    return 0;
}

void vectors_outcome_free(vectors_outcome *o) {
    for (size_t i = 0; i < o->nfailed; i++) free(o->failed[i]);
    free(o->failed);
    o->failed = NULL;
}
