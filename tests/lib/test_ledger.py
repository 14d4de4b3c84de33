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


def _on(gpu, memory_limit, share, memory, device, since=None, best_effort=False, drift=0):
    from fracgpu.ledger import GPUSample, Limits

    return {gpu: GPUSample(Limits(memory_limit, share, False, "normal", best_effort), memory, device, drift, since)}


def test_a_change_of_limits_starts_a_new_period_at_the_sample_that_sees_it(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="train", partition="team", start=100.0)
        ledger.sample(job, memory_bytes=0, device_seconds=0.0, t=101.0, gpus=_on("GPU-a", 1 << 30, 0.25, 0, 0.0,
                                                                                 since=100.5))
        ledger.sample(job, memory_bytes=64 * MiB, device_seconds=2.0, t=110.0,
                      gpus=_on("GPU-a", 1 << 30, 0.25, 64 * MiB, 2.0))
        ledger.sample(job, memory_bytes=64 * MiB, device_seconds=4.0, t=112.0,
                      gpus=_on("GPU-a", 2 << 30, 0.5, 64 * MiB, 4.0))
        ledger.finish(job, exit_status=0, end=120.0)
        first, second = ledger.periods()
    # The first period opens when its first process attached, and ends at the sample that saw the change.
    assert (first.start, first.end, first.opened_by) == (100.5, 112.0, "start")
    assert (first.limits.memory_limit, first.limits.compute_share) == (1 << 30, 0.25)
    assert first.gpu_seconds == 4.0 and first.memory_byte_seconds == 64 * MiB * 2
    assert (second.start, second.end, second.opened_by) == (112.0, 120.0, "change")
    assert (second.limits.memory_limit, second.limits.compute_share) == (2 << 30, 0.5)
    assert second.gpu_seconds == 0.0 and second.memory_byte_seconds == 64 * MiB * 8


def test_a_change_recorded_when_made_is_the_exact_boundary(tmp_path):
    from fracgpu.ledger import Limits

    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="train", partition="team", start=100.0)
        ledger.sample(job, memory_bytes=0, device_seconds=0.0, t=100.0, gpus=_on("GPU-a", None, 0.25, 0, 0.0))
        ledger.sample(job, memory_bytes=0, device_seconds=1.0, t=104.0, gpus=_on("GPU-a", None, 0.25, 0, 1.0))
        ledger.record_change("GPU-a", "team", Limits(None, 0.75), t=105.0)
        ledger.record_change("GPU-b", "team", Limits(None, 0.1), t=105.5)   # another GPU's: not this job's
        # The next sample sees the new share; the device time since the last one is split by time.
        ledger.sample(job, memory_bytes=0, device_seconds=3.0, t=108.0, gpus=_on("GPU-a", None, 0.75, 0, 3.0))
        ledger.finish(job, exit_status=0, end=108.0)
        first, second = ledger.periods()
    assert (first.end, second.start, second.opened_by) == (105.0, 105.0, "set")
    assert first.gpu_seconds == pytest.approx(1.5) and second.gpu_seconds == pytest.approx(1.5)


def test_reading_a_ledger_that_does_not_exist_never_creates_it(tmp_path):
    from fracgpu.ledger import NoLedger

    path = tmp_path / "missing" / "l.sqlite"
    with pytest.raises(NoLedger, match=f"no such ledger: {path}"):
        Ledger(path, create=False)
    assert not path.parent.exists()


def test_a_job_records_who_ran_it_and_where(tmp_path):
    import os
    import socket

    with Ledger(tmp_path / "l.sqlite") as ledger:
        mine = ledger.start_job(job="a", partition="p", start=1.0)
        ledger.start_job(job="b", partition="p", start=2.0, uid=4242, user="alice", host="node7")
        a, b = ledger.jobs()
    assert (a.id, a.uid, a.host) == (mine, os.getuid(), socket.gethostname()) and a.user
    assert (b.uid, b.user, b.host) == (4242, "alice", "node7")


def test_a_ledger_of_the_previous_schema_gets_one_period_per_job_at_its_recorded_limits(tmp_path):
    from fracgpu.ledger import MIGRATIONS

    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    for version in (1, 2, 3):   # the schema jobs were recorded in before periods
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    db.execute("PRAGMA user_version = 3")
    db.execute('INSERT INTO jobs (job, partition, gpu, start, "end", exit_status, memory_limit, compute_share, '
               "gpu_seconds, memory_byte_seconds, peak_memory_bytes, last_sample, priority) "
               "VALUES ('old', 'run-7', 'GPU-x', 100.0, 400.0, 0, 1073741824, 0.25, 30.0, 5.0e9, 2048, 399.0, 'high')")
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        (job,) = ledger.jobs()
        (period,) = ledger.periods()
    assert (job.uid, job.user, job.host) == (None, "", "")
    assert (period.job_id, period.gpu, period.start, period.end, period.opened_by) == \
        (job.id, "GPU-x", 100.0, 400.0, "migrated")
    assert (period.limits.memory_limit, period.limits.compute_share, period.limits.priority) == (1 << 30, 0.25, "high")
    assert (period.gpu_seconds, period.memory_byte_seconds, period.peak_memory_bytes) == (30.0, 5.0e9, 2048)


def test_a_job_whose_recorder_died_ends_its_periods_at_its_last_sample(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="a", partition="p", start=10.0, recorder_pid=1 << 22, recorder_start=1)
        ledger.sample(job, memory_bytes=MiB, device_seconds=1.0, t=12.0, gpus=_on("GPU-a", MiB, 0.5, MiB, 1.0))
        ledger.sample(job, memory_bytes=MiB, device_seconds=2.0, t=14.0, gpus=_on("GPU-a", MiB, 0.5, MiB, 2.0))
        assert ledger.close_orphans(lambda pid, start: False) == 1
        (period,) = ledger.periods()
    assert (period.start, period.end, period.gpu_seconds, period.memory_byte_seconds) == (10.0, 14.0, 2.0, 2 * MiB)


def test_labels_learnt_after_a_job_started_are_added_to_its_row(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job = ledger.start_job(job="j", partition="p", kind="node", labels={"container": "3f2a", "team": "x"})
        ledger.add_labels(job, {"namespace": "team-a", "pod": "trainer-0", "container": "main"})
        (record,) = ledger.jobs()
    assert record.labels == {"namespace": "team-a", "pod": "trainer-0", "container": "main", "team": "x"}
