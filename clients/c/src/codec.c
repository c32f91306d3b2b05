/* Frames (docs/PROTOCOL.md §Framing): a 4-byte big-endian length, then one msgpack map. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const char *const CODES[] = {
    [SOFTLB_BAD_FRAME] = "BAD_FRAME", [SOFTLB_FRAME_TOO_LARGE] = "FRAME_TOO_LARGE",
    [SOFTLB_UNKNOWN_OP] = "UNKNOWN_OP", [SOFTLB_BAD_ARGUMENT] = "BAD_ARGUMENT",
    [SOFTLB_UNSUPPORTED_VERSION] = "UNSUPPORTED_VERSION", [SOFTLB_UNKNOWN_SERVICE] = "UNKNOWN_SERVICE",
    [SOFTLB_NO_HEALTHY_ENDPOINT] = "NO_HEALTHY_ENDPOINT", [SOFTLB_UNKNOWN_LEASE] = "UNKNOWN_LEASE",
    [SOFTLB_UNAVAILABLE] = "UNAVAILABLE", [SOFTLB_INTERNAL] = "INTERNAL",
};

softlb_status slb_status_of_code(const char *code, size_t n) {
    for (int i = 1; i <= SOFTLB_INTERNAL; i++)
        if (strlen(CODES[i]) == n && memcmp(CODES[i], code, n) == 0) return (softlb_status)i;
    return SOFTLB_OTHER_CODE;
}

void slb_err(softlb_error *err, softlb_status st, const char *fmt, ...) {
    if (!err) return;
    err->status = st;
    const char *code = st >= 1 && st <= SOFTLB_INTERNAL ? CODES[st]
                       : st == SOFTLB_TIMEOUT           ? "TIMEOUT"
                       : st == SOFTLB_AGENT_UNAVAILABLE ? "AGENT_UNAVAILABLE"
                       : st == SOFTLB_PROTOCOL_ERROR    ? "PROTOCOL_ERROR"
                       : st == SOFTLB_CLIENT_ERROR      ? "CLIENT_ERROR"
                                                        : "OK";
    snprintf(err->code, sizeof err->code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

int slb_buf_put(slb_buf *b, const void *data, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}
int slb_buf_puts(slb_buf *b, const char *s) { return slb_buf_put(b, s, strlen(s)); }
void slb_buf_free(slb_buf *b) { free(b->p); b->p = NULL, b->len = b->cap = 0; }

void slb_msg_free(slb_msg *m) {
    if (!m) return;
    msgpack_unpacked_destroy(&m->up);
    free(m->body);
    free(m);
}

/* ------------------------------------------------------------------ encoding */

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static const char *const OPS[] = {"hello", "resolve", "report", "services", "endpoints", "watch", "unwatch"};

