"""The catalog of operations, the credit ledger (lots + append-only entries), jobs, usage events,
daily rollups and rate-limit counters.

On PostgreSQL a job's hold and end are PL/pgSQL functions (migrations 0006 and 0008) that
write jobs, lots, ledger entries, accounts, periods and rollups by column name: renaming or dropping
a column they use needs a new version of them in the same migration.
"""

import uuid

from auditlog.registry import auditlog
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
    recharge_below = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="The threshold of an enabled threshold auto-recharge (a copy kept by the credits "
        "services, so the ledger can tell without a query); empty when there is none.",
    )

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

    # org_id is searched through ledger_by_org, which starts with it
    org = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, related_name="ledger_entries", db_index=False
    )
    lot = models.ForeignKey(
        CreditLot, on_delete=models.PROTECT, null=True, blank=True, related_name="entries"
    )
    kind = models.CharField(max_length=10, choices=EntryKind.choices)
    credits = models.BigIntegerField()
    job = models.ForeignKey("Job", on_delete=models.PROTECT, null=True, blank=True, related_name="entries")
    period = models.ForeignKey(
        BillingPeriod, on_delete=models.PROTECT, null=True, blank=True, related_name="+", db_index=False
    )
    reason = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+", db_index=False
    )
    created_at = models.DateTimeField()

    class Meta:
        # Every job writes ledger entries, so each index here is paid on the API's hottest path:
        # the few entries with a period (overage) or an author (staff) are indexed alone.
        indexes = [
            models.Index(fields=["org", "-id"], name="ledger_by_org"),
            models.Index(fields=["period"], condition=Q(period__isnull=False), name="ledger_by_period"),
            models.Index(
                fields=["created_by"], condition=Q(created_by__isnull=False), name="ledger_by_author"
            ),
        ]
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
    product = models.SlugField(max_length=30, db_index=False)  # never searched alone
    mode = models.SlugField(max_length=30, db_index=False)
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

    # org_id is searched through event_id_once_per_org, which starts with it
    org = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, related_name="usage_events", db_index=False
    )
    event_id = models.CharField(max_length=255)
    product = models.SlugField(max_length=30, db_index=False)  # never searched alone
    mode = models.SlugField(max_length=30, db_index=False)
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

    # org_id is searched through one_rollup_per_day_and_operation, which starts with it
    org = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, related_name="usage_rollups", db_index=False
    )
    day = models.DateField()
    product = models.SlugField(max_length=30, db_index=False)  # never searched alone
    mode = models.SlugField(max_length=30, db_index=False)
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


MAX_ALERT_THRESHOLD = 1_000_000_000
MAX_ALERT_RECIPIENTS = 10


class LowBalanceAlert(models.Model):
    """An organisation's low-balance e-mail (DESIGN §4): sent once when the balance falls below
    `threshold`, then disarmed until the balance is back at the threshold or above."""

    org = models.OneToOneField(Organisation, on_delete=models.CASCADE, related_name="low_balance_alert")
    enabled = models.BooleanField(default=False)
    threshold = models.PositiveIntegerField(help_text="Whole credits, 1 to 1,000,000,000.")
    recipients = models.JSONField(default=list, blank=True, help_text="Up to 10 e-mail addresses.")
    armed = models.BooleanField(default=True, help_text="False after an e-mail, until the balance recovers.")
    last_sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(threshold__gte=1) & Q(threshold__lte=MAX_ALERT_THRESHOLD),
                name="alert_threshold_in_range",
            )
        ]

    def __str__(self):
        state = "armed" if self.armed else "sent"
        return f"{self.org}: below {self.threshold} credits ({'on' if self.enabled else 'off'}, {state})"


# --- prepaid credits: packs, commitment tiers, purchases, auto-recharge (DESIGN §2, §4) -------

CREDITS_PER_DOLLAR = 800  # the $1.25 per 1,000 credits base rate: a scheduled recharge of $X buys X × 800
REFUND_DAYS = 14
MAX_RECHARGE_THRESHOLD = 1_000_000_000
MAX_PACKS_PER_RECHARGE = 100
RECHARGE_RETRY_DAYS = (1, 3, 7)  # after the first decline; the next decline after the last stops it


