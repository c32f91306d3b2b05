/* The client against the in-process fake agent: real Unix sockets, real restarts. */
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fake_agent.h"
#include "json.h"
#include "softlb.h"
#include "test.h"

static char sock_path[108];
static fake_agent *agent;
static softlb_client *cli;

static void up(void) {
    snprintf(sock_path, sizeof sock_path, "/tmp/softlb-ctest-%d.sock", (int)getpid());
    agent = fake_start(sock_path);
    softlb_error err;
    cli = softlb_open(sock_path, 1000, &err);
}

static void down(void) {
    softlb_close(cli);
    fake_stop(agent);
}

static long ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static int resolve_id(softlb_client *c, char *id, size_t n, softlb_status *st_out) {
    softlb_resolve_args a = {.service = "web", .no_lease = 1};
    softlb_pick p;
    softlb_error err;
    softlb_status st = softlb_resolve(c, &a, -1, &p, &err);
    if (st_out) *st_out = st;
    if (st != SOFTLB_OK) return -1;
    snprintf(id, n, "%s", p.id);
    softlb_pick_clear(&p);
    return 0;
}

static void test_hello_negotiates(void) {
    up();
    softlb_hello_info h;
    softlb_error err;
    int both[] = {1, 2};
    CHECK(softlb_hello(cli, both, 2, -1, &h, &err) == SOFTLB_OK);
    CHECK(h.version == 1 && h.max_frame == 1u << 20 && !strcmp(h.agent, "fake/1"));
    CHECK(h.json && strstr(h.json, "\"teleport\""));   /* an op from the future: passed on, not refused */
    softlb_free(h.json);
    int two[] = {2};
    CHECK(softlb_hello(cli, two, 1, -1, &h, &err) == SOFTLB_UNSUPPORTED_VERSION);
    CHECK(!strcmp(err.code, "UNSUPPORTED_VERSION"));
    down();
}

static void test_resolve_fields_and_errors(void) {
    up();
    softlb_resolve_args a = {.service = "web"};
    softlb_pick p;
    softlb_error err;
    CHECK(softlb_resolve(cli, &a, -1, &p, &err) == SOFTLB_OK);
    CHECK(!strcmp(p.address, "127.0.0.1") && p.port == 18001 && !strcmp(p.id, "web-1"));
    CHECK(p.has_lease && p.lease == 1 && !p.panic && !p.stale && p.age < 0 && p.weight == 1);
    char *json = softlb_pick_json(&p);
    CHECK(json && strstr(json, "\"shard\":\"from-a-newer-agent\""));   /* unknown fields kept */
    softlb_free(json);
    softlb_pick_clear(&p);
    a.no_lease = 1;
    CHECK(softlb_resolve(cli, &a, -1, &p, &err) == SOFTLB_OK && !p.has_lease);
    softlb_pick_clear(&p);
    softlb_resolve_args bad = {.service = "nope"};
    CHECK(softlb_resolve(cli, &bad, -1, &p, &err) == SOFTLB_UNKNOWN_SERVICE);
    CHECK(!strcmp(err.code, "UNKNOWN_SERVICE") && err.message[0]);
    const char *tags[] = {"gpu"};
    softlb_resolve_args tagged = {.service = "web", .tags = tags, .ntags = 1};
    CHECK(softlb_resolve(cli, &tagged, -1, &p, &err) == SOFTLB_NO_HEALTHY_ENDPOINT);
    /* a key picks the same endpoint every time */
    softlb_resolve_args keyed = {.service = "web", .key = "user:42"};
    char first[32] = "";
    for (int i = 0; i < 5; i++) {
        CHECK(softlb_resolve(cli, &keyed, -1, &p, &err) == SOFTLB_OK);
        if (!i) snprintf(first, sizeof first, "%s", p.id);
        CHECK(!strcmp(first, p.id));
        softlb_pick_clear(&p);
    }
    CHECK(softlb_resolve(cli, NULL, -1, &p, &err) == SOFTLB_CLIENT_ERROR);
    CHECK(fake_connections(agent) == 1);   /* one connection, reused */
    down();
}

