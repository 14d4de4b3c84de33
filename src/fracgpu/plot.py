"""``fracgpu report --plot``: each job's memory and compute share over time, from the ledger's samples."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from fracgpu.ledger import JobRecord
from fracgpu.snapshot import achieved_share

__all__ = ["draw", "save", "series"]


def series(samples: Sequence[tuple[float, int, float]]) -> tuple[list[float], list[float], list[float]]:
    """(times, memory in GiB, compute share) of a job's samples. The share at a sample is the
    device time used since the sample before, over the wall time between them."""
    times, memory, share = [], [], []
    previous = None
    for t, memory_bytes, device_seconds in samples:
        times.append(t)
        memory.append(memory_bytes / (1 << 30))
        since = achieved_share(previous[1], device_seconds, t - previous[0]) if previous else None
        share.append(since or 0.0)
        previous = (t, device_seconds)
    return times, memory, share


def draw(jobs: Sequence[JobRecord], samples: Mapping[int, Sequence[tuple[float, int, float]]]):
    """A figure of two panels sharing the time axis, memory above and compute share below:
    one line per job in each, labelled with the job's name."""
    import matplotlib

    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, (mem_ax, share_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), constrained_layout=True)
    for job in jobs:
        # From the job's start (nothing held, nothing used) through its samples.
        times, memory, share = series([(job.start, 0, 0.0), *samples.get(job.id, [])])
        when = [dt.datetime.fromtimestamp(t) for t in times]
        label = f"{job.job} ({job.partition})"
        mem_ax.step(when, memory, where="post", label=label)
        share_ax.step(when, share, where="pre", label=label)
    mem_ax.set_ylabel("GPU memory (GiB)")
    mem_ax.set_title(f"fracgpu jobs ({len(jobs)})")
    share_ax.set_ylabel("compute share (of the GPU)")
    share_ax.set_ylim(bottom=0)
    share_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(share_ax.xaxis.get_major_locator()))
    if jobs:
        mem_ax.legend(loc="upper left", fontsize="small")
    for ax in (mem_ax, share_ax):
        ax.grid(True, alpha=0.3)
    return fig


def save(fig, path: str, file_format: str = "png") -> None:
    """Write ``fig`` to ``path`` as ``file_format``: "png" (100 dpi), "svg" or "pdf"."""
    import matplotlib.pyplot as plt

    fig.savefig(path, format=file_format, dpi=100)
    plt.close(fig)
