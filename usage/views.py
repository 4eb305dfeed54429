"""Settings → Billing pages of the usage app: Overview, Usage (+ CSV), Notifications; the public
cost estimator."""

import csv
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.cache import patch_vary_headers
from django.utils.http import urlencode

from accounts import clock
from accounts.access import billing_page
from accounts.models import Membership, Plan, Role
from billing_site.errors import BillingError
from usage import charts, credits, selectors, services
from usage import pricing as estimator
from usage.alert_forms import LowBalanceAlertForm
from usage.credits_forms import PackPurchaseForm, RechargeForm
from usage.models import MAX_ALERT_RECIPIENTS, CreditAccount, LowBalanceAlert
from usage.pricing_forms import EstimatorForm
from usage.usage_forms import DEFAULT_DAYS, PRESET_DAYS, UsageRangeForm, preset_range


@billing_page(manage=False)
def overview(request):
    sub = request.org.subscription
    balance = selectors.balance_for(sub=sub)
    today = clock.today()
    forecast = selectors.forecast_for(
        org_id=request.org.pk,
        credits_remaining=balance.credits_remaining,
        today=today,
        period_end=balance.period_end.date(),
    )
    context = {
        "active_tab": "overview",
        "sub": sub,
        "balance": balance,
        "forecast": forecast,
        "estimate": selectors.next_invoice_estimate(sub=sub, balance=balance),
        "period_last_day": balance.period_end - timedelta(days=1),
        "over_quota": balance.credits_used_this_period > balance.credits_included,
    }
    return render(request, "billing/overview.html", context)


