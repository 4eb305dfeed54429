"""User input for the Payment methods page and the staff mark-paid / void screens."""

from django import forms
from django.core.validators import RegexValidator


class CardAddForm(forms.Form):
    """What the page posts after Stripe.js confirmed the SetupIntent (filled in by cards.js)."""

    payment_method = forms.CharField(
        max_length=255,
        validators=[RegexValidator(r"^pm_[A-Za-z0-9_]+$", "That is not a card reference from Stripe.")],
        error_messages={"required": "Enter your card details, then choose Add card."},
        widget=forms.HiddenInput,
    )
    setup_intent = forms.CharField(
        max_length=255,
        required=False,
        validators=[RegexValidator(r"^seti_[A-Za-z0-9_]+$", "That is not a card setup from Stripe.")],
        widget=forms.HiddenInput,
    )
    cardholder = forms.CharField(
        label="Name on card",
        max_length=200,
        required=False,
        widget=forms.TextInput(attrs={"autocomplete": "cc-name"}),
    )


class StaffReasonForm(forms.Form):
    """The reason staff give when they mark an invoice paid or void it (kept on the invoice)."""

    reason = forms.CharField(
        label="Reason",
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept on the invoice, e.g. the bank transfer's reference.",
        error_messages={"required": "Give a reason; it is kept on the invoice."},
    )
