"""Auto-recharge and purchases under real concurrency (PostgreSQL, threads, real transactions,
localstripe): one recharge in flight, the monthly cap never exceeded, a form charged once."""

import pytest

from tests.billing_support import balance, owner_of, sub_of, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.threads import in_threads
from tests.usage import credits_support
from tests.usage.credits_support import ensure_packs, pack, payment_intents
from usage import credits, services
from usage.models import CreditPurchase, PurchaseKind, PurchaseStatus, RechargeKind

eager_tasks = credits_support.eager_tasks  # a fixture

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def org(stripe_card):
    ensure_packs()
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="starter", concurrent_jobs=50)  # 40,000 plan credits
    stripe_card(org)
    return org


def set_threshold(org, threshold, price_dollars, cap_dollars=None):
    choice = credits.recharge_choice(
        kind=RechargeKind.THRESHOLD,
        threshold=threshold,
        pack_id=pack(price_dollars).pk,
        monthly_cap_dollars=cap_dollars,
    )
    credits.recharge_setting_save(org=org, choice=choice, actor=owner_of(org))


def recharges(org):
    return list(
        CreditPurchase.objects.filter(org=org, kind__in=[PurchaseKind.THRESHOLD, PurchaseKind.SCHEDULE])
    )


def test_ten_concurrent_jobs_crossing_the_threshold_trigger_exactly_one_recharge(org, eager_tasks):
    set_threshold(org, 35_000, 10)
    sub = sub_of(org)
    req = services.JobRequest("parse", "base", False, 1_000, "pdf", 1_000)

    def work(i):
        job, _ = services.job_start(sub=sub, req=req)  # a crossing queues the task (eager: it runs here)
        services.job_complete(org_id=org.pk, job_id=job.id)
        # and, as if every job had crossed, each one also runs the task itself
        return credits.recharge_threshold_run(org_id=org.pk)

    results = in_threads(10, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    (recharge,) = recharges(org)
    assert (recharge.status, recharge.quantity) == (PurchaseStatus.PAID, 1)
    assert len(payment_intents(org)) == 1
    assert balance(org) == 40_000 - 10_000 + 8_000
    assert_ledger_consistent(org.pk)


def test_ten_concurrent_triggers_while_below_make_one_recharge(org):
    set_threshold(org, 45_000, 10)  # already below: every trigger sees it
    results = in_threads(10, lambda i: credits.recharge_threshold_run(org_id=org.pk))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len([r for r in results if r is not None]) == 1
    assert len(recharges(org)) == 1 and len(payment_intents(org)) == 1
    assert balance(org) == 48_000


def test_the_monthly_cap_is_never_exceeded_by_concurrent_triggers(org):
    set_threshold(org, 1_000_000, 10, cap_dollars=30)  # far below: each run wants many packs

    def work(i):
        return [credits.recharge_threshold_run(org_id=org.pk) for _ in range(3)]

    results = in_threads(10, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    paid = [p for p in recharges(org) if p.status == PurchaseStatus.PAID]
    assert sum(p.amount_cents for p in paid) == 3_000  # $30: exactly the cap, never more
    assert len(payment_intents(org)) == len(paid)
    assert_ledger_consistent(org.pk)


def test_a_pack_form_submitted_ten_times_at_once_charges_once(org):
    token = credits.new_form_token()
    results = in_threads(
        10,
        lambda i: credits.pack_purchase(
            org=org, pack_id=pack(50).pk, token=token, agreed_to_refund_policy=True, actor=None
        ),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(first for _, first in results) == 1
    assert CreditPurchase.objects.filter(org=org).count() == 1
    assert len(payment_intents(org)) == 1
    assert balance(org) == 84_000
