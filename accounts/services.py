"""Writes for organisations, members, API keys, billing periods and the billing clock."""

import calendar
import hashlib
import hmac
import logging
import re
import secrets
import smtplib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, OuterRef, Q, Subquery
from django.utils import timezone

from accounts import clock
from accounts.models import (
    ApiKey,
    BillingClock,
    BillingPeriod,
    ContactRequest,
    Membership,
    Organisation,
    Plan,
    Role,
    Subscription,
    User,
)
from billing_site.errors import BillingError, invalid
from billing_site.money import prorate_cents
from billing_site.rows import Columns, fetch_one_first_in_request, load_joined

logger = logging.getLogger(__name__)

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


def period_open(*, openings: Sequence[tuple[Subscription, datetime]]) -> list[BillingPeriod]:
    """Opens, for each (subscription, start), the period starting at `start`, makes it the
    subscription's current period and grants its plan credits (once per period), with
    set-based writes; returns the periods in the order of `openings`. The caller holds the
    subscriptions' row locks."""
    from usage.models import Bucket
    from usage.services import LotGrant, lots_grant

    if not openings:
        return []
    found = BillingPeriod.objects.filter(
        org_id__in={sub.org_id for sub, _ in openings}, start__in={start for _, start in openings}
    )
    periods = {(period.org_id, period.start): period for period in found}
    new = []
    for sub, start in openings:
        if (sub.org_id, start) not in periods:
            period = BillingPeriod(
                org_id=sub.org_id,
                start=start,
                plan=sub.plan,
                end=period_end_for(start=start, plan=sub.plan, anchor_day=sub.anchor_day),
                monthly_credits=sub.monthly_credits,
            )
            periods[sub.org_id, start] = period
            new.append(period)
    BillingPeriod.objects.bulk_create(new)
    opened = [periods[sub.org_id, start] for sub, start in openings]
    by_start = defaultdict(list)
    for (sub, start), period in zip(openings, opened, strict=True):
        sub.current_period = period
        by_start[start].append(sub.pk)
    for start, sub_ids in by_start.items():  # one statement per start (a chunk has a few at most)
        period_id = BillingPeriod.objects.filter(org_id=OuterRef("org_id"), start=start).values("pk")
        Subscription.objects.filter(pk__in=sub_ids).update(current_period=Subquery(period_id))
    lots_grant(
        grants=[
            LotGrant(
                org_id=sub.org_id,
                bucket=Bucket.PLAN,
                credits=period.monthly_credits,
                source=f"period:{period.pk}",
                expires_at=period.end,
                period=period,
                reason=f"{sub.plan.name} plan credits for the period from {start:%d %b %Y}",
            )
            for (sub, start), period in zip(openings, opened, strict=True)
            if period.monthly_credits
        ]
    )
    return opened


ROLL_CHUNK = 1_000  # subscriptions a period-close transaction takes at a time


def periods_roll(*, subscription_ids: Sequence[int], now: datetime, once: bool = False) -> int:
    """Closes the current period of each of these subscriptions that has ended by `now` and opens
    the next one, again while that one has ended too (unless `once`), and issues the period
    invoices, numbered in subscription order and then period order; returns the periods rolled.

    One transaction with set-based writes, whatever the number of subscriptions: the
    subscriptions are locked in pk order, then (by every credit write) their accounts in org
    order; a crash half-way leaves every period open, and a re-run does each roll once. While an
    upgrade is being paid for, the subscription's period waits for it (a later tick closes it):
    closing it under the payment would take the customer's money for a plan we then could not
    apply."""
    from usage.models import Bucket, CreditLot
    from usage.services import lots_expire

    with transaction.atomic():
        # No select_related: a join re-checked after the lock wait would drop the row if a plan
        # change committed meanwhile (PostgreSQL's EvalPlanQual); plans and periods load after.
        subs = list(Subscription.objects.select_for_update().filter(pk__in=subscription_ids).order_by("pk"))
        waiting = _upgrades_in_progress(subs)
        subs = [sub for sub in subs if sub.current_period_id is not None and sub.pk not in waiting]
        plans = Plan.objects.in_bulk()
        periods = BillingPeriod.objects.in_bulk([sub.current_period_id for sub in subs])
        for sub in subs:
            sub.plan = plans[sub.plan_id]
            sub.current_period = periods[sub.current_period_id]
            sub.current_period.plan = plans[sub.current_period.plan_id]
        due = [sub for sub in subs if sub.current_period.end <= now]
        rolls = []  # (subscription, opened, closed), for the invoices
        while due:
            closing = [sub.current_period for sub in due]
            plan_lots = CreditLot.objects.filter(
                period_id__in=[period.pk for period in closing], bucket=Bucket.PLAN
            )
            lots_expire(lots=plan_lots, reason="plan credits never roll over")
            BillingPeriod.objects.filter(pk__in=[period.pk for period in closing]).update(closed_at=now)
            for sub, period in zip(due, closing, strict=True):
                period.closed_at = now
                if sub.scheduled_plan_id is not None:  # a downgrade takes effect with the next period
                    sub.plan = plans[sub.scheduled_plan_id]
                    sub.scheduled_plan = None
                    sub.save(update_fields=["plan", "scheduled_plan"])  # in the audit log, as staff's
            opened = period_open(
                openings=[(sub, period.end) for sub, period in zip(due, closing, strict=True)]
            )
            rolls += zip(due, opened, closing, strict=True)
            due = [] if once else [sub for sub in due if sub.current_period.end <= now]
        rolls.sort(key=lambda roll: roll[0].pk)  # stable: each subscription's periods stay in order
        _period_invoices_issue(rolls)
    return len(rolls)


