"""Auto-recharge against a real localstripe: the threshold trigger from the ledger path, the
schedule run by billing_tick, the safeguards (one in flight, the monthly cap, back-off after a
decline) and stopping (DESIGN §4; the credits issue)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import clock
from invoices.models import Invoice, InvoiceStatus
from tests.billing_support import balance, owner_of, spend, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage import credits_support
from tests.usage.credits_support import DECLINING_CARD, bucket_total, job, payment_intents
from usage import credits
from usage.models import (
    Bucket,
    CreditAccount,
    CreditPurchase,
    PurchaseKind,
    PurchaseStatus,
    RechargeFrequency,
    RechargeKind,
    RechargeSetting,
    Tier,
)

packs = credits_support.packs  # a fixture
org = credits_support.starter_with_card  # a fixture
eager_tasks = credits_support.eager_tasks  # a fixture

pytestmark = pytest.mark.django_db


def set_threshold(org, threshold, pack, cap_dollars=None):
    choice = credits.recharge_choice(
        kind=RechargeKind.THRESHOLD, threshold=threshold, pack_id=pack.pk, monthly_cap_dollars=cap_dollars
    )
    return credits.recharge_setting_save(org=org, choice=choice, actor=owner_of(org))


def set_schedule(org, dollars, day, frequency=RechargeFrequency.MONTHLY, month=None, cap_dollars=None):
    choice = credits.recharge_choice(
        kind=RechargeKind.SCHEDULE,
        amount_dollars=dollars,
        frequency=frequency,
        billing_day=day,
        billing_month=month,
        monthly_cap_dollars=cap_dollars,
    )
    return credits.recharge_setting_save(org=org, choice=choice, actor=owner_of(org))


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """`with committed():` runs the block's on_commit callbacks (the e-mails) at its end, as a
    real commit would."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


def recharges(org):
    return list(
        CreditPurchase.objects.filter(org=org, kind__in=[PurchaseKind.THRESHOLD, PurchaseKind.SCHEDULE])
    )


# --- the threshold trigger --------------------------------------------------------------------


def test_only_the_charge_that_crosses_the_threshold_queues_a_check_after_commit(
    org,
    packs,
    django_capture_on_commit_callbacks,
):
    set_threshold(org, 5_000, packs[10])
    with django_capture_on_commit_callbacks() as queued:
        spend(org, 30_000, "still above")  # 10,000 left
    assert queued == []
    with django_capture_on_commit_callbacks() as queued:
        spend(org, 5_001, "crosses")  # 4,999 left
    assert len(queued) == 1
    with django_capture_on_commit_callbacks() as queued:
        spend(org, 1, "already below")
        job(org, 10)
    assert queued == []
    assert recharges(org) == []  # nothing ran inside the request


def test_a_job_hold_that_crosses_the_threshold_queues_a_check(org, packs, django_capture_on_commit_callbacks):
    set_threshold(org, 5_000, packs[10])
    with django_capture_on_commit_callbacks() as queued:
        job(org, 35_001)
    assert len(queued) == 1


def test_the_ledger_path_makes_no_extra_query_for_the_threshold(org, packs):
    other = OrgFactory(plan="starter")
    job(other, 10)  # warm the per-process caches (the catalog) first
    with CaptureQueriesContext(connection) as without:
        job(other, 10)
    set_threshold(org, 5_000, packs[10])
    with CaptureQueriesContext(connection) as with_threshold:
        job(org, 10)
    assert len(with_threshold) == len(without)


def test_a_crossing_buys_the_pack_through_the_task(
    org, packs, eager_tasks, django_capture_on_commit_callbacks
):
    set_threshold(org, 5_000, packs[10])
    with django_capture_on_commit_callbacks(execute=True):
        spend(org, 35_001, "crosses")
    (purchase,) = recharges(org)
    assert (purchase.kind, purchase.status, purchase.quantity) == (
        PurchaseKind.THRESHOLD,
        PurchaseStatus.PAID,
        1,
    )
    assert balance(org) == 4_999 + 8_000
    invoice = Invoice.objects.get(pk=purchase.invoice_id)
    assert invoice.status == InvoiceStatus.PAID and invoice.number  # it shows in Invoices
    assert "Auto-recharge" in invoice.description
    assert_ledger_consistent(org.pk)


