/* The handle: one reused connection, per-call timeouts, bounded reconnects.
 *
 * Resilience rules (docs/PROTOCOL.md §Clients):
 * - A connection the agent closed before answering (a restart, an upgrade; also a fresh
 *   connection a stopping agent accepted and closed idle) is retried once, transparently:
 *   the requests had no answer, and every op is safe to repeat.
 * - Connecting is retried with exponential backoff (5 ms doubling, within the timeout).
 * - A timeout drops the connection: a late answer must not be read as the next call's.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

void slb_pick_adopt(softlb_pick *p, slb_msg *m);

struct softlb_client {
    pthread_mutex_t mu;
    slb_target target;
    int timeout_ms;
    int fd;
    pid_t pid;          /* the process that made fd: a forked child must not share it */
    dev_t dev;          /* fd's identity: a program that closed every descriptor (daemons, */
    ino_t ino;          /* the preload shim's hosts) may have reused the number */
    slb_buf rbuf;
    int64_t next_id;
    int no_backoff;
};

void slb_set_backoff(softlb_client *c, int on) {
    pthread_mutex_lock(&c->mu);
    c->no_backoff = !on;
    pthread_mutex_unlock(&c->mu);
}

static int parse_target(const char *addr, slb_target *t) {
    memset(t, 0, sizeof *t);
    char path[sizeof ((struct sockaddr_un *)0)->sun_path];
    if (!addr || !*addr) {
        if ((size_t)softlb_default_socket(path, sizeof path) >= sizeof path) return -1;
        addr = path;
    }
    const char *colon = strrchr(addr, ':');
    if (!strchr(addr, '/') && colon && colon[1]) {
        char host[64];
        size_t hl = (size_t)(colon - addr);
        if (hl >= sizeof host) return -1;
        memcpy(host, addr, hl);
        host[hl] = 0;
        char *h = host;
        if (*h == '[' && hl > 1 && h[hl - 1] == ']') h[hl - 1] = 0, h++;
        if (!*h) h = "127.0.0.1";
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end || port <= 0 || port > 65535) return -1;
        struct sockaddr_in *s4 = (struct sockaddr_in *)&t->sa;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->sa;
        if (inet_pton(AF_INET, h, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET, s4->sin_port = htons((uint16_t)port), t->salen = sizeof *s4;
            snprintf(t->where, sizeof t->where, "%s:%ld", h, port);
        } else if (inet_pton(AF_INET6, h, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6, s6->sin6_port = htons((uint16_t)port), t->salen = sizeof *s6;
            snprintf(t->where, sizeof t->where, "[%s]:%ld", h, port);
        } else {
            return -1;   /* no name lookups: an agent is on loopback, given as an address */
        }
        return 0;
    }
    struct sockaddr_un *su = (struct sockaddr_un *)&t->sa;
    if (strlen(addr) >= sizeof su->sun_path) return -1;
    su->sun_family = AF_UNIX;
    strcpy(su->sun_path, addr);
    t->salen = sizeof *su;
    snprintf(t->where, sizeof t->where, "%s", addr);
    return 0;
}

softlb_client *softlb_open(const char *addr, int timeout_ms, softlb_error *err) {
    softlb_client *c = calloc(1, sizeof *c);
    if (!c) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
        return NULL;
    }
    if (parse_target(addr, &c->target) != 0) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "bad agent address %s (want a socket path or IP:PORT)", addr ? addr : "(default)");
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 1000;
    c->fd = -1;
    return c;
}

static void drop(softlb_client *c) {
    if (c->fd >= 0 && c->pid == getpid()) close(c->fd);
    c->fd = -1;
    c->rbuf.len = 0;
}

