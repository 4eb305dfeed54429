"""Writes for invoices, payments and payment methods (DESIGN §5).

Numbering: an invoice gets its number only in the transaction that issues it, from its calendar
year's `InvoiceNumberSequence` row taken under `select_for_update`, so numbers never skip or
repeat, whatever the concurrency; a voided draft never had one.

Charging: every charge is a `PaymentAttempt` row (attempt n of at most 4, idempotency key
`inv-<invoice>-attempt-<n>`), committed before Stripe is called; Stripe is called once per
attempt, and the outcome is written in one transaction that first re-locks the attempt and
returns if it is no longer pending. After a crash between the Stripe call and that write,
`payment_attempts_reconcile()` looks the PaymentIntent up at Stripe by the attempt's metadata
(never making a second one) and finishes the job, calling the paid-handler registered for the
invoice's kind (`on_paid_register`) with the invoice, whose `fulfilment` says what it grants.
An attempt that made no PaymentIntent (Stripe unreachable, or a crash before the call) does not
count: on an issued invoice it is withdrawn and its number tried again (`_attempt_unsent`).

Call `purchase_charge` and `invoice_charge` outside any transaction: their first write must be
committed before Stripe is called.
"""

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from accounts import clock
from accounts.models import Organisation, Role, Subscription
from billing_site.errors import BillingError, conflict, invalid, not_found
from billing_site.money import overage_cents
from invoices import stripe_gateway
from invoices.models import (
    MAX_PAYMENT_ATTEMPTS,
    AttemptStatus,
    Invoice,
    InvoiceKind,
    InvoiceLine,
    InvoiceNumberSequence,
    InvoicePdf,
    InvoiceStatus,
    PaymentAttempt,
    PaymentMethod,
    StripeWebhookEvent,
    WebhookStatus,
)
from invoices.stripe_gateway import ChargeResult, StripeUnavailable

log = logging.getLogger(__name__)

# A pending attempt younger than this may still be waiting for Stripe's answer in a request.
RECONCILE_AFTER = timedelta(minutes=2)


class PaymentDeclined(BillingError):
    """The card was declined: the message is the bank's, the draft invoice is void."""

    def __init__(self, message: str, invoice: Invoice | None = None):
        super().__init__("PAYMENT_DECLINED", message or "Your card was declined.", 402)
        self.invoice = invoice


def no_card() -> BillingError:
    return BillingError(
        "PAYMENT_METHOD_REQUIRED", "Add a card in Payment methods first; nothing was charged.", 402
    )


@dataclass
class LineSpec:
    """A line priced per unit in cents: quantity × unit_cents."""

    description: str
    quantity: int
    unit_cents: int


@dataclass
class RateLineSpec:
    """A line priced at a Decimal rate in dollars per 1,000 units (overage), rounded half-up once."""

    description: str
    quantity: int
    unit_rate: Decimal


# --- what a paid purchase grants, after a crash ------------------------------------------------

_ON_PAID: dict[str, Callable[[Invoice], None]] = {}
_ON_DECLINED: dict[str, Callable[[Invoice, PaymentAttempt], None]] = {}


def on_paid_register(kind: str, handler: Callable[[Invoice], None]) -> None:
    """Registers the function that grants what an invoice of `kind` bought (reading
    `invoice.fulfilment`). The reconciler calls it, in the transaction that marks the invoice
    paid, when a charge succeeded but the request that made it died before finishing."""
    _ON_PAID[kind] = handler


def on_declined_register(kind: str, handler: Callable[[Invoice, PaymentAttempt], None]) -> None:
    """Registers what follows a declined charge of an issued invoice of `kind` (period invoices:
    the retry schedule and the e-mail). It runs in the transaction that records the decline, so no
    crash can record one without the other; the reconciler and webhooks call it too."""
    _ON_DECLINED[kind] = handler


# --- drafts, totals, issuing -----------------------------------------------------------------


def tax_rate() -> Decimal:
    return Decimal(str(settings.INVOICE_TAX_RATE or "0"))


