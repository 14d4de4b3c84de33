"""The ledger on a real GPU: a job of known kernel time (the real fracgpu_spin kernel) under
`fracgpu run` is in `fracgpu report` with that device time within 5% and its exact peak, both
alone on the GPU (launches measured outside the gate) and capped (every launch measured)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import fracgpu

from tests.shim.test_accounting import JOB   # the simulated GPU test's job: MIB, then 1 MiB more, N spins of MS


@pytest.mark.parametrize("options", [["--memory", "2GiB"], ["--memory", "2GiB", "--compute", "100%", "--cap"]],
                         ids=["alone", "gated"])
def test_device_time_and_peak_in_the_report(real, tmp_path, options):
    pytest.importorskip("cuda.bindings")
    try:
        module = str(fracgpu.kernels_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ledger = tmp_path / "ledger.sqlite"
    env = {"FRACGPU_LEDGER": str(ledger)}
    real.run([sys.executable, "-m", "fracgpu", "run", *options, "--", sys.executable, "-c", JOB, module, "96", "200",
              "2", "0"], env=env)
    (job,) = json.loads(real.run([sys.executable, "-m", "fracgpu", "report", "--format", "json"], env=env).stdout)
    assert abs(job["gpu_seconds"] - 0.4) <= 0.02, job        # 200 kernels of 2 ms
    assert job["peak_memory_bytes"] == 97 << 20 and job["exit_status"] == 0   # 96 MiB, then 1 MiB more
    assert os.path.exists(ledger)
