"""One month and a bit of billing for six organisations, in steps a worker or billing_tick runs:
what the crash-and-rerun tests crash at every step boundary, and compare with one clean run.

The world, made on 15 Jan 2027 at 10:00 UTC:
- "Starter, overage": a good card, 41,252 credits spent (1,252 of overage), a job left running.
- "Starter, declining": a card whose every charge is declined.
- "Free, alert": no card, 3,000 credits spent, a low-balance alert at 8,000.
- "Free, recharge": a good card, a threshold recharge (below 5,000, a $10 pack), 6,000 spent.
- "Pro, downgrading": a good card, a downgrade to Starter scheduled, $20 recharged on each 1st.
- "Starter, bonus": a good card, a $200 pack bought (Explore: +3% bonus, expiring 1 Feb), and a
  $10 pack whose request died after Stripe charged it; Stripe's webhook for it is stored.

The steps: the webhook worker processes that event; billing_tick at 11:00 (first invoices charged,
a decline and its retries scheduled, the recharge, the alert); more spending and the recharge task;
billing_tick on 16 Feb (the Free periods of 1 Feb, the commitment period and its bonus, the stale
job, the downgrade and the Starter periods of 15 Feb close, invoices issued and charged, the
scheduled recharge); billing_tick on 20 Feb (the declined invoices' retries).
"""

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import StringIO

from django.conf import settings
from django.core.management import call_command
from django.test import Client

from accounts import clock
from accounts.models import Organisation, Subscription
from accounts.services import organisation_create, subscription_downgrade_schedule
from invoices import stripe_gateway
from invoices import tasks as invoice_tasks
from invoices.models import PaymentAttempt, StripeWebhookEvent
from tests.fake_stripe import DECLINING_CARD, GOOD_CARD, card_add
from usage import credits, services
from usage import tasks as usage_tasks
from usage.models import CreditPack, RechargeFrequency, RechargeKind


def tick(at: str | None = None) -> None:
    call_command("billing_tick", *(["--at", at] if at else []), stdout=StringIO())
    clock.forget()


def spend(org_id: int, credits_: int, tag: str) -> None:
    sub = Subscription.objects.select_related("plan").get(org_id=org_id)
    services.usage_events_record(
        sub=sub, events=[services.EventIn(tag, "parse", "base", credits_, clock.now())]
    )


def _org(name: str, plan: str, card: str | None = None) -> Organisation:
    org, _ = organisation_create(
        name=name, plan_code=plan, owner_email=f"{name.split(',')[0].lower()}@example.com"
    )
    if card:
        card_add(org, card)
    return org


def _pack(dollars: int) -> CreditPack:
    return CreditPack.objects.get(price_cents=dollars * 100)


class RequestDied(BaseException):
    """The process handling a request or a task died (a BaseException: nothing catches it)."""


def _buy_pack_dying_after_stripe(org: Organisation, dollars: int) -> None:
    real = stripe_gateway.payment_intent_create_off_session

    def charge_then_die(**kwargs):
        real(**kwargs)
        raise RequestDied("the request died after Stripe charged the card")

    stripe_gateway.payment_intent_create_off_session = charge_then_die
    try:
        credits.pack_purchase(
            org=org, pack_id=_pack(dollars).pk, token="dies", agreed_to_refund_policy=True, actor=None
        )
    except RequestDied:
        pass
    finally:
        stripe_gateway.payment_intent_create_off_session = real


def _stripe_sends_the_webhook(org: Organisation) -> int:
    """Posts Stripe's payment_intent.succeeded for the organisation's pending attempt to our
    endpoint, signed; returns the stored event's id (no worker takes it: the step does)."""
    attempt = PaymentAttempt.objects.get(invoice__org=org, status="pending")
    org.refresh_from_db()
    intent = stripe_gateway.payment_intent_find(
        customer_id=org.stripe_customer_id, idempotency_key=attempt.idempotency_key
    )
    event = {
        "id": "evt_scenario_bonus_pack",
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": intent.payment_intent_id, "metadata": intent.metadata}},
    }
    payload = json.dumps(event).encode()
    stamp = int(time.time())
    signature = hmac.new(
        settings.STRIPE_WEBHOOK_SECRET.encode(), b"%d.%s" % (stamp, payload), hashlib.sha256
    ).hexdigest()
    response = Client().post(
        "/stripe/webhook/",
        payload,
        content_type="application/json",
        headers={"Stripe-Signature": f"t={stamp},v1={signature}"},
    )
    assert response.status_code == 200, response.content
    return StripeWebhookEvent.objects.get(stripe_event_id=event["id"]).pk


