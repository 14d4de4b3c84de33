"""``fracgpu device-plugin``: the kubelet device plugin of GPU slices (``fracgpu.kube.device_plugin``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from fracgpu import cdi, devices, kube
from fracgpu.cli.common import converted_by, needs_kubernetes_extra, refusals


def _library():
    """``fracgpu.kube.device_plugin``; InputError saying what to install when the extra is missing."""
    needs_kubernetes_extra("device-plugin")
    from fracgpu.kube import device_plugin
    return device_plugin


def _slices(value: object) -> int:
    return _library().check_slices(value)


@click.command("device-plugin")
@click.option("--node-name", envvar="NODE_NAME", show_envvar=True, metavar="NAME",
              help="This node's name, for the log (the kubelet knows its plugins by their socket).")
@click.option("--device-plugin-path", default="/var/lib/kubelet/device-plugins", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="The kubelet's device plugin folder: where its kubelet.sock is, and where this plugin's socket "
                   "goes.")
@click.option("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock", show_default=True,
              metavar="PATH", type=click.Path(dir_okay=False),
              help="The kubelet's pod resources API: before a partition of slices the kubelet gave to another "
                   "container is replaced, it is asked whether a pod still holds them (not asked when absent).")
@click.option("--slices", type=click.INT, default=4, show_default=True, metavar="N",
              callback=converted_by(_slices),
              help=f"Slices per GPU (1 to 64): a container given k of them gets k/N of the GPU's memory and a k/N "
                   f"compute share, as one partition. Each is one {kube.SLICE_RESOURCE}.")
@click.option("--cdi-root", default=cdi.SPEC_DIR, show_default=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Where to write the CDI spec of the slice partitions (one file, kind "
                   f"{kube.SLICES_CDI_KIND}); the container runtime must read specs there.")
@click.option("--cdi-config-dir", default=cdi.CONFIG_DIR, show_default=True, metavar="DIR",
              help="Where to write the files the spec mounts (each partition's node configuration, the "
                   "ld.so.preload); not inside the state folder, which containers can write.")
@click.option("--health-interval", type=click.FloatRange(0.1, 300.0), default=5.0, show_default=True,
              metavar="SECONDS", help="Seconds between two looks at the GPUs' health (driver and state).")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write this file once registered with the kubelet (pid, socket); removed at exit.")
def device_plugin_command(node_name: str | None, device_plugin_path: str, pod_resources_socket: str, slices: int,
                          cdi_root: str, cdi_config_dir: str, health_interval: float, ready_file: str | None) -> None:
    """Run the kubelet device plugin of fracgpu.dev/gpu-slice, for clusters without DRA.

    Each GPU of the node is N equal slices. A pod asks for
    `fracgpu.dev/gpu-slice: 2` in its resources' limits; the kubelet gives its
    container 2 slices of one GPU, and the container runs in a partition of
    2/N of that GPU's memory with a 2/N compute share, injected through CDI.
    Registers with the kubelet (again after a kubelet restart) and runs until
    SIGTERM or Ctrl-C. Partitions whose pods are gone are removed by `fracgpu
    node`."""
    logging.basicConfig(level=logging.INFO, format="fracgpu device-plugin: %(message)s", stream=sys.stderr)
    device_plugin = _library()

    with refusals():
        gpus = [device_plugin.GPU.of(d) for d in devices.probe()]
        layout = cdi.Layout.for_node(config_dir=cdi_config_dir)   # refused before starting: no driver to mount
        plugin = device_plugin.SlicePlugin(gpus, slices, layout, cdi_root, pod_resources=pod_resources_socket)
        # The slice partitions already made keep their CDI devices: a container of a running pod that
        # restarts gets the devices its first Allocate answered, without a new Allocate.
        plugin.write_spec()
        os.makedirs(device_plugin_path, exist_ok=True)
    service = device_plugin.DevicePlugin(plugin, device_plugin_path, health_interval=health_interval,
                                         ready_file=ready_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    logging.info("started (pid %d)%s: %d GPU(s) as %d slices each of %s, socket %s", os.getpid(),
                 f" on node {node_name}" if node_name else "", len(gpus), slices, kube.SLICE_RESOURCE,
                 service.socket)
    try:
        service.run(stop)
    finally:
        logging.info("stopped")