def period_roll(*, subscription_id: int, now: datetime) -> bool:
    """Closes the subscription's current period if it has ended by `now` and opens the next one
    (one period: `periods_roll` of one subscription, once); returns whether it did."""
    return periods_roll(subscription_ids=[subscription_id], now=now, once=True) == 1


def _period_invoices_issue(rolls: list[tuple[Subscription, BillingPeriod, BillingPeriod | None]]) -> None:
    from invoices.period_billing import period_invoices_issue

    period_invoices_issue(rolls=rolls)


def _due_in_chunks(due, now: datetime, *, once: bool) -> int:
    """Rolls the subscriptions of `due` (a queryset), ROLL_CHUNK at a time in pk order, each chunk
    one `periods_roll` transaction; returns the periods rolled."""
    rolled, after = 0, 0
    while ids := list(due.filter(pk__gt=after).order_by("pk").values_list("pk", flat=True)[:ROLL_CHUNK]):
        rolled += periods_roll(subscription_ids=ids, now=now, once=once)
        after = ids[-1]
    return rolled


def periods_roll_due(*, now: datetime) -> int:
    """Rolls every subscription whose period has ended, as many periods as `now` has passed, in
    subscription order, so the invoices one tick issues are numbered in a reproducible order."""
    return _due_in_chunks(Subscription.objects.filter(current_period__end__lte=now), now, once=False)


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
        (first,) = period_open(openings=[(sub, clock.midnight(today))])
        _period_invoices_issue([(sub, first, None)])  # staff-started paid plans: at once
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


@cache
def _api_key_lookup() -> tuple[str, tuple[Columns, ...]]:
    """The SQL and the column sets of `api_key_authenticate`, built once: the key with its
    organisation, subscription, plan and commitment (usage.Commitment: none until a first
    purchase), so the rate limit and every endpoint read them without another query."""
    commitment = Organisation._meta.get_field("commitment").related_model
    parts = (
        Columns(ApiKey, "k"),
        Columns(Organisation, "o"),
        Columns(Subscription, "s"),
        Columns(Plan, "p"),
        Columns(commitment, "c"),
    )
    sql = (
        f"SELECT {', '.join(part.sql for part in parts)} "  # noqa: S608 (our columns)
        "FROM accounts_apikey k "
        "JOIN accounts_organisation o ON o.id = k.org_id "
        "JOIN accounts_subscription s ON s.org_id = o.id "
        "JOIN accounts_plan p ON p.id = s.plan_id "
        f"LEFT JOIN {commitment._meta.db_table} c ON c.org_id = o.id "
        "WHERE k.prefix = %s AND k.revoked_at IS NULL"
    )
    return sql, parts