static void test_report_services_endpoints(void) {
    up();
    softlb_error err;
    softlb_report_args r = {.has_lease = 1, .lease = 3, .ok = 0, .latency = 0.25};
    CHECK(softlb_report(cli, &r, -1, &err) == SOFTLB_OK);
    softlb_report_args byname = {.service = "web", .endpoint = "web-1", .ok = 1, .latency = -1};
    CHECK(softlb_report(cli, &byname, -1, &err) == SOFTLB_OK);
    softlb_report_args gone = {.has_lease = 1, .lease = 999, .ok = 1, .latency = -1};
    CHECK(softlb_report(cli, &gone, -1, &err) == SOFTLB_UNKNOWN_LEASE);
    softlb_report_args none = {.ok = 1, .latency = -1};
    CHECK(softlb_report(cli, &none, -1, &err) == SOFTLB_CLIENT_ERROR);
    CHECK(fake_requests(agent, "report") == 3);
    char *json;
    CHECK(softlb_services(cli, -1, &json, &err) == SOFTLB_OK);
    jval *v = json_parse(json);
    CHECK(v && v->t == J_ARR && v->n == 1 && !strcmp(json_get(&v->items[0], "name")->s, "web"));
    json_free(v);
    softlb_free(json);
    CHECK(softlb_endpoints(cli, "web", -1, &json, &err) == SOFTLB_OK);
    v = json_parse(json);
    CHECK(v && json_get(v, "endpoints")->n == 3);
    json_free(v);
    softlb_free(json);
    CHECK(softlb_endpoints(cli, "nope", -1, &json, &err) == SOFTLB_UNKNOWN_SERVICE && json == NULL);
    down();
}

static void test_pipeline_answers_in_issue_order(void) {
    up();
    softlb_batch *b = softlb_batch_new();
    softlb_resolve_args a = {.service = "web", .no_lease = 1}, bad = {.service = "nope"};
    for (int i = 0; i < 50; i++) CHECK(softlb_batch_resolve(b, i == 10 ? &bad : &a) == i);
    CHECK(softlb_batch_services(b) == 50);
    softlb_error err;
    CHECK(softlb_batch_run(cli, b, -1, &err) == SOFTLB_OK);
    int rr = 0;
    for (int i = 0; i < 50; i++) {
        softlb_pick p;
        softlb_status st = softlb_batch_pick(b, i, &p, &err);
        if (i == 10) {
            CHECK(st == SOFTLB_UNKNOWN_SERVICE);   /* one request's error is its own */
            continue;
        }
        char want[16];
        snprintf(want, sizeof want, "web-%d", rr++ % 3 + 1);
        CHECK(st == SOFTLB_OK && !strcmp(p.id, want));
        softlb_pick_clear(&p);
    }
    char *json;
    CHECK(softlb_batch_json(b, 50, &json, &err) == SOFTLB_OK && json[0] == '[');
    softlb_free(json);
    /* the same batch runs again, on the same connection */
    CHECK(softlb_batch_run(cli, b, -1, &err) == SOFTLB_OK);
    CHECK(fake_connections(agent) == 1 && fake_requests(agent, "resolve") == 100);
    softlb_batch_free(b);
    down();
}

static void test_timeout_drops_the_connection_and_recovers(void) {
    up();
    char id[32];
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);
    fake_set_delay(agent, 400);
    softlb_error err;
    char *json;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(softlb_services(cli, 100, &json, &err) == SOFTLB_TIMEOUT);
    long took = ms_since(&t0);
    CHECK(took >= 90 && took < 2000);   /* returned at its deadline, not with the answer: loose bound, loaded CI */
    CHECK(!strcmp(err.code, "TIMEOUT"));
    fake_set_delay(agent, 0);
    /* the late answer went to the dropped connection: this call gets its own */
    CHECK(softlb_endpoints(cli, "web", -1, &json, &err) == SOFTLB_OK);
    CHECK(json && strstr(json, "\"endpoints\""));
    softlb_free(json);
    CHECK(fake_connections(agent) == 2);
    down();
}

