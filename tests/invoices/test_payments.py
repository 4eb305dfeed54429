"""Charging cards against localstripe: purchases, declines, crashes and reconciliation, and the
saved cards themselves."""

from datetime import UTC, datetime, timedelta

import pytest
import stripe

from accounts import clock
from billing_site.errors import BillingError
from invoices import services, stripe_gateway
from invoices.models import Invoice, PaymentAttempt, PaymentMethod
from invoices.services import LineSpec, PaymentDeclined
from invoices.stripe_gateway import StripeUnavailable
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

PACK = [LineSpec("Credit pack: 8,000 credits", 1, 1000)]
DECLINES_CHARGES = "4000000000000341"
REFUSED_WHEN_SAVED = "4000000000000002"


@pytest.fixture
def on_paid():
    calls = []

    def handler(invoice):
        calls.append((invoice.pk, invoice.number, invoice.status))

    handler.calls = calls
    return handler


def _intents(org):
    stripe_gateway.configure()
    return [
        pi
        for pi in stripe.PaymentIntent.list(limit=100).auto_paging_iter()
        if pi.customer == org.stripe_customer_id
    ]


# --- saving cards ----------------------------------------------------------------------------


def test_card_on_file_only_once_a_card_is_saved(stripe_card):
    org = OrgFactory(plan="free")
    assert services.card_on_file(org=org) is False
    stripe_card(org)
    assert services.card_on_file(org=org) is True


def test_a_card_confirmed_through_a_setup_intent_is_saved_as_the_default(stripe_card):
    org = OrgFactory(plan="free")
    card = stripe_card(org, "4242424242424242")
    assert (card.brand, card.last4, card.exp_month, card.exp_year, card.is_default) == (
        "visa",
        "4242",
        12,
        2030,
        True,
    )
    assert str(card) == "Visa •••• 4242"
    stripe_gateway.configure()
    assert stripe.PaymentMethod.retrieve(card.stripe_payment_method_id).customer == org.stripe_customer_id


def test_a_card_already_attached_to_the_customer_is_saved_and_saving_twice_keeps_one(localstripe):
    org = OrgFactory(plan="free")
    customer = stripe_gateway.customer_ensure(org)
    stripe_gateway.configure()
    pm = stripe.PaymentMethod.create(
        type="card", card={"number": "4242424242424242", "exp_month": 1, "exp_year": 2031, "cvc": "123"}
    )
    stripe.PaymentMethod.attach(pm.id, customer=customer)
    first = services.payment_method_add(org=org, stripe_payment_method_id=pm.id)
    again = services.payment_method_add(org=org, stripe_payment_method_id=pm.id)
    assert first.pk == again.pk
    assert PaymentMethod.objects.filter(org=org).count() == 1


