"""The objects a URL can name, made for organisation A, and how each URL is used: the table the
security tests walk (tests/security/routes.py lists the URLs, this says what to put in them)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from django.urls import reverse

from accounts import clock
from accounts.models import ApiKey
from accounts.services import api_key_create
from invoices import services as invoice_services
from invoices.services import LineSpec
from tests.security.routes import all_routes
from tests.usage.credits_support import ensure_packs
from usage import credits
from usage import services as usage_services
from usage.models import CreditPack, Job

MASTERCARD = "5555555555554444"  # a second card whose last four digits show on the page


@dataclass
class World:
    """Organisation A (its owner and a member) and organisation B (its owner), both on Starter."""

    request: pytest.FixtureRequest
    org_a: object = None
    owner_a: object = None
    member_a: object = None
    org_b: object = None
    owner_b: object = None

    def card(self, org, number="4242424242424242"):
        return self.request.getfixturevalue("stripe_card")(org, number)


@dataclass
class Case:
    """One of A's objects behind a URL: the URL's parameters, a text its owner sees and nobody
    else may, and a snapshot of what a refused request must leave as it was."""

    values: dict
    canary: str
    snapshot: Callable[[], object] = lambda: None


@dataclass(frozen=True)
class Target:
    make: Callable[[World], Case]
    methods: tuple[str, ...]
    api: bool = False  # the metering API: an organisation's key, no roles
    shared: bool = False  # the same for every organisation (a plan): only the role is checked
    owner_status: dict = field(default_factory=lambda: {"GET": 200, "POST": 302})


class NotAnOrganisationsObject:
    """A parameter that names no organisation's object (a signed token)."""

    def __init__(self, reason: str):
        self.reason = reason


# --- how to make each object ------------------------------------------------------------------


def invoice(world: World) -> Case:
    with clock.travel(datetime(2026, 3, 14, tzinfo=UTC)):
        draft = invoice_services.invoice_draft_create(
            org=world.org_a, lines=[LineSpec("Canary widgets for A", 1, 12_345)], kind="period"
        )
        invoice = invoice_services.invoice_issue(invoice=draft)
    return Case({"number": invoice.number}, canary="Canary widgets for A")


def pdf(world: World) -> Case:
    case = invoice(world)
    case.canary = "%PDF"
    return case


def purchase(world: World) -> Case:
    ensure_packs()
    world.card(world.org_a)
    pack = CreditPack.objects.filter(active=True).order_by("price_cents").first()
    purchase, _ = credits.pack_purchase(
        org=world.org_a,
        pack_id=pack.pk,
        token=credits.new_form_token(),
        agreed_to_refund_policy=True,
        actor=None,
    )

    def state():
        purchase.refresh_from_db()
        return purchase.status, purchase.refund_removed_credits

    return Case({"purchase_id": purchase.pk}, canary=f"{purchase.credits:,} credits", snapshot=state)


def card(world: World) -> Case:
    world.card(world.org_a)
    card = world.card(world.org_a, MASTERCARD)

    def state():
        card.refresh_from_db()
        return card.is_default, card.removed_at

    return Case({"pk": card.pk}, canary=str(card), snapshot=state)


def api_key(world: World) -> Case:
    key, _ = api_key_create(org=world.org_a, name="Canary build server of A")
    return Case(
        {"key_id": key.pk},
        canary="Canary build server of A",
        snapshot=lambda: ApiKey.objects.get(pk=key.pk).revoked_at,
    )


def plan(world: World) -> Case:
    return Case({"code": "pro"}, canary="Pro")


def job(world: World) -> Case:
    request = usage_services.JobRequest("parse", "base", False, 7, "pdf", 1_000)
    job, _ = usage_services.job_start(sub=world.org_a.subscription, req=request)
    return Case(
        {"job_id": str(job.pk)},
        canary='"credits_reserved"',
        snapshot=lambda: (Job.objects.get(pk=job.pk).status, Job.objects.get(pk=job.pk).credits_charged),
    )


OBJECTS: dict[str, Target | NotAnOrganisationsObject] = {
    "password_reset_confirm": NotAnOrganisationsObject(
        "a signed one-time token for one user (tests/accounts/test_signup_and_sign_in.py)"
    ),
    "billing:invoice": Target(invoice, ("GET",)),
    "billing:invoice_pdf": Target(pdf, ("GET",)),
    "billing:credits_refund": Target(purchase, ("GET", "POST")),
    "billing:payment_method_default": Target(card, ("POST",)),
    "billing:payment_method_remove": Target(card, ("POST",)),
    "billing:api_key_revoke": Target(api_key, ("GET", "POST")),
    "billing:plan_change": Target(plan, ("GET",), shared=True),
    "api:job_detail": Target(job, ("GET",), api=True, owner_status={"GET": 200}),
    "api:job_complete": Target(job, ("POST",), api=True, owner_status={"POST": 200}),
    "api:job_fail": Target(job, ("POST",), api=True, owner_status={"POST": 200}),
}

# Objects named in a query string, which the URL conf cannot list: the confirmation steps.
QUERY_OBJECTS = {
    "remove a card": ("billing:payment_methods", card, "remove", "pk"),
    "refund a purchase": ("billing:credits", purchase, "refund", "purchase_id"),
}


def owner_page_urls(world: World) -> list[str]:
    """Every page A's owner can GET, from the URL conf, with A's objects in the ones that name
    one, and the confirmation steps named in a query string."""
    urls = []
    for route in all_routes():
        if route.namespace in ("admin", "api") or route.name in ("logout", "org_switch", "stripe_webhook"):
            continue
        target = OBJECTS.get(route.name)
        if not route.params:
            urls.append(route.url())
        elif isinstance(target, Target) and "GET" in target.methods and not target.api:
            urls.append(route.url(**target.make(world).values))
    for name, make, param, value_key in QUERY_OBJECTS.values():
        urls.append(f"{reverse(name)}?{param}={make(world).values[value_key]}")
    return urls
