// The shared file of one simulated GPU.
//
// Every process that uses the simulated GPU maps the same file, so what one
// process allocates the others see missing from cuMemGetInfo, and all their
// kernels are placed on one device timeline (busy_until per device, advanced
// with compare-and-swap: no lock on the launch path).
//
// The file name carries a hash of the configuration, so a GPU of another size
// is another file: two configurations never fight over one region. It is
// created complete under a temporary name and linked into place, so nobody
// ever maps a half-initialised file. Memory use is kept per process slot
// (pid + start time) under a robust process-shared mutex; the device total is
// the sum over live slots, so a process killed at any moment, even holding the
// lock, leaves nothing behind: its slot is reaped by whoever looks next.
//
// Pid namespaces. A process in a container knows only its pid in its own
// namespace, so a slot also holds the inode of that namespace
// (/proc/self/ns/pid). A real driver knows every process by its pid in the
// host's namespace, and NVML lists those pids even to a caller inside a
// container. Here the "driver's namespace" is the one the GPU file was made
// from (the init namespace once any process of it attaches): a caller there
// sees every slot mapped to its pid there, found through /proc/<pid>/ns/pid
// and the last NSpid of /proc/<pid>/status; a caller elsewhere sees only the
// slots made in the driver's namespace (the pids it would get from a real
// NVML for the others mean nothing to it, and it cannot compute them). A slot
// is reaped only by a process that can see its namespace (its own, or one
// below): a process in a container never takes a host process, or another
// container's, for dead. A container's dead process is therefore given back
// once a process of the driver's namespace looks (the node agent, any host
// job), never earlier than a real driver would.
#include "sim.h"
#include "fracgpu/settings.h"
#include "fracgpu/os.h"

#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sim {

namespace {

constexpr char kMagic[8] = {'F', 'G', 'S', 'I', 'M', 'G', 'P', 'U'};
// 2: a slot records its pid namespace (a build of layout 1 would take a
// container's process for dead from the host).
constexpr uint32_t kLayoutVersion = 2;
constexpr int kMaxProcs = 256;
// The inode of the initial pid namespace (the kernel's PROC_PID_INIT_INO).
constexpr uint32_t kInitPidNs = 0xEFFFFFFCu;

struct SharedDevice {
    uint64_t busy_until;      // device timeline: end of the last placed kernel (atomic)
    uint64_t kernels;         // kernels placed (atomic, statistics)
    uint64_t busy_ns;         // device time placed (atomic, statistics)
    uint8_t uuid[16];
};

struct SharedProc {
    int32_t pid;              // 0: free; its pid in its own namespace
    uint32_t pid_ns;          // inode of its pid namespace (/proc/self/ns/pid); 0: not known
    uint64_t start_time;      // /proc/<pid>/stat field 22, so a reused pid is not this process
    uint64_t used[kMaxDevices];
};

struct SharedRegion {
    char magic[8];
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t file_size;
    uint64_t memory;
    uint64_t context_memory;
    int32_t sms;
    int32_t devices;
    char name[256];
    uint32_t driver_pid_ns;   // the namespace whose pids NVML answers (see the top of this file)
    uint32_t pad;
    pthread_mutex_t lock;
    SharedDevice dev[kMaxDevices];
    SharedProc procs[kMaxProcs];
};

SharedRegion *g_region = nullptr;
int g_slot = -1;
pid_t g_owner_pid = 0;
uint32_t g_pid_ns = 0;        // this process's pid namespace (read at attach)

uint64_t fnv1a(const void *data, size_t n, uint64_t h = 1469598103934665603ull) {
    const unsigned char *p = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

// /proc/<who>/<file> into buf (NUL-terminated, at most n - 1 bytes); false when unreadable.
bool read_proc(const char *who, const char *file, char *buf, size_t n) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/%s", who, file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    ssize_t got = read(fd, buf, n - 1);
    close(fd);
    if (got <= 0) return false;
    buf[got] = 0;
    return true;
}

// Start time of a process in clock ticks since boot; 0 if it is gone or a zombie
// (a zombie holds no GPU memory: the driver releases it at exit).
uint64_t process_start_time(pid_t pid) {
    char who[16], buf[1024];
    snprintf(who, sizeof who, "%d", (int)pid);
    if (!read_proc(who, "stat", buf, sizeof buf)) return 0;
    const char *p = strrchr(buf, ')');  // the command name may hold spaces and parens
    if (!p) return 0;
    p += 2;                              // state
    if (*p == 'Z' || *p == 'X') return 0;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p) return 0;
        p++;
    }
    return strtoull(p, nullptr, 10);
}

