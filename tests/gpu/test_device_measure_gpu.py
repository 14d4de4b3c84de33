"""The device is the measure, on a real GPU: processes of one partition that fill it and exit without
freeing never hold more than its quota on the device, as NVML's per-process list shows it, polled every
200 us (the watch of tests/support). How long an excess lasted is how long the driver's teardown kept
memory that the books had given back."""

from __future__ import annotations

import os
import sys

from tests.shim.test_device_measure import launcher
from tests.support.device_watch import DeviceWatch, device_uuid
from tests.support.simgpu import GiB, MiB

QUOTA = 8 * GiB   # room for 8 real contexts (300-600 MiB each) and the blocks between them


def test_processes_exiting_without_freeing_never_leave_more_than_the_quota_on_the_gpu(real, clients):
    uuid = device_uuid(real.env)
    peaks = []
    for _ in range(3):
        # The job is every process this test starts: the watch follows this process's descendants.
        with DeviceWatch(real.env, uuid, QUOTA, root=os.getpid()) as watch:
            real.run([sys.executable, "-m", "fracgpu", "run", "--memory", "8GiB", "--",
                      *launcher(clients.dlopen, 8, "alloc-until-oom", 16)])
            figures = watch.stop()
        assert figures["peak"] <= QUOTA, (
            f"the GPU held {figures['peak'] / MiB:.0f} MiB for the partition's processes, "
            f"{figures['excess'] / MiB:.0f} MiB over its quota, for {figures['excess_s'] * 1e3:.1f} ms")
        peaks.append(figures["peak"])
    assert max(peaks) >= QUOTA // 2, peaks   # the watch saw the partition fill
