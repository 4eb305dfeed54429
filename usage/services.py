"""Every write to credits (DESIGN §3).

One rule makes them safe under concurrency: each one runs in a transaction that first locks the
organisation's CreditAccount row (`SELECT … FOR UPDATE`; SQLite's IMMEDIATE transactions serialise
writers the same way). Lots, ledger entries, cached totals, jobs, events and rollups of one
organisation are only ever written under that lock, so checks and writes cannot interleave.

A hold takes credits off lots at once (so holds count against the balance), and the job's HOLD
entries remember which lots; completing releases what was not charged back to those lots, failing
releases everything.

The API's hot paths run hand-written SQL through `connection.cursor()`: building the ORM's queries
cost several times more than running them. On PostgreSQL a job's hold and its end are one call each
of a PL/pgSQL function (usage_job_start, usage_job_end: migrations 0006 and 0008), one round trip
instead of eight; on SQLite the same rules run as statements from Python (`_hold_with_statements`,
`_job_end_with_statements`), and the suite runs on both. A batch of usage events is the same few
statements on both. The rarer writes (grants, expiry, staff adjustments, alerts) use the ORM.
"""

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, QuerySet, Sum

from accounts import clock
from accounts.models import BillingPeriod, Subscription, User
from billing_site.errors import (
    BillingError,
    conflict,
    insufficient_credits,
    invalid,
    not_found,
)
from billing_site.rows import Columns, planned_cursor
from usage.models import (
    CreditAccount,
    CreditLot,
    EntryKind,
    Job,
    JobStatus,
    LedgerEntry,
)
from usage.recharge_trigger import recharge_threshold_crossed
from usage.selectors import catalog_costs, catalog_per_page

MB = 1_048_576
FILE_SIZE_LIMITS = {"pdf": 100 * MB, "docx": 50 * MB, "xlsx": 50 * MB, "pptx": 100 * MB}
MAX_PAGES_PER_JOB = 100_000
MAX_EVENTS_PER_BATCH = 1_000
OCR_MODE = "ocr"

_ACCOUNT = Columns(CreditAccount)
_JOB = Columns(Job)


# --- the lock, the lots and the ledger -------------------------------------------------------


def _for_update() -> str:
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


