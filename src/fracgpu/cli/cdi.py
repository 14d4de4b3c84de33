"""``fracgpu cdi``: the CDI spec of this node's partitions, as ``nvidia-ctk cdi`` does for GPUs.

What the spec gives a container is ``fracgpu.cdi``.
"""

from __future__ import annotations

import click

from fracgpu import cdi
from fracgpu.cli.common import refusals


@click.group("cdi")
def cdi_group() -> None:
    """CDI devices for partitions: `podman run --device fracgpu.dev/partition=NAME`."""


@cdi_group.command("generate")
@click.option("--output", metavar="PATH", help=f"Where to write the spec. [default: {cdi.default_spec_path()}]")
@click.option("--config-dir", metavar="DIR", default=cdi.CONFIG_DIR, show_default=True,
              help="Where to write the files the spec mounts (each partition's node configuration, the "
                   "ld.so.preload); not inside the state folder, which containers can write.")
@click.option("--kind", default=cdi.KIND, show_default=True, metavar="VENDOR/CLASS", help="The CDI kind.")
def generate(output: str | None, config_dir: str, kind: str) -> None:
    """Write the CDI spec of this node's partitions (each one device), atomically.

    Run it again whenever partitions are created or removed (`fracgpu node`
    does it by itself). Private partitions of single jobs are not devices.
    """
    with refusals():
        partitions = cdi.partition_names()
        spec = cdi.write_spec(cdi.Layout.for_node(config_dir=config_dir), partitions, output, kind)
    path = output or cdi.default_spec_path(kind)
    names = [d["name"] for d in spec["devices"]]
    left_out = sorted(set(partitions) - set(names))
    click.echo(f"Wrote {path} (cdiVersion {spec['cdiVersion']}): {len(names)} device(s) of kind {kind}", err=True)
    if left_out:
        click.echo(f"Left out (CDI names start and end with a letter or digit): {', '.join(left_out)}", err=True)


@cdi_group.command("list")
@click.option("--kind", default=cdi.KIND, show_default=True, metavar="VENDOR/CLASS", help="The CDI kind.")
def list_devices(kind: str) -> None:
    """Print the fully qualified CDI device names of this node's partitions, one per line."""
    with refusals():
        names = cdi.qualified_names(cdi.partition_names(), kind)
    for name in names:
        click.echo(name)
