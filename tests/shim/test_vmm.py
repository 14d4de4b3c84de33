"""Virtual memory management (cuMemCreate, cuMemMap) under a quota: the books
follow the driver's lifetime rules. A handle's physical memory stays charged
until the handle and every mapping of it are gone, so releasing a mapped
handle (what CUDA's samples do right after cuMemMap) frees nothing, a retain
is a reference of its own, and memory imported from another process is
charged once, to the partition that created it (a VMM handle's POSIX file
descriptor, a cuIpcGetMemHandle handle, or a pointer from an exported pool).

Each test runs jobs under `fracgpu run` on a simulated GPU of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.support.simgpu import (BINDINGS_PRELUDE, CTYPES_PRELUDE, GiB, MiB, command_pid, parse_facts,
                                  run_in_team)


@pytest.fixture
def gpu4(make_gpu):
    """A 4 GiB simulated GPU: room for more than a 1 GiB quota, so the quota is what stops a job."""
    return make_gpu(memory=4 * GiB)


def blocks_in(gpu, quota, block):
    """How many `block`s fit in a job's `quota` on `gpu`: the quota less the job's own context."""
    return (quota - gpu.context) // block


def partition(gpu, name):
    usage = json.loads(gpu.fracgpu("partition", "list", "--json", timeout=10).stdout)
    (part,) = [p for u in usage for p in u["partitions"] if p["name"] == name]
    return part


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_mapping_after_releasing_the_handle_is_refused_at_the_quota(clients, gpu4, kind):
    # create, map, release, keep going: the mappings hold 256 MiB each.
    facts = gpu4.facts(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--",
                       getattr(clients, kind), "vmm-map-release", 256)
    blocks = blocks_in(gpu4, GiB, 256 * MiB)   # the quota less the job's own context
    assert facts == {"blocks": str(blocks), "result": "CUDA_ERROR_OUT_OF_MEMORY",
                     "used": str(blocks * 256 * MiB + gpu4.context)}   # its mappings and its context


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_a_retain_and_its_release_leave_a_mapped_handle_charged(clients, gpu4, kind):
    facts = gpu4.facts(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--",
                       getattr(clients, kind), "vmm-retain", 512)
    assert facts == {"used_after_retain_release": str(512 * MiB + gpu4.context),   # and its context
                     "used_after_unmap": str(512 * MiB + gpu4.context),       # the creator's reference still holds it
                     "used_after_release": str(gpu4.context)}                 # its context alone


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_unmapping_a_released_handle_gives_its_memory_back(clients, gpu4, kind):
    facts = gpu4.facts(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--",
                       getattr(clients, kind), "vmm-unmap-after-release", 512)
    assert facts == {"used_after_release": str(512 * MiB + gpu4.context),   # and its context
                     "used_after_unmap": str(gpu4.context)}                 # its context alone


def test_the_simulated_driver_itself_keeps_mapped_memory_until_the_mapping_goes(clients, gpu4):
    # No shim: what the device shows is the driver's own lifetime rule (and the client's own context).
    held, context = 512 * MiB + gpu4.context, gpu4.context
    assert gpu4.facts(clients.lcuda, "vmm-unmap-after-release", 512) == {
        "used_after_release": str(held), "used_after_unmap": str(context)}
    assert gpu4.facts(clients.lcuda, "vmm-retain", 512) == {
        "used_after_retain_release": str(held), "used_after_unmap": str(held), "used_after_release": str(context)}


@pytest.mark.fault("Releasing an unknown or already released VMM handle, unmapping a range never mapped or unmapped twice",
                   "the driver's own error, unchanged; the partition's books untouched, never below 0")
@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_bad_handles_and_ranges_go_to_the_driver_and_leave_the_books_alone(clients, gpu4, kind):
    gpu4.fracgpu("partition", "create", "team", "--memory", "1GiB")
    holder = gpu4.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                        clients.lcuda, "hold", 64, 60)
    try:
        assert holder.stdout.readline().strip() == "holding 64"
        facts = gpu4.facts(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                           getattr(clients, kind), "vmm-bad", 256)
        contexts = 2 * gpu4.context   # the holder's and the job's, both in the partition
        assert facts == {"used": str(320 * MiB + contexts),
                         "release_unknown": "CUDA_ERROR_INVALID_VALUE",
                         "release_again": "CUDA_ERROR_INVALID_VALUE",
                         "unmap_never_mapped": "CUDA_ERROR_INVALID_VALUE",
                         "used_after_bad": str(320 * MiB + contexts),          # still mapped: still charged
                         "unmap_again": "CUDA_ERROR_INVALID_VALUE",
                         "used_after_unmap": str(64 * MiB + contexts)}         # the holder's and the contexts, exactly
        assert partition(gpu4, "team")["used"] == 64 * MiB + gpu4.context   # the holder's, with its context
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.fault("SIGKILL of a job holding mapped VMM memory whose handles it released",
                   "all of it back on the partition's books within 1 s")
def test_a_job_killed_holding_mapped_memory_gives_it_all_back(clients, gpu4):
    job = run_in_team(gpu4, clients.lcuda, "vmm-map-release", 256, 3, 60)
    try:
        assert job.stdout.readline().strip() == "blocks 3"
        assert partition(gpu4, "team")["used"] == 768 * MiB + gpu4.context   # and its context
        os.kill(command_pid(job), signal.SIGKILL)
        killed = time.monotonic()
        while (used := partition(gpu4, "team")["used"]) and time.monotonic() - killed < 1.0:
            time.sleep(0.02)
        assert used == 0
    finally:
        job.kill()
        job.wait()
    # And the partition's whole quota (less the next job's own context) is there for the next job.
    facts = gpu4.facts(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--",
                       clients.lcuda, "vmm-map-release", 256)
    assert facts["blocks"] == str(blocks_in(gpu4, GiB, 256 * MiB))


# Memory made in partition "maker" (1 GiB) and used from partition "user" (512 MiB):
# how the creator shares it (its client command and how many lines it prints), and
# what the user's client is given to open it.
SHARING = {
    "vmm-posix-fd": (["vmm-export", 768, 60], 3, lambda made: ["vmm-import", made["pid"], made["fd"]]),
    "ipc-handle": (["ipc-export", 768, 60], 2, lambda made: ["ipc-import", made["handle"]]),
    "pool-pointer": (["pool-export", 768, 60], 4, lambda made: ["pool-import", made["pid"], made["fd"], made["data"]]),
}


def shared_from_another_partition(gpu, clients, kind, how):
    """Runs the creator in "maker" and the user's client of `kind` in "user"; the user's facts."""
    gpu.fracgpu("partition", "create", "maker", "--memory", "1GiB")
    gpu.fracgpu("partition", "create", "user", "--memory", "512MiB")
    export, lines, opener = SHARING[how]
    maker = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "maker", "--", clients.lcuda, *export)
    try:
        made = dict(maker.stdout.readline().split() for _ in range(lines))
        assert made["used"] == str(768 * MiB + gpu.context)   # and its context
        facts = gpu.facts(sys.executable, "-m", "fracgpu", "run", "--partition", "user", "--",
                          getattr(clients, kind), *opener(made))
        assert partition(gpu, "maker")["used"] == 768 * MiB + gpu.context     # charged once, to its creator
        return facts
    finally:
        maker.kill()
        maker.wait()


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_an_imported_vmm_handle_is_charged_once_to_the_partition_that_created_it(clients, gpu4, kind):
    blocks = blocks_in(gpu4, 512 * MiB, 64 * MiB)
    assert shared_from_another_partition(gpu4, clients, kind, "vmm-posix-fd") == {
        "imported": str(768 * MiB),
        "used_after_import": str(gpu4.context),  # not charged to the importer (only its context) ...
        "blocks": str(blocks),                   # ... who still gets all of its 512 MiB less its context
        "used_after_release": str(blocks * 64 * MiB + gpu4.context)}   # and gives nothing back it never had


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_memory_opened_from_another_process_is_charged_once_to_its_exporter(clients, gpu4, kind):
    blocks = blocks_in(gpu4, 512 * MiB, 64 * MiB)
    assert shared_from_another_partition(gpu4, clients, kind, "ipc-handle") == {
        "first": "0x1234abcd",                       # the exporter's memory, shared
        "used_after_open": str(gpu4.context),        # the opener's own context only
        "blocks": str(blocks),
        "free_opened": "CUDA_ERROR_INVALID_VALUE",   # only cuIpcCloseMemHandle lets it go
        "used_after_close": str(blocks * 64 * MiB + gpu4.context)}


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_a_pointer_imported_from_another_process_pool_is_charged_once_to_its_exporter(clients, gpu4, kind):
    blocks = blocks_in(gpu4, 512 * MiB, 64 * MiB)
    assert shared_from_another_partition(gpu4, clients, kind, "pool-pointer") == {
        "first": "0x1234abcd",
        "used_after_import": str(gpu4.context),      # the importer's own context only
        "blocks": str(blocks),
        "used_after_free": str(blocks * 64 * MiB + gpu4.context)}   # its free gives back nothing it never had


# CTYPES_PRELUDE and the VMM types: `Prop`, and `prop`, pinned memory on device 0.
CTYPES_VMM_PRELUDE = CTYPES_PRELUDE + """
class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", ctypes.c_ubyte * 8)]
prop = Prop(type=1, location=Location(type=1, id=0))
"""

# The samples' pattern through ctypes: create, reserve, map, release, until refused.
CTYPES_VMM = CTYPES_VMM_PRELUDE + """
size = ctypes.c_size_t(128 << 20)
n, mapped = 0, []
while True:
    h, va = ctypes.c_uint64(), ctypes.c_uint64()
    rc = cuda.cuMemCreate(ctypes.byref(h), size, ctypes.byref(prop), ctypes.c_ulonglong(0))
    if rc:
        break
    assert cuda.cuMemAddressReserve(ctypes.byref(va), size, ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_ulonglong(0)) == 0
    assert cuda.cuMemMap(va, size, ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)) == 0
    assert cuda.cuMemRelease(h) == 0
    mapped.append(va.value)
    n += 1
