/* Sockets with deadlines: non-blocking fds and poll, so no call can outlive its timeout. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* Read size per recv: one syscall for any ordinary answer. */
#define RECV_SIZE 65536

int64_t slb_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining(int64_t deadline_ms) {
    if (deadline_ms < 0) return -1;
    int64_t left = deadline_ms - slb_now_ms();
    return left < 0 ? 0 : left > 0x7fffffff ? 0x7fffffff : (int)left;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* Worth retrying within the call's timeout: the agent is (re)starting, or its listen
 * backlog is full for a moment (a Unix socket answers EAGAIN then). */
static int retryable(int e) { return e == ENOENT || e == ECONNREFUSED || e == EAGAIN || e == ECONNRESET; }

static int connect_once(const slb_target *t, int64_t deadline_ms, int *timed_out) {
    *timed_out = 0;
    int fd = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (const struct sockaddr *)&t->sa, t->salen) != 0) {
        if (errno != EINPROGRESS) goto fail;
        struct pollfd p = {fd, POLLOUT, 0};
        int rc;
        while ((rc = poll(&p, 1, remaining(deadline_ms))) < 0 && errno == EINTR) {}
        if (rc == 0) {
            *timed_out = 1;
            errno = ETIMEDOUT;
            goto fail;
        }
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr) {
            errno = soerr;
            goto fail;
        }
    }
    if (t->sa.ss_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
fail: {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}
}

int slb_connect(const slb_target *t, int64_t deadline_ms, int backoff, softlb_error *err) {
    int delay = 5;
    for (;;) {
        int timed_out;
        int fd = connect_once(t, deadline_ms, &timed_out);
        if (fd >= 0) return fd;
        int e = errno;
        if (timed_out) {
            slb_err(err, SOFTLB_TIMEOUT, "connecting to %s timed out", t->where);
            return -1;
        }
        if (!backoff || !retryable(e) || slb_now_ms() + delay >= deadline_ms) {
            slb_err(err, SOFTLB_AGENT_UNAVAILABLE, "cannot connect to the softlb agent at %s: %s", t->where, strerror(e));
            return -1;
        }
        sleep_ms(delay);
        delay = delay * 2 > 200 ? 200 : delay * 2;
    }
}

int slb_send_all(int fd, const void *p, size_t n, int64_t deadline_ms) {
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w > 0) {
            c += w, n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN) return -1;
        struct pollfd pf = {fd, POLLOUT, 0};
        int rc = poll(&pf, 1, remaining(deadline_ms));
        if (rc == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
    }
    return 0;
}

softlb_status slb_read_frame(int fd, slb_buf *rb, int64_t deadline_ms, slb_msg **m, int *closed, softlb_error *err) {
    *closed = 0;
    for (;;) {
        size_t used;
        softlb_status st = slb_parse_frame((const uint8_t *)rb->p, rb->len, &used, m, err);
        if (used) {
            memmove(rb->p, rb->p + used, rb->len - used);
            rb->len -= used;
        }
        if (st != SOFTLB_OK) return st;
        if (*m) return SOFTLB_OK;
        if (rb->cap - rb->len < RECV_SIZE + 1) {
            char *p = realloc(rb->p, rb->len + RECV_SIZE + 1);
            if (!p) {
                slb_err(err, SOFTLB_CLIENT_ERROR, "out of memory");
                return SOFTLB_CLIENT_ERROR;
            }
            rb->p = p, rb->cap = rb->len + RECV_SIZE + 1;
        }
        ssize_t r = recv(fd, rb->p + rb->len, RECV_SIZE, 0);
        if (r > 0) {
            rb->len += (size_t)r;
            continue;
        }
        if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
            *closed = 1;
            slb_err(err, SOFTLB_AGENT_UNAVAILABLE, "the agent closed the connection");
            return SOFTLB_AGENT_UNAVAILABLE;
        }
        if (errno == EINTR) continue;
        struct pollfd pf = {fd, POLLIN, 0};
        int rc = poll(&pf, 1, remaining(deadline_ms));
        if (rc == 0) {
            slb_err(err, SOFTLB_TIMEOUT, "no answer from the agent in time");
            return SOFTLB_TIMEOUT;
        }
    }
}

/* As the Python client's _paths.py (and the agent): SOFTLB_SOCKET, else systemd's
 * RUNTIME_DIRECTORY, else the system socket when it exists or we are root, else a
 * per-user socket in $XDG_RUNTIME_DIR/softlb or /tmp/softlb-<uid>. */
int softlb_default_socket(char *buf, size_t size) {
    static const char SYSTEM_SOCKET[] = "/run/softlb/softlb.sock";
    const char *env = getenv("SOFTLB_SOCKET");
    if (env && *env) return snprintf(buf, size, "%s", env);
    const char *rd = getenv("RUNTIME_DIRECTORY");
    if (rd && *rd) {
        size_t n = strcspn(rd, ":");
        return snprintf(buf, size, "%.*s/softlb.sock", (int)n, rd);
    }
    if (geteuid() == 0 || access(SYSTEM_SOCKET, F_OK) == 0) return snprintf(buf, size, "%s", SYSTEM_SOCKET);
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg && *xdg) return snprintf(buf, size, "%s/softlb/softlb.sock", xdg);
    return snprintf(buf, size, "/tmp/softlb-%u/softlb.sock", (unsigned)geteuid());
}
