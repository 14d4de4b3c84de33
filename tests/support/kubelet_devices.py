"""The kubelet's side of the device plugin API (``v1beta1``), played over its real wire protocol.

``TestKubelet`` serves ``v1beta1.Registration`` on a ``kubelet.sock`` in a folder of the test's
own (the kubelet's device plugin folder) and records each ``Register`` call; then, as the
kubelet's device manager does, it dials the endpoint a plugin registered (a socket in that same
folder), reads ``ListAndWatch`` and calls ``GetPreferredAllocation`` and ``Allocate``.
``restart()`` makes a new ``kubelet.sock`` and empties the folder, as a restarted kubelet does.
(The kubelet's pod resources API is played by ``tests.support.podresources``.)
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from fracgpu.kube.api import deviceplugin_v1beta1_pb2 as api
from fracgpu.kube.api import deviceplugin_v1beta1_pb2_grpc as api_grpc


class _Registration(api_grpc.RegistrationServicer):
    def __init__(self, calls: queue.Queue):
        self.calls = calls

    def Register(self, request: api.RegisterRequest, context: grpc.ServicerContext) -> api.Empty:
        self.calls.put(request)
        return api.Empty()


class DeviceStream:
    """A ``ListAndWatch`` stream read in a thread of its own: each answer's devices as
    {id: health}, in order."""

    def __init__(self, stub: api_grpc.DevicePluginStub):
        self._answers: queue.Queue = queue.Queue()
        self._call = stub.ListAndWatch(api.Empty())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self._answers.put({d.ID: d.health for d in answer.devices})
        except grpc.RpcError as e:
            self._answers.put(e)

    def next(self, timeout: float = 30) -> dict[str, str]:
        """The devices of the next answer (AssertionError when none comes within ``timeout``)."""
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"ListAndWatch sent nothing within {timeout} s") from None
        if isinstance(answer, Exception):
            raise AssertionError(f"ListAndWatch ended: {answer}")
        return answer

    def until(self, done: Callable[[dict[str, str]], bool], timeout: float = 30) -> dict[str, str]:
        """The first answer for which ``done`` holds, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.next(max(0.01, deadline - time.monotonic()))
            if done(answer):
                return answer

    def close(self) -> None:
        self._call.cancel()


class TestKubelet:
    """A kubelet's device manager, as far as a device plugin sees it."""

    __test__ = False   # not a test class

    def __init__(self, folder: str):
        self.folder = folder
        self.socket = os.path.join(folder, "kubelet.sock")
        self.registrations: queue.Queue = queue.Queue()
        self._server: grpc.Server | None = None
        self._channels: list[grpc.Channel] = []
        self._start()

    def _start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_grpc.add_RegistrationServicer_to_server(_Registration(self.registrations), server)
        assert server.add_insecure_port(f"unix://{self.socket}") != 0, f"cannot listen on {self.socket}"
        server.start()
        self._server = server

    def registered(self, timeout: float = 60) -> api.RegisterRequest:
        """The next Register call (AssertionError when none comes within ``timeout``)."""
        try:
            return self.registrations.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no device plugin registered within {timeout} s") from None

    def plugin(self, request: api.RegisterRequest) -> api_grpc.DevicePluginStub:
        """The plugin that sent ``request``, dialled at its endpoint as the kubelet dials it."""
        assert request.version == "v1beta1", request
        channel = grpc.insecure_channel(f"unix://{os.path.join(self.folder, request.endpoint)}")
        self._channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        return api_grpc.DevicePluginStub(channel)

    @staticmethod
    def allocate(stub: api_grpc.DevicePluginStub, *containers: Sequence[str]) -> api.AllocateResponse:
        """Allocate, one container request per list of device ids."""
        return stub.Allocate(api.AllocateRequest(container_requests=[
            api.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers]), timeout=120)

    @staticmethod
    def preferred(stub: api_grpc.DevicePluginStub, available: Sequence[str], size: int,
                  must_include: Sequence[str] = ()) -> list[str]:
        """GetPreferredAllocation of one container's ``size`` devices from ``available``."""
        answer = stub.GetPreferredAllocation(api.PreferredAllocationRequest(container_requests=[
            api.ContainerPreferredAllocationRequest(available_deviceIDs=list(available),
                                                    must_include_deviceIDs=list(must_include),
                                                    allocation_size=size)]), timeout=30)
        (container,) = answer.container_responses
        return list(container.deviceIDs)

    def restart(self) -> None:
        """As a restarting kubelet: its socket goes, the folder is emptied of the plugins' sockets, and
        a new kubelet.sock is made."""
        self._server.stop(grace=None).wait()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        self._start()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self._server is not None:
            self._server.stop(grace=None).wait()
