// Initialisation, devices, error names and cuGetProcAddress.
#include "sim.h"
#include "nvml_info.h"   // FRACGPU_SIM_PCI_BUS_BASE, which NVML reports too
#include "fracgpu/error_text.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <pthread.h>

namespace sim {

// Never destroyed: the engine's detached worker thread may still use them while
// the process runs its exit handlers.
Config &g_cfg = *new Config;
std::vector<Device> &g_devices = *new std::vector<Device>;
std::mutex g_mu;

std::string uuid_text(const CUuuid &u) {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(u.bytes);
    char s[48];
    snprintf(s, sizeof s, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    return s;
}

namespace {

enum State { kUninit, kReady, kFailed, kForked };
std::atomic<int> g_state{kUninit};
CUresult g_init_error = CUDA_SUCCESS;

void after_fork_in_child() {
    // A forked child of a process that used CUDA cannot use it (as with a real
    // driver). Its copy of our locks may be held by threads that no longer exist.
    if (g_state.load() == kReady) g_state.store(kForked);
}

// CUDA_VISIBLE_DEVICES: indices or GPU-UUID prefixes; the list ends at the
// first entry that names no device (or repeats one), as with the real driver.
void pick_visible_devices() {
    g_devices.clear();
    const char *env = getenv("CUDA_VISIBLE_DEVICES");
    if (!env) {
        for (int d = 0; d < g_cfg.devices; d++) g_devices.push_back(Device{d});
        return;
    }
    std::string list(env);
    size_t pos = 0;
    while (pos <= list.size()) {
        size_t comma = list.find(',', pos);
        std::string item = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        int phys = -1;
        if (!item.empty() && item.find_first_not_of("0123456789") == std::string::npos) {
            long v = strtol(item.c_str(), nullptr, 10);
            if (v < g_cfg.devices) phys = (int)v;
        } else if (item.size() > 4 && item.compare(0, 4, "GPU-") == 0) {
            for (int d = 0; d < g_cfg.devices; d++)
                if (uuid_text(device_uuid(d)).compare(0, item.size(), item) == 0) {
                    phys = d;
                    break;
                }
        }
        if (phys < 0) break;
        for (const Device &dv : g_devices)
            if (dv.phys == phys) phys = -1;
        if (phys < 0) break;
        g_devices.push_back(Device{phys});
        if (comma == std::string::npos) break;
        pos = comma + 1;
    }
}

const fracgpu::ErrorText kErrors[] = {
#define ERROR_ENTRY(code, name, text) {code, name, text},
#include "cuda_errors.inc"
#undef ERROR_ENTRY
};

struct ProcEntry {
    const char *api;
    int version;
    int per_thread;
    const char *symbol;
    void *fn;
};
const ProcEntry kProcs[] = {
#define PROC_ENTRY(api, version, per_thread, symbol, fn) {api, version, per_thread, symbol, (void *)&fn},
#include "cuda_procaddr.inc"
#undef PROC_ENTRY
};

CUresult proc_lookup(const char *symbol, void **pfn, int version, cuuint64_t flags,
                     CUdriverProcAddressQueryResult *status) {
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    *pfn = nullptr;
    const size_t n = sizeof kProcs / sizeof kProcs[0];
    // The table is sorted by api name: find its first row.
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (strcmp(kProcs[mid].api, symbol) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo == n || strcmp(kProcs[lo].api, symbol) != 0) {
        if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        return CUDA_ERROR_NOT_FOUND;
    }
    const bool want_pt = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    const ProcEntry *plain = nullptr, *pt = nullptr;
    for (size_t i = lo; i < n && strcmp(kProcs[i].api, symbol) == 0; i++) {
        if (kProcs[i].version > version) continue;
        if (kProcs[i].per_thread) pt = &kProcs[i];   // rows ascend in version
        else plain = &kProcs[i];
    }
    const ProcEntry *pick = (want_pt && pt) ? pt : plain;
    if (!pick) {
        if (status) *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = pick->fn;
    if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
}

int attribute_value(CUdevice_attribute a, int dev) {
    switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: return 1024;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: return 1024;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: return 1024;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: return 64;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: return 2147483647;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: return 65535;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: return 65535;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: return 49152;
    case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: return 65536;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: return 32;
    case CU_DEVICE_ATTRIBUTE_MAX_PITCH: return 2147483647;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: return 65536;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: return 1980000;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: return 512;
    case CU_DEVICE_ATTRIBUTE_GPU_OVERLAP: return 1;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: return g_cfg.sms;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE1D_WIDTH: return 131072;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE2D_WIDTH: return 131072;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE2D_HEIGHT: return 65536;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE3D_WIDTH: return 16384;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE3D_HEIGHT: return 16384;
    case CU_DEVICE_ATTRIBUTE_MAXIMUM_TEXTURE3D_DEPTH: return 16384;
    case CU_DEVICE_ATTRIBUTE_SURFACE_ALIGNMENT: return 512;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: return 1;
    case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: return 1;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: return FRACGPU_SIM_PCI_BUS_BASE + dev;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: return 2619000;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: return 6144;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: return 50331648;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: return 2048;
    case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: return 2;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: return 1;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: return 32;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: return 9;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: return 0;
    case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: return 233472;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: return 65536;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: return 1;
    case CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD_GROUP_ID: return dev;
    case CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: return 2;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: return 1;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: return 1;
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: return 1;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: return 232448;
    case CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: return 32;
    case CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE: return 32505856;
    case CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE: return 134213632;
    case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: return 1024;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: return 1;
    case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH: return 1;
    case CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS: return 1;
    case CU_DEVICE_ATTRIBUTE_MEM_SYNC_DOMAIN_COUNT: return 4;
    case CU_DEVICE_ATTRIBUTE_NUMA_ID: return -1;
    case CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID: return -1;
    default: return 0;
    }
}

}  // namespace

bool initialized() { return g_state.load(std::memory_order_acquire) == kReady; }

CUresult check_init() {
    int s = g_state.load(std::memory_order_acquire);
    if (s == kReady) return CUDA_SUCCESS;
    return CUDA_ERROR_NOT_INITIALIZED;
}

CUresult check_device(CUdevice dev) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (dev < 0 || dev >= (int)g_devices.size()) return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    int s = g_state.load();
    if (s == kReady) return CUDA_SUCCESS;
    if (s == kForked) return CUDA_ERROR_NOT_INITIALIZED;
    if (s == kFailed) return g_init_error;
    CUresult rc = load_config(g_cfg);
    if (rc == CUDA_SUCCESS) rc = shared_attach(g_cfg);
    if (rc == CUDA_SUCCESS) {
        pick_visible_devices();
        if (g_devices.empty()) rc = CUDA_ERROR_NO_DEVICE;
    }
    if (rc != CUDA_SUCCESS) {
        g_init_error = rc;
        g_state.store(kFailed);
        return rc;
    }
    static bool hooks = false;
    if (!hooks) {
        hooks = true;
        pthread_atfork(nullptr, nullptr, after_fork_in_child);
    }
    g_state.store(kReady, std::memory_order_release);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDriverGetVersion(int *v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = CUDA_VERSION;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetCount(int *count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    *count = (int)g_devices.size();
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_device(ordinal);
    if (rc != CUDA_SUCCESS) return rc;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", g_cfg.name.c_str());
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    *uuid = device_uuid(g_devices[dev].phys);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

SIM_API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = g_cfg.memory;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    size_t b = 0;
    CUresult rc = cuDeviceTotalMem_v2(&b, dev);
    if (rc == CUDA_SUCCESS) *bytes = b > 0xffffffffu ? 0xffffffffu : (unsigned)b;
    return rc;
}

SIM_API CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!pi || (int)attrib <= 0 || (int)attrib >= (int)CU_DEVICE_ATTRIBUTE_MAX) return CUDA_ERROR_INVALID_VALUE;
    *pi = attribute_value(attrib, dev);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceComputeCapability(int *major, int *minor, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!major || !minor) return CUDA_ERROR_INVALID_VALUE;
    *major = 9;
    *minor = 0;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetProperties(CUdevprop *p, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = 65535;
    p->maxGridSize[2] = 65535;
    p->sharedMemPerBlock = 49152;
    p->totalConstantMemory = 65536;
    p->SIMDWidth = 32;
    p->memPitch = 2147483647;
    p->regsPerBlock = 65536;
    p->clockRate = 1980000;
    p->textureAlign = 512;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!pciBusId || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(pciBusId, (size_t)len, "00000000:%02X:00.0", FRACGPU_SIM_PCI_BUS_BASE + g_devices[dev].phys);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (!dev || !pciBusId) return CUDA_ERROR_INVALID_VALUE;
    for (int d = 0; d < (int)g_devices.size(); d++) {
        char id[32];
        cuDeviceGetPCIBusId(id, sizeof id, d);
        if (strcasecmp(id, pciBusId) == 0 || strcasecmp(id + 4, pciBusId) == 0) {
            *dev = d;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_DEVICE;
}

SIM_API CUresult cuDeviceCanAccessPeer(int *can, CUdevice dev, CUdevice peer) {
    CUresult rc = check_device(dev);
    if (rc == CUDA_SUCCESS) rc = check_device(peer);
    if (rc != CUDA_SUCCESS) return rc;
    if (!can) return CUDA_ERROR_INVALID_VALUE;
    *can = dev != peer;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetP2PAttribute(int *value, CUdevice_P2PAttribute attrib, CUdevice src, CUdevice dst) {
    CUresult rc = check_device(src);
    if (rc == CUDA_SUCCESS) rc = check_device(dst);
    if (rc != CUDA_SUCCESS) return rc;
    if (!value || src == dst) return CUDA_ERROR_INVALID_DEVICE;
    *value = attrib == CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK ? 0 : 1;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetExecAffinitySupport(int *pi, CUexecAffinityType type, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    *pi = 0;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetTexture1DLinearMaxWidth(size_t *w, CUarray_format format, unsigned numChannels,
                                                    CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!w) return CUDA_ERROR_INVALID_VALUE;
    *w = 1u << 28;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGetErrorName(CUresult error, const char **pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    return fracgpu::describe_error(kErrors, (int)error, &fracgpu::ErrorText::name, pStr) ? CUDA_SUCCESS
                                                                                        : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuGetErrorString(CUresult error, const char **pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    return fracgpu::describe_error(kErrors, (int)error, &fracgpu::ErrorText::text, pStr) ? CUDA_SUCCESS
                                                                                        : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                                     CUdriverProcAddressQueryResult *symbolStatus) {
    return proc_lookup(symbol, pfn, cudaVersion, flags, symbolStatus);
}

SIM_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags) {
    return proc_lookup(symbol, pfn, cudaVersion, flags, nullptr);
}
