"""Slurm: a job's GPU shards as its quota and share (``fracgpu slurm-prolog`` prints the lines).

Slurm's ``gres/shard`` lets several jobs share a GPU but, in its own words,
does not fence them. Run as the ``TaskProlog``, ``fracgpu slurm-prolog`` reads what Slurm
gives the task (``SLURM_SHARDS_ON_NODE``: the shards the job has here) and the
GPU's shard count, and prints the lines Slurm applies to the task (``export
NAME=value`` and ``unset NAME``): the fracgpu shim preloaded before the task's
own ``LD_PRELOAD``, and a private partition for the job on this node
(``slurm-<job id>``, shared by its tasks and steps here) with the job's
fraction of the GPU as its memory limit and compute share.

A TaskProlog runs with the task's environment, which is the user's: nothing
fracgpu reads is taken from it. Every ``FRACGPU_*`` variable the prolog does not
set is unset in the task (a user's ``FRACGPU_COMPUTE_CAP=1`` or own state
folder never reaches it), and the node's settings (the state folder and its
group, above all) come from the prolog's options or the node's config file,
``/etc/slurm/fracgpu.conf``: one ``NAME=value`` a line (NAME a ``FRACGPU_*``
setting), ``#`` comments. The node's own configuration file
(``/etc/fracgpu/fracgpu.conf``, ``fracgpu.config``) is read too, and a
setting it gives is the node's: Slurm's file may repeat it, not contradict it.

slurm.conf::

    GresTypes=gpu,shard
    NodeName=node[1-4] Gres=gpu:1,shard:8
    TaskProlog=/usr/local/bin/fracgpu-task-prolog    # a script: exec fracgpu slurm-prolog

gres.conf (read beside ``$SLURM_CONF``, else from /etc/slurm; the lines whose
``NodeName`` names this node, ``$SLURMD_NODENAME``, and the lines without one)::

    NodeName=node[1-4] Name=gpu File=/dev/nvidia0
    NodeName=node[1-4] Name=shard Count=8

fracgpu.conf::

    FRACGPU_STATE_DIR=/var/lib/fracgpu      # made by root: chgrp gpu, chmod 2770
    FRACGPU_STATE_GROUP=gpu

A job then asks for ``--gres=shard:2`` and gets 2/8 = 25% of the GPU's memory
and time. Where a QOS says how urgent a job is, the TaskProlog script passes
its class on (``--priority high`` for an inference QOS, say: the script reads
``$SLURM_JOB_QOS``); a job's own environment never chooses it. A task without
shards on this node (a whole-GPU job, or a CPU job) gets nothing from the
prolog. A misconfiguration fails the task with the reason, rather than let it
run unlimited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from fracgpu import config, jobs, settings, state
from fracgpu.units import parse_priority, percent_text

__all__ = ["CONFIG", "SLURM_CONF_DIR", "NodeConfig", "gres_conf_path", "read_config", "node_name",
           "expand_hostlist", "shards_per_gpu_from_gres", "prolog_lines", "exports"]

SLURM_CONF_DIR = "/etc/slurm"
# The node's fracgpu settings. A fixed path, not one beside $SLURM_CONF: the task's
# environment (the user's) may name its own SLURM_CONF, and the state folder must not
# be the user's choice.
CONFIG = os.path.join(SLURM_CONF_DIR, "fracgpu.conf")
# What the prolog decides from the job's shards, and the holder of a `fracgpu run` job:
# never a node setting.
PROLOG_DECIDES = (*settings.PARTITION_VARIABLES, settings.JOB_HOLDER)
# A hostlist expression naming more nodes than this is refused rather than expanded.
MAX_HOSTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """The node's ``FRACGPU_*`` settings a sharded task gets (the state folder and group, the real
    driver, ...), whatever the user's environment says."""

    values: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def with_options(self, **values: str | None) -> NodeConfig:
        """This config with the settings given as options (``FRACGPU_STATE_DIR=...``) in place of its own."""
        given = {name: value for name, value in values.items() if value is not None}
        for name, value in given.items():
            _check_node_setting(name, value, "the option")
        return NodeConfig({**self.values, **given})


