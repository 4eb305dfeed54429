"""The Settings → Billing tabs, in order; members see only the ones they may open."""

from django.urls import NoReverseMatch, reverse

TABS = [
    # key, label, url name, managers only
    ("overview", "Overview", "billing:overview", False),
    ("usage", "Usage", "billing:usage", False),
    ("plans", "Plans", "billing:plans", True),
    ("credits", "Credits", "billing:credits", True),
    ("invoices", "Invoices", "billing:invoices", True),
    ("payment_methods", "Payment methods", "billing:payment_methods", True),
    ("notifications", "Notifications", "billing:notifications", True),
    ("api_keys", "API keys", "billing:api_keys", True),
]


def billing_tabs(can_manage: bool) -> list[dict]:
    tabs = []
    for key, label, name, managers_only in TABS:
        if managers_only and not can_manage:
            continue
        try:
            url = reverse(name)
        except NoReverseMatch:  # a page not built yet
            continue
        tabs.append({"key": key, "label": label, "url": url})
    return tabs
