"""Benchmarks run on the simulated GPU unless told otherwise; each compares
fracgpu against the bare driver side by side in the same run.

    python -m pytest benchmarks --benchmark-enable

The figures that matter (ns per driver call, and the ratio) are computed from
timings taken inside the C benchmark program and stored in each benchmark's
`extra_info`; pytest-benchmark's own times include process start-up.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from fracgpu import sim
from tests.support.simgpu import SimGPU, clients, cuda_include_dir, kernels, make_gpu, shim  # noqa: F401

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def driver_bench(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("bench") / "driver_bench"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", f"-I{cuda_include_dir()}", str(HERE / "driver_bench.c"),
                    "-o", str(out), f"-L{sim.library_dir()}", "-l:libcuda.so.1"], check=True)
    return out


@pytest.fixture
def bench_gpu(tmp_path) -> SimGPU:
    return SimGPU(tmp_path / "sim", memory=64 << 30)
