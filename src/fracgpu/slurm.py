"""Slurm: a job's GPU shards as its quota and share (``fracgpu slurm-prolog`` prints these exports).

Slurm's ``gres/shard`` lets several jobs share a GPU but, in its own words,
does not fence them. Run as the ``TaskProlog``, ``fracgpu slurm-prolog`` reads what Slurm
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

import re

from fracgpu import jobs, settings
from fracgpu.units import percent_text

__all__ = ["GRES_CONF", "exports", "shards_per_gpu_from_gres"]

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
    spec = jobs.JobSpec.parse(memory=share, compute=share, cap=cap)
    variables = jobs.partition_variables(spec, private_name=f"slurm-{job}", env=env,
                                         state_dir=env.get(settings.STATE_DIR) or None)
    out = jobs.job_environment(variables, env)
    return {name: value for name, value in out.items() if value is not None}
