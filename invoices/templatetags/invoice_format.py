"""Invoice figures for people: a per-1,000 rate as "$1.25", a tax rate as "20%"."""

from decimal import Decimal

from django import template

register = template.Library()


@register.filter
def rate(value) -> str:
    """Dollars with at least two decimals and no trailing zeros beyond: 1.2500 -> "$1.25"."""
    if value is None or value == "":
        return "—"
    whole, _, fraction = f"{Decimal(value).normalize():f}".partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


@register.filter
def percent(value) -> str:
    """A Decimal percentage without trailing zeros: 20.000 -> "20%", 7.250 -> "7.25%"."""
    if value is None or value == "":
        return "—"
    return f"{Decimal(value).normalize():f}%"
