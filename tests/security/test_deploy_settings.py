"""Production settings (DJANGO_DEBUG off, a real secret key, DJANGO_SECURE_COOKIES on) pass
`manage.py check --deploy` with no warning, and the cookies they set are Secure, HttpOnly and
SameSite. Each check runs the settings in a fresh process, the way a server reads them."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def production_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "AXES_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="billing_site.settings",
        DJANGO_DEBUG="off",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_SECURE_COOKIES="on",
        DJANGO_ALLOWED_HOSTS="billing.example.com",
    )
    return env


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: S603 - our own manage.py with fixed arguments
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=production_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_finds_nothing_under_production_settings():
    result = run("check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr
    assert "WARNING" not in result.stderr


def test_check_deploy_does_warn_about_development_settings():
    """The check above can fail: the development defaults (DEBUG, the dev secret) are refused."""
    env = production_env()
    env.update(DJANGO_DEBUG="on", DJANGO_SECURE_COOKIES="off")
    del env["DJANGO_SECRET_KEY"]
    result = subprocess.run(  # noqa: S603
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    for problem in ("security.W018", "security.W009", "security.W012", "security.W016"):
        assert problem in result.stderr


PRODUCTION_SETTINGS = """
import json
from django.conf import settings
names = ["DEBUG", "SESSION_COOKIE_SECURE", "SESSION_COOKIE_HTTPONLY", "SESSION_COOKIE_SAMESITE",
         "CSRF_COOKIE_SECURE", "CSRF_COOKIE_HTTPONLY", "CSRF_COOKIE_SAMESITE", "SECURE_SSL_REDIRECT",
         "SECURE_HSTS_SECONDS", "SECURE_CONTENT_TYPE_NOSNIFF", "X_FRAME_OPTIONS"]
print(json.dumps({name: getattr(settings, name) for name in names}))
"""


def test_production_cookies_are_secure_httponly_and_samesite():
    result = run("shell", "-c", PRODUCTION_SETTINGS)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "CSRF_COOKIE_SECURE": True,
        "CSRF_COOKIE_HTTPONLY": True,
        "CSRF_COOKIE_SAMESITE": "Lax",
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_CONTENT_TYPE_NOSNIFF": True,
        "X_FRAME_OPTIONS": "DENY",
    }


@pytest.mark.django_db
def test_the_cookies_a_sign_in_sets_carry_the_flags(client, settings):
    """What the browser receives with those settings: both cookies Secure, HttpOnly, SameSite=Lax."""
    from tests.factories import OrgFactory

    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    OrgFactory(plan="free", owner_email="cookie@example.com", password="correct-horse-battery")
    client.get("/accounts/login/", secure=True)
    response = client.post(
        "/accounts/login/",
        {"username": "cookie@example.com", "password": "correct-horse-battery"},
        secure=True,
    )
    assert response.status_code == 302
    for name in ("sessionid", "csrftoken"):
        cookie = response.cookies[name] if name in response.cookies else client.cookies[name]
        assert cookie["secure"] is True, name
        assert cookie["httponly"] is True, name
        assert cookie["samesite"] == "Lax", name
