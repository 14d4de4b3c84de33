"""A job started inside a partition stays in it: a nested `fracgpu run`, `fracgpu.init()` or
Slurm step runs in the outer partition, under its limits, and is one job in the ledger with
the outer one. It may name that partition or repeat its settings; asking for other limits or
another partition is refused before it starts (exit 125), naming the outer partition.

What the job gets is judged by the simulated device's own figures (`alloc-until-oom` stops
where the device refuses it), not by fracgpu's books."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from tests.cli.test_slurm import exported, node_config, prolog, task_env, user_env
from tests.support.simgpu import MiB, parse_facts


def usable(gpu, quota: int, block: int = 64 * MiB) -> int:
    """What a job under `quota` gets in `block`s: the quota less its context."""
    return (quota - gpu.context) // block * block


def ledger_jobs(gpu) -> list[dict]:
    with sqlite3.connect(gpu.ledger) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id")]


@pytest.mark.fault("A `fracgpu run --memory` started inside another job's partition, asking for more",
                   "refused before it starts (exit 125), naming the outer partition; never a larger partition")
def test_a_nested_run_never_gets_more_than_its_outer_partition(gpu, clients):
    result = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-m", "fracgpu", "run", "--memory",
                         "768MiB", "--", str(clients.lcuda), "alloc-until-oom", "64", check=False)
    assert result.returncode == 125, result.stdout + result.stderr
    assert "inside fracgpu partition 'run-" in result.stderr and "FRACGPU_MEMORY=256MiB" in result.stderr
    assert "Traceback" not in result.stderr and "bytes" not in result.stdout
    # Less, or another partition, is refused the same way: a nested job cannot choose its limits.
    gpu.fracgpu("partition", "create", "other", "--memory", "128MiB")
    for inner in (["--memory", "128MiB"], ["--partition", "other"], ["--compute", "50%"]):
        result = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-m", "fracgpu", "run", *inner, "--",
                             "true", check=False)
        assert result.returncode == 125 and "a nested job stays in its outer partition" in result.stderr, inner


def test_a_nested_run_without_options_runs_in_the_outer_partition_under_its_limit(gpu, clients):
    out = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-m", "fracgpu", "run", "--",
                      str(clients.lcuda), "alloc-until-oom", "64").stdout
    facts = parse_facts(out)
    assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY" and int(facts["bytes"]) == usable(gpu, 256 * MiB)
    # The outer job records it: one job in the ledger, the outer one.
    (job,) = ledger_jobs(gpu)
    assert job["partition"].startswith("run-") and job["exit_status"] == 0


def test_a_nested_run_naming_its_partition_or_repeating_its_settings_stays_in_it(gpu, clients):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    inner = [sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", str(clients.lcuda),
             "alloc-until-oom", "64"]
    facts = parse_facts(gpu.fracgpu("run", "--partition", "team", "--", *inner).stdout)
    assert int(facts["bytes"]) == usable(gpu, 256 * MiB)
    same = [sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", str(clients.lcuda), "alloc-until-oom",
            "64"]
    facts = parse_facts(gpu.fracgpu("run", "--memory", "256MiB", "--", *same).stdout)
    assert int(facts["bytes"]) == usable(gpu, 256 * MiB)


def test_labels_of_a_job_recorded_by_its_outer_run_go_to_the_outer_run(gpu):
    result = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-m", "fracgpu", "run", "--label",
                         "team=vision", "--", "true", check=False)
    assert result.returncode == 125 and "give --name and --label to the outer `fracgpu run`" in result.stderr


def test_init_inside_a_partition_keeps_it_and_refuses_another(gpu):
    code = ("import fracgpu, os\n"
            "print(fracgpu.init(memory='256MiB'))\n")
    out = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c", code).stdout
    assert out.strip().startswith("run-")
    code = ("import fracgpu, os\n"
            "print(fracgpu.init(partition=os.environ['FRACGPU_PARTITION']))\n")   # naming it, as run may
    assert gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c", code).stdout.startswith("run-")
    result = gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c",
                         "import fracgpu\nfracgpu.init(memory='768MiB')\n", check=False)
    assert result.returncode == 1 and "a job stays in the partition it was started in" in result.stderr


@pytest.mark.fault("`fracgpu run` inside a Slurm task that the prolog put in its shard (the README's advice)",
                   "the job stays in the task's partition and fraction, recorded once with its Slurm labels")
def test_a_run_inside_a_slurm_task_stays_in_its_shard_and_keeps_its_slurm_labels(gpu, clients, tmp_path):
    env = user_env(gpu, SLURM_SHARDS_ON_NODE="2")
    result = prolog(gpu, "--shards-per-gpu", "8", "--config", node_config(gpu, tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    task = {**task_env(env, result.stdout), "FRACGPU_LEDGER": str(gpu.ledger)}
    assert exported(result.stdout)["FRACGPU_PARTITION"] == "slurm-4242"
    for options in ([], ["--memory", task["FRACGPU_MEMORY"], "--compute", task["FRACGPU_COMPUTE"]]):
        job = subprocess.run([sys.executable, "-m", "fracgpu", "run", *options, "--label", "team=vision", "--",
                              str(clients.lcuda), "alloc-until-oom", "64"], capture_output=True, text=True,
                             timeout=60, env=task)
        assert job.returncode == 0, job.stderr
        assert int(parse_facts(job.stdout)["bytes"]) == usable(gpu, 256 * MiB)   # a quarter of the 1 GiB GPU
    jobs = ledger_jobs(gpu)
    assert [j["partition"] for j in jobs] == ["slurm-4242", "slurm-4242"]
    for j in jobs:
        assert json.loads(j["labels"]) == {"slurm_job_id": "4242", "slurm_step_id": "0", "team": "vision"}
