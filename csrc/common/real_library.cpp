// See fracgpu/real_library.h.
#include "fracgpu/real_library.h"

#include <cstdlib>

#include "fracgpu/node_config.h"
#include "fracgpu/support.h"
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

namespace fracgpu {

namespace {

bool same_file(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace

std::string find_real_library(const RealLibrary &lib, std::string *err) {
    // This file is linked into each shim (fracgpu_common is static), so its own
    // address is inside the shim that asks.
    Dl_info info;
    const char *self = dladdr(reinterpret_cast<const void *>(&find_real_library), &info) && info.dli_fname
                           ? info.dli_fname : nullptr;
    auto is_self = [&](const std::string &path) { return self && same_file(self, path.c_str()); };
    auto usable = [&](const std::string &path) { return access(path.c_str(), R_OK) == 0 && !is_self(path); };

    const char *variable = fracgpu_setting_name(lib.setting);
    // The node's file names it for the node (or a container) when it says; a
    // broken file is refused by read_job_settings before a library is looked for.
    NodeConfig config;
    std::string config_err;
    if (!read_node_config(&config, &config_err)) config = NodeConfig();
    if (const char *v = node_setting(config, lib.setting)) {
        std::string given = std::string(variable) + "='" + v + "'";
        if (v[0] != '/') {
            *err = given + " is not an absolute path; give " + lib.what + "'s full path, like "
                   "/usr/lib/x86_64-linux-gnu/" + lib.file;
            return "";
        }
        if (!usable(v)) {
            *err = given + (is_self(v) ? " is fracgpu's own shim, not " + std::string(lib.what) : " cannot be read") +
                   "; give " + lib.what + "'s full path";
            return "";
        }
        return v;
    }
    std::string dirs;
    if (const char *lp = getenv("LD_LIBRARY_PATH")) dirs = lp;
    dirs += ":/usr/lib/x86_64-linux-gnu:/usr/lib/aarch64-linux-gnu:/usr/lib64:/usr/lib/wsl/lib"
            ":/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib:/lib64:/lib/x86_64-linux-gnu";
    for (size_t start = 0; start <= dirs.size();) {
        size_t end = dirs.find(':', start);
        if (end == std::string::npos) end = dirs.size();
        std::string dir = dirs.substr(start, end - start);
        start = end + 1;
        if (!dir.empty() && usable(dir + "/" + lib.file)) return dir + "/" + lib.file;
    }
    *err = std::string(lib.what) + " (" + lib.file + ") was not found; " + lib.missing;
    return "";
}

void *open_real_library(const RealLibrary &lib, std::string *err) {
    std::string path = find_real_library(lib, err);
    if (path.empty()) return nullptr;
    void *h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        *err = std::string("cannot load ") + lib.what + " " + path + ": " + (e ? e : "unknown error");
    }
    return h;
}

void RealLibraryLoader::load() {
    if (prepare_ && !prepare_()) return;
    std::string err;
    void *h = open_real_library(lib_, &err);
    if (!h) {
        log("%s", err.c_str());
        return;
    }
    slots_ = new std::atomic<void *>[*forwarders_]();
    handle_ = h;
}

void *RealLibraryLoader::resolve(const char *name, std::atomic<void *> &slot) {
    if (!ensure_loaded()) return nullptr;
    void *p = dlsym(handle_, name);
    slot.store(p, std::memory_order_release);
    return p;
}

}  // namespace fracgpu
