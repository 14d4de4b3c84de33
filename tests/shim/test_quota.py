"""Memory quotas, enforced by the shim for every client, across processes.

Each test has a simulated GPU of 1 GiB and a state folder of its own (the
`gpu` fixture). Jobs run under `fracgpu run`, or with `fracgpu.init()` in
process, exactly as users run them.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from tests.support.simgpu import CTYPES_PRELUDE, GiB, MiB, command_pid, parse_facts, wait_gone

QUOTA = 256 * MiB

# A Python client over ctypes: what it sees, then 32 MiB allocations until refused.
CTYPES_JOB = CTYPES_PRELUDE + """
free, total, dtotal = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
assert cuda.cuDeviceTotalMem_v2(ctypes.byref(dtotal), dev) == 0
print("meminfo_total", total.value)
print("total_mem", dtotal.value)
n, p = 0, ctypes.c_uint64()
while (rc := cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(32 << 20))) == 0:
    n += 1
print("blocks", n)
print("result", rc)
"""

CUDA_BINDINGS_JOB = """
from cuda.bindings import driver as cu
def ck(result):
    err, *values = result
    assert err == cu.CUresult.CUDA_SUCCESS, err
    return values[0] if len(values) == 1 else values
assert cu.cuInit(0)[0] == cu.CUresult.CUDA_SUCCESS
dev = ck(cu.cuDeviceGet(0))
ctx = ck(cu.cuCtxCreate(None, 0, dev))
free, total = ck(cu.cuMemGetInfo())
print("meminfo_total", total)
print("total_mem", ck(cu.cuDeviceTotalMem(dev)))
n = 0
stream = ck(cu.cuStreamCreate(0))
while True:   # half plain, half stream-ordered allocations
    err, _ = cu.cuMemAlloc(32 << 20) if n % 2 == 0 else cu.cuMemAllocAsync(32 << 20, stream)
    if err != cu.CUresult.CUDA_SUCCESS:
        break
    n += 1
print("blocks", n)
print("result", int(err))
"""

NUMBA_JOB = """
import numpy as np
from numba import cuda
free, total = cuda.current_context().get_memory_info()
print("meminfo_total", total)
print("total_mem", cuda.current_context().device.get_primary_context().get_memory_info()[1])
arrays = []
try:
    while True:
        arrays.append(cuda.device_array(8 << 20, dtype=np.float32))   # 32 MiB
except cuda.cudadrv.driver.CudaAPIError as e:
    print("result", int(e.code))
print("blocks", len(arrays))
"""

PYTHON_JOBS = {"ctypes": CTYPES_JOB, "cuda-bindings": CUDA_BINDINGS_JOB, "numba": NUMBA_JOB}
CUDA_ERROR_OUT_OF_MEMORY = "2"


def usage_of(gpu):
    """fracgpu.usage() of this test's GPU, read in a fresh process."""
    out = gpu.python("import fracgpu, json, dataclasses; "
                     f"print(json.dumps([dataclasses.asdict(u) for u in fracgpu.usage({str(gpu.state_dir)!r})]))")
    import json

    return json.loads(out.stdout)


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_c_clients_see_the_quota_and_stop_at_it(clients, gpu, kind):
    client = getattr(clients, kind)
    facts = parse_facts(gpu.fracgpu("run", "--memory", "256MiB", "--", client, "info").stdout)
    assert facts["total_mem"] == facts["meminfo_total"] == str(QUOTA)
    assert facts["meminfo_free"] == str(QUOTA - gpu.context)   # its context is inside the quota
    result = gpu.fracgpu("run", "--memory", "256MiB", "--", client, "alloc-until-oom", 64)
    facts = parse_facts(result.stdout)
    blocks = (QUOTA - gpu.context) // (64 * MiB)
    assert facts == {"blocks": str(blocks), "bytes": str(blocks * 64 * MiB), "result": "CUDA_ERROR_OUT_OF_MEMORY"}
    # One clear line on stderr, naming the partition, its limit, use and the request.
    oom_lines = [line for line in result.stderr.splitlines() if "out of memory" in line]
    assert len(oom_lines) == 1, result.stderr
    in_use = (blocks * 64 * MiB + gpu.context) // MiB
    assert f"limit 256MiB, in use {in_use}MiB, requested 64MiB" in oom_lines[0]
    assert "partition 'run-" in oom_lines[0]


