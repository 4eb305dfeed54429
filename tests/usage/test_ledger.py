"""The credit ledger's rules (DESIGN §3), through the services."""

from datetime import timedelta

import pytest

from accounts import clock
from accounts.models import Subscription
from billing_site.errors import FREE_CREDITS_EXHAUSTED, BillingError
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import services
from usage.models import Bucket, CreditAccount, CreditLot, EntryKind, LedgerEntry, UsageEvent
from usage.selectors import balance_for

pytestmark = pytest.mark.django_db


def sub_of(org):
    return Subscription.objects.select_related("plan").get(org=org)


def job(org, pages, mode="base", ocr=False, product="parse"):
    req = services.JobRequest(
        product=product, mode=mode, ocr=ocr, pages=pages, file_type="pdf", file_size=1000
    )
    return services.job_start(sub=sub_of(org), req=req)[0]


def events(org, *units, product="parse", mode="base", prefix="e"):
    batch = [services.EventIn(f"{prefix}{i}", product, mode, u, clock.now()) for i, u in enumerate(units)]
    return services.usage_events_record(sub=sub_of(org), events=batch)


def balance(org):
    return CreditAccount.objects.get(org=org).balance


def grant(org, credits, bucket=Bucket.PURCHASED, expires_at=None, source=None):
    return services.lot_grant(
        org_id=org.pk,
        bucket=bucket,
        credits=credits,
        source=source or f"test:{credits}:{bucket}",
        expires_at=expires_at,
    )


def test_fifty_page_pdf_costs_fifty_credits_and_a_hundred_with_ocr():
    org = OrgFactory(plan="pro")
    assert job(org, 50).credits_reserved == 50
    assert job(org, 50, ocr=True).credits_reserved == 100
    assert job(org, 50, mode="advanced").credits_reserved == 150
    assert_ledger_consistent(org.pk)


def test_hold_counts_against_the_balance_until_completed():
    org = OrgFactory(plan="free")
    j = job(org, 4_000)
    assert balance(org) == 6_000
    services.job_complete(org_id=org.pk, job_id=j.id, pages=1_000)
    assert balance(org) == 9_000
    assert balance_for(sub=sub_of(org)).credits_used_this_period == 1_000
    assert_ledger_consistent(org.pk)


def test_failed_job_costs_nothing():
    org = OrgFactory(plan="starter")
    j = job(org, 500, ocr=True)
    services.job_fail(org_id=org.pk, job_id=j.id)
    assert balance(org) == 40_000
    assert balance_for(sub=sub_of(org)).credits_used_this_period == 0
    assert_ledger_consistent(org.pk)


def test_completing_twice_charges_once():
    org = OrgFactory(plan="starter")
    j = job(org, 100)
    services.job_complete(org_id=org.pk, job_id=j.id)
    again = services.job_complete(org_id=org.pk, job_id=j.id, pages=1)
    assert again.credits_charged == 100
    assert balance(org) == 39_900
    assert_ledger_consistent(org.pk)


def test_free_plan_refuses_a_hold_beyond_its_credits_with_the_exact_message():
    org = OrgFactory(plan="free")
    job(org, 9_990)
    with pytest.raises(BillingError) as refused:
        job(org, 11)
    assert refused.value.status == 402
    assert refused.value.code == "INSUFFICIENT_CREDITS"
    assert (
        refused.value.message
        == FREE_CREDITS_EXHAUSTED
        == "You've exceeded the maximum number of credits for your plan"
    )
    assert balance(org) == 10
    assert_ledger_consistent(org.pk)


def test_buckets_are_spent_plan_then_bonus_then_purchased():
    org = OrgFactory(plan="free")  # 10,000 plan credits
    purchased = grant(org, 5_000, Bucket.PURCHASED)
    bonus = grant(org, 1_000, Bucket.BONUS, expires_at=clock.now() + timedelta(days=10))
    events(org, 10_500)
    lots = {lot.bucket: lot.remaining for lot in CreditLot.objects.filter(org=org)}
    assert lots == {Bucket.PLAN: 0, Bucket.BONUS: 500, Bucket.PURCHASED: 5_000}
    events(org, 1_000, prefix="f")
    purchased.refresh_from_db()
    bonus.refresh_from_db()
    assert (bonus.remaining, purchased.remaining) == (0, 4_500)
    assert_ledger_consistent(org.pk)


def test_within_a_bucket_the_soonest_expiry_and_then_the_oldest_lot_goes_first():
    org = OrgFactory(plan="free")
    events(org, 10_000)
    later = grant(org, 100, Bucket.BONUS, expires_at=clock.now() + timedelta(days=20), source="later")
    sooner = grant(org, 100, Bucket.BONUS, expires_at=clock.now() + timedelta(days=5), source="sooner")
    old = grant(org, 100, Bucket.PURCHASED, source="old")
    new = grant(org, 100, Bucket.PURCHASED, source="new")
    events(org, 150, prefix="a")
    for lot in (later, sooner, old, new):
        lot.refresh_from_db()
    assert (sooner.remaining, later.remaining, old.remaining, new.remaining) == (0, 50, 100, 100)
    events(org, 100, prefix="b")
    old.refresh_from_db()
    assert old.remaining == 50
    assert_ledger_consistent(org.pk)


