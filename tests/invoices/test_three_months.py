"""Three months of four customers, moved with billing_tick: every invoice, number, line, amount,
status and balance below is computed by hand (DESIGN §2, §3 and §5), not by our code.

Plans: Free $0 / 10,000 credits (calendar months), Starter $50 / 40,000, Pro $500 / 400,000;
overage $1.25 per 1,000 credits, rounded half-up to the cent once per line. Paid periods run
from the anchor day (the 10th here); the plan fee is invoiced in advance, overage in arrears."""

import pytest

from accounts.models import Subscription
from accounts.services import subscription_downgrade_schedule, subscription_upgrade
from invoices.models import Invoice, InvoiceStatus
from tests.billing_support import balance, owner_of, spend, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent

pytestmark = pytest.mark.django_db(transaction=True)


def issued():
    """Every numbered invoice: (number, customer, total in cents, status), in number order."""
    names = {}
    return [
        (i.number, names.setdefault(i.org_id, i.org.name), i.total_cents, i.status)
        for i in Invoice.objects.exclude(number=None).select_related("org").order_by("number")
    ]


def lines_of(number):
    invoice = Invoice.objects.get(number=number)
    return [
        (line.description, line.quantity, line.amount_cents) for line in invoice.lines.order_by("position")
    ]


def test_three_months_of_free_starter_with_overage_and_pro_with_an_upgrade_and_a_downgrade(stripe_card):
    PAID = InvoiceStatus.PAID
    tick("2027-01-10T09:00:00Z")
    free = OrgFactory(plan="free", name="Free Co")
    starter = OrgFactory(plan="starter", name="Starter Co")  # INV-…001, $50 in advance
    pro = OrgFactory(plan="starter", name="Pro Co")  # INV-…002, $50 in advance; Pro from the 25th
    stripe_card(starter)
    stripe_card(pro)

    # January: Free uses its whole quota; Starter goes 1,252 credits over; Pro Co goes 5,000
    # over on Starter, then upgrades on the 25th.
    spend(free, 10_000, "f-jan")
    spend(starter, 41_252, "s-jan")
    spend(pro, 45_000, "p-jan")
    assert (balance(free), balance(starter), balance(pro)) == (0, 0, 0)
    tick("2027-01-25T12:00:00Z")  # charges the two opening invoices
    subscription_upgrade(org=pro, plan_code="pro", actor=owner_of(pro))
    # 16 of the 31 days of 10 Jan - 10 Feb remain: ($500 - $50) × 16 / 31 = $232.258… → $232.26.
    # The 360,000 credits it adds absorb the 5,000 of overage: 355,000 left, and no overage.
    assert lines_of("INV-2027-000003") == [
        ("Upgrade from Starter to Pro, prorated: 16 of 31 days", 1, 23_226)
    ]
    assert balance(pro) == 355_000

    # 10 Feb: fee in advance and January's overage in arrears: Starter 1,252 × $1.25 / 1,000
    # = $1.565 → $1.57; Pro Co had none. Free's period rolled on 1 Feb: no invoice, 10,000 back.
    tick("2027-02-10T00:00:00Z")
    assert lines_of("INV-2027-000004") == [
        ("Starter plan, 10 Feb 2027 – 9 Mar 2027", 1, 5_000),
        ("Overage credits, 10 Jan 2027 – 9 Feb 2027", 1_252, 157),
    ]
    assert lines_of("INV-2027-000005") == [("Pro plan, 10 Feb 2027 – 9 Mar 2027", 1, 50_000)]
    assert (balance(free), balance(starter), balance(pro)) == (10_000, 40_000, 400_000)

    # February: Starter goes 800 over; Pro Co uses 10,000 and on the 20th schedules Starter.
    spend(starter, 40_800, "s-feb")
    spend(pro, 10_000, "p-feb")
    tick("2027-02-20T08:00:00Z")
    subscription_downgrade_schedule(org=pro, plan_code="starter", actor=owner_of(pro))
    assert Subscription.objects.get(org=pro).plan.code == "pro"  # until the period ends

    # 10 Mar: Starter 800 × $1.25 / 1,000 = $1.00; Pro Co is on Starter from today, no overage.
    # The tick closes periods with a scheduled downgrade first, so Pro Co's invoice comes first.
    tick("2027-03-10T00:00:00Z")
    assert lines_of("INV-2027-000006") == [("Starter plan, 10 Mar 2027 – 9 Apr 2027", 1, 5_000)]
    assert lines_of("INV-2027-000007") == [
        ("Starter plan, 10 Mar 2027 – 9 Apr 2027", 1, 5_000),
        ("Overage credits, 10 Feb 2027 – 9 Mar 2027", 800, 100),
    ]
    assert (balance(starter), balance(pro)) == (40_000, 40_000)

    # March: nobody goes over. 10 Apr: two plain Starter fees.
    spend(starter, 39_999, "s-mar")
    tick("2027-04-10T00:00:00Z")
    assert [lines_of(n) for n in ("INV-2027-000008", "INV-2027-000009")] == [
        [("Starter plan, 10 Apr 2027 – 9 May 2027", 1, 5_000)],
        [("Starter plan, 10 Apr 2027 – 9 May 2027", 1, 5_000)],
    ]
    tick("2027-04-10T00:05:00Z")  # collects them

    assert issued() == [
        ("INV-2027-000001", "Starter Co", 5_000, PAID),
        ("INV-2027-000002", "Pro Co", 5_000, PAID),
        ("INV-2027-000003", "Pro Co", 23_226, PAID),
        ("INV-2027-000004", "Starter Co", 5_157, PAID),
        ("INV-2027-000005", "Pro Co", 50_000, PAID),
        ("INV-2027-000006", "Pro Co", 5_000, PAID),
        ("INV-2027-000007", "Starter Co", 5_100, PAID),
        ("INV-2027-000008", "Starter Co", 5_000, PAID),
        ("INV-2027-000009", "Pro Co", 5_000, PAID),
    ]
    assert Invoice.objects.filter(org=free).count() == 0
    assert (balance(free), balance(starter), balance(pro)) == (10_000, 40_000, 40_000)
    for org in (free, starter, pro):
        assert_ledger_consistent(org.pk)
