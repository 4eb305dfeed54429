from django.contrib import admin
from django.urls import path

from billing_site.views import healthz
from usage.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("healthz", healthz, name="healthz"),
]
