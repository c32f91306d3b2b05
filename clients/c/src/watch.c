/* A watch: its own connection, resumed across agent restarts without duplicate updates. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

const slb_target *slb_client_target(const softlb_client *c, int *timeout_ms);

struct softlb_watch {
    slb_target target;
    int timeout_ms;          /* for each (re)connect */
    char *service;
    int fd;
    slb_buf rbuf;
    msgpack_sbuffer last;    /* the view last delivered (empty: none yet) */
    int delay_ms;            /* reconnect backoff: 50 ms doubling to 1 s */
    int64_t retry_at;
    /* callback flavour */
    pthread_t thread;
    int has_thread;
    atomic_int stop;
    softlb_watch_cb cb;
    void *user;
};

static void wdrop(softlb_watch *w) {
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    w->rbuf.len = 0;
}

static int wconnect(softlb_watch *w, int64_t deadline, softlb_error *err) {
    int64_t d = slb_now_ms() + w->timeout_ms;
    if (deadline >= 0 && deadline < d) d = deadline;
    int fd = slb_connect(&w->target, d, 1, err);
    if (fd < 0) return -1;
    softlb_request r = {.kind = SOFTLB_REQ_WATCH, .id = 1, .resolve = {.service = w->service}};
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    slb_pack_request(&sb, &r);
    int rc = slb_send_all(fd, sb.data, sb.size, d);
    msgpack_sbuffer_destroy(&sb);
    if (rc != 0) {
        close(fd);
        slb_err(err, SOFTLB_AGENT_UNAVAILABLE, "the agent closed the watch connection");
        return -1;
    }
    w->fd = fd;
    return 0;
}

softlb_watch *softlb_watch_open(softlb_client *c, const char *service, softlb_error *err) {
    if (!c || !service) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "watch needs a service");
        return NULL;
    }
    softlb_watch *w = calloc(1, sizeof *w);
    if (!w || !(w->service = strdup(service))) {
        free(w);
        slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
        return NULL;
    }
    w->target = *slb_client_target(c, &w->timeout_ms);
    w->fd = -1;
    w->delay_ms = 50;
    msgpack_sbuffer_init(&w->last);
    if (wconnect(w, -1, err) != 0) {   /* no agent at all: say so at once */
        softlb_watch_close(w);
        return NULL;
    }
    return w;
}

static void sleep_until(int64_t t) {
    int64_t ms = t - slb_now_ms();
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

softlb_status softlb_watch_next(softlb_watch *w, int timeout_ms, char **json_out, softlb_error *err) {
    *json_out = NULL;
    int64_t deadline = timeout_ms < 0 ? -1 : slb_now_ms() + timeout_ms;
    for (;;) {
        if (w->fd < 0) {
            if (deadline >= 0 && w->retry_at > deadline) {
                sleep_until(deadline);
                slb_err(err, SOFTLB_TIMEOUT, "no watch update in time (the agent is away)");
                return SOFTLB_TIMEOUT;
            }
            sleep_until(w->retry_at);
            if (wconnect(w, deadline, err) != 0) {
                /* The agent is restarting (or upgrading): a watch is long-lived, so keep
                 * trying, backing off to one attempt a second. */
                w->retry_at = slb_now_ms() + w->delay_ms;
                w->delay_ms = w->delay_ms * 2 > 1000 ? 1000 : w->delay_ms * 2;
                continue;
            }
            w->delay_ms = 50;
        }
        slb_msg *m;
        int closed;
        softlb_status st = slb_read_frame(w->fd, &w->rbuf, deadline, &m, &closed, err);
        if (st == SOFTLB_TIMEOUT) return st;   /* the stream stays open */
        if (st != SOFTLB_OK) {
            wdrop(w);   /* closed (a restart) or garbled: resume on a fresh connection */
            w->retry_at = slb_now_ms() + (closed ? 0 : w->delay_ms);
            continue;
        }
        const msgpack_object *res;
        st = slb_result(m, &res, err);
        if (st != SOFTLB_OK) {
            slb_msg_free(m);
            wdrop(w);   /* the agent ended this stream (UNKNOWN_SERVICE...): retry later */
            w->retry_at = slb_now_ms() + 1000;
            return st;
        }
        msgpack_sbuffer view;
        msgpack_sbuffer_init(&view);
        slb_watch_view(&view, res);
        int same = view.size == w->last.size && memcmp(view.data, w->last.data, view.size) == 0;
        if (!same) {
            msgpack_sbuffer_destroy(&w->last);
            w->last = view;
            *json_out = slb_json_of(res);
        } else {
            msgpack_sbuffer_destroy(&view);
        }
        slb_msg_free(m);
        if (!same) return *json_out ? SOFTLB_OK : (slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory"), SOFTLB_CLIENT_ERROR);
    }
}

void softlb_watch_close(softlb_watch *w) {
    if (!w) return;
    wdrop(w);
    slb_buf_free(&w->rbuf);
    msgpack_sbuffer_destroy(&w->last);
    free(w->service);
    free(w);
}

static void *watch_thread(void *arg) {
    softlb_watch *w = arg;
    while (!atomic_load(&w->stop)) {
        char *json;
        softlb_error err;
        /* Short waits so a stop request is seen promptly. */
        softlb_status st = softlb_watch_next(w, 100, &json, &err);
        if (st == SOFTLB_OK) {
            w->cb(json, NULL, w->user);
            free(json);
        } else if (st != SOFTLB_TIMEOUT) {
            w->cb(NULL, &err, w->user);
        }
    }
    return NULL;
}

softlb_watch *softlb_watch_start(softlb_client *c, const char *service, softlb_watch_cb cb, void *user,
                                 softlb_error *err) {
    if (!cb) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "watch_start needs a callback");
        return NULL;
    }
    softlb_watch *w = softlb_watch_open(c, service, err);
    if (!w) return NULL;
    w->cb = cb, w->user = user;
    if (pthread_create(&w->thread, NULL, watch_thread, w) != 0) {
        slb_err(err, SOFTLB_CLIENT_ERROR, "cannot start the watch thread");
        softlb_watch_close(w);
        return NULL;
    }
    w->has_thread = 1;
    return w;
}

void softlb_watch_stop(softlb_watch *w) {
    if (!w) return;
    if (w->has_thread) {
        atomic_store(&w->stop, 1);
        pthread_join(w->thread, NULL);
    }
    softlb_watch_close(w);
}
