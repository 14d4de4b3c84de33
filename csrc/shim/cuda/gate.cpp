// The launch gate: the policy's decisions (fracgpu/gate_policy.h) applied to
// the shared state of one GPU, with its atomics and the owner word's futex.
//
// Every decision is the policy's: this file reads a snapshot of the region
// (snapshot()), asks the policy, and carries out the answer. What it adds is
// the mechanism: the order of the atomic steps, so that of a launch counted
// in flight and a lease taken at the same moment one always sees the other
// (in flight before the lease is read; the lease taken before work in flight
// is read); sleeping on the owner word, which is a futex shared by every
// process of the GPU (the region is a shared file mapping), and waking its
// waiters on each hand-over; and the buckets' refills, claimed by CAS so that
// each interval of wall time is added once.
//
// Inside its partition's turn, or with the device to itself, a launch reads
// no snapshot: launch.cpp asks in_turn() (the lease and the clock) or nothing
// at all, and comes here only every kRecheckNs (look_again()) or to wait.
#include "gate.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>

#include "fracgpu/units.h"

namespace shim {

static_assert(policy::kMaxPartitions == fracgpu::kMaxPartitions, "the policy sees every partition");
static_assert(policy::kLow == FRACGPU_PRIORITY_LOW && policy::kNormal == FRACGPU_PRIORITY_NORMAL &&
                  policy::kHigh == FRACGPU_PRIORITY_HIGH,
              "the policy's classes are the settings'");

DeviceView *g_view = new DeviceView[kMaxDevices];

namespace {

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

// Waiters sleep until the owner word changes from `seen` or `ns` pass, and
// whoever frees the device wakes them.
void sleep_on_owner(fracgpu::SharedRegion *r, int seen, uint64_t ns) {
    precise_timers();
    struct timespec ts = {(time_t)(ns / 1'000'000'000), (long)(ns % 1'000'000'000)};
    syscall(SYS_futex, reinterpret_cast<int *>(&r->owner), FUTEX_WAIT, seen, &ts, nullptr, 0);
}
void wake_waiters(fracgpu::SharedRegion *r) {
    syscall(SYS_futex, reinterpret_cast<int *>(&r->owner), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// This process's measure of the device's saturation (one thread at a time
// closes a window; the others take the last verdict).
bool saturated(Saturation &sat, const policy::Device &d, uint64_t now) {
    bool idle = false;
    if (!sat.busy.compare_exchange_strong(idle, true)) return sat.saturated.load(std::memory_order_relaxed);
    bool verdict = policy::measure_saturation(sat.window, d, now);
    sat.saturated.store(verdict, std::memory_order_relaxed);
    sat.busy.store(false);
    return verdict;
}

// Partition `p`'s turn, the device's owner's, is charged up to `now` (at most
// policy::kMaxTurnNs: past that it was abandoned, its holder vanished).
// Called by whoever ends it or renews it, before the owner changes.
void charge_turn(fracgpu::SharedRegion *r, int p, uint64_t now) {
    uint64_t start = r->lease_start_ns.exchange(now, std::memory_order_relaxed);
    if (p < 0 || start == 0 || now <= start) return;
    policy::Device d;
    snapshot(r, &d);
    r->partitions[p].vtime_ns.fetch_add(policy::turn_charge(d, p, start, now), std::memory_order_relaxed);
}

// The device is ours (owner just set to `me`): work of others still on it
// (launched outside the gate before they saw the lease taken, or a lower
// class's queue) drains first, then the turn starts.
void start_turn(fracgpu::SharedRegion *r, int me) {
    policy::Device d;
    for (;;) {
        snapshot(r, &d);
        if (!policy::others_inflight(d, me, mono_ns())) break;
        nap();
    }
    uint64_t now = mono_ns();
    r->lease_start_ns.store(now, std::memory_order_relaxed);
    r->lease_until_ns.store(now + policy::kLeaseNs, std::memory_order_relaxed);
}

// A bucket's refill since it was last refilled, claimed by CAS (each interval
// is added once, whichever process adds it); the first look starts it empty.
void refill(fracgpu::SharedPartition &part, uint64_t now) {
    uint64_t last = part.cap_refill_ns.load(std::memory_order_relaxed);
    if (last == 0) {
        if (part.cap_refill_ns.compare_exchange_strong(last, now)) part.cap_tokens_ns.store(0);
        return;
    }
    if (now <= last || !part.cap_refill_ns.compare_exchange_strong(last, now)) return;
    policy::Partition p;
    read_partition(part, &p);
    uint64_t cur = part.cap_tokens_ns.load(std::memory_order_relaxed);
    while (!part.cap_tokens_ns.compare_exchange_weak(cur, (uint64_t)policy::refilled(p, (int64_t)cur, now - last))) {
    }
}

// Out of allowance (policy::allowance): not a candidate for the device
// meanwhile, the device handed on, a sleep. False: go on.
bool stand_aside(fracgpu::SharedRegion *r, int me, uint64_t now) {
    fracgpu::SharedPartition &mine = r->partitions[me];
    refill(mine, now);
    policy::Device d;
    snapshot(r, &d);
    policy::Allowance a = policy::allowance(d, me, now);
    if (a.forgive) {
        uint64_t owed = (uint64_t)d.partitions[me].tokens_ns;
        mine.cap_tokens_ns.compare_exchange_strong(owed, 0);
    }
    if (!a.stand_aside) {
        uint64_t none = 0;
        mine.waiting_ns.compare_exchange_strong(none, now, std::memory_order_relaxed);   // a candidate again
        return false;
    }
    mine.waiting_ns.store(0, std::memory_order_relaxed);
    if (mine.inflight.load(std::memory_order_acquire) == 0) release(r, me, now);
    std::this_thread::sleep_for(std::chrono::nanoseconds(a.sleep_ns));
    return true;
}

}  // namespace

void read_partition(const fracgpu::SharedPartition &q, policy::Partition *p) {
    *p = policy::Partition();
    p->in_use = __atomic_load_n(&q.in_use, __ATOMIC_ACQUIRE) != 0;
    if (!p->in_use) return;
    uint32_t flags = fracgpu::flags_of(q);
    p->klass = fracgpu::priority_of_flags(flags);
    p->share = fracgpu::share_of(q);
    p->share_promised = !(flags & fracgpu::kPartitionComputeBestEffort);
    p->capped = flags & fracgpu::kPartitionCap;
    p->vtime_ns = q.vtime_ns.load(std::memory_order_relaxed);
    p->last_launch_ns = q.last_launch_ns.load(std::memory_order_relaxed);
    p->last_done_ns = q.last_done_ns.load(std::memory_order_relaxed);
    p->waiting_ns = q.waiting_ns.load();
    p->inflight = q.inflight.load();
    p->busy_ns = q.busy_ns.load(std::memory_order_relaxed);
    p->tokens_ns = (int64_t)q.cap_tokens_ns.load(std::memory_order_relaxed);
}

void snapshot(const fracgpu::SharedRegion *r, policy::Device *d) {
    d->owner = r->owner.load();
    d->lease_start_ns = r->lease_start_ns.load(std::memory_order_relaxed);
    d->lease_until_ns = r->lease_until_ns.load(std::memory_order_relaxed);
    for (int i = 0; i < fracgpu::kMaxPartitions; i++) read_partition(r->partitions[i], &d->partitions[i]);
}

bool draws_allowance(const fracgpu::SharedPartition &q) {
    uint32_t flags = fracgpu::flags_of(q);
    policy::Partition p;
    p.klass = fracgpu::priority_of_flags(flags);
    p.capped = flags & fracgpu::kPartitionCap;
    p.share = fracgpu::share_of(q);
    return policy::has_allowance(p);
}

void look_again(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, uint64_t now) {
    view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
    view.slot.store(slot, std::memory_order_relaxed);
    view.partition.store(me, std::memory_order_relaxed);
    view.region.store(r, std::memory_order_release);
    policy::Device d;
    snapshot(r, &d);
    policy::Outlook o = policy::decide(d, me, now);
    if (o.ask_saturation) policy::settle(o, d, me, saturated(view.saturation, d, now));
    view.yield_queue.store(o.yield_queue, std::memory_order_relaxed);
    view.outranked.store(o.outranked, std::memory_order_relaxed);
    if (o.yield_queue) measure_next(view);
    if (view.mode.exchange(o.mode, std::memory_order_relaxed) != policy::kGate && o.mode == policy::kGate)
        drain_unmeasured();
    if (o.give_back) release(r, me, now);
}

bool in_turn(fracgpu::SharedRegion *r, int me, uint64_t now, bool outranked) {
    const fracgpu::SharedPartition &mine = r->partitions[me];
    int owner = r->owner.load(std::memory_order_acquire);
    uint64_t until = r->lease_until_ns.load(std::memory_order_relaxed);
    bool allowance = draws_allowance(mine);
    int64_t tokens = allowance ? (int64_t)mine.cap_tokens_ns.load(std::memory_order_relaxed) : 0;
    return policy::in_turn(owner, me, until, now, outranked, allowance, tokens);
}

bool release(fracgpu::SharedRegion *r, int from, uint64_t end) {
    if (r->owner.load(std::memory_order_acquire) != from) return false;
    charge_turn(r, from, end);
    if (!r->owner.compare_exchange_strong(from, -1)) return false;
    wake_waiters(r);
    return true;
}

void wait_turn(fracgpu::SharedRegion *r, int me, uint64_t prev_launch, bool outranked) {
    fracgpu::SharedPartition &mine = r->partitions[me];
    policy::Device d;
    uint64_t now = mono_ns();
    uint64_t zero = 0;
    if (mine.waiting_ns.compare_exchange_strong(zero, now)) {
        snapshot(r, &d);
        // Back from idle: it starts at the others' virtual time.
        if (policy::returning(d, me, now, prev_launch)) {
            uint64_t floor = policy::caught_up_vtime(d, me, now);
            uint64_t v = mine.vtime_ns.load(std::memory_order_relaxed);
            while (v < floor && !mine.vtime_ns.compare_exchange_weak(v, floor)) {
            }
        }
    }
    bool allowance = draws_allowance(mine);
    for (;; now = mono_ns()) {
        if (allowance && stand_aside(r, me, now)) continue;
        // The waiting mark is the partition's, shared by its processes: one
        // that took a turn cleared it on its way out, while this one still
        // waits. Marked again, or the partition is nobody's candidate and this
        // process naps for ever once the others go quiet.
        uint64_t unmarked = 0;
        mine.waiting_ns.compare_exchange_strong(unmarked, now, std::memory_order_relaxed);
        snapshot(r, &d);
        policy::Step step = policy::turn_step(d, me, now, outranked);
        if (step.action == policy::Step::kLaunch) break;
        if (step.action == policy::Step::kRenew) {   // nobody waits: the turn goes on, charged so far
            charge_turn(r, me, now);
            r->lease_until_ns.store(now + policy::kLeaseNs, std::memory_order_relaxed);
            break;
        }
        int owner = step.partition, free_ = -1;
        switch (step.action) {
        case policy::Step::kHandOver: release(r, me, now); continue;
        case policy::Step::kFree: release(r, owner, step.end_ns); continue;
        case policy::Step::kSleep: sleep_on_owner(r, owner, step.sleep_ns); continue;
        case policy::Step::kTakeFrom:
            charge_turn(r, owner, now);
            if (r->owner.compare_exchange_strong(owner, me, std::memory_order_seq_cst)) {
                start_turn(r, me);   // taken from a lower class: its queued work (one launch deep) drains
                break;
            }
            nap();
            continue;
        case policy::Step::kTake:
            if (r->owner.compare_exchange_strong(free_, me, std::memory_order_seq_cst)) {
                start_turn(r, me);
                break;
            }
            continue;
        default: nap(); continue;   // kDrain, kNap
        }
        break;   // the device was taken
    }
    // About to launch: not idle, though the last launch may be long ago (it
    // waited for this turn). Stored before the waiting mark goes, so no other
    // partition ever sees this holder as idle and takes the turn back.
    mine.last_launch_ns.store(mono_ns(), std::memory_order_relaxed);
    mine.waiting_ns.store(0, std::memory_order_release);
}

void gate_views_forget_after_fork() {
    for (int d = 0; d < kMaxDevices; d++) {
        DeviceView &v = g_view[d];
        v.next_check.store(0);
        v.published.store(0);
        v.mode.store(policy::kAlone);
        v.yield_queue.store(false);
        v.outranked.store(false);
        v.countdown.store(0);
        v.drawn.store(0);
        v.region.store(nullptr);
        v.saturation.window = policy::SaturationWindow();
        v.saturation.busy.store(false);
        v.saturation.saturated.store(true);
    }
}

}  // namespace shim
