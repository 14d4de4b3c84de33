"""``fracgpu partition``: named partitions that several jobs share."""

from __future__ import annotations

import dataclasses
import json

import click

from fracgpu import devices, partitions, state
from fracgpu.cli.common import (PRIORITY_HELP, complete_partitions, console, device_option, limit_text, option_errors,
                                overcommit_option, partition_label, priority_option, quota_options, refusals,
                                share_text, tables)
from fracgpu.units import format_share, format_size


@click.group("partition")
def partition_group() -> None:
    """Partitions: a memory quota and a compute share on one GPU that several jobs share."""


@partition_group.command("create")
@click.argument("name")
@quota_options("Memory limit shared by the partition's processes: 8GiB, 512MiB, plain bytes, or 25% of the GPU. "
               "[default: no limit]",
               "Share of the GPU's time: 25% or 0.25, guaranteed when every partition is busy; time others leave "
               "idle is used too, unless --cap. [default: an equal part of what shares leave]")
@overcommit_option("the --memory limit or --compute share")
@priority_option(PRIORITY_HELP)
@device_option("The GPU, by CUDA index (as CUDA_VISIBLE_DEVICES numbers them; `fracgpu gpus` lists them).",
               default=0, show_default=True)
@click.pass_context
def create(ctx: click.Context, name: str, memory: str | None, compute: str | None, cap: bool, overcommit: bool,
           priority: str | None, device_index: int) -> None:
    """Make partition NAME; jobs join it with `fracgpu run --partition NAME`.

    The memory limits of a GPU's partitions add up to at most its memory, and
    their compute shares to at most 100% (high and normal together, low
    among themselves): a limit or share that does not fit is refused, naming
    what is promised and what remains, unless --overcommit. Names starting
    with run-, init- or slurm- are fracgpu's own (private partitions)."""
    if overcommit and memory is None and compute is None:
        raise click.UsageError("--overcommit needs --memory SIZE or --compute SHARE (what to overcommit)", ctx)
    with refusals(), option_errors(ctx):
        made = partitions.create(name, memory, compute=compute, cap=cap, overcommit=overcommit,
                                 priority=priority or "normal", device_index=device_index)
    click.echo(f"partition '{name}' created on GPU {device_index}: {_limits(made)}")
    mask = devices.visibility_mask()
    if mask is not None:
        click.echo(f"note: GPU {device_index} as CUDA_VISIBLE_DEVICES={mask} numbers them (`fracgpu gpus` lists "
                   "them)", err=True)


def _limits(p: state.PartitionUsage) -> str:
    memory = format_size(p.memory_limit) if p.memory_limit else "no memory limit"
    if p.best_effort:
        memory += " (best effort: overcommitted, not a promise)"
    compute = f"{format_share(p.compute_share)} of compute" + (" (capped)" if p.compute_cap else "") + \
        (" (best effort: overcommitted, not a promise)" if p.compute_best_effort else "") \
        if p.compute_share else "no compute share"
    return f"{memory}, {compute}" + ("" if p.priority == "normal" else f", {p.priority} priority")


@partition_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the partitions and processes of each GPU as JSON.")
def list_(as_json: bool) -> None:
    """The partitions of each GPU: limit, memory in use, peak, processes."""
    with refusals():
        gpus = state.usage()
    if as_json:
        numbering = partitions.numbering_or_none() if gpus else None
        click.echo(json.dumps([{"index": numbering.index(gpu.uuid) if numbering else None, **dataclasses.asdict(gpu)}
                               for gpu in gpus], indent=2))
        return
    if not any(gpu.partitions for gpu in gpus):
        click.echo("No partitions. Make one with `fracgpu partition create NAME --memory SIZE`, or run a job "
                   "with `fracgpu run --memory SIZE -- COMMAND`.")
        return
    screen = console()
    numbering = partitions.numbering_or_none()
    if numbering is not None and numbering.note():
        screen.print(numbering.note(), highlight=False)
    for gpu in gpus:
        if not gpu.partitions:
            continue
        # The GPU heads its own table, so its UUID is one line, not a column folded over eight; its index is
        # the one --device takes.
        where = f"{numbering.describe(gpu.uuid)}  " if numbering is not None else ""
        screen.print(f"[bold]{where}{gpu.name}[/bold], {format_size(gpu.total_memory)}  {gpu.uuid}", highlight=False)
        rows = [[partition_label(p), limit_text(p), format_size(p.used),
                 format_size(p.peak), share_text(p), f"{p.device_ns / 1e9:.2f} s", str(p.processes)]
                for p in gpu.partitions]
        for table in tables(LIST_COLUMNS, rows, screen.width):
            screen.print(table)


