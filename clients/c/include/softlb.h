/* libsoftlb: a thin C client for the softlb agent (docs/PROTOCOL.md, version 1).
 *
 * Made to be bound from any FFI: one opaque handle, plain C types, no global state,
 * blocking calls bounded by a timeout in milliseconds, errors as a status enum carrying
 * the protocol's code and a message. A handle may be shared by threads (its calls are
 * serialised on one connection); use one handle per thread for parallel round trips, or
 * a batch (softlb_batch_*) to pipeline many requests in one write.
 *
 * Structured results that are not a pick (hello, services, endpoints, watch updates) are
 * returned as JSON text: every language can read it, and fields a newer agent adds pass
 * through untouched.
 */
#ifndef SOFTLB_H
#define SOFTLB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum softlb_status {
    SOFTLB_OK = 0,
    /* Error codes the agent answers (docs/PROTOCOL.md: stable, never renumbered). */
    SOFTLB_BAD_FRAME = 1,
    SOFTLB_FRAME_TOO_LARGE = 2,
    SOFTLB_UNKNOWN_OP = 3,
    SOFTLB_BAD_ARGUMENT = 4,
    SOFTLB_UNSUPPORTED_VERSION = 5,
    SOFTLB_UNKNOWN_SERVICE = 6,
    SOFTLB_NO_HEALTHY_ENDPOINT = 7,
    SOFTLB_UNKNOWN_LEASE = 8,
    SOFTLB_UNAVAILABLE = 9,
    SOFTLB_INTERNAL = 10,
    SOFTLB_OTHER_CODE = 50,         /* a code this client does not know: see error.code */
    /* Raised by the client itself. */
    SOFTLB_TIMEOUT = 100,           /* no answer in time; the connection was dropped */
    SOFTLB_AGENT_UNAVAILABLE = 101, /* cannot connect, or the agent closed mid-answer */
    SOFTLB_PROTOCOL_ERROR = 102,    /* the agent's bytes are not protocol v1 */
    SOFTLB_CLIENT_ERROR = 103       /* a bad argument to this library, or out of memory */
} softlb_status;

typedef struct softlb_error {
    softlb_status status;
    char code[32];      /* the protocol code ("UNKNOWN_SERVICE"), or "TIMEOUT",
                           "AGENT_UNAVAILABLE", "PROTOCOL_ERROR", "CLIENT_ERROR" */
    char message[256];
} softlb_error;

typedef struct softlb_client softlb_client;

/* addr: NULL for the default socket (SOFTLB_SOCKET, else as the agent chooses: see
 * softlb_default_socket), a Unix socket path, or "HOST:PORT" for loopback TCP.
 * timeout_ms: the default per-call timeout (<= 0: 1000). Connecting is lazy; never fails on a missing
 * agent. Returns NULL only for a bad addr or no memory (err says which). */
softlb_client *softlb_open(const char *addr, int timeout_ms, softlb_error *err);
void softlb_close(softlb_client *c);
void softlb_set_timeout(softlb_client *c, int timeout_ms);
/* Drop the connection (the next call reconnects). Call in a child after fork(). */
void softlb_disconnect(softlb_client *c);

/* Write the default socket path into buf; returns its length (as snprintf). */
int softlb_default_socket(char *buf, size_t size);

/* A timeout_ms below zero means "the handle's default" in every call below. */

typedef struct softlb_hello_info {
    int version;            /* the version the agent chose */
    uint32_t max_frame;
    char agent[64];
    char *json;             /* the whole result; free with softlb_free */
} softlb_hello_info;

/* Offer versions (NULL/0: {1}); fails with SOFTLB_PROTOCOL_ERROR if the agent picks one
 * not offered. */
softlb_status softlb_hello(softlb_client *c, const int *versions, size_t nversions, int timeout_ms,
                           softlb_hello_info *out, softlb_error *err);

typedef struct softlb_pick {
    const char *address;
    int port;
    const char *id;
    const char *const *tags;
    size_t ntags;
    int64_t weight;
    const char *node, *zone, *region;
    int has_lease;
    int64_t lease;
    int panic, stale;
    double age;             /* < 0 unless stale */
    void *priv_;            /* owns the memory above: release with softlb_pick_clear */
} softlb_pick;

typedef struct softlb_resolve_args {
    const char *service;    /* required */
    const void *key;        /* optional hash key */
    size_t keylen;          /* 0 with key != NULL: key is a C string */
    int key_is_bin;         /* send the key as msgpack bin (default: str) */
    const char *const *tags;
    size_t ntags;
    int no_lease;           /* 1: "lease": false (callers that never report) */
} softlb_resolve_args;

softlb_status softlb_resolve(softlb_client *c, const softlb_resolve_args *a, int timeout_ms,
                             softlb_pick *out, softlb_error *err);
void softlb_pick_clear(softlb_pick *p);   /* safe on a zeroed or already cleared pick */
/* The pick's whole result as JSON (meta and fields newer agents add); free with softlb_free. */
char *softlb_pick_json(const softlb_pick *p);

