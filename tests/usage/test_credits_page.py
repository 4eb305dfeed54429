"""The Credits tab (/settings/billing/credits/) and its staff screens, against a real localstripe."""

import re
from html import unescape

import pytest
from django.urls import reverse

from accounts.services import member_add
from invoices.models import Invoice, InvoiceStatus
from tests.billing_support import balance, owner_of, spend, tick
from tests.factories import OrgFactory
from tests.usage import credits_support
from tests.usage.credits_support import DECLINING_CARD, bucket_total, payment_intents
from usage import credits
from usage.models import Bucket, Commitment, CreditPack, CreditPurchase, PurchaseStatus, RechargeSetting, Tier

packs = credits_support.packs  # a fixture
org = credits_support.starter_with_card  # a fixture

pytestmark = pytest.mark.django_db

CREDITS = reverse("billing:credits")
HTMX = {"HX-Request": "true"}


def text_of(response) -> str:
    html = response.content.decode()
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html))).strip()


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def refund_url(purchase_id) -> str:
    return reverse("billing:credits_refund", args=[purchase_id])


@pytest.fixture
def owner(client, org):
    client.force_login(owner_of(org))
    return client


def buy_form(client, pack, agree=True):
    page = client.get(CREDITS)
    token = re.search(r'name="token" value="([0-9a-f]+)"', page.content.decode()).group(1)
    data = {"action": "buy", "pack": pack.pk, "token": token}
    if agree:
        data["agree"] = "on"
    return data


# --- who may see it --------------------------------------------------------------------------


def test_signed_out_visitor_is_sent_to_sign_in(client):
    response = client.get(CREDITS)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_member_gets_403_on_the_credits_page_and_refunds(client, packs):
    org = OrgFactory(plan="starter")
    membership = member_add(org_id=org.pk, email="m@example.com", role="member")
    client.force_login(membership.user)
    assert client.get(CREDITS).status_code == 403
    assert client.post(CREDITS, {"action": "stop"}).status_code == 403
    assert client.post(refund_url(1)).status_code == 403


def test_billing_admin_may_buy(client, org, packs):
    membership = member_add(org_id=org.pk, email="ba@example.com", role="billing_admin")
    client.force_login(membership.user)
    response = client.post(CREDITS, buy_form(client, packs[10]))
    assert response.status_code == 302
    assert bucket_total(org, Bucket.PURCHASED) == 8_000


# --- the page --------------------------------------------------------------------------------


def test_an_empty_page_says_what_will_appear_and_shows_the_tiers(client, packs):
    org = OrgFactory(plan="free")
    client.force_login(owner_of(org))
    response = client.get(CREDITS)
    assert response.status_code == 200
    text = text_of(response)
    assert "No purchases yet" in text and "No tier" in text
    assert "You have no card on file" in text
    assert "$100.00 more reaches Explore" in text
    for words in ("$10.00", "8,000 credits", "$50.00", "44,000 credits", "$200.00", "200,000 credits"):
        assert words in text
    assert "Refund policy" in text and "within 14 days" in text
    assert 'aria-current="page">Credits' in response.content.decode()


def test_without_the_refund_policy_tick_the_form_says_why_and_nothing_is_charged(owner, org, packs):
    response = owner.post(CREDITS, buy_form(owner, packs[200], agree=False))
    assert response.status_code == 200
    html = response.content.decode()
    error = re.search(r'<p class="field-error" id="id_agree_error">(.*?)</p>', html)
    assert error and "refund policy" in error.group(1) and "nothing was charged" in error.group(1)
    assert re.search(rf'value="{packs[200].pk}"\s+checked', html)  # the chosen pack is kept
    assert not CreditPurchase.objects.exists() and payment_intents(org) == []


def test_buying_a_pack_shows_the_credits_and_the_invoice(owner, org, packs):
    response = owner.post(CREDITS, buy_form(owner, packs[50]), follow=True)
    purchase = CreditPurchase.objects.get()
    assert purchase.status == PurchaseStatus.PAID
    assert any("Bought 44,000 credits for $50.00" in m for m in messages_of(response))
    text = text_of(response)
    assert purchase.invoice.number in text
    assert re.search(r"Purchased credits 44,000", text)
    assert "Paid" in text and "Refund" in text
    assert balance(org) == 84_000


def test_a_double_submitted_form_charges_once(owner, org, packs):
    data = buy_form(owner, packs[10])
    owner.post(CREDITS, data)
    response = owner.post(CREDITS, data, follow=True)
    assert any("already submitted" in m for m in messages_of(response))
    assert CreditPurchase.objects.count() == 1 and len(payment_intents(org)) == 1


