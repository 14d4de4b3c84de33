// Small things both shims need (the simulated driver keeps its own: it shares
// no code with them).
#pragma once

#include <cstdint>
#include <ctime>
#include <string>

namespace fracgpu {

// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
inline uint64_t mono_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// One line "fracgpu: ..." on stderr.
void log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// A size as people write it ("4 GiB"), as fracgpu_format_size (units.h) makes it.
std::string size_text(uint64_t bytes);

// A GPU's UUID (its 16 bytes, as cuDeviceGetUuid_v2 gives them) as the text NVML
// and the shared state use: "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", lowercase.
std::string uuid_text(const char bytes[16]);

}  // namespace fracgpu
