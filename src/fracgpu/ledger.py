"""The ledger: what every job used, kept durably in SQLite.

One row per job (a ``fracgpu run`` invocation or a partition's run of work)
with its start and end, exit status, who ran it (uid, user name, host), quota
and share, device time (GPU-seconds), memory byte-seconds and peak memory; the
samples those totals come from, for plots; and the job's *periods*: on each GPU,
one row per stretch of time over which its limits (memory quota, compute share,
cap, priority, best effort) stayed the same, with what was used in it. A change
of the limits (``fracgpu partition set``, a live resize, an admission change)
closes a period and opens the next one at the sample that sees it, or at the
moment ``partitions.update`` recorded the change (``limit_changes``), so the
reserved figures follow the limits as they were, not as they ended. Every
write is its own committed transaction, so whatever was recorded before a crash
(of the job or of the writer) stays.

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
import pwd
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping

from fracgpu import settings

__all__ = ["Ledger", "LedgerError", "NoLedger", "JobRecord", "Limits", "GPUSample", "Period", "default_path",
           "SCHEMA_VERSION"]

SCHEMA_VERSION = 4

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
    4: [
        "ALTER TABLE jobs ADD COLUMN uid INTEGER",                      # who ran it; NULL: not recorded
        "ALTER TABLE jobs ADD COLUMN user TEXT NOT NULL DEFAULT ''",    # the uid's name then
        "ALTER TABLE jobs ADD COLUMN host TEXT NOT NULL DEFAULT ''",    # the node it ran on
        """CREATE TABLE periods (
               id INTEGER PRIMARY KEY,
               job_id INTEGER NOT NULL REFERENCES jobs(id),
               gpu TEXT NOT NULL,                  -- device UUID
               start REAL NOT NULL,
               "end" REAL,                         -- NULL while open
               memory_limit INTEGER,               -- bytes; NULL: none
               compute_share REAL,                 -- guaranteed fraction of the device's time; NULL: none
               compute_cap INTEGER NOT NULL DEFAULT 0,
               priority TEXT NOT NULL DEFAULT 'normal',
               best_effort INTEGER NOT NULL DEFAULT 0,   -- the limit was overcommitted: a ceiling, not a promise
               compute_best_effort INTEGER NOT NULL DEFAULT 0,   -- the share was overcommitted: not a promise
               opened_by TEXT NOT NULL,            -- 'start' | 'change' (seen by a sample) | 'set' (recorded
                                                   -- when made) | 'migrated' (a job recorded before periods)
               gpu_seconds REAL NOT NULL DEFAULT 0,
               memory_byte_seconds REAL NOT NULL DEFAULT 0,
               drift_byte_seconds REAL NOT NULL DEFAULT 0,   -- of which the books missed (the device held)
               peak_memory_bytes INTEGER NOT NULL DEFAULT 0,
               base_device_seconds REAL NOT NULL DEFAULT 0,  -- the job's device time on the GPU at its start
               last_sample REAL,
               last_memory_bytes INTEGER NOT NULL DEFAULT 0,
               last_drift_bytes INTEGER NOT NULL DEFAULT 0,
               last_device_seconds REAL NOT NULL DEFAULT 0
           )""",
        "CREATE INDEX periods_by_job ON periods(job_id, gpu, start)",
        """CREATE TABLE limit_changes (
               t REAL NOT NULL,
               gpu TEXT NOT NULL,
               partition TEXT NOT NULL,
               memory_limit INTEGER,
               compute_share REAL,
               compute_cap INTEGER NOT NULL DEFAULT 0,
               priority TEXT NOT NULL DEFAULT 'normal',
               best_effort INTEGER NOT NULL DEFAULT 0,
               compute_best_effort INTEGER NOT NULL DEFAULT 0
           )""",
        "CREATE INDEX limit_changes_by_partition ON limit_changes(gpu, partition, t)",
        # The GPUs jobs ran on, so that a bill knows each one's memory (its capacity).
        "CREATE TABLE gpus (uuid TEXT PRIMARY KEY, name TEXT NOT NULL, total_memory INTEGER NOT NULL)",
        # A job recorded before periods gets one, over its whole run, at the limits it recorded last.
        """INSERT INTO periods (job_id, gpu, start, "end", memory_limit, compute_share, priority, opened_by,
                                gpu_seconds, memory_byte_seconds, peak_memory_bytes, last_sample,
                                last_memory_bytes, last_device_seconds)
           SELECT id, gpu, start, "end", memory_limit, compute_share, priority, 'migrated', gpu_seconds,
                  memory_byte_seconds, peak_memory_bytes, last_sample, last_memory_bytes, gpu_seconds FROM jobs""",
    ],
}

# The columns of a period that are its limits, in Limits' order.
LIMIT_COLUMNS = ("memory_limit", "compute_share", "compute_cap", "priority", "best_effort", "compute_best_effort")


class LedgerError(RuntimeError):
    """The ledger cannot be used; the message says why and what to do."""


class NoLedger(LedgerError):
    """A ledger opened only to be read does not exist (it is never created by a reader)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a job was promised on one GPU over a period: the reserved side of its bill."""

    memory_limit: int | None = None     # bytes; None: no quota
    compute_share: float | None = None  # guaranteed fraction of the device's time; None: none
    compute_cap: bool = False           # the share is also a ceiling
    priority: str = "normal"
    best_effort: bool = False           # the quota was overcommitted: a ceiling, not a promise
    compute_best_effort: bool = False   # the share was overcommitted: weighed within what promises leave

    @classmethod
    def of(cls, memory_limit, compute_share, compute_cap, priority, best_effort, compute_best_effort=False) -> Limits:
        """From the ledger's columns (0 and NULL alike mean none)."""
        return cls(int(memory_limit) if memory_limit else None, float(compute_share) if compute_share else None,
                   bool(compute_cap), priority or "normal", bool(best_effort), bool(compute_best_effort))

    @classmethod
    def of_partition(cls, part) -> Limits:
        """A partition's limits as the shared state has them now (``state.PartitionUsage``)."""
        return cls.of(part.memory_limit, part.compute_share, part.compute_cap, part.priority, part.best_effort,
                      part.compute_best_effort)

    def columns(self) -> tuple:
        return (self.memory_limit, self.compute_share, int(self.compute_cap), self.priority, int(self.best_effort),
                int(self.compute_best_effort))