def test_enough_packs_are_bought_to_cover_the_shortfall(org, packs):
    set_threshold(org, 20_000, packs[10])
    spend(org, 40_000, "all of it")
    purchase = credits.recharge_threshold_run(org_id=org.pk)
    assert (purchase.quantity, purchase.amount_cents, purchase.credits) == (3, 3_000, 24_000)
    assert balance(org) == 24_000
    line = Invoice.objects.get(pk=purchase.invoice_id).lines.get()
    assert (line.quantity, line.unit_cents, line.amount_cents) == (3, 1_000, 3_000)
    assert credits.recharge_threshold_run(org_id=org.pk) is None  # back above: nothing more


def test_saving_a_threshold_above_the_balance_recharges_at_once(
    org,
    packs,
    eager_tasks,
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks(execute=True):
        set_threshold(org, 45_000, packs[10])
    (purchase,) = recharges(org)
    assert purchase.status == PurchaseStatus.PAID and balance(org) == 48_000


def test_a_crossing_whose_task_was_lost_is_recharged_by_billing_tick(org, packs):
    set_threshold(org, 5_000, packs[10])
    spend(org, 36_000, "crosses; the queued task is never run")
    assert recharges(org) == []
    tick("2027-05-10T09:05:00Z")
    assert len(recharges(org)) == 1 and balance(org) == 12_000
    tick("2027-05-10T09:10:00Z")
    assert len(recharges(org)) == 1


def test_a_recharge_whose_worker_died_before_paying_is_bought_by_the_next_tick_without_backing_off(
    org, packs, monkeypatch, mailoutbox, committed
):
    set_threshold(org, 5_000, packs[10])
    spend(org, 36_000, "below")
    real_pay = credits._purchase_pay

    def died(purchase):
        raise RuntimeError("the worker was killed after reserving the recharge")

    monkeypatch.setattr(credits, "_purchase_pay", died)
    with pytest.raises(RuntimeError):
        credits.recharge_threshold_run(org_id=org.pk)
    monkeypatch.setattr(credits, "_purchase_pay", real_pay)
    with committed():
        tick("2027-05-10T09:10:00Z")  # settles the stale one as failed, then buys the pack
    assert [p.status for p in recharges(org)] == [PurchaseStatus.PAID, PurchaseStatus.FAILED]
    setting = RechargeSetting.objects.get(org=org)
    assert (setting.failures, setting.next_try_at) == (0, None)  # our crash, not the card's fault
    assert not [m for m in mailoutbox if m.subject.startswith("Auto-recharge")]
    assert balance(org) == 4_000 + 8_000


# --- safeguards -------------------------------------------------------------------------------


def test_the_monthly_cap_limits_the_packs_and_is_never_exceeded(
    org,
    packs,
    mailoutbox,
    django_capture_on_commit_callbacks,
):
    set_threshold(org, 100_000, packs[10], cap_dollars=25)
    first = credits.recharge_threshold_run(org_id=org.pk)
    assert (first.quantity, first.amount_cents) == (2, 2_000)  # 8 packs needed, $25 allows 2
    with django_capture_on_commit_callbacks(execute=True):  # the e-mail goes out after commit
        assert credits.recharge_threshold_run(org_id=org.pk) is None  # $5 of room: not one pack
        assert credits.recharge_threshold_run(org_id=org.pk) is None
    assert sum(p.amount_cents for p in recharges(org)) == 2_000
    capped = [m for m in mailoutbox if "monthly cap" in m.subject]
    assert len(capped) == 1 and owner_of(org).email in capped[0].to
    assert RechargeSetting.objects.get(org=org).cap_reached_month == "2027-05"
    tick("2027-06-01T00:00:00Z")  # a new month: room again
    assert len(recharges(org)) == 2
    assert sum(p.amount_cents for p in recharges(org)) == 4_000


def test_a_declined_recharge_is_not_retried_in_a_loop(packs, stripe_card, mailoutbox, committed):
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org, number=DECLINING_CARD)
    set_threshold(org, 5_000, packs[10])
    spend(org, 36_000, "below")
    for _ in range(10):
        with committed():
            credits.recharge_threshold_run(org_id=org.pk)
    assert len(payment_intents(org)) == 1
    setting = RechargeSetting.objects.get(org=org)
    assert setting.failures == 1 and setting.next_try_at == setting.first_failed_at + timedelta(days=1)
    assert [p.status for p in recharges(org)] == [PurchaseStatus.DECLINED]
    recharge_mails = [m for m in mailoutbox if m.subject.startswith("Auto-recharge")]
    assert len(recharge_mails) == 1 and "failed" in recharge_mails[0].subject
    assert owner_of(org).email in recharge_mails[0].to
    first = setting.first_failed_at
    for hours in (1, 2, 12, 23):  # every tick until the back-off ends does nothing
        tick((first + timedelta(hours=hours)).isoformat())
    assert len(payment_intents(org)) == 1
    tick((first + timedelta(days=1, minutes=1)).isoformat())  # the one retry after a day
    tick((first + timedelta(days=1, minutes=2)).isoformat())
    assert len(payment_intents(org)) == 2
    tick((first + timedelta(days=3, minutes=1)).isoformat())
    with committed():
        tick((first + timedelta(days=7, minutes=1)).isoformat())
    assert len(payment_intents(org)) == 4
    setting.refresh_from_db()
    assert not setting.enabled and "Turned off" in setting.last_problem
    assert CreditAccount.objects.get(org=org).recharge_below is None
    tick((first + timedelta(days=20)).isoformat())
    assert len(payment_intents(org)) == 4
    recharge_mails = [m for m in mailoutbox if m.subject.startswith("Auto-recharge")]
    assert "turned off" in recharge_mails[-1].subject
    assert balance(org) == 4_000  # no credit for any unpaid recharge