def _check_node_setting(name: str, value: str, where: str) -> None:
    if name not in settings.NAMES:
        raise ValueError(f"{where}: {name!r} is not a fracgpu setting (the README's table of variables lists them)")
    if name in PROLOG_DECIDES:
        raise ValueError(f"{where}: {name} is not a node setting; the prolog sets it from the job's shards")
    settings.by_name(name).parse(value)   # ValueError naming the variable


@contextlib.contextmanager
def _opened(path: str, what: str, fix: str) -> Iterator[Any]:
    """``path`` open for reading; a file that cannot be read is a ValueError naming it, what it was
    read for, why it cannot be, and ``fix``."""
    try:
        f = open(path)
    except OSError as e:
        reason = "it does not exist" if isinstance(e, FileNotFoundError) else e.strerror or str(e)
        raise ValueError(f"cannot read {path} ({what}): {reason}; {fix}") from None
    with f:
        yield f


def read_config(path: str | os.PathLike | None = None) -> NodeConfig:
    """The node's settings from ``path`` (default ``CONFIG``; a missing default file is an empty
    config): ``NAME=value`` lines (NAME a ``FRACGPU_*`` setting), ``#`` comments. ValueError
    (naming the file and line) for anything else; OSError when a file named explicitly cannot
    be read."""
    if path is None:
        path = CONFIG
        if not os.path.exists(path):
            return NodeConfig()
    path = os.fspath(path)
    values: dict[str, str] = {}
    with _opened(path, "the node's fracgpu settings", f"make it readable by the user Slurm runs the TaskProlog as, or "
                 f"give --config PATH naming another (without --config, {CONFIG} is read only when it exists)") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, value = line.partition("=")
            name, value = name.strip(), value.strip()
            where = f"{path}:{number}"
            if not sep or not value:
                raise ValueError(f"{where}: write NAME=value (NAME a FRACGPU_* setting), not {line!r}")
            _check_node_setting(name, value, where)
            values[name] = value
    return NodeConfig(values)


def with_node_file(values: Mapping[str, str]) -> dict[str, str]:
    """``values`` (the prolog's settings) with those of the node's configuration file
    (``fracgpu.config``), which every fracgpu part on the node reads: one set of books. A
    setting both give differently is a ValueError naming both."""
    node = config.read()
    out = dict(values)
    for name, value in node.values.items():
        if out.get(name, value) != value:
            raise ValueError(f"{name}={out[name]} (Slurm's fracgpu.conf or an option) contradicts the node's "
                             f"configuration {node.path}, which says {value}; remove one of them")
        out[name] = value
    return out


def gres_conf_path(env: Mapping[str, str]) -> str:
    """gres.conf: beside ``$SLURM_CONF`` when it is set (Slurm keeps them in one folder), else in
    ``SLURM_CONF_DIR``."""
    slurm_conf = env.get("SLURM_CONF", "").strip()
    folder = os.path.dirname(slurm_conf) if slurm_conf else SLURM_CONF_DIR
    return os.path.join(folder or ".", "gres.conf")


