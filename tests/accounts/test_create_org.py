import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import Membership, Organisation, Role, User
from usage.models import CreditLot
from usage.selectors import balance_for

pytestmark = pytest.mark.django_db


def run(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_org_prints_org_id_and_key_as_json():
    out = json.loads(
        run(
            "create_org",
            "--name",
            "Acme",
            "--plan",
            "starter",
            "--owner-email",
            "Ann@Example.com",
            "--password",
            "pw-123456789",
        )
    )
    org = Organisation.objects.get(pk=out["org"])
    assert out["api_key"].startswith("sk_")
    owner = User.objects.get(email="ann@example.com")
    assert owner.check_password("pw-123456789")
    assert Membership.objects.get(org=org, user=owner).role == Role.OWNER
    assert balance_for(sub=org.subscription).credits_remaining == 40_000


def test_create_org_without_password_cannot_sign_in():
    run("create_org", "--name", "Acme", "--plan", "free", "--owner-email", "nopw@example.com")
    assert not User.objects.get(email="nopw@example.com").has_usable_password()


def test_existing_email_gets_a_new_membership():
    run(
        "create_org",
        "--name",
        "One",
        "--plan",
        "free",
        "--owner-email",
        "same@example.com",
        "--password",
        "pw-123456789",
    )
    run("create_org", "--name", "Two", "--plan", "pro", "--owner-email", "same@example.com")
    user = User.objects.get(email="same@example.com")
    assert user.memberships.count() == 2
    assert user.check_password("pw-123456789")


def test_overrides_set_the_subscription_figures():
    out = json.loads(
        run(
            "create_org",
            "--name",
            "Big",
            "--plan",
            "enterprise",
            "--owner-email",
            "big@example.com",
            "--monthly-credits",
            "5000000",
            "--rpm",
            "100000",
            "--concurrent-jobs",
            "500",
        )
    )
    sub = Organisation.objects.get(pk=out["org"]).subscription
    assert (sub.monthly_credits, sub.rpm, sub.concurrent_jobs) == (5_000_000, 100_000, 500)
    assert CreditLot.objects.get(org_id=out["org"]).granted == 5_000_000


def test_enterprise_without_overrides_takes_pros_figures():
    out = json.loads(
        run("create_org", "--name", "Ent", "--plan", "enterprise", "--owner-email", "e@example.com")
    )
    sub = Organisation.objects.get(pk=out["org"]).subscription
    assert (sub.monthly_credits, sub.rpm, sub.concurrent_jobs) == (400_000, 300, 20)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "gold"], "Unknown plan 'gold'"),
        (["--plan", "pro", "--rpm", "0"], "rpm override"),
    ],
)
def test_bad_create_org_input_is_refused_and_creates_nothing(args, message):
    with pytest.raises(CommandError, match=message):
        run("create_org", "--name", "X", "--owner-email", "x@example.com", *args)
    assert not Organisation.objects.exists()


def test_add_member_with_role_and_password():
    org_id = json.loads(
        run("create_org", "--name", "Acme", "--plan", "pro", "--owner-email", "o@example.com")
    )["org"]
    out = run(
        "add_member",
        "--org",
        str(org_id),
        "--email",
        "Bob@example.com",
        "--role",
        "billing_admin",
        "--password",
        "pw-123456789",
    )
    assert "bob@example.com" in out
    membership = Membership.objects.get(org_id=org_id, user__email="bob@example.com")
    assert membership.role == Role.BILLING_ADMIN
    assert membership.user.check_password("pw-123456789")


def test_add_member_to_unknown_org_is_refused():
    with pytest.raises(CommandError, match="No organisation with id 999"):
        run("add_member", "--org", "999", "--email", "x@example.com", "--role", "member")
    assert not User.objects.filter(email="x@example.com").exists()
