"""The kernels' architectures follow the nvcc at hand: each of FRACGPU_CUDA_ARCHS
that it can build, plus PTX of the newest of them for GPUs newer still. An nvcc
of CUDA 12.0-12.7 cannot build 100 or 120, and the build must go on without
them rather than fail.

The project is only configured (a few seconds), with a stand-in nvcc that
answers ``--list-gpu-code`` as a given CUDA release's does; the fatbin command
it would run is read from the generated build files."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT

# What `nvcc --list-gpu-code` prints, by release (real architectures only; 12.8 adds 100, 101 and 120).
CUDA_12_4 = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90)
CUDA_12_8 = (*CUDA_12_4, 100, 101, 120)


def tool(name: str) -> str:
    """A build tool from the test extra (beside this Python), else from PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is needed to configure the build: pip install '.[test]'")
    return found


def configure(tmp_path: pathlib.Path, codes: tuple[int, ...]) -> tuple[str, set[str]]:
    """Configure the project with an nvcc that builds ``codes``: CMake's output and the -gencode flags."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    listing = "\n".join(f"sm_{code}" for code in codes)
    nvcc.write_text(f'#!/bin/sh\n[ "$1" = --list-gpu-code ] && printf "%s\\n" "{listing}" && exit 0\nexit 1\n')
    nvcc.chmod(0o755)
    build = tmp_path / "build"
    argv = [tool("cmake"), "-S", str(ROOT), "-B", str(build), "-DFRACGPU_BUILD_PYTHON=OFF",
            f"-DFRACGPU_NVCC={nvcc}", f"-DPython_EXECUTABLE={sys.executable}"]
    ninja = pathlib.Path(sys.executable).parent / "ninja"
    if ninja.exists() or shutil.which("ninja"):
        argv += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja if ninja.exists() else shutil.which('ninja')}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "CUDA_HOME"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    flags = set()
    for path in build.rglob("*"):
        if path.is_file() and path.suffix in ("", ".ninja", ".make"):
            flags |= set(re.findall(r"-gencode=arch=compute_\d+,code=(?:sm|compute)_\d+", path.read_text(errors="replace")))
    return result.stdout, flags


def gencode(*real: int, ptx: int) -> set[str]:
    return {f"-gencode=arch=compute_{a},code=sm_{a}" for a in real} | {f"-gencode=arch=compute_{ptx},code=compute_{ptx}"}


def test_an_older_nvcc_builds_what_it_can_with_ptx_of_its_newest(tmp_path):
    out, flags = configure(tmp_path, CUDA_12_4)
    assert flags == gencode(75, 80, 86, 89, 90, ptx=90)
    assert "this nvcc cannot build 100;120" in out


def test_a_current_nvcc_builds_every_wanted_architecture_with_ptx_of_the_newest(tmp_path):
    out, flags = configure(tmp_path, CUDA_12_8)
    assert flags == gencode(75, 80, 86, 89, 90, 100, 120, ptx=120)
    assert "cannot build" not in out
