"""Invoice PDFs: rendered once per status, served byte for byte, only to those who may see them."""

import subprocess
from decimal import Decimal

import pytest

from accounts.services import member_add
from invoices import services
from invoices.models import InvoicePdf
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db


def issued_invoice(org):
    draft = services.invoice_draft_create(
        org=org,
        lines=[
            services.LineSpec("Pro plan, next month", 1, 50_000),
            services.RateLineSpec("Overage (credits)", 1_252, Decimal("1.25")),
        ],
        kind="period",
    )
    return services.invoice_issue(invoice=draft)


def pdf_text(content: bytes) -> str:
    return subprocess.run(
        ["pdftotext", "-", "-"], input=content, capture_output=True, check=True
    ).stdout.decode()


@pytest.fixture
def owner_client(client):
    org = OrgFactory(plan="pro")
    client.force_login(org.memberships.get().user)
    client.org = org
    return client


def test_pdf_download_is_a_pdf_with_the_number_and_the_total(owner_client):
    invoice = issued_invoice(owner_client.org)
    response = owner_client.get(f"/settings/billing/invoices/{invoice.number}.pdf")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response["Content-Disposition"] == f'attachment; filename="{invoice.number}.pdf"'
    assert response.content.startswith(b"%PDF")
    text = pdf_text(response.content)
    assert invoice.number in text
    assert "$501.57" in text  # $500.00 + 1,252 credits × $1.25 / 1,000 = $1.565 → $1.57
    assert "Issued" in text


def test_pdf_is_served_byte_for_byte_until_the_status_changes(owner_client):
    invoice = issued_invoice(owner_client.org)
    url = f"/settings/billing/invoices/{invoice.number}.pdf"
    first = owner_client.get(url).content
    assert owner_client.get(url).content == first
    assert InvoicePdf.objects.filter(invoice=invoice).count() == 1
    services.invoice_mark_paid(invoice=invoice, reason="paid by bank transfer", actor=None)
    paid = owner_client.get(url).content
    assert paid != first
    assert "Paid on" in pdf_text(paid)
    assert InvoicePdf.objects.filter(invoice=invoice).count() == 2


def test_member_gets_403_for_any_pdf_whether_it_exists_or_not(client):
    org = OrgFactory(plan="pro")
    invoice = issued_invoice(org)
    member = member_add(org_id=org.pk, email="m@example.com", role="member")
    client.force_login(member.user)
    assert client.get(f"/settings/billing/invoices/{invoice.number}.pdf").status_code == 403
    assert client.get("/settings/billing/invoices/INV-2026-999999.pdf").status_code == 403


def test_another_organisations_pdf_is_404(owner_client):
    other = issued_invoice(OrgFactory(plan="starter"))
    assert owner_client.get(f"/settings/billing/invoices/{other.number}.pdf").status_code == 404
    assert not InvoicePdf.objects.exists()


def test_the_worker_renders_missing_pdfs_once_and_billing_tick_leaves_them_to_it(owner_client):
    from django.core.management import call_command

    from invoices.tasks import pdfs_render

    invoice = issued_invoice(owner_client.org)
    call_command("billing_tick")
    assert not InvoicePdf.objects.exists()  # period close never waits for WeasyPrint
    assert pdfs_render.apply().get() == InvoicePdf.objects.count() >= 1
    assert pdfs_render.apply().get() == 0
    assert InvoicePdf.objects.filter(invoice=invoice, status="issued").count() == 1