free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
print("blocks", n)
print("result", rc)
print("used", total.value - free.value)
for va in mapped:
    assert cuda.cuMemUnmap(ctypes.c_uint64(va), size) == 0
assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
print("used_after_unmap", total.value - free.value)
"""


def test_ctypes_job_mapping_released_handles_stops_at_the_quota(gpu4):
    facts = parse_facts(gpu4.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", CTYPES_VMM).stdout)
    blocks = blocks_in(gpu4, GiB, 128 * MiB)
    assert facts == {"blocks": str(blocks), "result": "2", "used": str(blocks * 128 * MiB + gpu4.context),
                     "used_after_unmap": str(gpu4.context)}   # its context alone


# cuda-bindings: a library retains and releases a mapping it did not create.
BINDINGS_VMM = BINDINGS_PRELUDE + """
prop = cu.CUmemAllocationProp()
prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
prop.location.id = 0
size = 768 << 20
h = ck(cu.cuMemCreate(size, prop, 0))
va = ck(cu.cuMemAddressReserve(size, 0, 0, 0))
ck(cu.cuMemMap(va, size, 0, h, 0))
ck(cu.cuMemRelease(ck(cu.cuMemRetainAllocationHandle(va))))
err, _ = cu.cuMemAlloc(512 << 20)
print("alloc_over_quota", int(err))
free, total = ck(cu.cuMemGetInfo())
print("used", total - free)
"""


def test_cuda_bindings_job_retain_and_release_keeps_the_mapping_charged(gpu4):
    facts = parse_facts(gpu4.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c", BINDINGS_VMM).stdout)
    assert facts == {"alloc_over_quota": "2", "used": str(768 * MiB + gpu4.context)}   # and its context
