"""The only module that talks to Stripe (STYLE: the payment provider is swapped and faked here).

Configured from settings on every call: `STRIPE_API_BASE` (localstripe in development and tests)
becomes the SDK's api base; `STRIPE_SECRET_KEY` its key. The SDK never retries on its own
(`max_network_retries = 0`): a retried POST after a lost answer could create a second
PaymentIntent where the server ignores Idempotency-Key (localstripe does), so one call is one
attempt and a lost answer is settled by looking the PaymentIntent up by our metadata instead.

Callers get plain dataclasses and `BillingError`s, never Stripe objects or Stripe exceptions:
- Stripe unreachable, misconfigured or failing (connection, auth, 5xx, rate limit) →
  `StripeUnavailable` (503, "Card payments are unavailable right now; nothing was charged.").
- A card refused when it is saved → `CardRefused` (402, the card's message).
- A PaymentIntent declined → `ChargeResult(status="declined", message=...)`, not an exception.
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import stripe
from django.conf import settings

from accounts.models import Organisation
from billing_site.errors import BillingError

log = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "Card payments are unavailable right now; nothing was charged."
DEFAULT_API_BASE = "https://api.stripe.com"


class StripeUnavailable(BillingError):
    def __init__(self, detail: str = ""):
        super().__init__("STRIPE_UNAVAILABLE", UNAVAILABLE_MESSAGE, 503)
        self.detail = detail


class CardRefused(BillingError):
    def __init__(self, message: str):
        super().__init__("CARD_DECLINED", message or "Your card was declined.", 402)


class StripeRequestError(BillingError):
    """Stripe understood the request and refused it (an unknown id, a bad parameter)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__("STRIPE_ERROR", message, status)


@dataclass(frozen=True)
class CardDetails:
    id: str
    customer_id: str | None
    brand: str
    last4: str
    exp_month: int
    exp_year: int


@dataclass(frozen=True)
class SetupIntentInfo:
    id: str
    client_secret: str
    customer_id: str | None
    payment_method_id: str | None
    status: str


@dataclass(frozen=True)
class ChargeResult:
    """What became of one PaymentIntent: succeeded, declined (with the card's message), or pending
    (still processing; a webhook or the reconciler settles it)."""

    status: Literal["succeeded", "declined", "pending"]
    payment_intent_id: str
    message: str = ""
    amount_cents: int = 0
    metadata: dict = field(default_factory=dict)


_http_client_timeout: int | None = None


def configure() -> None:
    """Points the SDK at settings (cheap; called before every request, so tests may change the
    settings between calls)."""
    global _http_client_timeout
    stripe.api_key = settings.STRIPE_SECRET_KEY
    stripe.api_base = (settings.STRIPE_API_BASE or DEFAULT_API_BASE).rstrip("/")
    stripe.max_network_retries = 0
    stripe.enable_telemetry = False
    timeout = settings.STRIPE_TIMEOUT_SECONDS
    if _http_client_timeout != timeout:
        stripe.default_http_client = stripe.RequestsClient(timeout=timeout)
        _http_client_timeout = timeout


def js_url() -> str:
    """Where the page loads Stripe.js from: localstripe's stand-in when STRIPE_API_BASE is set."""
    if settings.STRIPE_API_BASE:
        return settings.STRIPE_API_BASE.rstrip("/") + "/js.stripe.com/v3/"
    return "https://js.stripe.com/v3/"


def csp_sources() -> dict[str, list[str]]:
    """What the content security policy of a page that loads Stripe.js must add: the origin of
    the script and its frames, and the API it calls (localstripe's one origin in development)."""
    if settings.STRIPE_API_BASE:
        parts = urlsplit(settings.STRIPE_API_BASE)
        origin = f"{parts.scheme}://{parts.netloc}"
        return {"script-src": [origin], "connect-src": [origin], "frame-src": [origin]}
    return {
        "script-src": ["https://js.stripe.com"],
        "connect-src": ["https://api.stripe.com"],
        # Stripe.js's card element and 3-D Secure challenges are frames from these two.
        "frame-src": ["https://js.stripe.com", "https://hooks.stripe.com"],
    }


def publishable_key() -> str:
    return settings.STRIPE_PUBLISHABLE_KEY


def _call(fn, /, *args, **params):
    """Runs one SDK call; transport, auth and server failures become StripeUnavailable.
    CardError and InvalidRequestError pass through for the caller to interpret."""
    configure()
    try:
        return fn(*args, **params)
    except (stripe.CardError, stripe.InvalidRequestError):
        raise
    except (
        stripe.APIConnectionError,
        stripe.AuthenticationError,
        stripe.PermissionError,
        stripe.RateLimitError,
        stripe.APIError,
    ) as e:
        log.warning("Stripe unavailable: %s", e)
        raise StripeUnavailable(str(e)) from e
    except stripe.StripeError as e:
        if e.http_status is None or e.http_status >= 500:
            log.warning("Stripe unavailable: %s", e)
            raise StripeUnavailable(str(e)) from e
        raise StripeRequestError(e.user_message or str(e)) from e


