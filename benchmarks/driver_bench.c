/* Times driver calls from C, with no interpreter in the way, so the cost the
 * shim adds can be compared with the bare driver side by side.
 *
 * Usage: driver_bench OP ITERATIONS [START]
 *   alloc-free   cuMemAlloc_v2 + cuMemFree_v2 of 1 MiB (the quota's hot path)
 *   passthrough  cuCtxGetDevice (a forwarded call the shim does not hook)
 *   meminfo      cuMemGetInfo_v2 (hooked: the virtual view of the quota)
 *   launch       cuLaunchKernel of fracgpu_spin(0) (needs MODULE in $BENCH_MODULE)
 *   vmm          cuMemCreate + cuMemMap + cuMemUnmap + cuMemRelease of 2 MiB (the VMM
 *                books: a handle's references and mappings), into a range reserved once
 *   set-limit    cuCtxSetLimit of the device heap, 16 MiB and 8 MiB in turn (each call
 *                reserves or gives back 8 MiB)
 *   startup      a process's start: cuInit, its primary context and one 1 MiB cuMemAlloc_v2,
 *                then prints "first_alloc_ns T" (T: CLOCK_MONOTONIC when that allocation
 *                returned, comparable with the launcher's clock) and exits; ITERATIONS unused
 *   event        cuEventRecord + cuEventQuery of an event that keeps timing
 *   event-untimed the same with a CU_EVENT_DISABLE_TIMING event
 * START (CLOCK_MONOTONIC ms) lets several processes begin together.
 * Prints "ns_per_op N" (wall time), "cpu_ns_per_op C" (the calling thread's CPU
 * time), and "begin_ns T0" and "end_ns T1" (CLOCK_MONOTONIC around the
 * ITERATIONS, comparable between processes); on the simulated driver also "calls_KIND N" for each kind of
 * driver call it counts (fracgpu_sim_call_counts), made by the whole process while
 * the ITERATIONS ran: the shim's own calls (its events, queries, its reader thread) too. */
#define _GNU_SOURCE
#include <cuda.h>

#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}
static double now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
/* The calling thread's own CPU time: what a call costs it, whatever else the
 * machine runs (a loaded machine stretches wall time, not this). */
static double thread_cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }

#define CHECK(x)                                                        \
    do {                                                                \
        CUresult r_ = (x);                                              \
        if (r_ != CUDA_SUCCESS) {                                       \
            fprintf(stderr, "%s failed: %d\n", #x, (int)r_);            \
            return 1;                                                   \
        }                                                               \
    } while (0)

typedef int (*call_counts_fn)(unsigned long long *, const char **, int);
enum { MAX_KINDS = 32 };

/* dl_iterate_phdr: the first loaded object that exports the counts. The shim,
 * when preloaded, is what "libcuda.so.1" names here and holds the simulated
 * driver as a local library, out of the global scope, so search every object. */
static const char *counts_symbol = "fracgpu_sim_call_counts";
static int find_counts(struct dl_phdr_info *info, size_t size, void *out) {
    (void)size;
    if (!info->dlpi_name || !*info->dlpi_name) return 0;
    void *h = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return 0;
    void *f = dlsym(h, counts_symbol);
    dlclose(h);
    if (!f) return 0;
    *(void **)out = f;
    return 1;
}

/* The simulated driver's call counts now; on a real driver, those of the calls
 * made through the shim when it is preloaded (the launches, and the events,
 * queries and synchronisations it adds); else 0 kinds. */
static int call_counts(unsigned long long *counts, const char **names) {
    static call_counts_fn f;
    if (!f) dl_iterate_phdr(find_counts, &f);
    if (!f) {
        counts_symbol = "fracgpu_shim_call_counts";
        dl_iterate_phdr(find_counts, &f);
    }
    if (!f) return 0;
    int n = f(counts, names, MAX_KINDS);
    return n < MAX_KINDS ? n : MAX_KINDS;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s alloc-free|passthrough|meminfo|launch|vmm|set-limit|startup|event|event-untimed ITERATIONS [START_MS]\n", argv[0]);
        return 2;
    }
    const char *op = argv[1];
    long n = atol(argv[2]);
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    if (!strcmp(op, "startup")) {
        CUdeviceptr p;
        CHECK(cuMemAlloc_v2(&p, 1 << 20));
        printf("first_alloc_ns %.0f\n", now_ns());
        CHECK(cuMemFree_v2(p));
        return 0;
    }
    CUfunction spin = NULL;
    if (!strcmp(op, "launch")) {
        CUmodule m;
        const char *module = getenv("BENCH_MODULE");
        CHECK(cuModuleLoad(&m, module ? module : "/dev/null"));
        CHECK(cuModuleGetFunction(&spin, m, "fracgpu_spin"));
    }
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    const size_t vmm_size = 2 << 20;
    CUdeviceptr va = 0;
    if (!strcmp(op, "vmm")) CHECK(cuMemAddressReserve(&va, vmm_size, 0, 0, 0));
    CUevent event = NULL;
    if (!strcmp(op, "event")) CHECK(cuEventCreate(&event, CU_EVENT_DEFAULT));
    if (!strcmp(op, "event-untimed")) CHECK(cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
    if (argc >= 4)
        while (now_ns() / 1e6 < atof(argv[3])) usleep(100);
    unsigned long long before[MAX_KINDS], after[MAX_KINDS];
    const char *kinds[MAX_KINDS];
    int nkinds = call_counts(before, kinds);
    double t0 = now_ns(), c0 = thread_cpu_ns();
    for (long i = 0; i < n; i++) {
        if (!strcmp(op, "alloc-free")) {
            CUdeviceptr p;
            CHECK(cuMemAlloc_v2(&p, 1 << 20));
            CHECK(cuMemFree_v2(p));
        } else if (!strcmp(op, "passthrough")) {
            CUdevice d;
            CHECK(cuCtxGetDevice(&d));
        } else if (!strcmp(op, "meminfo")) {
            size_t f, t;
            CHECK(cuMemGetInfo_v2(&f, &t));
        } else if (!strcmp(op, "set-limit")) {
            CHECK(cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, (size_t)(i % 2 ? 8 : 16) << 20));
        } else if (!strcmp(op, "launch")) {
            unsigned long long ns = 0;
            void *args[] = {&ns};
            CHECK(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL));
        } else if (event) {
            CHECK(cuEventRecord(event, NULL));
            CUresult q = cuEventQuery(event);
            if (q != CUDA_SUCCESS && q != CUDA_ERROR_NOT_READY) CHECK(q);
        } else if (!strcmp(op, "vmm")) {
            CUmemGenericAllocationHandle h;
            CHECK(cuMemCreate(&h, vmm_size, &prop, 0));
            CHECK(cuMemMap(va, vmm_size, 0, h, 0));
            CHECK(cuMemUnmap(va, vmm_size));
            CHECK(cuMemRelease(h));
        } else {
            fprintf(stderr, "unknown op %s\n", op);
            return 2;
        }
    }
    double t1 = now_ns(), c1 = thread_cpu_ns();
    call_counts(after, NULL);
    if (!strcmp(op, "launch")) CHECK(cuCtxSynchronize());
    printf("ns_per_op %.1f\ncpu_ns_per_op %.1f\nbegin_ns %.0f\nend_ns %.0f\n", (t1 - t0) / n, (c1 - c0) / n, t0, t1);
    for (int k = 0; k < nkinds; k++) printf("calls_%s %llu\n", kinds[k], after[k] - before[k]);
    return 0;
}
