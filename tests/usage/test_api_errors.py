"""What every /api/v1/ answer shares (DESIGN §7): the error envelope, 400s for bad input that
change nothing, 401s, stray 404 / 405 / 500s, the RateLimit-* and X-Request-Id headers, and
429s for the RPM and concurrent-jobs limits."""

import json
import math
import re
import time
import uuid

import pytest
from django.db import connection
from django.test import Client

from accounts.models import ApiKey
from accounts.services import api_key_revoke
from tests.conftest import ApiClient
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage.api_support import assert_error
from usage import api_middleware, rate_limits
from usage.models import CreditAccount, Job, JobStatus, LedgerEntry, UsageEvent, UsageRollup
from usage.services import MB

pytestmark = pytest.mark.django_db

JOB = {"product": "parse", "mode": "base", "ocr": False, "pages": 10, "file_type": "pdf", "file_size": MB}
MISSING = object()


def assert_api_headers(response, limit, before, after):
    """RateLimit-* and X-Request-Id, on any answer; `before`/`after` bracket the request."""
    assert int(response["RateLimit-Limit"]) == limit
    assert 0 <= int(response["RateLimit-Remaining"]) <= limit
    reset = int(response["RateLimit-Reset"])
    assert before < reset <= after + 60  # a Unix time within the next 60 seconds
    assert re.fullmatch(r"req_[0-9a-f]{24}", response["X-Request-Id"])


def state(org):
    """Everything a refused request must leave alone."""
    account = CreditAccount.objects.get(org=org)
    return {
        "balance": account.balance,
        "running_jobs": account.running_jobs,
        "overage_held": account.overage_held,
        "jobs": list(Job.objects.filter(org=org).values_list("id", "status", "credits_charged")),
        "events": UsageEvent.objects.filter(org=org).count(),
        "entries": LedgerEntry.objects.filter(org=org).count(),
        "rollups": UsageRollup.objects.filter(org=org).count(),
    }


def raw_object(base, **fields):
    """A JSON object as text: `base`'s fields, with some replaced by JSON text (or MISSING)."""
    texts = {name: json.dumps(value) for name, value in base.items()}
    for name, text in fields.items():
        if text is MISSING:
            texts.pop(name, None)
        else:
            texts[name] = text
    return "{" + ", ".join(f"{json.dumps(name)}: {text}" for name, text in texts.items()) + "}"


def anonymous(**headers):
    """A client from an address of its own, so anonymous limits do not leak between tests."""
    address = "2001:db8:" + ":".join(re.findall("....", uuid.uuid4().hex)[:6])
    return Client(REMOTE_ADDR=address, headers=headers), address


@pytest.fixture
def frozen_time(monkeypatch):
    """Stops the clock the rate limiter and the middleware read, so a window cannot roll over."""

    class Frozen:
        now = time.time()

        def time(self):
            return self.now

    frozen = Frozen()
    monkeypatch.setattr(rate_limits, "time", frozen)
    monkeypatch.setattr(api_middleware, "time", frozen)
    return frozen


# --- bad input: 400 INVALID_ARGUMENT, and nothing changes -------------------------------------