def _lock_account(org_id: int) -> CreditAccount:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {_ACCOUNT.sql} FROM usage_creditaccount WHERE org_id = %s{_for_update()}",  # noqa: S608
            [org_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise not_found("Unknown organisation.")
    return _ACCOUNT.load(row)


def _account_add(org_id: int, *, balance: int = 0, overage_held: int = 0, running_jobs: int = 0) -> None:
    """Moves the account's cached totals by these amounts (the caller holds the lock)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE usage_creditaccount SET balance = balance + %s, overage_held = overage_held + %s, "
            "running_jobs = running_jobs + %s WHERE org_id = %s",
            [balance, overage_held, running_jobs, org_id],
        )


def _lots_add(changes: list[tuple[int, int]]) -> None:
    """Adds credits to lots (negative: takes them): [(lot id, credits)]."""
    if changes:
        with connection.cursor() as cursor:
            cursor.executemany(
                "UPDATE usage_creditlot SET remaining = remaining + %s WHERE id = %s",
                [(credits, lot_id) for lot_id, credits in changes],
            )


def _take_from_lots(org_id: int, credits: int) -> list[tuple[int, int]]:
    """Takes `credits` from the lots in spending order (bucket, soonest expiry, oldest); returns
    [(lot id, credits taken)]. The caller holds the account lock and has checked that the balance
    covers `credits`."""
    if credits <= 0:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, remaining FROM usage_creditlot WHERE org_id = %s AND remaining > 0 "
            "ORDER BY bucket, expires_at ASC NULLS LAST, id",
            [org_id],
        )
        lots = cursor.fetchall()
    taken: list[tuple[int, int]] = []
    left = credits
    for lot_id, remaining in lots:
        n = min(remaining, left)
        taken.append((lot_id, n))
        left -= n
        if left == 0:
            break
    if left:  # the cached balance and the lots disagree: refuse rather than overspend
        raise BillingError("INTERNAL", "Credit lots do not cover the balance.", 500)
    _lots_add([(lot_id, -n) for lot_id, n in taken])
    return taken


class Entry(NamedTuple):
    """A ledger entry to append: with a lot, the signed change of its `remaining`; without one
    (overage) credits charged beyond the lots, as a negative."""

    lot_id: int | None
    kind: str
    credits: int
    reason: str = ""
    period_id: int | None = None


_ENTRY_VALUES = "(%s, %s, %s, %s, %s, %s, %s, %s, %s)"


def _ledger_append(org_id: int, entries: list[Entry], now: datetime, *, job_id=None, actor_id=None) -> None:
    """Appends ledger entries, in this order, in one INSERT."""
    if not entries:
        return
    job = Job._meta.pk.get_db_prep_value(job_id, connection) if job_id is not None else None
    at = connection.ops.adapt_datetimefield_value(now)
    params = []
    for e in entries:
        params += [org_id, e.lot_id, str(e.kind), e.credits, job, e.period_id, e.reason, actor_id, at]
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO usage_ledgerentry "  # noqa: S608 (placeholders)
            "(org_id, lot_id, kind, credits, job_id, period_id, reason, created_by_id, created_at) "
            f"VALUES {', '.join([_ENTRY_VALUES] * len(entries))}",
            params,
        )


_CURRENT_PERIOD = "(SELECT current_period_id FROM accounts_subscription WHERE org_id = %s)"


# How a hold ends up (what usage_job_start answers, and _hold_with_statements); NO_CREDITS and
# OVER_CAP refuse a batch of events too.
STARTED = "started"
REPLAYED = "replayed"  # the Idempotency-Key's job, with the same body
CONFLICT = "conflict"  # the Idempotency-Key was used with another body
BUSY = "busy"  # the concurrent-jobs limit
NO_CREDITS = "no_credits"  # the lots are spent and the plan has no overage
OVER_CAP = "over_cap"  # the overage would pass the monthly cap
UNKNOWN_ORG = "unknown_org"


class Hold(NamedTuple):
    """A hold's outcome; when started, what it took and the balance it took it from."""

    outcome: str
    from_lots: int = 0
    overage: int = 0
    balance_before: int = 0
    recharge_below: int | None = None


def _overage_refusal(sub: Subscription, overage: int) -> str | None:
    """Whether the plan refuses `overage` credits beyond the lots, held or charged, on top of what
    this period has charged already: NO_CREDITS (a plan without overage), OVER_CAP, or None."""
    rate = sub.overage_rate
    if rate is None:
        return NO_CREDITS
    if sub.overage_cap_cents is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT overage_credits FROM accounts_billingperiod WHERE id = {_CURRENT_PERIOD}",  # noqa: S608
            [sub.org_id],
        )
        (charged,) = cursor.fetchone()
    if Decimal(charged + overage) * rate / 10 > sub.overage_cap_cents:  # dollars per 1,000 -> cents
        return OVER_CAP
    return None


def _add_to_period(org_id: int, credits: int, overage: int) -> int:
    """Adds charged credits, and the overage among them, to the current period; returns its id."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE accounts_billingperiod SET credits_used = credits_used + %s, "  # noqa: S608
            f"overage_credits = overage_credits + %s WHERE id = {_CURRENT_PERIOD} RETURNING id",
            [credits, overage, org_id],
        )
        return cursor.fetchone()[0]


_ROLLUP_VALUES = "(%s, %s, %s, %s, %s, %s)"


def _add_to_rollups(org_id: int, day: date, rows: dict[tuple[str, str], list[int]]) -> None:
    """Adds {(product, mode): [credits, units]} to the day's rollups in one upsert."""
    if not rows:
        return
    on = connection.ops.adapt_datefield_value(day)
    params = []
    for (product, mode), (credits, units) in sorted(rows.items()):
        params += [org_id, on, product, mode, credits, units]
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO usage_usagerollup (org_id, day, product, mode, credits, units) "  # noqa: S608
            f"VALUES {', '.join([_ROLLUP_VALUES] * len(rows))} "
            "ON CONFLICT (org_id, day, product, mode) DO UPDATE SET "
            "credits = usage_usagerollup.credits + EXCLUDED.credits, "
            "units = usage_usagerollup.units + EXCLUDED.units",
            params,
        )


