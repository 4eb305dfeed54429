"""Forms of the Plans page: the overage cap, the plan change confirmation and "Contact sales"."""

import re

from django import forms

from accounts.models import CompanySize, ContactRequest

MAX_CAP_DOLLARS = 1_000_000
_WHOLE_DOLLARS = re.compile(r"^\$?\s*(\d{1,3}(,\d{3})+|\d+)$")


class OverageCapForm(forms.Form):
    """ "none" (or empty) for no cap, or a whole number of dollars a month from 0 to 1,000,000."""

    cap = forms.CharField(
        label="Monthly overage cap, in dollars",
        required=False,
        max_length=20,
        help_text='A whole number of dollars from 0 to 1,000,000, or "none" for no cap. '
        "Jobs that would take this period's overage above it get 402.",
        widget=forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "off", "size": 12}),
    )

    @classmethod
    def for_cap(cls, cap_cents: int | None, **kwargs):
        initial = "none" if cap_cents is None else f"{cap_cents // 100}"
        return cls(initial={"cap": initial}, **kwargs)

    def clean_cap(self) -> int | None:
        """The cap in cents, or None for no cap."""
        text = self.cleaned_data["cap"].strip()
        if text == "" or text.lower() == "none":
            return None
        if not _WHOLE_DOLLARS.match(text):
            if re.match(r"^\$?\s*-", text):
                raise forms.ValidationError("The cap cannot be negative: use 0 to allow no overage at all.")
            raise forms.ValidationError('Enter a whole number of dollars, such as 250, or "none" for no cap.')
        dollars = int(re.sub(r"[$,\s]", "", text))
        if dollars > MAX_CAP_DOLLARS:
            raise forms.ValidationError(f"The cap can be at most ${MAX_CAP_DOLLARS:,} a month.")
        return dollars * 100


class PlanChangeForm(forms.Form):
    """The confirmation: carries the charge the page showed, so a charge that changed meanwhile
    (a new day began) is shown again instead of being made."""

    expected_charge_cents = forms.IntegerField(min_value=0, required=False, widget=forms.HiddenInput)


class ContactSalesForm(forms.ModelForm):
    class Meta:
        model = ContactRequest
        fields = ("name", "email", "company_size", "message")
        labels = {
            "name": "Your name",
            "email": "E-mail",
            "company_size": "Company size",
            "message": "What do you need?",
        }
        help_texts = {
            "message": "Expected volume (pages a month), products, and anything your contract must cover.",
        }
        error_messages = {
            "name": {"required": "Tell us your name."},
            "email": {"required": "Enter your e-mail address.", "invalid": "Enter a valid e-mail address."},
            "company_size": {"required": "Choose your company size."},
            "message": {"required": "Tell us what you need."},
        }
        widgets = {
            "name": forms.TextInput(attrs={"autocomplete": "name"}),
            "email": forms.EmailInput(attrs={"autocomplete": "email"}),
            "message": forms.Textarea(attrs={"rows": 4}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["company_size"].choices = [("", "Choose…"), *CompanySize.choices]

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Tell us your name.")
        return name

    def clean_message(self) -> str:
        message = self.cleaned_data["message"].strip()
        if len(message) < 10:
            raise forms.ValidationError("Tell us a little more (at least 10 characters).")
        if len(message) > 5000:
            raise forms.ValidationError("Keep the message to 5,000 characters.")
        return message
