// libfracgpu-nvml.so, the NVML shim (SONAME libnvidia-ml.so.1): NVML shows a
// job its partition's memory, the same numbers the CUDA shim gives through
// cuMemGetInfo_v2 and cuDeviceTotalMem_v2.
//
// Loaded before anything opens NVML (LD_PRELOAD, or in-process with
// RTLD_GLOBAL), it is what every later dlopen("libnvidia-ml.so.1") gets, by
// SONAME, as libfracgpu.so is for libcuda.so.1. Every NVML function is
// exported: the generated forwarders (nvml_forwarders.c) pass the ones not
// hooked here to the real NVML, which is opened lazily, by absolute path,
// RTLD_LOCAL, by the loader both shims share (fracgpu/real_library.h).
//
// Hooked: nvmlDeviceGetMemoryInfo and nvmlDeviceGetMemoryInfo_v2. Where
// FRACGPU_PARTITION is set and that partition lives on the device (found by
// the device's UUID, the key of the shared state), total is the partition's
// limit, used what the partition holds, free what is left of the limit (never
// more than the device has free); see fracgpu/view.h. Anywhere else the real
// numbers pass through. Where the job's settings are refused by the CUDA shim
// (fracgpu/job_settings.h), the memory queries are refused too
// (NVML_ERROR_NO_PERMISSION, the reason on stderr once).
// nvmlErrorString also answers without the real NVML.
//
// No C++ exception ever leaves an NVML entry point (built -fno-exceptions).
#include "nvml_forward.h"
#include "fracgpu/error_text.h"

#include <atomic>
#include <cstring>
#include <string>

#include "fracgpu/job_settings.h"
#include "fracgpu/real_library.h"
#include "fracgpu/support.h"
#include "fracgpu/view.h"

#define NVML_SHIM_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr uint64_t kReapIntervalNs = 100'000'000;   // as the CUDA shim: look for dead jobs this often

using fracgpu::log;
using fracgpu::mono_ns;

// ---------------------------------------------------------------------------
// The real NVML, through the loader the CUDA shim uses too.
// ---------------------------------------------------------------------------
constexpr fracgpu::RealLibrary kNvml = {
    "libnvidia-ml.so.1", FRACGPU_SETTING_REAL_LIBNVML, "the real NVML",
    "NVML calls return NVML_ERROR_LIBRARY_NOT_FOUND. Install the NVIDIA driver or set FRACGPU_REAL_LIBNVML to "
    "its full path"};
fracgpu::RealLibraryLoader g_nvml(kNvml, &fg_nvml_count, nullptr);

#define REAL(fn)                                                                     \
    ([]() -> decltype(&fn) {                                                         \
        static std::atomic<void *> slot_{nullptr};                                   \
        return reinterpret_cast<decltype(&fn)>(g_nvml.symbol(#fn, slot_));           \
    }())

nvmlReturn_t missing() { return g_nvml.ensure_loaded() ? NVML_ERROR_FUNCTION_NOT_FOUND : NVML_ERROR_LIBRARY_NOT_FOUND; }

const fracgpu::ErrorText kErrors[] = {
#define NVML_ERROR_ENTRY(code, name, text) {code, name, text},
#include "nvml_errors.inc"
#undef NVML_ERROR_ENTRY
};

// ---------------------------------------------------------------------------
// The job: its settings, read once by the parser the CUDA shim uses. Settings
// the CUDA shim refuses (it refuses CUDA to the job) make NVML refuse memory
// queries, with the same reason: NVML never shows a job a device its CUDA
// would not have.
// ---------------------------------------------------------------------------
struct Job {
    fracgpu::JobSettings settings;
    bool valid = false;
    std::string error;       // why the settings are refused
};

const Job &job() {
    static Job *j = [] {
        Job *p = new Job;
        p->valid = fracgpu::read_job_settings(&p->settings, &p->error);
        return p;
    }();
    return *j;
}

std::atomic<uint64_t> g_last_reap_ns{0};
std::atomic<bool> g_error_reported{false};
std::atomic<bool> g_refusal_reported{false};

// The job's view of `device`, given the real numbers; false: show those.
bool job_view(nvmlDevice_t device, uint64_t real_total, uint64_t real_free, fracgpu::MemoryView *out) {
    const fracgpu::JobSettings &j = job().settings;
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
    *out = fracgpu::memory_view(j.memory_limit(real_total), real_total, 0, real_free);
    return true;
}

// The memory of `device` as the job sees it, written by `write` into the
// caller's struct (nvmlMemory_t or nvmlMemory_v2_t).
template <typename Memory, typename Write>
nvmlReturn_t memory_info(nvmlReturn_t (*real)(nvmlDevice_t, Memory *), nvmlDevice_t device, Memory *memory,
                         Write write) {
    if (!real) return missing();
    const Job &j = job();
    if (!j.valid) {
        if (!g_refusal_reported.exchange(true))
            log("%s; NVML memory queries are refused in this process, as CUDA is", j.error.c_str());
        return NVML_ERROR_NO_PERMISSION;
    }
    nvmlReturn_t rc = real(device, memory);
    fracgpu::MemoryView v;
    if (rc == NVML_SUCCESS && memory && job_view(device, memory->total, memory->free, &v)) write(v);
    return rc;
}

}  // namespace

// ---------------------------------------------------------------------------
// What the generated forwarders call
// ---------------------------------------------------------------------------
extern "C" void *fg_nvml_resolve(unsigned idx) { return g_nvml.forwarded(idx, fg_nvml_names); }

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
    return memory_info(REAL(nvmlDeviceGetMemoryInfo), device, memory, [&](const fracgpu::MemoryView &v) {
        memory->total = v.total;
        memory->used = v.used;
        memory->free = v.free;
    });
}

NVML_SHIM_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    return memory_info(REAL(nvmlDeviceGetMemoryInfo_v2), device, memory, [&](const fracgpu::MemoryView &v) {
        memory->total = v.total;
        memory->reserved = 0;   // the partition's limit is all the job has; nothing of it is set aside
        memory->used = v.used;
        memory->free = v.free;
    });
}

NVML_SHIM_API const char *nvmlErrorString(nvmlReturn_t result) {
    if (auto real = REAL(nvmlErrorString)) return real(result);
    const fracgpu::ErrorText *e = fracgpu::find_error(kErrors, (int)result);
    return e ? e->text : "Unknown Error";
}
