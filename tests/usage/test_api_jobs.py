"""POST /api/v1/jobs, its complete / fail and GET (DESIGN §3 and §7): what a job holds, what it
charges, what failing costs, idempotency, and whose jobs a key can see."""

import json
import uuid

import pytest

from billing_site.errors import FREE_CREDITS_EXHAUSTED
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage.api_support import assert_error, balance, credits_left
from usage.models import Bucket, CreditAccount, Job, JobStatus
from usage.services import MB, lot_grant

pytestmark = pytest.mark.django_db

PDF_50 = {"product": "parse", "mode": "base", "pages": 50, "file_type": "pdf", "file_size": 2 * MB}


def job_body(**changes):
    return {**PDF_50, **changes}


def start(api, headers=None, **changes):
    response = api.post("jobs", job_body(**changes), headers=headers)
    assert response.status_code == 201, response.content
    return response.json()


def exhaust(api, org, pages):
    """Spends `pages` credits with a parse/base job that succeeds."""
    job = start(api, pages=pages)
    assert api.post(f"jobs/{job['id']}/complete").status_code == 200
    return job


# --- what a job holds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reserved"),
    [
        ({}, 50),  # Parse base: 1 credit a page
        ({"ocr": True}, 100),  # OCR adds 1 a page
        ({"mode": "advanced"}, 150),  # advanced: 3 a page
        ({"mode": "advanced", "ocr": True}, 200),
        ({"product": "extract"}, 100),  # Extract: 2 a page
        ({"product": "extract", "ocr": True}, 150),
        ({"product": "classify"}, 50),
        ({"product": "split"}, 50),
        ({"product": "index"}, 50),
    ],
)
def test_a_50_page_job_holds_its_estimated_credits(api_for, changes, reserved):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    job = start(api, **changes)

    assert job == {"id": job["id"], "status": "running", "credits_reserved": reserved}
    assert uuid.UUID(job["id"])
    b = balance(api)
    assert b["credits_remaining"] == 40_000 - reserved  # holds count against the balance
    assert b["credits_used_this_period"] == 0  # ... but are not usage until charged
    assert credits_left(org) == 40_000 - reserved
    assert_ledger_consistent(org.pk)


