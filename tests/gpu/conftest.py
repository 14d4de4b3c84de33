"""Tests on a real NVIDIA GPU, marked `gpu`. Without one they are skipped, with
the reason; on a machine with a GPU they run with the rest of the suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fracgpu.exercise.demo import real_gpu_available


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def real_gpu():
    if not real_gpu_available():
        pytest.skip("no NVIDIA GPU here: a working libcuda.so.1 with a device is needed for tests/gpu")


def framework(name: str, module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{name} is not installed ({module!r} cannot be imported)")


class RealGPU:
    """Runs Python snippets on the real GPU, with a state folder of the test's own."""

    def __init__(self, state_dir):
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("FRACGPU_") and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
        self.env["FRACGPU_STATE_DIR"] = str(state_dir)

    def run(self, argv, env=None, timeout=600):
        result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})})
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def under_run(self, memory: str, code: str, env=None):
        """`fracgpu run --memory MEMORY -- python -c CODE`."""
        return self.run([sys.executable, "-m", "fracgpu", "run", "--memory", memory, "--", sys.executable, "-c", code],
                        env=env)

    def with_init(self, memory: str, code: str, env=None):
        """`fracgpu.init(memory=MEMORY)` first thing, then CODE, in one process."""
        return self.run([sys.executable, "-c", f"import fracgpu\nfracgpu.init(memory={memory!r})\n{code}"], env=env)


@pytest.fixture
def real(real_gpu, tmp_path) -> RealGPU:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return RealGPU(state)
