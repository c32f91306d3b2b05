/* libsoftlb-preload.so: connect-time balancing for unmodified, dynamically linked programs.
 *
 *   LD_PRELOAD=libsoftlb-preload.so curl http://web.service.softlb:8080/
 *
 * getaddrinfo("NAME.service.softlb") answers a placeholder address from a reserved loopback
 * range (127.254.0.0/16 by default), one per service name, remembered by this process.
 * connect() to a placeholder, or to a service VIP the agent announces, asks the agent for a
 * pick and connects the caller's own socket straight to the picked endpoint: after that the
 * shim is out of the data path. A refused or timed-out connect is reported to the agent and
 * another pick is tried (bounded). Every other connect() costs one address comparison.
 * See preload/README.md.
 */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../src/internal.h"

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static connect_fn real_connect;
static getaddrinfo_fn real_getaddrinfo;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Settings, read once from the environment (README). */
static uint32_t net_base = 0x7ffe0000, net_mask = 0xffff0000;   /* 127.254.0.0/16 */
static char domain_suffix[128] = ".service.softlb";
static int pick_timeout_ms = 1000, connect_timeout_ms = 3000, nb_wait_ms = 100, tries = 3;
static int vip_refresh_ms = 2000, vips_enabled = 1;

/* Everything below is guarded by mu. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static softlb_client *cli;
static pid_t cli_pid;
static char **names;              /* placeholder i+1 in the range <-> names[i] */
static uint32_t nnames, names_cap;
typedef struct vip { uint32_t ip; uint16_t port; char *service; } vip;
static vip *vips;
static size_t nvips;
static int64_t vips_at = -1000000;
static atomic_int warned_agent, warned_pick;

static int env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

static void init(void) {
    real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
    real_getaddrinfo = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    const char *net = getenv("SOFTLB_PRELOAD_NET");
    if (net && *net) {
        char ip[32];
        int bits = 16;
        struct in_addr a;
        if (sscanf(net, "%31[0-9.]/%d", ip, &bits) >= 1 && inet_pton(AF_INET, ip, &a) == 1 && bits >= 8 && bits <= 30 &&
            (ntohl(a.s_addr) >> 24) == 127) {
            net_mask = 0xffffffffu << (32 - bits);
            net_base = ntohl(a.s_addr) & net_mask;
        } else {
            fprintf(stderr, "softlb-preload: ignoring SOFTLB_PRELOAD_NET=%s (want 127.X.Y.Z/BITS, 8..30 bits)\n", net);
        }
    }
    const char *dom = getenv("SOFTLB_DNS_DOMAIN");
    snprintf(domain_suffix, sizeof domain_suffix, ".service.%s", dom && *dom ? dom : "softlb");
    size_t dl = strlen(domain_suffix);
    if (dl > 1 && domain_suffix[dl - 1] == '.') domain_suffix[dl - 1] = 0;
    pick_timeout_ms = env_int("SOFTLB_PRELOAD_TIMEOUT_MS", pick_timeout_ms);
    connect_timeout_ms = env_int("SOFTLB_PRELOAD_CONNECT_TIMEOUT_MS", connect_timeout_ms);
    nb_wait_ms = env_int("SOFTLB_PRELOAD_NONBLOCK_WAIT_MS", nb_wait_ms);
    tries = env_int("SOFTLB_PRELOAD_TRIES", tries);
    vips_enabled = env_int("SOFTLB_PRELOAD_VIPS", 1);
    if (tries < 1) tries = 1;
}

/* A forked child must not use the parent's handle: its lock may be held by a thread that
 * does not exist in the child, and its connection is the parent's. */
static void atfork_prepare(void) { pthread_mutex_lock(&mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&mu); }
static void atfork_child(void) {
    pthread_mutex_unlock(&mu);
    cli = NULL;   /* the parent's handle memory is left alone (its fd too: not ours to close) */
}

