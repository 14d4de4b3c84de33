// The shared state: see fracgpu/state.h.
#include "fracgpu/state.h"

#include "fracgpu/node_config.h"
#include "fracgpu/settings.h"
#include "fracgpu/os.h"
#include "fracgpu/units.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace fracgpu {

namespace {

constexpr char kMagic[8] = {'F', 'R', 'A', 'C', 'G', 'P', 'U', 'S'};

uint64_t unix_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

std::string errno_text(int e) { return std::string(strerror(e)); }

// *err: there is no partition `name` on this GPU. Always false.
bool no_partition(const SharedRegion *r, const std::string &name, std::string *err) {
    *err = "no partition '" + name + "' on GPU " + std::string(r->uuid) + "; `fracgpu partition list` shows them";
    return false;
}

void copy_name(char *dst, size_t n, const std::string &src) {
    size_t len = std::min(src.size(), n - 1);
    memcpy(dst, src.data(), len);
    dst[len] = '\0';
}

// This process's pid namespace. A process's own namespace never changes, but
// a child forked after unshare(CLONE_NEWPID) is in a new one: the cached value
// belongs to the pid that read it.
uint64_t own_pid_namespace() {
    static std::atomic<uint64_t> cached_pid{0}, cached_ns{0};
    uint64_t me = (uint64_t)getpid();
    if (cached_pid.load(std::memory_order_acquire) == me) return cached_ns.load(std::memory_order_relaxed);
    uint64_t ns = pid_namespace(0);
    cached_ns.store(ns, std::memory_order_relaxed);
    cached_pid.store(me, std::memory_order_release);
    return ns;
}

// Whether this process can judge slot p by its pid: only a slot of its own pid
// namespace (a pid of another names some other process here, or none).
bool judged_here(const SharedProcess &p) {
    uint64_t ns = __atomic_load_n(&p.pid_ns, __ATOMIC_RELAXED);
    return ns == 0 || ns == own_pid_namespace();
}

// Liveness as judged here: a slot of another pid namespace is alive to us (its
// own namespace, or the host's node agent, judges it).
bool alive(const SharedProcess &p) {
    if (p.pid <= 0) return false;
    if (!judged_here(p)) return true;
    if (kill(p.pid, 0) != 0 && errno == ESRCH) return false;
    return process_start_time(p.pid) == p.start_time;
}

// Whether the process recording p's job still runs (a reused pid does not count).
bool holder_alive(const SharedProcess &p) {
    uint64_t h = p.holder.load(std::memory_order_acquire);
    if (h == 0 || h > (uint64_t)INT32_MAX) return false;
    if (!judged_here(p)) return true;   // the holder is counted in the slot's namespace
    if (kill((int)h, 0) != 0 && errno == ESRCH) return false;
    return process_start_time((int)h) == p.holder_start.load(std::memory_order_acquire);
}

void raise_peak(std::atomic<uint64_t> &peak, uint64_t value) {
    uint64_t cur = peak.load(std::memory_order_relaxed);
    while (value > cur && !peak.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
    }
}

void saturating_sub(std::atomic<uint64_t> &counter, uint64_t bytes) {
    uint64_t cur = counter.load(std::memory_order_relaxed);
    uint64_t next;
    do {
        next = cur > bytes ? cur - bytes : 0;
    } while (!counter.compare_exchange_weak(cur, next, std::memory_order_acq_rel));
}

bool init_region(SharedRegion *r, size_t size, const std::string &uuid, const std::string &device_name,
                 uint64_t total, std::string *err) {
    memset(static_cast<void *>(r), 0, size);
    memcpy(r->magic, kMagic, sizeof kMagic);
    r->layout_version = kStateLayoutVersion;
    r->header_size = sizeof(SharedRegion);
    r->file_size = size;
    copy_name(r->uuid, sizeof r->uuid, uuid);
    copy_name(r->device_name, sizeof r->device_name, device_name);
    r->total_memory = total;
    r->created_unix_ns = unix_ns();
    r->owner.store(-1);
    int rc = fracgpu::init_shared_mutex(&r->lock);
    if (rc != 0) {
        *err = "cannot initialise the shared state's lock: " + errno_text(rc);
        return false;
    }
    return true;
}

std::string size_str(uint64_t bytes) {
    char buf[32];
    fracgpu_format_size(bytes, buf, sizeof buf);
    return buf;
}

std::string share_str(double share) {
    char buf[32];
    fracgpu_format_share(share, buf, sizeof buf);
    return buf;
}

// What the partitions other than `except` take from the device: the promises
// (each promised partition's limit, or what it holds when more) and what the
// partitions without a promise hold, with who, for messages.
struct Taken {
    uint64_t promised = 0, unpromised = 0;
    std::string promised_by, held_by;
    uint64_t total() const { return promised + unpromised; }
};

Taken taken_by_others(const SharedRegion &r, int except, bool names = false) {
    Taken t;
    for (int i = 0; i < kMaxPartitions; i++) {
        const SharedPartition &p = r.partitions[i];
        if (i == except || !__atomic_load_n(&p.in_use, __ATOMIC_ACQUIRE)) continue;
        uint64_t used = p.used.load(std::memory_order_acquire);
        std::string name = names ? std::string(p.name, strnlen(p.name, sizeof p.name)) : std::string();
        if (holds_promise(p)) {
            uint64_t take = std::max(memory_limit_of(p), used);
            t.promised += take;
            if (names) t.promised_by += (t.promised_by.empty() ? "" : ", ") + name + " " + size_str(take);
        } else if (used) {
            t.unpromised += used;
            if (names) t.held_by += (t.held_by.empty() ? "" : ", ") + name + " " + size_str(used);
        }
    }
    return t;
}

// Whether a promise of `limit` bytes fits beside what the partitions other
// than `except` take, and what the device holds outside these books
// (`outside`, naming who holds it); false with the refusal in *err. Under the
// lock when it decides (creation, change); a reading otherwise.
bool promise_fits(const SharedRegion &r, int except, uint64_t limit, const char *hint, std::string *err,
                  const HeldOutside &outside) {
    Taken t = taken_by_others(r, except, true);
    uint64_t taken = t.total() + outside.bytes;
    if (taken <= r.total_memory && limit <= r.total_memory - taken) return true;
    uint64_t left = taken < r.total_memory ? r.total_memory - taken : 0;
    std::string text = size_str(limit) + kDoesNotFit + r.uuid + " (" + size_str(r.total_memory) +
                       "): already promised " +
                       (t.promised ? size_str(t.promised) + " (" + t.promised_by + ")" : std::string("nothing"));
    if (t.unpromised)
        text += ", and " + size_str(t.unpromised) + " is held without a promise (" + t.held_by + ")";
    if (outside.bytes)
        text += ", and the device says " + size_str(outside.bytes) + " is held outside these books (" +
                outside.who + ")";
    text += "; " + size_str(left) + " remains. Ask for at most " + size_str(left) + ", or " + hint;
    *err = text;
    return false;
}

// Whether a compute share promise of `share` in priority class `klass` fits
// beside the shares the partitions other than `except` promised (see
// holds_share_promise); false with the refusal, naming them, in *err.
bool share_fits(const SharedRegion &r, int except, double share, int klass, const char *hint, std::string *err) {
    bool low = klass == 0;
    double promised = 0;
    std::string by;
    for (int i = 0; i < kMaxPartitions; i++) {
        const SharedPartition &p = r.partitions[i];
        if (i == except || !__atomic_load_n(&p.in_use, __ATOMIC_ACQUIRE) || !holds_share_promise(p)) continue;
        if ((priority_of(p) == 0) != low) continue;
        promised += share_of(p);
        by += (by.empty() ? "" : ", ") + std::string(p.name, strnlen(p.name, sizeof p.name)) + " " +
              share_str(share_of(p));
    }
    // Sums of shares such as 0.1 + 0.2 carry rounding of their own, which must not refuse
    // promises that add up to exactly 100%.
    if (promised + share <= 1.0 + 1e-9) return true;
    double left = promised < 1.0 ? 1.0 - promised : 0.0;
    *err = share_str(share) + kShareDoesNotFit + std::string(r.uuid) + ": " +
           (low ? "low-priority partitions already promised " : "already promised ") + share_str(promised) +
           " of its time (" + by + "); " + share_str(left) + " remains" +
           (low ? " (low partitions' shares are of what the others leave)" : " (high and normal shares together)") +
           ". Ask for at most " + share_str(left) + ", or " + hint;
    return false;
}

constexpr char kOvercommitHint[] = "pass --overcommit";

std::string file_for(const std::string &dir, const std::string &uuid) {
    std::string safe;
    for (char c : uuid) safe += (isalnum((unsigned char)c) || c == '-') ? c : '_';
    return dir + "/gpu-" + safe + ".state";
}

}  // namespace

