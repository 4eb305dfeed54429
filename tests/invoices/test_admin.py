"""Staff screens for invoices: issue, void and mark paid (with a reason); frozen once issued."""

from datetime import UTC, datetime

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.urls import reverse

from accounts import clock
from invoices import services
from invoices.models import Invoice, InvoiceLine
from invoices.services import LineSpec
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:invoices_invoice_changelist")


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create_superuser(email="staff@example.com", password="x")
    client.force_login(staff)
    return client


def _draft(org, cents=5000):
    return services.invoice_draft_create(org=org, lines=[LineSpec("Starter plan", 1, cents)], kind="period")


def test_issue_action_numbers_the_selected_drafts(staff_client):
    org = OrgFactory(plan="free")
    drafts = [_draft(org), _draft(org)]
    with clock.travel(datetime(2026, 2, 1, tzinfo=UTC)):
        response = staff_client.post(
            CHANGELIST, {"action": "issue", ACTION_CHECKBOX_NAME: [d.pk for d in drafts]}, follow=True
        )
    assert "Issued 2 invoices." in response.content.decode()
    numbers = sorted(Invoice.objects.filter(org=org).values_list("number", flat=True))
    assert numbers == ["INV-2026-000001", "INV-2026-000002"]


def test_mark_paid_asks_for_a_reason_then_keeps_it(staff_client):
    org = OrgFactory(plan="free")
    invoice = services.invoice_issue(invoice=_draft(org))
    ask = staff_client.post(CHANGELIST, {"action": "mark_paid", ACTION_CHECKBOX_NAME: [invoice.pk]})
    assert ask.status_code == 200 and "Mark invoices paid" in ask.content.decode()
    missing = staff_client.post(
        CHANGELIST, {"action": "mark_paid", ACTION_CHECKBOX_NAME: [invoice.pk], "apply": "yes", "reason": ""}
    )
    assert "Give a reason; it is kept on the invoice." in missing.content.decode()
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.ISSUED
    done = staff_client.post(
        CHANGELIST,
        {"action": "mark_paid", ACTION_CHECKBOX_NAME: [invoice.pk], "apply": "yes", "reason": "Wire ref 77"},
        follow=True,
    )
    assert "Marked paid 1 invoice." in done.content.decode()
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID and "Wire ref 77" in invoice.staff_note


def test_void_action_refuses_paid_invoices_and_voids_drafts_without_a_number(staff_client, django_user_model):
    org = OrgFactory(plan="free")
    draft = _draft(org)
    paid = services.invoice_mark_paid(
        invoice=services.invoice_issue(invoice=_draft(org)),
        reason="cheque",
        actor=django_user_model.objects.get(email="staff@example.com"),
    )
    response = staff_client.post(
        CHANGELIST,
        {"action": "void", ACTION_CHECKBOX_NAME: [draft.pk, paid.pk], "apply": "yes", "reason": "Duplicate"},
        follow=True,
    )
    html = response.content.decode()
    assert "Voided 1 invoice." in html and "only drafts and unpaid invoices can be voided" in html
    draft.refresh_from_db()
    paid.refresh_from_db()
    assert draft.status == Invoice.Status.VOID and draft.number is None
    assert paid.status == Invoice.Status.PAID


def test_an_issued_invoice_and_its_lines_are_read_only(staff_client):
    invoice = services.invoice_issue(invoice=_draft(OrgFactory(plan="free")))
    page = staff_client.get(reverse("admin:invoices_invoice_change", args=[invoice.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="lines-0-quantity"' not in html and 'name="description"' not in html


def test_editing_a_drafts_lines_recomputes_its_totals(staff_client):
    draft = _draft(OrgFactory(plan="free"))
    line = draft.lines.get()
    url = reverse("admin:invoices_invoice_change", args=[draft.pk])
    data = {
        "org": draft.org_id,
        "kind": "period",
        "description": "Edited",
        "lines-TOTAL_FORMS": "1",
        "lines-INITIAL_FORMS": "1",
        "lines-MIN_NUM_FORMS": "0",
        "lines-MAX_NUM_FORMS": "1000",
        "lines-0-id": line.pk,
        "lines-0-invoice": draft.pk,
        "lines-0-position": "0",
        "lines-0-description": "Starter plan",
        "lines-0-quantity": "3",
        "lines-0-unit_cents": "5000",
        "lines-0-unit_rate": "",
        "attempts-TOTAL_FORMS": "0",
        "attempts-INITIAL_FORMS": "0",
        "attempts-MIN_NUM_FORMS": "0",
        "attempts-MAX_NUM_FORMS": "1000",
    }
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    draft.refresh_from_db()
    assert InvoiceLine.objects.get(pk=line.pk).amount_cents == 15000
    assert draft.total_cents == 15000 and draft.description == "Edited"


def test_payment_screens_are_read_only(staff_client):
    for name in ("paymentattempt", "paymentmethod", "stripewebhookevent"):
        assert staff_client.get(reverse(f"admin:invoices_{name}_changelist")).status_code == 200
        assert staff_client.get(reverse(f"admin:invoices_{name}_add")).status_code == 403
