"""Prometheus metrics of every partition (and, on request, every process), read on each scrape.

``fracgpu exporter`` serves them. The collector reads the shared state when
Prometheus scrapes, so the figures are as current as the state. Names follow
the Prometheus conventions: a ``fracgpu_`` prefix, the unit in the name
(``_bytes``, ``_seconds``, ``_ratio``), ``_total`` on counters.

Every series names its GPU the way dcgm-exporter does, so the two join:
``gpu`` is the GPU's index (the NVML index, that is CUDA's in PCI bus order,
whatever the exporter's ``CUDA_VISIBLE_DEVICES``) and ``UUID`` its UUID.
Partition series add ``partition``. The compute share achieved is
``fracgpu_partition_compute_share_achieved_ratio`` (device time used between
this scrape and the one before, over the time between them), or over any
window ``rate(fracgpu_partition_device_seconds_total[1m])``.

Cardinality is bounded by default: a job's private partition (``fracgpu run
--memory``, ``init(memory=)``, named ``run-<pid>``) is not a series of its own,
since every run would add one; all private partitions of a GPU are one
aggregate series, ``partition="(private)"`` (a name no partition can have),
whose counters keep growing as private jobs come and go. So the partition
series are at most (named partitions + 1) per GPU, and named partitions are
at most 64 per GPU.

Reserved and used, so that a dashboard can show what each GPU sold against
what was used: ``fracgpu_partition_reserved_gpu_seconds_total`` (the
guaranteed share times the time), ``..._reserved_memory_byte_seconds_total``
(the memory promised times the time) and ``..._memory_byte_seconds_total``
(the memory held times the time) beside ``..._device_seconds_total``. The
exporter integrates them between scrapes, each interval at the figures of the
scrape that opened it, so they start at 0 with the exporter, as a counter may.
The ledger (``fracgpu report``) has them per job, exactly; these are for
dashboards.

Three groups are opt-in:

- per label (``label_keys``): the same four counters summed per value of each
  job label named (``fracgpu run --label team=vision``), labelled ``key`` and
  ``value``, from the running jobs in the ledger: at most (GPUs x keys x the
  values they take). A partition's figures go to its running jobs' values in
  equal parts.
- per job (``per_job``): private partitions as series of their own, by their
  ``run-<pid>`` names: a new series per run, for a node with few long jobs.
- per process (``per_process``): the ``fracgpu_process_*`` series, labelled
  ``partition`` and ``pid``. A pid is unbounded cardinality where every task
  is a new process (Ray starts a worker per task), so they are off by default.
- Kubernetes pods: on a node whose agent labels jobs with their pod
  (``fracgpu node --pod-resources-socket``), the partition and process series
  also carry ``namespace``, ``pod`` and ``container``, dcgm-exporter's names
  for its pod mapping (its default ones, not the ``pod_namespace`` set of its
  ``--use-old-namespace``), so the two join; and ``claim`` (a DRA claim's
  name). They come from the ledger's running jobs: a partition with none
  running has them empty (to Prometheus, absent). A node with no pod-labelled
  job keeps the label sets without them.
- dcgm (``dcgm``): ``DCGM_FI_DEV_FB_USED`` and ``DCGM_FI_DEV_FB_FREE`` in MiB,
  computed from the memory in use by fracgpu's partitions, for dashboards made
  for NVIDIA's dcgm-exporter, with its labels: ``gpu``, ``UUID``,
  ``pci_bus_id``, ``device`` (``nvidia<index>``), ``modelName``, ``hostname``,
  and ``DCGM_FI_DRIVER_VERSION`` where the NVIDIA kernel module says it. On a
  node where dcgm-exporter runs too, both would report the same series name
  for the same GPU: leave it off there.
"""

from __future__ import annotations

import itertools
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fracgpu import devices, kube, log, state
from fracgpu.ledger import JobRecord, Ledger, LedgerError
from fracgpu.snapshot import achieved_share, pods_of
from fracgpu.units import PRIORITIES

__all__ = ["UsageCollector", "probe_gpus", "driver_version", "serve"]

MiB = 1 << 20

# Label names. Every fracgpu_ series starts with GPU; DCGM's are dcgm-exporter's own (its render_metrics.go).
GPU = ("gpu", "UUID")
DCGM = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "hostname")
DRIVER_VERSION_LABEL = "DCGM_FI_DRIVER_VERSION"
LABELS = {"gpu": GPU, "partition": (*GPU, "partition"), "process": (*GPU, "partition", "pid"),
          "info": (*GPU, "pci_bus_id", "model"), "dcgm": DCGM, "label": (*GPU, "key", "value")}
