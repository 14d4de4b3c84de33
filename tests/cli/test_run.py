"""`fracgpu run`: what the job is given (its partition, the shim, the real driver), and every
refusal to start it: exit status 125 and one clear message, no traceback, nothing run;
and the command's own status passed on as it is.

Whether the shim then holds the quota is tests/shim/test_quota.py; here the job is
mostly `env`, printing what it received."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.simgpu import GiB
from fracgpu import devices, sim, state
from fracgpu import shim as shim_lib


def job_env(gpu, *options, env=None):
    """Run `env` under `fracgpu run OPTIONS`; its environment, and the pid it ran as."""
    p = gpu.popen(sys.executable, "-m", "fracgpu", "run", *options, "--", "env", env=env)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line), p.pid


def refused(result, *phrases):
    """A refusal to start: status 125, the phrases on stderr, no traceback, nothing on stdout."""
    assert result.returncode == 125, result.stdout + result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_memory_gives_the_job_a_private_partition_named_after_its_pid(gpu, shim):
    nvml_shim = shim_lib.nvml_shim_path(shim)
    env, pid = job_env(gpu, "--memory", "256MiB")
    # fracgpu run execs the command, so the pid in the name is the job's own.
    assert env["FRACGPU_PARTITION"] == f"run-{pid}"
    assert env["FRACGPU_MEMORY"] == "256MiB"        # as written: the shim parses it the same way
    assert env["FRACGPU_STATE_DIR"] == str(gpu.state_dir)
    assert env["LD_PRELOAD"] == f"{shim}:{nvml_shim}"   # NVML shows the quota too
    # The real driver is the simulated one, found on LD_LIBRARY_PATH, never the shim.
    assert env["FRACGPU_REAL_LIBCUDA"] == str(sim.library_dir() / "libcuda.so.1")
    assert "FRACGPU_OOM_WAIT" not in env


def test_a_percentage_is_passed_as_written(gpu):
    env, _ = job_env(gpu, "--memory", "25%")
    assert env["FRACGPU_MEMORY"] == "25%"           # the shim takes it of each device's memory


def test_partition_joins_an_existing_one_without_a_size(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "512MiB")
    env, _ = job_env(gpu, "--partition", "team")
    assert env["FRACGPU_PARTITION"] == "team"
    assert "FRACGPU_MEMORY" not in env


def test_a_memory_size_left_in_the_environment_does_not_leak_into_a_partition_job(gpu):
    gpu.fracgpu("partition", "create", "team")
    env, _ = job_env(gpu, "--partition", "team", env={"FRACGPU_MEMORY": "1GiB"})
    assert "FRACGPU_MEMORY" not in env


def test_existing_preloads_are_kept_after_the_shim_and_the_shim_is_not_repeated(gpu, shim, tmp_path):
    nvml_shim = shim_lib.nvml_shim_path(shim)
    other = tmp_path / "libother.so"
    other.write_bytes(b"")
    env, _ = job_env(gpu, "--memory", "1GiB", env={"LD_PRELOAD": f"{other} {shim}:/x/liby.so"})
    assert env["LD_PRELOAD"] == f"{shim}:{nvml_shim}:{other}:/x/liby.so"


def test_state_dir_is_made_absolute_and_created_private(gpu, tmp_path):
    (tmp_path / "work").mkdir()
    result = gpu.run(sys.executable, "-m", "fracgpu", "run", "--memory", "1GiB", "--", "env",
                     env={"FRACGPU_STATE_DIR": "new-state"}, cwd=tmp_path / "work")
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert env["FRACGPU_STATE_DIR"] == str(tmp_path / "work" / "new-state")
    assert (tmp_path / "work" / "new-state").stat().st_mode & 0o777 == 0o700


def test_oom_wait_option_and_variable(gpu):
    env, _ = job_env(gpu, "--memory", "1GiB", "--oom-wait", "2.5")
    assert env["FRACGPU_OOM_WAIT"] == "2.5"
    env, _ = job_env(gpu, "--memory", "1GiB", env={"FRACGPU_OOM_WAIT": "30"})
    assert env["FRACGPU_OOM_WAIT"] == "30"          # passed through untouched


def test_a_real_driver_path_already_given_is_kept(gpu):
    env, _ = job_env(gpu, "--memory", "1GiB", env={"FRACGPU_REAL_LIBCUDA": "/opt/driver/libcuda.so.1"})
    assert env["FRACGPU_REAL_LIBCUDA"] == "/opt/driver/libcuda.so.1"


def test_arguments_and_exit_status_pass_through(gpu):
    result = gpu.fracgpu("run", "--memory", "1GiB", "--", sys.executable, "-c",
                         "import sys; print(sys.argv[1:]); sys.exit(7)", "--memory", "x", check=False)
    assert result.returncode == 7
    assert result.stdout.strip() == "['--memory', 'x']"
    # Without "--", the command starts at the first argument that is not an option.
    result = gpu.fracgpu("run", "--memory", "1GiB", "sh", "-c", "echo $FRACGPU_MEMORY")
    assert result.stdout.strip() == "1GiB"


@pytest.mark.parametrize("status", [2, 125, 126, 127])
def test_the_commands_own_status_is_passed_on_even_where_it_is_one_of_ours(gpu, status):
    # A usage error of the command's own (2), or a 125 of its own, is its status, not a refusal.
    result = gpu.fracgpu("run", "--memory", "1GiB", "--", "sh", "-c", f"echo ran; exit {status}", check=False)
    assert (result.returncode, result.stdout) == (status, "ran\n"), result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("args, phrase", [
    (["--no-such-option", "--memory", "1GiB"], "No such option"),
    (["--memory"], "Option '--memory' requires an argument"),
    (["--label", "novalue", "--memory", "1GiB"], "invalid label 'novalue'"),
])
def test_click_usage_errors_are_refusals_too(gpu, args, phrase):
    refused(gpu.fracgpu("run", *args, *(["--", "echo", "started"] if args[-1] != "--memory" else []), check=False),
            phrase)


@pytest.mark.fault('A command not found, or not executable',
                   'exit 127 or 126 with a message, as the shells do')
def test_a_command_that_cannot_start(gpu, tmp_path):
    result = gpu.fracgpu("run", "--memory", "1GiB", "--", "fracgpu-no-such-command-xyz", check=False)
    assert result.returncode == 127
    assert "command not found: fracgpu-no-such-command-xyz" in result.stderr
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    result = gpu.fracgpu("run", "--memory", "1GiB", "--", str(script), check=False)
    assert result.returncode == 126
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, phrases", [
    ([], ["--memory SIZE, --compute SHARE [--cap] and/or --priority CLASS", "--partition NAME"]),
    (["--memory", "1GiB", "--partition", "team"], ["--partition NAME (an existing one), not both"]),
    (["--memory", "12XB"], ["'--memory'", "unknown unit 'XB'"]),
    (["--memory", "0"], ["'--memory'", "zero"]),
    (["--memory", "-1GiB"], ["'--memory'", "negative"]),
    (["--memory", "150%"], ["'--memory'", "more than 100%"]),
    (["--memory", "2GiB"], ["memory limit 2GiB is above the 1GiB of GPU 0", "ask for at most 1GiB"]),
    (["--partition", "bad name!"], ["'--partition'", "invalid partition name 'bad name!'"]),
    (["--partition", "nosuch"], ["partition 'nosuch' does not exist", "fracgpu partition list"]),
    (["--memory", "1GiB", "--oom-wait", "soon"], ["'--oom-wait'", "give seconds"]),
    (["--memory", "1GiB", "--oom-wait", "-1"], ["'--oom-wait'", "give seconds"]),
    (["--memory", "1GiB", "--oom-wait", "inf"], ["'--oom-wait'", "give seconds"]),
    (["--priority", "urgent"], ["'--priority'", "invalid priority 'urgent'", "write high, normal or low"]),
    (["--priority", "HIGH"], ["'--priority'", "write high, normal or low"]),
    (["--priority", "high", "--partition", "team"], ["runs at that partition's priority",
                                                     "fracgpu partition set team --priority high"]),
])
@pytest.mark.fault('Malformed sizes, shares and priorities, a limit above the GPU, an unknown partition, conflicting '
                   'options',
                   'one message, exit 125, nothing started')
def test_bad_input_is_refused_before_the_job_starts(gpu, args, phrases):
    refused(gpu.fracgpu("run", *args, "--", "echo", "started", check=False), *phrases)


def test_missing_command(gpu):
    for args in (["--memory", "1GiB"], ["--memory", "1GiB", "--"]):
        refused(gpu.fracgpu("run", *args, check=False), "missing the command to run")


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "1e999", "1e3", "0x10"])
def test_an_oom_wait_the_shim_would_refuse_is_refused_here(gpu, value):
    refused(gpu.fracgpu("run", "--memory", "1GiB", "--", "echo", "started", check=False,
                        env={"FRACGPU_OOM_WAIT": value}), "FRACGPU_OOM_WAIT", "give seconds")


@pytest.mark.fault('A state folder others can write to',
                   'refused with the `chmod` to run, exit 125')
def test_an_unsafe_state_folder_is_refused(gpu):
    gpu.state_dir.chmod(0o777)
    try:
        for args in (["--memory", "1GiB"], ["--memory", "25%"]):
            refused(gpu.fracgpu("run", *args, "--", "echo", "started", check=False),
                    "unsafe permissions", f"chmod 700 {gpu.state_dir}")
    finally:
        gpu.state_dir.chmod(0o700)


NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to hand a folder to another user")


def without_file_permission_override(gpu, *argv, env=None):
    """``argv`` run with the test GPU's environment (and ``env``) as this user held to the files'
    permissions: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, as any other user is."""
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *map(str, argv)],
                          capture_output=True, text=True, timeout=60, env={**gpu.env, **(env or {})})


@as_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.fault('A state folder this user cannot write, or cannot reach (a folder above it not searchable)',
                   'exit 125 before the job starts (`fracgpu top`: 2), naming the permission; never "no such file"')
def test_a_state_folder_this_user_cannot_use_is_refused_before_the_job_starts(gpu, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    result = without_file_permission_override(gpu, sys.executable, "-m", "fracgpu", "run", "--compute", "50%", "--",
                                              "echo", "started", env={"FRACGPU_STATE_DIR": str(read_only)})
    refused(result, f"the state folder {read_only} cannot be used by this user (mode 500: Permission denied",
            f"chmod 700 {read_only}")
    hidden = tmp_path / "someone-elses" / "state"
    hidden.mkdir(parents=True, mode=0o700)
    os.chown(hidden.parent, NOBODY, NOBODY)   # another user's folder, which this one cannot search
    hidden.parent.chmod(0o700)
    for command in (["run", "--compute", "50%", "--", "echo", "started"], ["top", "--once"]):
        result = without_file_permission_override(gpu, sys.executable, "-m", "fracgpu", *command,
                                                  env={"FRACGPU_STATE_DIR": str(hidden)})
        assert result.returncode == (125 if command[0] == "run" else 2), result.stdout + result.stderr
        assert f"the state folder {hidden} cannot be reached" in result.stderr, result.stderr
        assert "Permission denied" in result.stderr and "No such file" not in result.stderr
        assert "No GPU has fracgpu partitions" not in result.stdout and "started" not in result.stdout


@as_root
@pytest.mark.fault("A state folder that belongs to another user",
                   "`fracgpu run` exits 125 and `fracgpu top` 2, naming the owner; never an empty GPU")
def test_a_state_folder_of_another_user_is_refused_naming_the_owner(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    os.chown(gpu.state_dir, NOBODY, -1)
    try:
        refused(gpu.fracgpu("run", "--memory", "64MiB", "--", "echo", "started", check=False),
                "belongs to another user (uid 65534)")
        result = gpu.fracgpu("top", "--once", "--interval", "0.1", check=False)
        assert result.returncode == 2 and "belongs to another user (uid 65534)" in result.stderr, result
        assert "No GPU has fracgpu partitions" not in result.stdout
    finally:
        os.chown(gpu.state_dir, os.geteuid(), -1)


@pytest.mark.fault("A GPU whose partition table is full (64 partitions, private ones included)",
                   "`fracgpu run` of a private job exits 125 before the job starts, naming the limit")
def test_a_full_partition_table_is_refused_before_the_job_starts(gpu):
    (device,) = devices.probe(gpu.env)
    region = state.open_region(str(gpu.state_dir), device.uuid, device.name, device.total_memory)
    for i in range(state.MAX_PARTITIONS):
        region.create_partition(f"p{i}", 0, 0, False)
    refused(gpu.fracgpu("run", "--memory", "64MiB", "--", "echo", "started", check=False),
            f"already has {state.MAX_PARTITIONS} partitions, the most a GPU's state holds")
    refused(gpu.fracgpu("run", "--compute", "10%", "--", "echo", "started", check=False), "already has 64 partitions")
    # A job in one of them still runs.
    assert gpu.fracgpu("run", "--partition", "p0", "--", "echo", "started").stdout == "started\n"


@pytest.mark.fault("A memory limit too small to hold a CUDA context (`--memory 4`)",
                   "exit 125 before the job starts, naming the smallest usable limit")
def test_a_limit_no_context_fits_in_is_refused_naming_the_smallest_usable_one(gpu):
    refused(gpu.fracgpu("run", "--memory", "4", "--", "echo", "started", check=False),
            "memory limit 4B is too small to hold a CUDA context", "the smallest usable limit is 1MiB")
    result = gpu.fracgpu("partition", "create", "tiny", "--memory", "4096", check=False)
    assert result.returncode == 2 and "the smallest usable limit is 1MiB" in result.stderr
    assert gpu.fracgpu("run", "--memory", "64Mi", "--", "echo", "started").stdout == "started\n"


def test_a_state_folder_that_is_a_file_is_refused(gpu, tmp_path):
    (tmp_path / "file").write_text("")
    refused(gpu.fracgpu("run", "--memory", "1GiB", "--", "echo", check=False,
                        env={"FRACGPU_STATE_DIR": str(tmp_path / "file")}), "is not a folder")


def region_file(gpu):
    """The state file of the test's GPU, made by creating (and removing) a partition."""
    gpu.fracgpu("partition", "create", "scratch")
    gpu.fracgpu("partition", "rm", "scratch")
    (path,) = gpu.state_dir.glob("gpu-*.state")
    return path


