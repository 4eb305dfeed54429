"""Real threads, real transactions, on PostgreSQL: holds never overspend a balance, an event id
counts once, an Idempotency-Key holds once."""

import pytest

from accounts.models import Subscription
from billing_site.errors import BillingError
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.threads import in_threads
from usage import services
from usage.models import CreditAccount, Job, UsageEvent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def sub_of(org):
    return Subscription.objects.select_related("plan").get(org=org)


def test_ten_parallel_jobs_never_take_the_balance_below_zero():
    org = OrgFactory(plan="free", monthly_credits=1_000)
    sub = sub_of(org)
    req = services.JobRequest("parse", "base", False, 150, "pdf", 1_000)
    results = in_threads(10, lambda i: services.job_start(sub=sub, req=req)[0])
    started = [r for r in results if isinstance(r, Job)]
    refused = [r for r in results if isinstance(r, BillingError)]
    assert len(started) == 6 and len(refused) == 4, results
    assert all(r.status == 402 for r in refused)
    assert CreditAccount.objects.get(org=org).balance == 100
    in_threads(6, lambda i: services.job_complete(org_id=org.pk, job_id=started[i].id, pages=100))
    assert CreditAccount.objects.get(org=org).balance == 400
    assert_ledger_consistent(org.pk)


def test_parallel_completions_and_failures_of_one_job_settle_it_once():
    org = OrgFactory(plan="starter")
    job, _ = services.job_start(
        sub=sub_of(org), req=services.JobRequest("parse", "base", False, 100, "pdf", 1)
    )

    def settle(i):
        if i % 2:
            return services.job_complete(org_id=org.pk, job_id=job.id, pages=60)
        return services.job_fail(org_id=org.pk, job_id=job.id)

    results = in_threads(10, settle)
    job.refresh_from_db()
    balance = CreditAccount.objects.get(org=org).balance
    assert balance == (40_000 - 60 if job.status == "succeeded" else 40_000)
    assert sum(isinstance(r, BillingError) and r.status == 409 for r in results) == 5
    assert_ledger_consistent(org.pk)


def test_the_same_event_batch_sent_by_ten_threads_counts_once():
    org = OrgFactory(plan="starter")
    sub = sub_of(org)
    from accounts import clock

    batch = [services.EventIn(f"dup-{i}", "parse", "base", 10, clock.now()) for i in range(100)]
    results = in_threads(10, lambda i: services.usage_events_record(sub=sub, events=batch))
    assert sorted(r[0] for r in results) == [0] * 9 + [100]
    assert UsageEvent.objects.filter(org=org).count() == 100
    assert CreditAccount.objects.get(org=org).balance == 40_000 - 1_000
    assert_ledger_consistent(org.pk)


def test_one_idempotency_key_sent_by_ten_threads_holds_once():
    org = OrgFactory(plan="starter")
    sub = sub_of(org)
    req = services.JobRequest("parse", "base", False, 100, "pdf", 1)
    body_hash = services.request_hash({"pages": 100})
    results = in_threads(
        10, lambda i: services.job_start(sub=sub, req=req, idempotency_key="k1", body_hash=body_hash)
    )
    assert len({job.id for job, _ in results}) == 1
    assert sum(not replayed for _, replayed in results) == 1
    assert CreditAccount.objects.get(org=org).balance == 40_000 - 100
    assert_ledger_consistent(org.pk)
