"""Compute shares on the simulated GPU: 1 ms spin kernels back to back, and
each partition's device time per 1 s window, as its jobs saw it.

The jobs are the C client's `busy` command: it launches spins of 1 ms, 10 at
a time, and prints when each 10 have completed; kernels completed in a window
times 1 ms is the device time the partition got in it. (Shares of device time
and simulated kernel durations are behaviour: the simulated device runs one
kernel at a time, exactly as long as asked.)
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.support.simgpu import BINDINGS_PRELUDE, parse_facts

pytestmark = pytest.mark.slow

KERNEL_MS = 1.0


def start_jobs(gpu, clients, kernels, shim, specs, seconds, start_in=0.5):
    """specs: {name: (share, cap, delay_s)}; every job begins at start + delay."""
    start = (time.monotonic() + start_in) * 1000
    jobs = {}
    for name, (share, cap, delay) in specs.items():
        env = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": name, "FRACGPU_COMPUTE": share,
               "FRACGPU_COMPUTE_CAP": "1" if cap else "0"}
        jobs[name] = gpu.popen(clients.lcuda, "busy", seconds, KERNEL_MS, kernels, f"{start + delay * 1000:.3f}",
                               env=env)
    return jobs


def completions(job):
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    return [(float(t), int(n)) for _, t, n in (line.split() for line in out.splitlines())]


def share_in(points, begin_ms, end_ms):
    """Fraction of [begin, end) the partition's kernels ran, from its completion log."""
    def done_by(t):
        return max([n for when, n in points if when <= t], default=0)
    return (done_by(end_ms) - done_by(begin_ms)) * KERNEL_MS / (end_ms - begin_ms)


def windows(points, seconds, first=1):
    return [share_in(points, w * 1000, (w + 1) * 1000) for w in range(first, int(seconds))]


def shares_of_device_time(got):
    """Per window: each partition's part of the device time used in it, and the
    device's utilisation (the gate's own hand-over gaps are the difference)."""
    names = list(got)
    per_window = []
    for w in range(len(got[names[0]])):
        used = sum(got[n][w] for n in names)
        per_window.append(({n: got[n][w] / used for n in names}, used))
    return per_window


def test_two_partitions_get_25_and_75_percent(gpu, clients, kernels, shim):
    jobs = start_jobs(gpu, clients, kernels, shim, {"small": ("25%", False, 0), "large": ("75%", False, 0)}, 5)
    got = {name: windows(completions(job), 5) for name, job in jobs.items()}
    for shares, utilisation in shares_of_device_time(got):
        assert abs(shares["small"] - 0.25) <= 0.03 and abs(shares["large"] - 0.75) <= 0.03, got
        assert utilisation >= 0.85, got   # hand-overs cost a few percent (see BENCHMARKS.md)