// The inode of the pid namespace of /proc/<who> ("self" or a pid); 0 when unreadable.
uint32_t pid_ns_of(const char *who) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/ns/pid", who);
    struct stat st;
    return stat(path, &st) == 0 ? (uint32_t)st.st_ino : 0;
}

// The pid of /proc/<who> in its own (innermost) namespace: the last NSpid field.
int32_t innermost_pid(const char *who) {
    char buf[4096];
    if (!read_proc(who, "status", buf, sizeof buf)) return 0;
    const char *line = strstr(buf, "\nNSpid:");
    if (!line) return 0;
    const char *end = strchr(line + 1, '\n');
    int32_t last = 0;
    for (const char *p = line + 7; *p && p != end;) {
        char *next;
        long v = strtol(p, &next, 10);
        if (next == p) break;
        last = (int32_t)v;
        p = next;
    }
    return last;
}

// The processes of other pid namespaces this process can see, read from /proc
// once per look at the slots (and only when a slot of another namespace exists).
struct ForeignView {
    struct Entry {
        uint32_t ns;
        int32_t inner_pid, pid;   // its pid in its namespace, and in ours
    };
    bool read = false;
    Entry entries[kMaxProcs * 4];
    int n = 0;

    void load() {
        read = true;
        DIR *d = opendir("/proc");
        if (!d) return;
        while (struct dirent *e = readdir(d)) {
            if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
            uint32_t ns = pid_ns_of(e->d_name);
            if (ns == 0 || ns == g_pid_ns) continue;
            int32_t inner = innermost_pid(e->d_name);
            if (inner <= 0 || n == (int)(sizeof entries / sizeof entries[0])) continue;
            entries[n++] = {ns, inner, (int32_t)atoi(e->d_name)};
        }
        closedir(d);
    }
};

enum class Seen { kDead, kAlive, kCannotTell };

// Whether slot `s` is a live process, and its pid in this process's namespace.
Seen look_at(const SharedProc &s, ForeignView &view, int32_t *pid_here) {
    *pid_here = 0;
    if (s.pid == 0) return Seen::kDead;
    if (s.pid_ns == 0 || s.pid_ns == g_pid_ns) {
        if (kill(s.pid, 0) != 0 && errno == ESRCH) return Seen::kDead;
        if (process_start_time(s.pid) != s.start_time) return Seen::kDead;
        *pid_here = s.pid;
        return Seen::kAlive;
    }
    if (!view.read) view.load();
    bool ns_seen = false;
    for (int i = 0; i < view.n; i++) {
        const ForeignView::Entry &e = view.entries[i];
        if (e.ns != s.pid_ns) continue;
        ns_seen = true;
        if (e.inner_pid == s.pid && process_start_time(e.pid) == s.start_time) {
            *pid_here = e.pid;
            return Seen::kAlive;
        }
    }
    // Its namespace has processes we see, or we see every namespace (the
    // initial one): it is gone. Else it lives where we cannot look.
    return ns_seen || g_pid_ns == kInitPidNs ? Seen::kDead : Seen::kCannotTell;
}

class RegionLock {
  public:
    RegionLock() {
        int rc = pthread_mutex_lock(&g_region->lock);
        if (rc == EOWNERDEAD) {
            // The holder died inside. Everything under the lock is per-slot and
            // derived, so the state is consistent as it stands.
            pthread_mutex_consistent(&g_region->lock);
        } else if (rc != 0) {
            warn("the simulated GPU's lock is unusable (%s); delete %s to reset it", strerror(rc),
                 g_cfg.dir.c_str());
            abort();
        }
    }
    ~RegionLock() { pthread_mutex_unlock(&g_region->lock); }
};

void reap_locked() {
    ForeignView view;
    int32_t pid_here;
    for (int i = 0; i < kMaxProcs; i++) {
        SharedProc &s = g_region->procs[i];
        if (s.pid != 0 && i != g_slot && look_at(s, view, &pid_here) == Seen::kDead) memset(&s, 0, sizeof s);
    }
}

uint64_t used_locked(int phys) {
    uint64_t sum = 0;
    for (int i = 0; i < kMaxProcs; i++)
        if (g_region->procs[i].pid != 0) sum += g_region->procs[i].used[phys];
    return sum;
}

