// The memory quota: every device allocation path is charged to the job's
// partition before the driver is called, and uncharged on every release path,
// including memory dropped with its context.
//
// Check and charge is one atomic step on the partition's counter in the shared
// state (Region::charge): two processes can never pass the limit together.
// The shim remembers what it charged per allocation (by pointer, handle or
// array; VMM handles with their references and mappings, as the driver keeps them), so a release uncharges exactly that, and a destroyed context
// uncharges everything it owned.
#include "process.h"
#include "quota.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "fracgpu/real_library.h"
#include "fracgpu/state.h"
#include "fracgpu/view.h"

#include <cerrno>
#include <dlfcn.h>
#include <fcntl.h>
#include <memory>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace shim {
namespace {

constexpr uint64_t kReapIntervalNs = 100'000'000;   // cuMemGetInfo looks for dead jobs this often



// One line at most every kOomLogNs per device, however often a job is refused
// (an allocator that retries, a job that probes its limit).
constexpr uint64_t kOomLogNs = 10'000'000'000ull;

void report_oom(Binding &b, uint64_t requested) {
    uint64_t now = mono_ns(), last = b.oom_logged_ns.load(std::memory_order_relaxed);
    if ((last && now - last < kOomLogNs) || !b.oom_logged_ns.compare_exchange_strong(last, now)) {
        b.oom_unlogged.fetch_add(1, std::memory_order_relaxed);
        return;
    }
    uint64_t unlogged = b.oom_unlogged.exchange(0);
    const fracgpu::SharedProcess &p = b.region.raw()->processes[b.slot];
    const fracgpu::SharedPartition &part = b.region.raw()->partitions[p.partition];
    char more[96] = "";
    if (unlogged) snprintf(more, sizeof more, " (and %llu more refused since the last message)", (unsigned long long)unlogged);
    uint64_t limit = b.limit(), used = part.used.load();
    const fracgpu::LogFigure figures[] = {{"limit_bytes", limit}, {"used_bytes", used},
                                          {"requested_bytes", requested}, {"refused_unlogged", unlogged}};
    fracgpu::LogEvent event;
    event.event = "out-of-memory";
    event.level = "error";
    event.gpu = b.uuid.c_str();
    event.partition = part.name;
    event.figures = figures;
    event.figure_count = sizeof figures / sizeof figures[0];
    fracgpu::log_event(event, "out of memory in partition '%s' on %s: limit %s, in use %s, requested %s%s%s",
                       part.name, b.uuid.c_str(), size_text(limit).c_str(), size_text(used).c_str(),
                       size_text(requested).c_str(), settings().oom_wait_s > 0 ? " (waited FRACGPU_OOM_WAIT)" : "",
                       more);
}

CUresult charge(Binding *b, uint64_t bytes) {
    if (!b || bytes == 0) return CUDA_SUCCESS;
    if (g_bind_result != CUDA_SUCCESS) return g_bind_result;   // initialisation was refused
    if (!b->ok) {
        if (!b->oom_reported.exchange(true))
            log_event(kRefusedEvent, "%s: allocations on %s are refused", b->refusal.c_str(), b->uuid.c_str());
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (b->region.charge(b->slot, bytes)) return CUDA_SUCCESS;
    // Over quota. Memory of jobs that died is given back first, then, with
    // FRACGPU_OOM_WAIT, wait for others to free some.
    uint64_t deadline = mono_ns() + (uint64_t)(settings().oom_wait_s * 1e9);
    for (;;) {
        b->region.reap();
        reserve_settle();
        if (b->region.charge(b->slot, bytes)) return CUDA_SUCCESS;
        if (mono_ns() >= deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    b->region.note_refusal(b->slot);
    report_oom(*b, bytes);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

void uncharge(int dev, uint64_t bytes) {
    if (bytes == 0 || dev < 0 || dev >= g_ndev || !g_bound.load(std::memory_order_acquire)) return;
    if (g_bind[dev].ok) g_bind[dev].region.uncharge(g_bind[dev].slot, bytes);
}

// ---------------------------------------------------------------------------
// What was charged, per allocation
// ---------------------------------------------------------------------------
enum Kind { kPointer, kArray, kContext, kKinds };

struct Charge {
    uint64_t bytes;
    int dev;
    CUcontext ctx;     // released with this context (null: not tied to one)
};

struct Table {
    std::mutex mu;
    std::unordered_map<uint64_t, Charge> map;
};
Table *g_tables = new Table[kKinds];

void remember(Kind k, uint64_t key, const Charge &c) {
    std::lock_guard<std::mutex> lk(g_tables[k].mu);
    g_tables[k].map[key] = c;
}

// Forgets the charge of `key` and gives its bytes back.
void release(Kind k, uint64_t key) {
    Charge c{0, -1, nullptr};
    {
        std::lock_guard<std::mutex> lk(g_tables[k].mu);
        auto it = g_tables[k].map.find(key);
        if (it == g_tables[k].map.end()) return;
        c = it->second;
        g_tables[k].map.erase(it);
    }
    uncharge(c.dev, c.bytes);
}

// Everything a context owned, when the driver dropped it; its own
// reservation too unless keep_reservation.
void release_context(CUcontext ctx, bool keep_reservation) {
    reserve_release_context(ctx);
    for (int k = 0; k < kKinds; k++) {
        if (k == kContext && keep_reservation) continue;
        uint64_t freed[kMaxDevices] = {};
        {
            std::lock_guard<std::mutex> lk(g_tables[k].mu);
            for (auto it = g_tables[k].map.begin(); it != g_tables[k].map.end();) {
                if (it->second.ctx == ctx) {
                    if (it->second.dev >= 0 && it->second.dev < kMaxDevices) freed[it->second.dev] += it->second.bytes;
                    it = g_tables[k].map.erase(it);
                } else {
                    ++it;
                }
            }
        }
        for (int d = 0; d < kMaxDevices; d++) uncharge(d, freed[d]);
    }
}

struct Where {
    int dev = -1;
    CUcontext ctx = nullptr;
};

// The device and context an allocation made now belongs to.
Where current() {
    Where w;
    if (!g_bound.load(std::memory_order_acquire)) return w;   // nothing enforced: no extra driver calls
    CUdevice d;
    auto get_dev = REAL(cuCtxGetDevice);
    auto get_ctx = REAL(cuCtxGetCurrent);
    if (get_dev && get_dev(&d) == CUDA_SUCCESS) w.dev = d;
    if (get_ctx) get_ctx(&w.ctx);
    return w;
}

// The key an allocation is remembered by: the pointer or handle the call wrote.
template <typename T>
uint64_t key_of(T value) {
    if constexpr (std::is_pointer_v<T>) return reinterpret_cast<uint64_t>(value);
    else return static_cast<uint64_t>(value);
}

// The common shape of a counted allocation: charge, call, then remember the
// charge under the pointer or handle the call wrote to *out, or give it back.
template <typename T, typename Call>
CUresult alloc_counted(uint64_t bytes, Where w, Call call, Kind kind, T *out) {
    Binding *b = binding(w.dev);
    CUresult rc = charge(b, bytes);
    if (rc != CUDA_SUCCESS) return rc;
    rc = call();
    if (!b) return rc;
    if (rc != CUDA_SUCCESS) uncharge(w.dev, bytes);
    else remember(kind, key_of(*out), Charge{bytes, w.dev, w.ctx});
    return rc;
}

// Primary contexts: the driver's reference count, mirrored, so the last
// release drops what the context owned.
struct Primary {
    int refs = 0;
    CUcontext ctx = nullptr;
};
std::mutex g_primary_mu;
Primary g_primary[kMaxDevices];

// VMM handles this process created, with the driver's lifetime rules: the
// references and the mappings that keep a handle's physical memory alive.
// Touched only by the VMM calls (never on the launch path), under one lock.
struct VmmHandle {
    uint64_t bytes;
    int dev;
    int refs;        // cuMemCreate: 1; +1 per cuMemRetainAllocationHandle, -1 per cuMemRelease
    int mappings;    // live cuMemMap ranges of it
};
struct VmmMapping {
    uint64_t size;
    CUmemGenericAllocationHandle handle;
};
struct VmmBook {
    std::mutex mu;
    std::unordered_map<CUmemGenericAllocationHandle, VmmHandle> handles;
    std::map<CUdeviceptr, VmmMapping> mappings;   // by start address, for cuMemUnmap's ranges
};
VmmBook &g_vmm = *new VmmBook;

// Drops `it` from the books once nothing keeps its memory; returns what to
// give back (0 when it still lives). Caller holds g_vmm.mu.
uint64_t vmm_settle(std::unordered_map<CUmemGenericAllocationHandle, VmmHandle>::iterator it, int *dev) {
    if (it->second.refs > 0 || it->second.mappings > 0) return 0;
    uint64_t bytes = it->second.bytes;
    *dev = it->second.dev;
    g_vmm.handles.erase(it);
    return bytes;
}

void vmm_created(CUmemGenericAllocationHandle h, uint64_t bytes, int dev) {
    std::lock_guard<std::mutex> lk(g_vmm.mu);
    g_vmm.handles[h] = VmmHandle{bytes, dev, 1, 0};
}

// Only handles on the books count: an imported handle, or one the driver
// refused, changes nothing.
void vmm_retained(CUmemGenericAllocationHandle h) {
    std::lock_guard<std::mutex> lk(g_vmm.mu);
    auto it = g_vmm.handles.find(h);
    if (it != g_vmm.handles.end()) it->second.refs++;
}

void vmm_released(CUmemGenericAllocationHandle h) {
    uint64_t bytes = 0;
    int dev = -1;
    {
        std::lock_guard<std::mutex> lk(g_vmm.mu);
        auto it = g_vmm.handles.find(h);
        if (it == g_vmm.handles.end() || it->second.refs == 0) return;
        it->second.refs--;
        bytes = vmm_settle(it, &dev);
    }
    uncharge(dev, bytes);
}

void vmm_mapped(CUmemGenericAllocationHandle h, CUdeviceptr ptr, uint64_t size) {
    std::lock_guard<std::mutex> lk(g_vmm.mu);
    auto it = g_vmm.handles.find(h);
    if (it == g_vmm.handles.end()) return;
    it->second.mappings++;
    g_vmm.mappings[ptr] = VmmMapping{size, h};
}

// cuMemUnmap's range may cover several mappings: every one that starts in it goes.
void vmm_unmapped(CUdeviceptr ptr, uint64_t size) {
    uint64_t freed[kMaxDevices] = {};
    {
        std::lock_guard<std::mutex> lk(g_vmm.mu);
        auto m = g_vmm.mappings.lower_bound(ptr);
        while (m != g_vmm.mappings.end() && m->first - ptr < size) {
            auto it = g_vmm.handles.find(m->second.handle);
            m = g_vmm.mappings.erase(m);
            if (it == g_vmm.handles.end() || it->second.mappings == 0) continue;
            it->second.mappings--;
            int dev = -1;
            uint64_t bytes = vmm_settle(it, &dev);
            if (dev >= 0 && dev < kMaxDevices) freed[dev] += bytes;
        }
    }
    for (int d = 0; d < kMaxDevices; d++) uncharge(d, freed[d]);
}
void contexts_forget_after_fork();   // a child measures its own first context again

}  // namespace

void quota_forget_after_fork() {
    new (&g_primary_mu) std::mutex();
    for (int k = 0; k < kKinds; k++) {
        new (&g_tables[k].mu) std::mutex();
        g_tables[k].map.clear();
    }
    for (Primary &p : g_primary) p = Primary{};
    new (&g_vmm.mu) std::mutex();
    g_vmm.handles.clear();
    g_vmm.mappings.clear();
    reserve_forget_after_fork();
    graph_forget_after_fork();
    contexts_forget_after_fork();
    reconcile_forget_after_fork();
}

CUresult quota_charge(int dev, uint64_t bytes) { return charge(binding(dev), bytes); }
void quota_uncharge(int dev, uint64_t bytes) { uncharge(dev, bytes); }
bool quota_current(int *dev, CUcontext *ctx) {
    Where w = current();
    *dev = w.dev;
    *ctx = w.ctx;
    return binding(w.dev) != nullptr;
}

namespace {

uint64_t array_bytes(size_t w, size_t h, size_t d, unsigned channels, CUarray_format f) {
    size_t elem;
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: elem = 1; break;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: elem = 2; break;
    default: elem = 4; break;
    }
    return (uint64_t)w * (h ? h : 1) * (d ? d : 1) * (channels ? channels : 1) * elem;
}

}  // namespace

}  // namespace shim

using namespace shim;

// ---------------------------------------------------------------------------
// Linear device memory
// ---------------------------------------------------------------------------
SHIM_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    REAL_OR_RETURN(real, cuMemAlloc_v2);
    if (!dptr) return real(dptr, bytesize);
    return alloc_counted(bytesize, current(), [&] { return real(dptr, bytesize); }, kPointer, dptr);
}

SHIM_API CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    REAL_OR_RETURN(real, cuMemAlloc);
    if (!dptr) return real(dptr, bytesize);
    return alloc_counted(bytesize, current(), [&] { return real(dptr, bytesize); }, kPointer, dptr);
}

