"""The launch gate: what it adds to cuLaunchKernel in each of its modes,
against the bare driver in the same run, and how close partitions get to
their shares with 2, 4 and 8 of them busy at once."""

from __future__ import annotations

import statistics
import time

import pytest

from tests.shim.test_compute import completions, shares_of_device_time, windows
from tests.support.simgpu import parse_facts

LAUNCHES = 20_000


def launch_ns(gpu, bench, kernels, env):
    out = gpu.run(bench, "launch", LAUNCHES, env={"BENCH_MODULE": kernels, **env}).stdout
    return float(parse_facts(out)["ns_per_op"])


def test_launch_overhead(benchmark, bench_gpu, driver_bench, shim, clients, kernels):
    """bare | alone (fast path) | watch (another partition exists, idle) | gate (capped at 100%: leases + events)."""
    modes = {
        "bare": {},
        "alone": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_COMPUTE": "50%"},
        "watch": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_COMPUTE": "50%"},
        "gate": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_COMPUTE": "100%", "FRACGPU_COMPUTE_CAP": "1"},
    }
    results = {m: [] for m in modes}
    idle = None
    for _ in range(3):
        for mode, env in modes.items():
            if mode == "watch":   # a second partition that exists and does nothing
                idle = bench_gpu.popen(clients.lcuda, "hold", 1, 60,
                                       env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": "idle", "FRACGPU_COMPUTE": "50%"})
                assert idle.stdout.readline().startswith("holding")
            try:
                results[mode].append(launch_ns(bench_gpu, driver_bench, kernels, env))
            finally:
                if mode == "watch":
                    idle.kill()
                    idle.wait()
    benchmark.pedantic(launch_ns, args=(bench_gpu, driver_bench, kernels, modes["alone"]), rounds=1, iterations=1)
    bare = statistics.median(results["bare"])
    for mode, values in results.items():
        m = statistics.median(values)
        benchmark.extra_info[f"{mode}_ns"] = m
        benchmark.extra_info[f"{mode}_ratio"] = m / bare
        print(f"\nlaunch {mode}: {m:.0f} ns per launch, ratio {m / bare:.2f}")


@pytest.mark.parametrize("count", [2, 4, 8])
def test_fairness(benchmark, make_gpu, clients, kernels, shim, count):
    """Largest error, in points of device time, of any partition in any 1 s window after the first."""
    gpu = make_gpu(memory=1 << 30)
    weights = list(range(1, count + 1))
    shares = {f"p{i}": w / sum(weights) for i, w in enumerate(weights)}
    seconds = 4

    def run():
        start = (time.monotonic() + 0.5) * 1000
        jobs = {name: gpu.popen(clients.lcuda, "busy", seconds, 1, kernels, f"{start:.3f}",
                                env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": name, "FRACGPU_COMPUTE": f"{s:.4f}"})
                for name, s in shares.items()}
        return {name: windows(completions(job), seconds) for name, job in jobs.items()}

    got = benchmark.pedantic(run, rounds=1, iterations=1)
    per_window = shares_of_device_time(got)
    error = max(abs(w[name] - shares[name]) for w, _ in per_window for name in shares)
    utilisation = min(u for _, u in per_window)
    benchmark.extra_info.update(partitions=count, max_error_points=100 * error, min_utilisation=utilisation)
    print(f"\nfairness x{count}: max error {100 * error:.2f} points, utilisation >= {100 * utilisation:.1f}%")
