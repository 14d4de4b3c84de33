// The shared state of fracgpu: one region (a file, mapped by every process)
// per physical GPU, keyed by the GPU's UUID, holding the partitions of that GPU
// and the processes using them.
//
// Used by the shim inside every job and by the Python package (CLI, usage()).
// Layout rules: fixed-size tables, no pointers, counters that change on the
// hot path are lock-free 64-bit atomics; table changes (partitions created or
// removed, processes joining or leaving) take a process-shared robust mutex, so
// a holder killed by SIGKILL never blocks the others.
//
// Nothing here throws: every fallible call returns false and fills `err` with
// one line that names the problem and what to do.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <pthread.h>
#include <sys/types.h>
#include <string>
#include <vector>

namespace fracgpu {

// The layout version changes whenever a field or a flag changes meaning: two
// fracgpu builds that read one region differently must never share it (the
// second is refused with what to do). What each version changed:
// docs/state-layout.md.
constexpr uint32_t kStateLayoutVersion = 5;
constexpr int kMaxPartitions = 64;
constexpr int kMaxProcesses = 256;
constexpr size_t kNameBytes = 64;      // partition names, NUL included
constexpr size_t kUuidBytes = 48;      // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
constexpr size_t kDeviceNameBytes = 96;
constexpr size_t kCommandBytes = 64;

enum PartitionFlags : uint32_t {
    kPartitionEphemeral = 1u << 0,   // made for one `fracgpu run`/init(): removed with its last process
    kPartitionCap = 1u << 1,         // the compute share is also a ceiling
    kPartitionBestEffort = 1u << 2,  // its memory limit did not fit and was overcommitted: a ceiling, not a promise
    // Priority class (neither bit: normal). The launch gate serves high before
    // normal before low; see fracgpu/gate_policy.h.
    kPartitionHigh = 1u << 3,
    kPartitionLow = 1u << 4,
    // Its compute share did not fit beside the shares promised in its class
    // and was overcommitted: the gate weighs it within what the promised
    // shares leave, so it never dilutes a promise.
    kPartitionComputeBestEffort = 1u << 5,
};
constexpr uint32_t kPartitionPriorityMask = kPartitionHigh | kPartitionLow;

struct SharedPartition {
    uint32_t in_use;                       // written last on create, first on remove
    uint32_t flags;
    char name[kNameBytes];
    uint64_t memory_limit;                 // bytes; 0: no limit (the whole device); atomic access
    double compute_share;                  // (0, 1]; 0: none; atomic access (may change while jobs run)
    uint64_t created_unix_ns;
    std::atomic<uint64_t> used;            // bytes charged to the partition now
    std::atomic<uint64_t> peak;            // highest `used` seen
    std::atomic<uint64_t> oom_refusals;    // allocations refused over quota
    // Compute (the launch gate: its policy is fracgpu/gate_policy.h, applied by csrc/shim/cuda/gate.cpp)
    std::atomic<uint64_t> device_ns;       // device time its kernels used, measured with events
    std::atomic<uint64_t> vtime_ns;        // turns held on the device / weight: the fair-share clock
    std::atomic<uint64_t> last_launch_ns;  // CLOCK_MONOTONIC of its latest launch (0: never)
    std::atomic<uint64_t> inflight;        // measured launches not yet completed, all its processes
    std::atomic<uint64_t> waiting_ns;      // CLOCK_MONOTONIC since when a process waits at the gate (0: none)
    std::atomic<uint64_t> launches;        // kernel and graph launches
    std::atomic<uint64_t> cap_tokens_ns;   // capped partitions: device time it may still use (signed)
    std::atomic<uint64_t> cap_refill_ns;   // when cap_tokens_ns was last refilled
    std::atomic<uint64_t> last_done_ns;    // CLOCK_MONOTONIC when a measured launch of it was last seen complete
    std::atomic<uint64_t> busy_ns;         // device time beyond the host's pace (the gate's saturation measure)
    std::atomic<uint64_t> reserved[6];
    // Ground truth (csrc/shim/cuda/reconcile.cpp): what the device holds for its
    // processes beyond their books. `used` includes it, so the partition is held
    // to the larger of the books and the device.
    std::atomic<uint64_t> drift_charged;   // sum of its processes' drift_charged
    std::atomic<uint64_t> drift_peak;      // highest drift_charged seen
};

// A process is named by (pid, pid_ns, start_time). Pids are local to a pid
// namespace: processes in two containers can both be pid 7 and share a
// region. So a process judges (and reaps) only the slots of its own pid
// namespace; the others are left to a process that can see them: the node
// agent, in the host's pid namespace, maps them through /proc (host_pid_of).
struct SharedProcess {
    int32_t pid;                           // 0: free slot; the pid in its own namespace
    int32_t partition;                     // index into partitions
    uint64_t start_time;                   // /proc/<pid>/stat field 22 (ticks since boot, the same in every namespace)
    uint64_t pid_ns;                       // inode of its /proc/<pid>/ns/pid
    uint64_t attached_unix_ns;
    char command[kCommandBytes];
    std::atomic<uint64_t> used;            // bytes this process holds
    std::atomic<uint64_t> peak;
    std::atomic<uint64_t> device_ns;       // device time of its gated launches
    std::atomic<uint64_t> launches;
    std::atomic<uint64_t> inflight;        // its part of the partition's inflight (given back when it goes)
    // The process recording this one's job (`fracgpu run`, the recorder of
    // fracgpu.init()), and its start time; 0: none. While the holder lives, a
    // process that ends keeps its slot, marked exited, with its memory given
    // back but its counters kept, until the holder collects it: the last
    // device time of a job is never lost between two samples.
    std::atomic<uint64_t> holder;
    std::atomic<uint64_t> holder_start;
    std::atomic<uint64_t> exited;          // 1: the process is gone; the slot waits for its holder
    // How long join() waited for the region's lock (ns): what another process's
    // table change cost this one's start. Both waits are read through usage():
    // the start-up test holds them to a bound (a guarantee, not only a reading
    // for benchmarks, so they stay in the shared layout).
    std::atomic<uint64_t> join_wait_ns;
    // How long its first context waited for the GPU's measurement lock (ns):
    // held shared where the device lists the process, exclusively by the
    // fallback measurement (the CUDA shim's quota.cpp); both waits add up.
    std::atomic<uint64_t> measure_wait_ns;
    // Ground truth (csrc/shim/cuda/reconcile.cpp), written by the process
    // itself about once a second under the region's lock.
    std::atomic<uint64_t> truth;           // TruthState
    std::atomic<uint64_t> device_used;     // what the device reports the process holds on this GPU
    std::atomic<uint64_t> drift;           // int64_t: device_used - used, at the last reconciliation
    std::atomic<uint64_t> drift_charged;   // its positive drift, charged to the partition's used (not to its own)
    std::atomic<uint64_t> reconciled_unix_ns;
};

// How long a figure taken by the node agent for a process in another pid
// namespace stands over that process's own "the device does not list me".
constexpr uint64_t kForeignFigureFresh_ns = 3000000000ull;

// What is known of a process's memory on the device (SharedProcess::truth).
enum TruthState : uint64_t {
    kTruthNotYet = 0,      // not reconciled yet (no context, or less than one interval old)
    kTruthKnown = 1,       // device_used and drift hold
    kTruthUnknown = 2,     // the device does not list the process (another pid namespace) or cannot say
};

struct SharedRegion {
    char magic[8];
    uint32_t layout_version;
    uint32_t header_size;                  // sizeof(SharedRegion)
    uint64_t file_size;
    char uuid[kUuidBytes];
    char device_name[kDeviceNameBytes];
    uint64_t total_memory;
    uint64_t created_unix_ns;
    pthread_mutex_t lock;
    // The device lease of the launch gate: which partition may launch, until when.
    // Waiters sleep on `owner` (a futex: it changes when the device is freed).
    std::atomic<int32_t> owner;            // partition index, -1: free
    uint32_t pad0;
    std::atomic<uint64_t> lease_until_ns;
    std::atomic<uint64_t> lease_start_ns;  // since when the owner's turn is charged (its virtual time)
    // What a process's first CUDA context reserves on this GPU, as last
    // measured (the CUDA shim's contexts.cpp); 0: never measured. A new
    // context is charged this before it is made, and settled once measured.
    // Taken from the reserved words: a region made before it reads 0.
    std::atomic<uint64_t> context_bytes;
    std::atomic<uint64_t> reserved[3];
    // Pid namespaces (inodes of /proc/<pid>/ns/pid; 0: free) whose processes
    // the device's NVML was found not to list: their first contexts are
    // measured under the exclusive measurement lock straight away (the CUDA
    // shim's quota.cpp). A hint only, taken from the reserved words (zero in
    // a region made before it, and a build that ignores it stays correct):
    // a wrong entry costs a wait or a second context creation, never a
    // wrong charge.
    std::atomic<uint64_t> unlisted_pid_ns[4];
    SharedPartition partitions[kMaxPartitions];
    SharedProcess processes[kMaxProcesses];
};

// Settings of a partition that `fracgpu partition set` may change while its
// jobs run: always read (and written) atomically.
inline uint64_t memory_limit_of(const SharedPartition &p) { return __atomic_load_n(&p.memory_limit, __ATOMIC_ACQUIRE); }
inline uint32_t flags_of(const SharedPartition &p) { return __atomic_load_n(&p.flags, __ATOMIC_ACQUIRE); }
// FRACGPU_PRIORITY_LOW/NORMAL/HIGH (fracgpu/units.h) of flags, and back.
inline int priority_of_flags(uint32_t flags) {
    return (flags & kPartitionHigh) ? 2 : (flags & kPartitionLow) ? 0 : 1;
}
inline uint32_t priority_flags(int priority) {
    return priority == 2 ? uint32_t(kPartitionHigh) : priority == 0 ? uint32_t(kPartitionLow) : 0u;
}
inline int priority_of(const SharedPartition &p) { return priority_of_flags(flags_of(p)); }
inline double share_of(const SharedPartition &p) {
    double v;
    __atomic_load(&p.compute_share, &v, __ATOMIC_ACQUIRE);
    return v;
}

// Memory promises. On each GPU the limits of the partitions that hold a
// promise (a limit, not best effort) add up to at most the device's memory;
// the check is made under the region's lock with every creation and change.
// A partition without a promise (no limit, or best effort) uses only memory
// nobody was promised: the device less every promised partition's limit (or
// what it holds, when more) and less what the other partitions without a
// promise hold; a best-effort partition also stays under its own limit.
// Every refusal of a promise that does not fit holds this text ("3GiB does
// not fit on GPU-...: already promised ..."), so callers can tell it apart.
constexpr char kDoesNotFit[] = " does not fit on ";
// The smallest memory limit a partition may have: below it no CUDA context
// fits (a real one takes 300-600 MiB, a simulated one 1/256 of its GPU), so
// every job in it would fail at its first context.
constexpr uint64_t kMinMemoryLimit = 1ull << 20;
// False with *err (the smallest usable limit) for a limit below it; 0 (no limit) is usable.
bool usable_memory_limit(uint64_t limit, std::string *err);
// Compute promises. The launch gate weighs high and normal partitions' shares
// as fractions of the device, and low partitions' shares as fractions of what
// the others leave (csrc/shim/cuda/gate.cpp), so the shares that hold a
// promise (not best effort) add up to at most 1 among high and normal
// partitions together, and to at most 1 among low ones. Checked under the
// region's lock with every creation and change, as memory promises are.
constexpr char kShareDoesNotFit[] = " of compute does not fit on ";
inline bool holds_share_promise(const SharedPartition &p) {
    return share_of(p) > 0 && !(flags_of(p) & kPartitionComputeBestEffort);
}
// Names fracgpu gives the partitions it makes for one job ("run-<pid>",
// "init-<pid>", "slurm-<job id>"): its own namespace, which
// create_partition() refuses, so that a private job never meets a partition
// somebody made under its name.
bool reserved_partition_name(const std::string &name);
inline bool holds_promise(const SharedPartition &p) {
    return memory_limit_of(p) != 0 && !(flags_of(p) & kPartitionBestEffort);
}
// The most partition `index` may hold, as its jobs are shown it: its limit when
// it holds a promise, else its limit (or the device) capped at what the other
// partitions were not promised. Lock-free (a reading).
uint64_t memory_ceiling(const SharedRegion &r, int index);

// Memory the device says is held outside this state's books: by processes it
// lists that no partition here knows (another state folder's jobs, jobs
// without fracgpu). Promises are made only beside it; `who` names them for
// messages ("pid 4242 5.25GiB").
struct HeldOutside {
    uint64_t bytes = 0;
    std::string who;
};

// A partition or process as read by usage() and the CLI: plain values.
struct PartitionInfo {
    std::string name;
    uint32_t flags = 0;
    uint64_t memory_limit = 0, used = 0, peak = 0, oom_refusals = 0;
    uint64_t memory_ceiling = 0;   // the most it may hold now (fracgpu::memory_ceiling)
    double compute_share = 0;
    uint64_t device_ns = 0, launches = 0;
    uint64_t created_unix_ns = 0;
    int processes = 0;
    // Ground truth: the sum of its processes' known drifts (signed), what of it
    // is charged (inside `used`), the most that was, and how many of its
    // processes the device cannot be asked about.
    int64_t drift = 0;
    uint64_t drift_charged = 0, drift_peak = 0;
    int drift_unknown = 0;
};
struct ProcessInfo {
    int slot = -1;   // its index in the region's table
    int pid = 0;
    uint64_t pid_ns = 0;     // its pid namespace (inode); the pid is that namespace's
    std::string partition, command;
    uint64_t used = 0, peak = 0, start_time = 0, attached_unix_ns = 0;
    uint64_t device_ns = 0, launches = 0;
    int holder = 0;
    bool exited = false;
    uint64_t truth = kTruthNotYet, device_used = 0, drift_charged = 0;
    int64_t drift = 0;
    uint64_t join_wait_ns = 0, measure_wait_ns = 0;
};

// The folder the state lives in: $FRACGPU_STATE_DIR, else
// $XDG_RUNTIME_DIR/fracgpu (when that folder is ours), else /tmp/fracgpu-$UID.
std::string default_state_dir();

// Creates `dir` (mode 0700) when missing, and checks it is safe: a folder owned
// by this user that nobody else can write to. With FRACGPU_STATE_GROUP set (a
// shared host), the folder is the group's instead: made mode 2770 with that
// group, it must belong to the group, the caller must be in it, and nobody
// outside it may write there; state files are then made 0660.
bool check_state_dir(const std::string &dir, bool create, std::string *err);
// The group of FRACGPU_STATE_GROUP (a name or a number): false when unset;
// true with gid (gid_t)-1 and `err` when it names no group.
bool state_group(gid_t *gid, std::string *err);

// Files of regions under dir ("gpu-*.state"), sorted.
std::vector<std::string> region_files(const std::string &dir);

// Start time of a live process, 0 when gone or a zombie.
uint64_t process_start_time(int pid);

// Pid namespaces. The inode of /proc/<pid>/ns/pid (pid 0: this process's; 0
// when it cannot be read).
uint64_t pid_namespace(int pid);
// The inode of the host's (initial) pid namespace, fixed by the kernel.
constexpr uint64_t kInitialPidNamespace = 0xEFFFFFFCu;
// Process `pid` of this namespace as its own namespace sees it: the innermost
// of /proc/<pid>/status NSpid, and /proc/<pid>/ns/pid. False when it is gone.
bool namespace_pid(int pid, uint64_t *ns, int *ns_pid);
// The pid in this namespace of the process that is `ns_pid` in namespace `ns`
// and started at `start_time` (0: any), by a scan of /proc; 0 when no process
// visible here is it.
int host_pid_of(uint64_t ns, int ns_pid, uint64_t start_time);

// Checks a partition name: 1..63 bytes of [A-Za-z0-9._-], not starting with '.' or '-'.
bool valid_partition_name(const std::string &name, std::string *err);

class Region {
  public:
    Region() = default;
    ~Region();
    Region(const Region &) = delete;
    Region &operator=(const Region &) = delete;

