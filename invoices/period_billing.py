"""Period invoices and their collection (DESIGN §5).

When periods close, `period_invoices_issue` runs inside the same transaction that opens the next
ones (the close takes a chunk of subscriptions at a time), so an invoice exists exactly when its
new period does: the new period's plan fee in advance and the closed period's overage in arrears.
Nothing to bill (Free, no overage) issues nothing and uses no number. A paid subscription started
by staff gets its first period's fee the same way (`period_invoice_issue`, one of them).

`period_invoices_collect` (a billing_tick step) then charges issued period invoices off-session to
the default card: the first attempt at once, retries 1, 3 and 7 days after the first failure, at
most four attempts. Each failure e-mails the billing contacts; after the last, a paid plan falls
to Free when its current period closes. Without a card nothing calls Stripe and the invoice waits.
What follows a charge (no more tries once paid; after a decline the next try and the e-mail) is
registered with the payments app and runs in the transaction that records the outcome, here or
in the reconciler or a webhook after a crash.
"""

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Exists, OuterRef

from accounts import clock
from accounts.models import BillingPeriod, Plan, Role, Subscription
from billing_site.errors import BillingError
from invoices import services
from invoices.models import AttemptStatus, Invoice, InvoiceKind, InvoiceStatus, PaymentAttempt

log = logging.getLogger(__name__)

RETRY_AFTER_FIRST_FAILURE = (timedelta(days=1), timedelta(days=3), timedelta(days=7))
MAX_ATTEMPTS = 1 + len(RETRY_AFTER_FIRST_FAILURE)


def _day(moment: datetime) -> str:
    return f"{moment.day} {moment:%b %Y}"


def _fee_cents(sub: Subscription, period: BillingPeriod) -> int:
    if period.plan_id == sub.plan_id:
        return sub.price_cents  # the subscription's contract price, if staff set one
    return period.plan.price_cents


def _period_invoice(sub: Subscription, opened: BillingPeriod, closed: BillingPeriod | None):
    """The invoice for `opened` (its plan fee) and `closed` (its overage), built but not saved;
    None when there is no line to bill."""
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
    return services.invoice_build(
        org_id=sub.org_id,
        lines=lines,
        description=f"{opened.plan.name} plan from {_day(opened.start)}",
        kind=InvoiceKind.PERIOD,
        period_start=opened.start,
        period_end=opened.end,
        billing_period=opened,
    )


def period_invoices_issue(
    *, rolls: Sequence[tuple[Subscription, BillingPeriod, BillingPeriod | None]]
) -> list[Invoice]:
    """Issues the invoice of each (subscription, opened period, closed period or None), numbered
    in the order given, each due for collection at once. A roll with nothing to bill (Free, no
    overage) or whose total rounds to $0.00 issues nothing and uses no number. Runs inside the
    transaction that opened the periods."""
    new = []
    for sub, opened, closed in rolls:
        built = _period_invoice(sub, opened, closed)
        if built is not None and built.invoice.total_cents > 0:
            # Due from the moment its period opened, so the tick that closes a period charges the
            # new invoice too (clock.now() runs a little past the tick's moment).
            built.invoice.next_attempt_at = opened.start
            new.append(built)
    return services.invoices_issue_bulk(new=new)


def period_invoice_issue(
    *, sub: Subscription, opened: BillingPeriod, closed: BillingPeriod | None = None
) -> Invoice | None:
    """Issues the invoice for `opened` (its plan fee) and `closed` (its overage), or nothing when
    there is nothing to bill. Runs inside the transaction that opened the period."""
    issued = period_invoices_issue(rolls=[(sub, opened, closed)])
    return issued[0] if issued else None


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


def _dunning(invoice: Invoice, attempt: PaymentAttempt, *, now: datetime) -> None:
    """After a declined charge, in the transaction that records it (the invoice is locked): the next
    try 1, 3 and 7 days after the first failure, and never sooner than the gap between two tries
    (when ticks were missed and the schedule fell behind, tries are not made back to back); after
    the last, the plan falls to Free when the period closes. The billing contacts are e-mailed from
    inside the transaction (as the low-balance alert is), so a crash can repeat the e-mail but
    never lose it or the schedule."""
    failures = invoice.attempts.filter(status=AttemptStatus.FAILED).count()
    first = invoice.first_failed_at or now
    next_at = None
    if failures < MAX_ATTEMPTS:
        after = RETRY_AFTER_FIRST_FAILURE[failures - 1]
        gap = after - (RETRY_AFTER_FIRST_FAILURE[failures - 2] if failures > 1 else timedelta(0))
        next_at = max(first + after, now + gap)
    Invoice.objects.filter(pk=invoice.pk).update(first_failed_at=first, next_attempt_at=next_at)
    if next_at is None:
        free = Plan.objects.filter(code="free").first()
        sub = Subscription.objects.select_for_update(of=("self",)).get(org_id=invoice.org_id)
        if free is not None and not sub.plan.is_free:
            sub.scheduled_plan = free
            sub.save(update_fields=["scheduled_plan"])
    _failure_mail(invoice, attempt.error_message or "the card was declined", failures, next_at)


def _paid(invoice: Invoice) -> None:
    """A paid period invoice is not charged again (in the payment's transaction)."""
    Invoice.objects.filter(pk=invoice.pk).update(next_attempt_at=None)


def period_invoices_collect(*, now: datetime) -> int:
    """Charges the issued period invoices that are due; returns how many were attempted."""
    card = services.default_cards().filter(org=OuterRef("org"))
    due = (
        Invoice.objects.filter(kind=InvoiceKind.PERIOD, status=InvoiceStatus.ISSUED, next_attempt_at__lte=now)
        .filter(Exists(card))  # without a card it waits, Issued, until one is added: no Stripe call
        .select_related("org")
        .order_by("next_attempt_at", "pk")
    )
    attempted = 0
    for invoice in due:
        try:
            services.invoice_charge(invoice=invoice, on_declined=partial(_dunning, now=now))
        except BillingError as error:
            log.warning("invoice %s not charged: %s", invoice, error.message)
            continue
        attempted += 1
    return attempted


def handlers_register() -> None:
    """Tells the payments app what follows a period invoice's charge, wherever it is settled (here,
    or by the reconciler or a webhook after a crash). Called by InvoicesConfig.ready()."""
    services.on_paid_register(InvoiceKind.PERIOD, _paid)
    services.on_declined_register(
        InvoiceKind.PERIOD, lambda invoice, attempt: _dunning(invoice, attempt, now=clock.now())
    )
