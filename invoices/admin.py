"""Staff screens for invoices, payments, cards and Stripe webhooks.

Drafts are edited here (their lines too); issuing freezes an invoice, after which it and its lines
are read-only. Issue, void and mark paid are actions that call the services, so numbering, locks
and the rules for each status are the same as everywhere else. Payments, cards and webhook events
are read-only records.
"""

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse
from django.utils.html import format_html

from billing_site.admin_mixins import AuditHistoryMixin, ReadOnlyAdminMixin
from billing_site.errors import BillingError
from invoices import services
from invoices.forms import StaffReasonForm
from invoices.models import (
    Invoice,
    InvoiceLine,
    InvoiceNumberSequence,
    PaymentAttempt,
    PaymentMethod,
    StripeWebhookEvent,
)


def usd(cents: int | None) -> str:
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


class InvoiceLineForm(forms.ModelForm):
    class Meta:
        model = InvoiceLine
        fields = ("position", "description", "quantity", "unit_cents", "unit_rate")
        labels = {"unit_cents": "Unit price (cents)", "unit_rate": "Rate ($ per 1,000)"}

    def clean(self):
        data = super().clean()
        has_cents = data.get("unit_cents") is not None
        has_rate = data.get("unit_rate") is not None
        if has_cents == has_rate:
            raise forms.ValidationError("Give either a unit price in cents or a rate per 1,000, not both.")
        if (data.get("quantity") or 0) < 1:
            self.add_error("quantity", "The quantity is a whole number from 1 up.")
        return data


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    form = InvoiceLineForm
    extra = 0
    fields = ("position", "description", "quantity", "unit_cents", "unit_rate", "amount")
    readonly_fields = ("amount",)

    @admin.display(description="amount")
    def amount(self, obj):
        return usd(obj.amount_cents) if obj.pk else "—"

    def _editable(self, obj):
        return obj is None or obj.is_draft

    def has_add_permission(self, request, obj=None):
        return self._editable(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request, obj=None):
        return self._editable(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._editable(obj) and super().has_delete_permission(request, obj)


class PaymentAttemptInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = PaymentAttempt
    extra = 0
    fields = (
        "number",
        "status",
        "amount",
        "payment_method",
        "stripe_payment_intent_id",
        "error_message",
        "created_at",
        "finished_at",
    )
    readonly_fields = fields

    @admin.display(description="amount")
    def amount(self, obj):
        return usd(obj.amount_cents)


@admin.register(Invoice)
class InvoiceAdmin(AuditHistoryMixin, admin.ModelAdmin):
    list_display = ("label", "org", "kind", "status_word", "total", "issued_at", "paid_at", "created_at")
    list_filter = ("status", "kind")
    list_select_related = ("org",)
    search_fields = ("number", "org__name", "description")
    search_help_text = "Invoice number, organisation name or description."
    date_hierarchy = "created_at"
    inlines = (InvoiceLineInline, PaymentAttemptInline)
    actions = ("issue", "void", "mark_paid")
    draft_fields = ("org", "kind", "description", "period_start", "period_end", "billing_period")
    figures = ("number", "status", "subtotal", "tax_rate", "tax", "total", "currency")
    dates = ("created_at", "issued_at", "paid_at", "voided_at", "refunded_at")
    fieldsets = (
        (None, {"fields": draft_fields}),
        ("Figures", {"fields": figures}),
        ("Dates", {"fields": dates}),
        ("Staff", {"fields": ("staff_note", "fulfilment")}),
    )

    @admin.display(description="invoice", ordering="number")
    def label(self, obj):
        return str(obj)

    @admin.display(description="status", ordering="status")
    def status_word(self, obj):
        return obj.get_status_display()

    @admin.display(description="subtotal")
    def subtotal(self, obj):
        return usd(obj.subtotal_cents)

    @admin.display(description="tax")
    def tax(self, obj):
        return usd(obj.tax_cents)

    @admin.display(description="total", ordering="total_cents")
    def total(self, obj):
        return usd(obj.total_cents)

    def get_readonly_fields(self, request, obj=None):
        fixed = ("subtotal", "tax", "total", "number", "status", "tax_rate", "currency", *self.dates)
        fixed += ("staff_note", "fulfilment")
        if obj is not None and obj.is_frozen:
            return (*self.draft_fields, *fixed)
        return fixed

    def has_change_permission(self, request, obj=None):
        if obj is not None and obj.is_frozen:
            return False  # issued: frozen; the actions still issue, void and mark paid
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False  # financial records: void instead

    def save_formset(self, request, form, formset, change):
        lines = formset.save(commit=False)
        for line in lines:
            line.amount_cents = services.line_amount_cents(
                quantity=line.quantity, unit_cents=line.unit_cents, unit_rate=line.unit_rate
            )
            line.save()
        for line in formset.deleted_objects:
            line.delete()
        formset.save_m2m()

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        if form.instance.is_draft:
            services.invoice_totals_refresh(invoice=form.instance)

    # --- actions -------------------------------------------------------------------------------

    @admin.action(description="Issue the selected drafts (assigns their numbers)")
    def issue(self, request, queryset):
        done = 0
        for invoice in queryset.order_by("pk"):
            try:
                services.invoice_issue(invoice=invoice)
            except BillingError as e:
                self.message_user(request, f"{invoice}: {e.message}", messages.ERROR)
                continue
            self.log_change(request, invoice, "Issued")
            done += 1
        if done:
            self.message_user(request, f"Issued {done} invoice{'s' if done != 1 else ''}.", messages.SUCCESS)

    @admin.action(description="Void the selected invoices…")
    def void(self, request, queryset):
        return self._with_reason(
            request,
            queryset,
            action="void",
            title="Void invoices",
            intro="Voided invoices are owed no more. A draft is voided without a number; an issued "
            "invoice keeps its number and shows as Void to the customer. Paid invoices cannot be voided "
            "(refund them instead).",
            submit="Void invoices",
            apply=lambda invoice, reason: services.invoice_void(
                invoice=invoice, reason=reason, actor=request.user
            ),
            verb="Voided",
        )

    @admin.action(description="Mark the selected invoices paid…")
    def mark_paid(self, request, queryset):
        return self._with_reason(
            request,
            queryset,
            action="mark_paid",
            title="Mark invoices paid",
            intro="For payments received outside Stripe (a bank transfer, a cheque). A draft is issued "
            "first. Nothing is granted: credits and upgrades come only with a card payment.",
            submit="Mark paid",
            apply=lambda invoice, reason: services.invoice_mark_paid(
                invoice=invoice, reason=reason, actor=request.user
            ),
            verb="Marked paid",
        )

    def _with_reason(self, request, queryset, *, action, title, intro, submit, apply, verb):
        invoices = list(queryset.select_related("org").order_by("pk"))
        for invoice in invoices:
            invoice.total_display = usd(invoice.total_cents)
        form = StaffReasonForm(request.POST if request.POST.get("apply") == "yes" else None)
        if form.is_bound and form.is_valid():
            done = 0
            for invoice in invoices:
                try:
                    apply(invoice, form.cleaned_data["reason"])
                except BillingError as e:
                    self.message_user(request, f"{invoice}: {e.message}", messages.ERROR)
                    continue
                self.log_change(request, invoice, f"{verb}: {form.cleaned_data['reason']}")
                done += 1
            if done:
                self.message_user(
                    request, f"{verb} {done} invoice{'s' if done != 1 else ''}.", messages.SUCCESS
                )
            return None
        request.current_app = self.admin_site.name
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "intro": intro,
            "submit_label": submit,
            "opts": self.opts,
            "invoices": invoices,
            "form": form,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/invoices/invoice/reason_form.html", context)


@admin.register(PaymentAttempt)
class PaymentAttemptAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "invoice",
        "number",
        "status",
        "amount",
        "stripe_payment_intent_id",
        "created_at",
        "finished_at",
    )
    list_filter = ("status",)
    list_select_related = ("invoice",)
    search_fields = ("invoice__number", "idempotency_key", "stripe_payment_intent_id", "invoice__org__name")

    @admin.display(description="amount")
    def amount(self, obj):
        return usd(obj.amount_cents)


@admin.register(PaymentMethod)
class PaymentMethodAdmin(AuditHistoryMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("__str__", "org", "expiry", "is_default", "active", "created_at", "removed_at")
    list_filter = ("is_default",)
    list_select_related = ("org",)
    search_fields = ("org__name", "last4", "stripe_payment_method_id")

    @admin.display(description="expires")
    def expiry(self, obj):
        return f"{obj.exp_month:02d}/{obj.exp_year}"

    @admin.display(description="active", boolean=True)
    def active(self, obj):
        return obj.is_active


@admin.register(StripeWebhookEvent)
class StripeWebhookEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("stripe_event_id", "type", "status", "received_at", "processed_at")
    list_filter = ("status", "type")
    search_fields = ("stripe_event_id", "type")
    readonly_fields = (
        "stripe_event_id",
        "type",
        "status",
        "received_at",
        "processed_at",
        "error",
        "payload_pretty",
    )
    exclude = ("payload",)

    @admin.display(description="payload")
    def payload_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))


@admin.register(InvoiceNumberSequence)
class InvoiceNumberSequenceAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("year", "last")
