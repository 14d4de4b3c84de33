"""The ledger store: totals from samples, durability across processes, schema versions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from fracgpu.ledger import SCHEMA_VERSION, Ledger, LedgerError

MiB = 1 << 20


def test_totals_come_from_the_samples(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="train", partition="run-1", gpu="GPU-x", command="python train.py",
                               memory_limit=256 * MiB, compute_share=0.25, start=100.0)
        ledger.sample(job, memory_bytes=100 * MiB, device_seconds=0.5, t=101.0)   # 0 B held for 1 s
        ledger.sample(job, memory_bytes=200 * MiB, device_seconds=1.5, t=103.0)   # 100 MiB for 2 s
        ledger.finish(job, exit_status=0, end=104.0)                               # 200 MiB for 1 s
        (rec,) = ledger.jobs()
    assert rec.memory_byte_seconds == 400 * MiB
    assert rec.gpu_seconds == 1.5 and rec.peak_memory_bytes == 200 * MiB
    assert (rec.start, rec.end, rec.exit_status) == (100.0, 104.0, 0)
    assert (rec.memory_limit, rec.compute_share, rec.command) == (256 * MiB, 0.25, "python train.py")


def test_the_peak_drift_is_the_largest_sampled(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="train", partition="p", start=100.0)
        for t, drift in ((101.0, 4 * MiB), (102.0, 32 * MiB), (103.0, None), (104.0, 0)):
            ledger.sample(job, memory_bytes=64 * MiB, device_seconds=0.0, t=t, peak_drift_bytes=drift)
        (rec,) = ledger.jobs()
    assert rec.peak_drift_bytes == 32 * MiB


def test_what_a_writer_recorded_survives_its_death(tmp_path):
    path = tmp_path / "l.sqlite"
    code = (f"from fracgpu.ledger import Ledger\nimport os, signal\nl = Ledger({str(path)!r})\n"
            "j = l.start_job(job='a', partition='p', gpu='g', start=10.0)\n"
            "l.sample(j, memory_bytes=5, device_seconds=2.0, t=12.0)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    with Ledger(path) as ledger:
        (rec,) = ledger.jobs()
        assert rec.gpu_seconds == 2.0 and rec.end is None and rec.exit_status is None
        assert ledger.samples(rec.id) == [(12.0, 5, 2.0)]
        ledger.finish(rec.id, exit_status=-9, end=13.0)   # whoever finds it dead closes it
        assert ledger.jobs()[0].memory_byte_seconds == 5.0


def test_since_filters_by_start(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for t in (1.0, 5.0, 9.0):
            ledger.start_job(job=f"j{t}", partition="p", gpu="g", start=t)
        assert [j.job for j in ledger.jobs(since=5.0)] == ["j5.0", "j9.0"]


@pytest.mark.fault('A ledger written by a newer fracgpu',
                   'refused with what to do, not altered')
def test_schema_is_versioned_and_a_newer_ledger_is_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="newer than this fracgpu"):
        Ledger(path)


@pytest.mark.fault('A ledger file that is not a database',
                   'refused with what to do; the file is left as it was')
def test_a_file_that_is_not_a_ledger_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="move it aside"):
        Ledger(path)
    assert path.read_bytes() == b"not a database at all" * 100   # nothing a user had is lost


def test_a_version_1_ledger_is_migrated_and_keeps_its_jobs(tmp_path):
    from fracgpu.ledger import MIGRATIONS

    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    for statement in MIGRATIONS[1]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO jobs (job, partition, gpu, start, \"end\", exit_status, gpu_seconds) "
               "VALUES ('old', 'p', 'GPU-x', 1.0, 2.0, 0, 0.5)")
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        (job,) = ledger.jobs()
        assert (job.job, job.gpu_seconds, job.kind, job.labels, job.processes, job.peak_drift_bytes, job.priority) == \
            ("old", 0.5, "run", {}, 0, 0, "normal")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


OPEN_AND_RECORD = """
import sys
from fracgpu.ledger import Ledger
with Ledger(sys.argv[1]) as ledger:
    job = ledger.start_job(job="j", partition="p")
    ledger.sample(job, memory_bytes=1, device_seconds=0.0)
    ledger.finish(job, exit_status=0)
"""


@pytest.mark.fault('Six jobs opening a new ledger at the same moment',
                   "all six recorded (SQLite's immediate 'database is locked' is retried)")
def test_jobs_starting_together_on_a_new_ledger_are_all_recorded(tmp_path):
    # A new ledger switched to WAL by several processes at once: SQLite answers
    # "database is locked" without waiting, which must not refuse a job.
    for attempt in range(5):
        path = tmp_path / f"l{attempt}.sqlite"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_RECORD, str(path)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        for p in procs:
            assert p.wait(60) == 0, p.stderr.read()
        with Ledger(path) as ledger:
            assert len(ledger.jobs()) == 6
