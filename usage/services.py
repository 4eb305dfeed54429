"""Every write to credits (DESIGN §3).

One rule makes them safe under concurrency: each one runs in a transaction that first locks the
organisation's CreditAccount row (`select_for_update`; SQLite's IMMEDIATE transactions serialise
writers the same way). Lots, ledger entries, cached totals, jobs, events and rollups of one
organisation are only ever written under that lock, so checks and writes cannot interleave.

A hold takes credits off lots at once (so holds count against the balance), and the job's HOLD
entries remember which lots; completing releases what was not charged back to those lots, failing
releases everything.
"""

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Subquery

from accounts import clock
from accounts.models import BillingPeriod, Subscription, User
from billing_site.errors import (
    BillingError,
    conflict,
    insufficient_credits,
    invalid,
    not_found,
)
from usage.models import (
    CreditAccount,
    CreditLot,
    EntryKind,
    Job,
    JobStatus,
    LedgerEntry,
    UsageEvent,
    UsageRollup,
)
from usage.recharge_trigger import recharge_threshold_crossed
from usage.selectors import catalog_costs, catalog_per_page

MB = 1_048_576
FILE_SIZE_LIMITS = {"pdf": 100 * MB, "docx": 50 * MB, "xlsx": 50 * MB, "pptx": 100 * MB}
MAX_PAGES_PER_JOB = 100_000
MAX_EVENTS_PER_BATCH = 1_000
OCR_MODE = "ocr"


# --- the lock and the lots -------------------------------------------------------------------


def _lock_account(org_id: int) -> CreditAccount:
    try:
        return CreditAccount.objects.select_for_update().get(org_id=org_id)
    except CreditAccount.DoesNotExist:
        raise not_found("Unknown organisation.") from None


def _take_from_lots(org_id: int, credits: int) -> list[tuple[CreditLot, int]]:
    """Takes `credits` from the lots in spending order (bucket, soonest expiry, oldest).

    The caller holds the account lock and has checked that the balance covers `credits`.
    """
    taken: list[tuple[CreditLot, int]] = []
    left = credits
    if left <= 0:
        return taken
    lots = CreditLot.objects.filter(org_id=org_id, remaining__gt=0).order_by(
        "bucket", F("expires_at").asc(nulls_last=True), "id"
    )
    for lot in lots:
        n = min(lot.remaining, left)
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - n)
        taken.append((lot, n))
        left -= n
        if left == 0:
            break
    if left:  # the cached balance and the lots disagree: refuse rather than overspend
        raise BillingError("INTERNAL", "Credit lots do not cover the balance.", 500)
    return taken


def _entries(org_id, taken, kind, now, *, sign=-1, job=None, period_id=None, reason="", actor=None):
    return [
        LedgerEntry(
            org_id=org_id,
            lot=lot,
            kind=kind,
            credits=sign * n,
            job=job,
            period_id=period_id,
            reason=reason,
            created_by=actor,
            created_at=now,
        )
        for lot, n in taken
    ]


def _current_period_id(org_id: int) -> int:
    return Subscription.objects.filter(org_id=org_id).values_list("current_period_id", flat=True).get()


def _check_overage(sub: Subscription, account: CreditAccount, overage: int) -> None:
    """Raises 402 unless the plan allows `overage` more credits beyond the lots, cap included."""
    rate = sub.overage_rate
    if rate is None:
        raise insufficient_credits()
    if sub.overage_cap_cents is None:
        return
    period = BillingPeriod.objects.get(pk=_current_period_id(sub.org_id))
    credits = period.overage_credits + account.overage_held + overage
    if Decimal(credits) * rate / 10 > sub.overage_cap_cents:  # dollars per 1,000 -> cents
        cap = Decimal(sub.overage_cap_cents) / 100
        raise insufficient_credits(
            f"This would take this period's overage above your monthly cap of ${cap:,.2f}."
        )


def _add_to_period(org_id: int, credits: int, overage: int) -> None:
    BillingPeriod.objects.filter(
        pk=Subquery(Subscription.objects.filter(org_id=org_id).values("current_period_id"))
    ).update(credits_used=F("credits_used") + credits, overage_credits=F("overage_credits") + overage)