SHIM_API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    REAL_OR_RETURN(real, cuMemAllocManaged);
    if (!dptr) return real(dptr, bytesize, flags);
    return alloc_counted(bytesize, current(), [&] { return real(dptr, bytesize, flags); }, kPointer, dptr);
}

SHIM_API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t width, size_t height,
                                     unsigned int elem) {
    REAL_OR_RETURN(real, cuMemAllocPitch_v2);
    Where w = current();
    Binding *b = binding(w.dev);
    if (!b || !dptr || !pPitch) return real(dptr, pPitch, width, height, elem);
    // The pitch is known only after the call: charge the smallest aligned
    // estimate first, then settle on pitch x height.
    uint64_t estimate = ((width + 511) & ~(uint64_t)511) * height;
    CUresult rc = charge(b, estimate);
    if (rc != CUDA_SUCCESS) return rc;
    rc = real(dptr, pPitch, width, height, elem);
    if (rc != CUDA_SUCCESS) {
        uncharge(w.dev, estimate);
        return rc;
    }
    uint64_t actual = (uint64_t)*pPitch * height;
    if (actual > estimate && charge(b, actual - estimate) != CUDA_SUCCESS) {
        REAL_OR_RETURN(mem_free, cuMemFree_v2);
        mem_free(*dptr);
        uncharge(w.dev, estimate);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (actual < estimate) uncharge(w.dev, estimate - actual);
    remember(kPointer, *dptr, Charge{actual, w.dev, w.ctx});
    return CUDA_SUCCESS;
}

SHIM_API CUresult cuMemFree_v2(CUdeviceptr dptr) {
    REAL_OR_RETURN(real, cuMemFree_v2);
    CUresult rc = real(dptr);
    if (rc == CUDA_SUCCESS && dptr) release(kPointer, dptr);
    return rc;
}

SHIM_API CUresult cuMemFree(CUdeviceptr_v1 dptr) {
    REAL_OR_RETURN(real, cuMemFree);
    CUresult rc = real(dptr);
    if (rc == CUDA_SUCCESS && dptr) release(kPointer, dptr);
    return rc;
}

// ---------------------------------------------------------------------------
// Virtual memory management: physical memory is charged at cuMemCreate and
// given back when the driver frees it, which is when the handle has no
// references left (cuMemCreate and each cuMemRetainAllocationHandle take one,
// each cuMemRelease drops one) and no mapping of it remains. CUDA's own
// samples release the handle right after cuMemMap: that frees nothing.
// Handles this process did not create (imported from another process) are
// not on its books: their creator's partition holds them.
// ---------------------------------------------------------------------------
SHIM_API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                              unsigned long long flags) {
    REAL_OR_RETURN(real, cuMemCreate);
    if (!handle || !prop || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return real(handle, size, prop, flags);
    int dev = prop->location.id;   // physical memory outlives contexts
    Binding *b = binding(dev);
    CUresult rc = charge(b, size);
    if (rc != CUDA_SUCCESS) return rc;
    rc = real(handle, size, prop, flags);
    if (!b) return rc;
    if (rc != CUDA_SUCCESS) uncharge(dev, size);
    else vmm_created(*handle, size, dev);
    return rc;
}

SHIM_API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    REAL_OR_RETURN(real, cuMemRelease);
    CUresult rc = real(handle);
    if (rc == CUDA_SUCCESS) vmm_released(handle);
    return rc;
}

