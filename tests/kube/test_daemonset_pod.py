"""The DaemonSet's node agent run as its pod runs it: podman (and runc) with the container's args and
environment, each of its volumes a folder of the test's own mounted where the pod mounts it, the
host's pid namespace, and a simulated GPU whose driver and NVML are mounted at the paths the
DaemonSet mounts the host's driver and NVML at. The container's root filesystem is the tests' minimal
one with this Python and its packages mounted (as the image has them on PYTHONPATH). It becomes ready,
keeps the host's books (a partition made on the host, a job of a process in its own pid namespace) and
bills them with the command the README gives."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sysconfig
import time
import uuid

import pytest

import fracgpu
from fracgpu import sim

pytest.importorskip("kubernetes", reason="the kubernetes extra is not installed")
from tests.support import kubelet_devices
from tests.support.manifests import MANIFESTS, check_all, cli_command, daemonsets, load, unknown_options
from tests.support.containers import _copy_with_libraries, podman  # noqa: F401  (a fixture)
from tests.node.test_node_agent import Job
from tests.support.simgpu import GiB, wait_for

SITE = sysconfig.get_paths()["purelib"]
# Where fracgpu is imported from (SITE, for an installed package): the container finds it there too, at the
# same path, as the DaemonSet's pods find it at the image's /opt/fracgpu, which is the host's too.
PACKAGES = str(pathlib.Path(fracgpu.__file__).resolve().parent.parent)


def pod_command(runner, rootfs, container, volumes: dict, env: dict[str, str], name: str, *, extra=()) -> list[str]:
    """``podman run`` of ``container`` as its pod runs it: ``volumes`` maps each volume's name to the
    folder or file standing in for it; ``extra``: more folders, mounted at their own path."""
    cmd = ["podman", "run", "--rm", "--name", name, "--pid", "host", "--privileged", "--network", "none",
           "-v", f"{runner.stdlib}:{runner.stdlib}:ro", "-e", f"PYTHONPATH={PACKAGES}:{SITE}"]
    for folder in dict.fromkeys([PACKAGES, SITE]):
        cmd += ["-v", f"{folder}:{folder}:ro"]
    for folder in extra:
        cmd += ["-v", f"{folder}:{folder}"]
    for m in container.volume_mounts:
        cmd += ["-v", f"{volumes[m.name]}:{m.mount_path}:{'ro' if m.read_only else 'rw'}"]
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    # The image's entrypoint is `fracgpu`: here, this Python with the package on PYTHONPATH.
    return [*cmd, "--rootfs", str(rootfs), "/usr/bin/python3", "-m", "fracgpu", *container.args]


class Pod:
    """A DaemonSet's pod on a 4 GiB simulated GPU; ``start(container)`` runs one of its containers."""

    def __init__(self, runner, shared: pathlib.Path, gpu, tmp_path: pathlib.Path, daemonset: str):
        self.runner, self.gpu = runner, gpu
        self.spec = daemonsets(check_all(load(MANIFESTS / daemonset)))[0].spec.template.spec
        for c in self.spec.containers:
            assert cli_command(c.args[0]) and not unknown_options(c.args), c.args   # test_manifests says which
        # A root filesystem of this test's own (the session's is the minimal image other tests rely on),
        # with the libraries of the extension modules the commands load beyond the interpreter: the
        # standard library's (sqlite3 for the ledger), fracgpu's native module, and the kubernetes
        # extra's (gRPC for the kubelet's APIs, protobuf, pydantic).
        self.rootfs = tmp_path / "rootfs"
        shutil.copytree(shared, self.rootfs, symlinks=True)
        modules = [*pathlib.Path(runner.stdlib, "lib-dynload").glob("*.so")]
        for package in ("fracgpu", "grpc", "google", "pydantic_core", "yaml"):
            modules += pathlib.Path(PACKAGES if package == "fracgpu" else SITE, package).rglob("*.so")
        for so in modules:
            _copy_with_libraries(str(so), self.rootfs)
        _copy_with_libraries(shutil.which("test"), self.rootfs)   # the readiness probes' command
        gpu.dir.mkdir(exist_ok=True)
        config = check_all(load(MANIFESTS / "20-config.yaml"))["ConfigMap", "fracgpu-node-config"]
        # Each hostPath volume a folder of the test's own, but the state folder: the simulated GPU's,
        # so that the test's host jobs meet the pod's books.
        self.host = {v.name: tmp_path / "host" / v.name for v in self.spec.volumes if v.host_path}
        for folder in self.host.values():
            folder.mkdir(mode=0o700, parents=True)
        self.host["state"] = gpu.state_dir
        driver = pathlib.Path(PACKAGES, "fracgpu", "_sim")
        self.host.update({"libcuda": driver / "libcuda.so.1", "libnvml": driver / "libnvidia-ml.so.1"})
        self.host["default-config"] = tmp_path / "default-config"
        self.host["default-config"].mkdir()
        (self.host["default-config"] / "fracgpu.conf").write_text(config.data["fracgpu.conf"])
        self.running: list[tuple[str, subprocess.Popen]] = []

    def container(self, name: str):
        [c] = [c for c in self.spec.containers if c.name == name]
        return c

    def start(self, container) -> subprocess.Popen:
        """``container`` run, ready when its readiness probe passes."""
        env = {e.name: e.value for e in container.env if e.value is not None}
        env.update({k: v for k, v in sim.environment(self.gpu.config).items() if k.startswith("FRACGPU_SIM_")})
        name = f"fracgpu-pod-{uuid.uuid4().hex[:12]}"
        proc = subprocess.Popen(pod_command(self.runner, self.rootfs, container, self.host, env, name,
                                            extra=[self.gpu.dir]),
                                env=self.runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append((name, proc))
        deadline = time.monotonic() + 60
        while self.exec(proc, *container.readiness_probe.var_exec.command).returncode != 0:
            assert proc.poll() is None, f"{container.name} exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"{container.name}'s readiness probe does not pass"
            time.sleep(0.5)
        return proc

    def exec(self, proc: subprocess.Popen, *argv) -> subprocess.CompletedProcess:
        [name] = [n for n, p in self.running if p is proc]
        return subprocess.run(["podman", "exec", name, *argv], env=self.runner.env, capture_output=True, text=True,
                              timeout=60)

    def stop(self, proc: subprocess.Popen) -> str:
        """Stop ``proc``'s container as the kubelet does (SIGTERM); its log."""
        [name] = [n for n, p in self.running if p is proc]
        subprocess.run(["podman", "kill", "--signal", "TERM", name], env=self.runner.env, capture_output=True,
                       timeout=60)
        return proc.communicate(timeout=60)[1]


@pytest.fixture
def pod(make_gpu, podman, tmp_path):  # noqa: F811  (podman: the fixture imported above)
    pods = []

    def make(daemonset: str) -> Pod:
        pods.append(Pod(*podman, make_gpu(memory=4 * GiB), tmp_path, daemonset))
        return pods[-1]

    yield make
    for p in pods:
        for _, proc in p.running:
            if proc.poll() is None:
                p.stop(proc)


def test_the_node_agent_runs_as_the_daemonset_runs_it_and_keeps_the_books_on_the_host(pod, shim, kernels):
    dra = pod("dra")
    node = dra.container("node")
    gpu, host = dra.gpu, dra.host
    proc = dra.start(node)
    # The books are the host's: a partition made on the host shows in the pod's exporter, the agent records
    # a job of it in the host's ledger, and the bill the README reads in the pod's node container has it.
    gpu.fracgpu("partition", "create", "team-a", "--memory", "1GiB")
    [port] = [p.container_port for p in node.ports if p.name == "metrics"]
    fetch = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%d/metrics').read().decode())"
             % port)
    deadline = time.monotonic() + 30
    while 'partition="team-a"' not in (metrics := dra.exec(proc, "/usr/bin/python3", "-c", fetch).stdout):
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(0.5)
    job = Job(gpu, shim, kernels, "team-a")   # in a pid namespace of its own, as a container's process
    try:
        assert job.ask("alloc 16") == "0"
        report = ["/usr/bin/python3", "-m", "fracgpu", "report", "--format", "json"]
        [record] = wait_for(lambda: json.loads(dra.exec(proc, *report).stdout or "[]"), bool, 10.0)
        assert (record["partition"], record["kind"], record["processes"]) == ("team-a", "node", 1)
        assert (host["state"] / "ledger.sqlite").exists()
        bill = dra.exec(proc, "/usr/bin/python3", "-m", "fracgpu", "report", "--by", "namespace")
        assert bill.returncode == 0 and record["job"] in bill.stdout, bill.stdout + bill.stderr
    finally:
        job.kill()
    log = dra.stop(proc)
    assert proc.returncode == 0, log
    # It found the (simulated) driver's NVML where the DaemonSet mounts the host's.
    assert "per-process figures cannot be read" not in log, log


