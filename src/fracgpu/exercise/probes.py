"""The probe jobs of ``fracgpu check``: small CUDA driver API programs, each run as its own process
(``python -m fracgpu.exercise.probes NAME ARGS_JSON``), inside a partition under the shim or on the bare driver.

A probe uses nothing but ``libcuda.so.1`` through ctypes (``fracgpu.exercise.driver``), so it runs wherever
the shim does: on a real GPU, or on the simulated one. It measures and prints one JSON line of
figures; whether those figures keep a guarantee is for ``fracgpu.exercise.check`` to judge, never the probe.
A probe that must wait (a partition holding its quota while another fills its own, jobs starting
their kernels together) prints ``ready`` and waits for a line on stdin first.

Each figure is what the job sees: ``usable`` is what ``cuMemGetInfo_v2`` says is free right after
its context is made (its quota less what the context is charged), ``total`` what it says the device
has (the quota).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from collections.abc import Callable

from fracgpu.exercise.driver import CudaError, Driver

OUT_OF_MEMORY = 2            # CUDA_ERROR_OUT_OF_MEMORY
HEAP_LIMIT = 2               # CU_LIMIT_MALLOC_HEAP_SIZE
RELEASE_THRESHOLD = 4        # CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
FLOAT_FORMAT = 0x20          # CU_AD_FORMAT_FLOAT
ARRAY_WIDTH = 4096           # elements per row of the arrays and pitched rows
u64, size_t = ctypes.c_uint64, ctypes.c_size_t


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocationProp(ctypes.Structure):   # CUmemAllocationProp: pinned device memory
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", ctypes.c_ubyte * 8)]


class ArrayDescriptor(ctypes.Structure):   # CUDA_ARRAY_DESCRIPTOR
    _fields_ = [("Width", size_t), ("Height", size_t), ("Format", ctypes.c_int), ("NumChannels", ctypes.c_uint)]


def module_image(global_bytes: int) -> bytes:
    """A PTX module defining one device global of ``global_bytes`` (and a kernel, as real modules have)."""
    return "\n".join([".version 7.0", ".target sm_52", ".address_size 64", "",
                      f".visible .global .align 8 .b8 fracgpu_check_table[{global_bytes}];", "",
                      ".visible .entry fracgpu_check_nothing(.param .u64 unused)", "{", "\tret;", "}", ""]).encode() + b"\0"


class Job:
    """The probe's use of its device: the driver, and the context's figures taken as it was made."""

    def __init__(self, device: int):
        self.drv = Driver(device=device)
        self.cuda = self.drv.lib
        self.free_at_start, self.total = self.drv.mem_info()

    def free(self) -> int:
        return self.drv.mem_info()[0]

    def used(self) -> int:
        """What the job has taken since its context was made, as cuMemGetInfo_v2 shows it."""
        return self.free_at_start - self.free()

    def figures(self) -> dict:
        return {"usable": self.free_at_start, "total": self.total}


# ---------------------------------------------------------------------------
# The allocation paths: each takes one block, returning (CUresult, how to give it back).
# ---------------------------------------------------------------------------
Taker = Callable[[Job, int], tuple[int, Callable[[], None] | None]]


def take_alloc(job: Job, block: int):
    p = u64()
    rc = job.cuda.cuMemAlloc_v2(ctypes.byref(p), size_t(block))
    return rc, lambda: job.cuda.cuMemFree_v2(p)


def take_pitch(job: Job, block: int):
    p, pitch = u64(), size_t()
    rows = block // (ARRAY_WIDTH * 4)
    rc = job.cuda.cuMemAllocPitch_v2(ctypes.byref(p), ctypes.byref(pitch), size_t(ARRAY_WIDTH * 4), size_t(rows),
                                     ctypes.c_uint(4))
    return rc, lambda: job.cuda.cuMemFree_v2(p)


def take_managed(job: Job, block: int):
    p = u64()
    rc = job.cuda.cuMemAllocManaged(ctypes.byref(p), size_t(block), ctypes.c_uint(1))   # CU_MEM_ATTACH_GLOBAL
    return rc, lambda: job.cuda.cuMemFree_v2(p)


def take_async(job: Job, block: int):
    p = u64()
    rc = job.cuda.cuMemAllocAsync(ctypes.byref(p), size_t(block), None)

    def give_back():
        job.cuda.cuMemFreeAsync(p, None)
        job.cuda.cuStreamSynchronize(None)
        pool = ctypes.c_void_p()
        job.cuda.cuDeviceGetMemPool(ctypes.byref(pool), job.drv.device)
        job.cuda.cuMemPoolTrimTo(pool, size_t(0))
    return rc, give_back


def take_array(job: Job, block: int):
    h = ctypes.c_void_p()
    desc = ArrayDescriptor(Width=ARRAY_WIDTH, Height=block // (ARRAY_WIDTH * 4), Format=FLOAT_FORMAT, NumChannels=1)
    rc = job.cuda.cuArrayCreate_v2(ctypes.byref(h), ctypes.byref(desc))
    return rc, lambda: job.cuda.cuArrayDestroy(h)


def _vmm_prop(job: Job) -> AllocationProp:
    return AllocationProp(type=1, location=Location(type=1, id=job.drv.device.value))   # pinned, on the device


def take_vmm(job: Job, block: int):
    h = u64()
    rc = job.cuda.cuMemCreate(ctypes.byref(h), size_t(block), ctypes.byref(_vmm_prop(job)), ctypes.c_ulonglong(0))
    return rc, lambda: job.cuda.cuMemRelease(h)


def _map(job: Job, handle: u64, block: int) -> u64:
    va = u64()
    check(job.cuda.cuMemAddressReserve(ctypes.byref(va), size_t(block), size_t(0), u64(0), ctypes.c_ulonglong(0)),
          "cuMemAddressReserve")
    check(job.cuda.cuMemMap(va, size_t(block), size_t(0), handle, ctypes.c_ulonglong(0)), "cuMemMap")
    return va


def _unmap(job: Job, va: u64, block: int) -> None:
    job.cuda.cuMemUnmap(va, size_t(block))
    job.cuda.cuMemAddressFree(va, size_t(block))


def take_vmm_released(job: Job, block: int):
    """CUDA's samples' pattern: create, map, and release the handle at once; the mapping holds the memory."""
    h = u64()
    rc = job.cuda.cuMemCreate(ctypes.byref(h), size_t(block), ctypes.byref(_vmm_prop(job)), ctypes.c_ulonglong(0))
    if rc:
        return rc, None
    va = _map(job, h, block)
    check(job.cuda.cuMemRelease(h), "cuMemRelease")
    return rc, lambda: _unmap(job, va, block)


def take_module(job: Job, block: int):
    m = ctypes.c_void_p()
    rc = job.cuda.cuModuleLoadData(ctypes.byref(m), module_image(block))
    return rc, lambda: job.cuda.cuModuleUnload(m)


PATHS: dict[str, Taker] = {
    "cuMemAlloc_v2": take_alloc, "cuMemAllocPitch_v2": take_pitch, "cuMemAllocManaged": take_managed,
    "cuMemAllocAsync": take_async, "cuArrayCreate_v2": take_array, "cuMemCreate": take_vmm,
    "module globals": take_module,
}


def check(rc: int, call: str) -> None:
    if rc:
        raise SystemExit(f"probe: {call} failed with CUresult {rc}")


def fill(job: Job, take: Taker, block: int) -> dict:
    """Blocks taken until refused (at most a few past what the job was told it has): how many, and why it stopped.
    The blocks stay taken; the second value gives them back."""
    held, gives, rc = 0, [], 0
    most = job.free_at_start // block + 4   # a path the quota misses stops here, not at the device's end
    while len(gives) < most:
        rc, give_back = take(job, block)
        if rc:
            break
        gives.append(give_back)
        held += block
    return {"held": held, "refused": rc, "used": job.used()}, gives


def give_back_all(gives: list) -> None:
    for give in reversed(gives):
        give()


# ---------------------------------------------------------------------------
# The probes
# ---------------------------------------------------------------------------
class NvmlMemory(ctypes.Structure):   # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_device(uuid: str) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """NVML (the real one, or the simulated GPU's) and its handle of the GPU ``uuid``; None when NVML cannot
    be used here."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
        return None
    return nvml, handle


def nvml_used(uuid: str) -> Callable[[], int] | None:
    """A reader of the device's used memory as NVML reports it (no context needed), or None when NVML
    cannot say. Each figure is read until two reads in a row agree, as the shim reads it."""
    opened = nvml_device(uuid)
    if opened is None:
        return None
    nvml, handle = opened

    def used() -> int:
        last, memory = None, NvmlMemory()
        for _ in range(8):
            check(nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)), "nvmlDeviceGetMemoryInfo")
            if memory.used == last:
                break
            last = memory.used
        return last
    return used


