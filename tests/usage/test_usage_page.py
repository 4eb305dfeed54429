"""Settings → Billing → Usage and its CSV export (DESIGN §4 "Usage")."""

import csv
import io
import json
import re
from datetime import UTC, date, datetime, timedelta

import plotly.graph_objects as go
import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import NoReverseMatch, reverse

from accounts import clock
from accounts.models import BillingPeriod
from accounts.services import member_add
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import charts
from usage.models import UsageEvent, UsageRollup
from usage.services import EventIn, usage_events_record
from usage.usage_forms import UsageRangeForm

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)
TODAY = NOW.date()
PAGE = "/settings/billing/usage/"
CSV = "/settings/billing/usage.csv"
HTMX = {"HX-Request": "true"}


@pytest.fixture(autouse=True)
def billing_time():
    """Billing time stands still at NOW for every test (and for the org's first period)."""
    with clock.travel(NOW):
        yield


@pytest.fixture
def org():
    """A Starter organisation whose current period began on 1 Nov 2026 (quota 40,000)."""
    with clock.travel(datetime(2026, 11, 1, 9, tzinfo=UTC)):
        return OrgFactory(plan="starter")


@pytest.fixture
def owner_client(client, org):
    client.force_login(org.memberships.get().user)
    return client


def rollup(org, day, product="parse", mode="base", credits=100, units=None):
    return UsageRollup.objects.create(
        org=org,
        day=day,
        product=product,
        mode=mode,
        credits=credits,
        units=credits if units is None else units,
    )


def figure_from(html: str, element_id: str) -> dict:
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no {element_id} JSON in the page"
    return json.loads(match.group(1))


def csrf(response) -> str:
    """The page's CSRF token (masked afresh for every response)."""
    return re.search(r'"X-CSRFToken": "([^"]+)"', response.text).group(1)


def csv_rows(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.content.decode())))


# --- the range --------------------------------------------------------------------------------


def test_default_range_is_the_last_30_days_ending_today(owner_client):
    response = owner_client.get(PAGE)

    assert response.status_code == 200
    chosen = response.context["usage_range"]
    assert (chosen.start, chosen.end, chosen.group_by) == (TODAY - timedelta(days=29), TODAY, "product")
    assert chosen.days == 30
    assert 'value="2026-10-25"' in response.text and 'value="2026-11-23"' in response.text
    assert "Credits used, 25 Oct 2026 – 23 Nov 2026" in response.text


def test_presets_are_the_last_7_30_and_90_days_and_mark_the_current_one(owner_client, org):
    response = owner_client.get(PAGE)

    presets = {p["days"]: p for p in response.context["presets"]}
    assert sorted(presets) == [7, 30, 90]
    assert presets[7]["url"] == f"{PAGE}?start=2026-11-17&end=2026-11-23&group_by=product"
    assert presets[90]["url"] == f"{PAGE}?start=2026-08-26&end=2026-11-23&group_by=product"
    assert presets[30]["current"] and not presets[7]["current"]
    assert 'aria-current="true"><span class="preset-last">Last </span>30 days</a>' in response.text

    rollup(org, TODAY - timedelta(days=6), credits=7)
    rollup(org, TODAY - timedelta(days=7), credits=1000)  # the day before the 7-day range
    week = owner_client.get(presets[7]["url"])
    assert len(week.context["report"].grid.rows) == 7
    assert week.context["report"].grid.total == 7
    assert {p["days"]: p["current"] for p in week.context["presets"]} == {7: True, 30: False, 90: False}


def test_custom_range_includes_both_its_dates(owner_client, org):
    for day, credits in [
        (date(2026, 10, 9), 1),
        (date(2026, 10, 10), 20),
        (date(2026, 10, 20), 300),
        (date(2026, 10, 21), 4000),
    ]:
        rollup(org, day, credits=credits)

    response = owner_client.get(PAGE, {"start": "2026-10-10", "end": "2026-10-20", "group_by": "product"})

    grid = response.context["report"].grid
    assert [r.day for r in grid.rows][0] == date(2026, 10, 10)
    assert [r.day for r in grid.rows][-1] == date(2026, 10, 20)
    assert len(grid.rows) == 11
    assert grid.total == 320
    assert response.context["form_valid"]
    assert 'data-testid="usage-total">320<' in response.text


def test_a_missing_start_means_30_days_before_the_end():
    form = UsageRangeForm({"end": "2026-06-30"}, today=TODAY)
    assert form.is_valid()
    assert (form.usage_range.start, form.usage_range.end) == (date(2026, 6, 1), date(2026, 6, 30))


