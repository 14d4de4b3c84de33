// The launch gate: compute shares by weighted time-slicing of the device.
//
// A launch pays for the gate only what it must. Inside its partition's turn,
// or with the device to itself, a launch is one clock read, one process-local
// counter and the real launch: no event, no lock, no write to the shared state
// (the partition's `last_launch_ns` is published at most every kPublishNs).
//
// Turns. When one partition alone uses a GPU (and has no cap) nothing waits,
// nor when several are busy but the device is not saturated (see Saturation:
// their kernels leave it idle most of the time). When several partitions are
// busy on a saturated device, it is leased to one partition at a time for a
// slice of kLeaseNs; the next lease goes to the waiting partition
// whose virtual time (the turns it held / weight) is lowest, so over time each
// holds the device in proportion to its weight. A lease ends early when its
// holder goes idle, so the scheduler is work-conserving; a partition that
// comes back from idle starts at the others' virtual time (no credit for
// idling, no debt). A turn is charged from the moment the lease is taken to
// the moment it is handed on (lease_start_ns), so what a partition is charged
// is the device time it kept the others from, whether its kernels were long
// (then it is its kernels' time, within the hand-over) or its launches were
// too short to fill the device. Waiters sleep on the owner word (a futex)
// until the turn's end, and the holder wakes them when it hands over.
//
// Device time for the ledger is measured by sampling, in every mode: one
// launch in about n is bracketed by two pooled events, and a per-process
// thread reads them as they complete (off the launch path) and counts the
// measured time for the n launches it stands for. n is drawn at random around
// a mean chosen so that a sample comes about every kSampleNs of device or
// host time (launches of kBracketNs or more are each measured; kernels of a
// few microseconds launched back to back: one sample in up to
// kMaxSampleEvery), so a training loop's period cannot alias it and the
// unmeasured work between two samples stays under about kSampleNs. Launches
// not measured when the process ends are counted then, at the average
// measured length. A CUDA graph launch is one launch here, measured whole.
// The samples' events are what keeps a process's queue short (a launch waits
// while its measured launches in flight stand for kQueueNs of work or more),
// and what a partition taking the device waits for, so a turn starts with the
// device drained of the previous holder's work but for the unmeasured launches
// after its last sample.
//
// A capped partition also draws on a token bucket filled at its share of wall
// time: it waits when the bucket is empty, even on an idle GPU. Caps are held
// against measured device time.
//
// Priority classes (high, normal, low) sit above the shares. The whole of it
// is three checks, made where the gate already looks at the other partitions
// (while waiting for a turn, and in the per-millisecond decide()), so a launch
// inside its turn reads nothing more while no other class is busy:
//   - at lease acquisition: only the highest class that waits may take the
//     device, a high partition takes it at once from a lower-class holder (the
//     holder's launch and the taking are ordered as an ungated launch and a
//     lease are, by in-flight count then owner), and a holder's turn ends only
//     for a waiting partition of its class or above (so low gets what the
//     others leave, and virtual times are compared within a class only); a
//     high holder whose work has drained gives the device back at once
//     (kHighIdleGapNs), since it takes it back within a kernel;
//   - the queue depth: while a high partition is busy, a normal or low process
//     measures every launch and keeps at most one on the device, so a high
//     kernel waits at most for the kernels already running (kernels are never
//     split: splitting would change the order of reductions, hence results);
//   - a high partition with a share draws on a bucket filled at that share
//     (kPriorityWindowNs of it may be saved up): empty, it stands aside while
//     others are busy, so it cannot starve them; alone it runs on, owing
//     nothing. Without a share it is bounded only by its own demand.
// Weights: shares of high and normal partitions are fractions of the device;
// low partitions' shares divide among themselves what the others leave, and
// are not counted against the others'.
#include "shim.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <deque>
#include <linux/futex.h>
#include <mutex>
#include <new>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#include "fracgpu/state.h"
#include "fracgpu/units.h"

