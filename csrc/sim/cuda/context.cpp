// Contexts: primary (retained per device) and created ones, and each thread's
// stack of current contexts. A context reserves FRACGPU_SIM_CONTEXT_MEMORY of
// device memory for itself (by default 1/256 of the device, see kContextShare),
// as a real context does, and releases it and every
// allocation it still owns when it is destroyed (or its primary context reset).
//
// Limits: the context's own reservation covers the default device heap
// (8 MiB), stack (1 KiB per thread) and printf FIFO (1 MiB), as a real
// context's does. cuCtxSetLimit reserves, at once, what a new size takes
// beyond its default: the heap and FIFO size itself, the stack its per-thread
// size x the device's resident threads (SMs x 2048); shrinking gives it back
// (down to the default), and so does the context's end.
#include "sim.h"

#include <algorithm>
#include <set>

namespace sim {

namespace {

std::set<Context *> &g_contexts = *new std::set<Context *>;                 // live contexts
thread_local std::vector<Context *> t_stack;    // this thread's context stack
unsigned long long g_next_ctx_id = 1;

}  // namespace

bool valid_context(Context *c) { return c && g_contexts.count(c) && c->alive; }

Context *current_context() {
    if (t_stack.empty()) return nullptr;
    Context *c = t_stack.back();
    return valid_context(c) ? c : nullptr;
}

CUresult get_context(Context **out) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    Context *c = current_context();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    *out = c;
    return CUDA_SUCCESS;
}

namespace {
// The defaults of the limits that reserve device memory.
size_t limit_default(CUlimit limit) {
    switch (limit) {
    case CU_LIMIT_STACK_SIZE: return 1024;
    case CU_LIMIT_PRINTF_FIFO_SIZE: return 1 << 20;
    case CU_LIMIT_MALLOC_HEAP_SIZE: return 8 << 20;
    default: return 0;
    }
}
// Bytes of device memory one unit of `limit` reserves (0: it reserves none).
uint64_t limit_reservation_unit(CUlimit limit) {
    switch (limit) {
    case CU_LIMIT_STACK_SIZE: return (uint64_t)g_cfg.sms * 2048;   // every resident thread
    case CU_LIMIT_PRINTF_FIFO_SIZE:
    case CU_LIMIT_MALLOC_HEAP_SIZE: return 1;
    default: return 0;
    }
}
}  // namespace

Context *context_create(int dev, unsigned flags, bool primary, CUresult *err) {
    uint64_t reserve = g_cfg.context_memory;
    if (reserve && !mem_charge(g_devices[dev].phys, reserve)) {
        *err = CUDA_ERROR_OUT_OF_MEMORY;
        return nullptr;
    }
    Context *c = new Context();
    c->dev = dev;
    c->primary = primary;
    c->flags = flags;
    c->id = g_next_ctx_id++;
    c->reserved = reserve;
    c->null_stream = new Stream();
    c->null_stream->ctx = c;
    c->null_stream->is_null = true;
    for (CUlimit l : {CU_LIMIT_STACK_SIZE, CU_LIMIT_PRINTF_FIFO_SIZE, CU_LIMIT_MALLOC_HEAP_SIZE})
        c->limits[l] = limit_default(l);
    c->limits[CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT] = 2048;
    c->limits[CU_LIMIT_MAX_L2_FETCH_GRANULARITY] = 32;
    g_contexts.insert(c);
    *err = CUDA_SUCCESS;
    return c;
}

void context_destroy(Context *c) {
    // Callers hold g_mu through a unique_lock; pending work is finished first,
    // as the driver does when a context goes away.
    c->alive = false;
    engine_drop_context(c);
    free_context_memory(c);
    if (c->reserved) mem_uncharge(g_devices[c->dev].phys, c->reserved);
    for (auto &kv : c->limit_reserved) mem_uncharge(g_devices[c->dev].phys, kv.second);
    c->limit_reserved.clear();
    for (Stream *s : c->streams) {
        stream_forget(s);
        engine_release_stream(s);
    }
    c->streams.clear();
    engine_release_stream(c->null_stream);
    c->null_stream = nullptr;
    g_contexts.erase(c);
    for (Device &d : g_devices)
        if (d.primary == c) d.primary = nullptr;
    // The object itself is kept (tiny) so a stale handle is detected, not a use-after-free.
}

}  // namespace sim