def test_a_recharge_without_a_card_fails_once_and_backs_off(packs, mailoutbox, committed):
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="free")
    set_threshold(org, 5_000, packs[10])
    spend(org, 6_000, "below")
    for _ in range(3):
        with committed():
            credits.recharge_threshold_run(org_id=org.pk)
    (failed,) = recharges(org)
    assert failed.status == PurchaseStatus.FAILED and "card" in failed.message
    assert len([m for m in mailoutbox if m.subject.startswith("Auto-recharge")]) == 1


def test_a_successful_recharge_clears_the_back_off(org, packs):
    set_threshold(org, 5_000, packs[10])
    RechargeSetting.objects.filter(org=org).update(
        failures=2, first_failed_at=clock.now(), next_try_at=clock.now()
    )
    spend(org, 36_000, "below")
    assert credits.recharge_threshold_run(org_id=org.pk).status == PurchaseStatus.PAID
    setting = RechargeSetting.objects.get(org=org)
    assert (setting.failures, setting.next_try_at) == (0, None)


def test_stopping_stops_only_the_next_recharge(org, packs, django_capture_on_commit_callbacks):
    set_threshold(org, 5_000, packs[10])
    spend(org, 36_000, "below")
    credits.recharge_threshold_run(org_id=org.pk)
    assert balance(org) == 12_000
    credits.recharge_stop(org=org, actor=owner_of(org))
    assert CreditAccount.objects.get(org=org).recharge_below is None
    with django_capture_on_commit_callbacks() as queued:
        spend(org, 7_500, "below again")  # 4,000 plan + 3,500 purchased credits
    assert queued == []
    tick("2027-05-10T10:00:00Z")
    assert len(recharges(org)) == 1
    assert bucket_total(org, Bucket.PURCHASED) == balance(org) == 4_500  # what was bought stays


# --- the schedule ------------------------------------------------------------------------------


