"""`fracgpu partition create/list/rm` and `fracgpu.usage()` on the simulated GPU.

Every test has its own simulated GPU and its own state folder
(FRACGPU_STATE_DIR, set by the `gpu` fixture); the device probe runs against
the simulated driver through the same environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import screen
from tests.support.simgpu import GiB, MiB, command_pid, wait_gone
import fracgpu
from fracgpu import devices, partitions


def refused(result, *phrases):
    """Bad input: status 2, the phrases on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def listed(gpu) -> list[dict]:
    return json.loads(gpu.fracgpu("partition", "list", "--json").stdout)


def test_create_list_remove_round_trip(gpu):
    assert gpu.fracgpu("partition", "list", "--json").stdout.strip() == "[]"
    out = gpu.fracgpu("partition", "create", "team", "--memory", "256MiB").stdout
    assert out == "partition 'team' created on GPU 0: 256MiB, no compute share\n"
    gpu.fracgpu("partition", "create", "quarter", "--memory", "25%")
    gpu.fracgpu("partition", "create", "open")
    (u,) = listed(gpu)
    assert u["name"] == "fracgpu simulated GPU" and u["total_memory"] == GiB
    assert u["uuid"].startswith("GPU-") and len(u["uuid"]) == 40
    assert u["processes"] == []
    assert [(p["name"], p["memory_limit"], p["used"], p["peak"], p["processes"], p["ephemeral"])
            for p in u["partitions"]] == [("team", 256 * MiB, 0, 0, 0, False), ("quarter", GiB // 4, 0, 0, 0, False),
                                          ("open", None, 0, 0, 0, False)]
    assert gpu.fracgpu("partition", "rm", "team").stdout == f"partition 'team' removed from {u['uuid']}\n"
    assert [p["name"] for p in listed(gpu)[0]["partitions"]] == ["quarter", "open"]


def test_the_table(gpu):
    assert "No partitions" in gpu.fracgpu("partition", "list").stdout
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    gpu.fracgpu("partition", "create", "open")
    table = gpu.fracgpu("partition", "list", env={"COLUMNS": "200"}).stdout
    header = next(line for line in table.splitlines() if "partition" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == \
        ["partition", "limit", "in use", "peak", "compute", "GPU time", "procs"]
    rows = {cells[0]: cells[1:] for line in table.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.split("│")[1:-1]]]}
    assert rows["team"] == ["256MiB", "0B", "0B", "-", "0.00 s", "0"]
    assert rows["open"] == ["unlimited", "0B", "0B", "-", "0.00 s", "0"]
    (u,) = listed(gpu)   # the GPU heads its table: the index --device takes, its name, memory and UUID
    assert table.splitlines()[0] == f"GPU 0  fracgpu simulated GPU, 1GiB  {u['uuid']}"
    assert u["index"] == 0