static void test_restart_between_calls_is_retried_once(void) {
    up();
    char id[32];
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);
    fake_restart(agent, 0);
    softlb_status st;
    CHECK(resolve_id(cli, id, sizeof id, &st) == 0);   /* transparent */
    CHECK(fake_connections(agent) == 2);
    /* a connection closed before answering: one retry, not two */
    fake_close_on_request(agent, 1);
    CHECK(resolve_id(cli, id, sizeof id, &st) == 0);
    fake_close_on_request(agent, 2);
    CHECK(resolve_id(cli, id, sizeof id, &st) == -1 && st == SOFTLB_AGENT_UNAVAILABLE);
    CHECK(resolve_id(cli, id, sizeof id, &st) == 0);
    down();
}

static void test_connect_backs_off_within_the_timeout(void) {
    up();
    char id[32];
    softlb_status st;
    fake_restart(agent, 250);   /* the socket is gone for 250 ms */
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(resolve_id(cli, id, sizeof id, &st) == 0);   /* default 1 s timeout: waits it out */
    long took = ms_since(&t0);
    CHECK(took >= 200);   /* it waited for the agent to come back (within its 1 s timeout) */
    fake_restart(agent, 500);
    softlb_resolve_args a = {.service = "web"};
    softlb_pick p;
    softlb_error err;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(softlb_resolve(cli, &a, 100, &p, &err) == SOFTLB_AGENT_UNAVAILABLE);
    CHECK(ms_since(&t0) < 2000);
    usleep(500 * 1000);
    down();
}

static void test_no_agent_is_unavailable_and_bounded(void) {
    softlb_error err;
    softlb_client *c = softlb_open("/tmp/softlb-ctest-nowhere/softlb.sock", 150, &err);
    CHECK(c != NULL);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char *json;
    CHECK(softlb_services(c, -1, &json, &err) == SOFTLB_AGENT_UNAVAILABLE);
    CHECK(ms_since(&t0) < 2000);   /* bounded by the 150 ms timeout (loose: loaded CI) */
    CHECK(strstr(err.message, "softlb-ctest-nowhere") != NULL);
    CHECK(softlb_watch_open(c, "web", &err) == NULL && err.status == SOFTLB_AGENT_UNAVAILABLE);
    softlb_close(c);
}

static int count_eps(const char *json) {
    jval *v = json_parse(json);
    int n = v && json_get(v, "endpoints") ? (int)json_get(v, "endpoints")->n : -1;
    json_free(v);
    return n;
}

static void test_watch_survives_restarts_without_duplicates(void) {
    up();
    softlb_error err;
    softlb_watch *w = softlb_watch_open(cli, "web", &err);
    CHECK(w != NULL);
    char *json;
    CHECK(softlb_watch_next(w, 1000, &json, &err) == SOFTLB_OK && count_eps(json) == 3);
    softlb_free(json);
    CHECK(softlb_watch_next(w, 100, &json, &err) == SOFTLB_TIMEOUT);
    fake_set_endpoints(agent, 2);
    CHECK(softlb_watch_next(w, 1000, &json, &err) == SOFTLB_OK && count_eps(json) == 2);
    softlb_free(json);
    /* restart, same set: the re-watch's first answer is not passed on */
    int conns = fake_connections(agent);
    fake_restart(agent, 100);
    CHECK(softlb_watch_next(w, 700, &json, &err) == SOFTLB_TIMEOUT);
    CHECK(fake_connections(agent) == conns + 1 && fake_requests(agent, "watch") == 2);
    /* restart, and the set changes while the agent is down: delivered once it is back */
    fake_restart(agent, 150);
    fake_set_endpoints(agent, 1);
    CHECK(softlb_watch_next(w, 2000, &json, &err) == SOFTLB_OK && count_eps(json) == 1);
    softlb_free(json);
    softlb_watch_close(w);
    w = softlb_watch_open(cli, "nope", &err);   /* the error comes with the answer */
    CHECK(w != NULL);
    CHECK(softlb_watch_next(w, 1000, &json, &err) == SOFTLB_UNKNOWN_SERVICE && json == NULL);
    softlb_watch_close(w);
    down();
}

typedef struct { pthread_mutex_t mu; int updates; int last_n; } seen;

static void on_update(const char *json, const softlb_error *err, void *user) {
    seen *s = user;
    pthread_mutex_lock(&s->mu);
    if (json) s->updates++, s->last_n = count_eps(json);
    (void)err;
    pthread_mutex_unlock(&s->mu);
}