SHIM_API CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr) {
    REAL_OR_RETURN(real, cuMemRetainAllocationHandle);
    CUresult rc = real(handle, addr);
    if (rc == CUDA_SUCCESS && handle) vmm_retained(*handle);
    return rc;
}

SHIM_API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                           unsigned long long flags) {
    REAL_OR_RETURN(real, cuMemMap);
    CUresult rc = real(ptr, size, offset, handle, flags);
    if (rc == CUDA_SUCCESS) vmm_mapped(handle, ptr, size);
    return rc;
}

SHIM_API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    REAL_OR_RETURN(real, cuMemUnmap);
    CUresult rc = real(ptr, size);
    if (rc == CUDA_SUCCESS) vmm_unmapped(ptr, size);
    return rc;
}

// ---------------------------------------------------------------------------
// Arrays (textures and surfaces)
// ---------------------------------------------------------------------------
SHIM_API CUresult cuArrayCreate_v2(CUarray *h, const CUDA_ARRAY_DESCRIPTOR *d) {
    REAL_OR_RETURN(real, cuArrayCreate_v2);
    if (!h || !d) return real(h, d);
    uint64_t bytes = array_bytes(d->Width, d->Height, 1, d->NumChannels, d->Format);
    return alloc_counted(bytes, current(), [&] { return real(h, d); }, kArray, h);
}

