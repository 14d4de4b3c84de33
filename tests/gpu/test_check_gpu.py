"""`fracgpu check` on a real GPU: every guarantee graded there holds, with the real context's
reservation, the real kernels and the real driver's launch cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fracgpu
from fracgpu.exercise.check import CHECKS


def test_every_check_holds_on_the_real_gpu(real):
    try:
        fracgpu.kernels_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    result = subprocess.run([sys.executable, "-m", "fracgpu", "check", "--json", "--gpu", "real"], env=real.env,
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert result.returncode == 0 and report["ok"], json.dumps(failed, indent=1) + result.stderr
    device = report["device"]
    assert device["simulated"] is False and device["context_reserve"] > 0
    assert [c["name"] for c in report["checks"]] == [c.name for c in CHECKS]