BAD_JOBS = {
    "malformed JSON": '{"product": "parse", "pages": ',
    "form encoded": "product=parse&pages=10",
    "not UTF-8": b'{"product": "\xff\xfe"}',
    "JSON array": json.dumps([JOB]),
    "JSON string": json.dumps("parse"),
    "JSON number": "42",
    "JSON null": "null",
    "empty body": "",
    "empty object": "{}",
    "unknown product": raw_object(JOB, product='"translate"'),
    "empty product": raw_object(JOB, product='""'),
    "product not a string": raw_object(JOB, product="1"),
    "unknown mode": raw_object(JOB, mode='"turbo"'),
    "mode of another product": raw_object(JOB, product='"extract"', mode='"advanced"'),
    "mode ocr": raw_object(JOB, mode='"ocr"'),
    "ocr as a string": raw_object(JOB, ocr='"true"'),
    "ocr as a number": raw_object(JOB, ocr="1"),
    "ocr null": raw_object(JOB, ocr="null"),
    "pages 0": raw_object(JOB, pages="0"),
    "pages -1": raw_object(JOB, pages="-1"),
    "pages 100001": raw_object(JOB, pages="100001"),
    "pages a string": raw_object(JOB, pages='"10"'),
    "pages 10.0": raw_object(JOB, pages="10.0"),
    "pages 1e3": raw_object(JOB, pages="1e3"),
    "pages true": raw_object(JOB, pages="true"),
    "pages null": raw_object(JOB, pages="null"),
    "pages a list": raw_object(JOB, pages="[10]"),
    "pages huge": raw_object(JOB, pages="1" + "0" * 40),
    "pages NaN": raw_object(JOB, pages="NaN"),
    "pages Infinity": raw_object(JOB, pages="Infinity"),
    "file_size 1e400": raw_object(JOB, file_size="1e400"),
    "product with a lone surrogate": raw_object(JOB, product='"\\ud800"'),
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "file_size a string": raw_object(JOB, file_size='"1"'),
    "file_size 0": raw_object(JOB, file_size="0"),
    "file_size -5": raw_object(JOB, file_size="-5"),
    "file_size 1.5": raw_object(JOB, file_size="1.5"),
    "file_size true": raw_object(JOB, file_size="true"),
    "file_type exe": raw_object(JOB, file_type='"exe"'),
    "file_type upper case": raw_object(JOB, file_type='"PDF"'),
    "file_type null": raw_object(JOB, file_type="null"),
    "missing product": raw_object(JOB, product=MISSING),
    "missing pages": raw_object(JOB, pages=MISSING),
    "missing file_type": raw_object(JOB, file_type=MISSING),
    "missing file_size": raw_object(JOB, file_size=MISSING),
    "extra field": raw_object(JOB, priority='"high"'),
    "pages twice": raw_object(JOB)[:-1] + ', "pages": 100000}',
}


@pytest.mark.parametrize("raw", BAD_JOBS.values(), ids=BAD_JOBS.keys())
def test_a_bad_job_request_is_400_and_changes_nothing(api_for, raw):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    before = state(org)

    response = api.post("jobs", raw=raw, headers={"Idempotency-Key": "k1"})

    assert_error(response, 400, "INVALID_ARGUMENT")
    assert state(org) == before
    assert not Job.objects.filter(org=org).exists()
    assert api.post("jobs", JOB, headers={"Idempotency-Key": "k1"}).status_code == 201  # key not stored
    assert_ledger_consistent(org.pk)


def test_a_key_named_twice_is_400_saying_which(api_for):
    org = OrgFactory(plan="starter")
    events = '{"events": [{"id": "e1", "product": "parse", "units": 1, "units": 5, "timestamp": "2027-01-15T10:00:00Z"}]}'

    error = assert_error(api_for(org.raw_key).post("usage/events", raw=events), 400, "INVALID_ARGUMENT")

    assert error["message"] == 'Malformed JSON body: the key "units" appears twice in one object.'
    assert not UsageEvent.objects.filter(org=org).exists()


def test_an_empty_body_is_400_saying_a_json_object_is_required(api_for):
    org = OrgFactory(plan="starter")

    error = assert_error(api_for(org.raw_key).post("jobs", raw=""), 400, "INVALID_ARGUMENT")

    assert error["message"] == "A JSON object body is required."