@pytest.mark.parametrize("damage, phrase", [
    (lambda data: b"\0" * 4096, "not a fracgpu state file"),
    (lambda data: data[:100], "truncated"),
    (lambda data: b"FRACGPUS" + (99).to_bytes(4, "little") + data[12:], "layout version 99"),
    # a fracgpu from before pid namespaces in process slots and compute promises: not shared with it
    (lambda data: b"FRACGPUS" + (4).to_bytes(4, "little") + data[12:], "layout version 4 but this fracgpu uses 5"),
    (lambda data: b"PNG\0" + data[4:], "not a fracgpu state file"),
])
@pytest.mark.fault('A state file truncated, foreign, or of another layout',
                   'refused with what to do, exit 125')
@pytest.mark.parametrize("args", [["--memory", "1GiB"], ["--memory", "25%"], ["--partition", "team"]])
def test_a_damaged_state_file_is_refused(gpu, damage, phrase, args):
    path = region_file(gpu)
    path.write_bytes(damage(path.read_bytes()))
    refused(gpu.fracgpu("run", *args, "--", "echo", "started", check=False), str(path), phrase)


def test_a_state_file_of_another_gpu_in_the_folder_is_checked_too(gpu):
    path = region_file(gpu)
    (gpu.state_dir / "gpu-GPU-00000000-0000-0000-0000-000000000000.state").write_bytes(b"x" * 64)
    refused(gpu.fracgpu("run", "--memory", "25%", "--", "echo", check=False), "not a fracgpu state file")
    assert path.exists()


