"""``fracgpu node``: the node agent (``fracgpu.node``), run as a service."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading

import click

from fracgpu import cdi, node, state
from fracgpu.cli.common import refusals
from fracgpu.cli.exporter import DEFAULT_PORT, metrics_url, serve_metrics

POD_RESOURCES_EVERY_S = 1.0   # the kubelet's List at most this often (a partition goes after two answers)

UNIT = """\
[Unit]
Description=fracgpu node agent: records containers' GPU use, reconciles it with the device, reaps the dead
Documentation=https://github.com/fracgpu/fracgpu#the-node-agent
After=local-fs.target nvidia-persistenced.service

[Service]
Type=simple
ExecStart={executable} node --cdi --ready-file /run/fracgpu/node.ready{metrics}
Restart=always
RestartSec=1
RuntimeDirectory=fracgpu
RuntimeDirectoryPreserve=yes
# The agent reads every process's /proc/<pid>/ns/pid and status (root's, with ptrace read access) and
# signals a partition's processes only when `fracgpu partition rm --force` asks it to.
User=root

[Install]
WantedBy=multi-user.target
"""


@click.command("node")
@click.option("--interval", type=click.FloatRange(0.05, 5.0), default=0.2, show_default=True,
              help="Seconds between two looks at the device and the partitions (reaping takes at most one).")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write this file once the first look is done (pid, state folder, ledger); removed at exit.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help=f"Also serve the exporter's metrics on this port (as `fracgpu exporter`; {DEFAULT_PORT} is its "
                   "default).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, help="Address the metrics listen on.")
@click.option("--cdi", "keep_cdi", is_flag=True,
              help="Keep the CDI spec of the partitions current: written at start and whenever partitions come or go, "
                   "as `fracgpu cdi generate` writes it.")
@click.option("--cdi-output", metavar="PATH", help=f"Where --cdi writes the spec. [default: {cdi.default_spec_path()}]")
@click.option("--cdi-config-dir", metavar="DIR", default=cdi.CONFIG_DIR, show_default=True,
              help="Where --cdi writes the files the spec mounts.")
@click.option("--cdi-kind", default=cdi.KIND, show_default=True, metavar="VENDOR/CLASS", help="The CDI kind --cdi writes.")
@click.option("--pod-resources-socket", metavar="PATH",
              help="Ask the kubelet's pod resources API at this socket (Kubernetes; its usual place is "
                   "/var/lib/kubelet/pod-resources/kubelet.sock) which pod holds each partition: their jobs are "
                   "labelled namespace, pod, container (and claim), and a device plugin's slices partition no pod "
                   "holds any more is removed once no process uses it. Off unless given.")
@click.option("--pod-resources-grace", metavar="SECONDS", type=click.FloatRange(0, 3600), default=30.0,
              show_default=True,
              help="A slices partition is removed only after the kubelet's answers have named no pod holding it for "
                   "this long (and in two answers in a row): a kubelet that has just restarted lists its pods late.")
@click.option("--cdi-root", metavar="DIR", default=cdi.SPEC_DIR, show_default=True,
              help="Where the device plugin's CDI specs are: a slices partition removed for want of a pod loses its "
                   "device there (with --pod-resources-socket).")
@click.option("--print-systemd-unit", is_flag=True,
              help="Print a systemd unit that runs this agent (save it as /etc/systemd/system/fracgpu-node.service) "
                   "and exit.")
def node_command(interval: float, ready_file: str | None, metrics_port: int | None, metrics_address: str,
                 keep_cdi: bool, cdi_output: str | None, cdi_config_dir: str, cdi_kind: str,
                 pod_resources_socket: str | None, pod_resources_grace: float, cdi_root: str,
                 print_systemd_unit: bool) -> None:
    """Run the node agent: the trusted party for jobs no `fracgpu run` wraps (containers).

    In the host's pid namespace, as root, once per node. It records a ledger job for each
    container (or partition) whose processes no recorder holds, from its first process to its
    last; checks what the device holds for container processes against their books and charges
    the difference to their partition; and reaps dead processes, giving their memory back once the
    device has let go of it. Restarted, it resumes its open jobs. Runs until SIGTERM or Ctrl-C.

    On Kubernetes (the DaemonSet passes --pod-resources-socket) it also labels each job with the pod
    that holds its partition, as the kubelet's pod resources API says, and removes the device
    plugin's partitions no pod holds any more."""
    if print_systemd_unit:
        executable = shutil.which("fracgpu") or f"{sys.executable} -m fracgpu"
        click.echo(UNIT.format(executable=executable,
                               metrics=f" --metrics-port {metrics_port}" if metrics_port else ""), nl=False)
        return
    logging.basicConfig(level=logging.INFO, format="fracgpu node: %(message)s", stream=sys.stderr)
    with refusals():
        state_dir = state.resolve_state_dir()
        state.usage(state_dir)   # an unsafe or damaged state is refused before starting
        if state.pid_namespace() != state.INITIAL_PID_NAMESPACE:
            logging.warning("this process is not in the host's (initial) pid namespace: it sees only the processes "
                            "of its own namespace and those below it; run it on the host, or as a container with "
                            "--pid=host")
        layout = cdi.Layout.for_node(config_dir=cdi_config_dir) if keep_cdi else None
        if keep_cdi:
            cdi.check_kind(cdi_kind)   # refused before starting, not at the first write
        try:
            device = node.DeviceProcesses()
        except OSError as e:
            device = None
            logging.warning("the device's per-process figures cannot be read (%s): container processes' memory is "
                            "not checked against the device", e)
    stop_serving = serve_metrics(state_dir, metrics_port, metrics_address) if metrics_port else None
    if stop_serving:
        logging.info("serving %s", metrics_url(metrics_address, metrics_port))

    def write_cdi_spec() -> None:
        spec = cdi.write_spec(layout, cdi.partition_names(state_dir), cdi_output, cdi_kind)
        logging.info("CDI spec %s: %s", cdi_output or cdi.default_spec_path(cdi_kind),
                     ", ".join(cdi.qualified_names([d["name"] for d in spec["devices"]], cdi_kind)) or "no devices")

    pods = None
    if pod_resources_socket:
        try:
            from fracgpu.kube.podresources import PodWatch

            pods = PodWatch(pod_resources_socket, every=max(interval, POD_RESOURCES_EVERY_S),
                            grace=pod_resources_grace)
        except ImportError as e:
            raise click.UsageError(f"--pod-resources-socket needs the kubernetes extra ({e}): "
                                   "pip install 'fracgpu[kubernetes]'") from None
    agent = node.NodeAgent(state_dir=state_dir, device=device, interval=interval, ready_file=ready_file,
                           partitions_changed=write_cdi_spec if layout else None, pods=pods,
                           cdi_root=cdi_root if pods else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    logging.info("started (pid %d): state folder %s, ledger %s", os.getpid(), state_dir, agent.ledger.path)
    try:
        agent.run(stop)
    finally:
        if stop_serving:
            stop_serving()
        logging.info("stopped; its open jobs are resumed by the next start")
