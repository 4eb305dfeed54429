"""The due jobs of billing time, in order. `billing_tick` and beat both call `tick_run`.

Each step is one service function that is idempotent per (organisation or subscription, period),
so running the tick twice, or again after a crash half-way, leaves the state of one clean run.
"""

from dataclasses import dataclass, field
from datetime import datetime

from accounts.services import downgrades_apply_due, periods_roll_due
from invoices.period_billing import period_invoices_collect
from invoices.services import (
    payment_attempts_reconcile,
    webhook_events_process_pending,
)
from usage.credits import commitment_periods_close, purchases_settle_stale, recharges_run_due
from usage.services import jobs_fail_stale, low_balance_alerts_run


@dataclass
class TickReport:
    at: datetime
    done: dict[str, int] = field(default_factory=dict)

    def __str__(self):
        steps = ", ".join(f"{name}: {count}" for name, count in self.done.items())
        return f"billing_tick as of {self.at.isoformat()}: {steps}"


def tick_run(*, at: datetime) -> TickReport:
    report = TickReport(at=at)
    report.done["stale jobs failed"] = jobs_fail_stale(now=at)
    # Scheduled downgrades take effect as their periods close (period_roll switches the plan
    # before it opens the next period); this step counts them, the next rolls everyone else.
    report.done["downgrades applied"] = downgrades_apply_due(now=at)
    report.done["periods rolled"] = periods_roll_due(now=at)
    # Bonus credits expire with their commitment period (and the tier with it).
    report.done["commitment periods closed"] = commitment_periods_close(now=at)
    report.done["webhook events processed"] = webhook_events_process_pending()
    report.done["payment attempts reconciled"] = sum(payment_attempts_reconcile().values())
    report.done["period invoices charged"] = period_invoices_collect(now=at)
    # After the reconciler: credit purchases left half-way are settled from their invoices, then
    # due recharges run (scheduled ones once per billing date; threshold ones still below the
    # threshold, or whose back-off has passed).
    report.done["credit purchases settled"] = purchases_settle_stale(now=at)
    report.done["recharges started"] = recharges_run_due(now=at)
    report.done["low-balance e-mails sent"] = low_balance_alerts_run()
    return report
