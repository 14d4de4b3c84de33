"""``fracgpu run``: a command under a memory quota and a compute share, in a partition of its own or a shared one."""

from __future__ import annotations

import os

import click

from fracgpu import jobs
from fracgpu.cli import checked_by, exec_command, refusals


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--memory", metavar="SIZE", callback=checked_by(jobs.parse_memory),
              help="Give the command a private partition with this memory limit: 4GiB, 512MiB, "
                   "plain bytes, or 25% of each GPU. Gone when the command and its children exit.")
@click.option("--compute", metavar="SHARE", callback=checked_by(jobs.parse_compute),
              help="Give the command's private partition this share of the GPU's time: 25% or 0.25. Guaranteed "
                   "when every partition is busy; time others leave idle is used too, unless --cap.")
@click.option("--cap", is_flag=True, help="Make the --compute share a ceiling, even on an idle GPU.")
@click.option("--partition", metavar="NAME", callback=checked_by(jobs.check_partition_name),
              help="Run the command in this existing partition (fracgpu partition create), sharing its quota "
                   "with the partition's other processes.")
@click.option("--oom-wait", metavar="SECONDS", callback=checked_by(jobs.parse_oom_wait),
              help="An allocation over the quota waits up to this long for memory to free before it fails "
                   "(sets FRACGPU_OOM_WAIT). [default: fail at once]")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
@click.pass_context
def run(ctx: click.Context, memory: str | None, compute: str | None, cap: bool, partition: str | None,
        oom_wait: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND, in place of this process, under a GPU memory quota and/or compute share.

    Every process the command starts is in the same partition, and every CUDA
    allocation they make counts against its limit: past it they get
    CUDA_ERROR_OUT_OF_MEMORY (each framework's own out-of-memory error).

    \b
      fracgpu run --memory 4GiB --compute 25% -- python train.py
      fracgpu run --partition team -- python infer.py
    """
    if cap and compute is None:
        raise click.UsageError("--cap needs --compute SHARE (the share to cap at)", ctx)
    try:
        jobs.check_choice(memory, compute, cap, partition)
    except (TypeError, ValueError):
        raise click.UsageError("give --memory SIZE and/or --compute SHARE [--cap] (a private partition), or "
                               "--partition NAME (an existing one), not both", ctx) from None
    if not command:
        raise click.UsageError("missing the command to run: fracgpu run [OPTIONS] -- COMMAND [ARGS]...", ctx)
    with refusals():
        # This process becomes the command (exec), so its pid names the private partition.
        variables = jobs.partition_variables(private_name=f"run-{os.getpid()}", memory=memory,
                                             partition=partition, oom_wait=oom_wait, compute=compute, cap=cap)
        env = jobs.job_environment(variables)
    exec_command(command, env)
