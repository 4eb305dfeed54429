"""The concurrency soak, short: 8 threads × 400 mixed operations on five organisations, on
PostgreSQL with localstripe, then every invariant of tests/invariants.py over everything they did
(`make soak` runs the long one: 50 threads × 10,000 operations)."""

import pytest

from invoices import pdf
from soak import workload
from soak.plan import SoakPlan
from tests.invariants import anomalies, localstripe_payment_intents
from tests.usage import credits_support

eager_tasks = credits_support.eager_tasks  # a fixture

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_eight_threads_of_mixed_operations_leave_no_anomaly(localstripe, eager_tasks, monkeypatch):
    monkeypatch.setattr(pdf, "invoice_pdf_bytes", workload.pdf_stand_in)
    org_ids = workload.world_create()
    report = workload.run(SoakPlan(threads=8, operations=400, stripe_budget=30, months=3), org_ids)
    workload.settle()
    found = anomalies(intents=localstripe_payment_intents(), accepted_events=report.accepted_events)

    assert report.operations == 400
    assert report.errors == [], report.errors[0]
    assert report.logged_errors == []
    assert {check: problems for check, problems in found.items() if problems} == {}
    assert report.outcomes["billing tick", "ok"] >= 1