def _add_to_rollups(org_id: int, day: date, rows: dict[tuple[str, str], list[int]]) -> None:
    """Adds credits and units to the day's rollups in one upsert (PostgreSQL and SQLite alike)."""
    if not rows:
        return
    table = UsageRollup._meta.db_table
    sql = (
        f"INSERT INTO {table} (org_id, day, product, mode, credits, units) "  # noqa: S608 (our table)
        "VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (org_id, day, product, mode) DO UPDATE SET "
        f"credits = {table}.credits + EXCLUDED.credits, units = {table}.units + EXCLUDED.units"
    )
    params = [(org_id, day, p, m, c, u) for (p, m), (c, u) in sorted(rows.items())]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


# --- grants, expiry and staff adjustments ----------------------------------------------------


def lot_grant(
    *,
    org_id: int,
    bucket: int,
    credits: int,
    source: str,
    expires_at: datetime | None = None,
    period: BillingPeriod | None = None,
    reason: str = "",
    actor: User | None = None,
) -> CreditLot:
    """Grants a lot of credits once per `source`: a second grant with the same source returns the
    first lot and adds nothing."""
    if credits <= 0:
        raise invalid("A grant must be a whole number of credits from 1 up.")
    now = clock.now()
    with transaction.atomic():
        _lock_account(org_id)
        existing = CreditLot.objects.filter(org_id=org_id, source=source).first()
        if existing:
            return existing
        lot = CreditLot.objects.create(
            org_id=org_id,
            bucket=bucket,
            source=source,
            granted=credits,
            remaining=credits,
            expires_at=expires_at,
            period=period,
            created_at=now,
        )
        LedgerEntry.objects.create(
            org_id=org_id,
            lot=lot,
            kind=EntryKind.GRANT,
            credits=credits,
            period=period,
            reason=reason,
            created_by=actor,
            created_at=now,
        )
        CreditAccount.objects.filter(pk=org_id).update(balance=F("balance") + credits)
    return lot


def lots_expire(*, org_id: int, lots: Iterable[CreditLot], reason: str) -> int:
    """Expires what is left of the given lots; returns the credits removed. Already expired lots
    are skipped, so running it twice removes nothing more."""
    now = clock.now()
    removed = 0
    with transaction.atomic():
        _lock_account(org_id)
        for lot in CreditLot.objects.filter(pk__in=[lot.pk for lot in lots], expired_at__isnull=True):
            n = lot.remaining
            CreditLot.objects.filter(pk=lot.pk).update(remaining=0, expired_at=now)
            if n:
                LedgerEntry.objects.create(
                    org_id=org_id,
                    lot=lot,
                    kind=EntryKind.EXPIRE,
                    credits=-n,
                    reason=reason,
                    created_at=now,
                )
            removed += n
        CreditAccount.objects.filter(pk=org_id).update(balance=F("balance") - removed)
    return removed


def credits_remove(*, org_id: int, credits: int, reason: str, actor: User | None) -> int:
    """Staff adjustment: removes credits from the lots in spending order, with a reason."""
    if credits <= 0:
        raise invalid("Remove a whole number of credits from 1 up.")
    if not reason.strip():
        raise invalid("Give a reason for the adjustment.")
    now = clock.now()
    with transaction.atomic():
        account = _lock_account(org_id)
        if credits > account.balance:
            raise invalid(f"The organisation has only {account.balance:,} credits to remove.")
        taken = _take_from_lots(org_id, credits)
        LedgerEntry.objects.bulk_create(
            _entries(org_id, taken, EntryKind.ADJUST, now, reason=reason, actor=actor)
        )
        CreditAccount.objects.filter(pk=org_id).update(balance=F("balance") - credits)
    return credits


# --- jobs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRequest:
    product: str
    mode: str
    ocr: bool
    pages: int
    file_type: str
    file_size: int


