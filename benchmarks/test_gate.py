"""The launch gate: what it adds to cuLaunchKernel in each of its modes,
against the bare driver in the same run, and how close partitions get to
their shares with 2, 4 and 8 of them busy at once."""

from __future__ import annotations

import statistics
import time

import pytest

import fracgpu

from tests.shim.test_compute import completions, shares_of_device_time, windows
from tests.support.simgpu import parse_facts

LAUNCHES = 20_000
EVENT_LOOPS = 20_000


# What a launch costs in driver calls, as the simulated driver counts them (the
# shim's own calls included): events recorded, queries, synchronisations.
CALLS = {
    "records": ("event_record",),
    "queries": ("event_query", "stream_query"),
    "syncs": ("event_synchronize", "stream_synchronize", "ctx_synchronize"),
}


def launch_run(gpu, bench, kernels, env) -> dict[str, float]:
    """One run of LAUNCHES launches: "ns" per launch and each of CALLS per launch."""
    facts = parse_facts(gpu.run(bench, "launch", LAUNCHES, env={"BENCH_MODULE": kernels, **env}).stdout)
    launches = int(facts["calls_launch"]) + int(facts["calls_graph_launch"])
    assert launches == LAUNCHES, facts   # the driver counted what the client launched
    per_launch = {what: sum(int(facts[f"calls_{k}"]) for k in kinds) / launches for what, kinds in CALLS.items()}
    return {"ns": float(facts["ns_per_op"]), "cpu_ns": float(facts["cpu_ns_per_op"]), **per_launch}


def launch_ns(gpu, bench, kernels, env) -> float:
    return launch_run(gpu, bench, kernels, env)["ns"]


def test_launch_overhead(benchmark, bench_gpu, driver_bench, shim, clients, kernels):
    """bare | alone with a share | alone with a memory quota | watch (another partition exists, idle) |
    gate (capped at 100%: turns)."""
    modes = {
        "bare": {},
        "alone": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_COMPUTE": "50%"},
        "memory": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "m", "FRACGPU_MEMORY": "1GiB"},
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
                results[mode].append(launch_run(bench_gpu, driver_bench, kernels, env))
            finally:
                if mode == "watch":
                    idle.kill()
                    idle.wait()
    benchmark.pedantic(launch_ns, args=(bench_gpu, driver_bench, kernels, modes["alone"]), rounds=1, iterations=1)
    bare = statistics.median(r["ns"] for r in results["bare"])
    bare_cpu = statistics.median(r["cpu_ns"] for r in results["bare"])
    for mode, runs in results.items():
        m = statistics.median(r["ns"] for r in runs)
        cpu = statistics.median(r["cpu_ns"] for r in runs)   # the launching thread's CPU: what load does not stretch
        calls = {what: statistics.median(r[what] for r in runs) for what in CALLS}
        benchmark.extra_info[f"{mode}_ns"] = m
        benchmark.extra_info[f"{mode}_ratio"] = m / bare
        benchmark.extra_info[f"{mode}_cpu_ns"] = cpu
        benchmark.extra_info.update({f"{mode}_{what}_per_launch": v for what, v in calls.items()})
        print(f"\nlaunch {mode}: {m:.0f} ns per launch, ratio {m / bare:.2f}, "
              f"CPU {cpu:.0f} ns (added {cpu - bare_cpu:+.0f}); per launch: "
              + ", ".join(f"{v:.3f} {what}" for what, v in calls.items()))


PAIR_LAUNCHES = 1_000_000   # long enough for the steady state (turns stop after 100 ms of an unsaturated device)


def pair_throughput(gpu, bench, kernels, envs) -> float:
    """Launches per second of two processes launching `fracgpu_spin(0)` back to back, started
    together: both processes' launches over the time from the first one's start to the last
    one's end."""
    start_ms = (time.monotonic() + 0.3) * 1000   # CLOCK_MONOTONIC, as driver_bench reads it
    procs = [gpu.popen(bench, "launch", PAIR_LAUNCHES, f"{start_ms:.3f}", env={"BENCH_MODULE": kernels, **env})
             for env in envs]
    facts = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        facts.append(parse_facts(out))
    begin = min(float(f["begin_ns"]) for f in facts)
    end = max(float(f["end_ns"]) for f in facts)
    return len(procs) * PAIR_LAUNCHES / (end - begin) * 1e9