# The opt-in groups, by the label set their families use.
GROUPS = {"process": "per_process", "dcgm": "dcgm", "label": "labels"}
# The one series of a GPU's private partitions: not a name any partition can have.
PRIVATE = "(private)"

# Every family a scrape exposes after fracgpu_state_readable, in this order: (key, kind, name, help, labels).
FAMILIES = (
    ("gpu_total", "gauge", "fracgpu_gpu_memory_total_bytes", "Memory of the GPU.", "gpu"),
    ("gpu_used", "gauge", "fracgpu_gpu_memory_used_bytes", "Memory in use by all fracgpu partitions of the GPU.",
     "gpu"),
    ("gpu_info", "gauge", "fracgpu_gpu_info", "The GPU's PCI bus id and model; always 1.", "info"),
    ("used", "gauge", "fracgpu_partition_memory_used_bytes", "Memory the partition's processes hold now.",
     "partition"),
    ("limit", "gauge", "fracgpu_partition_memory_limit_bytes",
     "The partition's memory limit (the GPU's memory when it has none).", "partition"),
    ("ceiling", "gauge", "fracgpu_partition_memory_ceiling_bytes",
     "The most memory the partition may hold now: its limit when that is a promise, else what no other "
     "partition was promised (up to its limit).", "partition"),
    ("peak", "gauge", "fracgpu_partition_memory_peak_bytes", "The most memory the partition held at once.",
     "partition"),
    ("best_effort", "gauge", "fracgpu_partition_best_effort",
     "1 when the partition's memory limit was overcommitted (a ceiling, not a promise), 0 when it is a promise "
     "or there is none.", "partition"),
    ("share_best_effort", "gauge", "fracgpu_partition_compute_best_effort",
     "1 when the partition's compute share was overcommitted (weighed within what the promised shares leave, "
     "not a promise), 0 when it is a promise or there is none.", "partition"),
    ("share", "gauge", "fracgpu_partition_compute_share_ratio",
     "Configured share of the GPU's time (absent when none is set).", "partition"),
    ("cap", "gauge", "fracgpu_partition_compute_capped", "1 when the compute share is also a ceiling.", "partition"),
    ("priority", "gauge", "fracgpu_partition_priority",
     "The partition's class at the launch gate: 2 high, 1 normal, 0 low.", "partition"),
    ("achieved", "gauge", "fracgpu_partition_compute_share_achieved_ratio",
     "Share of the GPU's time the partition used since the previous scrape (absent on the first).", "partition"),
    ("seconds", "counter", "fracgpu_partition_device_seconds_total",
     "Device time the partition's kernels used; rate() of it is the share achieved.", "partition"),
    ("launches", "counter", "fracgpu_partition_launches_total", "Kernel and graph launches.", "partition"),
    ("refusals", "counter", "fracgpu_partition_oom_refusals_total",
     "Allocations refused because they would pass the memory limit.", "partition"),
    ("processes", "gauge", "fracgpu_partition_processes", "Processes in the partition now.", "partition"),
    ("reserved_gpu", "counter", "fracgpu_partition_reserved_gpu_seconds_total",
     "Guaranteed compute share times the time (a 25% share for an hour is 900 s), since the exporter started.",
     "partition"),
    ("reserved_memory", "counter", "fracgpu_partition_reserved_memory_byte_seconds_total",
     "Memory promised (a limit that is not best effort) times the time, since the exporter started.", "partition"),
    ("used_memory", "counter", "fracgpu_partition_memory_byte_seconds_total",
     "Memory held times the time, since the exporter started.", "partition"),
    ("drift", "gauge", "fracgpu_partition_memory_drift_bytes",
     "What the device reports the partition's processes hold less their books (signed; processes the device "
     "does not list left out). The positive part of each process's is charged to the partition's used memory.",
     "partition"),
    ("drift_peak", "gauge", "fracgpu_partition_memory_drift_peak_bytes",
     "The most memory the books missed that was charged to the partition at once.", "partition"),
    ("drift_unknown", "gauge", "fracgpu_partition_memory_drift_unknown_processes",
     "Processes of the partition the device does not list (another pid namespace): their drift is unknown.",
     "partition"),
    ("q_used", "gauge", "fracgpu_process_memory_used_bytes", "Memory the process holds now.", "process"),
    ("q_peak", "gauge", "fracgpu_process_memory_peak_bytes", "The most memory the process held at once.", "process"),
    ("q_limit", "gauge", "fracgpu_process_memory_limit_bytes",
     "The memory limit the process is under: its partition's (the GPU's memory when none).", "process"),
    ("q_achieved", "gauge", "fracgpu_process_compute_share_achieved_ratio",
     "Share of the GPU's time the process used since the previous scrape (absent on the first).", "process"),
    ("q_seconds", "counter", "fracgpu_process_device_seconds_total", "Device time the process's kernels used.",
     "process"),
    ("q_launches", "counter", "fracgpu_process_launches_total", "Kernel and graph launches of the process.",
     "process"),
    ("q_device", "gauge", "fracgpu_process_device_memory_bytes",
     "Memory the device (NVML) reports the process holds (absent while not known).", "process"),
    ("q_drift", "gauge", "fracgpu_process_memory_drift_bytes",
     "What the device reports the process holds less its books (signed; absent while not known).", "process"),
    ("l_reserved_gpu", "counter", "fracgpu_label_reserved_gpu_seconds_total",
     "Guaranteed compute share times the time, of the running jobs with this label value.", "label"),
    ("l_reserved_memory", "counter", "fracgpu_label_reserved_memory_byte_seconds_total",
     "Memory promised times the time, of the running jobs with this label value.", "label"),
    ("l_seconds", "counter", "fracgpu_label_device_seconds_total",
     "Device time used by the running jobs with this label value.", "label"),
    ("l_used_memory", "counter", "fracgpu_label_memory_byte_seconds_total",
     "Memory held times the time, by the running jobs with this label value.", "label"),
    ("fb_used", "gauge", "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB), by fracgpu partitions.", "dcgm"),
    ("fb_free", "gauge", "DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB), by fracgpu's books.", "dcgm"),
)



