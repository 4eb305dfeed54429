"""What tests use to move billing time, read a customer's state and spend credits, the way
`billing_tick` and the metering API would."""

from datetime import UTC, datetime
from io import StringIO

from django.core.management import call_command

from accounts import clock
from accounts.models import Subscription
from usage import services
from usage.models import CreditAccount


def at(text: str) -> datetime:
    """ "2027-01-10T09:00:00Z", "2027-01-10T09:00:00" or "2027-01-10", as a UTC moment."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def tick(when: str | None = None) -> str:
    """`manage.py billing_tick [--at when]`; what it printed."""
    out = StringIO()
    call_command("billing_tick", *(["--at", when] if when else []), stdout=out)
    clock.forget()
    return out.getvalue()


def sub_of(org) -> Subscription:
    return Subscription.objects.select_related("plan", "scheduled_plan", "current_period", "org").get(org=org)


def owner_of(org):
    return org.memberships.get().user


def balance(org) -> int:
    return CreditAccount.objects.get(org=org).balance


def spend(org, credits: int, tag: str):
    """Charges `credits` through one usage event (parse/base costs 1 credit a unit)."""
    batch = [services.EventIn(tag, "parse", "base", credits, clock.now())]
    return services.usage_events_record(sub=sub_of(org), events=batch)