def api_key_authenticate(raw: str) -> ApiKey | None:
    """The active key for a secret, with its organisation's subscription, plan and commitment
    loaded; None if the secret is malformed, unknown or revoked. Hashes are compared in constant
    time. One hand-written query (on every API request the ORM's query building cost more than
    the query), which is also the request's connection health check (fetch_one_first_in_request);
    revocation takes effect at the next request. The last-used time is written at most once a
    minute."""
    match = _KEY_PATTERN.match(raw or "")
    if match is None:
        return None
    sql, parts = _api_key_lookup()
    row = fetch_one_first_in_request(sql, [match.group(1)])
    if row is None:
        return None
    key, org, sub, plan, commitment = load_joined(parts, row)  # commitment None: none yet
    if not hmac.compare_digest(key.key_hash, _hash(raw)):
        return None
    # What select_related("org__subscription__plan", "org__commitment") would have cached.
    ApiKey._meta.get_field("org").set_cached_value(key, org)
    Organisation._meta.get_field("subscription").set_cached_value(org, sub)
    Subscription._meta.get_field("org").set_cached_value(sub, org)
    Subscription._meta.get_field("plan").set_cached_value(sub, plan)
    Organisation._meta.get_field("commitment").set_cached_value(org, commitment)
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=now)  # other workers: once
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


# --- plan changes, the overage cap and "Contact sales" (DESIGN §4 Plans) ----------------------

UPGRADE = "upgrade"
DOWNGRADE = "downgrade"
MAX_OVERAGE_CAP_DOLLARS = 1_000_000


@dataclass(frozen=True)
class PlanChange:
    """What changing to `plan` would do, as of `today`: the confirmation page shows it and the
    services apply exactly it (the charge previewed is the charge made)."""

    kind: str  # UPGRADE (now, charged) or DOWNGRADE (at the end of the period)
    from_plan: Plan
    plan: Plan
    today: date
    charge_cents: int  # charged today (0 for a downgrade)
    remaining_days: int  # of the current period, today included (proration numerator)
    period_days: int  # of the current period (proration denominator)
    old_fee_cents: int
    new_fee_cents: int
    old_quota: int  # this period's quota before the change
    new_quota: int  # the monthly quota after it
    quota_increase: int  # credits added to this period's plan lot at once (paid upgrade)
    overage_absorbed: int  # this period's overage the increase absorbs (as of the preview)
    starts_new_period: bool  # an upgrade from Free starts a paid period today
    period_start: datetime  # the period the new plan runs in first
    period_end: datetime
    effective_on: date  # the day the new plan takes effect

    @property
    def is_upgrade(self) -> bool:
        return self.kind == UPGRADE

    @property
    def prorated(self) -> bool:
        return self.is_upgrade and not self.starts_new_period


def plan_change_kind(*, current: Plan, plan: Plan) -> str:
    """UPGRADE to a more expensive plan (now), DOWNGRADE to a cheaper or equal one (at period end)."""
    return UPGRADE if plan.price_cents > current.price_cents else DOWNGRADE


def plan_for_change(*, code: str) -> Plan:
    """A plan a customer may pick on the Plans page; 404 for unknown codes."""
    plan = Plan.objects.filter(code=code).first()
    if plan is None:
        raise BillingError("NOT_FOUND", f"There is no plan {code!r}.", 404)
    return plan


def plan_change_preview(*, sub: Subscription, plan: Plan, today: date) -> PlanChange:
    """The change from the subscription's plan to `plan`. Refuses (BillingError) the plan it is
    already on, contract plans (Enterprise: contact sales) and changes away from a contract."""
    current = sub.plan
    if plan.pk == current.pk:
        raise BillingError("SAME_PLAN", f"You are already on the {plan.name} plan.", 409)
    if plan.is_contract:
        raise BillingError(
            "CONTACT_SALES", f"{plan.name} is priced per contract: contact sales to move to it.", 400
        )
    if current.is_contract:
        raise BillingError(
            "CONTACT_SALES",
            f"Your {current.name} plan is a contract: contact sales to change it.",
            400,
        )
    period = BillingPeriod.objects.get(pk=sub.current_period_id)
    old_fee = sub.price_cents
    new_fee = plan.price_cents
    new_quota = (
        sub.monthly_credits_override if sub.monthly_credits_override is not None else plan.monthly_credits
    )
    period_days = (period.end - period.start).days
    remaining_days = (period.end.date() - today).days
    common = {
        "from_plan": current,
        "plan": plan,
        "today": today,
        "period_days": period_days,
        "old_fee_cents": old_fee,
        "new_fee_cents": new_fee,
        "old_quota": period.monthly_credits,
        "new_quota": new_quota,
    }
    if plan_change_kind(current=current, plan=plan) == DOWNGRADE:
        return PlanChange(
            kind=DOWNGRADE,
            charge_cents=0,
            remaining_days=max(remaining_days, 0),
            quota_increase=0,
            overage_absorbed=0,
            starts_new_period=False,
            period_start=period.end,
            period_end=period_end_for(start=period.end, plan=plan, anchor_day=sub.anchor_day),
            effective_on=period.end.date(),
            **common,
        )
    if period.end < clock.midnight(today):  # ended before today and not yet rolled by billing_tick
        raise _period_closing()
    if current.is_free:
        start = clock.midnight(today)
        return PlanChange(
            kind=UPGRADE,
            charge_cents=new_fee,
            remaining_days=remaining_days,
            quota_increase=0,
            overage_absorbed=0,
            starts_new_period=True,
            period_start=start,
            period_end=period_end_for(start=start, plan=plan, anchor_day=today.day),
            effective_on=today,
            **common,
        )
    if remaining_days <= 0:
        raise _period_closing()
    increase = max(new_quota - period.monthly_credits, 0)
    return PlanChange(
        kind=UPGRADE,
        charge_cents=max(prorate_cents(new_fee - old_fee, remaining_days, period_days), 0),
        remaining_days=remaining_days,
        quota_increase=increase,
        overage_absorbed=min(period.overage_credits, increase),
        starts_new_period=False,
        period_start=period.start,
        period_end=period.end,
        effective_on=today,
        **common,
    )