def request_hash(body: dict) -> str:
    """A fingerprint of a request body, independent of key order and spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _job_prices(req: JobRequest) -> tuple[int, int]:
    costs = catalog_costs()
    if req.mode == OCR_MODE:
        raise invalid('OCR is not a mode of its own: set "ocr": true with a mode such as "base".')
    price = costs.get((req.product, req.mode))
    if price is not None and (req.product, req.mode) not in catalog_per_page():
        raise invalid(f"Mode {req.mode!r} is not priced per page: report it as usage events.")
    if price is None:
        if not any(product == req.product for product, _ in costs):
            raise invalid(f"Unknown product {req.product!r}.")
        raise invalid(f"Unknown mode {req.mode!r} for product {req.product!r}.")
    ocr_price = 0
    if req.ocr:
        ocr_price = costs.get((req.product, OCR_MODE))
        if ocr_price is None:
            raise invalid(f"OCR is not available for product {req.product!r}.")
    return price, ocr_price


def _check_file(req: JobRequest) -> None:
    limit = FILE_SIZE_LIMITS.get(req.file_type)
    if limit is None:
        raise invalid(f"Unknown file_type {req.file_type!r}: use one of {', '.join(FILE_SIZE_LIMITS)}.")
    if req.file_size > limit:
        raise BillingError(
            "FILE_TOO_LARGE",
            f"A {req.file_type.upper()} file may be at most {limit // MB} MB ({limit:,} bytes).",
            413,
            {"limit_bytes": limit},
        )


def job_start(
    *, sub: Subscription, req: JobRequest, idempotency_key: str | None = None, body_hash: str = ""
) -> tuple[Job, bool]:
    """Holds the job's estimated credits. Returns (job, replayed): a replayed Idempotency-Key with
    the same body returns the original job and holds nothing more."""
    price, ocr_price = _job_prices(req)
    _check_file(req)
    credits = req.pages * (price + ocr_price)
    org_id = sub.org_id
    now = clock.now()
    with transaction.atomic():
        account = _lock_account(org_id)
        if idempotency_key is not None:
            existing = Job.objects.filter(org_id=org_id, idempotency_key=idempotency_key).first()
            if existing:
                if existing.request_hash != body_hash:
                    raise conflict("This Idempotency-Key was already used with a different body.")
                return existing, True
        if account.running_jobs >= sub.concurrent_jobs:
            raise BillingError(
                "RESOURCE_EXHAUSTED",
                f"Concurrent job limit reached ({sub.concurrent_jobs} running). Please retry after 5 seconds.",
                429,
                {"retry_after": 5},
            )
        from_lots = min(credits, account.balance)
        overage = credits - from_lots
        if overage:
            _check_overage(sub, account, overage)
        taken = _take_from_lots(org_id, from_lots)
        job = Job.objects.create(
            org_id=org_id,
            product=req.product,
            mode=req.mode,
            ocr=req.ocr,
            pages=req.pages,
            file_type=req.file_type,
            file_size=req.file_size,
            credits_per_page=price,
            ocr_credits_per_page=ocr_price,
            credits_reserved=credits,
            held_from_lots=from_lots,
            held_overage=overage,
            idempotency_key=idempotency_key,
            request_hash=body_hash,
            created_at=now,
        )
        LedgerEntry.objects.bulk_create(_entries(org_id, taken, EntryKind.HOLD, now, job=job))
        CreditAccount.objects.filter(pk=org_id).update(
            balance=F("balance") - from_lots,
            overage_held=F("overage_held") + overage,
            running_jobs=F("running_jobs") + 1,
        )
        recharge_threshold_crossed(account, account.balance - from_lots)
    return job, False


def _locked_job(org_id: int, job_id) -> Job:
    job = Job.objects.filter(org_id=org_id, pk=job_id).first()
    if job is None:
        raise not_found("No job with this id.")
    return job


def _release(job: Job, credits: int, now: datetime) -> int:
    """Gives `credits` of the job's hold back to the lots it came from, most recently taken first
    (so what stays charged is what was spent first). A lot that expired meanwhile gets them back
    and loses them again at once. Returns the credits that went back into the balance."""
    if credits <= 0:
        return 0
    entries = []
    back_to_balance = 0
    left = credits
    holds = LedgerEntry.objects.filter(job=job, kind=EntryKind.HOLD).select_related("lot").order_by("-id")
    for hold in holds:
        n = min(-hold.credits, left)
        lot = hold.lot
        entries.append(
            LedgerEntry(
                org_id=job.org_id,
                lot=lot,
                kind=EntryKind.RELEASE,
                credits=n,
                job=job,
                created_at=now,
            )
        )
        if lot.expired_at is None:
            CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") + n)
            back_to_balance += n
        else:
            entries.append(
                LedgerEntry(
                    org_id=job.org_id,
                    lot=lot,
                    kind=EntryKind.EXPIRE,
                    credits=-n,
                    job=job,
                    reason="lot expired while held",
                    created_at=now,
                )
            )
        left -= n
        if left == 0:
            break
    LedgerEntry.objects.bulk_create(entries)
    return back_to_balance


def job_complete(*, org_id: int, job_id, pages: int | None = None) -> Job:
    """Charges the actual pages (never more than the hold) and releases the rest. Completing a
    succeeded job again returns it unchanged; completing a failed one is 409."""
    now = clock.now()
    with transaction.atomic():
        _lock_account(org_id)
        job = _locked_job(org_id, job_id)
        if job.status == JobStatus.SUCCEEDED:
            return job
        if job.status == JobStatus.FAILED:
            raise conflict("This job has failed; it cannot be completed.")
        charged_pages = job.pages if pages is None else min(pages, job.pages)
        base = charged_pages * job.credits_per_page
        ocr = charged_pages * job.ocr_credits_per_page
        charged = base + ocr
        from_lots = min(charged, job.held_from_lots)
        overage = charged - from_lots
        released = _release(job, job.held_from_lots - from_lots, now)
        if overage:
            LedgerEntry.objects.create(
                org_id=org_id,
                kind=EntryKind.OVERAGE,
                credits=-overage,
                job=job,
                period_id=_current_period_id(org_id),
                created_at=now,
            )
        CreditAccount.objects.filter(pk=org_id).update(
            balance=F("balance") + released,
            overage_held=F("overage_held") - job.held_overage,
            running_jobs=F("running_jobs") - 1,
        )
        _add_to_period(org_id, charged, overage)
        rows = {(job.product, job.mode): [base, charged_pages]}
        if job.ocr:
            rows[(job.product, OCR_MODE)] = [ocr, charged_pages]
        _add_to_rollups(org_id, now.date(), rows)
        job.status = JobStatus.SUCCEEDED
        job.credits_charged = charged
        job.pages_charged = charged_pages
        job.finished_at = now
        job.save(update_fields=["status", "credits_charged", "pages_charged", "finished_at"])
    return job


def job_fail(*, org_id: int, job_id) -> Job:
    """Releases the whole hold: failed jobs cost nothing. Failing a failed job again returns it;
    failing a succeeded one is 409."""
    now = clock.now()
    with transaction.atomic():
        _lock_account(org_id)
        job = _locked_job(org_id, job_id)
        if job.status == JobStatus.FAILED:
            return job
        if job.status == JobStatus.SUCCEEDED:
            raise conflict("This job has succeeded; it cannot be failed.")
        released = _release(job, job.held_from_lots, now)
        CreditAccount.objects.filter(pk=org_id).update(
            balance=F("balance") + released,
            overage_held=F("overage_held") - job.held_overage,
            running_jobs=F("running_jobs") - 1,
        )
        job.status = JobStatus.FAILED
        job.finished_at = now
        job.save(update_fields=["status", "finished_at"])
    return job


def jobs_fail_stale(*, now: datetime) -> int:
    """Fails every job still running `STALE_JOB_HOURS` after it started, releasing its hold."""
    cutoff = now - timedelta(hours=settings.STALE_JOB_HOURS)
    stale = Job.objects.filter(status=JobStatus.RUNNING, created_at__lte=cutoff).values_list("org_id", "id")
    failed = 0
    for org_id, job_id in stale.iterator():
        job_fail(org_id=org_id, job_id=job_id)
        failed += 1
    return failed


# --- usage events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EventIn:
    id: str
    product: str
    mode: str
    units: int
    timestamp: datetime


_EVENT_COLUMNS = ("org_id", "event_id", "product", "mode", "units", "credits", "timestamp", "charged_on")


def _insert_events(records: list[tuple]) -> None:
    """Inserts event rows in one parameterised executemany (the same statement the ingestion
    benchmark's ceiling uses): building 1,000 model instances for bulk_create costs far more."""
    if not records:
        return
    table = UsageEvent._meta.db_table
    columns = ", ".join(connection.ops.quote_name(c) for c in _EVENT_COLUMNS)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(_EVENT_COLUMNS))})"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.executemany(sql, records)


