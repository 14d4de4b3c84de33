"""fracgpu on Kubernetes: the names every part agrees on.

Three parts meet on a node, and each finds the others' work by these names
alone (no other channel between them):

- the DRA driver (``fracgpu kubelet-plugin``, ``fracgpu.kube.dra``): one
  partition per prepared claim and GPU, named ``claim_partition(uid, index)``,
  and one transient CDI spec per claim, of kind ``CLAIM_CDI_KIND``;
- the device plugin (``fracgpu device-plugin``, ``fracgpu.kube.device_plugin``):
  ``slices`` equal slices per GPU under ``SLICE_RESOURCE``, each a device id
  ``slice_id(uuid, k)``; a container's slices of one GPU are one partition,
  ``slices_partition(index, ks)``, given as a CDI device of kind
  ``SLICES_CDI_KIND``;
- the node agent (``fracgpu node``), which reads the kubelet's pod resources
  API and labels each partition's jobs with the pod that holds it (``LABELS``),
  and removes slice partitions no pod holds any more.

The kubelet's gRPC APIs are in ``fracgpu.kube.api`` (stubs made by
``tools/kubelet_api.py`` from the kubelet's own .proto files). This package
needs the ``kubernetes`` extra: ``pip install 'fracgpu[kubernetes]'``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

__all__ = ["DRIVER", "CLAIM_CDI_KIND", "SLICES_CDI_KIND", "SLICE_RESOURCE", "LABELS", "NAMESPACE_LABEL",
           "POD_LABEL", "CONTAINER_LABEL", "CLAIM_LABEL", "claim_partition", "claim_of_partition", "slice_id",
           "parse_slice_id", "slices_partition", "slices_of_partition", "is_slices_partition", "claim_cdi_device",
           "claim_of_cdi_device"]

# The DRA driver's name: ResourceSlices' spec.driver, DeviceClass selectors, the kubelet's plugin name.
DRIVER = "gpu.fracgpu.dev"
# A prepared claim's CDI devices: CLAIM_CDI_KIND=<claim uid>-gpu<index> (one spec file per claim).
CLAIM_CDI_KIND = "k8s.gpu.fracgpu.dev/claim"
# The device plugin's extended resource, and its CDI kind (one device per partition of slices).
SLICE_RESOURCE = "fracgpu.dev/gpu-slice"
SLICES_CDI_KIND = "k8s.fracgpu.dev/slices"

# The labels a pod's jobs carry (ledger rows, report --by, top, the exporter's series): the names
# dcgm-exporter gives its pod mapping, so dashboards join the two; and the claim, for DRA.
NAMESPACE_LABEL = "namespace"
POD_LABEL = "pod"
CONTAINER_LABEL = "container"
CLAIM_LABEL = "claim"
LABELS = (NAMESPACE_LABEL, POD_LABEL, CONTAINER_LABEL, CLAIM_LABEL)

_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CLAIM_PARTITION = re.compile(r"k8s-claim-(?P<uid>[0-9a-f-]{36})-gpu(?P<index>\d+)")
_SLICES_PARTITION = re.compile(r"k8s-slices-gpu(?P<index>\d+)-(?P<rest>[0-9a-z-]+)")
_SLICE_ID = re.compile(r"(?P<uuid>.+)::(?P<k>\d+)")


def _check_uid(uid: str) -> str:
    if not _UID.fullmatch(uid):
        raise ValueError(f"'{uid}' is not a Kubernetes UID (lowercase 8-4-4-4-12 hexadecimal)")
    return uid


def claim_partition(uid: str, index: int) -> str:
    """The partition of claim ``uid`` on GPU ``index``: ``k8s-claim-<uid>-gpu<index>`` (under 64 bytes)."""
    return f"k8s-claim-{_check_uid(uid)}-gpu{int(index)}"


def claim_of_partition(name: str) -> tuple[str, int] | None:
    """(claim uid, GPU index) of a claim's partition; None for any other partition."""
    m = _CLAIM_PARTITION.fullmatch(name)
    return (m["uid"], int(m["index"])) if m and _UID.fullmatch(m["uid"]) else None


def claim_cdi_device(uid: str, index: int) -> str:
    """The CDI device name (within CLAIM_CDI_KIND) of claim ``uid``'s partition on GPU ``index``."""
    return f"{_check_uid(uid)}-gpu{int(index)}"


def claim_of_cdi_device(qualified: str) -> tuple[str, int] | None:
    """(claim uid, GPU index) of a qualified CDI device id ``k8s.gpu.fracgpu.dev/claim=<uid>-gpu<i>``;
    None for any other."""
    kind, _, name = qualified.partition("=")
    m = re.fullmatch(r"(?P<uid>[0-9a-f-]{36})-gpu(?P<index>\d+)", name)
    return (m["uid"], int(m["index"])) if kind == CLAIM_CDI_KIND and m and _UID.fullmatch(m["uid"]) else None


def slice_id(uuid: str, k: int) -> str:
    """The device plugin's id of slice ``k`` of GPU ``uuid``: ``<uuid>::<k>``."""
    return f"{uuid}::{int(k)}"


def parse_slice_id(device_id: str) -> tuple[str, int] | None:
    """(GPU uuid, slice number) of a slice id; None when it is not one."""
    m = _SLICE_ID.fullmatch(device_id)
    return (m["uuid"], int(m["k"])) if m else None


def slices_partition(index: int, slices: Iterable[int]) -> str:
    """The partition of a container's slices ``slices`` of GPU ``index``:
    ``k8s-slices-gpu<index>-<k>-<k>...`` (slices are exclusive, so the set names one container's
    share), or ``...-h<digest>`` when the list would not fit a partition name."""
    ks = sorted({int(k) for k in slices})
    if not ks:
        raise ValueError("a slice partition needs at least one slice")
    name = f"k8s-slices-gpu{int(index)}-" + "-".join(map(str, ks))
    if len(name) > 63:
        name = f"k8s-slices-gpu{int(index)}-h" + hashlib.sha256(",".join(map(str, ks)).encode()).hexdigest()[:16]
    return name


def slices_of_partition(name: str) -> tuple[int, frozenset[int] | None] | None:
    """(GPU index, slices) of a partition the device plugin made; the slices are None when the name
    carries a digest in their place. None for any other partition."""
    m = _SLICES_PARTITION.fullmatch(name)
    if not m:
        return None
    rest = m["rest"].split("-")
    ks = frozenset(int(k) for k in rest) if all(k.isdigit() for k in rest) else None
    return int(m["index"]), ks


def is_slices_partition(name: str) -> bool:
    """Whether ``name`` is a partition the device plugin made."""
    return _SLICES_PARTITION.fullmatch(name) is not None
