// Linear device memory: cuMemAlloc, cuMemAllocPitch, cuMemAllocManaged and
// cuMemFree, each charged before the driver is called and given back after a
// successful free (quota.h's alloc_counted).
#include "quota.h"

using namespace shim;

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

