"""What the shim adds to driver calls, as a ratio against the bare driver,
with 1 and with 8 processes at once (8 share one partition, so they contend on
its counter exactly as a multi-process job does)."""

from __future__ import annotations

import statistics
import time

import pytest

from tests.support.simgpu import parse_facts

# Calls per process; divided among the processes when 8 run at once (on 2 cores
# they take turns anyway), so every case takes about the same time.
ITERATIONS = {"alloc-free": 20_000, "passthrough": 200_000, "meminfo": 20_000, "vmm": 20_000, "set-limit": 20_000}


def run_bench(gpu, bench, op, processes, env):
    start = (time.monotonic() + 0.3) * 1000
    procs = [gpu.popen(bench, op, ITERATIONS[op] // processes, f"{start:.3f}", env=env) for _ in range(processes)]
    per_op, cpu = [], []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        facts = parse_facts(out)
        per_op.append(float(facts["ns_per_op"]))
        cpu.append(float(facts["cpu_ns_per_op"]))
    return statistics.median(per_op), statistics.median(cpu)


@pytest.mark.parametrize("processes", [1, 8])
@pytest.mark.parametrize("op", list(ITERATIONS))
def test_shim_overhead(benchmark, bench_gpu, driver_bench, shim, op, processes):
    quota = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "bench", "FRACGPU_MEMORY": "32GiB"}
    bare, shimmed = [], []
    for _ in range(3):   # interleaved, so drift of the machine hits both alike
        bare.append(run_bench(bench_gpu, driver_bench, op, processes, {}))
        shimmed.append(run_bench(bench_gpu, driver_bench, op, processes, quota))
    benchmark.pedantic(run_bench, args=(bench_gpu, driver_bench, op, processes, quota), rounds=1, iterations=1)
    b, s = statistics.median(r[0] for r in bare), statistics.median(r[0] for r in shimmed)
    # The calling threads' CPU time: what the shim adds, which a loaded machine does not stretch.
    bc, sc = statistics.median(r[1] for r in bare), statistics.median(r[1] for r in shimmed)
    benchmark.extra_info.update(bare_ns=b, shim_ns=s, ratio=s / b, added_ns=s - b, bare_cpu_ns=bc, shim_cpu_ns=sc,
                                added_cpu_ns=sc - bc)
    print(f"\n{op} x{processes}: bare {b:.0f} ns, shim {s:.0f} ns, ratio {s / b:.2f}, added {s - b:.0f} ns; "
          f"CPU: bare {bc:.1f} ns, shim {sc:.1f} ns, added {sc - bc:+.1f} ns")
