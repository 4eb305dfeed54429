"""Forms for staff credit adjustments in admin (the Grant credits and Remove credits actions)."""

import re
from uuid import uuid4

from django import forms

from accounts import clock
from usage.models import Bucket

MAX_CREDITS = 1_000_000_000
_CREDITS_MESSAGE = f"Enter a whole number of credits from 1 to {MAX_CREDITS:,}."
_GRANT_ID = re.compile(r"^[0-9a-f]{32}$")


class CreditsAdjustmentForm(forms.Form):
    """What every staff adjustment needs: how many credits and why."""

    credits = forms.IntegerField(
        min_value=1,
        max_value=MAX_CREDITS,
        help_text=f"A whole number from 1 to {MAX_CREDITS:,}, for each selected organisation.",
        error_messages={
            "invalid": _CREDITS_MESSAGE,
            "min_value": _CREDITS_MESSAGE,
            "max_value": _CREDITS_MESSAGE,
        },
    )
    reason = forms.CharField(
        max_length=300,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept in the ledger with your name (at most 300 characters).",
        error_messages={"required": "Give a reason: it is kept in the ledger with your name."},
    )


class CreditsGrantForm(CreditsAdjustmentForm):
    """Grant a lot of purchased (never expiring) or bonus (expiring) credits."""

    BUCKETS = {"purchased": Bucket.PURCHASED, "bonus": Bucket.BONUS}

    bucket = forms.ChoiceField(
        choices=[
            ("purchased", "Purchased: never expires"),
            ("bonus", "Bonus: expires at the date and time below"),
        ],
        initial="purchased",
        widget=forms.RadioSelect(attrs={"class": "radiolist"}),
    )
    expires_at = forms.DateTimeField(
        label="Bonus expires at (UTC)",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        help_text="Only for bonus credits; must be in the future.",
    )
    grant_id = forms.CharField(widget=forms.HiddenInput, initial=lambda: uuid4().hex)

    field_order = ["credits", "bucket", "expires_at", "reason"]

    def clean_grant_id(self):
        # The id is made when the form is shown, so submitting it twice grants once.
        grant_id = self.cleaned_data["grant_id"]
        if not _GRANT_ID.match(grant_id):
            raise forms.ValidationError("This form is out of date; open it again.")
        return grant_id

    def clean(self):
        data = super().clean()
        bucket, expires_at = data.get("bucket"), data.get("expires_at")
        if bucket == "bonus":
            if expires_at is None and "expires_at" not in self.errors:
                self.add_error("expires_at", "Bonus credits need an expiry date and time.")
            elif expires_at is not None and expires_at <= clock.now():
                self.add_error("expires_at", "The expiry must be in the future.")
        elif bucket == "purchased" and expires_at is not None:
            self.add_error("expires_at", "Purchased credits never expire: leave the expiry empty.")
        return data

    @property
    def bucket_value(self) -> int:
        return self.BUCKETS[self.cleaned_data["bucket"]]

    @property
    def source(self) -> str:
        return f"staff:{self.cleaned_data['grant_id']}"


class CreditsRemoveForm(CreditsAdjustmentForm):
    """Remove credits from the lots in spending order."""
