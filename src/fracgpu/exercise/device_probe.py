"""The device probe: the CUDA devices this process's environment shows, asked of libcuda.so.1.

Run as its own interpreter (``devices.probe_command``: ``python -S .../fracgpu/exercise/device_probe.py``), it
prints them, or what is wrong, as one line of JSON, which ``fracgpu.devices`` reads. It imports
nothing of fracgpu and nothing beyond ctypes and json, so the probe starts in a bare interpreter;
``fracgpu.devices`` re-exports what it defines.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__" and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]   # run as a script: fracgpu's own modules never stand in for the standard library's

NO_DRIVER_HINT = 'install the NVIDIA driver, or use the simulated GPU: eval "$(fracgpu sim env)"'


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


def nvml_processes(uuids: list[str]) -> tuple[dict[str, list[list[int]]], str]:
    """In the probe process: what NVML says each process holds on each GPU of ``uuids`` (the
    device's own figure, contexts included), as ``{uuid: [[pid, bytes], ...]}``, a GPU NVML
    cannot answer for left out (no NVML: an empty dict); and the NVIDIA driver's version
    (``nvmlSystemGetDriverVersion``, "580.65.06"), "" when NVML cannot say."""
    import ctypes

    class ProcessInfo(ctypes.Structure):   # nvmlProcessInfo_t (_v2 and _v3 share it)
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                    ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        listing = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v3", None) or \
            nvml.nvmlDeviceGetComputeRunningProcesses_v2
    except (OSError, AttributeError):
        return {}, ""
    if nvml.nvmlInit_v2() != 0:
        return {}, ""
    out = {}
    try:
        text = ctypes.create_string_buffer(96)   # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE is 80
        version = text.value.decode(errors="replace") if nvml.nvmlSystemGetDriverVersion(text, len(text)) == 0 else ""
        for uuid in uuids:
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
                continue
            count = ctypes.c_uint(0)
            for _ in range(4):   # processes may start between the two calls
                infos = (ProcessInfo * max(1, count.value))()
                rc = listing(handle, ctypes.byref(count), infos)
                if rc != 7:   # NVML_ERROR_INSUFFICIENT_SIZE: count holds what is needed now
                    break
                count = ctypes.c_uint(count.value + 8)
            if rc == 0:
                out[uuid] = [[infos[i].pid, infos[i].usedGpuMemory] for i in range(count.value)]
    finally:
        nvml.nvmlShutdown()
    return out, version


def list_devices() -> dict:
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
    version = ctypes.c_int()   # optional, as the bus id: 13000 is CUDA 13.0
    driver_version = (f"{version.value // 1000}.{version.value % 1000 // 10}"
                      if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else "")
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
        major, minor = ctypes.c_int(), ctypes.c_int()   # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, _MINOR
        capability = (f"{major.value}.{minor.value}" if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) == 0
                      and cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) == 0 else "")
        devices.append({"index": index, "uuid": uuid_text(bytes(uuid)), "name": name.value.decode(errors="replace"),
                        "total_memory": total.value, "pci_bus_id": bus_id, "compute_capability": capability,
                        "driver_version": driver_version})
    held, nvidia_driver = nvml_processes([d["uuid"] for d in devices])
    for d in devices:
        d["processes"] = held.get(d["uuid"])
        d["nvidia_driver_version"] = nvidia_driver
    return {"devices": devices}


if __name__ == "__main__":
    print(json.dumps(list_devices()))
