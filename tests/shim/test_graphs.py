"""Graph memory on the books: a CUDA graph's allocation nodes (cuGraphAddMemAllocNode,
or cuMemAllocAsync captured from a stream) are charged when the driver reserves
their memory (at upload or first launch, not at instantiation), stay charged
while the device's graph memory pool holds them (across launches, and after the
graph is destroyed), and are given back at cuDeviceGraphMemTrim. A graph whose
memory does not fit the quota is refused with CUDA_ERROR_OUT_OF_MEMORY before
it runs.

The simulated GPU reserves graph memory as the driver does (tests/sim/test_sim_graphs.py).
"""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import (BINDINGS_PRELUDE, CTYPES_PRELUDE, GRAPH_CTYPES, HOW_JOBS_RUN, GiB, MiB,
                                  kill_and_read_books, parse_facts, partition_books, python_job)


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_captured_graph_memory_is_charged_from_launch_until_trim(clients, make_gpu, kind):
    gpu = make_gpu(memory=2 * GiB)
    out = gpu.fracgpu("run", "--memory", "1GiB", "--", getattr(clients, kind), "graph-mem", 256).stdout
    usable = GiB - gpu.context   # the quota less the job's context
    assert parse_facts(out) == {
        "instantiated_reserved": "0", "instantiated_free": str(usable),   # capture and instantiate: nothing
        "launch": "CUDA_SUCCESS",
        "launched_reserved": str(256 * MiB), "launched_free": str(usable - 256 * MiB),
        "destroyed_reserved": str(256 * MiB), "destroyed_free": str(usable - 256 * MiB),
        "trimmed_reserved": "0", "trimmed_free": str(usable),
    }


QUOTA_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
usable = meminfo_free()   # the quota less the context
big, _ = graph_with_memory(1 << 30)
rc, big_exe = instantiate(big)
print("instantiate_big", rc, usable - meminfo_free())
print("launch_big", launch(big_exe), graph_attr("reserved"))
print("upload_big", cuda.cuGraphUpload(big_exe, None), graph_attr("reserved"))
small, _ = graph_with_memory(256 << 20, 256 << 20)
rc, exe = instantiate(small)
print("launches", launch(exe), launch(exe), usable - meminfo_free())
p = ctypes.c_uint64()
print("alloc", cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(768 << 20)))
assert cuda.cuGraphExecDestroy(exe) == 0
print("destroyed", usable - meminfo_free())
trim()
print("trimmed", usable - meminfo_free(), graph_attr("reserved"))
print("alloc_after_trim", cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(768 << 20)))
print("launch_big_again", launch(big_exe), graph_attr("reserved"))
class InstantiateParams(ctypes.Structure):   # CUDA_GRAPH_INSTANTIATE_PARAMS
    _fields_ = [("flags", ctypes.c_uint64), ("uploadStream", ctypes.c_void_p), ("errNode", ctypes.c_void_p),
                ("result", ctypes.c_int)]
upload = InstantiateParams(flags=2)   # CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD: the memory is taken at instantiation
exe = ctypes.c_void_p()
graph, _ = graph_with_memory(128 << 20)
print("instantiate_upload", cuda.cuGraphInstantiateWithParams(ctypes.byref(exe), graph, ctypes.byref(upload)),
      graph_attr("reserved"), usable - meminfo_free())
graph, _ = graph_with_memory(1 << 30)
print("instantiate_upload_big", cuda.cuGraphInstantiateWithParams(ctypes.byref(exe), graph, ctypes.byref(upload)),
      graph_attr("reserved"))
