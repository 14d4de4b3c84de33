// The launch gate: compute shares by weighted time-slicing of the device.
//
// When one partition alone uses a GPU (and has no cap) the gate is one clock
// read and one atomic store per launch, no wait, and an event pair only on the
// launches measured for the ledger (see below). When several
// partitions are busy, the device is leased to one partition at a time for a
// slice of kLeaseNs; the next lease goes to the waiting partition whose
// virtual time (device time used / weight) is lowest, so over time each gets
// device time in proportion to its weight. A lease ends early when its holder
// goes idle, so the scheduler is work-conserving; a partition that comes back
// from idle starts at the others' virtual time (no credit for idling, no debt).
//
// Device time is measured: each gated launch is bracketed by two pooled
// events, and a per-process thread reads them as they complete (off the
// launch path) into the partition's and process's counters. A CUDA graph
// launch is bracketed the same way, so it is charged for all it runs. Because
// only the lease holder's work is on the device (the previous holder drains
// before the next starts), an event pair measures that partition's work and
// nobody else's. Outside the gate (a partition alone, or others idle) device
// time is still measured for the ledger, at a cost kept small: launches that
// average kBracketNs or more are each bracketed (two event records against a
// kernel at least 25 times longer); shorter ones are sampled, one launch in
// about n bracketed and counted for the n (n up to kMaxSampleEvery, chosen at
// random around its mean so that a training loop's period cannot alias it),
// so most launches take no event at all.
//
// A capped partition also draws on a token bucket filled at its share of wall
// time: it waits when the bucket is empty, even on an idle GPU.
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
//     keeps at most one launch on the device, so a high kernel waits at most
//     for the kernels already running (kernels are never split: splitting
//     would change the order of reductions, hence results);
//   - a high partition with a share draws on a bucket filled at that share
//     (kPriorityWindowNs of it may be saved up): empty, it stands aside while
//     others are busy, so it cannot starve them; alone it runs on, owing
//     nothing. Without a share it is bounded only by its own demand.
// Weights: shares of high and normal partitions are fractions of the device;
// low partitions' shares divide among themselves what the others leave, and
// are not counted against the others'.
#include "shim.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <new>
#include <sys/prctl.h>
#include <thread>
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
constexpr uint64_t kRecheckNs = 1'000'000;     // the fast path re-reads who else is busy this often
constexpr uint64_t kCapBucketNs = 4'000'000;   // how much unused capped time may be saved up
constexpr uint64_t kPriorityWindowNs = 100'000'000;   // a high partition with a share is held to it over this
// How much work a process may have queued on the device, in device time: a
// launch waits while its queued launches, at the average measured length of
// its recent ones, come to kQueueNs or more (so long kernels queue two deep
// and a turn ends promptly, while tiny kernels still stream), and there are
// never more than kMaxQueued.
constexpr uint64_t kQueueNs = 2'000'000;
constexpr size_t kMaxQueued = 64;
constexpr int kMaxDevices = 64;
constexpr uint64_t kBracketNs = 50'000;        // launches this long on average are measured one by one
constexpr uint64_t kMaxSampleEvery = 32;       // shorter ones: one in up to this many

