"""Helpers shared by the tests and the benchmarks: the simulated GPU of one
test, the CUDA headers for compiling C clients, and parsing client output."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import sys

import pytest

from fracgpu import sim
from tests.support import ROOT

CLIENT_SOURCE = ROOT / "tests" / "clients" / "driver_client.c"
MiB = 1 << 20
GiB = 1 << 30


def cuda_include_dir() -> pathlib.Path:
    """cuda.h for compiling the C clients: CUDA_HOME, the nvidia-cuda-runtime
    wheel (a test dependency), or /usr/local/cuda, as the build looks."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(pathlib.Path(os.environ["CUDA_HOME"]) / "include")
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidates += [pathlib.Path(folder) / "cu13" / "include", pathlib.Path(folder) / "cuda_runtime" / "include"]
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    for folder in candidates:
        if (folder / "cuda.h").is_file():
            return folder
    raise RuntimeError("cuda.h not found: `pip install '.[test]'` installs nvidia-cuda-runtime, which has it")


# The start of a job script that uses the driver API through ctypes: `cuda` is
# libcuda.so.1 (whatever stands behind that name: the shim, the simulated driver),
# `dev` device 0, and its primary context is current.
CTYPES_PRELUDE = """import ctypes
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
"""


# The start of a job script that uses cuda-bindings: `cu` (cuda.bindings.driver), `ck(result)`
# (the values of a call, or the job ends with the error) and `np`.
BINDINGS_CHECK = """import sys
import numpy as np
from cuda.bindings import driver as cu

def ck(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values

"""

# The same with the driver started: `dev`, and its primary context current.
BINDINGS_PRELUDE = BINDINGS_CHECK + """ck(cu.cuInit(0))
dev = ck(cu.cuDeviceGet(0))
ctx = ck(cu.cuDevicePrimaryCtxRetain(dev))
ck(cu.cuCtxSetCurrent(ctx))
"""


# Graph memory through ctypes, after CTYPES_PRELUDE: `graph_attr(name)` (the device's graph memory pool:
# "used", "used_high", "reserved", "reserved_high"), `graph_with_memory(*sizes, free=True)` (a graph with an
# allocation node of each size, each freed by a free node unless free=False; returns the graph and the
# addresses), `instantiate(graph)` (the CUresult and the executable graph), `launch(exe)` (launch on the
# legacy stream and synchronize; the CUresult), `trim()`, `meminfo_free()`.
GRAPH_CTYPES = """
ATTRS = {"used": 0, "used_high": 1, "reserved": 2, "reserved_high": 3}
def graph_attr(name):
    v = ctypes.c_uint64()
    assert cuda.cuDeviceGetGraphMemAttribute(dev, ATTRS[name], ctypes.byref(v)) == 0
    return v.value
class AllocNodeParams(ctypes.Structure):   # CUDA_MEM_ALLOC_NODE_PARAMS
    _fields_ = [("allocType", ctypes.c_int), ("handleTypes", ctypes.c_int), ("locType", ctypes.c_int),
                ("locId", ctypes.c_int), ("win32", ctypes.c_void_p), ("maxSize", ctypes.c_size_t),
                ("rest", ctypes.c_ubyte * 56), ("accessDescs", ctypes.c_void_p),
                ("accessDescCount", ctypes.c_size_t), ("bytesize", ctypes.c_size_t), ("dptr", ctypes.c_uint64)]
def graph_with_memory(*sizes, free=True):
    graph, last, ptrs = ctypes.c_void_p(), None, []
    assert cuda.cuGraphCreate(ctypes.byref(graph), 0) == 0
    for size in sizes:
        params = AllocNodeParams(allocType=1, locType=1, locId=dev.value, bytesize=size)   # pinned, on the device
        node, deps = ctypes.c_void_p(), (ctypes.c_void_p * 1)(last)
        assert cuda.cuGraphAddMemAllocNode(ctypes.byref(node), graph, deps, ctypes.c_size_t(1 if last else 0),
                                           ctypes.byref(params)) == 0
        last = node
        ptrs.append(params.dptr)
        if free:
            node, deps = ctypes.c_void_p(), (ctypes.c_void_p * 1)(last)
            assert cuda.cuGraphAddMemFreeNode(ctypes.byref(node), graph, deps, ctypes.c_size_t(1),
                                              ctypes.c_uint64(params.dptr)) == 0
            last = node
    return graph, ptrs
def instantiate(graph):
    exe = ctypes.c_void_p()
    return cuda.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)), exe
def launch(exe):
    rc = cuda.cuGraphLaunch(exe, None)
    assert cuda.cuCtxSynchronize() == 0
    return rc
def trim():
    assert cuda.cuDeviceGraphMemTrim(dev) == 0
def meminfo_free():
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    return free.value
"""


