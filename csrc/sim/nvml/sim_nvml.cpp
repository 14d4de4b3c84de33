// The simulated GPU's NVML: a libnvidia-ml.so.1 installed next to the
// simulated libcuda.so.1 (fracgpu/_sim), so that with that folder on
// LD_LIBRARY_PATH NVML clients see the simulated devices, as NVML on a real
// machine sees the real ones.
//
// It knows nothing of the simulator but one function the simulated
// libcuda.so.1 exports for it (fracgpu_sim_device_info, csrc/sim/nvml_info.h):
// the libcuda.so.1 of its own folder is opened by absolute path (the very
// object the process already uses for CUDA, when it does) and asked.
//
// Implemented: initialisation and shutdown (reference counted), error
// strings, driver and CUDA versions and the driver branch, device count,
// handles by index and by UUID, UUID, name, index, PCI location (the bus
// the simulated driver reports), memory (total = the simulated memory, used =
// what all processes hold on the device, free = the rest), and the compute
// processes on a device with what each holds (usedGpuMemory, from the
// simulated device's own accounting, contexts included; no graphics
// processes, MPS or MIG). Every other NVML
// function is a generated stub answering NVML_ERROR_NOT_SUPPORTED.
// Like a real NVML, it indexes every device: CUDA_VISIBLE_DEVICES does not
// apply to it.
#ifndef NVML_NO_UNVERSIONED_FUNC_DEFS
#define NVML_NO_UNVERSIONED_FUNC_DEFS   // both nvmlInit and nvmlInit_v2, and so on
#endif
#include <nvml.h>

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <mutex>
#include <string>

#include "nvml_info.h"
#include "fracgpu/error_text.h"
#include "fracgpu/settings.h"

#define SIM_NVML_API extern "C" __attribute__((visibility("default")))

// The handles NVML gives out: one per device, never freed.
struct nvmlDevice_st {
    unsigned index;
};

namespace {

constexpr unsigned kMaxDevices = FRACGPU_SIM_MAX_DEVICES;
// The driver branch CUDA 13.0 came with; the simulated driver reports the
// CUDA version of the headers it was built with.
constexpr const char *kDriverVersion = "580.0.0";

std::mutex g_mu;
int g_refs = 0;                          // nvmlInit calls not yet shut down
void *g_cuda = nullptr;                  // the simulated libcuda.so.1 (never closed)
fracgpu_sim_device_info_fn g_info = nullptr;
fracgpu_sim_device_processes_fn g_processes = nullptr;
unsigned g_count = 0;
nvmlDevice_st g_devices[kMaxDevices];

const fracgpu::ErrorText kErrors[] = {
#define NVML_ERROR_ENTRY(code, name, text) {code, name, text},
#include "nvml_errors.inc"
#undef NVML_ERROR_ENTRY
};

// Opens the libcuda.so.1 next to this library (once) and asks it for the
// device count. Callers hold g_mu.
nvmlReturn_t attach() {
    if (!g_info) {
        Dl_info self;
        if (!dladdr(reinterpret_cast<void *>(&attach), &self) || !self.dli_fname) return NVML_ERROR_LIBRARY_NOT_FOUND;
        std::string path = self.dli_fname;
        size_t slash = path.rfind('/');
        path = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) + "/libcuda.so.1";
        void *h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            const char *e = dlerror();
            fprintf(stderr, "fracgpu-sim: NVML cannot load the simulated driver %s: %s\n", path.c_str(),
                    e ? e : "unknown error");
            return NVML_ERROR_DRIVER_NOT_LOADED;
        }
        auto info = reinterpret_cast<fracgpu_sim_device_info_fn>(dlsym(h, "fracgpu_sim_device_info"));
        if (!info) {
            fprintf(stderr, "fracgpu-sim: %s is not fracgpu's simulated driver (no fracgpu_sim_device_info)\n",
                    path.c_str());
            dlclose(h);
            return NVML_ERROR_DRIVER_NOT_LOADED;
        }
        g_cuda = h;
        g_info = info;
        g_processes = reinterpret_cast<fracgpu_sim_device_processes_fn>(dlsym(h, "fracgpu_sim_device_processes"));
    }
    int n = g_info(-1, nullptr, 0, nullptr, 0, nullptr, nullptr);
    if (n < 0) return NVML_ERROR_DRIVER_NOT_LOADED;   // the simulator said why on stderr
    g_count = (unsigned)n < kMaxDevices ? (unsigned)n : kMaxDevices;
    for (unsigned i = 0; i < g_count; i++) g_devices[i].index = i;
    return NVML_SUCCESS;
}

