"""``fracgpu gpus``: the GPUs jobs started here see, by the index they would pass, and what each has promised."""

from __future__ import annotations

import json

import click

from fracgpu import devices, state
from fracgpu.cli.common import console, fit, refusals
from fracgpu.units import format_size

# (header, justify, rank): at a narrow width the highest rank goes first (``common.fit``).
COLUMNS = [("index", "right", 0), ("name", "left", 0), ("UUID", "left", 2), ("memory", "right", 0),
           ("promised", "right", 0), ("partitions", "right", 3), ("processes", "right", 3)]


@click.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print the GPUs as JSON (bytes).")
def gpus(as_json: bool) -> None:
    """The GPUs jobs started from here see: the index to pass (--device N; numbered as CUDA numbers
    them, CUDA_VISIBLE_DEVICES included), name, UUID, memory, and how much of it the GPU's
    partitions are promised."""
    with refusals():
        numbering = devices.numbering()
        usage = {g.uuid: g for g in state.usage()}
    rows = []
    for d in numbering.visible:
        g = usage.get(d.uuid)
        rows.append({"index": d.index, "name": d.name, "uuid": d.uuid, "total_memory": d.total_memory,
                     "promised": g.promised if g else 0, "partitions": len(g.partitions) if g else 0,
                     "processes": len(g.processes) if g else 0})
    if as_json:
        click.echo(json.dumps({"cuda_visible_devices": numbering.mask, "gpus": rows}, indent=2))
        return
    screen = console()
    if numbering.note():
        screen.print(numbering.note(), highlight=False)
    screen.print(fit(COLUMNS, [[str(r["index"]), r["name"], r["uuid"], format_size(r["total_memory"]),
                                format_size(r["promised"]), str(r["partitions"]), str(r["processes"])]
                               for r in rows], screen.width))
