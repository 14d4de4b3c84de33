"""The DRA driver's side of the API server: the ResourceSlice it publishes, and the claims it reads.

**What the node publishes.** One ResourceSlice (``resource.k8s.io/v1``) per node for ``DRIVER``, in one
pool named after the node, with one device per GPU, named ``gpu-<index>`` (``device_name``). Each
device allows multiple allocations (consumable capacity, KEP-5075) and has two capacities:

- ``memory``: the GPU's memory in bytes. A claim consumes it in steps of ``MEMORY_STEP`` (256Mi),
  at least one step; one that names no memory consumes the whole GPU's (rounded down to a step).
  Why 256Mi: a CUDA context alone takes 300-600 MiB of a real GPU (and is charged to the claim), so a
  finer grain buys a job nothing it could use, while the scheduler rounds each request up to the next
  step, so no claim is given (and billed) more than 256Mi beyond what it asked for. Peers differ:
  HAMi's driver uses 1Mi steps.
- ``compute``: the share of the GPU's time promised, in percent, 0 to 100 in steps of 1; one that
  names none consumes 0: no promise, the claim's work runs on the time the shares leave (so that a
  claim for memory alone still shares the GPU, rather than taking all of its time).

and these attributes (in the driver's domain, so a selector reads
``device.attributes["gpu.fracgpu.dev"].productName``): ``type`` ("gpu"), ``uuid``, ``productName``,
``index`` (int), ``memory`` (int, bytes), ``computeCapability`` (version, "9.0.0"), ``driverVersion``
(version: the NVIDIA driver's, "580.65.6", as NVIDIA's DRA driver names it), ``cudaDriverVersion``
(version: the CUDA version the node's driver implements, "13.0.0") and ``simulated`` (bool).

``publish`` keeps that slice current: it creates it, or updates it (bumping the pool's generation)
when the GPUs changed, and deletes any other slice of this driver on this node.

**What a claim asks for.** The kubelet gives the plugin a claim's namespace, name and UID only;
``read_claim`` fetches it and ``plan_claim`` turns its allocation into one ``DevicePlan`` per GPU.
A device's share is what the scheduler wrote into ``consumedCapacity`` (``{"memory": "8Gi",
"compute": "25"}``); a result without it (an exclusive allocation) gets the whole GPU. The claim may
carry opaque configuration for ``DRIVER`` (from its DeviceClass, then from the claim; for the same
key, the claim's wins)::

    {"apiVersion": "gpu.fracgpu.dev/v1alpha1", "kind": "GpuConfig", "priority": "high", "cap": true}

``priority`` is high, normal (the default) or low; ``cap: true`` holds the partition to its compute
share even when the GPU is otherwise idle (default false: it may use what others leave).

What the plugin's service account needs (RBAC, API group ``resource.k8s.io``): ``resourceslices``: get, list,
create, update, delete; ``resourceclaims``: get; and (core group) ``nodes``: get, for the slice's owner
reference: the node, so that the API server's garbage collector deletes the slice with it.

Needs the ``kubernetes`` extra: ``pip install 'fracgpu[kubernetes]'``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fracgpu import devices, sim
from fracgpu.kube import DRIVER

if TYPE_CHECKING:   # the kubernetes client is imported where it is used: `import fracgpu.kube.resources` needs nothing
    import kubernetes

__all__ = ["API_VERSION", "CONFIG_API_VERSION", "CONFIG_KIND", "MEMORY_STEP", "PRIORITIES", "ApiConfigError",
           "ClaimError", "DevicePlan", "Gpu", "api_client", "byte_quantity", "device_name", "node_gpus", "node_slice",
           "node_uid", "plan_claim", "publish", "read_claim", "slice_name_prefix", "unpublish"]

log = logging.getLogger("fracgpu.kube.resources")

API_VERSION = "resource.k8s.io/v1"
CONFIG_API_VERSION = "gpu.fracgpu.dev/v1alpha1"
CONFIG_KIND = "GpuConfig"
PRIORITIES = ("high", "normal", "low")

MiB = 1 << 20
MEMORY_STEP = 256 * MiB
MEMORY_CAPACITY = "memory"
COMPUTE_CAPACITY = "compute"
_CONFIG_KEYS = ("apiVersion", "kind", "priority", "cap")
_UPDATE_TRIES = 5   # a publish that keeps meeting a newer slice (another writer) gives up after this many


class ApiConfigError(ValueError):
    """No way to reach the API server: no kubeconfig given and not in a pod, or a kubeconfig that does not load."""


class ClaimError(ValueError):
    """A claim this node cannot prepare. The message names the claim (``namespace/name``) and the problem;
    ``key`` is the configuration or capacity key at fault, when one is."""

    def __init__(self, namespace: str, name: str, problem: str, key: str | None = None):
        super().__init__(f"resource claim {namespace}/{name}: {problem}")
        self.claim = f"{namespace}/{name}"
        self.problem = problem
        self.key = key


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """A client of the API server: from the kubeconfig file when one is given, else the pod's own service
    account (in-cluster: ``KUBERNETES_SERVICE_HOST`` and the mounted token). ApiConfigError when neither is
    there, the file does not load, or the ``kubernetes`` extra is not installed."""
    try:
        import yaml
        from kubernetes import client, config
    except ImportError:
        raise ApiConfigError("the Kubernetes client is not installed: pip install 'fracgpu[kubernetes]'") from None
    if kubeconfig:
        if not os.path.isfile(kubeconfig):
            raise ApiConfigError(f"the kubeconfig {kubeconfig} does not exist")
        try:
            return config.new_client_from_config(config_file=kubeconfig)
        except (config.ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError) as e:
            raise ApiConfigError(f"the kubeconfig {kubeconfig} cannot be used: {e}") from None
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise ApiConfigError("no API server to talk to: give a kubeconfig file (--kubeconfig), or run in a pod, "
                             "where KUBERNETES_SERVICE_HOST and the service account's token are set")
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as e:
        raise ApiConfigError(f"in a pod (KUBERNETES_SERVICE_HOST is set) but its service account cannot be "
                             f"used: {e}; or give a kubeconfig file (--kubeconfig)") from None
    return client.ApiClient(configuration)


# ---------------------------------------------------------------------------------------------------------------
# What the node publishes
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU of the node, as the slice publishes it."""

    index: int                 # CUDA index on the node (the plugin sees every GPU)
    uuid: str                  # "GPU-8-4-4-4-12"
    name: str                  # product name
    memory: int                # bytes
    compute_capability: str    # "9.0"; "" when the driver does not say
    driver_version: str        # the CUDA version the driver implements, "13.0"; "" when it does not say
    simulated: bool            # the simulated GPU, not a real one
    nvidia_driver_version: str = ""   # the NVIDIA driver's version (NVML), "580.65.06"; "" when it does not say