using namespace sim;

namespace {

CUresult create_common(CUcontext *pctx, unsigned flags, CUdevice dev) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c = context_create(dev, flags, false, &rc);
    if (!c) return rc;
    t_stack.push_back(c);
    *pctx = reinterpret_cast<CUcontext>(c);
    return CUDA_SUCCESS;
}

Context *as_ctx(CUcontext h) { return reinterpret_cast<Context *>(h); }

}  // namespace

SIM_API CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags, CUdevice dev) {
    return create_common(pctx, flags, dev);
}
SIM_API CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *p, int n, unsigned int flags, CUdevice dev) {
    return create_common(pctx, flags, dev);
}
SIM_API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    return create_common(pctx, flags, dev);
}
SIM_API CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    return create_common(pctx, flags, dev);
}

SIM_API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    std::unique_lock<std::mutex> lk(g_mu);
    Context *c = as_ctx(ctx);
    if (!valid_context(c) || c->primary) return CUDA_ERROR_INVALID_CONTEXT;
    engine_sync_context(lk, c);
    context_destroy(c);
    t_stack.erase(std::remove(t_stack.begin(), t_stack.end(), c), t_stack.end());
    return CUDA_SUCCESS;
}
SIM_API CUresult cuCtxDestroy(CUcontext ctx) { return cuCtxDestroy_v2(ctx); }

SIM_API CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_context(as_ctx(ctx))) return CUDA_ERROR_INVALID_CONTEXT;
    t_stack.push_back(as_ctx(ctx));
    return CUDA_SUCCESS;
}
SIM_API CUresult cuCtxPushCurrent(CUcontext ctx) { return cuCtxPushCurrent_v2(ctx); }

SIM_API CUresult cuCtxPopCurrent_v2(CUcontext *pctx) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (t_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
    if (pctx) *pctx = reinterpret_cast<CUcontext>(t_stack.back());
    t_stack.pop_back();
    return CUDA_SUCCESS;
}
SIM_API CUresult cuCtxPopCurrent(CUcontext *pctx) { return cuCtxPopCurrent_v2(pctx); }

SIM_API CUresult cuCtxSetCurrent(CUcontext ctx) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (!ctx) {
        if (!t_stack.empty()) t_stack.pop_back();
        return CUDA_SUCCESS;
    }
    std::lock_guard<std::mutex> lk(g_mu);
    if (!valid_context(as_ctx(ctx))) return CUDA_ERROR_INVALID_CONTEXT;
    if (t_stack.empty()) t_stack.push_back(as_ctx(ctx));
    else t_stack.back() = as_ctx(ctx);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetCurrent(CUcontext *pctx) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    *pctx = reinterpret_cast<CUcontext>(current_context());
    return CUDA_SUCCESS;
}

static CUresult ctx_or_current(CUcontext h, Context **out) {
    if (!h) return get_context(out);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (!valid_context(as_ctx(h))) return CUDA_ERROR_INVALID_CONTEXT;
    *out = as_ctx(h);
    return CUDA_SUCCESS;
}

// *out = get(context h, or the current one when h is null); out must not be null.
template <typename T, typename Get>
static CUresult context_attribute(CUcontext h, T *out, Get get) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = ctx_or_current(h, &c);
    if (rc != CUDA_SUCCESS) return rc;
    *out = get(c);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetDevice_v2(CUdevice *device, CUcontext ctx) {
    return context_attribute(ctx, device, [](const Context *c) { return c->dev; });
}
SIM_API CUresult cuCtxGetDevice(CUdevice *device) { return cuCtxGetDevice_v2(device, nullptr); }

SIM_API CUresult cuCtxSynchronize_v2(CUcontext ctx) {
    count_call(Call::CtxSynchronize);
    std::unique_lock<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = ctx_or_current(ctx, &c);
    if (rc != CUDA_SUCCESS) return rc;
    engine_sync_context(lk, c);
    pools_release_over_threshold();
    return c->sticky;
}
SIM_API CUresult cuCtxSynchronize(void) { return cuCtxSynchronize_v2(nullptr); }

