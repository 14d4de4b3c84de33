// The memory quota's books (quota.cpp), as the hooks of every allocation
// family use them: linear memory (memory_linear.cpp), VMM (memory_vmm.cpp),
// arrays (memory_arrays.cpp), pools and stream-ordered allocation
// (memory_pools.cpp), modules and limits (modules_limits.cpp), contexts
// (contexts.cpp) and graph memory (graphs.cpp).
#pragma once

#include "process.h"

#include <mutex>
#include <type_traits>

namespace shim {

// Check-and-charge `bytes` to the partition of binding `b` (as every
// allocation hook does: over quota, dead jobs are reaped, pools settled and
// FRACGPU_OOM_WAIT waited first). CUDA_SUCCESS, also when b is null (nothing
// enforced); CUDA_ERROR_OUT_OF_MEMORY when it does not fit.
CUresult charge(Binding *b, uint64_t bytes);
void uncharge(int dev, uint64_t bytes);
// The same, by device ordinal.
CUresult quota_charge(int dev, uint64_t bytes);
void quota_uncharge(int dev, uint64_t bytes);
// The device and context an allocation made now belongs to; false (and
// nothing asked of the driver) when nothing is enforced in this process.
bool quota_current(int *dev, CUcontext *ctx);

struct Where {
    int dev = -1;
    CUcontext ctx = nullptr;
};
// The device and context an allocation made now belongs to (dev -1 when
// nothing is enforced: no driver call then).
Where current();

// What was charged, per allocation: by pointer, array or context handle.
enum Kind { kPointer, kArray, kContext, kKinds };
struct Charge {
    uint64_t bytes;
    int dev;
    CUcontext ctx;     // released with this context (null: not tied to one)
};
void remember(Kind k, uint64_t key, const Charge &c);
// Forgets the charge of `key` and gives its bytes back.
void release(Kind k, uint64_t key);
// Everything a context owned, when the driver dropped it; its own
// reservation too unless keep_reservation.
void release_context(CUcontext ctx, bool keep_reservation);

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

// contexts.cpp: while the lock lives no context is being created in this
// process, so the books are not behind the device by a context that exists
// but is not yet settled.
std::unique_lock<std::mutex> quota_no_context_creation();

// reconcile.cpp: the process has a context: start checking the books against
// the device (once; a no-op after the first call, and with
// FRACGPU_RECONCILE_INTERVAL=0).
void reconcile_start();

// What a dropped context took with it, beyond the allocations on the books
// here: the limits it reserved and the modules it loaded
// (modules_limits.cpp), the pools its allocations were in (memory_pools.cpp).
// Each adds what to give back, per device, to `back`.
void limits_modules_release_context(CUcontext ctx, uint64_t (&back)[kMaxDevices]);
void pools_release_context(CUcontext ctx, uint64_t (&back)[kMaxDevices]);
// Give back what pools no longer reserve (they release at synchronize, which
// the shim does not hook): before a refusal and when the job asks cuMemGetInfo.
void pools_settle();

// In a forked child, each family's tables and locks are not the child's.
void contexts_forget_after_fork();
void vmm_forget_after_fork();
void pools_forget_after_fork();
void limits_modules_forget_after_fork();
void reconcile_forget_after_fork();

}  // namespace shim
