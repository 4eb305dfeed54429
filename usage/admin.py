"""Staff screens for the operations catalog and, read-only, the credit ledger, jobs and usage.

Balances are never edited here (no add, change or delete on any credit model): staff grant or
remove credits with the actions on Organisations, which call the services.
"""

import uuid

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse

from billing_site.admin_mixins import AuditHistoryMixin, ReadOnlyAdminMixin
from billing_site.errors import BillingError
from usage import credits
from usage.models import (
    Commitment,
    CommitmentPeriod,
    CreditAccount,
    CreditLot,
    CreditPack,
    CreditPurchase,
    Job,
    LedgerEntry,
    Operation,
    RechargeSetting,
    UsageEvent,
    UsageRollup,
)


@admin.register(Operation)
class OperationAdmin(AuditHistoryMixin, admin.ModelAdmin):
    list_display = ("product", "mode", "credits_per_unit", "unit")
    list_editable = ("credits_per_unit",)
    list_filter = ("product", "unit")
    search_fields = ("product", "mode")
    ordering = ("product", "mode")


class BigTableMixin(ReadOnlyAdminMixin):
    """Tables that grow with traffic: no full count on every page, filter by organisation via
    ?org__id__exact= (the links on an organisation's page) rather than a list of every one."""

    show_full_result_count = False
    list_per_page = 100


@admin.register(CreditAccount)
class CreditAccountAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("org", "balance", "overage_held", "running_jobs")
    list_select_related = ("org",)
    search_fields = ("org__name",)
    ordering = ("org__name",)


class LotStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return (("spendable", "Has credits left"), ("spent", "Spent"), ("expired", "Expired"))

    def queryset(self, request, queryset):
        if self.value() == "spendable":
            return queryset.filter(remaining__gt=0)
        if self.value() == "spent":
            return queryset.filter(remaining=0, expired_at__isnull=True)
        if self.value() == "expired":
            return queryset.filter(expired_at__isnull=False)
        return queryset


@admin.register(CreditLot)
class CreditLotAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = (
        "org",
        "bucket",
        "source",
        "granted",
        "remaining",
        "expires_at",
        "expired_at",
        "created_at",
    )
    list_filter = ("bucket", LotStateFilter)
    list_select_related = ("org",)
    search_fields = ("org__name", "=source")
    ordering = ("-id",)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = ("created_at", "org", "kind", "signed_credits", "bucket", "reason", "created_by")
    list_filter = ("kind", "created_at")
    list_select_related = ("org", "lot", "created_by")
    search_fields = ("org__name", "reason", "created_by__email")
    ordering = ("-id",)

    @admin.display(description="credits", ordering="credits")
    def signed_credits(self, obj):
        return f"{obj.credits:+,}"

    @admin.display(description="bucket", ordering="lot__bucket")
    def bucket(self, obj):
        return obj.lot.get_bucket_display() if obj.lot_id else "overage"


@admin.register(Job)
class JobAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "org",
        "product",
        "mode",
        "ocr",
        "pages",
        "status",
        "credits_reserved",
        "credits_charged",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "product", "mode", "created_at")
    list_select_related = ("org",)
    search_fields = ("org__name", "=idempotency_key")
    search_help_text = "Organisation name, an Idempotency-Key or a job id."
    ordering = ("-created_at",)

    def get_search_results(self, request, queryset, search_term):
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        try:
            job_id = uuid.UUID(search_term.strip())
        except ValueError:
            return results, may_have_duplicates
        return results | queryset.filter(pk=job_id), may_have_duplicates


@admin.register(UsageEvent)
class UsageEventAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = ("event_id", "org", "product", "mode", "units", "credits", "timestamp", "charged_on")
    list_filter = ("product", "mode", "charged_on")
    list_select_related = ("org",)
    search_fields = ("=event_id", "org__name")
    ordering = ("-id",)


@admin.register(UsageRollup)
class UsageRollupAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = ("day", "org", "product", "mode", "credits", "units")
    list_filter = ("product", "mode", "day")
    list_select_related = ("org",)
    search_fields = ("org__name",)
    ordering = ("-day", "org__name", "product", "mode")


# --- prepaid credits: packs, purchases, recharge settings, commitment tiers --------------------


@admin.register(CreditPack)
class CreditPackAdmin(AuditHistoryMixin, admin.ModelAdmin):
    """The packs on the Credits tab. A pack that was ever bought cannot be deleted (untick
    Active to withdraw it); a price or credits change applies to purchases from now on."""

    list_display = ("__str__", "price_cents", "credits", "extra", "active", "sort_order")
    list_editable = ("active", "sort_order")
    ordering = ("sort_order", "price_cents")

    @admin.display(description="more credits than $1.25 per 1,000")
    def extra(self, obj):
        return f"{obj.extra_percent}%"


