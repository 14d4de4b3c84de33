"""``fracgpu device-plugin`` with a test kubelet over the device plugin API (v1beta1), on the
simulated GPU: registration, the slices and their health, the preferred allocation, and Allocate
answered with a CDI device that holds a podman container to its slices of the GPU (judged by the
simulated device's own figures)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

from fracgpu import devices, kube, sim, state
from fracgpu.kube import device_plugin
from tests.support.containers import CDI_DIR, podman  # noqa: F401  (the podman fixture)
from tests.support.device_watch import DeviceWatch
from tests.support.kubelet_devices import DeviceStream, TestKubelet
from tests.support.podresources import Container, Pod, Served
from tests.node.test_node_agent import Agent
from tests.support.simgpu import GiB, MiB, parse_facts, partition_books, wait_for

SLICES = 4


class Plugin:
    """A running ``fracgpu device-plugin`` and the test kubelet it registers with."""

    def __init__(self, gpu, folder: pathlib.Path, cdi_root: pathlib.Path, config_dir: pathlib.Path):
        self.gpu = gpu
        self.folder = folder
        self.cdi_root = cdi_root
        self.kubelet: TestKubelet | None = None
        self.pods_socket = str(folder) + "-pods.sock"   # where the plugin asks which pods hold which slices
        self.log = folder.parent / (folder.name + ".log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fracgpu", "device-plugin", "--device-plugin-path", str(folder),
                 "--slices", str(SLICES), "--cdi-root", str(cdi_root), "--cdi-config-dir", str(config_dir),
                 "--health-interval", "0.2", "--node-name", "node-a",
                 "--pod-resources-socket", str(folder) + "-pods.sock"],
                env=gpu.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def connect(self) -> None:
        """Starts the kubelet (unless it runs), waits for the plugin's registration and dials it."""
        if self.kubelet is None:
            self.kubelet = TestKubelet(str(self.folder))
        self.registration = self.kubelet.registered()
        self.stub = self.kubelet.plugin(self.registration)

    def output(self) -> str:
        """What it logged."""
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        if self.kubelet is not None:
            self.kubelet.close()
        return code


@pytest.fixture
def start_plugin(tmp_path):
    """start_plugin(gpu, cdi_root=None, kubelet=True) -> Plugin, registered with a test kubelet of its
    own (kubelet=False: none started yet), in a short folder (unix socket paths are short); stopped
    after the test."""
    started = []
    folders = []

    def start(gpu, cdi_root: pathlib.Path | None = None, kubelet: bool = True) -> Plugin:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="fdp-", dir="/tmp"))
        folders.append(folder)
        plugin = Plugin(gpu, folder, cdi_root or tmp_path / "cdi", tmp_path / "cdi-config")
        started.append(plugin)
        if kubelet:
            plugin.connect()
        return plugin

    yield start
    for plugin in started:
        plugin.stop()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        for end in (".log", "-pods.sock"):
            pathlib.Path(str(folder) + end).unlink(missing_ok=True)


def uuids(gpu) -> list[str]:
    return [d.uuid for d in devices.probe(gpu.env)]


def slices_of(uuid: str) -> list[str]:
    return [kube.slice_id(uuid, k) for k in range(SLICES)]


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_the_plugin_registers_and_lists_each_gpu_as_healthy_slices(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu)
    request = plugin.registration
    assert (request.version, request.endpoint, request.resource_name) == ("v1beta1", "fracgpu-gpu-slice.sock",
                                                                          "fracgpu.dev/gpu-slice")
    assert request.options.get_preferred_allocation_available and not request.options.pre_start_required
    (uuid,) = uuids(gpu)
    assert DeviceStream(plugin.stub).next() == dict.fromkeys(slices_of(uuid), "Healthy")
    # SIGTERM: it stops, and its socket goes with it.
    assert plugin.stop() == 0
    assert not (plugin.folder / request.endpoint).exists()
    assert "on node node-a" in plugin.output()


@pytest.mark.fault("The state file of a GPU the device plugin advertises is damaged (truncated, as by a full disk)",
                   "`ListAndWatch` sends its slices as Unhealthy, so the kubelet gives them to no new pod; Healthy "
                   "again once the file is removed")
