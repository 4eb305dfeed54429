"""Sign-up, the organisation switcher (sign-in, sign-out and password reset are Django's views)."""

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.cache import patch_cache_control
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts import clock
from accounts import services as account_services
from accounts.access import SESSION_KEY, billing_page
from accounts.api_key_forms import ApiKeyCreateForm
from accounts.forms import OrgSwitchForm, SignupForm
from accounts.models import ApiKey, Membership, Plan, Subscription
from accounts.plan_forms import ContactSalesForm, OverageCapForm, PlanChangeForm
from accounts.services import (
    contact_request_create,
    organisation_create,
    overage_cap_set,
    payment_card_on_file,
    plan_change_kind,
    plan_change_preview,
    subscription_downgrade_cancel,
    subscription_downgrade_schedule,
    subscription_upgrade,
)
from billing_site.errors import BillingError


def signup(request):
    """Creates a user and their own organisation on Free (no card needed), then signs them in."""
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        org, _ = organisation_create(
            name=form.cleaned_data["organisation"],
            plan_code="free",
            owner_email=form.cleaned_data["email"],
            password=form.cleaned_data["password1"],
        )
        user = org.memberships.get().user
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        request.session[SESSION_KEY] = org.pk
        messages.success(request, f"Welcome! {org.name} is on the Free plan with 10,000 credits a month.")
        return redirect("billing:overview")
    return render(request, "registration/signup.html", {"form": form})


