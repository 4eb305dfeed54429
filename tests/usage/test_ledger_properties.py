"""Property test: random sequences of grants, holds, completions, failures, events, staff removals
and period closes keep every invariant of the ledger (STYLE: the ledger gets property tests)."""

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import clock
from accounts.models import Subscription
from accounts.services import periods_roll_due
from billing_site.errors import BillingError
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import services
from usage.models import Bucket, CreditAccount, CreditLot, Job, JobStatus

pytestmark = pytest.mark.django_db

operations = st.one_of(
    st.tuples(st.just("grant"), st.sampled_from([Bucket.PURCHASED, Bucket.BONUS]), st.integers(1, 20_000)),
    st.tuples(st.just("start"), st.sampled_from(["base", "advanced"]), st.booleans(), st.integers(1, 6_000)),
    st.tuples(st.just("complete"), st.integers(0, 50), st.one_of(st.none(), st.integers(1, 7_000))),
    st.tuples(st.just("fail"), st.integers(0, 50)),
    st.tuples(st.just("events"), st.lists(st.integers(1, 3_000), min_size=1, max_size=5), st.integers(0, 30)),
    st.tuples(st.just("remove"), st.integers(1, 5_000)),
    st.tuples(st.just("days"), st.integers(1, 40)),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=st.sampled_from(["free", "starter"]), steps=st.lists(operations, min_size=1, max_size=25))
def test_random_sequences_keep_every_ledger_invariant(plan, steps):
    moment = clock.now().replace(hour=12, minute=0, second=0, microsecond=0)
    with clock.travel(moment):
        org = OrgFactory(plan=plan)
    charged_by_job = {}
    for step in steps:
        with clock.travel(moment):
            sub = Subscription.objects.select_related("plan").get(org=org)
            jobs = list(Job.objects.filter(org=org).order_by("created_at", "id"))
            try:
                apply(step, org, sub, jobs, moment)
            except BillingError as refused:
                assert refused.status in (402, 409, 400), refused.message
            if step[0] == "days":
                moment += timedelta(days=step[1])
                with clock.travel(moment):
                    periods_roll_due(now=moment)
                plan_lots = CreditLot.objects.filter(
                    org=org, bucket=Bucket.PLAN, period__closed_at__isnull=False
                )
                assert all(lot.remaining == 0 for lot in plan_lots), "plan credits never roll over"
        assert_ledger_consistent(org.pk)
        assert CreditAccount.objects.get(org=org).balance >= 0
        for j in Job.objects.filter(org=org).exclude(status=JobStatus.RUNNING):
            charged_by_job.setdefault(j.pk, j.credits_charged)
            assert j.credits_charged == charged_by_job[j.pk], "a finished job is never charged again"
            assert j.credits_charged <= j.credits_reserved
            if j.status == JobStatus.FAILED:
                assert j.credits_charged == 0


def apply(step, org, sub, jobs, moment):
    kind = step[0]
    if kind == "grant":
        _, bucket, credits = step
        expires = moment + timedelta(days=30) if bucket == Bucket.BONUS else None
        services.lot_grant(
            org_id=org.pk,
            bucket=bucket,
            credits=credits,
            source=f"g:{moment}:{credits}:{bucket}",
            expires_at=expires,
        )
    elif kind == "start":
        _, mode, ocr, pages = step
        services.job_start(sub=sub, req=services.JobRequest("parse", mode, ocr, pages, "pdf", 1_000))
    elif kind in ("complete", "fail") and jobs:
        target = jobs[step[1] % len(jobs)]
        if kind == "complete":
            services.job_complete(org_id=org.pk, job_id=target.pk, pages=step[2])
        else:
            services.job_fail(org_id=org.pk, job_id=target.pk)
    elif kind == "events":
        _, units, offset = step
        batch = [
            services.EventIn(f"ev{offset + i}", "extract", "base", u, moment) for i, u in enumerate(units)
        ]
        services.usage_events_record(sub=sub, events=batch)
    elif kind == "remove":
        services.credits_remove(org_id=org.pk, credits=step[1], reason="property test", actor=None)
