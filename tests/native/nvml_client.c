/* NVML test client: what NVML says of device 0's memory, and, with
 * `cuda MIB`, what the CUDA driver says in the same process after allocating
 * MIB there. Linked with the simulated NVML and the simulated driver; with the
 * shims preloaded, both answers come through them.
 *
 *   nvml_client            nvml total T used U free F
 *   nvml_client cuda MIB   cuda total T used U free F, then the nvml line
 */
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#include <cuda.h>
#include <nvml.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                              \
    do {                                                                         \
        int rc_ = (int)(call);                                                   \
        if (rc_ != 0) {                                                          \
            fprintf(stderr, "%s failed: %d\n", #call, rc_);                      \
            return 1;                                                            \
        }                                                                        \
    } while (0)

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "cuda") == 0) {
        CUdevice dev;
        CUcontext ctx;
        CUdeviceptr p;
        size_t free_bytes, total;
        CHECK(cuInit(0));
        CHECK(cuDeviceGet(&dev, 0));
        CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
        CHECK(cuCtxSetCurrent(ctx));
        CHECK(cuMemAlloc(&p, (size_t)atoll(argv[2]) << 20));
        CHECK(cuMemGetInfo(&free_bytes, &total));
        printf("cuda total %zu used %zu free %zu\n", total, total - free_bytes, free_bytes);
    }
    nvmlDevice_t device;
    nvmlMemory_t m;
    nvmlMemory_v2_t m2;
    CHECK(nvmlInit_v2());
    CHECK(nvmlDeviceGetHandleByIndex_v2(0, &device));
    CHECK(nvmlDeviceGetMemoryInfo(device, &m));
    memset(&m2, 0, sizeof m2);
    m2.version = nvmlMemory_v2;
    CHECK(nvmlDeviceGetMemoryInfo_v2(device, &m2));
    if (m2.total != m.total || m2.used != m.used || m2.free != m.free || m2.reserved != 0) {
        fprintf(stderr, "nvmlDeviceGetMemoryInfo_v2 disagrees with nvmlDeviceGetMemoryInfo\n");
        return 1;
    }
    printf("nvml total %llu used %llu free %llu\n", m.total, m.used, m.free);
    CHECK(nvmlShutdown());
    return 0;
}
