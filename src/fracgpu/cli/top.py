"""``fracgpu top``: a live view of each GPU's partitions and processes.

Everything shown is a ``fracgpu.snapshot``: the compute share a partition (or
process) achieved needs two reads, so the live view shows it from its second
refresh on, and ``--once`` reads twice, ``--interval`` apart.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from fracgpu import snapshot, state
from fracgpu.cli.common import console, drift_text, limit_text, partition_label, refusals, share_text, tables
from fracgpu.units import format_size

NOT_AVAILABLE = "n/a"


def read(state_dir: str | None = None) -> snapshot.Read:
    """One read of the shared state; an unsafe or damaged one is refused with its message."""
    with refusals():
        return snapshot.read(state_dir)


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.2f} s"


def _achieved(share: float | None) -> str:
    return NOT_AVAILABLE if share is None else f"{share * 100:.1f}%"


PARTITION_COLUMNS = [("partition", "left"), ("memory / limit", "right"), ("%", "right"), ("peak", "right"),
                     ("share", "right"), ("achieved", "right"), ("GPU time", "right"), ("procs", "right"),
                     ("drift", "right")]
PROCESS_COLUMNS = [("pid", "right"), ("partition", "left"), ("command", "left"), ("memory", "right"),
                   ("peak", "right"), ("achieved", "right"), ("GPU time", "right"), ("device", "right"),
                   ("drift", "right")]


def render(view: snapshot.Snapshot, state_dir: str, width: int = 80) -> Any:
    """The view as a rich renderable ``width`` columns wide: per GPU, a table of partitions and one
    of processes (each split in narrower tables where it would not fit)."""
    from rich.console import Group
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
        parts.append(Text(f"\n{gpu.uuid}  {gpu.name}\nmemory {format_size(used)} / {format_size(gpu.total_memory)} "
                          f"in partitions", style="bold"))
        rows, styles = [], []
        for p in gpu.partitions:
            rows.append([partition_label(p), f"{format_size(p.used)} / {limit_text(p)}",
                         f"{100 * p.used / p.memory_limit:.0f}%" if p.memory_limit else "-", format_size(p.peak),
                         share_text(p), _achieved(view.partition_share(gpu, p)), _seconds(p.device_ns),
                         str(p.processes), drift_text(p.drift, p.drift_unknown)])
            styles.append("red" if p.memory_limit and p.used >= 0.9 * p.memory_limit else None)
        parts += tables(PARTITION_COLUMNS, rows or [["(none)"] + [""] * (len(PARTITION_COLUMNS) - 1)], width, styles)
        if gpu.processes:
            rows = [[str(q.pid), q.partition, q.command, format_size(q.used), format_size(q.peak),
                     _achieved(view.process_share(gpu, q)), _seconds(q.device_ns),
                     NOT_AVAILABLE if q.device_used is None else format_size(q.device_used),
                     drift_text(q.drift, int(q.truth == "unknown"))] for q in gpu.processes]
            parts += tables(PROCESS_COLUMNS, rows, width)
    return Group(*parts)


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
    configured and achieved, device time, and the drift between the books and what the device
    reports each process holds (+: memory the books missed, charged to the partition; ?: the
    device does not list the process). Ctrl-C quits."""
    state_dir = state.resolve_state_dir()
    try:
        if once or json_output:
            first = read()
            time.sleep(interval)
            view = snapshot.take(first, read())
            if json_output:
                click.echo(json.dumps(snapshot.as_json(view), indent=2))
            else:
                screen = console()
                screen.print(render(view, state_dir, screen.width))
            return
        _live(interval, state_dir)
    except KeyboardInterrupt:
        return


def _live(interval: float, state_dir: str) -> None:
    """Refresh in place on a terminal; elsewhere (a pipe, a file) print a snapshot each interval."""
    screen = console()
    previous = read()
    view = snapshot.take(None, previous)
    if not screen.is_terminal:
        while True:
            time.sleep(interval)
            current = read()
            screen.print(render(snapshot.take(previous, current), state_dir, screen.width))
            screen.print()
            previous = current
    from rich.live import Live

    with Live(render(view, state_dir, screen.width), console=screen, auto_refresh=False, transient=False,
              vertical_overflow="ellipsis") as live:
        while True:
            time.sleep(interval)
            current = read()
            live.update(render(snapshot.take(previous, current), state_dir, screen.width), refresh=True)
            previous = current
