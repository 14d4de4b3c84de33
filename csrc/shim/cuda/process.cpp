// Process binding: how a process becomes a member of its partition on each
// device, and stops being one.
//
// The mechanism. A process is bound at its first successful cuInit (every
// CUDA client calls it before anything else, directly or through cudart):
// the real cuInit runs, then for every device the process can see, the
// device's region of the shared state (fracgpu/state.h, keyed by the GPU's
// UUID) is opened and the process takes a slot in its partition there
// (Region::join), making a private partition first when FRACGPU_MEMORY or
// FRACGPU_COMPUTE ask for one. The quota charges and the launch gate measures
// against that slot. An atexit handler counts the launch gate's last
// launches and stops the books; the slot, and the memory charged to it, stay
// until the process is gone (the device holds that memory until then), when
// the others reap it (Region::reap, by pid and start time), as they reap a
// process killed by a signal. A pthread_atfork child handler forgets
// everything: a forked child is a new process, bound anew at its own cuInit,
// and the parent's slots, allocations, locks and gate stay the parent's.
//
// A job that cannot be bound (no state folder, a limit above the device, a
// partition that does not exist) gets CUDA_ERROR_NOT_PERMITTED from cuInit
// and from every allocation: no job runs without its limits.
//
// Nothing here is on the launch path: launch_device() and bound_slot() read
// what cuInit wrote.
#include "process.h"

#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <unistd.h>

namespace shim {

Binding *g_bind = nullptr;
int g_ndev = 0;
std::atomic<bool> g_bound{false};
CUresult g_bind_result = CUDA_SUCCESS;

namespace {

std::mutex g_bind_mu;

std::string command_name() {
    char buf[64] = "";
    FILE *f = fopen("/proc/self/comm", "re");
    if (f) {
        if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
        fclose(f);
    }
    buf[strcspn(buf, "\n")] = 0;
    return buf;
}

// Binds device ordinal d: its region, the partition, a process slot.
// Returns false when the job must not run at all (its reason logged).
bool attach(int d, Binding &b) {
    const Settings &s = settings();
    CUdevice dev;
    CUuuid uuid;
    char name[96] = "";
    size_t total = 0;
    auto get = REAL(cuDeviceGet);
    auto get_uuid = REAL(cuDeviceGetUuid_v2) ? REAL(cuDeviceGetUuid_v2) : REAL(cuDeviceGetUuid);
    auto get_name = REAL(cuDeviceGetName);
    auto get_total = REAL(cuDeviceTotalMem_v2);
    if (!get || !get_uuid || !get_name || !get_total || get(&dev, d) != CUDA_SUCCESS ||
        get_uuid(&uuid, dev) != CUDA_SUCCESS || get_name(name, sizeof name, dev) != CUDA_SUCCESS ||
        get_total(&total, dev) != CUDA_SUCCESS) {
        log_event(kRefusedEvent,
                  "cannot identify CUDA device %d; CUDA is refused in this process so that no job runs without its limits",
                  d);
        return false;
    }
    b.uuid = fracgpu::uuid_text(uuid.bytes);
    std::string err;
    if (!b.region.open(s.state_dir, b.uuid, name, total, true, &err)) {
        log_event(kRefusedEvent, "%s; CUDA is refused in this process so that no job runs without its limits",
                  err.c_str());
        return false;
    }
    uint64_t limit = s.memory_limit(total);
    if (limit > total) {
        log_event(kRefusedEvent, "the memory limit %s of partition '%s' is above the %s of GPU %d (%s); ask for at most %s",
                  size_text(limit).c_str(), s.partition.c_str(), size_text(total).c_str(), d, b.uuid.c_str(),
                  size_text(total).c_str());
        return false;
    }
    uint32_t flags = (s.compute_cap ? fracgpu::kPartitionCap : 0u) | fracgpu::priority_flags(s.priority);
    b.slot = b.region.join(s.partition, getpid(), command_name().c_str(), s.ephemeral ? &limit : nullptr, &err,
                           s.compute_share, flags, s.holder, s.overcommit);
    if (b.slot < 0) {
        if (b.region.find_partition(s.partition) >= 0 || s.ephemeral) {
            log_event(kRefusedEvent, "%s; CUDA is refused in this process", err.c_str());
            return false;
        }
        b.refusal = err;   // the partition lives on another GPU: this one gets no memory
        return true;
    }
    b.ok = true;
    return true;
}

// At exit the process keeps its slots, and with them what its partition is
// charged: the driver still holds the process's memory. Its own teardown
// runs later in the exit path (its exit handler was registered before this
// one, at the real cuInit), and what is left goes when the kernel closes the
// process's device files. Giving the memory back here would let neighbours
// allocate into memory the device still holds, over the quota. The slot is
// released (Region::reap, by whoever looks next: a refused allocation, the
// job's recorder, the CLI) once the process is gone, when the device has let
// go of everything.
void detach_at_exit() {
    if (!g_bound.load() || !g_bind) return;
    gate_account_finished();
    // From here on nothing is charged or given back: a free made by a later exit
    // handler (a static destructor freeing its cache) is the device's business
    // until the process is gone, and the slot is released whole then.
    g_bound.store(false, std::memory_order_release);
    // The launch gate must not wait on launches this process will never see
    // complete: its partition is not kept busy (and its turn held) by them
    // until the slot is reaped.
    for (int d = 0; d < g_ndev; d++)
        if (g_bind[d].ok) g_bind[d].region.end_launches(g_bind[d].slot);
}

void forget_after_fork() {
    // The child is a new process: its first cuInit binds it anew. The parent's
    // slots, allocations and launch gate stay the parent's; locks another
    // thread of the parent held at the fork are remade.
    g_bound.store(false);
    new (&g_bind_mu) std::mutex();
    quota_forget_after_fork();
    gate_forget_after_fork();
}

}  // namespace

bool bound_slot(int dev, fracgpu::Region **region, int *slot) {
    Binding *b = binding(dev);
    if (!b || !b->ok) return false;
    *region = &b->region;
    *slot = b->slot;
    return true;
}

int launch_device() {
    if (!g_bound.load(std::memory_order_acquire)) return -1;
    if (g_ndev == 1) return 0;
    CUdevice d;   // only the device: a launch needs no context lookup here
    auto get_dev = REAL(cuCtxGetDevice);
    return get_dev && get_dev(&d) == CUDA_SUCCESS ? d : -1;
}

}  // namespace shim