def without_a_driver(gpu, tmp_path) -> dict:
    """The test GPU's environment with no driver to find (skipped where a real one is installed)."""
    empty = tmp_path / "no-driver"
    empty.mkdir()
    env = {**gpu.env, "LD_LIBRARY_PATH": str(empty)}
    if shim_lib.find_real_driver(env):
        pytest.skip("a real CUDA driver is installed here")
    return {"LD_LIBRARY_PATH": str(empty)}


def test_no_driver_is_refused_when_a_size_must_be_checked(gpu, tmp_path):
    refused(gpu.fracgpu("run", "--memory", "1GiB", "--", "echo", check=False, env=without_a_driver(gpu, tmp_path)),
            "no CUDA driver found", "install the NVIDIA driver", 'eval "$(fracgpu sim env)"')


def test_no_visible_device_is_refused_when_a_size_must_be_checked(gpu):
    refused(gpu.fracgpu("run", "--memory", "1GiB", "--", "echo", check=False, env={"CUDA_VISIBLE_DEVICES": ""}),
            "CUDA_ERROR_NO_DEVICE", "install the NVIDIA driver")


def test_memory_is_checked_against_every_visible_device(make_gpu):
    gpu = make_gpu(memory=GiB, devices=2)
    refused(gpu.fracgpu("run", "--memory", "1025MiB", "--", "echo", check=False), "is above the 1GiB of GPU 0")
    result = gpu.fracgpu("run", "--memory", "1GiB", "--", "echo", "started")
    assert result.stdout == "started\n"


