"""CSRF: a POST without the token is refused (403) before any view runs, at every URL of the URL
conf, admin's included, plain or from htmx. The exceptions authenticate otherwise: the metering
API by a bearer key (a session never opens it) and Stripe's webhook by its signature. Every
form on every page carries the token, and htmx sends the one on <body hx-headers>."""

import json
import re
from html.parser import HTMLParser

import pytest
from django.test import Client

from accounts.models import User
from accounts.services import member_add
from tests.security.objects import owner_page_urls
from tests.security.routes import admin_routes, admin_url, all_routes

pytestmark = pytest.mark.django_db

SIGNED_OTHERWISE = {"stripe_webhook": "Stripe's signature header"}


@pytest.fixture
def strict_client(world):
    """A browser signed in as staff who is also A's owner: only the token can be missing."""
    person = User.objects.create_superuser(email="staff-owner@example.com", password="correct-horse-battery")
    member_add(org_id=world.org_a.pk, email=person.email, role="owner")
    client = Client(enforce_csrf_checks=True)
    client.force_login(person)
    return client


def test_a_post_without_the_token_is_refused_at_every_url(strict_client):
    admin = {route.name for route in admin_routes()}
    checked = 0
    for route in all_routes():
        if route.namespace == "api" or route.name in SIGNED_OTHERWISE:
            continue
        url = admin_url(route) if route.name in admin else route.url()
        for headers in ({}, {"HX-Request": "true"}):
            response = strict_client.post(url, {"name": "x"}, headers=headers)
            assert response.status_code == 403, f"POST {url} {headers}: {response.status_code}"
            assert b"CSRF" in response.content, f"POST {url} was refused, but not for its token"
        checked += 1
    assert checked > 150


def test_the_exceptions_authenticate_without_cookies(world, strict_client):
    for route in all_routes():
        if route.name in SIGNED_OTHERWISE:
            assert getattr(route.callback, "csrf_exempt", False), route.name
    # The signed-in browser's session does not open the API: a forged POST gets 401.
    response = strict_client.post("/api/v1/jobs", "{}", content_type="application/json")
    assert response.status_code == 401
    assert json.loads(response.content)["error"]["code"] == "UNAUTHENTICATED"
    unsigned = strict_client.post("/stripe/webhook/", "{}", content_type="application/json")
    assert unsigned.status_code == 400


class Forms(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []
        self.htmx_writes: list[str] = []
        self.body_headers = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "body":
            self.body_headers = attributes.get("hx-headers", "")
        if tag == "form":
            self.forms.append(
                {"method": (attributes.get("method") or "get").lower(), "token": False, **attributes}
            )
        if tag == "input" and attributes.get("name") == "csrfmiddlewaretoken" and self.forms:
            self.forms[-1]["token"] = bool(attributes.get("value"))
        for verb in ("hx-post", "hx-put", "hx-patch", "hx-delete"):
            if verb in attributes:
                self.htmx_writes.append(f"<{tag} {verb}={attributes[verb]}>")


def test_every_form_carries_the_token_and_htmx_sends_it(world, client, localstripe):
    client.force_login(world.owner_a)
    forms = htmx = 0
    for url in owner_page_urls(world) + ["/settings/billing/plans/pro/"]:
        response = client.get(url)
        if response.status_code != 200 or not response["Content-Type"].startswith("text/html"):
            continue
        page = Forms()
        page.feed(response.content.decode())
        for form in page.forms:
            if form["method"] == "post":
                assert form["token"], f"{url}: a POST form without the token: {form}"
                forms += 1
        if page.htmx_writes:
            token = json.loads(page.body_headers or "{}").get("X-CSRFToken", "")
            assert re.fullmatch(r"[A-Za-z0-9]{64}", token), f"{url}: htmx would POST without the token"
            htmx += len(page.htmx_writes)
    assert forms > 10 and htmx >= 3


def test_the_token_on_the_page_lets_the_post_through(world):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(world.owner_a)
    page = browser.get("/settings/billing/notifications/").content.decode()
    token = json.loads(re.search(r"hx-headers='([^']*)'", page)[1])["X-CSRFToken"]
    response = browser.post(
        "/settings/billing/notifications/",
        {"enabled": "on", "threshold": "500", "recipients": "ops@example.com"},
        headers={"HX-Request": "true", "X-CSRFToken": token},
    )
    assert response.status_code == 200
    assert b"CSRF" not in response.content
