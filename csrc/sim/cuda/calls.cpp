// Driver calls counted by kind (see call_counts.h), and printed at exit when
// FRACGPU_SIM_CALL_COUNTS=1. Counters are per process: relaxed atomics that
// any thread bumps without a lock, read once at the end.
#include "call_counts.h"

#include "sim.h"

#include <fracgpu/settings.h>

#include <cstdio>
#include <cstring>
#include <string>

namespace sim {

std::atomic<unsigned long long> g_calls[(int)Call::Count] = {};

namespace {

const char *const kCallNames[(int)Call::Count] = {
    "launch", "graph_launch", "event_record", "event_query", "event_synchronize", "event_elapsed_time",
    "stream_synchronize", "stream_query", "stream_wait_event", "ctx_synchronize",
};

// At exit, when asked: one line on stderr, "calls launch=N graph_launch=N ...".
__attribute__((destructor)) void print_call_counts() {
    fracgpu_setting_value on;
    char err[512];
    if (fracgpu_setting_read(FRACGPU_SETTING_SIM_CALL_COUNTS, &on, err, sizeof err) < 0) {
        warn("%s", err);
        return;
    }
    if (!on.number) return;
    std::string line = "calls";
    for (int i = 0; i < (int)Call::Count; i++)
        line += std::string(" ") + kCallNames[i] + "=" + std::to_string(g_calls[i].load(std::memory_order_relaxed));
    warn("%s", line.c_str());
}

}  // namespace
}  // namespace sim

using namespace sim;

SIM_API int fracgpu_sim_call_counts(unsigned long long *counts, const char **names, int cap) {
    for (int i = 0; i < cap && i < (int)Call::Count; i++) {
        if (counts) counts[i] = g_calls[i].load(std::memory_order_relaxed);
        if (names) names[i] = kCallNames[i];
    }
    return (int)Call::Count;
}