def _period_closing() -> BillingError:
    """An upgrade is priced on the current period, so it waits until billing_tick has rolled an
    ended one (a Free upgrade would otherwise start today, leaving the months between unopened)."""
    return BillingError(
        "PERIOD_CLOSING",
        "Your billing period has ended and is being renewed: try the upgrade again in a moment.",
        409,
    )


def _locked_subscription(org_id: int) -> Subscription:
    """The subscription, row-locked. No joins: after waiting for the lock, PostgreSQL re-checks a
    join against the old joined row, so a concurrent plan change would make the row vanish."""
    return Subscription.objects.select_for_update().get(org_id=org_id)


def _audit(*, actor: User | None, sub: Subscription, message: str) -> None:
    """Who changed what, in the subscription's admin history."""
    if actor is None:
        return
    from django.contrib.admin.models import CHANGE, LogEntry

    LogEntry.objects.log_actions(
        user_id=actor.pk, queryset=[sub], action_flag=CHANGE, change_message=message, single_object=True
    )


def _invoice_services():
    """The invoices app's payment services, or a clear 503 while they are not installed."""
    try:
        from invoices import services as invoice_services
    except ImportError:
        raise BillingError(
            "PAYMENTS_UNAVAILABLE", "Payments are not available right now; nothing was changed.", 503
        ) from None
    return invoice_services


def payment_card_on_file(*, org: Organisation) -> bool:
    """Whether the organisation has a card to charge (False while payments are unavailable)."""
    try:
        invoice_services = _invoice_services()
    except BillingError:
        return False
    return invoice_services.card_on_file(org=org)


UPGRADE_PAYMENT_WINDOW = timedelta(minutes=2)


def _upgrade_apply(*, sub: Subscription, change: PlanChange, actor: User | None, note: str) -> None:
    """The plan change an upgrade paid for. The caller holds the subscription's row lock."""
    from usage.models import Bucket, CreditLot
    from usage.services import lot_grant, lots_expire, overage_absorb

    org_id = sub.org_id
    plan = change.plan
    period = BillingPeriod.objects.get(pk=sub.current_period_id)
    sub.plan = plan
    sub.scheduled_plan = None
    sub.upgrade_pending_since = None
    if change.starts_new_period:  # from Free: a paid period starts today, today is the anchor
        free_lots = CreditLot.objects.filter(org_id=org_id, period=period, bucket=Bucket.PLAN)
        lots_expire(lots=free_lots, reason=f"Free credits end: upgraded to {plan.name}")
        sub.anchor_day = change.today.day
        sub.save(update_fields=["plan", "scheduled_plan", "upgrade_pending_since", "anchor_day"])
        if period.start == change.period_start:  # the Free period began today: it becomes the paid one
            period.plan = plan
            period.end = change.period_end
            period.monthly_credits = sub.monthly_credits
            period.save(update_fields=["plan", "end", "monthly_credits"])
            lot_grant(
                org_id=org_id,
                bucket=Bucket.PLAN,
                credits=period.monthly_credits,
                source=f"upgrade:{period.pk}:{plan.code}",
                expires_at=period.end,
                period=period,
                reason=f"{plan.name} plan credits for the period from {period.start:%d %b %Y}",
                actor=actor,
            )
        else:
            period.end = min(period.end, change.period_start)  # ends now, or already ended
            period.closed_at = clock.now()
            period.save(update_fields=["end", "closed_at"])
            period_open(openings=[(sub, change.period_start)])
    else:  # between paid plans: this period's plan credits grow at once and absorb its overage
        sub.save(update_fields=["plan", "scheduled_plan", "upgrade_pending_since"])
        if change.quota_increase:
            lot = lot_grant(
                org_id=org_id,
                bucket=Bucket.PLAN,
                credits=change.quota_increase,
                source=f"upgrade:{period.pk}:{plan.code}",
                expires_at=period.end,
                period=period,
                reason=f"Upgrade to {plan.name}: this period's plan credits rise to {change.new_quota:,}",
                actor=actor,
            )
            overage_absorb(
                org_id=org_id,
                period_id=period.pk,
                lot_id=lot.pk,
                reason=f"overage absorbed by the upgrade to {plan.name}",
                actor=actor,
            )
        BillingPeriod.objects.filter(pk=period.pk).update(
            plan=plan, monthly_credits=F("monthly_credits") + change.quota_increase
        )
    _audit(actor=actor, sub=sub, message=note)


