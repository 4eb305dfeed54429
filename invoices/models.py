"""Invoices, lines, payments, payment methods and Stripe webhooks (the invoices issue).

Money is integer cents; `Decimal` only for a per-unit rate (overage: dollars per 1,000 credits),
rounded half-up once on its line. An invoice is a Draft (no number, staff only) until it is issued;
issuing assigns the next gapless number of the calendar year and freezes the lines.
"""

from auditlog.registry import auditlog
from django.db import models
from django.db.models import F, Q

from accounts.models import BillingPeriod, Organisation


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ISSUED = "issued", "Issued"
    PAID = "paid", "Paid"
    VOID = "void", "Void"
    REFUNDED = "refunded", "Refunded"


class InvoiceKind(models.TextChoices):
    PERIOD = "period", "Billing period"
    PURCHASE = "purchase", "Purchase"
    UPGRADE = "upgrade", "Plan upgrade"


class Invoice(models.Model):
    Status = InvoiceStatus
    Kind = InvoiceKind

    org = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="invoices")
    number = models.CharField(
        max_length=32, null=True, blank=True, help_text="INV-YYYY-NNNNNN, assigned when issued."
    )
    status = models.CharField(max_length=10, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT)
    kind = models.CharField(max_length=10, choices=InvoiceKind.choices, default=InvoiceKind.PURCHASE)
    description = models.CharField(max_length=200, blank=True)
    billing_period = models.ForeignKey(
        BillingPeriod,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="invoices",
        help_text="For period invoices: the period whose close issued it.",
    )
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True, help_text="Exclusive.")
    subtotal_cents = models.BigIntegerField(default=0)
    tax_rate = models.DecimalField(
        max_digits=6, decimal_places=3, default=0, help_text="Percent of the subtotal, fixed at issue."
    )
    tax_cents = models.BigIntegerField(default=0)
    total_cents = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3, default="usd")
    fulfilment = models.JSONField(
        default=dict,
        blank=True,
        help_text="What a paid purchase grants, for the handler that grants it after a crash.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    issued_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    refunded_at = models.DateTimeField(null=True, blank=True)
    staff_note = models.TextField(blank=True, help_text="Why staff marked it paid, voided or refunded it.")
    next_attempt_at = models.DateTimeField(
        null=True, blank=True, help_text="Period invoices: when billing_tick next charges it (billing time)."
    )
    first_failed_at = models.DateTimeField(
        null=True, blank=True, help_text="Billing time of the first failed charge: retries count from it."
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(fields=["number"], name="invoice_number_unique"),
            models.CheckConstraint(
                condition=Q(total_cents=F("subtotal_cents") + F("tax_cents")), name="invoice_total_adds_up"
            ),
            models.CheckConstraint(
                condition=Q(status="draft", number__isnull=True)
                | Q(status__in=["issued", "paid", "refunded"], number__isnull=False)
                | Q(status="void"),
                name="invoice_numbered_unless_draft",
            ),
            models.UniqueConstraint(
                fields=["billing_period"],
                condition=Q(kind="period"),
                name="one_invoice_per_closed_period",
            ),
        ]
        indexes = [models.Index(fields=["org", "status", "-issued_at"], name="invoice_org_list")]

    def __str__(self):
        return self.number or f"Draft #{self.pk}"

    @property
    def is_draft(self) -> bool:
        return self.status == InvoiceStatus.DRAFT

    @property
    def is_frozen(self) -> bool:
        """Issued (or voided) invoices never change their lines or totals."""
        return self.status != InvoiceStatus.DRAFT

    @property
    def badge(self) -> str:
        """The CSS badge class that goes with the status word."""
        return {
            InvoiceStatus.PAID: "success",
            InvoiceStatus.ISSUED: "warning",
            InvoiceStatus.VOID: "",
            InvoiceStatus.REFUNDED: "accent",
        }.get(self.status, "")


class InvoiceLine(models.Model):
    """One line of an invoice: quantity × a unit price in cents, or × a Decimal rate per 1,000
    (overage), its amount rounded half-up once here."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveSmallIntegerField(default=0)
    description = models.CharField(max_length=200)
    quantity = models.BigIntegerField(default=1)
    unit_cents = models.BigIntegerField(null=True, blank=True)
    unit_rate = models.DecimalField(
        max_digits=10,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Dollars per 1,000 units (overage), instead of a unit price in cents.",
    )
    amount_cents = models.BigIntegerField()

    class Meta:
        ordering = ["position", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=Q(unit_cents__isnull=False, unit_rate__isnull=True)
                | Q(unit_cents__isnull=True, unit_rate__isnull=False),
                name="invoice_line_one_unit_price",
            )
        ]

    def __str__(self):
        return self.description


class InvoiceNumberSequence(models.Model):
    """The last number issued in a calendar year; its row is locked while an invoice is issued."""

    year = models.PositiveIntegerField(primary_key=True)
    last = models.PositiveIntegerField(default=0)

    def __str__(self):
        return f"{self.year}: {self.last}"


class PaymentMethod(models.Model):
    """A card saved at Stripe for an organisation (we keep only what the pages show)."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="payment_methods")
    stripe_payment_method_id = models.CharField(max_length=255)
    brand = models.CharField(max_length=30)
    last4 = models.CharField(max_length=4)
    exp_month = models.PositiveSmallIntegerField()
    exp_year = models.PositiveSmallIntegerField()
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-is_default", "created_at", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["stripe_payment_method_id"],
                condition=Q(removed_at__isnull=True),
                name="payment_method_saved_once",
            ),
            models.UniqueConstraint(
                fields=["org"],
                condition=Q(is_default=True, removed_at__isnull=True),
                name="one_default_card_per_org",
            ),
        ]

    def __str__(self):
        return f"{self.brand_display} •••• {self.last4}"

    @property
    def brand_display(self) -> str:
        names = {"amex": "American Express", "diners": "Diners Club", "mastercard": "Mastercard"}
        return names.get(self.brand, self.brand.replace("_", " ").title() or "Card")

    @property
    def is_active(self) -> bool:
        return self.removed_at is None


class AttemptStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


MAX_PAYMENT_ATTEMPTS = 4


class PaymentAttempt(models.Model):
    """One charge of an invoice: at most one PaymentIntent, recorded before Stripe is called."""

    Status = AttemptStatus

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="attempts")
    number = models.PositiveSmallIntegerField()
    idempotency_key = models.CharField(max_length=100, unique=True)
    payment_method = models.ForeignKey(
        PaymentMethod, on_delete=models.PROTECT, null=True, blank=True, related_name="attempts"
    )
    amount_cents = models.BigIntegerField()
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=10, choices=AttemptStatus.choices, default=AttemptStatus.PENDING)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["invoice_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["invoice", "number"], name="one_attempt_per_number"),
            models.CheckConstraint(
                condition=Q(number__gte=1, number__lte=MAX_PAYMENT_ATTEMPTS), name="at_most_four_attempts"
            ),
        ]

    def __str__(self):
        return f"{self.invoice} attempt {self.number} ({self.status})"

    @staticmethod
    def key_for(invoice_id: int, number: int) -> str:
        return f"inv-{invoice_id}-attempt-{number}"


class WebhookStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSING = "processing", "Processing"
    PROCESSED = "processed", "Processed"
    IGNORED = "ignored", "Ignored"
    FAILED = "failed", "Failed"


class StripeWebhookEvent(models.Model):
    """A Stripe event, stored once by its id before it is processed."""

    Status = WebhookStatus

    stripe_event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=WebhookStatus.choices, default=WebhookStatus.RECEIVED)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-received_at"]
        verbose_name = "Stripe webhook event"

    def __str__(self):
        return f"{self.type} ({self.stripe_event_id})"


class InvoicePdf(models.Model):
    """An invoice's PDF as rendered for one status: rendered once, served byte for byte until the
    invoice's status changes (then a new one is rendered for the new status)."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="pdfs")
    status = models.CharField(max_length=10, choices=InvoiceStatus.choices)
    content = models.BinaryField()
    sha256 = models.CharField(max_length=64)
    rendered_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["invoice", "status"], name="one_pdf_per_invoice_status")
        ]
        verbose_name = "invoice PDF"

    def __str__(self):
        return f"{self.invoice} as {self.status}"


# Who changed what (django-auditlog, shown in admin): invoices (issue, void, mark paid) and cards.
auditlog.register(Invoice)
auditlog.register(PaymentMethod)
