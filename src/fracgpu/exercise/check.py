"""``fracgpu check``: grade a node's guarantees on its own GPU, real or simulated, with probe jobs.

Each check runs probe jobs (``fracgpu.exercise.probes``: ctypes over ``libcuda.so.1``) under the shim, set up
as ``fracgpu run`` sets up a job (``jobs.partition_variables`` and ``jobs.job_environment``), and
grades what they measured against what fracgpu promises: every allocation path held to the quota,
the context counted in it, partitions isolated, promises never overcommitted, compute shares and
caps kept, device time accounted, and what the shim adds to a launch.

Nothing here touches the node's own partitions or ledger: the probes' partitions live in a private
state folder, their ledger is private, and both are removed at the end, with every probe still
running killed (Ctrl-C included). On a real GPU the probes do take device memory and time while
they run (a quota of a few hundred MiB, a few seconds of kernels).

A check is one function registered with ``@check(name)``: it gets the ``Node`` (the device, the
private state, how to start probes) and returns a ``Result``. Checks that measure time
(``alone=True``) run one at a time after the others; the rest run in parallel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from fracgpu import devices, jobs, partitions, settings, sim, snapshot, state
from fracgpu.units import format_size

__all__ = ["Result", "DeviceInfo", "Report", "Check", "CHECKS", "check", "run", "ProbeFailed", "GPU_CHOICES"]

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 16 * MiB              # what each probe allocation takes
USABLE = 256 * MiB            # what each probe job's quota leaves it beside its context
PRIVATE_SIM_MEMORY = 4 * GiB  # the simulated GPU of its own, when the node has none
PROBE_TIMEOUT_S = 60
SHARE_POINTS = 0.03           # a share achieved within 3 points of the one asked
DEVICE_TIME_TOLERANCE = 0.05  # the ledger's device time within 5% of what ran
CONTEXT_TOLERANCE = 0.25      # the context's charge within 25% of what it reserves
LAUNCH_RATIO_BOUND = 3.0      # what the shim may add to a launch, as a ratio to the bare driver
LAUNCH_PAIRS = 3              # bare and shimmed launch probes, alternating
EXIT_PROBES = 8               # processes that fill one partition and exit without freeing
WATCH_PERIOD_US = 200         # how often the device's own figure is polled meanwhile
GPU_CHOICES = ("auto", "sim", "real")


@dataclasses.dataclass(frozen=True)
class Result:
    """One check's grade: what was measured and what was expected, in words, and the figures."""

    name: str
    ok: bool
    measured: str
    expected: str
    detail: str = ""
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    uuid: str
    total_memory: int
    simulated: bool
    context_reserve: int    # what a process's first context reserves on it, measured on the bare driver
    context_measured_by: str = ""   # "NVML" (as the shim measures it), or "a second context" without NVML
    note: str = ""          # why it is the one checked (no GPU found: a simulated one of its own)


@dataclasses.dataclass(frozen=True)
class Report:
    device: DeviceInfo
    checks: list[Result]
    seconds: float
    probe_quota: int = 0    # the memory quota of each probe job

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"checks": [dataclasses.asdict(c) for c in self.checks], "ok": self.ok,
                "device": dataclasses.asdict(self.device), "probe_quota": self.probe_quota,
                "seconds": round(self.seconds, 3)}


class ProbeFailed(RuntimeError):
    """A probe job did not run to its end; the message has its last words."""


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Node], Result]
    alone: bool = False   # measures time: runs with nothing else on the machine, after the others


CHECKS: list[Check] = []


def check(name: str, *, alone: bool = False) -> Callable[[Callable[[Node], Result]], Callable[[Node], Result]]:
    """Registers a check: a function of the Node returning its Result. A new check is one such function."""
    def register(function: Callable[[Node], Result]) -> Callable[[Node], Result]:
        CHECKS.append(Check(name, function, alone))
        return function
    return register