class NvmlProcessInfo(ctypes.Structure):   # nvmlProcessInfo_t (v2 and v3)
    _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gpu_instance", ctypes.c_uint),
                ("compute_instance", ctypes.c_uint)]


NVML_INSUFFICIENT_SIZE = 7
NVML_VALUE_NOT_AVAILABLE = (1 << 64) - 1


def nvml_processes(uuid: str) -> Callable[[], list[tuple[int, int]]] | None:
    """A reader of the processes the device lists as holding its memory, from the device's own accounting
    (nvmlDeviceGetComputeRunningProcesses): (pid, bytes) each, contexts included. None when NVML cannot say."""
    opened = nvml_device(uuid)
    if opened is None:
        return None
    nvml, handle = opened
    call = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v3", None) or \
        getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v2", None)
    if call is None:
        return None
    room = [64]
    buffers = [(NvmlProcessInfo * room[0])()]

    def processes() -> list[tuple[int, int]]:
        while True:
            count = ctypes.c_uint(room[0])
            rc = call(handle, ctypes.byref(count), buffers[0])
            if rc == NVML_INSUFFICIENT_SIZE:   # more processes than room: ask again with room for them
                room[0] = count.value + count.value // 2 + 16
                buffers[0] = (NvmlProcessInfo * room[0])()
                continue
            check(rc, "nvmlDeviceGetComputeRunningProcesses")
            return [(e.pid, e.used) for e in buffers[0][:count.value] if e.used != NVML_VALUE_NOT_AVAILABLE]
    return processes


