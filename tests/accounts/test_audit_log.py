"""Who changed what (django-auditlog): staff edits in admin, customers' own settings and staff
invoice actions are each recorded with the person, the fields and their old and new values, and
shown in admin; secrets and the state the workers keep are not."""

from datetime import UTC, datetime

import pytest
from auditlog.models import LogEntry
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.management import call_command
from django.urls import reverse

from accounts.models import Plan, Subscription, User
from accounts.services import api_key_create, periods_roll_due
from invoices import services as invoice_services
from invoices.models import Invoice
from invoices.services import LineSpec
from tests.factories import OrgFactory
from tests.html_forms import form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    user = User.objects.create_superuser(email="auditor@example.com", password="x")
    client.force_login(user)
    return user


def entries_for(obj):
    return list(LogEntry.objects.get_for_object(obj).order_by("pk"))


def test_a_plan_price_changed_in_admin_is_recorded_with_who_and_the_old_and_new_price(client, staff):
    plan = Plan.objects.get(code="starter")
    change_url = reverse("admin:accounts_plan_change", args=[plan.pk])
    data = form_data(client.get(change_url), "plan_form")
    data["price_cents"] = ["5500"]
    assert client.post(change_url, data).status_code == 302

    (entry,) = entries_for(plan)
    assert entry.actor == staff and entry.action == LogEntry.Action.UPDATE
    assert entry.changes_dict == {"price_cents": ["5000", "5500"]}
    page = client.get(change_url)
    audit_url = reverse("admin:accounts_plan_auditlog", args=[plan.pk])
    assert audit_url in page.content.decode()  # the "Audit log" button beside History
    history = client.get(audit_url).content.decode()
    assert "auditor@example.com" in history and "5500" in history
    assert "<style" not in history and "css/auditlog.css" in history  # the CSP allows no inline style


def test_a_customer_setting_the_overage_cap_is_recorded_as_them(client):
    org = OrgFactory(plan="starter")
    owner = org.memberships.get().user
    client.force_login(owner)
    client.post(reverse("billing:plans"), {"action": "cap", "cap": "250"})

    entry = entries_for(Subscription.objects.get(org=org))[-1]
    assert entry.actor == owner
    assert entry.changes_dict == {"overage_cap_cents": ["None", "25000"]}


def test_voiding_an_invoice_in_admin_records_the_status_change_and_who(client, staff):
    org = OrgFactory(plan="free")
    invoice = invoice_services.invoice_issue(
        invoice=invoice_services.invoice_draft_create(
            org=org, lines=[LineSpec("Starter plan", 1, 5_000)], kind="period"
        )
    )
    client.post(
        reverse("admin:invoices_invoice_changelist"),
        {"action": "void", ACTION_CHECKBOX_NAME: [invoice.pk], "apply": "yes", "reason": "Duplicate"},
    )
    last = entries_for(Invoice.objects.get(pk=invoice.pk))[-1]
    assert last.actor == staff
    assert last.changes_dict["status"][1] == Invoice.Status.VOID


def test_an_api_key_is_recorded_without_its_hash_and_a_password_change_without_the_password(staff):
    org = OrgFactory(plan="free")
    key, raw = api_key_create(org=org, name="CI")
    (created,) = entries_for(key)
    assert "key_hash" not in created.changes_dict and raw not in str(created.changes)
    staff.set_password("new-secret-2026")
    staff.save()
    assert all("password" not in e.changes_dict for e in entries_for(staff))


def test_the_tick_rolling_periods_writes_no_subscription_entries():
    call_command("billing_tick", "--at", "2027-01-01T00:00:00Z", stdout=None)
    org = OrgFactory(plan="starter")
    sub = Subscription.objects.get(org=org)
    before = len(entries_for(sub))
    assert periods_roll_due(now=datetime(2027, 3, 5, tzinfo=UTC)) == 2
    assert len(entries_for(sub)) == before