namespace shim {
namespace {

constexpr uint64_t kLeaseNs = 8'000'000;       // one turn on the device
constexpr uint64_t kActiveNs = 30'000'000;     // launched this recently: the partition is busy
constexpr uint64_t kIdleGapNs = 2'000'000;     // a lease holder with nothing in flight this long is idle
// ... a high one sooner: when it comes back it takes the device from a lower
// class at once, waiting for one kernel at most, not for a turn
constexpr uint64_t kHighIdleGapNs = 100'000;
constexpr uint64_t kRecheckNs = 1'000'000;     // a launch re-reads who else is busy this often
constexpr uint64_t kPublishNs = 20'000;        // ... and tells them it is busy this often
constexpr uint64_t kCapBucketNs = 4'000'000;   // how much unused capped time may be saved up
constexpr uint64_t kPriorityWindowNs = 100'000'000;   // a high partition with a share is held to it over this
// How much work a process may have queued on the device, in device time: a
// launch waits while its measured launches in flight stand for kQueueNs of
// work or more (so long kernels queue two deep and a turn ends promptly, while
// tiny kernels still stream), and there are never more than kMaxQueued.
constexpr uint64_t kQueueNs = 2'000'000;
constexpr size_t kMaxQueued = 64;
constexpr int kMaxDevices = 64;
constexpr uint64_t kBracketNs = 50'000;        // launches this long on average are measured one by one
constexpr uint64_t kSampleNs = 2'000'000;      // shorter ones: a sample about this often
constexpr uint64_t kMaxSampleEvery = 4096;     // ... and at least one in this many
constexpr uint64_t kFirstMeasured = 64;        // before any is read: each of the first this many

// A short sleep while waiting. The thread's timer slack is set to 1 us first
// (the default 50 us would stretch every wait, and every handoff of the
// device, by that much).
void precise_timers() {
    static thread_local bool precise = false;
    if (!precise) {
        precise = true;
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    }
}
void nap() {
    precise_timers();
    std::this_thread::sleep_for(std::chrono::microseconds(20));
}

// The owner word is a futex shared by every process of the GPU (the region is
// a shared file mapping): waiters sleep until it changes or `ns` pass, and
// whoever frees the device wakes them.
void sleep_on_owner(fracgpu::SharedRegion *r, int seen, uint64_t ns) {
    precise_timers();
    struct timespec ts = {(time_t)(ns / 1'000'000'000), (long)(ns % 1'000'000'000)};
    syscall(SYS_futex, reinterpret_cast<int *>(&r->owner), FUTEX_WAIT, seen, &ts, nullptr, 0);
}
void wake_waiters(fracgpu::SharedRegion *r) {
    syscall(SYS_futex, reinterpret_cast<int *>(&r->owner), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// How a launch goes through the gate on one device, as this process last
// decided (re-read every kRecheckNs):
//   kAlone    no other partition on the GPU, no cap: straight through
//   kWatch    others exist but are idle: straight through, this process's
//             queue kept short (kQueueNs), so that one of them coming back
//             gets the device within milliseconds
//   kGate     others are busy and the device is saturated (or a cap):
//             launch in this partition's turns
enum Mode { kAlone, kWatch, kGate };

// Whether the device is saturated, as this process last measured it: the
// device time of every partition per wall time, over windows of
// kRateWindowNs (counted as busy_ns: each sample less the host's own time
// between its events, which is all a kernel of a few microseconds measures
// whether or not the device is busy). Partitions whose kernels leave the device idle most of the
// time (short kernels, gaps between them) do not take turns: each launches as
// it would alone, its queue kept short. Turns start as soon as a window finds
// the device busy kSaturatedRate of the time, and stop only after
// kCalmWindows in a row below kUnsaturatedRate (a moment's stall of the jobs
// must not end the turns that hold the shares); until a window has been
// measured, the device counts as saturated.
constexpr uint64_t kRateWindowNs = 20'000'000;
constexpr double kSaturatedRate = 0.85, kUnsaturatedRate = 0.5;
constexpr int kCalmWindows = 5;   // ... under kUnsaturatedRate this many windows in a row
struct Saturation {
    std::atomic<bool> busy{false};          // a thread is measuring
    uint64_t at_ns = 0;
    uint64_t device_ns[fracgpu::kMaxPartitions] = {};
    int calm = 0;                           // windows in a row under kUnsaturatedRate
    std::atomic<bool> saturated{true};
};

struct DeviceView {
    std::atomic<uint64_t> next_check{0};
    std::atomic<uint64_t> published{0};     // the last launch time this process told the partition
    std::atomic<int> mode{kAlone};
    std::atomic<bool> yield_queue{false};   // a high partition other than ours is busy: queue one launch deep
    std::atomic<bool> outranked{false};     // a partition of a higher class than ours is busy
    // Sampling: launches left before the next measured one, and how many the
    // current draw counted from (what the next sample stands for).
    std::atomic<int64_t> countdown{0};
    std::atomic<int64_t> drawn{0};
    // Where this process is bound on the device (kept for the count at exit).
    std::atomic<fracgpu::SharedRegion *> region{nullptr};
    std::atomic<int> slot{-1}, partition{-1};
    Saturation saturation;
};
DeviceView *g_view = new DeviceView[kMaxDevices];

// The next launch is measured (while a high partition is busy, every launch
// is), standing for those launched since the last draw.
void measure_next(DeviceView &view) {
    int64_t left = view.countdown.exchange(1, std::memory_order_relaxed);
    if (left > 1) view.drawn.fetch_sub(left - 1, std::memory_order_relaxed);
}

// The driver calls the shim adds to the launches, by kind, for benchmarks on
// a real GPU (fracgpu_shim_call_counts below). Counted where they are made,
// never on a launch that makes none.
enum Call { kEventRecord, kEventQuery, kEventSynchronize, kEventElapsedTime, kStreamQuery, kCtxSynchronize,
            kCallKinds };
const char *const kCallNames[kCallKinds] = {
    "event_record", "event_query", "event_synchronize", "event_elapsed_time", "stream_query", "ctx_synchronize",
};
std::atomic<unsigned long long> g_calls[kCallKinds] = {};
void counted(Call kind) { g_calls[kind].fetch_add(1, std::memory_order_relaxed); }

bool busy(const fracgpu::SharedPartition &q, uint64_t now) {
    uint64_t last = q.last_launch_ns.load(std::memory_order_relaxed);
    return q.inflight.load(std::memory_order_relaxed) > 0 || q.waiting_ns.load(std::memory_order_relaxed) != 0 ||
           (last && (now <= last || now - last < kActiveNs));
}

constexpr int kLow = FRACGPU_PRIORITY_LOW, kHigh = FRACGPU_PRIORITY_HIGH;

// Whether a high partition's share holds it back (see the header comment).
bool held_to_share(const fracgpu::SharedPartition &p) {
    uint32_t flags = fracgpu::flags_of(p);
    return (flags & fracgpu::kPartitionHigh) && !(flags & fracgpu::kPartitionCap) && fracgpu::share_of(p) > 0;
}

// Measures the device's saturation once a window has passed (see Saturation).
// Measures the device's saturation once a window has passed (see Saturation).
bool saturated(fracgpu::SharedRegion *r, Saturation &sat, uint64_t now) {
    bool idle = false;
    if (now - sat.at_ns < kRateWindowNs || !sat.busy.compare_exchange_strong(idle, true))
        return sat.saturated.load(std::memory_order_relaxed);
    uint64_t used = 0;
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        uint64_t d = __atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE) ? q.busy_ns.load(std::memory_order_relaxed) : 0;
        used += d >= sat.device_ns[i] ? d - sat.device_ns[i] : d;   // a partition made anew: all of its
        sat.device_ns[i] = d;
    }
    if (sat.at_ns) {
        double rate = (double)used / (double)(now - sat.at_ns);
        sat.calm = rate < kUnsaturatedRate ? sat.calm + 1 : 0;
        if (rate >= kSaturatedRate) sat.saturated.store(true);
        else if (sat.calm >= kCalmWindows) sat.saturated.store(false);
    }
    sat.at_ns = now;
    sat.busy.store(false);
    return sat.saturated.load(std::memory_order_relaxed);
}

// How partition `me` must launch now (a Mode), and its weight: its share (a
// best-effort one: scaled into what the promised shares leave), or for
// partitions without one, an equal part of what the shares leave (low
// partitions: of what low partitions' shares leave). *yield_queue: a high
// partition is busy and `me` is not high; *outranked: a partition of a higher
// class than `me` is busy. `sat`: this process's measure of the device's
// saturation (null: take turns whenever others are busy). Partitions of
// different classes busy together always take turns: priority is kept in
// turns.
int decide(fracgpu::SharedRegion *r, int me, uint64_t now, double *weight, bool *yield_queue, bool *outranked,
           Saturation *sat = nullptr) {
    const fracgpu::SharedPartition &mine = r->partitions[me];
    int mine_class = fracgpu::priority_of(mine);
    bool mine_low = mine_class == kLow;
    bool others_busy = false, others_exist = false, high_busy = false, higher_busy = false, mixed = false;
    double shared = 0, effort = 0;   // promised shares, and overcommitted (best-effort) ones
    int unshared = 0;
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        if (!__atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE)) continue;
        int klass = fracgpu::priority_of(q);
        if ((klass == kLow) == mine_low) {   // low's shares are not counted against the others'
            double s = fracgpu::share_of(q);
            if (s > 0) (fracgpu::holds_share_promise(q) ? shared : effort) += s;
            else unshared++;
        }
        if (i == me) continue;
        others_exist = true;
        bool b = busy(q, now);
        others_busy = others_busy || b;
        high_busy = high_busy || (b && klass == kHigh);
        higher_busy = higher_busy || (b && klass > mine_class);
        mixed = mixed || (b && klass != mine_class);
    }
    *yield_queue = high_busy && mine_class != kHigh;
    *outranked = higher_busy;
    // Best-effort shares divide what the promised ones leave, so they never dilute a promise.
    double left = shared < 0.95 ? 1.0 - shared : 0.05;
    double effort_scale = effort > left ? left / effort : 1.0;
    shared += effort * effort_scale;
    double rest = shared < 0.95 ? 1.0 - shared : 0.05;
    double share = fracgpu::share_of(mine);
    if (!fracgpu::holds_share_promise(mine)) share *= effort_scale;
    *weight = share > 0 ? share : rest / (unshared ? unshared : 1);
    if (fracgpu::flags_of(mine) & fracgpu::kPartitionCap) return kGate;
    if (others_busy && (mixed || !sat || saturated(r, *sat, now))) return kGate;
    return others_exist ? kWatch : kAlone;
}

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
std::atomic<uint64_t> g_waited_ns{0};
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
    if ((fracgpu::flags_of(part) & fracgpu::kPartitionCap) || held_to_share(part))
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

