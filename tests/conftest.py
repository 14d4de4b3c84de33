"""Shared fixtures: an isolated simulated GPU per test, and the compiled C clients.

Every test that runs CUDA code does it in a subprocess whose environment puts
the installed simulated driver first (``fracgpu.sim.environment``) and points
``FRACGPU_SIM_DIR`` at a folder of the test's own, so tests never share a
simulated GPU unless they mean to.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess

import pytest

from fracgpu import sim
from simgpu import CLIENT_SOURCE, GiB, MiB, ROOT, SimGPU, cuda_include_dir, parse_facts, shim_path  # noqa: F401


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
