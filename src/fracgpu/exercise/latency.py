"""Priority classes, and a probe that measures what they promise on this GPU.

A partition is ``high``, ``normal`` (the default) or ``low``. The launch gate
(``csrc/shim/cuda/gate.cpp``) serves them in that order: while a high partition
has work, normal and low launches wait at the gate, and their work already on
the device is kept one kernel deep, so a high kernel waits at most for the
kernels already running (kernels are never split: that would change the order
of their reductions, hence results). A high partition with a compute share is
held to it, over a window, while others wait; without one it is bounded only by
its own demand. Low gets what high and normal leave. Within a class, shares
keep their weighted fairness.

What that promises a latency-critical service beside a training job is
``latency_bound``: its p99 alone, plus the trainer's longest kernel, plus
``SLACK_MS`` for the hand-over. ``priority_probe`` measures it: a request loop
(one kernel and a synchronize every period) alone, then at ``high`` beside a
saturating ``low`` trainer, each under ``fracgpu run`` on the GPU this process
sees, and reports both p99s, the bound, and the device time the trainer kept.

Run as ``python -m fracgpu.exercise.latency serve|train ...`` it is one of the probe's
two jobs (``serve`` prints the latencies, ``train`` its kernels completed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from fracgpu import kernels_path, settings
from fracgpu.units import PRIORITIES, parse_priority

__all__ = ["PRIORITIES", "parse_priority", "SLACK_MS", "percentile", "latency_bound", "ProbeResult",
           "priority_probe", "serve", "train"]

# What the hand-over of the device to a high partition may add to a request, beyond the
# kernel already running: the gate noticing that kernel's end, and its own launch.
SLACK_MS = 0.5


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by the nearest rank."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))   # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def latency_bound(p99_alone_ms: float, longest_kernel_ms: float, slack_ms: float = SLACK_MS) -> float:
    """The most a high partition's p99 may be beside others: its p99 alone, plus the longest kernel
    of theirs that may be running when a request arrives, plus the hand-over."""
    return p99_alone_ms + longest_kernel_ms + slack_ms


# ---------------------------------------------------------------------------
# The two jobs, on the CUDA driver this process loads (the shim's, under fracgpu run)
# ---------------------------------------------------------------------------
def serve(drv, count: int, period_ms: float, kernel_ms: float,
          start_ms: float | None = None) -> tuple[float, list[float]]:
    """A latency-critical service: ``count`` requests, one every ``period_ms``, each one
    ``kernel_ms`` spin kernel followed by a synchronize. Returns when the first request was due
    (CLOCK_MONOTONIC ms) and each request's latency (ms, from its launch to the synchronize's
    return). ``start_ms``: the CLOCK_MONOTONIC time (ms) to begin at; the first request comes one
    period after the warm-up or then, whichever is later. ``drv``: a ``fracgpu.exercise.driver.Driver``
    with the kernels loaded."""
    drv.spin(1e-6)   # warm-up: context and module ready before the first request
    drv.synchronize()
    first = max(time.monotonic() * 1000 + period_ms, start_ms or 0.0)
    latencies = []
    for i in range(count):
        due = first + i * period_ms
        while (now := time.monotonic() * 1000) < due:
            time.sleep(min(0.001, (due - now) / 1000))
        begin = time.perf_counter()
        drv.spin(kernel_ms / 1000)
        drv.synchronize()
        latencies.append((time.perf_counter() - begin) * 1000)
    return first, latencies


def train(drv, seconds: float, kernel_ms: float) -> list[tuple[float, int]]:
    """A saturating trainer: ``kernel_ms`` spin kernels back to back (10 launched, then a
    synchronize) for ``seconds``. Returns (CLOCK_MONOTONIC ms, kernels completed) after each 10.
    ``drv``: a ``fracgpu.exercise.driver.Driver`` with the kernels loaded."""
    end = time.monotonic() + seconds
    done, points = 0, []
    while time.monotonic() < end:
        for _ in range(10):
            drv.spin(kernel_ms / 1000)
        drv.synchronize()
        done += 10
        points.append((time.monotonic() * 1000, done))
    return points


def kernels_completed_between(points: list[tuple[float, int]], begin_ms: float, end_ms: float) -> int:
    """Of a trainer's (time, completed) points, the kernels completed between two times."""
    def by(t: float) -> int:
        return max([n for when, n in points if when <= t], default=0)
    return by(end_ms) - by(begin_ms)


