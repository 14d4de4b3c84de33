// Device memory over host memory: allocation, host memory, pointer
// attributes, arrays, pools and virtual memory. Copies and sets are in
// copy.cpp.
//
// Device allocations live in anonymous host mappings but are handed out at
// fake device addresses (from 1 << 44 up, never reused), so a host dereference
// of a device pointer faults as it would on a GPU and a stale pointer is never
// silently valid again. Managed and pinned host memory are host-accessible,
// so they use their host address, as with unified addressing. Every charge
// goes through the shared file (mem_charge), so the device's memory is one
// budget for all processes.
#include "sim.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sim {

namespace {

std::map<uint64_t, Alloc *> &g_allocs = *new std::map<uint64_t, Alloc *>;      // by base address
uint64_t g_next_addr = 1ull << 44;         // fake device address space
unsigned long long g_next_id = 1;

// A stream-ordered pool. Its reserve is device memory it holds: what its live
// allocations use plus what frees left cached. A free keeps its memory in the
// reserve; a synchronize gives back what is beyond the release threshold, and
// cuMemPoolTrimTo what is beyond the bytes to keep, as the driver does.
struct Pool {
    int dev = 0;
    uint64_t release_threshold = 0;
    uint64_t used = 0, used_high = 0;
    uint64_t reserved = 0, reserved_high = 0;
    bool is_default = false;
};
std::vector<Pool *> &g_pools = *new std::vector<Pool *>;

// Pools shared between processes (cuMemPoolExportToShareableHandle), beside
// the pool itself: whether it was imported, and the memfd that names it.
struct PoolSharing {
    bool imported = false;
    int fd = -1;          // exported: the memfd naming the pool's device
};
std::map<Pool *, PoolSharing> &g_pool_sharing = *new std::map<Pool *, PoolSharing>;
void pool_sharing_made(Pool *p, bool imported) { g_pool_sharing[p].imported = imported; }
// A pool made here with a POSIX handle type (so not an imported one). Caller holds g_mu.
bool pool_exportable(CUmemoryPool pool) {
    auto it = g_pool_sharing.find(reinterpret_cast<Pool *>(pool));
    return it != g_pool_sharing.end() && !it->second.imported;
}
void pool_sharing_forget(Pool *p) {
    auto it = g_pool_sharing.find(p);
    if (it == g_pool_sharing.end()) return;
    if (it->second.fd >= 0) close(it->second.fd);
    g_pool_sharing.erase(it);
}

// cuMemCreate's physical memory, or memory imported from another process's
// handle. It lives while the handle has references (cuMemCreate and each
// cuMemRetainAllocationHandle take one, each cuMemRelease drops one) or any
// mapping of it remains, as in the real driver.
struct Physical {
    int dev = 0;
    uint64_t size = 0;
    void *host = nullptr;
    int fd = -1;               // backing memfd when exportable or imported (shared between processes)
    int refs = 1;
    int mappings = 0;
    bool imported = false;     // charged to the device by the process that created it, not here
    CUmemAllocationProp prop{};
};
// The live handles: a handle value not in here is unknown (never created or gone).
std::set<Physical *> &g_physicals = *new std::set<Physical *>;
std::map<uint64_t, uint64_t> &g_reservations = *new std::map<uint64_t, uint64_t>;   // cuMemAddressReserve: base -> size

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

void *map_host(uint64_t size) {
    void *p = mmap(nullptr, round_up(size ? size : 1, 4096), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

void unmap_host(void *p, uint64_t size) { munmap(p, round_up(size ? size : 1, 4096)); }

uint64_t take_addresses(uint64_t size, uint64_t align) {
    g_next_addr = round_up(g_next_addr, align);
    uint64_t a = g_next_addr;
    g_next_addr += round_up(size ? size : 1, kAllocAlign);
    return a;
}

// A new allocation of context c at `base`, in the table (charged nothing).
// Caller holds g_mu.
Alloc *add_alloc(uint64_t base, uint64_t size, void *host, MemKind kind, Context *c) {
    Alloc *a = new Alloc();
    a->base = base;
    a->size = size;
    a->host = host;
    a->kind = kind;
    a->ctx = c;
    a->dev = c->dev;
    a->id = g_next_id++;
    g_allocs[base] = a;
    return a;
}

// Takes `bytes` for a live allocation of `pool`: from what it keeps cached,
// the rest reserved on the device. False: the device is out of memory.
bool pool_take(Pool *pool, uint64_t bytes) {
    uint64_t cached = pool->reserved - pool->used;
    if (bytes > cached) {
        if (!mem_charge(g_devices[pool->dev].phys, bytes - cached)) return false;
        pool->reserved += bytes - cached;
        pool->reserved_high = std::max(pool->reserved_high, pool->reserved);
    }
    pool->used += bytes;
    pool->used_high = std::max(pool->used_high, pool->used);
    return true;
}

// Gives back what `pool` reserves beyond max(its live allocations, keep).
void pool_shrink(Pool *pool, uint64_t keep) {
    uint64_t floor = std::max(pool->used, keep);
    if (pool->reserved <= floor) return;
    mem_uncharge(g_devices[pool->dev].phys, pool->reserved - floor);
    pool->reserved = floor;
}

// Allocates and charges (to the device, or from `pool`'s reserve). Caller holds g_mu.
CUresult alloc_common(Context *c, uint64_t size, MemKind kind, Pool *pool, Alloc **out) {
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    uint64_t charge = round_up(size, kAllocAlign);
    int phys = g_devices[c->dev].phys;
    if (pool ? !pool_take(pool, charge) : !mem_charge(phys, charge)) return CUDA_ERROR_OUT_OF_MEMORY;
    void *host = map_host(size);
    if (!host) {
        if (pool) pool->used -= charge;   // stays in its reserve, cached
        else mem_uncharge(phys, charge);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    uint64_t base = kind == MemKind::Managed ? reinterpret_cast<uint64_t>(host) : take_addresses(size, kAllocAlign);
    Alloc *a = add_alloc(base, size, host, kind, c);
    a->charged = charge;
    if (pool) a->pool = reinterpret_cast<CUmemoryPool>(pool);
    *out = a;
    return CUDA_SUCCESS;
}

void release(Alloc *a) {
    g_allocs.erase(a->base);
    if (a->pool) reinterpret_cast<Pool *>(a->pool)->used -= a->charged;   // kept in its reserve
    else if (a->charged) mem_uncharge(g_devices[a->dev].phys, a->charged);
    if (a->owned_host && a->host) unmap_host(a->host, a->size);
    if (a->fd >= 0) close(a->fd);
    delete a;
}

Pool *default_pool(int dev) {
    Device &d = g_devices[dev];
    if (!d.default_pool) {
        Pool *p = new Pool();
        p->dev = dev;
        p->is_default = true;
        g_pools.push_back(p);
        d.default_pool = reinterpret_cast<CUmemoryPool>(p);
    }
    if (!d.current_pool) d.current_pool = d.default_pool;
    return reinterpret_cast<Pool *>(d.current_pool);
}

bool valid_pool(CUmemoryPool h) {
    return std::find(g_pools.begin(), g_pools.end(), reinterpret_cast<Pool *>(h)) != g_pools.end();
}

void free_physical_if_unused(Physical *p) {
    if (p->refs > 0 || p->mappings > 0) return;
    if (!p->imported) mem_uncharge(g_devices[p->dev].phys, p->size);
    unmap_host(p->host, p->size);
    if (p->fd >= 0) close(p->fd);
    g_physicals.erase(p);
    delete p;
}

Physical *live_physical(CUmemGenericAllocationHandle h) {
    auto it = g_physicals.find(reinterpret_cast<Physical *>(h));
    return it == g_physicals.end() ? nullptr : *it;
}

// Exportable physical memory lives in a memfd, so another process can map the
// same pages; its name carries the device, which an importer reads back.
constexpr char kMemfdPrefix[] = "fracgpu-sim-vmm-dev";

// A memfd of `size` bytes for device `dev`'s memory; -1 when none could be made.
int device_memfd(int dev, uint64_t size) {
    char name[64];
    snprintf(name, sizeof name, "%s%d", kMemfdPrefix, g_devices[dev].phys);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd >= 0 && ftruncate(fd, (off_t)round_up(size, 4096)) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

// The device ordinal of a memfd made by device_memfd (here or in another
// process on this simulated GPU), read back from its name; -1 when it is none.
int memfd_device(int fd) {
    char link[64], target[256];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return -1;
    target[n] = '\0';
    const char *name = strstr(target, kMemfdPrefix);   // "/memfd:fracgpu-sim-vmm-dev<N> (deleted)"
    if (!name) return -1;
    int phys = atoi(name + sizeof kMemfdPrefix - 1);
    for (size_t d = 0; d < g_devices.size(); d++)
        if (g_devices[d].phys == phys) return (int)d;
    return -1;
}

void *map_shared_fd(int fd, uint64_t size) {
    void *p = mmap(nullptr, round_up(size, 4096), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

Alloc *find_alloc(uint64_t addr) {
    auto it = g_allocs.upper_bound(addr);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    Alloc *a = it->second;
    return addr < a->base + std::max<uint64_t>(a->size, 1) ? a : nullptr;
}

void *translate(uint64_t addr, uint64_t len, Alloc **out) {
    Alloc *a = find_alloc(addr);
    if (!a || addr + len > a->base + a->size || addr + len < addr) return nullptr;
    if (out) *out = a;
    return static_cast<char *>(a->host) + (addr - a->base);
}

void free_context_memory(Context *c) {
    std::vector<Alloc *> mine;
    for (auto &kv : g_allocs)
        if (kv.second->ctx == c && kv.second->kind != MemKind::Physical && !kv.second->graph)
            mine.push_back(kv.second);   // graph memory lives with its graph, charged to the graph pool
    for (Alloc *a : mine) release(a);
    // What the context's stream-ordered allocations left in the pools of its device goes with it.
    for (Pool *p : g_pools)
        if (p->dev == c->dev) pool_shrink(p, 0);
}

CUresult alloc_block(Context *c, uint64_t size, Alloc **out) { return alloc_common(c, size, MemKind::Device, nullptr, out); }

Alloc *graph_alloc_create(Context *c, int dev, uint64_t size) {
    void *host = map_host(size);
    if (!host) return nullptr;
    Alloc *a = add_alloc(take_addresses(size, kVmmGranularity), size, host, MemKind::Device, c);
    a->dev = dev;
    a->graph = true;
    return a;
}

void graph_alloc_destroy(Alloc *a) { release(a); }

void free_block(uint64_t base) {
    auto it = g_allocs.find(base);
    if (it != g_allocs.end() && it->second->kind == MemKind::Device) release(it->second);
}

void pools_release_over_threshold() {
    for (Pool *p : g_pools) pool_shrink(p, p->release_threshold);
}

}  // namespace sim

using namespace sim;

namespace {

CUresult free_common(CUdeviceptr dptr, MemKind expect) {
    std::unique_lock<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (dptr == 0) return CUDA_SUCCESS;
    auto it = g_allocs.find(dptr);
    if (it == g_allocs.end()) return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = it->second;
    if (expect == MemKind::Host ? a->kind != MemKind::Host
                                : (a->kind != MemKind::Device && a->kind != MemKind::Managed) || a->ipc_opened)
        return CUDA_ERROR_INVALID_VALUE;
    // Freeing memory that queued work may still use waits for that work, as
    // cuMemFree synchronizes.
    if (a->ctx && valid_context(a->ctx)) engine_sync_context(lk, a->ctx);
    if (a->graph) return graph_alloc_free(a);   // its memory stays with the graph pool
    release(a);
    return CUDA_SUCCESS;
}

size_t format_bytes(CUarray_format f) {
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT: return 4;
    default: return 0;
    }
}

struct ArrayInfo {
    CUDA_ARRAY3D_DESCRIPTOR desc;
};
std::map<Alloc *, ArrayInfo> &g_arrays = *new std::map<Alloc *, ArrayInfo>;

CUresult array_create(CUarray *h, const CUDA_ARRAY3D_DESCRIPTOR *d) {
    if (!h || !d) return CUDA_ERROR_INVALID_VALUE;
    size_t eb = format_bytes(d->Format);
    if (!eb || d->Width == 0 || (d->NumChannels != 1 && d->NumChannels != 2 && d->NumChannels != 4))
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t bytes = (uint64_t)d->Width * std::max<size_t>(d->Height, 1) * std::max<size_t>(d->Depth, 1) *
                     d->NumChannels * eb;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Alloc *a;
    rc = alloc_common(c, bytes, MemKind::Array, nullptr, &a);
    if (rc != CUDA_SUCCESS) return rc;
    g_arrays[a] = ArrayInfo{*d};
    *h = reinterpret_cast<CUarray>(a);
    return CUDA_SUCCESS;
}

}  // namespace

Alloc *sim::as_array(CUarray h) {
    Alloc *a = reinterpret_cast<Alloc *>(h);
    return g_arrays.count(a) ? a : nullptr;
}

// --- allocation --------------------------------------------------------------

namespace {
// A new allocation of `kind` in the current context, at *dptr.
CUresult alloc_current(CUdeviceptr *dptr, size_t bytesize, MemKind kind) {
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Alloc *a;
    rc = alloc_common(c, bytesize, kind, nullptr, &a);
    if (rc == CUDA_SUCCESS) *dptr = a->base;
    return rc;
}
}  // namespace

SIM_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    return alloc_current(dptr, bytesize, MemKind::Device);
}

SIM_API CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    CUdeviceptr p = 0;
    CUresult rc = cuMemAlloc_v2(&p, bytesize);
    *dptr = (CUdeviceptr_v1)p;   // the 32-bit API: truncated, as it always was
    return rc;
}

SIM_API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t width, size_t height,
                                    unsigned int elementSize) {
    if (!dptr || !pPitch || width == 0 || height == 0) return CUDA_ERROR_INVALID_VALUE;
    if (elementSize != 4 && elementSize != 8 && elementSize != 16) return CUDA_ERROR_INVALID_VALUE;
    size_t pitch = (width + 511) / 512 * 512;
    CUresult rc = cuMemAlloc_v2(dptr, pitch * height);
    if (rc == CUDA_SUCCESS) *pPitch = pitch;
    return rc;
}

SIM_API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST) return CUDA_ERROR_INVALID_VALUE;
    return alloc_current(dptr, bytesize, MemKind::Managed);
}

