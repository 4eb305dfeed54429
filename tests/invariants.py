"""The invariants of credits, usage, invoices and payments, checked after every kind of test that
moves them, and by the concurrency soak (`make soak`) over everything it did.

Each `*_anomalies` function returns what it found wrong, one sentence per anomaly (an empty list
when all is well); `assert_ledger_consistent` is the ledger's check as an assertion.
"""

import re
from collections import Counter, defaultdict

from django.db import connection
from django.db.models import Count, Q, Sum

from accounts.models import BillingPeriod, Organisation, Subscription
from invoices.models import (
    MAX_PAYMENT_ATTEMPTS,
    AttemptStatus,
    Invoice,
    InvoiceKind,
    InvoiceNumberSequence,
    InvoiceStatus,
    PaymentAttempt,
)
from usage.models import (
    RECHARGE_KINDS,
    Bucket,
    CreditAccount,
    CreditLot,
    CreditPurchase,
    EntryKind,
    Job,
    JobStatus,
    LedgerEntry,
    PurchaseStatus,
    RechargeSetting,
    UsageEvent,
    UsageRollup,
)

# --- credits ---------------------------------------------------------------------------------


def ledger_anomalies(org_id: int) -> list[str]:
    """The balance equals the sum of the lots and of their entries; each lot equals its entries
    and stays within its grant; the cached job totals match the jobs; failed jobs cost nothing."""
    found = []
    account = CreditAccount.objects.get(org_id=org_id)
    lots = CreditLot.objects.filter(org_id=org_id)
    lot_sum = lots.aggregate(s=Sum("remaining"))["s"] or 0
    entry_sum = (
        LedgerEntry.objects.filter(org_id=org_id, lot__isnull=False).aggregate(s=Sum("credits"))["s"] or 0
    )
    if not account.balance == lot_sum == entry_sum:
        found.append(
            f"org {org_id}: balance {account.balance} but lots hold {lot_sum} and their entries {entry_sum}"
        )
    by_lot = dict(
        LedgerEntry.objects.filter(org_id=org_id, lot__isnull=False)
        .values("lot_id")
        .annotate(s=Sum("credits"))
        .values_list("lot_id", "s")
    )
    for lot in lots:
        if lot.remaining != by_lot.get(lot.pk, 0):
            found.append(
                f"org {org_id}: {lot} holds {lot.remaining} but its entries add up to {by_lot.get(lot.pk, 0)}"
            )
        if not 0 <= lot.remaining <= lot.granted:
            found.append(f"org {org_id}: {lot} is outside 0..{lot.granted}")
    running = Job.objects.filter(org_id=org_id, status=JobStatus.RUNNING)
    if account.running_jobs != running.count():
        found.append(f"org {org_id}: running_jobs {account.running_jobs}, but {running.count()} jobs run")
    held = running.aggregate(s=Sum("held_overage"))["s"] or 0
    if account.overage_held != held:
        found.append(f"org {org_id}: overage_held {account.overage_held}, but running jobs hold {held}")
    if Job.objects.filter(org_id=org_id, status=JobStatus.FAILED, credits_charged__gt=0).exists():
        found.append(f"org {org_id}: a failed job was charged")
    return found


def assert_ledger_consistent(org_id: int) -> None:
    found = ledger_anomalies(org_id)
    assert not found, found


def bucket_history_anomalies() -> list[str]:
    """No lot, and no bucket of an organisation, was ever below zero: the running sum of the
    entries, in the order they were written (one organisation's writes are serialised by its
    lock, so entry ids are that order), never goes negative."""
    entries = LedgerEntry._meta.db_table
    lots = CreditLot._meta.db_table
    running = (
        "SELECT e.org_id, l.bucket, e.lot_id, SUM(e.credits) OVER (PARTITION BY {by} ORDER BY e.id) AS total "
        f"FROM {entries} e JOIN {lots} l ON l.id = e.lot_id"  # noqa: S608 (our tables)
    )
    found = []
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT org_id, lot_id, MIN(total) FROM ({running.format(by='e.lot_id')}) t "
            "GROUP BY org_id, lot_id HAVING MIN(total) < 0"
        )
        found += [f"org {org}: lot {lot} went down to {low}" for org, lot, low in cursor.fetchall()]
        cursor.execute(
            f"SELECT org_id, bucket, MIN(total) FROM ({running.format(by='e.org_id, l.bucket')}) t "
            "GROUP BY org_id, bucket HAVING MIN(total) < 0"
        )
        found += [
            f"org {org}: the {Bucket(bucket).label} bucket went down to {low}"
            for org, bucket, low in cursor.fetchall()
        ]
    return found


