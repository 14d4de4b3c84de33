"""Nothing is promised twice: `fracgpu partition create/set`, `fracgpu run --memory`,
`fracgpu.init(memory=)` and `fracgpu.partitions.create` refuse a memory limit that does not fit
beside what the GPU has promised, and `--overcommit` makes it best effort, shown as such in
`partition list`, `top` and the exporter.

Each test has its own simulated GPU of 4 GiB and its own state folder."""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.simgpu import GiB, MiB, alloc_job
from fracgpu import metrics, partitions, state


@pytest.fixture
def gpu4(make_gpu):
    return make_gpu(memory=4 * GiB)


def uuid_of(gpu) -> str:
    (u,) = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
    return u["uuid"]


def refusal(uuid: str, limit: str = "3GiB", promised: str = "3GiB (team 3GiB)", remains: str = "1GiB") -> str:
    return (f"{limit} does not fit on {uuid} (4GiB): already promised {promised}; {remains} remains. "
            f"Ask for at most {remains}, or pass --overcommit")


def partitions_of(gpu) -> dict[str, dict]:
    (u,) = json.loads(gpu.fracgpu("partition", "list", "--json").stdout)
    return {p["name"]: p for p in u["partitions"]}


def overcommitted_other(gpu, *limits: str) -> tuple[str, dict[str, dict]]:
    """``partition create other LIMITS --overcommit``: what it printed, and the partitions listed then."""
    out = gpu.fracgpu("partition", "create", "other", *limits, "--overcommit").stdout
    return out, partitions_of(gpu)