    // Opens the region of the GPU `uuid` under dir, creating it (complete,
    // under a temporary name, then linked into place) when `create`.
    bool open(const std::string &dir, const std::string &uuid, const std::string &device_name,
              uint64_t total_memory, bool create, std::string *err);
    // Opens an existing region file as it is.
    bool open_file(const std::string &path, std::string *err);
    void close();
    bool is_open() const { return r_ != nullptr; }

    const std::string &path() const { return path_; }
    std::string uuid() const { return r_->uuid; }
    std::string device_name() const { return r_->device_name; }
    uint64_t total_memory() const { return r_->total_memory; }
    SharedRegion *raw() { return r_; }

    // Table changes (each takes the lock).
    // A limit that does not fit beside the promises is refused (the message
    // names them and what remains) unless `overcommit`: the partition is then
    // made best effort; a compute share likewise (kPartitionComputeBestEffort).
    // A name fracgpu keeps for its own (reserved_partition_name) is refused, and
    // so is a limit below kMinMemoryLimit.
    bool create_partition(const std::string &name, uint64_t memory_limit, double compute_share, uint32_t flags,
                          std::string *err, bool overcommit = false);
    bool remove_partition(const std::string &name, std::string *err);
    // Changes a live partition (null: leave that setting as it is); running jobs
    // see the change at their next allocation or launch.
    // A new memory limit is checked as create_partition() does; one that fits
    // (or none) makes the partition hold a promise again.
    // `priority`: FRACGPU_PRIORITY_LOW/NORMAL/HIGH (fracgpu/units.h).
    bool update_partition(const std::string &name, const uint64_t *memory_limit, const double *compute_share,
                          const bool *cap, std::string *err, bool overcommit = false, const int *priority = nullptr);
    // Whether a new partition (other than `name`) with `memory_limit` and a
    // compute `share` in class `priority` would fit beside the promises now;
    // false with the refusal in *err. A reading for messages before a job
    // starts: creation checks again, atomically.
    bool check_promise(const std::string &name, uint64_t memory_limit, double share, int priority,
                       std::string *err);
    int find_partition(const std::string &name);           // index or -1
    // What the device holds outside these books, as the caller measured it
    // (NVML): every later promise check of this object counts it as taken.
    void set_held_outside(HeldOutside outside) { outside_ = std::move(outside); }
    // Joins partition `name` as process `pid`; when it does not exist and
    // `create_limit` is given (ephemeral; an existing partition of that name
    // is joined only when it is a private one with these very settings, made
    // by a process of the same job), creates it with that limit (0: none),
    // `create_share` and `create_flags`, its limit checked against the
    // promises as create_partition() does (`overcommit`: best effort when it
    // does not fit). `holder`: the pid recording this process's job (0: none).
    // Returns the slot, -1 on error.
    int join(const std::string &name, int pid, const char *command, const uint64_t *create_limit,
             std::string *err, double create_share = 0, uint32_t create_flags = 0, int holder = 0,
             bool overcommit = false);
    void leave(int slot);                                  // this process is done with its slot
    // This process ends: its launches still in flight (it will never see
    // them complete) stop counting for its partition at the gate. Its slot
    // and its memory stay until the process is gone (reap).
    void end_launches(int slot);
    // Frees the slots of dead processes (or, while their holder lives, marks
    // them exited); returns how many. `quick`: a process is dead when its pid
    // is gone (no /proc read: a reused pid is found by the next full reap).
    int reap(bool quick = false);
    // Frees the slots of dead processes of every pid namespace (reap() judges
    // only this process's own): a slot of another namespace is dead when no
    // process here is it (host_pid_of). Only a process in the host's pid
    // namespace sees every process; elsewhere this is reap(). Returns how many.
    int reap_all_namespaces();
    // Frees the exited slots held by `holder` (only `slot` when given);
    // returns how many. (The holder reads their final counters first.)
    int collect(int holder, int slot = -1);
    // Makes `holder` (a live process: the node agent) the holder of the live
    // process `pid` started at `start_time` in `slot`, when it has none, is
    // held by `holder` already, or by `previous` (an earlier run of the same
    // agent); false otherwise (another recorder keeps it, or the slot changed).
    bool adopt(int slot, int pid, uint64_t start_time, int holder, int previous = 0);