def alloc_job(mib: int) -> str:
    """A job script that allocates MIB and prints the CUresult (0: done, 2: out of memory)."""
    return CTYPES_PRELUDE + ("p = ctypes.c_uint64()\n"
                             f"print(cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t({mib} << 20)))\n")


def command_pid(run: subprocess.Popen, timeout: float = 10) -> int:
    """The pid of the command a ``fracgpu run`` process started: its child that runs with
    ``FRACGPU_JOB_HOLDER`` naming it (not a helper it ran before, such as ldconfig, nor the
    child between fork and exec)."""
    deadline = time.monotonic() + timeout
    mark = f"FRACGPU_JOB_HOLDER={run.pid}".encode()
    while True:
        try:
            with open(f"/proc/{run.pid}/task/{run.pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        for child in children:
            try:
                with open(f"/proc/{child}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        return child
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"fracgpu run ({run.pid}) started no command")
        time.sleep(0.01)


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Waits until process ``pid`` has exited (and is no zombie either)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} is still running")


def wait_for(read, done, within: float):
    """read() until done(value), for at most `within` seconds; the last value."""
    deadline = time.monotonic() + within
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


class SimGPU:
    """One simulated GPU of a test: its folder, its config, and ways to run on it."""

    def __init__(self, folder: pathlib.Path, **config):
        self.dir = folder
        self.config = sim.SimConfig(state_dir=str(folder), **config)
        # What each CUDA context reserves on this GPU (the simulated driver's default unless given): the shim
        # measures it and charges it to the job, so a job's usable memory is its quota less this, per context.
        self.context = self.config.reserved_per_context()
        # fracgpu's own shared state (partitions, processes) for this GPU, also private to the test.
        self.state_dir = folder.parent / (folder.name + "-state")
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FRACGPU_") and k != "LD_PRELOAD"}
        # ... and its own ledger, so that no test writes into the user's.
        self.ledger = folder.parent / (folder.name + "-ledger.sqlite")
        self.env = {**env, **sim.environment(self.config), "FRACGPU_STATE_DIR": str(self.state_dir),
                    "FRACGPU_LEDGER": str(self.ledger)}

    def run(self, *argv, timeout: float = 60, check: bool = True, env: dict | None = None, **kwargs):
        result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})}, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                                 f"stderr:\n{result.stderr}")
        return result

    def facts(self, *argv, **kwargs) -> dict[str, str]:
        """Run a client and parse its "key value" lines."""
        return parse_facts(self.run(*argv, **kwargs).stdout)

    def python(self, code: str, **kwargs):
        return self.run(sys.executable, "-c", code, **kwargs)

    def popen(self, *argv, env: dict | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.PIPE)   # a job that reads stdin waits for the test
        return subprocess.Popen([str(a) for a in argv], env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def fracgpu(self, *args, **kwargs):
        """Run the fracgpu command line on this GPU."""
        return self.run(sys.executable, "-m", "fracgpu", *args, **kwargs)


def start_together(argv, count: int, env: dict, timeout: float = 600) -> list[float]:
    """Starts ``count`` copies of ``argv`` at once (one after the other, as fast as this process
    can), each a program that prints ``first_alloc_ns T`` (``driver_bench startup``, directly or
    under ``fracgpu run``). Returns each one's milliseconds from just before its start to the
    return of its first allocation (CLOCK_MONOTONIC, the same clock in every process)."""
    started = []
    for _ in range(count):
        t0 = time.monotonic_ns()
        started.append((t0, subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)))
    ms = []
    for t0, p in started:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"{argv} exited {p.returncode}\nstderr:\n{err}")
        ms.append((float(parse_facts(out)["first_alloc_ns"]) - t0) / 1e6)
    return ms


def parse_facts(text: str) -> dict[str, str]:
    facts = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        facts[key] = value
    return facts


def shim_path() -> str:
    """The installed driver shim (fracgpu/_shim/libfracgpu.so)."""
    import fracgpu

    path = pathlib.Path(fracgpu.__file__).parent / "_shim" / "libfracgpu.so"
    assert path.is_file(), f"{path} is missing: install fracgpu with pip"
    return str(path)


# ---------------------------------------------------------------------------
# Fixtures (imported by tests/conftest.py and benchmarks/conftest.py)
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Clients:
    """The C driver client, built two ways (see tests/clients/driver_client.c)."""

    lcuda: pathlib.Path  # linked with -lcuda
    dlopen: pathlib.Path  # dlopen + cuGetProcAddress_v2

    def __iter__(self):
        return iter((self.lcuda, self.dlopen))


