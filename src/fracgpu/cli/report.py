"""``fracgpu report``: per-job usage and cost, and the bill (``fracgpu.billing``), from the ledger."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import os
import re
import signal
import time
from decimal import Decimal

import click

from fracgpu import billing
from fracgpu.cli.common import InputError, checked_by, console, converted_by, drift_text, share_text, tables
from fracgpu.cli.run import parse_labels
from fracgpu.ledger import JobRecord, Ledger, LedgerError, Period
from fracgpu.units import format_size

FIELDS = ["job_id", "job", "partition", "gpu", "uid", "user", "host", "start", "end", "exit_status", "gpu_seconds",
          "memory_byte_seconds", "peak_memory_bytes", "peak_drift_bytes", "memory_limit", "compute_share", "priority",
          "processes", "launches", "kind", "command", "labels"]
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
    out = {field: getattr(job, "id" if field == "job_id" else field) for field in FIELDS}
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
              help="Also draw each job's memory and compute share over time, its limits behind, and each GPU's "
                   "capacity, reserved and used, into this file: PNG, SVG or PDF, by its suffix (needs "
                   "matplotlib: pip install 'fracgpu[plot]').")
@click.option("--label", "label_filter", metavar="KEY=VALUE", multiple=True, callback=converted_by(parse_labels),
              help="Only jobs with this label (repeatable: all must match).")
@click.option("--partition", "partition_filter", metavar="NAME", multiple=True,
              help="Only jobs in this partition (repeatable: any).")
@click.option("--user", "user_filter", metavar="NAME|UID", multiple=True,
              help="Only jobs of this user, by name or uid (repeatable: any).")
@click.option("--by", "group_by", metavar="GROUP", callback=checked_by(billing.grouping),
              help="The bill, totalled per group: partition, user, job, namespace, or label:KEY.")
@click.option("--price-reserved-gpu-hour", "price_reserved_gpu", metavar="PRICE",
              callback=checked_by(billing.parse_price),
              help="The bill: price of a GPU-hour of guaranteed compute share (a 25% share for an hour is 0.25).")
@click.option("--price-reserved-gib-hour", "price_reserved_gib", metavar="PRICE",
              callback=checked_by(billing.parse_price),
              help="The bill: price of a GiB-hour of memory quota promised.")
@click.option("--price-used-gpu-hour", "price_used_gpu", metavar="PRICE", callback=checked_by(billing.parse_price),
              help="The bill: price of a GPU-hour of device time used.")
@click.option("--price-used-gib-hour", "price_used_gib", metavar="PRICE", callback=checked_by(billing.parse_price),
              help="The bill: price of a GiB-hour of memory held.")
@click.option("--currency", metavar="CODE", default="USD", show_default=True,
              help="The bill's currency code, written in every line.")
@click.option("--decimals", type=click.IntRange(0, 6), default=2, show_default=True,
              help="The currency's minor unit: each line's amount is rounded half-even to this many decimal places.")
@click.option("--output", "output_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="The bill: write its lines (one per job, period and component) to FILE, CSV or JSON by "
                   "--format or else the suffix, and print the totals.")
def report(since: str | None, until: str | None, fmt: str, rate: str | None, ledger_path: str | None,
           plot_path: str | None, label_filter: dict[str, str], partition_filter: tuple[str, ...],
           user_filter: tuple[str, ...], group_by: str | None, price_reserved_gpu: str | None,
           price_reserved_gib: str | None, price_used_gpu: str | None, price_used_gib: str | None, currency: str,
           decimals: int, output_path: str | None) -> None:
    """Per-job usage and cost from the ledger: GPU-seconds, memory byte-seconds, peak memory, and
    the peak drift (the most memory the books missed, which the device reported and the job was
    charged for).

    With --since and --until, the jobs that ran at some time between them, each with its whole totals.

    With --by, a price or --output, the bill instead: per job and period (limits as they were),
    reserved and used GPU-hours and GiB-hours, priced in decimal, totalled per group and overall,
    periods clipped to --since/--until; and per GPU its capacity, reserved, used and idle."""
    now = time.time()   # one "now" for both bounds, so "--since 2d --until 1d" is exactly a day
    start, end = (parse_since(text, now) if text else None for text in (since, until))
    if start is not None and end is not None and end < start:
        raise InputError(f"--until {until} is before --since {since}: give a time after it")
    plot_as = _check_plot_path(plot_path) if plot_path is not None else None
    prices = {name: billing.parse_price(text) for name, text in (
        ("reserved_gpu_hours", price_reserved_gpu), ("reserved_gib_hours", price_reserved_gib),
        ("used_gpu_hours", price_used_gpu), ("used_gib_hours", price_used_gib)) if text is not None}
    bill = group_by is not None or bool(prices) or output_path is not None
    if bill and rate is not None:
        raise InputError("--rate prices the per-job report's device time; in a bill, give "
                         "--price-used-gpu-hour PRICE instead")
    export_as = _export_format(output_path, fmt) if output_path is not None else None
    try:
        with Ledger(ledger_path, create=False) as ledger:
            ledger.close_orphans()   # jobs whose fracgpu run was killed end at their last sample
            jobs = selected(ledger.jobs_during(start, end), label_filter, partition_filter, user_filter)
            periods = ledger.periods([job.id for job in jobs]) if bill or plot_path is not None or fmt == "json" else []
            samples = {job.id: ledger.samples(job.id) for job in jobs} if plot_path is not None else {}
            gpus = ledger.gpus()
    except LedgerError as e:
        raise InputError(str(e)) from None
    if plot_path is not None:
        from fracgpu import plot

        plot.save(plot.draw(jobs, samples, periods, gpus), plot_path, plot_as)
        click.echo(f"plot of {len(jobs)} job(s) written to {plot_path}", err=True)
    if bill:
        the_bill = billing.Prices(prices, currency.strip().upper() or "USD", decimals)
        print_bill(jobs, periods, gpus, the_bill, group_by, start, end, fmt, output_path, export_as)
        return
    price = parse_rate(rate) if rate is not None else None
    if fmt == "table":
        screen = console()
        for part in job_tables(jobs, price, screen.width):
            screen.print(part)
        return
    rows = [row(job, price) for job in jobs]
    if fmt == "json":
        by_job: dict[int, list[Period]] = {}
        for period in periods:
            by_job.setdefault(period.job_id, []).append(period)
        for out, job in zip(rows, jobs):
            out["periods"] = [period_row(period) for period in by_job.get(job.id, [])]
        click.echo(json.dumps(rows, indent=2))
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS + (["cost"] if price is not None else []),
                                extrasaction="ignore")
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


def selected(jobs: list[JobRecord], labels: dict[str, str], partitions: tuple[str, ...],
             users: tuple[str, ...]) -> list[JobRecord]:
    """The jobs with every label of ``labels``, in one of ``partitions`` and run by one of ``users``
    (a name or a uid; an empty filter passes all)."""
    def by_user(job: JobRecord) -> bool:
        return not users or any(u == job.user or (u.isdigit() and job.uid == int(u)) for u in users)

    return [job for job in jobs if all(job.labels.get(k) == v for k, v in labels.items())
            and (not partitions or job.partition in partitions) and by_user(job)]


EXPORT_FORMATS = {".csv": "csv", ".json": "json"}


def _export_format(path: str, fmt: str) -> str:
    """The format --output writes: --format's when it says csv or json, else the file's suffix."""
    if fmt != "table":
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in EXPORT_FORMATS:
        raise InputError(f"--output {path}: give --format csv or json, or a file name ending in .csv or .json")
    return EXPORT_FORMATS[suffix]


def period_row(period: Period) -> dict:
    limits = period.limits
    return {"gpu": period.gpu, "start": _iso(period.start), "end": _iso(period.end), "opened_by": period.opened_by,
            "memory_limit": limits.memory_limit, "compute_share": limits.compute_share,
            "compute_cap": limits.compute_cap, "priority": limits.priority, "best_effort": limits.best_effort,
            "gpu_seconds": period.gpu_seconds, "memory_byte_seconds": period.memory_byte_seconds,
            "peak_memory_bytes": period.peak_memory_bytes}


# The export's columns: who and what (job, user, host, labels), the period and its limits, the line.
LINE_FIELDS = ["job_id", "job", "partition", "gpu", "host", "uid", "user", "labels", "period_start", "period_end",
               "opened_by", "memory_limit", "compute_share", "compute_cap", "priority", "best_effort", "component",
               "quantity", "unit", "unit_price", "currency", "amount", "rounding"]


def line_row(line: billing.Line, prices: billing.Prices) -> dict:
    job, limits = line.job, line.period.limits
    return {"job_id": job.id, "job": job.job, "partition": job.partition, "gpu": line.period.gpu, "host": job.host,
            "uid": job.uid, "user": job.user, "labels": job.labels, "period_start": _iso(line.start),
            "period_end": _iso(line.end), "opened_by": line.period.opened_by, "memory_limit": limits.memory_limit,
            "compute_share": limits.compute_share, "compute_cap": limits.compute_cap, "priority": limits.priority,
            "best_effort": limits.best_effort, "component": line.component, "quantity": str(line.quantity),
            "unit": line.unit, "unit_price": str(line.unit_price), "currency": prices.currency,
            "amount": str(line.amount), "rounding": prices.rounding}


def _totals_json(t: billing.Totals, prices: billing.Prices) -> dict:
    return {**{c: {"quantity": str(t.quantity[c]), "amount": str(prices.money(t.amount[c]))}
               for c in billing.COMPONENTS}, "amount": str(prices.money(t.total))}


def export_text(lines: list[billing.Line], prices: billing.Prices, fmt: str, group_by: str | None,
                groups: dict[str, billing.Totals], overall: billing.Totals,
                gpus: list[billing.GPUSummary]) -> str:
    """The bill's lines as CSV (one row per line, every value in it), or as JSON: the lines, the
    totals (per group and overall) and the GPUs, decimals as strings."""
    rows = [line_row(line, prices) for line in lines]
    if fmt == "json":
        return json.dumps({"currency": prices.currency, "rounding": prices.rounding, "lines": rows, "by": group_by,
                           "groups": {name: _totals_json(t, prices) for name, t in groups.items()},
                           "total": _totals_json(overall, prices),
                           "gpus": [{**dataclasses.asdict(g), "start": _iso(g.start), "end": _iso(g.end),
                                     "idle_gpu_hours": g.idle_gpu_hours, "unsold_gpu_hours": g.unsold_gpu_hours}
                                    for g in gpus]}, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LINE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "labels": json.dumps(r["labels"], sort_keys=True)} for r in rows)
    return buf.getvalue()


def print_bill(jobs: list[JobRecord], periods: list[Period], known_gpus: dict[str, tuple[str, int]],
               prices: billing.Prices, group_by: str | None, since: float | None, until: float | None, fmt: str,
               output_path: str | None, export_as: str | None) -> None:
    lines = billing.lines(jobs, periods, prices, since, until)
    groups, overall = billing.totals(lines, billing.grouping(group_by) if group_by else None)
    gpus = billing.gpu_summary(jobs, periods, known_gpus, since, until)
    if output_path is not None:
        try:
            with open(output_path, "w", encoding="utf-8", newline="") as f:
                f.write(export_text(lines, prices, export_as, group_by, groups, overall, gpus))
        except OSError as e:
            raise InputError(f"--output {output_path}: {e.strerror}") from None
        click.echo(f"{len(lines)} bill line(s) written to {output_path}", err=True)
    elif fmt != "table":
        click.echo(export_text(lines, prices, fmt, group_by, groups, overall, gpus), nl=False)
        return
    screen = console()
    for part in bill_tables(lines, groups, overall, gpus, prices, group_by, screen.width):
        screen.print(part)
    screen.print(f"Rounding: {prices.rounding}.", highlight=False)


def _hours(value: Decimal | float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def bill_tables(lines: list[billing.Line], groups: dict[str, billing.Totals], overall: billing.Totals,
                gpus: list[billing.GPUSummary], prices: billing.Prices, group_by: str | None,
                width: int = 80) -> list:
    """The bill as rich tables: one row per job and period, the totals (per group and overall),
    and per GPU its capacity, reserved, used, idle and unsold hours."""
    money = f"amount {prices.currency}"
    components = list(billing.COMPONENTS)
    heads = [("reserved GPU-h", "right"), ("reserved GiB-h", "right"), ("used GPU-h", "right"),
             ("used GiB-h", "right"), (money, "right")]
    periods: dict[tuple[int, int], list[billing.Line]] = {}
    for line in lines:
        periods.setdefault((line.job.id, line.period.id), []).append(line)
    rows = []
    for of_period in periods.values():
        first = of_period[0]
        limits = first.period.limits
        share = share_text(limits)
        memory = format_size(limits.memory_limit) if limits.memory_limit else "-"
        if limits.best_effort and limits.memory_limit:
            memory += " (best effort)"
        quantity = {line.component: line.quantity for line in of_period}
        rows.append([f"{first.job.id} {first.job.job}", first.job.user or str(first.job.uid or "?"),
                     f"{_local(first.start)} - {_local(first.end)[11:]}", f"{memory} / {share}",
                     *(_hours(quantity[c]) for c in components),
                     str(prices.money(sum((line.amount for line in of_period), Decimal(0))))])
    out = tables([("job", "left"), ("user", "left"), ("period", "left"), ("quota / share", "left"), *heads], rows,
                 width, title=f"fracgpu bill: {len(periods)} period(s) of {len({k[0] for k in periods})} job(s)")
    total_rows = [[name, *(_hours(t.quantity[c]) for c in components), str(prices.money(t.total))]
                  for name, t in [*groups.items(), ("total", overall)]]
    out += tables([(group_by or "", "left"), *heads], total_rows, width,
                  title=f"totals by {group_by}" if group_by else "totals")
    gpu_rows = [[g.gpu or "(not recorded)", _hours(g.capacity_gpu_hours), _hours(g.reserved_gpu_hours),
                 _hours(g.used_gpu_hours),
                 _hours(g.idle_gpu_hours), _hours(g.unsold_gpu_hours), _hours(g.capacity_gib_hours),
                 _hours(g.reserved_gib_hours), _hours(g.used_gib_hours), _hours(g.missed_gib_hours)] for g in gpus]
    out += tables([("GPU", "left"), ("capacity GPU-h", "right"), ("reserved", "right"), ("used", "right"),
                   ("idle", "right"), ("unsold", "right"), ("capacity GiB-h", "right"), ("reserved", "right"),
                   ("used", "right"), ("books missed", "right")], gpu_rows, width, title="per GPU")
    return out
