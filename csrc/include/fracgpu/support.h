// Small things both shims need (compiled into fracgpu_common, which the
// simulated driver does not link).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fracgpu/os.h"   // mono_ns

namespace fracgpu {

// What a log pipeline keys a message on, beside its text: FRACGPU_LOG_FORMAT=json
// writes them as one JSON object a line (time, level, component "shim", gpu,
// partition, job: the holder pid recording it, pid, event, message, figures);
// text (the default) writes only "fracgpu: <message>". Null fields are null.
struct LogFigure {
    const char *name;
    uint64_t value;   // bytes or counts
};
struct LogEvent {
    const char *event = "notice";     // a fixed word: "out-of-memory", "refused", "notice"
    const char *level = "warning";    // "error" for a refusal
    const char *gpu = nullptr;        // the GPU's UUID
    const char *partition = nullptr;
    const LogFigure *figures = nullptr;
    size_t figure_count = 0;
};

// One line on stderr, as FRACGPU_LOG_FORMAT says (read once). Not for a hot
// path: callers limit how often they report.
void log_event(const LogEvent &event, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// One line "fracgpu: ..." on stderr (a JSON object with event "notice" under
// FRACGPU_LOG_FORMAT=json).
void log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// A size as people write it ("4 GiB"), as fracgpu_format_size (units.h) makes it.
std::string size_text(uint64_t bytes);

// A GPU's UUID (its 16 bytes, as cuDeviceGetUuid_v2 gives them) as the text NVML
// and the shared state use: "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", lowercase.
std::string uuid_text(const char bytes[16]);

}  // namespace fracgpu
