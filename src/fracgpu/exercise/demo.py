"""The demo (``fracgpu demo``): three jobs sharing one GPU under quotas and shares, then the live view and the report.

Runs on the real GPU when a working driver is found, else on a simulated GPU
of its own (a private folder, so it never disturbs other users of the
simulator). Each job is a separate process using the CUDA driver API under
``fracgpu run --memory ... --compute ...``: it allocates memory (one asks for
more than its quota, is refused, and goes on with a smaller batch), checks a
kernel's writes, and keeps the device busy with spin kernels. While they run,
the demo prints what ``fracgpu top`` shows; after, what ``fracgpu report``
shows from the ledger (a private one: the demo is not billed to anyone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fracgpu import devices, kernels_path, settings, sim, snapshot
from fracgpu.ledger import Ledger
from fracgpu.units import format_size

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Job:
    name: str
    memory: str        # its quota
    compute: str       # its share of the GPU's time
    kernel_ms: float   # length of each spin kernel
    want_mib: int      # the batch it asks for first
    priority: str = "normal"   # its class; a high one serves requests (a kernel and a synchronize each)

    def options(self) -> list[str]:
        """Its ``fracgpu run`` options."""
        return ["--memory", self.memory, "--compute", self.compute] + \
            (["--priority", self.priority] if self.priority != "normal" else [])


# 'infer' serves requests at high priority beside training: each waits for one training kernel at most.
JOBS = [Job("train", "3GiB", "50%", 2.0, 2048), Job("infer", "1GiB", "25%", 1.0, 512, "high"),
        Job("batch", "1GiB", "25%", 1.0, 1536)]   # asks for more than its quota: refused, then halves its batch
BUSY_SECONDS = 2.0
REQUEST_PERIOD_MS = 20.0


def real_gpu_available() -> bool:
    """Whether a real driver with a device is usable (probed in a subprocess, so
    this process never loads a driver)."""
    probe = ("import ctypes,sys\ntry:\n l=ctypes.CDLL('libcuda.so.1')\nexcept OSError:\n sys.exit(1)\n"
             "n=ctypes.c_int()\nsys.exit(0 if l.cuInit(0)==0 and l.cuDeviceGetCount(ctypes.byref(n))==0 "
             "and n.value>0 else 1)")
    env = sim.without(settings.without_job_variables(os.environ))   # the simulated driver is not a GPU
    try:
        with devices.probe_progress():
            return subprocess.run([sys.executable, "-c", probe], env=env, timeout=60,
                                  capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def without_kernels() -> str | None:
    """Why the demo cannot run on the real GPU although one works: this fracgpu was built without
    its CUDA kernels (no nvcc at build time); None when they are installed."""
    try:
        kernels_path()
    except FileNotFoundError as e:
        return str(e)
    return None


def job_main(name: str, kernel_ms: float, module: str, want_mib: int, serving: bool = False) -> None:
    """One demo job (``python -m fracgpu.exercise.demo NAME KERNEL_MS MODULE WANT_MIB [serve]``), run under
    ``fracgpu run``: it asks for WANT_MIB at once and, refused (CUDA_ERROR_OUT_OF_MEMORY),
    halves its batch until it fits, as a training script does; checks a kernel's writes;
    then keeps the GPU busy, or (``serving``) serves a request (a kernel and a synchronize)
    every REQUEST_PERIOD_MS. Prints one JSON line."""
    from fracgpu.exercise import latency
    from fracgpu.exercise.driver import Driver

    drv = Driver()
    free, total = drv.mem_info()
    drv.load_kernels(module)
    size, refusals = want_mib * MiB, 0
    while True:
        rc, ptr = drv.try_alloc(size)
        if rc == 0:
            break
        if rc != 2 or size <= 64 * MiB:   # 2: CUDA_ERROR_OUT_OF_MEMORY
            raise SystemExit(f"demo job {name}: cannot allocate {size >> 20} MiB (CUresult {rc})")
        refusals += 1
        size //= 2
    count = 1 << 20
    drv.fill(ptr, 0x600DF00D, count)
    drv.synchronize()
    verified = all(v == 0x600DF00D for v in drv.read_u32(ptr, count)[::4096])
    print("ready", flush=True)   # all jobs start their kernels together
    sys.stdin.readline()
    start, served = time.monotonic(), {}
    if serving:
        _, latencies = latency.serve(drv, int(BUSY_SECONDS * 1000 / REQUEST_PERIOD_MS), REQUEST_PERIOD_MS,
                                      kernel_ms)
        kernels = len(latencies)
        served = {"p50_ms": latency.percentile(latencies, 50), "p99_ms": latency.percentile(latencies, 99)}
    else:
        kernels = latency.train(drv, BUSY_SECONDS, kernel_ms)[-1][1]
    wall = time.monotonic() - start
    drv.free(ptr)
    print(json.dumps({"name": name, "device": drv.name(), "total": total, "free_at_start": free,
                      "allocated": size, "refusals": refusals, "verified": verified,
                      "device_s": kernels * kernel_ms / 1000, "wall_s": wall, **served}))


class DemoError(RuntimeError):
    """The demo could not run, or a job was not held to its quota; the message says which."""


@dataclass
class Outcome:
    """What the demo's jobs did: each job's own report (its JSON line), and the ledger's records."""

    results: list[dict]
    recorded: list   # ledger.JobRecord


