/* A CUDA driver API client used by the tests, on the simulated GPU and on a
 * real one (it loads the kernels of cuda/ by file name).
 *
 * Built two ways from this one file:
 *   default       linked with -lcuda, calling the driver directly
 *   -DUSE_DLOPEN  dlopen("libcuda.so.1") and every entry point resolved through
 *                 cuGetProcAddress_v2, as cudart, cuda-bindings and numba do
 *
 * Usage: driver_client COMMAND [ARGS]   (prints one "key value" line per fact)
 *   info                          device count, name, memory as the client sees it
 *   alloc-until-oom MIB [MAX [HOLD]]  allocate MIB-sized blocks until the driver refuses
 *                                 (MAX 0: no maximum), then keep them HOLD seconds
 *   fill COUNT VALUE MODULE       fracgpu_fill COUNT values, copy back, check them
 *   spin MS MODULE                one fracgpu_spin of MS milliseconds timed with events
 *   spins N MS MODULE [START]     N spins of MS back to back (from START), then wall time
 *   busy SECONDS MS MODULE [START]  MS spins for SECONDS, printing "t <ms> <kernels done>"
 *   hold MIB SECONDS              allocate MIB and keep it for SECONDS
 *   free-at-exit MIB              allocate MIB, free it in an exit handler registered before cuInit
 *
 * Virtual memory management (cuMemCreate/cuMemMap), each printing "used N"
 * (total - free, as cuMemGetInfo shows it) at the steps that matter:
 *   vmm-map-release MIB [MAX [HOLD]]  create, map and release MIB handles (the samples' pattern)
 *                                 until refused or MAX, then keep the mappings HOLD seconds
 *   vmm-retain MIB                create + map, retain + release by address; then unmap, release
 *   vmm-unmap-after-release MIB   create + map + release, then unmap
 *   vmm-bad MIB                   release unknown/released handles, unmap what was never mapped
 *   vmm-export MIB SECONDS        create an exportable MIB handle, map it, print "pid P" and
 *                                 "fd F" (its POSIX fd), hold it SECONDS
 *   vmm-import PID FD             import /proc/PID/fd/FD, map it, allocate 64 MiB blocks until
 *                                 refused, then unmap and release the imported handle
 *   ipc-export MIB SECONDS        cuMemAlloc MIB, set it to 0x1234abcd, print "handle HEX"
 *                                 (its cuIpcGetMemHandle), hold it SECONDS
 *   ipc-import HEX                cuIpcOpenMemHandle, read its first word, allocate 64 MiB
 *                                 blocks until refused, then cuIpcCloseMemHandle
 *   pool-export MIB SECONDS       an exportable pool, MIB from it set to 0x1234abcd; print
 *                                 "pid P", "fd F" (the pool's POSIX fd), "data HEX" (the
 *                                 pointer's cuMemPoolExportPointer), hold it SECONDS
 *   pool-import PID FD HEX        import the pool and the pointer, read its first word,
 *                                 allocate 64 MiB blocks until refused, then cuMemFree it
 *   set-limit heap|stack|fifo BYTES [MIB [HOLD]]
 *                                 cuCtxSetLimit, then what cuMemGetInfo shows; with MIB (> 0), allocate
 *                                 MIB-sized blocks until refused; then keep everything HOLD seconds
 *   pool-keep MIB THRESHOLD_MIB [HOLD]
 *                                 the default pool with that release threshold: cuMemAllocAsync
 *                                 MIB, free it, synchronize (keep it HOLD seconds), then trim to 0,
 *                                 showing the pool's reserve and cuMemGetInfo at each step
 *   module-load PATH              cuModuleLoad PATH, then cuModuleUnload, with cuMemGetInfo after each
 *   graph-mem MIB [HOLD]          capture cuMemAllocAsync MIB, a memset of it and its cuMemFreeAsync
 *                                 into a graph; instantiate, launch (keep it HOLD seconds), destroy,
 *                                 trim, showing the graph memory reserved and cuMemGetInfo at each step
 */
#include <cuda.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef USE_DLOPEN
#include <dlfcn.h>
#endif

