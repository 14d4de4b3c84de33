"""``fracgpu.init()``: put the calling process under a memory quota, from inside it.

The shim has the SONAME ``libcuda.so.1``. Loaded with ``RTLD_GLOBAL`` before
anything opens the driver, it is what every later ``dlopen("libcuda.so.1")``
in this process returns (the loader matches a loaded object's SONAME), so
PyTorch, CuPy, JAX, numba and cuda-bindings all go through it without being
told. Once a real driver is loaded, that no longer holds: init() then refuses
rather than return with no quota in force.

The ``FRACGPU_*`` variables it sets, and ``LD_PRELOAD``, stay in
``os.environ``: processes this one starts inherit them and join the same
partition, sharing its quota.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading

from fracgpu import config, devices, jobs, settings, shim, state

__all__ = ["init", "InitError"]


class InitError(RuntimeError):
    """fracgpu.init() cannot put this process under its quota; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class _Request:
    spec: jobs.JobSpec
    state_dir: str
    shown: str                         # the call as written, for messages

    def same_as(self, other: _Request) -> bool:
        """Whether a later call asking ``other`` asks for what this one set (no wait given: any)."""
        return self.state_dir == other.state_dir and self.spec.same_partition(other.spec)


_lock = threading.Lock()
_done: _Request | None = None    # what init() put this process under
_partition: str | None = None    # its name
_library: ctypes.CDLL | None = None


