// The simulated CUDA driver: internal types shared by its source files.
//
// It is a real libcuda.so.1 (SONAME and every exported entry point) that runs
// the driver API over host memory, so the whole project can be tested on a
// machine without a GPU. It shares no code with the fracgpu shim beyond the
// CUDA headers and the generated tables: a bug in one cannot hide one in the
// other.
//
// What is simulated, and how:
// - Device memory is host memory (anonymous mappings) behind fake device
//   addresses, so copies, memsets and the fill kernel really move bytes.
// - One simulated GPU is shared by every process that uses it, through a file
//   of its own (shared.cpp): memory use is global across processes and every
//   kernel of every process is placed on one device timeline.
// - Kernels run by name (fracgpu_spin, fracgpu_fill) on a per-process worker
//   thread that executes stream work in order (engine.cpp).
#pragma once

#include <cuda.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <string>
#include <vector>

#include "fracgpu/settings.h"

#define SIM_API extern "C" __attribute__((visibility("default")))

namespace sim {

constexpr int kMaxDevices = FRACGPU_SIM_MAX_DEVICES;   // the settings table's bound on FRACGPU_SIM_DEVICES
constexpr uint64_t kAllocAlign = 512;                 // what cuMemAlloc returns and charges
constexpr uint64_t kVmmGranularity = 2ull << 20;      // cuMemGetAllocationGranularity
constexpr size_t kMaxPendingOps = 1024;               // a stream's launch queue depth

uint64_t now_ns();                                    // CLOCK_MONOTONIC, same clock in every process
void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------
// Configuration (environment) and the shared file of one simulated GPU
// ---------------------------------------------------------------------------
// The defaults are the settings table's (fracgpu/settings.h).
struct Config {
    uint64_t memory = fracgpu_setting_default(FRACGPU_SETTING_SIM_MEMORY).number;
    int sms = (int)fracgpu_setting_default(FRACGPU_SETTING_SIM_SMS).number;
    int devices = (int)fracgpu_setting_default(FRACGPU_SETTING_SIM_DEVICES).number;
    std::string name = fracgpu_setting_default(FRACGPU_SETTING_SIM_NAME).text;
    uint64_t context_memory = 0;          // set by load_config: memory / kContextShare unless given
    std::string dir;
};

// The share of a device each context reserves by default (FRACGPU_SIM_CONTEXT_SHARE).
constexpr uint64_t kContextShare = FRACGPU_SIM_CONTEXT_SHARE;

// Reads FRACGPU_SIM_*; CUDA_SUCCESS or an error after one line on stderr.
CUresult load_config(Config &cfg);

// Attach to (creating if needed) the shared file for cfg; registers this process
// (its slot goes when the process is gone: see shared.cpp).
CUresult shared_attach(const Config &cfg);
const CUuuid &device_uuid(int phys);
// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (lowercase), as NVML and CUDA_VISIBLE_DEVICES write it.
std::string uuid_text(const CUuuid &u);
// Global memory accounting across processes (phys = physical device index).
bool mem_charge(int phys, uint64_t bytes);           // false: device out of memory
void mem_uncharge(int phys, uint64_t bytes);
uint64_t mem_used(int phys);                          // all processes, dead ones reaped
// The processes holding memory on the device (one entry per pid, dead ones
// reaped): writes at most cap of them, returns how many there are.
int mem_processes(int phys, unsigned *pids, unsigned long long *used, unsigned cap);
// The device timeline: reserve [start, start+dur) with start >= not_before and
// after everything already placed on the device. Returns start.
uint64_t timeline_reserve(int phys, uint64_t not_before, uint64_t dur);

// ---------------------------------------------------------------------------
// Process-wide state. Every table is allocated once and never destroyed
// (`T &g_x = *new T`): the engine's detached worker thread may still use them
// while the process runs its exit handlers, and what a client never released
// stays reachable, as it would in the real driver.
// ---------------------------------------------------------------------------
struct Context;
struct Stream;
struct Capture;   // a stream capture in progress (graph.cpp)

struct Device {
    int phys = 0;                     // index on the simulated GPU (after CUDA_VISIBLE_DEVICES)
    Context *primary = nullptr;
    unsigned primary_flags = 0;
    int primary_refs = 0;
    CUmemoryPool default_pool = nullptr;
    CUmemoryPool current_pool = nullptr;
};

extern Config &g_cfg;
extern std::vector<Device> &g_devices;   // visible devices, by ordinal
extern std::mutex g_mu;                 // guards every table below and the engine

bool initialized();                     // cuInit succeeded in this process
CUresult check_init();                  // CUDA_ERROR_NOT_INITIALIZED / _DEINITIALIZED, or success
CUresult check_device(CUdevice dev);

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------
enum class MemKind { Device, Managed, Host, Array, Physical };

struct Alloc {
    uint64_t base = 0;        // the address clients see (fake for device memory)
    uint64_t size = 0;        // requested size
    uint64_t charged = 0;     // bytes charged to the device
    void *host = nullptr;     // backing host memory
    MemKind kind = MemKind::Device;
    Context *ctx = nullptr;
    int dev = 0;              // ordinal
    CUmemoryPool pool = nullptr;
    unsigned long long id = 0;
    bool owned_host = true;   // false for cuMemHostRegister'ed memory
    int fd = -1;              // backing memfd once shared with cuIpcGetMemHandle, or opened from one
    bool ipc_opened = false;  // another process's memory (cuIpcOpenMemHandle): charged there, not here
    bool graph = false;       // a graph allocation node's memory: charged through the graph pool (graph.cpp)
};

// Translate an address range to host memory. nullptr when [addr, addr+len)
// is not inside one known allocation. *out (optional) receives the allocation.
void *translate(uint64_t addr, uint64_t len, Alloc **out = nullptr);
Alloc *find_alloc(uint64_t addr);          // allocation containing addr
Alloc *as_array(CUarray h);                // the array h, or null when h is not a live array
void free_context_memory(Context *ctx);     // everything a destroyed context owned
// Device memory of `size` bytes in context c, charged to its device, owned
// by it (a module's globals); free_block(base) gives it back unless its
// context's end did already (device addresses are never reused).
CUresult alloc_block(Context *c, uint64_t size, Alloc **out);
void free_block(uint64_t base);
// Pools give back what they keep beyond their release threshold, as the
// driver does at a stream, event or context synchronize.
void pools_release_over_threshold();
// A graph allocation node's memory (graph.cpp): device memory at an address
// fixed for the life of the node, in the allocation table, charged nothing
// here (the device's graph pool holds its charge). Caller holds g_mu.
Alloc *graph_alloc_create(Context *c, int dev, uint64_t size);
void graph_alloc_destroy(Alloc *a);
// cuMemFree/cuMemFreeAsync of a graph allocation (graph.cpp): it is freed
// outside its graph. CUDA_ERROR_INVALID_VALUE when it cannot be (freed in its own graph).
CUresult graph_alloc_free(Alloc *a);

// ---------------------------------------------------------------------------
// Contexts, streams, events
// ---------------------------------------------------------------------------
struct Context {
    int dev = 0;                          // ordinal
    bool primary = false;
    bool alive = true;
    unsigned flags = 0;
    unsigned long long id = 0;
    uint64_t reserved = 0;                // the context's own reservation, charged to the device
    Stream *null_stream = nullptr;
    std::vector<Stream *> streams;        // created streams (not the null one)
    CUresult sticky = CUDA_SUCCESS;       // an error from device work (illegal address)
    std::map<CUlimit, size_t> limits;
    // What cuCtxSetLimit reserved beyond the defaults (the heap, stack and
    // printf FIFO the context's own reservation already covers), by limit.
    std::map<CUlimit, uint64_t> limit_reserved;
};

struct Record {                            // one cuEventRecord (or an internal marker)
    bool done = false;
    uint64_t ts = 0;                       // completion time on the device timeline
    int waiters = 0;                       // threads blocked until it is done (they alone are woken)
};

struct Op {
    enum Kind { Kernel, Host, Callback, RecordEv, Wait } kind;   // Host runs under g_mu, Callback without
    uint64_t enqueued = 0;
    uint64_t dur = 0;                      // Kernel: device time
    std::function<void()> action;          // Kernel/Host: what it does to memory
    std::shared_ptr<Record> rec;           // RecordEv: to complete; Wait: to wait for
};

struct Stream {
    Context *ctx = nullptr;
    unsigned flags = 0;
    int priority = 0;
    bool is_null = false;                  // the legacy default stream
    bool per_thread = false;               // a per-thread default stream
    bool alive = true;
    unsigned long long id = 0;
    std::deque<Op> q;
    uint64_t last_end = 0;                 // when the last work placed on it ends
    bool inflight = false;                 // a kernel occupies the device until last_end
    Capture *capture = nullptr;            // being captured into a graph (cuStreamBeginCapture)
};

struct Event {
    Context *ctx = nullptr;
    unsigned flags = 0;
    std::shared_ptr<Record> rec;           // the latest record; null before the first
};

Context *current_context();                // this thread's current context (may be null)
CUresult get_context(Context **out);       // current context or CUDA_ERROR_INVALID_CONTEXT
bool valid_context(Context *c);
Context *context_create(int dev, unsigned flags, bool primary, CUresult *err);
void context_destroy(Context *c);

// Resolves a client stream handle (0, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD,
// or a created stream). per_thread_api: called through a _ptsz/_ptds entry.
CUresult resolve_stream(CUstream h, bool per_thread_api, Stream **out);
void stream_forget(Stream *s);            // its handle is no longer valid (context destroyed)

// Engine (engine.cpp): all stream work. Callers hold g_mu.
void engine_enqueue(std::unique_lock<std::mutex> &lk, Stream *s, Op op);   // may block on a full queue
// Runs `action` in stream order: inline when the stream has nothing pending.
void engine_run_ordered(std::unique_lock<std::mutex> &lk, Stream *s, std::function<void()> action,
                        bool wait);
void engine_release_stream(Stream *s);   // frees it now or once its queued work is done
std::shared_ptr<Record> engine_mark(Stream *s);                  // a record at the stream's tail
void engine_wait(std::unique_lock<std::mutex> &lk, const std::shared_ptr<Record> &r);
bool engine_stream_idle(Stream *s);
void engine_sync_context(std::unique_lock<std::mutex> &lk, Context *c);
void engine_drop_context(Context *c);     // discard queued work of a dying context

// Stream capture (graph.cpp). Callers hold g_mu. While a stream captures,
// engine_enqueue and engine_run_ordered record its work as graph nodes
// instead of running it.
void capture_record(Stream *s, Op op);
// What work on s may do now: CUDA_SUCCESS when it is not captured or its
// capture is healthy; CUDA_ERROR_STREAM_CAPTURE_INVALIDATED once it failed.
CUresult capture_check(Stream *s);
// A call that cannot be captured (a synchronization, an event) reached s:
// its capture is invalidated. CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED when s
// captures, CUDA_SUCCESS otherwise.
CUresult capture_refuse(Stream *s);
void capture_abandon(Stream *s);          // s goes away: its capture is dropped
// cuMemAllocAsync/cuMemFreeAsync on a capturing stream: an allocation node
// (its fixed address in *dptr) or a free node.
CUresult capture_alloc(Stream *s, uint64_t size, CUdeviceptr *dptr);
CUresult capture_free(Stream *s, CUdeviceptr dptr);

// ---------------------------------------------------------------------------
// Driver calls: counted, and charged the host time a real driver takes
// (calls.cpp; read through fracgpu_sim_call_counts, call_counts.h)
// ---------------------------------------------------------------------------
enum class Call {
    Launch, GraphLaunch, EventRecord, EventQuery, EventSynchronize, EventElapsedTime,
    StreamSynchronize, StreamQuery, StreamWaitEvent, CtxSynchronize, Count
};
extern std::atomic<unsigned long long> g_calls[(int)Call::Count];
// One more call of kind k: a relaxed increment, no lock, safe on the launch path.
inline void count_call(Call k) { g_calls[(int)k].fetch_add(1, std::memory_order_relaxed); }

// Host time a real driver spends in cuEventRecord and cuEventQuery (README,
// "The simulated GPU"): far more for an event that keeps timing, which must
// take a timestamp, than for a CU_EVENT_DISABLE_TIMING one. A timing record
// is charged the untimed figure for now: its spin falls between the record
// and the next launch, and the launch gate's sampled launches on an idle
// stream counted it as device time (10% more for 20 us kernels; README).
constexpr uint64_t kEventRecordNs = 240, kEventQueryNs = 2600;                 // with timing
constexpr uint64_t kEventRecordUntimedNs = 240, kEventQueryUntimedNs = 230;      // CU_EVENT_DISABLE_TIMING

// A call that takes at least `ns` of host time from when the object was made:
// the destructor spins out what the call's own work left of it. Declare it
// before the call's lock, so the spin runs with g_mu released (the cost is the
// calling thread's, as in a real driver, and serialises nothing).
class HostCost {
public:
    HostCost() : start_(now_ns()) {}
    HostCost(const HostCost &) = delete;
    HostCost &operator=(const HostCost &) = delete;
    ~HostCost() {
        while (now_ns() - start_ < ns_) {
        }
    }
    void charge(uint64_t ns) { ns_ = ns; }

private:
    uint64_t start_;
    uint64_t ns_ = 0;
};

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------
enum class KernelId { Spin, Fill };

// The device work of one launch of f in context c (arguments read now, as the
// driver does), for a stream or a graph node. Caller holds g_mu.
CUresult kernel_op(CUfunction f, const unsigned dims[6], void **params, void **extra, Context *c, Op *out);

}  // namespace sim
