/* Conformance runner for libsoftlb (RUNNER-SPEC: JSON lines on stdin drive the public API;
 * one JSON line per reply or watch event on stdout, flushed; logs on stderr). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json.h"
#include "softlb.h"
#include "vectors.h"

static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

/* Print one line atomically (watch threads print too). */
static void emit(const char *line) {
    pthread_mutex_lock(&out_mu);
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    pthread_mutex_unlock(&out_mu);
}

static const char *code_of(const softlb_error *e) {
    if (e->status == SOFTLB_TIMEOUT) return "TIMEOUT";
    if (e->status == SOFTLB_AGENT_UNAVAILABLE) return "UNAVAILABLE_AGENT";
    if (e->status >= SOFTLB_BAD_FRAME && e->status <= SOFTLB_OTHER_CODE) return e->code;
    return "CLIENT";
}

static void write_error(FILE *f, const softlb_error *e) {
    fputs("{\"code\":", f);
    json_write_str(f, code_of(e));
    fputs(",\"message\":", f);
    json_write_str(f, e->message);
    fputc('}', f);
}

typedef struct watch_slot {
    char *name;
    softlb_watch *w;
    pthread_t thread;
    atomic_int stop;
    struct watch_slot *next;
} watch_slot;

static softlb_client *client;
static int timeout_ms = 1000;
static watch_slot *watches;

static void emit_event(const char *name, const char *json, const softlb_error *err) {
    char *buf;
    size_t n;
    FILE *f = open_memstream(&buf, &n);
    fputs(json ? "{\"event\":\"watch\",\"watch\":" : "{\"event\":\"watch_error\",\"watch\":", f);
    json_write_str(f, name);
    if (json) fprintf(f, ",\"update\":%s}", json);
    else fputs(",\"error\":", f), write_error(f, err), fputc('}', f);
    fclose(f);
    emit(buf);
    free(buf);
}

static void *watch_thread(void *arg) {
    watch_slot *s = arg;
    while (!atomic_load(&s->stop)) {
        char *json;
        softlb_error err;
        softlb_status st = softlb_watch_next(s->w, 100, &json, &err);   /* short: sees stop soon */
        if (st == SOFTLB_OK) emit_event(s->name, json, NULL), softlb_free(json);
        else if (st != SOFTLB_TIMEOUT) emit_event(s->name, NULL, &err);
    }
    return NULL;
}

static void stop_watch(watch_slot *s) {
    atomic_store(&s->stop, 1);
    pthread_join(s->thread, NULL);
    softlb_watch_close(s->w);
    free(s->name);
    free(s);
}

static void stop_all_watches(void) {
    while (watches) {
        watch_slot *s = watches;
        watches = s->next;
        stop_watch(s);
    }
}

static const char *str_of(const jval *o, const char *k) {
    const jval *v = json_get(o, k);
    return v && v->t == J_STR ? v->s : NULL;
}

