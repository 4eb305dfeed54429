"""The period close, batched: `billing_tick` rolls due subscriptions a chunk at a time, each chunk
one transaction of set-based writes. Eleven customers through a normal close and a three-month
jump give exactly the invoices (numbers, lines, amounts), periods, plan lots, ledger entries and
balances computed by hand below, whether a chunk holds every subscription, four of them or one
(the old one-by-one shape); a crash in the middle of a chunk undoes that chunk only.

Plans: Free $0 / 10,000 credits (calendar months), Starter $50 / 40,000, Pro $500 / 400,000;
overage $1.25 per 1,000 credits, rounded half-up once per line. Fee in advance, overage in arrears.
"""

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

import accounts.services as account_services
from accounts import clock
from accounts.models import BillingPeriod, Subscription
from accounts.services import overage_cap_set, subscription_downgrade_schedule
from invoices import services as invoice_services
from invoices.models import Invoice, InvoiceNumberSequence, InvoiceStatus
from invoices.services import LineSpec
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import services
from usage.models import Bucket, CreditAccount, CreditLot, LedgerEntry

pytestmark = pytest.mark.django_db


def tick(when):
    call_command("billing_tick", "--at", when, stdout=StringIO())


def spend(org, credits):
    sub = Subscription.objects.select_related("plan").get(org=org)
    services.usage_events_record(
        sub=sub, events=[services.EventIn(f"{org.pk}-{clock.now()}", "parse", "base", credits, clock.now())]
    )