__attribute__((constructor)) static void shim_load(void) {
    pthread_once(&once, init);
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* With mu held. */
static softlb_client *client(void) {
    if (cli && cli_pid == getpid()) return cli;
    softlb_error err;
    cli = softlb_open(NULL, pick_timeout_ms, &err);
    cli_pid = getpid();
    return cli;
}

static void say_agent_unreachable(const softlb_error *err) {
    if (atomic_exchange(&warned_agent, 1)) return;
    fprintf(stderr, "softlb-preload: the softlb agent is unreachable (%s: %s); connections to softlb services fail\n",
            err->code, err->message);
}

/* ------------------------------------------------------------------ names */

/* "web.service.softlb" (any case, trailing dot allowed) -> "web". */
static int service_of_name(const char *node, char *out, size_t size) {
    size_t n = strlen(node), sl = strlen(domain_suffix);
    if (n && node[n - 1] == '.') n--;
    if (n <= sl || strncasecmp(node + n - sl, domain_suffix, sl) != 0) return 0;
    size_t l = n - sl;
    if (l >= size || memchr(node, '.', l)) return 0;
    memcpy(out, node, l);
    out[l] = 0;
    return 1;
}

/* With mu held: the placeholder address (host order) for a service name, or 0. */
static uint32_t placeholder_for(const char *service) {
    for (uint32_t i = 0; i < nnames; i++)
        if (!strcmp(names[i], service)) return net_base + i + 1;
    if (nnames + 2 >= ~net_mask) return 0;   /* the range is full */
    if (nnames == names_cap) {
        uint32_t cap = names_cap ? names_cap * 2 : 16;
        char **p = realloc(names, cap * sizeof *p);
        if (!p) return 0;
        names = p, names_cap = cap;
    }
    if (!(names[nnames] = strdup(service))) return 0;
    return net_base + ++nnames;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    pthread_once(&once, init);
    char name[256];
    if (!node || !service_of_name(node, name, sizeof name) || (hints && hints->ai_family == AF_INET6))
        return real_getaddrinfo(node, service, hints, res);
    pthread_mutex_lock(&mu);
    /* Check the name with the agent, so an unknown service fails here as an unknown host
     * would ("endpoints" does not move a round robin). */
    softlb_client *c = client();
    softlb_request r = {.kind = SOFTLB_REQ_ENDPOINTS, .resolve = {.service = name}};
    slb_msg *m = NULL;
    softlb_error err = {0};
    const msgpack_object *answer;
    softlb_status st = c ? slb_call_raw(c, &r, -1, &m, &err) : SOFTLB_AGENT_UNAVAILABLE;
    if (st == SOFTLB_OK) st = slb_result(m, &answer, &err);   /* the answer's own error, if any */
    slb_msg_free(m);
    uint32_t ip = 0;
    if (st != SOFTLB_UNKNOWN_SERVICE && st != SOFTLB_TIMEOUT && st != SOFTLB_AGENT_UNAVAILABLE) ip = placeholder_for(name);
    pthread_mutex_unlock(&mu);
    if (st == SOFTLB_TIMEOUT || st == SOFTLB_AGENT_UNAVAILABLE) {
        /* What the program would have seen without us (maybe the agent's DNS front end). */
        say_agent_unreachable(&err);
        return real_getaddrinfo(node, service, hints, res);
    }
    if (st == SOFTLB_UNKNOWN_SERVICE) return EAI_NONAME;
    if (!ip) return EAI_MEMORY;
    char text[INET_ADDRSTRLEN];
    struct in_addr a = {htonl(ip)};
    inet_ntop(AF_INET, &a, text, sizeof text);
    struct addrinfo h = {0};
    if (hints) h = *hints;
    h.ai_family = AF_INET;
    h.ai_flags = (h.ai_flags & (AI_PASSIVE | AI_CANONNAME | AI_NUMERICSERV)) | AI_NUMERICHOST;
    h.ai_canonname = NULL, h.ai_addr = NULL, h.ai_next = NULL;
    return real_getaddrinfo(text, service, &h, res);
}

/* ------------------------------------------------------------------ VIPs */

/* With mu held: reload the VIP table from "services" if it is older than vip_refresh_ms.
 * This runs for loopback connects that may have nothing to do with us, so an absent agent
 * must cost nothing: one connect attempt, no backoff. A present but slow agent gets the
 * pick timeout: a VIP connect must not fail because the table came late. */
static void refresh_vips(void) {
    int64_t now = slb_now_ms();
    if (now - vips_at < vip_refresh_ms) return;
    vips_at = now;
    softlb_client *c = client();
    softlb_request r = {.kind = SOFTLB_REQ_SERVICES};
    slb_msg *m = NULL;
    const msgpack_object *res;
    if (c) slb_set_backoff(c, 0);
    softlb_status st = c ? slb_call_raw(c, &r, -1, &m, NULL) : SOFTLB_AGENT_UNAVAILABLE;
    if (c) slb_set_backoff(c, 1);
    if (st != SOFTLB_OK || slb_result(m, &res, NULL) != SOFTLB_OK || res->type != MSGPACK_OBJECT_ARRAY) {
        slb_msg_free(m);
        return;   /* keep what we knew */
    }
    for (size_t i = 0; i < nvips; i++) free(vips[i].service);
    free(vips);
    vips = calloc(res->via.array.size + 1, sizeof *vips);
    nvips = 0;
    for (uint32_t i = 0; vips && i < res->via.array.size; i++) {
        const msgpack_object *s = &res->via.array.ptr[i], *name = slb_get(s, "name"), *v = slb_get(s, "vip");
        const msgpack_object *addr = slb_get(v, "address"), *port = slb_get(v, "port");
        char text[64];
        struct in_addr a;
        if (!name || name->type != MSGPACK_OBJECT_STR || !addr || addr->type != MSGPACK_OBJECT_STR ||
            addr->via.str.size >= sizeof text)
            continue;
        memcpy(text, addr->via.str.ptr, addr->via.str.size);
        text[addr->via.str.size] = 0;
        if (inet_pton(AF_INET, text, &a) != 1) continue;
        vips[nvips].ip = ntohl(a.s_addr);
        vips[nvips].port = port && port->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (uint16_t)port->via.u64 : 0;
        vips[nvips].service = strndup(name->via.str.ptr, name->via.str.size);
        nvips++;
    }
    slb_msg_free(m);
}

/* ------------------------------------------------------------------ connect */

static int wait_connected(int fd, int timeout_ms) {
    int64_t deadline = slb_now_ms() + timeout_ms;
    for (;;) {
        struct pollfd p = {fd, POLLOUT, 0};
        int left = (int)(deadline - slb_now_ms());
        int rc = poll(&p, 1, left < 0 ? 0 : left);
        if (rc < 0 && errno == EINTR) continue;
        if (rc <= 0) return ETIMEDOUT;
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);   /* also clears it for the next try */
        return soerr;
    }
}

