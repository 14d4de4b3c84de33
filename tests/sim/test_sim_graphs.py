"""The simulated GPU's CUDA graphs: stream capture, memory allocation and free
nodes, and the device's graph memory pool, which reserves memory as the driver
does: nothing at instantiation, the graph's memory at upload or first launch,
kept between launches and after the graph is destroyed, given back by
cuDeviceGraphMemTrim when no graph uses it. Each allocation takes whole 2 MiB
granules. Without the shim: the device's own figures."""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import CTYPES_PRELUDE, GRAPH_CTYPES, GiB, MiB, parse_facts


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_a_captured_allocation_reserves_memory_from_first_launch_until_trim(clients, gpu, kind):
    facts = gpu.facts(getattr(clients, kind), "graph-mem", 64)
    free = GiB - gpu.context
    assert facts == {
        "instantiated_reserved": "0", "instantiated_free": str(free),
        "launch": "CUDA_SUCCESS",
        "launched_reserved": str(64 * MiB), "launched_free": str(free - 64 * MiB),
        # Destroying the graph returns its memory to the graph pool, not to the device.
        "destroyed_reserved": str(64 * MiB), "destroyed_free": str(free - 64 * MiB),
        "trimmed_reserved": "0", "trimmed_free": str(free),
    }


def test_another_process_sees_graph_memory_missing_until_the_holder_dies(clients, gpu):
    holder = gpu.popen(clients.lcuda, "graph-mem", 256, 60)
    try:
        lines = [holder.stdout.readline() for _ in range(5)]
        assert parse_facts("".join(lines))["launched_reserved"] == str(256 * MiB), lines
        other = gpu.facts(clients.dlopen, "info")
        assert other["meminfo_free"] == str(GiB - 2 * gpu.context - 256 * MiB)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert gpu.facts(clients.dlopen, "info")["meminfo_free"] == str(GiB - gpu.context)


NODES_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
graph, _ = graph_with_memory((47 << 20) + 1, 16 << 20)   # 48 + 16 MiB in whole granules
rc, exe = instantiate(graph)
print("instantiated", rc, graph_attr("reserved"))
print("second_instantiation", instantiate(graph)[0])   # one at a time for a graph with memory nodes
assert cuda.cuGraphUpload(exe, None) == 0
print("uploaded", graph_attr("reserved"), graph_attr("used"))
print("launches", launch(exe), launch(exe), graph_attr("reserved"), graph_attr("used"))
trim()   # idle, and everything it allocated is freed: its memory goes
print("trimmed", graph_attr("reserved"), graph_attr("used"), graph_attr("reserved_high"))
print("relaunched", launch(exe), graph_attr("reserved"))
assert cuda.cuGraphExecDestroy(exe) == 0
print("destroyed", graph_attr("reserved"), graph_attr("used"))
zero, bad = ctypes.c_uint64(0), ctypes.c_uint64(5)
print("reset_high", cuda.cuDeviceSetGraphMemAttribute(dev, 3, ctypes.byref(bad)),
      cuda.cuDeviceSetGraphMemAttribute(dev, 1, ctypes.byref(zero)), graph_attr("used_high"))