def test_a_declined_card_says_so_and_adds_nothing(client, packs, stripe_card):
    tick("2027-05-10T09:00:00Z")
    org = OrgFactory(plan="free")
    stripe_card(org, number=DECLINING_CARD)
    client.force_login(owner_of(org))
    data = buy_form(client, packs[10])
    response = client.post(CREDITS, data)
    assert response.status_code == 200
    assert any("Nothing was charged" in m for m in messages_of(response))
    assert bucket_total(org, Bucket.PURCHASED) == 0
    assert re.search(r'name="token" value="([0-9a-f]+)"', response.content.decode()).group(1) != data["token"]


def test_without_a_card_a_post_charges_nothing(client, packs):
    org = OrgFactory(plan="free")
    client.force_login(owner_of(org))
    response = client.post(CREDITS, buy_form(client, packs[10]))
    assert "Add a card in Payment methods first" in text_of(response)
    assert not CreditPurchase.objects.exists()


def test_a_tier_purchase_shows_the_tier_and_what_reaches_the_next(owner, org, packs):
    CreditPack.objects.create(price_cents=10_000, credits=80_000, sort_order=99)
    big = CreditPack.objects.get(price_cents=10_000)
    owner.post(CREDITS, buy_form(owner, big))
    text = text_of(owner.get(CREDITS))
    assert "Commitment tier Explore" in text
    assert "+3% bonus credits · 1,800 requests a minute" in text
    assert "$400.00 more reaches Build" in text
    assert "Bonus credits 2,400" in text


# --- auto-recharge ---------------------------------------------------------------------------


THRESHOLD = {"kind": "threshold", "threshold": "5000", "frequency": "monthly"}


def test_the_preview_comes_back_as_a_fragment_through_htmx(owner, org, packs):
    data = {**THRESHOLD, "action": "preview", "pack": packs[50].pk}
    response = owner.post(CREDITS, data, headers=HTMX)
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="card" id="recharge"')
    text = text_of(response)
    assert "Preview: each recharge" in text
    assert "the $50 pack: 44,000 credits" in text and "$50.00" in text
    assert "Confirm and turn on" in text
    assert not RechargeSetting.objects.exists()  # a preview saves nothing


def test_the_preview_works_without_javascript(owner, org, packs):
    response = owner.post(CREDITS, {**THRESHOLD, "action": "preview", "pack": packs[10].pk})
    assert "<html" in response.content.decode() and "Preview: each recharge" in text_of(response)


def test_an_invalid_recharge_shows_errors_by_the_fields_and_keeps_what_was_typed(owner, org, packs):
    response = owner.post(
        CREDITS,
        {
            "action": "preview",
            "kind": "schedule",
            "amount_dollars": "12x",
            "billing_day": "40",
            "monthly_cap": "5",
        },
        headers=HTMX,
    )
    html = response.content.decode()
    assert re.search(r'id="id_amount_dollars_error">Enter a whole number of dollars', html)
    assert re.search(r'id="id_billing_day_error">', html)
    assert 'value="12x"' in html
    assert not RechargeSetting.objects.exists()


def test_confirming_turns_auto_recharge_on_and_stopping_asks_then_turns_it_off(owner, org, packs):
    response = owner.post(CREDITS, {**THRESHOLD, "action": "save", "pack": packs[10].pk}, follow=True)
    assert any(
        "Auto-recharge is on: when your balance falls below 5,000 credits" in m for m in messages_of(response)
    )
    text = text_of(response)
    assert "On When your balance falls below 5,000 credits" in text
    setting = RechargeSetting.objects.get(org=org)
    assert setting.enabled and org.credit_account.__class__.objects.get(org=org).recharge_below == 5_000
    confirm = owner.get(CREDITS + "?stop=1")
    assert "Stop auto-recharge?" in text_of(confirm) and "The credits you bought stay" in text_of(confirm)
    response = owner.post(CREDITS, {"action": "stop"}, follow=True)
    assert any("Auto-recharge is off" in m for m in messages_of(response))
    assert not RechargeSetting.objects.get(org=org).enabled


def test_a_schedule_is_shown_with_its_next_date(owner, org, packs):
    owner.post(
        CREDITS,
        {
            "action": "save",
            "kind": "schedule",
            "amount_dollars": "100",
            "frequency": "monthly",
            "billing_day": "15",
        },
    )
    text = text_of(owner.get(CREDITS))
    assert (
        "We buy $100 of credits (80,000 credits, plus your tier's bonus) monthly; next on 15 May 2027" in text
    )


