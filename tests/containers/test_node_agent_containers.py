"""`fracgpu node` with real containers (podman and runc, CDI devices from `fracgpu cdi generate`)
on the simulated GPU: what a container's process allocates behind the shim is charged to its
partition, a killed container's memory comes back, each container is one ledger job, and the
agent restarted loses and doubles no job."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from fracgpu import cdi
from tests.node.test_node_agent import Agent, records
from tests.support.containers import CDI_DIR
from tests.support.simgpu import CTYPES_PRELUDE, GiB, MiB, partition_books, wait_for

MISSED = 32 * MiB

# In the container: 16 MiB through the shim, MISSED behind it (the driver the shim forwards to,
# opened by its absolute path), then hold until killed.
BEHIND = CTYPES_PRELUDE + f"""import sys, time
behind = ctypes.CDLL(sys.argv[1])
p = ctypes.c_uint64()
assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(16 << 20)) == 0
assert behind.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t({MISSED})) == 0
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def node(make_gpu, podman, cdi_kind, tmp_path):
    """A 4 GiB simulated GPU with partition a (1 GiB), and a way to start `fracgpu node` on it, which
    writes the CDI spec of its partitions (ready once written)."""
    gpu = make_gpu(memory=4 * GiB)
    gpu.fracgpu("partition", "create", "a", "--memory", "1GiB")
    spec_path = CDI_DIR / (cdi_kind.replace("/", "-") + ".json")
    agents = []

    def start(*args) -> Agent:
        agents.append(Agent(gpu, tmp_path, "--cdi", "--cdi-output", spec_path, "--cdi-config-dir", tmp_path / "cdi",
                            "--cdi-kind", cdi_kind, *args))
        return agents[-1]

    yield gpu, start
    for a in agents:
        if a.proc.poll() is None:
            a.stop()


class Container:
    """BEHIND in a container given partition `a`, started and ready."""

    def __init__(self, podman, kind: str):
        runner, rootfs = podman
        self.runner, self.name = runner, f"fracgpu-node-{uuid.uuid4().hex[:12]}"
        self.proc = subprocess.Popen(
            runner.command(rootfs, ["/usr/bin/python3", "-c", BEHIND, f"{cdi.DRIVER_DIR}/libcuda.so.1"],
                           devices=[f"{kind}=a"], name=self.name),
            env=runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", self.proc.stderr.read() if self.proc.poll() is not None else line
        inspect = subprocess.run(["podman", "inspect", "--format", "{{.Id}}", self.name], env=runner.env,
                                 capture_output=True, text=True, timeout=60)
        self.id = inspect.stdout.strip()

    def kill(self) -> None:
        self.runner.kill(self.name)
        self.proc.wait(timeout=60)


def test_memory_a_container_allocates_behind_the_shim_is_charged_and_given_back_when_killed(node, podman, cdi_kind):
    gpu, start = node
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = start("--metrics-port", str(port))
    container = Container(podman, cdi_kind)
    try:
        caught = time.monotonic()
        a = wait_for(lambda: partition_books(gpu, "a"), lambda p: p["drift_charged"] == MISSED, 2.0)
        assert (a["drift_charged"], a["used"]) == (MISSED, gpu.context + 16 * MiB + MISSED), \
            time.monotonic() - caught
        (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        (q,) = [q for q in g["processes"] if q["partition"] == "a"]
        assert (q["truth"], q["drift_charged"]) == ("known", MISSED)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        drift = [line for line in metrics.splitlines()
                 if line.startswith("fracgpu_partition_memory_drift_bytes{") and 'partition="a"' in line]
        assert [float(line.split()[-1]) for line in drift] == [MISSED]
        (running,) = wait_for(lambda: records(gpu), lambda r: r and r[0]["peak_drift_bytes"] == MISSED, 2.0)
        assert running["labels"]["container"] == container.id and running["end"] is None
    finally:
        container.kill()
    killed = time.monotonic()
    a = wait_for(lambda: partition_books(gpu, "a"), lambda p: p["used"] == 0, 1.0)
    assert (a["used"], a["processes"]) == (0, 0), time.monotonic() - killed
    (record,) = wait_for(lambda: records(gpu), lambda r: r[0]["end"] is not None, 2.0)
    assert (record["kind"], record["partition"], record["labels"]["container"]) == ("node", "a", container.id)
    assert record["peak_memory_bytes"] == gpu.context + 16 * MiB + MISSED
    assert record["peak_drift_bytes"] == MISSED
    report = gpu.fracgpu("report", env={"COLUMNS": "250"}).stdout
    assert "peak drift" in report and "+32MiB" in report
    agent.stop()


def test_the_agent_killed_and_restarted_while_containers_run_loses_and_doubles_no_job(node, podman, cdi_kind):
    gpu, start = node
    first = start()
    containers = [Container(podman, cdi_kind) for _ in range(2)]
    try:
        wait_for(lambda: records(gpu), lambda r: len(r) == 2, 3.0)
        first.stop(signal.SIGKILL)
        containers[0].kill()
        start()
        rows = wait_for(lambda: records(gpu), lambda r: sum(x["end"] is not None for x in r) == 1, 3.0)
        assert sorted((x["labels"]["container"], x["end"] is None) for x in rows) == \
            sorted([(containers[0].id, False), (containers[1].id, True)])
    finally:
        containers[1].kill()
    rows = wait_for(lambda: records(gpu), lambda r: all(x["end"] is not None for x in r), 2.0)
    assert sorted(x["labels"]["container"] for x in rows) == sorted(c.id for c in containers)


def test_removing_a_partition_a_container_uses_is_refused_naming_the_container(node, podman, cdi_kind):
    gpu, start = node
    start()
    container = Container(podman, cdi_kind)
    try:
        refused = gpu.fracgpu("partition", "rm", "a", check=False)
        assert refused.returncode == 2
        assert f"partition 'a' is in use by container {container.id[:12]} (pid" in refused.stderr
        gpu.fracgpu("partition", "rm", "a", "--force")
        assert container.proc.wait(timeout=60) != 0
    finally:
        if container.proc.poll() is None:
            container.kill()


def test_a_containers_memory_is_its_partitions_not_memory_held_outside_the_books(node, podman, cdi_kind):
    """The device (NVML) names a container's process by its host pid, its slot by its pid in the
    container: a new promise counts what it holds as its partition's (inside that promise), not as
    memory held outside these books, so the rest of the GPU can still be promised (a second pod's claim)."""
    gpu, start = node
    start()
    container = Container(podman, cdi_kind)
    try:
        made = gpu.fracgpu("partition", "create", "b", "--memory", "3GiB", check=False)   # 1 GiB (a) + 3 GiB: all
        assert made.returncode == 0, made.stderr
    finally:
        container.kill()
