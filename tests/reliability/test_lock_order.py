"""Writers of the same organisation held at the worst moment, in real threads on PostgreSQL: neither
may deadlock the other.

- A period close and a card payment that both number an invoice: the close holds the subscription
  and the credit account, then takes the year's number; the payment takes the number, then grants
  what was bought.
- Two charges of one invoice, one writing its declined attempt while the other starts the next:
  both lock the invoice, then its attempts."""

import threading
import time
from datetime import UTC, datetime

import pytest
from django.db import connection

from accounts.models import Subscription
from accounts.services import period_roll, subscription_upgrade
from billing_site.errors import BillingError
from invoices import services as invoice_services
from invoices import stripe_gateway
from invoices.models import AttemptStatus, Invoice, InvoiceStatus
from tests.billing_support import tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent, invoice_number_anomalies
from tests.usage.credits_support import ensure_packs, pack
from usage import credits
from usage.models import CreditPurchase, PurchaseStatus

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


class Pause:
    """Wraps `module.name` so that, in the thread called `thread`, it stops there (after calling
    the real function when `after`) until released."""

    def __init__(self, monkeypatch, module, name, thread, *, after=False):
        self.reached, self.go = threading.Event(), threading.Event()
        real = getattr(module, name)

        def paused(*args, **kwargs):
            if threading.current_thread().name != thread:
                return real(*args, **kwargs)
            result = real(*args, **kwargs) if after else None
            self.reached.set()
            assert self.go.wait(30)
            return result if after else real(*args, **kwargs)

        monkeypatch.setattr(module, name, paused)


def start(name, work, outcome):
    def run():
        try:
            outcome[name] = work()
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome[name] = error
        finally:
            connection.close()

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def wait_until_someone_waits_for_a_lock():
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
        time.sleep(0.05)
    pytest.fail("nobody waited for a lock")


def test_a_pack_paid_while_its_period_closes_deadlocks_neither(stripe_card, monkeypatch):
    ensure_packs()
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)
    tick("2027-01-15T11:00:00Z")  # the first period's invoice is paid
    sub_id = Subscription.objects.get(org=org).pk
    charged = Pause(monkeypatch, stripe_gateway, "payment_intent_create_off_session", "payer", after=True)
    closing = Pause(monkeypatch, invoice_services, "invoices_issue_bulk", "closer")
    outcome = {}

    payer = start(
        "payer",
        lambda: credits.pack_purchase(
            org=org, pack_id=pack(10).pk, token="t1", agreed_to_refund_policy=True, actor=None
        ),
        outcome,
    )
    assert charged.reached.wait(30)  # Stripe has charged the card; our write is next
    closer = start(
        "closer", lambda: period_roll(subscription_id=sub_id, now=datetime(2027, 2, 15, tzinfo=UTC)), outcome
    )
    assert closing.reached.wait(30)  # the close holds the subscription and the credits; its invoice is next
    charged.go.set()
    wait_until_someone_waits_for_a_lock()
    closing.go.set()
    payer.join(60)
    closer.join(60)

    assert outcome["closer"] is True, outcome
    assert isinstance(outcome["payer"], tuple), outcome
    purchase = CreditPurchase.objects.get(org=org)
    assert purchase.status == PurchaseStatus.PAID and purchase.lot.granted == 8_000
    numbered = Invoice.objects.filter(org=org).exclude(number=None)
    assert sorted(numbered.values_list("kind", "status")) == [
        ("period", "issued"),  # February's, charged by the next tick
        ("period", "paid"),  # January's
        ("purchase", "paid"),
    ]
    assert invoice_number_anomalies() == []
    assert_ledger_consistent(org.pk)


def test_an_upgrade_paid_while_its_period_closes_is_applied_before_the_close(stripe_card, monkeypatch):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)
    tick("2027-02-14T23:59:00Z")  # the last minute of the period: the upgrade is 1 day of 31
    sub_id = Subscription.objects.get(org=org).pk
    charged = Pause(monkeypatch, stripe_gateway, "payment_intent_create_off_session", "payer", after=True)
    outcome = {}

    payer = start("payer", lambda: subscription_upgrade(org=org, plan_code="pro", actor=None), outcome)
    assert charged.reached.wait(30)  # Stripe has charged the prorated fee; our write is next
    closer = start(
        "closer", lambda: period_roll(subscription_id=sub_id, now=datetime(2027, 2, 15, tzinfo=UTC)), outcome
    )
    closer.join(60)
    charged.go.set()
    payer.join(60)

    assert outcome["closer"] is False, outcome  # not while the upgrade of this period is being paid
    assert not isinstance(outcome["payer"], Exception), outcome
    assert period_roll(subscription_id=sub_id, now=datetime(2027, 2, 15, tzinfo=UTC)) is True
    sub = Subscription.objects.select_related("plan", "current_period").get(pk=sub_id)
    assert (sub.plan.code, sub.current_period.start) == ("pro", datetime(2027, 2, 15, tzinfo=UTC))
    invoices = Invoice.objects.filter(org=org).exclude(number=None).order_by("number")
    assert [(i.kind, i.total_cents) for i in invoices] == [
        ("period", 5_000),  # Starter, January
        ("upgrade", 1_452),  # ($500 − $50) × 1/31
        ("period", 50_000),  # Pro, from 15 February
    ]
    assert_ledger_consistent(org.pk)


def test_an_attempt_written_while_the_next_charge_starts_deadlocks_neither(stripe_card, monkeypatch):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org, "4000000000000341")  # attaches, then every charge is declined
    tick("2027-01-15T11:00:00Z")  # the period invoice is issued and its first charge declined
    invoice = Invoice.objects.get(org=org, status=InvoiceStatus.ISSUED)
    declined = Pause(monkeypatch, stripe_gateway, "payment_intent_create_off_session", "first", after=True)
    starting = Pause(monkeypatch, invoice_services, "_attempt_create", "second")
    outcome = {}

    first = start("first", lambda: invoice_services.invoice_charge(invoice=invoice), outcome)
    assert declined.reached.wait(30)  # attempt 2 is pending, Stripe has declined it; our write is next
    second = start("second", lambda: invoice_services.invoice_charge(invoice=invoice), outcome)
    assert starting.reached.wait(30)  # the second charge holds the invoice; the attempts are next
    declined.go.set()
    wait_until_someone_waits_for_a_lock()  # the first waits for the invoice
    starting.go.set()
    first.join(60)
    second.join(60)

    assert isinstance(outcome["second"], BillingError), outcome  # attempt 2 was still pending
    assert "already in progress" in outcome["second"].message
    assert outcome["first"].status == AttemptStatus.FAILED, outcome
    assert list(invoice.attempts.values_list("number", "status")) == [
        (1, AttemptStatus.FAILED),
        (2, AttemptStatus.FAILED),
    ]
