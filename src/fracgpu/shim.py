"""Where the driver shim is, and the real driver it forwards to.

``libfracgpu.so`` (installed in ``fracgpu/_shim``) has the SONAME
``libcuda.so.1``. Loaded before anything opens the driver, by ``LD_PRELOAD``
(``fracgpu run``) or in-process with ``RTLD_GLOBAL`` (``fracgpu.init()``), it
is what every later ``dlopen("libcuda.so.1")`` returns. It opens the real
driver itself, by the absolute path in ``FRACGPU_REAL_LIBCUDA``; this module
finds that path the way the shim would, so a job is told it explicitly.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
from collections.abc import Mapping

__all__ = ["shim_path", "nvml_shim_path", "is_shim", "split_preload", "preload_with_shim", "find_real_driver"]

DRIVER = "libcuda.so.1"
# After LD_LIBRARY_PATH and the loader cache: where driver packages put it.
DRIVER_FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib", "/usr/local/nvidia/lib64")
# How `ldconfig -p` names this machine's architecture, to skip 32-bit and foreign entries.
_LDCONFIG_ARCH = {"x86_64": "x86-64", "aarch64": "AArch64", "ppc64le": "64bit"}


def shim_path() -> pathlib.Path:
    """The installed shim, ``fracgpu/_shim/libfracgpu.so``; FileNotFoundError when missing."""
    # Beside this module (an installed package is files on disk: the loader can only map those), without
    # importlib.resources, which costs every `fracgpu run` about 10 ms to import.
    path = pathlib.Path(__file__).parent / "_shim" / "libfracgpu.so"
    if not path.is_file():
        raise FileNotFoundError(
            f"fracgpu's driver shim is not installed ({path} is missing); install fracgpu with pip "
            "(`pip install .` in a checkout) to build it"
        )
    return path


def is_shim(path: str | os.PathLike, shim: str | os.PathLike | None = None) -> bool:
    """Whether ``path`` is the shim (the same file, whatever it is called)."""
    try:
        return os.path.samefile(path, shim if shim is not None else shim_path())
    except (OSError, ValueError):   # a missing file, or no shim installed
        return False


def split_preload(value: str) -> list[str]:
    """The entries of an ``LD_PRELOAD`` value (the loader accepts ':' and spaces between them)."""
    return [entry for entry in re.split(r"[:\s]+", value) if entry]


def is_installed() -> bool:
    try:
        shim_path()
        return True
    except FileNotFoundError:
        return False


def nvml_shim_path(shim: str | os.PathLike | None = None) -> str | None:
    """The NVML shim installed beside the driver shim (``libfracgpu-nvml.so``), or None."""
    folder = os.path.dirname(os.fspath(shim if shim is not None else shim_path()))
    path = os.path.join(folder, "libfracgpu-nvml.so")
    return path if os.path.isfile(path) else None


def preload_with_shim(existing: str | None, shim: str | os.PathLike, *extra: str | os.PathLike) -> str:
    """``LD_PRELOAD`` with the shim (then ``extra`` libraries) first and every other entry kept, in order."""
    ours = [os.fspath(shim), *map(os.fspath, extra)]
    others = [entry for entry in split_preload(existing or "") if not any(is_shim(entry, o) for o in ours)]
    return ":".join([*ours, *others])


def find_real_driver(env: Mapping[str, str] | None = None, shim: str | os.PathLike | None = None) -> str | None:
    """The absolute path of the real ``libcuda.so.1`` a job with ``env`` would use, or None.

    Looked for on ``LD_LIBRARY_PATH``, then in the loader cache (``ldconfig -p``),
    then in the usual driver folders; the shim itself is never the answer. On
    the simulated GPU, ``LD_LIBRARY_PATH`` holds ``fracgpu/_sim``, so the
    simulated driver is found."""
    env = os.environ if env is None else env
    if shim is None:
        try:
            shim = shim_path()
        except FileNotFoundError:
            shim = None
    folders = [folder for folder in env.get("LD_LIBRARY_PATH", "").split(":") if folder]

    def candidates():   # in order, and lazily: `ldconfig -p` (a process) only when LD_LIBRARY_PATH has none
        yield from (os.path.join(folder, DRIVER) for folder in folders)
        yield from _loader_cache()
        yield from (os.path.join(folder, DRIVER) for folder in DRIVER_FOLDERS)

    for path in candidates():
        path = os.path.abspath(path)
        if os.path.isfile(path) and os.access(path, os.R_OK) and not (shim and is_shim(path, shim)):
            return path
    return None


def _loader_cache() -> list[str]:
    """``libcuda.so.1`` entries of ``ldconfig -p`` for this machine's architecture."""
    arch = _LDCONFIG_ARCH.get(os.uname().machine)
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
            break
        except (OSError, subprocess.TimeoutExpired):
            continue
    else:
        return []
    paths = []
    for line in out.splitlines():
        # "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"
        match = re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S.*)$", line)
        if match and match.group(1) == DRIVER and (arch is None or arch in match.group(2)):
            paths.append(match.group(3).strip())
    return paths
