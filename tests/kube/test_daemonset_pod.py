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

from fracgpu import sim

pytest.importorskip("kubernetes", reason="the kubernetes extra is not installed")
from tests.support.manifests import MANIFESTS, check_all, daemonsets, load, unknown_options
from tests.support.containers import _copy_with_libraries, podman  # noqa: F401  (a fixture)
from tests.node.test_node_agent import Job
from tests.support.simgpu import GiB, wait_for

SITE = sysconfig.get_paths()["purelib"]


def pod_command(runner, rootfs, container, volumes: dict, env: dict[str, str], name: str, *, extra=()) -> list[str]:
    """``podman run`` of ``container`` as its pod runs it: ``volumes`` maps each volume's name to the
    folder or file standing in for it; ``extra``: more folders, mounted at their own path."""
    cmd = ["podman", "run", "--rm", "--name", name, "--pid", "host", "--privileged", "--network", "none",
           "-v", f"{runner.stdlib}:{runner.stdlib}:ro", "-v", f"{SITE}:{SITE}:ro", "-e", f"PYTHONPATH={SITE}"]
    for folder in extra:
        cmd += ["-v", f"{folder}:{folder}"]
    for m in container.volume_mounts:
        cmd += ["-v", f"{volumes[m.name]}:{m.mount_path}:{'ro' if m.read_only else 'rw'}"]
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    # The image's entrypoint is `fracgpu`: here, this Python with the package on PYTHONPATH.
    return [*cmd, "--rootfs", str(rootfs), "/usr/bin/python3", "-m", "fracgpu", *container.args]


@pytest.fixture
def node_pod(make_gpu, podman, tmp_path):  # noqa: F811  (podman: the fixture imported above)
    runner, shared = podman
    [node] = [c for c in daemonsets(check_all(load(MANIFESTS / "dra")))[0].spec.template.spec.containers
              if c.name == "node"]
    missing = unknown_options(node.args)
    if missing:
        pytest.skip(f"`fracgpu node` has no {', '.join(missing)} on this branch yet (another part of the Kubernetes "
                    "work adds it)")
    # A root filesystem of this test's own (the session's is the minimal image other tests rely on), with
    # the libraries of the extension modules the agent loads beyond the interpreter: the standard
    # library's (sqlite3 for the ledger), fracgpu's native module, and the kubernetes extra's (gRPC for
    # the pod resources API, protobuf, pydantic).
    rootfs = tmp_path / "rootfs"
    shutil.copytree(shared, rootfs, symlinks=True)
    modules = [*pathlib.Path(runner.stdlib, "lib-dynload").glob("*.so")]
    for package in ("fracgpu", "grpc", "google", "pydantic_core", "yaml"):
        modules += pathlib.Path(SITE, package).rglob("*.so")
    for so in modules:
        _copy_with_libraries(str(so), rootfs)
    _copy_with_libraries(shutil.which("test"), rootfs)   # the readiness probe's command, as the image has it
    gpu = make_gpu(memory=4 * GiB)
    gpu.dir.mkdir(exist_ok=True)
    config = check_all(load(MANIFESTS / "20-config.yaml"))["ConfigMap", "fracgpu-node-config"]
    # The host's state folder is the simulated GPU's, so that the test's host jobs meet the pod's books.
    host = {name: tmp_path / name for name in ("node-config", "default-config", "pod-resources", "cdi")}
    for folder in host.values():
        folder.mkdir(mode=0o700)
    host["state"] = gpu.state_dir
    (host["default-config"] / "fracgpu.conf").write_text(config.data["fracgpu.conf"])
    driver = pathlib.Path(SITE, "fracgpu", "_sim")
    volumes = {**host, "libcuda": driver / "libcuda.so.1", "libnvml": driver / "libnvidia-ml.so.1"}
    env = {e.name: e.value for e in node.env if e.value is not None}
    env.update({k: v for k, v in sim.environment(gpu.config).items() if k.startswith("FRACGPU_SIM_")})
    name = f"fracgpu-node-pod-{uuid.uuid4().hex[:12]}"
    command = pod_command(runner, rootfs, node, volumes, env, name, extra=[gpu.dir])
    proc = subprocess.Popen(command, env=runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def exec_(*argv) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", "exec", name, *argv], env=runner.env, capture_output=True, text=True,
                              timeout=60)

    def stop() -> str:
        """Stop the pod as the kubelet does (SIGTERM); the agent's log."""
        subprocess.run(["podman", "kill", "--signal", "TERM", name], env=runner.env, capture_output=True, timeout=60)
        return proc.communicate(timeout=60)[1]

    yield gpu, host, node, proc, exec_, stop
    if proc.poll() is None:
        stop()


def test_the_node_agent_runs_as_the_daemonset_runs_it_and_keeps_the_books_on_the_host(node_pod, shim, kernels):
    gpu, host, node, proc, exec_, stop = node_pod
    probe = node.readiness_probe.var_exec.command
    deadline = time.monotonic() + 60
    while exec_(*probe).returncode != 0:
        assert proc.poll() is None, f"the agent exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the readiness probe does not pass"
        time.sleep(0.5)
    # The books are the host's: a partition made on the host shows in the pod's exporter, the agent records
    # a job of it in the host's ledger, and the bill the README reads in the pod's node container has it.
    gpu.fracgpu("partition", "create", "team-a", "--memory", "1GiB")
    [port] = [p.container_port for p in node.ports if p.name == "metrics"]
    fetch = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%d/metrics').read().decode())"
             % port)
    deadline = time.monotonic() + 30
    while 'partition="team-a"' not in (metrics := exec_("/usr/bin/python3", "-c", fetch).stdout):
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(0.5)
    job = Job(gpu, shim, kernels, "team-a")   # in a pid namespace of its own, as a container's process
    try:
        assert job.ask("alloc 16") == "0"
        report = ["/usr/bin/python3", "-m", "fracgpu", "report", "--format", "json"]
        [record] = wait_for(lambda: json.loads(exec_(*report).stdout or "[]"), bool, 10.0)
        assert (record["partition"], record["kind"], record["processes"]) == ("team-a", "node", 1)
        assert (host["state"] / "ledger.sqlite").exists()
        bill = exec_("/usr/bin/python3", "-m", "fracgpu", "report", "--by", "namespace")
        assert bill.returncode == 0 and record["job"] in bill.stdout, bill.stdout + bill.stderr
    finally:
        job.kill()
    log = stop()
    assert proc.returncode == 0, log
    # It found the (simulated) driver's NVML where the DaemonSet mounts the host's.
    assert "per-process figures cannot be read" not in log, log