void softlb_close(softlb_client *c) {
    if (!c) return;
    drop(c);
    slb_buf_free(&c->rbuf);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

void softlb_disconnect(softlb_client *c) {
    pthread_mutex_lock(&c->mu);
    drop(c);
    pthread_mutex_unlock(&c->mu);
}

void softlb_set_timeout(softlb_client *c, int timeout_ms) {
    pthread_mutex_lock(&c->mu);
    if (timeout_ms > 0) c->timeout_ms = timeout_ms;
    pthread_mutex_unlock(&c->mu);
}

const slb_target *slb_client_target(const softlb_client *c, int *timeout_ms);
const slb_target *slb_client_target(const softlb_client *c, int *timeout_ms) {
    *timeout_ms = c->timeout_ms;
    return &c->target;
}

/* ------------------------------------------------------------------ batches */

typedef struct entry {
    softlb_request req;
    char *strings;       /* the request's own copies of the caller's strings */
    slb_msg *answer;
} entry;

struct softlb_batch {
    entry *v;
    size_t n, cap;
};

softlb_batch *softlb_batch_new(void) { return calloc(1, sizeof(softlb_batch)); }

static void clear_answers(softlb_batch *b) {
    for (size_t i = 0; i < b->n; i++) slb_msg_free(b->v[i].answer), b->v[i].answer = NULL;
}

void softlb_batch_free(softlb_batch *b) {
    if (!b) return;
    clear_answers(b);
    for (size_t i = 0; i < b->n; i++) free(b->v[i].strings);
    free(b->v);
    free(b);
}

/* Copy every string the request points at into one allocation the entry owns. */
static int add(softlb_batch *b, const softlb_request *r) {
    if (!b) return -1;
    const softlb_resolve_args *a = &r->resolve;
    size_t keylen = a->key ? (a->keylen ? a->keylen : strlen(a->key)) : 0;
    size_t need = a->ntags * sizeof(char *) + (a->service ? strlen(a->service) + 1 : 0) + keylen + 1 +
                  (r->report.service ? strlen(r->report.service) + 1 : 0) +
                  (r->report.endpoint ? strlen(r->report.endpoint) + 1 : 0);
    for (size_t i = 0; i < a->ntags; i++) {
        if (!a->tags[i]) return -1;
        need += strlen(a->tags[i]) + 1;
    }
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 8;
        entry *v = realloc(b->v, cap * sizeof *v);
        if (!v) return -1;
        b->v = v, b->cap = cap;
    }
    char *mem = malloc(need), *cur = mem;
    if (!mem) return -1;
    entry *e = &b->v[b->n];
    memset(e, 0, sizeof *e);
    e->req = *r;
    e->strings = mem;
    const char **tags = (const char **)cur;
    cur += a->ntags * sizeof(char *);
#define COPY(dst, src)                 \
    if (src) {                         \
        size_t l_ = strlen(src) + 1;   \
        memcpy(cur, src, l_);          \
        dst = cur, cur += l_;          \
    }
    COPY(e->req.resolve.service, a->service)
    COPY(e->req.report.service, r->report.service)
    COPY(e->req.report.endpoint, r->report.endpoint)
    for (size_t i = 0; i < a->ntags; i++) COPY(tags[i], a->tags[i])
#undef COPY
    e->req.resolve.tags = a->ntags ? tags : NULL;
    if (a->key) {
        memcpy(cur, a->key, keylen);
        e->req.resolve.key = cur, e->req.resolve.keylen = keylen;
    }
    e->req.id_str = NULL, e->req.versions = NULL;   /* never kept: ids are the handle's */
    return (int)b->n++;
}

int softlb_batch_resolve(softlb_batch *b, const softlb_resolve_args *a) {
    if (!a || !a->service) return -1;
    softlb_request r = {.kind = SOFTLB_REQ_RESOLVE, .resolve = *a};
    return add(b, &r);
}
int softlb_batch_report(softlb_batch *b, const softlb_report_args *a) {
    if (!a || (!a->has_lease && !(a->service && a->endpoint))) return -1;
    softlb_request r = {.kind = SOFTLB_REQ_REPORT, .report = *a};
    return add(b, &r);
}
int softlb_batch_endpoints(softlb_batch *b, const char *service) {
    if (!service) return -1;
    softlb_request r = {.kind = SOFTLB_REQ_ENDPOINTS, .resolve = {.service = service}};
    return add(b, &r);
}
int softlb_batch_services(softlb_batch *b) {
    softlb_request r = {.kind = SOFTLB_REQ_SERVICES};
    return add(b, &r);
}

