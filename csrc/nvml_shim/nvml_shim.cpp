// libfracgpu-nvml.so, the NVML shim (SONAME libnvidia-ml.so.1): NVML shows a
// job its partition's memory, the same numbers the CUDA shim gives through
// cuMemGetInfo_v2 and cuDeviceTotalMem_v2.
//
// Loaded before anything opens NVML (LD_PRELOAD, or in-process with
// RTLD_GLOBAL), it is what every later dlopen("libnvidia-ml.so.1") gets, by
// SONAME, as libfracgpu.so is for libcuda.so.1. Every NVML function is
// exported: the generated forwarders (nvml_forwarders.c) pass the ones not
// hooked here to the real NVML, which is opened lazily, by absolute path,
// RTLD_LOCAL.
//
// Hooked: nvmlDeviceGetMemoryInfo and nvmlDeviceGetMemoryInfo_v2. Where
// FRACGPU_PARTITION is set and that partition lives on the device (found by
// the device's UUID, the key of the shared state), total is the partition's
// limit, used what the partition holds, free what is left of the limit (never
// more than the device has free); see fracgpu/view.h. Anywhere else the real
// numbers pass through. nvmlErrorString also answers without the real NVML.
//
// No C++ exception ever leaves an NVML entry point (built -fno-exceptions).
#include "nvml_forward.h"
#include "fracgpu/error_text.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dlfcn.h>
#include <mutex>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

#include "fracgpu/real_library.h"
#include "fracgpu/state.h"
#include "fracgpu/support.h"
#include "fracgpu/units.h"
#include "fracgpu/view.h"

#define NVML_SHIM_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr uint64_t kReapIntervalNs = 100'000'000;   // as the CUDA shim: look for dead jobs this often

using fracgpu::log;
using fracgpu::mono_ns;

// ---------------------------------------------------------------------------
// The real NVML: FRACGPU_REAL_LIBNVML, else LD_LIBRARY_PATH, else the usual
// driver folders, skipping this very library (by inode: a folder may hold the
// shim as libnvidia-ml.so.1).
// ---------------------------------------------------------------------------
std::once_flag g_once;
void *g_real = nullptr;
std::atomic<void *> *g_slots = nullptr;   // one per generated forwarder

void load_once() {
    std::string err;
    static const fracgpu::RealLibrary kNvml = {
        "libnvidia-ml.so.1", "FRACGPU_REAL_LIBNVML", "the real NVML",
        "NVML calls return NVML_ERROR_LIBRARY_NOT_FOUND. Install the NVIDIA driver or set FRACGPU_REAL_LIBNVML to "
        "its full path",
        reinterpret_cast<const void *>(&load_once)};
    void *h = fracgpu::open_real_library(kNvml, &err);
    if (!h) {
        log("%s", err.c_str());
        return;
    }
    g_slots = new std::atomic<void *>[fg_nvml_count]();
    g_real = h;
}

bool ensure_loaded() {
    std::call_once(g_once, load_once);
    return g_real != nullptr;
}

// The real function `name`, cached in `slot`.
void *real_symbol(const char *name, std::atomic<void *> &slot) {
    void *p = slot.load(std::memory_order_acquire);
    if (p) return p;
    if (!ensure_loaded()) return nullptr;
    p = dlsym(g_real, name);
    slot.store(p, std::memory_order_release);
    return p;
}

