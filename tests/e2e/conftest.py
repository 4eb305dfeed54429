"""Browser tests: Playwright for Python driving Debian's Chromium against a live server.

Each test gets a fresh browser context whose every request is checked: anything addressed off
this machine is blocked and fails the test, and so does any content security policy violation
on any page it opened. Screenshots go to test-artifacts/.
"""

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

# Playwright's sync API runs an event loop in this thread; the ORM calls the tests make beside it
# are still synchronous.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Runs first in every document: reports each `securitypolicyviolation` event to the test.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", function (e) {
  var where = e.sourceFile ? " by " + e.sourceFile + ":" + e.lineNumber + ":" + e.columnNumber : "";
  var what = e.target && e.target.outerHTML ? " on " + e.target.outerHTML.slice(0, 120) : "";
  console.error("CSP violation: " + e.effectiveDirective + " refused " + (e.blockedURI || "inline") +
    " at " + e.documentURI + where + what + (e.sample ? " (" + e.sample + ")" : ""));
}, true);
"""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.postgres)  # a live server needs a real database


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


class Browsing:
    """One signed-in (or not) person in a browser: a page plus the checks every test makes."""

    def __init__(self, browser, base_url, name, width=1280):
        self.base_url = base_url
        self.name = name
        self.outside: list[str] = []
        self.console_errors: list[str] = []
        self.csp_violations: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
        self.context.add_init_script(REPORT_CSP_VIOLATIONS)
        self.context.route("**/*", self._only_this_machine)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.set_default_timeout(15_000)

    def _only_this_machine(self, route):
        url = route.request.url
        host = urlparse(url).hostname
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def _console(self, message):
        if message.type == "error":
            self.console_errors.append(message.text)
        # Our listener's reports, and Chromium's own "Refused to … Content Security Policy" lines.
        if message.text.startswith("CSP violation:") or "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def go(self, path):
        response = self.page.goto(self.base_url + path)
        return response

    def sign_in(self, email, password="correct-horse-battery"):
        self.go("/accounts/login/")
        self.page.get_by_label("E-mail").fill(email)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_load_state()

    def shot(self, label):
        ARTIFACTS.mkdir(exist_ok=True)
        safe = re.sub(r"[^a-z0-9_-]+", "-", f"{self.name}-{label}".lower())
        path = ARTIFACTS / f"{safe}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_accessible(self):
        """axe-core finds no serious or critical violation on the current page."""
        from axe_playwright_python.sync_playwright import Axe

        results = Axe().run(self.page)
        bad = [v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")]
        assert not bad, "\n".join(
            f"{v['id']} ({v['impact']}): {v['help']} — {[n['target'] for n in v['nodes']][:5]}" for v in bad
        )

    def close(self):
        self.context.close()
        assert not self.outside, f"the page asked for something off this machine: {self.outside}"
        assert not self.csp_violations, "content security policy violations:\n" + "\n".join(
            self.csp_violations
        )


@pytest.fixture
def browsing(browser, live_server, request):
    """browsing() -> a fresh Browsing; each is closed (and checked) at the end of the test."""
    opened = []

    def make(width=1280):
        b = Browsing(browser, live_server.url, f"{request.node.name}-{width}", width)
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()
