"""The Stripe webhook endpoint: check the signature, store the event once, answer at once; a worker
processes it (and billing_tick picks up whatever no worker took)."""

import logging

from django.db import transaction
from django.http import HttpResponse, HttpResponseBadRequest
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from invoices import services, stripe_gateway, tasks

log = logging.getLogger(__name__)


def _queue(event_pk: int) -> None:
    try:
        tasks.webhook_process.delay(event_pk)
    except Exception:  # noqa: BLE001 - the broker being down must not lose the event: the tick runs it
        log.exception("could not queue webhook event %s; billing_tick will process it", event_pk)


@csrf_exempt
@require_POST
def stripe_webhook(request):
    try:
        event = stripe_gateway.webhook_event_verify(
            payload=request.body, signature=request.headers.get("Stripe-Signature", "")
        )
    except stripe_gateway.WebhookSignatureInvalid:
        return HttpResponseBadRequest("Invalid signature.", content_type="text/plain")
    stored, created = services.webhook_event_store(event=event)
    if created:
        transaction.on_commit(lambda: _queue(stored.pk))
    return HttpResponse("ok", content_type="text/plain")