def node_name(env: Mapping[str, str]) -> str:
    """This node's Slurm name: ``$SLURMD_NODENAME`` (set for the TaskProlog), else the short
    host name (slurmd's default NodeName)."""
    return env.get("SLURMD_NODENAME", "").strip() or socket.gethostname().split(".", 1)[0]


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_one(text: str, expression: str) -> list[str]:
    open_at = text.find("[")
    if open_at < 0:
        if "]" in text:
            raise ValueError(f"invalid hostlist {expression!r}: a ']' without its '['")
        return [text]
    close_at = text.find("]", open_at)
    if close_at < 0 or "[" in text[open_at + 1:close_at]:
        raise ValueError(f"invalid hostlist {expression!r}: a '[' without its ']'")
    prefix, body, rest = text[:open_at], text[open_at + 1:close_at], text[close_at + 1:]
    middles = []
    for item in body.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"invalid hostlist {expression!r}: {item!r} is not a number or a range like 1-4")
        if not dash:
            middles.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"invalid hostlist {expression!r}: the range {item!r} goes down")
        if int(high) - int(low) >= MAX_HOSTS:
            raise ValueError(f"invalid hostlist {expression!r}: the range {item!r} names over {MAX_HOSTS} names")
        # node[01-10]: as wide as the lower bound (node01 ... node10), as Slurm writes them.
        middles += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    tails = _expand_one(rest, expression)
    if len(middles) * len(tails) > MAX_HOSTS:
        raise ValueError(f"invalid hostlist {expression!r}: it names over {MAX_HOSTS} names")
    return [prefix + middle + tail for middle in middles for tail in tails]


def expand_hostlist(expression: str) -> list[str]:
    """The names in a Slurm hostlist expression, in order: ``node[1-4,7],gpu01`` is node1 ... node4,
    node7, gpu01; ``node[01-10]`` keeps the width, ``rack[1-2]-n[1-2]`` is every pair. ValueError
    for a malformed one."""
    names = []
    for part in _split_outside_brackets(expression.strip()):
        part = part.strip()
        if not part:
            raise ValueError(f"invalid hostlist {expression!r}: an empty name")
        names += _expand_one(part, expression)
        if len(names) > MAX_HOSTS:
            raise ValueError(f"invalid hostlist {expression!r}: it names over {MAX_HOSTS} names")
    return names


