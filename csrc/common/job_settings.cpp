// A job's settings, parsed once for both shims: see fracgpu/job_settings.h.
#include "fracgpu/job_settings.h"

#include <vector>

#include "fracgpu/node_config.h"
#include "fracgpu/settings.h"
#include "fracgpu/state.h"
#include "fracgpu/units.h"

namespace fracgpu {

namespace {
// Setting `id` as this process reads it (the node's file, else the
// environment: node_setting) into *value: 1 set, 0 unset (the table's
// default), -1 invalid with *err naming it.
int read(const NodeConfig &config, fracgpu_setting_id id, fracgpu_setting_value *value, std::string *err) {
    const char *text = node_setting(config, id);
    if (!text) {
        *value = fracgpu_setting_default(id);
        return 0;
    }
    char msg[512];
    if (fracgpu_setting_parse(id, text, value, msg, sizeof msg) != 0) {
        *err = msg;
        return -1;
    }
    return 1;
}

// "FRACGPU_COMPUTE is set without FRACGPU_PARTITION; ...": a setting that only makes a private partition.
bool needs_partition(const JobSettings &s, fracgpu_setting_id id, const char *option, std::string *err) {
    if (s.enforce) return true;
    *err = std::string(fracgpu_setting_name(id)) + " is set without FRACGPU_PARTITION; run jobs with `fracgpu run " +
           option + "`";
    return false;
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
    fracgpu_setting_value v;
    int rc;
    if ((rc = read(config, FRACGPU_SETTING_PARTITION, &v, err)) < 0) return false;
    if (rc > 0) {
        if (!valid_partition_name(v.text, err)) {
            *err = "FRACGPU_PARTITION: " + *err;
            return false;
        }
        s.enforce = true;
        s.partition = v.text;
    }
    if ((rc = read(config, FRACGPU_SETTING_COMPUTE, &v, err)) < 0) return false;
    if (rc > 0) {
        if (!needs_partition(s, FRACGPU_SETTING_COMPUTE, "--compute SHARE", err)) return false;
        s.compute_share = v.real;
        s.ephemeral = true;
    }
    if ((rc = read(config, FRACGPU_SETTING_COMPUTE_CAP, &v, err)) < 0) return false;
    if (v.number && s.compute_share == 0) {
        *err = "FRACGPU_COMPUTE_CAP=1 is set without FRACGPU_COMPUTE: a cap is a ceiling on a share";
        return false;
    }
    s.compute_cap = v.number != 0;
    if ((rc = read(config, FRACGPU_SETTING_PRIORITY, &v, err)) < 0) return false;
    if (rc > 0) {
        if (!needs_partition(s, FRACGPU_SETTING_PRIORITY, "--priority CLASS", err)) return false;
        s.ephemeral = true;
    }
    s.priority = (int)v.number;
    if ((rc = read(config, FRACGPU_SETTING_MEMORY, &v, err)) < 0) return false;
    if (rc > 0) {
        if (!needs_partition(s, FRACGPU_SETTING_MEMORY, "--memory SIZE", err)) return false;
        s.ephemeral = true;
        s.has_memory = true;
        s.memory_bytes = v.number;
        s.memory_fraction = v.real;
    }
    if ((rc = read(config, FRACGPU_SETTING_OVERCOMMIT, &v, err)) < 0) return false;
    if (v.number && !s.has_memory && s.compute_share == 0) {
        *err = "FRACGPU_OVERCOMMIT=1 is set without FRACGPU_MEMORY or FRACGPU_COMPUTE: only a memory limit or a "
               "compute share is overcommitted";
        return false;
    }
    s.overcommit = v.number != 0;
    if ((rc = read(config, FRACGPU_SETTING_CONTEXT_MEMORY, &v, err)) < 0) return false;
    s.has_context_memory = rc > 0;
    s.context_memory = v.number;
    if (read(config, FRACGPU_SETTING_OOM_WAIT, &v, err) < 0) return false;
    s.oom_wait_s = v.real;
    if (read(config, FRACGPU_SETTING_RECONCILE_INTERVAL, &v, err) < 0) return false;
    s.reconcile_interval_s = v.real;
    // Set by `fracgpu run` (and the recorder of fracgpu.init()): the process
    // that records this job in the ledger, which keeps our slot when we end.
    if (read(config, FRACGPU_SETTING_JOB_HOLDER, &v, err) < 0) return false;
    s.holder = (int)v.number;
    s.state_dir = default_state_dir();
    return true;
}

}  // namespace fracgpu