def test_a_range_of_exactly_366_days_is_allowed():
    form = UsageRangeForm({"start": "2025-11-23", "end": "2026-11-23"}, today=TODAY)
    assert form.is_valid(), form.errors
    assert form.usage_range.days == 366


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"start": "2026-11-20", "end": "2026-11-01"}, "The start date must be on or before the end date."),
        ({"start": "2026-13-01", "end": "2026-11-01"}, "Enter a date as YYYY-MM-DD"),
        ({"start": "yesterday"}, "Enter a date as YYYY-MM-DD"),
        (
            {"start": "2025-01-01", "end": "2026-11-23"},
            "Choose a range of at most 366 days; this one has 692.",
        ),
        ({"group_by": "colour"}, "Group usage by product or by mode."),
        ({"start": "0001-01-01", "end": "0001-01-05"}, "Enter a date between 2000-01-01 and 2100-12-31."),
        ({"start": "9999-12-25", "end": "9999-12-31"}, "Enter a date between 2000-01-01 and 2100-12-31."),
    ],
)
def test_bad_input_shows_an_error_and_the_default_range_not_a_500(owner_client, org, query, message):
    rollup(org, TODAY, credits=55)

    response = owner_client.get(PAGE, query)

    assert response.status_code == 200
    assert message in response.text
    assert 'data-testid="range-fallback"' in response.text
    chosen = response.context["usage_range"]
    assert (chosen.start, chosen.end) == (TODAY - timedelta(days=29), TODAY)
    assert response.context["report"].grid.total == 55
    # The dates typed stay in the form (an unknown grouping has no radio button to show it).
    for name in ("start", "end"):
        if name in query:
            assert f'value="{query[name]}"' in response.text

    fragment = owner_client.get(PAGE, query, headers=HTMX)
    assert fragment.status_code == 200
    assert message in fragment.text

    csv_response = owner_client.get(CSV, query)
    assert csv_response.status_code == 400
    assert csv_response["Content-Type"].startswith("text/plain")
    assert message in csv_response.content.decode()


def test_grouping_by_mode_keeps_the_range_when_the_dates_are_bad(owner_client):
    response = owner_client.get(PAGE, {"start": "2026-11-20", "end": "2026-11-01", "group_by": "mode"})
    assert response.context["usage_range"].group_by == "mode"


# --- htmx -------------------------------------------------------------------------------------


def test_htmx_request_returns_only_the_fragment_with_the_chart_json(owner_client, org):
    rollup(org, TODAY - timedelta(days=2), "parse", "base", 1234)
    rollup(org, TODAY - timedelta(days=2), "extract", "base", 66)

    response = owner_client.get(PAGE, {"start": "2026-11-17", "end": "2026-11-23"}, headers=HTMX)

    assert response.status_code == 200
    html = response.text
    assert "<html" not in html and "Settings <span" not in html  # no page shell, no tabs
    assert 'id="usage-results"' not in html  # the inner content of the swap target
    assert 'id="usage-range"' in html and 'hx-swap-oob="true"' in html  # the form, out of band
    assert 'value="2026-11-17"' in html
    figure = figure_from(html, "usage-chart")
    assert [t["name"] for t in figure["data"] if t.get("showlegend", True)] == ["Parse", "Extract"]
    parse = figure["data"][0]
    assert parse["x"][0] == "2026-11-17" and len(parse["x"]) == 7
    assert parse["y"][4] == 1234
    assert "HX-Request" in response["Vary"]


def test_htmx_history_restore_gets_the_whole_page(owner_client):
    response = owner_client.get(PAGE, headers={**HTMX, "HX-History-Restore-Request": "true"})
    assert "<html" in response.text


def test_the_full_page_loads_plotly_and_the_chart_script_without_inline_scripts(owner_client, org):
    rollup(org, TODAY)

    html = owner_client.get(PAGE).text

    assert '<script src="/static/vendor/plotly.min.js" defer></script>' in html
    assert '<script src="/static/js/charts.js" defer></script>' in html
    inline = [
        s for s in re.findall(r"<script([^>]*)>", html) if "src=" not in s and "application/json" not in s
    ]
    assert inline == []
    assert "<noscript>" in html
    assert 'hx-get="/settings/billing/usage/"' in html and 'hx-push-url="true"' in html


# --- table and charts -------------------------------------------------------------------------


