"""Staff admin for people, organisations, the plan catalog, subscriptions, periods and API keys."""

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.urls import reverse

from accounts.models import ApiKey, BillingPeriod, Plan, Role, User
from accounts.services import member_add
from tests.factories import OrgFactory, UserFactory
from tests.html_forms import form_data
from usage.models import Bucket
from usage.services import lot_grant

pytestmark = pytest.mark.django_db

ORGS = reverse("admin:accounts_organisation_changelist")


def org_url(org):
    return reverse("admin:accounts_organisation_change", args=[org.pk])


# --- every page ------------------------------------------------------------------------------


def test_every_admin_list_page_loads(admin_client):
    OrgFactory(plan="starter")
    for model in admin.site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        assert admin_client.get(url).status_code == 200, url


def test_every_admin_object_page_loads(admin_client):
    org = OrgFactory(plan="starter")
    for model in admin.site._registry:
        obj = model._default_manager.first()
        if obj is None:
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk])
        assert admin_client.get(url).status_code == 200, url
    assert org.pk


# --- organisations ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["name", "member e-mail", "key prefix"])
def test_search_finds_the_organisation_by_name_member_email_or_key_prefix(admin_client, how):
    org = OrgFactory(plan="starter", name="Acme Documents")
    other = OrgFactory(plan="free", name="Globex")
    member_add(org_id=org.pk, email="Clerk@Acme.test", role=Role.MEMBER)
    term = {
        "name": "acme docu",
        "member e-mail": "clerk@acme.test",
        "key prefix": org.raw_key[:11],
    }[how]

    response = admin_client.get(ORGS, {"q": term})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [org]
    assert other.name not in response.content.decode()


def test_organisation_list_shows_plan_and_balance(admin_client):
    OrgFactory(plan="starter", name="Acme")

    page = admin_client.get(ORGS).content.decode()

    assert "Acme" in page and "Starter" in page and "40,000" in page


def test_organisation_page_shows_subscription_figures_and_balance_by_bucket(admin_client):
    org = OrgFactory(plan="starter")
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=8_000, source="purchase:1", reason="pack")

    response = admin_client.get(org_url(org))

    assert response.status_code == 200
    page = response.content.decode()
    for text in ("Balance by bucket", "Plan", "40,000", "Purchased", "8,000", "48,000", "never"):
        assert text in page, text
    assert "Starter" in page and "$50.00" in page and "$1.25 per 1,000 credits" in page
    assert org.api_keys.get().prefix in page
    assert org.memberships.get().user.email in page


def test_organisation_page_lists_the_latest_ledger_entries_newest_first(admin_client):
    org = OrgFactory(plan="starter")
    for n in range(1, 56):
        lot_grant(
            org_id=org.pk, bucket=Bucket.PURCHASED, credits=n, source=f"t:{n}", reason=f"grant number {n}."
        )

    page = admin_client.get(org_url(org)).content.decode()

    assert page.index("grant number 55.") < page.index("grant number 54.")
    assert "grant number 6." in page
    assert "grant number 5." not in page  # 50 newest: 55..6
    assert "plan credits for the period" not in page


def test_organisation_page_never_shows_an_api_key_hash(admin_client):
    org = OrgFactory(plan="starter")
    key = org.api_keys.get()

    org_page = admin_client.get(org_url(org)).content.decode()
    key_page = admin_client.get(reverse("admin:accounts_apikey_change", args=[key.pk])).content.decode()
    key_list = admin_client.get(reverse("admin:accounts_apikey_changelist")).content.decode()

    for page in (org_page, key_page, key_list):
        assert key.prefix in page
        assert key.key_hash not in page
        assert org.raw_key not in page


