"""PyTorch, CuPy and JAX under a memory quota on a real GPU: each sees the quota
as the device's memory and gets its own out-of-memory error at it, never above.

Each job prints "key value" lines: what it saw, and how much it held when the
framework refused (read from the framework's own counters and the driver's)."""

from __future__ import annotations

import pytest

from tests.support.simgpu import parse_facts

GiB = 1 << 30
QUOTA = "2GiB"
MODES = ["run", "init"]

TORCH = """
import torch
free, total = torch.cuda.mem_get_info()
print("total", total)
print("props_total", torch.cuda.get_device_properties(0).total_memory)
blocks = []
try:
    while True:
        blocks.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError:
    print("oom torch.OutOfMemoryError")
print("held", sum(b.numel() for b in blocks))
print("reserved", torch.cuda.memory_reserved())
"""

CUPY = """
import cupy
free, total = cupy.cuda.runtime.memGetInfo()
print("total", total)
print("props_total", cupy.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"])
blocks = []
try:
    while True:
        blocks.append(cupy.empty(64 << 20, dtype=cupy.uint8))
except cupy.cuda.memory.OutOfMemoryError:
    print("oom cupy.cuda.memory.OutOfMemoryError")
print("held", sum(b.nbytes for b in blocks))
print("reserved", cupy.get_default_memory_pool().total_bytes())
"""

JAX = """
import jax, jax.numpy as jnp
dev = jax.devices("gpu")[0]
print("total", dev.memory_stats()["bytes_limit"])
print("props_total", dev.memory_stats()["bytes_limit"])
blocks = []
try:
    while True:
        blocks.append(jnp.ones((64 << 20,), dtype=jnp.uint8).block_until_ready())
except Exception as e:   # XlaRuntimeError: RESOURCE_EXHAUSTED
    assert "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower(), e
    print("oom RESOURCE_EXHAUSTED")
print("held", sum(b.nbytes for b in blocks))
print("reserved", dev.memory_stats().get("peak_bytes_in_use", 0))
"""


def check(facts, expect_oom):
    assert int(facts["total"]) <= 2 * GiB
    assert facts["oom"] == expect_oom
    assert 0 < int(facts["held"]) <= 2 * GiB
    assert int(facts["reserved"]) <= 2 * GiB


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True"])
def test_pytorch(real, mode, alloc_conf):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    env = {"PYTORCH_CUDA_ALLOC_CONF": alloc_conf} if alloc_conf else {}
    out = (real.under_run if mode == "run" else real.with_init)(QUOTA, TORCH, env=env)
    facts = parse_facts(out.stdout)
    assert int(facts["total"]) == int(facts["props_total"]) == 2 * GiB
    check(facts, "torch.OutOfMemoryError")


@pytest.mark.parametrize("mode", MODES)
def test_cupy(real, mode):
    pytest.importorskip("cupy", reason="CuPy is not installed")
    facts = parse_facts((real.under_run if mode == "run" else real.with_init)(QUOTA, CUPY).stdout)
    assert int(facts["total"]) == int(facts["props_total"]) == 2 * GiB
    check(facts, "cupy.cuda.memory.OutOfMemoryError")


@pytest.mark.parametrize("mode", MODES)
def test_jax(real, mode):
    pytest.importorskip("jax", reason="JAX is not installed")
    # XLA preallocates a fraction of what the driver reports as the device's memory.
    facts = parse_facts((real.under_run if mode == "run" else real.with_init)(QUOTA, JAX).stdout)
    check(facts, "RESOURCE_EXHAUSTED")
