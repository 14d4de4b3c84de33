"""Every ``FRACGPU_*`` runtime variable, one row each: its name, parser, default, reader and meaning.

This table is the Python side's one list of the variables: the modules that
set or read one use its name constant (``settings.PARTITION``), the lists of
variables a process must not inherit are derived from it (``JOB_VARIABLES``,
``without_job_variables``), and the README's table of variables is generated
from it (``tools/settings_table.py``). The C side has its own table, with the
same names, defaults and meanings, which the shims read through.

``reader`` says who reads a variable: ``shim`` (the CUDA driver shim),
``nvml-shim`` (the NVML shim), ``sim`` (the simulated driver), ``python``
(this package). ``default`` is what holds when it is unset, as text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from fracgpu import units

__all__ = ["Setting", "SETTINGS", "NAMES", "PARTITION_VARIABLES", "JOB_VARIABLES", "by_name", "default", "read",
           "without_job_variables"]

PREFIX = "FRACGPU_"

PARTITION = "FRACGPU_PARTITION"
MEMORY = "FRACGPU_MEMORY"
COMPUTE = "FRACGPU_COMPUTE"
COMPUTE_CAP = "FRACGPU_COMPUTE_CAP"
PRIORITY = "FRACGPU_PRIORITY"
OVERCOMMIT = "FRACGPU_OVERCOMMIT"
OOM_WAIT = "FRACGPU_OOM_WAIT"
RECONCILE_INTERVAL = "FRACGPU_RECONCILE_INTERVAL"
CONTEXT_MEMORY = "FRACGPU_CONTEXT_MEMORY"
STATE_DIR = "FRACGPU_STATE_DIR"
STATE_GROUP = "FRACGPU_STATE_GROUP"
JOB_HOLDER = "FRACGPU_JOB_HOLDER"
REAL_LIBCUDA = "FRACGPU_REAL_LIBCUDA"
REAL_LIBNVML = "FRACGPU_REAL_LIBNVML"
LEDGER = "FRACGPU_LEDGER"
LOG_FORMAT = "FRACGPU_LOG_FORMAT"
CONFIG = "FRACGPU_CONFIG"
SIM_DIR = "FRACGPU_SIM_DIR"
SIM_MEMORY = "FRACGPU_SIM_MEMORY"
SIM_SMS = "FRACGPU_SIM_SMS"
SIM_DEVICES = "FRACGPU_SIM_DEVICES"
SIM_NAME = "FRACGPU_SIM_NAME"
SIM_CONTEXT_MEMORY = "FRACGPU_SIM_CONTEXT_MEMORY"
SIM_CALL_COUNTS = "FRACGPU_SIM_CALL_COUNTS"

# What a setting is for, which says who must not inherit it: "partition" (which partition a
# process is in, and what a private one is made with), "job" (set for one job), "host" (where
# things are on this machine), "sim" (the simulated GPU).
ROLES = ("partition", "job", "host", "sim")


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"invalid flag {text!r}: write 1 (on) or 0 (off)")
    return text == "1"


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"invalid process id {text!r}: write a positive number")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid count {text!r}: write a whole number like 4")
    return int(text)


def _text(text: str) -> str:
    if not text:
        raise ValueError("an empty value: leave the variable unset instead")
    return text


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"invalid log format {text!r}: write text or json")
    return text


def _size(text: str) -> int:
    return units.parse_size(text, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parser: Callable[[str], Any]   # the value from its text; ValueError naming what is wrong
    default: str                   # what holds when it is unset, as the README says it
    reader: str                    # who reads it: shim, nvml-shim, sim, python (comma-separated)
    meaning: str
    role: str                      # one of ROLES

    def default_value(self) -> Any:
        """The default as a value, for a setting whose default is one (``16GiB``, ``132``); ValueError
        for one that is a rule (``(unset)``, ``(searched)``, a path built from other variables)."""
        if self.default.startswith("(") or "$" in self.default:
            raise ValueError(f"{self.name} has no default value: {self.default}")
        return self.parse(self.default)

    def parse(self, text: str) -> Any:
        """The value of ``text``; ValueError names the variable."""
        try:
            return self.parser(text)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: {e}") from None


SETTINGS: tuple[Setting, ...] = (
    Setting(PARTITION, _text, "(unset)", "shim, nvml-shim, python",
            "The partition the process belongs to. Unset: the shim enforces nothing.", "partition"),
    Setting(MEMORY, units.parse_memory, "(unset)", "shim, nvml-shim, python",
            "Make partition NAME for this job (private, removed with its last process) with this limit; a "
            "percentage is of each GPU. Unset: NAME must exist.", "partition"),
    Setting(COMPUTE, units.parse_share, "(unset)", "shim, python",
            "Make partition NAME for this job with this share of the GPU's time (`25%` or `0.25`).", "partition"),
    Setting(COMPUTE_CAP, _flag, "0", "shim, python", "`1`: the `FRACGPU_COMPUTE` share is also a ceiling.",
            "partition"),
    Setting(PRIORITY, units.parse_priority, "normal", "shim, python",
            "Make partition NAME for this job in this priority class: `high` (served first; its share, if any, holds "
            "it back only while others are busy), `normal`, or `low` (only what the others leave).", "partition"),
    Setting(OVERCOMMIT, _flag, "0", "shim, python",
            "`1`: a `FRACGPU_MEMORY` limit or `FRACGPU_COMPUTE` share that does not fit beside what the GPU has "
            "promised is accepted, and is best effort in the job's partition.", "partition"),
    Setting(OOM_WAIT, units.parse_seconds, "0", "shim, python",
            "An allocation over the quota waits up to this many seconds for memory to free before it fails.",
            "job"),
    Setting(CONTEXT_MEMORY, _size, "(measured)", "shim, python",
            "What each CUDA context is charged for its own reservation, instead of what the shim measures (what "
            "the device reports the process holds, before and after its first context on it).", "job"),
    Setting(RECONCILE_INTERVAL, units.parse_seconds, "1", "shim, python",
            "Every this many seconds a process with a context checks its books against what the device reports "
            "it holds (NVML), and charges its partition what the books missed; `0` turns this off.", "job"),
    Setting(STATE_DIR, _text, "$XDG_RUNTIME_DIR/fracgpu, else /tmp/fracgpu-$UID", "shim, nvml-shim, python",
            "The state folder: one file per GPU, holding its partitions and processes; it must be yours and not "
            "writable by others.", "host"),
    Setting(STATE_GROUP, _text, "(unset)", "shim, nvml-shim, python",
            "On a shared host: the state folder and files belong to this group (folder `2770`, files `0660`) so "
            "its members' jobs share one GPU's state; only the folder's owner may create, change or remove "
            "partitions.", "host"),
    Setting(JOB_HOLDER, _pid, "(unset)", "shim, python",
            "Set by `fracgpu run` and `fracgpu.init()`: the process recording the job, which keeps the slots of "
            "its ended processes until it has read them.", "job"),
    Setting(REAL_LIBCUDA, _text, "(searched)", "shim",
            "The real driver the shim forwards to (found on `LD_LIBRARY_PATH`, in the loader cache or the usual "
            "driver folders when unset).", "host"),
    Setting(REAL_LIBNVML, _text, "(searched)", "shim, nvml-shim",
            "The real NVML the NVML shim (`libfracgpu-nvml.so`, preloaded beside the driver shim) forwards to; it "
            "shows the quota in `nvmlDeviceGetMemoryInfo`/`_v2` as the driver shim does. The driver shim asks it "
            "what each process holds on the device.", "host"),
    Setting(LEDGER, _text, "$XDG_STATE_HOME/fracgpu/ledger.sqlite", "python",
            "The ledger jobs are recorded in (see [Accounting](#accounting)).", "host"),
    Setting(LOG_FORMAT, _log_format, "text", "shim, python",
            "How the shim's one-line messages and the services (`fracgpu exporter`, `fracgpu slurm-prolog`) write "
            "to stderr: `text`, or `json`, one object a line with `time`, `level`, `component`, `gpu`, "
            "`partition`, `job`, `pid`, `event`, `message` and `figures`.", "host"),
    Setting(CONFIG, _text, "(unset)", "shim, nvml-shim, python",
            "The node's configuration file, read when `/etc/fracgpu/fracgpu.conf` does not exist (see [One set of "
            "books per node](#one-set-of-books-per-node)); what it says wins over these variables.", "host"),
    Setting(SIM_DIR, _text, "$XDG_RUNTIME_DIR/fracgpu-sim, else /tmp/fracgpu-sim-$UID", "sim, python",
            "The simulated GPU's shared file's folder; two folders are two independent simulated GPUs.", "sim"),
    Setting(SIM_MEMORY, _size, "16GiB", "sim, python", "Memory of each simulated device, in bytes.", "sim"),
    Setting(SIM_SMS, _count, "132", "sim, python", "Streaming multiprocessors of each simulated device.", "sim"),
    Setting(SIM_DEVICES, _count, "1", "sim, python", "Number of simulated devices.", "sim"),
    Setting(SIM_NAME, _text, "fracgpu simulated GPU", "sim, python", "The simulated devices' name.", "sim"),
    Setting(SIM_CONTEXT_MEMORY, _size, "(1/256 of the memory)", "sim, python",
            "What each simulated context reserves on its device, in bytes (a real one takes 300-600 MiB of an "
            "80-141 GiB GPU); `0` reserves nothing.", "sim"),
    Setting(SIM_CALL_COUNTS, _flag, "0", "sim",
            "`1`: each process using the simulated driver prints, at exit, the driver calls it made by kind "
            "(launches, event records and queries, synchronisations) on stderr.", "sim"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS)
# The variables that put a process in a partition (and make a private one).
PARTITION_VARIABLES: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.role == "partition")
# What a process outside the job (the device probe) must not inherit from it: its partition and holder.
JOB_VARIABLES: tuple[str, ...] = PARTITION_VARIABLES + (JOB_HOLDER,)

_BY_NAME = {s.name: s for s in SETTINGS}


def default(name: str) -> Any:
    """The default value of setting ``name`` (see ``Setting.default_value``)."""
    return by_name(name).default_value()


def by_name(name: str) -> Setting:
    """The row of ``name``; KeyError for a name that is not a fracgpu setting."""
    return _BY_NAME[name]


def read(name: str, env: Mapping[str, str]) -> Any:
    """The parsed value of ``name`` in ``env``, None when it is unset or empty; ValueError names it."""
    text = env.get(name)
    return by_name(name).parse(text) if text else None


def without_job_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with no fracgpu setting and no ``LD_PRELOAD``: what a helper process that must stay
    outside every job (and off the shim) is started with."""
    return {k: v for k, v in env.items() if k not in _BY_NAME and k != "LD_PRELOAD"}
