"""What a job under fracgpu is given: its partition and the environment that enforces it.

``fracgpu run`` (for a command), ``fracgpu.init()`` (for the calling
process), the Slurm prolog and the Ray integration all come here, so they
accept and refuse the same things. A job's options are parsed once, into a
``JobSpec``; every rule about them (a cap needs a share, a limit must fit the
device, a job is in a private partition or a named one) is checked here, once.
The shim in the job reads the variables set here (``fracgpu.settings``):

- ``FRACGPU_PARTITION``: the partition the job belongs to;
- ``FRACGPU_MEMORY``: when set, that partition is made for the job (private,
  gone with its last process) with this limit, as written (``4GiB``, ``25%``);
- ``FRACGPU_COMPUTE`` (``25%`` or ``0.25``) and ``FRACGPU_COMPUTE_CAP=1``: the
  private partition's share of the device's time, and whether it is a ceiling;
- ``FRACGPU_PRIORITY`` (``high``, ``normal``, ``low``): the private partition's
  priority class at the launch gate;
- ``FRACGPU_OVERCOMMIT=1``: the private partition's limit may pass what its GPU
  has left to promise (the partition is then best effort);
- ``FRACGPU_STATE_DIR``: the state folder, absolute;
- ``FRACGPU_OOM_WAIT``: seconds an allocation over the quota waits for memory;
- ``FRACGPU_REAL_LIBCUDA``: the real driver the shim forwards to;
- ``LD_PRELOAD``: the shim first, for the job and every process it starts.

Everything is checked before a job starts, so a mistake is one clear message
here rather than CUDA refused inside the job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from fracgpu import config, devices, settings, shim, state
from fracgpu.units import bytes_of, format_size, parse_memory, parse_priority, parse_seconds, parse_share

__all__ = ["JobSpec", "OptionError", "CapWithoutShare", "ConflictingChoice", "NestedJob", "partition_variables",
           "job_environment", "parse_option", "check_cap", "check_fits", "check_limit", "outer_partition",
           "check_nested", "parse_memory_limit"]

class OptionError(ValueError):
    """A job option with a bad value: ``field`` names it (``memory``, ``compute``, ``partition``, ``priority``,
    ``oom_wait``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class CapWithoutShare(ValueError):
    """A compute cap was asked for without a compute share to cap at."""


class ConflictingChoice(TypeError):
    """Neither or both of a private partition (memory/compute) and a named one (partition)."""


class NestedJob(ValueError):
    """A job started inside a partition asked for another partition, or for other limits: it
    stays in the partition it was started in, which the message names."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job's options, parsed once: what ``fracgpu run``, ``fracgpu.init()``, the Slurm prolog
    and the Ray integration hand on. A job is in a private partition (``memory`` and/or
    ``compute``) or in a named one (``partition``)."""

    memory: tuple[int, float] | None = None   # (bytes, 0.0), or (0, fraction of each device); None: no limit
    compute: float | None = None              # share of the device's time, in (0, 1]
    cap: bool = False                         # the share is also a ceiling
    partition: str | None = None              # an existing partition to join
    overcommit: bool = False                  # a private limit past what the GPU has left to promise: best effort
    oom_wait: float | None = None             # seconds an allocation over the quota waits; None: as inherited
    priority: str | None = None               # high, normal or low (a private partition's); None: normal
    # A new job option is one more field here, parsed in parse() and from_environment() and
    # written by partition_variables(): every caller gets it at once.
    # The values as written, which the job's variables carry (``FRACGPU_MEMORY=4GiB``, ``25%``).
    memory_text: str | None = None
    compute_text: str | None = None
    oom_wait_text: str | None = None

    @classmethod
    def parse(cls, *, memory: str | int | None = None, compute: str | float | None = None, cap: bool = False,
              partition: str | None = None, oom_wait: str | float | None = None,
              overcommit: bool = False, priority: str | None = None) -> JobSpec:
        """Each option parsed and every rule checked, in the order a user reads them: OptionError
        (a ValueError naming the option) for a bad value, CapWithoutShare, then ConflictingChoice.
        ``overcommit`` without a memory limit or a share is an OptionError (it is a choice about
        them)."""
        parsed = parse_option
        spec = cls(memory=parsed("memory", parse_memory_limit, memory),
                   compute=parsed("compute", parse_share, compute),
                   cap=bool(cap), partition=parsed("partition", state.check_partition_name, partition),
                   overcommit=bool(overcommit), priority=parsed("priority", parse_priority, priority),
                   oom_wait=parsed("oom_wait", parse_seconds, oom_wait),
                   memory_text=None if memory is None else memory if isinstance(memory, str) else str(memory),
                   compute_text=None if compute is None else compute if isinstance(compute, str)
                   else repr(float(compute)),
                   oom_wait_text=None if oom_wait is None else oom_wait if isinstance(oom_wait, str)
                   else repr(float(oom_wait)))
        check_cap(spec.compute, spec.cap)
        if spec.overcommit and spec.memory is None and spec.compute is None:
            raise OptionError("overcommit", "overcommit is a choice about a private partition's memory limit or "
                              "compute share: give memory (--memory SIZE) or compute (--compute SHARE) with it")
        if spec.partition is not None and spec.priority is not None:
            raise ConflictingChoice(f"a job joining partition '{spec.partition}' runs at that partition's priority; "
                                    f"change it with `fracgpu partition set {spec.partition} --priority "
                                    f"{spec.priority}`, or give the job a private partition (no partition)")
        if spec.partition is not None and spec.private:
            raise ConflictingChoice(f"a job joining partition '{spec.partition}' gets that partition's memory and "
                                    "compute; give either partition or memory/compute (a private partition), not "
                                    "both")
        if spec.partition is None and not spec.private:
            raise ConflictingChoice("give memory, compute and/or priority (a private partition with that limit, share "
                                    "and class), or partition (the name of an existing partition)")
        return spec

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> JobSpec | None:
        """The job a process was started in, from its ``FRACGPU_*`` variables; None when it is in none.
        ValueError names a variable with a bad value."""
        name = env.get(settings.PARTITION)
        if not name:
            return None
        memory = settings.read(settings.MEMORY, env)
        compute = settings.read(settings.COMPUTE, env)
        priority = settings.read(settings.PRIORITY, env)
        private = memory is not None or compute is not None or priority is not None
        return cls(memory=memory, compute=compute, cap=env.get(settings.COMPUTE_CAP) == "1", priority=priority,
                   overcommit=bool(settings.read(settings.OVERCOMMIT, env)),
                   partition=None if private else name, oom_wait=settings.read(settings.OOM_WAIT, env),
                   memory_text=env.get(settings.MEMORY) or None, compute_text=env.get(settings.COMPUTE) or None,
                   oom_wait_text=env.get(settings.OOM_WAIT) or None)

    @property
    def private(self) -> bool:
        """Whether the job gets a partition of its own (memory, compute and/or priority given)."""
        return self.memory is not None or self.compute is not None or self.priority is not None

    @property
    def memory_bytes(self) -> int | None:
        """The limit in bytes when it is absolute; None for a percentage (bytes once a device is
        seen) or no limit."""
        return self.memory[0] or None if self.memory is not None else None

    def same_partition(self, other: JobSpec) -> bool:
        """Whether ``other`` asks for the partition this one gives (a wait not given: any)."""
        mine = (self.memory, self.partition, self.compute, self.cap, self.overcommit, self.priority or "normal")
        return mine == (other.memory, other.partition, other.compute, other.cap, other.overcommit,
                        other.priority or "normal") \
            and other.oom_wait in (None, self.oom_wait)

    def limit_on(self, device: devices.Device) -> int:
        """The limit on ``device`` in bytes (0: none), checked to fit it (ValueError when above it)."""
        if self.memory is None:
            return 0
        size = bytes_of(self.memory, device.total_memory, self.memory_text)
        check_fits(size, device)
        state.check_memory_limit(size)
        return size


def parse_memory_limit(memory: str | int) -> tuple[int, float]:
    """A job's memory limit (``parse_memory``), refused when it is an absolute size no CUDA context
    fits in (the message names the smallest usable limit)."""
    parsed = parse_memory(memory)
    if parsed[0]:
        state.check_memory_limit(parsed[0])
    return parsed


def outer_partition(env: Mapping[str, str] | None = None) -> str | None:
    """The partition a process started with ``env`` (default ``os.environ``) already runs in
    (``FRACGPU_PARTITION``, set by an outer ``fracgpu run``, ``fracgpu.init()`` or the Slurm
    prolog); None outside every partition."""
    env = os.environ if env is None else env
    return env.get(settings.PARTITION) or None


def check_nested(spec: JobSpec | None, env: Mapping[str, str] | None = None) -> None:
    """A job started inside a partition runs in that partition: it may name it, or ask for what it
    already has (the same settings, as the outer job's variables carry them), or nothing
    (``spec`` None), and never for more or for another. NestedJob naming the outer partition
    otherwise. Nothing outside every partition."""
    env = os.environ if env is None else env
    name = outer_partition(env)
    if name is None or spec is None or spec.partition == name:
        return
    shown = ", ".join(f"{var}={env[var]}" for var in settings.PARTITION_VARIABLES if env.get(var))
    try:
        outer = JobSpec.from_environment(env)
    except ValueError as e:
        raise NestedJob(f"this job is started inside fracgpu partition '{name}', whose settings are invalid "
                        f"({shown}): {e}") from None
    if outer is not None and outer.same_partition(dataclasses.replace(spec, oom_wait=None)):
        return
    raise NestedJob(f"this job is started inside fracgpu partition '{name}' ({shown}), and a nested job stays in "
                    "its outer partition, under its limits: it can ask neither for other limits (more or less) nor "
                    f"for another partition. Drop --memory, --compute, --priority and --partition to run it in "
                    f"'{name}' (sharing its quota), or start it outside the partition")


def parse_option(field: str, parser: Callable[[Any], Any], value: Any) -> Any:
    """``parser(value)`` (None for None); its ValueError becomes an OptionError naming ``field``
    (a TypeError, not a value of any kind, stays one)."""
    if value is None:
        return None
    try:
        return parser(value)
    except ValueError as e:
        raise OptionError(field, str(e)) from None


def check_cap(compute: object, cap: bool | None) -> None:
    """A compute cap needs a compute share to cap at: CapWithoutShare when ``cap`` is asked without one."""
    if cap and compute is None:
        raise CapWithoutShare("a compute cap needs a compute share to cap at: give compute (--compute) with cap "
                              "(--cap)")


def check_limit(size: int, total_memory: int, gpu: str) -> None:
    """A memory limit must fit its GPU (``gpu`` names it in the message): ValueError when it is above."""
    if size > total_memory:
        raise ValueError(f"memory limit {format_size(size)} is above the {format_size(total_memory)} of GPU "
                         f"{gpu}; ask for at most {format_size(total_memory)}, or a percentage like 50%")


def check_fits(size: int, device: devices.Device) -> None:
    """A memory limit of ``size`` bytes must fit ``device``: ValueError naming it when it does not."""
    check_limit(size, device.total_memory, f"{device.index} ({device.name}, {device.uuid})")


def partition_variables(spec: JobSpec, *, private_name: str, state_dir: str | os.PathLike | None = None,
                        env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The ``FRACGPU_*`` variables that put the job ``spec`` in its partition (None: to unset), after
    checking it against the state and the devices.

    The private partition is called ``private_name`` (made when the job starts
    CUDA). Raises ValueError for a limit above a device the job sees, an
    unknown partition, or an inherited wait the shim would refuse;
    state.DoesNotFit (a ValueError) for a private limit that does not fit
    beside what a GPU the job sees has promised, unless ``spec.overcommit``
    (the shim checks again, atomically, when it makes the partition); StateError
    for an unsafe state folder or a damaged state file; DeviceError when a
    size must be checked against a GPU and none is found."""
    env = os.environ if env is None else env
    bound = config.read().partition
    if bound is not None and (spec.private or spec.partition != bound):
        raise ValueError(f"the node's configuration {config.read().path} binds every process here to partition "
                         f"'{bound}'; a job here runs in it (give partition '{bound}'), never in another or a "
                         "private one")
    if spec.oom_wait is None and env.get(settings.OOM_WAIT):   # passed on as it is, but never one the shim refuses
        settings.read(settings.OOM_WAIT, env)
    folder = state.resolve_state_dir(state_dir)
    state.check_state_dir(folder, create=True)
    # Every region must be readable, and dead jobs are reaped: fully (a /proc read per process on
    # the GPU) where a limit is checked against the promises, else by pid alone, since every job
    # starting on a busy GPU makes that check at once.
    regions = state.open_regions(folder, reap=spec.memory is not None)
    if spec.memory is None:
        for region in regions:
            region.reap(quick=True)
    if spec.partition is not None and not any(r.partition(spec.partition) for r in regions):
        raise ValueError(f"partition '{spec.partition}' does not exist (state folder {folder}); `fracgpu partition "
                         f"list` shows the partitions, `fracgpu partition create {spec.partition} --memory SIZE` "
                         "makes one")
    if spec.memory is not None:   # each device the job sees gets the limit: it must fit, beside the promises
        try:   # a percentage always fits its device: only promises already made need it seen
            seen = devices.probe(env) if spec.memory_bytes is not None or regions else []
        except devices.DeviceError:
            if spec.memory_bytes is not None:
                raise
            seen = []   # the shim checks the promise when it makes the partition
        for device in seen:
            limit = spec.limit_on(device)
            region = next((r for r in regions if r.uuid == device.uuid), None)
            if region is None and device.processes:   # the device holds memory: the promise must fit beside it
                region = state.open_region(folder, device.uuid, device.name, device.total_memory)
            if region is not None and not spec.overcommit:
                region.count_held_outside(device.processes)
                region.check_promise(private_name, limit)
    if spec.compute is not None and not spec.overcommit:   # its share must fit beside the shares promised
        for region in regions:
            region.check_promise(private_name, 0, spec.compute, spec.priority or "normal")
    if spec.private:   # its partition is made when the job starts CUDA: there must be room for it
        for region in regions:
            if region.partition(private_name) is None and len(region.partitions()) >= state.MAX_PARTITIONS:
                raise state.StateError(
                    f"GPU {region.uuid} already has {state.MAX_PARTITIONS} partitions, the most a GPU's state holds "
                    f"(private ones included), so this job's private partition cannot be made (state folder "
                    f"{folder}); remove unused ones with `fracgpu partition rm`, or wait for running jobs to end")
    variables: dict[str, str | None] = {
        settings.PARTITION: spec.partition if spec.partition is not None else private_name,
        settings.STATE_DIR: folder,
        # None: unset, so a size inherited from an outer job never turns a shared partition private.
        settings.MEMORY: spec.memory_text,
        settings.COMPUTE: spec.compute_text,
        settings.COMPUTE_CAP: "1" if spec.cap else None,
        settings.PRIORITY: spec.priority,
        settings.OVERCOMMIT: "1" if spec.overcommit else None,
    }
    if spec.oom_wait_text is not None:
        variables[settings.OOM_WAIT] = spec.oom_wait_text
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
    if not env.get(settings.REAL_LIBCUDA):
        real = shim.find_real_driver(env, library)
        if real:
            out[settings.REAL_LIBCUDA] = real
    return out
