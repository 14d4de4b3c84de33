"""The example jobs with PyTorch on a real GPU, under a quota: the batch the quota refuses is halved
until it fits, and the server answers what fits (skipped without a GPU or without PyTorch)."""

from __future__ import annotations

import sys

from tests.gpu.conftest import framework
from tests.support import ROOT


def test_the_examples_with_pytorch_under_a_quota(real):
    framework("PyTorch", "torch")
    out = real.run([sys.executable, "-m", "fracgpu", "run", "--memory", "2GiB", "--", sys.executable,
                    ROOT / "examples" / "train.py", "--framework", "torch", "--batch", "4GiB"]).stdout
    assert "train: a batch of 4GiB was refused (out of memory)" in out and "every step's writes read back" in out
    out = real.run([sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--", sys.executable,
                    ROOT / "examples" / "serve.py", "--framework", "torch", "--requests", "50"]).stdout
    assert "serve: 50 answered" in out