# --- grants, expiry and staff adjustments ----------------------------------------------------


@dataclass(frozen=True)
class LotGrant:
    """One grant for `lots_grant`: `credits` into a new lot of `bucket`, once per (org, source)."""

    org_id: int
    bucket: int
    credits: int
    source: str
    expires_at: datetime | None = None
    period: BillingPeriod | None = None
    reason: str = ""
    actor: User | None = None


def _lock_accounts(org_ids: Iterable[int]) -> None:
    """Locks the organisations' accounts in org order (one order for every writer of many, so two
    cannot deadlock); an unknown organisation is refused."""
    org_ids = sorted(set(org_ids))
    locked = CreditAccount.objects.select_for_update().filter(org_id__in=org_ids).order_by("org_id")
    if len(list(locked.values_list("org_id", flat=True))) != len(org_ids):
        raise not_found("Unknown organisation.")


def _balances_add(deltas: dict[int, int]) -> None:
    """Adds each organisation's delta to its cached balance, in one statement whatever their
    number (UPDATE … FROM VALUES, which PostgreSQL and SQLite both run). The caller holds the
    accounts' locks."""
    rows = [(int(org_id), int(delta)) for org_id, delta in sorted(deltas.items()) if delta]
    if not rows:
        return
    table = CreditAccount._meta.db_table
    # Integers only, written as literals: a thousand pairs of placeholders cost the driver more
    # to parse than the statement costs the database.
    values = ", ".join(f"({org_id}, {delta})" for org_id, delta in rows)
    sql = (
        f"UPDATE {table} SET balance = {table}.balance + v.column2 "  # noqa: S608 (our table, integers)
        f"FROM (VALUES {values}) AS v WHERE {table}.org_id = v.column1"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)


def lots_grant(*, grants: Sequence[LotGrant]) -> list[CreditLot]:
    """Grants each lot once per (organisation, source): a grant whose source the organisation
    already has returns that lot and adds nothing. One transaction, with set-based writes (the
    period close grants a thousand at a time); returns the lots in the order of `grants`."""
    if any(grant.credits <= 0 for grant in grants):
        raise invalid("A grant must be a whole number of credits from 1 up.")
    if not grants:
        return []
    now = clock.now()
    with transaction.atomic():
        _lock_accounts(grant.org_id for grant in grants)
        lots = {
            (lot.org_id, lot.source): lot
            for lot in CreditLot.objects.filter(
                org_id__in={grant.org_id for grant in grants}, source__in={grant.source for grant in grants}
            )
        }
        new: list[tuple[LotGrant, CreditLot]] = []
        for grant in grants:
            if (grant.org_id, grant.source) not in lots:
                lot = CreditLot(
                    org_id=grant.org_id,
                    bucket=grant.bucket,
                    source=grant.source,
                    granted=grant.credits,
                    remaining=grant.credits,
                    expires_at=grant.expires_at,
                    period=grant.period,
                    created_at=now,
                )
                lots[grant.org_id, grant.source] = lot
                new.append((grant, lot))
        CreditLot.objects.bulk_create([lot for _, lot in new])
        by_reason: dict[tuple[str, int | None], list[int]] = defaultdict(list)
        for grant, lot in new:
            by_reason[grant.reason, grant.actor.pk if grant.actor else None].append(lot.pk)
        for (reason, actor_id), lot_ids in by_reason.items():  # one statement per reason and actor
            _lot_entries_insert(
                CreditLot.objects.filter(pk__in=lot_ids),
                kind=EntryKind.GRANT,
                credits="granted",
                with_period=True,
                reason=reason,
                actor_id=actor_id,
                now=now,
            )
        added: dict[int, int] = defaultdict(int)
        for grant, _ in new:
            added[grant.org_id] += grant.credits
        _balances_add(added)
    return [lots[grant.org_id, grant.source] for grant in grants]


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
    grant = LotGrant(
        org_id=org_id,
        bucket=bucket,
        credits=credits,
        source=source,
        expires_at=expires_at,
        period=period,
        reason=reason,
        actor=actor,
    )
    return lots_grant(grants=[grant])[0]