def _tax_cents(subtotal_cents: int, rate: Decimal) -> int:
    return int((Decimal(subtotal_cents) * rate / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _totals_set(invoice: Invoice, lines: Iterable[InvoiceLine]) -> None:
    """Sets subtotal, tax and total from the lines: the one place an invoice's total is computed."""
    subtotal = sum(line.amount_cents for line in lines)
    invoice.tax_rate = tax_rate()
    invoice.subtotal_cents = subtotal
    invoice.tax_cents = _tax_cents(subtotal, invoice.tax_rate)
    invoice.total_cents = subtotal + invoice.tax_cents


def _totals_refresh(invoice: Invoice) -> None:
    """Recomputes subtotal, tax and total from the lines (drafts only; issued ones are frozen)."""
    _totals_set(invoice, invoice.lines.all())
    invoice.save(update_fields=["tax_rate", "subtotal_cents", "tax_cents", "total_cents"])


def invoice_totals_refresh(*, invoice: Invoice) -> Invoice:
    """Recomputes a draft's totals after its lines changed (admin edits)."""
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if invoice.is_frozen:
            raise conflict(f"Invoice {invoice} is {invoice.get_status_display()}; its lines are frozen.")
        _totals_refresh(invoice)
    return invoice


def line_amount_cents(
    *, quantity: int, unit_cents: int | None = None, unit_rate: Decimal | None = None
) -> int:
    """A line's amount: quantity × unit price in cents, or quantity at a rate per 1,000 (half-up)."""
    if unit_rate is not None:
        return overage_cents(quantity, Decimal(unit_rate))
    return quantity * (unit_cents or 0)


def _line(invoice: Invoice, position: int, spec: LineSpec | RateLineSpec) -> InvoiceLine:
    description = (spec.description or "").strip()
    if not description:
        raise invalid("Every invoice line needs a description.")
    if not isinstance(spec.quantity, int) or spec.quantity < 1:
        raise invalid("An invoice line's quantity is a whole number from 1 up.")
    if isinstance(spec, RateLineSpec):
        rate = Decimal(spec.unit_rate)
        if rate < 0:
            raise invalid("An invoice line's rate cannot be negative.")
        return InvoiceLine(
            invoice=invoice,
            position=position,
            description=description[:200],
            quantity=spec.quantity,
            unit_rate=rate,
            amount_cents=overage_cents(spec.quantity, rate),
        )
    if not isinstance(spec.unit_cents, int):
        raise invalid("An invoice line's unit price is a whole number of cents.")
    return InvoiceLine(
        invoice=invoice,
        position=position,
        description=description[:200],
        quantity=spec.quantity,
        unit_cents=spec.unit_cents,
        amount_cents=spec.quantity * spec.unit_cents,
    )


@dataclass
class NewInvoice:
    """An invoice and its lines, built and totalled but not yet saved (see `invoice_build`)."""

    invoice: Invoice
    lines: list[InvoiceLine]


def invoice_build(
    *,
    org_id: int,
    lines: list[LineSpec | RateLineSpec],
    description: str = "",
    kind: str = InvoiceKind.PURCHASE,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    billing_period=None,
    fulfilment: dict | None = None,
) -> NewInvoice:
    """An unsaved Draft invoice with its lines and totals: what `invoice_draft_create` saves and
    `invoices_issue_bulk` issues. Bad lines raise BillingError."""
    if kind not in InvoiceKind.values:
        raise invalid(f"Unknown invoice kind {kind!r}.")
    if not lines:
        raise invalid("An invoice needs at least one line.")
    invoice = Invoice(
        org_id=org_id,
        kind=kind,
        description=(description or "").strip()[:200],
        period_start=period_start,
        period_end=period_end,
        billing_period=billing_period,
        fulfilment=fulfilment or {},
        currency="usd",
    )
    built = [_line(invoice, i, spec) for i, spec in enumerate(lines)]
    _totals_set(invoice, built)
    return NewInvoice(invoice, built)


def invoice_draft_create(
    *,
    org: Organisation,
    lines: list[LineSpec | RateLineSpec],
    description: str = "",
    kind: str = InvoiceKind.PURCHASE,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    billing_period=None,
    fulfilment: dict | None = None,
) -> Invoice:
    """A Draft invoice with its lines and totals (no number yet; customers do not see it)."""
    new = invoice_build(
        org_id=org.pk,
        lines=lines,
        description=description,
        kind=kind,
        period_start=period_start,
        period_end=period_end,
        billing_period=billing_period,
        fulfilment=fulfilment,
    )
    with transaction.atomic():
        new.invoice.save()
        InvoiceLine.objects.bulk_create(new.lines)
    return new.invoice


def _numbers_reserve(year: int, count: int) -> list[str]:
    """The next `count` numbers of `year`, in order, taken in one update of the year's row under
    its lock (in the caller's transaction, so a rollback gives them back and nothing skips)."""
    InvoiceNumberSequence.objects.bulk_create(
        [InvoiceNumberSequence(year=year, last=0)], ignore_conflicts=True
    )
    seq = InvoiceNumberSequence.objects.select_for_update().get(year=year)
    first = seq.last + 1
    seq.last += count
    seq.save(update_fields=["last"])
    return [f"INV-{year}-{n:06d}" for n in range(first, seq.last + 1)]


def _number_next(year: int) -> str:
    """The next number of `year` (see `_numbers_reserve`)."""
    return _numbers_reserve(year, 1)[0]


def _issue_locked(invoice: Invoice, now: datetime) -> None:
    """Issues a draft whose row the caller has locked: fixes the totals, then the number."""
    if not invoice.lines.exists():
        raise invalid("An invoice needs at least one line before it is issued.")
    _totals_refresh(invoice)
    invoice.number = _number_next(now.year)
    invoice.status = InvoiceStatus.ISSUED
    invoice.issued_at = now
    invoice.save(update_fields=["number", "status", "issued_at"])


def invoice_issue(*, invoice: Invoice) -> Invoice:
    """Issues a draft: assigns the next number of the issue date's year and freezes it."""
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status != InvoiceStatus.DRAFT:
            raise conflict(f"Invoice {locked} is already {locked.get_status_display()}.")
        if locked.attempts.filter(status=AttemptStatus.PENDING).exists():
            raise conflict("A payment for this draft is in progress; it is issued when the payment succeeds.")
        _issue_locked(locked, clock.now())
    return locked


def invoices_issue_bulk(*, new: Sequence[NewInvoice]) -> list[Invoice]:
    """Issues built invoices (`invoice_build`) at once, as `invoice_draft_create` then
    `invoice_issue` would one by one: numbered in the order given, from one reservation of the
    year's numbers, in one transaction with set-based inserts (the period close issues a thousand
    at a time). Bulk inserts send no signals, so django-auditlog records none of these."""
    if not new:
        return []
    now = clock.now()
    invoices = [item.invoice for item in new]
    with transaction.atomic():
        for invoice, number in zip(invoices, _numbers_reserve(now.year, len(new)), strict=True):
            invoice.number = number
            invoice.status = InvoiceStatus.ISSUED
            invoice.issued_at = now
        Invoice.objects.bulk_create(invoices)
        InvoiceLine.objects.bulk_create([line for item in new for line in item.lines])
    return invoices


def invoice_void(*, invoice: Invoice, reason: str = "", actor=None) -> Invoice:
    """Voids a draft (it never gets a number) or an unpaid issued invoice (it keeps its number)."""
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status not in (InvoiceStatus.DRAFT, InvoiceStatus.ISSUED):
            raise conflict(
                f"Invoice {locked} is {locked.get_status_display()}: only drafts and unpaid invoices can be voided."
            )
        if locked.attempts.filter(status=AttemptStatus.PENDING).exists():
            raise conflict("A payment for this invoice is in progress; try again once it has finished.")
        locked.status = InvoiceStatus.VOID
        locked.voided_at = clock.now()
        if reason or actor:
            locked.staff_note = _note(locked.staff_note, "Voided", reason, actor)
        locked.save(update_fields=["status", "voided_at", "staff_note"])
    return locked


def _note(previous: str, what: str, reason: str, actor) -> str:
    line = f"{what} on {timezone.now():%Y-%m-%d %H:%M} UTC"
    if actor is not None:
        line += f" by {actor}"
    if reason:
        line += f": {reason.strip()}"
    return f"{previous}\n{line}".strip()


def invoice_mark_paid(*, invoice: Invoice, reason: str, actor) -> Invoice:
    """Staff record a payment made outside Stripe (bank transfer, …). A draft is issued first.
    Nothing is granted: what a purchase buys is granted only by a successful card charge."""
    reason = (reason or "").strip()
    if not reason:
        raise invalid("Say why the invoice is paid (e.g. the bank transfer's reference).")
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status not in (InvoiceStatus.DRAFT, InvoiceStatus.ISSUED):
            raise conflict(f"Invoice {locked} is {locked.get_status_display()}; it cannot be marked paid.")
        if locked.attempts.filter(status=AttemptStatus.PENDING).exists():
            raise conflict("A card payment for this invoice is in progress; try again once it has finished.")
        now = clock.now()
        if locked.status == InvoiceStatus.DRAFT:
            _issue_locked(locked, now)
        locked.status = InvoiceStatus.PAID
        locked.paid_at = now
        locked.staff_note = _note(locked.staff_note, "Marked paid", reason, actor)
        locked.save(update_fields=["status", "paid_at", "staff_note"])
    return locked


# --- charging --------------------------------------------------------------------------------


def default_cards():
    """Every organisation's card to charge: its default card, not removed (one at most each)."""
    return PaymentMethod.objects.filter(removed_at__isnull=True, is_default=True)


def card_on_file(*, org: Organisation) -> bool:
    """Whether the organisation has a card to charge (its default card)."""
    return default_cards().filter(org=org).exists()


def _customer_id(org: Organisation) -> str:
    """The stored Stripe customer id (read afresh: the caller's instance may predate it)."""
    return Organisation.objects.values_list("stripe_customer_id", flat=True).get(pk=org.pk)


def _default_card(org: Organisation) -> PaymentMethod | None:
    return default_cards().filter(org=org).first()


def _attempt_create(invoice: Invoice, card: PaymentMethod) -> PaymentAttempt:
    """Records the next attempt (committed by the caller's transaction before Stripe is called)."""
    attempts = list(invoice.attempts.select_for_update().order_by("number"))
    if any(a.status == AttemptStatus.PENDING for a in attempts):
        raise conflict("A payment for this invoice is already in progress.")
    if any(a.status == AttemptStatus.SUCCEEDED for a in attempts):
        raise conflict(f"Invoice {invoice} is already paid.")
    number = len(attempts) + 1
    if number > MAX_PAYMENT_ATTEMPTS:
        raise conflict(f"Invoice {invoice} has had its {MAX_PAYMENT_ATTEMPTS} payment attempts.")
    return PaymentAttempt.objects.create(
        invoice=invoice,
        number=number,
        idempotency_key=PaymentAttempt.key_for(invoice.pk, number),
        payment_method=card,
        amount_cents=invoice.total_cents,
    )


def _metadata(attempt: PaymentAttempt) -> dict[str, str]:
    return {
        "invoice_id": str(attempt.invoice_id),
        "attempt": str(attempt.number),
        "idempotency_key": attempt.idempotency_key,
        "org_id": str(attempt.invoice.org_id),
    }


def _organisation_lock(org_id: int) -> None:
    """Locks the organisation's subscription row. A period close holds it (and then the credit
    account) when it takes the year's invoice number; a payment that takes a number and then grants
    credits or applies an upgrade takes it first too, so both lock in one order: subscription,
    credit account, number. (Taken the other way round, the two deadlocked.)"""
    Subscription.objects.select_for_update().filter(org_id=org_id).first()


def _attempt_succeed(
    attempt: PaymentAttempt, result: ChargeResult, on_paid: Callable[[Invoice], None] | None
) -> bool:
    """Writes a successful charge: attempt succeeded, a draft issued, the invoice Paid and what it
    bought granted — one transaction. Returns False if the attempt was already settled."""
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=attempt.invoice_id)  # invoice, then attempt
        locked = PaymentAttempt.objects.select_for_update().get(pk=attempt.pk)
        if locked.status != AttemptStatus.PENDING:
            return False
        _organisation_lock(invoice.org_id)
        now = clock.now()
        locked.status = AttemptStatus.SUCCEEDED
        locked.stripe_payment_intent_id = result.payment_intent_id
        locked.finished_at = timezone.now()
        if invoice.status == InvoiceStatus.DRAFT:
            _issue_locked(invoice, now)
        if invoice.status == InvoiceStatus.ISSUED:
            invoice.status = InvoiceStatus.PAID
            invoice.paid_at = now
            invoice.save(update_fields=["status", "paid_at"])
            if on_paid is not None:
                on_paid(invoice)
            elif invoice.kind != InvoiceKind.PERIOD:
                locked.error_message = (
                    f"Paid at Stripe, but no handler is registered for {invoice.kind} invoices: "
                    "grant what it bought by hand, or refund it."
                )
                log.error("Invoice %s paid without a paid-handler for kind %s", invoice, invoice.kind)
        else:
            locked.error_message = (
                f"Charged at Stripe while the invoice was {invoice.get_status_display()}: refund it."
            )
            log.error("Attempt %s succeeded on invoice %s in status %s", locked, invoice, invoice.status)
        locked.save(update_fields=["status", "stripe_payment_intent_id", "finished_at", "error_message"])
    return True


def _attempt_fail(
    attempt: PaymentAttempt,
    message: str,
    payment_intent_id: str = "",
    on_declined: Callable[[Invoice, PaymentAttempt], None] | None = None,
) -> bool:
    """Writes a failed charge: attempt failed with the bank's message; a draft is voided (and so
    never numbered), an issued invoice stays Issued and, when the bank declined it, `on_declined`
    runs. Returns False if already settled."""
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=attempt.invoice_id)  # invoice, then attempt
        locked = PaymentAttempt.objects.select_for_update().get(pk=attempt.pk)
        if locked.status != AttemptStatus.PENDING:
            return False
        locked.status = AttemptStatus.FAILED
        locked.error_message = message
        locked.stripe_payment_intent_id = payment_intent_id or locked.stripe_payment_intent_id
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "error_message", "stripe_payment_intent_id", "finished_at"])
        if invoice.status == InvoiceStatus.DRAFT:
            invoice.status = InvoiceStatus.VOID
            invoice.voided_at = clock.now()
            invoice.save(update_fields=["status", "voided_at"])
        elif on_declined is not None and invoice.status == InvoiceStatus.ISSUED:
            on_declined(invoice, locked)
    return True


