"""Invoice PDFs, rendered by WeasyPrint: the only module that imports it (STYLE).

The invoice template needs nothing from outside (its styles are inline in the document, fonts
are the system's), so WeasyPrint may fetch nothing: no file, no URL. Whatever a customer typed
into an organisation name can then never make the renderer read a file or call a server.
"""

from django.template.loader import render_to_string


def url_fetcher():
    """A WeasyPrint fetcher that refuses every URL, file:// and http(s):// alike."""
    from weasyprint import URLFetcher

    return URLFetcher(allowed_protocols=(), fail_on_errors=False)


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
    return HTML(string=html, url_fetcher=url_fetcher()).write_pdf()
