"""Reliability under load: 32 processes on one simulated GPU in 4 partitions,
allocating, freeing and launching at random for a bounded time.

Invariants checked (`violations`):
- while they run, no partition is ever above its limit (sampled), and its
  peak (kept atomically by the shim) never passes it;
- when every process has stopped and reports what it holds, each partition's
  books equal the sum of what its live processes really hold;
- after they exit, every partition's books are back to 0 with no process;
- no process hangs (each has a deadline), and the ledger has every job.

`test_a_planted_leak_is_caught` shows the check is not vacuous: a process
that frees memory behind the shim's back leaves bytes on the books that no
process holds, and `violations` names them.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.support.simgpu import CTYPES_PRELUDE, MiB, command_pid

pytestmark = pytest.mark.slow

# argv: seed, seconds, kernel module, and "leak" to free one block behind the shim's back.
# Prints "ready" with its context made and waits for a line on stdin (every context is made before
# any partition fills: a context is inside the quota). Prints "holding BYTES" when done, waits for a line on stdin, then frees half of
# what it holds (the rest goes with the process) and prints its counts.
WORKER = CTYPES_PRELUDE + r"""
import os, random, sys, time
def ok(rc, *allowed):
    assert rc == 0 or rc in allowed, rc
    return rc
module, spin = ctypes.c_void_p(), ctypes.c_void_p()
ok(cuda.cuModuleLoad(ctypes.byref(module), sys.argv[3].encode()))
ok(cuda.cuModuleGetFunction(ctypes.byref(spin), module, b"fracgpu_spin"))
stream = ctypes.c_void_p()
ok(cuda.cuStreamCreate(ctypes.byref(stream), 0))
print("ready", flush=True)
sys.stdin.readline()
rng = random.Random(int(sys.argv[1]))
held, ops, refused, launches = [], 0, 0, 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    r = rng.random()
    if held and r < 0.35:
        kind, p, size = held.pop(rng.randrange(len(held)))
        ok(cuda.cuMemFreeAsync(ctypes.c_uint64(p), stream) if kind == "async" else cuda.cuMemFree_v2(ctypes.c_uint64(p)))
    elif r < 0.7:
        size = rng.choice([1, 3, 8, 17]) << 20
        p = ctypes.c_uint64()
        kind = rng.choice(["plain", "managed", "async"])
        if kind == "plain":
            rc = cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size))
        elif kind == "managed":
            rc = cuda.cuMemAllocManaged(ctypes.byref(p), ctypes.c_size_t(size), ctypes.c_uint(1))
        else:
            rc = cuda.cuMemAllocAsync(ctypes.byref(p), ctypes.c_size_t(size), stream)
        if ok(rc, 2) == 0:      # 2: CUDA_ERROR_OUT_OF_MEMORY, the only failure allowed
            held.append((kind, p.value, size))
        else:
            refused += 1
    else:
        ns = ctypes.c_uint64(rng.randrange(0, 200_000))
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
        ok(cuda.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args, None))
        launches += 1
        if rng.random() < 0.2:
            ok(cuda.cuStreamSynchronize(stream))
    ops += 1
ok(cuda.cuStreamSynchronize(stream))
if len(sys.argv) > 4 and sys.argv[4] == "leak":
    # Free a block through the real driver: the shim never sees it, so its bytes stay on the books.
    p = ctypes.c_uint64()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(2 << 20)))
    real = ctypes.CDLL(os.environ["FRACGPU_REAL_LIBCUDA"])
    ok(real.cuMemFree_v2(p))
