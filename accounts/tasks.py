"""Celery tasks of billing time: beat runs the same tick as `manage.py billing_tick`."""

from celery import shared_task

from accounts.services import clock_move
from billing_site.tick import tick_run


@shared_task(name="billing.tick")
def billing_tick() -> str:
    """Runs every due billing job once, as of billing time now."""
    return str(tick_run(at=clock_move(at=None)))
