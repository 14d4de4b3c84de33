"""A bill from the ledger: what each job reserved and used, per period, priced in decimal.

A provider bills what it *reserved* for a customer, held whether used or
not, and may bill what was *used*. Each period of a job (a stretch of its time
on one GPU at the same limits, ``Ledger.periods``) gives one line per
component:

- ``reserved_gpu_hours``: its guaranteed compute share times the period's
  hours (a 25% share for an hour is 0.25 GPU-hours);
- ``reserved_gib_hours``: its memory quota in GiB times the hours, when the
  quota is a promise (a best-effort quota was overcommitted: it reserved
  nothing, and its lines say 0);
- ``used_gpu_hours``: the device time its kernels used;
- ``used_gib_hours``: the memory it held (as sampled) times the time.

Money is ``decimal.Decimal`` throughout. The rounding rule, stated in every
export: each line's quantity is rounded half-even to 9 decimal places, its
amount (quantity x unit price) half-even to the currency's minor unit
(``decimals``, 2 unless given); every total is the sum of the rounded lines
it covers, so an export's lines add up exactly to the totals printed.

A time window clips each period to it; what was used in a period is taken to
be spread evenly over it for that (the ledger keeps a period's totals, and its
samples, under 5 s apart, for finer questions). A period still open is billed
up to its latest sample.

``gpu_summary`` is the node's side: per GPU, its capacity over the window,
what was reserved on it (each partition counted once, however many of its jobs
ran at a time), used, idle and never sold, and the memory the books missed
(the device held it; the job it was charged to pays for it in its used memory).
"""

from __future__ import annotations

import dataclasses
import decimal
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal

from fracgpu.ledger import JobRecord, Period

__all__ = ["COMPONENTS", "Prices", "Line", "Totals", "GPUSummary", "lines", "totals", "grouping", "gpu_summary",
           "parse_price", "ROUNDING"]

GiB = 1 << 30
HOUR = 3600
QUANTITY = Decimal("1e-9")
# component: (unit, what it is, the price option's name)
COMPONENTS: dict[str, tuple[str, str]] = {
    "reserved_gpu_hours": ("GPU-hour", "guaranteed compute share x hours"),
    "reserved_gib_hours": ("GiB-hour", "memory quota promised x hours"),
    "used_gpu_hours": ("GPU-hour", "device time the job's kernels used"),
    "used_gib_hours": ("GiB-hour", "memory the job held x hours"),
}
ROUNDING = ("each line: quantity rounded half-even to 9 decimal places, amount = quantity x unit price rounded "
            "half-even to {decimals} decimal places; totals are sums of the rounded lines")


def parse_price(text: str) -> Decimal:
    """A price per unit as written ("2.50"), exactly; ValueError for anything else or a negative one."""
    try:
        price = Decimal(text.strip())
    except decimal.InvalidOperation:
        raise ValueError(f"invalid price {text!r}: give a decimal number, like 2.50") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"invalid price {text!r}: give a decimal number >= 0, like 2.50")
    return price


@dataclasses.dataclass(frozen=True)
class Prices:
    """A unit price per component (``COMPONENTS``; absent: 0), the currency's code and minor unit."""

    per_unit: Mapping[str, Decimal] = dataclasses.field(default_factory=dict)
    currency: str = "USD"
    decimals: int = 2

    def __post_init__(self):
        unknown = set(self.per_unit) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"no price component {sorted(unknown)}: the components are {', '.join(COMPONENTS)}")
        if not 0 <= self.decimals <= 6:
            raise ValueError(f"a currency's minor unit is 0 to 6 decimal places, not {self.decimals}")

    def price(self, component: str) -> Decimal:
        return self.per_unit.get(component, Decimal(0))

    @property
    def rounding(self) -> str:
        return ROUNDING.format(decimals=self.decimals)

    def amount(self, quantity: Decimal, component: str) -> Decimal:
        return self.money(quantity * self.price(component))

    def money(self, value: Decimal) -> Decimal:
        """``value`` rounded half-even to the currency's minor unit (a sum of amounts is unchanged,
        only written with its minor unit: 0.00, not 0)."""
        return value.quantize(Decimal(1).scaleb(-self.decimals), rounding=decimal.ROUND_HALF_EVEN)


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of the bill: a job's period (clipped to the window) and one component."""

    job: JobRecord
    period: Period
    start: float
    end: float
    component: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal

    @property
    def unit(self) -> str:
        return COMPONENTS[self.component][0]