def descends_from(pid: int, root: int, known: dict[int, bool]) -> bool:
    """Whether process ``pid`` is ``root`` or one of its descendants (by /proc's parent links; a process
    whose ancestry cannot be read any more counts as not). ``known`` caches the answers by pid."""
    chain = []
    answer = False
    while pid > 1 and pid not in known:
        if pid == root:
            answer = True
            break
        chain.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    else:
        answer = known.get(pid, False)
    for p in chain:
        known[p] = answer
    return answer


def probe_watch(device: int, uuid: str, limit: int, root: int | None = None, period_us: float = 200) -> dict:
    """Polls the device's own per-process figures (NVML) every ``period_us`` until a line comes on stdin,
    summing what the processes of one job hold there: ``root`` and its descendants (None: every process
    the device lists). Prints ``ready`` after the first sample. Reports the most they held (``peak``), by
    how much and for how long that went past ``limit`` (``excess``, ``excess_s``: the longest stretch of
    samples over it; ``over_samples``), and how the polling kept its period (``samples``, ``max_gap_s``)."""
    import threading

    read = nvml_processes(uuid)
    if read is None:
        raise SystemExit("NVML cannot list the processes holding the device's memory here")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    known: dict[int, bool] = {}
    period = period_us / 1e6
    peak = excess = samples = over = 0
    longest = max_gap = 0.0
    over_since = last = None
    while True:
        held = sum(used for pid, used in read() if root is None or descends_from(pid, root, known))
        now = time.monotonic()
        samples += 1
        if last is not None:
            max_gap = max(max_gap, now - last)
        last = now
        peak = max(peak, held)
        if held > limit:
            over += 1
            excess = max(excess, held - limit)
            over_since = now if over_since is None else over_since
            longest = max(longest, now - over_since)
        elif over_since is not None:   # the stretch lasted until this sample found it back under
            longest = max(longest, now - over_since)
            over_since = None
        if samples == 1:
            print("ready", flush=True)
        if stop.is_set():
            break
        time.sleep(max(0.0, now + period - time.monotonic()))   # a period from sample to sample, the read included
    return {"limit": limit, "peak": peak, "excess": excess, "excess_s": longest, "over_samples": over,
            "samples": samples, "max_gap_s": max_gap}


def probe_reserve(device: int, uuid: str) -> dict:
    """On the bare driver: what the process's first context reserves on the device, as the shim measures
    it (the device's used memory before and after, from NVML); without NVML, what a second context
    reserves (a lower bound: a process's first context takes the most)."""
    used = nvml_used(uuid)
    before = used() if used else 0
    job = Job(device)
    if used:
        return {"total": job.total, "reserve": max(0, used() - before), "how": "NVML"}
    ctx = ctypes.c_void_p()
    check(job.cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, job.drv.device), "cuCtxCreate_v2")
    after = job.free()
    job.cuda.cuCtxDestroy_v2(ctx)
    return {"total": job.total, "reserve": max(0, job.free_at_start - after), "how": "a second context"}


