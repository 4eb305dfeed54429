"""Helpers and fixtures for the prepaid-credits tests (tests/usage/test_credits*.py)."""

import importlib

import pytest
from django.apps import apps

from invoices import stripe_gateway
from tests.billing_support import sub_of, tick
from tests.factories import OrgFactory
from usage import services
from usage.models import Bucket, CreditLot, CreditPack

DECLINING_CARD = "4000000000000341"  # localstripe: attaches, then every charge is declined


def bucket_total(org, bucket) -> int:
    return sum(CreditLot.objects.filter(org=org, bucket=bucket).values_list("remaining", flat=True))


def job(org, pages: int):
    """Starts (holds) a parse/base job of `pages` credits."""
    req = services.JobRequest("parse", "base", False, pages, "pdf", 1_000)
    return services.job_start(sub=sub_of(org), req=req)[0]


def pack(price_dollars: int) -> CreditPack:
    return CreditPack.objects.get(price_cents=price_dollars * 100)


def ensure_packs() -> None:
    """The seeded packs (a transactional test's flush removes what migrations seeded)."""
    if not CreditPack.objects.exists():
        importlib.import_module("usage.migrations.0005_default_packs").add_packs(apps, None)


def payment_intents(org) -> list:
    """The PaymentIntents localstripe holds for the organisation's purchase invoices (a paid
    plan's own first invoice is charged too, and is not counted here)."""
    from invoices.models import Invoice

    org.refresh_from_db()
    if not org.stripe_customer_id:
        return []
    ours = {str(pk) for pk in Invoice.objects.filter(org=org, kind="purchase").values_list("pk", flat=True)}
    found = stripe_gateway.payment_intents_list(customer_id=org.stripe_customer_id)
    return [pi for pi in found if pi.metadata.get("invoice_id") in ours]


@pytest.fixture
def packs(db):
    ensure_packs()
    return {p.price_cents // 100: p for p in CreditPack.objects.all()}


@pytest.fixture
def starter_with_card(packs, stripe_card):
    """A Starter organisation (40,000 plan credits) on 10 May 2027 with a working card. The test
    modules take it under the name they use (`buyer = credits_support.starter_with_card`)."""
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="starter")
    stripe_card(org)
    return org


@pytest.fixture
def eager_tasks():
    """Celery tasks run in the calling thread (as a worker would run them, right after commit)."""
    from billing_site.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


__all__ = ["Bucket", "DECLINING_CARD"]
