"""Test data. Organisations are made through the same service as `create_org`, so every one has
its owner, credit account, subscription, first period and plan lot."""

import factory

from accounts.models import Organisation, User
from accounts.services import organisation_create


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("email",)

    email = factory.Sequence(lambda n: f"person{n}@example.com")
    password = factory.django.Password("correct-horse-battery")


class OrgFactory(factory.Factory):
    """OrgFactory(plan="starter") -> Organisation with `.raw_key` (its first API key)."""

    class Meta:
        model = Organisation

    name = factory.Sequence(lambda n: f"Org {n}")
    plan = "starter"
    owner_email = factory.Sequence(lambda n: f"owner{n}@example.com")
    password = "correct-horse-battery"
    monthly_credits = None
    rpm = None
    concurrent_jobs = None

    @classmethod
    def _create(cls, model_class, *, plan, **kwargs):
        org, raw_key = organisation_create(plan_code=plan, **kwargs)
        org.raw_key = raw_key
        return org

    _build = _create
