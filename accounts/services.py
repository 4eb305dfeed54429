"""Writes for organisations, members, API keys, billing periods and the billing clock."""

import calendar
import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from accounts import clock
from accounts.models import (
    ApiKey,
    BillingClock,
    BillingPeriod,
    Membership,
    Organisation,
    Plan,
    Role,
    Subscription,
    User,
)
from billing_site.errors import BillingError, invalid

# --- billing periods -------------------------------------------------------------------------


def _add_month(moment: datetime, day: int) -> datetime:
    """00:00 UTC on `day` of the month after `moment`'s (the day falls to the month's last)."""
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    last = calendar.monthrange(year, month)[1]
    return moment.replace(
        year=year, month=month, day=min(day, last), hour=0, minute=0, second=0, microsecond=0
    )


def period_end_for(*, start: datetime, plan: Plan, anchor_day: int) -> datetime:
    """Free periods end on the next 1st; paid ones on the anchor day of the next month."""
    return _add_month(start, 1 if plan.is_free else anchor_day)


def period_open(*, sub: Subscription, start: datetime) -> BillingPeriod:
    """Opens the period starting at `start` and grants its plan credits (once per period)."""
    from usage.models import Bucket
    from usage.services import lot_grant

    end = period_end_for(start=start, plan=sub.plan, anchor_day=sub.anchor_day)
    period, _ = BillingPeriod.objects.get_or_create(
        org_id=sub.org_id,
        start=start,
        defaults={"plan": sub.plan, "end": end, "monthly_credits": sub.monthly_credits},
    )
    sub.current_period = period
    sub.save(update_fields=["current_period"])
    if period.monthly_credits:
        lot_grant(
            org_id=sub.org_id,
            bucket=Bucket.PLAN,
            credits=period.monthly_credits,
            source=f"period:{period.pk}",
            expires_at=period.end,
            period=period,
            reason=f"{sub.plan.name} plan credits for the period from {start:%d %b %Y}",
        )
    return period


def period_roll(*, subscription_id: int, now: datetime) -> bool:
    """Closes the current period if it has ended by `now` and opens the next one; returns whether
    it did. One transaction: a crash half-way leaves the period open, and a re-run does it once."""
    from usage.models import Bucket, CreditLot
    from usage.services import lots_expire

    with transaction.atomic():
        sub = (
            Subscription.objects.select_for_update(of=("self",))
            .select_related("plan", "current_period")
            .get(pk=subscription_id)
        )
        period = sub.current_period
        if period is None or period.end > now:
            return False
        plan_lots = CreditLot.objects.filter(org_id=sub.org_id, period=period, bucket=Bucket.PLAN)
        lots_expire(org_id=sub.org_id, lots=list(plan_lots), reason="plan credits never roll over")
        period.closed_at = now
        period.save(update_fields=["closed_at"])
        period_open(sub=sub, start=period.end)
    return True


def periods_roll_due(*, now: datetime) -> int:
    """Rolls every subscription whose period has ended, as many periods as `now` has passed."""
    rolled = 0
    due = Subscription.objects.filter(current_period__end__lte=now).values_list("pk", flat=True)
    for sub_id in list(due):
        while period_roll(subscription_id=sub_id, now=now):
            rolled += 1
    return rolled


def clock_move(*, at: datetime | None) -> datetime:
    """Moves billing time to `at` (or keeps it, when None) and records the tick. An `at` earlier
    than the last tick is refused."""
    with transaction.atomic():
        row, _ = BillingClock.objects.select_for_update().get_or_create(pk=1)
        wall = timezone.now()
        moment = at if at is not None else wall + row.offset
        if row.last_tick_at and moment < row.last_tick_at:
            raise invalid(
                f"--at {moment.isoformat()} is earlier than the last tick ({row.last_tick_at.isoformat()}); "
                "time only moves forward."
            )
        if at is not None:
            row.offset = at - wall
        row.last_tick_at = moment
        row.save()
    clock.forget()
    return moment


# --- organisations and members ---------------------------------------------------------------