def _quantity(value: float) -> Decimal:
    # repr is the shortest decimal that reads back as the float: no binary noise beyond it.
    return Decimal(repr(value)).quantize(QUANTITY, rounding=decimal.ROUND_HALF_EVEN)


def _clip(period: Period, since: float | None, until: float | None) -> tuple[float, float] | None:
    start, end = period.start, period.recorded_until
    lo = start if since is None else max(start, since)
    hi = end if until is None else min(end, until)
    if hi < lo or (hi == lo and end > start):
        return None   # outside the window (a period of no length inside it is kept, at zero)
    return lo, hi


def quantities(period: Period, lo: float, hi: float) -> dict[str, float]:
    """The four components of ``period`` between ``lo`` and ``hi`` (inside it), unrounded."""
    hours = (hi - lo) / HOUR
    whole = period.recorded_until - period.start
    part = (hi - lo) / whole if whole > 0 else 1.0
    limits = period.limits
    promised = limits.memory_limit if limits.memory_limit and not limits.best_effort else 0
    guaranteed = limits.compute_share if limits.compute_share and not limits.compute_best_effort else 0.0
    return {"reserved_gpu_hours": guaranteed * hours,
            "reserved_gib_hours": promised / GiB * hours,
            "used_gpu_hours": period.gpu_seconds * part / HOUR,
            "used_gib_hours": period.memory_byte_seconds * part / GiB / HOUR}


def lines(jobs: Sequence[JobRecord], periods: Iterable[Period], prices: Prices, since: float | None = None,
          until: float | None = None) -> list[Line]:
    """The bill's lines for ``jobs``, in job, GPU and period order, each period clipped to
    [``since``, ``until``] (None: unbounded); periods of other jobs are left out."""
    by_id = {job.id: job for job in jobs}
    order = {job.id: n for n, job in enumerate(jobs)}
    out = []
    for period in sorted((p for p in periods if p.job_id in by_id), key=lambda p: (order[p.job_id], p.gpu, p.start)):
        clipped = _clip(period, since, until)
        if clipped is None:
            continue
        for component, value in quantities(period, *clipped).items():
            quantity = _quantity(value)
            out.append(Line(by_id[period.job_id], period, *clipped, component, quantity, prices.price(component),
                            prices.amount(quantity, component)))
    return out


def grouping(by: str) -> Callable[[JobRecord], str]:
    """What ``--by`` groups jobs by: ``partition``, ``user``, ``job``, ``label:KEY``, or
    ``namespace`` (the label Kubernetes sets). ValueError naming the choices."""
    if by == "namespace":
        by = "label:namespace"
    if by.startswith("label:") and by[6:].strip():
        key = by[6:].strip()
        return lambda job: job.labels.get(key, f"(no {key})")
    simple = {"partition": lambda job: job.partition,
              "user": lambda job: f"{job.user or '?'} ({job.uid})" if job.uid is not None else "(not recorded)",
              "job": lambda job: f"{job.id} {job.job}"}
    if by not in simple:
        raise ValueError(f"invalid grouping {by!r}: give partition, user, job, namespace or label:KEY")
    return simple[by]


@dataclasses.dataclass
class Totals:
    """Sums of rounded lines: per component, the quantity and the amount; and the amount in all."""

    quantity: dict[str, Decimal] = dataclasses.field(default_factory=lambda: {c: Decimal(0) for c in COMPONENTS})
    amount: dict[str, Decimal] = dataclasses.field(default_factory=lambda: {c: Decimal(0) for c in COMPONENTS})

    def add(self, line: Line) -> None:
        self.quantity[line.component] += line.quantity
        self.amount[line.component] += line.amount

    @property
    def total(self) -> Decimal:
        return sum(self.amount.values(), Decimal(0))


