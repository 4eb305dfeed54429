"""The Usage page's range picker (DESIGN §4 "Usage"): start and end dates, both inclusive, and
whether to break usage down by product or by mode. Used by the page and by its CSV export."""

from dataclasses import dataclass
from datetime import date, timedelta

from django import forms

DEFAULT_DAYS = 30
PRESET_DAYS = (7, 30, 90)
MAX_DAYS = 366
GROUPINGS = (("product", "Product"), ("mode", "Mode"))
DEFAULT_GROUP_BY = "product"
# Dates outside these bounds are typing mistakes (a year 0206, or 20266); refusing them also keeps
# date arithmetic clear of the calendar's ends.
FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(2100, 12, 31)

_DATE_MESSAGE = "Enter a date as YYYY-MM-DD, e.g. 2026-11-23."
_BOUNDS_MESSAGE = "Enter a date between 2000-01-01 and 2100-12-31."


@dataclass(frozen=True)
class UsageRange:
    start: date
    end: date
    group_by: str

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def query(self) -> dict[str, str]:
        """The page's query string for this range: ?start=&end=&group_by=."""
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "group_by": self.group_by}


def default_range(today: date, group_by: str = DEFAULT_GROUP_BY) -> UsageRange:
    """The last 30 days, today included."""
    return preset_range(today, DEFAULT_DAYS, group_by)


def preset_range(today: date, days: int, group_by: str = DEFAULT_GROUP_BY) -> UsageRange:
    return UsageRange(today - timedelta(days=days - 1), today, group_by)


class UsageRangeForm(forms.Form):
    """Bind it to request.GET with today's date. A missing end is today; a missing start is 30
    days before the end; a missing grouping is by product."""

    start = forms.DateField(
        label="From",
        required=False,
        input_formats=["%Y-%m-%d"],
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
        error_messages={"invalid": _DATE_MESSAGE},
    )
    end = forms.DateField(
        label="To",
        required=False,
        input_formats=["%Y-%m-%d"],
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
        error_messages={"invalid": _DATE_MESSAGE},
    )
    group_by = forms.ChoiceField(
        label="Group by",
        required=False,
        choices=GROUPINGS,
        widget=forms.RadioSelect,
        error_messages={"invalid_choice": "Group usage by product or by mode."},
    )

    def __init__(self, *args, today: date, **kwargs):
        super().__init__(*args, **kwargs)
        self.today = today

    def _clean_day(self, name: str) -> date | None:
        day = self.cleaned_data.get(name)
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise forms.ValidationError(_BOUNDS_MESSAGE)
        return day

    def clean_start(self):
        return self._clean_day("start")

    def clean_end(self):
        return self._clean_day("end")

    def clean_group_by(self):
        return self.cleaned_data.get("group_by") or DEFAULT_GROUP_BY

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        end = data.get("end") or self.today
        start = data.get("start") or end - timedelta(days=DEFAULT_DAYS - 1)
        if start > end:
            raise forms.ValidationError(
                "The start date must be on or before the end date.", code="start_after_end"
            )
        if (end - start).days + 1 > MAX_DAYS:
            raise forms.ValidationError(
                f"Choose a range of at most {MAX_DAYS} days; this one has {(end - start).days + 1:,}.",
                code="too_long",
            )
        data["start"], data["end"] = start, end
        return data

    @property
    def usage_range(self) -> UsageRange:
        """The chosen range once the form is valid; otherwise the default range (keeping the
        grouping when that part was valid)."""
        if self.is_valid():
            d = self.cleaned_data
            return UsageRange(d["start"], d["end"], d["group_by"])
        group_by = getattr(self, "cleaned_data", {}).get("group_by") or DEFAULT_GROUP_BY
        return default_range(self.today, group_by)

    def error_lines(self) -> list[str]:
        """Every error as one plain sentence (for the CSV's 400 answer)."""
        lines = []
        for name, errors in self.errors.items():
            label = self.fields[name].label if name in self.fields else None
            lines += [f"{label}: {e}" if label else e for e in errors]
        return lines
