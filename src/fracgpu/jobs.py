"""What a job under fracgpu is given: its partition and the environment that enforces it.

``fracgpu run`` (for a command) and ``fracgpu.init()`` (for the calling
process) both come here, so they accept and refuse the same things. The shim
in the job reads the variables set here:

- ``FRACGPU_PARTITION``: the partition the job belongs to;
- ``FRACGPU_MEMORY``: when set, that partition is made for the job (private,
  gone with its last process) with this limit, as written (``4GiB``, ``25%``);
- ``FRACGPU_COMPUTE`` (``25%`` or ``0.25``) and ``FRACGPU_COMPUTE_CAP=1``: the
  private partition's share of the device's time, and whether it is a ceiling;
- ``FRACGPU_STATE_DIR``: the state folder, absolute;
- ``FRACGPU_OOM_WAIT``: seconds an allocation over the quota waits for memory;
- ``FRACGPU_REAL_LIBCUDA``: the real driver the shim forwards to;
- ``LD_PRELOAD``: the shim first, for the job and every process it starts.

Everything is checked before a job starts, so a mistake is one clear message
here rather than CUDA refused inside the job.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

from fracgpu import _native, devices, shim, state
from fracgpu.units import format_size, parse_size

__all__ = ["partition_variables", "job_environment", "parse_memory", "parse_compute", "parse_oom_wait",
           "check_partition_name"]

_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_memory(memory: str | int) -> tuple[int, float]:
    """(bytes, 0.0) for a size, (0, fraction) for a percentage of the device. Raises ValueError/TypeError."""
    if isinstance(memory, str):
        return _native.parse_size(memory)
    return parse_size(memory), 0.0


def parse_compute(share: str | float) -> float:
    """A share of the device's time: ``"25%"``, ``"0.25"`` or 0.25, in (0, 1]. Raises ValueError/TypeError."""
    if isinstance(share, str):
        return _native.parse_share(share)
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise TypeError(f"a compute share must be a fraction like 0.25 or text like '25%', not {type(share).__name__}")
    if not (math.isfinite(share) and 0 < share <= 1):
        raise ValueError(f"invalid compute share {share!r}: give a fraction in (0, 1] like 0.25, or '25%'")
    return float(share)


def memory_text(memory: str | int) -> str:
    """``memory`` as ``FRACGPU_MEMORY`` carries it: the text as given, or the byte count."""
    return memory if isinstance(memory, str) else str(memory)


