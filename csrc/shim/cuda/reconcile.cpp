// Ground truth: the books are checked against what the device itself reports
// each process holds, and memory the books missed is charged.
//
// The mechanism. The hooks charge what they see (quota.cpp, reserve.cpp), but
// some memory they cannot see: a driver opened by absolute path, an entry
// point reached in a way the shim does not swap, what the driver reserves
// behind a call. The device can: NVML's nvmlDeviceGetComputeRunningProcesses
// lists every process holding memory with its usedGpuMemory. Once a process
// has a context, one thread of its own (started here, lazily, once) compares,
// every FRACGPU_RECONCILE_INTERVAL seconds, that figure on each bound device
// with what its books charged there, and records both and the drift (device
// less books) in its slot (Region::reconcile). A positive drift is memory the
// books missed: it is charged to the partition's `used` (not to the process's
// own books), so every later check-and-charge holds the partition to the
// larger of the two, and it is given back when the drift shrinks or the
// process leaves or dies (the slot's release gives it back with the rest). A
// negative drift (the books ahead: a charge made before its allocation, a
// pool's or VMM's reservation) is shown, never refunded.
//
// False drift. The books are charged before an allocation and uncharged after
// a free, so the device is never ahead of the books a process read on either
// side of the device figure, except for an allocation made and freed entirely
// inside that window, and a context made but not yet charged (its size is
// measured after it exists; context creation is held off while a figure is
// taken). So each figure is taken between two reads of the books and set
// against the larger; a positive drift is read again, kSamples times a few
// milliseconds apart, and the smallest is kept: memory really missed stays,
// a window does not.
//
// Where the device does not list the process while its books hold memory (a
// container whose pid namespace is not the driver's) the drift is unknown:
// said once on stderr, shown as unknown, nothing charged.
//
// Nothing here is on a hook's path: the thread takes the region's lock about
// once a second, and hooks touch nothing it adds.
#include "process.h"
#include "device_figures.h"
#include "quota.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <unistd.h>

#include "fracgpu/state.h"

namespace shim {
namespace {

constexpr int kSamples = 3;
constexpr auto kSampleGap = std::chrono::milliseconds(3);

std::atomic<bool> g_started{false};
std::atomic<bool> g_said_unknown[kMaxDevices];
std::atomic<bool> g_said_missed[kMaxDevices];

struct Reading {
    NvmlFigure figure = NvmlFigure::kCannotSay;
    uint64_t device = 0, books = 0;
    int64_t drift() const { return (int64_t)device - (int64_t)books; }
};

// The device's figure for this process on `dev`, set against the larger of
// the books read just before and just after it.
Reading read_once(int dev, const std::atomic<uint64_t> &books) {
    Reading r;
    uint64_t before = books.load(std::memory_order_acquire);
    r.figure = device_figure(dev, &r.device);
    r.books = std::max(before, books.load(std::memory_order_acquire));
    return r;
}

void reconcile_device(int dev, Binding &b) {
    const std::atomic<uint64_t> &books = b.region.raw()->processes[b.slot].used;
    Reading r;
    {
        std::unique_lock<std::mutex> no_new_context = quota_no_context_creation();
        r = read_once(dev, books);
        for (int i = 1; i < kSamples && r.figure == NvmlFigure::kListed && r.drift() > 0; i++) {
            std::this_thread::sleep_for(kSampleGap);
            Reading again = read_once(dev, books);
            if (again.figure != NvmlFigure::kListed || again.drift() < r.drift()) r = again;
        }
    }
    // Not listed while holding nothing on the books: the device agrees (a
    // process holding no memory is not a compute process there).
    bool listed = r.figure == NvmlFigure::kListed || (r.figure == NvmlFigure::kNotListed && r.books == 0);
    if (!listed) r.device = 0;
    if (!listed && !g_said_unknown[dev].exchange(true))
        log("%s does not list this process (pid %d) among those holding its memory (%s), so what it holds there "
            "cannot be checked against the books; its drift shows as unknown", b.uuid.c_str(), (int)getpid(),
            r.figure == NvmlFigure::kNotListed ? "is the process in another pid namespace than the driver?"
                                               : "NVML cannot list processes here");
    uint64_t charged = b.region.reconcile(b.slot, getpid(), listed, r.device, r.books);
    if (charged && !g_said_missed[dev].exchange(true)) {
        const fracgpu::SharedRegion *region = b.region.raw();
        log("%s reports this process (pid %d) holds %s, %s more than its books: memory allocated where the shim "
            "does not see it; the difference is charged to partition '%s'", b.uuid.c_str(), (int)getpid(),
            size_text(r.device).c_str(), size_text(charged).c_str(),
            region->partitions[region->processes[b.slot].partition].name);
    }
}

void reconcile_main(double interval_s) {
    const auto interval = std::chrono::duration<double>(interval_s);
    for (;;) {
        std::this_thread::sleep_for(interval);
        // Unbound at exit (the slots are left) and in a forked child (this
        // thread does not exist there).
        if (!g_bound.load(std::memory_order_acquire)) return;
        for (int d = 0; d < g_ndev; d++)
            if (g_bind[d].ok) reconcile_device(d, g_bind[d]);
    }
}

}  // namespace

void reconcile_start() {
    double interval_s = settings().reconcile_interval_s;
    if (interval_s <= 0 || g_started.exchange(true)) return;
    std::thread(reconcile_main, interval_s).detach();
}

void reconcile_forget_after_fork() {
    g_started.store(false);
    for (int d = 0; d < kMaxDevices; d++) {
        g_said_unknown[d].store(false);
        g_said_missed[d].store(false);
    }
}

}  // namespace shim