// Entering the gate: the work this process queued outside it must finish
// first, or it would run in another partition's turn.
void drain_unmeasured() {
    counted(kCtxSynchronize);
    if (auto sync = REAL(cuCtxSynchronize)) sync();
}

// ---------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------
#define FG_TLS __attribute__((tls_model("initial-exec"))) thread_local
FG_TLS uint64_t t_rng = 0;
FG_TLS int t_tick = 0;                         // launches of this thread until it reads the clock
constexpr int kTickEvery = 16;

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
using StreamQuery = decltype(&cuStreamQuery);

template <typename Record, typename Launch>
bool measured_launch(fracgpu::SharedRegion *r, int slot, int me, bool own, Record record, StreamQuery query,
                     CUstream stream, Launch launch, uint32_t represents, CUresult *result) {
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

// A launch with the device ours (alone, others idle, or our turn): most go
// straight through; one in about n is measured and stands for the n. False,
// having launched nothing, when another partition holds the device.
template <typename Record, typename Launch>
bool sampled_launch(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, bool own, bool bounded,
                    Record record, StreamQuery query, CUstream stream, Launch launch, CUresult *result) {
    if (view.countdown.fetch_sub(1, std::memory_order_relaxed) > 1) {
        int owner = r->owner.load(std::memory_order_acquire);
        if (own ? owner != me : owner >= 0 && owner != me) {
            view.countdown.fetch_add(1, std::memory_order_relaxed);
            return false;
        }
        *result = launch();
        return true;
    }
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
    if (measured_launch(r, slot, me, own, record, query, stream, launch, (uint32_t)(represents > 0 ? represents : 1),
                        result))
        return true;
    // Not launched: this launch waits for the device, and is measured then.
    view.drawn.store(represents, std::memory_order_relaxed);
    view.countdown.store(1, std::memory_order_relaxed);
    return false;
}

// ---------------------------------------------------------------------------
// Waiting for a turn
// ---------------------------------------------------------------------------
// `bucket`: the most device time the partition may save up.
void refill_cap(fracgpu::SharedPartition &part, uint64_t now, uint64_t bucket) {
    uint64_t last = part.cap_refill_ns.load(std::memory_order_relaxed);
    if (last == 0) {
        if (part.cap_refill_ns.compare_exchange_strong(last, now)) part.cap_tokens_ns.store(0);
        return;
    }
    if (now <= last || !part.cap_refill_ns.compare_exchange_strong(last, now)) return;
    int64_t add = (int64_t)((double)(now - last) * fracgpu::share_of(part));
    uint64_t cur = part.cap_tokens_ns.load(std::memory_order_relaxed);
    for (;;) {
        int64_t next = (int64_t)cur + add;
        if (next > (int64_t)bucket) next = (int64_t)bucket;
        if (part.cap_tokens_ns.compare_exchange_weak(cur, (uint64_t)next)) break;
    }
}

// The weight a partition's turns are charged at (its share; without one, an
// equal part of what the shares leave), as decide() computes it.
double weight_of(fracgpu::SharedRegion *r, int p) {
    double w = 1.0;
    bool yield_queue, outranked;
    decide(r, p, mono_ns(), &w, &yield_queue, &outranked);
    return w > 0 ? w : 1.0;
}

// The turn of partition `p`, the device's owner, is charged up to `now`.
// Called by whoever ends it or renews it, before the owner changes. A turn is
// charged at most kMaxTurnNs: past that it was abandoned (its holder vanished).
constexpr uint64_t kMaxTurnNs = 25 * kLeaseNs;
void charge_turn(fracgpu::SharedRegion *r, int p, uint64_t now) {
    uint64_t start = r->lease_start_ns.exchange(now, std::memory_order_relaxed);
    if (p < 0 || start == 0 || now <= start || !__atomic_load_n(&r->partitions[p].in_use, __ATOMIC_ACQUIRE)) return;
    uint64_t held = std::min(now - start, kMaxTurnNs);
    r->partitions[p].vtime_ns.fetch_add((uint64_t)((double)held / weight_of(r, p)), std::memory_order_relaxed);
}

// The device goes from `from` to nobody: its turn charged (up to `end`), the
// waiters woken.
bool release(fracgpu::SharedRegion *r, int from, uint64_t end) {
    if (r->owner.load(std::memory_order_acquire) != from) return false;
    charge_turn(r, from, end);
    if (!r->owner.compare_exchange_strong(from, -1)) return false;
    wake_waiters(r);
    return true;
}

// Of the waiting partitions of the highest class that waits, the one with the
// lowest virtual time (ties: lowest index).
int most_deserving(fracgpu::SharedRegion *r) {
    int best = -1, best_class = -1;
    uint64_t best_v = 0;
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        if (!__atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE) || q.waiting_ns.load() == 0) continue;
        int klass = fracgpu::priority_of(q);
        uint64_t v = q.vtime_ns.load(std::memory_order_relaxed);
        if (klass > best_class || (klass == best_class && v < best_v)) best = i, best_class = klass, best_v = v;
    }
    return best;
}

