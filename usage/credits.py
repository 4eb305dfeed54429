"""Prepaid credits (DESIGN §2–§5): packs, commitment tiers and their bonus, purchases, refunds and
auto-recharge. Every write here is keyword-only and atomic, and takes the organisation's lock (its
CreditAccount row) before it reads what it decides on.

How a purchase happens exactly once:
1. A `CreditPurchase` is committed as Processing before any card is charged. It is unique per
   organisation and `key` (the pack form's token, so a double click or a retried POST finds the
   first one); for recharges a partial unique constraint allows at most one in flight per
   organisation, and the monthly cap is checked under the lock, so concurrent triggers cannot
   both pass it.
2. `invoices.services.purchase_charge` charges a Draft invoice whose `fulfilment` names the
   purchase and what it buys.
3. `purchase_fulfil(invoice)`, the paid-handler for purchase invoices, runs in the payment's
   transaction (in the request, or in the reconciler after a crash) and grants the purchased lot
   and the tier's bonus lot; their sources (`invoice:<id>`, `invoice:<id>:bonus`) make a second
   call add nothing. Credits are never granted for an unpaid purchase.
A purchase whose request died half-way is settled from its invoice by `purchases_settle_stale`
(billing_tick).

Commitment tiers: the paid purchases of a commitment period (a UTC calendar month; a yearly term:
the 12 months from its first purchase, thresholds × 12) give the tier; the purchase that reaches a
tier already gets its bonus (floor of credits × rate, in the bonus bucket, expiring at the end of
the period) and its RPM (Subscription.rpm reads `Commitment.rpm`).
"""

import calendar
import logging
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Sum

from accounts import clock
from accounts.models import Membership, Organisation, Role, User
from billing_site.errors import BillingError, invalid, not_found
from invoices import services as invoice_services
from invoices import stripe_gateway
from invoices.models import AttemptStatus, Invoice, InvoiceKind, InvoiceStatus
from usage.models import (
    CREDITS_PER_DOLLAR,
    MAX_PACKS_PER_RECHARGE,
    MAX_RECHARGE_THRESHOLD,
    RECHARGE_KINDS,
    RECHARGE_RETRY_DAYS,
    REFUND_DAYS,
    TIER_RULES,
    Bucket,
    Commitment,
    CommitmentPeriod,
    CommitmentTerm,
    CreditAccount,
    CreditLot,
    CreditPack,
    CreditPurchase,
    EntryKind,
    LedgerEntry,
    PurchaseKind,
    PurchaseStatus,
    RechargeFrequency,
    RechargeKind,
    RechargeSetting,
    Tier,
    TierRule,
    bonus_for,
    tier_for,
    tier_rule,
)
from usage.services import _lock_account, lot_grant, lots_expire

log = logging.getLogger(__name__)

FULFILMENT_TYPE = "credits"
STALE_AFTER = timedelta(minutes=5)  # a Processing purchase older than this is settled from its invoice
MAX_SCHEDULED_DOLLARS = 100_000