// name, signature, and the API version the dlopen build asks cuGetProcAddress for:
// cuCtxSynchronize at CUDA 13 is the _v2 form that takes a context, so this
// client, which calls the void form, asks for the original version.
#define API_LIST(X)                                                                           \
    X(cuInit, (unsigned int), CUDA_VERSION)                                                   \
    X(cuDeviceGetCount, (int *), CUDA_VERSION)                                                \
    X(cuDeviceGet, (CUdevice *, int), CUDA_VERSION)                                           \
    X(cuDeviceGetName, (char *, int, CUdevice), CUDA_VERSION)                                 \
    X(cuDeviceTotalMem, (size_t *, CUdevice), CUDA_VERSION)                                   \
    X(cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice), CUDA_VERSION)                        \
    X(cuCtxSetCurrent, (CUcontext), CUDA_VERSION)                                             \
    X(cuMemGetInfo, (size_t *, size_t *), CUDA_VERSION)                                       \
    X(cuMemAlloc, (CUdeviceptr *, size_t), CUDA_VERSION)                                      \
    X(cuMemFree, (CUdeviceptr), CUDA_VERSION)                                                 \
    X(cuMemcpyDtoH, (void *, CUdeviceptr, size_t), CUDA_VERSION)                              \
    X(cuModuleLoad, (CUmodule *, const char *), CUDA_VERSION)                                 \
    X(cuModuleGetFunction, (CUfunction *, CUmodule, const char *), CUDA_VERSION)              \
    X(cuLaunchKernel, (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,          \
                       unsigned, unsigned, CUstream, void **, void **), CUDA_VERSION)         \
    X(cuEventCreate, (CUevent *, unsigned int), CUDA_VERSION)                                 \
    X(cuEventRecord, (CUevent, CUstream), CUDA_VERSION)                                       \
    X(cuEventSynchronize, (CUevent), CUDA_VERSION)                                            \
    X(cuEventElapsedTime, (float *, CUevent, CUevent), CUDA_VERSION)                          \
    X(cuCtxSynchronize, (void), 2000)                                                         \
    X(cuGetErrorName, (CUresult, const char **), CUDA_VERSION)

// Virtual memory management and memory shared between processes (the vmm-*, ipc-*, pool-* commands).
#define VMM_API_LIST(X)                                                                       \
    X(cuMemAddressReserve, (CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long),  \
      CUDA_VERSION)                                                                           \
    X(cuMemCreate, (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,      \
                    unsigned long long), CUDA_VERSION)                                        \
    X(cuMemMap, (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,                   \
                 unsigned long long), CUDA_VERSION)                                           \
    X(cuMemSetAccess, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t), CUDA_VERSION)   \
    X(cuMemUnmap, (CUdeviceptr, size_t), CUDA_VERSION)                                        \
    X(cuMemRelease, (CUmemGenericAllocationHandle), CUDA_VERSION)                             \
    X(cuMemRetainAllocationHandle, (CUmemGenericAllocationHandle *, void *), CUDA_VERSION)    \
    X(cuMemExportToShareableHandle, (void *, CUmemGenericAllocationHandle,                    \
                                     CUmemAllocationHandleType, unsigned long long),          \
      CUDA_VERSION)                                                                           \
    X(cuMemImportFromShareableHandle, (CUmemGenericAllocationHandle *, void *,                \
                                       CUmemAllocationHandleType), CUDA_VERSION)              \
    X(cuMemsetD32, (CUdeviceptr, unsigned int, size_t), CUDA_VERSION)                         \
    X(cuIpcGetMemHandle, (CUipcMemHandle *, CUdeviceptr), CUDA_VERSION)                       \
    X(cuIpcOpenMemHandle, (CUdeviceptr *, CUipcMemHandle, unsigned int), CUDA_VERSION)        \
    X(cuIpcCloseMemHandle, (CUdeviceptr), CUDA_VERSION)                                      \
    X(cuMemPoolCreate, (CUmemoryPool *, const CUmemPoolProps *), CUDA_VERSION)                \
    X(cuMemAllocFromPoolAsync, (CUdeviceptr *, size_t, CUmemoryPool, CUstream), CUDA_VERSION) \
    X(cuMemPoolExportToShareableHandle, (void *, CUmemoryPool, CUmemAllocationHandleType,     \
                                         unsigned long long), CUDA_VERSION)                   \
    X(cuMemPoolImportFromShareableHandle, (CUmemoryPool *, void *, CUmemAllocationHandleType, \
                                           unsigned long long), CUDA_VERSION)                 \
    X(cuMemPoolExportPointer, (CUmemPoolPtrExportData *, CUdeviceptr), CUDA_VERSION)          \
    X(cuMemPoolImportPointer, (CUdeviceptr *, CUmemoryPool, CUmemPoolPtrExportData *),        \
      CUDA_VERSION)

