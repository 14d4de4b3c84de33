"""Processes killed with SIGKILL at random moments (starting up, joining the
partition under the state lock, allocating and freeing), either the job itself
or the `fracgpu run` recording it: nothing deadlocks, the partition's books
come back to the truth within a second, and the ledger keeps every job."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time

import pytest

from tests.shim.test_quota_stress import CHURN
from tests.support.simgpu import MiB, alloc_job, command_pid

pytestmark = pytest.mark.slow


def start_together(members):
    try:
        if all(m.stdout.readline().strip() == "ready" for m in members):
            for m in members:
                m.stdin.write("\n")
                m.stdin.flush()
    except (OSError, ValueError):   # one was killed first
        pass


@pytest.mark.fault('SIGKILL of a job, or of its `fracgpu run`, at random moments (startup, under the state lock, allocating), 32 times',
                   "no deadlock; the partition's books are back to 0 within 1 s; every job is in the ledger, ended, exit -9")
def test_random_sigkills_leave_no_lock_held_and_no_memory_on_the_books(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    rng = random.Random(7)
    kills = 0
    for i in range(16):
        # Two members, so a kill often lands while the other holds the lock or allocates.
        members = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--name", f"j{i}-{k}",
                             "--", sys.executable, "-c", CHURN, str(i * 2 + k), "30", "wait") for k in range(2)]
        # Both contexts made, they churn together (a context made after the other filled the partition
        # would be refused: it is inside the quota). Meanwhile the kill may land in the start-up.
        threading.Thread(target=start_together, args=(members,), daemon=True).start()
        commands = [command_pid(m) for m in members]   # started: from here on each is a job
        time.sleep(rng.uniform(0.0, 0.6))
        for m, command in zip(members, commands):
            if i % 2:
                m.send_signal(signal.SIGKILL)            # fracgpu run: its command dies with it
            else:
                os.kill(command, signal.SIGKILL)         # the command: fracgpu run records it
            m.wait(timeout=10)
            kills += 1
        killed = time.monotonic()
        while True:   # never blocks, and the books are true again within a second
            usage = json.loads(gpu.fracgpu("partition", "list", "--json", timeout=10).stdout)
            (team,) = [p for u in usage for p in u["partitions"] if p["name"] == "team"]
            if (team["used"], team["processes"]) == (0, 0) or time.monotonic() - killed > 1.0:
                break
            time.sleep(0.02)
        assert team["used"] == 0 and team["processes"] == 0, (i, team)
        assert team["peak"] <= 256 << 20
    jobs = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    assert sorted(j["job"] for j in jobs) == sorted(f"j{i}-{k}" for i in range(16) for k in range(2))
    assert all(j["end"] is not None and j["exit_status"] == -signal.SIGKILL for j in jobs), jobs
    print(f"\nfaults: {kills} SIGKILLs, {len(jobs)} jobs in the ledger, 0 invariant violations")
    # And the partition still works: a new member gets all of it, but what its own context holds.
    out = gpu.python("import fracgpu\nfracgpu.init(partition='team')\n" + alloc_job((256 * MiB - gpu.context) // MiB)).stdout
    assert out.strip() == "0"
    assert kills == 32