int slb_pack_request(msgpack_sbuffer *sb, const softlb_request *r) {
    const softlb_resolve_args *a = &r->resolve;
    const softlb_report_args *rp = &r->report;
    if ((unsigned)r->kind > SOFTLB_REQ_UNWATCH) return -1;
    int needs_service = r->kind == SOFTLB_REQ_RESOLVE || r->kind == SOFTLB_REQ_ENDPOINTS || r->kind == SOFTLB_REQ_WATCH;
    if (needs_service && !a->service) return -1;
    if (r->kind == SOFTLB_REQ_REPORT && !rp->has_lease && !(rp->service && rp->endpoint)) return -1;
    size_t n = 2;
    switch (r->kind) {
    case SOFTLB_REQ_HELLO: n += 1 + (r->client != NULL); break;
    case SOFTLB_REQ_RESOLVE: n += 1 + (a->key != NULL) + (a->ntags > 0) + (a->no_lease != 0); break;
    case SOFTLB_REQ_REPORT:
        n += (rp->service != NULL) + (rp->endpoint != NULL) + (rp->has_lease != 0) + 1 + (rp->latency >= 0);
        break;
    case SOFTLB_REQ_ENDPOINTS: case SOFTLB_REQ_WATCH: case SOFTLB_REQ_UNWATCH: n += 1; break;
    default: break;
    }
    static const char zero[4];
    size_t start = sb->size;
    msgpack_sbuffer_write(sb, zero, 4);   /* the length, patched below */
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, n);
    pack_str(&pk, "id");
    if (r->id_str) pack_str(&pk, r->id_str);
    else msgpack_pack_int64(&pk, r->id);
    pack_str(&pk, "op");
    pack_str(&pk, OPS[r->kind]);
    switch (r->kind) {
    case SOFTLB_REQ_HELLO: {
        static const int v1[] = {1};
        const int *v = r->nversions ? r->versions : v1;
        size_t nv = r->nversions ? r->nversions : 1;
        pack_str(&pk, "versions");
        msgpack_pack_array(&pk, nv);
        for (size_t i = 0; i < nv; i++) msgpack_pack_int(&pk, v[i]);
        if (r->client) pack_str(&pk, "client"), pack_str(&pk, r->client);
        break;
    }
    case SOFTLB_REQ_RESOLVE:
        pack_str(&pk, "service"), pack_str(&pk, a->service);
        if (a->key) {
            size_t kl = a->keylen ? a->keylen : strlen(a->key);
            pack_str(&pk, "key");
            if (a->key_is_bin) msgpack_pack_bin(&pk, kl), msgpack_pack_bin_body(&pk, a->key, kl);
            else msgpack_pack_str(&pk, kl), msgpack_pack_str_body(&pk, a->key, kl);
        }
        if (a->ntags) {
            pack_str(&pk, "tags");
            msgpack_pack_array(&pk, a->ntags);
            for (size_t i = 0; i < a->ntags; i++) pack_str(&pk, a->tags[i]);
        }
        if (a->no_lease) pack_str(&pk, "lease"), msgpack_pack_false(&pk);
        break;
    case SOFTLB_REQ_REPORT:
        if (rp->service) pack_str(&pk, "service"), pack_str(&pk, rp->service);
        if (rp->endpoint) pack_str(&pk, "endpoint"), pack_str(&pk, rp->endpoint);
        if (rp->has_lease) pack_str(&pk, "lease"), msgpack_pack_int64(&pk, rp->lease);
        pack_str(&pk, "ok");
        rp->ok ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk);
        if (rp->latency >= 0) pack_str(&pk, "latency"), msgpack_pack_double(&pk, rp->latency);
        break;
    case SOFTLB_REQ_ENDPOINTS: case SOFTLB_REQ_WATCH:
        pack_str(&pk, "service"), pack_str(&pk, a->service);
        break;
    case SOFTLB_REQ_UNWATCH:
        pack_str(&pk, "watch"), msgpack_pack_int64(&pk, r->watch);
        break;
    default: break;
    }
    uint32_t body = (uint32_t)(sb->size - start - 4);
    unsigned char *h = (unsigned char *)sb->data + start;
    h[0] = body >> 24, h[1] = body >> 16, h[2] = body >> 8, h[3] = body;
    return 0;
}

softlb_status softlb_encode(const softlb_request *r, uint8_t **out, size_t *len, softlb_error *err) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    if (slb_pack_request(&sb, r) != 0) {
        msgpack_sbuffer_destroy(&sb);
        slb_err(err, SOFTLB_CLIENT_ERROR, "request is missing a required argument");
        return SOFTLB_CLIENT_ERROR;
    }
    *len = sb.size;
    *out = (uint8_t *)msgpack_sbuffer_release(&sb);
    return SOFTLB_OK;
}

/* ------------------------------------------------------------------ decoding */

