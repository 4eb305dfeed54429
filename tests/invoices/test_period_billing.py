"""Period-close invoices and their collection (DESIGN §5), moved through months with billing_tick."""

from datetime import UTC, date, datetime, timedelta

import pytest

from accounts.models import Subscription
from invoices.models import AttemptStatus, Invoice, InvoiceStatus
from tests.billing_support import spend, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent

pytestmark = pytest.mark.django_db


def invoices_of(org):
    return list(Invoice.objects.filter(org=org).exclude(status=InvoiceStatus.DRAFT).order_by("pk"))


def test_starter_with_overage_is_invoiced_fee_in_advance_and_overage_in_arrears_and_free_never():
    tick("2027-01-15T10:00:00Z")
    free, starter = OrgFactory(plan="free"), OrgFactory(plan="starter")
    first = invoices_of(starter)
    assert [(i.number, i.total_cents, i.status) for i in first] == [("INV-2027-000001", 5_000, "issued")]
    assert first[0].period_start == datetime(2027, 1, 15, tzinfo=UTC)

    spend(starter, 41_252, "a")  # 1,252 credits of overage
    spend(free, 9_000, "b")
    tick("2027-02-15T00:00:00Z")
    second = invoices_of(starter)[1]
    lines = [
        (line.description, line.quantity, line.amount_cents) for line in second.lines.order_by("position")
    ]
    assert lines == [
        ("Starter plan, 15 Feb 2027 – 14 Mar 2027", 1, 5_000),
        ("Overage credits, 15 Jan 2027 – 14 Feb 2027", 1_252, 157),  # $1.565 → $1.57, half-up once
    ]
    assert (second.number, second.total_cents) == ("INV-2027-000002", 5_157)

    tick("2027-03-15T00:00:00Z")
    third = invoices_of(starter)[2]
    assert (third.number, third.total_cents) == ("INV-2027-000003", 5_000)
    assert invoices_of(free) == []  # nothing to bill: no invoice, no number used
    assert_ledger_consistent(starter.pk)


def test_without_a_card_the_invoice_stays_issued_and_stripe_is_never_called(monkeypatch):
    from invoices import services as invoice_services

    called = []
    monkeypatch.setattr(invoice_services, "invoice_charge", lambda **kw: called.append(kw))
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="pro")
    tick("2027-01-16T00:00:00Z")
    assert called == []
    assert invoices_of(org)[0].status == InvoiceStatus.ISSUED


def test_the_tick_twice_issues_each_period_invoice_once():
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    tick("2027-02-15T00:00:00Z")
    tick("2027-02-15T00:00:00Z")
    assert [i.number for i in invoices_of(org)] == ["INV-2027-000001", "INV-2027-000002"]


@pytest.mark.usefixtures("localstripe")
def test_a_card_on_file_pays_the_period_invoice(stripe_card):
    tick("2027-01-15T10:00:00Z")
    starter = OrgFactory(plan="starter")
    stripe_card(starter)
    tick("2027-01-15T11:00:00Z")
    invoice = invoices_of(starter)[0]
    assert invoice.status == InvoiceStatus.PAID
    assert invoice.attempts.get().status == AttemptStatus.SUCCEEDED


@pytest.mark.usefixtures("localstripe")
def test_a_declined_card_is_retried_on_days_1_3_and_7_then_the_plan_falls_to_free(stripe_card, mailoutbox):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org, "4000000000000341")  # attaches, then every charge is declined
    tick("2027-01-15T11:00:00Z")
    invoice = invoices_of(org)[0]
    assert invoice.attempts.count() == 1 and invoice.status == InvoiceStatus.ISSUED
    assert "Payment of invoice INV-2027-000001 failed" in mailoutbox[-1].subject
    tick("2027-01-16T10:59:00Z")  # not yet a day after the first failure
    assert invoice.attempts.count() == 1
    for day, attempts in (
        ("2027-01-16T11:00:00Z", 2),
        ("2027-01-18T11:00:00Z", 3),
        ("2027-01-22T11:00:00Z", 4),
    ):
        tick(day)
        tick(day)  # a second tick at the same moment charges nothing more
        assert invoice.attempts.count() == attempts
    tick("2027-02-10T00:00:00Z")
    assert invoice.attempts.count() == 4  # at most four attempts per invoice
    assert len(mailoutbox) == 4 and "last try" in mailoutbox[-1].body
    assert Subscription.objects.get(org=org).scheduled_plan.code == "free"
    tick("2027-02-15T00:00:00Z")
    assert Subscription.objects.get(org=org).plan.code == "free"
    assert invoices_of(org)[-1].number == "INV-2027-000001"  # the Free period bills nothing