"""


@pytest.mark.parametrize("how", HOW_JOBS_RUN)
def test_a_graph_whose_memory_exceeds_the_quota_is_refused_before_it_runs(make_gpu, how):
    gpu = make_gpu(memory=4 * GiB)   # the device has room: the quota refuses
    facts = parse_facts(python_job(gpu, how, QUOTA_JOB, "1GiB"))
    assert facts == {
        "instantiate_big": "0 0",
        "launch_big": "2 0",                  # CUDA_ERROR_OUT_OF_MEMORY, the driver reserved nothing
        "upload_big": "2 0",
        "launches": f"0 0 {512 * MiB}",       # the second launch reuses the first one's memory
        "alloc": "2",                         # graph memory counts against the quota
        "destroyed": str(512 * MiB),          # the device's graph pool keeps it
        "trimmed": "0 0",
        "alloc_after_trim": "0",
        "launch_big_again": "2 0",
        "instantiate_upload": f"0 {128 * MiB} {(768 + 128) * MiB}",
        "instantiate_upload_big": f"2 {128 * MiB}",
    }


REUSE_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
usable = meminfo_free()
graph, _ = graph_with_memory(512 << 20)
rc, exe = instantiate(graph)
print("first", launch(exe))
assert cuda.cuGraphExecDestroy(exe) == 0   # its memory stays in the device's graph pool
p = ctypes.c_uint64()
print("alloc", cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(400 << 20)))
graph, _ = graph_with_memory(256 << 20)
rc, exe = instantiate(graph)
print("second", launch(exe), graph_attr("reserved"), usable - meminfo_free())
"""


def test_a_graph_that_fits_in_what_the_graph_pool_holds_takes_nothing_more(gpu):
    """The quota has about 100 MiB left, but the pool already holds what the second graph needs."""
    out = gpu.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", REUSE_JOB).stdout
    assert parse_facts(out) == {"first": "0", "alloc": "0", "second": f"0 {512 * MiB} {(512 + 400) * MiB}"}


BINDINGS_GRAPH = BINDINGS_PRELUDE + """
stream = ck(cu.cuStreamCreate(0))
held = ck(cu.cuMemAlloc(600 << 20))
ck(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
p = ck(cu.cuMemAllocAsync(512 << 20, stream))
ck(cu.cuMemsetD8Async(p, 7, 4096, stream))
ck(cu.cuMemFreeAsync(p, stream))
graph = ck(cu.cuStreamEndCapture(stream))
exe = ck(cu.cuGraphInstantiate(graph, 0))
print("captured", ck(cu.cuMemGetInfo())[0])
print("refused", int(cu.cuGraphLaunch(exe, stream)[0]), int(cu.cuGraphUpload(exe, stream)[0]))
ck(cu.cuMemFree(held))
ck(cu.cuGraphUpload(exe, stream))
print("uploaded", ck(cu.cuMemGetInfo())[0])
ck(cu.cuGraphLaunch(exe, stream))
ck(cu.cuStreamSynchronize(stream))
reserved = cu.CUgraphMem_attribute.CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT
print("reserved", int(ck(cu.cuDeviceGetGraphMemAttribute(dev, reserved))))
ck(cu.cuGraphExecDestroy(exe))
ck(cu.cuDeviceGraphMemTrim(dev))
print("trimmed", ck(cu.cuMemGetInfo())[0])
"""


def test_cuda_bindings_captured_graph_memory_is_held_to_the_quota(make_gpu):
    gpu = make_gpu(memory=4 * GiB)
    out = gpu.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", BINDINGS_GRAPH).stdout
    usable = GiB - gpu.context
    assert parse_facts(out) == {
        "captured": str(usable - 600 * MiB),
        "refused": "2 2",                     # 600 + 512 MiB do not fit 1 GiB
        "uploaded": str(usable - 512 * MiB),
        "reserved": str(512 * MiB),
        "trimmed": str(usable),
    }


@pytest.mark.fault("A process SIGKILLed while its CUDA graphs hold graph memory",
                   "the graph memory is back on its partition's books within 1 s")
def test_a_killed_process_gives_its_graph_memory_back_within_a_second(clients, make_gpu):
    gpu = make_gpu(memory=2 * GiB)
    gpu.fracgpu("partition", "create", "team", "--memory", "1GiB")
    holder = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                       clients.lcuda, "graph-mem", 384, 60)
    try:
        lines = [holder.stdout.readline() for _ in range(5)]
        assert parse_facts("".join(lines))["launched_reserved"] == str(384 * MiB), lines
        assert partition_books(gpu, "team")["used"] == gpu.context + 384 * MiB
    finally:
        team = kill_and_read_books(gpu, holder, "team")
    assert team["used"] == 0, team
