// The launch hooks: cuLaunchKernel, cuLaunchKernelEx, cuLaunchCooperativeKernel
// and cuGraphLaunch (with their _ptsz variants).
//
// A launch pays for the gate only what it must. With the device to itself
// (no other partition busy, or busy ones on a device their kernels leave
// mostly idle) a launch is decided inline in its hook (straight_through()):
// a few process-local words, one counter of the sampling draw and the owner
// word, then a jump to the real launch with the arguments as they came. Every
// kTickEvery-th launch of a thread, and the sampled one, go through gated(),
// which also reads the clock and every kRecheckNs asks the policy again
// (gate.cpp). Inside its partition's turn a launch reads the lease and the
// clock. No event, no lock and no write to the shared state but for the
// partition's last launch time, published at most every kPublishNs. One
// launch in many is sampled for the ledger (sampling.cpp); a launch outside
// its turn waits in gate.cpp.
#include "gate.h"

namespace shim {
namespace {

__attribute__((tls_model("initial-exec"))) thread_local int t_tick = 0;   // launches until it reads the clock
constexpr int kTickEvery = 16;

// Whether this launch goes straight to the driver, decided from this
// process's own words and the owner word alone: nothing is enforced here, or
// the process has one device, launches outside turns, and neither its
// thread's clock tick nor its next sample is due, and no other partition
// holds the device. Else gated() decides, from the top.
inline bool straight_through() {
    if (!g_bound.load(std::memory_order_acquire)) return true;
    if (g_ndev != 1) return false;   // which device: a driver call, in gated()
    Binding &b = g_bind[0];
    if (!b.ok) return true;
    DeviceView &view = g_view[0];
    if (t_tick <= 1 || view.mode.load(std::memory_order_relaxed) == policy::kGate ||
        view.countdown.load(std::memory_order_relaxed) <= 1)
        return false;
    fracgpu::SharedRegion *r = b.region.raw();
    int owner = r->owner.load(std::memory_order_acquire);
    if (owner >= 0 && owner != r->processes[b.slot].partition) return false;
    // Counted out of the draw; a thread that took the last count meanwhile
    // gives it back, and its launch is the sample (gated()).
    if (view.countdown.fetch_sub(1, std::memory_order_relaxed) <= 1) {
        view.countdown.fetch_add(1, std::memory_order_relaxed);
        return false;
    }
    --t_tick;
    return true;
}

// A launch in front of which the gate stands (see straight_through()).
template <typename Launch>
CUresult gated(Stream stream, Launch launch) {
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
    if (mode == policy::kGate || --t_tick <= 0) {
        t_tick = kTickEvery;
        now = mono_ns();
        // Busy, as the others see it: told every kPublishNs, not at every launch.
        if (now - prev_launch >= kPublishNs) {
            view.published.store(now, std::memory_order_relaxed);
            mine.last_launch_ns.store(now, std::memory_order_relaxed);
        }
    }
    if (now && now >= view.next_check.load(std::memory_order_relaxed)) look_again(view, r, slot, me, now);
    CUresult rc;
    mode = view.mode.load(std::memory_order_relaxed);
    if (mode != policy::kGate) {   // the device is ours while nobody else is busy
        if (sampled_launch(view, r, slot, me, false, mode == policy::kWatch, stream, launch, &rc))
            return rc;
        // Another partition took the device: take turns from this launch on.
        now = mono_ns();
        view.next_check.store(now + kRecheckNs, std::memory_order_relaxed);
        if (view.mode.exchange(policy::kGate, std::memory_order_relaxed) != policy::kGate) drain_unmeasured();
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
        if (sampled_launch(view, r, slot, me, true, true, stream, launch, &rc)) return rc;
        now = mono_ns();   // taken by a higher class meanwhile: wait again
    }
}

}  // namespace

void gate_forget_after_fork() {
    sampling_forget_after_fork();
    gate_views_forget_after_fork();
    t_tick = 0;
}

}  // namespace shim

using namespace shim;

// ---------------------------------------------------------------------------
// The gated launch entry points: the real launch straight away when
// straight_through() says so (its arguments still in their registers), else
// through gated().
// ---------------------------------------------------------------------------
#define LAUNCH(stream, ptsz, call)                         \
    do {                                                   \
        if (straight_through()) return call;               \
        return gated(Stream{stream, ptsz}, [=] { return call; }); \
    } while (0)

SHIM_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                 unsigned bz, unsigned shmem, CUstream s, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernel);
    LAUNCH(s, false, real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra));
}
SHIM_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                      unsigned bz, unsigned shmem, CUstream s, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernel_ptsz);
    LAUNCH(s, true, real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra));
}
SHIM_API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx);
    LAUNCH(config ? config->hStream : nullptr, false, real(config, f, params, extra));
}
SHIM_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    REAL_OR_RETURN(real, cuLaunchKernelEx_ptsz);
    LAUNCH(config ? config->hStream : nullptr, true, real(config, f, params, extra));
}
SHIM_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                            unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel);
    LAUNCH(s, false, real(f, gx, gy, gz, bx, by, bz, shmem, s, params));
}
SHIM_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                                 unsigned by, unsigned bz, unsigned shmem, CUstream s,
                                                 void **params) {
    REAL_OR_RETURN(real, cuLaunchCooperativeKernel_ptsz);
    LAUNCH(s, true, real(f, gx, gy, gz, bx, by, bz, shmem, s, params));
}
// A graph launch is gated like a kernel's; one with allocation nodes also
// has its graph memory charged (graphs.cpp).
template <typename Call>
CUresult graph_launch(CUgraphExec g, CUstream s, bool ptsz, Call call) {
    GraphLaunch mem;
    CUresult rc = graph_before_launch(g, &mem);
    if (rc != CUDA_SUCCESS) return rc;
    rc = straight_through() ? call() : gated(Stream{s, ptsz}, call);
    graph_after_launch(g, mem, rc);
    return rc;
}
SHIM_API CUresult cuGraphLaunch(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch);
    return graph_launch(g, s, false, [=] { return real(g, s); });
}
SHIM_API CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) {
    REAL_OR_RETURN(real, cuGraphLaunch_ptsz);
    return graph_launch(g, s, true, [=] { return real(g, s); });
}