def test_a_refused_card_stores_nothing(localstripe):
    org = OrgFactory(plan="free")
    setup = services.payment_method_setup_start(org=org)
    stripe_gateway.configure()
    pm = stripe.PaymentMethod.create(
        type="card", card={"number": REFUSED_WHEN_SAVED, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    )
    with pytest.raises(stripe.CardError, match="declined"):
        stripe.SetupIntent.confirm(setup.id, payment_method=pm.id)
    # Posting it anyway (a forged form) is refused too.
    with pytest.raises(BillingError) as refused:
        services.payment_method_add(org=org, stripe_payment_method_id=pm.id, setup_intent_id=setup.id)
    assert refused.value.status == 404
    with pytest.raises(BillingError):
        services.payment_method_add(org=org, stripe_payment_method_id=pm.id)
    assert not PaymentMethod.objects.filter(org=org).exists()
    assert services.card_on_file(org=org) is False


def test_another_organisations_card_is_refused(stripe_card):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    services.payment_method_setup_start(org=mine)
    their_card = stripe_card(theirs)
    with pytest.raises(BillingError) as refused:
        services.payment_method_add(org=mine, stripe_payment_method_id=their_card.stripe_payment_method_id)
    assert refused.value.status == 404
    assert not PaymentMethod.objects.filter(org=mine).exists()


def test_another_organisations_setup_intent_cannot_attach_a_card(localstripe):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    services.payment_method_setup_start(org=mine)
    their_setup = services.payment_method_setup_start(org=theirs)
    stripe_gateway.configure()
    pm = stripe.PaymentMethod.create(
        type="card", card={"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    )
    stripe.SetupIntent.confirm(their_setup.id, payment_method=pm.id)
    with pytest.raises(BillingError):
        services.payment_method_add(org=mine, stripe_payment_method_id=pm.id, setup_intent_id=their_setup.id)
    assert not PaymentMethod.objects.filter(org=mine).exists()


def test_make_default_and_removing_the_default_promotes_the_newest_other_card(stripe_card):
    org = OrgFactory(plan="starter")
    first = stripe_card(org, "4242424242424242")
    second = stripe_card(org, "5555555555554444")
    assert not second.is_default
    services.payment_method_make_default(org=org, payment_method_id=second.pk)
    assert PaymentMethod.objects.get(org=org, is_default=True).pk == second.pk
    services.payment_method_remove(org=org, payment_method_id=second.pk)
    first.refresh_from_db()
    assert first.is_default
    stripe_gateway.configure()
    assert stripe.PaymentMethod.retrieve(second.stripe_payment_method_id).customer is None


def test_the_last_card_stays_while_the_plan_is_paid_but_may_go_on_free(stripe_card):
    paid, free = OrgFactory(plan="starter"), OrgFactory(plan="free")
    paid_card, free_card = stripe_card(paid), stripe_card(free)
    with pytest.raises(BillingError) as refused:
        services.payment_method_remove(org=paid, payment_method_id=paid_card.pk)
    assert refused.value.status == 409
    assert services.card_on_file(org=paid)
    services.payment_method_remove(org=free, payment_method_id=free_card.pk)
    assert not services.card_on_file(org=free)


def test_cards_of_another_organisation_are_not_found(stripe_card):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    their_card = stripe_card(theirs)
    for change in (services.payment_method_make_default, services.payment_method_remove):
        with pytest.raises(BillingError) as refused:
            change(org=mine, payment_method_id=their_card.pk)
        assert refused.value.status == 404
    their_card.refresh_from_db()
    assert their_card.is_active and their_card.is_default


# --- purchases -------------------------------------------------------------------------------


def test_a_successful_purchase_issues_the_invoice_paid_and_calls_on_paid_once(stripe_card, on_paid):
    org = OrgFactory(plan="free")
    stripe_card(org)
    with clock.travel(datetime(2026, 4, 9, 12, tzinfo=UTC)):
        invoice = services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    assert invoice.status == Invoice.Status.PAID
    assert invoice.number == "INV-2026-000001"
    assert invoice.paid_at == datetime(2026, 4, 9, 12, tzinfo=UTC)
    assert invoice.total_cents == 1000
    assert on_paid.calls == [(invoice.pk, "INV-2026-000001", "paid")]
    attempt = invoice.attempts.get()
    assert attempt.number == 1
    assert attempt.idempotency_key == f"inv-{invoice.pk}-attempt-1"
    assert attempt.status == PaymentAttempt.Status.SUCCEEDED
    intents = _intents(org)
    assert [pi.id for pi in intents] == [attempt.stripe_payment_intent_id]
    assert intents[0].amount == 1000 and intents[0].metadata["idempotency_key"] == attempt.idempotency_key


def test_a_declined_card_voids_the_draft_without_a_number_and_grants_nothing(stripe_card, on_paid):
    org = OrgFactory(plan="free")
    stripe_card(org, DECLINES_CHARGES)
    with clock.travel(datetime(2026, 4, 9, tzinfo=UTC)):
        with pytest.raises(PaymentDeclined) as declined:
            services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
        assert declined.value.status == 402 and declined.value.code == "PAYMENT_DECLINED"
        assert declined.value.message == "Your card was declined."
        invoice = Invoice.objects.get(org=org)
        assert invoice.status == Invoice.Status.VOID and invoice.number is None
        attempt = invoice.attempts.get()
        assert attempt.status == PaymentAttempt.Status.FAILED
        assert attempt.error_message == "Your card was declined."
        assert on_paid.calls == []
        # The declined draft used no number: the next invoice is still the year's first.
        assert services.invoice_issue(invoice=services.invoice_draft_create(org=org, lines=PACK)).number == (
            "INV-2026-000001"
        )


def test_without_a_card_nothing_is_created(localstripe, on_paid):
    org = OrgFactory(plan="free")
    with pytest.raises(BillingError) as refused:
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    assert refused.value.code == "PAYMENT_METHOD_REQUIRED"
    assert not Invoice.objects.filter(org=org).exists()


def test_a_crash_after_stripe_charged_is_finished_by_reconcile_with_one_payment_intent(
    stripe_card, on_paid, monkeypatch
):
    org = OrgFactory(plan="free")
    stripe_card(org)
    real_create = stripe_gateway.payment_intent_create_off_session

    def charge_then_crash(**kwargs):
        real_create(**kwargs)
        raise RuntimeError("the worker died after Stripe answered")

    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", charge_then_crash)
    with clock.travel(datetime(2026, 4, 9, tzinfo=UTC)), pytest.raises(RuntimeError):
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    invoice = Invoice.objects.get(org=org)
    assert invoice.status == Invoice.Status.DRAFT
    assert invoice.attempts.get().status == PaymentAttempt.Status.PENDING
    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", real_create)

    granted = []
    monkeypatch.setitem(services._ON_PAID, "purchase", lambda inv: granted.append(inv.number))
    assert services.payment_attempts_reconcile(older_than=timedelta(minutes=2)) == {}  # too young yet
    with clock.travel(datetime(2026, 4, 9, 0, 5, tzinfo=UTC)):
        assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"succeeded": 1}
        assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {}

    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID and invoice.number == "INV-2026-000001"
    assert granted == ["INV-2026-000001"]
    assert on_paid.calls == []
    attempt = invoice.attempts.get()
    intents = _intents(org)
    assert len(intents) == 1
    assert attempt.stripe_payment_intent_id == intents[0].id and intents[0].status == "succeeded"


def test_a_crash_before_stripe_was_called_voids_the_draft_on_reconcile(stripe_card, on_paid, monkeypatch):
    org = OrgFactory(plan="free")
    stripe_card(org)

    def crash(**kwargs):
        raise RuntimeError("the worker died before calling Stripe")

    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", crash)
    with pytest.raises(RuntimeError):
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    monkeypatch.undo()
    assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"failed": 1}
    invoice = Invoice.objects.get(org=org)
    assert invoice.status == Invoice.Status.VOID and invoice.number is None
    assert _intents(org) == []


def test_a_crash_after_a_decline_is_settled_as_declined(stripe_card, on_paid, monkeypatch):
    org = OrgFactory(plan="free")
    stripe_card(org, DECLINES_CHARGES)
    real_create = stripe_gateway.payment_intent_create_off_session

    def decline_then_crash(**kwargs):
        real_create(**kwargs)
        raise RuntimeError("died")

    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", decline_then_crash)
    with pytest.raises(RuntimeError):
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    monkeypatch.undo()
    assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"failed": 1}
    invoice = Invoice.objects.get(org=org)
    assert invoice.status == Invoice.Status.VOID and invoice.number is None
    assert invoice.attempts.get().error_message == "Your card was declined."
    assert len(_intents(org)) == 1