typedef struct softlb_report_args {
    int has_lease;
    int64_t lease;
    const char *service, *endpoint;   /* instead of a lease */
    int ok;
    double latency;                   /* seconds; < 0: let the agent measure */
} softlb_report_args;

softlb_status softlb_report(softlb_client *c, const softlb_report_args *a, int timeout_ms, softlb_error *err);
/* JSON results; *json_out is set on success and freed with softlb_free. */
softlb_status softlb_services(softlb_client *c, int timeout_ms, char **json_out, softlb_error *err);
softlb_status softlb_endpoints(softlb_client *c, const char *service, int timeout_ms, char **json_out,
                               softlb_error *err);
void softlb_free(void *p);

/* ---- Pipelining: queue requests, send them in one write, collect answers by index. */

typedef struct softlb_batch softlb_batch;
softlb_batch *softlb_batch_new(void);
void softlb_batch_free(softlb_batch *b);
/* Each returns the request's index in the batch, or -1 (bad argument / no memory). */
int softlb_batch_resolve(softlb_batch *b, const softlb_resolve_args *a);
int softlb_batch_report(softlb_batch *b, const softlb_report_args *a);
int softlb_batch_endpoints(softlb_batch *b, const char *service);
int softlb_batch_services(softlb_batch *b);
/* Send every queued request and wait for all answers (matched by id). Fails as a whole on
 * timeout or connection loss; otherwise each request has its own outcome. */
softlb_status softlb_batch_run(softlb_client *c, softlb_batch *b, int timeout_ms, softlb_error *err);
softlb_status softlb_batch_pick(softlb_batch *b, int i, softlb_pick *out, softlb_error *err);
softlb_status softlb_batch_json(softlb_batch *b, int i, char **json_out, softlb_error *err);

/* ---- Watch: a service's endpoint set now and after every change, on its own connection.
 * Survives agent restarts: reconnects (backing off to once a second), watches again, and
 * delivers the set only if it differs from the last one delivered (ignoring "version" and
 * "age", which restart with the agent or move with the clock). */

typedef struct softlb_watch softlb_watch;   /* one consumer thread at a time */
/* Connects and sends the watch; fails at once (AGENT_UNAVAILABLE) if there is no agent. */
softlb_watch *softlb_watch_open(softlb_client *c, const char *service, softlb_error *err);
/* Wait up to timeout_ms (< 0: forever) for the next update: SOFTLB_OK with *json_out set,
 * SOFTLB_TIMEOUT if none came, or the agent's error (UNKNOWN_SERVICE...). */
softlb_status softlb_watch_next(softlb_watch *w, int timeout_ms, char **json_out, softlb_error *err);
void softlb_watch_close(softlb_watch *w);

/* Callback flavour: a thread calls cb(update_json, NULL, user) for every update (the json
 * is freed after cb returns), and cb(NULL, &err, user) for an error answer (UNKNOWN_SERVICE:
 * the watch keeps trying, once a second, in case the service appears). */
typedef void (*softlb_watch_cb)(const char *json, const softlb_error *err, void *user);
softlb_watch *softlb_watch_start(softlb_client *c, const char *service, softlb_watch_cb cb, void *user,
                                 softlb_error *err);
/* Stops the thread (if any) and closes the watch. */
void softlb_watch_stop(softlb_watch *w);

/* ---- The codec, public for the shared wire vectors and for other transports. */

typedef enum softlb_req_kind {
    SOFTLB_REQ_HELLO, SOFTLB_REQ_RESOLVE, SOFTLB_REQ_REPORT, SOFTLB_REQ_SERVICES,
    SOFTLB_REQ_ENDPOINTS, SOFTLB_REQ_WATCH, SOFTLB_REQ_UNWATCH
} softlb_req_kind;

typedef struct softlb_request {
    softlb_req_kind kind;
    int64_t id;
    const char *id_str;               /* a string id instead (NULL: use id) */
    const int *versions; size_t nversions; const char *client;   /* hello */
    softlb_resolve_args resolve;                                  /* resolve; service for others */
    softlb_report_args report;
    int64_t watch;                                                /* unwatch */
} softlb_request;

/* Encode one whole frame (length prefix + body) into a malloc'd buffer. */
softlb_status softlb_encode(const softlb_request *r, uint8_t **out, size_t *len, softlb_error *err);
/* Decode the first frame in buf as an answer: SOFTLB_OK with *consumed = the frame's size
 * and *json_out = the whole frame's value as JSON (free with softlb_free), or SOFTLB_OK with
 * *consumed = 0 and *json_out = NULL while the frame is incomplete. Rejections: FRAME_TOO_LARGE
 * (cannot be re-framed: the connection must close), BAD_FRAME (body not msgpack or not a
 * map; the frame is consumed), BAD_ARGUMENT (no id: matches no request), UNKNOWN_OP (a
 * request where an answer belongs), or the answer's own error code with err filled (then
 * *json_out is set too). */
softlb_status softlb_decode(const uint8_t *buf, size_t len, size_t *consumed, char **json_out,
                            softlb_error *err);

#ifdef __cplusplus
}
#endif
#endif
