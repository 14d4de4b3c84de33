// Memory the driver reserves outside the allocation calls, on the books as
// the driver holds it:
//
// - cuCtxSetLimit: the device heap, the stack (per-thread size x the device's
//   resident threads, SMs x threads per SM) and the printf FIFO are reserved
//   when the limit is set. A context's own reservation covers their defaults
//   (the size each limit had when the shim first saw it set); what a new size
//   takes beyond that is charged before the driver is called, given back when
//   the driver refuses or the size shrinks, and when the context goes.
// - Stream-ordered pools keep freed memory, up to their release threshold,
//   until a synchronize or cuMemPoolTrimTo gives it back. The books hold each
//   pool's reserve (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT), not the sum of its
//   live allocations: an allocation charges what the pool must reserve beyond
//   what it keeps cached; frees, trims, synchronizes, cuMemGetInfo and any
//   refusal re-read the reserve and give back what the pool released.
// - Modules and libraries: their device globals take memory when they load.
//   The shim reads the names of the globals a PTX image defines and asks the
//   driver their sizes (cuModuleGetGlobal): exact, whatever other threads and
//   processes do meanwhile. The charge follows the load (the sizes are the
//   driver's); past the quota the module is unloaded again and the load fails
//   with CUDA_ERROR_OUT_OF_MEMORY. Given back at unload or the context's end.
//   Binary images (cubin, fatbin) are not read yet: their globals are left to
//   the reconciliation with the device's per-process figure.
#include "quota.h"

#include "process.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

using namespace shim;

namespace {

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------
struct LimitBooks {
    int dev = -1;
    uint64_t base = 0;      // bytes of the size the context had (its reservation covers them)
    uint64_t charged = 0;   // bytes charged beyond base
};
// Held across a whole cuCtxSetLimit, so two threads setting one context's
// limit settle in turn. Never taken inside the pools' lock, nor the reverse.
std::mutex *g_limits_mu = new std::mutex;
std::map<std::pair<CUcontext, int>, LimitBooks> &g_limits = *new std::map<std::pair<CUcontext, int>, LimitBooks>;

// Device bytes one unit of `limit` reserves on `dev`; 0: it reserves none.
uint64_t limit_unit(CUlimit limit, int dev) {
    switch (limit) {
    case CU_LIMIT_MALLOC_HEAP_SIZE:
    case CU_LIMIT_PRINTF_FIFO_SIZE: return 1;
    case CU_LIMIT_STACK_SIZE: {
        int sms = 0, threads = 0;
        auto attr = REAL(cuDeviceGetAttribute);
        if (!attr || attr(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) != CUDA_SUCCESS ||
            attr(&threads, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, dev) != CUDA_SUCCESS || sms <= 0 ||
            threads <= 0)
            return 0;
        return (uint64_t)sms * (uint64_t)threads;
    }
    default: return 0;
    }
}

// ---------------------------------------------------------------------------
// Pools
// ---------------------------------------------------------------------------
struct PoolBooks {
    int dev = -1;
    uint64_t charged = 0;     // what the books hold for this pool
    bool destroyed = false;   // cuMemPoolDestroy'ed: only its live allocations are left
};
struct Block {                // one live stream-ordered allocation
    CUmemoryPool pool;
    uint64_t bytes;
    CUcontext ctx;
};
std::mutex *g_pools_mu = new std::mutex;
std::unordered_map<CUmemoryPool, PoolBooks> &g_pools = *new std::unordered_map<CUmemoryPool, PoolBooks>;
std::unordered_map<CUdeviceptr, Block> &g_blocks = *new std::unordered_map<CUdeviceptr, Block>;
std::atomic<bool> g_pools_charged{false};   // some pool has bytes on the books (a hint: settle checks)

bool pool_attr(CUmemoryPool pool, CUmemPool_attribute attr, uint64_t *out) {
    auto get = REAL(cuMemPoolGetAttribute);
    cuuint64_t v = 0;
    if (!get || get(pool, attr, &v) != CUDA_SUCCESS) return false;
    *out = v;
    return true;
}

// Books of a live pool follow its reserve downwards (callers hold
// g_pools_mu); returns what to give back. Growth is charged by the
// allocation that caused it, never here (that would charge under the lock).
uint64_t settle_locked(CUmemoryPool pool, PoolBooks &b) {
    uint64_t reserved;
    if (b.destroyed || !pool_attr(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved) || reserved >= b.charged)
        return 0;
    uint64_t back = b.charged - reserved;
    b.charged = reserved;
    return back;
}

void give_back(const uint64_t (&back)[kMaxDevices]) {
    for (int d = 0; d < kMaxDevices; d++) quota_uncharge(d, back[d]);
}

void settle_pool(CUmemoryPool pool) {
    uint64_t back = 0;
    int dev = -1;
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        auto it = g_pools.find(pool);
        if (it == g_pools.end()) return;
        dev = it->second.dev;
        back = settle_locked(pool, it->second);
    }
    quota_uncharge(dev, back);
}

