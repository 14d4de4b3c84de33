"""The node agent (``fracgpu node``): the trusted party for jobs no ``fracgpu run`` wraps.

A container's processes load the shim (its CDI device mounts it), so they are
held to their partition's quota, but nothing in the container records them,
and the device cannot be asked about them from inside: NVML names every
process by its pid in the host's pid namespace, and a process in a container
knows only its own. The agent runs in the host's namespace, once per node, and
every ``interval`` seconds it:

- asks the device (NVML) what each process holds, by host pid, and maps those
  pids to the partitions' process slots, which hold a process's pid in its own
  namespace: through ``/proc/<pid>/ns/pid`` and the last ``NSpid`` field of
  ``/proc/<pid>/status``. A process in another namespace is then reconciled as
  a host process reconciles itself: the memory the device holds beyond its
  books is charged to its partition (``Region.reconcile``);
- reaps the dead of every namespace, after the device was asked (so a killed
  container's memory goes back once the device has let go of it, within one
  interval);
- records a ledger job for each container (its id from ``/proc/<pid>/cgroup``),
  else each other pid namespace, else each partition, whose processes no
  recorder holds: opened when the first process joins, sampled like
  ``fracgpu run``'s recorder, finished when the last one has gone. The last
  counters of a process that ends are kept: a host process's slot is held by
  the agent (kept, marked exited, until its job is finished), and a container
  process's counters are read just before the reap that frees its slot.
  Labels name the container, plus whatever ``labels`` (a provider: a runtime
  or orchestrator integration) returns for its processes;
- with ``pods`` (the kubelet's pod resources API, ``fracgpu.kube.podresources``):
  labels each job of a partition a pod holds with its ``namespace``, ``pod``,
  ``container`` (and ``claim``), also a job opened before the kubelet named
  its pod (``container`` is then the pod's container name, as Kubernetes and
  dcgm-exporter name it; the runtime's id stays in the row's key); and
  removes a device plugin's slices partition that no container has held for
  the watch's grace and that no live process uses (its CDI device too, from
  the device plugin's specs in ``cdi_root``). A claim's partition is never
  removed here: the DRA driver removes it when the claim is unprepared.

Restart: the agent's ledger rows carry no recorder pid (no other recorder
closes them as orphans while the agent is down) and a ``fracgpu.node/key``
label. A new agent resumes the open ones whose processes still run (device
time of processes that ended while it was down is carried from the row) and
finishes the others at their last sample: no row is lost or doubled.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fracgpu import cdi, files, kube, state
from fracgpu.ledger import Ledger, LedgerError
from fracgpu.recorder import JobRecorder, Reading

if TYPE_CHECKING:
    from fracgpu.kube.podresources import PodWatch

__all__ = ["NodeAgent", "NodeProcess", "HostProcesses", "DeviceProcesses", "PartitionInUse", "container_id",
           "KIND", "KEY_LABEL"]

log = logging.getLogger("fracgpu.node")

KIND = "node"                     # the ledger kind of the agent's jobs
KEY_LABEL = "fracgpu.node/key"    # the label that says which container or partition a row is
LINGER_S = 5.0                    # the longest a dead process's slot waits for the device to let go
CONTAINER_LABEL = "container"
PID_NAMESPACE_LABEL = "pid_namespace"

# Container ids in /proc/<pid>/cgroup, as the runtimes name their cgroups: podman ("libpod-<id>", with
# cgroupfs ".../libpod-<id>" or "libpod-<id>.scope" with systemd), Docker ("docker-<id>.scope" or
# "/docker/<id>"), containerd's CRI ("cri-containerd-<id>.scope") and CRI-O ("crio-<id>.scope").
_CONTAINER = re.compile(r"(?:libpod-|docker-|cri-containerd-|crio-|/docker/|/libpod_parent/)([0-9a-f]{64})(?![0-9a-f])")


def container_id(pid: int) -> str | None:
    """The id of the container process ``pid`` runs in, from its cgroup; None: none that we know."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    found = _CONTAINER.search(text)
    return found.group(1) if found else None


@dataclasses.dataclass(frozen=True)
class NodeProcess:
    """A process of a partition as the node sees it."""

    host_pid: int            # its pid in the agent's (the host's) namespace
    pid_namespace: int       # the inode of its pid namespace
    foreign: bool            # in another pid namespace than the agent's (a container)
    container: str | None    # its container's id, when its cgroup names one
    slot: state.ProcessSlot
    gpu: str                 # the GPU's UUID


