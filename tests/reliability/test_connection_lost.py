"""The database connection lost in the middle of a metering request: PostgreSQL really terminates
the request's backend half-way through its transaction (events: after the charge and before the
rollups; a job's start or end: at the call of the PL/pgSQL function that writes it, after the
request's key and rate-limit work). The caller gets a 5xx in the JSON envelope, nothing of the
request stays written, and the same request sent again succeeds once.

And lost between two requests: the API-key lookup, which stands in for Django's health check,
finds the reused connection broken and the request is answered on a new one."""

from unittest import mock

import psycopg
import pytest
from django.conf import settings
from django.db import OperationalError, connection, connections
from django.test import Client

from tests.conftest import ApiClient
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from tests.usage.api_support import assert_error
from usage.models import CreditAccount, Job, JobStatus, LedgerEntry, UsageEvent, UsageRollup

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

JOB = {"product": "parse", "mode": "base", "pages": 40, "file_type": "pdf", "file_size": 1_000}
EVENTS = {
    "events": [
        {"id": f"e-{i}", "product": "parse", "mode": "base", "units": 7, "timestamp": "2027-01-15T10:00:00Z"}
        for i in range(5)
    ]
}


def _terminate(pid: int) -> None:
    db = settings.DATABASES["default"]
    with psycopg.connect(
        dbname=db["NAME"], user=db["USER"], host=db["HOST"], port=db["PORT"] or 5432, autocommit=True
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def connection_lost_at(table: str):
    """An execute wrapper: when the request is about to write `table` (or call the function that
    writes it), its database connection is terminated by the server first, so the statement fails
    as on a real outage."""

    def wrapper(execute, sql, params, many, context):
        if table in sql and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "SELECT")):
            _terminate(connection.connection.info.backend_pid)
        return execute(sql, params, many, context)

    return wrapper


def written(org) -> tuple:
    return (
        CreditAccount.objects.filter(org=org).values_list("balance", "running_jobs").get(),
        LedgerEntry.objects.filter(org=org).count(),
        UsageEvent.objects.filter(org=org).count(),
        list(UsageRollup.objects.filter(org=org).values_list("credits", "units")),
        list(Job.objects.filter(org=org).values_list("status", "credits_charged")),
    )


@pytest.mark.parametrize(
    "path, body, table",
    [
        ("jobs/{job}/complete", {"pages": 30}, "usage_job_end("),
        ("usage/events", EVENTS, "usage_usagerollup"),
        ("jobs", JOB, "usage_job_start("),
    ],
    ids=["complete a job", "send events", "start a job"],
)
def test_the_connection_lost_mid_request_is_a_5xx_envelope_and_writes_nothing(path, body, table, caplog):
    org = OrgFactory(plan="starter")
    api = ApiClient(Client(raise_request_exception=False), org.raw_key)
    job = api.post("jobs", JOB).json()["id"]
    path = path.format(job=job)
    before = written(org)

    with connection.execute_wrapper(connection_lost_at(table)):
        response = api.post(path, body)

    error = assert_error(response, 500, "INTERNAL")
    (logged,) = [r for r in caplog.records if r.exc_info]
    assert isinstance(logged.exc_info[1], OperationalError)  # the server closed the connection
    assert "connection" not in error["message"].lower()  # nothing of our internals in the answer
    connection.close()  # what the server does with a broken connection at the end of a request
    assert written(org) == before
    assert_ledger_consistent(org.pk)

    again = api.post(path, body)
    assert again.status_code in (200, 201, 202), again.content
    if path.endswith("complete"):
        assert Job.objects.get(pk=job).status == JobStatus.SUCCEEDED
        assert CreditAccount.objects.get(org=org).balance == 40_000 - 30
    assert_ledger_consistent(org.pk)


def _as_a_new_request_starts() -> None:
    """What Django does at the start of each request (close_old_connections), which the test
    client skips: a reused connection's health is unknown again."""
    connection.close_if_unusable_or_obsolete()
    assert connection.connection is not None and not connection.health_check_done


def test_a_metering_request_checks_its_reused_connection_with_the_key_lookup_alone():
    org = OrgFactory(plan="starter")
    api = ApiClient(Client(), org.raw_key)
    assert api.post("jobs", JOB).status_code == 201
    _as_a_new_request_starts()
    sent = []

    def log(execute, sql, params, many, context):
        sent.append(sql)
        return execute(sql, params, many, context)

    with (
        mock.patch.object(
            type(connections["default"]), "is_usable", side_effect=AssertionError("SELECT 1 sent")
        ),
        connection.execute_wrapper(log),
    ):
        assert api.post("jobs", JOB).status_code == 201
    assert "WHERE k.prefix = " in sent[0], sent  # the first statement is the key lookup


@pytest.mark.parametrize("method, path", [("post", "jobs"), ("get", "balance")])
def test_a_connection_lost_between_requests_is_replaced_and_the_request_answered(method, path):
    org = OrgFactory(plan="starter")
    api = ApiClient(Client(), org.raw_key)
    assert api.get("balance").status_code == 200
    before = written(org)
    _as_a_new_request_starts()
    _terminate(connection.connection.info.backend_pid)  # e.g. PostgreSQL restarted while idle

    response = api.post(path, JOB) if method == "post" else api.get(path)

    assert response.status_code in (200, 201), response.content
    if method == "post":
        assert Job.objects.filter(org=org).count() == len(before[-1]) + 1  # started once
    assert_ledger_consistent(org.pk)
