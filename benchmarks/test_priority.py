"""A latency-critical service beside training, side by side in one run: the
request loop (one 1 ms kernel and a synchronize every 20 ms) alone, beside a
trainer of 2 ms kernels back to back without fracgpu, with both under equal
shares (`--compute 50%`), and at `--priority high` beside a `--priority low`
trainer. Reports p50/p99 of the requests, the bound the high class promises
(p99 alone + the trainer's kernel + 0.5 ms), and the part of the device time
the requests leave that the trainer kept."""

from __future__ import annotations

from fracgpu.exercise.latency import latency_bound, percentile
from tests.shim.test_priority import PERIOD_MS, REQUEST_MS, TRAIN_MS, job_env, serve_beside, shares_in_classes


def test_request_latency_beside_training(benchmark, bench_gpu, clients, kernels, shim):
    setups = {
        "alone": (job_env(shim, "serve", "high"), None),
        "no fracgpu": ({}, {}),
        "equal shares": (job_env(shim, "serve", share="50%"), job_env(shim, "train", share="50%")),
        "priority": (job_env(shim, "serve", "high"), job_env(shim, "train", "low")),
    }
    got = {}

    def run():
        for name, (serve_env, train_env) in setups.items():
            got[name] = serve_beside(bench_gpu, clients, kernels, serve_env, train_env)

    benchmark.pedantic(run, rounds=1, iterations=1)
    bound = latency_bound(percentile(got["alone"][0], 99), TRAIN_MS)
    left = 1 - REQUEST_MS / PERIOD_MS
    print(f"\nbound for priority: p99 <= {bound:.2f} ms")
    for name, (latencies, trainer) in got.items():
        p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
        within = sum(x <= bound for x in latencies) / len(latencies)
        key = name.replace(" ", "_")
        benchmark.extra_info.update({f"{key}_p50_ms": p50, f"{key}_p90_ms": p90, f"{key}_p99_ms": p99,
                                     f"{key}_within_bound": within})
        kept = f", trainer kept {100 * trainer / left:.1f}% of what the requests leave" if trainer is not None else ""
        if trainer is not None:
            benchmark.extra_info[f"{key}_trainer_kept"] = trainer / left
        print(f"{name:>12}: p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms, {100 * within:.0f}% within the "
              f"bound{kept}")
    benchmark.extra_info["bound_ms"] = bound


def test_fairness_within_classes(benchmark, make_gpu, clients, kernels, shim):
    """8 partitions in 3 classes (tests/shim/test_priority.py's CLASSES): the largest error, in points of
    the device, of any partition's part of its class's device time in any 1 s window after the second."""
    gpu = make_gpu(memory=1 << 30)
    got, error = benchmark.pedantic(shares_in_classes, args=(gpu, clients, kernels, shim), rounds=1, iterations=1)
    benchmark.extra_info["max_error_points"] = 100 * error
    per_class = {c: sum(sum(got[n]) / len(got[n]) for n in got if n[0] == c[0]) for c in ("high", "normal", "low")}
    benchmark.extra_info.update({f"{c}_share": v for c, v in per_class.items()})
    print(f"\nclasses x8: max error within a class {100 * error:.2f} points; device time by class: "
          + ", ".join(f"{c} {100 * v:.1f}%" for c, v in per_class.items()))
