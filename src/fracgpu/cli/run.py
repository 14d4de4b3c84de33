"""``fracgpu run``: a command under a memory quota and a compute share, recorded in the ledger.

``fracgpu run`` stays as the command's parent: it starts the command (which
the kernel kills if ``fracgpu run`` itself is killed), forwards the signals
it is sent, samples what the job uses into the ledger, records how it ended,
and exits as the command did (the same status, or the same signal). Its own
refusals, before the command starts, exit 125 (``common.REFUSED``), a status
``env``, ``timeout`` and ``docker run`` use the same way.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

import click

from fracgpu import config, jobs, settings, slurm, state
from fracgpu.cli.common import (PRIORITY_HELP, CommandFailed, CommandRunner, InputError, complete_partitions,
                                converted_by, exec_command, job_spec, overcommit_option, priority_option,
                                quota_options, refusals)

# Signals passed on to the command. SIGINT and SIGQUIT typed at the terminal
# reach the command directly (same process group), so those are passed on only
# when someone sent them to fracgpu run alone.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT, signal.SIGWINCH)
WATCHED = set(FORWARDED) | {signal.SIGCHLD}
SI_KERNEL = 0x80
PR_SET_PDEATHSIG = 1


def _child_setup(parent: int, libc) -> None:
    """In the command's process, before exec: no signal blocked, and SIGKILL when fracgpu run dies."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:   # fracgpu run died before the line above
        os._exit(137)


def supervise(command: tuple[str, ...], env: dict[str, str | None], recorder) -> int:
    """Run ``command`` with ``env``, recording it with ``recorder``; returns its status
    as Popen does (-N: killed by signal N). CommandFailed when it cannot start."""
    sys.stdout.flush()
    sys.stderr.flush()
    environment = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)   # opened before the fork: the child only calls prctl
    from fracgpu.recorder import sample_interval

    # The job is in the ledger before its command runs: whatever kills this process
    # later, the command never ran unrecorded.
    started = time.time()
    recorder.start(start=started)
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        child = subprocess.Popen(list(command), env=environment, preexec_fn=lambda: _child_setup(parent, libc),
                                 close_fds=False)
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
        status = 127 if isinstance(e, FileNotFoundError) else 126
        recorder.finish(status)
        if status == 127:
            raise CommandFailed(f"command not found: {command[0]}", 127) from None
        raise CommandFailed(f"cannot run {command[0]}: {e.strerror}", 126) from None
    # The first sample waits one interval, and the ledger's orphaned jobs are closed with it (or
    # at the end): the ledger has the job already, and that work now would only take a core from
    # the command while it starts.
    next_sample = started + sample_interval(0)
    orphans_closed = False
    while True:
        status = child.poll()
        if status is not None:
            break
        now = time.time()
        if now >= next_sample:
            recorder.sample(t=now)
            if not orphans_closed:
                recorder.close_orphans()
                orphans_closed = True
            next_sample = now + sample_interval(now - started)
        info = signal.sigtimedwait(WATCHED, max(0.0, next_sample - time.time()))
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if info.si_signo in (signal.SIGINT, signal.SIGQUIT) and info.si_code == SI_KERNEL:
            continue   # typed at the terminal: the command has it already
        try:
            child.send_signal(info.si_signo)
        except ProcessLookupError:
            pass
    if not orphans_closed:
        recorder.close_orphans()
    recorder.finish(status)
    return status


