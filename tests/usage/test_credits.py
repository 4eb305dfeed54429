"""Prepaid credits against a real localstripe: packs, commitment tiers and bonus, refunds, and the
exactly-once rules (DESIGN §2–§5)."""

from datetime import timedelta

import pytest

from accounts import clock
from billing_site.errors import BillingError
from invoices import services as invoice_services
from invoices.models import Invoice, InvoiceStatus, PaymentAttempt
from tests.billing_support import at, balance, owner_of, spend, sub_of, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage import credits_support
from tests.usage.credits_support import DECLINING_CARD, bucket_total, job, payment_intents
from usage import credits
from usage.models import (
    Bucket,
    Commitment,
    CommitmentPeriod,
    CommitmentTerm,
    CreditLot,
    CreditPack,
    CreditPurchase,
    EntryKind,
    LedgerEntry,
    PurchaseStatus,
    Tier,
)

packs = credits_support.packs  # a fixture
buyer = credits_support.starter_with_card  # a fixture

pytestmark = pytest.mark.django_db


def buy(org, pack, token=None, agreed=True):
    purchase, _ = credits.pack_purchase(
        org=org,
        pack_id=pack.pk,
        token=token or credits.new_form_token(),
        agreed_to_refund_policy=agreed,
        actor=owner_of(org),
    )
    return purchase


# --- buying a pack -----------------------------------------------------------------------------


def test_without_the_refund_policy_tick_nothing_is_charged(buyer, packs):
    with pytest.raises(BillingError) as refused:
        buy(buyer, packs[50], agreed=False)
    assert refused.value.code == "REFUND_POLICY"
    assert "refund policy" in refused.value.message
    assert not CreditPurchase.objects.exists() and not Invoice.objects.filter(kind="purchase").exists()
    assert payment_intents(buyer) == []


def test_a_paid_pack_lands_in_the_purchased_bucket_and_never_expires(buyer, packs):
    before = balance(buyer)
    purchase = buy(buyer, packs[50])
    assert purchase.status == PurchaseStatus.PAID
    assert (purchase.credits, purchase.bonus_credits, purchase.amount_cents) == (44_000, 0, 5_000)
    lot = purchase.lot
    assert (lot.bucket, lot.granted, lot.expires_at) == (Bucket.PURCHASED, 44_000, None)
    assert lot.source == f"invoice:{purchase.invoice_id}"
    invoice = purchase.invoice
    assert invoice.status == InvoiceStatus.PAID and invoice.number.startswith("INV-2027-")
    assert invoice.total_cents == 5_000 and invoice.fulfilment["purchase_id"] == purchase.pk
    assert balance(buyer) == before + 44_000
    # a year of ticks later the purchased credits are all still there
    tick("2028-06-01T00:00:00Z")
    assert bucket_total(buyer, Bucket.PURCHASED) == 44_000
    assert CreditLot.objects.get(pk=lot.pk).expired_at is None
    assert_ledger_consistent(buyer.pk)


def test_the_same_form_submitted_twice_charges_once(buyer, packs):
    token = credits.new_form_token()
    first, was_first = credits.pack_purchase(
        org=buyer, pack_id=packs[10].pk, token=token, agreed_to_refund_policy=True, actor=None
    )
    again, was_again = credits.pack_purchase(
        org=buyer, pack_id=packs[10].pk, token=token, agreed_to_refund_policy=True, actor=None
    )
    assert (was_first, was_again) == (True, False) and first.pk == again.pk
    assert len(payment_intents(buyer)) == 1
    assert bucket_total(buyer, Bucket.PURCHASED) == 8_000


def test_a_declined_card_grants_nothing_and_the_draft_is_void(packs, stripe_card):
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="free")
    stripe_card(org, number=DECLINING_CARD)
    before = balance(org)
    purchase = buy(org, packs[10])
    assert purchase.status == PurchaseStatus.DECLINED and purchase.message
    assert purchase.lot is None and balance(org) == before
    invoice = Invoice.objects.get(kind="purchase")
    assert invoice.status == InvoiceStatus.VOID and invoice.number is None
    assert not CreditLot.objects.filter(org=org, bucket=Bucket.PURCHASED).exists()


def test_without_a_card_nothing_is_charged(packs):
    org = OrgFactory(plan="free")
    with pytest.raises(BillingError) as refused:
        buy(org, packs[10])
    assert refused.value.status == 402
    assert not CreditPurchase.objects.exists()


