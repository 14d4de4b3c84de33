"""Named partitions: made ahead of time, joined by jobs (``fracgpu run --partition NAME``).

A partition lives on one GPU (in that GPU's region of the shared state) and
holds a memory limit that all its processes share. Names are unique per GPU;
the same name may exist on several GPUs, and a job in it is then limited on
each of them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping

from fracgpu import devices, jobs, node, state
from fracgpu.ledger import Ledger, LedgerError, Limits
from fracgpu.units import bytes_of, parse_memory, parse_priority, parse_share

__all__ = ["create", "remove", "update", "device", "numbering_or_none", "NothingToChange", "LimitAndUnlimited"]


class NothingToChange(ValueError):
    """``update`` was given nothing to change."""


class LimitAndUnlimited(ValueError):
    """``update`` was given a memory limit and asked to remove it."""


def device(index: int, env: Mapping[str, str] | None = None) -> devices.Device:
    """CUDA device ``index``, numbered as ``CUDA_VISIBLE_DEVICES`` in ``env`` makes them.

    Raises ValueError for an index the machine does not have, DeviceError when there is no GPU."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"a device index must be an int, not {type(index).__name__}")
    found = devices.probe(env)
    if not 0 <= index < len(found):
        have = f"devices 0 to {len(found) - 1}" if len(found) > 1 else "device 0 only"
        mask = devices.visibility_mask(env)
        selects = f"CUDA_VISIBLE_DEVICES={mask} selects them" if mask is not None else "CUDA numbers them"
        raise ValueError(f"there is no CUDA device {index}: jobs here see {have} (numbered as {selects}; "
                         "`fracgpu gpus` lists them)")
    return found[index]


def numbering_or_none(env: Mapping[str, str] | None = None) -> devices.Numbering | None:
    """How jobs started with ``env`` number the GPUs (``devices.numbering``); None where no driver answers."""
    try:
        return devices.numbering(env)
    except devices.DeviceError:
        return None


def _several(name: str, holders: list[state.Region], env: Mapping[str, str] | None) -> ValueError:
    """The refusal of a name several GPUs have, naming each GPU by the index --device takes."""
    numbering = numbering_or_none(env)
    gpus = ", ".join(f"{numbering.describe(r.uuid) if numbering else 'GPU'} ({r.device_name}, {r.uuid})"
                     for r in holders)
    return ValueError(f"partition '{name}' exists on several GPUs: {gpus}; say which with --device N "
                      "(`fracgpu gpus` lists the indices)")


def create(name: str, memory: str | int | None = None, *, compute: str | float | None = None, cap: bool = False,
           overcommit: bool = False, priority: str = "normal", device_index: int = 0,
           state_dir: str | os.PathLike | None = None,
           env: Mapping[str, str] | None = None) -> state.PartitionUsage:
    """Make partition ``name`` on GPU ``device_index`` with a memory limit (None: the whole device).

    ``memory`` is bytes or a size such as ``"8GiB"`` or ``"25%"`` (of that
    device). ``compute`` is its share of the device's time (``0.25`` or
    ``"25%"``), ``cap`` makes that share a ceiling; ``priority`` (``high``,
    ``normal``, ``low``) is its class at the launch gate. The limits promised on a
    GPU add up to at most its memory, less what the device says processes
    outside this state hold, and its shares to at most 100% (high and normal
    together, low among themselves): a limit or share that does not fit
    raises DoesNotFit naming what is promised, to whom, and what remains,
    unless ``overcommit``, which makes it best effort (a limit: a ceiling, not
    a promise; a share: weighed within what the promised ones leave). A name
    fracgpu keeps for private partitions (``run-``, ``init-``, ``slurm-``) is a
    StateError. Raises ValueError for a bad
    name, size or share (``jobs.OptionError``, naming which), a cap without a share, or a limit
    above the device; StateError for a name already used on that GPU, an unsafe state folder or
    a damaged state file; DeviceError when there is no GPU."""
    jobs.parse_option("name", state.check_partition_name, name)
    size = jobs.parse_option("memory", jobs.parse_memory_limit, memory)   # the grammar, before asking the driver
    share = jobs.parse_option("compute", parse_share, compute) or 0.0
    jobs.check_cap(compute, cap)
    klass = jobs.parse_option("priority", parse_priority, priority)
    folder = state.resolve_state_dir(state_dir)
    state.check_state_dir(folder, create=True)
    state.check_may_change_partitions(folder)
    gpu = device(device_index, env)
    limit = 0
    if size is not None:
        limit = bytes_of(size, gpu.total_memory, memory)
        jobs.check_fits(limit, gpu)
        jobs.parse_option("memory", jobs.parse_memory_limit, limit)
    state.open_regions(folder)   # no partition is made beside a damaged state file
    region = state.open_region(folder, gpu.uuid, gpu.name, gpu.total_memory)
    region.count_held_outside(gpu.processes)   # what the device holds beyond these books is nobody's to promise
    # StateError when the name is taken on this GPU, or the limit or share does not fit (unless overcommit)
    return region.create_partition(name, limit, share, cap, overcommit=overcommit, priority=klass)


