// Finding the real NVIDIA library a shim stands in front of: by an absolute
// path from an explicit setting, else on LD_LIBRARY_PATH, else in the usual
// driver folders; never the shim itself (compared by inode, whatever it is
// called). Used by the CUDA shim (libcuda.so.1) and the NVML shim
// (libnvidia-ml.so.1). Never throws.
#pragma once

#include <string>

namespace fracgpu {

struct RealLibrary {
    const char *file;      // "libcuda.so.1"
    const char *variable;  // "FRACGPU_REAL_LIBCUDA": an absolute path that wins
    const char *what;      // "the real CUDA driver", for messages
    const char *missing;   // what to do when it is not found (appended to the message)
    const void *self;      // any address inside the calling shim
};

// The absolute path, or "" with *err saying why.
std::string find_real_library(const RealLibrary &lib, std::string *err);

// Finds it and loads it RTLD_NOW | RTLD_LOCAL (its symbols never shadow the
// shim's, and a client loading it RTLD_LOCAL cannot hide them from the shim):
// the handle, or null with *err saying why.
void *open_real_library(const RealLibrary &lib, std::string *err);

}  // namespace fracgpu
