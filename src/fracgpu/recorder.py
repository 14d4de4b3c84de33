"""Recording a job in the ledger while it runs: what its processes hold and use, sampled.

A recorder is the *holder* of its job's processes (``FRACGPU_JOB_HOLDER`` is
its pid): a process of the job that ends keeps its slot in the shared state,
marked exited, with its final counters, until the recorder has read them
(``collect``). So the device time a job used right before it ended, or was
killed, is in the ledger, not lost between two samples.

What a sample reads, for a job in a private partition (``fracgpu run
--memory``/``--compute``, ``fracgpu.init(memory=...)``): the partition's own
counters, exact (memory in use, peak, device time), on every GPU that has it.
For a job in a shared partition (``--partition NAME``): the slots of its
processes (those it holds); its peak is the largest of their peaks and of the
sampled sum.

``fracgpu run`` records its command this way (``fracgpu.cli.run``); ``fracgpu.init()``
starts ``python -m fracgpu.recorder`` to watch the calling process.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import sys
import time

from fracgpu import state
from fracgpu.ledger import GPUSample, Ledger, LedgerError, Limits
from fracgpu.units import PRIORITIES

__all__ = ["JobRecorder", "sample_interval"]


def sample_interval(elapsed: float) -> float:
    """Seconds between samples, ``elapsed`` seconds into a job: 0.25 s for the first minute
    (short jobs get a detailed plot), then 1 s, then 5 s after an hour (a long job stays small)."""
    return 0.25 if elapsed < 60 else 1.0 if elapsed < 3600 else 5.0


@dataclasses.dataclass
class Reading:
    memory_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_drift_bytes: int = 0     # the most memory the books missed, charged at once (inside memory_bytes)
    device_ns: int = 0
    launches: int = 0
    gpus: tuple[str, ...] = ()
    memory_limit: int | None = None
    compute_share: float | None = None
    priority: str | None = None   # its partition's class (the highest over its GPUs); None: not seen yet
    # Per GPU (UUID): its limits there as the shared state holds them now, and what it used there.
    per_gpu: dict[str, GPUSample] = dataclasses.field(default_factory=dict)


class JobRecorder:
    """One job's row in the ledger, kept up to date from the shared state.

    ``holder`` is the pid its processes name in ``FRACGPU_JOB_HOLDER`` (this
    process, by default). ``private``: the partition is the job's own, so its
    totals are the job's."""

    def __init__(self, ledger: Ledger, *, job: str, partition: str, private: bool, state_dir: str,
                 command: str = "", kind: str = "run", labels: dict[str, str] | None = None,
                 memory_limit: int | None = None, compute_share: float | None = None, holder: int | None = None,
                 priority: str = "normal"):
        self.ledger = ledger
        self.job, self.partition, self.private = job, partition, private
        self.state_dir = state_dir
        self.command, self.kind, self.labels = command, kind, labels or {}
        self.memory_limit, self.compute_share, self.priority = memory_limit, compute_share, priority
        self.holder = os.getpid() if holder is None else holder
        self.job_id: int | None = None
        self._regions: dict[str, state.Region] = {}
        self._processes: set[tuple[str, int, int]] = set()   # (gpu, pid, attach time) seen
        self._peak = 0
        self._peak_drift = 0
        self._warned = False

    def start(self, start: float | None = None) -> int:
        self.job_id = self.ledger.start_job(
            job=self.job, partition=self.partition, gpu="", command=self.command, kind=self.kind,
            labels=self.labels, memory_limit=self.memory_limit, compute_share=self.compute_share, start=start,
            priority=self.priority,
            recorder_pid=os.getpid(), recorder_start=state.process_start_time(os.getpid()))
        return self.job_id

    def _open_regions(self) -> list[state.Region]:
        folder = self.state_dir
        if os.path.isdir(folder):
            for path in state.region_files(folder):
                if path not in self._regions:
                    try:
                        region = state.open_region_file(path)
                    except state.StateError:
                        continue   # a damaged file is reported by those who use it, not by the recorder
                    self.ledger.note_gpu(region.uuid, region.device_name, region.total_memory)
                    self._regions[path] = region
        return list(self._regions.values())

    def read(self) -> Reading:
        """The job's use now, over every GPU. Reaps first: the job's ended processes are
        kept (exited) for this recorder, and the memory of dead ones is given back."""
        out = Reading()
        gpus = []
        limits, shares, priorities = [], [], []
        for region in self._open_regions():
            # By pid alone: a full reap reads /proc once per process on the GPU, and every
            # running job's recorder samples several times a second.
            region.reap(quick=True)
            mine = self.members(region)
            part = region.partition(self.partition)
            if part is None or not (mine or self.private):
                continue
            if self.private:
                memory, drift, device_ns = part.used, part.drift_charged, part.device_ns
                out.peak_memory_bytes = max(out.peak_memory_bytes, part.peak)
                out.peak_drift_bytes = max(out.peak_drift_bytes, part.drift_peak)
                out.launches += part.launches
            else:
                # Its processes' books and what the device held beyond them (charged to the partition).
                drift = sum(p.drift_charged for p in mine)
                memory = sum(p.used for p in mine) + drift
                device_ns = sum(p.device_ns for p in mine)
                out.peak_drift_bytes = max(out.peak_drift_bytes, drift)
                out.peak_memory_bytes = max(out.peak_memory_bytes, memory, *(p.peak for p in mine))
                out.launches += sum(p.launches for p in mine)
            out.memory_bytes += memory
            out.device_ns += device_ns
            for p in mine:
                self._processes.add((region.uuid, p.pid, p.attached_unix_ns))
            # Its reservation on this GPU began when its first process attached (a private
            # partition is made then).
            attached = [a for gpu, _, a in self._processes if gpu == region.uuid and a]
            out.per_gpu[region.uuid] = GPUSample(
                Limits.of_partition(part),
                memory, device_ns / 1e9, drift, min(attached) / 1e9 if attached else None)
            gpus.append(region.uuid)
            if part.memory_limit:
                limits.append(part.memory_limit)
            if part.compute_share:
                shares.append(part.compute_share)
            priorities.append(part.priority)
        self._peak = max(self._peak, out.peak_memory_bytes)
        out.peak_memory_bytes = self._peak
        self._peak_drift = max(self._peak_drift, out.peak_drift_bytes)
        out.peak_drift_bytes = self._peak_drift
        out.gpus = tuple(gpus)
        out.memory_limit = max(limits) if limits else self.memory_limit
        out.compute_share = max(shares) if shares else self.compute_share
        out.priority = min(priorities, key=PRIORITIES.index) if priorities else None
        return out

    def sample(self, t: float | None = None) -> Reading | None:
        """Reads the job and writes a sample; a ledger that fails is reported once and the job goes on."""
        try:
            reading = self.read()
            self.ledger.sample(self.job_id, t=t, memory_bytes=reading.memory_bytes,
                               device_seconds=reading.device_ns / 1e9, peak_memory_bytes=reading.peak_memory_bytes,
                               launches=reading.launches, processes=len({p[1:] for p in self._processes}),
                               gpu=",".join(reading.gpus) or None, memory_limit=reading.memory_limit,
                               compute_share=reading.compute_share, peak_drift_bytes=reading.peak_drift_bytes,
                               priority=reading.priority, gpus=reading.per_gpu)
            return reading
        except Exception as e:   # ledger, sqlite3, state: the job must not die because its record failed
            self._warn(e)
        return None

    def close_orphans(self) -> None:
        """Closes the ledger's jobs whose recorder was killed (``Ledger.close_orphans``); a ledger
        that fails is reported once and the job goes on."""
        try:
            self.ledger.close_orphans()
        except Exception as e:   # as in sample(): the job must not die because a record failed
            self._warn(e)

    def finish(self, exit_status: int | None, end: float | None = None) -> None:
        """The job ended: a last sample (the ended processes' final counters), its end and
        exit status (-N: killed by signal N; None: not known), then its kept slots freed."""
        end = time.time() if end is None else end
        self.sample(t=end)
        try:
            self.ledger.finish(self.job_id, exit_status=exit_status, end=end)
        except Exception as e:
            self._warn(e)
        for region in self._regions.values():
            self.collect(region)

    def members(self, region: state.Region) -> list[state.ProcessSlot]:
        """The job's processes on ``region``: those it holds (ended ones kept for it included)."""
        return [p for p in region.processes() if p.holder == self.holder]

    def collect(self, region: state.Region) -> None:
        """Frees the kept slots of the job's ended processes on ``region``, once finished."""
        region.collect(self.holder)

    def _warn(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            print(f"fracgpu: cannot record job {self.job!r} in the ledger {self.ledger.path}: {error}; the job "
                  "goes on unrecorded", file=sys.stderr)


def watch(argv: list[str] | None = None) -> int:
    """``python -m fracgpu.recorder``: record the job of a process that fracgpu did not start
    (``fracgpu.init()``) until it ends. Its exit status is not known to us: recorded as null."""
    import argparse   # only this entry point parses arguments: `fracgpu run` does not load it

    parser = argparse.ArgumentParser(prog="python -m fracgpu.recorder")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--start-time", type=int, required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--partition", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--ledger")
    parser.add_argument("--command", default="")
    args = parser.parse_args(argv)
    try:
        ledger = Ledger(args.ledger)
    except LedgerError as e:
        print(f"fracgpu: {e}", file=sys.stderr)
        return 2
    recorder = JobRecorder(ledger, job=args.job, partition=args.partition, private=args.private,
                           state_dir=args.state_dir, command=args.command, kind="init")
    started = time.time()
    recorder.start(start=started)
    # Stopped (SIGTERM, SIGHUP): the job's record is finished all the same.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        ended = _exit_watch(args.pid)   # readable when the process ends: its record is finished at once
        while state.process_alive(args.pid, args.start_time):
            recorder.sample()
            wait = sample_interval(time.time() - started)
            if ended is not None:
                select.select([ended], [], [], wait)
            else:
                time.sleep(wait)
    finally:
        recorder.finish(None)
        ledger.close()
    return 0


def _exit_watch(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it has exited), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    sys.exit(watch())
