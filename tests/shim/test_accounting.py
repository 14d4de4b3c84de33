"""The ledger, end to end: jobs under ``fracgpu run`` on the simulated GPU, then ``fracgpu report``.

A job of known kernel time and known allocations must come out of the report
with that device time (within 5%), its exact peak memory and its exit status;
a job killed with SIGKILL, or whose ``fracgpu run`` is killed, must be there
too, with what it used up to the kill.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.support.simgpu import BINDINGS_PRELUDE, GiB, MiB, command_pid, wait_gone

# A job: allocate MIB, then 1 MiB more and free it (peak: MIB + 1 and its context), launch N spins of MS milliseconds back to back (N < 0: until
# killed), synchronise, free, exit with STATUS.
JOB = BINDINGS_PRELUDE + r"""
module, mib, n, ms, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
spin = ck(cu.cuModuleGetFunction(ck(cu.cuModuleLoad(module.encode())), b"fracgpu_spin"))
buf = ck(cu.cuMemAlloc(mib << 20))
small = ck(cu.cuMemAlloc(1 << 20))
ck(cu.cuMemFree(small))
ns = np.array([int(ms * 1e6)], np.uint64)
args = np.array([ns.ctypes.data], np.uint64)
stream = ck(cu.cuStreamCreate(0))
print("running", flush=True)
i = 0
while n < 0 or i < n:
    ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args.ctypes.data, 0))
    if i % 4 == 3:
        ck(cu.cuStreamSynchronize(stream))
    i += 1