def lots_expire(*, lots: QuerySet[CreditLot], reason: str) -> int:
    """Expires what is left of the given lots (of one organisation or many); returns the credits
    removed. Already expired lots are skipped, so running it twice removes nothing more. Three
    statements under the organisations' account locks, whatever the number of lots: an EXPIRE
    entry for each lot with credits left, the balances down by them, the lots emptied."""
    now = clock.now()
    with transaction.atomic():
        found = list(lots.values_list("pk", "org_id"))
        if not found:
            return 0
        _lock_accounts(org_id for _, org_id in found)
        live = CreditLot.objects.filter(pk__in=[pk for pk, _ in found], expired_at__isnull=True)
        left = dict(live.order_by().values_list("org_id").annotate(n=Sum("remaining")))
        _lot_entries_insert(
            live.filter(remaining__gt=0), kind=EntryKind.EXPIRE, credits="-remaining", reason=reason, now=now
        )
        _balances_add({org_id: -n for org_id, n in left.items()})
        live.update(remaining=0, expired_at=now)
    return sum(left.values())


def _lot_entries_insert(
    lots: QuerySet[CreditLot],
    *,
    kind: str,
    credits: str,
    with_period: bool = False,
    reason: str,
    actor_id: int | None = None,
    now: datetime,
) -> None:
    """One ledger entry of `kind` per lot of `lots`, for `credits` (a column of the lot, `granted`
    or `-remaining`), dated to the lot's period `with_period`: one INSERT … SELECT from the lots,
    so no row comes to Python."""
    lot_ids, params = lots.values("pk").query.sql_with_params()
    period = "period_id" if with_period else "NULL"
    sql = (
        f"INSERT INTO {LedgerEntry._meta.db_table} "  # noqa: S608 (our tables and columns)
        "(org_id, lot_id, kind, credits, period_id, reason, created_by_id, created_at) "
        f"SELECT org_id, id, %s, {credits}, {period}, %s, %s, %s "
        f"FROM {CreditLot._meta.db_table} WHERE id IN ({lot_ids})"
    )
    now = connection.ops.adapt_datetimefield_value(now)
    with connection.cursor() as cursor:
        cursor.execute(sql, [kind, reason, actor_id, now, *params])


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
        _ledger_append(
            org_id,
            [Entry(lot_id, EntryKind.ADJUST, -n, reason=reason) for lot_id, n in taken],
            now,
            actor_id=actor.pk if actor else None,
        )
        _account_add(org_id, balance=-credits)
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


def _refusal(outcome: str, sub: Subscription) -> BillingError:
    """What the API answers when a hold or a batch of events is refused."""
    if outcome == BUSY:
        return BillingError(
            "RESOURCE_EXHAUSTED",
            f"Concurrent job limit reached ({sub.concurrent_jobs} running). Please retry after 5 seconds.",
            429,
            {"retry_after": 5},
        )
    if outcome == OVER_CAP:
        cap = Decimal(sub.overage_cap_cents) / 100
        return insufficient_credits(
            f"This would take this period's overage above your monthly cap of ${cap:,.2f}."
        )
    if outcome == NO_CREDITS:
        return insufficient_credits()
    if outcome == CONFLICT:
        return conflict("This Idempotency-Key was already used with a different body.")
    if outcome == UNKNOWN_ORG:
        return not_found("Unknown organisation.")
    raise ValueError(f"not a refusal: {outcome!r}")


def job_start(
    *, sub: Subscription, req: JobRequest, idempotency_key: str | None = None, body_hash: str = ""
) -> tuple[Job, bool]:
    """Holds the job's estimated credits. Returns (job, replayed): a replayed Idempotency-Key with
    the same body returns the original job and holds nothing more."""
    price, ocr_price = _job_prices(req)
    _check_file(req)
    job = Job(
        org_id=sub.org_id,
        product=req.product,
        mode=req.mode,
        ocr=req.ocr,
        pages=req.pages,
        file_type=req.file_type,
        file_size=req.file_size,
        credits_per_page=price,
        ocr_credits_per_page=ocr_price,
        credits_reserved=req.pages * (price + ocr_price),
        held_from_lots=0,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        created_at=clock.now(),
    )
    if connection.vendor == "postgresql":
        hold = _hold_in_database(job, sub)
    else:
        hold = _hold_with_statements(job, sub)
    if hold.outcome == REPLAYED:
        return _job_for_key(sub.org_id, idempotency_key), True
    if hold.outcome != STARTED:
        raise _refusal(hold.outcome, sub)
    job.held_from_lots, job.held_overage = hold.from_lots, hold.overage
    job._state.adding, job._state.db = False, connection.alias
    recharge_threshold_crossed(
        org_id=job.org_id,
        below=hold.recharge_below,
        before=hold.balance_before,
        after=hold.balance_before - hold.from_lots,
    )
    return job, False