// A short sleep while waiting for a turn. The thread's timer slack is set to
// 1 us first (the default 50 us would stretch every wait, and every handoff
// of the device, by that much).
void nap() {
    static thread_local bool precise = false;
    if (!precise) {
        precise = true;
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
}

// How a launch goes through the gate on one device, as this process last
// decided (re-read every kRecheckNs):
//   kAlone    no other partition on the GPU, no cap: straight through
//   kWatch    others exist but are idle: straight through, but a marker event
//             every kMarkEvery launches keeps this process's queue short, so
//             that one of them coming back gets the device within milliseconds
//   kGate     others are busy (or a cap): wait for a lease, measure with events
enum Mode { kAlone, kWatch, kGate };
constexpr unsigned kMarkEvery = 8;

struct DeviceView {
    std::atomic<uint64_t> next_check{0};
    std::atomic<int> mode{kAlone};
    std::atomic<double> weight{1.0};
    std::atomic<unsigned> launches{0};
    std::atomic<bool> yield_queue{false};   // a high partition other than ours is busy: queue one launch deep
    std::atomic<bool> outranked{false};     // a partition of a higher class than ours is busy
};
DeviceView *g_view = new DeviceView[kMaxDevices];

bool busy(const fracgpu::SharedPartition &q, uint64_t now) {
    uint64_t last = q.last_launch_ns.load(std::memory_order_relaxed);
    return q.inflight.load(std::memory_order_relaxed) > 0 || q.waiting_ns.load(std::memory_order_relaxed) != 0 ||
           (last && now - last < kActiveNs);
}

constexpr int kLow = FRACGPU_PRIORITY_LOW, kHigh = FRACGPU_PRIORITY_HIGH;

// Whether a high partition's share holds it back (see the header comment).
bool held_to_share(const fracgpu::SharedPartition &p) {
    uint32_t flags = fracgpu::flags_of(p);
    return (flags & fracgpu::kPartitionHigh) && !(flags & fracgpu::kPartitionCap) && fracgpu::share_of(p) > 0;
}

// How partition `me` must launch now (a Mode), and its weight: its share, or
// for partitions without one, an equal part of what the shares leave (low
// partitions: of what low partitions' shares leave). *yield_queue: a high
// partition is busy and `me` is not high; *outranked: a partition of a higher
// class than `me` is busy.
int decide(fracgpu::SharedRegion *r, int me, uint64_t now, double *weight, bool *yield_queue, bool *outranked) {
    const fracgpu::SharedPartition &mine = r->partitions[me];
    int mine_class = fracgpu::priority_of(mine);
    bool mine_low = mine_class == kLow;
    bool others_busy = false, others_exist = false, high_busy = false, higher_busy = false;
    double shared = 0;
    int unshared = 0;
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) {
        const fracgpu::SharedPartition &q = r->partitions[i];
        if (!__atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE)) continue;
        int klass = fracgpu::priority_of(q);
        if ((klass == kLow) == mine_low) {   // low's shares are not counted against the others'
            if (fracgpu::share_of(q) > 0) shared += fracgpu::share_of(q);
            else unshared++;
        }
        if (i == me) continue;
        others_exist = true;
        bool b = busy(q, now);
        others_busy = others_busy || b;
        high_busy = high_busy || (b && klass == kHigh);
        higher_busy = higher_busy || (b && klass > mine_class);
    }
    *yield_queue = high_busy && mine_class != kHigh;
    *outranked = higher_busy;
    double rest = shared < 0.95 ? 1.0 - shared : 0.05;
    double share = fracgpu::share_of(mine);
    *weight = share > 0 ? share : rest / (unshared ? unshared : 1);
    if (others_busy || (fracgpu::flags_of(mine) & fracgpu::kPartitionCap)) return kGate;
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
    double weight;
    uint32_t represents;   // launches this measurement stands for (ungated: it and the unmeasured before it)
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

// Recent measured length of this process's gated launches, plus one (0: none measured yet).
std::atomic<uint64_t> g_avg_launch_ns_plus1{0};

