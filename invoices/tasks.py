"""Thin Celery tasks of the invoices app: they take ids and call a service."""

from celery import shared_task

from invoices import services


@shared_task(name="invoices.webhook_process")
def webhook_process(event_pk: int) -> str:
    return services.webhook_event_process(event_pk=event_pk)