def _user_for(email: str, password: str | None) -> User:
    email = User.objects.normalize_email(email).lower()
    user = User.objects.filter(email=email).first()
    if user is None:
        user = User.objects.create_user(email=email, password=password)
    return user


def organisation_create(
    *,
    name: str,
    plan_code: str,
    owner_email: str,
    password: str | None = None,
    monthly_credits: int | None = None,
    rpm: int | None = None,
    concurrent_jobs: int | None = None,
) -> tuple[Organisation, str]:
    """Creates an organisation, its owner, its subscription with the first period, and a first API
    key. Returns the organisation and the key (shown once)."""
    from usage.models import CreditAccount

    if not name.strip():
        raise invalid("The organisation needs a name.")
    plan = Plan.objects.filter(code=plan_code).first()
    if plan is None:
        codes = ", ".join(Plan.objects.values_list("code", flat=True))
        raise invalid(f"Unknown plan {plan_code!r}; choose one of {codes}.")
    for label, value in (
        ("monthly credits", monthly_credits),
        ("rpm", rpm),
        ("concurrent jobs", concurrent_jobs),
    ):
        if value is not None and value < 1:
            raise invalid(f"The {label} override must be a whole number from 1 up.")
    today = clock.today()
    with transaction.atomic():
        org = Organisation.objects.create(name=name.strip())
        user = _user_for(owner_email, password)
        Membership.objects.create(org=org, user=user, role=Role.OWNER)
        CreditAccount.objects.create(org=org)
        sub = Subscription.objects.create(
            org=org,
            plan=plan,
            anchor_day=today.day,
            monthly_credits_override=monthly_credits,
            rpm_override=rpm,
            concurrent_jobs_override=concurrent_jobs,
        )
        period_open(sub=sub, start=clock.midnight(today))
        _, raw_key = api_key_create(org=org, name="Default key", created_by=user)
    return org, raw_key


def member_add(*, org_id: int, email: str, role: str, password: str | None = None) -> Membership:
    """Adds a person to an organisation with a role (or changes the role of one already there)."""
    if role not in Role.values:
        raise invalid(f"Unknown role {role!r}; choose one of {', '.join(Role.values)}.")
    org = Organisation.objects.filter(pk=org_id).first()
    if org is None:
        raise BillingError("NOT_FOUND", f"No organisation with id {org_id}.", 404)
    with transaction.atomic():
        user = _user_for(email, password)
        membership, created = Membership.objects.get_or_create(org=org, user=user, defaults={"role": role})
        if not created and membership.role != role:
            membership.role = role
            membership.save(update_fields=["role"])
    return membership


# --- API keys --------------------------------------------------------------------------------

_KEY_PATTERN = re.compile(r"^(sk_[0-9a-f]{8})_[A-Za-z0-9_-]{43}$")
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_create(*, org: Organisation, name: str, created_by: User | None = None) -> tuple[ApiKey, str]:
    """Creates a key; returns it and its secret, which is shown once and stored only hashed."""
    name = name.strip()
    if not name:
        raise invalid("Give the key a name.")
    prefix = f"sk_{secrets.token_hex(4)}"
    raw = f"{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        org=org, name=name[:100], prefix=prefix, key_hash=_hash(raw), created_by=created_by
    )
    return key, raw


def api_key_authenticate(raw: str) -> ApiKey | None:
    """The active key for a secret, with its organisation's subscription and plan; None if the
    secret is malformed, unknown or revoked. Hashes are compared in constant time."""
    match = _KEY_PATTERN.match(raw or "")
    if match is None:
        return None
    key = (
        ApiKey.objects.select_related("org__subscription__plan")
        .filter(prefix=match.group(1), revoked_at__isnull=True)
        .first()
    )
    if key is None or not hmac.compare_digest(key.key_hash, _hash(raw)):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def api_key_revoke(*, org_id: int, key_id: int) -> ApiKey:
    key = ApiKey.objects.filter(org_id=org_id, pk=key_id).first()
    if key is None:
        raise BillingError("NOT_FOUND", "No such API key.", 404)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key
