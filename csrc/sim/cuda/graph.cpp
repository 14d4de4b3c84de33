// Graphs, stream capture and graph memory.
//
// A graph is a list of nodes in the order they were added (a valid order: a
// node's dependencies exist before it), run in that order on the launch
// stream. Nodes: kernels, memsets, host work recorded by stream capture,
// empty nodes, and memory allocation and free nodes.
//
// Stream capture: while a stream captures, the engine records the work sent
// to it (kernels, copies, sets, host functions) as graph nodes instead of
// running it; cuMemAllocAsync/cuMemFreeAsync become allocation and free
// nodes. What a capture cannot express here (a synchronization, an event
// record or wait on the capturing stream) invalidates it, as cross-stream
// capture is not simulated.
//
// Graph memory, as the driver manages it (CUDA programming guide, "Graph
// Memory Nodes"): an allocation node's address is fixed when the node is made.
// Physical memory is not taken at instantiation (the stream is not known
// yet) but when the executable graph is uploaded or first launched: it is
// mapped from the device's graph memory pool, which takes from the device
// what it does not already hold. The mapping stays with the executable
// graph between launches. Destroying the graph returns its memory to the
// pool, not to the device; cuDeviceGraphMemTrim gives back to the device what
// no graph uses (an executable graph that is idle and has no unfreed
// allocation is unmapped, and mapped again at its next launch). Each
// allocation takes whole granules (2 MiB, cuMemGetAllocationGranularity);
// memory is not shared between allocations of one graph or between graphs.
// The pool is per process and device (RESERVED/USED_MEM_CURRENT say what it
// holds and what graphs use), charged to the device like all memory, so it
// is given back when the process ends.
#include "sim.h"

#include <algorithm>
#include <deque>
#include <memory>
#include <set>
#include <unordered_map>
#include <vector>