def test_a_crash_after_stripe_charged_is_granted_once_by_the_reconciler(buyer, packs, monkeypatch):
    real_settle = invoice_services._settle

    def crash(*args, **kwargs):
        raise RuntimeError("the web process died here")

    monkeypatch.setattr(invoice_services, "_settle", crash)
    with pytest.raises(RuntimeError):
        buy(buyer, packs[50])
    purchase = CreditPurchase.objects.get()
    assert purchase.status == PurchaseStatus.PENDING and bucket_total(buyer, Bucket.PURCHASED) == 0
    monkeypatch.setattr(invoice_services, "_settle", real_settle)
    invoice_services.payment_attempts_reconcile(older_than=timedelta(0))
    invoice_services.payment_attempts_reconcile(older_than=timedelta(0))
    credits.purchases_settle_stale(now=clock.now() + timedelta(hours=1))
    purchase.refresh_from_db()
    assert purchase.status == PurchaseStatus.PAID
    assert bucket_total(buyer, Bucket.PURCHASED) == 44_000
    assert CreditLot.objects.filter(org=buyer, bucket=Bucket.PURCHASED).count() == 1
    assert len(payment_intents(buyer)) == 1
    # the handler called again (a webhook, another reconcile) adds nothing
    credits.purchase_fulfil(Invoice.objects.get(pk=purchase.invoice_id))
    assert bucket_total(buyer, Bucket.PURCHASED) == 44_000
    assert_ledger_consistent(buyer.pk)


def test_a_request_that_died_before_stripe_is_settled_as_failed(buyer, packs, monkeypatch):
    def die(**kwargs):
        raise RuntimeError("died before the draft")

    monkeypatch.setattr(invoice_services, "purchase_charge", die)
    with pytest.raises(RuntimeError):
        buy(buyer, packs[10])
    credits.purchases_settle_stale(now=clock.now() + timedelta(hours=1))
    purchase = CreditPurchase.objects.get()
    assert purchase.status == PurchaseStatus.FAILED and purchase.lot is None


# --- buckets ----------------------------------------------------------------------------------


def test_buckets_are_spent_plan_then_bonus_then_purchased_then_overage(buyer, packs):
    big = CreditPack.objects.create(price_cents=10_000, credits=80_000)  # $100: reaches Explore
    purchase = buy(buyer, big)
    assert purchase.bonus_credits == 2_400
    assert (bucket_total(buyer, Bucket.PLAN), bucket_total(buyer, Bucket.BONUS)) == (40_000, 2_400)
    spend(buyer, 39_000, "a")
    assert (bucket_total(buyer, Bucket.PLAN), bucket_total(buyer, Bucket.BONUS)) == (1_000, 2_400)
    spend(buyer, 2_000, "b")  # 1,000 plan + 1,000 bonus
    assert (bucket_total(buyer, Bucket.PLAN), bucket_total(buyer, Bucket.BONUS)) == (0, 1_400)
    assert bucket_total(buyer, Bucket.PURCHASED) == 80_000
    spend(buyer, 2_000, "c")  # 1,400 bonus + 600 purchased
    assert (bucket_total(buyer, Bucket.BONUS), bucket_total(buyer, Bucket.PURCHASED)) == (0, 79_400)
    spend(buyer, 80_000, "d")  # 79,400 purchased + 600 overage
    assert balance(buyer) == 0
    period = sub_of(buyer).current_period
    period.refresh_from_db()
    assert period.overage_credits == 600
    assert_ledger_consistent(buyer.pk)


def test_bonus_vanishes_at_the_end_of_the_commitment_period_and_purchased_credits_stay(buyer, packs):
    big = CreditPack.objects.create(price_cents=50_000, credits=400_000)  # $500: Build, +5%
    purchase = buy(buyer, big)
    assert purchase.tier == Tier.BUILD and purchase.bonus_credits == 20_000
    bonus = purchase.bonus_lot
    assert bonus.bucket == Bucket.BONUS and bonus.expires_at == at("2027-06-01T00:00:00Z")
    tick("2027-05-31T23:00:00Z")
    assert bucket_total(buyer, Bucket.BONUS) == 20_000
    assert sub_of(buyer).rpm == 3_000
    tick("2027-06-01T00:00:00Z")
    bonus.refresh_from_db()
    assert bonus.remaining == 0 and bonus.expired_at is not None
    assert LedgerEntry.objects.filter(lot=bonus, kind=EntryKind.EXPIRE, credits=-20_000).count() == 1
    assert bucket_total(buyer, Bucket.PURCHASED) == 400_000
    # the new month starts without a tier: the RPM is the plan's again
    assert Commitment.objects.get(org=buyer).tier == Tier.NONE
    assert sub_of(buyer).rpm == sub_of(buyer).plan.rpm
    assert CommitmentPeriod.objects.get(org=buyer).closed_at is not None
    tick("2027-06-02T00:00:00Z")  # idempotent: nothing expires twice
    assert LedgerEntry.objects.filter(lot=bonus, kind=EntryKind.EXPIRE).count() == 1
    assert_ledger_consistent(buyer.pk)


