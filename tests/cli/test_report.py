"""`fracgpu report` over a ledger filled through the ledger's API, with known values
(tests/shim/test_accounting.py fills one from jobs running on the simulated GPU)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from fracgpu.cli.report import parse_since
from fracgpu.ledger import Ledger

MiB = 1 << 20


def report(ledger, *args):
    return subprocess.run([sys.executable, "-m", "fracgpu", "report", "--ledger", str(ledger), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    now = time.time()
    with Ledger(path) as l:
        a = l.start_job(job="train", partition="run-1", gpu="GPU-x", memory_limit=256 * MiB, compute_share=0.75,
                        start=now - 7200)
        l.sample(a, memory_bytes=200 * MiB, device_seconds=1800.0, t=now - 3600)
        l.finish(a, exit_status=0, end=now - 3600)
        b = l.start_job(job="infer", partition="run-2", gpu="GPU-x", start=now - 600)
        l.sample(b, memory_bytes=64 * MiB, device_seconds=36.0, t=now - 300)
        l.finish(b, exit_status=-9, end=now - 200)   # killed: its use up to then is kept
    return path


def test_json_has_the_documented_fields_and_cost(ledger):
    out = report(ledger, "--format", "json", "--rate", "2")
    assert out.returncode == 0, out.stderr
    rows = {r["job"]: r for r in json.loads(out.stdout)}
    for field in ("job", "partition", "start", "end", "exit_status", "gpu_seconds", "memory_byte_seconds",
                  "peak_memory_bytes", "cost"):
        assert field in rows["train"]
    assert rows["train"]["gpu_seconds"] == 1800.0 and rows["train"]["cost"] == 1.0   # half a GPU-hour at 2/h
    assert rows["infer"]["exit_status"] == -9 and rows["infer"]["peak_memory_bytes"] == 64 * MiB
    assert rows["infer"]["memory_byte_seconds"] == 64 * MiB * 100


def test_since_csv_and_table(ledger):
    out = report(ledger, "--since", "1h", "--format", "csv")
    assert [r["job"] for r in csv.DictReader(io.StringIO(out.stdout))] == ["infer"]
    table = subprocess.run([sys.executable, "-m", "fracgpu", "report", "--ledger", str(ledger)],
                           capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin"})
    assert "train" in table.stdout and "1800.00 s" in table.stdout


def test_bad_input(ledger, tmp_path):
    for args, message in ((["--since", "last tuesday"], "invalid time"), (["--rate", "cheap"], "invalid rate"),
                          (["--format", "xml"], "xml")):
        out = report(ledger, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"x" * 2000)
    out = report(bad)
    assert out.returncode == 2 and "move it aside" in out.stderr   # refused, like every unusable state


def test_parse_since():
    assert parse_since("2h", now=10_000) == 10_000 - 7200
    assert parse_since("2026-11-28T00:00+00:00") == 1795824000.0


def test_plot_is_a_png_with_one_line_per_job_in_each_panel_and_one_panel_per_gpu(ledger, tmp_path):
    from PIL import Image

    from fracgpu import plot

    out = tmp_path / "jobs.png"
    result = report(ledger, "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "infer" in result.stdout   # the table is still printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        image.verify()
        assert image.size == (1000, 850)   # 600 for the jobs, 250 for the one GPU they ran on
    with Ledger(ledger) as l:
        jobs = l.jobs()
        fig = plot.draw(jobs, {job.id: l.samples(job.id) for job in jobs}, l.periods(), l.gpus())
    memory, share, gpu = fig.axes
    assert gpu.get_title() == "GPU-x"
    assert [line.get_label() for line in gpu.lines] == ["capacity", "used"]
    # The legend stands right of the data, not over it.
    (legend,) = [c for c in fig.legends + [memory.get_legend()] if c is not None]
    fig.canvas.draw()
    assert legend.get_window_extent().x0 >= memory.get_window_extent().x1
    def use(ax):   # the labelled lines: each job's use (its limits behind are drawn without a label)
        return [line for line in ax.lines if not line.get_label().startswith("_")]

    assert [line.get_label() for line in use(memory)] == ["train (run-1)", "infer (run-2)"]
    assert len(use(share)) == 2
    # train: 1800 device-seconds over the 3600 s between its start sample and the next: half the GPU.
    assert list(use(share)[0].get_ydata()) == [0.0, pytest.approx(0.5)]
    assert list(use(memory)[0].get_ydata()) == [0.0, pytest.approx(200 / 1024)]
    # Behind train's use, its limits: 256 MiB and 75% from its start, none after its end.
    limits = [line for line in memory.lines if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in limits] == [[0.25, 0.0]]
    shares = [line for line in share.lines if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in shares] == [[0.75, 0.0]]


def test_plot_refuses_what_it_cannot_write(ledger, tmp_path):
    for name in ("jobs.jpg", "jobs"):
        result = report(ledger, "--plot", str(tmp_path / name))
        assert result.returncode == 2 and "ending in .png, .svg, .pdf" in result.stderr, result.stderr
        assert not (tmp_path / name).exists()
    result = report(ledger, "--plot", str(tmp_path / "missing" / "jobs.png"))
    assert result.returncode == 2 and "does not exist" in result.stderr


T = 1795824000.0   # 2026-11-28T00:00+00:00
HOUR = 3600


@pytest.fixture
def day(tmp_path):
    """A ledger of one day: 'early' ran 00:00-01:00, 'middle' 02:00-03:00, 'late' from 04:00 on (still running)."""
    path = tmp_path / "day.sqlite"
    with Ledger(path) as l:
        for name, start, end in (("early", T, T + HOUR), ("middle", T + 2 * HOUR, T + 3 * HOUR),
                                 ("late", T + 4 * HOUR, None)):
            job = l.start_job(job=name, partition="p", start=start)
            if end is not None:
                l.finish(job, exit_status=0, end=end)
    return path


def at(hours: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(T + hours * HOUR))


@pytest.mark.parametrize("since, until, jobs", [
    (None, None, ["early", "middle", "late"]),
    (1.5, 2.5, ["middle"]),                    # ran inside the window
    (0.5, None, ["early", "middle", "late"]),  # 'early' ended after since: it ran in the window
    (None, 1.5, ["early"]),                    # 'middle' started after until
    (3.5, None, ["late"]),                     # still running: it runs in every window after its start
    (1.0, 2.0, ["early", "middle"]),           # the bounds are inclusive
    (1.2, 1.8, []),                            # nothing ran then
])
def test_since_and_until_select_the_jobs_that_ran_in_between(day, since, until, jobs):
    args = [*(["--since", at(since)] if since is not None else []), *(["--until", at(until)] if until is not None
                                                                      else [])]
    out = report(day, "--format", "json", *args)
    assert out.returncode == 0, out.stderr
    assert [r["job"] for r in json.loads(out.stdout)] == jobs


def test_until_takes_the_forms_of_since_and_not_a_time_before_since(day):
    for args in (["--until", "2026-11-28"], ["--until", "2026-11-28T01:30"], ["--since", "3d", "--until", "1h"]):
        out = report(day, "--format", "csv", *args)
        assert out.returncode == 0, (args, out.stderr)
    out = report(day, "--since", "2026-11-28T02:00", "--until", "2026-11-28T01:00")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--until 2026-11-28T01:00 is before --since 2026-11-28T02:00" in out.stderr
    out = report(day, "--since", "1d", "--until", "2d")   # two days ago is before one day ago
    assert out.returncode == 2 and "is before --since" in out.stderr
    out = report(day, "--until", "tomorrow")
    assert out.returncode == 2 and "invalid time" in out.stderr and "'--until'" in out.stderr


@pytest.mark.parametrize("name, magic", [
    ("jobs.png", lambda data: data[:8] == b"\x89PNG\r\n\x1a\n"),
    ("jobs.svg", lambda data: b"<svg" in data[:1000] and data.rstrip().endswith(b"</svg>")),
    ("jobs.pdf", lambda data: data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")),
    ("JOBS.PDF", lambda data: data[:5] == b"%PDF-"),
])
def test_plot_format_follows_the_suffix(ledger, tmp_path, name, magic):
    out = tmp_path / name
    result = report(ledger, "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert magic(out.read_bytes()), out.read_bytes()[:64]


@pytest.mark.fault('`fracgpu report --ledger` naming a file that does not exist',
                   'refused, exit 2 "no such ledger: PATH"; nothing is created')
def test_a_ledger_that_does_not_exist_is_refused_never_an_empty_bill(tmp_path):
    missing = tmp_path / "nowhere" / "ledger.sqlite"
    for args in ([], ["--by", "user"], ["--format", "json"]):
        out = report(missing, *args)
        assert out.returncode == 2 and f"no such ledger: {missing}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
    assert not missing.parent.exists()


GiB = 1 << 30


@pytest.fixture
def tenants(tmp_path):
    """An hour each, on one GPU, by three users in three partitions; teams by label."""
    from fracgpu.ledger import GPUSample, Limits

    path = tmp_path / "tenants.sqlite"
    with Ledger(path) as l:
        l.note_gpu("GPU-t", "Simulated GPU", 16 * GiB)
        for name, partition, uid, user, team, memory, share, used in (
                ("a1", "vision", 1001, "alice", "vision", 4 * GiB, 0.25, 900.0),
                ("a2", "vision", 1001, "alice", "vision", 4 * GiB, 0.25, 360.0),
                ("b1", "run-40", 1002, "bob", "search", 2 * GiB, 0.5, 1800.0),
                ("c1", "batch", 1003, "carol", "vision", 8 * GiB, 0.125, 60.0)):
            start = T + (HOUR if name == "a2" else 0)
            job = l.start_job(job=name, partition=partition, start=start, uid=uid, user=user, host="node1",
                              labels={"team": team})
            for t, device in ((start, 0.0), (start + HOUR, used)):
                l.sample(job, memory_bytes=GiB, device_seconds=device, t=t,
                         gpus={"GPU-t": GPUSample(Limits(memory, share), GiB, device, since=start)})
            l.finish(job, exit_status=0, end=start + HOUR)
    return path


PRICES = ["--price-reserved-gpu-hour", "3.00", "--price-reserved-gib-hour", "0.013", "--price-used-gpu-hour", "1.10"]


def test_a_bill_by_label_over_several_users_and_partitions(tenants):
    out = report(tenants, "--by", "label:team", *PRICES, "--currency", "eur", "--format", "json")
    assert out.returncode == 0, out.stderr
    bill = json.loads(out.stdout)
    assert bill["currency"] == "EUR" and "half-even" in bill["rounding"]
    assert set(bill["groups"]) == {"vision", "search"}
    vision = bill["groups"]["vision"]
    # vision: a1 and a2 (alice, 25% and 4 GiB each for an hour) and c1 (carol, 12.5% and 8 GiB).
    assert Decimal(vision["reserved_gpu_hours"]["quantity"]) == Decimal("0.625")
    assert Decimal(vision["reserved_gib_hours"]["quantity"]) == Decimal("16")
    assert Decimal(vision["used_gpu_hours"]["quantity"]) == Decimal("0.366666667")   # 0.25 + 0.1 + 0.016666667
    assert Decimal(vision["reserved_gpu_hours"]["amount"]) == Decimal("1.88")   # 1.875, half-even
    lines = bill["lines"]
    assert len(lines) == 4 * 4   # four jobs of one period each, four components
    assert {(r["user"], r["uid"]) for r in lines} == {("alice", 1001), ("bob", 1002), ("carol", 1003)}
    assert all(r["host"] == "node1" and r["job_id"] for r in lines)
    assert sum(Decimal(r["amount"]) for r in lines) == Decimal(bill["total"]["amount"])
    for name, totals in bill["groups"].items():
        assert sum(Decimal(r["amount"]) for r in lines if r["labels"]["team"] == name) == Decimal(totals["amount"])
    (gpu,) = bill["gpus"]
    assert gpu["capacity_gpu_hours"] == 2.0 and gpu["reserved_gpu_hours"] == pytest.approx(0.875 + 0.25)


def test_filters_select_by_label_partition_and_user(tenants):
    def jobs(*args):
        out = report(tenants, "--format", "json", *args)
        assert out.returncode == 0, out.stderr
        return sorted(r["job"] for r in json.loads(out.stdout))

    assert jobs("--label", "team=vision") == ["a1", "a2", "c1"]
    assert jobs("--label", "team=vision", "--user", "carol") == ["c1"]
    assert jobs("--user", "1002") == ["b1"]
    assert jobs("--partition", "vision", "--partition", "batch") == ["a1", "a2", "c1"]
    out = report(tenants, "--label", "team")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr


def test_the_exported_lines_add_up_exactly_to_the_printed_totals(tenants, tmp_path):
    export = tmp_path / "bill.csv"
    out = subprocess.run([sys.executable, "-m", "fracgpu", "report", "--ledger", str(tenants), "--by", "user",
                          *PRICES, "--output", str(export)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(export.open()))
    assert len(rows) == 16 and all(r["currency"] == "USD" and r["rounding"] for r in rows)
    printed = {cells[0]: Decimal(cells[-1]) for cells in table_rows(out.stdout) if cells[0] in
               {"alice (1001)", "bob (1002)", "carol (1003)", "total"}}
    assert printed["total"] == sum(Decimal(r["amount"]) for r in rows)
    for user in ("alice", "bob", "carol"):
        (key,) = [k for k in printed if k.startswith(user)]
        assert printed[key] == sum(Decimal(r["amount"]) for r in rows if r["user"] == user)
    assert "Rounding: each line" in out.stdout


def table_rows(text: str) -> list[list[str]]:
    """The cells of a rich table's body rows, as printed."""
    return [[cell.strip() for cell in line.strip().strip("│┃").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


def test_bill_options_refuse_bad_values(tenants, tmp_path):
    for args, message in ((["--by", "team"], "label:KEY"), (["--price-used-gpu-hour", "-2"], "invalid price"),
                          (["--output", str(tmp_path / "bill.xlsx")], "--format csv or json"),
                          (["--decimals", "9", "--by", "job"], "9"),
                          (["--rate", "2", "--by", "job"], "--price-used-gpu-hour")):
        out = report(tenants, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_the_readme_billing_walk_through_is_what_the_commands_print():
    from tests.support import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "tools" / "billing_example.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
