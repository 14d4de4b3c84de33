"""The DRA kubelet plugin (``fracgpu kubelet-plugin``): a partition per prepared claim.

How the kubelet and a DRA driver meet (``k8s.io/kubelet`` ``pkg/apis``):

- The plugin puts a socket in the kubelet's registrar folder
  (``/var/lib/kubelet/plugins_registry/gpu.fracgpu.dev-reg.sock``) serving
  ``pluginregistration.Registration``. The kubelet's plugin watcher finds it, asks
  ``GetInfo`` (type ``DRAPlugin``, the driver's name, the endpoint of the DRA service
  and the gRPC services it offers: ``v1.DRAPlugin``, ``v1beta1.DRAPlugin``), dials the
  endpoint and says ``NotifyRegistrationStatus``. The registration socket is made only
  once the DRA socket serves, so a kubelet never dials an endpoint that is not there.
- Before it starts a pod's containers, the kubelet calls ``NodePrepareResources`` with
  the pod's claims: namespace, name and UID only. The driver reads the claim's
  allocation from the API server (``fracgpu.kube.resources``), and for each GPU of it
  makes the partition ``claim_partition(uid, index)`` with the memory and compute
  share the claim consumed (and the priority and cap of its opaque config). It writes
  one transient CDI spec per claim (kind ``CLAIM_CDI_KIND``, a device
  ``<uid>-gpu<index>`` per partition, made by ``fracgpu.cdi``: the shim, the driver,
  the state folder and the binding to that partition) and answers the CDI device ids,
  which the kubelet hands to the container runtime.
- After the pod is gone the kubelet calls ``NodeUnprepareResources``: the claim's
  partitions and spec are removed. A partition whose processes are still alive is
  not removed: the claim's answer is an error naming them (container and pids), and
  the kubelet retries until they are gone. Nothing is killed.

Errors are per claim, in the answer's ``error`` field, as the kubelet expects: a
claim that does not fit beside what the GPU has promised (a stale slice can let the
scheduler send one) names the promises; a bad opaque config names the claim and the
key. Both calls are idempotent (the kubelet retries them): a claim already prepared
is answered the same, with nothing made twice; unpreparing an unknown claim succeeds.

Prepared claims are kept in a checkpoint (``<plugins dir>/gpu.fracgpu.dev/checkpoint.json``,
replaced atomically), written before a claim's partitions are made, so that a plugin
restarted at any point answers prepare and unprepare of the claims it prepared before:
unprepare finds a claim's partitions by their names, so even a claim the checkpoint
lost is cleaned up whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any

from fracgpu import cdi, files, node, partitions, state
from fracgpu.kube import CLAIM_CDI_KIND, DRIVER, claim_cdi_device, claim_of_partition, claim_partition, resources

__all__ = ["REGISTRAR_DIR", "PLUGINS_DIR", "CDI_ROOT", "SERVICES", "PreparedDevice", "Driver", "Plugin",
           "PrepareError", "spec_path", "registration_socket", "plugin_folder"]

log = logging.getLogger("fracgpu.kube.dra")

REGISTRAR_DIR = "/var/lib/kubelet/plugins_registry"
PLUGINS_DIR = "/var/lib/kubelet/plugins"
CDI_ROOT = cdi.SPEC_DIR
# What the kubelet reads in GetInfo's supported_versions: the gRPC services of the DRA API the
# plugin serves (k8s.io/kubelet/pkg/apis/dra/v1 DRAPluginService, and v1beta1's), newest first.
SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
PLUGIN_TYPE = "DRAPlugin"
CHECKPOINT_VERSION = 1


class PrepareError(ValueError):
    """A claim could not be prepared or unprepared; the message names the claim and why."""


@dataclasses.dataclass(frozen=True)
class PreparedDevice:
    """One allocated device of a prepared claim, as the kubelet is answered."""

    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]
    share_id: str | None = None


def plugin_folder(plugins_dir: str) -> str:
    """The plugin's own folder under the kubelet's plugins folder (its DRA socket, its checkpoint)."""
    return os.path.join(plugins_dir, DRIVER)


def registration_socket(registrar_dir: str) -> str:
    return os.path.join(registrar_dir, f"{DRIVER}-reg.sock")


def spec_path(cdi_root: str, uid: str) -> str:
    """The transient CDI spec of claim ``uid``: ``k8s.gpu.fracgpu.dev-claim_<uid>.json``."""
    return cdi.default_spec_path(CLAIM_CDI_KIND, cdi_root, f"_{uid}")


@dataclasses.dataclass(frozen=True)
class _Partition:
    """What one claim's partition on one GPU holds: the sum of the claim's results on that GPU."""

    gpu_index: int
    memory: int
    compute: float
    priority: str
    cap: bool

    @property
    def limits(self) -> tuple[int, float, bool, str]:
        return self.memory, round(self.compute, 6), self.cap, self.priority


def _partitions_of(claim: str, plans: list[dict]) -> dict[int, _Partition]:
    """One partition per GPU of the claim. Several results of one claim on one GPU (two requests
    placed on the same device) share it: their memory and shares add up, and they must agree on
    priority and cap, which are the partition's."""
    out: dict[int, _Partition] = {}
    for plan in plans:
        index = plan["gpu_index"]
        mine = _Partition(index, plan["memory"], plan["compute"], plan["priority"], plan["cap"])
        have = out.get(index)
        if have is not None:
            if (have.priority, have.cap) != (mine.priority, mine.cap):
                raise PrepareError(f"claim {claim}: its requests on GPU {index} ask for different priorities or "
                                   "caps; one partition per GPU has one of each: give those requests one config")
            mine = _Partition(index, have.memory + mine.memory, min(1.0, have.compute + mine.compute),
                              mine.priority, mine.cap)
        out[index] = mine
    return out