void account(const Pending &p, uint64_t ns) {
    uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
    g_avg_launch_ns_plus1.store(avg ? ((avg - 1) * 7 + ns) / 8 + 1 : ns + 1, std::memory_order_relaxed);
    fracgpu::SharedPartition &part = p.region->partitions[p.partition];
    fracgpu::SharedProcess &proc = p.region->processes[p.slot];
    uint64_t total = ns * p.represents;
    part.device_ns.fetch_add(total, std::memory_order_relaxed);
    part.vtime_ns.fetch_add((uint64_t)((double)total / p.weight), std::memory_order_relaxed);
    proc.device_ns.fetch_add(total, std::memory_order_relaxed);
    if ((fracgpu::flags_of(part) & fracgpu::kPartitionCap) || held_to_share(part))
        part.cap_tokens_ns.fetch_sub(total, std::memory_order_relaxed);
    saturating_dec(proc.inflight);
    saturating_dec(part.inflight);
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
        sync(oldest);
        lk.lock();
        for (auto it = g_pending->begin(); it != g_pending->end();) {
            CUresult rc = query(it->end);
            if (rc == CUDA_ERROR_NOT_READY) {
                ++it;
                continue;
            }
            float ms = 0;
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

// Watch mode: a marker event every kMarkEvery launches. The device time
// between two consecutive completed markers (while the queue was not empty)
// says how long kMarkEvery launches take; outstanding markers times that is
// the work queued. Past kQueueNs, the launch waits for the oldest marker, so
// long kernels queue a few milliseconds deep and tiny ones stream freely.
struct Mark {
    CUcontext ctx;
    CUevent event;
};
std::deque<Mark> *g_marks = new std::deque<Mark>;
Mark g_last_done{nullptr, nullptr};              // the latest completed marker, kept for the next interval
uint64_t g_mark_interval_ns_plus1 = 0;           // device time of kMarkEvery launches, plus one (0: unknown)

void retire_oldest_mark(decltype(&cuEventElapsedTime) elapsed) {
    Mark m = g_marks->front();
    g_marks->pop_front();
    float ms = 0;
    if (g_last_done.event && g_last_done.ctx == m.ctx && elapsed(&ms, g_last_done.event, m.event) == CUDA_SUCCESS) {
        uint64_t ns = (uint64_t)((double)ms * 1e6);
        uint64_t avg = g_mark_interval_ns_plus1;
        g_mark_interval_ns_plus1 = avg ? ((avg - 1) * 3 + ns) / 4 + 1 : ns + 1;
    }
    if (g_last_done.event) (*g_pool)[g_last_done.ctx].push_back(g_last_done.event);
    g_last_done = m;
}

template <typename Record>
void mark(CUstream stream, Record record) {
    CUcontext ctx = nullptr;
    auto get_ctx = REAL(cuCtxGetCurrent);
    auto query = REAL(cuEventQuery);
    auto sync = REAL(cuEventSynchronize);
    auto elapsed = REAL(cuEventElapsedTime);
    if (!get_ctx || !query || !sync || !elapsed || !record || get_ctx(&ctx) != CUDA_SUCCESS || !ctx) return;
    std::lock_guard<std::mutex> lk(g_mu);
    while (!g_marks->empty() && query(g_marks->front().event) != CUDA_ERROR_NOT_READY) retire_oldest_mark(elapsed);
    for (;;) {
        uint64_t each = g_mark_interval_ns_plus1 ? g_mark_interval_ns_plus1 - 1 : kQueueNs;   // unknown: all of it
        size_t queued = g_marks->size();
        if (queued < 2 || (queued < kMaxQueued && queued * each < kQueueNs)) break;
        sync(g_marks->front().event);
        retire_oldest_mark(elapsed);
    }
    CUevent e = take_event(ctx);
    if (!e) return;
    if (record(e, stream) == CUDA_SUCCESS) g_marks->push_back(Mark{ctx, e});
    else (*g_pool)[ctx].push_back(e);
}

// Entering the gate: the work this process queued outside it must finish
// first, or it would run in another partition's turn.
void drain_unmeasured(int previous_mode) {
    if (previous_mode == kAlone) {
        if (auto sync = REAL(cuCtxSynchronize)) sync();
        return;
    }
    auto sync = REAL(cuEventSynchronize);
    std::lock_guard<std::mutex> lk(g_mu);
    auto elapsed = REAL(cuEventElapsedTime);
    while (!g_marks->empty() && sync && elapsed) {
        sync(g_marks->front().event);
        retire_oldest_mark(elapsed);
    }
}

// ---------------------------------------------------------------------------
// Measuring outside the gate
// ---------------------------------------------------------------------------
thread_local uint32_t t_countdown = 0;   // launches until this thread's next measured one (0, 1: this one)
thread_local uint32_t t_unmeasured = 0;  // launches since its last measured one
thread_local uint64_t t_rng = 0;

void start_reader_locked() {
    if (!g_reader_started) {
        g_reader_started = true;
        std::thread(reader_main).detach();
    }
}

// How many launches until the next measured one: 1 while launches average
// kBracketNs or more (or nothing is measured yet), else about kBracketNs / avg,
// drawn uniformly from 1 .. 2n - 1.
uint32_t next_countdown() {
    uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
    if (avg == 0 || avg - 1 >= kBracketNs) return 1;
    uint64_t n = kBracketNs / (avg - 1 > 0 ? avg - 1 : 1);
    if (n > kMaxSampleEvery) n = kMaxSampleEvery;
    if (n <= 1) return 1;
    if (t_rng == 0) t_rng = mono_ns() | 1;
    t_rng ^= t_rng << 13, t_rng ^= t_rng >> 7, t_rng ^= t_rng << 17;   // xorshift64
    return (uint32_t)(1 + t_rng % (2 * n - 1));
}

// A measured launch: two pooled events of `ctx` (null when none could be made),
// the launch between them, then the pair to the reader or back to the pool.
void take_pair(CUcontext ctx, CUevent *start, CUevent *end) {
    std::lock_guard<std::mutex> lk(g_mu);
    start_reader_locked();
    *start = take_event(ctx);
    *end = take_event(ctx);
}

// True when both events were recorded around a launch that succeeded.
template <typename Record, typename Launch>
bool launch_between(CUevent start, CUevent end, CUstream stream, Record record, Launch launch, CUresult *rc) {
    bool measured = start && end && record(start, stream) == CUDA_SUCCESS;
    *rc = launch();
    return measured && *rc == CUDA_SUCCESS && record(end, stream) == CUDA_SUCCESS;
}

void settle(bool measured, const Pending &p) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (measured) {
        g_pending->push_back(p);
        g_cv.notify_all();
        return;
    }
    auto &pool = (*g_pool)[p.ctx];
    if (p.start) pool.push_back(p.start);
    if (p.end) pool.push_back(p.end);
}

// A launch outside the gate: most go straight through; a measured one is
// bracketed by events and stands for the unmeasured launches before it.
// Returns false, having launched nothing, when another partition holds the
// device's lease: this process must take turns from now on.
template <typename Record, typename Launch>
bool ungated(fracgpu::SharedRegion *r, int slot, int me, double weight, Record record, CUstream stream,
             Launch launch, CUresult *result) {
    fracgpu::SharedPartition &mine = r->partitions[me];
    fracgpu::SharedProcess &proc = r->processes[slot];
    if (t_countdown > 1) {
        int owner = r->owner.load(std::memory_order_acquire);
        if (owner >= 0 && owner != me) return false;
        t_countdown--;
        t_unmeasured++;
        *result = launch();
        return true;
    }
    // In flight before the lease is looked at, as the gate looks at work in
    // flight after taking the lease: of a launch here and a lease taken there
    // at the same moment, one always sees the other.
    mine.inflight.fetch_add(1, std::memory_order_seq_cst);
    proc.inflight.fetch_add(1, std::memory_order_seq_cst);
    int owner = r->owner.load(std::memory_order_seq_cst);
    if (owner >= 0 && owner != me) {
        saturating_dec(proc.inflight);
        saturating_dec(mine.inflight);
        return false;
    }
    CUcontext ctx = nullptr;
    auto get_ctx = REAL(cuCtxGetCurrent);
    CUevent start = nullptr, end = nullptr;
    if (record && get_ctx && get_ctx(&ctx) == CUDA_SUCCESS && ctx) take_pair(ctx, &start, &end);
    CUresult rc;
    bool measured = launch_between(start, end, stream, record, launch, &rc);
    *result = rc;
    uint32_t represents = t_unmeasured + (rc == CUDA_SUCCESS ? 1 : 0);
    t_unmeasured = 0;
    t_countdown = next_countdown();
    mine.launches.fetch_add(represents, std::memory_order_relaxed);
    proc.launches.fetch_add(represents, std::memory_order_relaxed);
    if (!measured) {
        saturating_dec(proc.inflight);
        saturating_dec(mine.inflight);
    }
    if (ctx) settle(measured, Pending{start, end, ctx, r, slot, me, weight, represents});
    return true;
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
    int held = me;
    if (mine.inflight.load(std::memory_order_acquire) == 0) r->owner.compare_exchange_strong(held, -1);
    double wait_ns = (double)-tokens / fracgpu::share_of(mine);
    std::this_thread::sleep_for(std::chrono::nanoseconds((uint64_t)(wait_ns < 2e6 ? wait_ns : 2e6)));
    return true;
}

// The device is ours (owner just set to `me`): work of others still on it
// (launched outside the gate before they saw the lease taken, or a lower
// class's queue) drains first, then the turn starts.
void start_turn(fracgpu::SharedRegion *r, int me) {
    while (others_inflight(r, me, mono_ns())) nap();
    r->lease_until_ns.store(mono_ns() + kLeaseNs, std::memory_order_relaxed);
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
    for (;; nap(), now = mono_ns()) {
        if (allowance && stand_aside(r, me, now, capped)) continue;
        int owner = r->owner.load(std::memory_order_acquire);
        if (owner == me) {
            uint64_t until = r->lease_until_ns.load(std::memory_order_relaxed);
            if (now < until && !(outranked && others_waiting(r, me, klass + 1))) break;
            if (!others_waiting(r, me, klass)) {
                r->lease_until_ns.store(now + kLeaseNs, std::memory_order_relaxed);
                break;
            }
            // The turn is over (or a higher class waits): hand the device over once our work has drained.
            if (mine.inflight.load(std::memory_order_acquire) == 0) r->owner.compare_exchange_strong(owner, -1);
            continue;
        }
        if (owner >= 0) {
            const fracgpu::SharedPartition &holder = r->partitions[owner];
            uint64_t last = holder.last_launch_ns.load(std::memory_order_relaxed);
            uint64_t gap = fracgpu::priority_of(holder) == kHigh ? kHighIdleGapNs : kIdleGapNs;
            bool idle = holder.inflight.load() == 0 && holder.waiting_ns.load() == 0 && now - last > gap;
            // A holder far past its turn is taken from even with work in flight
            // (a counter can only be wrong there if its process vanished).
            bool expired = now > r->lease_until_ns.load() + 25 * kLeaseNs;
            if (!__atomic_load_n(&holder.in_use, __ATOMIC_ACQUIRE) || idle || expired) {
                r->owner.compare_exchange_strong(owner, -1);   // free the device of an idle or gone holder
            } else if (klass == kHigh && fracgpu::priority_of(holder) < kHigh && most_deserving(r) == me &&
                       r->owner.compare_exchange_strong(owner, me, std::memory_order_seq_cst)) {
                start_turn(r, me);   // taken from a lower class: its queued work (one launch deep) drains
                break;
            }
            continue;
        }
        if (most_deserving(r) != me || others_inflight(r, me, now)) continue;
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
// cuEventRecord or cuEventRecord_ptsz, to bracket the launch on its stream.
template <typename Record, typename Launch>
CUresult gated(CUstream stream, Record record, Launch launch) {
    int dev = launch_device();
    fracgpu::Region *region;
    int slot;
    if (dev < 0 || dev >= kMaxDevices || !bound_slot(dev, &region, &slot)) return launch();
    fracgpu::SharedRegion *r = region->raw();
    int me = r->processes[slot].partition;
    fracgpu::SharedPartition &mine = r->partitions[me];
    uint64_t now = mono_ns();
    uint64_t prev_launch = mine.last_launch_ns.exchange(now, std::memory_order_relaxed);
    DeviceView &view = g_view[dev];
    if (now >= view.next_check.load(std::memory_order_relaxed)) {
        view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
        double w = 1.0;
        bool yield_queue = false, outranked = false;
        int mode = decide(r, me, now, &w, &yield_queue, &outranked);
        view.weight.store(w, std::memory_order_relaxed);
        view.yield_queue.store(yield_queue, std::memory_order_relaxed);
        view.outranked.store(outranked, std::memory_order_relaxed);
        int before = view.mode.exchange(mode, std::memory_order_relaxed);
        if (mode == kGate && before != kGate) drain_unmeasured(before);
    }
    int mode = view.mode.load(std::memory_order_relaxed);
    if (mode != kGate) {   // the fast path
        CUresult rc;
        if (ungated(r, slot, me, view.weight.load(std::memory_order_relaxed), record, stream, launch, &rc)) {
            if (mode == kWatch && rc == CUDA_SUCCESS &&
                view.launches.fetch_add(1, std::memory_order_relaxed) % kMarkEvery == 0)
                mark(stream, record);
            return rc;
        }
        // Another partition took the device: take turns from this launch on.
        view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
        drain_unmeasured(view.mode.exchange(kGate, std::memory_order_relaxed));
    }

    CUcontext ctx = nullptr;
    auto get_ctx = REAL(cuCtxGetCurrent);
    if (!get_ctx || get_ctx(&ctx) != CUDA_SUCCESS || !ctx || !record) return launch();
    {
        // Keep this process's queued work short (kQueueNs), so a turn ends
        // promptly and the next holder finds the device free.
        std::unique_lock<std::mutex> lk(g_mu);
        start_reader_locked();
        // While a high partition is busy, one launch deep: a high kernel then
        // waits for at most the one running.
        for (;;) {
            size_t queued = g_pending->size();
            if (view.yield_queue.load(std::memory_order_relaxed)) {
                if (queued == 0) break;
                g_cv.wait_for(lk, std::chrono::microseconds(200));
                continue;
            }
            uint64_t avg = g_avg_launch_ns_plus1.load(std::memory_order_relaxed);
            uint64_t each = avg ? avg - 1 : kQueueNs;   // unknown yet: as long as the whole allowance
            if (queued < 2 || (queued < kMaxQueued && queued * each < kQueueNs)) break;
            g_cv.wait_for(lk, std::chrono::microseconds(200));
        }
    }
    fracgpu::SharedProcess &proc = r->processes[slot];
    for (;;) {
        wait_turn(r, me, prev_launch, view.outranked.load(std::memory_order_relaxed));
        // In flight before the lease is looked at again, as a high partition
        // that takes the device looks at work in flight after taking it: of a
        // launch here and a taking there, one always sees the other.
        mine.inflight.fetch_add(1, std::memory_order_seq_cst);
        proc.inflight.fetch_add(1, std::memory_order_seq_cst);
        if (r->owner.load(std::memory_order_seq_cst) == me) break;
        saturating_dec(proc.inflight);   // taken by a higher class meanwhile: wait again
        saturating_dec(mine.inflight);
    }
    CUevent start, end;
    take_pair(ctx, &start, &end);
    CUresult rc;
    bool measured = launch_between(start, end, stream, record, launch, &rc);
    mine.last_launch_ns.store(mono_ns(), std::memory_order_relaxed);
    mine.launches.fetch_add(1, std::memory_order_relaxed);
    proc.launches.fetch_add(1, std::memory_order_relaxed);
    if (!measured) {   // else in flight until the reader sees it complete
        saturating_dec(proc.inflight);
        saturating_dec(mine.inflight);
    }
    settle(measured, Pending{start, end, ctx, r, slot, me, view.weight.load(), 1});
    return rc;
}

}  // namespace

void gate_account_finished() {
    // At exit: launches that completed but that the reader has not taken yet
    // (the job synchronised and ended at once) still count. Only queried, never
    // waited for: whatever is still running at exit is not this job's to wait on.
    auto query = REAL(cuEventQuery);
    auto elapsed = REAL(cuEventElapsedTime);
    if (!query || !elapsed || !g_mu.try_lock()) return;
    for (auto it = g_pending->begin(); it != g_pending->end();) {
        float ms = 0;
        if (query(it->end) == CUDA_SUCCESS && elapsed(&ms, it->start, it->end) == CUDA_SUCCESS) {
            account(*it, ms > 0 ? (uint64_t)((double)ms * 1e6) : 0);
            it = g_pending->erase(it);   // its events go with the process
        } else {
            ++it;
        }
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
    g_marks->clear();
    g_last_done = Mark{nullptr, nullptr};
    g_reader_started = false;
    for (int d = 0; d < kMaxDevices; d++) {
        g_view[d].next_check.store(0);
        g_view[d].mode.store(kAlone);
        g_view[d].yield_queue.store(false);
        g_view[d].outranked.store(false);
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
    return gated(s, REAL(cuEventRecord), [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra); });
}
SHIM_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                      unsigned bz, unsigned shmem, CUstream s, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernel_ptsz);
    return gated(s, REAL(cuEventRecord_ptsz),
                 [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra); });
}
SHIM_API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx);
    return gated(config ? config->hStream : nullptr, REAL(cuEventRecord),
                 [&] { return real(config, f, params, extra); });
}
SHIM_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx_ptsz);
    return gated(config ? config->hStream : nullptr, REAL(cuEventRecord_ptsz),
                 [&] { return real(config, f, params, extra); });
}
SHIM_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                            unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel);
    return gated(s, REAL(cuEventRecord), [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params); });
}
SHIM_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                                 unsigned by, unsigned bz, unsigned shmem, CUstream s,
                                                 void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel_ptsz);
    return gated(s, REAL(cuEventRecord_ptsz), [&] { return real(f, gx, gy, gz, bx, by, bz, shmem, s, params); });
}
// A graph launch is gated like a kernel's; one with allocation nodes also
// has its graph memory charged (graphs.cpp).
template <typename Call>
CUresult graph_launch(CUgraphExec g, CUstream s, decltype(&cuEventRecord) record, Call call) {
    GraphLaunch mem;
    CUresult rc = graph_before_launch(g, &mem);
    if (rc != CUDA_SUCCESS) return rc;
    rc = gated(s, record, call);
    graph_after_launch(g, mem, rc);
    return rc;
}
SHIM_API CUresult cuGraphLaunch(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch);
    return graph_launch(g, s, REAL(cuEventRecord), [&] { return real(g, s); });
}
SHIM_API CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch_ptsz);
    return graph_launch(g, s, REAL(cuEventRecord_ptsz), [&] { return real(g, s); });
}
