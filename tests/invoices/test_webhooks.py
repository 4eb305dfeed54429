"""Stripe webhooks: signature checked, each event stored once by id, processed once."""

import hashlib
import hmac
import json
import time

import pytest
from django.test import override_settings

from invoices import services
from invoices.models import StripeWebhookEvent, WebhookStatus

pytestmark = pytest.mark.django_db

SECRET = "whsec_test_secret"


def signed(event: dict, secret=SECRET, at=None):
    payload = json.dumps(event).encode()
    stamp = int(at if at is not None else time.time())
    signature = hmac.new(secret.encode(), b"%d.%s" % (stamp, payload), hashlib.sha256).hexdigest()
    return payload, f"t={stamp},v1={signature}"


def post(client, payload, signature):
    return client.post(
        "/stripe/webhook/", payload, content_type="application/json", headers={"Stripe-Signature": signature}
    )


@override_settings(STRIPE_WEBHOOK_SECRET=SECRET)
def test_a_bad_signature_is_400_and_stored_nowhere(client):
    event = {"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {}}}
    payload, _ = signed(event, secret="whsec_someone_else")
    _, good = signed(event)
    assert post(client, payload, signed(event, secret="whsec_someone_else")[1]).status_code == 400
    assert post(client, payload + b" ", good).status_code == 400  # body changed after signing
    assert post(client, payload, "").status_code == 400
    old_payload, old_signature = signed(event, at=time.time() - 301)
    assert post(client, old_payload, old_signature).status_code == 400  # beyond the 300 s tolerance
    assert not StripeWebhookEvent.objects.exists()


@override_settings(STRIPE_WEBHOOK_SECRET=SECRET)
def test_the_same_event_twice_is_stored_and_processed_once(
    client, django_capture_on_commit_callbacks, monkeypatch
):
    processed = []
    monkeypatch.setattr(services, "_webhook_payment_settle", lambda payload: processed.append(payload["id"]))
    monkeypatch.setattr("invoices.webhooks._queue", lambda pk: services.webhook_event_process(event_pk=pk))
    event = {"id": "evt_2", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            assert post(client, *signed(event)).status_code == 200
    assert StripeWebhookEvent.objects.count() == 1
    assert processed == ["evt_2"]
    assert StripeWebhookEvent.objects.get().status == WebhookStatus.PROCESSED
    assert (
        services.webhook_event_process(event_pk=StripeWebhookEvent.objects.get().pk)
        == WebhookStatus.PROCESSED
    )
    assert processed == ["evt_2"]


@override_settings(STRIPE_WEBHOOK_SECRET=SECRET)
def test_events_no_worker_took_are_processed_by_billing_tick_and_others_are_ignored(client):
    from django.core.management import call_command

    event = {"id": "evt_3", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}
    assert post(client, *signed(event)).status_code == 200  # on_commit never runs in this test
    assert StripeWebhookEvent.objects.get().status == WebhookStatus.RECEIVED
    call_command("billing_tick")
    assert StripeWebhookEvent.objects.get().status == WebhookStatus.IGNORED


def test_a_payment_event_for_an_attempt_already_settled_changes_nothing():
    event = {"data": {"object": {"id": "pi_unknown", "metadata": {"idempotency_key": "inv-999-attempt-1"}}}}
    services._webhook_payment_settle(event)  # neither ours nor pending: nothing to do, no error
