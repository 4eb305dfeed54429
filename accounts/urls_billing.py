"""Settings → Billing pages of the accounts app (plans, API keys)."""

from django.urls import path

from accounts import views

billing_patterns = [
    path("plans/", views.plans, name="plans"),
    path("plans/contact-sales/", views.contact_sales, name="contact_sales"),
    path("plans/<slug:code>/", views.plan_change, name="plan_change"),
]
