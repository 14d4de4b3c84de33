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

Before and after side by side: ``FRACGPU_BENCH_BEFORE=/path/to/python`` (the
interpreter of another fracgpu install, e.g. main's virtual environment) adds
``shim-before``, ``run-before`` and ``run-private-before`` to the same
interleaved rounds, and a ``before`` row to the lock waits. The two installs
share one state folder, so they must use the same state layout.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys

import pytest

from tests.support.simgpu import start_together

# Each round starts that many processes of every mode, interleaved, every other round in reverse order.
ROUNDS = {1: 5, 32: 2, 128: 2}


BEFORE = os.environ.get("FRACGPU_BENCH_BEFORE")   # another install's python, for before/after


@functools.cache
def before_shim() -> str:
    return subprocess.run([BEFORE, "-c", "from fracgpu.shim import shim_path; print(shim_path())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def modes(bench_gpu, driver_bench, shim, processes):
    job = [driver_bench, "startup", "1"]
    installs = {"": (sys.executable, shim)}
    if BEFORE:
        installs["-before"] = (BEFORE, before_shim())
    out = {"bare": (job, {})}
    for suffix, (python, library) in installs.items():
        fracgpu = [python, "-m", "fracgpu"]
        out["shim" + suffix] = (job, {"LD_PRELOAD": library, "FRACGPU_PARTITION": "bench"})
        out["run" + suffix] = ([*fracgpu, "run", "--partition", "bench", "--", *job], {})
        if processes == 1:
            out["run-private" + suffix] = ([*fracgpu, "run", "--memory", "1GiB", "--", *job], {})
    if processes == 1:
        out["python"] = ([sys.executable, "-c", "import time; print('first_alloc_ns', time.monotonic_ns())"], {})
    return out


@pytest.mark.parametrize("processes", list(ROUNDS))
def test_startup(benchmark, bench_gpu, driver_bench, shim, processes):
    bench_gpu.fracgpu("partition", "create", "bench")
    runs = modes(bench_gpu, driver_bench, shim, processes)
    ms: dict[str, list[float]] = {mode: [] for mode in runs}
    for i in range(ROUNDS[processes]):   # interleaved, so drift of the machine hits every mode alike
        for mode, (argv, env) in list(runs.items())[:: -1 if i % 2 else 1]:
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
        print(f"  {mode:18s} median {f['median_ms']:9.2f}  max {f['max_ms']:9.2f}  added {f['added_ms']:+9.2f}")


@pytest.mark.parametrize("processes", [32, 128])
def test_lock_waits_at_startup(benchmark, bench_gpu, clients, shim, processes):
    """What processes starting together waited for each other's locks, as each one's slot keeps it: the
    region lock at the join (``join_wait_ns``) and the GPU's context-measurement lock (``measure_wait_ns``:
    held shared where the device lists the process, exclusively for the fallback measurement)."""
    from fracgpu import state

    bench_gpu.fracgpu("partition", "create", "bench")
    libraries = {"": shim, **({"-before": before_shim()} if BEFORE else {})}

    def start(library):
        env = {**bench_gpu.env, "LD_PRELOAD": library, "FRACGPU_PARTITION": "bench"}
        procs = [subprocess.Popen([str(clients.lcuda), "hold", "1", "60"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(processes)]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "holding 1", p.stderr.read()
            (region,) = state.open_regions(bench_gpu.state_dir)
            slots = {s.pid: s for s in region.processes()}
            return [(slots[p.pid].join_wait_ns / 1e6, slots[p.pid].measure_wait_ns / 1e6) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()

    waits = {suffix: start(library) for suffix, library in libraries.items() if suffix}
    waits[""] = benchmark.pedantic(start, args=(shim,), rounds=1, iterations=1)
    print(f"\nlock waits, {processes} processes starting at once (ms)")
    for suffix in libraries:
        figures = {}
        for i, lock in enumerate(("join", "measure")):
            ms = sorted(w[i] for w in waits[suffix])
            figures[lock + suffix] = {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms))],
                                      "max_ms": ms[-1]}
        benchmark.extra_info.update(processes=processes, **figures)
        for lock, f in figures.items():
            print(f"  {lock:15s} median {f['median_ms']:9.3f}  p90 {f['p90_ms']:9.3f}  max {f['max_ms']:9.3f}")
