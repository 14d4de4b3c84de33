"""`fracgpu partition set`: a running job's partition changes under it."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys

from tests.support.simgpu import MiB, command_pid, wait_gone

# Allocates N MiB for each line "N" it reads, answering the CUresult.
STEPPER = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
cuda.cuCtxSetCurrent(ctx)
print("ready", flush=True)
for line in sys.stdin:
    p = ctypes.c_uint64()
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    rc = cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(int(line) << 20))
    cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t))
    print(rc, t.value, flush=True)
"""


def ask(job, mib):
    job.stdin.write(f"{mib}\n")
    job.stdin.flush()
    rc, total = job.stdout.readline().split()
    return int(rc), int(total)


def test_raising_a_running_partitions_limit_lets_its_next_allocation_through(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", sys.executable, "-c",
                    STEPPER, stdin=subprocess.PIPE)
    try:
        assert job.stdout.readline().strip() == "ready"
        assert ask(job, 200) == (0, 256 * MiB)
        assert ask(job, 100) == (2, 256 * MiB)          # over the old limit: CUDA_ERROR_OUT_OF_MEMORY
        out = gpu.fracgpu("partition", "set", "team", "--memory", "512MiB", "--compute", "40%").stdout
        assert "512MiB, 40% of compute" in out
        assert ask(job, 100) == (0, 512 * MiB)          # the same process, its next allocation
        # Lowering below what it holds: refused until use falls, and the CLI says so.
        result = gpu.fracgpu("partition", "set", "team", "--memory", "128MiB")
        assert "above the new limit" in result.stderr
        assert ask(job, 1) == (2, 128 * MiB)
        command = command_pid(job)
    finally:
        job.kill()
        job.wait(timeout=10)
    wait_gone(command)   # the kernel kills it as its fracgpu run dies
    (team,) = [p for u in json.loads(gpu.fracgpu("partition", "list", "--json").stdout) for p in u["partitions"]]
    assert team["memory_limit"] == 128 * MiB and team["compute_share"] == 0.4 and team["used"] == 0


@pytest.mark.fault('`partition set` with bad or impossible values',
                   'refused with a message; the partition unchanged')
def test_bad_changes_are_refused(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    for args, message in ((["team"], "nothing to change"),
                          (["team", "--memory", "2GiB"], "above"),
                          (["team", "--cap"], "needs a compute share"),
                          (["nosuch", "--memory", "1GiB"], "no partition 'nosuch'"),
                          (["team", "--memory", "1GiB", "--unlimited"], "not both")):
        result = gpu.fracgpu("partition", "set", *args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
