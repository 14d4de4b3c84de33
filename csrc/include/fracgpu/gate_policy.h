// The launch gate's policy: what the gate decides, as plain functions of a
// snapshot of one GPU's partitions and a time.
//
// Nothing here reads a clock, touches an atomic or makes a call: the shim's
// gate (csrc/shim/cuda/gate.cpp) copies the shared state into a Device, asks
// the policy, and applies the answer with its atomics and futex; a node agent
// can run the same code, and tests drive it over simulated time.
//
// The rules (the mechanism that applies them is the gate's):
//   - Turns. When several partitions are busy on a saturated device, it is
//     leased to one partition at a time for kLeaseNs; the next lease goes to
//     the waiting partition of the highest waiting class whose virtual time
//     (the turns it held / its weight) is lowest. A turn is charged as held:
//     from taking the lease to handing it on, at most kMaxTurnNs.
//   - Work conservation. A holder that is idle (nothing in flight, nothing
//     launched since its work was last seen done, for kIdleGapNs) loses the
//     device, charged until its work was done; a partition back from idle
//     starts at the lowest virtual time of the busy ones of its class; with
//     nobody else busy a holder gives the lease back, charged until then; and
//     busy partitions on a device their kernels leave mostly idle (not
//     saturated) do not take turns at all.
//   - Priority classes (high, normal, low) sit above the shares: only the
//     highest waiting class may take the device, a high partition takes it at
//     once from a lower-class holder, a holder's turn ends only for a waiter of
//     its class or above, and a high partition with a share draws on a bucket
//     filled at that share while others are busy.
//   - Caps: a capped partition draws on a bucket filled at its share of wall
//     time, and stands aside while it is empty, even on an idle device.
// Weights: shares of high and normal partitions are fractions of the device;
// low partitions' shares divide among themselves what the others leave.
#pragma once

#include <cstdint>