def test_table_numbers_equal_the_rollups(owner_client, org):
    day1, day2 = date(2026, 11, 20), date(2026, 11, 22)
    rollup(org, day1, "parse", "base", 12_345)
    rollup(org, day1, "parse", "ocr", 655)
    rollup(org, day1, "extract", "base", 2_000)
    rollup(org, day2, "index", "base", 7)

    response = owner_client.get(PAGE, {"start": "2026-11-19", "end": "2026-11-23"})

    grid = response.context["report"].grid
    assert [c.key for c in grid.columns] == ["parse", "extract", "index"]
    rows = {r.day: (r.cells, r.total) for r in grid.rows}
    assert rows[date(2026, 11, 19)] == ([0, 0, 0], 0)
    assert rows[day1] == ([13_000, 2_000, 0], 15_000)
    assert rows[day2] == ([0, 0, 7], 7)
    assert grid.totals == [13_000, 2_000, 7]
    assert grid.total == 15_007
    html = re.sub(r">\s+<", "><", response.text)
    assert (
        '<td class="num">13,000</td><td class="num">2,000</td><td class="num zero">0</td><td class="num">15,000</td>'
        in html
    )
    assert 'data-testid="table-total">15,007<' in html
    assert 'data-testid="usage-total">15,007<' in html


def test_group_by_mode_splits_ocr(owner_client, org):
    rollup(org, TODAY, "parse", "base", 100)
    rollup(org, TODAY, "parse", "ocr", 100)
    rollup(org, TODAY, "extract", "ocr", 50)
    rollup(org, TODAY, "parse", "audio", 30)

    by_mode = owner_client.get(PAGE, {"group_by": "mode"}).context["report"].grid
    by_product = owner_client.get(PAGE, {"group_by": "product"}).context["report"].grid

    assert [(c.label, t) for c, t in zip(by_mode.columns, by_mode.totals, strict=True)] == [
        ("Base", 100),
        ("OCR", 150),
        ("Audio", 30),
    ]
    assert [(c.label, t) for c, t in zip(by_product.columns, by_product.totals, strict=True)] == [
        ("Parse", 230),
        ("Extract", 50),
    ]
    assert by_mode.total == by_product.total == 280


def test_figures_are_valid_plotly_with_titles_legend_and_fixed_colours(owner_client, org):
    rollup(org, TODAY - timedelta(days=1), "extract", "base", 40)
    rollup(org, TODAY, "parse", "base", 60)

    html = owner_client.get(PAGE).text
    daily = figure_from(html, "usage-chart")
    period = figure_from(html, "usage-period-chart")

    for figure in (daily, period):
        go.Figure(figure)  # plotly's own validation: raises on any unknown property
        assert figure["layout"]["xaxis"]["title"]["text"] == "Date"
        assert figure["layout"]["yaxis"]["title"]["text"] == "Credits"
        assert figure["layout"]["paper_bgcolor"] == figure["layout"]["plot_bgcolor"] == "rgba(0, 0, 0, 0)"
        assert all("%{y:,}" in t["hovertemplate"] for t in figure["data"])
    assert daily["layout"]["barmode"] == "stack"
    colours = {t["name"]: t["marker"]["color"] for t in daily["data"] if t["type"] == "bar"}
    assert colours == {"Parse": charts.PRODUCT_COLOURS["parse"], "Extract": charts.PRODUCT_COLOURS["extract"]}


def test_cumulative_chart_runs_over_the_current_period_against_the_quota(owner_client, org):
    rollup(org, date(2026, 10, 31), credits=999)  # before the period
    rollup(org, date(2026, 11, 1), credits=1_000)
    rollup(org, date(2026, 11, 3), "extract", "base", 2_500)
    rollup(org, date(2026, 11, 3), "parse", "ocr", 500)

    response = owner_client.get(PAGE, {"start": "2026-10-01", "end": "2026-10-31"})

    figure = figure_from(response.text, "usage-period-chart")
    used, quota = figure["data"]
    assert used["name"] == "Used" and quota["name"] == "Quota"
    assert used["x"][:3] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert used["x"][-1] == "2026-11-23"  # up to today
    assert used["y"][:3] == [1_000, 1_000, 4_000] and used["y"][-1] == 4_000
    assert quota["x"][0] == "2026-11-01" and quota["x"][-1] == "2026-11-30"
    assert set(quota["y"]) == {40_000}
    assert figure["layout"]["annotations"][0]["text"] == "Quota: 40,000 credits"
    assert 'data-testid="period-used">4,000<' in response.text


def test_no_usage_in_the_range_shows_a_friendly_message_instead_of_empty_axes(owner_client, org):
    rollup(org, date(2026, 1, 5), credits=10)  # long ago

    response = owner_client.get(PAGE)

    html = response.text
    assert "No usage in this range yet:" in html and "send your first job with an API key from" in html
    assert 'id="usage-chart"' not in html and 'id="usage-period-chart"' not in html
    assert 'data-testid="usage-table"' not in html
    try:
        api_keys = reverse("billing:api_keys")
    except NoReverseMatch:
        assert "API keys</a>" not in html
    else:
        assert f'<a href="{api_keys}">API keys</a>' in html


