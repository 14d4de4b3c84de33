"""The shared state as plain Python values: partitions and processes of each GPU.

Every GPU fracgpu has governed has a region, a file in the state folder
(``$FRACGPU_STATE_DIR``, else a per-user default) that the shim in every job
maps; ``fracgpu._native`` reads and changes it. This module is the one place
the Python side touches ``_native`` for the state: ``usage()``, partitions,
jobs, the recorder and the ledger all go through it, and get typed objects
(``Region``, ``PartitionUsage``, ``ProcessSlot``), never the native dicts.
"""

from __future__ import annotations

import dataclasses
import os

from fracgpu import _native
from fracgpu.units import format_size

__all__ = ["GPUUsage", "PartitionUsage", "ProcessUsage", "ProcessSlot", "Region", "StateError", "DoesNotFit", "usage",
           "resolve_state_dir", "open_regions", "open_region", "open_region_file", "region_files", "check_state_dir",
           "check_may_change_partitions", "check_partition_name", "check_memory_limit", "MAX_PARTITIONS",
           "partition_names", "process_start_time", "process_alive", "pid_namespace", "namespace_pid", "host_pid_of"]

StateError = _native.StateError
# The host's pid namespace (its inode is fixed by the kernel): only there is every process visible.
INITIAL_PID_NAMESPACE: int = _native.INITIAL_PID_NAMESPACE


class DoesNotFit(StateError, ValueError):
    """A memory limit or compute share that does not fit beside what its GPU has promised: the
    message names the promises, to whom, and what remains. Pass overcommit to make the partition
    best effort."""


# The most partitions one GPU's state holds, private ones included.
MAX_PARTITIONS: int = _native.MAX_PARTITIONS


def _promise_refused(e: StateError) -> StateError:
    """``e`` as DoesNotFit when it refused a promise that does not fit, else as it is."""
    text = str(e)
    return DoesNotFit(text) if _native.DOES_NOT_FIT in text or _native.SHARE_DOES_NOT_FIT in text else e


@dataclasses.dataclass
class PartitionUsage:
    name: str
    memory_limit: int | None   # bytes; None: no limit (the whole device)
    used: int                  # bytes its processes hold now: their books, and the drift charged
    peak: int                  # the most they held at once
    processes: int             # processes in it now
    ephemeral: bool            # made for one job (`fracgpu run --memory`, init(memory=)), gone with it
    oom_refusals: int          # allocations refused because they would pass the limit
    compute_share: float | None = None   # fraction of the device's time; None: no share set
    compute_cap: bool = False            # the share is also a ceiling
    device_ns: int = 0                   # device time its kernels used, measured
    launches: int = 0                    # kernel and graph launches
    # Its limit did not fit beside the GPU's promises and was overcommitted: a ceiling, not a
    # promise (it uses only memory nobody was promised, up to its limit).
    best_effort: bool = False
    # Its compute share did not fit beside the shares promised in its class and was overcommitted:
    # the gate weighs it within what the promised shares leave.
    compute_best_effort: bool = False
    priority: str = "normal"             # the launch gate's class: high, normal or low
    # The most it may hold now: its limit when that is a promise, else what nobody else was promised
    # (up to its limit, when it has one). 0 when read from nowhere that knows.
    memory_ceiling: int = 0
    # Ground truth (the device's own per-process figure, NVML): the sum of its processes' known
    # drifts (device less books, signed), the positive part charged (memory the books missed,
    # inside `used`), the most that was charged at once, and how many of its processes the
    # device does not list (their drift is unknown).
    drift: int = 0
    drift_charged: int = 0
    drift_peak: int = 0
    drift_unknown: int = 0


# What is known of a process's memory on the device: "known" (device_used and drift hold),
# "unknown" (the device does not list it: another pid namespace), "pending" (no context yet, or
# not yet reconciled).
TRUTH_STATES = ("known", "unknown", "pending")


@dataclasses.dataclass
class ProcessUsage:
    pid: int
    partition: str
    command: str
    used: int                       # bytes on its books
    peak: int
    device_ns: int = 0
    launches: int = 0
    truth: str = "pending"          # one of TRUTH_STATES
    device_used: int | None = None  # what the device reports it holds; None unless truth is "known"
    drift: int | None = None        # device_used - used at the last reconciliation (signed); None: not known
    drift_charged: int = 0          # its positive drift, charged to its partition
    holder: int = 0                 # the pid recording its job (its ledger row's recorder); 0: none


