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
// Processes in containers have pids of their own pid namespace, which collide
// (two containers both have a pid 1). A slot records its pid namespace, and a
// process judges only the slots it can see: those of its own namespace, and,
// from the namespace the simulated GPU was made in (the driver's, as the host's
// is a real driver's), the others through /proc (NSpid). NVML lists processes
// by pid in the driver's namespace, as a real driver lists host pids: a caller
// in another namespace gets no entry it could take for one of its processes.
//
// A process that exits is reaped the same way, and no earlier: a real driver
// holds a process's memory until the end of its teardown, which runs in the
// exit path after the exit handlers registered after it, and finishes when
// the kernel closes the process's device files. So the simulated device holds
// it until the process is gone (a zombie holds nothing), never less long.
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
constexpr uint32_t kLayoutVersion = 2;
constexpr int kMaxProcs = 256;

struct SharedDevice {
    uint64_t busy_until;      // device timeline: end of the last placed kernel (atomic)
    uint64_t kernels;         // kernels placed (atomic, statistics)
    uint64_t busy_ns;         // device time placed (atomic, statistics)
    uint8_t uuid[16];
};

struct SharedProc {
    int32_t pid;              // 0: free; in its own pid namespace
    uint32_t pad;
    uint64_t start_time;      // /proc/<pid>/stat field 22, so a reused pid is not this process
    uint64_t pid_ns;          // inode of its /proc/<pid>/ns/pid
    uint64_t used[kMaxDevices];
};

struct SharedRegion {
    char magic[8];
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t file_size;
    uint64_t memory;
    uint64_t context_memory;
    uint64_t driver_pid_ns;   // the pid namespace it was made in: NVML's pids are that namespace's
    int32_t sms;
    int32_t devices;
    char name[256];
    pthread_mutex_t lock;
    SharedDevice dev[kMaxDevices];
    SharedProc procs[kMaxProcs];
};

SharedRegion *g_region = nullptr;
int g_slot = -1;

