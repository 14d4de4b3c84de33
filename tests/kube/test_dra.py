"""The DRA kubelet plugin (`fracgpu kubelet-plugin`) as a kubelet and an API server see it.

The plugin runs as a real process on a 16 GiB simulated GPU; the test kubelet finds it through its
registration socket and calls NodePrepareResources and NodeUnprepareResources over gRPC, as the
kubelet does; the claims the scheduler allocated are in the test API server. Whether a partition
holds a claim's limits is read from the node's state (`fracgpu partition list`)."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from fracgpu.kube import CLAIM_CDI_KIND, DRIVER, claim_partition
from tests.support.dra_node import NODE, dra_node, gpu_config  # noqa: F401
from tests.support.simgpu import GiB, wait_for

pytest.importorskip("grpc")


def cdi_id(claim) -> str:
    return f"{CLAIM_CDI_KIND}={claim.uid}-gpu0"


def partitions_of(gpu) -> dict[str, dict]:
    usage = json.loads(gpu.fracgpu("partition", "list", "--json", timeout=30).stdout)
    return {p["name"]: p for u in usage for p in u["partitions"]}


def devices(answer) -> list[tuple]:
    return [(list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids)) for d in answer.devices]


def test_the_kubelet_finds_the_plugin_and_prepares_two_claims_into_partitions_with_their_limits(dra_node):
    registered = dra_node.start()
    assert (registered.info.type, registered.info.name) == ("DRAPlugin", DRIVER)
    assert list(registered.info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert registered.info.endpoint == str(dra_node.plugins_dir / DRIVER / "dra.sock")
    train = dra_node.claim("train", "8Gi", "25")
    serve = dra_node.claim("serve", "4Gi", "50", config=gpu_config(priority="high"))

    answers = dra_node.kubelet.prepare(DRIVER, [train, serve])

    assert {uid: a.error for uid, a in answers.items()} == {train.uid: "", serve.uid: ""}
    for claim in (train, serve):
        assert devices(answers[claim.uid]) == [(["gpu"], NODE, "gpu-0", [cdi_id(claim)])]
        (result,) = dra_node.api.claims[("team-a", claim.name)]["status"]["allocation"]["devices"]["results"]
        assert answers[claim.uid].devices[0].share_id == result["shareID"]   # this claim's share of gpu-0
        spec = json.loads(dra_node.spec_path(claim).read_text())
        assert spec["kind"] == CLAIM_CDI_KIND
        assert [d["name"] for d in spec["devices"]] == [f"{claim.uid}-gpu0"]
        mounts = {m["containerPath"]: m["hostPath"] for m in spec["devices"][0]["containerEdits"]["mounts"]}
        binding = (dra_node.folder / "cdi-config" / f"{claim_partition(claim.uid, 0)}.conf").read_text()
        assert mounts["/etc/fracgpu/fracgpu.conf"].endswith(f"{claim_partition(claim.uid, 0)}.conf")
        assert f"partition = {claim_partition(claim.uid, 0)}" in binding
    made = partitions_of(dra_node.gpu)
    a, b = made[claim_partition(train.uid, 0)], made[claim_partition(serve.uid, 0)]
    assert (a["memory_limit"], a["compute_share"], a["compute_cap"], a["priority"]) == (8 * GiB, 0.25, False, "normal")
    assert (b["memory_limit"], b["compute_share"], b["compute_cap"], b["priority"]) == (4 * GiB, 0.5, False, "high")


def test_unprepare_removes_the_claims_partitions_and_specs(dra_node):
    dra_node.start()
    train, serve = dra_node.claim("train", "8Gi", "25"), dra_node.claim("serve", "4Gi", "50")
    dra_node.kubelet.prepare(DRIVER, [train, serve])

    assert dra_node.kubelet.unprepare(DRIVER, [train, serve]) == {train.uid: "", serve.uid: ""}

    assert not any(name.startswith("k8s-claim-") for name in partitions_of(dra_node.gpu))
    assert not dra_node.spec_path(train).exists() and not dra_node.spec_path(serve).exists()
    assert not (dra_node.folder / "cdi-config" / f"{claim_partition(train.uid, 0)}.conf").exists()
    assert json.loads(dra_node.checkpoint.read_text())["claims"] == {}
    # The kubelet retries: unpreparing again, or a claim this plugin never saw, succeeds.
    assert dra_node.kubelet.unprepare(DRIVER, [train]) == {train.uid: ""}


def test_a_repeated_prepare_answers_the_same_and_makes_nothing_twice(dra_node):
    dra_node.start()
    train = dra_node.claim("train", "8Gi", "25")
    first = dra_node.kubelet.prepare(DRIVER, [train])
    before = partitions_of(dra_node.gpu)

    again = dra_node.kubelet.prepare(DRIVER, [train])

    assert devices(again[train.uid]) == devices(first[train.uid]) and again[train.uid].error == ""
    assert partitions_of(dra_node.gpu) == before
    assert list(json.loads(dra_node.checkpoint.read_text())["claims"]) == [train.uid]


def test_a_partition_of_the_claims_name_is_its_own_only_with_the_claims_limits(dra_node):
    dra_node.start()
    train, serve = dra_node.claim("train", "8Gi", "25"), dra_node.claim("serve", "4Gi", "50")
    dra_node.gpu.fracgpu("partition", "create", claim_partition(train.uid, 0), "--memory", "8GiB", "--compute", "25%")
    dra_node.gpu.fracgpu("partition", "create", claim_partition(serve.uid, 0), "--memory", "2GiB")

    answers = dra_node.kubelet.prepare(DRIVER, [train, serve])

    assert answers[train.uid].error == "" and devices(answers[train.uid])[0][3] == [cdi_id(train)]
    assert f"partition '{claim_partition(serve.uid, 0)}' exists with other limits (2GiB, no share, normal) than " \
        "the claim's (4GiB, 50%, normal)" in answers[serve.uid].error, answers[serve.uid].error
    assert partitions_of(dra_node.gpu)[claim_partition(serve.uid, 0)]["memory_limit"] == 2 * GiB   # left as it was


def test_a_restarted_plugin_answers_and_unprepares_the_claims_it_prepared_before(dra_node):
    dra_node.start()
    train, serve = dra_node.claim("train", "8Gi", "25"), dra_node.claim("serve", "4Gi", "50")
    first = dra_node.kubelet.prepare(DRIVER, [train, serve])
    err = dra_node.stop()   # SIGTERM, as the kubelet's DaemonSet update sends
    assert "registered with the kubelet" in err
    assert not (dra_node.registrar_dir / f"{DRIVER}-reg.sock").exists(), err
    assert not (dra_node.plugins_dir / DRIVER / "dra.sock").exists()
    assert len([n for n in partitions_of(dra_node.gpu) if n.startswith("k8s-claim-")]) == 2   # prepared stays

    dra_node.start()
    again = dra_node.kubelet.prepare(DRIVER, [train])
    assert devices(again[train.uid]) == devices(first[train.uid]) and again[train.uid].error == ""
    assert dra_node.kubelet.unprepare(DRIVER, [train, serve]) == {train.uid: "", serve.uid: ""}

    assert not any(name.startswith("k8s-claim-") for name in partitions_of(dra_node.gpu))
    assert not dra_node.spec_path(train).exists() and not dra_node.spec_path(serve).exists()


@pytest.mark.fault("The DRA kubelet plugin is killed (SIGKILL) after preparing a claim, and started again",
                   "the kubelet's unprepare of that claim removes its partition and CDI spec: nothing lost, "
                   "nothing doubled")
def test_a_plugin_killed_mid_way_loses_no_claim(dra_node):
    dra_node.start()
    train = dra_node.claim("train", "8Gi", "25")
    dra_node.kubelet.prepare(DRIVER, [train])
    dra_node.stop(signal.SIGKILL)   # no clean exit: its sockets stay behind

    dra_node.start()
    assert dra_node.kubelet.unprepare(DRIVER, [train]) == {train.uid: ""}
    assert not any(name.startswith("k8s-claim-") for name in partitions_of(dra_node.gpu))


@pytest.mark.fault("A stale slice lets the scheduler send the DRA plugin a claim that does not fit beside the "
                   "claims already prepared on the GPU",
                   "that claim's prepare fails (its error field, the kubelet retries) naming the claim and the "
                   "GPU's promises; nothing is made")
def test_a_claim_that_does_not_fit_beside_the_promises_fails_naming_them(dra_node):
    dra_node.start()
    train = dra_node.claim("train", "8Gi", "25")
    big = dra_node.claim("big", "12Gi", "25")
    dra_node.kubelet.prepare(DRIVER, [train])

    answer = dra_node.kubelet.prepare(DRIVER, [big])[big.uid]

    assert answer.error and not answer.devices
    assert "claim team-a/big does not fit" in answer.error, answer.error
    assert claim_partition(train.uid, 0) in answer.error and "8GiB" in answer.error, answer.error
    assert "--overcommit" not in answer.error   # the CLI's way out; a claim has none
    assert claim_partition(big.uid, 0) not in partitions_of(dra_node.gpu)
    assert not dra_node.spec_path(big).exists()
    assert list(json.loads(dra_node.checkpoint.read_text())["claims"]) == [train.uid]


@pytest.mark.fault("A claim's opaque config for the DRA driver has an unknown key",
                   "its prepare fails naming the claim and the key; the other claims of the call are prepared")
def test_a_claim_with_an_unknown_config_key_fails_naming_the_claim_and_the_key(dra_node):
    dra_node.start()
    bad = dra_node.claim("bad", "4Gi", "25", config={**gpu_config(priority="high"), "colour": "blue"})
    good = dra_node.claim("good", "4Gi", "25")

    answers = dra_node.kubelet.prepare(DRIVER, [bad, good])

    assert "team-a/bad" in answers[bad.uid].error and "colour" in answers[bad.uid].error, answers[bad.uid].error
    assert answers[good.uid].error == ""   # one claim's error is its own
    assert set(n for n in partitions_of(dra_node.gpu) if n.startswith("k8s-claim-")) == {claim_partition(good.uid, 0)}


def test_a_claim_given_a_whole_gpu_gets_all_its_memory_and_time(dra_node):
    dra_node.start()
    whole = dra_node.claim("whole", None, None)
    assert dra_node.kubelet.prepare(DRIVER, [whole])[whole.uid].error == ""
    made = partitions_of(dra_node.gpu)[claim_partition(whole.uid, 0)]
    assert (made["memory_limit"], made["compute_share"]) == (16 * GiB, 1.0)


def test_a_claim_for_memory_alone_is_promised_no_share_and_leaves_the_gpu_shareable(dra_node):
    dra_node.start()
    memory = dra_node.claim("memory-only", "8Gi", "0")   # the slice's default when a request names no compute
    full = dra_node.claim("full-time", "4Gi", "100")
    answers = dra_node.kubelet.prepare(DRIVER, [memory, full])
    assert [answers[c.uid].error for c in (memory, full)] == ["", ""]
    made = partitions_of(dra_node.gpu)
    assert (made[claim_partition(memory.uid, 0)]["memory_limit"], made[claim_partition(memory.uid, 0)]["compute_share"]) \
        == (8 * GiB, None)   # no share
    assert made[claim_partition(full.uid, 0)]["compute_share"] == 1.0


def test_two_requests_of_a_claim_on_one_gpu_share_its_partition(dra_node):
    dra_node.start()
    pair = dra_node.claim("pair", "2Gi", "10", more=(("sidecar", "4Gi", "25"),))
    answer = dra_node.kubelet.prepare(DRIVER, [pair])[pair.uid]
    assert devices(answer) == [(["gpu"], NODE, "gpu-0", [cdi_id(pair)]), (["sidecar"], NODE, "gpu-0", [cdi_id(pair)])]
    made = partitions_of(dra_node.gpu)[claim_partition(pair.uid, 0)]
    assert (made["memory_limit"], made["compute_share"]) == (6 * GiB, 0.35)


def test_a_claim_on_the_second_gpu_gets_its_partition_and_device_there(dra_node, make_gpu):
    dra_node.gpu = make_gpu(memory=16 * GiB, devices=2)
    dra_node.start()
    second = dra_node.claim("second", "8Gi", "25", device="gpu-1")
    answer = dra_node.kubelet.prepare(DRIVER, [second])[second.uid]
    assert devices(answer) == [(["gpu"], NODE, "gpu-1", [f"{CLAIM_CDI_KIND}={second.uid}-gpu1"])]
    usage = json.loads(dra_node.gpu.fracgpu("partition", "list", "--json").stdout)
    assert [(u["index"], [p["name"] for p in u["partitions"]]) for u in usage] == \
        [(1, [claim_partition(second.uid, 1)])]
    assert dra_node.kubelet.unprepare(DRIVER, [second]) == {second.uid: ""}


def test_an_older_kubelet_speaks_v1beta1(dra_node):
    dra_node.start(service="v1beta1.DRAPlugin")
    train = dra_node.claim("train", "8Gi", "25")
    answers = dra_node.kubelet.prepare(DRIVER, [train])
    assert devices(answers[train.uid]) == [(["gpu"], NODE, "gpu-0", [cdi_id(train)])]
    assert dra_node.kubelet.unprepare(DRIVER, [train]) == {train.uid: ""}


@pytest.mark.fault("The kubelet unprepares a claim whose partition still has live processes",
                   "refused for that claim naming the processes (the kubelet retries); the partition is removed "
                   "once they have ended")
def test_a_claim_whose_partition_is_in_use_is_unprepared_only_once_its_processes_end(dra_node, clients):
    dra_node.start()
    train = dra_node.claim("train", "8Gi", "25")
    dra_node.kubelet.prepare(DRIVER, [train])
    job = dra_node.gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", claim_partition(train.uid, 0),
                             "--", clients.lcuda, "hold", "64", "60")
    try:
        assert wait_for(lambda: partitions_of(dra_node.gpu)[claim_partition(train.uid, 0)]["processes"], bool, 30)
        error = dra_node.kubelet.unprepare(DRIVER, [train])[train.uid]
        assert "claim team-a/train is still in use" in error and "process" in error, error
        assert claim_partition(train.uid, 0) in partitions_of(dra_node.gpu)
    finally:
        job.kill()
        job.wait(timeout=30)
    assert dra_node.kubelet.unprepare(DRIVER, [train]) == {train.uid: ""}
    assert claim_partition(train.uid, 0) not in partitions_of(dra_node.gpu)


def test_the_plugin_publishes_the_nodes_slice_on_start(dra_node):
    dra_node.start()
    (published,) = dra_node.api.slice_list()
    assert (published["spec"]["driver"], published["spec"]["nodeName"]) == (DRIVER, NODE)
    assert [d["name"] for d in published["spec"]["devices"]] == ["gpu-0"]
    assert published["spec"]["devices"][0]["capacity"]["memory"]["value"] == "16Gi"


def test_the_plugin_keeps_the_slice_current_and_removes_it_at_exit_when_asked(dra_node):
    dra_node.start("--publish-interval", "0.2", "--remove-slices")
    (first,) = dra_node.api.slice_list()
    import kubernetes

    from fracgpu.kube import resources

    # Someone deletes it behind the plugin's back.
    api = resources.api_client(str(dra_node.kubeconfig))
    kubernetes.client.ResourceV1Api(api).delete_resource_slice(first["metadata"]["name"])
    (again,) = wait_for(dra_node.api.slice_list, bool, 10)
    assert again["spec"] == first["spec"]
    dra_node.stop(signal.SIGINT)   # Ctrl-C
    assert dra_node.api.slice_list() == []
    assert not (dra_node.plugins_dir / DRIVER / "dra.sock").exists()


def test_help_and_bad_options_give_clear_errors(dra_node):
    help_text = dra_node.gpu.fracgpu("kubelet-plugin", "--help").stdout
    for option in ("--node-name", "--kubeconfig", "--kubelet-registrar-directory-path",
                   "--kubelet-plugins-directory-path", "--cdi-root"):
        assert option in help_text
    argv = dra_node.plugin_argv()
    without_node = argv[:4] + argv[6:]
    missing = dra_node.gpu.run(*without_node, check=False, env={"NODE_NAME": ""})
    assert missing.returncode == 2 and "--node-name" in missing.stderr, missing.stderr
    unreadable = dra_node.gpu.run(*[a if a != str(dra_node.kubeconfig) else "/nonexistent/kubeconfig" for a in argv],
                                  check=False)
    assert unreadable.returncode == 2 and "/nonexistent/kubeconfig" in unreadable.stderr, unreadable.stderr
    garbage = dra_node.folder / "garbage"
    garbage.write_text("this: is: not a kubeconfig\n")
    refused = dra_node.gpu.run(*[a if a != str(dra_node.kubeconfig) else str(garbage) for a in argv], check=False,
                               timeout=120)
    assert refused.returncode == 2 and f"the kubeconfig {garbage} cannot be used" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_without_the_kubernetes_extra_the_command_says_what_to_install(dra_node):
    code = ("import sys; sys.modules['grpc'] = None\n"   # as if grpcio were not installed
            "from fracgpu.cli import main; main(['kubelet-plugin', '--node-name', 'n'], prog_name='fracgpu')")
    result = dra_node.gpu.python(code, check=False)
    assert result.returncode == 2 and "pip install 'fracgpu[kubernetes]'" in result.stderr, result.stderr
    assert "grpc is not installed" in result.stderr


def test_a_damaged_checkpoint_is_refused_before_the_plugin_serves(dra_node):
    dra_node.checkpoint.parent.mkdir(parents=True)
    dra_node.checkpoint.write_text("{not json")
    result = dra_node.gpu.run(*dra_node.plugin_argv(), check=False, timeout=120)
    assert result.returncode == 2 and f"the checkpoint {dra_node.checkpoint} cannot be read" in result.stderr, \
        result.stderr
    assert "move it away" in result.stderr and not (dra_node.registrar_dir / f"{DRIVER}-reg.sock").exists()


def test_a_plugin_that_cannot_reach_the_api_server_says_so_and_exits(dra_node):
    dra_node.api.stop()
    result = dra_node.gpu.run(*dra_node.plugin_argv(), check=False, timeout=120)
    assert result.returncode == 2 and "cannot publish this node's ResourceSlice" in result.stderr, result.stderr
    assert not (dra_node.registrar_dir / f"{DRIVER}-reg.sock").exists()