// A block of a destroyed pool left (freed, or its context dropped): its
// bytes leave the pool's books, and the pool when nothing is left. Callers
// hold g_pools_mu; returns what to give back.
uint64_t orphan_block_gone(const Block &blk) {
    auto it = g_pools.find(blk.pool);
    if (it == g_pools.end() || !it->second.destroyed) return 0;
    uint64_t back = std::min(blk.bytes, it->second.charged);
    it->second.charged -= back;
    if (it->second.charged == 0) g_pools.erase(it);
    return back;
}

// The shape of every stream-ordered allocation: charge what the pool must
// reserve beyond what it keeps cached, call, then settle its books on the
// reserve the driver reports.
// A stream being captured into a graph: its allocations are the graph's
// allocation nodes, which take memory when the graph runs (graphs.cpp).
bool capturing(CUstream stream, bool per_thread) {
    auto is_capturing = per_thread ? REAL(cuStreamIsCapturing_ptsz) : REAL(cuStreamIsCapturing);
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    return is_capturing && is_capturing(stream, &status) == CUDA_SUCCESS && status != CU_STREAM_CAPTURE_STATUS_NONE;
}

template <typename Call>
CUresult pool_alloc(CUdeviceptr *dptr, size_t bytes, CUmemoryPool pool, CUstream stream, bool per_thread,
                    Call call) {
    int dev;
    CUcontext ctx;
    if (!dptr || !quota_current(&dev, &ctx) || capturing(stream, per_thread)) return call();
    if (!pool) {
        auto get_pool = REAL(cuDeviceGetMemPool);
        if (!get_pool || get_pool(&pool, dev) != CUDA_SUCCESS) return call();
    }
    uint64_t reserved = 0, used = 0;
    if (!pool_attr(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved) ||
        !pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &used))
        reserved = used = 0;   // charge the whole request
    uint64_t cached = reserved > used ? reserved - used : 0;
    uint64_t need = bytes > cached ? bytes - cached : 0;
    CUresult rc = quota_charge(dev, need);
    if (rc != CUDA_SUCCESS) return rc;
    rc = call();
    if (rc != CUDA_SUCCESS) {
        quota_uncharge(dev, need);
        return rc;
    }
    uint64_t more = 0, back = 0;
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        PoolBooks &b = g_pools[pool];
        b.dev = dev;
        b.charged += need;
        g_pools_charged.store(true, std::memory_order_relaxed);
        if (pool_attr(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &reserved)) {
            if (reserved > b.charged) more = reserved - b.charged;   // the pool reserved in larger steps
            else back = settle_locked(pool, b);
        }
        g_blocks[*dptr] = Block{pool, bytes, ctx};
    }
    quota_uncharge(dev, back);
    if (more == 0) return CUDA_SUCCESS;
    if (quota_charge(dev, more) == CUDA_SUCCESS) {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        g_pools[pool].charged += more;
        return CUDA_SUCCESS;
    }
    // The reserve the driver took does not fit: the allocation is refused.
    // (What the pool keeps past this free until the next synchronize is
    // beyond the books: at most one step of its growth.)
    auto free_async = REAL(cuMemFreeAsync);
    if (free_async) free_async(*dptr, stream);
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        g_blocks.erase(*dptr);
    }
    *dptr = 0;
    return CUDA_ERROR_OUT_OF_MEMORY;
}

