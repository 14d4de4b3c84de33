"""`fracgpu slurm-prolog` with the environment Slurm gives a TaskProlog (no Slurm daemon): the
lines it prints, and a task started as Slurm starts it (the user's environment with those lines
applied) held to its shards' fraction, whatever the user's environment held."""

from __future__ import annotations

import grp
import os
import subprocess
import sys

import pytest

from fracgpu import settings, sim
from fracgpu import shim as shim_lib
from tests.support.simgpu import MiB, parse_facts

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_TASK_PID": "12345",
         "CUDA_VISIBLE_DEVICES": "0", "SLURMD_NODENAME": "node2"}
# What a user may have in the environment a task inherits.
POLLUTION = {"FRACGPU_COMPUTE_CAP": "1", "FRACGPU_STATE_DIR": "/home/x", "FRACGPU_OOM_WAIT": "30",
             "FRACGPU_PARTITION": "mine", "FRACGPU_MEMORY": "100%", "LD_PRELOAD": "/usr/lib/libfoo.so"}


def user_env(gpu, **extra) -> dict[str, str]:
    """The task's environment before the prolog: the user's (no fracgpu setting of the test's GPU,
    which the node's config gives), Slurm's variables, and ``extra``."""
    base = {k: v for k, v in gpu.env.items() if k not in settings.NAMES}
    return {**base, **SLURM, **extra}


def prolog(gpu, *args, env: dict[str, str] | None = None, **variables):
    """``fracgpu slurm-prolog ARGS`` run with exactly the task's environment."""
    return subprocess.run([sys.executable, "-m", "fracgpu", "slurm-prolog", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**(env if env is not None else user_env(gpu)), **variables})


def lines(text: str) -> tuple[dict[str, str], set[str]]:
    """The exports and unsets of a TaskProlog's output (the only lines it may print here)."""
    exported, unset = {}, set()
    for line in text.splitlines():
        verb, _, rest = line.partition(" ")
        if verb == "export":
            name, _, value = rest.partition("=")
            exported[name] = value
        elif verb == "unset":
            unset.add(rest)
        else:
            raise AssertionError(f"not a TaskProlog line: {line!r}")
    return exported, unset


def exported(text: str) -> dict[str, str]:
    return lines(text)[0]


def task_env(env: dict[str, str], text: str) -> dict[str, str]:
    """``env`` with the prolog's lines applied, as slurmstepd does before it starts the task."""
    exports, unsets = lines(text)
    return {**{k: v for k, v in env.items() if k not in unsets}, **exports}


def node_config(gpu, tmp_path, **extra) -> str:
    """The node's fracgpu.conf: its state folder, and its GPU (the test's simulated one)."""
    path = tmp_path / "fracgpu.conf"
    node = {name: value for name, value in sim.environment(gpu.config).items() if name.startswith("FRACGPU_")}
    node = {settings.STATE_DIR: str(gpu.state_dir), **node, **extra}
    path.write_text("# this node\n" + "".join(f"{name}={value}\n" for name, value in node.items()))
    return str(path)