def test_organisation_name_can_be_saved_with_the_read_only_sections(admin_client):
    org = OrgFactory(plan="starter", name="Old name")
    lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=10, source="t:1")
    data = form_data(admin_client.get(org_url(org)), "organisation_form")
    data["name"] = ["New name"]

    response = admin_client.post(org_url(org), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    org.refresh_from_db()
    assert org.name == "New name"
    assert org.ledger_entries.count() == 2


def test_member_role_is_editable_on_the_organisation_page(admin_client):
    org = OrgFactory(plan="starter")
    member = member_add(org_id=org.pk, email="m@example.com", role=Role.MEMBER)
    data = form_data(admin_client.get(org_url(org)), "organisation_form")
    row = next(i for i in range(2) if data[f"memberships-{i}-id"] == [str(member.pk)])
    data[f"memberships-{row}-role"] = [Role.BILLING_ADMIN]

    response = admin_client.post(org_url(org), data)

    assert response.status_code == 302
    member.refresh_from_db()
    assert member.role == Role.BILLING_ADMIN


def test_organisation_keeps_at_least_one_owner(admin_client):
    org = OrgFactory(plan="starter")
    owner = org.memberships.get()
    data = form_data(admin_client.get(org_url(org)), "organisation_form")
    data["memberships-0-role"] = [Role.MEMBER]

    response = admin_client.post(org_url(org), data)

    assert response.status_code == 200
    assert "An organisation needs at least one owner." in response.content.decode()
    owner.refresh_from_db()
    assert owner.role == Role.OWNER


def test_organisations_are_not_added_or_deleted_in_admin(admin_client):
    org = OrgFactory(plan="starter")

    assert admin_client.get(reverse("admin:accounts_organisation_add")).status_code == 403
    assert admin_client.post(reverse("admin:accounts_organisation_delete", args=[org.pk])).status_code == 403


# --- catalog and subscriptions ---------------------------------------------------------------


def test_plan_is_editable_but_its_code_is_not(admin_client):
    plan = Plan.objects.get(code="starter")
    url = reverse("admin:accounts_plan_change", args=[plan.pk])
    data = form_data(admin_client.get(url), "plan_form")
    data["monthly_credits"] = ["45000"]
    data["code"] = ["renamed"]

    response = admin_client.post(url, data)

    assert response.status_code == 302
    plan.refresh_from_db()
    assert (plan.code, plan.monthly_credits) == ("starter", 45_000)


def test_subscription_overrides_are_editable_but_plan_and_period_are_not(admin_client):
    org = OrgFactory(plan="starter")
    sub = org.subscription
    pro = Plan.objects.get(code="pro")
    url = reverse("admin:accounts_subscription_change", args=[sub.pk])
    data = form_data(admin_client.get(url), "subscription_form")
    data.update(
        rpm_override=["999"],
        overage_cap_cents=["10000"],
        plan=[str(pro.pk)],
        anchor_day=["3"],
        current_period=[""],
    )

    response = admin_client.post(url, data)

    assert response.status_code == 302
    sub.refresh_from_db()
    assert (sub.rpm, sub.overage_cap_cents) == (999, 10_000)
    assert sub.plan.code == "starter"
    assert sub.current_period_id is not None
    assert sub.anchor_day == org.subscription.anchor_day


def test_subscription_override_of_zero_is_refused(admin_client):
    sub = OrgFactory(plan="starter").subscription
    url = reverse("admin:accounts_subscription_change", args=[sub.pk])
    data = form_data(admin_client.get(url), "subscription_form")
    data["concurrent_jobs_override"] = ["0"]

    response = admin_client.post(url, data)

    assert response.status_code == 200
    assert "greater than or equal to 1" in response.content.decode()
    sub.refresh_from_db()
    assert sub.concurrent_jobs_override is None


def test_billing_periods_are_read_only(admin_client):
    period = BillingPeriod.objects.get(org=OrgFactory(plan="starter"))

    change = admin_client.post(reverse("admin:accounts_billingperiod_change", args=[period.pk]), {})

    assert admin_client.get(reverse("admin:accounts_billingperiod_add")).status_code == 403
    assert change.status_code == 403


# --- API keys --------------------------------------------------------------------------------


def test_revoking_api_keys_asks_once_then_revokes(admin_client):
    org = OrgFactory(plan="starter")
    key = org.api_keys.get()
    url = reverse("admin:accounts_apikey_changelist")
    selected = {"action": "revoke", "_selected_action": [key.pk]}

    ask = admin_client.post(url, {**selected, "index": 0})
    assert ask.status_code == 200
    assert "Yes, revoke" in ask.content.decode()
    key.refresh_from_db()
    assert key.is_active

    done = admin_client.post(url, {**selected, "post": "yes"}, follow=True)
    key.refresh_from_db()
    assert not key.is_active
    assert "Revoked 1 API key." in done.content.decode()
    assert (
        admin_client.get("/api/v1/balance", headers={"Authorization": f"Bearer {org.raw_key}"}).status_code
        == 401
    )


def test_api_keys_cannot_be_added_or_edited_in_admin(admin_client):
    key = OrgFactory(plan="starter").api_keys.get()

    assert admin_client.get(reverse("admin:accounts_apikey_add")).status_code == 403
    response = admin_client.post(reverse("admin:accounts_apikey_change", args=[key.pk]), {"name": "x"})
    assert response.status_code == 403
    assert ApiKey.objects.get(pk=key.pk).name == "Default key"


# --- people ----------------------------------------------------------------------------------


def test_staff_add_a_user_with_email_and_password(admin_client):
    response = admin_client.post(
        reverse("admin:accounts_user_add"),
        {
            "email": "New.Person@Example.com",
            "usable_password": "true",
            "password1": "a-long-passphrase-42",
            "password2": "a-long-passphrase-42",
        },
    )

    assert response.status_code == 302
    user = User.objects.get(email="new.person@example.com")
    assert user.check_password("a-long-passphrase-42")
    assert not user.is_staff


def test_adding_a_user_whose_email_exists_in_another_case_is_refused(admin_client):
    UserFactory(email="taken@example.com")

    response = admin_client.post(
        reverse("admin:accounts_user_add"),
        {"email": "Taken@Example.com", "usable_password": "false"},
    )

    assert response.status_code == 200
    assert "A user with this e-mail address already exists." in response.content.decode()
    assert User.objects.filter(email__iexact="taken@example.com").count() == 1


def test_user_list_is_searchable_by_email_and_shows_organisations(admin_client):
    org = OrgFactory(plan="starter", name="Acme", owner_email="ann@acme.test")
    UserFactory(email="bob@example.com")

    response = admin_client.get(reverse("admin:accounts_user_changelist"), {"q": "ann@acme"})
    assert [u.email for u in response.context["cl"].result_list] == ["ann@acme.test"]

    ann = User.objects.get(email="ann@acme.test")
    page = admin_client.get(reverse("admin:accounts_user_change", args=[ann.pk])).content.decode()
    assert "Acme" in page and "Owner" in page and org_url(org) in page


def test_staff_without_the_ledger_permission_cannot_adjust_credits(client):
    staff = User.objects.create_user(email="support@example.com", password="pw-123456789", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_organisation", "change_organisation"])
    )
    client.force_login(staff)
    org = OrgFactory(plan="starter")

    page = client.get(ORGS)
    assert page.status_code == 200
    assert "grant_credits" not in page.content.decode()
    assert client.get(reverse("admin:accounts_organisation_credits_grant", args=[org.pk])).status_code == 403
    change = client.get(org_url(org)).content.decode()
    assert "Grant credits" not in change


def test_organisation_page_links_to_its_own_records(admin_client):
    org = OrgFactory(plan="starter")
    OrgFactory(plan="free")
    page = admin_client.get(org_url(org)).content.decode()
    links = [
        "usage_ledgerentry",
        "usage_creditlot",
        "usage_job",
        "usage_usageevent",
        "usage_usagerollup",
        "accounts_billingperiod",
    ]

    for name in links:
        url = f"{reverse(f'admin:{name}_changelist')}?org__id__exact={org.pk}"
        assert url in page, name
        response = admin_client.get(url)
        assert response.status_code == 200, name
        assert {row.org_id for row in response.context["cl"].result_list} <= {org.pk}, name
