/* The native tests' check. A failed EXPECT names its file, line and condition
 * on stderr and counts itself in `failures` (an int each test defines); the
 * test goes on, and exits non-zero at its end. */
#ifndef FRACGPU_TESTS_EXPECT_H
#define FRACGPU_TESTS_EXPECT_H

#include <stdio.h>

#define EXPECT(cond)                                                                \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);      \
            failures++;                                                             \
        }                                                                           \
    } while (0)

#endif