def probe_paths(device: int, block: int, paths: list[str] | None = None) -> dict:
    """Each allocation path in turn fills the quota until refused, then gives it all back."""
    job = Job(device)
    out = {}
    for name in paths or list(PATHS):
        result, gives = fill(job, PATHS[name], block)
        give_back_all(gives)
        result["used_after"] = job.used()
        out[name] = result
    return {**job.figures(), "paths": out}


def probe_vmm_released(device: int, block: int) -> dict:
    """Create, map, release the handle (the samples' pattern), until refused; what stays charged."""
    job = Job(device)
    result, gives = fill(job, take_vmm_released, block)
    give_back_all(gives)
    return {**job.figures(), **result, "used_after_unmap": job.used()}


def probe_vmm_retained(device: int, block: int) -> dict:
    """Half the quota created and mapped; a retain of it by address and one release (a library's own
    reference), then the creator's release while mapped: it must all stay charged until unmapped."""
    job = Job(device)
    size = job.free_at_start // 2 // block * block
    h, h2 = u64(), u64()
    check(job.cuda.cuMemCreate(ctypes.byref(h), size_t(size), ctypes.byref(_vmm_prop(job)), ctypes.c_ulonglong(0)),
          "cuMemCreate")
    va = _map(job, h, size)
    check(job.cuda.cuMemRetainAllocationHandle(ctypes.byref(h2), ctypes.c_void_p(va.value)),
          "cuMemRetainAllocationHandle")
    check(job.cuda.cuMemRelease(h2), "cuMemRelease")
    after_retain_release = job.used()
    check(job.cuda.cuMemRelease(h), "cuMemRelease")
    after_release = job.used()
    over, gives = fill(job, take_alloc, block)   # what is left beside it
    give_back_all(gives)
    _unmap(job, va, size)
    return {**job.figures(), "mapped": size, "used_after_retain_release": after_retain_release,
            "used_after_release": after_release, "rest_held": over["held"], "rest_refused": over["refused"],
            "used_after_unmap": job.used()}


def probe_heap(device: int, block: int) -> dict:
    """cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE): a heap past the quota is refused; one that fits is charged."""
    job = Job(device)
    current = size_t()
    check(job.cuda.cuCtxGetLimit(ctypes.byref(current), HEAP_LIMIT), "cuCtxGetLimit")
    base = current.value   # the context's reservation already covers this heap
    over = job.cuda.cuCtxSetLimit(HEAP_LIMIT, size_t(base + job.free_at_start + block))
    grow = (job.free_at_start - block) // block * block
    fits = job.cuda.cuCtxSetLimit(HEAP_LIMIT, size_t(base + grow))
    return {**job.figures(), "default_heap": base, "over_result": over, "grown": grow, "fit_result": fits,
            "used": job.used()}


def probe_pool(device: int, block: int) -> dict:
    """A pool that keeps what it is given back (release threshold: all): what it keeps stays charged,
    so the rest of the quota is all that is left, until it is trimmed."""
    job = Job(device)
    pool, p = ctypes.c_void_p(), u64()
    check(job.cuda.cuDeviceGetMemPool(ctypes.byref(pool), job.drv.device), "cuDeviceGetMemPool")
    keep_all = u64(2**64 - 1)
    check(job.cuda.cuMemPoolSetAttribute(pool, RELEASE_THRESHOLD, ctypes.byref(keep_all)), "cuMemPoolSetAttribute")
    size = job.free_at_start // 2 // block * block
    check(job.cuda.cuMemAllocAsync(ctypes.byref(p), size_t(size), None), "cuMemAllocAsync")
    check(job.cuda.cuMemFreeAsync(p, None), "cuMemFreeAsync")
    check(job.cuda.cuStreamSynchronize(None), "cuStreamSynchronize")
    kept = job.used()
    rest, gives = fill(job, take_alloc, block)
    give_back_all(gives)
    check(job.cuda.cuMemPoolTrimTo(pool, size_t(0)), "cuMemPoolTrimTo")
    zero = u64(0)
    job.cuda.cuMemPoolSetAttribute(pool, RELEASE_THRESHOLD, ctypes.byref(zero))
    return {**job.figures(), "pooled": size, "kept": kept, "rest_held": rest["held"], "rest_refused": rest["refused"],
            "used_after_trim": job.used()}


def probe_context(device: int) -> dict:
    """What the job is told right after its context is made: its quota, less the context's charge."""
    return Job(device).figures()


