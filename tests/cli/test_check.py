"""`fracgpu check`: a node's guarantees graded on its own GPU by probe jobs, here the simulated one.

The check passes on a node where fracgpu works, fails (exit 1) the check whose guarantee a
setting breaks, refuses what cannot be checked (exit 2), and leaves nothing behind: no probe
running, no private state, whether it ends or is interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fracgpu.exercise.check import CHECKS
from fracgpu.exercise.demo import real_gpu_available
from tests.support import ROOT
from tests.support.simgpu import GiB

NAMES = [c.name for c in CHECKS]


@pytest.fixture
def gpu4(make_gpu):
    """A 4 GiB simulated GPU: room for the probes' quotas side by side."""
    return make_gpu(memory=4 * GiB)


def checked(gpu, *args, env=None):
    result = gpu.fracgpu("check", "--json", *args, check=False, timeout=180, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_every_check_holds_on_the_simulated_gpu(gpu4):
    result, report = checked(gpu4)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = by_name(report)
    assert list(checks) == NAMES
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    assert report["ok"] is True
    device = report["device"]
    assert device["simulated"] is True and device["total_memory"] == 4 * GiB and device["index"] == 0
    assert device["context_reserve"] == gpu4.context   # measured on the bare driver
    for c in checks.values():
        assert c["measured"] and c["expected"]
    # The figures behind the verdicts: every path filled the quota less the context, and was refused there.
    paths = checks["alloc paths"]["figures"]
    assert set(paths["paths"]) == {"cuMemAlloc_v2", "cuMemAllocPitch_v2", "cuMemAllocManaged", "cuMemAllocAsync",
                                   "cuArrayCreate_v2", "cuMemCreate", "module globals"}
    for got in paths["paths"].values():
        assert got["refused"] == 2 and got["held"] == paths["usable"] == paths["total"] - gpu4.context
    assert abs(checks["compute shares"]["figures"]["achieved"]["check-share-25"]
               / checks["compute shares"]["figures"]["utilisation"] - 0.25) <= 0.03
    # Nothing of the check is left on the node: no partition in its state, no job in its ledger.
    assert not list(gpu4.state_dir.iterdir())
    assert not gpu4.ledger.exists() or "check-ledger" not in gpu4.fracgpu("report", "--format", "json").stdout


def test_the_table_names_each_check_and_its_verdict(gpu4):
    result = gpu4.fracgpu("check", "--check", "context counted", "--check", "no overcommit", check=False,
                          env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "context counted" in result.stdout and "no overcommit" in result.stdout
    assert "2/2 checks hold" in result.stdout
    assert "alloc paths" not in result.stdout


def test_the_check_of_exits_without_freeing_reports_the_devices_own_excess(gpu4):
    result, report = checked(gpu4, "--check", "memory back when the device lets go")
    assert result.returncode == 0, result.stdout + result.stderr
    (c,) = report["checks"]
    figures = c["figures"]
    assert c["ok"] and figures["excess"] == 0 and figures["excess_s"] == 0
    assert figures["limit"] == report["probe_quota"] and figures["processes"] == 8
    assert figures["peak"] <= report["probe_quota"] and figures["held"] > 0
    assert figures["samples"] > 1


@pytest.mark.fault("A node whose shim does not charge the context (FRACGPU_CONTEXT_MEMORY=0)",
                   "`fracgpu check` fails `context counted`, exit 1")
def test_a_context_not_counted_is_caught(gpu4):
    result, report = checked(gpu4, "--check", "context counted", "--check", "alloc paths",
                             env={"FRACGPU_CONTEXT_MEMORY": "0"})
    assert result.returncode == 1, result.stdout + result.stderr
    checks = by_name(report)
    assert report["ok"] is False
    assert checks["context counted"]["ok"] is False
    assert "charged 0B" in checks["context counted"]["detail"]
    assert checks["alloc paths"]["ok"] is True   # the quota itself still holds


def test_a_context_charged_more_than_it_reserves_is_caught(gpu4):
    """Charging a context more than it takes would hold a job to less than its quota: caught too."""
    result, report = checked(gpu4, "--check", "context counted", env={"FRACGPU_CONTEXT_MEMORY": "64MiB"})
    assert result.returncode == 1, result.stdout + result.stderr
    context = by_name(report)["context counted"]
    assert context["ok"] is False and "charged 64MiB" in context["detail"]


def test_a_device_the_node_does_not_have_is_refused(gpu4):
    result = gpu4.fracgpu("check", "--device", "7", check=False)
    assert result.returncode == 2
    assert "no CUDA device 7" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--check", "nonsense"], "there is no check 'nonsense'"),
    (["--device", "-1"], "--device"),
    (["--gpu", "cloud"], "--gpu"),
])
def test_bad_options_are_usage_errors(gpu4, args, message):
    result = gpu4.fracgpu("check", *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(real_gpu_available(), reason="this machine has a real GPU")
@pytest.mark.fault("`fracgpu check` on a node without a usable GPU, the simulated one not asked for",
                   "exit 2 saying what is wrong with the GPU; never a stand-in's checks reported as the node's")
def test_a_node_without_a_gpu_fails_the_check_unless_the_simulated_one_is_asked_for(gpu4, tmp_path):
    result = gpu4.fracgpu("check", "--gpu", "real", check=False)
    assert result.returncode == 2 and "no working NVIDIA GPU driver" in result.stderr
    # No GPU and no simulated one selected: the node fails, saying why and how to check the simulated GPU.
    env = {k: v for k, v in gpu4.env.items() if not k.startswith("FRACGPU_SIM") and k != "LD_LIBRARY_PATH"}
    result = subprocess.run([sys.executable, "-m", "fracgpu", "check", "--json", "--check", "context counted"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert "this node has no usable GPU: " in result.stderr and "fracgpu check --gpu sim" in result.stderr
    assert "Traceback" not in result.stderr
    # Asked for, by option or by a simulated GPU's folder in the environment: a simulated GPU of its own.
    for args, extra in ((["--gpu", "sim"], {}), ([], {"FRACGPU_SIM_DIR": str(tmp_path / "sim")})):
        result = subprocess.run([sys.executable, "-m", "fracgpu", "check", "--json", "--check", "context counted",
                                 *args], env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        device = json.loads(result.stdout)["device"]
        assert device["simulated"] is True and "simulated GPU of its own" in device["note"]


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        out.update(children)
        todo.extend(children)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.fault("`fracgpu check` interrupted (Ctrl-C, SIGTERM) while its probes run",
                   "every probe stopped, its private state and simulated GPU removed")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_check_stops_its_probes_and_removes_its_state(gpu4, tmp_path, sig):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = gpu4.popen(sys.executable, "-m", "fracgpu", "check", "--check", "compute shares",
                   env={"TMPDIR": str(scratch)})
    deadline = time.monotonic() + 60
    while not any("busy" in cmdline(c) for c in descendants(p.pid) if alive(c)):
        assert time.monotonic() < deadline and p.poll() is None, "no busy probe started"
        time.sleep(0.05)
    probes = descendants(p.pid)
    assert list(scratch.iterdir())   # its private state and simulated GPU are there while it runs
    os.kill(p.pid, sig)
    p.communicate(timeout=30)
    assert p.returncode != 0
    deadline = time.monotonic() + 10
    while any(alive(c) for c in probes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in probes if alive(c)]
    assert list(scratch.iterdir()) == []


def test_the_readme_sample_shows_every_check_in_the_order_they_run():
    """The README's `fracgpu check` sample has one row per registered check, in order, and the count it
    prints; a new check is a sample to update."""
    readme = (ROOT / "README.md").read_text()
    sample = readme.split("```console\n$ fracgpu check --gpu sim\n", 1)[1].split("```", 1)[0]
    names = [line.split("│")[1].strip() for line in sample.splitlines() if line.startswith("│")]
    assert names == [c.name for c in CHECKS]
    count = len(CHECKS)
    assert f"{count}/{count} checks hold" in sample
