"""The GPUs this machine has, as a job would see them: index, UUID, name, memory.

The CUDA driver is asked in a child process (``python -m fracgpu.devices``, ``probe_command``),
never in the caller: a process that loads the driver can no longer put the
fracgpu shim in front of it (``fracgpu.init()``), and the command line stays
free of driver state. The child sees the devices a job would see
(``CUDA_VISIBLE_DEVICES`` as it is set), but never through the shim: entries
of ``LD_PRELOAD`` that are the shim, and the variables that would put the
child in a partition, are dropped from its environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping

from fracgpu import settings, shim

__all__ = ["Device", "DeviceError", "pci_bus_id", "probe", "probe_environment", "uuid_text"]

NO_DRIVER_HINT = 'install the NVIDIA driver, or use the simulated GPU: eval "$(fracgpu sim env)"'
PROBE_TIMEOUT_S = 120   # cuInit on a machine with many GPUs can take tens of seconds


# What to show while the driver is asked (it can take a minute on a real GPU): a context manager
# around each probe. The library shows nothing; the command line puts a spinner here.
probe_progress: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class DeviceError(RuntimeError):
    """No usable CUDA driver or device; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Device:
    index: int          # CUDA device ordinal, as CUDA_VISIBLE_DEVICES makes them
    uuid: str           # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", the key of its shared state
    name: str
    total_memory: int   # bytes
    pci_bus_id: str = ""   # "00000000:3B:00.0", as NVML and dcgm-exporter write it; "" when the driver cannot say


def uuid_text(raw: bytes) -> str:
    """The 16 bytes of cuDeviceGetUuid_v2 as NVIDIA writes them: ``GPU-8-4-4-4-12`` lowercase hex.

    The shim writes the same text (the name of each GPU's shared state)."""
    if len(raw) != 16:
        raise ValueError(f"a GPU UUID has 16 bytes, not {len(raw)}")
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def pci_bus_id(text: str) -> str:
    """CUDA's ``0000:3b:00.0`` as NVML writes it (``00000000:3B:00.0``: an 8-digit domain, upper case)."""
    domain, sep, rest = text.strip().partition(":")
    return f"{domain.zfill(8)}:{rest}".upper() if sep else text.strip().upper()


def probe_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without the shim: no partition, no shim preloaded."""
    env = dict(os.environ if env is None else env)
    for name in settings.JOB_VARIABLES:
        env.pop(name, None)
    if "LD_PRELOAD" in env:
        nvml = shim.nvml_shim_path() if shim.is_installed() else None
        kept = [entry for entry in shim.split_preload(env["LD_PRELOAD"])
                if not shim.is_shim(entry) and not (nvml and shim.is_shim(entry, nvml))]
        if kept:
            env["LD_PRELOAD"] = ":".join(kept)
        else:
            del env["LD_PRELOAD"]
    return env


def probe_command() -> list[str]:
    """The probe's command line: ``python -m fracgpu.devices``. From a regular install (the
    native module beside the package) the interpreter starts without its site hooks (``-S``:
    site-packages' ``.pth`` files, which the probe does not need and which can cost it tens of
    milliseconds), and finds fracgpu where this process found it; any other install, as a module."""
    package = os.path.dirname(os.path.abspath(__file__))
    if not any(name.startswith("_native") and name.endswith(".so") for name in os.listdir(package)):
        return [sys.executable, "-m", "fracgpu.devices"]
    code = f"import sys; sys.path.insert(0, {os.path.dirname(package)!r}); from fracgpu import devices; devices.main()"
    return [sys.executable, "-S", "-c", code]


def probe(env: Mapping[str, str] | None = None) -> list[Device]:
    """The CUDA devices a job started with ``env`` (default: this process's) would see.

    Raises DeviceError, with what to do, when there is no driver or no device."""
    try:
        with probe_progress():
            result = subprocess.run(probe_command(), env=probe_environment(env),
                                    capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the CUDA driver did not list the devices within {PROBE_TIMEOUT_S} s") from None
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise DeviceError(f"cannot list the CUDA devices: the probe failed ({detail})")
    if "error" in answer:
        raise DeviceError(answer["error"])
    return [Device(**d) for d in answer["devices"]]


def _list_devices() -> dict:
    """In the probe process: ask libcuda.so.1 (whichever the environment selects)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return {"error": f"no CUDA driver found ({e}); {NO_DRIVER_HINT}"}

    def error_name(code: int) -> str:
        name = ctypes.c_char_p()
        if cuda.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode()} ({code})"
        return f"error {code}"

    rc = cuda.cuInit(0)
    if rc != 0:
        return {"error": f"the CUDA driver cannot start: cuInit failed with {error_name(rc)}; {NO_DRIVER_HINT}"}
    count = ctypes.c_int()
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return {"error": f"cuDeviceGetCount failed with {error_name(rc)}"}
    if count.value == 0:
        return {"error": f"the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES); {NO_DRIVER_HINT}"}
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
    devices = []
    for index in range(count.value):
        dev, uuid, total = ctypes.c_int(), (ctypes.c_ubyte * 16)(), ctypes.c_size_t()
        name = ctypes.create_string_buffer(256)
        calls = (("cuDeviceGet", cuda.cuDeviceGet, (ctypes.byref(dev), index)),
                 ("cuDeviceGetUuid_v2", get_uuid, (uuid, dev)),
                 ("cuDeviceGetName", cuda.cuDeviceGetName, (name, len(name), dev)),
                 ("cuDeviceTotalMem_v2", cuda.cuDeviceTotalMem_v2, (ctypes.byref(total), dev)))
        for call, function, args in calls:   # in order: each needs `dev` from the first
            rc = function(*args)
            if rc != 0:
                return {"error": f"{call} failed for CUDA device {index} with {error_name(rc)}"}
        bus = ctypes.create_string_buffer(32)   # optional: a driver without it still lists the device
        bus_id = pci_bus_id(bus.value.decode()) if cuda.cuDeviceGetPCIBusId(bus, len(bus), dev) == 0 else ""
        devices.append({"index": index, "uuid": uuid_text(bytes(uuid)), "name": name.value.decode(errors="replace"),
                        "total_memory": total.value, "pci_bus_id": bus_id})
    return {"devices": devices}


def main() -> None:
    """The probe process: the devices (or the error) as one line of JSON."""
    print(json.dumps(_list_devices()))


if __name__ == "__main__":
    main()
