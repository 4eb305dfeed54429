"""The demo organisation that `make run` seeds (`python manage.py seed_demo`).

Ninety days of usage history are made through the real services, with billing time standing still
at each moment of the history (`clock.travel`), so the ledger, the periods and the rollups are
exactly what the same traffic would have left through the API. Only the demo organisation's own
subscription is rolled: seeding never closes another organisation's period or touches the shared
billing clock.

The data are deterministic for a given day (a fixed random seed): weekday / weekend rhythm, a
slight growth trend and a few spikes, about 5,000-15,000 credits a day, so a Pro period (400,000
credits) is partly used.
"""

import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.db import transaction

from accounts import clock
from accounts.models import Membership, Organisation, Role, Subscription, User
from accounts.services import member_add, organisation_create, period_roll
from invoices.models import Invoice, InvoiceStatus
from invoices.services import invoice_mark_paid
from usage.models import Job
from usage.selectors import catalog_costs
from usage.services import (
    MAX_EVENTS_PER_BATCH,
    EventIn,
    JobRequest,
    job_complete,
    job_fail,
    job_start,
    usage_events_record,
)

ORG_NAME = "Demo Org"
PLAN_CODE = "pro"
OWNER_EMAIL = "demo@example.com"
BILLING_EMAIL = "billing@example.com"
MEMBER_EMAIL = "member@example.com"
DEMO_PASSWORD = "demo-pass-2026"
STAFF_EMAIL = "admin@example.com"
STAFF_PASSWORD = "admin-demo-pass"

HISTORY_DAYS = 90
SEED = 20260101

# Share of a day's event credits per (product, mode); pairs missing from the catalog are skipped.
EVENT_MIX = {
    ("parse", "base"): 0.30,
    ("parse", "advanced"): 0.14,
    ("parse", "ocr"): 0.07,
    ("parse", "audio"): 0.05,
    ("extract", "base"): 0.16,
    ("extract", "ocr"): 0.03,
    ("classify", "base"): 0.08,
    ("classify", "ocr"): 0.01,
    ("split", "base"): 0.07,
    ("split", "ocr"): 0.01,
    ("index", "base"): 0.07,
    ("index", "ocr"): 0.01,
}
# The day's event batches: the hour (UTC) each is reported at, the hours of events it carries (up
# to that hour) and its share of the day's credits. Few batches and jobs keep seeding fast.
SLOTS = ((11, 11, 0.45), (19, 8, 0.55))
JOB_PRODUCTS = (("parse", 5), ("extract", 3), ("classify", 1), ("split", 1), ("index", 1))
JOB_FAILURE_RATE = 0.05


@dataclass(frozen=True)
class DemoResult:
    org: Organisation
    api_key: str | None  # only when this run created the organisation
    created: bool


def demo_org() -> Organisation | None:
    """The demo organisation: the one named "Demo Org" that demo@example.com belongs to."""
    membership = (
        Membership.objects.filter(org__name=ORG_NAME, user__email=OWNER_EMAIL)
        .select_related("org")
        .order_by("org_id")
        .first()
    )
    return membership.org if membership else None


def logins(result: DemoResult) -> list[str]:
    key = result.api_key or "create one under Settings → API keys"
    return [
        f"Demo organisation: {result.org.name} (org {result.org.pk})",
        f"Owner:  {OWNER_EMAIL} / {DEMO_PASSWORD}",
        f"Billing admin: {BILLING_EMAIL} / {DEMO_PASSWORD}",
        f"Member: {MEMBER_EMAIL} / {DEMO_PASSWORD}",
        f"Staff (/admin/): {STAFF_EMAIL} / {STAFF_PASSWORD}",
        f"API key: {key}",
    ]


def seed_demo() -> DemoResult:
    """Creates the demo organisation with its people and history, unless it exists already.

    One transaction: a run that fails half-way leaves nothing behind, so the next run starts over.
    """
    org = demo_org()
    if org is not None:
        return DemoResult(org=org, api_key=None, created=False)
    end = clock.now()
    today = end.date()
    day0 = today - timedelta(days=HISTORY_DAYS)
    with transaction.atomic():
        if not User.objects.filter(email=STAFF_EMAIL).exists():
            User.objects.create_superuser(email=STAFF_EMAIL, password=STAFF_PASSWORD)
        with clock.travel(clock.midnight(day0)):
            org, raw_key = organisation_create(
                name=ORG_NAME, plan_code=PLAN_CODE, owner_email=OWNER_EMAIL, password=DEMO_PASSWORD
            )
            member_add(org_id=org.pk, email=BILLING_EMAIL, role=Role.BILLING_ADMIN, password=DEMO_PASSWORD)
            member_add(org_id=org.pk, email=MEMBER_EMAIL, role=Role.MEMBER, password=DEMO_PASSWORD)
        _History(org_id=org.pk, day0=day0, end=end).make()
    return DemoResult(org=org, api_key=raw_key, created=True)