def test_a_gpu_whose_state_is_damaged_is_unhealthy_until_it_is_usable_again(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu)
    (uuid,) = uuids(gpu)
    stream = DeviceStream(plugin.stub)
    assert set(stream.next().values()) == {"Healthy"}
    (region,) = state.region_files(str(gpu.state_dir))
    os.truncate(region, 16)
    assert stream.until(lambda d: "Healthy" not in d.values()) == dict.fromkeys(slices_of(uuid), "Unhealthy")
    # Allocate refuses too, naming the file (no partition is made beside a damaged state).
    error = refusal(lambda: plugin.kubelet.allocate(plugin.stub, slices_of(uuid)[:2]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and region in error.details()
    os.unlink(region)
    assert stream.until(lambda d: "Unhealthy" not in d.values()) == dict.fromkeys(slices_of(uuid), "Healthy")
    assert "is truncated" in plugin.output()


def test_a_plugin_started_before_the_kubelet_registers_once_it_is_up(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu, kubelet=False)
    socket = plugin.folder / device_plugin.SOCKET
    deadline = time.monotonic() + 60
    while not socket.exists():   # it serves at once, and keeps asking for a kubelet
        assert plugin.process.poll() is None and time.monotonic() < deadline, plugin.output()
        time.sleep(0.05)
    plugin.connect()
    assert plugin.registration.resource_name == kube.SLICE_RESOURCE


def test_a_restarted_kubelet_gets_the_plugin_registered_again(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu)
    plugin.kubelet.restart()   # a new kubelet.sock, and the folder emptied of the plugin's socket
    again = plugin.kubelet.registered(timeout=30)
    assert (again.endpoint, again.resource_name) == ("fracgpu-gpu-slice.sock", kube.SLICE_RESOURCE)
    (uuid,) = uuids(gpu)
    assert DeviceStream(plugin.kubelet.plugin(again)).next() == dict.fromkeys(slices_of(uuid), "Healthy")


def test_a_containers_slices_are_chosen_on_one_gpu_the_fullest_that_fits(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB, devices=2)
    plugin = start_plugin(gpu)
    first, second = uuids(gpu)
    every = slices_of(first) + slices_of(second)
    assert sorted(DeviceStream(plugin.stub).next()) == sorted(every)
    kubelet, stub = plugin.kubelet, plugin.stub
    assert kubelet.preferred(stub, every, 2) == slices_of(first)[:2]
    # GPU 0 has 2 slices free and GPU 1 all 4: the 2 go on GPU 0, keeping GPU 1 whole.
    assert kubelet.preferred(stub, slices_of(first)[2:] + slices_of(second), 2) == slices_of(first)[2:]
    # Only GPU 1 still has 3 free.
    assert kubelet.preferred(stub, slices_of(first)[3:] + slices_of(second)[1:], 3) == slices_of(second)[1:]
    # A slice the kubelet must include decides the GPU.
    assert kubelet.preferred(stub, every, 2, must_include=[slices_of(second)[3]]) == [slices_of(second)[0],
                                                                                      slices_of(second)[3]]
    # One slice of GPU 1: a quarter of GPU 1, made on GPU 1.
    (answer,) = kubelet.allocate(stub, [slices_of(second)[3]]).container_responses
    assert [d.name for d in answer.cdi_devices] == ["k8s.fracgpu.dev/slices=k8s-slices-gpu1-3"]
    (on_second,) = [g for g in state.usage(str(gpu.state_dir)) if g.uuid == second]
    (part,) = on_second.partitions
    assert (part.name, part.memory_limit, part.compute_share) == ("k8s-slices-gpu1-3", 4 * GiB, 0.25)


def test_the_preferred_choice_keeps_whole_gpus_free():
    a, b, c = (slices_of(u) for u in ("GPU-a", "GPU-b", "GPU-c"))
    # b has the fewest free that still fit 2; a's single free slice does not fit.
    assert device_plugin.preferred(a[:1] + b[1:3] + c, [], 2) == b[1:3]
    assert device_plugin.preferred(a + b, [b[2]], 3) == [b[0], b[1], b[2]]
    # Nothing fits on one GPU: no preference (Allocate refuses slices of several GPUs).
    assert device_plugin.preferred(a[:2] + b[:2], [], 3) == []
    assert device_plugin.preferred(a + b, [a[0], b[0]], 2) == []


def test_allocate_refuses_slices_of_two_gpus_or_ids_it_does_not_have(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB, devices=2)
    plugin = start_plugin(gpu)
    first, second = uuids(gpu)
    spread = [slices_of(first)[0], slices_of(second)[0]]
    error = refusal(lambda: plugin.kubelet.allocate(plugin.stub, spread))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be of one GPU" in error.details() and all(i in error.details() for i in spread)
    error = refusal(lambda: plugin.kubelet.allocate(plugin.stub, [slices_of(first)[0], "GPU-nothere::1",
                                                                  kube.slice_id(first, SLICES)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"unknown device ids GPU-nothere::1, {first}::{SLICES}" in error.details()
    assert all(not g.partitions for g in state.usage(str(gpu.state_dir))), "nothing is made for a refused request"


def test_a_bad_number_of_slices_is_refused(gpu):
    result = gpu.fracgpu("device-plugin", "--slices", "65", check=False)
    assert result.returncode == 2
    assert "the slices per GPU must be a whole number from 1 to 64, not 65" in result.stderr


def test_two_slices_of_four_hold_a_container_to_half_of_the_gpu(make_gpu, start_plugin, podman):
    runner, rootfs = podman
    gpu = make_gpu(memory=16 * GiB)
    spec = CDI_DIR / "k8s.fracgpu.dev-slices.json"   # podman reads specs only there: removed after
    try:
        plugin = start_plugin(gpu, cdi_root=CDI_DIR)
        (uuid,) = uuids(gpu)
        ids = plugin.kubelet.preferred(plugin.stub, slices_of(uuid), 2)
        assert ids == slices_of(uuid)[:2]
        (answer,) = plugin.kubelet.allocate(plugin.stub, ids).container_responses
        device = "k8s.fracgpu.dev/slices=k8s-slices-gpu0-0-1"
        assert [d.name for d in answer.cdi_devices] == [device]
        assert not answer.envs and not answer.mounts and not answer.devices
        # The kubelet may ask again (after its restart): the same partition, not a second one.
        assert [d.name for d in plugin.kubelet.allocate(plugin.stub, ids).container_responses[0].cdi_devices] == [
            device]
        part = partition_books(gpu, "k8s-slices-gpu0-0-1")
        assert (part["memory_limit"], part["compute_share"]) == (8 * GiB, 0.5)
        with DeviceWatch(gpu.env, uuid, 8 * GiB) as watch:
            result = runner.run(rootfs, ["/opt/clients/client_lcuda", "alloc-until-oom", "256", "0", "2"],
                                devices=[device])
            figures = watch.stop()
        assert result.returncode == 0, result.stderr
        facts = parse_facts(result.stdout)
        assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY"
        assert int(facts["blocks"]) == (8 * GiB - gpu.context) // (256 * MiB), result.stdout
        assert figures["peak"] <= 8 * GiB and figures["excess"] == 0, figures
        assert figures["peak"] >= 8 * GiB - 256 * MiB, figures
    finally:
        spec.unlink(missing_ok=True)


def test_a_partition_whose_slices_went_to_another_container_is_replaced(make_gpu, start_plugin, tmp_path):
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu)
    (uuid,) = uuids(gpu)
    ids = slices_of(uuid)
    plugin.kubelet.allocate(plugin.stub, ids[:2])
    pods = Served(plugin.pods_socket)
    try:
        # While the kubelet's pod resources say a pod holds slice 1, its partition stays, and Allocate says who.
        pods.service.set_pods(Pod("team-a", "train", [Container("main", slices={uuid: [0, 1]})]))
        error = refusal(lambda: plugin.kubelet.allocate(plugin.stub, ids[1:]))
        assert "team-a/train/main holds" in error.details() and "k8s-slices-gpu0-0-1" in error.details()
        assert [p.name for p in state.usage(str(gpu.state_dir))[0].partitions] == ["k8s-slices-gpu0-0-1"]
        # Its container has gone, and the kubelet gives slice 1 to another one before `fracgpu node` saw the pod go.
        pods.service.set_pods()
        (answer,) = plugin.kubelet.allocate(plugin.stub, ids[1:]).container_responses
    finally:
        pods.stop()
    assert [d.name for d in answer.cdi_devices] == ["k8s.fracgpu.dev/slices=k8s-slices-gpu0-1-2-3"]
    (now,) = state.usage(str(gpu.state_dir))
    assert [(p.name, p.memory_limit, p.compute_share) for p in now.partitions] == [
        ("k8s-slices-gpu0-1-2-3", 12 * GiB, 0.75)]
    spec = json.loads((tmp_path / "cdi" / "k8s.fracgpu.dev-slices.json").read_text())
    assert spec["kind"] == kube.SLICES_CDI_KIND and [d["name"] for d in spec["devices"]] == ["k8s-slices-gpu0-1-2-3"]


def test_a_left_over_partition_of_the_same_slices_gets_their_limits(make_gpu, start_plugin):
    gpu = make_gpu(memory=16 * GiB)
    # Left by a plugin that cut the GPU into other slices, its container gone.
    gpu.fracgpu("partition", "create", "k8s-slices-gpu0-0-1", "--memory", "1GiB", "--compute", "10%")
    plugin = start_plugin(gpu)
    # At its start, the plugin writes the CDI device of every slice partition there is.
    spec = json.loads((plugin.cdi_root / "k8s.fracgpu.dev-slices.json").read_text())
    assert [d["name"] for d in spec["devices"]] == ["k8s-slices-gpu0-0-1"]
    (uuid,) = uuids(gpu)
    plugin.kubelet.allocate(plugin.stub, slices_of(uuid)[:2])
    part = partition_books(gpu, "k8s-slices-gpu0-0-1")
    assert (part["memory_limit"], part["compute_share"]) == (8 * GiB, 0.5)


def test_without_the_kubernetes_extra_the_command_says_what_to_install(gpu):
    blocked = "import sys; sys.modules['grpc'] = None; from fracgpu.cli import main; main(['device-plugin'])"
    result = gpu.python(blocked, check=False)
    assert result.returncode == 2
    assert "fracgpu device-plugin needs the kubernetes extra" in result.stderr
    assert "pip install 'fracgpu[kubernetes]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.fault("The driver no longer lists a GPU the device plugin advertises (fallen off the bus), or no driver "
                   "answers", "that GPU's slices are Unhealthy (every GPU's, without a driver)")
def test_a_gpu_the_driver_no_longer_lists_is_unhealthy(make_gpu):
    gpu = make_gpu(memory=16 * GiB, devices=2)
    gpus = [device_plugin.GPU.of(d) for d in devices.probe(gpu.env)]
    first, second = (g.uuid for g in gpus)
    folder = str(gpu.state_dir)
    assert device_plugin.check_health(gpus, folder, gpu.env) == {first: True, second: True}
    # The driver now lists one GPU (as after a GPU fell off the bus), then none (no driver at all).
    one = {**gpu.env, "FRACGPU_SIM_DEVICES": "1"}
    assert device_plugin.check_health(gpus, folder, one) == {first: True, second: False}
    assert device_plugin.check_health(gpus, folder, sim.without(gpu.env)) == {first: False, second: False}


def test_a_pods_slices_go_once_the_kubelet_no_longer_lists_the_pod(make_gpu, start_plugin, tmp_path):
    """Allocate 2 of 4 slices; the pod resources service lists the pod holding them, then stops listing it
    (the pod ended: device plugins get no call for that), and `fracgpu node` removes the partition and
    its CDI device."""
    gpu = make_gpu(memory=16 * GiB)
    plugin = start_plugin(gpu)
    (uuid,) = uuids(gpu)
    (answer,) = plugin.kubelet.allocate(plugin.stub, slices_of(uuid)[:2]).container_responses
    partition = kube.slices_partition(0, [0, 1])
    assert [d.name for d in answer.cdi_devices] == [f"{kube.SLICES_CDI_KIND}={partition}"]
    spec = plugin.cdi_root / "k8s.fracgpu.dev-slices.json"
    pods = Served(plugin.pods_socket)
    pods.service.set_pods(Pod("team-a", "train", [Container("main", slices={uuid: [0, 1]})]))
    node = Agent(gpu, tmp_path, "--pod-resources-socket", plugin.pods_socket, "--pod-resources-grace", "0.5",
                 "--cdi-root", plugin.cdi_root)
    try:
        asked = pods.service.lists
        wait_for(lambda: pods.service.lists, lambda n: n >= asked + 3, 10.0)
        assert [p.name for p in state.usage(str(gpu.state_dir))[0].partitions] == [partition]   # held: kept
        pods.service.set_pods()
        assert not wait_for(lambda: state.usage(str(gpu.state_dir))[0].partitions, lambda p: not p, 10.0)
        assert not spec.exists()   # its only device went with it
    finally:
        log = node.stop()
        pods.stop()
    assert f"removed partition '{partition}'" in log
