"""The ledger on a real GPU: a job of known kernel time (the real fracgpu_spin kernel) under
`fracgpu run` is in `fracgpu report` with that device time within 5% and its exact peak, both
alone on the GPU (launches measured outside the gate) and capped (every launch measured)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import fracgpu

JOB = r"""
import sys
import numpy as np
from cuda.bindings import driver as cu

def ck(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values

ck(cu.cuInit(0))
ctx = ck(cu.cuDevicePrimaryCtxRetain(ck(cu.cuDeviceGet(0))))
ck(cu.cuCtxSetCurrent(ctx))
spin = ck(cu.cuModuleGetFunction(ck(cu.cuModuleLoad(sys.argv[1].encode())), b"fracgpu_spin"))
buf = ck(cu.cuMemAlloc(96 << 20))
ns = np.array([int(float(sys.argv[3]) * 1e6)], np.uint64)
args = np.array([ns.ctypes.data], np.uint64)
stream = ck(cu.cuStreamCreate(0))
for i in range(int(sys.argv[2])):
    ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args.ctypes.data, 0))
ck(cu.cuStreamSynchronize(stream))
ck(cu.cuMemFree(buf))
"""


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
    real.run([sys.executable, "-m", "fracgpu", "run", *options, "--", sys.executable, "-c", JOB, module, "200", "2"],
             env=env)
    (job,) = json.loads(real.run([sys.executable, "-m", "fracgpu", "report", "--format", "json"], env=env).stdout)
    assert abs(job["gpu_seconds"] - 0.4) <= 0.02, job        # 200 kernels of 2 ms
    assert job["peak_memory_bytes"] == 96 << 20 and job["exit_status"] == 0
    assert os.path.exists(ledger)