@dataclasses.dataclass(frozen=True)
class ProcessSlot:
    """A process's slot in a region, as the shim keeps it (ended ones included, for their recorder)."""

    pid: int
    partition: str
    command: str
    used: int
    peak: int
    start_time: int          # the process's start time (clock ticks), so a reused pid is not taken for it
    attached_unix_ns: int    # when it attached to the GPU
    device_ns: int
    launches: int
    holder: int              # the pid recording its job (FRACGPU_JOB_HOLDER); 0: none
    exited: bool             # ended, kept until its holder has read it
    truth: str               # one of TRUTH_STATES
    device_used: int         # the device's figure (0 unless truth is "known")
    drift: int               # device_used - used at the last reconciliation (0 unless known)
    drift_charged: int       # its positive drift, charged to its partition
    join_wait_ns: int = 0    # how long its start waited for the region's lock (another process's table change)
    measure_wait_ns: int = 0   # how long its first context waited for the GPU's measurement lock
    pid_ns: int = 0          # its pid namespace (inode of /proc/<pid>/ns/pid); `pid` is that namespace's
    slot: int = -1           # its index in the region's table (for adopt, reconcile, collect)

    def usage(self) -> ProcessUsage:
        known = self.truth == "known"
        return ProcessUsage(pid=self.pid, partition=self.partition, command=self.command, used=self.used,
                            peak=self.peak, device_ns=self.device_ns, launches=self.launches, truth=self.truth,
                            device_used=self.device_used if known else None, drift=self.drift if known else None,
                            drift_charged=self.drift_charged, holder=self.holder)


@dataclasses.dataclass
class GPUUsage:
    uuid: str
    name: str
    total_memory: int
    partitions: list[PartitionUsage]
    processes: list[ProcessUsage]

    @property
    def promised(self) -> int:
        """Bytes its partitions are promised: their limits, the best-effort (overcommitted) ones aside."""
        return sum(p.memory_limit or 0 for p in self.partitions if not p.best_effort)


