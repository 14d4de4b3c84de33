// The launch path's parts, between the launch hooks (launch.cpp), the gate
// that applies the policy's turns (gate.cpp), device-time sampling and its
// reader thread (sampling.cpp), and the driver-call counters (call_counts.cpp).
// The decisions themselves are the policy's (fracgpu/gate_policy.h).
#pragma once

#include "process.h"
#include "shim.h"

#include <atomic>
#include <cstdint>

#include "fracgpu/gate_policy.h"
#include "fracgpu/state.h"

namespace shim {

namespace policy = fracgpu::policy;

constexpr uint64_t kRecheckNs = 1'000'000;     // a launch re-reads who else is busy this often
constexpr uint64_t kPublishNs = 20'000;        // ... and tells them it is busy this often

// This process's measure of the device's saturation (policy::SaturationWindow),
// taken by one thread at a time; the verdict is read by all.
struct Saturation {
    std::atomic<bool> busy{false};          // a thread is measuring
    policy::SaturationWindow window;
    std::atomic<bool> saturated{true};
};

// How this process launches on one device, as it last decided (re-read
// every kRecheckNs), and its sampling of that device's launches.
struct DeviceView {
    std::atomic<uint64_t> next_check{0};
    std::atomic<uint64_t> published{0};     // the last launch time this process told the partition
    std::atomic<int> mode{policy::kAlone};
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
extern DeviceView *g_view;   // kMaxDevices of them

// ---- gate.cpp: the policy's turns applied to the shared state ----
// One partition of the shared state as the policy reads it.
void read_partition(const fracgpu::SharedPartition &q, policy::Partition *p);
// Whether its measured device time draws on its bucket (policy::has_allowance).
bool draws_allowance(const fracgpu::SharedPartition &q);
// The shared state of one GPU as the policy reads it.
void snapshot(const fracgpu::SharedRegion *r, policy::Device *d);
// Asks the policy how partition `me` launches now, and applies it to `view`.
void look_again(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, uint64_t now);
// Whether a launch of `me` is inside its turn (see policy::in_turn).
bool in_turn(fracgpu::SharedRegion *r, int me, uint64_t now, bool outranked);
// Waits until partition `me` may launch. prev_launch: when it launched before
// (0: never); outranked: a higher class was busy at the last look.
void wait_turn(fracgpu::SharedRegion *r, int me, uint64_t prev_launch, bool outranked);
// The device goes from `from` to nobody, its turn charged until `end`.
bool release(fracgpu::SharedRegion *r, int from, uint64_t end);
void gate_views_forget_after_fork();

// ---- sampling.cpp: device time for the ledger, one launch in many ----
// The real launch, whatever its entry point's arguments.
struct LaunchCall {
    CUresult (*call)(void *);
    void *args;
    CUresult operator()() const { return call(args); }
};
template <typename F>
LaunchCall launch_call(F &f) {
    return LaunchCall{[](void *p) { return (*static_cast<F *>(p))(); }, &f};
}
// The stream a launch goes to, and whether it is a per-thread-default-stream
// (_ptsz) launch: its sample's events are recorded by the matching variants.
struct Stream {
    CUstream handle;
    bool ptsz;
};
// The launch that ends a draw: measured (two pooled events around it, read by
// the reader thread), standing for the launches of the draw. False, having
// launched nothing, when another partition holds the device (`own`: unless
// it is ours).
bool sampled_launch_measured(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, bool own, bool bounded,
                             Stream stream, LaunchCall launch, CUresult *result);
// The next launch is measured, standing for those launched since the last draw.
void measure_next(DeviceView &view);
// Entering the gate: the work this process queued outside it finishes first.
void drain_unmeasured();
// All the time this process waited for turns (sampling leaves it out of the host's pace).
extern std::atomic<uint64_t> g_waited_ns;
void sampling_forget_after_fork();

// A launch with the device ours (alone, others idle, or our turn): most go
// straight through; one in about n is measured and stands for the n. False,
// having launched nothing, when another partition holds the device.
template <typename Launch>
inline bool sampled_launch(DeviceView &view, fracgpu::SharedRegion *r, int slot, int me, bool own, bool bounded,
                           Stream stream, Launch &launch, CUresult *result) {
    if (view.countdown.fetch_sub(1, std::memory_order_relaxed) > 1) {
        int owner = r->owner.load(std::memory_order_acquire);
        if (own ? owner != me : owner >= 0 && owner != me) {
            view.countdown.fetch_add(1, std::memory_order_relaxed);
            return false;
        }
        *result = launch();
        return true;
    }
    return sampled_launch_measured(view, r, slot, me, own, bounded, stream, launch_call(launch), result);
}

// ---- call_counts.cpp: the driver calls the shim adds, for benchmarks ----
// Counted where they are made, never on a launch that makes none.
enum Call { kEventRecord, kEventQuery, kEventSynchronize, kEventElapsedTime, kStreamQuery, kCtxSynchronize,
            kCallKinds };
extern std::atomic<unsigned long long> g_calls[kCallKinds];
inline void counted(Call kind) { g_calls[kind].fetch_add(1, std::memory_order_relaxed); }

}  // namespace shim
