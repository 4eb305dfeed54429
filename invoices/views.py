"""Settings → Billing pages of the invoices app: Invoices, one invoice, Payment methods.

Owners and billing admins only: `billing_page(manage=True)` answers 403 to members before any
invoice or card is looked up, so a member learns nothing about which numbers exist.
"""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import clock
from accounts.access import billing_page
from billing_site.errors import BillingError
from invoices import selectors, services, stripe_gateway
from invoices.forms import CardAddForm
from invoices.models import InvoiceStatus

INVOICES_PER_PAGE = 50


@billing_page(manage=True)
def invoices(request):
    page = Paginator(selectors.invoices_for(org=request.org), INVOICES_PER_PAGE).get_page(
        request.GET.get("page")
    )
    for invoice in page:
        invoice.period_last_day = selectors.period_last_day(invoice.period_end)
    return render(request, "billing/invoices.html", {"active_tab": "invoices", "page": page})


@billing_page(manage=True)
def invoice(request, number):
    found = selectors.invoice_for(org=request.org, number=number)
    if found is None:
        raise Http404("No such invoice.")
    paid_by = next((a for a in found.attempts.all() if a.status == "succeeded"), None)
    context = {
        "active_tab": "invoices",
        "invoice": found,
        "lines": list(found.lines.all()),
        "period_last_day": selectors.period_last_day(found.period_end),
        "seller": selectors.seller(),
        "paid_card": paid_by.payment_method if paid_by else None,
        "is_paid": found.status in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED),
    }
    return render(request, "billing/invoice_detail.html", context)


@billing_page(manage=True)
def invoice_pdf(request, number):
    """The invoice's PDF, the same bytes every time until its status changes."""
    found = selectors.invoice_for(org=request.org, number=number)
    if found is None or found.number is None:
        raise Http404("No such invoice.")
    stored = services.invoice_pdf(invoice=found)
    response = HttpResponse(bytes(stored.content), content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="{found.number}.pdf"'
    response["ETag"] = f'"{stored.sha256}"'
    response["Cache-Control"] = "private, no-cache"
    return response


def _payment_methods_page(request, *, form, status=200, remove_card=None):
    cards = selectors.cards_for(org=request.org)
    today = clock.today()
    for card in cards:
        card.expired = (card.exp_year, card.exp_month) < (today.year, today.month)
    context = {
        "active_tab": "payment_methods",
        "cards": cards,
        "form": form,
        "remove_card": remove_card,
        "remove_is_last": remove_card is not None and len(cards) == 1,
        "on_paid_plan": not request.org.subscription.plan.is_free,
        "stripe_unavailable": "",
        "stripe_js_url": stripe_gateway.js_url(),
    }
    try:
        setup = services.payment_method_setup_start(org=request.org)
    except BillingError as e:
        context["stripe_unavailable"] = e.message
    else:
        context["stripe_config"] = {
            "publishableKey": stripe_gateway.publishable_key(),
            "clientSecret": setup.client_secret,
            "setupIntent": setup.id,
        }
    response = render(request, "billing/payment_methods.html", context, status=status)
    if "stripe_config" in context:  # the page loads Stripe.js: let its origins through (django-csp)
        response._csp_update = stripe_gateway.csp_sources()
    return response


@billing_page(manage=True)
def payment_methods(request):
    remove_card = None
    if "remove" in request.GET:
        try:
            remove_card = selectors.card_for(org=request.org, payment_method_id=int(request.GET["remove"]))
        except ValueError:
            remove_card = None
        if remove_card is None:
            raise Http404("No such card.")
    return _payment_methods_page(request, form=CardAddForm(), remove_card=remove_card)


@billing_page(manage=True)
@require_POST
def payment_method_add(request):
    form = CardAddForm(request.POST)
    status = 400
    if form.is_valid():
        try:
            card = services.payment_method_add(
                org=request.org,
                stripe_payment_method_id=form.cleaned_data["payment_method"],
                setup_intent_id=form.cleaned_data["setup_intent"] or None,
            )
        except BillingError as e:
            form.add_error(None, e.message)
            status = e.status
        else:
            note = " It is your default card." if card.is_default else ""
            messages.success(request, f"Card {card} added.{note}")
            return redirect("billing:payment_methods")
    return _payment_methods_page(request, form=form, status=status)


def _card_change(request, pk, change, success):
    """Applies a card action; another organisation's card is 404, a refusal a message."""
    try:
        card = change(org=request.org, payment_method_id=pk)
    except BillingError as e:
        if e.status == 404:
            raise Http404(e.message) from e
        messages.error(request, e.message)
    else:
        messages.success(request, success.format(card=card))
    return redirect("billing:payment_methods")


@billing_page(manage=True)
@require_POST
def payment_method_default(request, pk):
    return _card_change(
        request,
        pk,
        services.payment_method_make_default,
        "{card} is now your default card: it is charged from now on.",
    )


@billing_page(manage=True)
@require_POST
def payment_method_remove(request, pk):
    return _card_change(request, pk, services.payment_method_remove, "Card {card} removed.")
