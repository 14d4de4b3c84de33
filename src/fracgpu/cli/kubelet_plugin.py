"""``fracgpu kubelet-plugin``: the DRA kubelet plugin (``fracgpu.kube.dra``), run as a service on each node."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from fracgpu import cdi, files, state
from fracgpu.cli.common import InputError, needs_kubernetes_extra, refusals
from fracgpu.kube import dra   # grpc and kubernetes are imported where they are used


@click.command("kubelet-plugin")
@click.option("--node-name", envvar="NODE_NAME", show_envvar=True, required=True,
              help="This node's name in the cluster (the pod's spec.nodeName, given through the downward API).")
@click.option("--kubeconfig", envvar="KUBECONFIG", show_envvar=True,
              type=click.Path(exists=True, dir_okay=False, readable=True),
              help="The kubeconfig to reach the API server with; without it, the pod's in-cluster service account.")
@click.option("--kubelet-registrar-directory-path", "registrar_dir", metavar="DIR", show_default=True,
              default=dra.REGISTRAR_DIR,
              help="Where the kubelet looks for plugins' registration sockets.")
@click.option("--kubelet-plugins-directory-path", "plugins_dir", metavar="DIR", show_default=True,
              default=dra.PLUGINS_DIR,
              help="The kubelet's plugins folder: the DRA socket and the checkpoint go in gpu.fracgpu.dev/ under it.")
@click.option("--cdi-root", metavar="DIR", default=dra.CDI_ROOT, show_default=True,
              help="Where the claims' transient CDI specs are written (a folder the container runtime reads).")
@click.option("--cdi-config-dir", metavar="DIR", default=cdi.CONFIG_DIR, show_default=True,
              help="Where the files the specs mount are written (each claim partition's node configuration).")
@click.option("--publish-interval", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              metavar="SECONDS", help="How often the node's ResourceSlice is checked against its GPUs and updated.")
@click.option("--remove-slices", is_flag=True, help="Delete this node's ResourceSlices when the plugin stops.")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write this file (the pid) once both sockets serve; removed at exit.")
def kubelet_plugin(node_name: str, kubeconfig: str | None, registrar_dir: str, plugins_dir: str, cdi_root: str,
                   cdi_config_dir: str, publish_interval: float, remove_slices: bool, ready_file: str | None) -> None:
    """Run the DRA kubelet plugin of driver gpu.fracgpu.dev on this node.

    It publishes each GPU of the node as a ResourceSlice device with consumable memory and compute
    capacity, registers with the kubelet, and for each claim the kubelet prepares makes a partition
    per GPU with the memory and compute share the claim consumed (and the priority and cap of its
    config), and a CDI spec that puts the container in it. Runs until SIGTERM or Ctrl-C."""
    needs_kubernetes_extra("kubelet-plugin")
    from fracgpu.kube import resources

    if not node_name.strip():
        raise click.BadParameter("the node's name is empty: give --node-name or set NODE_NAME",
                                 param_hint="--node-name")
    logging.basicConfig(level=logging.INFO, format="fracgpu kubelet-plugin: %(message)s", stream=sys.stderr)
    with refusals():
        api = resources.api_client(kubeconfig)
        state_dir = state.resolve_state_dir()
        state.usage(state_dir)   # an unsafe or damaged state is refused before starting
        layout = cdi.Layout.for_node(config_dir=cdi_config_dir)
        driver = dra.Driver(api, node_name, plugins_dir, cdi_root, layout, state_dir=state_dir)
        driver.gpus()   # no GPU, or no driver, is refused as such, before the API server is asked
    try:
        driver.publish()
    except Exception as e:   # the API server's refusal or no connection: nothing is served without a slice
        raise InputError(f"cannot publish this node's ResourceSlice through the API server "
                         f"({kubeconfig or 'in-cluster'}): {e}") from None
    with refusals():
        plugin = dra.Plugin(driver, registrar_dir, plugins_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.info("serving %s (%s) for node %s; registration %s", plugin.dra_socket, ", ".join(dra.SERVICES),
                 node_name, plugin.registration_socket)
    if ready_file:
        files.write_atomically(ready_file, f"{os.getpid()}\n")
    try:
        while not stop.wait(publish_interval):
            try:
                driver.publish()
            except Exception as e:
                logging.error("cannot publish this node's ResourceSlice (retried in %gs): %s", publish_interval, e)
    finally:
        plugin.stop()
        if remove_slices:
            try:
                resources.unpublish(api, node_name)
            except Exception as e:
                logging.error("cannot delete this node's ResourceSlices: %s", e)
        if ready_file:
            files.remove(ready_file)
        logging.info("stopped; prepared claims stay prepared (checkpoint %s)", driver.checkpoint.path)