def test_release_goes_back_to_the_lots_taken_last():
    org = OrgFactory(plan="free")
    purchased = grant(org, 1_000)
    j = job(org, 10_500)  # 10,000 plan + 500 purchased
    services.job_complete(org_id=org.pk, job_id=j.id, pages=10_000)
    purchased.refresh_from_db()
    assert purchased.remaining == 1_000  # what stayed charged is what was spent first
    assert_ledger_consistent(org.pk)


def test_paid_plan_goes_into_overage_and_bills_it_pro_rata():
    org = OrgFactory(plan="starter")
    events(org, 40_000 + 1_252)
    b = balance_for(sub=sub_of(org))
    assert b.credits_remaining == 0
    assert b.overage_credits == 1_252
    assert b.overage_cents == 157  # 1,252 × $1.25 / 1,000 = $1.565 -> $1.57
    assert b.credits_used_this_period == 41_252
    assert LedgerEntry.objects.get(org=org, kind=EntryKind.OVERAGE).credits == -1_252
    assert_ledger_consistent(org.pk)


def test_holds_are_not_overage_until_charged():
    org = OrgFactory(plan="starter")
    events(org, 39_000)
    j = job(org, 3_000)
    assert balance_for(sub=sub_of(org)).overage_credits == 0
    assert CreditAccount.objects.get(org=org).overage_held == 2_000
    services.job_complete(org_id=org.pk, job_id=j.id, pages=1_500)
    b = balance_for(sub=sub_of(org))
    assert (b.credits_remaining, b.overage_credits) == (0, 500)
    assert CreditAccount.objects.get(org=org).overage_held == 0
    assert_ledger_consistent(org.pk)


def test_overage_cap_refuses_a_hold_that_would_cost_more_than_the_cap():
    org = OrgFactory(plan="starter")
    Subscription.objects.filter(org=org).update(overage_cap_cents=1_000)  # $10 = 8,000 credits
    events(org, 40_000 + 7_000)
    with pytest.raises(BillingError) as refused:
        job(org, 1_001)
    assert refused.value.status == 402
    assert "$10.00" in refused.value.message
    j = job(org, 1_000)  # exactly $10.00 is allowed
    with pytest.raises(BillingError):
        job(org, 1)  # the open hold counts towards the cap
    services.job_fail(org_id=org.pk, job_id=j.id)
    assert_ledger_consistent(org.pk)


def test_hard_stop_subscription_never_goes_into_overage():
    org = OrgFactory(plan="enterprise")
    Subscription.objects.filter(org=org).update(overage_enabled=False)
    events(org, 400_000)
    with pytest.raises(BillingError) as refused:
        events(org, 1, prefix="x")
    assert refused.value.message == FREE_CREDITS_EXHAUSTED


def test_event_ids_count_once_forever():
    org = OrgFactory(plan="starter")
    assert events(org, 10, 20, 30) == (3, 0)
    assert events(org, 10, 20, 30, 40) == (1, 3)
    assert balance(org) == 40_000 - 100
    assert_ledger_consistent(org.pk)


def test_free_batch_not_fully_covered_counts_nothing():
    org = OrgFactory(plan="free")
    events(org, 9_000)
    with pytest.raises(BillingError):
        events(org, 500, 600, prefix="big")
    assert balance(org) == 1_000
    assert not UsageEvent.objects.filter(org=org, event_id__startswith="big").exists()


def test_refused_batch_stores_no_event_ids():
    org = OrgFactory(plan="free")
    events(org, 9_000)
    with pytest.raises(BillingError):
        events(org, 2_000, prefix="late")
    services.lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=5_000, source="top-up")
    assert events(org, 2_000, prefix="late") == (1, 0)
    assert_ledger_consistent(org.pk)


def test_grant_with_the_same_source_is_granted_once():
    org = OrgFactory(plan="free")
    grant(org, 500, source="purchase:1")
    grant(org, 500, source="purchase:1")
    assert balance(org) == 10_500


def test_staff_removal_takes_from_lots_in_order_and_refuses_more_than_the_balance():
    org = OrgFactory(plan="free")
    services.credits_remove(org_id=org.pk, credits=2_500, reason="goodwill reversal", actor=None)
    assert balance(org) == 7_500
    with pytest.raises(BillingError):
        services.credits_remove(org_id=org.pk, credits=7_501, reason="too much", actor=None)
    with pytest.raises(BillingError):
        services.credits_remove(org_id=org.pk, credits=1, reason=" ", actor=None)
    assert balance(org) == 7_500
    assert_ledger_consistent(org.pk)
