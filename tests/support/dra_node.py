"""A node for the DRA tests: a simulated GPU, the test API server, `fracgpu kubelet-plugin` running
on them (a real process, started and stopped as a DaemonSet would), and the test kubelet."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from fracgpu.kube import DRIVER
from tests.support.kubelet import Claim, Kubelet
from tests.support.simgpu import GiB, SimGPU

NODE = "node-1"
NAMESPACE = "team-a"


@dataclasses.dataclass
class DraNode:
    gpu: SimGPU
    api: object                    # the test API server (tests.support.kube_apiserver.KubeApiServer)
    kubeconfig: pathlib.Path
    folder: pathlib.Path           # short: the sockets live under it
    cdi_root: pathlib.Path
    kubelet: Kubelet
    plugin: subprocess.Popen | None = None
    claims: list[Claim] = dataclasses.field(default_factory=list)

    @property
    def registrar_dir(self) -> pathlib.Path:
        return self.folder / "registry"

    @property
    def plugins_dir(self) -> pathlib.Path:
        return self.folder / "plugins"

    @property
    def checkpoint(self) -> pathlib.Path:
        return self.plugins_dir / DRIVER / "checkpoint.json"

    def plugin_argv(self, *extra) -> list[str]:
        return [sys.executable, "-m", "fracgpu", "kubelet-plugin", "--node-name", NODE, "--kubeconfig",
                str(self.kubeconfig), "--kubelet-registrar-directory-path", str(self.registrar_dir),
                "--kubelet-plugins-directory-path", str(self.plugins_dir), "--cdi-root", str(self.cdi_root),
                "--cdi-config-dir", str(self.folder / "cdi-config"), *extra]

    def start(self, *extra, service: str | None = None):
        """Start the plugin and let the kubelet find it through its registration socket."""
        ready = self.folder / "ready"
        self.plugin = self.gpu.popen(*self.plugin_argv("--ready-file", str(ready), *extra),
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.plugin.poll() is not None:
                raise AssertionError(f"the plugin exited {self.plugin.returncode}: {self.plugin.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the plugin was not ready within 60 s")
            time.sleep(0.05)
        return self.kubelet.discover(DRIVER, service=service)

    def stop(self, sig=signal.SIGTERM) -> str:
        """Stop the plugin; its stderr."""
        self.plugin.send_signal(sig)
        _, err = self.plugin.communicate(timeout=30)
        assert self.plugin.returncode == 0 or sig == signal.SIGKILL, err
        return err

    def claim(self, name: str, memory: str | None, compute: str | None, config: dict | None = None,
              more: tuple[tuple[str, str, str], ...] = (), device: str = "gpu-0") -> Claim:
        """An allocated claim of ``memory`` and ``compute`` percent of ``device`` (None, None: all of it), as
        the scheduler leaves it in the API server; ``more``: (request, memory, compute) of other requests
        of the claim, given shares of the same device."""
        from kubernetes import client

        from tests.support import kube_apiserver

        made = kube_apiserver.allocated_claim(
            NAMESPACE, name, driver=DRIVER, pool=NODE, device=device, request="gpu",
            consumed={"memory": memory, "compute": compute} if memory else None, config=config)
        for request, more_memory, more_compute in more:
            made.status.allocation.devices.results.append(client.V1DeviceRequestAllocationResult(
                request=request, driver=DRIVER, pool=NODE, device=device, share_id=str(uuid.uuid4()),
                consumed_capacity={"memory": more_memory, "compute": more_compute}))
        made = self.api.add_claim(made)
        self.claims.append(Claim(NAMESPACE, name, made["metadata"]["uid"]))
        return self.claims[-1]

    def spec_path(self, claim: Claim) -> pathlib.Path:
        return self.cdi_root / f"k8s.gpu.fracgpu.dev-claim_{claim.uid}.json"


def gpu_config(**settings) -> dict:
    """The opaque config of a claim for this driver: a GpuConfig with ``settings`` (priority, cap)."""
    from fracgpu.kube import resources

    return {"apiVersion": resources.CONFIG_API_VERSION, "kind": resources.CONFIG_KIND, **settings}


@pytest.fixture
def dra_node(make_gpu, tmp_path):
    """A 16 GiB simulated GPU, the test API server, and what it takes to run the plugin on them."""
    from tests.support import kube_apiserver

    gpu = make_gpu(memory=16 * GiB)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dra-", dir="/tmp"))   # unix socket paths stay short
    server = kube_apiserver.KubeApiServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    server.kubeconfig(kubeconfig)
    node = DraNode(gpu, server, kubeconfig, folder, folder / "cdi", Kubelet(str(folder / "registry")))
    yield node
    node.kubelet.close()
    if node.plugin and node.plugin.poll() is None:
        node.plugin.kill()
        node.plugin.wait(timeout=30)
    server.stop()
    for claim in node.claims:   # the spec of a claim a failed test left prepared (cdi_root may be the machine's)
        node.spec_path(claim).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


__all__ = ["DraNode", "NODE", "NAMESPACE", "dra_node", "gpu_config"]