def test_a_400_names_the_field_at_fault(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    error = assert_error(api.post("jobs", raw=raw_object(JOB, pages='"10"')), 400, "INVALID_ARGUMENT")

    assert error["message"].startswith("pages:")
    assert error["details"]["errors"][0]["loc"][-1] == "pages"


def test_a_date_given_as_a_number_is_400_saying_the_form_expected(api_for):
    org = OrgFactory(plan="starter")

    error = assert_error(api_for(org.raw_key).get("usage", {"end": "0"}), 400, "INVALID_ARGUMENT")

    assert error["message"] == "end: must be a date such as 2026-11-23"


BAD_COMPLETES = {
    "malformed JSON": "{",
    "JSON array": "[]",
    "pages 0": '{"pages": 0}',
    "pages -1": '{"pages": -1}',
    "pages a string": '{"pages": "10"}',
    "pages 10.0": '{"pages": 10.0}',
    "pages 1e3": '{"pages": 1e3}',
    "pages true": '{"pages": true}',
    "pages 100001": '{"pages": 100001}',
    "extra field": '{"pages": 5, "status": "succeeded"}',
}


@pytest.mark.parametrize("raw", BAD_COMPLETES.values(), ids=BAD_COMPLETES.keys())
def test_a_bad_complete_request_is_400_and_the_job_keeps_running(api_for, raw):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    job = api.post("jobs", JOB).json()
    before = state(org)

    response = api.post(f"jobs/{job['id']}/complete", raw=raw)

    assert_error(response, 400, "INVALID_ARGUMENT")
    assert state(org) == before
    assert Job.objects.get(pk=job["id"]).status == JobStatus.RUNNING
    assert_ledger_consistent(org.pk)


EVENT = {"id": "evt-1", "product": "parse", "mode": "audio", "units": 5, "timestamp": "2026-01-15T10:00:00Z"}


def events_raw(*event_texts, **top):
    return raw_object({"events": []}, events="[" + ", ".join(event_texts) + "]", **top)


BAD_EVENTS = {
    "malformed JSON": '{"events": [',
    "JSON array": json.dumps([EVENT]),
    "JSON string": json.dumps("events"),
    "empty body": "",
    "missing events": "{}",
    "events null": '{"events": null}',
    "events an object": json.dumps({"events": EVENT}),
    "empty events list": '{"events": []}',
    "1,001 events": json.dumps({"events": [{**EVENT, "id": f"e{i}"} for i in range(1_001)]}),
    "extra top-level field": events_raw(json.dumps(EVENT), dry_run="true"),
    "units 0": events_raw(raw_object(EVENT, units="0")),
    "units -1": events_raw(raw_object(EVENT, units="-1")),
    "units a string": events_raw(raw_object(EVENT, units='"5"')),
    "units 2.5": events_raw(raw_object(EVENT, units="2.5")),
    "units 5.0": events_raw(raw_object(EVENT, units="5.0")),
    "units true": events_raw(raw_object(EVENT, units="true")),
    "units null": events_raw(raw_object(EVENT, units="null")),
    "units beyond what can be stored": events_raw(raw_object(EVENT, units="100000000000000000000")),
    "units 2**31": events_raw(raw_object(EVENT, units=str(2**31))),
    "timestamp yesterday": events_raw(raw_object(EVENT, timestamp='"yesterday"')),
    "timestamp empty": events_raw(raw_object(EVENT, timestamp='""')),
    "timestamp null": events_raw(raw_object(EVENT, timestamp="null")),
    "timestamp a Unix time": events_raw(raw_object(EVENT, timestamp="1768471200")),
    "timestamp a Unix time in a string": events_raw(raw_object(EVENT, timestamp='"1768471200"')),
    "timestamp a date only": events_raw(raw_object(EVENT, timestamp='"2026-01-15"')),
    "timestamp 30 February": events_raw(raw_object(EVENT, timestamp='"2026-02-30T00:00:00Z"')),
    "timestamp past year 9999 in UTC": events_raw(raw_object(EVENT, timestamp='"9999-12-31T23:00:00-05:00"')),
    "timestamp before year 1 in UTC": events_raw(raw_object(EVENT, timestamp='"0001-01-01T00:00:00+05:00"')),
    "missing id": events_raw(raw_object(EVENT, id=MISSING)),
    "missing product": events_raw(raw_object(EVENT, product=MISSING)),
    "missing mode": events_raw(raw_object(EVENT, mode=MISSING)),
    "missing units": events_raw(raw_object(EVENT, units=MISSING)),
    "missing timestamp": events_raw(raw_object(EVENT, timestamp=MISSING)),
    "id empty": events_raw(raw_object(EVENT, id='""')),
    "id a number": events_raw(raw_object(EVENT, id="7")),
    "id of 256 characters": events_raw(raw_object(EVENT, id=json.dumps("x" * 256))),
    "id with a NUL": events_raw(raw_object(EVENT, id='"a\\u0000b"')),
    "id with a lone surrogate": events_raw(raw_object(EVENT, id='"x\\ud83d"')),
    "timestamp in full-width digits": events_raw(
        raw_object(EVENT, timestamp='"\uff12\uff10\uff12\uff16-01-15T10:00:00Z"')
    ),
    "unknown product": events_raw(raw_object(EVENT, product='"translate"')),
    "unknown mode": events_raw(raw_object(EVENT, mode='"turbo"')),
    "mode of another product": events_raw(raw_object(EVENT, product='"extract"', mode='"audio"')),
    "extra event field": events_raw(raw_object(EVENT, credits="5")),
    "one bad event among good ones": events_raw(
        json.dumps({**EVENT, "id": "good-1"}),
        raw_object(EVENT, id='"bad"', units="0"),
        json.dumps({**EVENT, "id": "good-2"}),
    ),
}


@pytest.mark.parametrize("raw", BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_a_bad_events_batch_is_400_and_counts_nothing(api_for, raw):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.client.raise_request_exception = False  # a 500 should fail on the status, not raise
    before = state(org)

    response = api.post("usage/events", raw=raw)

    assert_error(response, 400, "INVALID_ARGUMENT")
    assert state(org) == before
    assert not UsageEvent.objects.filter(org=org).exists()
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-01-15T10:00:00Z",
        "2026-01-15T12:00:00+02:00",
        "2026-01-15T10:00:00",
        "2026-01-15T10:00:00.123456Z",
    ],
)
def test_event_timestamps_are_kept_in_utc(api_for, timestamp):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    response = api.post("usage/events", {"events": [{**EVENT, "timestamp": timestamp}]})

    assert response.status_code == 202
    stored = UsageEvent.objects.get(org=org).timestamp
    assert stored.utcoffset().total_seconds() == 0
    assert stored.replace(microsecond=0).isoformat() == "2026-01-15T10:00:00+00:00"


