"""Reads of credits and usage for the API and the pages."""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.db import connection
from django.db.models import F, Q, Sum

from accounts.models import BillingPeriod, Subscription
from billing_site.money import overage_cents
from usage.models import Bucket, CreditAccount, CreditLot, Operation, UsageRollup

_CATALOG_SECONDS = 30.0
_catalog: tuple[float, dict[tuple[str, str], int], frozenset[tuple[str, str]]] | None = None


def _catalog_load():
    """The catalog, cached per process for 30 s and dropped whenever an operation is saved or
    deleted in this process."""
    global _catalog
    mono = time.monotonic()
    if _catalog is None or mono - _catalog[0] > _CATALOG_SECONDS:
        rows = Operation.objects.values_list("product", "mode", "credits_per_unit", "unit")
        costs = {(p, m): c for p, m, c, _ in rows}
        per_page = frozenset((p, m) for p, m, _, unit in rows if unit == Operation.Unit.PAGE)
        _catalog = (mono, costs, per_page)
    return _catalog


def catalog_costs() -> dict[tuple[str, str], int]:
    """{(product, mode): credits per unit}."""
    return _catalog_load()[1]


def catalog_per_page() -> frozenset[tuple[str, str]]:
    """The (product, mode) pairs priced per page: the ones a document job may use."""
    return _catalog_load()[2]


def catalog_forget(**_kwargs) -> None:
    global _catalog
    _catalog = None


def products() -> list[str]:
    return sorted({p for p, _ in catalog_costs()})


@dataclass(frozen=True)
class BucketBalance:
    bucket: str
    credits: int
    expires_at: datetime | None


@dataclass(frozen=True)
class Balance:
    plan_code: str
    plan_name: str
    credits_remaining: int
    credits_included: int
    credits_used_this_period: int
    period_start: datetime
    period_end: datetime
    overage_enabled: bool
    overage_credits: int
    overage_cents: int
    overage_cap_cents: int | None
    buckets: list[BucketBalance]


def balance_for(*, sub: Subscription) -> Balance:
    """The organisation's balance, by bucket, for its current period."""
    account = CreditAccount.objects.get(org_id=sub.org_id)
    period = BillingPeriod.objects.get(pk=sub.current_period_id)
    groups = (
        CreditLot.objects.filter(org_id=sub.org_id, remaining__gt=0)
        .values("bucket", "expires_at")
        .annotate(credits=Sum("remaining"))
        .order_by("bucket", F("expires_at").asc(nulls_last=True))
    )
    rate = sub.overage_rate
    return Balance(
        plan_code=sub.plan.code,
        plan_name=sub.plan.name,
        credits_remaining=account.balance,
        credits_included=period.monthly_credits,
        credits_used_this_period=period.credits_used,
        period_start=period.start,
        period_end=period.end,
        overage_enabled=rate is not None,
        overage_credits=period.overage_credits,
        overage_cents=overage_cents(period.overage_credits, rate) if rate is not None else 0,
        overage_cap_cents=sub.overage_cap_cents if rate is not None else None,
        buckets=[BucketBalance(Bucket(g["bucket"]).label, g["credits"], g["expires_at"]) for g in groups],
    )


GROUPINGS = ("day", "product", "mode")


@dataclass(frozen=True)
class UsageRow:
    key: str
    credits: int
    units: int


def usage_rows(*, org_id: int, start: date, end: date, group_by: str) -> list[UsageRow]:
    """Credits and units from the daily rollups, [start, end] inclusive, grouped by day (every day
    of the range, zeros included), product or mode."""
    field = {"day": "day", "product": "product", "mode": "mode"}[group_by]
    sums = (
        UsageRollup.objects.filter(org_id=org_id, day__gte=start, day__lte=end)
        .values(field)
        .annotate(credits=Sum("credits"), units=Sum("units"))
        .order_by(field)
    )
    found = {row[field]: row for row in sums}
    if group_by != "day":
        return [UsageRow(k, r["credits"], r["units"]) for k, r in found.items()]
    rows = []
    for offset in range((end - start).days + 1):
        day = start + timedelta(days=offset)
        r = found.get(day)
        rows.append(UsageRow(day.isoformat(), r["credits"] if r else 0, r["units"] if r else 0))
    return rows


