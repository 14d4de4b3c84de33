// Small things both shims need (the simulated driver keeps its own: it shares
// no code with them).
#pragma once

#include <cstdint>
#include <ctime>

namespace fracgpu {

// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
inline uint64_t mono_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// One line "fracgpu: ..." on stderr.
void log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace fracgpu
