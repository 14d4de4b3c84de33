"""fracgpu in Ray: a real local Ray cluster (``ray.init(num_gpus=1)``) on the simulated GPU.

Tasks declared with ``@fracgpu.ray.remote(num_gpus=F)`` see F of the device's
memory, are refused beyond it, get about F of the device's time while all are
busy, and each is a job in the ledger labelled with its Ray job and name.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.simgpu import MiB

ray = pytest.importorskip("ray", reason="Ray is part of the test extras: pip install '.[test]'")

pytestmark = pytest.mark.slow

# argv: kernel module, then the fractions of the tasks. Each task fills its quota in
# 32 MiB blocks (until refused), frees it, waits for a common start, keeps the
# device busy with 1 ms spins for 3 s, and returns what it saw and when its
# kernels completed.
DRIVER = r"""
import json, os, sys, time
import ray
import fracgpu.ray

module, fractions = sys.argv[1], [float(f) for f in sys.argv[2:]]
ray.init(num_gpus=1, num_cpus=len(fractions) + 2, include_dashboard=False, log_to_driver=False)

def work(start_at, seconds, module):
    from fracgpu._driver import Driver
    drv = Driver()
    free, total = drv.mem_info()
    drv.load_kernels(module)
    blocks, block = [], 32 << 20
    while True:
        rc, ptr = drv.try_alloc(block)
        if rc != 0:
            break
        blocks.append(ptr)
    held = len(blocks) * block
    for b in blocks:
        drv.free(b)
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
    jobs = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    return out["results"], out["job"], jobs


def test_four_quarter_tasks_get_a_quarter_each(gpu, kernels):
    results, ray_job, jobs = run_on_ray(gpu, kernels, 0.25, 0.25, 0.25, 0.25)
    for r in results:
        assert r["total"] == 256 * MiB              # a quarter of the 1 GiB GPU is all it sees
        assert r["held"] == 256 * MiB and r["refused"]   # and all it gets: refused beyond
    assert len({r["partition"] for r in results}) == 4
    shares = shares_while_all_busy(results)
    assert all(0.21 <= s <= 0.29 for s in shares), shares
    assert sum(shares) >= 0.85, shares              # and the device was kept busy
    assert len(jobs) == 4
    for job in jobs:
        assert job["exit_status"] == 0 and job["end"] is not None
        assert job["labels"] == {"ray_job_id": ray_job, "ray_name": "work"}
        assert job["memory_limit"] == 256 * MiB and job["compute_share"] == 0.25
        assert job["peak_memory_bytes"] == 256 * MiB and job["gpu_seconds"] > 0.5


def test_a_half_task_next_to_two_quarters_gets_half(gpu, kernels):
    results, _, jobs = run_on_ray(gpu, kernels, 0.5, 0.25, 0.25)
    assert [r["total"] for r in results] == [512 * MiB, 256 * MiB, 256 * MiB]
    half, *quarters = shares_while_all_busy(results)
    assert 0.44 <= half <= 0.56, (half, quarters)
    assert all(0.20 <= q <= 0.30 for q in quarters), (half, quarters)
    assert sorted(j["compute_share"] for j in jobs) == [0.25, 0.25, 0.5]


def test_options_and_the_worker_command():
    import fracgpu.ray

    opts = fracgpu.ray.options(0.25, name="train")
    assert opts["num_gpus"] == 0.25 and opts["max_calls"] == 1
    command = opts["runtime_env"]["py_executable"]
    assert "-m fracgpu run --memory 25% --compute 25% --name train --label ray_name=train --" in command
    assert "max_calls" not in fracgpu.ray.options(0.5, actor=True)
    for bad in (0, 1.5, -0.25, float("nan")):
        with pytest.raises(ValueError, match="fraction in"):
            fracgpu.ray.options(bad)
    with pytest.raises(ValueError, match="py_executable"):
        fracgpu.ray.options(0.25, runtime_env_base={"py_executable": "python"})


PLUGIN_DRIVER = r"""
import json, os
os.environ["RAY_RUNTIME_ENV_PLUGINS"] = json.dumps([{"class": "fracgpu.ray.FracGPUPlugin"}])
import ray
ray.init(num_gpus=1, num_cpus=3, include_dashboard=False, log_to_driver=False)

@ray.remote(num_gpus=0.25, max_calls=1, runtime_env={"fracgpu": {"num_gpus": 0.25, "name": "plugged"}})
def probe():
    from fracgpu._driver import Driver
    return Driver().mem_info()[1]

print(json.dumps(ray.get(probe.remote())))
"""


def test_the_runtime_env_plugin_does_the_same_where_the_cluster_registers_it(gpu):
    out = gpu.run(sys.executable, "-c", PLUGIN_DRIVER, timeout=240).stdout
    assert json.loads(out.strip().splitlines()[-1]) == 256 * MiB
    (job,) = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    assert job["job"] == "plugged" and job["memory_limit"] == 256 * MiB and job["exit_status"] == 0


ACTOR_DRIVER = r"""
import json, time
import ray
import fracgpu.ray
ray.init(num_gpus=1, num_cpus=3, include_dashboard=False, log_to_driver=False)

@fracgpu.ray.remote(num_gpus=0.5)
class Server:
    def total(self):
        from fracgpu._driver import Driver
        return Driver().mem_info()[1]

server = Server.remote()
print(json.dumps([ray.get(server.total.remote()), ray.get(server.total.remote())]))
ray.kill(server)
time.sleep(2)   # its worker goes, and fracgpu run with it
"""


def test_an_actor_is_one_job_for_its_life(gpu):
    out = gpu.run(sys.executable, "-c", ACTOR_DRIVER, timeout=240).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [512 * MiB, 512 * MiB]
    (job,) = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    assert job["job"] == "Server" and job["labels"]["ray_name"] == "Server"
    assert job["memory_limit"] == 512 * MiB and job["end"] is not None
