"""Quotas under load: 16 processes in 4 partitions allocating and freeing at
random (every allocation path a Python job reaches through ctypes: plain,
pitched, managed, stream-ordered) for a few seconds. No partition is ever
above its limit (its peak, kept atomically by the shim, says so), every
process ends normally, and when they are gone every partition is back to 0.
The same holds for processes that map, unmap and release through VMM.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.shim.test_vmm import CTYPES_VMM_PRELUDE
from tests.support.simgpu import CTYPES_PRELUDE, MiB

pytestmark = pytest.mark.slow

# A churn script's argv: seed, seconds, and optionally "wait": with its context made, wait for a line on stdin
# before the churn (a context is inside the quota: one made after the others filled the partition would be refused).
WAIT = """
import sys
if sys.argv[3:] == ["wait"]:
    print("ready", flush=True)
    sys.stdin.readline()
"""


def says(p, line: str) -> None:
    """Waits for process `p`'s next line, which must be `line` (its stderr if it ended instead)."""
    assert p.stdout.readline().strip() == line, p.stderr.read() if p.poll() is not None else ""


def churn_together(procs):
    """Waits until every churn process has made its context, then starts them all."""
    for p in procs:
        says(p, "ready")
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()


def churned(gpu, procs, limits: dict[str, int]) -> tuple[int, int]:
    """Starts the churn processes together and waits for them: afterwards each partition has nothing
    left on its books, its peak was never above its limit (MiB), and the limit was really pressed.
    Returns the operations done and refused, in all."""
    churn_together(procs)   # every context is made, then they churn together
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
    return ops, refused


CHURN = CTYPES_PRELUDE + WAIT + """
import random, sys, time
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
    ops, refused = churned(gpu, procs, limits)
    assert ops > 1000 and refused > 0


# VMM churn: handles created and mapped, released while mapped (the samples'
# pattern) or held, retained and released by address, unmapped, at random.
VMM_CHURN = CTYPES_VMM_PRELUDE + WAIT + """
import random, sys, time
u64, sz = ctypes.c_uint64, ctypes.c_size_t
rng = random.Random(int(sys.argv[1]))
live, ops, refused = [], 0, 0      # [handle, address, size, mapped, held]
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if live and rng.random() < 0.45:
        e = live[rng.randrange(len(live))]
        h, va, size, mapped, held = e
        if mapped and (not held or rng.random() < 0.4):
            if rng.random() < 0.3:        # a library's reference: retain, then release it
                h2 = u64()
                assert cuda.cuMemRetainAllocationHandle(ctypes.byref(h2), ctypes.c_void_p(va)) == 0
                assert cuda.cuMemRelease(h2) == 0
            else:
                assert cuda.cuMemUnmap(u64(va), sz(size)) == 0
                assert cuda.cuMemAddressFree(u64(va), sz(size)) == 0
                e[3] = False
        else:
            assert cuda.cuMemRelease(u64(h)) == 0
            e[4] = False
        if not e[3] and not e[4]:
            live.remove(e)
    else:
        size = rng.choice([2, 4, 8, 16]) << 20
        h, va = u64(), u64()
        rc = cuda.cuMemCreate(ctypes.byref(h), sz(size), ctypes.byref(prop), ctypes.c_ulonglong(0))
        if rc == 0:
            assert cuda.cuMemAddressReserve(ctypes.byref(va), sz(size), sz(0), u64(0), ctypes.c_ulonglong(0)) == 0
            assert cuda.cuMemMap(va, sz(size), sz(0), h, ctypes.c_ulonglong(0)) == 0
            held = rng.random() < 0.5
            if not held:
                assert cuda.cuMemRelease(h) == 0
            live.append([h.value, va.value, size, True, held])
        else:
            assert rc == 2, rc        # only ever CUDA_ERROR_OUT_OF_MEMORY
            refused += 1
    ops += 1
print(ops, refused)
"""

# The device's own figure, sampled outside any partition until SIGTERM: the most it ever held. It says "sampling"
# once its own context is made, so that no job measures its context while the sampler's is being made.
DEVICE_USE = CTYPES_PRELUDE + """
import signal, time
free, total, most, stop = ctypes.c_size_t(), ctypes.c_size_t(), 0, []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
print("sampling", flush=True)
while not stop:
    assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    most = max(most, total.value - free.value)
    time.sleep(0.001)
print(most)
"""


def test_processes_mapping_unmapping_and_releasing_through_vmm_never_pass_their_limits(gpu):
    limits = {"a": 48, "b": 80}   # MiB
    for name, mib in limits.items():
        gpu.fracgpu("partition", "create", name, "--memory", f"{mib}MiB")
    device = gpu.popen(sys.executable, "-c", DEVICE_USE)
    says(device, "sampling")
    procs = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", name, "--",
                       sys.executable, "-c", VMM_CHURN, str(seed), "2", "wait")
             for seed, name in enumerate(n for n in limits for _ in range(3))]
    ops, refused = churned(gpu, procs, limits)
    assert ops > 500 and refused > 0
    device.terminate()   # it has sampled the whole churn, however slowly the jobs started
    out, err = device.communicate(timeout=60)
    assert device.returncode == 0, err
    # What the device really held, mapped memory and the partitions' contexts included, beside the sampler's own
    # context (outside any partition).
    assert 0 < int(out) <= sum(limits.values()) * MiB + gpu.context
