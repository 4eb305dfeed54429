"""A new user signs in and reads the Overview; a member is refused the manager pages."""

import json

import pytest

from accounts.services import member_add
from tests.factories import OrgFactory
from usage import services
from usage.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


def test_owner_signs_in_and_the_overview_matches_the_api_balance(browsing, client):
    org = OrgFactory(plan="pro", owner_email="owner@example.com")
    job, _ = services.job_start(
        sub=org.subscription, req=services.JobRequest("parse", "base", True, 1234, "pdf", 10_000)
    )
    services.job_complete(org_id=org.pk, job_id=job.id)
    assert Job.objects.get(pk=job.pk).credits_charged == 2468
    api = json.loads(
        client.get("/api/v1/balance", headers={"Authorization": f"Bearer {org.raw_key}"}).content
    )

    for width in (1280, 375):
        b = browsing(width)
        b.sign_in("owner@example.com")
        b.go("/settings/billing/")
        assert b.page.get_by_test_id("credits-remaining").inner_text() == f"{api['credits_remaining']:,}"
        assert b.page.get_by_test_id("credits-used").inner_text() == f"{api['credits_used_this_period']:,}"
        assert b.page.locator("nav.tabs [aria-current=page]").inner_text() == "Overview"
        b.shot("overview")
        b.assert_accessible()
        assert not b.console_errors


def test_member_sees_overview_but_is_refused_the_plans_page(browsing):
    org = OrgFactory(plan="starter")
    member_add(org_id=org.pk, email="member@example.com", role="member", password="correct-horse-battery")
    b = browsing()
    b.sign_in("member@example.com")
    b.go("/settings/billing/")
    assert "Plans" not in b.page.locator("nav.tabs").inner_text()
    response = b.go("/settings/billing/plans/")
    assert response.status == 403
    assert "can't open this page" in b.page.content()
    b.shot("member-refused")
    b.assert_accessible()


def test_signed_out_visitor_is_sent_to_sign_in_and_back(browsing):
    OrgFactory(plan="free", owner_email="free@example.com")
    b = browsing()
    b.go("/settings/billing/plans/")
    assert "/accounts/login/" in b.page.url
    b.page.get_by_label("E-mail").fill("free@example.com")
    b.page.get_by_label("Password").fill("correct-horse-battery")
    b.page.get_by_role("button", name="Sign in").click()
    b.page.wait_for_url("**/settings/billing/plans/**")
    assert b.page.get_by_role("link", name="Upgrade now").is_visible()
    b.page.get_by_role("button", name="Sign out").click()
    b.page.wait_for_url("**/accounts/login/**")