def test_the_device_plugin_registers_and_writes_cdi_specs_the_host_can_read(pod):
    """The device plugin's container registers with the kubelet in the folder the DaemonSet mounts, and
    the CDI spec it writes names only paths the host has at the same place: a DaemonSet volume's, or
    the shims' (here where fracgpu is imported from, mounted at its own path as /opt/fracgpu is copied)."""
    devices = pod("device-plugin")
    plugin = devices.container("device-plugin")
    from fracgpu import kube

    kubelet = kubelet_devices.TestKubelet(str(devices.host["device-plugins"]))
    try:
        proc = devices.start(plugin)
        registered = kubelet.registered()
        assert registered.resource_name == kube.SLICE_RESOURCE
        stub = kubelet.plugin(registered)
        slices = sorted(kubelet_devices.DeviceStream(stub).next())
        assert len(slices) == int(next(a for a in plugin.args if a.startswith("--slices=")).partition("=")[2])
        [answer] = kubelet.allocate(stub, slices[:2]).container_responses
        [device] = answer.cdi_devices
        mounted = {m.mount_path for m in plugin.volume_mounts}
        [spec_file] = devices.host["cdi"].glob("*.json")
        spec = json.loads(spec_file.read_text())
        assert device.name.partition("=")[0] == spec["kind"]
        edits = [spec.get("containerEdits", {}), *(d["containerEdits"] for d in spec["devices"])]
        paths = [m["hostPath"] for e in edits for m in e.get("mounts", [])]
        assert paths
        for path in paths:
            assert path.startswith(PACKAGES + "/") or any(path == m or path.startswith(m + "/") for m in mounted), \
                f"the spec names {path}, which the host does not have where the container has it"
        devices.stop(proc)
    finally:
        kubelet.close()
