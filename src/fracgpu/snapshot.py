"""The usage snapshot: what ``fracgpu top``, the demo, the exporter and the plot show.

A snapshot is one read of the shared state (``fracgpu.usage()``) with the
compute share each partition and process achieved since the read before it:
the device time it used between the two reads divided by the time between
them. ``achieved_share`` is that arithmetic, the one place it is written.
It also knows the jobs the ledger has running (``running_jobs``), so a view
can name a process's job (``fracgpu run --name``) and show its labels.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from fracgpu import kube, ledger, state

__all__ = ["Snapshot", "achieved_share", "read", "running_jobs", "take", "as_json", "pods_of", "running_pods"]

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
    # The ledger's running jobs, by the pid of their recorder (a process's holder).
    jobs: dict[int, ledger.JobRecord] = dataclasses.field(default_factory=dict)
    # (gpu uuid, partition) -> the labels of the Kubernetes pod that holds it (``pods_of``)
    pods: dict[tuple[str, str], dict[str, str]] = dataclasses.field(default_factory=dict)

    def job_of(self, p: state.ProcessUsage) -> ledger.JobRecord | None:
        """The job process ``p`` belongs to, as the ledger records it; None when it is not recorded."""
        return self.jobs.get(p.holder) if p.holder else None

    def jobs_in(self, p: state.PartitionUsage) -> list[ledger.JobRecord]:
        """The running jobs recorded in partition ``p`` (a private partition has one), by start."""
        return sorted((j for j in self.jobs.values() if j.partition == p.name), key=lambda j: (j.start, j.id))

    def pod_of(self, gpu: state.GPUUsage, p: state.PartitionUsage) -> dict[str, str] | None:
        """The labels (namespace, pod, container, claim) of the pod holding partition ``p``; None: none known."""
        return self.pods.get((gpu.uuid, p.name))

    def partition_share(self, gpu: state.GPUUsage, p: state.PartitionUsage) -> float | None:
        return self.partition_shares.get((gpu.uuid, p.name))

    def process_share(self, gpu: state.GPUUsage, p: state.ProcessUsage) -> float | None:
        return self.process_shares.get((gpu.uuid, p.pid))


def read(state_dir: str | os.PathLike | None = None) -> Read:
    """One read of the shared state (``state_dir``, default the usual one), with the monotonic time it was taken.

    Raises StateError for an unsafe or damaged state, as ``fracgpu.usage()`` does."""
    gpus = state.usage(state_dir)
    return time.monotonic(), gpus


def _from_ledger(read: Callable[[ledger.Ledger], dict], ledger_path: str | os.PathLike | None) -> dict:
    """``read`` of the ledger (``ledger_path``, default the usual one); empty when there is no ledger yet
    or it cannot be read (a view goes on without what it would have said)."""
    path = ledger_path if ledger_path is not None else ledger.default_path()
    if not os.path.isfile(path):
        return {}
    try:
        with ledger.Ledger(path) as books:
            return read(books)
    except ledger.LedgerError:
        return {}


def running_jobs(ledger_path: str | os.PathLike | None = None) -> dict[int, ledger.JobRecord]:
    """The jobs the ledger (``ledger_path``, default the usual one) has running, by their recorder's
    pid; empty when there is no ledger yet or it cannot be read (a view goes on without names)."""
    return _from_ledger(lambda books: books.running(), ledger_path)


def pods_of(jobs: Iterable[ledger.JobRecord]) -> dict[tuple[str, str], dict[str, str]]:
    """(GPU uuid, partition) -> the Kubernetes labels (``fracgpu.kube.LABELS``: namespace, pod,
    container, claim) of the partition's pod, from the running ``jobs`` the node agent labelled with
    one (the earliest such job of each partition)."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for job in sorted(jobs, key=lambda j: (j.start, j.id)):
        if kube.POD_LABEL not in job.labels:
            continue
        for uuid in job.gpu.split(","):
            out.setdefault((uuid, job.partition), {k: job.labels[k] for k in kube.LABELS if k in job.labels})
    return out


def running_pods(ledger_path: str | os.PathLike | None = None) -> dict[tuple[str, str], dict[str, str]]:
    """``pods_of`` the jobs the ledger (default the usual one) has running now; empty when there is
    no ledger or it cannot be read."""
    now = time.time()
    return _from_ledger(lambda books: pods_of(books.jobs_during(now, now)), ledger_path)


def take(before: Read | None, after: Read, jobs: dict[int, ledger.JobRecord] | None = None,
         pods: dict[tuple[str, str], dict[str, str]] | None = None) -> Snapshot:
    """The view of ``after``, with each share achieved since ``before`` (None: no earlier read), the
    ledger's running ``jobs`` (``running_jobs()``) that name its processes, and the pods that hold
    its partitions (``running_pods()``).

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
    return Snapshot(time.time(), interval, gpus, partition_shares, process_shares, dict(jobs or {}), dict(pods or {}))


def as_json(view: Snapshot) -> dict[str, Any]:
    """The view's facts as plain values (bytes, nanoseconds, shares as fractions; None: not measured)."""
    gpus = []
    for gpu in view.gpus:
        g = dataclasses.asdict(gpu)
        g["used"] = sum(p.used for p in gpu.partitions)
        for entry, p in zip(g["partitions"], gpu.partitions):
            entry["compute_share_achieved"] = view.partition_share(gpu, p)
            entry["pod"] = view.pod_of(gpu, p)
        for entry, q in zip(g["processes"], gpu.processes):
            entry["compute_share_achieved"] = view.process_share(gpu, q)
            job = view.job_of(q)
            entry["job"] = None if job is None else {"name": job.job, "labels": job.labels}
        gpus.append(g)
    return {"time": view.time, "interval": view.interval, "gpus": gpus}