def _attempt_run(attempt: PaymentAttempt, customer_id: str, on_paid, on_declined=None) -> ChargeResult:
    """Calls Stripe once for a recorded attempt and writes the outcome. If Stripe cannot be
    reached, looks the PaymentIntent up; if that fails too, the attempt stays pending for the
    reconciler and StripeUnavailable is raised."""
    invoice = attempt.invoice
    try:
        result = stripe_gateway.payment_intent_create_off_session(
            customer_id=customer_id,
            payment_method_id=attempt.payment_method.stripe_payment_method_id,
            amount_cents=attempt.amount_cents,
            currency=invoice.currency,
            idempotency_key=attempt.idempotency_key,
            metadata=_metadata(attempt),
            description=invoice.description,
        )
    except StripeUnavailable:
        result = stripe_gateway.payment_intent_find(
            customer_id=customer_id, idempotency_key=attempt.idempotency_key
        )  # raises StripeUnavailable again if Stripe is still away: the attempt stays pending
        if result is None:
            _attempt_unsent(attempt, stripe_gateway.UNAVAILABLE_MESSAGE)
            raise
    _settle(attempt, result, on_paid, on_declined)
    return result


def _attempt_unsent(attempt: PaymentAttempt, message: str) -> str:
    """Settles a pending attempt that made no PaymentIntent (looking it up by its key at Stripe
    found none). A draft's attempt fails and voids the draft, as a decline does: the customer is
    told and tries again. An issued invoice's attempt is withdrawn: deleted, so a Stripe outage
    does not use up the invoice's four attempts or send a dunning e-mail; the invoice stays due and
    the next try takes the same number and idempotency key (Stripe's own way to retry a request
    that may not have arrived). Returns "failed", "withdrawn", or "settled" if it already was."""
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=attempt.invoice_id)  # invoice, then attempt
        locked = PaymentAttempt.objects.select_for_update().filter(pk=attempt.pk).first()
        if locked is None or locked.status != AttemptStatus.PENDING:
            return "settled"
        if invoice.status == InvoiceStatus.DRAFT:
            _attempt_fail(locked, message)
            return "failed"
        locked.delete()
    log.warning("%s made no PaymentIntent (%s): withdrawn, the invoice stays due", attempt, message)
    return "withdrawn"


