// Contexts: each one's own reservation is charged while it lives, and what it
// owned is given back when it goes. The context is inside the quota, as with
// MIG and MPS memory limits. Primary contexts (cuDevicePrimaryCtxRetain,
// Release, Reset) mirror the driver's reference count, so the last release
// drops what the context owned.
//
// What a context reserves is FRACGPU_CONTEXT_MEMORY when that is set, else
// measured, around the process's first context on the device. The device's
// own per-process figure comes first: how much what NVML reports this process
// holds on the device (nvmlDeviceGetComputeRunningProcesses, usedGpuMemory)
// grew. Neighbours cannot move it, whatever they allocate or free meanwhile.
// Where the device does not list this process (a container whose pid
// namespace is not the driver's, an NVML without the call), the figure is how
// much the memory the device uses beyond the books grew. "Beyond the books" is the
// device's used memory (NVML's nvmlDeviceGetMemoryInfo, which needs no
// context, unlike cuMemGetInfo) less what every partition of the GPU has
// charged, so what fracgpu's other jobs allocate or free meanwhile cancels
// out; each figure is read until two reads in a row agree, so one caught
// between a charge and its allocation is read again.
//
// The GPU's measurement lock (flock on its state file) keeps the fallback
// exact: a fallback measurement holds it exclusively, so no other job's
// context is being made meanwhile. A context measured by the device's own
// figure holds it shared, from before its creation until it is charged:
// jobs starting together wait for nobody but a fallback measurement in
// progress, and that waits until every context made meanwhile is in the
// books (so it cancels out). Whether the device lists this process can only
// be seen once it holds memory there: the context is made under the shared
// lock, and when the device then does not list the process it is destroyed
// and made again under the exclusive one. That namespace is remembered in the
// GPU's state (unlisted_pid_ns), so its later jobs go to the exclusive lock
// at once; a job of it that the device does list after all clears it.
//
// A context is charged before it is made, as an allocation is: a context
// that did not fit would otherwise be on the device, over the quota, until
// it was destroyed again. The first context of a process on a device is
// where the driver reserves the big block: it is charged what a first
// context was last measured to reserve on that GPU (kept in its shared state,
// context_bytes), then measured and the books settled on the figure (the
// difference charged or given back; when more does not fit, the context is
// destroyed and its creation fails with CUDA_ERROR_OUT_OF_MEMORY). That
// figure is kept per device and charged, before the call, for every later
// context of the process there. The very first context made on a GPU's
// state has no figure yet: it is charged an estimate (1/128 of the device,
// at most what its partition has left) until it is measured.
//
// Limits of that fallback, said in the README: a process outside fracgpu
// allocating or freeing during the measurement moves the figure by what it did (allocating makes
// this job pay more, never a neighbour; freeing can make it pay less).
// Without NVML nothing can be measured: contexts are then charged nothing
// (or what was measured on the GPU before), said once on stderr, and
// FRACGPU_CONTEXT_MEMORY is the way to charge them.
#include "device_figures.h"
#include "quota.h"

#include <algorithm>
#include <cerrno>
#include <fcntl.h>
#include <mutex>
#include <new>
#include <string>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fracgpu/state.h"

namespace shim {
namespace {

// Primary contexts: the driver's reference count, mirrored.
struct Primary {
    int refs = 0;
    CUcontext ctx = nullptr;
};
std::mutex g_primary_mu;
Primary g_primary[kMaxDevices];

// Holds the GPU's measurement lock (flock on its state file), shared
// (LOCK_SH) or exclusive (LOCK_EX), while it lives.
class MeasureLock {
  public:
    MeasureLock(const std::string &path, int mode) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
        while (fd_ >= 0 && flock(fd_, mode) != 0 && errno == EINTR) {
        }
    }
    ~MeasureLock() {
        if (fd_ >= 0) ::close(fd_);   // closing releases the lock
    }
    MeasureLock(const MeasureLock &) = delete;
    MeasureLock &operator=(const MeasureLock &) = delete;

