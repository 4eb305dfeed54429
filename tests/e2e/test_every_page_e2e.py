"""Every page, at 1280 and 375 px: it loads, axe finds no serious or critical violation, nothing
scrolls sideways on a phone, nothing is fetched off this machine, the content security policy
is never violated, and a screenshot is saved. Staff's admin pages work under the policy too."""

from datetime import UTC, datetime

import pytest

from accounts import clock
from accounts.models import User
from invoices import services as invoice_services
from invoices.services import LineSpec
from tests.factories import OrgFactory
from usage import services

pytestmark = pytest.mark.django_db(transaction=True)

OWNER_PAGES = [
    "/settings/billing/",
    "/settings/billing/usage/",
    "/settings/billing/plans/",
    "/settings/billing/plans/pro/",
    "/settings/billing/credits/",
    "/settings/billing/invoices/",
    "/settings/billing/payment-methods/",
    "/settings/billing/notifications/",
    "/settings/api-keys/",
    "/pricing/",
]
PUBLIC_PAGES = ["/accounts/login/", "/accounts/signup/", "/accounts/password-reset/", "/pricing/"]


def no_sideways_scroll(page):
    width = page.evaluate("document.documentElement.clientWidth")
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width + 1, f"{page.url} scrolls sideways: {scroll}px of content in {width}px"


@pytest.mark.parametrize("width", [1280, 375])
def test_every_signed_in_page_is_accessible_and_fits(browsing, localstripe, width):
    org = OrgFactory(plan="starter", owner_email="pages@example.com")
    services.usage_events_record(
        sub=org.subscription, events=[services.EventIn("e1", "parse", "base", 1_234, org.created_at)]
    )
    b = browsing(width)
    b.sign_in("pages@example.com")
    for path in OWNER_PAGES:
        response = b.go(path)
        assert response.status == 200, path
        b.page.wait_for_load_state("networkidle")
        b.shot(path.strip("/").replace("/", "-") or "home")
        b.assert_accessible()
        no_sideways_scroll(b.page)
        assert b.csp_violations == [], path
    assert [e for e in b.console_errors if "favicon" not in e] == []


@pytest.mark.parametrize("width", [1280, 375])
def test_every_public_page_is_accessible_and_fits(browsing, width):
    b = browsing(width)
    for path in PUBLIC_PAGES:
        assert b.go(path).status == 200, path
        b.shot(path.strip("/").replace("/", "-"))
        b.assert_accessible()
        no_sideways_scroll(b.page)
        assert b.csp_violations == [], path


def test_a_violation_would_be_caught(browsing):
    """The check above is not vacuous: a <style> added by a script is refused and reported."""
    b = browsing()
    b.go("/accounts/login/")
    b.page.evaluate("document.head.appendChild(document.createElement('style')).textContent = 'p{}'")
    b.page.wait_for_timeout(200)
    assert any("style-src" in v for v in b.csp_violations), b.console_errors
    b.csp_violations.clear()


def test_staff_admin_pages_work_under_the_policy(browsing):
    org = OrgFactory(plan="starter", owner_email="customer@example.com", name="Admin Look Ltd")
    with clock.travel(datetime(2026, 3, 14, tzinfo=UTC)):
        draft = invoice_services.invoice_draft_create(org=org, lines=[LineSpec("Pack", 1, 2_500)])
        invoice = invoice_services.invoice_issue(invoice=draft)
    staff = User.objects.create_superuser(email="staff@example.com", password="correct-horse-battery")
    b = browsing()
    b.go("/admin/login/")
    b.page.locator("#id_username").fill(staff.email)
    b.page.locator("#id_password").fill("correct-horse-battery")
    b.page.get_by_role("button", name="Log in").click()
    b.page.wait_for_load_state()
    pages = [
        "/admin/",
        "/admin/accounts/organisation/",
        f"/admin/accounts/organisation/{org.pk}/change/",
        f"/admin/accounts/organisation/{org.pk}/credits/grant/",
        f"/admin/accounts/user/{staff.pk}/change/",
        "/admin/accounts/user/add/",
        "/admin/usage/ledgerentry/",
        "/admin/invoices/invoice/",
        f"/admin/invoices/invoice/{invoice.pk}/change/",
        "/admin/axes/accessattempt/",
    ]
    for path in pages:
        assert b.go(path).status == 200, path
        b.page.wait_for_load_state("networkidle")
        assert b.csp_violations == [], path
    b.go(f"/admin/accounts/organisation/{org.pk}/credits/grant/")
    b.shot("admin-credits-grant")
    # Our admin sheet (static/css/admin.css, once an inline <style>) is applied.
    align = b.page.locator(".credits-orgs td.num").first.evaluate("e => getComputedStyle(e).textAlign")
    assert align == "right"

    # An admin action with its own page: Void asks for a reason (reason_form.html).
    b.go("/admin/invoices/invoice/")
    b.page.locator(f"input[name=_selected_action][value='{invoice.pk}']").check()
    b.page.locator("select[name=action]").select_option("void")
    b.page.get_by_role("button", name="Go").click()
    b.page.wait_for_load_state()
    assert b.page.locator(".reason-invoices").is_visible()
    assert b.page.locator(".reason-invoices caption").evaluate("e => getComputedStyle(e).textAlign") == "left"
    b.shot("admin-void-reason")
    assert b.csp_violations == []
