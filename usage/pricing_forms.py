"""The public cost estimator's form (/pricing/), and a whole-number field people can type
"30,000" into."""

import re

from django import forms

MAX_PAGES = 1_000_000_000
_SEPARATORS = re.compile(r"[\s,_]")


class WholeNumberField(forms.IntegerField):
    """An IntegerField that accepts thousands separators ("30,000", "30 000") and shows a text
    box with a numeric keyboard instead of a spinner."""

    widget = forms.TextInput

    def __init__(self, *, message: str, **kwargs):
        kwargs.setdefault("error_messages", {})
        for key in ("invalid", "min_value", "max_value"):
            kwargs["error_messages"].setdefault(key, message)
        super().__init__(**kwargs)

    def to_python(self, value):
        if isinstance(value, str):
            value = _SEPARATORS.sub("", value)
        return super().to_python(value)

    def widget_attrs(self, widget):
        attrs = super().widget_attrs(widget)
        attrs.pop("min", None)
        attrs.pop("max", None)
        attrs.pop("step", None)
        attrs.update({"inputmode": "numeric", "autocomplete": "off", "spellcheck": "false"})
        return attrs


_PAGES_MESSAGE = f"Enter a whole number of pages from 0 to {MAX_PAGES:,}."


def _pages_field(label: str) -> WholeNumberField:
    return WholeNumberField(
        label=label,
        required=False,
        min_value=0,
        max_value=MAX_PAGES,
        message=_PAGES_MESSAGE,
        widget=forms.TextInput(attrs={"placeholder": "0"}),
    )


class EstimatorForm(forms.Form):
    """Pages per month for each Parse mode; an empty box means 0."""

    base = _pages_field("Pages per month — base")
    advanced = _pages_field("Pages per month — advanced")
    ocr = _pages_field("Pages per month — with OCR")

    def pages(self) -> dict[str, int]:
        return {name: self.cleaned_data.get(name) or 0 for name in ("base", "advanced", "ocr")}