def test_shards_become_the_jobs_quota_and_share(gpu, clients, tmp_path):
    env = user_env(gpu, SLURM_SHARDS_ON_NODE="2")
    result = prolog(gpu, "--shards-per-gpu", "8", "--config", node_config(gpu, tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    out = exported(result.stdout)
    assert out["FRACGPU_PARTITION"] == "slurm-4242"
    assert out["FRACGPU_MEMORY"] == "25%" and out["FRACGPU_COMPUTE"] == "25%"
    assert "libfracgpu.so" in out["LD_PRELOAD"]
    assert out["FRACGPU_STATE_DIR"] == str(gpu.state_dir)
    # A task started with them (as Slurm does) sees a quarter of the 1 GiB GPU and stops there.
    job = subprocess.run([str(clients.lcuda), "alloc-until-oom", "64"], capture_output=True, text=True, timeout=60,
                         env=task_env(env, result.stdout))
    facts = parse_facts(job.stdout)
    usable = (256 * MiB - gpu.context) // (64 * MiB) * 64 * MiB   # the quarter less its context, in 64 MiB blocks
    assert facts["bytes"] == str(usable) and facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY", job.stderr


def test_a_qos_prolog_gives_the_job_its_priority(gpu, tmp_path):
    env = user_env(gpu, SLURM_SHARDS_ON_NODE="2", FRACGPU_PRIORITY="low")   # the user's own: never taken
    result = prolog(gpu, "--shards-per-gpu", "8", "--priority", "high", "--config", node_config(gpu, tmp_path),
                    env=env)
    assert result.returncode == 0, result.stderr
    assert exported(result.stdout)["FRACGPU_PRIORITY"] == "high"
    unset = lines(prolog(gpu, "--shards-per-gpu", "8", "--config", node_config(gpu, tmp_path), env=env).stdout)[1]
    assert "FRACGPU_PRIORITY" in unset   # without the option: normal, whatever the user had


GRES_TWO_NODES = """# Two kinds of node in one file: Slurm reads the lines naming each node, and those naming none.
NodeName=node[1-2,7] Name=gpu File=/dev/nvidia0
NodeName=node[1-2,7] Name=shard Count=8
NodeName=big01 Name=gpu File=/dev/nvidia[0-1]
NodeName=big01 name=SHARD count=4
"""


def test_a_polluted_user_environment_does_not_reach_the_task(gpu, clients, shim, tmp_path):
    slurm_conf = tmp_path / "etc-slurm"
    slurm_conf.mkdir()
    (slurm_conf / "gres.conf").write_text(GRES_TWO_NODES)
    # A fracgpu.conf beside the user's SLURM_CONF is not the node's: the state folder is never the user's choice.
    (slurm_conf / "fracgpu.conf").write_text("FRACGPU_STATE_DIR=/home/x\n")
    env = user_env(gpu, **POLLUTION, SLURM_CONF=str(slurm_conf / "slurm.conf"), SLURM_SHARDS_ON_NODE="2")
    result = prolog(gpu, "--config", node_config(gpu, tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    exports, unsets = lines(result.stdout)
    # node2's lines alone: 8 shards on its one GPU, so 2 shards are 25% (all lines added up would be 50%).
    assert exports["FRACGPU_MEMORY"] == "25%" and exports["FRACGPU_COMPUTE"] == "25%"
    assert exports["FRACGPU_PARTITION"] == "slurm-4242"
    assert exports["FRACGPU_STATE_DIR"] == str(gpu.state_dir)
    assert exports["LD_PRELOAD"] == f"{shim}:{shim_lib.nvml_shim_path(shim)}:/usr/lib/libfoo.so"
    # Every fracgpu setting is the prolog's or unset: none is left as the user had it.
    assert {"FRACGPU_COMPUTE_CAP", "FRACGPU_OOM_WAIT", "FRACGPU_JOB_HOLDER", "FRACGPU_STATE_GROUP"} <= unsets
    assert unsets | {n for n in exports if n.startswith("FRACGPU_")} == set(settings.NAMES)
    assert not unsets & set(exports)
    # The task, started as Slurm starts it, is held to 25% of the node's GPU, uncapped, in the node's books.
    task = task_env(env, result.stdout)
    assert "FRACGPU_COMPUTE_CAP" not in task and "FRACGPU_OOM_WAIT" not in task
    job = subprocess.run([str(clients.lcuda), "alloc-until-oom", "64"], capture_output=True, text=True, timeout=60,
                         env=task)
    facts = parse_facts(job.stdout)
    usable = (256 * MiB - gpu.context) // (64 * MiB) * 64 * MiB   # the quarter less its context, in 64 MiB blocks
    assert facts["bytes"] == str(usable) and facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY", job.stderr
    assert list(gpu.state_dir.glob("gpu-*.state")) and not os.path.exists("/home/x")
    # On node big01 (2 GPUs, 4 shards), one shard is half a GPU.
    result = prolog(gpu, "--config", node_config(gpu, tmp_path), env={**env, "SLURMD_NODENAME": "big01",
                                                                     "SLURM_SHARDS_ON_NODE": "1"})
    assert exported(result.stdout)["FRACGPU_MEMORY"] == "50%", result.stderr
    # A node no line names has no shards to count.
    result = prolog(gpu, "--config", node_config(gpu, tmp_path), env={**env, "SLURMD_NODENAME": "node3"})
    assert result.returncode == 1 and "for node 'node3'" in result.stderr and result.stdout == ""


def test_the_shim_already_preloaded_is_not_repeated(gpu, shim, tmp_path):
    env = user_env(gpu, LD_PRELOAD=f"/usr/lib/libfoo.so:{shim} /usr/lib/libbar.so", SLURM_SHARDS_ON_NODE="1")
    out = exported(prolog(gpu, "--shards-per-gpu", "4", "--config", node_config(gpu, tmp_path), env=env).stdout)
    assert out["LD_PRELOAD"] == f"{shim}:{shim_lib.nvml_shim_path(shim)}:/usr/lib/libfoo.so:/usr/lib/libbar.so"


def test_the_state_folder_and_group_options_win_over_the_config(gpu, tmp_path):
    group = grp.getgrgid(os.getegid()).gr_name
    folder = tmp_path / "node-state"
    config = node_config(gpu, tmp_path, FRACGPU_STATE_GROUP="no-such-group-here")
    env = user_env(gpu, FRACGPU_STATE_GROUP="users-own", SLURM_SHARDS_ON_NODE="1")
    result = prolog(gpu, "--shards-per-gpu", "4", "--config", config, "--state-dir", folder, "--state-group", group,
                    env=env)
    assert result.returncode == 0, result.stderr
    out = exported(result.stdout)
    assert out["FRACGPU_STATE_DIR"] == str(folder) and out["FRACGPU_STATE_GROUP"] == group
    assert folder.stat().st_mode & 0o7777 == 0o2770 and folder.stat().st_gid == os.getegid()
    # The config's group, used as it is, is checked like any other: a group this machine lacks fails the task.
    result = prolog(gpu, "--shards-per-gpu", "4", "--config", config, "--state-dir", tmp_path / "other", env=env)
    assert result.returncode == 1 and "FRACGPU_STATE_GROUP='no-such-group-here'" in result.stderr


def test_the_shard_count_comes_from_gres_conf(gpu, tmp_path):
    conf = tmp_path / "gres.conf"
    conf.write_text("# two GPUs, 16 shards in all\nName=gpu File=/dev/nvidia[0-1]\nName=shard Count=16\n")
    config = node_config(gpu, tmp_path)
    env = exported(prolog(gpu, "--gres-conf", conf, "--config", config, SLURM_SHARDS_ON_NODE="6").stdout)
    assert env["FRACGPU_MEMORY"] == "75%" and env["FRACGPU_COMPUTE"] == "75%"
    env = exported(prolog(gpu, "--gres-conf", conf, "--config", config, "--cap", SLURM_SHARDS_ON_NODE="1").stdout)
    assert env["FRACGPU_MEMORY"] == "12.5%" and env["FRACGPU_COMPUTE_CAP"] == "1"


def test_more_shards_than_one_gpu_has_are_refused_not_capped(gpu, tmp_path):
    """12 shards where a GPU has 8 (gres.conf) fails the task naming both counts, never a silent 100%."""
    conf = tmp_path / "gres.conf"
    conf.write_text("Name=gpu File=/dev/nvidia0\nName=shard Count=8\n")
    result = prolog(gpu, "--gres-conf", conf, "--config", node_config(gpu, tmp_path), SLURM_SHARDS_ON_NODE="12")
    assert result.returncode == 1 and result.stdout == ""
    assert "12 shards on this node, more than the 8 of one GPU (gres.conf)" in result.stderr
    assert "--gres=shard:N" in result.stderr


def test_a_task_without_shards_gets_nothing(gpu):
    result = prolog(gpu, "--shards-per-gpu", "8")
    assert result.returncode == 0 and result.stdout == ""
    assert prolog(gpu, "--shards-per-gpu", "8", SLURM_SHARDS_ON_NODE="0").stdout == ""


@pytest.mark.parametrize("args, env, config, phrase", [
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "two"}, None, "SLURM_SHARDS_ON_NODE='two' is not a number"),
    (["--gres-conf", "/nonexistent/gres.conf"], {"SLURM_SHARDS_ON_NODE": "2"}, None,
     "cannot read /nonexistent/gres.conf (gres.conf, to count this node's shards per GPU): it does not exist; "
     "give --shards-per-gpu N in the TaskProlog, or --gres-conf PATH"),
    ([], {"SLURM_SHARDS_ON_NODE": "2", "SLURM_CONF": "/nonexistent/slurm.conf"}, None,
     "cannot read /nonexistent/gres.conf (gres.conf, to count this node's shards per GPU): it does not exist"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "12"}, None,
     "the job has 12 shards on this node, more than the 8 of one GPU (--shards-per-gpu)"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2", "SLURM_JOB_ID": ""}, None,
     "run this as Slurm's TaskProlog"),
    (["--shards-per-gpu", "8", "--config", "/nonexistent/fracgpu.conf"], {"SLURM_SHARDS_ON_NODE": "2"}, None,
     "cannot read /nonexistent/fracgpu.conf (the node's fracgpu settings): it does not exist; make it readable"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2"}, "FRACGPU_STATE_DIRECTORY=/x\n",
     "'FRACGPU_STATE_DIRECTORY' is not a fracgpu setting"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2"}, "# a node\nFRACGPU_COMPUTE_CAP=1\n",
     "fracgpu.conf:2: FRACGPU_COMPUTE_CAP is not a node setting"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2"}, "FRACGPU_OOM_WAIT=soon\n", "FRACGPU_OOM_WAIT"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2"}, "state_dir /var/lib/fracgpu\n",
     "write NAME=value"),
    (["--shards-per-gpu", "8", "--priority", "urgent"], {"SLURM_SHARDS_ON_NODE": "2"}, None,
     "invalid priority 'urgent': it is not a priority class; write high, normal or low"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2"}, "FRACGPU_PRIORITY=high\n",
     "FRACGPU_PRIORITY is not a node setting"),
])
def test_a_misconfiguration_fails_the_task_with_the_reason(gpu, tmp_path, args, env, config, phrase):
    if config is not None:
        (tmp_path / "fracgpu.conf").write_text(config)
        args = [*args, "--config", tmp_path / "fracgpu.conf"]
    result = prolog(gpu, *args, **env)
    assert result.returncode == 1 and result.stdout == ""
    assert phrase in result.stderr and "Errno" not in result.stderr


def test_help_shows_the_slurm_configuration():
    out = subprocess.run([sys.executable, "-m", "fracgpu", "slurm-prolog", "--help"], capture_output=True,
                         text=True).stdout
    for option in ("--shards-per-gpu", "--gres-conf", "--config", "--state-dir", "--state-group"):
        assert option in out
