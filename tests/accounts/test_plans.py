"""The Plans tab: upgrade now (prorated, quota up, overage absorbed), downgrade at period end,
the overage cap and "Contact sales" (DESIGN §3, §4)."""

import importlib
import re
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from html import unescape

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

import invoices
from accounts import clock
from accounts.models import BillingPeriod, ContactRequest, Plan, Subscription
from accounts.services import clock_move, member_add, subscription_upgrade
from billing_site.errors import BillingError
from tests.billing_support import at, balance, owner_of, sub_of, tick
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage import services as usage_services
from usage.models import Bucket, CreditLot, LedgerEntry
from usage.selectors import balance_for

pytestmark = pytest.mark.django_db

PLANS = reverse("billing:plans")
HTMX = {"HX-Request": "true"}


def change_url(code):
    return reverse("billing:plan_change", args=[code])


def spend(org, credits, tag):
    batch = [usage_services.EventIn(tag, "parse", "base", credits, clock.now())]
    return usage_services.usage_events_record(sub=sub_of(org), events=batch)


def text_of(response):
    """The page's visible text, whitespace collapsed (for phrases split over lines)."""
    html = response.content.decode()
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html))).strip()


def messages_of(response):
    return [str(m) for m in response.context["messages"]] if response.context else []


# --- the payments app's interface, faked -------------------------------------------------------


@dataclass
class FakeLine:
    description: str
    quantity: int
    unit_cents: int


class PaymentDeclined(BillingError):
    def __init__(self, message="Your card was declined."):
        super().__init__("PAYMENT_DECLINED", message, 402)


class FakePayments:
    """Stands in for invoices.services.card_on_file / purchase_charge (DESIGN §5): charges
    succeed (calling on_paid) unless `decline` is set."""

    def __init__(self):
        self.has_card = True
        self.decline = False
        self.crash = False
        self.charges = []  # (org id, lines, description) of successful charges
        self.declined = []
        self.crashed = []  # invoices charged whose request died before on_paid
        self.during_charge = None  # called while the card is being charged, before on_paid

    def card_on_file(self, *, org):
        return self.has_card

    def purchase_charge(self, *, org, lines, description, on_paid, kind="purchase", fulfilment=None):
        invoice = types.SimpleNamespace(
            number="INV-TEST-000001", org_id=org.pk, lines=lines, kind=kind, fulfilment=fulfilment
        )
        if self.decline:
            self.declined.append((org.pk, lines, description))
            raise PaymentDeclined()
        if self.crash:  # charged at Stripe, then the request died before settling it
            self.crashed.append(invoice)
            raise BillingError("STRIPE_UNAVAILABLE", "Card payments are unavailable right now.", 503)
        if self.during_charge is not None:
            self.during_charge()
        on_paid(invoice)
        self.charges.append((org.pk, lines, description))
        return invoice

    @property
    def charged_cents(self):
        return [sum(line.quantity * line.unit_cents for line in lines) for _, lines, _ in self.charges]


@pytest.fixture
def payments(monkeypatch):
    try:
        module = importlib.import_module("invoices.services")
    except ModuleNotFoundError as error:
        if error.name != "invoices.services":
            raise
        module = types.ModuleType("invoices.services")
        monkeypatch.setitem(sys.modules, "invoices.services", module)
        monkeypatch.setattr(invoices, "services", module, raising=False)
    fake = FakePayments()
    monkeypatch.setattr(module, "card_on_file", fake.card_on_file, raising=False)
    monkeypatch.setattr(module, "purchase_charge", fake.purchase_charge, raising=False)
    if not hasattr(module, "LineSpec"):
        monkeypatch.setattr(module, "LineSpec", FakeLine, raising=False)
    return fake


@pytest.fixture
def owner_client(client):
    def login(org):
        client.force_login(owner_of(org))
        return client

    return login


def make_team_plan():
    """A plan between Starter and Pro, for proration and absorption edge cases."""
    return Plan.objects.create(
        code="team",
        name="Team",
        price_cents=9_997,
        monthly_credits=100_000,
        overage_rate=Decimal("1.25"),
        rpm=200,
        concurrent_jobs=15,
        support="Priority",
        sort_order=2,
    )


# --- the page ----------------------------------------------------------------------------------


def test_plans_page_marks_the_current_plan_and_shows_every_plans_terms(owner_client):
    org = OrgFactory(plan="starter")
    response = owner_client(org).get(PLANS)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count("Current plan") == 1
    cards = dict(re.findall(r'data-plan="(\w+)"(.*?)</section>', html, flags=re.S))
    assert "Current plan" in cards["starter"]
    for code in ("free", "pro", "enterprise"):
        assert "Current plan" not in cards[code]
    page = text_of(response)
    for phrase in (
        "Credits a month 10,000",
        "Credits a month 40,000",
        "Credits a month 400,000",
        "$0.00 / month",
        "$50.00 / month",
        "$500.00 / month",
        "Requests a minute 120",
        "Requests a minute 300",
        "Concurrent jobs 20",
        "Support Community",
        "Support Dedicated",
        "Pay-as-you-go at $1.25 per 1,000 credits",
        "Requests are refused (HTTP 402)",
        "Contact sales",
    ):
        assert phrase in page, phrase
    assert f'href="{change_url("pro")}"' in html  # upgrade
    assert f'href="{change_url("free")}"' in html  # downgrade
    assert f'href="{change_url("enterprise")}"' not in html