// After a successful cuMemFreeAsync: the pool keeps the memory until it
// releases it; the books follow its reserve.
void pool_freed(CUdeviceptr dptr) {
    Block blk{nullptr, 0, nullptr};
    uint64_t back = 0;
    int dev = -1;
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        auto it = g_blocks.find(dptr);
        if (it == g_blocks.end()) return;
        blk = it->second;
        g_blocks.erase(it);
        auto p = g_pools.find(blk.pool);
        if (p == g_pools.end()) return;
        dev = p->second.dev;
        back = p->second.destroyed ? orphan_block_gone(blk) : settle_locked(blk.pool, p->second);
    }
    quota_uncharge(dev, back);
}

// ---------------------------------------------------------------------------
// Modules and libraries
// ---------------------------------------------------------------------------
struct ModuleBooks {
    int dev;
    uint64_t bytes;
    CUcontext ctx;   // its globals go with this context
};
std::mutex *g_modules_mu = new std::mutex;
std::unordered_map<void *, ModuleBooks> &g_modules = *new std::unordered_map<void *, ModuleBooks>;

// The names of the variables a PTX text defines in the global state space:
// lines `[.visible|.weak] .global [.align N] .TYPE NAME[...] [= ...];`
// (`.extern` ones are declarations, defined elsewhere). Empty for a binary image.
std::vector<std::string> ptx_global_names(const std::string &ptx) {
    std::vector<std::string> names;
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) return names;
    std::istringstream lines(ptx);
    std::string line;
    while (std::getline(lines, line)) {
        std::istringstream words(line);
        std::string w;
        while (words >> w && (w == ".visible" || w == ".weak")) {
        }
        if (w != ".global") continue;
        while (words >> w && w[0] == '.') {
            if (w == ".align") words >> w;   // its number
        }
        std::string name = w.substr(0, w.find_first_of("[;="));
        if (!name.empty() && name[0] != '.') names.push_back(name);
    }
    return names;
}

// An ELF cubin, a fatbin, a fatbin wrapper: binary images, not read.
bool binary_image(const unsigned char *p) {
    static const unsigned char kMagic[][4] = {{0x7f, 'E', 'L', 'F'}, {0x50, 0xed, 0x55, 0xba}, {0xb1, 0x43, 0x62, 0x46}};
    for (const auto &m : kMagic)   // compared byte by byte, so a shorter NUL-terminated text stops at its end
        if (p[0] == m[0] && p[1] == m[1] && p[2] == m[2] && p[3] == m[3]) return true;
    return false;
}