class Region:
    """One GPU's region of the shared state: typed reads, and the partition changes."""

    def __init__(self, native: _native.Region):
        self._native = native

    @property
    def uuid(self) -> str:
        return self._native.uuid

    @property
    def device_name(self) -> str:
        return self._native.device_name

    @property
    def total_memory(self) -> int:
        return self._native.total_memory

    def reap(self, *, quick: bool = False) -> int:
        """Drop dead processes, giving their memory back (ended ones a holder still reads are kept);
        returns how many slots were freed. ``quick``: a process is dead when its pid is gone, found
        without reading /proc (a pid reused since is left to the next full reap)."""
        return self._native.reap(quick)

    def reap_all_namespaces(self) -> int:
        """Drop dead processes of every pid namespace (``reap`` judges only this process's own, since a
        pid of another namespace names some other process here): a slot of another namespace is dead
        when no process visible here is it (``host_pid_of``). Only a process in the host's pid
        namespace (the node agent) sees them all; elsewhere this is ``reap()``. Returns how many."""
        return self._native.reap_all_namespaces()

    def collect(self, holder: int) -> int:
        """Free the slots of ``holder``'s ended processes, once it has read them; returns how many."""
        return self._native.collect(holder)
    def collect(self, holder: int, slot: int = -1) -> int:
        """Free the slots of ``holder``'s ended processes (only ``slot`` when given), once it has read
        them; returns how many."""
        return self._native.collect(holder, slot)

    def adopt(self, process: ProcessSlot, holder: int, previous: int = 0) -> bool:
        """Make the live process ``holder`` (the node agent) the holder of ``process``, when nobody
        else records it (no holder, ``holder`` already, or ``previous``: an earlier run of the same
        agent). Its slot is then kept, marked exited, when it ends, until the holder collects it."""
        return self._native.adopt(process.slot, process.pid, process.start_time, holder, previous)

    def reconcile(self, process: ProcessSlot, device_used: int, books: int) -> int:
        """Record what the device reports ``process`` holds (``device_used``) against its books
        (``books``, read around that figure), charging the positive drift to its partition, as the
        process's own shim does when the device lists it; returns the drift charged now."""
        return self._native.reconcile(process.slot, process.pid, True, device_used, books)

    def partitions(self) -> list[PartitionUsage]:
        return [PartitionUsage(name=p["name"], memory_limit=p["memory_limit"] or None, used=p["used"],
                               peak=p["peak"], processes=p["processes"], ephemeral=p["ephemeral"],
                               oom_refusals=p["oom_refusals"], compute_share=p["compute_share"] or None,
                               compute_cap=p["cap"], device_ns=p["device_ns"], launches=p["launches"],
                               best_effort=p["best_effort"], compute_best_effort=p["compute_best_effort"],
                               drift=p["drift"], drift_charged=p["drift_charged"],
                               drift_peak=p["drift_peak"], drift_unknown=p["drift_unknown"],
                               memory_ceiling=p["memory_ceiling"], priority=p["priority"])
                for p in self._native.partitions()]

    def partition(self, name: str) -> PartitionUsage | None:
        return next((p for p in self.partitions() if p.name == name), None)

    def processes(self) -> list[ProcessSlot]:
        return [ProcessSlot(**{field.name: p[field.name] for field in dataclasses.fields(ProcessSlot)})
                for p in self._native.processes()]

    def create_partition(self, name: str, limit: int, share: float, cap: bool, *,
                         overcommit: bool = False, priority: str = "normal") -> PartitionUsage:
        """Make partition ``name`` (limit 0: none; share 0: none) in class ``priority``; StateError when
        the name is taken, DoesNotFit when the limit does not fit beside the GPU's promises (the message
        names them and what remains) unless ``overcommit``, which makes it best effort."""
        try:
            self._native.create_partition(name, limit, share, cap, overcommit, _native.parse_priority(priority))
        except StateError as e:
            raise _promise_refused(e) from None
        return self.partition(name)

    def update_partition(self, name: str, limit: int | None, share: float | None, cap: bool | None, *,
                         overcommit: bool = False, priority: str | None = None) -> PartitionUsage:
        """Change what is given (None: keeps it; limit 0: no limit). A new limit is checked against the
        promises as ``create_partition`` does."""
        try:
            self._native.update_partition(name, limit, share, cap, overcommit,
                                          None if priority is None else _native.parse_priority(priority))
        except StateError as e:
            raise _promise_refused(e) from None
        return self.partition(name)

    def count_held_outside(self, processes: tuple[tuple[int, int], ...] | None) -> None:
        """Count what the device says (``devices.Device.processes``: NVML's (pid, bytes) list)
        processes unknown to this state hold: another state folder's jobs, jobs without fracgpu.
        Every later promise check of this object counts it as taken, and a refusal names them."""
        if not processes:
            return
        # NVML names processes by their pid here; a slot names its process in its own pid
        # namespace (a container's), so an unknown pid is looked up as its namespace names it.
        own = pid_namespace()
        known = {(p.pid_ns or own, p.pid) for p in self.processes() if not p.exited}

        def ours(pid: int) -> bool:
            return (own, pid) in known or namespace_pid(pid) in known

        outside = sorted(((pid, used) for pid, used in processes if used and not ours(pid)),
                         key=lambda item: -item[1])
        if not outside:
            return
        shown = ", ".join(f"pid {pid} {format_size(used)}" for pid, used in outside[:4])
        more = f" and {len(outside) - 4} more" if len(outside) > 4 else ""
        self._native.set_held_outside(sum(used for _, used in outside),
                                      f"{shown}{more}: another state folder's jobs, or jobs without fracgpu")

    def check_promise(self, name: str, limit: int, share: float = 0.0, priority: str = "normal") -> None:
        """DoesNotFit (naming the promises and what remains) unless a partition ``name`` with ``limit``
        and a compute ``share`` in class ``priority`` would fit beside this GPU's promises now.
        Creation checks again, atomically."""
        try:
            self._native.check_promise(name, limit, share, _native.parse_priority(priority))
        except StateError as e:
            raise _promise_refused(e) from None

    def remove_partition(self, name: str) -> None:
        """StateError when processes still use it (the message lists them)."""
        self._native.remove_partition(name)

    def usage(self) -> GPUUsage:
        """This region as plain values (reap it first to drop dead processes)."""
        return GPUUsage(uuid=self.uuid, name=self.device_name, total_memory=self.total_memory,
                        partitions=self.partitions(),
                        # exited: kept for a recorder, not running
                        processes=[p.usage() for p in self.processes() if not p.exited])


def check_state_dir(folder: str, *, create: bool) -> None:
    """StateError (with what to do) unless ``folder`` is a safe state folder; ``create`` makes it."""
    _native.check_state_dir(folder, create=create)


def check_memory_limit(limit: int) -> None:
    """ValueError, naming the smallest usable limit, for a memory limit of ``limit`` bytes that no
    CUDA context fits in (0, no limit, is usable)."""
    _native.check_memory_limit(limit)