enum { CONNECTED, IN_PROGRESS, FAILED };

/* One connect of the caller's socket to target; *e is the error when FAILED. */
static int attempt(int fd, const struct sockaddr_in *target, int nonblock, int *e) {
    int flags = fcntl(fd, F_GETFL);
    if (!nonblock) fcntl(fd, F_SETFL, flags | O_NONBLOCK);   /* so a dead endpoint cannot hang us */
    int out = CONNECTED;
    if (real_connect(fd, (const struct sockaddr *)target, sizeof *target) != 0) {
        *e = errno;
        if (*e == EINPROGRESS) {
            *e = wait_connected(fd, nonblock ? nb_wait_ms : connect_timeout_ms);
            if (*e == ETIMEDOUT && nonblock) out = IN_PROGRESS;   /* slow: the caller's loop waits */
            else if (*e) out = FAILED;
            if (out == FAILED) {
                /* Reset the socket (Linux: AF_UNSPEC dissolves the failed or pending
                 * association), or its next connect answers ECONNABORTED. */
                struct sockaddr unspec = {.sa_family = AF_UNSPEC};
                real_connect(fd, &unspec, sizeof unspec);
            }
        } else {
            out = FAILED;
        }
    }
    if (!nonblock) fcntl(fd, F_SETFL, flags);
    return out;
}

