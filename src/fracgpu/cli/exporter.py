"""``fracgpu exporter``: serve ``fracgpu.metrics`` (Prometheus metrics of every partition and process)."""

from __future__ import annotations

import errno
import signal
import sys
import threading

import click

from fracgpu import state
from fracgpu.cli.common import InputError, refusals
from fracgpu.metrics import UsageCollector, gpu_indexes


@click.command("exporter")
@click.option("--port", type=click.IntRange(1, 65535), default=9400, show_default=True,
              help="TCP port to serve /metrics on.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
def exporter(port: int, address: str) -> None:
    """Serve Prometheus metrics of every partition and process at http://ADDRESS:PORT/metrics.

    Memory used, limit and peak in bytes, compute share configured, device seconds, launches
    and refused allocations per partition (labels gpu=UUID, partition), memory and device seconds
    per process (plus pid), and DCGM_FI_DEV_FB_USED/FREE for existing dashboards. Runs until
    Ctrl-C or SIGTERM."""
    from prometheus_client import CollectorRegistry, start_http_server

    with refusals():
        state_dir = state.resolve_state_dir()
        state.usage(state_dir)   # an unsafe or damaged state is refused before serving
    registry = CollectorRegistry(auto_describe=False)
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {address} is in use; choose another with --port") from None
        raise InputError(f"cannot listen on {address} port {port}: {e.strerror or e}; check --address and "
                         "--port") from None
    # Listen first, so a port in use is refused at once; the device probe may take a while.
    registry.register(UsageCollector(state_dir, gpu_indexes()))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    shown = f"[{address}]" if ":" in address else address
    click.echo(f"fracgpu exporter: serving http://{shown}:{port}/metrics (state folder {state_dir}); "
               "Ctrl-C stops")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
