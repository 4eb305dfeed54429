"""Settings → Billing → Notifications: the low-balance alert page and its state machine (DESIGN §4)."""

import html as htmllib
import io
import re

import pytest
from django.urls import reverse
from django.utils.html import strip_tags

from accounts import clock
from accounts.services import member_add
from tests.factories import OrgFactory
from tests.invariants import assert_ledger_consistent
from usage.models import Bucket, CreditAccount, LowBalanceAlert
from usage.services import (
    credits_remove,
    lot_grant,
    low_balance_alert_save,
    low_balance_alert_send,
    low_balance_check,
)

pytestmark = pytest.mark.django_db

URL = "/settings/billing/notifications/"


def owner_of(org):
    return org.memberships.get(role="owner").user


def words(response) -> str:
    """The page's text as a person reads it: no tags, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", htmllib.unescape(strip_tags(response.content.decode())))


def balance(org):
    return CreditAccount.objects.get(org_id=org.pk).balance


def spend_to(org, target):
    """Removes credits until the balance is `target` (a staff adjustment: the ledger stays right)."""
    credits_remove(org_id=org.pk, credits=balance(org) - target, reason="test", actor=None)
    assert balance(org) == target


_grants = iter(range(1_000_000))


def top_up_to(org, target):
    lot_grant(
        org_id=org.pk, bucket=Bucket.PURCHASED, credits=target - balance(org), source=f"test:{next(_grants)}"
    )
    assert balance(org) == target


@pytest.fixture
def org():
    return OrgFactory(plan="starter")  # 40,000 credits


@pytest.fixture
def owner_client(client, org):
    client.force_login(owner_of(org))
    return client


def post(client, *, enabled=True, threshold="5000", recipients="ops@example.com", htmx=False):
    data = {"threshold": threshold, "recipients": recipients}
    if enabled:
        data["enabled"] = "on"
    headers = {"HX-Request": "true"} if htmx else {}
    return client.post(URL, data, headers=headers)


# --- who may see it -------------------------------------------------------------------------


def test_url_is_stable():
    assert reverse("billing:notifications") == URL


def test_signed_out_visitor_goes_to_login(client):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_member_cannot_see_notifications(client, org):
    membership = member_add(org_id=org.pk, email="member@example.com", role="member")
    client.force_login(membership.user)
    assert client.get(URL).status_code == 403
    assert post(client).status_code == 403
    assert not LowBalanceAlert.objects.exists()


def test_billing_admin_may_save_the_alert(client, org):
    membership = member_add(org_id=org.pk, email="admin@example.com", role="billing_admin")
    client.force_login(membership.user)
    assert post(client).status_code == 302
    assert LowBalanceAlert.objects.get(org=org).threshold == 5000


# --- the page -------------------------------------------------------------------------------


def test_page_offers_members_addresses_and_says_not_set_up(owner_client, org):
    member_add(org_id=org.pk, email="member@example.com", role="member")
    response = owner_client.get(URL)
    html = response.content.decode()
    assert response.status_code == 200
    assert "Not set up" in html
    assert owner_of(org).email in html
    assert "member@example.com" in html
    assert 'aria-current="page"' in html and ">Notifications<" in html


def test_saving_without_js_redirects_with_a_message_and_shows_armed(owner_client, org):
    response = post(owner_client, threshold="5,000", recipients="ops@example.com, Finance@Example.com")
    assert response.status_code == 302
    assert response["Location"] == URL

    alert = LowBalanceAlert.objects.get(org=org)
    assert (alert.enabled, alert.threshold, alert.armed) == (True, 5000, True)
    assert alert.recipients == ["ops@example.com", "finance@example.com"]

    text = words(owner_client.get(URL))
    assert (
        "Low-balance alert saved: we'll e-mail 2 addresses when the balance falls below 5,000 credits."
        in text
    )
    assert "Armed: we'll e-mail when the balance falls below 5,000 credits." in text


def test_saving_with_htmx_returns_the_form_fragment(owner_client, org):
    response = post(
        owner_client, htmx=True, recipients="ops@example.com\nops@example.com\nbilling@example.com"
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html
    assert 'id="low-balance-alert"' in html
    assert "Low-balance alert saved" in html
    assert "Armed:" in html
    assert LowBalanceAlert.objects.get(org=org).recipients == ["ops@example.com", "billing@example.com"]


def test_turning_the_alert_off_keeps_threshold_and_says_off(owner_client, org):
    post(owner_client)
    post(owner_client, enabled=False, recipients="")
    alert = LowBalanceAlert.objects.get(org=org)
    assert (alert.enabled, alert.threshold, alert.recipients) == (False, 5000, [])
    assert "Off:" in owner_client.get(URL).content.decode()


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        ("0", "Enter a whole number of credits from 1 to 1,000,000,000."),
        ("1000000001", "Enter a whole number of credits from 1 to 1,000,000,000."),
        ("-5", "Enter a whole number of credits from 1 to 1,000,000,000."),
        ("12.5", "Enter a whole number of credits from 1 to 1,000,000,000."),
        ("lots", "Enter a whole number of credits from 1 to 1,000,000,000."),
        ("", "Enter a whole number of credits from 1 to 1,000,000,000."),
    ],
)
@pytest.mark.parametrize("htmx", [False, True])
def test_invalid_threshold_shows_error_and_keeps_the_saved_one(owner_client, org, threshold, message, htmx):
    post(owner_client, threshold="5000")
    response = post(owner_client, threshold=threshold, recipients="new@example.com", htmx=htmx)

    html = response.content.decode()
    assert response.status_code == 200
    assert f'<p class="field-error" id="id_threshold_error">{message}</p>' in html
    if threshold:
        assert f'value="{threshold}"' in html  # what was typed stays in the box
    alert = LowBalanceAlert.objects.get(org=org)
    assert (alert.threshold, alert.recipients) == (5000, ["ops@example.com"])  # nothing saved
    assert "falls below 5,000 credits" in html  # the saved one is what the state shows


def test_threshold_limits_are_accepted(owner_client, org):
    post(owner_client, threshold="1")
    assert LowBalanceAlert.objects.get(org=org).threshold == 1
    post(owner_client, threshold="1,000,000,000")
    assert LowBalanceAlert.objects.get(org=org).threshold == 1_000_000_000


def test_invalid_address_is_named_and_nothing_is_saved(owner_client, org):
    post(owner_client)
    response = post(owner_client, recipients="good@example.com, not-an-address")
    html = response.content.decode()
    assert "Not an e-mail address: “not-an-address”." in words(response)
    assert "not-an-address" in html.split('id="id_recipients"')[1].split("</textarea>")[0]
    assert LowBalanceAlert.objects.get(org=org).recipients == ["ops@example.com"]


def test_at_most_ten_recipients(owner_client, org):
    ten = ", ".join(f"p{i}@example.com" for i in range(10))
    assert post(owner_client, recipients=ten).status_code == 302
    assert len(LowBalanceAlert.objects.get(org=org).recipients) == 10

    response = post(owner_client, recipients=ten + ", p10@example.com", threshold="7000")
    assert "At most 10 addresses; you entered 11." in response.content.decode()
    alert = LowBalanceAlert.objects.get(org=org)
    assert (len(alert.recipients), alert.threshold) == (10, 5000)


def test_an_enabled_alert_needs_a_recipient(owner_client, org):
    response = post(owner_client, recipients="  ")
    assert "Add at least one e-mail address, or turn the alert off." in response.content.decode()
    assert not LowBalanceAlert.objects.exists()


def test_page_shows_sent_state_after_an_email(owner_client, org, mailoutbox):
    post(owner_client, threshold="10000")
    spend_to(org, 9_999)
    assert low_balance_alert_send(org_id=org.pk)
    text = words(owner_client.get(URL))
    alert = LowBalanceAlert.objects.get(org=org)
    day = f"{alert.last_sent_at.day} {alert.last_sent_at:%b %Y}"
    assert f"Sent on {day}: re-arms when the balance rises to 10,000 credits or above." in text


# --- the state machine ----------------------------------------------------------------------


def save(org, *, enabled=True, threshold=10_000, recipients=("ops@example.com", "cfo@example.com")):
    return low_balance_alert_save(
        org_id=org.pk, enabled=enabled, threshold=threshold, recipients=list(recipients)
    )


def test_nothing_is_sent_while_the_balance_stays_above(org, mailoutbox):
    save(org)
    assert balance(org) == 40_000
    assert low_balance_alert_send(org_id=org.pk) is False
    spend_to(org, 10_000)  # at the threshold is not below it
    assert low_balance_alert_send(org_id=org.pk) is False
    assert mailoutbox == []
    assert LowBalanceAlert.objects.get(org=org).armed


def test_crossing_below_sends_once_to_every_recipient(org, mailoutbox):
    save(org)
    spend_to(org, 9_999)

    assert low_balance_alert_send(org_id=org.pk) is True

    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert sorted(mail.to) == ["cfo@example.com", "ops@example.com"]
    assert "9,999 credits" in mail.subject and org.name in mail.subject
    assert "10,000 credits" in mail.body
    alert = LowBalanceAlert.objects.get(org=org)
    assert alert.armed is False and alert.last_sent_at is not None
    assert_ledger_consistent(org.pk)


def test_staying_below_sends_nothing_more(org, mailoutbox):
    save(org)
    spend_to(org, 9_000)
    low_balance_alert_send(org_id=org.pk)
    for target in (8_000, 500, 0):
        spend_to(org, target)
        assert low_balance_alert_send(org_id=org.pk) is False
    assert len(mailoutbox) == 1


def test_rising_above_rearms_and_the_next_fall_sends_again(org, mailoutbox):
    save(org)
    spend_to(org, 9_000)
    low_balance_alert_send(org_id=org.pk)

    top_up_to(org, 9_999)  # still below: stays disarmed
    assert low_balance_alert_send(org_id=org.pk) is False
    assert LowBalanceAlert.objects.get(org=org).armed is False

    top_up_to(org, 10_000)  # back at the threshold: re-armed, nothing sent
    assert low_balance_alert_send(org_id=org.pk) is False
    assert LowBalanceAlert.objects.get(org=org).armed is True
    assert len(mailoutbox) == 1

    spend_to(org, 9_999)
    assert low_balance_alert_send(org_id=org.pk) is True
    assert len(mailoutbox) == 2
    assert_ledger_consistent(org.pk)


def test_disabled_alert_sends_nothing(org, mailoutbox):
    save(org, enabled=False, recipients=())
    spend_to(org, 0)
    assert low_balance_check(org_id=org.pk) is False
    assert low_balance_alert_send(org_id=org.pk) is False
    assert mailoutbox == []


def test_no_alert_sends_nothing(org, mailoutbox):
    spend_to(org, 0)
    assert low_balance_alert_send(org_id=org.pk) is False
    assert mailoutbox == []


def test_turning_it_on_while_below_sends_once(org, mailoutbox):
    save(org, enabled=False, recipients=())
    spend_to(org, 100)
    low_balance_alert_send(org_id=org.pk)
    save(org, enabled=True)
    assert low_balance_alert_send(org_id=org.pk) is True
    assert low_balance_alert_send(org_id=org.pk) is False
    assert len(mailoutbox) == 1


def test_changing_only_recipients_does_not_send_the_same_news_twice(org, mailoutbox):
    save(org)
    spend_to(org, 100)
    low_balance_alert_send(org_id=org.pk)
    save(org, recipients=["someone@example.com"])
    assert low_balance_alert_send(org_id=org.pk) is False
    assert len(mailoutbox) == 1


def test_a_new_threshold_rearms(org, mailoutbox):
    save(org, threshold=10_000)
    spend_to(org, 5_000)
    low_balance_alert_send(org_id=org.pk)
    save(org, threshold=4_000)  # 5,000 is not below 4,000: armed, waiting
    assert low_balance_alert_send(org_id=org.pk) is False
    spend_to(org, 3_999)
    assert low_balance_alert_send(org_id=org.pk) is True
    assert len(mailoutbox) == 2


def test_a_failed_send_leaves_the_alert_armed(org, mailoutbox, monkeypatch):
    save(org)
    spend_to(org, 9_000)

    def broken(*args, **kwargs):
        raise OSError("SMTP server down")

    monkeypatch.setattr("django.core.mail.send_mail", broken)
    with pytest.raises(OSError):
        low_balance_alert_send(org_id=org.pk)
    alert = LowBalanceAlert.objects.get(org=org)
    assert alert.armed is True and alert.last_sent_at is None

    monkeypatch.undo()
    assert low_balance_alert_send(org_id=org.pk) is True
    assert len(mailoutbox) == 1


def test_service_refuses_what_the_form_refuses(org):
    from billing_site.errors import BillingError

    for kwargs in (
        {"threshold": 0},
        {"threshold": 1_000_000_001},
        {"recipients": ["nope"]},
        {"recipients": [f"p{i}@example.com" for i in range(11)]},
        {"recipients": []},
    ):
        with pytest.raises(BillingError):
            save(org, **kwargs)
    assert not LowBalanceAlert.objects.exists()


def test_billing_tick_sends_the_low_balance_email_once_and_re_arms_after_a_top_up(mailoutbox):
    from django.core.management import call_command

    from usage import services as usage_services
    from usage.models import Bucket, LowBalanceAlert

    org = OrgFactory(plan="free")
    LowBalanceAlert.objects.create(org=org, enabled=True, threshold=5_000, recipients=["ops@example.com"])
    sub = org.subscription
    usage_services.usage_events_record(
        sub=sub, events=[usage_services.EventIn("a", "parse", "base", 6_000, clock.now())]
    )
    call_command("billing_tick", stdout=io.StringIO())
    call_command("billing_tick", stdout=io.StringIO())
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ops@example.com"]
    usage_services.lot_grant(org_id=org.pk, bucket=Bucket.PURCHASED, credits=2_000, source="top-up")
    call_command("billing_tick", stdout=io.StringIO())
    assert LowBalanceAlert.objects.get(org=org).armed
    usage_services.usage_events_record(
        sub=sub, events=[usage_services.EventIn("b", "parse", "base", 3_000, clock.now())]
    )
    call_command("billing_tick", stdout=io.StringIO())
    assert len(mailoutbox) == 2