def usage_events_record(*, sub: Subscription, events: list[EventIn]) -> tuple[int, int]:
    """Charges a batch of events to the current period. Returns (accepted, duplicates). An event
    id counts once per organisation, ever. On a plan without overage, a batch the balance does
    not fully cover is 402 and counts nothing."""
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise invalid(f"At most {MAX_EVENTS_PER_BATCH:,} events a batch.")
    costs = catalog_costs()
    unique: dict[str, EventIn] = {}
    for i, event in enumerate(events):
        if (event.product, event.mode) not in costs:
            raise invalid(f"events[{i}]: unknown product and mode {event.product}/{event.mode}.")
        unique.setdefault(event.id, event)
    org_id = sub.org_id
    now = clock.now()
    day = now.date()
    with transaction.atomic():
        account = _lock_account(org_id)
        seen = set(
            UsageEvent.objects.filter(org_id=org_id, event_id__in=list(unique)).values_list(
                "event_id", flat=True
            )
        )
        new = [e for e in unique.values() if e.id not in seen]
        rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        adapt_moment = connection.ops.adapt_datetimefield_value
        charged_on = connection.ops.adapt_datefield_value(day)
        records = []
        for e in new:
            credits = e.units * costs[(e.product, e.mode)]
            row = rows[(e.product, e.mode)]
            row[0] += credits
            row[1] += e.units
            records.append(
                (org_id, e.id, e.product, e.mode, e.units, credits, adapt_moment(e.timestamp), charged_on)
            )
        total = sum(row[0] for row in rows.values())
        from_lots = min(total, account.balance)
        overage = total - from_lots
        if overage:
            _check_overage(sub, account, overage)
        taken = _take_from_lots(org_id, from_lots)
        try:
            _insert_events(records)
        except IntegrityError:  # only if the lock was bypassed; the transaction rolls back whole
            raise conflict("Some event ids were recorded concurrently; retry the batch.") from None
        entries = _entries(org_id, taken, EntryKind.USAGE, now, reason=f"{len(new)} usage events")
        if overage:
            entries.append(
                LedgerEntry(
                    org_id=org_id,
                    kind=EntryKind.OVERAGE,
                    credits=-overage,
                    period_id=_current_period_id(org_id),
                    reason="usage events",
                    created_at=now,
                )
            )
        LedgerEntry.objects.bulk_create(entries)
        if total:
            CreditAccount.objects.filter(pk=org_id).update(balance=F("balance") - from_lots)
            _add_to_period(org_id, total, overage)
        _add_to_rollups(org_id, day, rows)
        recharge_threshold_crossed(account, account.balance - from_lots)
    return len(new), len(events) - len(new)


