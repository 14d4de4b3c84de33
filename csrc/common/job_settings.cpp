// A job's settings, parsed once for both shims: see fracgpu/job_settings.h.
#include "fracgpu/job_settings.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fracgpu/node_config.h"
#include "fracgpu/settings.h"
#include "fracgpu/state.h"
#include "fracgpu/units.h"

namespace fracgpu {

namespace {
// A setting in seconds, a number >= 0, into *out when it is set.
bool read_seconds(const NodeConfig &config, fracgpu_setting_id id, double *out, std::string *err) {
    const char *v = node_setting(config, id);
    if (!v) return true;
    char *end = nullptr;
    errno = 0;
    double w = strtod(v, &end);
    if (errno || end == v || *end || !std::isfinite(w) || w < 0) {
        *err = std::string(fracgpu_setting_name(id)) + "='" + v + "' is not valid: give seconds, a number >= 0";
        return false;
    }
    *out = w;
    return true;
}
}  // namespace

bool read_job_settings(JobSettings *out, std::string *err) {
    JobSettings &s = *out;
    s = JobSettings();
    // The node's file first: it wins over the environment (fracgpu/node_config.h).
    NodeConfig config;
    if (!read_node_config(&config, err)) return false;
    std::vector<std::string> ignored = ignored_variables(config);
    if (!ignored.empty()) s.notice = ignored_message(config, ignored);
    char msg[512];
    const char *v;
    if ((v = node_setting(config, FRACGPU_SETTING_PARTITION))) {
        if (!valid_partition_name(v, err)) {
            *err = "FRACGPU_PARTITION: " + *err;
            return false;
        }
        s.enforce = true;
        s.partition = v;
    }
    if ((v = node_setting(config, FRACGPU_SETTING_COMPUTE))) {
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
    if ((v = node_setting(config, FRACGPU_SETTING_COMPUTE_CAP)) && strcmp(v, "0") != 0) {
        if (strcmp(v, "1") != 0 || s.compute_share == 0) {
            *err = std::string("FRACGPU_COMPUTE_CAP='") + v + "' is not valid: set it to 1, with FRACGPU_COMPUTE";
            return false;
        }
        s.compute_cap = true;
    }
    if ((v = node_setting(config, FRACGPU_SETTING_PRIORITY))) {
        if (!s.enforce) {
            *err = "FRACGPU_PRIORITY is set without FRACGPU_PARTITION; run jobs with `fracgpu run --priority CLASS`";
            return false;
        }
        if (fracgpu_parse_priority(v, &s.priority, msg, sizeof msg) != 0) {
            *err = std::string("FRACGPU_PRIORITY is not valid: ") + msg;
            return false;
        }
        s.ephemeral = true;
    }
    if ((v = node_setting(config, FRACGPU_SETTING_MEMORY))) {
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
    if ((v = node_setting(config, FRACGPU_SETTING_OVERCOMMIT)) && strcmp(v, "0") != 0) {
        if (strcmp(v, "1") != 0 || (!s.has_memory && s.compute_share == 0)) {
            *err = std::string("FRACGPU_OVERCOMMIT='") + v + "' is not valid: set it to 1, with FRACGPU_MEMORY or "
                   "FRACGPU_COMPUTE";
            return false;
        }
        s.overcommit = true;
    }
    if ((v = node_setting(config, FRACGPU_SETTING_CONTEXT_MEMORY))) {
        double fraction = 0;
        if (fracgpu_parse_size(v, &s.context_memory, &fraction, msg, sizeof msg) != 0 || fraction != 0) {
            if (strcmp(v, "0") != 0) {
                *err = std::string("FRACGPU_CONTEXT_MEMORY='") + v + "' is not valid: " +
                       (fraction != 0 ? "give a size, not a percentage" : msg);
                return false;
            }
            s.context_memory = 0;
        }
        s.has_context_memory = true;
    }
    if (!read_seconds(config, FRACGPU_SETTING_OOM_WAIT, &s.oom_wait_s, err) ||
        !read_seconds(config, FRACGPU_SETTING_RECONCILE_INTERVAL, &s.reconcile_interval_s, err))
        return false;
    // Set by `fracgpu run` (and the recorder of fracgpu.init()): the process
    // that records this job in the ledger, which keeps our slot when we end.
    if ((v = node_setting(config, FRACGPU_SETTING_JOB_HOLDER))) {
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
    s.state_dir = default_state_dir();
    return true;
}

}  // namespace fracgpu
