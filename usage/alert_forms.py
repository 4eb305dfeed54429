"""The low-balance alert form on Settings → Billing → Notifications."""

import re

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from usage.models import MAX_ALERT_RECIPIENTS, MAX_ALERT_THRESHOLD
from usage.pricing_forms import WholeNumberField

_ADDRESS_SEPARATORS = re.compile(r"[\s,;]+")
_THRESHOLD_MESSAGE = f"Enter a whole number of credits from 1 to {MAX_ALERT_THRESHOLD:,}."


def split_addresses(text: str) -> list[str]:
    """Addresses separated by commas, semicolons, spaces or new lines; lower-cased, no repeats."""
    seen: list[str] = []
    for part in _ADDRESS_SEPARATORS.split(text or ""):
        address = part.strip().lower()
        if address and address not in seen:
            seen.append(address)
    return seen


class LowBalanceAlertForm(forms.Form):
    enabled = forms.BooleanField(label="E-mail us when the balance runs low", required=False)
    threshold = WholeNumberField(
        label="Threshold (credits)",
        min_value=1,
        max_value=MAX_ALERT_THRESHOLD,
        message=_THRESHOLD_MESSAGE,
        help_text=f"A whole number from 1 to {MAX_ALERT_THRESHOLD:,}: we e-mail when the balance falls below it.",
        error_messages={"required": _THRESHOLD_MESSAGE},
        widget=forms.TextInput(attrs={"aria-describedby": "id_threshold_help"}),
    )
    recipients = forms.CharField(
        label="Recipients",
        required=False,
        widget=forms.Textarea(
            attrs={"rows": 4, "aria-describedby": "id_recipients_help", "spellcheck": "false"}
        ),
        help_text=f"Up to {MAX_ALERT_RECIPIENTS} e-mail addresses, one a line or separated by commas.",
    )

    def clean_recipients(self) -> list[str]:
        addresses = split_addresses(self.cleaned_data.get("recipients", ""))
        wrong = []
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                wrong.append(address)
        if wrong:
            listed = ", ".join(f"“{a}”" for a in wrong)
            raise ValidationError(
                f"Not an e-mail address: {listed}." if len(wrong) == 1 else f"Not e-mail addresses: {listed}."
            )
        if len(addresses) > MAX_ALERT_RECIPIENTS:
            raise ValidationError(f"At most {MAX_ALERT_RECIPIENTS} addresses; you entered {len(addresses)}.")
        return addresses

    def clean(self):
        data = super().clean()
        if data.get("enabled") and "recipients" not in self.errors and not data.get("recipients"):
            self.add_error("recipients", "Add at least one e-mail address, or turn the alert off.")
        return data
