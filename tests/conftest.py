import importlib
import json

import pytest
from django.apps import apps
from django.conf import settings
from django.db import connection

from accounts import clock
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
def _forget_process_caches():
    clock.forget()
    catalog_forget()
    yield
    clock.forget()
    catalog_forget()


def _seed_catalog():
    """Puts back the catalog the data migrations seed (a transactional test's flush removes it)."""
    importlib.import_module("accounts.migrations.0002_default_plans").add_plans(apps, None)
    importlib.import_module("usage.migrations.0002_default_operations").add_operations(apps, None)
    importlib.import_module("usage.migrations.0005_default_packs").add_packs(apps, None)


@pytest.fixture(autouse=True)
def _catalog_in_transactional_tests(request):
    marker = request.node.get_closest_marker("django_db")
    if marker and (marker.kwargs.get("transaction") or "live_server" in request.fixturenames):
        request.getfixturevalue("transactional_db")
        _seed_catalog()


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
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "localstripe"), "--port", str(port), "--from-scratch"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    probe_request = urllib.request.Request(
        f"{base}/v1/customers", headers={"Authorization": "Bearer sk_test_x"}
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(probe_request, timeout=1):  # noqa: S310 (loopback)
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"localstripe did not start on port {port}")
            time.sleep(0.1)
    before = settings.STRIPE_API_BASE
    settings.STRIPE_API_BASE = base
    yield base
    settings.STRIPE_API_BASE = before
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def stripe_card(localstripe, settings):
    """stripe_card(org, number="4242424242424242") -> the organisation's saved PaymentMethod, added
    the way the page adds one (a SetupIntent confirmed with the card, then payment_method_add)."""
    import stripe

    from invoices import services, stripe_gateway

    settings.STRIPE_API_BASE = localstripe

    def add(org, number="4242424242424242"):
        setup = services.payment_method_setup_start(org=org)
        stripe_gateway.configure()
        pm = stripe.PaymentMethod.create(
            type="card", card={"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
        )
        stripe.SetupIntent.confirm(setup.id, payment_method=pm.id)
        return services.payment_method_add(org=org, stripe_payment_method_id=pm.id, setup_intent_id=setup.id)

    return add
