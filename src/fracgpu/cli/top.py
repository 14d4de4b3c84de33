"""``fracgpu top``: a live view of each GPU's partitions and processes, as nvidia-smi and nvitop users read one.

Everything shown is a ``fracgpu.snapshot``: the compute share a partition (or
process) achieved needs two reads, so the live view shows it from its second
refresh on, and ``--once`` reads twice, ``--interval`` apart. The ledger's
running jobs name the processes (``fracgpu run --name``, ``--label``), and, on a
Kubernetes node, the pod that holds each partition (``namespace/pod``, from the
labels ``fracgpu node --pod-resources-socket`` gives its jobs).

Each GPU is headed by the index a job would pass (``fracgpu.devices.numbering``:
CUDA's numbering, ``CUDA_VISIBLE_DEVICES`` included), its name, and its UUID
where there is room. A table keeps one line per partition or process: where
the terminal is too narrow, the least essential columns go first
(``common.fit``), and a name is cut only when the essential ones alone do not
fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from fracgpu import devices, snapshot, state
from fracgpu.cli.common import console, drift_text, fit, limit_text, partition_label, refusals, share_text
from fracgpu.units import format_size

NOT_AVAILABLE = "n/a"
QUIT_KEYS = "qQ"


def take(before: snapshot.Read | None, after: snapshot.Read) -> snapshot.Snapshot:
    """The view of ``after`` since ``before``, with the ledger's running jobs and the pods they name."""
    return snapshot.take(before, after, snapshot.running_jobs(), snapshot.running_pods())


def read(state_dir: str | None = None) -> snapshot.Read:
    """One read of the shared state; an unsafe or damaged one is refused with its message."""
    with refusals():
        return snapshot.read(state_dir)


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.2f} s"


def _achieved(share: float | None) -> str:
    return NOT_AVAILABLE if share is None else f"{share * 100:.1f}%"


def _pod(labels: dict[str, str] | None) -> str:
    """``namespace/pod`` as kubectl names a pod; - for a partition no pod holds."""
    return f"{labels.get('namespace', '')}/{labels.get('pod', '')}" if labels else "-"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


# (header, justify, rank): rank 0 is never dropped; at a narrow width the highest rank goes first.
PARTITION_COLUMNS = [("partition", "left", 0), ("job", "left", 1), ("memory / limit", "right", 0),
                     ("%", "right", 3), ("peak", "right", 6), ("share", "right", 2), ("achieved", "right", 1),
                     ("GPU time", "right", 4), ("procs", "right", 3), ("drift", "right", 5)]
# On a Kubernetes node (`fracgpu node --pod-resources-socket`): the pod holding each partition, after its job.
POD_COLUMN = ("pod", "left", 2)
PROCESS_COLUMNS = [("pid", "right", 0), ("job", "left", 0), ("partition", "left", 1), ("memory", "right", 0),
                   ("peak", "right", 6), ("achieved", "right", 1), ("GPU time", "right", 3),
                   ("device", "right", 4), ("drift", "right", 5), ("labels", "left", 6), ("command", "left", 7)]


def gpu_heading(gpu: state.GPUUsage, numbering: devices.Numbering | None, width: int) -> str:
    """``GPU 0  NAME  UUID`` as nvidia-smi heads a GPU (the UUID where there is room); a GPU
    hidden by CUDA_VISIBLE_DEVICES, or one no longer on this machine, says so instead of an index."""
    head = gpu.name if numbering is None else f"{numbering.describe(gpu.uuid)}  {gpu.name}"
    return f"{head}  {gpu.uuid}" if len(head) + 2 + len(gpu.uuid) <= width else head


def render(view: snapshot.Snapshot, state_dir: str, width: int = 80,
           numbering: devices.Numbering | None = None, live: bool = False) -> Any:
    """The view as a rich renderable ``width`` columns wide: per GPU, its heading, a table of its
    partitions and one of its processes. ``numbering`` gives the GPUs' indices (None: unknown);
    ``live`` adds how to quit."""
    from rich.console import Group
    from rich.text import Text

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.time))
    measured = f"compute over the last {view.interval:.2f} s" if view.interval else "compute: measuring"
    title = f"fracgpu top  {stamp}  {measured}" + ("  (q quits)" if live else "")
    parts: list[Any] = [Text(title, style="bold")]
    if numbering is not None and numbering.note():
        parts.append(Text(numbering.note()))
    if not view.gpus:
        parts.append(Text(f"No GPU has fracgpu partitions (state folder {state_dir}). Start a job with "
                          "`fracgpu run --memory SIZE -- COMMAND`."))
        return Group(*parts)
    for gpu in view.gpus:
        used = sum(p.used for p in gpu.partitions)
        parts.append(Text(gpu_heading(gpu, numbering, width), style="bold"))
        if numbering is not None and not numbering.exists(gpu.uuid) and not gpu.processes:
            parts.append(Text(f"  stale: this GPU is not on this machine now; its {len(gpu.partitions)} "
                              "partition(s) stay in the state folder until removed (`fracgpu partition rm`)"))
            continue
        parts.append(Text(f"  memory {format_size(used)} / {format_size(gpu.total_memory)} in partitions"))
        rows = []
        columns = PARTITION_COLUMNS[:2] + [POD_COLUMN] * bool(view.pods) + PARTITION_COLUMNS[2:]
        for p in gpu.partitions:
            jobs = view.jobs_in(p)
            job = jobs[0].job if len(jobs) == 1 else f"{len(jobs)} jobs" if jobs else "-"
            pod = view.pod_of(gpu, p)
            rows.append([partition_label(p), job, *[_pod(pod)] * bool(view.pods),
                         f"{format_size(p.used)} / {limit_text(p)}",
                         f"{100 * p.used / p.memory_limit:.0f}%" if p.memory_limit else "-", format_size(p.peak),
                         share_text(p), _achieved(view.partition_share(gpu, p)), _seconds(p.device_ns),
                         str(p.processes), drift_text(p.drift, p.drift_unknown)])
        parts.append(fit(columns, rows or [["(none)"] + [""] * (len(columns) - 1)], width))
        if gpu.processes:
            rows = []
            for q in gpu.processes:
                job = view.job_of(q)
                rows.append([str(q.pid), job.job if job else "-", q.partition, format_size(q.used),
                             format_size(q.peak), _achieved(view.process_share(gpu, q)), _seconds(q.device_ns),
                             NOT_AVAILABLE if q.device_used is None else format_size(q.device_used),
                             drift_text(q.drift, int(q.truth == "unknown")),
                             _labels(job.labels) if job else "-", q.command])
            parts.append(fit(PROCESS_COLUMNS, rows, width))
    return Group(*parts)