def test_a_monthly_schedule_runs_once_per_billing_date_through_billing_tick(org, packs):
    set_schedule(org, 100, day=12)
    tick("2027-05-11T09:00:00Z")
    assert recharges(org) == []
    tick("2027-05-12T00:01:00Z")
    (may,) = recharges(org)
    assert (may.kind, may.status, may.occurrence) == (PurchaseKind.SCHEDULE, PurchaseStatus.PAID, "2027-05")
    assert (may.amount_cents, may.credits) == (10_000, 80_000)
    assert (may.tier, may.bonus_credits) == (Tier.EXPLORE, 2_400)  # $100 this month reaches Explore
    tick("2027-05-12T08:00:00Z")
    tick("2027-05-30T08:00:00Z")
    assert len(recharges(org)) == 1
    tick("2027-06-12T00:01:00Z")
    assert [p.occurrence for p in recharges(org)] == ["2027-06", "2027-05"]
    assert_ledger_consistent(org.pk)


def test_a_schedule_saved_after_this_months_date_starts_next_month(org, packs):
    set_schedule(org, 10, day=3)  # saved on 10 May
    tick("2027-05-11T00:00:00Z")
    assert recharges(org) == []
    setting = RechargeSetting.objects.get(org=org)
    assert str(credits.next_recharge_date(setting, clock.today())) == "2027-06-03"
    tick("2027-06-03T00:00:00Z")
    assert len(recharges(org)) == 1


def test_a_yearly_schedule_runs_on_its_date(org, packs):
    set_schedule(org, 10, day=31, frequency=RechargeFrequency.YEARLY, month=6)
    tick("2027-06-29T09:00:00Z")
    assert recharges(org) == []
    tick("2027-06-30T09:00:00Z")  # June has 30 days: the 31st falls to the 30th
    (june,) = recharges(org)
    assert june.occurrence == "2027"
    tick("2027-12-31T09:00:00Z")
    assert len(recharges(org)) == 1


# --- the preview -------------------------------------------------------------------------------


def test_the_preview_shows_the_pack_its_price_the_bonus_and_the_tier_it_reaches(org, packs):
    credits.pack_purchase(
        org=org,
        pack_id=packs[50].pk,
        token=credits.new_form_token(),
        agreed_to_refund_policy=True,
        actor=None,
    )
    choice = credits.recharge_choice(kind=RechargeKind.THRESHOLD, threshold=5_000, pack_id=packs[50].pk)
    preview = credits.recharge_preview(org_id=org.pk, choice=choice)
    p = preview.purchase
    assert (p.amount_cents, p.credits, p.tier_after, p.bonus_credits, p.rpm_after) == (
        5_000,
        44_000,
        Tier.EXPLORE,
        1_320,
        1_800,
    )
    assert p.reaches_tier and not preview.fires_now
    scheduled = credits.recharge_choice(
        kind=RechargeKind.SCHEDULE, amount_dollars=500, frequency=RechargeFrequency.MONTHLY, billing_day=10
    )
    preview = credits.recharge_preview(org_id=org.pk, choice=scheduled)
    assert (preview.purchase.credits, preview.purchase.tier_after) == (400_000, Tier.BUILD)
    assert preview.purchase.bonus_credits == 20_000
    assert str(preview.next_date) == "2027-05-10"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"kind": "threshold", "threshold": 0}, "threshold"),
        ({"kind": "threshold", "threshold": 5_000}, "pack"),
        ({"kind": "schedule", "amount_dollars": 0, "billing_day": 1}, "amount"),
        ({"kind": "schedule", "amount_dollars": 10, "billing_day": 32}, "billing date"),
        ({"kind": "schedule", "amount_dollars": 10, "billing_day": 1, "frequency": "yearly"}, "month"),
        ({"kind": "schedule", "amount_dollars": 50, "billing_day": 1, "monthly_cap_dollars": 20}, "cap"),
    ],
)
def test_an_incomplete_recharge_setting_is_refused_with_a_reason(packs, fields, words):
    with pytest.raises(Exception) as refused:
        credits.recharge_choice(**fields)
    assert words in refused.value.message
