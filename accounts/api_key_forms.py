"""The form that names a new API key (Settings → API keys)."""

from django import forms

_NAME_MESSAGE = "Give the key a name of 1 to 100 characters, e.g. “Production server”."


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(
        label="Key name",
        max_length=100,
        help_text="So you can tell your keys apart, e.g. where it is used. 1 to 100 characters.",
        error_messages={"required": _NAME_MESSAGE, "max_length": "At most 100 characters: shorten the name."},
        widget=forms.TextInput(attrs={"autocomplete": "off", "aria-describedby": "id_name_help"}),
    )

    def clean_name(self) -> str:
        name = " ".join(self.cleaned_data["name"].split())
        if not name:
            raise forms.ValidationError(_NAME_MESSAGE)
        return name