// Work of other partitions still on the device (launched outside the gate
// before they saw the lease taken): the device is not ours until it drains.
// Counts that have not moved for kStaleInflightNs are not waited for: only a
// process that vanished mid-launch leaves one behind.
constexpr uint64_t kStaleInflightNs = 25 * kLeaseNs;
bool others_inflight(fracgpu::SharedRegion *r, int me, uint64_t now) {
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        if (i == me || !__atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE) || q.inflight.load(std::memory_order_seq_cst) == 0)
            continue;
        uint64_t last = q.last_launch_ns.load(std::memory_order_relaxed);
        if (now < last || now - last < kStaleInflightNs) return true;
    }
    return false;
}

// Whether a partition other than `me`, of class `klass` or above, waits for the device.
bool others_waiting(fracgpu::SharedRegion *r, int me, int klass) {
    for (int i = 0; i < fracgpu::kMaxPartitions; i++)
        if (i != me && __atomic_load_n(&r->partitions[i].in_use, __ATOMIC_ACQUIRE) &&
            r->partitions[i].waiting_ns.load(std::memory_order_relaxed) != 0 &&
            fracgpu::priority_of(r->partitions[i]) >= klass)
            return true;
    return false;
}

// A partition back from idle starts at the lowest virtual time of the busy
// ones of its class: it neither saved up turns while idle nor owes any.
void catch_up(fracgpu::SharedRegion *r, int me, uint64_t now) {
    uint64_t floor = UINT64_MAX;
    int klass = fracgpu::priority_of(r->partitions[me]);
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        if (i == me || !__atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE) || !busy(q, now) ||
            fracgpu::priority_of(q) != klass)
            continue;
        uint64_t v = q.vtime_ns.load(std::memory_order_relaxed);
        if (v < floor) floor = v;
    }
    fracgpu::SharedPartition &mine = r->partitions[me];
    uint64_t v = mine.vtime_ns.load(std::memory_order_relaxed);
    while (floor != UINT64_MAX && v < floor && !mine.vtime_ns.compare_exchange_weak(v, floor)) {
    }
}