// Setting `id` (set: its value is `text`), a whole number in [lo, hi].
bool parse_u64(fracgpu_setting_id id, const char *text, uint64_t lo, uint64_t hi, uint64_t *out) {
    // Plain decimal with an optional binary unit; the CLI writes plain bytes.
    char *end = nullptr;
    errno = 0;
    if (!text || !*text || *text == '-') goto bad;
    {
        unsigned long long v = strtoull(text, &end, 10);
        if (errno || end == text) goto bad;
        uint64_t mul = 1;
        if (!strcasecmp(end, "") || !strcasecmp(end, "B")) mul = 1;
        else if (!strcasecmp(end, "K") || !strcasecmp(end, "KiB")) mul = 1ull << 10;
        else if (!strcasecmp(end, "M") || !strcasecmp(end, "MiB")) mul = 1ull << 20;
        else if (!strcasecmp(end, "G") || !strcasecmp(end, "GiB")) mul = 1ull << 30;
        else if (!strcasecmp(end, "T") || !strcasecmp(end, "TiB")) mul = 1ull << 40;
        else goto bad;
        if (v > hi / mul || v * mul < lo) goto bad;
        *out = v * mul;
        return true;
    }
bad:
    warn("%s='%s' is not valid: give a whole number from %" PRIu64 " to %" PRIu64
         " (bytes, or with K/M/G/T), or use `fracgpu sim env` to write the settings",
         fracgpu_setting_name(id), text ? text : "", lo, hi);
    return false;
}

CUresult make_dir(const std::string &dir) {
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
        warn("cannot create the simulated GPU's folder %s: %s", dir.c_str(), strerror(errno));
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    struct stat st;
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
        warn("%s is not a folder; set FRACGPU_SIM_DIR to a folder of yours", dir.c_str());
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (st.st_uid != geteuid() && !(st.st_mode & S_ISVTX)) {
        warn("the simulated GPU's folder %s belongs to another user; set FRACGPU_SIM_DIR to a folder of yours",
             dir.c_str());
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    return CUDA_SUCCESS;
}

CUresult init_region(SharedRegion *r, const Config &cfg, const std::string &dir, size_t size) {
    memset(r, 0, size);
    memcpy(r->magic, kMagic, sizeof kMagic);
    r->layout_version = kLayoutVersion;
    r->header_size = sizeof(SharedRegion);
    r->file_size = size;
    r->memory = cfg.memory;
    r->context_memory = cfg.context_memory;
    r->sms = cfg.sms;
    r->devices = cfg.devices;
    r->driver_pid_ns = pid_ns_of("self");
    snprintf(r->name, sizeof r->name, "%s", cfg.name.c_str());
    int rc = fracgpu::init_shared_mutex(&r->lock);
    if (rc != 0) return CUDA_ERROR_OPERATING_SYSTEM;
    // A stable identity per (folder, configuration, index): the same simulated
    // GPU keeps its UUID across runs, another folder is another GPU.
    for (int d = 0; d < cfg.devices; d++) {
        uint64_t h1 = fnv1a(dir.data(), dir.size(), fnv1a(&d, sizeof d, 0x9e3779b97f4a7c15ull));
        h1 = fnv1a(r->name, strlen(r->name), fnv1a(&cfg.memory, sizeof cfg.memory, h1));
        uint64_t h2 = fnv1a(&h1, sizeof h1, 0x243f6a8885a308d3ull);
        memcpy(r->dev[d].uuid, &h1, 8);
        memcpy(r->dev[d].uuid + 8, &h2, 8);
        r->dev[d].uuid[6] = (r->dev[d].uuid[6] & 0x0f) | 0x40;   // RFC 4122 version 4 shape
        r->dev[d].uuid[8] = (r->dev[d].uuid[8] & 0x3f) | 0x80;
    }
    return CUDA_SUCCESS;
}

CUresult validate_region(const SharedRegion *r, size_t file_size, const char *path) {
    if (file_size < sizeof(r->magic) + 8 || memcmp(r->magic, kMagic, sizeof kMagic) != 0) {
        warn("%s is not a simulated GPU file (truncated or foreign); remove it and retry", path);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (r->layout_version != kLayoutVersion) {
        warn("%s has layout version %u, this simulator uses %u; stop the processes using it, "
             "remove it and retry", path, r->layout_version, kLayoutVersion);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (r->header_size != sizeof(SharedRegion) || r->file_size != file_size ||
        file_size < sizeof(SharedRegion)) {
        warn("%s is truncated or of another build; remove it and retry", path);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    return CUDA_SUCCESS;
}

}  // namespace

uint64_t now_ns() { return fracgpu::mono_ns(); }

void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fracgpu::print_line("fracgpu-sim", fmt, ap);
    va_end(ap);
}

CUresult load_config(Config &cfg) {
    cfg = Config();
    const char *v;
    uint64_t x;
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_MEMORY))) {
        if (!parse_u64(FRACGPU_SETTING_SIM_MEMORY, v, 1, 64ull << 40, &x)) return CUDA_ERROR_INVALID_VALUE;
        cfg.memory = x;
    }
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_SMS))) {
        if (!parse_u64(FRACGPU_SETTING_SIM_SMS, v, 1, 1024, &x)) return CUDA_ERROR_INVALID_VALUE;
        cfg.sms = (int)x;
    }
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_DEVICES))) {
        if (!parse_u64(FRACGPU_SETTING_SIM_DEVICES, v, 1, kMaxDevices, &x)) return CUDA_ERROR_INVALID_VALUE;
        cfg.devices = (int)x;
    }
    // Each context reserves memory, as a real one does (kContextShare).
    cfg.context_memory = cfg.memory / kContextShare;
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_CONTEXT_MEMORY))) {
        if (!parse_u64(FRACGPU_SETTING_SIM_CONTEXT_MEMORY, v, 0, cfg.memory - 1, &x))
            return CUDA_ERROR_INVALID_VALUE;
        cfg.context_memory = x;
    }
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_NAME))) {
        if (strlen(v) > 200) {
            warn("FRACGPU_SIM_NAME is longer than 200 characters");
            return CUDA_ERROR_INVALID_VALUE;
        }
        cfg.name = v;
    }
    if ((v = fracgpu_setting(FRACGPU_SETTING_SIM_DIR))) {
        cfg.dir = v;
    } else {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        struct stat st;
        if (xdg && *xdg && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid())
            cfg.dir = std::string(xdg) + "/fracgpu-sim";
        else
            cfg.dir = "/tmp/fracgpu-sim-" + std::to_string((unsigned)geteuid());
    }
    return CUDA_SUCCESS;
}

