// Stream-ordered allocation and pools: pools keep freed memory, up to their
// release threshold, until a synchronize or cuMemPoolTrimTo gives it back.
// The books hold each pool's reserve (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT),
// not the sum of its live allocations: an allocation charges what the pool
// must reserve beyond what it keeps cached; frees, trims, synchronizes,
// cuMemGetInfo and any refusal re-read the reserve and give back what the
// pool released.
#include "quota.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <new>
#include <unordered_map>

using namespace shim;

namespace {

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

void settle_after_sync() {
    if (g_pools_charged.load(std::memory_order_relaxed)) pools_settle();
}

}  // namespace

namespace shim {

void pools_release_context(CUcontext ctx, uint64_t (&back)[kMaxDevices]) {
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

void pools_settle() {
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

void pools_forget_after_fork() {
    g_pools_mu = new (g_pools_mu) std::mutex();
    g_pools.clear();
    g_blocks.clear();
}

}  // namespace shim

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