def probe_hold(device: int, block: int) -> dict:
    """Fills the quota with cuMemAlloc_v2 and holds it: prints its figures and ``ready``, then holds
    until a line comes on stdin."""
    job = Job(device)
    result, gives = fill(job, take_alloc, block)
    print(json.dumps({**job.figures(), **result}))
    print("ready", flush=True)
    sys.stdin.readline()
    give_back_all(gives)
    return {"released": True}


def probe_fill(device: int, block: int) -> dict:
    job = Job(device)
    result, gives = fill(job, take_alloc, block)
    give_back_all(gives)
    return {**job.figures(), **result}


def probe_leave_full(device: int, block: int) -> dict:
    """Fills the quota with cuMemAlloc_v2 until refused, then exits without freeing anything: the driver's
    teardown gives it back. A process that finds the quota full already is refused its context."""
    try:
        job = Job(device)
    except CudaError as e:
        if e.code != OUT_OF_MEMORY:
            raise
        return {"held": 0, "context_refused": True}
    result, _ = fill(job, take_alloc, block)
    return {**result, "context_refused": False}


def probe_leave_full_together(device: int, block: int, count: int) -> dict:
    """Prints ``ready``, waits for a line on stdin, then starts ``count`` ``leave-full`` probes at once (its
    children: the job) and waits for them all."""
    import subprocess

    print("ready", flush=True)
    sys.stdin.readline()
    argv = [sys.executable, "-m", __spec__.name, "leave-full", json.dumps({"device": device, "block": block})]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    ended = [json.loads(c.communicate()[0].strip().splitlines()[-1]) if c.wait() == 0 else None for c in children]
    if None in ended:
        raise SystemExit(f"{ended.count(None)} of {count} probes filling the partition failed")
    return {"processes": count, "held": sum(e["held"] for e in ended),
            "contexts_refused": sum(e["context_refused"] for e in ended)}


def probe_busy(device: int, module: str, kernel_ms: float, seconds: float) -> dict:
    """Spin kernels back to back for ``seconds``, started together with the other busy jobs (``ready``, then a
    line on stdin); the device time its kernels took."""
    drv = Driver(device=device)
    drv.load_kernels(module)
    print("ready", flush=True)
    sys.stdin.readline()
    start, kernels = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for _ in range(10):
            drv.spin(kernel_ms / 1000)
        drv.synchronize()
        kernels += 10
    return {"kernels": kernels, "device_s": kernels * kernel_ms / 1000, "wall_s": time.monotonic() - start}


def probe_spin(device: int, module: str, count: int, ns: int) -> dict:
    """``count`` spin kernels of ``ns`` each, back to back: device time of a known length."""
    drv = Driver(device=device)
    drv.load_kernels(module)
    for _ in range(count):
        drv.spin(ns / 1e9)
    drv.synchronize()
    return {"kernels": count, "ns": ns}


def probe_launch(device: int, module: str, launches: int, batches: int) -> dict:
    """The host's time per launch of a zero-length kernel: ``batches`` of ``launches`` back to back, each
    timed alone (the queue drained between them, outside the timing); the fastest batch, the least
    disturbed by the rest of the machine."""
    drv = Driver(device=device)
    drv.load_kernels(module)
    launch = drv.lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                       ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    ns = ctypes.c_ulonglong(0)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(ns), ctypes.c_void_p))
    function = drv._spin
    times = []
    for n in range(batches + 1):   # the first batch warms up, and is not counted
        drv.synchronize()
        start = time.perf_counter_ns()
        for _ in range(launches):
            if launch(function, 1, 1, 1, 1, 1, 1, 0, None, params, None):
                raise SystemExit("probe: cuLaunchKernel failed")
        took = (time.perf_counter_ns() - start) / launches
        if n:
            times.append(took)
    drv.synchronize()
    times.sort()
    return {"ns_per_launch": times[0], "median_ns": times[len(times) // 2], "launches": launches * batches}


PROBES: dict[str, Callable[..., dict]] = {
    "reserve": probe_reserve, "paths": probe_paths, "vmm-released": probe_vmm_released,
    "vmm-retained": probe_vmm_retained, "heap": probe_heap, "pool": probe_pool, "context": probe_context,
    "hold": probe_hold, "fill": probe_fill, "leave-full": probe_leave_full,
    "leave-full-together": probe_leave_full_together, "watch": probe_watch, "busy": probe_busy, "spin": probe_spin,
    "launch": probe_launch,
}


def main(argv: list[str]) -> None:
    name, arguments = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    result = PROBES[name](**arguments)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