SHIM_API CUresult cuArray3DCreate_v2(CUarray *h, const CUDA_ARRAY3D_DESCRIPTOR *d) {
    REAL_OR_RETURN(real, cuArray3DCreate_v2);
    if (!h || !d) return real(h, d);
    uint64_t bytes = array_bytes(d->Width, d->Height, d->Depth, d->NumChannels, d->Format);
    return alloc_counted(bytes, current(), [&] { return real(h, d); }, kArray, h);
}

SHIM_API CUresult cuArrayDestroy(CUarray h) {
    REAL_OR_RETURN(real, cuArrayDestroy);
    CUresult rc = real(h);
    if (rc == CUDA_SUCCESS) release(kArray, reinterpret_cast<uint64_t>(h));
    return rc;
}

SHIM_API CUresult cuMipmappedArrayCreate(CUmipmappedArray *h, const CUDA_ARRAY3D_DESCRIPTOR *d,
                                         unsigned int levels) {
    REAL_OR_RETURN(real, cuMipmappedArrayCreate);
    if (!h || !d) return real(h, d, levels);
    uint64_t bytes = 0;
    size_t w = d->Width, hh = d->Height, dd = d->Depth;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        bytes += array_bytes(w, hh, dd, d->NumChannels, d->Format);
        w = w > 1 ? w / 2 : 1;
        hh = hh > 1 ? hh / 2 : hh;
        dd = dd > 1 ? dd / 2 : dd;
    }
    return alloc_counted(bytes, current(), [&] { return real(h, d, levels); }, kArray, h);
}