@dataclass
class World:
    orgs: dict[str, int]
    webhook_event_pk: int


def world_create() -> World:
    tick("2027-01-15T10:00:00Z")
    paying = _org("Starter, overage", "starter", GOOD_CARD)
    declining = _org("Starter, declining", "starter", DECLINING_CARD)
    alerted = _org("Free, alert", "free")
    recharging = _org("Free, recharge", "free", GOOD_CARD)
    downgrading = _org("Pro, downgrading", "pro", GOOD_CARD)
    bonus = _org("Starter, bonus", "starter", GOOD_CARD)

    spend(paying.pk, 41_252, "a-1")
    services.job_start(
        sub=Subscription.objects.select_related("plan").get(org=paying),
        req=services.JobRequest("parse", "base", False, 500, "pdf", 1_000),
    )
    services.low_balance_alert_save(
        org_id=alerted.pk, enabled=True, threshold=8_000, recipients=["alerts@example.com"]
    )
    spend(alerted.pk, 3_000, "c-1")
    credits.recharge_setting_save(
        org=recharging,
        choice=credits.recharge_choice(kind=RechargeKind.THRESHOLD, threshold=5_000, pack_id=_pack(10).pk),
        actor=None,
    )
    spend(recharging.pk, 6_000, "d-1")  # below the threshold: the task is queued (no worker runs it)
    subscription_downgrade_schedule(org=downgrading, plan_code="starter", actor=None)
    credits.recharge_setting_save(
        org=downgrading,
        choice=credits.recharge_choice(
            kind=RechargeKind.SCHEDULE, amount_dollars=20, frequency=RechargeFrequency.MONTHLY, billing_day=1
        ),
        actor=None,
    )
    credits.pack_purchase(
        org=bonus, pack_id=_pack(200).pk, token="big", agreed_to_refund_policy=True, actor=None
    )
    _buy_pack_dying_after_stripe(bonus, 10)
    event_pk = _stripe_sends_the_webhook(bonus)
    orgs = {org.name: org.pk for org in (paying, declining, alerted, recharging, downgrading, bonus)}
    return World(orgs=orgs, webhook_event_pk=event_pk)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[World], object]
    rerun: Callable[[World], object]  # after a crash in it: the task again and billing_tick, or billing_tick
    script: Callable[[World], str]  # the same, as Python for a worker process of its own
    then: Callable[[World], object] | None = None  # customers' traffic after the step (never crashed)


def _billing_tick_at(at: str, then=None) -> Step:
    return Step(
        f"billing_tick --at {at}",
        lambda w: tick(at),
        lambda w: tick(),
        lambda w: (
            f"from django.core.management import call_command; call_command('billing_tick', '--at', {at!r})"
        ),
        then,
    )


STEPS = (
    Step(
        "webhook worker",
        lambda w: invoice_tasks.webhook_process(w.webhook_event_pk),
        lambda w: (invoice_tasks.webhook_process(w.webhook_event_pk), tick()),
        lambda w: f"from invoices.tasks import webhook_process; webhook_process({w.webhook_event_pk})",
    ),
    _billing_tick_at("2027-01-15T11:00:00Z", then=lambda w: spend(w.orgs["Free, recharge"], 9_000, "d-2")),
    Step(
        "recharge task",
        lambda w: usage_tasks.recharge_threshold_run(w.orgs["Free, recharge"]),
        lambda w: (usage_tasks.recharge_threshold_run(w.orgs["Free, recharge"]), tick()),
        lambda w: (
            f"from usage.tasks import recharge_threshold_run; recharge_threshold_run({w.orgs['Free, recharge']})"
        ),
    ),
    _billing_tick_at("2027-02-16T00:00:00Z"),
    _billing_tick_at("2027-02-20T00:00:00Z"),
)
