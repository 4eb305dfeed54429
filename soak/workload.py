"""The soak's world and workload: a few organisations, and N threads running a planned mix of M
operations on them through the service functions that the API, the pages, the workers and
`billing_tick` call, each thread on its own database connection.

The operations: job holds (some replaying a shared Idempotency-Key), completes and fails (some of
another thread's job), usage-event batches (ids drawn from a shared pool, so duplicates within a
batch, between batches and between threads are common, and some batches are sent again whole),
pack purchases (some submitting the same form twice), plan upgrades, downgrades and their
cancellation, refunds, Stripe webhook replays, the recharge task, balance reads, and period closes:
`billing_tick`'s services as of billing times that move forward by one step per tick. Threshold
auto-recharges fire by themselves when a charge takes a balance below its threshold (Celery runs
eagerly: the task runs in the charging thread right after its commit, as a worker would).

Stripe (localstripe) is reached by purchases, upgrades and refunds, which share a budget (beyond it
they are replaced by event batches), and by recharges and period invoices, which the recharge caps,
the card that declines and the number of months bound: a few hundred PaymentIntents a run.

An outcome is "ok", the code of a refusal the product answers with (402, 409, 429 …, and
STRIPE_UNAVAILABLE), or an error: any other exception, a 5xx BillingError, or an ERROR the product
logs. Errors are anomalies.
"""

import logging
import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

from accounts import clock
from accounts.models import Organisation, Plan, Subscription
from accounts.services import (
    clock_move,
    organisation_create,
    subscription_downgrade_cancel,
    subscription_downgrade_schedule,
    subscription_upgrade,
)
from billing_site.errors import BillingError
from billing_site.tick import tick_run
from invoices import services as invoice_services
from invoices.models import AttemptStatus, PaymentAttempt
from soak.plan import SoakPlan
from tests.fake_stripe import DECLINING_CARD, GOOD_CARD, card_add
from tests.threads import in_threads
from usage import credits, selectors, services
from usage.models import CreditPack, CreditPurchase, PurchaseKind, PurchaseStatus, RechargeKind

START = datetime(2027, 1, 15, 10, tzinfo=UTC)

JOB_OPERATIONS = [("parse", "base"), ("parse", "advanced"), ("extract", "base"), ("classify", "base")]
EVENT_OPERATIONS = [
    ("parse", "base"),
    ("parse", "advanced"),
    ("parse", "audio"),
    ("extract", "base"),
    ("classify", "base"),
    ("parse", "ocr"),
]

# Relative frequency of each kind of operation (ticks come apart: one per hundred operations).
WEIGHTS = {
    "job hold": 25,
    "job complete": 20,
    "job fail": 5,
    "usage events": 22,
    "balance read": 3,
    "pack purchase": 2,
    "plan upgrade": 3,
    "plan downgrade or cancel": 2,
    "refund": 1,
    "recharge task": 2,
    "webhook replay": 2,
}
STRIPE_KINDS = {"pack purchase", "plan upgrade", "refund"}
REFUSALS_NOT_ANOMALIES = {"STRIPE_UNAVAILABLE"}  # localstripe too slow to answer: the product copes
TICK_TOO_LATE = "INVALID_ARGUMENT"  # clock_move: another thread's tick already moved time past it


@dataclass(frozen=True)
class OrgSpec:
    name: str
    plan: str
    card: str | None
    weight: int
    threshold_recharge: tuple[int, int, int] | None = None  # (threshold, pack $, monthly cap $)
    scheduled_recharge: tuple[int, int] | None = None  # ($ a month, billing day)
    alert_below: int | None = None
    skips: frozenset[str] = frozenset()  # kinds of operation it is not sent (it gets events instead)