static int retry_worthy(int e) {
    return e == ECONNREFUSED || e == ETIMEDOUT || e == EHOSTUNREACH || e == ENETUNREACH || e == ECONNRESET ||
           e == EAFNOSUPPORT;
}

static int balanced_connect(int fd, const char *service) {
    int flags = fcntl(fd, F_GETFL);
    int nonblock = flags >= 0 && (flags & O_NONBLOCK);
    int last = ECONNREFUSED;
    for (int t = 0; t < tries; t++) {
        softlb_resolve_args a = {.service = service, .no_lease = 1};
        softlb_pick p;
        softlb_error err = {0};
        pthread_mutex_lock(&mu);
        softlb_client *c = client();
        softlb_status st = c ? softlb_resolve(c, &a, -1, &p, &err) : SOFTLB_AGENT_UNAVAILABLE;
        pthread_mutex_unlock(&mu);
        if (st == SOFTLB_TIMEOUT || st == SOFTLB_AGENT_UNAVAILABLE) {
            say_agent_unreachable(&err);
            errno = t ? last : ECONNREFUSED;   /* as a loopback address with no listener */
            return -1;
        }
        if (st != SOFTLB_OK) {
            if (!atomic_exchange(&warned_pick, 1))
                fprintf(stderr, "softlb-preload: no endpoint for service %s: %s: %s\n", service, err.code, err.message);
            errno = t ? last : ECONNREFUSED;
            return -1;
        }
        struct sockaddr_in target = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p.port)};
        int e = EAFNOSUPPORT, out = FAILED;
        if (inet_pton(AF_INET, p.address, &target.sin_addr) == 1) out = attempt(fd, &target, nonblock, &e);
        if (out != FAILED) {
            softlb_pick_clear(&p);
            if (out == IN_PROGRESS) {
                errno = EINPROGRESS;
                return -1;
            }
            return 0;
        }
        if (retry_worthy(e) && e != EAFNOSUPPORT) {   /* the endpoint failed us: tell the agent */
            softlb_report_args r = {.service = service, .endpoint = p.id, .ok = 0, .latency = -1};
            pthread_mutex_lock(&mu);
            if ((c = client())) softlb_report(c, &r, -1, &err);
            pthread_mutex_unlock(&mu);
        }
        softlb_pick_clear(&p);
        last = e;
        if (!retry_worthy(e)) break;
    }
    errno = last;
    return -1;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    if (__builtin_expect(!real_connect, 0)) pthread_once(&once, init);
    /* The one comparison everything else pays: IPv4 loopback or not. */
    if (!addr || addr->sa_family != AF_INET || len < sizeof(struct sockaddr_in) ||
        (ntohl(((const struct sockaddr_in *)addr)->sin_addr.s_addr) >> 24) != 127)
        return real_connect(fd, addr, len);
    const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
    uint32_t ip = ntohl(sin->sin_addr.s_addr);
    uint16_t port = ntohs(sin->sin_port);
    int type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM) return real_connect(fd, addr, len);
    char service[256] = "";
    pthread_mutex_lock(&mu);
    if ((ip & net_mask) == net_base) {
        uint32_t i = ip - net_base;
        if (i >= 1 && i <= nnames) snprintf(service, sizeof service, "%s", names[i - 1]);
    } else if (vips_enabled) {
        refresh_vips();
        for (size_t i = 0; i < nvips; i++)
            if (vips[i].ip == ip && (vips[i].port == 0 || vips[i].port == port))
                snprintf(service, sizeof service, "%s", vips[i].service);
    }
    pthread_mutex_unlock(&mu);
    if (!service[0]) return real_connect(fd, addr, len);
    return balanced_connect(fd, service);
}
