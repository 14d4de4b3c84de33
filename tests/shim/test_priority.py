"""Priority classes on the simulated GPU: a latency-critical service beside training.

The service is the C client's `requests` command (one 1 ms spin and a
synchronize every 20 ms, each request's latency printed); the trainer is its
`busy` command (2 ms spins back to back, completions printed). Latencies of
simulated kernels and shares of simulated device time are behaviour: the
simulated device runs one kernel at a time, exactly as long as asked, and
kernels of several processes interleave on it as on a GPU without MPS.
"""

from __future__ import annotations

import time

import pytest

from fracgpu.exercise.latency import SLACK_MS, kernels_completed_between, latency_bound, percentile, priority_probe
from tests.shim.test_compute import completions, share_in, start_jobs, windows

pytestmark = pytest.mark.slow

REQUESTS, PERIOD_MS, REQUEST_MS, TRAIN_MS = 150, 20, 1.0, 2.0


def job_env(shim, name, priority=None, share=None):
    env = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": name}
    if priority:
        env["FRACGPU_PRIORITY"] = priority
    if share:
        env["FRACGPU_COMPUTE"] = share
    return env


def serve_beside(gpu, clients, kernels, serve_env, train_env=None):
    """The request loop's latencies (ms), and the part of the device's time the trainer (when
    there is one) got while the requests ran."""
    t0 = time.monotonic() * 1000 + 300
    first = t0 + 700   # the trainer is busy by then
    trainer = None
    if train_env is not None:
        seconds = (first - t0 + REQUESTS * PERIOD_MS + 500) / 1000
        trainer = gpu.popen(clients.lcuda, "busy", seconds, TRAIN_MS, kernels, f"{t0:.3f}", env=train_env)
    out = gpu.run(clients.lcuda, "requests", REQUESTS, PERIOD_MS, REQUEST_MS, kernels, f"{first:.3f}",
                  env=serve_env, timeout=120).stdout
    latencies = [float(line.split()[1]) for line in out.splitlines() if line.startswith("r ")]
    assert len(latencies) == REQUESTS, out
    if trainer is None:
        return latencies, None
    points = [(t0 + t, n) for t, n in completions(trainer)]
    window = REQUESTS * PERIOD_MS
    return latencies, kernels_completed_between(points, first, first + window) * TRAIN_MS / window


def test_a_high_service_waits_at_most_for_the_trainer_kernel_running(gpu, clients, kernels, shim):
    alone, _ = serve_beside(gpu, clients, kernels, job_env(shim, "serve", "high"))
    beside, trainer = serve_beside(gpu, clients, kernels, job_env(shim, "serve", "high"),
                                   job_env(shim, "train", "low"))
    bound = latency_bound(percentile(alone, 99), TRAIN_MS)
    # The goal (BENCHMARKS.md): p99 within the bound. A loaded 2-core machine delays the gate's own
    # threads as it delays the requests: most requests must meet the bound, and none may wait for a
    # second trainer kernel or a turn (equal shares wait for 8 ms turns).
    assert percentile(beside, 90) <= bound, (sorted(beside)[-15:], bound)
    assert percentile(beside, 50) <= percentile(alone, 50) + TRAIN_MS / 2 + SLACK_MS, (beside, alone)
    # The trainer keeps the device time the requests leave, less the hand-overs.
    left = 1 - REQUEST_MS / PERIOD_MS
    assert trainer >= 0.85 * left, trainer


def test_priority_beats_equal_shares_for_the_service(gpu, clients, kernels, shim):
    equal, _ = serve_beside(gpu, clients, kernels, job_env(shim, "serve", share="50%"),
                            job_env(shim, "train", share="50%"))
    high, _ = serve_beside(gpu, clients, kernels, job_env(shim, "serve", "high"), job_env(shim, "train", "low"))
    # Equal shares make a request wait for the trainer's turn (8 ms); high waits for one kernel (2 ms).
    assert percentile(high, 90) < percentile(equal, 90), (high, equal)
    assert percentile(high, 50) < percentile(equal, 50), (high, equal)


def test_low_gets_only_what_normal_leaves_and_the_rest_when_it_is_idle(gpu, clients, kernels, shim):
    # "normal" is busy for 2 s from the start; "low" is busy for 4 s: the first two alone-ish, then all.
    start = (time.monotonic() + 0.5) * 1000
    normal = gpu.popen(clients.lcuda, "busy", 2, 1, kernels, f"{start:.3f}", env=job_env(shim, "normal", "normal"))
    low = gpu.popen(clients.lcuda, "busy", 4, 1, kernels, f"{start:.3f}", env=job_env(shim, "low", "low"))
    normal_points, low_points = completions(normal), completions(low)
    assert share_in(normal_points, 500, 1500) >= 0.85, normal_points[:20]
    assert share_in(low_points, 500, 1500) <= 0.05, low_points[:20]
    assert share_in(low_points, 2500, 3500) >= 0.85, low_points   # normal went idle: low uses the device


