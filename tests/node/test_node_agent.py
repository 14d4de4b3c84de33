"""The node agent (`fracgpu node`): the trusted party for processes no `fracgpu run` wraps.

A process in its own pid namespace (as a container's are: `unshare --pid --fork --mount-proc`, root
only) loads the shim, so it is held to its partition, but the device names it by its host pid,
which it cannot know: only the agent, in the host's namespace, can check what the device holds for
it, record it in the ledger, and give its memory back when it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fracgpu import sim
from tests.support.simgpu import CTYPES_PRELUDE, MiB, partition_books, wait_for, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace of its own needs root (unshare --pid)")

# A job that allocates through the shim (`alloc N`), behind it through the driver opened by absolute
# path (`bypass N`, which the shim never sees), and runs the spin kernel for N ms (`spin N`); it
# answers each command with the CUresult, and says `ready` first.
JOB = CTYPES_PRELUDE + """import sys
behind = ctypes.CDLL(sys.argv[1])
module, spin = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuModuleLoad(ctypes.byref(module), sys.argv[2].encode()) == 0
assert cuda.cuModuleGetFunction(ctypes.byref(spin), module, b"fracgpu_spin") == 0
print("ready", flush=True)
for line in sys.stdin:
    what, n = line.split()
    p = ctypes.c_uint64()
    if what == "spin":
        ns = ctypes.c_ulonglong(int(n) * 1000000)
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
        rc = cuda.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, None, args, None) or cuda.cuCtxSynchronize()
    else:
        rc = (behind if what == "bypass" else cuda).cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(int(n) << 20))
    print(rc, flush=True)
"""

MISSED = 32 * MiB


class Job:
    """A JOB in partition `partition`, in a pid namespace of its own or on the host."""

    def __init__(self, gpu, shim: str, kernels: str, partition: str, *, namespace: bool = True):
        argv = [sys.executable, "-c", JOB, str(sim.library_dir() / "libcuda.so.1"), kernels]
        if namespace:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        self.proc = gpu.popen(*argv, env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": partition})
        line = self.proc.stdout.readline().strip()
        assert line == "ready", self.proc.stderr.read() if self.proc.poll() is not None else line
        # unshare forks the command into the new namespace: the job is its child there (pid 1).
        self.pid = self._child() if namespace else self.proc.pid

    def _child(self) -> int:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            (child,) = [int(c) for c in f.read().split()]
        return child

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        wait_gone(self.pid)
        self.proc.wait(timeout=10)


class Agent:
    """`fracgpu node` on the test's GPU, ready (its readiness file written) when made."""

    def __init__(self, gpu, tmp_path, *args):
        self.ready = tmp_path / "node.ready"
        self.proc = gpu.popen(sys.executable, "-m", "fracgpu", "node", "--interval", "0.1", "--ready-file",
                              self.ready, *args)
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "fracgpu node did not become ready"
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        return self.proc.communicate(timeout=20)[1]


@pytest.fixture
def agent(gpu, tmp_path):
    agents = []

    def start(*args) -> Agent:
        agents.append(Agent(gpu, tmp_path, *args))
        return agents[-1]

    yield start
    for a in agents:
        if a.proc.poll() is None:
            a.stop()


def records(gpu) -> list[dict]:
    return json.loads(gpu.fracgpu("report", "--format", "json").stdout)


