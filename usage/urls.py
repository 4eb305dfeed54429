from django.urls import path

from usage import views

billing_patterns = [
    path("", views.overview, name="overview"),
    path("usage/", views.usage_page, name="usage"),
    path("usage.csv", views.usage_csv, name="usage_csv"),
    path("notifications/", views.notifications, name="notifications"),
    path("credits/", views.credits_page, name="credits"),
    path("credits/purchases/<int:purchase_id>/refund/", views.credits_refund, name="credits_refund"),
]