def day(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def invoices():
    """Every numbered invoice: (number, customer, [(line, quantity, cents)], total), by number."""
    return [
        (
            invoice.number,
            invoice.org.name,
            [(line.description, line.quantity, line.amount_cents) for line in invoice.lines.all()],
            invoice.total_cents,
        )
        for invoice in Invoice.objects.exclude(number=None).select_related("org").order_by("number")
    ]


def periods(org):
    """(start, end, plan, quota, closed at) of each period, oldest first."""
    return [
        (p.start.date().isoformat(), p.end.date().isoformat(), p.plan.code, p.monthly_credits, p.closed_at)
        for p in BillingPeriod.objects.filter(org=org).select_related("plan").order_by("start")
    ]


def plan_lots(org):
    """(period start, granted, remaining, day it expired) of each plan lot, oldest first."""
    lots = CreditLot.objects.filter(org=org, bucket=Bucket.PLAN).select_related("period").order_by("pk")
    return [
        (
            lot.period.start.date().isoformat(),
            lot.granted,
            lot.remaining,
            lot.expired_at and f"{lot.expired_at:%Y-%m-%d}",
        )
        for lot in lots
    ]


def entries(org):
    return [(e.kind, e.credits) for e in LedgerEntry.objects.filter(org=org).order_by("pk")]


def balances(*orgs):
    return [CreditAccount.objects.get(org=org).balance for org in orgs]


def fee(plan, first, last, cents):
    return (f"{plan} plan, {first} – {last}", 1, cents)


def overage(first, last, credits, cents):
    return (f"Overage credits, {first} – {last}", credits, cents)


FEB15, MAY15 = day("2027-02-15"), day("2027-05-15")


@pytest.mark.parametrize("chunk", [1000, 4, 1], ids=["one chunk", "chunks of four", "one by one"])
def test_the_batched_close_gives_the_invoices_periods_lots_and_ledger_computed_by_hand(monkeypatch, chunk):
    monkeypatch.setattr(account_services, "ROLL_CHUNK", chunk)
    tick("2027-01-15T10:00:00Z")  # anchor day 15 for everyone made now; each paid plan is invoiced
    free = OrgFactory(plan="free", name="Free Co")
    plain = OrgFactory(plan="starter", name="Plain Co")  # INV-…001
    over = OrgFactory(plan="starter", name="Over Co")  # …002
    tiny = OrgFactory(plan="starter", name="Tiny Co")  # …003
    leaving = OrgFactory(plan="starter", name="Leaving Co")  # …004, to Free on 15 Feb
    pro = OrgFactory(plan="pro", name="Pro Co")  # …005
    custom = OrgFactory(plan="starter", name="Custom Co", monthly_credits=50_000)  # …006
    Subscription.objects.filter(org=custom).update(price_cents_override=4_000)  # staff's price
    downsizing = OrgFactory(plan="pro", name="Downsizing Co")  # …007, to Starter on 15 Feb
    upgrading = OrgFactory(plan="starter", name="Upgrading Co")  # …008
    paying = OrgFactory(plan="starter", name="Paying Co")  # …009
    overage_cap_set(org=over, cap_cents=500, actor=None)  # a $5 cap: 1,252 credits ($1.57) fit

    spend(free, 3_000)
    spend(plain, 10_000)
    spend(over, 41_252)  # 1,252 over: $1.565 → $1.57
    spend(tiny, 40_003)  # 3 over: $0.00375 → $0.00
    spend(leaving, 40_003)  # 3 over, then Free: the invoice would total $0.00, so there is none
    spend(pro, 100_000)
    spend(custom, 50_500)  # 500 over its 50,000: $0.625 → $0.63
    subscription_downgrade_schedule(org=leaving, plan_code="free", actor=None)
    subscription_downgrade_schedule(org=downsizing, plan_code="starter", actor=None)
    # Two upgrades being paid for when the period ends: one started a moment ago, one older
    # whose payment is still open (a Draft upgrade invoice). Their periods wait.
    Subscription.objects.filter(org=upgrading).update(upgrade_pending_since=timezone.now())
    Subscription.objects.filter(org=paying).update(upgrade_pending_since=timezone.now() - timedelta(hours=1))
    draft = invoice_services.invoice_draft_create(
        org=paying, lines=[LineSpec("Upgrade to Pro", 1, 45_000)], kind="upgrade"
    )

    tick("2027-01-31T10:00:00Z")
    month_end = OrgFactory(plan="pro", name="Month End Co")  # …010, anchor 31: 31 Jan – 28 Feb
    spend(month_end, 400_800)  # 800 over: $1.00

    tick("2027-02-15T00:00:00Z")
    # Scheduled downgrades close first (Leaving Co bills nothing), then everyone due, in order;
    # Upgrading Co and Paying Co wait, Month End Co's period has not ended.
    jan = ("15 Jan 2027", "14 Feb 2027")
    feb = ("15 Feb 2027", "14 Mar 2027")
    first_invoices = [
        ("INV-2027-000001", "Plain Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000002", "Over Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000003", "Tiny Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000004", "Leaving Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000005", "Pro Co", [fee("Pro", *jan, 50_000)], 50_000),
        ("INV-2027-000006", "Custom Co", [fee("Starter", *jan, 5_000)], 5_000),  # priced before
        ("INV-2027-000007", "Downsizing Co", [fee("Pro", *jan, 50_000)], 50_000),
        ("INV-2027-000008", "Upgrading Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000009", "Paying Co", [fee("Starter", *jan, 5_000)], 5_000),
        ("INV-2027-000010", "Month End Co", [fee("Pro", "31 Jan 2027", "27 Feb 2027", 50_000)], 50_000),
    ]
    february = [
        ("INV-2027-000011", "Downsizing Co", [fee("Starter", *feb, 5_000)], 5_000),
        ("INV-2027-000012", "Plain Co", [fee("Starter", *feb, 5_000)], 5_000),
        ("INV-2027-000013", "Over Co", [fee("Starter", *feb, 5_000), overage(*jan, 1_252, 157)], 5_157),
        ("INV-2027-000014", "Tiny Co", [fee("Starter", *feb, 5_000), overage(*jan, 3, 0)], 5_000),
        ("INV-2027-000015", "Pro Co", [fee("Pro", *feb, 50_000)], 50_000),
        ("INV-2027-000016", "Custom Co", [fee("Starter", *feb, 4_000), overage(*jan, 500, 63)], 4_063),
    ]
    assert invoices() == first_invoices + february
    assert balances(free, plain, over, tiny, leaving, pro, custom, downsizing, upgrading, paying) == [
        10_000, 40_000, 40_000, 40_000, 10_000, 400_000, 50_000, 40_000, 40_000, 40_000,
    ]  # fmt: skip
    assert periods(upgrading) == [("2027-01-15", "2027-02-15", "starter", 40_000, None)]

    # The payments end (one declined and released, one draft voided); then three months pass.
    Subscription.objects.filter(org=upgrading).update(upgrade_pending_since=None)
    invoice_services.invoice_void(invoice=draft)
    tick("2027-05-15T00:00:00Z")

    def months(plan, cents, *firsts):
        last = {"15 Feb": "14 Mar", "15 Mar": "14 Apr", "15 Apr": "14 May", "15 May": "14 Jun"}
        return [[fee(plan, f"{first} 2027", f"{last[first]} 2027", cents)] for first in firsts]

    later = (
        [("Plain Co", lines, 5_000) for lines in months("Starter", 5_000, "15 Mar", "15 Apr", "15 May")]
        + [("Over Co", lines, 5_000) for lines in months("Starter", 5_000, "15 Mar", "15 Apr", "15 May")]
        + [("Tiny Co", lines, 5_000) for lines in months("Starter", 5_000, "15 Mar", "15 Apr", "15 May")]
        + [("Pro Co", lines, 50_000) for lines in months("Pro", 50_000, "15 Mar", "15 Apr", "15 May")]
        + [("Custom Co", lines, 4_000) for lines in months("Starter", 4_000, "15 Mar", "15 Apr", "15 May")]
        + [
            ("Downsizing Co", lines, 5_000)
            for lines in months("Starter", 5_000, "15 Mar", "15 Apr", "15 May")
        ]
        + [
            ("Upgrading Co", lines, 5_000)
            for lines in months("Starter", 5_000, "15 Feb", "15 Mar", "15 Apr", "15 May")
        ]
        + [
            ("Paying Co", lines, 5_000)
            for lines in months("Starter", 5_000, "15 Feb", "15 Mar", "15 Apr", "15 May")
        ]
        + [
            (
                "Month End Co",
                [
                    fee("Pro", "28 Feb 2027", "30 Mar 2027", 50_000),
                    overage("31 Jan 2027", "27 Feb 2027", 800, 100),
                ],
                50_100,
            ),
            ("Month End Co", [fee("Pro", "31 Mar 2027", "29 Apr 2027", 50_000)], 50_000),
            ("Month End Co", [fee("Pro", "30 Apr 2027", "30 May 2027", 50_000)], 50_000),
        ]
    )
    assert invoices() == first_invoices + february + [
        (f"INV-2027-{n:06d}", *invoice) for n, invoice in enumerate(later, start=17)
    ]
    assert InvoiceNumberSequence.objects.get(year=2027).last == 45  # gapless: none skipped
    after_january = Invoice.objects.filter(org__in=[free, leaving], created_at__gt=day("2027-01-16"))
    assert not after_january.exists()  # nothing to bill, and a $0.00 total: no invoice, no number
    assert set(Invoice.objects.exclude(number=None).values_list("status", flat=True)) == {
        InvoiceStatus.ISSUED
    }

    assert periods(free) == [
        ("2027-01-15", "2027-02-01", "free", 10_000, FEB15),
        ("2027-02-01", "2027-03-01", "free", 10_000, MAY15),
        ("2027-03-01", "2027-04-01", "free", 10_000, MAY15),
        ("2027-04-01", "2027-05-01", "free", 10_000, MAY15),
        ("2027-05-01", "2027-06-01", "free", 10_000, None),
    ]
    assert periods(leaving) == [
        ("2027-01-15", "2027-02-15", "starter", 40_000, FEB15),
        ("2027-02-15", "2027-03-01", "free", 10_000, MAY15),  # Free from the downgrade: to the 1st
        ("2027-03-01", "2027-04-01", "free", 10_000, MAY15),
        ("2027-04-01", "2027-05-01", "free", 10_000, MAY15),
        ("2027-05-01", "2027-06-01", "free", 10_000, None),
    ]
    assert periods(custom) == [
        ("2027-01-15", "2027-02-15", "starter", 50_000, FEB15),
        ("2027-02-15", "2027-03-15", "starter", 50_000, MAY15),
        ("2027-03-15", "2027-04-15", "starter", 50_000, MAY15),
        ("2027-04-15", "2027-05-15", "starter", 50_000, MAY15),
        ("2027-05-15", "2027-06-15", "starter", 50_000, None),
    ]
    assert periods(downsizing)[:2] == [
        ("2027-01-15", "2027-02-15", "pro", 400_000, FEB15),
        ("2027-02-15", "2027-03-15", "starter", 40_000, MAY15),
    ]
    assert periods(upgrading) == [
        ("2027-01-15", "2027-02-15", "starter", 40_000, MAY15),  # waited for the payment
        ("2027-02-15", "2027-03-15", "starter", 40_000, MAY15),
        ("2027-03-15", "2027-04-15", "starter", 40_000, MAY15),
        ("2027-04-15", "2027-05-15", "starter", 40_000, MAY15),
        ("2027-05-15", "2027-06-15", "starter", 40_000, None),
    ]
    assert periods(month_end) == [
        ("2027-01-31", "2027-02-28", "pro", 400_000, MAY15),  # the 31st falls to February's last
        ("2027-02-28", "2027-03-31", "pro", 400_000, MAY15),
        ("2027-03-31", "2027-04-30", "pro", 400_000, MAY15),
        ("2027-04-30", "2027-05-31", "pro", 400_000, None),
    ]

    assert plan_lots(custom) == [
        ("2027-01-15", 50_000, 0, "2027-02-15"),
        ("2027-02-15", 50_000, 0, "2027-05-15"),
        ("2027-03-15", 50_000, 0, "2027-05-15"),
        ("2027-04-15", 50_000, 0, "2027-05-15"),
        ("2027-05-15", 50_000, 50_000, None),
    ]
    assert plan_lots(free)[0] == ("2027-01-15", 10_000, 0, "2027-02-15")  # 7,000 left when it expired
    assert entries(free) == [
        ("grant", 10_000), ("usage", -3_000), ("expire", -7_000), ("grant", 10_000),
        ("expire", -10_000), ("grant", 10_000), ("expire", -10_000), ("grant", 10_000),
        ("expire", -10_000), ("grant", 10_000),
    ]  # fmt: skip
    assert entries(over) == [
        ("grant", 40_000), ("usage", -40_000), ("overage", -1_252), ("grant", 40_000),  # nothing left to expire
        ("expire", -40_000), ("grant", 40_000), ("expire", -40_000), ("grant", 40_000),
        ("expire", -40_000), ("grant", 40_000),
    ]  # fmt: skip
    assert entries(downsizing)[:3] == [("grant", 400_000), ("expire", -400_000), ("grant", 40_000)]
    everyone = (free, plain, over, tiny, leaving, pro, custom, downsizing, upgrading, paying, month_end)
    assert balances(*everyone) == [
        10_000, 40_000, 40_000, 40_000, 10_000, 400_000, 50_000, 40_000, 40_000, 40_000, 400_000,
    ]  # fmt: skip
    for org in everyone:
        assert_ledger_consistent(org.pk)

    state = (invoices(), LedgerEntry.objects.count(), BillingPeriod.objects.count(), balances(*everyone))
    tick("2027-05-15T00:00:00Z")  # a second tick at the same moment changes nothing
    assert (
        invoices(),
        LedgerEntry.objects.count(),
        BillingPeriod.objects.count(),
        balances(*everyone),
    ) == state


def test_a_crash_in_the_middle_of_a_chunk_undoes_that_chunk_only_and_a_rerun_finishes(monkeypatch):
    monkeypatch.setattr(account_services, "ROLL_CHUNK", 2)
    tick("2027-01-15T10:00:00Z")
    orgs = [OrgFactory(plan="starter", name=f"Co {i}") for i in range(5)]  # INV-…001 to 005
    for org in orgs:
        spend(org, 41_000)  # 1,000 over: $1.25 each

    from invoices import period_billing

    real_issue = period_billing.period_invoices_issue
    calls = []

    def crash_in_the_second_chunk(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:  # after the periods and lots of the chunk were written
            raise RuntimeError("worker killed")
        return real_issue(**kwargs)

    monkeypatch.setattr(period_billing, "period_invoices_issue", crash_in_the_second_chunk)
    with pytest.raises(RuntimeError):
        tick("2027-02-15T00:00:00Z")
    rolled = [Subscription.objects.get(org=org).current_period.start == FEB15 for org in orgs]
    assert rolled == [True, True, False, False, False]  # the first chunk committed, the second not
    assert balances(*orgs) == [40_000, 40_000, 0, 0, 0]
    assert Invoice.objects.exclude(number=None).count() == 7

    monkeypatch.setattr(period_billing, "period_invoices_issue", real_issue)
    tick("2027-02-15T00:00:00Z")
    assert [(number, name, total) for number, name, _, total in invoices()][5:] == [
        ("INV-2027-000006", "Co 0", 5_125),
        ("INV-2027-000007", "Co 1", 5_125),
        ("INV-2027-000008", "Co 2", 5_125),
        ("INV-2027-000009", "Co 3", 5_125),
        ("INV-2027-000010", "Co 4", 5_125),
    ]
    assert balances(*orgs) == [40_000] * 5
    for org in orgs:
        assert BillingPeriod.objects.filter(org=org).count() == 2
        assert_ledger_consistent(org.pk)
