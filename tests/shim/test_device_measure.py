"""The device is the measure: a partition's processes never hold more on the device than its quota, at
any moment, whatever the books say. A watch polls the device's own per-process figures (the simulated
driver's accounting, through NVML) every 200 us while the jobs run; the books are not asked.

Memory goes back to a partition only when the device has let go of it (after the driver's teardown,
when the process is gone), and a context is charged before it is made."""

from __future__ import annotations

import pytest

from tests.support.device_watch import DeviceWatch, device_uuid
from tests.support.simgpu import GiB, MiB

QUOTA = 256 * MiB
ROUNDS = 4


def launcher(client, count: int, *argv) -> list[str]:
    """A shell that starts ``count`` copies of ``client argv`` at once and waits for them all."""
    words = " ".join(str(a) for a in argv)
    return ["sh", "-c", f'for i in $(seq {count}); do "$0" {words} & done; wait', str(client)]


def over_quota(figures: dict) -> str:
    return (f"the device held {figures['peak'] / MiB:.1f} MiB for the partition's processes, "
            f"{figures['excess'] / MiB:.1f} MiB over its {QUOTA // MiB} MiB quota, for {figures['excess_s'] * 1e3:.1f} ms "
            f"({figures['over_samples']} of {figures['samples']} samples; longest gap between samples "
            f"{figures['max_gap_s'] * 1e3:.1f} ms)")


def watched_rounds(make_gpu, argv: list[str]) -> list[int]:
    """Runs ``argv`` as one job in a 256 MiB partition, ROUNDS times on a 1 GiB simulated GPU with 1 MiB
    contexts, each round under a device watch that must never see the job hold more than the quota. Returns
    the peak each round saw (a loaded machine can leave the watch unscheduled through a whole round: such a
    round measures nothing)."""
    gpu = make_gpu(memory=GiB, context_memory=MiB)
    uuid = device_uuid(gpu.env)
    peaks = []
    for _ in range(ROUNDS):
        with DeviceWatch(gpu.env, uuid, QUOTA) as watch:
            gpu.fracgpu("run", "--memory", "256MiB", "--", *argv, timeout=120)
            figures = watch.stop()
        assert figures["peak"] <= QUOTA, over_quota(figures)
        peaks.append(figures["peak"])
    return peaks


@pytest.mark.fault("Processes of a partition exit without freeing while their neighbours allocate",
                   "the device never holds more than the quota for the partition (polled every 200 us): a "
                   "process's memory goes back to its partition only once the process is gone")
@pytest.mark.parametrize("count", [8, 32])
def test_processes_exiting_without_freeing_never_leave_more_than_the_quota_on_the_device(make_gpu, clients, count):
    peaks = watched_rounds(make_gpu, launcher(clients.lcuda, count, "alloc-until-oom", 1))
    assert max(peaks) >= QUOTA // 2, peaks   # the watch saw the partition fill


# Jobs of the C client (``$0``) that press on the quota in each way the device can hold memory the books
# might have given back: each line is a shell script run as one job in the 256 MiB partition.
PRESSURE = {
    "SIGKILL": 'for i in $(seq 8); do "$0" alloc-until-oom 1 0 30 & p="$p $!"; done; sleep 0.5; '
               'for i in $(seq 8); do "$0" alloc-until-oom 1 & done; kill -9 $p; wait',
    "context creation races": 'for i in $(seq 4); do "$0" alloc-until-oom 1 0 1 & done; sleep 0.3; '
                              'for i in $(seq 24); do "$0" info >/dev/null 2>&1 & done; wait',
    "VMM released while mapped": 'for i in $(seq 8); do "$0" vmm-map-release 1 & done; wait',
    "pools keeping freed memory": 'for i in $(seq 8); do "$0" pool-keep 32 1024 0.05 & done; wait',
    "graph memory": 'for i in $(seq 8); do "$0" graph-mem 32 0.05 & done; wait',
}


@pytest.mark.fault("SIGKILL, context creation races, VMM, pools and graph memory, 8 to 28 processes in one "
                   "partition at once",
                   "the device never holds more than the quota for the partition (polled every 200 us)")
@pytest.mark.parametrize("pressure", list(PRESSURE))
def test_no_way_of_holding_memory_leaves_more_than_the_quota_on_the_device(make_gpu, clients, pressure):
    peaks = watched_rounds(make_gpu, ["sh", "-c", PRESSURE[pressure], str(clients.lcuda)])
    assert max(peaks) > 0, peaks   # the watch saw the job
