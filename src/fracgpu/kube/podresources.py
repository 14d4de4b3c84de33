"""Which pod holds which partition: the kubelet's pod resources API (``podresources/v1``).

The kubelet serves ``v1.PodResourcesLister`` on a unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``). Its ``List`` names, for every
active pod, each container's devices: those of device plugins by resource name
and device ids, and those of DRA claims by the claim's name and the CDI devices
its driver answered at prepare. dcgm-exporter labels its series by pod the
same way. From one answer this module knows:

- each slices partition a container holds: the device plugin's slices
  (``SLICE_RESOURCE``, ids ``slice_id(uuid, k)``) of one GPU are one partition,
  ``slices_partition(index, ks)``, on the region of that GPU's UUID (the GPU's
  index is read from the partition's own name, so no device probe is needed);
- each claim partition a container's claim holds: its CDI devices
  ``CLAIM_CDI_KIND=<uid>-gpu<i>`` name ``claim_partition(uid, i)``;
- the labels of each such partition: ``namespace``, ``pod``, ``container`` and,
  for a claim, ``claim`` (its name). A claim shared by several containers (a
  claim is namespaced, so they are all in its namespace) is labelled with the
  first holder in (namespace, pod, container) order, so the label does not
  depend on the order the kubelet lists pods in and the namespace, which a
  bill is made by, is always exact.

``PodWatch`` asks ``List`` at most every ``every`` seconds and says which
slices partitions no container has held in two answers in a row, the first
at least ``grace`` seconds ago. Why both:

- the kubelet records a container's slices only once the device plugin's
  ``Allocate`` has answered, and the partition is made during it, so one
  answer may miss a partition being handed out; two answers a period apart
  do not;
- a kubelet that has just (re)started lists only the pods its pod manager
  has learnt so far (from the API server and static pod files), which may
  take some seconds: answers during that time miss running pods. ``grace``
  outlasts it.

An answer that fails (no socket, no kubelet) is a warning, leaves the labels
known before, and breaks the chain: nothing is found unheld until two answers
in a row, ``grace`` apart, say so. The node agent also keeps any partition a
live process uses.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from fracgpu import kube

__all__ = ["DEFAULT_SOCKET", "Holdings", "PodResourcesError", "PodWatch", "holdings", "list_pods"]

log = logging.getLogger("fracgpu.node")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GRACE_S = 30.0    # how long a slices partition stays unheld before it goes (a restarting kubelet's pods)
TIMEOUT_S = 5.0   # the kubelet answers List from memory; a longer wait is a kubelet that is stuck


class PodResourcesError(OSError):
    """The pod resources service could not be asked (no socket, nothing answering, a bad answer)."""


def list_pods(socket_path: str = DEFAULT_SOCKET, timeout: float = TIMEOUT_S):
    """One ``List`` over the unix socket ``socket_path``: the ``ListPodResourcesResponse``.
    PodResourcesError saying what failed."""
    import grpc

    from fracgpu.kube.api import podresources_v1_pb2, podresources_v1_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix://{socket_path}") as channel:
            stub = podresources_v1_pb2_grpc.PodResourcesListerStub(channel)
            return stub.List(podresources_v1_pb2.ListPodResourcesRequest(), timeout=timeout)
    except grpc.RpcError as e:
        raise PodResourcesError(f"the kubelet's pod resources service at {socket_path} did not answer List "
                                f"({e.code().name}: {e.details()})") from None


@dataclasses.dataclass(frozen=True)
class Holdings:
    """What one ``List`` says about fracgpu's partitions."""

    # GPU uuid -> (slices, labels) of each container's slices of that GPU
    slices: dict[str, list[tuple[frozenset[int], dict[str, str]]]]
    # claim partition name -> labels
    claims: dict[str, dict[str, str]]

    def labels(self, uuid: str, partition: str) -> dict[str, str] | None:
        """The pod labels of ``partition`` on GPU ``uuid``; None when no container holds it."""
        if kube.claim_of_partition(partition):
            return self.claims.get(partition)
        found = kube.slices_of_partition(partition)
        if not found:
            return None
        index = found[0]
        return next((labels for ks, labels in self.slices.get(uuid, ())
                     if kube.slices_partition(index, ks) == partition), None)

    def holds(self, uuid: str, partition: str) -> bool:
        return self.labels(uuid, partition) is not None


def _first(found: dict, key, labels: dict[str, str]) -> None:
    """Keeps, for ``key``, the labels first in (namespace, pod, container) order."""
    order = lambda lab: tuple(lab.get(k, "") for k in kube.LABELS)   # noqa: E731
    if key not in found or order(labels) < order(found[key]):
        found[key] = labels


