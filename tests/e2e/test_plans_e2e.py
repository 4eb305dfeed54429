"""Plans and payments as a customer does it: add a card with Stripe.js, upgrade Starter → Pro and
pay the prorated invoice, see a declined card refused, schedule and cancel a downgrade, and download
the invoice PDF."""

import subprocess

import pytest

from accounts.models import Subscription
from invoices.models import Invoice
from tests.e2e.test_payment_methods_e2e import _fill_card
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db(transaction=True)


def add_card(b, number):
    b.go("/settings/billing/payment-methods/")
    b.page.get_by_label("Name on card").fill("Ada Lovelace")
    _fill_card(b.page, number)
    b.page.get_by_role("button", name="Add card").click()
    b.page.get_by_text(f"•••• {number[-4:]} added").wait_for()


def test_upgrade_starter_to_pro_pays_the_prorated_invoice_and_its_pdf_downloads(browsing, localstripe):
    org = OrgFactory(plan="starter", owner_email="up@example.com")
    b = browsing()
    b.sign_in("up@example.com")
    add_card(b, "4242424242424242")
    b.go("/settings/billing/plans/")
    assert b.page.locator(".badge.current").inner_text() == "Current plan"
    b.shot("plans")
    b.assert_accessible()
    b.page.get_by_role("link", name="Upgrade to Pro").click()
    charge = b.page.get_by_test_id("charge").inner_text()
    assert b.page.get_by_test_id("new-quota").inner_text().startswith("4")  # 400,000 credits... of the period
    b.shot("upgrade-confirm")
    b.assert_accessible()
    b.page.get_by_role("button", name=f"Upgrade and pay {charge}").click()
    b.page.wait_for_url("**/settings/billing/plans/")
    assert Subscription.objects.get(org=org).plan.code == "pro"
    invoice = Invoice.objects.filter(org=org, kind="upgrade").get()
    assert (invoice.status, f"${invoice.total_cents / 100:,.2f}") == ("paid", charge)

    b.go(f"/settings/billing/invoices/{invoice.number}/")
    with b.page.expect_download() as download:
        b.page.get_by_role("link", name="Download PDF").click()
    text = subprocess.run(
        ["pdftotext", download.value.path(), "-"], capture_output=True, check=True, text=True
    ).stdout
    assert invoice.number in text and charge in text
    b.shot("upgrade-invoice")


def test_a_declined_card_changes_nothing_on_upgrade(browsing, localstripe):
    org = OrgFactory(plan="starter", owner_email="declined@example.com")
    b = browsing(375)
    b.sign_in("declined@example.com")
    add_card(b, "4000000000000341")  # attaches, then every charge is declined
    b.go("/settings/billing/plans/pro/")
    b.page.get_by_role("button", name="Upgrade and pay").click()
    b.page.locator(".message.error, .banner.danger, [role=alert]").first.wait_for()
    assert "declined" in b.page.content().lower()
    assert Subscription.objects.get(org=org).plan.code == "starter"
    assert not Invoice.objects.filter(org=org, kind="upgrade").exclude(status="void").exists()
    b.shot("upgrade-declined")
    b.assert_accessible()


def test_owner_schedules_a_downgrade_and_cancels_it(browsing):
    org = OrgFactory(plan="pro", owner_email="down@example.com")
    b = browsing()
    b.sign_in("down@example.com")
    b.go("/settings/billing/plans/")
    b.page.get_by_role("link", name="Downgrade to Starter").click()
    b.page.get_by_role("button", name="Downgrade to Starter").click()
    b.page.get_by_role("button", name="Cancel the downgrade").wait_for()
    assert Subscription.objects.get(org=org).scheduled_plan.code == "starter"
    b.shot("downgrade-scheduled")
    b.assert_accessible()
    b.page.get_by_role("button", name="Cancel the downgrade").click()
    b.page.wait_for_load_state()
    assert Subscription.objects.get(org=org).scheduled_plan is None
    assert b.page.get_by_role("button", name="Cancel the downgrade").count() == 0
