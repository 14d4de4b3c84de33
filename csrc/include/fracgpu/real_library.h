// Finding and loading the real NVIDIA library a shim stands in front of, and
// caching its symbols: one loader for the CUDA shim (libcuda.so.1) and the
// NVML shim (libnvidia-ml.so.1).
//
// The library is found by an absolute path from its setting
// (FRACGPU_REAL_LIBCUDA, FRACGPU_REAL_LIBNVML), else on LD_LIBRARY_PATH, else
// in the usual driver folders; never the shim itself (compared by inode,
// whatever it is called). It is opened lazily, once per process, RTLD_NOW |
// RTLD_LOCAL: its symbols never shadow the shim's, and a client loading it
// RTLD_LOCAL cannot hide them from the shim. Never throws.
#pragma once

#include <atomic>
#include <mutex>
#include <string>

#include "fracgpu/settings.h"

namespace fracgpu {

struct RealLibrary {
    const char *file;            // "libcuda.so.1"
    fracgpu_setting_id setting;  // FRACGPU_SETTING_REAL_LIBCUDA: an absolute path that wins
    const char *what;            // "the real CUDA driver", for messages
    const char *missing;         // what to do when it is not found (appended to the message)
};

// The absolute path, or "" with *err saying why.
std::string find_real_library(const RealLibrary &lib, std::string *err);

// Finds it and loads it: the handle, or null with *err saying why.
void *open_real_library(const RealLibrary &lib, std::string *err);

// One real library in one shim: opened on first use, its functions looked up
// once each. A global of this type is constant-initialised, so a hook may use
// it before any constructor of the shim has run.
class RealLibraryLoader {
public:
    // `forwarders`: how many generated forwarders the shim has (each gets a
    // cache slot); `prepare`: run once before the library is opened, and when
    // it returns false the library is not opened (it says why itself).
    constexpr RealLibraryLoader(const RealLibrary &lib, const unsigned *forwarders, bool (*prepare)())
        : lib_(lib), forwarders_(forwarders), prepare_(prepare) {}

    // Opens the library once per process; false when it is not open (the
    // reason was printed once on stderr).
    bool ensure_loaded() {
        std::call_once(once_, [this] { load(); });
        return handle_ != nullptr;
    }
    void *handle() const { return handle_; }

    // The real function `name`, cached by the caller in `slot`: null when the
    // library or the function is missing. The cached case is one load.
    void *symbol(const char *name, std::atomic<void *> &slot) {
        void *p = slot.load(std::memory_order_acquire);
        return p ? p : resolve(name, slot);
    }

    // The real function of generated forwarder `idx`, named names[idx].
    void *forwarded(unsigned idx, const char *const *names) {
        if (!ensure_loaded() || idx >= *forwarders_) return nullptr;
        return symbol(names[idx], slots_[idx]);
    }

private:
    void load();
    void *resolve(const char *name, std::atomic<void *> &slot);

    const RealLibrary &lib_;
    const unsigned *forwarders_;
    bool (*prepare_)();
    std::once_flag once_;
    void *handle_ = nullptr;
    std::atomic<void *> *slots_ = nullptr;   // *forwarders_ of them, made at load
};

}  // namespace fracgpu
