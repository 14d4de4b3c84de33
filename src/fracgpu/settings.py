"""Every ``FRACGPU_*`` runtime variable, one row each: the native settings table, as Python sees it.

The rows are the C table's (``csrc/include/fracgpu/settings.h``, through
``_native``), which both shims and the simulated driver read: a row's name,
grammar, default, bounds, role, readers and meaning are written once, there.
A value is read by the same C code here as in a job (``Setting.parse``), so
the command line, the shims and the simulated driver accept and refuse the
same text. The modules that set or read one use its name constant
(``settings.PARTITION``); the lists of variables a process must not inherit
are derived from the rows' roles (``JOB_VARIABLES``,
``without_job_variables``), and the README's table of variables is generated
from them (``tools/settings_table.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fracgpu import _native

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

# What each simulated context reserves unless FRACGPU_SIM_CONTEXT_MEMORY says: 1/SIM_CONTEXT_SHARE of its device.
SIM_CONTEXT_SHARE: int = _native.SIM_CONTEXT_SHARE

@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    grammar: str          # how its text is read: text, flag, count, size, memory, share, priority, seconds
    default: Any          # the value when it is unset; None where that is a rule (default_rule)
    default_rule: str | None   # what applies when it is unset, in words, where it is not a value
    low: int              # bounds of a count or a size (a size may be zero only when low is 0); the
    high: int             # longest text in bytes; high 0: no bound beyond the grammar's
    role: str             # who must not inherit it: partition, job, host or sim
    reader: str           # who reads it: shim, nvml-shim, sim, python (comma-separated)
    meaning: str

    def default_value(self) -> Any:
        """The default value (``16GiB`` as bytes, ``132``); ValueError for a setting whose default
        is a rule (none, searched, measured, a path built from other variables)."""
        if self.default_rule is not None:
            raise ValueError(f"{self.name} has no default value: {self.default_rule}")
        return self.default

    def parse(self, text: str) -> Any:
        """The value of ``text``, read by the native table's grammar and bounds; ValueError names
        the variable, the problem and the accepted forms."""
        if not isinstance(text, str):
            raise TypeError(f"{self.name}: a setting's value is text, not {type(text).__name__}")
        return _native.parse_setting(self.name, text)


SETTINGS: tuple[Setting, ...] = tuple(Setting(**row) for row in _native.settings())
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