def parse_labels(labels: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` texts as a dict; ValueError naming a malformed one."""
    out = {}
    for text in labels:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"invalid label {text!r}: write KEY=VALUE, like team=vision")
        out[key.strip()] = value
    return out


def _live_holder() -> int | None:
    """The process recording the job this one runs in (``FRACGPU_JOB_HOLDER``, set by an outer
    ``fracgpu run`` or ``fracgpu.init()``) while it runs; None when there is none."""
    try:
        holder = int(os.environ.get(settings.JOB_HOLDER, ""))
        os.kill(holder, 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return None
    except PermissionError:
        pass   # it runs, as another user
    return holder if holder > 0 else None


def exit_like(status: int) -> None:
    """Leave as the command did: its exit status, or killed by the same signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status >= 0:
        sys.exit(status)
    sig = -status
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig)   # a signal that does not end a process (it was ignored): the shell's convention


@click.command("run", cls=CommandRunner, context_settings={"allow_interspersed_args": False})
@quota_options("Give the command a private partition with this memory limit: 4GiB, 512MiB, plain bytes, or 25% "
               "of each GPU. Gone when the command and its children exit.",
               "Give the command's private partition this share of the GPU's time: 25% or 0.25. Guaranteed when "
               "every partition is busy; time others leave idle is used too, unless --cap.")
@overcommit_option("the --memory limit or --compute share")
@priority_option(PRIORITY_HELP + " Gives the command a private partition.")
@click.option("--partition", metavar="NAME", shell_complete=complete_partitions,
              help="Run the command in this existing partition (fracgpu partition create), sharing its quota "
                   "with the partition's other processes.")
@click.option("--oom-wait", metavar="SECONDS",
              help="An allocation over the quota waits up to this long for memory to free before it fails "
                   "(sets FRACGPU_OOM_WAIT). [default: fail at once]")
@click.option("--name", "job_name", metavar="NAME", help="The job's name in the ledger and the report. "
              "[default: the command line]")
@click.option("--ledger", "ledger_path", metavar="PATH", type=click.Path(dir_okay=False),
              help="The ledger to record the job in. [default: $FRACGPU_LEDGER, else the per-user one]")
@click.option("--label", "labels", metavar="KEY=VALUE", multiple=True, callback=converted_by(parse_labels),
              help="A label recorded with the job (repeatable): team=vision, ray_job_id=01000000.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@click.pass_context
def run(ctx: click.Context, memory: str | None, compute: str | None, cap: bool, overcommit: bool, priority: str | None,
        partition: str | None,
        oom_wait: str | None, job_name: str | None, ledger_path: str | None, labels: dict[str, str],
        command: tuple[str, ...]) -> None:
    """Run COMMAND under a GPU memory quota and/or compute share, and record it in the ledger.

    Every process the command starts is in the same partition, and every CUDA
    allocation they make counts against its limit: past it they get
    CUDA_ERROR_OUT_OF_MEMORY (each framework's own out-of-memory error).
    What the job used (device time, memory) is sampled into the ledger while it
    runs and when it ends (`fracgpu report`). fracgpu run exits as COMMAND did;
    signals sent to it go to COMMAND, and COMMAND is killed if fracgpu run is.
    A --memory limit or --compute share must fit beside what the GPU has
    promised already (see `fracgpu partition list`), or be passed with
    --overcommit. Inside a partition (started by another fracgpu run, say)
    COMMAND runs in that partition: give no limits, or the same ones. When
    fracgpu run refuses to start COMMAND it exits 125 (127: COMMAND not
    found, 126: not executable).

    \b
      fracgpu run --memory 4GiB --compute 25% -- python train.py
      fracgpu run --partition team -- python infer.py
      fracgpu run --priority high -- python serve.py
    """
    outer = jobs.outer_partition()
    asked = (memory, compute, partition, priority, oom_wait) != (None,) * 5 or cap or overcommit
    spec = job_spec(ctx, memory=memory, compute=compute, cap=cap, partition=partition, oom_wait=oom_wait,
                    overcommit=overcommit, priority=priority) if asked or outer is None else None
    if not command:
        raise click.UsageError("missing the command to run: fracgpu run [OPTIONS] -- COMMAND [ARGS]...", ctx)
    from fracgpu.ledger import Ledger, LedgerError
    from fracgpu.recorder import JobRecorder

    with refusals():
        config.check_environment()   # the node's file wins: a contradicting variable is refused, not ignored
        if outer is not None:
            jobs.check_nested(spec, os.environ)
            nested = jobs.JobSpec.from_environment(os.environ)
            variables = {settings.PARTITION: outer, settings.STATE_DIR: state.resolve_state_dir()}
            if spec is not None and spec.oom_wait_text is not None:
                variables[settings.OOM_WAIT] = spec.oom_wait_text
            spec = nested
            holder = _live_holder()
            if holder:
                if job_name is not None or labels:
                    raise InputError(f"this job runs inside fracgpu partition '{outer}', whose job the process "
                                     f"{holder} records in the ledger already: it is part of that job, so give "
                                     "--name and --label to the outer `fracgpu run`")
                exec_command(command, jobs.job_environment(variables))
        else:
            # This process stays the command's parent: its pid names the private partition.
            variables = jobs.partition_variables(spec, private_name=f"run-{os.getpid()}")
        env = jobs.job_environment(variables)
    env[settings.JOB_HOLDER] = str(os.getpid())
    try:
        ledger = Ledger(ledger_path)
    except LedgerError as e:
        raise InputError(f"{e}; the job was not started, so that none runs unrecorded") from None
    recorder = JobRecorder(ledger, job=job_name or shlex.join(command)[:200], partition=variables[settings.PARTITION],
                           private=spec.private, state_dir=variables[settings.STATE_DIR],
                           command=shlex.join(command),
                           # a percentage becomes bytes when the job's GPU is seen
                           memory_limit=spec.memory_bytes, labels={**slurm.task_labels(os.environ), **labels},
                           compute_share=spec.compute, priority=spec.priority or "normal")
    status = supervise(command, env, recorder)
    ledger.close()
    exit_like(status)