def job_anomalies() -> list[str]:
    """Each job's entries add up to what it was charged: a succeeded job's holds, releases and
    overage to its charge, a failed job's to nothing, a running job's holds to its hold."""
    sums: dict = defaultdict(int)
    for job_id, kind, total in (
        LedgerEntry.objects.filter(
            job__isnull=False, kind__in=[EntryKind.HOLD, EntryKind.RELEASE, EntryKind.OVERAGE]
        )
        .values_list("job_id", "kind")
        .annotate(s=Sum("credits"))
    ):
        sums[job_id, kind] += total
    found = []
    for job in Job.objects.only("id", "status", "credits_charged", "held_from_lots", "held_overage"):
        hold = -sums[job.id, EntryKind.HOLD]
        net = -(
            sums[job.id, EntryKind.HOLD] + sums[job.id, EntryKind.RELEASE] + sums[job.id, EntryKind.OVERAGE]
        )
        if hold != job.held_from_lots:
            found.append(f"{job}: holds {job.held_from_lots} from lots but its HOLD entries say {hold}")
        expected = {JobStatus.SUCCEEDED: job.credits_charged, JobStatus.FAILED: 0}.get(
            job.status, job.held_from_lots
        )
        if net != expected:
            found.append(f"{job}: its entries charge {net}, expected {expected}")
        if job.credits_charged > job.held_from_lots + job.held_overage:
            found.append(f"{job}: charged {job.credits_charged}, more than it held")
    return found


def period_anomalies() -> list[str]:
    """Periods follow each other without gap or overlap; only the current one is open; no closed
    period keeps unexpired plan credits; each period's overage is its lot-less overage entries,
    and all periods together used what the jobs and events were charged."""
    found = []
    overage_entries = dict(
        LedgerEntry.objects.filter(kind=EntryKind.OVERAGE, lot__isnull=True, period__isnull=False)
        .values("period_id")
        .annotate(s=Sum("credits"))
        .values_list("period_id", "s")
    )
    charged = defaultdict(int)
    for org_id, total in (
        UsageEvent.objects.values("org_id").annotate(s=Sum("credits")).values_list("org_id", "s")
    ):
        charged[org_id] += total
    for org_id, total in (
        Job.objects.filter(status=JobStatus.SUCCEEDED)
        .values("org_id")
        .annotate(s=Sum("credits_charged"))
        .values_list("org_id", "s")
    ):
        charged[org_id] += total
    for sub in Subscription.objects.all():
        periods = list(BillingPeriod.objects.filter(org_id=sub.org_id).order_by("start"))
        for before, after in zip(periods, periods[1:], strict=False):
            if after.start != before.end:
                found.append(f"org {sub.org_id}: {before} is followed by {after}")
        if not periods or periods[-1].pk != sub.current_period_id:
            found.append(f"org {sub.org_id}: the current period is not the latest")
        for period in periods:
            is_current = period.pk == sub.current_period_id
            if is_current == (period.closed_at is not None):
                found.append(f"org {sub.org_id}: {period} is {'closed' if is_current else 'still open'}")
            if (
                not is_current
                and CreditLot.objects.filter(
                    period=period, bucket=Bucket.PLAN, expired_at__isnull=True
                ).exists()
            ):
                found.append(f"org {sub.org_id}: closed {period} still has unexpired plan credits")
            if period.overage_credits != -overage_entries.get(period.pk, 0):
                found.append(
                    f"org {sub.org_id}: {period} has {period.overage_credits} overage credits, "
                    f"its entries {-overage_entries.get(period.pk, 0)}"
                )
        used = sum(p.credits_used for p in periods)
        if used != charged[sub.org_id]:
            found.append(
                f"org {sub.org_id}: periods used {used} credits, jobs and events were charged {charged[sub.org_id]}"
            )
    return found


# --- usage events and rollups ------------------------------------------------------------------


