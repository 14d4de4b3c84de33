"""The bill from a ledger filled through its API with known limits and use: reserved and used per
period, exact decimal totals, the time window, groups, and each GPU's capacity and idle time."""

from __future__ import annotations

from decimal import Decimal

import pytest

from fracgpu import billing
from fracgpu.ledger import GPUSample, Ledger, Limits

GiB = 1 << 30
HOUR = 3600.0


def on(gpu, limits, memory=0, device=0.0, since=None):
    return {gpu: GPUSample(limits, memory, device, 0, since)}


@pytest.fixture
def ledger(tmp_path):
    """Two hours on GPU-a: 'train' (team=vision, uid 1001) held 4 GiB and 25% for an hour, then
    8 GiB and 50% for an hour, used 0.5 GPU-hours; 'infer' (team=search, uid 1002) held 2 GiB,
    best effort, and no share, for the first hour, and used 0.1 GPU-hours."""
    with Ledger(tmp_path / "l.sqlite") as l:
        l.note_gpu("GPU-a", "Simulated GPU", 16 * GiB)
        train = l.start_job(job="train", partition="vision", start=0.0, uid=1001, user="alice", host="n1",
                            labels={"team": "vision"})
        l.sample(train, memory_bytes=GiB, device_seconds=0.0, t=0.0, gpus=on("GPU-a", Limits(4 * GiB, 0.25), GiB))
        l.sample(train, memory_bytes=GiB, device_seconds=900.0, t=HOUR,
                 gpus=on("GPU-a", Limits(4 * GiB, 0.25), GiB, 900.0))
        l.record_change("GPU-a", "vision", Limits(8 * GiB, 0.5), t=HOUR)
        l.sample(train, memory_bytes=GiB, device_seconds=1800.0, t=2 * HOUR,
                 gpus=on("GPU-a", Limits(8 * GiB, 0.5), GiB, 1800.0))
        l.finish(train, exit_status=0, end=2 * HOUR)
        infer = l.start_job(job="infer", partition="run-9", start=0.0, uid=1002, user="bob", host="n1",
                            labels={"team": "search"})
        best_effort = Limits(2 * GiB, None, best_effort=True)
        l.sample(infer, memory_bytes=0, device_seconds=0.0, t=0.0, gpus=on("GPU-a", best_effort))
        l.sample(infer, memory_bytes=0, device_seconds=360.0, t=HOUR, gpus=on("GPU-a", best_effort, 0, 360.0))
        l.finish(infer, exit_status=0, end=HOUR)
        yield l


def bill(ledger, prices=None, since=None, until=None):
    jobs = ledger.jobs()
    return jobs, billing.lines(jobs, ledger.periods(), prices or billing.Prices(), since, until)


def quantities(lines):
    out = {}
    for line in lines:
        out.setdefault((line.job.job, line.period.limits.memory_limit), {})[line.component] = line.quantity
    return out


def test_reserved_follows_the_limits_as_they_were_and_used_is_the_device_time(ledger):
    _, lines = bill(ledger)
    q = quantities(lines)
    assert q[("train", 4 * GiB)] == {"reserved_gpu_hours": Decimal("0.25"), "reserved_gib_hours": Decimal("4"),
                                     "used_gpu_hours": Decimal("0.25"), "used_gib_hours": Decimal("1")}
    assert q[("train", 8 * GiB)]["reserved_gpu_hours"] == Decimal("0.5")
    assert q[("train", 8 * GiB)]["reserved_gib_hours"] == Decimal("8")
    # A best-effort quota was never promised: nothing reserved; no share: no compute reserved.
    assert q[("infer", 2 * GiB)]["reserved_gib_hours"] == 0 and q[("infer", 2 * GiB)]["reserved_gpu_hours"] == 0
    assert q[("infer", 2 * GiB)]["used_gpu_hours"] == Decimal("0.1")


