"""Start-up at scale: from exec to a process's first allocation, with 1, 32
and 128 processes joining one partition at once, side by side with the bare
driver.

Each process is ``driver_bench startup`` (cuInit, its primary context, one
1 MiB ``cuMemAlloc_v2``); the time is taken from just before its start to the
return of that allocation, in every process on the same clock. Modes:

- ``bare``: the simulated driver alone;
- ``shim``: the shim by ``LD_PRELOAD``, joining partition ``bench`` (what a
  process started by any launcher that sets the variables pays);
- ``run``: ``fracgpu run --partition bench -- driver_bench startup``, its
  command line and supervisor included;
- ``run-private`` (1 process): ``fracgpu run --memory 1GiB``, which also asks
  the driver what the job sees (in a child process) to check that the limit fits;
- ``python`` (1 process): an interpreter that prints the clock and exits, the
  floor under any Python command on this machine.

Figures are per process, median and largest, in milliseconds; the
differences to ``bare`` are what fracgpu adds.
"""

from __future__ import annotations

import statistics
import sys

import pytest

from tests.support.simgpu import start_together

ROUNDS = {1: 5, 32: 1, 128: 1}   # each round starts that many processes of every mode, interleaved


def modes(bench_gpu, driver_bench, shim, processes):
    job = [driver_bench, "startup", "1"]
    fracgpu = [sys.executable, "-m", "fracgpu"]
    out = {"bare": (job, {}),
           "shim": (job, {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "bench"}),
           "run": ([*fracgpu, "run", "--partition", "bench", "--", *job], {})}
    if processes == 1:
        out["run-private"] = ([*fracgpu, "run", "--memory", "1GiB", "--", *job], {})
        out["python"] = ([sys.executable, "-c", "import time; print('first_alloc_ns', time.monotonic_ns())"], {})
    return out


@pytest.mark.parametrize("processes", list(ROUNDS))
def test_startup(benchmark, bench_gpu, driver_bench, shim, processes):
    bench_gpu.fracgpu("partition", "create", "bench")
    runs = modes(bench_gpu, driver_bench, shim, processes)
    ms: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(ROUNDS[processes]):   # interleaved, so drift of the machine hits every mode alike
        for mode, (argv, env) in runs.items():
            ms[mode] += start_together(argv, processes, {**bench_gpu.env, **env})
    argv, env = runs["run"]
    benchmark.pedantic(start_together, args=(argv, processes, {**bench_gpu.env, **env}), rounds=1, iterations=1)
    figures = {mode: {"median_ms": statistics.median(v), "max_ms": max(v)} for mode, v in ms.items()}
    bare = figures["bare"]["median_ms"]
    for mode, f in figures.items():
        f["added_ms"] = f["median_ms"] - bare
    benchmark.extra_info.update(processes=processes, **figures)
    print(f"\nstart-up, {processes} process(es) at once: exec to first allocation, per process (ms)")
    for mode, f in figures.items():
        print(f"  {mode:12s} median {f['median_ms']:9.2f}  max {f['max_ms']:9.2f}  added {f['added_ms']:+9.2f}")
