// The device's own figures, from NVML (see device_figures.h). The real (or
// simulated) NVML is opened by absolute path as the real driver is
// (fracgpu/real_library.h), once per process, and asked by the GPU's UUID:
// NVML ignores CUDA_VISIBLE_DEVICES.
#include "device_figures.h"

#include <dlfcn.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "fracgpu/real_library.h"
#include "fracgpu/state.h"

namespace shim {
namespace {

struct NvmlMemory {
    unsigned long long total, free, used;   // nvmlMemory_t
};
using nvml_init_fn = int (*)();
using nvml_by_uuid_fn = int (*)(const char *, void **);
using nvml_memory_fn = int (*)(void *, NvmlMemory *);
struct NvmlProcess {
    unsigned pid;
    unsigned long long used;
    unsigned gpu_instance, compute_instance;   // nvmlProcessInfo_t (v2 and v3)
};
using nvml_processes_fn = int (*)(void *, unsigned *, NvmlProcess *);

struct Nvml {
    nvml_by_uuid_fn by_uuid = nullptr;
    nvml_memory_fn memory = nullptr;
    nvml_processes_fn processes = nullptr;   // null: the device's per-process figure is not available
};

// The real (or simulated) NVML, opened once; null members when it cannot be.
const Nvml &nvml() {
    static const Nvml n = [] {
        Nvml r;
        static constexpr fracgpu::RealLibrary kNvmlLib = {"libnvidia-ml.so.1", FRACGPU_SETTING_REAL_LIBNVML, "NVML",
                                                          "set FRACGPU_CONTEXT_MEMORY to charge contexts"};
        std::string err;
        void *h = fracgpu::open_real_library(kNvmlLib, &err);
        auto init = h ? reinterpret_cast<nvml_init_fn>(dlsym(h, "nvmlInit_v2")) : nullptr;
        if (init && init() == 0) {
            r.by_uuid = reinterpret_cast<nvml_by_uuid_fn>(dlsym(h, "nvmlDeviceGetHandleByUUID"));
            r.memory = reinterpret_cast<nvml_memory_fn>(dlsym(h, "nvmlDeviceGetMemoryInfo"));
            r.processes = reinterpret_cast<nvml_processes_fn>(dlsym(h, "nvmlDeviceGetComputeRunningProcesses_v3"));
            if (!r.processes)
                r.processes = reinterpret_cast<nvml_processes_fn>(dlsym(h, "nvmlDeviceGetComputeRunningProcesses_v2"));
        }
        if (!r.by_uuid || !r.memory)
            log("cannot measure what CUDA contexts reserve (%s); they are charged nothing: set "
                "FRACGPU_CONTEXT_MEMORY to charge them", err.empty() ? "NVML is not usable" : err.c_str());
        return r;
    }();
    return n;
}

}  // namespace

bool device_lists_processes() { return nvml().processes != nullptr; }

namespace {
// What every partition of the GPU has charged for allocations it saw (the
// drift charged by reconciliation is the device's figure, not the books').
uint64_t books(Binding &b) {
    const fracgpu::SharedRegion *r = b.region.raw();
    uint64_t sum = 0;
    for (const fracgpu::SharedPartition &p : r->partitions)
        if (p.in_use) sum += p.used.load(std::memory_order_acquire) - p.drift_charged.load(std::memory_order_acquire);
    return sum;
}

}  // namespace

bool beyond_books(Binding &b, int64_t *out) {
    const Nvml &n = nvml();
    void *dev = nullptr;
    if (!n.by_uuid || n.by_uuid(b.uuid.c_str(), &dev) != 0) return false;
    int64_t last = 0;
    for (int i = 0; i < 8; i++) {
        NvmlMemory m{};
        uint64_t charged = books(b);
        if (n.memory(dev, &m) != 0) return false;
        int64_t now = (int64_t)m.used - (int64_t)charged;
        if (i > 0 && now == last) break;
        last = now;
    }
    *out = last;
    return true;
}

namespace {
bool own_usage_in(const NvmlProcess *procs, unsigned count, uint64_t *out, bool *listed) {
    const unsigned me = (unsigned)getpid();
    *out = 0;
    *listed = false;
    for (unsigned i = 0; i < count; i++)
        if (procs[i].pid == me && procs[i].used != ~0ull /* NVML_VALUE_NOT_AVAILABLE */) {
            *out += procs[i].used;
            *listed = true;
        }
    return true;
}

}  // namespace

bool own_usage(Binding &b, uint64_t *out, bool *listed) {
    const Nvml &n = nvml();
    void *dev = nullptr;
    if (!n.processes || !n.by_uuid || n.by_uuid(b.uuid.c_str(), &dev) != 0) return false;
    NvmlProcess procs[64];
    unsigned count = 64;
    int rc = n.processes(dev, &count, procs);
    std::vector<NvmlProcess> more;
    // NVML_ERROR_INSUFFICIENT_SIZE: asked again with room, a few times, since the list grows
    // between two calls while many processes start together.
    for (int tries = 0; rc == 7 && tries < 8; tries++) {
        more.resize(count + count / 2 + 16);
        count = (unsigned)more.size();
        rc = n.processes(dev, &count, more.data());
    }
    if (rc != 0) return false;
    return own_usage_in(more.empty() ? procs : more.data(), count, out, listed);
}

NvmlFigure device_figure(int dev, uint64_t *used) {
    Binding *b = binding(dev);
    if (!b || !b->ok) return NvmlFigure::kCannotSay;
    bool listed = false;
    if (!own_usage(*b, used, &listed)) return NvmlFigure::kCannotSay;
    return listed ? NvmlFigure::kListed : NvmlFigure::kNotListed;
}

}  // namespace shim