trim()
print("all_trimmed", graph_attr("reserved"), graph_attr("reserved_high"))
"""


def test_allocation_nodes_take_memory_at_upload_and_keep_it_between_launches(gpu):
    facts = parse_facts(gpu.python(NODES_JOB).stdout)
    mem = str(64 * MiB)
    assert facts == {
        "instantiated": "0 0",
        "second_instantiation": "1",          # CUDA_ERROR_INVALID_VALUE
        "uploaded": f"{mem} {mem}",
        "launches": f"0 0 {mem} {mem}",
        "trimmed": f"0 0 {mem}",
        "relaunched": f"0 {mem}",             # mapped again
        "destroyed": f"{mem} 0",              # back in the pool, still held on the device
        "reset_high": "1 0 0",                # only a reset to 0
        "all_trimmed": f"0 {mem}",
    }


UNFREED_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
graph, (ptr,) = graph_with_memory(32 << 20, free=False)
rc, exe = instantiate(graph)
print("launch", launch(exe))
print("relaunch", cuda.cuGraphLaunch(exe, None))   # its last allocation is not freed yet
trim()
print("kept", graph_attr("reserved"))              # an unfreed allocation is in use
word = ctypes.c_uint32()
assert cuda.cuMemsetD32_v2(ctypes.c_uint64(ptr), 0x5eed, ctypes.c_size_t(1)) == 0
assert cuda.cuMemcpyDtoH_v2(ctypes.byref(word), ctypes.c_uint64(ptr), ctypes.c_size_t(4)) == 0
print("word", hex(word.value))
assert cuda.cuGraphExecDestroy(exe) == 0
assert cuda.cuGraphDestroy(graph) == 0
trim()
print("orphan", graph_attr("reserved"), graph_attr("used"))   # still not freed: still in use
print("free", cuda.cuMemFree_v2(ctypes.c_uint64(ptr)), cuda.cuMemFree_v2(ctypes.c_uint64(ptr)))
trim()
print("freed", graph_attr("reserved"), graph_attr("used"))
big, _ = graph_with_memory(2 << 30)
rc, exe = instantiate(big)
print("too_big", rc, launch(exe), graph_attr("reserved"))   # more than the device has
"""


def test_an_allocation_a_graph_does_not_free_stays_in_use_until_freed(gpu):
    facts = parse_facts(gpu.python(UNFREED_JOB).stdout)
    assert facts == {
        "launch": "0", "relaunch": "1", "kept": str(32 * MiB), "word": "0x5eed",
        "orphan": f"{32 * MiB} {32 * MiB}", "free": "0 1", "freed": "0 0",
        "too_big": "0 2 0",                   # CUDA_ERROR_OUT_OF_MEMORY at launch, nothing reserved
    }


CAPTURE_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
import sys
mod, fill = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuModuleLoad(ctypes.byref(mod), sys.argv[1].encode()) == 0
assert cuda.cuModuleGetFunction(ctypes.byref(fill), mod, b"fracgpu_fill") == 0
stream, status = ctypes.c_void_p(), ctypes.c_int()
assert cuda.cuStreamCreate(ctypes.byref(stream), 1) == 0
def capturing():
    assert cuda.cuStreamIsCapturing(stream, ctypes.byref(status)) == 0
    return status.value
