// The node's configuration file: see fracgpu/node_config.h.
#include "fracgpu/node_config.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sys/stat.h>

#include "fracgpu/state.h"

namespace fracgpu {

namespace {

// The settings a node's file may hold: where the books are, and the binding.
constexpr fracgpu_setting_id kFileKeys[] = {
    FRACGPU_SETTING_STATE_DIR, FRACGPU_SETTING_STATE_GROUP, FRACGPU_SETTING_LEDGER,
    FRACGPU_SETTING_REAL_LIBCUDA, FRACGPU_SETTING_REAL_LIBNVML, FRACGPU_SETTING_PARTITION,
};

// The variables a binding takes over: choosing or shaping the partition, and
// how it is kept. (FRACGPU_OOM_WAIT only makes the process's own failures wait.)
constexpr fracgpu_setting_id kBoundKeys[] = {
    FRACGPU_SETTING_PARTITION, FRACGPU_SETTING_MEMORY, FRACGPU_SETTING_COMPUTE, FRACGPU_SETTING_COMPUTE_CAP,
    FRACGPU_SETTING_PRIORITY, FRACGPU_SETTING_OVERCOMMIT, FRACGPU_SETTING_CONTEXT_MEMORY,
    FRACGPU_SETTING_RECONCILE_INTERVAL, FRACGPU_SETTING_JOB_HOLDER,
};

// "state_dir" for FRACGPU_STATE_DIR.
std::string key_of(fracgpu_setting_id id) {
    std::string key = fracgpu_setting_name(id) + strlen("FRACGPU_");
    for (char &c : key) c = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    return key;
}

std::string keys_list() {
    std::string out;
    for (fracgpu_setting_id id : kFileKeys) out += (out.empty() ? "" : ", ") + key_of(id);
    return out;
}

std::string trim(const std::string &s) {
    size_t b = s.find_first_not_of(" \t\r"), e = s.find_last_not_of(" \t\r");
    return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

bool bound_away(const NodeConfig &config, fracgpu_setting_id id) {
    if (!config.binds()) return false;
    for (fracgpu_setting_id b : kBoundKeys)
        if (b == id) return true;
    return false;
}

// A value the file gives is checked as far as the file alone can tell.
bool check_value(fracgpu_setting_id id, const std::string &value, std::string *why) {
    switch (id) {
        case FRACGPU_SETTING_STATE_DIR:
        case FRACGPU_SETTING_LEDGER:
        case FRACGPU_SETTING_REAL_LIBCUDA:
        case FRACGPU_SETTING_REAL_LIBNVML:
            if (value[0] != '/') {
                *why = "'" + value + "' is not an absolute path";
                return false;
            }
            return true;
        case FRACGPU_SETTING_PARTITION:
            return valid_partition_name(value, why);
        default:
            return true;
    }
}

}  // namespace

std::string node_config_path() {
    struct stat st;
    if (stat(kNodeConfigPath, &st) == 0) return kNodeConfigPath;
    const char *v = fracgpu_setting(FRACGPU_SETTING_CONFIG);
    return v ? v : "";
}

bool parse_node_config(const std::string &path, NodeConfig *out, std::string *err) {
    *out = NodeConfig();
    FILE *f = fopen(path.c_str(), "re");
    if (!f) {
        *err = "the node's configuration file " + path + " cannot be read: " + strerror(errno) +
               (path == kNodeConfigPath ? "" : std::string("; fix or unset ") + fracgpu_setting_name(FRACGPU_SETTING_CONFIG));
        return false;
    }
    out->path = path;
    char buf[4096];
    bool ok = true;
    for (int number = 1; ok && fgets(buf, sizeof buf, f); number++) {
        std::string where = path + ":" + std::to_string(number) + ": ";
        std::string line = buf;
        if (!line.empty() && line.back() != '\n' && !feof(f)) {
            *err = where + "the line is too long (at most 4095 characters)";
            ok = false;
            break;
        }
        line = trim(line.substr(0, line.find_first_of("#\n")));
        if (line.empty()) continue;
        size_t eq = line.find('=');
        std::string key = trim(line.substr(0, eq)), value = eq == std::string::npos ? "" : trim(line.substr(eq + 1));
        if (eq == std::string::npos || key.empty()) {
            *err = where + "write key = value, not '" + line + "'";
            ok = false;
            break;
        }
        const fracgpu_setting_id *found = nullptr;
        for (const fracgpu_setting_id &id : kFileKeys)
            if (key_of(id) == key) found = &id;
        if (!found) {
            *err = where + "unknown key '" + key + "' (the keys are " + keys_list() + ")";
            ok = false;
        } else if (value.empty()) {
            *err = where + "key '" + key + "' has no value; give one, or remove the line";
            ok = false;
        } else if (out->has(*found)) {
            *err = where + "key '" + key + "' is given twice";
            ok = false;
        } else if (std::string why; !check_value(*found, value, &why)) {
            *err = where + "key '" + key + "': " + why;
            ok = false;
        } else {
            out->values[*found] = value;
        }
    }
    fclose(f);
    if (!ok) *out = NodeConfig();
    return ok;
}

bool read_node_config(NodeConfig *out, std::string *err) {
    std::string path = node_config_path();
    if (path.empty()) {
        *out = NodeConfig();
        return true;
    }
    return parse_node_config(path, out, err);
}

const char *node_setting(const NodeConfig &config, fracgpu_setting_id id) {
    if (config.has(id)) return config.values[id].c_str();
    if (bound_away(config, id)) return nullptr;
    return fracgpu_setting(id);
}

std::vector<std::string> ignored_variables(const NodeConfig &config) {
    std::vector<std::string> out;
    for (int i = 0; i < FRACGPU_SETTING_COUNT; i++) {
        auto id = (fracgpu_setting_id)i;
        const char *v = fracgpu_setting(id);
        if (!v) continue;
        // FRACGPU_CONFIG naming another file than the node's, which is there.
        bool elsewhere = id == FRACGPU_SETTING_CONFIG && config.path == kNodeConfigPath && config.path != v;
        if (elsewhere || (config.has(id) ? config.values[id] != v : bound_away(config, id)))
            out.push_back(fracgpu_setting_name(id));
    }
    return out;
}

std::string ignored_message(const NodeConfig &config, const std::vector<std::string> &ignored) {
    std::string names;
    for (const std::string &n : ignored) names += (names.empty() ? "" : ", ") + n;
    std::string binding = config.binds() ? " (it binds this process to partition '" +
                                               config.values[FRACGPU_SETTING_PARTITION] + "')" : "";
    return "the node's configuration " + config.path + binding + " wins over the environment: " + names +
           (ignored.size() == 1 ? " is" : " are") + " not obeyed";
}

}  // namespace fracgpu