BAD_USAGE_QUERIES = {
    "start month 13": {"start": "2026-13-01"},
    "end not a date": {"end": "soon"},
    "start empty": {"start": ""},
    "end a Unix time": {"end": "0"},
    "start in full-width digits": {"start": "\uff12\uff10\uff12\uff16-01-01"},
    "start a date and time": {"start": "2026-03-01T00:00:00"},
    "start after end": {"start": "2026-03-02", "end": "2026-03-01"},
    "group_by week": {"group_by": "week"},
    "more than 366 days": {"start": "2025-01-01", "end": "2026-01-02"},
    "default start before year 1": {"end": "0001-01-10"},
}


@pytest.mark.parametrize("query", BAD_USAGE_QUERIES.values(), ids=BAD_USAGE_QUERIES.keys())
def test_a_bad_usage_query_is_400(api_for, query):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.client.raise_request_exception = False

    assert_error(api.get("usage", query), 400, "INVALID_ARGUMENT")


# --- 401 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer garbage",
        "Bearer sk_00000000_" + "a" * 43,  # well formed, unknown
        "Basic dXNlcjpwYXNz",
    ],
    ids=["missing", "empty", "scheme only", "empty token", "garbage", "unknown key", "basic auth"],
)
def test_a_request_without_a_valid_key_is_401_with_the_headers(authorization, settings):
    client, _ = anonymous(**({"Authorization": authorization} if authorization is not None else {}))

    before = time.time()
    response = client.get("/api/v1/balance")

    error = assert_error(response, 401, "UNAUTHENTICATED")
    assert "API key" in error["message"]
    assert_api_headers(response, api_middleware.ANONYMOUS_RPM, before, time.time())