uint64_t memory_ceiling(const SharedRegion &r, int index) {
    const SharedPartition &p = r.partitions[index];
    uint64_t limit = memory_limit_of(p);
    if (holds_promise(p)) return limit;
    uint64_t promised = taken_by_others(r, index).promised;
    uint64_t left = promised < r.total_memory ? r.total_memory - promised : 0;
    return limit && limit < left ? limit : left;
}

uint64_t process_start_time(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    const char *p = strrchr(buf, ')');   // the command may hold spaces and parentheses
    if (!p || p[1] != ' ') return 0;
    p += 2;
    if (*p == 'Z' || *p == 'X') return 0;   // a zombie holds no GPU memory
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p) return 0;
        p++;
    }
    return strtoull(p, nullptr, 10);
}

uint64_t pid_namespace(int pid) {
    char path[64];
    if (pid == 0) snprintf(path, sizeof path, "/proc/self/ns/pid");
    else snprintf(path, sizeof path, "/proc/%d/ns/pid", pid);
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

bool namespace_pid(int pid, uint64_t *ns, int *ns_pid) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return false;
    buf[n] = 0;
    const char *line = strstr(buf, "\nNSpid:");
    if (!line) return false;
    const char *end = strchr(line + 1, '\n');
    // NSpid lists the pid in this namespace first, then in each nested one: the last is its own.
    long innermost = -1;
    for (const char *p = line + 7; p && (!end || p < end);) {
        char *next = nullptr;
        long v = strtol(p, &next, 10);
        if (next == p) break;
        innermost = v;
        p = next;
    }
    uint64_t inode = pid_namespace(pid);
    if (innermost <= 0 || inode == 0) return false;
    *ns = inode;
    *ns_pid = (int)innermost;
    return true;
}

namespace {
// Every process visible here, as its own pid namespace names it.
struct Visible {
    uint64_t ns, start_time;
    int ns_pid, pid;
};
std::vector<Visible> visible_processes() {
    std::vector<Visible> out;
    DIR *d = opendir("/proc");
    if (!d) return out;
    while (struct dirent *e = readdir(d)) {
        char *end = nullptr;
        long pid = strtol(e->d_name, &end, 10);
        if (!end || *end || pid <= 0) continue;
        Visible v{0, 0, 0, (int)pid};
        if (namespace_pid((int)pid, &v.ns, &v.ns_pid) && (v.start_time = process_start_time((int)pid)) != 0)
            out.push_back(v);
    }
    closedir(d);
    return out;
}
int find_visible(const std::vector<Visible> &all, uint64_t ns, int ns_pid, uint64_t start_time) {
    for (const Visible &v : all)
        if (v.ns == ns && v.ns_pid == ns_pid && (start_time == 0 || v.start_time == start_time)) return v.pid;
    return 0;
}
}  // namespace

int host_pid_of(uint64_t ns, int ns_pid, uint64_t start_time) {
    return find_visible(visible_processes(), ns, ns_pid, start_time);
}

std::string default_state_dir() {
    // A broken node file is refused by every reader of settings (read_job_settings,
    // the Python package) before the state is used; here it only falls through.
    NodeConfig config;
    std::string ignored;
    if (read_node_config(&config, &ignored)) {
        if (const char *v = node_setting(config, FRACGPU_SETTING_STATE_DIR)) return v;
    } else if (const char *v = fracgpu_setting(FRACGPU_SETTING_STATE_DIR)) {
        return v;
    }
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    if (xdg && *xdg && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid())
        return std::string(xdg) + "/fracgpu";
    return "/tmp/fracgpu-" + std::to_string((unsigned)geteuid());
}