# --- commitment tiers -------------------------------------------------------------------------


def test_the_purchase_that_reaches_a_tier_gets_its_bonus_floored_and_its_rpm_at_once(buyer, packs):
    assert sub_of(buyer).rpm == 120
    first = buy(buyer, packs[50])
    assert (first.tier, first.bonus_credits) == (Tier.NONE, 0)
    odd = CreditPack.objects.create(price_cents=5_000, credits=40_033)  # 3% = 1,200.99
    second = buy(buyer, odd)  # $100 this month: Explore
    assert second.tier == Tier.EXPLORE
    assert second.bonus_credits == 1_200  # floor(40,033 × 3%)
    assert sub_of(buyer).rpm == 1_800
    status = credits.commitment_status(org_id=buyer.pk)
    assert (status.tier, status.purchased_cents) == (Tier.EXPLORE, 10_000)
    assert (status.next_rule.tier, status.cents_to_next) == (Tier.BUILD, 40_000)


def test_a_yearly_commitment_reaches_build_at_6000_dollars_and_not_at_500(buyer, packs):
    credits.commitment_term_set(org_id=buyer.pk, term=CommitmentTerm.YEARLY)
    five_hundred = CreditPack.objects.create(price_cents=50_000, credits=400_000)
    first = buy(buyer, five_hundred)
    assert (first.tier, first.bonus_credits) == (Tier.NONE, 0)  # $500 is not even Explore ($1,200)
    period = CommitmentPeriod.objects.get(org=buyer)
    assert (period.start, period.end) == (at("2027-05-10T00:00:00Z"), at("2028-05-10T00:00:00Z"))
    tick("2027-09-20T09:00:00Z")  # months later, the same yearly period
    rest = CreditPack.objects.create(price_cents=550_000, credits=4_400_000)
    second = buy(buyer, rest)  # $6,000 in the period: Build
    assert second.tier == Tier.BUILD and second.bonus_credits == 220_000
    assert second.commitment_period_id == period.pk
    assert second.bonus_lot.expires_at == at("2028-05-10T00:00:00Z")
    assert sub_of(buyer).rpm == 3_000


def test_a_staff_override_sets_the_tier_with_a_reason(buyer, packs):
    with pytest.raises(BillingError):
        credits.commitment_override(org_id=buyer.pk, tier=Tier.SCALE, reason=" ", actor=None)
    credits.commitment_override(org_id=buyer.pk, tier=Tier.SCALE, reason="contract 42", actor=None)
    assert sub_of(buyer).rpm == 4_800
    purchase = buy(buyer, packs[10])
    assert purchase.bonus_credits == 800  # Scale's +10%
    credits.commitment_override(org_id=buyer.pk, tier="", reason="contract ended", actor=None)
    assert sub_of(buyer).rpm == 120


def test_a_staff_rpm_override_wins_over_the_tier(buyer, packs):
    credits.commitment_override(org_id=buyer.pk, tier=Tier.SCALE, reason="x", actor=None)
    sub = sub_of(buyer)
    sub.rpm_override = 50
    sub.save()
    assert sub_of(buyer).rpm == 50


# --- refunds ----------------------------------------------------------------------------------


def test_a_refund_removes_exactly_that_lot_and_its_unspent_bonus_and_recomputes_the_tier(buyer, packs):
    keep = buy(buyer, packs[50])
    hundred = CreditPack.objects.create(price_cents=5_000, credits=40_000)
    refunded = buy(buyer, hundred)  # reaches Explore: +1,200 bonus
    assert refunded.bonus_credits == 1_200 and sub_of(buyer).rpm == 1_800
    spend(buyer, 40_500, "use")  # 40,000 plan + 500 of the bonus
    before = balance(buyer)
    result = credits.purchase_refund(org=buyer, purchase_id=refunded.pk, actor=owner_of(buyer))
    assert result.status == PurchaseStatus.REFUNDED and result.stripe_refund_id.startswith("re_")
    assert (result.refund_removed_credits, result.refund_removed_bonus) == (40_000, 700)
    assert balance(buyer) == before - 40_700
    assert CreditLot.objects.get(pk=keep.lot_id).remaining == 44_000  # the other purchase untouched
    entries = LedgerEntry.objects.filter(kind=EntryKind.REFUND)
    assert sorted((e.lot_id, e.credits) for e in entries) == sorted(
        [(refunded.lot_id, -40_000), (refunded.bonus_lot_id, -700)]
    )
    invoice = Invoice.objects.get(pk=refunded.invoice_id)
    assert invoice.status == InvoiceStatus.REFUNDED and invoice.refunded_at is not None
    assert Invoice.objects.get(pk=keep.invoice_id).status == InvoiceStatus.PAID
    # $50 left this month: no tier, the plan's RPM
    assert Commitment.objects.get(org=buyer).tier == Tier.NONE and sub_of(buyer).rpm == 120
    assert CommitmentPeriod.objects.get(org=buyer).purchased_cents == 5_000
    assert_ledger_consistent(buyer.pk)