def upgrade_fulfil(invoice) -> None:
    """The paid-handler of upgrade invoices: applies the upgrade `invoice.fulfilment` describes, in
    the transaction that marks the invoice paid (from `purchase_charge`, or from the payments
    reconciler after a crash). If the subscription changed meanwhile nothing is applied and the
    error is logged for staff to refund: raising here would leave a charge unsettled forever."""
    data = (invoice.fulfilment or {}).get("upgrade") or {}
    with transaction.atomic():
        sub = _locked_subscription(invoice.org_id)
        plan = Plan.objects.filter(code=data.get("plan")).first()
        refusal = None
        if (
            plan is None
            or sub.plan.code != data.get("from_plan")
            or sub.current_period_id != data.get("period_id")
        ):
            refusal = "the subscription changed while the upgrade was being paid for"
        else:
            try:
                change = plan_change_preview(sub=sub, plan=plan, today=date.fromisoformat(data["today"]))
            except BillingError as error:
                refusal = error.message
            else:
                if change.charge_cents != data.get("charge_cents"):
                    refusal = f"the charge would now be {_usd(change.charge_cents)}"
        if refusal is not None:
            sub.upgrade_pending_since = None
            sub.save(update_fields=["upgrade_pending_since"])
            logger.error(
                "Invoice %s paid for an upgrade that was not applied (%s): refund it.", invoice, refusal
            )
            return
        actor = User.objects.filter(pk=data.get("actor_id")).first()
        _upgrade_apply(sub=sub, change=change, actor=actor, note=data.get("note", ""))


def _upgrades_in_progress(subs: Sequence[Subscription]) -> set[int]:
    """The subscriptions (pks) among `subs` with an upgrade being paid for: one started less than
    the payment window ago, or whose payment is still open (a Draft upgrade invoice)."""
    pending = [sub for sub in subs if sub.upgrade_pending_since is not None]
    if not pending:
        return set()
    window_start = timezone.now() - UPGRADE_PAYMENT_WINDOW
    waiting = {sub.pk for sub in pending if sub.upgrade_pending_since > window_start}
    older = [sub for sub in pending if sub.pk not in waiting]
    if not older:
        return waiting
    try:
        from invoices.models import Invoice, InvoiceKind, InvoiceStatus
    except ImportError:
        return waiting
    paying = set(
        Invoice.objects.filter(
            org_id__in=[sub.org_id for sub in older], kind=InvoiceKind.UPGRADE, status=InvoiceStatus.DRAFT
        ).values_list("org_id", flat=True)
    )
    return waiting | {sub.pk for sub in older if sub.org_id in paying}


def _upgrade_in_progress(sub: Subscription) -> bool:
    """Another upgrade of this subscription is being paid for (see `_upgrades_in_progress`)."""
    return sub.pk in _upgrades_in_progress([sub])