def parse_oom_wait(value: str | float | int) -> float:
    """Seconds from ``FRACGPU_OOM_WAIT`` text or a number: finite and >= 0. Raises ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"the out-of-memory wait must be a number of seconds, not {type(value).__name__}")
    seconds = float(value) if not isinstance(value, str) or _SECONDS.fullmatch(value) else -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"invalid out-of-memory wait {value!r}: give seconds, a number >= 0 like 30 or 2.5")
    return seconds


def check_partition_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a partition name must be a str, not {type(name).__name__}")
    if "\0" in name:
        raise ValueError("invalid partition name: it contains a NUL character")
    _native.valid_partition_name(name)
    return name


def check_memory_fits(memory: str | int, env: Mapping[str, str] | None = None) -> None:
    """A limit in bytes must fit every device the job sees (each gets the limit); a
    percentage always does. Raises ValueError, or DeviceError when there is no GPU."""
    size, fraction = parse_memory(memory)
    if fraction:
        return
    for device in devices.probe(env):
        check_fits(size, device)


def check_fits(size: int, device: devices.Device) -> None:
    if size > device.total_memory:
        raise ValueError(f"memory limit {format_size(size)} is above the {format_size(device.total_memory)} of GPU "
                         f"{device.index} ({device.name}, {device.uuid}); ask for at most "
                         f"{format_size(device.total_memory)}, or a percentage like 50%")


def check_choice(memory, compute, cap, partition) -> None:
    """A job is either in a private partition (memory and/or compute given) or in a named one."""
    if partition is not None and (memory is not None or compute is not None or cap):
        raise TypeError("a job joining partition "
                        f"'{partition}' gets that partition's memory and compute; give either partition or "
                        "memory/compute (a private partition), not both")
    if partition is None and memory is None and compute is None:
        raise TypeError("give memory and/or compute (a private partition with that limit and share), or "
                        "partition (the name of an existing partition)")
    if cap and compute is None:
        raise ValueError("a compute cap needs a compute share to cap at: give compute (--compute) with cap (--cap)")


def partition_variables(*, private_name: str, memory: str | int | None = None, partition: str | None = None,
                        oom_wait: str | float | None = None, state_dir: str | os.PathLike | None = None,
                        env: Mapping[str, str] | None = None, compute: str | float | None = None,
                        cap: bool = False) -> dict[str, str | None]:
    """The ``FRACGPU_*`` variables that put a job in its partition (None: to unset), after checking them all.

    Exactly one of ``memory`` (a private partition called ``private_name``,
    made when the job starts CUDA) and ``partition`` (an existing one's name).
    Raises TypeError or ValueError for a bad value (size grammar, a limit above
    the device, an unknown or invalid partition, a bad wait), StateError for
    an unsafe state folder or a damaged state file, DeviceError when a size
    must be checked against a GPU and none is found."""
    check_choice(memory, compute, cap, partition)
    if memory is not None:
        parse_memory(memory)
    if compute is not None:
        parse_compute(compute)
    if partition is not None:
        check_partition_name(partition)
    env = os.environ if env is None else env
    if oom_wait is not None:
        parse_oom_wait(oom_wait)
    elif env.get("FRACGPU_OOM_WAIT"):   # passed on as it is, but never one the shim would refuse
        try:
            parse_oom_wait(env["FRACGPU_OOM_WAIT"])
        except ValueError as e:
            raise ValueError(f"FRACGPU_OOM_WAIT: {e}") from None
    folder = state.resolve_state_dir(state_dir)
    _native.check_state_dir(folder, create=True)
    regions = state.open_regions(folder)   # every region must be readable, and dead jobs are reaped
    if partition is not None and not any(p["name"] == partition for r in regions for p in r.partitions()):
        raise ValueError(f"partition '{partition}' does not exist (state folder {folder}); `fracgpu partition "
                         f"list` shows the partitions, `fracgpu partition create {partition} --memory SIZE` "
                         "makes one")
    if memory is not None:
        check_memory_fits(memory, env)
    variables: dict[str, str | None] = {
        "FRACGPU_PARTITION": partition if partition is not None else private_name,
        "FRACGPU_STATE_DIR": folder,
        # None: unset, so a size inherited from an outer job never turns a shared partition private.
        "FRACGPU_MEMORY": memory_text(memory) if memory is not None else None,
        "FRACGPU_COMPUTE": (compute if isinstance(compute, str) else repr(float(compute))) if compute is not None
        else None,
        "FRACGPU_COMPUTE_CAP": "1" if cap else None,
    }
    if oom_wait is not None:
        variables["FRACGPU_OOM_WAIT"] = oom_wait if isinstance(oom_wait, str) else repr(float(oom_wait))
    return variables


def job_environment(variables: Mapping[str, str | None], env: Mapping[str, str] | None = None,
                    shim_library: str | os.PathLike | None = None) -> dict[str, str | None]:
    """``variables`` plus what loads the shim in a job started with ``env`` (default ``os.environ``):
    ``LD_PRELOAD`` with the shim first, and ``FRACGPU_REAL_LIBCUDA`` when it is not set already
    and the real driver is found; None marks a variable to unset. FileNotFoundError when the shim
    is not installed."""
    env = os.environ if env is None else env
    library = os.fspath(shim_library) if shim_library is not None else os.fspath(shim.shim_path())
    out = dict(variables)
    # NVML (nvidia-smi, pynvml, torch's device queries) shows the same quota, through its own shim.
    nvml = shim.nvml_shim_path(library)
    out["LD_PRELOAD"] = shim.preload_with_shim(env.get("LD_PRELOAD"), library, *([nvml] if nvml else []))
    if not env.get("FRACGPU_REAL_LIBCUDA"):
        real = shim.find_real_driver(env, library)
        if real:
            out["FRACGPU_REAL_LIBCUDA"] = real
    return out