class CreditPack(models.Model):
    """A pack on the Credits tab: its credits go to the purchased bucket and never expire."""

    price_cents = models.PositiveIntegerField(help_text="Price in cents.")
    credits = models.PositiveIntegerField()
    active = models.BooleanField(default=True, help_text="Only active packs are offered.")
    sort_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["sort_order", "price_cents", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(price_cents__gte=100), name="pack_costs_a_dollar_or_more"),
            models.CheckConstraint(condition=Q(credits__gte=1), name="pack_has_credits"),
        ]

    def __str__(self):
        return f"${self.price_cents // 100:,}{self._cents} pack: {self.credits:,} credits"

    @property
    def _cents(self) -> str:
        return f".{self.price_cents % 100:02d}" if self.price_cents % 100 else ""

    @property
    def price_label(self) -> str:
        return f"${self.price_cents // 100:,}{self._cents}"

    @property
    def extra_percent(self) -> int:
        """Whole percent more credits than the base rate gives for the price (0 if none)."""
        base = self.price_cents * CREDITS_PER_DOLLAR // 100
        return max(0, (self.credits - base) * 100 // base) if base else 0


class Tier(models.TextChoices):
    NONE = "none", "No tier"
    EXPLORE = "explore", "Explore"
    BUILD = "build", "Build"
    SCALE = "scale", "Scale"


class CommitmentTerm(models.TextChoices):
    MONTHLY = "monthly", "Monthly"
    YEARLY = "yearly", "Yearly"


class TierRule:
    """What a tier needs (purchases in a monthly commitment period; × 12 for a yearly one) and gives."""

    def __init__(self, tier: str, monthly_cents: int, bonus_percent: int, rpm: int):
        self.tier = tier
        self.monthly_cents = monthly_cents
        self.bonus_percent = bonus_percent
        self.rpm = rpm

    @property
    def label(self) -> str:
        return Tier(self.tier).label

    def threshold_cents(self, term: str) -> int:
        return self.monthly_cents * (12 if term == CommitmentTerm.YEARLY else 1)


TIER_RULES = (
    TierRule(Tier.EXPLORE, 10_000, 3, 1_800),
    TierRule(Tier.BUILD, 50_000, 5, 3_000),
    TierRule(Tier.SCALE, 500_000, 10, 4_800),
)


def tier_rule(tier: str) -> TierRule | None:
    return next((rule for rule in TIER_RULES if rule.tier == tier), None)


def tier_for(*, purchased_cents: int, term: str) -> str:
    """The tier that `purchased_cents` of purchases in one commitment period of `term` reach."""
    reached = Tier.NONE
    for rule in TIER_RULES:
        if purchased_cents >= rule.threshold_cents(term):
            reached = rule.tier
    return reached


def bonus_for(*, credits: int, tier: str) -> int:
    """floor(credits × the tier's bonus rate)."""
    rule = tier_rule(tier)
    return credits * rule.bonus_percent // 100 if rule else 0


class Commitment(models.Model):
    """An organisation's commitment: its term, the tier its purchases reached in the current
    commitment period (managed automatically) and a staff override with its reason."""

    org = models.OneToOneField(
        Organisation, on_delete=models.CASCADE, primary_key=True, related_name="commitment"
    )
    term = models.CharField(
        max_length=10,
        choices=CommitmentTerm.choices,
        default=CommitmentTerm.MONTHLY,
        help_text="Applies from the next commitment period (yearly: 12 months from its first purchase).",
    )
    tier = models.CharField(
        max_length=10, choices=Tier.choices, default=Tier.NONE, help_text="Set from purchases; never by hand."
    )
    override_tier = models.CharField(
        max_length=10, choices=Tier.choices, blank=True, help_text="Staff override; empty means automatic."
    )
    override_reason = models.CharField(max_length=300, blank=True)
    override_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    override_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.org}: {self.get_term_display().lower()}, {Tier(self.effective_tier).label}"

    @property
    def effective_tier(self) -> str:
        return self.override_tier or self.tier

    @property
    def rpm(self) -> int:
        """The tier's requests per minute (0 without a tier)."""
        rule = tier_rule(self.effective_tier)
        return rule.rpm if rule else 0