@dataclasses.dataclass(frozen=True)
class GPUSample:
    """A job's figures on one GPU at a sample: its limits there, and what it used (its device
    time cumulative on that GPU). ``since``: when it started holding the GPU (its first process
    attached), which opens its first period there; None: the job's start."""

    limits: Limits
    memory_bytes: int = 0
    device_seconds: float = 0.0
    drift_bytes: int = 0       # of memory_bytes, what the books missed (the device reported it)
    since: float | None = None


@dataclasses.dataclass
class Period:
    """A stretch of a job's time on one GPU at the same limits, and what it used in it."""

    id: int
    job_id: int
    gpu: str
    start: float
    end: float | None           # None: still open (the job runs)
    limits: Limits
    opened_by: str              # 'start', 'change', 'set' or 'migrated' (see the periods table)
    gpu_seconds: float
    memory_byte_seconds: float
    drift_byte_seconds: float
    peak_memory_bytes: int
    last_sample: float | None   # the latest time its figures were brought up to

    @property
    def recorded_until(self) -> float:
        """Its end, or while open, the latest time it was recorded up to."""
        return self.end if self.end is not None else max(self.start, self.last_sample or self.start)


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
    uid: int | None = None     # who ran it (None: recorded before users were)
    user: str = ""
    host: str = ""


def default_path() -> pathlib.Path:
    from fracgpu import config   # the node's file names the node's one ledger

    node = config.read().get(settings.LEDGER)
    if node:
        return pathlib.Path(node)
    if os.environ.get(settings.LEDGER):
        return pathlib.Path(os.environ[settings.LEDGER])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return pathlib.Path(base) / "fracgpu" / "ledger.sqlite"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:   # a uid without a name here (a container's): the number says who
        return ""