@pytest.mark.parametrize(
    "url", [PLANS, change_url("pro"), change_url("free"), reverse("billing:contact_sales")]
)
def test_member_gets_403_on_every_plans_url(client, url, payments):
    org = OrgFactory(plan="starter")
    member = member_add(org_id=org.pk, email="member@example.com", role="member").user
    client.force_login(member)
    assert client.get(url).status_code == 403
    assert client.post(url, {"action": "cap", "cap": "5"}).status_code == 403
    sub = sub_of(org)
    assert (sub.plan.code, sub.scheduled_plan_id, sub.overage_cap_cents) == ("starter", None, None)
    assert payments.charges == []


def test_signed_out_visitor_is_sent_to_sign_in():
    from django.test import Client

    response = Client().get(change_url("pro"))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_billing_admin_may_upgrade(client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    admin_user = member_add(org_id=org.pk, email="admin@example.com", role="billing_admin").user
    client.force_login(admin_user)
    response = client.post(change_url("pro"), {"expected_charge_cents": "45000"})
    assert response.status_code == 302
    assert sub_of(org).plan.code == "pro"
    entry = LogEntry.objects.get(object_id=str(sub_of(org).pk))
    assert entry.user == admin_user
    assert "Upgraded from Starter to Pro by admin@example.com" in entry.change_message


# --- upgrades between paid plans ---------------------------------------------------------------


def test_starter_to_pro_with_10_of_30_days_left_charges_150_dollars(owner_client, payments):
    tick("2027-04-15T09:00:00Z")  # period 15 Apr - 15 May 2027: 30 days
    org = OrgFactory(plan="starter")
    tick("2027-05-05T10:00:00Z")  # 5 May: 10 days left, today included
    client = owner_client(org)

    page = client.get(change_url("pro"))
    assert page.status_code == 200
    text = text_of(page)
    assert "Today's charge $150.00" in text  # (50,000 - 5,000) x 10 / 30 = 15,000 cents
    assert "10 of 30 days" in text
    assert "400,000" in text  # the new quota
    assert "Upgrade and pay $150.00" in text

    response = client.post(change_url("pro"), {"expected_charge_cents": "15000"}, follow=True)
    assert payments.charged_cents == [15_000]
    assert "You are now on Pro. We charged $150.00" in " ".join(messages_of(response))
    sub = sub_of(org)
    assert sub.plan.code == "pro"
    assert (sub.rpm, sub.concurrent_jobs) == (300, 20)  # limits rise at once
    period = sub.current_period
    assert (period.start, period.end, period.monthly_credits) == (at("2027-04-15"), at("2027-05-15"), 400_000)
    lot = CreditLot.objects.get(org=org, source=f"upgrade:{period.pk}:pro")
    assert (lot.bucket, lot.granted, lot.expires_at, lot.period_id) == (
        Bucket.PLAN,
        360_000,
        period.end,
        period.pk,
    )
    assert balance(org) == 400_000
    assert balance_for(sub=sub).credits_included == 400_000
    assert_ledger_consistent(org.pk)


def test_a_half_cent_proration_rounds_half_up(owner_client, payments):
    make_team_plan()
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    tick("2027-04-30T10:00:00Z")  # 15 of 30 days left
    client = owner_client(org)
    # (9,997 - 5,000) x 15 / 30 = 2,498.5 cents -> 2,499 (half-up; half-even would give 2,498)
    assert "Today's charge $24.99" in text_of(client.get(change_url("team")))
    client.post(change_url("team"), {"expected_charge_cents": "2499"})
    assert payments.charged_cents == [2_499]
    assert sub_of(org).plan.code == "team"
    assert balance(org) == 100_000
    assert_ledger_consistent(org.pk)


def test_upgrade_absorbs_the_overage_used_this_period(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 45_000, "e1")  # 5,000 credits of overage
    assert balance_for(sub=sub_of(org)).overage_cents == 625
    tick("2027-05-05T10:00:00Z")
    client = owner_client(org)
    page = text_of(client.get(change_url("pro")))
    assert "The 5,000 credits of overage you used this period are covered by them and not billed" in page

    client.post(change_url("pro"), {"expected_charge_cents": "15000"})
    period = BillingPeriod.objects.get(pk=sub_of(org).current_period_id)
    assert (period.overage_credits, period.credits_used, period.monthly_credits) == (0, 45_000, 400_000)
    assert balance(org) == 355_000  # 360,000 more, of which 5,000 covered the overage
    b = balance_for(sub=sub_of(org))
    assert (b.overage_credits, b.overage_cents, b.credits_used_this_period) == (0, 0, 45_000)
    assert_ledger_consistent(org.pk)


def test_overage_beyond_the_quota_increase_stays_overage(owner_client, payments):
    make_team_plan()
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 110_000, "e1")  # 70,000 credits of overage; Team adds only 60,000
    tick("2027-04-30T10:00:00Z")
    owner_client(org).post(change_url("team"), {"expected_charge_cents": "2499"})
    period = BillingPeriod.objects.get(pk=sub_of(org).current_period_id)
    assert (period.overage_credits, period.monthly_credits) == (10_000, 100_000)
    assert balance(org) == 0
    lot = CreditLot.objects.get(org=org, source=f"upgrade:{period.pk}:team")
    assert (lot.granted, lot.remaining) == (60_000, 0)
    assert_ledger_consistent(org.pk)