    // charge(): atomically adds `bytes` to the partition unless that passes its
    // limit (false: nothing charged), then to the slot. Lock-free for a
    // partition that holds a promise; one without takes the lock, to check
    // what nobody was promised against the others atomically.
    bool charge(int slot, uint64_t bytes);
    void uncharge(int slot, uint64_t bytes);
    void note_refusal(int slot);                           // an allocation was refused over quota
    // Ground truth: process `pid` in `slot` is reported by the device to hold
    // `device_used` bytes (`listed`: the device lists it; else its drift is
    // unknown) where its books say `books`. Records the figure and the drift,
    // and charges the positive drift to the partition (giving back what was
    // charged before), under the lock; nothing when the slot is no longer
    // this live process's. Returns the drift charged now. A process's own
    // "not listed" leaves a figure the node agent took less than
    // kForeignFigureFresh_ns ago as it is.
    uint64_t reconcile(int slot, int pid, bool listed, uint64_t device_used, uint64_t books);

    std::vector<PartitionInfo> partitions();
    std::vector<ProcessInfo> processes();

  private:
    bool lock(std::string *err);
    void unlock();
    void release_slot_locked(int slot);
    void free_slot_locked(int slot);
    // Dead processes' slots released: which ones is found before taking the
    // lock, so the lock is held only to release them. `quick`: by pid alone.
    // `all_namespaces`: slots of other pid namespaces too, found dead by a scan of /proc.
    int sweep(bool quick, bool all_namespaces = false);
    SharedRegion *r_ = nullptr;
    size_t size_ = 0;
    std::string path_;
    HeldOutside outside_;
};

}  // namespace fracgpu
