"""Invoice numbers: INV-YYYY-NNNNNN per calendar year of the issue date, gapless, assigned at issue."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import transaction

from accounts import clock
from billing_site.errors import BillingError
from invoices import services
from invoices.models import Invoice, InvoiceNumberSequence
from invoices.services import LineSpec, RateLineSpec
from tests.factories import OrgFactory
from tests.threads import in_threads

pytestmark = pytest.mark.django_db


def _draft(org, cents=5000):
    return services.invoice_draft_create(
        org=org, lines=[LineSpec("Starter plan", 1, cents)], description="Starter plan", kind="period"
    )


def test_a_draft_has_no_number():
    invoice = _draft(OrgFactory(plan="free"))
    assert invoice.status == Invoice.Status.DRAFT
    assert invoice.number is None


def test_first_invoice_of_the_year_is_number_one_and_the_next_follows():
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 3, 14, 9, 30, tzinfo=UTC)):
        first = services.invoice_issue(invoice=_draft(org))
        second = services.invoice_issue(invoice=_draft(org))
    assert first.number == "INV-2026-000001"
    assert second.number == "INV-2026-000002"
    assert first.status == Invoice.Status.ISSUED
    assert first.issued_at == datetime(2026, 3, 14, 9, 30, tzinfo=UTC)


def test_numbers_run_per_calendar_year_of_the_issue_date():
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)):
        services.invoice_issue(invoice=_draft(org))
        services.invoice_issue(invoice=_draft(org))
    with clock.travel(datetime(2027, 1, 1, 0, 0, tzinfo=UTC)):
        new_year = services.invoice_issue(invoice=_draft(org))
    assert new_year.number == "INV-2027-000001"
    assert InvoiceNumberSequence.objects.get(year=2026).last == 2


def test_a_voided_draft_never_gets_a_number_and_nothing_skips():
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 5, 1, tzinfo=UTC)):
        voided = services.invoice_void(invoice=_draft(org))
        issued = services.invoice_issue(invoice=_draft(org))
    assert voided.status == Invoice.Status.VOID and voided.number is None
    assert issued.number == "INV-2026-000001"


def test_a_rolled_back_issue_gives_its_number_back():
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 5, 1, tzinfo=UTC)):
        draft = _draft(org)
        with pytest.raises(RuntimeError), transaction.atomic():
            services.invoice_issue(invoice=draft)
            raise RuntimeError("crash after numbering")
        draft.refresh_from_db()
        assert draft.number is None and draft.status == Invoice.Status.DRAFT
        assert services.invoice_issue(invoice=draft).number == "INV-2026-000001"


def test_issuing_twice_is_refused_and_keeps_the_number():
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 5, 1, tzinfo=UTC)):
        invoice = services.invoice_issue(invoice=_draft(org))
        with pytest.raises(BillingError) as refused:
            services.invoice_issue(invoice=invoice)
    assert refused.value.status == 409
    invoice.refresh_from_db()
    assert invoice.number == "INV-2026-000001"
    assert InvoiceNumberSequence.objects.get(year=2026).last == 1


def test_numbers_keep_six_digits_and_grow_past_them():
    org = OrgFactory(plan="free")
    InvoiceNumberSequence.objects.create(year=2026, last=999_999)
    with clock.travel(datetime(2026, 5, 1, tzinfo=UTC)):
        assert services.invoice_issue(invoice=_draft(org)).number == "INV-2026-1000000"


def test_totals_add_up_with_tax_and_overage_rounded_half_up_once_per_line(settings):
    settings.INVOICE_TAX_RATE = "20"
    org = OrgFactory(plan="free")
    invoice = services.invoice_draft_create(
        org=org,
        lines=[
            LineSpec("Starter plan, next month", 1, 5000),
            RateLineSpec("Overage: 1,252 credits", 1252, Decimal("1.25")),
        ],
        kind="period",
    )
    lines = list(invoice.lines.all())
    assert [line.amount_cents for line in lines] == [5000, 157]  # $1.565 -> $1.57
    assert invoice.subtotal_cents == 5157
    assert invoice.tax_cents == 1031  # 1,031.4 -> 1,031
    assert invoice.total_cents == 6188


def test_an_invoice_needs_a_line():
    with pytest.raises(BillingError):
        services.invoice_draft_create(org=OrgFactory(plan="free"), lines=[], kind="purchase")


def test_only_drafts_and_issued_invoices_can_be_voided_and_marked_paid(django_user_model):
    staff = django_user_model.objects.create_user(email="staff@example.com", password="x", is_staff=True)
    org = OrgFactory(plan="free")
    with clock.travel(datetime(2026, 6, 2, tzinfo=UTC)):
        invoice = services.invoice_issue(invoice=_draft(org))
        with pytest.raises(BillingError):
            services.invoice_mark_paid(invoice=invoice, reason="  ", actor=staff)
        paid = services.invoice_mark_paid(invoice=invoice, reason="Bank transfer ref 42", actor=staff)
        with pytest.raises(BillingError):
            services.invoice_void(invoice=paid)
    assert paid.status == Invoice.Status.PAID
    assert "Bank transfer ref 42" in paid.staff_note and "staff@example.com" in paid.staff_note


def test_marking_a_draft_paid_issues_it_first(django_user_model):
    staff = django_user_model.objects.create_user(email="staff2@example.com", password="x", is_staff=True)
    with clock.travel(datetime(2026, 6, 2, tzinfo=UTC)):
        paid = services.invoice_mark_paid(
            invoice=_draft(OrgFactory(plan="free")), reason="Cheque", actor=staff
        )
    assert paid.number == "INV-2026-000001" and paid.status == Invoice.Status.PAID


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_ten_threads_issuing_at_once_get_numbers_one_to_ten():
    org = OrgFactory(plan="free")
    drafts = [_draft(org) for _ in range(10)]
    with clock.travel(datetime(2026, 8, 20, tzinfo=UTC)):
        results = in_threads(10, lambda i: services.invoice_issue(invoice=drafts[i]))
    assert [r for r in results if isinstance(r, Exception)] == []
    numbers = sorted(Invoice.objects.filter(org=org).values_list("number", flat=True))
    assert numbers == [f"INV-2026-{n:06d}" for n in range(1, 11)]
    assert InvoiceNumberSequence.objects.get(year=2026).last == 10
