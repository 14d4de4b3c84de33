// The node's configuration file: one set of books per node.
//
// /etc/fracgpu/fracgpu.conf names the state folder, its group, the ledger and
// the real libraries for every process on the node: the CLI, the library and
// both shims read it here, through one parser, so they can never disagree.
// Mounted into a container (by the CDI spec), it also binds the container to
// its partition.
//
// Which file: /etc/fracgpu/fracgpu.conf when it exists; else the file named
// by FRACGPU_CONFIG (tests, and hosts without a node-wide file); else none,
// and today's per-user defaults hold. A process cannot escape the node's file
// by pointing FRACGPU_CONFIG elsewhere: the fixed path is looked at first.
//
// Format: `key = value` lines, `#` comments (a whole line or after a value),
// blank lines. Keys are settings without their FRACGPU_ prefix, in lower case:
//   state_dir, state_group, ledger, real_libcuda, real_libnvml   (the node's)
//   partition                                                    (a binding)
// Values are taken as written (no quotes). Each key at most once.
//
// The file wins over the environment. A FRACGPU_* variable that contradicts a
// key (another state folder, another partition) is not obeyed. When the file
// binds a partition, every variable that would choose or shape one
// (FRACGPU_PARTITION, _MEMORY, _COMPUTE, _COMPUTE_CAP, _PRIORITY, _OVERCOMMIT)
// or weaken how it is kept (_CONTEXT_MEMORY, _RECONCILE_INTERVAL, _JOB_HOLDER)
// is not obeyed either: the partition's settings are the operator's.
#pragma once

#include <string>
#include <vector>

#include "fracgpu/settings.h"

namespace fracgpu {

constexpr char kNodeConfigPath[] = "/etc/fracgpu/fracgpu.conf";

struct NodeConfig {
    std::string path;                             // the file read; empty: none
    std::string values[FRACGPU_SETTING_COUNT];    // by setting; empty: not in the file

    bool has(fracgpu_setting_id id) const { return !values[id].empty(); }
    // Whether the file binds processes to a partition (a container's file).
    bool binds() const { return has(FRACGPU_SETTING_PARTITION); }
};

// The file that applies to this process (see above); empty: none.
std::string node_config_path();

// Parses `path` into *out. False with *err naming the file, the line and the
// key ("/etc/fracgpu/fracgpu.conf:3: unknown key 'stat_dir' (...)"). Never throws.
bool parse_node_config(const std::string &path, NodeConfig *out, std::string *err);

// This process's node configuration (the file of node_config_path(), or none).
bool read_node_config(NodeConfig *out, std::string *err);

// The value of setting `id` for this process: the file's, else the
// environment's (fracgpu_setting), except that a setting the file's binding
// takes over reads as unset. Null when unset.
const char *node_setting(const NodeConfig &config, fracgpu_setting_id id);

// The FRACGPU_* variables set in this process's environment that are not
// obeyed because of `config`, in table order.
std::vector<std::string> ignored_variables(const NodeConfig &config);

// "fracgpu: /etc/fracgpu/fracgpu.conf wins over the environment: FRACGPU_STATE_DIR, ... not obeyed"
// for `ignored` (non-empty).
std::string ignored_message(const NodeConfig &config, const std::vector<std::string> &ignored);

}  // namespace fracgpu