  private:
    int fd_;
};

constexpr uint64_t kUnknown = UINT64_MAX;
std::mutex g_context_mu;                       // one context creation at a time (a measurement needs it)
uint64_t g_context_bytes[kMaxDevices];         // what a context of this process reserves on each device

void forget_context_sizes() {
    for (uint64_t &c : g_context_bytes) c = kUnknown;
}
const bool g_context_sizes_unknown = (forget_context_sizes(), true);


// This process's pid namespace: the inode of /proc/self/ns/pid (0: unknown).
uint64_t pid_namespace() {
    struct stat st {};
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

bool known_unlisted(const fracgpu::SharedRegion &r, uint64_t ns) {
    for (const auto &e : r.unlisted_pid_ns)
        if (ns && e.load(std::memory_order_relaxed) == ns) return true;
    return false;
}

// Remembers (or forgets) that the device does not list the processes of pid namespace `ns`.
void remember_unlisted(fracgpu::SharedRegion &r, uint64_t ns, bool unlisted) {
    if (!ns || known_unlisted(r, ns) == unlisted) return;
    for (auto &e : r.unlisted_pid_ns) {
        uint64_t expected = unlisted ? 0 : ns;
        if (e.compare_exchange_strong(expected, unlisted ? ns : 0)) return;
    }
    if (unlisted) r.unlisted_pid_ns[ns % std::size(r.unlisted_pid_ns)].store(ns);   // full: one makes way
}

// Never measured on this GPU: a first estimate, at least what a real first
// context takes on the GPUs fracgpu serves (300-600 MiB of 80-141 GiB), but
// no more than the partition has left (so the estimate alone never refuses a
// context that fits). Settled once measured; while it is charged, neighbours
// in the partition see the room it holds as taken.
constexpr uint64_t kFirstContextShare = 128;
uint64_t first_context_estimate(Binding &b) {
    const fracgpu::SharedRegion *r = b.region.raw();
    uint64_t used = r->partitions[r->processes[b.slot].partition].used.load(std::memory_order_relaxed);
    uint64_t room = b.limit() > used ? b.limit() - used : 0;
    return std::min(b.region.total_memory() / kFirstContextShare, room);
}

// How a context was made and measured: `reserve` is its figure when `measured`.
struct Made {
    CUresult rc = CUDA_SUCCESS;
    bool measured = false;
    uint64_t reserve = 0;
    bool listed = false;     // the device lists the process (and measured it)
    bool unlisted = false;   // shared: not measured; the context is destroyed again
    bool said = false;       // ... and the device answered, without this process (not an NVML failure)
};

// Makes a context through `call` under the measurement lock held in `mode`
// and measures it: by the device's own figure for the process, or (exclusive
// lock only) by what the device uses beyond the books. Under the shared lock a
// context the device's figure cannot measure is destroyed again (unlisted).
// `precharged`: what was charged for it before it was made; the books are
// settled on the measured figure.
template <typename Call, typename Undo>
Made made_measured(Binding *b, int mode, uint64_t precharged, Call call, Undo undo) {
    Made m;
    uint64_t asked = mono_ns();
    MeasureLock lock(b->region.path(), mode);
    b->region.raw()->processes[b->slot].measure_wait_ns.fetch_add(mono_ns() - asked, std::memory_order_relaxed);
    const bool exclusive = mode == LOCK_EX;
    int64_t before = 0;
    uint64_t own_before = 0;
    bool listed = false;   // whether the device lists this process
    bool measure = exclusive && beyond_books(*b, &before);
    bool measure_own = own_usage(*b, &own_before, &listed);
    m.rc = call();
    if (m.rc != CUDA_SUCCESS) return m;
    int64_t after = 0;
    uint64_t own_after = 0;
    m.said = measure_own && own_usage(*b, &own_after, &listed);
    if (m.said && listed) {
        m.reserve = own_after > own_before ? own_after - own_before : 0;
        m.measured = m.listed = true;
    } else if (!exclusive) {
        undo();
        m.unlisted = true;
    } else if (measure && beyond_books(*b, &after)) {
        m.reserve = after > before ? (uint64_t)(after - before) : 0;
        m.measured = true;
    }
    // Settled under the lock, so the books hold the context before anyone
    // measures again: what it took beyond the charge made before it existed
    // is charged, what it took less is given back.
    if (m.measured && m.reserve > precharged && charge(b, m.reserve - precharged) != CUDA_SUCCESS) {
        undo();
        m.rc = CUDA_ERROR_OUT_OF_MEMORY;
        log("a CUDA context on %s reserves %s (measured), more than its partition has left: the context is "
            "destroyed and its creation fails", b->uuid.c_str(), size_text(m.reserve).c_str());
    } else if (m.measured && m.reserve < precharged) {
        b->region.uncharge(b->slot, precharged - m.reserve);
    }
    return m;
}

// Creates a context through `call` (which writes *pctx) and charges its
// reservation; `undo` destroys it again when that does not fit.
template <typename Call, typename Undo>
CUresult context_created(CUcontext *pctx, CUdevice dev, Call call, Undo undo) {
    Binding *b = binding(dev);
    if (!pctx || !b || dev >= kMaxDevices) return call();
    std::lock_guard<std::mutex> lk(g_context_mu);
    const Settings &s = settings();
    uint64_t known = s.has_context_memory ? s.context_memory : g_context_bytes[dev];
    uint64_t reserve = known == kUnknown ? 0 : known;
    if (known == kUnknown && b->ok) {
        fracgpu::SharedRegion &r = *b->region.raw();
        // Charged before it exists: what a first context was last measured to
        // reserve on this GPU, settled once measured.
        // Under the measurement lock, shared: a fallback measurement (the
        // device's figure beyond the books, under the lock held exclusively)
        // must not see the books move by a neighbour's charge meanwhile.
        uint64_t expected = r.context_bytes.load(std::memory_order_relaxed);
        {
            MeasureLock precharging(b->region.path(), LOCK_SH);
            if (expected) {
                if (CUresult rc = charge(b, expected); rc != CUDA_SUCCESS) {
                    log("a CUDA context on %s reserves %s (as measured before), more than its partition has left: "
                        "the context is not created", b->uuid.c_str(), size_text(expected).c_str());
                    return rc;
                }
            } else {
                expected = first_context_estimate(*b);
                if (charge(b, expected) != CUDA_SUCCESS) expected = 0;   // the room went meanwhile: measured after
            }
        }
        uint64_t ns = pid_namespace();
        Made m;
        // NVML is loaded (once) here, before the lock: a fallback measurement makes every other first context wait.
        m.unlisted = !device_lists_processes() || known_unlisted(r, ns);
        if (!m.unlisted) {
            m = made_measured(b, LOCK_SH, expected, call, undo);
            if (m.unlisted && m.said) remember_unlisted(r, ns, true);
        }
        if (m.unlisted) {
            m = made_measured(b, LOCK_EX, expected, call, undo);
            if (m.listed) remember_unlisted(r, ns, false);   // it is listed after all
        }
        if (m.rc != CUDA_SUCCESS) {
            uncharge(dev, expected);
            return m.rc;
        }
        if (m.measured) {
            g_context_bytes[dev] = m.reserve;
            r.context_bytes.store(m.reserve, std::memory_order_relaxed);
        }
        reserve = m.measured ? m.reserve : expected;
    } else {
        CUresult rc = charge(b, reserve);   // known: charged before the call, as an allocation is
        if (rc != CUDA_SUCCESS) {
            log("a CUDA context on %s reserves %s (%s), more than its partition has left: the context is not "
                "created", b->uuid.c_str(), size_text(reserve).c_str(),
                s.has_context_memory ? "FRACGPU_CONTEXT_MEMORY" : "measured");
            return rc;
        }
        rc = call();
        if (rc != CUDA_SUCCESS) {
            uncharge(dev, reserve);
            return rc;
        }
    }
    if (reserve) remember(kContext, reinterpret_cast<uint64_t>(*pctx), Charge{reserve, dev, *pctx});
    reconcile_start();   // the process holds memory on the device now: check the books against it
    return CUDA_SUCCESS;
}
}  // namespace

void contexts_forget_after_fork() {
    new (&g_context_mu) std::mutex();
    forget_context_sizes();
    new (&g_primary_mu) std::mutex();
    for (Primary &p : g_primary) p = Primary{};
}

std::unique_lock<std::mutex> quota_no_context_creation() { return std::unique_lock<std::mutex>(g_context_mu); }
}  // namespace shim

