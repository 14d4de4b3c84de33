// The few operating-system pieces every native part of fracgpu uses, in the
// manner of mimalloc's prim layer: the monotonic clock, one line on stderr,
// and the mutex inside a file many processes map. Header-only, so the
// simulated GPU, which links no fracgpu code, uses the same ones as the shims
// and the shared state.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <pthread.h>

namespace fracgpu {

// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
inline uint64_t mono_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// One line "<who>: <message>" on stderr.
__attribute__((format(printf, 2, 0))) inline void print_line(const char *who, const char *fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    fprintf(stderr, "%s: %s\n", who, buf);
}

// A mutex inside a shared file: process-shared, and robust, so that a holder
// killed while holding it leaves it EOWNERDEAD for the next locker instead of
// locked forever. pthread_mutex_init's result: 0, or an errno value.
inline int init_shared_mutex(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

}  // namespace fracgpu