class _History:
    """Replays HISTORY_DAYS + 1 days of traffic, day0 to today, each action at its own moment."""

    def __init__(self, *, org_id: int, day0: date, end: datetime):
        self.org_id = org_id
        self.day0 = day0
        self.end = end  # nothing happens after the present moment
        self.rng = random.Random(SEED)
        self.costs = catalog_costs()
        self.mix = {pm: share for pm, share in EVENT_MIX.items() if pm in self.costs}
        self.sub = Subscription.objects.select_related("plan").get(org_id=org_id)
        days = (end.date() - day0).days + 1
        weekdays = [i for i in range(7, days - 2) if (day0 + timedelta(days=i)).weekday() < 5]
        self.spikes = set(self.rng.sample(weekdays, k=min(4, len(weekdays))))  # a few busy weekdays
        self.days = days

    def make(self) -> None:
        for i in range(self.days):
            day = self.day0 + timedelta(days=i)
            self._roll(clock.midnight(day))
            self._day(i, day)

    def _roll(self, moment: datetime) -> None:
        """Rolls the periods that ended by `moment`; the demo customer pays each invoice by bank
        transfer the day it is issued (a card needs Stripe, which is not up while seeding)."""
        rolled = False
        with clock.travel(moment):
            while period_roll(subscription_id=self.sub.pk, now=moment):
                rolled = True
            for invoice in Invoice.objects.filter(org_id=self.org_id, status=InvoiceStatus.ISSUED):
                invoice_mark_paid(invoice=invoice, reason="Bank transfer (demo history)", actor=None)
        if rolled:
            self.sub.refresh_from_db()

    def _target(self, i: int, day: date) -> int:
        """The day's event credits: growth from 7,500 to 11,000 a weekday, weekends at 55%."""
        credits = 7_500 + 3_500 * i / max(self.days - 1, 1)
        if day.weekday() >= 5:
            credits *= 0.55
        credits *= self.rng.uniform(0.85, 1.15)
        if i in self.spikes:
            credits *= self.rng.uniform(1.6, 2.1)
        return int(credits)

    def _day(self, i: int, day: date) -> None:
        """The day's actions (event batches, job starts and ends) in the order of their moments."""
        start = clock.midnight(day)
        target = self._target(i, day)
        actions: list[tuple[datetime, int, str, object]] = []
        n = 0
        for hour, window, share in SLOTS:
            moment = start + timedelta(hours=hour)
            events = []
            for (product, mode), mix_share in self.mix.items():
                units = int(target * share * mix_share) // self.costs[(product, mode)]
                for part in self._split_units(mode, units):
                    n += 1
                    events.append(
                        EventIn(
                            id=f"demo-{day.isoformat()}-{n}",
                            product=product,
                            mode=mode,
                            units=part,
                            timestamp=moment - timedelta(seconds=self.rng.randint(1, window * 3600)),
                        )
                    )
            events.sort(key=lambda e: e.timestamp)
            for k in range(0, len(events), MAX_EVENTS_PER_BATCH):
                actions.append((moment, len(actions), "events", events[k : k + MAX_EVENTS_PER_BATCH]))
        jobs = self.rng.randint(1, 3) if day.weekday() < 5 else self.rng.randint(0, 1)
        for _ in range(jobs):
            began = start + timedelta(seconds=self.rng.randint(7 * 3600, 21 * 3600))
            done = began + timedelta(seconds=self.rng.randint(20, 15 * 60))
            req, outcome, pages = self._job()
            ref = len(actions)
            actions.append((began, ref, "start", req))
            actions.append((done, ref + 1, outcome, (ref, pages)))
        actions.sort(key=lambda a: (a[0], a[1]))
        self._run(actions)

    def _split_units(self, mode: str, units: int) -> list[int]:
        low, high = (30, 900) if mode == "audio" else (1, 100)
        parts = []
        while units > 0:
            u = min(units, self.rng.randint(low, high))
            parts.append(u)
            units -= u
        return parts

    def _job(self) -> tuple[JobRequest, str, int | None]:
        """A job request, how it ends ("complete" or "fail") and the actual pages (None: as held)."""
        product = self.rng.choices([p for p, _ in JOB_PRODUCTS], weights=[w for _, w in JOB_PRODUCTS])[0]
        mode = "advanced" if product == "parse" and self.rng.random() < 0.3 else "base"
        if (product, mode) not in self.costs:
            product, mode = "parse", "base"
        ocr = (product, "ocr") in self.costs and self.rng.random() < 0.25
        pages = self.rng.choice(
            (self.rng.randint(1, 20), self.rng.randint(10, 120), self.rng.randint(100, 400))
        )
        file_size = min(pages * self.rng.randint(40_000, 250_000), 100 * 1_048_576)
        req = JobRequest(
            product=product, mode=mode, ocr=ocr, pages=pages, file_type="pdf", file_size=file_size
        )
        if self.rng.random() < JOB_FAILURE_RATE:
            return req, "fail", None
        actual = None if self.rng.random() < 0.85 else self.rng.randint(max(1, pages // 2), pages)
        return req, "complete", actual

    def _run(self, actions: list[tuple[datetime, int, str, object]]) -> None:
        started: dict[int, Job] = {}
        for moment, ref, kind, payload in actions:
            if kind in ("start", "events"):
                if moment > self.end:
                    continue
                with clock.travel(moment):
                    if kind == "start":
                        started[ref], _ = job_start(sub=self.sub, req=payload)
                    else:
                        usage_events_record(sub=self.sub, events=payload)
                continue
            start_ref, pages = payload  # a job's end: never left running past the present
            job = started.get(start_ref)
            if job is None:
                continue
            with clock.travel(min(moment, self.end)):
                if kind == "fail":
                    job_fail(org_id=self.org_id, job_id=job.id)
                else:
                    job_complete(org_id=self.org_id, job_id=job.id, pages=pages)