def test_the_device_lists_a_namespaced_process_by_its_host_pid_as_a_real_nvml_does(gpu, shim, kernels):
    from fracgpu import node, state

    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    job = Job(gpu, shim, kernels, "a")
    try:
        assert job.ask("alloc 16") == "0"
        (path,) = state.region_files(str(gpu.state_dir))
        uuid = state.open_region_file(path).uuid
        # From the host: its host pid, with all it holds. From inside its namespace: it is not listed
        # (a real NVML names host pids there too, which the process cannot know).
        figures = gpu.python(f"from fracgpu import node; print(node.DeviceProcesses().figures({uuid!r}))").stdout
        assert eval(figures) == {job.pid: gpu.context + 16 * MiB}
        inside = gpu.run("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                         f"from fracgpu import node; print(node.DeviceProcesses().figures({uuid!r}))").stdout
        assert eval(inside) == {}
        # A host process that looks does not take it for dead (its pid means another process here).
        assert partition_books(gpu, "a")["processes"] == 1
        assert state.pid_namespace(job.pid) != state.pid_namespace()
    finally:
        job.kill()


@pytest.mark.fault("Memory allocated behind the shim (the driver opened by absolute path) in a container, with "
                   "`fracgpu node` running",
                   "within 2 s the node agent maps the device's host pid to the process's slot and charges it to "
                   "the partition; shown in top, the exporter and the report")
def test_memory_a_namespaced_process_allocates_behind_the_shim_is_charged(gpu, shim, kernels, agent):
    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    node = agent()
    job = Job(gpu, shim, kernels, "a")
    try:
        assert job.ask("alloc 16") == "0"
        assert job.ask(f"bypass {MISSED >> 20}") == "0"
        caught = time.monotonic()
        a = wait_for(lambda: partition_books(gpu, "a"), lambda p: p["drift_charged"] == MISSED, 2.0)
        assert (a["used"], a["drift_charged"], a["drift_unknown"]) == (gpu.context + 16 * MiB + MISSED, MISSED, 0), \
            time.monotonic() - caught
        # It stays charged, though the process itself cannot find its figure (the agent's stands).
        time.sleep(1.5)
        assert partition_books(gpu, "a")["drift_charged"] == MISSED
        # top, by the process's slot (its pid in its namespace: 1).
        (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        (q,) = [q for q in g["processes"] if q["partition"] == "a"]
        assert (q["truth"], q["device_used"], q["drift_charged"]) == ("known", gpu.context + 16 * MiB + MISSED,
                                                                     MISSED)
        # The exporter the agent serves.
        # (scraped in test_the_agent_serves_the_exporter_and_says_what_it_keeps)
        assert job.ask("alloc 256") == "2"   # what the device leaves of 256 MiB does not hold it
    finally:
        job.kill()
    node.stop()
    (record,) = records(gpu)
    assert (record["kind"], record["partition"], record["peak_drift_bytes"]) == ("node", "a", MISSED)


@pytest.mark.fault("A container's processes SIGKILLed, with `fracgpu node` running",
                   "their memory goes back within 1 s, once the device has let go of it; the container's ledger job "
                   "ends with its device time and peak")
def test_a_killed_namespace_gives_its_memory_back_and_ends_its_ledger_job(gpu, shim, kernels, agent):
    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    agent()
    job = Job(gpu, shim, kernels, "a")
    assert job.ask("alloc 64") == "0"
    assert job.ask("spin 200") == "0"
    held = gpu.context + 64 * MiB
    wait_for(lambda: records(gpu), lambda r: r and r[0]["peak_memory_bytes"] == held, 2.0)
    job.kill()
    killed = time.monotonic()
    a = wait_for(lambda: partition_books(gpu, "a"), lambda p: p["used"] == 0, 1.0)
    assert (a["used"], a["processes"]) == (0, 0), time.monotonic() - killed
    (record,) = wait_for(lambda: records(gpu), lambda r: r[0]["end"] is not None, 2.0)
    assert record["end"] is not None and record["partition"] == "a"
    assert record["peak_memory_bytes"] == held
    assert record["gpu_seconds"] == pytest.approx(0.2, rel=0.01)   # its one kernel, as the device timed it
    assert "pid_namespace" in record["labels"]


def test_the_agent_restarted_loses_and_doubles_no_ledger_job(gpu, shim, kernels, agent):
    gpu.fracgpu("partition", "create", "a", "--memory", "512MiB")
    first = agent()
    jobs = [Job(gpu, shim, kernels, "a") for _ in range(2)]
    try:
        for job in jobs:
            assert job.ask("alloc 32") == "0"
            assert job.ask("spin 100") == "0"
        wait_for(lambda: records(gpu), lambda r: len(r) == 2 and all(x["gpu_seconds"] > 0.09 for x in r), 3.0)
        first.stop(signal.SIGKILL)
        # While no agent runs: one namespace ends, the other works on.
        jobs[0].kill()
        assert jobs[1].ask("spin 100") == "0"
        agent()
        assert jobs[1].ask("spin 100") == "0"
        rows = wait_for(lambda: records(gpu), lambda r: any(x["gpu_seconds"] > 0.29 for x in r), 3.0)
        assert len(rows) == 2
        ended, running = sorted(rows, key=lambda x: x["end"] is None)
        assert ended["end"] is not None and running["end"] is None
        assert running["gpu_seconds"] == pytest.approx(0.3, rel=0.01)   # its three kernels, none lost or twice
        assert ended["gpu_seconds"] == pytest.approx(0.1, rel=0.01)
    finally:
        jobs[1].kill()
    rows = wait_for(lambda: records(gpu), lambda r: all(x["end"] is not None for x in r), 2.0)
    assert len(rows) == 2 and all(x["end"] is not None for x in rows)
    assert len({x["labels"]["pid_namespace"] for x in rows}) == 2


def test_processes_no_recorder_holds_are_one_job_per_partition(gpu, shim, kernels, agent):
    gpu.fracgpu("partition", "create", "b", "--memory", "256MiB")
    agent()
    jobs = [Job(gpu, shim, kernels, "b", namespace=False) for _ in range(2)]
    for job in jobs:
        assert job.ask("alloc 16") == "0"
    wait_for(lambda: records(gpu), lambda r: r and r[0]["processes"] == 2, 2.0)
    for job in jobs:
        job.kill()
    (record,) = wait_for(lambda: records(gpu), lambda r: r[0]["end"] is not None, 2.0)
    assert (record["job"], record["kind"], record["processes"]) == ("b", "node", 2)
    assert record["peak_memory_bytes"] == 2 * (gpu.context + 16 * MiB)


@pytest.mark.fault("`fracgpu partition rm` of a partition a container still uses",
                   "refused, naming the container and its processes; `--force` ends them and removes it")
def test_removing_a_partition_in_use_names_its_users_unless_forced(gpu, shim, kernels):
    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    job = Job(gpu, shim, kernels, "a")
    try:
        refused = gpu.fracgpu("partition", "rm", "a", check=False)
        assert refused.returncode != 0
        assert f"partition 'a' is in use by process {job.pid} (python" in refused.stderr
        assert "--force" in refused.stderr
        assert partition_books(gpu, "a")["processes"] == 1
        gpu.fracgpu("partition", "rm", "a", "--force")
        wait_gone(job.pid, timeout=2)
    finally:
        if job.proc.poll() is None:
            job.kill()
    usage = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
    assert [p for u in usage for p in u["partitions"]] == []


def test_the_agent_serves_the_exporter_and_says_what_it_keeps(gpu, shim, kernels, agent, tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    node = agent("--metrics-port", str(port))
    job = Job(gpu, shim, kernels, "a")
    try:
        assert job.ask(f"bypass {MISSED >> 20}") == "0"
        wait_for(lambda: partition_books(gpu, "a"), lambda p: p["drift_charged"] == MISSED, 2.0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        line = next(l for l in text.splitlines()
                    if l.startswith("fracgpu_partition_memory_drift_bytes{") and 'partition="a"' in l)
        assert float(line.split()[-1]) == MISSED
        assert f"pid {node.proc.pid}" in node.ready.read_text()
    finally:
        job.kill()
    gpu.fracgpu("partition", "rm", "a")
    time.sleep(0.5)
    log = node.stop()
    assert "keeping partition 'a' on GPU-" in log
    assert "no longer keeping partition 'a' on GPU-" in log
    assert "charged to partition 'a'" in log
    assert not node.ready.exists()


def test_a_label_provider_labels_the_jobs_of_its_processes(gpu, shim, kernels, monkeypatch):
    from fracgpu import node
    from fracgpu.ledger import Ledger

    for name, value in gpu.env.items():
        monkeypatch.setenv(name, value)
    gpu.fracgpu("partition", "create", "b", "--memory", "256MiB")
    job = Job(gpu, shim, kernels, "b", namespace=False)
    asked = []

    def pod_of(process: node.NodeProcess) -> dict[str, str]:
        asked.append(process.host_pid)
        return {"pod": "trainer-0", "namespace": "team-b"}

    with Ledger(gpu.ledger) as ledger:
        agent = node.NodeAgent(state_dir=gpu.state_dir, ledger=ledger, labels=pod_of)
        agent.tick()
        job.kill()
        agent.tick()
        (record,) = ledger.jobs()
    assert asked == [job.pid]
    assert (record.kind, record.partition, record.end is not None) == ("node", "b", True)
    assert {k: v for k, v in record.labels.items() if k != node.KEY_LABEL} == {"pod": "trainer-0",
                                                                                "namespace": "team-b"}


def test_the_systemd_unit_runs_the_agent_as_root_and_restarts_it(gpu):
    unit = gpu.fracgpu("node", "--print-systemd-unit", "--metrics-port", "10061").stdout
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("node --cdi --ready-file /run/fracgpu/node.ready --metrics-port 10061")
    assert "Restart=always" in unit and "User=root" in unit and "WantedBy=multi-user.target" in unit


def test_the_agent_keeps_the_cdi_spec_current(gpu, agent, tmp_path):
    spec = tmp_path / "cdi" / "test.json"
    kind = "test.fracgpu.dev/partition"

    def devices() -> list[str]:
        return [d["name"] for d in json.loads(spec.read_text())["devices"]] if spec.exists() else []

    gpu.fracgpu("partition", "create", "a", "--memory", "256MiB")
    node = agent("--cdi", "--cdi-output", spec, "--cdi-config-dir", tmp_path / "cdi-files", "--cdi-kind", kind)
    assert devices() == ["a"]   # written before it is ready
    gpu.fracgpu("partition", "create", "b", "--memory", "256MiB")
    assert wait_for(devices, lambda d: d == ["a", "b"], 1.0) == ["a", "b"]
    gpu.fracgpu("partition", "rm", "a")
    assert wait_for(devices, lambda d: d == ["b"], 1.0) == ["b"]
    assert f"CDI spec {spec}: {kind}=b" in node.stop()


def test_a_cdi_kind_that_is_not_vendor_class_is_refused_before_starting(gpu, tmp_path):
    refused = gpu.fracgpu("node", "--cdi", "--cdi-kind", "partition", "--cdi-output", tmp_path / "spec.json",
                          "--ready-file", tmp_path / "ready", check=False, timeout=30)
    assert refused.returncode == 2 and "'partition' is not a CDI kind: write vendor/class" in refused.stderr
    assert not (tmp_path / "spec.json").exists() and not (tmp_path / "ready").exists()