def test_jobs_after_an_upgrade_spend_the_new_credits_and_the_period_closes_them(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    tick("2027-05-05T10:00:00Z")
    owner_client(org).post(change_url("pro"), {"expected_charge_cents": "15000"})
    spend(org, 100_000, "after")
    assert balance(org) == 300_000
    tick("2027-05-15T00:00:00Z")  # both plan lots of the period expire; Pro's next period opens
    assert balance(org) == 400_000
    assert sub_of(org).current_period.monthly_credits == 400_000
    assert not CreditLot.objects.filter(
        org=org, expired_at__isnull=True, period__end=at("2027-05-15")
    ).exists()
    assert_ledger_consistent(org.pk)


# --- upgrade from Free -------------------------------------------------------------------------


def test_free_to_starter_starts_a_paid_period_today_with_the_full_fee(owner_client, payments):
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")  # period 10 Jan - 1 Feb
    spend(org, 3_000, "f1")
    tick("2027-01-20T15:30:00Z")
    client = owner_client(org)
    text = text_of(client.get(change_url("starter")))
    assert "Today's charge $50.00" in text
    assert "renews on day 20 of each month" in text

    client.post(change_url("starter"), {"expected_charge_cents": "5000"})
    assert payments.charged_cents == [5_000]
    sub = sub_of(org)
    assert (sub.plan.code, sub.anchor_day) == ("starter", 20)
    period = sub.current_period
    assert (period.start, period.end, period.plan.code, period.monthly_credits) == (
        at("2027-01-20"),
        at("2027-02-20"),
        "starter",
        40_000,
    )
    free = BillingPeriod.objects.get(org=org, start=at("2027-01-10"))
    assert free.end == at("2027-01-20") and free.closed_at is not None
    assert not CreditLot.objects.filter(org=org, period=free, remaining__gt=0).exists()  # Free credits end
    assert balance(org) == 40_000
    assert_ledger_consistent(org.pk)

    tick("2027-02-20T00:00:00Z")  # renews on the new anchor day
    assert sub_of(org).current_period.start == at("2027-02-20")
    assert balance(org) == 40_000
    assert_ledger_consistent(org.pk)


def test_free_signup_upgraded_the_same_day_turns_todays_period_into_the_paid_one(owner_client, payments):
    tick("2027-01-20T08:00:00Z")
    org = OrgFactory(plan="free")
    spend(org, 1_000, "f1")
    owner_client(org).post(change_url("pro"), {"expected_charge_cents": "50000"})
    assert payments.charged_cents == [50_000]
    sub = sub_of(org)
    assert (sub.plan.code, sub.anchor_day) == ("pro", 20)
    assert BillingPeriod.objects.filter(org=org).count() == 1
    period = sub.current_period
    assert (period.start, period.end, period.monthly_credits) == (at("2027-01-20"), at("2027-02-20"), 400_000)
    assert balance(org) == 400_000
    assert_ledger_consistent(org.pk)


def test_an_upgrade_from_free_waits_until_an_ended_period_is_rolled(payments):
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")  # period 10 Jan - 1 Feb
    clock_move(at=at("2027-03-05T09:00:00"))  # time moved on; the tick has not rolled Feb and Mar yet
    with pytest.raises(BillingError) as refused:
        subscription_upgrade(org=org, plan_code="starter", actor=None)
    assert refused.value.code == "PERIOD_CLOSING" and payments.charges == []
    tick("2027-03-05T09:00:00Z")
    subscription_upgrade(org=org, plan_code="starter", actor=None)
    starts = [p.start for p in BillingPeriod.objects.filter(org=org).order_by("start")]
    assert starts == [at("2027-01-10"), at("2027-02-01"), at("2027-03-01"), at("2027-03-05")]  # no gap
    assert_ledger_consistent(org.pk)


def test_upgrade_clears_a_scheduled_downgrade(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    client = owner_client(org)
    client.post(change_url("free"))
    assert sub_of(org).scheduled_plan.code == "free"
    client.post(change_url("pro"), {"expected_charge_cents": "45000"})
    sub = sub_of(org)
    assert (sub.plan.code, sub.scheduled_plan) == ("pro", None)


# --- payment refused ---------------------------------------------------------------------------


def test_a_declined_card_changes_nothing(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 45_000, "e1")
    tick("2027-05-05T10:00:00Z")
    payments.decline = True
    entries, lots = LedgerEntry.objects.filter(org=org).count(), CreditLot.objects.filter(org=org).count()

    response = owner_client(org).post(change_url("pro"), {"expected_charge_cents": "15000"})
    assert response.status_code == 200
    assert "Your card was declined. Nothing was changed." in text_of(response)
    assert len(payments.declined) == 1
    sub = sub_of(org)
    assert (sub.plan.code, sub.current_period.monthly_credits, sub.current_period.overage_credits) == (
        "starter",
        40_000,
        5_000,
    )
    assert (LedgerEntry.objects.filter(org=org).count(), CreditLot.objects.filter(org=org).count()) == (
        entries,
        lots,
    )
    assert balance(org) == 0
    assert_ledger_consistent(org.pk)


def test_without_a_card_the_page_says_so_and_a_post_changes_nothing(owner_client, payments):
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")
    payments.has_card = False
    client = owner_client(org)
    page = client.get(change_url("starter"))
    text = text_of(page)
    assert "You have no card on file" in text
    assert "Add a card in Payment methods" in text
    assert "Upgrade and pay" not in text
    try:
        url = reverse("billing:payment_methods")
    except Exception:
        url = None
    if url:
        assert f'href="{url}"' in page.content.decode()

    response = client.post(change_url("starter"), {"expected_charge_cents": "5000"})
    assert "Add a card in Payment methods before upgrading" in text_of(response)
    assert sub_of(org).plan.code == "free"
    assert payments.charges == [] and payments.declined == []
    assert balance(org) == 10_000
    assert_ledger_consistent(org.pk)


def test_without_the_payments_app_an_upgrade_is_refused_plainly(owner_client, monkeypatch):
    monkeypatch.setitem(sys.modules, "invoices.services", None)  # importing it raises ImportError
    monkeypatch.delattr(invoices, "services", raising=False)
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")
    client = owner_client(org)
    assert "You have no card on file" in text_of(client.get(change_url("starter")))
    response = client.post(change_url("starter"), {"expected_charge_cents": "5000"})
    assert response.status_code == 200
    assert "Payments are not available right now" in text_of(response)
    assert sub_of(org).plan.code == "free"


def test_a_charge_that_changed_since_the_page_was_shown_is_not_made(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    tick("2027-05-05T10:00:00Z")
    response = owner_client(org).post(change_url("pro"), {"expected_charge_cents": "16500"})
    assert "Today's charge is now $150.00" in text_of(response)
    assert 'value="15000"' in response.content.decode()  # the page shows the new figure to confirm
    assert sub_of(org).plan.code == "starter" and payments.charges == []


def test_a_second_upgrade_cannot_start_while_one_is_being_paid_for(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    Subscription.objects.filter(org=org).update(upgrade_pending_since=timezone.now())
    response = owner_client(org).post(change_url("pro"), {"expected_charge_cents": "45000"})
    assert "An upgrade is already being paid for" in text_of(response)
    assert sub_of(org).plan.code == "starter" and payments.charges == []


def test_a_stale_upgrade_reservation_without_an_open_payment_does_not_block(owner_client, payments):
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    Subscription.objects.filter(org=org).update(upgrade_pending_since=timezone.now() - timedelta(minutes=5))
    owner_client(org).post(change_url("pro"), {"expected_charge_cents": "45000"})
    sub = sub_of(org)
    assert (sub.plan.code, sub.upgrade_pending_since) == ("pro", None)


def test_a_charge_finished_by_the_reconciler_after_a_crash_applies_the_upgrade_once(owner_client, payments):
    from accounts.services import upgrade_fulfil

    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 41_000, "e1")
    tick("2027-05-05T10:00:00Z")
    payments.crash = True
    owner_client(org).post(change_url("pro"), {"expected_charge_cents": "15000"})
    assert sub_of(org).plan.code == "starter"
    (invoice,) = payments.crashed
    assert invoice.kind == "upgrade"
    assert invoice.fulfilment["upgrade"] | {"actor_id": None, "note": ""} == {
        "plan": "pro",
        "from_plan": "starter",
        "period_id": sub_of(org).current_period_id,
        "today": "2027-05-05",
        "charge_cents": 15_000,
        "actor_id": None,
        "note": "",
    }
    tick("2027-05-05T10:05:00Z")  # the reconciler runs later, as of a later moment
    upgrade_fulfil(invoice)
    sub = sub_of(org)
    assert (sub.plan.code, sub.current_period.monthly_credits, sub.current_period.overage_credits) == (
        "pro",
        400_000,
        0,
    )
    assert balance(org) == 359_000
    upgrade_fulfil(invoice)  # a second call finds the plan already changed and applies nothing
    assert balance(org) == 359_000
    assert_ledger_consistent(org.pk)


def test_a_paid_upgrade_whose_subscription_changed_meanwhile_is_not_applied(payments, caplog):
    from accounts.services import upgrade_fulfil

    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    stale = types.SimpleNamespace(
        org_id=org.pk,
        fulfilment={"upgrade": {"plan": "pro", "from_plan": "free", "period_id": 1, "today": "2027-04-15"}},
    )
    upgrade_fulfil(stale)
    assert sub_of(org).plan.code == "starter"
    assert "paid for an upgrade that was not applied" in caplog.text


def test_the_upgrade_handler_is_registered_with_the_payments_app():
    from accounts.services import upgrade_fulfil

    module = importlib.import_module("invoices.services")
    registry = getattr(module, "_ON_PAID", None)
    if registry is None:
        pytest.skip("the payments app keeps no handler registry")
    assert registry.get("upgrade") is upgrade_fulfil


# --- with the real payments app, against localstripe -------------------------------------------


def test_an_upgrade_paid_through_stripe_issues_a_paid_upgrade_invoice(owner_client, stripe_card, settings):
    from invoices.models import Invoice

    settings.INVOICE_TAX_RATE = "0"
    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)
    tick("2027-05-05T10:00:00Z")
    client = owner_client(org)
    assert "Upgrade and pay $150.00" in text_of(client.get(change_url("pro")))
    response = client.post(change_url("pro"), {"expected_charge_cents": "15000"}, follow=True)
    assert "You are now on Pro. We charged $150.00" in " ".join(messages_of(response))
    invoice = Invoice.objects.get(org=org, kind="upgrade")
    assert (invoice.status, invoice.total_cents) == ("paid", 15_000)
    assert invoice.number.startswith("INV-2027-")
    assert "Starter to Pro" in invoice.lines.get().description
    sub = sub_of(org)
    assert (sub.plan.code, sub.upgrade_pending_since) == ("pro", None)
    assert balance(org) == 400_000
    assert_ledger_consistent(org.pk)


def test_a_card_declined_at_stripe_voids_the_draft_and_changes_nothing(owner_client, stripe_card):
    from invoices.models import Invoice

    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")
    stripe_card(org, "4000000000000341")  # saves, then declines every charge
    response = owner_client(org).post(change_url("starter"), {"expected_charge_cents": "5000"})
    assert "Nothing was changed." in text_of(response)
    invoice = Invoice.objects.get(org=org, kind="upgrade")
    assert (invoice.status, invoice.number) == ("void", None)
    sub = sub_of(org)
    assert (sub.plan.code, sub.anchor_day, sub.upgrade_pending_since) == ("free", 10, None)
    assert balance(org) == 10_000
    assert_ledger_consistent(org.pk)


# --- downgrades --------------------------------------------------------------------------------


def test_downgrade_is_scheduled_and_applied_by_billing_tick_at_period_end(owner_client, client, payments):
    tick("2027-03-10T09:00:00Z")
    org = OrgFactory(plan="pro")  # period 10 Mar - 10 Apr
    spend(org, 1_000, "p1")
    tick("2027-03-25T09:00:00Z")
    client = owner_client(org)
    page = text_of(client.get(change_url("starter")))
    assert "Takes effect on 10 Apr 2027" in page
    response = client.post(change_url("starter"), follow=True)
    assert "Your plan changes to Starter on 10 Apr 2027" in " ".join(messages_of(response))
    sub = sub_of(org)
    assert (sub.plan.code, sub.scheduled_plan.code) == ("pro", "starter")
    assert balance(org) == 399_000 and payments.charges == []  # nothing changes until then

    plans_page = client.get(PLANS)
    assert "Your plan changes to Starter on 10 Apr 2027." in text_of(plans_page)
    assert "Cancel the downgrade" in text_of(plans_page)
    assert "Your plan changes to Starter on 10 Apr 2027." in text_of(client.get(reverse("billing:overview")))

    tick("2027-04-09T23:59:00Z")
    assert sub_of(org).plan.code == "pro"
    report = tick("2027-04-10T00:00:00Z")
    assert "downgrades applied: 1" in report
    sub = sub_of(org)
    assert (sub.plan.code, sub.scheduled_plan, sub.rpm) == ("starter", None, 120)
    period = sub.current_period
    assert (period.start, period.end, period.plan.code, period.monthly_credits) == (
        at("2027-04-10"),
        at("2027-05-10"),
        "starter",
        40_000,
    )
    assert balance(org) == 40_000
    state = (BillingPeriod.objects.filter(org=org).count(), LedgerEntry.objects.filter(org=org).count())
    assert "downgrades applied: 0" in tick("2027-04-10T00:00:00Z")  # a re-run changes nothing
    assert (
        BillingPeriod.objects.filter(org=org).count(),
        LedgerEntry.objects.filter(org=org).count(),
    ) == state
    assert "Your plan changes" not in text_of(client.get(PLANS))
    assert_ledger_consistent(org.pk)


def test_downgrade_to_free_ends_the_next_period_on_the_first(owner_client):
    tick("2027-03-10T09:00:00Z")
    org = OrgFactory(plan="starter")
    owner_client(org).post(change_url("free"))
    tick("2027-04-10T00:00:00Z")
    sub = sub_of(org)
    assert sub.plan.code == "free"
    assert (sub.current_period.start, sub.current_period.end) == (at("2027-04-10"), at("2027-05-01"))
    assert balance(org) == 10_000
    tick("2027-05-01T00:00:00Z")
    assert (sub_of(org).current_period.start, sub_of(org).current_period.end) == (
        at("2027-05-01"),
        at("2027-06-01"),
    )
    assert_ledger_consistent(org.pk)


def test_cancel_the_downgrade_keeps_the_plan(owner_client):
    tick("2027-03-10T09:00:00Z")
    org = OrgFactory(plan="pro")
    client = owner_client(org)
    client.post(change_url("free"))
    assert sub_of(org).scheduled_plan.code == "free"
    response = client.post(
        PLANS, {"action": "cancel-downgrade", "next": reverse("billing:overview")}, follow=True
    )
    assert response.redirect_chain[-1][0] == reverse("billing:overview")
    assert "The downgrade to Free is cancelled" in " ".join(messages_of(response))
    assert sub_of(org).scheduled_plan is None
    tick("2027-04-10T00:00:00Z")
    assert sub_of(org).plan.code == "pro"
    assert balance(org) == 400_000
    entry = LogEntry.objects.filter(object_id=str(sub_of(org).pk)).order_by("-pk").first()
    assert "Downgrade to Free cancelled by" in entry.change_message


def test_a_second_downgrade_replaces_the_first(owner_client):
    tick("2027-03-10T09:00:00Z")
    org = OrgFactory(plan="pro")
    client = owner_client(org)
    client.post(change_url("starter"))
    assert "This replaces the downgrade to Starter" in text_of(client.get(change_url("free")))
    client.post(change_url("free"))
    assert sub_of(org).scheduled_plan.code == "free"


# --- refused changes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, words", [("starter", "already on the Starter plan"), ("enterprise", "contact sales")]
)
def test_the_same_plan_or_enterprise_is_refused_with_a_message(owner_client, payments, code, words):
    org = OrgFactory(plan="starter")
    client = owner_client(org)
    for response in (client.get(change_url(code), follow=True), client.post(change_url(code), follow=True)):
        assert response.redirect_chain[-1][0].startswith(PLANS)
        assert words in " ".join(messages_of(response))
    sub = sub_of(org)
    assert (sub.plan.code, sub.scheduled_plan) == ("starter", None)
    assert payments.charges == []


def test_an_unknown_plan_is_404(owner_client):
    org = OrgFactory(plan="starter")
    client = owner_client(org)
    assert client.get(change_url("platinum")).status_code == 404
    assert client.post(change_url("platinum")).status_code == 404


def test_a_plan_change_never_reaches_another_organisation(client, payments):
    tick("2027-04-15T09:00:00Z")
    mine, theirs = OrgFactory(plan="starter"), OrgFactory(plan="starter")
    client.force_login(owner_of(mine))
    session = client.session
    session["org_id"] = theirs.pk  # not a member there: falls back to their own organisation
    session.save()
    client.post(change_url("pro"), {"expected_charge_cents": "45000"})
    client.post(PLANS, {"action": "cap", "cap": "10"})
    assert sub_of(mine).plan.code == "pro"
    assert (sub_of(theirs).plan.code, sub_of(theirs).overage_cap_cents) == ("starter", None)
    assert [org_id for org_id, _, _ in payments.charges] == [mine.pk]
    assert balance(theirs) == 40_000
    assert_ledger_consistent(theirs.pk)


# --- the overage cap ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, cents",
    [
        ("250", 25_000),
        ("0", 0),
        ("none", None),
        ("None", None),
        ("", None),
        ("1,000,000", 100_000_000),
        ("$75", 7_500),
    ],
)
def test_overage_cap_saves_none_or_whole_dollars(owner_client, typed, cents):
    org = OrgFactory(plan="starter")
    Subscription.objects.filter(org=org).update(overage_cap_cents=12_300)
    response = owner_client(org).post(PLANS, {"action": "cap", "cap": typed}, follow=True)
    assert response.status_code == 200
    assert sub_of(org).overage_cap_cents == cents
    assert any(m.startswith("Saved:") for m in messages_of(response))