bool state_group(gid_t *gid, std::string *err) {
    NodeConfig config;
    std::string config_err;
    if (!read_node_config(&config, &config_err)) {
        if (err) *err = config_err;
        *gid = (gid_t)-1;
        return true;
    }
    const char *name = node_setting(config, FRACGPU_SETTING_STATE_GROUP);
    if (!name) return false;
    char buf[4096];
    struct group g, *found = nullptr;
    if (getgrnam_r(name, &g, buf, sizeof buf, &found) == 0 && found) {
        *gid = found->gr_gid;
        return true;
    }
    char *end = nullptr;
    long n = strtol(name, &end, 10);
    if (end != name && !*end && n >= 0) {
        *gid = (gid_t)n;
        return true;
    }
    if (err) *err = std::string("FRACGPU_STATE_GROUP='") + name + "' is not a group of this machine; set it to the "
                    "group that shares the GPU, or unset it";
    *gid = (gid_t)-1;
    return true;
}

namespace {
bool in_group(gid_t gid) {
    if (getegid() == gid) return true;
    gid_t groups[256];
    int n = getgroups(256, groups);
    for (int i = 0; i < n; i++)
        if (groups[i] == gid) return true;
    return false;
}
}  // namespace

// Whether this user may list, search and write the state folder `dir` (of mode
// `mode`): jobs make their GPU's state file in it. False with what to do.
static bool usable_dir(const std::string &dir, const char *mode, const char *fix, std::string *err) {
    if (access(dir.c_str(), R_OK | W_OK | X_OK) == 0) return true;
    *err = "the state folder " + dir + " cannot be used by this user (mode " + mode + ": " + errno_text(errno) +
           "; jobs must read, search and write it); run `chmod " + fix + " " + dir + "` or use another folder";
    return false;
}

bool check_state_dir(const std::string &dir, bool create, std::string *err) {
    if (dir.empty()) {
        *err = "the state folder is empty; set FRACGPU_STATE_DIR to a folder of yours";
        return false;
    }
    gid_t gid = (gid_t)-1;
    std::string group_err;
    bool shared = state_group(&gid, &group_err);
    if (shared && gid == (gid_t)-1) {
        *err = group_err;
        return false;
    }
    if (shared && !in_group(gid)) {
        *err = "this user is not in group " + std::to_string(gid) + " (FRACGPU_STATE_GROUP), which shares the "
               "state folder " + dir + "; ask to be added, or unset FRACGPU_STATE_GROUP";
        return false;
    }
    if (create && mkdir(dir.c_str(), shared ? 02770 : 0700) == 0 && shared) {
        // Shared with the group: set-group-ID so every state file made in it is the group's too.
        if (chown(dir.c_str(), (uid_t)-1, gid) != 0 || chmod(dir.c_str(), 02770) != 0) {
            *err = "cannot give the state folder " + dir + " to group " + std::to_string(gid) + ": " +
                   errno_text(errno);
            return false;
        }
    } else if (create && errno != EEXIST && access(dir.c_str(), F_OK) != 0 && errno != EACCES) {
        // (EACCES: a folder above it cannot be searched; lstat below says so.)
        *err = "cannot create the state folder " + dir + ": " + errno_text(errno) +
               "; set FRACGPU_STATE_DIR to a folder you can write";
        return false;
    }
    struct stat st;
    if (lstat(dir.c_str(), &st) != 0) {
        *err = errno == EACCES
                   ? "the state folder " + dir + " cannot be reached: a folder above it cannot be searched by this "
                     "user (" + errno_text(errno) + "); set FRACGPU_STATE_DIR to a folder of yours, or ask its owner"
                   : "the state folder " + dir + " is missing (" + errno_text(errno) + ")";
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        *err = "the state folder " + dir + " is not a folder; set FRACGPU_STATE_DIR to a folder of yours";
        return false;
    }
    char mode[8];
    snprintf(mode, sizeof mode, "%03o", (unsigned)(st.st_mode & 0777));
    if (shared) {
        // Owned by whoever set it up; shared with the group alone.
        if (st.st_gid != gid) {
            *err = "the state folder " + dir + " belongs to group " + std::to_string(st.st_gid) + ", not " +
                   std::to_string(gid) + " (FRACGPU_STATE_GROUP); run `chgrp " + std::to_string(gid) + " " + dir +
                   "` or use another folder";
            return false;
        }
        if (st.st_mode & S_IWOTH) {
            *err = "the state folder " + dir + " has unsafe permissions (mode " + mode + ": anyone can write to it); "
                   "run `chmod 2770 " + dir + "` or use another folder";
            return false;
        }
        return usable_dir(dir, mode, "2770", err);
    }
    if (st.st_uid != geteuid()) {
        *err = "the state folder " + dir + " belongs to another user (uid " + std::to_string(st.st_uid) +
               "); set FRACGPU_STATE_DIR to a folder of yours, or FRACGPU_STATE_GROUP to the group it is shared "
               "with";
        return false;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        *err = "the state folder " + dir + " has unsafe permissions (mode " + mode +
               ": others can write to it); run `chmod 700 " + dir + "`, use another folder, or set "
               "FRACGPU_STATE_GROUP to the group it is meant to be shared with";
        return false;
    }
    return usable_dir(dir, mode, "700", err);
}

