"""``fracgpu slurm-prolog``: a Slurm TaskProlog that makes a job's GPU shards its quota and share.

What it prints, and how to set Slurm up, is ``fracgpu.slurm``.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from fracgpu import log, settings, state
from fracgpu.cli.common import log_format_option
from fracgpu.slurm import CONFIG, SLURM_CONF_DIR, exports, prolog_lines, read_config


def fail(message: str) -> NoReturn:
    # Slurm fails the task when its TaskProlog fails: better than a job with no limit.
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    log.emit("slurm-prolog", "refused", message, level="error", job=int(job) if job.isdigit() else None,
             partition=f"slurm-{job}" if job.isdigit() else None)
    sys.exit(1)


@click.command("slurm-prolog")
@click.option("--shards-per-gpu", type=click.IntRange(min=1), metavar="N",
              help="Shards each GPU is cut into (gres.conf's Name=shard Count= per GPU). [default: counted from "
                   "gres.conf for this node]")
@click.option("--gres-conf", metavar="PATH",
              help=f"Where gres.conf is. [default: beside $SLURM_CONF, else {SLURM_CONF_DIR}/gres.conf]")
@click.option("--config", "config_path", metavar="PATH",
              help=f"The node's fracgpu settings, NAME=value lines (FRACGPU_STATE_DIR, "
                   f"FRACGPU_STATE_GROUP, ...). [default: {CONFIG} when it exists]")
@click.option("--state-dir", metavar="PATH", help="The node's state folder (in place of the config's).")
@click.option("--state-group", metavar="GROUP", help="The group sharing it (in place of the config's).")
@click.option("--cap", is_flag=True, help="Make the share a ceiling too, even on an idle GPU.")
@click.option("--priority", metavar="[high|normal|low]",
              help="The job's class at the launch gate, for QOS-based set-ups (a TaskProlog script per QOS, or "
                   "one that reads $SLURM_JOB_QOS). [default: normal]")
@log_format_option(from_environment=False)
def slurm_prolog(shards_per_gpu: int | None, gres_conf: str | None, config_path: str | None,
                 state_dir: str | None, state_group: str | None, cap: bool, priority: str | None) -> None:
    """Slurm TaskProlog: print the lines that hold a sharded job to its fraction of the GPU.

    Every FRACGPU_* variable it does not export is unset in the task, and the
    node's settings come from its options and config file, never from the
    task's (the user's) environment.
    """
    try:
        node = read_config(config_path).with_options(**{settings.STATE_DIR: state_dir,
                                                        settings.STATE_GROUP: state_group})
        lines = prolog_lines(exports(dict(os.environ), shards_per_gpu, node, gres_conf, cap, priority))
    except (ValueError, OSError, state.StateError) as e:
        fail(str(e))
    for line in lines:
        click.echo(line)
