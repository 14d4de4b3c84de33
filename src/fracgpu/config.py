"""The node's configuration file: one set of books per node.

``/etc/fracgpu/fracgpu.conf`` names the state folder, its group, the ledger and
the real libraries for every user, shell and service on the node, so they all
meet the same promises, in a folder that survives logout (``/var/lib/fracgpu``,
say). Without it, each user's default holds (``FRACGPU_STATE_DIR`` and the
per-user folders). ``FRACGPU_CONFIG=PATH`` names the file to use when
``/etc/fracgpu/fracgpu.conf`` does not exist; the fixed path is looked at first,
so no process escapes the node's file by pointing elsewhere.

The format (``key = value`` lines, ``#`` comments; keys are the settings
without ``FRACGPU_``, in lower case)::

    state_dir = /var/lib/fracgpu
    state_group = gpu
    ledger = /var/lib/fracgpu/ledger.sqlite
    # partition = team-a      (a container's file: binds every process to it)

is parsed by one implementation, the shim's (``fracgpu/node_config.h``), which
the package reads through ``_native``: the shims, the CLI and the library can
never disagree about it. The file wins over the environment: a ``FRACGPU_*``
variable that contradicts it is not obeyed (the shim says so once on stderr;
``fracgpu run`` and ``fracgpu.init()`` refuse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fracgpu import _native, settings

__all__ = ["PATH", "VARIABLE", "KEYS", "ConfigError", "NodeConfig", "read", "check_environment", "text"]

PATH: str = _native.NODE_CONFIG_PATH
VARIABLE = settings.CONFIG
# The settings the file may hold, by key.
KEYS: dict[str, str] = {name[len(settings.PREFIX):].lower(): name for name in (
    settings.STATE_DIR, settings.STATE_GROUP, settings.LEDGER, settings.REAL_LIBCUDA, settings.REAL_LIBNVML,
    settings.PARTITION)}


class ConfigError(ValueError):
    """The node's configuration file cannot be used (the message names the file, line and key), or
    this process's environment contradicts it."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """The node's configuration as every fracgpu part reads it."""

    path: str | None                 # the file; None: there is none (per-user defaults)
    values: Mapping[str, str]        # by variable name: {"FRACGPU_STATE_DIR": "/var/lib/fracgpu"}
    ignored: tuple[str, ...] = ()    # variables of this process's environment that it overrides
    message: str = ""                # one line saying so, when there are

    def get(self, name: str) -> str | None:
        """The file's value of setting ``name`` (``settings.STATE_DIR``), None when it does not say."""
        return self.values.get(name)

    @property
    def partition(self) -> str | None:
        """The partition the file binds every process to (a container's file), None when none."""
        return self.values.get(settings.PARTITION)


def read(path: str | None = None) -> NodeConfig:
    """This process's node configuration (``path``: parse that file instead). ConfigError for a file
    that cannot be read or parsed, naming the file, line and key."""
    try:
        raw = _native.node_config(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return NodeConfig(path=raw["path"], values=dict(raw["values"]), ignored=tuple(raw["ignored"]),
                      message=raw["message"])


def check_environment() -> NodeConfig:
    """The node configuration, after checking this process's environment does not contradict it:
    ConfigError naming the variables that would not be obeyed, and what to do."""
    config = read()
    if config.ignored:
        raise ConfigError(f"{config.message}; unset {', '.join(config.ignored)} (the node's settings come from "
                          f"{config.path})")
    return config


def text(values: Mapping[str, str], comment: str = "") -> str:
    """A configuration file holding ``values`` (by variable name), as ``read`` parses it back;
    ``comment`` heads it. ValueError for a setting the file cannot hold or a value with a line break."""
    names = {name: key for key, name in KEYS.items()}
    lines = [f"# {line}" for line in comment.splitlines()]
    for name, value in values.items():
        if name not in names:
            raise ValueError(f"{name} cannot be set in the node's configuration (it holds {', '.join(KEYS)})")
        if "\n" in value or "\r" in value or "#" in value:
            raise ValueError(f"{name}={value!r}: a value in the node's configuration has no line break and no '#'")
        lines.append(f"{names[name]} = {value}")
    return "\n".join(lines) + "\n"
