#include "fake_agent.h"

#include <errno.h>
#include <stdio.h>
#include <msgpack.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAXC 64
#define NOPS 8

typedef struct conn { int fd; char *buf; size_t len, cap; int64_t watch_id; int watching; } conn;
typedef struct due { int fd; char *data; size_t len; int64_t at; struct due *next; } due;

struct fake_agent {
    pthread_t thread;
    pthread_mutex_t mu;
    int wake[2];
    char path[108];
    int lfd;
    conn conns[MAXC];
    int stop, restart_gap, restart_pending, relisten_at_set;
    int64_t relisten_at;
    int n_endpoints, set_changed, delay_ms, close_on_request;
    int64_t rr, lease, version;
    int connections, requests[NOPS];
    due *queue;
};

static const char *const OPS[NOPS] = {"hello", "resolve", "report", "services", "endpoints", "watch", "unwatch", "?"};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void listen_on(fake_agent *f) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, f->path);
    unlink(f->path);
    f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (bind(f->lfd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(f->lfd, 64) != 0) abort();
}

static void pk_str(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

static void pack_endpoint(msgpack_packer *pk, int i, int extra) {
    char id[16];
    snprintf(id, sizeof id, "web-%d", i);
    msgpack_pack_map(pk, 9 + extra);
    pk_str(pk, "address"), pk_str(pk, "127.0.0.1");
    pk_str(pk, "port"), msgpack_pack_int(pk, 18000 + i);
    pk_str(pk, "id"), pk_str(pk, id);
    pk_str(pk, "tags"), msgpack_pack_array(pk, 0);
    pk_str(pk, "meta"), msgpack_pack_map(pk, 0);
    pk_str(pk, "weight"), msgpack_pack_int(pk, 1);
    pk_str(pk, "node"), pk_str(pk, "");
    pk_str(pk, "zone"), pk_str(pk, "");
    pk_str(pk, "region"), pk_str(pk, "");
}

static void pack_endpoints(fake_agent *f, msgpack_packer *pk) {
    msgpack_pack_map(pk, 7);
    pk_str(pk, "service"), pk_str(pk, "web");
    pk_str(pk, "policy"), pk_str(pk, "round_robin");
    pk_str(pk, "version"), msgpack_pack_int64(pk, f->version);
    pk_str(pk, "panic"), msgpack_pack_false(pk);
    pk_str(pk, "stale"), msgpack_pack_false(pk);
    pk_str(pk, "age"), msgpack_pack_double(pk, (double)(now_ms() % 1000) / 1000.0);
    pk_str(pk, "endpoints"), msgpack_pack_array(pk, (size_t)f->n_endpoints);
    for (int i = 1; i <= f->n_endpoints; i++) pack_endpoint(pk, i, 0);
}

static void send_frame(fake_agent *f, int fd, msgpack_sbuffer *sb) {
    char *data = malloc(sb->size + 4);
    uint32_t n = (uint32_t)sb->size;
    data[0] = (char)(n >> 24), data[1] = (char)(n >> 16), data[2] = (char)(n >> 8), data[3] = (char)n;
    memcpy(data + 4, sb->data, sb->size);
    due *d = calloc(1, sizeof *d);
    *d = (due){fd, data, n + 4, now_ms() + f->delay_ms, NULL};
    due **tail = &f->queue;
    while (*tail) tail = &(*tail)->next;
    *tail = d;
}

static void begin(msgpack_packer *pk, const msgpack_object *id, int is_error) {
    msgpack_pack_map(pk, 2);
    pk_str(pk, "id");
    id ? msgpack_pack_object(pk, *id) : msgpack_pack_nil(pk);
    pk_str(pk, is_error ? "error" : "result");
}

static void error(msgpack_packer *pk, const msgpack_object *id, const char *code, const char *msg) {
    begin(pk, id, 1);
    msgpack_pack_map(pk, 2);
    pk_str(pk, "code"), pk_str(pk, code);
    pk_str(pk, "message"), pk_str(pk, msg);
}

static const msgpack_object *get(const msgpack_object *m, const char *k) {
    for (uint32_t i = 0; m->type == MSGPACK_OBJECT_MAP && i < m->via.map.size; i++) {
        const msgpack_object *key = &m->via.map.ptr[i].key;
        if (key->type == MSGPACK_OBJECT_STR && key->via.str.size == strlen(k) && !memcmp(key->via.str.ptr, k, strlen(k)))
            return &m->via.map.ptr[i].val;
    }
    return NULL;
}

static int is(const msgpack_object *o, const char *s) {
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(s) && !memcmp(o->via.str.ptr, s, strlen(s));
}

/* Returns 0 to keep the connection, -1 to close it. */
static int handle(fake_agent *f, conn *c, const char *body, size_t n) {
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    int keep = 0;
    if (msgpack_unpack_next(&up, body, n, &off) != MSGPACK_UNPACK_SUCCESS || up.data.type != MSGPACK_OBJECT_MAP) {
        error(&pk, NULL, "BAD_FRAME", "frame body is not valid msgpack");
        goto out;
    }
    const msgpack_object *m = &up.data, *id = get(m, "id"), *op = get(m, "op"), *svc = get(m, "service");
    int k = NOPS - 1;
    for (int i = 0; i < NOPS - 1; i++)
        if (is(op, OPS[i])) k = i;
    f->requests[k]++;
    if (f->close_on_request > 0) {
        f->close_on_request--;
        keep = -1;
        goto out;
    }
    if (!id) {
        error(&pk, NULL, "BAD_ARGUMENT", "missing id");
    } else if (k == 0) {   /* hello: this agent speaks version 1 */
        const msgpack_object *v = get(m, "versions");
        int ok = 0;
        for (uint32_t i = 0; v && v->type == MSGPACK_OBJECT_ARRAY && i < v->via.array.size; i++)
            ok |= v->via.array.ptr[i].type == MSGPACK_OBJECT_POSITIVE_INTEGER && v->via.array.ptr[i].via.u64 == 1;
        if (!ok) error(&pk, id, "UNSUPPORTED_VERSION", "this agent speaks version 1");
        else {
            begin(&pk, id, 0);
            msgpack_pack_map(&pk, 5);
            pk_str(&pk, "version"), msgpack_pack_int(&pk, 1);
            pk_str(&pk, "agent"), pk_str(&pk, "fake/1");
            pk_str(&pk, "ops"), msgpack_pack_array(&pk, 2), pk_str(&pk, "resolve"), pk_str(&pk, "teleport");
            pk_str(&pk, "max_frame"), msgpack_pack_uint32(&pk, 1 << 20);
            pk_str(&pk, "features"), msgpack_pack_map(&pk, 0);   /* a newer agent's extra */
        }
    } else if ((k == 1 || k == 4 || k == 5) && !is(svc, "web")) {
        error(&pk, id, "UNKNOWN_SERVICE", "unknown service");
    } else if (k == 1) {
        const msgpack_object *tags = get(m, "tags"), *key = get(m, "key"), *lease = get(m, "lease");
        if (tags && tags->type == MSGPACK_OBJECT_ARRAY && tags->via.array.size) {
            error(&pk, id, "NO_HEALTHY_ENDPOINT", "no endpoint has those tags");
        } else {
            int i;
            if (key && key->type == MSGPACK_OBJECT_STR) {
                unsigned h = 0;
                for (uint32_t j = 0; j < key->via.str.size; j++) h = h * 31 + (unsigned char)key->via.str.ptr[j];
                i = (int)(h % (unsigned)f->n_endpoints) + 1;
            } else {
                i = (int)(f->rr++ % f->n_endpoints) + 1;
            }
            begin(&pk, id, 0);
            /* the endpoint's fields, then lease/panic/stale and a field from the future */
            msgpack_sbuffer eb;
            msgpack_sbuffer_init(&eb);
            msgpack_packer ep;
            msgpack_packer_init(&ep, &eb, msgpack_sbuffer_write);
            pack_endpoint(&ep, i, 0);
            msgpack_pack_map(&pk, 13);
            msgpack_sbuffer_write(&sb, eb.data + 1, eb.size - 1);   /* drop its map header */
            msgpack_sbuffer_destroy(&eb);
            pk_str(&pk, "lease");
            if (lease && lease->type == MSGPACK_OBJECT_BOOLEAN && !lease->via.boolean) msgpack_pack_nil(&pk);
            else msgpack_pack_int64(&pk, ++f->lease);
            pk_str(&pk, "panic"), msgpack_pack_false(&pk);
            pk_str(&pk, "stale"), msgpack_pack_false(&pk);
            pk_str(&pk, "shard"), pk_str(&pk, "from-a-newer-agent");
        }
    } else if (k == 2) {
        const msgpack_object *lease = get(m, "lease");
        if (lease && lease->type == MSGPACK_OBJECT_POSITIVE_INTEGER && lease->via.u64 == 999)
            error(&pk, id, "UNKNOWN_LEASE", "unknown lease");
        else begin(&pk, id, 0), msgpack_pack_map(&pk, 0);
    } else if (k == 3) {
        begin(&pk, id, 0);
        msgpack_pack_array(&pk, 1);
        msgpack_pack_map(&pk, 6);
        pk_str(&pk, "name"), pk_str(&pk, "web");
        pk_str(&pk, "policy"), pk_str(&pk, "round_robin");
        pk_str(&pk, "endpoints"), msgpack_pack_int(&pk, f->n_endpoints);
        pk_str(&pk, "eligible"), msgpack_pack_int(&pk, f->n_endpoints);
        pk_str(&pk, "panic"), msgpack_pack_false(&pk);
        pk_str(&pk, "stale"), msgpack_pack_false(&pk);
    } else if (k == 4 || k == 5) {
        if (k == 5) c->watching = 1, c->watch_id = (int64_t)id->via.u64;
        begin(&pk, id, 0);
        pack_endpoints(f, &pk);
    } else if (k == 6) {
        c->watching = 0;
        begin(&pk, id, 0), msgpack_pack_map(&pk, 0);
    } else {
        error(&pk, id, "UNKNOWN_OP", "unknown op");
    }
out:
    if (sb.size) send_frame(f, c->fd, &sb);
    msgpack_sbuffer_destroy(&sb);
    msgpack_unpacked_destroy(&up);
    return keep;
}

static void close_conn(conn *c) {
    close(c->fd);
    free(c->buf);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

static void flush_due(fake_agent *f, int64_t now) {
    while (f->queue && f->queue->at <= now) {
        due *d = f->queue;
        f->queue = d->next;
        for (int i = 0; i < MAXC; i++)   /* only to a connection still open */
            if (f->conns[i].fd == d->fd) (void)!send(d->fd, d->data, d->len, MSG_NOSIGNAL);
        free(d->data);
        free(d);
    }
}

static void *run(void *arg) {
    fake_agent *f = arg;
    pthread_mutex_lock(&f->mu);
    while (!f->stop) {
        int64_t now = now_ms();
        flush_due(f, now);
        if (f->restart_pending) {
            f->restart_pending = 0;
            for (int i = 0; i < MAXC; i++)
                if (f->conns[i].fd >= 0) close_conn(&f->conns[i]);
            close(f->lfd);
            unlink(f->path);
            f->lfd = -1;
            f->relisten_at = now + f->restart_gap;
            f->version += 100;   /* a restarted agent counts from elsewhere */
        }
        if (f->lfd < 0 && now >= f->relisten_at) listen_on(f);
        if (f->set_changed) {
            f->set_changed = 0;
            f->version++;
            for (int i = 0; i < MAXC; i++) {
                conn *c = &f->conns[i];
                if (c->fd < 0 || !c->watching) continue;
                msgpack_sbuffer sb;
                msgpack_sbuffer_init(&sb);
                msgpack_packer pk;
                msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
                msgpack_object id = {.type = MSGPACK_OBJECT_POSITIVE_INTEGER, .via.u64 = (uint64_t)c->watch_id};
                begin(&pk, &id, 0);
                pack_endpoints(f, &pk);
                send_frame(f, c->fd, &sb);
                msgpack_sbuffer_destroy(&sb);
            }
            continue;
        }
        struct pollfd p[MAXC + 2];
        int idx[MAXC + 2], np = 0;
        p[np++] = (struct pollfd){f->wake[0], POLLIN, 0};
        if (f->lfd >= 0) p[np++] = (struct pollfd){f->lfd, POLLIN, 0};
        for (int i = 0; i < MAXC; i++)
            if (f->conns[i].fd >= 0) idx[np] = i, p[np++] = (struct pollfd){f->conns[i].fd, POLLIN, 0};
        int timeout = 1000;
        if (f->queue) timeout = (int)(f->queue->at - now) < 0 ? 0 : (int)(f->queue->at - now);
        if (f->lfd < 0 && (int)(f->relisten_at - now) < timeout) timeout = (int)(f->relisten_at - now);
        if (timeout < 0) timeout = 0;
        pthread_mutex_unlock(&f->mu);
        int rc = poll(p, (nfds_t)np, timeout);
        pthread_mutex_lock(&f->mu);
        if (rc <= 0) continue;
        if (p[0].revents) {
            char b[64];
            (void)!read(f->wake[0], b, sizeof b);
            continue;   /* the knobs changed: re-evaluate before reading */
        }
        for (int j = 1; j < np; j++) {
            if (!p[j].revents) continue;
            if (f->lfd >= 0 && p[j].fd == f->lfd) {
                int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
                for (int i = 0; fd >= 0 && i < MAXC; i++)
                    if (f->conns[i].fd < 0) {
                        f->conns[i].fd = fd, fd = -1;
                        f->connections++;
                    }
                if (fd >= 0) close(fd);
                continue;
            }
            conn *c = &f->conns[idx[j]];
            if (c->cap - c->len < 4096) c->buf = realloc(c->buf, c->cap = c->cap * 2 + 8192);
            ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
            if (r <= 0) {
                close_conn(c);
                continue;
            }
            c->len += (size_t)r;
            while (c->fd >= 0 && c->len >= 4) {
                uint32_t n = (uint32_t)(unsigned char)c->buf[0] << 24 | (uint32_t)(unsigned char)c->buf[1] << 16 |
                             (uint32_t)(unsigned char)c->buf[2] << 8 | (unsigned char)c->buf[3];
                if (c->len < 4 + (size_t)n) break;
                int keep = handle(f, c, c->buf + 4, n);
                if (keep < 0) {
                    close_conn(c);
                    break;
                }
                memmove(c->buf, c->buf + 4 + n, c->len - 4 - n);
                c->len -= 4 + n;
            }
        }
    }
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

static void poke(fake_agent *f) { (void)!write(f->wake[1], "x", 1); }

fake_agent *fake_start(const char *path) {
    fake_agent *f = calloc(1, sizeof *f);
    pthread_mutex_init(&f->mu, NULL);
    snprintf(f->path, sizeof f->path, "%s", path);
    for (int i = 0; i < MAXC; i++) f->conns[i].fd = -1;
    f->n_endpoints = 3;
    f->version = 1;
    if (pipe(f->wake) != 0) abort();
    listen_on(f);
    pthread_create(&f->thread, NULL, run, f);
    return f;
}

void fake_stop(fake_agent *f) {
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_mutex_unlock(&f->mu);
    poke(f);
    pthread_join(f->thread, NULL);
    for (int i = 0; i < MAXC; i++)
        if (f->conns[i].fd >= 0) close_conn(&f->conns[i]);
    while (f->queue) {
        due *d = f->queue;
        f->queue = d->next;
        free(d->data);
        free(d);
    }
    if (f->lfd >= 0) close(f->lfd);
    unlink(f->path);
    close(f->wake[0]), close(f->wake[1]);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

#define KNOB(stmt)                  \
    pthread_mutex_lock(&f->mu);     \
    stmt;                           \
    pthread_mutex_unlock(&f->mu);   \
    poke(f)

void fake_restart(fake_agent *f, int gap_ms) {
    KNOB((f->restart_pending = 1, f->restart_gap = gap_ms));
    for (int done = 0; !done; usleep(1000)) {   /* return once the old connections are gone */
        pthread_mutex_lock(&f->mu);
        done = !f->restart_pending;
        pthread_mutex_unlock(&f->mu);
    }
}
void fake_set_endpoints(fake_agent *f, int n) { KNOB((f->n_endpoints = n, f->set_changed = 1)); }
void fake_set_delay(fake_agent *f, int delay_ms) { KNOB(f->delay_ms = delay_ms); }
void fake_close_on_request(fake_agent *f, int n) { KNOB(f->close_on_request = n); }

int fake_connections(fake_agent *f) {
    pthread_mutex_lock(&f->mu);
    int n = f->connections;
    pthread_mutex_unlock(&f->mu);
    return n;
}

int fake_requests(fake_agent *f, const char *op) {
    pthread_mutex_lock(&f->mu);
    int n = 0;
    for (int i = 0; i < NOPS; i++)
        if (!strcmp(OPS[i], op)) n = f->requests[i];
    pthread_mutex_unlock(&f->mu);
    return n;
}
