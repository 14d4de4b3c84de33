"""Containers given a partition through CDI, with real podman and runc, on the simulated GPU.

Each container runs from a minimal root filesystem (no fracgpu in it); the CDI spec that
``fracgpu cdi generate`` writes brings the shim, the simulated driver, the state folder and the
partition's binding. Whether a quota holds is judged by the simulated device's own figure,
polled while the containers run."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid

import pytest

from fracgpu import cdi
from tests.support.containers import CDI_DIR
from tests.support.simgpu import GiB, MiB, parse_facts

# What a process in a container may set to get out of its partition: none of it is obeyed.
ESCAPES = {"LD_PRELOAD": "", "FRACGPU_PARTITION": "b", "FRACGPU_MEMORY": "4GiB", "FRACGPU_STATE_DIR": "/tmp",
           "FRACGPU_CONTEXT_MEMORY": "0", "FRACGPU_RECONCILE_INTERVAL": "0", "FRACGPU_CONFIG": "/tmp/none.conf"}

# Polls the simulated device's own figure (NVML's used memory: every process, contexts
# included) until stdin closes; prints the most it saw and how many samples.
MONITOR = r"""
import ctypes, sys, threading
nvml = ctypes.CDLL(sys.argv[1])
assert nvml.nvmlInit_v2() == 0
dev = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) == 0
class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
m, most, samples = Memory(), 0, 0
print("ready", flush=True)
while not done.is_set():
    assert nvml.nvmlDeviceGetMemoryInfo(dev, ctypes.byref(m)) == 0
    most, samples = max(most, m.used), samples + 1