def _usd(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


def _add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later (the day falls to the month's last when it has fewer)."""
    total = moment.month - 1 + months
    year, month = moment.year + total // 12, total % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def _month_start(moment: datetime) -> datetime:
    return clock.midnight(moment.date().replace(day=1))


# --- commitment periods and tiers ------------------------------------------------------------


def _commitment_locked(org_id: int) -> Commitment:
    """The organisation's Commitment row, made on first use (the caller holds the org lock)."""
    commitment, _ = Commitment.objects.get_or_create(org_id=org_id)
    return commitment


def _open_period(org_id: int, now: datetime) -> CommitmentPeriod | None:
    return (
        CommitmentPeriod.objects.filter(org_id=org_id, start__lte=now, end__gt=now).order_by("-start").first()
    )


def _new_period_window(org_id: int, term: str, now: datetime) -> tuple[datetime, datetime]:
    """Where a commitment period opened at `now` would run: the UTC month (from the end of an
    earlier period that ran into it), or 12 months from today's midnight for a yearly term."""
    if term == CommitmentTerm.YEARLY:
        start = clock.midnight(now.date())
        return start, _add_months(start, 12)
    start = _month_start(now)
    end = _add_months(start, 1)
    last_end = CommitmentPeriod.objects.filter(org_id=org_id, end__lte=now).aggregate(m=Max("end"))["m"]
    if last_end is not None and last_end > start:
        start = last_end
    return start, end


def _period_for_purchase(org_id: int, commitment: Commitment, now: datetime) -> CommitmentPeriod:
    period = _open_period(org_id, now)
    if period is None:
        start, end = _new_period_window(org_id, commitment.term, now)
        period = CommitmentPeriod.objects.create(org_id=org_id, term=commitment.term, start=start, end=end)
    return period


def _tier_refresh(org_id: int, now: datetime) -> str:
    """Sets the organisation's automatic tier to the one of the period open at `now` (none when
    none is open). The caller holds the org lock. Returns the tier."""
    period = _open_period(org_id, now)
    tier = period.tier if period is not None else Tier.NONE
    Commitment.objects.filter(org_id=org_id).exclude(tier=tier).update(tier=tier)
    return tier


@dataclass(frozen=True)
class CommitmentStatus:
    term: str
    tier: str  # the effective tier (a staff override wins)
    automatic_tier: str
    overridden: bool
    rule: TierRule | None
    period_start: datetime | None  # None: a yearly term whose period starts with the next purchase
    period_end: datetime | None
    purchased_cents: int
    next_rule: TierRule | None
    cents_to_next: int
    rpm: int

    @property
    def tier_label(self) -> str:
        return Tier(self.tier).label

    @property
    def term_label(self) -> str:
        return CommitmentTerm(self.term).label

    @property
    def next_threshold_cents(self) -> int:
        return self.next_rule.threshold_cents(self.term) if self.next_rule else 0

    @property
    def ladder(self) -> list[dict]:
        return [
            {
                "rule": rule,
                "threshold_cents": rule.threshold_cents(self.term),
                "current": rule.tier == self.tier,
            }
            for rule in TIER_RULES
        ]


def commitment_status(*, org_id: int, now: datetime | None = None) -> CommitmentStatus:
    """The tier, what was bought this commitment period and what more reaches the next tier."""
    now = now or clock.now()
    commitment = Commitment.objects.filter(org_id=org_id).first() or Commitment(org_id=org_id)
    period = _open_period(org_id, now)
    if period is not None:
        term, start, end, purchased = period.term, period.start, period.end, period.purchased_cents
    else:
        term, purchased = commitment.term, 0
        start, end = (None, None) if term == CommitmentTerm.YEARLY else _new_period_window(org_id, term, now)
    automatic = tier_for(purchased_cents=purchased, term=term)
    effective = commitment.override_tier or automatic
    next_rule = next((r for r in TIER_RULES if r.threshold_cents(term) > purchased), None)
    rule = tier_rule(effective)
    return CommitmentStatus(
        term=term,
        tier=effective,
        automatic_tier=automatic,
        overridden=bool(commitment.override_tier),
        rule=rule,
        period_start=start,
        period_end=end,
        purchased_cents=purchased,
        next_rule=next_rule,
        cents_to_next=next_rule.threshold_cents(term) - purchased if next_rule else 0,
        rpm=rule.rpm if rule else 0,
    )


@dataclass(frozen=True)
class PurchasePreview:
    """What buying `credits` for `amount_cents` now would bring (DESIGN §4: the preview)."""

    amount_cents: int
    credits: int
    quantity: int
    tier_before: str
    tier_after: str
    bonus_credits: int
    bonus_percent: int
    bonus_expires_at: datetime | None
    rpm_after: int
    purchased_after_cents: int

    @property
    def reaches_tier(self) -> bool:
        return self.tier_after != self.tier_before

    @property
    def tier_after_label(self) -> str:
        return Tier(self.tier_after).label

    @property
    def total_credits(self) -> int:
        return self.credits + self.bonus_credits


def purchase_preview(
    *, org_id: int, amount_cents: int, credits: int, quantity: int = 1, now: datetime | None = None
) -> PurchasePreview:
    now = now or clock.now()
    status = commitment_status(org_id=org_id, now=now)
    after = status.purchased_cents + amount_cents
    automatic_after = tier_for(purchased_cents=after, term=status.term)
    commitment = Commitment.objects.filter(org_id=org_id).first()
    tier_after = (commitment.override_tier if commitment else "") or automatic_after
    rule = tier_rule(tier_after)
    expires = status.period_end
    if expires is None:  # yearly: the period would start with this purchase
        expires = _add_months(clock.midnight(now.date()), 12)
    return PurchasePreview(
        amount_cents=amount_cents,
        credits=credits,
        quantity=quantity,
        tier_before=status.tier,
        tier_after=tier_after,
        bonus_credits=bonus_for(credits=credits, tier=tier_after),
        bonus_percent=rule.bonus_percent if rule else 0,
        bonus_expires_at=expires,
        rpm_after=rule.rpm if rule else 0,
        purchased_after_cents=after,
    )


def commitment_override(*, org_id: int, tier: str, reason: str, actor: User | None) -> Commitment:
    """Staff set the tier by hand (or clear the override with tier ""), with a reason."""
    if tier and tier not in Tier.values:
        raise invalid(f"Unknown tier {tier!r}.")
    reason = (reason or "").strip()
    if not reason:
        raise invalid("Give a reason for the tier override.")
    with transaction.atomic():
        _lock_account(org_id)
        commitment = _commitment_locked(org_id)
        commitment.override_tier = tier
        commitment.override_reason = reason[:300]
        commitment.override_by = actor
        commitment.override_at = clock.now()
        commitment.save()
    return commitment


def commitment_term_set(*, org_id: int, term: str, actor: User | None = None) -> Commitment:
    """Monthly or yearly; it applies from the next commitment period (the open one keeps its own)."""
    if term not in CommitmentTerm.values:
        raise invalid(f"Unknown commitment term {term!r}.")
    with transaction.atomic():
        _lock_account(org_id)
        commitment = _commitment_locked(org_id)
        commitment.term = term
        commitment.save(update_fields=["term", "updated_at"])
    return commitment


def commitment_periods_close(*, now: datetime) -> int:
    """billing_tick: ends every commitment period whose end has passed: its bonus credits expire
    and the tier becomes that of the period open now (none until the next purchase). Idempotent
    per (organisation, period). Returns the periods closed."""
    closed = 0
    due = CommitmentPeriod.objects.filter(closed_at__isnull=True, end__lte=now).values_list("pk", "org_id")
    for period_id, org_id in list(due):
        with transaction.atomic():
            _lock_account(org_id)
            period = CommitmentPeriod.objects.select_for_update().get(pk=period_id)
            if period.closed_at is not None:
                continue
            bonus_lots = CreditLot.objects.filter(
                pk__in=period.purchases.exclude(bonus_lot=None).values("bonus_lot"), expired_at__isnull=True
            )
            lots_expire(
                lots=bonus_lots,
                reason=f"Bonus credits of the commitment period {period.start:%d %b %Y} to {period.end:%d %b %Y} end",
            )
            period.closed_at = now
            period.save(update_fields=["closed_at"])
            _tier_refresh(org_id, now)
        closed += 1
    return closed


# --- packs -----------------------------------------------------------------------------------


def packs_active() -> list[CreditPack]:
    return list(CreditPack.objects.filter(active=True))


def _pack_line(pack: CreditPack) -> str:
    return f"Credit pack: {pack.credits:,} credits (never expire)"


# --- purchases: reserve, pay, fulfil, settle -------------------------------------------------


def _fulfilment(purchase: CreditPurchase) -> dict:
    return {
        "type": FULFILMENT_TYPE,
        "purchase_id": purchase.pk,
        "kind": purchase.kind,
        "credits": purchase.credits,
        "amount_cents": purchase.amount_cents,
    }


def _purchase_lines(purchase: CreditPurchase) -> tuple[list, str]:
    if purchase.kind == PurchaseKind.SCHEDULE:
        line = invoice_services.LineSpec(
            description=f"Scheduled recharge ({purchase.occurrence}): {purchase.credits:,} credits (never expire)",
            quantity=1,
            unit_cents=purchase.amount_cents,
        )
        return [line], f"Scheduled auto-recharge: {purchase.credits:,} credits"
    pack = purchase.pack
    line = invoice_services.LineSpec(
        description=_pack_line(pack), quantity=purchase.quantity, unit_cents=pack.price_cents
    )
    if purchase.kind == PurchaseKind.THRESHOLD:
        return [line], f"Auto-recharge: {purchase.quantity} × {pack.price_label} pack"
    return [line], f"Credits: {pack.price_label} pack"


def purchase_fulfil(invoice: Invoice) -> None:
    """The paid-handler of purchase invoices: grants what the purchase bought, once. Runs in the
    transaction that marks the invoice paid; reads everything from `invoice.fulfilment`."""
    data = invoice.fulfilment or {}
    if data.get("type") != FULFILMENT_TYPE or not data.get("purchase_id"):
        log.error("Invoice %s was paid, but its fulfilment names no credit purchase: %r", invoice, data)
        return
    org_id = invoice.org_id
    credits = int(data["credits"])
    amount = int(data["amount_cents"])
    now = clock.now()
    with transaction.atomic():
        _lock_account(org_id)
        purchase = CreditPurchase.objects.select_for_update().get(pk=data["purchase_id"], org_id=org_id)
        if purchase.lot_id is not None:  # granted already
            return
        if purchase.status != PurchaseStatus.PENDING:
            log.warning(
                "Purchase %s was %s but its invoice %s is paid: granting it",
                purchase.pk,
                purchase.status,
                invoice,
            )
        commitment = _commitment_locked(org_id)
        period = _period_for_purchase(org_id, commitment, now)
        purchased = period.purchased_cents + amount
        automatic = tier_for(purchased_cents=purchased, term=period.term)
        tier = commitment.override_tier or automatic
        bonus = bonus_for(credits=credits, tier=tier)
        what = f"{purchase.get_kind_display().lower()}, invoice {invoice.number or invoice.pk}"
        lot = lot_grant(
            org_id=org_id,
            bucket=Bucket.PURCHASED,
            credits=credits,
            source=f"invoice:{invoice.pk}",
            reason=f"Purchased credits ({what})",
            actor=purchase.created_by,
        )
        bonus_lot = None
        if bonus:
            bonus_lot = lot_grant(
                org_id=org_id,
                bucket=Bucket.BONUS,
                credits=bonus,
                source=f"invoice:{invoice.pk}:bonus",
                expires_at=period.end,
                reason=f"{Tier(tier).label} bonus (+{tier_rule(tier).bonus_percent}%) on {what}",
                actor=purchase.created_by,
            )
        CommitmentPeriod.objects.filter(pk=period.pk).update(purchased_cents=purchased, tier=automatic)
        period.tier = automatic
        Commitment.objects.filter(org_id=org_id).update(tier=automatic)
        purchase.status = PurchaseStatus.PAID
        purchase.invoice = invoice
        purchase.commitment_period = period
        purchase.lot = lot
        purchase.bonus_lot = bonus_lot
        purchase.bonus_credits = bonus
        purchase.tier = tier
        purchase.message = ""
        purchase.paid_at = now
        purchase.finished_at = now
        purchase.save()
        if purchase.is_recharge:
            RechargeSetting.objects.filter(org_id=org_id).update(
                failures=0, first_failed_at=None, next_try_at=None, last_problem="", last_problem_at=None
            )


invoice_services.on_paid_register(InvoiceKind.PURCHASE, purchase_fulfil)


def _purchase_reserve(**fields) -> CreditPurchase | None:
    """Commits-to-be a Processing purchase (the caller holds the org lock); None when its key is
    taken or, for a recharge, another one is in flight (the database says so)."""
    try:
        with transaction.atomic():
            return CreditPurchase.objects.create(
                status=PurchaseStatus.PENDING, created_at=clock.now(), **fields
            )
    except IntegrityError:
        return None


def _purchase_invoice(purchase: CreditPurchase) -> Invoice | None:
    if purchase.invoice_id:
        return purchase.invoice
    return (
        Invoice.objects.filter(org_id=purchase.org_id, fulfilment__purchase_id=purchase.pk)
        .order_by("-pk")
        .first()
    )


def _purchase_settle(
    purchase_id: int, fallback: str, *, declined: bool = False, interrupted: bool = False
) -> CreditPurchase:
    """Finishes a Processing purchase from what became of its invoice: paid → granted (if the
    handler did not run), void or never made → declined or failed; a payment still pending at
    Stripe leaves it Processing for later. `interrupted`: the request or worker that made it died;
    unless the bank declined the card, that is our failure, not the card's, so a recharge does not
    back off (the tick's next step starts it again)."""
    purchase = CreditPurchase.objects.get(pk=purchase_id)
    if purchase.status != PurchaseStatus.PENDING:
        return purchase
    invoice = _purchase_invoice(purchase)
    if invoice is not None and invoice.status in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED):
        purchase_fulfil(invoice)
        return CreditPurchase.objects.get(pk=purchase_id)
    if invoice is not None and invoice.attempts.filter(status=AttemptStatus.PENDING).exists():
        return purchase
    message = fallback
    if invoice is not None:
        attempt = invoice.attempts.order_by("-number").first()
        if attempt is not None and attempt.error_message:
            message = attempt.error_message
            declined = declined or bool(attempt.stripe_payment_intent_id)
    if invoice is not None and invoice.status not in (InvoiceStatus.VOID, InvoiceStatus.DRAFT):
        return purchase  # issued, unpaid: not ours to decide (the invoices app dunning owns it)
    return _purchase_unsuccessful(
        purchase_id, message, declined=declined, back_off=declined or not interrupted
    )


def _purchase_unsuccessful(
    purchase_id: int, message: str, *, declined: bool, back_off: bool = True
) -> CreditPurchase:
    now = clock.now()
    org_id = CreditPurchase.objects.values_list("org_id", flat=True).get(pk=purchase_id)
    with transaction.atomic():
        _lock_account(org_id)  # always the org lock first, then the purchase
        purchase = CreditPurchase.objects.select_for_update().get(pk=purchase_id)
        if purchase.status != PurchaseStatus.PENDING:
            return purchase
        purchase.status = PurchaseStatus.DECLINED if declined else PurchaseStatus.FAILED
        purchase.message = (message or "The payment did not go through.")[:300]
        purchase.finished_at = now
        purchase.save(update_fields=["status", "message", "finished_at"])
        if purchase.is_recharge and back_off:
            _recharge_back_off(purchase.org_id, purchase.message, now)
    return purchase


def _purchase_pay(purchase: CreditPurchase) -> CreditPurchase:
    """Charges a reserved purchase (outside any transaction: the invoices app commits its
    attempt before calling Stripe) and returns it as it ended: Paid, Declined, Failed, or still
    Processing when Stripe has not answered."""
    org = Organisation.objects.get(pk=purchase.org_id)
    lines, description = _purchase_lines(purchase)
    try:
        invoice_services.purchase_charge(
            org=org,
            lines=lines,
            description=description,
            on_paid=purchase_fulfil,
            kind=InvoiceKind.PURCHASE,
            fulfilment=_fulfilment(purchase),
        )
    except invoice_services.PaymentDeclined as error:
        return _purchase_settle(purchase.pk, error.message, declined=True)
    except BillingError as error:
        return _purchase_settle(purchase.pk, error.message)
    return _purchase_settle(purchase.pk, "The payment did not go through.")


def _check_token(token: str) -> str:
    token = (token or "").strip()
    if not token or len(token) > 64 or not token.replace("-", "").isalnum():
        raise invalid("This form has expired: reload the page and try again. Nothing was charged.")
    return token


def pack_purchase(
    *, org: Organisation, pack_id: int, token: str, agreed_to_refund_policy: bool, actor: User | None
) -> tuple[CreditPurchase, bool]:
    """Buys one pack with the default card. Returns (purchase, first): `first` is False when this
    form (its token) was already submitted, in which case nothing more is charged. Without the
    refund-policy tick, or a card, nothing is charged."""
    if not agreed_to_refund_policy:
        raise BillingError(
            "REFUND_POLICY", "Tick that you agree to the refund policy; nothing was charged.", 400
        )
    token = _check_token(token)
    pack = CreditPack.objects.filter(pk=pack_id, active=True).first()
    if pack is None:
        raise not_found("That pack is no longer offered; choose another. Nothing was charged.")
    key = f"pack:{token}"
    existing = CreditPurchase.objects.filter(org=org, key=key).first()
    if existing is not None:
        return existing, False
    if not invoice_services.card_on_file(org=org):
        raise invoice_services.no_card()
    with transaction.atomic():
        _lock_account(org.pk)
        purchase = _purchase_reserve(
            org=org,
            kind=PurchaseKind.PACK,
            key=key,
            pack=pack,
            quantity=1,
            amount_cents=pack.price_cents,
            credits=pack.credits,
            created_by=actor,
        )
    if purchase is None:  # the same form, submitted twice at once
        return CreditPurchase.objects.get(org=org, key=key), False
    return _purchase_pay(purchase), True


def purchases_settle_stale(*, now: datetime) -> int:
    """billing_tick: settles purchases left Processing by a request or worker that died, from
    their invoices, and finishes refunds whose Stripe call did not answer. Returns how many."""
    settled = 0
    stale = CreditPurchase.objects.filter(status=PurchaseStatus.PENDING, created_at__lte=now - STALE_AFTER)
    for purchase_id in list(stale.values_list("pk", flat=True)):
        purchase = _purchase_settle(
            purchase_id, "Interrupted before the card was charged: nothing was paid.", interrupted=True
        )
        settled += purchase.status != PurchaseStatus.PENDING
    refunds = CreditPurchase.objects.filter(
        refund_requested_at__isnull=False,
        refunded_at__isnull=True,
        refund_requested_at__lte=now - STALE_AFTER,
    )
    for purchase in list(refunds):
        try:
            _refund_at_stripe(purchase)
        except BillingError as error:
            log.warning("Refund of purchase %s still not done: %s", purchase.pk, error.message)
        else:
            settled += 1
    return settled


# --- refunds ---------------------------------------------------------------------------------


def refund_refusal(
    purchase: CreditPurchase, *, now: datetime | None = None, staff: bool = False
) -> str | None:
    """Why this purchase cannot be refunded now, or None if it can: it must be paid, within 14
    days (staff: any time), and none of its purchased credits spent or held."""
    now = now or clock.now()
    if purchase.status == PurchaseStatus.REFUNDED or purchase.refund_requested_at is not None:
        return "This purchase has already been refunded."
    if purchase.status != PurchaseStatus.PAID or purchase.lot_id is None:
        return "Only a paid purchase can be refunded."
    if not staff and now - purchase.paid_at > timedelta(days=REFUND_DAYS):
        return f"Purchases can be refunded within {REFUND_DAYS} days; this one was paid on {purchase.paid_at:%d %b %Y}."
    lot = purchase.lot
    if lot.expired_at is not None or lot.remaining < lot.granted:
        return "Some of this purchase's credits have been used, so it can no longer be refunded."
    return None


def refund_tier_after(purchase: CreditPurchase, *, now: datetime | None = None) -> str | None:
    """The automatic tier the organisation would have after refunding `purchase` (None when the
    purchase is not in the open commitment period, so the tier would not change)."""
    now = now or clock.now()
    period = purchase.commitment_period
    if period is None or period.closed_at is not None or not period.start <= now < period.end:
        return None
    return tier_for(purchased_cents=max(0, period.purchased_cents - purchase.amount_cents), term=period.term)


def _payment_intent_of(invoice: Invoice) -> str:
    attempt = invoice.attempts.filter(status=AttemptStatus.SUCCEEDED).order_by("-number").first()
    return attempt.stripe_payment_intent_id if attempt else ""


def _lot_take_all(lot: CreditLot, now: datetime, reason: str, actor: User | None) -> int:
    n = CreditLot.objects.get(pk=lot.pk).remaining
    if n:
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - n)
        LedgerEntry.objects.create(
            org_id=lot.org_id,
            lot=lot,
            kind=EntryKind.REFUND,
            credits=-n,
            reason=reason,
            created_by=actor,
            created_at=now,
        )
    return n


