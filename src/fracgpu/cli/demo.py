"""``fracgpu demo``: three jobs sharing one GPU under quotas and shares, then the live view and the report.

The jobs and what they check are ``fracgpu.exercise.demo``; this command shows them.
"""

from __future__ import annotations

import os
import tempfile

import click

from fracgpu import sim
from fracgpu.exercise import demo as library
from fracgpu.cli import report, top
from fracgpu.cli.common import console as make_console
from fracgpu.cli.common import fit
from fracgpu.units import format_size


# (header, justify, rank): at a narrow width the highest rank goes first (``common.fit``).
RESULT_COLUMNS = [("job", "left", 0), ("fracgpu run", "left", 3), ("GPU memory seen", "right", 0), ("asked", "right", 0),
                  ("got", "right", 0), ("GPU share", "right", 0), ("verified", "right", 2),
                  ("request p50 / p99", "right", 1)]
OWN_JOB = "fracgpu run --memory 4GiB --compute 25% -- python train.py"


def next_steps(on_real_gpu: bool) -> str:
    """The hint after the demo, true on this machine: where jobs would find no GPU, select the simulated one
    first (a shell that has done so already is told as it is)."""
    if on_real_gpu or sim.selected(os.environ):
        return f"Your own jobs: `{OWN_JOB}`, then `fracgpu top` and `fracgpu report`."
    return ("Your own jobs: jobs started here find no GPU, so select the simulated one in your shell first:\n"
            '  eval "$(fracgpu sim env)"\n'
            f"  {OWN_JOB}\n"
            "then `fracgpu top` and `fracgpu report` (the README's First steps has example jobs in examples/).")


@click.command("demo")
@click.option("--gpu", type=click.Choice(["auto", "sim", "real"]), default="auto", show_default=True,
              help="Where to run: the real GPU if one works and fracgpu's kernels are installed (auto; "
                   "else the simulated one, with a note why), always the simulated one, or the real one.")
def demo(gpu: str) -> None:
    """Three jobs sharing one GPU: their quotas and shares, the live view, the report."""
    console = make_console()   # wide enough for the tables when not on a terminal
    real_here = library.real_gpu_available()
    use_real = gpu == "real" or (gpu == "auto" and real_here)
    if gpu == "real" and not real_here:
        raise click.ClickException("no working NVIDIA GPU driver was found; run `fracgpu demo --gpu sim`")
    missing = library.without_kernels() if use_real else None
    if missing and gpu == "real":
        raise click.ClickException(missing)
    if missing:   # a working GPU, but a fracgpu built without nvcc: show the demo rather than fail
        click.echo(f"note: not running on the real GPU: {missing}", err=True)
        use_real = False

    def while_busy(view, state_dir: str) -> None:
        console.print("\n[bold]fracgpu top[/bold] while they run:")
        screen = make_console()
        screen.print(top.render(view, state_dir, screen.width))

    try:
        with tempfile.TemporaryDirectory(prefix="fracgpu-demo-") as folder:
            outcome = library.run(folder, use_real, console.print, while_busy)
    except library.DemoError as e:
        raise click.ClickException(str(e)) from None
    results = outcome.results
    rows = []
    for job, r in zip(library.JOBS, results):
        asked = format_size(job.want_mib * library.MiB) + (f" (refused, {r['refusals']}x halved)" if r["refusals"]
                                                           else "")
        latency = f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms" if "p99_ms" in r else "-"
        rows.append([r["name"], " ".join(job.options()), format_size(r["total"]), asked, format_size(r["allocated"]),
                     f"{100 * r['device_s'] / r['wall_s']:.0f}%", "yes" if r["verified"] else "NO", latency])
    console.print(f"\n[bold]Three jobs sharing one GPU ({results[0]['device']})[/bold]", highlight=False)
    console.print(fit(RESULT_COLUMNS, rows, console.width))
    console.print("Each job saw its quota as the GPU's memory; 'batch' asked for more, got "
                  "CUDA_ERROR_OUT_OF_MEMORY and went on with a smaller batch; 'infer' served a request every "
                  f"{library.REQUEST_PERIOD_MS:.0f} ms at high priority, each waiting at most for the training "
                  "kernel already running; the GPU's time it left was split between 'train' and 'batch' by "
                  "their shares.")
    console.print("\n[bold]fracgpu report[/bold] (from the ledger):")
    screen = make_console()
    for part in report.job_tables(outcome.recorded, None, screen.width):
        screen.print(part)
    console.print(next_steps(real_here), highlight=False)
    try:
        library.check(outcome)
    except library.DemoError as e:
        raise click.ClickException(str(e)) from None
