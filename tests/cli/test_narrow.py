"""At 80 columns (a terminal's usual width; rich takes it from COLUMNS) the tables of `partition list`,
`top` and `report` stay readable: no line is wider, and no cell is folded over lines: a table too
wide is split into narrower ones, each led by the row's name (`partition list`, `report`), or keeps
its essential columns (`top`)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import screen
from tests.support.simgpu import MiB
from fracgpu.ledger import Ledger
from fracgpu.units import format_size

NARROW = {"COLUMNS": "80"}


def table_rows(text: str) -> dict[str, list[str]]:
    """Each row's cells by its name (the first cell), across the tables it is split into; every row
    line is a whole row (a cell folded over lines would leave a line with an empty cell)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        assert len(line) <= 80, line
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            assert all(cells), f"a cell is folded over lines: {line!r}\n{text}"
            rows.setdefault(cells[0], []).extend(cells[1:])
    return rows


@pytest.fixture
def partitions(clients, gpu):
    """Two shared partitions, and a job holding 200 MiB in a private one."""
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB", "--priority", "high")
    gpu.fracgpu("partition", "create", "training-large", "--memory", "25%", "--compute", "50%", "--cap")
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "300MiB", "--compute", "25%", "--",
                    clients.lcuda, "hold", 200, 30)
    try:
        assert job.stdout.readline().strip() == "holding 200"
        yield f"run-{job.pid} (private)"
    finally:
        job.kill()
        job.wait(timeout=10)


def test_partition_list(gpu, partitions):
    out = gpu.fracgpu("partition", "list", env=NARROW).stdout
    rows = table_rows(out)
    held = format_size(200 * MiB + gpu.context)   # its allocation and its context
    assert rows == {"team (high)": ["256MiB", "0B", "0B", "-", "0.00 s", "0"],
                    "training-large": ["256MiB", "0B", "0B", "50% cap", "0.00 s", "0"],
                    partitions: ["300MiB", held, held, "25%", "0.00 s", "1"]}
    assert out.count("┏") == 1   # it fits in one table


def test_top(gpu, partitions):
    """`top` keeps one line per partition and process at 80 columns: the least essential columns are left
    out, never a row split or a figure cut."""
    out = gpu.fracgpu("top", "--once", "--interval", "0.2", env=NARROW).stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    (parts,), (procs,) = screen.tables(out, "partition"), screen.tables(out, "pid")
    rows = {r["partition"]: r for r in parts}
    held = format_size(200 * MiB + gpu.context)   # its allocation and its context
    mine = rows[partitions]
    assert (mine["memory / limit"], mine["share"]) == (f"{held} / 300MiB", "25%")
    assert (rows["training-large"]["memory / limit"], rows["training-large"]["share"]) == ("0B / 256MiB", "50% cap")
    assert set(rows) == {partitions, "training-large", "team (high)"}   # the priority beside the name
    assert {"partition", "job", "memory / limit", "share", "achieved"} <= set(mine)
    (proc,) = procs
    assert proc["partition"] == partitions.split()[0] and proc["memory"] == held
    assert {"pid", "job", "partition", "memory", "achieved"} <= set(proc)


def test_report(tmp_path):
    path, now = tmp_path / "ledger.sqlite", time.time()
    with Ledger(path) as ledger:
        for name, partition in (("train", "run-1234567"), ("nightly-eval", "team")):
            job = ledger.start_job(job=name, partition=partition, memory_limit=256 * MiB, start=now - 7200)
            ledger.sample(job, memory_bytes=200 * MiB, device_seconds=1800.0, t=now - 3600)
            ledger.finish(job, exit_status=0, end=now - 1800)   # 200 MiB for half an hour
    out = subprocess.run([sys.executable, "-m", "fracgpu", "report", "--ledger", str(path), "--rate", "2.5"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin", **NARROW}).stdout
    rows = table_rows(out)
    assert set(rows) == {"train", "nightly-eval"}
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 7200))
    assert rows["train"][:2] == ["run-1234567", start]
    assert rows["train"][3:] == ["0", "1800.00 s", "0.0977", "200MiB", "0", "1.2500"]   # ..., peak drift, cost


def test_a_name_wider_than_the_screen_is_folded_not_cut(gpu):
    name = "x" * 63
    gpu.fracgpu("partition", "create", name)
    out = gpu.fracgpu("partition", "list", env={"COLUMNS": "40"}).stdout
    assert all(len(line) <= 40 for line in out.splitlines())
    assert name in "".join(line.strip("│ ") for line in out.splitlines() if line.startswith("│ x"))


def test_a_long_command_line_as_a_jobs_name_wraps_rather_than_split_every_column_apart(tmp_path):
    """A job's name is its command line by default, often wider than half the screen: it wraps in a
    column of a third of the width, so that the figures still share a few tables, each figure whole."""
    command = "python train.py --config configs/pretrain-large.yaml --lr 3e-4 --batch-size 256"
    path, now = tmp_path / "ledger.sqlite", time.time()
    with Ledger(path) as ledger:
        for name in (command, "nightly-eval"):
            job = ledger.start_job(job=name, partition="team", memory_limit=256 * MiB, start=now - 7200)
            ledger.sample(job, memory_bytes=200 * MiB, device_seconds=1800.0, t=now - 3600)
            ledger.finish(job, exit_status=0, end=now - 1800)
    out = subprocess.run([sys.executable, "-m", "fracgpu", "report", "--ledger", str(path), "--rate", "2.5"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin", **NARROW}).stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert out.count("┏") <= 3, out   # not one table per figure
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    # Each table: the long name's first line with every figure, its continuation lines with none, then the other job.
    starts = [row for row in cells if row[0] and command.startswith(row[0])]
    assert len(starts) == out.count("┏") and all(all(row) for row in starts), out
    assert "".join(row[0].replace(" ", "") for row in cells[:len(cells) // len(starts) - 1]) == command.replace(" ", "")
    figures = [value for row in cells if row[0] == "nightly-eval" for value in row[1:]]
    assert figures[-6:] == ["0", "1800.00 s", "0.0977", "200MiB", "0", "1.2500"], out