bool others_busy(fracgpu::SharedRegion *r, int me, uint64_t now) {
    for (int i = 0; i < fracgpu::kMaxPartitions; i++)
        if (i != me && __atomic_load_n(&r->partitions[i].in_use, __ATOMIC_ACQUIRE) && busy(r->partitions[i], now))
            return true;
    return false;
}

// Out of allowance: a capped partition over its cap, or a high one past its
// share while others are busy. Not a candidate for the device meanwhile
// (others neither yield to it nor wait for it), and the device goes to them;
// sleeps about as long as the bucket takes to refill (<= 2 ms). False: go on.
bool stand_aside(fracgpu::SharedRegion *r, int me, uint64_t now, bool capped) {
    fracgpu::SharedPartition &mine = r->partitions[me];
    refill_cap(mine, now, capped ? kCapBucketNs : (uint64_t)(fracgpu::share_of(mine) * kPriorityWindowNs));
    uint64_t left = mine.cap_tokens_ns.load();
    int64_t tokens = (int64_t)left;
    if (tokens < 0 && !capped && !others_busy(r, me, now)) {
        // Alone, a high partition runs on; it owes nothing for that when others come.
        mine.cap_tokens_ns.compare_exchange_strong(left, 0);
        tokens = 0;
    }
    if (tokens >= 0) {
        uint64_t none = 0;
        mine.waiting_ns.compare_exchange_strong(none, now, std::memory_order_relaxed);   // a candidate again
        return false;
    }
    mine.waiting_ns.store(0, std::memory_order_relaxed);
    if (mine.inflight.load(std::memory_order_acquire) == 0) release(r, me, now);
    double wait_ns = (double)-tokens / fracgpu::share_of(mine);
    std::this_thread::sleep_for(std::chrono::nanoseconds((uint64_t)(wait_ns < 2e6 ? wait_ns : 2e6)));
    return true;
}