def init(memory: str | int | None = None, partition: str | None = None, *, compute: str | float | None = None,
         cap: bool = False, state_dir: str | os.PathLike | None = None, oom_wait: float | None = None,
         overcommit: bool = False, priority: str | None = None) -> str:
    """Put this process, and the processes it starts, under a fracgpu memory quota.

    Call it first thing, before CUDA starts in this process (before torch,
    cupy, jax or numba touch the GPU). Give exactly one of:

    - ``memory``: a private partition of this size (bytes, ``"4GiB"``, or
      ``"25%"`` of each device), named ``init-<pid>``, gone when its last
      process exits;
    - ``partition``: the name of an existing partition
      (``fracgpu partition create``), whose quota this process shares.

    ``compute`` (``0.25`` or ``"25%"``) gives the private partition that share
    of the device's time (with ``memory``, or alone); ``cap=True`` makes the
    share a ceiling even when the GPU is otherwise idle. The ``memory`` limit
    must fit beside what each GPU has promised already (other partitions'
    limits): one that does not raises ``state.DoesNotFit`` (a ValueError)
    naming what is promised, to whom, and what remains, unless
    ``overcommit=True``, which makes the private partition best effort.
    ``priority`` (``"high"``, ``"normal"``, ``"low"``) is the private
    partition's class at the launch gate (with ``memory``/``compute``, or alone):
    a high job's kernels wait at most for the kernels already running.

    ``state_dir`` is the state folder (default ``$FRACGPU_STATE_DIR`` or the
    per-user one); ``oom_wait`` makes an allocation over the quota wait up to
    that many seconds for memory to free before it fails.

    Returns the partition's name. Calling it again with the same settings does
    nothing; with other settings it raises InitError, as it does when CUDA
    already started here, or when the state folder is unsafe, a state file is
    damaged, or there is no GPU to check a size against. A bad value (size,
    name, unknown partition, a limit above the device) raises ValueError."""
    global _done, _partition, _library
    try:
        spec = jobs.JobSpec.parse(memory=memory, compute=compute, cap=cap, partition=partition, oom_wait=oom_wait,
                                  overcommit=overcommit, priority=priority)
    except jobs.ConflictingChoice as e:
        if priority is not None and partition is not None:
            raise TypeError(str(e)) from None
        raise TypeError("fracgpu.init() takes memory=, compute= and/or priority= (a private partition with that "
                        "limit, share and class, like memory='4GiB', compute=0.25), or partition= (the name of a "
                        "partition made with `fracgpu partition create`), not both") from None
    except ValueError as e:   # a bad value, or a cap without a share: a plain ValueError, as documented
        raise ValueError(str(e)) from None
    wanted = _request(spec, memory, partition, state_dir, compute, cap, overcommit, priority)
    with _lock:
        if _done is not None:
            if _done.same_as(wanted):
                return _partition
            raise InitError(f"fracgpu.init() already put this process under {_done.shown}; it cannot change to "
                            f"{wanted.shown} (a process has one partition for its life)")
        try:
            library = os.fspath(shim.shim_path())
        except FileNotFoundError as e:
            raise InitError(str(e)) from None
        try:
            config.check_environment()
        except config.ConfigError as e:
            raise InitError(str(e)) from None
        shim_loaded, driver = _loaded_drivers(library)
        inherited = _inherited(os.environ, wanted)
        if driver and not (shim_loaded and inherited):
            raise InitError(
                f"CUDA has already started in this process (the driver {driver} is loaded), so fracgpu can no "
                "longer put its quota in front of it. Call fracgpu.init() before importing or initialising CUDA "
                "with torch, cupy, jax or numba, or start the job with `fracgpu run --memory SIZE -- COMMAND`")
        if inherited:
            # A process started under the same settings (by `fracgpu run`, or by a parent that
            # called init()): it is already in that partition and stays there.
            variables = {}
        else:
            try:
                variables = jobs.partition_variables(spec, private_name=f"init-{os.getpid()}",
                                                     state_dir=wanted.state_dir)
            except state.DoesNotFit:
                raise   # a bad value: a ValueError, as documented
            except (state.StateError, devices.DeviceError) as e:
                raise InitError(str(e)) from None
        environment = jobs.job_environment(variables, os.environ, library)
        try:
            _library = ctypes.CDLL(library, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise InitError(f"cannot load fracgpu's driver shim {library}: {e}") from None
        if not inherited:   # under `fracgpu run`, that records the job already
            environment[settings.JOB_HOLDER] = str(_start_recorder(variables, spec.private))
        for name, value in environment.items():   # read by the shim when CUDA starts, and by child processes
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _done, _partition = wanted, os.environ[settings.PARTITION]
        return _partition


def _start_recorder(variables: dict, private: bool) -> int:
    """Starts ``python -m fracgpu.recorder``, which records this process's job in the ledger
    until the process ends; returns its pid (the holder of this job's processes). InitError
    when the ledger cannot be used: no job runs unrecorded."""
    import subprocess
    import sys

    from fracgpu.ledger import Ledger, LedgerError

    try:
        ledger = Ledger()
        ledger.close()
    except LedgerError as e:
        raise InitError(str(e)) from None
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        command = " ".join([os.path.basename(argv[0]), *argv[1:]]) if argv else ""
    except OSError:
        command = ""
    partition = variables[settings.PARTITION]
    recorder = [sys.executable, "-m", "fracgpu.recorder", "--pid", str(os.getpid()),
                "--start-time", str(state.process_start_time(os.getpid())), "--job", command[:200] or partition,
                "--partition", partition, "--state-dir", variables[settings.STATE_DIR], "--ledger", str(ledger.path),
                "--command", command]
    if private:
        recorder.append("--private")
    env = settings.without_job_variables(os.environ)
    try:
        process = subprocess.Popen(recorder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
    except OSError as e:
        raise InitError(f"cannot start fracgpu's job recorder: {e}") from None
    return process.pid


def _request(spec: jobs.JobSpec, memory, partition, state_dir, compute, cap, overcommit=False,
             priority=None) -> _Request:
    shown = []
    if memory is not None:
        shown.append(f"memory={memory!r}" + (", overcommit=True" if overcommit else ""))
    if compute is not None:
        shown.append(f"compute={compute!r}" + (", cap=True" if cap else ""))
    if priority is not None:
        shown.append(f"priority={priority!r}")
    if partition is not None:
        shown.append(f"partition={partition!r}")
    return _Request(spec, state.resolve_state_dir(state_dir), ", ".join(shown))


def _inherited(env, wanted: _Request) -> bool:
    """Whether this process was started in a partition (FRACGPU_* inherited) that is the one wanted.

    Raises InitError when it was started in another one: a job cannot leave its partition."""
    name = env.get(settings.PARTITION)
    if not name:
        return False
    shown = ", ".join(f"{var}={env[var]!r}" for var in settings.PARTITION_VARIABLES if env.get(var))
    try:   # the rule every nested job follows: that partition, by name or by its own settings
        jobs.check_nested(wanted.spec, env)
        if wanted.state_dir == state.resolve_state_dir():
            return True
    except jobs.NestedJob:
        pass
    raise InitError(f"this process was started in fracgpu partition {name!r} ({shown}, set by `fracgpu run` or "
                    f"by a parent process's fracgpu.init()), and fracgpu.init({wanted.shown}) asks for another; a "
                    "job stays in the partition it was started in: call init() with the same settings, or start "
                    "the job without those variables")


def _loaded_drivers(library: str) -> tuple[bool, str | None]:
    """(whether the shim is loaded here, the path of a real driver loaded here or None)."""
    shim_loaded, driver = False, None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}
    except OSError:
        return False, None
    for path in sorted(p for p in paths if p.startswith("/")):
        path = path.removesuffix(" (deleted)")
        if shim.is_shim(path, library):
            shim_loaded = True
        elif os.path.basename(path).startswith("libcuda.so"):
            driver = path
    return shim_loaded, driver
