"""`seed_demo`, run by `make run` on every start: the demo organisation, its people and 90 days of
history made through the real services; a second run changes nothing."""

from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command
from django.db.models import Sum
from django.test import RequestFactory

from accounts import clock
from accounts.models import ApiKey, BillingPeriod, Membership, Organisation, Role, Subscription, User
from invoices.models import Invoice
from tests.invariants import assert_ledger_consistent
from usage.models import CreditAccount, CreditLot, Job, JobStatus, LedgerEntry, UsageEvent, UsageRollup
from usage.selectors import balance_for

pytestmark = pytest.mark.django_db

PASSWORD = "demo-pass-2026"
PRODUCTS = {"parse", "extract", "classify", "split", "index"}
COUNTED = (
    Organisation,
    User,
    Membership,
    ApiKey,
    Subscription,
    BillingPeriod,
    CreditAccount,
    CreditLot,
    LedgerEntry,
    Job,
    UsageEvent,
    UsageRollup,
)


def seed() -> list[str]:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue().splitlines()


def counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in COUNTED}


def test_seed_demo_makes_people_and_history_once():
    lines = seed()  # the slow part (~90 days of services calls): seeded once for every check
    org = Organisation.objects.get(name="Demo Org")

    # what `make run` and the README print
    assert lines[:5] == [
        f"Demo organisation: Demo Org (org {org.pk})",
        "Owner:  demo@example.com / demo-pass-2026",
        "Billing admin: billing@example.com / demo-pass-2026",
        "Member: member@example.com / demo-pass-2026",
        "Staff (/admin/): admin@example.com / admin-demo-pass",
    ]
    assert lines[5].startswith("API key: sk_") and len(lines) == 6

    # people, roles, sign-in
    roles = {m.user.email: m.role for m in Membership.objects.filter(org=org).select_related("user")}
    assert roles == {
        "demo@example.com": Role.OWNER,
        "billing@example.com": Role.BILLING_ADMIN,
        "member@example.com": Role.MEMBER,
    }
    sign_in = RequestFactory().post("/accounts/login/")  # django-axes checks who is signing in
    for email in roles:
        assert authenticate(sign_in, username=email, password=PASSWORD) is not None, email
    staff = authenticate(sign_in, username="admin@example.com", password="admin-demo-pass")
    assert staff is not None and staff.is_staff and staff.is_superuser
    sub = Subscription.objects.select_related("plan", "current_period").get(org=org)
    assert sub.plan.code == "pro"

    # 90 days of usage across every product and mode, weekdays around 5,000-15,000 credits
    today = clock.today()
    rollups = UsageRollup.objects.filter(org=org, day__gt=today - timedelta(days=90), day__lte=today)
    assert len(set(rollups.values_list("day", flat=True))) >= 85
    assert set(rollups.values_list("product", flat=True)) == PRODUCTS
    assert {"base", "advanced", "ocr", "audio"} <= set(rollups.values_list("mode", flat=True))
    per_day = rollups.exclude(day=today).values("day").annotate(credits=Sum("credits"))
    weekdays = sorted(r["credits"] for r in per_day if r["day"].weekday() < 5)
    weekends = sorted(r["credits"] for r in per_day if r["day"].weekday() >= 5)
    assert 5_000 <= weekdays[len(weekdays) // 2] <= 15_000
    assert weekends[len(weekends) // 2] < weekdays[len(weekdays) // 2]
    assert Job.objects.filter(org=org, status=JobStatus.FAILED, credits_charged=0).exists()
    assert Job.objects.filter(org=org, status=JobStatus.SUCCEEDED).count() > 80
    assert not Job.objects.filter(org=org, status=JobStatus.RUNNING).exists()

    # the ledger is exact; periods rolled on the anchor day; today's period is open and partly used
    assert_ledger_consistent(org.pk)
    period = sub.current_period
    assert period.closed_at is None and period.start <= clock.now() < period.end
    assert BillingPeriod.objects.filter(org=org, closed_at__isnull=False).count() >= 2
    balance = balance_for(sub=sub)
    assert 0 < balance.credits_remaining < 400_000
    assert balance.credits_used_this_period == 400_000 - balance.credits_remaining
    charged = BillingPeriod.objects.filter(org=org).aggregate(s=Sum("credits_used"))["s"]
    assert charged == UsageRollup.objects.filter(org=org).aggregate(s=Sum("credits"))["s"]
    # one Pro fee a period, each paid by bank transfer the day it was issued
    invoices = Invoice.objects.filter(org=org)
    assert invoices.count() == BillingPeriod.objects.filter(org=org).count() >= 3
    assert {(i.status, i.total_cents, i.paid_at == i.issued_at) for i in invoices} == {("paid", 50_000, True)}

    # a second run (every `make run`) prints the logins and changes nothing
    before = counts()
    again = seed()
    assert counts() == before
    assert CreditAccount.objects.get(org=org).balance == balance.credits_remaining
    assert again[:5] == lines[:5]
    assert again[5] == "API key: create one under Settings → API keys"