def _holder(name: str, device_index: int | None, state_dir: str | os.PathLike | None,
            env: Mapping[str, str] | None) -> state.Region:
    """The region of the one GPU (``device_index``'s, or the only one) that has partition ``name``, once this user
    may change its partitions; ValueError when none has it, or several do and no index says which."""
    regions = state.open_regions(state_dir)
    state.check_may_change_partitions(state.resolve_state_dir(state_dir))
    where = ""
    if device_index is not None:
        uuid = device(device_index, env).uuid
        regions = [r for r in regions if r.uuid == uuid]
        where = f" on GPU {device_index} ({uuid})"
    holders = [r for r in regions if r.partition(name)]
    if not holders:
        raise ValueError(f"there is no partition '{name}'{where}; `fracgpu partition list` shows the partitions")
    if len(holders) > 1:
        raise _several(name, holders, env)
    return holders[0]


def remove(name: str, *, device_index: int | None = None, state_dir: str | os.PathLike | None = None,
           env: Mapping[str, str] | None = None, force: bool = False) -> str:
    """Remove partition ``name``: from GPU ``device_index``, or from the one GPU that has it.

    Returns the UUID of its GPU. Raises ValueError when no GPU (or several,
    without ``device_index``) has it, PartitionInUse when processes still use it
    (the message names their containers and pids) unless ``force``, which ends
    them first (SIGKILL), and StateError when the state is unsafe or damaged."""
    jobs.parse_option("name", state.check_partition_name, name)
    region = _holder(name, device_index, state_dir, env)
    users = node.partition_users(region, name)
    if users and not force:
        raise node.PartitionInUse(f"partition '{name}' is in use by {node.describe_users(users)}; stop them first, "
                                  "or remove it with --force, which ends them")
    left = node.end_processes(users)
    if left:
        raise node.PartitionInUse(f"partition '{name}' is still in use by {node.describe_users(left)}, which did not "
                                  "end when killed; it was not removed")
    region.reap_all_namespaces()   # the ended processes' slots and memory go back before the partition goes
    region.remove_partition(name)
    return region.uuid


def update(name: str, *, memory: str | int | None = None, compute: str | float | None = None,
           cap: bool | None = None, unlimited: bool = False, overcommit: bool = False, priority: str | None = None,
           device_index: int | None = None,
           state_dir: str | os.PathLike | None = None,
           env: Mapping[str, str] | None = None) -> tuple[str, state.PartitionUsage]:
    """Change partition ``name`` while its jobs run: its memory limit (``unlimited``
    removes it), compute share, cap, or priority class; what is not given stays. Running jobs
    see the change at their next allocation or launch; a limit below what the
    partition holds refuses new allocations until use falls under it. A new
    limit must fit beside the GPU's other promises and what the device says is held outside
    these books (StateError naming them),
    unless ``overcommit``: the partition is then best effort; a limit that fits
    (or none) makes it hold a promise again.

    Returns (the GPU's UUID, the partition as it is now). Raises ValueError for
    bad values or when no GPU (or several, without ``device_index``) has the
    partition, StateError for an unsafe or damaged state."""
    jobs.parse_option("name", state.check_partition_name, name)
    if memory is None and compute is None and cap is None and priority is None and not unlimited:
        raise NothingToChange("nothing to change: give a memory limit, a compute share, a cap setting or a "
                              "priority")
    if memory is not None and unlimited:
        raise LimitAndUnlimited("give a memory limit or remove it, not both")
    size = jobs.parse_option("memory", parse_memory, memory)
    share = jobs.parse_option("compute", parse_share, compute)
    klass = jobs.parse_option("priority", parse_priority, priority)
    region = _holder(name, device_index, state_dir, env)
    limit = None
    if size is not None:
        limit = bytes_of(size, region.total_memory, memory)
        jobs.check_limit(limit, region.total_memory, region.uuid)
    elif unlimited:
        limit = 0
    if limit:   # a new promise: what the device holds beyond these books is nobody's to promise
        try:
            held = next((d.processes for d in devices.probe(env) if d.uuid == region.uuid), None)
        except devices.DeviceError:
            held = None   # no driver answers here: the books alone
        region.count_held_outside(held)
    with _limits_recorded() as record:
        now = region.update_partition(name, limit, share, cap, overcommit=overcommit, priority=klass)
        record(region.uuid, now.name, Limits.of_partition(now))
    return region.uuid, now


@contextlib.contextmanager
def _limits_recorded() -> Iterator[Callable[[str, str, Limits], None]]:
    """``record(gpu, partition, limits)``, to call right after a partition's limits change, so
    that the periods of the jobs running in it end exactly there rather than at their recorder's
    next sample (``Ledger.changing_limits``). A ledger that does not exist has no running job to
    tell, and one that cannot be used leaves the boundary to the samples: the change is made
    either way."""
    with contextlib.ExitStack() as held:
        try:
            ledger = held.enter_context(Ledger(create=False))
            record = held.enter_context(ledger.changing_limits())
        except (LedgerError, sqlite3.Error):
            record = _not_recorded
        yield record


def _not_recorded(gpu: str, partition: str, limits: Limits) -> None:
    pass
