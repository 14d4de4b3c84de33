// libfracgpu.so, the driver shim: internal interfaces between its layers.
//
//   settings + real driver (driver.cpp)   FRACGPU_* settings (fracgpu/settings.h);
//                                          the real libcuda, opened by absolute path
//                                          (fracgpu/real_library.h); lazy, once per process
//   process binding (process.cpp,          cuInit: this process's slot in its partition on
//     process.h)                           each device; exit and fork
//   memory quota (quota.cpp, quota.h)     the books: check-and-charge, what each allocation
//                                          charged, the quota shown as device memory
//   allocation hooks, by the driver        linear memory (memory_linear.cpp), VMM
//     API's families                       (memory_vmm.cpp), arrays (memory_arrays.cpp),
//                                          pools and stream-ordered allocation
//                                          (memory_pools.cpp), limits and module globals
//                                          (modules_limits.cpp)
//   contexts (contexts.cpp)                context creation, destruction and the primary
//                                          context, each charged before it is made and settled
//                                          on what it reserves (measured under the GPU's
//                                          measurement lock)
//   graph memory (graphs.cpp)              the device's graph memory pool, on the books
//   device figures (device_figures.cpp,    NVML, opened once: what the device itself says
//     device_figures.h)                    a process holds, for contexts and reconciliation
//   ground truth (reconcile.cpp)           a thread per process that checks the books against
//                                          what the device says the process holds, and
//                                          charges the partition what the books missed
//   launch gate (gate.cpp, gate.h)         the policy's decisions (fracgpu/gate_policy.h,
//                                          csrc/policy: pure, no clock or atomics) applied
//                                          to the shared state: turns, leases, buckets
//   device-time sampling (sampling.cpp)    one launch in many measured with pooled events,
//                                          the reader thread, the count at exit
//   launch hooks (launch.cpp)              cuLaunchKernel and the other launches: straight
//                                          through, in turns, or waiting (gate.cpp)
//   call counters (call_counts.cpp)        fracgpu_shim_call_counts: the driver calls the
//                                          shim adds to launches, for benchmarks
//   interposition (interpose.cpp)          the HOOKS(X) list of every hooked entry point
//                                          and the cuGetProcAddress swap; the only place
//                                          that knows the full list of wrappers
//
// The hooks themselves live with their layer (cuInit in process.cpp, the
// memory hooks with their family, the launch hooks in launch.cpp);
// interpose.cpp names them all.
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
#include "fracgpu/job_settings.h"
#include "fracgpu/support.h"

#define SHIM_API extern "C" __attribute__((visibility("default")))

namespace fracgpu {
class Region;
}

namespace shim {

// The job's settings (FRACGPU_PARTITION, FRACGPU_MEMORY, ...), parsed by the
// function the NVML shim uses too.
using Settings = fracgpu::JobSettings;

// Loads settings and the real driver once. False: the shim cannot work in
// this process; init_error() says what every call returns (the reason was
// printed once on stderr).
bool ensure_loaded();
CUresult init_error();
const Settings &settings();
void *real_handle();
using fracgpu::log;        // "fracgpu: ..." on stderr (fracgpu/support.h)
using fracgpu::log_event;  // ... with the fields a log pipeline keys on (FRACGPU_LOG_FORMAT=json)
// What a refusal of CUDA or of an allocation is, to a log pipeline.
inline const fracgpu::LogEvent kRefusedEvent{"refused", "error"};
using fracgpu::mono_ns;
using fracgpu::size_text;  // "4 GiB"

// The binding of device `dev` in this process (process.cpp): its
// region and process slot. False when nothing is enforced there.
bool bound_slot(int dev, fracgpu::Region **region, int *slot);
// The device the current context is on (0 without a driver call when the
// process sees one device); -1 when nothing is enforced or no context is current.
int launch_device();
// In a forked child (launch.cpp): the parent's events, reader thread and locks
// are not the child's; start from nothing.
void gate_forget_after_fork();
// At exit, before the process leaves its slots: count launches that completed
// unread (sampling.cpp).
void gate_account_finished();

// Graph memory (graphs.cpp), around the real cuGraphLaunch in launch.cpp: an
// executable graph with allocation nodes that holds no memory yet is charged
// what the device's graph pool will take (CUDA_ERROR_OUT_OF_MEMORY past the
// quota: the launch is refused), and the books then follow the pool.
// Graphs without memory nodes cost no lock and no driver call.
struct GraphLaunch {
    int dev = -1;              // -1: not a graph with memory nodes
    uint64_t precharged = 0;
};
CUresult graph_before_launch(CUgraphExec exec, GraphLaunch *out);
void graph_after_launch(CUgraphExec exec, const GraphLaunch &l, CUresult rc);
// In a forked child: the parent's graphs are not the child's.
void graph_forget_after_fork();

// The real driver's entry point `name`, cached by the caller in `slot`.
void *real_symbol(const char *name, std::atomic<void *> &slot);
// What a hook returns when the real entry point is unavailable.
inline CUresult missing_error() { return ensure_loaded() ? CUDA_ERROR_NOT_FOUND : init_error(); }

}  // namespace shim

// REAL(cuMemAlloc_v2)(args...): the real driver's function, typed as declared
// in cuda.h; null when the shim could not load the driver or the driver lacks
// it. Once resolved it is one load of the hook's own cache, inline.
#define REAL(fn)                                                                     \
    ([]() -> decltype(&fn) {                                                         \
        static std::atomic<void *> slot_{nullptr};                                   \
        void *p_ = slot_.load(std::memory_order_acquire);                            \
        return reinterpret_cast<decltype(&fn)>(p_ ? p_ : shim::real_symbol(#fn, slot_)); \
    }())

// Binds `var` to the real `fn`, or returns from the hook when it is unavailable.
#define REAL_OR_RETURN(var, fn)                \
    auto var = REAL(fn);                       \
    if (!var) return shim::missing_error()
