"""The context is inside the quota, as with MIG and MPS memory limits.

The simulated GPU reserves memory for each context by default (1/256 of the
device, as a real context takes 300-600 MiB of an 80-141 GiB GPU). The shim
measures what the process's first context on a device reserves and charges it
to the job's partition (or charges FRACGPU_CONTEXT_MEMORY when that is set), so
a job gets its quota less its own context, and never less because of a
neighbour's context.
"""

from __future__ import annotations

import sys

from tests.support.simgpu import CTYPES_PRELUDE, GiB, MiB, parse_facts

# Retains the primary context (printing the CUresult), then: what cuMemGetInfo shows, whether all of
# what it shows free can be allocated, and whether 1 MiB more can. With HOLD, waits for a line on
# stdin before exiting, holding all of it. With SECOND, also creates and destroys a second context.
JOB = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
rc = cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
print("retain", rc, flush=True)
if rc:
    rc = cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)   # again: refused again, before it is made
    flags, active = ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0
    print("retain_again", rc)
    print("active", active.value)   # the refused context does not exist
    sys.exit(0)
assert cuda.cuCtxSetCurrent(ctx) == 0

def meminfo():
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    return free.value, total.value

free, total = meminfo()
print("free", free)
print("total", total)
if "SECOND" in sys.argv:
    second = ctypes.c_void_p()
    assert cuda.cuCtxCreate_v2(ctypes.byref(second), 0, dev) == 0
    print("free_two_contexts", meminfo()[0])
    assert cuda.cuCtxDestroy_v2(second) == 0
    assert cuda.cuCtxSetCurrent(ctx) == 0
    print("free_one_context", meminfo()[0])
p, q = ctypes.c_uint64(), ctypes.c_uint64()
print("alloc_free", cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(free)))
print("alloc_more", cuda.cuMemAlloc_v2(ctypes.byref(q), ctypes.c_size_t(1 << 20)))
print("ready", flush=True)
if "HOLD" in sys.argv:
    sys.stdin.readline()
"""

OUT_OF_MEMORY = "2"   # CUDA_ERROR_OUT_OF_MEMORY


def run_job(gpu, *options, args=(), env=None):
    result = gpu.fracgpu("run", *options, "--", sys.executable, "-c", JOB, *args, env=env)
    return parse_facts(result.stdout), result.stderr


def test_the_simulated_gpu_reserves_a_share_of_itself_per_context_by_default(make_gpu):
    assert make_gpu(memory=4 * GiB).context == 16 * MiB
    assert make_gpu(memory=16 * GiB).context == 64 * MiB
    assert make_gpu(memory=4 * GiB, context_memory=0).context == 0


def test_the_simulated_driver_applies_the_same_default_itself(make_gpu):
    """Without FRACGPU_SIM_CONTEXT_MEMORY (and without the shim), a context takes 1/256 of the device."""
    gpu = make_gpu(memory=4 * GiB)
    code = CTYPES_PRELUDE + """free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
print(free.value, total.value)
"""
    out = gpu.run("env", "-u", "FRACGPU_SIM_CONTEXT_MEMORY", sys.executable, "-c", code).stdout.split()
    assert out == [str(4 * GiB - 16 * MiB), str(4 * GiB)]


def test_four_quarter_jobs_each_get_their_quarter_less_their_own_context(make_gpu):
    """`fracgpu sim env --memory 4GiB`, four `fracgpu run --memory 25%` jobs at once: each gets its
    1 GiB less its own context, all of it, together filling the device; none gets less because of a
    neighbour's context."""
    gpu = make_gpu(memory=4 * GiB)
    jobs = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "25%", "--", sys.executable, "-c", JOB,
                      "HOLD") for _ in range(4)]
    try:
        facts = []
        for job in jobs:
            lines = {}
            for line in job.stdout:
                key, _, value = line.strip().partition(" ")
                lines[key] = value
                if key == "ready":
                    break
            facts.append(lines)
        for f in facts:   # all four hold their memory now
            assert f["retain"] == "0", f
            assert f["total"] == str(GiB)
            assert f["free"] == str(GiB - gpu.context)       # the context is shown as used
            assert f["alloc_free"] == "0"                    # all of it is theirs, with three neighbours
            assert f["alloc_more"] == OUT_OF_MEMORY          # and not a byte more
    finally:
        for job in jobs:
            job.communicate("\n", timeout=30)
    assert [job.returncode for job in jobs] == [0, 0, 0, 0]