SHIM_API CUresult cuMipmappedArrayDestroy(CUmipmappedArray h) {
    REAL_OR_RETURN(real, cuMipmappedArrayDestroy);
    CUresult rc = real(h);
    if (rc == CUDA_SUCCESS) release(kArray, reinterpret_cast<uint64_t>(h));
    return rc;
}

// ---------------------------------------------------------------------------
// Contexts: each one's own reservation is charged while it lives, and what it
// owned is given back when it goes. The context is inside the quota, as with
// MIG and MPS memory limits.
//
// What a context reserves is FRACGPU_CONTEXT_MEMORY when that is set, else
// measured, around the process's first context on the device. The device's
// own per-process figure comes first: how much what NVML reports this process
// holds on the device (nvmlDeviceGetComputeRunningProcesses, usedGpuMemory)
// grew. Neighbours cannot move it, whatever they allocate or free meanwhile.
// Where the device does not list this process (a container whose pid
// namespace is not the driver's, an NVML without the call), the figure is how
// much the memory the device uses beyond the books grew. "Beyond the books" is the
// device's used memory (NVML's nvmlDeviceGetMemoryInfo, which needs no
// context, unlike cuMemGetInfo) less what every partition of the GPU has
// charged, so what fracgpu's other jobs allocate or free meanwhile cancels
// out; each figure is read until two reads in a row agree, so one caught
// between a charge and its allocation is read again.
//
// The GPU's measurement lock (flock on its state file) keeps the fallback
// exact: a fallback measurement holds it exclusively, so no other job's
// context is being made meanwhile. A context measured by the device's own
// figure holds it shared, from before its creation until it is charged:
// jobs starting together wait for nobody but a fallback measurement in
// progress, and that waits until every context made meanwhile is in the
// books (so it cancels out). Whether the device lists this process can only
// be seen once it holds memory there: the context is made under the shared
// lock, and when the device then does not list the process it is destroyed
// and made again under the exclusive one. That namespace is remembered in the
// GPU's state (unlisted_pid_ns), so its later jobs go to the exclusive lock
// at once; a job of it that the device does list after all clears it.
//
// The first context of a process
// on a device is where the driver reserves the big block, so that figure is
// kept per device and charged again, before the call, for every later
// context of the process there. The first one is charged after it exists;
// when it does not fit, it is destroyed and its creation fails with
// CUDA_ERROR_OUT_OF_MEMORY.
//
// Limits of that fallback, said in the README: a process outside fracgpu
// allocating or freeing during the measurement moves the figure by what it did (allocating makes
// this job pay more, never a neighbour; freeing can make it pay less).
// Without NVML nothing can be measured: contexts are then charged nothing,
// said once on stderr, and FRACGPU_CONTEXT_MEMORY is the way to charge them.
// ---------------------------------------------------------------------------
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

