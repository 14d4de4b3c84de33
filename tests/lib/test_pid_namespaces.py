"""Processes of several pid namespaces (containers) in one region: their pids collide, so a
process judges and reaps only the slots of its own namespace; the host's pid namespace maps the
others through /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from fracgpu import state
from tests.support.simgpu import MiB, parse_facts


def in_new_pid_namespace(gpu, shim, client, *args) -> subprocess.Popen:
    """``client`` as pid 1 of a new pid namespace (its own /proc, as in a container), in partition team."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a new pid namespace needs root and unshare(1) (util-linux)")
    if state.pid_namespace() != state.INITIAL_PID_NAMESPACE:
        pytest.skip("these tests run in the host's pid namespace, which sees every process")
    return gpu.popen("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", client, *args,
                     env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": "team"})


def region_of(gpu) -> state.Region:
    (region,) = state.open_regions(str(gpu.state_dir), reap=False)
    return region


@pytest.mark.fault("A process in another pid namespace (a container) whose pid is a live process's pid here",
                   "its slot is kept: only its own namespace, or the host's scan of /proc, judges it")
def test_slots_of_another_pid_namespace_are_judged_by_what_the_host_sees(gpu, shim, clients):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    holder = in_new_pid_namespace(gpu, shim, clients.lcuda, "hold", 64, 60)
    try:
        assert holder.stdout.readline().strip() == "holding 64"
        region = region_of(gpu)
        (slot,) = region.processes()
        # It joined as pid 1 of its namespace: here pid 1 is init, alive, another process.
        assert slot.pid == 1 and slot.pid_ns not in (0, state.pid_namespace())
        host_pid = state.host_pid_of(slot.pid_ns, slot.pid, slot.start_time)
        assert host_pid > 1 and state.namespace_pid(host_pid) == (slot.pid_ns, 1)
        assert region.reap() == 0 and region.reap_all_namespaces() == 0   # alive: kept
        os.kill(host_pid, signal.SIGKILL)
        holder.wait(timeout=10)
        # Dead, but a reap of this namespace cannot tell (pid 1 here is init): kept, until the
        # host's scan finds no process that is it, and gives its memory back.
        assert region.reap() == 0 and [p.pid for p in region.processes()] == [1]
        assert region.reap_all_namespaces() == 1
        assert region.processes() == []
        (team,) = [p for p in region.usage().partitions if p.name == "team"]
        assert team.used == 0
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_two_namespaces_with_the_same_pids_share_one_partition(gpu, shim, clients):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    holders = [in_new_pid_namespace(gpu, shim, clients.lcuda, "hold", 64, 60) for _ in range(2)]
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "holding 64"
        slots = region_of(gpu).processes()
        assert [s.pid for s in slots] == [1, 1] and len({s.pid_ns for s in slots}) == 2
        (team,) = [p for p in region_of(gpu).usage().partitions if p.name == "team"]
        assert team.used >= 2 * 64 * MiB and team.processes == 2
        # The simulated device holds both too: neither pid 1 took the other's memory for a dead process's.
        facts = parse_facts(gpu.run(clients.lcuda, "info").stdout)   # off the shim: the device as it is
        held = int(facts["meminfo_total"]) - int(facts["meminfo_free"]) - gpu.context   # less its own context
        assert held == 2 * (64 * MiB + gpu.context)
    finally:
        for h in holders:
            h.kill()
            h.wait(timeout=10)
    deadline = time.monotonic() + 5
    while region_of(gpu).processes() and time.monotonic() < deadline:
        region_of(gpu).reap_all_namespaces()
        time.sleep(0.05)
    assert region_of(gpu).processes() == []