def _answer(uid: str, plans: list[dict]) -> list[PreparedDevice]:
    return [PreparedDevice((p["request"],), p["pool"], p["device"],
                           (f"{CLAIM_CDI_KIND}={claim_cdi_device(uid, p['gpu_index'])}",), p.get("share_id"))
            for p in plans]


class Checkpoint:
    """The claims this plugin prepared (or began to), by UID, in one JSON file replaced atomically."""

    def __init__(self, path: str):
        self.path = path
        self.claims: dict[str, dict] = {}
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise PrepareError(f"the checkpoint {path} cannot be read ({e}); move it away to start afresh (claims "
                               "prepared before are then still unprepared by their partitions' names)") from None
        if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION \
                or not isinstance(data.get("claims"), dict):
            raise PrepareError(f"the checkpoint {path} is not one this plugin wrote (version {CHECKPOINT_VERSION}); "
                               "move it away to start afresh")
        self.claims = data["claims"]

    def save(self) -> None:
        files.write_atomically(self.path, json.dumps({"version": CHECKPOINT_VERSION, "claims": self.claims},
                                                     indent=1, sort_keys=True), mode=0o600, folder_mode=0o750)


class Driver:
    """The node's side of DRA, without the wire: prepare and unprepare claims, publish the slice.

    ``api`` is a ``kubernetes.client.ApiClient`` (``resources.api_client``); ``layout`` is what the
    CDI specs mount (``cdi.Layout.for_node``). Calls are serialised: the kubelet sends few, and a
    claim's partitions, spec and checkpoint entry change together."""

    def __init__(self, api: Any, node_name: str, plugins_dir: str, cdi_root: str, layout: cdi.Layout, *,
                 state_dir: str | None = None, env: Mapping[str, str] | None = None,
                 gpus: Callable[[], list[resources.Gpu]] | None = None):
        self.api, self.node_name, self.cdi_root, self.layout = api, node_name, cdi_root, layout
        self.state_dir, self.env = state_dir, env
        self.folder = plugin_folder(plugins_dir)
        self.checkpoint = Checkpoint(os.path.join(self.folder, "checkpoint.json"))
        self._gpus = gpus or (lambda: resources.node_gpus(env))
        self._lock = threading.Lock()

    def gpus(self) -> list[resources.Gpu]:
        return self._gpus()

    def publish(self) -> None:
        """Publish this node's slice as its GPUs are now (``resources.publish`` writes only what changed)."""
        resources.publish(self.api, self.node_name, self.gpus())

    # -- prepare ---------------------------------------------------------------------------------------------
    def prepare(self, namespace: str, name: str, uid: str) -> list[PreparedDevice]:
        """Prepare claim ``namespace/name`` (``uid``): its partitions and CDI spec, as ``PreparedDevice``s.
        A claim prepared before is answered the same (its partitions made again only if they are
        gone). Raises ``resources.ClaimError`` or ``PrepareError`` naming the claim."""
        claim = f"{namespace}/{name}"
        with self._lock:
            entry = self.checkpoint.claims.get(uid)
            if entry is None:
                gpus = self.gpus()
                got = resources.read_claim(self.api, namespace, name, uid)
                plans = [dataclasses.asdict(p) for p in resources.plan_claim(got, self.node_name, gpus)]
                entry = {"namespace": namespace, "name": name, "plans": plans, "prepared": False}
                _partitions_of(claim, plans)   # refused before anything is written
                self.checkpoint.claims[uid] = entry
                self.checkpoint.save()   # before the partitions: a restart then knows what may exist
            try:
                self._make(claim, uid, entry["plans"])
            except BaseException:
                if not entry["prepared"]:
                    self.checkpoint.claims.pop(uid, None)
                    self.checkpoint.save()
                raise
            if not entry["prepared"]:
                entry["prepared"] = True
                self.checkpoint.save()
            return _answer(uid, entry["plans"])

    def _make(self, claim: str, uid: str, plans: list[dict]) -> None:
        """The claim's partitions (those that exist with the same limits are its own; others are made) and its
        spec. What this call made is removed again when a later one fails."""
        made: list[tuple[str, int]] = []
        try:
            for part in _partitions_of(claim, plans).values():
                name = claim_partition(uid, part.gpu_index)
                have = self._existing(name, part.gpu_index)
                if have is not None:
                    limits = (have.memory_limit or 0, round(have.compute_share or 0.0, 6), have.compute_cap,
                              have.priority)
                    if limits != part.limits:
                        raise PrepareError(f"claim {claim}: partition '{name}' exists with other limits "
                                           f"({_describe(*limits)}) than the claim's ({_describe(*part.limits)}); "
                                           f"remove it (`fracgpu partition rm {name}`) and retry")
                    continue
                try:
                    partitions.create(name, part.memory, compute=part.compute or None, cap=part.cap,
                                      priority=part.priority, device_index=part.gpu_index, state_dir=self.state_dir,
                                      env=self.env)
                except state.DoesNotFit as e:
                    # The promises named; not the CLI's way out (--overcommit), which a claim does not have.
                    reason = str(e).replace(", or pass --overcommit", "")
                    raise PrepareError(f"claim {claim} does not fit on GPU {part.gpu_index}: {reason}") from None
                made.append((name, part.gpu_index))
            indices = sorted({p["gpu_index"] for p in plans})
            devices = {claim_partition(uid, i): claim_cdi_device(uid, i) for i in indices}
            cdi.write_spec(self.layout, list(devices), spec_path(self.cdi_root, uid), CLAIM_CDI_KIND, names=devices)
        except BaseException:
            for name, index in made:
                with contextlib.suppress(Exception):
                    partitions.remove(name, device_index=index, state_dir=self.state_dir, env=self.env)
            raise
        log.info("prepared claim %s (%s): %s", claim, uid, ", ".join(
            f"{claim_partition(uid, p.gpu_index)} {_describe(*p.limits)}"
            for p in _partitions_of(claim, plans).values()))

    def _existing(self, name: str, index: int) -> state.PartitionUsage | None:
        uuid = partitions.device(index, self.env).uuid
        for region in state.open_regions(self.state_dir):
            if region.uuid == uuid:
                return region.partition(name)
        return None

    # -- unprepare -------------------------------------------------------------------------------------------
    def unprepare(self, uid: str, claim: str | None = None) -> None:
        """Remove claim ``uid``'s (``namespace/name``'s) partitions and spec, and forget it; an unknown claim
        is fine. Raises PrepareError naming the processes when a partition is still in use (nothing is
        removed then: the kubelet retries)."""
        with self._lock:
            entry = self.checkpoint.claims.get(uid, {})
            claim = claim or (f"{entry['namespace']}/{entry['name']}" if entry else uid)
            mine = [(p.name, region) for region in state.open_regions(self.state_dir) for p in region.partitions()
                    if (claim_of_partition(p.name) or ("",))[0] == uid]
            busy = [(name, users) for name, region in mine if (users := node.partition_users(region, name))]
            if busy:
                raise PrepareError(f"claim {claim} is still in use: " + "; ".join(
                    f"partition '{name}' by {node.describe_users(users)}" for name, users in busy) +
                    "; it is unprepared once they have ended")
            for name, _ in mine:
                partitions.remove(name, state_dir=self.state_dir, env=self.env)
            names = sorted({name for name, _ in mine} |
                           {claim_partition(uid, p["gpu_index"]) for p in entry.get("plans", [])})
            cdi.remove_spec(self.layout, names, spec_path(self.cdi_root, uid))
            if uid in self.checkpoint.claims:
                del self.checkpoint.claims[uid]
                self.checkpoint.save()
            log.info("unprepared claim %s (%s)%s", claim, uid, f": removed {', '.join(names)}" if mine else "")