count = 1000
host = (ctypes.c_uint32 * count)()
print("before", capturing())
assert cuda.cuStreamBeginCapture_v2(stream, 0) == 0
print("during", capturing())
ptr = ctypes.c_uint64()
assert cuda.cuMemAllocAsync(ctypes.byref(ptr), ctypes.c_size_t(count * 4), stream) == 0
value, n = ctypes.c_uint32(0xc0ffee), ctypes.c_uint64(count)
args = (ctypes.c_void_p * 3)(ctypes.addressof(ptr), ctypes.addressof(value), ctypes.addressof(n))
assert cuda.cuLaunchKernel(fill, 4, 1, 1, 256, 1, 1, 0, stream, args, None) == 0
assert cuda.cuMemcpyDtoHAsync_v2(host, ptr, ctypes.c_size_t(count * 4), stream) == 0
assert cuda.cuMemFreeAsync(ptr, stream) == 0
print("not_run", host[0], graph_attr("reserved"))   # captured, not run
graph = ctypes.c_void_p()
assert cuda.cuStreamEndCapture(stream, ctypes.byref(graph)) == 0
nodes = ctypes.c_size_t()
assert cuda.cuGraphGetNodes(graph, None, ctypes.byref(nodes)) == 0
print("after", capturing(), nodes.value)
rc, exe = instantiate(graph)
assert cuda.cuGraphLaunch(exe, stream) == 0 and cuda.cuStreamSynchronize(stream) == 0
print("ran", hex(host[0]), hex(host[count - 1]), graph_attr("reserved"))
# A synchronization cannot be captured: it invalidates the capture.
assert cuda.cuStreamBeginCapture_v2(stream, 0) == 0
print("sync", cuda.cuStreamSynchronize(stream), capturing())
print("end", cuda.cuStreamEndCapture(stream, ctypes.byref(graph)), graph.value)
print("legacy", cuda.cuStreamBeginCapture_v2(None, 0))
"""


def test_stream_capture_records_kernels_copies_and_allocations(gpu, kernels):
    facts = parse_facts(gpu.run(sys.executable, "-c", CAPTURE_JOB, kernels).stdout)
    assert facts == {
        "before": "0", "during": "1", "not_run": "0 0",
        "after": "0 4",                       # alloc, kernel, copy, free
        "ran": f"0xc0ffee 0xc0ffee {2 * MiB}",
        "sync": "900 2",                      # CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; invalidated
        "end": "901 None",                    # CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, no graph
        "legacy": "900",                      # the legacy stream cannot be captured
    }


MEMSET_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
class MemsetParams(ctypes.Structure):   # CUDA_MEMSET_NODE_PARAMS
    _fields_ = [("dst", ctypes.c_uint64), ("pitch", ctypes.c_size_t), ("value", ctypes.c_uint),
                ("elementSize", ctypes.c_uint), ("width", ctypes.c_size_t), ("height", ctypes.c_size_t)]
graph, (ptr,) = graph_with_memory(1 << 20, free=False)
alloc, count = (ctypes.c_void_p * 1)(), ctypes.c_size_t(1)
assert cuda.cuGraphGetNodes(graph, alloc, ctypes.byref(count)) == 0
node = ctypes.c_void_p()
params = MemsetParams(dst=ptr, value=0xab, elementSize=1, width=1 << 20, height=1)
assert cuda.cuGraphAddMemsetNode(ctypes.byref(node), graph, alloc, ctypes.c_size_t(1), ctypes.byref(params), ctx) == 0
kind = ctypes.c_int()
assert cuda.cuGraphNodeGetType(node, ctypes.byref(kind)) == 0
rc, exe = instantiate(graph)
print("launch", kind.value, launch(exe))
tail = (ctypes.c_ubyte * 4)()
assert cuda.cuMemcpyDtoH_v2(tail, ctypes.c_uint64(ptr + (1 << 20) - 4), ctypes.c_size_t(4)) == 0
print("tail", *tail)
print("free", cuda.cuMemFreeAsync(ctypes.c_uint64(ptr), None), cuda.cuCtxSynchronize())
trim()
print("trimmed", graph_attr("reserved"))
"""


def test_a_memset_node_writes_a_graph_allocation_that_outlives_the_launch(gpu):
    facts = parse_facts(gpu.python(MEMSET_JOB).stdout)
    assert facts == {"launch": "2 0",         # CU_GRAPH_NODE_TYPE_MEMSET
                     "tail": "171 171 171 171", "free": "0 0", "trimmed": "0"}


RUNNING_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
import sys
mod, spin = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuModuleLoad(ctypes.byref(mod), sys.argv[1].encode()) == 0
assert cuda.cuModuleGetFunction(ctypes.byref(spin), mod, b"fracgpu_spin") == 0
stream, graph, ptr = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuStreamCreate(ctypes.byref(stream), 1) == 0
assert cuda.cuStreamBeginCapture_v2(stream, 2) == 0   # relaxed
assert cuda.cuMemAllocAsync(ctypes.byref(ptr), ctypes.c_size_t(4 << 20), stream) == 0
ns = ctypes.c_ulonglong(300_000_000)
args = (ctypes.c_void_p * 1)(ctypes.addressof(ns))
assert cuda.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args, None) == 0
assert cuda.cuMemFreeAsync(ptr, stream) == 0
assert cuda.cuStreamEndCapture(stream, ctypes.byref(graph)) == 0
rc, exe = instantiate(graph)
assert cuda.cuGraphLaunch(exe, stream) == 0
trim()
print("running", graph_attr("reserved"))   # a graph that is running uses its memory
assert cuda.cuStreamSynchronize(stream) == 0
trim()
print("done", graph_attr("reserved"))
"""


def test_trim_keeps_the_memory_of_a_graph_that_is_running(gpu, kernels):
    facts = parse_facts(gpu.run(sys.executable, "-c", RUNNING_JOB, kernels).stdout)
    assert facts == {"running": str(4 * MiB), "done": "0"}
