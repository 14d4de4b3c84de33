"""cuCtxSetLimit reserves device memory: the heap, the stack and the printf
FIFO are on the partition's books from the moment the driver reserves them.

The simulated GPU reserves them as a real one does (see the README's
simulated GPU section): a context's own reservation covers the defaults
(8 MiB heap, 1 KiB stack per thread, 1 MiB FIFO); a larger size reserves the
difference at once, the stack for every resident thread (SMs x 2048).
"""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import (BINDINGS_PRELUDE, CTYPES_PRELUDE, HOW_JOBS_RUN, GiB, MiB, kill_and_read_books,
                                  parse_facts, partition_books, python_job)

DEFAULT_HEAP = 8 * MiB
SMS = 132                       # the simulated GPU's default
RESIDENT_THREADS = SMS * 2048   # SMs x max threads per SM, as on Hopper


@pytest.fixture
def gpu2(make_gpu):
    """A 2 GiB simulated GPU: a 1 GiB quota is then the job's limit, not the device's."""
    return make_gpu(memory=2 * GiB)


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_a_heap_is_charged_and_the_job_gets_only_the_rest(clients, gpu2, kind):
    client = getattr(clients, kind)
    out = gpu2.fracgpu("run", "--memory", "1GiB", "--", client, "set-limit", "heap", 512 * MiB, 64).stdout
    facts = parse_facts(out)
    assert facts["result"] == "CUDA_SUCCESS" and facts["limit"] == str(512 * MiB)
    # The default heap was the context's already (its measured reservation covers it): 504 MiB more are
    # reserved, on top of the context.
    assert facts["meminfo_free"] == str(GiB - gpu2.context - (512 * MiB - DEFAULT_HEAP))
    assert facts["blocks"] == "8"   # 512 MiB left: 8 blocks of 64 MiB, not 15


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_a_heap_larger_than_the_quota_is_refused(clients, gpu2, kind):
    client = getattr(clients, kind)
    out = gpu2.fracgpu("run", "--memory", "1GiB", "--", client, "set-limit", "heap", 2 * GiB).stdout
    facts = parse_facts(out)
    assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert facts["limit"] == str(DEFAULT_HEAP)                   # the driver was never asked
    assert facts["meminfo_free"] == str(GiB - gpu2.context)      # nothing charged beyond the context


def test_the_stack_is_charged_for_every_resident_thread(clients, gpu2):
    out = gpu2.fracgpu("run", "--memory", "1GiB", "--", clients.dlopen, "set-limit", "stack", 2048).stdout
    facts = parse_facts(out)
    assert facts["result"] == "CUDA_SUCCESS"
    assert facts["meminfo_free"] == str(GiB - gpu2.context - 1024 * RESIDENT_THREADS)   # 264 MiB more
    # 5 KiB per thread takes 4 x 264 MiB beyond the default: more than the quota.
    facts = parse_facts(gpu2.fracgpu("run", "--memory", "1GiB", "--", clients.dlopen, "set-limit", "stack",
                                     5 * 1024).stdout)
    assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY" and facts["limit"] == "1024"


# Through ctypes: grow, shrink, the FIFO, and everything back when the context goes.
CTYPES_LIMITS = CTYPES_PRELUDE + """
HEAP, STACK, FIFO = 2, 0, 1
def free():
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == 0
    return f.value
def set_limit(limit, value):
    return cuda.cuCtxSetLimit(limit, ctypes.c_size_t(value))
own = ctypes.c_void_p()
assert cuda.cuCtxCreate_v2(ctypes.byref(own), 0, dev) == 0
print("start", free())
print("heap_512", set_limit(HEAP, 512 << 20), free())
print("heap_64", set_limit(HEAP, 64 << 20), free())
print("heap_1", set_limit(HEAP, 1 << 20), free())
print("fifo_33", set_limit(FIFO, 33 << 20), free())
print("heap_768", set_limit(HEAP, 768 << 20), free())
print("heap_2048", set_limit(HEAP, 2048 << 20), free())
assert cuda.cuCtxDestroy_v2(own) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
print("destroyed", free())
print("primary_heap", set_limit(HEAP, 256 << 20), free())
assert cuda.cuDevicePrimaryCtxRelease_v2(dev) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
print("released", free())
"""


