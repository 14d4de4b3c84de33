"""The simulated GPU runs real driver clients: C (-lcuda and dlopen), ctypes,
cuda-bindings and numba-cuda, and behaves as one GPU shared by processes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fracgpu import sim
from tests.support.simgpu import BINDINGS_CHECK, GiB, MiB, parse_facts

CLIENT_KINDS = ["lcuda", "dlopen"]


def client(clients, kind):
    return getattr(clients, kind)


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_c_client_sees_the_configured_device(clients, make_gpu, kind):
    gpu = make_gpu(memory=3 * GiB, name="test board", sms=66)
    facts = gpu.facts(client(clients, kind), "info")
    assert facts == {
        "devices": "1",
        "name": "test board",
        "total_mem": str(3 * GiB),
        "meminfo_free": str(3 * GiB - gpu.context),   # its own context holds the rest
        "meminfo_total": str(3 * GiB),
    }


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_allocations_stop_at_device_memory_with_out_of_memory(clients, gpu, kind):
    facts = gpu.facts(client(clients, kind), "alloc-until-oom", 64)
    blocks = (GiB - gpu.context) // (64 * MiB)   # all but its context's reservation
    assert facts == {"blocks": str(blocks), "bytes": str(blocks * 64 * MiB), "result": "CUDA_ERROR_OUT_OF_MEMORY"}


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_fill_kernel_writes_values_that_copy_back(clients, gpu, kernels, kind):
    facts = gpu.facts(client(clients, kind), "fill", 1_000_003, "0xdeadbeef", kernels)
    assert facts == {"filled": "1000003", "wrong": "0", "first": "0xdeadbeef", "last": "0xdeadbeef"}


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_spin_of_10ms_measures_10ms_with_events(clients, gpu, kernels, kind):
    facts = gpu.facts(client(clients, kind), "spin", 10, kernels)
    assert 9.9 <= float(facts["event_ms"]) <= 11.0   # the host's gap before the launch counts too
    assert float(facts["wall_ms"]) >= 9.9   # the host really waits for the device


def test_a_c_client_runs_in_a_shell_that_evaluated_fracgpu_sim_env(clients, kernels, tmp_path):
    """eval the exports of `fracgpu sim env`, then a C client allocates, fills and spins on the 1 GiB GPU."""
    script = textwrap.dedent(f"""
        set -e
        eval "$({shlex.join([sys.executable, '-m', 'fracgpu'])} sim env --memory 1GiB --dir {tmp_path}/sim)"
        {clients.lcuda} alloc-until-oom 64
        {clients.lcuda} fill 4096 0x12345678 {kernels}
        {clients.lcuda} spin 10 {kernels}
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACGPU_SIM_") and k != "LD_LIBRARY_PATH"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    facts = parse_facts(out.stdout)
    context = GiB // sim.CONTEXT_SHARE   # what `sim env --memory 1GiB` makes each context reserve
    assert facts["blocks"] == str((GiB - context) // (64 * MiB)) and facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert facts["wrong"] == "0" and facts["last"] == "0x12345678"
    assert 9.9 <= float(facts["event_ms"]) <= 11.0   # the host's gap before the launch counts too


def test_two_processes_share_the_device_timeline(clients, gpu, kernels):
    """Back-to-back 1 ms spins: two processes together take twice as long as one alone."""
    n = 150
    alone = float(gpu.facts(clients.lcuda, "spins", n, 1, kernels)["wall_ms"])
    assert n * 0.99 <= alone <= n * 1.25
    start = (time.monotonic() + 0.5) * 1000   # both begin launching at the same moment
    procs = [gpu.popen(c, "spins", n, 1, kernels, f"{start:.3f}") for c in clients]
    walls = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        walls.append(float(parse_facts(out)["wall_ms"]))
    for wall in walls:
        assert 1.8 <= wall / alone <= 2.3, (alone, walls)


def test_memory_is_global_across_processes_and_freed_at_exit(clients, gpu):
    holder = gpu.popen(clients.lcuda, "hold", 300, 30)
    try:
        assert holder.stdout.readline().strip() == "holding 300"
        facts = gpu.facts(clients.dlopen, "info")
        assert int(facts["meminfo_free"]) == GiB - 300 * MiB - 2 * gpu.context   # the holder's and its own
        assert int(facts["meminfo_total"]) == GiB
        assert gpu.facts(clients.dlopen, "alloc-until-oom", 100)["blocks"] == str(
            (GiB - 300 * MiB - 2 * gpu.context) // (100 * MiB))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    # A killed process's memory returns to the device as soon as another process looks.
    assert gpu.facts(clients.dlopen, "info")["meminfo_free"] == str(GiB - gpu.context)


def test_separate_sim_dirs_are_separate_gpus(clients, make_gpu):
    a, b = make_gpu(memory=GiB), make_gpu(memory=GiB)
    holder = a.popen(clients.lcuda, "hold", 512, 30)
    try:
        assert holder.stdout.readline().strip() == "holding 512"
        assert a.facts(clients.lcuda, "info")["meminfo_free"] == str(GiB - 512 * MiB - 2 * a.context)
        assert b.facts(clients.lcuda, "info")["meminfo_free"] == str(GiB - b.context)
    finally:
        holder.kill()
        holder.wait(timeout=10)


CTYPES_CLIENT = """
import ctypes, struct, sys
cuda = ctypes.CDLL("libcuda.so.1")
def ck(rc):
    if rc != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(rc, ctypes.byref(name))
        raise SystemExit(f"error {name.value.decode()}")
ck(cuda.cuInit(0))
dev = ctypes.c_int()
ck(cuda.cuDeviceGet(ctypes.byref(dev), 0))
ctx = ctypes.c_void_p()
ck(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
ck(cuda.cuCtxSetCurrent(ctx))
free, total = ctypes.c_size_t(), ctypes.c_size_t()
ck(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
print("meminfo", free.value, total.value)
ptr = ctypes.c_uint64()
ck(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(4096)))
ck(cuda.cuMemsetD32_v2(ptr, ctypes.c_uint(0xabcd), ctypes.c_size_t(1024)))
buf = (ctypes.c_uint * 1024)()
ck(cuda.cuMemcpyDtoH_v2(buf, ptr, ctypes.c_size_t(4096)))
print("memset", all(v == 0xabcd for v in buf))
mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
ck(cuda.cuModuleLoad(ctypes.byref(mod), sys.argv[1].encode()))
ck(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"fracgpu_spin"))
start, end = ctypes.c_void_p(), ctypes.c_void_p()
ck(cuda.cuEventCreate(ctypes.byref(start), 0))
ck(cuda.cuEventCreate(ctypes.byref(end), 0))
ns = ctypes.c_ulonglong(5_000_000)
args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
ck(cuda.cuEventRecord(start, None))
ck(cuda.cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, None, args, None))
ck(cuda.cuEventRecord(end, None))
ck(cuda.cuEventSynchronize(end))
ms = ctypes.c_float()
ck(cuda.cuEventElapsedTime(ctypes.byref(ms), start, end))
print("spin_ms", ms.value)
ck(cuda.cuMemFree_v2(ptr))
"""


def test_ctypes_client(gpu, kernels):
    facts = parse_facts(gpu.run(sys.executable, "-c", CTYPES_CLIENT, kernels).stdout)
    assert facts["meminfo"] == f"{GiB - gpu.context} {GiB}"   # its context holds the rest
    assert facts["memset"] == "True"
    assert 4.9 <= float(facts["spin_ms"]) <= 6.0


CUDA_BINDINGS_CLIENT = BINDINGS_CHECK + """
ck(cu.cuInit(0))
print("driver_version", ck(cu.cuDriverGetVersion()))
dev = ck(cu.cuDeviceGet(0))
print("name", ck(cu.cuDeviceGetName(64, dev)).split(b"\\0")[0].decode())
major = ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
sms = ck(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev))
print("cc_major", major)
print("sms", sms)
ctx = ck(cu.cuCtxCreate(None, 0, dev))
free, total = ck(cu.cuMemGetInfo())
print("meminfo", free, total)
print("total_mem", ck(cu.cuDeviceTotalMem(dev)))
stream = ck(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
n = 100_000
dptr = ck(cu.cuMemAllocAsync(n * 4, stream))
module = ck(cu.cuModuleLoad(sys.argv[1].encode()))
fill = ck(cu.cuModuleGetFunction(module, b"fracgpu_fill"))
spin = ck(cu.cuModuleGetFunction(module, b"fracgpu_spin"))
args = [np.array([int(dptr)], np.uint64), np.array([0x5eed], np.uint32), np.array([n], np.uint64)]
ptrs = np.array([a.ctypes.data for a in args], np.uint64)
ck(cu.cuLaunchKernel(fill, 8, 1, 1, 128, 1, 1, 0, stream, ptrs.ctypes.data, 0))
host = np.zeros(n, np.uint32)
ck(cu.cuMemcpyDtoHAsync(host.ctypes.data, dptr, n * 4, stream))
start, end = ck(cu.cuEventCreate(0)), ck(cu.cuEventCreate(0))
ns = np.array([2_000_000], np.uint64)
spin_args = np.array([ns.ctypes.data], np.uint64)
ck(cu.cuEventRecord(start, stream))
ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, spin_args.ctypes.data, 0))
ck(cu.cuEventRecord(end, stream))
ck(cu.cuMemFreeAsync(dptr, stream))
ck(cu.cuStreamSynchronize(stream))
print("filled", bool((host == 0x5eed).all()))
print("spin_ms", ck(cu.cuEventElapsedTime(start, end)))
ck(cu.cuStreamDestroy(stream))
ck(cu.cuCtxDestroy(ctx))
"""


def test_cuda_bindings_client(make_gpu, kernels):
    gpu = make_gpu(memory=2 * GiB, sms=78)
    facts = parse_facts(gpu.run(sys.executable, "-c", CUDA_BINDINGS_CLIENT, kernels).stdout)
    assert int(facts["driver_version"]) >= 13000
    assert facts["name"] == "fracgpu simulated GPU"
    assert facts["cc_major"] == "9"
    assert facts["sms"] == "78"
    assert facts["meminfo"] == f"{2 * GiB - gpu.context} {2 * GiB}"   # its context holds the rest
    assert facts["total_mem"] == str(2 * GiB)
    assert facts["filled"] == "True"
    assert 1.9 <= float(facts["spin_ms"]) <= 3.0


NUMBA_CLIENT = """
import numpy as np
from numba import cuda

print("gpus", len(cuda.gpus))
print("name", cuda.get_current_device().name.decode() if isinstance(cuda.get_current_device().name, bytes)
      else cuda.get_current_device().name)
ctx = cuda.current_context()
free0, total = ctx.get_memory_info()
print("free0", free0)
print("total", total)
host = np.arange(1 << 20, dtype=np.float32)
dev = cuda.to_device(host)                       # 4 MiB host -> device
free1, _ = ctx.get_memory_info()
print("used_by_array", free0 - free1)
other = cuda.device_array_like(dev)
other.copy_to_device(dev)                        # device -> device
back = other.copy_to_host()                      # device -> host
print("roundtrip", bool((back == host).all()))
pinned = cuda.pinned_array(16, dtype=np.int64)
pinned[:] = 7
d2 = cuda.to_device(pinned)
print("pinned", int(d2.copy_to_host().sum()))
"""


def test_numba_cuda_client(gpu):
    facts = parse_facts(gpu.python(NUMBA_CLIENT).stdout)
    assert facts["gpus"] == "1"
    assert facts["name"] == "fracgpu simulated GPU"
    assert facts["total"] == str(GiB)
    assert int(facts["free0"]) <= GiB
    assert int(facts["used_by_array"]) == 4 * MiB
    assert facts["roundtrip"] == "True"
    assert facts["pinned"] == "112"
