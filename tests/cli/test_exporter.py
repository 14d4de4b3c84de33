"""`fracgpu exporter`: /metrics scraped and parsed with the Prometheus text parser.

The exporter runs as a subprocess on a free port, on the test's own simulated GPU
and state folder (the `gpu` fixture). Its defaults: port 10061 (not dcgm-exporter's
9400), partition and GPU series only; `--per-process` adds the process series and
`--dcgm` dcgm-exporter's framebuffer series. `gpu` is the GPU's index and `UUID`
its UUID on every series."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fracgpu import devices, metrics, state
from fracgpu.cli.exporter import DEFAULT_PORT
from tests.support.simgpu import GiB, MiB, command_pid

SIM_BUS_ID = "00000000:18:00.0"   # the simulated driver's cuDeviceGetPCIBusId for its first device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def exporter(gpu, port: int | None, *options: str, env: dict | None = None):
    """`fracgpu exporter` on `port` (None: its default port) with these options, until the block ends."""
    port_options = () if port is None else ("--port", port)
    proc = gpu.popen(sys.executable, "-m", "fracgpu", "exporter", *port_options, *options, env=env)
    port = DEFAULT_PORT if port is None else port
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
        with exporter(gpu, port, "--per-process", "--dcgm") as proc:
            samples = scrape(port)
            uuid = one(samples, "fracgpu_gpu_memory_total_bytes", gpu="0").labels["UUID"]
            assert uuid.startswith("GPU-") and one(samples, "fracgpu_gpu_memory_total_bytes").value == GiB
            # A private partition is in the GPU's one series of them all, not a series of its own.
            part = {"gpu": "0", "UUID": uuid, "partition": metrics.PRIVATE}
            assert one(samples, "fracgpu_partition_memory_used_bytes", **part).value == 200 * MiB + gpu.context
            assert one(samples, "fracgpu_partition_memory_limit_bytes", **part).value == 256 * MiB
            assert one(samples, "fracgpu_partition_memory_peak_bytes", **part).value == 200 * MiB + gpu.context
            assert one(samples, "fracgpu_partition_processes", **part).value == 1
            assert one(samples, "fracgpu_partition_oom_refusals_total", **part).value == 0
            assert one(samples, "fracgpu_partition_device_seconds_total", **part).value == 0
            assert one(samples, "fracgpu_partition_launches_total", **part).value == 0
            assert "fracgpu_partition_compute_share_ratio" not in samples   # no share set
            assert one(samples, "fracgpu_partition_priority", **part).value == 1   # normal
            proc_labels = {**part, "partition": f"run-{job.pid}", "pid": str(command_pid(job))}
            assert one(samples, "fracgpu_process_memory_used_bytes", **proc_labels).value == 200 * MiB + gpu.context
            assert one(samples, "fracgpu_process_device_seconds_total", **proc_labels).value == 0
            fb = one(samples, "DCGM_FI_DEV_FB_USED", gpu="0", UUID=uuid)
            fb_used = (200 * MiB + gpu.context) // MiB   # the job's memory and its context, in MiB
            assert fb.value == fb_used and fb.labels["modelName"] == "fracgpu simulated GPU"
            assert fb.labels["pci_bus_id"] == SIM_BUS_ID and fb.labels["device"] == "nvidia0"
            assert fb.labels["hostname"] == socket.gethostname()
            assert one(samples, "DCGM_FI_DEV_FB_FREE", gpu="0").value == 1024 - fb_used
            assert one(samples, "fracgpu_state_readable").value == 1
            # A shared partition with a share, read on the next scrape.
            gpu.fracgpu("partition", "create", "svc", "--memory", "128MiB", "--compute", "40%", "--cap",
                        "--priority", "high")
            samples = scrape(port)
            svc = {"gpu": "0", "UUID": uuid, "partition": "svc"}
            assert one(samples, "fracgpu_partition_compute_share_ratio", **svc).value == pytest.approx(0.4)
            assert one(samples, "fracgpu_partition_priority", **svc).value == 2
            assert one(samples, "fracgpu_partition_memory_limit_bytes", **svc).value == 128 * MiB
            assert one(samples, "fracgpu_partition_memory_used_bytes", **svc).value == 0
        assert proc.returncode == 0, proc.stderr.read()   # SIGTERM: a clean exit
    finally:
        job.kill()
        job.wait(timeout=10)


def test_defaults_partition_series_on_port_10061_without_process_or_dcgm_series(gpu, clients):
    with socket.socket() as probe:   # the default port is fixed: another program holding it is no failure of ours
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            pytest.skip(f"port {DEFAULT_PORT} is in use on this machine")
    assert DEFAULT_PORT not in (9400, 9835, 9100)   # dcgm-exporter, nvidia_gpu_exporter, node_exporter
    assert "[default: 10061;" in gpu.fracgpu("exporter", "--help").stdout
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 200, 30)
    try:
        assert job.stdout.readline().strip() == "holding 200"
        with exporter(gpu, None) as proc:
            samples = scrape(DEFAULT_PORT)
            part = one(samples, "fracgpu_partition_memory_used_bytes", gpu="0", partition=metrics.PRIVATE)
            assert part.value == 200 * MiB + gpu.context and one(samples, "fracgpu_partition_processes").value == 1
            assert [name for name in samples if name.startswith(("DCGM_", "fracgpu_process_"))] == []
            assert not any("pid" in s.labels for family in samples.values() for s in family)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        job.kill()
        job.wait(timeout=10)


def test_gpu_is_the_index_and_uuid_the_uuid_on_every_series(make_gpu, clients):
    gpu = make_gpu(memory=GiB, devices=2)
    found = devices.probe(gpu.env)
    uuids = {str(d.index): d.uuid for d in found}
    gpu.fracgpu("partition", "create", "zero", "--memory", "64MiB", "--device", "0")
    # A job on the second GPU, which it sees as its only one (its CUDA index 0).
    job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--", clients.lcuda, "hold", 100, 30,
                    env={"CUDA_VISIBLE_DEVICES": "1"})
    port = free_port()
    try:
        assert job.stdout.readline().strip() == "holding 100"
        # The exporter's own CUDA_VISIBLE_DEVICES renumbers nothing: gpu is the index nvidia-smi and dcgm-exporter show.
        with exporter(gpu, port, "--per-process", "--dcgm", env={"CUDA_VISIBLE_DEVICES": "1"}):
            samples = scrape(port)
        run = {"gpu": "1", "UUID": uuids["1"], "partition": metrics.PRIVATE}
        assert one(samples, "fracgpu_partition_memory_used_bytes", **run).value == 100 * MiB + gpu.context
        assert one(samples, "fracgpu_process_memory_used_bytes", **{**run, "partition": f"run-{job.pid}"}).labels[
            "pid"] == str(command_pid(job))
        assert one(samples, "fracgpu_partition_memory_limit_bytes", gpu="0", UUID=uuids["0"]).value == 64 * MiB
        assert one(samples, "DCGM_FI_DEV_FB_USED", gpu="1", UUID=uuids["1"], device="nvidia1").value == \
            (100 * MiB + gpu.context) // MiB   # the job's memory and its context
        assert one(samples, "DCGM_FI_DEV_FB_USED", gpu="0", UUID=uuids["0"], device="nvidia0").value == 0
        for d in found:
            info = one(samples, "fracgpu_gpu_info", gpu=str(d.index))
            assert info.labels["pci_bus_id"] == d.pci_bus_id and info.labels["UUID"] == d.uuid
        assert found[0].pci_bus_id == SIM_BUS_ID and found[1].pci_bus_id != SIM_BUS_ID
        labelled = [s for family in samples.values() for s in family if s.name != "fracgpu_state_readable"]
        assert labelled and all(uuids[s.labels["gpu"]] == s.labels["UUID"] for s in labelled)
        # dcgm-exporter labels its series with the driver's version where the NVIDIA kernel module is loaded.
        version = metrics.driver_version()
        assert {s.labels.get("DCGM_FI_DRIVER_VERSION") for s in samples["DCGM_FI_DEV_FB_FREE"]} == {version}
    finally:
        job.kill()
        job.wait(timeout=10)


def test_a_gpu_the_probe_did_not_see_is_numbered_after_those_it_saw():
    from prometheus_client import CollectorRegistry, generate_latest

    seen = devices.Device(index=0, uuid="GPU-seen", name="sim", total_memory=GiB, pci_bus_id=SIM_BUS_ID)
    read = [state.GPUUsage(uuid=u, name="sim", total_memory=GiB, partitions=[], processes=[])
            for u in ("GPU-gone", "GPU-seen")]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.UsageCollector(gpus={seen.uuid: seen}, read=lambda: read))
    totals = {s.labels["UUID"]: s.labels["gpu"] for family in text_string_to_metric_families(
        generate_latest(registry).decode()) for s in family.samples if s.name == "fracgpu_gpu_memory_total_bytes"}
    assert totals == {"GPU-seen": "0", "GPU-gone": "1"}


def test_driver_version_is_the_kernel_modules(tmp_path):
    (tmp_path / "version").write_text("580.65.06\n")
    assert metrics.driver_version(str(tmp_path / "version")) == "580.65.06"
    assert metrics.driver_version(str(tmp_path / "absent")) is None
    assert devices.pci_bus_id("0000:3b:00.0") == "00000000:3B:00.0"   # CUDA's form, written as NVML's
    assert devices.pci_bus_id("00000000:18:00.0") == SIM_BUS_ID


def test_unlimited_partition_reports_the_device_total(gpu):
    """An unlimited partition's limit is the device; its ceiling is what nobody else was promised, and
    a promised partition's ceiling is its limit (overcommitted: what the promises leave, up to it)."""
    gpu.fracgpu("partition", "create", "open")
    gpu.fracgpu("partition", "create", "promised", "--memory", "384MiB")
    gpu.fracgpu("partition", "create", "extra", "--memory", "768MiB", "--overcommit")
    port = free_port()
    with exporter(gpu, port, "--dcgm") as proc:
        samples = scrape(port)
        assert one(samples, "fracgpu_partition_memory_limit_bytes", partition="open").value == GiB
        assert one(samples, "fracgpu_partition_memory_ceiling_bytes", partition="open").value == GiB - 384 * MiB
        assert one(samples, "fracgpu_partition_memory_ceiling_bytes", partition="promised").value == 384 * MiB
        assert one(samples, "fracgpu_partition_memory_ceiling_bytes", partition="extra").value == 640 * MiB
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
        with exporter(gpu, port, "--per-process"):
            command = str(command_pid(job))
            import time

            time.sleep(1.0)
            first = scrape(port)
            assert "fracgpu_partition_compute_share_achieved_ratio" not in first   # nothing to compare with yet
            time.sleep(1.5)
            samples = scrape(port)
            part = {"partition": metrics.PRIVATE}
            achieved = one(samples, "fracgpu_partition_compute_share_achieved_ratio", **part).value
            assert 0.40 <= achieved <= 0.56, achieved        # capped at 50% of the GPU's time
            proc = one(samples, "fracgpu_process_compute_share_achieved_ratio", pid=command).value
            assert abs(proc - achieved) < 0.02
            assert one(samples, "fracgpu_process_memory_limit_bytes", pid=command).value == 256 * MiB
    finally:
        job.kill()
        job.wait(timeout=10)