using namespace shim;

namespace {
// A context just created that does not fit in the quota goes again.
void destroy_created(CUcontext ctx) {
    if (auto destroy = REAL(cuCtxDestroy_v2)) destroy(ctx);
}
}  // namespace

SHIM_API CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v4);
    return context_created(pctx, dev, [&] { return real(pctx, params, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *p, int n, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v3);
    return context_created(pctx, dev, [&] { return real(pctx, p, n, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate_v2);
    return context_created(pctx, dev, [&] { return real(pctx, flags, dev); }, [&] { destroy_created(*pctx); });
}
SHIM_API CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    REAL_OR_RETURN(real, cuCtxCreate);
    return context_created(pctx, dev, [&] { return real(pctx, flags, dev); }, [&] { destroy_created(*pctx); });
}

SHIM_API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    REAL_OR_RETURN(real, cuCtxDestroy_v2);
    CUresult rc = real(ctx);
    if (rc == CUDA_SUCCESS) release_context(ctx, false);
    return rc;
}
SHIM_API CUresult cuCtxDestroy(CUcontext ctx) {
    REAL_OR_RETURN(real, cuCtxDestroy);
    CUresult rc = real(ctx);
    if (rc == CUDA_SUCCESS) release_context(ctx, false);
    return rc;
}

SHIM_API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    REAL_OR_RETURN(real, cuDevicePrimaryCtxRetain);
    if (!pctx || dev < 0 || dev >= kMaxDevices) return real(pctx, dev);
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    CUresult rc = p.refs > 0 ? real(pctx, dev)
                             : context_created(pctx, dev, [&] { return real(pctx, dev); }, [&] {
                                   if (auto release = REAL(cuDevicePrimaryCtxRelease_v2)) release(dev);
                               });
    if (rc == CUDA_SUCCESS) {
        p.refs++;
        p.ctx = *pctx;
    }
    return rc;
}