# The pieces the command is made of.

def test_the_probe_sees_the_simulated_devices_as_a_job_would(make_gpu):
    gpu = make_gpu(memory=2 * GiB, devices=3, name="Probe GPU")
    found = devices.probe(gpu.env)
    assert [(d.index, d.name, d.total_memory) for d in found] == [(i, "Probe GPU", 2 * GiB) for i in range(3)]
    assert len({d.uuid for d in found}) == 3
    assert all(len(d.uuid) == 40 and d.uuid.startswith("GPU-") for d in found)
    # CUDA_VISIBLE_DEVICES renumbers them, as for the job.
    (only,) = devices.probe({**gpu.env, "CUDA_VISIBLE_DEVICES": "2"})
    assert (only.index, only.uuid) == (0, found[2].uuid)


def test_the_probe_runs_without_the_shim_and_outside_any_partition(gpu, shim, tmp_path):
    env = {**gpu.env, "LD_PRELOAD": f"{tmp_path}/liba.so {shim}", "FRACGPU_PARTITION": "p",
           "FRACGPU_MEMORY": "1B"}
    probe_env = devices.probe_environment(env)
    assert probe_env["LD_PRELOAD"] == f"{tmp_path}/liba.so"
    assert "FRACGPU_PARTITION" not in probe_env and "FRACGPU_MEMORY" not in probe_env
    assert "LD_PRELOAD" not in devices.probe_environment({"LD_PRELOAD": shim})
    # With the shim really preloaded and a partition that does not exist, the devices are still seen.
    (d,) = devices.probe({**gpu.env, "LD_PRELOAD": shim, "FRACGPU_PARTITION": "nosuch"})
    assert d.total_memory == GiB