def test_an_overcommitted_share_never_dilutes_a_promised_one(gpu, clients, kernels, shim):
    gpu.fracgpu("partition", "create", "promised", "--compute", "75%")
    gpu.fracgpu("partition", "create", "over", "--compute", "75%", "--overcommit")   # best effort: 25% is left
    start = (time.monotonic() + 0.5) * 1000
    jobs = {name: gpu.popen(clients.lcuda, "busy", 4, KERNEL_MS, kernels, f"{start:.3f}",
                            env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": name}) for name in ("promised", "over")}
    got = {name: windows(completions(job), 4) for name, job in jobs.items()}
    for shares, _ in shares_of_device_time(got):
        assert abs(shares["promised"] - 0.75) <= 0.03, got


def test_four_partitions_get_their_shares(gpu, clients, kernels, shim):
    specs = {"p10": ("10%", False, 0), "p20": ("20%", False, 0), "p30": ("30%", False, 0),
             "p40": ("40%", False, 0)}
    jobs = start_jobs(gpu, clients, kernels, shim, specs, 4)
    got = {name: windows(completions(job), 4) for name, job in jobs.items()}
    for shares, utilisation in shares_of_device_time(got):
        for name, (share, _, _) in specs.items():
            assert abs(shares[name] - float(share.rstrip("%")) / 100) <= 0.03, (name, got)
        assert utilisation >= 0.85, got   # hand-overs cost a few percent (see BENCHMARKS.md)


def test_alone_a_partition_uses_the_whole_device_unless_capped(gpu, clients, kernels, shim):
    (job,) = start_jobs(gpu, clients, kernels, shim, {"alone": ("25%", False, 0)}, 2).values()
    assert all(s >= 0.90 for s in windows(completions(job), 2, first=0))
    (job,) = start_jobs(gpu, clients, kernels, shim, {"capped": ("25%", True, 0)}, 3).values()
    shares = windows(completions(job), 3)
    assert all(0.20 <= s <= 0.28 for s in shares), shares


def test_an_idle_partition_gets_its_share_back_within_50ms(gpu, clients, kernels, shim):
    # "large" is busy throughout; "small" runs 1 s, is idle for 2 s, then comes back.
    jobs = start_jobs(gpu, clients, kernels, shim, {"large": ("75%", False, 0), "small": ("25%", False, 0)}, 1)
    returning = start_jobs(gpu, clients, kernels, shim, {"small": ("25%", False, 3.0)}, 1.5, start_in=0.0)["small"]
    large = start_jobs(gpu, clients, kernels, shim, {"large": ("75%", False, 0)}, 4.5, start_in=0.0)["large"]
    for job in jobs.values():
        completions(job)
    back = completions(returning)
    busy = completions(large)
    # From 50 ms after it came back (3 s after the others' start), its part of the device time.
    small, big = share_in(back, 50, 1050), share_in(busy, 3050, 4050)
    assert abs(small / (small + big) - 0.25) <= 0.03, (small, big, back[:10])
    assert small + big >= 0.85


def test_device_time_is_accounted_per_partition(gpu, clients, kernels, shim):
    # A member that stays keeps each private partition (and its counters) alive after the busy job ends.
    keepers = [gpu.popen(clients.lcuda, "hold", 1, 30, env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": name,
                                                              "FRACGPU_COMPUTE": "50%"}) for name in ("a", "b")]
    try:
        for keeper in keepers:
            assert keeper.stdout.readline().startswith("holding")
        jobs = start_jobs(gpu, clients, kernels, shim, {"a": ("50%", False, 0), "b": ("50%", False, 0)}, 2)
        ran = {name: completions(job)[-1][1] * KERNEL_MS * 1e6 for name, job in jobs.items()}
        out = gpu.python("import fracgpu, json, dataclasses\n"
                         f"print(json.dumps([dataclasses.asdict(u) for u in fracgpu.usage({str(gpu.state_dir)!r})]))")
        (usage,) = json.loads(out.stdout)
        device_ns = {p["name"]: p["device_ns"] for p in usage["partitions"]}
        for name in ("a", "b"):
            assert abs(device_ns[name] - ran[name]) <= 0.05 * ran[name], (device_ns, ran)
    finally:
        for keeper in keepers:
            keeper.kill()
            keeper.wait(timeout=10)


def fracgpu_job(gpu, clients, kernels, options, seconds, start):
    return gpu.popen(sys.executable, "-m", "fracgpu", "run", *options, "--", clients.lcuda, "busy", seconds,
                     KERNEL_MS, kernels, f"{start:.3f}")


def test_shares_through_fracgpu_run_and_named_partitions(gpu, clients, kernels):
    gpu.fracgpu("partition", "create", "batch", "--compute", "75%", "--memory", "512MiB")
    listed = gpu.fracgpu("partition", "list", "--json").stdout
    (batch,) = [p for u in json.loads(listed) for p in u["partitions"] if p["name"] == "batch"]
    assert batch["compute_share"] == 0.75 and batch["compute_cap"] is False
    start = (time.monotonic() + 1.5) * 1000   # after both CLIs have started
    jobs = {"interactive": fracgpu_job(gpu, clients, kernels, ["--compute", "25%"], 3, start),
            "batch": fracgpu_job(gpu, clients, kernels, ["--partition", "batch"], 3, start)}
    got = {name: windows(completions(job), 3) for name, job in jobs.items()}
    for shares, utilisation in shares_of_device_time(got):
        assert abs(shares["interactive"] - 0.25) <= 0.03 and abs(shares["batch"] - 0.75) <= 0.03, got


def test_a_capped_named_partition_and_init(gpu, clients, kernels):
    gpu.fracgpu("partition", "create", "slow", "--compute", "20%", "--cap")
    start = (time.monotonic() + 1.5) * 1000
    (shares,) = [windows(completions(fracgpu_job(gpu, clients, kernels, ["--partition", "slow"], 3, start)), 3)]
    assert all(0.15 <= s <= 0.23 for s in shares), shares
    # In-process: init(compute=..., cap=True) makes a private capped partition.
    out = gpu.python("import fracgpu\nprint(fracgpu.init(compute=0.3, cap=True))\n"
                     "import json, dataclasses\n"
                     "from cuda.bindings import driver as cu\ncu.cuInit(0)\n"
                     "print(json.dumps([dataclasses.asdict(u) for u in fracgpu.usage()]))").stdout.splitlines()
    name = out[0]
    (mine,) = [p for u in json.loads(out[1]) for p in u["partitions"] if p["name"] == name]
    assert mine["compute_share"] == 0.3 and mine["compute_cap"] is True and mine["memory_limit"] is None


@pytest.mark.parametrize("args, message", [
    (["--cap", "--memory", "1GiB"], "--cap needs --compute"),
    (["--compute", "0"], "share"),
    (["--compute", "150%"], "share"),
    (["--compute", "25%", "--partition", "x"], "not both"),
])
def test_bad_compute_options_are_usage_errors(gpu, args, message):
    result = gpu.fracgpu("run", *args, "--", "true", check=False)
    assert result.returncode == 125, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_burst_of_launches_never_keeps_a_waking_partition_waiting(gpu, clients, kernels, shim):
    """One partition enqueues 300 spins of 1 ms at once while another exists but is idle; when
    the idle one launches, it gets the device within milliseconds, not after the whole burst."""
    def env(name):
        return {"LD_PRELOAD": shim, "FRACGPU_PARTITION": name, "FRACGPU_COMPUTE": "50%"}

    sleeper = gpu.popen(clients.lcuda, "hold", 1, 60, env=env("sleeper"))
    try:
        assert sleeper.stdout.readline().startswith("holding")
        start = (time.monotonic() + 0.3) * 1000
        burst = gpu.popen(clients.lcuda, "spins", 300, KERNEL_MS, kernels, f"{start:.3f}", env=env("burst"))
        time.sleep(0.5)   # the burst is under way
        woke = parse_facts(gpu.run(clients.lcuda, "spin", 1, kernels, env=env("sleeper")).stdout)
        out, err = burst.communicate(timeout=60)
        assert burst.returncode == 0, err
        assert float(woke["wall_ms"]) <= 50, woke
        assert float(parse_facts(out)["wall_ms"]) >= 300
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


# Jobs that launch fracgpu_spin (module: argv[1]) and print what their partition recorded.
SPIN_JOB = BINDINGS_PRELUDE + """
import json, os, time
import fracgpu
spin = ck(cu.cuModuleGetFunction(ck(cu.cuModuleLoad(sys.argv[1].encode())), b"fracgpu_spin"))
"""
PRINT_PARTITION = """
time.sleep(0.05)                                       # the gate's reader has taken the last completion
me = os.environ["FRACGPU_PARTITION"]
(part,) = [p for u in fracgpu.usage() for p in u.partitions if p.name == me]
print(json.dumps({"device_ns": part.device_ns, "launches": part.launches}))
"""

GRAPH_JOB = SPIN_JOB + """
graph = ck(cu.cuGraphCreate(0))
ns = np.array([2_000_000], np.uint64)                  # each node: 2 ms
args = np.array([ns.ctypes.data], np.uint64)
params = cu.CUDA_KERNEL_NODE_PARAMS()
params.func = spin
params.gridDimX = params.gridDimY = params.gridDimZ = 1
params.blockDimX = params.blockDimY = params.blockDimZ = 1
params.kernelParams = args.ctypes.data
node = None
for _ in range(5):                                     # a chain of 5 kernels: 10 ms per launch
    node = ck(cu.cuGraphAddKernelNode(graph, [node] if node else [], 1 if node else 0, params))
exe = ck(cu.cuGraphInstantiate(graph, 0))
stream = ck(cu.cuStreamCreate(0))
for _ in range(20):
    ck(cu.cuGraphLaunch(exe, stream))
ck(cu.cuStreamSynchronize(stream))
""" + PRINT_PARTITION


@pytest.mark.parametrize("options", [["--compute", "100%", "--cap"], ["--compute", "50%"], ["--memory", "1GiB"]],
                         ids=["gated", "alone-with-share", "alone-memory-only"])
def test_a_cuda_graph_is_charged_for_all_it_runs(gpu, kernels, options):
    # A 100% cap keeps the job in the gate, where every launch is measured; alone
    # on the GPU, long launches are measured one by one outside the gate.
    out = gpu.fracgpu("run", *options, "--", sys.executable, "-c", GRAPH_JOB, kernels).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["launches"] == 20
    assert abs(got["device_ns"] - 200_000_000) <= 0.05 * 200_000_000, got


# argv[2]: the kernels' length in ns, argv[3]: how many, launched back to back.
TINY_JOB = SPIN_JOB + """
ns = np.array([int(sys.argv[2])], np.uint64)
args = np.array([ns.ctypes.data], np.uint64)
stream = ck(cu.cuStreamCreate(0))
for _ in range(int(sys.argv[3])):
    ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args.ctypes.data, 0))
ck(cu.cuStreamSynchronize(stream))
""" + PRINT_PARTITION


def test_short_launches_of_a_partition_alone_are_sampled_into_its_device_time(gpu, kernels):
    """Launches of 20 us, alone on the GPU: most take no event, a sample is measured for the
    launches around it; the total comes within a few percent of what ran. (A measured launch
    on an idle stream also counts the host's moment between its start event and the launch,
    as on a real GPU: that is what the tolerance allows for, and why these are not shorter.)"""
    out = gpu.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", TINY_JOB, kernels, "20000",
                      "2000").stdout
    got = json.loads(out.splitlines()[-1])
    ran = 2000 * 20000
    # Launches after the last sample are not counted yet (they are when the process ends): a sample
    # comes about every 2 ms of kernels, 100 of these, drawn from 1 .. 2 x 100 - 1.
    assert 2000 - 200 <= got["launches"] <= 2000
    assert abs(got["device_ns"] - ran) <= 0.10 * ran, got
    # Once it has ended, every launch is in the books.
    (job,) = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
    assert job["launches"] == 2000, job
    assert abs(job["gpu_seconds"] * 1e9 - ran) <= 0.10 * ran, job