@pytest.mark.parametrize("how", HOW_JOBS_RUN)
def test_limits_grow_shrink_and_go_with_their_context(gpu2, how):
    out = python_job(gpu2, how, CTYPES_LIMITS, "1GiB")
    facts = {k: v.split() for k, v in parse_facts(out).items()}
    # Two contexts (the primary and its own) until its own is destroyed; each one's measured reservation
    # covers its default limits, so only the growth beyond them is charged on top.
    two = GiB - 2 * gpu2.context
    one = GiB - gpu2.context
    assert facts["start"] == [str(two)]
    assert facts["heap_512"] == ["0", str(two - 504 * MiB)]
    assert facts["heap_64"] == ["0", str(two - 56 * MiB)]                # shrinking gives back
    assert facts["heap_1"] == ["0", str(two)]                            # down to the default, no further
    assert facts["fifo_33"] == ["0", str(two - 32 * MiB)]                # the FIFO beyond its 1 MiB
    assert facts["heap_768"] == ["0", str(two - 32 * MiB - 760 * MiB)]
    assert facts["heap_2048"] == ["2", facts["heap_768"][1]]             # refused, nothing changed
    assert facts["destroyed"] == [str(one)]                              # cuCtxDestroy gives it all back
    assert facts["primary_heap"] == ["0", str(one - 248 * MiB)]
    assert facts["released"] == [str(one)]                               # so does the primary's last release


BINDINGS_LIMITS = BINDINGS_PRELUDE + """
err, = cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_MALLOC_HEAP_SIZE, 2 << 30)
print("too_big", int(err))
ck(cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_MALLOC_HEAP_SIZE, 512 << 20))
print("free", ck(cu.cuMemGetInfo())[0])
n = 0
while cu.cuMemAlloc(64 << 20)[0] == cu.CUresult.CUDA_SUCCESS:
    n += 1
print("blocks", n)
"""


def test_cuda_bindings_jobs_have_their_heap_charged(gpu2):
    facts = parse_facts(gpu2.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", BINDINGS_LIMITS).stdout)
    assert facts == {"too_big": "2", "free": str(GiB - gpu2.context - 504 * MiB), "blocks": "8"}


def test_the_simulated_gpu_reserves_what_a_limit_takes(clients, gpu2):
    """Without the shim: the device itself shows the reservation (cuMemGetInfo and NVML's per-process figure)."""
    facts = gpu2.facts(clients.lcuda, "set-limit", "heap", 512 * MiB)
    assert facts["meminfo_free"] == str(2 * GiB - gpu2.context - 504 * MiB)
    facts = gpu2.facts(clients.lcuda, "set-limit", "heap", 3 * GiB)
    assert facts["result"] == "CUDA_ERROR_OUT_OF_MEMORY" and facts["limit"] == str(DEFAULT_HEAP)


# NVML's used memory of device 0: on the simulated GPU, the device's own accounting.
NVML_USED = """import ctypes
nvml = ctypes.CDLL('libnvidia-ml.so.1')
assert nvml.nvmlInit_v2() == 0
h = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
class Info(ctypes.Structure):
    _fields_ = [('total', ctypes.c_ulonglong), ('free', ctypes.c_ulonglong), ('used', ctypes.c_ulonglong)]
i = Info()
assert nvml.nvmlDeviceGetMemoryInfo(h, ctypes.byref(i)) == 0
print(i.used)
"""


@pytest.mark.fault("A process SIGKILLed while holding a device heap set with cuCtxSetLimit",
                   "the heap is back on its partition's books within 1 s")
def test_a_killed_process_gives_its_heap_back_within_a_second(clients, gpu2):
    gpu2.fracgpu("partition", "create", "team", "--memory", "1GiB")
    holder = gpu2.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                        clients.lcuda, "set-limit", "heap", 512 * MiB, 0, 60)
    try:
        assert holder.stdout.readline().strip() == "result CUDA_SUCCESS"
        # The heap beyond its default and the context, once each: the books and the device agree.
        assert partition_books(gpu2, "team")["used"] == gpu2.context + 504 * MiB
        assert int(gpu2.python(NVML_USED).stdout) == gpu2.context + 504 * MiB   # the simulated device holds it too
    finally:
        team = kill_and_read_books(gpu2, holder, "team")
    assert team["used"] == 0, team
