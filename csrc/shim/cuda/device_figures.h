// The device's own figures (device_figures.cpp): what NVML, the driver's
// management library, reports the device holds, read by context measurement
// (contexts.cpp) and by the reconciliation of the books (reconcile.cpp).
// Nothing here is on a hook's hot path: each read is an NVML call.
#pragma once

#include "process.h"

namespace shim {

// Whether NVML could be opened and lists the processes holding memory on a
// device (nvmlDeviceGetComputeRunningProcesses). Loads NVML on first use
// (once; a reason it cannot be used is said once on stderr).
bool device_lists_processes();

// What the device reports this process holds on binding b's GPU, in *out
// (0 when the device does not list the process: *listed says whether it
// does); false when NVML cannot say.
bool own_usage(Binding &b, uint64_t *out, bool *listed);

// The device's used memory beyond what every partition of the GPU has charged
// (signed: the books run ahead of the driver between a charge and its
// allocation), read until two reads in a row agree; false when NVML cannot say.
bool beyond_books(Binding &b, int64_t *out);

// The device's figure for this process on device ordinal `dev`, in *used:
// kListed; kNotListed when the device does not list the process (another pid
// namespace, or it holds nothing there); kCannotSay when NVML cannot be asked
// or `dev` is not bound.
enum class NvmlFigure { kListed, kNotListed, kCannotSay };
NvmlFigure device_figure(int dev, uint64_t *used);

}  // namespace shim
