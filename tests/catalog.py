"""The catalog the data migrations seed (plans, operations, packs), put back after a flush."""

import importlib

from django.apps import apps


def catalog_seed() -> None:
    importlib.import_module("accounts.migrations.0002_default_plans").add_plans(apps, None)
    importlib.import_module("usage.migrations.0002_default_operations").add_operations(apps, None)
    importlib.import_module("usage.migrations.0005_default_packs").add_packs(apps, None)
