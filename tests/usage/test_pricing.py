"""The public cost estimator at /pricing/ (DESIGN §4), with hand-computed figures."""

import html as htmllib
import re
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils.html import strip_tags

from accounts.models import Plan
from usage import pricing
from usage.models import Operation
from usage.selectors import catalog_forget

pytestmark = pytest.mark.django_db

URL = "/pricing/"


def words(fragment: str) -> str:
    return re.sub(r"\s+", " ", htmllib.unescape(strip_tags(fragment))).strip()


def rows(response) -> dict[str, str]:
    """{plan code: the row's words} from the estimate table."""
    html = response.content.decode()
    table = html.split('data-testid="estimate-table"')[1].split("</table>")[0]
    return {
        code: words(body) for code, body in re.findall(r'<tr data-plan="(\w+)"[^>]*>(.*?)</tr>', table, re.S)
    }


def estimate(**pages):
    result = pricing.estimate(**{"base": 0, "advanced": 0, "ocr": 0, **pages})
    return result.credits.total, {row.plan.code: row for row in result.plans}


def cheapest(plans):
    return sorted(code for code, row in plans.items() if row.cheapest)


# --- the math -------------------------------------------------------------------------------


def test_base_and_ocr_pages_fill_starter_exactly():
    credits, plans = estimate(base=30_000, ocr=5_000)  # 30,000 × 1 + 5,000 × (1 + 1)
    assert credits == 40_000
    assert plans["free"].not_enough and plans["free"].total_cents is None
    assert plans["starter"].total_cents == 5_000  # $50.00: the fee, nothing beyond the quota
    assert plans["pro"].total_cents == 50_000
    assert plans["enterprise"].contact_sales
    assert cheapest(plans) == ["starter"]


def test_advanced_pages_go_into_starter_overage():
    credits, plans = estimate(advanced=100_000)  # 100,000 × 3
    assert credits == 300_000
    # $50 + 260,000 × $1.25 / 1,000 = $50 + $325 = $375.00
    assert plans["starter"].overage_credits == 260_000
    assert plans["starter"].overage_cents == 32_500
    assert plans["starter"].total_cents == 37_500
    assert plans["pro"].total_cents == 50_000
    assert cheapest(plans) == ["starter"]


def test_nothing_entered_is_free():
    credits, plans = estimate()
    assert credits == 0
    assert plans["free"].total_cents == 0
    assert cheapest(plans) == ["free"]


def test_free_holds_its_quota_exactly_but_not_one_credit_more():
    _, plans = estimate(base=10_000)
    assert plans["free"].total_cents == 0 and cheapest(plans) == ["free"]
    _, plans = estimate(base=10_001)
    assert plans["free"].not_enough
    assert cheapest(plans) == ["starter"]


def test_overage_rounds_half_up_once():
    _, plans = estimate(base=40_001)  # 1 credit: $0.00125 -> $0.00
    assert plans["starter"].total_cents == 5_000
    _, plans = estimate(base=40_004)  # 4 credits: $0.005 -> $0.01
    assert plans["starter"].total_cents == 5_001
    _, plans = estimate(base=41_252)  # 1,252 credits: $1.565 -> $1.57 (DESIGN §3)
    assert plans["starter"].total_cents == 5_157


def test_equal_costs_are_both_marked_cheapest():
    # 400,000 credits: Starter $50 + 360,000 × $1.25 / 1,000 = $500.00, the same as Pro.
    _, plans = estimate(base=400_000)
    assert plans["starter"].total_cents == plans["pro"].total_cents == 50_000
    assert cheapest(plans) == ["pro", "starter"]


def test_the_largest_inputs_stay_exact():
    credits, plans = estimate(base=1_000_000_000, advanced=1_000_000_000, ocr=1_000_000_000)
    assert credits == 6_000_000_000
    # Pro: $500 + 5,999,600,000 × $1.25 / 1,000 = $7,500,000.00
    assert plans["pro"].total_cents == 750_000_000
    assert plans["starter"].total_cents == 750_000_000


def test_credits_follow_the_catalog():
    Operation.objects.filter(product="parse", mode="advanced").update(credits_per_unit=4)
    Operation.objects.filter(product="parse", mode="ocr").update(credits_per_unit=2)
    catalog_forget()
    credits, _ = estimate(advanced=10, ocr=10)  # 10 × 4 + 10 × (1 + 2)
    assert credits == 70