def series(samples: dict[str, list], name: str, **labels) -> list:
    return [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]


def test_private_jobs_are_one_series_and_reserved_and_used_counters_follow_them(gpu, clients, kernels):
    import time

    port = free_port()
    with exporter(gpu, port, "--label-key", "team"):
        runs = []
        scrapes = []
        for seconds in (3, 3):   # two private jobs, one after the other, each its own run-PID partition
            job = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "256MiB", "--compute", "50%",
                            "--label", "team=vision", "--", clients.lcuda, "busy", seconds, 1, kernels)
            runs.append(job)
            deadline = time.monotonic() + 30
            while True:   # until the job's partition holds its process
                when, samples = time.monotonic(), scrape(port)
                if any(s.value for s in series(samples, "fracgpu_partition_processes", partition=metrics.PRIVATE)):
                    break
                assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
                time.sleep(0.05)
            scrapes.append((when, samples))
            time.sleep(1.0)
            scrapes.append((time.monotonic(), scrape(port)))
            assert job.wait(60) == 0, job.stderr.read()
            scrapes.append((time.monotonic(), scrape(port)))
    private = {"gpu": "0", "partition": metrics.PRIVATE}
    for _, samples in scrapes:
        # Never a series per run: the partitions are the GPU's one aggregate (no named one exists here).
        assert {s.labels["partition"] for s in samples["fracgpu_partition_memory_limit_bytes"]} == {metrics.PRIVATE}
    device = [one(s, "fracgpu_partition_device_seconds_total", **private).value for _, s in scrapes]
    reserved = [one(s, "fracgpu_partition_reserved_gpu_seconds_total", **private).value for _, s in scrapes]
    promised = [one(s, "fracgpu_partition_reserved_memory_byte_seconds_total", **private).value for _, s in scrapes]
    assert device == sorted(device) and device[-1] > device[2] > 0   # a counter: the first job's time is kept
    assert reserved == sorted(reserved) and promised == sorted(promised)
    for first in (0, 3):   # while a job ran from one scrape to the next: 50% and 256 MiB of the time between
        elapsed = scrapes[first + 1][0] - scrapes[first][0]
        assert reserved[first + 1] - reserved[first] == pytest.approx(0.5 * elapsed, rel=0.1)
        assert promised[first + 1] - promised[first] == pytest.approx(256 * MiB * elapsed, rel=0.1)
    team = {"gpu": "0", "key": "team", "value": "vision"}
    last = scrapes[-1][1]
    # The jobs' label, from the ledger once their recorder has seen them on the GPU: part of the time.
    assert 0 < one(last, "fracgpu_label_reserved_gpu_seconds_total", **team).value <= reserved[-1]
    assert one(last, "fracgpu_label_device_seconds_total", **team).value > 0
    assert one(last, "fracgpu_label_memory_byte_seconds_total", **team).value > 0
    assert series(last, "fracgpu_label_reserved_gpu_seconds_total", key="team") == \
        series(last, "fracgpu_label_reserved_gpu_seconds_total", **team)   # one value seen, one series
