"""fracgpu in Ray: a real local Ray cluster (``ray.init(num_gpus=1)``) on the simulated GPU.

Tasks declared with ``@fracgpu.ray.remote(num_gpus=F)`` see F of the device's
memory, are refused beyond it, get about F of the device's time while all are
busy, and each is a job in the ledger labelled with its Ray job and name.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.support.simgpu import MiB

ray = pytest.importorskip("ray", reason="Ray is part of the test extras: pip install '.[test]'")

pytestmark = pytest.mark.slow

# Run inside a task: allocate 32 MiB blocks until refused, free them; how much it
# held and the status of the call that was refused.
FILL_QUOTA = r"""
def fill_quota(drv, block=32 << 20):
    blocks = []
    while True:
        rc, ptr = drv.try_alloc(block)
        if rc != 0:
            break
        blocks.append(ptr)
    for b in blocks:
        drv.free(b)
    return len(blocks) * block, rc
"""

# argv: kernel module, then the fractions of the tasks. Each task fills its quota in
# 32 MiB blocks (until refused), frees it, waits for a common start, keeps the
# device busy with 1 ms spins for 3 s, and returns what it saw and when its
# kernels completed.
DRIVER = r"""
import json, os, sys, time
import ray
import fracgpu.ray
""" + FILL_QUOTA + r"""
module, fractions = sys.argv[1], [float(f) for f in sys.argv[2:]]
ray.init(num_gpus=1, num_cpus=len(fractions) + 2, include_dashboard=False, log_to_driver=False)

def work(start_at, seconds, module):
    from fracgpu.exercise.driver import Driver
    drv = Driver()
    free, total = drv.mem_info()
    drv.load_kernels(module)
    held, rc = fill_quota(drv)
    while time.time() < start_at:
        time.sleep(0.001)
    done, marks = 0, []
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(4):
            drv.spin(0.001)
        drv.synchronize()
        done += 4
        marks.append((time.time(), done))
    return {"total": total, "held": held, "refused": rc == 2, "marks": marks,
            "partition": os.environ.get("FRACGPU_PARTITION")}

start_at = time.time() + 10          # every worker started by then
refs = [fracgpu.ray.remote(num_gpus=f)(work).options(name=f"share-{f}").remote(start_at, 3.0, module)
        for f in fractions]
print(json.dumps({"results": ray.get(refs), "job": ray.get_runtime_context().get_job_id()}))
"""


def shares_while_all_busy(results: list[dict]) -> list[float]:
    """Each task's part of the device time in the window where all of them were launching."""
    start = max(r["marks"][0][0] for r in results)
    end = min(r["marks"][-1][0] for r in results)
    assert end - start > 1.5, "the tasks did not overlap long enough"

    def done_by(r, t):
        n = 0
        for when, count in r["marks"]:
            if when <= t:
                n = count
        return n

    ran = [done_by(r, end) - done_by(r, start) for r in results]   # 1 ms kernels
    return [k / (1000 * (end - start)) for k in ran]


def run_on_ray(gpu, kernels, *fractions):
    result = gpu.run(sys.executable, "-c", DRIVER, kernels, *map(str, fractions), timeout=240)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["results"], out["job"], ended_jobs(gpu, len(fractions))


def ended_jobs(gpu, count: int, within: float = 30.0) -> list[dict]:
    """The ledger's jobs once ``count`` of them have ended: a worker's ``fracgpu run`` records its
    end after its task has returned, which may be a moment after the driver has its results."""
    deadline = time.monotonic() + within
    while True:
        jobs = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
        if sum(job["end"] is not None for job in jobs) >= count or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def usable(gpu, quota: int, block: int = 32 * MiB) -> int:
    """What a task fills of `quota` in `block`s: the quota less its context, which is inside it."""
    return (quota - gpu.context) // block * block


def test_four_quarter_tasks_get_a_quarter_each(gpu, kernels):
    results, ray_job, jobs = run_on_ray(gpu, kernels, 0.25, 0.25, 0.25, 0.25)
    for r in results:
        assert r["total"] == 256 * MiB              # a quarter of the 1 GiB GPU is all it sees
        assert r["held"] == usable(gpu, 256 * MiB) and r["refused"]   # and all it gets: refused beyond
    assert len({r["partition"] for r in results}) == 4
    shares = shares_while_all_busy(results)
    assert all(0.21 <= s <= 0.29 for s in shares), shares
    assert sum(shares) >= 0.85, shares              # and the device was kept busy
    assert len(jobs) == 4
    for job in jobs:
        assert job["exit_status"] == 0 and job["end"] is not None
        assert job["labels"] == {"ray_job_id": ray_job, "ray_name": "work"}
        assert job["memory_limit"] == 256 * MiB and job["compute_share"] == 0.25
        assert job["peak_memory_bytes"] == usable(gpu, 256 * MiB) + gpu.context and job["gpu_seconds"] > 0.5