def _lot_give_back(lot: CreditLot, n: int, now: datetime, reason: str) -> None:
    if n:
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") + n)
        LedgerEntry.objects.create(
            org_id=lot.org_id, lot=lot, kind=EntryKind.REFUND, credits=n, reason=reason, created_at=now
        )


def purchase_refund(
    *, org: Organisation, purchase_id: int, actor: User | None, staff: bool = False
) -> CreditPurchase:
    """Refunds an unused purchase: its purchased lot and what is left of its bonus leave the
    balance at once (REFUND entries), then Stripe refunds the payment, then the invoice becomes
    Refunded and the tier is recomputed. If Stripe cannot be reached the credits stay removed and
    billing_tick finishes the refund; if Stripe refuses it, the credits come back."""
    now = clock.now()
    with transaction.atomic():
        _lock_account(org.pk)
        purchase = (
            CreditPurchase.objects.select_for_update(of=("self",))
            .select_related("lot", "bonus_lot", "invoice")
            .filter(org=org, pk=purchase_id)
            .first()
        )
        if purchase is None:
            raise not_found("No such purchase.")
        refusal = refund_refusal(purchase, now=now, staff=staff)
        if refusal:
            raise BillingError("REFUND_REFUSED", refusal, 409)
        if not _payment_intent_of(purchase.invoice):
            raise BillingError(
                "REFUND_REFUSED", "This purchase was not paid by card; staff refund it by hand.", 409
            )
        reason = f"Refund of purchase #{purchase.pk} (invoice {purchase.invoice.number})"
        removed = _lot_take_all(purchase.lot, now, reason, actor)
        removed_bonus = _lot_take_all(purchase.bonus_lot, now, reason, actor) if purchase.bonus_lot_id else 0
        CreditAccount.objects.filter(pk=org.pk).update(balance=F("balance") - removed - removed_bonus)
        purchase.refund_requested_at = now
        purchase.refunded_by = actor
        purchase.refund_removed_credits = removed
        purchase.refund_removed_bonus = removed_bonus
        purchase.save(
            update_fields=[
                "refund_requested_at",
                "refunded_by",
                "refund_removed_credits",
                "refund_removed_bonus",
            ]
        )
    return _refund_at_stripe(purchase)


