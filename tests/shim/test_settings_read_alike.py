"""A setting's text means one thing everywhere: the command line (``fracgpu.settings``), the driver shim and
the simulated GPU accept and refuse the same strings, with the same message, and read the same value from
them. Each string is fed to all of them; the value is the one the device then shows (its memory, its
devices, a partition's limit, a context's charge)."""

from __future__ import annotations

import json
import os

import pytest

from fracgpu import settings

# What the device shows a process: a ctypes client of libcuda.so.1, through the shim when it is preloaded.
SHOW = """
import ctypes, json
cuda = ctypes.CDLL("libcuda.so.1")
rc = cuda.cuInit(0)
if rc:
    print(json.dumps({"refused": rc}))
    raise SystemExit(0)
count, dev, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
total, free, total_info = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
name, ctx = ctypes.create_string_buffer(256), ctypes.c_void_p()
for call in (lambda: cuda.cuDeviceGetCount(ctypes.byref(count)), lambda: cuda.cuDeviceGet(ctypes.byref(dev), 0),
             lambda: cuda.cuDeviceGetName(name, 256, dev),
             lambda: cuda.cuDeviceGetAttribute(ctypes.byref(sms), 16, dev),   # MULTIPROCESSOR_COUNT
             lambda: cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev),
             lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), lambda: cuda.cuCtxSetCurrent(ctx),
             lambda: cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total_info))):
    assert call() == 0
print(json.dumps({"devices": count.value, "name": name.value.decode(), "sms": sms.value, "total": total.value,
                  "free": free.value}))
"""

SIZES = ["1GiB", "1.5G", "2GB", "1073741824", " 2GiB ", "0", "0MiB", "0.0", "25%", "0x10", "-1", "1e9", "4XB",
         "0.5B"]
SMALL_SIZES = ["16MiB", "1.5M", "0.25GiB", "4000000", "0", "0MiB", "0.0", "25%", "0x10", "-1", "1e6", "0.5B"]
SECONDS = ["0", "2.5", "10", "0x10", "1e3", "-1", ".5", "5.", "inf", "nan", "1s", " 3 "]
COUNTS = ["2", "16", "0", "17", "4.0", "0x10", "+5", "1e1", "two"]


def python_answer(name: str, text: str):
    """What the command line makes of ``text``: ("value", v) or ("refused", message)."""
    try:
        return "value", settings.by_name(name).parse(text)
    except ValueError as e:
        return "refused", str(e)


def shown(gpu, env: dict) -> tuple[dict, str]:
    result = gpu.python(SHOW, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def agree(name: str, text: str, seen: dict, stderr: str):
    """The device refused exactly when Python did, naming the problem as Python does; returns Python's value."""
    kind, answer = python_answer(name, text)
    if kind == "refused":
        assert "refused" in seen, f"{name}={text!r}: Python refuses ({answer}), the device took it: {seen}"
        assert answer in stderr, f"{name}={text!r}: the device's message differs:\n{stderr}\nPython: {answer}"
        return None
    assert "refused" not in seen, f"{name}={text!r}: Python reads {answer!r}, the device refused:\n{stderr}"
    return answer


@pytest.mark.parametrize("text", SIZES + ["64TiB", "65TiB"])
def test_the_simulated_gpu_reads_a_memory_size_as_python_does(gpu, text):
    name = settings.SIM_MEMORY
    seen, stderr = shown(gpu, {name: text, settings.SIM_CONTEXT_MEMORY: ""})
    value = agree(name, text, seen, stderr)
    if value is not None:
        assert seen["total"] == value


@pytest.mark.parametrize("text", SMALL_SIZES + ["1GiB", "2GB", ""])
def test_the_simulated_gpu_reads_a_context_reservation_as_python_does(gpu, text):
    name = settings.SIM_CONTEXT_MEMORY
    seen, stderr = shown(gpu, {name: text})
    kind, value = python_answer(name, text)
    if text == "":                       # unset: the table's rule, 1/256 of the device
        assert seen["total"] - seen["free"] == gpu.config.memory // settings.SIM_CONTEXT_SHARE
    elif kind == "value" and value >= gpu.config.memory:   # a rule between two settings: less than the memory
        assert "refused" in seen and f"{name}: a context's reservation must be less" in stderr
    elif agree(name, text, seen, stderr) is not None:
        assert seen["total"] - seen["free"] == value


@pytest.mark.parametrize("name, texts, fact", [
    (settings.SIM_SMS, COUNTS + ["1024", "1025"], "sms"),
    (settings.SIM_DEVICES, COUNTS, "devices"),
    (settings.SIM_NAME, ["A100 stand-in", "x" * 200, "x" * 201], "name"),
])
def test_the_simulated_gpu_reads_counts_and_names_as_python_does(gpu, name, texts, fact):
    for text in texts:
        seen, stderr = shown(gpu, {name: text})
        value = agree(name, text, seen, stderr)
        if value is not None:
            assert seen[fact] == value, f"{name}={text!r}"


@pytest.fixture
def gpu4(make_gpu):
    """A 4 GiB simulated GPU: room for every limit the sizes above ask for."""
    return make_gpu(memory=4 << 30)


@pytest.mark.parametrize("text", SIZES)
def test_the_shim_reads_a_memory_limit_as_python_does(gpu4, shim, text):
    gpu = gpu4
    name = settings.MEMORY
    seen, stderr = shown(gpu, {"LD_PRELOAD": shim, settings.PARTITION: "limits", name: text})
    value = agree(name, text, seen, stderr)
    if value is not None:
        size, fraction = value
        assert seen["total"] == (int(fraction * gpu.config.memory) if fraction else size)


@pytest.mark.parametrize("text", SMALL_SIZES)
def test_the_shim_reads_a_context_charge_as_python_does(gpu, shim, text):
    """The charge for a context: zero is none, in any unit, as for the simulated GPU."""
    name = settings.CONTEXT_MEMORY
    seen, stderr = shown(gpu, {"LD_PRELOAD": shim, settings.PARTITION: "limits", settings.MEMORY: "512MiB",
                               settings.RECONCILE_INTERVAL: "0", name: text})
    value = agree(name, text, seen, stderr)
    if value is not None:
        assert seen["total"] - seen["free"] == value


@pytest.mark.parametrize("name, texts", [
    (settings.OOM_WAIT, SECONDS),
    (settings.RECONCILE_INTERVAL, SECONDS),
    (settings.COMPUTE, ["25%", "0.25", "1", "0", "150%", "25", "0x1"]),
    (settings.COMPUTE_CAP, ["1", "0", "yes", "01", "true"]),
    (settings.OVERCOMMIT, ["1", "0", "on"]),
    (settings.PRIORITY, ["high", "normal", "low", "High", "urgent"]),
    (settings.JOB_HOLDER, [str(os.getpid()), "0", "-4", "me", "0x10", "2147483648"]),
])
def test_the_shim_accepts_and_refuses_what_python_does(gpu, shim, name, texts):
    base = {"LD_PRELOAD": shim, settings.PARTITION: "limits", settings.MEMORY: "512MiB", settings.COMPUTE: "50%"}
    for text in texts:
        seen, stderr = shown(gpu, {**base, name: text})
        agree(name, text, seen, stderr)
