// Virtual memory management: physical memory is charged at cuMemCreate and
// given back when the driver frees it, which is when the handle has no
// references left (cuMemCreate and each cuMemRetainAllocationHandle take one,
// each cuMemRelease drops one) and no mapping of it remains. CUDA's own
// samples release the handle right after cuMemMap: that frees nothing.
// Handles this process did not create (imported from another process) are
// not on its books: their creator's partition holds them. cuMemMap itself
// takes no memory.
#include "quota.h"

#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace shim {
namespace {

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

}  // namespace

void vmm_forget_after_fork() {
    new (&g_vmm.mu) std::mutex();
    g_vmm.handles.clear();
    g_vmm.mappings.clear();
}

}  // namespace shim

using namespace shim;

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