def test_a_half_task_next_to_two_quarters_gets_half(gpu, kernels):
    results, _, jobs = run_on_ray(gpu, kernels, 0.5, 0.25, 0.25)
    assert [r["total"] for r in results] == [512 * MiB, 256 * MiB, 256 * MiB]
    shares = shares_while_all_busy(results)
    # The split of the device time the three used: how busy the device was kept depends on the host
    # (three task loops on a loaded 2-core machine leave it idle now and then), the split on fracgpu.
    used = sum(shares)
    half, *quarters = (s / used for s in shares)
    assert 0.44 <= half <= 0.56, (half, quarters, used)
    assert all(0.20 <= q <= 0.30 for q in quarters), (half, quarters, used)
    assert used >= 0.4, shares   # contended enough for the split to mean something (0.55 seen at load 4-6 on 2 cores)
    assert sorted(j["compute_share"] for j in jobs) == [0.25, 0.25, 0.5]


def test_options_and_the_worker_command():
    import fracgpu.ray

    opts = fracgpu.ray.options(0.25, name="train")
    assert opts["num_gpus"] == 0.25 and "max_calls" not in opts    # .options() refuses it for tasks
    # what .options() takes, by Ray's own checks, for a task and for an actor
    try:
        from ray._common import ray_option_utils
    except ImportError:   # older Ray
        from ray._private import ray_option_utils
    ray_option_utils.validate_task_options(opts, in_options=True)
    ray_option_utils.validate_actor_options(fracgpu.ray.options(0.25, actor=True), in_options=True)

    def train():
        pass

    # the decorator declares the task with max_calls=1 (where Ray takes it): a worker, so a job, per task
    assert fracgpu.ray.remote(num_gpus=0.25)(train)._default_options["max_calls"] == 1
    assert fracgpu.ray.remote(num_gpus=0.25, max_calls=3)(train)._default_options["max_calls"] == 3
    decorate = fracgpu.ray.remote(num_gpus=0.25, max_calls=3, runtime_env={"env_vars": {"A": "1"}})
    for _ in range(2):    # one decorator, several functions: each gets every option
        declared = decorate(train)._default_options
        assert declared["max_calls"] == 3 and declared["runtime_env"]["env_vars"] == {"A": "1"}
    command = opts["runtime_env"]["py_executable"]
    assert "-m fracgpu run --memory 25% --compute 25% --name train --label ray_name=train --" in command
    assert "max_calls" not in fracgpu.ray.options(0.5, actor=True)
    for bad in (0, 1.5, -0.25, float("nan")):
        with pytest.raises(ValueError, match="fraction in"):
            fracgpu.ray.options(bad)
    with pytest.raises(ValueError, match="py_executable"):
        fracgpu.ray.options(0.25, runtime_env_base={"py_executable": "python"})
    serve = fracgpu.ray.options(0.25, name="serve", priority="high")["runtime_env"]["py_executable"]
    assert "--compute 25% --priority high --name serve" in serve
    assert "--priority" not in command
    assert "--priority low" in fracgpu.ray.remote(num_gpus=0.5, priority="low")(train)._default_options[
        "runtime_env"]["py_executable"]
    for call in (lambda: fracgpu.ray.options(0.25, priority="urgent"),
                 lambda: fracgpu.ray.remote(num_gpus=0.25, priority="urgent")):
        with pytest.raises(ValueError, match="write high, normal or low"):
            call()
    with pytest.raises(ValueError, match="write high, normal or low"):
        fracgpu.ray.FracGPUPlugin.validate({"fracgpu": {"num_gpus": 0.25, "priority": "HIGH"}})


PLUGIN_DRIVER = r"""
import json, os
os.environ["RAY_RUNTIME_ENV_PLUGINS"] = json.dumps([{"class": "fracgpu.ray.FracGPUPlugin"}])
import ray
ray.init(num_gpus=1, num_cpus=3, include_dashboard=False, log_to_driver=False)

@ray.remote(num_gpus=0.25, max_calls=1, runtime_env={"fracgpu": {"num_gpus": 0.25, "name": "plugged"}})
def probe():
    from fracgpu.exercise.driver import Driver
    return Driver().mem_info()[1]

print(json.dumps(ray.get(probe.remote())))
"""


