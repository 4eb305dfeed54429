"""Staff credit adjustments (the Grant credits and Remove credits admin actions) and the read-only
credit, job and usage screens."""

from datetime import timedelta
from uuid import uuid4

import pytest
from django.urls import reverse

from accounts import clock
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage.models import (
    Bucket,
    CreditAccount,
    CreditLot,
    EntryKind,
    Job,
    LedgerEntry,
    Operation,
    UsageEvent,
    UsageRollup,
)
from usage.selectors import balance_for
from usage.services import EventIn, JobRequest, job_complete, job_start, usage_events_record

pytestmark = pytest.mark.django_db

ORGS = reverse("admin:accounts_organisation_changelist")


def credits_action(client, action, orgs, **fields):
    """Submits the action's form, as the intermediate page does."""
    data = {"action": action, "_selected_action": [org.pk for org in orgs], "apply": "yes", **fields}
    return client.post(ORGS, data)


def grant(client, orgs, **fields):
    fields = {
        "credits": "5000",
        "bucket": "purchased",
        "reason": "Goodwill",
        "grant_id": uuid4().hex,
        **fields,
    }
    return credits_action(client, "grant_credits", orgs, **fields)


def remove(client, orgs, **fields):
    return credits_action(
        client, "remove_credits", orgs, **{"credits": "100", "reason": "Correction", **fields}
    )


def balance(org) -> int:
    return CreditAccount.objects.get(org=org).balance


def ledger_size(org) -> int:
    return LedgerEntry.objects.filter(org=org).count()


# --- the intermediate page -------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, button", [("grant_credits", "Grant credits"), ("remove_credits", "Remove credits")]
)
def test_credit_actions_first_show_a_form_and_change_nothing(admin_client, action, button):
    org = OrgFactory(plan="starter", name="Acme")

    response = admin_client.post(ORGS, {"action": action, "_selected_action": [org.pk], "index": 0})

    assert response.status_code == 200
    page = response.content.decode()
    assert f'value="{button}"' in page
    assert 'name="reason"' in page and 'name="credits"' in page
    assert "Acme" in page and "40,000 credits" in page
    assert f'name="_selected_action" value="{org.pk}"' in page
    assert ledger_size(org) == 1


# --- granting --------------------------------------------------------------------------------


def test_granting_purchased_credits_adds_a_lot_and_a_ledger_entry(admin_client, admin_user):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], credits="5000", reason="Outage on 3 May")

    assert response.status_code == 302
    lot = CreditLot.objects.get(org=org, bucket=Bucket.PURCHASED)
    assert (lot.granted, lot.remaining, lot.expires_at) == (5_000, 5_000, None)
    assert lot.source.startswith("staff:")
    entry = LedgerEntry.objects.get(lot=lot)
    assert (entry.kind, entry.credits, entry.reason, entry.created_by) == (
        EntryKind.GRANT,
        5_000,
        "Outage on 3 May",
        admin_user,
    )
    assert balance(org) == 45_000
    assert_ledger_consistent(org.pk)
    page = admin_client.get(ORGS).content.decode()
    assert "Granted 5,000 purchased credits to" in page


def test_granting_bonus_credits_sets_their_expiry(admin_client):
    org = OrgFactory(plan="starter")
    expires = (clock.now() + timedelta(days=20)).replace(second=0, microsecond=0)

    response = grant(
        admin_client, [org], bucket="bonus", expires_at=expires.strftime("%Y-%m-%dT%H:%M"), credits="300"
    )

    assert response.status_code == 302
    lot = CreditLot.objects.get(org=org, bucket=Bucket.BONUS)
    assert (lot.granted, lot.expires_at) == (300, expires)
    buckets = {b.bucket: b.credits for b in balance_for(sub=org.subscription).buckets}
    assert buckets == {"plan": 40_000, "bonus": 300}
    assert_ledger_consistent(org.pk)


@pytest.mark.parametrize(
    "expires_at, message",
    [
        ("", "Bonus credits need an expiry date and time."),
        ("2000-01-01T00:00", "The expiry must be in the future."),
    ],
)
def test_bonus_credits_need_an_expiry_in_the_future(admin_client, expires_at, message):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], bucket="bonus", expires_at=expires_at)

    assert response.status_code == 200
    assert message in response.content.decode()
    assert ledger_size(org) == 1