SIM_API CUresult cuMemFree_v2(CUdeviceptr dptr) { return free_common(dptr, MemKind::Device); }
SIM_API CUresult cuMemFree(CUdeviceptr_v1 dptr) { return free_common(dptr, MemKind::Device); }

SIM_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    uint64_t used = mem_used(g_devices[c->dev].phys);
    if (free_bytes) *free_bytes = used >= g_cfg.memory ? 0 : g_cfg.memory - used;
    if (total) *total = g_cfg.memory;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemGetInfo(unsigned int *free_bytes, unsigned int *total) {
    size_t f = 0, t = 0;
    CUresult rc = cuMemGetInfo_v2(&f, &t);
    if (rc == CUDA_SUCCESS) {
        if (free_bytes) *free_bytes = f > 0xffffffffu ? 0xffffffffu : (unsigned)f;
        if (total) *total = t > 0xffffffffu ? 0xffffffffu : (unsigned)t;
    }
    return rc;
}

SIM_API CUresult cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr) {
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    Alloc *a = find_alloc(dptr);
    if (!a) return CUDA_ERROR_NOT_FOUND;
    if (pbase) *pbase = a->base;
    if (psize) *psize = a->size;
    return CUDA_SUCCESS;
}

// --- host memory ---------------------------------------------------------------