class HostProcesses:
    """One look at ``/proc``: the processes of other pid namespaces, by (namespace, pid there)."""

    def __init__(self) -> None:
        self.own_namespace = state.pid_namespace()
        self._foreign: dict[tuple[int, int], int] = {}   # (namespace, pid there) -> pid here
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and state.pid_namespace(int(entry.name)) not in (0, self.own_namespace):
                found = state.namespace_pid(int(entry.name))
                if found:
                    self._foreign[found] = int(entry.name)

    def find(self, slot: state.ProcessSlot) -> tuple[int, int, bool] | None:
        """(pid here, pid namespace, foreign) of the live process in ``slot``; None: not seen (gone, or
        in a namespace this process cannot see)."""
        if slot.pid_ns in (0, self.own_namespace):
            return (slot.pid, self.own_namespace, False) if state.process_alive(slot.pid, slot.start_time) else None
        pid = self._foreign.get((slot.pid_ns, slot.pid))
        if pid is None or not state.process_alive(pid, slot.start_time):
            return None
        return pid, slot.pid_ns, True


class NvmlProcessInfo(ctypes.Structure):   # nvmlProcessInfo_v2_t
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong), ("gpuInstanceId", ctypes.c_uint),
                ("computeInstanceId", ctypes.c_uint)]


class DeviceProcesses:
    """The device's own per-process figures (NVML's compute processes, by host pid)."""

    NVML_ERROR_INSUFFICIENT_SIZE = 7

    def __init__(self, library: str = "libnvidia-ml.so.1"):
        self._nvml = ctypes.CDLL(library)
        if self._nvml.nvmlInit_v2() != 0:
            raise OSError(f"{library}: nvmlInit_v2 failed; is the NVIDIA driver loaded?")
        self._handles: dict[str, ctypes.c_void_p] = {}

    def figures(self, uuid: str) -> dict[int, int] | None:
        """Host pid -> bytes it holds on GPU ``uuid``; None when NVML cannot say."""
        handle = self._handles.get(uuid)
        if handle is None:
            handle = ctypes.c_void_p()
            if self._nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
                return None
            self._handles[uuid] = handle
        room = 64
        for _ in range(4):   # the list may grow between two calls
            count = ctypes.c_uint(room)
            infos = (NvmlProcessInfo * room)()
            rc = self._nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle, ctypes.byref(count), infos)
            if rc == 0:
                out: dict[int, int] = {}
                for info in infos[:count.value]:
                    out[info.pid] = out.get(info.pid, 0) + info.usedGpuMemory
                return out
            if rc != self.NVML_ERROR_INSUFFICIENT_SIZE:
                return None
            room = count.value + 16
        return None


class PartitionInUse(state.StateError):
    """A partition still used by processes (containers named): removing it needs force."""


LabelProvider = Callable[[NodeProcess], Mapping[str, str]]


def job_key(process: NodeProcess) -> tuple[str, dict[str, str]]:
    """The job a process belongs to (its key) and that job's own labels."""
    if process.container:
        return f"container:{process.container}", {CONTAINER_LABEL: process.container}
    if process.foreign:
        return f"pid-namespace:{process.pid_namespace}", {PID_NAMESPACE_LABEL: str(process.pid_namespace)}
    return f"partition:{process.slot.partition}", {}


def job_name(key: str) -> str:
    kind, _, what = key.partition(":")
    return what[:12] if kind == "container" else what if kind == "partition" else f"pidns-{what}"