def test_busy_pair(benchmark, bench_gpu, driver_bench, shim, kernels):
    """Two busy partitions of 50% each launching short kernels back to back, against the same two
    processes without fracgpu: their combined launch throughput, and its ratio (goal: >= 0.5)."""
    def env(name):
        return {"LD_PRELOAD": shim, "FRACGPU_PARTITION": name, "FRACGPU_COMPUTE": "50%"}

    modes = {"bare": [{}, {}], "fracgpu": [env("a"), env("b")]}
    results = {m: [] for m in modes}
    for _ in range(3):   # interleaved rounds
        for mode, envs in modes.items():
            results[mode].append(pair_throughput(bench_gpu, driver_bench, kernels, envs))
    benchmark.pedantic(pair_throughput, args=(bench_gpu, driver_bench, kernels, modes["fracgpu"]), rounds=1,
                       iterations=1)
    bare, shared = (statistics.median(results[m]) for m in modes)
    benchmark.extra_info.update(bare_launches_per_s=bare, fracgpu_launches_per_s=shared, ratio=shared / bare)
    print(f"\nbusy pair: bare {bare:.0f} launches/s, fracgpu {shared:.0f} launches/s, ratio {shared / bare:.2f}")


def test_event_cost(benchmark, bench_gpu, driver_bench):
    """cuEventRecord + cuEventQuery on the simulated driver: an event that keeps timing against a
    CU_EVENT_DISABLE_TIMING one (a real driver: 5.19 against 0.47 us, ICLDisco/parsec PR #576)."""
    def event_ns(op):
        return float(parse_facts(bench_gpu.run(driver_bench, op, EVENT_LOOPS).stdout)["ns_per_op"])

    results = {"event": [], "event-untimed": []}
    for _ in range(3):   # interleaved, so drift of the machine hits both alike
        for op in results:
            results[op].append(event_ns(op))
    benchmark.pedantic(event_ns, args=("event",), rounds=1, iterations=1)
    timed, untimed = (statistics.median(results[op]) for op in results)
    benchmark.extra_info.update(timed_ns=timed, untimed_ns=untimed, ratio=timed / untimed)
    print(f"\nevent record+query: timing {timed:.0f} ns, disable-timing {untimed:.0f} ns, ratio {timed / untimed:.1f}")


@pytest.mark.parametrize("count", [2, 4, 8])
def test_fairness(benchmark, make_gpu, clients, kernels, shim, count):
    """Largest error, in points of device time, of any partition in any 1 s window after the first;
    and the largest error of a partition's device time in the books against the kernels it ran."""
    gpu = make_gpu(memory=1 << 30)
    weights = list(range(1, count + 1))
    shares = {f"p{i}": w / sum(weights) for i, w in enumerate(weights)}
    seconds = 4

    def env(name, share):
        return {"LD_PRELOAD": shim, "FRACGPU_PARTITION": name, "FRACGPU_COMPUTE": f"{share:.4f}"}

    # A member that stays keeps each partition (and its books) after its busy job ends.
    keepers = [gpu.popen(clients.lcuda, "hold", 1, 60, env=env(name, s)) for name, s in shares.items()]
    try:
        for keeper in keepers:
            assert keeper.stdout.readline().startswith("holding")

        def run():
            start = (time.monotonic() + 0.5) * 1000
            jobs = {name: gpu.popen(clients.lcuda, "busy", seconds, 1, kernels, f"{start:.3f}", env=env(name, s))
                    for name, s in shares.items()}
            return {name: completions(job) for name, job in jobs.items()}

        points = benchmark.pedantic(run, rounds=1, iterations=1)
        device_ns = {p.name: p.device_ns for u in fracgpu.usage(str(gpu.state_dir)) for p in u.partitions}
    finally:
        for keeper in keepers:
            keeper.kill()
            keeper.wait(timeout=10)
    got = {name: windows(p, seconds) for name, p in points.items()}
    per_window = shares_of_device_time(got)
    error = max(abs(w[name] - shares[name]) for w, _ in per_window for name in shares)
    utilisation = min(u for _, u in per_window)
    ran = {name: p[-1][1] * 1_000_000 for name, p in points.items()}   # kernels completed x 1 ms
    books = max(abs(device_ns[name] - ran[name]) / ran[name] for name in shares)
    benchmark.extra_info.update(partitions=count, max_error_points=100 * error, min_utilisation=utilisation,
                                max_books_error_percent=100 * books)
    print(f"\nfairness x{count}: max error {100 * error:.2f} points, utilisation >= {100 * utilisation:.1f}%, "
          f"device time in the books within {100 * books:.1f}% of the kernels run")
