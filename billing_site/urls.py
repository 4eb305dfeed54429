from django.contrib import admin
from django.shortcuts import redirect
from django.urls import include, path

from accounts.urls_billing import billing_patterns as accounts_billing
from billing_site.views import healthz
from usage.api import api
from usage.urls import billing_patterns as usage_billing

billing_patterns = usage_billing + accounts_billing

urlpatterns = [
    path("", lambda request: redirect("billing:overview")),
    path("accounts/", include("accounts.urls")),
    path("settings/billing/", include((billing_patterns, "billing"))),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("healthz", healthz, name="healthz"),
]