def _not_found(e: stripe.InvalidRequestError) -> bool:
    return e.http_status == 404 or getattr(e, "code", None) == "resource_missing"


def _retrieve(resource, object_id: str):
    """The Stripe object with this id, or None when Stripe does not know it."""
    try:
        return _call(resource.retrieve, id=object_id)
    except stripe.InvalidRequestError as e:
        if _not_found(e):
            return None
        raise StripeRequestError(e.user_message or str(e)) from e


# --- customers -------------------------------------------------------------------------------


def customer_ensure(org) -> str:
    """The organisation's Stripe customer id, creating the customer (once) if it has none."""
    if org.stripe_customer_id:
        return org.stripe_customer_id
    try:
        customer = _call(
            stripe.Customer.create,
            name=org.name,
            metadata={"org_id": str(org.pk)},
        )
    except stripe.InvalidRequestError as e:
        raise StripeRequestError(e.user_message or str(e)) from e
    # Keep the first id stored if two requests raced; the other customer stays empty.
    if Organisation.objects.filter(pk=org.pk, stripe_customer_id="").update(stripe_customer_id=customer.id):
        org.stripe_customer_id = customer.id
    else:
        org.stripe_customer_id = Organisation.objects.values_list("stripe_customer_id", flat=True).get(
            pk=org.pk
        )
    return org.stripe_customer_id


# --- saving cards ----------------------------------------------------------------------------


