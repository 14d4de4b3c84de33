"""A watch on the device's own figures, for tests of a memory guarantee: what the device itself
(the simulated driver's accounting, or a real GPU's, both through NVML's per-process list) reports
the processes of a job hold, polled every 200 us by a probe process of its own
(``fracgpu.exercise.probes``' ``watch``), whatever fracgpu's books say."""

from __future__ import annotations

import json
import subprocess
import sys

from fracgpu import devices
from fracgpu.exercise import probes

PERIOD_US = 200


class DeviceWatch:
    """Started before the job, stopped after it: ``stop()`` returns the probe's figures (``peak``,
    ``excess``, ``excess_s``, ``over_samples``, ``samples``, ``max_gap_s``). ``root``: the job's first
    process, whose descendants are the job (None: every process the device lists)."""

    def __init__(self, env: dict, uuid: str, limit: int, root: int | None = None, period_us: float = PERIOD_US):
        arguments = {"device": 0, "uuid": uuid, "limit": limit, "root": root, "period_us": period_us}
        self.process = subprocess.Popen([sys.executable, "-m", probes.__name__, "watch", json.dumps(arguments)],
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            out, err = self.process.communicate(timeout=10)
            raise AssertionError(f"the device watch did not start: {line}{out}{err}")

    def stop(self) -> dict:
        out, err = self.process.communicate("stop\n", timeout=30)
        if self.process.returncode != 0:
            raise AssertionError(f"the device watch failed ({self.process.returncode}): {err}")
        return json.loads(out.strip().splitlines()[-1])

    def __enter__(self) -> DeviceWatch:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def device_uuid(env: dict) -> str:
    """The UUID of device 0 as jobs started with ``env`` see it (the name NVML knows it by)."""
    return devices.probe(env)[0].uuid
