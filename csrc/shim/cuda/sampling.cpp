// Device time for the ledger, by sampling, in every mode of the gate.
//
// One launch in about n is bracketed by two pooled events, and a per-process
// thread reads them as they complete (off the launch path) and counts the
// measured time for the n launches it stands for. n is drawn at random around
// a mean chosen so that a sample comes about every kSampleNs of device or
// host time (launches of kBracketNs or more are each measured; kernels of a
// few microseconds launched back to back: one sample in up to
// kMaxSampleEvery), so a training loop's period cannot alias it and the
// unmeasured work between two samples stays under about kSampleNs. Launches
// not measured when the process ends are counted then, at the average
// measured length. A CUDA graph launch is one launch here, measured whole.
//
// The samples' events are what keeps a process's queue short (a launch waits
// while its measured launches in flight stand for kQueueNs of work or more),
// and what a partition taking the device waits for, so a turn starts with the
// device drained of the previous holder's work but for the unmeasured launches
// after its last sample. Each sample also adds to the partition's busy_ns
// (its time less the host's own between its events), from which the gate
// judges whether the device is saturated.
//
// On the launch path: a launch that is not sampled costs a counter; the
// sampled one takes two pooled events and a short lock. The reader, the event
// pool and the pending list are this process's only.
#include "gate.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <vector>