@pytest.mark.parametrize("kind", PYTHON_JOBS)
def test_python_clients_under_fracgpu_run(gpu, kind):
    facts = parse_facts(gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c", PYTHON_JOBS[kind]).stdout)
    assert facts["meminfo_total"] == facts["total_mem"] == str(QUOTA)
    assert facts["blocks"] == str((QUOTA - gpu.context) // (32 * MiB))   # the quota less its context
    assert facts["result"] == CUDA_ERROR_OUT_OF_MEMORY


@pytest.mark.parametrize("kind", PYTHON_JOBS)
def test_python_clients_with_init_in_process(gpu, kind):
    code = "import fracgpu\nfracgpu.init(memory='256MiB')\n" + PYTHON_JOBS[kind]
    facts = parse_facts(gpu.python(code).stdout)
    assert facts["meminfo_total"] == facts["total_mem"] == str(QUOTA)
    assert facts["blocks"] == str((QUOTA - gpu.context) // (32 * MiB))   # the quota less its context


def test_a_percentage_is_of_the_device(clients, gpu):
    facts = parse_facts(gpu.fracgpu("run", "--memory", "25%", "--", clients.lcuda, "info").stdout)
    assert facts["total_mem"] == str(GiB // 4)


# Its context made, waits for a line on stdin, then takes 1 MiB blocks until refused and holds them 1.5 s.
RACE_JOB = CTYPES_PRELUDE + """import sys, time
print("ready", flush=True)
sys.stdin.readline()
p, n = ctypes.c_uint64(), 0
while (rc := cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(1 << 20))) == 0:
    n += 1
print("blocks", n)
print("result", rc, flush=True)
time.sleep(1.5)
"""


def test_eight_processes_in_one_partition_never_exceed_it(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    procs = [gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                       sys.executable, "-c", RACE_JOB) for _ in range(8)]
    for p in procs:   # all eight contexts exist, then they race
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    blocks = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        facts = parse_facts(out)
        assert facts["result"] == CUDA_ERROR_OUT_OF_MEMORY
        blocks += int(facts["blocks"])
    # Together exactly the quota less their eight contexts: never a byte above, nothing lost.
    assert blocks * MiB == QUOTA - 8 * gpu.context
    (team,) = [p for u in usage_of(gpu) for p in u["partitions"] if p["name"] == "team"]
    assert team["used"] == 0
    assert team["peak"] == QUOTA
    assert team["memory_limit"] == QUOTA


@pytest.mark.fault('A free made by an exit handler after the shim has left the partition',
                   "not counted twice: the partition's other members keep their memory on the books")
def test_a_free_after_the_process_left_is_not_given_back_twice(clients, gpu, shim):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    env = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "team"}
    holder = gpu.popen(clients.lcuda, "hold", 64, 60, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding 64"
        assert gpu.run(clients.lcuda, "free-at-exit", 32, env=env).stdout.strip() == "allocated 32"
        usage = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
        (team,) = [p for u in usage for p in u["partitions"] if p["name"] == "team"]
        assert (team["used"], team["processes"]) == (64 * MiB + gpu.context, 1), team   # and its context
    finally:
        holder.kill()
        holder.wait(timeout=10)


@pytest.mark.fault('A partition member killed while holding memory',
                   'its memory is back with the partition within 1 s')
def test_a_killed_member_gives_its_memory_back_within_a_second(clients, gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    holder = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", clients.lcuda, "hold", 200, 60)
    try:
        assert holder.stdout.readline().strip() == "holding 200"
        facts = parse_facts(gpu.fracgpu("run", "--partition", "team", "--", clients.dlopen, "info").stdout)
        assert facts["meminfo_free"] == str(56 * MiB - 2 * gpu.context)   # the holder's context and its own
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    killed = time.monotonic()
    facts = parse_facts(gpu.fracgpu("run", "--partition", "team", "--", clients.dlopen, "alloc-until-oom", 64).stdout)
    assert facts["blocks"] == str((QUOTA - gpu.context) // (64 * MiB))   # all of it back, but its own context
    assert time.monotonic() - killed < 5   # the process start dominates; the reclaim itself is immediate


def test_private_partitions_are_separate_and_vanish_with_their_job(clients, gpu):
    a = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 200, 60)
    try:
        assert a.stdout.readline().strip() == "holding 200"
        # Another job has its own quota, and the device really has the first job's memory in use.
        facts = parse_facts(gpu.fracgpu("run", "--memory", "512MiB", "--", clients.lcuda, "info").stdout)
        assert facts["meminfo_total"] == str(512 * MiB)
        assert facts["meminfo_free"] == str(512 * MiB - gpu.context)   # less only its own context
        (u,) = usage_of(gpu)
        assert [(p["name"], p["used"]) for p in u["partitions"]] == [(f"run-{a.pid}", 200 * MiB + gpu.context)]
        command = command_pid(a)
        assert u["processes"][0]["pid"] == command
    finally:
        a.kill()
        a.wait(timeout=10)
    wait_gone(command)   # the kernel kills it as its fracgpu run dies
    (u,) = usage_of(gpu)
    assert u["partitions"] == [] and u["processes"] == []


CONTEXT_JOB = """
import ctypes
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev = ctypes.c_int()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
def free_now():
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == 0
    return f.value
ctx, p = ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
print("ctx_free", free_now())
assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(100 << 20)) == 0
h = ctypes.c_uint64()
print("after_alloc", free_now())
assert cuda.cuCtxDestroy_v2(ctx) == 0                 # drops its 100 MiB
prim = ctypes.c_void_p()
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(prim), dev) == 0
assert cuda.cuCtxSetCurrent(prim) == 0
print("after_destroy", free_now())
assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(50 << 20)) == 0
assert cuda.cuDevicePrimaryCtxReset_v2(dev) == 0       # drops its 50 MiB
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(prim), dev) == 0
assert cuda.cuCtxSetCurrent(prim) == 0
print("after_reset", free_now())
# Physical memory (VMM): charged at cuMemCreate, not again at cuMemMap.
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("loc_type", ctypes.c_int),
                ("loc_id", ctypes.c_int), ("win32", ctypes.c_void_p), ("compression", ctypes.c_ubyte),
                ("gpuDirect", ctypes.c_ubyte), ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]
prop = Prop(type=1, loc_type=1, loc_id=0)
assert cuda.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(64 << 20), ctypes.byref(prop), ctypes.c_ulonglong(0)) == 0
va = ctypes.c_uint64()
assert cuda.cuMemAddressReserve(ctypes.byref(va), ctypes.c_size_t(64 << 20), ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_ulonglong(0)) == 0
assert cuda.cuMemMap(va, ctypes.c_size_t(64 << 20), ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)) == 0
print("after_create_map", free_now())
assert cuda.cuMemUnmap(va, ctypes.c_size_t(64 << 20)) == 0
assert cuda.cuMemRelease(h) == 0
print("after_release", free_now())
"""


def test_memory_released_with_contexts_and_vmm_paths(gpu):
    env = {"FRACGPU_CONTEXT_MEMORY": "16MiB"}
    facts = parse_facts(gpu.fracgpu("run", "--memory", "256MiB", "--", sys.executable, "-c", CONTEXT_JOB,
                                    env=env).stdout)
    assert facts["ctx_free"] == str(240 * MiB)           # the context's own reservation is charged
    assert facts["after_alloc"] == str(140 * MiB)
    assert facts["after_destroy"] == str(240 * MiB)      # created context gone, primary one holds 16 MiB
    assert facts["after_reset"] == str(240 * MiB)
    assert facts["after_create_map"] == str(176 * MiB)
    assert facts["after_release"] == str(240 * MiB)


def test_oom_wait_blocks_until_memory_frees(clients, gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    holder = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", clients.lcuda, "hold", 200, 1)
    assert holder.stdout.readline().strip() == "holding 200"
    start = time.monotonic()
    facts = parse_facts(gpu.fracgpu("run", "--partition", "team", "--", clients.lcuda, "alloc-until-oom", 64, 3,
                                    env={"FRACGPU_OOM_WAIT": "20"}).stdout)
    assert facts["blocks"] == "3"           # waited for the holder to exit instead of failing
    assert time.monotonic() - start < 15
    holder.wait(timeout=10)


@pytest.mark.parametrize("env, message", [
    ({"FRACGPU_PARTITION": "nosuch"}, "partition 'nosuch' does not exist"),
    ({"FRACGPU_PARTITION": "bad name!"}, "invalid partition name"),
    ({"FRACGPU_PARTITION": "p", "FRACGPU_MEMORY": "lots"}, "FRACGPU_MEMORY: invalid size 'lots'"),
    ({"FRACGPU_PARTITION": "p", "FRACGPU_MEMORY": "2GiB"}, "is above the 1GiB of GPU 0"),
    ({"FRACGPU_PARTITION": "p", "FRACGPU_MEMORY": "1GiB", "FRACGPU_OOM_WAIT": "soon"}, "FRACGPU_OOM_WAIT: invalid seconds 'soon'"),
    ({"FRACGPU_PARTITION": "p", "FRACGPU_MEMORY": "1GiB", "FRACGPU_RECONCILE_INTERVAL": "-1"},
     "FRACGPU_RECONCILE_INTERVAL: invalid seconds '-1': it is negative"),
])
@pytest.mark.fault('Invalid `FRACGPU_*` variables in a job',
                   'CUDA is refused in the job with the reason on stderr; it never runs unlimited')
def test_the_shim_refuses_cuda_rather_than_run_without_limits(clients, gpu, shim, env, message):
    result = gpu.run(clients.lcuda, "info", check=False, env={"LD_PRELOAD": shim, **env})
    assert result.returncode == 1
    assert "error p_cuInit(0)" in result.stdout
    assert message in result.stderr


@pytest.mark.fault('A state file damaged under a running shim',
                   'CUDA refused with the reason; never unlimited')
def test_a_damaged_state_file_refuses_cuda(clients, gpu, shim):
    env = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_MEMORY": "256MiB"}
    assert gpu.facts(clients.lcuda, "info", env=env)["total_mem"] == str(QUOTA)
    (state,) = gpu.state_dir.glob("gpu-*.state")
    state.write_bytes(b"\0" * 4096)
    result = gpu.run(clients.lcuda, "info", check=False, env=env)
    assert result.returncode == 1
    assert "not a fracgpu state file" in result.stderr
    gpu.state_dir.chmod(0o777)
    result = gpu.run(clients.lcuda, "info", check=False, env=env)
    assert "unsafe permissions" in result.stderr
    gpu.state_dir.chmod(0o700)


def test_without_a_partition_the_shim_passes_everything_through(clients, gpu, kernels, shim):
    env = {"LD_PRELOAD": shim}
    assert gpu.facts(clients.dlopen, "info", env=env)["total_mem"] == str(GiB)
    # The device less the context's own reservation, which nobody charges here.
    assert gpu.facts(clients.lcuda, "alloc-until-oom", 64, env=env)["blocks"] == str((GiB - gpu.context) // (64 * MiB))
    assert gpu.facts(clients.dlopen, "fill", 1000, 7, kernels, env=env)["wrong"] == "0"
    assert list(gpu.state_dir.glob("*")) == []


def test_without_the_real_driver_the_shim_says_why(clients, gpu, shim):
    result = gpu.run(clients.lcuda, "info", check=False,
                     env={"LD_PRELOAD": shim, "FRACGPU_REAL_LIBCUDA": "/nonexistent/libcuda.so.1"})
    assert result.returncode == 1
    # cuGetErrorName still answers, from the shim's own table.
    assert "error p_cuInit(0) CUDA_ERROR_NO_DEVICE" in result.stdout
    assert "FRACGPU_REAL_LIBCUDA='/nonexistent/libcuda.so.1' cannot be read" in result.stderr
    result = gpu.run(clients.lcuda, "info", check=False, env={"LD_PRELOAD": shim, "FRACGPU_REAL_LIBCUDA": shim})
    assert "is fracgpu's own shim, not the real CUDA driver" in result.stderr


FORK_JOB = """
import ctypes, os, sys, fracgpu
fracgpu.init(memory="256MiB")
cuda = ctypes.CDLL("libcuda.so.1")

def start():
    assert cuda.cuInit(0) == 0
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    assert cuda.cuCtxSetCurrent(ctx) == 0

def blocks(size):
    n, p = 0, ctypes.c_uint64()
    while cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size)) == 0:
        n += 1
    return n

def free_now():
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == 0
    return f.value

# A worker forked before CUDA starts here (a DataLoader-style fork) joins the partition on
# its own cuInit and is limited with the rest of the job.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    start()
    p = ctypes.c_uint64()
    n = blocks(32 << 20)
    os.write(w, str(n).encode())
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
print("child_blocks", os.read(r, 100).decode())
start()
print("parent_free", free_now())              # the exited child's memory is back
p = ctypes.c_uint64()
assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(100 << 20)) == 0
# A child forked after CUDA started here exits normally (atexit handlers run):
# it must not take the parent's memory off the books.
pid = os.fork()
if pid == 0:
    sys.exit(0)
os.waitpid(pid, 0)
print("parent_free_after_child", free_now())
print("parent_blocks", blocks(32 << 20))
"""


def test_forked_children_are_limited_and_leave_the_parent_intact(gpu):
    facts = parse_facts(gpu.python(FORK_JOB).stdout)
    # Each process's context is inside the quota: the child had the quota less its own context.
    assert facts["child_blocks"] == str((256 * MiB - gpu.context) // (32 * MiB))
    assert facts["parent_free"] == str(256 * MiB - gpu.context)
    assert facts["parent_free_after_child"] == str(156 * MiB - gpu.context)
    assert facts["parent_blocks"] == str((156 * MiB - gpu.context) // (32 * MiB))   # what is left, in 32 MiB blocks