def _alert_initial(alert: LowBalanceAlert | None, org) -> dict:
    if alert is None:  # a suggestion: a tenth of the monthly quota, to the billing managers
        managers = (
            Membership.objects.filter(org=org, role__in=[Role.OWNER, Role.BILLING_ADMIN])
            .order_by("created_at", "pk")
            .values_list("user__email", flat=True)[:MAX_ALERT_RECIPIENTS]
        )
        threshold = max(1, org.subscription.monthly_credits // 10)
        return {"enabled": False, "threshold": f"{threshold:,}", "recipients": "\n".join(managers)}
    return {
        "enabled": alert.enabled,
        "threshold": f"{alert.threshold:,}",
        "recipients": "\n".join(alert.recipients),
    }


@billing_page(manage=True)
def notifications(request):
    """The low-balance alert: on/off, threshold, recipients. htmx posts get the form fragment
    back; without JavaScript a save redirects here with a message."""
    org = request.org
    alert = LowBalanceAlert.objects.filter(org=org).first()
    saved = False
    if request.method == "POST":
        form = LowBalanceAlertForm(request.POST)
        if form.is_valid():
            try:
                alert = services.low_balance_alert_save(org_id=org.pk, **form.cleaned_data)
            except BillingError as error:
                form.add_error(None, error.message)
            else:
                if alert.enabled:
                    count = len(alert.recipients)
                    said = (
                        f"Low-balance alert saved: we'll e-mail {count} address{'es' if count != 1 else ''} "
                        f"when the balance falls below {alert.threshold:,} credits."
                    )
                else:
                    said = "Low-balance alert saved: it is off, so no e-mail will be sent."
                if not request.htmx:
                    messages.success(request, said)
                    return redirect("billing:notifications")
                saved = said
                form = LowBalanceAlertForm(initial=_alert_initial(alert, org))
    else:
        form = LowBalanceAlertForm(initial=_alert_initial(alert, org))
    members = Membership.objects.filter(org=org).order_by("user__email").values_list("user__email", flat=True)
    context = {
        "active_tab": "notifications",
        "form": form,
        "alert": alert,
        "saved": saved,
        "balance": CreditAccount.objects.values_list("balance", flat=True).get(org_id=org.pk),
        "member_emails": list(members),
    }
    template = "billing/notifications.html" + ("#form" if request.htmx else "")
    return render(request, template, context)


def pricing(request):
    """The public cost estimator: a GET form (values in the URL); htmx swaps the results."""
    form = EstimatorForm(request.GET or None)
    result = None
    if not form.is_bound:
        result = estimator.estimate(base=0, advanced=0, ocr=0)
    elif form.is_valid():
        result = estimator.estimate(**form.pages())
    context = {
        "form": form,
        "estimate": result,
        "rates": estimator.estimate_rates(),
        "plans": Plan.objects.all(),
        "staff_email": settings.STAFF_EMAIL,
    }
    # htmx swaps the results; a history restore (back button after hx-push-url) needs the page.
    partial = request.htmx and not request.htmx.history_restore_request
    response = render(request, "pricing.html" + ("#htmx" if partial else ""), context)
    patch_vary_headers(response, ["HX-Request", "HX-History-Restore-Request"])
    return response


def _api_keys_url(membership) -> str | None:
    """Where to create an API key, for the empty state: only for people who may, once the page
    exists."""
    if not membership.can_manage_billing:
        return None
    try:
        return reverse("billing:api_keys")
    except NoReverseMatch:
        return None


@billing_page(manage=False)
def usage_page(request):
    """Usage: daily credits by product or mode over a range (default: the last 30 days, today
    included), the current period against its quota, a table and the CSV link. A bad range says
    why next to the form and shows the default range. htmx requests get the results fragment and
    the range form (swapped out of band, so it shows the range and its errors)."""
    today = clock.today()
    form = UsageRangeForm(request.GET, today=today)
    valid = form.is_valid()
    chosen = form.usage_range
    report = charts.UsageReport(
        org_id=request.org.pk,
        usage_range=chosen,
        period=request.org.subscription.current_period,
        today=today,
    )

    page_url = reverse("billing:usage")
    presets = []
    for days in PRESET_DAYS:
        preset = preset_range(today, days, chosen.group_by)
        presets.append(
            {
                "days": days,
                "url": f"{page_url}?{urlencode(preset.query())}",
                "current": valid and (preset.start, preset.end) == (chosen.start, chosen.end),
            }
        )
    context = {
        "active_tab": "usage",
        # A valid form is shown with the range it resolved to; an invalid one as typed, with errors.
        "form": UsageRangeForm(initial=chosen.query(), today=today) if valid else form,
        "form_valid": valid,
        "default_days": DEFAULT_DAYS,
        "usage_range": chosen,
        "presets": presets,
        "report": report,
        "cache_version": charts.CACHE_VERSION,
        "cache_seconds": charts.CACHE_SECONDS,
        "csv_url": f"{reverse('billing:usage_csv')}?{urlencode(chosen.query())}",
        "api_keys_url": _api_keys_url(request.membership),
        "oob": bool(request.htmx),
    }
    template = "billing/usage.html"
    if request.htmx and not request.htmx.history_restore_request:
        template += "#htmx"
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


@billing_page(manage=False)
def usage_csv(request):
    """The range's usage as CSV: one row per day, product and mode with usage, sorted by them;
    the same range rules as the page, and a bad range is a 400 in plain words."""
    form = UsageRangeForm(request.GET, today=clock.today())
    if not form.is_valid():
        message = "\n".join(form.error_lines()) + "\n"
        return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")
    chosen = form.usage_range
    lines = selectors.usage_lines(org_id=request.org.pk, spans=[(chosen.start, chosen.end)])
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{chosen.start}-to-{chosen.end}.csv"'
    writer = csv.writer(response, lineterminator="\n")
    writer.writerow(["date", "product", "mode", "credits", "units"])
    for line in lines:
        writer.writerow([line.day.isoformat(), line.product, line.mode, line.credits, line.units])
    return response


# --- Credits: packs, commitment tier, auto-recharge, refunds (DESIGN §4) ----------------------


def _payment_methods_url() -> str | None:
    try:
        return reverse("billing:payment_methods")
    except NoReverseMatch:
        return None


def _credits_context(request, *, buy_form=None, recharge_form=None, preview=None) -> dict:
    from invoices.services import card_on_file
    from usage.models import (
        REFUND_DAYS,
        Bucket,
        Commitment,
        CreditLot,
        PurchaseStatus,
        RechargeKind,
        RechargeSetting,
        Tier,
    )

    org = request.org
    now = clock.now()
    status = credits.commitment_status(org_id=org.pk, now=now)
    offers = [
        {
            "pack": pack,
            "preview": credits.purchase_preview(
                org_id=org.pk, amount_cents=pack.price_cents, credits=pack.credits, now=now
            ),
        }
        for pack in credits.packs_active()
    ]
    setting = RechargeSetting.objects.filter(org=org).select_related("pack").first()
    if buy_form is None:
        middle = offers[len(offers) // 2]["pack"].pk if offers else None
        buy_form = PackPurchaseForm(initial={"token": credits.new_form_token(), "pack": middle})
    held = credits.purchased_balance(org_id=org.pk)
    bonus_expires = (
        CreditLot.objects.filter(org=org, bucket=Bucket.BONUS, remaining__gt=0)
        .order_by("expires_at")
        .values_list("expires_at", flat=True)
        .first()
    )
    purchases = credits.purchases_recent(org_id=org.pk)
    refund = None
    if request.method == "GET" and request.GET.get("refund"):
        try:
            refund = credits.purchase_for(org_id=org.pk, purchase_id=int(request.GET["refund"]))
        except (BillingError, ValueError):
            raise Http404("No such purchase.") from None
        refund.refusal = credits.refund_refusal(refund, now=now)
    tier_after = credits.refund_tier_after(refund, now=now) if refund else None
    commitment = Commitment.objects.filter(org=org).first()
    if commitment is not None and commitment.override_tier:
        tier_after = None  # a staff-set tier does not move with purchases
    schedule_on = setting is not None and setting.enabled and setting.kind == RechargeKind.SCHEDULE
    return {
        "active_tab": "credits",
        "status": status,
        "offers": offers,
        "buy_form": buy_form,
        "recharge_form": recharge_form or RechargeForm(initial=RechargeForm.initial_for(setting)),
        "setting": setting,
        "next_recharge": credits.next_recharge_date(setting, now.date()) if schedule_on else None,
        "preview": preview,
        "has_card": card_on_file(org=org),
        "payment_methods_url": _payment_methods_url(),
        "purchases": purchases,
        "in_flight": any(p.status == PurchaseStatus.PENDING and p.is_recharge for p in purchases),
        "purchased_credits": held[Bucket.PURCHASED],
        "bonus_credits": held[Bucket.BONUS],
        "bonus_expires_at": bonus_expires,
        "balance": CreditAccount.objects.values_list("balance", flat=True).get(org_id=org.pk),
        "refund": refund,
        "stop_confirm": request.method == "GET"
        and request.GET.get("stop") == "1"
        and bool(setting and setting.enabled),
        "refund_days": REFUND_DAYS,
        "refund_tier_after": tier_after,
        "refund_tier_after_label": Tier(tier_after).label if tier_after else "",
        "refund_purchased_after": max(0, status.purchased_cents - refund.amount_cents) if refund else 0,
    }


def _credits_render(request, status=200, partial=None, **kwargs):
    template = "billing/credits.html" + (f"#{partial}" if partial and request.htmx else "")
    return render(request, template, _credits_context(request, **kwargs), status=status)


def _credits_buy(request):
    from usage.models import PurchaseStatus

    form = PackPurchaseForm(request.POST)
    if not form.is_valid():
        return _credits_render(request, buy_form=form)
    data = form.cleaned_data
    try:
        purchase, first = credits.pack_purchase(
            org=request.org,
            pack_id=data["pack"].pk,
            token=data["token"],
            agreed_to_refund_policy=data["agree"],
            actor=request.user,
        )
    except BillingError as error:  # no card, a pack withdrawn, Stripe away: nothing was charged
        form.add_error(None, error.message)
        return _credits_render(request, buy_form=form)
    if not first:
        messages.info(
            request, "This purchase was already submitted (a second click): nothing more was charged."
        )
    elif purchase.status == PurchaseStatus.PAID:
        bonus = f" plus {purchase.bonus_credits:,} bonus credits" if purchase.bonus_credits else ""
        messages.success(
            request,
            f"Bought {purchase.credits:,} credits{bonus} for ${purchase.amount_cents / 100:,.2f}: "
            f"invoice {purchase.invoice.number} is paid.",
        )
    elif purchase.status == PurchaseStatus.PENDING:
        messages.info(
            request, "Your bank is still processing the payment: the credits arrive as soon as it completes."
        )
    else:
        retry = PackPurchaseForm(
            initial={"pack": data["pack"].pk, "agree": True, "token": credits.new_form_token()}
        )
        messages.error(request, f"{purchase.message} Nothing was charged and no credits were added.")
        return _credits_render(request, buy_form=retry)
    return redirect("billing:credits")


def _credits_recharge(request, action: str):
    from django_htmx.http import HttpResponseClientRedirect

    form = RechargeForm(request.POST)
    if not form.is_valid():
        return _credits_render(request, recharge_form=form, partial="recharge")
    if action == "preview":
        preview = credits.recharge_preview(org_id=request.org.pk, choice=form.choice)
        return _credits_render(request, recharge_form=form, preview=preview, partial="recharge")
    setting = credits.recharge_setting_save(org=request.org, choice=form.choice, actor=request.user)
    if setting.kind == "threshold":
        said = (
            f"Auto-recharge is on: when your balance falls below {setting.threshold:,} credits we buy "
            f"the {setting.pack.price_label} pack ({setting.pack.credits:,} credits)."
        )
    else:
        next_date = credits.next_recharge_date(setting, clock.today())
        said = (
            f"Auto-recharge is on: ${setting.amount_dollars:,} of credits {setting.get_frequency_display().lower()}, "
            f"next on {next_date.day} {next_date:%b %Y}."
        )
    messages.success(request, said)
    if request.htmx:
        return HttpResponseClientRedirect(reverse("billing:credits"))
    return redirect("billing:credits")


@billing_page(manage=True)
def credits_page(request):
    """Credits: the commitment tier, buy a pack (after the refund-policy tick), auto-recharge with
    a preview, and the latest purchases with their refunds. POSTs carry an `action`."""
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "buy":
            return _credits_buy(request)
        if action in ("preview", "save"):
            return _credits_recharge(request, action)
        if action == "stop" and credits.recharge_stop(org=request.org, actor=request.user) is not None:
            messages.success(
                request, "Auto-recharge is off: no further recharge will start. The credits you bought stay."
            )
        return redirect("billing:credits")
    return _credits_render(request)


@billing_page(manage=True)
def credits_refund(request, purchase_id: int):
    """Refunds an unused purchase (POST, after the confirmation on the Credits tab)."""
    if request.method != "POST":
        return redirect(f"{reverse('billing:credits')}?refund={purchase_id}")
    try:
        purchase = credits.purchase_refund(org=request.org, purchase_id=purchase_id, actor=request.user)
    except BillingError as error:
        if error.status == 404:
            raise Http404(error.message) from None
        if error.code == "REFUND_PENDING":
            messages.info(request, error.message)
        elif error.code == "REFUND_FAILED":
            messages.error(request, error.message)
        else:
            messages.error(request, f"{error.message} Nothing was refunded.")
        return redirect("billing:credits")
    bonus = (
        f" and {purchase.refund_removed_bonus:,} unspent bonus credits"
        if purchase.refund_removed_bonus
        else ""
    )
    messages.success(
        request,
        f"Refunded ${purchase.amount_cents / 100:,.2f} to your card: {purchase.refund_removed_credits:,} credits{bonus} "
        f"were removed, and invoice {purchase.invoice.number} is now Refunded.",
    )
    return redirect("billing:credits")
