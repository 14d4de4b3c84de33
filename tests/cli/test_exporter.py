"""`fracgpu exporter`: /metrics scraped and parsed with the Prometheus text parser.

The exporter runs as a subprocess on a free port, on the test's own simulated GPU
and state folder (the `gpu` fixture)."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.simgpu import GiB, MiB, command_pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def exporter(gpu, port: int):
    proc = gpu.popen(sys.executable, "-m", "fracgpu", "exporter", "--port", port)
    try:
        line = proc.stdout.readline()
        assert f"serving http://127.0.0.1:{port}/metrics" in line, \
            (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def scrape(port: int) -> dict[str, list]:
    """Sample name -> its samples, as the Prometheus text parser reads /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def one(samples: dict[str, list], name: str, **labels):
    matching = [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


def test_metrics_of_a_holding_job(gpu, clients):
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 200, 30)
    port = free_port()
    try:
        assert job.stdout.readline().strip() == "holding 200"
        with exporter(gpu, port) as proc:
            samples = scrape(port)
            uuid = one(samples, "fracgpu_gpu_memory_total_bytes").labels["gpu"]
            assert uuid.startswith("GPU-") and one(samples, "fracgpu_gpu_memory_total_bytes").value == GiB
            part = {"gpu": uuid, "partition": f"run-{job.pid}"}
            assert one(samples, "fracgpu_partition_memory_used_bytes", **part).value == 200 * MiB
            assert one(samples, "fracgpu_partition_memory_limit_bytes", **part).value == 256 * MiB
            assert one(samples, "fracgpu_partition_memory_peak_bytes", **part).value == 200 * MiB
            assert one(samples, "fracgpu_partition_processes", **part).value == 1
            assert one(samples, "fracgpu_partition_oom_refusals_total", **part).value == 0
            assert one(samples, "fracgpu_partition_device_seconds_total", **part).value == 0
            assert one(samples, "fracgpu_partition_launches_total", **part).value == 0
            assert "fracgpu_partition_compute_share_ratio" not in samples   # no share set
            proc_labels = {**part, "pid": str(command_pid(job))}
            assert one(samples, "fracgpu_process_memory_used_bytes", **proc_labels).value == 200 * MiB
            assert one(samples, "fracgpu_process_device_seconds_total", **proc_labels).value == 0
            fb = one(samples, "DCGM_FI_DEV_FB_USED", gpu="0", UUID=uuid)
            assert fb.value == 200 and fb.labels["modelName"] == "fracgpu simulated GPU"
            assert one(samples, "DCGM_FI_DEV_FB_FREE", gpu="0").value == 1024 - 200
            assert one(samples, "fracgpu_state_readable").value == 1
            # A shared partition with a share, read on the next scrape.
            gpu.fracgpu("partition", "create", "svc", "--memory", "128MiB", "--compute", "40%", "--cap")
            samples = scrape(port)
            svc = {"gpu": uuid, "partition": "svc"}
            assert one(samples, "fracgpu_partition_compute_share_ratio", **svc).value == pytest.approx(0.4)
            assert one(samples, "fracgpu_partition_memory_limit_bytes", **svc).value == 128 * MiB
            assert one(samples, "fracgpu_partition_memory_used_bytes", **svc).value == 0
        assert proc.returncode == 0, proc.stderr.read()   # SIGTERM: a clean exit
    finally:
        job.kill()
        job.wait(timeout=10)


def test_unlimited_partition_reports_the_device_total(gpu):
    gpu.fracgpu("partition", "create", "open")
    port = free_port()
    with exporter(gpu, port) as proc:
        samples = scrape(port)
        assert one(samples, "fracgpu_partition_memory_limit_bytes", partition="open").value == GiB
        assert one(samples, "DCGM_FI_DEV_FB_USED").value == 0
        proc.send_signal(signal.SIGINT)   # Ctrl-C: a clean exit too
        assert proc.wait(timeout=10) == 0


def test_a_port_in_use_is_refused(gpu):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gpu.fracgpu("exporter", "--port", port, check=False, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port}" in result.stderr and "--port" in result.stderr and "Traceback" not in result.stderr


def test_an_unsafe_state_is_refused(gpu):
    gpu.state_dir.chmod(0o770)
    try:
        result = gpu.fracgpu("exporter", "--port", free_port(), check=False, timeout=30)
    finally:
        gpu.state_dir.chmod(0o700)
    assert result.returncode == 2 and "unsafe permissions" in result.stderr, result.stderr


def test_bad_port_option(gpu):
    result = gpu.fracgpu("exporter", "--port", "70000", check=False)
    assert result.returncode == 2 and "'--port'" in result.stderr


@pytest.mark.fault('The state damaged while the exporter serves',
                   '`fracgpu_state_readable` 0 and a message; no crash')
def test_a_state_damaged_while_serving_is_a_gauge_not_a_crash(gpu):
    gpu.fracgpu("partition", "create", "team")
    port = free_port()
    with exporter(gpu, port) as proc:
        assert one(scrape(port), "fracgpu_state_readable").value == 1
        (path,) = gpu.state_dir.glob("gpu-*.state")
        path.write_bytes(path.read_bytes()[:1000])
        samples = scrape(port)
        assert one(samples, "fracgpu_state_readable").value == 0
        assert "fracgpu_partition_memory_used_bytes" not in samples
    assert proc.returncode == 0
    assert "truncated" in proc.stderr.read()


def test_achieved_share_and_process_limit(gpu, clients, kernels):
    port = free_port()
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--compute", "50%", "--cap", "--",
                    clients.lcuda, "busy", 5, 1, kernels)
    try:
        with exporter(gpu, port):
            command = str(command_pid(job))
            import time

            time.sleep(1.0)
            first = scrape(port)
            assert "fracgpu_partition_compute_share_achieved_ratio" not in first   # nothing to compare with yet
            time.sleep(1.5)
            samples = scrape(port)
            part = {"partition": f"run-{job.pid}"}
            achieved = one(samples, "fracgpu_partition_compute_share_achieved_ratio", **part).value
            assert 0.40 <= achieved <= 0.56, achieved        # capped at 50% of the GPU's time
            proc = one(samples, "fracgpu_process_compute_share_achieved_ratio", pid=command).value
            assert abs(proc - achieved) < 0.02
            assert one(samples, "fracgpu_process_memory_limit_bytes", pid=command).value == 256 * MiB
    finally:
        job.kill()
        job.wait(timeout=10)