def test_stripe_unreachable_charges_nothing_and_reconcile_voids_the_draft_later(
    stripe_card, on_paid, settings, localstripe
):
    org = OrgFactory(plan="free")
    stripe_card(org)
    settings.STRIPE_API_BASE = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(StripeUnavailable) as unavailable:
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    assert unavailable.value.status == 503
    assert unavailable.value.message == "Card payments are unavailable right now; nothing was charged."
    invoice = Invoice.objects.get(org=org)
    assert invoice.status == Invoice.Status.DRAFT and invoice.number is None  # customers never see drafts
    assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"unreachable": 1}
    settings.STRIPE_API_BASE = localstripe
    assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"failed": 1}
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.VOID and invoice.number is None
    assert on_paid.calls == [] and _intents(org) == []


def test_on_paid_failing_rolls_back_and_reconcile_grants_once(stripe_card, monkeypatch):
    org = OrgFactory(plan="free")
    stripe_card(org)

    def broken(invoice):
        raise RuntimeError("grant failed")

    with pytest.raises(RuntimeError):
        services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=broken)
    invoice = Invoice.objects.get(org=org)
    assert invoice.status == Invoice.Status.DRAFT and invoice.number is None
    granted = []
    monkeypatch.setitem(services._ON_PAID, "purchase", lambda inv: granted.append(inv.pk))
    assert services.payment_attempts_reconcile(older_than=timedelta(0)) == {"succeeded": 1}
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID and granted == [invoice.pk]
    assert len(_intents(org)) == 1


# --- charging issued invoices ----------------------------------------------------------------


def test_a_declined_period_invoice_stays_issued_and_attempts_stop_at_four(stripe_card):
    org = OrgFactory(plan="free")
    stripe_card(org, DECLINES_CHARGES)
    invoice = services.invoice_issue(
        invoice=services.invoice_draft_create(
            org=org, lines=[LineSpec("Starter plan", 1, 5000)], kind="period"
        )
    )
    for n in range(1, 5):
        attempt = services.invoice_charge(invoice=invoice)
        assert (attempt.number, attempt.status) == (n, PaymentAttempt.Status.FAILED)
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.ISSUED
    with pytest.raises(BillingError) as refused:
        services.invoice_charge(invoice=invoice)
    assert refused.value.status == 409
    assert invoice.attempts.count() == 4 and len(_intents(org)) == 4


def test_a_period_invoice_charged_successfully_is_paid(stripe_card):
    org = OrgFactory(plan="free")
    stripe_card(org)
    invoice = services.invoice_issue(
        invoice=services.invoice_draft_create(
            org=org, lines=[LineSpec("Starter plan", 1, 5000)], kind="period"
        )
    )
    attempt = services.invoice_charge(invoice=invoice)
    invoice.refresh_from_db()
    assert attempt.status == PaymentAttempt.Status.SUCCEEDED and invoice.status == Invoice.Status.PAID
    with pytest.raises(BillingError):
        services.invoice_charge(invoice=invoice)


def test_refund_through_the_gateway(stripe_card, on_paid):
    org = OrgFactory(plan="free")
    stripe_card(org)
    invoice = services.purchase_charge(org=org, lines=PACK, description="Credit pack", on_paid=on_paid)
    attempt = invoice.attempts.get()
    refund_id = stripe_gateway.refund_create(
        payment_intent_id=attempt.stripe_payment_intent_id, idempotency_key=f"refund-{invoice.pk}"
    )
    assert refund_id.startswith("re_")