def _plain(obj) -> dict:
    """A Stripe object as a plain dict (the SDK's objects are not dicts)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _setup_intent_info(si) -> SetupIntentInfo:
    si = _plain(si)
    pm = si.get("payment_method")
    if pm is not None and not isinstance(pm, str):
        pm = pm["id"]
    customer = si.get("customer")
    if customer is not None and not isinstance(customer, str):
        customer = customer["id"]
    return SetupIntentInfo(
        id=si["id"],
        client_secret=si.get("client_secret") or "",
        customer_id=customer,
        payment_method_id=pm,
        status=si.get("status") or "",
    )


def setup_intent_create(*, customer_id: str) -> SetupIntentInfo:
    """A SetupIntent for saving a card for off-session charges; the page confirms it with
    Stripe.js (`confirmCardSetup`) using its client secret."""
    try:
        si = _call(
            stripe.SetupIntent.create,
            customer=customer_id,
            usage="off_session",
            payment_method_types=["card"],
        )
    except stripe.InvalidRequestError as e:
        raise StripeRequestError(e.user_message or str(e)) from e
    return _setup_intent_info(si)


def setup_intent_retrieve(setup_intent_id: str) -> SetupIntentInfo | None:
    si = _retrieve(stripe.SetupIntent, setup_intent_id)
    return None if si is None else _setup_intent_info(si)


def _card_details(pm) -> CardDetails:
    pm = _plain(pm)
    card = pm.get("card") or {}
    customer = pm.get("customer")
    if customer is not None and not isinstance(customer, str):
        customer = customer["id"]
    return CardDetails(
        id=pm["id"],
        customer_id=customer,
        brand=card.get("brand") or "card",
        last4=card.get("last4") or "",
        exp_month=int(card.get("exp_month") or 0),
        exp_year=int(card.get("exp_year") or 0),
    )


def payment_method_details(payment_method_id: str) -> CardDetails | None:
    """The card behind a PaymentMethod id, or None if Stripe does not know it."""
    pm = _retrieve(stripe.PaymentMethod, payment_method_id)
    if pm is None or _plain(pm).get("type") != "card":
        return None
    return _card_details(pm)


def payment_method_attach(*, payment_method_id: str, customer_id: str) -> CardDetails:
    """Attaches a card to a customer (raises CardRefused when the bank refuses it)."""
    try:
        pm = _call(stripe.PaymentMethod.attach, payment_method_id, customer=customer_id)
    except stripe.CardError as e:
        raise CardRefused(e.user_message or str(e)) from e
    except stripe.InvalidRequestError as e:
        if e.http_status == 402:  # localstripe reports refusals this way
            raise CardRefused(e.user_message or "Your card was declined.") from e
        raise StripeRequestError(e.user_message or str(e), status=400) from e
    return _card_details(pm)


def payment_method_detach(payment_method_id: str) -> None:
    """Detaches a card from its customer; a card Stripe no longer has is already gone."""
    try:
        _call(stripe.PaymentMethod.detach, payment_method_id)
    except stripe.InvalidRequestError as e:
        if _not_found(e) or "not attached" in (e.user_message or "").lower():
            return
        raise StripeRequestError(e.user_message or str(e)) from e


# --- charging --------------------------------------------------------------------------------


def _charge_result(pi) -> ChargeResult:
    pi = _plain(pi)
    status = pi.get("status")
    metadata = dict(pi.get("metadata") or {})
    amount = int(pi.get("amount") or 0)
    if status == "succeeded":
        return ChargeResult("succeeded", pi["id"], amount_cents=amount, metadata=metadata)
    if status in ("processing", "requires_capture"):
        return ChargeResult("pending", pi["id"], amount_cents=amount, metadata=metadata)
    if status == "requires_action":
        message = "Your bank wants to confirm this payment, which needs you present: use another card."
    elif status == "canceled":
        message = "The payment was cancelled."
    else:  # requires_payment_method (a failed charge), requires_confirmation
        error = pi.get("last_payment_error") or {}
        message = error.get("message") or "Your card was declined."
    return ChargeResult("declined", pi["id"], message=message, amount_cents=amount, metadata=metadata)


def payment_intent_create_off_session(
    *,
    customer_id: str,
    payment_method_id: str,
    amount_cents: int,
    idempotency_key: str,
    metadata: dict[str, str],
    description: str = "",
    currency: str = "usd",
) -> ChargeResult:
    """Charges a saved card without the customer present: one PaymentIntent, confirmed at once.
    A decline is a result, not an exception; StripeUnavailable means we do not know whether the
    PaymentIntent was made (look it up with payment_intent_find)."""
    params = {
        "amount": amount_cents,
        "currency": currency,
        "customer": customer_id,
        "payment_method": payment_method_id,
        "confirm": True,
        "off_session": True,
        # localstripe refuses `description` on PaymentIntents, so ours travels in the metadata.
        "metadata": {**metadata, "description": description[:500]} if description else metadata,
        "idempotency_key": idempotency_key,
    }
    try:
        pi = _call(stripe.PaymentIntent.create, **params)
    except stripe.CardError as e:
        return _declined_from_error(e)
    except stripe.InvalidRequestError as e:
        if e.http_status == 402:
            return _declined_from_error(e)
        raise StripeRequestError(e.user_message or str(e)) from e
    return _charge_result(pi)


def _declined_from_error(e: stripe.StripeError) -> ChargeResult:
    error = e.error
    pi = getattr(error, "payment_intent", None) if error is not None else None
    pi_id = (_plain(pi).get("id") if pi is not None else None) or ""
    return ChargeResult("declined", pi_id, message=e.user_message or "Your card was declined.")


def payment_intent_retrieve(payment_intent_id: str) -> ChargeResult | None:
    pi = _retrieve(stripe.PaymentIntent, payment_intent_id)
    return None if pi is None else _charge_result(pi)


def payment_intents_list(*, customer_id: str) -> list[ChargeResult]:
    """Every PaymentIntent of a customer. Stripe filters by customer; localstripe does not take
    the filter, so then the full list is read and filtered here."""
    try:
        page = _call(stripe.PaymentIntent.list, customer=customer_id, limit=100)
    except stripe.InvalidRequestError:
        try:
            page = _call(stripe.PaymentIntent.list, limit=100)
        except stripe.InvalidRequestError as e:
            raise StripeRequestError(e.user_message or str(e)) from e
    results = []
    try:
        for pi in page.auto_paging_iter():
            if _plain(pi).get("customer") == customer_id:
                results.append(_charge_result(pi))
    except stripe.StripeError as e:
        raise StripeUnavailable(str(e)) from e
    return results


def payment_intent_find(*, customer_id: str, idempotency_key: str) -> ChargeResult | None:
    """The PaymentIntent made for one attempt (found by our metadata), or None if there is none.
    Should Stripe ever hold two, the succeeded one wins and the oddity is logged."""
    found = [
        r
        for r in payment_intents_list(customer_id=customer_id)
        if r.metadata.get("idempotency_key") == idempotency_key
    ]
    if len(found) > 1:
        log.error("Stripe holds %d PaymentIntents for attempt %s", len(found), idempotency_key)
    for result in found:
        if result.status == "succeeded":
            return result
    return found[0] if found else None


def refund_create(*, payment_intent_id: str, idempotency_key: str, amount_cents: int | None = None) -> str:
    """Refunds a PaymentIntent (all of it, or `amount_cents`); returns the refund id."""
    params = {"payment_intent": payment_intent_id, "idempotency_key": idempotency_key}
    if amount_cents is not None:
        params["amount"] = amount_cents
    try:
        refund = _call(stripe.Refund.create, **params)
    except stripe.InvalidRequestError as e:
        raise StripeRequestError(e.user_message or str(e), status=409) from e
    return refund["id"]


class WebhookSignatureInvalid(Exception):
    """The payload is not signed with our endpoint secret (or is older than the tolerance)."""


WEBHOOK_TOLERANCE_SECONDS = 300


def webhook_event_verify(*, payload: bytes, signature: str) -> dict:
    """The event in a webhook request, once its Stripe-Signature is checked (300 s tolerance)."""
    try:
        stripe.Webhook.construct_event(
            payload, signature, settings.STRIPE_WEBHOOK_SECRET, tolerance=WEBHOOK_TOLERANCE_SECONDS
        )
        event = json.loads(payload)
    except (stripe.SignatureVerificationError, ValueError) as error:
        raise WebhookSignatureInvalid(str(error)) from None
    if not isinstance(event, dict) or not event.get("id") or not event.get("type"):
        raise WebhookSignatureInvalid("not a Stripe event")
    return event
