// Graph memory on the books, as the driver reserves it.
//
// A graph's allocation nodes (cuGraphAddMemAllocNode, or cuMemAllocAsync
// captured from a stream) take no memory when they are made or instantiated:
// the driver maps physical memory for an executable graph from the device's
// graph memory pool when the graph is uploaded or first launched (or
// instantiated with CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD), keeps it between
// launches, and returns it to the device only at cuDeviceGraphMemTrim;
// destroying the graph returns it to the pool. The pool's reservation is what
// the device holds, so the books hold it: CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT
// of each device, read after each call that can move it.
//
// - At instantiate, the graph's allocation nodes are read (their sizes, in
//   whole allocation granules): an executable graph with memory is tracked.
// - Before an upload or a launch of a tracked graph that holds no memory yet
//   (first launch, or after a trim), what the pool must take beyond what it
//   holds unused is charged; past the quota the call is refused with
//   CUDA_ERROR_OUT_OF_MEMORY and the driver is not called.
// - After it, the books settle on the reservation the driver reports: growth
//   is charged, shrinkage given back. Growth past the quota undoes an upload
//   or instantiate-with-upload (the graph memory is trimmed again, the
//   executable graph destroyed); a launch cannot be undone, so its excess
//   (only where the driver takes more than the nodes' granules) is left to
//   the reconciliation with the device's per-process figure.
// - cuDeviceGraphMemTrim and cuGraphExecDestroy settle the books afterwards.
//
// Not read yet: allocation nodes inside child graph nodes (their graph is
// charged only by the settle after a launch), and a graph whose allocation
// nodes span devices (charged to the first one's). After a trim, every
// executable graph of the device is taken to hold nothing (one the driver
// kept mapped because it was running is charged again before its next
// launch, and given back by the settle after it).
//
// The launch path takes no lock and makes no driver call for a graph without
// memory nodes: one relaxed load while no graph with memory exists in the
// process, a scan of a small table of atomics otherwise (a lock only past
// kFastSlots such graphs).
#include "quota.h"

#include "process.h"

#include <atomic>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

using namespace shim;