def node_gpus(env: Mapping[str, str] | None = None) -> list[Gpu]:
    """The node's GPUs, as the driver that ``env`` (default: this process's) selects shows them (the
    simulated one when ``env`` selects it). DeviceError when there is no driver or no GPU."""
    env = dict(os.environ if env is None else env)
    simulated = sim.selected(env)
    return [Gpu(d.index, d.uuid, d.name, d.total_memory, d.compute_capability, d.driver_version, simulated,
                d.nvidia_driver_version) for d in devices.probe(env)]


def device_name(gpu: Gpu) -> str:
    """The GPU's device name in the slice (a DNS label): ``gpu-<index>``."""
    return f"gpu-{gpu.index}"


def slice_name_prefix(node_name: str) -> str:
    """The ``generateName`` of this node's slice: ``<node>-gpu.fracgpu.dev-`` (the API server adds a suffix)."""
    return f"{node_name}-{DRIVER}-"


def _version(text: str) -> str | None:
    """"9.0" as semver wants it, "9.0.0"; None for no version."""
    parts = [p for p in text.split(".") if p]
    if not parts or not all(p.isdigit() for p in parts):
        return None
    parts = [str(int(p)) for p in parts[:3]]
    return ".".join(parts + ["0"] * (3 - len(parts)))


