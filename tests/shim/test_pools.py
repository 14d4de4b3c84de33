"""Stream-ordered pools keep freed memory up to their release threshold: the
partition's books hold a pool's reserve (what its live allocations use and
what it keeps cached), not only what the job has allocated from it.

The simulated GPU's pools behave as the driver's: a free puts the memory back
in the pool; a synchronize gives back what is beyond the release threshold;
cuMemPoolTrimTo what is beyond the bytes to keep.
"""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import (BINDINGS_PRELUDE, CTYPES_PRELUDE, HOW_JOBS_RUN, GiB, MiB, kill_and_read_books,
                                  parse_facts, partition_books, python_job, run_in_team)


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_memory_a_pool_keeps_at_its_threshold_counts_and_trim_gives_it_back(clients, make_gpu, kind):
    gpu = make_gpu(memory=2 * GiB)
    client = getattr(clients, kind)
    facts = parse_facts(gpu.fracgpu("run", "--memory", "1GiB", "--", client, "pool-keep", 256, 128).stdout)
    assert facts["alloc"] == "CUDA_SUCCESS"
    usable = GiB - gpu.context   # the quota less the job's context
    assert (facts["allocated_reserved"], facts["allocated_free"]) == (str(256 * MiB), str(usable - 256 * MiB))
    # Freed and synchronized: the pool keeps its threshold, and so do the books.
    assert (facts["synced_reserved"], facts["synced_free"]) == (str(128 * MiB), str(usable - 128 * MiB))
    assert (facts["trimmed_reserved"], facts["trimmed_free"]) == ("0", str(usable))


def test_a_pool_with_no_threshold_gives_everything_back_at_synchronize(clients, make_gpu):
    gpu = make_gpu(memory=2 * GiB)
    facts = parse_facts(gpu.fracgpu("run", "--memory", "1GiB", "--", clients.dlopen, "pool-keep", 256, 0).stdout)
    assert (facts["synced_reserved"], facts["synced_free"]) == ("0", str(GiB - gpu.context))


def test_the_simulated_gpu_keeps_pool_memory_until_synchronize_or_trim(clients, make_gpu):
    """Without the shim: the device's own figures."""
    gpu = make_gpu(memory=2 * GiB)
    facts = gpu.facts(clients.lcuda, "pool-keep", 512, 384)
    assert facts["allocated_free"] == str(2 * GiB - gpu.context - 512 * MiB)
    assert facts["synced_free"] == str(2 * GiB - gpu.context - 384 * MiB)
    assert facts["trimmed_free"] == str(2 * GiB - gpu.context)


# ctypes: what a pool keeps stands in the way of other allocations until
# trimmed; and a refusal first looks whether the pools gave memory back.
CTYPES_POOL = CTYPES_PRELUDE + """
THRESHOLD, RESERVED = 4, 5   # CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, _RESERVED_MEM_CURRENT
pool, p, q = ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_uint64()
assert cuda.cuDeviceGetMemPool(ctypes.byref(pool), dev) == 0
def threshold(mib):
    v = ctypes.c_uint64(mib << 20)
    assert cuda.cuMemPoolSetAttribute(pool, THRESHOLD, ctypes.byref(v)) == 0
def cycle(mib):   # allocate, free, synchronize
    assert cuda.cuMemAllocAsync(ctypes.byref(p), ctypes.c_size_t(mib << 20), None) == 0
    assert cuda.cuMemFreeAsync(p, None) == 0
    assert cuda.cuStreamSynchronize(None) == 0
def alloc(mib):
    rc = cuda.cuMemAlloc_v2(ctypes.byref(q), ctypes.c_size_t(mib << 20))
    if rc == 0:
        assert cuda.cuMemFree_v2(q) == 0
    return rc
threshold(1024)
cycle(768)
print("kept", alloc(512))          # the pool keeps 768 MiB: 512 more do not fit
print("reuse", cuda.cuMemAllocAsync(ctypes.byref(p), ctypes.c_size_t(700 << 20), None))   # from the cache
assert cuda.cuMemFreeAsync(p, None) == 0
assert cuda.cuStreamSynchronize(None) == 0
assert cuda.cuMemPoolTrimTo(pool, ctypes.c_size_t(0)) == 0
print("trimmed", alloc(512))
threshold(0)
cycle(768)                         # released at the synchronize, behind the shim's back
print("released", alloc(512))      # the refusal path sees it
"""


@pytest.mark.parametrize("how", HOW_JOBS_RUN)
def test_pool_reserve_stands_in_the_way_until_released(gpu, how):
    out = python_job(gpu, how, CTYPES_POOL, "1GiB")
    assert parse_facts(out) == {"kept": "2", "reuse": "0", "trimmed": "0", "released": "0"}


BINDINGS_POOL = BINDINGS_PRELUDE + """
props = cu.CUmemPoolProps()
props.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
props.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
props.location.id = 0
pool = ck(cu.cuMemPoolCreate(props))
ck(cu.cuMemPoolSetAttribute(pool, cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                            cu.cuuint64_t(512 << 20)))
stream = ck(cu.cuStreamCreate(0))
ptrs = [ck(cu.cuMemAllocFromPoolAsync(128 << 20, pool, stream)) for _ in range(4)]
for p in ptrs:
    ck(cu.cuMemFreeAsync(p, stream))
ck(cu.cuStreamSynchronize(stream))
print("kept", ck(cu.cuMemGetInfo())[0])
print("refused", int(cu.cuMemAlloc(768 << 20)[0]))
live = ck(cu.cuMemAllocFromPoolAsync(128 << 20, pool, stream))
ck(cu.cuMemPoolDestroy(pool))              # the cache goes; the live allocation stays
print("destroyed", ck(cu.cuMemGetInfo())[0])
ck(cu.cuMemFreeAsync(live, stream))
ck(cu.cuStreamSynchronize(stream))
print("freed", ck(cu.cuMemGetInfo())[0])
"""


def test_cuda_bindings_pools_of_their_own(gpu):
    facts = parse_facts(gpu.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", BINDINGS_POOL).stdout)
    usable = GiB - gpu.context   # the quota less the job's context
    assert facts == {"kept": str(usable - 512 * MiB), "refused": "2", "destroyed": str(usable - 128 * MiB),
                     "freed": str(usable)}


@pytest.mark.fault("A process SIGKILLed while a stream-ordered pool holds its reserve",
                   "the reserve is back on its partition's books within 1 s")
def test_a_killed_process_gives_its_pool_reserve_back_within_a_second(clients, gpu):
    holder = run_in_team(gpu, clients.lcuda, "pool-keep", 512, 512, 60)
    try:
        lines = [holder.stdout.readline() for _ in range(5)]
        facts = parse_facts("".join(lines))
        assert facts["synced_reserved"] == str(512 * MiB), lines
        assert partition_books(gpu, "team")["used"] == gpu.context + 512 * MiB
    finally:
        team = kill_and_read_books(gpu, holder, "team")
    assert team["used"] == 0, team