print("holding", sum(size for _, _, size in held), flush=True)
sys.stdin.readline()
for kind, p, size in held[: len(held) // 2]:
    ok(cuda.cuMemFree_v2(ctypes.c_uint64(p)) if kind != "async" else cuda.cuMemFreeAsync(ctypes.c_uint64(p), stream))
ok(cuda.cuStreamSynchronize(stream))
print(ops, refused, launches, flush=True)
"""

LIMITS = {"a": 64, "b": 96, "c": 128, "d": 160}   # MiB, 448 of the GPU's 1 GiB


def books(gpu) -> dict[str, dict]:
    usage = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
    return {p["name"]: p for u in usage for p in u["partitions"]}


def violations(parts: dict[str, dict], holding: dict[str, int], limits: dict[str, int]) -> list[str]:
    """What is wrong with the books `parts` (partition list --json) of partitions whose live
    processes hold `holding` bytes (by partition name) under `limits` (MiB)."""
    out = []
    for name, mib in limits.items():
        p = parts.get(name)
        if p is None:
            out.append(f"partition {name} is gone")
            continue
        if p["used"] > mib * MiB or p["peak"] > mib * MiB:
            out.append(f"partition {name} above its limit: used {p['used']}, peak {p['peak']}, limit {mib * MiB}")
        if p["used"] != holding.get(name, 0):
            out.append(f"partition {name} has {p['used']} bytes on its books, its processes hold "
                       f"{holding.get(name, 0)}")
    return out


def start_workers(gpu, kernels, count: int, seconds: float, leak_in: str | None = None):
    names = [name for name in LIMITS for _ in range(count // len(LIMITS))]
    procs = []
    for seed, name in enumerate(names):
        extra = ["leak"] if leak_in == name and seed % (count // len(LIMITS)) == 0 else []
        procs.append((name, gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", name, "--name",
                                      f"worker-{seed}", "--", sys.executable, "-c", WORKER, str(seed), str(seconds),
                                      kernels, *extra)))
    return procs


def stacks(pid: int) -> str:
    """Every thread's native stack in process ``pid`` (gdb's backtraces), or why there are none: what a
    report of a hung worker needs."""
    if not shutil.which("gdb"):
        return "(no gdb to read its stacks)"
    result = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 20"], capture_output=True,
                            text=True, timeout=60)
    return "\n".join(line for line in result.stdout.splitlines() if line.startswith(("#", "Thread")))


def run_workers(gpu, kernels, count: int, seconds: float, leak_in: str | None = None):
    for name, mib in LIMITS.items():
        gpu.fracgpu("partition", "create", name, "--memory", f"{mib}MiB")
    over: list[str] = []
    stop = threading.Event()

    def monitor():   # sampled while they run: never above a limit
        while not stop.is_set():
            for name, p in books(gpu).items():
                if p["used"] > LIMITS[name] * MiB:
                    over.append(f"{name}: {p['used']}")
            time.sleep(0.05)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    procs = start_workers(gpu, kernels, count, seconds, leak_in)
    deadline = time.monotonic() + 90
    for _, p in procs:   # every context made; then they all start together
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = p.stdout.readline() if ready else ""
        if line.strip() != "ready":
            for _, q in procs:
                q.kill()
            raise AssertionError(f"a worker did not start (pid {p.pid}): {line!r}")
    for _, p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    holding: dict[str, int] = {}
    deadline = time.monotonic() + seconds + 90
    for name, p in procs:
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            where = stacks(command_pid(p, timeout=1))
            for _, q in procs:
                q.kill()
            raise AssertionError(f"a worker hung (pid {p.pid}); the partitions then: {books(gpu)}; where it was:\n"
                                 f"{where}")
        line = p.stdout.readline()
        assert line.startswith("holding "), (line, p.poll(), p.stderr.read() if p.poll() is not None else "")
        # What it allocated, and its context: both on its partition's books.
        holding[name] = holding.get(name, 0) + int(line.split()[1]) + gpu.context
    stop.set()
    watcher.join()
    live = books(gpu)
    return procs, holding, live, over


def finish(procs):
    totals = [0, 0, 0]
    for _, p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for _, p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        for i, n in enumerate(map(int, out.split())):
            totals[i] += n
    return totals


@pytest.mark.fault('32 processes in 4 partitions allocating, freeing and launching at random for 3 s',
                   'no limit ever passed; books equal what the live processes hold, 0 after exit; no hang; 32 jobs in the ledger')
def test_thirty_two_processes_in_four_partitions_keep_the_books_true(gpu, kernels):
    procs, holding, live, over = run_workers(gpu, kernels, 32, 3.0)
    assert not over, over
    assert violations(live, holding, LIMITS) == []
    assert all(live[name]["processes"] == 8 for name in LIMITS)
    ops, refused, launches = finish(procs)
    after = books(gpu)
    assert violations(after, {}, LIMITS) == []                         # all back to 0
    assert all(after[name]["processes"] == 0 for name in LIMITS)
    assert all(after[name]["oom_refusals"] > 0 for name in LIMITS)     # the limits were really pressed
    assert all(after[name]["device_ns"] > 0 for name in LIMITS)
    assert ops > 2000 and refused > 0 and launches > 500
    jobs = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    assert sorted(j["job"] for j in jobs) == sorted(f"worker-{i}" for i in range(32))
    assert all(j["exit_status"] == 0 and j["end"] and j["launches"] > 0 for j in jobs)
    print(f"\nstress: 32 processes, {ops} operations ({refused} refused at a limit), {launches} launches, "
          "0 invariant violations")


@pytest.mark.fault("A planted leak: memory freed behind the shim's back",
                   'the books check names the partition and the bytes no process holds')
def test_a_planted_leak_is_caught(gpu, kernels):
    procs, holding, live, over = run_workers(gpu, kernels, 4, 0.5, leak_in="c")
    found = violations(live, holding, LIMITS)
    assert found == [f"partition c has {holding['c'] + (2 << 20)} bytes on its books, its processes hold "
                     f"{holding['c']}"], found
    finish(procs)