// What every partition of the GPU has charged for allocations it saw (the
// drift charged by reconciliation is the device's figure, not the books').
uint64_t books(Binding &b) {
    const fracgpu::SharedRegion *r = b.region.raw();
    uint64_t sum = 0;
    for (const fracgpu::SharedPartition &p : r->partitions)
        if (p.in_use) sum += p.used.load(std::memory_order_acquire) - p.drift_charged.load(std::memory_order_acquire);
    return sum;
}

// The device's used memory beyond the books (signed: the books run ahead of
// the driver between a charge and its allocation), read until two reads in a
// row agree (at most a few tries); false when NVML cannot say.
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

// What the device reports this process holds on it (0 when it is not listed:
// *listed says whether it is); false when NVML cannot say.
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

// Holds the GPU's measurement lock (flock on its state file), shared
// (LOCK_SH) or exclusive (LOCK_EX), while it lives.
class MeasureLock {
  public:
    MeasureLock(const std::string &path, int mode) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
        while (fd_ >= 0 && flock(fd_, mode) != 0 && errno == EINTR) {
        }
    }
    ~MeasureLock() {
        if (fd_ >= 0) ::close(fd_);   // closing releases the lock
    }
    MeasureLock(const MeasureLock &) = delete;
    MeasureLock &operator=(const MeasureLock &) = delete;

  private:
    int fd_;
};

constexpr uint64_t kUnknown = UINT64_MAX;
std::mutex g_context_mu;                       // one context creation at a time (a measurement needs it)
uint64_t g_context_bytes[kMaxDevices];         // what a context of this process reserves on each device

void forget_context_sizes() {
    for (uint64_t &c : g_context_bytes) c = kUnknown;
}
const bool g_context_sizes_unknown = (forget_context_sizes(), true);

void contexts_forget_after_fork() {
    new (&g_context_mu) std::mutex();
    forget_context_sizes();
}

