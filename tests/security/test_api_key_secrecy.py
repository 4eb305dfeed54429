"""API keys: only a SHA-256 of the secret is stored, the secret is checked by a constant-time
comparison of hashes, and no log line carries it, whatever the request does (DEBUG logging and
the SQL log on)."""

import hashlib
import hmac
import logging

import pytest
from django.db import connection

from accounts import services as account_services
from accounts.models import ApiKey
from tests.factories import OrgFactory
from usage import api as usage_api

pytestmark = pytest.mark.django_db

JOB = {"product": "parse", "pages": 3, "file_type": "pdf", "file_size": 1000}


def wrong_secret(raw: str) -> str:
    prefix, secret = raw[:11], raw[12:]
    return f"{prefix}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def test_only_the_hash_of_the_secret_is_stored():
    org = OrgFactory(plan="starter")
    key = ApiKey.objects.get(org=org)
    assert key.key_hash == hashlib.sha256(org.raw_key.encode()).hexdigest()
    stored = " ".join(str(value) for value in ApiKey.objects.filter(pk=key.pk).values().get().values())
    assert org.raw_key[12:] not in stored  # the prefix is public (it names the key on the page)


def test_the_secret_is_checked_by_comparing_hashes_in_constant_time(api_for, monkeypatch):
    org = OrgFactory(plan="starter")
    compared = []
    real = hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(account_services.hmac, "compare_digest", compare_digest)
    assert api_for(wrong_secret(org.raw_key)).get("balance").status_code == 401
    assert api_for(org.raw_key).get("balance").status_code == 200
    stored = ApiKey.objects.get(org=org).key_hash
    assert [a for a, _ in compared] == [stored, stored]
    assert compared[1][1] == stored and compared[0][1] != stored


@pytest.fixture
def everything_logged(caplog):
    """Every logger at DEBUG, the SQL of every query included."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django")  # Django's own config stops it at INFO
    connection.force_debug_cursor = True
    yield caplog
    connection.force_debug_cursor = False


def logged_text(caplog) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) + repr(record.args) for record in caplog.records)


def test_no_log_line_carries_a_key_whatever_the_request(api_for, client, everything_logged, monkeypatch):
    org = OrgFactory(plan="starter")
    revoked, revoked_raw = account_services.api_key_create(org=org, name="old")
    account_services.api_key_revoke(org_id=org.pk, key_id=revoked.pk)
    secrets = [org.raw_key, revoked_raw, wrong_secret(org.raw_key)]

    api = api_for(org.raw_key)
    assert api.get("balance").status_code == 200
    job = api.post("jobs", JOB).json()
    assert api.post(f"jobs/{job['id']}/complete", {"pages": 3}).status_code == 200
    assert api.get("jobs/not-a-job").status_code == 404
    assert api.post("jobs", {"product": "nope"}).status_code == 400
    assert api.get("no-such-endpoint").status_code == 404
    assert api_for(revoked_raw).get("balance").status_code == 401
    assert api_for(wrong_secret(org.raw_key)).get("balance").status_code == 401
    monkeypatch.setattr(usage_api.selectors, "balance_for", lambda **kwargs: 1 / 0)  # a bug: 500
    assert api.get("balance").status_code == 500

    # A key made on the page: shown once in the response, in no log line.
    client.force_login(org.memberships.get().user)
    page = client.post("/settings/api-keys/", {"name": "CI"})
    made = page.context["secret"]
    assert made in page.content.decode()
    secrets.append(made)

    assert everything_logged.records, "nothing was logged: the check would prove nothing"
    assert any("SELECT" in r.getMessage() for r in everything_logged.records)
    text = logged_text(everything_logged)
    for secret in secrets:
        assert secret[12:] not in text