def test_mode_defaults_to_base_and_ocr_to_false(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    body = {"product": "parse", "pages": 50, "file_type": "pdf", "file_size": 1000}

    job = api.post("jobs", body).json()

    detail = api.get(f"jobs/{job['id']}").json()
    assert (detail["mode"], detail["ocr"], detail["credits_reserved"]) == ("base", False, 50)
    assert_ledger_consistent(org.pk)


def test_get_job_returns_the_job(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, ocr=True, file_type="docx", file_size=12345)

    response = api.get(f"jobs/{job['id']}")

    assert response.status_code == 200
    detail = response.json()
    assert detail.pop("created_at").endswith("Z")
    assert detail == {
        "id": job["id"],
        "status": "running",
        "product": "parse",
        "mode": "base",
        "ocr": True,
        "pages": 50,
        "file_type": "docx",
        "file_size": 12345,
        "credits_reserved": 100,
        "credits_charged": 0,
        "finished_at": None,
    }
    assert_ledger_consistent(org.pk)


def test_a_job_of_100000_pages_is_accepted(api_for):
    org = OrgFactory(plan="pro")
    api = api_for(org.raw_key)

    assert start(api, pages=100_000)["credits_reserved"] == 100_000
    assert_ledger_consistent(org.pk)


# --- completing -------------------------------------------------------------------------------


def test_complete_without_pages_charges_the_hold(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, ocr=True)

    response = api.post(f"jobs/{job['id']}/complete")

    assert response.status_code == 200
    assert response.json() == {"id": job["id"], "status": "succeeded", "credits_charged": 100}
    b = balance(api)
    assert b["credits_remaining"] == 39_900
    assert b["credits_used_this_period"] == 100
    assert b["buckets"] == [{"bucket": "plan", "credits": 39_900, "expires_at": b["period_end"]}]
    assert b["overage"] == {"enabled": True, "credits": 0, "amount": "0.00", "cap": None}
    detail = api.get(f"jobs/{job['id']}").json()
    assert detail["status"] == "succeeded"
    assert detail["credits_charged"] == 100
    assert detail["finished_at"] is not None
    assert_ledger_consistent(org.pk)


def test_complete_with_fewer_pages_charges_less_and_releases_the_rest(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, ocr=True)  # holds 100

    response = api.post(f"jobs/{job['id']}/complete", {"pages": 20})

    assert response.json() == {"id": job["id"], "status": "succeeded", "credits_charged": 40}
    b = balance(api)
    assert b["credits_remaining"] == 40_000 - 40
    assert b["credits_used_this_period"] == 40
    assert_ledger_consistent(org.pk)


def test_complete_with_more_pages_than_held_never_charges_more_than_the_hold(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, mode="advanced")  # holds 150

    response = api.post(f"jobs/{job['id']}/complete", {"pages": 80})

    assert response.json()["credits_charged"] == 150
    assert balance(api)["credits_remaining"] == 40_000 - 150
    assert_ledger_consistent(org.pk)


def test_complete_with_pages_null_charges_the_hold(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api)

    assert api.post(f"jobs/{job['id']}/complete", {"pages": None}).json()["credits_charged"] == 50
    assert_ledger_consistent(org.pk)


def test_usage_by_mode_shows_ocr_credits_as_mode_ocr(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, ocr=True)
    api.post(f"jobs/{job['id']}/complete", {"pages": 30})

    by_mode = api.get("usage", {"group_by": "mode"}).json()
    by_product = api.get("usage", {"group_by": "product"}).json()

    assert by_mode["total_credits"] == 60
    assert sorted(by_mode["rows"], key=lambda r: r["key"]) == [
        {"key": "base", "credits": 30, "units": 30},
        {"key": "ocr", "credits": 30, "units": 30},
    ]
    assert by_product["rows"] == [{"key": "parse", "credits": 60, "units": 60}]
    assert_ledger_consistent(org.pk)


def test_running_and_failed_jobs_do_not_show_in_usage(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    start(api)
    failed = start(api)
    api.post(f"jobs/{failed['id']}/fail")

    usage = api.get("usage", {"group_by": "product"}).json()

    assert (usage["total_credits"], usage["rows"]) == (0, [])
    assert_ledger_consistent(org.pk)


def test_completing_twice_returns_the_same_body_and_charges_once(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api)

    first = api.post(f"jobs/{job['id']}/complete", {"pages": 10})
    again = api.post(f"jobs/{job['id']}/complete", {"pages": 40})
    bare = api.post(f"jobs/{job['id']}/complete")

    assert first.status_code == again.status_code == bare.status_code == 200
    assert first.json() == again.json() == bare.json()
    assert first.json()["credits_charged"] == 10
    b = balance(api)
    assert (b["credits_remaining"], b["credits_used_this_period"]) == (40_000 - 10, 10)
    assert_ledger_consistent(org.pk)


# --- failing ----------------------------------------------------------------------------------


def test_a_failed_job_costs_nothing(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api, mode="advanced", ocr=True)
    assert credits_left(org) == 40_000 - 200

    response = api.post(f"jobs/{job['id']}/fail")

    assert response.status_code == 200
    assert response.json() == {"id": job["id"], "status": "failed", "credits_charged": 0}
    b = balance(api)
    assert (b["credits_remaining"], b["credits_used_this_period"]) == (40_000, 0)
    detail = api.get(f"jobs/{job['id']}").json()
    assert (detail["status"], detail["credits_charged"]) == ("failed", 0)
    assert_ledger_consistent(org.pk)


def test_failing_twice_returns_the_same_answer(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api)

    first = api.post(f"jobs/{job['id']}/fail")
    again = api.post(f"jobs/{job['id']}/fail")

    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"id": job["id"], "status": "failed", "credits_charged": 0}
    assert credits_left(org) == 40_000
    assert_ledger_consistent(org.pk)


def test_failing_a_completed_job_is_409_and_keeps_the_charge(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api)
    api.post(f"jobs/{job['id']}/complete")

    response = api.post(f"jobs/{job['id']}/fail")

    assert_error(response, 409, "CONFLICT")
    assert api.get(f"jobs/{job['id']}").json()["status"] == "succeeded"
    assert credits_left(org) == 40_000 - 50
    assert_ledger_consistent(org.pk)


def test_completing_a_failed_job_is_409_and_charges_nothing(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = start(api)
    api.post(f"jobs/{job['id']}/fail")

    response = api.post(f"jobs/{job['id']}/complete", {"pages": 10})

    assert_error(response, 409, "CONFLICT")
    assert api.get(f"jobs/{job['id']}").json()["status"] == "failed"
    assert credits_left(org) == 40_000
    assert_ledger_consistent(org.pk)


# --- running out: Free 402, paid overage --------------------------------------------------------


def test_free_plan_out_of_credits_gets_402_with_the_exact_envelope(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    exhaust(api, org, 10_000)
    assert balance(api)["credits_remaining"] == 0

    response = api.post("jobs", job_body(pages=1))

    assert response.status_code == 402
    body = response.json()
    assert body == {
        "success": False,
        "error": {
            "code": "INSUFFICIENT_CREDITS",
            "message": "You've exceeded the maximum number of credits for your plan",
            "request_id": response["X-Request-Id"],
            "details": body["error"]["details"],
        },
    }
    assert body["error"]["message"] == FREE_CREDITS_EXHAUSTED
    assert "\u2019" not in response.content.decode()  # a plain ASCII apostrophe
    assert body["error"]["request_id"].startswith("req_")
    assert isinstance(body["error"]["details"], dict)
    assert Job.objects.filter(org=org).count() == 1
    assert_ledger_consistent(org.pk)


def test_free_plan_holds_count_so_parallel_jobs_cannot_overspend(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    first = start(api, pages=6_000)

    response = api.post("jobs", job_body(pages=5_000))

    assert_error(response, 402, "INSUFFICIENT_CREDITS")
    assert start(api, pages=4_000)["credits_reserved"] == 4_000
    assert balance(api)["credits_remaining"] == 0
    api.post(f"jobs/{first['id']}/fail")
    assert balance(api)["credits_remaining"] == 6_000
    assert_ledger_consistent(org.pk)


def test_free_plan_can_spend_purchased_credits_after_its_plan_credits(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    exhaust(api, org, 10_000)
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=8_000, source="purchase:test")

    job = start(api, pages=50)

    assert job["credits_reserved"] == 50
    assert balance(api)["buckets"] == [{"bucket": "purchased", "credits": 7_950, "expires_at": None}]
    assert_ledger_consistent(org.pk)


def test_paid_plan_job_beyond_its_credits_goes_into_overage_when_charged(api_for):
    org = OrgFactory(plan="starter", monthly_credits=100)
    api = api_for(org.raw_key)
    job = start(api, pages=150)

    held = balance(api)
    assert held["credits_remaining"] == 0
    assert held["overage"]["credits"] == 0  # holds are not overage until charged

    api.post(f"jobs/{job['id']}/complete")

    b = balance(api)
    assert b["credits_remaining"] == 0
    assert b["credits_used_this_period"] == 150
    assert b["overage"] == {"enabled": True, "credits": 50, "amount": "0.06", "cap": None}
    assert b["buckets"] == []
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize(
    ("pages", "charged_overage", "left"),
    [(None, 50, 0), (120, 20, 0), (100, 0, 0), (80, 0, 20)],
)
def test_completing_a_job_held_partly_in_overage_charges_the_lots_first(
    api_for, pages, charged_overage, left
):
    org = OrgFactory(plan="starter", monthly_credits=100)
    api = api_for(org.raw_key)
    job = start(api, pages=150)  # 100 from the lots, 50 beyond them

    response = api.post(f"jobs/{job['id']}/complete", {"pages": pages})

    assert response.json()["credits_charged"] == (pages or 150)
    b = balance(api)
    assert (b["credits_remaining"], b["overage"]["credits"]) == (left, charged_overage)
    assert b["credits_used_this_period"] == (pages or 150)
    assert_ledger_consistent(org.pk)


def test_failing_a_job_held_partly_in_overage_releases_all_of_it(api_for):
    org = OrgFactory(plan="starter", monthly_credits=100)
    api = api_for(org.raw_key)
    job = start(api, pages=150)

    api.post(f"jobs/{job['id']}/fail")

    b = balance(api)
    assert (b["credits_remaining"], b["credits_used_this_period"], b["overage"]["credits"]) == (100, 0, 0)
    assert CreditAccount.objects.get(org=org).overage_held == 0
    assert_ledger_consistent(org.pk)


def test_paid_plan_held_overage_counts_against_the_overage_cap(api_for):
    org = OrgFactory(plan="starter", monthly_credits=100)
    org.subscription.overage_cap_cents = 100  # $1.00 = 800 credits of overage
    org.subscription.save(update_fields=["overage_cap_cents"])
    api = api_for(org.raw_key)
    first = start(api, pages=800)  # 700 credits of overage held

    assert_error(api.post("jobs", job_body(pages=101)), 402, "INSUFFICIENT_CREDITS")
    assert start(api, pages=100)["credits_reserved"] == 100
    api.post(f"jobs/{first['id']}/fail")
    assert start(api, pages=700)["credits_reserved"] == 700
    assert_ledger_consistent(org.pk)


def test_paid_plan_with_overage_turned_off_gets_402_when_its_credits_are_gone(api_for):
    org = OrgFactory(plan="pro", monthly_credits=100)
    org.subscription.overage_enabled = False
    org.subscription.save(update_fields=["overage_enabled"])
    api = api_for(org.raw_key)

    assert_error(api.post("jobs", job_body(pages=101)), 402, "INSUFFICIENT_CREDITS")
    assert start(api, pages=100)["credits_reserved"] == 100
    assert balance(api)["overage"]["enabled"] is False
    assert_ledger_consistent(org.pk)


def test_paid_plan_job_beyond_its_overage_cap_is_402(api_for):
    org = OrgFactory(plan="starter", monthly_credits=100)
    org.subscription.overage_cap_cents = 100  # $1.00 = 800 credits at $1.25 / 1,000
    org.subscription.save(update_fields=["overage_cap_cents"])
    api = api_for(org.raw_key)

    refused = api.post("jobs", job_body(pages=901))
    accepted = api.post("jobs", job_body(pages=900))

    assert_error(refused, 402, "INSUFFICIENT_CREDITS")
    assert accepted.status_code == 201
    assert Job.objects.filter(org=org).count() == 1
    assert_ledger_consistent(org.pk)


# --- file size limits: 413 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_type", "megabytes"), [("pdf", 100), ("docx", 50), ("xlsx", 50), ("pptx", 100)]
)
def test_a_file_exactly_at_its_size_limit_is_accepted(api_for, file_type, megabytes):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    job = start(api, file_type=file_type, file_size=megabytes * MB)

    assert job["credits_reserved"] == 50
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize(
    ("file_type", "megabytes"), [("pdf", 100), ("docx", 50), ("xlsx", 50), ("pptx", 100)]
)
def test_a_file_one_byte_over_its_size_limit_is_413(api_for, file_type, megabytes):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = api.post("jobs", job_body(file_type=file_type, file_size=megabytes * MB + 1))

    error = assert_error(response, 413, "FILE_TOO_LARGE")
    assert f"{megabytes} MB" in error["message"]
    assert not Job.objects.filter(org=org).exists()
    assert credits_left(org) == 40_000
    assert_ledger_consistent(org.pk)


def test_file_size_is_checked_before_credits(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    exhaust(api, org, 10_000)

    assert_error(api.post("jobs", job_body(file_size=100 * MB + 1)), 413, "FILE_TOO_LARGE")
    assert_ledger_consistent(org.pk)


# --- Idempotency-Key --------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_the_original_201_and_holds_once(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "order-7-page-run"}

    first = api.post("jobs", job_body(), headers=key)
    again = api.post("jobs", job_body(), headers=key)

    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert Job.objects.filter(org=org).count() == 1
    assert credits_left(org) == 40_000 - 50
    assert_ledger_consistent(org.pk)


def test_idempotency_body_match_ignores_key_order_spacing_and_defaults(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "k1"}
    first = api.post("jobs", job_body(), headers=key).json()
    reordered = json.dumps({k: PDF_50[k] for k in reversed(PDF_50)} | {"ocr": False}, indent=2)

    again = api.post("jobs", raw=reordered, headers=key)

    assert again.status_code == 201
    assert again.json() == first
    assert Job.objects.filter(org=org).count() == 1
    assert_ledger_consistent(org.pk)


def test_replayed_idempotency_key_answers_the_original_body_after_the_job_finished(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "k1"}
    first = api.post("jobs", job_body(), headers=key).json()
    api.post(f"jobs/{first['id']}/complete")

    again = api.post("jobs", job_body(), headers=key)

    assert again.status_code == 201
    assert again.json() == first
    assert credits_left(org) == 40_000 - 50
    assert_ledger_consistent(org.pk)


def test_same_idempotency_key_with_a_different_body_is_409_even_when_credits_are_gone(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "k1"}
    original = api.post("jobs", job_body(pages=1), headers=key).json()
    exhaust(api, org, 9_999)
    assert balance(api)["credits_remaining"] == 0

    different = api.post("jobs", job_body(pages=2), headers=key)
    same = api.post("jobs", job_body(pages=1), headers=key)

    assert_error(different, 409, "CONFLICT")
    assert same.status_code == 201
    assert same.json() == original
    assert Job.objects.filter(org=org).count() == 2
    assert_ledger_consistent(org.pk)


def test_idempotency_key_is_checked_before_the_concurrent_jobs_limit(api_for):
    org = OrgFactory(plan="starter", concurrent_jobs=1)
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "k1"}
    first = api.post("jobs", job_body(), headers=key).json()

    assert api.post("jobs", job_body(), headers=key).json() == first
    assert_error(api.post("jobs", job_body(pages=2), headers=key), 409, "CONFLICT")
    assert_error(api.post("jobs", job_body()), 429, "RESOURCE_EXHAUSTED")
    assert_ledger_consistent(org.pk)


def test_a_request_refused_for_credits_stores_nothing_and_its_key_can_be_retried(api_for):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)
    exhaust(api, org, 10_000)
    key = {"Idempotency-Key": "retry-me"}

    assert_error(api.post("jobs", job_body(), headers=key), 402, "INSUFFICIENT_CREDITS")
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=8_000, source="purchase:test")
    retried = api.post("jobs", job_body(), headers=key)

    assert retried.status_code == 201
    assert retried.json()["credits_reserved"] == 50
    assert api.post("jobs", job_body(), headers=key).json() == retried.json()
    assert credits_left(org) == 8_000 - 50
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize(
    ("refused", "status", "code"),
    [
        (job_body(file_size=100 * MB + 1), 413, "FILE_TOO_LARGE"),
        (job_body(product="nope"), 400, "INVALID_ARGUMENT"),
        (job_body(pages=0), 400, "INVALID_ARGUMENT"),
    ],
)
def test_a_refused_request_stores_nothing_so_its_key_takes_another_body(api_for, refused, status, code):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    key = {"Idempotency-Key": "k1"}

    assert_error(api.post("jobs", refused, headers=key), status, code)
    retried = api.post("jobs", job_body(), headers=key)

    assert retried.status_code == 201
    assert Job.objects.filter(org=org).count() == 1
    assert_ledger_consistent(org.pk)


def test_a_request_refused_by_the_concurrent_jobs_limit_can_be_retried_with_its_key(api_for):
    org = OrgFactory(plan="starter", concurrent_jobs=1)
    api = api_for(org.raw_key)
    running = start(api)
    key = {"Idempotency-Key": "k1"}

    assert_error(api.post("jobs", job_body(pages=7), headers=key), 429, "RESOURCE_EXHAUSTED")
    api.post(f"jobs/{running['id']}/complete")
    retried = api.post("jobs", job_body(pages=7), headers=key)

    assert retried.status_code == 201
    assert retried.json()["credits_reserved"] == 7
    assert_ledger_consistent(org.pk)


def test_idempotency_keys_belong_to_one_organisation(api_for):
    one, two = OrgFactory(plan="starter"), OrgFactory(plan="starter")
    key = {"Idempotency-Key": "shared"}

    first = api_for(one.raw_key).post("jobs", job_body(), headers=key).json()
    second = api_for(two.raw_key).post("jobs", job_body(pages=3), headers=key)

    assert second.status_code == 201
    assert second.json()["id"] != first["id"]
    assert second.json()["credits_reserved"] == 3
    assert_ledger_consistent(one.pk)
    assert_ledger_consistent(two.pk)


@pytest.mark.parametrize("length", [1, 255])
def test_idempotency_key_of_1_to_255_characters_is_accepted(api_for, length):
    org = OrgFactory(plan="starter")
    response = api_for(org.raw_key).post("jobs", job_body(), headers={"Idempotency-Key": "k" * length})
    assert response.status_code == 201
    assert Job.objects.get(org=org).idempotency_key == "k" * length
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize("key", ["k" * 256, ""])
def test_idempotency_key_longer_than_255_or_empty_is_400(api_for, key):
    org = OrgFactory(plan="starter")
    response = api_for(org.raw_key).post("jobs", job_body(), headers={"Idempotency-Key": key})
    assert_error(response, 400, "INVALID_ARGUMENT")
    assert not Job.objects.filter(org=org).exists()
    assert credits_left(org) == 40_000


# --- whose job: 404, never 403 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "jobs/{id}"), ("post", "jobs/{id}/complete"), ("post", "jobs/{id}/fail")],
)
def test_another_organisations_job_is_404(api_for, method, path):
    owner, other = OrgFactory(plan="starter"), OrgFactory(plan="starter")
    job = start(api_for(owner.raw_key))

    response = getattr(api_for(other.raw_key), method)(path.format(id=job["id"]))

    assert_error(response, 404, "NOT_FOUND")
    assert Job.objects.get(pk=job["id"]).status == JobStatus.RUNNING
    assert credits_left(owner) == 40_000 - 50
    assert credits_left(other) == 40_000
    assert_ledger_consistent(owner.pk)
    assert_ledger_consistent(other.pk)


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "jobs/{id}"), ("post", "jobs/{id}/complete"), ("post", "jobs/{id}/fail")],
)
@pytest.mark.parametrize(
    "job_id",
    ["nope", "123", "00000000-0000-4000-8000-000000000000", "0" * 40, "00000000-0000-0000-0000-00000000000g"],
)
def test_an_unknown_or_malformed_job_id_is_404(api_for, method, path, job_id):
    org = OrgFactory(plan="starter")
    response = getattr(api_for(org.raw_key), method)(path.format(id=job_id))
    error = assert_error(response, 404, "NOT_FOUND")
    assert error["message"]


def test_a_job_in_an_audio_mode_is_400(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = api.post("jobs", job_body(mode="audio"))

    assert_error(response, 400, "INVALID_ARGUMENT")
    assert not Job.objects.filter(org=org).exists()
    assert credits_left(org) == 40_000


@pytest.mark.postgres
def test_the_hot_statements_are_prepared_once_they_repeat(api_for):
    """The API-key lookup and the hold and end functions are planned once per connection
    (billing_site.rows.planned_cursor), not on every request."""
    from django.db import connection

    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    for _ in range(6):  # psycopg prepares a statement on its sixth run
        job = start(api)
        assert api.post(f"jobs/{job['id']}/complete", {"pages": 1}).status_code == 200

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    for statement in ("FROM accounts_apikey k", "usage_job_start(", "usage_job_end("):
        assert any(statement in text for text in prepared), (statement, prepared)