class Numberer:
    """The GPUs' indices for the view: probed once, and again (at most every ``retry`` seconds)
    when the state shows a GPU the last probe did not know. None where no driver answers."""

    def __init__(self, retry: float = 10.0):
        self.retry, self.known, self.at = retry, None, float("-inf")

    def __call__(self, view: snapshot.Snapshot) -> devices.Numbering | None:
        unknown = any(self.known is None or not self.known.exists(g.uuid) for g in view.gpus)
        if view.gpus and unknown and time.monotonic() - self.at >= self.retry:
            self.at = time.monotonic()
            try:
                self.known = devices.numbering()
            except devices.DeviceError:
                pass
        return self.known


def _as_json(view: snapshot.Snapshot, numbering: devices.Numbering | None) -> dict[str, Any]:
    out = snapshot.as_json(view)
    for entry in out["gpus"]:
        entry["index"] = None if numbering is None else numbering.index(entry["uuid"])
        entry["present"] = None if numbering is None else numbering.exists(entry["uuid"])
    return out


@click.command("top")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (no live view).")
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=1.0, show_default=True,
              metavar="SECONDS",
              help="Seconds between refreshes; the achieved compute share is measured over this time "
                   "(with --once, the two reads are this far apart).")
@click.option("--json", "json_output", is_flag=True,
              help="Print one snapshot as JSON (implies --once): bytes, nanoseconds, shares as fractions.")
def top(once: bool, interval: float, json_output: bool) -> None:
    """Live view of each GPU's partitions and processes: memory against limit, compute share
    configured and achieved, device time, the job each process belongs to (its --name and
    labels), and the drift between the books and what the device reports each process holds
    (+: memory the books missed, charged to the partition; ?: the device does not list the
    process). GPUs are numbered as CUDA numbers them for jobs started here. q (or Ctrl-C) quits."""
    state_dir = state.resolve_state_dir()
    numberer = Numberer()
    try:
        if once or json_output:
            first = read()
            time.sleep(interval)
            view = take(first, read())
            if json_output:
                click.echo(json.dumps(_as_json(view, numberer(view)), indent=2))
            else:
                screen = console()
                screen.print(render(view, state_dir, screen.width, numberer(view)))
            return
        _live(interval, state_dir, numberer)
    except KeyboardInterrupt:
        return


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """While the view runs on a terminal: its keys one at a time, unechoed (cbreak mode), read by the
    returned function within a timeout ('' when none came); restored on the way out."""
    import termios
    import tty

    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None

    def key(timeout: float) -> str:
        if fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield key
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _live(interval: float, state_dir: str, numberer: Numberer) -> None:
    """Refresh in place on a terminal until q; elsewhere (a pipe, a file) print a snapshot each interval."""
    screen = console()
    previous = read()
    if not screen.is_terminal:
        while True:
            time.sleep(interval)
            current = read()
            view = take(previous, current)
            screen.print(render(view, state_dir, screen.width, numberer(view)))
            screen.print()
            previous = current
    from rich.live import Live

    def frame(view: snapshot.Snapshot) -> Any:
        return render(view, state_dir, screen.width, numberer(view), live=True)

    view = take(None, previous)
    with _keys() as key, Live(frame(view), console=screen, auto_refresh=False, screen=True,
                              vertical_overflow="ellipsis") as live:
        deadline = time.monotonic() + interval
        while True:
            pressed = key(max(0.0, deadline - time.monotonic()))
            if any(k in QUIT_KEYS for k in pressed):
                return
            if time.monotonic() < deadline:
                continue
            current = read()
            live.update(frame(take(previous, current)), refresh=True)
            previous, deadline = current, time.monotonic() + interval