def event_anomalies(accepted: dict[int, tuple[set[str], int]] | None = None) -> list[str]:
    """Every event id is stored once per organisation, and the daily rollups hold exactly the
    stored events and the succeeded jobs. `accepted`, from the callers' side ({org id: (the ids
    sent in batches that were accepted, the sum of their `accepted` counts)}), must match the
    stored events: each id counted once, none lost."""
    found = []
    for org_id, event_id, n in (
        UsageEvent.objects.values("org_id", "event_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values_list("org_id", "event_id", "n")
    ):
        found.append(f"org {org_id}: event {event_id} stored {n} times")
    for org_id, (sent, counted) in (accepted or {}).items():
        stored = set(UsageEvent.objects.filter(org_id=org_id).values_list("event_id", flat=True))
        if stored != sent:
            found.append(
                f"org {org_id}: {len(sent - stored)} accepted event ids missing, {len(stored - sent)} stored that were never accepted"
            )
        if counted != len(stored):
            found.append(f"org {org_id}: the API counted {counted} events accepted, {len(stored)} are stored")
    expected: dict = defaultdict(lambda: [0, 0])
    for org_id, day, product, mode, credits, units in (
        UsageEvent.objects.values("org_id", "charged_on", "product", "mode")
        .annotate(c=Sum("credits"), u=Sum("units"))
        .values_list("org_id", "charged_on", "product", "mode", "c", "u")
    ):
        row = expected[org_id, day, product, mode]
        row[0] += credits
        row[1] += units
    for job in Job.objects.filter(status=JobStatus.SUCCEEDED).only(
        "org_id",
        "finished_at",
        "product",
        "mode",
        "ocr",
        "pages_charged",
        "credits_per_page",
        "ocr_credits_per_page",
    ):
        day = job.finished_at.date()
        row = expected[job.org_id, day, job.product, job.mode]
        row[0] += job.pages_charged * job.credits_per_page
        row[1] += job.pages_charged
        if job.ocr:
            row = expected[job.org_id, day, job.product, "ocr"]
            row[0] += job.pages_charged * job.ocr_credits_per_page
            row[1] += job.pages_charged
    rollups = {(r.org_id, r.day, r.product, r.mode): [r.credits, r.units] for r in UsageRollup.objects.all()}
    for key in sorted(set(expected) | set(rollups), key=str):
        if expected.get(key, [0, 0]) != rollups.get(key, [0, 0]):
            found.append(
                f"rollup {key}: {rollups.get(key)} (credits, units), the events and jobs make {expected.get(key)}"
            )
    return found


# --- invoices and payments ---------------------------------------------------------------------

NUMBER = re.compile(r"^INV-(\d{4})-(\d{6,})$")


def invoice_number_anomalies() -> list[str]:
    """Per calendar year of issue, numbers run 1, 2, 3 … with no gap and no repeat, up to the
    year's sequence; drafts have none."""
    found = []
    by_year: dict[int, list[int]] = defaultdict(list)
    for number, issued_at, status in Invoice.objects.exclude(number=None).values_list(
        "number", "issued_at", "status"
    ):
        match = NUMBER.match(number)
        if match is None or issued_at is None or int(match.group(1)) != issued_at.year:
            found.append(f"invoice {number} ({status}, issued {issued_at}) is not numbered in its year")
            continue
        by_year[int(match.group(1))].append(int(match.group(2)))
    sequences = dict(InvoiceNumberSequence.objects.values_list("year", "last"))
    for year in sorted(set(by_year) | set(sequences)):
        numbers = sorted(by_year.get(year, []))
        repeated = [n for n, c in Counter(numbers).items() if c > 1]
        if repeated:
            found.append(f"{year}: numbers used twice: {repeated[:10]}")
        missing = sorted(set(range(1, sequences.get(year, 0) + 1)) - set(numbers))
        if missing:
            found.append(f"{year}: numbers skipped: {missing[:10]}")
        if numbers and numbers[-1] != sequences.get(year, 0):
            found.append(
                f"{year}: the last number is {numbers[-1]}, the sequence says {sequences.get(year, 0)}"
            )
    if Invoice.objects.filter(status=InvoiceStatus.DRAFT).exclude(number=None).exists():
        found.append("a draft has a number")
    return found


def localstripe_payment_intents() -> list[dict]:
    """Every PaymentIntent the Stripe server (localstripe) holds for our organisations' customers,
    as plain dicts (a test session's localstripe also holds those of earlier tests)."""
    import stripe

    from invoices import stripe_gateway

    ours = set(
        Organisation.objects.exclude(stripe_customer_id="").values_list("stripe_customer_id", flat=True)
    )
    stripe_gateway.configure()
    return [
        pi.to_dict() for pi in stripe.PaymentIntent.list(limit=100).auto_paging_iter() if pi.customer in ours
    ]


def payment_anomalies(intents: list[dict], *, settled: bool = True) -> list[str]:
    """At most one PaymentIntent per charge attempt (matched by the idempotency key in its
    metadata) and at most four per invoice, on Stripe's side as on ours; each succeeded attempt has
    exactly its succeeded PaymentIntent for the invoice's amount and a paid invoice, and no failed
    attempt has a succeeded one. `settled`: nothing may be left pending."""
    found = []
    attempts = {a.idempotency_key: a for a in PaymentAttempt.objects.select_related("invoice__org")}
    by_key: dict[str, list[dict]] = defaultdict(list)
    by_invoice: dict[str, list[dict]] = defaultdict(list)
    for pi in intents:
        metadata = pi.get("metadata") or {}
        key = metadata.get("idempotency_key")
        if key not in attempts:
            found.append(
                f"PaymentIntent {pi['id']} ({pi.get('status')}) matches no attempt of ours: {metadata}"
            )
            continue
        by_key[key].append(pi)
        by_invoice[metadata.get("invoice_id")].append(pi)
    for key, pis in by_key.items():
        if len(pis) > 1:
            found.append(f"attempt {key} has {len(pis)} PaymentIntents: {[p['id'] for p in pis]}")
    for invoice_id, pis in by_invoice.items():
        if len(pis) > MAX_PAYMENT_ATTEMPTS:
            found.append(f"invoice {invoice_id} has {len(pis)} PaymentIntents")
    for key, attempt in attempts.items():
        pis = by_key.get(key, [])
        invoice = attempt.invoice
        if attempt.status == AttemptStatus.PENDING and settled:
            found.append(f"{attempt} was left pending")
        if attempt.stripe_payment_intent_id and attempt.stripe_payment_intent_id not in {
            p["id"] for p in pis
        }:
            found.append(
                f"{attempt} names {attempt.stripe_payment_intent_id}, which Stripe does not hold for it"
            )
        for pi in pis:
            if pi.get("customer") != invoice.org.stripe_customer_id:
                found.append(f"{pi['id']} of {attempt} was charged to another customer")
            if pi.get("amount") != attempt.amount_cents or attempt.amount_cents != invoice.total_cents:
                found.append(
                    f"{pi['id']} of {attempt}: {pi.get('amount')} cents for a {invoice.total_cents}-cent invoice"
                )
        succeeded = [p for p in pis if p.get("status") == "succeeded"]
        if attempt.status == AttemptStatus.SUCCEEDED:
            if [p["id"] for p in succeeded] != [attempt.stripe_payment_intent_id]:
                found.append(f"{attempt} succeeded, Stripe holds {[(p['id'], p.get('status')) for p in pis]}")
            if invoice.status not in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED):
                found.append(f"{attempt} succeeded but invoice {invoice} is {invoice.status}")
        elif succeeded:
            found.append(f"{attempt} is {attempt.status} but Stripe charged {succeeded[0]['id']}")
    per_invoice = (
        PaymentAttempt.objects.values("invoice_id")
        .annotate(n=Count("id"), ok=Count("id", filter=Q(status=AttemptStatus.SUCCEEDED)))
        .values_list("invoice_id", "n", "ok")
    )
    for invoice_id, n, ok in per_invoice:
        if n > MAX_PAYMENT_ATTEMPTS or ok > 1:
            found.append(f"invoice {invoice_id}: {n} attempts, {ok} succeeded")
    card_paid = Invoice.objects.filter(status__in=[InvoiceStatus.PAID, InvoiceStatus.REFUNDED]).exclude(
        staff_note__contains="Marked paid"
    )
    for invoice in card_paid.exclude(attempts__status=AttemptStatus.SUCCEEDED):
        found.append(f"invoice {invoice} is {invoice.status} without a succeeded payment")
    return found


