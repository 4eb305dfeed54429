"""Sign-up, the organisation switcher (sign-in, sign-out and password reset are Django's views)."""

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts.access import SESSION_KEY, billing_page
from accounts.forms import OrgSwitchForm, SignupForm
from accounts.models import Membership
from accounts.services import organisation_create


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


@billing_page(manage=True)
def plans(request):
    """The plan table (built in the Plans work)."""
    return render(request, "billing/plans.html", {"active_tab": "plans"})