@pytest.mark.parametrize(
    "typed, error",
    [
        ("-5", "cannot be negative"),
        ("12.50", "whole number of dollars"),
        ("lots", "whole number of dollars"),
        ("1000001", "at most $1,000,000"),
        ("1e3", "whole number of dollars"),
    ],
)
def test_an_invalid_cap_shows_an_error_by_the_field_and_keeps_the_saved_one(owner_client, typed, error):
    org = OrgFactory(plan="pro")
    Subscription.objects.filter(org=org).update(overage_cap_cents=25_000)
    response = owner_client(org).post(PLANS, {"action": "cap", "cap": typed})
    assert response.status_code == 200
    html = response.content.decode()
    field_error = re.search(r'<p class="field-error" id="id_cap_error">(.*?)</p>', html)
    assert field_error and error in field_error.group(1)
    assert f'value="{typed}"' in html  # what was typed stays in the field
    assert "Saved cap: $250.00 a month" in text_of(response)
    assert sub_of(org).overage_cap_cents == 25_000


def test_cap_saves_through_htmx_as_a_fragment(owner_client):
    org = OrgFactory(plan="starter")
    client = owner_client(org)
    response = client.post(PLANS, {"action": "cap", "cap": "40"}, headers=HTMX)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section class="card" id="overage-cap"')
    assert "<html" not in html
    assert "Saved: overage capped at $40.00 a month." in html
    assert sub_of(org).overage_cap_cents == 4_000
    bad = client.post(PLANS, {"action": "cap", "cap": "4.5"}, headers=HTMX)
    assert bad.status_code == 200 and "field-error" in bad.content.decode()
    assert sub_of(org).overage_cap_cents == 4_000