def _describe(memory: int, compute: float, cap: bool, priority: str) -> str:
    from fracgpu.units import format_share, format_size

    return (f"{format_size(memory) if memory else 'no memory limit'}, "
            f"{format_share(compute) if compute else 'no share'}{' cap' if cap else ''}, {priority}")


# -- the wire --------------------------------------------------------------------------------------------------
def _claim_errors(claims: Iterable[Any], call: Callable[[Any], Any]) -> dict[str, tuple[Any, str]]:
    """``call(claim)`` for each claim of a request: (result, "") or (None, the error the kubelet is told)."""
    out = {}
    for claim in claims:
        named = f"{claim.namespace}/{claim.name}"
        try:
            out[claim.uid] = (call(claim), "")
            continue
        except (ValueError, state.StateError, OSError) as e:   # ClaimError and PrepareError are ValueErrors
            error = str(e)
        except Exception as e:   # the kubelet retries: tell it, and keep serving
            log.exception("claim %s (%s)", named, claim.uid)
            error = f"{type(e).__name__}: {e}"
        error = error if named in error else f"claim {named}: {error}"
        log.warning("%s", error)
        out[claim.uid] = (None, error)
    return out


def _dra_servicer(driver: Driver, pb2: Any, pb2_grpc: Any) -> Any:
    """The DRAPlugin service of one API version (v1 and v1beta1 have the same messages, but for
    v1's Device.share_id)."""
    has_share_id = "share_id" in pb2.Device.DESCRIPTOR.fields_by_name

    def device(d: PreparedDevice) -> Any:
        out = pb2.Device(request_names=list(d.request_names), pool_name=d.pool, device_name=d.device,
                         cdi_device_ids=list(d.cdi_device_ids))
        if has_share_id and d.share_id:
            out.share_id = d.share_id
        return out

    class Servicer(pb2_grpc.DRAPluginServicer):
        def NodePrepareResources(self, request: Any, context: Any) -> Any:
            done = _claim_errors(request.claims, lambda c: driver.prepare(c.namespace, c.name, c.uid))
            return pb2.NodePrepareResourcesResponse(claims={
                uid: pb2.NodePrepareResourceResponse(devices=[device(d) for d in got or []], error=error)
                for uid, (got, error) in done.items()})

        def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
            done = _claim_errors(request.claims, lambda c: driver.unprepare(c.uid, f"{c.namespace}/{c.name}"))
            return pb2.NodeUnprepareResourcesResponse(claims={
                uid: pb2.NodeUnprepareResourceResponse(error=error) for uid, (_, error) in done.items()})

    return Servicer()