class _NodeJob(JobRecorder):
    """One container's (or partition's) ledger row; its processes are the agent's slots it claims."""

    def __init__(self, ledger: Ledger, key: str, partition: str, labels: dict[str, str], state_dir: str,
                 holder: int, command: str = ""):
        super().__init__(ledger, job=job_name(key), partition=partition, private=False, state_dir=state_dir,
                         command=command, kind=KIND, labels={**labels, KEY_LABEL: key}, holder=holder)
        self.key = key
        self.slots: set[tuple[str, int, int, int]] = set()   # (gpu, slot, pid, start time) of its processes
        # Device time and launches of its processes whose slots are gone (freed at their end, or while
        # no agent ran), and the last counters read of those still there.
        self.carried_ns = 0
        self.carried_launches = 0
        self._last: dict[tuple[str, int, int, int], tuple[int, int]] = {}
        self._present: set[tuple[str, int, int, int]] = set()

    def start(self, start: float | None = None) -> int:
        # No recorder pid: the agent closes its own rows (on restart, those whose processes are gone);
        # a job's recorder closing orphans must not end a container's row while the agent restarts.
        self.job_id = self.ledger.start_job(job=self.job, partition=self.partition, command=self.command,
                                            kind=self.kind, labels=self.labels, start=start)
        return self.job_id

    def members(self, region: state.Region) -> list[state.ProcessSlot]:
        mine = [p for p in region.processes() if (region.uuid, p.slot, p.pid, p.start_time) in self.slots]
        self._present.update((region.uuid, p.slot, p.pid, p.start_time) for p in mine)
        for p in mine:
            self._last[(region.uuid, p.slot, p.pid, p.start_time)] = (p.device_ns, p.launches)
        return mine

    def collect(self, region: state.Region) -> None:
        for p in self.members(region):
            region.collect(self.holder, p.slot)

    def read(self) -> Reading:
        """The job's reading; a process whose slot was freed since (one of another namespace is freed
        when it dies: no holder keeps it) counts with its last counters, which a dead process no
        longer changes (the agent reads them just before it reaps)."""
        self._present = set()
        out = super().read()
        for key in [k for k in self._last if k not in self._present]:
            device_ns, launches = self._last.pop(key)
            self.carried_ns += device_ns
            self.carried_launches += launches
            self.slots.discard(key)
        out.device_ns += self.carried_ns
        out.launches += self.carried_launches
        return out