def test_the_cap_applies_to_jobs(owner_client):
    org = OrgFactory(plan="starter")
    owner_client(org).post(PLANS, {"action": "cap", "cap": "1"})  # $1 = 800 credits of overage
    spend(org, 40_800, "within")
    with pytest.raises(BillingError, match="above your monthly cap of \\$1.00"):
        spend(org, 1, "over")


def test_free_has_no_overage_cap(owner_client):
    org = OrgFactory(plan="free")
    client = owner_client(org)
    assert "Overage cap" not in text_of(client.get(PLANS))
    response = client.post(PLANS, {"action": "cap", "cap": "10"})
    assert "has no overage" in text_of(response)
    assert sub_of(org).overage_cap_cents is None


# --- Contact sales -----------------------------------------------------------------------------

CONTACT = reverse("billing:contact_sales")
ENQUIRY = {
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "company_size": "51-200",
    "message": "We parse two million pages a month and need our own limits.",
}


def test_contact_sales_records_the_request_and_emails_staff(owner_client, mailoutbox, settings):
    settings.STAFF_EMAIL = "sales-team@example.com"
    org = OrgFactory(plan="pro")
    response = owner_client(org).post(CONTACT, ENQUIRY, follow=True)
    assert "Thank you: sales will reply to ada@example.com" in " ".join(messages_of(response))
    enquiry = ContactRequest.objects.get()
    assert (enquiry.org, enquiry.user, enquiry.name, enquiry.company_size, enquiry.handled) == (
        org,
        owner_of(org),
        "Ada Lovelace",
        "51-200",
        False,
    )
    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.to == ["sales-team@example.com"]
    assert "Ada Lovelace" in mail.subject
    assert "two million pages" in mail.body and org.name in mail.body


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("name", " ", "Tell us your name."),
        ("email", "not-an-address", "Enter a valid e-mail address."),
        ("company_size", "", "Choose your company size."),
        ("message", "hi", "at least 10 characters"),
    ],
)
def test_contact_sales_validates_each_field(owner_client, mailoutbox, field, value, error):
    org = OrgFactory(plan="starter")
    response = owner_client(org).post(CONTACT, {**ENQUIRY, field: value})
    assert response.status_code == 200
    html = response.content.decode()
    field_error = re.search(rf'<p class="field-error" id="id_{field}_error">(.*?)</p>', html)
    assert field_error and error in field_error.group(1)
    assert "Ada Lovelace" in html or field == "name"  # what was typed is kept
    assert ContactRequest.objects.count() == 0 and mailoutbox == []