// The device is ours (owner just set to `me`): work of others still on it
// (launched outside the gate before they saw the lease taken, or a lower
// class's queue) drains first, then the turn starts.
void start_turn(fracgpu::SharedRegion *r, int me) {
    while (others_inflight(r, me, mono_ns())) nap();
    uint64_t now = mono_ns();
    r->lease_start_ns.store(now, std::memory_order_relaxed);
    r->lease_until_ns.store(now + kLeaseNs, std::memory_order_relaxed);
}

// Inside its turn a launch goes on with nothing more to read: the device is
// ours, the turn not over, no higher class looks for it, and (capped, or high
// and held to a share) the allowance is not spent.
bool in_turn(fracgpu::SharedRegion *r, int me, uint64_t now, bool outranked) {
    const fracgpu::SharedPartition &mine = r->partitions[me];
    if (outranked || r->owner.load(std::memory_order_acquire) != me ||
        now >= r->lease_until_ns.load(std::memory_order_relaxed))
        return false;
    bool allowance = (fracgpu::flags_of(mine) & fracgpu::kPartitionCap) || held_to_share(mine);
    return !allowance || (int64_t)mine.cap_tokens_ns.load(std::memory_order_relaxed) >= 0;
}

// prev_launch: when this partition launched before this launch (0: never).
// outranked: a partition of a higher class was busy at the last look (only
// then does a turn look for one waiting, so that without high or low
// partitions a launch inside its turn reads no other partition).
void wait_turn(fracgpu::SharedRegion *r, int me, uint64_t prev_launch, bool outranked) {
    fracgpu::SharedPartition &mine = r->partitions[me];
    bool capped = fracgpu::flags_of(mine) & fracgpu::kPartitionCap;
    bool allowance = capped || held_to_share(mine);
    int klass = fracgpu::priority_of(mine);
    uint64_t now = mono_ns();
    uint64_t zero = 0;
    if (mine.waiting_ns.compare_exchange_strong(zero, now) && r->owner.load() != me &&
        (!prev_launch || now - prev_launch >= kActiveNs) && mine.inflight.load() == 0)
        catch_up(r, me, now);
    for (;; now = mono_ns()) {
        if (allowance && stand_aside(r, me, now, capped)) continue;
        int owner = r->owner.load(std::memory_order_acquire);
        if (owner == me) {
            uint64_t until = r->lease_until_ns.load(std::memory_order_relaxed);
            if (now < until && !(outranked && others_waiting(r, me, klass + 1))) break;
            if (!others_waiting(r, me, klass)) {   // nobody waits: the turn goes on, charged so far
                charge_turn(r, me, now);
                r->lease_until_ns.store(now + kLeaseNs, std::memory_order_relaxed);
                break;
            }
            // The turn is over (or a higher class waits): hand the device over once our work has drained.
            if (mine.inflight.load(std::memory_order_acquire) == 0) release(r, me, now);
            else nap();
            continue;
        }
        if (owner >= 0) {
            const fracgpu::SharedPartition &holder = r->partitions[owner];
            // Idle: nothing in flight, and nothing launched since its work was
            // last seen done (a holder whose queue just drained, synchronising
            // before its next launch, is not idle).
            uint64_t last = std::max(holder.last_launch_ns.load(std::memory_order_relaxed),
                                     holder.last_done_ns.load(std::memory_order_relaxed));
            bool high_holder = fracgpu::priority_of(holder) == kHigh;
            uint64_t gap = high_holder ? kHighIdleGapNs : kIdleGapNs;
            bool idle = holder.inflight.load() == 0 && holder.waiting_ns.load() == 0 && now > last &&
                        now - last > gap;
            // A holder far past its turn is taken from even with work in flight
            // (a counter can only be wrong there if its process vanished).
            uint64_t until = r->lease_until_ns.load();
            bool expired = now > until + 25 * kLeaseNs;
            if (!__atomic_load_n(&holder.in_use, __ATOMIC_ACQUIRE) || idle || expired) {
                // Free the device of an idle or gone holder; an idle one is
                // charged until its work was last seen done, not for its idling.
                release(r, owner, idle ? std::min(now, last) : now);
                continue;
            }
            if (klass == kHigh && !high_holder) {
                if (most_deserving(r) == me) {
                    charge_turn(r, owner, now);
                    if (r->owner.compare_exchange_strong(owner, me, std::memory_order_seq_cst)) {
                        start_turn(r, me);   // taken from a lower class: its queued work (one launch deep) drains
                        break;
                    }
                }
                nap();
                continue;
            }
            // Sleep until the holder hands over, its turn ends, or it may have
            // gone idle (looked at again every kIdleGapNs / 4).
            uint64_t left = until > now ? until - now : 0;
            sleep_on_owner(r, owner, std::clamp<uint64_t>(left, 20'000, gap / 4));
            continue;
        }
        if (most_deserving(r) != me || others_inflight(r, me, now)) {
            nap();
            continue;
        }
        int free_ = -1;
        if (r->owner.compare_exchange_strong(free_, me, std::memory_order_seq_cst)) {
            start_turn(r, me);
            break;
        }
    }
    // About to launch: not idle, though the last launch may be long ago (it
    // waited for this turn). Stored before the waiting mark goes, so no other
    // partition ever sees this holder as idle and takes the turn back.
    mine.last_launch_ns.store(mono_ns(), std::memory_order_relaxed);
    mine.waiting_ns.store(0, std::memory_order_release);
}

// A launch in front of which the gate stands. `record` is the real
// cuEventRecord or cuEventRecord_ptsz, to bracket the measured launches on
// their stream.
template <typename Record, typename Launch>
CUresult gated(CUstream stream, Record record, StreamQuery query, Launch launch) {
    int dev = launch_device();
    fracgpu::Region *region;
    int slot;
    if (dev < 0 || dev >= kMaxDevices || !bound_slot(dev, &region, &slot)) return launch();
    fracgpu::SharedRegion *r = region->raw();
    int me = r->processes[slot].partition;
    fracgpu::SharedPartition &mine = r->partitions[me];
    DeviceView &view = g_view[dev];
    int mode = view.mode.load(std::memory_order_relaxed);
    // The clock is read at every launch in turns, and outside them at every
    // kTickEvery-th launch of a thread (a clock read costs as much as a tenth
    // of a launch): launches of an alone partition count less than its kernels.
    uint64_t now = 0, prev_launch = view.published.load(std::memory_order_relaxed);
    if (mode == kGate || --t_tick <= 0) {
        t_tick = kTickEvery;
        now = mono_ns();
        // Busy, as the others see it: told every kPublishNs, not at every launch.
        if (now - prev_launch >= kPublishNs) {
            view.published.store(now, std::memory_order_relaxed);
            mine.last_launch_ns.store(now, std::memory_order_relaxed);
        }
    }
    if (now && now >= view.next_check.load(std::memory_order_relaxed)) {
        view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
        view.slot.store(slot, std::memory_order_relaxed);
        view.partition.store(me, std::memory_order_relaxed);
        view.region.store(r, std::memory_order_release);
        double w = 1.0;
        bool yield_queue = false, outranked = false;
        int mode = decide(r, me, now, &w, &yield_queue, &outranked, &view.saturation);
        view.yield_queue.store(yield_queue, std::memory_order_relaxed);
        view.outranked.store(outranked, std::memory_order_relaxed);
        if (yield_queue) measure_next(view);
        if (view.mode.exchange(mode, std::memory_order_relaxed) != kGate && mode == kGate) drain_unmeasured();
        // Nobody else busy: a lease still held is given back, its turn charged
        // until now and no further (a returning partition takes the device
        // without waiting, and finds virtual times as they were).
        if (mode != kGate && r->owner.load(std::memory_order_relaxed) == me) release(r, me, now);
    }
    CUresult rc;
    mode = view.mode.load(std::memory_order_relaxed);
    if (mode != kGate) {   // the device is ours while nobody else is busy
        if (sampled_launch(view, r, slot, me, false, mode == kWatch, record, query, stream, launch, &rc)) return rc;
        // Another partition took the device: take turns from this launch on.
        now = mono_ns();
        view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
        if (view.mode.exchange(kGate, std::memory_order_relaxed) != kGate) drain_unmeasured();
    }
    for (;;) {
        bool outranked = view.outranked.load(std::memory_order_relaxed);
        if (!in_turn(r, me, now, outranked)) {
            wait_turn(r, me, prev_launch, outranked);
            uint64_t after = mono_ns();
            g_waited_ns.fetch_add(after - now, std::memory_order_relaxed);
            view.published.store(after, std::memory_order_relaxed);
        }
        if (view.yield_queue.load(std::memory_order_relaxed)) measure_next(view);
        if (sampled_launch(view, r, slot, me, true, true, record, query, stream, launch, &rc)) return rc;
        now = mono_ns();   // taken by a higher class meanwhile: wait again
    }
}

}  // namespace

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

void gate_forget_after_fork() {
    // Only the forking thread exists in the child: whatever the parent's other
    // threads held is remade, and the parent's events (of its contexts) dropped.
    new (&g_mu) std::mutex();
    new (&g_cv) std::condition_variable();
    g_pending->clear();
    g_pool->clear();
    g_measured.store(0);
    g_reader_started = false;
    for (int d = 0; d < kMaxDevices; d++) {
        g_view[d].next_check.store(0);
        g_view[d].published.store(0);
        g_view[d].mode.store(kAlone);
        g_view[d].yield_queue.store(false);
        g_view[d].outranked.store(false);
        g_view[d].countdown.store(0);
        g_view[d].drawn.store(0);
        g_view[d].region.store(nullptr);
        t_tick = 0;
        g_view[d].saturation.at_ns = 0;
        g_view[d].saturation.calm = 0;
        g_view[d].saturation.busy.store(false);
        g_view[d].saturation.saturated.store(true);
    }
}

}  // namespace shim

