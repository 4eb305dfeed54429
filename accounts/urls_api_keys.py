"""Settings → API keys, mounted at /settings/api-keys/ in the "billing" namespace."""

from django.urls import path

from accounts import views

api_key_patterns = [
    path("", views.api_keys, name="api_keys"),
    path("<int:key_id>/revoke/", views.api_key_revoke, name="api_key_revoke"),
]