def _refund_at_stripe(purchase: CreditPurchase) -> CreditPurchase:
    invoice = Invoice.objects.get(pk=purchase.invoice_id)
    try:
        refund_id = stripe_gateway.refund_create(
            payment_intent_id=_payment_intent_of(invoice),
            idempotency_key=f"credit-purchase-{purchase.pk}-refund",
        )
    except stripe_gateway.StripeUnavailable:
        raise BillingError(
            "REFUND_PENDING",
            "The card network did not answer: the credits are set aside and the refund completes "
            "automatically within a few minutes.",
            202,
        ) from None
    except stripe_gateway.StripeRequestError as error:
        if "already been refunded" in error.message.lower():
            refund_id = ""
        else:
            _refund_undo(purchase.pk, error.message)
            raise BillingError(
                "REFUND_FAILED", f"The refund was refused: {error.message} Your credits are back.", 409
            ) from None
    return _refund_finish(purchase.pk, refund_id)


def _refund_undo(purchase_id: int, message: str) -> None:
    now = clock.now()
    org_id = CreditPurchase.objects.values_list("org_id", flat=True).get(pk=purchase_id)
    with transaction.atomic():
        _lock_account(org_id)
        purchase = (
            CreditPurchase.objects.select_for_update(of=("self",))
            .select_related("lot", "bonus_lot")
            .get(pk=purchase_id)
        )
        if purchase.refund_requested_at is None or purchase.refunded_at is not None:
            return
        reason = f"Refund of purchase #{purchase.pk} refused by the card network: credits restored"
        _lot_give_back(purchase.lot, purchase.refund_removed_credits, now, reason)
        back = purchase.refund_removed_credits
        if purchase.bonus_lot_id and purchase.bonus_lot.expired_at is None:
            _lot_give_back(purchase.bonus_lot, purchase.refund_removed_bonus, now, reason)
            back += purchase.refund_removed_bonus
        CreditAccount.objects.filter(pk=purchase.org_id).update(balance=F("balance") + back)
        purchase.refund_requested_at = None
        purchase.refund_removed_credits = 0
        purchase.refund_removed_bonus = 0
        purchase.refund_error = message
        purchase.save(
            update_fields=[
                "refund_requested_at",
                "refund_removed_credits",
                "refund_removed_bonus",
                "refund_error",
            ]
        )