def _upgrade_release(*, org_id: int) -> None:
    """After a refused or failed charge: lets the next upgrade start, unless a payment is still
    open (pending at the bank, or Stripe unreachable: the reconciler finishes it)."""
    with transaction.atomic():
        sub = _locked_subscription(org_id)
        if sub.upgrade_pending_since is None:
            return
        sub.upgrade_pending_since = timezone.now() - UPGRADE_PAYMENT_WINDOW  # ends the window
        if not _upgrade_in_progress(sub):
            sub.upgrade_pending_since = None
        Subscription.objects.filter(pk=sub.pk).update(upgrade_pending_since=sub.upgrade_pending_since)


def subscription_upgrade(
    *, org: Organisation, plan_code: str, actor: User | None, expected_charge_cents: int | None = None
) -> PlanChange:
    """Moves the organisation to a more expensive plan now, charging its default card today's
    prorated fee (the full first fee from Free) through `invoices.services.purchase_charge`,
    called outside any transaction as it requires. Nothing changes unless the charge succeeds:
    the plan change runs in `upgrade_fulfil`, in the transaction that marks the invoice paid. A
    second upgrade cannot start while one is being paid for. Refusals raise BillingError."""
    invoice_services = _invoice_services()
    plan = plan_for_change(code=plan_code)
    with transaction.atomic():
        sub = _locked_subscription(org.pk)
        change = plan_change_preview(sub=sub, plan=plan, today=clock.today())
        if not change.is_upgrade:
            raise invalid(f"{plan.name} costs less than {change.from_plan.name}: that is a downgrade.")
        if expected_charge_cents is not None and expected_charge_cents != change.charge_cents:
            raise BillingError(
                "CHARGE_CHANGED",
                f"Today's charge is now {_usd(change.charge_cents)} (a new day began since you "
                "opened the page); check it and confirm again. Nothing was changed.",
                409,
            )
        if not invoice_services.card_on_file(org=org):
            raise BillingError(
                "NO_CARD", "Add a card in Payment methods before upgrading; nothing was changed.", 402
            )
        if _upgrade_in_progress(sub):
            raise BillingError(
                "UPGRADE_IN_PROGRESS",
                "An upgrade is already being paid for; reload Plans in a minute to see it.",
                409,
            )
        sub.upgrade_pending_since = timezone.now()
        sub.save(update_fields=["upgrade_pending_since"])
    who = actor.email if actor is not None else "staff"
    note = (
        f"Upgraded from {change.from_plan.name} to {plan.name} by {who}; charged {_usd(change.charge_cents)}."
    )
    if change.charge_cents == 0:  # e.g. a staff price override: nothing to charge
        with transaction.atomic():
            _upgrade_apply(sub=_locked_subscription(org.pk), change=change, actor=actor, note=note)
        return change
    if change.starts_new_period:
        description = f"{plan.name} plan, {change.period_start:%d %b %Y} to {change.period_end:%d %b %Y}"
    else:
        description = (
            f"Upgrade from {change.from_plan.name} to {plan.name}, prorated: "
            f"{change.remaining_days} of {change.period_days} days"
        )
    fulfilment = {
        "upgrade": {
            "plan": plan.code,
            "from_plan": change.from_plan.code,
            "period_id": sub.current_period_id,
            "today": change.today.isoformat(),
            "charge_cents": change.charge_cents,
            "actor_id": actor.pk if actor is not None else None,
            "note": note,
        }
    }
    try:
        invoice_services.purchase_charge(
            org=org,
            lines=[
                invoice_services.LineSpec(description=description, quantity=1, unit_cents=change.charge_cents)
            ],
            description=f"Upgrade to {plan.name}",
            on_paid=upgrade_fulfil,
            kind="upgrade",
            fulfilment=fulfilment,
        )
    except BillingError:  # declined (the draft is void), no card, Stripe away, pending at the bank
        _upgrade_release(org_id=org.pk)
        raise
    if not Subscription.objects.filter(org_id=org.pk, plan=plan).exists():
        raise BillingError(
            "UPGRADE_NOT_APPLIED",
            "Your card was charged but the plan could not be changed: our staff have been told and "
            "will put it right or refund you.",
            500,
        )
    return change