print("most", most)
print("samples", samples)
"""


@pytest.fixture
def node(make_gpu, podman, cdi_kind, tmp_path):
    """A 4 GiB simulated GPU with partitions a and b (1 GiB each), and the CDI spec of them."""
    gpu = make_gpu(memory=4 * GiB)
    for name in ("a", "b"):
        gpu.fracgpu("partition", "create", name, "--memory", "1GiB")
    spec_path = CDI_DIR / (cdi_kind.replace("/", "-") + ".json")
    gpu.fracgpu("cdi", "generate", "--output", spec_path, "--config-dir", tmp_path / "cdi", "--kind", cdi_kind)
    return gpu, spec_path


def in_container(podman, kind, partition, argv, **kwargs):
    runner, rootfs = podman
    return runner.run(rootfs, argv, devices=[f"{kind}={partition}"], **kwargs)


def expected_blocks(gpu, quota=GiB, mib=64):
    return (quota - gpu.context) // (mib * MiB)


@pytest.mark.fault("A process in a container given partition `a` unsets `LD_PRELOAD` and sets `FRACGPU_*` "
                   "(another partition, a larger memory, another state folder or node file)",
                   "held to `a`: the shim is loaded by /etc/ld.so.preload and the binding is the mounted node file")
@pytest.mark.parametrize("client", [["/opt/clients/client_lcuda", "alloc-until-oom", "64"],
                                    ["/usr/bin/python3", "/opt/clients/ctypes_client.py", "64"]],
                         ids=["c-lcuda", "ctypes"])
def test_a_container_is_held_to_its_partition_whatever_its_environment(node, podman, cdi_kind, client):
    gpu, _ = node
    result = in_container(podman, cdi_kind, "a", client, env=ESCAPES)
    assert result.returncode == 0, result.stderr
    facts = parse_facts(result.stdout)
    assert facts["blocks"] == str(expected_blocks(gpu)), result.stdout + result.stderr
    assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert "binds this process to partition 'a'" in result.stderr


def _sim_nvml() -> str:
    from fracgpu import sim

    return str(sim.library_dir() / "libnvidia-ml.so.1")


def test_two_containers_on_a_never_hold_more_than_its_quota_on_the_device(node, podman, cdi_kind):
    gpu, _ = node
    runner, rootfs = podman
    monitor = gpu.popen(sys.executable, "-c", MONITOR, _sim_nvml())
    assert monitor.stdout.readline().strip() == "ready"
    hold = ["/opt/clients/client_lcuda", "alloc-until-oom", "64", "0", "15"]
    names = [f"fracgpu-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    on_a = [runner.popen(rootfs, hold, devices=[f"{cdi_kind}=a"], name=name) for name in names]
    try:
        a_blocks = []
        for p in on_a:
            line = p.stdout.readline()
            assert line.startswith("blocks "), p.stderr.read() if p.poll() is not None else line
            a_blocks.append(int(line.split()[1]))
        # Both hold what they got. The device's own figure, polled all along: a's two containers
        # (the only processes on this GPU yet, contexts included) never held more than 1 GiB.
        facts = parse_facts(monitor.communicate("", timeout=60)[0])
        assert int(facts["samples"]) > 100
        assert int(facts["most"]) <= GiB, facts
        assert sum(a_blocks) == (GiB - 2 * gpu.context) // (64 * MiB), a_blocks
        # A container on b, beside them, still gets all of its own.
        result = in_container(podman, cdi_kind, "b", ["/opt/clients/client_lcuda", "alloc-until-oom", "64"])
        assert parse_facts(result.stdout)["blocks"] == str(expected_blocks(gpu)), result.stderr
        assert all(p.poll() is None for p in on_a), "a's containers were still holding their memory"
    finally:
        if monitor.poll() is None:
            monitor.kill()
        for p, name in zip(on_a, names):
            runner.kill(name)
            p.wait(timeout=60)


def test_the_spec_names_each_partition_and_binds_it(node, podman, cdi_kind):
    gpu, spec_path = node
    spec = json.loads(spec_path.read_text())
    assert spec["cdiVersion"] == "0.3.0" and spec["kind"] == cdi_kind
    listed = gpu.fracgpu("cdi", "list", "--kind", cdi_kind).stdout.split()
    assert listed == [f"{cdi_kind}=a", f"{cdi_kind}=b"]
    result = in_container(podman, cdi_kind, "b", ["/bin/cat", "/etc/fracgpu/fracgpu.conf", "/etc/ld.so.preload"])
    assert "partition = b" in result.stdout and "/usr/lib/fracgpu/libfracgpu.so" in result.stdout, result.stderr
    # Read-only: a process in the container cannot rewrite its binding or the preload.
    result = in_container(podman, cdi_kind, "b", ["/bin/sh", "-c", "echo partition = a > /etc/fracgpu/fracgpu.conf"])
    assert result.returncode != 0 and "Read-only file system" in result.stderr



@pytest.mark.fault("An image whose loader cannot load the shim (here: the preloaded file is not a library)",
                   "the loader says so and no process finds a CUDA driver: the C client does not start, ctypes finds "
                   "no libcuda.so.1; never an unlimited job")
def test_a_container_the_shim_cannot_be_loaded_into_gets_no_driver(node, podman, cdi_kind, tmp_path):
    gpu, _ = node
    broken = tmp_path / "not-a-library.so"
    broken.write_text("not an ELF file\n")
    layout = dataclasses.replace(cdi.Layout.for_node(gpu.env, config_dir=str(tmp_path / "cdi-broken")),
                                 shim=str(broken), nvml_shim=None, state_dir=str(gpu.state_dir))
    kind = cdi_kind.replace("/partition", "/broken")
    cdi.write_spec(layout, ["a"], str(CDI_DIR / (kind.replace("/", "-") + ".json")), kind)
    result = in_container(podman, kind, "a", ["/opt/clients/client_lcuda", "alloc-until-oom", "64"])
    assert result.returncode != 0 and "blocks" not in result.stdout
    assert "cannot be preloaded" in result.stderr and "libcuda.so.1: cannot open shared object file" in result.stderr
    result = in_container(podman, kind, "a", ["/usr/bin/python3", "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"])
    assert result.returncode != 0 and "libcuda.so.1: cannot open shared object file" in result.stderr
