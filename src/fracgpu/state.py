"""The shared state as plain Python values: partitions and processes of each GPU.

Every GPU fracgpu has governed has a region, a file in the state folder
(``$FRACGPU_STATE_DIR``, else a per-user default) that the shim in every job
maps; ``fracgpu._native`` reads and changes it. This module is the one place
the Python side opens regions: ``usage()``, the partition commands,
``fracgpu run`` and ``fracgpu.init()`` all go through it.
"""

from __future__ import annotations

import dataclasses
import os

from fracgpu import _native

__all__ = ["GPUUsage", "PartitionUsage", "ProcessUsage", "StateError", "usage", "resolve_state_dir", "open_regions",
           "check_may_change_partitions"]

StateError = _native.StateError


@dataclasses.dataclass
class PartitionUsage:
    name: str
    memory_limit: int | None   # bytes; None: no limit (the whole device)
    used: int                  # bytes its processes hold now
    peak: int                  # the most they held at once
    processes: int             # processes in it now
    ephemeral: bool            # made for one job (`fracgpu run --memory`, init(memory=)), gone with it
    oom_refusals: int          # allocations refused because they would pass the limit
    compute_share: float | None = None   # fraction of the device's time; None: no share set
    compute_cap: bool = False            # the share is also a ceiling
    device_ns: int = 0                   # device time its kernels used, measured
    launches: int = 0                    # kernel and graph launches


@dataclasses.dataclass
class ProcessUsage:
    pid: int
    partition: str
    command: str
    used: int
    peak: int
    device_ns: int = 0
    launches: int = 0


@dataclasses.dataclass
class GPUUsage:
    uuid: str
    name: str
    total_memory: int
    partitions: list[PartitionUsage]
    processes: list[ProcessUsage]


def resolve_state_dir(folder: str | os.PathLike | None = None) -> str:
    """The state folder, absolute: ``folder``, else ``$FRACGPU_STATE_DIR``, else the per-user default."""
    return os.path.abspath(os.fspath(folder) if folder is not None else _native.default_state_dir())


def open_regions(folder: str | os.PathLike | None = None, *, reap: bool = True) -> list[_native.Region]:
    """Every GPU's region in the state folder, dead processes reaped first.

    A folder that does not exist holds no regions. Raises StateError (with
    what to do) for an unsafe folder, or for any region file that is foreign,
    truncated or of another layout version: a job must not start beside a
    state nobody can read."""
    folder = resolve_state_dir(folder)
    if not os.path.lexists(folder):
        return []
    _native.check_state_dir(folder, create=False)
    regions = [_native.Region.open_file(path) for path in _native.region_files(folder)]
    if reap:
        for region in regions:
            region.reap()
    return regions


def check_may_change_partitions(folder: str | os.PathLike) -> None:
    """Partitions are made, changed and removed by whoever owns the state folder. On a host
    where it is shared with a group (``FRACGPU_STATE_GROUP``), the other members run jobs in
    them, and in private partitions of their own, but cannot change a quota or a share, their
    own included. Raises PermissionError naming the owner."""
    owner = os.stat(folder).st_uid
    if owner != os.geteuid():
        raise PermissionError(f"only the owner of the state folder {folder} (uid {owner}) may create, change or "
                              "remove partitions; run jobs in them with `fracgpu run --partition NAME`, or give a "
                              "job a private partition with `fracgpu run --memory SIZE`")


def read(region: _native.Region) -> GPUUsage:
    """One region as plain values (reap it first to drop dead processes)."""
    partitions = [PartitionUsage(name=p["name"], memory_limit=p["memory_limit"] or None, used=p["used"],
                                 peak=p["peak"], processes=p["processes"], ephemeral=p["ephemeral"],
                                 oom_refusals=p["oom_refusals"], compute_share=p["compute_share"] or None,
                                 compute_cap=p["cap"], device_ns=p["device_ns"], launches=p["launches"])
                  for p in region.partitions()]
    processes = [ProcessUsage(pid=p["pid"], partition=p["partition"], command=p["command"], used=p["used"],
                              peak=p["peak"], device_ns=p["device_ns"], launches=p["launches"])
                 for p in region.processes() if not p["exited"]]   # exited: kept for a recorder, not running
    return GPUUsage(uuid=region.uuid, name=region.device_name, total_memory=region.total_memory,
                    partitions=partitions, processes=processes)


def usage(state_dir: str | os.PathLike | None = None) -> list[GPUUsage]:
    """Partitions and processes of every GPU in the state folder, with limits and bytes in use.

    Processes that died (even by SIGKILL) are reaped first, so their memory is
    back with their partition and private partitions of finished jobs are gone.
    Raises StateError when the folder or a region file is unsafe or damaged."""
    return [read(region) for region in open_regions(state_dir)]