def _hold_in_database(job: Job, sub: Subscription) -> Hold:
    """The hold in one statement: usage_job_start (migration 0006) locks, decides and writes."""
    with planned_cursor() as cursor:
        cursor.execute(
            "SELECT * FROM usage_job_start("
            "json_populate_record(NULL::usage_job, %s::json), %s::integer, %s::numeric, %s::bigint)",
            [_JOB.json(job), sub.concurrent_jobs, sub.overage_rate, sub.overage_cap_cents],
        )
        return Hold(*cursor.fetchone())


def _hold_with_statements(job: Job, sub: Subscription) -> Hold:
    """The hold as statements from Python (SQLite): the rules of usage_job_start."""
    with transaction.atomic():
        account = _lock_account(job.org_id)
        if job.idempotency_key is not None:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT request_hash FROM usage_job WHERE org_id = %s AND idempotency_key = %s",
                    [job.org_id, job.idempotency_key],
                )
                known = cursor.fetchone()
            if known is not None:
                return Hold(REPLAYED if known[0] == job.request_hash else CONFLICT)
        if account.running_jobs >= sub.concurrent_jobs:
            return Hold(BUSY)
        from_lots = min(job.credits_reserved, account.balance)
        overage = job.credits_reserved - from_lots
        if overage and (refused := _overage_refusal(sub, account.overage_held + overage)):
            return Hold(refused)
        taken = _take_from_lots(job.org_id, from_lots)
        job.held_from_lots, job.held_overage = from_lots, overage
        _JOB.insert(job)
        _ledger_append(
            job.org_id,
            [Entry(lot_id, EntryKind.HOLD, -n) for lot_id, n in taken],
            job.created_at,
            job_id=job.pk,
        )
        _account_add(job.org_id, balance=-from_lots, overage_held=overage, running_jobs=1)
    return Hold(STARTED, from_lots, overage, account.balance, account.recharge_below)


def _job_for_key(org_id: int, idempotency_key: str) -> Job:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {_JOB.sql} FROM usage_job WHERE org_id = %s AND idempotency_key = %s",  # noqa: S608
            [org_id, idempotency_key],
        )
        return _JOB.load(cursor.fetchone())


def job_complete(*, org_id: int, job_id, pages: int | None = None) -> Job:
    """Charges the actual pages (never more than the hold) and releases the rest. Completing a
    succeeded job again returns it unchanged; completing a failed one is 409."""
    job = _job_end(org_id, job_id, JobStatus.SUCCEEDED, MAX_PAGES_PER_JOB if pages is None else pages)
    if job.status == JobStatus.FAILED:
        raise conflict("This job has failed; it cannot be completed.")
    return job


def job_fail(*, org_id: int, job_id) -> Job:
    """Releases the whole hold: failed jobs cost nothing. Failing a failed job again returns it;
    failing a succeeded one is 409."""
    job = _job_end(org_id, job_id, JobStatus.FAILED)
    if job.status == JobStatus.SUCCEEDED:
        raise conflict("This job has succeeded; it cannot be failed.")
    return job


def _job_end(org_id: int, job_id, status: str, pages: int = 0) -> Job:
    """Ends the organisation's running job with `status` (succeeded: `pages` charged, at most the
    job's own) and returns it; a job that had already ended comes back as it was. 404 when the
    organisation has no such job."""
    now = clock.now()
    if connection.vendor == "postgresql":  # one statement: usage_job_end (migrations 0006, 0008)
        with planned_cursor() as cursor:
            cursor.execute(
                f"SELECT {_JOB.sql} FROM usage_job_end("  # noqa: S608 (our columns)
                "%s::bigint, %s::uuid, %s::text, %s::integer, %s::timestamptz, %s::date)",
                [org_id, job_id, str(status), pages, now, now.date()],
            )
            row = cursor.fetchone()
        job = _JOB.load(row) if row is not None else None
    else:
        job = _job_end_with_statements(org_id, job_id, status, pages, now)
    if job is None:
        raise not_found("No job with this id.")
    return job


