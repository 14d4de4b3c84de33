"""The kubelet's pod resources API, as the node agent reads it: which pod holds which partition."""

from __future__ import annotations

import logging

import pytest

from fracgpu import kube
from fracgpu.kube import podresources
from tests.support.podresources import Container, Pod, Served

UUID = "GPU-00000000-0000-0000-0000-000000000001"
OTHER = "GPU-00000000-0000-0000-0000-000000000002"
UID = "0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e"
CLAIM = f"{kube.CLAIM_CDI_KIND}={kube.claim_cdi_device(UID, 0)}"


@pytest.fixture
def kubelet(tmp_path):
    served = Served(tmp_path / "kubelet.sock")
    yield served
    served.stop()


def test_slices_and_claims_name_their_partitions_and_pods(kubelet):
    kubelet.service.set_pods(
        Pod("team-a", "trainer-0", [Container("main", slices={UUID: [2, 0]}), Container("sidecar")]),
        Pod("team-b", "infer-0", [Container("server", claims=[("gpu-claim", "team-b", [CLAIM])])]))
    held = podresources.holdings(podresources.list_pods(kubelet.socket_path))
    assert held.labels(UUID, kube.slices_partition(0, [0, 2])) == {"namespace": "team-a", "pod": "trainer-0",
                                                                    "container": "main"}
    assert held.labels(UUID, kube.claim_partition(UID, 0)) == {"namespace": "team-b", "pod": "infer-0",
                                                                "container": "server", "claim": "gpu-claim"}
    # Slices are per GPU: the same slice numbers of another GPU, or other slices of this one, are no one's.
    assert held.labels(OTHER, kube.slices_partition(1, [0, 2])) is None
    assert held.labels(UUID, kube.slices_partition(0, [0, 1])) is None
    assert held.labels(UUID, "team") is None


def test_a_claim_shared_by_containers_is_labelled_with_the_first_in_namespace_pod_container_order(kubelet):
    shared = [("shared", "team-b", [CLAIM])]
    kubelet.service.set_pods(Pod("team-b", "worker-1", [Container("main", claims=shared)]),
                             Pod("team-b", "worker-0", [Container("b", claims=shared), Container("a", claims=shared)]))
    held = podresources.holdings(podresources.list_pods(kubelet.socket_path))
    assert held.labels(UUID, kube.claim_partition(UID, 0)) == {"namespace": "team-b", "pod": "worker-0",
                                                                "container": "a", "claim": "shared"}


def test_a_slices_partition_is_unheld_after_two_answers_in_a_row_and_a_failed_answer_breaks_the_chain(kubelet):
    now = [0.0]
    watch = podresources.PodWatch(kubelet.socket_path, every=1.0, grace=0.0, clock=lambda: now[0])
    slices, claim = kube.slices_partition(0, [0, 1]), kube.claim_partition(UID, 0)
    kubelet.service.set_pods(Pod("team-a", "trainer-0", [Container("main", slices={UUID: [0, 1]})]))

    def answer() -> list[str]:
        now[0] += 1.0
        assert watch.look()
        return watch.unheld(UUID, [slices, claim, "team"])

    assert answer() == []
    kubelet.service.set_pods()          # the pod has gone
    assert answer() == []               # one answer is not enough: an allocation may not be listed yet
    assert watch.look() is False        # asked no more often than `every`
    assert answer() == [slices]         # a claim's partition, or a partition of the operator's, never
    kubelet.service.set_pods(Pod("team-a", "trainer-1", [Container("main", slices={UUID: [0, 1]})]))
    assert answer() == []               # held again: the count starts afresh
    kubelet.service.set_pods()
    assert answer() == []
    watch.socket_path = kubelet.socket_path + ".gone"
    now[0] += 1.0
    assert watch.look() is False        # no answer: nothing is unheld on its word
    watch.socket_path = kubelet.socket_path
    assert answer() == []
    assert answer() == [slices]


def test_a_missing_socket_is_a_warning_and_labels_stay_as_last_known(kubelet, tmp_path, caplog):
    now = [0.0]
    watch = podresources.PodWatch(kubelet.socket_path, clock=lambda: now[0])
    kubelet.service.set_pods(Pod("team-a", "trainer-0", [Container("main", slices={UUID: [3]})]))
    assert watch.look()
    kubelet.stop()
    now[0] += 5
    with caplog.at_level(logging.WARNING, logger="fracgpu.node"):
        assert watch.look() is False
        now[0] += 5
        assert watch.look() is False
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]   # said once
    assert f"the kubelet's pod resources service at {kubelet.socket_path} did not answer List" in warning
    assert "no slices partition is removed until it answers" in warning
    assert watch.labels(UUID, kube.slices_partition(0, [3]))["pod"] == "trainer-0"
    assert watch.unheld(UUID, [kube.slices_partition(0, [3])]) == []


def test_the_played_kubelet_answers_get_and_allocatable_as_a_kubelet_does(kubelet):
    import grpc

    from fracgpu.kube.api import podresources_v1_pb2 as pb
    from fracgpu.kube.api import podresources_v1_pb2_grpc as pb_grpc

    kubelet.service.allocatable = {UUID: 4}
    kubelet.service.set_pods(Pod("team-a", "trainer-0", [Container("main", slices={UUID: [1]})]))
    with grpc.insecure_channel(f"unix://{kubelet.socket_path}") as channel:
        stub = pb_grpc.PodResourcesListerStub(channel)
        got = stub.Get(pb.GetPodResourcesRequest(pod_name="trainer-0", pod_namespace="team-a"), timeout=5)
        assert list(got.pod_resources.containers[0].devices[0].device_ids) == [kube.slice_id(UUID, 1)]
        with pytest.raises(grpc.RpcError) as missing:
            stub.Get(pb.GetPodResourcesRequest(pod_name="gone", pod_namespace="team-a"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        (devices,) = stub.GetAllocatableResources(pb.AllocatableResourcesRequest(), timeout=5).devices
        assert len(devices.device_ids) == 4


def test_a_slices_partition_is_unheld_only_once_the_grace_has_passed(kubelet):
    """A kubelet that has just restarted lists its running pods late: answers within the grace do not count."""
    now = [0.0]
    watch = podresources.PodWatch(kubelet.socket_path, every=1.0, grace=30.0, clock=lambda: now[0])
    slices = kube.slices_partition(0, [0, 1])
    for t in (0, 1, 2, 29):
        now[0] = float(t)
        assert watch.look() and watch.unheld(UUID, [slices]) == []
    now[0] = 30.0
    assert watch.look() and watch.unheld(UUID, [slices]) == [slices]
