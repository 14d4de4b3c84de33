"""Modules and libraries: their device globals take memory when they load, and
the partition is charged for them until they unload or their context ends.

The simulated driver reserves the `.global` variables a PTX image defines
(binary images define none there; the project's own kernels have no
globals); the shim reads their names from the image and their sizes from
the driver (cuModuleGetGlobal).
"""

from __future__ import annotations

import sys

import pytest

from tests.support.simgpu import CTYPES_PRELUDE, HOW_JOBS_RUN, GiB, MiB, parse_facts, python_job

TABLE = 256 * MiB


def ptx(*definitions: str) -> str:
    """A PTX module with these global definitions and the simulated kernels' names."""
    return "\n".join(["//", "// test module", "//", ".version 8.0", ".target sm_90", ".address_size 64", "",
                      *definitions, "",
                      ".visible .entry fracgpu_spin(.param .u64 ns)", "{",
                      "\tld.global.u32 %r1, [counter];", "\tret;", "}", ""])


GLOBALS = ptx(f".visible .global .align 8 .b8 table[{TABLE}];",
              ".global .align 4 .u32 counter;",
              ".extern .global .align 4 .u32 elsewhere;   // defined elsewhere: takes nothing here")


@pytest.fixture
def globals_ptx(tmp_path):
    path = tmp_path / "globals.ptx"
    path.write_text(GLOBALS)
    return path


@pytest.mark.parametrize("kind", ["lcuda", "dlopen"])
def test_module_globals_are_charged_while_loaded(clients, make_gpu, globals_ptx, kind):
    gpu = make_gpu(memory=2 * GiB)
    facts = gpu.facts(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--",
                      getattr(clients, kind), "module-load", globals_ptx)
    usable = GiB - gpu.context   # the quota less the job's context
    assert facts == {"result": "CUDA_SUCCESS", "loaded_free": str(usable - TABLE - 4), "unloaded_free": str(usable)}


def test_a_module_whose_globals_pass_the_quota_is_refused(clients, make_gpu, tmp_path):
    gpu = make_gpu(memory=2 * GiB + 512 * MiB)
    big = tmp_path / "big.ptx"
    big.write_text(ptx(f".global .align 8 .b8 huge[{2 * GiB}];", ".global .u32 counter;"))
    facts = gpu.facts(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--", clients.dlopen,
                      "module-load", big)
    # The whole quota but the context free: nothing else on the books, and the device has the 2 GiB back
    # (free is at most what the device has free: 512 MiB less the context had the module stayed).
    assert facts == {"result": "CUDA_ERROR_OUT_OF_MEMORY", "loaded_free": str(GiB - gpu.context)}


def test_the_simulated_gpu_reserves_ptx_globals_and_nothing_for_binary_modules(clients, gpu, globals_ptx, kernels):
    facts = gpu.facts(clients.lcuda, "module-load", globals_ptx)
    usable = GiB - gpu.context   # the device less the client's context
    assert facts["loaded_free"] == str(usable - TABLE - 512)   # the simulated driver rounds each to 512 bytes
    assert facts["unloaded_free"] == str(usable)
    facts = gpu.facts(clients.lcuda, "module-load", kernels)   # cuda/fracgpu_kernels.cu: no globals
    assert facts["loaded_free"] == str(usable)


# ctypes: cuModuleLoadData and cuLibraryLoadData with the PTX in memory;
# cuModuleGetGlobal; the globals go with their context.
CTYPES_MODULES = CTYPES_PRELUDE + f"""
IMAGE = {GLOBALS!r}.encode()
def free():
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == 0
    return f.value
m, lib, p, size = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64(), ctypes.c_size_t()
assert cuda.cuModuleLoadData(ctypes.byref(m), IMAGE) == 0
assert cuda.cuModuleGetGlobal_v2(ctypes.byref(p), ctypes.byref(size), m, b"table") == 0
print("table", size.value)
print("module", free())
assert cuda.cuLibraryLoadData(ctypes.byref(lib), IMAGE, None, None, 0, None, None, 0) == 0
print("library", free())
assert cuda.cuLibraryUnload(lib) == 0
print("library_unloaded", free())
own = ctypes.c_void_p()
assert cuda.cuCtxCreate_v2(ctypes.byref(own), 0, dev) == 0
assert cuda.cuModuleLoadData(ctypes.byref(m), IMAGE) == 0
print("second", free())
assert cuda.cuCtxDestroy_v2(own) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
print("destroyed", free())
"""


@pytest.mark.parametrize("how", HOW_JOBS_RUN)
def test_modules_and_libraries_from_memory(make_gpu, how):
    gpu = make_gpu(memory=2 * GiB)
    facts = parse_facts(python_job(gpu, how, CTYPES_MODULES, "1GiB"))
    one = TABLE + 4
    usable = GiB - gpu.context   # the quota less the primary context; the second context is charged as much
    assert facts == {"table": str(TABLE), "module": str(usable - one), "library": str(usable - 2 * one),
                     "library_unloaded": str(usable - one), "second": str(usable - gpu.context - 2 * one),
                     "destroyed": str(usable - one)}   # the first module stays; the second went with its context