# The end of a running job, in one statement that answers with the job as it now is (no row: the
# job is not running, or not the organisation's). Completing charges min(pages asked, pages held).
_JOB_SUCCEED = f"""UPDATE usage_job SET status = %(status)s, finished_at = %(now)s,
    pages_charged = CASE WHEN pages < %(pages)s THEN pages ELSE %(pages)s END,
    credits_charged = (CASE WHEN pages < %(pages)s THEN pages ELSE %(pages)s END)
        * (credits_per_page + ocr_credits_per_page)
    WHERE org_id = %(org_id)s AND id = %(job_id)s AND status = %(running)s RETURNING {_JOB.sql}"""  # noqa: S608
_JOB_FAIL = f"""UPDATE usage_job SET status = %(status)s, finished_at = %(now)s
    WHERE org_id = %(org_id)s AND id = %(job_id)s AND status = %(running)s RETURNING {_JOB.sql}"""  # noqa: S608


def _job_end_with_statements(org_id: int, job_id, status: str, pages: int, now: datetime) -> Job | None:
    """The end of a job as statements from Python (SQLite): the rules of usage_job_end."""
    with transaction.atomic():
        _lock_account(org_id)
        with connection.cursor() as cursor:
            cursor.execute(
                _JOB_SUCCEED if status == JobStatus.SUCCEEDED else _JOB_FAIL,
                {
                    "status": str(status),
                    "now": connection.ops.adapt_datetimefield_value(now),
                    "pages": pages,
                    "org_id": org_id,
                    "job_id": Job._meta.pk.get_db_prep_value(job_id, connection),
                    "running": str(JobStatus.RUNNING),
                },
            )
            row = cursor.fetchone()
        if row is None:
            return Job.objects.filter(org_id=org_id, pk=job_id).first()
        job = _JOB.load(row)
        from_lots = min(job.credits_charged, job.held_from_lots)
        overage = job.credits_charged - from_lots
        _hold_end(job, credits_back=job.held_from_lots - from_lots, now=now)
        if job.status == JobStatus.SUCCEEDED:
            period_id = _add_to_period(org_id, job.credits_charged, overage)
            if overage:
                overage_entry = Entry(None, EntryKind.OVERAGE, -overage, period_id=period_id)
                _ledger_append(org_id, [overage_entry], now, job_id=job.pk)
            pages_charged = job.pages_charged
            rows = {(job.product, job.mode): [pages_charged * job.credits_per_page, pages_charged]}
            if job.ocr:
                rows[(job.product, OCR_MODE)] = [pages_charged * job.ocr_credits_per_page, pages_charged]
            _add_to_rollups(org_id, now.date(), rows)
    return job


def _release(job: Job, credits: int, now: datetime) -> int:
    """Gives `credits` of the job's hold back to the lots it came from, most recently taken first
    (so what stays charged is what was spent first). A lot that expired meanwhile gets them back
    and loses them again at once. Returns the credits that went back into the balance."""
    if credits <= 0:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT e.lot_id, -e.credits, l.expired_at IS NULL FROM usage_ledgerentry e "
            "JOIN usage_creditlot l ON l.id = e.lot_id WHERE e.job_id = %s AND e.kind = %s ORDER BY e.id DESC",
            [Job._meta.pk.get_db_prep_value(job.pk, connection), str(EntryKind.HOLD)],
        )
        holds = cursor.fetchall()
    entries, back = [], []
    left = credits
    for lot_id, held, live in holds:
        n = min(held, left)
        entries.append(Entry(lot_id, EntryKind.RELEASE, n))
        if live:
            back.append((lot_id, n))
        else:
            entries.append(Entry(lot_id, EntryKind.EXPIRE, -n, reason="lot expired while held"))
        left -= n
        if left == 0:
            break
    _lots_add(back)
    _ledger_append(job.org_id, entries, now, job_id=job.pk)
    return sum(n for _, n in back)