softlb_status slb_parse_frame(const uint8_t *buf, size_t len, size_t *consumed, slb_msg **out, softlb_error *err) {
    *consumed = 0, *out = NULL;
    if (len < 4) return SOFTLB_OK;
    uint32_t n = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
    if (n > SLB_MAX_FRAME) {
        slb_err(err, SOFTLB_FRAME_TOO_LARGE, "answer frame of %u bytes is over the limit", n);
        return SOFTLB_FRAME_TOO_LARGE;
    }
    if (len - 4 < n) return SOFTLB_OK;
    *consumed = 4 + (size_t)n;
    slb_msg *m = calloc(1, sizeof *m);
    if (!m || !(m->body = malloc(n ? n : 1))) {
        free(m);
        slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
        return SOFTLB_CLIENT_ERROR;
    }
    memcpy(m->body, buf + 4, n);
    m->len = n;
    msgpack_unpacked_init(&m->up);
    size_t off = 0;
    msgpack_unpack_return rc = msgpack_unpack_next(&m->up, m->body, n, &off);
    if (rc != MSGPACK_UNPACK_SUCCESS || off != n) {
        slb_msg_free(m);
        slb_err(err, SOFTLB_BAD_FRAME, "answer body is not valid msgpack");
        return SOFTLB_BAD_FRAME;
    }
    if (m->up.data.type != MSGPACK_OBJECT_MAP) {
        slb_msg_free(m);
        slb_err(err, SOFTLB_BAD_FRAME, "answer body is not a map");
        return SOFTLB_BAD_FRAME;
    }
    m->root = &m->up.data;
    *out = m;
    return SOFTLB_OK;
}

const msgpack_object *slb_get(const msgpack_object *map, const char *key) {
    if (!map || map->type != MSGPACK_OBJECT_MAP) return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

int slb_id_of(const slb_msg *m, int64_t *id) {
    const msgpack_object *o = slb_get(m->root, "id");
    if (!o) return 0;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) return *id = (int64_t)o->via.u64, 1;
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) return *id = o->via.i64, 1;
    return 0;
}

static void copy_str(char *dst, size_t size, const msgpack_object *o) {
    size_t n = 0;
    if (o && o->type == MSGPACK_OBJECT_STR) {
        n = o->via.str.size < size - 1 ? o->via.str.size : size - 1;
        memcpy(dst, o->via.str.ptr, n);
    }
    dst[n] = 0;
}

softlb_status slb_result(const slb_msg *m, const msgpack_object **result, softlb_error *err) {
    const msgpack_object *e = slb_get(m->root, "error");
    if (e && e->type != MSGPACK_OBJECT_NIL) {
        const msgpack_object *code = slb_get(e, "code"), *msg = slb_get(e, "message");
        if (!code || code->type != MSGPACK_OBJECT_STR) {
            slb_err(err, SOFTLB_PROTOCOL_ERROR, "malformed error answer");
            return SOFTLB_PROTOCOL_ERROR;
        }
        softlb_status st = slb_status_of_code(code->via.str.ptr, code->via.str.size);
        if (err) {
            err->status = st;
            copy_str(err->code, sizeof err->code, code);
            copy_str(err->message, sizeof err->message, msg);
        }
        return st;
    }
    const msgpack_object *r = slb_get(m->root, "result");
    if (!r) {
        /* Mirror the agent's own checks: a frame with an op is a request, not an answer. */
        if (slb_get(m->root, "op")) {
            slb_err(err, SOFTLB_UNKNOWN_OP, "a request frame where an answer belongs");
            return SOFTLB_UNKNOWN_OP;
        }
        slb_err(err, SOFTLB_PROTOCOL_ERROR, "answer has neither result nor error");
        return SOFTLB_PROTOCOL_ERROR;
    }
    *result = r;
    return SOFTLB_OK;
}

softlb_status softlb_decode(const uint8_t *buf, size_t len, size_t *consumed, char **json_out, softlb_error *err) {
    slb_msg *m;
    *json_out = NULL;
    softlb_status st = slb_parse_frame(buf, len, consumed, &m, err);
    if (st != SOFTLB_OK || !m) return st;
    *json_out = slb_json_of(m->root);
    int64_t id;
    const msgpack_object *r;
    const msgpack_object *ido = slb_get(m->root, "id");
    if (!ido) {
        slb_err(err, SOFTLB_BAD_ARGUMENT, "answer has no id: it matches no request");
        st = SOFTLB_BAD_ARGUMENT;
    } else {
        (void)id;
        st = slb_result(m, &r, err);
    }
    slb_msg_free(m);
    return st;
}

/* ------------------------------------------------------------------ JSON */

static int json_str(slb_buf *b, const char *s, size_t n) {
    if (slb_buf_put(b, "\"", 1)) return -1;
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        if (slb_buf_put(b, s + run, i - run)) return -1;
        char esc[8];
        if (c == '"' || c == '\\') snprintf(esc, sizeof esc, "\\%c", c);
        else snprintf(esc, sizeof esc, "\\u%04x", c);
        if (slb_buf_puts(b, esc)) return -1;
        run = i + 1;
    }
    if (slb_buf_put(b, s + run, n - run)) return -1;
    return slb_buf_put(b, "\"", 1);
}