// This process's pid namespace: the inode of /proc/self/ns/pid (0: unknown).
uint64_t pid_namespace() {
    struct stat st {};
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

bool known_unlisted(const fracgpu::SharedRegion &r, uint64_t ns) {
    for (const auto &e : r.unlisted_pid_ns)
        if (ns && e.load(std::memory_order_relaxed) == ns) return true;
    return false;
}

// Remembers (or forgets) that the device does not list the processes of pid namespace `ns`.
void remember_unlisted(fracgpu::SharedRegion &r, uint64_t ns, bool unlisted) {
    if (!ns || known_unlisted(r, ns) == unlisted) return;
    for (auto &e : r.unlisted_pid_ns) {
        uint64_t expected = unlisted ? 0 : ns;
        if (e.compare_exchange_strong(expected, unlisted ? ns : 0)) return;
    }
    if (unlisted) r.unlisted_pid_ns[ns % std::size(r.unlisted_pid_ns)].store(ns);   // full: one makes way
}

// How a context was made and measured: `reserve` is its figure when `measured`.
struct Made {
    CUresult rc = CUDA_SUCCESS;
    bool measured = false;
    uint64_t reserve = 0;
    bool listed = false;     // the device lists the process (and measured it)
    bool unlisted = false;   // shared: not measured; the context is destroyed again
    bool said = false;       // ... and the device answered, without this process (not an NVML failure)
};

// Makes a context through `call` under the measurement lock held in `mode`
// and measures it: by the device's own figure for the process, or (exclusive
// lock only) by what the device uses beyond the books. Under the shared lock a
// context the device's figure cannot measure is destroyed again (unlisted).
template <typename Call, typename Undo>
Made made_measured(Binding *b, int mode, Call call, Undo undo) {
    Made m;
    uint64_t asked = mono_ns();
    MeasureLock lock(b->region.path(), mode);
    b->region.raw()->processes[b->slot].measure_wait_ns.fetch_add(mono_ns() - asked, std::memory_order_relaxed);
    const bool exclusive = mode == LOCK_EX;
    int64_t before = 0;
    uint64_t own_before = 0;
    bool listed = false;   // whether the device lists this process
    bool measure = exclusive && beyond_books(*b, &before);
    bool measure_own = own_usage(*b, &own_before, &listed);
    m.rc = call();
    if (m.rc != CUDA_SUCCESS) return m;
    int64_t after = 0;
    uint64_t own_after = 0;
    m.said = measure_own && own_usage(*b, &own_after, &listed);
    if (m.said && listed) {
        m.reserve = own_after > own_before ? own_after - own_before : 0;
        m.measured = m.listed = true;
    } else if (!exclusive) {
        undo();
        m.unlisted = true;
    } else if (measure && beyond_books(*b, &after)) {
        m.reserve = after > before ? (uint64_t)(after - before) : 0;
        m.measured = true;
    }
    if (m.measured && charge(b, m.reserve) != CUDA_SUCCESS) {   // charged under the lock: in the books
        undo();
        m.rc = CUDA_ERROR_OUT_OF_MEMORY;
        log("a CUDA context on %s reserves %s (measured), more than its partition has left: the context is "
            "destroyed and its creation fails", b->uuid.c_str(), size_text(m.reserve).c_str());
    }
    return m;
}

// Creates a context through `call` (which writes *pctx) and charges its
// reservation; `undo` destroys it again when that does not fit.
template <typename Call, typename Undo>
CUresult context_created(CUcontext *pctx, CUdevice dev, Call call, Undo undo) {
    Binding *b = binding(dev);
    if (!pctx || !b || dev >= kMaxDevices) return call();
    std::lock_guard<std::mutex> lk(g_context_mu);
    const Settings &s = settings();
    uint64_t known = s.has_context_memory ? s.context_memory : g_context_bytes[dev];
    uint64_t reserve = known == kUnknown ? 0 : known;
    if (known == kUnknown && b->ok) {
        nvml();   // loaded (once) before the lock: a fallback measurement makes every other first context wait
        fracgpu::SharedRegion &r = *b->region.raw();
        uint64_t ns = pid_namespace();
        Made m;
        m.unlisted = !nvml().processes || known_unlisted(r, ns);
        if (!m.unlisted) {
            m = made_measured(b, LOCK_SH, call, undo);
            if (m.unlisted && m.said) remember_unlisted(r, ns, true);
        }
        if (m.unlisted) {
            m = made_measured(b, LOCK_EX, call, undo);
            if (m.listed) remember_unlisted(r, ns, false);   // it is listed after all
        }
        if (m.rc != CUDA_SUCCESS) return m.rc;
        if (m.measured) g_context_bytes[dev] = m.reserve;
        reserve = m.measured ? m.reserve : 0;
    } else {
        CUresult rc = charge(b, reserve);   // known: charged before the call, as an allocation is
        if (rc != CUDA_SUCCESS) {
            log("a CUDA context on %s reserves %s (%s), more than its partition has left: the context is not "
                "created", b->uuid.c_str(), size_text(reserve).c_str(),
                s.has_context_memory ? "FRACGPU_CONTEXT_MEMORY" : "measured");
            return rc;
        }
        rc = call();
        if (rc != CUDA_SUCCESS) {
            uncharge(dev, reserve);
            return rc;
        }
    }
    if (reserve) remember(kContext, reinterpret_cast<uint64_t>(*pctx), Charge{reserve, dev, *pctx});
    reconcile_start();   // the process holds memory on the device now: check the books against it
    return CUDA_SUCCESS;
}
}  // namespace

NvmlFigure quota_device_figure(int dev, uint64_t *used) {
    Binding *b = binding(dev);
    if (!b || !b->ok) return NvmlFigure::kCannotSay;
    bool listed = false;
    if (!own_usage(*b, used, &listed)) return NvmlFigure::kCannotSay;
    return listed ? NvmlFigure::kListed : NvmlFigure::kNotListed;
}

std::unique_lock<std::mutex> quota_no_context_creation() { return std::unique_lock<std::mutex>(g_context_mu); }
}  // namespace shim

namespace {
// A context just created that does not fit in the quota goes again.
void destroy_created(CUcontext ctx) {
    if (auto destroy = REAL(cuCtxDestroy_v2)) destroy(ctx);
}
}  // namespace

