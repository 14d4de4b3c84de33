// libfracgpu.so, the driver shim: internal interfaces between its layers.
//
//   settings + real driver (driver.cpp)   FRACGPU_* variables; the real libcuda, opened
//                                          by absolute path; lazy, once per process
//   memory quota (quota.cpp)               per-device bindings to the shared state,
//                                          check-and-charge, allocation tracking
//   interposition (interpose.cpp)          the exported hooked entry points and the
//                                          cuGetProcAddress swap; the only layer that
//                                          knows the full list of wrappers
//
// Everything else the driver exports is a generated forwarder
// (cuda_forwarders.c) that calls the real entry point through forward.h.
// No C++ exception ever leaves a driver entry point (built -fno-exceptions).
#pragma once

#include <cuda.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "forward.h"

#define SHIM_API extern "C" __attribute__((visibility("default")))

namespace shim {

struct Settings {
    bool enforce = false;          // FRACGPU_PARTITION is set
    std::string partition;
    bool has_memory = false;       // FRACGPU_MEMORY: create the partition on demand
    uint64_t memory_bytes = 0;     // ... with this limit
    double memory_fraction = 0;    // ... or this fraction of each device
    std::string state_dir;
    double oom_wait_s = 0;         // FRACGPU_OOM_WAIT
    uint64_t context_memory = 0;   // FRACGPU_CONTEXT_MEMORY: charged per context
};

// Loads settings and the real driver once. False: the shim cannot work in
// this process; init_error() says what every call returns (the reason was
// printed once on stderr).
bool ensure_loaded();
CUresult init_error();
const Settings &settings();
void *real_handle();
void log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));   // "fracgpu: ..." on stderr

// The real driver's entry point `name`, cached by the caller in `slot`.
void *real_symbol(const char *name, std::atomic<void *> &slot);
// What a hook returns when the real entry point is unavailable.
inline CUresult missing_error() { return ensure_loaded() ? CUDA_ERROR_NOT_FOUND : init_error(); }

}  // namespace shim

// REAL(cuMemAlloc_v2)(args...): the real driver's function, typed as declared
// in cuda.h. Returns init_error() when the shim could not load the driver.
#define REAL(fn)                                                                     \
    ([]() -> decltype(&fn) {                                                         \
        static std::atomic<void *> slot_{nullptr};                                   \
        return reinterpret_cast<decltype(&fn)>(shim::real_symbol(#fn, slot_));       \
    }())

// Binds `var` to the real `fn`, or returns from the hook when it is unavailable.
#define REAL_OR_RETURN(var, fn)                \
    auto var = REAL(fn);                       \
    if (!var) return shim::missing_error()
