// The memory quota's books (quota.cpp), as the reservation hooks of
// reserve.cpp use them.
#pragma once

#include "shim.h"

#include <mutex>

namespace shim {

// Check-and-charge `bytes` to the partition of device `dev` (as every
// allocation hook does: over quota, dead jobs are reaped, pools settled and
// FRACGPU_OOM_WAIT waited first). CUDA_SUCCESS, also when nothing is enforced
// on `dev`; CUDA_ERROR_OUT_OF_MEMORY when it does not fit.
CUresult quota_charge(int dev, uint64_t bytes);
void quota_uncharge(int dev, uint64_t bytes);
// The device and context an allocation made now belongs to; false (and
// nothing asked of the driver) when nothing is enforced in this process.
bool quota_current(int *dev, CUcontext *ctx);

// What the device (NVML, nvmlDeviceGetComputeRunningProcesses) reports this
// process holds on device `dev`, in *used: kListed; kNotListed when the
// device does not list the process (another pid namespace, or it holds
// nothing there); kCannotSay when NVML cannot be asked or `dev` is not bound.
enum class NvmlFigure { kListed, kNotListed, kCannotSay };
NvmlFigure quota_device_figure(int dev, uint64_t *used);
// While the lock lives no context is being created in this process: the
// books are not behind the device by a context that exists but is not yet
// charged (its size is measured after it is made).
std::unique_lock<std::mutex> quota_no_context_creation();

// reconcile.cpp, called by quota.cpp:
// The process has a context: start checking the books against the device
// (once; a no-op after the first call, and with FRACGPU_RECONCILE_INTERVAL=0).
void reconcile_start();
void reconcile_forget_after_fork();

// reserve.cpp, called by quota.cpp:
// The driver dropped `ctx`: give back the limits it reserved, and settle the
// pools its allocations were in.
void reserve_release_context(CUcontext ctx);
// Give back what pools no longer reserve (they release at synchronize, which
// the shim does not hook): before a refusal and when the job asks cuMemGetInfo.
void reserve_settle();
// In a forked child: the parent's tables and locks are not the child's.
void reserve_forget_after_fork();

}  // namespace shim