static int wait_for(seen *s, int updates, int ms) {
    for (int i = 0; i < ms / 10; i++) {
        pthread_mutex_lock(&s->mu);
        int n = s->updates;
        pthread_mutex_unlock(&s->mu);
        if (n >= updates) return n;
        usleep(10000);
    }
    return -1;
}

static void test_watch_callback(void) {
    up();
    seen s = {PTHREAD_MUTEX_INITIALIZER, 0, 0};
    softlb_error err;
    softlb_watch *w = softlb_watch_start(cli, "web", on_update, &s, &err);
    CHECK(w != NULL);
    CHECK(wait_for(&s, 1, 1000) == 1 && s.last_n == 3);
    fake_set_endpoints(agent, 4);
    CHECK(wait_for(&s, 2, 1000) == 2 && s.last_n == 4);
    fake_restart(agent, 0);
    usleep(400 * 1000);
    CHECK(s.updates == 2);   /* nothing changed: nothing delivered */
    softlb_watch_stop(w);
    down();
}

typedef struct { softlb_client *c; int ok; } worker;

static void *hammer(void *arg) {
    worker *w = arg;
    char id[32];
    for (int i = 0; i < 200; i++) w->ok += resolve_id(w->c, id, sizeof id, NULL) == 0;
    return NULL;
}

static void test_threads_share_a_handle(void) {
    up();
    pthread_t t[4];
    worker w[4];
    for (int i = 0; i < 4; i++) w[i] = (worker){cli, 0}, pthread_create(&t[i], NULL, hammer, &w[i]);
    int ok = 0;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL), ok += w[i].ok;
    CHECK(ok == 800 && fake_requests(agent, "resolve") == 800);
    CHECK(fake_connections(agent) == 1);
    down();
}

static void test_fork_child_gets_its_own_connection(void) {
    up();
    char id[32];
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        /* the child must not read or write the parent's connection */
        int rc = resolve_id(cli, id, sizeof id, NULL);
        _exit(rc == 0 ? 0 : 1);
    }
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);
    CHECK(fake_connections(agent) == 2);
    down();
}

static void test_a_reused_descriptor_is_never_written(void) {
    up();
    char id[32];
    int probe = dup(0);   /* the lowest free number: the handle's socket will get it */
    close(probe);
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);
    /* A daemon closes every descriptor, then opens a file that gets the same number. */
    close(probe);
    char path[64];
    snprintf(path, sizeof path, "/tmp/softlb-ctest-%d.reuse", (int)getpid());
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(f == probe);
    CHECK(resolve_id(cli, id, sizeof id, NULL) == 0);   /* a fresh connection */
    struct stat sb, file;
    CHECK(stat(path, &file) == 0 && file.st_size == 0);  /* not a byte of ours in the file */
    CHECK(fstat(f, &sb) == 0 && sb.st_ino == file.st_ino && sb.st_dev == file.st_dev);   /* still open */
    close(f);
    unlink(path);
    down();
}

const test_case live_tests[] = {
    {"live: hello negotiates a version and ignores new ops", test_hello_negotiates},
    {"live: resolve fields, keys, tags and error codes", test_resolve_fields_and_errors},
    {"live: report, services, endpoints", test_report_services_endpoints},
    {"live: a pipeline of 50 answers in issue order", test_pipeline_answers_in_issue_order},
    {"live: a timeout drops the connection; the next call recovers", test_timeout_drops_the_connection_and_recovers},
    {"live: an agent restart between calls is retried once", test_restart_between_calls_is_retried_once},
    {"live: connecting backs off within the call's timeout", test_connect_backs_off_within_the_timeout},
    {"live: no agent: AGENT_UNAVAILABLE, bounded", test_no_agent_is_unavailable_and_bounded},
    {"live: watch survives restarts with no duplicate update", test_watch_survives_restarts_without_duplicates},
    {"live: watch callback flavour", test_watch_callback},
    {"live: threads share one handle", test_threads_share_a_handle},
    {"live: a forked child gets its own connection", test_fork_child_gets_its_own_connection},
    {"live: a descriptor reused behind the handle's back is never written", test_a_reused_descriptor_is_never_written},
    {NULL, NULL},
};