namespace shim {
namespace {

// How much work a process may have queued on the device, in device time: a
// launch waits while its measured launches in flight stand for kQueueNs of
// work or more (so long kernels queue two deep and a turn ends promptly, while
// tiny kernels still stream), and there are never more than kMaxQueued.
constexpr uint64_t kQueueNs = 2'000'000;
constexpr size_t kMaxQueued = 64;
constexpr uint64_t kBracketNs = 50'000;        // launches this long on average are measured one by one
constexpr uint64_t kSampleNs = 2'000'000;      // shorter ones: a sample about this often
constexpr uint64_t kMaxSampleEvery = 4096;     // ... and at least one in this many
constexpr uint64_t kFirstMeasured = 64;        // before any is read: each of the first this many

// ---------------------------------------------------------------------------
// Measuring: pooled events, read by one thread per process
// ---------------------------------------------------------------------------
struct Pending {
    CUevent start, end;
    CUcontext ctx;
    fracgpu::SharedRegion *region;
    int slot, partition;
    uint32_t represents;   // launches this measurement stands for: it and the unmeasured before it
    uint64_t host_ns;      // launched onto an idle stream: the host's time from its start event to the launch
    uint64_t bracket_ns;   // the host's time from recording its start event to recording its end event
};

// Never destroyed: the detached reader thread waits on them while the process exits.
std::mutex &g_mu = *new std::mutex;                    // the pools and the pending list
std::condition_variable &g_cv = *new std::condition_variable;   // work arrived / room freed
std::deque<Pending> *g_pending = new std::deque<Pending>;
std::unordered_map<CUcontext, std::vector<CUevent>> *g_pool = new std::unordered_map<CUcontext, std::vector<CUevent>>;
bool g_reader_started = false;

// A slot that left (or was reaped) has already given its in-flight count back.
void saturating_dec(std::atomic<uint64_t> &counter) {
    uint64_t cur = counter.load(std::memory_order_relaxed);
    while (cur > 0 && !counter.compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel)) {
    }
}

// Recent measured length of this process's launches, plus one (0: none
// measured yet); the host time between its launches, waits for turns left
// out, plus one (0: not known yet); and all the time it waited for turns.
std::atomic<uint64_t> g_avg_launch_ns_plus1{0};
std::atomic<uint64_t> g_host_gap_ns_plus1{0};
std::atomic<uint64_t> g_measured{0};   // launches measured (read or not)

void ewma(std::atomic<uint64_t> &avg_plus1, uint64_t ns) {
    uint64_t avg = avg_plus1.load(std::memory_order_relaxed);
    avg_plus1.store(avg ? ((avg - 1) * 7 + ns) / 8 + 1 : ns + 1, std::memory_order_relaxed);
}

// Device time (and launches) counted to a partition and a process.
void charge(fracgpu::SharedRegion *r, int partition, int slot, uint64_t ns, uint64_t launches) {
    fracgpu::SharedPartition &part = r->partitions[partition];
    fracgpu::SharedProcess &proc = r->processes[slot];
    part.device_ns.fetch_add(ns, std::memory_order_relaxed);
    proc.device_ns.fetch_add(ns, std::memory_order_relaxed);
    part.launches.fetch_add(launches, std::memory_order_relaxed);
    proc.launches.fetch_add(launches, std::memory_order_relaxed);
    if (draws_allowance(part))
        part.cap_tokens_ns.fetch_sub(ns, std::memory_order_relaxed);
}

void account(const Pending &p, uint64_t ns) {
    // On an idle stream the start event is stamped when it is recorded, not
    // when the kernel starts: the host's time up to the launch is not the
    // kernel's.
    // What the device surely spent beyond the host's own pace: the measured
    // time less all the host's time between the two events (a tiny kernel
    // measures about that much, however busy its stream), for saturation.
    uint64_t sure = ns > p.bracket_ns ? ns - p.bracket_ns : 0;
    ns = ns > p.host_ns ? ns - p.host_ns : 0;
    ewma(g_avg_launch_ns_plus1, ns);
    charge(p.region, p.partition, p.slot, ns * p.represents, 0);
    fracgpu::SharedPartition &part = p.region->partitions[p.partition];
    part.busy_ns.fetch_add(sure * p.represents, std::memory_order_relaxed);
    part.last_done_ns.store(mono_ns(), std::memory_order_relaxed);
    saturating_dec(p.region->processes[p.slot].inflight);
    saturating_dec(p.region->partitions[p.partition].inflight);
}

void reader_main() {
    auto query = REAL(cuEventQuery);
    auto sync = REAL(cuEventSynchronize);
    auto elapsed = REAL(cuEventElapsedTime);
    std::unique_lock<std::mutex> lk(g_mu);
    for (;;) {
        while (g_pending->empty()) g_cv.wait(lk);
        // Block on the oldest launch (its completion is what the gate waits
        // for), then take every other one that is done too.
        CUevent oldest = g_pending->front().end;
        lk.unlock();
        counted(kEventSynchronize);
        CUresult synced = sync(oldest);
        lk.lock();
        for (auto it = g_pending->begin(); it != g_pending->end();) {
            CUresult rc = synced;   // the one waited for needs no query
            if (it->end != oldest) {
                counted(kEventQuery);
                rc = query(it->end);
            }
            if (rc == CUDA_ERROR_NOT_READY) {
                ++it;
                continue;
            }
            float ms = 0;
            if (rc == CUDA_SUCCESS) counted(kEventElapsedTime);
            if (rc == CUDA_SUCCESS && elapsed(&ms, it->start, it->end) != CUDA_SUCCESS) ms = 0;
            account(*it, ms > 0 ? (uint64_t)((double)ms * 1e6) : 0);
            auto &pool = (*g_pool)[it->ctx];
            pool.push_back(it->start);
            pool.push_back(it->end);
            it = g_pending->erase(it);
        }
        g_cv.notify_all();
    }
}

void start_reader_locked() {
    if (!g_reader_started) {
        g_reader_started = true;
        std::thread(reader_main).detach();
    }
}

CUevent take_event(CUcontext ctx) {
    auto &pool = (*g_pool)[ctx];
    if (!pool.empty()) {
        CUevent e = pool.back();
        pool.pop_back();
        return e;
    }
    CUevent e = nullptr;
    auto create = REAL(cuEventCreate);
    // Blocking sync: the reader thread sleeps until its event completes rather
    // than spin a CPU core for as long as the device is busy (what a default
    // event does when there are more cores than contexts).
    if (!create || create(&e, CU_EVENT_BLOCKING_SYNC) != CUDA_SUCCESS) return nullptr;
    return e;
}

// ---------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------
__attribute__((tls_model("initial-exec"))) thread_local uint64_t t_rng = 0;

// The mean of the next draw: every launch while launches average kBracketNs
// or more (or nothing is measured yet), else one about every kSampleNs of
// device or host time, whichever the launches take more of.
uint64_t sample_every() {
    uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
    // Nothing read yet: each launch is measured, up to kFirstMeasured (long
    // kernels are each measured from the first; tiny ones do not all take
    // events while the reader wakes up), then one in kFirstMeasured.
    if (avg == 0) return g_measured.load(std::memory_order_relaxed) < kFirstMeasured ? 1 : kFirstMeasured;
    if (avg - 1 >= kBracketNs) return 1;
    uint64_t each = avg - 1;
    uint64_t gap = g_host_gap_ns_plus1.load(std::memory_order_relaxed);
    if (gap && gap - 1 > each) each = gap - 1;
    uint64_t n = kSampleNs / (each > 0 ? each : 1);
    return n < 1 ? 1 : n > kMaxSampleEvery ? kMaxSampleEvery : n;
}

// How many launches until the next measured one: drawn uniformly from 1 .. 2n - 1.
int64_t draw(uint64_t n) {
    if (n <= 1) return 1;
    if (t_rng == 0) t_rng = mono_ns() | 1;
    t_rng ^= t_rng << 13, t_rng ^= t_rng >> 7, t_rng ^= t_rng << 17;   // xorshift64
    return (int64_t)(1 + t_rng % (2 * n - 1));
}

// The process's queue: its measured launches in flight, each standing for
// about `n` launches of the recent average length. One launch deep while a
// high partition is busy (then every launch is measured).
void bound_queue(bool one_deep) {
    std::unique_lock<std::mutex> lk(g_mu);
    start_reader_locked();
    for (;;) {
        size_t queued = g_pending->size();
        if (one_deep) {
            if (queued == 0) break;
        } else {
            uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
            uint64_t each = avg ? (avg - 1) * sample_every() : kQueueNs;   // unknown yet: the whole allowance
            if (queued < 2 || (queued < kMaxQueued && queued * each < kQueueNs)) break;
        }
        g_cv.wait_for(lk, std::chrono::microseconds(200));
    }
}

// A measured launch: two pooled events of the current context, the launch
// between them, then the pair to the reader (in flight until it completes) or
// back to the pool. Returns false, having launched nothing, when another
// partition holds the device (`own`: unless it is ours).
bool measured_launch(fracgpu::SharedRegion *r, int slot, int me, bool own, Stream on, LaunchCall launch,
                     uint32_t represents, CUresult *result) {
    auto record = on.ptsz ? REAL(cuEventRecord_ptsz) : REAL(cuEventRecord);
    auto query = on.ptsz ? REAL(cuStreamQuery_ptsz) : REAL(cuStreamQuery);
    CUstream stream = on.handle;
    fracgpu::SharedPartition &mine = r->partitions[me];
    fracgpu::SharedProcess &proc = r->processes[slot];
    // In flight before the lease is looked at, as a partition taking the lease
    // looks at work in flight after taking it: of a launch here and a lease
    // taken there at the same moment, one always sees the other.
    mine.inflight.fetch_add(1, std::memory_order_seq_cst);
    proc.inflight.fetch_add(1, std::memory_order_seq_cst);
    int owner = r->owner.load(std::memory_order_seq_cst);
    if (own ? owner != me : owner >= 0 && owner != me) {
        saturating_dec(proc.inflight);
        saturating_dec(mine.inflight);
        return false;
    }
    CUcontext ctx = nullptr;
    auto get_ctx = REAL(cuCtxGetCurrent);
    CUevent start = nullptr, end = nullptr;
    if (record && get_ctx && get_ctx(&ctx) == CUDA_SUCCESS && ctx) {
        std::lock_guard<std::mutex> lk(g_mu);
        start_reader_locked();
        start = take_event(ctx);
        end = take_event(ctx);
    }
    // Idle stream: the time from the start event to the launch is the host's.
    bool idle = false;
    if (start && end && query) {
        counted(kStreamQuery);
        idle = query(stream) == CUDA_SUCCESS;
    }
    uint64_t h0 = mono_ns();
    if (start && end) counted(kEventRecord);
    bool measured = start && end && record(start, stream) == CUDA_SUCCESS;
    CUresult rc = launch();
    // Launched now (it may have waited for room in the queue): others judge
    // this partition idle from its last launch, and must not before its work.
    uint64_t launched = mono_ns();
    mine.last_launch_ns.store(launched, std::memory_order_relaxed);
    uint64_t host_ns = idle ? launched - h0 : 0;
    if (measured && rc == CUDA_SUCCESS) counted(kEventRecord);
    measured = measured && rc == CUDA_SUCCESS && record(end, stream) == CUDA_SUCCESS;
    uint64_t bracket_ns = mono_ns() - h0;
    *result = rc;
    if (rc != CUDA_SUCCESS) represents--;   // the others before it ran
    charge(r, me, slot, 0, represents);
    std::lock_guard<std::mutex> lk(g_mu);
    if (measured) {
        g_pending->push_back(Pending{start, end, ctx, r, slot, me, represents, host_ns, bracket_ns});
        g_measured.fetch_add(1, std::memory_order_relaxed);
        g_cv.notify_all();
        return true;
    }
    saturating_dec(proc.inflight);
    saturating_dec(mine.inflight);
    if (ctx) {
        auto &pool = (*g_pool)[ctx];
        if (start) pool.push_back(start);
        if (end) pool.push_back(end);
    }
    return true;
}

}  // namespace

