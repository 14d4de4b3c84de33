"""Per-pod accounting on a Kubernetes node: `fracgpu node --pod-resources-socket` asks the kubelet's pod
resources API (played here over its real gRPC protocol) which pod holds each partition, labels the jobs
of those partitions with it (ledger, exporter, top, the bill per namespace), and removes a device
plugin's slices partition once no pod holds it and no process uses it.

The partitions are made under the names the DRA driver and the device plugin give them; the jobs in them
are host processes no `fracgpu run` wraps, which the agent records, as it records a container's."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fracgpu import kube, state
from tests.node.test_node_agent import Job, agent  # noqa: F401  (the node agent's fixture)
from tests.support.containers import CDI_DIR, cdi_kind, podman  # noqa: F401  (fixtures)
from tests.support.podresources import Container, Pod, Served
from tests.support.simgpu import CTYPES_PRELUDE, MiB, wait_for

UID = "0f4c6a52-8d0e-4f7b-9a35-6a1d2b3c4d5e"
SLICES = kube.slices_partition(0, [0, 1])   # pod A's 2 slices of GPU 0 (the device plugin's partition)
OTHER_SLICES = kube.slices_partition(0, [2])
CLAIM = kube.claim_partition(UID, 0)         # claim X's partition on GPU 0 (the DRA driver's)
CLAIM_DEVICE = f"{kube.CLAIM_CDI_KIND}={kube.claim_cdi_device(UID, 0)}"
POD_A = {"namespace": "team-a", "pod": "trainer-a", "container": "main"}
# In a container: 16 MiB through the shim, then hold until killed.
HOLD = CTYPES_PRELUDE + """import time
p = ctypes.c_uint64()
assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(16 << 20)) == 0
print("ready", flush=True)
time.sleep(600)
"""
POD_B = {"namespace": "team-b", "pod": "infer-b", "container": "server", "claim": "claim-x"}


def pod_a(uuid: str) -> Pod:
    return Pod("team-a", "trainer-a", [Container("main", slices={uuid: [0, 1]})])


def pod_b() -> Pod:
    return Pod("team-b", "infer-b", [Container("server", claims=[("claim-x", "team-b", [CLAIM_DEVICE])])])


@pytest.fixture
def kubelet(tmp_path):
    served = Served(tmp_path / "pod-resources.sock")
    yield served
    served.stop()


def partitions(gpu, *names: str, memory: str = "256MiB") -> str:
    """Makes the partitions; the GPU's uuid."""
    for name in names:
        gpu.fracgpu("partition", "create", name, "--memory", memory, "--compute", "25%")
    (path,) = state.region_files(str(gpu.state_dir))
    return state.open_region_file(path).uuid


def names(gpu) -> set[str]:
    return {p["name"] for u in json.loads(gpu.fracgpu("partition", "list", "--json").stdout) for p in u["partitions"]}


def rows(gpu) -> list[dict]:
    return json.loads(gpu.fracgpu("report", "--format", "json").stdout)