class CommitmentPeriod(models.Model):
    """One commitment period: a UTC calendar month, or 12 months from a yearly term's first purchase."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="commitment_periods")
    term = models.CharField(max_length=10, choices=CommitmentTerm.choices)
    start = models.DateTimeField()
    end = models.DateTimeField(help_text="Exclusive; bonus credits granted in the period expire here.")
    purchased_cents = models.BigIntegerField(default=0, help_text="Paid purchases in it, refunds taken off.")
    tier = models.CharField(max_length=10, choices=Tier.choices, default=Tier.NONE)
    closed_at = models.DateTimeField(null=True, blank=True, help_text="When billing_tick expired its bonus.")

    class Meta:
        ordering = ["-start"]
        constraints = [
            models.UniqueConstraint(fields=["org", "start"], name="one_commitment_period_per_start"),
            models.CheckConstraint(condition=Q(end__gt=F("start")), name="commitment_period_not_empty"),
            models.CheckConstraint(
                condition=Q(purchased_cents__gte=0), name="commitment_purchases_not_negative"
            ),
        ]

    def __str__(self):
        return f"{self.org}: {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d} ({Tier(self.tier).label})"


class PurchaseKind(models.TextChoices):
    PACK = "pack", "Pack"
    THRESHOLD = "threshold", "Auto-recharge (low balance)"
    SCHEDULE = "schedule", "Auto-recharge (scheduled)"


RECHARGE_KINDS = (PurchaseKind.THRESHOLD, PurchaseKind.SCHEDULE)


class PurchaseStatus(models.TextChoices):
    PENDING = "pending", "Processing"
    PAID = "paid", "Paid"
    DECLINED = "declined", "Declined"
    FAILED = "failed", "Failed"
    REFUNDED = "refunded", "Refunded"


class CreditPurchase(models.Model):
    """One purchase of credits, from the click (or the recharge trigger) to its outcome.

    A row is committed as Processing before the card is charged; the invoice's paid-handler makes
    it Paid and grants its lots in the payment's transaction, once. At most one recharge is in
    flight per organisation, which the database enforces.
    """

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="credit_purchases")
    kind = models.CharField(max_length=10, choices=PurchaseKind.choices)
    status = models.CharField(max_length=10, choices=PurchaseStatus.choices, default=PurchaseStatus.PENDING)
    key = models.CharField(
        max_length=100, help_text="What makes it happen once: the form's token, or the recharge's trigger."
    )
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    quantity = models.PositiveIntegerField(default=1)
    amount_cents = models.BigIntegerField(help_text="Before tax: what counts towards the tier.")
    credits = models.BigIntegerField(help_text="Purchased credits (never expire).")
    bonus_credits = models.BigIntegerField(default=0, help_text="Granted with it, set when paid.")
    tier = models.CharField(
        max_length=10, choices=Tier.choices, default=Tier.NONE, help_text="Reached with it."
    )
    occurrence = models.CharField(max_length=7, blank=True, help_text="Scheduled recharges: 2026-05 or 2026.")
    invoice = models.OneToOneField(
        "invoices.Invoice", on_delete=models.PROTECT, null=True, blank=True, related_name="credit_purchase"
    )
    commitment_period = models.ForeignKey(
        CommitmentPeriod, on_delete=models.PROTECT, null=True, blank=True, related_name="purchases"
    )
    lot = models.OneToOneField(CreditLot, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    bonus_lot = models.OneToOneField(
        CreditLot, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    message = models.CharField(max_length=300, blank=True, help_text="Why it was declined or failed.")
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    refund_requested_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Credits removed; the Stripe refund follows (billing_tick retries it).",
    )
    refunded_at = models.DateTimeField(null=True, blank=True)
    stripe_refund_id = models.CharField(max_length=255, blank=True)
    refunded_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    refund_removed_credits = models.BigIntegerField(default=0)
    refund_removed_bonus = models.BigIntegerField(default=0)
    refund_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["org", "key"], name="one_purchase_per_key"),
            models.UniqueConstraint(
                fields=["org"],
                condition=Q(status="pending", kind__in=["threshold", "schedule"]),
                name="one_recharge_in_flight_per_org",
            ),
            models.UniqueConstraint(
                fields=["org", "occurrence"],
                condition=Q(kind="schedule", status__in=["paid", "refunded"]),
                name="one_paid_recharge_per_occurrence",
            ),
            models.CheckConstraint(condition=Q(quantity__gte=1), name="purchase_quantity_positive"),
            models.CheckConstraint(condition=Q(credits__gte=1), name="purchase_has_credits"),
            models.CheckConstraint(condition=Q(amount_cents__gte=1), name="purchase_costs_something"),
        ]
        indexes = [models.Index(fields=["org", "-created_at"], name="purchases_by_org")]

    def __str__(self):
        return f"{self.get_kind_display()} #{self.pk}: {self.credits:,} credits ({self.get_status_display()})"

    @property
    def is_recharge(self) -> bool:
        return self.kind in RECHARGE_KINDS

    @property
    def refund_pending(self) -> bool:
        return self.refund_requested_at is not None and self.refunded_at is None


class RechargeKind(models.TextChoices):
    THRESHOLD = "threshold", "When the balance falls below a threshold"
    SCHEDULE = "schedule", "On a schedule"


class RechargeFrequency(models.TextChoices):
    MONTHLY = "monthly", "Monthly"
    YEARLY = "yearly", "Yearly"


class RechargeSetting(models.Model):
    """An organisation's auto-recharge: either "when my balance falls below `threshold`, buy
    `pack`" or "buy `amount_dollars` of credits monthly or yearly on a billing date"; with an
    optional monthly cap, and the back-off state after a declined recharge."""

    org = models.OneToOneField(
        Organisation, on_delete=models.CASCADE, primary_key=True, related_name="recharge_setting"
    )
    kind = models.CharField(max_length=10, choices=RechargeKind.choices, default=RechargeKind.THRESHOLD)
    enabled = models.BooleanField(default=False)
    threshold = models.PositiveIntegerField(null=True, blank=True, help_text="Credits.")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    amount_dollars = models.PositiveIntegerField(
        null=True, blank=True, help_text="Scheduled: whole dollars; buys amount × 800 credits plus the bonus."
    )
    frequency = models.CharField(
        max_length=10, choices=RechargeFrequency.choices, default=RechargeFrequency.MONTHLY
    )
    billing_day = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Day of the month (the 31st falls to the month's last day)."
    )
    billing_month = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Yearly: the month, 1–12."
    )
    schedule_from = models.DateField(
        null=True,
        blank=True,
        help_text="The first billing date it may charge (billing dates before it are skipped).",
    )
    monthly_cap_cents = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Recharges in one UTC calendar month never add up to more; empty: no cap.",
    )
    failures = models.PositiveSmallIntegerField(default=0, help_text="Declined or failed recharges in a row.")
    first_failed_at = models.DateTimeField(null=True, blank=True)
    next_try_at = models.DateTimeField(null=True, blank=True, help_text="No recharge before this (back-off).")
    last_problem = models.CharField(max_length=300, blank=True)
    last_problem_at = models.DateTimeField(null=True, blank=True)
    cap_reached_month = models.CharField(
        max_length=7, blank=True, help_text="The month (YYYY-MM) the cap last stopped a recharge."
    )
    updated_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(threshold__isnull=True)
                | Q(threshold__gte=1, threshold__lte=MAX_RECHARGE_THRESHOLD),
                name="recharge_threshold_in_range",
            ),
            models.CheckConstraint(
                condition=Q(billing_day__isnull=True) | Q(billing_day__gte=1, billing_day__lte=31),
                name="recharge_billing_day_in_range",
            ),
            models.CheckConstraint(
                condition=Q(billing_month__isnull=True) | Q(billing_month__gte=1, billing_month__lte=12),
                name="recharge_billing_month_in_range",
            ),
            models.CheckConstraint(
                condition=~Q(enabled=True, kind="threshold") | Q(threshold__isnull=False, pack__isnull=False),
                name="threshold_recharge_complete",
            ),
            models.CheckConstraint(
                condition=~Q(enabled=True, kind="schedule")
                | Q(amount_dollars__gte=1, billing_day__isnull=False, schedule_from__isnull=False),
                name="scheduled_recharge_complete",
            ),
        ]

    def __str__(self):
        return f"{self.org}: {self.get_kind_display().lower()} ({'on' if self.enabled else 'off'})"

    @property
    def backing_off(self) -> bool:
        return self.next_try_at is not None

    @property
    def scheduled_credits(self) -> int:
        """What one scheduled recharge buys before the bonus: $X × 800."""
        return (self.amount_dollars or 0) * CREDITS_PER_DOLLAR


# Who changed what (django-auditlog, shown in admin): the catalog and each organisation's
# settings, purchases and refunds, not the state the workers keep (armed, back-off, failures).
auditlog.register(Operation)
auditlog.register(CreditPack)
auditlog.register(Commitment, exclude_fields=["updated_at"])
auditlog.register(CreditPurchase)
auditlog.register(LowBalanceAlert, exclude_fields=["armed", "last_sent_at", "updated_at"])
auditlog.register(
    RechargeSetting,
    exclude_fields=[
        "failures",
        "first_failed_at",
        "next_try_at",
        "last_problem",
        "last_problem_at",
        "cap_reached_month",
        "updated_at",
    ],
)