class Ledger:
    """The ledger at ``path`` (None: ``default_path()``). ``create``: make it when it does not
    exist, as the commands that record jobs do; a reader passes False and gets NoLedger instead,
    so a mistyped path is never an empty bill."""

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True):
        self.path = pathlib.Path(path) if path is not None else default_path()
        if not create and not self.path.is_file():
            raise NoLedger(f"no such ledger: {self.path}; give the file jobs were recorded in (--ledger PATH or "
                           "FRACGPU_LEDGER); only the commands that record jobs create one")
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
                  recorder_start: int | None = None, priority: str = "normal", uid: int | None = None,
                  user: str | None = None, host: str | None = None) -> int:
        """A new job's row; returns its id. Who ran it is this process's user on this host
        unless ``uid`` (and ``user``, its name; looked up when not given) and ``host`` say."""
        uid = os.getuid() if uid is None else uid
        cur = self.db.execute(
            "INSERT INTO jobs (job, partition, gpu, command, start, memory_limit, compute_share, kind, labels, "
            "recorder_pid, recorder_start, priority, uid, user, host) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job, partition, gpu, command, time.time() if start is None else start, memory_limit, compute_share,
             kind, json.dumps(labels or {}, sort_keys=True), recorder_pid, recorder_start, priority, uid,
             _user_name(uid) if user is None else user, socket.gethostname() if host is None else host))
        return int(cur.lastrowid)

    def sample(self, job_id: int, *, memory_bytes: int, device_seconds: float, t: float | None = None,
               peak_memory_bytes: int | None = None, launches: int | None = None, processes: int | None = None,
               gpu: str | None = None, memory_limit: int | None = None, compute_share: float | None = None,
               peak_drift_bytes: int | None = None, priority: str | None = None,
               gpus: Mapping[str, GPUSample] | None = None) -> None:
        """Record the job's memory now and its device time so far (a cumulative
        counter). Memory byte-seconds grow by the previous sample's memory times
        the time since it (memory is taken to hold until the next sample). The
        peak is ``peak_memory_bytes`` when the caller knows it exactly, else the
        largest memory sampled; ``peak_drift_bytes`` (the most memory the books missed, charged at
        once) raises the job's. The other values, when given, replace the job's.

        ``gpus``: the job's figures and limits on each GPU (device UUID), which bring its
        periods up to ``t``; a GPU whose limits changed since its last sample gets a new
        period. Without it, the job's totals and limits stand for one GPU (``gpu``, else the
        job's)."""
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
            if gpus is None:
                row = self.db.execute("SELECT gpu, memory_limit, compute_share, priority FROM jobs WHERE id = ?",
                                      (job_id,)).fetchone()
                gpus = {row[0]: GPUSample(Limits.of(row[1], row[2], False, row[3], False), memory_bytes,
                                          device_seconds)}
            for uuid, figures in gpus.items():
                self._advance_period(job_id, uuid, t, figures)

    def _advance_period(self, job_id: int, gpu: str, t: float, now: GPUSample) -> None:
        """Brings the job's open period on ``gpu`` up to ``t`` (inside a transaction); when the
        limits are not the period's, it ends where they changed and the next one opens there."""
        start, partition = self.db.execute("SELECT start, partition FROM jobs WHERE id = ?", (job_id,)).fetchone()
        row = self.db.execute(
            "SELECT id, start, last_sample, last_memory_bytes, last_drift_bytes, last_device_seconds, "
            "base_device_seconds, "
            + ", ".join(LIMIT_COLUMNS) + ' FROM periods WHERE job_id = ? AND gpu = ? AND "end" IS NULL',
            (job_id, gpu)).fetchone()
        if row is None:   # the job's first sample on this GPU
            since = min(t, max(start, now.since if now.since is not None else start))
            self._open_period(job_id, gpu, since, "start", now, t, base=0.0, held=0.0, drift_held=0.0)
            return
        period, opened, last, memory, drift, device, base = row[:7]
        last = opened if last is None else last
        if Limits.of(*row[7:]) == now.limits:
            self.db.execute(
                "UPDATE periods SET memory_byte_seconds = memory_byte_seconds + ?, "
                "drift_byte_seconds = drift_byte_seconds + ?, gpu_seconds = MAX(gpu_seconds, ?), "
                "peak_memory_bytes = MAX(peak_memory_bytes, ?), last_sample = ?, last_memory_bytes = ?, "
                "last_drift_bytes = ?, last_device_seconds = ? WHERE id = ?",
                (memory * max(0.0, t - last), drift * max(0.0, t - last), now.device_seconds - base,
                 now.memory_bytes, t, now.memory_bytes, now.drift_bytes, now.device_seconds, period))
            return
        # The limits changed between the last sample and this one: at the change recorded by
        # whoever made it when there is one, else now. The device time used in between is
        # split in proportion to the time on each side (the samples are under 5 s apart).
        # (A sample's time is taken before it reads the state, so the change may be recorded after it.)
        changed = self.db.execute(
            "SELECT MAX(t) FROM limit_changes WHERE gpu = ? AND partition = ? AND t > ? AND "
            + " AND ".join(f"{c} IS ?" for c in LIMIT_COLUMNS),
            (gpu, partition, opened, *now.limits.columns())).fetchone()[0]
        boundary = t if changed is None else min(max(changed, last), t)
        fraction = (boundary - last) / (t - last) if t > last else 1.0
        device_then = device + fraction * max(0.0, now.device_seconds - device)
        self.db.execute(
            'UPDATE periods SET "end" = ?, memory_byte_seconds = memory_byte_seconds + ?, '
            "drift_byte_seconds = drift_byte_seconds + ?, gpu_seconds = MAX(gpu_seconds, ?), last_sample = ?, "
            "last_device_seconds = ? WHERE id = ?",
            (boundary, memory * (boundary - last), drift * (boundary - last), device_then - base, boundary,
             device_then, period))
        self._open_period(job_id, gpu, boundary, "change" if changed is None else "set", now, t, base=device_then,
                          held=memory * (t - boundary), drift_held=drift * (t - boundary))

    def _open_period(self, job_id: int, gpu: str, start: float, opened_by: str, now: GPUSample, t: float, *,
                     base: float, held: float, drift_held: float) -> None:
        self.db.execute(
            'INSERT INTO periods (job_id, gpu, start, opened_by, base_device_seconds, gpu_seconds, '
            "memory_byte_seconds, drift_byte_seconds, peak_memory_bytes, last_sample, last_memory_bytes, "
            "last_drift_bytes, last_device_seconds, " + ", ".join(LIMIT_COLUMNS) + ") "
            "VALUES (" + ", ".join("?" * (13 + len(LIMIT_COLUMNS))) + ")",
            (job_id, gpu, start, opened_by, base, max(0.0, now.device_seconds - base), held, drift_held,
             now.memory_bytes, t, now.memory_bytes, now.drift_bytes, now.device_seconds, *now.limits.columns()))

    def record_change(self, gpu: str, partition: str, limits: Limits, t: float | None = None) -> None:
        """Partition ``partition`` on ``gpu`` took ``limits`` at ``t`` (None: now): the jobs in it
        end their period there when their recorder's next sample sees these limits."""
        self.db.execute("INSERT INTO limit_changes (t, gpu, partition, " + ", ".join(LIMIT_COLUMNS) +
                        ") VALUES (" + ", ".join("?" * (3 + len(LIMIT_COLUMNS))) + ")",
                        (time.time() if t is None else t, gpu, partition, *limits.columns()))

    @contextlib.contextmanager
    def changing_limits(self) -> Iterator[Callable[[str, str, Limits], None]]:
        """Around a change of a partition's limits in the shared state: yields ``record(gpu,
        partition, limits)``, to call right after the change. The ledger is held meanwhile, so a
        recorder that reads the new limits cannot write its sample before the change is in the
        ledger: its period ends exactly there."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.record_change
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def note_gpu(self, uuid: str, name: str, total_memory: int) -> None:
        """GPU ``uuid`` (its model name and memory in bytes) ran jobs of this ledger."""
        self.db.execute("INSERT OR REPLACE INTO gpus (uuid, name, total_memory) VALUES (?, ?, ?)",
                        (uuid, name, total_memory))

    def gpus(self) -> dict[str, tuple[str, int]]:
        """UUID -> (model name, memory in bytes) of the GPUs the ledger's jobs ran on."""
        rows = self.db.execute("SELECT uuid, name, total_memory FROM gpus")
        return {uuid: (name, total) for uuid, name, total in rows}

    def add_labels(self, job_id: int, labels: Mapping[str, str]) -> None:
        """Adds ``labels`` to job ``job_id``'s (replacing the values of those it has): for what became
        known about a running job after it started, such as the pod that holds its partition."""
        added = json.dumps({str(k): str(v) for k, v in labels.items()}, sort_keys=True)
        self.db.execute("UPDATE jobs SET labels = json_patch(labels, ?) WHERE id = ?", (added, job_id))

    def finish(self, job_id: int, *, exit_status: int | None, end: float | None = None) -> None:
        end = time.time() if end is None else end
        with self._advance(job_id, end) as held:
            self.db.execute('UPDATE jobs SET "end" = ?, exit_status = ?, '
                            "memory_byte_seconds = memory_byte_seconds + ?, last_memory_bytes = 0, "
                            "recorder_pid = NULL WHERE id = ?",
                            (end, exit_status, held, job_id))
            self._close_periods(job_id, end)

    def _close_periods(self, job_id: int, end: float) -> None:
        """Ends the job's open periods at ``end``, their memory as last sampled held until then."""
        self.db.execute(
            'UPDATE periods SET "end" = MAX(start, ?), '
            "memory_byte_seconds = memory_byte_seconds + last_memory_bytes * MAX(0, ? - COALESCE(last_sample, start)), "
            "drift_byte_seconds = drift_byte_seconds + last_drift_bytes * MAX(0, ? - COALESCE(last_sample, start)), "
            "last_memory_bytes = 0, last_drift_bytes = 0, last_sample = MAX(start, ?) "
            'WHERE job_id = ? AND "end" IS NULL',
            (end, end, end, end, job_id))

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
                ended = last if last is not None else start
                if self.db.execute('UPDATE jobs SET "end" = ?, exit_status = ?, last_memory_bytes = 0, '
                                   'recorder_pid = NULL WHERE id = ? AND "end" IS NULL',
                                   (ended, -9 if kind == "run" else None, job_id)).rowcount:
                    self._close_periods(job_id, ended)
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

    def running(self) -> dict[int, JobRecord]:
        """The jobs not ended yet, by the pid of the recorder that keeps each row (the holder of the
        job's processes in the shared state, ``FRACGPU_JOB_HOLDER``): how the live view names them."""
        ids = dict(self.db.execute('SELECT id, recorder_pid FROM jobs WHERE "end" IS NULL AND '
                                   "recorder_pid IS NOT NULL").fetchall())
        if not ids:
            return {}
        return {ids[record.id]: record for record in self._jobs(f"id IN ({','.join('?' * len(ids))})", tuple(ids))}

    def _jobs(self, where: str, parameters: tuple) -> list[JobRecord]:
        rows = self.db.execute(
            'SELECT id, job, partition, gpu, command, start, "end", exit_status, memory_limit, compute_share, '
            "gpu_seconds, memory_byte_seconds, peak_memory_bytes, kind, labels, processes, launches, peak_drift_bytes, "
            "priority, uid, user, host FROM jobs "
            f"WHERE {where} ORDER BY start, id", parameters).fetchall()
        return [JobRecord(*row[:14], json.loads(row[14] or "{}"), *row[15:]) for row in rows]

    def periods(self, job_ids: list[int] | None = None) -> list[Period]:
        """The periods of the jobs ``job_ids`` (None: of every job), by job, GPU and start."""
        where, parameters = "", ()
        if job_ids is not None:
            where, parameters = f"WHERE job_id IN ({', '.join('?' * len(job_ids))})", tuple(job_ids)
        rows = self.db.execute(
            'SELECT id, job_id, gpu, start, "end", ' + ", ".join(LIMIT_COLUMNS) + ", opened_by, gpu_seconds, "
            f"memory_byte_seconds, drift_byte_seconds, peak_memory_bytes, last_sample FROM periods {where} "
            "ORDER BY job_id, gpu, start, id", parameters).fetchall()
        return [Period(*row[:5], Limits.of(*row[5:11]), *row[11:]) for row in rows]

    def samples(self, job_id: int) -> list[tuple[float, int, float]]:
        """(time, memory bytes, cumulative device seconds) of a job, in time order."""
        return self.db.execute("SELECT t, memory_bytes, device_seconds FROM samples WHERE job_id = ? ORDER BY t",
                               (job_id,)).fetchall()
