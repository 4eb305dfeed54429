"""GET /api/v1/balance and GET /api/v1/usage (DESIGN §7)."""

from datetime import timedelta

import pytest

from accounts import clock
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage.models import Bucket
from usage.services import MB, lot_grant

pytestmark = pytest.mark.django_db

JOB = {"product": "parse", "mode": "base", "pages": 50, "file_type": "pdf", "file_size": MB}


def event(event_id, units, product="parse", mode="audio"):
    return {
        "id": event_id,
        "product": product,
        "mode": mode,
        "units": units,
        "timestamp": "2026-01-01T00:00:00Z",
    }


# --- balance ----------------------------------------------------------------------------------


def test_balance_of_a_new_paid_organisation(api_for):
    org = OrgFactory(plan="starter")
    period = org.subscription.current_period

    response = api_for(org.raw_key).get("balance")

    assert response.status_code == 200
    start = period.start.strftime("%Y-%m-%dT%H:%M:%SZ")
    end = period.end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert response.json() == {
        "plan": "starter",
        "credits_remaining": 40_000,
        "credits_included": 40_000,
        "credits_used_this_period": 0,
        "period_start": start,
        "period_end": end,
        "overage": {"enabled": True, "credits": 0, "amount": "0.00", "cap": None},
        "buckets": [{"bucket": "plan", "credits": 40_000, "expires_at": end}],
    }
    assert start.endswith("T00:00:00Z") and end.endswith("T00:00:00Z")  # periods start at midnight UTC


def test_balance_of_a_free_organisation_has_no_overage_and_ends_on_the_1st(api_for):
    org = OrgFactory(plan="free")

    b = api_for(org.raw_key).get("balance").json()

    assert (b["plan"], b["credits_remaining"], b["credits_included"]) == ("free", 10_000, 10_000)
    assert b["overage"] == {"enabled": False, "credits": 0, "amount": "0.00", "cap": None}
    assert b["period_end"][8:] == "01T00:00:00Z"


def test_balance_shows_the_overage_cap_as_dollars(api_for):
    org = OrgFactory(plan="pro")
    org.subscription.overage_cap_cents = 1250
    org.subscription.save(update_fields=["overage_cap_cents"])

    assert api_for(org.raw_key).get("balance").json()["overage"]["cap"] == "12.50"


def test_balance_shows_overridden_monthly_credits(api_for):
    org = OrgFactory(plan="pro", monthly_credits=1_234)
    b = api_for(org.raw_key).get("balance").json()
    assert (b["credits_included"], b["credits_remaining"]) == (1_234, 1_234)


def test_balance_lists_buckets_in_spending_order(api_for):
    org = OrgFactory(plan="starter")
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=8_000, source="purchase:1")
    bonus_expiry = org.subscription.current_period.end + timedelta(days=3)
    lot_grant(org_id=org.pk, bucket=Bucket.BONUS, credits=400, source="bonus:1", expires_at=bonus_expiry)
    api = api_for(org.raw_key)

    b = api.get("balance").json()

    assert b["credits_remaining"] == 48_400
    assert [(g["bucket"], g["credits"]) for g in b["buckets"]] == [
        ("plan", 40_000),
        ("bonus", 400),
        ("purchased", 8_000),
    ]
    assert b["buckets"][1]["expires_at"] == bonus_expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert b["buckets"][2]["expires_at"] is None
    assert b["credits_included"] == 40_000
    assert_ledger_consistent(org.pk)


def test_balance_spends_plan_then_bonus_then_purchased_credits(api_for):
    org = OrgFactory(plan="starter", monthly_credits=30)
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=100, source="purchase:1")
    lot_grant(
        org_id=org.pk,
        bucket=Bucket.BONUS,
        credits=10,
        source="bonus:1",
        expires_at=org.subscription.current_period.end,
    )
    api = api_for(org.raw_key)
    job = api.post("jobs", {**JOB, "pages": 50}).json()
    api.post(f"jobs/{job['id']}/complete")

    b = api.get("balance").json()

    assert b["credits_remaining"] == 90
    assert b["buckets"] == [{"bucket": "purchased", "credits": 90, "expires_at": None}]
    assert b["overage"]["credits"] == 0
    assert_ledger_consistent(org.pk)