// The image as text (a PTX file or a NUL-terminated PTX string); empty when binary.
std::string image_text(const void *image, const char *path) {
    if (path) {
        std::ifstream f(path, std::ios::binary);
        unsigned char head[4] = {};
        if (!f.read(reinterpret_cast<char *>(head), sizeof head) || binary_image(head)) return std::string();
        f.seekg(0);
        return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    if (!image || binary_image(static_cast<const unsigned char *>(image))) return std::string();
    return std::string(static_cast<const char *>(image));
}

// Bytes of the globals of `module` named in the image, as the driver reports them.
uint64_t globals_bytes(CUmodule module, const std::vector<std::string> &names) {
    auto get = REAL(cuModuleGetGlobal_v2);
    uint64_t total = 0;
    for (const std::string &n : names) {
        CUdeviceptr p;
        size_t bytes = 0;
        if (get && get(&p, &bytes, module, n.c_str()) == CUDA_SUCCESS) total += bytes;
    }
    return total;
}

// After a successful load of `handle` (a module, or a library with its
// module `module`): charge its globals, or unload it with `unload` and refuse.
template <typename Unload>
CUresult module_loaded(void *handle, CUmodule module, const void *image, const char *path, Unload unload) {
    int dev;
    CUcontext ctx;
    if (!quota_current(&dev, &ctx)) return CUDA_SUCCESS;
    std::vector<std::string> names = ptx_global_names(image_text(image, path));
    if (names.empty() || !module) return CUDA_SUCCESS;
    uint64_t bytes = globals_bytes(module, names);
    if (bytes == 0) return CUDA_SUCCESS;
    if (quota_charge(dev, bytes) != CUDA_SUCCESS) {
        unload();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    std::lock_guard<std::mutex> lk(*g_modules_mu);
    g_modules[handle] = ModuleBooks{dev, bytes, ctx};
    return CUDA_SUCCESS;
}

void module_unloaded(void *handle) {
    ModuleBooks b{-1, 0, nullptr};
    {
        std::lock_guard<std::mutex> lk(*g_modules_mu);
        auto it = g_modules.find(handle);
        if (it == g_modules.end()) return;
        b = it->second;
        g_modules.erase(it);
    }
    quota_uncharge(b.dev, b.bytes);
}

template <typename Load>
CUresult load_module(CUmodule *m, const void *image, const char *path, Load load) {
    CUresult rc = load();
    if (rc != CUDA_SUCCESS || !m) return rc;
    auto unload = REAL(cuModuleUnload);
    return module_loaded(*m, *m, image, path, [&] {
        if (unload) unload(*m);
    });
}

template <typename Load>
CUresult load_library(CUlibrary *lib, const void *image, const char *path, Load load) {
    CUresult rc = load();
    if (rc != CUDA_SUCCESS || !lib) return rc;
    CUmodule module = nullptr;
    auto get_module = REAL(cuLibraryGetModule);
    if (!get_module || get_module(&module, *lib) != CUDA_SUCCESS) module = nullptr;   // no context: nothing loaded yet
    auto unload = REAL(cuLibraryUnload);
    return module_loaded(*lib, module, image, path, [&] {
        if (unload) unload(*lib);
    });
}

void settle_after_sync() {
    if (g_pools_charged.load(std::memory_order_relaxed)) reserve_settle();
}

}  // namespace

// ---------------------------------------------------------------------------
// What quota.cpp calls
// ---------------------------------------------------------------------------
namespace shim {

void reserve_release_context(CUcontext ctx) {
    uint64_t back[kMaxDevices] = {};
    {
        std::lock_guard<std::mutex> lk(*g_limits_mu);
        for (auto it = g_limits.begin(); it != g_limits.end();) {
            if (it->first.first == ctx) {
                if (it->second.dev >= 0 && it->second.dev < kMaxDevices) back[it->second.dev] += it->second.charged;
                it = g_limits.erase(it);
            } else {
                ++it;
            }
        }
    }
    {
        std::lock_guard<std::mutex> lk(*g_modules_mu);
        for (auto it = g_modules.begin(); it != g_modules.end();) {
            if (it->second.ctx == ctx) {
                if (it->second.dev >= 0 && it->second.dev < kMaxDevices) back[it->second.dev] += it->second.bytes;
                it = g_modules.erase(it);
            } else {
                ++it;
            }
        }
    }
    {
        // The context's stream-ordered allocations went with it: the pools
        // they were in may have released their memory.
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        for (auto it = g_blocks.begin(); it != g_blocks.end();) {
            if (it->second.ctx == ctx) {
                auto p = g_pools.find(it->second.pool);
                if (p != g_pools.end() && p->second.dev >= 0 && p->second.dev < kMaxDevices)
                    back[p->second.dev] += orphan_block_gone(it->second);
                it = g_blocks.erase(it);
            } else {
                ++it;
            }
        }
        for (auto &kv : g_pools)
            if (kv.second.dev >= 0 && kv.second.dev < kMaxDevices)
                back[kv.second.dev] += settle_locked(kv.first, kv.second);
    }
    give_back(back);
}

void reserve_settle() {
    uint64_t back[kMaxDevices] = {};
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        bool charged = false;
        for (auto &kv : g_pools) {
            if (kv.second.dev >= 0 && kv.second.dev < kMaxDevices)
                back[kv.second.dev] += settle_locked(kv.first, kv.second);
            charged |= kv.second.charged > 0;
        }
        g_pools_charged.store(charged, std::memory_order_relaxed);
    }
    give_back(back);
}

void reserve_forget_after_fork() {
    g_limits_mu = new (g_limits_mu) std::mutex();
    g_pools_mu = new (g_pools_mu) std::mutex();
    g_modules_mu = new (g_modules_mu) std::mutex();
    g_modules.clear();
    g_limits.clear();
    g_pools.clear();
    g_blocks.clear();
}

}  // namespace shim

