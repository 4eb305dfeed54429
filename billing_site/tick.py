"""The due jobs of billing time, in order. `billing_tick` and beat both call `tick_run`.

Each step is one service function that is idempotent per (organisation or subscription, period),
so running the tick twice, or again after a crash half-way, leaves the state of one clean run.
"""

from dataclasses import dataclass, field
from datetime import datetime

from accounts.services import periods_roll_due
from usage.services import jobs_fail_stale


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
    report.done["periods rolled"] = periods_roll_due(now=at)
    return report