def test_a_high_share_holds_it_back_only_while_others_wait(gpu, clients, kernels, shim):
    jobs = start_jobs(gpu, clients, kernels, shim, {"batch": ("50%", False, 0)}, 4)
    high = gpu.popen(clients.lcuda, "busy", 4, 1, kernels, f"{(time.monotonic() + 0.5) * 1000:.3f}",
                     env=job_env(shim, "inference", "high", "30%"))
    got = {"batch": windows(completions(jobs["batch"]), 4), "inference": windows(completions(high), 4)}
    for w in range(len(got["batch"])):
        assert abs(got["inference"][w] - 0.30) <= 0.03, got   # held to its share of the device ...
        assert got["batch"][w] >= 0.55, got                  # ... so the normal job is not starved
    # Alone, the same partition uses the whole device.
    alone = gpu.popen(clients.lcuda, "busy", 2, 1, kernels, env=job_env(shim, "inference2", "high", "30%"))
    assert all(s >= 0.9 for s in windows(completions(alone), 2, first=0))


def test_a_high_partition_without_a_share_is_bounded_by_its_demand(gpu, clients, kernels, shim):
    start = (time.monotonic() + 0.5) * 1000
    normal = gpu.popen(clients.lcuda, "busy", 3, 1, kernels, f"{start:.3f}", env=job_env(shim, "normal", "normal"))
    high = gpu.popen(clients.lcuda, "busy", 3, 1, kernels, f"{start:.3f}", env=job_env(shim, "high", "high"))
    got = {"normal": windows(completions(normal), 3), "high": windows(completions(high), 3)}
    assert all(s >= 0.7 for s in got["high"]) and all(s <= 0.05 for s in got["normal"]), got


CLASSES = {"h30": ("high", "30%", False), "h20": ("high", "20%", False),
           "n10": ("normal", "10%", True), "n5a": ("normal", "5%", True), "n5b": ("normal", "5%", True),
           "l50": ("low", "50%", False), "l25a": ("low", "25%", False), "l25b": ("low", "25%", False)}


def shares_in_classes(gpu, clients, kernels, shim, seconds=5):
    """CLASSES all busy with 1 ms spins: each partition's part of the device per 1 s window (after
    the first two), and the largest error, in points of the device, of any partition's part of
    its class's device time against its weight in the class."""
    start = (time.monotonic() + 1.0) * 1000
    jobs = {}
    for name, (priority, share, cap) in CLASSES.items():
        env = job_env(shim, name, priority, share) | ({"FRACGPU_COMPUTE_CAP": "1"} if cap else {})
        jobs[name] = gpu.popen(clients.lcuda, "busy", seconds, 1, kernels, f"{start:.3f}", env=env)
    got = {name: windows(completions(job), seconds, first=2) for name, job in jobs.items()}
    error = 0.0
    for klass in ("high", "normal", "low"):
        weights = {n: float(share.rstrip("%")) for n, (c, share, _) in CLASSES.items() if c == klass}
        for w in range(len(got["h30"])):
            used = sum(got[n][w] for n in weights)
            error = max(error, *(abs(got[n][w] - used * weights[n] / sum(weights.values())) for n in weights))
    return got, error


def test_shares_within_each_class_stay_fair(gpu, clients, kernels, shim):
    """8 partitions in 3 classes: two high ones held to their shares, three normal ones capped, and
    three low ones sharing what is left by their weights (low shares count only against low's)."""
    got, error = shares_in_classes(gpu, clients, kernels, shim)
    assert error <= 0.02, got   # within its class, each partition within 2 points of its weight's part
    # Across classes: high held to its shares, normal to its caps, low got what was left.
    for w in range(len(got["h30"])):
        assert abs(got["h30"][w] + got["h20"][w] - 0.50) <= 0.04, got
        assert sum(got[n][w] for n in CLASSES if CLASSES[n][0] == "low") >= 0.10, got


def test_the_probe_measures_the_promise_on_the_gpu_at_hand(gpu):
    """``priority_probe`` (what `fracgpu check` runs): the request loop alone, then at high priority
    beside a low trainer, each under `fracgpu run`, in a ledger of its own."""
    result = priority_probe(requests=60, env=gpu.env)
    assert result.bound_ms == pytest.approx(result.p99_alone_ms + TRAIN_MS + SLACK_MS)
    assert REQUEST_MS <= result.p50_alone_ms, result
    assert REQUEST_MS <= result.p50_ms <= result.p50_alone_ms + TRAIN_MS + SLACK_MS, result
    assert 0.5 <= result.trainer_kept <= 1.05, result
    assert not gpu.ledger.exists()   # the probe's jobs are not billed to anyone
