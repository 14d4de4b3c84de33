"""``fracgpu exporter``: serve ``fracgpu.metrics``, the Prometheus metrics of fracgpu's partitions."""

from __future__ import annotations

import errno
import signal
import sys
import threading

import click

from fracgpu import log, metrics, state
from fracgpu.cli.common import InputError, log_format_option, refusals

# Not 9400 (dcgm-exporter), 9835 (nvidia_gpu_exporter) or 9100 (node_exporter), which share GPU nodes with it;
# the Prometheus allocation list's 9100-9999 is all taken, so this is past it, clear of Zabbix (10050/10051)
# and the kubelet and kube-proxy (10249-10259).
DEFAULT_PORT = 10061


@click.command("exporter")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port to serve /metrics on.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--per-process", is_flag=True,
              help="Also serve fracgpu_process_* series, labelled by pid (a new series for every process).")
@click.option("--dcgm", is_flag=True,
              help="Also serve dcgm-exporter's DCGM_FI_DEV_FB_USED/FREE, from fracgpu's books (not where "
                   "dcgm-exporter runs: both would report them).")
@click.option("--per-job", is_flag=True,
              help="Serve each private partition (fracgpu run --memory) as a series of its own, by its run-PID name "
                   "(a new series for every run), instead of one partition=\"(private)\" series per GPU.")
@click.option("--label-key", "label_keys", metavar="KEY", multiple=True,
              help="Also serve reserved and used counters per value of this job label (repeatable), from the "
                   "running jobs in the ledger: fracgpu_label_*{key=KEY,value=...}.")
@log_format_option()
def exporter(port: int, address: str, per_process: bool, dcgm: bool, per_job: bool,
             label_keys: tuple[str, ...]) -> None:
    """Serve Prometheus metrics of every partition at http://ADDRESS:PORT/metrics.

    Memory used, limit and peak in bytes, compute share configured and achieved, device seconds,
    launches and refused allocations per partition (labels gpu = the GPU's index as nvidia-smi
    and dcgm-exporter number it, UUID, partition; every private partition of a GPU together as
    partition="(private)" unless --per-job), reserved and used counters per partition (and per
    label value with --label-key); with --per-process the same per process (plus pid); with
    --dcgm DCGM_FI_DEV_FB_USED/FREE for dashboards made for dcgm-exporter. Runs until Ctrl-C or
    SIGTERM."""
    with refusals():
        state_dir = state.resolve_state_dir()
        state.usage(state_dir)   # an unsafe or damaged state is refused before serving
    stop_serving = serve_metrics(state_dir, port, address, per_process=per_process, dcgm=dcgm, per_job=per_job,
                                 label_keys=label_keys)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.emit("exporter", "serving", f"serving {metrics_url(address, port)} (state folder {state_dir}); Ctrl-C stops",
             figures={"port": port}, stream=sys.stdout)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    stop_serving()


def metrics_url(address: str, port: int) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"http://{shown}:{port}/metrics"


def serve_metrics(state_dir: str, port: int, address: str, *, per_process: bool = False, dcgm: bool = False,
                  per_job: bool = False, label_keys: tuple[str, ...] = ()):
    """``metrics.serve``, its OSError as a refusal that says what to do."""
    try:
        return metrics.serve(state_dir, port, address, per_process=per_process, dcgm=dcgm, per_job=per_job,
                             label_keys=label_keys)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {address} is in use; choose another with --port") from None
        raise InputError(f"cannot listen on {address} port {port}: {e.strerror or e}; check --address and "
                         "--port") from None