def _refund_finish(purchase_id: int, refund_id: str) -> CreditPurchase:
    now = clock.now()
    with transaction.atomic():
        org_id = CreditPurchase.objects.values_list("org_id", flat=True).get(pk=purchase_id)
        _lock_account(org_id)
        purchase = CreditPurchase.objects.select_for_update().get(pk=purchase_id)
        if purchase.refunded_at is not None:
            return purchase
        purchase.status = PurchaseStatus.REFUNDED
        purchase.refunded_at = now
        purchase.stripe_refund_id = refund_id
        purchase.refund_error = ""
        purchase.save(update_fields=["status", "refunded_at", "stripe_refund_id", "refund_error"])
        invoice = Invoice.objects.select_for_update().get(pk=purchase.invoice_id)
        if invoice.status == InvoiceStatus.PAID:
            invoice.status = InvoiceStatus.REFUNDED
            invoice.refunded_at = now
            who = f" by {purchase.refunded_by}" if purchase.refunded_by_id else ""
            invoice.staff_note = f"{invoice.staff_note}\nRefunded on {now:%Y-%m-%d %H:%M} UTC{who} (credit purchase #{purchase.pk}, Stripe {refund_id or 'refund'})".strip()
            invoice.save(update_fields=["status", "refunded_at", "staff_note"])
        if purchase.commitment_period_id:
            period = CommitmentPeriod.objects.select_for_update().get(pk=purchase.commitment_period_id)
            period.purchased_cents = max(0, period.purchased_cents - purchase.amount_cents)
            period.tier = tier_for(purchased_cents=period.purchased_cents, term=period.term)
            period.save(update_fields=["purchased_cents", "tier"])
            if period.closed_at is None:
                _tier_refresh(org_id, now)
    return purchase


# --- auto-recharge: settings -----------------------------------------------------------------


def _billing_day_in(year: int, month: int, day: int) -> date:
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def schedule_dates(setting: RechargeSetting, today: date) -> tuple[date | None, date]:
    """(the latest billing date on or before today, the next one after today) of a schedule."""
    day = setting.billing_day
    if setting.frequency == RechargeFrequency.YEARLY:
        month = setting.billing_month or 1
        this_year = _billing_day_in(today.year, month, day)
        if this_year <= today:
            return this_year, _billing_day_in(today.year + 1, month, day)
        return _billing_day_in(today.year - 1, month, day), this_year
    this_month = _billing_day_in(today.year, today.month, day)
    if this_month <= today:
        ny, nm = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
        return this_month, _billing_day_in(ny, nm, day)
    py, pm = (today.year - 1, 12) if today.month == 1 else (today.year, today.month - 1)
    return _billing_day_in(py, pm, day), this_month


