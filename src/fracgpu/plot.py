"""``fracgpu report --plot``: each job's memory and compute share over time with its limits behind,
and per GPU its capacity, reserved and used, from the ledger's samples and periods."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from fracgpu.ledger import JobRecord, Period
from fracgpu.snapshot import achieved_share

__all__ = ["draw", "save", "series", "limit_steps", "gpu_series"]

GiB = 1 << 30


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


def limit_steps(periods: Sequence[Period]) -> tuple[list[float], list[float], list[float]]:
    """(times, memory limit in GiB, compute share) as steps over ``periods`` (one job's on one GPU,
    in time order): each period's limits from its start, none after the last one ends."""
    times, memory, share = [], [], []
    for period in periods:
        times.append(period.start)
        memory.append((period.limits.memory_limit or 0) / GiB)
        share.append(period.limits.compute_share or 0.0)
    if periods:
        times.append(periods[-1].recorded_until)
        memory.append(0.0)
        share.append(0.0)
    return times, memory, share


def _share_from(times: Sequence[float], shares: Sequence[float], t: float) -> float:
    """The share a job's samples say it used from ``t`` on: the next sample's (a sample's share
    is over the interval up to it), 0 before its first sample and after its last."""
    if not times or t < times[0]:
        return 0.0
    for when, share in zip(times, shares):
        if when > t:
            return share
    return 0.0


def gpu_series(gpu: str, jobs: Sequence[JobRecord], samples: Mapping[int, Sequence[tuple[float, int, float]]],
               periods: Sequence[Period]) -> tuple[list[float], list[float], list[float]]:
    """(times, reserved share, used share) of GPU ``gpu``: reserved is the sum of the shares its
    partitions guaranteed (one partition counted once), used the sum of its jobs' achieved
    shares (a job on several GPUs counted here by its periods' device time on this one)."""
    on_gpu = [p for p in periods if p.gpu == gpu]
    partition = {job.id: job.partition for job in jobs}
    device = {}
    for p in periods:
        device.setdefault(p.job_id, {}).setdefault(p.gpu, 0.0)
        device[p.job_id][p.gpu] += p.gpu_seconds
    job_ids = sorted({p.job_id for p in on_gpu})
    used_steps = {}
    for job_id in job_ids:
        total = sum(device[job_id].values())
        weight = device[job_id][gpu] / total if total > 0 else 1.0 / len(device[job_id])
        times, _, share = series(samples.get(job_id, []))
        used_steps[job_id] = (times, [s * weight for s in share])
    grid = sorted({t for p in on_gpu for t in (p.start, p.recorded_until)} |
                  {t for times, _ in used_steps.values() for t in times})
    reserved, used = [], []
    for t in grid:
        held: dict[str, float] = {}
        for p in on_gpu:
            if p.start <= t < p.recorded_until:
                name = partition.get(p.job_id, "")
                held[name] = max(held.get(name, 0.0), p.limits.compute_share or 0.0)
        reserved.append(sum(held.values()))
        used.append(sum(_share_from(times, share, t) for times, share in used_steps.values()))
    return grid, reserved, used


def draw(jobs: Sequence[JobRecord], samples: Mapping[int, Sequence[tuple[float, int, float]]],
         periods: Sequence[Period] = (), gpus: Mapping[str, tuple[str, int]] | None = None):
    """A figure of panels sharing the time axis: memory, then compute share, one line per job in
    each (labelled with its name), its limits over its periods drawn faintly behind in the same
    colour; then one panel per GPU of its capacity (the whole GPU), the shares reserved on it and
    the share used. The legends sit outside the data, right of the panels."""
    import matplotlib

    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    gpu_ids = sorted({p.gpu for p in periods if p.gpu})   # "": recorded without a GPU, so no capacity
    height = 6 + 2.5 * len(gpu_ids)
    fig, axes = plt.subplots(2 + len(gpu_ids), 1, sharex=True, figsize=(10, height), constrained_layout=True,
                             height_ratios=[2.5, 2.5] + [2] * len(gpu_ids))
    mem_ax, share_ax = axes[0], axes[1]
    by_job: dict[int, list[Period]] = {}
    for period in periods:
        by_job.setdefault(period.job_id, []).append(period)

    def when(times):
        return [dt.datetime.fromtimestamp(t) for t in times]

    for job in jobs:
        # From the job's start (nothing held, nothing used) through its samples.
        times, memory, share = series([(job.start, 0, 0.0), *samples.get(job.id, [])])
        label = f"{job.job} ({job.partition})"
        line, = mem_ax.step(when(times), memory, where="post", label=label, zorder=3)
        share_ax.step(when(times), share, where="pre", label=label, zorder=3)
        for gpu in sorted({p.gpu for p in by_job.get(job.id, [])}):
            steps, limit, reserved = limit_steps([p for p in by_job[job.id] if p.gpu == gpu])
            for ax, values in ((mem_ax, limit), (share_ax, reserved)):
                if any(values):
                    ax.fill_between(when(steps), values, step="post", color=line.get_color(), alpha=0.12,
                                    linewidth=0, zorder=1)
                    ax.step(when(steps), values, where="post", color=line.get_color(), linestyle="--",
                            linewidth=0.8, alpha=0.7, zorder=2)
    mem_ax.set_ylabel("GPU memory (GiB)")
    mem_ax.set_title(f"fracgpu jobs ({len(jobs)}): use, limits (dashed, shaded) behind")
    share_ax.set_ylabel("compute share (of the GPU)")
    share_ax.set_ylim(bottom=0)
    if jobs:
        mem_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    for ax, gpu in zip(axes[2:], gpu_ids):
        grid, reserved, used = gpu_series(gpu, jobs, samples, periods)
        ax.axhline(1.0, color="black", linewidth=1, label="capacity")
        ax.fill_between(when(grid), reserved, step="post", color="tab:blue", alpha=0.25, linewidth=0,
                        label="reserved (shares)")
        ax.step(when(grid), used, where="post", color="tab:red", label="used")
        name = (gpus or {}).get(gpu, ("",))[0]
        ax.set_title(f"{gpu} {name}".strip(), fontsize="medium")
        ax.set_ylabel("of the GPU")
        ax.set_ylim(0, max(1.05, max(reserved + used, default=0) * 1.05))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(axes[-1].xaxis.get_major_locator()))
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig


def save(fig, path: str, file_format: str = "png") -> None:
    """Write ``fig`` to ``path`` as ``file_format``: "png" (100 dpi), "svg" or "pdf"."""
    import matplotlib.pyplot as plt

    fig.savefig(path, format=file_format, dpi=100)
    plt.close(fig)
