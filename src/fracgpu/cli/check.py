"""``fracgpu check``: grade this node's guarantees on its GPU with probe jobs; the checks are ``fracgpu.exercise.check``."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator

import click

from fracgpu.cli.common import InputError, device_option, refusals, tables
from fracgpu.cli.common import console as make_console


def known_checks(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from fracgpu.exercise import check as library

    names = [c.name for c in library.CHECKS]
    for name in value:
        if name not in names:
            raise click.BadParameter(f"there is no check {name!r}; the checks are: {', '.join(names)}", ctx, param)
    return value


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@device_option("The GPU to check, numbered as CUDA_VISIBLE_DEVICES makes them.", default=0, show_default=True)
@click.option("--gpu", type=click.Choice(["auto", "sim", "real"]), default="auto", show_default=True,
              help="What to check: auto (the simulated GPU when the environment selects it, else the real GPU; "
                   "none usable: exit 2 with what is wrong), sim (the simulated GPU; one of its own unless the "
                   "environment selects one), or real.")
@click.option("--check", "selected", metavar="NAME", multiple=True, callback=known_checks,
              help="Run only this check (repeatable; quote names with spaces: --check 'alloc paths'). "
                   "[default: all]")
def check(as_json: bool, device_index: int, gpu: str, selected: tuple[str, ...]) -> None:
    """Grade this node's guarantees on its GPU: run probe jobs under the shim and check what they got.

    Every allocation path held to a quota, the context counted in it, partitions
    isolated, no overcommitted promise, compute shares and caps kept, device time
    accounted, and what the shim adds to a launch. The probes run in a private
    state folder and ledger (the node's partitions and ledger are untouched), and
    everything they start is stopped and removed at the end, Ctrl-C included.
    Exits 0 when every check holds, 1 when one does not, 2 when the GPU cannot be
    checked (no such device, no GPU).

    \b
      fracgpu check
      fracgpu check --json --device 1
    """
    from fracgpu.exercise import check as library
    from fracgpu import devices

    # A SIGTERM ends the check as Ctrl-C does: the probes are stopped and the private state removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # The checks ask the driver from several threads at once: one status line for the whole check
    # rather than a spinner per device probe (a terminal shows one live display at a time).
    devices.probe_progress = contextlib.nullcontext
    with refusals(), checking():
        try:
            report = library.run(device_index, gpu, selected=list(selected) or None)
        except library.ProbeFailed as e:
            raise InputError(f"the GPU cannot be checked: {e}") from None
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        show(report)
    sys.exit(0 if report.ok else 1)


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """While the probes run: a status line on stderr when it is a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        yield
        return
    with make_console(stderr=True).status("fracgpu check: running probe jobs on the GPU..."):
        yield


def show(report) -> None:
    from rich.markup import escape

    from fracgpu.units import format_size

    console = make_console()
    d = report.device
    kind = "simulated" if d.simulated else "GPU"
    console.print(f"GPU {d.index}: {escape(d.name)} ({kind}, {format_size(d.total_memory)}), {d.uuid}", highlight=False)
    console.print(f"A context reserves {format_size(d.context_reserve)} (measured with {d.context_measured_by}); "
                  f"probe jobs get {format_size(report.probe_quota)} each.",
                  highlight=False)
    if d.note:
        console.print(f"note: {d.note}", highlight=False)
    rows = [(c.name, c.measured, c.expected, "ok" if c.ok else "FAILED") for c in report.checks]
    columns = [("check", "left"), ("measured", "right"), ("expected", "left"), ("verdict", "left")]
    for table in tables(columns, rows, console.width, styles=[None if c.ok else "red" for c in report.checks]):
        console.print(table)
    for c in report.checks:
        if not c.ok and c.detail:
            console.print(f"[red]{escape(c.name)}[/red]: {escape(c.detail)}", highlight=False)
    failed = [c.name for c in report.checks if not c.ok]
    summary = f"{len(report.checks) - len(failed)}/{len(report.checks)} checks hold"
    summary += f"; failed: {', '.join(failed)}" if failed else ""
    console.print(escape(f"{summary} ({report.seconds:.1f} s)"), highlight=False)