@pytest.fixture(scope="session")
def clients(tmp_path_factory) -> Clients:
    out = tmp_path_factory.mktemp("clients")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or $CC) to build the test clients")
    include = cuda_include_dir()
    lib = sim.library_dir()
    common = [cc, "-std=c11", "-D_GNU_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror", f"-I{include}"]
    lcuda, dlopen = out / "client_lcuda", out / "client_dlopen"
    subprocess.run([*common, str(CLIENT_SOURCE), "-o", str(lcuda), f"-L{lib}", "-l:libcuda.so.1"], check=True)
    subprocess.run([*common, "-DUSE_DLOPEN", str(CLIENT_SOURCE), "-o", str(dlopen), "-ldl"], check=True)
    return Clients(lcuda, dlopen)


# An NVML that answers as the simulated one does, but lists no process: what a job in a
# container whose pid namespace is not the driver's sees.
UNLISTED_NVML = r"""
#include <dlfcn.h>
#include <stdlib.h>
static void *real(const char *name) {
    static void *h;
    if (!h) h = dlopen(getenv("UNLISTED_NVML_REAL"), RTLD_NOW | RTLD_LOCAL);
    return h ? dlsym(h, name) : 0;
}
int nvmlInit_v2(void) { int (*f)(void) = real("nvmlInit_v2"); return f ? f() : 999; }
int nvmlDeviceGetHandleByUUID(const char *u, void **d) {
    int (*f)(const char *, void **) = real("nvmlDeviceGetHandleByUUID");
    return f(u, d);
}
int nvmlDeviceGetMemoryInfo(void *d, void *m) { int (*f)(void *, void *) = real("nvmlDeviceGetMemoryInfo"); return f(d, m); }
int nvmlDeviceGetComputeRunningProcesses_v3(void *d, unsigned *count, void *infos) {
    (void)d; (void)infos;
    *count = 0;
    return 0;
}
"""


@pytest.fixture(scope="session")
def unlisted_nvml(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("nvml")
    (out / "unlisted.c").write_text(UNLISTED_NVML)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / "libnvidia-ml.so.1"), str(out / "unlisted.c"), "-ldl"],
                   check=True)
    return str(out / "libnvidia-ml.so.1")


@pytest.fixture(scope="session")
def kernels() -> str:
    """A module file for cuModuleLoad: the installed fatbin of cuda/ kernels.

    The simulated driver accepts any image, so this is what a real client
    would load on a real GPU too."""
    import fracgpu

    return str(fracgpu.kernels_path())


@pytest.fixture(scope="session")
def shim() -> str:
    """The installed driver shim, for runs that drive it through its variables directly."""
    return shim_path()


@pytest.fixture
def gpu(tmp_path) -> SimGPU:
    """A fresh 1 GiB simulated GPU of this test's own."""
    return SimGPU(tmp_path / "sim", memory=GiB)


@pytest.fixture
def make_gpu(tmp_path):
    """Factory for simulated GPUs with other settings: make_gpu(memory=..., sms=...)."""
    count = 0

    def make(**config) -> SimGPU:
        nonlocal count
        count += 1
        return SimGPU(tmp_path / f"sim{count}", **config)

    return make


def partition_books(gpu: SimGPU, name: str) -> dict:
    """Partition `name` as `fracgpu partition list --json` shows it on `gpu`."""
    usage = json.loads(gpu.fracgpu("partition", "list", "--json", timeout=10).stdout)
    (part,) = [p for u in usage for p in u["partitions"] if p["name"] == name]
    return part


def run_in_team(gpu: SimGPU, *argv, memory: str = "1GiB") -> subprocess.Popen:
    """``argv`` started under ``fracgpu run --partition team``, in a partition ``team`` of ``memory`` made first."""
    gpu.fracgpu("partition", "create", "team", "--memory", memory)
    return gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", *argv)


def kill_and_read_books(gpu: SimGPU, holder: subprocess.Popen, name: str, within: float = 1.0) -> dict:
    """SIGKILL `holder` (a member of partition `name`), then read the partition's
    books until they are back to 0, for at most `within` seconds; the last read."""
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    killed = time.monotonic()
    while True:
        part = partition_books(gpu, name)
        if part["used"] == 0 or time.monotonic() - killed > within:
            return part
        time.sleep(0.02)


# The two ways a Python job takes a quota, for tests that try both.
HOW_JOBS_RUN = ("fracgpu run", "fracgpu.init")


def python_job(gpu: SimGPU, how: str, code: str, memory: str) -> str:
    """Run `code` as a job with a `memory` quota, `how` one of HOW_JOBS_RUN; its stdout."""
    if how == "fracgpu run":
        return gpu.fracgpu("run", "--memory", memory, "--", sys.executable, "-c", code).stdout
    return gpu.python(f"import fracgpu\nfracgpu.init(memory={memory!r})\n" + code).stdout
