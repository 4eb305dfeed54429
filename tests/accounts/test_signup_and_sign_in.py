"""Sign-up creates a user and their organisation on Free; sign-in is by e-mail; password reset
e-mails a link (console backend in development)."""

import re

import pytest

from accounts.models import Membership, Role, User

pytestmark = pytest.mark.django_db


def test_signup_creates_the_user_and_their_free_organisation_and_signs_them_in(client):
    response = client.post(
        "/accounts/signup/",
        {
            "email": "New@Example.com",
            "organisation": "Newco",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    assert response.status_code == 302 and response["Location"] == "/settings/billing/"
    membership = Membership.objects.select_related("org__subscription__plan").get(
        user__email="new@example.com"
    )
    assert (membership.role, membership.org.name, membership.org.subscription.plan.code) == (
        Role.OWNER,
        "Newco",
        "free",
    )
    page = client.get("/settings/billing/")
    assert page.status_code == 200 and "Upgrade now" in page.content.decode()


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"email": "not-an-email"}, "email", "valid email"),
        ({"password2": "something-else-entirely"}, "password2", "The two passwords differ."),
        ({"password1": "123", "password2": "123"}, "password1", "too short"),
        ({"organisation": "   "}, "organisation", "This field is required."),
    ],
)
def test_bad_signup_input_is_shown_next_to_the_field_and_creates_nothing(client, data, field, message):
    body = {
        "email": "x@example.com",
        "organisation": "X",
        "password1": "a-long-pass-phrase",
        "password2": "a-long-pass-phrase",
    } | data
    response = client.post("/accounts/signup/", body)
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not User.objects.filter(email="x@example.com").exists()


def test_signup_with_an_existing_email_says_to_sign_in(client):
    User.objects.create_user(email="taken@example.com", password="a-long-pass-phrase")
    response = client.post(
        "/accounts/signup/",
        {
            "email": "TAKEN@example.com",
            "organisation": "X",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    assert "sign in instead" in response.content.decode()


def test_sign_in_by_email_and_a_wrong_password_is_refused(client):
    User.objects.create_user(email="ann@example.com", password="a-long-pass-phrase")
    bad = client.post("/accounts/login/", {"username": "ann@example.com", "password": "wrong"})
    assert "do not match an account" in bad.content.decode()
    good = client.post("/accounts/login/", {"username": "ANN@example.com", "password": "a-long-pass-phrase"})
    assert good.status_code == 302


def test_password_reset_emails_a_link_that_sets_a_new_password(client, mailoutbox):
    User.objects.create_user(email="ann@example.com", password="old-pass-phrase-1")
    client.post("/accounts/password-reset/", {"email": "ann@example.com"})
    assert len(mailoutbox) == 1
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", mailoutbox[0].body).group(1)
    form = client.get(link, follow=True)
    client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "new-pass-phrase-2", "new_password2": "new-pass-phrase-2"},
    )
    assert User.objects.get(email="ann@example.com").check_password("new-pass-phrase-2")


def test_sign_out_is_a_post(client):
    user = User.objects.create_user(email="ann@example.com", password="a-long-pass-phrase")
    client.force_login(user)
    assert client.get("/accounts/logout/").status_code == 405
    assert client.post("/accounts/logout/").status_code == 302