// What the reservation commands (set-limit, pool-keep) use.
#define RESERVE_API_LIST(X)                                                                   \
    X(cuCtxSetLimit, (CUlimit, size_t), CUDA_VERSION)                                         \
    X(cuCtxGetLimit, (size_t *, CUlimit), CUDA_VERSION)                                       \
    X(cuDeviceGetMemPool, (CUmemoryPool *, CUdevice), CUDA_VERSION)                           \
    X(cuMemPoolSetAttribute, (CUmemoryPool, CUmemPool_attribute, void *), CUDA_VERSION)       \
    X(cuMemPoolGetAttribute, (CUmemoryPool, CUmemPool_attribute, void *), CUDA_VERSION)       \
    X(cuMemPoolTrimTo, (CUmemoryPool, size_t), CUDA_VERSION)                                  \
    X(cuMemAllocAsync, (CUdeviceptr *, size_t, CUstream), CUDA_VERSION)                       \
    X(cuMemFreeAsync, (CUdeviceptr, CUstream), CUDA_VERSION)                                  \
    X(cuStreamSynchronize, (CUstream), CUDA_VERSION)                                          \
    X(cuModuleUnload, (CUmodule), CUDA_VERSION)

// Graphs with memory nodes (graph-mem).
#define GRAPH_API_LIST(X)                                                                     \
    X(cuStreamCreate, (CUstream *, unsigned int), CUDA_VERSION)                               \
    X(cuStreamBeginCapture, (CUstream, CUstreamCaptureMode), CUDA_VERSION)                    \
    X(cuStreamEndCapture, (CUstream, CUgraph *), CUDA_VERSION)                                \
    X(cuMemsetD32Async, (CUdeviceptr, unsigned int, size_t, CUstream), CUDA_VERSION)          \
    X(cuGraphInstantiateWithFlags, (CUgraphExec *, CUgraph, unsigned long long), CUDA_VERSION) \
    X(cuGraphLaunch, (CUgraphExec, CUstream), CUDA_VERSION)                                   \
    X(cuGraphExecDestroy, (CUgraphExec), CUDA_VERSION)                                        \
    X(cuGraphDestroy, (CUgraph), CUDA_VERSION)                                                \
    X(cuDeviceGraphMemTrim, (CUdevice), CUDA_VERSION)                                         \
    X(cuDeviceGetGraphMemAttribute, (CUdevice, CUgraphMem_attribute, void *), CUDA_VERSION)

#define DECLARE(name, args, ver) static CUresult (*p_##name) args;
API_LIST(DECLARE)
VMM_API_LIST(DECLARE)
RESERVE_API_LIST(DECLARE)
GRAPH_API_LIST(DECLARE)

static const char *err_name(CUresult rc) {
    const char *s = NULL;
    if (p_cuGetErrorName(rc, &s) != CUDA_SUCCESS || !s) return "unknown error";
    return s;
}

#define CHECK(call)                                                                         \
    do {                                                                                    \
        CUresult rc_ = (call);                                                              \
        if (rc_ != CUDA_SUCCESS) {                                                          \
            printf("error %s %s\n", #call, err_name(rc_));                                  \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

static void load_api(void) {
#ifdef USE_DLOPEN
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        printf("error dlopen %s\n", dlerror());
        exit(1);
    }
    CUresult (*gpa)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *) =
        (CUresult(*)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *))dlsym(
            h, "cuGetProcAddress_v2");
    if (!gpa) {
        printf("error dlsym cuGetProcAddress_v2\n");
        exit(1);
    }
#define RESOLVE(name, args, ver)                                                                 \
    {                                                                                       \
        CUdriverProcAddressQueryResult q;                                                   \
        if (gpa(#name, (void **)&p_##name, ver, CU_GET_PROC_ADDRESS_DEFAULT, &q) != \
                CUDA_SUCCESS ||                                                             \
            !p_##name) {                                                                    \
            printf("error cuGetProcAddress %s %d\n", #name, (int)q);                        \
            exit(1);                                                                        \
        }                                                                                   \
    }
    API_LIST(RESOLVE)
    VMM_API_LIST(RESOLVE)
    RESERVE_API_LIST(RESOLVE)
    GRAPH_API_LIST(RESOLVE)
#else
#define BIND(name, args, ver) p_##name = name;
    API_LIST(BIND)
    VMM_API_LIST(BIND)
    RESERVE_API_LIST(BIND)
    GRAPH_API_LIST(BIND)
#endif
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static CUfunction kernel(const char *module, const char *name) {
    CUmodule m;
    CUfunction f;
    CHECK(p_cuModuleLoad(&m, module));
    CHECK(p_cuModuleGetFunction(&f, m, name));
    return f;
}

static void spin(CUfunction f, double ms) {
    unsigned long long ns = (unsigned long long)(ms * 1e6);
    void *args[] = {&ns};
    CHECK(p_cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL));
}

/* free-at-exit: a block freed by an exit handler that runs after the shim's. */
static CUdeviceptr g_exit_block;
static void free_at_exit(void) {
    if (g_exit_block) p_cuMemFree(g_exit_block);
}

/* --- virtual memory management and memory shared between processes (vmm-*, ipc-*, pool-*) --- */
static size_t used_now(void) {
    size_t mfree, mtotal;
    CHECK(p_cuMemGetInfo(&mfree, &mtotal));
    return mtotal - mfree;
}

static CUmemAllocationProp vmm_prop(CUdevice dev, int exportable) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    if (exportable) prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return prop;
}

/* Reserves an address range for `bytes` and maps `h` there, readable and writable. */
static CUdeviceptr vmm_map(CUmemGenericAllocationHandle h, size_t bytes, CUdevice dev) {
    CUdeviceptr va;
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = dev;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CHECK(p_cuMemAddressReserve(&va, bytes, 0, 0, 0));
    CHECK(p_cuMemMap(va, bytes, 0, h, 0));
    CHECK(p_cuMemSetAccess(va, bytes, &access, 1));
    return va;
}

static void print_hex(const char *key, const void *blob, size_t n) {
    printf("%s ", key);
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)blob)[i]);
    printf("\n");
}