def holdings(answer) -> Holdings:
    """The partitions a ``ListPodResourcesResponse`` says containers hold, with their labels."""
    slices: dict[tuple[str, frozenset[int]], dict[str, str]] = {}
    claims: dict[str, dict[str, str]] = {}
    for pod in answer.pod_resources:
        for container in pod.containers:
            labels = {kube.NAMESPACE_LABEL: pod.namespace, kube.POD_LABEL: pod.name,
                      kube.CONTAINER_LABEL: container.name}
            by_gpu: dict[str, set[int]] = {}
            for devices in container.devices:
                if devices.resource_name != kube.SLICE_RESOURCE:
                    continue
                for device_id in devices.device_ids:
                    parsed = kube.parse_slice_id(device_id)
                    if parsed is None:
                        log.warning("pod %s/%s holds %s device '%s', which is not a slice id (<uuid>::<k>)",
                                    pod.namespace, pod.name, kube.SLICE_RESOURCE, device_id)
                        continue
                    by_gpu.setdefault(parsed[0], set()).add(parsed[1])
            for uuid, ks in by_gpu.items():
                _first(slices, (uuid, frozenset(ks)), labels)
            for claim in container.dynamic_resources:
                for resource in claim.claim_resources:
                    for cdi_device in resource.cdi_devices:
                        parsed = kube.claim_of_cdi_device(cdi_device.name)
                        if parsed:
                            _first(claims, kube.claim_partition(*parsed),
                                   {**labels, kube.NAMESPACE_LABEL: claim.claim_namespace or pod.namespace,
                                    kube.CLAIM_LABEL: claim.claim_name})
    by_uuid: dict[str, list[tuple[frozenset[int], dict[str, str]]]] = {}
    for (uuid, ks), labels in sorted(slices.items(), key=lambda item: (item[0][0], sorted(item[0][1]))):
        by_uuid.setdefault(uuid, []).append((ks, labels))
    return Holdings(by_uuid, claims)


class PodWatch:
    """The pod resources service, asked at most every ``every`` seconds (``look``), for the node agent."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, every: float = 1.0, grace: float = GRACE_S,
                 ask: Callable[[str], object] | None = None, clock: Callable[[], float] = time.monotonic):
        if ask is None:
            import grpc  # noqa: F401  (ImportError now, not at the first look, without the kubernetes extra)
        self.socket_path = socket_path
        self.every = every
        self.grace = grace
        self._ask = ask or list_pods
        self._clock = clock
        self.current: Holdings | None = None   # the last answer; None until one came
        self._asked_at = float("-inf")
        self._failing: str | None = None
        # (gpu, slices partition) -> (answers in a row not holding it, when the first of them came)
        self._unheld: dict[tuple[str, str], tuple[int, float]] = {}

    def look(self) -> bool:
        """Asks List when it is due; True when a new answer came."""
        now = self._clock()
        if now - self._asked_at < self.every:
            return False
        self._asked_at = now
        try:
            self.current = holdings(self._ask(self.socket_path))
        except Exception as e:   # the books go on without pod labels; nothing is removed on no answer
            if str(e) != self._failing:
                log.warning("%s; pods' labels stay as last known and no slices partition is removed until it "
                            "answers", e)
            self._failing = str(e)
            self._unheld.clear()
            return False
        if self._failing:
            log.info("the kubelet's pod resources service at %s answers again", self.socket_path)
            self._failing = None
        return True

    def labels(self, uuid: str, partition: str) -> dict[str, str] | None:
        """The labels of the pod that holds ``partition`` on GPU ``uuid``, as last known; None: none known."""
        return self.current.labels(uuid, partition) if self.current else None

    def unheld(self, uuid: str, partitions: Iterable[str]) -> list[str]:
        """Of ``partitions`` on GPU ``uuid``, the slices partitions that two answers in a row or more (this
        one included), the first ``grace`` seconds ago or longer, named no container holding. Call once
        per new answer (``look`` returned True)."""
        if self.current is None:
            return []
        names = set(partitions)
        for key in [k for k in self._unheld if k[0] == uuid and k[1] not in names]:
            del self._unheld[key]   # removed meanwhile: a partition made again under its name starts afresh
        gone = []
        for name in sorted(names):
            if not kube.is_slices_partition(name):
                continue   # a claim's partition is the DRA driver's to remove, at unprepare
            key = (uuid, name)
            if self.current.holds(uuid, name):
                self._unheld.pop(key, None)
                continue
            count, since = self._unheld.get(key, (0, self._asked_at))
            self._unheld[key] = (count + 1, since)
            if count + 1 >= 2 and self._asked_at - since >= self.grace:
                gone.append(name)
        return gone

    def forget(self, uuid: str, partition: str) -> None:
        self._unheld.pop((uuid, partition), None)