static int ms_of(const jval *v, int dflt) {
    if (!v || v->t != J_NUM) return dflt;
    int ms = (int)(v->num * 1000 + 0.5);
    return ms > 0 ? ms : 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Run one command: write its result JSON to f and return OK, or fill err. */
static softlb_status run(const char *cmd, const jval *c, FILE *f, softlb_error *err) {
    softlb_status st = SOFTLB_OK;
    if (!strcmp(cmd, "connect")) {
        stop_all_watches();
        softlb_close(client);
        timeout_ms = ms_of(json_get(c, "timeout"), 1000);
        if (!(client = softlb_open(str_of(c, "addr"), timeout_ms, err))) return err->status;
        fputs("{}", f);
        return SOFTLB_OK;
    }
    if (!strcmp(cmd, "exit")) return fputs("{}", f), SOFTLB_OK;
    if (!strcmp(cmd, "vectors")) {
        vectors_outcome o;
        if (vectors_check(str_of(c, "path") ? str_of(c, "path") : "", &o, stderr) != 0) {
            snprintf(err->message, sizeof err->message, "cannot read the vectors file");
            return err->status = SOFTLB_CLIENT_ERROR;
        }
        fprintf(f, "{\"passed\":%d,\"failed\":[", o.passed);
        for (size_t i = 0; i < o.nfailed; i++) fputs(i ? "," : "", f), json_write_str(f, o.failed[i]);
        fputs("]}", f);
        vectors_outcome_free(&o);
        return SOFTLB_OK;
    }
    if (!client) {
        snprintf(err->message, sizeof err->message, "no client: send connect first");
        return err->status = SOFTLB_CLIENT_ERROR;
    }
    if (!strcmp(cmd, "set_timeout")) {
        timeout_ms = ms_of(json_get(c, "timeout"), timeout_ms);
        softlb_set_timeout(client, timeout_ms);
        return fputs("{}", f), SOFTLB_OK;
    }
    if (!strcmp(cmd, "hello")) {
        int versions[16];
        size_t nv = 0;
        const jval *v = json_get(c, "versions");
        for (size_t i = 0; v && v->t == J_ARR && i < v->n && nv < 16; i++) versions[nv++] = (int)v->items[i].i;
        softlb_hello_info h;
        if ((st = softlb_hello(client, versions, nv, -1, &h, err)) == SOFTLB_OK) fputs(h.json, f), softlb_free(h.json);
        return st;
    }
    if (!strcmp(cmd, "resolve") || !strcmp(cmd, "bench")) {
        const char *tags[64];
        softlb_resolve_args a = {.service = str_of(c, "service"), .key = str_of(c, "key")};
        const jval *t = json_get(c, "tags"), *lease = json_get(c, "lease");
        for (size_t i = 0; t && t->t == J_ARR && i < t->n && i < 64; i++) tags[a.ntags++] = t->items[i].s;
        a.tags = tags;
        a.no_lease = lease && lease->t == J_BOOL && !lease->b;
        softlb_pick p;
        if (!strcmp(cmd, "resolve")) {
            if ((st = softlb_resolve(client, &a, -1, &p, err)) != SOFTLB_OK) return st;
            char *json = softlb_pick_json(&p);
            fputs(json, f);
            softlb_free(json);
            softlb_pick_clear(&p);
            return SOFTLB_OK;
        }
        /* bench (RUNNER-SPEC-bench): one untimed warm-up, then n sequential resolves */
        softlb_resolve_args b = {.service = a.service, .no_lease = 1};
        const jval *n = json_get(c, "n");
        long count = n && n->t == J_NUM ? (long)n->i : 1000;
        if ((st = softlb_resolve(client, &b, -1, &p, err)) != SOFTLB_OK) return st;
        softlb_pick_clear(&p);
        double t0 = now_s();
        for (long i = 0; i < count; i++) {
            if ((st = softlb_resolve(client, &b, -1, &p, err)) != SOFTLB_OK) return st;
            softlb_pick_clear(&p);
        }
        fprintf(f, "{\"seconds\":%.9f}", now_s() - t0);
        return SOFTLB_OK;
    }
    if (!strcmp(cmd, "report")) {
        const jval *lease = json_get(c, "lease"), *ok = json_get(c, "ok"), *lat = json_get(c, "latency");
        softlb_report_args r = {.service = str_of(c, "service"), .endpoint = str_of(c, "endpoint"),
                                .ok = !(ok && ok->t == J_BOOL && !ok->b), .latency = -1};
        if (lease && lease->t == J_NUM) r.has_lease = 1, r.lease = lease->i;
        if (lat && lat->t == J_NUM) r.latency = lat->num;
        if ((st = softlb_report(client, &r, -1, err)) == SOFTLB_OK) fputs("{}", f);
        return st;
    }
    if (!strcmp(cmd, "services") || !strcmp(cmd, "endpoints")) {
        char *json;
        st = !strcmp(cmd, "services") ? softlb_services(client, -1, &json, err)
                                      : softlb_endpoints(client, str_of(c, "service"), -1, &json, err);
        if (st == SOFTLB_OK) fputs(json, f), softlb_free(json);
        return st;
    }
    if (!strcmp(cmd, "pipeline")) {
        const jval *n = json_get(c, "n");
        long count = n && n->t == J_NUM ? (long)n->i : 0;
        softlb_batch *b = softlb_batch_new();
        softlb_resolve_args a = {.service = str_of(c, "service"), .no_lease = 1};
        for (long i = 0; i < count; i++) softlb_batch_resolve(b, &a);
        if ((st = softlb_batch_run(client, b, -1, err)) == SOFTLB_OK) {
            fputc('[', f);
            for (long i = 0; i < count && st == SOFTLB_OK; i++) {
                softlb_pick p;
                if ((st = softlb_batch_pick(b, (int)i, &p, err)) == SOFTLB_OK) {
                    fputs(i ? "," : "", f), json_write_str(f, p.id);
                    softlb_pick_clear(&p);
                }
            }
            fputc(']', f);
        }
        softlb_batch_free(b);
        return st;
    }
    if (!strcmp(cmd, "watch")) {
        const char *name = str_of(c, "name") ? str_of(c, "name") : "";
        softlb_watch *w = softlb_watch_open(client, str_of(c, "service"), err);
        if (!w) return err->status;
        /* The first answer decides the reply: an unknown service is the command's error. */
        char *json;
        if ((st = softlb_watch_next(w, timeout_ms, &json, err)) != SOFTLB_OK) {
            softlb_watch_close(w);
            return st;
        }
        emit_event(name, json, NULL);
        softlb_free(json);
        watch_slot *s = calloc(1, sizeof *s);
        s->name = strdup(name), s->w = w, s->next = watches;
        watches = s;
        pthread_create(&s->thread, NULL, watch_thread, s);
        return fputs("{}", f), SOFTLB_OK;
    }
    if (!strcmp(cmd, "unwatch")) {
        const char *name = str_of(c, "name") ? str_of(c, "name") : "";
        for (watch_slot **p = &watches; *p; p = &(*p)->next)
            if (!strcmp((*p)->name, name)) {
                watch_slot *s = *p;
                *p = s->next;
                stop_watch(s);
                break;
            }
        return fputs("{}", f), SOFTLB_OK;
    }
    if (!strcmp(cmd, "close")) {
        stop_all_watches();
        softlb_close(client);
        client = NULL;
        return fputs("{}", f), SOFTLB_OK;
    }
    snprintf(err->message, sizeof err->message, "unknown command %s", cmd);
    return err->status = SOFTLB_CLIENT_ERROR;
}

int main(void) {
    char *line = NULL;
    size_t cap = 0;
    int done = 0;
    while (!done && getline(&line, &cap, stdin) > 0) {
        if (strspn(line, " \t\r\n") == strlen(line)) continue;
        jval *c = json_parse(line);
        const jval *seq = json_get(c, "seq");
        const char *cmd = str_of(c, "cmd");
        char *buf;
        size_t n;
        FILE *f = open_memstream(&buf, &n);
        fputs("{\"seq\":", f);
        if (seq && seq->t == J_NUM) fprintf(f, "%lld", seq->i);
        else fputs("null", f);
        char *result;
        size_t rn;
        FILE *rf = open_memstream(&result, &rn);
        softlb_error err = {.status = SOFTLB_CLIENT_ERROR};
        softlb_status st = SOFTLB_CLIENT_ERROR;
        if (!cmd) snprintf(err.message, sizeof err.message, "bad command line");
        else st = run(cmd, c, rf, &err);
        fclose(rf);
        if (st == SOFTLB_OK) fprintf(f, ",\"ok\":true,\"result\":%s}", result);
        else fputs(",\"ok\":false,\"error\":", f), write_error(f, &err), fputc('}', f);
        fclose(f);
        emit(buf);
        free(buf);
        free(result);
        done = cmd && !strcmp(cmd, "exit");
        json_free(c);
    }
    free(line);
    stop_all_watches();
    softlb_close(client);
    return 0;
}