using namespace shim;

// ---------------------------------------------------------------------------
// Initialisation: the real cuInit, then this process joins its partition on
// every device it can see.
// ---------------------------------------------------------------------------
SHIM_API CUresult cuInit(unsigned int flags) {
    if (!ensure_loaded()) return init_error();
    REAL_OR_RETURN(real, cuInit);
    CUresult rc = real(flags);
    if (rc != CUDA_SUCCESS || !settings().enforce) return rc;
    std::lock_guard<std::mutex> lk(g_bind_mu);
    if (g_bound.load()) return g_bind_result;
    static bool hooks_installed = false;
    if (!hooks_installed) {
        hooks_installed = true;
        pthread_atfork(nullptr, nullptr, forget_after_fork);
        atexit(detach_at_exit);
    }
    int n = 0;
    REAL_OR_RETURN(count, cuDeviceGetCount);
    if ((rc = count(&n)) != CUDA_SUCCESS) return rc;
    // A forked child gets bindings of its own; the parent's stay untouched.
    g_bind = new Binding[kMaxDevices];
    g_ndev = n < kMaxDevices ? n : kMaxDevices;
    bool any = false, fatal = false;
    for (int d = 0; d < g_ndev && !fatal; d++) {
        fatal = !attach(d, g_bind[d]);
        any = any || g_bind[d].ok;
    }
    if (!fatal && !any && g_ndev > 0) {
        log_event(kRefusedEvent, "%s; CUDA is refused in this process", g_bind[0].refusal.c_str());
        fatal = true;
    }
    if (fatal)
        for (int d = 0; d < g_ndev; d++)
            if (g_bind[d].ok) g_bind[d].region.leave(g_bind[d].slot), g_bind[d].ok = false;
    g_bind_result = fatal ? CUDA_ERROR_NOT_PERMITTED : CUDA_SUCCESS;
    g_bound.store(settings().enforce, std::memory_order_release);
    return g_bind_result;
}