def _occurrence(setting: RechargeSetting, billing_date: date) -> str:
    if setting.frequency == RechargeFrequency.YEARLY:
        return f"{billing_date.year}"
    return f"{billing_date:%Y-%m}"


def next_recharge_date(setting: RechargeSetting, today: date) -> date:
    """The next billing date a schedule will charge on (today's, if today's is still due)."""
    latest, following = schedule_dates(setting, today)
    if latest is not None and latest >= setting.schedule_from and not _occurrence_paid(setting, latest):
        return latest
    return following


def _occurrence_paid(setting: RechargeSetting, billing_date: date) -> bool:
    return CreditPurchase.objects.filter(
        org_id=setting.org_id,
        kind=PurchaseKind.SCHEDULE,
        occurrence=_occurrence(setting, billing_date),
        status__in=[PurchaseStatus.PAID, PurchaseStatus.REFUNDED],
    ).exists()


@dataclass(frozen=True)
class RechargeChoice:
    """A validated auto-recharge setting, before it is saved (the preview shows it)."""

    kind: str
    threshold: int | None = None
    pack: CreditPack | None = None
    amount_dollars: int | None = None
    frequency: str = RechargeFrequency.MONTHLY
    billing_day: int | None = None
    billing_month: int | None = None
    monthly_cap_cents: int | None = None

    @property
    def amount_cents(self) -> int:
        if self.kind == RechargeKind.THRESHOLD:
            return self.pack.price_cents
        return self.amount_dollars * 100

    @property
    def credits(self) -> int:
        if self.kind == RechargeKind.THRESHOLD:
            return self.pack.credits
        return self.amount_dollars * CREDITS_PER_DOLLAR


def recharge_choice(
    *,
    kind: str,
    threshold: int | None = None,
    pack_id: int | None = None,
    amount_dollars: int | None = None,
    frequency: str = RechargeFrequency.MONTHLY,
    billing_day: int | None = None,
    billing_month: int | None = None,
    monthly_cap_dollars: int | None = None,
) -> RechargeChoice:
    """Checks an auto-recharge setting; raises BillingError saying what is wrong."""
    if kind not in RechargeKind.values:
        raise invalid("Choose when to recharge: below a balance, or on a schedule.")
    if monthly_cap_dollars is not None and not 1 <= monthly_cap_dollars <= 10_000_000:
        raise invalid("The monthly cap is a whole number of dollars from 1 up, or empty for no cap.")
    cap = monthly_cap_dollars * 100 if monthly_cap_dollars is not None else None
    if kind == RechargeKind.THRESHOLD:
        if threshold is None or not 1 <= threshold <= MAX_RECHARGE_THRESHOLD:
            raise invalid(f"The threshold is a whole number of credits from 1 to {MAX_RECHARGE_THRESHOLD:,}.")
        pack = CreditPack.objects.filter(pk=pack_id, active=True).first() if pack_id else None
        if pack is None:
            raise invalid("Choose the pack to buy.")
        if cap is not None and cap < pack.price_cents:
            raise invalid(
                f"A monthly cap below the pack's price ({pack.price_label}) would stop every recharge."
            )
        return RechargeChoice(kind=kind, threshold=threshold, pack=pack, monthly_cap_cents=cap)
    if amount_dollars is None or not 1 <= amount_dollars <= MAX_SCHEDULED_DOLLARS:
        raise invalid(f"The amount is a whole number of dollars from 1 to {MAX_SCHEDULED_DOLLARS:,}.")
    if frequency not in RechargeFrequency.values:
        raise invalid("Choose monthly or yearly.")
    if billing_day is None or not 1 <= billing_day <= 31:
        raise invalid("The billing date is a day of the month from 1 to 31.")
    if frequency == RechargeFrequency.YEARLY and (billing_month is None or not 1 <= billing_month <= 12):
        raise invalid("Choose the month of the yearly billing date.")
    if cap is not None and cap < amount_dollars * 100:
        raise invalid("A monthly cap below the recharge amount would stop every recharge.")
    return RechargeChoice(
        kind=kind,
        amount_dollars=amount_dollars,
        frequency=frequency,
        billing_day=billing_day,
        billing_month=billing_month if frequency == RechargeFrequency.YEARLY else None,
        monthly_cap_cents=cap,
    )


@dataclass(frozen=True)
class RechargePreview:
    choice: RechargeChoice
    purchase: PurchasePreview
    next_date: date | None  # schedules: the first billing date
    balance: int
    fires_now: bool  # a threshold already above the balance: the first recharge runs at once


def recharge_preview(*, org_id: int, choice: RechargeChoice) -> RechargePreview:
    """What one recharge of this setting would bring now: price, credits, bonus, the tier."""
    today = clock.today()
    balance = CreditAccount.objects.values_list("balance", flat=True).get(org_id=org_id)
    next_date = None
    at = clock.now()
    if choice.kind == RechargeKind.SCHEDULE:
        probe = RechargeSetting(
            org_id=org_id,
            frequency=choice.frequency,
            billing_day=choice.billing_day,
            billing_month=choice.billing_month,
            schedule_from=today,
        )
        latest, following = schedule_dates(probe, today)
        next_date = latest if latest == today else following
        at = max(at, clock.midnight(next_date))  # the tier and bonus as of the first recharge
    return RechargePreview(
        choice=choice,
        purchase=purchase_preview(
            org_id=org_id, amount_cents=choice.amount_cents, credits=choice.credits, now=at
        ),
        next_date=next_date,
        balance=balance,
        fires_now=choice.kind == RechargeKind.THRESHOLD and balance < choice.threshold,
    )


def _recharge_below_sync(setting: RechargeSetting) -> None:
    """Keeps the ledger's cheap copy of the threshold (CreditAccount.recharge_below) in step."""
    below = setting.threshold if setting.enabled and setting.kind == RechargeKind.THRESHOLD else None
    CreditAccount.objects.filter(pk=setting.org_id).update(recharge_below=below)


