"""The Invoices, invoice detail and Payment methods pages: who may see them, what they show."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import stripe
from django.urls import reverse

from accounts import clock
from accounts.services import member_add
from invoices import services, stripe_gateway
from invoices.models import PaymentMethod
from invoices.services import LineSpec, RateLineSpec
from tests.factories import OrgFactory

pytestmark = pytest.mark.django_db

UNAVAILABLE = "Card payments are unavailable right now; nothing was charged."


def owner(org):
    return org.memberships.get().user


def _issued(org, *, at=datetime(2026, 3, 14, tzinfo=UTC), lines=None, kind="period", **extra):
    with clock.travel(at):
        draft = services.invoice_draft_create(
            org=org, lines=lines or [LineSpec("Starter plan, next month", 1, 5000)], kind=kind, **extra
        )
        return services.invoice_issue(invoice=draft)


@pytest.fixture
def member_client(client):
    org = OrgFactory(plan="free")
    membership = member_add(org_id=org.pk, email="member@example.com", role="member")
    client.force_login(membership.user)
    client.org = org
    return client


# --- who may see what ------------------------------------------------------------------------


def test_member_cannot_see_invoices_whether_the_invoice_exists_or_not(member_client):
    invoice = _issued(member_client.org)
    for url in (
        reverse("billing:invoices"),
        reverse("billing:invoice", args=[invoice.number]),
        reverse("billing:invoice", args=["INV-2099-999999"]),
        reverse("billing:payment_methods"),
    ):
        assert member_client.get(url).status_code == 403, url
    for url in (
        reverse("billing:payment_method_add"),
        reverse("billing:payment_method_default", args=[1]),
        reverse("billing:payment_method_remove", args=[1]),
    ):
        assert member_client.post(url).status_code == 403, url


def test_signed_out_visitors_go_to_the_login_page(client):
    response = client.get(reverse("billing:invoices"))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_another_organisations_invoice_is_not_found(client):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    their_invoice = _issued(theirs)
    client.force_login(owner(mine))
    assert client.get(reverse("billing:invoice", args=[their_invoice.number])).status_code == 404
    assert client.get(reverse("billing:invoice", args=["INV-2026-424242"])).status_code == 404


def test_billing_admin_sees_invoices(client):
    org = OrgFactory(plan="free")
    admin = member_add(org_id=org.pk, email="admin@example.com", role="billing_admin")
    client.force_login(admin.user)
    assert client.get(reverse("billing:invoices")).status_code == 200


# --- the invoice list and detail -------------------------------------------------------------


def test_invoices_lists_issued_invoices_only_with_status_words(client):
    org = OrgFactory(plan="free")
    start, end = datetime(2026, 3, 14, tzinfo=UTC), datetime(2026, 4, 14, tzinfo=UTC)
    issued = _issued(org, period_start=start, period_end=end)
    with clock.travel(datetime(2026, 3, 20, tzinfo=UTC)):
        draft = services.invoice_draft_create(org=org, lines=[LineSpec("Hidden draft", 1, 777)])
        services.invoice_void(
            invoice=services.invoice_draft_create(org=org, lines=[LineSpec("Void draft", 1, 999)])
        )
    client.force_login(owner(org))
    response = client.get(reverse("billing:invoices"))
    assert response.status_code == 200
    html = response.content.decode()
    assert issued.number in html
    assert "14 Mar 2026" in html and "13 Apr 2026" in html  # the period's last day, not its exclusive end
    assert "$50.00" in html and ">Issued<" in html
    assert "$7.77" not in html and "$9.99" not in html and "Hidden draft" not in html
    assert draft.number is None


def test_invoices_empty_state_says_what_will_appear(client):
    client.force_login(owner(OrgFactory(plan="free")))
    html = client.get(reverse("billing:invoices")).content.decode()
    assert "No invoices yet" in html


def test_invoice_detail_shows_the_exact_breakdown(client, settings):
    settings.INVOICE_TAX_RATE = "20"
    org = OrgFactory(plan="free")
    invoice = _issued(
        org,
        lines=[LineSpec("Starter plan, next month", 1, 5000), RateLineSpec("Overage", 1252, Decimal("1.25"))],
        period_start=datetime(2026, 3, 14, tzinfo=UTC),
        period_end=datetime(2026, 4, 14, tzinfo=UTC),
    )
    client.force_login(owner(org))
    response = client.get(reverse("billing:invoice", args=[invoice.number]))
    assert response.status_code == 200
    html = response.content.decode()
    for text in (
        invoice.number,
        "Starter plan, next month",
        "$50.00",
        "Overage",
        "1,252",
        "$1.25 per 1,000",
        "$1.57",
        "$51.57",  # subtotal
        "Tax (20%)",
        "$10.31",
        "$61.88",  # total
        "Issued",
        "14 Mar 2026",
        "13 Apr 2026",
        org.name,
    ):
        assert text in html, text
    assert f"{invoice.number}.pdf" in html  # the Download PDF link


def test_a_paid_invoice_says_paid(client, django_user_model):
    org = OrgFactory(plan="free")
    invoice = _issued(org)
    staff = django_user_model.objects.create_user(email="staff@example.com", password="x", is_staff=True)
    services.invoice_mark_paid(invoice=invoice, reason="wire", actor=staff)
    client.force_login(owner(org))
    html = client.get(reverse("billing:invoice", args=[invoice.number])).content.decode()
    assert ">Paid<" in html and "Amount due: $0.00" in html


# --- payment methods -------------------------------------------------------------------------


def test_payment_methods_lists_cards_and_offers_the_card_form(client, stripe_card, localstripe):
    org = OrgFactory(plan="free")
    stripe_card(org)
    client.force_login(owner(org))
    response = client.get(reverse("billing:payment_methods"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Visa •••• 4242" in html and "12/2030" in html and ">Default<" in html
    assert f'src="{localstripe}/js.stripe.com/v3/"' in html
    assert "js/cards.js" in html
    config = response.context["stripe_config"]
    assert config["publishableKey"].startswith("pk_") and "_secret_" in config["clientSecret"]
    assert 'id="stripe-config"' in html
    assert "<script>" not in html  # data travels as JSON, never inline code


def test_payment_methods_empty_state(client, localstripe):
    client.force_login(owner(OrgFactory(plan="free")))
    html = client.get(reverse("billing:payment_methods")).content.decode()
    assert "No card yet" in html


def test_stripe_unavailable_shows_the_plain_message_and_the_cards(client, settings, stripe_card):
    org = OrgFactory(plan="free")
    stripe_card(org)
    settings.STRIPE_API_BASE = "http://127.0.0.1:9"
    client.force_login(owner(org))
    response = client.get(reverse("billing:payment_methods"))
    assert response.status_code == 200
    html = response.content.decode()
    assert UNAVAILABLE in html
    assert "Visa •••• 4242" in html
    assert "js.stripe.com" not in html


def test_stripe_unavailable_on_a_new_organisation_is_no_500(client, settings):
    settings.STRIPE_API_BASE = "http://127.0.0.1:9"
    org = OrgFactory(plan="free")
    client.force_login(owner(org))
    response = client.get(reverse("billing:payment_methods"))
    assert response.status_code == 200 and UNAVAILABLE in response.content.decode()
    response = client.post(
        reverse("billing:payment_method_add"), {"payment_method": "pm_abc", "setup_intent": ""}
    )
    assert response.status_code in (404, 503) and response.status_code != 500


def test_adding_a_card_by_posting_the_setup_intent(client, localstripe):
    org = OrgFactory(plan="free")
    client.force_login(owner(org))
    client.get(reverse("billing:payment_methods"))  # makes the customer and a SetupIntent
    setup = services.payment_method_setup_start(org=org)
    stripe_gateway.configure()
    pm = stripe.PaymentMethod.create(
        type="card", card={"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    )
    stripe.SetupIntent.confirm(setup.id, payment_method=pm.id)
    response = client.post(
        reverse("billing:payment_method_add"),
        {"payment_method": pm.id, "setup_intent": setup.id},
        follow=True,
    )
    html = response.content.decode()
    assert "Card Visa •••• 4242 added. It is your default card." in html
    assert PaymentMethod.objects.get(org=org).is_default


def test_posting_someone_elses_card_shows_an_error_and_stores_nothing(client, stripe_card):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    their_card = stripe_card(theirs)
    client.force_login(owner(mine))
    response = client.post(
        reverse("billing:payment_method_add"),
        {"payment_method": their_card.stripe_payment_method_id, "cardholder": "Ada Lovelace"},
    )
    assert response.status_code == 404
    html = response.content.decode()
    assert "That card is not on this organisation&#x27;s account." in html
    assert 'value="Ada Lovelace"' in html  # what was typed stays
    assert not PaymentMethod.objects.filter(org=mine).exists()


def test_posting_without_a_card_asks_for_one(client, localstripe):
    client.force_login(owner(OrgFactory(plan="free")))
    response = client.post(reverse("billing:payment_method_add"), {"payment_method": ""})
    assert response.status_code == 400
    assert "Enter your card details, then choose Add card." in response.content.decode()


def test_remove_asks_once_in_words_then_removes(client, stripe_card):
    org = OrgFactory(plan="free")
    card = stripe_card(org)
    client.force_login(owner(org))
    confirm = client.get(reverse("billing:payment_methods"), {"remove": card.pk})
    html = confirm.content.decode()
    assert "Remove Visa •••• 4242?" in html and "Keep it" in html
    done = client.post(reverse("billing:payment_method_remove", args=[card.pk]), follow=True)
    assert "Card Visa •••• 4242 removed." in done.content.decode()
    card.refresh_from_db()
    assert card.removed_at is not None


def test_removing_the_only_card_on_a_paid_plan_is_explained(client, stripe_card):
    org = OrgFactory(plan="starter")
    card = stripe_card(org)
    client.force_login(owner(org))
    html = client.get(reverse("billing:payment_methods"), {"remove": card.pk}).content.decode()
    assert "This is your only card and your plan is paid" in html
    done = client.post(reverse("billing:payment_method_remove", args=[card.pk]), follow=True)
    assert "add another card before removing it" in done.content.decode()
    card.refresh_from_db()
    assert card.removed_at is None


def test_make_default_from_the_page(client, stripe_card):
    org = OrgFactory(plan="free")
    stripe_card(org)
    second = stripe_card(org, "5555555555554444")
    client.force_login(owner(org))
    done = client.post(reverse("billing:payment_method_default", args=[second.pk]), follow=True)
    assert "is now your default card" in done.content.decode()
    second.refresh_from_db()
    assert second.is_default


def test_another_organisations_card_actions_are_not_found(client, stripe_card):
    mine, theirs = OrgFactory(plan="free"), OrgFactory(plan="free")
    their_card = stripe_card(theirs)
    client.force_login(owner(mine))
    assert client.get(reverse("billing:payment_methods"), {"remove": their_card.pk}).status_code == 404
    assert client.post(reverse("billing:payment_method_remove", args=[their_card.pk])).status_code == 404
    assert client.post(reverse("billing:payment_method_default", args=[their_card.pk])).status_code == 404
    their_card.refresh_from_db()
    assert their_card.removed_at is None
