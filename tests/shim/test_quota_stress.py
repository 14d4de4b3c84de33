"""Quotas under load: 16 processes in 4 partitions allocating and freeing at
random (every allocation path a Python job reaches through ctypes: plain,
pitched, managed, stream-ordered) for a few seconds. No partition is ever
above its limit (its peak, kept atomically by the shim, says so), every
process ends normally, and when they are gone every partition is back to 0.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.simgpu import CTYPES_PRELUDE, MiB

pytestmark = pytest.mark.slow

# argv: seed, seconds, and optionally "wait": with its context made, wait for a line on stdin before the churn
# (a context is inside the quota: one made after the others filled the partition would be refused).
CHURN = CTYPES_PRELUDE + """
import random, sys, time
if sys.argv[3:] == ["wait"]:
    print("ready", flush=True)
    sys.stdin.readline()
rng = random.Random(int(sys.argv[1]))
held, ops, refused = [], 0, 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if held and rng.random() < 0.45:
        kind, p = held.pop(rng.randrange(len(held)))
        p = ctypes.c_uint64(p)
        rc = cuda.cuMemFreeAsync(p, None) if kind == "async" else cuda.cuMemFree_v2(p)
        assert rc == 0, rc
    else:
        size = rng.choice([1, 3, 8, 17]) << 20
        p, pitch = ctypes.c_uint64(), ctypes.c_size_t()
        kind = rng.choice(["plain", "pitch", "managed", "async"])
        if kind == "plain":
            rc = cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size))
        elif kind == "pitch":
            rc = cuda.cuMemAllocPitch_v2(ctypes.byref(p), ctypes.byref(pitch), ctypes.c_size_t(size // 64),
                                         ctypes.c_size_t(64), ctypes.c_uint(4))
        elif kind == "managed":
            rc = cuda.cuMemAllocManaged(ctypes.byref(p), ctypes.c_size_t(size), ctypes.c_uint(1))
        else:
            rc = cuda.cuMemAllocAsync(ctypes.byref(p), ctypes.c_size_t(size), None)
        if rc == 0:
            held.append((kind, p.value))
        else:
            assert rc == 2, rc        # only ever CUDA_ERROR_OUT_OF_MEMORY
            refused += 1
    ops += 1
print(ops, refused)
"""


def test_sixteen_processes_in_four_partitions_never_pass_their_limits(gpu):
    limits = {"a": 64, "b": 96, "c": 128, "d": 160}   # MiB, 448 of the GPU's 1 GiB
    for name, mib in limits.items():
        gpu.fracgpu("partition", "create", name, "--memory", f"{mib}MiB")
    procs = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", name, "--",
                       sys.executable, "-c", CHURN, str(seed), "3", "wait")
             for seed, name in enumerate(n for n in limits for _ in range(4))]
    for p in procs:   # every context is made, then they churn together
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.poll() is not None else ""
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    ops = refused = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        done, no = map(int, out.split())
        ops, refused = ops + done, refused + no
    usage = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
    parts = {p["name"]: p for u in usage for p in u["partitions"]}
    for name, mib in limits.items():
        assert parts[name]["used"] == 0, parts[name]                 # nothing left on the books
        assert 0 < parts[name]["peak"] <= mib * MiB, parts[name]     # never above the limit
        assert parts[name]["oom_refusals"] > 0                        # and the limits were really pressed
    assert ops > 1000 and refused > 0