static void read_hex(const char *text, void *blob, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned byte = 0;
        if (strlen(text) < 2 * i + 2 || sscanf(text + 2 * i, "%2x", &byte) != 1) byte = 0;
        ((unsigned char *)blob)[i] = (unsigned char)byte;
    }
}

/* Opens /proc/PID/fd/FD: another process's file descriptor, as a Unix socket would pass it. */
static int open_their_fd(const char *pid, const char *fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/fd/%s", pid, fd);
    int mine = open(path, O_RDWR);
    if (mine < 0) {
        printf("error open %s\n", path);
        exit(1);
    }
    return mine;
}

/* After opening memory made elsewhere: its first word and what is used, then
 * 64 MiB blocks until refused. */
static void after_opening(CUdeviceptr d, const char *used_key) {
    unsigned first = 0;
    CUdeviceptr p;
    long n = 0;
    CHECK(p_cuMemcpyDtoH(&first, d, sizeof first));
    printf("first 0x%x\n%s %zu\n", first, used_key, used_now());
    while (p_cuMemAlloc(&p, 64 << 20) == CUDA_SUCCESS) n++;
    printf("blocks %ld\n", n);
}

static int vmm_command(const char *cmd, int argc, char **argv, CUdevice dev) {
    size_t bytes = argc >= 3 ? (size_t)atoll(argv[2]) << 20 : 0;
    CUmemAllocationProp prop = vmm_prop(dev, !strcmp(cmd, "vmm-export"));
    CUmemGenericAllocationHandle h, h2;
    if (!strcmp(cmd, "vmm-map-release") && argc >= 3) {
        long max = argc >= 4 && atol(argv[3]) > 0 ? atol(argv[3]) : 1000000;
        double hold = argc >= 5 ? atof(argv[4]) : 0;
        long n = 0;
        CUresult rc = CUDA_SUCCESS;
        for (; n < max; n++) {
            rc = p_cuMemCreate(&h, bytes, &prop, 0);
            if (rc != CUDA_SUCCESS) break;
            vmm_map(h, bytes, dev);
            CHECK(p_cuMemRelease(h));   /* the mapping keeps the memory */
        }
        printf("blocks %ld\nresult %s\nused %zu\n", n, n == max ? "CUDA_SUCCESS" : err_name(rc), used_now());
        fflush(stdout);
        if (hold > 0) usleep((useconds_t)(hold * 1e6));
    } else if (!strcmp(cmd, "vmm-retain") && argc >= 3) {
        CHECK(p_cuMemCreate(&h, bytes, &prop, 0));
        CUdeviceptr va = vmm_map(h, bytes, dev);
        CHECK(p_cuMemRetainAllocationHandle(&h2, (void *)va));   /* a library's own reference */
        CHECK(p_cuMemRelease(h2));
        printf("used_after_retain_release %zu\n", used_now());
        CHECK(p_cuMemUnmap(va, bytes));
        printf("used_after_unmap %zu\n", used_now());
        CHECK(p_cuMemRelease(h));
        printf("used_after_release %zu\n", used_now());
    } else if (!strcmp(cmd, "vmm-unmap-after-release") && argc >= 3) {
        CHECK(p_cuMemCreate(&h, bytes, &prop, 0));
        CUdeviceptr va = vmm_map(h, bytes, dev);
        CHECK(p_cuMemRelease(h));
        printf("used_after_release %zu\n", used_now());
        CHECK(p_cuMemUnmap(va, bytes));
        printf("used_after_unmap %zu\n", used_now());
    } else if (!strcmp(cmd, "vmm-bad") && argc >= 3) {
        CHECK(p_cuMemCreate(&h, bytes, &prop, 0));
        CUdeviceptr va = vmm_map(h, bytes, dev);
        printf("used %zu\n", used_now());
        printf("release_unknown %s\n", err_name(p_cuMemRelease((CUmemGenericAllocationHandle)0x5eed)));
        CHECK(p_cuMemRelease(h));
        printf("release_again %s\n", err_name(p_cuMemRelease(h)));
        printf("unmap_never_mapped %s\n", err_name(p_cuMemUnmap(va + bytes, bytes)));
        printf("used_after_bad %zu\n", used_now());
        CHECK(p_cuMemUnmap(va, bytes));
        printf("unmap_again %s\n", err_name(p_cuMemUnmap(va, bytes)));
        printf("used_after_unmap %zu\n", used_now());
    } else if (!strcmp(cmd, "vmm-export") && argc >= 4) {
        int fd = -1;
        CHECK(p_cuMemCreate(&h, bytes, &prop, 0));
        vmm_map(h, bytes, dev);
        CHECK(p_cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
        printf("pid %d\nfd %d\nused %zu\n", (int)getpid(), fd, used_now());
        fflush(stdout);
        usleep((useconds_t)(atof(argv[3]) * 1e6));
    } else if (!strcmp(cmd, "vmm-import") && argc >= 4) {
        int fd = open_their_fd(argv[2], argv[3]);
        struct stat st;
        if (fstat(fd, &st) != 0) st.st_size = 0;
        size_t size = (size_t)st.st_size;
        CHECK(p_cuMemImportFromShareableHandle(&h, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
        close(fd);
        CUdeviceptr va = vmm_map(h, size, dev);
        printf("imported %zu\nused_after_import %zu\n", size, used_now());
        long n = 0;
        CUdeviceptr p;
        while (p_cuMemAlloc(&p, 64 << 20) == CUDA_SUCCESS) n++;
        printf("blocks %ld\n", n);
        CHECK(p_cuMemUnmap(va, size));
        CHECK(p_cuMemRelease(h));
        printf("used_after_release %zu\n", used_now());
    } else if (!strcmp(cmd, "ipc-export") && argc >= 4) {
        CUdeviceptr d;
        CUipcMemHandle ipc;
        CHECK(p_cuMemAlloc(&d, bytes));
        CHECK(p_cuMemsetD32(d, 0x1234abcd, bytes / 4));
        CHECK(p_cuIpcGetMemHandle(&ipc, d));
        print_hex("handle", ipc.reserved, sizeof ipc.reserved);
        printf("used %zu\n", used_now());
        fflush(stdout);
        usleep((useconds_t)(atof(argv[3]) * 1e6));
    } else if (!strcmp(cmd, "ipc-import") && argc >= 3) {
        CUipcMemHandle ipc;
        CUdeviceptr d;
        read_hex(argv[2], ipc.reserved, sizeof ipc.reserved);
        CHECK(p_cuIpcOpenMemHandle(&d, ipc, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS));
        after_opening(d, "used_after_open");
        printf("free_opened %s\n", err_name(p_cuMemFree(d)));
        CHECK(p_cuIpcCloseMemHandle(d));
        printf("used_after_close %zu\n", used_now());
    } else if (!strcmp(cmd, "pool-export") && argc >= 4) {
        CUmemPoolProps props;
        CUmemoryPool pool;
        CUmemPoolPtrExportData data;
        CUdeviceptr d;
        int fd = -1;
        memset(&props, 0, sizeof props);
        props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = dev;
        CHECK(p_cuMemPoolCreate(&pool, &props));
        CHECK(p_cuMemPoolExportToShareableHandle(&fd, pool, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
        CHECK(p_cuMemAllocFromPoolAsync(&d, bytes, pool, NULL));
        CHECK(p_cuMemsetD32(d, 0x1234abcd, bytes / 4));
        CHECK(p_cuCtxSynchronize());
        CHECK(p_cuMemPoolExportPointer(&data, d));
        printf("pid %d\nfd %d\n", (int)getpid(), fd);
        print_hex("data", data.reserved, sizeof data.reserved);
        printf("used %zu\n", used_now());
        fflush(stdout);
        usleep((useconds_t)(atof(argv[3]) * 1e6));
    } else if (!strcmp(cmd, "pool-import") && argc >= 5) {
        CUmemoryPool pool;
        CUmemPoolPtrExportData data;
        CUdeviceptr d;
        int fd = open_their_fd(argv[2], argv[3]);
        CHECK(p_cuMemPoolImportFromShareableHandle(&pool, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
        close(fd);
        read_hex(argv[4], data.reserved, sizeof data.reserved);
        CHECK(p_cuMemPoolImportPointer(&d, pool, &data));
        after_opening(d, "used_after_import");
        CHECK(p_cuMemFree(d));
        printf("used_after_free %zu\n", used_now());
    } else {
        return -1;
    }
    return 0;
}

/* --- the reservation commands: set-limit, pool-keep, module-load ------------------ */

static void print_meminfo(const char *when) {
    size_t mfree, mtotal;
    CHECK(p_cuMemGetInfo(&mfree, &mtotal));
    printf("%sfree %zu\n", when, mfree);
}

static void print_pool(CUmemoryPool pool, const char *when) {
    cuuint64_t reserved = 0;
    CHECK(p_cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved));
    printf("%sreserved %llu\n", when, (unsigned long long)reserved);
    print_meminfo(when);
}

/* 1: cmd was one of these commands (and ran); 0: it was not. */
/* What the device's graph memory pool holds, and what cuMemGetInfo shows used. */
static void print_graph_mem(CUdevice dev, const char *prefix) {
    cuuint64_t reserved = 0;
    CHECK(p_cuDeviceGetGraphMemAttribute(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved));
    printf("%sreserved %llu\n", prefix, (unsigned long long)reserved);
    print_meminfo(prefix);
}

static int reserve_command(const char *cmd, int argc, char **argv, CUdevice dev) {
    if (!strcmp(cmd, "set-limit") && argc >= 4) {
        CUlimit limit;
        if (!strcmp(argv[2], "heap")) limit = CU_LIMIT_MALLOC_HEAP_SIZE;
        else if (!strcmp(argv[2], "stack")) limit = CU_LIMIT_STACK_SIZE;
        else if (!strcmp(argv[2], "fifo")) limit = CU_LIMIT_PRINTF_FIFO_SIZE;
        else {
            fprintf(stderr, "set-limit: unknown limit %s (heap, stack or fifo)\n", argv[2]);
            exit(2);
        }
        size_t value = (size_t)strtoull(argv[3], NULL, 0), now = 0;
        CUresult rc = p_cuCtxSetLimit(limit, value);
        CHECK(p_cuCtxGetLimit(&now, limit));
        printf("result %s\nlimit %zu\n", rc == CUDA_SUCCESS ? "CUDA_SUCCESS" : err_name(rc), now);
        print_meminfo("meminfo_");
        if (argc >= 5 && atoll(argv[4]) > 0) {
            size_t block = (size_t)atoll(argv[4]) << 20;
            long n = 0;
            CUdeviceptr p;
            while (p_cuMemAlloc(&p, block) == CUDA_SUCCESS) n++;
            printf("blocks %ld\n", n);
        }
        fflush(stdout);
        if (argc >= 6) usleep((useconds_t)(atof(argv[5]) * 1e6));
        return 1;
    }
    if (!strcmp(cmd, "pool-keep") && argc >= 4) {
        size_t bytes = (size_t)atoll(argv[2]) << 20;
        cuuint64_t threshold = (cuuint64_t)atoll(argv[3]) << 20;
        CUmemoryPool pool;
        CUdeviceptr p;
        CHECK(p_cuDeviceGetMemPool(&pool, dev));
        CHECK(p_cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &threshold));
        CUresult rc = p_cuMemAllocAsync(&p, bytes, NULL);
        printf("alloc %s\n", rc == CUDA_SUCCESS ? "CUDA_SUCCESS" : err_name(rc));
        if (rc != CUDA_SUCCESS) return 1;
        print_pool(pool, "allocated_");
        CHECK(p_cuMemFreeAsync(p, NULL));
        CHECK(p_cuStreamSynchronize(NULL));
        print_pool(pool, "synced_");
        fflush(stdout);
        if (argc >= 5) usleep((useconds_t)(atof(argv[4]) * 1e6));
        CHECK(p_cuMemPoolTrimTo(pool, 0));
        print_pool(pool, "trimmed_");
        return 1;
    }
    if (!strcmp(cmd, "graph-mem") && argc >= 3) {
        size_t bytes = (size_t)atoll(argv[2]) << 20;
        CUstream s;
        CUgraph g;
        CUgraphExec e;
        CUdeviceptr p;
        CHECK(p_cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
        CHECK(p_cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
        CHECK(p_cuMemAllocAsync(&p, bytes, s));
        CHECK(p_cuMemsetD32Async(p, 0x1234abcd, bytes / 4, s));
        CHECK(p_cuMemFreeAsync(p, s));
        CHECK(p_cuStreamEndCapture(s, &g));
        CHECK(p_cuGraphInstantiateWithFlags(&e, g, 0));
        print_graph_mem(dev, "instantiated_");
        CUresult rc = p_cuGraphLaunch(e, s);
        printf("launch %s\n", rc == CUDA_SUCCESS ? "CUDA_SUCCESS" : err_name(rc));
        CHECK(p_cuStreamSynchronize(s));
        print_graph_mem(dev, "launched_");
        fflush(stdout);
        if (argc >= 4) usleep((useconds_t)(atof(argv[3]) * 1e6));
        CHECK(p_cuGraphExecDestroy(e));
        CHECK(p_cuGraphDestroy(g));
        print_graph_mem(dev, "destroyed_");
        CHECK(p_cuDeviceGraphMemTrim(dev));
        print_graph_mem(dev, "trimmed_");
        return 1;
    }
    if (!strcmp(cmd, "module-load") && argc >= 3) {
        CUmodule m;
        CUresult rc = p_cuModuleLoad(&m, argv[2]);
        printf("result %s\n", rc == CUDA_SUCCESS ? "CUDA_SUCCESS" : err_name(rc));
        print_meminfo("loaded_");
        if (rc == CUDA_SUCCESS) {
            CHECK(p_cuModuleUnload(m));
            print_meminfo("unloaded_");
        }
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s info | alloc-until-oom MIB [MAX [HOLD]] | fill COUNT VALUE MODULE | spin MS MODULE | spins N MS MODULE [START] | busy SECONDS MS MODULE [START] | requests COUNT PERIOD_MS MS MODULE [START] | hold MIB SECONDS | free-at-exit MIB | vmm-... (see the source)\n", argv[0]);
        return 2;
    }
    load_api();
    const char *cmd = argv[1];
    /* Registered before cuInit, so it runs after the shim's own exit handler. */
    if (!strcmp(cmd, "free-at-exit")) atexit(free_at_exit);
    CUdevice dev;
    CUcontext ctx;
    CHECK(p_cuInit(0));
    CHECK(p_cuDeviceGet(&dev, 0));
    CHECK(p_cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(p_cuCtxSetCurrent(ctx));

    if (!strcmp(cmd, "info")) {
        int count;
        char name[256];
        size_t total, mfree, mtotal;
        CHECK(p_cuDeviceGetCount(&count));
        CHECK(p_cuDeviceGetName(name, sizeof name, dev));
        CHECK(p_cuDeviceTotalMem(&total, dev));
        CHECK(p_cuMemGetInfo(&mfree, &mtotal));
        printf("devices %d\nname %s\ntotal_mem %zu\nmeminfo_free %zu\nmeminfo_total %zu\n", count, name, total,
               mfree, mtotal);
    } else if (!strcmp(cmd, "alloc-until-oom") && argc >= 3) {
        size_t block = (size_t)atoll(argv[2]) << 20;
        long max = argc >= 4 && atol(argv[3]) > 0 ? atol(argv[3]) : 1000000;
        double hold = argc >= 5 ? atof(argv[4]) : 0;   /* keep the memory this long before exiting */
        long n = 0;
        CUresult rc = CUDA_SUCCESS;
        for (; n < max; n++) {
            CUdeviceptr p;
            rc = p_cuMemAlloc(&p, block);
            if (rc != CUDA_SUCCESS) break;
        }
        printf("blocks %ld\nbytes %zu\nresult %s\n", n, (size_t)n * block, n == max ? "CUDA_SUCCESS" : err_name(rc));
        fflush(stdout);
        if (hold > 0) usleep((useconds_t)(hold * 1e6));
    } else if (!strcmp(cmd, "fill") && argc >= 5) {
        unsigned long long count = strtoull(argv[2], NULL, 0);
        unsigned value = (unsigned)strtoul(argv[3], NULL, 0);
        CUfunction f = kernel(argv[4], "fracgpu_fill");
        CUdeviceptr d;
        CHECK(p_cuMemAlloc(&d, count * 4));
        void *args[] = {&d, &value, &count};
        CHECK(p_cuLaunchKernel(f, 64, 1, 1, 256, 1, 1, 0, NULL, args, NULL));
        unsigned *h = malloc(count * 4);
        CHECK(p_cuMemcpyDtoH(h, d, count * 4));
        unsigned long long bad = 0;
        for (unsigned long long i = 0; i < count; i++) bad += h[i] != value;
        printf("filled %llu\nwrong %llu\nfirst 0x%x\nlast 0x%x\n", count, bad, h[0], h[count - 1]);
        free(h);
        CHECK(p_cuMemFree(d));
    } else if (!strcmp(cmd, "spin") && argc >= 4) {
        CUfunction f = kernel(argv[3], "fracgpu_spin");
        CUevent a, b;
        float ms;
        CHECK(p_cuEventCreate(&a, 0));
        CHECK(p_cuEventCreate(&b, 0));
        spin(f, 0.001);   /* warm-up */
        CHECK(p_cuCtxSynchronize());
        double t0 = now_ms();
        CHECK(p_cuEventRecord(a, NULL));
        spin(f, atof(argv[2]));
        CHECK(p_cuEventRecord(b, NULL));
        CHECK(p_cuEventSynchronize(b));
        double t1 = now_ms();
        CHECK(p_cuEventElapsedTime(&ms, a, b));
        printf("event_ms %.4f\nwall_ms %.4f\n", ms, t1 - t0);
    } else if (!strcmp(cmd, "spins") && argc >= 5) {
        int n = atoi(argv[2]);
        double ms = atof(argv[3]);
        CUfunction f = kernel(argv[4], "fracgpu_spin");
        /* Optional START: a CLOCK_MONOTONIC time in ms (Python's time.monotonic()
         * * 1000) to begin at, so that several processes start together. */
        if (argc >= 6)
            while (now_ms() < atof(argv[5])) usleep(100);
        double t0 = now_ms();
        for (int i = 0; i < n; i++) spin(f, ms);
        CHECK(p_cuCtxSynchronize());
        printf("wall_ms %.4f\n", now_ms() - t0);
    } else if (!strcmp(cmd, "busy") && argc >= 5) {
        /* Keep the device busy for SECONDS with MS spins, 10 at a time; after
         * each 10, print "t <ms since start> <kernels completed>". */
        double seconds = atof(argv[2]), ms = atof(argv[3]);
        CUfunction f = kernel(argv[4], "fracgpu_spin");
        if (argc >= 6)
            while (now_ms() < atof(argv[5])) usleep(100);
        double t0 = now_ms();
        long done = 0;
        while (now_ms() - t0 < seconds * 1e3) {
            for (int i = 0; i < 10; i++) spin(f, ms);
            CHECK(p_cuCtxSynchronize());
            done += 10;
            printf("t %.3f %ld\n", now_ms() - t0, done);
        }
    } else if (!strcmp(cmd, "requests") && argc >= 6) {
        /* A latency-critical service: COUNT requests, one every PERIOD ms, each
         * one MS spin followed by a synchronize; print "r <latency ms>" per
         * request, from its launch to the synchronize's return. */
        int count = atoi(argv[2]);
        double period = atof(argv[3]), ms = atof(argv[4]);
        CUfunction f = kernel(argv[5], "fracgpu_spin");
        spin(f, 0.001);   /* warm-up: the context and module are ready before the first request */
        CHECK(p_cuCtxSynchronize());
        if (argc >= 7)
            while (now_ms() < atof(argv[6])) usleep(100);
        double t0 = now_ms() + period;   /* the first request one period after the warm-up, as a service's */
        for (int i = 0; i < count; i++) {
            double due = t0 + i * period;
            while (now_ms() < due) usleep(50);
            double start = now_ms();
            spin(f, ms);
            CHECK(p_cuCtxSynchronize());
            printf("r %.4f\n", now_ms() - start);
        }
    } else if (!strcmp(cmd, "free-at-exit") && argc >= 3) {
        CHECK(p_cuMemAlloc(&g_exit_block, (size_t)atoll(argv[2]) << 20));
        printf("allocated %s\n", argv[2]);
    } else if (!strcmp(cmd, "hold") && argc >= 4) {
        CUdeviceptr d;
        CHECK(p_cuMemAlloc(&d, (size_t)atoll(argv[2]) << 20));
        printf("holding %s\n", argv[2]);
        fflush(stdout);
        usleep((useconds_t)(atof(argv[3]) * 1e6));
    } else if (reserve_command(cmd, argc, argv, dev)) {
    } else if (!strncmp(cmd, "vmm-", 4) || !strncmp(cmd, "ipc-", 4) || !strncmp(cmd, "pool-", 5)) {
        int rc = vmm_command(cmd, argc, argv, dev);
        if (rc < 0) {
            fprintf(stderr, "unknown command or missing arguments: %s\n", cmd);
            return 2;
        }
        return rc;
    } else {
        fprintf(stderr, "unknown command or missing arguments: %s\n", cmd);
        return 2;
    }
    return 0;
}
