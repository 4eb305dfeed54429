"""Staff screens for the operations catalog and, read-only, the credit ledger, jobs and usage.

Balances are never edited here (no add, change or delete on any credit model): staff grant or
remove credits with the actions on Organisations, which call the services.
"""

import uuid

from django.contrib import admin

from accounts.admin import ReadOnlyAdminMixin
from usage.models import CreditAccount, CreditLot, Job, LedgerEntry, Operation, UsageEvent, UsageRollup


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
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
