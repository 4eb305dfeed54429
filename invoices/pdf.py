"""Invoice PDFs, rendered by WeasyPrint: the only module that imports it (STYLE)."""

from django.conf import settings
from django.template.loader import render_to_string


def invoice_pdf_bytes(*, invoice, lines, seller, customer_emails: list[str], period_last_day) -> bytes:
    """Renders one invoice, as it is now, to PDF bytes."""
    from weasyprint import HTML  # imported here: loading Pango costs time a web request rarely needs

    html = render_to_string(
        "invoices/pdf.html",
        {
            "invoice": invoice,
            "lines": lines,
            "seller": seller,
            "address_lines": [part.strip() for part in seller.address.split(",") if part.strip()],
            "customer_emails": customer_emails,
            "period_last_day": period_last_day,
        },
    )
    return HTML(string=html, base_url=str(settings.BASE_DIR)).write_pdf()
