"""The catalog of operations, the credit ledger (lots + append-only entries), jobs, usage events,
daily rollups and rate-limit counters."""

import uuid

from django.db import models
from django.db.models import F, Q

from accounts.models import BillingPeriod, Organisation, User


class Operation(models.Model):
    """What one unit of a (product, mode) costs in credits (DESIGN §2). Staff edit these."""

    class Unit(models.TextChoices):
        PAGE = "page", "page"
        SECOND = "second", "second"

    product = models.SlugField(max_length=30)
    mode = models.SlugField(max_length=30)
    credits_per_unit = models.PositiveIntegerField()
    unit = models.CharField(max_length=10, choices=Unit.choices, default=Unit.PAGE)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["product", "mode"], name="one_price_per_operation")]
        ordering = ["product", "mode"]

    def __str__(self):
        return f"{self.product}/{self.mode}: {self.credits_per_unit} credits per {self.unit}"


class Bucket(models.IntegerChoices):
    """Credit buckets, in the order they are spent (DESIGN §3)."""

    PLAN = 1, "plan"
    BONUS = 2, "bonus"
    PURCHASED = 3, "purchased"


class CreditAccount(models.Model):
    """Per-organisation cached totals beside the ledger, and the row every ledger write locks.

    `balance` is the sum of the organisation's lots' `remaining` (and so of its lot ledger entries);
    `overage_held` is what open holds took beyond the lots; `running_jobs` counts open holds.
    """

    org = models.OneToOneField(
        Organisation, on_delete=models.CASCADE, primary_key=True, related_name="credit_account"
    )
    balance = models.BigIntegerField(default=0)
    overage_held = models.BigIntegerField(default=0)
    running_jobs = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(balance__gte=0), name="balance_never_negative"),
            models.CheckConstraint(condition=Q(overage_held__gte=0), name="overage_held_never_negative"),
            models.CheckConstraint(condition=Q(running_jobs__gte=0), name="running_jobs_never_negative"),
        ]

    def __str__(self):
        return f"{self.org}: {self.balance} credits"


class CreditLot(models.Model):
    """One grant of credits: a period's plan credits, one purchase, its bonus, or a staff grant."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="credit_lots")
    bucket = models.PositiveSmallIntegerField(choices=Bucket.choices)
    source = models.CharField(max_length=100, help_text="What granted it, e.g. period:12 or purchase:7.")
    granted = models.BigIntegerField()
    remaining = models.BigIntegerField()
    expires_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    period = models.ForeignKey(
        BillingPeriod, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(remaining__gte=0), name="lot_never_negative"),
            models.CheckConstraint(condition=Q(remaining__lte=F("granted")), name="lot_within_grant"),
            models.UniqueConstraint(fields=["org", "source"], name="one_lot_per_source"),
        ]
        indexes = [
            models.Index(
                fields=["org", "bucket", "expires_at", "id"],
                condition=Q(remaining__gt=0),
                name="spendable_lots",
            )
        ]

    def __str__(self):
        return f"{self.get_bucket_display()} lot {self.source}: {self.remaining}/{self.granted}"


class EntryKind(models.TextChoices):
    GRANT = "grant", "grant"
    HOLD = "hold", "job hold"
    RELEASE = "release", "hold released"
    USAGE = "usage", "usage events"
    OVERAGE = "overage", "overage"
    EXPIRE = "expire", "expiry"
    ADJUST = "adjust", "staff adjustment"
    REFUND = "refund", "refund"


class LedgerEntry(models.Model):
    """An append-only change of credits. With a lot, `credits` is the signed change of that lot's
    `remaining`; without one (kind overage) it is credits charged beyond the lots, as a negative."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="ledger_entries")
    lot = models.ForeignKey(
        CreditLot, on_delete=models.PROTECT, null=True, blank=True, related_name="entries"
    )
    kind = models.CharField(max_length=10, choices=EntryKind.choices)
    credits = models.BigIntegerField()
    job = models.ForeignKey("Job", on_delete=models.PROTECT, null=True, blank=True, related_name="entries")
    period = models.ForeignKey(
        BillingPeriod, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    reason = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["org", "-id"], name="ledger_by_org")]
        verbose_name_plural = "ledger entries"

    def __str__(self):
        return f"{self.kind} {self.credits:+}"


class JobStatus(models.TextChoices):
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


class Job(models.Model):
    """A document job metered through the API: it holds credits while it runs (DESIGN §3)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="jobs")
    product = models.SlugField(max_length=30)
    mode = models.SlugField(max_length=30)
    ocr = models.BooleanField(default=False)
    pages = models.PositiveIntegerField()
    file_type = models.CharField(max_length=10)
    file_size = models.PositiveBigIntegerField()
    credits_per_page = models.PositiveIntegerField(help_text="Mode price when the job started.")
    ocr_credits_per_page = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=JobStatus.choices, default=JobStatus.RUNNING)
    credits_reserved = models.BigIntegerField()
    held_from_lots = models.BigIntegerField()
    held_overage = models.BigIntegerField(default=0)
    credits_charged = models.BigIntegerField(default=0)
    pages_charged = models.PositiveIntegerField(default=0)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["org", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="one_job_per_idempotency_key",
            ),
            models.CheckConstraint(
                condition=Q(credits_charged__lte=F("credits_reserved")), name="charge_within_hold"
            ),
        ]
        indexes = [
            models.Index(fields=["created_at"], condition=Q(status="running"), name="running_jobs_by_age"),
        ]

    def __str__(self):
        return f"job {self.id} ({self.status})"


class UsageEvent(models.Model):
    """A metered event reported by the API servers; its id counts once per organisation, ever."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="usage_events")
    event_id = models.CharField(max_length=255)
    product = models.SlugField(max_length=30)
    mode = models.SlugField(max_length=30)
    units = models.PositiveIntegerField()
    credits = models.BigIntegerField()
    timestamp = models.DateTimeField(help_text="The sender's time, kept for the record.")
    charged_on = models.DateField(help_text="The UTC day it was charged: what usage is dated by.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["org", "event_id"], name="event_id_once_per_org")]

    def __str__(self):
        return f"event {self.event_id}"


class UsageRollup(models.Model):
    """Credits and units charged per organisation, UTC day, product and mode: what charts read."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="usage_rollups")
    day = models.DateField()
    product = models.SlugField(max_length=30)
    mode = models.SlugField(max_length=30)
    credits = models.BigIntegerField(default=0)
    units = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["org", "day", "product", "mode"], name="one_rollup_per_day_and_operation"
            )
        ]

    def __str__(self):
        return f"{self.day} {self.product}/{self.mode}: {self.credits}"


class RateCounter(models.Model):
    """Requests counted in one fixed 60-second window, when Redis is not configured."""

    name = models.CharField(max_length=100, help_text="org:<id> or ip:<address>")
    slot = models.BigIntegerField(help_text="Unix time of the window's start, divided by 60.")
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["name", "slot"], name="one_counter_per_window")]

    def __str__(self):
        return f"{self.name} @ {self.slot}: {self.count}"
