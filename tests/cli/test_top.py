"""`fracgpu top`: the snapshot (--once, --json) on the simulated GPU, and the achieved share it computes.

Each test has its own simulated GPU and state folder (the `gpu` fixture)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from tests.support.screen import tables
from tests.support.simgpu import GiB, MiB, command_pid
from fracgpu import snapshot, state
from fracgpu.units import format_size


def refused(result, *phrases):
    assert result.returncode == 2, result.stdout + result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def holding_job(clients, gpu):
    """A job under `fracgpu run --memory 256MiB` holding 200 MiB until the test ends."""
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 200, 30)
    try:
        line = job.stdout.readline()
        assert line.strip() == "holding 200", (line, job.stderr.read() if job.poll() is not None else "")
        yield job
    finally:
        job.kill()
        job.wait(timeout=10)


def test_once_shows_the_partition_and_its_process(gpu, holding_job):
    result = gpu.fracgpu("top", "--once", "--interval", "0.2", env={"COLUMNS": "200"})
    assert "\x1b[" not in result.stdout   # not a terminal: no ANSI sequences
    name = f"run-{holding_job.pid}"
    (partitions,), (processes,) = tables(result.stdout, "partition"), tables(result.stdout, "pid")
    (partition,) = partitions
    held = format_size(200 * MiB + gpu.context)   # its allocation and its context
    percent = f"{round(100 * (200 * MiB + gpu.context) / (256 * MiB))}%"
    assert partition["partition"] == f"{name} (private)"
    assert (partition["memory / limit"], partition["%"], partition["peak"]) == (f"{held} / 256MiB", percent, held)
    assert partition["share"] == "-" and partition["achieved"].endswith("%") and partition["procs"] == "1"
    assert partition["GPU time"].endswith(" s")
    (process,) = processes
    assert process["pid"] == str(command_pid(holding_job)) and process["partition"] == name
    assert process["command"].startswith("client_") and process["memory"] == held
    # the job's name in the ledger: its command line, as `fracgpu run` records it without --name
    assert process["job"] == partition["job"] == shlex.join(str(a) for a in holding_job.args[7:])
    (u,) = state.usage(gpu.state_dir)
    assert f"GPU 0  {u.name}  {u.uuid}" in result.stdout and f"{held} / 1GiB" in result.stdout


def test_once_json(gpu, holding_job):
    out = json.loads(gpu.fracgpu("top", "--once", "--json", "--interval", "0.2").stdout)
    assert 0.15 <= out["interval"] < 5
    (g,) = out["gpus"]
    held = 200 * MiB + gpu.context   # its allocation and its context
    assert g["total_memory"] == GiB and g["used"] == held
    (p,) = g["partitions"]
    assert (p["name"], p["memory_limit"], p["used"], p["peak"], p["processes"]) == \
        (f"run-{holding_job.pid}", 256 * MiB, held, held, 1)
    assert p["compute_share_achieved"] == 0.0   # measured: the job launches nothing
    (q,) = g["processes"]
    assert (q["pid"], q["used"], q["compute_share_achieved"]) == (command_pid(holding_job), held, 0.0)


def test_nothing_running(gpu):
    assert "No GPU has fracgpu partitions" in gpu.fracgpu("top", "--once", "--interval", "0.1").stdout
    assert json.loads(gpu.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"] == []


@pytest.mark.parametrize("args, phrase", [
    (["--interval", "0"], "'--interval'"),
    (["--interval", "soon"], "'--interval'"),
    (["--bogus"], "No such option"),
])
def test_bad_options(gpu, args, phrase):
    refused(gpu.fracgpu("top", "--once", *args, check=False), phrase)


@pytest.mark.fault('`fracgpu top` on a damaged or unsafe state',
                   'refused with a message, exit 2')
def test_a_damaged_or_unsafe_state_is_refused(gpu):
    gpu.fracgpu("partition", "create", "team")
    (path,) = gpu.state_dir.glob("gpu-*.state")
    path.write_bytes(path.read_bytes()[:1000])
    refused(gpu.fracgpu("top", "--once", "--interval", "0.1", check=False), str(path), "truncated")
    path.unlink()
    gpu.state_dir.chmod(0o770)
    try:
        refused(gpu.fracgpu("top", "--json", "--interval", "0.1", check=False), "unsafe permissions")
    finally:
        gpu.state_dir.chmod(0o700)


def usage(*partitions: tuple[str, int], processes: tuple[tuple[int, str, int], ...] = ()) -> list[state.GPUUsage]:
    return [state.GPUUsage(uuid="GPU-x", name="sim", total_memory=GiB,
                           partitions=[state.PartitionUsage(name=n, memory_limit=None, used=0, peak=0, processes=1,
                                                            ephemeral=False, oom_refusals=0, device_ns=ns)
                                       for n, ns in partitions],
                           processes=[state.ProcessUsage(pid=pid, partition=part, command="c", used=0, peak=0,
                                                         device_ns=ns) for pid, part, ns in processes])]


def test_achieved_share_is_device_time_over_the_interval():
    before = (10.0, usage(("a", 1_000_000_000), ("b", 5_000_000_000), ("gone", 0), processes=((7, "a", 0),)))
    after = (12.0, usage(("a", 1_500_000_000), ("b", 1_000), ("new", 9), processes=((7, "a", 500_000_000),)))
    view = snapshot.take(before, after)
    assert view.interval == 2.0
    g = view.gpus[0]
    shares = {p.name: view.partition_share(g, p) for p in g.partitions}
    # a: 0.5 s in 2 s; b went down (made again): not measurable; new: no earlier read
    assert shares == {"a": 0.25, "b": None, "new": None}
    assert view.process_share(g, g.processes[0]) == 0.25
    alone = snapshot.take(None, after)
    assert alone.interval is None and alone.partition_shares == {}
    assert snapshot.as_json(view)["gpus"][0]["partitions"][1]["compute_share_achieved"] is None


@pytest.mark.parametrize("drift, unknown, text", [
    (32 * MiB, 0, "+32MiB"), (-2 * MiB, 0, "-2MiB"), (0, 0, "0"), (None, 0, "-"),
    (None, 1, "?"), (0, 2, "?"), (4 * MiB, 1, "+4MiB ?"),
])
def test_drift_is_shown_signed_with_unknown_marked(drift, unknown, text):
    from fracgpu.cli.common import drift_text

    assert drift_text(drift, unknown) == text


def test_a_gpu_no_longer_on_the_machine_is_marked_stale(make_gpu):
    """State left by a GPU that is gone (here a simulated GPU replaced by another) is not shown as a GPU
    of this machine: its heading says it is gone, with no index, and its partitions are summed up."""
    old = make_gpu(memory=GiB)
    old.fracgpu("partition", "create", "team", "--memory", "64MiB")
    new = make_gpu(memory=GiB)
    here = {"FRACGPU_STATE_DIR": str(old.state_dir)}
    out = new.fracgpu("top", "--once", "--interval", "0.1", env=here).stdout
    assert "GPU gone (stale state)  fracgpu simulated GPU" in out
    assert "stale: this GPU is not on this machine now; its 1 partition(s)" in out and "team" not in out
    (g,) = json.loads(new.fracgpu("top", "--json", "--interval", "0.1", env=here).stdout)["gpus"]
    assert (g["index"], g["present"]) == (None, False)
    (g,) = json.loads(old.fracgpu("top", "--json", "--interval", "0.1").stdout)["gpus"]
    assert (g["index"], g["present"]) == (0, True)


def test_on_a_kubernetes_node_each_partition_shows_its_pod_and_keeps_one_line_at_80_columns():
    from rich.console import Console

    from fracgpu.cli import top

    def shown(view: snapshot.Snapshot) -> list[dict[str, str]]:
        screen = Console(width=80, record=True)
        screen.print(top.render(view, "/state", 80))
        out = screen.export_text()
        assert all(len(line) <= 80 for line in out.splitlines()), out
        (rows,) = tables(out, "partition")
        return rows

    name = "k8s-slices-gpu0-0-1"
    pods = {("GPU-x", name): {"namespace": "team-a", "pod": "trainer-a", "container": "main"}}
    rows = shown(snapshot.take(None, (1.0, usage((name, 0), ("team", 0))), pods=pods))
    assert {r["partition"]: r["pod"] for r in rows} == {name: "team-a/trainer-a", "team": "-"}
    assert all("memory / limit" in r for r in rows)
    # Off Kubernetes there is no such column.
    (row,) = shown(snapshot.take(None, (1.0, usage(("team", 0)))))
    assert row["partition"] == "team" and "pod" not in row
