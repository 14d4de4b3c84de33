"""A minimal ctypes client of the CUDA driver API, for fracgpu's own jobs (the
demo, benchmarks): no dependency beyond the driver itself.

It loads ``libcuda.so.1`` the way every CUDA program does, so it gets
whatever the environment selects: a real driver, the simulated one, or the
fracgpu shim in front of either.
"""

from __future__ import annotations

import ctypes
import os

CUDA_SUCCESS = 0


class CudaError(RuntimeError):
    def __init__(self, call: str, code: int, name: str):
        super().__init__(f"{call} failed: {name} ({code})")
        self.call, self.code, self.name = call, code, name


class Driver:
    """One process's use of device 0 through its primary context."""

    def __init__(self, library: str = "libcuda.so.1", device: int = 0):
        self.lib = ctypes.CDLL(library, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
        self._check("cuInit", self.lib.cuInit(0))
        self.device = ctypes.c_int()
        self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(self.device), device))
        self.context = ctypes.c_void_p()
        self._check("cuDevicePrimaryCtxRetain",
                    self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device))
        self._check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(self.context))
        self._spin = self._fill = None

    def _check(self, call: str, code: int) -> None:
        if code != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(code, ctypes.byref(name))
            raise CudaError(call, code, (name.value or b"unknown error").decode())

    def name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._check("cuDeviceGetName", self.lib.cuDeviceGetName(buf, len(buf), self.device))
        return buf.value.decode(errors="replace")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes, as cuMemGetInfo_v2 reports them."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check("cuMemGetInfo_v2", self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    def try_alloc(self, size: int) -> tuple[int, int]:
        """(CUresult, device pointer): no exception, so callers can count refusals."""
        ptr = ctypes.c_uint64()
        rc = self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size))
        return rc, ptr.value

    def alloc(self, size: int) -> int:
        rc, ptr = self.try_alloc(size)
        self._check("cuMemAlloc_v2", rc)
        return ptr

    def free(self, ptr: int) -> None:
        self._check("cuMemFree_v2", self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)))

    def load_kernels(self, module_path: str) -> None:
        module, spin, fill = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self._check("cuModuleLoad", self.lib.cuModuleLoad(ctypes.byref(module), os.fsencode(module_path)))
        self._check("cuModuleGetFunction", self.lib.cuModuleGetFunction(ctypes.byref(spin), module, b"fracgpu_spin"))
        self._check("cuModuleGetFunction", self.lib.cuModuleGetFunction(ctypes.byref(fill), module, b"fracgpu_fill"))
        self._spin, self._fill = spin, fill

    def _launch(self, function, grid: int, block: int, *args) -> None:
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        self._check("cuLaunchKernel",
                    self.lib.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, None, params, None))

    def spin(self, seconds: float) -> None:
        """Occupy the device for `seconds` (fracgpu_spin), asynchronously."""
        self._launch(self._spin, 1, 32, ctypes.c_ulonglong(int(seconds * 1e9)))

    def fill(self, ptr: int, value: int, count: int) -> None:
        self._launch(self._fill, 64, 256, ctypes.c_uint64(ptr), ctypes.c_uint(value), ctypes.c_ulonglong(count))

    def read_u32(self, ptr: int, count: int) -> list[int]:
        """``count`` 32-bit values copied from device memory at ``ptr``."""
        back = (ctypes.c_uint * count)()
        self._check("cuMemcpyDtoH_v2",
                    self.lib.cuMemcpyDtoH_v2(back, ctypes.c_uint64(ptr), ctypes.c_size_t(count * 4)))
        return list(back)

    def synchronize(self) -> None:
        self._check("cuCtxSynchronize", self.lib.cuCtxSynchronize())
