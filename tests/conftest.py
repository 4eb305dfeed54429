import json

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection

from accounts import clock
from tests.catalog import catalog_seed
from tests.fake_stripe import card_add, localstripe_running
from usage.selectors import catalog_forget


def pytest_collection_modifyitems(config, items):
    """`postgres` tests run in the PostgreSQL pass of `make test` and are skipped on SQLite."""
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL: runs in the PostgreSQL pass of make test")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _fresh_redis():
    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushdb()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _no_failed_sign_ins(request):
    """django-axes counts failed sign-ins (in the database): every test starts with none."""
    if request.node.get_closest_marker("django_db") is not None:
        from axes.utils import reset

        reset()


@pytest.fixture(autouse=True)
def _forget_process_caches():
    clock.forget()
    catalog_forget()
    cache.clear()  # what a page cached for another test's rows (SQLite reuses their ids)
    yield
    clock.forget()
    catalog_forget()


@pytest.fixture(autouse=True)
def _catalog_in_transactional_tests(request):
    marker = request.node.get_closest_marker("django_db")
    if marker and (marker.kwargs.get("transaction") or "live_server" in request.fixturenames):
        request.getfixturevalue("transactional_db")
        catalog_seed()  # a transactional test's flush removed what the migrations seeded


@pytest.fixture
def is_postgres():
    return connection.vendor == "postgresql"


class ApiClient:
    """Calls /api/v1/ with an API key, JSON in and out."""

    def __init__(self, client, key):
        self.client = client
        self.key = key

    def _headers(self, extra):
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        headers.update(extra or {})
        return headers

    def get(self, path, params=None, headers=None):
        return self.client.get(f"/api/v1/{path}", params or {}, headers=self._headers(headers))

    def post(self, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        return self.client.post(
            f"/api/v1/{path}", data, content_type="application/json", headers=self._headers(headers)
        )


@pytest.fixture
def api_for(client):
    def make(key):
        return ApiClient(client, key)

    return make


# --- Stripe: a real localstripe server for the session (invoices, upgrades, packs) -------------


@pytest.fixture(scope="session")
def localstripe():
    """Starts localstripe on a free loopback port for the whole session, points
    settings.STRIPE_API_BASE at it, and stops it at the end. Yields its base URL."""
    with localstripe_running() as base:
        before = settings.STRIPE_API_BASE
        settings.STRIPE_API_BASE = base
        yield base
        settings.STRIPE_API_BASE = before


@pytest.fixture
def stripe_card(localstripe, settings):
    """stripe_card(org, number="4242424242424242") -> the organisation's saved PaymentMethod, added
    the way the page adds one (a SetupIntent confirmed with the card, then payment_method_add)."""
    settings.STRIPE_API_BASE = localstripe
    return card_add