namespace sim {
namespace {

struct GraphExec;

// The memory of one allocation node.
struct Block {
    Alloc *alloc = nullptr;            // in the allocation table while the block lives
    uint64_t bytes = 0;                // what it takes of the graph pool (whole granules)
    int dev = 0;
    bool freed_in_graph = false;       // a free node frees it (its own graph's or another's)
    bool outstanding = false;          // launched and not freed yet
    bool orphan = false;               // outstanding after its executable graph was destroyed
    ~Block() {
        if (alloc) graph_alloc_destroy(alloc);
    }
};

struct Node {
    CUgraphNodeType type = CU_GRAPH_NODE_TYPE_EMPTY;
    Op op{Op::Host, 0, 0, nullptr, nullptr};   // kernel, memset, host work: replayed at each launch
    std::shared_ptr<Block> block;               // an allocation node's memory
    CUdeviceptr free_ptr = 0;                   // a free node's address
};

struct Graph {
    std::deque<Node> nodes;            // stable addresses: a node's handle is its address
    GraphExec *exec = nullptr;         // its one instantiation, when it has memory nodes
    bool has_memory_nodes() const {
        return std::any_of(nodes.begin(), nodes.end(), [](const Node &n) {
            return n.type == CU_GRAPH_NODE_TYPE_MEM_ALLOC || n.type == CU_GRAPH_NODE_TYPE_MEM_FREE;
        });
    }
};

struct GraphExec {
    std::vector<Node> nodes;
    Graph *graph = nullptr;            // null once the graph is destroyed
    std::vector<std::shared_ptr<Block>> blocks;   // its allocation nodes' memory
    int dev = -1;                      // the device of its blocks (-1: none)
    uint64_t footprint = 0;            // bytes its blocks take of the graph pool
    bool mapped = false;               // holds footprint of the pool
    bool auto_free = false;            // CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
    std::shared_ptr<Record> last;      // the end of its last launch
};


}  // namespace

struct Capture {
    Graph *graph = nullptr;
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    unsigned long long id = 0;
    bool invalid = false;
};

namespace {

// The graph memory pool of each device (this process's).
struct GraphPool {
    uint64_t reserved = 0, reserved_high = 0;   // held on the device
    uint64_t used = 0, used_high = 0;           // mapped by graphs, or unfreed allocations
};
GraphPool g_pools[kMaxDevices];

std::set<Graph *> &g_graphs = *new std::set<Graph *>;
std::set<GraphExec *> &g_execs = *new std::set<GraphExec *>;
std::set<Node *> &g_nodes = *new std::set<Node *>;   // live nodes of live graphs
// Allocations launched and not freed yet, by address: freed by cuMemFree,
// cuMemFreeAsync or another graph's free node, even after their graph is gone.
std::unordered_map<uint64_t, std::shared_ptr<Block>> &g_outstanding =
    *new std::unordered_map<uint64_t, std::shared_ptr<Block>>;
unsigned long long g_next_capture_id = 1;
thread_local CUstreamCaptureMode t_capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;

uint64_t granules(uint64_t size) { return (size + kVmmGranularity - 1) / kVmmGranularity * kVmmGranularity; }

Graph *as_graph(CUgraph h) {
    Graph *g = reinterpret_cast<Graph *>(h);
    return g_graphs.count(g) ? g : nullptr;
}
GraphExec *as_exec(CUgraphExec h) {
    GraphExec *e = reinterpret_cast<GraphExec *>(h);
    return g_execs.count(e) ? e : nullptr;
}

Node *add_node(Graph *g, Node n) {
    g->nodes.push_back(std::move(n));
    Node *p = &g->nodes.back();
    g_nodes.insert(p);
    return p;
}

// Checks a node-creation call: the graph, and each dependency is a node of it.
CUresult check_add(Graph *g, const CUgraphNode *deps, size_t ndeps) {
    if (!g) return CUDA_ERROR_INVALID_VALUE;
    if (ndeps && !deps) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < ndeps; i++) {
        Node *d = reinterpret_cast<Node *>(deps[i]);
        if (!g_nodes.count(d) ||
            std::none_of(g->nodes.begin(), g->nodes.end(), [d](const Node &n) { return &n == d; }))
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// A new allocation node's memory, `size` bytes on device `dev` for context c.
CUresult new_block(Context *c, int dev, uint64_t size, std::shared_ptr<Block> *out) {
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    Alloc *a = graph_alloc_create(c, dev, size);
    if (!a) return CUDA_ERROR_OUT_OF_MEMORY;
    auto b = std::make_shared<Block>();
    b->alloc = a;
    b->bytes = granules(size);
    b->dev = dev;
    *out = std::move(b);
    return CUDA_SUCCESS;
}

// The block a free node of graph g may free at dptr: an allocation node's
// memory (of g or of another graph) not freed by a free node yet.
CUresult block_to_free(Graph *g, CUdeviceptr dptr, std::shared_ptr<Block> *out) {
    for (Graph *o : g_graphs)
        for (Node &n : o->nodes)
            if (n.block && n.block->alloc->base == dptr) {
                if (n.block->freed_in_graph) return CUDA_ERROR_INVALID_VALUE;
                *out = n.block;
                return CUDA_SUCCESS;
            }
    auto it = g_outstanding.find(dptr);   // its graph is gone: launched, not freed
    if (it == g_outstanding.end() || it->second->freed_in_graph) return CUDA_ERROR_INVALID_VALUE;
    *out = it->second;
    return CUDA_SUCCESS;
}

CUresult add_free_node(Graph *g, CUdeviceptr dptr, Node **out) {
    std::shared_ptr<Block> b;
    CUresult rc = block_to_free(g, dptr, &b);
    if (rc != CUDA_SUCCESS) return rc;
    b->freed_in_graph = true;
    Node n;
    n.type = CU_GRAPH_NODE_TYPE_MEM_FREE;
    n.free_ptr = dptr;
    *out = add_node(g, std::move(n));
    return CUDA_SUCCESS;
}

// An outstanding allocation is freed (in API order): the memory it held for
// a destroyed executable graph goes back to the pool.
void block_freed(const std::shared_ptr<Block> &b) {
    if (!b->outstanding) return;
    b->outstanding = false;
    if (b->orphan) {
        g_pools[b->dev].used -= b->bytes;
        b->orphan = false;
    }
    g_outstanding.erase(b->alloc->base);
}

// The pool backs e's blocks: from what it holds unused, the rest taken from
// the device. CUDA_ERROR_OUT_OF_MEMORY when the device has not enough.
CUresult map_exec(GraphExec *e) {
    if (e->mapped || e->footprint == 0) return CUDA_SUCCESS;
    GraphPool &p = g_pools[e->dev];
    uint64_t spare = p.reserved - p.used;
    if (e->footprint > spare) {
        if (!mem_charge(g_devices[e->dev].phys, e->footprint - spare)) return CUDA_ERROR_OUT_OF_MEMORY;
        p.reserved += e->footprint - spare;
        p.reserved_high = std::max(p.reserved_high, p.reserved);
    }
    p.used += e->footprint;
    p.used_high = std::max(p.used_high, p.used);
    e->mapped = true;
    return CUDA_SUCCESS;
}

// e's memory goes back to the pool, except its unfreed allocations' (kept
// in use until they are freed).
void unmap_exec(GraphExec *e) {
    if (!e->mapped) return;
    GraphPool &p = g_pools[e->dev];
    for (const auto &b : e->blocks) {
        if (b->outstanding) b->orphan = true;
        else p.used -= b->bytes;
    }
    e->mapped = false;
}

bool exec_busy(const GraphExec *e) {
    return (e->last && (!e->last->done || e->last->ts > now_ns())) ||
           std::any_of(e->blocks.begin(), e->blocks.end(), [](const std::shared_ptr<Block> &b) { return b->outstanding; });
}

CUresult instantiate(CUgraphExec *ph, CUgraph hg, unsigned long long flags, CUstream upload, bool *uploaded) {
    if (!ph) return CUDA_ERROR_INVALID_VALUE;
    Graph *g = as_graph(hg);
    if (!g) return CUDA_ERROR_INVALID_VALUE;
    bool memory = g->has_memory_nodes();
    if (memory && g->exec) return CUDA_ERROR_INVALID_VALUE;   // one instantiation at a time
    GraphExec *e = new GraphExec;
    e->nodes.assign(g->nodes.begin(), g->nodes.end());
    e->auto_free = flags & CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    for (const Node &n : e->nodes) {
        if (!n.block) continue;
        if (e->dev >= 0 && n.block->dev != e->dev) {   // one device's memory per graph here
            delete e;
            return CUDA_ERROR_NOT_SUPPORTED;
        }
        e->dev = n.block->dev;
        e->blocks.push_back(n.block);
        e->footprint += n.block->bytes;
    }
    if (memory) {
        e->graph = g;
        g->exec = e;
    }
    g_execs.insert(e);
    *ph = reinterpret_cast<CUgraphExec>(e);
    if (uploaded) {
        Stream *s;
        CUresult rc = resolve_stream(upload, false, &s);
        if (rc == CUDA_SUCCESS) rc = map_exec(e);
        *uploaded = rc == CUDA_SUCCESS;
        return rc;
    }
    return CUDA_SUCCESS;
}

void destroy_exec(std::unique_lock<std::mutex> &lk, GraphExec *e) {
    // Its launches finish first: their work refers to its memory.
    if (e->last) engine_wait(lk, e->last);
    g_execs.erase(e);
    unmap_exec(e);
    if (e->graph) e->graph->exec = nullptr;
    delete e;
}

// The graph exec `h` and the stream `hs` a launch or an upload names (callers hold g_mu).
CUresult exec_on_stream(CUgraphExec h, CUstream hs, bool pt, GraphExec **e, Stream **s) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    *e = as_exec(h);
    if (!*e) return CUDA_ERROR_INVALID_HANDLE;
    return resolve_stream(hs, pt, s);
}

CUresult graph_launch(CUgraphExec h, CUstream hs, bool pt) {
    count_call(Call::GraphLaunch);
    std::unique_lock<std::mutex> lk(g_mu);
    GraphExec *e;
    Stream *s;
    CUresult rc = exec_on_stream(h, hs, pt, &e, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->ctx->sticky) return s->ctx->sticky;
    rc = capture_check(s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->capture && e->footprint) return capture_refuse(s);   // child graphs with memory nodes: not simulated
    for (const auto &b : e->blocks) {
        if (!b->outstanding) continue;
        if (!e->auto_free) return CUDA_ERROR_INVALID_VALUE;   // its last launch's allocation is not freed
        block_freed(b);
    }
    rc = map_exec(e);
    if (rc != CUDA_SUCCESS) return rc;
    std::vector<Node> nodes = e->nodes;   // the queue may wait (and unlock) while e changes
    for (const Node &n : nodes) {
        switch (n.type) {
        case CU_GRAPH_NODE_TYPE_MEM_ALLOC:
            if (!n.block->freed_in_graph) {
                n.block->outstanding = true;
                g_outstanding[n.block->alloc->base] = n.block;
            }
            break;
        case CU_GRAPH_NODE_TYPE_MEM_FREE: {
            auto it = g_outstanding.find(n.free_ptr);
            if (it != g_outstanding.end()) block_freed(std::shared_ptr<Block>(it->second));
            break;
        }
        case CU_GRAPH_NODE_TYPE_EMPTY: break;
        default: engine_enqueue(lk, s, n.op); break;
        }
    }
    if (g_execs.count(e)) e->last = engine_mark(s);
    return CUDA_SUCCESS;
}

CUresult graph_upload(CUgraphExec h, CUstream hs, bool pt) {
    std::lock_guard<std::mutex> lk(g_mu);
    GraphExec *e;
    Stream *s;
    CUresult rc = exec_on_stream(h, hs, pt, &e, &s);
    return rc != CUDA_SUCCESS ? rc : map_exec(e);
}

// The stream `h` a capture call names, once the driver is initialised (callers hold g_mu).
CUresult capture_stream(CUstream h, bool pt, Stream **s) {
    CUresult rc = check_init();
    return rc != CUDA_SUCCESS ? rc : resolve_stream(h, pt, s);
}

CUresult begin_capture(CUstream h, CUstreamCaptureMode mode, bool pt) {
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    Stream *s;
    rc = resolve_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->is_null) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;   // the legacy stream cannot be captured
    if (s->capture) return CUDA_ERROR_ILLEGAL_STATE;
    Capture *cap = new Capture;
    cap->graph = new Graph;
    g_graphs.insert(cap->graph);
    cap->mode = mode;
    cap->id = g_next_capture_id++;
    s->capture = cap;
    return CUDA_SUCCESS;
}

void drop_graph(Graph *g) {
    for (Node &n : g->nodes) g_nodes.erase(&n);
    if (g->exec) g->exec->graph = nullptr;
    g_graphs.erase(g);
    delete g;
}

CUresult end_capture(CUstream h, CUgraph *out, bool pt) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = capture_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    Capture *cap = s->capture;
    if (!cap) return CUDA_ERROR_ILLEGAL_STATE;
    s->capture = nullptr;
    *out = nullptr;
    if (cap->invalid) {
        drop_graph(cap->graph);
        delete cap;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *out = reinterpret_cast<CUgraph>(cap->graph);
    delete cap;
    return CUDA_SUCCESS;
}

CUresult capture_info(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *graph,
                      const CUgraphNode **deps, const CUgraphEdgeData **edges, size_t *ndeps, bool pt) {
    std::lock_guard<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = capture_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    Capture *cap = s->capture;
    if (status)
        *status = !cap ? CU_STREAM_CAPTURE_STATUS_NONE
                       : cap->invalid ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (id && cap) *id = cap->id;
    if (graph) *graph = cap ? reinterpret_cast<CUgraph>(cap->graph) : nullptr;
    // The stream's dependencies: its last node (the nodes run in order).
    static thread_local CUgraphNode t_last;
    t_last = cap && !cap->graph->nodes.empty() ? reinterpret_cast<CUgraphNode>(&cap->graph->nodes.back()) : nullptr;
    if (deps) *deps = t_last ? &t_last : nullptr;
    if (edges) *edges = nullptr;
    if (ndeps) *ndeps = t_last ? 1 : 0;
    return CUDA_SUCCESS;
}

Node *as_node(CUgraphNode h) {
    Node *n = reinterpret_cast<Node *>(h);
    return g_nodes.count(n) ? n : nullptr;
}

// The node `h` when it is one of this type, else null (under g_mu).
Node *as_node_of(CUgraphNode h, CUgraphNodeType type) {
    Node *n = as_node(h);
    return n && n->type == type ? n : nullptr;
}

CUresult graph_mem_attribute(CUdevice dev, CUgraphMem_attribute attr, void *value, bool set) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    GraphPool &p = g_pools[dev];
    cuuint64_t *v = static_cast<cuuint64_t *>(value);
    if (set) {
        // Only the high watermarks can be set, and only reset (to 0: they then
        // read what is held now).
        if (*v != 0) return CUDA_ERROR_INVALID_VALUE;
        if (attr == CU_GRAPH_MEM_ATTR_USED_MEM_HIGH) p.used_high = p.used;
        else if (attr == CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH) p.reserved_high = p.reserved;
        else return CUDA_ERROR_INVALID_VALUE;
        return CUDA_SUCCESS;
    }
    switch (attr) {
    case CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT: *v = p.used; break;
    case CU_GRAPH_MEM_ATTR_USED_MEM_HIGH: *v = p.used_high; break;
    case CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT: *v = p.reserved; break;
    case CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH: *v = p.reserved_high; break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// A memset node's work: its memory is found at each run (a graph
// allocation's is there only while its graph runs).
Op memset_op(Context *c, const CUDA_MEMSET_NODE_PARAMS &p) {
    Op op{Op::Host, 0, 0, nullptr, nullptr};
    op.action = [c, p] {
        size_t pitch = p.pitch ? p.pitch : p.width * p.elementSize;
        size_t span = pitch * (p.height - 1) + p.width * p.elementSize;
        char *base = static_cast<char *>(translate(p.dst, span));
        if (!base) {
            c->sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            return;
        }
        for (size_t row = 0; row < p.height; row++) {
            char *q = base + row * pitch;
            for (size_t i = 0; i < p.width; i++) {
                if (p.elementSize == 1) q[i] = (char)p.value;
                else if (p.elementSize == 2) reinterpret_cast<unsigned short *>(q)[i] = (unsigned short)p.value;
                else reinterpret_cast<unsigned *>(q)[i] = p.value;
            }
        }
    };
    return op;
}

}  // namespace

// --- what the engine and the memory calls use ----------------------------------------------

void capture_record(Stream *s, Op op) {
    Capture *cap = s->capture;
    if (cap->invalid) return;
    Node n;
    n.type = op.kind == Op::Kernel ? CU_GRAPH_NODE_TYPE_KERNEL : CU_GRAPH_NODE_TYPE_HOST;
    n.op = std::move(op);
    add_node(cap->graph, std::move(n));
}

CUresult capture_check(Stream *s) {
    return s->capture && s->capture->invalid ? CUDA_ERROR_STREAM_CAPTURE_INVALIDATED : CUDA_SUCCESS;
}

CUresult capture_refuse(Stream *s) {
    if (!s->capture) return CUDA_SUCCESS;
    s->capture->invalid = true;
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

void capture_abandon(Stream *s) {
    if (!s->capture) return;
    drop_graph(s->capture->graph);
    delete s->capture;
    s->capture = nullptr;
}

CUresult capture_alloc(Stream *s, uint64_t size, CUdeviceptr *dptr) {
    CUresult rc = capture_check(s);
    if (rc != CUDA_SUCCESS) return rc;
    Node n;
    n.type = CU_GRAPH_NODE_TYPE_MEM_ALLOC;
    rc = new_block(s->ctx, s->ctx->dev, size, &n.block);
    if (rc != CUDA_SUCCESS) return rc;
    *dptr = n.block->alloc->base;
    add_node(s->capture->graph, std::move(n));
    return CUDA_SUCCESS;
}

CUresult capture_free(Stream *s, CUdeviceptr dptr) {
    CUresult rc = capture_check(s);
    if (rc != CUDA_SUCCESS) return rc;
    Node *n;
    rc = add_free_node(s->capture->graph, dptr, &n);
    // Freeing memory that is not a graph allocation is not simulated in a capture.
    return rc == CUDA_SUCCESS ? rc : capture_refuse(s);
}

CUresult graph_alloc_free(Alloc *a) {
    auto it = g_outstanding.find(a->base);
    if (it == g_outstanding.end()) return CUDA_ERROR_INVALID_VALUE;   // freed in its graph, or not launched
    block_freed(std::shared_ptr<Block>(it->second));
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

// --- stream capture --------------------------------------------------------------------------

SIM_API CUresult cuStreamBeginCapture_v2(CUstream h, CUstreamCaptureMode mode) { return begin_capture(h, mode, false); }
SIM_API CUresult cuStreamBeginCapture_v2_ptsz(CUstream h, CUstreamCaptureMode mode) {
    return begin_capture(h, mode, true);
}
SIM_API CUresult cuStreamBeginCapture(CUstream h) { return begin_capture(h, CU_STREAM_CAPTURE_MODE_GLOBAL, false); }
SIM_API CUresult cuStreamBeginCapture_ptsz(CUstream h) { return begin_capture(h, CU_STREAM_CAPTURE_MODE_GLOBAL, true); }
SIM_API CUresult cuStreamEndCapture(CUstream h, CUgraph *g) { return end_capture(h, g, false); }
SIM_API CUresult cuStreamEndCapture_ptsz(CUstream h, CUgraph *g) { return end_capture(h, g, true); }

SIM_API CUresult cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus *status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, nullptr, nullptr, nullptr, nullptr, nullptr, false);
}
SIM_API CUresult cuStreamIsCapturing_ptsz(CUstream h, CUstreamCaptureStatus *status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, nullptr, nullptr, nullptr, nullptr, nullptr, true);
}
SIM_API CUresult cuStreamGetCaptureInfo(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, nullptr, nullptr, nullptr, nullptr, false);
}
SIM_API CUresult cuStreamGetCaptureInfo_ptsz(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, nullptr, nullptr, nullptr, nullptr, true);
}
SIM_API CUresult cuStreamGetCaptureInfo_v2(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *g,
                                           const CUgraphNode **deps, size_t *ndeps) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, g, deps, nullptr, ndeps, false);
}
SIM_API CUresult cuStreamGetCaptureInfo_v2_ptsz(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id,
                                                CUgraph *g, const CUgraphNode **deps, size_t *ndeps) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, g, deps, nullptr, ndeps, true);
}
SIM_API CUresult cuStreamGetCaptureInfo_v3(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *g,
                                           const CUgraphNode **deps, const CUgraphEdgeData **edges, size_t *ndeps) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, g, deps, edges, ndeps, false);
}
SIM_API CUresult cuStreamGetCaptureInfo_v3_ptsz(CUstream h, CUstreamCaptureStatus *status, cuuint64_t *id,
                                                CUgraph *g, const CUgraphNode **deps,
                                                const CUgraphEdgeData **edges, size_t *ndeps) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    return capture_info(h, status, id, g, deps, edges, ndeps, true);
}