class NodeAgent:
    """The node agent's work, one ``tick()`` at a time (``run()`` loops it)."""

    def __init__(self, *, state_dir: str | os.PathLike | None = None, ledger: Ledger | None = None,
                 labels: LabelProvider | None = None, device: DeviceProcesses | None = None,
                 interval: float = 0.2, ready_file: str | os.PathLike | None = None,
                 partitions_changed: Callable[[], None] | None = None, pods: PodWatch | None = None,
                 cdi_root: str | os.PathLike | None = None):
        self.state_dir = state.resolve_state_dir(state_dir)
        self.ledger = ledger if ledger is not None else Ledger()
        self.label_provider = labels
        self.device = device
        self.interval = interval
        self.ready_file = os.fspath(ready_file) if ready_file else None
        self.partitions_changed = partitions_changed   # called when partitions come or go (the CDI spec)
        self.pods = pods
        self.cdi_root = os.fspath(cdi_root) if cdi_root else None
        self.pid = os.getpid()
        self.jobs: dict[str, _NodeJob] = {}
        self._regions: dict[str, state.Region] = {}
        self._partitions: dict[str, set[str]] = {}   # gpu -> partitions kept
        self._resumed = False
        self._cdi_written = False
        self._lingering: dict[str, float] = {}        # gpu -> since when the device lists an ended process
        self._kept_unheld: set[tuple[str, str]] = set()  # (gpu, partition) held by no pod, kept in use (said)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Ticks every ``interval`` seconds until ``stop`` is set; then finishes nothing (the jobs go on:
        the next agent resumes them) and removes the readiness file."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except Exception:   # a bad look (a ledger locked too long, a region torn) must not end the service
                    log.exception("a look at the node failed; trying again in %.2f s", self.interval)
                if self.ready_file and not os.path.exists(self.ready_file):
                    self._write_ready()
                stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            if self.ready_file:
                files.remove(self.ready_file)

    def _write_ready(self) -> None:
        files.write_atomically(self.ready_file, f"pid {self.pid}\nstate {self.state_dir}\nledger {self.ledger.path}\n")
        log.info("ready: keeping the partitions in %s, recording in %s", self.state_dir, self.ledger.path)

    def regions(self) -> list[state.Region]:
        if os.path.isdir(self.state_dir):
            for path in state.region_files(self.state_dir):
                if path not in self._regions:
                    try:
                        self._regions[path] = state.open_region_file(path)
                    except state.StateError as e:
                        log.error("cannot keep %s: %s", path, e)
                        continue
        return list(self._regions.values())

    def tick(self) -> None:
        answered = self.pods.look() if self.pods else False
        host = HostProcesses()
        seen: dict[str, tuple[NodeProcess, ...]] = {}
        kept_before = {gpu: set(names) for gpu, names in self._partitions.items()}
        for region in self.regions():
            figures = self.device.figures(region.uuid) if self.device else None
            for job in self.jobs.values():
                job.members(region)   # the last counters of its processes, before a dead one's slot is freed
            # After the device was asked: a dead process's memory goes back once the device let go of it.
            # Every namespace's: a process in a container is found dead only by what the host sees.
            if not self._device_holds_the_dead(region.uuid, figures):
                region.reap_all_namespaces()
            self._note_partitions(region)
            for slot in region.processes():
                if slot.exited:
                    continue
                found = host.find(slot)
                if found is None:
                    continue
                process = NodeProcess(host_pid=found[0], pid_namespace=found[1], foreign=found[2],
                                      container=container_id(found[0]), slot=slot, gpu=region.uuid)
                if process.foreign and figures is not None:
                    self._reconcile(region, process, figures)
                if self._claim(region, process):
                    key = job_key(process)[0]
                    seen[key] = seen.get(key, ()) + (process,)
        if not self._resumed:
            self._resume(seen)
        self._record(seen)
        if self.pods:
            self._label_pods()
            if answered:
                for region in self.regions():
                    self._remove_unheld(region)
        if self.partitions_changed and (self._partitions != kept_before or not self._cdi_written):
            self._cdi_written = True
            try:
                self.partitions_changed()
            except Exception as e:   # the books go on; the spec is tried again at the next change
                log.error("cannot refresh the CDI spec: %s", e)

    def _device_holds_the_dead(self, uuid: str, figures: dict[int, int] | None) -> bool:
        """Whether the device still lists a process that has ended (a driver frees a process's memory
        as its last file descriptor closes, which may trail its exit): its slot, and the memory on its
        books, wait for the next look, for at most LINGER_S seconds (a figure that never goes is
        the driver's fault, not a reason to keep the books wrong)."""
        dead = {pid for pid in (figures or {}) if not state.process_start_time(pid)}
        if not dead:
            self._lingering.pop(uuid, None)
            return False
        since = self._lingering.setdefault(uuid, time.monotonic())
        return time.monotonic() - since < LINGER_S

    # -- ground truth ----------------------------------------------------------------------------
    def _reconcile(self, region: state.Region, process: NodeProcess, figures: dict[int, int]) -> None:
        """Charge what the device holds for a process of another namespace beyond its books. The
        figure is set against the larger of the books read before and after it; a positive drift is
        read twice more, a few milliseconds apart, and the smallest kept (an allocation made between
        the books' charge and the device's is not memory missed)."""
        best: tuple[int, int] | None = None
        for attempt in range(3):
            before = self._books(region, process.slot)
            held = figures.get(process.host_pid, 0) if attempt == 0 else \
                (self.device.figures(region.uuid) or {}).get(process.host_pid, 0)
            books = max(before, self._books(region, process.slot))
            if best is None or held - books < best[0] - best[1]:
                best = (held, books)
            if best[0] <= best[1]:
                break
            time.sleep(0.003)
        held, books = best
        if held == 0 and books == 0:
            return   # no context yet: nothing to say
        charged = region.reconcile(process.slot, held, books)
        if charged and not process.slot.drift_charged:
            log.warning("%s holds %d bytes for pid %d (%s) beyond its books: charged to partition '%s'",
                        process.gpu, charged, process.host_pid, self._who(process), process.slot.partition)

    @staticmethod
    def _books(region: state.Region, slot: state.ProcessSlot) -> int:
        now = next((p for p in region.processes() if p.slot == slot.slot and p.pid == slot.pid), None)
        return now.used if now else slot.used

    @staticmethod
    def _who(process: NodeProcess) -> str:
        return f"container {process.container[:12]}" if process.container else \
            f"pid namespace {process.pid_namespace}" if process.foreign else "host"

    # -- recording -------------------------------------------------------------------------------
    def _claim(self, region: state.Region, process: NodeProcess) -> bool:
        """Whether the agent records ``process``: nobody else does. A host process with no holder (or a
        dead one) is adopted, so its slot is kept with its last counters when it ends. A holder of a
        process in another namespace is a pid there (`fracgpu run` inside a container): its slot is
        not adopted (the host's pid would mean nothing there), and its last counters are those the
        agent read before reaping it."""
        slot = process.slot
        if process.foreign:
            return slot.holder == 0
        if slot.holder == self.pid:
            return True
        if slot.holder and state.process_start_time(slot.holder):
            return False   # `fracgpu run` or fracgpu.init()'s recorder keeps it
        return region.adopt(slot, self.pid, previous=slot.holder)

    def _labels(self, processes: tuple[NodeProcess, ...]) -> dict[str, str]:
        labels = dict(job_key(processes[0])[1])
        if self.pods:
            labels.update(self.pods.labels(processes[0].gpu, processes[0].slot.partition) or {})
        if self.label_provider:
            for process in processes:
                try:
                    labels.update({str(k): str(v) for k, v in self.label_provider(process).items()})
                except Exception as e:   # a provider's failure must not stop the node's books
                    log.error("the label provider failed for pid %d: %s", process.host_pid, e)
        return labels

    def _record(self, seen: dict[str, tuple[NodeProcess, ...]]) -> None:
        for key, processes in seen.items():
            job = self.jobs.get(key)
            if job is None:
                first = processes[0]
                job = _NodeJob(self.ledger, key, first.slot.partition, self._labels(processes), self.state_dir,
                               self.pid, command=first.slot.command)
                job.start()
                self.jobs[key] = job
                log.info("job %d opened: %s in partition '%s' on %s", job.job_id, self._who(first),
                         first.slot.partition, first.gpu)
            for p in processes:
                job.slots.add((p.gpu, p.slot.slot, p.slot.pid, p.slot.start_time))
        for key, job in list(self.jobs.items()):
            if key in seen:
                job.sample()
            else:
                job.finish(None)   # its last process has gone: a last sample with the final counters
                del self.jobs[key]
                log.info("job %d finished: its last process has gone", job.job_id)

    def _resume(self, seen: dict[str, tuple[NodeProcess, ...]]) -> None:
        """Picks up the rows an earlier agent left open: resumed where their processes still run,
        finished at their last sample where they have gone."""
        self._resumed = True
        try:
            rows = [r for r in self.ledger.jobs() if r.kind == KIND and r.end is None and KEY_LABEL in r.labels]
        except LedgerError as e:
            log.error("cannot read the open rows of the ledger %s: %s", self.ledger.path, e)
            return
        for row in rows:
            key = row.labels[KEY_LABEL]
            if key in seen and key not in self.jobs:
                labels = {k: v for k, v in row.labels.items() if k != KEY_LABEL}
                job = _NodeJob(self.ledger, key, row.partition, labels, self.state_dir, self.pid, command=row.command)
                job.job_id = row.id
                for p in seen[key]:
                    job.slots.add((p.gpu, p.slot.slot, p.slot.pid, p.slot.start_time))
                now = job.read()
                job.carried_ns = max(0, round(row.gpu_seconds * 1e9) - now.device_ns)
                job.carried_launches = max(0, row.launches - now.launches)
                self.jobs[key] = job
                log.info("job %d resumed: its processes still run", row.id)
            else:
                samples = self.ledger.samples(row.id)
                self.ledger.finish(row.id, exit_status=None, end=samples[-1][0] if samples else row.start)
                log.info("job %d finished: its processes ended while no agent kept them", row.id)

    # -- pods ------------------------------------------------------------------------------------
    def _label_pods(self) -> None:
        """A job opened before the kubelet named the pod holding its partition (or while it did not
        answer) gets the pod's labels once it does."""
        for job in self.jobs.values():
            if kube.POD_LABEL in job.labels or not job.slots:
                continue
            gpu = next(iter(job.slots))[0]
            labels = self.pods.labels(gpu, job.partition)
            if labels:
                self.ledger.add_labels(job.job_id, labels)
                job.labels = {**job.labels, **labels}
                log.info("job %d is pod %s/%s's", job.job_id, labels.get(kube.NAMESPACE_LABEL),
                         labels.get(kube.POD_LABEL))

    def _remove_unheld(self, region: state.Region) -> None:
        """Removes the slices partitions no container holds any more (``PodWatch.unheld``), unless live
        processes still use them (a pod deleted while its processes linger): those are tried again at
        the next answer, and said once."""
        unheld = self.pods.unheld(region.uuid, [p.name for p in region.partitions()])
        self._kept_unheld -= {k for k in self._kept_unheld if k[0] == region.uuid and k[1] not in unheld}
        for name in unheld:
            users = partition_users(region, name)
            why = f"in use by {describe_users(users)}" if users else None
            if not users:
                try:
                    region.remove_partition(name)
                except state.StateError as e:
                    why = str(e)
            if why:
                if (region.uuid, name) not in self._kept_unheld:
                    log.warning("partition '%s' on %s is held by no pod any more but is %s: not removed yet", name,
                                region.uuid, why)
                    self._kept_unheld.add((region.uuid, name))
                continue
            self.pods.forget(region.uuid, name)
            log.info("removed partition '%s' on %s: no pod holds its slices any more", name, region.uuid)
            if self.cdi_root:
                self._drop_cdi_device(name)

    def _drop_cdi_device(self, partition: str) -> None:
        """Removes the removed partition's CDI device from the device plugin's specs in the CDI root
        (``SLICES_CDI_KIND``, a device named for the partition): a spec left with no device goes."""
        kind = kube.SLICES_CDI_KIND
        for path in glob.glob(cdi.default_spec_path(kind, self.cdi_root, "*")):
            try:
                with open(path) as f:
                    spec = json.load(f)
                devices = spec.get("devices", [])
                kept = [d for d in devices if d.get("name") != cdi.device_name(partition)]
                if spec.get("kind") != kind or len(kept) == len(devices):
                    continue
                if kept:
                    cdi.write_spec_file(path, {**spec, "devices": kept})
                else:
                    os.unlink(path)
                log.info("CDI device %s=%s removed from %s", kind, cdi.device_name(partition), path)
            except (OSError, ValueError) as e:
                log.warning("cannot drop the CDI device of partition '%s' from %s: %s", partition, path, e)

    # -- partitions kept -------------------------------------------------------------------------
    def _note_partitions(self, region: state.Region) -> None:
        now = {p.name for p in region.partitions() if not p.ephemeral}   # not those of one `fracgpu run`
        before = self._partitions.get(region.uuid, set())
        for name in sorted(now - before):
            log.info("keeping partition '%s' on %s", name, region.uuid)
        for name in sorted(before - now):
            log.info("no longer keeping partition '%s' on %s: it was removed", name, region.uuid)
        self._partitions[region.uuid] = now