ck(cu.cuStreamSynchronize(stream))
ck(cu.cuMemFree(buf))
sys.exit(status)
"""


def report(gpu, *options) -> list[dict]:
    return json.loads(gpu.fracgpu("report", "--format", "json", *options).stdout)


def run_job(gpu, kernels, *options, mib=64, n=10, ms=5.0, status=0, name=None):
    argv = [sys.executable, "-m", "fracgpu", "run", *options]
    if name:
        argv += ["--name", name]
    return gpu.popen(*argv, "--", sys.executable, "-c", JOB, kernels, str(mib), str(n), str(ms), str(status))


def test_two_jobs_have_their_device_time_and_exact_peak_in_the_report(make_gpu, kernels):
    gpu = make_gpu(memory=2 * GiB)   # room for both promises: 1 GiB and 512 MiB
    a = run_job(gpu, kernels, "--memory", "1GiB", "--compute", "50%", mib=256, n=60, ms=5, name="a")
    b = run_job(gpu, kernels, "--memory", "512MiB", "--compute", "50%", mib=96, n=100, ms=4, status=3, name="b")
    assert a.wait(60) == 0, a.communicate()
    assert b.wait(60) == 3, b.communicate()
    jobs = {j["job"]: j for j in report(gpu, "--rate", "3.6")}
    assert set(jobs) == {"a", "b"}
    for name, ran_s, peak, status in (("a", 0.300, 257 * MiB + gpu.context, 0),
                                          ("b", 0.400, 97 * MiB + gpu.context, 3)):
        job = jobs[name]
        assert abs(job["gpu_seconds"] - ran_s) <= 0.05 * ran_s, job
        assert job["peak_memory_bytes"] == peak, job
        assert job["exit_status"] == status
        assert job["start"] and job["end"]
        assert job["memory_byte_seconds"] > 0
        assert job["cost"] == pytest.approx(job["gpu_seconds"] / 3600 * 3.6, abs=1e-6)
        assert job["processes"] == 1
    assert jobs["a"]["memory_limit"] == 1 << 30 and jobs["a"]["compute_share"] == 0.5
    assert jobs["a"]["partition"] != jobs["b"]["partition"]


def test_a_job_alone_on_the_gpu_is_accounted(gpu, kernels):
    p = run_job(gpu, kernels, "--memory", "25%", mib=100, n=40, ms=10, name="alone")
    assert p.wait(60) == 0, p.communicate()
    (job,) = report(gpu)
    assert abs(job["gpu_seconds"] - 0.4) <= 0.02, job
    assert job["peak_memory_bytes"] == 101 * MiB + gpu.context   # its allocations and its context
    assert job["memory_limit"] == (1 << 30) // 4   # 25% of the simulated GPU's 1 GiB, in bytes


def _wait_running(proc):
    line = proc.stdout.readline()
    assert line.strip() == "running", (line, proc.stderr.read() if proc.poll() is not None else "")


@pytest.mark.fault('SIGKILL of a running job',
                   '`fracgpu run` exits as killed by SIGKILL; the report has the job, exit -9, its exact peak and its device time up to the kill')
def test_a_job_killed_with_sigkill_is_in_the_report_with_its_use(gpu, kernels):
    p = run_job(gpu, kernels, "--memory", "1GiB", mib=200, n=-1, ms=2, name="killed")
    _wait_running(p)
    time.sleep(1.0)
    (proc,) = [q for u in gpu_usage(gpu) for q in u["processes"]]
    os.kill(proc["pid"], signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL     # fracgpu run ends as its command did
    (job,) = report(gpu)
    assert job["exit_status"] == -signal.SIGKILL
    assert job["peak_memory_bytes"] == 201 * MiB + gpu.context   # its allocations and its context
    elapsed = time.time() - _ts(job["start"])
    assert 0.8 <= job["gpu_seconds"] <= elapsed, job   # busy from the start to the kill


@pytest.mark.fault('SIGKILL of `fracgpu run` itself',
                   'the kernel kills the job too; the next report closes it at its last sample, exit -9')
def test_killing_fracgpu_run_kills_the_job_and_the_report_keeps_it(gpu, kernels):
    p = run_job(gpu, kernels, "--memory", "1GiB", mib=50, n=-1, ms=2, name="orphan")
    _wait_running(p)
    command = command_pid(p)
    time.sleep(1.0)
    p.kill()
    p.wait(30)
    wait_gone(command)   # the kernel kills the command too (its parent-death signal)
    assert not any(u["processes"] for u in gpu_usage(gpu))
    (job,) = report(gpu)
    assert job["exit_status"] == -signal.SIGKILL and job["end"] is not None
    assert job["peak_memory_bytes"] == 51 * MiB + gpu.context   # its allocations and its context
    assert job["gpu_seconds"] >= 0.5, job


def test_signals_sent_to_fracgpu_run_reach_the_command(gpu):
    p = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "64MiB", "--", sys.executable, "-c",
                  "import signal, sys, time\n"
                  "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                  "print('ready', flush=True)\n"
                  "time.sleep(30)\n")
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 7
    (job,) = report(gpu)
    assert job["exit_status"] == 7


def gpu_usage(gpu) -> list[dict]:
    return json.loads(gpu.fracgpu("top", "--once", "--json").stdout)["gpus"]


def _ts(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text).timestamp()


INIT_JOB = JOB.replace("from cuda.bindings import driver as cu", "import fracgpu\nfracgpu.init(memory='512MiB')\n"
                       "from cuda.bindings import driver as cu")


def test_a_job_under_fracgpu_init_is_recorded_until_it_ends(gpu, kernels):
    p = gpu.popen(sys.executable, "-c", INIT_JOB, kernels, "128", "30", "10", "0")
    assert p.wait(60) == 0, p.communicate()
    deadline = time.monotonic() + 5
    while True:   # its recorder sees it end at once (a pidfd), and finishes the record
        (job,) = report(gpu)
        if job["end"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert job["end"] is not None and job["kind"] == "init"
    assert job["partition"] == f"init-{p.pid}" and job["exit_status"] is None   # not ours to know
    assert abs(job["gpu_seconds"] - 0.3) <= 0.015, job
    assert job["peak_memory_bytes"] == 129 * MiB + gpu.context and job["memory_limit"] == 512 * MiB
    assert not any(u["processes"] for u in gpu_usage(gpu))   # its kept slot was collected