class _Integrals:
    """Counters the exporter integrates over time between scrapes (reserved and used
    byte-seconds and share-seconds), and the private partitions' counters kept past their end,
    so that the aggregate series never goes down."""

    def __init__(self):
        # series -> [reserved share-seconds, reserved byte-seconds, used byte-seconds, device seconds]
        self.totals: dict[tuple, list[float]] = {}
        self.rates: dict[tuple, tuple[float, float, float]] = {}   # series -> its figures at the last scrape
        self.next_rates: dict[tuple, tuple[float, float, float]] = {}
        self.device_ns: dict[tuple, int] = {}        # partition -> its device time at the last scrape
        self.private_gone: dict[str, list[int]] = {}   # GPU -> device ns, launches, refusals of ended ones
        self.private_seen: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.private_promised: dict[str, int] = {}     # GPU -> memory its private partitions were promised
        self.when: float | None = None

    def advance(self, elapsed: float) -> None:
        """Every series' totals brought up to now: its figures of the last scrape held since."""
        for key, rates in self.rates.items():
            totals = self.totals.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            for n, rate in enumerate(rates):
                totals[n] += rate * elapsed
        self.next_rates = {}

    def add(self, key: tuple, share: float, promised: float, used: float, device_s: float = 0.0) -> list[float]:
        """Adds to series ``key``'s figures for the next interval, and ``device_s`` to its device
        time; returns its totals."""
        totals = self.totals.setdefault(key, [0.0, 0.0, 0.0, 0.0])
        totals[3] += device_s
        now = self.next_rates.get(key, (0.0, 0.0, 0.0))
        self.next_rates[key] = (now[0] + share, now[1] + promised, now[2] + used)
        return totals

    def private(self, gpu: state.GPUUsage) -> state.PartitionUsage | None:
        """The GPU's private partitions as one (counters including those that ended), or None
        when it never had one."""
        mine = [p for p in gpu.partitions if p.ephemeral]
        gone = self.private_gone.setdefault(gpu.uuid, [0, 0, 0])
        now = {(gpu.uuid, p.name): (p.device_ns, p.launches, p.oom_refusals) for p in mine}
        for key in [k for k in self.private_seen if k[0] == gpu.uuid and k not in now]:
            for n, count in enumerate(self.private_seen.pop(key)):
                gone[n] += count
        self.private_seen.update(now)
        self.private_promised[gpu.uuid] = sum(_promised(p) for p in mine)
        if not mine and not any(gone):
            return None
        return state.PartitionUsage(
            name=PRIVATE, memory_limit=sum(p.memory_limit or 0 for p in mine) or None,
            used=sum(p.used for p in mine), peak=max((p.peak for p in mine), default=0),
            processes=sum(p.processes for p in mine), ephemeral=True,
            oom_refusals=gone[2] + sum(p.oom_refusals for p in mine),
            compute_share=sum(_guaranteed(p) for p in mine) or None,
            device_ns=gone[0] + sum(p.device_ns for p in mine), launches=gone[1] + sum(p.launches for p in mine),
            best_effort=any(p.best_effort for p in mine), memory_ceiling=sum(p.memory_ceiling for p in mine),
            drift=sum(p.drift for p in mine), drift_charged=sum(p.drift_charged for p in mine),
            drift_peak=max((p.drift_peak for p in mine), default=0),
            drift_unknown=sum(p.drift_unknown for p in mine))