SIM_API CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int flags) {
    if (!pp || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    void *host = map_host(bytesize);
    if (!host) return CUDA_ERROR_OUT_OF_MEMORY;
    add_alloc(reinterpret_cast<uint64_t>(host), bytesize, host, MemKind::Host, c);
    *pp = host;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemAllocHost_v2(void **pp, size_t bytesize) { return cuMemHostAlloc(pp, bytesize, 0); }
SIM_API CUresult cuMemAllocHost(void **pp, unsigned int bytesize) { return cuMemHostAlloc(pp, bytesize, 0); }
SIM_API CUresult cuMemFreeHost(void *p) { return free_common(reinterpret_cast<uint64_t>(p), MemKind::Host); }

SIM_API CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int flags) {
    if (!p || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    uint64_t base = reinterpret_cast<uint64_t>(p);
    if (find_alloc(base)) return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    add_alloc(base, bytesize, p, MemKind::Host, c)->owned_host = false;
    return CUDA_SUCCESS;
}
SIM_API CUresult cuMemHostRegister(void *p, size_t bytesize, unsigned int flags) {
    return cuMemHostRegister_v2(p, bytesize, flags);
}

SIM_API CUresult cuMemHostUnregister(void *p) {
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    auto it = g_allocs.find(reinterpret_cast<uint64_t>(p));
    if (it == g_allocs.end() || it->second->owned_host) return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    release(it->second);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *pdptr, void *p, unsigned int flags) {
    if (!pdptr || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    Alloc *a = find_alloc(reinterpret_cast<uint64_t>(p));
    if (!a || a->kind != MemKind::Host) return CUDA_ERROR_INVALID_VALUE;
    *pdptr = reinterpret_cast<uint64_t>(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemHostGetFlags(unsigned int *flags, void *p) {
    if (!flags) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = find_alloc(reinterpret_cast<uint64_t>(p));
    if (!a || a->kind != MemKind::Host) return CUDA_ERROR_INVALID_VALUE;
    *flags = CU_MEMHOSTALLOC_DEVICEMAP;
    return CUDA_SUCCESS;
}

// --- pointer attributes --------------------------------------------------------

static CUresult pointer_attribute(void *data, CUpointer_attribute attr, CUdeviceptr ptr, bool lenient) {
    Alloc *a = find_alloc(ptr);
    if (!a) {
        if (!lenient) return CUDA_ERROR_INVALID_VALUE;
        // cuPointerGetAttributes reports unknown (host) pointers as such.
        switch (attr) {
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *static_cast<unsigned *>(data) = 0; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *static_cast<int *>(data) = -2; break;
        case CU_POINTER_ATTRIBUTE_CONTEXT: *static_cast<CUcontext *>(data) = nullptr; break;
        case CU_POINTER_ATTRIBUTE_IS_MANAGED:
        case CU_POINTER_ATTRIBUTE_MAPPED: *static_cast<int *>(data) = 0; break;
        default: break;
        }
        return CUDA_SUCCESS;
    }
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT: *static_cast<CUcontext *>(data) = reinterpret_cast<CUcontext>(a->ctx); break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *static_cast<unsigned *>(data) = a->kind == MemKind::Host ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *static_cast<CUdeviceptr *>(data) = ptr; break;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (a->kind != MemKind::Host && a->kind != MemKind::Managed) return CUDA_ERROR_INVALID_VALUE;
        *static_cast<void **>(data) = reinterpret_cast<void *>(ptr);
        break;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS: *static_cast<int *>(data) = 1; break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID: *static_cast<unsigned long long *>(data) = a->id; break;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED: *static_cast<int *>(data) = a->kind == MemKind::Managed; break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *static_cast<int *>(data) = a->dev; break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *static_cast<CUdeviceptr *>(data) = a->base; break;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *static_cast<size_t *>(data) = a->size; break;
    case CU_POINTER_ATTRIBUTE_MAPPED: *static_cast<int *>(data) = 1; break;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: *static_cast<int *>(data) = 0; break;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES: *static_cast<unsigned long long *>(data) = 0; break;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: *static_cast<CUmemoryPool *>(data) = a->pool; break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    return pointer_attribute(data, attribute, ptr, false);
}

SIM_API CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attrs, void **data, CUdeviceptr ptr) {
    if (!attrs || !data) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    for (unsigned i = 0; i < n; i++) {
        if (!data[i]) continue;
        rc = pointer_attribute(data[i], attrs[i], ptr, true);
        if (rc != CUDA_SUCCESS) return rc;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuPointerSetAttribute(const void *value, CUpointer_attribute attribute, CUdeviceptr ptr) {
    std::lock_guard<std::mutex> lk(g_mu);
    return find_alloc(ptr) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// --- arrays ----------------------------------------------------------------------

SIM_API CUresult cuArrayCreate_v2(CUarray *h, const CUDA_ARRAY_DESCRIPTOR *d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    CUDA_ARRAY3D_DESCRIPTOR d3{};
    d3.Width = d->Width;
    d3.Height = d->Height;
    d3.Format = d->Format;
    d3.NumChannels = d->NumChannels;
    return array_create(h, &d3);
}
SIM_API CUresult cuArray3DCreate_v2(CUarray *h, const CUDA_ARRAY3D_DESCRIPTOR *d) { return array_create(h, d); }

SIM_API CUresult cuArrayDestroy(CUarray h) {
    std::unique_lock<std::mutex> lk(g_mu);
    Alloc *a = as_array(h);
    if (!a) return CUDA_ERROR_INVALID_HANDLE;
    if (valid_context(a->ctx)) engine_sync_context(lk, a->ctx);
    g_arrays.erase(a);
    release(a);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuArray3DGetDescriptor_v2(CUDA_ARRAY3D_DESCRIPTOR *d, CUarray h) {
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = as_array(h);
    if (!a || !d) return CUDA_ERROR_INVALID_HANDLE;
    *d = g_arrays[a].desc;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuArrayGetDescriptor_v2(CUDA_ARRAY_DESCRIPTOR *d, CUarray h) {
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = as_array(h);
    if (!a || !d) return CUDA_ERROR_INVALID_HANDLE;
    const CUDA_ARRAY3D_DESCRIPTOR &s = g_arrays[a].desc;
    d->Width = s.Width;
    d->Height = s.Height;
    d->Format = s.Format;
    d->NumChannels = s.NumChannels;
    return CUDA_SUCCESS;
}

// --- stream-ordered allocation and pools ---------------------------------------------

static CUresult alloc_async(CUdeviceptr *dptr, size_t size, CUmemoryPool hpool, CUstream h, bool pt) {
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Stream *s;
    rc = resolve_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->capture) {
        if (hpool && !valid_pool(hpool)) return CUDA_ERROR_INVALID_VALUE;
        return capture_alloc(s, size, dptr);   // an allocation node: graph memory, not the pool's
    }
    Pool *pool;
    if (hpool) {
        if (!valid_pool(hpool)) return CUDA_ERROR_INVALID_VALUE;
        pool = reinterpret_cast<Pool *>(hpool);
    } else {
        pool = default_pool(s->ctx->dev);
    }
    // Memory is taken at once, from the pool's reserve or the device.
    Alloc *a;
    rc = alloc_common(s->ctx, size, MemKind::Device, pool, &a);
    if (rc == CUDA_SUCCESS) *dptr = a->base;
    return rc;
}

SIM_API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) {
    return alloc_async(dptr, size, nullptr, s, false);
}
SIM_API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) {
    return alloc_async(dptr, size, nullptr, s, true);
}
SIM_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    return alloc_async(dptr, size, pool, s, false);
}
SIM_API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    return alloc_async(dptr, size, pool, s, true);
}

static CUresult free_async(CUdeviceptr dptr, CUstream h, bool pt) {
    std::unique_lock<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    auto it = g_allocs.find(dptr);
    if (it == g_allocs.end() || it->second->kind != MemKind::Device || it->second->ipc_opened)
        return CUDA_ERROR_INVALID_VALUE;
    Stream *s;
    rc = resolve_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->capture) return capture_free(s, dptr);
    Alloc *a = it->second;
    if (a->graph) return graph_alloc_free(a);   // its memory stays with the graph pool
    // Released when the stream reaches this point.
    engine_run_ordered(lk, s, [a] { release(a); }, false);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) { return free_async(dptr, s, false); }
SIM_API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s) { return free_async(dptr, s, true); }

SIM_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    default_pool(dev);
    *pool = g_devices[dev].default_pool;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    *pool = reinterpret_cast<CUmemoryPool>(default_pool(dev));
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceSetMemPool(CUdevice dev, CUmemoryPool pool) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool) || reinterpret_cast<Pool *>(pool)->dev != dev) return CUDA_ERROR_INVALID_VALUE;
    g_devices[dev].current_pool = pool;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *props) {
    if (!pool || !props || props->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_device(props->location.id);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    if (props->handleTypes & ~CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    Pool *p = new Pool();
    p->dev = props->location.id;
    g_pools.push_back(p);
    if (props->handleTypes) pool_sharing_made(p, false);
    *pool = reinterpret_cast<CUmemoryPool>(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolDestroy(CUmemoryPool pool) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool) || reinterpret_cast<Pool *>(pool)->is_default) return CUDA_ERROR_INVALID_VALUE;
    Pool *p = reinterpret_cast<Pool *>(pool);
    for (Device &d : g_devices)
        if (d.current_pool == pool) d.current_pool = d.default_pool;
    g_pools.erase(std::find(g_pools.begin(), g_pools.end(), p));
    pool_sharing_forget(p);
    // What it keeps cached goes now; its live allocations stay charged until freed.
    pool_shrink(p, 0);
    for (auto &kv : g_allocs)
        if (kv.second->pool == pool) kv.second->pool = nullptr;
    delete p;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool)) return CUDA_ERROR_INVALID_VALUE;
    pool_shrink(reinterpret_cast<Pool *>(pool), minBytesToKeep);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool) || !value) return CUDA_ERROR_INVALID_VALUE;
    Pool *p = reinterpret_cast<Pool *>(pool);
    switch (attr) {
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: p->release_threshold = *static_cast<cuuint64_t *>(value); break;
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH: p->used_high = p->used; break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: p->reserved_high = p->reserved; break;
    default: break;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool) || !value) return CUDA_ERROR_INVALID_VALUE;
    Pool *p = reinterpret_cast<Pool *>(pool);
    switch (attr) {
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *static_cast<cuuint64_t *>(value) = p->release_threshold; break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *static_cast<cuuint64_t *>(value) = p->reserved; break;
    case CU_MEMPOOL_ATTR_USED_MEM_CURRENT: *static_cast<cuuint64_t *>(value) = p->used; break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *static_cast<cuuint64_t *>(value) = p->reserved_high; break;
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH: *static_cast<cuuint64_t *>(value) = p->used_high; break;
    default: *static_cast<int *>(value) = 1; break;   // the reuse policies: all on
    }
    return CUDA_SUCCESS;
}