def test_a_refund_is_refused_once_any_credit_of_the_purchase_is_spent(buyer, packs):
    purchase = buy(buyer, packs[10])
    spend(buyer, 40_001, "all the plan and one purchased credit")
    purchase.refresh_from_db()
    assert "used" in credits.refund_refusal(purchase)
    with pytest.raises(BillingError) as refused:
        credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None)
    assert refused.value.code == "REFUND_REFUSED"
    assert bucket_total(buyer, Bucket.PURCHASED) == 7_999
    assert Invoice.objects.get(pk=purchase.invoice_id).status == InvoiceStatus.PAID


def test_a_refund_is_refused_while_a_job_holds_its_credits(buyer, packs):
    purchase = buy(buyer, packs[10])
    job(buyer, 40_001)  # the hold takes all the plan credits and one purchased credit
    with pytest.raises(BillingError):
        credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None)


def test_a_refund_is_refused_after_14_days(buyer, packs):
    purchase = buy(buyer, packs[10])
    fourteen_days = purchase.paid_at + timedelta(days=14)
    tick((fourteen_days - timedelta(minutes=1)).isoformat())
    assert credits.refund_refusal(CreditPurchase.objects.get(pk=purchase.pk)) is None
    tick((fourteen_days + timedelta(minutes=1)).isoformat())
    with pytest.raises(BillingError) as refused:
        credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None)
    assert "14 days" in refused.value.message
    assert bucket_total(buyer, Bucket.PURCHASED) == 8_000
    # staff may refund an unused purchase later
    credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None, staff=True)
    assert bucket_total(buyer, Bucket.PURCHASED) == 0


def test_a_refund_of_another_organisations_purchase_is_404(buyer, packs, stripe_card):
    purchase = buy(buyer, packs[10])
    other = OrgFactory(plan="free")
    with pytest.raises(BillingError) as refused:
        credits.purchase_refund(org=other, purchase_id=purchase.pk, actor=None)
    assert refused.value.status == 404
    assert CreditPurchase.objects.get(pk=purchase.pk).status == PurchaseStatus.PAID


def test_a_refund_stripe_refuses_gives_the_credits_back(buyer, packs, monkeypatch):
    from invoices import stripe_gateway

    purchase = buy(buyer, packs[10])

    def refuse(**kwargs):
        raise stripe_gateway.StripeRequestError("No such payment_intent.")

    monkeypatch.setattr(stripe_gateway, "refund_create", refuse)
    with pytest.raises(BillingError) as failed:
        credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None)
    assert failed.value.code == "REFUND_FAILED"
    purchase.refresh_from_db()
    assert purchase.status == PurchaseStatus.PAID and purchase.refund_requested_at is None
    assert bucket_total(buyer, Bucket.PURCHASED) == 8_000
    assert_ledger_consistent(buyer.pk)


def test_a_refund_stripe_did_not_answer_is_finished_by_billing_tick(buyer, packs, monkeypatch):
    from invoices import stripe_gateway

    purchase = buy(buyer, packs[10])
    real = stripe_gateway.refund_create

    def away(**kwargs):
        raise stripe_gateway.StripeUnavailable("timeout")

    monkeypatch.setattr(stripe_gateway, "refund_create", away)
    with pytest.raises(BillingError) as pending:
        credits.purchase_refund(org=buyer, purchase_id=purchase.pk, actor=None)
    assert pending.value.code == "REFUND_PENDING"
    assert bucket_total(buyer, Bucket.PURCHASED) == 0  # set aside: cannot be spent meanwhile
    monkeypatch.setattr(stripe_gateway, "refund_create", real)
    tick("2027-05-10T10:00:00Z")
    purchase.refresh_from_db()
    assert purchase.status == PurchaseStatus.REFUNDED
    assert Invoice.objects.get(pk=purchase.invoice_id).status == InvoiceStatus.REFUNDED
    assert_ledger_consistent(buyer.pk)


def test_payment_attempts_stay_one_per_purchase(buyer, packs):
    buy(buyer, packs[10])
    buy(buyer, packs[50])
    assert (
        PaymentAttempt.objects.filter(invoice__kind="purchase").count() == 2
        and len(payment_intents(buyer)) == 2
    )