using namespace shim;

// ---------------------------------------------------------------------------
// The gated launch entry points
// ---------------------------------------------------------------------------
SHIM_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                 unsigned bz, unsigned shmem, CUstream s, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernel);
    return gated(s, REAL(cuEventRecord), REAL(cuStreamQuery),
                 [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra); });
}
SHIM_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                      unsigned bz, unsigned shmem, CUstream s, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernel_ptsz);
    return gated(s, REAL(cuEventRecord_ptsz), REAL(cuStreamQuery_ptsz),
                 [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra); });
}
SHIM_API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx);
    return gated(config ? config->hStream : nullptr, REAL(cuEventRecord), REAL(cuStreamQuery),
                 [&] { return real(config, f, params, extra); });
}
SHIM_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx_ptsz);
    return gated(config ? config->hStream : nullptr, REAL(cuEventRecord_ptsz), REAL(cuStreamQuery_ptsz),
                 [&] { return real(config, f, params, extra); });
}
SHIM_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                            unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel);
    return gated(s, REAL(cuEventRecord), REAL(cuStreamQuery),
                 [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params); });
}
SHIM_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                                 unsigned by, unsigned bz, unsigned shmem, CUstream s,
                                                 void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel_ptsz);
    return gated(s, REAL(cuEventRecord_ptsz), REAL(cuStreamQuery_ptsz),
                 [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params); });
}
// A graph launch is gated like a kernel's; one with allocation nodes also
// has its graph memory charged (graphs.cpp).
template <typename Call>
CUresult graph_launch(CUgraphExec g, CUstream s, decltype(&cuEventRecord) record, StreamQuery query, Call call) {
    GraphLaunch mem;
    CUresult rc = graph_before_launch(g, &mem);
    if (rc != CUDA_SUCCESS) return rc;
    rc = gated(s, record, query, call);
    graph_after_launch(g, mem, rc);
    return rc;
}
SHIM_API CUresult cuGraphLaunch(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch);
    return graph_launch(g, s, REAL(cuEventRecord), REAL(cuStreamQuery), [&] { return real(g, s); });
}
SHIM_API CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch_ptsz);
    return graph_launch(g, s, REAL(cuEventRecord_ptsz), REAL(cuStreamQuery_ptsz), [&] { return real(g, s); });
}

// The driver calls the shim made in this process, by kind (what the simulated
// driver's fracgpu_sim_call_counts says of all calls, for a real driver):
// writes at most `cap` counts and names and returns how many kinds there are.
SHIM_API int fracgpu_shim_call_counts(unsigned long long *counts, const char **names, int cap) {
    for (int i = 0; i < cap && i < kCallKinds; i++) {
        if (counts) counts[i] = g_calls[i].load(std::memory_order_relaxed);
        if (names) names[i] = kCallNames[i];
    }
    return kCallKinds;
}
