"""``fracgpu report``: per-job usage and cost, from the ledger."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import signal
import time

import click

from fracgpu.cli.common import InputError, checked_by, console, drift_text, tables
from fracgpu.ledger import JobRecord, Ledger, LedgerError
from fracgpu.units import format_size

FIELDS = ["job", "partition", "gpu", "start", "end", "exit_status", "gpu_seconds", "memory_byte_seconds",
          "peak_memory_bytes", "peak_drift_bytes", "memory_limit", "compute_share", "priority", "processes", "launches",
          "kind", "command", "labels"]
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from "2026-11-28", "2026-11-28T09:30", "2026-11-28 09:30:00" (local time unless an
    offset is given) or a time ago: "90m", "12h", "7d", "2w". Raises ValueError naming the forms."""
    now = time.time() if now is None else now
    match = _RELATIVE.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"invalid time {text!r}: give a date like 2026-11-28, a date and time like "
                         "2026-11-28T09:30, or a time ago like 90m, 12h, 7d") from None
    return when.timestamp()


def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"invalid rate {text!r}: give a price per GPU-hour, like 2.5") from None
    if not (rate >= 0 and rate != float("inf")):
        raise ValueError(f"invalid rate {text!r}: give a price per GPU-hour >= 0")
    return rate


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# The file formats --plot writes, by the file name's suffix.
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def plot_format(path: str) -> str:
    """The format --plot writes to ``path``, from its suffix; InputError for another suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_FORMATS:
        raise InputError(f"--plot {path}: give a file name ending in " + ", ".join(PLOT_FORMATS) +
                         f" (the format is chosen by the suffix{', not ' + suffix if suffix else ''})")
    return PLOT_FORMATS[suffix]


def _check_plot_path(path: str) -> str:
    """The format to write the plot to ``path`` in; InputError when it cannot be written there."""
    file_format = plot_format(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: pip install 'fracgpu[plot]'") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"--plot {path}: the folder {folder} does not exist")
    return file_format


def row(job: JobRecord, rate: float | None) -> dict:
    out = {field: getattr(job, field) for field in FIELDS}
    out["start"], out["end"] = _iso(job.start), _iso(job.end)
    if rate is not None:
        out["cost"] = round(job.gpu_seconds / 3600 * rate, 6)
    return out


@click.command("report")
@click.option("--since", metavar="TIME", callback=checked_by(parse_since),
              help="Only jobs that ran since then (started before, but still running or ended after, count): "
                   "2026-11-28, 2026-11-28T09:30, or a time ago like 12h, 7d.")
@click.option("--until", metavar="TIME", callback=checked_by(parse_since),
              help="Only jobs that started by then; the same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--rate", metavar="PRICE", callback=checked_by(parse_rate),
              help="Price per GPU-hour: adds each job's cost (GPU-seconds / 3600 x PRICE).")
@click.option("--ledger", "ledger_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="The ledger file. [default: $FRACGPU_LEDGER, else the per-user one]")
@click.option("--plot", "plot_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Also draw each job's memory and compute share over time into this file: PNG, SVG or PDF, "
                   "by its suffix (needs matplotlib: pip install 'fracgpu[plot]').")
def report(since: str | None, until: str | None, fmt: str, rate: str | None, ledger_path: str | None,
           plot_path: str | None) -> None:
    """Per-job usage and cost from the ledger: GPU-seconds, memory byte-seconds, peak memory, and
    the peak drift (the most memory the books missed, which the device reported and the job was
    charged for).

    With --since and --until, the jobs that ran at some time between them, each with its whole totals."""
    now = time.time()   # one "now" for both bounds, so "--since 2d --until 1d" is exactly a day
    start, end = (parse_since(text, now) if text else None for text in (since, until))
    if start is not None and end is not None and end < start:
        raise InputError(f"--until {until} is before --since {since}: give a time after it")
    plot_as = _check_plot_path(plot_path) if plot_path is not None else None
    try:
        with Ledger(ledger_path) as ledger:
            ledger.close_orphans()   # jobs whose fracgpu run was killed end at their last sample
            jobs = ledger.jobs_during(start, end)
            samples = {job.id: ledger.samples(job.id) for job in jobs} if plot_path is not None else {}
    except LedgerError as e:
        raise InputError(str(e)) from None
    if plot_path is not None:
        from fracgpu import plot

        plot.save(plot.draw(jobs, samples), plot_path, plot_as)
        click.echo(f"plot of {len(jobs)} job(s) written to {plot_path}", err=True)
    price = parse_rate(rate) if rate is not None else None
    if fmt == "table":
        screen = console()
        for part in job_tables(jobs, price, screen.width):
            screen.print(part)
        return
    rows = [row(job, price) for job in jobs]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS + (["cost"] if price is not None else []))
        writer.writeheader()
        writer.writerows({**r, "labels": json.dumps(r["labels"], sort_keys=True)} for r in rows)
        click.echo(buf.getvalue(), nl=False)


def exit_text(status: int | None, ended: bool) -> str:
    if status is None:
        return "" if not ended else "unknown"
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    return str(status)


def _local(t: float | None) -> str:
    """A time as the table shows it: local, to the second, without the offset (JSON and CSV have it)."""
    return "" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def job_tables(jobs: list[JobRecord], price: float | None = None, width: int = 80) -> list:
    """The report as rich tables ``width`` columns wide: one row per job (split by columns, each
    part led by the job's name, where one table would not fit)."""
    columns = [("job", "left"), ("partition", "left"), ("start", "left"), ("end", "left"), ("exit", "right"),
               ("GPU time", "right"), ("memory GiB-h", "right"), ("peak memory", "right"), ("peak drift", "right")]
    if price is not None:
        columns.append(("cost", "right"))
    rows = []
    for job in jobs:
        partition = job.partition + ("" if job.priority == "normal" else f" ({job.priority})")
        cells = [job.job, partition, _local(job.start), _local(job.end) if job.end is not None else "running",
                 exit_text(job.exit_status, job.end is not None), f"{job.gpu_seconds:.2f} s",
                 f"{job.memory_byte_seconds / (1 << 30) / 3600:.4f}", format_size(job.peak_memory_bytes),
                 drift_text(job.peak_drift_bytes) if job.peak_drift_bytes else "0"]
        if price is not None:
            cells.append(f"{row(job, price)['cost']:.4f}")
        rows.append(cells)
    return tables(columns, rows, width, title=f"fracgpu jobs ({len(jobs)})")
