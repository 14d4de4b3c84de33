"""The example jobs in examples/ and the README's First steps that uses them, run as a user runs them:
under `fracgpu run --memory ...` on the simulated GPU (cuda-bindings), where the quota refuses
what does not fit and the job goes on."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT
from tests.support.simgpu import GiB, MiB
from fracgpu.ledger import Ledger
from tools import first_steps

EXAMPLES = ROOT / "examples"


def run_example(gpu, memory: str, name: str, *args: str) -> subprocess.CompletedProcess:
    return gpu.run(sys.executable, "-m", "fracgpu", "run", "--memory", memory, "--name", name, "--",
                   sys.executable, EXAMPLES / f"{name}.py", *args, timeout=120)


def recorded(gpu, name: str):
    with Ledger(gpu.ledger) as ledger:
        (job,) = [j for j in ledger.jobs() if j.job == name]
    return job


def test_the_training_example_halves_its_batch_until_the_quota_takes_it(make_gpu):
    gpu = make_gpu(memory=4 * GiB)
    result = run_example(gpu, "1GiB", "train", "--batch", "2GiB", "--steps", "20")
    lines = result.stdout.splitlines()
    assert lines[0] == "train: fracgpu simulated GPU, 1GiB of memory as this job sees it"   # the quota as the GPU
    assert lines[2:4] == ["train: a batch of 2GiB was refused (CUDA_ERROR_OUT_OF_MEMORY); trying 1GiB",
                          "train: a batch of 1GiB was refused (CUDA_ERROR_OUT_OF_MEMORY); trying 512MiB"]
    assert lines[4].startswith("train: batch 512MiB, 20 steps in") and lines[4].endswith("writes read back")
    # the shim said why, once, naming the partition, its limit and what was asked
    assert "out of memory in partition 'run-" in result.stderr and "limit 1GiB" in result.stderr
    job = recorded(gpu, "train")
    # weights, the batch that fit and the context: within the quota, and all of it used
    assert job.exit_status == 0 and job.peak_memory_bytes == 256 * MiB + 512 * MiB + gpu.context
    assert job.gpu_seconds > 0.09   # 20 steps of 5 ms of kernels


def test_the_serving_example_answers_busy_at_the_quota_and_stays_up(make_gpu):
    gpu = make_gpu(memory=4 * GiB)
    # a cache that keeps the first 12 requests' 32 MiB: past 512 MiB less the weights and context, refused
    result = run_example(gpu, "512MiB", "serve", "--requests", "20", "--keep", "12", "--period-ms", "2")
    last = result.stdout.splitlines()[-1]
    fits = (512 * MiB - 256 * MiB - gpu.context) // (32 * MiB)
    assert last.startswith(f"serve: {fits} answered, {20 - fits} answered busy (memory refused at the quota)"), last
    assert "latency p50" in last
    assert recorded(gpu, "serve").peak_memory_bytes <= 512 * MiB


def test_the_readme_first_steps_print_what_the_readme_shows():
    """Every command of the README's First steps, run as written in a fresh shell on a machine without a
    GPU, prints what the README shows (figures that vary from run to run aside: tools/first_steps.py)."""
    outputs = first_steps.run()
    problems = first_steps.differences(outputs)
    assert not problems, "\n".join(problems) + "\n\nprinted:\n" + first_steps.transcript(outputs)