# -- partitions in use -------------------------------------------------------------------------------
def partition_users(region: state.Region, partition: str) -> list[NodeProcess]:
    """The live processes of ``partition`` on ``region``, as the node sees them (container named)."""
    host = HostProcesses()
    out = []
    for slot in region.processes():
        if slot.partition != partition or slot.exited:
            continue
        found = host.find(slot)
        if found is None:
            continue
        out.append(NodeProcess(host_pid=found[0], pid_namespace=found[1], foreign=found[2],
                               container=container_id(found[0]), slot=slot, gpu=region.uuid))
    return out


def describe_users(users: list[NodeProcess]) -> str:
    """``container 3f2a1b9c0d4e (pids 812, 815), process 901 (python3)``: who uses a partition."""
    by_container: dict[str, list[int]] = {}
    others = []
    for user in users:
        if user.container:
            by_container.setdefault(user.container[:12], []).append(user.host_pid)
        elif user.foreign:
            others.append(f"process {user.host_pid} ({user.slot.command}, pid namespace {user.pid_namespace})")
        else:
            others.append(f"process {user.host_pid} ({user.slot.command})")
    named = [f"container {cid} (pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, sorted(pids)))})"
             for cid, pids in sorted(by_container.items())]
    return ", ".join(named + others)


def end_processes(users: list[NodeProcess], timeout: float = 5.0) -> list[NodeProcess]:
    """SIGKILLs the processes ``users`` (by host pid, checked against their start time) and waits
    for them to be gone; returns those still there after ``timeout`` seconds."""
    for user in users:
        if state.process_alive(user.host_pid, user.slot.start_time):
            try:
                os.kill(user.host_pid, 9)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    left = users
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [u for u in left if state.process_alive(u.host_pid, u.slot.start_time)]
    return left
