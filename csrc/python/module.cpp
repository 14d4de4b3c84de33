// fracgpu._native: the C grammars of values, the settings table and its
// reading, the shared state, and what this build was made with.
//
// The Python package parses sizes and shares with the same C code the shim
// uses for FRACGPU_* variables, so a value accepted on the command line is
// read the same way inside every job.
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fracgpu/node_config.h"
#include "fracgpu/settings.h"
#include "fracgpu/state.h"
#include "fracgpu/units.h"

namespace py = pybind11;

namespace {

constexpr size_t kErrLen = 512;

// The C parser stops at a NUL, so "1GiB\0junk" would pass as "1GiB".
void reject_nul(const std::string &text, const char *what) {
  if (text.find('\0') != std::string::npos)
    throw py::value_error(std::string("invalid ") + what + ": it contains a NUL character");
}

const char *grammar_name(fracgpu_grammar g) {
  switch (g) {
    case FRACGPU_GRAMMAR_TEXT: return "text";
    case FRACGPU_GRAMMAR_FLAG: return "flag";
    case FRACGPU_GRAMMAR_COUNT: return "count";
    case FRACGPU_GRAMMAR_SIZE: return "size";
    case FRACGPU_GRAMMAR_MEMORY: return "memory";
    case FRACGPU_GRAMMAR_SHARE: return "share";
    case FRACGPU_GRAMMAR_PRIORITY: return "priority";
    case FRACGPU_GRAMMAR_SECONDS: return "seconds";
    case FRACGPU_GRAMMAR_LOG_FORMAT: return "log_format";
  }
  return "text";
}

// A setting's value as Python holds it: str, bool, int, (bytes, fraction) for a memory limit,
// float, or the priority class's name.
py::object value_object(fracgpu_grammar g, const fracgpu_setting_value &v) {
  switch (g) {
    case FRACGPU_GRAMMAR_TEXT: return py::str(v.text ? v.text : "");
    case FRACGPU_GRAMMAR_FLAG: return py::bool_(v.number != 0);
    case FRACGPU_GRAMMAR_COUNT:
    case FRACGPU_GRAMMAR_SIZE: return py::int_(v.number);
    case FRACGPU_GRAMMAR_MEMORY: return py::make_tuple(v.number, v.real);
    case FRACGPU_GRAMMAR_SHARE:
    case FRACGPU_GRAMMAR_SECONDS: return py::float_(v.real);
    case FRACGPU_GRAMMAR_PRIORITY: return py::str(fracgpu_priority_name((int)v.number));
    case FRACGPU_GRAMMAR_LOG_FORMAT: return py::str(v.text ? v.text : "text");
  }
  return py::none();
}

// The settings table (fracgpu/settings.h), row by row: the rows of fracgpu.settings.
py::list settings() {
  py::list rows;
  for (int id = 0; id < FRACGPU_SETTING_COUNT; id++) {
    const fracgpu_setting_info *r = fracgpu_setting_row((fracgpu_setting_id)id);
    py::dict row;
    row["name"] = r->name;
    row["grammar"] = grammar_name(r->grammar);
    row["default"] = r->has_default ? value_object(r->grammar, r->default_value) : py::object(py::none());
    row["default_rule"] = r->has_default ? py::object(py::none()) : py::object(py::str(r->default_rule));
    row["low"] = r->low;
    row["high"] = r->high;
    row["role"] = r->role;
    row["reader"] = r->reader;
    row["meaning"] = r->meaning;
    rows.append(row);
  }
  return rows;
}

// The node's configuration file as the shims read it (fracgpu/node_config.h):
// the file, its values by variable name, and the variables of this process's
// environment that it overrides. ValueError (file, line, key) for a bad file.
py::dict node_config(std::optional<std::string> path) {
  fracgpu::NodeConfig config;
  std::string err;
  bool ok = path ? fracgpu::parse_node_config(*path, &config, &err) : fracgpu::read_node_config(&config, &err);
  if (!ok) throw py::value_error(err);
  py::dict values;
  for (int id = 0; id < FRACGPU_SETTING_COUNT; id++)
    if (config.has((fracgpu_setting_id)id))
      values[fracgpu_setting_name((fracgpu_setting_id)id)] = config.values[id];
  std::vector<std::string> ignored = fracgpu::ignored_variables(config);
  py::dict out;
  out["path"] = config.path.empty() ? py::object(py::none()) : py::object(py::str(config.path));
  out["values"] = values;
  out["ignored"] = ignored;
  out["message"] = ignored.empty() ? std::string() : fracgpu::ignored_message(config, ignored);
  return out;
}

// Setting `name`'s value from `text`, read as the shims and the simulated driver read it.
py::object parse_setting(const std::string &name, const std::string &text) {
  for (int id = 0; id < FRACGPU_SETTING_COUNT; id++) {
    const fracgpu_setting_info *r = fracgpu_setting_row((fracgpu_setting_id)id);
    if (name != r->name) continue;
    reject_nul(text, name.c_str());
    fracgpu_setting_value v;
    char err[kErrLen] = "";
    if (fracgpu_setting_parse((fracgpu_setting_id)id, text.c_str(), &v, err, sizeof err) != 0)
      throw py::value_error(err);
    return value_object(r->grammar, v);
  }
  throw py::key_error(name + " is not a fracgpu setting");
}

double parse_seconds(const std::string &text) {
  reject_nul(text, "seconds");
  double seconds = 0;
  char err[kErrLen] = "";
  if (fracgpu_parse_seconds(text.c_str(), &seconds, err, sizeof err) != 0) throw py::value_error(err);
  return seconds;
}

py::tuple parse_size(const std::string &text, bool allow_zero) {
  reject_nul(text, "size");
  if (allow_zero && fracgpu_size_is_zero(text.c_str())) return py::make_tuple(0, 0.0);
  uint64_t bytes = 0;
  double fraction = 0.0;
  char err[kErrLen] = "";
  if (fracgpu_parse_size(text.c_str(), &bytes, &fraction, err, sizeof err) != 0)
    throw py::value_error(err);
  return py::make_tuple(bytes, fraction);
}

double parse_share(const std::string &text) {
  reject_nul(text, "share");
  double share = 0.0;
  char err[kErrLen] = "";
  if (fracgpu_parse_share(text.c_str(), &share, err, sizeof err) != 0) throw py::value_error(err);
  return share;
}

// "high", "normal", "low" to FRACGPU_PRIORITY_HIGH/NORMAL/LOW.
int parse_priority(const std::string &text) {
  reject_nul(text, "priority");
  int priority = FRACGPU_PRIORITY_NORMAL;
  char err[kErrLen] = "";
  if (fracgpu_parse_priority(text.c_str(), &priority, err, sizeof err) != 0) throw py::value_error(err);
  return priority;
}

std::string format_size(uint64_t bytes) {
  char buf[64];
  size_t n = fracgpu_format_size(bytes, buf, sizeof buf);
  return std::string(buf, n < sizeof buf ? n : sizeof buf - 1);
}

std::string format_share(double share) {
  char buf[64];
  size_t n = fracgpu_format_share(share, buf, sizeof buf);
  if (n == 0) throw py::value_error("format_share: the share must be a finite number >= 0");
  return std::string(buf, n < sizeof buf ? n : sizeof buf - 1);
}

py::dict build_info() {
  py::dict info;
  info["have_fatbin"] = static_cast<bool>(FRACGPU_HAVE_FATBIN);
  info["cuda_header_version"] = static_cast<int>(FRACGPU_CUDA_HEADER_VERSION);
  return info;
}

// The shared state. The C++ side reports failures as (false, message); here
// they become fracgpu._native.StateError.
struct StateError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(bool ok, const std::string &err) {
  if (!ok) throw StateError(err);
}

std::unique_ptr<fracgpu::Region> open_region(const std::string &dir, const std::string &uuid,
                                             const std::string &device_name, uint64_t total, bool create) {
  auto r = std::make_unique<fracgpu::Region>();
  std::string err;
  check(r->open(dir, uuid, device_name, total, create, &err), err);
  return r;
}

std::unique_ptr<fracgpu::Region> open_region_file(const std::string &path) {
  auto r = std::make_unique<fracgpu::Region>();
  std::string err;
  check(r->open_file(path, &err), err);
  return r;
}

py::list partitions(fracgpu::Region &r) {
  py::list out;
  for (const auto &p : r.partitions()) {
    py::dict d;
    d["name"] = p.name;
    d["memory_limit"] = p.memory_limit;
    d["memory_ceiling"] = p.memory_ceiling;
    d["used"] = p.used;
    d["peak"] = p.peak;
    d["oom_refusals"] = p.oom_refusals;
    d["compute_share"] = p.compute_share;
    d["ephemeral"] = bool(p.flags & fracgpu::kPartitionEphemeral);
    d["cap"] = bool(p.flags & fracgpu::kPartitionCap);
    d["best_effort"] = bool(p.flags & fracgpu::kPartitionBestEffort);
    d["compute_best_effort"] = bool(p.flags & fracgpu::kPartitionComputeBestEffort);
    d["priority"] = std::string(fracgpu_priority_name(fracgpu::priority_of_flags(p.flags)));
    d["created_unix_ns"] = p.created_unix_ns;
    d["processes"] = p.processes;
    d["device_ns"] = p.device_ns;
    d["launches"] = p.launches;
    d["drift"] = p.drift;
    d["drift_charged"] = p.drift_charged;
    d["drift_peak"] = p.drift_peak;
    d["drift_unknown"] = p.drift_unknown;
    out.append(d);
  }
  return out;
}

py::list processes(fracgpu::Region &r) {
  py::list out;
  for (const auto &p : r.processes()) {
    py::dict d;
    d["slot"] = p.slot;
    d["pid"] = p.pid;
    d["pid_ns"] = p.pid_ns;
    d["partition"] = p.partition;
    d["command"] = p.command;
    d["used"] = p.used;
    d["peak"] = p.peak;
    d["start_time"] = p.start_time;
    d["attached_unix_ns"] = p.attached_unix_ns;
    d["device_ns"] = p.device_ns;
    d["launches"] = p.launches;
    d["holder"] = p.holder;
    d["exited"] = p.exited;
    d["truth"] = p.truth == fracgpu::kTruthKnown ? "known" : p.truth == fracgpu::kTruthUnknown ? "unknown" : "pending";
    d["device_used"] = p.device_used;
    d["drift"] = p.drift;
    d["drift_charged"] = p.drift_charged;
    d["join_wait_ns"] = p.join_wait_ns;
    d["measure_wait_ns"] = p.measure_wait_ns;
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fracgpu native core: values and settings, the shared state, build information";
  m.def("settings", &settings,
        "The settings table: a dict per FRACGPU_* variable (name, grammar, default: its value or None, "
        "default_rule: what applies when unset where that is a rule, low, high, role, reader, meaning).");
  m.def("parse_setting", &parse_setting, py::arg("name"), py::arg("text"),
        "The value of setting `name` written as `text`, read by its grammar and bounds as the shims and the "
        "simulated driver read it. Raises ValueError naming the setting, KeyError for an unknown name.");
  m.def("parse_size", &parse_size, py::arg("text"), py::arg("allow_zero") = false,
        "Parse '4GiB', '512MiB', '4GB', '1048576' or '25%'. Returns (bytes, fraction): "
        "(n, 0.0) for a size, (0, f) for a percentage of the device; (0, 0.0) for a zero size ('0', '0MiB') "
        "when allow_zero. Raises ValueError.");
  m.def("parse_seconds", &parse_seconds, py::arg("text"),
        "Parse seconds, a decimal number >= 0 ('30', '2.5'). Raises ValueError.");
  m.def("parse_share", &parse_share, py::arg("text"),
        "Parse '25%' or '0.25' to a fraction in (0, 1]. Raises ValueError.");
  m.def("parse_priority", &parse_priority, py::arg("text"),
        "Parse 'high', 'normal' or 'low' to 2, 1 or 0. Raises ValueError naming the accepted values.");
  m.def("format_size", &format_size, py::arg("bytes"),
        "Write bytes as people do: 268435456 -> '256MiB', 1610612736 -> '1.5GiB'.");
  m.def("format_share", &format_share, py::arg("share"), "Write a share as a percentage: 0.25 -> '25%'.");
  m.def("node_config", &node_config, py::arg("path") = py::none(),
        "The node's configuration (path: that file; default: /etc/fracgpu/fracgpu.conf when it exists, else "
        "$FRACGPU_CONFIG): {'path', 'values' (by FRACGPU_* name), 'ignored' (variables of this environment it "
        "overrides), 'message'}. Raises ValueError naming the file, line and key.");
  m.attr("NODE_CONFIG_PATH") = std::string(fracgpu::kNodeConfigPath);
  py::register_exception<StateError>(m, "StateError", PyExc_RuntimeError);
  m.def("default_state_dir", &fracgpu::default_state_dir,
        "The node configuration's state_dir, else $FRACGPU_STATE_DIR, else $XDG_RUNTIME_DIR/fracgpu, else "
        "/tmp/fracgpu-$UID.");
  m.def("check_state_dir", [](const std::string &dir, bool create) {
          std::string err;
          check(fracgpu::check_state_dir(dir, create, &err), err);
        }, py::arg("dir"), py::arg("create") = false,
        "Raise StateError unless dir is a folder of this user that nobody else can write (create: mkdir 0700).");
  m.def("process_start_time", &fracgpu::process_start_time, py::arg("pid"),
        "Start time of a live process (ticks since boot, /proc/PID/stat field 22); 0 when gone or a zombie.");
  m.def("pid_namespace", &fracgpu::pid_namespace, py::arg("pid") = 0,
        "The inode of /proc/PID/ns/pid (0: this process's); 0 when it cannot be read.");
  m.def("namespace_pid", [](int pid) -> std::optional<std::pair<uint64_t, int>> {
          uint64_t ns = 0;
          int ns_pid = 0;
          if (!fracgpu::namespace_pid(pid, &ns, &ns_pid)) return std::nullopt;
          return std::make_pair(ns, ns_pid);
        }, py::arg("pid"),
        "Process PID of this namespace as its own pid namespace names it: (namespace inode, pid there), from "
        "/proc/PID/status NSpid and /proc/PID/ns/pid; None when it is gone.");
  m.def("host_pid_of", &fracgpu::host_pid_of, py::arg("pid_ns"), py::arg("pid"), py::arg("start_time") = 0,
        "The pid here of the process that is PID in pid namespace PID_NS (and started at START_TIME, 0: any); 0 "
        "when no process visible here is it.");
  m.attr("INITIAL_PID_NAMESPACE") = fracgpu::kInitialPidNamespace;
  m.def("region_files", &fracgpu::region_files, py::arg("dir"), "The GPU state files in dir, sorted.");
  m.def("valid_partition_name", [](const std::string &name) {
          std::string err;
          if (!fracgpu::valid_partition_name(name, &err)) throw py::value_error(err);
        }, py::arg("name"), "Raise ValueError naming the rule unless name is a valid partition name.");
  m.attr("SIM_CONTEXT_SHARE") = FRACGPU_SIM_CONTEXT_SHARE;
  m.attr("MAX_PARTITIONS") = fracgpu::kMaxPartitions;
  m.attr("MAX_PROCESSES") = fracgpu::kMaxProcesses;
  m.attr("DOES_NOT_FIT") = std::string(fracgpu::kDoesNotFit);
  m.attr("SHARE_DOES_NOT_FIT") = std::string(fracgpu::kShareDoesNotFit);
  m.def("check_memory_limit", [](uint64_t limit) {
        std::string err;
        if (!fracgpu::usable_memory_limit(limit, &err)) throw py::value_error(err);
      }, py::arg("limit"), "ValueError (naming the smallest usable limit) for a limit no CUDA context fits in.");
  m.attr("MAX_PARTITIONS") = fracgpu::kMaxPartitions;
  m.def("reserved_partition_name", &fracgpu::reserved_partition_name, py::arg("name"),
        "Whether name is one fracgpu gives its private partitions (run-, init-, slurm-).");
  py::class_<fracgpu::Region>(m, "Region", "One GPU's shared state (a mapped file).")
      .def_static("open", &open_region, py::arg("dir"), py::arg("uuid"), py::arg("device_name"),
                  py::arg("total_memory"), py::arg("create") = true,
                  "Open (create) the region of GPU uuid under dir. Raises StateError.")
      .def_static("open_file", &open_region_file, py::arg("path"), "Open an existing state file. Raises StateError.")
      .def_property_readonly("path", &fracgpu::Region::path)
      .def_property_readonly("uuid", &fracgpu::Region::uuid)
      .def_property_readonly("device_name", &fracgpu::Region::device_name)
      .def_property_readonly("total_memory", &fracgpu::Region::total_memory)
      .def("partitions", &partitions, "Live partitions: list of dicts.")
      .def("set_held_outside", [](fracgpu::Region &r, uint64_t bytes, const std::string &who) {
             r.set_held_outside(fracgpu::HeldOutside{bytes, who});
           }, py::arg("bytes"), py::arg("who"),
           "What the device holds outside these books: counted as taken by every later promise check.")
      .def("processes", &processes, "Registered processes (reap() first to drop dead ones): list of dicts.")
      .def("create_partition", [](fracgpu::Region &r, const std::string &name, uint64_t memory_limit,
                                  double compute_share, bool cap, bool overcommit, int priority) {
             std::string err;
             uint32_t flags = (cap ? uint32_t(fracgpu::kPartitionCap) : 0u) | fracgpu::priority_flags(priority);
             check(r.create_partition(name, memory_limit, compute_share, flags, &err, overcommit), err);
           }, py::arg("name"), py::arg("memory_limit") = 0, py::arg("compute_share") = 0.0, py::arg("cap") = false,
           py::arg("overcommit") = false, py::arg("priority") = int(FRACGPU_PRIORITY_NORMAL),
           "Make a partition. A limit that does not fit beside the GPU's promises raises StateError naming them, "
           "unless overcommit (the partition is then best effort).")
      .def("check_promise", [](fracgpu::Region &r, const std::string &name, uint64_t memory_limit, double share,
                               int priority) {
             std::string err;
             check(r.check_promise(name, memory_limit, share, priority, &err), err);
           }, py::arg("name"), py::arg("memory_limit"), py::arg("share") = 0.0, py::arg("priority") = 1,
           "Raise StateError (naming the promises and what remains) unless a new partition with this limit and "
           "compute share fits now.")
      .def("update_partition", [](fracgpu::Region &r, const std::string &name, std::optional<uint64_t> memory_limit,
                                  std::optional<double> compute_share, std::optional<bool> cap, bool overcommit,
                                  std::optional<int> priority) {
             std::string err;
             check(r.update_partition(name, memory_limit ? &*memory_limit : nullptr,
                                      compute_share ? &*compute_share : nullptr, cap ? &*cap : nullptr, &err,
                                      overcommit, priority ? &*priority : nullptr),
                   err);
           }, py::arg("name"), py::arg("memory_limit") = py::none(), py::arg("compute_share") = py::none(),
           py::arg("cap") = py::none(), py::arg("overcommit") = false, py::arg("priority") = py::none(),
           "Change a live partition (None: keep that setting; memory_limit 0: no limit). Raises StateError.")
      .def("remove_partition", [](fracgpu::Region &r, const std::string &name) {
             std::string err;
             check(r.remove_partition(name, &err), err);
           }, py::arg("name"))
      .def("reap", &fracgpu::Region::reap, py::arg("quick") = false,
           "Free the slots of dead processes (kept, marked exited, while their holder lives); returns how many. "
           "quick: dead when the pid is gone (no /proc read; a reused pid waits for a full reap).")
      .def("reap_all_namespaces", &fracgpu::Region::reap_all_namespaces,
           "Free the slots of dead processes of every pid namespace, found by a scan of /proc (only a process in "
           "the host's pid namespace sees them all; elsewhere, as reap()). Returns how many.")
      .def("collect", &fracgpu::Region::collect, py::arg("holder"), py::arg("slot") = -1,
           "Free the exited slots held by process `holder` (only `slot` when given); returns how many.")
      .def("adopt", &fracgpu::Region::adopt, py::arg("slot"), py::arg("pid"), py::arg("start_time"),
           py::arg("holder"), py::arg("previous") = 0,
           "Make live process `holder` the holder of the live process in `slot` (pid, start_time) when it has "
           "none, or is held by `holder` or `previous`; whether it now is.")
      .def("reconcile", &fracgpu::Region::reconcile, py::arg("slot"), py::arg("pid"), py::arg("listed"),
           py::arg("device_used"), py::arg("books"),
           "Record the device's figure for the process in `slot` (pid as the slot holds it) against its books, "
           "charging the positive drift to its partition; the drift charged now.");
  m.def("build_info", &build_info,
        "What this build was made with: {'have_fatbin': bool, 'cuda_header_version': int}.");
}