def test_partitions_that_leave_the_device_idle_do_not_wait_for_each_others_turns(gpu, clients, kernels, shim):
    """Two services with shares: one a 0.5 ms kernel and a synchronize every 5 ms, the other a 0.1 ms
    one every 1 ms. Together they keep the device busy a fifth of the time, so neither takes turns:
    a request waits at most for the other's kernel already running, as it would without fracgpu.
    With turns, the first would wait for the second's turn to end (it is never idle for long)."""
    from fracgpu.exercise.latency import SLACK_MS, percentile

    services = {"slow": (5.0, 0.5), "quick": (1.0, 0.1)}   # name: (period ms, kernel ms)
    seconds = 1.5

    def serve(name, start_ms):
        period, kernel = services[name]
        return gpu.popen(clients.lcuda, "requests", int(seconds * 1000 / period), period, kernel, kernels,
                         f"{start_ms:.3f}", env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": name,
                                                  "FRACGPU_COMPUTE": "50%"})

    def p90(job):
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        return percentile([float(line.split()[1]) for line in out.splitlines() if line.startswith("r ")], 90)

    alone = {name: p90(serve(name, time.monotonic() * 1000 + 300)) for name in services}
    start = time.monotonic() * 1000 + 300
    jobs = {name: serve(name, start) for name in services}
    together = {name: p90(job) for name, job in jobs.items()}
    for name, other in (("slow", "quick"), ("quick", "slow")):
        assert together[name] <= alone[name] + services[other][1] + SLACK_MS, (alone, together)


