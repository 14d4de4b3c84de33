"""`fracgpu slurm-prolog` with the environment Slurm gives a TaskProlog (no Slurm daemon):
the exports it prints, and a task started with them held to its shards' fraction."""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import MiB, parse_facts

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_TASK_PID": "12345",
         "CUDA_VISIBLE_DEVICES": "0"}


def prolog(gpu, *args, **env):
    return gpu.fracgpu("slurm-prolog", *args, check=False, env={**SLURM, **env})


def exported(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        assert line.startswith("export "), line   # the only lines a TaskProlog may print here
        name, _, value = line[len("export "):].partition("=")
        out[name] = value
    return out


def test_shards_become_the_jobs_quota_and_share(gpu, clients):
    result = prolog(gpu, "--shards-per-gpu", "8", SLURM_SHARDS_ON_NODE="2")
    assert result.returncode == 0, result.stderr
    env = exported(result.stdout)
    assert env["FRACGPU_PARTITION"] == "slurm-4242"
    assert env["FRACGPU_MEMORY"] == "25%" and env["FRACGPU_COMPUTE"] == "25%"
    assert "libfracgpu.so" in env["LD_PRELOAD"]
    assert env["FRACGPU_STATE_DIR"] == str(gpu.state_dir)
    # A task started with them (as Slurm does) sees a quarter of the 1 GiB GPU and stops there.
    facts = parse_facts(gpu.run(clients.lcuda, "alloc-until-oom", 64, env=env).stdout)
    assert facts["bytes"] == str(256 * MiB) and facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY"


def test_the_shard_count_comes_from_gres_conf(gpu, tmp_path):
    conf = tmp_path / "gres.conf"
    conf.write_text("# two GPUs, 16 shards in all\nName=gpu File=/dev/nvidia[0-1]\nName=shard Count=16\n")
    env = exported(prolog(gpu, "--gres-conf", str(conf), SLURM_SHARDS_ON_NODE="6").stdout)
    assert env["FRACGPU_MEMORY"] == "75%" and env["FRACGPU_COMPUTE"] == "75%"
    env = exported(prolog(gpu, "--gres-conf", str(conf), "--cap", SLURM_SHARDS_ON_NODE="1").stdout)
    assert env["FRACGPU_MEMORY"] == "12.5%" and env["FRACGPU_COMPUTE_CAP"] == "1"


def test_a_task_without_shards_gets_nothing(gpu):
    result = prolog(gpu, "--shards-per-gpu", "8")
    assert result.returncode == 0 and result.stdout == ""
    assert prolog(gpu, "--shards-per-gpu", "8", SLURM_SHARDS_ON_NODE="0").stdout == ""


@pytest.mark.parametrize("args, env, phrase", [
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "two"}, "SLURM_SHARDS_ON_NODE='two' is not a number"),
    (["--gres-conf", "/nonexistent/gres.conf"], {"SLURM_SHARDS_ON_NODE": "2"}, "No such file"),
    (["--shards-per-gpu", "8"], {"SLURM_SHARDS_ON_NODE": "2", "SLURM_JOB_ID": ""}, "run this as Slurm's TaskProlog"),
])
def test_a_misconfiguration_fails_the_task_with_the_reason(gpu, args, env, phrase):
    result = prolog(gpu, *args, **env)
    assert result.returncode == 1 and result.stdout == ""
    assert phrase in result.stderr


def test_help_shows_the_slurm_configuration():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fracgpu", "slurm-prolog", "--help"], capture_output=True,
                         text=True).stdout
    assert "--shards-per-gpu" in out and "--gres-conf" in out