def test_contact_sales_through_htmx_answers_with_the_fragment(owner_client, mailoutbox):
    org = OrgFactory(plan="free")
    response = owner_client(org).post(CONTACT, ENQUIRY, headers=HTMX)
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="card" id="contact-sales"')
    assert "Thank you: sales will reply" in html
    assert ContactRequest.objects.count() == 1 and len(mailoutbox) == 1


def test_contact_requests_are_listed_in_admin(admin_client):
    org = OrgFactory(plan="starter")
    ContactRequest.objects.create(
        org=org, name="Grace", email="g@example.com", company_size="1-10", message="x" * 20
    )
    response = admin_client.get(reverse("admin:accounts_contactrequest_changelist"))
    assert response.status_code == 200
    assert "Grace" in response.content.decode()


# --- concurrency (PostgreSQL) ------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_double_submitted_upgrade_charges_once_while_jobs_run(payments):
    import threading

    from django.db import connection

    tick("2027-04-15T09:00:00Z")
    org = OrgFactory(plan="starter")
    spend(org, 41_000, "before")  # 1,000 credits of overage
    owner = owner_of(org)
    barrier = threading.Barrier(5)
    results = [None] * 5

    def run(i):
        try:
            barrier.wait()
            if i < 3:
                results[i] = subscription_upgrade(org=org, plan_code="pro", actor=owner)
            else:
                results[i] = spend(org, 500, f"during-{i}")
        except Exception as error:  # noqa: BLE001 - the test inspects what each thread got
            results[i] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    upgrades = results[:3]
    assert sum(not isinstance(r, Exception) for r in upgrades) == 1, results
    refused = [r for r in upgrades if isinstance(r, Exception)]
    assert all(
        isinstance(r, BillingError) and r.code in ("SAME_PLAN", "UPGRADE_IN_PROGRESS") for r in refused
    ), [(type(r).__name__, getattr(r, "code", ""), str(r)) for r in refused]
    assert payments.charged_cents == [45_000]
    assert results[3:] == [(1, 0), (1, 0)]
    period = BillingPeriod.objects.get(pk=sub_of(org).current_period_id)
    # 42,000 charged in all; whichever order they ran in, the upgrade absorbed the overage that
    # existed then and later spends came from its lot, so none is left and 358,000 remain
    assert (period.credits_used, period.overage_credits, period.monthly_credits) == (42_000, 0, 400_000)
    assert balance(org) == 358_000
    assert_ledger_consistent(org.pk)


