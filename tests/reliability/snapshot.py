"""The canonical state of organisations: what a customer, staff and Stripe could see of them, with
nothing that differs between two equal histories (database ids, Stripe ids, wall-clock stamps).

Two runs of the same scenario compare equal when each organisation has the same plan and periods,
the same balance in each bucket, the same lots and ledger entries, the same jobs and usage, the same
numbered invoices (number, amounts, lines, status, the retry schedule of an unpaid one), the same
PaymentIntents at Stripe (by invoice number, amount and status), the same paid purchases, recharge
and alert state and commitment tier, and the same e-mails were sent. What a crash leaves as history
without changing any of that is not compared: a voided draft that never had a number, a payment
attempt that never reached Stripe, a purchase that failed before its card was charged.
"""

from collections import Counter

from django.core import mail

from accounts.models import BillingPeriod, Organisation, Subscription
from invoices.models import Invoice, InvoiceStatus, StripeWebhookEvent
from usage.models import (
    Bucket,
    Commitment,
    CommitmentPeriod,
    CreditAccount,
    CreditLot,
    CreditPurchase,
    Job,
    LedgerEntry,
    LowBalanceAlert,
    PurchaseStatus,
    RechargeSetting,
    UsageEvent,
    UsageRollup,
)


def _day(moment):
    return moment.date().isoformat() if moment else None


def organisation_state(org_id: int, intents: list[dict]) -> dict:
    org = Organisation.objects.get(pk=org_id)
    periods = {p.pk: p for p in BillingPeriod.objects.filter(org_id=org_id).select_related("plan")}
    invoices = {i.pk: i for i in Invoice.objects.filter(org_id=org_id).prefetch_related("lines")}

    def source(text: str) -> str:
        """A lot's source with our ids replaced by what they stand for."""
        kind, _, rest = text.partition(":")
        if kind == "period":
            return f"period from {_day(periods[int(rest)].start)}"
        if kind == "invoice":
            pk, _, bonus = rest.partition(":")
            return f"invoice {invoices[int(pk)].number}{' bonus' if bonus else ''}"
        if kind == "upgrade":
            pk, _, code = rest.partition(":")
            return f"upgrade of the period from {_day(periods[int(pk)].start)} to {code}"
        return text

    sub = Subscription.objects.select_related("plan", "scheduled_plan").get(org_id=org_id)
    account = CreditAccount.objects.get(org_id=org_id)
    lots = CreditLot.objects.filter(org_id=org_id)
    ledger = Counter(
        (
            e.kind,
            e.credits,
            source(e.lot.source) if e.lot_id else None,
            e.job_id is not None,
            _day(periods[e.period_id].start) if e.period_id else None,
            e.reason,
        )
        for e in LedgerEntry.objects.filter(org_id=org_id).select_related("lot")
    )
    recharge = RechargeSetting.objects.filter(org_id=org_id).first()
    alert = LowBalanceAlert.objects.filter(org_id=org_id).first()
    commitment = Commitment.objects.filter(org_id=org_id).first()
    numbered = sorted((i for i in invoices.values() if i.number), key=lambda i: i.number)
    return {
        "subscription": (
            sub.plan.code,
            sub.scheduled_plan.code if sub.scheduled_plan else None,
            sub.anchor_day,
            sub.upgrade_pending_since is not None,
        ),
        "periods": [
            (
                _day(p.start),
                _day(p.end),
                p.plan.code,
                p.monthly_credits,
                p.credits_used,
                p.overage_credits,
                bool(p.closed_at),
            )
            for p in sorted(periods.values(), key=lambda p: p.start)
        ],
        "account": (account.balance, account.overage_held, account.running_jobs, account.recharge_below),
        "buckets": {
            Bucket(b).label: sum(lot.remaining for lot in lots if lot.bucket == b) for b in Bucket.values
        },
        "lots": sorted(
            (
                lot.bucket,
                source(lot.source),
                lot.granted,
                lot.remaining,
                _day(lot.expires_at),
                bool(lot.expired_at),
            )
            for lot in lots
        ),
        "ledger": sorted(ledger.items(), key=repr),
        "jobs": sorted(
            Job.objects.filter(org_id=org_id).values_list(
                "product", "mode", "pages", "status", "credits_charged"
            )
        ),
        "usage": sorted(
            UsageRollup.objects.filter(org_id=org_id).values_list(
                "day", "product", "mode", "credits", "units"
            )
        ),
        "events": UsageEvent.objects.filter(org_id=org_id).count(),
        "invoices": [
            (
                i.number,
                i.kind,
                i.status,
                i.subtotal_cents,
                i.tax_cents,
                i.total_cents,
                i.description,
                [(line.description, line.quantity, line.amount_cents) for line in i.lines.all()],
                _day(i.period_start),
                _day(i.period_end),
                _day(i.first_failed_at) if i.status == InvoiceStatus.ISSUED else None,
                _day(i.next_attempt_at) if i.status == InvoiceStatus.ISSUED else None,
            )
            for i in numbered
        ],
        "payment intents": sorted(
            (
                invoices[int(pi["metadata"]["invoice_id"])].number,
                pi["amount"],
                pi["status"],
            )
            for pi in intents
            if org.stripe_customer_id and pi.get("customer") == org.stripe_customer_id
        ),
        "paid purchases": sorted(
            (
                p.kind,
                p.status,
                p.quantity,
                p.amount_cents,
                p.credits,
                p.bonus_credits,
                p.tier,
                p.invoice.number,
            )
            for p in CreditPurchase.objects.filter(
                org_id=org_id, status__in=[PurchaseStatus.PAID, PurchaseStatus.REFUNDED]
            ).select_related("invoice")
        ),
        "recharge": (recharge.enabled, recharge.failures, recharge.next_try_at is not None)
        if recharge
        else None,
        "alert": (alert.enabled, alert.armed) if alert else None,
        "commitment": (
            commitment.tier if commitment else None,
            sorted(
                (_day(p.start), _day(p.end), p.purchased_cents, p.tier, bool(p.closed_at))
                for p in CommitmentPeriod.objects.filter(org_id=org_id)
            ),
        ),
    }


def state(org_ids: dict[str, int], intents: list[dict]) -> dict:
    """{organisation name: its state} plus the e-mails sent and the webhook events' outcomes."""
    return {
        **{name: organisation_state(org_id, intents) for name, org_id in org_ids.items()},
        "e-mails": sorted((m.subject, tuple(m.to)) for m in mail.outbox),
        "webhook events": sorted(StripeWebhookEvent.objects.values_list("stripe_event_id", "type", "status")),
    }