SHIM_API CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v4);
    return context_created(pctx, dev, [&] { return real(pctx, params, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *p, int n, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v3);
    return context_created(pctx, dev, [&] { return real(pctx, p, n, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v2);
    return context_created(pctx, dev, [&] { return real(pctx, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate);
    return context_created(pctx, dev, [&] { return real(pctx, flags, dev); }, [&] { destroy_created(*pctx); });
}

SHIM_API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    REAL_OR_RETURN(real, cuCtxDestroy_v2);
    CUresult rc = real(ctx);
    if (rc == CUDA_SUCCESS) release_context(ctx, false);
    return rc;
}
SHIM_API CUresult cuCtxDestroy(CUcontext ctx) {
    REAL_OR_RETURN(real, cuCtxDestroy);
    CUresult rc = real(ctx);
    if (rc == CUDA_SUCCESS) release_context(ctx, false);
    return rc;
}

SHIM_API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    REAL_OR_RETURN(real, cuDevicePrimaryCtxRetain);
    if (!pctx || dev < 0 || dev >= kMaxDevices) return real(pctx, dev);
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    CUresult rc = p.refs > 0 ? real(pctx, dev)
                             : context_created(pctx, dev, [&] { return real(pctx, dev); }, [&] {
                                   if (auto release = REAL(cuDevicePrimaryCtxRelease_v2)) release(dev);
                               });
    if (rc == CUDA_SUCCESS) {
        p.refs++;
        p.ctx = *pctx;
    }
    return rc;
}

namespace {
CUresult primary_release(CUdevice dev, CUresult rc) {
    if (rc != CUDA_SUCCESS || dev < 0 || dev >= kMaxDevices) return rc;
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    if (p.refs > 0 && --p.refs == 0) release_context(p.ctx, false);
    return rc;
}
CUresult primary_reset(CUdevice dev, CUresult rc) {
    if (rc != CUDA_SUCCESS || dev < 0 || dev >= kMaxDevices) return rc;
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    if (p.refs > 0) release_context(p.ctx, true);   // its memory goes; the retained context stays
    return rc;
}
}  // namespace

// Release and reset, both versions: the real call, then what it dropped.
#define PRIMARY_HOOK(fn, after)                \
    SHIM_API CUresult fn(CUdevice dev) {       \
        REAL_OR_RETURN(real, fn);              \
        return after(dev, real(dev));          \
    }
PRIMARY_HOOK(cuDevicePrimaryCtxRelease_v2, primary_release)
PRIMARY_HOOK(cuDevicePrimaryCtxRelease, primary_release)
PRIMARY_HOOK(cuDevicePrimaryCtxReset_v2, primary_reset)
PRIMARY_HOOK(cuDevicePrimaryCtxReset, primary_reset)
#undef PRIMARY_HOOK

// ---------------------------------------------------------------------------
// The quota shown as the device's memory
// ---------------------------------------------------------------------------
namespace {
// free/total as the job should see them on device `dev`; false: not governed.
bool virtual_meminfo(int dev, uint64_t real_free, uint64_t *free_out, uint64_t *total_out) {
    Binding *b = binding(dev);
    if (!b || !b->ok) return false;
    reserve_settle();   // what pools released at a synchronize
    uint64_t now = mono_ns();
    uint64_t last = b->last_reap_ns.load(std::memory_order_relaxed);
    if (now - last > kReapIntervalNs && b->last_reap_ns.compare_exchange_strong(last, now)) b->region.reap();
    const fracgpu::SharedRegion *r = b->region.raw();
    uint64_t used = r->partitions[r->processes[b->slot].partition].used.load(std::memory_order_relaxed);
    fracgpu::MemoryView v = fracgpu::memory_view(b->limit(), b->region.total_memory(), used, real_free);   // as NVML shows it
    *free_out = v.free;
    *total_out = v.total;
    return true;
}
}  // namespace

SHIM_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    REAL_OR_RETURN(real, cuMemGetInfo_v2);
    CUresult rc = real(free_bytes, total);
    uint64_t f, t;
    if (rc == CUDA_SUCCESS && free_bytes && total && virtual_meminfo(current().dev, *free_bytes, &f, &t)) {
        *free_bytes = f;
        *total = t;
    }
    return rc;
}

SHIM_API CUresult cuMemGetInfo(unsigned int *free_bytes, unsigned int *total) {
    REAL_OR_RETURN(real, cuMemGetInfo);
    CUresult rc = real(free_bytes, total);
    uint64_t f, t;
    if (rc == CUDA_SUCCESS && free_bytes && total && virtual_meminfo(current().dev, *free_bytes, &f, &t)) {
        *free_bytes = (unsigned)(f > 0xffffffffu ? 0xffffffffu : f);
        *total = (unsigned)(t > 0xffffffffu ? 0xffffffffu : t);
    }
    return rc;
}

SHIM_API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    REAL_OR_RETURN(real, cuDeviceTotalMem_v2);
    CUresult rc = real(bytes, dev);
    Binding *b = binding(dev);
    if (rc == CUDA_SUCCESS && bytes && b && b->ok) *bytes = b->limit();
    return rc;
}

SHIM_API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    REAL_OR_RETURN(real, cuDeviceTotalMem);
    CUresult rc = real(bytes, dev);
    Binding *b = binding(dev);
    if (rc == CUDA_SUCCESS && bytes && b && b->ok) *bytes = (unsigned)(b->limit() > 0xffffffffu ? 0xffffffffu : b->limit());
    return rc;
}
