"""Processes killed with SIGKILL at random moments (starting up, joining the
partition under the state lock, allocating and freeing): nothing deadlocks,
and the partition's books come back to the truth within a second."""

from __future__ import annotations

import json
import random
import signal
import sys
import time

import pytest

from test_quota_stress import CHURN

pytestmark = pytest.mark.slow


def test_random_sigkills_leave_no_lock_held_and_no_memory_on_the_books(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    rng = random.Random(7)
    kills = 0
    for i in range(12):
        # Two members, so a kill often lands while the other holds the lock or allocates.
        members = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                             sys.executable, "-c", CHURN, str(i * 2 + k), "30") for k in range(2)]
        time.sleep(rng.uniform(0.05, 0.8))
        for m in members:
            m.send_signal(signal.SIGKILL)
            m.wait(timeout=10)
            kills += 1
        killed = time.monotonic()
        usage = json.loads(gpu.fracgpu("partition", "list", "--json", timeout=10).stdout)   # never blocks
        (team,) = [p for u in usage for p in u["partitions"] if p["name"] == "team"]
        assert team["used"] == 0 and team["processes"] == 0, (i, team)
        assert time.monotonic() - killed < 5
        assert team["peak"] <= 256 << 20
    # And the partition still works: a new member gets all of it.
    out = gpu.python("import ctypes, fracgpu\nfracgpu.init(partition='team')\n"
                     "c = ctypes.CDLL('libcuda.so.1'); assert c.cuInit(0) == 0\n"
                     "d, x = ctypes.c_int(), ctypes.c_void_p(); c.cuDeviceGet(ctypes.byref(d), 0)\n"
                     "c.cuDevicePrimaryCtxRetain(ctypes.byref(x), d); c.cuCtxSetCurrent(x)\n"
                     "p = ctypes.c_uint64()\n"
                     "print(c.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(256 << 20)))").stdout
    assert out.strip() == "0"
    assert kills == 24