CUresult shared_attach(const Config &cfg) {
    CUresult rc = make_dir(cfg.dir);
    if (rc != CUDA_SUCCESS) return rc;
    uint64_t key = fnv1a(&kLayoutVersion, sizeof kLayoutVersion);
    key = fnv1a(&cfg.memory, sizeof cfg.memory, key);
    key = fnv1a(&cfg.sms, sizeof cfg.sms, key);
    key = fnv1a(&cfg.devices, sizeof cfg.devices, key);
    key = fnv1a(&cfg.context_memory, sizeof cfg.context_memory, key);
    key = fnv1a(cfg.name.data(), cfg.name.size(), key);
    char path[4096];
    snprintf(path, sizeof path, "%s/gpu-%016" PRIx64 ".sim", cfg.dir.c_str(), key);
    const size_t size = (sizeof(SharedRegion) + 4095) & ~(size_t)4095;

    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ENOENT) {
        // Build the file complete under a private name, then link it into place.
        char tmp[4200];
        snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
        int tfd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (tfd < 0) {
            warn("cannot create %s: %s", tmp, strerror(errno));
            return CUDA_ERROR_OPERATING_SYSTEM;
        }
        void *m = MAP_FAILED;
        if (ftruncate(tfd, (off_t)size) == 0)
            m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, tfd, 0);
        if (m == MAP_FAILED || init_region(static_cast<SharedRegion *>(m), cfg, cfg.dir, size) != CUDA_SUCCESS) {
            warn("cannot initialise %s: %s", tmp, strerror(errno));
            if (m != MAP_FAILED) munmap(m, size);
            close(tfd);
            unlink(tmp);
            return CUDA_ERROR_OPERATING_SYSTEM;
        }
        munmap(m, size);
        close(tfd);
        if (link(tmp, path) != 0 && errno != EEXIST) {
            warn("cannot create %s: %s", path, strerror(errno));
            unlink(tmp);
            return CUDA_ERROR_OPERATING_SYSTEM;
        }
        unlink(tmp);
        fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    }
    if (fd < 0) {
        warn("cannot open %s: %s", path, strerror(errno));
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        warn("%s is not a regular file; remove it and retry", path);
        close(fd);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (st.st_uid != geteuid() || (st.st_mode & 0022)) {
        warn("%s belongs to another user or is writable by others; refusing to use it", path);
        close(fd);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if ((size_t)st.st_size < sizeof(SharedRegion::magic) + 8) {
        warn("%s is truncated; remove it and retry", path);
        close(fd);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    void *m = mmap(nullptr, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        warn("cannot map %s: %s", path, strerror(errno));
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    rc = validate_region(static_cast<SharedRegion *>(m), (size_t)st.st_size, path);
    if (rc != CUDA_SUCCESS) {
        munmap(m, (size_t)st.st_size);
        return rc;
    }
    g_region = static_cast<SharedRegion *>(m);

    g_pid_ns = pid_ns_of("self");
    RegionLock lock;
    if (g_pid_ns == kInitPidNs) g_region->driver_pid_ns = kInitPidNs;   // the outermost there is
    reap_locked();
    for (int i = 0; i < kMaxProcs; i++) {
        if (g_region->procs[i].pid == 0) {
            SharedProc &s = g_region->procs[i];
            memset(&s, 0, sizeof s);
            s.start_time = process_start_time(getpid());
            s.pid_ns = g_pid_ns;
            s.pid = getpid();
            g_slot = i;
            g_owner_pid = getpid();
            return CUDA_SUCCESS;
        }
    }
    warn("more than %d processes use the simulated GPU at once", kMaxProcs);
    return CUDA_ERROR_OPERATING_SYSTEM;
}

void shared_detach() {
    // At exit, and in a forked child (which must not release its parent's slot).
    if (!g_region || g_slot < 0) return;
    if (getpid() == g_owner_pid) {
        RegionLock lock;
        memset(&g_region->procs[g_slot], 0, sizeof(SharedProc));
    }
    g_slot = -1;
}

const CUuuid &device_uuid(int phys) {
    return *reinterpret_cast<const CUuuid *>(g_region->dev[phys].uuid);
}

bool mem_charge(int phys, uint64_t bytes) {
    RegionLock lock;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t used = used_locked(phys);
        if (used <= g_region->memory && bytes <= g_region->memory - used) {
            g_region->procs[g_slot].used[phys] += bytes;
            return true;
        }
        reap_locked();   // a dead process may still hold what we need
    }
    return false;
}

void mem_uncharge(int phys, uint64_t bytes) {
    RegionLock lock;
    uint64_t &u = g_region->procs[g_slot].used[phys];
    u = bytes > u ? 0 : u - bytes;
}

uint64_t mem_used(int phys) {
    RegionLock lock;
    reap_locked();
    return used_locked(phys);
}

int mem_processes(int phys, unsigned *pids, unsigned long long *used, unsigned cap) {
    // Pids as a real NVML gives them: in the driver's namespace (see the top of
    // this file). A process can hold two slots (one attached for NVML before
    // cuInit, one by cuInit): its entries are summed into one, as the device
    // sees one process.
    RegionLock lock;
    reap_locked();
    const bool in_driver_ns = g_pid_ns == g_region->driver_pid_ns;
    ForeignView view;
    int n = 0;
    for (int i = 0; i < kMaxProcs; i++) {
        const SharedProc &s = g_region->procs[i];
        if (s.pid == 0 || s.used[phys] == 0) continue;
        int32_t pid;
        if (in_driver_ns) {
            if (look_at(s, view, &pid) != Seen::kAlive) continue;
        } else {
            if (s.pid_ns != g_region->driver_pid_ns) continue;
            pid = s.pid;
        }
        int k = 0;
        while (k < n && (unsigned)k < cap && pids[k] != (unsigned)pid) k++;
        if (k < n && (unsigned)k < cap) {
            used[k] += s.used[phys];
            continue;
        }
        if ((unsigned)n < cap) {
            pids[n] = (unsigned)pid;
            used[n] = s.used[phys];
        }
        n++;
    }
    return n;
}

uint64_t timeline_reserve(int phys, uint64_t not_before, uint64_t dur) {
    SharedDevice &d = g_region->dev[phys];
    uint64_t cur = __atomic_load_n(&d.busy_until, __ATOMIC_ACQUIRE);
    uint64_t start;
    do {
        start = cur > not_before ? cur : not_before;
    } while (!__atomic_compare_exchange_n(&d.busy_until, &cur, start + dur, false, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    __atomic_add_fetch(&d.kernels, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&d.busy_ns, dur, __ATOMIC_RELAXED);
    return start;
}

}  // namespace sim