ORGS = (
    OrgSpec(
        "Free, recharges",  # stays on Free and buys only by recharging, so it keeps crossing the threshold
        "free",
        GOOD_CARD,
        3,
        threshold_recharge=(20_000, 10, 100),
        alert_below=2_000,
        skips=frozenset({"plan upgrade", "plan downgrade or cancel", "pack purchase", "refund"}),
    ),
    OrgSpec("Starter", "starter", GOOD_CARD, 3, alert_below=5_000),
    OrgSpec("Pro, scheduled recharge", "pro", GOOD_CARD, 2, scheduled_recharge=(20, 20)),
    OrgSpec("Starter, declining card", "starter", DECLINING_CARD, 2, threshold_recharge=(20_000, 10, 30)),
    OrgSpec("Free, no card", "free", None, 1),
)
CONCURRENT_JOBS = 40


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    errors: list[str] = field(default_factory=list)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # a message of each refusal
    logged_errors: list[str] = field(default_factory=list)
    accepted_events: dict[int, tuple[set[str], int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def operations(self) -> int:
        return sum(self.outcomes.values())

    def by_kind(self) -> dict[str, Counter]:
        kinds: dict[str, Counter] = {}
        for (kind, outcome), n in sorted(self.outcomes.items()):
            kinds.setdefault(kind, Counter())[outcome] += n
        return kinds


def pdf_stand_in(*, invoice, **_context) -> bytes:
    """What the soak stores instead of WeasyPrint's PDF: rendering hundreds of invoices would cost
    minutes of the two cores and prove nothing about money (the PDFs have tests of their own)."""
    return f"%PDF-1.4\n% soak stand-in for {invoice.number} ({invoice.status})\n".encode()


def world_create() -> list[int]:
    """The organisations of ORGS, made as of START (billing time moved there), with their cards,
    recharges and alerts; returns their ids."""
    clock.forget()
    clock_move(at=START)
    packs = {p.price_cents // 100: p for p in CreditPack.objects.filter(active=True)}
    org_ids = []
    for i, spec in enumerate(ORGS):
        org, _ = organisation_create(
            name=spec.name,
            plan_code=spec.plan,
            owner_email=f"soak-owner-{i}@example.com",
            concurrent_jobs=CONCURRENT_JOBS,
        )
        if spec.card:
            card_add(org, spec.card)
        choice = None
        if spec.threshold_recharge:
            threshold, dollars, cap = spec.threshold_recharge
            choice = credits.recharge_choice(
                kind=RechargeKind.THRESHOLD,
                threshold=threshold,
                pack_id=packs[dollars].pk,
                monthly_cap_dollars=cap,
            )
        if spec.scheduled_recharge:
            dollars, day = spec.scheduled_recharge
            choice = credits.recharge_choice(
                kind=RechargeKind.SCHEDULE, amount_dollars=dollars, billing_day=day
            )
        if choice is not None:
            credits.recharge_setting_save(org=org, choice=choice, actor=None)
        if spec.alert_below:
            services.low_balance_alert_save(
                org_id=org.pk,
                enabled=True,
                threshold=spec.alert_below,
                recipients=[f"alerts-{i}@example.com"],
            )
        org_ids.append(org.pk)
    return org_ids


class _ErrorLog(logging.Handler):
    """Collects what the product logs at ERROR (a charge to refund, a task that failed …)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}"[:500])


class _Shared:
    """What the threads share: the tick clock, the Stripe budget, pools of ids to replay, and what
    the callers saw accepted."""

    def __init__(self, plan: SoakPlan, org_ids: list[int]):
        self.lock = threading.Lock()
        self.plan = plan
        self.org_ids = org_ids
        self.tick_step = timedelta(days=30 * plan.months) / plan.ticks
        self.ticks_started = 0
        self.stripe_left = plan.stripe_budget
        self.jobs: list[tuple[int, uuid.UUID]] = []
        self.tokens: list[tuple[int, str]] = []
        self.events: dict[int, tuple[set[str], int]] = {org_id: (set(), 0) for org_id in org_ids}
        self.skips = {org_id: spec.skips for org_id, spec in zip(org_ids, ORGS, strict=True)}
        self.job_keys = max(20, plan.operations // 20)
        self.webhook_ids = max(20, plan.operations // 50)
        self.done = 0

    def tick_due(self, *, finishing: bool = False) -> datetime | None:
        """The moment of the next tick, once the run has done its share of operations before it
        (ticks are spread evenly over the run, whichever thread gets there; a thread `finishing`
        takes those left); else None."""
        with self.lock:
            k = self.ticks_started
            behind = self.done < (k + 0.5) * self.plan.operations / self.plan.ticks
            if k >= self.plan.ticks or (behind and not finishing):
                return None
            self.ticks_started += 1
            return START + self.tick_step * self.ticks_started

    def stripe_take(self) -> bool:
        with self.lock:
            if self.stripe_left <= 0:
                return False
            self.stripe_left -= 1
            return True

    def events_accepted(self, org_id: int, ids: set[str], accepted: int) -> None:
        with self.lock:
            seen, counted = self.events[org_id]
            self.events[org_id] = (seen | ids, counted + accepted)


EVENT_WINDOW = 400  # event ids are drawn from the latest 400, so duplicates are recent, as retries are


class _Worker:
    """One thread's operations, its random numbers and the jobs it has running. `prepare` turns a
    planned (kind, organisation) into what this thread does now (a complete without a job to
    complete holds one instead; a Stripe operation beyond the budget sends events) and returns
    the kind done and a function that does it."""

    def __init__(self, shared: _Shared, index: int):
        self.shared = shared
        self.rng = random.Random(shared.plan.seed * 1_000 + index)
        self.running: list[tuple[int, uuid.UUID]] = []
        self.last_batch: dict[int, list[services.EventIn]] = {}

    def prepare(self, kind: str, org_id: int) -> tuple[str, Callable[[], None]]:
        if kind in ("job complete", "job fail"):
            job = self._a_job()
            if job is not None:
                return kind, partial(self.job_complete if kind == "job complete" else self.job_fail, *job)
            kind = "job hold"
        sub = Subscription.objects.select_related("plan", "org").get(org_id=org_id)
        if kind in self.shared.skips[org_id]:
            kind = "usage events"
        arguments: tuple = (sub,)
        if kind == "plan upgrade":
            dearer = list(Plan.objects.filter(price_cents__gt=sub.plan.price_cents, is_contract=False))
            if dearer:
                arguments = (sub, self.rng.choice(dearer))
            else:
                kind = "plan downgrade or cancel"
        if kind == "refund":
            paid = CreditPurchase.objects.filter(
                org_id=org_id, kind=PurchaseKind.PACK, status=PurchaseStatus.PAID
            )
            purchase = paid.order_by("-pk").first()
            arguments = (sub.org, purchase)
            if purchase is None:
                kind, arguments = "usage events", (sub,)
        if kind in STRIPE_KINDS and not self.shared.stripe_take():
            kind, arguments = "usage events", (sub,)
        return kind, partial(getattr(self, kind.replace(" ", "_")), *arguments)

    def _a_job(self) -> tuple[int, uuid.UUID] | None:
        if self.running and self.rng.random() < 0.9:
            return self.running.pop(self.rng.randrange(len(self.running)))
        with self.shared.lock:  # someone's job, maybe already settled
            return self.rng.choice(self.shared.jobs) if self.shared.jobs else None

    @staticmethod
    def _job_request(n: int) -> services.JobRequest:
        product, mode = JOB_OPERATIONS[n % len(JOB_OPERATIONS)]
        return services.JobRequest(product, mode, n % 5 == 0, 1 + n % 60, "pdf", 10_000 + n)

    @staticmethod
    def _event(n: int) -> services.EventIn:
        product, mode = EVENT_OPERATIONS[n % len(EVENT_OPERATIONS)]
        return services.EventIn(f"ev-{n}", product, mode, 1 + n % 97, START + timedelta(minutes=n))

    # --- operations ----------------------------------------------------------------------

    def job_hold(self, sub: Subscription) -> None:
        if self.rng.random() < 0.3:  # a shared key: other threads send the same request
            n = self.rng.randrange(self.shared.job_keys)
            req = self._job_request(n)
            key, body_hash = f"job-{n}", services.request_hash(asdict(req))
        else:
            req, key, body_hash = self._job_request(self.rng.randrange(10_000)), None, ""
        job, replayed = services.job_start(sub=sub, req=req, idempotency_key=key, body_hash=body_hash)
        if not replayed:
            self.running.append((sub.org_id, job.id))
            with self.shared.lock:
                self.shared.jobs.append((sub.org_id, job.id))

    def job_complete(self, org_id: int, job_id: uuid.UUID) -> None:
        pages = None if self.rng.random() < 0.3 else self.rng.randint(1, 65)
        services.job_complete(org_id=org_id, job_id=job_id, pages=pages)

    def job_fail(self, org_id: int, job_id: uuid.UUID) -> None:
        services.job_fail(org_id=org_id, job_id=job_id)

    def usage_events(self, sub: Subscription) -> None:
        if sub.org_id in self.last_batch and self.rng.random() < 0.15:
            batch = self.last_batch[sub.org_id]  # sent again whole (a retry after a lost answer)
        else:
            newest = 50 + 4 * self.shared.done
            oldest = max(0, newest - EVENT_WINDOW)
            batch = [self._event(self.rng.randrange(oldest, newest)) for _ in range(self.rng.randint(1, 25))]
            if self.rng.random() < 0.1:
                batch.append(batch[0])
        self.last_batch[sub.org_id] = batch
        accepted, _ = services.usage_events_record(sub=sub, events=batch)
        self.shared.events_accepted(sub.org_id, {e.id for e in batch}, accepted)

    def balance_read(self, sub: Subscription) -> None:
        selectors.balance_for(sub=sub)
        today = clock.today()
        selectors.usage_rows(org_id=sub.org_id, start=today - timedelta(days=29), end=today, group_by="day")

    def pack_purchase(self, sub: Subscription) -> None:
        with self.shared.lock:
            mine = [t for o, t in self.shared.tokens if o == sub.org_id]
        if mine and self.rng.random() < 0.2:
            token = self.rng.choice(mine)  # the same form submitted again
        else:
            token = credits.new_form_token()
            with self.shared.lock:
                self.shared.tokens.append((sub.org_id, token))
        price = self.rng.choices([10, 50, 200], weights=[10, 3, 1])[0]
        pack = CreditPack.objects.get(price_cents=price * 100, active=True)
        credits.pack_purchase(
            org=sub.org, pack_id=pack.pk, token=token, agreed_to_refund_policy=True, actor=None
        )

    def plan_upgrade(self, sub: Subscription, plan: Plan) -> None:
        subscription_upgrade(org=sub.org, plan_code=plan.code, actor=None)

    def plan_downgrade_or_cancel(self, sub: Subscription) -> None:
        cheaper = list(
            Plan.objects.filter(price_cents__lt=sub.plan.price_cents, is_contract=False).values_list(
                "code", flat=True
            )
        )
        if not cheaper or (sub.scheduled_plan_id is not None and self.rng.random() < 0.3):
            subscription_downgrade_cancel(org=sub.org, actor=None)
        else:  # schedules one, or replaces the one scheduled
            subscription_downgrade_schedule(org=sub.org, plan_code=self.rng.choice(cheaper), actor=None)

    def refund(self, org: Organisation, purchase: CreditPurchase) -> None:
        credits.purchase_refund(org=org, purchase_id=purchase.pk, actor=None)

    def recharge_task(self, sub: Subscription) -> None:
        credits.recharge_threshold_run(org_id=sub.org_id)  # a task delivered twice, or late

    def webhook_replay(self, sub: Subscription) -> None:
        attempts = PaymentAttempt.objects.filter(invoice__org_id=sub.org_id).exclude(
            stripe_payment_intent_id=""
        )
        attempt = attempts.order_by("?").first()
        if attempt is None:
            return
        kind = "succeeded" if attempt.status == AttemptStatus.SUCCEEDED else "payment_failed"
        event = {
            "id": f"evt_soak_{self.rng.randrange(self.shared.webhook_ids)}",
            "type": f"payment_intent.{kind}",
            "data": {
                "object": {
                    "id": attempt.stripe_payment_intent_id,
                    "metadata": {"idempotency_key": attempt.idempotency_key},
                }
            },
        }
        stored, _ = invoice_services.webhook_event_store(event=event)
        invoice_services.webhook_event_process(event_pk=stored.pk)

    @staticmethod
    def tick(at: datetime) -> None:
        moment = clock_move(at=at)  # refused when another thread's tick moved time past it
        tick_run(at=moment)


def _plan_operations(plan: SoakPlan, org_ids: list[int]) -> list[list[tuple[str, int]]]:
    """Every thread's list of (kind, organisation), ticks apart: the same for the same seed."""
    rng = random.Random(plan.seed)
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=plan.operations - plan.ticks)
    orgs = rng.choices(org_ids, weights=[spec.weight for spec in ORGS], k=len(kinds))
    ops = list(zip(kinds, orgs, strict=True))
    return [ops[i :: plan.threads] for i in range(plan.threads)]


def _outcome(kind: str, error: BaseException | None) -> tuple[str, bool]:
    """(label, whether it is an anomaly). A tick may only be refused for coming too late (another
    thread's tick moved time past it): any other refusal stopped it half-way."""
    if error is None:
        return "ok", False
    if isinstance(error, BillingError):
        if kind == "billing tick":
            late = error.code == TICK_TOO_LATE
            return ("TOO_LATE (another tick moved time past it)" if late else error.code), not late
        return error.code, error.status >= 500 and error.code not in REFUSALS_NOT_ANOMALIES
    return f"error: {type(error).__name__}", True


def run(plan: SoakPlan, org_ids: list[int], *, progress=None) -> Report:
    """Runs the planned operations in `plan.threads` threads; returns what happened."""
    shared = _Shared(plan, org_ids)
    per_thread = _plan_operations(plan, org_ids)
    errors = _ErrorLog()
    logging.getLogger().addHandler(errors)
    reports = [Report() for _ in range(plan.threads)]

    def operations(planned: list[tuple[str, int]]):
        """(kind, organisation, tick moment) of what the thread does next: its planned operations,
        with the ticks that come due between them, and at the end any left."""
        for kind, org_id in planned:
            while (at := shared.tick_due()) is not None:
                yield "billing tick", None, at
            yield kind, org_id, None
        while (at := shared.tick_due(finishing=True)) is not None:
            yield "billing tick", None, at

    def work(i: int) -> None:
        worker, report = _Worker(shared, i), reports[i]
        for planned, org_id, at in operations(per_thread[i]):
            kind, error = planned, None
            try:
                if at is not None:
                    worker.tick(at)
                else:
                    kind, operation = worker.prepare(planned, org_id)
                    operation()
            except Exception as caught:  # noqa: BLE001 - every outcome is counted; errors are anomalies
                error = caught
            label, anomaly = _outcome(kind, error)
            report.outcomes[kind, label] += 1
            if isinstance(error, BillingError):
                report.examples.setdefault((kind, label), error.message)
            if anomaly:
                report.errors.append(f"{kind}: {''.join(traceback.format_exception(error))[-1500:]}")
            with shared.lock:
                shared.done += 1
                done = shared.done
            if progress is not None and done % max(1, plan.operations // 10) == 0:
                progress(done)

    began = time.monotonic()
    try:
        results = in_threads(plan.threads, work, timeout=None)
    finally:
        logging.getLogger().removeHandler(errors)
    total = Report(seconds=time.monotonic() - began)
    for report in reports:
        total.outcomes += report.outcomes
        total.errors += report.errors
        total.examples = {**report.examples, **total.examples}
    total.errors += [f"thread died: {r!r}" for r in results if isinstance(r, BaseException)]
    total.logged_errors = errors.records
    total.accepted_events = shared.events
    return total


def settle() -> None:
    """After the threads stopped: nothing is in flight any more, so every payment left pending is
    settled from Stripe now, and one more tick (an hour later) settles what hangs on it."""
    invoice_services.payment_attempts_reconcile(older_than=timedelta(0))
    moment = clock_move(at=clock.now() + timedelta(hours=1))
    tick_run(at=moment)
