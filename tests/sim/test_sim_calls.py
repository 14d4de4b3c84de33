"""The simulated driver counts the driver calls each process makes, by kind,
so a benchmark can say what a launch path costs in calls (events recorded,
queries, synchronisations) and not only in time."""

from __future__ import annotations

import sys

from tests.support.simgpu import CTYPES_PRELUDE, GRAPH_CTYPES, parse_facts

KINDS = ["launch", "graph_launch", "event_record", "event_query", "event_synchronize", "event_elapsed_time",
         "stream_synchronize", "stream_query", "stream_wait_event", "ctx_synchronize"]

CALLS_JOB = CTYPES_PRELUDE + GRAPH_CTYPES + """
import sys
def counts():
    n = cuda.fracgpu_sim_call_counts(None, None, 0)
    values, names = (ctypes.c_ulonglong * n)(), (ctypes.c_char_p * n)()
    assert cuda.fracgpu_sim_call_counts(values, names, n) == n
    return {name.decode(): value for name, value in zip(names, values)}
before = counts()
module, spin = ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuModuleLoad(ctypes.byref(module), sys.argv[1].encode()) == 0
assert cuda.cuModuleGetFunction(ctypes.byref(spin), module, b"fracgpu_spin") == 0
ns = ctypes.c_ulonglong(1000)
args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
stream, timed, untimed = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuStreamCreate(ctypes.byref(stream), 0) == 0
assert cuda.cuEventCreate(ctypes.byref(timed), 0) == 0
assert cuda.cuEventCreate(ctypes.byref(untimed), 2) == 0   # CU_EVENT_DISABLE_TIMING
for _ in range(6):
    assert cuda.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args, None) == 0
    assert cuda.cuEventRecord(timed, stream) == 0
assert cuda.cuEventRecordWithFlags(untimed, stream, 0) == 0
for _ in range(5):
    cuda.cuEventQuery(untimed)
assert cuda.cuEventQuery(None) != 0   # a call that fails is a call made
for _ in range(3):
    assert cuda.cuEventSynchronize(timed) == 0
ms = ctypes.c_float()
for _ in range(2):
    assert cuda.cuEventElapsedTime(ctypes.byref(ms), timed, timed) == 0
assert cuda.cuStreamWaitEvent(None, timed, 0) == 0
cuda.cuStreamQuery(stream)
assert cuda.cuStreamSynchronize(stream) == 0
graph, _ = graph_with_memory(2 << 20)
rc, exe = instantiate(graph)
assert rc == 0 and launch(exe) == 0   # a graph launch and a cuCtxSynchronize
print("before", *(f"{k}={v}" for k, v in before.items()))
print("after", *(f"{k}={v}" for k, v in counts().items()))
"""


def counted(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (word.split("=") for word in line.split())}


def test_the_driver_counts_each_kind_of_call_a_process_makes(gpu, kernels):
    result = gpu.run(sys.executable, "-c", CALLS_JOB, kernels, env={"FRACGPU_SIM_CALL_COUNTS": "1"})
    facts = parse_facts(result.stdout)
    assert counted(facts["before"]) == dict.fromkeys(KINDS, 0)
    expected = {"launch": 6, "graph_launch": 1, "event_record": 7, "event_query": 6, "event_synchronize": 3,
                "event_elapsed_time": 2, "stream_synchronize": 1, "stream_query": 1, "stream_wait_event": 1,
                "ctx_synchronize": 1}
    assert counted(facts["after"]) == expected
    # Asked to, the process also says so at exit, on stderr.
    last = [line for line in result.stderr.splitlines() if "calls " in line]
    assert len(last) == 1, result.stderr
    assert counted(last[0].split("calls ", 1)[1]) == expected


def test_the_counts_are_printed_only_when_asked(gpu, kernels):
    result = gpu.run(sys.executable, "-c", CALLS_JOB, kernels)
    assert "calls " not in result.stderr