def test_the_history_shows_recharges_with_their_invoices(owner, org, packs):
    owner.post(CREDITS, {**THRESHOLD, "action": "save", "pack": packs[10].pk})
    spend(org, 36_000, "below")
    credits.recharge_threshold_run(org_id=org.pk)
    text = text_of(owner.get(CREDITS))
    invoice = Invoice.objects.get(kind="purchase")
    assert "Auto-recharge: $10 pack" in text and invoice.number in text


# --- refunds -----------------------------------------------------------------------------------


def test_a_refund_asks_once_in_words_then_refunds(owner, org, packs):
    owner.post(CREDITS, buy_form(owner, packs[50]))
    purchase = CreditPurchase.objects.get()
    confirm = owner.get(f"{CREDITS}?refund={purchase.pk}")
    text = text_of(confirm)
    assert "Refund $50.00?" in text and "44,000 credits" in text and "will show as Refunded" in text
    response = owner.post(refund_url(purchase.pk), follow=True)
    assert any("Refunded $50.00 to your card" in m for m in messages_of(response))
    assert Invoice.objects.get(pk=purchase.invoice_id).status == InvoiceStatus.REFUNDED
    assert bucket_total(org, Bucket.PURCHASED) == 0
    assert "Refunded" in text_of(response)


def test_once_a_credit_is_spent_there_is_no_refund_button_and_the_server_refuses(owner, org, packs):
    owner.post(CREDITS, buy_form(owner, packs[10]))
    purchase = CreditPurchase.objects.get()
    spend(org, 40_001, "one purchased credit")
    page = owner.get(CREDITS).content.decode()
    assert f"?refund={purchase.pk}" not in page
    response = owner.post(refund_url(purchase.pk), follow=True)
    assert any("can no longer be refunded" in m for m in messages_of(response))
    assert CreditPurchase.objects.get().status == PurchaseStatus.PAID
    assert "can no longer be refunded" in text_of(owner.get(f"{CREDITS}?refund={purchase.pk}"))


def test_another_organisations_purchase_is_404_and_changes_nothing(client, org, packs, stripe_card):
    credits.pack_purchase(
        org=org,
        pack_id=packs[10].pk,
        token=credits.new_form_token(),
        agreed_to_refund_policy=True,
        actor=None,
    )
    purchase = CreditPurchase.objects.get()
    other = OrgFactory(plan="starter")
    client.force_login(owner_of(other))
    assert client.get(f"{CREDITS}?refund={purchase.pk}").status_code == 404
    assert client.post(refund_url(purchase.pk)).status_code == 404
    assert CreditPurchase.objects.get().status == PurchaseStatus.PAID


# --- staff screens -----------------------------------------------------------------------------


def test_staff_edit_packs_and_see_purchases_and_recharge_settings(admin_client, org, packs):
    credits.pack_purchase(
        org=org,
        pack_id=packs[10].pk,
        token=credits.new_form_token(),
        agreed_to_refund_policy=True,
        actor=None,
    )
    for name in ("creditpack", "creditpurchase", "rechargesetting", "commitment", "commitmentperiod"):
        assert admin_client.get(reverse(f"admin:usage_{name}_changelist")).status_code == 200
    response = admin_client.get(reverse("admin:usage_creditpack_change", args=[packs[10].pk]))
    assert response.status_code == 200


def test_staff_refund_a_purchase_after_a_confirmation(admin_client, org, packs):
    purchase, _ = credits.pack_purchase(
        org=org,
        pack_id=packs[10].pk,
        token=credits.new_form_token(),
        agreed_to_refund_policy=True,
        actor=None,
    )
    url = reverse("admin:usage_creditpurchase_changelist")
    data = {"action": "refund_purchases", "_selected_action": [purchase.pk]}
    confirm = admin_client.post(url, data)
    assert "Refund these purchases" in text_of(confirm)
    assert CreditPurchase.objects.get().status == PurchaseStatus.PAID
    admin_client.post(url, {**data, "confirm": "yes"})
    assert CreditPurchase.objects.get().status == PurchaseStatus.REFUNDED


def test_staff_override_a_tier_only_with_a_reason(admin_client, org):
    url = reverse("admin:usage_commitment_add")
    response = admin_client.post(
        url, {"org": org.pk, "term": "monthly", "override_tier": "build", "override_reason": ""}
    )
    assert response.status_code == 200 and "Give a reason" in text_of(response)
    assert not Commitment.objects.filter(override_tier=Tier.BUILD).exists()
    admin_client.post(
        url, {"org": org.pk, "term": "monthly", "override_tier": "build", "override_reason": "contract 7"}
    )
    commitment = Commitment.objects.get(org=org)
    assert (commitment.override_tier, commitment.override_reason) == (Tier.BUILD, "contract 7")
    assert commitment.override_by is not None
    assert org.subscription.__class__.objects.get(org=org).rpm == 3_000