def _hold_end(job: Job, *, credits_back: int, now: datetime) -> None:
    """Ends a job's hold: `credits_back` of it go back to the lots they came from (the rest stays
    spent), and the job leaves the account's open holds and its overage held."""
    released = _release(job, credits_back, now)
    _account_add(job.org_id, balance=released, overage_held=-job.held_overage, running_jobs=-1)


def jobs_fail_stale(*, now: datetime) -> int:
    """Fails every job still running `STALE_JOB_HOURS` after it started, releasing its hold. A job
    its own request completed meanwhile stays completed (and the tick carries on)."""
    cutoff = now - timedelta(hours=settings.STALE_JOB_HOURS)
    stale = Job.objects.filter(status=JobStatus.RUNNING, created_at__lte=cutoff).values_list("org_id", "id")
    failed = 0
    for org_id, job_id in list(stale):
        try:
            job_fail(org_id=org_id, job_id=job_id)
        except BillingError as error:
            if error.status != 409:  # 409: it succeeded after we listed it
                raise
            continue
        failed += 1
    return failed


# --- usage events ----------------------------------------------------------------------------


class EventIn(NamedTuple):  # a tuple: the API makes 1,000 of them a batch
    id: str
    product: str
    mode: str
    units: int
    timestamp: datetime


# The batch goes to the database as one JSON document, unpacked there into rows: one statement
# whatever the batch size, that adds only the event ids not recorded yet and answers with them.
_EVENT_ROWS = {
    "postgresql": "SELECT %s, e.id, e.product, e.mode, e.units, e.credits, e.timestamp, %s "
    "FROM json_to_recordset(%s::json) "
    "AS e(id text, product text, mode text, units integer, credits bigint, timestamp timestamptz)",
    "sqlite": "SELECT %s, json_extract(value, '$.id'), json_extract(value, '$.product'), "
    "json_extract(value, '$.mode'), json_extract(value, '$.units'), json_extract(value, '$.credits'), "
    "json_extract(value, '$.timestamp'), %s FROM json_each(%s) WHERE true",  # WHERE: SQLite's upsert syntax
}


def _insert_new_events(org_id: int, day: date, events: list[EventIn], costs: dict) -> list[str]:
    """Inserts the events whose id the organisation has not sent before; returns their ids."""
    adapt_moment = connection.ops.adapt_datetimefield_value
    document = json.dumps(
        [
            {
                "id": e.id,
                "product": e.product,
                "mode": e.mode,
                "units": e.units,
                "credits": e.units * costs[(e.product, e.mode)],
                "timestamp": str(adapt_moment(e.timestamp)),
            }
            for e in events
        ]
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO usage_usageevent "  # noqa: S608 (our SQL)
            "(org_id, event_id, product, mode, units, credits, timestamp, charged_on) "
            f"{_EVENT_ROWS[connection.vendor]} "
            "ON CONFLICT (org_id, event_id) DO NOTHING RETURNING event_id",
            [org_id, connection.ops.adapt_datefield_value(day), document],
        )
        return [event_id for (event_id,) in cursor.fetchall()]


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
        new = [unique[event_id] for event_id in _insert_new_events(org_id, day, list(unique.values()), costs)]
        rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for e in new:
            row = rows[(e.product, e.mode)]
            row[0] += e.units * costs[(e.product, e.mode)]
            row[1] += e.units
        total = sum(row[0] for row in rows.values())
        from_lots = min(total, account.balance)
        overage = total - from_lots
        if overage and (refused := _overage_refusal(sub, account.overage_held + overage)):
            raise _refusal(refused, sub)  # and the inserted events roll back too
        taken = _take_from_lots(org_id, from_lots)
        reason = f"{len(new)} usage events"
        entries = [Entry(lot_id, EntryKind.USAGE, -n, reason=reason) for lot_id, n in taken]
        if total:
            _account_add(org_id, balance=-from_lots)
            period_id = _add_to_period(org_id, total, overage)
            if overage:
                entries.append(Entry(None, EntryKind.OVERAGE, -overage, "usage events", period_id))
        _ledger_append(org_id, entries, now)
        _add_to_rollups(org_id, day, rows)
    recharge_threshold_crossed(
        org_id=org_id, below=account.recharge_below, before=account.balance, after=account.balance - from_lots
    )
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