static int json_double(slb_buf *b, double d) {
    if (!isfinite(d)) return slb_buf_puts(b, "null");
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {   /* the shortest text that reads back the same */
        snprintf(tmp, sizeof tmp, "%.*g", prec, d);
        if (strtod(tmp, NULL) == d) break;
    }
    return slb_buf_puts(b, tmp);
}

int slb_to_json(slb_buf *b, const msgpack_object *o) {
    char tmp[40];
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: return slb_buf_puts(b, "null");
    case MSGPACK_OBJECT_BOOLEAN: return slb_buf_puts(b, o->via.boolean ? "true" : "false");
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)o->via.u64);
        return slb_buf_puts(b, tmp);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        snprintf(tmp, sizeof tmp, "%lld", (long long)o->via.i64);
        return slb_buf_puts(b, tmp);
    case MSGPACK_OBJECT_FLOAT32: case MSGPACK_OBJECT_FLOAT64: return json_double(b, o->via.f64);
    case MSGPACK_OBJECT_STR: return json_str(b, o->via.str.ptr, o->via.str.size);
    case MSGPACK_OBJECT_BIN: {   /* JSON has no bytes: hex, which is what the vectors use */
        if (slb_buf_put(b, "\"", 1)) return -1;
        for (uint32_t i = 0; i < o->via.bin.size; i++) {
            snprintf(tmp, sizeof tmp, "%02x", (unsigned char)o->via.bin.ptr[i]);
            if (slb_buf_puts(b, tmp)) return -1;
        }
        return slb_buf_put(b, "\"", 1);
    }
    case MSGPACK_OBJECT_ARRAY:
        if (slb_buf_put(b, "[", 1)) return -1;
        for (uint32_t i = 0; i < o->via.array.size; i++)
            if ((i && slb_buf_put(b, ",", 1)) || slb_to_json(b, &o->via.array.ptr[i])) return -1;
        return slb_buf_put(b, "]", 1);
    case MSGPACK_OBJECT_MAP:
        if (slb_buf_put(b, "{", 1)) return -1;
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (i && slb_buf_put(b, ",", 1)) return -1;
            if (kv->key.type == MSGPACK_OBJECT_STR) {
                if (json_str(b, kv->key.via.str.ptr, kv->key.via.str.size)) return -1;
            } else {   /* JSON keys are strings: the key's JSON text, quoted */
                slb_buf k = {0};
                int rc = slb_to_json(&k, &kv->key) || json_str(b, k.p, k.len);
                slb_buf_free(&k);
                if (rc) return -1;
            }
            if (slb_buf_put(b, ":", 1) || slb_to_json(b, &kv->val)) return -1;
        }
        return slb_buf_put(b, "}", 1);
    default: return slb_buf_puts(b, "null");
    }
}

char *slb_json_of(const msgpack_object *o) {
    slb_buf b = {0};
    if (slb_to_json(&b, o)) {
        slb_buf_free(&b);
        return NULL;
    }
    return b.p;
}

void softlb_free(void *p) { free(p); }

int slb_watch_view(msgpack_sbuffer *sb, const msgpack_object *result) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    if (result->type != MSGPACK_OBJECT_MAP) return msgpack_pack_object(&pk, *result);
    uint32_t keep = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass) msgpack_pack_map(&pk, keep);
        for (uint32_t i = 0; i < result->via.map.size; i++) {
            const msgpack_object_kv *kv = &result->via.map.ptr[i];
            if (kv->key.type == MSGPACK_OBJECT_STR &&
                ((kv->key.via.str.size == 7 && !memcmp(kv->key.via.str.ptr, "version", 7)) ||
                 (kv->key.via.str.size == 3 && !memcmp(kv->key.via.str.ptr, "age", 3))))
                continue;
            if (!pass) keep++;
            else msgpack_pack_object(&pk, kv->key), msgpack_pack_object(&pk, kv->val);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ picks */

typedef struct pick_priv { slb_msg *msg; const msgpack_object *result; char *strings; } pick_priv;

static size_t str_len(const msgpack_object *o) {
    return o && o->type == MSGPACK_OBJECT_STR ? o->via.str.size + 1 : 1;
}
static const char *put_str(char **cursor, const msgpack_object *o) {
    char *s = *cursor;
    size_t n = str_len(o) - 1;
    if (n) memcpy(s, o->via.str.ptr, n);
    s[n] = 0;
    *cursor += n + 1;
    return s;
}
static int64_t as_int(const msgpack_object *o, int64_t dflt) {
    if (!o) return dflt;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) return (int64_t)o->via.u64;
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) return o->via.i64;
    if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) return (int64_t)o->via.f64;
    return dflt;
}