def _settle(attempt: PaymentAttempt, result: ChargeResult, on_paid, on_declined=None) -> None:
    if result.status == "succeeded":
        if not _attempt_succeed(attempt, result, on_paid):
            settled = PaymentAttempt.objects.get(pk=attempt.pk)
            if (
                settled.status == AttemptStatus.FAILED
            ):  # settled as failed meanwhile: money taken, nothing given
                note = f"Stripe charged {result.payment_intent_id} after this attempt was settled as failed: refund it."
                PaymentAttempt.objects.filter(pk=attempt.pk).update(
                    error_message=f"{settled.error_message}\n{note}".strip(),
                    stripe_payment_intent_id=result.payment_intent_id,
                )
                log.error("Attempt %s: %s", settled, note)
    elif result.status == "declined":
        _attempt_fail(attempt, result.message, result.payment_intent_id, on_declined)
    else:  # still processing: a webhook or the reconciler settles it
        PaymentAttempt.objects.filter(pk=attempt.pk, stripe_payment_intent_id="").update(
            stripe_payment_intent_id=result.payment_intent_id
        )


def purchase_charge(
    *,
    org: Organisation,
    lines: list[LineSpec],
    description: str,
    on_paid: Callable[[Invoice], None],
    kind: str = InvoiceKind.PURCHASE,
    fulfilment: dict | None = None,
) -> Invoice:
    """Charges the default card for a customer-initiated purchase (a pack, a recharge, an upgrade).

    Creates a Draft invoice with `lines` and records attempt 1 (committed), then calls Stripe
    off-session once. Paid: in one transaction the attempt succeeds, the invoice is issued (next
    number) and marked Paid, and `on_paid(invoice)` grants what it bought. Declined: the draft is
    voided, never numbered, and PaymentDeclined (402) is raised. `fulfilment` (JSON) is stored on
    the invoice for the handler registered with `on_paid_register(kind, ...)`, which the
    reconciler calls instead of `on_paid` if this request dies after Stripe answered.
    """
    if not lines:
        raise invalid("Nothing to charge.")
    card = _default_card(org)
    customer_id = _customer_id(org)
    if card is None or not customer_id:
        raise no_card()
    with transaction.atomic():
        invoice = invoice_draft_create(
            org=org, lines=lines, description=description, kind=kind, fulfilment=fulfilment
        )
        if invoice.total_cents <= 0:
            raise invalid("Nothing to charge: the total is $0.00.")
        attempt = _attempt_create(invoice, card)
    result = _attempt_run(attempt, customer_id, on_paid)
    invoice.refresh_from_db()
    if result.status == "declined":
        raise PaymentDeclined(result.message, invoice)
    if result.status == "pending":
        raise BillingError(
            "PAYMENT_PENDING", "Your bank is still processing the payment; it completes on its own.", 409
        )
    return invoice


