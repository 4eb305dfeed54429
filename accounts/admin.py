"""Staff screens for people, organisations, the plan catalog, subscriptions, periods and API keys.

Credits are never edited here: the Grant credits and Remove credits actions call the usage
services, which write a lot and ledger entries under the organisation's lock.
"""

from dataclasses import dataclass
from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm
from django.contrib.auth.forms import UserChangeForm as DjangoUserChangeForm
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpResponseRedirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from accounts.models import (
    ApiKey,
    BillingPeriod,
    ContactRequest,
    Membership,
    Organisation,
    Plan,
    Role,
    Subscription,
    User,
)
from accounts.services import api_key_revoke
from billing_site.admin_mixins import AuditHistoryMixin, ReadOnlyAdminMixin
from billing_site.errors import BillingError
from usage.forms import CreditsAdjustmentForm, CreditsGrantForm, CreditsRemoveForm
from usage.models import CreditLot, LedgerEntry
from usage.selectors import balance_for
from usage.services import credits_remove, lot_grant

LATEST_LEDGER_ENTRIES = 50


def usd(cents: int | None) -> str:
    """Cents for people: 123456 -> "$1,234.56"."""
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


def _rate(rate: Decimal) -> str:
    """A per-1,000 rate with at least two decimals and no trailing zeros beyond: "$1.25"."""
    whole, _, fraction = f"{rate.normalize():f}".partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


# --- people ----------------------------------------------------------------------------------


def _normalised_email(form, exclude_pk=None) -> str:
    email = User.objects.normalize_email(form.cleaned_data["email"]).lower()
    others = User.objects.filter(email__iexact=email)
    if exclude_pk is not None:
        others = others.exclude(pk=exclude_pk)
    if others.exists():
        raise ValidationError("A user with this e-mail address already exists.")
    return email


class UserCreationForm(AdminUserCreationForm):
    """E-mail instead of a username; the address is stored lower-case, as the manager does."""

    class Meta(AdminUserCreationForm.Meta):
        model = User
        fields = ("email",)
        field_classes = {}

    def clean_email(self):
        return _normalised_email(self)


class UserChangeForm(DjangoUserChangeForm):
    class Meta(DjangoUserChangeForm.Meta):
        model = User
        fields = "__all__"
        field_classes = {}

    def clean_email(self):
        return _normalised_email(self, exclude_pk=self.instance.pk)


@admin.register(User)
class UserAdmin(AuditHistoryMixin, DjangoUserAdmin):
    form = UserChangeForm
    add_form = UserCreationForm
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name")}),
        ("Organisations", {"fields": ("organisations",)}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("email", "usable_password", "password1", "password2")}),
    )
    readonly_fields = ("organisations", "last_login", "date_joined")
    list_display = ("email", "first_name", "last_name", "is_staff", "is_active", "date_joined", "last_login")
    search_fields = ("email", "first_name", "last_name")
    ordering = ("email",)

    @admin.display(description="Member of")
    def organisations(self, obj):
        memberships = obj.memberships.select_related("org").order_by("org__name")
        if not memberships:
            return "No organisation."
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "",
                '<li><a href="{}">{}</a> ({})</li>',
                (
                    (
                        reverse("admin:accounts_organisation_change", args=[m.org_id]),
                        m.org,
                        m.get_role_display(),
                    )
                    for m in memberships
                ),
            ),
        )


# --- the catalog -----------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(AuditHistoryMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "code",
        "price",
        "monthly_credits",
        "overage_rate",
        "rpm",
        "concurrent_jobs",
        "support",
        "is_contract",
        "sort_order",
    )
    list_editable = ("sort_order",)
    ordering = ("sort_order", "price_cents")
    search_fields = ("code", "name")

    def get_readonly_fields(self, request, obj=None):
        # The code is in URLs and scripts (create_org --plan); it is set once.
        return ("code",) if obj else ()

    @admin.display(description="price / month", ordering="price_cents")
    def price(self, obj):
        return "contract" if obj.is_contract else usd(obj.price_cents)


