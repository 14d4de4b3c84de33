// Memory the driver reserves for a context's limits and code, on the books as
// the driver holds it:
//
// - cuCtxSetLimit: the device heap, the stack (per-thread size x the device's
//   resident threads, SMs x threads per SM) and the printf FIFO are reserved
//   when the limit is set. A context's own reservation covers their defaults
//   (the size each limit had when the shim first saw it set); what a new size
//   takes beyond that is charged before the driver is called, given back when
//   the driver refuses or the size shrinks, and when the context goes.
// - Modules and libraries: their device globals take memory when they load.
//   The shim reads the names of the globals a PTX image defines and asks the
//   driver their sizes (cuModuleGetGlobal): exact, whatever other threads and
//   processes do meanwhile. The charge follows the load (the sizes are the
//   driver's); past the quota the module is unloaded again and the load fails
//   with CUDA_ERROR_OUT_OF_MEMORY. Given back at unload or the context's end.
//   Binary images (cubin, fatbin) are not read yet: their globals are left to
//   the reconciliation with the device's per-process figure.
#include "quota.h"

#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

using namespace shim;

namespace {

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------
struct LimitBooks {
    int dev = -1;
    uint64_t base = 0;      // bytes of the size the context had (its reservation covers them)
    uint64_t charged = 0;   // bytes charged beyond base
};
// Held across a whole cuCtxSetLimit, so two threads setting one context's
// limit settle in turn. Never taken inside the pools' lock, nor the reverse.
std::mutex *g_limits_mu = new std::mutex;
std::map<std::pair<CUcontext, int>, LimitBooks> &g_limits = *new std::map<std::pair<CUcontext, int>, LimitBooks>;

// Device bytes one unit of `limit` reserves on `dev`; 0: it reserves none.
uint64_t limit_unit(CUlimit limit, int dev) {
    switch (limit) {
    case CU_LIMIT_MALLOC_HEAP_SIZE:
    case CU_LIMIT_PRINTF_FIFO_SIZE: return 1;
    case CU_LIMIT_STACK_SIZE: {
        int sms = 0, threads = 0;
        auto attr = REAL(cuDeviceGetAttribute);
        if (!attr || attr(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) != CUDA_SUCCESS ||
            attr(&threads, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, dev) != CUDA_SUCCESS || sms <= 0 ||
            threads <= 0)
            return 0;
        return (uint64_t)sms * (uint64_t)threads;
    }
    default: return 0;
    }
}

// ---------------------------------------------------------------------------
// Modules and libraries
// ---------------------------------------------------------------------------
struct ModuleBooks {
    int dev;
    uint64_t bytes;
    CUcontext ctx;   // its globals go with this context
};
std::mutex *g_modules_mu = new std::mutex;
std::unordered_map<void *, ModuleBooks> &g_modules = *new std::unordered_map<void *, ModuleBooks>;

// The names of the variables a PTX text defines in the global state space:
// lines `[.visible|.weak] .global [.align N] .TYPE NAME[...] [= ...];`
// (`.extern` ones are declarations, defined elsewhere). Empty for a binary image.
std::vector<std::string> ptx_global_names(const std::string &ptx) {
    std::vector<std::string> names;
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) return names;
    std::istringstream lines(ptx);
    std::string line;
    while (std::getline(lines, line)) {
        std::istringstream words(line);
        std::string w;
        while (words >> w && (w == ".visible" || w == ".weak")) {
        }
        if (w != ".global") continue;
        while (words >> w && w[0] == '.') {
            if (w == ".align") words >> w;   // its number
        }
        std::string name = w.substr(0, w.find_first_of("[;="));
        if (!name.empty() && name[0] != '.') names.push_back(name);
    }
    return names;
}

// An ELF cubin, a fatbin, a fatbin wrapper: binary images, not read.
bool binary_image(const unsigned char *p) {
    static const unsigned char kMagic[][4] = {{0x7f, 'E', 'L', 'F'}, {0x50, 0xed, 0x55, 0xba}, {0xb1, 0x43, 0x62, 0x46}};
    for (const auto &m : kMagic)   // compared byte by byte, so a shorter NUL-terminated text stops at its end
        if (p[0] == m[0] && p[1] == m[1] && p[2] == m[2] && p[3] == m[3]) return true;
    return false;
}