def exported_gauge(gpu, name: str) -> dict[str, float]:
    """The exporter's gauge ``name`` for each partition of ``gpu``'s state."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.UsageCollector(read=lambda: state.usage(gpu.state_dir)))
    return {s.labels["partition"]: s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if s.name == name}


@pytest.mark.fault('A memory limit that does not fit beside what the GPU has promised',
                   'refused, naming the promises, to whom, and what remains; `--overcommit` makes it best effort')
def test_a_second_3gib_promise_on_a_4gib_gpu_is_refused_then_overcommitted(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    uuid = uuid_of(gpu4)
    result = gpu4.fracgpu("partition", "create", "other", "--memory", "3GiB", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "Error: " + refusal(uuid)
    assert list(partitions_of(gpu4)) == ["team"]

    out, listed = overcommitted_other(gpu4, "--memory", "3GiB")
    assert out == ("partition 'other' created on GPU 0: 3GiB (best effort: overcommitted, not a promise), "
                   "no compute share\n")
    assert (listed["team"]["best_effort"], listed["other"]["best_effort"]) == (False, True)
    table = gpu4.fracgpu("partition", "list", env={"COLUMNS": "200"}).stdout
    rows = {cells[0]: cells[1] for line in table.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.split("│")[1:-1]]]}
    assert rows == {"team": "3GiB", "other": "3GiB best effort"}

    top = json.loads(gpu4.fracgpu("top", "--json", "--interval", "0.1").stdout)
    assert {p["name"]: p["best_effort"] for p in top["gpus"][0]["partitions"]} == {"team": False, "other": True}
    screen = gpu4.fracgpu("top", "--once", "--interval", "0.1", env={"COLUMNS": "200"}).stdout
    assert "0B / 3GiB best effort" in screen and "0B / 3GiB " in screen
    assert exported_gauge(gpu4, "fracgpu_partition_best_effort") == {"team": 0, "other": 1}


def test_partition_set_checks_the_new_limit(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    gpu4.fracgpu("partition", "create", "small", "--memory", "1GiB")
    uuid = uuid_of(gpu4)
    result = gpu4.fracgpu("partition", "set", "small", "--memory", "2GiB", check=False)
    assert result.returncode == 2 and result.stderr.strip() == "Error: " + refusal(uuid, limit="2GiB")
    assert partitions_of(gpu4)["small"]["memory_limit"] == GiB
    out = gpu4.fracgpu("partition", "set", "small", "--memory", "2GiB", "--overcommit").stdout
    assert "2GiB (best effort: overcommitted, not a promise)" in out
    assert partitions_of(gpu4)["small"]["best_effort"]
    gpu4.fracgpu("partition", "set", "small", "--memory", "512MiB")   # fits: a promise again
    assert not partitions_of(gpu4)["small"]["best_effort"]


@pytest.mark.parametrize("command", [["partition", "create", "x"], ["partition", "set", "x", "--priority", "low"]])
def test_overcommit_without_a_limit_or_share_is_a_usage_error(gpu4, command):
    result = gpu4.fracgpu(*command, "--overcommit", check=False)
    assert result.returncode == 2 and "--overcommit needs --memory SIZE or --compute SHARE" in result.stderr


@pytest.mark.fault('`fracgpu run --memory` past what the GPU has left to promise',
                   'exit 125 before the job starts, naming the promises; `--overcommit` runs it, best effort')
def test_run_refuses_a_limit_that_does_not_fit_before_the_job_starts(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    uuid = uuid_of(gpu4)
    for memory in ("2GiB", "50%"):
        result = gpu4.fracgpu("run", "--memory", memory, "--", "echo", "started", check=False)
        assert result.returncode == 125, result.stderr
        assert result.stdout == ""
        assert result.stderr.strip() == "Error: " + refusal(uuid, limit="2GiB")
    result = gpu4.fracgpu("run", "--memory", "1GiB", "--", "echo", "started")
    assert result.stdout == "started\n"
    # Overcommitted, the job runs; its private partition is best effort, and gets what nobody was promised.
    code = alloc_job(512) + ("import json, subprocess, sys\n"
                              "print(json.dumps([p for u in json.loads(subprocess.run([sys.executable, '-m', "
                              "'fracgpu', 'partition', 'list', '--json'], capture_output=True, text=True).stdout) "
                              "for p in u['partitions'] if p['name'].startswith('run-')]))\n")
    result = gpu4.fracgpu("run", "--memory", "2GiB", "--overcommit", "--", sys.executable, "-c", code)
    alloc, listed = result.stdout.splitlines()
    assert alloc == "0"   # within the 1 GiB nobody was promised
    (private,) = json.loads(listed)
    assert private["best_effort"] and private["memory_limit"] == 2 * GiB
    assert gpu4.fracgpu("run", "--memory", "2GiB", "--overcommit", "--", sys.executable, "-c",
                        alloc_job(1024 + 1)).stdout == "2\n"   # past what was not promised: out of memory


def test_overcommit_without_memory_or_compute_is_refused_by_run(gpu4):
    result = gpu4.fracgpu("run", "--priority", "low", "--overcommit", "--", "echo", "started", check=False)
    assert result.returncode == 125
    assert "give memory (--memory SIZE) or compute (--compute SHARE) with it" in result.stderr


def test_the_library_refuses_likewise(gpu4):
    partitions.create("team", "3GiB", env=gpu4.env, state_dir=gpu4.state_dir)
    uuid = uuid_of(gpu4)
    with pytest.raises(state.DoesNotFit) as refused:
        partitions.create("other", "3GiB", env=gpu4.env, state_dir=gpu4.state_dir)
    assert str(refused.value) == refusal(uuid)
    assert partitions.create("other", "3GiB", overcommit=True, env=gpu4.env, state_dir=gpu4.state_dir).best_effort
    with pytest.raises(state.DoesNotFit):   # a best-effort partition made a promise again: it must fit
        partitions.update("other", memory="2GiB", state_dir=gpu4.state_dir, env=gpu4.env)
    # A best-effort partition promises nothing: the promise beside it may grow to the whole GPU.
    assert partitions.update("team", memory="4GiB", state_dir=gpu4.state_dir, env=gpu4.env)[1].memory_limit == 4 * GiB


def test_init_raises_the_same_message(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    uuid = uuid_of(gpu4)
    code = ("import fracgpu\n"
            "try:\n"
            "    fracgpu.init(memory='75%')\n"
            "except ValueError as e:\n"
            "    print(type(e).__name__, e)\n"
            "print(fracgpu.init(memory='3GiB', overcommit=True))\n")
    refused, name = gpu4.python(code).stdout.splitlines()
    assert refused == "DoesNotFit " + refusal(uuid)
    assert name.startswith("init-")


@pytest.mark.fault('`fracgpu run --compute` past the shares the GPU has promised',
                   'exit 125 before the job starts, naming the promises; `--overcommit` runs it, best effort, '
                   'labelled in `partition list`, `top` and the exporter')
def test_compute_shares_are_promised_once_and_overcommitted_ones_are_labelled(gpu4):
    gpu4.fracgpu("partition", "create", "train", "--compute", "90%")
    uuid = uuid_of(gpu4)
    result = gpu4.fracgpu("run", "--compute", "90%", "--", "echo", "started", check=False)
    assert result.returncode == 125 and result.stdout == "", result.stderr
    assert (f"90% of compute does not fit on {uuid}: already promised 90% of its time (train 90%); 10% remains"
            in result.stderr)
    assert gpu4.fracgpu("run", "--compute", "10%", "--", "echo", "started").stdout == "started\n"
    out, listed = overcommitted_other(gpu4, "--compute", "90%")
    assert out == ("partition 'other' created on GPU 0: no memory limit, 90% of compute (best effort: "
                   "overcommitted, not a promise)\n")
    assert (listed["train"]["compute_best_effort"], listed["other"]["compute_best_effort"]) == (False, True)
    table = gpu4.fracgpu("partition", "list", env={"COLUMNS": "200"}).stdout
    assert "90% best effort" in table
    top = json.loads(gpu4.fracgpu("top", "--json", "--interval", "0.1").stdout)
    assert {p["name"]: p["compute_best_effort"] for p in top["gpus"][0]["partitions"]} == \
        {"train": False, "other": True}
    screen = gpu4.fracgpu("top", "--once", "--interval", "0.1", env={"COLUMNS": "200"}).stdout
    assert "90% best effort" in screen
    assert exported_gauge(gpu4, "fracgpu_partition_compute_best_effort") == {"train": 0, "other": 1}


@pytest.mark.fault('Memory held on the GPU by another state folder\'s jobs (or jobs without fracgpu)',
                   'a promise that does not fit beside it is refused, naming the pids; `--overcommit` makes it '
                   'best effort')
def test_a_promise_respects_memory_another_state_folder_holds_on_the_device(gpu4, tmp_path):
    other = tmp_path / "other-state"
    other.mkdir(mode=0o700)
    holder = gpu4.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "3GiB", "--", sys.executable, "-c",
                        alloc_job(2560) + "import sys\nsys.stdout.flush()\nsys.stdin.readline()\n",
                        env={"FRACGPU_STATE_DIR": str(other)})
    try:
        assert holder.stdout.readline().strip() == "0"   # 2.5 GiB held, in the other folder's books
        for command in (["partition", "create", "team", "--memory", "2GiB"],
                        ["run", "--memory", "2GiB", "--", "echo", "started"]):
            result = gpu4.fracgpu(*command, check=False)
            assert result.returncode in (2, 125) and "started" not in result.stdout, result.stderr
            assert "is held outside these books (pid " in result.stderr, result.stderr
            assert "another state folder's jobs, or jobs without fracgpu" in result.stderr
        assert gpu4.fracgpu("run", "--memory", "1GiB", "--", "echo", "started").stdout == "started\n"
        gpu4.fracgpu("partition", "create", "small", "--memory", "1GiB")   # fits beside it; grown, it would not
        result = gpu4.fracgpu("partition", "set", "small", "--memory", "2GiB", check=False)
        assert result.returncode == 2 and "is held outside these books (pid " in result.stderr, result.stderr
        gpu4.fracgpu("partition", "rm", "small")
        out = gpu4.fracgpu("partition", "create", "team", "--memory", "2GiB", "--overcommit").stdout
        assert "best effort" in out
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