std::vector<std::string> region_files(const std::string &dir) {
    std::vector<std::string> out;
    DIR *d = opendir(dir.c_str());
    if (!d) return out;
    while (struct dirent *e = readdir(d)) {
        std::string n = e->d_name;
        if (n.size() > 10 && n.compare(0, 4, "gpu-") == 0 && n.compare(n.size() - 6, 6, ".state") == 0)
            out.push_back(dir + "/" + n);
    }
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

bool valid_partition_name(const std::string &name, std::string *err) {
    bool ok = !name.empty() && name.size() < kNameBytes && name[0] != '.' && name[0] != '-';
    for (char c : name) ok = ok && (isalnum((unsigned char)c) || c == '.' || c == '_' || c == '-');
    if (!ok)
        *err = "invalid partition name '" + name + "': use 1 to " + std::to_string(kNameBytes - 1) +
               " letters, digits, '.', '_' or '-', not starting with '.' or '-'";
    return ok;
}

Region::~Region() { close(); }

void Region::close() {
    if (r_) munmap(r_, size_);
    r_ = nullptr;
    size_ = 0;
}

bool Region::open_file(const std::string &path, std::string *err) {
    close();
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        *err = "cannot open the state file " + path + ": " + errno_text(errno);
        return false;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        *err = "the state file " + path + " is not a regular file; remove it";
        return false;
    }
    gid_t gid;
    bool shared = state_group(&gid, nullptr) && gid != (gid_t)-1;
    bool safe = shared ? st.st_gid == gid && !(st.st_mode & S_IWOTH)
                       : st.st_uid == geteuid() && !(st.st_mode & (S_IWGRP | S_IWOTH));
    if (!safe) {
        ::close(fd);
        *err = "the state file " + path + " has unsafe owner or permissions (others could change quotas); " +
               (shared ? "remove it, or fix it with chgrp " + std::to_string(gid) + " and chmod 660"
                       : std::string("remove it, or fix it with chown/chmod 600"));
        return false;
    }
    size_t size = (size_t)st.st_size;
    if (size < sizeof(SharedRegion::magic) + 8) {
        ::close(fd);
        *err = "the state file " + path + " is truncated or not a fracgpu state file; stop the jobs using "
               "this GPU, remove it and retry";
        return false;
    }
    void *m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (m == MAP_FAILED) {
        *err = "cannot map the state file " + path + ": " + errno_text(errno);
        return false;
    }
    auto *r = static_cast<SharedRegion *>(m);
    std::string problem;
    if (memcmp(r->magic, kMagic, sizeof kMagic) != 0)
        problem = " is not a fracgpu state file (foreign or damaged); stop the jobs using this GPU, remove it "
                  "and retry";
    else if (r->layout_version != kStateLayoutVersion)
        problem = " has state layout version " + std::to_string(r->layout_version) + " but this fracgpu uses " +
                  std::to_string(kStateLayoutVersion) + "; run one fracgpu version per GPU at a time, or stop "
                  "the jobs using it and remove the file";
    else if (r->header_size != sizeof(SharedRegion) || r->file_size != size || size < sizeof(SharedRegion))
        problem = " is truncated or of another build of fracgpu; stop the jobs using this GPU, remove it and "
                  "retry";
    if (!problem.empty()) {
        munmap(m, size);
        *err = "the state file " + path + problem;
        return false;
    }
    r_ = r;
    size_ = size;
    path_ = path;
    return true;
}

bool Region::open(const std::string &dir, const std::string &uuid, const std::string &device_name,
                  uint64_t total_memory, bool create, std::string *err) {
    if (!check_state_dir(dir, create, err)) return false;
    std::string path = file_for(dir, uuid);
    if (create && access(path.c_str(), F_OK) != 0) {
        // Build it complete under a private name, then link it into place: nobody
        // ever maps a half-made region, and of two creators one wins.
        std::string tmp = path + ".tmp." + std::to_string(getpid());
        gid_t gid;
        bool shared = state_group(&gid, nullptr);
        int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) {
            *err = "cannot create the state file " + tmp + ": " + errno_text(errno);
            return false;
        }
        if (shared) fchmod(fd, 0660);   // the group's jobs charge their memory in it (the umask is not asked)
        size_t size = sizeof(SharedRegion);
        bool ok = ftruncate(fd, (off_t)size) == 0;
        void *m = ok ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
        ::close(fd);
        if (m == MAP_FAILED) {
            unlink(tmp.c_str());
            *err = "cannot size the state file " + tmp + ": " + errno_text(errno);
            return false;
        }
        ok = init_region(static_cast<SharedRegion *>(m), size, uuid, device_name, total_memory, err);
        msync(m, size, MS_SYNC);
        munmap(m, size);
        if (ok && link(tmp.c_str(), path.c_str()) != 0 && errno != EEXIST) {
            *err = "cannot create the state file " + path + ": " + errno_text(errno);
            ok = false;
        }
        unlink(tmp.c_str());
        if (!ok) return false;
    }
    if (!open_file(path, err)) return false;
    if (uuid != r_->uuid) {
        *err = "the state file " + path + " belongs to GPU " + r_->uuid + ", not " + uuid + "; remove it";
        close();
        return false;
    }
    return true;
}

bool Region::lock(std::string *err) {
    int rc = pthread_mutex_lock(&r_->lock);
    if (rc == EOWNERDEAD) {
        // Its holder died inside. Every table change writes `in_use`/`pid`
        // last (or first when freeing), so the tables are consistent as they are.
        pthread_mutex_consistent(&r_->lock);
        return true;
    }
    if (rc != 0) {
        if (err) *err = "the shared state's lock in " + path_ + " is unusable (" + errno_text(rc) +
                        "); stop the jobs using this GPU and remove the file";
        return false;
    }
    return true;
}

void Region::unlock() { pthread_mutex_unlock(&r_->lock); }

int Region::find_partition(const std::string &name) {
    for (int i = 0; i < kMaxPartitions; i++) {
        const SharedPartition &p = r_->partitions[i];
        if (__atomic_load_n(&p.in_use, __ATOMIC_ACQUIRE) && name == p.name) return i;
    }
    return -1;
}

bool usable_memory_limit(uint64_t limit, std::string *err) {
    if (limit == 0 || limit >= kMinMemoryLimit) return true;
    *err = "memory limit " + size_str(limit) + " is too small to hold a CUDA context (a real one takes 300-600MiB); "
           "the smallest usable limit is " + size_str(kMinMemoryLimit);
    if (limit < 1024)   // a size written without its unit
        *err += " (did you mean " + std::to_string(limit) + "GiB or " + std::to_string(limit) + "MiB?)";
    return false;
}

// The promise flags a partition gets for `limit` and `share` in `flags`'s class
// beside the partitions other than `except`: each that does not fit is refused
// (false, *err naming the promises), or with `overcommit` made best effort.
static bool admit_locked(const SharedRegion &r, int except, uint64_t limit, double share, uint32_t *flags,
                         bool overcommit, const char *hint, std::string *err, const HeldOutside &outside) {
    *flags &= ~(uint32_t)(kPartitionBestEffort | kPartitionComputeBestEffort);
    if (limit && !promise_fits(r, except, limit, hint, err, outside)) {
        if (!overcommit) return false;
        *flags |= kPartitionBestEffort;   // asked for: a ceiling, not a promise
        err->clear();
    }
    if (share > 0 && !share_fits(r, except, share, priority_of_flags(*flags), hint, err)) {
        if (!overcommit) return false;
        *flags |= kPartitionComputeBestEffort;   // asked for: weighed within what the promises leave
        err->clear();
    }
    return true;
}