def purchase_anomalies() -> list[str]:
    """Credits are granted exactly for paid purchases: a paid (or refunded) purchase has a paid (or
    refunded) invoice of its amount, one purchased lot of its credits and its bonus lot; any other
    has no lot and no paid invoice; every lot granted from an invoice belongs to one paid purchase.
    Threshold and scheduled recharges paid in a month never add up to more than their cap."""
    found = []
    claimed: Counter = Counter()
    paid_statuses = (PurchaseStatus.PAID, PurchaseStatus.REFUNDED)
    for purchase in CreditPurchase.objects.select_related("invoice", "lot", "bonus_lot"):
        invoice, lot, bonus = purchase.invoice, purchase.lot, purchase.bonus_lot
        claimed.update(x for x in (purchase.lot_id, purchase.bonus_lot_id) if x)
        if purchase.status in paid_statuses:
            if invoice is None or invoice.status not in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED):
                found.append(
                    f"{purchase} is {purchase.status} but its invoice is {invoice and invoice.status}"
                )
                continue
            if invoice.subtotal_cents != purchase.amount_cents:
                found.append(
                    f"{purchase}: invoice {invoice} bills {invoice.subtotal_cents}, the purchase {purchase.amount_cents}"
                )
            if lot is None or (lot.bucket, lot.granted, lot.source) != (
                Bucket.PURCHASED,
                purchase.credits,
                f"invoice:{invoice.pk}",
            ):
                found.append(f"{purchase}: its lot is {lot}")
            if purchase.bonus_credits and (
                bonus is None or (bonus.bucket, bonus.granted) != (Bucket.BONUS, purchase.bonus_credits)
            ):
                found.append(f"{purchase}: {purchase.bonus_credits} bonus credits, its bonus lot is {bonus}")
            if not purchase.bonus_credits and bonus is not None:
                found.append(f"{purchase}: a bonus lot without bonus credits")
            if (purchase.status == PurchaseStatus.REFUNDED) != (invoice.status == InvoiceStatus.REFUNDED):
                found.append(f"{purchase} is {purchase.status}, its invoice {invoice.status}")
        else:
            if lot is not None or bonus is not None:
                found.append(f"{purchase} is {purchase.status} but was granted {lot} {bonus}")
            unpaid_invoice = Invoice.objects.filter(
                fulfilment__purchase_id=purchase.pk, org_id=purchase.org_id, status=InvoiceStatus.PAID
            )
            if unpaid_invoice.exists():
                found.append(f"{purchase} is {purchase.status} but its invoice was paid")
    for lot in CreditLot.objects.filter(source__startswith="invoice:"):
        if claimed[lot.pk] != 1:
            found.append(f"{lot} (org {lot.org_id}) belongs to {claimed[lot.pk]} paid purchases")
    paid_purchase_invoices = Invoice.objects.filter(
        kind=InvoiceKind.PURCHASE, status__in=[InvoiceStatus.PAID, InvoiceStatus.REFUNDED]
    )
    for invoice in paid_purchase_invoices.filter(credit_purchase__isnull=True):
        found.append(f"purchase invoice {invoice} was paid but no purchase took it")
    for setting in RechargeSetting.objects.exclude(monthly_cap_cents=None):
        months: Counter = Counter()
        for created_at, amount in CreditPurchase.objects.filter(
            org_id=setting.org_id, kind__in=RECHARGE_KINDS, status=PurchaseStatus.PAID
        ).values_list("created_at", "amount_cents"):
            months[f"{created_at:%Y-%m}"] += amount
        for month, total in months.items():
            if total > setting.monthly_cap_cents:
                found.append(
                    f"org {setting.org_id}: recharges of {month} add up to {total} cents, above the {setting.monthly_cap_cents}-cent cap"
                )
    return found


def anomalies(*, intents: list[dict], accepted_events=None, settled: bool = True) -> dict[str, list[str]]:
    """Every check above, over every organisation: {check: what it found}."""
    ledger = [
        a
        for org_id in CreditAccount.objects.values_list("org_id", flat=True)
        for a in ledger_anomalies(org_id)
    ]
    return {
        "balances equal their ledgers": ledger,
        "no lot or bucket ever below zero": bucket_history_anomalies(),
        "jobs charged what their entries say": job_anomalies(),
        "periods and their overage": period_anomalies(),
        "event ids counted once, rollups = events + jobs": event_anomalies(accepted_events),
        "invoice numbers gapless, never repeated": invoice_number_anomalies(),
        "≤ 1 PaymentIntent per attempt, ≤ 4 per invoice": payment_anomalies(intents, settled=settled),
        "credits granted exactly for paid purchases": purchase_anomalies(),
    }