std::atomic<uint64_t> g_waited_ns{0};

bool sampled_launch_measured(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, bool own, bool bounded,
                             Stream stream, LaunchCall launch, CUresult *result) {
    // This one is measured, for the draw it ends; the next draw starts now.
    uint64_t now = mono_ns();
    int64_t represents = view.drawn.load(std::memory_order_relaxed);
    static std::atomic<uint64_t> last_sample_ns{0}, waited_then{0};
    uint64_t last = last_sample_ns.exchange(now, std::memory_order_relaxed);
    uint64_t waited = g_waited_ns.load(std::memory_order_relaxed);
    waited -= waited_then.exchange(waited, std::memory_order_relaxed);
    if (last && represents > 0 && now > last + waited) {
        ewma(g_host_gap_ns_plus1, (now - last - waited) / (uint64_t)represents);
    }
    int64_t next = draw(sample_every());
    view.drawn.store(next, std::memory_order_relaxed);
    view.countdown.store(next, std::memory_order_relaxed);
    if (bounded) bound_queue(view.yield_queue.load(std::memory_order_relaxed));
    if (measured_launch(r, slot, me, own, stream, launch,
                        (uint32_t)(represents > 0 ? represents : 1), result))
        return true;
    // Not launched: this launch waits for the device, and is measured then.
    view.drawn.store(represents, std::memory_order_relaxed);
    view.countdown.store(1, std::memory_order_relaxed);
    return false;
}

