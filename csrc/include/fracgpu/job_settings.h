// A job's settings as both shims read them: FRACGPU_PARTITION and what the
// job asks of its partition (FRACGPU_MEMORY, FRACGPU_COMPUTE, ...), parsed
// once, by one function, from the settings table (fracgpu/settings.h) and the
// node's configuration file (fracgpu/node_config.h), which wins over the environment.
//
// The driver shim refuses CUDA in a process whose settings do not parse (no
// job runs without its limits); the NVML shim refuses memory queries there
// with the same reason, so the two never disagree about the quota.
#pragma once

#include <cstdint>
#include <string>

#include "fracgpu/settings.h"

namespace fracgpu {

struct JobSettings {
    bool enforce = false;          // FRACGPU_PARTITION is set
    std::string partition;
    // FRACGPU_MEMORY / FRACGPU_COMPUTE / FRACGPU_PRIORITY: the partition is private to this job
    // and made on demand with these settings.
    bool ephemeral = false;
    bool has_memory = false;
    uint64_t memory_bytes = 0;     // limit
    double memory_fraction = 0;    // ... or this fraction of each device
    double compute_share = 0;      // FRACGPU_COMPUTE, (0, 1]; 0: none
    bool compute_cap = false;      // FRACGPU_COMPUTE_CAP=1: the share is also a ceiling
    // FRACGPU_PRIORITY: FRACGPU_PRIORITY_LOW/NORMAL/HIGH (fracgpu/units.h)
    int priority = (int)fracgpu_setting_default(FRACGPU_SETTING_PRIORITY).number;
    bool overcommit = false;       // FRACGPU_OVERCOMMIT=1: a limit or share past what is left is accepted,
                                   // best effort
    std::string state_dir;
    double oom_wait_s = fracgpu_setting_default(FRACGPU_SETTING_OOM_WAIT).real;
    // FRACGPU_RECONCILE_INTERVAL (0: the books are not checked against the device)
    double reconcile_interval_s = fracgpu_setting_default(FRACGPU_SETTING_RECONCILE_INTERVAL).real;
    uint64_t context_memory = 0;   // FRACGPU_CONTEXT_MEMORY: charged per context
    bool has_context_memory = false;   // it is set (else each context's reservation is measured)
    int holder = 0;                // FRACGPU_JOB_HOLDER: the pid recording this job (fracgpu run)
    // Non-empty when the node's configuration file overrode variables of the
    // environment: the one line to say so (fracgpu/node_config.h).
    std::string notice;

    // FRACGPU_MEMORY's limit on a device of `device_total` bytes (0: none asked).
    uint64_t memory_limit(uint64_t device_total) const {
        if (!has_memory) return 0;
        return memory_fraction > 0 ? (uint64_t)((double)device_total * memory_fraction) : memory_bytes;
    }
};

// Reads this process's settings into *out. False with *err saying which
// setting is wrong and why ("FRACGPU_MEMORY='4XB' is not valid: ..."). Never throws.
bool read_job_settings(JobSettings *out, std::string *err);

}  // namespace fracgpu
