// The memory quota's books: every device allocation path is charged to the
// job's partition before the driver is called, and uncharged on every release
// path, including memory dropped with its context. The hooks live with their
// family of the driver API (see quota.h); this file holds what they share.
//
// Check and charge is one atomic step on the partition's counter in the shared
// state (Region::charge): two processes can never pass the limit together.
// The shim remembers what it charged per allocation (by pointer, array or
// context), so a release uncharges exactly that, and a destroyed context
// uncharges everything it owned.
#include "quota.h"

#include <chrono>
#include <cstdio>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>

#include "fracgpu/state.h"
#include "fracgpu/view.h"

namespace shim {
namespace {

constexpr uint64_t kReapIntervalNs = 100'000'000;   // cuMemGetInfo looks for dead jobs this often

// One line at most every kOomLogNs per device, however often a job is refused
// (an allocator that retries, a job that probes its limit).
constexpr uint64_t kOomLogNs = 10'000'000'000ull;

void report_oom(Binding &b, uint64_t requested) {
    uint64_t now = mono_ns(), last = b.oom_logged_ns.load(std::memory_order_relaxed);
    if ((last && now - last < kOomLogNs) || !b.oom_logged_ns.compare_exchange_strong(last, now)) {
        b.oom_unlogged.fetch_add(1, std::memory_order_relaxed);
        return;
    }
    uint64_t unlogged = b.oom_unlogged.exchange(0);
    const fracgpu::SharedProcess &p = b.region.raw()->processes[b.slot];
    const fracgpu::SharedPartition &part = b.region.raw()->partitions[p.partition];
    char more[96] = "";
    if (unlogged) snprintf(more, sizeof more, " (and %llu more refused since the last message)", (unsigned long long)unlogged);
    uint64_t limit = b.limit(), used = part.used.load();
    const fracgpu::LogFigure figures[] = {{"limit_bytes", limit}, {"used_bytes", used},
                                          {"requested_bytes", requested}, {"refused_unlogged", unlogged}};
    fracgpu::LogEvent event;
    event.event = "out-of-memory";
    event.level = "error";
    event.gpu = b.uuid.c_str();
    event.partition = part.name;
    event.figures = figures;
    event.figure_count = sizeof figures / sizeof figures[0];
    fracgpu::log_event(event, "out of memory in partition '%s' on %s: limit %s, in use %s, requested %s%s%s",
                       part.name, b.uuid.c_str(), size_text(limit).c_str(), size_text(used).c_str(),
                       size_text(requested).c_str(), settings().oom_wait_s > 0 ? " (waited FRACGPU_OOM_WAIT)" : "",
                       more);
}


}  // namespace

CUresult charge(Binding *b, uint64_t bytes) {
    if (!b || bytes == 0) return CUDA_SUCCESS;
    if (g_bind_result != CUDA_SUCCESS) return g_bind_result;   // initialisation was refused
    if (!b->ok) {
        if (!b->oom_reported.exchange(true))
            log_event(kRefusedEvent, "%s: allocations on %s are refused", b->refusal.c_str(), b->uuid.c_str());
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (b->region.charge(b->slot, bytes)) return CUDA_SUCCESS;
    // Over quota. Memory of jobs that died is given back first, then, with
    // FRACGPU_OOM_WAIT, wait for others to free some.
    uint64_t deadline = mono_ns() + (uint64_t)(settings().oom_wait_s * 1e9);
    for (;;) {
        b->region.reap();
        pools_settle();
        if (b->region.charge(b->slot, bytes)) return CUDA_SUCCESS;
        if (mono_ns() >= deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    b->region.note_refusal(b->slot);
    report_oom(*b, bytes);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

void uncharge(int dev, uint64_t bytes) {
    if (bytes == 0 || dev < 0 || dev >= g_ndev || !g_bound.load(std::memory_order_acquire)) return;
    if (g_bind[dev].ok) g_bind[dev].region.uncharge(g_bind[dev].slot, bytes);
}

// ---------------------------------------------------------------------------
// What was charged, per allocation
// ---------------------------------------------------------------------------
namespace {
struct Table {
    std::mutex mu;
    std::unordered_map<uint64_t, Charge> map;
};
Table *g_tables = new Table[kKinds];
}  // namespace

void remember(Kind k, uint64_t key, const Charge &c) {
    std::lock_guard<std::mutex> lk(g_tables[k].mu);
    g_tables[k].map[key] = c;
}

// Forgets the charge of `key` and gives its bytes back.
void release(Kind k, uint64_t key) {
    Charge c{0, -1, nullptr};
    {
        std::lock_guard<std::mutex> lk(g_tables[k].mu);
        auto it = g_tables[k].map.find(key);
        if (it == g_tables[k].map.end()) return;
        c = it->second;
        g_tables[k].map.erase(it);
    }
    uncharge(c.dev, c.bytes);
}

// Everything a context owned, when the driver dropped it; its own
// reservation too unless keep_reservation.
void release_context(CUcontext ctx, bool keep_reservation) {
    uint64_t back[kMaxDevices] = {};
    limits_modules_release_context(ctx, back);
    pools_release_context(ctx, back);
    for (int d = 0; d < kMaxDevices; d++) uncharge(d, back[d]);
    for (int k = 0; k < kKinds; k++) {
        if (k == kContext && keep_reservation) continue;
        uint64_t freed[kMaxDevices] = {};
        {
            std::lock_guard<std::mutex> lk(g_tables[k].mu);
            for (auto it = g_tables[k].map.begin(); it != g_tables[k].map.end();) {
                if (it->second.ctx == ctx) {
                    if (it->second.dev >= 0 && it->second.dev < kMaxDevices) freed[it->second.dev] += it->second.bytes;
                    it = g_tables[k].map.erase(it);
                } else {
                    ++it;
                }
            }
        }
        for (int d = 0; d < kMaxDevices; d++) uncharge(d, freed[d]);
    }
}

Where current() {
    Where w;
    if (!g_bound.load(std::memory_order_acquire)) return w;   // nothing enforced: no extra driver calls
    CUdevice d;
    auto get_dev = REAL(cuCtxGetDevice);
    auto get_ctx = REAL(cuCtxGetCurrent);
    if (get_dev && get_dev(&d) == CUDA_SUCCESS) w.dev = d;
    if (get_ctx) get_ctx(&w.ctx);
    return w;
}

void quota_forget_after_fork() {
    for (int k = 0; k < kKinds; k++) {
        new (&g_tables[k].mu) std::mutex();
        g_tables[k].map.clear();
    }
    vmm_forget_after_fork();
    pools_forget_after_fork();
    limits_modules_forget_after_fork();
    graph_forget_after_fork();
    contexts_forget_after_fork();
    reconcile_forget_after_fork();
}

CUresult quota_charge(int dev, uint64_t bytes) { return charge(binding(dev), bytes); }
void quota_uncharge(int dev, uint64_t bytes) { uncharge(dev, bytes); }
bool quota_current(int *dev, CUcontext *ctx) {
    Where w = current();
    *dev = w.dev;
    *ctx = w.ctx;
    return binding(w.dev) != nullptr;
}

}  // namespace shim

using namespace shim;

// ---------------------------------------------------------------------------
// The quota shown as the device's memory
// ---------------------------------------------------------------------------
namespace {
// free/total as the job should see them on device `dev`; false: not governed.
bool virtual_meminfo(int dev, uint64_t real_free, uint64_t *free_out, uint64_t *total_out) {
    Binding *b = binding(dev);
    if (!b || !b->ok) return false;
    pools_settle();   // what pools released at a synchronize
    uint64_t now = mono_ns();
    uint64_t last = b->last_reap_ns.load(std::memory_order_relaxed);
    if (now - last > kReapIntervalNs && b->last_reap_ns.compare_exchange_strong(last, now)) b->region.reap();
    const fracgpu::SharedRegion *r = b->region.raw();
    uint64_t used = r->partitions[r->processes[b->slot].partition].used.load(std::memory_order_relaxed);
    fracgpu::MemoryView v = fracgpu::memory_view(b->limit(), b->region.total_memory(), used, real_free);   // as NVML shows it
    *free_out = v.free;
    *total_out = v.total;
    return true;
}
}  // namespace

SHIM_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    REAL_OR_RETURN(real, cuMemGetInfo_v2);
    CUresult rc = real(free_bytes, total);
    uint64_t f, t;
    if (rc == CUDA_SUCCESS && free_bytes && total && virtual_meminfo(current().dev, *free_bytes, &f, &t)) {
        *free_bytes = f;
        *total = t;
    }
    return rc;
}

SHIM_API CUresult cuMemGetInfo(unsigned int *free_bytes, unsigned int *total) {
    REAL_OR_RETURN(real, cuMemGetInfo);
    CUresult rc = real(free_bytes, total);
    uint64_t f, t;
    if (rc == CUDA_SUCCESS && free_bytes && total && virtual_meminfo(current().dev, *free_bytes, &f, &t)) {
        *free_bytes = (unsigned)(f > 0xffffffffu ? 0xffffffffu : f);
        *total = (unsigned)(t > 0xffffffffu ? 0xffffffffu : t);
    }
    return rc;
}

SHIM_API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    REAL_OR_RETURN(real, cuDeviceTotalMem_v2);
    CUresult rc = real(bytes, dev);
    Binding *b = binding(dev);
    if (rc == CUDA_SUCCESS && bytes && b && b->ok) *bytes = b->limit();
    return rc;
}

SHIM_API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    REAL_OR_RETURN(real, cuDeviceTotalMem);
    CUresult rc = real(bytes, dev);
    Binding *b = binding(dev);
    if (rc == CUDA_SUCCESS && bytes && b && b->ok) *bytes = (unsigned)(b->limit() > 0xffffffffu ? 0xffffffffu : b->limit());
    return rc;
}