/* Fills out with copies of the result's strings in one allocation (priv_->strings). */
softlb_status slb_pick_from(const msgpack_object *result, softlb_pick *out, softlb_error *err) {
    memset(out, 0, sizeof *out);
    const msgpack_object *addr = slb_get(result, "address"), *port = slb_get(result, "port");
    if (!addr || addr->type != MSGPACK_OBJECT_STR || !port || port->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        slb_err(err, SOFTLB_PROTOCOL_ERROR, "resolve result has no address/port");
        return SOFTLB_PROTOCOL_ERROR;
    }
    const char *names[] = {"address", "id", "node", "zone", "region"};
    const msgpack_object *tags = slb_get(result, "tags");
    uint32_t ntags = tags && tags->type == MSGPACK_OBJECT_ARRAY ? tags->via.array.size : 0;
    size_t need = ntags * sizeof(char *);
    for (size_t i = 0; i < 5; i++) need += str_len(slb_get(result, names[i]));
    for (uint32_t i = 0; i < ntags; i++) need += str_len(&tags->via.array.ptr[i]);
    pick_priv *pp = calloc(1, sizeof *pp);
    char *mem = malloc(need);
    if (!pp || !mem) {
        free(pp), free(mem);
        slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
        return SOFTLB_CLIENT_ERROR;
    }
    pp->strings = mem;
    const char **tagv = (const char **)mem;
    char *cur = mem + ntags * sizeof(char *);
    out->address = put_str(&cur, addr);
    out->id = put_str(&cur, slb_get(result, "id"));
    out->node = put_str(&cur, slb_get(result, "node"));
    out->zone = put_str(&cur, slb_get(result, "zone"));
    out->region = put_str(&cur, slb_get(result, "region"));
    for (uint32_t i = 0; i < ntags; i++) tagv[i] = put_str(&cur, &tags->via.array.ptr[i]);
    out->tags = ntags ? tagv : NULL;
    out->ntags = ntags;
    out->port = (int)port->via.u64;
    out->weight = as_int(slb_get(result, "weight"), 1);
    const msgpack_object *lease = slb_get(result, "lease");
    out->has_lease = lease && (lease->type == MSGPACK_OBJECT_POSITIVE_INTEGER || lease->type == MSGPACK_OBJECT_NEGATIVE_INTEGER);
    out->lease = out->has_lease ? as_int(lease, 0) : 0;
    const msgpack_object *o;
    out->panic = (o = slb_get(result, "panic")) && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
    out->stale = (o = slb_get(result, "stale")) && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
    o = slb_get(result, "age");
    out->age = o && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) ? o->via.f64
               : o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (double)o->via.u64 : -1.0;
    pp->result = result;
    out->priv_ = pp;
    return SOFTLB_OK;
}

/* The pick keeps the answer it came from (for softlb_pick_json); attach it here. */
void slb_pick_adopt(softlb_pick *p, slb_msg *m);
void slb_pick_adopt(softlb_pick *p, slb_msg *m) { ((pick_priv *)p->priv_)->msg = m; }

void softlb_pick_clear(softlb_pick *p) {
    if (!p || !p->priv_) return;
    pick_priv *pp = p->priv_;
    slb_msg_free(pp->msg);
    free(pp->strings);
    free(pp);
    memset(p, 0, sizeof *p);
}

char *softlb_pick_json(const softlb_pick *p) {
    if (!p || !p->priv_) return NULL;
    return slb_json_of(((pick_priv *)p->priv_)->result);
}