def test_uuid_text_is_nvidias_form():
    assert devices.uuid_text(bytes(range(16))) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    with pytest.raises(ValueError):
        devices.uuid_text(b"short")


def test_the_real_driver_is_found_on_the_library_path_and_never_the_shim(shim, tmp_path):
    shim_folder, real_folder = tmp_path / "shim", tmp_path / "real"
    shim_folder.mkdir()
    real_folder.mkdir()
    os.symlink(shim, shim_folder / "libcuda.so.1")          # a folder offering the shim under the driver's name
    (real_folder / "libcuda.so.1").write_bytes(b"\x7fELF")
    env = {"LD_LIBRARY_PATH": f"{tmp_path}/missing:{shim_folder}:{real_folder}"}
    assert shim_lib.find_real_driver(env) == str(real_folder / "libcuda.so.1")


def test_preload_with_shim(shim, tmp_path):
    assert shim_lib.preload_with_shim(None, "/s/libfracgpu.so") == "/s/libfracgpu.so"
    assert shim_lib.preload_with_shim("  /a.so  /b.so:", "/s/libfracgpu.so") == "/s/libfracgpu.so:/a.so:/b.so"
    link = tmp_path / "shim-link.so"
    os.symlink(shim, link)
    assert shim_lib.preload_with_shim(f"{link}:/a.so", shim) == f"{shim}:/a.so"   # the same file, by another name


def test_the_priority_is_recorded_in_the_ledger(gpu, clients, kernels):
    gpu.fracgpu("run", "--priority", "high", "--name", "serve", "--", clients.lcuda, "spin", 1, kernels)
    gpu.fracgpu("run", "--memory", "64MiB", "--name", "train", "--", clients.lcuda, "spin", 1, kernels)
    jobs = {job["job"]: job for job in json.loads(gpu.fracgpu("report", "--format", "json").stdout)}
    assert jobs["serve"]["priority"] == "high" and jobs["train"]["priority"] == "normal"