def run(folder: str, use_real: bool, say: Callable[[str], None],
        while_busy: Callable[[snapshot.Snapshot, str], None]) -> Outcome:
    """Run the demo's jobs in ``folder`` (its private state folder, ledger and simulated GPU):
    ``say`` is given each line to show as they start, ``while_busy`` the usage snapshot (and
    the state folder) taken while all of them are busy. Raises DemoError."""
    state_dir, ledger_path = os.path.join(folder, "state"), os.path.join(folder, "ledger.sqlite")
    env = dict(os.environ, **{settings.STATE_DIR: state_dir, settings.LEDGER: ledger_path})
    if use_real:
        say("Running on the real GPU.")
    else:
        config = sim.SimConfig(memory=8 * GiB, state_dir=os.path.join(folder, "sim"))
        env.update(sim.environment(config))
        say(f"No GPU needed: running on a simulated {format_size(config.memory)} GPU.")
    try:
        module = str(kernels_path())
    except FileNotFoundError as e:
        if use_real:
            raise DemoError(str(e)) from None
        module = sim.kernel_stand_in()   # built without nvcc
    for j in JOBS:
        say(f"  fracgpu run --name {j.name} {' '.join(j.options())} -- python -m fracgpu.exercise.demo {j.name} ...")
    procs = [subprocess.Popen([sys.executable, "-m", "fracgpu", "run", "--name", j.name, *j.options(), "--",
                               sys.executable, "-m", "fracgpu.exercise.demo", j.name, str(j.kernel_ms), module,
                               str(j.want_mib), *(["serve"] if j.priority == "high" else [])],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for j in JOBS]
    for job, p in zip(JOBS, procs):
        if p.stdout.readline().strip() != "ready":
            for q in procs:
                q.kill()
            raise DemoError(f"demo job {job.name!r} failed to start:\n{p.communicate()[1]}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    # The live view, as `fracgpu top` shows it, while all three are busy.
    time.sleep(0.5)
    first = snapshot.read(state_dir)
    time.sleep(1.0)
    while_busy(snapshot.take(first, snapshot.read(state_dir), snapshot.running_jobs(ledger_path)), state_dir)
    results = []
    for job, p in zip(JOBS, procs):
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise DemoError(f"demo job {job.name!r} failed (exit {p.returncode}):\n{err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    with Ledger(ledger_path) as ledger:
        return Outcome(results, ledger.jobs())


def check(outcome: Outcome) -> None:
    """DemoError unless every job was held to its quota and read back what its kernel wrote, the
    greedy one was refused, and every job was recorded."""
    results = outcome.results
    quota_held = all(r["verified"] and r["allocated"] <= r["total"] for r in results)
    if not quota_held or results[2]["refusals"] == 0 or len(outcome.recorded) != len(JOBS):
        raise DemoError("a job was not held to its quota, was not recorded, or read back values its "
                        "kernel did not write")


if __name__ == "__main__":
    job_main(sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:] == ["serve"])