@admin.register(CreditPurchase)
class CreditPurchaseAdmin(AuditHistoryMixin, BigTableMixin, admin.ModelAdmin):
    """Every purchase and recharge, with its outcome; staff refund unused ones (any age)."""

    list_display = (
        "created_at",
        "org",
        "kind",
        "status",
        "credits",
        "bonus_credits",
        "amount",
        "tier",
        "invoice",
        "refunded_at",
    )
    list_filter = ("kind", "status", "tier", "created_at")
    list_select_related = ("org", "invoice")
    search_fields = ("org__name", "=invoice__number", "=key")
    ordering = ("-created_at", "-id")
    actions = ["refund_purchases"]

    @admin.display(description="amount", ordering="amount_cents")
    def amount(self, obj):
        return f"${obj.amount_cents // 100:,}.{obj.amount_cents % 100:02d}"

    def has_refund_permission(self, request):
        return (
            request.user.is_active
            and request.user.is_staff
            and request.user.has_perm("usage.view_creditpurchase")
        )

    @admin.action(description="Refund the selected purchases (unused credits only)", permissions=["refund"])
    def refund_purchases(self, request, queryset):
        purchases = list(queryset.select_related("org", "invoice", "lot", "bonus_lot"))
        if request.POST.get("confirm") != "yes":
            for purchase in purchases:
                purchase.refusal = credits.refund_refusal(purchase, staff=True)
            context = {
                **self.admin_site.each_context(request),
                "title": "Refund purchases",
                "opts": self.model._meta,
                "purchases": purchases,
                "action": "refund_purchases",
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/usage/creditpurchase/refund_confirmation.html", context)
        for purchase in purchases:
            try:
                done = credits.purchase_refund(
                    org=purchase.org, purchase_id=purchase.pk, actor=request.user, staff=True
                )
            except BillingError as error:
                level = messages.WARNING if error.code == "REFUND_PENDING" else messages.ERROR
                self.message_user(
                    request, f"Purchase #{purchase.pk} ({purchase.org}): {error.message}", level
                )
            else:
                self.message_user(
                    request,
                    f"Refunded purchase #{done.pk} of {purchase.org}: {done.refund_removed_credits:,} credits and "
                    f"{done.refund_removed_bonus:,} bonus credits removed; invoice {purchase.invoice.number} is Refunded.",
                    messages.SUCCESS,
                )
        return None


@admin.register(RechargeSetting)
class RechargeSettingAdmin(AuditHistoryMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "org",
        "kind",
        "enabled",
        "threshold",
        "pack",
        "amount_dollars",
        "frequency",
        "billing_day",
        "monthly_cap_cents",
        "failures",
        "next_try_at",
        "last_problem",
    )
    list_filter = ("kind", "enabled")
    list_select_related = ("org", "pack")
    search_fields = ("org__name",)


@admin.register(CommitmentPeriod)
class CommitmentPeriodAdmin(BigTableMixin, admin.ModelAdmin):
    list_display = ("org", "term", "start", "end", "purchased_cents", "tier", "closed_at")
    list_filter = ("term", "tier")
    list_select_related = ("org",)
    search_fields = ("org__name",)
    ordering = ("-start",)


class CommitmentForm(forms.ModelForm):
    class Meta:
        model = Commitment
        fields = ("org", "term", "override_tier", "override_reason")
        labels = {"override_tier": "Tier override"}
        help_texts = {
            "override_tier": "Empty: the tier follows purchases automatically. Set: this tier's bonus and RPM apply.",
            "override_reason": "Required whenever the override changes (e.g. the contract it comes from).",
        }

    def clean(self):
        data = super().clean()
        changed = {"override_tier", "override_reason"} & set(self.changed_data)
        if changed and not (data.get("override_reason") or "").strip():
            self.add_error("override_reason", "Give a reason for the tier override.")
        return data


@admin.register(Commitment)
class CommitmentAdmin(AuditHistoryMixin, admin.ModelAdmin):
    """An organisation's commitment term and tier. The tier is automatic; staff may override it,
    with a reason (recorded with who and when)."""

    form = CommitmentForm
    list_display = ("org", "term", "tier", "override_tier", "override_reason", "override_by", "override_at")
    list_filter = ("term", "tier", "override_tier")
    list_select_related = ("org", "override_by")
    search_fields = ("org__name",)
    raw_id_fields = ("org",)
    readonly_fields = ("tier", "override_by", "override_at", "updated_at")

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields + (("org",) if obj is not None else ())

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if "term" in form.changed_data or not change:
            credits.commitment_term_set(org_id=obj.org_id, term=obj.term, actor=request.user)
        if {"override_tier", "override_reason"} & set(form.changed_data):
            credits.commitment_override(
                org_id=obj.org_id, tier=obj.override_tier, reason=obj.override_reason, actor=request.user
            )
        obj.refresh_from_db()