@dataclass(frozen=True)
class Forecast:
    daily_rate: int  # credits a day over the last 7 days, rounded down
    runs_out_on: date | None  # None: no usage, or the credits outlast the period

    @property
    def has_usage(self) -> bool:
        return self.daily_rate > 0


FORECAST_DAYS = 7


def forecast_for(*, org_id: int, credits_remaining: int, today: date, period_end: date) -> Forecast:
    """At the last 7 days' rate (today included), the day the remaining credits run out, if that
    comes before the period ends."""
    since = today - timedelta(days=FORECAST_DAYS - 1)
    used = (
        UsageRollup.objects.filter(org_id=org_id, day__gte=since, day__lte=today).aggregate(s=Sum("credits"))[
            "s"
        ]
        or 0
    )
    rate = used // FORECAST_DAYS
    if rate == 0:
        return Forecast(0, None)
    runs_out = today + timedelta(days=credits_remaining // rate)
    return Forecast(rate, runs_out if runs_out < period_end else None)


@dataclass(frozen=True)
class InvoiceEstimate:
    date: datetime
    plan_name: str
    plan_cents: int
    overage_cents: int

    @property
    def total_cents(self) -> int:
        return self.plan_cents + self.overage_cents


def next_invoice_estimate(*, sub: Subscription, balance: Balance) -> InvoiceEstimate:
    """What the period close will bill: the next period's plan fee in advance and this period's
    overage so far in arrears."""
    next_plan = sub.scheduled_plan or sub.plan  # a scheduled downgrade bills the new plan's fee
    return InvoiceEstimate(
        date=balance.period_end,
        plan_name=next_plan.name,
        plan_cents=sub.price_cents if next_plan == sub.plan else next_plan.price_cents,
        overage_cents=balance.overage_cents,
    )


# --- the Usage page and its CSV ------------------------------------------------------------

# Inclusive (first day, last day) spans of days.
Spans = Sequence[tuple[date, date]]


def _rollups_in(org_id: int, spans: Spans):
    days = Q()
    for start, end in spans:
        days |= Q(day__gte=start, day__lte=end)
    return UsageRollup.objects.filter(days, org_id=org_id)


@dataclass(frozen=True)
class UsageLine:
    day: date
    product: str
    mode: str
    credits: int
    units: int


def usage_lines(*, org_id: int, spans: Spans) -> list[UsageLine]:
    """One line per day, product and mode with usage in the spans (each inclusive), sorted by day,
    product and mode: the rows of the usage CSV, and what the Usage page's figures add up."""
    rows = (
        _rollups_in(org_id, spans)
        .exclude(credits=0, units=0)
        .order_by("day", "product", "mode")
        .values_list("day", "product", "mode", "credits", "units")
    )
    return [UsageLine(*row) for row in rows]


def usage_version(*, org_id: int, spans: Spans) -> tuple[int, int, int, int]:
    """What the rollups in the spans hold, in one row: (rows, credits, units, highest id). Rollups
    only grow (a row is added, or credits and units are added to it), so every write there changes
    it: the Usage page keys its cache with it. In SQL because it runs on every view of the page and
    the ORM takes longer to build it (~1 ms) than the database takes to answer it."""
    table = UsageRollup._meta.db_table
    days = " OR ".join(["(day >= %s AND day <= %s)"] * len(spans))
    sql = (
        f"SELECT count(*), coalesce(sum(credits), 0), coalesce(sum(units), 0), coalesce(max(id), 0) "  # noqa: S608 (our table)
        f"FROM {table} WHERE org_id = %s AND ({days})"
    )
    adapt = connection.ops.adapt_datefield_value
    params = [org_id, *(adapt(day) for span in spans for day in span)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return tuple(int(n) for n in cursor.fetchone())