def test_create_on_another_device_and_remove_where_ambiguous(make_gpu):
    gpu = make_gpu(memory=GiB, devices=2)
    gpu.fracgpu("partition", "create", "half", "--memory", "50%", "--device", "1")
    gpu.fracgpu("partition", "create", "half", "--memory", "128MiB")
    uuids = {d.uuid: d.index for d in devices.probe(gpu.env)}
    limits = {uuids[u["uuid"]]: [p["memory_limit"] for p in u["partitions"]] for u in listed(gpu)}
    assert limits == {0: [128 * MiB], 1: [GiB // 2]}
    by_index = {i: u for u, i in uuids.items()}
    # the refusal names each GPU by the index --device takes
    refused(gpu.fracgpu("partition", "rm", "half", check=False), "exists on several GPUs", "--device N",
            f"GPU 0 (fracgpu simulated GPU, {by_index[0]})", f"GPU 1 (fracgpu simulated GPU, {by_index[1]})")
    gpu.fracgpu("partition", "rm", "half", "--device", "1")
    refused(gpu.fracgpu("partition", "rm", "half", "--device", "1", check=False), "no partition 'half' on GPU 1")
    gpu.fracgpu("partition", "rm", "half")   # now only device 0 has it
    assert all(u["partitions"] == [] for u in listed(gpu))


def test_gpu_indices_follow_cuda_visible_devices(make_gpu):
    """Under CUDA_VISIBLE_DEVICES=1 the machine's second GPU is the jobs' GPU 0: `gpus`, `partition create`,
    `partition list` and `top` all number it so, and say that a mask is in effect."""
    gpu = make_gpu(memory=GiB, devices=2)
    every = {d.index: d for d in devices.probe(gpu.env)}
    second = every[1]
    masked = {"CUDA_VISIBLE_DEVICES": "1", "COLUMNS": "120"}
    listing = json.loads(gpu.fracgpu("gpus", "--json", env=masked).stdout)
    assert listing["cuda_visible_devices"] == "1"
    assert [(g["index"], g["uuid"], g["total_memory"]) for g in listing["gpus"]] == [(0, second.uuid, GiB)]
    made = gpu.fracgpu("partition", "create", "team", "--memory", "256MiB", env=masked)
    assert made.stdout == "partition 'team' created on GPU 0: 256MiB, no compute share\n"
    assert "CUDA_VISIBLE_DEVICES=1" in made.stderr
    (u,) = [u for u in listed(gpu) if u["partitions"]]
    assert u["uuid"] == second.uuid   # made on the GPU the mask selects
    table = gpu.fracgpu("gpus", env=masked).stdout
    assert "CUDA_VISIBLE_DEVICES=1 is in effect" in table
    (row,) = screen.tables(table, "index")[0]
    assert (row["index"], row["UUID"], row["memory"], row["promised"]) == ("0", second.uuid, "1GiB", "256MiB")
    for command in (["partition", "list"], ["top", "--once", "--interval", "0.1"]):
        out = gpu.fracgpu(*command, env=masked).stdout
        assert "CUDA_VISIBLE_DEVICES=1 is in effect" in out and "GPU 0  fracgpu simulated GPU" in out, out
    # without the mask the same GPU is GPU 1; under a mask that hides it, it has no index
    assert "GPU 1  fracgpu simulated GPU" in gpu.fracgpu("partition", "list").stdout
    hidden = gpu.fracgpu("top", "--once", "--interval", "0.1", env={"CUDA_VISIBLE_DEVICES": "0"}).stdout
    assert "GPU hidden by CUDA_VISIBLE_DEVICES=0" in hidden
    unlisted = gpu.fracgpu("partition", "create", "x", "--device", "1", env=masked, check=False)
    assert unlisted.returncode == 2 and "jobs here see device 0 only" in unlisted.stderr
    assert "CUDA_VISIBLE_DEVICES=1 selects them" in unlisted.stderr and "fracgpu gpus" in unlisted.stderr


@pytest.mark.parametrize("args, phrases", [
    (["create", "team", "--memory", "2GiB"], ["memory limit 2GiB is above the 1GiB of GPU 0", "at most 1GiB"]),
    (["create", "team", "--memory", "12XB"], ["'--memory'", "unknown unit 'XB'"]),
    (["create", "team", "--memory", "0"], ["'--memory'", "zero"]),
    (["create", "team", "--memory", "101%"], ["'--memory'", "more than 100%"]),
    (["create", "bad name"], ["'NAME'", "invalid partition name 'bad name'"]),
    (["create", "-x"], []),   # an option click does not know: still a usage error
    (["create", "." + "x"], ["invalid partition name '.x'"]),
    (["create", "x" * 64], ["1 to 63 letters"]),
    (["create", "team", "--device", "1"], ["no CUDA device 1", "device 0 only"]),
    (["create", "team", "--device", "-1"], ["'--device'"]),
    (["rm", "nosuch"], ["no partition 'nosuch'", "fracgpu partition list"]),
    (["rm", "bad name"], ["invalid partition name"]),
    (["rm", "team", "--device", "3"], ["no CUDA device 3"]),
    (["create", "team", "--priority", "urgent"], ["'--priority'", "invalid priority 'urgent'",
                                                  "write high, normal or low"]),
    (["set", "team", "--priority", "High"], ["'--priority'", "write high, normal or low"]),
])
def test_bad_input(gpu, args, phrases):
    refused(gpu.fracgpu("partition", *args, check=False), *phrases)


def test_a_name_is_unique_on_its_gpu(gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    refused(gpu.fracgpu("partition", "create", "team", check=False), "partition 'team' already exists on GPU-",
            "fracgpu partition rm team")
    assert [p["memory_limit"] for p in listed(gpu)[0]["partitions"]] == [256 * MiB]


def test_a_partition_in_use_is_not_removed(clients, gpu):
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "team", "--", clients.lcuda, "hold", 64, 60)
    try:
        assert job.stdout.readline().strip() == "holding 64"
        refused(gpu.fracgpu("partition", "rm", "team", check=False),
                f"partition 'team' is in use by process {command_pid(job)} (client_lcuda)", "stop them first",
                "--force")
        (u,) = fracgpu.usage(gpu.state_dir)
        (team,) = u.partitions
        held = 64 * MiB + gpu.context   # its allocation and its context
        assert (team.used, team.peak, team.processes) == (held, held, 1)
        (proc,) = u.processes
        assert (proc.pid, proc.partition, proc.used) == (command_pid(job), "team", held)
        assert proc.command.startswith("client_")
    finally:
        job.kill()
        job.wait(timeout=10)
    gpu.fracgpu("partition", "rm", "team")   # the dead job is reaped, so the partition is free


def test_usage_of_a_private_partition_and_its_end(clients, gpu):
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "512MiB", "--", clients.lcuda, "hold", 100, 60)
    try:
        assert job.stdout.readline().strip() == "holding 100"
        (u,) = fracgpu.usage(gpu.state_dir)
        assert isinstance(u, fracgpu.GPUUsage) and u.total_memory == GiB
        held = 100 * MiB + gpu.context   # its allocation and its context
        assert u.partitions == [fracgpu.PartitionUsage(name=f"run-{job.pid}", memory_limit=512 * MiB, used=held,
                                                       peak=held, processes=1, ephemeral=True, oom_refusals=0,
                                                       memory_ceiling=512 * MiB)]
        assert [(p.pid, p.used, p.peak) for p in u.processes] == [(command_pid(job), held, held)]
        table = gpu.fracgpu("partition", "list", env={"COLUMNS": "200"}).stdout
        assert f"run-{job.pid} (private)" in table
        command = command_pid(job)
    finally:
        job.kill()
        job.wait(timeout=10)
    wait_gone(command)   # the kernel kills it as its fracgpu run dies
    (u,) = fracgpu.usage(gpu.state_dir)   # the killed job is reaped as usage() looks
    assert u.partitions == [] and u.processes == []


def test_usage_counts_refusals(clients, gpu):
    gpu.fracgpu("run", "--memory", "128MiB", "--", clients.lcuda, "alloc-until-oom", 64)
    gpu.fracgpu("partition", "create", "team", "--memory", "128MiB")
    gpu.fracgpu("run", "--partition", "team", "--", clients.lcuda, "alloc-until-oom", 64)
    (team,) = fracgpu.usage(gpu.state_dir)[0].partitions
    # The peak: as many 64 MiB blocks as fit beside its context, and the context.
    assert (team.used, team.peak) == (0, (128 * MiB - gpu.context) // (64 * MiB) * 64 * MiB + gpu.context)
    assert team.oom_refusals == 1   # the client's one refused allocation


def test_usage_without_a_state_folder_is_empty(tmp_path):
    assert fracgpu.usage(tmp_path / "never-made") == []
    assert not (tmp_path / "never-made").exists()


def test_usage_uses_fracgpu_state_dir(gpu):
    gpu.fracgpu("partition", "create", "team")
    code = "import fracgpu; print([p.name for u in fracgpu.usage() for p in u.partitions])"
    assert gpu.python(code).stdout.strip() == "['team']"


def test_usage_loads_no_driver(gpu):
    gpu.fracgpu("partition", "create", "team")
    code = ("import fracgpu; fracgpu.usage(); fracgpu.partitions.create('other', '1MiB')\n"
            "maps = open('/proc/self/maps').read(); print('libcuda' in maps, 'libfracgpu' in maps)")
    assert gpu.python("import fracgpu.partitions\n" + code).stdout.strip() == "False False"


def test_a_damaged_or_unsafe_state_is_an_error(gpu):
    gpu.fracgpu("partition", "create", "team")
    (path,) = gpu.state_dir.glob("gpu-*.state")
    path.write_bytes(path.read_bytes()[:1000])
    for args in (["list"], ["list", "--json"], ["create", "other"], ["rm", "team"]):
        refused(gpu.fracgpu("partition", *args, check=False), str(path), "truncated")
    with pytest.raises(fracgpu.state.StateError, match="truncated"):
        fracgpu.usage(gpu.state_dir)
    path.unlink()
    gpu.state_dir.chmod(0o770)
    try:
        refused(gpu.fracgpu("partition", "list", check=False), "unsafe permissions")
        refused(gpu.fracgpu("partition", "create", "team", check=False), "unsafe permissions")
    finally:
        gpu.state_dir.chmod(0o700)


def test_no_gpu_is_an_error_that_says_what_to_do(gpu):
    refused(gpu.fracgpu("partition", "create", "team", check=False, env={"CUDA_VISIBLE_DEVICES": ""}),
            "install the NVIDIA driver", 'eval "$(fracgpu sim env)"')


def test_the_library_api(gpu, monkeypatch):
    for name, value in gpu.env.items():   # the probe's environment, and FRACGPU_STATE_DIR
        monkeypatch.setenv(name, value)
    made = partitions.create("lib", "64MiB")
    assert (made.name, made.memory_limit, made.ephemeral) == ("lib", 64 * MiB, False)
    assert partitions.create("whole").memory_limit is None
    with pytest.raises(ValueError, match="above the 1GiB"):
        partitions.create("big", GiB + 1)
    with pytest.raises(fracgpu.state.StateError, match="already exists"):
        partitions.create("lib")
    uuid = partitions.remove("lib")
    assert uuid == fracgpu.usage()[0].uuid
    with pytest.raises(ValueError, match="no partition 'lib'"):
        partitions.remove("lib")


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fracgpu", "partition", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for command in ("create", "list", "rm"):
        assert command in result.stdout


def test_a_partition_has_a_priority_that_can_change_while_its_jobs_run(clients, gpu):
    out = gpu.fracgpu("partition", "create", "serve", "--memory", "128MiB", "--priority", "high").stdout
    assert out == "partition 'serve' created on GPU 0: 128MiB, no compute share, high priority\n"
    gpu.fracgpu("partition", "create", "train")
    assert {p["name"]: p["priority"] for p in listed(gpu)[0]["partitions"]} == {"serve": "high", "train": "normal"}
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--partition", "train", "--",
                    clients.lcuda, "hold", 16, 30)
    try:
        assert job.stdout.readline().startswith("holding")
        out = gpu.fracgpu("partition", "set", "train", "--priority", "low").stdout
        assert out == f"partition 'train' on {listed(gpu)[0]['uuid']}: no memory limit, no compute share, low " \
                      "priority\n"
        table = gpu.fracgpu("partition", "list", env={"COLUMNS": "200"}).stdout
        assert "serve (high)" in table and "train (low)" in table
    finally:
        job.kill()
        job.wait(timeout=10)
    assert {p["name"]: p["priority"] for p in listed(gpu)[0]["partitions"]}["train"] == "low"
    result = gpu.fracgpu("run", "--partition", "train", "--priority", "high", "--", "echo", "started", check=False)
    assert result.returncode == 125 and "started" not in result.stdout
    assert "fracgpu partition set train --priority high" in result.stderr


def test_a_bad_fracgpu_priority_refuses_cuda_and_names_the_classes(clients, gpu, shim):
    result = gpu.run(clients.lcuda, "info", check=False,
                     env={"LD_PRELOAD": shim, "FRACGPU_PARTITION": "p", "FRACGPU_PRIORITY": "urgent"})
    assert result.returncode != 0
    assert "FRACGPU_PRIORITY: invalid priority 'urgent'" in result.stderr
    assert "write high, normal or low" in result.stderr