def invoice_charge(
    *, invoice: Invoice, on_declined: Callable[[Invoice, PaymentAttempt], None] | None = None
) -> PaymentAttempt:
    """Charges an issued invoice (a period's) to the organisation's default card: the next attempt
    of at most four. Success → Paid; a decline leaves it Issued (the attempt says why) and runs
    `on_declined` (by default the handler registered for the invoice's kind) in the decline's
    transaction. Without a card nothing is attempted (PAYMENT_METHOD_REQUIRED)."""
    org = invoice.org
    card = _default_card(org)
    customer_id = _customer_id(org)
    if card is None or not customer_id:
        raise no_card()
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if locked.status != InvoiceStatus.ISSUED:
            raise conflict(
                f"Invoice {locked} is {locked.get_status_display()}; only issued invoices are charged."
            )
        attempt = _attempt_create(locked, card)
    _attempt_run(
        attempt,
        customer_id,
        on_paid=_ON_PAID.get(locked.kind),
        on_declined=on_declined or _ON_DECLINED.get(locked.kind),
    )
    attempt.refresh_from_db()
    return attempt


def _attempt_reconcile(attempt: PaymentAttempt) -> str:
    """Settles one pending attempt from what Stripe holds for it; never makes a PaymentIntent."""
    customer_id = attempt.invoice.org.stripe_customer_id
    result = None
    if attempt.stripe_payment_intent_id:
        result = stripe_gateway.payment_intent_retrieve(attempt.stripe_payment_intent_id)
    if result is None and customer_id:
        result = stripe_gateway.payment_intent_find(
            customer_id=customer_id, idempotency_key=attempt.idempotency_key
        )
    if result is None:
        return _attempt_unsent(attempt, "Interrupted before reaching Stripe: no payment was made.")
    kind = attempt.invoice.kind
    _settle(attempt, result, _ON_PAID.get(kind), _ON_DECLINED.get(kind))
    attempt.refresh_from_db()
    return attempt.status


