"""Ground truth: the books reconcile with what the device reports each process holds (NVML's
nvmlDeviceGetComputeRunningProcesses, which the simulated NVML answers from the simulated
device's own per-process accounting). Memory the books missed is charged to the partition,
which is held to the larger of the two; the drift shows in top, the exporter and the report,
and goes with the process, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fracgpu import metrics, sim
from tests.support.screen import tables
from tests.support.simgpu import CTYPES_PRELUDE, MiB, command_pid, partition_books, wait_for, wait_gone

# A job that allocates through the shim (`alloc N`) and, behind its back, through the driver
# opened by absolute path (`bypass N`): the one the shim forwards to, so the same driver and
# context, which the shim never sees. It answers each command with the CUresult, and `ready`.
JOB = CTYPES_PRELUDE + """import sys
behind = ctypes.CDLL(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    what, mib = line.split()
    p = ctypes.c_uint64()
    via = behind if what == "bypass" else cuda
    print(via.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(int(mib) << 20)), flush=True)
"""

MISSED = 32 * MiB


def ask(job, line: str) -> str:
    job.stdin.write(line + "\n")
    job.stdin.flush()
    return job.stdout.readline().strip()


def start_job(gpu, how: str, shim: str, env: dict | None = None):
    """JOB in partition `team`, under `fracgpu run` (which records it) or under the shim alone;
    (the process we talk to, the pid of the job itself)."""
    argv = [sys.executable, "-c", JOB, str(sim.library_dir() / "libcuda.so.1")]
    if how == "fracgpu run":
        job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--name", "truth", "--",
                        *argv, env=env)
    else:
        job = gpu.popen(*argv, env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": "team", **(env or {})})
    assert job.stdout.readline().strip() == "ready", job.stderr.read() if job.poll() is not None else ""
    return job, command_pid(job) if how == "fracgpu run" else job.pid


def scrape(gpu) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(metrics.UsageCollector(str(gpu.state_dir), per_process=True))
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


@pytest.mark.parametrize("how", ["fracgpu run", "shim alone"])
@pytest.mark.fault("Memory allocated behind the shim's back (the driver opened by absolute path), then the job "
                   "SIGKILLed",
                   "within 2 s the device's figure shows it and it is charged to the partition (an allocation that "
                   "fits by the books but not by the device is refused); shown in top, the exporter and the "
                   "report; given back within 1 s of the kill")
def test_memory_the_books_missed_is_caught_charged_and_given_back(gpu, shim, how):
    gpu.fracgpu("partition", "create", "team", "--memory", "64MiB")
    job, pid = start_job(gpu, how, shim)
    try:
        assert ask(job, f"bypass {MISSED >> 20}") == "0"
        # Within about a second (the reconciliation's interval) the partition holds the missed bytes too.
        team = wait_for(lambda: partition_books(gpu, "team"), lambda p: p["drift_charged"] == MISSED, 2.0)
        assert (team["used"], team["drift"], team["drift_charged"], team["drift_peak"]) == \
            (gpu.context + MISSED, MISSED, MISSED, MISSED)
        # 40 MiB more fits in 64 MiB by the books (context + 40 MiB), not by the device (context + 32 + 40 MiB).
        assert ask(job, "alloc 40") == "2"
        assert ask(job, "alloc 16") == "0"   # what the device leaves does fit
        wanted = gpu.context + 16 * MiB + MISSED
        team = partition_books(gpu, "team")
        assert team["used"] == wanted and team["oom_refusals"] == 1

        # top: the partition's and the process's drift, and the device's figure (once reconciled
        # after the 16 MiB: within an interval).
        def top_json():
            (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
            (p,) = [p for p in g["partitions"] if p["name"] == "team"]
            (q,) = [q for q in g["processes"] if q["pid"] == pid]
            return p, q

        p, q = wait_for(top_json, lambda pq: pq[1]["device_used"] == wanted, 2.0)
        assert (p["drift"], p["drift_unknown"]) == (MISSED, 0)
        assert (q["truth"], q["device_used"], q["used"], q["drift"], q["drift_charged"]) == \
            ("known", wanted, wanted - MISSED, MISSED, MISSED)
        text = gpu.fracgpu("top", "--once", "--interval", "0.1", env={"COLUMNS": "250"}).stdout
        (partitions,), (processes,) = tables(text, "partition"), tables(text, "pid")
        assert next(r for r in partitions if r["partition"] == "team")["drift"] == "+32MiB"
        assert next(r for r in processes if r["pid"] == str(pid))["drift"] == "+32MiB"

        # The exporter.
        samples = scrape(gpu)
        by_name = {name: [s for s in found if s.labels.get("partition") == "team"] for name, found in samples.items()}
        assert [s.value for s in by_name["fracgpu_partition_memory_drift_bytes"]] == [MISSED]
        assert [s.value for s in by_name["fracgpu_partition_memory_drift_peak_bytes"]] == [MISSED]
        assert [s.value for s in by_name["fracgpu_partition_memory_used_bytes"]] == [wanted]
        assert [(s.labels["pid"], s.value) for s in by_name["fracgpu_process_memory_drift_bytes"]] == \
            [(str(pid), MISSED)]
        assert [s.value for s in by_name["fracgpu_process_device_memory_bytes"]] == [wanted]
    finally:
        # SIGKILL: what it held, the drift charged for it included, goes back within a second.
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    killed = time.monotonic()
    team = wait_for(lambda: partition_books(gpu, "team"), lambda p: p["used"] == 0, 1.0)
    assert (team["used"], team["drift_charged"], team["drift_peak"]) == (0, 0, MISSED), time.monotonic() - killed
    assert "out of memory in partition 'team'" in job.communicate(timeout=10)[1]
    assert job.returncode == -signal.SIGKILL
    if how == "fracgpu run":
        (record,) = json.loads(gpu.fracgpu("report", "--format", "json").stdout)
        assert (record["job"], record["peak_drift_bytes"], record["exit_status"]) == ("truth", MISSED, -9)
        report = gpu.fracgpu("report", env={"COLUMNS": "250"}).stdout
        assert "peak drift" in report and "+32MiB" in report


def test_an_uncharged_context_is_charged_by_the_device_figure(gpu, shim):
    # FRACGPU_CONTEXT_MEMORY=0: the books charge contexts nothing, the device says what they take.
    gpu.fracgpu("partition", "create", "team", "--memory", "64MiB")
    job, pid = start_job(gpu, "shim alone", shim, env={"FRACGPU_CONTEXT_MEMORY": "0"})
    try:
        team = wait_for(lambda: partition_books(gpu, "team"), lambda p: p["used"] == gpu.context, 2.0)
        assert (team["used"], team["drift_charged"]) == (gpu.context, gpu.context)
        # The books say 64 MiB is free; the device holds the context: 64 MiB is refused, 64 MiB less it is not.
        assert ask(job, "alloc 64") == "2"
        assert ask(job, f"alloc {64 - (gpu.context >> 20)}") == "0"
    finally:
        job.kill()
        job.wait(timeout=10)
    assert "memory allocated where the shim does not see it; the difference is charged to partition 'team'" in \
        job.stderr.read()


def test_books_that_agree_show_no_drift_and_charge_nothing(gpu, clients):
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 200, 30)
    try:
        assert job.stdout.readline().strip() == "holding 200"
        pid = command_pid(job)
        held = 200 * MiB + gpu.context

        def process():
            (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
            return next(q for q in g["processes"] if q["pid"] == pid)

        q = wait_for(process, lambda q: q["truth"] == "known", 2.0)
        assert (q["device_used"], q["used"], q["drift"], q["drift_charged"]) == (held, held, 0, 0)
        (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        (p,) = g["partitions"]
        assert (p["used"], p["drift"], p["drift_charged"], p["drift_peak"]) == (held, 0, 0, 0)
    finally:
        job.kill()
        job.wait(timeout=10)
    assert "more than its books" not in job.stderr.read()


def test_reconciliation_can_be_turned_off(gpu, shim):
    gpu.fracgpu("partition", "create", "team", "--memory", "64MiB")
    job, pid = start_job(gpu, "shim alone", shim, env={"FRACGPU_RECONCILE_INTERVAL": "0"})
    try:
        assert ask(job, f"bypass {MISSED >> 20}") == "0"
        assert ask(job, "alloc 40") == "0"   # fits by the books: nothing checks them against the device
        time.sleep(1.5)                      # longer than the default interval
        team = partition_books(gpu, "team")
        assert (team["used"], team["drift_charged"]) == (gpu.context + 40 * MiB, 0)
        (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        (q,) = [q for q in g["processes"] if q["pid"] == pid]
        assert (q["truth"], q["drift"], q["device_used"]) == ("pending", None, None)
    finally:
        job.kill()
        job.wait(timeout=10)


@pytest.mark.fault("A process the device does not list (a container in another pid namespace)",
                   "said once on stderr; its drift shows as unknown (`?`); nothing is charged for it")
def test_a_process_the_device_does_not_list_has_an_unknown_drift(gpu, shim, unlisted_nvml):
    gpu.fracgpu("partition", "create", "team", "--memory", "64MiB")
    env = {"FRACGPU_REAL_LIBNVML": unlisted_nvml, "UNLISTED_NVML_REAL": str(sim.library_dir() / "libnvidia-ml.so.1")}
    job, pid = start_job(gpu, "shim alone", shim, env=env)
    try:
        assert ask(job, f"bypass {MISSED >> 20}") == "0"
        team = wait_for(lambda: partition_books(gpu, "team"), lambda p: p["drift_unknown"] == 1, 2.0)
        assert (team["drift_unknown"], team["drift"], team["drift_charged"], team["used"]) == (1, 0, 0, gpu.context)
        (g,) = json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
        (q,) = [q for q in g["processes"] if q["pid"] == pid]
        assert (q["truth"], q["device_used"], q["drift"]) == ("unknown", None, None)
        text = gpu.fracgpu("top", "--once", "--interval", "0.1", env={"COLUMNS": "250"}).stdout
        (partitions,), (processes,) = tables(text, "partition"), tables(text, "pid")
        assert next(r for r in partitions if r["partition"] == "team")["drift"] == "?"
        process = next(r for r in processes if r["pid"] == str(pid))
        assert (process["device"], process["drift"]) == ("n/a", "?")
        time.sleep(1.2)   # another reconciliation: said once only
    finally:
        job.kill()
        job.wait(timeout=10)
    err = job.stderr.read()
    assert err.count("does not list this process") == 1, err
    assert "is the process in another pid namespace than the driver?" in err
