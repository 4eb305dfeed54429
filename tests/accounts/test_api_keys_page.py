"""Settings → API keys: list, create (shown once), revoke after a confirmation (DESIGN §4)."""

import hashlib
import html as htmllib
import re

import pytest
from django.contrib.sessions.models import Session
from django.urls import reverse
from django.utils.html import strip_tags

from accounts.models import ApiKey
from accounts.services import member_add
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

URL = "/settings/api-keys/"


def words(response) -> str:
    return re.sub(r"\s+", " ", htmllib.unescape(strip_tags(response.content.decode())))


def owner_of(org):
    return org.memberships.get(role="owner").user


@pytest.fixture
def org():
    return OrgFactory(plan="starter")


@pytest.fixture
def owner_client(client, org):
    client.force_login(owner_of(org))
    return client


def revoke_url(key):
    return f"/settings/api-keys/{key.pk}/revoke/"


# --- addresses and roles --------------------------------------------------------------------


def test_urls_are_stable_and_billing_urls_still_resolve():
    assert reverse("billing:api_keys") == URL
    assert reverse("billing:api_key_revoke", args=[7]) == "/settings/api-keys/7/revoke/"
    assert reverse("billing:overview") == "/settings/billing/"
    assert reverse("billing:plans") == "/settings/billing/plans/"


def test_signed_out_visitor_goes_to_login(client, org):
    key = org.api_keys.get()
    for url in (URL, revoke_url(key)):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_member_gets_403_everywhere_and_nothing_changes(client, org):
    member = member_add(org_id=org.pk, email="member@example.com", role="member").user
    client.force_login(member)
    key = org.api_keys.get()
    assert client.get(URL).status_code == 403
    assert client.post(URL, {"name": "Sneaky"}).status_code == 403
    assert client.get(revoke_url(key)).status_code == 403
    assert client.post(revoke_url(key)).status_code == 403
    assert client.post("/settings/api-keys/999999/revoke/").status_code == 403  # role first
    assert org.api_keys.count() == 1
    assert org.api_keys.get().is_active


def test_billing_admin_may_manage_keys(client, org):
    admin = member_add(org_id=org.pk, email="admin@example.com", role="billing_admin").user
    client.force_login(admin)
    assert client.get(URL).status_code == 200
    assert client.post(URL, {"name": "CI"}).status_code == 200
    assert org.api_keys.filter(name="CI", created_by=admin).exists()


def test_api_keys_tab_is_in_the_billing_navigation(owner_client):
    html = owner_client.get(URL).content.decode()
    assert f'<a href="{URL}" aria-current="page">API keys</a>' in html


# --- the list -------------------------------------------------------------------------------


def test_list_shows_name_prefix_created_last_used_and_status(owner_client, org, api_for):
    key = org.api_keys.get()
    text = words(owner_client.get(URL))
    assert "Default key" in text
    assert f"{key.prefix}…" in text
    created = key.created_at
    assert f"{created.day} {created:%b %Y}" in text
    assert "Never" in text
    assert "Active" in text

    api_for(org.raw_key).get("balance")
    key.refresh_from_db()
    text = words(owner_client.get(URL))
    assert "Never" not in text
    assert f"{key.last_used_at:%H:%M} UTC" in text


def test_list_shows_only_this_organisations_keys(owner_client, org):
    other = OrgFactory()
    other_key = other.api_keys.get()
    assert other_key.prefix not in owner_client.get(URL).content.decode()


# --- create ---------------------------------------------------------------------------------


def test_new_key_is_shown_once_and_stored_only_hashed(owner_client, org, api_for):
    response = owner_client.post(URL, {"name": "  Production   server "})
    assert response.status_code == 200
    key = org.api_keys.get(name="Production server")
    html = response.content.decode()
    secret = re.search(r'id="new-key-secret"[^>]*>([^<]+)</textarea>', html).group(1)

    assert secret.startswith(key.prefix + "_")
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert "won't be shown again" in words(response)
    assert 'data-copy-target="new-key-secret"' in html
    assert "js/copy.js" in html
    assert "no-store" in response["Cache-Control"]

    # Nowhere else: not in the database in plain text, not in the session, not on the next page.
    assert not ApiKey.objects.filter(key_hash__contains=secret).exists()
    for session in Session.objects.all():
        assert secret not in str(session.get_decoded())
    again = owner_client.get(URL)
    assert secret not in again.content.decode()
    assert "Production server" in words(again)
    assert "new-key-secret" not in again.content.decode()

    # And it works.
    assert api_for(secret).get("balance").status_code == 200


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "Give the key a name of 1 to 100 characters"),
        ("    ", "Give the key a name of 1 to 100 characters"),
        ("x" * 101, "At most 100 characters: shorten the name."),
    ],
)
def test_invalid_name_shows_error_and_creates_nothing(owner_client, org, name, error):
    response = owner_client.post(URL, {"name": name})
    assert response.status_code == 200
    assert error in words(response)
    assert 'class="field-error"' in response.content.decode()
    assert org.api_keys.count() == 1
    assert "new-key-secret" not in response.content.decode()


def test_name_of_100_characters_is_accepted(owner_client, org):
    owner_client.post(URL, {"name": "n" * 100})
    assert org.api_keys.filter(name="n" * 100).exists()


# --- revoke ---------------------------------------------------------------------------------


def test_revoke_asks_in_words_first(owner_client, org):
    key = org.api_keys.get()
    response = owner_client.get(revoke_url(key))
    assert response.status_code == 200
    assert "Revoke key Default key" in words(response)
    assert "Requests using it will get 401 at once." in words(response)
    key.refresh_from_db()
    assert key.is_active  # GET changes nothing


def test_revoking_gives_401_at_once(owner_client, org, api_for):
    key = org.api_keys.get()
    assert api_for(org.raw_key).get("balance").status_code == 200

    response = owner_client.post(revoke_url(key))
    assert response.status_code == 302
    assert response["Location"] == URL

    key.refresh_from_db()
    assert key.revoked_at is not None
    answer = api_for(org.raw_key).get("balance")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "UNAUTHENTICATED"

    text = words(owner_client.get(URL))
    assert "Key “Default key”" in text and "revoked: requests using it now get 401." in text
    assert "Revoked" in text


def test_revoking_twice_is_harmless(owner_client, org):
    key = org.api_keys.get()
    owner_client.post(revoke_url(key))
    key.refresh_from_db()
    first = key.revoked_at
    response = owner_client.post(revoke_url(key), follow=True)
    assert "was already revoked" in words(response)
    key.refresh_from_db()
    assert key.revoked_at == first
    assert "already revoked" in words(owner_client.get(revoke_url(key)))


def test_another_organisations_key_is_404_and_unchanged(owner_client, api_for):
    other = OrgFactory()
    key = other.api_keys.get()
    assert owner_client.get(revoke_url(key)).status_code == 404
    assert owner_client.post(revoke_url(key)).status_code == 404
    key.refresh_from_db()
    assert key.is_active
    assert api_for(other.raw_key).get("balance").status_code == 200


def test_unknown_key_is_404(owner_client):
    assert owner_client.get("/settings/api-keys/999999/revoke/").status_code == 404
