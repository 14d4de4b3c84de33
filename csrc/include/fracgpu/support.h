// Small things both shims need (compiled into fracgpu_common, which the
// simulated driver does not link).
#pragma once

#include <cstdint>
#include <string>

#include "fracgpu/os.h"   // mono_ns

namespace fracgpu {

// One line "fracgpu: ..." on stderr.
void log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// A size as people write it ("4 GiB"), as fracgpu_format_size (units.h) makes it.
std::string size_text(uint64_t bytes);

// A GPU's UUID (its 16 bytes, as cuDeviceGetUuid_v2 gives them) as the text NVML
// and the shared state use: "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", lowercase.
std::string uuid_text(const char bytes[16]);

}  // namespace fracgpu
