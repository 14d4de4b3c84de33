"""The simulated GPU: its configuration, and the environment that selects it.

fracgpu builds a ``libcuda.so.1`` that simulates a GPU over host memory and
installs it in ``fracgpu/_sim``. Putting that folder first on
``LD_LIBRARY_PATH`` makes every ``dlopen("libcuda.so.1")`` in a job find it
instead of a real driver. The simulated driver reads its devices from the
``FRACGPU_SIM_*`` variables written here, by the settings table's grammars and
bounds (``fracgpu.settings``), as this package does.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import shlex
from collections.abc import Callable, Mapping

from fracgpu import settings
from fracgpu.units import format_size

__all__ = ["SimConfig", "ConfigError", "library_dir", "environment", "shell_exports", "selected", "without",
           "kernel_stand_in"]

# The simulated driver's bounds and defaults are the settings table's.
MAX_MEMORY = settings.by_name(settings.SIM_MEMORY).high
MAX_SMS = settings.by_name(settings.SIM_SMS).high
MAX_DEVICES = settings.by_name(settings.SIM_DEVICES).high
MAX_NAME_BYTES = settings.by_name(settings.SIM_NAME).high
# What each simulated context reserves by default: 1/256 of the device, as a real context takes 300-600 MiB of an
# 80-141 GiB H100/H200 (64MiB of the default 16GiB).
CONTEXT_SHARE = settings.SIM_CONTEXT_SHARE


class ConfigError(ValueError):
    """A setting of SimConfig is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.problem = message


@dataclasses.dataclass
class SimConfig:
    """The simulated GPU(s): every device gets the same memory, SMs and name."""

    # The defaults are the settings table's, the ones the simulated driver has when a variable is unset.
    memory: int = settings.default(settings.SIM_MEMORY)  # bytes per device
    sms: int = settings.default(settings.SIM_SMS)
    devices: int = settings.default(settings.SIM_DEVICES)
    name: str = settings.default(settings.SIM_NAME)
    # Bytes each context reserves on its device; None: the simulated driver's default, CONTEXT_SHARE of the memory.
    context_memory: int | None = None
    state_dir: str | None = None  # where the shared simulated GPU keeps its file

    def reserved_per_context(self) -> int:
        """What each context reserves on a device: ``context_memory``, or the default share of the memory."""
        if self.context_memory is None:
            return self.memory // CONTEXT_SHARE if isinstance(self.memory, int) else 0
        return self.context_memory

    def validate(self) -> None:
        """Raises ConfigError (a ValueError) naming the first bad setting."""
        _check_int("memory", self.memory, 1, MAX_MEMORY, f"at least 1 byte and at most {format_size(MAX_MEMORY)}",
                   format_size)
        _check_int("sms", self.sms, 1, MAX_SMS, f"between 1 and {MAX_SMS}")
        _check_int("devices", self.devices, 1, MAX_DEVICES, f"between 1 and {MAX_DEVICES}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name", "must be a non-empty string")
        if not self.name.isprintable():
            raise ConfigError("name", f"must be printable text (no control characters), not {self.name!r}")
        if len(self.name.encode()) > MAX_NAME_BYTES:
            raise ConfigError("name", f"must be at most {MAX_NAME_BYTES} bytes long (UTF-8)")
        _check_int("context_memory", self.reserved_per_context(), 0, self.memory - 1,
                   f"less than the device's memory ({format_size(self.memory)})", format_size)
        if self.state_dir is not None:
            if not isinstance(self.state_dir, (str, os.PathLike)) or not os.fspath(self.state_dir):
                raise ConfigError("state_dir", "must be a non-empty path")
            if "\0" in os.fspath(self.state_dir):
                raise ConfigError("state_dir", "must not contain a NUL character")


def _check_int(field: str, value: object, low: int, high: int, expected: str,
               show: Callable[[int], str] = str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        shown = show(value) if 0 <= value < 2**63 else str(value)
        raise ConfigError(field, f"must be {expected}, not {shown}")


def library_dir() -> pathlib.Path:
    """The installed folder holding the simulated ``libcuda.so.1``."""
    folder = importlib.resources.files("fracgpu") / "_sim"
    if not (folder / "libcuda.so.1").is_file():
        raise FileNotFoundError(
            f"the simulated CUDA driver is not installed ({folder}/libcuda.so.1 is missing); "
            "install fracgpu with pip (`pip install .` in a checkout) to build it"
        )
    return pathlib.Path(str(folder))


def _is_library_dir(entry: str) -> bool:
    try:
        return bool(entry) and os.path.realpath(entry) == os.path.realpath(library_dir())
    except FileNotFoundError:
        return False


def selected(env: Mapping[str, str]) -> bool:
    """Whether ``env`` runs jobs on the simulated GPU (its folder is on ``LD_LIBRARY_PATH``)."""
    return any(_is_library_dir(entry) for entry in env.get("LD_LIBRARY_PATH", "").split(":"))


def without(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the simulated driver's folder taken off ``LD_LIBRARY_PATH``: jobs find the real driver."""
    out = dict(env)
    if "LD_LIBRARY_PATH" in out:
        out["LD_LIBRARY_PATH"] = ":".join(e for e in out["LD_LIBRARY_PATH"].split(":") if e and not _is_library_dir(e))
    return out


def kernel_stand_in() -> str:
    """A module file for cuModuleLoad when fracgpu was built without its kernels: the simulated driver
    runs its kernels by name from any module file (a real driver would refuse it)."""
    return str(library_dir() / "libcuda.so.1")


def environment(config: SimConfig, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to set (on top of ``base_env``) to run a job on the simulated GPU."""
    config.validate()
    lib = str(library_dir())
    env = {
        settings.SIM_MEMORY: str(config.memory),
        settings.SIM_SMS: str(config.sms),
        settings.SIM_DEVICES: str(config.devices),
        settings.SIM_NAME: config.name,
        settings.SIM_CONTEXT_MEMORY: str(config.reserved_per_context()),
    }
    if config.state_dir is not None:
        env[settings.SIM_DIR] = os.fspath(config.state_dir)
    existing = (os.environ if base_env is None else base_env).get("LD_LIBRARY_PATH", "")
    if existing == lib or existing.startswith(lib + ":"):
        env["LD_LIBRARY_PATH"] = existing
    else:
        env["LD_LIBRARY_PATH"] = f"{lib}:{existing}" if existing else lib
    return env


def shell_exports(config: SimConfig) -> str:
    """``export`` lines for a POSIX shell; LD_LIBRARY_PATH is extended in that shell."""
    lines = []
    for name, value in environment(config, base_env={}).items():
        if name == "LD_LIBRARY_PATH":
            # Expanded by the user's shell, so it keeps what is set there.
            lines.append(f"export LD_LIBRARY_PATH={shlex.quote(value)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}")
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"