# Launches COUNT zero-length spins under the shim, then prints the driver calls it says it added.
SHIM_CALLS_JOB = SPIN_JOB + """
import ctypes
ns = np.array([0], np.uint64)
args = np.array([ns.ctypes.data], np.uint64)
stream = ck(cu.cuStreamCreate(0))
for _ in range(int(sys.argv[2])):
    ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args.ctypes.data, 0))
ck(cu.cuStreamSynchronize(stream))
time.sleep(0.05)                                       # the gate's reader has taken the last sample
counts_fn = ctypes.CDLL(None).fracgpu_shim_call_counts   # the preloaded shim's export
counts, names = (ctypes.c_ulonglong * 16)(), (ctypes.c_char_p * 16)()
n = counts_fn(counts, names, 16)
print(json.dumps({names[i].decode(): counts[i] for i in range(n)}))
"""


def test_the_shim_counts_the_driver_calls_it_adds_to_launches(gpu, kernels, shim):
    """What a real driver cannot say: the events, queries and synchronisations the shim adds (for
    the GPU benchmark's calls per launch). Alone, 5 000 tiny launches take a few samples, not an
    event each."""
    env = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "counted", "FRACGPU_COMPUTE": "50%"}
    calls = json.loads(gpu.run(sys.executable, "-c", SHIM_CALLS_JOB, kernels, 5000, env=env).stdout)
    assert set(calls) == {"event_record", "event_query", "event_synchronize", "event_elapsed_time",
                          "stream_query", "ctx_synchronize"}, calls
    samples = calls["event_record"] // 2
    assert calls["event_record"] == 2 * samples and samples >= 1, calls   # a start and an end event each
    assert calls["stream_query"] == samples, calls                          # is its stream idle: once each
    assert calls["event_record"] <= 0.1 * 5000, calls                      # far from one per launch
