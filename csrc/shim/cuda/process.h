// Process binding, the layer under the memory quota and the launch gate
// (process.cpp): which process slot of which shared region governs each device
// of this process. See process.cpp for how a process is bound and unbound.
#pragma once

#include "shim.h"

#include <atomic>
#include <cstdint>
#include <string>

#include "fracgpu/state.h"

namespace shim {

constexpr int kMaxDevices = 64;

struct Binding {
    bool ok = false;                 // this device has the job's partition
    fracgpu::Region region;
    int slot = -1;
    // What the job sees as the device's memory: the most its partition may
    // hold (its limit, or what nobody was promised: fracgpu::memory_ceiling),
    // read from the shared state each time (it may change while the job runs).
    uint64_t limit() {
        const fracgpu::SharedRegion *r = region.raw();
        return fracgpu::memory_ceiling(*r, r->processes[slot].partition);
    }
    std::string uuid, refusal;
    std::atomic<bool> oom_reported{false};         // the refusal of a binding that is not ok was said
    std::atomic<uint64_t> oom_logged_ns{0};        // when the last out-of-memory line was written
    std::atomic<uint64_t> oom_unlogged{0};         // refusals since, not written
    std::atomic<uint64_t> last_reap_ns{0};
};

// The bindings, by device ordinal (kMaxDevices, never freed: used until exit);
// set by cuInit, read by every hook once g_bound says they are there.
extern Binding *g_bind;
extern int g_ndev;
extern std::atomic<bool> g_bound;   // this process has bindings (a forked child has none until its cuInit)
extern CUresult g_bind_result;      // what cuInit answered: a refused job is refused everywhere

// The binding that governs device `dev` in this process, or null when nothing
// is enforced here.
inline Binding *binding(int dev) {
    if (!g_bound.load(std::memory_order_acquire)) return nullptr;
    if (dev < 0 || dev >= g_ndev) return nullptr;
    return &g_bind[dev];
}

// In a forked child (quota.cpp): the parent's allocation tables and their
// locks are not the child's.
void quota_forget_after_fork();

}  // namespace shim
