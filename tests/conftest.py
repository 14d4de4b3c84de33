"""Shared fixtures: an isolated simulated GPU per test, and the compiled C clients.

Every test that runs CUDA code does it in a subprocess whose environment puts
the installed simulated driver first (``fracgpu.sim.environment``) and points
``FRACGPU_SIM_DIR`` at a folder of the test's own, so tests never share a
simulated GPU unless they mean to.
"""

from __future__ import annotations

from tests.support.simgpu import (  # noqa: F401  (fixtures and helpers the tests use)
    GiB,
    MiB,
    SimGPU,
    clients,
    gpu,
    kernels,
    make_gpu,
    parse_facts,
    shim,
    unlisted_nvml,
)


import signal  # noqa: E402

import pytest  # noqa: E402

# Tests press Ctrl-C (SIGINT) on the commands they start. A shell that starts pytest in the
# background (`python -m pytest &`, CI wrappers) makes it ignore SIGINT, and the commands would
# inherit that and never see it: give them the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path_factory, monkeypatch):
    """No test records jobs in the user's own ledger, even one that forgets to choose."""
    monkeypatch.setenv("FRACGPU_LEDGER", str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite"))