static bool create_locked(SharedRegion *r, int existing, const std::string &name, uint64_t limit, double share,
                          uint32_t flags, bool overcommit, const char *hint, std::string *err, int *index,
                          const HeldOutside &outside) {
    if (existing >= 0) {
        *err = "partition '" + name + "' already exists on " + r->uuid + "; remove it first with "
               "`fracgpu partition rm " + name + "`, or choose another name";
        return false;
    }
    if (!usable_memory_limit(limit, err)) return false;
    if (!admit_locked(*r, -1, limit, share, &flags, overcommit, hint, err, outside)) return false;
    for (int i = 0; i < kMaxPartitions; i++) {
        SharedPartition &p = r->partitions[i];
        if (p.in_use) continue;
        copy_name(p.name, sizeof p.name, name);
        p.flags = flags;
        p.memory_limit = limit;
        p.compute_share = share;
        p.created_unix_ns = unix_ns();
        p.used.store(0);
        p.peak.store(0);
        p.oom_refusals.store(0);
        for (auto *x : {&p.device_ns, &p.vtime_ns, &p.last_launch_ns, &p.inflight, &p.waiting_ns, &p.launches,
                        &p.cap_tokens_ns, &p.cap_refill_ns})
            x->store(0);
        for (auto &x : p.reserved) x.store(0);
        p.drift_charged.store(0);
        p.drift_peak.store(0);
        __atomic_store_n(&p.in_use, 1u, __ATOMIC_RELEASE);
        if (index) *index = i;
        return true;
    }
    *err = "GPU " + std::string(r->uuid) + " already has " + std::to_string(kMaxPartitions) +
           " partitions, the most a GPU's state holds (private ones included); remove unused ones with "
           "`fracgpu partition rm`, or wait for running jobs to end";
    return false;
}

bool reserved_partition_name(const std::string &name) {
    for (const char *prefix : {"run-", "init-", "slurm-"})
        if (name.compare(0, strlen(prefix), prefix) == 0) return true;
    return false;
}

bool Region::create_partition(const std::string &name, uint64_t memory_limit, double compute_share,
                              uint32_t flags, std::string *err, bool overcommit) {
    if (!valid_partition_name(name, err)) return false;
    if (reserved_partition_name(name)) {
        *err = "partition names starting with run-, init- or slurm- are fracgpu's own (the private partitions of "
               "`fracgpu run`, fracgpu.init() and the Slurm prolog); choose another name than '" + name + "'";
        return false;
    }
    if (!(compute_share >= 0 && compute_share <= 1)) {
        *err = "compute share " + std::to_string(compute_share) + " is not a fraction in (0, 1]";
        return false;
    }
    if ((flags & kPartitionCap) && compute_share == 0) {
        *err = "a compute cap needs a compute share: give --compute with --cap";
        return false;
    }
    if (memory_limit > r_->total_memory) {
        *err = "memory limit " + std::to_string(memory_limit) + " bytes is above the device's " +
               std::to_string(r_->total_memory) + " bytes";
        return false;
    }
    if (!lock(err)) return false;
    bool ok = create_locked(r_, find_partition(name), name, memory_limit, compute_share, flags, overcommit,
                            kOvercommitHint, err, nullptr, outside_);
    unlock();
    return ok;
}

bool Region::check_promise(const std::string &name, uint64_t memory_limit, double share, int priority,
                           std::string *err) {
    if (!memory_limit && !(share > 0)) return true;
    if (!lock(err)) return false;
    int idx = find_partition(name);
    bool ok = (!memory_limit || promise_fits(*r_, idx, memory_limit, kOvercommitHint, err, outside_)) &&
              (!(share > 0) || share_fits(*r_, idx, share, priority, kOvercommitHint, err));
    unlock();
    return ok;
}

bool Region::remove_partition(const std::string &name, std::string *err) {
    if (!lock(err)) return false;
    int idx = find_partition(name);
    bool ok = idx >= 0 || no_partition(r_, name, err);
    if (ok) {
        std::vector<int> pids;
        for (int i = 0; i < kMaxProcesses; i++) {
            SharedProcess &p = r_->processes[i];
            if (p.pid == 0 || p.partition != idx) continue;
            if (p.exited.load() || !alive(p)) free_slot_locked(i);   // the partition goes: so do held slots
            else pids.push_back(p.pid);
        }
        if (!pids.empty()) {
            std::string list;
            for (int pid : pids) list += (list.empty() ? "" : ", ") + std::to_string(pid);
            *err = "partition '" + name + "' is in use by process(es) " + list + "; stop them first";
            ok = false;
        } else {
            __atomic_store_n(&r_->partitions[idx].in_use, 0u, __ATOMIC_RELEASE);
        }
    }
    unlock();
    return ok;
}

bool Region::update_partition(const std::string &name, const uint64_t *memory_limit, const double *compute_share,
                              const bool *cap, std::string *err, bool overcommit, const int *priority) {
    if (compute_share && !(*compute_share > 0 && *compute_share <= 1)) {
        *err = "compute share " + std::to_string(*compute_share) + " is not a fraction in (0, 1]";
        return false;
    }
    if (memory_limit && *memory_limit > r_->total_memory) {
        *err = "memory limit " + std::to_string(*memory_limit) + " bytes is above the device's " +
               std::to_string(r_->total_memory) + " bytes";
        return false;
    }
    if (memory_limit && !usable_memory_limit(*memory_limit, err)) return false;
    if (!lock(err)) return false;
    int idx = find_partition(name);
    bool ok = idx >= 0 || no_partition(r_, name, err);
    if (ok) {
        SharedPartition &p = r_->partitions[idx];
        double share = compute_share ? *compute_share : share_of(p);
        uint32_t flags = p.flags;
        if (cap) flags = *cap ? (flags | kPartitionCap) : (flags & ~(uint32_t)kPartitionCap);
        if (priority) flags = (flags & ~kPartitionPriorityMask) | priority_flags(*priority);
        if ((flags & kPartitionCap) && share == 0) {
            *err = "a compute cap needs a compute share: give --compute with --cap";
            ok = false;
        } else {
            // A new limit, share or class is a new promise: it must fit beside the others, or be
            // overcommitted; what is not changed keeps the promise it holds.
            uint32_t admitted = flags;
            uint64_t limit = memory_limit ? *memory_limit : 0;
            double asked = compute_share || priority ? share : 0;
            ok = admit_locked(*r_, idx, limit, asked, &admitted, overcommit, kOvercommitHint, err, outside_);
            if (memory_limit)
                flags = (flags & ~(uint32_t)kPartitionBestEffort) | (admitted & kPartitionBestEffort);
            if (compute_share || priority)
                flags = (flags & ~(uint32_t)kPartitionComputeBestEffort) | (admitted & kPartitionComputeBestEffort);
        }
        if (ok) {
            // Lock-free charges (Region::charge) read the limit, the flags, then
            // the limit again: a limit that loses its promise is marked best
            // effort first, one that gains it gets its new size first, so a
            // charge never sees a promise with a limit that was not promised.
            bool best_effort = flags & kPartitionBestEffort;
            if (best_effort) __atomic_store_n(&p.flags, flags, __ATOMIC_RELEASE);
            if (memory_limit) __atomic_store_n(&p.memory_limit, *memory_limit, __ATOMIC_RELEASE);
            __atomic_store(&p.compute_share, &share, __ATOMIC_RELEASE);
            if (!best_effort) __atomic_store_n(&p.flags, flags, __ATOMIC_RELEASE);
        }
    }
    unlock();
    return ok;
}