def check_partition_name(name: str) -> str:
    """``name`` when it is a valid partition name; TypeError or ValueError saying why not."""
    if not isinstance(name, str):
        raise TypeError(f"a partition name must be a str, not {type(name).__name__}")
    if "\0" in name:
        raise ValueError("invalid partition name: it contains a NUL character")
    _native.valid_partition_name(name)
    return name


def region_files(folder: str) -> list[str]:
    """The region files in the state folder ``folder``."""
    return list(_native.region_files(folder))


def open_region_file(path: str) -> Region:
    """The region in file ``path``; StateError when it is foreign, truncated or of another layout."""
    return Region(_native.Region.open_file(path))


def open_region(folder: str, uuid: str, name: str, total_memory: int) -> Region:
    """The region of GPU ``uuid`` in ``folder``, made when it has none."""
    return Region(_native.Region.open(folder, uuid, name, total_memory, create=True))


def process_start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot); 0 when it does not run."""
    return _native.process_start_time(pid)


def pid_namespace(pid: int = 0) -> int:
    """The pid namespace (inode of ``/proc/<pid>/ns/pid``) of ``pid``, of this process for 0; 0 when gone."""
    return _native.pid_namespace(pid)


def namespace_pid(pid: int) -> tuple[int, int] | None:
    """Process ``pid`` (of this namespace) as its own pid namespace names it: (namespace, pid there),
    from ``/proc/<pid>/status`` ``NSpid`` and ``/proc/<pid>/ns/pid``; None when it is gone. What the
    device's NVML lists (host pids) maps to process slots this way."""
    found = _native.namespace_pid(pid)
    return None if found is None else (int(found[0]), int(found[1]))


def host_pid_of(pid_ns: int, pid: int, start_time: int = 0) -> int:
    """The pid here of the process that is ``pid`` in pid namespace ``pid_ns`` (and started at
    ``start_time``, 0: any); 0 when no process visible here is it (a scan of /proc)."""
    return _native.host_pid_of(pid_ns, pid, start_time)


def process_alive(pid: int, start_time: int) -> bool:
    """Whether process ``pid`` that started at ``start_time`` still runs (not a zombie, not a reused pid)."""
    return pid > 0 and start_time != 0 and process_start_time(pid) == start_time


def resolve_state_dir(folder: str | os.PathLike | None = None) -> str:
    """The state folder, absolute: the node configuration's, else ``folder``, else
    ``$FRACGPU_STATE_DIR``, else the per-user default. Where the node's file names one, ``folder``
    must be it (StateError otherwise: the shims use the node's, whatever a caller asks), and a file
    that cannot be parsed is refused (fracgpu.config.ConfigError)."""
    from fracgpu import config, settings

    node = config.read().get(settings.STATE_DIR)
    if node is not None:
        if folder is not None and os.path.abspath(os.fspath(folder)) != os.path.abspath(node):
            raise StateError(f"the node's configuration {config.read().path} names the state folder {node}; "
                             f"{os.fspath(folder)} cannot be used on this node")
        return os.path.abspath(node)
    return os.path.abspath(os.fspath(folder) if folder is not None else _native.default_state_dir())


def open_regions(folder: str | os.PathLike | None = None, *, reap: bool = True) -> list[Region]:
    """Every GPU's region in the state folder, dead processes reaped first.

    A folder that does not exist holds no regions. Raises StateError (with
    what to do) for an unsafe folder, or for any region file that is foreign,
    truncated or of another layout version: a job must not start beside a
    state nobody can read."""
    folder = resolve_state_dir(folder)
    try:
        os.lstat(folder)
    except FileNotFoundError:
        return []
    except OSError:
        pass   # it cannot be reached (a folder above it cannot be searched): check_state_dir says so
    check_state_dir(folder, create=False)
    regions = [open_region_file(path) for path in region_files(folder)]
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


def partition_names(state_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(name, GPU name) of every partition in the state folder, read without reaping (for shell
    completion, which must be quick and change nothing). StateError as ``open_regions``."""
    return [(p.name, region.device_name) for region in open_regions(state_dir, reap=False)
            for p in region.partitions()]


def usage(state_dir: str | os.PathLike | None = None) -> list[GPUUsage]:
    """Partitions and processes of every GPU in the state folder, with limits and bytes in use.

    Processes that died (even by SIGKILL) are reaped first, so their memory is
    back with their partition and private partitions of finished jobs are gone.
    Raises StateError when the folder or a region file is unsafe or damaged."""
    return [region.usage() for region in open_regions(state_dir)]