def test_a_revoked_key_is_401(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    assert api.get("balance").status_code == 200
    api_key_revoke(org_id=org.pk, key_id=ApiKey.objects.get(org=org).pk)

    before = time.time()
    response = api.get("balance")

    assert_error(response, 401, "UNAUTHENTICATED")
    assert_api_headers(response, api_middleware.ANONYMOUS_RPM, before, time.time())


def test_a_signed_in_browser_session_is_not_an_api_key(client):
    """The API answers Bearer keys only: the page middleware (sessions, CSRF, users, the page
    security policy) is skipped for /api/v1/, so a session cookie neither signs the call in nor
    touches the answer."""
    org = OrgFactory(plan="starter")
    client.force_login(org.memberships.get().user)

    response = client.get("/api/v1/balance")

    assert_error(response, 401, "UNAUTHENTICATED")
    assert "Set-Cookie" not in response and "Content-Security-Policy" not in response
    assert "Cookie" not in response.get("Vary", "")


def test_a_key_with_the_wrong_scheme_is_401(api_for):
    org = OrgFactory(plan="starter")
    client, _ = anonymous(Authorization=f"Token {org.raw_key}")
    assert_error(client.get("/api/v1/balance"), 401, "UNAUTHENTICATED")


def test_the_bearer_scheme_is_case_insensitive(api_for):
    org = OrgFactory(plan="starter")
    client, _ = anonymous(Authorization=f"bearer {org.raw_key}")
    assert client.get("/api/v1/balance").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/v1/balance", None),
        ("get", "/api/v1/usage", None),
        ("post", "/api/v1/jobs", "{not json"),
        ("post", "/api/v1/jobs", json.dumps(JOB)),
        ("get", "/api/v1/jobs/00000000-0000-4000-8000-000000000000", None),
        ("post", "/api/v1/jobs/00000000-0000-4000-8000-000000000000/complete", "{}"),
        ("post", "/api/v1/jobs/00000000-0000-4000-8000-000000000000/fail", "{}"),
        ("post", "/api/v1/usage/events", json.dumps({"events": [EVENT]})),
    ],
)
def test_every_endpoint_needs_a_key_before_anything_else(method, path, body):
    client, _ = anonymous()
    kwargs = {"data": body, "content_type": "application/json"} if method == "post" else {}
    response = getattr(client, method)(path, **kwargs)
    assert_error(response, 401, "UNAUTHENTICATED")
    assert not Job.objects.exists()
    assert not UsageEvent.objects.exists()


# --- stray paths, methods and 500s ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "nope"), ("post", "nope"), ("get", "balance/"), ("get", "jobs/"), ("get", "v2/balance")],
)
def test_an_unknown_api_path_is_a_404_envelope(api_for, method, path):
    org = OrgFactory(plan="starter")
    response = getattr(api_for(org.raw_key), method)(path)
    assert_error(response, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("get", "/api/v1/jobs", "POST"),
        ("delete", "/api/v1/balance", "GET"),
        ("put", "/api/v1/usage/events", "POST"),
        ("get", "/api/v1/jobs/00000000-0000-4000-8000-000000000000/complete", "POST"),
    ],
)
def test_a_wrong_method_is_405_with_the_envelope_and_allow(client, api_for, method, path, allowed):
    org = OrgFactory(plan="starter")

    response = getattr(client, method)(path, headers={"Authorization": f"Bearer {org.raw_key}"})

    error = assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert method.upper() in error["message"]
    assert response["Allow"] == allowed


def test_api_posts_need_no_csrf_token(api_for):
    org = OrgFactory(plan="starter")
    api = ApiClient(Client(enforce_csrf_checks=True), org.raw_key)

    assert api.post("jobs", JOB).status_code == 201
    assert api.post("usage/events", {"events": [EVENT]}).status_code == 202
    assert_ledger_consistent(org.pk)


