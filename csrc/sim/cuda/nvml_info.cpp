// What the simulated NVML reports: see nvml_info.h.
//
// NVML must not initialise CUDA in the process (a real one does not: a job
// that asks NVML first and forks later still has CUDA in the child). So when
// this process has not called cuInit, the simulated GPU's shared file is
// attached here, with the settings cuInit would read, without touching the
// driver's state. A later cuInit attaches again, taking a new process slot;
// the first one holds no memory and is reaped once the process is gone.
#include "nvml_info.h"

#include "sim.h"

#include <cstdio>
#include <unistd.h>

namespace sim {
namespace {

Config &g_nvml_cfg = *new Config;   // the settings of the attach made here (never destroyed, as g_cfg)
pid_t g_nvml_pid = 0;               // the process that made it (a forked child attaches anew)
bool g_nvml_failed = false;

// The settings of the attached simulated GPU, or null (callers hold g_mu).
const Config *attached() {
    if (initialized()) return &g_cfg;
    if (g_nvml_pid == getpid()) return &g_nvml_cfg;
    if (g_nvml_failed && g_nvml_pid == -getpid()) return nullptr;   // said why once already
    if (load_config(g_nvml_cfg) != CUDA_SUCCESS || shared_attach(g_nvml_cfg) != CUDA_SUCCESS) {
        g_nvml_failed = true;
        g_nvml_pid = -getpid();
        return nullptr;
    }
    g_nvml_failed = false;
    g_nvml_pid = getpid();
    return &g_nvml_cfg;
}

}  // namespace
}  // namespace sim

using namespace sim;

SIM_API int fracgpu_sim_device_info(int index, char *uuid, size_t uuid_len, char *name, size_t name_len,
                                    unsigned long long *total, unsigned long long *used) {
    std::lock_guard<std::mutex> lk(g_mu);
    const Config *cfg = attached();
    if (!cfg) return -1;
    if (index < 0 || index >= cfg->devices) return cfg->devices;
    if (uuid && uuid_len) snprintf(uuid, uuid_len, "%s", uuid_text(device_uuid(index)).c_str());
    if (name && name_len) snprintf(name, name_len, "%s", cfg->name.c_str());
    if (total) *total = cfg->memory;
    if (used) *used = mem_used(index);
    return cfg->devices;
}

SIM_API int fracgpu_sim_device_processes(int index, unsigned *pids, unsigned long long *used, unsigned cap) {
    std::lock_guard<std::mutex> lk(g_mu);
    const Config *cfg = attached();
    if (!cfg || index < 0 || index >= cfg->devices) return -1;
    if (cap && (!pids || !used)) return -1;
    return mem_processes(index, pids, used, cap);
}