# --- organisations ---------------------------------------------------------------------------


class MembershipFormSet(BaseInlineFormSet):
    def clean(self):
        super().clean()
        owners = 0
        for form in self.forms:
            if not hasattr(form, "cleaned_data") or not form.cleaned_data:
                continue
            if self.can_delete and self._should_delete_form(form):
                continue
            if form.cleaned_data.get("role") == Role.OWNER:
                owners += 1
        if owners == 0:
            raise ValidationError("An organisation needs at least one owner.")


class MembershipInline(admin.TabularInline):
    model = Membership
    formset = MembershipFormSet
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    autocomplete_fields = ("user",)
    extra = 0
    ordering = ("created_at",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user")


class ApiKeyInline(ReadOnlyAdminMixin, admin.TabularInline):
    """Name, prefix and dates only: never the hash. Revoke from the API keys list."""

    model = ApiKey
    fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    show_change_link = True
    ordering = ("-created_at",)


class LatestEntriesFormSet(BaseInlineFormSet):
    """The organisation's newest ledger entries only (the formset filters before it can slice)."""

    def get_queryset(self):
        if not hasattr(self, "_latest"):
            self._latest = super().get_queryset()[:LATEST_LEDGER_ENTRIES]
        return self._latest


class LedgerEntryInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = LedgerEntry
    formset = LatestEntriesFormSet
    fields = ("created_at", "kind", "change", "bucket", "reason", "created_by", "job_link")
    readonly_fields = fields
    ordering = ("-id",)
    extra = 0
    verbose_name_plural = f"latest ledger entries (newest first, at most {LATEST_LEDGER_ENTRIES})"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("lot", "created_by")

    @admin.display(description="credits")
    def change(self, obj):
        return f"{obj.credits:+,}"

    @admin.display(description="bucket")
    def bucket(self, obj):
        return obj.lot.get_bucket_display() if obj.lot_id else "overage"

    @admin.display(description="job")
    def job_link(self, obj):
        if obj.job_id is None:
            return "-"
        url = reverse("admin:usage_job_change", args=[obj.job_id])
        return format_html('<a href="{}" title="{}">{}…</a>', url, obj.job_id, str(obj.job_id)[:8])


@dataclass(frozen=True)
class _CreditsAction:
    form: type[CreditsAdjustmentForm]
    title: str
    intro: str
    submit: str


_CREDITS_ACTIONS = {
    "grant": _CreditsAction(
        CreditsGrantForm,
        "Grant credits",
        "Each organisation below gets a new lot of these credits, recorded in its ledger with the "
        "reason and your name.",
        "Grant credits",
    ),
    "remove": _CreditsAction(
        CreditsRemoveForm,
        "Remove credits",
        "These credits are taken from each organisation's lots in spending order (plan, bonus, "
        "purchased) and recorded in its ledger with the reason and your name. An organisation "
        "cannot lose more than its balance.",
        "Remove credits",
    ),
}


def _subscription(org: Organisation) -> Subscription | None:
    try:
        return org.subscription
    except Subscription.DoesNotExist:
        return None


def _balance(org: Organisation) -> int | None:
    try:
        return org.credit_account.balance
    except Organisation.credit_account.RelatedObjectDoesNotExist:
        return None


@admin.register(Organisation)
class OrganisationAdmin(AuditHistoryMixin, admin.ModelAdmin):
    list_display = ("name", "plan", "balance", "created_at")
    list_filter = ("subscription__plan",)
    search_fields = ("name", "memberships__user__email", "api_keys__prefix")
    search_help_text = "Organisation name, a member's e-mail address or an API key prefix (sk_…)."
    ordering = ("name",)
    actions = ("grant_credits", "remove_credits")
    fieldsets = (
        (None, {"fields": ("name", "created_at", "stripe_customer_id")}),
        ("Subscription", {"fields": ("subscription_figures",)}),
        ("Credits", {"fields": ("balance_by_bucket", "records")}),
    )
    readonly_fields = (
        "created_at",
        "stripe_customer_id",
        "subscription_figures",
        "balance_by_bucket",
        "records",
    )
    inlines = (MembershipInline, ApiKeyInline, LedgerEntryInline)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("subscription__plan", "credit_account")

    # Organisations are made with their owner, subscription, credits and first key by a service
    # (create_org, signup); deleting one would take its ledger with it.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_adjust_credits_permission(self, request):
        """Granting or removing credits writes ledger entries (through the services)."""
        return request.user.has_perm("usage.add_ledgerentry")

    # -- list columns

    @admin.display(description="plan", ordering="subscription__plan__sort_order")
    def plan(self, obj):
        sub = _subscription(obj)
        return sub.plan.name if sub else "—"

    @admin.display(description="balance (credits)", ordering="credit_account__balance")
    def balance(self, obj):
        balance = _balance(obj)
        return "—" if balance is None else f"{balance:,}"

    # -- change page

    @admin.display(description="Key figures")
    def subscription_figures(self, obj):
        sub = _subscription(obj)
        if sub is None:
            return "No subscription."
        rate = sub.overage_rate
        return render_to_string(
            "admin/accounts/organisation/subscription_figures.html",
            {
                "sub": sub,
                "period": sub.current_period,
                "price": usd(sub.price_cents),
                "overage_rate": None if rate is None else _rate(rate),
                "overage_cap": usd(sub.overage_cap_cents) if sub.overage_cap_cents is not None else None,
                "change_url": reverse("admin:accounts_subscription_change", args=[sub.pk]),
            },
        )

    @admin.display(description="Balance by bucket")
    def balance_by_bucket(self, obj):
        sub = _subscription(obj)
        if sub is None or sub.current_period_id is None or _balance(obj) is None:
            return "No credit account or open period."
        return render_to_string(
            "admin/accounts/organisation/balance_by_bucket.html",
            {"balance": balance_for(sub=sub)},
        )

    @admin.display(description="Records")
    def records(self, obj):
        links = [
            ("usage", "ledgerentry", "All ledger entries"),
            ("usage", "creditlot", "Credit lots"),
            ("usage", "job", "Jobs"),
            ("usage", "usageevent", "Usage events"),
            ("usage", "usagerollup", "Daily usage"),
            ("accounts", "billingperiod", "Billing periods"),
        ]
        return format_html_join(
            " · ",
            '<a href="{}?org__id__exact={}">{}</a>',
            ((reverse(f"admin:{app}_{model}_changelist"), obj.pk, label) for app, model, label in links),
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "can_adjust_credits": self.has_adjust_credits_permission(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    # -- granting and removing credits

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        urls = [
            path(
                f"<path:object_id>/credits/{kind}/",
                self.admin_site.admin_view(self.credits_view),
                {"kind": kind},
                name="{}_{}_credits_{}".format(*info, kind),
            )
            for kind in _CREDITS_ACTIONS
        ]
        return urls + super().get_urls()

    @admin.action(description="Grant credits to the selected organisations", permissions=["adjust_credits"])
    def grant_credits(self, request, queryset):
        return self._credits_page(request, list(queryset.order_by("pk")), "grant", action="grant_credits")

    @admin.action(
        description="Remove credits from the selected organisations", permissions=["adjust_credits"]
    )
    def remove_credits(self, request, queryset):
        return self._credits_page(request, list(queryset.order_by("pk")), "remove", action="remove_credits")

    def credits_view(self, request, object_id, kind):
        """The same form for one organisation, from the buttons on its page."""
        if not self.has_adjust_credits_permission(request):
            raise PermissionDenied
        org = self.get_object(request, unquote(object_id))
        if org is None:
            raise Http404("No such organisation.")
        response = self._credits_page(request, [org], kind, action=None)
        if response is None:
            return HttpResponseRedirect(reverse("admin:accounts_organisation_change", args=[org.pk]))
        return response

    def _credits_page(self, request, orgs, kind, *, action):
        """Shows the form; on a valid submission applies it and returns None (the caller redirects)."""
        spec = _CREDITS_ACTIONS[kind]
        submitted = request.method == "POST" and request.POST.get("apply") == "yes"
        form = spec.form(request.POST if submitted else None)
        if submitted and form.is_valid() and self._credits_apply(request, orgs, kind, form):
            return None
        request.current_app = self.admin_site.name
        context = {
            **self.admin_site.each_context(request),
            "title": spec.title,
            "intro": spec.intro,
            "submit_label": spec.submit,
            "opts": self.opts,
            "orgs": [(org, _balance(org)) for org in orgs],
            "original": orgs[0] if action is None else None,
            "form": form,
            "media": self.media + form.media,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/accounts/organisation/credits_form.html", context)

    def _credits_apply(self, request, orgs, kind, form) -> bool:
        """All or nothing: a refusal for any organisation changes none of them."""
        data = form.cleaned_data
        credits, reason = data["credits"], data["reason"]
        done, repeated = [], []
        org = None
        try:
            with transaction.atomic():
                for org in orgs:
                    if kind == "grant":
                        bucket = form.bucket_value
                        if CreditLot.objects.filter(org_id=org.pk, source=form.source).exists():
                            repeated.append(org)  # the same form submitted again
                            continue
                        lot_grant(
                            org_id=org.pk,
                            bucket=bucket,
                            credits=credits,
                            source=form.source,
                            expires_at=data["expires_at"] if data["bucket"] == "bonus" else None,
                            reason=reason,
                            actor=request.user,
                        )
                        note = f"Granted {credits:,} {data['bucket']} credits: {reason}"
                    else:
                        credits_remove(org_id=org.pk, credits=credits, reason=reason, actor=request.user)
                        note = f"Removed {credits:,} credits: {reason}"
                    self.log_change(request, org, note)
                    done.append(org)
        except BillingError as exc:
            self.message_user(request, f"{org}: {exc.message} Nothing was changed.", messages.ERROR)
            return False
        if done:
            who = str(done[0]) if len(done) == 1 else f"{len(done)} organisations"
            if kind == "grant":
                text = f"Granted {credits:,} {data['bucket']} credits to {who}."
            else:
                text = f"Removed {credits:,} credits from {who}."
            self.message_user(request, text, messages.SUCCESS)
        if repeated:
            names = ", ".join(str(o) for o in repeated)
            self.message_user(
                request, f"This grant was already made to {names}; nothing more was added.", messages.WARNING
            )
        return True


# --- subscriptions, periods and keys ---------------------------------------------------------


class SubscriptionForm(forms.ModelForm):
    class Meta:
        model = Subscription
        fields = (
            "monthly_credits_override",
            "rpm_override",
            "concurrent_jobs_override",
            "price_cents_override",
            "overage_enabled",
            "overage_cap_cents",
        )
        labels = {"rpm_override": "RPM override"}
        help_texts = {
            "monthly_credits_override": "Empty: the plan's. Takes effect when the next period opens.",
            "rpm_override": "Requests per minute. Empty: the plan's.",
            "concurrent_jobs_override": "Empty: the plan's.",
            "price_cents_override": "Monthly fee in cents. Empty: the plan's.",
            "overage_cap_cents": "Monthly overage cap in cents. Empty: no cap.",
        }


@admin.register(Subscription)
class SubscriptionAdmin(AuditHistoryMixin, admin.ModelAdmin):
    form = SubscriptionForm
    list_display = (
        "org",
        "plan",
        "current_period",
        "monthly_credits",
        "rpm",
        "concurrent_jobs",
        "overage_enabled",
        "overage_cap",
    )
    list_filter = ("plan", "overage_enabled")
    list_select_related = ("org", "plan", "current_period")
    search_fields = ("org__name",)
    fieldsets = (
        (None, {"fields": ("org", "plan", "current_period", "anchor_day", "created_at")}),
        (
            "Overrides (an Enterprise contract sets these)",
            {
                "fields": (
                    "monthly_credits_override",
                    "rpm_override",
                    "concurrent_jobs_override",
                    "price_cents_override",
                )
            },
        ),
        ("Overage", {"fields": ("overage_enabled", "overage_cap_cents")}),
    )
    # Plan changes go through a service (proration, invoices), not this form.
    readonly_fields = ("org", "plan", "current_period", "anchor_day", "created_at")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        # At least 1, as create_org checks: a zero here would stop the organisation entirely.
        if db_field.name in ("monthly_credits_override", "rpm_override", "concurrent_jobs_override"):
            kwargs["min_value"] = 1
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="overage cap", ordering="overage_cap_cents")
    def overage_cap(self, obj):
        return usd(obj.overage_cap_cents) if obj.overage_cap_cents is not None else "none"


@admin.register(BillingPeriod)
class BillingPeriodAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "org",
        "plan",
        "start",
        "end",
        "monthly_credits",
        "credits_used",
        "overage_credits",
        "closed_at",
    )
    list_filter = ("plan", ("closed_at", admin.EmptyFieldListFilter), "start")
    list_select_related = ("org", "plan")
    search_fields = ("org__name",)
    ordering = ("-start", "-id")


class ApiKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return (("active", "Active"), ("revoked", "Revoked"))

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(AuditHistoryMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Never shows the hash. Keys are created by their organisation; staff may only revoke."""

    list_display = ("prefix", "name", "org", "active", "created_at", "last_used_at", "revoked_at")
    list_filter = (ApiKeyStatusFilter,)
    list_select_related = ("org",)
    search_fields = ("prefix", "name", "org__name")
    fields = ("name", "prefix", "org", "created_by", "created_at", "last_used_at", "revoked_at")
    exclude = ("key_hash",)
    actions = ("revoke",)

    @admin.display(description="active", boolean=True)
    def active(self, obj):
        return obj.is_active

    def has_revoke_permission(self, request):
        return request.user.has_perm("accounts.change_apikey")

    @admin.action(description="Revoke the selected API keys", permissions=["revoke"])
    def revoke(self, request, queryset):
        keys = list(queryset.select_related("org").order_by("pk"))
        if request.POST.get("post") != "yes":
            request.current_app = self.admin_site.name
            context = {
                **self.admin_site.each_context(request),
                "title": "Revoke API keys",
                "opts": self.opts,
                "keys": keys,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "media": self.media,
            }
            return TemplateResponse(request, "admin/accounts/apikey/revoke_confirmation.html", context)
        revoked = 0
        for key in keys:
            if not key.is_active:
                continue
            try:
                api_key_revoke(org_id=key.org_id, key_id=key.pk)
            except BillingError as exc:
                self.message_user(request, f"{key}: {exc.message}", messages.ERROR)
                continue
            self.log_change(request, key, "Revoked")
            revoked += 1
        self.message_user(
            request, f"Revoked {revoked} API key{'s' if revoked != 1 else ''}.", messages.SUCCESS
        )
        return None


# --- "Contact sales" enquiries (the Plans page) ----------------------------------------------


@admin.register(ContactRequest)
class ContactRequestAdmin(AuditHistoryMixin, admin.ModelAdmin):
    """Enterprise enquiries from the Plans page: staff read them and tick "handled"."""

    list_display = ("created_at", "name", "email", "org", "company_size", "handled")
    list_filter = ("handled", "company_size")
    list_editable = ("handled",)
    list_select_related = ("org", "user")
    search_fields = ("name", "email", "org__name", "message")
    date_hierarchy = "created_at"
    fields = ("created_at", "org", "user", "name", "email", "company_size", "message", "handled")
    readonly_fields = ("created_at", "org", "user", "name", "email", "company_size", "message")

    def has_add_permission(self, request):
        return False
