"""``fracgpu slurm-prolog``: a Slurm TaskProlog that makes a job's GPU shards its quota and share.

Slurm's ``gres/shard`` lets several jobs share a GPU but, in its own words,
does not fence them. Run as the ``TaskProlog``, this command reads what Slurm
gives the task (``SLURM_SHARDS_ON_NODE``: the shards the job has here) and the
GPU's shard count, and prints the ``export`` lines Slurm applies to the task:
the fracgpu shim preloaded, and a private partition for the job on this node
(``slurm-<job id>``, shared by its tasks and steps here) with the job's
fraction of the GPU as its memory limit and compute share.

slurm.conf::

    GresTypes=gpu,shard
    NodeName=node1 Gres=gpu:1,shard:8
    TaskProlog=/usr/local/bin/fracgpu-task-prolog    # a script: exec fracgpu slurm-prolog --shards-per-gpu 8

gres.conf::

    Name=gpu File=/dev/nvidia0
    Name=shard Count=8

A job then asks for ``--gres=shard:2`` and gets 2/8 = 25% of the GPU's memory
and time. A task without shards on this node (a whole-GPU job, or a CPU job)
gets nothing from the prolog. A misconfiguration fails the task with the
reason, rather than let it run unlimited.
"""

from __future__ import annotations

import os
import re
import sys

import click

from fracgpu import jobs, state
from fracgpu.units import percent_text

GRES_CONF = "/etc/slurm/gres.conf"


def shards_per_gpu_from_gres(path: str) -> int:
    """Shards per GPU from gres.conf: the ``Name=shard Count=N`` total over the ``Name=gpu`` devices."""
    shards, gpus = 0, 0
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0]
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            name = fields.get("Name", "").lower()
            if name == "shard":
                shards += int(fields.get("Count", "0"))
            elif name == "gpu":
                files = fields.get("File", "")
                # File=/dev/nvidia[0-3] is four GPUs.
                ranges = re.findall(r"\[(\d+)-(\d+)\]", files)
                gpus += sum(int(b) - int(a) + 1 for a, b in ranges) if ranges else int(fields.get("Count", "1"))
    if shards <= 0 or gpus <= 0:
        raise ValueError(f"{path} has no 'Name=shard Count=N' and 'Name=gpu' lines to count shards per GPU; "
                         "give --shards-per-gpu N")
    return max(1, shards // gpus)


def exports(env: dict[str, str], shards_per_gpu: int | None, gres_conf: str = GRES_CONF,
            cap: bool = False) -> dict[str, str]:
    """The variables for the task of a job in ``env`` (what Slurm gives the TaskProlog); empty
    when the job has no shards on this node. ValueError says what is wrong."""
    text = env.get("SLURM_SHARDS_ON_NODE", "").strip()
    if not text or text == "0":
        return {}
    if not text.isdigit():
        raise ValueError(f"SLURM_SHARDS_ON_NODE={text!r} is not a number of shards")
    shards = int(text)
    per_gpu = shards_per_gpu if shards_per_gpu is not None else shards_per_gpu_from_gres(gres_conf)
    if per_gpu <= 0:
        raise ValueError(f"--shards-per-gpu must be at least 1, not {per_gpu}")
    fraction = min(1.0, shards / per_gpu)
    share = percent_text(fraction)
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        raise ValueError(f"SLURM_JOB_ID={job!r}: run this as Slurm's TaskProlog, which sets it")
    variables = jobs.partition_variables(private_name=f"slurm-{job}", memory=share, compute=share, cap=cap,
                                         env=env, state_dir=env.get("FRACGPU_STATE_DIR") or None)
    out = jobs.job_environment(variables, env)
    return {name: value for name, value in out.items() if value is not None}


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