def payment_attempts_reconcile(*, older_than: timedelta = RECONCILE_AFTER) -> dict[str, int]:
    """Finishes every attempt left pending (a crash or lost answer between Stripe and our write)
    that is older than `older_than`. Idempotent; run by billing_tick. Returns counts by outcome."""
    cutoff = timezone.now() - older_than
    pending = PaymentAttempt.objects.filter(
        status=AttemptStatus.PENDING, created_at__lte=cutoff
    ).select_related("invoice__org", "payment_method")
    outcome: dict[str, int] = {}
    for attempt in pending:
        try:
            status = _attempt_reconcile(attempt)
        except StripeUnavailable:
            log.warning("Stripe unavailable: attempt %s stays pending", attempt)
            status = "unreachable"
        outcome[status] = outcome.get(status, 0) + 1
    return outcome


# --- payment methods -------------------------------------------------------------------------


def payment_method_setup_start(*, org: Organisation) -> stripe_gateway.SetupIntentInfo:
    """A SetupIntent for the Payment methods page (creates the Stripe customer once)."""
    customer_id = stripe_gateway.customer_ensure(org)
    return stripe_gateway.setup_intent_create(customer_id=customer_id)


def _card_not_ours() -> BillingError:
    return not_found("That card is not on this organisation's account.")


