"""Prepaid credits as a new customer uses them: add a card, buy a $50 pack after agreeing to the
refund policy, set a threshold auto-recharge after its preview, spend through the API below the
threshold, see the recharge arrive, and refund the unused recharge."""

import pytest

from billing_site.celery import app
from tests.e2e.test_plans_e2e import add_card
from tests.factories import OrgFactory
from usage.models import CreditAccount, CreditPurchase

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def eager_tasks():
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True  # the recharge task runs as a worker would, at once
    yield
    app.conf.task_always_eager = before


def test_buy_a_pack_set_a_threshold_recharge_spend_below_it_and_refund_the_unused_recharge(
    browsing, localstripe, client, eager_tasks
):
    org = OrgFactory(plan="free", owner_email="credits@example.com")
    b = browsing()
    b.sign_in("credits@example.com")
    add_card(b, "4242424242424242")
    page = b.page

    b.go("/settings/billing/credits/")
    page.locator("label.pack-option", has_text="$50.00").click()
    page.get_by_role("button", name="Buy and pay with your default card").click()
    page.locator(".field-error, .form-errors").first.wait_for()  # no tick: nothing is charged
    assert not CreditPurchase.objects.filter(org=org).exists()
    page.locator("label.pack-option", has_text="$50.00").click()
    page.get_by_label("I agree to the refund policy").check()
    page.get_by_role("button", name="Buy and pay with your default card").click()
    page.get_by_test_id("purchased-credits").get_by_text("44,000").wait_for()
    assert "$50.00" in page.get_by_test_id("purchase-row").first.inner_text()
    b.shot("pack-bought")

    page.get_by_label("When my balance falls below (credits)").fill("20000")
    page.get_by_label("Buy this pack").select_option(label="$10: 8,000 credits")
    page.get_by_role("button", name="Preview").click()
    page.get_by_test_id("preview-price").wait_for()
    assert page.get_by_test_id("preview-price").inner_text() == "$10.00"
    b.shot("recharge-preview")
    page.get_by_role("button", name="Confirm and turn on").click()
    page.get_by_test_id("recharge-summary").wait_for()
    b.assert_accessible()

    # 54,000 credits (10,000 plan + 44,000 bought); spending 40,000 leaves 14,000 < 20,000.
    event = {
        "id": "big-batch",
        "product": "parse",
        "mode": "base",
        "units": 40_000,
        "timestamp": "2026-11-23T10:00:00Z",
    }
    response = client.post(
        "/api/v1/usage/events",
        {"events": [event]},
        content_type="application/json",
        headers={"Authorization": f"Bearer {org.raw_key}"},
    )
    assert response.status_code == 202
    recharge = CreditPurchase.objects.get(org=org, kind="threshold")
    assert recharge.status == "paid" and recharge.credits == 8_000
    assert CreditAccount.objects.get(org=org).balance == 14_000 + 8_000

    b.go("/settings/billing/credits/")
    assert "Auto-recharge" in page.get_by_test_id("purchase-row").first.inner_text()
    b.shot("recharge-arrived")
    page.get_by_role("link", name="Refund $10.00").click()
    page.get_by_role("button", name="Refund $10.00").click()
    page.get_by_text("Refunded").first.wait_for()
    recharge.refresh_from_db()
    assert recharge.status == "refunded"
    assert CreditAccount.objects.get(org=org).balance == 14_000
    b.shot("recharge-refunded")
    b.assert_accessible()