# --- CSV --------------------------------------------------------------------------------------


def test_csv_has_the_header_one_row_per_day_product_and_mode_and_adds_up(owner_client, org):
    rollup(org, date(2026, 11, 20), "parse", "ocr", 5, units=5)
    rollup(org, date(2026, 11, 20), "parse", "base", 10, units=10)
    rollup(org, date(2026, 11, 19), "extract", "base", 40, units=20)
    rollup(org, date(2026, 11, 23), "parse", "audio", 90, units=90)
    rollup(org, date(2026, 11, 24), "parse", "base", 1_000)  # after the range
    rollup(org, date(2026, 11, 21), "split", "base", 0, units=0)  # an empty rollup

    response = owner_client.get(CSV, {"start": "2026-11-19", "end": "2026-11-23", "group_by": "mode"})

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="usage-2026-11-19-to-2026-11-23.csv"'
    assert response.content.decode().splitlines()[0] == "date,product,mode,credits,units"
    rows = csv_rows(response)
    assert rows[1:] == [
        ["2026-11-19", "extract", "base", "40", "20"],
        ["2026-11-20", "parse", "base", "10", "10"],
        ["2026-11-20", "parse", "ocr", "5", "5"],
        ["2026-11-23", "parse", "audio", "90", "90"],
    ]
    page = owner_client.get(PAGE, {"start": "2026-11-19", "end": "2026-11-23", "group_by": "mode"})
    assert sum(int(r[3]) for r in rows[1:]) == page.context["report"].grid.total == 145
    assert page.context["csv_url"] == f"{CSV}?start=2026-11-19&end=2026-11-23&group_by=mode"


def test_csv_defaults_to_the_last_30_days(owner_client, org):
    rollup(org, TODAY - timedelta(days=29), credits=3)
    rollup(org, TODAY - timedelta(days=30), credits=4)

    response = owner_client.get(CSV)

    assert response["Content-Disposition"] == 'attachment; filename="usage-2026-10-25-to-2026-11-23.csv"'
    assert csv_rows(response)[1:] == [["2026-10-25", "parse", "base", "3", "3"]]


def test_usage_reported_through_events_appears_on_the_day_it_was_charged(owner_client, org):
    sub = org.subscription
    for days_ago, units in [(3, 12), (1, 30)]:
        moment = NOW - timedelta(days=days_ago)
        with clock.travel(moment):
            usage_events_record(
                sub=sub,
                events=[EventIn(f"ev-{days_ago}-{i}", "parse", "audio", units, moment) for i in range(2)],
            )
    assert UsageEvent.objects.filter(org=org).count() == 4

    response = owner_client.get(PAGE, {"start": "2026-11-17", "end": "2026-11-23", "group_by": "mode"})

    rows = {r.day: r.total for r in response.context["report"].grid.rows}
    assert rows[date(2026, 11, 20)] == 24 and rows[date(2026, 11, 22)] == 60
    assert response.context["report"].grid.total == 84
    assert response.context["report"].period.used == 84
    assert_ledger_consistent(org.pk)


# --- what the page keeps in the cache ---------------------------------------------------------


def test_new_usage_shows_at_once_on_a_page_viewed_before(owner_client, org):
    rollup(org, TODAY, "parse", "base", 100)
    for headers in ({}, HTMX):
        assert 'data-testid="usage-total">100<' in owner_client.get(PAGE, headers=headers).text

    usage_events_record(sub=org.subscription, events=[EventIn("ev-1", "extract", "base", 20, NOW)])
    page = owner_client.get(PAGE)
    fragment = owner_client.get(PAGE, headers=HTMX)

    assert page.context["report"].grid.total == 140 and page.context["report"].period.used == 140
    for html in (page.text, fragment.text):
        assert 'data-testid="usage-total">140<' in html and 'data-testid="table-total">140<' in html
        assert 'data-testid="period-used">140<' in html
        assert [t["name"] for t in figure_from(html, "usage-chart")["data"]] == ["Parse", "Extract", "Total"]

    # Rollups written by anything else (a bulk load, staff fixing a day) show at once too.
    UsageRollup.objects.filter(org=org, product="parse").update(credits=F("credits") + 5)
    assert 'data-testid="usage-total">145<' in owner_client.get(PAGE).text


