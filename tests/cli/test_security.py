"""Who may read and change the shared state: owner-only by default, a group on
shared hosts (FRACGPU_STATE_GROUP), and partitions changed only by the owner
of the state folder."""

from __future__ import annotations

import grp
import os
import stat
import sys

import pytest

from tests.support.simgpu import MiB, alloc_job

HOLD = alloc_job(64)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_and_ledger_are_owner_only_by_default(gpu):
    assert gpu.fracgpu("run", "--memory", "128MiB", "--", sys.executable, "-c", HOLD).stdout.strip() == "0"
    assert mode(gpu.state_dir) == 0o700
    files = list(gpu.state_dir.glob("gpu-*.state"))
    assert files and all(mode(f) == 0o600 for f in files)
    assert mode(gpu.ledger) == 0o600


def test_a_group_shares_the_state_on_a_shared_host(gpu, tmp_path):
    group = grp.getgrgid(os.getegid()).gr_name
    folder = tmp_path / "shared-state"
    env = {"FRACGPU_STATE_DIR": str(folder), "FRACGPU_STATE_GROUP": group}
    out = gpu.fracgpu("run", "--memory", "128MiB", "--", sys.executable, "-c", HOLD, env=env).stdout
    assert out.strip() == "0"
    assert mode(folder) == 0o2770 and os.stat(folder).st_gid == os.getegid()
    files = list(folder.glob("gpu-*.state"))
    assert files and all(mode(f) == 0o660 and os.stat(f).st_gid == os.getegid() for f in files)
    # Without the group setting, that folder is refused as unsafe (others can write to it).
    result = gpu.fracgpu("partition", "list", check=False, env={"FRACGPU_STATE_DIR": str(folder)})
    assert result.returncode == 2 and "FRACGPU_STATE_GROUP" in result.stderr


@pytest.mark.fault('`FRACGPU_STATE_GROUP` naming no group',
                   'refused before the job starts, exit 125')
def test_an_unknown_group_is_refused_with_what_to_do(gpu, tmp_path):
    env = {"FRACGPU_STATE_DIR": str(tmp_path / "s"), "FRACGPU_STATE_GROUP": "no-such-group-here"}
    result = gpu.fracgpu("run", "--memory", "64MiB", "--", "true", check=False, env=env)
    assert result.returncode == 125
    assert "FRACGPU_STATE_GROUP='no-such-group-here' is not a group" in result.stderr


@pytest.mark.fault('A group member who does not own the state changes a partition',
                   'refused (exit 2), naming the owner; its jobs still run under the quota')
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to hand the state folder to another user")
def test_a_group_member_runs_jobs_but_cannot_change_a_quota(gpu, tmp_path):
    group = grp.getgrgid(os.getegid()).gr_name
    folder = tmp_path / "shared-state"
    env = {"FRACGPU_STATE_DIR": str(folder), "FRACGPU_STATE_GROUP": group}
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB", env=env)
    os.chown(folder, 65534, -1)   # the folder's owner (who set the partitions up) is now someone else
    for change in (["set", "team", "--memory", "512MiB"], ["create", "mine", "--memory", "1GiB"], ["rm", "team"]):
        result = gpu.fracgpu("partition", *change, check=False, env=env)
        assert result.returncode == 2, result
        assert "only the owner of the state folder" in result.stderr and "uid 65534" in result.stderr
    # Jobs still run in the partition, under its quota, and in private ones of their own.
    assert gpu.fracgpu("run", "--partition", "team", "--", sys.executable, "-c", HOLD, env=env).stdout.strip() == "0"
    assert gpu.fracgpu("run", "--memory", "32MiB", "--", sys.executable, "-c", HOLD, env=env).stdout.strip() == "2"
    (team,) = [p for p in __import__("json").loads(gpu.fracgpu("partition", "list", "--json", env=env).stdout)[0]
               ["partitions"] if p["name"] == "team"]
    assert team["memory_limit"] == 256 * MiB and team["peak"] == 64 * MiB + gpu.context   # and its context
