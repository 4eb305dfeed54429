"""Period invoices and their collection (DESIGN §5).

When a period closes, `period_invoice_issue` runs inside the same transaction that opens the next
one, so the invoice exists exactly when the new period does: the new period's plan fee in advance
and the closed period's overage in arrears. Nothing to bill (Free, no overage) issues nothing and
uses no number. A paid subscription started by staff gets its first period's fee the same way.

`period_invoices_collect` (a billing_tick step) then charges issued period invoices off-session to
the default card: the first attempt at once, retries 1, 3 and 7 days after the first failure, at
most four attempts. Each failure e-mails the billing contacts; after the last, a paid plan falls
to Free when its current period closes. Without a card nothing calls Stripe and the invoice waits.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction

from accounts import clock
from accounts.models import BillingPeriod, Plan, Role, Subscription
from billing_site.errors import BillingError
from invoices import services
from invoices.models import AttemptStatus, Invoice, InvoiceKind, InvoiceStatus

log = logging.getLogger(__name__)

RETRY_AFTER_FIRST_FAILURE = (timedelta(days=1), timedelta(days=3), timedelta(days=7))
MAX_ATTEMPTS = 1 + len(RETRY_AFTER_FIRST_FAILURE)


def _day(moment: datetime) -> str:
    return f"{moment.day} {moment:%b %Y}"


def _fee_cents(sub: Subscription, period: BillingPeriod) -> int:
    if period.plan_id == sub.plan_id:
        return sub.price_cents  # the subscription's contract price, if staff set one
    return period.plan.price_cents


def period_invoice_issue(
    *, sub: Subscription, opened: BillingPeriod, closed: BillingPeriod | None = None
) -> Invoice | None:
    """Issues the invoice for `opened` (its plan fee) and `closed` (its overage), or nothing when
    both are zero. Runs inside the transaction that opened the period."""
    lines: list = []
    fee = _fee_cents(sub, opened)
    last_day = opened.end - timedelta(days=1)
    if fee > 0:
        lines.append(
            services.LineSpec(f"{opened.plan.name} plan, {_day(opened.start)} – {_day(last_day)}", 1, fee)
        )
    if closed is not None and closed.overage_credits and closed.plan.overage_rate is not None:
        closed_last = closed.end - timedelta(days=1)
        lines.append(
            services.RateLineSpec(
                f"Overage credits, {_day(closed.start)} – {_day(closed_last)}",
                closed.overage_credits,
                closed.plan.overage_rate,
            )
        )
    if not lines:
        return None
    draft = services.invoice_draft_create(
        org=sub.org,
        lines=lines,
        description=f"{opened.plan.name} plan from {_day(opened.start)}",
        kind=InvoiceKind.PERIOD,
        period_start=opened.start,
        period_end=opened.end,
        billing_period=opened,
    )
    if draft.total_cents <= 0:  # e.g. an overage that rounds to $0.00: nothing to bill
        draft.delete()
        return None
    invoice = services.invoice_issue(invoice=draft)
    Invoice.objects.filter(pk=invoice.pk).update(next_attempt_at=clock.now())
    return invoice


def _contacts(org) -> list[str]:
    return list(
        org.memberships.filter(role__in=[Role.OWNER, Role.BILLING_ADMIN])
        .order_by("user__email")
        .values_list("user__email", flat=True)
    )


def _failure_mail(invoice: Invoice, message: str, attempts: int, next_at: datetime | None) -> None:
    if next_at is not None:
        then = f"We will try again on {_day(next_at)}."
    else:
        then = "That was the last try: your plan moves to Free when the current period ends."
    send_mail(
        subject=f"Payment of invoice {invoice.number} failed",
        message=(
            f"We could not charge your card for invoice {invoice.number} "
            f"(${invoice.total_cents // 100:,}.{invoice.total_cents % 100:02d}): {message}\n\n"
            f"Attempt {attempts} of {MAX_ATTEMPTS}. {then}\n"
            "Update your card under Settings → Billing → Payment methods."
        ),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=_contacts(invoice.org),
    )


def _after_failure(invoice: Invoice, attempt, now: datetime) -> None:
    failures = invoice.attempts.filter(status=AttemptStatus.FAILED).count()
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        first = locked.first_failed_at or now
        next_at = first + RETRY_AFTER_FIRST_FAILURE[failures - 1] if failures < MAX_ATTEMPTS else None
        Invoice.objects.filter(pk=locked.pk).update(first_failed_at=first, next_attempt_at=next_at)
        if next_at is None:
            free = Plan.objects.filter(code="free").first()
            sub = Subscription.objects.select_for_update(of=("self",)).get(org_id=locked.org_id)
            if free is not None and not sub.plan.is_free:
                sub.scheduled_plan = free
                sub.save(update_fields=["scheduled_plan"])
    _failure_mail(invoice, attempt.error_message or "the card was declined", failures, next_at)


def period_invoices_collect(*, now: datetime) -> int:
    """Charges the issued period invoices that are due; returns how many were attempted."""
    due = (
        Invoice.objects.filter(kind=InvoiceKind.PERIOD, status=InvoiceStatus.ISSUED, next_attempt_at__lte=now)
        .select_related("org")
        .order_by("next_attempt_at", "pk")
    )
    attempted = 0
    for invoice in due:
        if not services.card_on_file(org=invoice.org):
            continue  # waits, Issued, until a card is added; nothing calls Stripe
        try:
            attempt = services.invoice_charge(invoice=invoice)
        except BillingError as error:
            log.warning("invoice %s not charged: %s", invoice, error.message)
            continue
        attempted += 1
        if attempt.status == AttemptStatus.FAILED:
            _after_failure(invoice, attempt, now)
        elif attempt.status == AttemptStatus.SUCCEEDED:
            Invoice.objects.filter(pk=invoice.pk).update(next_attempt_at=None)
    return attempted
