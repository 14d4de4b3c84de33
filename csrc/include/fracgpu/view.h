// The device's memory as a job sees it: the most its partition may hold as the
// total (its limit when it holds a promise; else what nobody was promised, see
// fracgpu::memory_ceiling in state.h), what the partition holds as used, and
// what is left of that (never more than the device really has free) as free.
//
// One rule, used by every surface that shows memory to a job: the CUDA shim's
// cuMemGetInfo_v2/cuDeviceTotalMem_v2 and the NVML shim's
// nvmlDeviceGetMemoryInfo/_v2 report the same numbers.
#pragma once

#include <cstdint>
#include <string>

namespace fracgpu {

struct MemoryView {
    uint64_t total = 0;   // the most the partition may hold (memory_ceiling), at most the device's memory
    uint64_t used = 0;    // bytes the partition holds, all its processes together
    uint64_t free = 0;    // min(the device's real free memory, total - used)
};

// ceiling: the most the partition may hold (memory_ceiling(); 0: nothing);
// device_total: the device's memory as the region records it
// (cuDeviceTotalMem_v2); used: the partition's counter; real_free: what the
// device itself reports free.
inline MemoryView memory_view(uint64_t ceiling, uint64_t device_total, uint64_t used, uint64_t real_free) {
    MemoryView v;
    v.total = ceiling < device_total ? ceiling : device_total;
    v.used = used;
    uint64_t left = used < v.total ? v.total - used : 0;
    v.free = left < real_free ? left : real_free;
    return v;
}

enum class ViewStatus {
    kFound,     // *out holds the partition's view
    kAbsent,    // no fracgpu state for this GPU, or no such partition on it: nothing to show
    kError,     // the state exists but cannot be read (damaged, unsafe): *err says why
};

// Reads partition `partition` of GPU `uuid` ("GPU-..." text) from its region
// under `state_dir`, never creating anything. With `reap`, slots of dead
// processes are freed first (as the CUDA shim does when asked for memory), so a
// killed job's memory stops counting. Never throws.
ViewStatus read_partition_memory(const std::string &state_dir, const std::string &uuid,
                                 const std::string &partition, uint64_t real_free, bool reap, MemoryView *out,
                                 std::string *err);

}  // namespace fracgpu
