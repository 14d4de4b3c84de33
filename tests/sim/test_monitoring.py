"""What monitoring tools ask of the simulated GPU's NVML, answered from the simulated device's state:
nvitop's one-shot view (outside a partition, the whole GPU; inside one, the quota), and the calls
pynvml-based tools and cuda-bindings' own NVML tests make (driver branch, PCI location)."""

from __future__ import annotations

import sys

import pytest

from fracgpu import devices
from tests.support.simgpu import GiB, MiB, command_pid

nvitop = pytest.importorskip("nvitop", reason="nvitop is in the test extra: pip install '.[test]'")


@pytest.fixture
def holding(gpu, clients):
    """A job under `fracgpu run --memory 512MiB` holding 200 MiB for the test."""
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "512MiB", "--name", "holder", "--",
                    clients.lcuda, "hold", 200, 60)
    try:
        assert job.stdout.readline().strip() == "holding 200"
        yield job
    finally:
        job.kill()
        job.wait(timeout=10)


def nvitop_once(gpu, *command_prefix: str):
    """nvitop's one-shot view of GPU 0, run after ``command_prefix`` (such as `fracgpu run ... --`)."""
    return gpu.run(*command_prefix, sys.executable, "-m", "nvitop", "--once", "--only", "0", env={"COLUMNS": "120"},
                   timeout=120)


def test_nvitop_shows_the_simulated_gpu_and_the_jobs_memory(gpu, holding):
    out = nvitop_once(gpu).stdout
    held = 200 + gpu.context // MiB
    # the device (its name cut to nvitop's column), where the simulated driver puts it on the PCI bus, its
    # memory with what the job holds, and the job's process with the same
    (pci,) = {d.pci_bus_id for d in devices.probe(gpu.env)}
    assert "simulated GPU" in out and pci in out, out
    assert f"{held}.0MiB / 1024MiB" in out, out
    (row,) = [line for line in out.splitlines() if f" {command_pid(holding)} " in line]
    assert f"{held}.0MiB" in row and "client_lcuda" in row, out


def test_nvitop_inside_a_partition_shows_the_quota(gpu, holding):
    out = nvitop_once(gpu, sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--").stdout
    assert "/ 256.0MiB" in out and "1024MiB" not in out, out   # the partition's quota is its GPU


def test_nvml_answers_the_driver_branch_and_the_pci_location(make_gpu):
    gpu = make_gpu(memory=GiB, devices=2)
    code = """
import pynvml
pynvml.nvmlInit()
branch = pynvml.nvmlSystemGetDriverBranch()
print(branch.branch if isinstance(branch.branch, str) else branch.branch.decode())
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pci = pynvml.nvmlDeviceGetPciInfo_v3(h)
    print(pynvml.nvmlDeviceGetUUID(h), pci.busId if isinstance(pci.busId, str) else pci.busId.decode(), pci.bus)
"""
    lines = gpu.python(code).stdout.splitlines()
    driver = gpu.python("import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlSystemGetDriverVersion())").stdout
    major, minor = driver.strip().split(".")[:2]
    assert lines[0] == f"r{major}_{int(minor):02d}"
    # each device where CUDA's own cuDeviceGetPCIBusId puts it
    cuda = {d.uuid: d.pci_bus_id for d in devices.probe(gpu.env)}
    listed = {uuid: (bus_id, int(bus)) for uuid, bus_id, bus in (line.split() for line in lines[1:])}
    assert {uuid: bus_id for uuid, (bus_id, _) in listed.items()} == cuda
    assert all(bus_id.endswith(f":{bus:02X}:00.0") for bus_id, bus in listed.values())


def test_cuda_bindings_nvml_answers_what_its_own_tests_ask_first(gpu):
    """cuda-bindings' NVML module (its tests' fixtures ask for the driver branch and each device's PCI
    information first) sees the simulated device as the simulated driver does."""
    code = """
from cuda.bindings import nvml
nvml.init_v2()
print(nvml.system_get_driver_branch())
h = nvml.device_get_handle_by_index_v2(0)
pci = nvml.device_get_pci_info_v3(h)
print(pci.bus_id, nvml.device_get_uuid(h), nvml.device_get_memory_info_v2(h).total)
nvml.shutdown()
"""
    branch, device = gpu.python(code).stdout.splitlines()
    (probed,) = devices.probe(gpu.env)
    assert branch.startswith("r") and device.split() == [probed.pci_bus_id, probed.uuid, str(GiB)]
