"""What both examples share: sizes as people write them, and the GPU through cuda-bindings
(``cuda.bindings.driver``, imported when a ``GPU`` is made, so the PyTorch variants do not need it).

cuda-bindings opens ``libcuda.so.1`` like every CUDA program, so the same code runs on a real GPU, on
fracgpu's simulated one (``fracgpu sim``), and under ``fracgpu run``, which holds it to a quota: an
allocation past the quota fails with ``CUDA_ERROR_OUT_OF_MEMORY``, the error a full GPU gives.

The kernels are fracgpu's own (``fracgpu_fill`` writes a value over a buffer, ``fracgpu_spin`` keeps
the GPU busy for a given time), built for real GPUs with the package and known by name to the
simulated one.
"""

from __future__ import annotations

class CudaError(RuntimeError):
    pass


def check(result):
    """The values a driver call returned, or CudaError naming what went wrong."""
    from cuda.bindings import driver as cu

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise CudaError(f"CUDA error {err.name}")
    return values[0] if len(values) == 1 else values


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale and n % (scale // 16) == 0:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


def parse_size(text: str) -> int:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * scale)
    return int(text)


def kernels_file() -> str:
    """fracgpu's kernels for this GPU (the simulated one runs them by name from any module file)."""
    import fracgpu

    try:
        return str(fracgpu.kernels_path())
    except FileNotFoundError:   # fracgpu built without nvcc: only the simulated GPU can run these examples
        from fracgpu import sim
        return sim.kernel_stand_in()


class GPU:
    """Device 0 with its primary context current, a stream, and fracgpu's two kernels."""

    def __init__(self):
        from cuda.bindings import driver as cu

        self.cu = cu
        check(cu.cuInit(0))
        self.device = check(cu.cuDeviceGet(0))
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.device))
        check(cu.cuCtxSetCurrent(self.context))
        self.stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
        module = check(cu.cuModuleLoad(kernels_file().encode()))
        self._fill = check(cu.cuModuleGetFunction(module, b"fracgpu_fill"))
        self._spin = check(cu.cuModuleGetFunction(module, b"fracgpu_spin"))

    def name(self) -> str:
        return check(self.cu.cuDeviceGetName(128, self.device)).split(b"\0")[0].decode()

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes as this process sees them: under ``fracgpu run --memory``, its quota."""
        return tuple(check(self.cu.cuMemGetInfo()))

    def try_alloc(self, size: int):
        """A buffer of ``size`` bytes, or None when the GPU (or the quota) refuses it."""
        err, ptr = self.cu.cuMemAlloc(size)
        if err == self.cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            return None
        check(err)
        return ptr

    def free(self, ptr) -> None:
        check(self.cu.cuMemFree(ptr))

    def _launch(self, function, blocks: int, threads: int, *args) -> None:
        import numpy as np

        pointers = np.array([a.ctypes.data for a in args], np.uint64)
        check(self.cu.cuLaunchKernel(function, blocks, 1, 1, threads, 1, 1, 0, self.stream, pointers.ctypes.data, 0))

    def fill(self, ptr, value: int, count: int) -> None:
        """Write ``value`` into ``count`` 32-bit words at ``ptr``."""
        import numpy as np

        self._launch(self._fill, 64, 256, np.array([int(ptr)], np.uint64), np.array([value], np.uint32),
                     np.array([count], np.uint64))

    def spin(self, ns: int) -> None:
        """Keep the GPU busy for ``ns`` nanoseconds (a kernel that stands in for real work)."""
        import numpy as np

        self._launch(self._spin, 1, 1, np.array([ns], np.uint64))

    def read_word(self, ptr, index: int) -> int:
        import numpy as np

        word = np.zeros(1, np.uint32)
        check(self.cu.cuMemcpyDtoHAsync(word.ctypes.data, int(ptr) + 4 * index, 4, self.stream))
        self.synchronize()
        return int(word[0])

    def synchronize(self) -> None:
        check(self.cu.cuStreamSynchronize(self.stream))
