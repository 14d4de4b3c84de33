"""The device plugin: each GPU of the node as N equal slices of ``fracgpu.dev/gpu-slice``, for
clusters without DRA (``fracgpu device-plugin``).

How the kubelet's device manager works with it (device plugin API ``v1beta1``):

- The plugin serves ``v1beta1.DevicePlugin`` on a unix socket in the kubelet's device plugin
  folder, then calls ``v1beta1.Registration/Register`` on the kubelet's ``kubelet.sock`` there,
  naming its socket (relative to the folder) and the resource. The kubelet dials the socket back.
  A restarted kubelet makes a new ``kubelet.sock`` (and empties the folder), and forgets its
  plugins: the plugin watches the socket's inode and registers again, on a new socket of its own
  when its old one was removed.
- ``ListAndWatch`` is a stream of the devices: ``slices`` per GPU, ``kube.slice_id(uuid, k)``,
  each Healthy or Unhealthy, sent again whenever a GPU's health changes. A GPU is unhealthy when
  its driver cannot be asked about it (the probe fails, or no longer lists it) or fracgpu's state
  for it cannot be opened (damaged, of another layout, unsafe): a job there would be refused or
  unlimited. The kubelet gives unhealthy devices to no new container.
- ``GetPreferredAllocation`` chooses a container's slices on one GPU: the one with the fewest free
  slices that still fits, so that whole GPUs stay free for large requests.
- ``Allocate`` turns a container's ``k`` slices of GPU ``i`` into partition
  ``kube.slices_partition(i, slices)`` with ``k/N`` of the GPU's memory and a ``k/N`` compute
  share, and answers one CDI device of kind ``kube.SLICES_CDI_KIND`` naming it; the CDI spec
  (``fracgpu.cdi``) brings the shim, the driver and the binding to the partition. The kubelet may
  call again for the same container (after a restart): the same partition is reused. There is no
  call back when the container ends; ``fracgpu node`` removes the slice partitions no pod holds.
  Until it has, a partition that shares a slice with a new allocation is from a container that has
  gone (the kubelet gives a slice to one container at a time): it is replaced, unless processes
  still use it or the kubelet's pod resources API says a pod holds it.

GPU ``i`` is the CUDA index as the plugin's environment numbers the GPUs (run it without
``CUDA_VISIBLE_DEVICES``, so that it sees every GPU of the node).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures

import grpc

from fracgpu import cdi, devices, files, kube, node, partitions, state
from fracgpu.kube import podresources
from fracgpu.kube.api import deviceplugin_v1beta1_pb2 as api
from fracgpu.kube.api import deviceplugin_v1beta1_pb2_grpc as api_grpc

__all__ = ["API_VERSION", "HEALTHY", "UNHEALTHY", "SOCKET", "MAX_SLICES", "GPU", "AllocationError", "check_slices",
           "slice_ids", "gpu_of", "preferred", "spec_path", "held_slices", "check_health", "SlicePlugin",
           "DevicePlugin"]

log = logging.getLogger("fracgpu.kube.device_plugin")

API_VERSION = "v1beta1"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
KUBELET_SOCKET = "kubelet.sock"
SOCKET = "fracgpu-gpu-slice.sock"
MAX_SLICES = 64
REGISTER_TIMEOUT_S = 10
REGISTER_RETRY_S = 2.0
POD_RESOURCES_TIMEOUT_S = 5


class AllocationError(ValueError):
    """Device ids that are not one GPU's slices of this plugin; the message names them."""


def check_slices(slices: object) -> int:
    """``slices`` when it is a number of slices per GPU (1 to ``MAX_SLICES``); ValueError otherwise."""
    if isinstance(slices, bool) or not isinstance(slices, int) or not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"the slices per GPU must be a whole number from 1 to {MAX_SLICES}, not {slices!r}")
    return slices


@dataclasses.dataclass(frozen=True)
class GPU:
    """A GPU the plugin advertises: its CUDA index (as the plugin's environment numbers it), UUID,
    name and memory."""

    index: int
    uuid: str
    name: str
    total_memory: int

    @classmethod
    def of(cls, device: devices.Device) -> GPU:
        return cls(device.index, device.uuid, device.name, device.total_memory)


