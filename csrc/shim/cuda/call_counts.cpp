// The driver calls the shim adds to the launches, by kind: what a benchmark on
// a real driver reads (the simulated driver's fracgpu_sim_call_counts says the
// same of all calls). Counted where they are made (gate.h's counted()), never
// on a launch that makes none.
#include "gate.h"

namespace shim {
std::atomic<unsigned long long> g_calls[kCallKinds] = {};
}  // namespace shim

namespace {
const char *const kCallNames[shim::kCallKinds] = {
    "event_record", "event_query", "event_synchronize", "event_elapsed_time", "stream_query", "ctx_synchronize",
};
}  // namespace

// Writes at most `cap` counts and names; returns how many kinds there are.
SHIM_API int fracgpu_shim_call_counts(unsigned long long *counts, const char **names, int cap) {
    for (int i = 0; i < cap && i < shim::kCallKinds; i++) {
        if (counts) counts[i] = shim::g_calls[i].load(std::memory_order_relaxed);
        if (names) names[i] = kCallNames[i];
    }
    return shim::kCallKinds;
}
