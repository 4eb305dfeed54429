"""Signing in is throttled (django-axes): five wrong passwords for one e-mail from one address
pause that e-mail there for 15 minutes, with a clear message, even for the right password."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.db.models import F

from accounts.models import User
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
PASSWORD = "correct-horse-battery"
PAUSED = "Too many failed sign-ins for this e-mail"


@pytest.fixture
def person():
    org = OrgFactory(plan="free", owner_email="ann@example.com", password=PASSWORD)
    return org.memberships.get().user


def sign_in(client, email, password, address="203.0.113.7", **headers):
    return client.post(LOGIN, {"username": email, "password": password}, REMOTE_ADDR=address, headers=headers)


def fail(client, times, email="ann@example.com", **kwargs):
    for _ in range(times):
        response = sign_in(client, email, "wrong-password", **kwargs)
        assert response.status_code in (200, 429)
    return response


def signed_in(client) -> bool:
    return "_auth_user_id" in client.session


def test_four_failures_then_the_right_password_signs_in(client, person):
    response = fail(client, 4)
    assert "do not match an account" in response.content.decode()
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 302
    assert signed_in(client)


def test_the_fifth_failure_pauses_the_email_with_a_clear_message(client, person):
    fail(client, 4)
    fifth = sign_in(client, "ann@example.com", "wrong-password")
    assert fifth.status_code == 429
    page = fifth.content.decode()
    assert PAUSED in page and "15 minutes" in page and "reset your password" in page
    assert 'name="username"' in page  # still the sign-in page, not a bare error
    right = sign_in(client, "ann@example.com", PASSWORD)
    assert right.status_code == 429
    assert PAUSED in right.content.decode()
    assert not signed_in(client)


def test_the_email_counts_whatever_its_case(client, person):
    for email in (
        "ann@example.com",
        "ANN@example.com",
        " Ann@Example.com",
        "ann@EXAMPLE.COM",
        "aNn@example.com",
    ):
        sign_in(client, email, "wrong-password")
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 429


def test_the_pause_is_for_that_email_from_that_address_only(client, person):
    OrgFactory(plan="free", owner_email="bob@example.com", password=PASSWORD)
    fail(client, 5)
    assert sign_in(client, "bob@example.com", PASSWORD).status_code == 302  # another e-mail
    client.logout()
    assert sign_in(client, "ann@example.com", PASSWORD, address="198.51.100.9").status_code == 302


def test_a_forged_forwarded_for_header_does_not_pick_the_address(client, person):
    for n in range(5):
        sign_in(client, "ann@example.com", "wrong-password", **{"X-Forwarded-For": f"192.0.2.{n}"})
    assert (
        sign_in(client, "ann@example.com", PASSWORD, **{"X-Forwarded-For": "192.0.2.99"}).status_code == 429
    )


def test_after_15_minutes_the_right_password_works_again(client, person):
    fail(client, 5)
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=16))
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 302
    assert signed_in(client)


def test_a_success_clears_the_count(client, person):
    fail(client, 4)
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 302
    client.logout()
    fail(client, 4)
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 302


def test_the_admin_sign_in_is_throttled_too(client):
    User.objects.create_superuser(email="staff@example.com", password=PASSWORD)
    for _ in range(5):
        client.post(
            "/admin/login/", {"username": "staff@example.com", "password": "nope"}, REMOTE_ADDR="203.0.113.8"
        )
    response = client.post(
        "/admin/login/", {"username": "staff@example.com", "password": PASSWORD}, REMOTE_ADDR="203.0.113.8"
    )
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_staff_see_and_clear_lockouts_in_admin(admin_client, client, person):
    fail(client, 5)
    listing = admin_client.get("/admin/axes/accessattempt/")
    assert "ann@example.com" in listing.content.decode()
    ids = list(AccessAttempt.objects.values_list("pk", flat=True))
    admin_client.post(
        "/admin/axes/accessattempt/", {"action": "delete_selected", "_selected_action": ids, "post": "yes"}
    )
    assert not AccessAttempt.objects.exists()
    assert sign_in(client, "ann@example.com", PASSWORD).status_code == 302
