"""The ledger: what every job used, kept durably in SQLite.

One row per job (a ``fracgpu run`` invocation or a partition's run of work)
with its start and end, exit status, quota and share, device time
(GPU-seconds), memory byte-seconds and peak memory; and the samples those
totals come from, for plots. Every write is its own committed transaction, so
whatever was recorded before a crash (of the job or of the writer) stays.

Where it lives: ``$FRACGPU_LEDGER``, else ``$XDG_STATE_HOME/fracgpu/ledger.sqlite``,
else ``~/.local/state/fracgpu/ledger.sqlite``. The schema is versioned
(``PRAGMA user_version``) and migrated forward on open; a ledger written by a
newer fracgpu is refused rather than altered.

This module is the store; ``fracgpu.recorder`` records jobs into it while
they run (``fracgpu run``, ``fracgpu.init()``). A job whose recorder was
killed (so nobody will finish it) is closed by the next reader at its last
sample: ``fracgpu run`` takes its command down with it (SIGKILL), so its exit
status is -9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sqlite3
import time
from collections.abc import Iterator

from fracgpu import settings

__all__ = ["Ledger", "LedgerError", "JobRecord", "default_path", "SCHEMA_VERSION"]

SCHEMA_VERSION = 3

# MIGRATIONS[n] takes a ledger from version n - 1 to n.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE jobs (
               id INTEGER PRIMARY KEY,
               job TEXT NOT NULL,                 -- what the user ran, or the partition's name
               partition TEXT NOT NULL,
               gpu TEXT NOT NULL,                 -- device UUID
               command TEXT NOT NULL DEFAULT '',
               start REAL NOT NULL,               -- Unix time, seconds
               "end" REAL,                        -- NULL while it runs
               exit_status INTEGER,               -- NULL while it runs; -N: killed by signal N
               memory_limit INTEGER,              -- bytes; NULL: none
               compute_share REAL,                -- NULL: none
               gpu_seconds REAL NOT NULL DEFAULT 0,
               memory_byte_seconds REAL NOT NULL DEFAULT 0,
               peak_memory_bytes INTEGER NOT NULL DEFAULT 0,
               last_sample REAL,                  -- time of the latest sample
               last_memory_bytes INTEGER NOT NULL DEFAULT 0
           )""",
        """CREATE TABLE samples (
               job_id INTEGER NOT NULL REFERENCES jobs(id),
               t REAL NOT NULL,
               memory_bytes INTEGER NOT NULL,
               device_seconds REAL NOT NULL       -- cumulative
           )""",
        "CREATE INDEX samples_by_job ON samples(job_id, t)",
        "CREATE INDEX jobs_by_start ON jobs(start)",
    ],
    2: [
        "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'run'",   # 'run' | 'init'
        "ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",  # JSON object of strings
        "ALTER TABLE jobs ADD COLUMN processes INTEGER NOT NULL DEFAULT 0",  # processes that used the GPU
        "ALTER TABLE jobs ADD COLUMN launches INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN recorder_pid INTEGER",  # who keeps the row up to date
        "ALTER TABLE jobs ADD COLUMN recorder_start INTEGER",  # its start time (ticks)
    ],
    3: [
        # The most memory the books missed (the device reported more) charged to the job at once.
        "ALTER TABLE jobs ADD COLUMN peak_drift_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal'",  # 'high' | 'normal' | 'low'
    ],
}


class LedgerError(RuntimeError):
    """The ledger cannot be used; the message says why and what to do."""


@dataclasses.dataclass
class JobRecord:
    id: int
    job: str
    partition: str
    gpu: str
    command: str
    start: float
    end: float | None
    exit_status: int | None
    memory_limit: int | None
    compute_share: float | None
    gpu_seconds: float
    memory_byte_seconds: float
    peak_memory_bytes: int
    kind: str = "run"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    processes: int = 0
    launches: int = 0
    peak_drift_bytes: int = 0   # the most memory its books missed (the device held more), charged at once
    priority: str = "normal"   # the partition's class at the launch gate