def _promised(p: state.PartitionUsage) -> int:
    """The memory ``p`` was promised: its limit, unless that is best effort (overcommitted)."""
    return 0 if p.best_effort else (p.memory_limit or 0)


def _guaranteed(p: state.PartitionUsage) -> float:
    """The share of the device's time ``p`` was promised: its share, unless that is best effort."""
    return 0.0 if p.compute_best_effort else (p.compute_share or 0.0)


def _running_jobs() -> list[JobRecord]:
    """The jobs running now, from the ledger (none when there is no ledger or it cannot be read)."""
    now = time.time()
    try:
        with Ledger(create=False) as ledger:
            return ledger.jobs_during(now, now)
    except (LedgerError, sqlite3.Error):
        return []


class UsageCollector:
    """A prometheus_client collector: one read of the shared state per scrape.

    ``gpus`` maps a device UUID to its device (index and PCI bus id, from
    ``probe_gpus``); the UUIDs it does not know are numbered after those it
    does. ``per_process`` and ``dcgm`` turn on those groups of series;
    ``driver_version`` (when known) labels the DCGM series as dcgm-exporter does."""

    def __init__(self, state_dir: str | None = None, gpus: Mapping[str, devices.Device] | None = None,
                 read: Callable[[], list[state.GPUUsage]] | None = None, *, per_process: bool = False,
                 dcgm: bool = False, driver_version: str | None = None, per_job: bool = False,
                 label_keys: Sequence[str] = (), running_jobs: Callable[[], list[JobRecord]] | None = None):
        self.state_dir = state_dir
        self.gpus = dict(gpus or {})
        self.read = read or (lambda: state.usage(self.state_dir))
        self.enabled = {"per_process": per_process, "dcgm": dcgm, "labels": bool(label_keys)}
        self.per_job = per_job
        self.label_keys = tuple(label_keys)
        self.running_jobs = running_jobs or _running_jobs
        self.books = _Integrals()
        self.driver_version = driver_version
        self.hostname = socket.gethostname()
        self.last_error: str | None = None
        # The previous scrape: when, and each partition's and process's device time then.
        self._before: tuple[float, dict[tuple, int]] | None = None

    def describe(self) -> list:
        return []   # nothing is read at registration; every scrape collects afresh

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            gpus = self.read()
            error = None
        except state.StateError as e:
            gpus, error = [], str(e)
        if error != self.last_error:   # say it once when it starts, and once when it is over
            log.emit("exporter", "state-unreadable" if error else "state-readable",
                     error or "the state is readable again", level="error" if error else "info")
            self.last_error = error
        yield GaugeMetricFamily("fracgpu_state_readable", "1 when the fracgpu state was read for this scrape, "
                                "0 when it is unsafe or damaged (the exporter's stderr says why).",
                                value=0 if error else 1)

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        # dcgm-exporter adds its label fields (DCGM_FI_DRIVER_VERSION) after its own labels, when it has a value.
        driver = [self.driver_version] if self.driver_version else []
        running = self.running_jobs() if error is None else []
        pods = pods_of(running)
        label_names = {**LABELS, "dcgm": (*DCGM, DRIVER_VERSION_LABEL) if driver else DCGM}
        if pods:   # the pod labels follow each partition's: dcgm-exporter's names, so the two join
            label_names.update({group: (*label_names[group], *kube.LABELS) for group in ("partition", "process")})
        families = {key: kinds[kind](name, doc, labels=list(label_names[labels]))
                    for key, kind, name, doc, labels in FAMILIES}
        (gpu_total, gpu_used, gpu_info, used, limit, ceiling, peak, best_effort, share_best_effort, share, cap,
         priority, achieved,
         seconds, launches, refusals_, processes, drift, drift_peak, drift_unknown, q_used, q_peak, q_limit, q_achieved,
         q_seconds, q_launches, q_device, q_drift, fb_used, fb_free) = (families[key] for key in (
            "gpu_total", "gpu_used", "gpu_info", "used", "limit", "ceiling", "peak", "best_effort", "share_best_effort", "share", "cap",
            "priority", "achieved", "seconds", "launches", "refusals", "processes", "drift", "drift_peak",
            "drift_unknown", "q_used", "q_peak", "q_limit", "q_achieved", "q_seconds", "q_launches", "q_device",
            "q_drift", "fb_used", "fb_free"))
        per_process, dcgm = self.enabled["per_process"], self.enabled["dcgm"]
        now = time.monotonic()
        device_ns: dict[tuple, int] = {}
        books = self.books
        elapsed = now - books.when if books.when is not None and error is None else 0.0
        books.advance(elapsed)

        def share_since(key: tuple, ns: int, family, labels: list[str]) -> None:
            device_ns[key] = ns
            if self._before is None:
                return
            then, before = self._before
            ratio = achieved_share(before.get(key), ns, (now - then) * 1e9)
            if ratio is not None:
                family.add_metric(labels, ratio)

        def pod(partition: str) -> list[str]:
            """The pod labels' values of ``partition`` on this GPU (none without pods on the node)."""
            if not pods:
                return []
            known = pods.get((gpu.uuid, partition), {})
            return [known.get(k, "") for k in kube.LABELS]
        # A GPU the probe did not see (or all, when it failed) is numbered after those it saw, in the state's order.
        unseen = itertools.count(max((d.index for d in self.gpus.values()), default=-1) + 1)
        for gpu in gpus:
            device = self.gpus.get(gpu.uuid)
            index = str(device.index if device else next(unseen))
            bus_id = device.pci_bus_id if device else ""
            ids = [index, gpu.uuid]
            in_use = sum(p.used for p in gpu.partitions)
            gpu_total.add_metric(ids, gpu.total_memory)
            gpu_used.add_metric(ids, in_use)
            gpu_info.add_metric([*ids, bus_id, gpu.name], 1)
            if dcgm:
                labels = [*ids, bus_id, f"nvidia{index}", gpu.name, self.hostname, *driver]
                fb_used.add_metric(labels, in_use // MiB)
                fb_free.add_metric(labels, max(gpu.total_memory - in_use, 0) // MiB)
            if self.label_keys:
                self._by_label(gpu, ids, running, families)
            aggregate = None if self.per_job else books.private(gpu)
            for p in [q for q in gpu.partitions if self.per_job or not q.ephemeral] + [aggregate] * bool(aggregate):
                key = ("p", *ids, p.name)
                labels = [*ids, p.name, *pod(p.name)]
                promised = books.private_promised[gpu.uuid] if p is aggregate else _promised(p)
                totals = books.add(key, _guaranteed(p), promised, p.used)
                families["reserved_gpu"].add_metric(labels, totals[0])
                families["reserved_memory"].add_metric(labels, totals[1])
                families["used_memory"].add_metric(labels, totals[2])
                used.add_metric(labels, p.used)
                limit.add_metric(labels, p.memory_limit or gpu.total_memory)
                ceiling.add_metric(labels, p.memory_ceiling)
                peak.add_metric(labels, p.peak)
                best_effort.add_metric(labels, 1 if p.best_effort else 0)
                share_best_effort.add_metric(labels, 1 if p.compute_best_effort else 0)
                if p.compute_share:
                    share.add_metric(labels, p.compute_share)
                    cap.add_metric(labels, 1 if p.compute_cap else 0)
                priority.add_metric(labels, len(PRIORITIES) - 1 - PRIORITIES.index(p.priority))
                seconds.add_metric(labels, p.device_ns / 1e9)
                launches.add_metric(labels, p.launches)
                refusals_.add_metric(labels, p.oom_refusals)
                processes.add_metric(labels, p.processes)
                drift.add_metric(labels, p.drift)
                drift_peak.add_metric(labels, p.drift_peak)
                drift_unknown.add_metric(labels, p.drift_unknown)
                share_since(key, p.device_ns, achieved, labels)
            if not per_process:
                continue
            limits = {p.name: p.memory_limit or gpu.total_memory for p in gpu.partitions}
            for q in gpu.processes:
                key = ("q", *ids, q.partition, str(q.pid))
                labels = [*ids, q.partition, str(q.pid), *pod(q.partition)]
                q_used.add_metric(labels, q.used)
                q_peak.add_metric(labels, q.peak)
                q_limit.add_metric(labels, limits.get(q.partition, gpu.total_memory))
                q_seconds.add_metric(labels, q.device_ns / 1e9)
                q_launches.add_metric(labels, q.launches)
                if q.device_used is not None and q.drift is not None:
                    q_device.add_metric(labels, q.device_used)
                    q_drift.add_metric(labels, q.drift)
                share_since(key, q.device_ns, q_achieved, labels)
        if error is None:
            self._before = (now, device_ns)
            books.rates, books.when = books.next_rates, now
        for (*_, labels), family in zip(FAMILIES, families.values()):
            if labels not in GROUPS or self.enabled[GROUPS[labels]]:
                yield family

    def _by_label(self, gpu: state.GPUUsage, ids: list[str], running: list[JobRecord], families: dict) -> None:
        """The label series of ``gpu``: each partition's figures (its device time since the last
        scrape) go in equal parts to the values its running jobs there have for each key."""
        books = self.books
        names = {p.name for p in gpu.partitions}
        for gone in [k for k in books.device_ns if k[1] == gpu.uuid and k[2] not in names]:
            del books.device_ns[gone]
        for p in gpu.partitions:
            key = ("d", gpu.uuid, p.name)
            device_s = max(0, p.device_ns - books.device_ns.get(key, 0)) / 1e9
            books.device_ns[key] = p.device_ns
            jobs = [j for j in running if j.partition == p.name and gpu.uuid in j.gpu.split(",")]
            for label in self.label_keys:
                for job in jobs:
                    if label not in job.labels:
                        continue
                    part = 1 / len(jobs)
                    books.add(("l", *ids, label, job.labels[label]), _guaranteed(p) * part,
                              _promised(p) * part, p.used * part, device_s * part)
        for key, totals in books.totals.items():
            if key[0] == "l" and list(key[1:3]) == ids:
                families["l_reserved_gpu"].add_metric(list(key[1:]), totals[0])
                families["l_reserved_memory"].add_metric(list(key[1:]), totals[1])
                families["l_used_memory"].add_metric(list(key[1:]), totals[2])
                families["l_seconds"].add_metric(list(key[1:]), totals[3])


def probe_gpus() -> dict[str, devices.Device]:
    """UUID -> device, numbered as NVML and dcgm-exporter number them; empty (with a note) when the probe fails.

    The probe sees every GPU (``CUDA_VISIBLE_DEVICES`` dropped) in PCI bus order, so ``gpu`` is
    the index ``nvidia-smi`` and dcgm-exporter show, not the exporter's own CUDA numbering."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    try:
        return {d.uuid: d for d in devices.probe(env)}
    except devices.DeviceError as e:
        log.emit("exporter", "gpu-indexes-unknown", f"GPU indexes unknown ({e}); 'gpu' labels number the GPUs in "
                 "the order of the state", level="warning")
        return {}


def driver_version(path: str = "/sys/module/nvidia/version") -> str | None:
    """The NVIDIA kernel module's version (dcgm-exporter's ``DCGM_FI_DRIVER_VERSION``), or None without one."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def serve(state_dir: str, port: int, address: str = "127.0.0.1", *, per_process: bool = False,
          dcgm: bool = False, per_job: bool = False, label_keys: Sequence[str] = ()) -> Callable[[], None]:
    """Serves these metrics at http://ADDRESS:PORT/metrics from a thread; returns what stops it.
    OSError when the port cannot be had (listening comes first, so that is known at once: the
    device probe behind the GPU labels may take a while)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    server, thread = start_http_server(port, addr=address, registry=registry)
    registry.register(UsageCollector(state_dir, probe_gpus(), per_process=per_process, dcgm=dcgm,
                                      driver_version=driver_version() if dcgm else None, per_job=per_job,
                                      label_keys=label_keys))

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return stop
