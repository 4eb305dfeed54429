"""Billing time: the wall clock moved by `billing_tick --at` (DESIGN §3, §6).

Every page, the API and the workers ask `now()` instead of `timezone.now()`, so moving time with
billing_tick moves what they all show. The offset is read from the database at most once a second
per process.
"""

import time
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

from django.utils import timezone

_CACHE_SECONDS = 1.0
_cached: tuple[float, timedelta] | None = None


def offset() -> timedelta:
    global _cached
    mono = time.monotonic()
    if _cached is None or mono - _cached[0] > _CACHE_SECONDS:
        from accounts.models import BillingClock

        row = BillingClock.objects.filter(pk=1).values_list("offset", flat=True).first()
        _cached = (mono, row or timedelta(0))
    return _cached[1]


_travelled_to: datetime | None = None


def now() -> datetime:
    if _travelled_to is not None:
        return _travelled_to
    return timezone.now() + offset()


@contextmanager
def travel(to: datetime):
    """Within this block, this process's billing time stands still at `to` (for seeding history
    and for tests); other processes and the stored clock are not touched."""
    global _travelled_to
    before, _travelled_to = _travelled_to, to
    try:
        yield
    finally:
        _travelled_to = before


def today() -> date:
    return now().date()


def forget() -> None:
    """Drop the cached offset (after a tick in this process, and between tests)."""
    global _cached
    _cached = None


def midnight(day: date) -> datetime:
    """00:00 UTC of a day: periods start and end there."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
