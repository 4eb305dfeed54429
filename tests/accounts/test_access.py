"""Which organisation a signed-in person works in, and the switcher in the header (DESIGN §4)."""

import re

import pytest
from django.urls import reverse

from accounts.models import Membership
from accounts.services import member_add
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

OVERVIEW = "/settings/billing/"
USAGE = "/settings/billing/usage/"


def switcher(html: str) -> list[tuple[str, bool]]:
    """The switcher's organisations, in order, and whether each is the selected one."""
    select = re.search(r'<select id="org-switch-select" name="org">(.*?)</select>', html, re.S)
    if not select:
        return []
    return [
        (name, bool(selected))
        for selected, name in re.findall(r'<option value="\d+"( selected)?>([^<]*)</option>', select.group(1))
    ]


@pytest.fixture
def two_orgs_client(client):
    """Signed in as someone who owns Zebra Labs and later joined Acme as a member."""
    zebra = OrgFactory(name="Zebra Labs", plan="pro", owner_email="sam@example.com")
    acme = OrgFactory(name="Acme", plan="free")
    member_add(org_id=acme.pk, email="sam@example.com", role="member")
    client.force_login(zebra.memberships.get().user)
    client.orgs = {"zebra": zebra, "acme": acme}
    return client


def test_someone_in_two_organisations_starts_in_the_first_they_joined(two_orgs_client):
    html = two_orgs_client.get(OVERVIEW).text

    assert switcher(html) == [("Acme", False), ("Zebra Labs", True)]  # by name
    assert "Upgrade now" not in html  # Zebra Labs is on Pro


def test_switching_shows_the_other_organisation_with_the_role_held_there(two_orgs_client):
    acme = two_orgs_client.orgs["acme"]

    response = two_orgs_client.post(reverse("org_switch"), {"org": acme.pk, "next": USAGE})

    assert response.status_code == 302 and response["Location"] == USAGE
    html = two_orgs_client.get(USAGE).text
    assert switcher(html) == [("Acme", True), ("Zebra Labs", False)]
    assert "an owner or billing admin of Acme can make one for you" in html  # a member there
    assert two_orgs_client.get(reverse("billing:plans")).status_code == 403


def test_leaving_the_chosen_organisation_falls_back_to_the_first(two_orgs_client):
    acme = two_orgs_client.orgs["acme"]
    two_orgs_client.post(reverse("org_switch"), {"org": acme.pk, "next": USAGE})

    Membership.objects.filter(org=acme).exclude(role="owner").delete()

    html = two_orgs_client.get(OVERVIEW).text
    assert switcher(html) == []  # one organisation left: its name, no switcher
    assert '<span class="org-name">Zebra Labs</span>' in html


def test_someone_cannot_switch_to_an_organisation_they_are_not_in(two_orgs_client):
    stranger = OrgFactory(name="Stranger")

    assert two_orgs_client.post(reverse("org_switch"), {"org": stranger.pk, "next": USAGE}).status_code == 404
    assert switcher(two_orgs_client.get(OVERVIEW).text) == [("Acme", False), ("Zebra Labs", True)]
