"""POST /api/v1/usage/events (DESIGN §3 and §7): batches of metered events, each id counted once
per organisation ever, Free batches all-or-nothing, paid batches into overage."""

import pytest

from accounts import clock
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage.api_support import assert_error, balance, credits_left
from usage.models import LedgerEntry, UsageEvent, UsageRollup

pytestmark = pytest.mark.django_db


def event(event_id, units=10, product="parse", mode="audio", timestamp="2026-01-15T10:00:00Z"):
    return {"id": event_id, "product": product, "mode": mode, "units": units, "timestamp": timestamp}


def send(api, *events):
    return api.post("usage/events", {"events": list(events)})


def test_a_batch_is_accepted_with_202_and_charged_before_the_answer(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = send(
        api,
        event("a-1", units=30),
        event("a-2", units=5, product="extract", mode="base"),
        event("a-3", units=4, mode="ocr"),
    )

    assert response.status_code == 202
    assert response.json() == {"accepted": 3, "duplicates": 0}
    b = balance(api)
    assert b["credits_remaining"] == 40_000 - (30 + 10 + 4)
    assert b["credits_used_this_period"] == 44
    assert UsageEvent.objects.filter(org=org).count() == 3
    assert_ledger_consistent(org.pk)


def test_a_batch_of_1000_events_is_accepted(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = send(api, *(event(f"e{i}", units=1) for i in range(1_000)))

    assert response.status_code == 202
    assert response.json() == {"accepted": 1_000, "duplicates": 0}
    assert credits_left(org) == 40_000 - 1_000
    assert_ledger_consistent(org.pk)


def test_the_same_id_twice_in_a_batch_counts_once(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = send(api, event("dup", units=7), event("dup", units=7), event("other", units=1))

    assert response.json() == {"accepted": 2, "duplicates": 1}
    assert credits_left(org) == 40_000 - 8
    assert UsageEvent.objects.filter(org=org).count() == 2
    assert_ledger_consistent(org.pk)


def test_resending_a_batch_is_all_duplicates_and_charges_nothing_more(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    batch = [event("r-1", units=3), event("r-2", units=4)]
    assert send(api, *batch).json() == {"accepted": 2, "duplicates": 0}
    before = balance(api)

    response = send(api, *batch)

    assert response.status_code == 202
    assert response.json() == {"accepted": 0, "duplicates": 2}
    assert balance(api) == before
    assert credits_left(org) == 40_000 - 7
    assert_ledger_consistent(org.pk)


def test_an_event_id_counts_once_ever_even_with_other_units(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    send(api, event("once", units=3))

    response = send(api, event("once", units=300), event("new", units=2))

    assert response.json() == {"accepted": 1, "duplicates": 1}
    assert credits_left(org) == 40_000 - 5
    assert UsageEvent.objects.get(org=org, event_id="once").units == 3
    assert_ledger_consistent(org.pk)


def test_event_ids_are_unique_per_organisation_not_globally(api_for):
    one, two = OrgFactory(plan="starter"), OrgFactory(plan="starter")
    send(api_for(one.raw_key), event("same-id", units=3))

    response = send(api_for(two.raw_key), event("same-id", units=4))

    assert response.json() == {"accepted": 1, "duplicates": 0}
    assert credits_left(one) == 40_000 - 3
    assert credits_left(two) == 40_000 - 4
    assert_ledger_consistent(one.pk)
    assert_ledger_consistent(two.pk)


def test_events_are_dated_by_the_day_they_were_charged_not_their_timestamp(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    today = clock.today().isoformat()

    send(api, event("old", units=12, timestamp="2020-02-29T23:59:59+05:00"))

    usage = api.get("usage", {"group_by": "day", "start": today, "end": today}).json()
    assert usage["rows"] == [{"key": today, "credits": 12, "units": 12}]
    stored = UsageEvent.objects.get(org=org, event_id="old")
    assert stored.timestamp.isoformat() == "2020-02-29T18:59:59+00:00"  # kept for the record
    assert stored.charged_on.isoformat() == today
    assert_ledger_consistent(org.pk)


def test_usage_shows_events_by_product_and_mode(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    send(
        api,
        event("a", units=60),
        event("b", units=10, product="extract", mode="base"),
        event("c", units=10, mode="ocr"),
    )

    by_mode = api.get("usage", {"group_by": "mode"}).json()
    by_product = api.get("usage", {"group_by": "product"}).json()

    assert by_mode["total_credits"] == by_product["total_credits"] == 90
    assert sorted(by_mode["rows"], key=lambda r: r["key"]) == [
        {"key": "audio", "credits": 60, "units": 60},
        {"key": "base", "credits": 20, "units": 10},
        {"key": "ocr", "credits": 10, "units": 10},
    ]
    assert sorted(by_product["rows"], key=lambda r: r["key"]) == [
        {"key": "extract", "credits": 20, "units": 10},
        {"key": "parse", "credits": 70, "units": 70},
    ]
    assert_ledger_consistent(org.pk)


# --- running out ------------------------------------------------------------------------------


def test_free_plan_batch_the_balance_does_not_fully_cover_is_402_and_counts_nothing(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    send(api, event("first", units=9_000))
    ledger_before = LedgerEntry.objects.filter(org=org).count()

    response = send(api, event("covered", units=999), event("not-covered", units=2))

    error = assert_error(response, 402, "INSUFFICIENT_CREDITS")
    assert error["message"] == "You've exceeded the maximum number of credits for your plan"
    assert set(UsageEvent.objects.filter(org=org).values_list("event_id", flat=True)) == {"first"}
    assert LedgerEntry.objects.filter(org=org).count() == ledger_before
    assert credits_left(org) == 1_000
    b = balance(api)
    assert (b["credits_remaining"], b["credits_used_this_period"]) == (1_000, 9_000)
    assert_ledger_consistent(org.pk)


def test_free_plan_refused_batch_can_be_resent_once_it_fits(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    batch = [event("x-1", units=6_000), event("x-2", units=4_001)]
    assert_error(send(api, *batch), 402, "INSUFFICIENT_CREDITS")

    response = send(api, event("x-1", units=6_000), event("x-2", units=4_000))

    assert response.json() == {"accepted": 2, "duplicates": 0}  # nothing of the refusal was kept
    assert credits_left(org) == 0
    assert_error(send(api, event("x-3", units=1)), 402, "INSUFFICIENT_CREDITS")
    assert send(api, event("x-1", units=6_000)).json() == {"accepted": 0, "duplicates": 1}
    assert_ledger_consistent(org.pk)


def test_free_plan_batch_exactly_covered_by_the_balance_is_accepted(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)

    response = send(api, event("all", units=10_000))

    assert response.status_code == 202
    b = balance(api)
    assert (b["credits_remaining"], b["credits_used_this_period"], b["buckets"]) == (0, 10_000, [])
    assert b["overage"] == {"enabled": False, "credits": 0, "amount": "0.00", "cap": None}
    assert_ledger_consistent(org.pk)


def test_paid_plan_batch_beyond_the_balance_goes_into_overage(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = send(api, event("big", units=40_000), event("over", units=1_252))

    assert response.status_code == 202
    assert response.json() == {"accepted": 2, "duplicates": 0}
    b = balance(api)
    assert b["credits_remaining"] == 0
    assert b["credits_used_this_period"] == 41_252
    assert b["overage"] == {"enabled": True, "credits": 1_252, "amount": "1.57", "cap": None}
    assert b["buckets"] == []
    assert_ledger_consistent(org.pk)


def test_paid_plan_overage_adds_up_across_batches_pro_rata(api_for):
    org = OrgFactory(plan="starter", monthly_credits=1_000)
    api = api_for(org.raw_key)

    send(api, event("a", units=1_500))
    send(api, event("b", units=752))

    b = balance(api)
    assert b["overage"]["credits"] == 1_252
    assert b["overage"]["amount"] == "1.57"  # $1.565 rounded half-up once
    assert_ledger_consistent(org.pk)


def test_paid_plan_batch_beyond_the_overage_cap_is_402_and_counts_nothing(api_for):
    org = OrgFactory(plan="starter", monthly_credits=1_000)
    org.subscription.overage_cap_cents = 100  # $1.00 = 800 credits of overage
    org.subscription.save(update_fields=["overage_cap_cents"])
    api = api_for(org.raw_key)

    refused = send(api, event("a", units=1_000), event("b", units=801))
    accepted = send(api, event("a", units=1_000), event("b", units=800))

    assert_error(refused, 402, "INSUFFICIENT_CREDITS")
    assert accepted.json() == {"accepted": 2, "duplicates": 0}
    b = balance(api)
    assert b["overage"] == {"enabled": True, "credits": 800, "amount": "1.00", "cap": "1.00"}
    assert_ledger_consistent(org.pk)


def test_a_refused_batch_leaves_no_rollups(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)

    assert_error(send(api, event("too-much", units=10_001)), 402, "INSUFFICIENT_CREDITS")

    assert not UsageRollup.objects.filter(org=org).exists()
    assert not UsageEvent.objects.filter(org=org).exists()
    assert credits_left(org) == 10_000
    assert_ledger_consistent(org.pk)
