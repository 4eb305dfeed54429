"""Settings → Billing as the demo owner uses it: the usage range, CSV export, alerts, API keys."""

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest

from accounts import clock
from accounts.models import ApiKey
from tests.factories import OrgFactory
from usage import services
from usage.models import LowBalanceAlert

pytestmark = pytest.mark.django_db(transaction=True)


def org_with_usage():
    """An owner with 40 days of parse and extract usage, a little more each day."""
    org = OrgFactory(plan="pro", owner_email="owner@example.com")
    today = clock.today()
    for back in range(40, -1, -1):
        moment = clock.midnight(today - timedelta(days=back)) + timedelta(hours=12)
        with clock.travel(moment):
            events = [
                services.EventIn(f"p{back}", "parse", "base", 100 + back, moment),
                services.EventIn(f"e{back}", "extract", "base", 50, moment),
            ]
            services.usage_events_record(sub=org.subscription, events=events)
    return org


def test_changing_the_usage_range_swaps_chart_and_table_without_a_reload_and_csv_adds_up(browsing):
    org = org_with_usage()
    b = browsing()
    b.sign_in("owner@example.com")
    b.go("/settings/billing/usage/")
    page = b.page
    page.locator("#usage-chart-plot .main-svg").first.wait_for()
    total_30 = page.get_by_test_id("usage-total").inner_text()
    rows_30 = page.locator("[data-testid=usage-table] tbody tr").count()
    assert rows_30 == 30
    b.shot("usage-30-days")
    page.evaluate("window.__no_reload = true")  # survives only if the page is not reloaded

    page.get_by_role("link", name="7 days").first.click()
    page.wait_for_url("**start=**")
    page.wait_for_function("document.querySelectorAll('[data-testid=usage-table] tbody tr').length === 7")
    assert page.evaluate("window.__no_reload") is True
    total_7 = page.get_by_test_id("usage-total").inner_text()
    assert total_7 != total_30
    assert page.locator("#usage-chart-plot .main-svg").count() >= 1  # the chart was drawn again
    b.shot("usage-7-days")
    b.assert_accessible()

    with page.expect_download() as download:
        page.get_by_test_id("usage-csv").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert list(rows[0]) == ["date", "product", "mode", "credits", "units"]
    assert f"{sum(int(r['credits']) for r in rows):,}" == total_7
    assert not b.console_errors

    # By mode instead: swapped in place too, the same total, and the chart adds up to the table.
    page.get_by_label("Mode").check()
    page.wait_for_url("**group_by=mode**")
    page.locator("[data-testid=usage-table] th[data-key=base]").wait_for()
    assert page.evaluate("window.__no_reload") is True
    assert page.get_by_test_id("usage-total").inner_text() == total_7
    bars = [t for t in json.loads(page.locator("#usage-chart").text_content())["data"] if t["type"] == "bar"]
    assert [t["name"] for t in bars] == ["Base"]
    assert f"{sum(y or 0 for t in bars for y in t['y']):,}" == total_7

    # Usage recorded meanwhile shows on the next look at the same range.
    services.usage_events_record(
        sub=org.subscription, events=[services.EventIn("late", "parse", "ocr", 5, clock.now())]
    )
    page.get_by_role("button", name="Show").click()
    page.locator("[data-testid=usage-table] th[data-key=ocr]").wait_for()
    assert page.get_by_test_id("usage-total").inner_text() == f"{int(total_7.replace(',', '')) + 5:,}"
    b.shot("usage-7-days-by-mode")

    page.reload()  # the range is in the URL, so a reload keeps it
    assert page.locator("[data-testid=usage-table] tbody tr").count() == 7


def test_owner_saves_an_alert_threshold_and_a_bad_one_keeps_the_saved_value(browsing):
    OrgFactory(plan="starter", owner_email="owner@example.com")
    b = browsing()
    b.sign_in("owner@example.com")
    b.go("/settings/billing/notifications/")
    page = b.page
    page.get_by_label("E-mail us when the balance runs low").check()
    page.get_by_label("Threshold").fill("5000")
    page.get_by_role("button", name="Save alert").click()
    page.get_by_test_id("alert-state").get_by_text("falls below 5,000 credits").wait_for()
    assert LowBalanceAlert.objects.get().threshold == 5000
    page.get_by_label("Threshold").fill("0")
    page.get_by_role("button", name="Save alert").click()
    page.locator(".field-error").first.wait_for()
    assert LowBalanceAlert.objects.get().threshold == 5000
    b.shot("alert-error")
    b.assert_accessible()


def test_owner_creates_a_key_sees_it_once_and_revokes_it(browsing, client):
    OrgFactory(plan="starter", owner_email="owner@example.com")
    b = browsing(375)
    b.sign_in("owner@example.com")
    b.go("/settings/api-keys/")
    page = b.page
    page.get_by_label("Name").fill("Production server")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-secret").input_value()
    assert secret.startswith("sk_")
    assert client.get("/api/v1/balance", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    b.shot("key-shown-once")
    b.assert_accessible()
    b.go("/settings/api-keys/")
    assert secret not in page.content()  # shown once, never again

    page.get_by_role("link", name="Revoke Production server").click()
    page.get_by_role("button", name="Revoke key").click()
    page.wait_for_url("**/settings/api-keys/")
    assert ApiKey.objects.get(name="Production server").revoked_at is not None
    assert client.get("/api/v1/balance", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    b.shot("key-revoked")
