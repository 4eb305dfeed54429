"""The content security policy (django-csp): our own files only, no inline script or style, no
eval. Every page the URL conf serves is fetched, for a customer, a visitor and staff (admin), and
must carry the policy and contain no inline <script>, <style>, style= or on…= attribute; the
templates are read too, so a branch no test renders cannot bring one in. The browser tests
(tests/e2e) check that no page logs a violation."""

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse

from accounts.models import User
from invoices import stripe_gateway
from tests.security.objects import owner_page_urls
from tests.security.routes import admin_routes, admin_url

pytestmark = pytest.mark.django_db

TEMPLATES = Path(settings.BASE_DIR) / "templates"
# Rendered by WeasyPrint into the PDF, never served to a browser: its <style> is no page's.
NOT_SERVED = {TEMPLATES / "invoices" / "pdf.html"}
DATA_SCRIPT_TYPES = {"application/json"}  # json_script: data, never run


class InlineCode(HTMLParser):
    """Collects what a strict policy refuses: inline scripts and styles, handlers, javascript: URLs."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script" and not attributes.get("src") and attributes.get("type") not in DATA_SCRIPT_TYPES:
            self.found.append(f"inline <script {attrs}>")
        if tag == "style":
            self.found.append("<style> element")
        for name, value in attrs:
            if name == "style":
                self.found.append(f'style="{value}" on <{tag}>')
            if re.fullmatch(r"on[a-z]+|hx-on.*", name):
                self.found.append(f"{name}= handler on <{tag}>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().startswith(
                "javascript:"
            ):
                self.found.append(f"{name}=javascript: on <{tag}>")


def inline_code(html: str) -> list[str]:
    parser = InlineCode()
    parser.feed(html)
    return parser.found


def directives(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}


def assert_strict(response, url):
    policy = directives(response)
    assert policy["default-src"] == ["'self'"], url
    assert policy["script-src"] == ["'self'"], url
    assert policy["style-src"] == ["'self'"], url
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"], url
    assert "unsafe" not in response["Content-Security-Policy"], url


def assert_no_inline_code(response, url):
    if response.status_code == 200 and response["Content-Type"].startswith("text/html"):
        found = inline_code(response.content.decode())
        assert not found, f"{url}: {found}"


def test_every_customer_page_has_the_strict_policy_and_no_inline_code(world, client, localstripe):
    client.force_login(world.owner_a)
    urls = owner_page_urls(world)
    assert len(urls) > 15
    for url in urls:
        response = client.get(url)
        assert response.status_code in (200, 302, 405), url  # 405: a POST-only action
        if url.split("?")[0] != reverse("billing:payment_methods"):  # Stripe.js: see below
            assert_strict(response, url)
        assert_no_inline_code(response, url)


def test_the_pages_a_visitor_sees_have_no_inline_code(client):
    for url in (
        "/accounts/login/",
        "/accounts/signup/",
        "/accounts/password-reset/",
        "/pricing/",
        "/no-such-page/",
    ):
        response = client.get(url)
        assert_strict(response, url)
        assert_no_inline_code(response, url)
    locked = client.get("/settings/billing/")
    assert locked.status_code == 302


def test_every_admin_page_has_the_strict_policy_and_no_inline_code(world, client):
    staff = User.objects.create_superuser(email="staff@example.com", password="correct-horse-battery")
    client.force_login(staff)
    pages = 0
    for route in admin_routes():
        url = admin_url(route)
        response = client.get(url)
        assert response.status_code in (200, 302, 403, 404), f"{url}: {response.status_code}"
        assert_strict(response, url)
        assert_no_inline_code(response, url)
        pages += response.status_code == 200
    assert pages > 60


def test_only_the_payment_methods_page_lets_stripe_js_in_from_its_one_origin(world, client, localstripe):
    client.force_login(world.owner_a)
    policy = directives(client.get(reverse("billing:payment_methods")))
    origin = localstripe  # http://127.0.0.1:<port>, where the page loads the Stripe.js stand-in
    assert policy["script-src"] == ["'self'", origin]
    assert policy["connect-src"] == ["'self'", origin]
    assert policy["frame-src"] == [origin]
    assert origin not in client.get(reverse("billing:overview"))["Content-Security-Policy"]


def test_with_real_stripe_the_page_allows_stripes_own_origins(settings):
    settings.STRIPE_API_BASE = ""
    assert stripe_gateway.csp_sources() == {
        "script-src": ["https://js.stripe.com"],
        "connect-src": ["https://api.stripe.com"],
        "frame-src": ["https://js.stripe.com", "https://hooks.stripe.com"],
    }


@pytest.mark.parametrize(
    "path",
    sorted(p for p in TEMPLATES.rglob("*.html") if p not in NOT_SERVED),
    ids=lambda p: str(p.relative_to(TEMPLATES)),
)
def test_no_template_has_inline_code(path):
    text = path.read_text()
    text = re.sub(r"\{#.*?#\}|\{% comment %\}.*?\{% endcomment %\}", "", text, flags=re.S)
    assert not inline_code(text), f"{path}: {inline_code(text)}"


def test_the_checker_finds_what_the_policy_refuses():
    html = (
        '<script>alert(1)</script><script type="application/json">{}</script><script src="/s.js"></script>'
        '<style>p{}</style><p style="color:red" onclick="x()">a</p><a href="javascript:x()">b</a>'
        '<button hx-on:click="x()">c</button>'
    )
    assert len(inline_code(html)) == 6
