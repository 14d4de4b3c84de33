// Interposition: the cuGetProcAddress swap.
//
// Clients that resolve entry points through cuGetProcAddress (cudart, so
// PyTorch, CuPy and JAX; cuda-bindings; numba) get the real driver's pointers
// from the real cuGetProcAddress. Each returned pointer is swapped **by
// address** for the wrapper of the function it points to: one name at another
// version or with the per-thread flag is another function (cuCtxCreate at 2000
// is not cuCtxCreate_v4), and only the address tells them apart reliably.
//
// This file is the only place that lists every wrapper.
#include "shim.h"

#include <dlfcn.h>
#include <mutex>

#define HOOKS(X)                                                                          \
    X(cuInit) X(cuGetProcAddress) X(cuGetProcAddress_v2)                                  \
    X(cuMemAlloc) X(cuMemAlloc_v2) X(cuMemAllocManaged) X(cuMemAllocPitch_v2)              \
    X(cuMemFree) X(cuMemFree_v2)                                                          \
    X(cuMemAllocAsync) X(cuMemAllocAsync_ptsz) X(cuMemAllocFromPoolAsync)                 \
    X(cuMemAllocFromPoolAsync_ptsz) X(cuMemFreeAsync) X(cuMemFreeAsync_ptsz)              \
    X(cuMemCreate) X(cuMemRelease)                                                        \
    X(cuMemMap) X(cuMemUnmap) X(cuMemRetainAllocationHandle)                              \
    X(cuArrayCreate_v2) X(cuArray3DCreate_v2) X(cuArrayDestroy)                           \
    X(cuMipmappedArrayCreate) X(cuMipmappedArrayDestroy)                                  \
    X(cuCtxCreate) X(cuCtxCreate_v2) X(cuCtxCreate_v3) X(cuCtxCreate_v4)                  \
    X(cuCtxDestroy) X(cuCtxDestroy_v2)                                                    \
    X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease)                              \
    X(cuDevicePrimaryCtxRelease_v2) X(cuDevicePrimaryCtxReset)                            \
    X(cuDevicePrimaryCtxReset_v2)                                                         \
    X(cuMemGetInfo) X(cuMemGetInfo_v2) X(cuDeviceTotalMem) X(cuDeviceTotalMem_v2)          \
    X(cuLaunchKernel) X(cuLaunchKernel_ptsz) X(cuLaunchKernelEx) X(cuLaunchKernelEx_ptsz)  \
    X(cuLaunchCooperativeKernel) X(cuLaunchCooperativeKernel_ptsz)                        \
    X(cuGraphLaunch) X(cuGraphLaunch_ptsz)                                                \
    X(cuGraphInstantiate_v2) X(cuGraphInstantiateWithFlags) X(cuGraphInstantiateWithParams) \
    X(cuGraphInstantiateWithParams_ptsz) X(cuGraphUpload) X(cuGraphUpload_ptsz)           \
    X(cuGraphExecDestroy) X(cuDeviceGraphMemTrim)                                         \
    X(cuCtxSetLimit) X(cuMemPoolTrimTo) X(cuMemPoolDestroy)                               \
    X(cuCtxSynchronize) X(cuCtxSynchronize_v2) X(cuStreamSynchronize)                     \
    X(cuStreamSynchronize_ptsz) X(cuEventSynchronize)                                    \
    X(cuModuleLoad) X(cuModuleLoadData) X(cuModuleLoadDataEx) X(cuModuleLoadFatBinary)    \
    X(cuModuleUnload) X(cuLibraryLoadData) X(cuLibraryLoadFromFile) X(cuLibraryUnload)

namespace {

struct Hook {
    const char *name;
    void *wrapper;
    void *real;   // the real driver's function of that name (null when it has none)
};

#define HOOK_ENTRY(fn) {#fn, reinterpret_cast<void *>(&fn), nullptr},
Hook g_hooks[] = {HOOKS(HOOK_ENTRY)};
#undef HOOK_ENTRY
std::once_flag g_hooks_once;

void resolve_hooks() {
    for (Hook &h : g_hooks) h.real = dlsym(shim::real_handle(), h.name);
}

// The wrapper for a real entry point, or the pointer itself when not hooked.
void *swap(void *fn) {
    if (!fn) return fn;
    std::call_once(g_hooks_once, resolve_hooks);
    for (const Hook &h : g_hooks)
        if (h.real == fn) return h.wrapper;
    return fn;
}

}  // namespace

SHIM_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                                      CUdriverProcAddressQueryResult *symbolStatus) {
    REAL_OR_RETURN(real, cuGetProcAddress_v2);
    CUresult rc = real(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (rc == CUDA_SUCCESS && pfn) *pfn = swap(*pfn);
    return rc;
}

SHIM_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags) {
    REAL_OR_RETURN(real, cuGetProcAddress);
    CUresult rc = real(symbol, pfn, cudaVersion, flags);
    if (rc == CUDA_SUCCESS && pfn) *pfn = swap(*pfn);
    return rc;
}