// What a slot holds, memory (its books and the drift charged for it) and
// launches in flight (it will never see them complete), goes back to its
// partition.
static void give_back_locked(SharedRegion *r, SharedProcess &p) {
    if (p.partition < 0 || p.partition >= kMaxPartitions) return;
    SharedPartition &part = r->partitions[p.partition];
    saturating_sub(part.used, p.used.exchange(0));
    uint64_t drift = p.drift_charged.exchange(0);
    saturating_sub(part.used, drift);
    saturating_sub(part.drift_charged, drift);
    saturating_sub(part.inflight, p.inflight.exchange(0));
    // A partition's books move in two steps (its total, then the process's
    // share of it), and a process killed between them leaves the total with
    // bytes no process holds. With no live process left in the partition
    // nothing can be charging it (a charge needs a slot, and slots are taken
    // under this lock): its books are 0, whatever a torn step left there.
    int idx = p.partition;
    for (const SharedProcess &q : r->processes)
        if (&q != &p && __atomic_load_n(&q.pid, __ATOMIC_ACQUIRE) != 0 && q.partition == idx && !q.exited.load())
            return;
    part.used.store(0);
    part.drift_charged.store(0);
    part.inflight.store(0);
}

// A process is done with its slot (it left, or died): what it held goes back
// to the partition. While its holder lives the slot stays, marked exited, so
// that the holder can read its final counters.
void Region::release_slot_locked(int slot) {
    SharedProcess &p = r_->processes[slot];
    if (p.pid == 0) return;
    if (!holder_alive(p)) {
        free_slot_locked(slot);
        return;
    }
    if (p.exited.load()) return;   // kept already, for its holder
    give_back_locked(r_, p);
    p.exited.store(1, std::memory_order_release);
}

void Region::free_slot_locked(int slot) {
    SharedProcess &p = r_->processes[slot];
    if (p.pid == 0) return;
    give_back_locked(r_, p);
    int idx = p.partition;
    if (idx >= 0 && idx < kMaxPartitions) {
        bool others = false;
        for (int i = 0; i < kMaxProcesses; i++)
            if (i != slot && r_->processes[i].pid != 0 && r_->processes[i].partition == idx) others = true;
        SharedPartition &part = r_->partitions[idx];
        if (!others && (part.flags & kPartitionEphemeral)) __atomic_store_n(&part.in_use, 0u, __ATOMIC_RELEASE);
    }
    p.exited.store(0);
    p.holder.store(0);
    __atomic_store_n(&p.pid, 0, __ATOMIC_RELEASE);
}

