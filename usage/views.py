"""Settings → Billing pages of the usage app: Overview, Usage (+ CSV), Notifications; the public
cost estimator."""

import csv
from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.cache import patch_vary_headers
from django.utils.http import urlencode

from accounts import clock
from accounts.access import billing_page
from accounts.models import Membership, Plan, Role
from billing_site.errors import BillingError
from usage import charts, selectors, services
from usage import pricing as estimator
from usage.alert_forms import LowBalanceAlertForm
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
    org_id = request.org.pk
    daily = selectors.usage_by_day(
        org_id=org_id, start=chosen.start, end=chosen.end, group_by=chosen.group_by
    )
    grid = charts.usage_grid(usage_range=chosen, daily=daily)

    period = selectors.current_period_for(sub=request.org.subscription)
    first_day = period.start.date()
    last_day = min(today, (period.end - timedelta(days=1)).date())
    per_day = (
        selectors.usage_rows(org_id=org_id, start=first_day, end=last_day, group_by="day")
        if first_day <= last_day
        else []
    )
    period_use = charts.period_use(period=period, today=today, per_day=per_day)

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
        "grid": grid,
        "daily_figure": None if grid.is_empty else charts.daily_figure(grid),
        "period": period_use,
        "period_figure": charts.period_figure(period_use) if period_use.has_usage else None,
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
    lines = selectors.usage_lines(org_id=request.org.pk, start=chosen.start, end=chosen.end)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{chosen.start}-to-{chosen.end}.csv"'
    writer = csv.writer(response, lineterminator="\n")
    writer.writerow(["date", "product", "mode", "credits", "units"])
    for line in lines:
        writer.writerow([line.day.isoformat(), line.product, line.mode, line.credits, line.units])
    return response