// --- inter-process memory (cuIpc*) ---------------------------------------------------
//
// A handle names the exporting process and the memfd that backs the allocation
// from then on (its pages move there at the first cuIpcGetMemHandle, at the
// same host address); the opener maps that memfd through /proc/<pid>/fd. The
// device holds the memory once, charged to the exporter.

namespace {
struct IpcHandle {
    char magic[8];
    int32_t pid;
    int32_t fd;
    uint64_t size;
};
constexpr char kIpcMagic[8] = {'F', 'G', 'S', 'I', 'M', 'I', 'P', 'C'};
static_assert(sizeof(IpcHandle) <= sizeof(CUipcMemHandle), "an IPC handle fits CUipcMemHandle");

// Moves a's pages into a memfd, in place. Caller holds g_mu, with a's work done.
bool share_pages(Alloc *a) {
    if (a->fd >= 0) return true;
    int fd = device_memfd(a->dev, a->size);
    if (fd < 0) return false;
    if (pwrite(fd, a->host, a->size, 0) != (ssize_t)a->size ||
        mmap(a->host, round_up(a->size, 4096), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        close(fd);
        return false;
    }
    a->fd = fd;
    return true;
}

// Maps another process's shared pages (an IpcHandle) into context c as a new
// allocation, charged nothing here. Caller holds g_mu.
CUresult open_shared(const IpcHandle &h, Context *c, Alloc **out) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h.pid, (int)h.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return CUDA_ERROR_INVALID_HANDLE;   // the exporter or its allocation is gone
    void *host = memfd_device(fd) == c->dev ? map_shared_fd(fd, h.size) : nullptr;
    if (!host) {
        close(fd);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *out = add_alloc(take_addresses(h.size, kAllocAlign), h.size, host, MemKind::Device, c);
    (*out)->fd = fd;
    return CUDA_SUCCESS;
}

// What an IpcHandle-shaped blob (CUipcMemHandle, CUmemPoolPtrExportData) says.
bool read_handle(const void *blob, IpcHandle *h) {
    memcpy(h, blob, sizeof *h);
    return !memcmp(h->magic, kIpcMagic, sizeof h->magic) && h->size != 0;
}

// Shares the pages of the allocation at `ptr` and describes them in `blob`
// (64 bytes): a cuMemAlloc allocation (from_pool false) or a pointer of an
// exportable pool (from_pool true).
CUresult export_allocation(CUdeviceptr ptr, void *blob, bool from_pool) {
    std::unique_lock<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    auto it = g_allocs.find(ptr);
    if (it == g_allocs.end() || it->second->kind != MemKind::Device || it->second->ipc_opened)
        return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = it->second;
    if (from_pool ? !pool_exportable(a->pool) : a->pool != nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (a->ctx && valid_context(a->ctx)) engine_sync_context(lk, a->ctx);
    if (!share_pages(a)) return CUDA_ERROR_OUT_OF_MEMORY;
    IpcHandle h{};
    memcpy(h.magic, kIpcMagic, sizeof h.magic);
    h.pid = (int32_t)getpid();
    h.fd = a->fd;
    h.size = a->size;
    memset(blob, 0, 64);
    memcpy(blob, &h, sizeof h);
    return CUDA_SUCCESS;
}
}  // namespace

SIM_API CUresult cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr) {
    return handle ? export_allocation(dptr, handle->reserved, false) : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags) {
    if (!pdptr || (flags & ~CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)) return CUDA_ERROR_INVALID_VALUE;
    IpcHandle h;
    if (!read_handle(handle.reserved, &h)) return CUDA_ERROR_INVALID_VALUE;
    if (h.pid == (int32_t)getpid()) return CUDA_ERROR_INVALID_CONTEXT;   // never in the exporting process
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Alloc *a;
    rc = open_shared(h, c, &a);
    if (rc != CUDA_SUCCESS) return rc;
    a->ipc_opened = true;
    *pdptr = a->base;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags) {
    return cuIpcOpenMemHandle_v2(pdptr, handle, flags);
}

SIM_API CUresult cuIpcCloseMemHandle(CUdeviceptr dptr) {
    std::unique_lock<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    auto it = g_allocs.find(dptr);
    if (it == g_allocs.end() || !it->second->ipc_opened) return CUDA_ERROR_INVALID_VALUE;
    if (it->second->ctx && valid_context(it->second->ctx)) engine_sync_context(lk, it->second->ctx);
    release(it->second);
    return CUDA_SUCCESS;
}

// --- pools shared between processes ------------------------------------------------------
//
// A pool made with a POSIX handle type exports a memfd that names its device;
// the importer's pool is a shell that holds only pointers imported into it.
// Each exported pointer's pages are shared as with cuIpcGetMemHandle, and the
// importer's cuMemFree/cuMemFreeAsync of one unmaps it here, charging and
// giving back nothing: the exporter's pool holds the memory.

SIM_API CUresult cuMemPoolExportToShareableHandle(void *handle_out, CUmemoryPool pool, CUmemAllocationHandleType type,
                                                  unsigned long long flags) {
    if (!handle_out || flags) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_pool(pool)) return CUDA_ERROR_INVALID_VALUE;
    Pool *p = reinterpret_cast<Pool *>(pool);
    auto it = g_pool_sharing.find(p);
    if (it == g_pool_sharing.end() || it->second.imported || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_INVALID_VALUE;
    if (it->second.fd < 0) it->second.fd = device_memfd(p->dev, 0);
    int fd = it->second.fd >= 0 ? fcntl(it->second.fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
    *static_cast<int *>(handle_out) = fd;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolImportFromShareableHandle(CUmemoryPool *pool_out, void *handle,
                                                    CUmemAllocationHandleType type, unsigned long long flags) {
    if (!pool_out || flags) return CUDA_ERROR_INVALID_VALUE;
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    int dev = memfd_device((int)reinterpret_cast<intptr_t>(handle));
    if (dev < 0) return CUDA_ERROR_INVALID_VALUE;
    Pool *p = new Pool();
    p->dev = dev;
    g_pools.push_back(p);
    pool_sharing_made(p, true);
    *pool_out = reinterpret_cast<CUmemoryPool>(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemPoolExportPointer(CUmemPoolPtrExportData *data, CUdeviceptr ptr) {
    return data ? export_allocation(ptr, data->reserved, true) : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuMemPoolImportPointer(CUdeviceptr *ptr_out, CUmemoryPool pool, CUmemPoolPtrExportData *data) {
    if (!ptr_out || !data) return CUDA_ERROR_INVALID_VALUE;
    IpcHandle h;
    if (!read_handle(data->reserved, &h)) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    auto sharing = g_pool_sharing.find(reinterpret_cast<Pool *>(pool));
    if (!valid_pool(pool) || sharing == g_pool_sharing.end() || !sharing->second.imported)
        return CUDA_ERROR_INVALID_VALUE;
    Alloc *a;
    rc = open_shared(h, c, &a);
    if (rc != CUDA_SUCCESS) return rc;
    a->pool = pool;
    *ptr_out = a->base;
    return CUDA_SUCCESS;
}

// --- virtual memory management -------------------------------------------------------

SIM_API CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop,
                                               CUmemAllocationGranularity_flags option) {
    if (!g || !prop) return CUDA_ERROR_INVALID_VALUE;
    *g = kVmmGranularity;
    return check_init();
}

SIM_API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                     unsigned long long flags) {
    if (!ptr || size == 0 || size % kVmmGranularity) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    uint64_t base = take_addresses(size, std::max<uint64_t>(alignment, kVmmGranularity));
    g_reservations[base] = size;
    *ptr = base;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = g_reservations.find(ptr);
    if (it == g_reservations.end() || it->second != size) return CUDA_ERROR_INVALID_VALUE;
    g_reservations.erase(it);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                             unsigned long long flags) {
    if (!handle || !prop || size == 0 || size % kVmmGranularity) return CUDA_ERROR_INVALID_VALUE;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    if (prop->requestedHandleTypes & ~CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    CUresult rc = check_device(prop->location.id);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    int dev = prop->location.id;
    if (!mem_charge(g_devices[dev].phys, size)) return CUDA_ERROR_OUT_OF_MEMORY;
    int fd = -1;
    void *host = nullptr;
    if (prop->requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) {
        fd = device_memfd(dev, size);
        if (fd >= 0) host = map_shared_fd(fd, size);
    } else {
        host = map_host(size);
    }
    if (!host) {
        if (fd >= 0) close(fd);
        mem_uncharge(g_devices[dev].phys, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    Physical *p = new Physical();
    p->dev = dev;
    p->size = size;
    p->host = host;
    p->fd = fd;
    p->prop = *prop;
    g_physicals.insert(p);
    *handle = reinterpret_cast<CUmemGenericAllocationHandle>(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    std::lock_guard<std::mutex> lk(g_mu);
    Physical *p = live_physical(handle);
    if (!p || p->refs == 0) return CUDA_ERROR_INVALID_VALUE;
    p->refs--;
    free_physical_if_unused(p);   // otherwise when its last mapping goes
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                          unsigned long long flags) {
    std::lock_guard<std::mutex> lk(g_mu);
    Physical *p = live_physical(handle);
    if (!p || p->refs == 0 || offset + size > p->size || size == 0) return CUDA_ERROR_INVALID_VALUE;
    auto r = g_reservations.upper_bound(ptr);
    if (r == g_reservations.begin()) return CUDA_ERROR_INVALID_VALUE;
    --r;
    if (ptr + size > r->first + r->second) return CUDA_ERROR_INVALID_VALUE;
    if (find_alloc(ptr) || find_alloc(ptr + size - 1)) return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = new Alloc();
    a->base = ptr;
    a->size = size;
    a->host = static_cast<char *>(p->host) + offset;
    a->kind = MemKind::Physical;
    a->dev = p->dev;
    a->owned_host = false;
    a->id = reinterpret_cast<unsigned long long>(p);   // the physical handle, for cuMemRetainAllocationHandle
    a->ctx = current_context();
    g_allocs[ptr] = a;
    p->mappings++;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    std::lock_guard<std::mutex> lk(g_mu);
    std::vector<Alloc *> gone;
    for (auto it = g_allocs.lower_bound(ptr); it != g_allocs.end() && it->first < ptr + size; ++it)
        if (it->second->kind == MemKind::Physical) gone.push_back(it->second);
    if (gone.empty()) return CUDA_ERROR_INVALID_VALUE;
    for (Alloc *a : gone) {
        Physical *p = reinterpret_cast<Physical *>(a->id);
        g_allocs.erase(a->base);
        delete a;
        p->mappings--;
        free_physical_if_unused(p);
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle,
                                              CUmemAllocationHandleType type, unsigned long long flags) {
    if (!shareable || flags) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Physical *p = live_physical(handle);
    if (!p || p->refs == 0) return CUDA_ERROR_INVALID_VALUE;
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || p->fd < 0) return CUDA_ERROR_NOT_PERMITTED;
    int fd = fcntl(p->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
    *static_cast<int *>(shareable) = fd;
    return CUDA_SUCCESS;
}

// Another process's exported memory: the same pages, mapped here. The device
// holds it once, charged to the process that created it.
SIM_API CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle,
                                                CUmemAllocationHandleType type) {
    if (!handle) return CUDA_ERROR_INVALID_VALUE;
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    int fd = (int)reinterpret_cast<intptr_t>(os_handle);
    struct stat st;
    int dev = memfd_device(fd);
    if (dev < 0 || fstat(fd, &st) != 0 || st.st_size <= 0) return CUDA_ERROR_INVALID_VALUE;
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    void *host = own >= 0 ? map_shared_fd(own, (uint64_t)st.st_size) : nullptr;
    if (!host) {
        if (own >= 0) close(own);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    Physical *p = new Physical();
    p->dev = dev;
    p->size = (uint64_t)st.st_size;
    p->host = host;
    p->fd = own;
    p->imported = true;
    p->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p->prop.location.id = dev;
    p->prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    g_physicals.insert(p);
    *handle = reinterpret_cast<CUmemGenericAllocationHandle>(p);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!desc || count == 0) return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = find_alloc(ptr);
    return a && a->kind == MemKind::Physical ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuMemGetAccess(unsigned long long *flags, const CUmemLocation *location, CUdeviceptr ptr) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!flags) return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = find_alloc(ptr);
    *flags = a ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE : CU_MEM_ACCESS_FLAGS_PROT_NONE;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr) {
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = find_alloc(reinterpret_cast<uint64_t>(addr));
    if (!handle || !a || a->kind != MemKind::Physical) return CUDA_ERROR_INVALID_VALUE;
    reinterpret_cast<Physical *>(a->id)->refs++;   // released with cuMemRelease, like the original
    *handle = static_cast<CUmemGenericAllocationHandle>(a->id);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop,
                                                        CUmemGenericAllocationHandle handle) {
    std::lock_guard<std::mutex> lk(g_mu);
    Physical *p = live_physical(handle);
    if (!prop || !p) return CUDA_ERROR_INVALID_VALUE;
    *prop = p->prop;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuMemAdvise_v2(CUdeviceptr ptr, size_t count, CUmem_advise advice, CUmemLocation location) {
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = find_alloc(ptr);
    return a && a->kind == MemKind::Managed ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuMemPrefetchAsync_v2(CUdeviceptr ptr, size_t count, CUmemLocation location, unsigned int flags,
                                       CUstream s) {
    std::lock_guard<std::mutex> lk(g_mu);
    Alloc *a = find_alloc(ptr);
    return a && a->kind == MemKind::Managed ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