def test_purchased_credits_refuse_an_expiry(admin_client):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], bucket="purchased", expires_at="2099-01-01T00:00")

    assert response.status_code == 200
    assert "Purchased credits never expire" in response.content.decode()
    assert ledger_size(org) == 1


def test_grant_credits_requires_a_reason(admin_client):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], reason="   ")

    assert response.status_code == 200
    page = response.content.decode()
    assert "Give a reason: it is kept in the ledger with your name." in page
    assert 'name="credits" value="5000"' in page  # the rest of the input is kept
    assert balance(org) == 40_000
    assert ledger_size(org) == 1


@pytest.mark.parametrize("credits", ["0", "-5", "1000000001", "12.5", "lots"])
def test_credits_must_be_a_whole_number_from_1_to_a_billion(admin_client, credits):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], credits=credits)

    assert response.status_code == 200
    assert "Enter a whole number of credits from 1 to 1,000,000,000." in response.content.decode()
    assert ledger_size(org) == 1


def test_a_reason_longer_than_300_characters_is_refused(admin_client):
    org = OrgFactory(plan="starter")

    response = remove(admin_client, [org], reason="x" * 301)

    assert response.status_code == 200
    assert "at most 300 characters" in response.content.decode()
    assert ledger_size(org) == 1


def test_a_billion_credits_can_be_granted(admin_client):
    org = OrgFactory(plan="starter")

    assert grant(admin_client, [org], credits="1000000000").status_code == 302

    assert balance(org) == 1_000_040_000
    assert_ledger_consistent(org.pk)


def test_granting_to_several_organisations_gives_each_a_lot(admin_client):
    orgs = [OrgFactory(plan="starter"), OrgFactory(plan="free"), OrgFactory(plan="pro")]

    response = grant(admin_client, orgs, credits="700")

    assert response.status_code == 302
    for org in orgs:
        assert CreditLot.objects.filter(org=org, bucket=Bucket.PURCHASED, granted=700).count() == 1
        assert_ledger_consistent(org.pk)
    assert "Granted 700 purchased credits to 3 organisations." in admin_client.get(ORGS).content.decode()


def test_submitting_the_same_grant_form_twice_grants_once(admin_client):
    org = OrgFactory(plan="starter")
    grant_id = uuid4().hex

    grant(admin_client, [org], grant_id=grant_id)
    again = grant(admin_client, [org], grant_id=grant_id)

    assert again.status_code == 302
    assert balance(org) == 45_000
    assert CreditLot.objects.filter(org=org, bucket=Bucket.PURCHASED).count() == 1
    assert "already made" in admin_client.get(ORGS).content.decode()
    assert_ledger_consistent(org.pk)


def test_a_tampered_grant_id_is_refused(admin_client):
    org = OrgFactory(plan="starter")

    response = grant(admin_client, [org], grant_id="period:1")

    assert response.status_code == 200
    assert "This form is out of date" in response.content.decode()
    assert ledger_size(org) == 1


def test_grant_from_the_organisation_page_returns_to_it(admin_client):
    org = OrgFactory(plan="starter")
    url = reverse("admin:accounts_organisation_credits_grant", args=[org.pk])
    change_url = reverse("admin:accounts_organisation_change", args=[org.pk])

    form = admin_client.get(url)
    assert form.status_code == 200
    assert url in admin_client.get(change_url).content.decode()  # the "Grant credits" button

    response = admin_client.post(
        url,
        {"credits": "250", "bucket": "purchased", "reason": "Trial", "grant_id": uuid4().hex, "apply": "yes"},
    )

    assert response.status_code == 302
    assert response["Location"] == change_url
    assert balance(org) == 40_250
    assert_ledger_consistent(org.pk)


# --- removing --------------------------------------------------------------------------------


def test_removing_credits_takes_them_from_the_lots_in_spending_order(admin_client, admin_user):
    org = OrgFactory(plan="starter")
    grant(admin_client, [org], credits="1000")

    response = remove(admin_client, [org], credits="40500", reason="Duplicate grant")

    assert response.status_code == 302
    assert balance(org) == 500
    entries = LedgerEntry.objects.filter(org=org, kind=EntryKind.ADJUST).order_by("id")
    assert [(e.lot.bucket, e.credits) for e in entries] == [(Bucket.PLAN, -40_000), (Bucket.PURCHASED, -500)]
    assert {(e.reason, e.created_by) for e in entries} == {("Duplicate grant", admin_user)}
    assert_ledger_consistent(org.pk)


