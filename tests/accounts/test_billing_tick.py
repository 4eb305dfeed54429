"""Billing periods and `billing_tick` (DESIGN §3, §6)."""

import pytest
from django.core.management import CommandError

from accounts import clock
from accounts.models import BillingPeriod, Plan
from accounts.services import period_end_for
from tests.billing_support import at, balance, spend, sub_of, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import services
from usage.models import CreditLot, Job, JobStatus, LedgerEntry
from usage.selectors import balance_for

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "start, plan, anchor, end",
    [
        ("2027-01-15", "free", 15, "2027-02-01"),
        ("2027-12-09", "free", 9, "2028-01-01"),
        ("2027-01-15", "starter", 15, "2027-02-15"),
        ("2027-01-31", "pro", 31, "2027-02-28"),
        ("2027-02-28", "pro", 31, "2027-03-31"),
        ("2028-01-31", "pro", 31, "2028-02-29"),
        ("2027-12-31", "starter", 31, "2028-01-31"),
    ],
)
def test_period_end_follows_the_anchor_day_and_free_ends_on_the_first(start, plan, anchor, end):
    got = period_end_for(start=at(start), plan=Plan.objects.get(code=plan), anchor_day=anchor)
    assert got == at(end)


def test_free_and_starter_through_three_months_give_the_balances_computed_by_hand():
    tick("2027-01-15T10:00:00Z")
    free, starter = OrgFactory(plan="free"), OrgFactory(plan="starter")
    assert sub_of(free).current_period.end == at("2027-02-01")  # Free: full 10,000 even mid-month
    assert sub_of(starter).current_period.end == at("2027-02-15")  # paid: the anchor day

    spend(free, 3_000, "f1")
    spend(starter, 45_000, "s1")  # 5,000 into overage
    assert (balance(free), balance(starter)) == (7_000, 0)
    assert balance_for(sub=sub_of(starter)).overage_cents == 625

    tick("2027-02-01T00:00:00Z")  # Free renews on the 1st; Starter does not yet
    assert (balance(free), balance(starter)) == (10_000, 0)
    spend(free, 10_000, "f2")
    with pytest.raises(Exception, match="exceeded the maximum number of credits"):
        spend(free, 1, "f3")

    tick("2027-02-15T00:00:00Z")  # Starter renews; its unused plan credits never roll over
    assert (balance(free), balance(starter)) == (0, 40_000)
    closed = BillingPeriod.objects.get(org=starter, start=at("2027-01-15"))
    assert (closed.overage_credits, closed.credits_used, closed.closed_at is not None) == (
        5_000,
        45_000,
        True,
    )
    assert balance_for(sub=sub_of(starter)).overage_credits == 0
    spend(starter, 1_000, "s2")

    tick("2027-03-01T00:00:00Z")
    assert (balance(free), balance(starter)) == (10_000, 39_000)
    spend(free, 2_500, "f4")

    tick("2027-04-20T12:00:00Z")  # a jump closes every period it passes, one by one
    assert (balance(free), balance(starter)) == (10_000, 40_000)

    def starts(org):
        return [p.start.date().isoformat() for p in BillingPeriod.objects.filter(org=org).order_by("start")]

    assert starts(free) == ["2027-01-15", "2027-02-01", "2027-03-01", "2027-04-01"]
    assert starts(starter) == ["2027-01-15", "2027-02-15", "2027-03-15", "2027-04-15"]
    for org in (free, starter):
        assert_ledger_consistent(org.pk)
        assert not CreditLot.objects.filter(org=org, expired_at__isnull=False, remaining__gt=0).exists()


def test_tick_refuses_an_at_earlier_than_the_last_tick():
    tick("2027-03-01T00:00:00Z")
    with pytest.raises(CommandError, match="earlier than the last tick"):
        tick("2027-02-01T00:00:00Z")


def test_tick_refuses_a_malformed_at():
    with pytest.raises(CommandError, match="not an ISO 8601"):
        tick("next tuesday")


def test_tick_moves_what_the_api_and_pages_see():
    tick("2027-06-10T08:00:00Z")
    assert clock.today().isoformat() == "2027-06-10"


def test_running_the_tick_twice_leaves_the_state_of_one_run():
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 100, "a")
    tick("2027-02-15T00:00:00Z")
    state = (BillingPeriod.objects.count(), LedgerEntry.objects.count(), balance(org))
    tick("2027-02-15T00:00:00Z")
    tick()
    assert (BillingPeriod.objects.count(), LedgerEntry.objects.count(), balance(org)) == state


def test_a_crash_half_way_through_a_period_close_is_rolled_back_and_a_rerun_completes_it(monkeypatch):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 100, "a")
    import accounts.services as account_services

    real_open = account_services.period_open

    def crash(**kwargs):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(account_services, "period_open", crash)
    with pytest.raises(RuntimeError):
        tick("2027-02-15T00:00:00Z")
    assert balance(org) == 39_900  # the expiry of the old lot was rolled back with the crash
    assert sub_of(org).current_period.start == at("2027-01-15")
    monkeypatch.setattr(account_services, "period_open", real_open)
    tick("2027-02-15T00:00:00Z")
    assert balance(org) == 40_000
    assert BillingPeriod.objects.filter(org=org).count() == 2
    assert_ledger_consistent(org.pk)


def test_stale_jobs_are_failed_after_24_hours_and_their_hold_released():
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    req = services.JobRequest("parse", "base", False, 500, "pdf", 10)
    job, _ = services.job_start(sub=sub_of(org), req=req)
    tick("2027-01-16T09:59:00Z")
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    tick("2027-01-16T10:00:01Z")
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED
    assert balance(org) == 40_000
    assert_ledger_consistent(org.pk)


def test_a_stale_job_completed_while_the_tick_runs_stays_completed_and_the_tick_carries_on(monkeypatch):
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    req = services.JobRequest("parse", "base", False, 500, "pdf", 10)
    job, _ = services.job_start(sub=sub_of(org), req=req)
    real_fail = services.job_fail

    def completed_first(**kwargs):  # the job's own request wins the race for the lock
        services.job_complete(org_id=org.pk, job_id=job.id, pages=300)
        return real_fail(**kwargs)

    monkeypatch.setattr(services, "job_fail", completed_first)
    assert "stale jobs failed: 0" in tick("2027-01-16T10:00:01Z")
    assert Job.objects.get(pk=job.pk).status == JobStatus.SUCCEEDED
    assert balance(org) == 40_000 - 300
    assert_ledger_consistent(org.pk)


def test_a_hold_on_plan_credits_that_expire_is_not_given_back_after_the_period():
    tick("2027-01-15T10:00:00Z")
    org = OrgFactory(plan="starter")
    req = services.JobRequest("parse", "base", False, 1_000, "pdf", 10)
    job, _ = services.job_start(sub=sub_of(org), req=req)
    tick("2027-02-15T00:00:00Z")
    assert balance(org) == 40_000
    services.job_fail(org_id=org.pk, job_id=job.id)
    assert balance(org) == 40_000  # released credits of an expired lot expire again at once
    assert_ledger_consistent(org.pk)