# Outside fracgpu: allocates and frees 256 MiB as fast as it can until its stdin closes.
CHURN = CTYPES_PRELUDE + r"""
import threading
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
p = ctypes.c_uint64()
print("churning", flush=True)
while not stop.is_set():
    assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(256 << 20)) == 0
    assert cuda.cuMemFree_v2(p) == 0
"""


def test_a_neighbour_allocating_and_freeing_does_not_move_what_a_context_is_charged(make_gpu):
    """The context is measured by the device's own figure for this process, so a neighbour's memory
    churning meanwhile (here a process outside fracgpu, allocating and freeing 256 MiB in a loop)
    neither makes a job pay for it nor lets a job's context go uncharged."""
    gpu = make_gpu(memory=8 * GiB)
    churn = gpu.popen(sys.executable, "-c", "import sys\n" + CHURN)
    try:
        assert churn.stdout.readline().strip() == "churning"
        for _ in range(3):
            facts, _ = run_job(gpu, "--memory", "1GiB")
            assert facts["free"] == str(GiB - gpu.context)
            assert facts["alloc_free"] == "0" and facts["alloc_more"] == OUT_OF_MEMORY
    finally:
        churn.communicate("", timeout=30)
    assert churn.returncode == 0


def test_every_context_of_a_job_is_charged_and_given_back(make_gpu):
    """A later context of the process is charged what its first one was measured at, before it is made."""
    gpu = make_gpu(memory=4 * GiB)
    facts, _ = run_job(gpu, "--memory", "1GiB", args=("SECOND",))
    assert facts["free"] == str(GiB - gpu.context)
    assert facts["free_two_contexts"] == str(GiB - 2 * gpu.context)
    assert facts["free_one_context"] == str(GiB - gpu.context)
    assert facts["alloc_free"] == "0" and facts["alloc_more"] == OUT_OF_MEMORY


def test_fracgpu_context_memory_is_charged_instead_of_the_measurement(make_gpu):
    gpu = make_gpu(memory=4 * GiB)
    facts, _ = run_job(gpu, "--memory", "1GiB", args=("SECOND",), env={"FRACGPU_CONTEXT_MEMORY": "100MiB"})
    assert facts["free"] == str(GiB - 100 * MiB)
    assert facts["free_two_contexts"] == str(GiB - 200 * MiB)
    assert facts["alloc_free"] == "0" and facts["alloc_more"] == OUT_OF_MEMORY
    facts, _ = run_job(gpu, "--memory", "1GiB", env={"FRACGPU_CONTEXT_MEMORY": "0"})
    assert facts["free"] == str(GiB)                      # 0: contexts are charged nothing


def test_a_context_larger_than_the_quota_is_refused(make_gpu):
    """Measured: the context is made, measured, and destroyed again; the retry is refused before it is made."""
    gpu = make_gpu(memory=4 * GiB)
    facts, stderr = run_job(gpu, "--memory", "8MiB")
    assert facts["retain"] == OUT_OF_MEMORY
    assert facts["retain_again"] == OUT_OF_MEMORY
    assert facts["active"] == "0"
    assert "a CUDA context on GPU-" in stderr and "reserves 16MiB (measured), more than its partition has left" \
        in stderr


def test_a_context_larger_than_the_quota_given_in_fracgpu_context_memory_is_refused(make_gpu):
    gpu = make_gpu(memory=4 * GiB)
    facts, stderr = run_job(gpu, "--memory", "32MiB", env={"FRACGPU_CONTEXT_MEMORY": "64MiB"})
    assert facts["retain"] == OUT_OF_MEMORY and facts["active"] == "0"
    assert "reserves 64MiB (FRACGPU_CONTEXT_MEMORY), more than its partition has left: the context is not " \
        "created" in stderr