def recharge_setting_save(
    *, org: Organisation, choice: RechargeChoice, actor: User | None
) -> RechargeSetting:
    """Turns auto-recharge on with this setting (replacing the one before). A fresh start: any
    back-off from earlier declines is cleared. A threshold above the balance recharges at once."""
    today = clock.today()
    with transaction.atomic():
        account = _lock_account(org.pk)
        setting = RechargeSetting.objects.select_for_update().filter(org=org).first() or RechargeSetting(
            org=org
        )
        setting.kind = choice.kind
        setting.enabled = True
        setting.monthly_cap_cents = choice.monthly_cap_cents
        if choice.kind == RechargeKind.THRESHOLD:
            setting.threshold = choice.threshold
            setting.pack = choice.pack
        else:
            setting.amount_dollars = choice.amount_dollars
            setting.frequency = choice.frequency
            setting.billing_day = choice.billing_day
            setting.billing_month = choice.billing_month
            setting.schedule_from = today
        setting.failures = 0
        setting.first_failed_at = None
        setting.next_try_at = None
        setting.last_problem = ""
        setting.last_problem_at = None
        setting.cap_reached_month = ""
        setting.updated_by = actor
        setting.save()
        _recharge_below_sync(setting)
        if choice.kind == RechargeKind.THRESHOLD and account.balance < choice.threshold:
            from usage.recharge_trigger import recharge_queue

            transaction.on_commit(lambda: recharge_queue(org.pk), robust=True)
    return setting


def recharge_stop(*, org: Organisation, actor: User | None) -> RechargeSetting | None:
    """Turns auto-recharge off: no further recharge starts (one already being charged finishes);
    credits already bought stay."""
    with transaction.atomic():
        _lock_account(org.pk)
        setting = RechargeSetting.objects.select_for_update().filter(org=org).first()
        if setting is None:
            return None
        setting.enabled = False
        setting.next_try_at = None
        setting.updated_by = actor
        setting.save(update_fields=["enabled", "next_try_at", "updated_by", "updated_at"])
        _recharge_below_sync(setting)
    return setting


# --- auto-recharge: running ------------------------------------------------------------------


def _billing_contacts(org_id: int) -> list[str]:
    return list(
        Membership.objects.filter(org_id=org_id, role__in=[Role.OWNER, Role.BILLING_ADMIN])
        .order_by("user__email")
        .values_list("user__email", flat=True)
    )


def _email_contacts(org_id: int, subject: str, body: str) -> None:
    """E-mails the owners and billing admins once the transaction commits."""
    recipients = _billing_contacts(org_id)
    if not recipients:
        return
    site = getattr(settings, "SITE_URL", "").rstrip("/")
    where = f"{site}/settings/billing/credits/" if site else "Settings → Billing → Credits"
    message = f"{body}\n\nSee or change auto-recharge in {where}."
    transaction.on_commit(
        lambda: send_mail(subject, message, settings.DEFAULT_FROM_EMAIL, recipients), robust=True
    )


def _recharge_back_off(org_id: int, message: str, now: datetime) -> None:
    """After a declined or failed recharge (caller holds the org lock): no retry storm. The next
    try waits 1, 3 and 7 days after the first failure; one more failure turns auto-recharge off.
    The billing contacts are e-mailed each time."""
    setting = RechargeSetting.objects.select_for_update().filter(org_id=org_id).first()
    if setting is None:
        return
    org_name = Organisation.objects.values_list("name", flat=True).get(pk=org_id)
    setting.failures += 1
    if setting.failures == 1 or setting.first_failed_at is None:
        setting.first_failed_at = now
    setting.last_problem = message[:300]
    setting.last_problem_at = now
    if setting.failures > len(RECHARGE_RETRY_DAYS):
        setting.enabled = False
        setting.next_try_at = None
        setting.last_problem = f"Turned off after {setting.failures} failed recharges. Last: {message}"[:300]
        subject = f"Auto-recharge turned off for {org_name}"
        body = (
            f"The last auto-recharge for {org_name} failed: {message}\n\n"
            f"After {setting.failures} failed attempts we have turned auto-recharge off. Your credits "
            "are unchanged. Update your card in Payment methods, then turn auto-recharge on again."
        )
    else:
        setting.next_try_at = setting.first_failed_at + timedelta(
            days=RECHARGE_RETRY_DAYS[setting.failures - 1]
        )
        subject = f"Auto-recharge failed for {org_name}"
        body = (
            f"An auto-recharge for {org_name} failed: {message}\n\nNothing was charged. We will try "
            f"once more on {setting.next_try_at:%d %b %Y}; until then no recharge is attempted. "
            "Check your card in Payment methods."
        )
    setting.save()
    _recharge_below_sync(setting)
    _email_contacts(org_id, subject, body)


def _recharges_this_month_cents(org_id: int, now: datetime) -> int:
    total = CreditPurchase.objects.filter(
        org_id=org_id,
        kind__in=RECHARGE_KINDS,
        status__in=[PurchaseStatus.PENDING, PurchaseStatus.PAID],
        created_at__gte=_month_start(now),
    ).aggregate(s=Sum("amount_cents"))["s"]
    return total or 0


def _cap_reached(setting: RechargeSetting, now: datetime, needed_cents: int) -> None:
    month = f"{now:%Y-%m}"
    if setting.cap_reached_month == month:
        return
    setting.cap_reached_month = month
    setting.save(update_fields=["cap_reached_month", "updated_at"])
    org_name = Organisation.objects.values_list("name", flat=True).get(pk=setting.org_id)
    _email_contacts(
        setting.org_id,
        f"Auto-recharge paused for {org_name}: monthly cap reached",
        f"An auto-recharge of {_usd(needed_cents)} for {org_name} would take this month's recharges "
        f"above your cap of {_usd(setting.monthly_cap_cents)}, so nothing was charged. Auto-recharge "
        "resumes next month, or raise the cap on the Credits tab.",
    )


def _recharge_failed_now(
    setting: RechargeSetting, purchase_fields: dict, message: str, now: datetime
) -> None:
    """Records a recharge that could not even be charged (no card), and backs off."""
    CreditPurchase.objects.create(
        status=PurchaseStatus.FAILED,
        message=message[:300],
        created_at=now,
        finished_at=now,
        **purchase_fields,
    )
    _recharge_back_off(setting.org_id, message, now)