# --- the low-balance alert (DESIGN §4) --------------------------------------------------------
#
# A small state machine on the LowBalanceAlert row: while `armed`, the first check that sees the
# balance below the threshold sends one e-mail and disarms it; while disarmed nothing more is sent,
# and the first check that sees the balance back at the threshold or above re-arms it. Checks lock
# the alert row, so two workers checking at once send one e-mail. The worker must check after
# every change of the balance (charges and grants alike): a rise that no check sees cannot re-arm.


def _clean_recipients(recipients: Iterable[str]) -> list[str]:
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    from usage.models import MAX_ALERT_RECIPIENTS

    cleaned: list[str] = []
    for address in recipients:
        address = address.strip().lower()
        if not address or address in cleaned:
            continue
        try:
            validate_email(address)
        except ValidationError:
            raise invalid(f"{address!r} is not an e-mail address.") from None
        cleaned.append(address)
    if len(cleaned) > MAX_ALERT_RECIPIENTS:
        raise invalid(f"At most {MAX_ALERT_RECIPIENTS} recipients.")
    return cleaned


def low_balance_alert_save(*, org_id: int, enabled: bool, threshold: int, recipients: list[str]):
    """Creates or changes the organisation's alert. A new threshold, or turning the alert on,
    re-arms it (so a balance already below the new threshold is reported once); changing only
    the recipients keeps its state, so it does not send the same news twice."""
    from usage.models import MAX_ALERT_THRESHOLD, LowBalanceAlert

    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 1 <= threshold <= MAX_ALERT_THRESHOLD
    ):
        raise invalid(f"The threshold is a whole number of credits from 1 to {MAX_ALERT_THRESHOLD:,}.")
    cleaned = _clean_recipients(recipients)
    if enabled and not cleaned:
        raise invalid("Add at least one e-mail address to send the alert to.")
    with transaction.atomic():
        alert = LowBalanceAlert.objects.select_for_update().filter(org_id=org_id).first()
        if alert is None:
            return LowBalanceAlert.objects.create(
                org_id=org_id, enabled=enabled, threshold=threshold, recipients=cleaned, armed=True
            )
        if threshold != alert.threshold or (enabled and not alert.enabled):
            alert.armed = True
        alert.enabled = enabled
        alert.threshold = threshold
        alert.recipients = cleaned
        alert.save()
    return alert


