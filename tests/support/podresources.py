"""The kubelet's pod resources service (``v1.PodResourcesLister``), played over its real wire protocol.

A gRPC server on a unix socket answers ``List``, ``Get`` and
``GetAllocatableResources`` from the pods the test sets (``set_pods``) and
changes while it runs, as a kubelet's answers change when pods come and go.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures

import grpc

from fracgpu import kube
from fracgpu.kube.api import podresources_v1_pb2 as pb
from fracgpu.kube.api import podresources_v1_pb2_grpc as pb_grpc


@dataclasses.dataclass
class Container:
    name: str
    slices: dict[str, list[int]] = dataclasses.field(default_factory=dict)   # GPU uuid -> slice numbers
    # (claim name, claim namespace, CDI device ids) of each DRA claim it uses
    claims: list[tuple[str, str, list[str]]] = dataclasses.field(default_factory=list)

    def message(self) -> pb.ContainerResources:
        devices = [pb.ContainerDevices(resource_name=kube.SLICE_RESOURCE,
                                       device_ids=[kube.slice_id(uuid, k) for k in ks])
                   for uuid, ks in self.slices.items()]
        claims = [pb.DynamicResource(claim_name=name, claim_namespace=namespace, claim_resources=[
                      pb.ClaimResource(cdi_devices=[pb.CDIDevice(name=d) for d in cdi], driver_name=kube.DRIVER,
                                       pool_name="node", device_name="gpu-0")])
                  for name, namespace, cdi in self.claims]
        return pb.ContainerResources(name=self.name, devices=devices, dynamic_resources=claims)


@dataclasses.dataclass
class Pod:
    namespace: str
    name: str
    containers: list[Container]

    def message(self) -> pb.PodResources:
        return pb.PodResources(name=self.name, namespace=self.namespace,
                               containers=[c.message() for c in self.containers])


class PodResourcesService(pb_grpc.PodResourcesListerServicer):
    """The kubelet's side: the pods it lists now, and how many times it was asked."""

    def __init__(self, allocatable: dict[str, int] | None = None):
        self._lock = threading.Lock()
        self._pods: list[Pod] = []
        self.allocatable = allocatable or {}   # GPU uuid -> its number of slices
        self.lists = 0

    def set_pods(self, *pods: Pod) -> None:
        with self._lock:
            self._pods = list(pods)

    def List(self, request, context):
        with self._lock:
            self.lists += 1
            return pb.ListPodResourcesResponse(pod_resources=[p.message() for p in self._pods])

    def Get(self, request, context):
        with self._lock:
            pod = next((p for p in self._pods if (p.name, p.namespace) == (request.pod_name, request.pod_namespace)),
                       None)
        if pod is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found")
        return pb.GetPodResourcesResponse(pod_resources=pod.message())

    def GetAllocatableResources(self, request, context):
        return pb.AllocatableResourcesResponse(devices=[
            pb.ContainerDevices(resource_name=kube.SLICE_RESOURCE, device_ids=[kube.slice_id(uuid, k) for k in range(n)])
            for uuid, n in self.allocatable.items()])


class Served:
    """A PodResourcesService listening on ``socket_path`` until ``stop()``."""

    def __init__(self, socket_path: str, service: PodResourcesService | None = None):
        self.socket_path = str(socket_path)
        self.service = service or PodResourcesService()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_PodResourcesListerServicer_to_server(self.service, self.server)
        self.server.add_insecure_port(f"unix://{self.socket_path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)
