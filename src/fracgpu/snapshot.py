"""The usage snapshot: what ``fracgpu top``, the demo, the exporter and the plot show.

A snapshot is one read of the shared state (``fracgpu.usage()``) with the
compute share each partition and process achieved since the read before it:
the device time it used between the two reads divided by the time between
them. ``achieved_share`` is that arithmetic, the one place it is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from fracgpu import state

__all__ = ["Snapshot", "achieved_share", "read", "take", "as_json"]

Read = tuple[float, list[state.GPUUsage]]   # (time.monotonic() of the read, what it read)


def achieved_share(used_before: float | None, used_after: float, elapsed: float) -> float | None:
    """The share of a GPU's time used between two reads: the device time used between them
    over the ``elapsed`` time (both in the same unit). None when it cannot be measured: no
    earlier read (``used_before`` None), no time between them, or a device time that went down
    (removed and made again under the same name)."""
    if used_before is None or elapsed <= 0 or used_after < used_before:
        return None
    return (used_after - used_before) / elapsed


@dataclasses.dataclass
class Snapshot:
    """What one view shows: the latest read, and the shares achieved since the one before it."""

    time: float                       # time.time() of the latest read
    interval: float | None            # seconds between the two reads; None: only one read
    gpus: list[state.GPUUsage]
    # (gpu uuid, partition name) and (gpu uuid, pid) -> achieved share; absent: not measurable
    partition_shares: dict[tuple[str, str], float]
    process_shares: dict[tuple[str, int], float]

    def partition_share(self, gpu: state.GPUUsage, p: state.PartitionUsage) -> float | None:
        return self.partition_shares.get((gpu.uuid, p.name))

    def process_share(self, gpu: state.GPUUsage, p: state.ProcessUsage) -> float | None:
        return self.process_shares.get((gpu.uuid, p.pid))


def read(state_dir: str | os.PathLike | None = None) -> Read:
    """One read of the shared state (``state_dir``, default the usual one), with the monotonic time it was taken.

    Raises StateError for an unsafe or damaged state, as ``fracgpu.usage()`` does."""
    gpus = state.usage(state_dir)
    return time.monotonic(), gpus


def take(before: Read | None, after: Read) -> Snapshot:
    """The view of ``after``, with each share achieved since ``before`` (None: no earlier read).

    A partition or process missing from ``before`` (new), or whose device time went
    down (removed and made again under the same name), has no achieved share."""
    t1, gpus = after
    partition_shares: dict[tuple[str, str], float] = {}
    process_shares: dict[tuple[str, int], float] = {}
    interval = None
    if before is not None and t1 > before[0]:
        t0, earlier = before
        interval = t1 - t0
        old = {(g.uuid, p.name): p.device_ns for g in earlier for p in g.partitions}
        old.update({(g.uuid, q.pid): q.device_ns for g in earlier for q in g.processes})
        for g in gpus:
            for key, ns, shares in [*(((g.uuid, p.name), p.device_ns, partition_shares) for p in g.partitions),
                                    *(((g.uuid, q.pid), q.device_ns, process_shares) for q in g.processes)]:
                share = achieved_share(old.get(key), ns, interval * 1e9)
                if share is not None:
                    shares[key] = share
    return Snapshot(time.time(), interval, gpus, partition_shares, process_shares)


def as_json(view: Snapshot) -> dict[str, Any]:
    """The view's facts as plain values (bytes, nanoseconds, shares as fractions; None: not measured)."""
    gpus = []
    for gpu in view.gpus:
        g = dataclasses.asdict(gpu)
        g["used"] = sum(p.used for p in gpu.partitions)
        for entry, p in zip(g["partitions"], gpu.partitions):
            entry["compute_share_achieved"] = view.partition_share(gpu, p)
        for entry, q in zip(g["processes"], gpu.processes):
            entry["compute_share_achieved"] = view.process_share(gpu, q)
        gpus.append(g)
    return {"time": view.time, "interval": view.interval, "gpus": gpus}