SIM_API CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode) {
    if (!mode) return CUDA_ERROR_INVALID_VALUE;
    std::swap(*mode, t_capture_mode);
    return CUDA_SUCCESS;
}

// --- graphs and their nodes ------------------------------------------------------------------

SIM_API CUresult cuGraphCreate(CUgraph *ph, unsigned int flags) {
    if (!ph || flags) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = new Graph;
    g_graphs.insert(g);
    *ph = reinterpret_cast<CUgraph>(g);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphDestroy(CUgraph h) {
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(h);
    if (!g) return CUDA_ERROR_INVALID_VALUE;
    drop_graph(g);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphAddKernelNode_v2(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t ndeps,
                                         const CUDA_KERNEL_NODE_PARAMS *p) {
    if (!ph || !p) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    CUresult rc = check_add(g, deps, ndeps);
    if (rc != CUDA_SUCCESS) return rc;
    Context *c;
    rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    const unsigned dims[6] = {p->gridDimX, p->gridDimY, p->gridDimZ, p->blockDimX, p->blockDimY, p->blockDimZ};
    Node n;
    n.type = CU_GRAPH_NODE_TYPE_KERNEL;
    rc = kernel_op(p->func, dims, p->kernelParams, p->extra, c, &n.op);   // arguments are read now
    if (rc != CUDA_SUCCESS) return rc;
    *ph = reinterpret_cast<CUgraphNode>(add_node(g, std::move(n)));
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphAddMemsetNode(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t ndeps,
                                      const CUDA_MEMSET_NODE_PARAMS *p, CUcontext ctx) {
    if (!ph || !p || (p->elementSize != 1 && p->elementSize != 2 && p->elementSize != 4) || !p->width ||
        !p->height || (p->height > 1 && p->pitch < p->width * p->elementSize))
        return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    CUresult rc = check_add(g, deps, ndeps);
    if (rc != CUDA_SUCCESS) return rc;
    Context *c = reinterpret_cast<Context *>(ctx);
    if (!c) c = current_context();
    if (!c || !valid_context(c)) return CUDA_ERROR_INVALID_CONTEXT;
    Node n;
    n.type = CU_GRAPH_NODE_TYPE_MEMSET;
    n.op = memset_op(c, *p);
    *ph = reinterpret_cast<CUgraphNode>(add_node(g, std::move(n)));
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphAddEmptyNode(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t ndeps) {
    if (!ph) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    CUresult rc = check_add(g, deps, ndeps);
    if (rc != CUDA_SUCCESS) return rc;
    *ph = reinterpret_cast<CUgraphNode>(add_node(g, Node{}));
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphAddMemAllocNode(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t ndeps,
                                        CUDA_MEM_ALLOC_NODE_PARAMS *p) {
    if (!ph || !p || p->poolProps.location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        p->poolProps.handleTypes != CU_MEM_HANDLE_TYPE_NONE)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_device(p->poolProps.location.id);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    rc = check_add(g, deps, ndeps);
    if (rc != CUDA_SUCCESS) return rc;
    if (g->exec) return CUDA_ERROR_INVALID_VALUE;   // not while an instantiation of it exists
    Context *c;
    rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Node n;
    n.type = CU_GRAPH_NODE_TYPE_MEM_ALLOC;
    rc = new_block(c, p->poolProps.location.id, p->bytesize, &n.block);
    if (rc != CUDA_SUCCESS) return rc;
    p->dptr = n.block->alloc->base;
    *ph = reinterpret_cast<CUgraphNode>(add_node(g, std::move(n)));
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphAddMemFreeNode(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t ndeps,
                                       CUdeviceptr dptr) {
    if (!ph) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    CUresult rc = check_add(g, deps, ndeps);
    if (rc != CUDA_SUCCESS) return rc;
    if (g->exec) return CUDA_ERROR_INVALID_VALUE;
    Node *n;
    rc = add_free_node(g, dptr, &n);
    if (rc == CUDA_SUCCESS) *ph = reinterpret_cast<CUgraphNode>(n);
    return rc;
}

SIM_API CUresult cuGraphMemAllocNodeGetParams(CUgraphNode h, CUDA_MEM_ALLOC_NODE_PARAMS *out) {
    std::lock_guard<std::mutex> lk(g_mu);
    Node *n = as_node_of(h, CU_GRAPH_NODE_TYPE_MEM_ALLOC);
    if (!out || !n) return CUDA_ERROR_INVALID_VALUE;
    *out = CUDA_MEM_ALLOC_NODE_PARAMS{};
    out->poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    out->poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    out->poolProps.location.id = n->block->dev;
    out->bytesize = n->block->alloc->size;
    out->dptr = n->block->alloc->base;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphMemFreeNodeGetParams(CUgraphNode h, CUdeviceptr *out) {
    std::lock_guard<std::mutex> lk(g_mu);
    Node *n = as_node_of(h, CU_GRAPH_NODE_TYPE_MEM_FREE);
    if (!out || !n) return CUDA_ERROR_INVALID_VALUE;
    *out = n->free_ptr;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphNodeGetType(CUgraphNode h, CUgraphNodeType *type) {
    if (!type) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Node *n = as_node(h);
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *type = n->type;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuGraphGetNodes(CUgraph hg, CUgraphNode *nodes, size_t *count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Graph *g = as_graph(hg);
    if (!g) return CUDA_ERROR_INVALID_VALUE;
    if (!nodes) {
        *count = g->nodes.size();
        return CUDA_SUCCESS;
    }
    size_t i = 0;
    for (; i < *count && i < g->nodes.size(); i++) nodes[i] = reinterpret_cast<CUgraphNode>(&g->nodes[i]);
    for (size_t j = i; j < *count; j++) nodes[j] = nullptr;
    *count = i;
    return CUDA_SUCCESS;
}

// --- executable graphs -----------------------------------------------------------------------

SIM_API CUresult cuGraphInstantiateWithFlags(CUgraphExec *ph, CUgraph hg, unsigned long long flags) {
    if (flags & ~(unsigned long long)(CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH |
                                      CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY))
        return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    return instantiate(ph, hg, flags, nullptr, nullptr);
}

// The CUDA 10 and 11 forms (an error node and log buffer, no flags).
SIM_API CUresult cuGraphInstantiate_v2(CUgraphExec *ph, CUgraph hg, CUgraphNode *err_node, char *log, size_t log_size) {
    if (err_node) *err_node = nullptr;
    if (log && log_size) log[0] = '\0';
    std::lock_guard<std::mutex> lk(g_mu);
    return instantiate(ph, hg, 0, nullptr, nullptr);
}
SIM_API CUresult cuGraphInstantiate(CUgraphExec *ph, CUgraph hg, CUgraphNode *err_node, char *log, size_t log_size) {
    return cuGraphInstantiate_v2(ph, hg, err_node, log, log_size);
}

SIM_API CUresult cuGraphInstantiateWithParams(CUgraphExec *ph, CUgraph hg, CUDA_GRAPH_INSTANTIATE_PARAMS *p) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    std::unique_lock<std::mutex> lk(g_mu);
    bool upload = p->flags & CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD, uploaded = false;
    p->hErrNode_out = nullptr;
    CUresult rc = instantiate(ph, hg, p->flags, p->hUploadStream, upload ? &uploaded : nullptr);
    if (upload && rc != CUDA_SUCCESS && ph && as_exec(*ph)) {   // the upload failed: no executable graph
        destroy_exec(lk, as_exec(*ph));
        *ph = nullptr;
    }
    p->result_out = rc == CUDA_SUCCESS ? CUDA_GRAPH_INSTANTIATE_SUCCESS : CUDA_GRAPH_INSTANTIATE_ERROR;
    return rc;
}
SIM_API CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *ph, CUgraph hg, CUDA_GRAPH_INSTANTIATE_PARAMS *p) {
    return cuGraphInstantiateWithParams(ph, hg, p);
}

SIM_API CUresult cuGraphUpload(CUgraphExec h, CUstream s) { return graph_upload(h, s, false); }
SIM_API CUresult cuGraphUpload_ptsz(CUgraphExec h, CUstream s) { return graph_upload(h, s, true); }
SIM_API CUresult cuGraphLaunch(CUgraphExec h, CUstream s) { return graph_launch(h, s, false); }
SIM_API CUresult cuGraphLaunch_ptsz(CUgraphExec h, CUstream s) { return graph_launch(h, s, true); }

SIM_API CUresult cuGraphExecDestroy(CUgraphExec h) {
    std::unique_lock<std::mutex> lk(g_mu);
    GraphExec *e = as_exec(h);
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    destroy_exec(lk, e);
    return CUDA_SUCCESS;
}

// --- the graph memory pool -------------------------------------------------------------------

SIM_API CUresult cuDeviceGraphMemTrim(CUdevice dev) {
    CUresult rc = check_device(dev);
    if (rc != CUDA_SUCCESS) return rc;
    std::lock_guard<std::mutex> lk(g_mu);
    for (GraphExec *e : g_execs)
        if (e->dev == dev && e->mapped && !exec_busy(e)) unmap_exec(e);
    GraphPool &p = g_pools[dev];
    if (p.reserved > p.used) {
        mem_uncharge(g_devices[dev].phys, p.reserved - p.used);
        p.reserved = p.used;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuDeviceGetGraphMemAttribute(CUdevice dev, CUgraphMem_attribute attr, void *value) {
    return graph_mem_attribute(dev, attr, value, false);
}
SIM_API CUresult cuDeviceSetGraphMemAttribute(CUdevice dev, CUgraphMem_attribute attr, void *value) {
    return graph_mem_attribute(dev, attr, value, true);
}