class Plugin:
    """The plugin on the wire: the DRA service on ``<plugins dir>/gpu.fracgpu.dev/dra.sock`` (v1 and
    v1beta1), then the registration service on ``<registrar dir>/gpu.fracgpu.dev-reg.sock``.
    ``stop()`` closes both and removes their sockets."""

    def __init__(self, driver: Driver, registrar_dir: str, plugins_dir: str):
        import grpc

        from fracgpu.kube.api import (dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc,
                                      pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc)

        self.driver = driver
        self.dra_socket = os.path.join(plugin_folder(plugins_dir), "dra.sock")
        self.registration_socket = registration_socket(registrar_dir)
        self.registered = threading.Event()
        self._servers: list[Any] = []
        os.makedirs(os.path.dirname(self.dra_socket), mode=0o750, exist_ok=True)
        os.makedirs(registrar_dir, mode=0o750, exist_ok=True)

        dra = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dra_v1_pb2_grpc.add_DRAPluginServicer_to_server(_dra_servicer(driver, dra_v1_pb2, dra_v1_pb2_grpc), dra)
        dra_v1beta1_pb2_grpc.add_DRAPluginServicer_to_server(
            _dra_servicer(driver, dra_v1beta1_pb2, dra_v1beta1_pb2_grpc), dra)
        self._listen(dra, self.dra_socket)

        plugin = self

        class Registration(pluginregistration_v1_pb2_grpc.RegistrationServicer):
            def GetInfo(self, request: Any, context: Any) -> Any:
                return pluginregistration_v1_pb2.PluginInfo(type=PLUGIN_TYPE, name=DRIVER, endpoint=plugin.dra_socket,
                                                            supported_versions=list(SERVICES))

            def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
                if request.plugin_registered:
                    log.info("registered with the kubelet")
                    plugin.registered.set()
                else:
                    log.error("the kubelet refused the registration: %s", request.error)
                return pluginregistration_v1_pb2.RegistrationStatusResponse()

        registration = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pluginregistration_v1_pb2_grpc.add_RegistrationServicer_to_server(Registration(), registration)
        self._listen(registration, self.registration_socket)   # only now: the endpoint it names serves

    def _listen(self, server: Any, path: str) -> None:
        # A socket left by an earlier run is replaced (the kubelet's plugin watcher expects that).
        files.remove(path)
        if not server.add_insecure_port(f"unix://{path}"):
            raise OSError(f"cannot listen on {path}")
        server.start()
        self._servers.append((server, path))

    def stop(self, grace: float = 1.0) -> None:
        for server, path in reversed(self._servers):
            server.stop(grace).wait()
            files.remove(path)
        self._servers.clear()
