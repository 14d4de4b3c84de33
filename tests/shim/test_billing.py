"""The bill, end to end: three jobs of known limits and kernel time on one simulated GPU, one of
them resized halfway, billed from the ledger by ``fracgpu report``.

Reserved figures are the limits times the time each was held, by the jobs' own clocks; used
GPU time is the kernels' known length. Both must come out per job and period within 1%, and the
exported lines must add up exactly to the totals the report prints. The jobs hold their limits
together, but run their kernels one after another: a kernel timed while another context's runs
on the device is timed with the wait (as on a time-sliced GPU), which is not its known length.
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal

from fracgpu.ledger import Ledger
from tests.cli.test_report import table_rows
from tests.support.simgpu import BINDINGS_PRELUDE, GiB, MiB

# A job: prints its clock before and after it attaches to the GPU, allocates MIB, then for each
# phase "N:MS:SECONDS", once a line comes on stdin, launches N spins of MS milliseconds paced over
# SECONDS and says "phase done"; after another line, prints its clock and exits at once.
JOB = "import os, time\nprint('before', time.time(), flush=True)\n" + BINDINGS_PRELUDE + r"""
print("attached", time.time(), flush=True)
module, mib, phases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
spin = ck(cu.cuModuleGetFunction(ck(cu.cuModuleLoad(module.encode())), b"fracgpu_spin"))
buf = ck(cu.cuMemAlloc(mib << 20))
stream = ck(cu.cuStreamCreate(0))
for phase in phases:
    sys.stdin.readline()
    n, ms, seconds = (float(x) for x in phase.split(":"))
    ns = np.array([int(ms * 1e6)], np.uint64)
    args = np.array([ns.ctypes.data], np.uint64)
    begin = time.monotonic()
    for i in range(int(n)):
        ck(cu.cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, stream, args.ctypes.data, 0))
        ck(cu.cuStreamSynchronize(stream))
        time.sleep(max(0.0, begin + (i + 1) * seconds / n - time.monotonic()))
    print("phase done", flush=True)
sys.stdin.readline()
ck(cu.cuMemFree(buf))
print("leaving", time.time(), flush=True)
os._exit(0)   # gone now: the interpreter's own teardown would hold the reservation past the clock printed
"""


def clock(process, word: str) -> float:
    line = process.stdout.readline()
    assert line.startswith(word), (line, process.stderr.read() if process.poll() is not None else "")
    return float(line.split()[1]) if line.split()[1:] else time.time()


def near(value, expected, within=0.01):
    return abs(float(value) - expected) <= within * expected


def test_the_bill_has_each_period_reserved_and_used_as_they_were(make_gpu, kernels, tmp_path):
    gpu = make_gpu(memory=2 * GiB)
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB", "--compute", "20%")

    def job(name, options, mib, *phases):
        process = gpu.popen(sys.executable, "-m", "fracgpu", "run", "--name", name, "--label", "team=" + name[0],
                            *options, "--", sys.executable, "-c", JOB, kernels, str(mib), *phases)
        return process, clock(process, "before"), clock(process, "attached")

    def phase(process) -> None:
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().startswith("phase done"), process.stderr.read()

    # 'resized': 10 spins of 50 ms in 5 s at 256 MiB and 20%, then 10 more at 512 MiB and 40%.
    resized, _, resized_attached = job("resized", ["--partition", "team"], 64, "10:50:5", "10:50:5")
    private = [job("b", ["--memory", "128MiB", "--compute", "30%"], 32, "20:25:2"),
               job("c", ["--memory", "384MiB", "--compute", "10%"], 32, "40:10:2")]
    for process in (resized, *(p for p, _, _ in private)):
        phase(process)
    time.sleep(0.8)   # a sample sees all of the first phase's device time before the change
    before = time.time()
    gpu.fracgpu("partition", "set", "team", "--memory", "512MiB", "--compute", "40%")
    after = time.time()
    time.sleep(0.8)   # and one sees none of the second's
    phase(resized)
    leaving = {}
    for (process, _, _), name in ((private[0], "b"), (private[1], "c"), ((resized, 0, 0), "resized")):
        process.stdin.write("leave\n")
        process.stdin.flush()
        leaving[name] = clock(process, "leaving")
    for process in (resized, *(p for p, _, _ in private)):
        assert process.wait(60) == 0, process.stderr.read()
    attached = {"resized": resized_attached, "b": private[0][2], "c": private[1][2]}

    export = tmp_path / "bill.json"   # prices by the hour, high enough that seconds cost more than cents
    out = gpu.fracgpu("report", "--by", "job", "--price-reserved-gpu-hour", "2400", "--price-reserved-gib-hour",
                      "90", "--price-used-gpu-hour", "3100", "--output", str(export), env={"COLUMNS": "200"})
    bill = json.loads(export.read_text())
    periods: dict[tuple[str, str], dict[str, Decimal]] = {}
    for line in bill["lines"]:
        key = (line["job"], line["memory_limit"])
        periods.setdefault(key, {})[line["component"]] = Decimal(line["quantity"])
    assert set(periods) == {("resized", 256 * MiB), ("resized", 512 * MiB), ("b", 128 * MiB), ("c", 384 * MiB)}

    with Ledger(gpu.ledger, create=False) as ledger:
        recorded = {(j.job, p.limits.memory_limit): p for j in ledger.jobs() for p in ledger.periods([j.id])}
    # The change's moment is the one `partition set` recorded, within the command's run.
    boundary = recorded[("resized", 512 * MiB)].start
    assert recorded[("resized", 256 * MiB)].end == boundary and before <= boundary <= after
    assert recorded[("resized", 512 * MiB)].opened_by == "set"

    hours = {("resized", 256 * MiB): (boundary - attached["resized"]) / 3600,
             ("resized", 512 * MiB): (leaving["resized"] - boundary) / 3600,
             ("b", 128 * MiB): (leaving["b"] - attached["b"]) / 3600,
             ("c", 384 * MiB): (leaving["c"] - attached["c"]) / 3600}
    shares = {("resized", 256 * MiB): 0.2, ("resized", 512 * MiB): 0.4, ("b", 128 * MiB): 0.3,
              ("c", 384 * MiB): 0.1}
    kernel_seconds = {("resized", 256 * MiB): 0.5, ("resized", 512 * MiB): 0.5, ("b", 128 * MiB): 0.5,
                      ("c", 384 * MiB): 0.4}
    for key, q in periods.items():
        assert near(q["reserved_gpu_hours"], shares[key] * hours[key]), (key, q, hours[key])
        assert near(q["reserved_gib_hours"], key[1] / GiB * hours[key]), (key, q, hours[key])
        assert near(q["used_gpu_hours"], kernel_seconds[key] / 3600), (key, q)

    # The lines add up exactly to the totals printed, per job and overall.
    printed = {cells[0]: Decimal(cells[-1]) for cells in table_rows(out.stdout) if len(cells) == 6}
    assert printed["total"] == sum(Decimal(line["amount"]) for line in bill["lines"]) > 0
    for name in ("resized", "b", "c"):
        (key,) = [k for k in printed if k.endswith(" " + name)]
        assert printed[key] == sum(Decimal(line["amount"]) for line in bill["lines"] if line["job"] == name)
    (node,) = bill["gpus"]
    assert node["reserved_gpu_hours"] <= node["capacity_gpu_hours"]
    assert near(node["used_gpu_hours"], sum(kernel_seconds.values()) / 3600)
