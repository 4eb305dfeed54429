"""Thin Celery tasks of the invoices app: they take ids and call a service."""

from celery import shared_task

from invoices import services


@shared_task(name="invoices.pdfs_render")
def pdfs_render() -> int:
    """Renders the PDFs issued invoices lack for their status (beat runs it every minute; a
    download renders its own on demand), off the period-close path."""
    return services.invoice_pdfs_render_missing()


@shared_task(name="invoices.webhook_process")
def webhook_process(event_pk: int) -> str:
    return services.webhook_event_process(event_pk=event_pk)