def pod_labels(row: dict) -> dict[str, str]:
    return {k: v for k, v in row["labels"].items() if k in kube.LABELS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_jobs_of_pods_carry_their_pods_labels_in_the_ledger_the_exporter_top_and_the_bill(
        gpu, shim, kernels, kubelet, agent):
    uuid = partitions(gpu, SLICES, CLAIM)
    kubelet.service.set_pods(pod_a(uuid), pod_b())
    port = free_port()
    agent("--pod-resources-socket", kubelet.socket_path, "--metrics-port", str(port))
    jobs = {SLICES: Job(gpu, shim, kernels, SLICES, namespace=False), CLAIM: Job(gpu, shim, kernels, CLAIM,
                                                                              namespace=False)}
    try:
        for job in jobs.values():
            assert job.ask("alloc 16") == "0" and job.ask("spin 100") == "0"
        found = wait_for(lambda: rows(gpu), lambda r: len(r) == 2 and all(x["gpu_seconds"] > 0.09 for x in r), 3.0)
        assert {x["partition"]: pod_labels(x) for x in found} == {SLICES: POD_A, CLAIM: POD_B}

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        series = {(s.name, s.labels["partition"]): s.labels for family in text_string_to_metric_families(text)
                  for s in family.samples if s.labels.get("partition") in (SLICES, CLAIM)}
        pod = lambda labels: {k: labels[k] for k in kube.LABELS}   # noqa: E731
        assert pod(series["fracgpu_partition_device_seconds_total", SLICES]) == {**POD_A, "claim": ""}
        assert pod(series["fracgpu_partition_memory_used_bytes", CLAIM]) == POD_B

        (top,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        assert {p["name"]: p["pod"] for p in top["partitions"]} == {SLICES: POD_A, CLAIM: POD_B}
        wide = gpu.fracgpu("top", "--once", "--interval", "0.1", env={"COLUMNS": "160"}).stdout
        assert "team-a/trainer-a" in wide and "team-b/infer-b" in wide
    finally:
        for job in jobs.values():
            job.kill()
    wait_for(lambda: rows(gpu), lambda r: all(x["end"] is not None for x in r), 3.0)
    bill = json.loads(gpu.fracgpu("report", "--by", "namespace", "--format", "json").stdout)
    assert set(bill["groups"]) == {"team-a", "team-b"}
    by_pod = json.loads(gpu.fracgpu("report", "--by", "label:pod", "--format", "json").stdout)
    assert set(by_pod["groups"]) == {"trainer-a", "infer-b"}


@pytest.mark.fault("A pod given device plugin slices ends (the kubelet's pod resources API stops listing it), with "
                   "`fracgpu node --pod-resources-socket` running",
                   "its slices partition and CDI device are removed once the answers have not listed it for the grace "
                   "(two in a row at least) and no live process uses it; a DRA claim's partition is left to the DRA "
                   "driver")
def test_a_slices_partition_no_pod_holds_is_removed_after_two_answers_unless_processes_use_it(
        gpu, shim, kernels, kubelet, agent, tmp_path):
    uuid = partitions(gpu, SLICES, OTHER_SLICES, CLAIM)
    cdi_root = tmp_path / "cdi"
    cdi_root.mkdir()
    spec = cdi_root / "k8s.fracgpu.dev-slices.json"
    spec.write_text(json.dumps({"cdiVersion": "0.6.0", "kind": kube.SLICES_CDI_KIND, "devices": [
        {"name": name, "containerEdits": {"env": [f"FRACGPU_PARTITION={name}"]}} for name in (SLICES, OTHER_SLICES)]}))
    kubelet.service.set_pods(pod_a(uuid), Pod("team-c", "busy", [Container("main", slices={uuid: [2]})]), pod_b())
    node = agent("--pod-resources-socket", kubelet.socket_path, "--pod-resources-grace", "1.5", "--cdi-root", cdi_root)
    busy = Job(gpu, shim, kernels, OTHER_SLICES, namespace=False)
    try:
        assert busy.ask("alloc 16") == "0"
        asked = kubelet.service.lists
        wait_for(lambda: kubelet.service.lists, lambda n: n >= asked + 2, 5.0)
        assert names(gpu) == {SLICES, OTHER_SLICES, CLAIM}   # held: kept

        kubelet.service.set_pods()   # every pod has gone (claim X's too: its partition is the DRA driver's)
        gone = kubelet.service.lists
        wait_for(lambda: kubelet.service.lists, lambda n: n >= gone + 1, 5.0)
        time.sleep(0.3)
        assert SLICES in names(gpu)   # one answer without it is not enough, nor two within the grace
        wait_for(lambda: names(gpu), lambda n: SLICES not in n, 4.0)
        assert names(gpu) == {OTHER_SLICES, CLAIM}   # a partition in use is kept; a claim's is never the agent's
        assert [d["name"] for d in json.loads(spec.read_text())["devices"]] == [OTHER_SLICES]
        time.sleep(1.5)
        assert OTHER_SLICES in names(gpu)
    finally:
        busy.kill()
    wait_for(lambda: names(gpu), lambda n: OTHER_SLICES not in n, 4.0)
    assert names(gpu) == {CLAIM}
    assert not spec.exists()
    log = node.stop()
    assert f"removed partition '{SLICES}' on {uuid}: no pod holds its slices any more" in log
    assert f"partition '{OTHER_SLICES}' on {uuid} is held by no pod any more but is in use by process {busy.pid}" \
        in log
    assert log.count("held by no pod any more but is in use") == 1   # said once, though asked at every answer


@pytest.mark.fault("The kubelet's pod resources socket missing or not answering, with `fracgpu node "
                   "--pod-resources-socket`",
                   "one warning; the agent records on, nothing is removed, and jobs get their pod's labels once it "
                   "answers")
def test_without_the_pod_resources_service_the_agent_warns_removes_nothing_and_labels_once_it_answers(
        gpu, shim, kernels, agent, tmp_path):
    uuid = partitions(gpu, SLICES)
    path = str(tmp_path / "pod-resources.sock")
    node = agent("--pod-resources-socket", path, "--pod-resources-grace", "0")
    job = Job(gpu, shim, kernels, SLICES, namespace=False)
    kubelet = None
    try:
        assert job.ask("alloc 16") == "0"
        (row,) = wait_for(lambda: rows(gpu), lambda r: len(r) == 1, 3.0)
        assert pod_labels(row) == {}
        time.sleep(2.5)   # two and more looks with no answer
        assert names(gpu) == {SLICES} and node.proc.poll() is None
        kubelet = Served(path)   # the kubelet (re)starts and names the pod
        kubelet.service.set_pods(pod_a(uuid))
        (row,) = wait_for(lambda: rows(gpu), lambda r: pod_labels(r[0]) == POD_A, 3.0)
        assert pod_labels(row) == POD_A
    finally:
        job.kill()
        log = node.stop()
        if kubelet:
            kubelet.stop()
    assert f"the kubelet's pod resources service at {path} did not answer List" in log
    assert log.count("did not answer List") == 1   # said once, not at every look
    assert "answers again" in log
    assert names(gpu) == {SLICES}


def test_a_pods_container_on_its_slices_is_one_ledger_job_with_the_pods_labels(gpu, podman, cdi_kind, kubelet,
                                                                                agent, tmp_path):
    """A podman container given the slices partition's CDI device, as the kubelet's runtime would start
    pod A's container: its job is labelled with the pod's container name, its runtime id kept in the key."""
    runner, rootfs = podman
    uuid = partitions(gpu, SLICES)
    kubelet.service.set_pods(pod_a(uuid))
    agent("--pod-resources-socket", kubelet.socket_path, "--cdi", "--cdi-output",
          CDI_DIR / (cdi_kind.replace("/", "-") + ".json"), "--cdi-config-dir", tmp_path / "cdi", "--cdi-kind", cdi_kind)
    name = f"fracgpu-pod-{tmp_path.name[-12:]}"
    container = runner.popen(rootfs, ["/usr/bin/python3", "-c", HOLD], devices=[f"{cdi_kind}={SLICES}"], name=name)
    try:
        line = container.stdout.readline().strip()
        assert line == "ready", container.stderr.read() if container.poll() is not None else line
        (row,) = wait_for(lambda: rows(gpu), lambda r: len(r) == 1 and r[0]["peak_memory_bytes"] > 0, 3.0)
        assert (row["partition"], pod_labels(row)) == (SLICES, POD_A)
        assert row["labels"]["fracgpu.node/key"].startswith("container:")
        assert row["peak_memory_bytes"] == gpu.context + 16 * MiB
    finally:
        runner.kill(name)
        container.wait(timeout=60)
