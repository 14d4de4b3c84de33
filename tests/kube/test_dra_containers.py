"""Pods' containers on claims the DRA plugin prepared: real podman and runc given the CDI device ids
the plugin answered, as the kubelet's container runtime would be, on a 16 GiB simulated GPU.

Whether a claim's memory holds is judged by the simulated device's own figure, polled while the
container runs; whether its share holds, by the device time each busy container's kernels got
per 1 s window (1 ms spins, as tests/shim/test_compute.py measures shares)."""

from __future__ import annotations

import shutil
import sys
import time
import uuid

import pytest

from fracgpu import sim
from fracgpu.kube import DRIVER
from tests.containers.test_cdi_containers import MONITOR
from tests.shim.test_compute import completions, shares_of_device_time, windows
from tests.support.containers import CDI_DIR, podman  # noqa: F401
from tests.support.dra_node import dra_node, gpu_config  # noqa: F401
from tests.support.simgpu import GiB, MiB, parse_facts

pytest.importorskip("grpc")

BLOCK_MIB = 256
KERNELS = "/opt/clients/kernels.fatbin"


@pytest.fixture
def claims_on_the_node(request, dra_node, podman, kernels):
    """The plugin running with the machine's CDI folder (podman reads specs only there), and two claims
    prepared: train (8Gi, 25%) and serve (4Gi, 50%, high priority unless the test's parameter names
    another); their CDI device ids."""
    _, rootfs = podman
    if not (rootfs / KERNELS.lstrip("/")).exists():
        shutil.copy(kernels, rootfs / KERNELS.lstrip("/"))
    dra_node.cdi_root = CDI_DIR
    dra_node.start()
    train = dra_node.claim("train", "8Gi", "25")
    serve = dra_node.claim("serve", "4Gi", "50", config=gpu_config(priority=getattr(request, "param", "high")))
    answers = dra_node.kubelet.prepare(DRIVER, [train, serve])
    assert all(a.error == "" for a in answers.values()), answers
    ids = {c.name: list(answers[c.uid].devices[0].cdi_device_ids) for c in (train, serve)}
    yield dra_node, ids
    assert dra_node.kubelet.unprepare(DRIVER, [train, serve]) == {train.uid: "", serve.uid: ""}


@pytest.mark.parametrize(("claim", "quota"), [("train", 8 * GiB), ("serve", 4 * GiB)])
def test_a_container_given_a_claims_device_is_held_to_the_claims_memory_on_the_device(claims_on_the_node, podman,
                                                                                         claim, quota):
    node, ids = claims_on_the_node
    runner, rootfs = podman
    monitor = node.gpu.popen(sys.executable, "-c", MONITOR, sim.library_dir() / "libnvidia-ml.so.1")
    assert monitor.stdout.readline().strip() == "ready"
    try:
        # Blocks until refused, held a second: the device's figure is read while the container holds them.
        result = runner.run(rootfs, ["/opt/clients/client_lcuda", "alloc-until-oom", BLOCK_MIB, 0, 1],
                            devices=ids[claim])
    finally:
        facts = parse_facts(monitor.communicate("", timeout=60)[0])
    assert result.returncode == 0, result.stderr
    got = parse_facts(result.stdout)
    assert got["result"] == "CUDA_ERROR_OUT_OF_MEMORY", result.stdout
    assert int(got["blocks"]) == (quota - node.gpu.context) // (BLOCK_MIB * MiB), result.stdout
    # The device's own figure, all along: the container held its claim's memory, never more.
    assert quota - BLOCK_MIB * MiB < int(facts["most"]) <= quota, (facts, result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("claims_on_the_node", ["normal", "high"], indirect=True)
def test_two_busy_containers_get_the_device_time_their_claims_promise(claims_on_the_node, podman, request):
    """Both normal: the device's time in the ratio of their shares, 1:2. Serve at high priority: held
    to its 50% share of the device while train is busy (so that it cannot starve it), and train gets at
    least its own 25% (while serve is busy its queue is kept one kernel deep, so the device idles
    between train's kernels: train's part is what is left less those gaps)."""
    node, ids = claims_on_the_node
    runner, rootfs = podman
    seconds = 5
    start = (time.monotonic() + 6) * 1000   # after both podman runs have started their containers
    names = {claim: f"fracgpu-dra-{uuid.uuid4().hex[:10]}" for claim in ids}
    jobs = {claim: runner.popen(rootfs, ["/opt/clients/client_lcuda", "busy", seconds, 1, KERNELS, f"{start:.3f}"],
                                devices=ids[claim], name=names[claim]) for claim in ids}
    try:
        got = {claim: windows(completions(job), seconds) for claim, job in jobs.items()}
    finally:
        for claim, job in jobs.items():
            if job.poll() is None:
                runner.kill(names[claim])
                job.wait(timeout=60)
    if request.node.callspec.params["claims_on_the_node"] == "normal":
        for shares, _ in shares_of_device_time(got):
            assert abs(shares["serve"] - 2 / 3) <= 0.03 and abs(shares["train"] - 1 / 3) <= 0.03, got
    else:
        for w in range(len(got["serve"])):
            assert abs(got["serve"][w] - 0.50) <= 0.03 and got["train"][w] >= 0.25, got
