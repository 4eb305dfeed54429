"""Invoice PDFs, rendered by WeasyPrint: the only module that imports it (STYLE)."""

from django.conf import settings
from django.template.loader import render_to_string


def invoice_pdf_bytes(*, invoice, lines, customer_emails: list[str]) -> bytes:
    """Renders one invoice, as it is now, to PDF bytes."""
    from weasyprint import HTML  # imported here: loading Pango costs time a web request rarely needs

    html = render_to_string(
        "invoices/pdf.html",
        {
            "invoice": invoice,
            "lines": lines,
            "customer_emails": customer_emails,
            "seller": {
                "name": settings.SELLER_NAME,
                "address_lines": [
                    part.strip() for part in settings.SELLER_ADDRESS.split(",") if part.strip()
                ],
                "email": settings.SELLER_EMAIL,
                "tax_id": settings.SELLER_TAX_ID,
            },
        },
    )
    return HTML(string=html, base_url=str(settings.BASE_DIR)).write_pdf()
