"""``fracgpu top``: a live view of each GPU's partitions and processes.

Everything shown comes from ``fracgpu.usage()``. The compute share a partition
(or process) achieved is the device time it used between two reads divided by
the time between them, so every view needs two reads: the live view shows it
from its second refresh on, and ``--once`` reads twice, ``--interval`` apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import click

from fracgpu import state
from fracgpu.cli import refusals
from fracgpu.units import format_share, format_size

NOT_AVAILABLE = "n/a"


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


def read(state_dir: str | None = None) -> tuple[float, list[state.GPUUsage]]:
    """One read of the shared state (``state_dir``, default the usual one), with the monotonic time it was taken."""
    with refusals():
        gpus = state.usage(state_dir)
    return time.monotonic(), gpus


def snapshot(before: tuple[float, list[state.GPUUsage]] | None, after: tuple[float, list[state.GPUUsage]]) -> Snapshot:
    """The view of ``after``, with each share achieved since ``before`` (None: no earlier read).

    A partition or process missing from ``before`` (new), or whose device time went
    down (removed and made again under the same name), has no achieved share."""
    t1, gpus = after
    partition_shares: dict[tuple[str, str], float] = {}
    process_shares: dict[tuple[str, int], float] = {}
    interval = None
    if before is not None and after[0] > before[0]:
        t0, earlier = before
        interval = t1 - t0
        elapsed_ns = interval * 1e9
        old_partitions = {(g.uuid, p.name): p.device_ns for g in earlier for p in g.partitions}
        old_processes = {(g.uuid, p.pid): p.device_ns for g in earlier for p in g.processes}
        for g in gpus:
            for p in g.partitions:
                old = old_partitions.get((g.uuid, p.name))
                if old is not None and p.device_ns >= old:
                    partition_shares[(g.uuid, p.name)] = (p.device_ns - old) / elapsed_ns
            for q in g.processes:
                old = old_processes.get((g.uuid, q.pid))
                if old is not None and q.device_ns >= old:
                    process_shares[(g.uuid, q.pid)] = (q.device_ns - old) / elapsed_ns
    return Snapshot(time.time(), interval, gpus, partition_shares, process_shares)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.2f} s"


def _achieved(share: float | None) -> str:
    return NOT_AVAILABLE if share is None else f"{share * 100:.1f}%"


def _configured(p: state.PartitionUsage) -> str:
    if not p.compute_share:
        return "-"
    return format_share(p.compute_share) + (" cap" if p.compute_cap else "")


def render(view: Snapshot, state_dir: str) -> Any:
    """The view as a rich renderable: per GPU, a table of partitions and one of processes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.time))
    measured = f"compute achieved over the last {view.interval:.2f} s" if view.interval else \
        "compute achieved: measuring"
    parts: list[Any] = [Text(f"fracgpu top  {stamp}  ({measured})", style="bold")]
    if not view.gpus:
        parts.append(Text(f"No GPU has fracgpu partitions (state folder {state_dir}). Start a job with "
                          "`fracgpu run --memory SIZE -- COMMAND`."))
        return Group(*parts)
    for gpu in view.gpus:
        used = sum(p.used for p in gpu.partitions)
        parts.append(Text(f"\n{gpu.name}  {gpu.uuid}  memory {format_size(used)} / {format_size(gpu.total_memory)} "
                          f"in partitions", style="bold"))
        table = Table(title=None, expand=False)
        for column in ("partition", "memory / limit", "%", "peak", "compute share", "achieved", "device time",
                       "procs"):
            table.add_column(column, justify="left" if column == "partition" else "right", overflow="fold")
        for p in gpu.partitions:
            limit = format_size(p.memory_limit) if p.memory_limit else "unlimited"
            percent = f"{100 * p.used / p.memory_limit:.0f}%" if p.memory_limit else "-"
            style = "red" if p.memory_limit and p.used >= 0.9 * p.memory_limit else None
            table.add_row(p.name + (" (private)" if p.ephemeral else ""), f"{format_size(p.used)} / {limit}",
                          percent, format_size(p.peak), _configured(p), _achieved(view.partition_share(gpu, p)),
                          _seconds(p.device_ns), str(p.processes), style=style)
        if not gpu.partitions:
            table.add_row("(none)", "", "", "", "", "", "", "")
        parts.append(table)
        if gpu.processes:
            procs = Table(expand=False)
            for column in ("pid", "partition", "command", "memory", "peak", "achieved", "device time"):
                procs.add_column(column, justify="left" if column in ("partition", "command") else "right",
                                 overflow="fold")
            for q in gpu.processes:
                procs.add_row(str(q.pid), q.partition, q.command, format_size(q.used), format_size(q.peak),
                              _achieved(view.process_share(gpu, q)), _seconds(q.device_ns))
            parts.append(procs)
    return Group(*parts)


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


def _console() -> Any:
    from rich.console import Console

    # Not a terminal and no COLUMNS: wide enough that rows of a usual view stay on one line for scripts.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(width=width)


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
    configured and achieved, device time. Ctrl-C quits."""
    state_dir = state.resolve_state_dir()
    try:
        if once or json_output:
            first = read()
            time.sleep(interval)
            view = snapshot(first, read())
            if json_output:
                click.echo(json.dumps(as_json(view), indent=2))
            else:
                _console().print(render(view, state_dir))
            return
        _live(interval, state_dir)
    except KeyboardInterrupt:
        return


def _live(interval: float, state_dir: str) -> None:
    """Refresh in place on a terminal; elsewhere (a pipe, a file) print a snapshot each interval."""
    console = _console()
    previous = read()
    view = snapshot(None, previous)
    if not console.is_terminal:
        while True:
            time.sleep(interval)
            current = read()
            console.print(render(snapshot(previous, current), state_dir))
            console.print()
            previous = current
    from rich.live import Live

    with Live(render(view, state_dir), console=console, auto_refresh=False, transient=False,
              vertical_overflow="ellipsis") as live:
        while True:
            time.sleep(interval)
            current = read()
            live.update(render(snapshot(previous, current), state_dir), refresh=True)
            previous = current
