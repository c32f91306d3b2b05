/* The codec: the shared wire vectors, and the edges the vectors do not pin. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "json.h"
#include "softlb.h"
#include "test.h"
#include "vectors.h"

static void test_shared_vectors(void) {
    vectors_outcome o;
    CHECK(vectors_check(t_vectors_path, &o, stderr) == 0);
    CHECK(o.passed >= 23);   /* every vector in the file: a shrinking file must not pass */
    CHECK(o.nfailed == 0);
    vectors_outcome_free(&o);
}

static void test_resolve_vector_fills_a_pick(void) {
    /* resolve_result's bytes, as the agent sends them */
    static const char hex[] =
        "0000007e82a2696402a6726573756c748ca761646472657373a831302e302e302e37a4706f7274cd1f90a26964a57765622d31"
        "a47461677391a27632a46d65746181a776657273696f6ea132a677656967687401a46e6f6465a0a47a6f6e65a565752d3161"
        "a6726567696f6ea0a56c6561736511a570616e6963c2a57374616c65c2";
    uint8_t b[512];
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &b[i]);
    /* Two frames back to back: the decoder takes exactly one. */
    memcpy(b + n, b, n);
    size_t used;
    char *json;
    softlb_error err;
    CHECK(softlb_decode(b, 2 * n, &used, &json, &err) == SOFTLB_OK);
    CHECK(used == n);
    jval *v = json_parse(json);
    CHECK(v && json_get(json_get(v, "result"), "lease")->i == 17);
    json_free(v);
    free(json);
}

static void test_encode_rejects_missing_arguments(void) {
    softlb_request r = {.kind = SOFTLB_REQ_RESOLVE};
    uint8_t *out;
    size_t n;
    softlb_error err;
    CHECK(softlb_encode(&r, &out, &n, &err) == SOFTLB_CLIENT_ERROR);
    softlb_request rp = {.kind = SOFTLB_REQ_REPORT, .report = {.ok = 1, .latency = -1}};
    CHECK(softlb_encode(&rp, &out, &n, &err) == SOFTLB_CLIENT_ERROR);
    CHECK(strcmp(err.code, "CLIENT_ERROR") == 0);
}

static void test_binary_key_is_bin(void) {
    softlb_request r = {.kind = SOFTLB_REQ_RESOLVE, .id = 1,
                        .resolve = {.service = "c", .key = "\x00\xff", .keylen = 2, .key_is_bin = 1}};
    uint8_t *out;
    size_t n;
    softlb_error err;
    CHECK(softlb_encode(&r, &out, &n, &err) == SOFTLB_OK);
    /* ... "key" (a3 6b 65 79) then bin8 of 2 bytes (c4 02 00 ff) ends the frame */
    CHECK(n > 8 && !memcmp(out + n - 8, "\xa3key\xc4\x02\x00\xff", 8));
    free(out);
}

static void test_unknown_code_is_kept(void) {
    /* {"id":1,"error":{"code":"NEW_CODE","message":"m"}} from a newer agent */
    static const uint8_t body[] = "\x82\xa2id\x01\xa5" "error\x82\xa4" "code\xa8NEW_CODE\xa7message\xa1m";
    uint8_t frame[64] = {0, 0, 0, sizeof body - 1};
    memcpy(frame + 4, body, sizeof body - 1);
    size_t used;
    char *json;
    softlb_error err;
    CHECK(softlb_decode(frame, 4 + sizeof body - 1, &used, &json, &err) == SOFTLB_OTHER_CODE);
    CHECK(strcmp(err.code, "NEW_CODE") == 0 && strcmp(err.message, "m") == 0);
    free(json);
}

static void test_default_socket_follows_the_python_rule(void) {
    char buf[256];
    char *saved[3];
    const char *names[] = {"SOFTLB_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"};
    for (int i = 0; i < 3; i++) saved[i] = getenv(names[i]) ? strdup(getenv(names[i])) : NULL;
    setenv("SOFTLB_SOCKET", "/x/y.sock", 1);
    softlb_default_socket(buf, sizeof buf);
    CHECK(strcmp(buf, "/x/y.sock") == 0);
    unsetenv("SOFTLB_SOCKET");
    setenv("RUNTIME_DIRECTORY", "/run/a:/run/b", 1);
    softlb_default_socket(buf, sizeof buf);
    CHECK(strcmp(buf, "/run/a/softlb.sock") == 0);
    unsetenv("RUNTIME_DIRECTORY");
    setenv("XDG_RUNTIME_DIR", "/run/user/7", 1);
    softlb_default_socket(buf, sizeof buf);
    if (geteuid() != 0 && access("/run/softlb/softlb.sock", F_OK) != 0)
        CHECK(strcmp(buf, "/run/user/7/softlb/softlb.sock") == 0);
    unsetenv("XDG_RUNTIME_DIR");
    softlb_default_socket(buf, sizeof buf);
    char want[64];
    snprintf(want, sizeof want, "/tmp/softlb-%u/softlb.sock", (unsigned)geteuid());
    if (geteuid() != 0 && access("/run/softlb/softlb.sock", F_OK) != 0) CHECK(strcmp(buf, want) == 0);
    for (int i = 0; i < 3; i++) {
        if (saved[i]) setenv(names[i], saved[i], 1);
        free(saved[i]);
    }
}

static void test_open_rejects_bad_addresses(void) {
    softlb_error err;
    CHECK(softlb_open("localhost:7070", 100, &err) == NULL);   /* no name lookups */
    CHECK(err.status == SOFTLB_CLIENT_ERROR);
    CHECK(softlb_open("127.0.0.1:99999", 100, &err) == NULL);
    softlb_client *c = softlb_open("[::1]:7070", 100, &err);
    CHECK(c != NULL);
    softlb_close(c);
}

const test_case codec_tests[] = {
    {"codec: shared wire vectors", test_shared_vectors},
    {"codec: a resolve answer decodes one frame at a time", test_resolve_vector_fills_a_pick},
    {"codec: encode refuses requests missing required arguments", test_encode_rejects_missing_arguments},
    {"codec: a binary key is sent as msgpack bin", test_binary_key_is_bin},
    {"codec: an error code from a newer agent is kept", test_unknown_code_is_kept},
    {"paths: default socket follows the Python client's rule", test_default_socket_follows_the_python_rule},
    {"open: bad addresses are refused", test_open_rejects_bad_addresses},
    {NULL, NULL},
};