def default_path() -> pathlib.Path:
    from fracgpu import config   # the node's file names the node's one ledger

    node = config.read().get(settings.LEDGER)
    if node:
        return pathlib.Path(node)
    if os.environ.get(settings.LEDGER):
        return pathlib.Path(os.environ[settings.LEDGER])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return pathlib.Path(base) / "fracgpu" / "ledger.sqlite"


class Ledger:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = pathlib.Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():   # what every job used is the user's business: owner-only
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)   # autocommit
            self._set_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"the ledger {self.path} cannot be used ({e}); move it aside to start a new one, or "
                              "set FRACGPU_LEDGER to another file") from None
        except OSError as e:
            raise LedgerError(f"cannot create the ledger {self.path}: {e.strerror}; set FRACGPU_LEDGER to a file "
                              "you can write") from None

    def close(self) -> None:
        self.db.close()

    def _set_wal(self, timeout: float = 30.0) -> None:
        """Write-ahead logging, so that readers (the report) never block the recorders. Switching
        a new ledger to it does not wait for a lock held by another process opening it at the
        same moment (SQLite answers "database is locked" at once), so that is retried here."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"the ledger {self.path} has schema version {version}, newer than this fracgpu's "
                              f"{SCHEMA_VERSION}: upgrade fracgpu, or set FRACGPU_LEDGER to another file")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the lock.
                if self.db.execute("PRAGMA user_version").fetchone()[0] >= target:
                    self.db.execute("COMMIT")
                    continue
                for statement in MIGRATIONS[target]:
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {target}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def start_job(self, *, job: str, partition: str, gpu: str = "", command: str = "", memory_limit: int | None = None,
                  compute_share: float | None = None, start: float | None = None, kind: str = "run",
                  labels: dict[str, str] | None = None, recorder_pid: int | None = None,
                  recorder_start: int | None = None, priority: str = "normal") -> int:
        cur = self.db.execute(
            "INSERT INTO jobs (job, partition, gpu, command, start, memory_limit, compute_share, kind, labels, "
            "recorder_pid, recorder_start, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job, partition, gpu, command, time.time() if start is None else start, memory_limit, compute_share,
             kind, json.dumps(labels or {}, sort_keys=True), recorder_pid, recorder_start, priority))
        return int(cur.lastrowid)

    def sample(self, job_id: int, *, memory_bytes: int, device_seconds: float, t: float | None = None,
               peak_memory_bytes: int | None = None, launches: int | None = None, processes: int | None = None,
               gpu: str | None = None, memory_limit: int | None = None, compute_share: float | None = None,
               peak_drift_bytes: int | None = None, priority: str | None = None) -> None:
        """Record the job's memory now and its device time so far (a cumulative
        counter). Memory byte-seconds grow by the previous sample's memory times
        the time since it (memory is taken to hold until the next sample). The
        peak is ``peak_memory_bytes`` when the caller knows it exactly, else the
        largest memory sampled; ``peak_drift_bytes`` (the most memory the books missed, charged at
        once) raises the job's. The other values, when given, replace the job's."""
        t = time.time() if t is None else t
        peak = max(memory_bytes, peak_memory_bytes or 0)
        with self._advance(job_id, t) as held:
            self.db.execute(
                "UPDATE jobs SET memory_byte_seconds = memory_byte_seconds + ?, "
                "peak_memory_bytes = MAX(peak_memory_bytes, ?), gpu_seconds = MAX(gpu_seconds, ?), "
                "last_sample = ?, last_memory_bytes = ?, launches = MAX(launches, COALESCE(?, 0)), "
                "processes = MAX(processes, COALESCE(?, 0)), gpu = COALESCE(?, gpu), "
                "memory_limit = COALESCE(?, memory_limit), compute_share = COALESCE(?, compute_share), "
                "peak_drift_bytes = MAX(peak_drift_bytes, COALESCE(?, 0)), priority = COALESCE(?, priority) WHERE id = ?",
                (held, peak, device_seconds, t, memory_bytes, launches, processes, gpu, memory_limit,
                 compute_share, peak_drift_bytes, priority, job_id))
            self.db.execute("INSERT INTO samples (job_id, t, memory_bytes, device_seconds) VALUES (?, ?, ?, ?)",
                            (job_id, t, memory_bytes, device_seconds))

    def finish(self, job_id: int, *, exit_status: int | None, end: float | None = None) -> None:
        end = time.time() if end is None else end
        with self._advance(job_id, end) as held:
            self.db.execute('UPDATE jobs SET "end" = ?, exit_status = ?, '
                            "memory_byte_seconds = memory_byte_seconds + ?, last_memory_bytes = 0, "
                            "recorder_pid = NULL WHERE id = ?",
                            (end, exit_status, held, job_id))

    def close_orphans(self, is_alive=None) -> int:
        """Close the jobs whose recorder is gone without finishing them (it was killed): they
        end at their last sample; a ``fracgpu run`` job was killed with its recorder (-9).
        ``is_alive(pid, start_time)`` says whether a recorder still runs. Returns how many."""
        if is_alive is None:
            from fracgpu.state import process_alive as is_alive
        rows = self.db.execute('SELECT id, kind, recorder_pid, recorder_start, start, last_sample FROM jobs '
                               'WHERE "end" IS NULL AND recorder_pid IS NOT NULL').fetchall()
        closed = 0
        for job_id, kind, pid, start_time, start, last in rows:
            if is_alive(pid, start_time or 0):
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute('UPDATE jobs SET "end" = ?, exit_status = ?, last_memory_bytes = 0, '
                                'recorder_pid = NULL WHERE id = ? AND "end" IS NULL',
                                (last if last is not None else start, -9 if kind == "run" else None, job_id))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            closed += 1
        return closed

    @contextlib.contextmanager
    def _advance(self, job_id: int, t: float) -> Iterator[float]:
        """A transaction on job ``job_id`` at time ``t``; yields the byte-seconds its
        memory (as last sampled) held since the last sample, or since its start."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT start, last_sample, last_memory_bytes FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no job {job_id} in the ledger {self.path}")
            start, last, last_memory = row
            yield last_memory * max(0.0, t - (last if last is not None else start))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def jobs(self, since: float | None = None) -> list[JobRecord]:
        """Jobs that started at or after ``since`` (Unix time), or all, oldest first."""
        return self._jobs("start >= ?", (since if since is not None else float("-inf"),))

    def jobs_during(self, since: float | None = None, until: float | None = None) -> list[JobRecord]:
        """Jobs that ran at some time between ``since`` and ``until`` (Unix times; None: no bound),
        oldest first: started at or before ``until``, and ended at or after ``since`` or still
        running. A job is whole or absent: its totals are not cut at the bounds."""
        return self._jobs('start <= ? AND ("end" IS NULL OR "end" >= ?)',
                          (until if until is not None else float("inf"),
                           since if since is not None else float("-inf")))

    def _jobs(self, where: str, parameters: tuple) -> list[JobRecord]:
        rows = self.db.execute(
            'SELECT id, job, partition, gpu, command, start, "end", exit_status, memory_limit, compute_share, '
            "gpu_seconds, memory_byte_seconds, peak_memory_bytes, kind, labels, processes, launches, peak_drift_bytes, priority "
            "FROM jobs "
            f"WHERE {where} ORDER BY start, id", parameters).fetchall()
        return [JobRecord(*row[:14], json.loads(row[14] or "{}"), *row[15:]) for row in rows]

    def samples(self, job_id: int) -> list[tuple[float, int, float]]:
        """(time, memory bytes, cumulative device seconds) of a job, in time order."""
        return self.db.execute("SELECT t, memory_bytes, device_seconds FROM samples WHERE job_id = ? ORDER BY t",
                               (job_id,)).fetchall()