def _usd(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


def subscription_downgrade_schedule(*, org: Organisation, plan_code: str, actor: User | None) -> PlanChange:
    """Schedules a move to a cheaper plan (or Free) for the end of the current period; until then
    the plan, its credits and its limits stay. Replaces a downgrade already scheduled."""
    plan = plan_for_change(code=plan_code)
    with transaction.atomic():
        sub = _locked_subscription(org.pk)
        change = plan_change_preview(sub=sub, plan=plan, today=clock.today())
        if change.is_upgrade:
            raise invalid(f"{plan.name} costs more than {change.from_plan.name}: that is an upgrade.")
        sub.scheduled_plan = plan
        sub.save(update_fields=["scheduled_plan"])
        who = actor.email if actor is not None else "staff"
        _audit(
            actor=actor,
            sub=sub,
            message=f"Downgrade from {change.from_plan.name} to {plan.name} on "
            f"{change.effective_on:%d %b %Y} scheduled by {who}.",
        )
    return change


def subscription_downgrade_cancel(*, org: Organisation, actor: User | None) -> Plan | None:
    """Cancels the scheduled downgrade; returns the plan it would have moved to (None: there was
    none, and nothing changes)."""
    with transaction.atomic():
        sub = _locked_subscription(org.pk)
        scheduled = sub.scheduled_plan
        if scheduled is None:
            return None
        sub.scheduled_plan = None
        sub.save(update_fields=["scheduled_plan"])
        who = actor.email if actor is not None else "staff"
        _audit(actor=actor, sub=sub, message=f"Downgrade to {scheduled.name} cancelled by {who}.")
    return scheduled


def overage_cap_set(*, org: Organisation, cap_cents: int | None, actor: User | None) -> Subscription:
    """Sets the monthly overage cap (None: no cap), a whole number of dollars up to $1,000,000."""
    if cap_cents is not None and (
        cap_cents < 0 or cap_cents % 100 or cap_cents > MAX_OVERAGE_CAP_DOLLARS * 100
    ):
        raise invalid(f"The cap is a whole number of dollars from 0 to {MAX_OVERAGE_CAP_DOLLARS:,}, or none.")
    with transaction.atomic():
        sub = _locked_subscription(org.pk)
        if sub.overage_rate is None:
            raise invalid(f"Your {sub.plan.name} plan has no overage, so it has no overage cap.")
        before = sub.overage_cap_cents
        if before != cap_cents:
            sub.overage_cap_cents = cap_cents
            sub.save(update_fields=["overage_cap_cents"])
            shown = "none" if cap_cents is None else f"{_usd(cap_cents)} a month"
            who = actor.email if actor is not None else "staff"
            _audit(actor=actor, sub=sub, message=f"Overage cap set to {shown} by {who}.")
    return sub


def downgrades_apply_due(*, now: datetime) -> int:
    """Closes the ended period of each subscription with a scheduled downgrade; `periods_roll`
    moves it to the scheduled plan before it opens the next period (later periods a jump passes
    are left to `periods_roll_due`). Returns how many moved. A re-run finds none, so this is
    idempotent like the roll itself."""
    due = Subscription.objects.filter(scheduled_plan__isnull=False, current_period__end__lte=now)
    return _due_in_chunks(due, now, once=True)


def contact_request_create(
    *,
    org: Organisation | None,
    user: User | None,
    name: str,
    email: str,
    company_size: str,
    message: str,
) -> ContactRequest:
    """Records an Enterprise enquiry (staff see it in admin) and e-mails it to STAFF_EMAIL. A
    failed e-mail is logged; the record stays, unhandled, for staff to find."""
    with transaction.atomic():
        enquiry = ContactRequest.objects.create(
            org=org,
            user=user,
            name=name.strip(),
            email=email.strip(),
            company_size=company_size,
            message=message,
        )
    body = "\n".join(
        [
            f"Name: {enquiry.name}",
            f"E-mail: {enquiry.email}",
            f"Company size: {enquiry.get_company_size_display()}",
            f"Organisation: {org.name} (id {org.pk}), on {org.subscription.plan.name}"
            if org
            else "Organisation: —",
            f"Signed in as: {user.email}" if user else "Signed in as: —",
            "",
            enquiry.message,
        ]
    )
    try:
        send_mail(
            subject=f"Contact sales: {enquiry.name}" + (f" ({org.name})" if org else ""),
            message=body,
            from_email=None,
            recipient_list=[settings.STAFF_EMAIL],
        )
    except (OSError, smtplib.SMTPException):
        logger.exception("Could not e-mail contact request %s to staff", enquiry.pk)
    return enquiry


def upgrade_handler_register() -> None:
    """Tells the payments app how to finish a paid upgrade (its reconciler calls the handler when
    a request died after Stripe charged). Called by AccountsConfig.ready()."""
    from invoices import services as invoice_services

    invoice_services.on_paid_register("upgrade", upgrade_fulfil)
