/* Shared by the library's files; not installed. */
#ifndef SOFTLB_INTERNAL_H
#define SOFTLB_INTERNAL_H

#include <msgpack.h>
#include <stdarg.h>
#include <sys/socket.h>

#include "softlb.h"

/* The largest answer accepted: a watch of a huge service is the biggest real one. */
#define SLB_MAX_FRAME (64u << 20)

/* A growable byte string (JSON output, receive buffers). */
typedef struct slb_buf { char *p; size_t len, cap; } slb_buf;
int slb_buf_put(slb_buf *b, const void *data, size_t n);
int slb_buf_puts(slb_buf *b, const char *s);
void slb_buf_free(slb_buf *b);

/* One decoded answer: its body bytes (msgpack strings point into them) and the tree. */
typedef struct slb_msg {
    char *body;
    size_t len;
    msgpack_unpacked up;
    const msgpack_object *root;     /* the map */
} slb_msg;
void slb_msg_free(slb_msg *m);

void slb_err(softlb_error *err, softlb_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
softlb_status slb_status_of_code(const char *code, size_t n);

int slb_pack_request(msgpack_sbuffer *sb, const softlb_request *r);
/* Parse the frame at buf: OK and *m set (or *m NULL: incomplete), or a rejection. */
softlb_status slb_parse_frame(const uint8_t *buf, size_t len, size_t *consumed, slb_msg **m, softlb_error *err);
/* The answer's result, or its error as a status. */
softlb_status slb_result(const slb_msg *m, const msgpack_object **result, softlb_error *err);
const msgpack_object *slb_get(const msgpack_object *map, const char *key);
int slb_id_of(const slb_msg *m, int64_t *id);  /* 1 when the id is an integer */
int slb_to_json(slb_buf *b, const msgpack_object *o);
char *slb_json_of(const msgpack_object *o);
/* The watch view: the result re-packed without "version" and "age". */
int slb_watch_view(msgpack_sbuffer *sb, const msgpack_object *result);
softlb_status slb_pick_from(const msgpack_object *result, softlb_pick *out, softlb_error *err);

/* Where the agent is: filled by softlb_open, copied by watches. */
typedef struct slb_target {
    struct sockaddr_storage sa;
    socklen_t salen;
    char where[128];
} slb_target;
int64_t slb_now_ms(void);
/* Connect with backoff until deadline_ms (monotonic), or once if !backoff; returns fd or
 * -1 with err set. */
int slb_connect(const slb_target *t, int64_t deadline_ms, int backoff, softlb_error *err);
/* The preload shim's probes: one connect attempt, no backoff (an absent agent fails fast). */
void slb_set_backoff(softlb_client *c, int on);
/* Send everything before the deadline: 0, or -1 with errno (EPIPE/ECONNRESET: closed,
 * ETIMEDOUT). */
int slb_send_all(int fd, const void *p, size_t n, int64_t deadline_ms);
/* Read the next frame into rb / *m: OK, TIMEOUT, AGENT_UNAVAILABLE (closed: *closed = 1),
 * or a rejection (the connection must be dropped). deadline_ms < 0: wait forever. */
softlb_status slb_read_frame(int fd, slb_buf *rb, int64_t deadline_ms, slb_msg **m, int *closed, softlb_error *err);
/* One request on a handle; the answer (free with slb_msg_free) is the caller's: check it
 * with slb_result (SOFTLB_OK here means only that an answer came). */
softlb_status slb_call_raw(softlb_client *c, const softlb_request *r, int timeout_ms, slb_msg **answer, softlb_error *err);
#endif
