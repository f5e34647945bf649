/* A minimal assertion harness for the C unit tests (ctest runs each binary). */
#ifndef UE_TEST_H
#define UE_TEST_H
#include <stdio.h>
#include <stdlib.h>

static int ue_test_failures;
#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                                   \
            ue_test_failures++;                                                                                        \
        }                                                                                                              \
    } while (0)
#define REQUIRE(cond)                                                                                                  \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: requirement failed: %s\n", __FILE__, __LINE__, #cond);                             \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)
#define RUN(fn)                                                                                                        \
    do {                                                                                                               \
        int before_ = ue_test_failures;                                                                                \
        fn();                                                                                                          \
        printf("%s %s\n", ue_test_failures == before_ ? "ok  " : "FAIL", #fn);                                         \
    } while (0)
#define TEST_EXIT() (ue_test_failures ? (fprintf(stderr, "%d checks failed\n", ue_test_failures), 1) : 0)
#endif