static int still_ours(const softlb_client *c) {
    struct stat sb;
    return fstat(c->fd, &sb) == 0 && sb.st_dev == c->dev && sb.st_ino == c->ino;
}

/* Send the frames, read until every id in [first, first+n) has an answer. */
static softlb_status exchange(softlb_client *c, softlb_batch *b, const msgpack_sbuffer *frames, int64_t first,
                              int64_t deadline, int *closed_unanswered, softlb_error *err) {
    *closed_unanswered = 0;
    if (slb_send_all(c->fd, frames->data, frames->size, deadline) != 0) {
        if (errno == ETIMEDOUT) {
            slb_err(err, SOFTLB_TIMEOUT, "the agent did not take the request in time");
            return SOFTLB_TIMEOUT;
        }
        *closed_unanswered = 1;
        slb_err(err, SOFTLB_AGENT_UNAVAILABLE, "the agent closed the connection: %s", strerror(errno));
        return SOFTLB_AGENT_UNAVAILABLE;
    }
    size_t want = b->n, got = 0;
    while (got < want) {
        slb_msg *m;
        int closed;
        softlb_status st = slb_read_frame(c->fd, &c->rbuf, deadline, &m, &closed, err);
        if (st != SOFTLB_OK) {
            if (closed && got == 0) *closed_unanswered = 1;
            else if (closed) slb_err(err, SOFTLB_AGENT_UNAVAILABLE, "the agent closed the connection mid-answer");
            else if (st != SOFTLB_TIMEOUT && st != SOFTLB_CLIENT_ERROR) {
                char msg[sizeof err->message];
                snprintf(msg, sizeof msg, "%s", err ? err->message : "");
                slb_err(err, SOFTLB_PROTOCOL_ERROR, "%s", msg);
                st = SOFTLB_PROTOCOL_ERROR;
            }
            return st;
        }
        int64_t id;
        if (slb_id_of(m, &id) && id >= first && id < first + (int64_t)want && !b->v[id - first].answer) {
            b->v[id - first].answer = m;
            got++;
            continue;
        }
        const msgpack_object *ido = slb_get(m->root, "id");
        if (!ido || ido->type == MSGPACK_OBJECT_NIL) {   /* a frame-level error: ours */
            const msgpack_object *r;
            st = slb_result(m, &r, err);
            slb_msg_free(m);
            if (st == SOFTLB_OK) {
                slb_err(err, SOFTLB_PROTOCOL_ERROR, "an answer with no id");
                st = SOFTLB_PROTOCOL_ERROR;
            }
            return st;
        }
        slb_msg_free(m);   /* an answer to nobody (cannot happen: timeouts drop the connection) */
    }
    return SOFTLB_OK;
}