def slice_ids(gpu: GPU, slices: int) -> list[str]:
    """The device ids of ``gpu``'s slices."""
    return [kube.slice_id(gpu.uuid, k) for k in range(slices)]


def gpu_of(device_ids: Sequence[str], gpus: Sequence[GPU], slices: int) -> tuple[GPU, list[int]]:
    """The one GPU ``device_ids`` are slices of, and their slice numbers; AllocationError naming the
    ids that are not this plugin's slices, or the GPUs when they are of several."""
    if not device_ids:
        raise AllocationError("no device ids: a container asks for at least one slice")
    by_uuid = {g.uuid: g for g in gpus}
    found: dict[str, list[int]] = {}
    unknown = []
    for device_id in device_ids:
        parsed = kube.parse_slice_id(device_id)
        if parsed is None or parsed[0] not in by_uuid or not 0 <= parsed[1] < slices:
            unknown.append(device_id)
        else:
            found.setdefault(parsed[0], []).append(parsed[1])
    if unknown:
        raise AllocationError(f"unknown device id{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: this "
                              f"plugin's {kube.SLICE_RESOURCE} devices are <GPU uuid>::<0..{slices - 1}> of "
                              f"{', '.join(by_uuid) or 'no GPU'}")
    if len(found) > 1:
        spread = "; ".join(f"{', '.join(kube.slice_id(u, k) for k in ks)} on GPU {by_uuid[u].index}"
                           for u, ks in found.items())
        raise AllocationError(f"a container's {kube.SLICE_RESOURCE} slices must be of one GPU, not several: "
                              f"{spread}; ask for at most {slices} slices, which one GPU has")
    (uuid, ks), = found.items()
    if len(set(ks)) != len(ks):
        raise AllocationError(f"device ids repeated: {', '.join(device_ids)}")
    return by_uuid[uuid], sorted(ks)


def preferred(available: Iterable[str], must_include: Iterable[str], size: int) -> list[str]:
    """The ``size`` slices to give a container, chosen from ``available`` with ``must_include``
    among them, all of one GPU: the GPU with the fewest available slices that still has ``size``
    (ties: the first in order), so that whole GPUs stay free; its lowest slice numbers first.
    Empty when no GPU has ``size`` available slices (with ``must_include``): the kubelet then
    chooses, and ``Allocate`` refuses slices of several GPUs."""
    per_gpu: dict[str, list[int]] = {}
    for device_id in available:
        parsed = kube.parse_slice_id(device_id)
        if parsed is not None:
            per_gpu.setdefault(parsed[0], []).append(parsed[1])
    required = [kube.parse_slice_id(d) for d in must_include]
    if any(r is None for r in required) or len({r[0] for r in required}) > 1:
        return []
    chosen_ks = {r[1] for r in required}
    candidates = [(len(ks), uuid) for uuid, ks in per_gpu.items()
                  if len(ks) >= size and (not required or uuid == required[0][0])
                  and chosen_ks <= set(ks)]
    if not candidates or size < len(chosen_ks):
        return []
    _, uuid = min(candidates, key=lambda c: c[0])   # min keeps the first of equals
    rest = [k for k in sorted(set(per_gpu[uuid])) if k not in chosen_ks]
    ks = sorted(chosen_ks) + rest[:size - len(chosen_ks)]
    return [kube.slice_id(uuid, k) for k in sorted(ks)]


def spec_path(cdi_root: str) -> str:
    """The one CDI spec file of every slice partition of the node, in ``cdi_root``."""
    return cdi.default_spec_path(kube.SLICES_CDI_KIND, cdi_root)


def _share_equal(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) < 1e-6