def _recharge_reserve(org_id: int, kind: str, now: datetime) -> CreditPurchase | None:
    """Decides, under the org lock, whether a recharge of `kind` is due now, and if so commits it
    as Processing. None when it is not due, backing off, capped, or one is already in flight."""
    with transaction.atomic():
        account = _lock_account(org_id)
        setting = (
            RechargeSetting.objects.select_for_update().filter(org_id=org_id, kind=kind, enabled=True).first()
        )
        if setting is None or (setting.next_try_at is not None and now < setting.next_try_at):
            return None
        if CreditPurchase.objects.filter(
            org_id=org_id, kind__in=RECHARGE_KINDS, status=PurchaseStatus.PENDING
        ).exists():
            return None
        if kind == RechargeKind.THRESHOLD:
            if account.balance >= setting.threshold:
                return None
            pack = setting.pack
            shortfall = setting.threshold - account.balance
            quantity = min(MAX_PACKS_PER_RECHARGE, -(-shortfall // pack.credits))
            unit = pack.price_cents
            if setting.monthly_cap_cents is not None:
                room = setting.monthly_cap_cents - _recharges_this_month_cents(org_id, now)
                affordable = max(0, room // unit)
                if affordable == 0:
                    _cap_reached(setting, now, unit * quantity)
                    return None
                quantity = min(quantity, affordable)
            fields = {
                "org_id": org_id,
                "kind": PurchaseKind.THRESHOLD,
                "key": f"threshold:{uuid.uuid4().hex}",
                "pack": pack,
                "quantity": quantity,
                "amount_cents": unit * quantity,
                "credits": pack.credits * quantity,
            }
        else:
            latest, _ = schedule_dates(setting, now.date())
            if latest is None or latest < setting.schedule_from or _occurrence_paid(setting, latest):
                return None
            occurrence = _occurrence(setting, latest)
            amount = setting.amount_dollars * 100
            capped = setting.monthly_cap_cents is not None
            if capped and _recharges_this_month_cents(org_id, now) + amount > setting.monthly_cap_cents:
                _cap_reached(setting, now, amount)
                return None
            tries = CreditPurchase.objects.filter(
                org_id=org_id, kind=PurchaseKind.SCHEDULE, occurrence=occurrence
            ).count()
            fields = {
                "org_id": org_id,
                "kind": PurchaseKind.SCHEDULE,
                "key": f"schedule:{occurrence}:{tries + 1}",
                "occurrence": occurrence,
                "quantity": 1,
                "amount_cents": amount,
                "credits": setting.amount_dollars * CREDITS_PER_DOLLAR,
            }
        org = Organisation.objects.get(pk=org_id)
        if not invoice_services.card_on_file(org=org):
            _recharge_failed_now(setting, fields, "No card on file: add one in Payment methods.", now)
            return None
        return _purchase_reserve(**fields)


def recharge_threshold_run(*, org_id: int) -> CreditPurchase | None:
    """What the Celery task runs after a charge took the balance below the threshold: at most
    one recharge, of enough packs to cover the shortfall (within the monthly cap)."""
    purchase = _recharge_reserve(org_id, RechargeKind.THRESHOLD, clock.now())
    return _purchase_pay(purchase) if purchase is not None else None


def recharge_scheduled_run(*, org_id: int) -> CreditPurchase | None:
    purchase = _recharge_reserve(org_id, RechargeKind.SCHEDULE, clock.now())
    return _purchase_pay(purchase) if purchase is not None else None


def recharges_run_due(*, now: datetime) -> int:
    """billing_tick: scheduled recharges whose billing date has come (once per organisation and
    billing period), and threshold recharges still due (a balance below the threshold that no
    task handled, or a retry after a decline whose back-off has passed). Returns the recharges
    started."""
    started = 0
    scheduled = RechargeSetting.objects.filter(
        enabled=True, kind=RechargeKind.SCHEDULE, schedule_from__lte=now.date()
    )
    threshold = RechargeSetting.objects.filter(
        enabled=True, kind=RechargeKind.THRESHOLD, org__credit_account__balance__lt=F("threshold")
    )
    for kind, org_ids in (
        (RechargeKind.SCHEDULE, list(scheduled.values_list("org_id", flat=True))),
        (RechargeKind.THRESHOLD, list(threshold.values_list("org_id", flat=True))),
    ):
        for org_id in org_ids:
            purchase = _recharge_reserve(org_id, kind, now)
            if purchase is not None:
                _purchase_pay(purchase)
                started += 1
    return started


# --- reads for the Credits tab ---------------------------------------------------------------


def purchases_recent(*, org_id: int, limit: int = 10) -> list[CreditPurchase]:
    """The latest purchases and recharges, each with `.refusal` (None when it can be refunded)."""
    now = clock.now()
    purchases = list(
        CreditPurchase.objects.filter(org_id=org_id).select_related("pack", "invoice", "lot", "bonus_lot")[
            :limit
        ]
    )
    for purchase in purchases:
        purchase.refusal = refund_refusal(purchase, now=now)
        purchase.refund_until = purchase.paid_at + timedelta(days=REFUND_DAYS) if purchase.paid_at else None
    return purchases


def purchased_balance(*, org_id: int) -> dict[int, int]:
    """Credits left by bucket: {Bucket.BONUS: n, Bucket.PURCHASED: n}."""
    rows = (
        CreditLot.objects.filter(org_id=org_id, remaining__gt=0, bucket__in=[Bucket.BONUS, Bucket.PURCHASED])
        .values("bucket")
        .annotate(s=Sum("remaining"))
    )
    found = {row["bucket"]: row["s"] for row in rows}
    return {Bucket.BONUS: found.get(Bucket.BONUS, 0), Bucket.PURCHASED: found.get(Bucket.PURCHASED, 0)}


def new_form_token() -> str:
    return uuid.uuid4().hex


def purchase_for(*, org_id: int, purchase_id: int) -> CreditPurchase:
    purchase = (
        CreditPurchase.objects.select_related("pack", "invoice", "lot", "bonus_lot")
        .filter(org_id=org_id, pk=purchase_id)
        .first()
    )
    if purchase is None:
        raise not_found("No such purchase.")
    return purchase