bool ready() {
    std::lock_guard<std::mutex> lk(g_mu);
    return g_refs > 0;
}

// The device of a handle, or an error.
nvmlReturn_t device_index(nvmlDevice_t device, unsigned *index) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (!device || device < g_devices || device >= g_devices + g_count) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

struct DeviceInfo {
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = "";
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE] = "";
    unsigned long long total = 0, used = 0;
};

nvmlReturn_t device_info(nvmlDevice_t device, DeviceInfo *out) {
    unsigned index;
    nvmlReturn_t rc = device_index(device, &index);
    if (rc != NVML_SUCCESS) return rc;
    if (g_info((int)index, out->uuid, sizeof out->uuid, out->name, sizeof out->name, &out->total, &out->used) <= (int)index)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

nvmlReturn_t copy_text(const char *text, char *buf, unsigned length) {
    if (!buf) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

}  // namespace

// ---------------------------------------------------------------------------
// Initialisation
// ---------------------------------------------------------------------------
SIM_NVML_API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    std::lock_guard<std::mutex> lk(g_mu);
    nvmlReturn_t rc = attach();
    if (rc != NVML_SUCCESS) return rc;
    if (g_count == 0 && !(flags & NVML_INIT_FLAG_NO_GPUS)) return NVML_ERROR_GPU_NOT_FOUND;
    g_refs++;
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
SIM_NVML_API nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

SIM_NVML_API nvmlReturn_t nvmlShutdown(void) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (g_refs == 0) return NVML_ERROR_UNINITIALIZED;
    g_refs--;
    return NVML_SUCCESS;
}

SIM_NVML_API const char *nvmlErrorString(nvmlReturn_t result) {
    const fracgpu::ErrorText *e = fracgpu::find_error(kErrors, (int)result);
    return e ? e->text : "Unknown Error";
}

// ---------------------------------------------------------------------------
// System
// ---------------------------------------------------------------------------
SIM_NVML_API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    return copy_text(kDriverVersion, version, length);
}

// The branch of kDriverVersion, as NVML names it: "r580_00" for 580.0.0.
SIM_NVML_API nvmlReturn_t nvmlSystemGetDriverBranch(nvmlSystemDriverBranchInfo_t *branchInfo, unsigned int length) {
    if (!branchInfo) return NVML_ERROR_INVALID_ARGUMENT;
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (branchInfo->version != nvmlSystemDriverBranchInfo_v1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned major = 0, minor = 0;
    sscanf(kDriverVersion, "%u.%u", &major, &minor);
    char branch[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    snprintf(branch, sizeof branch, "r%u_%02u", major, minor);
    unsigned room = length < sizeof branchInfo->branch ? length : (unsigned)sizeof branchInfo->branch;
    return copy_text(branch, branchInfo->branch, room);
}

SIM_NVML_API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    typedef int (*get_version_fn)(int *);
    auto get = reinterpret_cast<get_version_fn>(dlsym(g_cuda, "cuDriverGetVersion"));
    if (!get || get(version) != 0) return NVML_ERROR_UNKNOWN;
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    return nvmlSystemGetCudaDriverVersion_v2(version);
}

// ---------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------
SIM_NVML_API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    *count = g_count;
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

SIM_NVML_API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    if (index >= g_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_devices[index];
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    if (!ready()) return NVML_ERROR_UNINITIALIZED;
    for (unsigned i = 0; i < g_count; i++) {
        DeviceInfo info;
        if (device_info(&g_devices[i], &info) == NVML_SUCCESS && strcmp(info.uuid, uuid) == 0) {
            *device = &g_devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    DeviceInfo info;
    nvmlReturn_t rc = device_info(device, &info);
    return rc != NVML_SUCCESS ? rc : copy_text(info.uuid, uuid, length);
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DeviceInfo info;
    nvmlReturn_t rc = device_info(device, &info);
    return rc != NVML_SUCCESS ? rc : copy_text(info.name, name, length);
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    return device_index(device, index);
}

// Where the device sits on the PCI bus: the bus the simulated driver's cuDeviceGetPCIBusId reports
// (nvml_info.h), as NVML formats it. Its PCI ids are NVIDIA's vendor id (0x10DE) with device id 0,
// which no real GPU has.
SIM_NVML_API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    if (!pci) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned index;
    nvmlReturn_t rc = device_index(device, &index);
    if (rc != NVML_SUCCESS) return rc;
    *pci = nvmlPciInfo_t{};
    pci->domain = 0;
    pci->bus = FRACGPU_SIM_PCI_BUS_BASE + index;
    pci->device = 0;
    pci->pciDeviceId = 0x000010DEu;
    pci->pciSubSystemId = 0;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT, pci->domain, pci->bus,
             pci->device);
    snprintf(pci->busId, sizeof pci->busId, NVML_DEVICE_PCI_BUS_ID_FMT, pci->domain, pci->bus, pci->device);
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}
SIM_NVML_API nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    DeviceInfo info;
    nvmlReturn_t rc = device_info(device, &info);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = info.total;
    memory->used = info.used < info.total ? info.used : info.total;
    memory->free = info.total - memory->used;
    return NVML_SUCCESS;
}