void measure_next(DeviceView &view) {
    int64_t left = view.countdown.exchange(1, std::memory_order_relaxed);
    if (left > 1) view.drawn.fetch_sub(left - 1, std::memory_order_relaxed);
}

// Entering the gate: the work this process queued outside it must finish
// first, or it would run in another partition's turn.
void drain_unmeasured() {
    counted(kCtxSynchronize);
    if (auto sync = REAL(cuCtxSynchronize)) sync();
}

void gate_account_finished() {
    // At exit: launches that completed but that the reader has not taken yet
    // (the job synchronised and ended at once) still count, and the launches
    // after the last sample count at the average measured length. Only
    // queried, never waited for: whatever is still running at exit is not
    // this job's to wait on.
    auto query = REAL(cuEventQuery);
    auto elapsed = REAL(cuEventElapsedTime);
    if (!query || !elapsed || !g_mu.try_lock()) return;
    for (auto it = g_pending->begin(); it != g_pending->end();) {
        float ms = 0;
        counted(kEventQuery);
        if (query(it->end) == CUDA_SUCCESS && elapsed(&ms, it->start, it->end) == CUDA_SUCCESS) {
            account(*it, ms > 0 ? (uint64_t)((double)ms * 1e6) : 0);
            it = g_pending->erase(it);   // its events go with the process
        } else {
            ++it;
        }
    }
    uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
    for (int d = 0; d < kMaxDevices; d++) {
        DeviceView &view = g_view[d];
        int64_t unmeasured = view.drawn.load() - std::max<int64_t>(view.countdown.load(), 0);
        fracgpu::SharedRegion *r = view.region.load(std::memory_order_acquire);
        if (!r || unmeasured <= 0) continue;
        view.drawn.store(0), view.countdown.store(0);
        charge(r, view.partition.load(), view.slot.load(), avg ? (avg - 1) * (uint64_t)unmeasured : 0,
               (uint64_t)unmeasured);
    }
    g_mu.unlock();
}

void sampling_forget_after_fork() {
    // Only the forking thread exists in the child: whatever the parent's other
    // threads held is remade, and the parent's events (of its contexts) dropped.
    new (&g_mu) std::mutex();
    new (&g_cv) std::condition_variable();
    g_pending->clear();
    g_pool->clear();
    g_measured.store(0);
    g_reader_started = false;
}

}  // namespace shim
