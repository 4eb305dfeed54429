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