def test_plans_follow_the_plan_table():
    Plan.objects.filter(code="starter").update(overage_rate=Decimal("2.00"))
    _, plans = estimate(advanced=100_000)  # 260,000 × $2 / 1,000 = $520 + $50
    assert plans["starter"].total_cents == 57_000
    assert cheapest(plans) == ["pro"]


# --- the page -------------------------------------------------------------------------------


def test_url_is_stable_and_public(client):
    assert reverse("pricing") == URL
    response = client.get(URL)
    assert response.status_code == 200


def test_fields_are_labelled_exactly(client):
    html = client.get(URL).content.decode()
    for name, label in (
        ("base", "Pages per month — base"),
        ("advanced", "Pages per month — advanced"),
        ("ocr", "Pages per month — with OCR"),
    ):
        assert f'<label for="id_{name}">{label}</label>' in html
    assert 'method="get"' in html
    assert 'hx-trigger="input changed delay:300ms, submit"' in html


def test_get_form_shows_costs_for_each_plan_and_marks_the_cheapest(client):
    response = client.get(URL, {"base": "30,000", "advanced": "", "ocr": "5000"})
    assert response.status_code == 200
    assert 'value="30,000"' in response.content.decode()
    table = rows(response)
    assert table["free"] == "Free 10,000 40,000 — Not enough — Free stops at 10,000 credits"
    assert table["starter"] == "Starter Cheapest 40,000 40,000 — $50.00"
    assert table["pro"] == "Pro 400,000 40,000 — $500.00"
    assert "Contact sales" in table["enterprise"]
    assert "Cheapest" not in table["free"] + table["pro"] + table["enterprise"]
    assert words(response.content.decode()).count("Cheapest") == 1


def test_page_shows_overage_working(client):
    table = rows(client.get(URL, {"advanced": "100000"}))
    assert table["starter"] == "Starter Cheapest 40,000 300,000 260,000 × $1.25/1,000 = $325.00 $375.00"
    assert table["pro"].endswith("$500.00")


def test_htmx_request_gets_the_results_fragment_and_field_errors(client):
    response = client.get(URL, {"base": "100", "advanced": "-1", "ocr": "x"}, headers={"HX-Request": "true"})
    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html
    assert html.strip().startswith('<div id="estimate-results"')
    assert "Fix the values marked above" in html
    assert (
        '<div id="id_advanced_errors" class="field-errors" hx-swap-oob="true"><p class="field-error">' in html
    )
    assert "Enter a whole number of pages from 0 to 1,000,000,000." in html
    assert '<div id="id_base_errors" class="field-errors" hx-swap-oob="true"></div>' in html


def test_htmx_results_update(client):
    response = client.get(URL, {"base": "30000", "ocr": "5000"}, headers={"HX-Request": "true"})
    assert rows(response)["starter"].endswith("$50.00")


@pytest.mark.parametrize("value", ["-1", "1000000001", "1.5", "lots"])
def test_invalid_pages_show_an_error_next_to_the_field_without_js(client, value):
    response = client.get(URL, {"base": "1", "advanced": value})
    html = response.content.decode()
    assert response.status_code == 200
    field = html.split('<label for="id_advanced">')[1].split('<div class="field')[0]
    assert "Enter a whole number of pages from 0 to 1,000,000,000." in field
    assert f'value="{value}"' in field
    assert 'data-testid="estimate-table"' not in html


def test_plan_table_summary(client):
    text = words(client.get(URL).content.decode())
    assert "Starter $50.00 40,000 Pay as you go: $1.25 per 1,000 credits 120 10 Priority" in text
    assert "Pro $500.00 400,000 Pay as you go: $1.25 per 1,000 credits 300 20 Dedicated" in text
    assert "Free $0.00 10,000 Requests are refused until the next month 20 10 Community" in text
    assert "Enterprise Contact sales" in text


def test_history_restore_gets_the_whole_page(client):
    headers = {"HX-Request": "true", "HX-History-Restore-Request": "true"}
    response = client.get(URL, {"base": "30000"}, headers=headers)
    assert "<html" in response.content.decode()
    assert "HX-Request" in response["Vary"]
