"""The Credits tab's forms: buy a pack (with the refund-policy tick) and set auto-recharge."""

import calendar

from django import forms

from billing_site.errors import BillingError
from usage import credits
from usage.models import MAX_RECHARGE_THRESHOLD, CreditPack, RechargeFrequency, RechargeKind

MONTHS = [(str(i), calendar.month_name[i]) for i in range(1, 13)]


class PackChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj):
        return f"{obj.price_label}: {obj.credits:,} credits"


class PackPurchaseForm(forms.Form):
    pack = PackChoiceField(
        queryset=CreditPack.objects.filter(active=True),
        widget=forms.RadioSelect,
        empty_label=None,
        error_messages={
            "required": "Choose a pack.",
            "invalid_choice": "That pack is no longer offered: choose another.",
        },
    )
    agree = forms.BooleanField(
        label="I agree to the refund policy",
        error_messages={"required": "Tick that you agree to the refund policy: nothing was charged."},
    )
    token = forms.CharField(widget=forms.HiddenInput, max_length=64)


class RechargeForm(forms.Form):
    """Either kind of auto-recharge; `clean` leaves the checked setting in `self.choice`."""

    kind = forms.ChoiceField(
        label="Recharge",
        choices=RechargeKind.choices,
        widget=forms.RadioSelect,
        initial=RechargeKind.THRESHOLD,
        error_messages={"required": "Choose when to recharge."},
    )
    threshold = forms.IntegerField(
        label="When my balance falls below (credits)",
        required=False,
        min_value=1,
        max_value=MAX_RECHARGE_THRESHOLD,
        error_messages={"invalid": "Enter a whole number of credits."},
    )
    pack = PackChoiceField(
        label="Buy this pack",
        queryset=CreditPack.objects.filter(active=True),
        required=False,
        empty_label="Choose a pack",
        error_messages={"invalid_choice": "That pack is no longer offered: choose another."},
    )
    amount_dollars = forms.IntegerField(
        label="Amount (dollars)",
        required=False,
        min_value=1,
        max_value=credits.MAX_SCHEDULED_DOLLARS,
        help_text="Each dollar buys 800 credits, plus your tier's bonus.",
        error_messages={"invalid": "Enter a whole number of dollars."},
    )
    frequency = forms.ChoiceField(
        label="Frequency",
        choices=RechargeFrequency.choices,
        required=False,
        initial=RechargeFrequency.MONTHLY,
    )
    billing_day = forms.IntegerField(
        label="Billing date (day of the month)",
        required=False,
        min_value=1,
        max_value=31,
        help_text="The 29th to 31st fall to a shorter month's last day.",
        error_messages={"invalid": "Enter a day from 1 to 31."},
    )
    billing_month = forms.TypedChoiceField(
        label="Month (yearly)",
        choices=[("", "—")] + MONTHS,
        coerce=int,
        empty_value=None,
        required=False,
    )
    monthly_cap = forms.IntegerField(
        label="Monthly cap (dollars, optional)",
        required=False,
        min_value=1,
        max_value=10_000_000,
        help_text="Recharges in one calendar month never add up to more. Leave empty for no cap.",
        error_messages={"invalid": "Enter a whole number of dollars, or leave it empty."},
    )

    def clean(self):
        data = super().clean()
        kind = data.get("kind")
        if kind == RechargeKind.THRESHOLD:
            if data.get("threshold") is None and "threshold" not in self.errors:
                self.add_error("threshold", "Enter the balance, in credits, that starts a recharge.")
            if data.get("pack") is None and "pack" not in self.errors:
                self.add_error("pack", "Choose the pack to buy.")
        elif kind == RechargeKind.SCHEDULE:
            if data.get("amount_dollars") is None and "amount_dollars" not in self.errors:
                self.add_error("amount_dollars", "Enter the amount to buy, in dollars.")
            if not data.get("frequency"):
                data["frequency"] = RechargeFrequency.MONTHLY
            if data.get("billing_day") is None and "billing_day" not in self.errors:
                self.add_error("billing_day", "Enter the day of the month to recharge on.")
            if data["frequency"] == RechargeFrequency.YEARLY and data.get("billing_month") is None:
                self.add_error("billing_month", "Choose the month of the yearly recharge.")
        if self.errors:
            return data
        try:
            self.choice = credits.recharge_choice(
                kind=kind,
                threshold=data.get("threshold"),
                pack_id=data["pack"].pk if data.get("pack") else None,
                amount_dollars=data.get("amount_dollars"),
                frequency=data.get("frequency") or RechargeFrequency.MONTHLY,
                billing_day=data.get("billing_day"),
                billing_month=data.get("billing_month"),
                monthly_cap_dollars=data.get("monthly_cap"),
            )
        except BillingError as error:
            self.add_error("monthly_cap" if "cap" in error.message else None, error.message)
        return data

    @staticmethod
    def initial_for(setting) -> dict:
        if setting is None:
            return {"kind": RechargeKind.THRESHOLD, "frequency": RechargeFrequency.MONTHLY}
        return {
            "kind": setting.kind,
            "threshold": setting.threshold,
            "pack": setting.pack_id,
            "amount_dollars": setting.amount_dollars,
            "frequency": setting.frequency,
            "billing_day": setting.billing_day,
            "billing_month": setting.billing_month,
            "monthly_cap": setting.monthly_cap_cents // 100 if setting.monthly_cap_cents else None,
        }