softlb_status softlb_batch_run(softlb_client *c, softlb_batch *b, int timeout_ms, softlb_error *err) {
    if (!c || !b || !b->n) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "empty batch");
        return SOFTLB_CLIENT_ERROR;
    }
    pthread_mutex_lock(&c->mu);
    int64_t deadline = slb_now_ms() + (timeout_ms >= 0 ? timeout_ms : c->timeout_ms);
    clear_answers(b);
    int64_t first = c->next_id + 1;
    c->next_id += (int64_t)b->n;
    if (c->next_id > 0x7fffffff) first = 1, c->next_id = (int64_t)b->n;
    msgpack_sbuffer frames;
    msgpack_sbuffer_init(&frames);
    softlb_status st = SOFTLB_OK;
    for (size_t i = 0; i < b->n && st == SOFTLB_OK; i++) {
        b->v[i].req.id = first + (int64_t)i;
        if (slb_pack_request(&frames, &b->v[i].req) != 0) {
            slb_err(err, SOFTLB_CLIENT_ERROR, "request %zu is missing a required argument", i);
            st = SOFTLB_CLIENT_ERROR;
        }
    }
    for (int attempt = 0; st == SOFTLB_OK && attempt < 2; attempt++) {
        if (c->fd >= 0 && (c->pid != getpid() || !still_ours(c))) {
            c->pid = 0;   /* forked (the parent owns that socket) or the number was reused: */
            drop(c);      /* forget it, close nothing */
        }
        if (c->fd < 0) {
            if ((c->fd = slb_connect(&c->target, deadline, !c->no_backoff, err)) < 0) {
                st = err ? err->status : SOFTLB_AGENT_UNAVAILABLE;
                break;
            }
            struct stat sb;
            c->pid = getpid();
            c->dev = fstat(c->fd, &sb) == 0 ? sb.st_dev : 0, c->ino = sb.st_ino;
        }
        int closed_unanswered;
        st = exchange(c, b, &frames, first, deadline, &closed_unanswered, err);
        if (st == SOFTLB_OK) break;
        drop(c);
        if (closed_unanswered && attempt == 0) {
            clear_answers(b);
            st = SOFTLB_OK;   /* the agent restarted between calls: send it all once more */
        }
    }
    msgpack_sbuffer_destroy(&frames);
    pthread_mutex_unlock(&c->mu);
    return st;
}

static softlb_status answer_of(softlb_batch *b, int i, const msgpack_object **result, softlb_error *err) {
    if (!b || i < 0 || (size_t)i >= b->n || !b->v[i].answer) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "no answer at index %d", i);
        return SOFTLB_CLIENT_ERROR;
    }
    return slb_result(b->v[i].answer, result, err);
}

softlb_status softlb_batch_pick(softlb_batch *b, int i, softlb_pick *out, softlb_error *err) {
    const msgpack_object *r;
    memset(out, 0, sizeof *out);
    softlb_status st = answer_of(b, i, &r, err);
    if (st != SOFTLB_OK) return st;
    if ((st = slb_pick_from(r, out, err)) != SOFTLB_OK) return st;
    slb_pick_adopt(out, b->v[i].answer);   /* the pick owns the answer now */
    b->v[i].answer = NULL;
    return SOFTLB_OK;
}

softlb_status softlb_batch_json(softlb_batch *b, int i, char **json_out, softlb_error *err) {
    const msgpack_object *r;
    *json_out = NULL;
    softlb_status st = answer_of(b, i, &r, err);
    if (st != SOFTLB_OK) return st;
    if (!(*json_out = slb_json_of(r))) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
        return SOFTLB_CLIENT_ERROR;
    }
    return SOFTLB_OK;
}

/* ------------------------------------------------------------------ single calls */

/* A call is a batch of one: the same path, the same retry. */
static softlb_status call(softlb_client *c, const softlb_request *r, int timeout_ms, softlb_batch *b, softlb_error *err) {
    if (add(b, r) < 0) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "bad request arguments");
        return SOFTLB_CLIENT_ERROR;
    }
    if (r->kind == SOFTLB_REQ_HELLO) b->v[0].req.versions = r->versions, b->v[0].req.client = r->client;
    return softlb_batch_run(c, b, timeout_ms, err);
}

softlb_status softlb_resolve(softlb_client *c, const softlb_resolve_args *a, int timeout_ms, softlb_pick *out,
                             softlb_error *err) {
    memset(out, 0, sizeof *out);
    if (!a || !a->service) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "resolve needs a service");
        return SOFTLB_CLIENT_ERROR;
    }
    softlb_batch b = {0};
    softlb_request r = {.kind = SOFTLB_REQ_RESOLVE, .resolve = *a};
    softlb_status st = call(c, &r, timeout_ms, &b, err);
    if (st == SOFTLB_OK) st = softlb_batch_pick(&b, 0, out, err);
    clear_answers(&b);
    for (size_t i = 0; i < b.n; i++) free(b.v[i].strings);
    free(b.v);
    return st;
}