def test_credits_used_this_period_counts_jobs_and_events_but_not_holds(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    done = api.post("jobs", JOB).json()
    api.post(f"jobs/{done['id']}/complete", {"pages": 20})
    api.post("jobs", JOB)  # still running: held, not used
    api.post("usage/events", {"events": [event("e", 7)]})

    b = api.get("balance").json()

    assert b["credits_used_this_period"] == 27
    assert b["credits_remaining"] == 40_000 - 27 - 50
    assert_ledger_consistent(org.pk)


# --- usage ------------------------------------------------------------------------------------


def test_usage_defaults_to_the_last_30_days_by_day(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.post("usage/events", {"events": [event("e", 5)]})
    today = clock.today()

    usage = api.get("usage").json()

    assert usage["start"] == (today - timedelta(days=29)).isoformat()
    assert usage["end"] == today.isoformat()
    assert usage["total_credits"] == 5
    assert len(usage["rows"]) == 30
    assert usage["rows"][-1] == {"key": today.isoformat(), "credits": 5, "units": 5}
    assert all(r == {"key": r["key"], "credits": 0, "units": 0} for r in usage["rows"][:-1])
    assert_ledger_consistent(org.pk)


def test_usage_start_and_end_are_both_inclusive(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.post("usage/events", {"events": [event("e", 5)]})
    today = clock.today()

    on_the_day = api.get("usage", {"start": today.isoformat(), "end": today.isoformat()}).json()
    before = api.get(
        "usage",
        {"start": (today - timedelta(days=3)).isoformat(), "end": (today - timedelta(days=1)).isoformat()},
    ).json()

    assert on_the_day["rows"] == [{"key": today.isoformat(), "credits": 5, "units": 5}]
    assert (before["total_credits"], len(before["rows"])) == (0, 3)
    assert_ledger_consistent(org.pk)


def test_usage_of_366_days_is_answered(api_for):
    org = OrgFactory(plan="starter")
    today = clock.today()
    response = api_for(org.raw_key).get(
        "usage", {"start": (today - timedelta(days=365)).isoformat(), "end": today.isoformat()}
    )
    assert response.status_code == 200
    assert len(response.json()["rows"]) == 366


@pytest.mark.parametrize("query", [{"group-by": "product"}, {"": "null"}, {"start": "2026-01-01", "x": "1"}])
def test_usage_refuses_an_unknown_parameter_rather_than_ignore_it(api_for, query):
    response = api_for(OrgFactory(plan="starter").raw_key).get("usage", query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "use start, end and group_by" in error["message"]


def test_usage_is_only_the_callers_own(api_for):
    one, two = OrgFactory(plan="starter"), OrgFactory(plan="starter")
    api_for(one.raw_key).post("usage/events", {"events": [event("e", 5)]})

    usage = api_for(two.raw_key).get("usage", {"group_by": "product"}).json()

    assert (usage["total_credits"], usage["rows"]) == (0, [])
    assert_ledger_consistent(one.pk)
    assert_ledger_consistent(two.pk)


def test_usage_grouped_by_product_and_mode(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = api.post("jobs", {**JOB, "product": "extract", "ocr": True, "pages": 10}).json()
    api.post(f"jobs/{job['id']}/complete")
    api.post("usage/events", {"events": [event("a", 100)]})

    by_product = api.get("usage", {"group_by": "product"}).json()
    by_mode = api.get("usage", {"group_by": "mode"}).json()

    assert sorted(by_product["rows"], key=lambda r: r["key"]) == [
        {"key": "extract", "credits": 30, "units": 20},
        {"key": "parse", "credits": 100, "units": 100},
    ]
    assert sorted(by_mode["rows"], key=lambda r: r["key"]) == [
        {"key": "audio", "credits": 100, "units": 100},
        {"key": "base", "credits": 20, "units": 10},
        {"key": "ocr", "credits": 10, "units": 10},
    ]
    assert by_product["total_credits"] == by_mode["total_credits"] == 130
    assert_ledger_consistent(org.pk)


def test_usage_up_to_the_last_representable_day_is_answered(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.client.raise_request_exception = False

    response = api.get("usage", {"start": "9999-12-25", "end": "9999-12-31"})

    assert response.status_code == 200
    assert len(response.json()["rows"]) == 7