def low_balance_check(*, org_id: int) -> bool:
    """Moves the alert's state for the current balance; True when an e-mail is due now (the
    balance has just been seen below the threshold while armed). Disabled or missing: False."""
    from usage.models import LowBalanceAlert

    with transaction.atomic():
        alert = LowBalanceAlert.objects.select_for_update().filter(org_id=org_id).first()
        if alert is None or not alert.enabled:
            return False
        balance = CreditAccount.objects.values_list("balance", flat=True).get(org_id=org_id)
        if balance < alert.threshold:
            if not alert.armed:
                return False
            alert.armed = False
            alert.last_sent_at = clock.now()
            alert.save(update_fields=["armed", "last_sent_at", "updated_at"])
            return True
        if not alert.armed:
            alert.armed = True
            alert.save(update_fields=["armed", "updated_at"])
        return False


def low_balance_alert_send(*, org_id: int) -> bool:
    """What the alerts worker calls after a balance changes: checks, and sends the e-mail when
    one is due. The e-mail goes out inside the check's transaction, so a failed send leaves the
    alert armed and the next check tries again. Returns whether an e-mail was sent."""
    from django.core.mail import send_mail

    from usage.models import LowBalanceAlert

    with transaction.atomic():
        if not low_balance_check(org_id=org_id):
            return False
        alert = LowBalanceAlert.objects.select_related("org").get(org_id=org_id)
        balance = CreditAccount.objects.values_list("balance", flat=True).get(org_id=org_id)
        site = getattr(settings, "SITE_URL", "").rstrip("/")
        where = f"{site}/settings/billing/" if site else "Settings → Billing"
        send_mail(
            subject=f"Low balance: {alert.org.name} has {balance:,} credits left",
            message=(
                f"The credit balance of {alert.org.name} is {balance:,} credits, below your alert "
                f"threshold of {alert.threshold:,} credits.\n\n"
                f"Buy credits or change your plan in {where} to keep your jobs running.\n\n"
                "We will not e-mail again until the balance is back at the threshold or above. "
                "Change the alert in Settings → Billing → Notifications."
            ),
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=list(alert.recipients),
        )
    return True


# --- plan upgrades ---------------------------------------------------------------------------


def overage_absorb(
    *, org_id: int, period_id: int, lot_id: int, reason: str, actor: User | None = None
) -> int:
    """Moves overage already charged in a period onto a plan lot granted to it (an upgrade's extra
    quota), so that overage is never billed: the period's overage shrinks by what the lot covers,
    a lot-less OVERAGE entry gives those credits back and an OVERAGE entry on the lot takes them
    from it. Returns the credits absorbed."""
    now = clock.now()
    with transaction.atomic():
        _lock_account(org_id)
        period = BillingPeriod.objects.select_for_update().get(pk=period_id, org_id=org_id)
        lot = CreditLot.objects.get(pk=lot_id, org_id=org_id)
        credits = min(period.overage_credits, lot.remaining) if lot.expired_at is None else 0
        if credits <= 0:
            return 0
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - credits)
        common = {"org_id": org_id, "kind": EntryKind.OVERAGE, "period_id": period_id, "created_at": now}
        LedgerEntry.objects.bulk_create(
            [
                LedgerEntry(
                    credits=credits, reason=f"{reason}: no longer overage", created_by=actor, **common
                ),
                LedgerEntry(lot=lot, credits=-credits, reason=reason, created_by=actor, **common),
            ]
        )
        CreditAccount.objects.filter(pk=org_id).update(balance=F("balance") - credits)
        BillingPeriod.objects.filter(pk=period_id).update(overage_credits=F("overage_credits") - credits)
    return credits


def low_balance_alerts_run() -> int:
    """billing_tick's step (beat runs it every minute): sends the e-mails now due and re-arms the
    alerts whose balance has recovered. Only alerts whose state must change are visited."""
    from django.db.models import Q

    from usage.models import LowBalanceAlert

    moving = LowBalanceAlert.objects.filter(enabled=True).filter(
        Q(armed=True, org__credit_account__balance__lt=F("threshold"))
        | Q(armed=False, org__credit_account__balance__gte=F("threshold"))
    )
    sent = 0
    for org_id in list(moving.values_list("org_id", flat=True)):
        sent += low_balance_alert_send(org_id=org_id)
    return sent