def test_removing_more_than_the_balance_is_refused_and_changes_nothing(admin_client):
    org = OrgFactory(plan="starter")

    response = remove(admin_client, [org], credits="40001")

    assert response.status_code == 200  # the form again, with the service's message
    assert "The organisation has only 40,000 credits to remove." in response.content.decode()
    assert balance(org) == 40_000
    assert ledger_size(org) == 1
    assert_ledger_consistent(org.pk)


def test_a_refusal_for_one_organisation_changes_none_of_them(admin_client):
    rich = OrgFactory(plan="pro")
    poor = OrgFactory(plan="free")

    response = remove(admin_client, [rich, poor], credits="20000")

    assert response.status_code == 200
    assert f"{poor.name}: The organisation has only 10,000 credits to remove." in response.content.decode()
    assert (balance(rich), balance(poor)) == (400_000, 10_000)
    assert ledger_size(rich) == ledger_size(poor) == 1


def test_remove_credits_requires_a_reason(admin_client):
    org = OrgFactory(plan="starter")

    response = remove(admin_client, [org], reason="")

    assert response.status_code == 200
    assert "Give a reason" in response.content.decode()
    assert balance(org) == 40_000


def test_adjustments_appear_in_the_organisation_history(admin_client):
    org = OrgFactory(plan="starter")
    grant(admin_client, [org], credits="10", reason="Welcome gift")

    history = admin_client.get(reverse("admin:accounts_organisation_history", args=[org.pk]))

    assert "Granted 10 purchased credits: Welcome gift" in history.content.decode()


# --- read-only credit records ----------------------------------------------------------------


@pytest.fixture
def records():
    """An organisation with one of every credit record: account, lots, entries, a job, an event
    and rollups."""
    org = OrgFactory(plan="starter")
    sub = org.subscription
    job, _ = job_start(
        sub=sub,
        req=JobRequest(product="parse", mode="base", ocr=False, pages=3, file_type="pdf", file_size=1000),
    )
    job_complete(org_id=org.pk, job_id=job.pk)
    usage_events_record(
        sub=sub,
        events=[EventIn(id="e1", product="parse", mode="audio", units=7, timestamp=clock.now())],
    )
    return org


READ_ONLY = [CreditAccount, CreditLot, LedgerEntry, Job, UsageEvent, UsageRollup]


@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_credit_records_cannot_be_added_changed_or_deleted(admin_client, records, model):
    obj = model.objects.filter(org=records).first()
    before = model.objects.count()
    name = f"admin:usage_{model._meta.model_name}"

    listing = admin_client.get(reverse(f"{name}_changelist"))
    view = admin_client.get(reverse(f"{name}_change", args=[obj.pk]))

    assert listing.status_code == 200 and view.status_code == 200
    assert reverse(f"{name}_add") not in listing.content.decode()
    assert 'name="_save"' not in view.content.decode()
    assert admin_client.get(reverse(f"{name}_add")).status_code == 403
    assert admin_client.post(reverse(f"{name}_change", args=[obj.pk]), {}).status_code == 403
    assert admin_client.post(reverse(f"{name}_delete", args=[obj.pk]), {"post": "yes"}).status_code == 403
    bulk = admin_client.post(
        reverse(f"{name}_changelist"),
        {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"},
    )
    assert bulk.status_code in (200, 302)
    assert model.objects.count() == before
    assert_ledger_consistent(records.pk)


def test_ledger_list_can_be_narrowed_to_one_organisation(admin_client, records):
    other = OrgFactory(plan="free")
    url = reverse("admin:usage_ledgerentry_changelist")

    response = admin_client.get(url, {"org__id__exact": records.pk})

    assert response.status_code == 200
    assert {e.org_id for e in response.context["cl"].result_list} == {records.pk}
    assert other.pk != records.pk


def test_jobs_can_be_found_by_id(admin_client, records):
    job = Job.objects.get(org=records)

    response = admin_client.get(reverse("admin:usage_job_changelist"), {"q": str(job.pk)})

    assert [j.pk for j in response.context["cl"].result_list] == [job.pk]


def test_operation_prices_are_editable(admin_client):
    op = Operation.objects.get(product="extract", mode="base")
    url = reverse("admin:usage_operation_change", args=[op.pk])

    response = admin_client.post(
        url, {"product": "extract", "mode": "base", "credits_per_unit": "4", "unit": "page"}
    )

    assert response.status_code == 302
    op.refresh_from_db()
    assert op.credits_per_unit == 4
