"""Thin Celery tasks of the usage app: each takes ids and calls one service."""

from celery import shared_task

from usage import credits


@shared_task(name="usage.recharge_threshold_run", ignore_result=True)
def recharge_threshold_run(org_id: int) -> str:
    """Queued on commit when a charge takes the balance below the threshold: at most one recharge
    (a second task finds it in flight, or the balance back above the threshold, and does nothing)."""
    purchase = credits.recharge_threshold_run(org_id=org_id)
    return "no recharge due" if purchase is None else f"recharge {purchase.pk}: {purchase.status}"
