"""Fairness, overhead and priority latency of fracgpu on a real GPU, in one command:

    python benchmarks/gpu/gpu_bench.py [--seconds 5] [--json out.json] [--only latency]

It builds the C clients against the CUDA headers (as the tests do) and the
real driver, then measures, side by side in this one run:

- launch cost: cuLaunchKernel of the real fracgpu_spin(0) bare, under the shim
  alone with a compute share and with a memory quota (no turns: sampled), and
  through the gate (a 100% capped partition: turns); with the driver calls the
  shim adds per launch (events recorded, queries, synchronisations); alloc/free
  pairs bare and under a quota;
- busy pair: two processes launching fracgpu_spin(0) back to back, started
  together, bare and as two partitions of 50%: their combined launches per
  second, and the ratio;
- start-up: exec to the first allocation of a process, per process, with 1, 32
  and 128 processes joining one partition at once: bare, under the shim
  (LD_PRELOAD), and under ``fracgpu run --partition`` (``--startup`` sets the counts);
- fairness: 2, 4 and 8 partitions with shares 1:2:...:n, each keeping the GPU
  busy with 1 ms fracgpu_spin kernels back to back for --seconds; the largest
  error of any partition in any 1 s window after the first, in points of
  device time, and the GPU's utilisation;
- latency beside training: a request loop (one 1 ms fracgpu_spin and a
  synchronize every 20 ms) alone, beside a trainer of 2 ms spins back to back
  without fracgpu, with both at `--compute 50%`, and at `--priority high`
  beside a `--priority low` trainer: p50/p99 of the requests, the high class's
  bound (p99 alone + 2 ms + 0.5 ms), and the device time the trainer kept.

Nothing here changes the GPU's settings. Needs a real NVIDIA GPU and the
package installed (`pip install .`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if not __package__:   # run as a script, not as `python -m benchmarks.gpu.gpu_bench`: the repository's packages
    sys.path.insert(0, str(ROOT))

from tests.support.simgpu import cuda_include_dir, parse_facts, start_together  # noqa: E402

import fracgpu  # noqa: E402
from fracgpu.exercise.demo import real_gpu_available  # noqa: E402
from fracgpu.exercise.latency import kernels_completed_between, latency_bound, percentile  # noqa: E402
from fracgpu.shim import shim_path  # noqa: E402


def build(out: Path, lib_dir: str | None = None) -> tuple[Path, Path]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = [cc, "-O2", "-D_GNU_SOURCE", f"-I{cuda_include_dir()}", *([f"-L{lib_dir}"] if lib_dir else [])]
    client, bench = out / "driver_client", out / "driver_bench"
    subprocess.run([*flags, str(ROOT / "tests/clients/driver_client.c"), "-o", str(client), "-l:libcuda.so.1"], check=True)
    subprocess.run([*flags, str(ROOT / "benchmarks/driver_bench.c"), "-o", str(bench), "-l:libcuda.so.1"], check=True)
    return client, bench


def run(argv, env, timeout=600) -> str:
    result = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def overhead(bench: Path, base_env: dict, module: str) -> dict:
    shim = str(shim_path())
    modes = {
        "bare": {},
        "shim_alone": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "b1", "FRACGPU_COMPUTE": "50%"},
        "shim_gate": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "b2", "FRACGPU_COMPUTE": "100%",
                      "FRACGPU_COMPUTE_CAP": "1"},
        "quota": {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "b3", "FRACGPU_MEMORY": "50%"},
    }
    out: dict = {}
    for op, count, which in (("launch", 200_000, ("bare", "shim_alone", "quota", "shim_gate")),
                             ("alloc-free", 20_000, ("bare", "quota")),
                             ("passthrough", 500_000, ("bare", "quota"))):
        samples = {m: [] for m in which}
        calls = {m: [] for m in which}
        for _ in range(3):   # interleaved rounds
            for m in which:
                facts = parse_facts(run([bench, op, count], {**base_env, **modes[m], "BENCH_MODULE": module}))
                samples[m].append(float(facts["ns_per_op"]))
                # The calls the shim added (its own counts on a real driver), per operation.
                calls[m].append({k[len("calls_"):]: int(v) / count for k, v in facts.items() if k.startswith("calls_")})
        bare = statistics.median(samples["bare"])
        out[op] = {m: {"ns": statistics.median(v), "ratio": statistics.median(v) / bare,
                       **({"calls_per_launch": calls[m][-1]} if op == "launch" else {})}
                   for m, v in samples.items()}
    return out


def pair(bench: Path, base_env: dict, module: str, launches: int = 200_000) -> dict:
    """Two processes launching fracgpu_spin(0) back to back, started together: both processes'
    launches per second (first start to last end), bare and as two partitions of 50%."""
    shim = str(shim_path())
    modes = {"bare": [{}, {}],
             "fracgpu": [{"LD_PRELOAD": shim, "FRACGPU_PARTITION": p, "FRACGPU_COMPUTE": "50%"} for p in "xy"]}

    def throughput(envs):
        start_ms = (time.monotonic() + 0.5) * 1000
        procs = [subprocess.Popen([str(bench), "launch", str(launches), f"{start_ms:.3f}"],
                                  env={**base_env, **env, "BENCH_MODULE": module}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for env in envs]
        facts = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"driver_bench launch failed ({p.returncode}):\n{err}")
            facts.append(parse_facts(out))
        span = max(float(f["end_ns"]) for f in facts) - min(float(f["begin_ns"]) for f in facts)
        return len(envs) * launches / span * 1e9

    got = {m: [] for m in modes}
    for _ in range(3):   # interleaved rounds
        for m, envs in modes.items():
            got[m].append(throughput(envs))
    bare, shared = (statistics.median(got[m]) for m in modes)
    return {"bare_launches_per_s": bare, "fracgpu_launches_per_s": shared, "ratio": shared / bare}


def startup(bench: Path, base_env: dict, counts: list[int]) -> list[dict]:
    """Milliseconds from exec to the first allocation, per process (median, largest), for each count
    of processes started at once in one partition: bare, under the shim, under fracgpu run."""
    run([sys.executable, "-m", "fracgpu", "partition", "create", "startup"], base_env)
    job = [bench, "startup", "1"]
    modes = {"bare": (job, {}),
             "shim": (job, {"LD_PRELOAD": str(shim_path()), "FRACGPU_PARTITION": "startup"}),
             "run": ([sys.executable, "-m", "fracgpu", "run", "--partition", "startup", "--", *job], {})}
    out = []
    for count in counts:
        ms = {mode: [] for mode in modes}
        for _ in range(5 if count == 1 else 1):   # interleaved rounds
            for mode, (argv, env) in modes.items():
                ms[mode] += start_together(argv, count, {**base_env, **env})
        out.append({"processes": count,
                    **{mode: {"median_ms": statistics.median(v), "max_ms": max(v)} for mode, v in ms.items()}})
    return out


def fairness(client: Path, base_env: dict, module: str, count: int, seconds: float) -> dict:
    weights = list(range(1, count + 1))
    shares = {f"p{i}": w / sum(weights) for i, w in enumerate(weights)}
    start = (time.monotonic() + 2.0) * 1000
    procs = {name: subprocess.Popen([sys.executable, "-m", "fracgpu", "run", "--compute", f"{share:.4f}", "--",
                                     str(client), "busy", str(seconds), "1", module, f"{start:.3f}"],
                                    env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, share in shares.items()}
    points = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise SystemExit(f"partition {name} failed:\n{err}")
        points[name] = [(float(t), int(n)) for _, t, n in (line.split() for line in out.splitlines())]

    def got(name, w):
        done = lambda t: max([n for when, n in points[name] if when <= t], default=0)  # noqa: E731
        return (done((w + 1) * 1000) - done(w * 1000)) / 1000   # 1 ms kernels: device seconds per second

    worst, utilisation = 0.0, 1.0
    for w in range(1, int(seconds)):
        used = {name: got(name, w) for name in shares}
        total = sum(used.values())
        utilisation = min(utilisation, total)
        worst = max(worst, *(abs(used[n] / total - shares[n]) for n in shares))
    return {"partitions": count, "max_error_points": 100 * worst, "min_utilisation": utilisation}


def latency(client: Path, base_env: dict, module: str, requests: int = 250, period_ms: float = 20,
            request_ms: float = 1, train_ms: float = 2) -> dict:
    def under(options):   # a job under `fracgpu run OPTIONS`, or bare (None)
        return [sys.executable, "-m", "fracgpu", "run", *options, "--"] if options is not None else []

    # (the request loop's options, the trainer's): None runs it bare, False: no trainer
    setups = {"alone": (["--priority", "normal"], False), "no_fracgpu": (None, None),
              "equal_shares": (["--compute", "50%"], ["--compute", "50%"]),
              "priority": (["--priority", "high"], ["--priority", "low"])}
    out: dict = {}
    for name, (serve, training) in setups.items():
        t0 = time.monotonic() * 1000 + 2000
        first = t0 + 1000
        trainer = None
        if training is not False:
            seconds = (first - t0 + requests * period_ms + 1000) / 1000
            trainer = subprocess.Popen([*under(training), str(client), "busy", str(seconds), str(train_ms), module,
                                        f"{t0:.3f}"], env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        text = run([*under(serve), client, "requests", requests, period_ms, request_ms, module, f"{first:.3f}"],
                   base_env)
        latencies = [float(line.split()[1]) for line in text.splitlines() if line.startswith("r ")]
        out[name] = {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}
        if trainer is not None:
            lines, err = trainer.communicate(timeout=600)
            if trainer.returncode != 0:
                raise SystemExit(f"the trainer failed:\n{err}")
            points = [(t0 + float(t), int(n)) for _, t, n in (line.split() for line in lines.splitlines())]
            window = requests * period_ms
            share = kernels_completed_between(points, first, first + window) * train_ms / window
            out[name]["trainer_kept"] = share / (1 - request_ms / period_ms)
    out["bound_ms"] = latency_bound(out["alone"]["p99_ms"], train_ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sim", action="store_true", help="run on the simulated GPU (to check this script)")
    parser.add_argument("--startup", default="1,32,128", metavar="COUNTS",
                        help="process counts of the start-up measurement, comma-separated [default: 1,32,128]")
    parser.add_argument("--only", choices=["overhead", "pair", "startup", "fairness", "latency"], action="append",
                        help="measure only this (repeatable) [default: all]")
    args = parser.parse_args()
    if not args.sim and not real_gpu_available():
        raise SystemExit("no NVIDIA GPU found: this benchmark needs a real GPU (the simulated one is measured by "
                         "`python -m pytest benchmarks --benchmark-enable`)")
    module = str(fracgpu.kernels_path())
    gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip().splitlines()[:1] if shutil.which("nvidia-smi") else []
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        state.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRACGPU_")}
        env["FRACGPU_STATE_DIR"] = str(state)
        lib_dir = None
        if args.sim:
            from fracgpu import sim

            env.update(sim.environment(sim.SimConfig(state_dir=str(Path(folder) / "sim"))))
            lib_dir, gpu_name = str(sim.library_dir()), ["fracgpu simulated GPU"]
        client, bench = build(Path(folder), lib_dir)
        parts = {"overhead": lambda: overhead(bench, env, module),
                 "pair": lambda: pair(bench, env, module),
                 "startup": lambda: startup(bench, env, [int(n) for n in args.startup.split(",") if n]),
                 "fairness": lambda: [fairness(client, env, module, n, args.seconds) for n in (2, 4, 8)],
                 "latency": lambda: latency(client, env, module)}
        results = {"machine": {"gpu": gpu_name[0] if gpu_name else "unknown", "host": platform.node(),
                               "cpus": os.cpu_count(), "python": platform.python_version()},
                   **{name: measure() for name, measure in parts.items() if not args.only or name in args.only}}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
