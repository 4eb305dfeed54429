"""Settings → Billing pages of the accounts app (plans, API keys)."""

from django.urls import path

from accounts import views

billing_patterns = [
    path("plans/", views.plans, name="plans"),
]