def test_the_runtime_env_plugin_does_the_same_where_the_cluster_registers_it(gpu):
    out = gpu.run(sys.executable, "-c", PLUGIN_DRIVER, timeout=240).stdout
    assert json.loads(out.strip().splitlines()[-1]) == 256 * MiB
    (job,) = ended_jobs(gpu, 1)
    assert job["job"] == "plugged" and job["memory_limit"] == 256 * MiB and job["exit_status"] == 0


ACTOR_DRIVER = r"""
import json, time
import ray
import fracgpu.ray
ray.init(num_gpus=1, num_cpus=3, include_dashboard=False, log_to_driver=False)

@fracgpu.ray.remote(num_gpus=0.5)
class Server:
    def total(self):
        from fracgpu.exercise.driver import Driver
        return Driver().mem_info()[1]

server = Server.remote()
print(json.dumps([ray.get(server.total.remote()), ray.get(server.total.remote())]))
ray.kill(server)
time.sleep(2)   # its worker goes, and fracgpu run with it
"""


def test_an_actor_is_one_job_for_its_life(gpu):
    out = gpu.run(sys.executable, "-c", ACTOR_DRIVER, timeout=240).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [512 * MiB, 512 * MiB]
    (job,) = ended_jobs(gpu, 1)
    assert job["job"] == "Server" and job["labels"]["ray_name"] == "Server"
    assert job["memory_limit"] == 512 * MiB and job["end"] is not None


OPTIONS_DRIVER = r"""
import json, os, time
import ray
import fracgpu.ray
ray.init(num_gpus=1, num_cpus=3, include_dashboard=False, log_to_driver=False)
""" + FILL_QUOTA + r"""
def probe():
    from fracgpu.exercise.driver import Driver
    drv = Driver()
    total = drv.mem_info()[1]
    held, rc = fill_quota(drv)
    return {"total": total, "held": held, "refused": rc == 2, "pid": os.getpid(),
            "partition": os.environ.get("FRACGPU_PARTITION")}

declared_for_a_gpu = ray.remote(num_gpus=1)(probe)    # Ray declares it max_calls=1
declared_without = ray.remote(probe)                   # max_calls=0: Ray may reuse the worker

@ray.remote
class Holder:
    def probe(self):
        return probe()

out = {"per_task": [], "reused": [], "actor": []}
for _ in range(2):    # one after the other, so Ray may hand the second to the first one's worker
    out["per_task"].append(ray.get(declared_for_a_gpu.options(**fracgpu.ray.options(0.25, name="per-task")).remote()))
for _ in range(2):
    out["reused"].append(ray.get(declared_without.options(**fracgpu.ray.options(0.25, name="reused")).remote()))
holder = Holder.options(**fracgpu.ray.options(0.5, name="holder", actor=True)).remote()
out["actor"] = [ray.get(holder.probe.remote()) for _ in range(2)]
print(json.dumps(out))
ray.kill(holder)
time.sleep(2)
"""


def test_options_on_existing_tasks_and_actors_hold_the_quota(gpu):
    out = json.loads(gpu.run(sys.executable, "-c", OPTIONS_DRIVER, timeout=240).stdout.strip().splitlines()[-1])
    for kind, quota in (("per_task", 256 * MiB), ("reused", 256 * MiB), ("actor", 512 * MiB)):
        for r in out[kind]:
            assert r["total"] == quota, (kind, r)                         # sees its quota as the GPU
            assert r["held"] == usable(gpu, quota) and r["refused"], (kind, r)   # and is refused beyond it
            assert r["partition"], (kind, r)
    jobs = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    by_name = {}
    for job in jobs:
        by_name.setdefault(job["job"], []).append(job)
    assert set(by_name) == {"per-task", "reused", "holder"}, by_name
    # a job is a worker process: Ray's max_calls=1 for a GPU-declared function gives each task its own,
    # a function declared without GPUs may share one worker between tasks, an actor is one job
    assert len({r["pid"] for r in out["per_task"]}) == 2 == len(by_name["per-task"])
    assert len({r["pid"] for r in out["reused"]}) == len(by_name["reused"])
    assert len({r["pid"] for r in out["actor"]}) == 1 == len(by_name["holder"])
    for name, group in by_name.items():
        for job in group:
            assert job["labels"]["ray_name"] == name and "ray_job_id" in job["labels"]
            assert job["memory_limit"] == (512 if name == "holder" else 256) * MiB