class SlicePlugin(api_grpc.DevicePluginServicer):
    """The ``v1beta1.DevicePlugin`` service: the slices, their health, and their partitions.

    ``gpus`` are the GPUs to advertise, healthy or not as ``check_health`` says; ``refresh()`` asks
    it again and wakes the streams when it changed. ``pod_resources``: the kubelet's pod resources
    socket, asked before a partition of slices is taken for gone (``held_slices``)."""

    def __init__(self, gpus: Sequence[GPU], slices: int, layout: cdi.Layout, cdi_root: str, *,
                 state_dir: str | None = None, env: Mapping[str, str] | None = None,
                 pod_resources: str | None = None):
        self.gpus = list(gpus)
        self.pod_resources = pod_resources
        self.slices = check_slices(slices)
        self.layout = layout
        self.cdi_root = cdi_root
        self.state_dir = state.resolve_state_dir(state_dir)
        self.env = env
        self._changed = threading.Condition()
        self._health = check_health(self.gpus, self.state_dir, self.env)
        self._generation = 0
        self._stopped = False
        self._allocating = threading.Lock()

    # -- health -------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Asks the GPUs' health again; True (and the streams send the devices again) when it changed."""
        now = check_health(self.gpus, self.state_dir, self.env)
        with self._changed:
            if now == self._health:
                return False
            for g in self.gpus:
                if now.get(g.uuid) != self._health.get(g.uuid):
                    log.warning("GPU %d (%s) is now %s", g.index, g.uuid, HEALTHY if now.get(g.uuid) else UNHEALTHY)
            self._health = now
            self._generation += 1
            self._changed.notify_all()
            return True

    def stop(self) -> None:
        """Ends every ListAndWatch stream."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def devices(self) -> list[api.Device]:
        with self._changed:
            health = dict(self._health)
        return [api.Device(ID=device_id, health=HEALTHY if health.get(g.uuid) else UNHEALTHY)
                for g in self.gpus for device_id in slice_ids(g, self.slices)]

    # -- the service --------------------------------------------------------------------------------
    def GetDevicePluginOptions(self, request: api.Empty, context: grpc.ServicerContext) -> api.DevicePluginOptions:
        return options()

    def ListAndWatch(self, request: api.Empty, context: grpc.ServicerContext) -> Iterator[api.ListAndWatchResponse]:
        seen = -1
        while True:
            with self._changed:
                while not self._stopped and self._generation == seen and context.is_active():
                    self._changed.wait(timeout=1.0)
                if self._stopped or not context.is_active():
                    return
                seen = self._generation
            yield api.ListAndWatchResponse(devices=self.devices())

    def GetPreferredAllocation(self, request: api.PreferredAllocationRequest,
                               context: grpc.ServicerContext) -> api.PreferredAllocationResponse:
        return api.PreferredAllocationResponse(container_responses=[
            api.ContainerPreferredAllocationResponse(deviceIDs=preferred(
                r.available_deviceIDs, r.must_include_deviceIDs, r.allocation_size))
            for r in request.container_requests])

    def Allocate(self, request: api.AllocateRequest, context: grpc.ServicerContext) -> api.AllocateResponse:
        try:
            return api.AllocateResponse(container_responses=[
                api.ContainerAllocateResponse(cdi_devices=[api.CDIDevice(name=f"{kube.SLICES_CDI_KIND}={name}")])
                for name in self.allocate([list(r.devices_ids) for r in request.container_requests])])
        except AllocationError as e:
            log.error("Allocate refused: %s", e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (ValueError, state.StateError, devices.DeviceError, OSError) as e:
            log.error("Allocate failed: %s", e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    def PreStartContainer(self, request: api.PreStartContainerRequest,
                          context: grpc.ServicerContext) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()   # options() says it is not needed; answered all the same

    # -- partitions ---------------------------------------------------------------------------------
    def allocate(self, containers: Sequence[Sequence[str]]) -> list[str]:
        """The partition of each container's device ids (made, or reused when it has these limits),
        and the CDI spec written with them; AllocationError for ids that are not one GPU's slices."""
        chosen = [gpu_of(ids, self.gpus, self.slices) for ids in containers]   # all checked before any is made
        with self._allocating:
            names = [self._partition(gpu, ks) for gpu, ks in chosen]
            self.write_spec()
        return names

    def _partition(self, gpu: GPU, ks: list[int]) -> str:
        name = kube.slices_partition(gpu.index, ks)
        memory = gpu.total_memory * len(ks) // self.slices
        share = len(ks) / self.slices
        region = next((r for r in state.open_regions(self.state_dir) if r.uuid == gpu.uuid), None)
        existing = region.partition(name) if region else None
        if existing is not None:
            if existing.memory_limit == memory and _share_equal(existing.compute_share, share):
                log.info("slices %s of GPU %d: partition %s again", ks, gpu.index, name)
                return name
            users = node.partition_users(region, name)
            if users:
                raise AllocationError(f"partition '{name}' exists with other limits and is in use by "
                                      f"{node.describe_users(users)}; it is not changed under them")
            partitions.update(name, memory=memory, compute=share, device_index=gpu.index, state_dir=self.state_dir,
                              env=self.env)
            log.info("slices %s of GPU %d: partition %s set to %d bytes, share %.4g", ks, gpu.index, name, memory,
                     share)
            return name
        if region is not None:
            self._remove_stale(region, gpu, ks)
        partitions.create(name, memory, compute=share, device_index=gpu.index, state_dir=self.state_dir,
                          env=self.env)
        log.info("slices %s of GPU %d: partition %s made, %d bytes, share %.4g", ks, gpu.index, name, memory, share)
        return name

    def _remove_stale(self, region: state.Region, gpu: GPU, ks: list[int]) -> None:
        """Removes the partitions of slices of ``gpu`` that share a slice with ``ks``. The kubelet gives a
        slice to one container at a time, so such a partition's container is gone, and its promise
        would keep the new one from fitting until ``fracgpu node`` saw the pod go. One that still has
        processes (its container is still ending), or whose slices the kubelet's pod resources API
        says a pod holds, is an AllocationError naming them."""
        holders: dict[str, str] | None = None
        for p in region.partitions():
            held = _slices_of(p.name, gpu.index)
            if not held or not held & set(ks):
                continue
            if holders is None:
                holders = held_slices(self.pod_resources) or {}
            pods = sorted({holders[i] for i in (kube.slice_id(gpu.uuid, k) for k in held) if i in holders})
            if pods:
                raise AllocationError(f"slices {', '.join(map(str, sorted(held & set(ks))))} of GPU {gpu.index} are "
                                      f"still in partition '{p.name}', which the kubelet's pod resources say "
                                      f"{', '.join(pods)} holds; it is not removed")
            users = node.partition_users(region, p.name)
            if users:
                raise AllocationError(f"slices {', '.join(map(str, sorted(held & set(ks))))} of GPU {gpu.index} are "
                                      f"still in partition '{p.name}', in use by {node.describe_users(users)}; "
                                      "the kubelet will retry once they have ended")
            partitions.remove(p.name, device_index=gpu.index, state_dir=self.state_dir, env=self.env)
            log.info("removed partition %s: its slices were given to another container", p.name)

    def write_spec(self) -> None:
        """Writes the CDI spec of every slice partition of the node (one file; atomically)."""
        names = sorted({p.name for g in state.usage(self.state_dir) for p in g.partitions
                        if kube.is_slices_partition(p.name)})
        cdi.write_spec(self.layout, names, spec_path(self.cdi_root), kube.SLICES_CDI_KIND)