namespace fracgpu {
namespace policy {

constexpr int kMaxPartitions = 64;             // as fracgpu/state.h's table
constexpr int kLow = 0, kNormal = 1, kHigh = 2;   // FRACGPU_PRIORITY_* (fracgpu/units.h)

constexpr uint64_t kLeaseNs = 8'000'000;       // one turn on the device
constexpr uint64_t kMaxTurnNs = 25 * kLeaseNs; // a turn is charged at most this (longer: its holder vanished)
constexpr uint64_t kActiveNs = 30'000'000;     // launched this recently: the partition is busy
constexpr uint64_t kIdleGapNs = 2'000'000;     // a lease holder with nothing in flight this long is idle
// ... a high one sooner: when it comes back it takes the device from a lower
// class at once, waiting for one kernel at most, not for a turn
constexpr uint64_t kHighIdleGapNs = 100'000;
constexpr uint64_t kCapBucketNs = 4'000'000;   // how much unused capped time may be saved up
constexpr uint64_t kPriorityWindowNs = 100'000'000;   // a high partition with a share is held to it over this
constexpr uint64_t kStandAsideMaxNs = 2'000'000;      // the longest sleep of a partition out of allowance
// Work of other partitions still in flight is waited for before a turn starts,
// unless its count has not moved for this long (its process vanished mid-launch).
constexpr uint64_t kStaleInflightNs = 25 * kLeaseNs;
constexpr uint64_t kMinSleepNs = 20'000;       // the shortest sleep of a waiter on the owner word
// Saturation: the device time of every partition beyond the host's own pace
// (busy_ns) per wall time, over windows of kRateWindowNs. Turns start as soon
// as a window finds the device busy kSaturatedRate of the time, and stop only
// after kCalmWindows in a row below kUnsaturatedRate (a moment's stall of the
// jobs must not end the turns that hold the shares); until a window has been
// measured, the device counts as saturated.
constexpr uint64_t kRateWindowNs = 20'000'000;
constexpr double kSaturatedRate = 0.85, kUnsaturatedRate = 0.5;
constexpr int kCalmWindows = 5;

// One partition, as the gate last read it. Times are CLOCK_MONOTONIC ns (0: never).
struct Partition {
    bool in_use = false;
    int klass = kNormal;           // kLow, kNormal, kHigh
    double share = 0;              // (0, 1]; 0: none
    bool share_promised = true;    // false: the share was overcommitted (best effort), weighed only
                                   // within what the promised shares leave, so it never dilutes a promise
    bool capped = false;           // the share is also a ceiling
    uint64_t vtime_ns = 0;         // turns held / weight
    uint64_t last_launch_ns = 0;
    uint64_t last_done_ns = 0;     // when a measured launch of it was last seen complete
    uint64_t waiting_ns = 0;       // since when a process of it waits at the gate (0: none)
    uint64_t inflight = 0;         // measured launches not yet complete
    uint64_t busy_ns = 0;          // device time beyond the host's pace, all time
    int64_t tokens_ns = 0;         // the cap's (or a high share's) bucket
};

// One GPU: its partitions and the lease.
struct Device {
    int owner = -1;                // the partition holding the lease, -1: free
    uint64_t lease_start_ns = 0;   // since when the owner's turn is charged
    uint64_t lease_until_ns = 0;   // when its turn ends
    Partition partitions[kMaxPartitions];
};

// Launched or waiting recently, or with work in flight.
bool busy(const Partition &p, uint64_t now);
// A high partition with a share (not a cap) is held to it while others are busy.
bool held_to_share(const Partition &p);
// Whether the partition draws on a bucket: capped, or held to a share.
inline bool has_allowance(const Partition &p) { return p.capped || held_to_share(p); }

// How a launch goes through the gate on one device:
//   kAlone    no other partition on the GPU, no cap: straight through
//   kWatch    others exist but are idle, or the device is not saturated:
//             straight through, the queue kept short, so that one of them
//             coming back gets the device within milliseconds
//   kGate     others are busy and the device is saturated (or a cap, or
//             partitions of different classes are busy): launch in turns
enum Mode { kAlone, kWatch, kGate };

// What partition `me` makes of the device at `now` (re-asked every millisecond
// or so by each process).
struct Outlook {
    Mode mode = kAlone;
    double weight = 1.0;           // what its turns are charged at
    bool yield_queue = false;      // a high partition other than `me`'s class is busy: queue one launch deep
    bool outranked = false;        // a partition of a higher class than `me` is busy
    // Turns are taken only if the device is saturated: settle() with the
    // process's measure before acting on `mode`.
    bool ask_saturation = false;
    bool give_back = false;        // `me` holds a lease it does not need: hand it back, charged until now
};
Outlook decide(const Device &d, int me, uint64_t now);
// `outlook` once the device's saturation is known (when it asked for it).
void settle(Outlook &outlook, const Device &d, int me, bool saturated);
// The weight partition `p`'s turns are charged at: its share, or for
// partitions without one an equal part of what the shares leave.
double weight_of(const Device &d, int p);

// A process's measure of the device's saturation (one per process and
// device): plain state, updated by one thread at a time.
struct SaturationWindow {
    uint64_t at_ns = 0;
    uint64_t busy_ns[kMaxPartitions] = {};
    int calm = 0;                  // windows in a row under kUnsaturatedRate
    bool saturated = true;
};
// Closes a window once kRateWindowNs have passed; returns the verdict.
bool measure_saturation(SaturationWindow &w, const Device &d, uint64_t now);

// What partition `p`'s virtual time grows by for a turn held from `start` to `now`.
uint64_t turn_charge(const Device &d, int p, uint64_t start, uint64_t now);

// Of the waiting partitions of the highest class that waits, the one with the
// lowest virtual time (ties: lowest index); -1: none waits.
int most_deserving(const Device &d);
// Whether a partition other than `me`, of class `klass` or above, waits.
bool others_waiting(const Device &d, int me, int klass);
// Whether work of partitions other than `me` is still in flight (launched
// outside the gate before they saw the lease taken).
bool others_inflight(const Device &d, int me, uint64_t now);
bool others_busy(const Device &d, int me, uint64_t now);

// Partition `me` comes to the gate at `now`, its previous launch at
// `prev_launch` (0: never): whether it comes back from idle, and then the
// virtual time it starts at (the lowest of the busy ones of its class, never
// lower than its own).
bool returning(const Device &d, int me, uint64_t now, uint64_t prev_launch);
uint64_t caught_up_vtime(const Device &d, int me, uint64_t now);

// Buckets: the most a partition may save up, and its tokens after `elapsed`
// ns of refill at its share.
uint64_t bucket_ns(const Partition &p);
int64_t refilled(const Partition &p, int64_t tokens, uint64_t elapsed);
// A partition with an allowance, at the gate: whether it stands aside (its
// bucket is empty), and for how long it sleeps; `forgive`: a high partition
// that ran on alone owes nothing for that when others come (tokens to 0).
struct Allowance {
    bool forgive = false;
    bool stand_aside = false;
    uint64_t sleep_ns = 0;
};
Allowance allowance(const Device &d, int me, uint64_t now);

// Inside its turn a launch goes on with nothing more to read: the device is
// `me`'s, the turn not over, no higher class looks for it, and (with an
// allowance) the bucket is not empty. The gate asks this on every launch in
// turns, from the few words it names, without a snapshot.
inline bool in_turn(int owner, int me, uint64_t until, uint64_t now, bool outranked, bool allowance,
                    int64_t tokens) {
    return !outranked && owner == me && now < until && (!allowance || tokens >= 0);
}

// One step of partition `me` waiting for its turn (with an allowance, after
// allowance() let it on): what to do now.
struct Step {
    enum Action {
        kLaunch,        // the turn is ours: launch
        kRenew,         // nobody waits: the turn goes on; charge it until now, a new lease from now
        kHandOver,      // the turn is over: release it (charged until now) and look again
        kDrain,         // the turn is over, our work still in flight: nap and look again
        kFree,          // free the device of `partition` (gone, idle or far past its turn), charged until `end_ns`
        kTake,          // take the free device: then wait for others' work in flight, and start a turn
        kTakeFrom,      // a high partition takes the device from lower-class `partition`, its turn charged until now
        kSleep,         // sleep on the owner word up to `sleep_ns`
        kNap,           // a short sleep, then look again
    };
    Action action = kNap;
    int partition = -1;
    uint64_t end_ns = 0;
    uint64_t sleep_ns = 0;
};
Step turn_step(const Device &d, int me, uint64_t now, bool outranked);

}  // namespace policy
}  // namespace fracgpu
