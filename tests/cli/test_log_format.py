"""`--log-format json` / FRACGPU_LOG_FORMAT=json: the services (the exporter, the Slurm prolog) and the shim's
one-line refusals write one JSON object a line, with the fields a log pipeline keys on; every line parses."""

from __future__ import annotations

import json
import sys

from tests.cli.test_exporter import exporter, free_port, one, scrape
from tests.support.simgpu import MiB, alloc_job, shim_path

FIELDS = {"time", "level", "component", "gpu", "partition", "job", "pid", "event", "message", "figures"}


def json_lines(text: str) -> list[dict]:
    """Each line of ``text`` as the object it is; a line that is not one fails the test."""
    objects = [json.loads(line) for line in text.splitlines() if line.strip()]
    for o in objects:
        assert set(o) == FIELDS, o
        assert o["time"].endswith("+00:00") and isinstance(o["pid"], int) and isinstance(o["figures"], dict)
    return objects


def test_the_exporter_logs_json_lines(gpu):
    gpu.fracgpu("partition", "create", "team")
    port = free_port()
    with exporter(gpu, port, "--log-format", "json") as proc:
        assert one(scrape(port), "fracgpu_state_readable").value == 1
        (path,) = gpu.state_dir.glob("gpu-*.state")
        path.write_bytes(path.read_bytes()[:1000])
        assert one(scrape(port), "fracgpu_state_readable").value == 0
    logged = json_lines(proc.stderr.read())
    unreadable = [o for o in logged if o["event"] == "state-unreadable"]
    assert len(unreadable) == 1 and unreadable[0]["level"] == "error" and "truncated" in unreadable[0]["message"]
    assert all(o["component"] == "exporter" and o["pid"] == proc.pid for o in logged)


def test_the_exporter_serving_line_is_json_with_the_setting(gpu):
    port = free_port()
    proc = gpu.popen(sys.executable, "-m", "fracgpu", "exporter", "--port", port, env={"FRACGPU_LOG_FORMAT": "json"})
    try:
        (line,) = json_lines(proc.stdout.readline())
        assert (line["event"], line["level"], line["figures"]) == ("serving", "info", {"port": port})
        assert f"http://127.0.0.1:{port}/metrics" in line["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = gpu.fracgpu("exporter", "--port", port, env={"FRACGPU_LOG_FORMAT": "xml"}, check=False)
    assert bad.returncode == 2 and "FRACGPU_LOG_FORMAT: invalid log format 'xml': write text or json" in bad.stderr


def test_the_slurm_prolog_logs_its_refusal_as_json(gpu):
    env = {"SLURM_JOB_ID": "4242", "SLURM_SHARDS_ON_NODE": "12", "FRACGPU_LOG_FORMAT": "text"}
    result = gpu.fracgpu("slurm-prolog", "--shards-per-gpu", "8", "--log-format", "json", env=env, check=False)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = json_lines(result.stderr)
    assert (line["component"], line["event"], line["level"], line["job"], line["partition"]) == \
        ("slurm-prolog", "refused", "error", 4242, "slurm-4242")
    assert "12 shards on this node" in line["message"]
    # the task's (the user's) FRACGPU_LOG_FORMAT is not the node's: without the option, text
    plain = gpu.fracgpu("slurm-prolog", "--shards-per-gpu", "8", env={**env, "FRACGPU_LOG_FORMAT": "json"},
                        check=False)
    assert plain.stderr.startswith("fracgpu slurm-prolog: the job has 12 shards")


def test_the_shims_refusals_are_json_lines_with_the_figures(gpu):
    job = gpu.run(sys.executable, "-m", "fracgpu", "run", "--memory", "64MiB", "--", sys.executable, "-c",
                  alloc_job(128), env={"FRACGPU_LOG_FORMAT": "json"})
    assert job.stdout.strip() == "2"   # CUDA_ERROR_OUT_OF_MEMORY
    (line,) = json_lines(job.stderr)
    assert (line["component"], line["event"], line["level"]) == ("shim", "out-of-memory", "error")
    assert line["partition"].startswith("run-") and line["gpu"].startswith("GPU-")
    assert line["job"] == int(line["partition"].removeprefix("run-"))   # the holder: the job's fracgpu run
    figures = line["figures"]
    assert figures["limit_bytes"] == 64 * MiB and figures["requested_bytes"] == 128 * MiB
    assert figures["used_bytes"] == gpu.context   # its context, charged to the job
    # CUDA refused outright (a setting that does not parse): a "refused" line, and cuInit fails
    refused = gpu.run(sys.executable, "-c", "import ctypes; print(ctypes.CDLL('libcuda.so.1').cuInit(0))",
                      env={"FRACGPU_LOG_FORMAT": "json", "FRACGPU_PARTITION": "x", "FRACGPU_MEMORY": "lots",
                           "LD_PRELOAD": shim_path()})
    assert refused.stdout.strip() != "0"
    (line,) = json_lines(refused.stderr)
    assert (line["event"], line["level"], line["partition"], line["job"]) == ("refused", "error", "x", None)
    assert "FRACGPU_MEMORY" in line["message"]
