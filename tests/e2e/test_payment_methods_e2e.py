"""An owner adds a card through the Stripe.js stand-in (localstripe), buys with it, and reads the
invoice it paid; a refused card shows the bank's words and stores nothing."""

import pytest

from invoices import services
from invoices.models import PaymentMethod
from invoices.services import LineSpec
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _fill_card(page, number):
    card = page.locator("#card-element")
    card.locator("input[placeholder=number]").fill(number)
    card.locator("input[placeholder=exp_month]").fill("12")
    card.locator("input[placeholder=exp_year]").fill("30")
    card.locator("input[placeholder=cvc]").fill("123")
    card.locator("input[placeholder=postal_code]").fill("10001")


def test_owner_adds_a_card_with_stripe_js_then_reads_the_invoice_it_paid(browsing, localstripe):
    org = OrgFactory(plan="pro", owner_email="cards@example.com")
    b = browsing(1280)
    b.sign_in("cards@example.com")
    b.go("/settings/billing/payment-methods/")
    assert "No card yet" in b.page.content()

    _fill_card(b.page, "4000000000000002")
    b.page.get_by_role("button", name="Add card").click()
    error = b.page.locator("#card-errors")
    error.wait_for(state="visible")
    assert "declined" in error.inner_text()
    assert not PaymentMethod.objects.filter(org=org).exists()
    b.shot("card-refused")

    b.page.get_by_label("Name on card").fill("Ada Lovelace")
    _fill_card(b.page, "4242424242424242")
    b.page.get_by_role("button", name="Add card").click()
    b.page.get_by_text("Card Visa •••• 4242 added. It is your default card.").wait_for()
    row = b.page.get_by_test_id("card-row")
    assert "Visa •••• 4242" in row.inner_text() and "Default" in row.inner_text()
    assert services.card_on_file(org=org)
    b.shot("card-added")
    b.assert_accessible()
    # The bank's refusal is a 402 from Stripe; nothing else may complain.
    assert [e for e in b.console_errors if "402" not in e] == []

    invoice = services.purchase_charge(
        org=org,
        lines=[LineSpec("Credit pack: 44,000 credits", 1, 5000)],
        description="Credit pack",
        on_paid=lambda invoice: None,
    )
    for width in (1280, 375):
        b = browsing(width)
        b.sign_in("cards@example.com")
        b.go("/settings/billing/payment-methods/")
        b.shot("payment-methods")
        b.go("/settings/billing/invoices/")
        assert any(invoice.number in row for row in b.page.get_by_test_id("invoice-row").all_inner_texts())
        b.shot("invoices")
        b.assert_accessible()
        b.page.get_by_role("link", name=invoice.number, exact=True).click()
        b.page.wait_for_url(f"**/invoices/{invoice.number}/")
        assert b.page.get_by_test_id("invoice-total").inner_text() == "$50.00"
        assert b.page.get_by_test_id("invoice-status").inner_text() == "Paid"
        b.shot("invoice")
        b.assert_accessible()
        assert not b.console_errors