namespace {
CUresult primary_release(CUdevice dev, CUresult rc) {
    if (rc != CUDA_SUCCESS || dev < 0 || dev >= kMaxDevices) return rc;
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    if (p.refs > 0 && --p.refs == 0) release_context(p.ctx, false);
    return rc;
}
CUresult primary_reset(CUdevice dev, CUresult rc) {
    if (rc != CUDA_SUCCESS || dev < 0 || dev >= kMaxDevices) return rc;
    std::lock_guard<std::mutex> lk(g_primary_mu);
    Primary &p = g_primary[dev];
    if (p.refs > 0) release_context(p.ctx, true);   // its memory goes; the retained context stays
    return rc;
}
}  // namespace

// Release and reset, both versions: the real call, then what it dropped.
#define PRIMARY_HOOK(fn, after)                \
    SHIM_API CUresult fn(CUdevice dev) {       \
        REAL_OR_RETURN(real, fn);              \
        return after(dev, real(dev));          \
    }
PRIMARY_HOOK(cuDevicePrimaryCtxRelease_v2, primary_release)
PRIMARY_HOOK(cuDevicePrimaryCtxRelease, primary_release)
PRIMARY_HOOK(cuDevicePrimaryCtxReset_v2, primary_reset)
PRIMARY_HOOK(cuDevicePrimaryCtxReset, primary_reset)
#undef PRIMARY_HOOK