# ---------------------------------------------------------------------------
# The node: the device under check, its private state, and the probe jobs
# ---------------------------------------------------------------------------
class Node:
    """What the checks share: the device, the environment of its jobs (a private state folder and
    ledger), the quota each probe job gets, and the probe processes, all killed by ``close``."""

    def __init__(self, folder: str, env: dict[str, str], device: DeviceInfo, module: str | None,
                 module_problem: str | None):
        self.folder, self.env, self.device = folder, env, device
        self.state_dir = env[settings.STATE_DIR]
        self.ledger = env[settings.LEDGER]
        self.module, self.module_problem = module, module_problem
        self.block = BLOCK
        self.quota = job_quota(device.context_reserve, device.total_memory)
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def measure_context(self) -> None:
        """What one context reserves on the device, measured on the bare driver; the probes' quota follows."""
        measured = self.probe("reserve", self.bare_env(), uuid=self.device.uuid)
        reserve = measured["reserve"]
        self.device = dataclasses.replace(self.device, context_reserve=reserve, context_measured_by=measured["how"])
        self.quota = job_quota(reserve, self.device.total_memory)

    def bare_env(self) -> dict[str, str]:
        """The environment of a job on the bare driver: no partition, no shim."""
        return devices.probe_environment(self.env)

    def job_env(self, name: str, *, memory: int | None = None, compute: str | None = None,
                cap: bool = False) -> dict[str, str]:
        """The environment of a probe job in a private partition ``name``, as ``fracgpu run`` makes it."""
        spec = jobs.JobSpec.parse(memory=memory, compute=compute, cap=cap)
        variables = jobs.partition_variables(spec, private_name=name, state_dir=self.state_dir, env=self.env)
        merged = {**self.env, **jobs.job_environment(variables, self.env)}
        return {k: v for k, v in merged.items() if v is not None}

    def start(self, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen:
        with self._lock:
            if self._closed:
                raise ProbeFailed("the check was interrupted")
            p = subprocess.Popen(argv, env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            self._children.add(p)
        return p

    def start_probe(self, probe: str, env: Mapping[str, str], **arguments: Any) -> subprocess.Popen:
        return self.start([sys.executable, "-m", "fracgpu.exercise.probes", probe,
                           json.dumps({"device": self.device.index, **arguments})], env)

    def finish(self, p: subprocess.Popen, what: str, timeout: float = PROBE_TIMEOUT_S) -> str:
        """The stdout of probe ``p`` once it ended; ProbeFailed naming ``what`` when it failed."""
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise ProbeFailed(f"{what} did not finish within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._children.discard(p)
        if p.returncode != 0:
            words = (err.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            raise ProbeFailed(f"{what} failed (exit {p.returncode}): {words}")
        return out

    def probe(self, probe: str, env: Mapping[str, str], **arguments: Any) -> dict[str, Any]:
        """Run probe ``probe`` to its end; its figures."""
        return last_json(self.finish(self.start_probe(probe, env, **arguments), f"probe '{probe}'"))

    def wait_ready(self, p: subprocess.Popen, what: str) -> list[str]:
        """The lines probe ``p`` printed up to ``ready``; ProbeFailed when it ended first."""
        lines = []
        while True:
            line = p.stdout.readline()
            if not line:
                self.finish(p, what)
                raise ProbeFailed(f"{what} ended before it was ready")
            if line.strip() == "ready":
                return lines
            lines.append(line)

    def close(self) -> None:
        """Kill every probe still running."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for p in children:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ProbeFailed(f"a probe printed no figures: {out.strip()[-200:]!r}") from None


def job_quota(context_reserve: int, total_memory: int) -> int:
    """Each probe job's quota: USABLE beside its context (rounded up to whole blocks), at most a
    quarter of the device, so that the parallel probes' promises fit beside each other."""
    context = -(-context_reserve // BLOCK) * BLOCK
    return max(BLOCK, min(USABLE + context, total_memory // 4 // BLOCK * BLOCK))


def size(n: int) -> str:
    return format_size(max(0, int(n)))


# ---------------------------------------------------------------------------
# Grading: plain functions of the figures, so that each rule is written and tested once
# ---------------------------------------------------------------------------
def fill_held(figures: Mapping[str, int], block: int) -> tuple[bool, str]:
    """A job that filled its quota: held to it (refused with CUDA_ERROR_OUT_OF_MEMORY, never holding more
    than it was told it has) and given it (within two blocks of it). (ok, why not)."""
    usable, held, refused = figures["usable"], figures["held"], figures["refused"]
    if refused == 0:
        return False, f"never refused: it held {size(held)} of {size(usable)}"
    if refused != 2:
        return False, f"refused with CUresult {refused}, not CUDA_ERROR_OUT_OF_MEMORY (2)"
    if held > usable:
        return False, f"held {size(held)}, more than the {size(usable)} it was told it has"
    if held < usable - 2 * block:
        return False, f"refused at {size(held)} of the {size(usable)} it was told it has"
    return True, ""


def grade_paths(figures: Mapping[str, Any], block: int) -> Result:
    failed = []
    for path, got in figures["paths"].items():
        ok, why = fill_held({**got, "usable": figures["usable"]}, block)
        if ok and got["used_after"] > block:
            ok, why = False, f"{size(got['used_after'])} still charged after everything was given back"
        if not ok:
            failed.append(f"{path}: {why}")
    paths = len(figures["paths"])
    return Result("alloc paths", not failed, f"{paths - len(failed)}/{paths} paths: OOM at {size(figures['usable'])}",
                  "OOM at the quota, all of it usable", "; ".join(failed), figures)


def grade_charged_while(name: str, what: str, charged: int, expected: int, block: int,
                        rest: Mapping[str, int], figures: dict) -> Result:
    """Memory ``what`` of ``expected`` bytes must stay charged (``charged``), and only the rest of the
    quota (``rest``: a fill beside it) be left."""
    problems = []
    if abs(charged - expected) > block:
        problems.append(f"{size(charged)} charged for the {size(expected)} {what}")
    ok, why = fill_held(rest, block)
    if not ok:
        problems.append(f"beside it: {why}")
    return Result(name, not problems, f"{size(charged)} of {size(expected)} charged",
                  "all of it charged", "; ".join(problems), figures)


def grade_context(charged: int, reserve: int) -> tuple[bool, str]:
    """The context's charge within CONTEXT_TOLERANCE of what a context reserves on the device."""
    allowed = max(CONTEXT_TOLERANCE * reserve, MiB)
    if abs(charged - reserve) <= allowed:
        return True, ""
    return False, f"a context reserves {size(reserve)} on this device, but the job was charged {size(charged)}"


def grade_share(achieved: float, asked: float, points: float = SHARE_POINTS) -> bool:
    return abs(achieved - asked) <= points


def grade_cap(achieved: float, cap: float, points: float = SHARE_POINTS) -> bool:
    return achieved <= cap + points


def grade_device_time(recorded_s: float, ran_s: float, tolerance: float = DEVICE_TIME_TOLERANCE) -> bool:
    return ran_s > 0 and abs(recorded_s - ran_s) <= tolerance * ran_s


def grade_launch_ratio(shim_ns: float, bare_ns: float, bound: float = LAUNCH_RATIO_BOUND) -> tuple[bool, float]:
    ratio = shim_ns / bare_ns if bare_ns > 0 else float("inf")
    return ratio <= bound, ratio


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------
@check("alloc paths")
def alloc_paths(node: Node) -> Result:
    figures = node.probe("paths", node.job_env("check-paths", memory=node.quota), block=node.block)
    return grade_paths(figures, node.block)


@check("vmm release while mapped")
def vmm_release_while_mapped(node: Node) -> Result:
    env = node.job_env("check-vmm-mapped", memory=node.quota)
    figures = node.probe("vmm-released", env, block=node.block)
    ok, why = fill_held(figures, node.block)
    if ok and figures["used"] < figures["held"]:
        ok, why = False, f"{size(figures['held'])} mapped, but only {size(figures['used'])} charged"
    if ok and figures["used_after_unmap"] > node.block:
        ok, why = False, f"{size(figures['used_after_unmap'])} still charged after unmapping"
    return Result("vmm release while mapped", ok, f"{size(figures['held'])} mapped, {size(figures['used'])} charged",
                  "charged while mapped; OOM at the quota",
                  why, figures)


@check("vmm retain+release")
def vmm_retain_release(node: Node) -> Result:
    figures = node.probe("vmm-retained", node.job_env("check-vmm-retain", memory=node.quota), block=node.block)
    charged = min(figures["used_after_retain_release"], figures["used_after_release"])
    rest = {"usable": figures["usable"] - figures["mapped"], "held": figures["rest_held"],
            "refused": figures["rest_refused"]}
    result = grade_charged_while("vmm retain+release", "mapped after a retain, its release and the creator's release",
                                 charged, figures["mapped"], node.block, rest, figures)
    return result


@check("device heap (cuCtxSetLimit)")
def device_heap(node: Node) -> Result:
    figures = node.probe("heap", node.job_env("check-heap", memory=node.quota), block=node.block)
    problems = []
    if figures["over_result"] != 2:
        problems.append(f"a heap past the quota got CUresult {figures['over_result']}, not "
                        "CUDA_ERROR_OUT_OF_MEMORY (2)")
    if figures["fit_result"] != 0:
        problems.append(f"a heap within the quota got CUresult {figures['fit_result']}")
    elif abs(figures["used"] - figures["grown"]) > node.block:
        problems.append(f"a heap {size(figures['grown'])} larger was charged {size(figures['used'])}")
    return Result("device heap (cuCtxSetLimit)", not problems,
                  f"{size(figures['used'])} for {size(figures['grown'])} more heap",
                  "charged; past the quota: OOM", "; ".join(problems), figures)


@check("pool reserve")
def pool_reserve(node: Node) -> Result:
    figures = node.probe("pool", node.job_env("check-pool", memory=node.quota), block=node.block)
    rest = {"usable": figures["usable"] - figures["pooled"], "held": figures["rest_held"],
            "refused": figures["rest_refused"]}
    result = grade_charged_while("pool reserve", "a pool keeps below its release threshold", figures["kept"],
                                 figures["pooled"], node.block, rest, figures)
    if result.ok and figures["used_after_trim"] > node.block:
        return dataclasses.replace(result, ok=False, detail=f"{size(figures['used_after_trim'])} still charged "
                                   "after cuMemPoolTrimTo")
    return result


@check("context counted")
def context_counted(node: Node) -> Result:
    figures = node.probe("context", node.job_env("check-context", memory=node.quota))
    charged = figures["total"] - figures["usable"]
    reserve = node.device.context_reserve
    ok, why = grade_context(charged, reserve)
    if ok and figures["total"] != node.quota:
        ok, why = False, f"cuMemGetInfo_v2 shows {size(figures['total'])}, not the quota {size(node.quota)}"
    return Result("context counted", ok, f"{size(charged)} charged",
                  f"{size(reserve)} ± {CONTEXT_TOLERANCE:.0%}", why,
                  {**figures, "charged": charged, "reserve": reserve})


@check("memory back when the device lets go", alone=True)
def exits_without_freeing(node: Node) -> Result:
    """Probe processes fill one partition and exit without freeing, while the device's own figure for them
    (NVML's per-process list) is polled every 200 us: they must never hold more than the quota there. The
    excess and how long it lasted is the window in which a partition's memory was given back before the
    driver's teardown let go of it."""
    launcher = node.start_probe("leave-full-together", node.job_env("check-exits", memory=node.quota),
                                block=node.block, count=EXIT_PROBES)
    node.wait_ready(launcher, "the probes filling a partition")
    watch = node.start_probe("watch", node.bare_env(), uuid=node.device.uuid, limit=node.quota, root=launcher.pid,
                             period_us=WATCH_PERIOD_US)
    node.wait_ready(watch, "the device watch")
    launcher.stdin.write("go\n")
    launcher.stdin.flush()
    filled = last_json(node.finish(launcher, "the probes filling a partition"))
    watch.stdin.write("stop\n")
    watch.stdin.flush()
    seen = last_json(node.finish(watch, "the device watch"))
    ok = seen["excess"] == 0
    why = "" if ok else (f"the device held {size(seen['excess'])} over the quota for the exiting processes, for "
                         f"{seen['excess_s'] * 1e3:.1f} ms: memory went back to the partition before the device let go")
    return Result("memory back when the device lets go", ok,
                  f"peak {size(seen['peak'])}, {size(seen['excess'])} over for {seen['excess_s'] * 1e3:.1f} ms",
                  f"at most the quota {size(node.quota)}", why, {**seen, **filled})


@check("partitions isolated")
def partitions_isolated(node: Node) -> Result:
    greedy = node.start_probe("hold", node.job_env("check-greedy", memory=node.quota), block=node.block)
    try:
        held = last_json("".join(node.wait_ready(greedy, "the greedy partition's probe")))
        other = node.probe("fill", node.job_env("check-neighbour", memory=node.quota), block=node.block)
    finally:
        if greedy.poll() is None:
            greedy.stdin.write("done\n")
            greedy.stdin.flush()
    node.finish(greedy, "the greedy partition's probe")
    ok_greedy, why_greedy = fill_held(held, node.block)
    ok, why = fill_held(other, node.block)
    problems = [f"the greedy one: {why_greedy}"] * (not ok_greedy) + [f"the other one: {why}"] * (not ok)
    return Result("partitions isolated", not problems,
                  f"{size(other['held'])} of {size(other['usable'])} beside a full one",
                  "all of its own", "; ".join(problems),
                  {"greedy": held, "other": other})


@check("no overcommit")
def no_overcommit(node: Node) -> Result:
    folder = os.path.join(node.folder, "overcommit-state")   # its promises are its own: the probes' must fit
    total, index = node.device.total_memory, node.device.index
    first = partitions.create("check-first", total * 3 // 4, device_index=index, state_dir=folder, env=node.env)
    problems = []
    refusals = 0
    try:
        partitions.create("check-second", total // 2, device_index=index, state_dir=folder, env=node.env)
        problems.append("a partition of 50% beside one of 75% was made")
    except state.DoesNotFit:
        refusals += 1
    try:
        jobs.partition_variables(jobs.JobSpec.parse(memory="50%"), private_name="check-job", state_dir=folder,
                                 env=node.env)
        problems.append("a job of 50% beside a partition of 75% was let start")
    except state.DoesNotFit:
        refusals += 1
    second = partitions.create("check-second", total // 2, overcommit=True, device_index=index, state_dir=folder,
                               env=node.env)
    if not second.best_effort:
        problems.append("the overcommitted partition is not marked best effort")
    if first.best_effort:
        problems.append("the first partition, which fits, is marked best effort")
    for name in ("check-second", "check-first"):
        partitions.remove(name, device_index=index, state_dir=folder, env=node.env)
    return Result("no overcommit", not problems,
                  f"refused {refusals}/2, overcommitted: {'best effort' if second.best_effort else 'a promise'}",
                  "refused; --overcommit: best effort", "; ".join(problems),
                  {"refusals": refusals, "best_effort": second.best_effort})


def busy_shares(node: Node, specs: dict[str, tuple[str, bool]], seconds: float = 2.0,
                window: tuple[float, float] = (0.4, 1.6)) -> dict[str, float]:
    """Busy jobs in partitions ``name: (share, cap)``, started together: the share of the device's time each
    partition achieved in ``window`` (seconds after the start), from two reads of the state."""
    if node.module is None:
        raise ProbeFailed(node.module_problem or "fracgpu's kernels are not installed")
    procs = {name: node.start_probe("busy", node.job_env(name, compute=share, cap=cap), module=node.module,
                                    kernel_ms=1.0, seconds=seconds)
             for name, (share, cap) in specs.items()}
    for name, p in procs.items():
        node.wait_ready(p, f"busy job '{name}'")
    start = time.monotonic()
    for p in procs.values():
        p.stdin.write("go\n")
        p.stdin.flush()
    time.sleep(max(0.0, start + window[0] - time.monotonic()))
    first = snapshot.read(node.state_dir)
    time.sleep(max(0.0, start + window[1] - time.monotonic()))
    view = snapshot.take(first, snapshot.read(node.state_dir))
    for name, p in procs.items():
        node.finish(p, f"busy job '{name}'")
    return {name: view.partition_shares.get((node.device.uuid, name), 0.0) for name in specs}


def share_admission(node: Node) -> list[str]:
    """Shares are promised as memory is: a share of 50% beside one of 75% is refused, and made best
    effort with overcommit. The problems found (none: it holds)."""
    folder = os.path.join(node.folder, "share-state")   # its promises are its own: the probes' must fit
    where = {"device_index": node.device.index, "state_dir": folder, "env": node.env}
    problems = []
    partitions.create("check-share-promised", compute="75%", **where)
    try:
        partitions.create("check-share-over", compute="50%", **where)
        problems.append("a share of 50% beside one of 75% was promised")
    except state.DoesNotFit:
        pass
    over = partitions.create("check-share-over", compute="50%", overcommit=True, **where)
    if not over.compute_best_effort:
        problems.append("the overcommitted share is not marked best effort")
    for name in ("check-share-over", "check-share-promised"):
        partitions.remove(name, **where)
    return problems


@check("compute shares", alone=True)
def compute_shares(node: Node) -> Result:
    admission = share_admission(node)
    got = busy_shares(node, {"check-share-25": ("25%", False), "check-share-75": ("75%", False)})
    small, large = got["check-share-25"], got["check-share-75"]
    used = small + large
    share = small / used if used else 0.0
    ok = used > 0 and grade_share(share, 0.25) and not admission
    problems = ([] if used > 0 and grade_share(share, 0.25) else ["the device's time was not split by the shares"])
    admitted = "50% beside 75% refused" if not admission else "a share promised twice"
    return Result("compute shares", ok, f"{share:.1%} / {1 - share:.1%}, {admitted}",
                  f"25% / 75% ± {SHARE_POINTS * 100:.0f} points; no share promised twice",
                  "; ".join(problems + admission), {"achieved": got, "utilisation": used})


@check("compute cap", alone=True)
def compute_cap(node: Node) -> Result:
    achieved = busy_shares(node, {"check-cap": ("25%", True)}, seconds=1.6, window=(0.3, 1.3))["check-cap"]
    ok = grade_cap(achieved, 0.25)
    return Result("compute cap", ok, f"{achieved:.1%} alone",
                  f"≤ 25% (+{SHARE_POINTS * 100:.0f} points)", "" if ok else "the cap was passed",
                  {"achieved": achieved})


@check("ledger device time", alone=True)
def ledger_device_time(node: Node) -> Result:
    from fracgpu.ledger import Ledger

    if node.module is None:
        raise ProbeFailed(node.module_problem or "fracgpu's kernels are not installed")
    count, ns = 20, 10_000_000
    p = node.start([sys.executable, "-m", "fracgpu", "run", "--name", "check-ledger", "--ledger", node.ledger,
                    "--memory", str(node.quota), "--", sys.executable, "-m", "fracgpu.exercise.probes", "spin",
                    json.dumps({"device": node.device.index, "module": node.module, "count": count, "ns": ns})],
                   node.bare_env())
    node.finish(p, "fracgpu run of the spin probe")
    with Ledger(node.ledger) as ledger:
        records = [j for j in ledger.jobs() if j.job == "check-ledger"]
    ran = count * ns / 1e9
    if not records:
        return Result("ledger device time", False, "no record", f"{ran * 1000:.0f} ms ± 5%",
                      "the job is not in the ledger")
    recorded = records[-1].gpu_seconds
    ok = grade_device_time(recorded, ran)
    return Result("ledger device time", ok, f"{recorded * 1000:.1f} ms recorded",
                  f"{ran * 1000:.0f} ms ± {DEVICE_TIME_TOLERANCE:.0%}",
                  "" if ok else "the ledger's device time is off", {"recorded_s": recorded, "ran_s": ran})


@check("launch overhead", alone=True)
def launch_overhead(node: Node) -> Result:
    if node.module is None:
        raise ProbeFailed(node.module_problem or "fracgpu's kernels are not installed")
    arguments = {"module": node.module, "launches": 100, "batches": 50}
    shim_env, bare_env = node.job_env("check-launch", compute="50%"), node.bare_env()
    # Alternating processes, the fastest batch of each kind: a machine busy with other work slows
    # one process for a while, rarely all of its batches. (Each figure includes Python's own cost
    # of a ctypes call, the same with and without the shim: the ratio understates the shim's part.)
    bare, hooked = float("inf"), float("inf")
    for _ in range(LAUNCH_PAIRS):
        bare = min(bare, node.probe("launch", bare_env, **arguments)["ns_per_launch"])
        hooked = min(hooked, node.probe("launch", shim_env, **arguments)["ns_per_launch"])
    ok, ratio = grade_launch_ratio(hooked, bare)
    return Result("launch overhead", ok, f"{ratio:.2f}x ({hooked:.0f} / {bare:.0f} ns)",
                  f"≤ {LAUNCH_RATIO_BOUND:.1f}x",
                  "" if ok else "the shim adds too much to each launch",
                  {"ratio": ratio, "shim_ns": hooked, "bare_ns": bare})


@check("priority", alone=True)
def priority_latency(node: Node) -> Result:
    """A request loop at high priority beside a saturating low trainer (fracgpu.exercise.latency): its tail
    within its tail alone + the trainer's kernel + the hand-over, and the trainer not starved (at
    least 80% of what the requests leave; the benchmark's goal is 90%). The tail is the p99 on a
    real GPU; on a simulated one, whose kernels are host threads, the p95 (a small host's
    scheduling stalls reach 1-4% of requests)."""
    from fracgpu.exercise import latency

    if node.module is None:
        raise ProbeFailed(node.module_problem or "fracgpu's kernels are not installed")
    try:
        r = latency.priority_probe(requests=100, env=node.env, module=node.module)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise ProbeFailed(str(e)) from None
    tail = "p95" if node.device.simulated else "p99"
    alone, beside = (r.p95_alone_ms, r.p95_ms) if node.device.simulated else (r.p99_alone_ms, r.p99_ms)
    bound = latency.latency_bound(alone, 2.0)
    ok = beside <= bound and r.trainer_kept >= 0.8
    detail = "" if ok else ("high-priority requests waited past the bound" if beside > bound
                            else "the low trainer kept less than 80% of what the requests left: starved")
    return Result("priority", ok, f"{tail} {beside:.2f} ms (alone {alone:.2f}), trainer kept {r.trainer_kept:.0%}",
                  f"{tail} ≤ {bound:.2f} ms; trainer ≥ 80%", detail,
                  {"p50_ms": r.p50_ms, "p95_ms": r.p95_ms, "p99_ms": r.p99_ms, "p50_alone_ms": r.p50_alone_ms,
                   "p95_alone_ms": r.p95_alone_ms, "p99_alone_ms": r.p99_alone_ms, "bound_ms": bound,
                   "trainer_kept": r.trainer_kept})


# ---------------------------------------------------------------------------
# Choosing the GPU, and running the checks
# ---------------------------------------------------------------------------
def choose_gpu(choice: str, env: Mapping[str, str], folder: str,
               real_available: Callable[[], bool]) -> tuple[dict[str, str], bool, str]:
    """(the environment of the jobs, simulated or not, a note) for ``--gpu choice``: ``real``, the real
    GPU; ``sim``, the simulated GPU the environment selects, else one of its own in ``folder``;
    ``auto``, the simulated one the environment selects, else the real one. DeviceError when ``real``
    is asked and there is none, and when ``auto`` finds neither (saying what is wrong): the check
    answers for this node, so a node whose GPU does not work fails it."""
    if choice not in GPU_CHOICES:
        raise ValueError(f"unknown GPU choice {choice!r}: give one of {', '.join(GPU_CHOICES)}")
    env = devices.probe_environment(env)
    # The environment asks for the simulated GPU with its driver on LD_LIBRARY_PATH (`fracgpu sim env`),
    # or with a simulated GPU's folder (FRACGPU_SIM_DIR).
    if choice == "real" or (choice == "auto" and not sim.selected(env) and not env.get(settings.SIM_DIR)):
        if real_available():
            return sim.without(env), False, ""
        if choice == "real":
            raise devices.DeviceError("no working NVIDIA GPU driver was found; run `fracgpu check --gpu sim`")
        try:
            devices.probe(sim.without(env))
            why = "the CUDA driver lists a device but cannot start on it"
        except devices.DeviceError as e:
            why = str(e)
        raise devices.DeviceError(f"this node has no usable GPU: {why}. `fracgpu check` answers for this node's "
                                  "GPU; `fracgpu check --gpu sim` checks the simulated GPU instead")
    if sim.selected(env):
        return env, True, ""
    config = sim.SimConfig(memory=PRIVATE_SIM_MEMORY, state_dir=os.path.join(folder, "sim"))
    note = "checking a simulated GPU of its own"
    clean = {k: v for k, v in env.items() if not k.startswith("FRACGPU_SIM_")}
    return {**clean, **sim.environment(config, clean)}, True, f"{note} ({format_size(config.memory)})"


def kernels_module(simulated: bool) -> tuple[str | None, str | None]:
    """(a module with fracgpu_spin for the compute probes, or None with why not)."""
    from fracgpu import kernels_path

    try:
        return str(kernels_path()), None
    except FileNotFoundError as e:
        return (sim.kernel_stand_in(), None) if simulated else (None, str(e))


def run(device_index: int = 0, gpu: str = "auto", *, env: Mapping[str, str] | None = None,
        selected: list[str] | None = None, workers: int | None = None,
        real_available: Callable[[], bool] | None = None) -> Report:
    """Run the checks (``selected`` names, default all) on GPU ``device_index``; the Report.

    Raises ValueError for a device the node does not have or an unknown check, DeviceError when
    there is no GPU to check, ProbeFailed when the device's context cannot even be measured."""
    from fracgpu.exercise import demo

    env = dict(os.environ if env is None else env)
    chosen = [c for c in CHECKS if selected is None or c.name in selected]
    unknown = set(selected or ()) - {c.name for c in CHECKS}
    if unknown:
        raise ValueError(f"unknown check {sorted(unknown)[0]!r}: the checks are {', '.join(c.name for c in CHECKS)}")
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="fracgpu-check-")
    node = None
    try:
        job_env, simulated, note = choose_gpu(gpu, env, folder, real_available or demo.real_gpu_available)
        state_dir = os.path.join(folder, "state")
        os.mkdir(state_dir, 0o700)
        job_env.update({settings.STATE_DIR: state_dir, settings.LEDGER: os.path.join(folder, "ledger.sqlite")})
        found = partitions.device(device_index, job_env)
        module, problem = kernels_module(simulated)
        node = Node(folder, job_env, DeviceInfo(device_index, found.name, found.uuid, found.total_memory, simulated,
                                                context_reserve=0, note=note), module, problem)
        node.measure_context()
        results: dict[str, Result] = {}
        parallel = [c for c in chosen if not c.alone]
        limit = workers or max(1, min(os.cpu_count() or 1, 4, found.total_memory // node.quota - 2))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=limit)
        try:
            futures = {pool.submit(graded, c, node): c.name for c in parallel}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
        except BaseException:   # Ctrl-C: the probes go first, so that no worker waits on one
            node.close()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for c in chosen:
            if c.alone:
                results[c.name] = graded(c, node)
        return Report(node.device, [results[c.name] for c in chosen], time.monotonic() - started, node.quota)
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(folder, ignore_errors=True)


def graded(c: Check, node: Node) -> Result:
    """The check's Result; a probe that failed, or a refusal where none was due, fails the check with why."""
    try:
        return c.run(node)
    except (ProbeFailed, ValueError, state.StateError, devices.DeviceError) as e:
        return Result(c.name, False, "-", "-", str(e))
