"""fracgpu: share one NVIDIA GPU between jobs, with memory quotas, compute shares and accounting.

Importing fracgpu is cheap: it loads no CUDA library and starts no process, and what only
some callers need (the version, ``init``, ``usage`` and its types) is loaded when first asked
for: ``fracgpu run`` starts every job, so its start-up is every job's.

The package is a plain library with the command line on top (``fracgpu.cli``,
the only code that imports click or rich; nothing else imports it):

- ``settings``: every ``FRACGPU_*`` variable, one row each; ``units``: sizes and shares;
- ``state``: the shared state (the one owner of ``_native``'s regions), as typed objects;
- ``jobs``: a job's options parsed once (``JobSpec``) and the environment that enforces them;
  ``partitions``: named partitions; ``devices``: the GPUs a job sees; ``shim``: the installed shims;
- ``snapshot``: usage with the compute share achieved; ``metrics``: the Prometheus collector;
- ``ledger`` and ``recorder``: accounting; ``billing``: the bill (reserved and used, priced in decimal);
  ``plot``: the report's figure;
- ``ray`` and ``slurm``: the cluster integrations; ``sim``: the simulated GPU;
- ``config``: the node's configuration file; ``cdi``: CDI specs for containers; ``node``: the node agent;
- ``in_process``: ``init()``, the shim loaded into the calling process.

The jobs that exercise a node (``fracgpu check``'s probes, the latency probe, the demo's jobs, the
device probe) are the sub-package ``fracgpu.exercise``; the library and the command line start them
as processes.
"""

from __future__ import annotations

import pathlib

from fracgpu.units import format_share, format_size, parse_share, parse_size

__all__ = ["__version__", "init", "InitError", "usage", "GPUUsage", "PartitionUsage", "ProcessUsage",
           "kernels_path", "parse_size", "parse_share", "format_size", "format_share"]


def kernels_path() -> pathlib.Path:
    """The fatbin of fracgpu's CUDA kernels installed with the package.

    Raises FileNotFoundError when the package was built without nvcc.
    """
    import importlib.resources

    fatbin = importlib.resources.files(__name__) / "kernels" / "fracgpu_kernels.fatbin"
    if not fatbin.is_file():
        raise FileNotFoundError(
            f"fracgpu's CUDA kernels are not installed ({fatbin} is missing): this package was "
            "built without nvcc. Set CUDA_HOME to a CUDA toolkit, or `pip install nvidia-cuda-nvcc`, "
            "then rebuild fracgpu (`pip install --force-reinstall --no-binary fracgpu fracgpu`, or "
            "`pip install .` in a checkout). The simulated GPU does not need the kernels."
        )
    return pathlib.Path(str(fatbin))


def _version() -> str:
    import importlib.metadata   # about 15 ms (it imports the email package): only when asked

    try:
        return importlib.metadata.version("fracgpu")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()["__version__"] = version = _version()
        return version
    # init() needs ctypes and the device probe; they are imported when it is first asked for.
    if name in ("init", "InitError"):
        from fracgpu import in_process

        return getattr(in_process, name)
    # The state's typed objects, loaded when first asked for.
    if name in _STATE_NAMES:
        from fracgpu import state

        return getattr(state, name)
    raise AttributeError(f"module 'fracgpu' has no attribute {name!r}")


_STATE_NAMES = ("usage", "GPUUsage", "PartitionUsage", "ProcessUsage")


def __dir__() -> list[str]:
    return sorted({*globals(), "__version__", "init", "InitError", *_STATE_NAMES})
