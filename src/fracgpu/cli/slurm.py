"""``fracgpu slurm-prolog``: a Slurm TaskProlog that makes a job's GPU shards its quota and share.

What it exports, and how to set Slurm up, is ``fracgpu.slurm``.
"""

from __future__ import annotations

import os
import sys

import click

from fracgpu import state
from fracgpu.slurm import GRES_CONF, exports


@click.command("slurm-prolog")
@click.option("--shards-per-gpu", type=click.IntRange(min=1), metavar="N",
              help=f"Shards each GPU is cut into (gres.conf's Name=shard Count= per GPU). [default: read from "
                   f"{GRES_CONF}]")
@click.option("--gres-conf", default=GRES_CONF, show_default=True, metavar="PATH", help="Where gres.conf is.")
@click.option("--cap", is_flag=True, help="Make the share a ceiling too, even on an idle GPU.")
def slurm_prolog(shards_per_gpu: int | None, gres_conf: str, cap: bool) -> None:
    """Slurm TaskProlog: print the exports that hold a sharded job to its fraction of the GPU."""
    try:
        variables = exports(dict(os.environ), shards_per_gpu, gres_conf, cap)
    except (ValueError, OSError, state.StateError) as e:
        # Slurm fails the task when its TaskProlog fails: better than a job with no limit.
        click.echo(f"fracgpu slurm-prolog: {e}", err=True)
        sys.exit(1)
    for name, value in sorted(variables.items()):
        if "\n" in value:
            click.echo(f"fracgpu slurm-prolog: {name} has a line break; refusing to export it", err=True)
            sys.exit(1)
        click.echo(f"export {name}={value}")
