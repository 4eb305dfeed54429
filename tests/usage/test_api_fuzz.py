"""Schemathesis against /api/v1/ on a live server, with a valid key of an organisation that has
credits: no 5xx, every answer as the OpenAPI document says (statuses, bodies, content types), every
error in the one envelope, and schema-valid requests refused only by the rules a schema cannot
express (an unknown product or mode in the staff-edited catalog, a date range over 366 days, a
file over its type's limit). Bounded and seeded, so a run takes about a minute and repeats.

The document is taken from the code at import, since the live server only exists inside a test;
the first test checks it is the one /api/v1/openapi.json serves."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.factories import OrgFactory
from usage import api_middleware
from usage.api import api

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES_PER_OPERATION = 40
STATEFUL_SCENARIOS = 25
SEED = 8  # schemathesis's and Hypothesis's: the same requests every run
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

schema = schemathesis.openapi.from_dict(
    api.get_openapi_schema(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # The key is never generated or left out on purpose: every request carries the valid
            # one, so invalid requests reach validation instead of stopping at 401 (the ignored_auth
            # check still sends requests without a key and with a wrong one, and wants 401).
            "generation": {"with-security-parameters": False},
            "checks": {
                # Schema-valid requests may also meet a business rule: 400 (unknown product or mode,
                # date range), 402 (credits), 413 (file size). `refused_only_by_business_rules`
                # below makes sure a 400 of a schema-valid request never comes from validation.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "402", "404", "409", "413", "429"]
                },
            },
        }
    ),
)


def errors_use_the_envelope(ctx, response, case):
    """Every 4xx and 5xx, documented or not (a 405 too): the envelope, with the code that goes with
    the status and the request id of the X-Request-Id header."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"success", "error"}, body
    assert body["success"] is False, body
    error = body["error"]
    assert set(error) == {"code", "message", "request_id", "details"}, error
    assert error["code"] == api_middleware.STATUS_CODES.get(response.status_code, "INTERNAL"), (
        response.status_code,
        error,
    )
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    assert [error["request_id"]] == response.headers["x-request-id"], (error, response.headers)
    return True


def _has_float(value) -> bool:
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return isinstance(value, float)


def refused_only_by_business_rules(ctx, response, case):
    """A request the schema allows passes request validation: a 400 for it names a rule (its
    details carry no validation errors), so the document and the validators agree. One known
    difference: JSON Schema counts 10.0 as an integer, the API refuses it (DESIGN §7)."""
    if not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    if _has_float(case.body):
        return None
    error = response.json()["error"]
    assert "errors" not in error["details"], f"schema-valid request failed validation: {error}"
    return True


CHECKS = [errors_use_the_envelope, refused_only_by_business_rules]


@pytest.fixture
def auth(live_server, monkeypatch):
    """The Authorization header of a Pro organisation with a billion credits and limits no run
    reaches. Schemathesis also sends each operation without a key, and with a wrong one, to see it
    refused with 401: the per-address limit for those is lifted too."""
    monkeypatch.setattr(api_middleware, "ANONYMOUS_RPM", 10**6)
    org = OrgFactory(plan="pro", monthly_credits=10**9, rpm=10**6, concurrent_jobs=10**5)
    return {"Authorization": f"Bearer {org.raw_key}"}


def test_the_fuzzed_document_is_the_served_one(client):
    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(api.get_openapi_schema()))


@schema.parametrize()
@FUZZ_SETTINGS
def test_each_operation_answers_as_documented(case, auth, live_server):
    case.call_and_validate(base_url=live_server.url, headers=auth, additional_checks=CHECKS)


def test_job_sequences_answer_as_documented(auth, live_server):
    """Stateful: jobs started, then completed, failed or read through the ids the answers give."""

    class Jobs(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"base_url": live_server.url, "headers": auth}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            super().validate_response(response, case, additional_checks=CHECKS, **kwargs)

    Jobs.run(
        settings=settings(
            FUZZ_SETTINGS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=6, derandomize=True
        )
    )