def payment_method_add(
    *, org: Organisation, stripe_payment_method_id: str, setup_intent_id: str | None = None
) -> PaymentMethod:
    """Saves a card the page set up with Stripe.js. The card must be attached to this
    organisation's customer — or come from this customer's succeeded SetupIntent, in which case
    it is attached here (localstripe's SetupIntents do not attach). The first card is the default."""
    customer_id = _customer_id(org)
    if not customer_id:
        raise _card_not_ours()
    existing = PaymentMethod.objects.filter(
        org=org, stripe_payment_method_id=stripe_payment_method_id, removed_at__isnull=True
    ).first()
    if existing is not None:
        return existing
    details = stripe_gateway.payment_method_details(stripe_payment_method_id)
    if details is None:
        raise _card_not_ours()
    if details.customer_id != customer_id:
        if details.customer_id is not None or not setup_intent_id:
            raise _card_not_ours()
        setup = stripe_gateway.setup_intent_retrieve(setup_intent_id)
        if (
            setup is None
            or setup.customer_id != customer_id
            or setup.payment_method_id != stripe_payment_method_id
            or setup.status != "succeeded"
        ):
            raise _card_not_ours()
        details = stripe_gateway.payment_method_attach(
            payment_method_id=stripe_payment_method_id, customer_id=customer_id
        )
    with transaction.atomic():
        Organisation.objects.select_for_update().get(pk=org.pk)
        again = PaymentMethod.objects.filter(
            org=org, stripe_payment_method_id=details.id, removed_at__isnull=True
        ).first()
        if again is not None:
            return again
        has_default = PaymentMethod.objects.filter(org=org, removed_at__isnull=True, is_default=True).exists()
        return PaymentMethod.objects.create(
            org=org,
            stripe_payment_method_id=details.id,
            brand=details.brand[:30],
            last4=details.last4[:4],
            exp_month=details.exp_month,
            exp_year=details.exp_year,
            is_default=not has_default,
        )


def _card_of(org: Organisation, payment_method_id: int) -> PaymentMethod:
    card = PaymentMethod.objects.filter(org=org, pk=payment_method_id, removed_at__isnull=True).first()
    if card is None:
        raise not_found("No such card.")
    return card


def payment_method_make_default(*, org: Organisation, payment_method_id: int) -> PaymentMethod:
    """Makes one of the organisation's cards the one charged from now on."""
    with transaction.atomic():
        Organisation.objects.select_for_update().get(pk=org.pk)
        card = _card_of(org, payment_method_id)
        if not card.is_default:
            PaymentMethod.objects.filter(org=org, is_default=True).update(is_default=False)
            card.is_default = True
            card.save(update_fields=["is_default"])
    return card


def _on_paid_plan(org: Organisation) -> bool:
    sub = getattr(org, "subscription", None)
    return sub is not None and not sub.plan.is_free


def payment_method_remove(*, org: Organisation, payment_method_id: int) -> PaymentMethod:
    """Removes a card (detached at Stripe first, so a failure there changes nothing). The last
    card cannot go while the organisation is on a paid plan; removing the default promotes the
    newest remaining card."""
    card = _card_of(org, payment_method_id)
    others = PaymentMethod.objects.filter(org=org, removed_at__isnull=True).exclude(pk=card.pk)
    if not others.exists() and _on_paid_plan(org):
        raise conflict("This is your only card and your plan is paid: add another card before removing it.")
    stripe_gateway.payment_method_detach(card.stripe_payment_method_id)
    with transaction.atomic():
        Organisation.objects.select_for_update().get(pk=org.pk)
        card = PaymentMethod.objects.select_for_update().get(pk=card.pk)
        if card.removed_at is not None:
            return card
        was_default = card.is_default
        card.removed_at = timezone.now()
        card.is_default = False
        card.save(update_fields=["removed_at", "is_default"])
        if was_default:
            successor = (
                PaymentMethod.objects.filter(org=org, removed_at__isnull=True)
                .order_by("-created_at", "-pk")
                .first()
            )
            if successor is not None:
                successor.is_default = True
                successor.save(update_fields=["is_default"])
    return card


# --- PDFs ------------------------------------------------------------------------------------

PDF_STATUSES = (InvoiceStatus.ISSUED, InvoiceStatus.PAID, InvoiceStatus.VOID, InvoiceStatus.REFUNDED)


