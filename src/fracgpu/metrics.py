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

Two groups are opt-in:

- per process (``per_process``): the ``fracgpu_process_*`` series, labelled
  ``partition`` and ``pid``. A pid is unbounded cardinality where every task
  is a new process (Ray starts a worker per task), so they are off by default.
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
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fracgpu import devices, state
from fracgpu.snapshot import achieved_share
from fracgpu.units import PRIORITIES

__all__ = ["UsageCollector", "probe_gpus", "driver_version"]

MiB = 1 << 20

# Label names. Every fracgpu_ series starts with GPU; DCGM's are dcgm-exporter's own (its render_metrics.go).
GPU = ("gpu", "UUID")
DCGM = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "hostname")
DRIVER_VERSION_LABEL = "DCGM_FI_DRIVER_VERSION"
LABELS = {"gpu": GPU, "partition": (*GPU, "partition"), "process": (*GPU, "partition", "pid"),
          "info": (*GPU, "pci_bus_id", "model"), "dcgm": DCGM}
# The opt-in groups, by the label set their families use.
GROUPS = {"process": "per_process", "dcgm": "dcgm"}

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
    ("fb_used", "gauge", "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB), by fracgpu partitions.", "dcgm"),
    ("fb_free", "gauge", "DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB), by fracgpu's books.", "dcgm"),
)



class UsageCollector:
    """A prometheus_client collector: one read of the shared state per scrape.

    ``gpus`` maps a device UUID to its device (index and PCI bus id, from
    ``probe_gpus``); the UUIDs it does not know are numbered after those it
    does. ``per_process`` and ``dcgm`` turn on those groups of series;
    ``driver_version`` (when known) labels the DCGM series as dcgm-exporter does."""

    def __init__(self, state_dir: str | None = None, gpus: Mapping[str, devices.Device] | None = None,
                 read: Callable[[], list[state.GPUUsage]] | None = None, *, per_process: bool = False,
                 dcgm: bool = False, driver_version: str | None = None):
        self.state_dir = state_dir
        self.gpus = dict(gpus or {})
        self.read = read or (lambda: state.usage(self.state_dir))
        self.enabled = {"per_process": per_process, "dcgm": dcgm}
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
            print(f"fracgpu exporter: {error or 'the state is readable again'}", file=sys.stderr, flush=True)
            self.last_error = error
        yield GaugeMetricFamily("fracgpu_state_readable", "1 when the fracgpu state was read for this scrape, "
                                "0 when it is unsafe or damaged (the exporter's stderr says why).",
                                value=0 if error else 1)

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        # dcgm-exporter adds its label fields (DCGM_FI_DRIVER_VERSION) after its own labels, when it has a value.
        driver = [self.driver_version] if self.driver_version else []
        label_names = {**LABELS, "dcgm": (*DCGM, DRIVER_VERSION_LABEL) if driver else DCGM}
        families = {key: kinds[kind](name, doc, labels=list(label_names[labels]))
                    for key, kind, name, doc, labels in FAMILIES}
        (gpu_total, gpu_used, gpu_info, used, limit, ceiling, peak, best_effort, share_best_effort, share, cap,
         priority, achieved, seconds, launches, refusals_, processes, drift, drift_peak, drift_unknown, q_used,
         q_peak, q_limit, q_achieved, q_seconds, q_launches, q_device, q_drift, fb_used, fb_free) = families.values()
        per_process, dcgm = self.enabled["per_process"], self.enabled["dcgm"]
        now = time.monotonic()
        device_ns: dict[tuple, int] = {}

        def share_since(key: tuple, ns: int, family) -> None:
            device_ns[key] = ns
            if self._before is None:
                return
            then, before = self._before
            ratio = achieved_share(before.get(key), ns, (now - then) * 1e9)
            if ratio is not None:
                family.add_metric(list(key[1:]), ratio)
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
            for p in gpu.partitions:
                labels = [*ids, p.name]
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
                share_since(("p", *labels), p.device_ns, achieved)
            if not per_process:
                continue
            limits = {p.name: p.memory_limit or gpu.total_memory for p in gpu.partitions}
            for q in gpu.processes:
                labels = [*ids, q.partition, str(q.pid)]
                q_used.add_metric(labels, q.used)
                q_peak.add_metric(labels, q.peak)
                q_limit.add_metric(labels, limits.get(q.partition, gpu.total_memory))
                q_seconds.add_metric(labels, q.device_ns / 1e9)
                q_launches.add_metric(labels, q.launches)
                if q.device_used is not None and q.drift is not None:
                    q_device.add_metric(labels, q.device_used)
                    q_drift.add_metric(labels, q.drift)
                share_since(("q", *labels), q.device_ns, q_achieved)
        if error is None:
            self._before = (now, device_ns)
        for (*_, labels), family in zip(FAMILIES, families.values()):
            if labels not in GROUPS or self.enabled[GROUPS[labels]]:
                yield family


def probe_gpus() -> dict[str, devices.Device]:
    """UUID -> device, numbered as NVML and dcgm-exporter number them; empty (with a note) when the probe fails.

    The probe sees every GPU (``CUDA_VISIBLE_DEVICES`` dropped) in PCI bus order, so ``gpu`` is
    the index ``nvidia-smi`` and dcgm-exporter show, not the exporter's own CUDA numbering."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    try:
        return {d.uuid: d for d in devices.probe(env)}
    except devices.DeviceError as e:
        print(f"fracgpu exporter: GPU indexes unknown ({e}); 'gpu' labels number the GPUs in the order of the "
              "state", file=sys.stderr, flush=True)
        return {}


def driver_version(path: str = "/sys/module/nvidia/version") -> str | None:
    """The NVIDIA kernel module's version (dcgm-exporter's ``DCGM_FI_DRIVER_VERSION``), or None without one."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
