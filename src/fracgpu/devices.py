"""The GPUs this machine has, as a job would see them: index, UUID, name, memory.

The CUDA driver is asked in a child process (``fracgpu/exercise/device_probe.py``: ``probe_command``),
never in the caller: a process that loads the driver can no longer put the
fracgpu shim in front of it (``fracgpu.init()``), and the command line stays
free of driver state. The child sees the devices a job would see
(``CUDA_VISIBLE_DEVICES`` as it is set), but never through the shim: entries
of ``LD_PRELOAD`` that are the shim, and the variables that would put the
child in a partition, are dropped from its environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping

from fracgpu import settings, shim
from fracgpu.exercise.device_probe import list_devices, pci_bus_id, uuid_text

__all__ = ["Device", "DeviceError", "Numbering", "numbering", "pci_bus_id", "probe", "probe_environment",
           "uuid_text", "visibility_mask"]

PROBE_TIMEOUT_S = 120   # cuInit on a machine with many GPUs can take tens of seconds


# What to show while the driver is asked (it can take a minute on a real GPU): a context manager
# around each probe. The library shows nothing; the command line puts a spinner here.
probe_progress: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class DeviceError(RuntimeError):
    """No usable CUDA driver or device; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Device:
    index: int          # CUDA device ordinal, as CUDA_VISIBLE_DEVICES makes them
    uuid: str           # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", the key of its shared state
    name: str
    total_memory: int   # bytes
    pci_bus_id: str = ""   # "00000000:3B:00.0", as NVML and dcgm-exporter write it; "" when the driver cannot say
    compute_capability: str = ""   # "9.0" (major.minor); "" when the driver cannot say
    driver_version: str = ""       # the CUDA version the driver implements (cuDriverGetVersion), "13.0"; or ""
    nvidia_driver_version: str = ""   # the NVIDIA driver's own version (NVML), "580.65.06"; or ""
    # What the device itself (NVML) says each process holds on it, contexts included, when the
    # probe looked: ((pid, bytes), ...); None when NVML cannot say.
    processes: tuple[tuple[int, int], ...] | None = dataclasses.field(default=None, compare=False)


def probe_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without the shim: no partition, no shim preloaded."""
    env = dict(os.environ if env is None else env)
    for name in settings.JOB_VARIABLES:
        env.pop(name, None)
    if "LD_PRELOAD" in env:
        nvml = shim.nvml_shim_path() if shim.is_installed() else None
        kept = [entry for entry in shim.split_preload(env["LD_PRELOAD"])
                if not shim.is_shim(entry) and not (nvml and shim.is_shim(entry, nvml))]
        if kept:
            env["LD_PRELOAD"] = ":".join(kept)
        else:
            del env["LD_PRELOAD"]
    return env


def probe_command() -> list[str]:
    """The probe's command line: ``fracgpu/exercise/device_probe.py`` run by an interpreter without its site
    hooks (``-S``: site-packages' ``.pth`` files, which the probe does not need and which can cost
    it tens of milliseconds); the probe imports nothing beyond ctypes and json. Where the file is
    not on disk (a zipped install), ``python -m fracgpu.devices``."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exercise", "device_probe.py")
    if os.path.isfile(script):
        return [sys.executable, "-S", script]
    return [sys.executable, "-m", "fracgpu.devices"]


def probe(env: Mapping[str, str] | None = None) -> list[Device]:
    """The CUDA devices a job started with ``env`` (default: this process's) would see.

    Raises DeviceError, with what to do, when there is no driver or no device."""
    try:
        with probe_progress():
            result = subprocess.run(probe_command(), env=probe_environment(env),
                                    capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the CUDA driver did not list the devices within {PROBE_TIMEOUT_S} s") from None
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise DeviceError(f"cannot list the CUDA devices: the probe failed ({detail})")
    if "error" in answer:
        raise DeviceError(answer["error"])
    return [Device(**{**d, "processes": None if d.get("processes") is None
                      else tuple((int(pid), int(used)) for pid, used in d["processes"])})
            for d in answer["devices"]]


VISIBILITY = "CUDA_VISIBLE_DEVICES"


def visibility_mask(env: Mapping[str, str] | None = None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` in ``env`` (default ``os.environ``) when it is set: CUDA then numbers
    only the devices it names, from 0, in its order. None when every device is visible."""
    value = (os.environ if env is None else env).get(VISIBILITY)
    return value if value is not None else None


@dataclasses.dataclass(frozen=True)
class Numbering:
    """The GPUs of this machine, numbered as a job started with some environment sees them.

    ``visible`` are the devices CUDA shows that job, at their CUDA index; ``present`` every
    device of the machine (probed without the mask); ``mask`` the ``CUDA_VISIBLE_DEVICES`` in
    effect, or None."""

    visible: tuple[Device, ...]
    present: tuple[Device, ...]
    mask: str | None = None

    def index(self, uuid: str) -> int | None:
        """The CUDA index a job would pass for GPU ``uuid``; None when the mask hides it or it is gone."""
        return next((d.index for d in self.visible if d.uuid == uuid), None)

    def device(self, uuid: str) -> Device | None:
        """GPU ``uuid`` as the job sees it; None when hidden or gone."""
        return next((d for d in self.visible if d.uuid == uuid), None)

    def exists(self, uuid: str) -> bool:
        """Whether GPU ``uuid`` is on this machine now, visible or not (state of a GPU that is gone,
        such as a simulated one that was removed, is stale)."""
        return any(d.uuid == uuid for d in self.present)

    def describe(self, uuid: str) -> str:
        """``GPU 1`` for a visible GPU; else why it has no index."""
        index = self.index(uuid)
        if index is not None:
            return f"GPU {index}"
        if self.exists(uuid):
            return f"GPU hidden by {VISIBILITY}={self.mask}"
        return "GPU gone (stale state)"

    def note(self) -> str | None:
        """What to say when a mask renumbers the GPUs; None without one."""
        if self.mask is None:
            return None
        return (f"{VISIBILITY}={self.mask} is in effect: GPUs are numbered as the jobs started here see them "
                f"({len(self.visible)} of this machine's {len(self.present)})")


def numbering(env: Mapping[str, str] | None = None) -> Numbering:
    """How a job started with ``env`` (default: this process's) numbers the GPUs; DeviceError when
    there is no driver or no device."""
    env = dict(os.environ if env is None else env)
    mask = visibility_mask(env)
    visible = tuple(probe(env)) if mask is None or mask.strip() else ()
    if mask is None:
        return Numbering(visible, visible, None)
    unmasked = {k: v for k, v in env.items() if k != VISIBILITY}
    return Numbering(visible, tuple(probe(unmasked)), mask)


if __name__ == "__main__":
    print(json.dumps(list_devices()))
