#include "test.h"
const test_case live_tests[] = {{NULL, NULL}};