_BINARY = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def byte_quantity(n: int) -> str:
    """``n`` bytes as a Kubernetes quantity, with the largest binary suffix that writes it exactly ("16Gi")."""
    power = 0
    while n and n % 1024 == 0 and power < len(_BINARY) - 1:
        n //= 1024
        power += 1
    return f"{n}{_BINARY[power]}"


def _device(gpu: Gpu) -> kubernetes.client.V1Device:
    from kubernetes import client

    whole = byte_quantity(gpu.memory // MEMORY_STEP * MEMORY_STEP)   # what a claim can consume: whole steps
    step = byte_quantity(MEMORY_STEP)
    attributes = {"type": client.V1DeviceAttribute(string="gpu"),
                  "uuid": client.V1DeviceAttribute(string=gpu.uuid),
                  "productName": client.V1DeviceAttribute(string=gpu.name[:64]),
                  "index": client.V1DeviceAttribute(int=gpu.index),
                  "memory": client.V1DeviceAttribute(int=gpu.memory),
                  "simulated": client.V1DeviceAttribute(bool=gpu.simulated)}
    for key, text in (("computeCapability", gpu.compute_capability), ("cudaDriverVersion", gpu.driver_version),
                      ("driverVersion", gpu.nvidia_driver_version)):
        if (version := _version(text)) is not None:
            attributes[key] = client.V1DeviceAttribute(version=version)
    capacity = {
        MEMORY_CAPACITY: client.V1DeviceCapacity(
            value=byte_quantity(gpu.memory), request_policy=client.V1CapacityRequestPolicy(
                default=whole, valid_range=client.V1CapacityRequestPolicyRange(min=step, max=whole, step=step))),
        COMPUTE_CAPACITY: client.V1DeviceCapacity(value="100", request_policy=client.V1CapacityRequestPolicy(
            default="0", valid_range=client.V1CapacityRequestPolicyRange(min="0", max="100", step="1"))),
    }
    return client.V1Device(name=device_name(gpu), allow_multiple_allocations=True, attributes=attributes,
                           capacity=capacity)


def node_slice(node_name: str, gpus: list[Gpu], generation: int = 1,
               node_uid: str | None = None) -> kubernetes.client.V1ResourceSlice:
    """The ResourceSlice that publishes ``gpus`` for node ``node_name`` (pool generation ``generation``),
    owned by the Node (``node_uid``: its UID) so that it goes when the node is deleted."""
    from kubernetes import client

    if not gpus:
        raise ValueError(f"node {node_name} has no GPU to publish")
    too_small = [g for g in gpus if g.memory < 2 * MEMORY_STEP]
    if too_small:
        raise ValueError(f"GPU {too_small[0].index} ({too_small[0].uuid}) has {too_small[0].memory} bytes of memory; "
                         f"a published GPU needs at least {2 * MEMORY_STEP} (two steps of {MEMORY_STEP})")
    return client.V1ResourceSlice(
        api_version=API_VERSION, kind="ResourceSlice",
        metadata=client.V1ObjectMeta(generate_name=slice_name_prefix(node_name),
                                     owner_references=_owners(node_name, node_uid)),
        spec=client.V1ResourceSliceSpec(
            driver=DRIVER, node_name=node_name,
            pool=client.V1ResourcePool(name=node_name, generation=generation, resource_slice_count=1),
            devices=[_device(g) for g in sorted(gpus, key=lambda g: g.index)]))


def _owners(node_name: str, node_uid: str | None) -> list | None:
    from kubernetes import client

    return [client.V1OwnerReference(api_version="v1", kind="Node", name=node_name, uid=node_uid,
                                    controller=True)] if node_uid else None


_unowned: set[str] = set()   # nodes whose UID could not be read (said once)


def node_uid(api: kubernetes.client.ApiClient, node_name: str) -> str | None:
    """The UID of Node ``node_name``, for its slice's owner reference (as Kubernetes' own kubelet-plugin
    helper sets it: the API server's garbage collector then deletes the slice with the node); None, said
    once, when it cannot be read (no RBAC for nodes, no such node): the slice is published unowned."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return client.CoreV1Api(api).read_node(node_name).metadata.uid
    except ApiException as e:
        if node_name not in _unowned:
            _unowned.add(node_name)
            log.warning("node %s cannot be read (%s %s): its ResourceSlice is published without an owner, so "
                        "it is not deleted with the node", node_name, e.status, e.reason)
        return None


def _resource_api(api: kubernetes.client.ApiClient) -> kubernetes.client.ResourceV1Api:
    from kubernetes import client

    return client.ResourceV1Api(api)


def _node_slices(resource: kubernetes.client.ResourceV1Api, node_name: str) -> list:
    """This driver's slices of node ``node_name``."""
    listing = resource.list_resource_slice(field_selector=f"spec.nodeName={node_name},spec.driver={DRIVER}")
    return [s for s in listing.items or [] if s.spec.node_name == node_name and s.spec.driver == DRIVER]


def _comparable(devices: list | None) -> list[dict]:
    """Devices as plain values, each capacity's quantities as numbers: the API server rewrites a quantity in its
    canonical form ("16000000000" reads back as "16G"), which is the same quantity."""
    from kubernetes.utils import parse_quantity

    def numbers(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items()}
        return parse_quantity(value) if isinstance(value, str) else value

    out = []
    for device in devices or []:
        d = device.to_dict()
        d["capacity"] = numbers(d.get("capacity") or {})
        out.append(d)
    return out


def _same_devices(a, b) -> bool:
    return _comparable(a.devices) == _comparable(b.devices)


def publish(api: kubernetes.client.ApiClient, node_name: str, gpus: list[Gpu]) -> None:
    """Makes this node's slice for DRIVER show ``gpus``: creates it, or updates it when the devices changed
    (with the pool's generation bumped, so the scheduler drops what it knew of the old ones); leaves it as it
    is when nothing changed; and deletes this driver's other slices of this node."""
    from kubernetes.client.exceptions import ApiException

    resource = _resource_api(api)
    uid = node_uid(api, node_name)
    owners = _owners(node_name, uid)
    for _ in range(_UPDATE_TRIES):
        current = _node_slices(resource, node_name)
        keep = next((s for s in current if s.spec.pool.name == node_name), None)
        try:
            for stale in current:
                if stale is not keep:
                    _delete(resource, stale.metadata.name)
            if keep is None:
                resource.create_resource_slice(node_slice(node_name, gpus, node_uid=uid))
                return
            wanted = node_slice(node_name, gpus, generation=keep.spec.pool.generation)
            owned = not uid or any(o.uid == uid for o in keep.metadata.owner_references or [])
            if _same_devices(keep.spec, wanted.spec) and keep.spec.pool.resource_slice_count == 1:
                if owned:
                    return
            else:
                wanted.spec.pool.generation = keep.spec.pool.generation + 1
            wanted.metadata = keep.metadata
            if owners:
                wanted.metadata.owner_references = owners
            resource.replace_resource_slice(keep.metadata.name, wanted)
            return
        except ApiException as e:
            if e.status not in (404, 409):   # 409: someone else wrote it meanwhile; 404: deleted meanwhile
                raise
    raise RuntimeError(f"the ResourceSlice of node {node_name} kept changing under this writer "
                       f"({_UPDATE_TRIES} tries): is another {DRIVER} plugin running for this node?")


def _delete(resource, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        resource.delete_resource_slice(name)
    except ApiException as e:
        if e.status != 404:
            raise


def unpublish(api: kubernetes.client.ApiClient, node_name: str) -> None:
    """Deletes this driver's slices of node ``node_name`` (a plugin that leaves with ``--remove-slices``)."""
    resource = _resource_api(api)
    for s in _node_slices(resource, node_name):
        _delete(resource, s.metadata.name)


# ---------------------------------------------------------------------------------------------------------------
# What a claim asks for
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """One GPU of a claim, as the plugin must prepare it."""

    request: str          # the claim's request (or "request/subrequest") that got this GPU
    pool: str
    device: str           # device name in the slice, "gpu-0"
    gpu_index: int
    uuid: str
    memory: int           # bytes consumed (the whole GPU's memory when the claim consumed no capacity)
    compute: float        # fraction of the GPU's time promised, in [0, 1] (0: none; 1.0: the whole GPU)
    priority: str         # "high" | "normal" | "low"
    cap: bool             # held to its share even when the GPU is otherwise idle
    share_id: str | None  # the allocation's share of a device that allows several; None for an exclusive one


def _claim_model(claim: Any):
    """``claim`` as the client's model (a dict as the API serves it is read into one)."""
    from kubernetes import client

    if isinstance(claim, Mapping):
        return client.ResourceV1ResourceClaim.from_dict(dict(claim))
    return claim


def read_claim(api: kubernetes.client.ApiClient, namespace: str, name: str,
               uid: str) -> kubernetes.client.ResourceV1ResourceClaim:
    """Claim ``namespace/name`` from the API server (the client's ``ResourceV1ResourceClaim``). ClaimError when
    it does not exist, when its UID is not ``uid`` (the kubelet asks for a claim that was deleted and made
    again under the same name), or when it is not allocated."""
    from kubernetes.client.exceptions import ApiException

    try:
        claim = _resource_api(api).read_namespaced_resource_claim(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise ClaimError(namespace, name, "not found in the API server") from None
        raise ClaimError(namespace, name, f"the API server refused to read it ({e.status} {e.reason})") from None
    if claim.metadata is None or claim.metadata.uid != uid:
        have = claim.metadata.uid if claim.metadata else None
        raise ClaimError(namespace, name, f"has UID {have}, not {uid}: the claim asked for was deleted "
                         "(this one was made since under the same name)")
    if claim.status is None or claim.status.allocation is None or claim.status.allocation.devices is None:
        raise ClaimError(namespace, name, "is not allocated (the scheduler has not given it devices yet)")
    return claim


def _applies(config_requests: Iterable[str] | None, request: str) -> bool:
    """Whether a configuration for ``config_requests`` applies to a result of ``request``: no requests means
    all; a main request's name covers its subrequests ("gpu" covers "gpu/small")."""
    if not config_requests:
        return True
    main = request.split("/", 1)[0]
    return any(r == request or r == main for r in config_requests)


def _device_config(claim_id: tuple[str, str], configs: list, request: str) -> dict[str, Any]:
    """The opaque configuration for DRIVER that applies to ``request``: class configs, then claim configs,
    each key's last value winning; every one checked."""
    settings: dict[str, Any] = {}
    ordered = ([c for c in configs if c.source == "FromClass"] + [c for c in configs if c.source == "FromClaim"]
               + [c for c in configs if c.source not in ("FromClass", "FromClaim")])
    for config in ordered:
        if config.opaque is None or config.opaque.driver != DRIVER or not _applies(config.requests, request):
            continue
        settings.update(_check_config(claim_id, config.opaque.parameters))
    return settings


def _check_config(claim_id: tuple[str, str], parameters: Any) -> dict[str, Any]:
    """A GpuConfig's settings (priority, cap); ClaimError naming the first bad key."""
    def bad(key: str, problem: str) -> ClaimError:
        return ClaimError(*claim_id, f"its {DRIVER} configuration's {problem}", key=key)

    if not isinstance(parameters, Mapping):
        raise bad("parameters", f"parameters must be an object, not {type(parameters).__name__}")
    for key in parameters:
        if key not in _CONFIG_KEYS:
            raise bad(key, f"key {key!r} is unknown (a {CONFIG_KIND} has {', '.join(_CONFIG_KEYS)})")
    for key, want in (("apiVersion", CONFIG_API_VERSION), ("kind", CONFIG_KIND)):
        if parameters.get(key) != want:
            raise bad(key, f"{key} is {parameters.get(key)!r}, not {want!r}")
    out = {}
    if "priority" in parameters:
        if parameters["priority"] not in PRIORITIES:
            raise bad("priority", f"priority {parameters['priority']!r} is not one of {', '.join(PRIORITIES)}")
        out["priority"] = parameters["priority"]
    if "cap" in parameters:
        if not isinstance(parameters["cap"], bool):
            raise bad("cap", f"cap {parameters['cap']!r} is not true or false")
        out["cap"] = parameters["cap"]
    return out


def _quantity(claim_id: tuple[str, str], key: str, text: str) -> Decimal:
    from kubernetes.utils import parse_quantity

    try:
        return Decimal(parse_quantity(text))
    except (ValueError, TypeError, ArithmeticError):
        raise ClaimError(*claim_id, f"consumed capacity {key}={text!r} is not a Kubernetes quantity",
                         key=key) from None


def _consumed(claim_id: tuple[str, str], consumed: Mapping[str, str] | None, gpu: Gpu) -> tuple[int, float]:
    """(bytes, fraction of time) a result consumed of ``gpu``; the whole GPU for what it does not name."""
    consumed = consumed or {}
    for key in consumed:
        if key not in (MEMORY_CAPACITY, COMPUTE_CAPACITY):
            raise ClaimError(*claim_id, f"consumed capacity {key!r} is not one this driver publishes "
                             f"({MEMORY_CAPACITY}, {COMPUTE_CAPACITY}): a slice not written by it?", key=key)
    memory, compute = gpu.memory, 1.0
    if MEMORY_CAPACITY in consumed:
        value = _quantity(claim_id, MEMORY_CAPACITY, consumed[MEMORY_CAPACITY])
        memory = math.ceil(value)   # a quantity's byte count rounds up, as Kubernetes' Value() does
        if not 0 < memory <= gpu.memory:
            raise ClaimError(*claim_id, f"consumed memory {consumed[MEMORY_CAPACITY]} is not between 1 byte and "
                             f"GPU {gpu.index}'s {gpu.memory} bytes", key=MEMORY_CAPACITY)
    if COMPUTE_CAPACITY in consumed:
        percent = _quantity(claim_id, COMPUTE_CAPACITY, consumed[COMPUTE_CAPACITY])
        if not 0 <= percent <= 100:
            raise ClaimError(*claim_id, f"consumed compute {consumed[COMPUTE_CAPACITY]} is not a percentage in "
                             "[0, 100]", key=COMPUTE_CAPACITY)
        compute = float(percent / 100)
    return memory, compute


def plan_claim(claim: Any, node_name: str, gpus: list[Gpu]) -> list[DevicePlan]:
    """The GPUs of this node that ``claim`` (the client's model, or a dict as the API serves it) was given,
    each with the memory and share it consumed and its configuration. ClaimError naming the claim (and the
    key) for a device this node does not have, a device of this driver in another node's pool, a bad
    consumed capacity, or a bad configuration."""
    claim = _claim_model(claim)
    meta = claim.metadata
    claim_id = (meta.namespace or "", meta.name or "") if meta else ("", "")
    allocation = claim.status.allocation if claim.status else None
    if allocation is None or allocation.devices is None:
        raise ClaimError(*claim_id, "is not allocated (the scheduler has not given it devices yet)")
    by_name = {device_name(g): g for g in gpus}
    configs = list(allocation.devices.config or [])
    plans = []
    for result in allocation.devices.results or []:
        if result.driver != DRIVER:
            continue
        if result.pool != node_name:
            raise ClaimError(*claim_id, f"device {result.device} of request {result.request} is in pool "
                             f"{result.pool}, not this node's ({node_name}): the claim was allocated for "
                             "another node", key="pool")
        gpu = by_name.get(result.device)
        if gpu is None:
            have = ", ".join(sorted(by_name)) or "none"
            raise ClaimError(*claim_id, f"device {result.device} of request {result.request} is not a GPU of "
                             f"node {node_name} (it has {have}): a stale ResourceSlice?", key="device")
        memory, compute = _consumed(claim_id, result.consumed_capacity, gpu)
        settings = _device_config(claim_id, configs, result.request)
        if settings.get("cap") and compute == 0:
            raise ClaimError(*claim_id, f"cap is true for request {result.request}, which consumed no compute share: "
                             "a cap holds a partition to its share; request compute as well, or drop cap", key="cap")
        plans.append(DevicePlan(request=result.request, pool=result.pool, device=result.device, gpu_index=gpu.index,
                                uuid=gpu.uuid, memory=memory, compute=compute,
                                priority=settings.get("priority", "normal"), cap=settings.get("cap", False),
                                share_id=result.share_id))
    if not plans:
        raise ClaimError(*claim_id, f"has no device of driver {DRIVER} allocated")
    return plans