def test_a_new_quota_shows_at_once(owner_client, org):
    rollup(org, TODAY, credits=100)
    assert "Quota: 40,000 credits" in owner_client.get(PAGE).text

    BillingPeriod.objects.filter(pk=org.subscription.current_period_id).update(monthly_credits=100_000)

    html = owner_client.get(PAGE).text
    assert "Quota: 100,000 credits" in html and "of 100,000 credits included" in html


def test_owner_and_member_viewing_the_same_empty_range_each_get_their_own_note(owner_client, client, org):
    member = member_add(org_id=org.pk, email="member@example.com", role="member", password="pw-123456789")
    try:
        link = f'<a href="{reverse("billing:api_keys")}">API keys</a>'
    except NoReverseMatch:
        pytest.skip("the API keys page is not there to link to")

    assert link in owner_client.get(PAGE).text
    client.force_login(member.user)
    member_html = client.get(PAGE).text
    assert "No usage in this range yet:" in member_html and link not in member_html
    assert "an owner or billing admin of" in member_html


def test_a_repeat_view_reads_only_the_totals_of_the_rollups(owner_client, org):
    rollup(org, TODAY - timedelta(days=3), "parse", "base", 100)
    rollup(org, TODAY, "index", "base", 7)
    first = owner_client.get(PAGE, {"group_by": "mode"})

    with CaptureQueriesContext(connection) as queries:
        again = owner_client.get(PAGE, {"group_by": "mode"})

    assert again.text.replace(csrf(again), "") == first.text.replace(csrf(first), "")
    reads = [q["sql"] for q in queries if "usage_usagerollup" in q["sql"]]
    assert len(reads) == 1 and reads[0].startswith("SELECT count(*), coalesce(sum(credits), 0)")


# --- who sees what ----------------------------------------------------------------------------


def test_member_can_see_the_usage_page_and_its_csv(client, org):
    rollup(org, TODAY, credits=77)
    member = member_add(org_id=org.pk, email="member@example.com", role="member", password="pw-123456789")
    client.force_login(member.user)

    page = client.get(PAGE)
    assert page.status_code == 200
    assert page.context["report"].grid.total == 77
    assert "send your first job" not in page.text
    assert client.get(CSV).status_code == 200


def test_member_with_no_usage_is_not_sent_to_the_api_keys_page(client, org):
    member = member_add(org_id=org.pk, email="member@example.com", role="member", password="pw-123456789")
    client.force_login(member.user)

    html = client.get(PAGE).text

    assert "No usage in this range yet:" in html
    assert "API keys</a>" not in html


def test_signed_out_visitors_are_sent_to_sign_in(client):
    for url in (PAGE, CSV):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_another_organisations_usage_never_appears(owner_client, org):
    other = OrgFactory(plan="pro")
    rollup(org, TODAY, "parse", "base", 10)
    rollup(other, TODAY, "parse", "base", 5_000)
    rollup(other, TODAY, "classify", "base", 6_000)

    page = owner_client.get(PAGE)
    fragment = owner_client.get(PAGE, headers=HTMX)
    rows = csv_rows(owner_client.get(CSV))

    assert page.context["report"].grid.total == 10
    assert [c.key for c in page.context["report"].grid.columns] == ["parse"]
    assert page.context["report"].period.used == 10
    assert "5,000" not in page.text and "Classify" not in page.text
    assert "Classify" not in fragment.text
    assert rows[1:] == [["2026-11-23", "parse", "base", "10", "10"]]


def test_page_queries_do_not_grow_with_the_number_of_days(owner_client, org, django_assert_max_num_queries):
    first = TODAY - timedelta(days=365)
    UsageRollup.objects.bulk_create(
        UsageRollup(
            org=org, day=first + timedelta(days=i), product=p, mode="base", credits=i + 1, units=i + 1
        )
        for i in range(366)
        for p in ("parse", "extract", "index")
    )
    counts = []
    for start in (TODAY - timedelta(days=6), first):
        query = {"start": start.isoformat(), "end": TODAY.isoformat()}
        with CaptureQueriesContext(connection) as queries:
            response = owner_client.get(PAGE, query)
        assert response.status_code == 200
        counts.append(len(queries))
    assert counts[0] == counts[1]
    with django_assert_max_num_queries(12):
        owner_client.get(PAGE, {"start": first.isoformat(), "end": TODAY.isoformat()})
    with django_assert_max_num_queries(12):
        owner_client.get(PAGE, {"start": first.isoformat(), "end": TODAY.isoformat()}, headers=HTMX)
    with django_assert_max_num_queries(8):
        owner_client.get(CSV, {"start": first.isoformat(), "end": TODAY.isoformat()})