def _count(text: str, where: str) -> int:
    """A gres.conf ``Count``: a whole number, with Slurm's K/M/G/T/P suffixes (times 1024 each)."""
    match = re.fullmatch(r"(\d+)([KMGTP]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"{where}: Count={text!r} is not a number")
    return int(match.group(1)) * 1024 ** ("KMGTP".find(match.group(2).upper()) + 1 if match.group(2) else 0)


def shards_per_gpu_from_gres(path: str, node: str) -> int:
    """Shards per GPU on node ``node`` from gres.conf: its ``Name=shard Count=N`` total over its
    ``Name=gpu`` devices, from the lines whose ``NodeName`` names it and the lines with none.
    Parameter names are case-insensitive, as Slurm reads them."""
    shards, gpus = 0, 0
    with _opened(path, "gres.conf, to count this node's shards per GPU",
                 "give --shards-per-gpu N in the TaskProlog, or --gres-conf PATH naming the node's gres.conf") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0]
            where = f"{path}:{number}"
            fields = {key.lower(): value for key, value in re.findall(r"(\w+)=(\S+)", line)}
            if "nodename" in fields and node not in expand_hostlist(fields["nodename"]):
                continue   # another node's line
            name = fields.get("name", "").lower()
            if name == "shard":
                shards += _count(fields.get("count", "0"), where)
            elif name == "gpu":
                # File=/dev/nvidia[0-3] is four GPUs, as is File=/dev/nvidia0,/dev/nvidia[1-3].
                files = fields.get("file")
                gpus += len(expand_hostlist(files)) if files else _count(fields.get("count", "1"), where)
    if shards <= 0 or gpus <= 0:
        raise ValueError(f"{path} has no 'Name=shard Count=N' and 'Name=gpu' lines for node {node!r} to count "
                         "shards per GPU; give --shards-per-gpu N")
    return max(1, shards // gpus)


@contextlib.contextmanager
def _process_settings(values: Mapping[str, str]) -> Iterator[None]:
    """This process's ``FRACGPU_*`` variables are ``values`` (and no others) inside the block, then
    as they were: the native state checks (the state folder's group, its default) read them there."""
    saved = {name: os.environ.get(name) for name in settings.NAMES}
    try:
        for name in settings.NAMES:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def exports(env: Mapping[str, str], shards_per_gpu: int | None, node: NodeConfig | None = None,
            gres_conf: str | None = None, cap: bool = False, priority: str | None = None) -> dict[str, str | None]:
    """What the task of a job in ``env`` (what Slurm gives the TaskProlog) is given: each variable's
    value, None for a ``FRACGPU_*`` variable to unset; empty when the job has no shards on this node.

    Every fracgpu setting is the node's (``node``) or the prolog's, none the user's.
    ``shards_per_gpu`` None: counted from ``gres_conf`` (default: ``gres_conf_path(env)``) for
    this node. ``priority``: the partition's class (``high``, ``normal``, ``low``). ValueError says
    what is wrong (a bad priority names the accepted values); StateError for an unusable state folder."""
    if priority is not None:   # a bad class fails every task, sharded or not: the prolog is misconfigured
        jobs.parse_option("priority", parse_priority, priority)
    text = env.get("SLURM_SHARDS_ON_NODE", "").strip()
    if not text or text == "0":
        return {}
    if not text.isdigit():
        raise ValueError(f"SLURM_SHARDS_ON_NODE={text!r} is not a number of shards")
    shards = int(text)
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        raise ValueError(f"SLURM_JOB_ID={job!r}: run this as Slurm's TaskProlog, which sets it")
    given = shards_per_gpu is not None
    if shards_per_gpu is None:
        shards_per_gpu = shards_per_gpu_from_gres(gres_conf or gres_conf_path(env), node_name(env))
    if shards_per_gpu <= 0:
        raise ValueError(f"--shards-per-gpu must be at least 1, not {shards_per_gpu}")
    if shards > shards_per_gpu:
        raise ValueError(f"the job has {shards} shards on this node, more than the {shards_per_gpu} of one GPU "
                         f"({'--shards-per-gpu' if given else 'gres.conf'}): fracgpu holds a sharded job to a "
                         f"fraction of one GPU; ask for at most {shards_per_gpu} shards (--gres=shard:N), or whole "
                         "GPUs (--gres=gpu:N), or correct the shard count per GPU")
    share = percent_text(shards / shards_per_gpu)
    spec = jobs.JobSpec.parse(memory=share, compute=share, cap=cap, priority=priority)
    node_settings = with_node_file(dict((node or NodeConfig()).values))
    # The task's environment as fracgpu may read it: the user's, less every fracgpu setting,
    # plus the node's.
    task_env = {**{k: v for k, v in env.items() if k not in settings.NAMES}, **node_settings}
    with _process_settings(node_settings):
        folder = state.resolve_state_dir(node_settings.get(settings.STATE_DIR))
        variables = jobs.partition_variables(spec, private_name=f"slurm-{job}", env=task_env, state_dir=folder)
        out = {**node_settings, **jobs.job_environment(variables, task_env)}
    for name in settings.NAMES:
        if out.get(name) is None:
            out[name] = None   # unset in the task, whatever the user had
    return out


def task_labels(env: Mapping[str, str]) -> dict[str, str]:
    """The ledger labels of a job recorded inside a Slurm task: ``slurm_job_id`` (and
    ``slurm_step_id``) from the task's environment; empty outside Slurm."""
    return {label: env[name].strip() for label, name in (("slurm_job_id", "SLURM_JOB_ID"),
                                                          ("slurm_step_id", "SLURM_STEP_ID"))
            if env.get(name, "").strip()}


def prolog_lines(variables: Mapping[str, str | None]) -> list[str]:
    """The TaskProlog's output for ``variables``: ``export NAME=value`` (Slurm takes the value as
    it is, to the end of the line), then ``unset NAME`` for each None. ValueError for a value
    Slurm cannot take (a line break)."""
    lines = []
    for name, value in sorted(variables.items()):
        if value is None:
            continue
        if "\n" in value or "\r" in value:
            raise ValueError(f"{name} has a line break; refusing to export it")
        lines.append(f"export {name}={value}")
    lines += [f"unset {name}" for name, value in sorted(variables.items()) if value is None]
    return lines