SIM_API CUresult cuCtxGetFlags(unsigned int *flags) {
    return context_attribute(nullptr, flags, [](const Context *c) { return c->flags; });
}

SIM_API CUresult cuCtxSetFlags(unsigned int flags) {
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    c->flags = flags;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetId(CUcontext ctx, unsigned long long *id) {
    return context_attribute(ctx, id, [](const Context *c) { return c->id; });
}

SIM_API CUresult cuCtxGetApiVersion(CUcontext ctx, unsigned int *version) {
    // What current drivers report for contexts.
    return context_attribute(ctx, version, [](const Context *) { return 12010u; });
}

SIM_API CUresult cuCtxGetLimit(size_t *value, CUlimit limit) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    auto it = c->limits.find(limit);
    if (it == c->limits.end()) return CUDA_ERROR_UNSUPPORTED_LIMIT;
    *value = it->second;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxSetLimit(CUlimit limit, size_t value) {
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    if (!c->limits.count(limit)) return CUDA_ERROR_UNSUPPORTED_LIMIT;
    uint64_t per_unit = limit_reservation_unit(limit);
    if (per_unit) {
        // Reserve (or give back) the difference now, as the driver does.
        uint64_t before = c->limit_reserved[limit];
        uint64_t base = limit_default(limit) * per_unit;
        if (value > UINT64_MAX / per_unit) return CUDA_ERROR_OUT_OF_MEMORY;
        uint64_t bytes = (uint64_t)value * per_unit;
        uint64_t after = bytes > base ? bytes - base : 0;
        int phys = g_devices[c->dev].phys;
        if (after > before && !mem_charge(phys, after - before)) return CUDA_ERROR_OUT_OF_MEMORY;
        if (after < before) mem_uncharge(phys, before - after);
        c->limit_reserved[limit] = after;
    }
    c->limits[limit] = value;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxGetCacheConfig(CUfunc_cache *config) {
    if (!config) return CUDA_ERROR_INVALID_VALUE;
    *config = CU_FUNC_CACHE_PREFER_NONE;
    return check_init();
}
SIM_API CUresult cuCtxSetCacheConfig(CUfunc_cache config) { return check_init(); }

SIM_API CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuCtxResetPersistingL2Cache(void) { return check_init(); }

// --- primary contexts -------------------------------------------------------

SIM_API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    Device &d = g_devices[dev];
    if (!d.primary) {
        d.primary = context_create(dev, d.primary_flags, true, &rc);
        if (!d.primary) return rc;
    }
    d.primary_refs++;
    *pctx = reinterpret_cast<CUcontext>(d.primary);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::unique_lock<std::mutex> lk(g_mu);
    Device &d = g_devices[dev];
    if (d.primary_refs <= 0 || !d.primary) return CUDA_ERROR_INVALID_CONTEXT;
    if (--d.primary_refs == 0) {
        Context *c = d.primary;
        engine_sync_context(lk, c);
        context_destroy(c);
    }
    return CUDA_SUCCESS;
}
SIM_API CUresult cuDevicePrimaryCtxRelease(CUdevice dev) { return cuDevicePrimaryCtxRelease_v2(dev); }

SIM_API CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::unique_lock<std::mutex> lk(g_mu);
    Device &d = g_devices[dev];
    if (d.primary) {
        Context *c = d.primary;
        engine_sync_context(lk, c);
        context_destroy(c);
    }
    d.primary_refs = 0;
    d.primary_flags = 0;
    return CUDA_SUCCESS;
}
SIM_API CUresult cuDevicePrimaryCtxReset(CUdevice dev) { return cuDevicePrimaryCtxReset_v2(dev); }

SIM_API CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    *flags = g_devices[dev].primary_flags;
    *active = g_devices[dev].primary != nullptr;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    g_devices[dev].primary_flags = flags;
    if (g_devices[dev].primary) g_devices[dev].primary->flags = flags;
    return CUDA_SUCCESS;
}
SIM_API CUresult cuDevicePrimaryCtxSetFlags(CUdevice dev, unsigned int flags) {
    return cuDevicePrimaryCtxSetFlags_v2(dev, flags);
}
