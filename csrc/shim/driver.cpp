// Settings and the real driver: read once, on the first CUDA call of a
// process (a process that never uses CUDA loads no driver).
#include "shim.h"
#include "fracgpu/error_text.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <mutex>
#include <sys/stat.h>
#include <unistd.h>

#include "fracgpu/real_library.h"
#include "fracgpu/state.h"
#include "fracgpu/units.h"

namespace shim {

namespace {

Settings g_settings;
void *g_real = nullptr;
CUresult g_error = CUDA_ERROR_NOT_INITIALIZED;
std::once_flag g_once;
std::atomic<void *> *g_forward = nullptr;   // one slot per generated forwarder

bool parse_settings(std::string *err) {
    Settings &s = g_settings;
    char msg[512];
    const char *v;
    if ((v = getenv("FRACGPU_PARTITION")) && *v) {
        if (!fracgpu::valid_partition_name(v, err)) {
            *err = "FRACGPU_PARTITION: " + *err;
            return false;
        }
        s.enforce = true;
        s.partition = v;
    }
    if ((v = getenv("FRACGPU_COMPUTE")) && *v) {
        if (!s.enforce) {
            *err = "FRACGPU_COMPUTE is set without FRACGPU_PARTITION; run jobs with `fracgpu run --compute SHARE`";
            return false;
        }
        if (fracgpu_parse_share(v, &s.compute_share, msg, sizeof msg) != 0) {
            *err = std::string("FRACGPU_COMPUTE='") + v + "' is not valid: " + msg;
            return false;
        }
        s.ephemeral = true;
    }
    if ((v = getenv("FRACGPU_COMPUTE_CAP")) && *v && strcmp(v, "0") != 0) {
        if (strcmp(v, "1") != 0 || s.compute_share == 0) {
            *err = std::string("FRACGPU_COMPUTE_CAP='") + v + "' is not valid: set it to 1, with FRACGPU_COMPUTE";
            return false;
        }
        s.compute_cap = true;
    }
    if ((v = getenv("FRACGPU_MEMORY")) && *v) {
        if (!s.enforce) {
            *err = "FRACGPU_MEMORY is set without FRACGPU_PARTITION; run jobs with `fracgpu run --memory SIZE`";
            return false;
        }
        s.ephemeral = true;
        if (fracgpu_parse_size(v, &s.memory_bytes, &s.memory_fraction, msg, sizeof msg) != 0) {
            *err = std::string("FRACGPU_MEMORY='") + v + "' is not valid: " + msg;
            return false;
        }
        s.has_memory = true;
    }
    if ((v = getenv("FRACGPU_CONTEXT_MEMORY")) && *v) {
        double fraction = 0;
        if (fracgpu_parse_size(v, &s.context_memory, &fraction, msg, sizeof msg) != 0 || fraction != 0) {
            if (strcmp(v, "0") != 0) {
                *err = std::string("FRACGPU_CONTEXT_MEMORY='") + v + "' is not valid: " +
                       (fraction != 0 ? "give a size, not a percentage" : msg);
                return false;
            }
            s.context_memory = 0;
        }
    }
    if ((v = getenv("FRACGPU_OOM_WAIT")) && *v) {
        char *end = nullptr;
        errno = 0;
        double w = strtod(v, &end);
        if (errno || end == v || *end || !std::isfinite(w) || w < 0) {
            *err = std::string("FRACGPU_OOM_WAIT='") + v + "' is not valid: give seconds, a number >= 0";
            return false;
        }
        s.oom_wait_s = w;
    }
    // Set by `fracgpu run` (and the recorder of fracgpu.init()): the process
    // that records this job in the ledger, which keeps our slot when we end.
    if ((v = getenv("FRACGPU_JOB_HOLDER")) && *v) {
        char *end = nullptr;
        errno = 0;
        long h = strtol(v, &end, 10);
        if (errno || end == v || *end || h <= 0 || h > INT32_MAX) {
            *err = std::string("FRACGPU_JOB_HOLDER='") + v + "' is not valid: it is set by `fracgpu run`, a "
                   "process id; unset it";
            return false;
        }
        s.holder = (int)h;
    }
    s.state_dir = fracgpu::default_state_dir();
    return true;
}

void load_once() {
    std::string err;
    if (!parse_settings(&err)) {
        log("%s; CUDA is refused in this process so that no job runs without its limits", err.c_str());
        g_error = CUDA_ERROR_NOT_PERMITTED;
        return;
    }
    static const fracgpu::RealLibrary kDriver = {
        "libcuda.so.1", "FRACGPU_REAL_LIBCUDA", "the real CUDA driver",
        "install the NVIDIA driver, set FRACGPU_REAL_LIBCUDA to its full path, or use the simulated GPU "
        "(eval \"$(fracgpu sim env)\")",
        reinterpret_cast<const void *>(&load_once)};
    g_real = fracgpu::open_real_library(kDriver, &err);
    if (!g_real) {
        log("%s", err.c_str());
        g_error = CUDA_ERROR_NO_DEVICE;
        return;
    }
    g_forward = new std::atomic<void *>[fg_forward_count]();
    g_error = CUDA_SUCCESS;
}

}  // namespace

bool ensure_loaded() {
    std::call_once(g_once, load_once);
    return g_real != nullptr;
}

CUresult init_error() { return g_error; }
const Settings &settings() { return g_settings; }
void *real_handle() { return g_real; }

void *real_symbol(const char *name, std::atomic<void *> &slot) {
    void *p = slot.load(std::memory_order_acquire);
    if (p) return p;
    if (!ensure_loaded()) return nullptr;
    p = dlsym(g_real, name);
    slot.store(p, std::memory_order_release);
    return p;
}

}  // namespace shim

extern "C" void *fg_forward_resolve(unsigned idx) {
    if (!shim::ensure_loaded() || idx >= fg_forward_count) return nullptr;
    return shim::real_symbol(fg_forward_names[idx], shim::g_forward[idx]);
}

extern "C" CUresult fg_forward_missing(unsigned idx) {
    if (!shim::ensure_loaded()) return shim::init_error();
    (void)idx;
    return CUDA_ERROR_NOT_FOUND;   // the real driver predates this entry point
}

// Error names and strings answer even when the real driver could not be
// loaded, so a client can say what went wrong (cuInit's refusal included).
namespace {
#define ERROR_ENTRY(code, name, text) {code, name, text},
const fracgpu::ErrorText kErrors[] = {
#include "cuda_errors.inc"
};
#undef ERROR_ENTRY

const fracgpu::ErrorText *error_text(CUresult rc) { return fracgpu::find_error(kErrors, (int)rc); }
}  // namespace

SHIM_API CUresult cuGetErrorName(CUresult error, const char **pStr) {
    if (shim::ensure_loaded()) {
        REAL_OR_RETURN(real, cuGetErrorName);
        return real(error, pStr);
    }
    const fracgpu::ErrorText *e = error_text(error);
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    *pStr = e ? e->name : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

SHIM_API CUresult cuGetErrorString(CUresult error, const char **pStr) {
    if (shim::ensure_loaded()) {
        REAL_OR_RETURN(real, cuGetErrorString);
        return real(error, pStr);
    }
    const fracgpu::ErrorText *e = error_text(error);
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    *pStr = e ? e->text : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
