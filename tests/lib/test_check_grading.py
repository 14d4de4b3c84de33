"""The grading of `fracgpu check`: what each check's figures must be for its guarantee to hold.

Plain functions of the probes' figures, so each rule is tried here on figures that keep it and on
figures that break it, with no GPU.
"""

from __future__ import annotations

import pytest

from fracgpu.exercise import check
from fracgpu.exercise.check import (BLOCK, CHECKS, Report, Result, DeviceInfo, fill_held, grade_cap, grade_context,
                           grade_device_time, grade_launch_ratio, grade_paths, grade_share, job_quota)

MiB = 1 << 20
USABLE = 240 * MiB


@pytest.mark.parametrize("held, refused, ok, why", [
    (USABLE, 2, True, ""),                                   # all of it, then CUDA_ERROR_OUT_OF_MEMORY
    (USABLE - BLOCK, 2, True, ""),                           # within two blocks of it (a real GPU rounds)
    (USABLE + BLOCK, 0, False, "never refused"),             # the probe stopped itself: the quota never did
    (USABLE + BLOCK, 2, False, "more than the 240MiB"),      # refused, but past the quota
    (USABLE - 3 * BLOCK, 2, False, "refused at 192MiB"),     # refused before the quota
    (USABLE, 1, False, "not CUDA_ERROR_OUT_OF_MEMORY"),      # refused with another error
])
def test_a_fill_is_held_to_the_quota_and_given_all_of_it(held, refused, ok, why):
    got_ok, got_why = fill_held({"usable": USABLE, "held": held, "refused": refused}, BLOCK)
    assert got_ok is ok and why in got_why


def paths_figures(broken: dict | None = None):
    paths = {name: {"held": USABLE, "refused": 2, "used": USABLE, "used_after": 0}
             for name in ("cuMemAlloc_v2", "cuMemAllocManaged", "module globals")}
    for name, change in (broken or {}).items():
        paths[name].update(change)
    return {"usable": USABLE, "total": USABLE + 16 * MiB, "paths": paths}


def test_every_path_must_hold_and_a_failing_one_is_named():
    assert grade_paths(paths_figures(), BLOCK).ok
    result = grade_paths(paths_figures({"cuMemAllocManaged": {"held": USABLE + 4 * BLOCK, "refused": 0}}), BLOCK)
    assert not result.ok and result.measured.startswith("2/3 paths")
    assert result.detail.startswith("cuMemAllocManaged: never refused")
    leaked = grade_paths(paths_figures({"module globals": {"used_after": 64 * MiB}}), BLOCK)
    assert not leaked.ok and "64MiB still charged" in leaked.detail


@pytest.mark.parametrize("charged, reserve, ok", [
    (16 * MiB, 16 * MiB, True),
    (20 * MiB, 16 * MiB, True),       # within 25%
    (0, 16 * MiB, False),             # not counted
    (64 * MiB, 16 * MiB, False),      # counted four times over: the job gets less than its quota
    (512 * MiB, 500 * MiB, True),     # a real GPU's context, measured a little differently
    (0, 0, True),                     # a device whose contexts reserve nothing
])
def test_the_context_is_charged_what_it_reserves(charged, reserve, ok):
    assert grade_context(charged, reserve)[0] is ok


def test_shares_caps_device_time_and_launch_ratio():
    assert grade_share(0.27, 0.25) and grade_share(0.23, 0.25) and not grade_share(0.29, 0.25)
    assert grade_cap(0.10, 0.25) and grade_cap(0.27, 0.25) and not grade_cap(0.30, 0.25)
    assert grade_device_time(0.204, 0.2) and not grade_device_time(0.22, 0.2) and not grade_device_time(0.0, 0.0)
    assert grade_launch_ratio(3000, 2000) == (True, 1.5)
    assert grade_launch_ratio(7000, 2000) == (False, 3.5)
    assert grade_launch_ratio(1000, 0)[0] is False


def test_the_probes_quota_leaves_256mib_beside_the_context_and_fits_four_times():
    assert job_quota(16 * MiB, 4 << 30) == 272 * MiB
    assert job_quota(500 * MiB, 141 << 30) == 768 * MiB       # a real context, rounded up to whole blocks
    assert job_quota(4 * MiB, 1 << 30) == 256 * MiB            # a small device: a quarter of it


def test_a_report_holds_when_every_check_does_and_is_json():
    device = DeviceInfo(0, "sim", "GPU-0", 4 << 30, True, 16 * MiB)
    good, bad = Result("a", True, "1", "1"), Result("b", False, "2", "1", "why")
    assert Report(device, [good], 1.0).ok and not Report(device, [good, bad], 1.0).ok
    out = Report(device, [good, bad], 1.25).as_json()
    assert out["ok"] is False and out["device"]["uuid"] == "GPU-0"
    assert [set(c) >= {"name", "ok", "measured", "expected", "detail"} for c in out["checks"]] == [True, True]


def test_a_check_is_one_function_and_a_failing_probe_fails_only_its_check(monkeypatch):
    monkeypatch.setattr(check, "CHECKS", list(CHECKS))

    @check.check("preemption", alone=True)
    def preemption(node):
        raise check.ProbeFailed("probe 'preemption' failed (exit 1): no such class")

    (added,) = [c for c in check.CHECKS if c.name == "preemption"]
    assert added.alone and added.run is preemption
    result = check.graded(added, node=None)
    assert result == Result("preemption", False, "-", "-", "probe 'preemption' failed (exit 1): no such class")


def test_the_checks_have_unique_names_and_the_timed_ones_run_alone():
    names = [c.name for c in CHECKS]
    assert len(names) == len(set(names))
    assert {c.name for c in CHECKS if c.alone} == {"memory back when the device lets go", "compute shares",
                                                   "compute cap", "ledger device time", "launch overhead", "priority"}