@login_required
@require_POST
def org_switch(request):
    form = OrgSwitchForm(request.POST)
    if not form.is_valid():
        raise Http404
    membership = (
        Membership.objects.filter(user=request.user, org_id=form.cleaned_data["org"])
        .select_related("org")
        .first()
    )
    if membership is None:
        raise Http404
    request.session[SESSION_KEY] = membership.org_id
    messages.info(request, f"Switched to {membership.org.name}.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = reverse("billing:overview")
    return redirect(target)


# --- Plans -----------------------------------------------------------------------------------


def _subscription(org) -> Subscription:
    return Subscription.objects.select_related("plan", "scheduled_plan", "current_period").get(org=org)


def _payment_methods_url() -> str | None:
    try:
        return reverse("billing:payment_methods")
    except NoReverseMatch:  # the Payment methods page is not installed
        return None


def _plan_cards(sub: Subscription) -> list[dict]:
    cards = []
    for plan in Plan.objects.all():
        if plan.pk == sub.plan_id:
            action = "current"
        elif plan.is_contract:
            action = "contact"
        elif sub.plan.is_contract:
            action = "none"  # a contract changes through sales
        elif sub.scheduled_plan_id == plan.pk:
            action = "scheduled"
        else:
            action = plan_change_kind(current=sub.plan, plan=plan)
        cards.append({"plan": plan, "action": action, "is_current": plan.pk == sub.plan_id})
    return cards


def _plans_context(request, *, cap_form=None, contact_form=None) -> dict:
    sub = _subscription(request.org)
    user = request.user
    return {
        "active_tab": "plans",
        "sub": sub,
        "period": sub.current_period,
        "cards": _plan_cards(sub),
        "has_overage": sub.overage_rate is not None,
        "cap_form": cap_form or OverageCapForm.for_cap(sub.overage_cap_cents),
        "contact_form": contact_form
        or ContactSalesForm(initial={"name": user.get_full_name(), "email": user.email}),
    }


def _back_to(request, default: str) -> str:
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return default


def _usd(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


def _day(value) -> str:
    return f"{value.day} {value:%b %Y}"


@billing_page(manage=True)
def plans(request):
    """The plan table with the current plan marked, the scheduled downgrade and the overage cap.
    POST `action=cap` saves the cap (htmx: the cap fragment); `action=cancel-downgrade`."""
    template = "billing/plans.html"
    if request.method != "POST":
        return render(request, template, _plans_context(request))
    action = request.POST.get("action")
    if action == "cancel-downgrade":
        cancelled = subscription_downgrade_cancel(org=request.org, actor=request.user)
        if cancelled is None:
            messages.info(request, "No downgrade was scheduled; your plan stays as it is.")
        else:
            messages.success(
                request, f"The downgrade to {cancelled.name} is cancelled: you stay on your current plan."
            )
        return redirect(_back_to(request, reverse("billing:plans")))
    if action != "cap":
        return HttpResponseBadRequest("Unknown action.")
    form = OverageCapForm(request.POST)
    saved = None
    if form.is_valid():
        try:
            sub = overage_cap_set(org=request.org, cap_cents=form.cleaned_data["cap"], actor=request.user)
        except BillingError as error:
            form.add_error("cap", error.message)
        else:
            cap = sub.overage_cap_cents
            saved = f"Saved: overage capped at {_usd(cap)} a month." if cap is not None else "Saved: no cap."
            if not request.htmx:
                messages.success(request, saved)
                return redirect("billing:plans")
            form = OverageCapForm.for_cap(cap)
    context = _plans_context(request, cap_form=form)
    context["cap_saved"] = saved
    if not context["has_overage"] and form.errors:  # no cap section to show the error in
        messages.error(request, " ".join(form.errors["cap"]))
    if request.htmx:
        template += "#cap"
    return render(request, template, context)


# Refusals after which the change may still complete (pending at the bank) or money was taken.
_CHANGE_MAY_HAVE_HAPPENED = ("PAYMENT_PENDING", "UPGRADE_NOT_APPLIED")


def _change_and_card(request, plan):
    """The preview of the change to `plan` and whether a card is needed and on file."""
    sub = _subscription(request.org)
    change = plan_change_preview(sub=sub, plan=plan, today=clock.today())
    has_card = payment_card_on_file(org=request.org) if change.is_upgrade else True
    return sub, change, has_card


def _plan_change_apply(request, plan, form) -> str:
    """Makes the change the page confirmed; returns what to tell the person."""
    if plan_change_kind(current=request.org.subscription.plan, plan=plan) == "upgrade":
        done = subscription_upgrade(
            org=request.org,
            plan_code=plan.code,
            actor=request.user,
            expected_charge_cents=form.cleaned_data["expected_charge_cents"],
        )
        text = f"You are now on {plan.name}. We charged {_usd(done.charge_cents)} to your card"
        if done.starts_new_period:
            return text + f"; your plan renews on day {done.today.day} of each month."
        return text + f"; this period's plan credits rose by {done.quota_increase:,}."
    done = subscription_downgrade_schedule(org=request.org, plan_code=plan.code, actor=request.user)
    return (
        f"Your plan changes to {plan.name} on {_day(done.effective_on)}. "
        f"Until then you keep {done.from_plan.name}'s credits and limits."
    )


@billing_page(manage=True)
def plan_change(request, code):
    """The confirmation of a change to plan `code`: an upgrade previews today's charge and the new
    quota and needs a card on file; a downgrade says when it takes effect. POST makes the change."""
    plan = Plan.objects.filter(code=code).first()
    if plan is None:
        raise Http404("No such plan.")
    try:
        sub, change, has_card = _change_and_card(request, plan)
    except BillingError as error:  # the same plan, Enterprise, or away from a contract
        messages.info(request, error.message)
        target = reverse("billing:plans")
        return redirect(target + "#contact-sales" if error.code == "CONTACT_SALES" else target)
    data = request.POST if request.method == "POST" else None
    form = PlanChangeForm(data, initial={"expected_charge_cents": change.charge_cents})
    if request.method == "POST" and form.is_valid():
        try:
            text = _plan_change_apply(request, plan, form)
        except BillingError as error:  # declined, no card, the charge changed: nothing changed
            message = error.message
            if "nothing" not in message.lower() and error.code not in _CHANGE_MAY_HAVE_HAPPENED:
                message += " Nothing was changed."
            messages.error(request, message)
            try:
                sub, change, has_card = _change_and_card(request, plan)
            except BillingError as again:
                messages.info(request, again.message)
                return redirect("billing:plans")
            form = PlanChangeForm(initial={"expected_charge_cents": change.charge_cents})
        else:
            messages.success(request, text)
            return redirect("billing:plans")
    context = {
        "active_tab": "plans",
        "sub": sub,
        "plan": plan,
        "change": change,
        "has_card": has_card,
        "payment_methods_url": _payment_methods_url(),
        "form": form,
    }
    return render(request, "billing/plan_change.html", context)


@billing_page(manage=True)
def contact_sales(request):
    """ "Contact sales" for Enterprise: records the enquiry for staff and e-mails them."""
    if request.method != "POST":
        return redirect(reverse("billing:plans") + "#contact-sales")
    form = ContactSalesForm(request.POST)
    if not form.is_valid():
        template = "billing/plans.html#contact" if request.htmx else "billing/plans.html"
        return render(request, template, _plans_context(request, contact_form=form))
    data = form.cleaned_data
    contact_request_create(
        org=request.org,
        user=request.user,
        name=data["name"],
        email=data["email"],
        company_size=data["company_size"],
        message=data["message"],
    )
    thanks = f"Thank you: sales will reply to {data['email']} within one business day."
    if not request.htmx:
        messages.success(request, thanks)
        return redirect("billing:plans")
    context = _plans_context(request)
    context["contact_sent"] = thanks
    return render(request, "billing/plans.html#contact", context)


# --- API keys (Settings → API keys) ------------------------------------------------------------


@billing_page(manage=True)
def api_keys(request):
    """The organisation's keys and a form to create one. A new key's secret is shown once, in the
    response to the POST that created it: never stored in plain text, in the session or in a
    message, and that response is marked not to be cached."""
    new_key = secret = None
    if request.method == "POST":
        form = ApiKeyCreateForm(request.POST)
        if form.is_valid():
            new_key, secret = account_services.api_key_create(
                org=request.org, name=form.cleaned_data["name"], created_by=request.user
            )
            form = ApiKeyCreateForm()
    else:
        form = ApiKeyCreateForm()
    context = {
        "active_tab": "api_keys",
        "form": form,
        "keys": ApiKey.objects.filter(org=request.org).select_related("created_by"),
        "new_key": new_key,
        "secret": secret,
    }
    response = render(request, "billing/api_keys.html", context)
    if secret:
        patch_cache_control(response, no_store=True, private=True)
    return response


@billing_page(manage=True)
def api_key_revoke(request, key_id: int):
    """GET asks once, in words; POST revokes. Another organisation's key is 404."""
    key = get_object_or_404(ApiKey, org=request.org, pk=key_id)
    if request.method == "POST":
        was_active = key.is_active
        key = account_services.api_key_revoke(org_id=request.org.pk, key_id=key.pk)
        if was_active:
            messages.success(
                request, f"Key “{key.name}” ({key.prefix}…) revoked: requests using it now get 401."
            )
        else:
            messages.info(request, f"Key “{key.name}” ({key.prefix}…) was already revoked.")
        return redirect("billing:api_keys")
    return render(request, "billing/api_key_revoke.html", {"active_tab": "api_keys", "key": key})