def totals(bill: Iterable[Line], key: Callable[[JobRecord], str] | None = None) -> tuple[dict[str, Totals], Totals]:
    """Totals per group (``key`` of each line's job; None: no groups) in first-seen order, and overall."""
    groups: dict[str, Totals] = {}
    overall = Totals()
    for line in bill:
        overall.add(line)
        if key is not None:
            groups.setdefault(key(line.job), Totals()).add(line)
    return groups, overall


@dataclasses.dataclass
class GPUSummary:
    """One GPU over a window, in GPU-hours and GiB-hours (memory None where its size is unknown)."""

    gpu: str
    start: float
    end: float
    capacity_gpu_hours: float
    reserved_gpu_hours: float
    used_gpu_hours: float
    total_memory: int | None
    capacity_gib_hours: float | None
    reserved_gib_hours: float
    used_gib_hours: float
    missed_gib_hours: float   # memory the device held beyond the books (inside used, charged to its jobs)

    @property
    def idle_gpu_hours(self) -> float:
        return max(0.0, self.capacity_gpu_hours - self.used_gpu_hours)

    @property
    def unsold_gpu_hours(self) -> float:
        return max(0.0, self.capacity_gpu_hours - self.reserved_gpu_hours)


def _reserved_once(spans: list[tuple[float, float, float]]) -> float:
    """The integral over time of the largest value among the spans (start, end, value) active:
    the jobs of one partition hold its one reservation, however many run at a time."""
    edges = sorted({t for start, end, _ in spans for t in (start, end)})
    total = 0.0
    for lo, hi in zip(edges, edges[1:]):
        total += max((v for start, end, v in spans if start <= lo and end >= hi), default=0.0) * (hi - lo)
    return total


def gpu_summary(jobs: Sequence[JobRecord], periods: Iterable[Period], gpus: Mapping[str, tuple[str, int]],
                since: float | None = None, until: float | None = None) -> list[GPUSummary]:
    """Per GPU the jobs' periods ran on, over the window (its bounds, else from the first period's
    start to the last one's end): capacity, reserved, used, and the memory the books missed.
    ``gpus``: each GPU's memory in bytes, where the ledger knows it."""
    by_id = {job.id: job for job in jobs}
    clipped: dict[str, list[tuple[Period, float, float]]] = {}
    for period in periods:
        window = _clip(period, since, until) if period.job_id in by_id else None
        if window is not None:
            clipped.setdefault(period.gpu, []).append((period, *window))
    out = []
    for gpu, spans in clipped.items():
        start = since if since is not None else min(lo for _, lo, _ in spans)
        end = until if until is not None else max(hi for _, _, hi in spans)
        share: dict[str, list] = {}
        memory: dict[str, list] = {}
        used_gpu = used_gib = missed = 0.0
        for period, lo, hi in spans:
            partition = by_id[period.job_id].partition
            q = quantities(period, lo, hi)
            used_gpu += q["used_gpu_hours"]
            used_gib += q["used_gib_hours"]
            whole = period.recorded_until - period.start
            missed += period.drift_byte_seconds * ((hi - lo) / whole if whole > 0 else 1.0) / GiB / HOUR
            guaranteed = period.limits.compute_share if not period.limits.compute_best_effort else None
            share.setdefault(partition, []).append((lo, hi, guaranteed or 0.0))
            promised = period.limits.memory_limit if not period.limits.best_effort else None
            memory.setdefault(partition, []).append((lo, hi, (promised or 0) / GiB))
        hours = (end - start) / HOUR
        total = gpus[gpu][1] if gpu in gpus else None
        out.append(GPUSummary(
            gpu, start, end, hours, sum(_reserved_once(s) for s in share.values()) / HOUR, used_gpu, total,
            total / GiB * hours if total else None, sum(_reserved_once(s) for s in memory.values()) / HOUR,
            used_gib, missed))
    return sorted(out, key=lambda s: s.gpu)