static softlb_status json_call(softlb_client *c, const softlb_request *r, int timeout_ms, char **json_out,
                               softlb_error *err) {
    if (json_out) *json_out = NULL;
    softlb_batch b = {0};
    softlb_status st = call(c, r, timeout_ms, &b, err);
    char *json = NULL;
    if (st == SOFTLB_OK) st = softlb_batch_json(&b, 0, &json, err);
    if (json_out) *json_out = json;
    else free(json);
    clear_answers(&b);
    for (size_t i = 0; i < b.n; i++) free(b.v[i].strings);
    free(b.v);
    return st;
}

softlb_status softlb_report(softlb_client *c, const softlb_report_args *a, int timeout_ms, softlb_error *err) {
    if (!a || (!a->has_lease && !(a->service && a->endpoint))) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "report needs a lease, or a service and an endpoint");
        return SOFTLB_CLIENT_ERROR;
    }
    softlb_request r = {.kind = SOFTLB_REQ_REPORT, .report = *a};
    return json_call(c, &r, timeout_ms, NULL, err);
}

softlb_status softlb_services(softlb_client *c, int timeout_ms, char **json_out, softlb_error *err) {
    softlb_request r = {.kind = SOFTLB_REQ_SERVICES};
    return json_call(c, &r, timeout_ms, json_out, err);
}

softlb_status softlb_endpoints(softlb_client *c, const char *service, int timeout_ms, char **json_out,
                               softlb_error *err) {
    if (!service) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "endpoints needs a service");
        return SOFTLB_CLIENT_ERROR;
    }
    softlb_request r = {.kind = SOFTLB_REQ_ENDPOINTS, .resolve = {.service = service}};
    return json_call(c, &r, timeout_ms, json_out, err);
}

softlb_status softlb_hello(softlb_client *c, const int *versions, size_t nversions, int timeout_ms,
                           softlb_hello_info *out, softlb_error *err) {
    memset(out, 0, sizeof *out);
    softlb_batch b = {0};
    softlb_request r = {.kind = SOFTLB_REQ_HELLO, .versions = versions, .nversions = nversions,
                        .client = "softlb-c/0.1"};
    softlb_status st = call(c, &r, timeout_ms, &b, err);
    const msgpack_object *res;
    if (st == SOFTLB_OK && (st = answer_of(&b, 0, &res, err)) == SOFTLB_OK) {
        const msgpack_object *v = slb_get(res, "version"), *mf = slb_get(res, "max_frame"), *ag = slb_get(res, "agent");
        int offered = 0;
        if (v && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            out->version = (int)v->via.u64;
            if (!nversions) offered = out->version == 1;
            for (size_t i = 0; i < nversions; i++) offered |= versions[i] == out->version;
        }
        if (!offered) {
            slb_err(err, SOFTLB_PROTOCOL_ERROR, "the agent chose version %d, which was not offered", out->version);
            st = SOFTLB_PROTOCOL_ERROR;
        } else {
            out->max_frame = mf && mf->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (uint32_t)mf->via.u64 : 0;
            if (ag && ag->type == MSGPACK_OBJECT_STR)
                snprintf(out->agent, sizeof out->agent, "%.*s", (int)ag->via.str.size, ag->via.str.ptr);
            out->json = slb_json_of(res);
        }
    }
    clear_answers(&b);
    for (size_t i = 0; i < b.n; i++) free(b.v[i].strings);
    free(b.v);
    return st;
}

/* For the preload shim (same source tree): one request, the raw answer handed over. */
softlb_status slb_call_raw(softlb_client *c, const softlb_request *r, int timeout_ms, slb_msg **answer, softlb_error *err) {
    *answer = NULL;
    softlb_batch b = {0};
    softlb_status st = call(c, r, timeout_ms, &b, err);
    if (st == SOFTLB_OK) *answer = b.v[0].answer, b.v[0].answer = NULL;
    clear_answers(&b);
    for (size_t i = 0; i < b.n; i++) free(b.v[i].strings);
    free(b.v);
    return st;
}
