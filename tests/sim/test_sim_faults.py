"""The simulated driver refuses bad settings and damaged files with a message
that names the problem, never a crash or a silently different GPU."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name, value, problem", [
    ("FRACGPU_SIM_MEMORY", "abc", "FRACGPU_SIM_MEMORY: invalid size 'abc'"),
    ("FRACGPU_SIM_MEMORY", "0", "FRACGPU_SIM_MEMORY: invalid size '0': it is zero"),
    ("FRACGPU_SIM_SMS", "-3", "FRACGPU_SIM_SMS: invalid count '-3': it is negative"),
    ("FRACGPU_SIM_DEVICES", "17", "FRACGPU_SIM_DEVICES: invalid count '17': it must be from 1 to 16"),
])
def test_bad_environment_fails_cuinit_with_a_message(clients, gpu, name, value, problem):
    result = gpu.run(clients.lcuda, "info", check=False, env={name: value})
    assert result.returncode == 1
    assert "error p_cuInit(0)" in result.stdout
    assert problem in result.stderr
    assert "fracgpu sim env" in result.stderr


@pytest.mark.fault("The simulated GPU's shared file damaged",
                   'cuInit fails with how to fix it')
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_shared_file_is_refused_with_how_to_fix(clients, gpu, damage):
    gpu.facts(clients.lcuda, "info")           # creates the shared file
    (shared,) = gpu.dir.glob("*.sim")
    if damage == "truncate":
        with open(shared, "r+b") as f:
            f.truncate(100)
    else:
        shared.write_bytes(b"\x5a" * 8192)
    result = gpu.run(clients.dlopen, "info", check=False)
    assert result.returncode == 1
    assert str(shared) in result.stderr
    assert "remove it and retry" in result.stderr
    shared.unlink()                           # the advice works
    assert gpu.facts(clients.dlopen, "info")["devices"] == "1"


def test_different_settings_in_one_folder_are_different_gpus(clients, make_gpu, tmp_path):
    small = make_gpu(memory=1 << 30)
    big_env = {"FRACGPU_SIM_MEMORY": str(2 << 30)}
    assert small.facts(clients.lcuda, "info")["total_mem"] == str(1 << 30)
    assert small.facts(clients.lcuda, "info", env=big_env)["total_mem"] == str(2 << 30)
    assert len(list(small.dir.glob("*.sim"))) == 2
