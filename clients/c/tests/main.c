#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test.h"

int t_current_failed;
const char *t_vectors_path = "../../tests/wire_vectors/vectors.json";

int main(int argc, char **argv) {
    if (argc > 1) t_vectors_path = argv[1];
    const char *only = getenv("TEST_ONLY");
    signal(SIGPIPE, SIG_IGN);   /* the fake agent writes to sockets the client dropped */
    alarm(120);                 /* every test is bounded: a hang kills the run */
    int passed = 0, failed = 0;
    const test_case *suites[] = {codec_tests, live_tests};
    for (int s = 0; s < 2; s++)
        for (const test_case *t = suites[s]; t->name; t++) {
            if (only && !strstr(t->name, only)) continue;
            t_current_failed = 0;
            t->fn();
            printf("%s %s\n", t_current_failed ? "FAIL" : "ok  ", t->name);
            fflush(stdout);
            t_current_failed ? failed++ : passed++;
        }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