uint64_t fnv1a(const void *data, size_t n, uint64_t h = 1469598103934665603ull) {
    const unsigned char *p = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

// Start time of a process in clock ticks since boot; 0 if it is gone or a zombie
// (a zombie holds no GPU memory: the driver releases it at exit).
uint64_t process_start_time(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
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

uint64_t pid_namespace(const char *proc_path) {
    struct stat st;
    return stat(proc_path, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

uint64_t own_pid_namespace() { return pid_namespace("/proc/self/ns/pid"); }

// The pid here of the process that is `pid` in namespace `ns` and started at
// `start_time`, found through /proc (NSpid: its pid here first, its own last);
// 0 when no process visible here is it.
pid_t pid_here(uint64_t ns, pid_t pid, uint64_t start_time) {
    DIR *d = opendir("/proc");
    if (!d) return 0;
    pid_t found = 0;
    while (struct dirent *e = readdir(d)) {
        char *end = nullptr;
        long here = strtol(e->d_name, &end, 10);
        if (!end || *end || here <= 0) continue;
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%ld/ns/pid", here);
        if (pid_namespace(path) != ns) continue;
        snprintf(path, sizeof path, "/proc/%ld/status", here);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        const char *line = strstr(buf, "\nNSpid:");
        const char *eol = line ? strchr(line + 1, '\n') : nullptr;
        const char *last = nullptr;
        for (const char *q = line ? line + 7 : nullptr; q && (!eol || q < eol); q++)
            if (*q == '\t' || *q == ' ') last = q + 1;
        if (last && atol(last) == (long)pid && process_start_time((pid_t)here) == start_time) {
            found = (pid_t)here;
            break;
        }
    }
    closedir(d);
    return found;
}

// Whether slot s's process runs, as far as this process can tell (a slot of a
// namespace it cannot see counts as running: the processes that can see it judge).
bool slot_alive(const SharedProc &s) {
    if (s.pid == 0) return false;
    uint64_t own = own_pid_namespace();
    if (s.pid_ns != 0 && s.pid_ns != own)
        return own != g_region->driver_pid_ns || pid_here(s.pid_ns, s.pid, s.start_time) != 0;
    if (kill(s.pid, 0) != 0 && errno == ESRCH) return false;
    return process_start_time(s.pid) == s.start_time;
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
    for (int i = 0; i < kMaxProcs; i++) {
        SharedProc &s = g_region->procs[i];
        if (s.pid != 0 && i != g_slot && !slot_alive(s)) memset(&s, 0, sizeof s);
    }
}

uint64_t used_locked(int phys) {
    uint64_t sum = 0;
    for (int i = 0; i < kMaxProcs; i++)
        if (g_region->procs[i].pid != 0) sum += g_region->procs[i].used[phys];
    return sum;
}

// Setting `id` into *value: 1 set, 0 unset (the table's default), -1 not valid, after one line on stderr.
int read_setting(fracgpu_setting_id id, fracgpu_setting_value *value) {
    char err[512];
    int rc = fracgpu_setting_read(id, value, err, sizeof err);
    if (rc < 0) warn("%s (`fracgpu sim env` writes the settings)", err);
    return rc;
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
    r->driver_pid_ns = own_pid_namespace();
    r->sms = cfg.sms;
    r->devices = cfg.devices;
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
    fracgpu_setting_value memory, sms, devices, name, context_memory;
    int context_memory_set = 0;
    if (read_setting(FRACGPU_SETTING_SIM_MEMORY, &memory) < 0 || read_setting(FRACGPU_SETTING_SIM_SMS, &sms) < 0 ||
        read_setting(FRACGPU_SETTING_SIM_DEVICES, &devices) < 0 || read_setting(FRACGPU_SETTING_SIM_NAME, &name) < 0 ||
        (context_memory_set = read_setting(FRACGPU_SETTING_SIM_CONTEXT_MEMORY, &context_memory)) < 0)
        return CUDA_ERROR_INVALID_VALUE;
    cfg.memory = memory.number;
    cfg.sms = (int)sms.number;
    cfg.devices = (int)devices.number;
    cfg.name = name.text;
    // Each context reserves memory, as a real one does (kContextShare unless set), less than the device.
    cfg.context_memory = context_memory_set ? context_memory.number : cfg.memory / kContextShare;
    if (cfg.context_memory >= cfg.memory) {
        warn("FRACGPU_SIM_CONTEXT_MEMORY: a context's reservation must be less than the device's memory "
             "(FRACGPU_SIM_MEMORY, %" PRIu64 " bytes)", cfg.memory);
        return CUDA_ERROR_INVALID_VALUE;
    }
    const char *v;
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

    RegionLock lock;
    reap_locked();
    for (int i = 0; i < kMaxProcs; i++) {
        if (g_region->procs[i].pid == 0) {
            SharedProc &s = g_region->procs[i];
            memset(&s, 0, sizeof s);
            s.start_time = process_start_time(getpid());
            s.pid_ns = own_pid_namespace();
            s.pid = getpid();
            g_slot = i;
            return CUDA_SUCCESS;
        }
    }
    warn("more than %d processes use the simulated GPU at once", kMaxProcs);
    return CUDA_ERROR_OPERATING_SYSTEM;
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
    // A process can hold two slots (one attached for NVML before cuInit, one
    // by cuInit): its entries are summed into one, as the device sees one process.
    RegionLock lock;
    reap_locked();
    int n = 0;
    uint64_t own = own_pid_namespace();
    if (own != g_region->driver_pid_ns) return 0;   // its pids would name none of the caller's processes
    pid_t here[kMaxProcs];
    for (int i = 0; i < kMaxProcs; i++) {
        const SharedProc &s = g_region->procs[i];
        here[i] = s.pid == 0 || s.pid_ns == 0 || s.pid_ns == own ? s.pid : pid_here(s.pid_ns, s.pid, s.start_time);
    }
    for (int i = 0; i < kMaxProcs; i++) {
        SharedProc s = g_region->procs[i];
        s.pid = here[i];
        if (s.pid == 0 || s.used[phys] == 0) continue;
        bool seen = false;
        for (int j = 0; j < i && !seen; j++)
            seen = here[j] == s.pid && g_region->procs[j].used[phys] != 0;
        if (seen) {
            for (int k = 0; k < n && (unsigned)k < cap; k++)
                if (pids[k] == (unsigned)s.pid) used[k] += s.used[phys];
            continue;
        }
        if ((unsigned)n < cap) {
            pids[n] = (unsigned)s.pid;
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
