"""Numbers for people (STYLE): 12,345 credits, $1,234.56, 14 Dec 2026."""

from datetime import date, datetime

from django import template

register = template.Library()


@register.filter
def credits(value) -> str:
    """12345 -> "12,345"."""
    if value is None or value == "":
        return "—"
    return f"{int(value):,}"


@register.filter
def money(cents) -> str:
    """Integer cents -> "$1,234.56" (negative: "−$1.00")."""
    if cents is None or cents == "":
        return "—"
    cents = int(cents)
    sign = "−" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


@register.filter
def day(value) -> str:
    """A date or datetime -> "14 Dec 2026"."""
    if value is None or value == "":
        return "—"
    if isinstance(value, datetime):
        value = value.date()
    if not isinstance(value, date):
        return str(value)
    return f"{value.day} {value:%b %Y}"


@register.filter
def percent_of(part, whole) -> int:
    """Whole percent of `part` in `whole`, capped at 100 (for progress bars)."""
    try:
        return max(0, min(100, round(int(part) * 100 / int(whole))))
    except (TypeError, ValueError, ZeroDivisionError):
        return 0