@pytest.mark.usefixtures("localstripe")
def test_the_tick_that_closes_a_period_charges_the_new_invoice_at_once(stripe_card):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)
    tick("2027-02-15T00:00:00Z")  # charges January's, closes the period, issues February's and charges it
    assert [(i.number, i.status) for i in invoices_of(org)] == [
        ("INV-2027-000001", InvoiceStatus.PAID),
        ("INV-2027-000002", InvoiceStatus.PAID),
    ]


@pytest.mark.usefixtures("localstripe")
def test_a_decline_settled_after_the_tick_died_is_retried_on_schedule_too(
    stripe_card, monkeypatch, mailoutbox
):
    from invoices import services as invoice_services
    from invoices import stripe_gateway

    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org, "4000000000000341")  # attaches, then every charge is declined
    real = stripe_gateway.payment_intent_create_off_session

    def declined_then_died(**kwargs):
        real(**kwargs)
        raise RuntimeError("the worker died after Stripe declined the card")

    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", declined_then_died)
    with pytest.raises(RuntimeError):
        tick("2027-01-15T11:00:00Z")
    monkeypatch.setattr(stripe_gateway, "payment_intent_create_off_session", real)
    invoice_services.payment_attempts_reconcile(older_than=timedelta(0))  # finds the decline at Stripe
    tick("2027-01-15T11:10:00Z")
    invoice = invoices_of(org)[0]
    assert invoice.attempts.count() == 1  # not charged again at once: the next try is a day later
    assert invoice.next_attempt_at.date() == date(2027, 1, 16)
    assert "Payment of invoice INV-2027-000001 failed" in mailoutbox[-1].subject


@pytest.mark.usefixtures("localstripe")
def test_retries_that_fell_behind_are_not_made_back_to_back(stripe_card):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org, "4000000000000341")
    tick("2027-01-15T11:00:00Z")  # declined; the next try would be on 16 Jan
    tick("2027-02-10T00:00:00Z")  # no tick ran for weeks: one retry now, the next two days on
    tick("2027-02-10T00:01:00Z")
    tick("2027-02-11T23:59:00Z")
    invoice = invoices_of(org)[0]
    assert invoice.attempts.count() == 2
    assert invoice.next_attempt_at == datetime(2027, 2, 12, tzinfo=UTC)
    tick("2027-02-12T00:00:00Z")
    assert invoice.attempts.count() == 3


@pytest.mark.usefixtures("localstripe")
def test_charges_stripe_never_received_use_up_no_attempt_and_the_invoice_is_paid_when_it_answers(
    stripe_card, monkeypatch, mailoutbox
):
    from invoices import stripe_gateway

    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)

    def unreachable(**kwargs):  # the charge never arrives; looking it up afterwards works
        raise stripe_gateway.StripeUnavailable("timeout")

    with monkeypatch.context() as outage:
        outage.setattr(stripe_gateway, "payment_intent_create_off_session", unreachable)
        for minute in range(6):  # more ticks than an invoice has attempts
            tick(f"2027-01-15T11:0{minute}:00Z")
    invoice = invoices_of(org)[0]
    assert invoice.status == InvoiceStatus.ISSUED and invoice.attempts.count() == 0
    assert invoice.first_failed_at is None and mailoutbox == []  # not a decline: no dunning

    tick("2027-01-15T11:10:00Z")
    invoice.refresh_from_db()
    attempt = invoice.attempts.get()
    assert invoice.status == InvoiceStatus.PAID
    assert (attempt.number, attempt.idempotency_key) == (1, f"inv-{invoice.pk}-attempt-1")