// ---------------------------------------------------------------------------
// cuCtxSetLimit
// ---------------------------------------------------------------------------
SHIM_API CUresult cuCtxSetLimit(CUlimit limit, size_t value) {
    REAL_OR_RETURN(real, cuCtxSetLimit);
    int dev;
    CUcontext ctx;
    if (!quota_current(&dev, &ctx) || !ctx) return real(limit, value);
    uint64_t unit = limit_unit(limit, dev);
    if (!unit) return real(limit, value);
    std::lock_guard<std::mutex> lk(*g_limits_mu);
    auto key = std::make_pair(ctx, (int)limit);
    auto it = g_limits.find(key);
    LimitBooks books;
    if (it != g_limits.end()) {
        books = it->second;
    } else {
        size_t current = 0;
        auto get = REAL(cuCtxGetLimit);
        if (!get || get(&current, limit) != CUDA_SUCCESS) return real(limit, value);
        books.dev = dev;
        books.base = (uint64_t)current * unit;
    }
    uint64_t bytes = (uint64_t)value > UINT64_MAX / unit ? UINT64_MAX : (uint64_t)value * unit;
    uint64_t after = bytes > books.base ? bytes - books.base : 0;
    if (after > books.charged) {
        CUresult rc = quota_charge(dev, after - books.charged);
        if (rc != CUDA_SUCCESS) return rc;
    }
    CUresult rc = real(limit, value);
    if (rc != CUDA_SUCCESS) {
        if (after > books.charged) quota_uncharge(dev, after - books.charged);
        return rc;
    }
    if (after < books.charged) quota_uncharge(dev, books.charged - after);
    books.charged = after;
    g_limits[key] = books;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------
// Stream-ordered allocation and pools
// ---------------------------------------------------------------------------
SHIM_API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream s) {
    REAL_OR_RETURN(real, cuMemAllocAsync);
    return pool_alloc(dptr, bytesize, nullptr, s, false, [&] { return real(dptr, bytesize, s); });
}
SHIM_API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream s) {
    REAL_OR_RETURN(real, cuMemAllocAsync_ptsz);
    return pool_alloc(dptr, bytesize, nullptr, s, true, [&] { return real(dptr, bytesize, s); });
}
SHIM_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool, CUstream s) {
    REAL_OR_RETURN(real, cuMemAllocFromPoolAsync);
    if (!pool) return real(dptr, bytesize, pool, s);
    return pool_alloc(dptr, bytesize, pool, s, false, [&] { return real(dptr, bytesize, pool, s); });
}
SHIM_API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                               CUstream s) {
    REAL_OR_RETURN(real, cuMemAllocFromPoolAsync_ptsz);
    if (!pool) return real(dptr, bytesize, pool, s);
    return pool_alloc(dptr, bytesize, pool, s, true, [&] { return real(dptr, bytesize, pool, s); });
}

SHIM_API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) {
    REAL_OR_RETURN(real, cuMemFreeAsync);
    CUresult rc = real(dptr, s);
    if (rc == CUDA_SUCCESS && dptr) pool_freed(dptr);
    return rc;
}
SHIM_API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s) {
    REAL_OR_RETURN(real, cuMemFreeAsync_ptsz);
    CUresult rc = real(dptr, s);
    if (rc == CUDA_SUCCESS && dptr) pool_freed(dptr);
    return rc;
}

SHIM_API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep) {
    REAL_OR_RETURN(real, cuMemPoolTrimTo);
    CUresult rc = real(pool, keep);
    if (rc == CUDA_SUCCESS) settle_pool(pool);
    return rc;
}