#define REAL(fn)                                                                     \
    ([]() -> decltype(&fn) {                                                         \
        static std::atomic<void *> slot_{nullptr};                                   \
        return reinterpret_cast<decltype(&fn)>(real_symbol(#fn, slot_));             \
    }())

nvmlReturn_t missing() { return ensure_loaded() ? NVML_ERROR_FUNCTION_NOT_FOUND : NVML_ERROR_LIBRARY_NOT_FOUND; }

const fracgpu::ErrorText kErrors[] = {
#define NVML_ERROR_ENTRY(code, name, text) {code, name, text},
#include "nvml_errors.inc"
#undef NVML_ERROR_ENTRY
};

// ---------------------------------------------------------------------------
// The job: FRACGPU_PARTITION (and FRACGPU_MEMORY), read once.
// ---------------------------------------------------------------------------
struct Job {
    bool enforce = false;
    std::string partition, state_dir;
    bool has_memory = false;        // FRACGPU_MEMORY: the partition is made at the job's cuInit ...
    uint64_t memory_bytes = 0;      // ... with this limit
    double memory_fraction = 0;     // ... or this fraction of the device
};

const Job &job() {
    static Job *j = [] {
        Job *p = new Job;
        const char *v = getenv("FRACGPU_PARTITION");
        std::string err;
        if (v && *v && fracgpu::valid_partition_name(v, &err)) {
            p->enforce = true;
            p->partition = v;
            p->state_dir = fracgpu::default_state_dir();
            const char *m = getenv("FRACGPU_MEMORY");
            p->has_memory = m && *m &&
                            fracgpu_parse_size(m, &p->memory_bytes, &p->memory_fraction, nullptr, 0) == 0;
        }
        // An invalid FRACGPU_PARTITION or FRACGPU_MEMORY: the CUDA shim refuses
        // the job with the reason; NVML only reports, so it shows the device.
        return p;
    }();
    return *j;
}

std::atomic<uint64_t> g_last_reap_ns{0};
std::atomic<bool> g_error_reported{false};

// The job's view of `device`, given the real numbers; false: show those.
bool job_view(nvmlDevice_t device, uint64_t real_total, uint64_t real_free, fracgpu::MemoryView *out) {
    const Job &j = job();
    if (!j.enforce) return false;
    auto get_uuid = REAL(nvmlDeviceGetUUID);
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = "";
    if (!get_uuid || get_uuid(device, uuid, sizeof uuid) != NVML_SUCCESS || strncmp(uuid, "GPU-", 4) != 0)
        return false;   // a MIG instance or an unknown device: not a region of ours
    uint64_t now = mono_ns();
    uint64_t last = g_last_reap_ns.load(std::memory_order_relaxed);
    bool reap = now - last > kReapIntervalNs && g_last_reap_ns.compare_exchange_strong(last, now);
    std::string err;
    switch (fracgpu::read_partition_memory(j.state_dir, uuid, j.partition, real_free, reap, out, &err)) {
    case fracgpu::ViewStatus::kFound:
        return true;
    case fracgpu::ViewStatus::kError:
        if (!g_error_reported.exchange(true)) log("NVML shows the whole device %s: %s", uuid, err.c_str());
        return false;
    case fracgpu::ViewStatus::kAbsent:
        break;
    }
    // A private partition (FRACGPU_MEMORY) is made when the job first calls
    // cuInit; before that, show the limit it will have, with nothing used.
    if (!j.has_memory) return false;
    uint64_t limit = j.memory_fraction > 0 ? (uint64_t)((double)real_total * j.memory_fraction) : j.memory_bytes;
    *out = fracgpu::memory_view(limit, real_total, 0, real_free);
    return true;
}

}  // namespace

// ---------------------------------------------------------------------------
// What the generated forwarders call
// ---------------------------------------------------------------------------
extern "C" void *fg_nvml_resolve(unsigned idx) {
    if (!ensure_loaded() || idx >= fg_nvml_count) return nullptr;
    return real_symbol(fg_nvml_names[idx], g_slots[idx]);
}

extern "C" nvmlReturn_t fg_nvml_missing(unsigned idx) {
    (void)idx;
    return missing();
}

extern "C" const char *fg_nvml_missing_text(unsigned idx) {
    (void)idx;
    return "Unknown Error";
}

// ---------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------
NVML_SHIM_API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    auto real = REAL(nvmlDeviceGetMemoryInfo);
    if (!real) return missing();
    nvmlReturn_t rc = real(device, memory);
    fracgpu::MemoryView v;
    if (rc == NVML_SUCCESS && memory && job_view(device, memory->total, memory->free, &v)) {
        memory->total = v.total;
        memory->used = v.used;
        memory->free = v.free;
    }
    return rc;
}

NVML_SHIM_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    auto real = REAL(nvmlDeviceGetMemoryInfo_v2);
    if (!real) return missing();
    nvmlReturn_t rc = real(device, memory);
    fracgpu::MemoryView v;
    if (rc == NVML_SUCCESS && memory && job_view(device, memory->total, memory->free, &v)) {
        memory->total = v.total;
        memory->reserved = 0;   // the partition's limit is all the job has; nothing of it is set aside
        memory->used = v.used;
        memory->free = v.free;
    }
    return rc;
}

NVML_SHIM_API const char *nvmlErrorString(nvmlReturn_t result) {
    if (auto real = REAL(nvmlErrorString)) return real(result);
    const fracgpu::ErrorText *e = fracgpu::find_error(kErrors, (int)result);
    return e ? e->text : "Unknown Error";
}
