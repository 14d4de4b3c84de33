"""`fracgpu report` over a ledger filled through the ledger's API, with known values
(tests/shim/test_accounting.py fills one from jobs running on the simulated GPU)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

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


def test_plot_is_a_png_with_one_line_per_job_in_each_panel(ledger, tmp_path):
    from PIL import Image

    from fracgpu import plot

    out = tmp_path / "jobs.png"
    result = report(ledger, "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "infer" in result.stdout   # the table is still printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        image.verify()
        assert image.size == (1000, 600)
    with Ledger(ledger) as l:
        jobs = l.jobs()
        fig = plot.draw(jobs, {job.id: l.samples(job.id) for job in jobs})
    memory, share = fig.axes
    assert [line.get_label() for line in memory.lines] == ["train (run-1)", "infer (run-2)"]
    assert len(share.lines) == 2
    # train: 1800 device-seconds over the 3600 s between its start sample and the next: half the GPU.
    assert list(share.lines[0].get_ydata()) == [0.0, pytest.approx(0.5)]
    assert list(memory.lines[0].get_ydata()) == [0.0, pytest.approx(200 / 1024)]


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
