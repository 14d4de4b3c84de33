"""The DRA driver's side of the API server: the ResourceSlice a node publishes, and the claims it reads,
through the kubernetes client against the test API server (tests/support/kube_apiserver.py)."""

from __future__ import annotations

import datetime
import json
import re
import sys
import urllib.error
import urllib.request

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fracgpu import devices
from fracgpu.kube import DRIVER
from fracgpu.kube import resources
from fracgpu.kube.resources import CONFIG_API_VERSION, CONFIG_KIND, ClaimError
from tests.support.kube_apiserver import (  # noqa: F401  (kube_apiserver is a fixture)
    TOKEN, KubeApiServer, allocated_claim, canonical_quantity, kube_apiserver)
from tests.support.simgpu import GiB, MiB, cuda_include_dir


NODE = "node-a"


def sim_cuda_version() -> str:
    """The CUDA version the simulated driver implements: that of the cuda.h it is built with ("13.5.0")."""
    header = (cuda_include_dir() / "cuda.h").read_text()
    number = int(re.search(r"#define CUDA_VERSION (\d+)", header)[1])
    return f"{number // 1000}.{number % 1000 // 10}.0"


def config(**settings) -> dict:
    return {"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND, **settings}


@pytest.fixture
def api(kube_apiserver, tmp_path):
    """A client of the test API server, made as the plugin makes one: from a kubeconfig."""
    return resources.api_client(kube_apiserver.kubeconfig(tmp_path / "kubeconfig"))


def plain(model) -> dict:
    """A model as the API's JSON (set fields only)."""
    return client.ApiClient().sanitize_for_serialization(model)


def node_slices(api) -> list[client.V1ResourceSlice]:
    """This driver's slices of NODE, read back through the client's models."""
    listing = client.ResourceV1Api(api).list_resource_slice(field_selector=f"spec.nodeName={NODE},spec.driver={DRIVER}")
    return listing.items


# ---------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------
def test_a_node_publishes_its_gpu_with_consumable_memory_and_compute(make_gpu, api):
    gpu = make_gpu(memory=16 * GiB)
    (probed,) = devices.probe(gpu.env)
    resources.publish(api, NODE, resources.node_gpus(gpu.env))

    (published,) = node_slices(api)
    spec = published.spec
    assert (spec.driver, spec.node_name, spec.pool.name, spec.pool.resource_slice_count) == (DRIVER, NODE, NODE, 1)
    (device,) = spec.devices
    assert device.name == "gpu-0" and device.allow_multiple_allocations is True
    attributes = {k: plain(v) for k, v in device.attributes.items()}
    assert attributes == {"type": {"string": "gpu"}, "uuid": {"string": probed.uuid},
                          "productName": {"string": gpu.config.name}, "index": {"int": 0},
                          "memory": {"int": 16 * GiB}, "computeCapability": {"version": "9.0.0"},
                          "cudaDriverVersion": {"version": sim_cuda_version()},
                          "driverVersion": {"version": "580.0.0"}, "simulated": {"bool": True}}
    memory, compute = device.capacity["memory"], device.capacity["compute"]
    assert memory.value == "16Gi"
    assert plain(memory.request_policy) == {"default": "16Gi",
                                               "validRange": {"min": "256Mi", "max": "16Gi", "step": "256Mi"}}
    assert compute.value == "100"
    assert plain(compute.request_policy) == {"default": "0", "validRange": {"min": "0", "max": "100", "step": "1"}}


def test_the_slice_is_owned_by_its_node_once_the_node_can_be_read(make_gpu, api, kube_apiserver, caplog):
    """As Kubernetes' own kubelet-plugin helper does: the Node owns its slice, so the API server's
    garbage collector deletes it with the node. A node that cannot be read (no such node, no RBAC for
    nodes) gets an unowned slice, said once; once it can be, the slice is given its owner (nothing else
    changes: the pool's generation stays)."""
    gpu = make_gpu(memory=16 * GiB)
    resources._unowned.discard(NODE)   # said once a process: this test's publishes are the ones to say it
    resources.publish(api, NODE, resources.node_gpus(gpu.env))
    resources.publish(api, NODE, resources.node_gpus(gpu.env))
    (unowned,) = node_slices(api)
    assert not unowned.metadata.owner_references
    assert sum(f"node {NODE} cannot be read" in r.getMessage() for r in caplog.records) == 1

    node = kube_apiserver.add_node(NODE)
    resources.publish(api, NODE, resources.node_gpus(gpu.env))
    (owned,) = node_slices(api)
    (owner,) = owned.metadata.owner_references
    assert (owner.api_version, owner.kind, owner.name, owner.uid, owner.controller) == \
        ("v1", "Node", NODE, node["metadata"]["uid"], True)
    assert owned.spec.pool.generation == unowned.spec.pool.generation
    writes = kube_apiserver.writes()
    resources.publish(api, NODE, resources.node_gpus(gpu.env))
    assert kube_apiserver.writes() == writes   # owned and current: nothing to write


def test_publishing_again_changes_nothing_and_a_gpu_change_bumps_the_pool_generation(make_gpu, api, kube_apiserver):
    one = make_gpu(memory=16 * GiB)
    resources.publish(api, NODE, resources.node_gpus(one.env))
    (first,) = node_slices(api)
    writes = kube_apiserver.writes()

    resources.publish(api, NODE, resources.node_gpus(one.env))
    assert kube_apiserver.writes() == writes, "a second publish of the same GPUs wrote to the API server"
    (same,) = node_slices(api)
    assert same.metadata.resource_version == first.metadata.resource_version and same.spec.pool.generation == 1

    two = make_gpu(memory=16 * GiB, devices=2)
    resources.publish(api, NODE, resources.node_gpus(two.env))
    (changed,) = node_slices(api)
    assert changed.metadata.name == first.metadata.name
    assert changed.spec.pool.generation == 2
    assert [d.name for d in changed.spec.devices] == ["gpu-0", "gpu-1"]
    assert [d.attributes["uuid"].string for d in changed.spec.devices] == [d.uuid for d in devices.probe(two.env)]


def test_a_memory_the_api_server_writes_otherwise_is_still_the_same_slice(api, kube_apiserver):
    # 15e9 bytes has no exact binary suffix: the driver writes it plainly and the API server stores "15G".
    gpu = resources.Gpu(0, "GPU-0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e", "a GPU", 15_000_000_000, "8.0", "12.8", False)
    resources.publish(api, NODE, [gpu])
    (stored,) = node_slices(api)
    assert stored.spec.devices[0].capacity["memory"].value == "15G"
    assert stored.spec.devices[0].capacity["memory"].request_policy.default == "14080Mi"   # whole 256Mi steps
    writes = kube_apiserver.writes()
    resources.publish(api, NODE, [gpu])
    assert kube_apiserver.writes() == writes


def test_publish_removes_this_drivers_other_slices_of_the_node_and_unpublish_removes_all(make_gpu, api,
                                                                                          kube_apiserver):
    gpus = resources.node_gpus(make_gpu(memory=16 * GiB).env)
    rapi = client.ResourceV1Api(api)
    stale = resources.node_slice(NODE, gpus)
    stale.spec.pool.name = "old-pool"
    rapi.create_resource_slice(stale)
    elsewhere = resources.node_slice("node-b", gpus)
    rapi.create_resource_slice(elsewhere)

    resources.publish(api, NODE, gpus)
    assert [s.spec.pool.name for s in node_slices(api)] == [NODE]
    resources.unpublish(api, NODE)
    assert node_slices(api) == []
    assert [s["spec"]["nodeName"] for s in kube_apiserver.slice_list()] == ["node-b"]


def test_a_slice_another_writer_updates_meanwhile_is_updated_from_its_latest_version(make_gpu, api,
                                                                                     kube_apiserver):
    one, two = make_gpu(memory=16 * GiB), make_gpu(memory=8 * GiB)
    resources.publish(api, NODE, resources.node_gpus(one.env))
    (first,) = node_slices(api)
    conflicts = []

    def another_writer(method: str, path: str) -> None:   # writes the slice between publish's read and its update
        if method == "PUT" and not conflicts:
            kube_apiserver.touch_slice(first.metadata.name)
            conflicts.append(path)

    kube_apiserver.before = another_writer
    resources.publish(api, NODE, resources.node_gpus(two.env))
    puts = [p for m, p in kube_apiserver.writes() if m == "PUT"]
    assert len(puts) == 2, "publish did not retry the update refused as a conflict"
    (latest,) = node_slices(api)
    assert latest.spec.devices[0].capacity["memory"].value == "8Gi" and latest.spec.pool.generation == 2


# ---------------------------------------------------------------------------------------------------------------
# Reading claims
# ---------------------------------------------------------------------------------------------------------------
GPU = resources.Gpu(0, "GPU-0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e", "fracgpu simulated GPU", 16 * GiB, "9.0", "13.0",
                    True)


def add(server: KubeApiServer, name: str, **kwargs) -> tuple[str, str]:
    """Adds an allocated claim of GPU 0 of NODE; (name, uid)."""
    kwargs.setdefault("pool", NODE)
    kwargs.setdefault("device", "gpu-0")
    stored = server.add_claim(allocated_claim("team-a", name, driver=kwargs.pop("driver", DRIVER), **kwargs))
    return name, stored["metadata"]["uid"]


def plan(api, server, name: str, **kwargs) -> list[resources.DevicePlan]:
    name, uid = add(server, name, **kwargs)
    return resources.plan_claim(resources.read_claim(api, "team-a", name, uid), NODE, [GPU])


def test_claims_get_the_memory_and_share_they_consumed_and_their_priority(api, kube_apiserver):
    (small,) = plan(api, kube_apiserver, "small", consumed={"memory": "8Gi", "compute": "25"})
    (fast,) = plan(api, kube_apiserver, "fast", consumed={"memory": "4Gi", "compute": "50"},
                   config=config(priority="high"))
    assert (small.device, small.gpu_index, small.uuid, small.pool) == ("gpu-0", 0, GPU.uuid, NODE)
    assert (small.memory, small.compute, small.priority, small.cap) == (8 * GiB, 0.25, "normal", False)
    assert (fast.memory, fast.compute, fast.priority, fast.cap) == (4 * GiB, 0.5, "high", False)
    assert small.share_id and fast.share_id and small.share_id != fast.share_id


@pytest.mark.parametrize("memory, compute, expected", [
    ("8192Mi", "25", (8 * GiB, 0.25)),
    ("8589934592", "100", (8 * GiB, 1.0)),
    ("8G", "500m", (8_000_000_000, 0.005)),
    ("1.5Gi", "12.5", (1536 * MiB, 0.125)),
    ("8Gi", "0", (8 * GiB, 0.0)),   # memory alone: no share promised, the time the shares leave
])
def test_consumed_capacity_is_read_as_kubernetes_quantities(api, kube_apiserver, memory, compute, expected):
    (got,) = plan(api, kube_apiserver, "q", consumed={"memory": memory, "compute": compute})
    assert (got.memory, got.compute) == expected


def test_an_exclusive_allocation_gets_the_whole_gpu(api, kube_apiserver):
    (whole,) = plan(api, kube_apiserver, "whole", consumed=None, config=config(cap=True))
    assert (whole.memory, whole.compute, whole.cap, whole.share_id) == (16 * GiB, 1.0, True, None)


def test_class_and_claim_configs_merge_the_claims_winning(api, kube_apiserver):
    claim = allocated_claim("team-a", "merged", driver=DRIVER, pool=NODE, device="gpu-0",
                            consumed={"memory": "2Gi", "compute": "10"}, config=config(priority="high"))
    claim.status.allocation.devices.config[:0] = [
        client.V1DeviceAllocationConfiguration(source="FromClass", opaque=client.V1OpaqueDeviceConfiguration(
            driver=DRIVER, parameters=config(priority="low", cap=True))),
        client.V1DeviceAllocationConfiguration(source="FromClaim", requests=["another-request"],
                                               opaque=client.V1OpaqueDeviceConfiguration(
                                                   driver=DRIVER, parameters=config(priority="normal"))),
        client.V1DeviceAllocationConfiguration(source="FromClaim", opaque=client.V1OpaqueDeviceConfiguration(
            driver="other.example.com", parameters={"anything": 1}))]
    stored = kube_apiserver.add_claim(claim)
    (got,) = resources.plan_claim(resources.read_claim(api, "team-a", "merged", stored["metadata"]["uid"]), NODE,
                                  [GPU])
    assert (got.priority, got.cap) == ("high", True)


def test_results_of_other_drivers_are_not_this_drivers(api, kube_apiserver):
    claim = allocated_claim("team-a", "mixed", driver=DRIVER, pool=NODE, device="gpu-0",
                            consumed={"memory": "2Gi", "compute": "10"})
    claim.status.allocation.devices.results.append(client.V1DeviceRequestAllocationResult(
        request="nic", driver="nic.example.com", pool="elsewhere", device="eth0"))
    (got,) = resources.plan_claim(kube_apiserver.add_claim(claim), NODE, [GPU])
    assert got.device == "gpu-0"


@pytest.mark.fault("A DRA claim whose opaque configuration has an unknown key, a bad value, or the wrong "
                   "apiVersion or kind", "the claim is refused with an error naming the claim and the key")
@pytest.mark.parametrize("parameters, key", [
    (config(priority="high", color="red"), "color"),
    (config(priority="urgent"), "priority"),
    (config(cap="yes"), "cap"),
    ({"apiVersion": CONFIG_API_VERSION, "kind": "MpsConfig"}, "kind"),
    ({"apiVersion": "gpu.fracgpu.dev/v1", "kind": CONFIG_KIND}, "apiVersion"),
    ({"priority": "high"}, "apiVersion"),
])
def test_a_bad_configuration_is_refused_naming_the_claim_and_the_key(api, kube_apiserver, parameters, key):
    with pytest.raises(ClaimError) as refused:
        plan(api, kube_apiserver, "bad-config", consumed={"memory": "8Gi", "compute": "25"}, config=parameters)
    assert refused.value.key == key
    assert "team-a/bad-config" in str(refused.value) and key in str(refused.value)


@pytest.mark.fault("A DRA claim allocated a device of another node's pool, or one this node does not have "
                   "(a stale ResourceSlice)", "the claim is refused naming the claim, the device and the pool")
@pytest.mark.parametrize("pool, device, key", [("node-b", "gpu-0", "pool"), (NODE, "gpu-3", "device")])
def test_a_device_this_node_does_not_have_is_refused(api, kube_apiserver, pool, device, key):
    with pytest.raises(ClaimError) as refused:
        plan(api, kube_apiserver, "elsewhere", pool=pool, device=device, consumed={"memory": "8Gi", "compute": "25"})
    assert refused.value.key == key
    assert "team-a/elsewhere" in str(refused.value) and device in str(refused.value) and pool in str(refused.value)


def test_a_cap_without_a_share_is_refused_naming_the_claim(api, kube_apiserver):
    with pytest.raises(ClaimError) as refused:
        plan(api, kube_apiserver, "capped", consumed={"memory": "8Gi", "compute": "0"}, config=config(cap=True))
    assert refused.value.key == "cap" and "team-a/capped" in str(refused.value)


@pytest.mark.parametrize("consumed, key", [({"memory": "17Gi", "compute": "25"}, "memory"),
                                           ({"memory": "8Gi", "compute": "150"}, "compute"),
                                           ({"memory": "8Gi", "cores": "25"}, "cores")])
def test_a_consumed_capacity_the_gpu_cannot_give_is_refused(api, kube_apiserver, consumed, key):
    with pytest.raises(ClaimError) as refused:
        plan(api, kube_apiserver, "too-much", consumed=consumed)
    assert refused.value.key == key and "team-a/too-much" in str(refused.value)


@pytest.mark.fault("The kubelet asks to prepare a DRA claim that was deleted and made again under the same name",
                   "refused: the claim's UID is not the one asked for")
def test_a_claim_of_another_uid_is_stale(api, kube_apiserver):
    name, asked = add(kube_apiserver, "again", consumed={"memory": "8Gi", "compute": "25"})
    kube_apiserver.remove_claim("team-a", name)
    name, uid = add(kube_apiserver, "again", consumed={"memory": "4Gi", "compute": "25"})
    assert uid != asked
    with pytest.raises(ClaimError, match=f"team-a/again: has UID {uid}, not {asked}"):
        resources.read_claim(api, "team-a", name, asked)


def test_a_missing_or_unallocated_claim_is_refused(api, kube_apiserver):
    with pytest.raises(ClaimError, match="team-a/nothing: not found"):
        resources.read_claim(api, "team-a", "nothing", "0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e")
    pending = allocated_claim("team-a", "pending", driver=DRIVER, pool=NODE, device="gpu-0")
    pending.status = None
    uid = kube_apiserver.add_claim(pending)["metadata"]["uid"]
    with pytest.raises(ClaimError, match="team-a/pending: is not allocated"):
        resources.read_claim(api, "team-a", "pending", uid)


# ---------------------------------------------------------------------------------------------------------------
# Reaching the API server
# ---------------------------------------------------------------------------------------------------------------
def test_without_a_kubeconfig_or_a_pod_the_client_says_what_to_give(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(resources.ApiConfigError, match=r"--kubeconfig.*KUBERNETES_SERVICE_HOST"):
        resources.api_client()
    with pytest.raises(resources.ApiConfigError, match="does not exist"):
        resources.api_client(str(tmp_path / "missing"))
    (tmp_path / "broken").write_text("clusters: [")
    with pytest.raises(resources.ApiConfigError, match="cannot be used"):
        resources.api_client(str(tmp_path / "broken"))


def test_without_the_kubernetes_extra_the_client_says_what_to_install(monkeypatch, kube_apiserver, tmp_path):
    monkeypatch.setitem(sys.modules, "kubernetes", None)   # as if not installed
    with pytest.raises(resources.ApiConfigError, match=r"pip install 'fracgpu\[kubernetes\]'"):
        resources.api_client(kube_apiserver.kubeconfig(tmp_path / "kubeconfig"))


# ---------------------------------------------------------------------------------------------------------------
# The test API server plays the real one's shapes and rules
# ---------------------------------------------------------------------------------------------------------------
def test_what_the_test_api_server_holds_round_trips_through_the_clients_models(make_gpu, api, kube_apiserver):
    resources.publish(api, NODE, resources.node_gpus(make_gpu(memory=16 * GiB).env))
    add(kube_apiserver, "round-trip", consumed={"memory": "8Gi", "compute": "25"}, config=config(priority="low"))
    held = kube_apiserver.slice_list() + list(kube_apiserver.claims.values())
    assert held
    for body in held:
        model = client.V1ResourceSlice if body["kind"] == "ResourceSlice" else client.ResourceV1ResourceClaim
        again = plain(model.from_dict(body))
        # the client writes a time back as "+00:00" where the API server wrote "Z": the same instant
        for meta in (body["metadata"], again["metadata"]):
            meta["creationTimestamp"] = datetime.datetime.fromisoformat(meta["creationTimestamp"])
        assert again == body


def test_the_test_api_server_refuses_what_the_real_one_refuses(api, kube_apiserver):
    rapi = client.ResourceV1Api(api)
    good = resources.node_slice(NODE, [GPU])
    body = client.ApiClient().sanitize_for_serialization(good)

    def refused(mutate) -> tuple[int, str]:
        """(status, message) of a POST of the good slice changed by ``mutate``, sent as raw JSON (the client's
        models would refuse to send some of it)."""
        bad = json.loads(json.dumps(body))
        mutate(bad)
        request = urllib.request.Request(f"{kube_apiserver.url}/apis/resource.k8s.io/v1/resourceslices",
                                         data=json.dumps(bad).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        status = client.V1Status.from_dict(json.loads(e.value.read()))
        assert status.kind == "Status" and status.code == e.value.code
        return e.value.code, status.message

    code, message = refused(lambda b: b["spec"].update(colour="red"))
    assert code == 400 and "colour" in message
    code, message = refused(lambda b: b["spec"]["devices"][0]["capacity"]["memory"]["requestPolicy"].update(
        default="1000Mi"))
    assert code == 422 and "multiple of step" in message
    code, message = refused(lambda b: b["spec"]["devices"][0].pop("allowMultipleAllocations"))
    assert code == 422 and "multiple allocations" in message
    code, message = refused(lambda b: b["spec"]["devices"][0]["attributes"]["index"].update(string="0"))
    assert code == 422 and "exactly one value" in message
    code, message = refused(lambda b: b["spec"]["devices"][0]["attributes"]["computeCapability"].update(
        version="9.0"))
    assert code == 422 and "semver" in message
    code, message = refused(lambda b: b["spec"]["devices"][0].update(name="GPU_0"))
    assert code == 422 and "DNS label" in message

    made = rapi.create_resource_slice(good)
    good.metadata.name = made.metadata.name
    with pytest.raises(ApiException) as exists:
        rapi.create_resource_slice(good)
    assert exists.value.status == 409 and "already exists" in exists.value.body
    with pytest.raises(ApiException) as missing:
        rapi.read_resource_slice("no-such-slice")
    assert missing.value.status == 404

    anonymous = client.ResourceV1Api(client.ApiClient(client.Configuration(host=kube_apiserver.url)))
    with pytest.raises(ApiException) as unauthorized:
        anonymous.list_resource_slice()
    assert unauthorized.value.status == 401


@pytest.mark.parametrize("written, stored", [("16Gi", "16Gi"), ("17179869184", "17179869184"), ("16000000000", "16G"),
                                             ("1024Mi", "1Gi"), ("0.5", "500m"), ("100", "100"), ("1536Mi", "1536Mi")])
def test_the_test_api_server_stores_quantities_canonically(written, stored):
    assert canonical_quantity(written) == stored


def test_the_test_api_server_lists_and_deletes_by_selector(api, kube_apiserver):
    rapi = client.ResourceV1Api(api)
    for node, team in (("node-a", "red"), ("node-b", "blue"), ("node-c", "red")):
        s = resources.node_slice(node, [GPU])
        s.metadata.labels = {"team": team}
        rapi.create_resource_slice(s)
    assert {s.spec.node_name for s in rapi.list_resource_slice(label_selector="team=red").items} == {"node-a", "node-c"}
    assert {s.spec.node_name for s in rapi.list_resource_slice(label_selector="team!=red").items} == {"node-b"}
    assert [s.spec.node_name for s in rapi.list_resource_slice(field_selector="spec.nodeName=node-b").items] == [
        "node-b"]
    rapi.delete_collection_resource_slice(field_selector=f"spec.driver={DRIVER},spec.nodeName=node-a")
    assert sorted(s.spec.node_name for s in rapi.list_resource_slice().items) == ["node-b", "node-c"]

    add(kube_apiserver, "one", consumed=None)
    add(kube_apiserver, "two", consumed=None)
    names = [c.metadata.name for c in rapi.list_namespaced_resource_claim("team-a").items]
    assert names == ["one", "two"] and rapi.list_namespaced_resource_claim("team-b").items == []