def test_amounts_round_half_even_per_line_and_the_totals_are_their_exact_sums(ledger):
    prices = billing.Prices({"reserved_gpu_hours": Decimal("2.50"), "reserved_gib_hours": Decimal("0.0125"),
                             "used_gpu_hours": Decimal("1.99")}, "EUR", 2)
    _, lines = bill(ledger, prices)
    by = billing.grouping("label:team")
    groups, overall = billing.totals(lines, by)
    assert overall.total == sum(line.amount for line in lines)
    assert sum(t.total for t in groups.values()) == overall.total
    # 4 GiB-hours at 0.0125 is 0.05; 0.25 GPU-hours at 1.99 is 0.4975, half-even to 0.50; 0.1 at 1.99: 0.199 -> 0.20
    amounts = {(line.job.job, line.period.limits.memory_limit, line.component): line.amount for line in lines}
    assert amounts[("train", 4 * GiB, "reserved_gib_hours")] == Decimal("0.05")
    assert amounts[("train", 4 * GiB, "used_gpu_hours")] == Decimal("0.50")
    assert amounts[("infer", 2 * GiB, "used_gpu_hours")] == Decimal("0.20")
    assert all(line.amount == line.amount.quantize(Decimal("0.01")) for line in lines)
    assert set(groups) == {"vision", "search"}
    assert groups["vision"].quantity["reserved_gpu_hours"] == Decimal("0.75")


def test_a_window_clips_the_periods_to_it(ledger):
    _, lines = bill(ledger, since=HOUR / 2, until=HOUR * 1.5)
    q = quantities(lines)
    assert q[("train", 4 * GiB)]["reserved_gpu_hours"] == Decimal("0.125")
    assert q[("train", 8 * GiB)]["reserved_gib_hours"] == Decimal("4")
    assert q[("train", 4 * GiB)]["used_gpu_hours"] == Decimal("0.125")   # spread evenly over its period
    assert q[("infer", 2 * GiB)]["used_gpu_hours"] == Decimal("0.05")
    _, lines = bill(ledger, since=HOUR * 3)
    assert lines == []


def test_groups_by_user_job_and_partition(ledger):
    jobs, lines = bill(ledger)
    assert set(billing.totals(lines, billing.grouping("user"))[0]) == {"alice (1001)", "bob (1002)"}
    assert set(billing.totals(lines, billing.grouping("partition"))[0]) == {"vision", "run-9"}
    assert set(billing.totals(lines, billing.grouping("job"))[0]) == {f"{jobs[0].id} train", f"{jobs[1].id} infer"}
    assert set(billing.totals(lines, billing.grouping("namespace"))[0]) == {"(no namespace)"}
    with pytest.raises(ValueError, match="label:KEY"):
        billing.grouping("team")


def test_each_gpu_shows_capacity_reserved_used_and_idle(ledger):
    (gpu,) = billing.gpu_summary(ledger.jobs(), ledger.periods(), ledger.gpus())
    assert gpu.capacity_gpu_hours == 2.0 and gpu.capacity_gib_hours == 32.0
    assert gpu.reserved_gpu_hours == pytest.approx(0.75) and gpu.reserved_gib_hours == pytest.approx(12.0)
    assert gpu.used_gpu_hours == pytest.approx(0.6) and gpu.idle_gpu_hours == pytest.approx(1.4)
    assert gpu.unsold_gpu_hours == pytest.approx(1.25)


def test_jobs_sharing_a_partition_hold_its_reservation_once_on_the_gpu(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as l:
        for start in (0.0, HOUR / 2):   # two jobs of one partition, overlapping by half an hour
            job = l.start_job(job="j", partition="shared", start=start)
            l.sample(job, memory_bytes=0, device_seconds=0.0, t=start + 1,
                     gpus=on("GPU-a", Limits(GiB, 0.5), since=start))
            l.finish(job, exit_status=0, end=start + HOUR)
        (gpu,) = billing.gpu_summary(l.jobs(), l.periods(), {})
        lines = billing.lines(l.jobs(), l.periods(), billing.Prices())
    assert gpu.reserved_gpu_hours == pytest.approx(0.75)   # 1.5 hours of the partition's 50%
    assert gpu.capacity_gib_hours is None                  # the GPU's memory was never recorded
    # Each job's bill carries the reservation it ran under.
    assert sum(line.quantity for line in lines if line.component == "reserved_gpu_hours") == Decimal("1")


def test_prices_are_decimals_as_written():
    assert billing.parse_price("0.10") == Decimal("0.10")
    for bad in ("ten", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="invalid price"):
            billing.parse_price(bad)
