"""A test kubelet, DRA side: plugin registration and the DRAPlugin calls, over the real wire.

It does what the kubelet's plugin watcher and DRA manager do (``pkg/kubelet/pluginmanager``,
``pkg/kubelet/cm/dra``): finds a registration socket in the registrar folder, asks
``GetInfo``, checks it is a DRA plugin offering a service it speaks, dials the endpoint,
says ``NotifyRegistrationStatus(plugin_registered=True)``, and then prepares and unprepares
claims through the newest service both offer (or the one a test names).
"""

from __future__ import annotations

import dataclasses
import os
import time

import grpc

from fracgpu.kube.api import (dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc,
                              pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc)

# The DRA services a kubelet speaks, newest first: the name in supported_versions, and its stubs.
SERVICES = {"v1.DRAPlugin": (dra_v1_pb2, dra_v1_pb2_grpc), "v1beta1.DRAPlugin": (dra_v1beta1_pb2, dra_v1beta1_pb2_grpc)}


@dataclasses.dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    uid: str


@dataclasses.dataclass
class Registered:
    """A plugin the kubelet found: its socket, what GetInfo said, and the service chosen."""

    socket: str
    info: pluginregistration_v1_pb2.PluginInfo
    service: str


def _wait_for_socket_server(target: str, timeout: float) -> grpc.Channel:
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return channel


class Kubelet:
    """The test kubelet for one registrar folder."""

    def __init__(self, registrar_dir: str):
        self.registrar_dir = registrar_dir
        self.plugins: dict[str, Registered] = {}
        self._channels: list[grpc.Channel] = []

    def discover(self, driver: str, timeout: float = 30.0, service: str | None = None) -> Registered:
        """Scan the registrar folder until a socket's GetInfo names ``driver`` as a DRA plugin, register it
        (``service``: the DRA service to use, else the newest both speak) and return it."""
        deadline = time.monotonic() + timeout
        last = "no socket"
        while time.monotonic() < deadline:
            for entry in sorted(os.listdir(self.registrar_dir)) if os.path.isdir(self.registrar_dir) else []:
                path = os.path.join(self.registrar_dir, entry)
                if entry.startswith(".") or not entry.endswith(".sock"):
                    continue
                try:
                    found = self._register(path, driver, service)
                except grpc.RpcError as e:
                    last = f"{path}: {e.code()} {e.details()}"
                    continue
                except grpc.FutureTimeoutError:
                    last = f"{path}: does not answer"
                    continue
                if found:
                    self.plugins[driver] = found
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no DRA plugin {driver} registered in {self.registrar_dir} within {timeout}s ({last})")

    def _register(self, path: str, driver: str, service: str | None) -> Registered | None:
        channel = _wait_for_socket_server(f"unix://{path}", 2.0)
        try:
            registration = pluginregistration_v1_pb2_grpc.RegistrationStub(channel)
            info = registration.GetInfo(pluginregistration_v1_pb2.InfoRequest(), timeout=5)
            if info.type != "DRAPlugin" or info.name != driver:
                return None
            offered = [s for s in SERVICES if s in info.supported_versions]
            chosen = service or (offered[0] if offered else None)
            if chosen not in offered:
                registration.NotifyRegistrationStatus(pluginregistration_v1_pb2.RegistrationStatus(
                    plugin_registered=False, error=f"none of {list(info.supported_versions)} is spoken here"),
                    timeout=5)
                raise AssertionError(f"{driver} offers {list(info.supported_versions)}, not "
                                     f"{service or list(SERVICES)}")
            _wait_for_socket_server(f"unix://{info.endpoint}", 5.0).close()
            registration.NotifyRegistrationStatus(pluginregistration_v1_pb2.RegistrationStatus(plugin_registered=True),
                                                  timeout=5)
            return Registered(path, info, chosen)
        finally:
            channel.close()

    def _stub(self, driver: str, service: str | None):
        plugin = self.plugins[driver]
        pb2, pb2_grpc = SERVICES[service or plugin.service]
        channel = grpc.insecure_channel(f"unix://{plugin.info.endpoint}")
        self._channels.append(channel)
        return pb2, pb2_grpc.DRAPluginStub(channel)

    def prepare(self, driver: str, claims: list[Claim], service: str | None = None, timeout: float = 60):
        """NodePrepareResources: the answer per claim UID (devices, error)."""
        pb2, stub = self._stub(driver, service)
        request = pb2.NodePrepareResourcesRequest(
            claims=[pb2.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims])
        return dict(stub.NodePrepareResources(request, timeout=timeout).claims)

    def unprepare(self, driver: str, claims: list[Claim], service: str | None = None, timeout: float = 60):
        """NodeUnprepareResources: the error per claim UID ("" when done)."""
        pb2, stub = self._stub(driver, service)
        request = pb2.NodeUnprepareResourcesRequest(
            claims=[pb2.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims])
        return {uid: r.error for uid, r in stub.NodeUnprepareResources(request, timeout=timeout).claims.items()}

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
