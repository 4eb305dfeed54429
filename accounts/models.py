"""Organisations, people and their roles, plans, subscriptions, billing periods and API keys."""

from datetime import timedelta
from decimal import Decimal

from auditlog.registry import auditlog
from django.contrib.auth.base_user import BaseUserManager
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models import Q


class UserManager(BaseUserManager):
    use_in_migrations = True

    def _create(self, email, password, **extra):
        if not email:
            raise ValueError("An e-mail address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)  # None gives an unusable password
        user.save(using=self._db)
        return user

    def create_user(self, email, password=None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create(email, password, **extra)

    def create_superuser(self, email, password=None, **extra):
        extra.update(is_staff=True, is_superuser=True)
        return self._create(email, password, **extra)


class User(AbstractUser):
    """A person. Signs in with their e-mail address (stored lower-case)."""

    username = None
    email = models.EmailField("e-mail address", unique=True)

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS = []

    objects = UserManager()

    def __str__(self):
        return self.email


class Organisation(models.Model):
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    stripe_customer_id = models.CharField(max_length=255, blank=True)

    def __str__(self):
        return self.name


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    BILLING_ADMIN = "billing_admin", "Billing admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["org", "user"], name="one_membership_per_org")]

    def __str__(self):
        return f"{self.user} in {self.org} ({self.get_role_display()})"

    @property
    def can_manage_billing(self) -> bool:
        return self.role in (Role.OWNER, Role.BILLING_ADMIN)


class Plan(models.Model):
    """A row of the public plan table (DESIGN §2). Staff edit these in admin."""

    code = models.SlugField(max_length=30, unique=True)
    name = models.CharField(max_length=60)
    price_cents = models.PositiveIntegerField(help_text="Monthly fee in cents.")
    monthly_credits = models.PositiveIntegerField()
    overage_rate = models.DecimalField(
        max_digits=8,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Dollars per 1,000 credits beyond the plan's lots; empty means a hard stop (402).",
    )
    rpm = models.PositiveIntegerField("requests per minute")
    concurrent_jobs = models.PositiveIntegerField()
    support = models.CharField(max_length=60)
    is_contract = models.BooleanField(
        default=False, help_text="Priced per contract: the pricing page shows 'Contact sales'."
    )
    sort_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["sort_order", "price_cents"]

    def __str__(self):
        return self.name

    @property
    def is_free(self) -> bool:
        return self.price_cents == 0 and not self.is_contract


class Subscription(models.Model):
    """An organisation's plan, its billing cycle and the per-subscription overrides staff may set."""

    org = models.OneToOneField(Organisation, on_delete=models.CASCADE, related_name="subscription")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    anchor_day = models.PositiveSmallIntegerField(
        help_text="Day of the month paid periods renew on (the 31st falls to the month's last day)."
    )
    current_period = models.OneToOneField(
        "BillingPeriod", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    overage_enabled = models.BooleanField(default=True)
    overage_cap_cents = models.PositiveIntegerField(
        null=True, blank=True, help_text="Monthly overage cap in cents; empty means no cap."
    )
    scheduled_plan = models.ForeignKey(
        Plan,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="A downgrade the customer scheduled: applied when the current period closes.",
    )
    upgrade_pending_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set while an upgrade is being paid for, so a second one cannot start meanwhile.",
    )
    monthly_credits_override = models.PositiveIntegerField(null=True, blank=True)
    rpm_override = models.PositiveIntegerField(null=True, blank=True)
    concurrent_jobs_override = models.PositiveIntegerField(null=True, blank=True)
    price_cents_override = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.org} on {self.plan}"

    @property
    def monthly_credits(self) -> int:
        if self.monthly_credits_override is not None:
            return self.monthly_credits_override
        return self.plan.monthly_credits

    @property
    def rpm(self) -> int:
        """Staff's override, else the higher of the plan's and the commitment tier's (DESIGN §2)."""
        if self.rpm_override is not None:
            return self.rpm_override
        commitment = getattr(self.org, "commitment", None)  # usage.Commitment; None without one
        return max(self.plan.rpm, commitment.rpm if commitment is not None else 0)

    @property
    def concurrent_jobs(self) -> int:
        if self.concurrent_jobs_override is not None:
            return self.concurrent_jobs_override
        return self.plan.concurrent_jobs

    @property
    def price_cents(self) -> int:
        if self.price_cents_override is not None:
            return self.price_cents_override
        return self.plan.price_cents

    @property
    def overage_rate(self) -> Decimal | None:
        """Dollars per 1,000 overage credits, or None when running out is a hard stop."""
        if not self.overage_enabled:
            return None
        return self.plan.overage_rate


class BillingPeriod(models.Model):
    """One billing cycle of a subscription: [start, end) in UTC, opened and closed by billing_tick."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="periods")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    start = models.DateTimeField()
    end = models.DateTimeField()
    monthly_credits = models.PositiveIntegerField(help_text="The quota granted for this period.")
    credits_used = models.PositiveBigIntegerField(default=0, help_text="Charged, overage included.")
    overage_credits = models.PositiveBigIntegerField(default=0)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["org", "start"], name="one_period_per_start"),
            models.CheckConstraint(condition=Q(end__gt=models.F("start")), name="period_not_empty"),
        ]
        ordering = ["-start"]

    def __str__(self):
        return f"{self.org}: {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}"


class ApiKey(models.Model):
    """A secret for the metering API. Only its SHA-256 is stored; the prefix identifies it."""

    org = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class BillingClock(models.Model):
    """The single row that says where `billing_tick --at` has moved time to.

    The site's billing time is the wall clock plus `offset`; `last_tick_at` is the moment the last
    tick ran as of, so an earlier `--at` can be refused.
    """

    offset = models.DurationField(default=timedelta(0))
    last_tick_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"billing clock (offset {self.offset})"


class CompanySize(models.TextChoices):
    SMALL = "1-10", "1–10 people"
    MEDIUM = "11-50", "11–50 people"
    LARGE = "51-200", "51–200 people"
    XLARGE = "201-1000", "201–1,000 people"
    HUGE = "1001+", "More than 1,000 people"


class ContactRequest(models.Model):
    """An Enterprise enquiry from "Contact sales": staff answer it and tick `handled` in admin."""

    org = models.ForeignKey(
        Organisation, on_delete=models.SET_NULL, null=True, blank=True, related_name="contact_requests"
    )
    user = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    name = models.CharField(max_length=200)
    email = models.EmailField("e-mail address")
    company_size = models.CharField(max_length=10, choices=CompanySize.choices)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    handled = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} <{self.email}> ({self.created_at:%d %b %Y})"


# Who changed what (django-auditlog, shown in admin): what staff and customers set, not what the
# system keeps up to date on its own (the current period, last-used times) nor secrets.
auditlog.register(User, exclude_fields=["password", "last_login"])
auditlog.register(Organisation)
auditlog.register(Membership)
auditlog.register(Plan)
auditlog.register(Subscription, exclude_fields=["current_period", "upgrade_pending_since"])
auditlog.register(ApiKey, exclude_fields=["key_hash", "last_used_at"])
auditlog.register(ContactRequest)