// The image as text (a PTX file or a NUL-terminated PTX string); empty when binary.
std::string image_text(const void *image, const char *path) {
    if (path) {
        std::ifstream f(path, std::ios::binary);
        unsigned char head[4] = {};
        if (!f.read(reinterpret_cast<char *>(head), sizeof head) || binary_image(head)) return std::string();
        f.seekg(0);
        return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    if (!image || binary_image(static_cast<const unsigned char *>(image))) return std::string();
    return std::string(static_cast<const char *>(image));
}

// Bytes of the globals of `module` named in the image, as the driver reports them.
uint64_t globals_bytes(CUmodule module, const std::vector<std::string> &names) {
    auto get = REAL(cuModuleGetGlobal_v2);
    uint64_t total = 0;
    for (const std::string &n : names) {
        CUdeviceptr p;
        size_t bytes = 0;
        if (get && get(&p, &bytes, module, n.c_str()) == CUDA_SUCCESS) total += bytes;
    }
    return total;
}

// After a successful load of `handle` (a module, or a library with its
// module `module`): charge its globals, or unload it with `unload` and refuse.
template <typename Unload>
CUresult module_loaded(void *handle, CUmodule module, const void *image, const char *path, Unload unload) {
    int dev;
    CUcontext ctx;
    if (!quota_current(&dev, &ctx)) return CUDA_SUCCESS;
    std::vector<std::string> names = ptx_global_names(image_text(image, path));
    if (names.empty() || !module) return CUDA_SUCCESS;
    uint64_t bytes = globals_bytes(module, names);
    if (bytes == 0) return CUDA_SUCCESS;
    if (quota_charge(dev, bytes) != CUDA_SUCCESS) {
        unload();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    std::lock_guard<std::mutex> lk(*g_modules_mu);
    g_modules[handle] = ModuleBooks{dev, bytes, ctx};
    return CUDA_SUCCESS;
}

void module_unloaded(void *handle) {
    ModuleBooks b{-1, 0, nullptr};
    {
        std::lock_guard<std::mutex> lk(*g_modules_mu);
        auto it = g_modules.find(handle);
        if (it == g_modules.end()) return;
        b = it->second;
        g_modules.erase(it);
    }
    quota_uncharge(b.dev, b.bytes);
}

template <typename Load>
CUresult load_module(CUmodule *m, const void *image, const char *path, Load load) {
    CUresult rc = load();
    if (rc != CUDA_SUCCESS || !m) return rc;
    auto unload = REAL(cuModuleUnload);
    return module_loaded(*m, *m, image, path, [&] {
        if (unload) unload(*m);
    });
}

template <typename Load>
CUresult load_library(CUlibrary *lib, const void *image, const char *path, Load load) {
    CUresult rc = load();
    if (rc != CUDA_SUCCESS || !lib) return rc;
    CUmodule module = nullptr;
    auto get_module = REAL(cuLibraryGetModule);
    if (!get_module || get_module(&module, *lib) != CUDA_SUCCESS) module = nullptr;   // no context: nothing loaded yet
    auto unload = REAL(cuLibraryUnload);
    return module_loaded(*lib, module, image, path, [&] {
        if (unload) unload(*lib);
    });
}
}  // namespace

namespace shim {

void limits_modules_release_context(CUcontext ctx, uint64_t (&back)[kMaxDevices]) {
    {
        std::lock_guard<std::mutex> lk(*g_limits_mu);
        for (auto it = g_limits.begin(); it != g_limits.end();) {
            if (it->first.first == ctx) {
                if (it->second.dev >= 0 && it->second.dev < kMaxDevices) back[it->second.dev] += it->second.charged;
                it = g_limits.erase(it);
            } else {
                ++it;
            }
        }
    }
    std::lock_guard<std::mutex> lk(*g_modules_mu);
    for (auto it = g_modules.begin(); it != g_modules.end();) {
        if (it->second.ctx == ctx) {
            if (it->second.dev >= 0 && it->second.dev < kMaxDevices) back[it->second.dev] += it->second.bytes;
            it = g_modules.erase(it);
        } else {
            ++it;
        }
    }
}

void limits_modules_forget_after_fork() {
    g_limits_mu = new (g_limits_mu) std::mutex();
    g_modules_mu = new (g_modules_mu) std::mutex();
    g_modules.clear();
    g_limits.clear();
}

}  // namespace shim

// ---------------------------------------------------------------------------
// cuCtxSetLimit
// ---------------------------------------------------------------------------
SHIM_API CUresult cuCtxSetLimit(CUlimit limit, size_t value) {
    REAL_OR_RETURN(real, cuCtxSetLimit);
    int dev;
    CUcontext ctx;
    if (!quota_current(&dev, &ctx) || !ctx) return real(limit, value);
    uint64_t unit = limit_unit(limit, dev);
    if (!unit) return real(limit, value);
    std::lock_guard<std::mutex> lk(*g_limits_mu);
    auto key = std::make_pair(ctx, (int)limit);
    auto it = g_limits.find(key);
    LimitBooks books;
    if (it != g_limits.end()) {
        books = it->second;
    } else {
        size_t current = 0;
        auto get = REAL(cuCtxGetLimit);
        if (!get || get(&current, limit) != CUDA_SUCCESS) return real(limit, value);
        books.dev = dev;
        books.base = (uint64_t)current * unit;
    }
    uint64_t bytes = (uint64_t)value > UINT64_MAX / unit ? UINT64_MAX : (uint64_t)value * unit;
    uint64_t after = bytes > books.base ? bytes - books.base : 0;
    if (after > books.charged) {
        CUresult rc = quota_charge(dev, after - books.charged);
        if (rc != CUDA_SUCCESS) return rc;
    }
    CUresult rc = real(limit, value);
    if (rc != CUDA_SUCCESS) {
        if (after > books.charged) quota_uncharge(dev, after - books.charged);
        return rc;
    }
    if (after < books.charged) quota_uncharge(dev, books.charged - after);
    books.charged = after;
    g_limits[key] = books;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------
// Modules and libraries
// ---------------------------------------------------------------------------
SHIM_API CUresult cuModuleLoad(CUmodule *m, const char *fname) {
    REAL_OR_RETURN(real, cuModuleLoad);
    return load_module(m, nullptr, fname, [&] { return real(m, fname); });
}
SHIM_API CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    REAL_OR_RETURN(real, cuModuleLoadData);
    return load_module(m, image, nullptr, [&] { return real(m, image); });
}
SHIM_API CUresult cuModuleLoadDataEx(CUmodule *m, const void *image, unsigned int n, CUjit_option *o, void **v) {
    REAL_OR_RETURN(real, cuModuleLoadDataEx);
    return load_module(m, image, nullptr, [&] { return real(m, image, n, o, v); });
}
SHIM_API CUresult cuModuleLoadFatBinary(CUmodule *m, const void *fatbin) {
    REAL_OR_RETURN(real, cuModuleLoadFatBinary);
    return load_module(m, fatbin, nullptr, [&] { return real(m, fatbin); });
}
SHIM_API CUresult cuModuleUnload(CUmodule m) {
    REAL_OR_RETURN(real, cuModuleUnload);
    CUresult rc = real(m);
    if (rc == CUDA_SUCCESS) module_unloaded(m);
    return rc;
}

SHIM_API CUresult cuLibraryLoadData(CUlibrary *lib, const void *code, CUjit_option *jo, void **jv, unsigned int nj,
                                    CUlibraryOption *lo, void **lv, unsigned int nl) {
    REAL_OR_RETURN(real, cuLibraryLoadData);
    return load_library(lib, code, nullptr, [&] { return real(lib, code, jo, jv, nj, lo, lv, nl); });
}
SHIM_API CUresult cuLibraryLoadFromFile(CUlibrary *lib, const char *file, CUjit_option *jo, void **jv,
                                        unsigned int nj, CUlibraryOption *lo, void **lv, unsigned int nl) {
    REAL_OR_RETURN(real, cuLibraryLoadFromFile);
    return load_library(lib, nullptr, file, [&] { return real(lib, file, jo, jv, nj, lo, lv, nl); });
}
SHIM_API CUresult cuLibraryUnload(CUlibrary lib) {
    REAL_OR_RETURN(real, cuLibraryUnload);
    CUresult rc = real(lib);
    if (rc == CUDA_SUCCESS) module_unloaded(lib);
    return rc;
}