SIM_NVML_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    DeviceInfo info;
    nvmlReturn_t rc = device_info(device, &info);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = info.total;
    memory->reserved = 0;   // the simulator sets nothing aside
    memory->used = info.used < info.total ? info.used : info.total;
    memory->free = info.total - memory->used;
    return NVML_SUCCESS;
}

// ---------------------------------------------------------------------------
// Processes: every process holding memory on the device is a compute process
// (a context reserves memory, so a process with one is listed). As NVML does,
// a count too small for them all answers NVML_ERROR_INSUFFICIENT_SIZE with
// the count needed; the list may change between two calls.
// ---------------------------------------------------------------------------
namespace {

template <typename Info>
nvmlReturn_t compute_processes(nvmlDevice_t device, unsigned int *infoCount, Info *infos, bool mig_fields) {
    if (!infoCount) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned index;
    nvmlReturn_t rc = device_index(device, &index);
    if (rc != NVML_SUCCESS) return rc;
    if (!g_processes) return NVML_ERROR_NOT_SUPPORTED;
    constexpr unsigned kMax = 256;
    unsigned pids[kMax];
    unsigned long long used[kMax];
    int n = g_processes((int)index, pids, used, kMax);
    if (n < 0) return NVML_ERROR_GPU_IS_LOST;
    unsigned count = (unsigned)n < kMax ? (unsigned)n : kMax;
    if (count > *infoCount || (count && !infos)) {
        *infoCount = count;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < count; i++) {
        Info info{};
        info.pid = pids[i];
        info.usedGpuMemory = used[i];
        if constexpr (sizeof(Info) > sizeof(nvmlProcessInfo_v1_t)) {
            if (mig_fields) info.gpuInstanceId = info.computeInstanceId = 0xFFFFFFFFu;   // no MIG
        }
        infos[i] = info;
    }
    *infoCount = count;
    return NVML_SUCCESS;
}

nvmlReturn_t no_processes(nvmlDevice_t device, unsigned int *infoCount) {
    if (!infoCount) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned index;
    nvmlReturn_t rc = device_index(device, &index);
    if (rc != NVML_SUCCESS) return rc;
    *infoCount = 0;
    return NVML_SUCCESS;
}

}  // namespace

SIM_NVML_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                                  nvmlProcessInfo_t *infos) {
    return compute_processes(device, infoCount, infos, true);
}
SIM_NVML_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                                  nvmlProcessInfo_v2_t *infos) {
    return compute_processes(device, infoCount, infos, true);
}
SIM_NVML_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                               nvmlProcessInfo_v1_t *infos) {
    return compute_processes(device, infoCount, infos, false);
}
// The simulated GPU runs no graphics and no MPS server: none of those processes.
SIM_NVML_API nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                                   nvmlProcessInfo_t *) {
    return no_processes(device, infoCount);
}
SIM_NVML_API nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                                     nvmlProcessInfo_t *) {
    return no_processes(device, infoCount);
}