def invoice_pdf(*, invoice: Invoice) -> InvoicePdf:
    """The PDF of the invoice as its status is now: rendered the first time it is asked for (by a
    download or by the worker), then stored and served byte for byte until the status changes.
    Drafts have none."""
    from invoices import pdf, selectors

    if invoice.number is None or invoice.status not in PDF_STATUSES:
        raise invalid("Only issued invoices have a PDF.")
    stored = InvoicePdf.objects.filter(invoice=invoice, status=invoice.status).first()
    if stored is not None:
        return stored
    emails = list(
        invoice.org.memberships.filter(role__in=[Role.OWNER, Role.BILLING_ADMIN])
        .order_by("user__email")
        .values_list("user__email", flat=True)
    )
    content = pdf.invoice_pdf_bytes(
        invoice=invoice,
        lines=list(invoice.lines.order_by("position", "pk")),
        seller=selectors.seller(),
        customer_emails=emails,
        period_last_day=selectors.period_last_day(invoice.period_end),
    )
    try:
        with transaction.atomic():
            return InvoicePdf.objects.create(
                invoice=invoice,
                status=invoice.status,
                content=content,
                sha256=hashlib.sha256(content).hexdigest(),
            )
    except IntegrityError:  # rendered at the same moment elsewhere: serve that one
        return InvoicePdf.objects.get(invoice=invoice, status=invoice.status)


def invoice_pdfs_render_missing(*, limit: int = 200) -> int:
    """Renders the PDFs that issued invoices lack for their current status (the worker's job,
    `invoices.pdfs_render`), at most `limit` a call so each run stays short."""
    missing = (
        Invoice.objects.filter(status__in=PDF_STATUSES, number__isnull=False)
        .exclude(pdfs__status=F("status"))
        .select_related("org")
        .order_by("pk")[:limit]
    )
    rendered = 0
    for invoice in missing:
        invoice_pdf(invoice=invoice)
        rendered += 1
    return rendered


# --- Stripe webhooks -------------------------------------------------------------------------

# Events that can settle a charge attempt; any other type is stored and marked ignored.
PAYMENT_EVENTS = {"payment_intent.succeeded", "payment_intent.payment_failed"}


def webhook_event_store(*, event: dict) -> tuple[StripeWebhookEvent, bool]:
    """Stores a verified event once by its Stripe id; returns (event, created). A replay of the
    same id stores nothing and is not processed again."""
    stored, created = StripeWebhookEvent.objects.get_or_create(
        stripe_event_id=event["id"], defaults={"type": str(event["type"])[:100], "payload": event}
    )
    return stored, created


def webhook_event_process(*, event_pk: int) -> str:
    """Processes one stored event, once: a payment event settles the attempt it names from what
    Stripe holds now (so replays and out-of-order events change nothing twice)."""
    with transaction.atomic():
        event = StripeWebhookEvent.objects.select_for_update().get(pk=event_pk)
        if event.status != WebhookStatus.RECEIVED:
            return event.status
        event.status = WebhookStatus.PROCESSING
        event.save(update_fields=["status"])
    outcome, error = WebhookStatus.PROCESSED, ""
    try:
        if event.type in PAYMENT_EVENTS:
            _webhook_payment_settle(event.payload)
        else:
            outcome = WebhookStatus.IGNORED
    except Exception as exc:  # noqa: BLE001 - stored and visible in admin, retried by the tick
        log.exception("webhook %s failed", event.stripe_event_id)
        outcome, error = WebhookStatus.FAILED, f"{type(exc).__name__}: {exc}"[:2000]
    StripeWebhookEvent.objects.filter(pk=event.pk).update(
        status=outcome, error=error, processed_at=timezone.now()
    )
    return outcome


def _webhook_payment_settle(payload: dict) -> None:
    intent = (payload.get("data") or {}).get("object") or {}
    metadata = intent.get("metadata") or {}
    attempts = PaymentAttempt.objects.select_related("invoice__org", "payment_method")
    attempt = None
    if metadata.get("idempotency_key"):
        attempt = attempts.filter(idempotency_key=metadata["idempotency_key"]).first()
    if attempt is None and intent.get("id"):
        attempt = attempts.filter(stripe_payment_intent_id=intent["id"]).first()
    if attempt is None or attempt.status != AttemptStatus.PENDING:
        return  # not ours, or already settled by the request or an earlier event
    _attempt_reconcile(attempt)


def webhook_events_process_pending(*, limit: int = 500) -> int:
    """Processes stored events no worker has taken (and retries failed ones): billing_tick's step."""
    StripeWebhookEvent.objects.filter(status=WebhookStatus.FAILED).update(status=WebhookStatus.RECEIVED)
    stale = timezone.now() - timedelta(minutes=5)
    StripeWebhookEvent.objects.filter(status=WebhookStatus.PROCESSING, received_at__lte=stale).update(
        status=WebhookStatus.RECEIVED
    )
    pending = StripeWebhookEvent.objects.filter(status=WebhookStatus.RECEIVED).order_by("pk")
    done = 0
    for pk in list(pending.values_list("pk", flat=True)[:limit]):
        webhook_event_process(event_pk=pk)
        done += 1
    return done