namespace {

struct ExecBooks {
    int dev = -1;
    uint64_t footprint = 0;   // bytes of its allocation nodes, in whole granules
    bool mapped = false;      // uploaded or launched since the last trim: holds its memory
};

std::mutex *g_mu = new std::mutex;   // guards the tables below
std::unordered_map<CUgraphExec, ExecBooks> &g_execs = *new std::unordered_map<CUgraphExec, ExecBooks>;
uint64_t g_charged[kMaxDevices];      // the books' figure for each device's graph pool
std::atomic<int> g_tracked{0};        // executable graphs with memory nodes
// The tracked graphs, as the launch path looks them up without the lock; past
// kFastSlots of them, g_overflow counts the others (only in g_execs).
constexpr int kFastSlots = 64;
std::atomic<CUgraphExec> g_fast[kFastSlots];
std::atomic<int> g_overflow{0};
std::atomic<bool> g_growth_logged{false};

bool reserved_now(int dev, uint64_t *out) {
    auto get = REAL(cuDeviceGetGraphMemAttribute);
    cuuint64_t v = 0;
    if (!get || get(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &v) != CUDA_SUCCESS) return false;
    *out = v;
    return true;
}

uint64_t granularity(int dev) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    size_t g = 0;
    auto get = REAL(cuMemGetAllocationGranularity);
    if (!get || get(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS || g == 0) g = 2ull << 20;
    return g;
}

// The device and bytes (whole granules) of graph g's allocation nodes; false
// when it has none (or they cannot be read).
bool graph_footprint(CUgraph g, ExecBooks *out) {
    auto get_nodes = REAL(cuGraphGetNodes);
    auto get_type = REAL(cuGraphNodeGetType);
    auto get_params = REAL(cuGraphMemAllocNodeGetParams);
    size_t n = 0;
    if (!get_nodes || !get_type || !get_params || get_nodes(g, nullptr, &n) != CUDA_SUCCESS || n == 0)
        return false;
    std::vector<CUgraphNode> nodes(n);
    if (get_nodes(g, nodes.data(), &n) != CUDA_SUCCESS) return false;
    uint64_t grain = 0;
    for (size_t i = 0; i < n; i++) {
        CUgraphNodeType type;
        CUDA_MEM_ALLOC_NODE_PARAMS p{};
        if (get_type(nodes[i], &type) != CUDA_SUCCESS || type != CU_GRAPH_NODE_TYPE_MEM_ALLOC ||
            get_params(nodes[i], &p) != CUDA_SUCCESS)
            continue;
        if (out->dev < 0) {
            out->dev = p.poolProps.location.id;
            grain = granularity(out->dev);
        }
        out->footprint += (p.bytesize + grain - 1) / grain * grain;
    }
    return out->dev >= 0 && out->dev < kMaxDevices;
}

// What device dev's graph pool must take to back `footprint` more bytes:
// beyond what it holds unused.
uint64_t pool_need(int dev, uint64_t footprint) {
    auto get = REAL(cuDeviceGetGraphMemAttribute);
    cuuint64_t reserved = 0, used = 0;
    if (!get || get(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved) != CUDA_SUCCESS ||
        get(dev, CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT, &used) != CUDA_SUCCESS)
        return footprint;
    uint64_t spare = reserved > used ? reserved - used : 0;
    return footprint > spare ? footprint - spare : 0;
}

// The books of dev's graph pool, with `precharged` (charged before the call)
// added, follow the reservation the driver reports. False: it grew past
// the quota (the growth is not on the books).
bool settle(int dev, uint64_t precharged) {
    uint64_t reserved = 0, back = 0, more = 0;
    bool known = reserved_now(dev, &reserved);
    {
        std::lock_guard<std::mutex> lk(*g_mu);
        g_charged[dev] += precharged;
        if (!known) return true;
        if (reserved < g_charged[dev]) back = g_charged[dev] - reserved;
        else more = reserved - g_charged[dev];
        g_charged[dev] -= back;
    }
    quota_uncharge(dev, back);
    if (more == 0) return true;
    if (quota_charge(dev, more) != CUDA_SUCCESS) return false;
    std::lock_guard<std::mutex> lk(*g_mu);
    g_charged[dev] += more;
    return true;
}

// Callers hold g_mu.
void track_locked(CUgraphExec exec, const ExecBooks &b) {
    g_execs[exec] = b;
    g_tracked.fetch_add(1, std::memory_order_relaxed);
    for (auto &slot : g_fast) {
        CUgraphExec none = nullptr;
        if (slot.compare_exchange_strong(none, exec)) return;
    }
    g_overflow.fetch_add(1, std::memory_order_relaxed);
}

void untrack(CUgraphExec exec) {
    std::lock_guard<std::mutex> lk(*g_mu);
    if (!g_execs.erase(exec)) return;
    g_tracked.fetch_sub(1, std::memory_order_relaxed);
    for (auto &slot : g_fast) {
        CUgraphExec mine = exec;
        if (slot.compare_exchange_strong(mine, nullptr)) return;
    }
    g_overflow.fetch_sub(1, std::memory_order_relaxed);
}

bool maybe_tracked(CUgraphExec exec) {
    if (g_tracked.load(std::memory_order_relaxed) == 0) return false;
    for (const auto &slot : g_fast)
        if (slot.load(std::memory_order_relaxed) == exec) return true;
    return g_overflow.load(std::memory_order_relaxed) > 0;
}

bool tracked(CUgraphExec exec, ExecBooks *out) {
    if (!maybe_tracked(exec)) return false;
    std::lock_guard<std::mutex> lk(*g_mu);
    auto it = g_execs.find(exec);
    if (it == g_execs.end()) return false;
    *out = it->second;
    return true;
}

void set_mapped(CUgraphExec exec) {
    std::lock_guard<std::mutex> lk(*g_mu);
    auto it = g_execs.find(exec);
    if (it != g_execs.end()) it->second.mapped = true;
}

// Before the upload or launch of a tracked graph: charge what its memory
// will take of the quota when it holds none yet.
CUresult charge_mapping(const ExecBooks &b, uint64_t *precharged) {
    *precharged = b.mapped ? 0 : pool_need(b.dev, b.footprint);
    return quota_charge(b.dev, *precharged);
}

// The driver gives back what dev's graph pool holds unused; executable graphs
// of dev may have lost their memory (they take it again at their next
// launch), and the books settle on what is left.
CUresult trim(int dev) {
    auto real = REAL(cuDeviceGraphMemTrim);
    CUresult rc = real ? real(dev) : missing_error();
    if (rc != CUDA_SUCCESS) return rc;
    {
        std::lock_guard<std::mutex> lk(*g_mu);
        for (auto &kv : g_execs)
            if (kv.second.dev == dev) kv.second.mapped = false;
    }
    settle(dev, 0);
    return rc;
}

// Every instantiation: track a graph with memory; with `upload` its memory is
// taken now, charged first, and the instantiation undone past the quota.
template <typename Call>
CUresult instantiated(CUgraphExec *ph, CUgraph g, bool upload, Call call) {
    ExecBooks b;
    if (!ph || !graph_footprint(g, &b)) return call();
    uint64_t pre = 0;
    if (upload) {
        CUresult rc = charge_mapping(b, &pre);
        if (rc != CUDA_SUCCESS) return rc;
    }
    CUresult rc = call();
    if (rc != CUDA_SUCCESS) {
        settle(b.dev, pre);
        return rc;
    }
    b.mapped = upload;
    {
        std::lock_guard<std::mutex> lk(*g_mu);
        track_locked(*ph, b);
    }
    if (settle(b.dev, pre)) return CUDA_SUCCESS;
    auto destroy = REAL(cuGraphExecDestroy);
    if (destroy) destroy(*ph);
    untrack(*ph);
    *ph = nullptr;
    trim(b.dev);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

template <typename Call>
CUresult uploaded(CUgraphExec exec, Call call) {
    ExecBooks b;
    if (!tracked(exec, &b)) return call();
    uint64_t pre;
    CUresult rc = charge_mapping(b, &pre);
    if (rc != CUDA_SUCCESS) return rc;
    rc = call();
    if (rc == CUDA_SUCCESS) set_mapped(exec);
    if (settle(b.dev, pre) || rc != CUDA_SUCCESS) return rc;
    trim(b.dev);   // an uploaded graph is idle: its memory goes back
    return CUDA_ERROR_OUT_OF_MEMORY;
}

}  // namespace

namespace shim {

CUresult graph_before_launch(CUgraphExec exec, GraphLaunch *out) {
    ExecBooks b;
    if (!tracked(exec, &b)) return CUDA_SUCCESS;
    out->dev = b.dev;
    return charge_mapping(b, &out->precharged);
}

void graph_after_launch(CUgraphExec exec, const GraphLaunch &l, CUresult rc) {
    if (l.dev < 0) return;
    if (rc == CUDA_SUCCESS) set_mapped(exec);
    if (!settle(l.dev, l.precharged) && !g_growth_logged.exchange(true))
        log("a CUDA graph launch took more graph memory than its allocation nodes on device %d, past the quota; "
            "the excess is not on the books",
            l.dev);
}

void graph_forget_after_fork() {
    g_mu = new (g_mu) std::mutex();
    g_execs.clear();
    for (uint64_t &c : g_charged) c = 0;
    for (auto &slot : g_fast) slot.store(nullptr);
    g_overflow.store(0);
    g_tracked.store(0);
}

}  // namespace shim

SHIM_API CUresult cuGraphInstantiateWithFlags(CUgraphExec *ph, CUgraph g, unsigned long long flags) {
    REAL_OR_RETURN(real, cuGraphInstantiateWithFlags);
    return instantiated(ph, g, false, [&] { return real(ph, g, flags); });
}
SHIM_API CUresult cuGraphInstantiate_v2(CUgraphExec *ph, CUgraph g, CUgraphNode *err_node, char *log, size_t size) {
    REAL_OR_RETURN(real, cuGraphInstantiate_v2);
    return instantiated(ph, g, false, [&] { return real(ph, g, err_node, log, size); });
}
SHIM_API CUresult cuGraphInstantiateWithParams(CUgraphExec *ph, CUgraph g, CUDA_GRAPH_INSTANTIATE_PARAMS *p) {
    REAL_OR_RETURN(real, cuGraphInstantiateWithParams);
    bool upload = p && (p->flags & CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD);
    return instantiated(ph, g, upload, [&] { return real(ph, g, p); });
}
SHIM_API CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *ph, CUgraph g, CUDA_GRAPH_INSTANTIATE_PARAMS *p) {
    REAL_OR_RETURN(real, cuGraphInstantiateWithParams_ptsz);
    bool upload = p && (p->flags & CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD);
    return instantiated(ph, g, upload, [&] { return real(ph, g, p); });
}

SHIM_API CUresult cuGraphUpload(CUgraphExec exec, CUstream s) {
    REAL_OR_RETURN(real, cuGraphUpload);
    return uploaded(exec, [&] { return real(exec, s); });
}
SHIM_API CUresult cuGraphUpload_ptsz(CUgraphExec exec, CUstream s) {
    REAL_OR_RETURN(real, cuGraphUpload_ptsz);
    return uploaded(exec, [&] { return real(exec, s); });
}

SHIM_API CUresult cuGraphExecDestroy(CUgraphExec exec) {
    REAL_OR_RETURN(real, cuGraphExecDestroy);
    CUresult rc = real(exec);
    ExecBooks b;
    if (rc != CUDA_SUCCESS || !tracked(exec, &b)) return rc;
    untrack(exec);
    settle(b.dev, 0);   // its memory stays in the pool until a trim; the books follow the pool
    return rc;
}

SHIM_API CUresult cuDeviceGraphMemTrim(CUdevice dev) {
    REAL_OR_RETURN(real, cuDeviceGraphMemTrim);
    if (dev < 0 || dev >= kMaxDevices) return real(dev);
    return trim(dev);
}
