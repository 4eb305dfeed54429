"""Every page, at 1280 and 375 px: it loads, axe finds no serious or critical violation, nothing
scrolls sideways on a phone, nothing is fetched off this machine, and a screenshot is saved."""

import pytest

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
    assert [e for e in b.console_errors if "favicon" not in e] == []


@pytest.mark.parametrize("width", [1280, 375])
def test_every_public_page_is_accessible_and_fits(browsing, width):
    b = browsing(width)
    for path in PUBLIC_PAGES:
        assert b.go(path).status == 200, path
        b.shot(path.strip("/").replace("/", "-"))
        b.assert_accessible()
        no_sideways_scroll(b.page)