def _slices_of(partition: str, index: int) -> set[int]:
    """The slices of GPU ``index`` that ``partition`` is made of, when its name lists them (a name too
    long for that carries a digest: empty, as for any other partition)."""
    found = kube.slices_of_partition(partition)
    return set(found[1]) if found and found[0] == index and found[1] is not None else set()


def options() -> api.DevicePluginOptions:
    """What the plugin offers the kubelet: preferred allocations; no pre-start call."""
    return api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


def held_slices(socket: str | None) -> dict[str, str] | None:
    """The slices pods hold, by the kubelet's pod resources API (``v1.PodResourcesLister/List`` on
    ``socket``): each slice id to ``namespace/pod/container``. None when there is no such socket or
    it does not answer."""
    if not socket or not os.path.exists(socket):
        return None
    try:
        answer = podresources.list_pods(socket, timeout=POD_RESOURCES_TIMEOUT_S)
    except podresources.PodResourcesError as e:
        log.warning("%s", e)
        return None
    return {device_id: f"{pod.namespace}/{pod.name}/{container.name}"
            for pod in answer.pod_resources for container in pod.containers for devices_ in container.devices
            if devices_.resource_name == kube.SLICE_RESOURCE for device_id in devices_.device_ids}


def check_health(gpus: Sequence[GPU], state_dir: str, env: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Whether each GPU (by UUID) can be used now: its driver lists it, and fracgpu's state for it
    opens (it is made when it does not exist yet)."""
    try:
        present = {d.uuid: d for d in devices.probe(env)}
    except devices.DeviceError as e:
        log.warning("the driver cannot list the GPUs: %s", e)
        return {g.uuid: False for g in gpus}
    health = {}
    for g in gpus:
        device = present.get(g.uuid)
        if device is None:
            log.warning("the driver no longer lists GPU %s", g.uuid)
            health[g.uuid] = False
            continue
        try:
            state.open_region(state_dir, g.uuid, device.name, device.total_memory)
            health[g.uuid] = True
        except (state.StateError, OSError, ValueError) as e:   # damaged, another layout, unsafe, unreadable
            log.warning("fracgpu's state for GPU %s cannot be used: %s", g.uuid, e)
            health[g.uuid] = False
    return health


class DevicePlugin:
    """The plugin as a service: serves ``plugin`` on ``SOCKET`` in ``folder``, registers with the
    kubelet's socket there, and again whenever the kubelet's socket is made anew; asks the GPUs'
    health every ``health_interval`` seconds."""

    def __init__(self, plugin: SlicePlugin, folder: str, *, health_interval: float = 5.0,
                 ready_file: str | None = None):
        self.plugin = plugin
        self.folder = folder
        self.socket = os.path.join(folder, SOCKET)
        self.kubelet = os.path.join(folder, KUBELET_SOCKET)
        self.health_interval = health_interval
        self.ready_file = ready_file
        self._server: grpc.Server | None = None
        self._socket_inode: int | None = None

    def run(self, stop: threading.Event) -> None:
        """Serves until ``stop`` is set; removes its socket and ready file at the end."""
        registered: int | None = None   # the inode of the kubelet socket it registered with
        retry_at = 0.0                   # after a refused registration, when to try again
        next_health = time.monotonic() + self.health_interval
        try:
            self._serve()
            while True:
                if _inode(self.socket) != self._socket_inode:
                    log.info("its socket %s was removed (a kubelet restart empties the folder): serving anew",
                             self.socket)
                    self._serve()
                    registered = None
                kubelet = _inode(self.kubelet)
                if kubelet is not None and kubelet != registered and time.monotonic() >= retry_at:
                    registered = kubelet if self._register() else None
                    retry_at = time.monotonic() + REGISTER_RETRY_S
                    if registered is not None and self.ready_file:
                        files.write_atomically(self.ready_file, f"{os.getpid()}\n{self.socket}\n")
                if time.monotonic() >= next_health:
                    self.plugin.refresh()
                    next_health = time.monotonic() + self.health_interval
                if stop.wait(min(0.5, self.health_interval)):
                    break
        finally:
            self.plugin.stop()
            if self._server is not None:
                self._server.stop(grace=1).wait()
            if _inode(self.socket) == self._socket_inode:
                files.remove(self.socket)
            if self.ready_file:
                files.remove(self.ready_file)

    def _serve(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
        files.remove(self.socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="device-plugin"))
        api_grpc.add_DevicePluginServicer_to_server(self.plugin, server)
        if server.add_insecure_port(f"unix://{self.socket}") == 0:
            raise OSError(f"cannot listen on {self.socket}")
        server.start()
        self._server = server
        self._socket_inode = _inode(self.socket)

    def _register(self) -> bool:
        """Registers with the kubelet; False (it is tried again) when the kubelet does not answer."""
        request = api.RegisterRequest(version=API_VERSION, endpoint=SOCKET, resource_name=kube.SLICE_RESOURCE,
                                      options=options())
        try:
            with grpc.insecure_channel(f"unix://{self.kubelet}") as channel:
                api_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_S)
        except grpc.RpcError as e:
            log.warning("the kubelet (%s) did not take the registration: %s %s; trying again", self.kubelet,
                        e.code().name, e.details())
            return False
        log.info("registered %s with the kubelet (%s): %d GPU(s), %d slices each", kube.SLICE_RESOURCE, self.kubelet,
                 len(self.plugin.gpus), self.plugin.slices)
        return True


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
