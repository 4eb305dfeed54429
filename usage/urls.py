from django.urls import path

from usage import views

billing_patterns = [
    path("", views.overview, name="overview"),
]
