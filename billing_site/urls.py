from django.contrib import admin
from django.shortcuts import redirect
from django.urls import include, path

from accounts.urls_api_keys import api_key_patterns
from accounts.urls_billing import billing_patterns as accounts_billing
from billing_site.views import healthz
from invoices.urls import billing_patterns as invoices_billing
from invoices.webhooks import stripe_webhook
from usage.api import api
from usage.urls import billing_patterns as usage_billing
from usage.views import pricing

billing_patterns = usage_billing + accounts_billing + invoices_billing

# One "billing" namespace for everything under /settings/: the billing tabs and API keys.
settings_patterns = [
    path("billing/", include(billing_patterns)),
    path("api-keys/", include(api_key_patterns)),
]

urlpatterns = [
    path("", lambda request: redirect("billing:overview")),
    path("accounts/", include("accounts.urls")),
    path("settings/", include((settings_patterns, "billing"))),
    path("pricing/", pricing, name="pricing"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("healthz", healthz, name="healthz"),
    path("stripe/webhook/", stripe_webhook, name="stripe_webhook"),
]