LIST_COLUMNS = [("partition", "left"), ("limit", "right"), ("in use", "right"), ("peak", "right"),
                ("compute", "right"), ("GPU time", "right"), ("procs", "right")]


@partition_group.command("set")
@click.argument("name", shell_complete=complete_partitions)
@click.option("--memory", metavar="SIZE",
              help="New memory limit: 8GiB, 512MiB, plain bytes, or 25% of the GPU.")
@click.option("--unlimited", is_flag=True, help="Remove the memory limit.")
@click.option("--compute", metavar="SHARE",
              help="New share of the GPU's time: 25% or 0.25.")
@click.option("--cap/--no-cap", default=None, help="Make the share a ceiling, or stop it being one.")
@priority_option("New priority class: high, normal or low; running jobs take it at their next launch.")
@overcommit_option("the new --memory limit or --compute share")
@device_option("The GPU, by CUDA index, when several have a partition of this name (`fracgpu gpus` lists them).")
@click.pass_context
def set_(ctx: click.Context, name: str, memory: str | None, unlimited: bool, compute: str | None, cap: bool | None,
         priority: str | None, overcommit: bool, device_index: int | None) -> None:
    """Change partition NAME while its jobs run (they see it at their next allocation or launch).

    A new memory limit must fit beside the GPU's other promises, unless
    --overcommit; one that fits makes a best-effort partition a promise again."""
    if overcommit and memory is None and compute is None:
        raise click.UsageError("--overcommit needs --memory SIZE or --compute SHARE (what to overcommit)", ctx)
    with refusals(), option_errors(ctx):
        try:
            uuid, now = partitions.update(name, memory=memory, compute=compute, cap=cap, unlimited=unlimited,
                                          overcommit=overcommit, priority=priority, device_index=device_index)
        except partitions.NothingToChange:
            raise click.UsageError("nothing to change: give --memory SIZE, --unlimited, --compute SHARE, "
                                   "--cap/--no-cap or --priority CLASS", ctx) from None
        except partitions.LimitAndUnlimited:
            raise click.UsageError("give --memory SIZE or --unlimited, not both", ctx) from None
    click.echo(f"partition '{name}' on {uuid}: {_limits(now)}")
    if now.memory_limit and now.used > now.memory_limit:
        click.echo(f"note: it holds {format_size(now.used)}, above the new limit; its new allocations are refused "
                   "until its use falls below the limit", err=True)


@partition_group.command("rm")
@click.argument("name", shell_complete=complete_partitions)
@device_option("The GPU, by CUDA index, when several have a partition of this name (`fracgpu gpus` lists them).")
@click.option("--force", is_flag=True, help="Remove it even while processes use it: they are ended (SIGKILL).")
@click.pass_context
def remove(ctx: click.Context, name: str, device_index: int | None, force: bool) -> None:
    """Remove partition NAME (refused while processes use it, naming their containers, unless --force)."""
    with refusals(), option_errors(ctx):
        uuid = partitions.remove(name, device_index=device_index, force=force)
    click.echo(f"partition '{name}' removed from {uuid}")
