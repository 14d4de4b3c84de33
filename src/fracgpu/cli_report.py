"""``fracgpu report``: per-job usage and cost, from the ledger."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import sys
import time

import click

from fracgpu.cli import InputError, checked_by
from fracgpu.ledger import JobRecord, Ledger, LedgerError
from fracgpu.units import format_size

FIELDS = ["job", "partition", "gpu", "start", "end", "exit_status", "gpu_seconds", "memory_byte_seconds",
          "peak_memory_bytes", "memory_limit", "compute_share"]
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


def row(job: JobRecord, rate: float | None) -> dict:
    out = {field: getattr(job, field) for field in FIELDS}
    out["start"], out["end"] = _iso(job.start), _iso(job.end)
    if rate is not None:
        out["cost"] = round(job.gpu_seconds / 3600 * rate, 6)
    return out


@click.command("report")
@click.option("--since", metavar="TIME", callback=checked_by(parse_since),
              help="Only jobs started since then: 2026-11-28, 2026-11-28T09:30, or a time ago like 12h, 7d.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--rate", metavar="PRICE", callback=checked_by(parse_rate),
              help="Price per GPU-hour: adds each job's cost (GPU-seconds / 3600 x PRICE).")
@click.option("--ledger", "ledger_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="The ledger file. [default: $FRACGPU_LEDGER, else the per-user one]")
def report(since: str | None, fmt: str, rate: str | None, ledger_path: str | None) -> None:
    """Per-job usage and cost from the ledger: GPU-seconds, memory byte-seconds, peak memory."""
    try:
        with Ledger(ledger_path) as ledger:
            jobs = ledger.jobs(parse_since(since) if since else None)
    except LedgerError as e:
        raise InputError(str(e)) from None
    price = parse_rate(rate) if rate is not None else None
    rows = [row(job, price) for job in jobs]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS + (["cost"] if price is not None else []))
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"fracgpu jobs ({len(rows)})")
        columns = ["job", "partition", "start", "end", "exit", "GPU time", "memory GiB-h", "peak memory"]
        if price is not None:
            columns.append("cost")
        for column in columns:
            table.add_column(column, justify="left" if column in ("job", "partition", "start", "end") else "right")
        for job, r in zip(jobs, rows):
            cells = [job.job, job.partition, r["start"] or "", r["end"] or "running",
                     "" if job.exit_status is None else str(job.exit_status), f"{job.gpu_seconds:.2f} s",
                     f"{job.memory_byte_seconds / (1 << 30) / 3600:.4f}", format_size(job.peak_memory_bytes)]
            if price is not None:
                cells.append(f"{r['cost']:.4f}")
            table.add_row(*cells)
        Console(file=sys.stdout).print(table)