SHIM_API CUresult cuMemPoolDestroy(CUmemoryPool pool) {
    REAL_OR_RETURN(real, cuMemPoolDestroy);
    uint64_t used = 0;
    bool known_used = pool_attr(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &used);
    CUresult rc = real(pool);
    if (rc != CUDA_SUCCESS) return rc;
    // What it kept cached goes now; its live allocations stay until freed.
    uint64_t back = 0;
    int dev = -1;
    {
        std::lock_guard<std::mutex> lk(*g_pools_mu);
        auto it = g_pools.find(pool);
        if (it == g_pools.end()) return rc;
        dev = it->second.dev;
        uint64_t keep = known_used ? std::min(used, it->second.charged) : it->second.charged;
        back = it->second.charged - keep;
        it->second.charged = keep;
        it->second.destroyed = true;
        if (keep == 0) g_pools.erase(it);
    }
    quota_uncharge(dev, back);
    return rc;
}

// ---------------------------------------------------------------------------
// Synchronize: where pools give back what is beyond their release threshold.
// The books follow at once; a process with no pool memory on the books pays
// one relaxed load.
// ---------------------------------------------------------------------------
#define SYNC_HOOK(fn, params, args)            \
    SHIM_API CUresult fn params {              \
        REAL_OR_RETURN(real, fn);              \
        CUresult rc = real args;               \
        settle_after_sync();                   \
        return rc;                             \
    }
SYNC_HOOK(cuCtxSynchronize, (void), ())
SYNC_HOOK(cuCtxSynchronize_v2, (CUcontext ctx), (ctx))
SYNC_HOOK(cuStreamSynchronize, (CUstream s), (s))
SYNC_HOOK(cuStreamSynchronize_ptsz, (CUstream s), (s))
SYNC_HOOK(cuEventSynchronize, (CUevent e), (e))
#undef SYNC_HOOK

// ---------------------------------------------------------------------------
// Modules and libraries
// ---------------------------------------------------------------------------
SHIM_API CUresult cuModuleLoad(CUmodule *m, const char *fname) {
    REAL_OR_RETURN(real, cuModuleLoad);
    return load_module(m, nullptr, fname, [&] { return real(m, fname); });
}
SHIM_API CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    REAL_OR_RETURN(real, cuModuleLoadData);
    return load_module(m, image, nullptr, [&] { return real(m, image); });
}
SHIM_API CUresult cuModuleLoadDataEx(CUmodule *m, const void *image, unsigned int n, CUjit_option *o, void **v) {
    REAL_OR_RETURN(real, cuModuleLoadDataEx);
    return load_module(m, image, nullptr, [&] { return real(m, image, n, o, v); });
}
SHIM_API CUresult cuModuleLoadFatBinary(CUmodule *m, const void *fatbin) {
    REAL_OR_RETURN(real, cuModuleLoadFatBinary);
    return load_module(m, fatbin, nullptr, [&] { return real(m, fatbin); });
}
SHIM_API CUresult cuModuleUnload(CUmodule m) {
    REAL_OR_RETURN(real, cuModuleUnload);
    CUresult rc = real(m);
    if (rc == CUDA_SUCCESS) module_unloaded(m);
    return rc;
}

SHIM_API CUresult cuLibraryLoadData(CUlibrary *lib, const void *code, CUjit_option *jo, void **jv, unsigned int nj,
                                    CUlibraryOption *lo, void **lv, unsigned int nl) {
    REAL_OR_RETURN(real, cuLibraryLoadData);
    return load_library(lib, code, nullptr, [&] { return real(lib, code, jo, jv, nj, lo, lv, nl); });
}
SHIM_API CUresult cuLibraryLoadFromFile(CUlibrary *lib, const char *file, CUjit_option *jo, void **jv,
                                        unsigned int nj, CUlibraryOption *lo, void **lv, unsigned int nl) {
    REAL_OR_RETURN(real, cuLibraryLoadFromFile);
    return load_library(lib, nullptr, file, [&] { return real(lib, file, jo, jv, nj, lo, lv, nl); });
}
SHIM_API CUresult cuLibraryUnload(CUlibrary lib) {
    REAL_OR_RETURN(real, cuLibraryUnload);
    CUresult rc = real(lib);
    if (rc == CUDA_SUCCESS) module_unloaded(lib);
    return rc;
}