// Dead processes' slots released (exited ones whose holder is gone, freed); count.
//
// Every process that starts or looks for dead jobs sweeps, and a full check
// reads /proc: under the lock that made a start with n processes on the GPU
// hold it for n reads, and n processes starting together wait O(n^2). So the
// checks are made first, without the lock, and the lock is taken only when
// one is dead. Death is final (a slot names its process by pid and start
// time), so a slot found dead is released if it still names the same
// process (and, when it was kept for a holder, the same holder).
//
// `quick` (a process starting): a process counts as dead only when its pid
// is gone (kill(pid, 0), no /proc read). A pid reused since is left to the
// full sweeps: of reap(), which every over-quota allocation, the memory
// queries and the recorders make.
static bool slot_dead(const SharedProcess &p, bool exited, bool quick, const std::vector<Visible> *visible) {
    if (visible && !judged_here(p)) {   // another namespace's, judged by what the host sees
        uint64_t ns = __atomic_load_n(&p.pid_ns, __ATOMIC_RELAXED);
        if (!exited) return find_visible(*visible, ns, p.pid, p.start_time) == 0;
        uint64_t h = p.holder.load();
        return h == 0 || h > (uint64_t)INT32_MAX || find_visible(*visible, ns, (int)h, p.holder_start.load()) == 0;
    }
    if (!quick) return exited ? !holder_alive(p) : !alive(p);
    uint64_t holder = p.holder.load();
    int pid = exited ? (int)holder : p.pid;
    if (exited && (holder == 0 || holder > (uint64_t)INT32_MAX)) return true;
    return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

int Region::sweep(bool quick, bool all_namespaces) {
    std::vector<Visible> visible;
    if (all_namespaces) visible = visible_processes();
    struct Dead {
        int slot;
        int32_t pid;
        uint64_t start_time, holder;
        bool exited;
    };
    Dead dead[kMaxProcesses];
    int found = 0;
    for (int i = 0; i < kMaxProcesses; i++) {
        SharedProcess &p = r_->processes[i];
        int32_t pid = __atomic_load_n(&p.pid, __ATOMIC_ACQUIRE);
        if (pid == 0) continue;
        bool exited = p.exited.load() != 0;
        Dead d{i, pid, __atomic_load_n(&p.start_time, __ATOMIC_RELAXED), p.holder.load(), exited};
        if (__atomic_load_n(&p.pid, __ATOMIC_ACQUIRE) != pid) continue;   // the slot changed hands meanwhile
        if (slot_dead(p, exited, quick, all_namespaces ? &visible : nullptr)) dead[found++] = d;
    }
    if (found == 0 || !lock(nullptr)) return 0;
    int n = 0;
    for (int k = 0; k < found; k++) {
        const Dead &d = dead[k];
        SharedProcess &p = r_->processes[d.slot];
        if (p.pid != d.pid || p.start_time != d.start_time || (p.exited.load() != 0) != d.exited ||
            p.holder.load() != d.holder)
            continue;   // released by another, or reused since
        // A slot of another namespace found dead goes at once: its holder,
        // if any, is judged there too, and release_slot_locked() cannot.
        if (!judged_here(p)) free_slot_locked(d.slot);
        else release_slot_locked(d.slot);
        n++;
    }
    unlock();
    return n;
}

// Whether private partition `p` is the one a job asking for `limit`, `share`
// and `flags` (cap, class) makes: the partition its first process made, which
// the job's later processes join. A partition made another way is never joined.
static bool made_for(const SharedPartition &p, uint64_t limit, double share, uint32_t flags) {
    constexpr uint32_t kAsked = kPartitionCap | kPartitionPriorityMask;
    uint32_t have = flags_of(p);
    return (have & kPartitionEphemeral) && memory_limit_of(p) == limit && share_of(p) == share &&
           (have & kAsked) == (flags & kAsked);
}

int Region::join(const std::string &name, int pid, const char *command, const uint64_t *create_limit,
                 std::string *err, double create_share, uint32_t create_flags, int holder, bool overcommit) {
    if (!valid_partition_name(name, err)) return -1;
    if (create_limit && *create_limit > r_->total_memory) {
        *err = "memory limit of " + std::to_string(*create_limit) + " bytes is above the device's " +
               std::to_string(r_->total_memory) + " bytes (" + r_->uuid + ")";
        return -1;
    }
    // What needs /proc is read before the lock: the lock is held only for the tables. A
    // start looks for dead processes by pid alone, unless it makes a partition (a dead job's
    // promise must not stand in its way) or finds the table full.
    int taken = 0;
    for (const auto &p : r_->processes) taken += __atomic_load_n(&p.pid, __ATOMIC_ACQUIRE) != 0;
    sweep(/*quick=*/!(create_limit && find_partition(name) < 0) && taken < kMaxProcesses);
    uint64_t start_time = process_start_time(pid);
    uint64_t holder_start = holder > 0 ? process_start_time(holder) : 0;
    uint64_t asked = mono_ns();
    if (!lock(err)) return -1;
    uint64_t waited = mono_ns() - asked;
    int slot = -1;
    int idx = find_partition(name);
    if (idx >= 0 && create_limit && !made_for(r_->partitions[idx], *create_limit, create_share, create_flags)) {
        *err = "partition '" + name + "' on GPU " + std::string(r_->uuid) + " was not made for this job (it is " +
               ((flags_of(r_->partitions[idx]) & kPartitionEphemeral) ? "another job's private partition, with "
                                                                        "other settings"
                                                                      : "made with `fracgpu partition create`") +
               "); a private job never joins a partition it did not make";
        idx = -2;
    } else if (idx < 0 && create_limit) {
        if (!create_locked(r_, -1, name, *create_limit, create_share, kPartitionEphemeral | create_flags, overcommit,
                           "pass --overcommit to fracgpu run (FRACGPU_OVERCOMMIT=1)", err, &idx, outside_))
            idx = -2;
    } else if (idx < 0) {
        *err = "partition '" + name + "' does not exist on GPU " + std::string(r_->uuid) +
               "; create it with `fracgpu partition create " + name + " --memory SIZE`";
    }
    if (idx >= 0) {
        for (int i = 0; i < kMaxProcesses && slot < 0; i++) {
            SharedProcess &p = r_->processes[i];
            if (p.pid != 0) continue;
            p.partition = idx;
            p.start_time = start_time;
            p.pid_ns = own_pid_namespace();   // the namespace `pid` and `holder` are counted in
            p.attached_unix_ns = unix_ns();
            copy_name(p.command, sizeof p.command, command ? command : "");
            p.used.store(0);
            p.peak.store(0);
            p.device_ns.store(0);
            p.launches.store(0);
            p.inflight.store(0);
            p.join_wait_ns.store(waited);
            p.measure_wait_ns.store(0);
            for (auto *x : {&p.truth, &p.device_used, &p.drift, &p.drift_charged, &p.reconciled_unix_ns}) x->store(0);
            p.holder.store(holder_start ? (uint64_t)holder : 0);
            p.holder_start.store(holder_start);
            p.exited.store(0);
            __atomic_store_n(&p.pid, pid, __ATOMIC_RELEASE);
            slot = i;
        }
        if (slot < 0)
            *err = "GPU " + std::string(r_->uuid) + " already has " + std::to_string(kMaxProcesses) +
                   " processes using fracgpu";
    }
    unlock();
    return slot;
}

void Region::leave(int slot) {
    if (slot < 0 || slot >= kMaxProcesses) return;
    if (!lock(nullptr)) return;
    release_slot_locked(slot);
    unlock();
}

void Region::end_launches(int slot) {
    if (!r_ || slot < 0 || slot >= kMaxProcesses) return;
    SharedProcess &p = r_->processes[slot];
    if (p.partition < 0 || p.partition >= kMaxPartitions) return;
    saturating_sub(r_->partitions[p.partition].inflight, p.inflight.exchange(0));
}

int Region::reap(bool quick) { return sweep(quick); }

int Region::reap_all_namespaces() { return sweep(false, own_pid_namespace() == kInitialPidNamespace); }

int Region::collect(int holder, int slot) {
    if (holder <= 0 || !lock(nullptr)) return 0;
    int n = 0;
    for (int i = 0; i < kMaxProcesses; i++) {
        SharedProcess &p = r_->processes[i];
        if ((slot < 0 || i == slot) && p.pid != 0 && p.exited.load() && p.holder.load() == (uint64_t)holder) {
            free_slot_locked(i);
            n++;
        }
    }
    unlock();
    return n;
}

bool Region::charge(int slot, uint64_t bytes) {
    SharedProcess &p = r_->processes[slot];
    SharedPartition &part = r_->partitions[p.partition];
    uint64_t limit;   // the limit and flags may change while jobs run (see update_partition)
    uint32_t flags;
    do {
        limit = memory_limit_of(part);
        flags = flags_of(part);
    } while (limit != memory_limit_of(part));
    bool promised = limit && !(flags & kPartitionBestEffort);
    if (!promised && !lock(nullptr)) return false;
    if (!promised) {
        limit = memory_limit_of(part);   // under the lock: as the last change left it
        // Only what nobody was promised, less what the others without a promise hold.
        Taken t = taken_by_others(*r_, p.partition);
        uint64_t left = t.total() < r_->total_memory ? r_->total_memory - t.total() : 0;
        limit = limit && limit < left ? limit : left;
    }
    uint64_t cur = part.used.load(std::memory_order_relaxed);
    bool ok = true;
    do {
        if (bytes > limit || cur > limit - bytes) {
            ok = false;
            break;
        }
    } while (!part.used.compare_exchange_weak(cur, cur + bytes, std::memory_order_acq_rel));
    if (!promised) unlock();
    if (!ok) return false;
    raise_peak(part.peak, cur + bytes);
    raise_peak(p.peak, p.used.fetch_add(bytes, std::memory_order_acq_rel) + bytes);
    return true;
}

void Region::note_refusal(int slot) {
    r_->partitions[r_->processes[slot].partition].oom_refusals.fetch_add(1, std::memory_order_relaxed);
}

bool Region::adopt(int slot, int pid, uint64_t start_time, int holder, int previous) {
    uint64_t holder_start = holder > 0 ? process_start_time(holder) : 0;
    if (slot < 0 || slot >= kMaxProcesses || holder_start == 0 || !lock(nullptr)) return false;
    SharedProcess &p = r_->processes[slot];
    uint64_t now = p.holder.load();
    bool ok = __atomic_load_n(&p.pid, __ATOMIC_ACQUIRE) == pid && p.start_time == start_time && !p.exited.load() &&
              (now == 0 || now == (uint64_t)holder || (previous > 0 && now == (uint64_t)previous));
    if (ok) {
        p.holder_start.store(holder_start);
        p.holder.store((uint64_t)holder, std::memory_order_release);
    }
    unlock();
    return ok;
}

uint64_t Region::reconcile(int slot, int pid, bool listed, uint64_t device_used, uint64_t books) {
    if (slot < 0 || slot >= kMaxProcesses || !lock(nullptr)) return 0;
    SharedProcess &p = r_->processes[slot];
    uint64_t charged = 0;
    // A process in a container cannot find itself in the device's list (NVML
    // names host pids), but the node agent, in the host's namespace, can: a
    // figure it took recently stands over the process's own "not listed".
    bool keep = !listed && p.truth.load(std::memory_order_acquire) == kTruthKnown &&
                unix_ns() - p.reconciled_unix_ns.load() < kForeignFigureFresh_ns;
    if (keep) {
        charged = p.drift_charged.load();
    } else if (__atomic_load_n(&p.pid, __ATOMIC_ACQUIRE) == pid && !p.exited.load() && p.partition >= 0 &&
        p.partition < kMaxPartitions) {
        SharedPartition &part = r_->partitions[p.partition];
        int64_t drift = (int64_t)device_used - (int64_t)books;
        charged = listed && drift > 0 ? (uint64_t)drift : 0;
        uint64_t before = p.drift_charged.exchange(charged);
        if (charged > before) {
            raise_peak(part.peak, part.used.fetch_add(charged - before) + (charged - before));
            raise_peak(part.drift_peak, part.drift_charged.fetch_add(charged - before) + (charged - before));
        } else if (before > charged) {
            saturating_sub(part.used, before - charged);
            saturating_sub(part.drift_charged, before - charged);
        }
        p.device_used.store(listed ? device_used : 0);
        p.drift.store(listed ? (uint64_t)drift : 0);
        p.reconciled_unix_ns.store(unix_ns());
        p.truth.store(listed ? kTruthKnown : kTruthUnknown, std::memory_order_release);
    }
    unlock();
    return charged;
}

void Region::uncharge(int slot, uint64_t bytes) {
    SharedProcess &p = r_->processes[slot];
    saturating_sub(p.used, bytes);
    saturating_sub(r_->partitions[p.partition].used, bytes);
}

std::vector<PartitionInfo> Region::partitions() {
    std::vector<PartitionInfo> out;
    for (int i = 0; i < kMaxPartitions; i++) {
        SharedPartition &p = r_->partitions[i];
        if (!__atomic_load_n(&p.in_use, __ATOMIC_ACQUIRE)) continue;
        PartitionInfo info;
        info.name = std::string(p.name, strnlen(p.name, sizeof p.name));
        info.flags = flags_of(p);
        info.memory_limit = memory_limit_of(p);
        info.memory_ceiling = memory_ceiling(*r_, i);
        info.used = p.used.load();
        info.peak = p.peak.load();
        info.oom_refusals = p.oom_refusals.load();
        info.compute_share = share_of(p);
        info.created_unix_ns = p.created_unix_ns;
        info.device_ns = p.device_ns.load();
        info.launches = p.launches.load();
        info.drift_charged = p.drift_charged.load();
        info.drift_peak = p.drift_peak.load();
        for (auto &proc : r_->processes)
            if (__atomic_load_n(&proc.pid, __ATOMIC_ACQUIRE) != 0 && proc.partition == i && !proc.exited.load()) {
                info.processes++;
                uint64_t truth = proc.truth.load(std::memory_order_acquire);
                if (truth == kTruthKnown) info.drift += (int64_t)proc.drift.load();
                if (truth == kTruthUnknown) info.drift_unknown++;
            }
        out.push_back(std::move(info));
    }
    return out;
}

std::vector<ProcessInfo> Region::processes() {
    std::vector<ProcessInfo> out;
    for (int i = 0; i < kMaxProcesses; i++) {
        SharedProcess &p = r_->processes[i];
        int pid = __atomic_load_n(&p.pid, __ATOMIC_ACQUIRE);
        if (pid == 0 || p.partition < 0 || p.partition >= kMaxPartitions) continue;
        ProcessInfo info;
        info.slot = i;
        info.pid = pid;
        info.pid_ns = __atomic_load_n(&p.pid_ns, __ATOMIC_RELAXED);
        const SharedPartition &part = r_->partitions[p.partition];
        info.partition = std::string(part.name, strnlen(part.name, sizeof part.name));
        info.command = std::string(p.command, strnlen(p.command, sizeof p.command));
        info.used = p.used.load();
        info.peak = p.peak.load();
        info.start_time = p.start_time;
        info.attached_unix_ns = p.attached_unix_ns;
        info.device_ns = p.device_ns.load();
        info.launches = p.launches.load();
        info.holder = (int)p.holder.load();
        info.exited = p.exited.load() != 0;
        info.truth = p.truth.load(std::memory_order_acquire);
        info.device_used = p.device_used.load();
        info.drift = (int64_t)p.drift.load();
        info.drift_charged = p.drift_charged.load();
        info.join_wait_ns = p.join_wait_ns.load();
        info.measure_wait_ns = p.measure_wait_ns.load();
        out.push_back(std::move(info));
    }
    return out;
}

}  // namespace fracgpu