def roll_in_another_connection(sub_id):
    """period_roll, as the tick would run it, from another thread and database connection."""
    import threading

    from django.db import connection

    from accounts.services import period_roll

    result = []

    def run():
        try:
            result.append(period_roll(subscription_id=sub_id, now=clock.now()))
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "period_roll waited on the upgrade's lock"
    return result[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_period_roll_waits_while_an_upgrade_from_free_is_being_paid_for(payments):
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="free")  # period 10 Jan - 1 Feb
    sub_id = sub_of(org).pk
    rolled = []
    payments.during_charge = lambda: rolled.append(roll_in_another_connection(sub_id))

    with clock.travel(at("2027-02-01T09:00:00")):  # the period has ended; the tick has not run
        subscription_upgrade(org=org, plan_code="starter", actor=owner_of(org))
        assert rolled == [False]  # the tick found the upgrade being paid for and left the period
        assert roll_in_another_connection(sub_id) is False  # the upgrade opened a paid period

    sub = sub_of(org)
    assert (sub.plan.code, sub.anchor_day, sub.current_period.plan.code) == ("starter", 1, "starter")
    assert (sub.current_period.start, sub.current_period.end) == (at("2027-02-01"), at("2027-03-01"))
    assert payments.charged_cents == [5_000]
    assert balance(org) == 40_000
    assert_ledger_consistent(org.pk)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_period_ending_while_a_paid_upgrade_is_being_paid_for_closes_after_it_on_the_new_plan(payments):
    tick("2027-01-10T08:00:00Z")
    org = OrgFactory(plan="starter")  # period 10 Jan - 10 Feb
    sub_id = sub_of(org).pk
    rolled = []

    def the_period_ends_and_the_tick_runs():
        with clock.travel(at("2027-02-10T00:00:05")):
            rolled.append(roll_in_another_connection(sub_id))

    payments.during_charge = the_period_ends_and_the_tick_runs
    with clock.travel(at("2027-02-09T23:59:55")):  # the last day: 1 of 31 days left
        subscription_upgrade(org=org, plan_code="pro", actor=owner_of(org))
    assert rolled == [False]
    assert payments.charged_cents == [1_452]  # $450 × 1/31 = $14.516… → $14.52
    assert sub_of(org).current_period.monthly_credits == 400_000  # applied to the paid-for period

    with clock.travel(at("2027-02-10T00:01:00")):  # the next tick closes it, on Pro
        assert roll_in_another_connection(sub_id) is True
    sub = sub_of(org)
    assert (sub.plan.code, sub.current_period.plan.code, sub.current_period.start) == (
        "pro",
        "pro",
        at("2027-02-10"),
    )
    assert balance(org) == 400_000
    assert_ledger_consistent(org.pk)
