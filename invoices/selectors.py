"""Reads for the Invoices and Payment methods pages."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import QuerySet

from accounts.models import Organisation
from invoices.models import Invoice, PaymentMethod


def invoices_for(*, org: Organisation) -> QuerySet[Invoice]:
    """The customer's invoice history: issued ones only (a voided draft never had a number)."""
    return Invoice.objects.filter(org=org, number__isnull=False).order_by("-issued_at", "-pk")


def invoice_for(*, org: Organisation, number: str) -> Invoice | None:
    """One issued invoice of this organisation by its number, with its lines; None otherwise
    (another organisation's invoice is as unknown as a number that does not exist)."""
    return (
        Invoice.objects.filter(org=org, number=number)
        .prefetch_related("lines", "attempts")
        .select_related("org")
        .first()
    )


def cards_for(*, org: Organisation) -> list[PaymentMethod]:
    """The organisation's saved cards, the default first."""
    return list(
        PaymentMethod.objects.filter(org=org, removed_at__isnull=True).order_by("-is_default", "created_at")
    )


def card_for(*, org: Organisation, payment_method_id: int) -> PaymentMethod | None:
    return PaymentMethod.objects.filter(org=org, pk=payment_method_id, removed_at__isnull=True).first()


@dataclass(frozen=True)
class Seller:
    name: str
    address: str
    email: str
    tax_id: str


def seller() -> Seller:
    """Who issues the invoices (settings.SELLER_*)."""
    return Seller(
        name=settings.SELLER_NAME,
        address=settings.SELLER_ADDRESS,
        email=settings.SELLER_EMAIL,
        tax_id=settings.SELLER_TAX_ID,
    )


def period_last_day(end: datetime | None) -> datetime | None:
    """Periods end exclusively at midnight; people read the day before as the last one."""
    return end - timedelta(days=1) if end else None