# ---------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What ``priority_probe`` measured (milliseconds; shares as fractions)."""

    p99_alone_ms: float        # the request loop alone on the GPU
    p99_ms: float              # the same at high priority beside a saturating low trainer
    p50_alone_ms: float
    p50_ms: float
    bound_ms: float            # latency_bound(p99_alone_ms, the trainer's kernel)
    trainer_share: float       # device time the trainer got while the requests ran
    left_by_requests: float    # device time the requests left: 1 - their kernel / their period
    p95_alone_ms: float = 0.0
    p95_ms: float = 0.0

    @property
    def within_bound(self) -> bool:
        return self.p99_ms <= self.bound_ms

    @property
    def trainer_kept(self) -> float:
        """The part of what the requests left that the trainer got (the goal: at least 0.9)."""
        return self.trainer_share / self.left_by_requests


def _fracgpu_run(priority: str, job: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fracgpu", "run", "--priority", priority, "--name", f"priority-probe-{job[0]}",
            "--", sys.executable, "-m", "fracgpu.exercise.latency", *job]
    return subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _output(process: subprocess.Popen, what: str, timeout: float):
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the priority probe's {what} job failed (exit {process.returncode}): {err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def priority_probe(*, requests: int = 150, period_ms: float = 20.0, request_ms: float = 1.0,
                   train_ms: float = 2.0, env: Mapping[str, str] | None = None,
                   module: str | None = None) -> ProbeResult:
    """Measure the high class's latency promise on the GPU that ``env`` (default: this process's)
    selects: ``requests`` requests (one ``request_ms`` kernel and a synchronize every
    ``period_ms``) alone, then at high priority beside a trainer of back-to-back ``train_ms``
    kernels at low priority, each job under ``fracgpu run`` (recorded in a ledger of the probe's
    own, not the user's). Takes about 2 x requests x period_ms. RuntimeError when a job fails."""
    base = dict(os.environ if env is None else env)
    module = module or str(kernels_path())
    with tempfile.TemporaryDirectory(prefix="fracgpu-priority-probe-") as folder:
        base[settings.LEDGER] = os.path.join(folder, "ledger.sqlite")
        timeout = 120 + 4 * requests * period_ms / 1000
        serve_job = ["serve", str(requests), str(period_ms), str(request_ms), module]
        alone = _output(_fracgpu_run("high", serve_job, base), "request", timeout)
        seconds = 3.0 + requests * period_ms / 1000   # busy from before the first request to after the last
        trainer = _fracgpu_run("low", ["train", f"{seconds:.3f}", str(train_ms), module], base)
        start_ms = time.monotonic() * 1000 + 1500   # the trainer is busy by then
        beside = _output(_fracgpu_run("high", [*serve_job, f"{start_ms:.3f}"], base), "request", timeout)
        points = [tuple(p) for p in _output(trainer, "training", timeout)]
    window_ms = beside["end_ms"] - beside["begin_ms"]
    done = kernels_completed_between(points, beside["begin_ms"], beside["end_ms"])
    return ProbeResult(p99_alone_ms=percentile(alone["latencies"], 99), p99_ms=percentile(beside["latencies"], 99),
                       p50_alone_ms=percentile(alone["latencies"], 50), p50_ms=percentile(beside["latencies"], 50),
                       bound_ms=latency_bound(percentile(alone["latencies"], 99), train_ms),
                       trainer_share=done * train_ms / window_ms, left_by_requests=1 - request_ms / period_ms,
                       p95_alone_ms=percentile(alone["latencies"], 95), p95_ms=percentile(beside["latencies"], 95))


def _main(argv: list[str]) -> None:
    from fracgpu.exercise.driver import Driver

    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what == "serve" and len(rest) >= 4:
        drv = Driver()
        drv.load_kernels(rest[3])
        first, latencies = serve(drv, int(rest[0]), float(rest[1]), float(rest[2]),
                                 float(rest[4]) if len(rest) > 4 else None)
        print(json.dumps({"latencies": latencies, "begin_ms": first, "end_ms": time.monotonic() * 1000}))
    elif what == "train" and len(rest) >= 3:
        drv = Driver()
        drv.load_kernels(rest[2])
        print(json.dumps(train(drv, float(rest[0]), float(rest[1]))))
    else:
        raise SystemExit("usage: python -m fracgpu.exercise.latency serve COUNT PERIOD_MS KERNEL_MS MODULE [START_MS] | "
                         "train SECONDS KERNEL_MS MODULE")


if __name__ == "__main__":
    _main(sys.argv[1:])