def test_openapi_document_is_public_json_with_every_path():
    client, _ = anonymous()

    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    document = json.loads(response.content)
    assert document["openapi"].startswith("3.")
    assert {
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/complete",
        "/api/v1/jobs/{job_id}/fail",
        "/api/v1/balance",
        "/api/v1/usage",
        "/api/v1/usage/events",
    } <= set(document["paths"])
    assert "post" in document["paths"]["/api/v1/jobs"]
    assert "402" in document["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert response["X-Request-Id"].startswith("req_")
    assert response["RateLimit-Limit"] == str(api_middleware.ANONYMOUS_RPM)


def test_an_error_inside_a_view_is_a_500_envelope_and_writes_nothing(monkeypatch):
    org = OrgFactory(plan="starter")

    def broken(**kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr("usage.services.job_start", broken)
    api = ApiClient(Client(raise_request_exception=False), org.raw_key)
    before = state(org)

    started = time.time()
    response = api.post("jobs", JOB)

    error = assert_error(response, 500, "INTERNAL")
    assert "database" not in error["message"]  # no internals leak
    assert_api_headers(response, 120, started, time.time())
    assert state(org) == before
    assert_ledger_consistent(org.pk)


def test_a_request_body_over_the_upload_limit_is_400_not_500(api_for, settings):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    api.client.raise_request_exception = False
    padded = json.dumps({"events": [EVENT]}) + " " * settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    before = state(org)

    response = api.post("usage/events", raw=padded)

    error = assert_error(response, 400, "INVALID_ARGUMENT")
    assert "larger than" in error["message"]
    assert state(org) == before


def test_a_batch_of_1000_events_with_the_longest_ids_fits_the_upload_limit(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    events = [{**EVENT, "id": f"{i:04d}".ljust(255, "x")} for i in range(1_000)]

    response = api.post("usage/events", {"events": events})

    assert response.status_code == 202
    assert response.json() == {"accepted": 1_000, "duplicates": 0}
    assert_ledger_consistent(org.pk)


@pytest.fixture
def rollups_fail():
    """The database refuses to write usage rollups (the last write of a charge), as a full disk
    would, until the test ends."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER disk_full BEFORE INSERT ON usage_usagerollup "
                "FOR EACH ROW EXECUTE FUNCTION test_disk_full()"
            )
        else:
            cursor.execute(
                "CREATE TRIGGER disk_full BEFORE INSERT ON usage_usagerollup "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
    yield
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("DROP TRIGGER disk_full ON usage_usagerollup")
            cursor.execute("DROP FUNCTION test_disk_full()")
        else:
            cursor.execute("DROP TRIGGER disk_full")


@pytest.mark.django_db(transaction=True)  # committed for real, as in production
def test_an_error_half_way_through_a_charge_rolls_it_all_back(rollups_fail):
    org = OrgFactory(plan="starter")
    api = ApiClient(Client(raise_request_exception=False), org.raw_key)
    job = api.post("jobs", JOB).json()  # a hold writes no rollup
    before = state(org)

    response = api.post(f"jobs/{job['id']}/complete")

    assert_error(response, 500, "INTERNAL")
    assert state(org) == before
    assert Job.objects.get(pk=job["id"]).status == JobStatus.RUNNING
    assert_ledger_consistent(org.pk)


# --- headers on every answer ------------------------------------------------------------------


def _running_job(api):
    return api.post("jobs", JOB).json()["id"]


def _failed_job(api):
    job_id = _running_job(api)
    api.post(f"jobs/{job_id}/fail")
    return job_id


CALLS = {
    "200 balance": (200, lambda api: api.get("balance")),
    "200 usage": (200, lambda api: api.get("usage")),
    "200 job": (200, lambda api: api.get(f"jobs/{_running_job(api)}")),
    "200 complete": (200, lambda api: api.post(f"jobs/{_running_job(api)}/complete")),
    "200 fail": (200, lambda api: api.post(f"jobs/{_running_job(api)}/fail")),
    "201 job": (201, lambda api: api.post("jobs", JOB)),
    "202 events": (202, lambda api: api.post("usage/events", {"events": [EVENT]})),
    "400 bad body": (400, lambda api: api.post("jobs", raw="{")),
    "400 bad query": (400, lambda api: api.get("usage", {"group_by": "week"})),
    "402 no credits": (402, lambda api: api.post("jobs", {**JOB, "pages": 10_001})),
    "404 job": (404, lambda api: api.get("jobs/nope")),
    "404 path": (404, lambda api: api.get("nope")),
    "405 method": (405, lambda api: api.get("jobs")),
    "409 conflict": (409, lambda api: api.post(f"jobs/{_failed_job(api)}/complete")),
    "413 file": (413, lambda api: api.post("jobs", {**JOB, "file_size": 100 * MB + 1})),
}


@pytest.mark.parametrize(("status", "call"), CALLS.values(), ids=CALLS.keys())
def test_every_answer_has_the_rate_limit_and_request_id_headers(api_for, status, call):
    org = OrgFactory(plan="free")
    api = api_for(org.raw_key)

    before = time.time()
    response = call(api)

    assert response.status_code == status, response.content
    assert_api_headers(response, 20, before, time.time())  # Free: 20 requests a minute
    if status >= 400:
        assert_error(response, status, response.json()["error"]["code"])


def test_each_answer_has_its_own_request_id(api_for):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)
    ids = {api.get("balance")["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


# --- 429: requests a minute -------------------------------------------------------------------


def test_rate_limit_remaining_counts_down_in_the_window(api_for, frozen_time):
    org = OrgFactory(plan="starter")
    api = api_for(org.raw_key)

    answers = [api.get("balance") for _ in range(3)]

    assert [r["RateLimit-Remaining"] for r in answers] == ["119", "118", "117"]
    assert {r["RateLimit-Limit"] for r in answers} == {"120"}
    assert {r["RateLimit-Reset"] for r in answers} == {str((int(frozen_time.now) // 60 + 1) * 60)}


def test_the_request_over_the_rpm_limit_is_429_with_retry_after(api_for, frozen_time):
    org = OrgFactory(plan="starter", rpm=3)
    api = api_for(org.raw_key)

    answers = [api.get("balance") for _ in range(3)]
    refused = api.get("balance")

    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r["RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    error = assert_error(refused, 429, "RESOURCE_EXHAUSTED")
    retry_after = error["details"]["retry_after"]
    assert isinstance(retry_after, int) and 1 <= retry_after <= 60
    assert retry_after == max(1, math.ceil(int(refused["RateLimit-Reset"]) - frozen_time.now))
    assert refused["Retry-After"] == str(retry_after)
    assert error["message"] == f"Rate limit exceeded. Please retry after {retry_after} seconds."
    assert refused["RateLimit-Remaining"] == "0"
    assert_api_headers(refused, 3, frozen_time.now, frozen_time.now)


def test_refused_requests_count_too_and_never_reach_the_view(api_for, frozen_time):
    org = OrgFactory(plan="starter", rpm=3)
    api = api_for(org.raw_key)
    for _ in range(3):
        api.get("balance")

    job = api.post("jobs", JOB)
    bad = api.post("jobs", raw="{")

    assert_error(job, 429, "RESOURCE_EXHAUSTED")
    assert_error(bad, 429, "RESOURCE_EXHAUSTED")
    assert not Job.objects.filter(org=org).exists()
    # five requests so far, the two 429s included: the next one is the sixth in the window
    assert rate_limits.hit(f"org:{org.pk}", 3, now=frozen_time.now).count == 6
    assert_ledger_consistent(org.pk)


def test_the_next_window_starts_afresh(api_for, frozen_time):
    org = OrgFactory(plan="starter", rpm=1)
    api = api_for(org.raw_key)
    assert api.get("balance").status_code == 200
    assert api.get("balance").status_code == 429

    frozen_time.now = (int(frozen_time.now) // 60 + 1) * 60  # the next window opens

    again = api.get("balance")
    assert again.status_code == 200
    assert again["RateLimit-Remaining"] == "0"


def test_rate_limits_are_per_organisation(api_for, frozen_time):
    one, two = OrgFactory(plan="starter", rpm=1), OrgFactory(plan="starter", rpm=1)
    api_for(one.raw_key).get("balance")
    assert api_for(one.raw_key).get("balance").status_code == 429
    assert api_for(two.raw_key).get("balance").status_code == 200


def test_requests_without_a_valid_key_are_limited_per_client_address(frozen_time):
    client, _ = anonymous()
    other, _ = anonymous()

    answers = [client.get("/api/v1/balance") for _ in range(api_middleware.ANONYMOUS_RPM)]
    refused = client.get("/api/v1/balance")

    assert {r.status_code for r in answers} == {401}
    assert answers[-1]["RateLimit-Remaining"] == "0"
    error = assert_error(refused, 429, "RESOURCE_EXHAUSTED")
    assert refused["Retry-After"] == str(error["details"]["retry_after"])
    assert other.get("/api/v1/balance").status_code == 401


# --- 429: concurrent jobs ---------------------------------------------------------------------


def test_a_job_over_the_concurrent_jobs_limit_is_429_until_one_finishes(api_for):
    org = OrgFactory(plan="starter", concurrent_jobs=2)
    api = api_for(org.raw_key)
    first = api.post("jobs", JOB).json()
    second = api.post("jobs", JOB).json()
    before = state(org)

    refused = api.post("jobs", JOB)

    error = assert_error(refused, 429, "RESOURCE_EXHAUSTED")
    retry_after = error["details"]["retry_after"]
    assert isinstance(retry_after, int) and retry_after >= 1
    assert refused["Retry-After"] == str(retry_after)
    assert_api_headers(refused, 120, time.time() - 60, time.time())
    assert state(org) == before  # nothing held for the refused job

    api.post(f"jobs/{first['id']}/complete")
    assert api.post("jobs", JOB).status_code == 201
    assert api.post("jobs", JOB).status_code == 429
    api.post(f"jobs/{second['id']}/fail")
    assert api.post("jobs", JOB).status_code == 201
    assert CreditAccount.objects.get(org=org).running_jobs == 2
    assert_ledger_consistent(org.pk)


def test_the_concurrent_jobs_limit_does_not_stop_completing_or_events(api_for):
    org = OrgFactory(plan="starter", concurrent_jobs=1)
    api = api_for(org.raw_key)
    job = api.post("jobs", JOB).json()
    assert api.post("jobs", JOB).status_code == 429

    assert api.post("usage/events", {"events": [EVENT]}).status_code == 202
    assert api.get(f"jobs/{job['id']}").status_code == 200
    assert api.post(f"jobs/{job['id']}/complete").status_code == 200
    assert_ledger_consistent(org.pk)


def test_a_rate_limit_store_that_is_down_lets_requests_through_with_headers(api_for, monkeypatch):
    from usage import rate_limits

    class Down:
        def incr(self, key, window):
            raise ConnectionError("counter store is down")

    monkeypatch.setattr(rate_limits, "_counter", lambda: Down())
    org = OrgFactory(plan="starter")
    response = api_for(org.raw_key).get("balance")
    assert response.status_code == 200
    assert response["RateLimit-Limit"] == "120"
    assert response["RateLimit-Remaining"] == "120"


@pytest.mark.postgres  # the PostgreSQL pass runs with Redis
def test_a_redis_window_counts_once_per_request_and_expires_after_two_windows(settings):
    counter = rate_limits.RedisCounter(settings.REDIS_URL)
    window = 123_456

    counts = [counter.incr("org:test-expiry", window) for _ in range(3)]

    assert counts == [1, 2, 3]
    ttl = counter.client.ttl(f"ratelimit:org:test-expiry:{window}")
    assert 0 < ttl <= 2 * rate_limits.WINDOW_SECONDS


@pytest.mark.postgres  # the PostgreSQL pass runs with Redis
def test_a_redis_that_lost_its_scripts_still_counts_every_request(settings):
    """After a Redis restart (or SCRIPT FLUSH) EVALSHA answers NOSCRIPT: the script is loaded again
    and the request counted once."""
    counter = rate_limits.RedisCounter(settings.REDIS_URL)
    window = 123_457
    counter.client.delete(f"ratelimit:org:test-flush:{window}")
    assert counter.incr("org:test-flush", window) == 1

    counter.client.script_flush()

    assert [counter.incr("org:test-flush", window) for _ in range(2)] == [2, 3]
