"""Settings → Billing pages of the usage app: Overview, Usage (+ CSV), Notifications; the public
cost estimator."""

from datetime import timedelta

from django.shortcuts import render

from accounts import clock
from accounts.access import billing_page
from usage import selectors


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
