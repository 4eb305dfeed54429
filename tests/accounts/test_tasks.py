"""Celery, proven on the real broker: beat's task goes through Redis to a worker and ticks."""

import time

import pytest
from django.conf import settings

from accounts.models import BillingClock
from accounts.tasks import billing_tick
from billing_site.celery import app

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_billing_tick_task_runs_in_a_worker_through_the_redis_broker():
    from celery.contrib.testing.worker import start_worker

    assert settings.CELERY_BROKER_URL.startswith("redis://")
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        billing_tick.delay()
        for _ in range(100):
            if BillingClock.objects.filter(last_tick_at__isnull=False).exists():
                break
            time.sleep(0.1)
    assert BillingClock.objects.get().last_tick_at is not None
